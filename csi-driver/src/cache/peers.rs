//! The seam between the cache and the cluster-wide cache (`crate::peer`): what a
//! [`super::blob::CachedBlob`] asks another node for, and what it gets back.
//!
//! The cache decides nothing about the network here: a [`BlockPeers`] says which node
//! owns a block and fetches it; the cache checks every block it gets (the owner's
//! CRC32C, recorded when the block came from the lake, and the blob's `Content-MD5`
//! where that covers the block) before a reader can see it, and fetches from the lake
//! whatever a peer did not deliver, so a peer can make a read slower, never wrong.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::lake::ETag;

/// Blocks `first..first + n` of one blob version of one dataset, as one node asks
/// another for them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerAsk {
    /// The dataset's id (the same on every node: a digest of its lake URL).
    pub dataset: String,
    /// Full blob name in the container.
    pub blob: String,
    pub etag: ETag,
    /// The blob's size, as the asker's snapshot lists it.
    pub size: u64,
    /// The asker's block size (the owner refuses another).
    pub block_size: u64,
    /// Blocks per placement unit: a block's owner is the owner of its chunk
    /// (`index / chunk_blocks`), so one ranged GET at the owner serves a whole chunk.
    pub chunk_blocks: u64,
    pub first: u64,
    pub n: u64,
}

impl PeerAsk {
    /// The placement unit of block `first`.
    pub fn chunk(&self) -> u64 {
        self.first / self.chunk_blocks.max(1)
    }
}

/// One block as the owner serves it.
#[derive(Clone, Debug)]
pub struct PeerBlock {
    pub index: u64,
    pub bytes: Bytes,
    /// The CRC32C the owner recorded when it fetched the block from the lake.
    pub crc: u32,
}

/// How a peer failed a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerFault {
    /// Could not be reached, or the connection broke.
    Unreachable,
    /// Did not answer within the peer timeout.
    Slow,
    /// Answered that it will not serve this (not held there, another version, busy).
    Refused,
    /// Served bytes that failed their check: a wrong byte was caught.
    Corrupt,
}

impl PeerFault {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerFault::Unreachable => "unreachable",
            PeerFault::Slow => "slow",
            PeerFault::Refused => "refused",
            PeerFault::Corrupt => "corrupt",
        }
    }
}

/// A failed peer fetch: how, and words for the log.
#[derive(Clone, Debug)]
pub struct PeerFailure {
    pub fault: PeerFault,
    pub detail: String,
}

impl fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.fault.as_str(), self.detail)
    }
}

/// The largest blob, in blocks, taken from a peer in one whole-blob transfer (a blob
/// with a `Content-MD5` over several blocks; larger ones come from the lake): a reader
/// of such a blob waits for all of it, and an ask is at most this many blocks.
pub const MAX_WHOLE_BLOCKS: u64 = 64;

/// The blocks of one ask, in order.
pub type PeerBlocks = BoxStream<'static, Result<PeerBlock, PeerFailure>>;

/// The other nodes of the cluster, as the cache sees them.
#[async_trait]
pub trait BlockPeers: Send + Sync + fmt::Debug {
    /// The node that owns the chunk of `ask.first`, when that is another node which is
    /// up: the fetch asks it first. `None`: this node owns it (or no peer can), and
    /// fetches from the lake.
    fn owner(&self, ask: &PeerAsk) -> Option<String>;

    /// Asks `owner` for the blocks of `ask`, within the peer timeout for the answer and
    /// for each block.
    async fn fetch(&self, owner: &str, ask: &PeerAsk) -> Result<PeerBlocks, PeerFailure>;

    /// `owner` failed a fetch: it is passed over for a while (a corrupt peer longer,
    /// and loudly), and the failure is counted.
    fn report(&self, owner: &str, failure: &PeerFailure);

    /// Returns once the other nodes can know that this one holds `dataset` (a prewarm
    /// waits for it, so that nodes warming one dataset together share it rather than
    /// each fetching it all before they learn of each other). Bounded.
    async fn settled(&self, _dataset: &str) {}
}
