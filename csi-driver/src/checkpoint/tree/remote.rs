//! Steps that are durable in the lake but not on this node's disk, shown in the
//! checkpoint volume read-only and fetched lazily through the node's cache pool: a job
//! resuming on a new node sees `step-N/` as it was written, and steps that retention
//! (`keep_local`) took off local disk stay readable.
//!
//! What is shown, and from where:
//! - The list of remote steps is the listing of `_tidepool/steps/*.json` (a step is
//!   durable exactly when its manifest exists; see `manifest`). It is refreshed on the
//!   root's OPENDIR and on a root LOOKUP that misses, at most every
//!   [`LakeSteps::refresh`], and a FUSE request waits at most [`LakeSteps::wait`] for it
//!   (the lake being slow or down never holds a listing up longer; the last list
//!   stands). A step made durable by another node appears; a step whose manifest is
//!   gone disappears. Local steps win on a name clash (the tree asks the disk first).
//! - A step's tree comes from its manifest only, never from a listing of objects: only
//!   what the manifest vouches for is shown, with its size. The manifest is read once,
//!   pinned to the ETag it was listed with, when the step is first looked into.
//!
//! Node ids: `1 << 63 | slot << 32 | index`. The local tree's ids count up from 2 and
//! never reach bit 63. `slot` (31 bits, never 0) is derived from the step's name and
//! its manifest's ETag, so a restarted server gives the same step the same ids; a
//! rewritten manifest is a new slot (ids never name entries of another version).
//! `index` is the entry's position in the manifest's tree, built in path order (0 is
//! the step directory). A step that leaves the list keeps its slot resolvable for a
//! while ([`RETIRED`]), so files open in it keep reading. File handles of remote opens
//! are the node id itself (no table a restarted server would lack).
//!
//! Verification (never a wrong byte): at the first open of a file its object is
//! HEADed and must have the manifest's size and `Content-MD5` (our uploads always set
//! it: a single put sends it and the lake checks it, Put Block List stores the MD5 the
//! uploader computed; an overwrite by anything else changes or drops it). The bytes
//! are then fetched by the cache pool with ranged GETs pinned to that ETag (an object
//! overwritten later fails with `Changed`, never mixing versions), and the pool checks
//! them against the *manifest's* MD5: before a one-block file is served, and over the
//! whole copy once a multi-block file is complete (a copy that fails twice is flagged,
//! and we then refuse it). Blocks carry CRC32C on local disk. Any failure is `EIO`
//! with a log line naming the object and the cause.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::cache::blob::CachedBlob;
use crate::cache::snapshot::{Entry, Kind};
use crate::cache::{CacheError, CachePool, blob_key};
use crate::checkpoint::manifest::{Layout, parse_md5_hex, read_manifest, valid_step_name};
use crate::checkpoint::upload::hex;
use crate::fuse::abi::{Attr, fopen};
use crate::fuse::{
    AttrOut, Connection, DirBuf, EntryOut, Errno, FileKind, OpenOut, ReplyData, Request, Timespec,
    Ttl,
};
use crate::lake::{ETag, Lake, LakeError, LakeUrl, Lister};

/// Set in every remote node id (and file handle).
pub const REMOTE: u64 = 1 << 63;
const SLOT_SHIFT: u32 = 32;
const INDEX_MASK: u64 = (1 << SLOT_SHIFT) - 1;
/// Steps that left the list whose ids still resolve (files open in them keep
/// reading); the oldest is forgotten first. Each holds its manifest's tree.
const RETIRED: usize = 64;
/// Sequential-read trackers kept (one per file and reading process).
const MAX_STREAMS: usize = 1024;

/// Whether `id` (a node id or a file handle) is a remote entry's.
pub fn is_remote(id: u64) -> bool {
    id & REMOTE != 0
}

/// Where the lake-only steps of a checkpoint volume come from: the destination and the
/// node's cache pool. Given to the tree in [`TreeConfig::lake`](super::TreeConfig).
#[derive(Clone, Debug)]
pub struct LakeSteps {
    /// The destination's lake (reads only: list, head, get).
    pub lake: Arc<dyn Lake>,
    /// Names the lake in the pool's keys (endpoint + container, as datasets do), so a
    /// blob cached for a dataset and for a checkpoint is one file.
    pub lake_id: String,
    /// The destination prefix (`""` or ending in `/`).
    pub prefix: String,
    pub pool: CachePool,
    /// Lake calls and fetches run here (FUSE workers are plain threads).
    pub rt: tokio::runtime::Handle,
    /// Least time between two listings of the manifests. 5 s: a step another node
    /// made durable shows within seconds, and a training loop that lists the volume
    /// every step costs one LIST per 5 s at most.
    pub refresh: Duration,
    /// Longest a FUSE request waits for a listing (the lake unreachable answers within
    /// the retry deadline, a minute: far too long for `ls`). 2 s.
    pub wait: Duration,
}

impl LakeSteps {
    /// The lake steps of destination `url`, read through `pool` on runtime `rt`.
    pub fn new(
        lake: Arc<dyn Lake>,
        url: &LakeUrl,
        pool: CachePool,
        rt: tokio::runtime::Handle,
    ) -> Self {
        LakeSteps {
            lake,
            lake_id: format!("{}{}", url.endpoint, url.container),
            prefix: url.prefix.clone(),
            pool,
            rt,
            refresh: Duration::from_secs(5),
            wait: Duration::from_secs(2),
        }
    }
}

/// One remote step as listed.
struct Step {
    name: String,
    slot: u32,
    manifest_etag: ETag,
    mtime: SystemTime,
    /// Its manifest's tree, read at first use (held locked while it is read).
    tree: Mutex<Option<Arc<StepTree>>>,
    /// Files whose object matched the manifest at a HEAD: index → the ETag reads pin.
    verified: Mutex<HashMap<u32, ETag>>,
}

/// A step's entries as its manifest lists them.
struct StepTree {
    nodes: Vec<RNode>,
}

struct RNode {
    name: String,
    kind: RKind,
}

enum RKind {
    /// Children's indexes, sorted by name.
    Dir(Vec<u32>),
    File {
        path: String,
        size: u64,
        md5: [u8; 16],
    },
}

#[derive(Default)]
struct Listing {
    by_name: BTreeMap<String, Arc<Step>>,
    by_slot: HashMap<u32, Arc<Step>>,
    retired: VecDeque<u32>,
    /// The last listing failed (logged once per streak).
    failing: bool,
}

/// How old the step list may be when it lacks a version this node knows is durable,
/// after the first listing made for it.
const MISSED_VERSION_REFRESH: Duration = Duration::from_secs(1);

#[derive(Default)]
struct RefreshState {
    started: u64,
    done: u64,
    last: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Stream {
    next: u64,
    window: u64,
    used: u64,
}

/// Open files: node id → (blob, `None` for an empty file; opens).
type OpenFiles = HashMap<u64, (Option<Arc<CachedBlob>>, u32)>;

struct Inner {
    cfg: LakeSteps,
    names: Layout,
    uid: u32,
    gid: u32,
    ttl: Duration,
    listing: RwLock<Listing>,
    refresh: Mutex<RefreshState>,
    refreshed: Condvar,
    /// Durable versions (step, manifest ETag) a listing lacked once already.
    missed: Mutex<std::collections::HashSet<(OsString, ETag)>>,
    open: Mutex<OpenFiles>,
    streams: Mutex<HashMap<(u64, u32), Stream>>,
    tick: AtomicU64,
    /// To make the kernel forget a step that left the list (its cached entry would
    /// otherwise answer for up to the entry TTL).
    conn: OnceLock<Connection>,
}

/// The remote half of a checkpoint volume (see the module docs).
pub struct RemoteSteps {
    inner: Arc<Inner>,
}

/// A checked manifest path: plain names joined by `/`.
fn components(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').collect();
    parts
        .iter()
        .all(|c| !c.is_empty() && *c != "." && *c != ".." && !c.contains('\0'))
        .then_some(parts)
}

/// The slot a step's manifest version prefers (31 bits, never 0).
fn preferred_slot(step: &str, etag: &ETag) -> u32 {
    let k = blob_key("checkpoint-step", step, &etag.0);
    let n = u32::from_str_radix(&k[..8], 16).unwrap_or(1) & 0x7fff_ffff;
    n.max(1)
}

impl StepTree {
    /// Builds the tree of `objects` (path, size, MD5) in path order; refuses a path
    /// that leaves the step, a duplicate, or a file that is also a directory.
    fn build(mut objects: Vec<(String, u64, [u8; 16])>) -> Result<StepTree, String> {
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        let mut nodes = vec![RNode {
            name: String::new(),
            kind: RKind::Dir(Vec::new()),
        }];
        let mut dirs: HashMap<String, u32> = HashMap::from([(String::new(), 0)]);
        let mut files: HashSet<String> = HashSet::new();
        if objects.len() as u64 >= INDEX_MASK {
            return Err(format!(
                "{} objects are more than a step can show",
                objects.len()
            ));
        }
        for (path, size, md5) in objects {
            let comps =
                components(&path).ok_or_else(|| format!("object path {path:?} leaves the step"))?;
            let mut parent = 0u32;
            let mut prefix = String::new();
            for c in &comps[..comps.len() - 1] {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(c);
                parent = match dirs.get(&prefix) {
                    Some(&d) => d,
                    None => {
                        if files.contains(&prefix) {
                            return Err(format!("{prefix:?} is both a file and a directory"));
                        }
                        let d = nodes.len() as u32;
                        nodes.push(RNode {
                            name: (*c).to_owned(),
                            kind: RKind::Dir(Vec::new()),
                        });
                        if let RKind::Dir(ch) = &mut nodes[parent as usize].kind {
                            ch.push(d);
                        }
                        dirs.insert(prefix.clone(), d);
                        d
                    }
                };
            }
            if dirs.contains_key(&path) || !files.insert(path.clone()) {
                return Err(format!("{path:?} is listed twice"));
            }
            let f = nodes.len() as u32;
            nodes.push(RNode {
                name: comps[comps.len() - 1].to_owned(),
                kind: RKind::File { path, size, md5 },
            });
            if let RKind::Dir(ch) = &mut nodes[parent as usize].kind {
                ch.push(f);
            }
        }
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        for n in &mut nodes {
            if let RKind::Dir(ch) = &mut n.kind {
                ch.sort_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
            }
        }
        Ok(StepTree { nodes })
    }

    fn child(&self, dir: u32, name: &str) -> Option<u32> {
        let RKind::Dir(ch) = &self.nodes.get(dir as usize)?.kind else {
            return None;
        };
        ch.binary_search_by(|i| self.nodes[*i as usize].name.as_str().cmp(name))
            .ok()
            .map(|p| ch[p])
    }
}

fn io_errno(what: &str, e: impl std::fmt::Display) -> Errno {
    tracing::error!(error = %e, "{what}; returning EIO");
    libc::EIO
}

impl RemoteSteps {
    /// Starts the first listing in the background (the first root listing waits for
    /// it, up to [`LakeSteps::wait`]). Entries are owned by `uid`/`gid` (the volume
    /// root's owner) and cached by the kernel for `ttl`.
    pub fn new(cfg: LakeSteps, uid: u32, gid: u32, ttl: Duration) -> Self {
        let r = RemoteSteps {
            inner: Arc::new(Inner {
                names: Layout::new(&cfg.prefix),
                cfg,
                uid,
                gid,
                ttl,
                listing: RwLock::new(Listing::default()),
                refresh: Mutex::new(RefreshState::default()),
                refreshed: Condvar::new(),
                missed: Mutex::new(std::collections::HashSet::new()),
                open: Mutex::new(HashMap::new()),
                streams: Mutex::new(HashMap::new()),
                tick: AtomicU64::new(0),
                conn: OnceLock::new(),
            }),
        };
        r.start_refresh(Duration::ZERO);
        r
    }

    /// Starts a listing unless one is running or the last started less than
    /// `max_age` ago; returns the generation to wait for, if any.
    fn start_refresh(&self, max_age: Duration) -> Option<u64> {
        let mut st = self.inner.refresh.lock();
        if st.started > st.done {
            return Some(st.started);
        }
        if st.last.is_some_and(|t| t.elapsed() < max_age) {
            return None;
        }
        st.started += 1;
        st.last = Some(Instant::now());
        let generation = st.started;
        let inner = self.inner.clone();
        self.inner.cfg.rt.spawn(async move {
            let r = inner.list().await;
            let gone = inner.apply(r);
            inner.refresh.lock().done = generation;
            inner.refreshed.notify_all();
            // After the waiters are released: a root LOOKUP waiting for this listing
            // holds the root's lock, which the kernel takes to drop an entry.
            if let Some(conn) = inner.conn.get().cloned()
                && !gone.is_empty()
            {
                tokio::task::spawn_blocking(move || {
                    for name in gone {
                        let _ = conn.inval_entry(1, OsStr::new(&name));
                    }
                });
            }
        });
        Some(generation)
    }

    /// The volume's FUSE connection (for entry invalidations).
    pub fn connected(&self, conn: &Connection) {
        let _ = self.inner.conn.set(conn.clone());
    }

    /// Lists the lake's steps again if the list is older than `refresh`, waiting at
    /// most `wait` for the answer.
    pub fn refresh_if_stale(&self) {
        self.refresh_if_older_than(self.inner.cfg.refresh);
    }

    /// Lists the lake's steps again if the list is older than `max_age`, waiting at
    /// most `wait` for the answer: for a version this node knows is durable and the
    /// list does not show yet (listed just before it was published), sooner than
    /// `refresh`.
    pub fn refresh_if_older_than(&self, max_age: Duration) {
        let Some(target) = self.start_refresh(max_age) else {
            return;
        };
        let deadline = Instant::now() + self.inner.cfg.wait;
        let mut st = self.inner.refresh.lock();
        while st.done < target {
            if self
                .inner
                .refreshed
                .wait_until(&mut st, deadline)
                .timed_out()
            {
                tracing::debug!("the lake's step listing is slow; showing the last one");
                break;
            }
        }
    }

    /// The step and index of `id`. A slot not known yet (a restarted server asked
    /// before its first listing landed) waits for the listing once.
    fn resolve(&self, id: u64) -> Result<(Arc<Step>, u32), Errno> {
        self.inner.resolve(id).or_else(|_| {
            self.refresh_if_stale();
            self.inner.resolve(id)
        })
    }

    /// The listed steps with their node ids, in name order.
    pub fn steps(&self) -> Vec<(OsString, u64)> {
        self.inner
            .listing
            .read()
            .by_name
            .values()
            .map(|s| (OsString::from(&s.name), Inner::id(s.slot, 0)))
            .collect()
    }

    /// Whether `name` is a listed remote step.
    pub fn is_step(&self, name: &OsStr) -> bool {
        name.to_str()
            .is_some_and(|n| self.inner.listing.read().by_name.contains_key(n))
    }

    /// The root entry of step `name`, if listed (no refresh).
    pub fn lookup_step(&self, name: &OsStr) -> Option<EntryOut> {
        let step = self
            .inner
            .listing
            .read()
            .by_name
            .get(name.to_str()?)
            .cloned()?;
        Some(
            self.inner
                .entry_out(Inner::id(step.slot, 0), FileKind::Dir, 0, step.mtime),
        )
    }

    /// The root id of step `name` when the listed manifest is version `etag`.
    pub fn step_of_version(&self, name: &OsStr, etag: &ETag) -> Option<u64> {
        let listing = self.inner.listing.read();
        let step = listing.by_name.get(name.to_str()?)?;
        (step.manifest_etag == *etag).then(|| Inner::id(step.slot, 0))
    }

    /// [`Self::step_of_version`] for a version known to be in the lake (this node
    /// recorded it durable): the first time the list lacks it, the lake is listed anew
    /// (a listing started after this call, so it shows the manifest); after that at most
    /// once a second, waiting at most `wait` each time.
    pub fn step_of_durable_version(&self, name: &OsStr, etag: &ETag) -> Option<u64> {
        if let Some(id) = self.step_of_version(name, etag) {
            return Some(id);
        }
        let first = {
            let mut missed = self.inner.missed.lock();
            if missed.len() > 1024 {
                missed.clear();
            }
            missed.insert((name.to_owned(), etag.clone()))
        };
        if first {
            // A listing already under way may have started before the manifest was
            // there: wait for it, then for one of our own.
            for _ in 0..2 {
                self.refresh_if_older_than(Duration::ZERO);
                if let Some(id) = self.step_of_version(name, etag) {
                    return Some(id);
                }
            }
            return None;
        }
        self.refresh_if_older_than(MISSED_VERSION_REFRESH);
        self.step_of_version(name, etag)
    }

    /// The entry at `rel` (a path inside the step) under the step root `root`; the
    /// root's own entry for an empty `rel`.
    pub fn lookup_rel(&self, root: u64, rel: &std::path::Path) -> Result<EntryOut, Errno> {
        let mut e = self.getattr(root).map(|a| EntryOut {
            nodeid: root,
            attr: a.attr,
            generation: 0,
            entry_ttl: a.ttl,
            attr_ttl: a.ttl,
        })?;
        for c in rel.components() {
            let std::path::Component::Normal(name) = c else {
                return Err(libc::ENOENT);
            };
            e = self.lookup(e.nodeid, name)?;
        }
        Ok(e)
    }

    /// The entries of directory `id`: name, node id and kind, in name order.
    pub fn children(&self, id: u64) -> Result<Vec<(OsString, u64, FileKind)>, Errno> {
        let (step, idx) = self.resolve(id)?;
        let tree = self.inner.tree(&step)?;
        let Some(RKind::Dir(children)) = tree.nodes.get(idx as usize).map(|n| &n.kind) else {
            return Err(libc::ENOTDIR);
        };
        Ok(children
            .iter()
            .map(|&c| {
                let n = &tree.nodes[c as usize];
                let kind = match n.kind {
                    RKind::Dir(_) => FileKind::Dir,
                    RKind::File { .. } => FileKind::File,
                };
                (OsString::from(&n.name), Inner::id(step.slot, c), kind)
            })
            .collect())
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<EntryOut, Errno> {
        let (step, idx) = self.resolve(parent)?;
        let tree = self.inner.tree(&step)?;
        let name = name.to_str().ok_or(libc::ENOENT)?;
        let child = tree.child(idx, name).ok_or(libc::ENOENT)?;
        Ok(self.inner.entry_of(&step, &tree, child))
    }

    pub fn getattr(&self, id: u64) -> Result<AttrOut, Errno> {
        let (step, idx) = self.resolve(id)?;
        let e = if idx == 0 {
            self.inner.entry_out(id, FileKind::Dir, 0, step.mtime)
        } else {
            let tree = self.inner.tree(&step)?;
            self.inner.entry_of(&step, &tree, idx)
        };
        Ok(AttrOut {
            attr: e.attr,
            ttl: e.attr_ttl,
        })
    }

    pub fn open(&self, id: u64, flags: u32) -> Result<OpenOut, Errno> {
        let f = flags as i32;
        if f & libc::O_ACCMODE != libc::O_RDONLY || f & (libc::O_TRUNC | libc::O_CREAT) != 0 {
            return Err(libc::EROFS);
        }
        let blob = self.inner.blob(id)?;
        if let Some(b) = &blob {
            let cfg = self.inner.cfg.pool.config();
            if b.size <= cfg.small_file_threshold && !b.residency().is_complete() {
                // Small files are fetched whole at open: the first read needs them all.
                let _rt = self.inner.cfg.rt.enter();
                b.prefetch(0..b.residency().blocks());
            }
        }
        let mut open = self.inner.open.lock();
        let e = open.entry(id).or_insert((None, 0));
        if e.0.is_none() {
            e.0 = blob;
        }
        e.1 += 1;
        Ok(OpenOut {
            fh: id,
            // The entry's content never changes under this id: keep the kernel's pages.
            flags: fopen::KEEP_CACHE | fopen::NOFLUSH,
            backing_id: 0,
        })
    }

    pub fn release(&self, req: &Request, id: u64) {
        self.inner.streams.lock().remove(&(id, req.pid));
        let mut open = self.inner.open.lock();
        if let Some(e) = open.get_mut(&id) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                open.remove(&id);
            }
        }
    }

    pub fn read(&self, req: &Request, id: u64, offset: u64, size: u32, reply: ReplyData) {
        let held = self.inner.open.lock().get(&id).map(|e| e.0.clone());
        let blob = match held {
            Some(b) => b,
            // Opened before this process started serving (a restarted agent).
            None => match self.inner.blob(id) {
                Ok(b) => b,
                Err(e) => return reply.error(e),
            },
        };
        let Some(blob) = blob else {
            // An empty file.
            return reply.data(&[]);
        };
        if blob.md5_mismatch() {
            tracing::error!(blob = %blob.blob, "the cached copy does not match the step's manifest (fetched twice); returning EIO");
            return reply.error(libc::EIO);
        }
        if let Some((from, to)) = self.inner.readahead(id, req.pid, offset, size as u64) {
            let _rt = self.inner.cfg.rt.enter();
            blob.prefetch(blob.blocks_for(from..to));
        }
        if blob.is_ready(blob.blocks_for(offset..offset + size as u64)) {
            match blob.read_resident(offset, size as usize) {
                Ok(buf) => return reply.data(&buf),
                Err(CacheError::Refetch) => {}
                Err(e) => {
                    tracing::error!(blob = %blob.blob, error = %e, "read failed; returning EIO");
                    return reply.error(libc::EIO);
                }
            }
        }
        self.inner.cfg.rt.spawn(async move {
            match blob.read(offset, size as usize).await {
                Ok(buf) => reply.data(&buf),
                Err(e) => {
                    tracing::error!(blob = %blob.blob, offset, error = %e, "read of a lake-backed checkpoint file failed; returning EIO");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    pub fn opendir(&self, id: u64) -> Result<OpenOut, Errno> {
        let (step, idx) = self.resolve(id)?;
        let tree = self.inner.tree(&step)?;
        match tree.nodes.get(idx as usize).map(|n| &n.kind) {
            Some(RKind::Dir(_)) => Ok(OpenOut {
                fh: id,
                flags: fopen::KEEP_CACHE | fopen::CACHE_DIR,
                backing_id: 0,
            }),
            Some(RKind::File { .. }) => Err(libc::ENOTDIR),
            None => Err(libc::ESTALE),
        }
    }

    /// Lists directory `id` from `offset` (cookies: child position + 1).
    pub fn readdir(&self, id: u64, offset: u64, out: &mut DirBuf) -> Result<(), Errno> {
        let (step, idx) = self.resolve(id)?;
        let tree = self.inner.tree(&step)?;
        let Some(RKind::Dir(children)) = tree.nodes.get(idx as usize).map(|n| &n.kind) else {
            return Err(libc::ENOTDIR);
        };
        // Cookies: 1 after ".", 2 after "..", then a child's position + 3. The inode
        // number of ".." is the directory's own (for display only: the kernel resolves
        // ".." itself).
        let me = Inner::id(step.slot, idx);
        for (cookie, name) in [(1u64, "."), (2, "..")] {
            if offset < cookie && !out.add(me, cookie, FileKind::Dir, OsStr::new(name), None) {
                return Ok(());
            }
        }
        for (pos, &c) in children
            .iter()
            .enumerate()
            .skip(offset.saturating_sub(2) as usize)
        {
            let n = &tree.nodes[c as usize];
            let kind = match n.kind {
                RKind::Dir(_) => FileKind::Dir,
                RKind::File { .. } => FileKind::File,
            };
            if !out.add(
                Inner::id(step.slot, c),
                pos as u64 + 3,
                kind,
                OsStr::new(&n.name),
                None,
            ) {
                break;
            }
        }
        Ok(())
    }
}

impl Inner {
    fn id(slot: u32, idx: u32) -> u64 {
        REMOTE | (slot as u64) << SLOT_SHIFT | idx as u64
    }

    /// Runs `f` on the runtime and waits for it from this (non-runtime) thread.
    fn block<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, Errno> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.cfg.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| libc::EIO)
    }

    async fn list(&self) -> Result<Vec<(String, ETag, SystemTime)>, LakeError> {
        let mut out = Vec::new();
        let mut l = Lister::new(&*self.cfg.lake, &self.names.manifests());
        while let Some(page) = l.next_page().await? {
            for o in page {
                match self.names.step_of_manifest(&o.name) {
                    // Empty: withdrawn, not durable (a node is uploading a new version).
                    Some(s) if valid_step_name(s) && o.size > 0 => {
                        out.push((s.to_owned(), o.etag, o.last_modified))
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Takes a listing in; returns the names of steps that left it.
    fn apply(&self, r: Result<Vec<(String, ETag, SystemTime)>, LakeError>) -> Vec<String> {
        let mut l = self.listing.write();
        let found = match r {
            Ok(f) => f,
            Err(e) => {
                if !l.failing {
                    tracing::warn!(error = %e, prefix = %self.cfg.prefix, "cannot list the checkpoint steps in the lake; the volume shows the last list until it can");
                }
                l.failing = true;
                return Vec::new();
            }
        };
        if l.failing {
            tracing::info!(prefix = %self.cfg.prefix, "listing the checkpoint steps in the lake works again");
        }
        l.failing = false;
        let mut by_name = BTreeMap::new();
        for (name, etag, mtime) in found {
            if let Some(s) = l.by_name.get(&name)
                && s.manifest_etag == etag
            {
                by_name.insert(name, s.clone());
                continue;
            }
            let mut slot = preferred_slot(&name, &etag);
            while l.by_slot.contains_key(&slot) {
                slot = (slot % 0x7fff_ffff) + 1;
            }
            let step = Arc::new(Step {
                name: name.clone(),
                slot,
                manifest_etag: etag,
                mtime,
                tree: Mutex::new(None),
                verified: Mutex::new(HashMap::new()),
            });
            l.by_slot.insert(slot, step.clone());
            by_name.insert(name, step);
        }
        let gone: Vec<u32> = l
            .by_name
            .values()
            .filter(|s| by_name.get(&s.name).is_none_or(|n| n.slot != s.slot))
            .map(|s| s.slot)
            .collect();
        let mut names = Vec::new();
        for slot in gone {
            let name = l.by_slot[&slot].name.clone();
            tracing::info!(step = %name, "a checkpoint step left the lake's list (deleted, or written again)");
            l.retired.push_back(slot);
            names.push(name);
        }
        while l.retired.len() > RETIRED {
            if let Some(s) = l.retired.pop_front() {
                l.by_slot.remove(&s);
            }
        }
        l.by_name = by_name;
        names
    }

    fn resolve(&self, id: u64) -> Result<(Arc<Step>, u32), Errno> {
        let slot = ((id & !REMOTE) >> SLOT_SHIFT) as u32;
        let step = self
            .listing
            .read()
            .by_slot
            .get(&slot)
            .cloned()
            .ok_or(libc::ESTALE)?;
        Ok((step, (id & INDEX_MASK) as u32))
    }

    /// The step's tree, read from its manifest at first use.
    fn tree(&self, step: &Arc<Step>) -> Result<Arc<StepTree>, Errno> {
        let mut t = step.tree.lock();
        if let Some(t) = &*t {
            return Ok(t.clone());
        }
        let lake = self.cfg.lake.clone();
        let name = self.names.manifest(&step.name);
        let etag = step.manifest_etag.clone();
        let doc = self
            .block(async move {
                let meta = lake.head(&name).await?;
                if meta.etag != etag {
                    return Err(LakeError::Changed {
                        name,
                        expected: etag,
                    });
                }
                let mut body = lake.get_stream(&name, 0..meta.size, &etag).await?;
                let mut doc = Vec::with_capacity(meta.size as usize);
                while let Some(c) = body.next().await {
                    doc.extend_from_slice(&c?);
                }
                Ok(doc)
            })?
            .map_err(|e| io_errno(&format!("reading the manifest of {}", step.name), e))?;
        let mut objects = Vec::new();
        let head = read_manifest(&doc[..], |o| {
            let md5 = parse_md5_hex(&o.md5).ok_or_else(|| {
                std::io::Error::other(format!("{}: MD5 {:?} is not 32 hex digits", o.path, o.md5))
            })?;
            objects.push((o.path, o.size, md5));
            Ok(())
        })
        .map_err(|e| io_errno(&format!("the manifest of {} is unreadable", step.name), e))?;
        if head.step != step.name {
            return Err(io_errno(
                &format!("the manifest of {} names step {:?}", step.name, head.step),
                "refusing it",
            ));
        }
        let built = StepTree::build(objects)
            .map_err(|e| io_errno(&format!("the manifest of {}", step.name), e))?;
        let built = Arc::new(built);
        *t = Some(built.clone());
        Ok(built)
    }

    fn attr(&self, id: u64, kind: FileKind, size: u64, mtime: SystemTime) -> Attr {
        let t = Timespec::from_system(mtime);
        Attr {
            ino: id,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            kind,
            perm: if kind == FileKind::Dir { 0o555 } else { 0o444 },
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            blksize: 128 * 1024,
        }
    }

    fn entry_out(&self, id: u64, kind: FileKind, size: u64, mtime: SystemTime) -> EntryOut {
        let ttl = Ttl::from(self.ttl);
        EntryOut {
            nodeid: id,
            attr: self.attr(id, kind, size, mtime),
            generation: 0,
            entry_ttl: ttl,
            attr_ttl: ttl,
        }
    }

    fn entry_of(&self, step: &Step, tree: &StepTree, idx: u32) -> EntryOut {
        let (kind, size) = match &tree.nodes[idx as usize].kind {
            RKind::Dir(_) => (FileKind::Dir, 0),
            RKind::File { size, .. } => (FileKind::File, *size),
        };
        self.entry_out(Self::id(step.slot, idx), kind, size, step.mtime)
    }

    /// The cached blob of file `id`, its object checked against the manifest at the
    /// first open (`None`: an empty file, nothing to fetch).
    fn blob(&self, id: u64) -> Result<Option<Arc<CachedBlob>>, Errno> {
        let (step, idx) = self.resolve(id)?;
        let tree = self.tree(&step)?;
        let (path, size, md5) = match &tree.nodes.get(idx as usize).ok_or(libc::ESTALE)?.kind {
            RKind::Dir(_) => return Err(libc::EISDIR),
            RKind::File { path, size, md5 } => (path.clone(), *size, *md5),
        };
        if size == 0 {
            return Ok(None);
        }
        let name = self.names.object(&step.name, &path);
        let known = step.verified.lock().get(&idx).cloned();
        let etag = match known {
            Some(e) => e,
            None => {
                let lake = self.cfg.lake.clone();
                let n = name.clone();
                let meta = self
                    .block(async move { lake.head(&n).await })?
                    .map_err(|e| io_errno(&format!("{} of step {}", path, step.name), e))?;
                if meta.size != size || meta.content_md5 != Some(md5) {
                    tracing::error!(
                        blob = %name,
                        size = meta.size,
                        manifest_size = size,
                        content_md5 = %meta.content_md5.map(|m| hex(&m)).unwrap_or_else(|| "none".into()),
                        manifest_md5 = %hex(&md5),
                        "the object changed in the lake since the step's manifest was written; refusing to serve it (EIO)"
                    );
                    return Err(libc::EIO);
                }
                step.verified.lock().insert(idx, meta.etag.clone());
                meta.etag
            }
        };
        let entry = Entry {
            ino: 0,
            parent: 0,
            kind: Kind::File,
            name: String::new(),
            blob: name,
            size,
            etag,
            mtime: step.mtime,
            // The manifest's MD5, not the lake's: the pool checks the bytes against it.
            md5: Some(md5),
        };
        self.cfg
            .pool
            .blob(&self.cfg.lake_id, &self.cfg.lake, &entry)
            .map(Some)
            .map_err(|e| io_errno(&format!("opening {} in the cache", entry.blob), e))
    }

    /// Sequential detection for a read of `id` by `pid`: the readahead range to start
    /// if the read continues where this reader's last one ended (as datasets do).
    fn readahead(&self, id: u64, pid: u32, offset: u64, size: u64) -> Option<(u64, u64)> {
        let cfg = self.cfg.pool.config();
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut streams = self.streams.lock();
        if streams.len() >= MAX_STREAMS
            && !streams.contains_key(&(id, pid))
            && let Some(k) = streams.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k)
        {
            streams.remove(&k);
        }
        let s = streams.entry((id, pid)).or_insert(Stream {
            next: u64::MAX,
            window: 2 * cfg.block_size,
            used: tick,
        });
        let sequential = s.next != u64::MAX
            && offset + cfg.block_size > s.next
            && offset <= s.next + cfg.block_size;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(p: &str, size: u64) -> (String, u64, [u8; 16]) {
        (p.to_owned(), size, [0; 16])
    }

    #[test]
    fn a_manifest_becomes_a_tree_in_path_order() {
        let t = StepTree::build(vec![
            obj("model/b.pt", 2),
            obj(".metadata", 1),
            obj("model/a.pt", 3),
            obj("optim/x/state", 4),
        ])
        .unwrap();
        let model = t.child(0, "model").unwrap();
        let a = t.child(model, "a.pt").unwrap();
        assert!(matches!(
            t.nodes[a as usize].kind,
            RKind::File { size: 3, .. }
        ));
        let x = t.child(t.child(0, "optim").unwrap(), "x").unwrap();
        assert!(t.child(x, "state").is_some());
        assert!(t.child(0, "a.pt").is_none());
        // The same manifest in another order gives the same indexes (ids survive a
        // restart of the server).
        let again = StepTree::build(vec![
            obj("optim/x/state", 4),
            obj("model/a.pt", 3),
            obj(".metadata", 1),
            obj("model/b.pt", 2),
        ])
        .unwrap();
        assert_eq!(
            again.child(again.child(0, "model").unwrap(), "a.pt"),
            Some(a)
        );
    }

    #[test]
    fn manifests_that_leave_the_step_or_contradict_themselves_are_refused() {
        for bad in [
            vec![obj("../x", 1)],
            vec![obj("/etc/passwd", 1)],
            vec![obj("a//b", 1)],
            vec![obj("a", 1), obj("a/b", 1)],
            vec![obj("a", 1), obj("a", 2)],
        ] {
            assert!(StepTree::build(bad).is_err());
        }
    }

    #[test]
    fn ids_are_remote_and_carry_slot_and_index() {
        let id = Inner::id(0x7fff_ffff, 7);
        assert!(is_remote(id));
        assert!(!is_remote(2) && !is_remote(1 << 40));
        assert_eq!(id & INDEX_MASK, 7);
        let s = preferred_slot("step-1", &ETag("\"0x1\"".into()));
        assert!(s > 0 && s <= 0x7fff_ffff);
        assert_eq!(s, preferred_slot("step-1", &ETag("\"0x1\"".into())));
        assert_ne!(s, preferred_slot("step-1", &ETag("\"0x2\"".into())));
        assert_eq!(parse_md5_hex(&hex(&[0xab; 16])), Some([0xab; 16]));
    }
}
