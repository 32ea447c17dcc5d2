//! One cached blob version: a sparse local data file plus its [`Residency`] map, and
//! the single-flight machinery that fetches missing blocks from the lake.
//!
//! - Blocks are fetched with ranged GETs pinned to the snapshot's ETag, so bytes of two
//!   versions never mix; a changed blob fails the read (EIO upstream) and says so.
//! - Concurrent readers of the same missing block share one fetch: the first creates a
//!   shared future in `inflight`, the others await it. Consecutive missing blocks are
//!   fetched by one streamed GET (up to `get_size`); each block is written and served
//!   as soon as its own bytes are in, and a body that breaks off is resumed (retry.rs).
//! - Where the pool shares with the cluster's other nodes (peers.rs, `crate::peer`), a
//!   run of missing blocks is asked of its chunk's owner first, and what the owner does
//!   not deliver in time, or delivers wrong, comes from the lake (`fetch_from_peer`).
//! - Every fetched block is checked before it is written: its length, and for a blob that
//!   is one block with a `Content-MD5`, the MD5 (a multi-block blob's MD5 is checked over
//!   the local copy once its last block is in). Its CRC32C is stored in the map and
//!   re-checked before the block is first served after a reboot (residency.rs).
//! - Whole blocks are written with direct I/O where the file system takes it: the bytes
//!   reach the NVMe without a copy in the page cache (a cold read would otherwise hold
//!   every byte twice in RAM, as the cache file and as the FUSE file). Blocks fetched for
//!   a reader are then served to it from memory (read_buffer.rs), not read back.
//!   The tail of a blob and small files are written through the page cache.
//! - The number of GETs in flight is bounded by the pool's semaphore, and a GET holds at
//!   most two blocks (one filling, one being written), so memory held by fetches is at
//!   most `max_fetches × 2 × block size`, plus the pool's read buffer.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;

/// Fetch-and-read attempts of one read before it fails with EIO: a block is dropped
/// between fetch and read only when it failed its checksum or was shed under pressure.
const READ_ATTEMPTS: usize = 5;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use md5::{Digest, Md5};
use parking_lot::{Mutex, RwLock};

use super::residency::{FLAG_MD5_MISMATCH, FLAG_MD5_REFETCHED, FLAG_MD5_VERIFIED, Residency};
use super::snapshot::Entry;
use super::{CacheError, PoolShared};
use crate::lake::{Lake, LakeError};

type FetchResult = Result<(), Arc<CacheError>>;

/// Direct I/O needs the buffer, the file offset and the length aligned to the device's
/// logical block; 4096 covers every logical block size in use (512 and 4096).
const DIO_ALIGN: usize = 4096;

/// A block being assembled from a body's chunks, in memory aligned for direct I/O.
struct BlockBuf {
    vec: Vec<u8>,
    off: usize,
}

impl BlockBuf {
    fn new(len: usize) -> Self {
        let mut vec: Vec<u8> = Vec::with_capacity(len + DIO_ALIGN - 1);
        let off = vec.as_ptr().align_offset(DIO_ALIGN).min(DIO_ALIGN - 1);
        vec.resize(off, 0);
        BlockBuf { vec, off }
    }

    fn len(&self) -> usize {
        self.vec.len() - self.off
    }

    /// Appends within the capacity reserved at `new` (never reallocates, so the start
    /// stays aligned).
    fn extend(&mut self, b: &[u8]) {
        debug_assert!(self.vec.len() + b.len() <= self.vec.capacity());
        self.vec.extend_from_slice(b);
    }

    fn freeze(self) -> Bytes {
        Bytes::from(self.vec).slice(self.off..)
    }
}

/// A copy of `b` in memory aligned for direct I/O (bytes from the network arrive
/// wherever the allocator put them).
fn aligned_copy(b: &[u8]) -> Bytes {
    let mut buf = BlockBuf::new(b.len());
    buf.extend(b);
    buf.freeze()
}

/// `len` bytes at `offset` appended to `buf`, without zeroing them first (this is the
/// read path of every non-passthrough read that the read buffer does not answer).
fn append_at(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    buf.reserve(len);
    let base = buf.len();
    let mut done = 0usize;
    while done < len {
        // SAFETY: the destination is the vector's spare capacity, `len - done` bytes
        // long; `pread` writes at most that many, and `set_len` below covers only
        // bytes it reported as written.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(base + done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cache file shorter than its blob",
                ));
            }
            n if n > 0 => {
                done += n as usize;
                // SAFETY: the `done` bytes after `base` were written by `pread`.
                unsafe { buf.set_len(base + done) };
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

async fn join_write(w: tokio::task::JoinHandle<Result<(), CacheError>>) -> FetchResult {
    match w.await {
        Ok(r) => r.map_err(Arc::new),
        Err(e) => Err(Arc::new(CacheError::Internal(format!(
            "block write failed: {e}"
        )))),
    }
}
type FetchFuture = Shared<BoxFuture<'static, FetchResult>>;

#[derive(Debug)]
pub struct CachedBlob {
    pub key: String,
    pub blob: String,
    pub size: u64,
    pub etag: crate::lake::ETag,
    pub md5: Option<[u8; 16]>,
    pub data_path: PathBuf,
    data: File,
    /// The data file opened with `O_DIRECT` for whole-block writes: opened at the
    /// first one, closed once every block is resident.
    direct: Mutex<Option<Arc<File>>>,
    /// This blob's key in the pool's read buffer.
    id: u64,
    map: Residency,
    inflight: Mutex<HashMap<u64, FetchFuture>>,
    md5_checking: AtomicBool,
    /// A background check of the whole file is running (see `verify_in_background`).
    verifying: AtomicBool,
    /// One block write at a time per file: concurrent buffered writes to one file
    /// serialise on its inode lock anyway, and waiting here sleeps where the kernel
    /// would spin.
    writing: Mutex<()>,
    /// Readers of local bytes hold it shared; shedding blocks (a file larger than the
    /// pool) holds it exclusively, so no reader ever sees a hole punched under it.
    shed: RwLock<()>,
    /// Open passthrough handles: the kernel reads the file directly, so nothing of it
    /// may be shed while any is open.
    pinned: AtomicU32,
    /// Last block served, where a sequential reader is now.
    last_read: AtomicU64,
    /// The dataset this blob is fetched for, as the cluster's other nodes know it: set
    /// by the first dataset that opens it; without it, blocks come only from the lake.
    scope: OnceLock<String>,
    lake: Arc<dyn Lake>,
    pool: Arc<PoolShared>,
}

/// Testing hook: a pause, in microseconds, between a shed block's slot being cleared
/// and its hole being punched (the window a fetch of that block must never land in).
#[cfg(feature = "testing")]
pub static SHED_PUNCH_DELAY_US: AtomicU64 = AtomicU64::new(0);

impl Drop for CachedBlob {
    fn drop(&mut self) {
        self.pool.read_buffer.forget(self.id);
    }
}

impl CachedBlob {
    pub(super) fn open(
        key: String,
        entry: &Entry,
        dir: PathBuf,
        lake: Arc<dyn Lake>,
        pool: Arc<PoolShared>,
    ) -> Result<Self, CacheError> {
        std::fs::create_dir_all(&dir).map_err(|e| CacheError::io(&dir, e))?;
        let data_path = dir.join(format!("{key}.data"));
        let map_path = dir.join(format!("{key}.map"));
        let io = |e| CacheError::io(&data_path, e);
        // A data file created now starts with an empty map, whatever map is on disk:
        // the map describes one data file, and a map outliving its data file (deleted
        // by hand, or an interrupted eviction) would otherwise vouch for holes.
        let (data, created) = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&data_path)
                    .map_err(io)?,
                true,
            ),
            Err(e) => return Err(io(e)),
        };
        // A blob version never changes size: a data file of another length was cut
        // short or extended behind our back, and none of its blocks is trusted.
        let len = data.metadata().map_err(io)?.len();
        if len != entry.size {
            data.set_len(entry.size).map_err(io)?;
        }
        let (bs, boot) = (pool.config.block_size, pool.config.boot);
        let map = if created || len != entry.size {
            // The pool counted the old map's blocks as resident bytes: they are gone.
            if let Ok(Some(stale)) = super::residency::resident_bytes_at(&map_path) {
                pool.block_dropped(&key, stale);
            }
            Residency::create(&map_path, bs, entry.size, boot)
        } else {
            Residency::open(&map_path, bs, entry.size, boot)
        }
        .map_err(|e| CacheError::io(&map_path, e))?;
        Ok(CachedBlob {
            key,
            blob: entry.blob.clone(),
            size: entry.size,
            etag: entry.etag.clone(),
            md5: entry.md5,
            data_path,
            data,
            direct: Mutex::new(None),
            id: pool.next_blob_id.fetch_add(1, Ordering::Relaxed),
            map,
            inflight: Mutex::new(HashMap::new()),
            md5_checking: AtomicBool::new(false),
            verifying: AtomicBool::new(false),
            writing: Mutex::new(()),
            shed: RwLock::new(()),
            pinned: AtomicU32::new(0),
            last_read: AtomicU64::new(0),
            scope: OnceLock::new(),
            lake,
            pool,
        })
    }

    /// Descriptors this blob holds open now: its data file, and the map file and a
    /// descriptor for direct writes while it is being filled.
    pub fn descriptors(&self) -> usize {
        1 + self.map.holds_file() as usize + self.direct.lock().is_some() as usize
    }

    pub fn residency(&self) -> &Residency {
        &self.map
    }

    pub fn blocks_for(&self, range: Range<u64>) -> Range<u64> {
        let bs = self.map.block_size();
        let end = range.end.min(self.size);
        if range.start >= end {
            return 0..0;
        }
        range.start / bs..end.div_ceil(bs)
    }

    /// Makes blocks `blocks` resident, fetching the missing ones (consecutive missing
    /// blocks in one ranged GET; one fetch per block however many callers ask). For
    /// filling the cache (prewarm): fetched blocks are not held for a reader.
    pub async fn ensure(self: &Arc<Self>, blocks: Range<u64>) -> Result<(), Arc<CacheError>> {
        self.ensure_for(blocks, false).await
    }

    async fn ensure_for(
        self: &Arc<Self>,
        blocks: Range<u64>,
        hold: bool,
    ) -> Result<(), Arc<CacheError>> {
        for r in futures::future::join_all(self.request(blocks, false, hold, false)).await {
            r?;
        }
        Ok(())
    }

    /// Makes blocks `blocks` resident for a peer that asked this node, their owner:
    /// missing ones come from the lake, never from another peer (two nodes whose views
    /// of the members differ never send a request round in a circle), and one fetch
    /// serves every asker.
    pub async fn ensure_from_lake(
        self: &Arc<Self>,
        blocks: Range<u64>,
    ) -> Result<(), Arc<CacheError>> {
        for r in futures::future::join_all(self.request(blocks, true, false, true)).await {
            r?;
        }
        Ok(())
    }

    /// The dataset this blob is fetched for, as every node names it (the first set
    /// stays: a blob version listed by two datasets is asked for under the first).
    pub fn set_scope(&self, dataset: &str) {
        let _ = self.scope.set(dataset.to_owned());
    }

    /// Block `i` as this node serves it to a peer: its bytes (checked against their
    /// CRC32C first if not yet in this boot) and that CRC32C, which the asker checks
    /// again. [`CacheError::Refetch`] if the block is not resident (shed or dropped
    /// since it was ensured).
    pub fn peer_block(&self, i: u64) -> Result<(Bytes, u32), CacheError> {
        let _reading = self.shed.read();
        if !self.map.is_resident(i) {
            return Err(CacheError::Refetch);
        }
        let crc = self.map.crc(i);
        if let Some(b) = self.pool.read_buffer.get(self.id, i) {
            return Ok((b, crc));
        }
        if !self.map.is_verified(i) {
            self.verify_block(i)?;
        }
        let r = self.map.block_range(i);
        let mut out = Vec::new();
        append_at(&self.data, &mut out, (r.end - r.start) as usize, r.start)
            .map_err(|e| CacheError::io(&self.data_path, e))?;
        Ok((Bytes::from(out), crc))
    }

    /// Starts fetching blocks in the background for a reader about to read them
    /// (readahead, small files at open); errors surface on read.
    /// The range is extended to a whole GET so that a sliding window asks for
    /// full-size GETs, not one block at a time.
    pub fn prefetch(self: &Arc<Self>, blocks: Range<u64>) {
        let per = self.pool.config.blocks_per_get();
        let end = blocks
            .end
            .div_ceil(per)
            .saturating_mul(per)
            .min(self.map.blocks());
        drop(self.request(blocks.start..end, true, true, false));
    }

    /// One future per block of `blocks` that is not resident. Missing blocks nobody is
    /// fetching yet are grouped into runs of consecutive blocks, each fetched by one
    /// ranged GET of at most `blocks_per_get` blocks (runs of readahead also break at
    /// multiples of it, so a sliding window issues whole GETs; with peers, every run
    /// breaks there, as a run is fetched from one chunk's owner). `hold`: keep the
    /// fetched blocks in the read buffer for the reader who asked. `lake_only`: never
    /// ask a peer (this node is asked as the owner).
    fn request(
        self: &Arc<Self>,
        blocks: Range<u64>,
        aligned: bool,
        hold: bool,
        lake_only: bool,
    ) -> Vec<FetchFuture> {
        let mut per = self.pool.config.blocks_per_get();
        let mut blocks = blocks;
        // A warm read (every block resident) asks nothing of the peers' placement.
        let missing =
            (blocks.start..blocks.end.min(self.map.blocks())).any(|i| !self.map.is_resident(i));
        let mut aligned = aligned || (missing && self.pool.peers().is_some());
        if missing && !lake_only && self.whole_from_peer() {
            // One run for the whole blob, so that its MD5 can be checked before any
            // of its blocks is served (see `fetch_whole_from_peer`).
            blocks = 0..self.map.blocks();
            per = self.map.blocks();
            aligned = false;
        }
        let mut out = Vec::new();
        let mut run: Vec<oneshot::Sender<FetchResult>> = Vec::new();
        let mut run_start = 0;
        let mut inflight = self.inflight.lock();
        for i in blocks.start..blocks.end.min(self.map.blocks()) {
            let joins = self.map.is_resident(i) || inflight.contains_key(&i);
            let full = run.len() as u64 >= per || (aligned && i % per == 0);
            if !run.is_empty() && (joins || full) {
                self.clone()
                    .spawn_run(run_start, std::mem::take(&mut run), hold, lake_only);
            }
            if self.map.is_resident(i) {
                continue;
            }
            if let Some(f) = inflight.get(&i) {
                out.push(f.clone());
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let fut: FetchFuture = rx
                .map(|r| {
                    r.unwrap_or_else(|_| {
                        Err(Arc::new(CacheError::Internal(
                            "fetch task ended early".into(),
                        )))
                    })
                })
                .boxed()
                .shared();
            inflight.insert(i, fut.clone());
            out.push(fut);
            if run.is_empty() {
                run_start = i;
            }
            run.push(tx);
        }
        if !run.is_empty() {
            self.clone().spawn_run(run_start, run, hold, lake_only);
        }
        out
    }

    fn spawn_run(
        self: Arc<Self>,
        first: u64,
        waiters: Vec<oneshot::Sender<FetchResult>>,
        hold: bool,
        lake_only: bool,
    ) {
        tokio::spawn(async move {
            let n = waiters.len() as u64;
            let mut waiters = waiters.into_iter();
            let mut next = first;
            let r = self
                .fetch_run(first, n, hold, lake_only, &mut |i, r| {
                    next = i + 1;
                    self.inflight.lock().remove(&i);
                    if let Some(w) = waiters.next() {
                        let _ = w.send(r);
                    }
                })
                .await;
            if let Err(e) = r {
                let e = Arc::new(e);
                for i in next..first + n {
                    self.inflight.lock().remove(&i);
                    if let Some(w) = waiters.next() {
                        let _ = w.send(Err(e.clone()));
                    }
                }
            }
        });
    }

    /// Fetches blocks `first..first + n`: from their owner among the cluster's other
    /// nodes where there is one (unless `lake_only`), and from the lake what it did not
    /// deliver. `done(i, _)` is called for each block in order.
    async fn fetch_run(
        self: &Arc<Self>,
        first: u64,
        n: u64,
        hold: bool,
        lake_only: bool,
        done: &mut (dyn FnMut(u64, FetchResult) + Send),
    ) -> Result<(), CacheError> {
        let _permit = self
            .pool
            .fetches
            .acquire()
            .await
            .map_err(|_| CacheError::Internal("pool closed".into()))?;
        let mut from = first;
        if !lake_only {
            from = self.fetch_from_peer(first, n, hold, done).await?;
        }
        if from == first + n {
            return Ok(());
        }
        self.fetch_from_lake(from, first + n - from, hold, done)
            .await
    }

    /// Asks the owner of block `first`'s chunk for blocks `first..first + n`, when that
    /// is another node; returns the first block it did not deliver (`first` if it was
    /// not asked). Each block is checked before it is stored, and stored before the
    /// next is taken: its length, the CRC32C its owner recorded when it fetched it from
    /// the lake, and for a one-block blob with a `Content-MD5`, the MD5. A blob with a
    /// `Content-MD5` over several blocks is asked for whole, and recorded only once its
    /// MD5 matches (`fetch_whole_from_peer`); a larger one than that allows comes from
    /// the lake: a peer's bytes are never served before their check.
    /// A peer that fails (unreachable, slow, refusing, or serving bytes that fail their
    /// check) is reported and the rest comes from the lake.
    async fn fetch_from_peer(
        self: &Arc<Self>,
        first: u64,
        n: u64,
        hold: bool,
        done: &mut (dyn FnMut(u64, FetchResult) + Send),
    ) -> Result<u64, CacheError> {
        let (Some(peers), Some(dataset)) = (self.pool.peers(), self.scope.get()) else {
            return Ok(first);
        };
        if self.md5.is_some() && self.map.blocks() > 1 {
            if first == 0 && n == self.map.blocks() && self.whole_from_peer() {
                return self.fetch_whole_from_peer(&*peers, dataset, done).await;
            }
            return Ok(first);
        }
        let ask = self.ask(dataset, first, n);
        let Some(owner) = peers.owner(&ask) else {
            return Ok(first);
        };
        let fail = |fault, detail: String| {
            let f = super::peers::PeerFailure { fault, detail };
            tracing::debug!(blob = %self.blob, owner = %owner, failure = %f, "peer fetch failed; the rest comes from the lake");
            peers.report(&owner, &f);
        };
        let mut blocks = match peers.fetch(&owner, &ask).await {
            Ok(b) => b,
            Err(f) => {
                tracing::debug!(blob = %self.blob, owner = %owner, failure = %f, "peer fetch failed; fetching from the lake");
                peers.report(&owner, &f);
                return Ok(first);
            }
        };
        use super::peers::PeerFault::{Corrupt, Unreachable};
        let mut next = first;
        while next < first + n {
            let block = match blocks.next().await {
                Some(Ok(b)) => b,
                Some(Err(f)) => {
                    tracing::debug!(blob = %self.blob, owner = %owner, failure = %f, "peer fetch failed; the rest comes from the lake");
                    peers.report(&owner, &f);
                    break;
                }
                None => {
                    fail(Unreachable, format!("the answer ended at block {next}"));
                    break;
                }
            };
            let r = self.map.block_range(next);
            if block.index != next || block.bytes.len() as u64 != r.end - r.start {
                fail(
                    Corrupt,
                    format!(
                        "sent block {} of {} bytes for block {next} of {} bytes",
                        block.index,
                        block.bytes.len(),
                        r.end - r.start
                    ),
                );
                break;
            }
            if crc32c::crc32c(&block.bytes) != block.crc {
                fail(
                    Corrupt,
                    format!("block {next} does not match the CRC32C its owner recorded"),
                );
                break;
            }
            let this = self.clone();
            let len = r.end - r.start;
            let stored = tokio::task::spawn_blocking(move || {
                this.store_block(next, aligned_copy(&block.bytes), hold, true)
            })
            .await
            .map_err(|e| CacheError::Internal(format!("block write failed: {e}")))
            .and_then(|r| r);
            match stored {
                Ok(()) => {
                    self.pool.count_dataset(dataset, len, true);
                    done(next, Ok(()));
                    next += 1;
                }
                Err(CacheError::Corrupt { what, .. }) => {
                    fail(Corrupt, format!("block {next}: {what}"));
                    break;
                }
                Err(e) => {
                    // The local write failed: the lake would fare no better.
                    let e = Arc::new(e);
                    done(next, Err(e.clone()));
                    return Err(CacheError::Internal(e.to_string()));
                }
            }
        }
        Ok(next)
    }

    /// What this node asks a peer for: blocks `first..first + n` of this blob.
    fn ask(&self, dataset: &str, first: u64, n: u64) -> super::peers::PeerAsk {
        super::peers::PeerAsk {
            dataset: dataset.to_owned(),
            blob: self.blob.clone(),
            etag: self.etag.clone(),
            size: self.size,
            block_size: self.map.block_size(),
            chunk_blocks: self.pool.config.blocks_per_get(),
            first,
            n,
        }
    }

    /// The ask for this blob's whole-blob transfer (blocks `0..blocks`).
    fn whole_ask(&self, dataset: &str) -> super::peers::PeerAsk {
        self.ask(dataset, 0, self.map.blocks())
    }

    /// Whether this blob's missing blocks are taken from a peer in one whole-blob
    /// transfer: it has a `Content-MD5` over several blocks (checkable only over the
    /// whole blob), is at most [`super::peers::MAX_WHOLE_BLOCKS`] blocks, and another
    /// node owns its first chunk.
    fn whole_from_peer(&self) -> bool {
        let blocks = self.map.blocks();
        if self.md5.is_none() || !(2..=super::peers::MAX_WHOLE_BLOCKS).contains(&blocks) {
            return false;
        }
        match (self.pool.peers(), self.scope.get()) {
            (Some(p), Some(d)) => p.owner(&self.whole_ask(d)).is_some(),
            _ => false,
        }
    }

    /// A blob with a `Content-MD5` over several blocks, taken whole from its owner:
    /// every block is checked against its CRC32C and written to the data file as it
    /// comes, but recorded (so served) only once the MD5 of all of them matches the
    /// lake's. A peer that fails or whose bytes do not match is reported, and the lake
    /// fetches the whole run again (over the unrecorded bytes). Returns the first block
    /// not delivered: the blob's block count on success, else 0.
    async fn fetch_whole_from_peer(
        self: &Arc<Self>,
        peers: &dyn super::peers::BlockPeers,
        dataset: &str,
        done: &mut (dyn FnMut(u64, FetchResult) + Send),
    ) -> Result<u64, CacheError> {
        use super::peers::PeerFault::{Corrupt, Unreachable};
        let ask = self.whole_ask(dataset);
        let Some(owner) = peers.owner(&ask) else {
            return Ok(0);
        };
        let fail = |fault, detail: String| {
            let f = super::peers::PeerFailure { fault, detail };
            tracing::debug!(blob = %self.blob, owner = %owner, failure = %f, "whole-blob peer fetch failed; fetching from the lake");
            peers.report(&owner, &f);
            Ok(0)
        };
        let mut blocks = match peers.fetch(&owner, &ask).await {
            Ok(b) => b,
            Err(f) => return fail(f.fault, f.detail),
        };
        let mut md5 = Md5::new();
        let mut crcs = Vec::with_capacity(ask.n as usize);
        for i in 0..ask.n {
            let block = match blocks.next().await {
                Some(Ok(b)) => b,
                Some(Err(f)) => return fail(f.fault, f.detail),
                None => return fail(Unreachable, format!("the answer ended at block {i}")),
            };
            let r = self.map.block_range(i);
            if block.index != i || block.bytes.len() as u64 != r.end - r.start {
                return fail(
                    Corrupt,
                    format!(
                        "sent block {} of {} bytes for block {i}",
                        block.index,
                        block.bytes.len()
                    ),
                );
            }
            if crc32c::crc32c(&block.bytes) != block.crc {
                return fail(
                    Corrupt,
                    format!("block {i} does not match the CRC32C its owner recorded"),
                );
            }
            md5.update(&block.bytes);
            crcs.push(block.crc);
            // Written now, recorded after the check: nobody reads an unrecorded block.
            let this = self.clone();
            let bytes = block.bytes;
            tokio::task::spawn_blocking(move || {
                if this.map.is_resident(i) {
                    return Ok(());
                }
                this.pool.wait_for_room(r.end - r.start);
                let _one = this.writing.lock();
                this.data.write_all_at(&bytes, r.start)
            })
            .await
            .map_err(|e| CacheError::Internal(format!("block write failed: {e}")))?
            .map_err(|e| CacheError::io(&self.data_path, e))?;
        }
        if Some(<[u8; 16]>::from(md5.finalize())) != self.md5 {
            return fail(
                Corrupt,
                "the whole blob does not match the lake's Content-MD5".into(),
            );
        }
        let this = self.clone();
        let landed = tokio::task::spawn_blocking(move || -> Result<u64, CacheError> {
            let io = |e| CacheError::io(&this.data_path, e);
            let mut landed = 0;
            for (i, crc) in crcs.into_iter().enumerate() {
                let i = i as u64;
                if this.map.is_resident(i) {
                    continue;
                }
                let r = this.map.block_range(i);
                this.map.mark_resident(i, crc).map_err(io)?;
                this.pool.block_landed(&this.key, r.end - r.start, true);
                landed += r.end - r.start;
            }
            this.map.set_flag(FLAG_MD5_VERIFIED).map_err(io)?;
            *this.direct.lock() = None;
            Ok(landed)
        })
        .await
        .map_err(|e| CacheError::Internal(format!("recording blocks failed: {e}")))??;
        self.pool.count_dataset(dataset, landed, true);
        for i in 0..ask.n {
            done(i, Ok(()));
        }
        Ok(ask.n)
    }

    /// Fetches blocks `first..first + n` with one streamed GET. Each block is written
    /// and recorded as soon as its bytes are in (`done(i, Ok)`), while the next one is
    /// still arriving; at most one block is being filled and one written per GET.
    async fn fetch_from_lake(
        self: &Arc<Self>,
        first: u64,
        n: u64,
        hold: bool,
        done: &mut (dyn FnMut(u64, FetchResult) + Send),
    ) -> Result<(), CacheError> {
        let range = self.map.block_range(first).start..self.map.block_range(first + n - 1).end;
        let mut body = self
            .lake
            .get_stream(&self.blob, range, &self.etag)
            .await
            .map_err(|e| self.lake_error(e))?;
        let mut next = first;
        let mut buf: Option<BlockBuf> = None;
        let mut writing: Option<(u64, tokio::task::JoinHandle<Result<(), CacheError>>)> = None;
        // A lake failure mid-stream ends the run only after the block being written is
        // written and recorded: its waiter is told, and its slot is not given up (to a
        // shed or another fetch) while the write could still land.
        let mut failure = None;
        while next < first + n {
            let Some(chunk) = body.next().await else {
                break;
            };
            let mut chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(self.lake_error(e));
                    break;
                }
            };
            while !chunk.is_empty() && next < first + n {
                let r = self.map.block_range(next);
                let len = (r.end - r.start) as usize;
                let b = buf.get_or_insert_with(|| BlockBuf::new(len));
                let part = chunk.split_to((len - b.len()).min(chunk.len()));
                b.extend(&part);
                if b.len() < len {
                    continue;
                }
                let block = buf.take().expect("filled above").freeze();
                if let Some((i, w)) = writing.take() {
                    done(i, join_write(w).await);
                }
                let this = self.clone();
                writing = Some((
                    next,
                    tokio::task::spawn_blocking(move || {
                        let len = block.len() as u64;
                        this.store_block(next, block, hold, false)?;
                        if let Some(d) = this.scope.get() {
                            this.pool.count_dataset(d, len, false);
                        }
                        Ok(())
                    }),
                ));
                next += 1;
            }
        }
        if let Some((i, w)) = writing.take() {
            let r = join_write(w).await;
            let failed = r
                .as_ref()
                .err()
                .map(|e| CacheError::Internal(e.to_string()));
            done(i, r);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if next < first + n {
            let got = self.map.block_range(next).start - self.map.block_range(first).start;
            let expected =
                self.map.block_range(first + n - 1).end - self.map.block_range(first).start;
            return Err(CacheError::Lake(LakeError::Truncated {
                name: self.blob.clone(),
                expected,
                got,
            }));
        }
        Ok(())
    }

    fn lake_error(&self, e: LakeError) -> CacheError {
        if let LakeError::Changed { .. } = e.root() {
            tracing::error!(blob = %self.blob, etag = %self.etag, "blob changed in the lake since the snapshot; refusing to mix versions");
        }
        CacheError::Lake(e)
    }

    /// Checks, writes and records one fetched block (on a blocking thread: a 4 MiB
    /// write must not stall the runtime's network work); `hold`: then keeps it in the
    /// read buffer for the reader waiting for it.
    fn store_block(
        self: &Arc<Self>,
        i: u64,
        body: Bytes,
        hold: bool,
        from_peer: bool,
    ) -> Result<(), CacheError> {
        if self.map.is_resident(i) {
            if hold {
                self.pool.read_buffer.insert(self.id, i, body);
            }
            return Ok(());
        }
        let range = self.map.block_range(i);
        if self.map.blocks() == 1
            && let Some(md5) = self.md5
            && <[u8; 16]>::from(Md5::digest(&body)) != md5
        {
            return Err(CacheError::Corrupt {
                blob: self.blob.clone(),
                what: "Content-MD5 of the fetched bytes does not match the lake's".into(),
            });
        }
        let crc = crc32c::crc32c(&body);
        self.pool.wait_for_room(range.end - range.start);
        {
            let _one = self.writing.lock();
            self.write_block(&body, range.start)
                .map_err(|e| CacheError::io(&self.data_path, e))?;
        }
        self.map
            .mark_resident(i, crc)
            .map_err(|e| CacheError::io(&self.data_path, e))?;
        if self.map.is_complete() {
            // Nothing more to write: the descriptor for direct writes goes.
            *self.direct.lock() = None;
        }
        if hold {
            self.pool.read_buffer.insert(self.id, i, body);
        }
        if self.map.blocks() == 1 && self.md5.is_some() {
            let _ = self.map.set_flag(FLAG_MD5_VERIFIED);
        }
        self.pool
            .block_landed(&self.key, range.end - range.start, from_peer);
        if self.map.blocks() > 1 && self.map.is_complete() && self.md5.is_some() {
            // After this block's readers are answered, not before.
            let this = self.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = this.check_whole_md5() {
                    tracing::warn!(blob = %this.blob, error = %e, "whole-blob MD5 check failed");
                }
            });
        }
        Ok(())
    }

    /// Writes one block's bytes at `at`: with direct I/O when the block is whole and
    /// aligned and the file system takes it, else through the page cache. The first
    /// refusal (`EINVAL`: a file system without `O_DIRECT`, or stricter alignment)
    /// turns direct I/O off for the pool, once, with a log line.
    fn write_block(&self, body: &[u8], at: u64) -> std::io::Result<()> {
        let aligned = body.len() >= DIO_ALIGN
            && body.len().is_multiple_of(DIO_ALIGN)
            && at.is_multiple_of(DIO_ALIGN as u64)
            && (body.as_ptr() as usize).is_multiple_of(DIO_ALIGN);
        if aligned && self.pool.direct_io.load(Ordering::Relaxed) {
            let direct = {
                let mut held = self.direct.lock();
                if held.is_none() {
                    use std::os::fd::AsRawFd;
                    use std::os::unix::fs::OpenOptionsExt;
                    // The same file as `self.data`, reopened through its descriptor,
                    // never by path: the path may name another file by now (evicted
                    // and created again by a later open), and writes there would leave
                    // this file's blocks as holes that fail their checks.
                    *held = OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(format!("/proc/self/fd/{}", self.data.as_raw_fd()))
                        .map_err(|e| self.direct_io_refused(e))
                        .ok()
                        .map(Arc::new);
                }
                held.clone()
            };
            if let Some(f) = direct {
                match f.write_all_at(body, at) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct_io_refused(e),
                    Err(e) => return Err(e),
                }
            }
        }
        self.data.write_all_at(body, at)
    }

    fn direct_io_refused(&self, e: std::io::Error) {
        if self.pool.direct_io.swap(false, Ordering::Relaxed) {
            tracing::info!(file = %self.data_path.display(), error = %e, "the cache directory's file system refuses direct I/O; writing blocks through the page cache");
        }
    }

    /// Once every block of a multi-block blob is in, checks the blob's `Content-MD5`
    /// over the local copy (one read-back, on a blocking thread of its own; no reader
    /// waits for it). A mismatch drops every block so the next reads fetch them
    /// again; a second mismatch means the lake's MD5 itself disagrees with the bytes it
    /// serves under the pinned ETag, which is recorded and logged, and those bytes are
    /// served as they are.
    fn check_whole_md5(&self) -> Result<(), CacheError> {
        let Some(want) = self.md5 else { return Ok(()) };
        if self.map.flags() & (FLAG_MD5_VERIFIED | FLAG_MD5_MISMATCH) != 0
            || self.md5_checking.swap(true, Ordering::AcqRel)
        {
            return Ok(());
        }
        let r = {
            // Shed blocks would read as zeros: check only a copy that is whole.
            let _reading = self.shed.read();
            if !self.map.is_complete() {
                self.md5_checking.store(false, Ordering::Release);
                return Ok(());
            }
            self.whole_md5()
        };
        self.md5_checking.store(false, Ordering::Release);
        let io = |e| CacheError::io(&self.data_path, e);
        if r.map_err(io)? == want {
            return self.map.set_flag(FLAG_MD5_VERIFIED).map_err(io);
        }
        if self.map.flags() & FLAG_MD5_REFETCHED == 0 {
            tracing::warn!(blob = %self.blob, "cached copy does not match the blob's Content-MD5; fetching it again");
            self.map.set_flag(FLAG_MD5_REFETCHED).map_err(io)?;
            self.pool.read_buffer.forget(self.id);
            for i in 0..self.map.blocks() {
                let r = self.map.block_range(i);
                self.map.drop_block(i).map_err(io)?;
                self.pool.block_dropped(&self.key, r.end - r.start);
            }
            return Ok(());
        }
        tracing::error!(blob = %self.blob, etag = %self.etag, "the lake's Content-MD5 for this blob does not match the bytes it serves (fetched twice); serving the lake's bytes as they are");
        self.map.set_flag(FLAG_MD5_MISMATCH).map_err(io)
    }

    fn whole_md5(&self) -> std::io::Result<[u8; 16]> {
        let mut h = Md5::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(buf.len() as u64) as usize;
            self.data.read_exact_at(&mut buf[..n], off)?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        if self.pool.direct_io.load(Ordering::Relaxed) {
            // The blocks were written around the page cache; do not leave the whole
            // file there now for one check (clean pages: dropping them is only a hint).
            use std::os::fd::AsRawFd;
            // SAFETY: plain posix_fadvise(2) on a descriptor this struct owns.
            unsafe { libc::posix_fadvise(self.data.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        Ok(h.finalize().into())
    }

    /// Whether the local copy matched the blob's whole-object `Content-MD5`.
    pub fn md5_verified(&self) -> bool {
        self.map.flags() & FLAG_MD5_VERIFIED != 0
    }

    /// Whether the lake's `Content-MD5` was found not to match its bytes.
    pub fn md5_mismatch(&self) -> bool {
        self.map.flags() & FLAG_MD5_MISMATCH != 0
    }

    /// Whether a read of `blocks` can be answered now, without a fetch: each block is
    /// held in the read buffer, or resident and checked in this boot.
    pub fn is_ready(&self, blocks: Range<u64>) -> bool {
        blocks.into_iter().all(|i| {
            (self.map.is_resident(i) && self.map.is_verified(i))
                || self.pool.read_buffer.contains(self.id, i)
        })
    }

    /// Reads `len` bytes at `offset`: from the read buffer where it holds the blocks
    /// (without a copy when one block covers the read), else from resident blocks on
    /// disk, checking any block not yet checked in this boot (see residency.rs). A
    /// held block is released once a read has covered its end. Blocks must be held or
    /// resident (see [`Self::ensure`]); one dropped meanwhile gives
    /// [`CacheError::Refetch`].
    pub fn read_resident(&self, offset: u64, len: usize) -> Result<Bytes, CacheError> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let _reading = self.shed.read();
        let blocks = self.blocks_for(offset..end);
        self.last_read.store(blocks.end - 1, Ordering::Relaxed);
        let buffer = &self.pool.read_buffer;
        let mut held = Vec::with_capacity((blocks.end - blocks.start) as usize);
        for i in blocks.clone() {
            let h = buffer.get(self.id, i);
            if h.is_none() {
                if !self.map.is_resident(i) {
                    // Dropped since the caller looked (a failed check, or shed): fetch it again.
                    return Err(CacheError::Refetch);
                }
                if !self.map.is_verified(i) {
                    self.verify_block(i)?;
                }
            }
            held.push(h);
        }
        let release = |i: u64| {
            if self.map.block_range(i).end <= end {
                buffer.remove(self.id, i);
            }
        };
        if let [Some(b)] = held.as_slice() {
            let r = self.map.block_range(blocks.start);
            let out = b.slice((offset - r.start) as usize..(end - r.start) as usize);
            release(blocks.start);
            return Ok(out);
        }
        let io = |e| CacheError::io(&self.data_path, e);
        let mut out = Vec::new();
        if held.iter().all(Option::is_none) {
            append_at(&self.data, &mut out, (end - offset) as usize, offset).map_err(io)?;
            return Ok(Bytes::from(out));
        }
        out.reserve((end - offset) as usize);
        for (i, h) in blocks.zip(held) {
            let r = self.map.block_range(i);
            let (a, b) = (offset.max(r.start), end.min(r.end));
            match h {
                Some(h) => {
                    out.extend_from_slice(&h[(a - r.start) as usize..(b - r.start) as usize]);
                    release(i);
                }
                None => append_at(&self.data, &mut out, (b - a) as usize, a).map_err(io)?,
            }
        }
        Ok(Bytes::from(out))
    }

    fn verify_block(&self, i: u64) -> Result<(), CacheError> {
        // (A block that fails here is dropped and fetched again by the reader.)
        let r = self.map.block_range(i);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        self.data
            .read_exact_at(&mut buf, r.start)
            .map_err(|e| CacheError::io(&self.data_path, e))?;
        if crc32c::crc32c(&buf) == self.map.crc(i) {
            self.map
                .mark_verified(i)
                .map_err(|e| CacheError::io(&self.data_path, e))
        } else {
            tracing::warn!(blob = %self.blob, block = i, "cached block failed its checksum; fetching it again");
            self.map
                .drop_block(i)
                .map_err(|e| CacheError::io(&self.data_path, e))?;
            self.pool.block_dropped(&self.key, r.end - r.start);
            Err(CacheError::Refetch)
        }
    }

    /// Reads through the cache: fetches what is missing (held for this reader), then
    /// serves it.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Bytes, Arc<CacheError>> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        // A block that fails verification is dropped and fetched again; so is one shed
        // (a pool smaller than what is open) between the fetch and the read. The
        // shedder spares what is at and ahead of the reader: mark where this read
        // starts, so blocks it is about to read are not taken as behind it (they were,
        // by the previous read's position: a read spanning most of a small pool lost
        // its own blocks on every attempt).
        let blocks = self.blocks_for(offset..end);
        for _ in 0..READ_ATTEMPTS {
            self.last_read.store(blocks.start, Ordering::Relaxed);
            self.ensure_for(blocks.clone(), true).await?;
            match self.read_resident(offset, len) {
                Err(CacheError::Refetch) => continue,
                r => return r.map_err(Arc::new),
            }
        }
        Err(Arc::new(CacheError::Corrupt {
            blob: self.blob.clone(),
            what: format!(
                "blocks were dropped before they could be read on {READ_ATTEMPTS} attempts (each failed its checksum, or the pool, smaller than the files open, shed them)"
            ),
        }))
    }

    /// The local data file, for passthrough: hand it to the kernel only while the file
    /// is pinned by [`Self::begin_passthrough`].
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// Pins the file for a passthrough open if it is fully resident and verified:
    /// until [`Self::end_passthrough`], none of its blocks is shed. Never reads the
    /// file: a complete file with blocks not yet checked in this boot (after a reboot)
    /// gets them checked in the background ([`Self::verify_in_background`]) and is
    /// opened without passthrough meanwhile, its reads checking block by block.
    pub fn begin_passthrough(self: &Arc<Self>) -> bool {
        let _reading = self.shed.read();
        if !self.map.is_complete() {
            return false;
        }
        if !self.map.is_fully_verified() {
            self.verify_in_background();
            return false;
        }
        self.pinned.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Checks every resident block not yet checked in this boot, on a blocking thread
    /// (once at a time per file), so that the next open can use passthrough. Needs a
    /// tokio runtime context.
    pub fn verify_in_background(self: &Arc<Self>) {
        if self.verifying.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let r = {
                let _reading = this.shed.read();
                this.verify_all()
            };
            this.verifying.store(false, Ordering::Release);
            if let Err(e) = r {
                tracing::warn!(blob = %this.blob, error = %e, "checking cached blocks failed");
            }
        });
    }

    /// One more passthrough handle on a file already pinned by another.
    pub fn pin_passthrough(&self) {
        self.pinned.fetch_add(1, Ordering::AcqRel);
    }

    pub fn end_passthrough(&self) {
        self.pinned.fetch_sub(1, Ordering::AcqRel);
    }

    /// Frees up to `want` bytes of this open file's blocks, for a pool that its open
    /// files alone overflow (a file larger than the pool): blocks behind where it is
    /// being read first, then the furthest ahead, never the readahead just ahead of the
    /// reader, a block being fetched, or anything of a file open with passthrough.
    /// The slot is cleared before the hole is punched, so a crash in between leaves a
    /// block to fetch again, never a slot over a hole. Returns the bytes freed.
    pub(super) fn shed_blocks(&self, want: u64) -> u64 {
        let _exclusive = self.shed.write();
        if self.pinned.load(Ordering::Acquire) > 0 {
            return 0;
        }
        let blocks = self.map.blocks();
        let at = self.last_read.load(Ordering::Relaxed).min(blocks);
        let keep = (self.pool.config.max_readahead / self.map.block_size()).max(1) + 1;
        let behind = 0..at;
        let far_ahead = (at.saturating_add(keep).min(blocks)..blocks).rev();
        let mut freed = 0;
        for i in behind.chain(far_ahead) {
            if freed >= want {
                break;
            }
            // Held until the hole is punched: a fetch decides "missing, fetch it" under
            // this lock (`request`), so none can write the block between its slot being
            // cleared and the punch (the map would say resident over a hole: zeros).
            let inflight = self.inflight.lock();
            if !self.map.is_resident(i) || inflight.contains_key(&i) {
                continue;
            }
            let r = self.map.block_range(i);
            if self.map.drop_block(i).is_err() {
                break;
            }
            #[cfg(feature = "testing")]
            {
                let us = SHED_PUNCH_DELAY_US.load(Ordering::Relaxed);
                if us > 0 {
                    std::thread::sleep(std::time::Duration::from_micros(us));
                }
            }
            use std::os::fd::AsRawFd;
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain fallocate(2) on a descriptor this struct owns.
            let punched = unsafe {
                libc::fallocate(
                    self.data.as_raw_fd(),
                    mode,
                    r.start as libc::off_t,
                    (r.end - r.start) as libc::off_t,
                )
            } == 0;
            drop(inflight);
            if !punched {
                tracing::warn!(blob = %self.blob, error = %std::io::Error::last_os_error(), "cannot punch a hole in a cache file; the pool can overflow while a file larger than it is open");
                break;
            }
            self.pool.block_dropped(&self.key, r.end - r.start);
            freed += r.end - r.start;
        }
        freed
    }

    /// Checks every resident block not yet checked in this boot; whether all blocks
    /// are now resident and checked (see [`Self::begin_passthrough`]).
    fn verify_all(&self) -> Result<bool, CacheError> {
        for i in 0..self.map.blocks() {
            if self.map.is_resident(i) && !self.map.is_verified(i) {
                match self.verify_block(i) {
                    Ok(()) => {}
                    Err(CacheError::Refetch) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(self.map.is_fully_verified())
    }
}
