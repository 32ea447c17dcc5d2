//! The read-only dataset file system: a thin `fuser::Filesystem` adapter over a
//! [`Dataset`]. It parses requests, delegates to the snapshot and the cache, and maps
//! errors to one errno each; it holds no file-system logic of its own.
//!
//! - Inode numbers: 1 is the root of the *current* snapshot; every other inode is
//!   `seq << 40 | local`, the snapshot's sequence number and the entry's number in it,
//!   both persistent. An inode keeps resolving in its own snapshot after a refresh, so
//!   open files and cached dentries keep the version they saw. Lookups and forgets are
//!   counted per snapshot, so a replaced snapshot is released once the kernel forgot it.
//! - Caching: a pinned snapshot never changes, so entries and attributes are cached by
//!   the kernel for a day and file pages are kept across opens (`FOPEN_KEEP_CACHE`);
//!   with `--refresh <interval>`, for that interval.
//! - Reads: a range already resident and verified is served from the local file on the
//!   FUSE thread; otherwise the read moves to the tokio runtime (the FUSE thread is free
//!   at once) and replies when the blocks land. Sequential readers grow a readahead
//!   window of whole blocks, up to `max_readahead`.
//! - Kernel readahead is raised to 1 MiB per mount (root only), so sequential reads
//!   arrive as 1 MiB requests rather than 128 KiB ones.
//! - Passthrough: a file that is fully resident and verified is opened with FUSE
//!   passthrough (Linux ≥ 6.9), so the kernel reads the local file directly and warm
//!   reads run at local-disk speed. Where the kernel or privileges do not allow it, the
//!   first failure is logged once and every later open uses ordinary reads.
//! - Errors: not found → ENOENT; any write → EROFS; a lake failure, a changed blob or
//!   a corrupt block → EIO (with a log line naming the blob).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use parking_lot::Mutex;

use crate::cache::CacheError;
use crate::cache::blob::CachedBlob;
use crate::cache::dataset::Dataset;
use crate::cache::snapshot::{self, Entry, Kind, Snapshot};
use crate::mounts::{detach_path, is_busy, unmount_path};

const SEQ_SHIFT: u32 = 40;
const LOCAL_MASK: u64 = (1 << SEQ_SHIFT) - 1;

/// Counters a user (or a test) can read to see what the mount did.
#[derive(Debug, Default)]
pub struct MountStats {
    /// `read` requests that reached Tidepool (passthrough reads never do).
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub opens: AtomicU64,
    pub passthrough_opens: AtomicU64,
    pub read_errors: AtomicU64,
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

struct OpenFile {
    ino: u64,
    blob: Arc<CachedBlob>,
    passthrough: bool,
    /// Sequential read detection: where the next read would start, and the window.
    next: u64,
    window: u64,
}

#[derive(Default)]
struct InodeIo {
    cached: u32,
    passthrough: u32,
    /// Kept while passthrough handles are open; dropping it closes the backing reference.
    backing: Option<BackingId>,
}

pub struct DatasetFs {
    ds: Arc<Dataset>,
    rt: tokio::runtime::Handle,
    cfg: FsConfig,
    handles: Mutex<HashMap<u64, OpenFile>>,
    /// Per inode: how its open handles do I/O. The kernel refuses to mix page-cache and
    /// passthrough handles of one inode, and wants one backing id per inode.
    io: Mutex<HashMap<u64, InodeIo>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
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
            handles: Mutex::new(HashMap::new()),
            io: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stats,
        }
    }

    fn resolve(&self, ino: INodeNo) -> Result<(u32, Arc<Snapshot>, u64), Errno> {
        let ino = ino.0;
        if ino == 1 {
            let (seq, s) = self.ds.current();
            return Ok((seq, s, snapshot::ROOT));
        }
        let seq = (ino >> SEQ_SHIFT) as u32;
        let snap = self.ds.snapshot(seq).ok_or(Errno::ESTALE)?;
        Ok((seq, snap, ino & LOCAL_MASK))
    }

    fn entry(&self, ino: INodeNo) -> Result<(u32, Entry), Errno> {
        let (seq, snap, local) = self.resolve(ino)?;
        match snap.get(local) {
            Ok(Some(e)) => Ok((seq, e)),
            Ok(None) => Err(Errno::ENOENT),
            Err(e) => {
                tracing::error!(error = %e, "snapshot read failed");
                Err(Errno::EIO)
            }
        }
    }

    fn ino(seq: u32, local: u64) -> INodeNo {
        if local == snapshot::ROOT {
            // Every snapshot's root is the mount's root.
            return INodeNo(1);
        }
        INodeNo(((seq as u64) << SEQ_SHIFT) | local)
    }

    fn attr(&self, seq: u32, e: &Entry) -> FileAttr {
        let (kind, perm, nlink, size) = match e.kind {
            Kind::Dir => (FileType::Directory, 0o555, 2, 0),
            Kind::File => (FileType::RegularFile, 0o444, 1, e.size),
        };
        FileAttr {
            ino: Self::ino(seq, e.ino),
            size,
            blocks: size.div_ceil(512),
            atime: e.mtime,
            mtime: e.mtime,
            ctime: e.mtime,
            crtime: e.mtime,
            kind,
            perm,
            nlink,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            rdev: 0,
            blksize: 128 * 1024,
            flags: 0,
        }
    }

    fn generation() -> Generation {
        Generation(0)
    }
}

/// Every cache failure a reader can meet (lake error, changed blob, corrupt block, local
/// I/O) is EIO; the log line names the blob and the cause.
fn errno_for(_: &CacheError) -> Errno {
    Errno::EIO
}

impl Filesystem for DatasetFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_PARALLEL_DIROPS,
        );
        let _ = config.set_max_readahead(1 << 20);
        if self.passthrough.load(Ordering::Relaxed) {
            let ok = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!(
                    "kernel does not offer FUSE passthrough (needs Linux >= 6.9); warm reads go through Tidepool"
                );
                self.passthrough.store(false, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let (seq, snap, local) = match self.resolve(parent) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match snap.lookup(local, name) {
            Ok(Some(e)) => {
                self.ds.hold(seq, 1);
                reply.entry(&self.cfg.ttl, &self.attr(seq, &e), Self::generation())
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(err) => {
                tracing::error!(error = %err, "lookup failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 != 1 {
            self.ds.forget((ino.0 >> SEQ_SHIFT) as u32, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry(ino) {
            Ok((seq, e)) => reply.attr(&self.cfg.ttl, &self.attr(seq, &e)),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Ok((_, e)) if e.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (seq, snap, local) = match self.resolve(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        // Cookies: 1 after ".", 2 after "..", then position + 3.
        let mut off = offset;
        if off == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            off = 1;
        }
        if off == 1 {
            let parent = snap
                .get(local)
                .ok()
                .flatten()
                .map(|e| Self::ino(seq, e.parent))
                .unwrap_or(INodeNo(1));
            if reply.add(parent, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            off = 2;
        }
        match snap.children(local, off - 2, 512) {
            Ok(children) => {
                for (pos, e) in children {
                    let kind = if e.kind == Kind::Dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    if reply.add(Self::ino(seq, e.ino), pos + 3, kind, &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(err) => {
                tracing::error!(error = %err, "readdir failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (seq, snap, local) = match self.resolve(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let Ok(Some(me)) = snap.get(local) else {
            return reply.error(Errno::ENOENT);
        };
        let mut off = offset;
        if off == 0 {
            if reply.add(
                ino,
                1,
                ".",
                &self.cfg.ttl,
                &self.attr(seq, &me),
                Self::generation(),
            ) {
                return reply.ok();
            }
            off = 1;
        }
        if off == 1 {
            let parent = snap
                .get(me.parent)
                .ok()
                .flatten()
                .unwrap_or_else(|| me.clone());
            if reply.add(
                Self::ino(seq, parent.ino),
                2,
                "..",
                &self.cfg.ttl,
                &self.attr(seq, &parent),
                Self::generation(),
            ) {
                return reply.ok();
            }
            off = 2;
        }
        match snap.children(local, off - 2, 512) {
            Ok(children) => {
                let mut added = 0;
                for (pos, e) in children {
                    if reply.add(
                        Self::ino(seq, e.ino),
                        pos + 3,
                        &e.name,
                        &self.cfg.ttl,
                        &self.attr(seq, &e),
                        Self::generation(),
                    ) {
                        break;
                    }
                    added += 1;
                }
                // Every entry but "." and ".." is a reference the kernel will forget.
                self.ds.hold(seq, added);
                reply.ok()
            }
            Err(err) => {
                tracing::error!(error = %err, "readdirplus failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY
            || flags.0 & (libc::O_TRUNC | libc::O_CREAT) != 0
        {
            return reply.error(Errno::EROFS);
        }
        let (seq, e) = match self.entry(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        if e.kind == Kind::Dir {
            return reply.error(Errno::EISDIR);
        }
        let blob = match self.ds.blob(&e) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(blob = %e.blob, error = %err, "open failed");
                return reply.error(errno_for(&err));
            }
        };
        self.stats.opens.fetch_add(1, Ordering::Relaxed);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
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
        let window = 2 * cfg.block_size;
        let flags = FopenFlags::FOPEN_KEEP_CACHE;
        let mut io = self.io.lock();
        let state = io.entry(ino.0).or_default();
        // A passthrough open pins the file (none of it is shed while the kernel reads
        // it directly); a second handle joins the first one's pin.
        let want_passthrough = if state.passthrough > 0 {
            blob.pin_passthrough();
            true
        } else if state.cached == 0 && self.passthrough.load(Ordering::Relaxed) && e.size > 0 {
            // Never reads the file under this mount-wide lock (a check after a reboot
            // runs in the background instead).
            let _guard = self.rt.enter();
            blob.begin_passthrough()
        } else {
            false
        };
        if want_passthrough && state.backing.is_none() {
            match reply.open_backing(blob.data_file()) {
                Ok(id) => state.backing = Some(id),
                Err(err) => {
                    blob.end_passthrough();
                    if self.passthrough.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %err, "FUSE passthrough refused by the kernel; using ordinary reads from now on");
                    }
                }
            }
        }
        let passthrough = want_passthrough && state.backing.is_some();
        // The handle must exist before the kernel learns its number.
        self.handles.lock().insert(
            fh,
            OpenFile {
                ino: ino.0,
                blob,
                passthrough,
                next: 0,
                window,
            },
        );
        match &state.backing {
            Some(id) if want_passthrough => {
                state.passthrough += 1;
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                // No FOPEN_KEEP_CACHE here: the kernel fails a passthrough open that
                // asks for it with EIO (the backing file's own page cache serves).
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
            }
            _ => {
                state.cached += 1;
                reply.opened(FileHandle(fh), flags);
            }
        }
        drop(io);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let cfg = self.ds.pool().config();
        let (blob, ahead) = {
            let mut h = self.handles.lock();
            let Some(f) = h.get_mut(&fh.0) else {
                return reply.error(Errno::EBADF);
            };
            let sequential = offset == f.next
                || (offset > f.next.saturating_sub(cfg.block_size)
                    && offset <= f.next + cfg.block_size);
            f.window = if sequential {
                (f.window * 2).min(cfg.max_readahead.max(cfg.block_size))
            } else {
                2 * cfg.block_size
            };
            f.next = offset + size as u64;
            let ahead =
                sequential.then(|| f.blob.blocks_for(offset..offset + size as u64 + f.window));
            (f.blob.clone(), ahead)
        };
        if let Some(ahead) = ahead {
            let _guard = self.rt.enter();
            blob.prefetch(ahead);
        }
        let blocks = blob.blocks_for(offset..offset + size as u64);
        let ready = blob.is_ready(blocks);
        let stats = self.stats.clone();
        if ready {
            match blob.read_resident(offset, size as usize) {
                Ok(buf) => {
                    stats
                        .bytes_read
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    return reply.data(&buf);
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
                    reply.data(&buf)
                }
                Err(e) => {
                    stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(blob = %blob.blob, offset, error = %e, "read failed; returning EIO");
                    reply.error(errno_for(&e))
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Take the handle out first: `open` locks `io` then `handles`, so holding
        // `handles` while locking `io` here would deadlock against it.
        let removed = self.handles.lock().remove(&fh.0);
        if let Some(f) = removed {
            let mut io = self.io.lock();
            if let Some(state) = io.get_mut(&f.ino) {
                if f.passthrough {
                    f.blob.end_passthrough();
                    state.passthrough -= 1;
                } else {
                    state.cached -= 1;
                }
                if state.passthrough == 0 && state.cached == 0 {
                    io.remove(&f.ino);
                }
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let pool = self.ds.pool();
        let bsize = 4096u64;
        let cap = pool.config().capacity / bsize;
        let free = pool.config().capacity.saturating_sub(pool.used()) / bsize;
        let files = self.ds.current().1.summary().objects;
        reply.statfs(cap, free, free, files, 0, bsize as u32, 1024, bsize as u32)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok()
    }
}

/// Mount options for a dataset.
pub fn mount_config(allow_other: bool, n_threads: usize, source: &str) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::FSName(source.to_owned()),
        fuser::MountOption::Subtype("tidepool".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    c.acl = if allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    c.n_threads = Some(n_threads.max(1));
    c.clone_fd = true;
    c
}

/// A mounted dataset; unmounts on drop.
pub struct Mount {
    pub stats: Arc<MountStats>,
    pub mountpoint: std::path::PathBuf,
    unmounter: UnmountHandle,
    notifier: SnapshotReleaser,
    session: Option<fuser::BackgroundSession>,
}

impl Mount {
    /// Mounts `fs` at `mountpoint` and serves it on background threads.
    pub fn spawn(
        fs: DatasetFs,
        mountpoint: &Path,
        config: &fuser::Config,
    ) -> std::io::Result<Mount> {
        let stats = fs.stats.clone();
        let mut session = fuser::Session::new(fs, mountpoint, config)?;
        let unmounter = session.unmount_callable();
        let notifier = SnapshotReleaser(session.notifier());
        let session = session.spawn()?;
        let mountpoint = mountpoint.canonicalize()?;
        if let Err(e) = set_kernel_readahead(&mountpoint, KERNEL_READAHEAD_KB) {
            tracing::debug!(error = %e, "cannot raise the mount's kernel readahead (needs root); reads arrive in 128 KiB requests");
        }
        let unmounter = UnmountHandle {
            mountpoint: mountpoint.clone(),
            detached: Arc::default(),
            _fuser: Arc::new(Mutex::new(unmounter)),
        };
        Ok(Mount {
            stats,
            mountpoint,
            unmounter,
            notifier,
            session: Some(session),
        })
    }

    /// What a refresh loop uses to let the kernel drop a replaced snapshot.
    pub fn snapshot_releaser(&self) -> SnapshotReleaser {
        self.notifier.clone()
    }

    /// Something that can unmount from another thread (signal handlers).
    pub fn unmount_handle(&self) -> UnmountHandle {
        self.unmounter.clone()
    }

    /// Blocks until the file system is unmounted (by `umount` or [`Mount::unmount`]).
    pub fn join(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }

    pub fn unmount(mut self) -> std::io::Result<()> {
        let r = self.unmounter.unmount();
        if let Some(s) = self.session.take() {
            s.join()?;
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
                let _ = s.join();
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
pub struct SnapshotReleaser(fuser::Notifier);

impl SnapshotReleaser {
    /// Invalidates the root's entries of `old`; returns how many the kernel had.
    pub fn forget_snapshot(&self, old: &Snapshot) -> usize {
        let mut dropped = 0;
        let mut from = 0;
        loop {
            let children = match old.children(snapshot::ROOT, from, 512) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a replaced snapshot failed; the kernel keeps its entries until it evicts them");
                    return dropped;
                }
            };
            let Some((last, _)) = children.last() else {
                return dropped;
            };
            from = last + 1;
            for (_, e) in &children {
                // ENOENT: the kernel does not hold this entry; nothing to drop.
                if self.0.inval_entry(INodeNo(1), OsStr::new(&e.name)).is_ok() {
                    dropped += 1;
                }
            }
        }
    }
}

/// Unmounts a [`Mount`] from any thread; unmounting twice is a no-op.
///
/// fuser's own unmounter decides from a poll of its first device fd whether the mount
/// is still there, which is unreliable with one cloned fd per worker thread; this
/// unmounts the path itself (as root; `fusermount3 -u` otherwise), so the workers see
/// the connection end and the session can be joined.
#[derive(Clone)]
pub struct UnmountHandle {
    mountpoint: std::path::PathBuf,
    detached: Arc<std::sync::atomic::AtomicBool>,
    _fuser: Arc<Mutex<fuser::SessionUnmounter>>,
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
        self.detached
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether [`UnmountHandle::detach`] was used: the session may outlive the mount.
    pub fn was_detached(&self) -> bool {
        self.detached.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Kernel readahead of a mount, in KiB: the largest FUSE request (1 MiB), so a
/// sequential reader costs one request per MiB instead of eight.
const KERNEL_READAHEAD_KB: u64 = 1024;

/// Sets the readahead of the mount's backing device info. The kernel offers FUSE file
/// systems 128 KiB at INIT and refuses more there; the sysfs knob (root only) is the
/// way to raise it, and it applies to files opened afterwards.
fn set_kernel_readahead(mountpoint: &Path, kb: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::write(path, kb.to_string())
}
