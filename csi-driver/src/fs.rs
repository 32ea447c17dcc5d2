//! The read-only dataset file system: a [`FileSystem`](crate::fuse::FileSystem) over a
//! [`Dataset`]. It parses nothing itself (the session does), delegates to the snapshot
//! and the cache, and maps errors to one errno each; every method can be called without
//! a kernel.
//!
//! - Inode numbers: 1 is the root of the *current* snapshot; every other inode is
//!   `seq << 40 | local`, the snapshot's sequence number (23 bits) and the entry's
//!   number in it, both persistent. An inode keeps resolving in its own snapshot after
//!   a refresh, so open files and cached dentries keep the version they saw. Lookups
//!   and forgets are counted per snapshot, so a replaced snapshot is released once the
//!   kernel forgot it.
//! - File handles are derived from the inode (`ino`, with bit 63 set for a passthrough
//!   open), never from a counter in memory: a restarted server that takes over the
//!   connection understands the handles of files opened before it started.
//! - Caching: a pinned snapshot never changes, so entries and attributes are cached by
//!   the kernel for a day and file pages are kept across opens (`FOPEN_KEEP_CACHE`);
//!   with `--refresh <interval>`, for that interval.
//! - Reads: a range already resident and verified is served from the local file on the
//!   FUSE thread; otherwise the read moves to the tokio runtime (the FUSE thread is free
//!   at once) and replies when the blocks land. Sequential readers (per inode and
//!   process) grow a readahead window of whole blocks, up to `max_readahead`.
//! - Passthrough: a file that is fully resident and verified is opened with FUSE
//!   passthrough (Linux ≥ 6.9), so the kernel reads the local file directly and warm
//!   reads run at local-disk speed. The kernel wants one backing file per inode and
//!   refuses to mix passthrough and page-cache opens of one inode, hence the per-inode
//!   I/O state.
//! - Closes never wait on the server (`FOPEN_NOFLUSH`: nothing to flush on a read-only
//!   tree), so a pod closing a file, or a process exec'ing with one open, is not held
//!   up while the agent restarts.
//! - Errors: not found → ENOENT; any write → EROFS; a lake failure, a changed blob or
//!   a corrupt block → EIO (with a log line naming the blob).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::cache::CacheError;
use crate::cache::blob::CachedBlob;
use crate::cache::dataset::Dataset;
use crate::cache::snapshot::{self, Entry, Kind, Snapshot};
use crate::fuse::{
    self, AttrOut, Connection, DirBuf, EntryOut, Errno, FileKind, OpenOut, ReplyData, Request,
    Session, SessionConfig, StatfsOut, Timespec, Ttl, abi::fopen,
};
use crate::mounts::{detach_path, is_busy, unmount_path};

const SEQ_SHIFT: u32 = 40;
const LOCAL_MASK: u64 = (1 << SEQ_SHIFT) - 1;
/// Set in a file handle opened with passthrough.
const FH_PASSTHROUGH: u64 = 1 << 63;
/// Sequential-read trackers kept (one per inode and reading process).
const MAX_STREAMS: usize = 4096;

/// Counters a user (or a test) can read to see what the mount did.
#[derive(Debug)]
pub struct MountStats {
    /// `read` requests that reached Tidepool (passthrough reads never do).
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub opens: AtomicU64,
    pub passthrough_opens: AtomicU64,
    pub read_errors: AtomicU64,
    /// How long reads took, from the request to the answer: answered at once from
    /// blocks already in the pool (cache hits), and those that waited for a block to
    /// arrive (misses, or a prefetch in flight). Their counts are the hits and misses.
    pub resident_read_seconds: Histogram,
    pub waited_read_seconds: Histogram,
}

/// Buckets of the read-time histograms: 50 us to 13 s, by factors of 4.
fn read_buckets() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 4.0, 10))
}

impl Default for MountStats {
    fn default() -> Self {
        MountStats {
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            opens: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
            resident_read_seconds: read_buckets(),
            waited_read_seconds: read_buckets(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FsConfig {
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// Try FUSE passthrough for fully resident files.
    pub passthrough: bool,
    pub uid: u32,
    pub gid: u32,
}

/// How one inode's open handles do I/O (see the module docs).
#[derive(Debug)]
struct InodeIo {
    blob: Arc<CachedBlob>,
    cached: u32,
    passthrough: u32,
    backing: Option<u32>,
}

/// Where a sequential reader is.
#[derive(Clone, Copy, Debug)]
struct Stream {
    next: u64,
    window: u64,
    used: u64,
}

pub struct DatasetFs {
    ds: Arc<Dataset>,
    rt: tokio::runtime::Handle,
    cfg: FsConfig,
    io: Mutex<HashMap<u64, InodeIo>>,
    streams: Mutex<HashMap<(u64, u32), Stream>>,
    tick: AtomicU64,
    passthrough: AtomicBool,
    conn: OnceLock<Connection>,
    pub stats: Arc<MountStats>,
}

impl DatasetFs {
    pub fn new(
        ds: Arc<Dataset>,
        rt: tokio::runtime::Handle,
        cfg: FsConfig,
        stats: Arc<MountStats>,
    ) -> Self {
        DatasetFs {
            passthrough: AtomicBool::new(cfg.passthrough),
            ds,
            rt,
            cfg,
            io: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(0),
            conn: OnceLock::new(),
            stats,
        }
    }

    fn resolve(&self, ino: u64) -> Result<(u32, Arc<Snapshot>, u64), Errno> {
        if ino == 1 {
            let (seq, s) = self.ds.current();
            return Ok((seq, s, snapshot::ROOT));
        }
        let seq = (ino >> SEQ_SHIFT) as u32;
        let snap = self.ds.snapshot(seq).ok_or(libc::ESTALE)?;
        Ok((seq, snap, ino & LOCAL_MASK))
    }

    fn entry(&self, ino: u64) -> Result<(u32, Entry), Errno> {
        let (seq, snap, local) = self.resolve(ino)?;
        match snap.get(local) {
            Ok(Some(e)) => Ok((seq, e)),
            Ok(None) => Err(libc::ENOENT),
            Err(e) => {
                tracing::error!(error = %e, "snapshot read failed");
                Err(libc::EIO)
            }
        }
    }

    fn ino(seq: u32, local: u64) -> u64 {
        if local == snapshot::ROOT {
            // Every snapshot's root is the mount's root.
            return 1;
        }
        ((seq as u64) << SEQ_SHIFT) | local
    }

    fn attr(&self, seq: u32, e: &Entry) -> fuse::abi::Attr {
        let (kind, perm, nlink, size) = match e.kind {
            Kind::Dir => (FileKind::Dir, 0o555, 2, 0),
            Kind::File => (FileKind::File, 0o444, 1, e.size),
        };
        let t = Timespec::from_system(e.mtime);
        fuse::abi::Attr {
            ino: Self::ino(seq, e.ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            kind,
            perm,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            blksize: 128 * 1024,
        }
    }

    fn entry_out(&self, seq: u32, e: &Entry) -> EntryOut {
        let ttl = Ttl::from(self.cfg.ttl);
        let attr = self.attr(seq, e);
        EntryOut {
            nodeid: attr.ino,
            attr,
            generation: 0,
            entry_ttl: ttl,
            attr_ttl: ttl,
        }
    }

    /// The open blob of `ino`, from the I/O table or opened anew (a handle the kernel
    /// holds from before a restart).
    fn blob_of(&self, ino: u64) -> Result<Arc<CachedBlob>, Errno> {
        if let Some(s) = self.io.lock().get(&ino) {
            return Ok(s.blob.clone());
        }
        let (_, e) = self.entry(ino)?;
        self.ds.blob(&e).map_err(|err| {
            tracing::error!(blob = %e.blob, error = %err, "open failed");
            errno_for(&err)
        })
    }

    /// Sequential detection for a read of `ino` by `pid`: the readahead range to start,
    /// if the read continues where this reader's last one ended.
    fn readahead(&self, ino: u64, pid: u32, offset: u64, size: u64) -> Option<(u64, u64)> {
        let cfg = self.ds.pool().config();
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut streams = self.streams.lock();
        if streams.len() >= MAX_STREAMS && !streams.contains_key(&(ino, pid)) {
            // Forget the least recently used reader.
            if let Some(k) = streams.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k) {
                streams.remove(&k);
            }
        }
        let s = streams.entry((ino, pid)).or_insert(Stream {
            next: u64::MAX,
            window: 2 * cfg.block_size,
            used: tick,
        });
        let sequential = offset == s.next
            || (s.next != u64::MAX
                && offset > s.next.saturating_sub(cfg.block_size)
                && offset <= s.next + cfg.block_size);
        s.window = if sequential {
            (s.window * 2).min(cfg.max_readahead.max(cfg.block_size))
        } else {
            2 * cfg.block_size
        };
        s.next = offset + size;
        s.used = tick;
        sequential.then(|| (offset, offset + size + s.window))
    }
}

/// Every cache failure a reader can meet (lake error, changed blob, corrupt block, local
/// I/O) is EIO; the log line names the blob and the cause.
fn errno_for(_: &CacheError) -> Errno {
    libc::EIO
}

impl fuse::FileSystem for DatasetFs {
    fn connected(&self, conn: &Connection) {
        let _ = self.conn.set(conn.clone());
        if !conn.passthrough() {
            self.passthrough.store(false, Ordering::Relaxed);
        }
    }

    fn not_yet(&self, ino: u64, name: Option<&OsStr>, offset: u64) -> Option<fuse::Wait> {
        let (_, snap, local) = self.resolve(ino).ok()?;
        if snap.complete() {
            return None;
        }
        let bound = match name {
            Some(name) => match snap.lookup_now(local, name.to_str()?) {
                Ok(snapshot::Lookup::Wait(bound)) => bound,
                _ => return None,
            },
            // "." and ".." come first, from the entry itself.
            None if offset < 2 => return None,
            None => snap.children_wait(local, offset - 2).ok()??,
        };
        let rt = self.rt.clone();
        let listing = snap.watch();
        Some(Box::new(move |resume: fuse::Resume| {
            rt.spawn(async move {
                match listing.wait_past(&bound).await {
                    // The answer reads the snapshot: off the runtime's threads.
                    Ok(()) => drop(tokio::task::spawn_blocking(resume)),
                    Err(e) => {
                        tracing::warn!(error = %e, "a request waited for the listing, which failed; answering EIO");
                        drop(resume);
                    }
                }
            });
        }))
    }

    fn lookup(&self, _req: &Request, parent: u64, name: &OsStr) -> Result<EntryOut, Errno> {
        let name = name.to_str().ok_or(libc::ENOENT)?;
        let (seq, snap, local) = self.resolve(parent)?;
        match snap.lookup_now(local, name) {
            Ok(snapshot::Lookup::Found(e)) => {
                self.ds.hold(seq, 1);
                Ok(self.entry_out(seq, &e))
            }
            Ok(snapshot::Lookup::Missing) => Err(libc::ENOENT),
            Ok(snapshot::Lookup::Wait(_)) => {
                // `not_yet` waited for this: only a listing that failed since gets here.
                tracing::warn!(name, "a lookup the listing has not reached; answering EIO");
                Err(libc::EIO)
            }
            Err(err) => {
                tracing::error!(error = %err, "lookup failed");
                Err(libc::EIO)
            }
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if ino != 1 {
            self.ds.forget((ino >> SEQ_SHIFT) as u32, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: u64, _fh: Option<u64>) -> Result<AttrOut, Errno> {
        let (seq, e) = self.entry(ino)?;
        Ok(AttrOut {
            attr: self.attr(seq, &e),
            ttl: Ttl::from(self.cfg.ttl),
        })
    }

    fn opendir(&self, _req: &Request, ino: u64, _flags: u32) -> Result<OpenOut, Errno> {
        match self.entry(ino)? {
            (_, e) if e.kind == Kind::Dir => Ok(OpenOut {
                fh: 0,
                flags: fopen::KEEP_CACHE | fopen::CACHE_DIR,
                backing_id: 0,
            }),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: u64,
        _fh: u64,
        offset: u64,
        out: &mut DirBuf,
    ) -> Result<(), Errno> {
        let (seq, snap, local) = self.resolve(ino)?;
        let me = snap
            .get(local)
            .map_err(|_| libc::EIO)?
            .ok_or(libc::ENOENT)?;
        let plus = out.is_plus();
        // Cookies: 1 after ".", 2 after "..", then position + 3.
        let mut off = offset;
        if off == 0 {
            let e = plus.then(|| self.entry_out(seq, &me));
            if !out.add(ino, 1, FileKind::Dir, OsStr::new("."), e.as_ref()) {
                return Ok(());
            }
            off = 1;
        }
        if off == 1 {
            let parent = snap
                .get(me.parent)
                .ok()
                .flatten()
                .unwrap_or_else(|| me.clone());
            let e = plus.then(|| self.entry_out(seq, &parent));
            if !out.add(
                Self::ino(seq, parent.ino),
                2,
                FileKind::Dir,
                OsStr::new(".."),
                e.as_ref(),
            ) {
                return Ok(());
            }
            off = 2;
        }
        let children = snap.children(local, off - 2, 512).map_err(|err| {
            tracing::error!(error = %err, "readdir failed");
            libc::EIO
        })?;
        let mut added = 0;
        for (pos, e) in children {
            let kind = if e.kind == Kind::Dir {
                FileKind::Dir
            } else {
                FileKind::File
            };
            let entry = plus.then(|| self.entry_out(seq, &e));
            if !out.add(
                Self::ino(seq, e.ino),
                pos + 3,
                kind,
                OsStr::new(&e.name),
                entry.as_ref(),
            ) {
                break;
            }
            added += 1;
        }
        if plus {
            // Every entry but "." and ".." is a reference the kernel will forget.
            self.ds.hold(seq, added);
        }
        Ok(())
    }

    fn open(&self, _req: &Request, ino: u64, flags: u32) -> Result<OpenOut, Errno> {
        let flags = flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
        {
            return Err(libc::EROFS);
        }
        let (seq, e) = self.entry(ino)?;
        if e.kind == Kind::Dir {
            return Err(libc::EISDIR);
        }
        let blob = self.ds.blob(&e).map_err(|err| {
            tracing::error!(blob = %e.blob, error = %err, "open failed");
            errno_for(&err)
        })?;
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let cfg = self.ds.pool().config();
        if e.size <= cfg.small_file_threshold {
            let _guard = self.rt.enter();
            let cold = !blob.residency().is_complete();
            if cold {
                // Small files are fetched whole at open: the first read will need them all.
                blob.prefetch(0..blob.residency().blocks());
            }
            if let Some(snap) = self.ds.snapshot(seq) {
                self.ds.small_file_opened(seq, &snap, &e, cold);
            }
        }
        let mut io = self.io.lock();
        let state = io.entry(ino).or_insert_with(|| InodeIo {
            blob: blob.clone(),
            cached: 0,
            passthrough: 0,
            backing: None,
        });
        // A passthrough open pins the file (none of it is shed while the kernel reads
        // it directly); a second handle joins the first one's pin.
        let want_passthrough = if state.passthrough > 0 {
            state.blob.pin_passthrough();
            true
        } else if state.cached == 0 && self.passthrough.load(Ordering::Relaxed) && e.size > 0 {
            // Never reads the file under this lock (a check after a reboot runs in the
            // background instead).
            let _guard = self.rt.enter();
            state.blob = blob;
            state.blob.begin_passthrough()
        } else {
            false
        };
        if want_passthrough
            && state.backing.is_none()
            && let Some(conn) = self.conn.get()
        {
            match conn.open_backing(state.blob.data_file()) {
                Ok(id) => state.backing = Some(id),
                Err(err) => {
                    state.blob.end_passthrough();
                    if self.passthrough.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %err, "FUSE passthrough refused by the kernel; using ordinary reads from now on");
                    }
                }
            }
        }
        match state.backing {
            Some(id) if want_passthrough => {
                state.passthrough += 1;
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                // No FOPEN_KEEP_CACHE here: the kernel fails a passthrough open that
                // asks for it (the backing file's own page cache serves).
                Ok(OpenOut {
                    fh: ino | FH_PASSTHROUGH,
                    flags: fopen::PASSTHROUGH | fopen::NOFLUSH,
                    backing_id: id,
                })
            }
            _ => {
                state.cached += 1;
                Ok(OpenOut {
                    fh: ino,
                    flags: fopen::KEEP_CACHE | fopen::NOFLUSH,
                    backing_id: 0,
                })
            }
        }
    }

    fn read(&self, req: &Request, ino: u64, _fh: u64, offset: u64, size: u32, reply: ReplyData) {
        let asked = Instant::now();
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let blob = match self.blob_of(ino) {
            Ok(b) => b,
            Err(e) => return reply.error(e),
        };
        if let Some((from, to)) = self.readahead(ino, req.pid, offset, size as u64) {
            let _guard = self.rt.enter();
            blob.prefetch(blob.blocks_for(from..to));
        }
        let blocks = blob.blocks_for(offset..offset + size as u64);
        let stats = self.stats.clone();
        if blob.is_ready(blocks) {
            match blob.read_resident(offset, size as usize) {
                Ok(buf) => {
                    stats
                        .bytes_read
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    reply.data(&buf);
                    stats
                        .resident_read_seconds
                        .observe(asked.elapsed().as_secs_f64());
                    return;
                }
                Err(CacheError::Refetch) => {}
                Err(e) => {
                    stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(blob = %blob.blob, error = %e, "read failed");
                    return reply.error(errno_for(&e));
                }
            }
        }
        self.rt.spawn(async move {
            match blob.read(offset, size as usize).await {
                Ok(buf) => {
                    stats.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    reply.data(&buf);
                    stats
                        .waited_read_seconds
                        .observe(asked.elapsed().as_secs_f64());
                }
                Err(e) => {
                    stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(blob = %blob.blob, offset, error = %e, "read failed; returning EIO");
                    reply.error(errno_for(&e))
                }
            }
        });
    }

    fn release(&self, req: &Request, ino: u64, fh: u64, _flags: u32) {
        self.streams.lock().remove(&(ino, req.pid));
        let mut io = self.io.lock();
        let Some(state) = io.get_mut(&ino) else {
            return;
        };
        if fh & FH_PASSTHROUGH != 0 {
            if state.passthrough > 0 {
                state.passthrough -= 1;
                state.blob.end_passthrough();
            }
        } else {
            state.cached = state.cached.saturating_sub(1);
        }
        if state.passthrough == 0
            && state.cached == 0
            && let Some(s) = io.remove(&ino)
            && let (Some(id), Some(conn)) = (s.backing, self.conn.get())
            && let Err(e) = conn.close_backing(id)
        {
            tracing::debug!(error = %e, "closing a passthrough backing id failed");
        }
    }

    fn statfs(&self, _req: &Request, _ino: u64) -> Result<StatfsOut, Errno> {
        let pool = self.ds.pool();
        let bsize = 4096u64;
        let cap = pool.config().capacity / bsize;
        let free = pool.config().capacity.saturating_sub(pool.used()) / bsize;
        Ok(StatfsOut {
            blocks: cap,
            bfree: free,
            bavail: free,
            files: self.ds.current().1.summary().objects,
            ffree: 0,
            bsize: bsize as u32,
            namelen: 1024,
            frsize: bsize as u32,
        })
    }

    fn access(&self, _req: &Request, _ino: u64, mask: u32) -> Result<(), Errno> {
        if mask as i32 & libc::W_OK != 0 {
            return Err(libc::EROFS);
        }
        Ok(())
    }
}

/// Mount settings of a dataset.
#[derive(Clone, Debug)]
pub struct MountConfig {
    pub options: fuse::MountOptions,
    pub threads: usize,
    /// Serve through io_uring where the kernel offers it (`fuse/uring.rs`). Off for
    /// mounts a restarted process takes over (the node agent's).
    pub io_uring: bool,
}

/// Mount options for a dataset (`source` is shown in the mount table).
pub fn mount_config(allow_other: bool, n_threads: usize, source: &str) -> MountConfig {
    MountConfig {
        options: fuse::MountOptions {
            fsname: source.to_owned(),
            subtype: "tidepool".into(),
            read_only: true,
            allow_other,
            default_permissions: true,
        },
        threads: n_threads.max(1),
        io_uring: false,
    }
}

/// A mounted dataset; unmounts on drop.
pub struct Mount {
    pub stats: Arc<MountStats>,
    pub mountpoint: std::path::PathBuf,
    unmounter: UnmountHandle,
    session: Option<Session>,
}

impl Mount {
    /// Mounts `fs` at `mountpoint` and serves it on background threads.
    pub fn spawn(fs: DatasetFs, mountpoint: &Path, config: &MountConfig) -> std::io::Result<Mount> {
        let stats = fs.stats.clone();
        let passthrough = fs.cfg.passthrough;
        let session =
            SessionConfig::read_only(config.threads, passthrough).with_io_uring(config.io_uring);
        Self::serve(Arc::new(fs), stats, mountpoint, &config.options, session)
    }

    /// Mounts any file system (the checkpoint volume uses this) and serves it.
    pub fn serve(
        fs: Arc<dyn fuse::FileSystem>,
        stats: Arc<MountStats>,
        mountpoint: &Path,
        options: &fuse::MountOptions,
        session: SessionConfig,
    ) -> std::io::Result<Mount> {
        let mountpoint = mountpoint.canonicalize()?;
        let fd = fuse::mount(&mountpoint, options)?;
        let session = Session::start(fuse::Device::new(fd), fs, session)?;
        // From the mount table (no request to the new mount, which may not answer):
        // the connection can then end itself if it must (an io_uring queue that failed).
        match crate::mounts::device_of(&mountpoint) {
            Ok(Some((major, minor))) => session.connection().set_device(major, minor),
            other => tracing::debug!(
                ?other,
                "the new mount's device number is not in the mount table"
            ),
        }
        if session.wait_initialized(Duration::from_secs(10)).is_none() {
            tracing::warn!("the kernel has not initialised the FUSE connection after 10 s");
        }
        if let Err(e) = set_kernel_readahead(&mountpoint, KERNEL_READAHEAD_KB) {
            tracing::debug!(error = %e, "cannot raise the mount's kernel readahead (needs root); reads arrive in 128 KiB requests");
        }
        let unmounter = UnmountHandle {
            mountpoint: mountpoint.clone(),
            detached: Arc::default(),
        };
        Ok(Mount {
            stats,
            mountpoint,
            unmounter,
            session: Some(session),
        })
    }

    /// Something that can unmount from another thread (signal handlers).
    pub fn unmount_handle(&self) -> UnmountHandle {
        self.unmounter.clone()
    }

    /// The mount's FUSE connection (its counts, and what the file system may do on it).
    pub fn connection(&self) -> &fuse::Connection {
        self.session
            .as_ref()
            .expect("a live mount has a session")
            .connection()
    }

    /// What a refresh loop uses to let the kernel drop a replaced snapshot.
    pub fn snapshot_releaser(&self) -> SnapshotReleaser {
        SnapshotReleaser(self.connection().clone())
    }

    /// Blocks until the file system is unmounted (by `umount` or [`Mount::unmount`]), or
    /// its connection was ended ([`fuse::Connection::abort`]: then it unmounts and says
    /// why).
    pub fn join(mut self) -> std::io::Result<()> {
        if let Some(s) = self.session.take() {
            let conn = s.connection().clone();
            s.join();
            tracing::info!(
                requests = ?conn.request_counts(),
                through_io_uring = conn.io_uring_requests(),
                "the mount served these requests"
            );
            if let Some(why) = conn.aborted() {
                // The connection is over but still mounted: nothing is left behind (a
                // busy mount is detached; its open files fail as the connection did).
                if self.unmounter.unmount().is_err() {
                    let _ = self.unmounter.detach();
                }
                return Err(std::io::Error::other(format!(
                    "{why}: the connection was ended so that no reader waits forever; mount again (--no-io-uring serves through /dev/fuse)"
                )));
            }
        }
        Ok(())
    }

    pub fn unmount(mut self) -> std::io::Result<()> {
        let r = self.unmounter.unmount();
        if r.is_ok()
            && let Some(s) = self.session.take()
        {
            s.join();
        }
        r
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // Joining waits for the session to end, which a detached mount does only
            // when its last open file is closed: join only after a clean unmount, and
            // otherwise detach and leave the session threads to serve what is open.
            let unmounted = match self.unmounter.unmount() {
                Ok(()) => !self.unmounter.was_detached(),
                Err(e) => {
                    if !is_busy(&e) {
                        tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "cannot unmount; detaching instead");
                    }
                    if let Err(e) = self.unmounter.detach() {
                        tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "cannot detach the mount");
                    }
                    false
                }
            };
            if unmounted {
                s.join();
            }
        }
    }
}

/// Asks the kernel to drop what it caches of a snapshot that a refresh replaced.
///
/// The kernel keeps dentries and inodes it looked up until memory pressure evicts them,
/// which on a node with a lot of RAM can be days; each holds a reference that keeps
/// the replaced snapshot open (see `Dataset::forget`). Invalidating the root's entries
/// of the old snapshot makes the kernel drop every unused dentry beneath them, and FUSE
/// inodes go with their last dentry, each with a FORGET. What a process still holds
/// (an open file, a working directory) stays until it lets go. New lookups see the
/// current snapshot.
#[derive(Clone)]
pub struct SnapshotReleaser(Connection);

impl SnapshotReleaser {
    /// The releaser of a session's connection.
    pub fn new(conn: Connection) -> Self {
        SnapshotReleaser(conn)
    }

    /// Invalidates the root's entries of `old`; returns how many were sent.
    pub fn forget_snapshot(&self, old: &Snapshot) -> usize {
        let mut sent = 0;
        let mut from = 0;
        loop {
            let children = match old.children(snapshot::ROOT, from, 512) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a replaced snapshot failed; the kernel keeps its entries until it evicts them");
                    return sent;
                }
            };
            let Some((last, _)) = children.last() else {
                return sent;
            };
            from = last + 1;
            for (_, e) in &children {
                match self.0.inval_entry(1, OsStr::new(&e.name)) {
                    Ok(()) => sent += 1,
                    Err(err) => tracing::debug!(error = %err, "invalidating an entry failed"),
                }
            }
        }
    }
}

/// Unmounts a [`Mount`] from any thread; unmounting twice is a no-op.
#[derive(Clone)]
pub struct UnmountHandle {
    mountpoint: std::path::PathBuf,
    detached: Arc<AtomicBool>,
}

impl UnmountHandle {
    /// Unmounts; fails as [`is_busy`] while anything in it is open.
    pub fn unmount(&self) -> std::io::Result<()> {
        unmount_path(&self.mountpoint)
    }

    /// Lazy unmount: the mount leaves the mount table now, open files keep working,
    /// and the session ends when the last of them is closed.
    pub fn detach(&self) -> std::io::Result<()> {
        detach_path(&self.mountpoint)?;
        self.detached.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`UnmountHandle::detach`] was used: the session may outlive the mount.
    pub fn was_detached(&self) -> bool {
        self.detached.load(Ordering::Relaxed)
    }
}

/// Kernel readahead of a mount, in KiB: the largest FUSE request (1 MiB), so a
/// sequential reader costs one request per MiB instead of eight.
const KERNEL_READAHEAD_KB: u64 = 1024;

/// Sets the readahead of the mount's backing device info. The kernel offers FUSE file
/// systems 128 KiB at INIT and refuses more there; the sysfs knob (root only) is the
/// way to raise it, and it applies to files opened afterwards.
pub fn set_kernel_readahead(mountpoint: &Path, kb: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(path, kb.to_string())
}
