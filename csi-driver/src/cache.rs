//! The node-local cache pool: blob data on NVMe, shared by every dataset and mount of
//! the node.
//!
//! On-disk layout under `--cache-dir` (format `v1`, survives restarts and reboots):
//!
//! ```text
//! v1/FORMAT                         "tidepool cache v1"
//! v1/index.redb                     LRU index: cached files, their size and last use
//! v1/blobs/<k[..2]>/<k>.data        sparse copy of one blob version
//! v1/blobs/<k[..2]>/<k>.map         its residency map (see residency.rs)
//! v1/datasets/<d>/snapshots/<n>.redb  snapshots of a dataset (see snapshot.rs)
//! v1/datasets/<d>/current           sequence number of the current snapshot
//! ```
//!
//! `k` is a digest of (lake, blob name, ETag): one file per blob *version*, so a new
//! version never overwrites bytes an open file still reads, and equal versions are
//! shared by every dataset and snapshot that lists them.
//!
//! Capacity: `used` counts resident bytes. When it passes the high watermark (90% of
//! `--cache-size`) the evictor deletes whole files, least recently opened first, down to
//! the low watermark (80%), never touching a file that is open. If the open files alone
//! overflow the pool (a file larger than it), blocks are shed from the largest open
//! files, those behind their reader first (see `CachedBlob::shed_blocks`). The most recently opened
//! files (`max_open_blobs`) stay open after their last reader closes them, so the next
//! epoch of a training job opens them without touching the disk's metadata; the evictor
//! closes such an idle file before deleting it. The LRU index is
//! updated in batches (an open or a landed block is a memory update; a background task
//! commits them every second), so a warm read never waits for the index.

pub mod blob;
pub mod dataset;
mod open_table;
pub mod peers;
mod read_buffer;
pub mod residency;
pub mod snapshot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};

use crate::lake::{Lake, LakeError};
use blob::CachedBlob;
use snapshot::Entry;

const FORMAT: &str = "tidepool cache v1\n";
/// The longest the index goes without a durable commit.
const DURABLE_EVERY: Duration = Duration::from_secs(5);
/// The longest a landing block waits for the evictor when the pool is full.
const ROOM_WAIT: Duration = Duration::from_secs(2);
const FILES: TableDefinition<&str, (u64, u64)> = TableDefinition::new("files");
const LRU: TableDefinition<(u64, &str), ()> = TableDefinition::new("lru");
/// Pins: (blob key, pin id) and the reverse (pin id, blob key). A pinned file is never
/// evicted; a pin id is a pinned dataset (a blob can be in several).
const PINNED: TableDefinition<(&str, &str), ()> = TableDefinition::new("pinned");
const PINS: TableDefinition<(&str, &str), ()> = TableDefinition::new("pins");

#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Capacity of the pool in bytes (`--cache-size`).
    pub capacity: u64,
    /// Residency granularity and ranged-GET size. 4 MiB: large enough that a GET's
    /// latency to a far region is amortised (at 20 ms RTT and 100 MB/s per stream a
    /// 4 MiB GET spends ~80% of its time moving data), small enough that a random read
    /// does not drag in much more than it needs.
    pub block_size: u64,
    /// Files up to this size are fetched whole when opened.
    pub small_file_threshold: u64,
    /// Largest ranged GET: consecutive missing blocks (sequential readahead, whole small
    /// files) are fetched by one GET of up to this many bytes, streamed block by block.
    /// 8 MiB: fewer, larger requests amortise a far region's round trip.
    pub get_size: u64,
    /// Ranged GETs in flight across the pool. Each holds at most two blocks, so fetch
    /// memory is bounded by this × 2 × block size (128 MiB by default).
    pub max_fetches: usize,
    /// Largest sequential readahead window, in bytes.
    pub max_readahead: u64,
    /// Blocks fetched for a reader are held in memory until it has read them, up to
    /// this many bytes pool-wide (see read_buffer.rs). 256 MiB: two readers' full
    /// readahead windows; past it the oldest are dropped and read from disk instead.
    pub read_buffer: u64,
    /// Write whole blocks to cache files with direct I/O (`O_DIRECT`): they reach the
    /// NVMe without a second copy in the page cache (the reader's FUSE pages are the
    /// one copy in RAM). Falls back to buffered writes by itself where the file
    /// system refuses direct I/O.
    pub direct_io: bool,
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// Cached files kept open after their last reader closed them (one descriptor for
    /// a complete file, up to three while one is filled). Also capped by the process's
    /// open-file limit, counted in descriptors.
    pub max_open_blobs: usize,
    /// The running boot, which decides whether cached blocks need a check before they
    /// are served (see residency.rs). Read from the kernel; tests set it to simulate a
    /// reboot.
    pub boot: residency::BootId,
    /// How a dataset's listing is taken into its snapshot (`--list-parallelism`).
    pub listing: crate::lake::parallel::ListOptions,
    /// The reserve of the pool's file system the cache keeps free for others:
    /// checkpoint volumes, whose writes the kernel makes straight to their files (FUSE
    /// passthrough), with no round trip through us that could wait for the cache. When
    /// the free space (as an unprivileged writer may use it) falls under the reserve,
    /// the cache evicts until twice the reserve is free (or nothing it holds can go:
    /// open or pinned files). The free space is checked more often the closer it is to
    /// the reserve (see [`FREE_SPACE_CHECK_RATE`]); the reserve is what a writer may
    /// write between a check and the end of the eviction it starts. So a pool sized to
    /// its whole disk makes room ahead of a checkpoint writer instead of leaving it
    /// `ENOSPC`. Default: an eighth of the capacity, at most 1 GiB.
    pub free_space: u64,
}

/// How the free-space check is paced: it checks again before a writer this fast could
/// have used the free space above [`CacheConfig::free_space`] (every 5 ms at the most
/// often, every 500 ms at the least).
pub const FREE_SPACE_CHECK_RATE: u64 = 8 << 30;

impl CacheConfig {
    pub const DEFAULT_BLOCK: u64 = 4 << 20;

    /// Blocks per ranged GET (at least one).
    pub fn blocks_per_get(&self) -> u64 {
        (self.get_size / self.block_size.max(1)).max(1)
    }

    pub fn new(dir: impl Into<PathBuf>, capacity: u64) -> Self {
        CacheConfig {
            dir: dir.into(),
            capacity,
            block_size: Self::DEFAULT_BLOCK,
            small_file_threshold: 1 << 20,
            get_size: 8 << 20,
            max_fetches: 16,
            max_readahead: 128 << 20,
            read_buffer: 256 << 20,
            direct_io: true,
            high_watermark: 0.90,
            low_watermark: 0.80,
            max_open_blobs: 16384,
            boot: residency::current_boot(),
            listing: Default::default(),
            free_space: (capacity / 8).min(1 << 30),
        }
    }
}

/// Cache errors. Each message says everything once (what failed, on what, why) and
/// exposes no `source()` besides: logs print errors with `%e` and the CLI prints the
/// chain, and either way a cause must appear exactly once.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("cache index {path}: {detail}")]
    Index { path: PathBuf, detail: String },
    #[error("{blob}: {what}; the block was discarded")]
    Corrupt { blob: String, what: String },
    #[error(
        "cache directory {dir} holds format {found:?}, this tidepool reads v1; use another --cache-dir or delete that one"
    )]
    Format { dir: PathBuf, found: String },
    #[error(
        "cache directory {dir} is in use by another tidepool process; give each process its own --cache-dir (one agent per node serves every mount)"
    )]
    InUse { dir: PathBuf },
    #[error("a cached block failed verification and must be fetched again")]
    Refetch,
    #[error("internal error: {0}")]
    Internal(String),
}

impl CacheError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        CacheError::Io {
            path: path.to_owned(),
            cause: source,
        }
    }
}

/// Pool state shared with every cached blob.
#[derive(Debug)]
pub(crate) struct PoolShared {
    pub config: CacheConfig,
    pub fetches: Semaphore,
    used: AtomicU64,
    pending: Mutex<HashMap<String, PendingUse>>,
    /// Open blob versions, and claims of keys being opened or deleted (open_table.rs).
    open: open_table::OpenTable<CachedBlob>,
    idle: Mutex<IdleBlobs>,
    pressure: Arc<Notify>,
    /// Held by index commits and the start-up scan, so a file is never in neither
    /// `pending` nor the index while the scan looks for it.
    maintenance: Mutex<()>,
    /// When the index was last committed durably (see [`PoolShared::durability`]).
    last_durable: Mutex<Instant>,
    /// Eviction passes finished (see [`PoolShared::wait_for_room`]).
    evict_passes: AtomicU64,
    /// The last pass left the pool over its capacity: what it holds is open or pinned,
    /// and waiting for the evictor would only slow readers down.
    evict_stuck: AtomicBool,
    /// Bytes of the pool's directory that are not cache files: the checkpoint volumes'
    /// (never evicted here). They count against the capacity, so the cache makes room
    /// for them.
    external: AtomicU64,
    /// What the cache may hold by its file system's free space: resident bytes plus the
    /// free space less `config.free_space`, at the last check (`u64::MAX` before it).
    disk_room: AtomicU64,
    /// The file system's free space at the last check.
    disk_free: AtomicU64,
    /// The last check found the disk, not the capacity, limiting the cache (logged on
    /// each change).
    disk_limited: AtomicBool,
    index: Database,
    index_path: PathBuf,
    /// Bytes fetched from the lake since start (reports and tests).
    pub fetched: AtomicU64,
    /// Bytes fetched from other nodes since start.
    from_peers: AtomicU64,
    /// Bytes fetched per dataset id: from the lake, from peers.
    by_dataset: Mutex<HashMap<String, (u64, u64)>>,
    /// The cluster's other nodes, where blocks are asked for before the lake.
    peers: parking_lot::RwLock<Option<Arc<dyn peers::BlockPeers>>>,
    /// Bytes of files evicted since start.
    evicted: AtomicU64,
    /// Blocks fetched for readers and not yet read by them.
    pub(crate) read_buffer: read_buffer::ReadBuffer,
    /// Direct I/O for block writes: on until the file system refuses it once.
    pub(crate) direct_io: std::sync::atomic::AtomicBool,
    /// Numbers each opened `CachedBlob` (its key in the read buffer).
    pub(crate) next_blob_id: AtomicU64,
}

/// The most recently opened blobs, kept open (least recently opened dropped first).
#[derive(Debug, Default)]
struct IdleBlobs {
    cap: usize,
    /// Descriptors the idle files may hold between them (each counted as it was when
    /// last touched: a complete small file holds one, a file being filled up to three).
    fds: usize,
    held: usize,
    /// When `held` was last counted again from the files themselves.
    recounted: u64,
    tick: u64,
    by_key: HashMap<String, (Arc<CachedBlob>, u64, usize)>,
    order: std::collections::BTreeMap<u64, String>,
}

impl IdleBlobs {
    fn touch(&mut self, key: &str, blob: &Arc<CachedBlob>) {
        if self.cap == 0 {
            return;
        }
        self.tick += 1;
        let fds = blob.descriptors();
        if let Some((_, t, was)) = self
            .by_key
            .insert(key.to_owned(), (blob.clone(), self.tick, fds))
        {
            self.order.remove(&t);
            self.held -= was;
        }
        self.held += fds;
        self.order.insert(self.tick, key.to_owned());
        if self.held > self.fds && self.tick - self.recounted >= 1024 {
            // Files filled since they were counted hold fewer descriptors now.
            self.recounted = self.tick;
            self.held = 0;
            for (b, _, n) in self.by_key.values_mut() {
                *n = b.descriptors();
                self.held += *n;
            }
        }
        while self.by_key.len() > self.cap || self.held > self.fds {
            let Some((_, k)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, _, was)) = self.by_key.remove(&k) {
                self.held -= was;
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Arc<CachedBlob>> {
        let (b, t, was) = self.by_key.remove(key)?;
        self.order.remove(&t);
        self.held -= was;
        Some(b)
    }
}

/// Raises the soft open-file limit to the hard one (and, with the privilege to, the
/// hard one first to the kernel's `fs.nr_open`, at most 1,048,576: the idle-file cache
/// of a 10,000-file dataset alone needs 20,000 descriptors); returns the soft limit now.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one `rlimit` into `lim`, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    if lim.rlim_max < ceiling {
        let want = libc::rlimit {
            rlim_cur: ceiling,
            rlim_max: ceiling,
        };
        // SAFETY: setrlimit(2) only reads the `rlimit` it is given. Without
        // CAP_SYS_RESOURCE it fails with EPERM and nothing changes.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return ceiling;
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit(2) only reads the `rlimit` it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

#[derive(Debug, Default)]
struct PendingUse {
    bytes: i64,
    touched: Option<u64>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl PoolShared {
    /// What the cache files may use: the capacity less the bytes others hold in the
    /// pool (see `external`), and at most what the file system leaves (see
    /// [`CacheConfig::free_space`]).
    fn budget(&self) -> u64 {
        self.by_capacity()
            .min(self.disk_room.load(Ordering::Acquire))
    }

    /// The capacity less the bytes others hold in the pool.
    fn by_capacity(&self) -> u64 {
        self.config
            .capacity
            .saturating_sub(self.external.load(Ordering::Acquire))
    }

    /// Where eviction starts and where it stops: by the capacity, the high and low
    /// watermarks of it; by the disk, as soon as its free space is under the reserve
    /// ([`CacheConfig::free_space`]), down to twice the reserve free.
    fn watermarks(&self) -> (u64, u64) {
        let cap = self.by_capacity() as f64;
        let room = self.disk_room.load(Ordering::Acquire);
        (
            ((cap * self.config.high_watermark) as u64).min(room),
            ((cap * self.config.low_watermark) as u64)
                .min(room.saturating_sub(self.config.free_space)),
        )
    }

    /// Checks the pool's file system's free space: the cache's room on disk is what it
    /// holds plus the free space less [`CacheConfig::free_space`], and under that the
    /// evictor runs now. Returns when to check again: before a writer at
    /// [`FREE_SPACE_CHECK_RATE`] could have used the free space above the reserve.
    fn check_free_space(&self) -> Duration {
        let free = match fs_space(&self.config.dir) {
            Ok(s) if s.total > 0 => s.available,
            // No sizes to go by (ramfs): no limit from the disk.
            Ok(_) => {
                self.disk_room.store(u64::MAX, Ordering::Release);
                return Duration::from_millis(500);
            }
            Err(e) => {
                tracing::warn!(dir = %self.config.dir.display(), error = %e, "cannot read the cache pool's free space");
                return Duration::from_secs(1);
            }
        };
        let used = self.used.load(Ordering::Acquire);
        let room = used
            .saturating_add(free)
            .saturating_sub(self.config.free_space);
        self.disk_free.store(free, Ordering::Release);
        let before = self.disk_room.swap(room, Ordering::AcqRel);
        let limited = room < self.by_capacity();
        if self.disk_limited.swap(limited, Ordering::AcqRel) != limited {
            if limited {
                tracing::info!(dir = %self.config.dir.display(), free, keep_free = self.config.free_space, cache_room = room, "the cache pool's disk has less room than its capacity: the cache holds at most what leaves the reserved free space to others (checkpoint volumes)");
            } else {
                tracing::info!(dir = %self.config.dir.display(), free, "the cache pool's disk has room for the whole capacity again");
            }
        }
        // Evict now if over; but not again and again for nothing: after a pass that
        // could not make room (what the cache holds is open or pinned), only once the
        // disk's room shrank further.
        if used > self.watermarks().0
            && (!self.evict_stuck.load(Ordering::Acquire) || room < before)
        {
            self.pressure.notify_one();
        }
        let margin = free.saturating_sub(self.config.free_space);
        Duration::from_micros(margin / (FREE_SPACE_CHECK_RATE / 1_000_000))
            .clamp(Duration::from_millis(5), Duration::from_millis(500))
    }

    /// The cluster's other nodes, if this pool shares with them.
    pub(crate) fn peers(&self) -> Option<Arc<dyn peers::BlockPeers>> {
        self.peers.read().clone()
    }

    /// `n` bytes of dataset `id` came from a peer (`peer`) or from the lake.
    pub(crate) fn count_dataset(&self, id: &str, n: u64, peer: bool) {
        let mut m = self.by_dataset.lock();
        let e = m.entry(id.to_owned()).or_default();
        if peer {
            e.1 += n;
        } else {
            e.0 += n;
        }
    }

    pub(crate) fn block_landed(&self, key: &str, n: u64, from_peer: bool) {
        if from_peer {
            self.from_peers.fetch_add(n, Ordering::Relaxed);
        } else {
            self.fetched.fetch_add(n, Ordering::Relaxed);
        }
        let used = self.used.fetch_add(n, Ordering::AcqRel) + n;
        self.pending.lock().entry(key.to_owned()).or_default().bytes += n as i64;
        if used > self.watermarks().0 {
            self.pressure.notify_one();
        }
    }

    pub(crate) fn block_dropped(&self, key: &str, n: u64) {
        saturating_sub(&self.used, n);
        self.pending.lock().entry(key.to_owned()).or_default().bytes -= n as i64;
    }

    fn touch(&self, key: &str) {
        self.pending
            .lock()
            .entry(key.to_owned())
            .or_default()
            .touched = Some(now_secs());
    }

    fn index_err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError::Index {
            path: self.index_path.clone(),
            detail: e.to_string(),
        }
    }

    /// How an index commit is made: durable (fsync) at most every
    /// [`DURABLE_EVERY`] or when `force`d, otherwise not. The evictor commits many
    /// times a second under pressure, and an fsync stuck behind a busy disk held it up
    /// while fetches kept landing (the pool overshot its size by half). A crash loses
    /// at most the last seconds of index updates, which the pool's start puts right:
    /// blocks on disk the index missed are counted again (`reconcile`), and entries of
    /// files already deleted are evicted again harmlessly.
    fn durability(&self, force: bool) -> redb::Durability {
        let mut last = self.last_durable.lock();
        if force || last.elapsed() >= DURABLE_EVERY {
            *last = Instant::now();
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        }
    }

    /// Before a block of `n` bytes lands: while the pool is over its capacity (the
    /// evictor behind, on a stalled disk or a burst of fetches), waits for it, so the
    /// pool's disk use stays bounded. The block lands anyway once two eviction passes
    /// ended without making room (the files open right now are all the pool holds;
    /// they shed what they can) or after [`ROOM_WAIT`]: a reader never waits forever.
    /// No wait at all while the last pass found nothing it could free (everything
    /// open or pinned): each block would pay for passes that cannot help. Runs on a
    /// blocking thread.
    pub(crate) fn wait_for_room(&self, n: u64) {
        let full = |s: &Self| s.used.load(Ordering::Acquire) + n > s.budget();
        if !full(self) || self.evict_stuck.load(Ordering::Acquire) {
            return;
        }
        let passes = self.evict_passes.load(Ordering::Acquire);
        let end = Instant::now() + ROOM_WAIT;
        while full(self)
            && Instant::now() < end
            && self.evict_passes.load(Ordering::Acquire) < passes + 2
        {
            self.pressure.notify_one();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Commits batched index updates (durably now and then, see [`Self::durability`]).
    fn flush(&self) -> Result<(), CacheError> {
        self.flush_with(false)
    }

    fn flush_with(&self, durable: bool) -> Result<(), CacheError> {
        let _m = self.maintenance.lock();
        let batch: Vec<(String, PendingUse)> = self.pending.lock().drain().collect();
        if batch.is_empty() && !durable {
            return Ok(());
        }
        let mut tx = self.index.begin_write().map_err(|e| self.index_err(e))?;
        tx.set_durability(self.durability(durable))
            .map_err(|e| self.index_err(e))?;
        {
            let mut files = tx.open_table(FILES).map_err(|e| self.index_err(e))?;
            let mut lru = tx.open_table(LRU).map_err(|e| self.index_err(e))?;
            for (key, p) in batch {
                let old = files
                    .get(key.as_str())
                    .map_err(|e| self.index_err(e))?
                    .map(|v| v.value());
                let (bytes, atime) = old.unwrap_or((0, now_secs()));
                let bytes = (bytes as i64 + p.bytes).max(0) as u64;
                let new_atime = p.touched.unwrap_or(atime);
                if old.is_some() && new_atime != atime {
                    lru.remove((atime, key.as_str()))
                        .map_err(|e| self.index_err(e))?;
                }
                files
                    .insert(key.as_str(), (bytes, new_atime))
                    .map_err(|e| self.index_err(e))?;
                lru.insert((new_atime, key.as_str()), ())
                    .map_err(|e| self.index_err(e))?;
            }
        }
        tx.commit().map_err(|e| self.index_err(e))?;
        Ok(())
    }

    /// Brings the index in line with the residency maps on disk: blocks that landed
    /// after the last index commit before a crash (in files the index knows or not) are
    /// counted, so the evictor sees every byte on disk. Runs in the background at start,
    /// one `blobs/` subdirectory at a time (memory stays bounded however many files the
    /// pool holds; one small read per cached file). Returns the bytes corrected.
    fn reconcile(&self) -> Result<u64, CacheError> {
        let blobs = self.config.dir.join("v1/blobs");
        let mut found = 0u64;
        let Ok(subdirs) = std::fs::read_dir(&blobs) else {
            return Ok(0);
        };
        for sub in subdirs.flatten() {
            let keys: Vec<String> = match std::fs::read_dir(sub.path()) {
                Ok(rd) => rd
                    .flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".map")
                            .map(str::to_owned)
                    })
                    .collect(),
                Err(_) => continue,
            };
            let _m = self.maintenance.lock();
            let tx = self.index.begin_read().map_err(|e| self.index_err(e))?;
            let files = tx.open_table(FILES).map_err(|e| self.index_err(e))?;
            for key in keys {
                let indexed = files
                    .get(key.as_str())
                    .map_err(|e| self.index_err(e))?
                    .map(|v| v.value().0);
                // Claimed: a file being opened now is counted by its own landings.
                let Some(claim) = self.open.try_claim_closed(&key) else {
                    continue;
                };
                if self.pending.lock().contains_key(&key) {
                    continue;
                }
                let map = sub.path().join(format!("{key}.map"));
                let Ok(Some(on_disk)) = residency::resident_bytes_at(&map) else {
                    continue;
                };
                let delta = on_disk as i64 - indexed.unwrap_or(0) as i64;
                if delta == 0 {
                    continue;
                }
                let touched = match indexed {
                    Some(_) => None,
                    None => Some(
                        std::fs::metadata(&map)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map(|d| d.as_secs())
                            .unwrap_or_else(now_secs),
                    ),
                };
                if delta > 0 {
                    self.used.fetch_add(delta as u64, Ordering::AcqRel);
                } else {
                    saturating_sub(&self.used, delta.unsigned_abs());
                }
                self.pending.lock().insert(
                    key,
                    PendingUse {
                        bytes: delta,
                        touched,
                    },
                );
                drop(claim);
                found += delta.unsigned_abs();
            }
        }
        if found > 0 {
            tracing::info!(
                bytes = found,
                "cache index corrected from the files on disk (blocks that landed just before a crash)"
            );
        }
        Ok(found)
    }

    /// Evicts least recently used files that are not open until `used` is under the low
    /// watermark. Returns the bytes freed.
    fn evict(&self) -> Result<u64, CacheError> {
        let r = self.evict_pass();
        if let Ok(freed) = r {
            self.evicted.fetch_add(freed, Ordering::Relaxed);
        }
        self.evict_stuck.store(
            self.used.load(Ordering::Acquire) > self.budget(),
            Ordering::Release,
        );
        self.evict_passes.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn evict_pass(&self) -> Result<u64, CacheError> {
        let (high, low) = self.watermarks();
        if self.used.load(Ordering::Acquire) <= high {
            return Ok(0);
        }
        self.flush()?;
        let mut freed = 0;
        let blobs = self.config.dir.join("v1/blobs");
        loop {
            // Candidates a chunk at a time: the index may hold millions of files.
            let chunk: Vec<(u64, String, u64)> = {
                let tx = self.index.begin_read().map_err(|e| self.index_err(e))?;
                let lru = tx.open_table(LRU).map_err(|e| self.index_err(e))?;
                let files = tx.open_table(FILES).map_err(|e| self.index_err(e))?;
                let pinned = tx.open_table(PINNED).map_err(|e| self.index_err(e))?;
                let mut out = Vec::new();
                for item in lru.iter().map_err(|e| self.index_err(e))? {
                    let (k, _) = item.map_err(|e| self.index_err(e))?;
                    let (atime, key) = k.value();
                    if pinned
                        .range((key, "")..=(key, "\u{10ffff}"))
                        .map_err(|e| self.index_err(e))?
                        .next()
                        .is_some()
                    {
                        continue;
                    }
                    // An idle file is closed, then deleted like any other.
                    drop(self.idle.lock().remove(key));
                    if self.open.in_use(key) {
                        continue;
                    }
                    let bytes = files
                        .get(key)
                        .map_err(|e| self.index_err(e))?
                        .map(|v| v.value().0)
                        .unwrap_or(0);
                    out.push((atime, key.to_owned(), bytes));
                    if out.len() >= 256 {
                        break;
                    }
                }
                out
            };
            if chunk.is_empty() {
                break;
            }
            let mut tx = self.index.begin_write().map_err(|e| self.index_err(e))?;
            tx.set_durability(self.durability(false))
                .map_err(|e| self.index_err(e))?;
            let mut done = false;
            {
                let mut files = tx.open_table(FILES).map_err(|e| self.index_err(e))?;
                let mut lru = tx.open_table(LRU).map_err(|e| self.index_err(e))?;
                for (atime, key, bytes) in chunk {
                    // Held until both files are gone: an open of this key waits, then
                    // starts from nothing (open_table.rs says why it must).
                    let Some(_deleting) = self.open.try_claim_closed(&key) else {
                        continue;
                    };
                    let dir = blobs.join(&key[..2]);
                    // The map first: a crash in between leaves a data file without a
                    // map, which the next open treats as empty.
                    let _ = std::fs::remove_file(dir.join(format!("{key}.map")));
                    let _ = std::fs::remove_file(dir.join(format!("{key}.data")));
                    files.remove(key.as_str()).map_err(|e| self.index_err(e))?;
                    lru.remove((atime, key.as_str()))
                        .map_err(|e| self.index_err(e))?;
                    saturating_sub(&self.used, bytes);
                    freed += bytes;
                    tracing::debug!(key, bytes, "evicted");
                    if self.used.load(Ordering::Acquire) <= low {
                        done = true;
                        break;
                    }
                }
            }
            tx.commit().map_err(|e| self.index_err(e))?;
            if done {
                break;
            }
        }
        // Still over: the open files alone overflow the pool (one may be larger than
        // it). Shed blocks of the largest open files, never of a pinned dataset's (a
        // pinned file can be live for a moment after its readers left, while its
        // whole-file check runs).
        if self.used.load(Ordering::Acquire) > high {
            let mut open = self.open.live();
            {
                let tx = self.index.begin_read().map_err(|e| self.index_err(e))?;
                let pinned = tx.open_table(PINNED).map_err(|e| self.index_err(e))?;
                let mut keep = Vec::with_capacity(open.len());
                for b in open {
                    let is_pinned = pinned
                        .range((b.key.as_str(), "")..=(b.key.as_str(), "\u{10ffff}"))
                        .map_err(|e| self.index_err(e))?
                        .next()
                        .is_some();
                    if !is_pinned {
                        keep.push(b);
                    }
                }
                open = keep;
            }
            open.sort_by_key(|b| std::cmp::Reverse(b.residency().resident_bytes()));
            for b in open {
                let used = self.used.load(Ordering::Acquire);
                if used <= low {
                    break;
                }
                freed += b.shed_blocks(used - low);
            }
        }
        if freed > 0 {
            tracing::info!(
                freed,
                used = self.used.load(Ordering::Acquire),
                "evicted cached files"
            );
        }
        Ok(freed)
    }
}

/// A node's cache pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CachePool {
    shared: Arc<PoolShared>,
    _owner: Arc<PoolOwner>,
}

/// Dropped with the last `CachePool` handle: closes the idle files, which hold the
/// shared state (so that the pool, its index and its lock are released).
#[derive(Debug)]
struct PoolOwner(Arc<PoolShared>);

impl Drop for PoolOwner {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *self.0.idle.lock());
        drop(idle);
    }
}

impl CachePool {
    /// Opens (or creates) the pool under `config.dir` and starts its background index
    /// and eviction task on the current tokio runtime, and the thread that watches its
    /// file system's free space (see [`CacheConfig::free_space`]). The file work (the
    /// index, the wait for a pool another handle is closing) runs on a blocking thread.
    pub async fn open(config: CacheConfig) -> Result<Self, CacheError> {
        let (shared, first_wait) = tokio::task::spawn_blocking(move || {
            let s = PoolShared::open(config)?;
            let next = s.check_free_space();
            Ok::<_, CacheError>((s, next))
        })
        .await
        .map_err(|e| CacheError::Internal(format!("opening the cache pool: {e}")))??;
        let shared = Arc::new(shared);
        let weak = Arc::downgrade(&shared);
        {
            let weak = weak.clone();
            std::thread::Builder::new()
                .name("pool-free-space".into())
                .spawn(move || {
                    let mut next = first_wait;
                    loop {
                        std::thread::sleep(next);
                        let Some(s) = weak.upgrade() else { return };
                        next = s.check_free_space();
                    }
                })
                .map_err(|e| {
                    CacheError::Internal(format!("starting the pool's free-space check: {e}"))
                })?;
        }
        let pressure = shared.pressure.clone();
        tokio::spawn(async move {
            let Some(s) = weak.upgrade() else { return };
            let r = tokio::task::spawn_blocking(move || s.reconcile()).await;
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "scanning the cache for files missing from the index failed");
            }
            loop {
                let _ = tokio::time::timeout(Duration::from_secs(1), pressure.notified()).await;
                let Some(s) = weak.upgrade() else { return };
                let r =
                    tokio::task::spawn_blocking(move || s.flush().and_then(|_| s.evict())).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "cache index maintenance failed");
                }
            }
        });
        Ok(CachePool {
            _owner: Arc::new(PoolOwner(shared.clone())),
            shared,
        })
    }
}

impl PoolShared {
    /// The blocking part of [`CachePool::open`].
    fn open(config: CacheConfig) -> Result<PoolShared, CacheError> {
        let v1 = config.dir.join("v1");
        std::fs::create_dir_all(v1.join("blobs")).map_err(|e| CacheError::io(&v1, e))?;
        let format = v1.join("FORMAT");
        match std::fs::read_to_string(&format) {
            Ok(s) if s == FORMAT => {}
            Ok(s) => {
                return Err(CacheError::Format {
                    dir: config.dir.clone(),
                    found: s.trim().to_owned(),
                });
            }
            Err(_) => std::fs::write(&format, FORMAT).map_err(|e| CacheError::io(&format, e))?,
        }
        let index_path = v1.join("index.redb");
        // One process owns a pool (on a node, the agent serves every mount from it). A
        // pool just closed in this process may still be released by its background
        // task for a moment, hence the short wait.
        let mut waited = Duration::ZERO;
        let index = loop {
            match Database::builder()
                .set_cache_size(16 << 20)
                .create(&index_path)
            {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if waited < Duration::from_secs(2) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(CacheError::InUse {
                        dir: config.dir.clone(),
                    });
                }
                Err(e) => {
                    return Err(CacheError::Index {
                        path: index_path.clone(),
                        detail: e.to_string(),
                    });
                }
            }
        };
        let mut used = 0u64;
        {
            let tx = index.begin_write().map_err(|e| CacheError::Index {
                path: index_path.clone(),
                detail: e.to_string(),
            })?;
            {
                let files = tx.open_table(FILES).map_err(|e| CacheError::Index {
                    path: index_path.clone(),
                    detail: e.to_string(),
                })?;
                tx.open_table(PINNED).map_err(|e| CacheError::Index {
                    path: index_path.clone(),
                    detail: e.to_string(),
                })?;
                tx.open_table(PINS).map_err(|e| CacheError::Index {
                    path: index_path.clone(),
                    detail: e.to_string(),
                })?;
                tx.open_table(LRU).map_err(|e| CacheError::Index {
                    path: index_path.clone(),
                    detail: e.to_string(),
                })?;
                for (_, v) in files
                    .iter()
                    .map_err(|e| CacheError::Index {
                        path: index_path.clone(),
                        detail: e.to_string(),
                    })?
                    .flatten()
                {
                    used += v.value().0;
                }
            }
            tx.commit().map_err(|e| CacheError::Index {
                path: index_path.clone(),
                detail: e.to_string(),
            })?;
        }
        // Idle files may hold all descriptors but 2,048 (open handles, fills in
        // flight, sockets, the index: everything else).
        let fd_room = raise_nofile_limit().saturating_sub(2048) as usize;
        let idle = IdleBlobs {
            cap: config.max_open_blobs,
            fds: fd_room,
            ..Default::default()
        };
        tracing::debug!(
            files = idle.cap,
            descriptors = idle.fds,
            "cached files kept open when idle, at most"
        );
        let (config_read_buffer, config_direct_io) = (config.read_buffer, config.direct_io);
        Ok(PoolShared {
            fetches: Semaphore::new(config.max_fetches.max(1)),
            idle: Mutex::new(idle),
            config,
            used: AtomicU64::new(used),
            pending: Mutex::default(),
            open: open_table::OpenTable::default(),
            pressure: Arc::new(Notify::new()),
            maintenance: Mutex::new(()),
            last_durable: Mutex::new(Instant::now()),
            evict_passes: AtomicU64::new(0),
            evict_stuck: AtomicBool::new(false),
            external: AtomicU64::new(0),
            disk_room: AtomicU64::new(u64::MAX),
            disk_free: AtomicU64::new(u64::MAX),
            disk_limited: AtomicBool::new(false),
            index,
            index_path,
            fetched: AtomicU64::new(0),
            from_peers: AtomicU64::new(0),
            by_dataset: Mutex::new(HashMap::new()),
            peers: parking_lot::RwLock::new(None),
            evicted: AtomicU64::new(0),
            read_buffer: read_buffer::ReadBuffer::new(config_read_buffer),
            direct_io: std::sync::atomic::AtomicBool::new(config_direct_io),
            next_blob_id: AtomicU64::new(1),
        })
    }
}

impl CachePool {
    pub fn config(&self) -> &CacheConfig {
        &self.shared.config
    }

    /// Resident bytes in the pool.
    pub fn used(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }

    /// Tells the pool how many bytes of its directory are held by others (checkpoint
    /// volumes): the cache keeps its files within the capacity less those, evicting
    /// now if that leaves it over its high watermark.
    pub fn set_external(&self, bytes: u64) {
        self.shared.external.store(bytes, Ordering::Release);
        let s = &self.shared;
        if s.used.load(Ordering::Acquire) > s.watermarks().0 {
            s.pressure.notify_one();
        }
    }

    /// Bytes of the pool's directory held by others (see [`CachePool::set_external`]).
    pub fn external(&self) -> u64 {
        self.shared.external.load(Ordering::Acquire)
    }

    /// Free bytes of the pool's file system at the last check (see
    /// [`CacheConfig::free_space`]); `None` before it, or where the file system gives
    /// no sizes.
    pub fn disk_free(&self) -> Option<u64> {
        Some(self.shared.disk_free.load(Ordering::Acquire)).filter(|&n| n != u64::MAX)
    }

    /// Bytes fetched from the lake by this process.
    pub fn fetched(&self) -> u64 {
        self.shared.fetched.load(Ordering::Relaxed)
    }

    /// Bytes fetched from other nodes (peers) by this process.
    pub fn fetched_from_peers(&self) -> u64 {
        self.shared.from_peers.load(Ordering::Relaxed)
    }

    /// Bytes of dataset `id` (see `Dataset::id`) fetched by this process: from the
    /// lake, and from peers.
    pub fn dataset_bytes(&self, id: &str) -> (u64, u64) {
        self.shared
            .by_dataset
            .lock()
            .get(id)
            .copied()
            .unwrap_or_default()
    }

    /// The cluster's other nodes, if this pool shares with them.
    pub fn peers(&self) -> Option<Arc<dyn peers::BlockPeers>> {
        self.shared.peers()
    }

    /// Shares this pool with the cluster's other nodes: missing blocks of datasets are
    /// asked of their owner first (see `crate::peer`). `None` stops it.
    pub fn set_peers(&self, peers: Option<Arc<dyn peers::BlockPeers>>) {
        *self.shared.peers.write() = peers;
    }

    /// Bytes of files the evictor removed since this process started.
    pub fn evicted(&self) -> u64 {
        self.shared.evicted.load(Ordering::Relaxed)
    }

    /// Bytes of fetched blocks held in memory for their readers (see read_buffer.rs).
    pub fn read_buffer_bytes(&self) -> u64 {
        self.shared.read_buffer.bytes()
    }

    /// Whether block writes still use direct I/O (off once the file system refused it).
    pub fn direct_io(&self) -> bool {
        self.shared.direct_io.load(Ordering::Relaxed)
    }

    pub fn root(&self) -> PathBuf {
        self.shared.config.dir.join("v1")
    }

    /// The cached copy of `entry` (a file of a snapshot of `lake`), opened or created.
    /// One `CachedBlob` per version exists at a time, however many handles use it.
    pub fn blob(
        &self,
        lake_id: &str,
        lake: &Arc<dyn Lake>,
        entry: &Entry,
    ) -> Result<Arc<CachedBlob>, CacheError> {
        let key = blob_key(lake_id, &entry.blob, &entry.etag.0);
        let b = match self.shared.open.get_or_claim(&key) {
            open_table::Claim::Open(b) => b,
            open_table::Claim::Claimed(claim) => {
                // Disk I/O with only this key claimed: other opens go on meanwhile.
                let dir = self.root().join("blobs").join(&key[..2]);
                let b = Arc::new(CachedBlob::open(
                    key.clone(),
                    entry,
                    dir,
                    lake.clone(),
                    self.shared.clone(),
                )?);
                claim.publish(&b);
                b
            }
        };
        self.shared.idle.lock().touch(&key, &b);
        self.shared.touch(&key);
        Ok(b)
    }

    /// Bytes resident in the pool of each of `keys`, as the index knows them (with the
    /// updates not committed yet). One index read for the lot.
    pub fn resident_bytes(&self, keys: &[String]) -> Result<Vec<u64>, CacheError> {
        let s = &self.shared;
        let tx = s.index.begin_read().map_err(|e| s.index_err(e))?;
        let files = tx.open_table(FILES).map_err(|e| s.index_err(e))?;
        let pending = s.pending.lock();
        keys.iter()
            .map(|k| {
                let indexed = files
                    .get(k.as_str())
                    .map_err(|e| s.index_err(e))?
                    .map(|v| v.value().0)
                    .unwrap_or(0);
                let delta = pending.get(k).map(|p| p.bytes).unwrap_or(0);
                Ok((indexed as i64 + delta).max(0) as u64)
            })
            .collect()
    }

    /// Pins `keys` under `pin_id`: never evicted until [`Self::unpin`] of that id (and of
    /// every other id that pins them). Idempotent.
    pub fn pin(&self, pin_id: &str, keys: &[String]) -> Result<(), CacheError> {
        let s = &self.shared;
        let tx = s.index.begin_write().map_err(|e| s.index_err(e))?;
        {
            let mut pinned = tx.open_table(PINNED).map_err(|e| s.index_err(e))?;
            let mut pins = tx.open_table(PINS).map_err(|e| s.index_err(e))?;
            for k in keys {
                pinned
                    .insert((k.as_str(), pin_id), ())
                    .map_err(|e| s.index_err(e))?;
                pins.insert((pin_id, k.as_str()), ())
                    .map_err(|e| s.index_err(e))?;
            }
        }
        tx.commit().map_err(|e| s.index_err(e))
    }

    /// Removes every pin of `pin_id` (a chunk per transaction: a pin may cover millions
    /// of files). Returns how many were removed.
    pub fn unpin(&self, pin_id: &str) -> Result<u64, CacheError> {
        let s = &self.shared;
        let mut removed = 0;
        loop {
            let keys: Vec<String> = {
                let tx = s.index.begin_read().map_err(|e| s.index_err(e))?;
                let pins = tx.open_table(PINS).map_err(|e| s.index_err(e))?;
                pins.range((pin_id, "")..=(pin_id, "\u{10ffff}"))
                    .map_err(|e| s.index_err(e))?
                    .take(4096)
                    .map(|r| r.map(|(k, _)| k.value().1.to_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| s.index_err(e))?
            };
            if keys.is_empty() {
                return Ok(removed);
            }
            let tx = s.index.begin_write().map_err(|e| s.index_err(e))?;
            {
                let mut pinned = tx.open_table(PINNED).map_err(|e| s.index_err(e))?;
                let mut pins = tx.open_table(PINS).map_err(|e| s.index_err(e))?;
                for k in &keys {
                    pinned
                        .remove((k.as_str(), pin_id))
                        .map_err(|e| s.index_err(e))?;
                    pins.remove((pin_id, k.as_str()))
                        .map_err(|e| s.index_err(e))?;
                }
            }
            tx.commit().map_err(|e| s.index_err(e))?;
            removed += keys.len() as u64;
        }
    }

    /// Commits batched index updates and syncs them (clean shutdown).
    /// Commits the index's pending updates durably (at shutdown).
    pub fn flush(&self) -> Result<(), CacheError> {
        self.shared.flush_with(true)
    }

    /// Runs eviction now if the pool is over its high watermark.
    pub fn evict_now(&self) -> Result<u64, CacheError> {
        self.shared.evict()
    }
}

/// Subtracts `n` from `counter`, stopping at zero, as one atomic step (a load and a
/// subtract could both see the same value and wrap the counter to ~2^64, after which
/// the evictor would think the pool overfull and delete every closed file).
fn saturating_sub(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
        Some(u.saturating_sub(n))
    });
}

/// The sizes of a file system, in bytes (statvfs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FsSpace {
    pub total: u64,
    /// Free, also to root.
    pub free: u64,
    /// What an unprivileged writer may still use.
    pub available: u64,
}

/// The sizes of the file system holding `path`. A file system that gives no sizes
/// (ramfs: it has no limit) reports all three as 0.
pub(crate) fn fs_space(path: &Path) -> std::io::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: zeroed statvfs is a valid out-buffer; c is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bytes = |blocks: u64| blocks.saturating_mul(s.f_frsize);
    Ok(FsSpace {
        total: bytes(s.f_blocks),
        free: bytes(s.f_bfree),
        available: bytes(s.f_bavail),
    })
}

/// Digest naming one blob version in the pool.
pub fn blob_key(lake_id: &str, blob: &str, etag: &str) -> String {
    let mut h = Sha256::new();
    for part in [lake_id, blob, etag] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_subtractions_past_zero_stop_at_zero() {
        // Eviction, shedding and failed checks all subtract from `used` at once; the
        // sum of what they subtract can exceed it (an estimate drifts). It must end at
        // zero, never wrap to ~2^64 (which would make the evictor empty the pool).
        let used = AtomicU64::new(1000);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200_000 {
                        saturating_sub(&used, 1);
                    }
                });
            }
        });
        assert_eq!(used.load(Ordering::Acquire), 0);
    }
}
