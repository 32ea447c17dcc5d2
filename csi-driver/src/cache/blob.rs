//! One cached blob version: a sparse local data file plus its [`Residency`] map, and
//! the single-flight machinery that fetches missing blocks from the lake.
//!
//! - Blocks are fetched with ranged GETs pinned to the snapshot's ETag, so bytes of two
//!   versions never mix; a changed blob fails the read (EIO upstream) and says so.
//! - Concurrent readers of the same missing block share one fetch: the first creates a
//!   shared future in `inflight`, the others await it.
//! - Every fetched block is checked before it is written: its length, and for a blob that
//!   is one block with a `Content-MD5`, the MD5. Its CRC32C is stored in the map and
//!   re-checked before the block is first served after a reboot (residency.rs).
//! - The number of GETs in flight is bounded by the pool's semaphore, so memory held by
//!   fetch buffers is at most `max_fetches × block size`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use md5::{Digest, Md5};
use parking_lot::Mutex;

use super::residency::{FLAG_MD5_VERIFIED, Residency};
use super::snapshot::Entry;
use super::{CacheError, PoolShared};
use crate::lake::{Lake, LakeError};

type FetchResult = Result<(), Arc<CacheError>>;
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
    map: Residency,
    inflight: Mutex<HashMap<u64, FetchFuture>>,
    lake: Arc<dyn Lake>,
    pool: Arc<PoolShared>,
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
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| CacheError::io(&data_path, e))?;
        if data.metadata().map_err(|e| CacheError::io(&data_path, e))?.len() != entry.size {
            data.set_len(entry.size).map_err(|e| CacheError::io(&data_path, e))?;
        }
        let map = Residency::open(&map_path, pool.config.block_size, entry.size, pool.config.boot).map_err(|e| CacheError::io(&map_path, e))?;
        Ok(CachedBlob {
            key,
            blob: entry.blob.clone(),
            size: entry.size,
            etag: entry.etag.clone(),
            md5: entry.md5,
            data_path,
            data,
            map,
            inflight: Mutex::new(HashMap::new()),
            lake,
            pool,
        })
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

    /// Makes blocks `blocks` resident, fetching the missing ones (in parallel, one fetch
    /// per block however many callers ask).
    pub async fn ensure(self: &Arc<Self>, blocks: Range<u64>) -> Result<(), Arc<CacheError>> {
        let waits: Vec<FetchFuture> = blocks
            .filter(|&i| !self.map.is_resident(i))
            .map(|i| self.fetch(i))
            .collect();
        for r in futures::future::join_all(waits).await {
            r?;
        }
        Ok(())
    }

    /// Starts fetching blocks in the background (readahead); errors surface on read.
    pub fn prefetch(self: &Arc<Self>, blocks: Range<u64>) {
        for i in blocks.filter(|&i| i < self.map.blocks()) {
            if !self.map.is_resident(i) {
                let _ = self.fetch(i);
            }
        }
    }

    fn fetch(self: &Arc<Self>, i: u64) -> FetchFuture {
        let mut inflight = self.inflight.lock();
        if let Some(f) = inflight.get(&i) {
            return f.clone();
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let r = this.fetch_block(i).await.map_err(Arc::new);
            this.inflight.lock().remove(&i);
            r
        });
        let fut: FetchFuture = async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Arc::new(CacheError::Internal(format!("fetch task failed: {e}")))),
            }
        }
        .boxed()
        .shared();
        inflight.insert(i, fut.clone());
        fut
    }

    async fn fetch_block(&self, i: u64) -> Result<(), CacheError> {
        if self.map.is_resident(i) {
            return Ok(());
        }
        let range = self.map.block_range(i);
        let want = range.end - range.start;
        let _permit = self.pool.fetches.acquire().await.map_err(|_| CacheError::Internal("pool closed".into()))?;
        let body = self.lake.get_range(&self.blob, range.clone(), &self.etag).await.map_err(|e| {
            if let LakeError::Changed { .. } = e.root() {
                tracing::error!(blob = %self.blob, etag = %self.etag, "blob changed in the lake since the snapshot; refusing to mix versions");
            }
            CacheError::Lake(e)
        })?;
        if body.len() as u64 != want {
            return Err(CacheError::Lake(LakeError::Truncated { name: self.blob.clone(), expected: want, got: body.len() as u64 }));
        }
        if self.map.blocks() == 1 {
            if let Some(md5) = self.md5 {
                if <[u8; 16]>::from(Md5::digest(&body)) != md5 {
                    return Err(CacheError::Corrupt { blob: self.blob.clone(), what: "Content-MD5 of the fetched bytes does not match the lake's".into() });
                }
            }
        }
        let crc = crc32c::crc32c(&body);
        self.data.write_all_at(&body, range.start).map_err(|e| CacheError::io(&self.data_path, e))?;
        self.map.mark_resident(i, crc).map_err(|e| CacheError::io(&self.data_path, e))?;
        if self.map.blocks() == 1 && self.md5.is_some() {
            let _ = self.map.set_flag(FLAG_MD5_VERIFIED);
        }
        self.pool.block_landed(&self.key, want);
        Ok(())
    }

    /// Reads `len` bytes at `offset` from resident blocks, verifying any block served for
    /// the first time in this process. Blocks must be resident (see [`Self::ensure`]).
    pub fn read_resident(&self, offset: u64, len: usize) -> Result<Vec<u8>, CacheError> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        for i in self.blocks_for(offset..end) {
            if !self.map.is_resident(i) {
                return Err(CacheError::Internal(format!("block {i} of {} is not resident", self.blob)));
            }
            if !self.map.is_verified(i) {
                self.verify_block(i)?;
            }
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        self.data.read_exact_at(&mut buf, offset).map_err(|e| CacheError::io(&self.data_path, e))?;
        Ok(buf)
    }

    fn verify_block(&self, i: u64) -> Result<(), CacheError> {
        let r = self.map.block_range(i);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        self.data.read_exact_at(&mut buf, r.start).map_err(|e| CacheError::io(&self.data_path, e))?;
        if crc32c::crc32c(&buf) == self.map.crc(i) {
            self.map.mark_verified(i).map_err(|e| CacheError::io(&self.data_path, e))
        } else {
            tracing::warn!(blob = %self.blob, block = i, "cached block failed its checksum; fetching it again");
            self.map.drop_block(i).map_err(|e| CacheError::io(&self.data_path, e))?;
            self.pool.block_dropped(&self.key, r.end - r.start);
            Err(CacheError::Refetch)
        }
    }

    /// Reads through the cache: fetches what is missing, then serves from disk.
    pub async fn read(self: &Arc<Self>, offset: u64, len: usize) -> Result<Vec<u8>, Arc<CacheError>> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        // A block that fails verification is dropped and fetched once more.
        for _ in 0..2 {
            self.ensure(self.blocks_for(offset..end)).await?;
            match self.read_resident(offset, len) {
                Err(CacheError::Refetch) => continue,
                r => return r.map_err(Arc::new),
            }
        }
        Err(Arc::new(CacheError::Corrupt { blob: self.blob.clone(), what: "block failed verification twice".into() }))
    }

    /// The local data file, for passthrough. Only valid while fully verified.
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// Checks every resident block not yet verified in this process (used before a
    /// fully resident file is handed to the kernel for passthrough).
    pub fn verify_all(&self) -> Result<bool, CacheError> {
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
