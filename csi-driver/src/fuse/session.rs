//! Serving one FUSE connection: worker threads read requests from a /dev/fuse file,
//! hand them to a [`FileSystem`], and write the replies.
//!
//! **Resuming a connection another process initialised.** The kernel sends INIT once
//! per connection. A node agent that restarts gets the connection's /dev/fuse file back
//! (the CSI plugin keeps a duplicate, so the connection never lost its last reader) and
//! must serve it *without* an INIT: [`Session::resume`] starts from the parameters the
//! first server negotiated (saved by its caller, [`ConnParams`]) and, first of all,
//! sends `FUSE_NOTIFY_RESEND` (Linux 6.9+): requests the dead server had read but not
//! answered go back to the kernel's queue and arrive again, so a read that was in
//! flight waits across the restart instead of hanging forever. This works because every
//! holder shares one open file description of /dev/fuse (duplicates, never
//! `FUSE_DEV_IOC_CLONE`): its queue of requests being processed outlives any one
//! process, whereas a cloned device's queue is aborted when its holder dies.
//!
//! Threads: several workers read the same file; the kernel gives each request to one of
//! them. A file system answers most requests on the worker thread; READ may answer later
//! from another thread through a [`ReplyData`] (which answers `EIO` if dropped unanswered,
//! so the kernel never waits forever on a request we lost).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use super::abi::{
    self, AttrOut, CreateIn, DirBuf, EntryOut, FallocateIn, InHeader, OpenOut, RenameIn, SetattrIn,
    StatfsOut, WriteIn, init, op,
};

/// Pages per request we accept (1 MiB requests of 4 KiB pages).
const MAX_PAGES: u16 = 256;

/// A positive errno (`libc::ENOENT`, …).
pub type Errno = i32;

/// The /dev/fuse file of one connection.
#[derive(Debug)]
pub struct Device {
    file: File,
}

impl Device {
    pub fn new(fd: OwnedFd) -> Self {
        Device {
            file: File::from(fd),
        }
    }

    /// A duplicate of the descriptor (the same open file description).
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.file.as_fd().try_clone_to_owned()
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one whole message (a reply or a notification).
    pub fn write(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: write(2) of a buffer we own; /dev/fuse takes a message in one write.
        let n = unsafe { libc::write(self.file.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `file` as a passthrough backing file; returns its id.
    pub fn open_backing(&self, file: &File) -> io::Result<u32> {
        // struct fuse_backing_map { int32 fd; uint32 flags; uint64 padding; }
        let mut map = [0u8; 16];
        map[0..4].copy_from_slice(&file.as_raw_fd().to_le_bytes());
        // SAFETY: the ioctl reads 16 bytes from `map`, which lives across the call.
        let id = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                abi::DEV_IOC_BACKING_OPEN,
                map.as_ptr(),
            )
        };
        if id < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(id as u32)
    }

    /// Unregisters a backing id (the kernel keeps the file while files use it).
    pub fn close_backing(&self, id: u32) -> io::Result<()> {
        // SAFETY: the ioctl reads one u32 from `id`, which lives across the call.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                abi::DEV_IOC_BACKING_CLOSE,
                &id as *const u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What a connection's INIT settled, kept by whoever may resume the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnParams {
    pub minor: u32,
    /// Accepted INIT flags (`flags | flags2 << 32`).
    pub flags: u64,
    pub max_readahead: u32,
    pub max_write: u32,
}

impl ConnParams {
    pub fn passthrough(&self) -> bool {
        self.flags & init::PASSTHROUGH != 0
    }
}

/// How a session negotiates and runs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub threads: usize,
    /// Largest readahead we accept (the kernel offers its own maximum).
    pub max_readahead: u32,
    /// Largest WRITE payload (at least 4096); read buffers are sized from it.
    pub max_write: u32,
    /// INIT flags the file system wants; the kernel's offer limits them.
    pub want: u64,
}

impl SessionConfig {
    /// Also serve requests through io_uring when the kernel offers it (`uring.rs`).
    /// Only for connections that are never resumed by another process.
    pub fn with_io_uring(mut self, on: bool) -> Self {
        if on {
            self.want |= init::OVER_IO_URING;
        } else {
            self.want &= !init::OVER_IO_URING;
        }
        self
    }
}

impl SessionConfig {
    /// A read-only dataset: async reads, readdirplus, parallel lookups, 1 MiB requests,
    /// and passthrough when `passthrough`.
    pub fn read_only(threads: usize, passthrough: bool) -> Self {
        SessionConfig {
            threads,
            max_readahead: 1 << 20,
            max_write: 128 * 1024,
            want: init::ASYNC_READ
                | init::DO_READDIRPLUS
                | init::READDIRPLUS_AUTO
                | init::PARALLEL_DIROPS
                | init::MAX_PAGES
                | init::INIT_EXT
                | if passthrough { init::PASSTHROUGH } else { 0 },
        }
    }
}

impl SessionConfig {
    /// A read-write volume (checkpoints): 1 MiB writes where they come to us, parallel
    /// directory operations, passthrough when `passthrough`. No readdirplus: a listing
    /// would hold a lookup per entry that the kernel may never use.
    pub fn read_write(threads: usize, passthrough: bool) -> Self {
        SessionConfig {
            threads,
            max_readahead: 1 << 20,
            max_write: 1 << 20,
            want: init::ASYNC_READ
                | init::BIG_WRITES
                | init::PARALLEL_DIROPS
                | init::MAX_PAGES
                | init::INIT_EXT
                | if passthrough { init::PASSTHROUGH } else { 0 },
        }
    }
}

/// The caller of a request.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub unique: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What a file system may do on its connection.
#[derive(Clone, Debug)]
pub struct Connection {
    device: Arc<Device>,
    params: Arc<OnceLock<ConnParams>>,
    requests: Arc<RequestCounts>,
    /// The io_uring queues' threads, once started.
    rings: Arc<parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// The kernel's number of the mount's device (major << 20 | minor), once the
    /// mounter has told it ([`Connection::set_device`]): it names the connection in
    /// fusectl.
    dev: Arc<OnceLock<u64>>,
    /// Why this server ended the connection ([`Connection::abort`]), if it did.
    aborted: Arc<OnceLock<String>>,
}

/// Where the kernel's FUSE control file system (fusectl) lists connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Requests served, and the time spent handling them (to the reply, or to handing the
/// request on), per opcode: what a workload costs in round trips to us.
#[derive(Debug)]
struct RequestCounts {
    count: [std::sync::atomic::AtomicU64; 64],
    nanos: [std::sync::atomic::AtomicU64; 64],
    /// Handling times by [`HANDLING_BOUNDS`] (the last bucket: longer than all).
    buckets: [[std::sync::atomic::AtomicU64; HANDLING_BOUNDS.len() + 1]; 64],
    /// Of those, the requests that came through io_uring.
    ring: std::sync::atomic::AtomicU64,
}

/// Upper bounds, in seconds, of the handling-time buckets: 50 us to 13 s by factors of
/// 4 (a LOOKUP answered from the snapshot takes tens of microseconds, a READ that
/// waits for the lake up to seconds).
pub const HANDLING_BOUNDS: [f64; 10] = [
    50e-6, 200e-6, 800e-6, 3.2e-3, 12.8e-3, 51.2e-3, 204.8e-3, 819.2e-3, 3.2768, 13.1072,
];

/// One operation's requests: their total handling time, and how many took at most each
/// of [`HANDLING_BOUNDS`] (not cumulative; the last: longer; their sum is the count).
#[derive(Clone, Debug, PartialEq)]
pub struct OpTotals {
    pub op: &'static str,
    pub nanos: u64,
    pub buckets: [u64; HANDLING_BOUNDS.len() + 1],
}

impl Connection {
    /// Tells the connection its mount's device number (as the mount table gives it), so
    /// that it can abort itself ([`Connection::abort`]).
    pub fn set_device(&self, major: u32, minor: u32) {
        let _ = self.dev.set((u64::from(major) << 20) | u64::from(minor));
    }

    /// Ends the connection in the kernel (fusectl's `abort`): every request waiting on
    /// it fails with `ECONNABORTED`, and every later one with `ENOTCONN` until the
    /// volume is mounted again. For a server that can no longer answer some requests
    /// (an io_uring queue that failed): a loud failure instead of readers waiting
    /// forever. Mounts fusectl first where it is not mounted (needs root). `why` is
    /// kept for [`Connection::aborted`].
    pub fn abort(&self, why: &str) -> io::Result<()> {
        let Some(&id) = self.dev.get() else {
            return Err(io::Error::other(
                "the mount's device number is not known (the mounter never told it)",
            ));
        };
        let dir = std::path::Path::new(FUSECTL).join(id.to_string());
        if !dir.exists()
            && !crate::mounts::is_mounted(std::path::Path::new(FUSECTL)).unwrap_or(false)
        {
            let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
            let (src, target, fstype) = (c("fusectl"), c(FUSECTL), c("fusectl"));
            // SAFETY: NUL-terminated strings; no data argument.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("mounting fusectl on {FUSECTL}: {e}"),
                ));
            }
        }
        let abort = dir.join("abort");
        std::fs::write(&abort, "1")
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", abort.display())))?;
        let _ = self.aborted.set(why.to_owned());
        Ok(())
    }

    /// Why this server ended the connection, if it did ([`Connection::abort`]).
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.get().map(String::as_str)
    }

    /// Requests served so far, by opcode name (those seen at least once), with the
    /// mean time in microseconds each took to handle.
    pub fn request_counts(&self) -> Vec<(&'static str, u64, f64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.requests;
        (0..r.count.len())
            .filter_map(|op| {
                let n = r.count[op].load(Relaxed);
                let us = r.nanos[op].load(Relaxed) as f64 / 1e3 / n.max(1) as f64;
                (n > 0).then(|| (abi::op::name(op as u32), n, (us * 10.0).round() / 10.0))
            })
            .collect()
    }

    /// Requests served so far, by opcode name (those seen at least once), with the
    /// time spent handling them, in total and by bucket (for metrics).
    pub fn request_totals(&self) -> Vec<OpTotals> {
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.requests;
        (0..r.count.len())
            .filter_map(|op| {
                let n = r.count[op].load(Relaxed);
                (n > 0).then(|| OpTotals {
                    op: abi::op::name(op as u32),
                    nanos: r.nanos[op].load(Relaxed),
                    buckets: std::array::from_fn(|b| r.buckets[op][b].load(Relaxed)),
                })
            })
            .collect()
    }

    /// Requests that came through io_uring so far (`uring.rs`).
    pub fn io_uring_requests(&self) -> u64 {
        self.requests
            .ring
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether INIT settled on FUSE passthrough.
    pub fn passthrough(&self) -> bool {
        self.params.get().is_some_and(ConnParams::passthrough)
    }

    pub fn params(&self) -> Option<ConnParams> {
        self.params.get().copied()
    }

    pub fn open_backing(&self, file: &File) -> io::Result<u32> {
        self.device.open_backing(file)
    }

    pub fn close_backing(&self, id: u32) -> io::Result<()> {
        self.device.close_backing(id)
    }

    /// Asks the kernel to drop its dentry `name` under `parent` (and, with it, every
    /// unused dentry and inode below). `ENOENT` (not cached) is success.
    pub fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        match self.device.write(&abi::notify_inval_entry(parent, name)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }
}

/// Where a later answer goes: the /dev/fuse file, or the io_uring entry that holds the
/// request (through its queue's mailbox).
pub(super) enum ReplyTo {
    Device(Arc<Device>),
    Ring(Arc<super::uring::Mailbox>, u32),
}

/// The answer to a READ, possibly given later from another thread.
pub struct ReplyData {
    unique: u64,
    to: ReplyTo,
    done: bool,
}

impl ReplyData {
    pub fn data(mut self, data: &[u8]) {
        self.done = true;
        self.answer(Ok(data));
    }

    pub fn error(mut self, errno: Errno) {
        self.done = true;
        self.answer(Err(errno));
    }

    fn answer(&self, r: Result<&[u8], Errno>) {
        match &self.to {
            ReplyTo::Device(d) => match r {
                Ok(data) => send(d, abi::message(self.unique, 0, data)),
                Err(errno) => send(d, abi::message(self.unique, -errno, &[])),
            },
            ReplyTo::Ring(mailbox, entry) => {
                mailbox.post(*entry, self.unique, r.map(|d| d.to_vec()))
            }
        }
    }
}

impl Drop for ReplyData {
    fn drop(&mut self) {
        if !self.done {
            self.answer(Err(libc::EIO));
        }
    }
}

/// Answers a LOOKUP, READDIR or READDIRPLUS (now, or once it waited: see
/// [`FileSystem::not_yet`]).
fn answer_listing(
    fs: &dyn FileSystem,
    req: &Request,
    h: InHeader,
    payload: &[u8],
) -> Result<Vec<u8>, Errno> {
    let bad = |e: abi::Malformed| {
        tracing::warn!(opcode = h.opcode, what = e.0, "malformed FUSE request");
        libc::EINVAL
    };
    if h.opcode == op::LOOKUP {
        let name = abi::Cursor(payload).name("lookup").map_err(bad)?;
        let e = fs.lookup(req, h.nodeid, name)?;
        let mut v = Vec::with_capacity(128);
        e.encode(&mut v);
        return Ok(v);
    }
    let r = abi::ReadIn::parse(payload).map_err(bad)?;
    let mut out = DirBuf::new(r.size as usize, h.opcode == op::READDIRPLUS);
    fs.readdir(req, h.nodeid, r.fh, r.offset, &mut out)?;
    Ok(out.into_bytes())
}

fn send(device: &Device, msg: Vec<u8>) {
    if let Err(e) = device.write(&msg) {
        // ENOENT: the request was interrupted meanwhile; nobody waits for the answer.
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::debug!(error = %e, "writing a FUSE reply failed");
        }
    }
}

/// Called once a request that waited ([`FileSystem::not_yet`]) can be answered; it
/// answers it, on the calling thread. Dropping it uncalled answers `EIO`.
pub type Resume = Box<dyn FnOnce() + Send>;

/// What [`FileSystem::not_yet`] returns: a function that arranges for its [`Resume`]
/// to be called (from any thread) once the request can be answered.
pub type Wait = Box<dyn FnOnce(Resume) + Send>;

/// A file system served over FUSE. Inode numbers are the kernel's node ids (1 is the
/// root). Methods run on worker threads and must not block for long; READ may reply
/// later, and LOOKUP and READDIR wait off the worker thread when
/// [`FileSystem::not_yet`] says so. Write operations default to `EROFS`, anything else
/// to `ENOSYS`.
#[allow(unused_variables)]
pub trait FileSystem: Send + Sync + 'static {
    /// Called once the connection's parameters are known (after INIT, or at resume).
    fn connected(&self, conn: &Connection) {}
    /// Asked before a LOOKUP of `name` in `ino` (`name` set) or a READDIR of `ino` from
    /// `offset`: a file system that cannot answer yet (its tree is still being listed)
    /// returns a [`Wait`], and the request is answered (`lookup` or `readdir` called
    /// then) when it resumes it, without holding a worker thread meanwhile.
    fn not_yet(&self, ino: u64, name: Option<&OsStr>, offset: u64) -> Option<Wait> {
        None
    }
    fn lookup(&self, req: &Request, parent: u64, name: &OsStr) -> Result<EntryOut, Errno>;
    fn forget(&self, ino: u64, nlookup: u64) {}
    fn getattr(&self, req: &Request, ino: u64, fh: Option<u64>) -> Result<AttrOut, Errno>;
    fn open(&self, req: &Request, ino: u64, flags: u32) -> Result<OpenOut, Errno>;
    fn read(&self, req: &Request, ino: u64, fh: u64, offset: u64, size: u32, reply: ReplyData);
    fn release(&self, req: &Request, ino: u64, fh: u64, flags: u32) {}
    fn opendir(&self, req: &Request, ino: u64, flags: u32) -> Result<OpenOut, Errno>;
    /// Fills `out` from `offset` (0, or the cookie of the next entry).
    fn readdir(
        &self,
        req: &Request,
        ino: u64,
        fh: u64,
        offset: u64,
        out: &mut DirBuf,
    ) -> Result<(), Errno>;
    fn releasedir(&self, req: &Request, ino: u64, fh: u64) {}
    fn statfs(&self, req: &Request, ino: u64) -> Result<StatfsOut, Errno>;
    fn access(&self, req: &Request, ino: u64, mask: u32) -> Result<(), Errno> {
        Ok(())
    }
    // Writes: a read-only file system keeps these defaults (`EROFS`).
    fn setattr(&self, req: &Request, ino: u64, attr: &SetattrIn) -> Result<AttrOut, Errno> {
        Err(libc::EROFS)
    }
    /// MKNOD: only regular files are asked of a file system that also answers CREATE.
    fn mknod(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<EntryOut, Errno> {
        Err(libc::EROFS)
    }
    fn mkdir(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<EntryOut, Errno> {
        Err(libc::EROFS)
    }
    fn unlink(&self, req: &Request, parent: u64, name: &OsStr) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
    fn rmdir(&self, req: &Request, parent: u64, name: &OsStr) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
    /// RENAME and RENAME2 (`flags` are `renameat2`'s: NOREPLACE, EXCHANGE, WHITEOUT).
    fn rename(&self, req: &Request, parent: u64, r: &RenameIn<'_>) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
    /// LINK and SYMLINK.
    fn link(&self, req: &Request, opcode: u32, ino: u64) -> Result<EntryOut, Errno> {
        Err(libc::EROFS)
    }
    fn create(
        &self,
        req: &Request,
        parent: u64,
        c: &CreateIn<'_>,
    ) -> Result<(EntryOut, OpenOut), Errno> {
        Err(libc::EROFS)
    }
    fn write(&self, req: &Request, ino: u64, w: &WriteIn<'_>) -> Result<u32, Errno> {
        Err(libc::EROFS)
    }
    fn fsync(&self, req: &Request, ino: u64, fh: u64, datasync: bool) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
    fn fsyncdir(&self, req: &Request, ino: u64, fh: u64, datasync: bool) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
    fn fallocate(&self, req: &Request, ino: u64, f: &FallocateIn) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
    /// SETXATTR, REMOVEXATTR, TMPFILE, SYNCFS: the rest of the writing opcodes.
    fn other_write(&self, req: &Request, opcode: u32, ino: u64) -> Result<(), Errno> {
        Err(libc::EROFS)
    }
}

/// A running session; ends when the connection does (unmount, or abort).
pub struct Session {
    workers: Vec<std::thread::JoinHandle<()>>,
    conn: Connection,
}

impl Session {
    /// Serves a new connection: the first request is INIT.
    pub fn start(
        device: Device,
        fs: Arc<dyn FileSystem>,
        config: SessionConfig,
    ) -> io::Result<Session> {
        Self::spawn(Arc::new(device), fs, config, None)
    }

    /// Serves a connection that another process initialised with `params` (see the
    /// module docs): no INIT comes; requests the previous server left unanswered are
    /// asked for again first.
    pub fn resume(
        device: Device,
        fs: Arc<dyn FileSystem>,
        config: SessionConfig,
        params: ConnParams,
    ) -> io::Result<Session> {
        Self::spawn(Arc::new(device), fs, config, Some(params))
    }

    fn spawn(
        device: Arc<Device>,
        fs: Arc<dyn FileSystem>,
        config: SessionConfig,
        resume: Option<ConnParams>,
    ) -> io::Result<Session> {
        let params = Arc::new(OnceLock::new());
        let conn = Connection {
            device: device.clone(),
            params: params.clone(),
            requests: Arc::new(RequestCounts {
                count: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
                nanos: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
                buckets: std::array::from_fn(|_| std::array::from_fn(|_| Default::default())),
                ring: Default::default(),
            }),
            rings: Default::default(),
            dev: Default::default(),
            aborted: Default::default(),
        };
        if let Some(p) = resume {
            let _ = params.set(p);
            fs.connected(&conn);
            // Requests the previous server read and never answered come again.
            if let Err(e) = device.write(&abi::message(0, abi::notify::RESEND, &[])) {
                tracing::warn!(error = %e, "the kernel cannot resend requests a previous server left unanswered (needs Linux 6.9); those stay unanswered");
            }
        }
        let buf_len = (config.max_write as usize + 64 * 1024).max(abi::MIN_READ_BUFFER);
        let mut workers = Vec::new();
        for i in 0..config.threads.max(1) {
            let worker = Worker {
                device: device.clone(),
                fs: fs.clone(),
                config: config.clone(),
                conn: conn.clone(),
            };
            if i == 0
                && let Some(p) = resume
                && p.flags & init::OVER_IO_URING != 0
            {
                // The previous server's ring entries died with it: requests wait on
                // the queues until new ones register.
                worker.start_rings(p);
            }
            workers.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || worker.run(buf_len))?,
            );
        }
        Ok(Session { workers, conn })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The parameters INIT settled; `None` until the kernel has sent INIT.
    pub fn params(&self) -> Option<ConnParams> {
        self.conn.params()
    }

    /// Waits until INIT has been answered (or `timeout` passes).
    pub fn wait_initialized(&self, timeout: std::time::Duration) -> Option<ConnParams> {
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.params() {
                return Some(p);
            }
            if std::time::Instant::now() > end {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Waits for the connection to end.
    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
        // The kernel ends the ring entries when the connection ends; a queue thread
        // still waiting after that is left behind rather than holding up the unmount.
        let rings = std::mem::take(&mut *self.conn.rings.lock());
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for r in rings {
            while !r.is_finished() && std::time::Instant::now() < end {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }

    /// Whether every worker has stopped (the connection ended).
    pub fn is_finished(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }
}

#[derive(Clone)]
pub(super) struct Worker {
    device: Arc<Device>,
    fs: Arc<dyn FileSystem>,
    config: SessionConfig,
    conn: Connection,
}

impl Worker {
    pub(super) fn connection(&self) -> &Connection {
        &self.conn
    }

    fn run(self, buf_len: usize) {
        let mut buf = vec![0u8; buf_len];
        loop {
            let n = match self.device.read(&mut buf) {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    // Interrupted, or a request that was aborted before we got it.
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                    // Unmounted or aborted: the connection is over.
                    Some(libc::ENODEV) => return,
                    _ => {
                        tracing::error!(error = %e, "reading /dev/fuse failed; stopping this worker");
                        return;
                    }
                },
            };
            match InHeader::parse(&buf[..n]) {
                Ok((h, payload)) => self.dispatch(h, payload),
                Err(e) => tracing::error!(what = e.0, "malformed FUSE request ignored"),
            }
        }
    }

    fn reply(&self, unique: u64, r: Result<Vec<u8>, Errno>) {
        match r {
            Ok(payload) => send(&self.device, abi::message(unique, 0, &payload)),
            Err(errno) => send(&self.device, abi::message(unique, -errno, &[])),
        }
    }

    fn dispatch(&self, h: InHeader, payload: &[u8]) {
        if h.opcode == op::INIT {
            return self.init(h.unique, payload);
        }
        let device = self.device.clone();
        if let Some(r) = self.dispatch_for(h, payload, move || ReplyTo::Device(device)) {
            self.reply(h.unique, r);
        }
    }

    /// Counts a request that came through io_uring.
    pub(super) fn count_ring_request(&self) {
        self.conn
            .requests
            .ring
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands one request to the file system (counted and timed); returns the answer if
    /// there is one now. A READ answers through `later`'s target instead.
    pub(super) fn dispatch_for(
        &self,
        h: InHeader,
        payload: &[u8],
        later: impl FnOnce() -> ReplyTo,
    ) -> Option<Result<Vec<u8>, Errno>> {
        let started = std::time::Instant::now();
        let answer = self.handle(h, payload, later);
        let op = h.opcode as usize;
        let r = &self.conn.requests;
        if let (Some(n), Some(t), Some(b)) = (r.count.get(op), r.nanos.get(op), r.buckets.get(op)) {
            use std::sync::atomic::Ordering::Relaxed;
            let took = started.elapsed();
            let secs = took.as_secs_f64();
            let i = HANDLING_BOUNDS
                .iter()
                .position(|&le| secs <= le)
                .unwrap_or(HANDLING_BOUNDS.len());
            b[i].fetch_add(1, Relaxed);
            t.fetch_add(took.as_nanos() as u64, Relaxed);
            n.fetch_add(1, Relaxed);
        }
        answer
    }

    fn handle(
        &self,
        h: InHeader,
        payload: &[u8],
        later: impl FnOnce() -> ReplyTo,
    ) -> Option<Result<Vec<u8>, Errno>> {
        let req = Request {
            unique: h.unique,
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
        };
        let fs = &*self.fs;
        let bad = |e: abi::Malformed| {
            tracing::warn!(opcode = h.opcode, what = e.0, "malformed FUSE request");
            libc::EINVAL
        };
        let encode = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = Vec::with_capacity(128);
            f(&mut v);
            v
        };
        if matches!(h.opcode, op::LOOKUP | op::READDIR | op::READDIRPLUS)
            && let Some(wait) = match h.opcode {
                op::LOOKUP => abi::Cursor(payload)
                    .name("lookup")
                    .ok()
                    .and_then(|name| fs.not_yet(h.nodeid, Some(name), 0)),
                _ => abi::ReadIn::parse(payload)
                    .ok()
                    .and_then(|r| fs.not_yet(h.nodeid, None, r.offset)),
            }
        {
            let reply = ReplyData {
                unique: h.unique,
                to: later(),
                done: false,
            };
            let (fs, payload) = (self.fs.clone(), payload.to_vec());
            wait(Box::new(move || {
                match answer_listing(&*fs, &req, h, &payload) {
                    Ok(v) => reply.data(&v),
                    Err(errno) => reply.error(errno),
                }
            }));
            return None;
        }
        match h.opcode {
            // INIT comes only through /dev/fuse (see `dispatch`).
            op::INIT => Some(Err(libc::EIO)),
            op::DESTROY => Some(Ok(Vec::new())),
            op::FORGET => {
                if let Ok(n) = abi::parse_forget(payload) {
                    fs.forget(h.nodeid, n);
                }
                None
            }
            op::BATCH_FORGET => {
                if let Ok(list) = abi::parse_batch_forget(payload) {
                    for (ino, n) in list {
                        fs.forget(ino, n);
                    }
                }
                None
            }
            // We answer every request as soon as we can; an interrupt changes nothing.
            op::INTERRUPT => None,
            op::LOOKUP | op::READDIR | op::READDIRPLUS => {
                Some(answer_listing(fs, &req, h, payload))
            }
            op::GETATTR => {
                let r = abi::parse_getattr(payload)
                    .map_err(bad)
                    .and_then(|fh| fs.getattr(&req, h.nodeid, fh))
                    .map(|a| encode(&|v| a.encode(v)));
                Some(r)
            }
            op::OPEN => {
                let r = abi::parse_open(payload)
                    .map_err(bad)
                    .and_then(|flags| fs.open(&req, h.nodeid, flags))
                    .map(|o| encode(&|v| o.encode(v)));
                Some(r)
            }
            op::OPENDIR => {
                let r = abi::parse_open(payload)
                    .map_err(bad)
                    .and_then(|flags| fs.opendir(&req, h.nodeid, flags))
                    .map(|o| encode(&|v| o.encode(v)));
                Some(r)
            }
            op::READ => match abi::ReadIn::parse(payload) {
                Ok(r) => {
                    fs.read(
                        &req,
                        h.nodeid,
                        r.fh,
                        r.offset,
                        r.size,
                        ReplyData {
                            unique: h.unique,
                            to: later(),
                            done: false,
                        },
                    );
                    None
                }
                Err(e) => Some(Err(bad(e))),
            },
            op::RELEASE => {
                if let Ok(r) = abi::ReleaseIn::parse(payload) {
                    fs.release(&req, h.nodeid, r.fh, r.flags);
                }
                Some(Ok(Vec::new()))
            }
            op::RELEASEDIR => {
                if let Ok(r) = abi::ReleaseIn::parse(payload) {
                    fs.releasedir(&req, h.nodeid, r.fh);
                }
                Some(Ok(Vec::new()))
            }
            // Nothing is buffered on our side: a flush has nothing to do.
            op::FLUSH => Some(Ok(Vec::new())),
            op::STATFS => {
                let r = fs.statfs(&req, h.nodeid).map(|s| encode(&|v| s.encode(v)));
                Some(r)
            }
            op::ACCESS => {
                let r = abi::parse_access(payload)
                    .map_err(bad)
                    .and_then(|mask| fs.access(&req, h.nodeid, mask))
                    .map(|()| Vec::new());
                Some(r)
            }
            op::SETATTR => {
                let r = SetattrIn::parse(payload)
                    .map_err(bad)
                    .and_then(|a| fs.setattr(&req, h.nodeid, &a))
                    .map(|a| encode(&|v| a.encode(v)));
                Some(r)
            }
            op::MKNOD => {
                let r = abi::parse_mknod(payload)
                    .map_err(bad)
                    .and_then(|(mode, umask, name)| fs.mknod(&req, h.nodeid, name, mode, umask))
                    .map(|e| encode(&|v| e.encode(v)));
                Some(r)
            }
            op::MKDIR => {
                let r = abi::parse_mkdir(payload)
                    .map_err(bad)
                    .and_then(|(mode, umask, name)| fs.mkdir(&req, h.nodeid, name, mode, umask))
                    .map(|e| encode(&|v| e.encode(v)));
                Some(r)
            }
            op::UNLINK | op::RMDIR => {
                let r = abi::Cursor(payload)
                    .name("unlink")
                    .map_err(bad)
                    .and_then(|name| {
                        if h.opcode == op::UNLINK {
                            fs.unlink(&req, h.nodeid, name)
                        } else {
                            fs.rmdir(&req, h.nodeid, name)
                        }
                    })
                    .map(|()| Vec::new());
                Some(r)
            }
            op::RENAME | op::RENAME2 => {
                let r = RenameIn::parse(payload, h.opcode == op::RENAME2)
                    .map_err(bad)
                    .and_then(|rn| fs.rename(&req, h.nodeid, &rn))
                    .map(|()| Vec::new());
                Some(r)
            }
            op::LINK | op::SYMLINK => {
                let r = fs
                    .link(&req, h.opcode, h.nodeid)
                    .map(|e| encode(&|v| e.encode(v)));
                Some(r)
            }
            op::CREATE => {
                let r = CreateIn::parse(payload)
                    .map_err(bad)
                    .and_then(|c| fs.create(&req, h.nodeid, &c))
                    .map(|(e, o)| {
                        encode(&|v| {
                            e.encode(v);
                            o.encode(v)
                        })
                    });
                Some(r)
            }
            op::WRITE => {
                let r = WriteIn::parse(payload)
                    .map_err(bad)
                    .and_then(|w| fs.write(&req, h.nodeid, &w))
                    .map(abi::write_out);
                Some(r)
            }
            op::FSYNC | op::FSYNCDIR => {
                let r = abi::parse_fsync(payload)
                    .map_err(bad)
                    .and_then(|(fh, datasync)| {
                        if h.opcode == op::FSYNC {
                            fs.fsync(&req, h.nodeid, fh, datasync)
                        } else {
                            fs.fsyncdir(&req, h.nodeid, fh, datasync)
                        }
                    })
                    .map(|()| Vec::new());
                Some(r)
            }
            op::FALLOCATE => {
                let r = FallocateIn::parse(payload)
                    .map_err(bad)
                    .and_then(|f| fs.fallocate(&req, h.nodeid, &f))
                    .map(|()| Vec::new());
                Some(r)
            }
            op::SETXATTR | op::REMOVEXATTR | op::TMPFILE | op::SYNCFS => {
                let r = fs
                    .other_write(&req, h.opcode, h.nodeid)
                    .map(|()| Vec::new());
                Some(r)
            }
            // COPY_FILE_RANGE: ENOSYS makes the kernel copy through READ and WRITE.
            // xattrs, locks, ioctl, poll, lseek, readlink, bmap: not supported. ENOSYS
            // makes the kernel stop asking for most of them.
            _ => Some(Err(libc::ENOSYS)),
        }
    }

    fn init(&self, unique: u64, payload: &[u8]) {
        let offer = match abi::InitIn::parse(payload) {
            Ok(o) => o,
            Err(_) => return self.reply(unique, Err(libc::EINVAL)),
        };
        if offer.major > abi::KERNEL_MAJOR {
            // The kernel sends INIT again with our major version.
            let out = abi::InitOut {
                major: abi::KERNEL_MAJOR,
                minor: abi::KERNEL_MINOR,
                ..Default::default()
            };
            let mut v = Vec::new();
            out.encode(&mut v);
            return self.reply(unique, Ok(v));
        }
        if offer.major < abi::KERNEL_MAJOR || offer.minor < abi::MIN_MINOR {
            tracing::error!(
                major = offer.major,
                minor = offer.minor,
                "the kernel's FUSE protocol is too old (need 7.{} or later, Linux 5.7+)",
                abi::MIN_MINOR
            );
            return self.reply(unique, Err(libc::EPROTO));
        }
        let flags = offer.flags & self.config.want;
        if self.config.want & init::PASSTHROUGH != 0 && flags & init::PASSTHROUGH == 0 {
            tracing::info!(
                "kernel does not offer FUSE passthrough (needs Linux >= 6.9); warm reads go through Tidepool"
            );
        }
        let params = ConnParams {
            minor: offer.minor.min(abi::KERNEL_MINOR),
            flags,
            max_readahead: offer.max_readahead.min(self.config.max_readahead),
            max_write: self.config.max_write.max(4096),
        };
        let out = abi::InitOut {
            major: abi::KERNEL_MAJOR,
            minor: abi::KERNEL_MINOR,
            max_readahead: params.max_readahead,
            flags,
            max_background: 64,
            congestion_threshold: 48,
            max_write: params.max_write,
            time_gran: 1,
            // 1 MiB requests (256 pages of 4 KiB).
            max_pages: MAX_PAGES,
            max_stack_depth: if flags & init::PASSTHROUGH != 0 { 1 } else { 0 },
        };
        let _ = self.conn.params.set(params);
        self.fs.connected(&self.conn);
        let mut v = Vec::new();
        out.encode(&mut v);
        self.reply(unique, Ok(v));
        // The kernel has taken the answer (and switched io_uring on) when the write
        // returned: the queues may register now.
        if self.config.want & init::OVER_IO_URING != 0 {
            if flags & init::OVER_IO_URING != 0 {
                self.start_rings(params);
            } else {
                tracing::info!(
                    "the kernel does not offer FUSE over io_uring (Linux 6.14+ with the fuse module's enable_uring set); serving through /dev/fuse"
                );
            }
        }
    }

    /// Starts the io_uring queues (`uring.rs`), kept with the connection.
    fn start_rings(&self, params: ConnParams) {
        match super::uring::start(
            self,
            self.device.file.as_raw_fd(),
            params.max_write,
            MAX_PAGES as u32,
        ) {
            Ok(threads) => {
                tracing::info!(
                    queues = threads.len(),
                    "serving FUSE requests through io_uring, one queue per CPU"
                );
                self.conn.rings.lock().extend(threads);
            }
            Err(e) => {
                tracing::warn!(error = %e, "FUSE over io_uring could not start; serving through /dev/fuse")
            }
        }
    }
}
