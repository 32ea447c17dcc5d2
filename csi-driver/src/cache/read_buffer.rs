//! Blocks fetched for a reader, held in memory until that reader has read them.
//!
//! A cold read fetches a block, checks it and writes it to the cache file with direct
//! I/O (blob.rs): the bytes go to the NVMe without a copy in the page cache, so a
//! dataset is not cached twice in RAM (once as the cache file, once as the FUSE file the
//! reader sees). The reader is then answered from this buffer, not from the disk.
//!
//! - A block is dropped from the buffer as soon as a read has covered its end (a
//!   sequential reader has passed it; the kernel keeps its own copy in the FUSE page
//!   cache), or when the pool's budget is exceeded, oldest first. A block that is not
//!   here is read from the cache file, so dropping one only costs a disk read.
//! - Only fetches that a reader waits for or reads ahead for are held (prewarm is not:
//!   nobody is about to read those bytes).
//! - Bounded: at most `budget` bytes of blocks, plus the queue's bookkeeping, which is
//!   compacted whenever it holds more stale entries than live ones.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use parking_lot::Mutex;

#[derive(Debug)]
pub(crate) struct ReadBuffer {
    budget: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Blob id → block → bytes and the insertion number that queued them.
    blobs: HashMap<u64, HashMap<u64, (Bytes, u64)>>,
    /// Insertion order: (blob id, block, insertion number). Entries whose block was
    /// removed or replaced since are stale and skipped.
    order: VecDeque<(u64, u64, u64)>,
    bytes: u64,
    live: usize,
    seq: u64,
}

impl Inner {
    fn is_live(&self, &(blob, block, seq): &(u64, u64, u64)) -> bool {
        self.blobs
            .get(&blob)
            .and_then(|m| m.get(&block))
            .is_some_and(|(_, s)| *s == seq)
    }

    fn take(&mut self, blob: u64, block: u64) -> Option<Bytes> {
        let m = self.blobs.get_mut(&blob)?;
        let (data, _) = m.remove(&block)?;
        if m.is_empty() {
            self.blobs.remove(&blob);
        }
        self.bytes -= data.len() as u64;
        self.live -= 1;
        Some(data)
    }
}

impl ReadBuffer {
    pub fn new(budget: u64) -> Self {
        ReadBuffer {
            budget,
            inner: Mutex::default(),
        }
    }

    /// Holds `data` as block `block` of blob `blob`, dropping the oldest blocks if the
    /// budget is exceeded. A block larger than the whole budget is not held.
    pub fn insert(&self, blob: u64, block: u64, data: Bytes) {
        let len = data.len() as u64;
        if len > self.budget {
            return;
        }
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.take(blob, block);
        inner.seq += 1;
        let seq = inner.seq;
        inner
            .blobs
            .entry(blob)
            .or_default()
            .insert(block, (data, seq));
        inner.bytes += len;
        inner.live += 1;
        inner.order.push_back((blob, block, seq));
        while inner.bytes > self.budget {
            let Some(front) = inner.order.pop_front() else {
                break;
            };
            if inner.is_live(&front) {
                inner.take(front.0, front.1);
            }
        }
        if inner.order.len() > 2 * inner.live + 64 {
            let order = std::mem::take(&mut inner.order);
            inner.order = order.into_iter().filter(|e| inner.is_live(e)).collect();
        }
    }

    /// The held bytes of a block, if any.
    pub fn get(&self, blob: u64, block: u64) -> Option<Bytes> {
        let g = self.inner.lock();
        g.blobs.get(&blob)?.get(&block).map(|(d, _)| d.clone())
    }

    pub fn contains(&self, blob: u64, block: u64) -> bool {
        let g = self.inner.lock();
        g.blobs.get(&blob).is_some_and(|m| m.contains_key(&block))
    }

    /// Drops a block (its reader has passed it, or its bytes are no longer trusted).
    pub fn remove(&self, blob: u64, block: u64) {
        self.inner.lock().take(blob, block);
    }

    /// Drops every block of a blob (closed for good, or its copy failed a check).
    pub fn forget(&self, blob: u64) {
        let mut g = self.inner.lock();
        if let Some(m) = g.blobs.remove(&blob) {
            g.bytes -= m.values().map(|(d, _)| d.len() as u64).sum::<u64>();
            g.live -= m.len();
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; n])
    }

    #[test]
    fn holds_until_removed_and_serves_the_same_bytes() {
        let b = ReadBuffer::new(100);
        b.insert(1, 0, block(10, 7));
        assert_eq!(b.get(1, 0).unwrap(), block(10, 7));
        assert_eq!(b.get(1, 1), None);
        assert_eq!(b.get(2, 0), None);
        b.remove(1, 0);
        assert_eq!(b.get(1, 0), None);
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn over_budget_drops_the_oldest_first() {
        let b = ReadBuffer::new(30);
        for i in 0..3 {
            b.insert(1, i, block(10, i as u8));
        }
        b.insert(2, 0, block(10, 9));
        assert_eq!(b.get(1, 0), None, "oldest dropped");
        assert!(b.get(1, 1).is_some() && b.get(1, 2).is_some() && b.get(2, 0).is_some());
        assert_eq!(b.bytes(), 30);
        // Larger than the budget: never held, nothing else dropped for it.
        b.insert(3, 0, block(31, 0));
        assert_eq!(b.get(3, 0), None);
        assert_eq!(b.bytes(), 30);
    }

    #[test]
    fn a_replaced_block_is_counted_once_and_its_old_queue_entry_is_stale() {
        let b = ReadBuffer::new(25);
        b.insert(1, 0, block(10, 1));
        b.insert(1, 1, block(10, 2));
        b.insert(1, 0, block(10, 3)); // replaces: now the newest
        assert_eq!(b.bytes(), 20);
        b.insert(1, 2, block(10, 4)); // over budget: block 1 is now the oldest
        assert_eq!(b.get(1, 1), None);
        assert_eq!(b.get(1, 0).unwrap(), block(10, 3));
        assert_eq!(b.bytes(), 20);
    }

    #[test]
    fn forget_drops_a_whole_blob_and_bookkeeping_stays_bounded() {
        let b = ReadBuffer::new(1 << 20);
        for i in 0..10_000u64 {
            b.insert(i % 3, i, block(8, 0));
            b.remove(i % 3, i);
        }
        assert_eq!(b.bytes(), 0);
        assert!(b.inner.lock().order.len() <= 64, "stale entries compacted");
        b.insert(5, 0, block(8, 0));
        b.insert(5, 1, block(8, 0));
        b.insert(6, 0, block(8, 0));
        b.forget(5);
        assert_eq!(b.bytes(), 8);
        assert!(b.get(6, 0).is_some());
    }
}
