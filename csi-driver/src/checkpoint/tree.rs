//! The checkpoint volume's file system: a read-write tree that lives in a directory on
//! local disk (in the pool) and is served over FUSE, so that a training framework sees
//! an ordinary POSIX file system and Tidepool sees every step it writes.
//!
//! Design (the passthrough file system shape):
//! - Every node the kernel knows holds an `O_PATH` descriptor of its backing file or
//!   directory. Operations go through `*at` calls relative to those descriptors (or
//!   `/proc/self/fd/N` where the kernel has no `*at` form), never through path strings
//!   built on our side, so a rename anywhere (the `tmp → step-N` pattern) needs no
//!   bookkeeping: a node stays valid wherever its file moves.
//! - Node ids are ours (a counter), mapped from the backing `(dev, ino)`. While a node
//!   lives its descriptor pins the backing inode, so the backing file system cannot
//!   reuse that inode number: the map never confuses two files.
//! - Served by the node agent, the tree records its node ids and open files as they
//!   are handed out ([`resume`]), so that a restarted agent takes the live connection
//!   over: the kernel's ids and handles name the same files, writers stay writers, and
//!   passthrough backings stay shared.
//! - Opens return the backing file to the kernel for passthrough where it has it (Linux
//!   6.9+): reads and writes then run at local-disk speed without a round trip to us.
//!   Elsewhere READ and WRITE come here and are `pread`/`pwrite` on the backing file.
//! - Every change is reported to a [`StepEvents`] observer with the step it belongs to
//!   (the top-level directory) and the path inside it: the commit rules run there, not
//!   here. This layer knows nothing of commits, journals or the lake.
//!
//! - Steps durable in the lake but not on this disk (another node's, or ones retention
//!   took off it) are shown beside the local ones, read-only, from their manifests and
//!   fetched through the node's cache pool ([`remote`], given as [`TreeConfig::lake`]).
//!   Their node ids have bit 63 set and are answered there; a local step wins on a
//!   name clash. Anything that would change them is `EROFS` (creating a name that is a
//!   remote step at the root is `EEXIST`, as for any existing name).
//!
//! - A local step that is durable, under the manifest the lake lists now, as this
//!   node's latest commit of it, and unchanged since ([`StepEvents::durable_version`]),
//!   shows the manifest's files that are not on local disk beside the local ones, in
//!   every directory of the step: the other nodes' parts of a multi-node step. They are
//!   remote ids, read-only like a remote step's (creating one of their names is
//!   `EEXIST`, removing or renaming one `EROFS`). A change to the step ends this (names
//!   the kernel cached go within their TTL).
//!
//! What is refused, and how: hard links and symlinks (`EPERM`), extended attributes
//! (`EOPNOTSUPP`), `O_TMPFILE` (`EOPNOTSUPP`), device nodes and FIFOs (`EPERM`). Files are
//! created owned by the caller (the server runs as root), with the caller's umask.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

pub mod remote;
pub mod resume;
mod sys;

pub use remote::LakeSteps;
use remote::{RemoteSteps, is_remote};
use sys::{
    DirStream, attr_of, backing_flags, check, cstr, errno, exists_at, fstat, is_write,
    open_dir_stream, open_path, proc_path, readdir_local,
};

use crate::fuse::abi::{fattr, fopen, op};
use crate::fuse::{
    AttrOut, Connection, CreateIn, DirBuf, EntryOut, Errno, FallocateIn, FileKind, FileSystem,
    OpenOut, RenameIn, ReplyData, Request, SetattrIn, StatfsOut, Timespec, Ttl, WriteIn,
};

/// What happened in the tree, reported with the step (top-level directory name) it
/// touched and the path inside that step (`""` for the step directory itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeEvent {
    /// A file was created or opened for writing.
    WriteOpened { step: OsString },
    /// A file opened for writing was closed; `rel` is where it is now.
    WriteClosed { step: OsString, rel: PathBuf },
    /// An entry was created, removed, renamed into place, truncated or changed its
    /// attributes.
    Changed { step: OsString, rel: PathBuf },
    /// An entry inside a step was removed (never a commit by itself).
    Removed { step: OsString, rel: PathBuf },
    /// A top-level directory was renamed (the `tmp → step-N` commit pattern).
    StepRenamed { from: OsString, to: OsString },
    /// A top-level directory was removed.
    StepRemoved { step: OsString },
}

/// Which steps have files open for writing right now, wherever those files have moved
/// since they were opened (asked at commit time, so renames never confuse it).
pub trait OpenWriters: Send + Sync + 'static {
    fn steps_being_written(&self) -> HashSet<OsString>;
}

/// Receives [`TreeEvent`]s. Called on FUSE worker threads: must not block for long.
pub trait StepEvents: Send + Sync + 'static {
    fn event(&self, e: TreeEvent);
    /// Whether writes into `step` must be refused (`EROFS`) — e.g. a step that is being
    /// removed by retention.
    fn read_only(&self, _step: &OsStr) -> bool {
        false
    }
    /// Called before a regular file that has more than one link is opened for writing,
    /// truncated, or has its modification time set, with the file open read-only and
    /// where it is (step, path in it). Hard links are refused in the tree, so a second
    /// link is a commit's staged copy: the observer keeps that committed version before
    /// the change can touch it. An error fails the operation with its errno (`ENOSPC`).
    fn before_change(&self, _file: &File, _at: Option<&(OsString, PathBuf)>) -> io::Result<()> {
        Ok(())
    }
    /// Called before an entry inside `step` (not the step directory itself) is
    /// removed: a step due for commit commits first (see `Store`). Errors are the
    /// observer's to report; the removal goes ahead.
    fn before_remove(&self, _step: &OsStr) {}
    /// The manifest version (its ETag) under which the lake holds this node's latest
    /// commit of the local step directory `step`, when that commit is durable and the
    /// step has not changed since: the tree then shows the lake's other files of that
    /// version (other nodes' parts of the step) beside the local ones. `None`: the local
    /// files only.
    fn durable_version(&self, _step: &OsStr) -> Option<crate::lake::ETag> {
        None
    }
}

/// How the tree is served.
#[derive(Clone, Debug)]
pub struct TreeConfig {
    /// Entry and attribute lifetime in the kernel. We are the only writer of the
    /// backing directory, so this only bounds how long a step removed by retention
    /// stays visible; one second keeps `stat`-heavy frameworks cheap.
    pub ttl: Duration,
    /// Where node ids and open files are recorded so that another process can take
    /// the connection over ([`resume`]); `None` records nothing.
    pub state: Option<PathBuf>,
    /// Take over a live connection from the record at `state` (instead of starting
    /// one afresh).
    pub resume: bool,
    /// Also show the steps durable in this destination that are not on local disk,
    /// read-only, through this cache pool; `None` shows local steps only.
    pub lake: Option<LakeSteps>,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig {
            ttl: Duration::from_secs(1),
            state: None,
            resume: false,
            lake: None,
        }
    }
}

struct Node {
    /// `O_PATH` descriptor of the backing file or directory.
    fd: OwnedFd,
    key: (u64, u64),
    nlookup: AtomicU64,
    /// The one backing file the kernel passes this inode's I/O through while any open
    /// uses passthrough (the kernel refuses a second, different one for an inode).
    backing: Mutex<Option<Backing>>,
    /// Taken over from another process: the kernel's lookup count is unknown, so the
    /// node leaves memory at its first FORGET (and can be found again in the record).
    resumed: bool,
}

struct Backing {
    id: u32,
    opens: u32,
    /// Ours when we registered it; a backing taken over is held by the kernel alone.
    _file: Option<File>,
}

struct Handle {
    file: Arc<File>,
    /// Opened for writing (or truncation).
    writing: bool,
    /// The step it was opened in (reported at close if the file is gone by then).
    opened_in: Option<OsString>,
    /// Set when this open shares the node's passthrough backing.
    passthrough: Option<Arc<Node>>,
}

struct DirHandle {
    stream: Mutex<DirStream>,
    /// Entries from the lake listed after the local ones (their cookies have
    /// [`REMOTE_COOKIE`] set): at the root, the steps not on local disk; in a directory
    /// of a step merged with the lake's copy, that copy's entries not on local disk.
    remote: Vec<(OsString, u64, FileKind)>,
}

/// Set in the readdir cookies of the root's remote entries (the local directory's own
/// cookies are `off_t` values, never negative).
const REMOTE_COOKIE: u64 = 1 << 63;

/// The read-write tree.
pub struct CheckpointTree {
    root: PathBuf,
    cfg: TreeConfig,
    events: Arc<dyn StepEvents>,
    nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    conn: OnceLock<Connection>,
    passthrough: AtomicBool,
    passthrough_opens: AtomicU64,
    is_root: bool,
    log: Option<resume::StateLog>,
    /// The root opened for reading: `open_by_handle_at` wants a descriptor that is not
    /// `O_PATH`.
    root_dir: File,
    /// Steps only in the lake (see [`remote`]).
    remote: Option<RemoteSteps>,
}

struct Nodes {
    by_id: HashMap<u64, Arc<Node>>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

impl CheckpointTree {
    /// Serves the directory `root` (created if missing).
    pub fn new(root: &Path, cfg: TreeConfig, events: Arc<dyn StepEvents>) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let fd = open_path(libc::AT_FDCWD, &CString::new(root.as_os_str().as_bytes())?)
            .map_err(io::Error::from_raw_os_error)?;
        let st = fstat(fd.as_raw_fd()).map_err(io::Error::from_raw_os_error)?;
        let key = (st.st_dev, st.st_ino);
        let mut by_id = HashMap::new();
        by_id.insert(
            1,
            Arc::new(Node {
                fd,
                key,
                nlookup: AtomicU64::new(1),
                backing: Mutex::new(None),
                resumed: false,
            }),
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, 1);
        // SAFETY: geteuid(2) takes nothing and cannot fail.
        let is_root = unsafe { libc::geteuid() } == 0;
        let saved = match &cfg.state {
            Some(path) if cfg.resume => resume::Saved::load(path)?,
            _ => resume::Saved {
                next_node: 2,
                next_fh: 1,
                ..Default::default()
            },
        };
        let root_dir = File::open(&root)?;
        let remote = cfg
            .lake
            .clone()
            .map(|l| RemoteSteps::new(l, st.st_uid, st.st_gid, cfg.ttl));
        let tree = CheckpointTree {
            remote,
            root_dir,
            root,
            events,
            nodes: Mutex::new(Nodes {
                by_id,
                by_key,
                next: saved.next_node.max(2),
            }),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(saved.next_fh.max(1)),
            conn: OnceLock::new(),
            passthrough: AtomicBool::new(true),
            passthrough_opens: AtomicU64::new(0),
            is_root,
            log: None,
            cfg,
        };
        tree.take_over(saved)
    }

    /// Reopens what a previous process handed the kernel (nodes, open files, listed
    /// directories) and starts the record afresh with it.
    fn take_over(mut self, saved: resume::Saved) -> io::Result<Self> {
        let Some(path) = self.cfg.state.clone() else {
            return Ok(self);
        };
        let root_fd = self.nodes.lock().by_id[&1].fd.as_raw_fd();
        if let Err(e) =
            resume::FileHandle::of(root_fd).and_then(|h| h.open(self.root_dir.as_raw_fd()))
        {
            tracing::warn!(error = %e, root = %self.root.display(), "this file system gives no file handles: a restarted agent cannot take this volume over (pods must remount it)");
            return Ok(self);
        }
        let mut live = resume::Saved {
            next_node: saved.next_node,
            next_fh: saved.next_fh,
            ..Default::default()
        };
        let mut lost = 0usize;
        for (id, h) in saved.nodes {
            match self.readopt(id, &h) {
                Ok(()) => {
                    live.nodes.insert(id, h);
                }
                // Removed while nobody served the volume, or unlinked while open.
                Err(e) => {
                    tracing::debug!(node = id, error = %e, "a node of the previous process is gone");
                    lost += 1
                }
            }
        }
        for (fh, o) in saved.opens {
            let Ok(node) = self.node(o.node) else {
                lost += 1;
                continue;
            };
            let flags = backing_flags(o.flags) & !libc::O_TRUNC;
            let path = proc_path(node.fd.as_raw_fd());
            // SAFETY: path is NUL-terminated; no O_CREAT (and no O_TRUNC: the file
            // holds what was written through it since).
            let fd = unsafe { libc::open(path.as_ptr(), flags) };
            if fd < 0 {
                lost += 1;
                continue;
            }
            // SAFETY: open returned a new descriptor we own.
            let file = unsafe { File::from_raw_fd(fd) };
            let writing = is_write(o.flags) || (o.flags as i32) & libc::O_TRUNC != 0;
            let opened_in = if writing {
                self.locate_node(&node).map(|(s, _)| s)
            } else {
                None
            };
            let passthrough = (o.backing != 0).then(|| {
                let mut b = node.backing.lock();
                match &mut *b {
                    Some(bk) => bk.opens += 1,
                    None => {
                        *b = Some(Backing {
                            id: o.backing,
                            opens: 1,
                            _file: None,
                        })
                    }
                }
                node.clone()
            });
            self.handles.get_mut().insert(
                fh,
                Handle {
                    file: Arc::new(file),
                    writing,
                    opened_in,
                    passthrough,
                },
            );
            live.opens.insert(fh, o);
        }
        for (fh, id) in saved.dirs {
            match self
                .node(id)
                .and_then(|n| open_dir_stream(n.fd.as_raw_fd()))
            {
                Ok(stream) => {
                    self.dirs.get_mut().insert(
                        fh,
                        Arc::new(DirHandle {
                            stream: Mutex::new(stream),
                            remote: Vec::new(),
                        }),
                    );
                    live.dirs.insert(fh, id);
                }
                Err(_) => lost += 1,
            }
        }
        if self.cfg.resume {
            tracing::info!(
                nodes = live.nodes.len(),
                opens = live.opens.len(),
                dirs = live.dirs.len(),
                lost,
                "took the checkpoint volume's connection over"
            );
        }
        self.log = Some(resume::StateLog::create(&path, live)?);
        Ok(self)
    }

    /// Registers node `id` of a previous process again, from its file handle.
    fn readopt(&self, id: u64, h: &resume::FileHandle) -> io::Result<()> {
        let fd = h.open(self.root_dir.as_raw_fd())?;
        let st = fstat(fd.as_raw_fd()).map_err(io::Error::from_raw_os_error)?;
        let key = (st.st_dev, st.st_ino);
        let mut nodes = self.nodes.lock();
        nodes.by_id.insert(
            id,
            Arc::new(Node {
                fd,
                key,
                nlookup: AtomicU64::new(1),
                backing: Mutex::new(None),
                resumed: true,
            }),
        );
        nodes.by_key.entry(key).or_insert(id);
        Ok(())
    }

    /// The backing directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens handed to the kernel for passthrough so far.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }

    /// Whether the connection settled on passthrough (Linux 6.9+).
    pub fn kernel_passthrough(&self) -> bool {
        self.conn.get().is_some_and(Connection::passthrough)
    }

    /// Files open for writing right now (all steps).
    pub fn open_writers(&self) -> usize {
        self.handles.lock().values().filter(|h| h.writing).count()
    }

    /// Tells the kernel to forget the top-level entry `name` (removed behind its back,
    /// e.g. by retention).
    pub fn forget_step(&self, name: &OsStr) {
        if let Some(conn) = self.conn.get() {
            let _ = conn.inval_entry(1, name);
        }
    }

    /// The remote steps, for a remote id (`ESTALE` when this tree shows none).
    fn remote(&self) -> Result<&RemoteSteps, Errno> {
        self.remote.as_ref().ok_or(libc::ESTALE)
    }

    /// Whether `name` exists in the local root directory.
    fn is_local_step(&self, name: &OsStr) -> bool {
        let Ok(n) = cstr(name) else { return false };
        // SAFETY: a zeroed stat is a valid out-buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the root descriptor is live, n NUL-terminated, st a valid out-buffer.
        unsafe {
            libc::fstatat(
                self.root_dir.as_raw_fd(),
                n.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            ) == 0
        }
    }

    /// Whether `name` under `parent` is the lake's with no local entry of that name: a
    /// remote step at the root, or a merged entry in a step (see
    /// [`CheckpointTree::merged_entry`]).
    fn is_remote_only(&self, parent: u64, name: &OsStr) -> bool {
        if parent == 1 {
            return self.remote.as_ref().is_some_and(|r| r.is_step(name))
                && !self.is_local_step(name);
        }
        self.remote.is_some()
            && self.node(parent).is_ok_and(|p| {
                !exists_at(p.fd.as_raw_fd(), name) && self.merged_entry(parent, &p, name).is_some()
            })
    }

    /// The remote root id of local step `step` merged with the lake's copy of it: where
    /// the observer says this node's latest commit of it is durable under the manifest
    /// version the lake lists now ([`StepEvents::durable_version`]).
    fn merged_step(&self, step: &OsStr) -> Option<u64> {
        let remote = self.remote.as_ref()?;
        let etag = self.events.durable_version(step)?;
        // Listed before it became durable (moments before, often: the writes that made
        // the step looked the lake up), or not listed yet.
        remote.step_of_durable_version(step, &etag)
    }

    /// The lake's entry at `name` under local directory `parent` in a merged step (the
    /// other nodes' files of the version this node holds its part of), if any.
    fn merged_entry(&self, parent: u64, pnode: &Node, name: &OsStr) -> Option<EntryOut> {
        let (step, rel) = self.locate(parent, pnode, name)?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        let root = self.merged_step(&step)?;
        self.remote.as_ref()?.lookup_rel(root, &rel).ok()
    }

    /// Refuses to create `name` under `parent` where that would touch a remote step.
    fn refuse_remote_create(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if is_remote(parent) {
            return Err(libc::EROFS);
        }
        if self.is_remote_only(parent, name) {
            return Err(libc::EEXIST);
        }
        Ok(())
    }

    /// Refuses to remove or rename `name` under `parent` if it is (in) a remote step.
    fn refuse_remote_change(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        if is_remote(parent) || self.is_remote_only(parent, name) {
            return Err(libc::EROFS);
        }
        Ok(())
    }

    fn node(&self, id: u64) -> Result<Arc<Node>, Errno> {
        if let Some(n) = self.nodes.lock().by_id.get(&id) {
            return Ok(n.clone());
        }
        // A node taken over and forgotten from memory early (its lookup count was
        // unknown) is found again through the record.
        let h = self
            .log
            .as_ref()
            .and_then(|l| l.handle_of(id))
            .ok_or(libc::ESTALE)?;
        self.readopt(id, &h).map_err(|_| libc::ESTALE)?;
        self.nodes
            .lock()
            .by_id
            .get(&id)
            .cloned()
            .ok_or(libc::ESTALE)
    }

    /// Registers (or finds) the node for `name` under `parent` and counts a lookup.
    fn remember(&self, parent: &Node, name: &OsStr) -> Result<EntryOut, Errno> {
        let fd = open_path(parent.fd.as_raw_fd(), &cstr(name)?)?;
        let st = fstat(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut nodes = self.nodes.lock();
        let id = match nodes.by_key.get(&key).copied() {
            Some(id) if nodes.by_id.contains_key(&id) => {
                nodes.by_id[&id].nlookup.fetch_add(1, Ordering::Relaxed);
                id
            }
            _ => {
                let id = nodes.next;
                nodes.next += 1;
                // Recorded before the kernel hears of the id (under the lock, so the
                // record's order is the ids' order).
                if let Some(log) = &self.log {
                    match resume::FileHandle::of(fd.as_raw_fd()) {
                        Ok(h) => log.node(id, &h),
                        Err(e) => {
                            tracing::warn!(error = %e, "no file handle for a new node; a restarted agent will answer ESTALE for it")
                        }
                    }
                }
                nodes.by_id.insert(
                    id,
                    Arc::new(Node {
                        fd,
                        key,
                        nlookup: AtomicU64::new(1),
                        backing: Mutex::new(None),
                        resumed: false,
                    }),
                );
                nodes.by_key.insert(key, id);
                id
            }
        };
        Ok(self.entry_out(id, &st))
    }

    /// The entry of node `id`: `stat` shows the backing file's inode number (stable
    /// for the file's life, the same `readdir` shows), not our node id (which a file
    /// gets anew after the kernel forgets it).
    fn entry_out(&self, id: u64, st: &libc::stat) -> EntryOut {
        EntryOut {
            nodeid: id,
            attr: attr_of(st.st_ino, st),
            generation: 0,
            entry_ttl: Ttl::from(self.cfg.ttl),
            attr_ttl: Ttl::from(self.cfg.ttl),
        }
    }

    /// The path of a node relative to the root (`None` for the root itself, or when the
    /// node was removed).
    fn rel_of(&self, node: &Node) -> Option<PathBuf> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", node.fd.as_raw_fd())).ok()?;
        let rel = link.strip_prefix(&self.root).ok()?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        if rel.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        Some(rel.to_path_buf())
    }

    /// The step and in-step path of entry `name` under `parent`.
    fn locate(&self, parent: u64, pnode: &Node, name: &OsStr) -> Option<(OsString, PathBuf)> {
        if parent == 1 {
            return Some((name.to_owned(), PathBuf::new()));
        }
        let rel = self.rel_of(pnode)?.join(name);
        split_step(&rel)
    }

    fn locate_node(&self, node: &Node) -> Option<(OsString, PathBuf)> {
        split_step(&self.rel_of(node)?)
    }

    /// Lets the observer keep a committed version of `fd`'s file before it changes (see
    /// [`StepEvents::before_change`]); nothing to do for a file with one link.
    fn before_change(&self, fd: RawFd, at: Option<&(OsString, PathBuf)>) -> Result<(), Errno> {
        let st = fstat(fd)?;
        if st.st_nlink <= 1 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(());
        }
        let f = File::open(format!("/proc/self/fd/{fd}")).map_err(errno)?;
        self.events.before_change(&f, at).map_err(|e| {
            tracing::warn!(error = %e, at = ?at, "cannot keep the committed version of a file about to change; the change is refused");
            errno(e)
        })
    }

    fn refuse_read_only(&self, step: Option<&(OsString, PathBuf)>) -> Result<(), Errno> {
        match step {
            Some((s, _)) if self.events.read_only(s) => Err(libc::EROFS),
            _ => Ok(()),
        }
    }

    /// Gives a file or directory we just created the exact mode the caller asked for
    /// (our own umask must not narrow it) and the caller as owner (the server runs as
    /// root). In a setgid directory the group stays the directory's, and a new
    /// directory keeps the setgid bit, as the kernel does for local files.
    fn own_new(&self, parent: &Node, name: &CString, mode: u32, dir: bool, req: &Request) {
        let dirfd = parent.fd.as_raw_fd();
        let setgid = fstat(dirfd).is_ok_and(|st| st.st_mode & libc::S_ISGID != 0);
        if self.is_root {
            let gid = if setgid { u32::MAX } else { req.gid };
            // SAFETY: dirfd is live, name NUL-terminated; a failure leaves root as owner.
            unsafe {
                libc::fchownat(
                    dirfd,
                    name.as_ptr(),
                    req.uid,
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
        }
        let mode = if dir && setgid {
            mode | libc::S_ISGID
        } else {
            mode
        };
        // SAFETY: as above (after chown, which may clear set-id bits).
        unsafe { libc::fchmodat(dirfd, name.as_ptr(), mode as libc::mode_t, 0) };
    }

    /// Registers an open. With passthrough, every open of one inode shares one backing
    /// file (opened read-write by us; the kernel enforces the caller's own mode on its
    /// file), counted so that the last close releases it.
    fn open_handle(
        &self,
        id: u64,
        node: &Arc<Node>,
        file: File,
        flags: u32,
        writing: bool,
        opened_in: Option<OsString>,
    ) -> OpenOut {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut backing_id = None;
        if self.passthrough.load(Ordering::Relaxed)
            && let Some(conn) = self.conn.get()
            && conn.passthrough()
        {
            let mut b = node.backing.lock();
            match &mut *b {
                Some(bk) => {
                    bk.opens += 1;
                    backing_id = Some(bk.id);
                }
                None => {
                    let shared = File::options()
                        .read(true)
                        .write(true)
                        .open(format!("/proc/self/fd/{}", node.fd.as_raw_fd()));
                    match shared.and_then(|f| conn.open_backing(&f).map(|id| (id, f))) {
                        Ok((id, f)) => {
                            *b = Some(Backing {
                                id,
                                opens: 1,
                                _file: Some(f),
                            });
                            backing_id = Some(id);
                        }
                        Err(e) => {
                            if self.passthrough.swap(false, Ordering::Relaxed) {
                                tracing::warn!(error = %e, "FUSE passthrough refused by the kernel; checkpoint reads and writes go through Tidepool from now on");
                            }
                        }
                    }
                }
            }
            if backing_id.is_some() {
                self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(log) = &self.log {
            log.open(
                fh,
                resume::SavedOpen {
                    node: id,
                    flags,
                    backing: backing_id.unwrap_or(0),
                },
            );
        }
        self.handles.lock().insert(
            fh,
            Handle {
                file: Arc::new(file),
                writing,
                opened_in,
                passthrough: backing_id.map(|_| node.clone()),
            },
        );
        OpenOut {
            fh,
            // No FLUSH (nothing is buffered here, and a flush nobody answers would hang a
            // closing process while the server restarts).
            flags: fopen::NOFLUSH
                | if backing_id.is_some() {
                    fopen::PASSTHROUGH
                } else {
                    0
                },
            backing_id: backing_id.unwrap_or(0),
        }
    }

    /// The step (and path in it) a descriptor's file is at now; `None` once deleted.
    fn where_now(&self, file: &File) -> Option<(OsString, PathBuf)> {
        let p = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
        let rel = p.strip_prefix(&self.root).ok()?;
        if rel.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        split_step(rel)
    }

    fn file(&self, fh: u64) -> Result<Arc<File>, Errno> {
        self.handles
            .lock()
            .get(&fh)
            .map(|h| h.file.clone())
            .ok_or(libc::EBADF)
    }
}

/// Splits a path relative to the root into (step, path inside the step).
pub fn split_step(rel: &Path) -> Option<(OsString, PathBuf)> {
    let mut comps = rel.components();
    let step = match comps.next()? {
        Component::Normal(s) => s.to_owned(),
        _ => return None,
    };
    Some((step, comps.as_path().to_path_buf()))
}

impl FileSystem for CheckpointTree {
    fn connected(&self, conn: &Connection) {
        let _ = self.conn.set(conn.clone());
        if let Some(r) = &self.remote {
            r.connected(conn);
        }
    }

    fn lookup(&self, _req: &Request, parent: u64, name: &OsStr) -> Result<EntryOut, Errno> {
        if is_remote(parent) {
            return self.remote()?.lookup(parent, name);
        }
        let p = self.node(parent)?;
        match self.remember(&p, name) {
            Err(libc::ENOENT) if parent == 1 => {
                let Some(remote) = &self.remote else {
                    return Err(libc::ENOENT);
                };
                if let Some(e) = remote.lookup_step(name) {
                    return Ok(e);
                }
                // Perhaps made durable since the last listing (by another node).
                remote.refresh_if_stale();
                remote.lookup_step(name).ok_or(libc::ENOENT)
            }
            // Another node's file of a step this node holds its part of.
            Err(libc::ENOENT) => self.merged_entry(parent, &p, name).ok_or(libc::ENOENT),
            r => r,
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if ino == 1 || is_remote(ino) {
            return;
        }
        let mut nodes = self.nodes.lock();
        let gone = match nodes.by_id.get(&ino) {
            Some(n) if n.resumed => true,
            Some(n) => {
                let prev = n.nlookup.fetch_sub(
                    nlookup.min(n.nlookup.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                prev <= nlookup
            }
            None => false,
        };
        if gone && let Some(n) = nodes.by_id.remove(&ino) {
            if nodes.by_key.get(&n.key) == Some(&ino) {
                nodes.by_key.remove(&n.key);
            }
            // A node taken over stays in the record: its FORGET may not have been the
            // kernel's last word on it.
            if !n.resumed
                && let Some(log) = &self.log
            {
                log.forget(ino);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: u64, fh: Option<u64>) -> Result<AttrOut, Errno> {
        if is_remote(ino) {
            return self.remote()?.getattr(ino);
        }
        let st = match fh.and_then(|fh| self.file(fh).ok()) {
            Some(f) => fstat(f.as_raw_fd())?,
            None => fstat(self.node(ino)?.fd.as_raw_fd())?,
        };
        Ok(AttrOut {
            attr: attr_of(st.st_ino, &st),
            ttl: Ttl::from(self.cfg.ttl),
        })
    }

    fn setattr(&self, _req: &Request, ino: u64, a: &SetattrIn) -> Result<AttrOut, Errno> {
        if is_remote(ino) {
            return Err(libc::EROFS);
        }
        let node = self.node(ino)?;
        let at = self.locate_node(&node);
        self.refuse_read_only(at.as_ref())?;
        if a.valid & (fattr::SIZE | fattr::MTIME | fattr::MTIME_NOW) != 0 {
            self.before_change(node.fd.as_raw_fd(), at.as_ref())?;
        }
        let path = proc_path(node.fd.as_raw_fd());
        if a.valid & fattr::MODE != 0 {
            // SAFETY: path is NUL-terminated.
            check(unsafe { libc::chmod(path.as_ptr(), a.mode & 0o7777) })?;
        }
        if a.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = if a.valid & fattr::UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & fattr::GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            // SAFETY: the O_PATH descriptor is live; an empty path names it.
            check(unsafe {
                libc::fchownat(
                    node.fd.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH,
                )
            })?;
        }
        if a.valid & fattr::SIZE != 0 {
            let via_fh = (a.valid & fattr::FH != 0)
                .then(|| self.file(a.fh).ok())
                .flatten();
            match via_fh {
                Some(f) => f.set_len(a.size).map_err(errno)?,
                // SAFETY: path is NUL-terminated.
                None => check(unsafe { libc::truncate(path.as_ptr(), a.size as libc::off_t) })?,
            }
        }
        if a.valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW) != 0 {
            let t = |set: u32, now: u32, ts: Timespec| libc::timespec {
                tv_sec: ts.secs as libc::time_t,
                tv_nsec: if a.valid & now != 0 {
                    libc::UTIME_NOW
                } else if a.valid & set != 0 {
                    ts.nanos as i64
                } else {
                    libc::UTIME_OMIT
                },
            };
            let times = [
                t(fattr::ATIME, fattr::ATIME_NOW, a.atime),
                t(fattr::MTIME, fattr::MTIME_NOW, a.mtime),
            ];
            // SAFETY: path is NUL-terminated, times has two entries.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })?;
        }
        if let Some((step, rel)) = at {
            self.events.event(TreeEvent::Changed { step, rel });
        }
        self.getattr(_req, ino, None)
    }

    fn open(&self, _req: &Request, ino: u64, flags: u32) -> Result<OpenOut, Errno> {
        if is_remote(ino) {
            return self.remote()?.open(ino, flags);
        }
        let node = self.node(ino)?;
        let writing = is_write(flags) || (flags as i32) & libc::O_TRUNC != 0;
        let opened_in = if writing {
            let at = self.locate_node(&node);
            self.refuse_read_only(at.as_ref())?;
            self.before_change(node.fd.as_raw_fd(), at.as_ref())?;
            at.map(|(s, _)| s)
        } else {
            None
        };
        let path = proc_path(node.fd.as_raw_fd());
        // SAFETY: path is NUL-terminated; the flags never include O_CREAT.
        let fd = unsafe { libc::open(path.as_ptr(), backing_flags(flags)) };
        if fd < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        // SAFETY: open returned a new descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        if let Some(step) = &opened_in {
            self.events
                .event(TreeEvent::WriteOpened { step: step.clone() });
        }
        Ok(self.open_handle(ino, &node, file, flags, writing, opened_in))
    }

    fn create(
        &self,
        req: &Request,
        parent: u64,
        c: &CreateIn<'_>,
    ) -> Result<(EntryOut, OpenOut), Errno> {
        self.refuse_remote_create(parent, c.name)?;
        let p = self.node(parent)?;
        let at = self.locate(parent, &p, c.name);
        self.refuse_read_only(at.as_ref())?;
        let name = cstr(c.name)?;
        let mode = c.mode & !c.umask & 0o7777;
        let flags = backing_flags(c.flags);
        // Exclusively first, so that we know whether we created it (only then are its
        // mode and owner ours to set).
        // SAFETY: dirfd live, name NUL-terminated.
        let mut fd = unsafe {
            libc::openat(
                p.fd.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CREAT | libc::O_EXCL,
                mode as libc::c_uint,
            )
        };
        let created = fd >= 0;
        if !created {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) || (c.flags as i32) & libc::O_EXCL != 0 {
                return Err(errno(e));
            }
            // An existing file opened for writing (perhaps truncated by this very open):
            // a commit may hold it.
            if let Ok(existing) = open_path(p.fd.as_raw_fd(), &name) {
                self.before_change(existing.as_raw_fd(), at.as_ref())?;
            }
            // SAFETY: as above; the file exists, so no O_CREAT.
            fd = unsafe { libc::openat(p.fd.as_raw_fd(), name.as_ptr(), flags) };
            if fd < 0 {
                return Err(errno(io::Error::last_os_error()));
            }
        }
        // SAFETY: openat returned a new descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        if created {
            self.own_new(&p, &name, mode, false, req);
        }
        let entry = self.remember(&p, c.name)?;
        let node = self.node(entry.nodeid)?;
        let opened_in = at.as_ref().map(|(s, _)| s.clone());
        if let Some((step, rel)) = at {
            self.events
                .event(TreeEvent::WriteOpened { step: step.clone() });
            self.events.event(TreeEvent::Changed { step, rel });
        }
        Ok((
            entry,
            self.open_handle(entry.nodeid, &node, file, c.flags, true, opened_in),
        ))
    }

    fn mknod(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<EntryOut, Errno> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(libc::EPERM);
        }
        self.refuse_remote_create(parent, name)?;
        let p = self.node(parent)?;
        let at = self.locate(parent, &p, name);
        self.refuse_read_only(at.as_ref())?;
        let n = cstr(name)?;
        // SAFETY: dirfd live, name NUL-terminated.
        let fd = unsafe {
            libc::openat(
                p.fd.as_raw_fd(),
                n.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                (mode & !umask & 0o7777) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor we own; closed at once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        self.own_new(&p, &n, mode & !umask & 0o7777, false, req);
        if let Some((step, rel)) = at {
            self.events.event(TreeEvent::Changed { step, rel });
        }
        self.remember(&p, name)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<EntryOut, Errno> {
        self.refuse_remote_create(parent, name)?;
        let p = self.node(parent)?;
        let at = self.locate(parent, &p, name);
        self.refuse_read_only(at.as_ref())?;
        let n = cstr(name)?;
        // SAFETY: dirfd live, name NUL-terminated.
        check(unsafe {
            libc::mkdirat(
                p.fd.as_raw_fd(),
                n.as_ptr(),
                (mode & !umask & 0o7777) as libc::mode_t,
            )
        })?;
        self.own_new(&p, &n, mode & !umask & 0o7777, true, req);
        if let Some((step, rel)) = at {
            self.events.event(TreeEvent::Changed { step, rel });
        }
        self.remember(&p, name)
    }

    fn unlink(&self, _req: &Request, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.remove(parent, name, 0)
    }

    fn rmdir(&self, _req: &Request, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    fn rename(&self, _req: &Request, parent: u64, r: &RenameIn<'_>) -> Result<(), Errno> {
        self.refuse_remote_change(parent, r.old)?;
        self.refuse_remote_change(r.newdir, r.new)?;
        let from_dir = self.node(parent)?;
        let to_dir = self.node(r.newdir)?;
        let from = self.locate(parent, &from_dir, r.old);
        let to = self.locate(r.newdir, &to_dir, r.new);
        self.refuse_read_only(from.as_ref())?;
        self.refuse_read_only(to.as_ref())?;
        let (o, n) = (cstr(r.old)?, cstr(r.new)?);
        // Whether a top-level directory is being renamed (known before the rename).
        let top_dir = parent == 1
            && r.newdir == 1
            && std::fs::symlink_metadata(self.root.join(r.old)).is_ok_and(|m| m.is_dir());
        // SAFETY: both dirfds live, names NUL-terminated.
        check(unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                from_dir.fd.as_raw_fd(),
                o.as_ptr(),
                to_dir.fd.as_raw_fd(),
                n.as_ptr(),
                r.flags,
            ) as libc::c_int
        })?;
        if top_dir {
            self.events.event(TreeEvent::StepRenamed {
                from: r.old.to_owned(),
                to: r.new.to_owned(),
            });
            return Ok(());
        }
        if let Some((step, rel)) = from {
            self.events.event(TreeEvent::Changed { step, rel });
        }
        if let Some((step, rel)) = to {
            self.events.event(TreeEvent::Changed { step, rel });
        }
        Ok(())
    }

    fn link(&self, _req: &Request, _opcode: u32, _ino: u64) -> Result<EntryOut, Errno> {
        // Hard links and symlinks: a checkpoint is files and directories (the lake keeps
        // one blob per file; a link has no native form there).
        Err(libc::EPERM)
    }

    fn read(&self, req: &Request, ino: u64, fh: u64, offset: u64, size: u32, reply: ReplyData) {
        if is_remote(fh) {
            return match self.remote() {
                Ok(r) => r.read(req, ino, offset, size, reply),
                Err(e) => reply.error(e),
            };
        }
        let file = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(&self, _req: &Request, _ino: u64, w: &WriteIn<'_>) -> Result<u32, Errno> {
        if is_remote(w.fh) {
            return Err(libc::EROFS);
        }
        let file = self.file(w.fh)?;
        // On a file opened O_APPEND, pwrite appends whatever the offset (Linux).
        file.write_all_at(w.data, w.offset).map_err(errno)?;
        Ok(w.data.len() as u32)
    }

    fn release(&self, req: &Request, ino: u64, fh: u64, _flags: u32) {
        if is_remote(fh) {
            if let Some(r) = &self.remote {
                r.release(req, ino);
            }
            return;
        }
        // A file open for writing is reported closed while its handle still counts as
        // writing: were the handle gone first, a commit taken in between would find the
        // step idle, and the close arriving after it would mark the committed step
        // changed again (uncommitted, its merged view of the lake's parts gone).
        let closing = self
            .handles
            .lock()
            .get(&fh)
            .filter(|h| h.writing)
            .map(|h| (h.file.clone(), h.opened_in.clone()));
        if let Some((file, opened_in)) = closing {
            // Reported where the file is now (a rename since the open moved it).
            let at = self
                .where_now(&file)
                .or_else(|| opened_in.map(|s| (s, PathBuf::new())));
            if let Some((step, rel)) = at {
                self.events.event(TreeEvent::WriteClosed { step, rel });
            }
        }
        let Some(h) = self.handles.lock().remove(&fh) else {
            return;
        };
        if let Some(log) = &self.log {
            log.close(fh);
        }
        if let Some(node) = &h.passthrough {
            let mut b = node.backing.lock();
            if let Some(bk) = b.as_mut() {
                bk.opens -= 1;
                if bk.opens == 0 {
                    if let Some(conn) = self.conn.get() {
                        let _ = conn.close_backing(bk.id);
                    }
                    *b = None;
                }
            }
        }
    }

    fn fsync(&self, _req: &Request, _ino: u64, fh: u64, datasync: bool) -> Result<(), Errno> {
        if is_remote(fh) {
            // Nothing of a lake-backed file is ever dirty.
            return Ok(());
        }
        let f = self.file(fh)?;
        if datasync {
            f.sync_data()
        } else {
            f.sync_all()
        }
        .map_err(errno)
    }

    fn fsyncdir(&self, _req: &Request, ino: u64, _fh: u64, _datasync: bool) -> Result<(), Errno> {
        if is_remote(ino) {
            return Ok(());
        }
        let node = self.node(ino)?;
        let d = File::open(format!("/proc/self/fd/{}", node.fd.as_raw_fd())).map_err(errno)?;
        d.sync_all().map_err(errno)
    }

    fn fallocate(&self, _req: &Request, ino: u64, f: &FallocateIn) -> Result<(), Errno> {
        if is_remote(ino) || is_remote(f.fh) {
            return Err(libc::EROFS);
        }
        let file = self.file(f.fh)?;
        // SAFETY: the descriptor is live for the call.
        check(unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                f.mode as i32,
                f.offset as libc::off_t,
                f.length as libc::off_t,
            )
        })
    }

    fn other_write(&self, _req: &Request, opcode: u32, ino: u64) -> Result<(), Errno> {
        if is_remote(ino) && opcode != op::SYNCFS {
            return Err(libc::EROFS);
        }
        match opcode {
            op::SYNCFS => {
                let root = self.node(1)?;
                // SAFETY: the descriptor is live for the call.
                check(unsafe { libc::syncfs(root.fd.as_raw_fd()) })
            }
            // xattrs and O_TMPFILE: not kept (no native form in the lake).
            _ => Err(libc::EOPNOTSUPP),
        }
    }

    fn opendir(&self, _req: &Request, ino: u64, _flags: u32) -> Result<OpenOut, Errno> {
        if is_remote(ino) {
            return self.remote()?.opendir(ino);
        }
        let node = self.node(ino)?;
        let stream = open_dir_stream(node.fd.as_raw_fd())?;
        // The root lists the lake's steps too (listed again if the list is stale), but
        // not those a local directory of the same name hides.
        let remote = match &self.remote {
            Some(r) if ino == 1 => {
                r.refresh_if_stale();
                r.steps()
                    .into_iter()
                    .filter(|(name, _)| !self.is_local_step(name))
                    .map(|(name, id)| (name, id, FileKind::Dir))
                    .collect()
            }
            Some(r) => self
                .locate_node(&node)
                .and_then(|(step, rel)| {
                    let dir = r.lookup_rel(self.merged_step(&step)?, &rel).ok()?;
                    r.children(dir.nodeid).ok()
                })
                .unwrap_or_default()
                .into_iter()
                .filter(|(name, _, _)| !exists_at(node.fd.as_raw_fd(), name))
                .collect(),
            None => Vec::new(),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(log) = &self.log {
            log.opendir(fh, ino);
        }
        self.dirs.lock().insert(
            fh,
            Arc::new(DirHandle {
                stream: Mutex::new(stream),
                remote,
            }),
        );
        Ok(OpenOut {
            fh,
            flags: 0,
            backing_id: 0,
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: u64,
        fh: u64,
        offset: u64,
        out: &mut DirBuf,
    ) -> Result<(), Errno> {
        if is_remote(fh) {
            return self.remote()?.readdir(fh, offset, out);
        }
        let dh = self.dirs.lock().get(&fh).cloned().ok_or(libc::EBADF)?;
        if offset & REMOTE_COOKIE == 0 && !readdir_local(&dh.stream.lock(), offset, out)? {
            return Ok(());
        }
        // The lake's entries, after the local ones.
        let from = if offset & REMOTE_COOKIE != 0 {
            (offset & !REMOTE_COOKIE) as usize
        } else {
            0
        };
        for (i, (name, id, kind)) in dh.remote.iter().enumerate().skip(from) {
            if !out.add(*id, REMOTE_COOKIE | (i as u64 + 1), *kind, name, None) {
                break;
            }
        }
        Ok(())
    }

    fn releasedir(&self, _req: &Request, _ino: u64, fh: u64) {
        if is_remote(fh) {
            return;
        }
        if self.dirs.lock().remove(&fh).is_some()
            && let Some(log) = &self.log
        {
            log.close(fh);
        }
    }

    fn statfs(&self, _req: &Request, _ino: u64) -> Result<StatfsOut, Errno> {
        let root = self.node(1)?;
        // SAFETY: zeroed statvfs is a valid out-buffer.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is live; s is a valid out-buffer.
        check(unsafe { libc::fstatvfs(root.fd.as_raw_fd(), &mut s) })?;
        Ok(StatfsOut {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }
}

impl CheckpointTree {
    fn remove(&self, parent: u64, name: &OsStr, flags: i32) -> Result<(), Errno> {
        self.refuse_remote_change(parent, name)?;
        let p = self.node(parent)?;
        let at = self.locate(parent, &p, name);
        self.refuse_read_only(at.as_ref())?;
        if let Some((step, rel)) = &at
            && !rel.as_os_str().is_empty()
        {
            self.events.before_remove(step);
        }
        let n = cstr(name)?;
        // SAFETY: dirfd live, name NUL-terminated.
        check(unsafe { libc::unlinkat(p.fd.as_raw_fd(), n.as_ptr(), flags) })?;
        match at {
            Some((step, rel)) if rel.as_os_str().is_empty() && flags == libc::AT_REMOVEDIR => {
                self.events.event(TreeEvent::StepRemoved { step })
            }
            Some((step, rel)) => self.events.event(TreeEvent::Removed { step, rel }),
            None => {}
        }
        Ok(())
    }
}

impl OpenWriters for CheckpointTree {
    fn steps_being_written(&self) -> HashSet<OsString> {
        let files: Vec<Arc<File>> = self
            .handles
            .lock()
            .values()
            .filter(|h| h.writing)
            .map(|h| h.file.clone())
            .collect();
        files
            .iter()
            .filter_map(|f| self.where_now(f).map(|(s, _)| s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    #[test]
    fn paths_split_into_step_and_rest() {
        assert_eq!(
            split_step(Path::new("step-10/model/__0_0.distcp")),
            Some((os("step-10"), PathBuf::from("model/__0_0.distcp")))
        );
        assert_eq!(
            split_step(Path::new("step-10")),
            Some((os("step-10"), PathBuf::new()))
        );
        assert_eq!(split_step(Path::new("")), None);
    }

    #[test]
    fn backing_opens_never_create_and_keep_append() {
        let f =
            backing_flags((libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_APPEND) as u32);
        assert_eq!(f & libc::O_CREAT, 0);
        assert_eq!(f & libc::O_EXCL, 0);
        assert_ne!(f & libc::O_APPEND, 0);
        assert_eq!(f & libc::O_ACCMODE, libc::O_WRONLY);
    }
}
