//! The lake: the object store that is the system of record (Azure Blob today).
//!
//! Everything above this module talks to a [`Lake`]: a narrow, container-scoped trait
//! with exactly the operations Tidepool uses (flat and one-level list, head, ranged get
//! pinned to an ETag, put (optionally create-only), staged blocks and their listing,
//! delete, leases).
//! Implementations:
//!
//! - [`azure::AzureLake`]: Microsoft's `azure_storage_blob` SDK (also against Azurite);
//! - [`memory::MemoryLake`]: in-process, for fast unit and property tests;
//! - [`faults::FaultyLake`]: wraps any lake and injects latency, throttling, resets and
//!   truncated bodies per operation;
//! - [`parallel::ParallelLister`] (not a lake): a whole prefix's listing in name order,
//!   taken by many requests at once;
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
//! - A [`BlockId`] is a short ASCII string; on the wire it is base64-encoded (Azure's
//!   rule) and [`Lake::get_block_list`] decodes it again, so ids round-trip exactly.
//! - `Content-MD5` given to [`Lake::put`] or [`Lake::put_block_list`] is what a later
//!   [`Lake::head`] or listing reports as [`ObjectMeta::content_md5`].
//! - No error message or `Debug` output contains a credential.

pub mod azure;
pub mod credentials;
pub mod endpoints;
pub mod faults;
pub mod memory;
pub mod parallel;
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

/// One page of a listing of one level of the tree under a prefix (delimiter `/`).
#[derive(Debug, Default)]
pub struct LevelPage {
    /// Objects whose name has no `/` after the prefix.
    pub objects: Vec<ObjectMeta>,
    /// The distinct `<prefix><segment>/` under which the other names sit, each once in
    /// the whole listing (not once per page).
    pub prefixes: Vec<String>,
    /// Opaque marker for the next page; `None` when the level is complete.
    pub next: Option<String>,
}

/// A block id for staged uploads (Put Block / Put Block List).
///
/// Azure's rules, which every implementation enforces: at most 64 bytes, and every
/// uncommitted block of one blob has an id of the same length (staging an id of
/// another length is refused with `InvalidBlobOrBlock`). [`BlockId::numbered`] with a
/// fixed-length tag keeps both. The string's bytes are the id: implementations
/// base64-encode them on the wire and [`Lake::get_block_list`] decodes them, so an id
/// read back equals the one staged. Ids staged by other writers that are not UTF-8
/// come back converted lossily (they contain U+FFFD and never equal an ASCII id).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub String);

impl BlockId {
    /// Fixed-width id for block `n` of an upload, unique per `upload` tag.
    pub fn numbered(upload: &str, n: u32) -> Self {
        BlockId(format!("{upload}-{n:08}"))
    }
}

/// The blocks the lake holds for one blob name (Get Block List, type "all"): the
/// committed list in blob order, and the staged but uncommitted blocks (in staging
/// order). Sizes in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockList {
    pub committed: Vec<(BlockId, u64)>,
    pub uncommitted: Vec<(BlockId, u64)>,
}

/// Options of a one-request [`Lake::put`] (and of [`Lake::commit_blocks`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// MD5 of `data`: the lake refuses the write if the bytes it received differ (sent as
    /// `Content-MD5`) and stores it as the blob's `Content-MD5`. Without it the lake
    /// computes and stores the MD5 itself (Azure does so for Put Blob).
    pub content_md5: Option<[u8; 16]>,
    /// Create only: `If-None-Match: *`. An existing blob is left alone and the put
    /// fails with [`LakeError::Exists`].
    pub if_none_match_any: bool,
    /// Replace only this version: `If-Match`. A blob with another ETag (or none) is left
    /// alone and the write fails with [`LakeError::Changed`] (or
    /// [`LakeError::NotFound`] where the blob is gone): a compare-and-swap.
    pub if_match: Option<ETag>,
}

impl PutOptions {
    /// A create-only put (`If-None-Match: *`).
    pub fn create_only() -> Self {
        PutOptions {
            if_none_match_any: true,
            ..Default::default()
        }
    }

    /// The same options with `Content-MD5` set.
    pub fn with_md5(self, md5: [u8; 16]) -> Self {
        self.with_md5_opt(Some(md5))
    }

    /// The same options with `Content-MD5` set or cleared.
    pub fn with_md5_opt(self, md5: Option<[u8; 16]>) -> Self {
        PutOptions {
            content_md5: md5,
            ..self
        }
    }

    /// A compare-and-swap put: only over the version `etag` names.
    pub fn replacing(etag: ETag) -> Self {
        PutOptions {
            if_match: Some(etag),
            ..Default::default()
        }
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
    /// Get Block List.
    BlockList,
    Delete,
    /// Acquire, renew and release.
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
            Op::BlockList => "get block list",
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
    #[error(
        "{name}: our lease is lost (released, broken, or expired and taken by another writer); stop writing and acquire it again"
    )]
    LeaseLost { name: String },
    #[error("{name}: already exists in the lake; a create-only write leaves it as it is")]
    Exists { name: String },
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

    /// One page of the level under `prefix` (a `/` delimiter listing, Azure's
    /// List Blobs with `delimiter=/`): the objects directly under it and the
    /// sub-prefixes, objects and prefixes each in name order. At most `max_results`
    /// entries (objects plus prefixes) a page. Expanding each prefix by a flat listing,
    /// in name order among the objects, gives exactly the flat listing of `prefix`
    /// (see [`parallel::ParallelLister`]).
    async fn list_level(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max_results: u32,
    ) -> LakeResult<LevelPage>;

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

    /// Create or replace a whole object in one request (small objects). With
    /// [`PutOptions::if_none_match_any`] an existing object is
    /// [`LakeError::Exists`]; with [`PutOptions::content_md5`] a body damaged on the way
    /// is refused and the MD5 is stored with the object.
    async fn put(&self, name: &str, data: Bytes, opts: &PutOptions) -> LakeResult<ETag>;

    /// Stage one block of a large upload. `md5` is checked by the lake when given.
    /// `data` is the caller's again once this returns (the upload recycles block
    /// buffers): a lake must not keep it.
    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()>;

    /// Commit blocks, in order, as the object's content. Each id is looked up among the
    /// uncommitted blocks first, then among the object's committed blocks (Azure's
    /// "latest"), so repeating a commit whose answer was lost succeeds with the same
    /// content. Uncommitted blocks left out are discarded. `content_md5` (the MD5 of the
    /// whole content) is stored as the object's `Content-MD5`; the lake does not check
    /// it (each block was checked when staged). Without it the object has none.
    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        content_md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag>;

    /// [`Lake::put_block_list`] under `opts`' conditions (`If-None-Match: *`,
    /// `If-Match`), storing `opts.content_md5` as the object's `Content-MD5`. Lakes that
    /// cannot commit conditionally refuse a conditional commit (they never commit it
    /// without its condition).
    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[BlockId],
        opts: &PutOptions,
    ) -> LakeResult<ETag> {
        if opts.if_none_match_any || opts.if_match.is_some() {
            return Err(LakeError::Other {
                op: Op::PutBlockList,
                name: name.to_owned(),
                status: 405,
                detail: format!("{} cannot commit blocks conditionally", self.describe()),
            });
        }
        self.put_block_list(name, ids, opts.content_md5).await
    }

    /// Committed and uncommitted blocks of `name` (Get Block List, type "all"), ids
    /// decoded. A name with nothing at all (no blob, no staged block) has two empty
    /// lists, not [`LakeError::NotFound`] (Azure and Azurite answer 404 `BlobNotFound`
    /// there); a name with staged blocks but no committed blob lists them as
    /// uncommitted. A blob written by a single put has no committed blocks.
    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList>;

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

    /// Renew a lease we hold, restarting its duration from now (an infinite lease stays
    /// infinite). Renewing a lease that expired but that nobody took since succeeds (the
    /// lake's rule). A lease released, broken, or taken by another id is
    /// [`LakeError::LeaseLost`]: the caller no longer holds the blob and must stop
    /// writing. A missing blob is [`LakeError::NotFound`]. Renewing is idempotent.
    async fn renew_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()>;

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
