//! A dataset: one lake prefix, its snapshots, and the work of filling the cache for it.
//!
//! Listing-order readahead for small files: a small file costs a whole round trip to
//! the lake, so a reader that opens small files one after another pays that latency
//! per file. Readers that walk the dataset in listing order, forwards (`find`, `tar`,
//! `os.walk`, a sorted file list) or backwards (a walk that pops a stack), are
//! recognised from their opens (each within a few entries of the previous one, in one
//! direction), and the next small files along that direction are fetched before they
//! are asked for, `WALK_AHEAD` at a time. A few walkers are tracked at once (data loader
//! workers that each walk their own part); random access is never prefetched for.
//!
//! The current snapshot answers new lookups; snapshots replaced by a refresh stay open
//! for the inodes and files that still use them (a refresh never changes what an open
//! file reads). The file system reports the kernel's references per snapshot
//! ([`Dataset::hold`], [`Dataset::forget`]); a replaced snapshot is closed and its file
//! deleted once the kernel holds nothing of it, so a mount refreshed for weeks keeps
//! only the snapshots still in use. Snapshot files live under `v1/datasets/<id>/snapshots/`, with `current`
//! naming the one in use so a restarted agent can keep serving the same inodes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use parking_lot::{Mutex, RwLock};

use super::snapshot::{Entry, Snapshot};
use super::{CacheError, CachePool, blob_key};
use crate::lake::{Lake, LakeUrl};

/// Snapshot sequence numbers are 23 bits of the inode (see fs.rs; the top bit of a
/// file handle marks passthrough); they wrap.
pub const SEQ_BITS: u32 = 23;

/// Replaced snapshots kept open for the kernel's references to them. A refresh asks
/// the kernel to drop those references, so only files, directories or working
/// directories that a process still holds keep a snapshot; past this many the oldest
/// is closed (its open files keep reading: they hold their cached blob, not the
/// snapshot). Bounds the open snapshot files of a mount refreshed for weeks.
pub const MAX_REPLACED: usize = 16;

/// The refresh counter's start, above the ages given to snapshots found at open.
const FIRST_REFRESH: u64 = 1 << 32;

#[derive(Debug)]
pub struct Dataset {
    pub url: LakeUrl,
    pub lake: Arc<dyn Lake>,
    lake_id: String,
    /// The dataset's id, the same on every node (a digest of its lake URL): its
    /// directory's name in the pool, and its name among peers.
    id: String,
    pool: CachePool,
    dir: PathBuf,
    current: RwLock<(u32, Arc<Snapshot>)>,
    /// Replaced snapshots still referenced by the kernel, with the refresh count at
    /// which each was replaced (the oldest is closed first past [`MAX_REPLACED`]).
    older: RwLock<HashMap<u32, (Arc<Snapshot>, u64)>>,
    refreshes: AtomicU64,
    /// Kernel references (lookup counts) per snapshot.
    refs: Mutex<HashMap<u32, u64>>,
    walks: Mutex<Vec<Walk>>,
}

/// Opens this close (in entries) to the previous one continue a walk.
const WALK_NEAR: u64 = 64;
/// Small files fetched ahead of a walker.
pub const WALK_AHEAD: usize = 32;
/// Walkers tracked at once.
const WALKERS: usize = 8;

/// One reader walking the listing: where it was, which way it goes, and how far ahead
/// its files are already being fetched.
#[derive(Debug, Clone)]
struct Walk {
    seq: u32,
    last: u64,
    forward: bool,
    frontier: u64,
    streak: u32,
    used: u64,
    /// The walk met a file that was not cached: it is reading from the lake, so it is
    /// worth fetching ahead of (a walk over a warm cache is left alone).
    cold: bool,
}

/// Live counters of a prewarm, read by progress bars and status.
#[derive(Debug, Default)]
pub struct PrewarmProgress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_failed: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrewarmSummary {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid --include pattern {pattern:?}: {reason}")]
pub struct GlobError {
    pub pattern: String,
    pub reason: String,
}

/// Compiles `--include` patterns (matched against paths inside the dataset, e.g.
/// `train/**/*.parquet`). No pattern means everything.
pub fn include_set(patterns: &[String]) -> Result<Option<GlobSet>, GlobError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| GlobError {
            pattern: p.clone(),
            reason: e.kind().to_string(),
        })?;
        b.add(g);
    }
    b.build().map(Some).map_err(|e| GlobError {
        pattern: patterns.join(","),
        reason: e.to_string(),
    })
}

impl Dataset {
    /// Opens the dataset at `url` and returns once its listing is complete (see
    /// [`Dataset::start`]); `progress` gets the running object count while listing.
    pub async fn open(
        pool: CachePool,
        url: LakeUrl,
        lake: Arc<dyn Lake>,
        reuse: bool,
        mut progress: impl FnMut(u64),
    ) -> Result<Self, CacheError> {
        let ds = Self::start(pool, url, lake, reuse).await?;
        let (_, snap) = ds.current();
        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                r = snap.wait_complete_or_error() => {
                    r?;
                    break;
                }
                _ = ticks.tick() => progress(snap.summary().objects),
            }
        }
        progress(snap.summary().objects);
        Ok(ds)
    }

    /// Opens the dataset at `url` and returns as soon as it can be served: its current
    /// snapshot when `reuse` is set and one exists (a listing that stopped part way is
    /// resumed where it stopped), else a new snapshot whose listing goes on in the
    /// background while it serves what is listed (see [`Snapshot::lookup_now`]). The
    /// snapshot's number is recorded before any of its inodes is served, so a
    /// restarted agent never gives those numbers to other files.
    pub async fn start(
        pool: CachePool,
        url: LakeUrl,
        lake: Arc<dyn Lake>,
        reuse: bool,
    ) -> Result<Self, CacheError> {
        let lake_id = format!("{}{}", url.endpoint, url.container);
        let id = &blob_key(&lake_id, &url.prefix, "dataset")[..16];
        let dir = pool.root().join("datasets").join(id);
        let snaps = dir.join("snapshots");
        let listing = pool.config().listing;
        let prev = {
            let (dir, snaps) = (dir.clone(), snaps.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&snaps).map_err(|e| CacheError::io(&snaps, e))?;
                Ok::<_, CacheError>(
                    std::fs::read_to_string(dir.join("current"))
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok()),
                )
            })
            .await
            .map_err(|e| CacheError::Internal(format!("opening the dataset: {e}")))??
        };
        let reused = match (reuse, prev) {
            (true, Some(seq)) => {
                let path = snaps.join(format!("{seq}.redb"));
                match Snapshot::resume(lake.clone(), &url.prefix, &path, listing).await {
                    Ok(s) => Some((seq, s)),
                    Err(e) => {
                        tracing::warn!(dataset = %url, snapshot = seq, error = %e, "the current snapshot cannot be used; listing anew");
                        None
                    }
                }
            }
            _ => None,
        };
        let (seq, snap) = match reused {
            Some(x) => x,
            None => {
                let seq = prev.map(|p| (p + 1) % (1 << SEQ_BITS)).unwrap_or(1).max(1);
                let s = Snapshot::start(
                    lake.clone(),
                    &url.prefix,
                    &snaps.join(format!("{seq}.redb")),
                    listing,
                )
                .await?;
                write_current(&dir, seq)?;
                (seq, s)
            }
        };
        // Other snapshots of earlier runs: a fresh start serves no inode of them, so
        // they go. Reusing (a restarted agent taking over live mounts), the kernel may
        // still hold inodes of replaced snapshots, with reference counts we no longer
        // know: the most recent ones are kept, as replaced snapshots, up to the bound.
        let mut older = HashMap::new();
        let others: Vec<(u32, PathBuf)> = std::fs::read_dir(&snaps)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let n: u32 = e
                    .file_name()
                    .to_str()?
                    .strip_suffix(".redb")?
                    .parse()
                    .ok()?;
                (n != seq).then(|| (n, e.path()))
            })
            .collect();
        let mut kept: Vec<(u32, PathBuf)> = Vec::new();
        for (n, path) in others {
            if reuse {
                kept.push((n, path));
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
        // Newest first: fewest refreshes before the current one.
        let age = |n: u32| (seq + (1 << SEQ_BITS) - n) % (1 << SEQ_BITS);
        kept.sort_by_key(|(n, _)| age(*n));
        for (i, (n, path)) in kept.into_iter().enumerate() {
            match (i < MAX_REPLACED).then(|| Snapshot::open(&path)) {
                Some(Ok(s)) => {
                    // Replaced before any refresh of this run: the lowest ages.
                    older.insert(n, (Arc::new(s), FIRST_REFRESH - 1 - age(n) as u64));
                }
                _ => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let listed = snap.listed();
        tracing::info!(dataset = %url, snapshot = seq, objects = listed.summary.objects, complete = listed.complete, "snapshot serving");
        Ok(Dataset {
            url,
            lake,
            lake_id,
            id: id.to_owned(),
            pool,
            dir,
            current: RwLock::new((seq, Arc::new(snap))),
            older: RwLock::new(older),
            refreshes: AtomicU64::new(FIRST_REFRESH),
            refs: Mutex::new(HashMap::new()),
            walks: Mutex::new(Vec::new()),
        })
    }

    pub fn pool(&self) -> &CachePool {
        &self.pool
    }

    pub fn current(&self) -> (u32, Arc<Snapshot>) {
        let c = self.current.read();
        (c.0, c.1.clone())
    }

    pub fn snapshot(&self, seq: u32) -> Option<Arc<Snapshot>> {
        let c = self.current.read();
        if c.0 == seq {
            return Some(c.1.clone());
        }
        self.older.read().get(&seq).map(|(s, _)| s.clone())
    }

    /// Lists the lake again; swaps in a new snapshot if anything changed. Returns the
    /// snapshot it replaced, so that the file system can ask the kernel to drop its
    /// cached entries of it (`fs::Mount::forget_snapshot`); without that a large-RAM
    /// node keeps them, and the snapshot, for days.
    pub async fn refresh(&self) -> Result<Option<Arc<Snapshot>>, CacheError> {
        let (seq, cur) = self.current();
        // A snapshot still being listed is the newest listing there is.
        cur.wait_complete().await?;
        let next = (seq + 1) % (1 << SEQ_BITS);
        let next = if next == 0 { 1 } else { next };
        let path = self.dir.join("snapshots").join(format!("{next}.redb"));
        let listing = self.pool.config().listing;
        let snap =
            Snapshot::build_with(self.lake.as_ref(), &self.url.prefix, &path, listing, |_| {})
                .await?;
        if snap.digest() == cur.digest() && snap.summary() == cur.summary() {
            drop(snap);
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        write_current(&self.dir, next)?;
        tracing::info!(dataset = %self.url, snapshot = next, objects = snap.summary().objects, "refreshed: new snapshot");
        let old = std::mem::replace(&mut *self.current.write(), (next, Arc::new(snap)));
        let n = self.refreshes.fetch_add(1, Ordering::Relaxed);
        let refs = self.refs.lock();
        if refs.get(&old.0).copied().unwrap_or(0) > 0 {
            let mut older = self.older.write();
            older.insert(old.0, (old.1.clone(), n));
            if older.len() > MAX_REPLACED {
                let oldest = older.iter().min_by_key(|(_, (_, at))| *at).map(|(s, _)| *s);
                if let Some(oldest) = oldest {
                    older.remove(&oldest);
                    self.remove_snapshot_file(oldest);
                    tracing::warn!(dataset = %self.url, snapshot = oldest, kept = MAX_REPLACED, "closed a replaced snapshot still in use (a process has held its files or directories since {MAX_REPLACED} refreshes ago): open files keep reading, other uses of its paths fail with ESTALE");
                }
            }
        } else {
            self.remove_snapshot_file(seq);
        }
        Ok(Some(old.1))
    }

    /// The kernel took `n` more references to inodes of snapshot `seq`.
    pub fn hold(&self, seq: u32, n: u64) {
        *self.refs.lock().entry(seq).or_default() += n;
    }

    /// The kernel dropped `n` references to inodes of snapshot `seq`; a replaced
    /// snapshot nobody references any more is closed and deleted.
    pub fn forget(&self, seq: u32, n: u64) {
        let mut refs = self.refs.lock();
        let Some(count) = refs.get_mut(&seq) else {
            return;
        };
        *count = count.saturating_sub(n);
        if *count > 0 {
            return;
        }
        refs.remove(&seq);
        if self.current.read().0 == seq {
            return;
        }
        if self.older.write().remove(&seq).is_some() {
            tracing::debug!(dataset = %self.url, snapshot = seq, "replaced snapshot no longer used; deleted");
            self.remove_snapshot_file(seq);
        }
    }

    /// Snapshots open now (the current one and replaced ones still in use).
    pub fn open_snapshots(&self) -> usize {
        1 + self.older.read().len()
    }

    fn remove_snapshot_file(&self, seq: u32) {
        // Unlinking a file still open elsewhere is fine: the space goes when it closes.
        let _ = std::fs::remove_file(self.dir.join("snapshots").join(format!("{seq}.redb")));
    }

    /// Tells the dataset that small file `e` of snapshot `seq` was opened (`cold`: it
    /// was not in the cache). A walk in listing order gets the next small files fetched
    /// in the background (see the module docs). Needs a tokio runtime context.
    pub fn small_file_opened(
        self: &Arc<Self>,
        seq: u32,
        snap: &Arc<Snapshot>,
        e: &Entry,
        cold: bool,
    ) {
        let ahead = {
            let mut walks = self.walks.lock();
            let tick = walks.iter().map(|w| w.used).max().unwrap_or(0) + 1;
            let found = walks.iter().position(|w| {
                w.seq == seq && w.last != e.ino && w.last.abs_diff(e.ino) <= WALK_NEAR
            });
            let Some(i) = found else {
                let w = Walk {
                    seq,
                    last: e.ino,
                    forward: true,
                    frontier: e.ino,
                    streak: 0,
                    used: tick,
                    cold,
                };
                if walks.len() < WALKERS {
                    walks.push(w);
                } else if let Some(old) = walks.iter_mut().min_by_key(|w| w.used) {
                    *old = w;
                }
                return;
            };
            let w = &mut walks[i];
            let forward = e.ino > w.last;
            if forward != w.forward || w.streak == 0 {
                w.forward = forward;
                w.frontier = e.ino;
            }
            w.streak += 1;
            w.last = e.ino;
            w.used = tick;
            w.cold |= cold;
            // Keep WALK_AHEAD files ahead: extend once half of them have been opened.
            let left = if forward {
                w.frontier.saturating_sub(e.ino)
            } else {
                e.ino.saturating_sub(w.frontier)
            };
            if !w.cold || left > WALK_AHEAD as u64 / 2 {
                return;
            }
            let next = if forward {
                snap.files_from(w.frontier, WALK_AHEAD)
            } else {
                snap.files_before(w.frontier, WALK_AHEAD)
            };
            let Ok(next) = next else { return };
            let Some(last) = next.last() else { return };
            w.frontier = last.ino;
            next
        };
        let threshold = self.pool.config().small_file_threshold;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            for f in ahead
                .into_iter()
                .filter(|f| f.size > 0 && f.size <= threshold)
            {
                match this.blob(&f) {
                    Ok(b) if !b.residency().is_complete() => b.prefetch(0..b.residency().blocks()),
                    Ok(_) => {}
                    Err(err) => {
                        tracing::debug!(blob = %f.blob, error = %err, "walk readahead: cannot open the cache file")
                    }
                }
            }
        });
    }

    /// The id under which this dataset's files are pinned.
    pub fn pin_id(&self) -> String {
        format!("dataset:{}{}", self.lake_id, self.url.prefix)
    }

    /// Keeps every file of the current snapshot out of eviction (files cached later
    /// included: the pin names blob versions, cached or not). Call again after a
    /// refresh, and once a snapshot still being listed is complete (this pins the files
    /// listed so far); [`Self::unpin`] ends it.
    pub fn pin(&self) -> Result<(), CacheError> {
        let (_, snap) = self.current();
        let id = self.pin_id();
        let mut after = 0;
        loop {
            let chunk = snap.files_from(after, 4096)?;
            let Some(last) = chunk.last() else { break };
            after = last.ino;
            let keys: Vec<String> = chunk
                .iter()
                .map(|e| blob_key(&self.lake_id, &e.blob, &e.etag.0))
                .collect();
            self.pool.pin(&id, &keys)?;
        }
        Ok(())
    }

    /// Makes this dataset's files evictable again.
    pub fn unpin(&self) -> Result<u64, CacheError> {
        self.pool.unpin(&self.pin_id())
    }

    /// Bytes of the current snapshot's files resident in the pool (streamed a chunk of
    /// the listing at a time; one index read per chunk).
    pub fn cached_bytes(&self) -> Result<u64, CacheError> {
        let (_, snap) = self.current();
        let mut total = 0;
        let mut after = 0;
        loop {
            let chunk = snap.files_from(after, 4096)?;
            let Some(last) = chunk.last() else { break };
            after = last.ino;
            let keys: Vec<String> = chunk
                .iter()
                .map(|e| blob_key(&self.lake_id, &e.blob, &e.etag.0))
                .collect();
            let bytes = self.pool.resident_bytes(&keys)?;
            total += chunk
                .iter()
                .zip(bytes)
                .map(|(e, b)| b.min(e.size))
                .sum::<u64>();
        }
        Ok(total)
    }

    /// The cached copy of a file of this dataset.
    pub fn blob(&self, entry: &Entry) -> Result<Arc<super::blob::CachedBlob>, CacheError> {
        let b = self.pool.blob(&self.lake_id, &self.lake, entry)?;
        b.set_scope(&self.id);
        Ok(b)
    }

    /// The dataset's id, the same on every node that holds it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file of a snapshot still open here that is blob `blob` at `etag` (a peer's
    /// ask: served only if this node lists that very version).
    pub fn entry_for(&self, blob: &str, etag: &crate::lake::ETag) -> Option<Entry> {
        let rel = blob.strip_prefix(self.url.prefix.as_str())?;
        let mut snaps = vec![self.current().1];
        snaps.extend(self.older.read().values().map(|(s, _)| s.clone()));
        'snapshots: for snap in snaps {
            let mut ino = super::snapshot::ROOT;
            let mut parts = rel.split('/').peekable();
            while let Some(name) = parts.next() {
                match snap.lookup(ino, name) {
                    Ok(Some(e)) if parts.peek().is_none() => {
                        if e.kind == super::snapshot::Kind::File
                            && e.blob == blob
                            && &e.etag == etag
                        {
                            return Some(e);
                        }
                        continue 'snapshots;
                    }
                    Ok(Some(e)) => ino = e.ino,
                    _ => continue 'snapshots,
                }
            }
        }
        None
    }

    /// Fetches every file of the current snapshot matching `include` into the cache,
    /// `parallel_files` at a time, updating `progress` as bytes land.
    pub async fn prewarm(
        &self,
        include: Option<&GlobSet>,
        parallel_files: usize,
        progress: &PrewarmProgress,
    ) -> Result<PrewarmSummary, CacheError> {
        let (_, snap) = self.current();
        // The totals and the walk need the whole listing.
        snap.wait_complete().await?;
        if let Some(p) = self.pool.peers() {
            p.settled(&self.id).await;
        }
        let matches = |e: &Entry| match include {
            None => true,
            Some(g) => g.is_match(e.blob.strip_prefix(&self.url.prefix).unwrap_or(&e.blob)),
        };
        // Pass 1: totals, streamed.
        let mut after = 0;
        loop {
            let chunk = snap.files_from(after, 4096)?;
            let Some(last) = chunk.last() else { break };
            after = last.ino;
            for e in chunk.iter().filter(|e| matches(e)) {
                progress.files_total.fetch_add(1, Ordering::Relaxed);
                progress.bytes_total.fetch_add(e.size, Ordering::Relaxed);
            }
        }
        // Pass 2: fetch, a chunk of the listing at a time.
        let failed = parking_lot::Mutex::new(Vec::new());
        let mut after = 0;
        loop {
            let chunk = snap.files_from(after, 4096)?;
            let Some(last) = chunk.last() else { break };
            after = last.ino;
            futures::stream::iter(chunk.into_iter().filter(|e| matches(e)))
                .for_each_concurrent(parallel_files.max(1), |e| {
                    let failed = &failed;
                    async move {
                        let r = async {
                            let b = self.blob(&e).map_err(Arc::new)?;
                            let before = b.residency().resident_bytes();
                            progress.bytes_done.fetch_add(before, Ordering::Relaxed);
                            // Block by block so progress moves smoothly on large files.
                            let blocks = b.residency().blocks();
                            let step = 8u64;
                            let mut i = 0;
                            while i < blocks {
                                let r = i..(i + step).min(blocks);
                                let missing: u64 = r.clone().filter(|&j| !b.residency().is_resident(j)).map(|j| { let br = b.residency().block_range(j); br.end - br.start }).sum();
                                b.ensure(r.clone()).await?;
                                progress.bytes_done.fetch_add(missing, Ordering::Relaxed);
                                i = r.end;
                            }
                            Ok::<_, Arc<CacheError>>(())
                        }
                        .await;
                        match r {
                            Ok(()) => {
                                progress.files_done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(err) => {
                                progress.files_failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(blob = %e.blob, error = %err, "prewarm: file failed");
                                failed.lock().push((e.blob.clone(), err.to_string()));
                            }
                        }
                    }
                })
                .await;
        }
        self.pool.flush()?;
        Ok(PrewarmSummary {
            files: progress.files_done.load(Ordering::Relaxed),
            bytes: progress.bytes_done.load(Ordering::Relaxed),
            failed: failed.into_inner(),
        })
    }
}

fn write_current(dir: &std::path::Path, seq: u32) -> Result<(), CacheError> {
    let tmp = dir.join("current.tmp");
    std::fs::write(&tmp, format!("{seq}\n")).map_err(|e| CacheError::io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join("current")).map_err(|e| CacheError::io(&tmp, e))
}
