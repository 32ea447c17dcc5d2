//! The lake: the object store that is the system of record (Azure Blob today).
//!
//! Everything above this module talks to a [`Lake`]: a narrow, container-scoped trait
//! with exactly the operations Tidepool uses (list, head, ranged get pinned to an ETag,
//! put, staged blocks, delete, leases). Implementations:
//!
//! - [`azure::AzureLake`]: Microsoft's `azure_storage_blob` SDK (also against Azurite);
//! - [`memory::MemoryLake`]: in-process, for fast unit and property tests;
//! - [`faults::FaultyLake`]: wraps any lake and injects latency, throttling, resets and
//!   truncated bodies per operation;
//! - [`retry::RetryingLake`]: our one retry policy (bounded attempts, exponential
//!   backoff with jitter, a timeout per attempt and a deadline per call) applied to any
//!   lake. The SDK's own retry policy is switched off so that a dead lake fails within a
//!   time the user chose, not after the SDK's minute-plus of retries.
//!
//! Invariants every implementation keeps:
//! - Object names are full blob names inside the container (the dataset prefix is part
//!   of the name); listing returns them in lexicographic (UTF-8 byte) order, as Azure does.
//! - `get_stream` / `get_range` with an ETag never return bytes of another version: a
//!   changed blob is [`LakeError::Changed`], never mixed content.
//! - A body has exactly the requested length (or up to the end of the blob); a short
//!   body ends its stream with [`LakeError::Truncated`], never silently.
//! - Bodies stream: a ranged read of any size holds one network chunk at a time, and
//!   [`retry::RetryingLake`] resumes a body that broke off from the next byte.
//! - No error message or `Debug` output contains a credential.

pub mod azure;
pub mod credentials;
pub mod faults;
pub mod memory;
pub mod retry;
pub mod url;

use std::fmt;
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;

pub use self::credentials::{Credentials, Secret};
pub use self::url::LakeUrl;

/// An entity tag as the lake returns it (quotes included, compared byte for byte).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ETag(pub String);

impl fmt::Debug for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the lake knows of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Full blob name inside the container.
    pub name: String,
    pub size: u64,
    pub etag: ETag,
    pub last_modified: SystemTime,
    /// `Content-MD5` of the whole object, when the writer set one.
    pub content_md5: Option<[u8; 16]>,
}

/// One page of a flat listing.
#[derive(Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Opaque marker for the next page; `None` when the listing is complete.
    pub next: Option<String>,
}

/// A block id for staged uploads (Put Block / Put Block List). Azure requires every id
/// of one blob to have the same length; [`BlockId::numbered`] guarantees that.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockId(pub String);

impl BlockId {
    /// Fixed-width id for block `n` of an upload, unique per `upload` tag.
    pub fn numbered(upload: &str, n: u32) -> Self {
        BlockId(format!("{upload}-{n:08}"))
    }
}

/// A held lease on a blob (single-writer guarantee).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseId(pub String);

impl LeaseId {
    /// A new random lease id (a version-4 GUID, the form Azure requires of a proposed
    /// lease id).
    pub fn random() -> Self {
        let mut b: [u8; 16] = rand::random();
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        let hex = |r: std::ops::Range<usize>| -> String {
            b[r].iter().map(|x| format!("{x:02x}")).collect()
        };
        LeaseId(format!(
            "{}-{}-{}-{}-{}",
            hex(0..4),
            hex(4..6),
            hex(6..8),
            hex(8..10),
            hex(10..16)
        ))
    }
}

/// Which operation an error or a fault belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    List,
    Head,
    Get,
    Put,
    PutBlock,
    PutBlockList,
    Delete,
    Lease,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Op::List => "list",
            Op::Head => "head",
            Op::Get => "get",
            Op::Put => "put",
            Op::PutBlock => "put block",
            Op::PutBlockList => "put block list",
            Op::Delete => "delete",
            Op::Lease => "lease",
        };
        f.write_str(s)
    }
}

/// Errors from the lake. Messages name the object and what to do; never a secret.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("{name}: not found in the lake")]
    NotFound { name: String },
    #[error(
        "{name}: changed in the lake since it was listed (expected ETag {expected}); refresh the dataset to see the new version"
    )]
    Changed { name: String, expected: ETag },
    #[error(
        "{op} {name}: access denied ({status}); check the credentials and that they grant {op} on this container"
    )]
    Denied { op: Op, name: String, status: u16 },
    #[error("{op} {name}: the lake is throttling or unavailable ({status})")]
    Throttled { op: Op, name: String, status: u16 },
    #[error("{op} {name}: no answer within {secs:.1}s")]
    Timeout { op: Op, name: String, secs: f64 },
    #[error("{op} {name}: connection failed: {detail}")]
    Connection {
        op: Op,
        name: String,
        detail: String,
    },
    #[error("get {name}: body truncated, got {got} of {expected} bytes")]
    Truncated {
        name: String,
        expected: u64,
        got: u64,
    },
    #[error("{name}: lease is held by another writer")]
    LeaseConflict { name: String },
    #[error("{op} {name}: the lake answered {status}: {detail}")]
    Other {
        op: Op,
        name: String,
        status: u16,
        detail: String,
    },
    #[error("{last} (gave up after {attempts} attempts over {secs:.1}s)")]
    Exhausted {
        op: Op,
        name: String,
        attempts: u32,
        secs: f64,
        last: Box<LakeError>,
    },
}

impl LakeError {
    /// Whether trying the same request again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            LakeError::Throttled { .. }
            | LakeError::Timeout { .. }
            | LakeError::Connection { .. }
            | LakeError::Truncated { .. } => true,
            LakeError::Other { status, .. } => *status >= 500 || *status == 408 || *status == 0,
            _ => false,
        }
    }

    /// The innermost error (through retries).
    pub fn root(&self) -> &LakeError {
        match self {
            LakeError::Exhausted { last, .. } => last.root(),
            e => e,
        }
    }
}

pub type LakeResult<T> = Result<T, LakeError>;

/// A body arriving in order. It yields exactly the bytes asked for (clipped at the end
/// of the object) and then ends, or it ends with an error.
pub type ByteStream = BoxStream<'static, LakeResult<Bytes>>;

/// A container-scoped object store with exactly the operations Tidepool needs.
#[async_trait]
pub trait Lake: Send + Sync + fmt::Debug + 'static {
    /// Where this lake is, for logs and errors (never includes a credential).
    fn describe(&self) -> String;

    /// One page of a flat listing of names starting with `prefix`, in name order.
    async fn list_page(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max_results: u32,
    ) -> LakeResult<ListPage>;

    /// Properties of one object.
    async fn head(&self, name: &str) -> LakeResult<ObjectMeta>;

    /// Bytes `range` of the object as a stream, only if its ETag is still `etag`. A
    /// range reaching past the end is clipped to the end. Errors known before the first
    /// byte (not found, changed, denied) are returned here, the rest by the stream.
    async fn get_stream(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &ETag,
    ) -> LakeResult<ByteStream>;

    /// Bytes `range` of the object in one buffer (the whole range is held in memory:
    /// for small ranges; large reads use [`Lake::get_stream`]).
    async fn get_range(&self, name: &str, range: Range<u64>, etag: &ETag) -> LakeResult<Bytes> {
        let mut body = self.get_stream(name, range.clone(), etag).await?;
        let Some(first) = body.next().await.transpose()? else {
            return Ok(Bytes::new());
        };
        let Some(second) = body.next().await.transpose()? else {
            return Ok(first);
        };
        let cap = (range.end - range.start).min(64 << 20) as usize;
        let mut buf = BytesMut::with_capacity(cap.max(first.len() + second.len()));
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&second);
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
        }
        Ok(buf.freeze())
    }

    /// Create or replace a whole object in one request (small objects).
    async fn put(&self, name: &str, data: Bytes) -> LakeResult<ETag>;

    /// Stage one block of a large upload. `md5` is checked by the lake when given.
    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()>;

    /// Commit staged blocks, in order, as the object's content.
    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        content_md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag>;

    /// Delete an object; deleting a missing object is Ok (idempotent).
    async fn delete(&self, name: &str) -> LakeResult<()>;

    /// Acquire a lease for `secs` seconds (15..=60) or infinite (`None`) under the id
    /// the caller proposes. Acquiring a lease already held under the same id succeeds
    /// (the lake's own rule), so a retry of an attempt whose answer was lost gets the
    /// lease instead of being locked out by it; another id gets
    /// [`LakeError::LeaseConflict`].
    async fn acquire_lease(
        &self,
        name: &str,
        secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId>;

    /// Release a held lease; releasing an expired or released lease is Ok.
    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()>;
}

/// Streams a complete listing page by page, so that callers hold one page at a time
/// (a listing of millions of objects never sits whole in memory).
pub struct Lister<'a> {
    lake: &'a dyn Lake,
    prefix: String,
    marker: Option<String>,
    done: bool,
    page_size: u32,
}

impl<'a> Lister<'a> {
    /// Azure's maximum page size; larger pages mean fewer round trips to a far region.
    pub const DEFAULT_PAGE: u32 = 5000;

    pub fn new(lake: &'a dyn Lake, prefix: &str) -> Self {
        Lister {
            lake,
            prefix: prefix.to_owned(),
            marker: None,
            done: false,
            page_size: Self::DEFAULT_PAGE,
        }
    }

    pub fn page_size(mut self, n: u32) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// The next page, or `None` at the end.
    pub async fn next_page(&mut self) -> LakeResult<Option<Vec<ObjectMeta>>> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .lake
            .list_page(&self.prefix, self.marker.as_deref(), self.page_size)
            .await?;
        self.marker = page.next;
        self.done = self.marker.is_none();
        Ok(Some(page.objects))
    }
}
