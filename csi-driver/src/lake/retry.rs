//! One retry policy for every lake, so that failure behaviour is the same whatever the
//! backend and is chosen by the user, not by an SDK default.
//!
//! Each attempt has its own timeout ([`RetryConfig::attempt_timeout`]); transient errors
//! ([`LakeError::is_transient`]) are retried with exponential backoff and full jitter up
//! to [`RetryConfig::max_attempts`], and the whole call never outlives
//! [`RetryConfig::deadline`]. A dead lake therefore fails a read within `deadline`
//! (plus one backoff step at most), which the FUSE layer turns into EIO: a training job
//! sees an error it can handle instead of a hung `read()`.
//!
//! Permanent errors (not found, changed, denied) are returned at once.
//!
//! Every operation is retried: they are all idempotent (a repeated put, Put Block, Put
//! Block List, delete, renew or release leaves the lake as one would; acquire proposes
//! the same id each time). The one that is not, a create-only put, is made so: when an
//! attempt whose answer was lost is followed by [`LakeError::Exists`], the blob is
//! looked at, and one with exactly our size and MD5 is taken as our own write.
//!
//! Streamed bodies ([`Lake::get_stream`]): opening the stream follows the policy above;
//! then every wait for the next chunk is bounded by `attempt_timeout`, and a body that
//! breaks off or stalls with a transient error is resumed from the next byte with a new
//! request (the same policy again), up to `max_attempts` resumes per body. Bytes already
//! passed on are never fetched or passed on twice.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::*;

#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Timeout of one attempt. A 4 MiB block from a far region at a poor 20 MB/s takes
    /// ~0.2 s; 30 s leaves room for a congested link without letting a dead one hang.
    pub attempt_timeout: Duration,
    /// Upper bound on the whole call, retries included.
    pub deadline: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            attempt_timeout: Duration::from_secs(30),
            deadline: Duration::from_secs(60),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
pub struct RetryingLake {
    inner: Arc<dyn Lake>,
    config: RetryConfig,
}

impl RetryingLake {
    pub fn new(inner: Arc<dyn Lake>, config: RetryConfig) -> Self {
        RetryingLake { inner, config }
    }

    async fn run<T, F, Fut>(&self, op: Op, name: &str, f: F) -> LakeResult<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = LakeResult<T>> + Send,
        T: Send,
    {
        run(&self.config, op, name, f).await
    }
}

async fn run<T, F, Fut>(config: &RetryConfig, op: Op, name: &str, mut f: F) -> LakeResult<T>
where
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = LakeResult<T>> + Send,
    T: Send,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let left = config.deadline.saturating_sub(started.elapsed());
        let limit = config.attempt_timeout.min(left);
        let err = match tokio::time::timeout(limit, f()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if !e.is_transient() => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => LakeError::Timeout {
                op,
                name: name.into(),
                secs: limit.as_secs_f64(),
            },
        };
        let backoff = backoff(config, attempt);
        let out_of_time = started.elapsed() + backoff >= config.deadline;
        if attempt >= config.max_attempts || out_of_time {
            tracing::warn!(%op, name, attempts = attempt, error = %err, "lake request failed, giving up");
            return Err(LakeError::Exhausted {
                op,
                name: name.into(),
                attempts: attempt,
                secs: started.elapsed().as_secs_f64(),
                last: Box::new(err),
            });
        }
        tracing::debug!(%op, name, attempt, error = %err, backoff_ms = backoff.as_millis() as u64, "lake request failed, retrying");
        tokio::time::sleep(backoff).await;
    }
}

/// Exponential backoff with full jitter (spreads the retries of many readers that were
/// throttled together).
fn backoff(config: &RetryConfig, attempt: u32) -> Duration {
    let exp = config.base_backoff.saturating_mul(1u32 << attempt.min(16));
    let cap = exp.min(config.max_backoff);
    cap.mul_f64(rand::random::<f64>().max(0.1))
}

/// A body that resumes where it broke off.
struct Resuming {
    inner: Arc<dyn Lake>,
    config: RetryConfig,
    name: String,
    etag: ETag,
    /// Next byte to pass on, and the end of the asked range.
    pos: u64,
    end: u64,
    body: ByteStream,
    resumes: u32,
    done: bool,
}

impl Resuming {
    async fn next(mut self) -> Option<(LakeResult<Bytes>, Self)> {
        loop {
            if self.done {
                return None;
            }
            let err =
                match tokio::time::timeout(self.config.attempt_timeout, self.body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        self.pos += chunk.len() as u64;
                        return Some((Ok(chunk), self));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => e,
                    Err(_) => LakeError::Timeout {
                        op: Op::Get,
                        name: self.name.clone(),
                        secs: self.config.attempt_timeout.as_secs_f64(),
                    },
                };
            if !err.is_transient() || self.resumes >= self.config.max_attempts {
                self.done = true;
                return Some((Err(err), self));
            }
            self.resumes += 1;
            tracing::debug!(name = %self.name, at = self.pos, resume = self.resumes, error = %err, "body broke off; resuming");
            tokio::time::sleep(backoff(&self.config, self.resumes)).await;
            let (inner, range, etag) = (self.inner.clone(), self.pos..self.end, self.etag.clone());
            match run(&self.config, Op::Get, &self.name, || {
                inner.get_stream(&self.name, range.clone(), &etag)
            })
            .await
            {
                Ok(body) => self.body = body,
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
            }
        }
    }
}

#[async_trait]
impl Lake for RetryingLake {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn list_page(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<ListPage> {
        self.run(Op::List, prefix, || {
            self.inner.list_page(prefix, marker, max)
        })
        .await
    }

    async fn list_level(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<LevelPage> {
        self.run(Op::List, prefix, || {
            self.inner.list_level(prefix, marker, max)
        })
        .await
    }

    async fn head(&self, name: &str) -> LakeResult<ObjectMeta> {
        self.run(Op::Head, name, || self.inner.head(name)).await
    }

    async fn get_stream(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &ETag,
    ) -> LakeResult<ByteStream> {
        let body = self
            .run(Op::Get, name, || {
                self.inner.get_stream(name, range.clone(), etag)
            })
            .await?;
        let body = Resuming {
            inner: self.inner.clone(),
            config: self.config.clone(),
            name: name.to_owned(),
            etag: etag.clone(),
            pos: range.start,
            end: range.end,
            body,
            resumes: 0,
            done: false,
        };
        Ok(futures::stream::unfold(body, Resuming::next).boxed())
    }

    async fn put(&self, name: &str, data: Bytes, opts: &PutOptions) -> LakeResult<ETag> {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let r = self
            .run(Op::Put, name, || {
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.inner.put(name, data.clone(), opts)
            })
            .await;
        match r {
            // A create-only put refused after an earlier attempt may have created the
            // blob: ours if it holds exactly our bytes (size and MD5).
            Err(LakeError::Exists { .. })
                if attempts.load(std::sync::atomic::Ordering::Relaxed) > 1 =>
            {
                use md5::Digest as _;
                let md5 = opts
                    .content_md5
                    .unwrap_or_else(|| md5::Md5::digest(&data).into());
                let meta = self.head(name).await?;
                if meta.size == data.len() as u64 && meta.content_md5 == Some(md5) {
                    tracing::debug!(name, "create-only put: an earlier attempt created the blob");
                    Ok(meta.etag)
                } else {
                    Err(LakeError::Exists { name: name.into() })
                }
            }
            r => r,
        }
    }

    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()> {
        self.run(Op::PutBlock, name, || {
            self.inner.put_block(name, id, data.clone(), md5)
        })
        .await
    }

    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag> {
        self.run(Op::PutBlockList, name, || {
            self.inner.put_block_list(name, ids, md5)
        })
        .await
    }

    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[BlockId],
        opts: &PutOptions,
    ) -> LakeResult<ETag> {
        // A conditional commit whose answer was lost is refused when repeated (its own
        // success changed the ETag): the caller reads the blob to tell (see
        // checkpoint::sync's publish).
        self.run(Op::PutBlockList, name, || {
            self.inner.commit_blocks(name, ids, opts)
        })
        .await
    }

    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList> {
        self.run(Op::BlockList, name, || self.inner.get_block_list(name))
            .await
    }

    async fn delete(&self, name: &str) -> LakeResult<()> {
        self.run(Op::Delete, name, || self.inner.delete(name)).await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        // Every attempt proposes the same id: one that succeeded but whose answer was
        // lost is repeated as a renewal of our own lease, not refused by it.
        self.run(Op::Lease, name, || {
            self.inner.acquire_lease(name, secs, proposed)
        })
        .await
    }

    async fn renew_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        self.run(Op::Lease, name, || self.inner.renew_lease(name, lease))
            .await
    }

    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        self.run(Op::Lease, name, || self.inner.release_lease(name, lease))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::faults::{Fault, FaultyLake};
    use crate::lake::memory::MemoryLake;

    fn fast() -> RetryConfig {
        RetryConfig {
            max_attempts: 4,
            attempt_timeout: Duration::from_millis(200),
            deadline: Duration::from_secs(2),
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn transient_faults_are_retried_until_success() {
        let mem = Arc::new(MemoryLake::new());
        let etag = mem.insert("f", "data");
        let faulty = Arc::new(FaultyLake::new(mem));
        faulty.fail(Op::Get, Fault::Throttle, 1);
        faulty.fail(Op::Get, Fault::Reset, 1);
        faulty.fail(Op::Get, Fault::Truncate, 1);
        let lake = RetryingLake::new(faulty.clone(), fast());
        assert_eq!(
            &lake.get_range("f", 0..4, &etag).await.unwrap()[..],
            b"data"
        );
        assert_eq!(faulty.calls(Op::Get), 4);
    }

    #[tokio::test]
    async fn a_hanging_lake_fails_within_the_deadline() {
        let mem = Arc::new(MemoryLake::new());
        let etag = mem.insert("f", "data");
        let faulty = Arc::new(FaultyLake::new(mem));
        faulty.fail_always(Op::Get, Fault::Hang);
        let lake = RetryingLake::new(faulty.clone(), fast());
        let t = Instant::now();
        let err = lake.get_range("f", 0..4, &etag).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        assert!(matches!(err.root(), LakeError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("gave up after"), "{err}");
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let mem = Arc::new(MemoryLake::new());
        let etag = mem.insert("f", "data");
        mem.insert("f", "new!");
        let faulty = Arc::new(FaultyLake::new(mem));
        let lake = RetryingLake::new(faulty.clone(), fast());
        assert!(matches!(
            lake.get_range("f", 0..4, &etag).await,
            Err(LakeError::Changed { .. })
        ));
        assert_eq!(faulty.calls(Op::Get), 1);
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_or_stalls_resumes_from_the_next_byte() {
        let mem = Arc::new(MemoryLake::new());
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let etag = mem.insert("f", data.clone());
        let faulty = Arc::new(FaultyLake::new(mem.clone()));
        faulty.fail(Op::Get, Fault::Truncate, 1);
        faulty.fail(Op::Get, Fault::Stall, 1);
        let lake = RetryingLake::new(faulty.clone(), fast());
        let mut body = lake.get_stream("f", 10..900_000, &etag).await.unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = body.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, data[10..900_000], "every byte once, in order");
        assert_eq!(faulty.calls(Op::Get), 3, "one request, then two resumes");
        // Each resume asks only for the rest: the whole range, then its last half, then
        // its last quarter (restarting from the start would serve three whole ranges).
        let r = 900_000 - 10;
        assert_eq!(
            mem.bytes_served.load(std::sync::atomic::Ordering::Relaxed),
            r + r - r / 2 + (r - r / 2 - (r - r / 2) / 2)
        );
    }

    #[tokio::test]
    async fn a_body_that_keeps_breaking_off_ends_with_an_error() {
        let mem = Arc::new(MemoryLake::new());
        let etag = mem.insert("f", vec![7u8; 10_000]);
        let faulty = Arc::new(FaultyLake::new(mem));
        faulty.fail_always(Op::Get, Fault::Truncate);
        let lake = RetryingLake::new(faulty.clone(), fast());
        let err = lake.get_range("f", 0..10_000, &etag).await.unwrap_err();
        assert!(matches!(err.root(), LakeError::Truncated { .. }), "{err}");
        assert_eq!(faulty.calls(Op::Get), 1 + fast().max_attempts as u64);
    }

    #[tokio::test]
    async fn a_lease_granted_but_whose_answer_was_lost_is_ours_on_retry() {
        let mem = Arc::new(MemoryLake::new());
        mem.insert("ckpt", "x");
        let faulty = Arc::new(FaultyLake::new(mem.clone()));
        // The lake grants the lease, then the connection drops before the answer.
        faulty.fail(Op::Lease, Fault::LostReply, 1);
        let lake = RetryingLake::new(faulty.clone(), fast());
        let proposed = LeaseId::random();
        let lease = lake
            .acquire_lease("ckpt", None, &proposed)
            .await
            .expect("the retry gets the lease its first attempt took");
        assert_eq!(lease, proposed);
        assert_eq!(faulty.calls(Op::Lease), 2);
        // And it is really held: another writer is refused, the holder can release.
        assert!(matches!(
            mem.acquire_lease("ckpt", None, &LeaseId::random()).await,
            Err(LakeError::LeaseConflict { .. })
        ));
        lake.release_lease("ckpt", &lease).await.unwrap();
        mem.acquire_lease("ckpt", None, &LeaseId::random())
            .await
            .expect("released");
    }

    #[tokio::test]
    async fn block_listing_and_lease_renewal_are_retried() {
        let mem = Arc::new(MemoryLake::new());
        mem.insert("lock", "x");
        let faulty = Arc::new(FaultyLake::new(mem.clone()));
        let lake = RetryingLake::new(faulty.clone(), fast());
        lake.put_block(
            "o",
            &BlockId::numbered("u", 0),
            Bytes::from_static(b"abc"),
            None,
        )
        .await
        .unwrap();
        faulty.fail(Op::BlockList, Fault::Throttle, 2);
        let listed = lake.get_block_list("o").await.unwrap();
        assert_eq!(listed.uncommitted, [(BlockId::numbered("u", 0), 3)]);
        assert_eq!(faulty.calls(Op::BlockList), 3);

        let lease = lake
            .acquire_lease("lock", Some(15), &LeaseId::random())
            .await
            .unwrap();
        faulty.fail(Op::Lease, Fault::LostReply, 1);
        faulty.fail(Op::Lease, Fault::Reset, 1);
        lake.renew_lease("lock", &lease).await.unwrap();
        // A lost lease is permanent: one call, no retries.
        let before = faulty.calls(Op::Lease);
        let other = LeaseId::random();
        assert!(matches!(
            lake.renew_lease("lock", &other).await,
            Err(LakeError::LeaseLost { .. })
        ));
        assert_eq!(faulty.calls(Op::Lease), before + 1);
    }

    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_succeeds_on_retry() {
        let mem = Arc::new(MemoryLake::new());
        let faulty = Arc::new(FaultyLake::new(mem.clone()));
        let lake = RetryingLake::new(faulty.clone(), fast());
        let id = BlockId::numbered("u", 0);
        lake.put_block("o", &id, Bytes::from_static(b"abc"), None)
            .await
            .unwrap();
        faulty.fail(Op::PutBlockList, Fault::LostReply, 1);
        lake.put_block_list("o", std::slice::from_ref(&id), None)
            .await
            .expect("the repeated commit finds the committed block");
        assert_eq!(faulty.calls(Op::PutBlockList), 2);
        assert_eq!(&mem.content("o").unwrap()[..], b"abc");
    }

    #[tokio::test]
    async fn a_create_only_put_whose_answer_was_lost_is_ours_on_retry() {
        let mem = Arc::new(MemoryLake::new());
        let faulty = Arc::new(FaultyLake::new(mem.clone()));
        let lake = RetryingLake::new(faulty.clone(), fast());
        // The lake creates the blob, then the connection drops before the answer.
        faulty.fail(Op::Put, Fault::LostReply, 1);
        let etag = lake
            .put("m", Bytes::from_static(b"mine"), &PutOptions::create_only())
            .await
            .expect("the blob the first attempt created holds our bytes");
        assert_eq!(faulty.calls(Op::Put), 2);
        assert_eq!(mem.head("m").await.unwrap().etag, etag);
        // Another writer's blob stays Exists, after a lost answer or not.
        faulty.fail(Op::Put, Fault::Reset, 1);
        let err = lake
            .put("m", Bytes::from_static(b"ours"), &PutOptions::create_only())
            .await
            .unwrap_err();
        assert!(matches!(err, LakeError::Exists { .. }), "{err}");
        let err = lake
            .put("m", Bytes::from_static(b"mine"), &PutOptions::create_only())
            .await
            .unwrap_err();
        assert!(
            matches!(err, LakeError::Exists { .. }),
            "refused at the first attempt: not ours, whatever its bytes: {err}"
        );
    }
}
