//! [`AzureLake`]: the [`Lake`] trait on Microsoft's `azure_storage_blob` SDK.
//!
//! One [`BlobContainerClient`] per lake, built once by [`AzureLake::connect`] with:
//! - **no SDK retries** (`RetryOptions::none()`): the SDK's default policy retries for
//!   over a minute; `RetryingLake` owns retries, per-attempt timeouts and deadlines;
//! - our own `reqwest` client as transport: a connect timeout and a read timeout so no
//!   request hangs forever, no redirects, no decompression (ranges are byte-exact),
//!   and an optional extra trusted root ([`AzureOptions::ca_file`]) for private
//!   endpoints and tests;
//! - authentication by one of: a SAS (given, or signed from the account key and
//!   renewed, see [`sas`]) appended to every request by a pipeline policy; a bearer
//!   token from workload or managed identity (see [`identity`]); or nothing.
//!
//! Invariants:
//! - A put with [`PutOptions::content_md5`] sends it twice: as `Content-MD5`, which the
//!   lake checks against the body it received (the SDK's upload does not expose that
//!   header; [`Md5Policy`] adds it from the request's context), and as
//!   `x-ms-blob-content-md5`, which is stored with the blob. Put Block sends its
//!   transactional MD5; Put Block List stores the whole-content MD5.
//! - Block ids go on the wire base64-encoded (the SDK encodes the id's bytes, in
//!   Stage Block and in the XML of Put Block List) and come back decoded from Get Block
//!   List, so our ids round-trip.
//! - `get_stream` sends `If-Match` and checks the answer: the served ETag must be the
//!   pinned one and the body must have exactly the length the lake announced for the
//!   clipped range; otherwise `Changed` / `Truncated`. The body is passed on chunk by
//!   chunk as it arrives (nothing is buffered here); a body longer than announced is
//!   an error.
//! - Errors are mapped by status and error code ([`errors`]); any SDK text that goes
//!   into an error passes through a scrubber that strips URL queries and known
//!   secrets. `Debug` and [`Lake::describe`] print the URL and the credential kind only.

pub mod errors;
pub mod identity;
pub mod level;
pub mod sas;

use std::num::NonZero;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use azure_core::{
    credentials::TokenCredential,
    http::{
        ClientMethodOptions, ClientOptions, Context, Etag, Request, RequestContent, Response,
        RetryOptions, StatusCode, Transport, XmlFormat,
        pager::PagerOptions,
        policies::{Policy, PolicyResult},
    },
};
use azure_storage_blob::{
    BlobContainerClient, BlobContainerClientOptions,
    models::{
        BlobClientAcquireLeaseOptions, BlobClientAcquireLeaseResultHeaders,
        BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders, BlobClientUploadOptions,
        BlobContainerClientListBlobsOptions, BlockBlobClientCommitBlockListOptions,
        BlockBlobClientCommitBlockListResultHeaders, BlockBlobClientStageBlockOptions,
        BlockListType, BlockLookupList, ListBlobsResponse,
    },
};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use self::errors::{Ctx, Scrubber};
use self::sas::{AccountKey, BadAccountKey, SasPolicy, SasSource};
use super::{
    BlockId, BlockList, ByteStream, Credentials, ETag, Lake, LakeError, LakeResult, LakeUrl,
    LeaseId, LevelPage, ListPage, ObjectMeta, Op, PutOptions, Secret,
};

/// How to reach Azure, beyond the URL and the credentials.
#[derive(Clone, Debug)]
pub struct AzureOptions {
    /// Extra trusted root certificates (PEM), for private endpoints behind a private
    /// CA and for tests against Azurite over HTTPS. The system roots stay trusted.
    pub ca_file: Option<PathBuf>,
    /// Time allowed to open a TCP + TLS connection.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes; a stalled connection fails
    /// after this even if the caller set no timeout.
    pub read_timeout: Duration,
    /// Validity of SAS tokens signed from an account key; renewed at half-life.
    pub sas_validity: Duration,
}

impl Default for AzureOptions {
    fn default() -> Self {
        AzureOptions {
            ca_file: None,
            // 10 s: a far region's TLS handshake takes well under a second; anything
            // slower is a dead path, and RetryingLake will try a fresh connection.
            connect_timeout: Duration::from_secs(10),
            // 30 s: Azure starts sending within seconds even for 100 MiB ranges.
            read_timeout: Duration::from_secs(30),
            // 1 h, renewed every 30 min: a leaked token is short-lived, renewal rare.
            sas_validity: Duration::from_secs(3600),
        }
    }
}

/// Why a lake client could not be built. Never contains a credential.
#[derive(Debug, thiserror::Error)]
pub enum AzureSetupError {
    #[error(transparent)]
    AccountKey(#[from] BadAccountKey),
    #[error("cannot use CA file {path}: {detail}")]
    CaFile { path: PathBuf, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error(
        "{kind} credentials send bearer tokens, which need an https lake URL; {url} is not https"
    )]
    InsecureBearer { kind: &'static str, url: String },
    #[error("cannot set up {kind} credentials: {detail}")]
    Credential { kind: &'static str, detail: String },
    #[error("cannot build a client for {url}: {detail}")]
    Client { url: String, detail: String },
}

/// An Azure Blob container as a [`Lake`].
pub struct AzureLake {
    container: BlobContainerClient,
    /// Container URL without credentials, for messages.
    url: String,
    kind: &'static str,
    scrub: Scrubber,
}

impl std::fmt::Debug for AzureLake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AzureLake({}, {})", self.url, self.kind)
    }
}

/// The HTTP client every Azure request goes through (blob and token requests).
pub fn http_transport(options: &AzureOptions) -> Result<Transport, AzureSetupError> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.read_timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = &options.ca_file {
        let pem = std::fs::read(path).map_err(|e| AzureSetupError::CaFile {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| AzureSetupError::CaFile {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(AzureSetupError::CaFile {
                path: path.clone(),
                detail: "no PEM certificate in it".into(),
            });
        }
        builder = builder.tls_certs_merge(certs);
    }
    let client = builder
        .build()
        .map_err(|e| AzureSetupError::HttpClient(e.to_string()))?;
    Ok(Transport::new(Arc::new(client)))
}

/// Client options with our transport and the SDK's retries switched off.
pub fn client_options(options: &AzureOptions) -> Result<ClientOptions, AzureSetupError> {
    Ok(ClientOptions {
        retry: RetryOptions::none(),
        transport: Some(http_transport(options)?),
        ..Default::default()
    })
}

impl AzureLake {
    /// A client for `url`'s container. Builds clients only; sends no request (the first
    /// lake operation shows whether the credentials work).
    pub fn connect(
        url: &LakeUrl,
        credentials: &Credentials,
        options: &AzureOptions,
    ) -> Result<Self, AzureSetupError> {
        // No trailing slash: the SDK appends the blob name as a further path segment,
        // and `container/` would make every name start with `/`.
        let mut container_url = url.container_url();
        let path = container_url.path().trim_end_matches('/').to_owned();
        container_url.set_path(&path);
        let shown = container_url.to_string();
        let mut client_options = client_options(options)?;
        let mut token: Option<Arc<dyn TokenCredential>> = None;
        let mut secrets: Vec<Secret> = Vec::new();
        let sas_source = match credentials {
            Credentials::Sas(s) => Some(SasSource::Static(s.clone())),
            Credentials::AccountKey(k) => {
                let key = AccountKey::new(&url.account, k)?;
                secrets.push(key.secret().clone());
                Some(SasSource::signed(key, &url.container, options.sas_validity))
            }
            Credentials::Anonymous => url.sas.clone().map(SasSource::Static),
            Credentials::WorkloadIdentity(wi) => {
                token = Some(
                    identity::workload_identity(wi, client_options.clone()).map_err(|e| {
                        AzureSetupError::Credential {
                            kind: credentials.kind(),
                            detail: Scrubber::default().scrub(&e.to_string()),
                        }
                    })?,
                );
                None
            }
            Credentials::ManagedIdentity { client_id } => {
                token = Some(
                    identity::managed_identity(client_id.as_deref(), client_options.clone())
                        .map_err(|e| AzureSetupError::Credential {
                            kind: credentials.kind(),
                            detail: Scrubber::default().scrub(&e.to_string()),
                        })?,
                );
                None
            }
        };
        if let Credentials::Sas(s) = credentials {
            secrets.push(s.clone());
        }
        if let Some(s) = &url.sas {
            secrets.push(s.clone());
        }
        if token.is_some() && container_url.scheme() != "https" {
            return Err(AzureSetupError::InsecureBearer {
                kind: credentials.kind(),
                url: shown,
            });
        }
        if let Some(src) = sas_source {
            let policy: Arc<dyn Policy> = Arc::new(SasPolicy(Arc::new(src)));
            client_options.per_call_policies.push(policy);
        }
        client_options.per_call_policies.push(Arc::new(Md5Policy));
        client_options
            .per_call_policies
            .push(Arc::new(DelimiterPolicy));
        let container = BlobContainerClient::new(
            container_url,
            token,
            Some(BlobContainerClientOptions {
                client_options,
                ..Default::default()
            }),
        )
        .map_err(|e| AzureSetupError::Client {
            url: shown.clone(),
            detail: Scrubber::default().scrub(&e.to_string()),
        })?;
        Ok(AzureLake {
            container,
            url: shown,
            kind: credentials.kind(),
            scrub: Scrubber::new(secrets),
        })
    }

    fn err(&self, op: Op, name: &str, e: &azure_core::Error) -> LakeError {
        self.err_if(op, name, e, None)
    }

    /// As [`Self::err`] for a request sent with `If-Match: if_match`.
    fn err_if(
        &self,
        op: Op,
        name: &str,
        e: &azure_core::Error,
        if_match: Option<&ETag>,
    ) -> LakeError {
        errors::map(e, &Ctx { op, name, if_match }, &self.scrub)
    }

    /// One List Blobs request, flat or one level (`delimited`): its answer, or `None`
    /// when the lake sent no page.
    async fn list_request(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max_results: u32,
        delimited: bool,
    ) -> LakeResult<Option<Response<ListBlobsResponse, XmlFormat>>> {
        let context = if delimited {
            Context::new().with_value(Delimited)
        } else {
            Context::new()
        };
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            marker: marker.map(str::to_owned),
            // Azure caps a page at 5000.
            maxresults: Some(max_results.clamp(1, 5000) as i32),
            method_options: PagerOptions {
                context,
                ..Default::default()
            },
            ..Default::default()
        };
        let pager = self
            .container
            .list_blobs(Some(options))
            .map_err(|e| self.err(Op::List, prefix, &e))?;
        pager
            .into_pages()
            .try_next()
            .await
            .map_err(|e| self.err(Op::List, prefix, &e))
    }

    fn protocol(&self, op: Op, name: &str, detail: impl Into<String>) -> LakeError {
        LakeError::Other {
            op,
            name: name.to_owned(),
            status: 0,
            detail: detail.into(),
        }
    }
}

/// The `Content-MD5` of one request, carried in its context to [`Md5Policy`].
struct TransactionalMd5([u8; 16]);

/// Adds `Content-MD5` to a request whose context carries a [`TransactionalMd5`] (the
/// SDK's upload leaves that header out; without it the lake would not check the body).
#[derive(Debug)]
struct Md5Policy;

#[async_trait]
impl Policy for Md5Policy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        use base64::Engine as _;
        if let Some(TransactionalMd5(md5)) = ctx.value::<TransactionalMd5>() {
            request.insert_header(
                "content-md5",
                base64::engine::general_purpose::STANDARD.encode(md5),
            );
        }
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// Marks a List Blobs request (in its context) as a one-level listing.
struct Delimited;

/// Adds `delimiter=/` to a List Blobs request whose context carries [`Delimited`] (the
/// SDK's options have no delimiter). The SAS goes in the query too, but signs only the
/// resource, so adding a parameter leaves it valid.
#[derive(Debug)]
struct DelimiterPolicy;

#[async_trait]
impl Policy for DelimiterPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        if ctx.value::<Delimited>().is_some() {
            request
                .url_mut()
                .query_pairs_mut()
                .append_pair("delimiter", "/");
        }
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// A block id as our [`BlockId`] (decoded bytes; ids of other writers that are not
/// UTF-8 are converted lossily and never equal one of ours).
fn block_id(raw: Option<Vec<u8>>) -> BlockId {
    let raw = raw.unwrap_or_default();
    BlockId(match String::from_utf8(raw) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// ETags in headers come quoted, in listings unquoted: store them quoted.
fn etag(e: &Etag) -> ETag {
    quoted(e.to_string())
}

/// An ETag as the lake sends it, quoted if it came bare (listings send it bare).
fn quoted(s: String) -> ETag {
    if s.starts_with('"') || s.starts_with("W/") {
        ETag(s)
    } else {
        ETag(format!("\"{s}\""))
    }
}

fn md5(v: Option<Vec<u8>>) -> Option<[u8; 16]> {
    v.and_then(|v| v.try_into().ok())
}

/// `bytes <start>-<end>/<total>` → (start, end inclusive, total).
fn content_range(s: &str) -> Option<(u64, u64, u64)> {
    let rest = s.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

#[async_trait]
impl Lake for AzureLake {
    fn describe(&self) -> String {
        format!("{} ({})", self.url, self.kind)
    }

    async fn list_page(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max_results: u32,
    ) -> LakeResult<ListPage> {
        let Some(page) = self
            .list_request(prefix, marker, max_results, false)
            .await?
        else {
            return Ok(ListPage::default());
        };
        let page = page
            .into_model()
            .map_err(|e| self.err(Op::List, prefix, &e))?;
        let mut objects = Vec::with_capacity(page.blob_items.len());
        for item in page.blob_items {
            let name = item
                .name
                .ok_or_else(|| self.protocol(Op::List, prefix, "listing entry without a name"))?;
            let props = item.properties.ok_or_else(|| {
                self.protocol(Op::List, &name, "listing entry without properties")
            })?;
            let etag = props
                .etag
                .as_ref()
                .map(etag)
                .ok_or_else(|| self.protocol(Op::List, &name, "no ETag"))?;
            objects.push(ObjectMeta {
                size: props.content_length.unwrap_or(0),
                etag,
                last_modified: props
                    .last_modified
                    .map(SystemTime::from)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                content_md5: md5(props.content_md5),
                name,
            });
        }
        Ok(ListPage {
            objects,
            next: page.next_marker.filter(|m| !m.is_empty()),
        })
    }

    async fn list_level(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max_results: u32,
    ) -> LakeResult<LevelPage> {
        let Some(page) = self.list_request(prefix, marker, max_results, true).await? else {
            return Ok(LevelPage::default());
        };
        level::parse(page.into_body().as_ref()).map_err(|d| {
            self.protocol(
                Op::List,
                prefix,
                format!("bad listing: {}", self.scrub.scrub(&d)),
            )
        })
    }

    async fn head(&self, name: &str) -> LakeResult<ObjectMeta> {
        let blob = self.container.blob_client(name);
        let rsp = blob
            .get_properties(None)
            .await
            .map_err(|e| self.err(Op::Head, name, &e))?;
        let bad = |e: azure_core::Error| {
            self.protocol(
                Op::Head,
                name,
                format!("unreadable header: {}", self.scrub.scrub(&e.to_string())),
            )
        };
        let etag = rsp
            .etag()
            .map_err(bad)?
            .as_ref()
            .map(etag)
            .ok_or_else(|| self.protocol(Op::Head, name, "no ETag"))?;
        Ok(ObjectMeta {
            name: name.to_owned(),
            size: rsp.content_length().map_err(bad)?.unwrap_or(0),
            etag,
            last_modified: rsp
                .last_modified()
                .map_err(bad)?
                .map(SystemTime::from)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            content_md5: md5(rsp.content_md5().map_err(bad)?),
        })
    }

    async fn get_stream(
        &self,
        name: &str,
        range: Range<u64>,
        want: &ETag,
    ) -> LakeResult<ByteStream> {
        if range.start >= range.end {
            return Ok(futures::stream::empty().boxed());
        }
        let len = range.end - range.start;
        let blob = self.container.blob_client(name);
        let options = BlobClientDownloadOptions {
            if_match: Some(Etag::from(want.0.clone())),
            range: Some((range.start..range.end).into()),
            // One request for the whole range: the SDK's partitioned download would
            // split it and hold several partitions in memory.
            parallel: Some(NonZero::<usize>::MIN),
            partition_size: NonZero::new(usize::try_from(len).unwrap_or(usize::MAX)),
            ..Default::default()
        };
        let ctx = Ctx {
            op: Op::Get,
            name,
            if_match: Some(want),
        };
        let rsp = match blob.download(Some(options)).await {
            Ok(r) => r,
            Err(e) if e.http_status() == Some(StatusCode::RequestedRangeNotSatisfiable) => {
                // The range starts at or past the end: empty, if the blob is still ours.
                let meta = self.head(name).await?;
                if &meta.etag != want {
                    return Err(LakeError::Changed {
                        name: name.to_owned(),
                        expected: want.clone(),
                    });
                }
                if range.start >= meta.size {
                    return Ok(futures::stream::empty().boxed());
                }
                return Err(errors::map(&e, &ctx, &self.scrub));
            }
            Err(e) => {
                return Err(match errors::map(&e, &ctx, &self.scrub) {
                    // If-Match fails on a deleted blob too (Azurite answers 412 where
                    // Azure answers 404): tell a deleted blob from a replaced one.
                    LakeError::Changed { .. }
                        if matches!(self.head(name).await, Err(LakeError::NotFound { .. })) =>
                    {
                        LakeError::NotFound {
                            name: name.to_owned(),
                        }
                    }
                    other => other,
                });
            }
        };
        let served = rsp.properties.etag.as_ref().map(etag);
        if served.as_ref().is_some_and(|s| s != want) {
            return Err(LakeError::Changed {
                name: name.to_owned(),
                expected: want.clone(),
            });
        }
        let header = |k: &str| {
            rsp.headers
                .get_optional_str(&azure_core::http::headers::HeaderName::from(k.to_owned()))
                .map(str::to_owned)
        };
        let announced: Option<u64> = header("content-length").and_then(|v| v.parse().ok());
        // What the lake says it is sending, and where in the blob that starts.
        // What the lake says it is sending. Without Content-Range the answer is the
        // whole blob (the SDK's retry for an empty blob); the asked part is cut below.
        let parsed = header("content-range").as_deref().and_then(content_range);
        let whole = parsed.is_none();
        let expected = match parsed {
            Some((a, b, _total)) => {
                // `b == a - 1` is an empty range at the end (Azurite answers so where
                // Azure answers 416).
                if a != range.start || b + 1 < a {
                    return Err(self.protocol(
                        Op::Get,
                        name,
                        format!("asked for bytes from {}, got {a}-{b}", range.start),
                    ));
                }
                b + 1 - a
            }
            None => announced.unwrap_or(0),
        };
        if let Some(n) = announced
            && n != expected
        {
            return Err(self.protocol(
                Op::Get,
                name,
                format!("Content-Length {n} disagrees with Content-Range ({expected})"),
            ));
        }
        if !whole && expected > len {
            return Err(self.protocol(
                Op::Get,
                name,
                format!("asked for {len} bytes, the lake announced {expected}"),
            ));
        }
        // Without Content-Range the body is the whole blob: pass on only the asked part.
        let (skip, take) = if whole {
            let end = range.end.min(expected);
            (range.start.min(end), end - range.start.min(end))
        } else {
            (0, expected)
        };
        let body = Body {
            rsp: rsp.body,
            name: name.to_owned(),
            expected,
            got: 0,
            skip,
            take,
            done: false,
        };
        Ok(futures::stream::unfold(body, Body::next).boxed())
    }

    async fn put(&self, name: &str, data: Bytes, opts: &PutOptions) -> LakeResult<ETag> {
        let blob = self.container.blob_client(name);
        let mut options = BlobClientUploadOptions {
            // One Put Blob request whatever the size: staged uploads are the caller's.
            parallel: Some(NonZero::<usize>::MIN),
            partition_size: NonZero::new((data.len() as u64).max(1)),
            blob_content_md5: opts.content_md5.map(|m| m.to_vec()),
            if_none_match: opts.if_none_match_any.then(|| Etag::from("*".to_owned())),
            if_match: opts.if_match.as_ref().map(|e| Etag::from(e.0.clone())),
            ..Default::default()
        };
        if let Some(md5) = opts.content_md5 {
            options.method_options = ClientMethodOptions {
                context: Context::new().with_value(TransactionalMd5(md5)),
            };
        }
        let rsp = blob.upload(data.into(), Some(options)).await.map_err(|e| {
            match self.err_if(Op::Put, name, &e, opts.if_match.as_ref()) {
                // If-None-Match: * on an existing blob: Azure and Azurite answer 409
                // BlobAlreadyExists (mapped so already); 412 is the generic answer.
                LakeError::Other { status: 412, .. } if opts.if_none_match_any => {
                    LakeError::Exists {
                        name: name.to_owned(),
                    }
                }
                other => other,
            }
        })?;
        rsp.etag
            .as_ref()
            .map(etag)
            .ok_or_else(|| self.protocol(Op::Put, name, "no ETag in the answer"))
    }

    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()> {
        let blob = self.container.blob_client(name).block_blob_client();
        let options = BlockBlobClientStageBlockOptions {
            transactional_content_md5: md5.map(|m| m.to_vec()),
            ..Default::default()
        };
        let n = data.len() as u64;
        // The SDK base64-encodes the id, as Azure requires.
        blob.stage_block(id.0.as_bytes(), n, data.into(), Some(options))
            .await
            .map_err(|e| self.err(Op::PutBlock, name, &e))?;
        Ok(())
    }

    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        content_md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag> {
        self.commit_blocks(name, ids, &PutOptions::default().with_md5_opt(content_md5))
            .await
    }

    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[BlockId],
        opts: &PutOptions,
    ) -> LakeResult<ETag> {
        let content_md5 = opts.content_md5;
        let blob = self.container.blob_client(name).block_blob_client();
        let list = BlockLookupList {
            latest: Some(ids.iter().map(|id| id.0.as_bytes().to_vec()).collect()),
            ..Default::default()
        };
        let content: RequestContent<BlockLookupList, _> = list
            .try_into()
            .map_err(|e: azure_core::Error| self.err(Op::PutBlockList, name, &e))?;
        let options = BlockBlobClientCommitBlockListOptions {
            blob_content_md5: content_md5.map(|m| m.to_vec()),
            if_none_match: opts.if_none_match_any.then(|| Etag::from("*".to_owned())),
            if_match: opts.if_match.as_ref().map(|e| Etag::from(e.0.clone())),
            ..Default::default()
        };
        let rsp = blob
            .commit_block_list(content, Some(options))
            .await
            .map_err(
                |e| match self.err_if(Op::PutBlockList, name, &e, opts.if_match.as_ref()) {
                    LakeError::Other { status: 412, .. } if opts.if_none_match_any => {
                        LakeError::Exists {
                            name: name.to_owned(),
                        }
                    }
                    other => other,
                },
            )?;
        let tag = rsp
            .etag()
            .map_err(|e| self.err(Op::PutBlockList, name, &e))?;
        tag.as_ref()
            .map(etag)
            .ok_or_else(|| self.protocol(Op::PutBlockList, name, "no ETag in the answer"))
    }

    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList> {
        let blob = self.container.blob_client(name).block_blob_client();
        let list = match blob.get_block_list(BlockListType::All, None).await {
            Ok(rsp) => rsp
                .into_model()
                .map_err(|e| self.err(Op::BlockList, name, &e))?,
            // Neither a blob nor a staged block: nothing to list (Azure and Azurite
            // answer 404 BlobNotFound; a missing container stays an error).
            Err(e) if errors::code(&e) == Some("BlobNotFound") => return Ok(BlockList::default()),
            Err(e) => return Err(self.err(Op::BlockList, name, &e)),
        };
        let blocks = |v: Option<Vec<azure_storage_blob::models::Block>>| {
            v.unwrap_or_default()
                .into_iter()
                .map(|b| (block_id(b.name), b.size.unwrap_or(0).max(0) as u64))
                .collect()
        };
        Ok(BlockList {
            committed: blocks(list.committed_blocks),
            uncommitted: blocks(list.uncommitted_blocks),
        })
    }

    async fn delete(&self, name: &str) -> LakeResult<()> {
        match self.container.blob_client(name).delete(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(()),
            Err(e) => Err(self.err(Op::Delete, name, &e)),
        }
    }

    async fn acquire_lease(
        &self,
        name: &str,
        secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        // Azure: 15..=60 seconds, or -1 for infinite.
        let duration = match secs {
            Some(s) => s.clamp(15, 60) as i32,
            None => -1,
        };
        let blob = self.container.blob_client(name);
        let rsp = blob
            .acquire_lease(
                duration,
                Some(BlobClientAcquireLeaseOptions {
                    proposed_lease_id: Some(proposed.0.clone()),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| self.err(Op::Lease, name, &e))?;
        let id = rsp.lease_id().map_err(|e| self.err(Op::Lease, name, &e))?;
        id.map(LeaseId)
            .ok_or_else(|| self.protocol(Op::Lease, name, "no lease id in the answer"))
    }

    async fn renew_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let blob = self.container.blob_client(name);
        match blob.renew_lease(lease.0.clone(), None).await {
            Ok(_) => Ok(()),
            Err(e) => Err(match self.err(Op::Lease, name, &e) {
                // 409 LeaseIdMismatchWithLeaseOperation (taken by another id, or
                // released) or LeaseNotPresentWithLeaseOperation (broken): not ours.
                LakeError::LeaseConflict { .. } => LakeError::LeaseLost {
                    name: name.to_owned(),
                },
                other => other,
            }),
        }
    }

    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let blob = self.container.blob_client(name);
        match blob.release_lease(lease.0.clone(), None).await {
            Ok(_) => Ok(()),
            Err(e) => match errors::map(
                &e,
                &Ctx {
                    op: Op::Lease,
                    name,
                    if_match: None,
                },
                &self.scrub,
            ) {
                // Gone, or no longer ours (expired and taken or broken): not held by us
                // any more, which is what releasing wants.
                LakeError::NotFound { .. } | LakeError::LeaseConflict { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// A download body being passed on: counts what arrives against what was announced.
struct Body {
    rsp: azure_core::http::AsyncResponseBody,
    name: String,
    expected: u64,
    got: u64,
    /// Bytes of the body to drop before the asked range, then bytes to pass on.
    skip: u64,
    take: u64,
    done: bool,
}

impl Body {
    async fn next(mut self) -> Option<(LakeResult<Bytes>, Self)> {
        loop {
            if self.done {
                return None;
            }
            let err = match self.rsp.next().await {
                Some(Ok(mut chunk)) => {
                    self.got += chunk.len() as u64;
                    if self.got > self.expected {
                        LakeError::Other {
                            op: Op::Get,
                            name: self.name.clone(),
                            status: 0,
                            detail: format!(
                                "body longer than the announced {} bytes",
                                self.expected
                            ),
                        }
                    } else {
                        let drop = self.skip.min(chunk.len() as u64);
                        self.skip -= drop;
                        let _ = chunk.split_to(drop as usize);
                        chunk.truncate(self.take.min(chunk.len() as u64) as usize);
                        self.take -= chunk.len() as u64;
                        if chunk.is_empty() {
                            continue;
                        }
                        return Some((Ok(chunk), self));
                    }
                }
                Some(Err(_)) => LakeError::Truncated {
                    name: self.name.clone(),
                    expected: self.expected,
                    got: self.got,
                },
                None if self.got < self.expected => LakeError::Truncated {
                    name: self.name.clone(),
                    expected: self.expected,
                    got: self.got,
                },
                None => return None,
            };
            self.done = true;
            return Some((Err(err), self));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(content_range("bytes 3-9/100"), Some((3, 9, 100)));
        assert_eq!(content_range("bytes */100"), None);
    }

    #[test]
    fn etags_are_stored_quoted() {
        assert_eq!(etag(&Etag::from("0x1".to_owned())).0, "\"0x1\"");
        assert_eq!(etag(&Etag::from("\"0x1\"".to_owned())).0, "\"0x1\"");
    }

    #[test]
    fn bearer_over_http_is_refused_without_showing_secrets() {
        let url = LakeUrl::parse("http://127.0.0.1:1/devstoreaccount1/data?sig=URLSECRET").unwrap();
        let creds = Credentials::ManagedIdentity { client_id: None };
        let err = AzureLake::connect(&url, &creds, &AzureOptions::default()).unwrap_err();
        assert!(
            matches!(err, AzureSetupError::InsecureBearer { .. }),
            "{err}"
        );
        assert!(!err.to_string().contains("URLSECRET"));
        let lake =
            AzureLake::connect(&url, &Credentials::Anonymous, &AzureOptions::default()).unwrap();
        assert!(!format!("{lake:?}").contains("URLSECRET"));
        assert!(!lake.describe().contains("URLSECRET"));
    }
}
