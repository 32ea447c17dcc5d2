//! A lake wrapper that injects faults, per operation, to test what users meet when the
//! lake is far away or unwell: added latency, throttling (503), connection resets,
//! truncated bodies and requests that never answer.
//!
//! Faults are deterministic (no randomness): each rule fires for the next `times`
//! matching calls (or forever), optionally after letting a number of calls through
//! first, so a test can say "the first two GETs are reset" or "the fourth Put Block
//! onwards fails" and assert exactly what the caller sees. Rules of one operation apply
//! in the order they were added. Every operation can be faulted: [`Op::Lease`] covers
//! acquire, renew and release, [`Op::BlockList`] Get Block List.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 503 Server Busy.
    Throttle,
    /// The connection drops before an answer.
    Reset,
    /// A GET body breaks off after half of what was asked (connection dropped).
    Truncate,
    /// A GET body stops after half of what was asked and never sends more (a stalled
    /// connection that stays open).
    Stall,
    /// No answer at all (until the caller's timeout cancels the call).
    Hang,
    /// The call waits until [`FaultyLake::heal`], then goes through: a lake that is
    /// slow exactly where a test wants it, for as long as the test wants.
    Hold,
    /// The request reaches the lake and takes effect, then the connection drops
    /// before the answer arrives (the caller cannot tell it from [`Fault::Reset`]).
    LostReply,
}

#[derive(Debug)]
struct Rule {
    fault: Fault,
    /// Matching calls let through before the rule starts firing.
    skip: u32,
    /// Remaining firings; `None` is forever.
    remaining: Option<u32>,
}

#[derive(Debug)]
pub struct FaultyLake {
    inner: Arc<dyn Lake>,
    rules: Mutex<HashMap<Op, Vec<Rule>>>,
    latency: Mutex<HashMap<Op, Duration>>,
    /// Calls that reached this wrapper, per operation (faulted or not).
    calls: Mutex<HashMap<Op, u64>>,
    /// Faults actually injected.
    pub injected: AtomicU64,
    /// Listing requests (flat and one-level) under way now, and the most at once.
    listing: AtomicU64,
    most_listing: AtomicU64,
    /// Runs once before the next write (put, block commit) of a name: another writer
    /// acting between a caller's look at the lake and its write.
    hooks: Mutex<HashMap<String, Hook>>,
    /// Counts heals: held calls wait for it to change.
    heals: tokio::sync::watch::Sender<u64>,
}

/// See [`FaultyLake::before_write`].
pub type WriteHook = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>;

struct Hook(u32, Option<WriteHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteHook")
    }
}

impl FaultyLake {
    pub fn new(inner: Arc<dyn Lake>) -> Self {
        FaultyLake {
            inner,
            rules: Mutex::default(),
            latency: Mutex::default(),
            calls: Mutex::default(),
            injected: AtomicU64::new(0),
            listing: AtomicU64::new(0),
            most_listing: AtomicU64::new(0),
            hooks: Mutex::default(),
            heals: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Inject `fault` into the next `times` calls of `op`.
    pub fn fail(&self, op: Op, fault: Fault, times: u32) {
        self.fail_after(op, 0, fault, Some(times));
    }

    /// Inject `fault` into every call of `op` until [`FaultyLake::heal`].
    pub fn fail_always(&self, op: Op, fault: Fault) {
        self.fail_after(op, 0, fault, None);
    }

    /// Let the next `skip` calls of `op` through, then inject `fault` into `times` calls
    /// (`None`: every call until [`FaultyLake::heal`]).
    pub fn fail_after(&self, op: Op, skip: u32, fault: Fault, times: Option<u32>) {
        self.rules.lock().entry(op).or_default().push(Rule {
            fault,
            skip,
            remaining: times,
        });
    }

    /// Add `delay` before every call of `op`.
    pub fn set_latency(&self, op: Op, delay: Duration) {
        self.latency.lock().insert(op, delay);
    }

    /// Runs `hook` (to completion) right before a write of `name` reaches the lake,
    /// after letting `skip` writes of it through: a race with another writer, made to
    /// happen at the worst moment.
    pub fn before_write(&self, name: &str, skip: u32, hook: WriteHook) {
        self.hooks
            .lock()
            .insert(name.to_owned(), Hook(skip, Some(hook)));
    }

    async fn run_hook(&self, name: &str) {
        let hook = {
            let mut hooks = self.hooks.lock();
            match hooks.get_mut(name) {
                Some(Hook(skip, _)) if *skip > 0 => {
                    *skip -= 1;
                    None
                }
                Some(_) => hooks.remove(name).and_then(|Hook(_, h)| h),
                None => None,
            }
        };
        if let Some(h) = hook {
            h().await;
        }
    }

    /// Remove every rule and added latency, and let held calls go on.
    pub fn heal(&self) {
        self.rules.lock().clear();
        self.latency.lock().clear();
        self.heals.send_modify(|n| *n += 1);
    }

    /// The most listing requests (flat and one-level) that were under way at once.
    pub fn most_listings_at_once(&self) -> u64 {
        self.most_listing.load(Ordering::SeqCst)
    }

    /// Runs one listing request, counting it while under way.
    async fn listing<T>(
        &self,
        f: impl std::future::Future<Output = LakeResult<T>>,
    ) -> LakeResult<T> {
        let now = self.listing.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_listing.fetch_max(now, Ordering::SeqCst);
        let r = f.await;
        self.listing.fetch_sub(1, Ordering::SeqCst);
        r
    }

    pub fn calls(&self, op: Op) -> u64 {
        self.calls.lock().get(&op).copied().unwrap_or(0)
    }

    async fn before(&self, op: Op, name: &str) -> LakeResult<Option<Fault>> {
        *self.calls.lock().entry(op).or_default() += 1;
        let delay = self.latency.lock().get(&op).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let heals = self.heals.subscribe();
        let fault = {
            let mut rules = self.rules.lock();
            let list = rules.entry(op).or_default();
            let fault = list.first_mut().and_then(|r| {
                if r.skip > 0 {
                    r.skip -= 1;
                    return None;
                }
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                }
                Some(r.fault)
            });
            list.retain(|r| r.remaining != Some(0));
            fault
        };
        let Some(fault) = fault else { return Ok(None) };
        self.injected.fetch_add(1, Ordering::Relaxed);
        match fault {
            Fault::Throttle => Err(LakeError::Throttled {
                op,
                name: name.into(),
                status: 503,
            }),
            Fault::Reset => Err(LakeError::Connection {
                op,
                name: name.into(),
                detail: "connection reset by peer (injected)".into(),
            }),
            Fault::Hang => std::future::pending().await,
            Fault::Hold => {
                let mut heals = heals;
                let _ = heals.changed().await;
                Ok(None)
            }
            Fault::Truncate | Fault::Stall | Fault::LostReply => Ok(Some(fault)),
        }
    }

    /// Applies a fault that strikes after the lake acted ([`Fault::LostReply`]).
    fn after<T>(
        &self,
        fault: Option<Fault>,
        op: Op,
        name: &str,
        r: LakeResult<T>,
    ) -> LakeResult<T> {
        match fault {
            Some(Fault::LostReply) => {
                drop(r);
                Err(LakeError::Connection {
                    op,
                    name: name.into(),
                    detail: "connection reset by peer after the request was sent (injected)".into(),
                })
            }
            _ => r,
        }
    }
}

#[async_trait]
impl Lake for FaultyLake {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn list_page(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<ListPage> {
        self.listing(async {
            self.before(Op::List, prefix).await?;
            self.inner.list_page(prefix, marker, max).await
        })
        .await
    }

    async fn list_level(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<LevelPage> {
        self.listing(async {
            self.before(Op::List, prefix).await?;
            self.inner.list_level(prefix, marker, max).await
        })
        .await
    }

    async fn head(&self, name: &str) -> LakeResult<ObjectMeta> {
        self.before(Op::Head, name).await?;
        self.inner.head(name).await
    }

    async fn get_stream(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &ETag,
    ) -> LakeResult<ByteStream> {
        let fault = self.before(Op::Get, name).await?;
        let body = self.inner.get_stream(name, range, etag).await?;
        let Some(fault) = fault else { return Ok(body) };
        // Test-only: the body is gathered to know where its middle is.
        let whole = body
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<LakeResult<Vec<Bytes>>>()?
            .concat();
        let half = Bytes::from(whole[..whole.len() / 2].to_vec());
        let (expected, got) = (whole.len() as u64, half.len() as u64);
        let first = futures::stream::iter([Ok(half)]);
        Ok(match fault {
            // What a real client sees when the connection dies mid-body.
            Fault::Truncate => first
                .chain(futures::stream::iter([Err(LakeError::Truncated {
                    name: name.into(),
                    expected,
                    got,
                })]))
                .boxed(),
            _ => first.chain(futures::stream::pending()).boxed(),
        })
    }

    async fn put(&self, name: &str, data: Bytes, opts: &PutOptions) -> LakeResult<ETag> {
        self.run_hook(name).await;
        let fault = self.before(Op::Put, name).await?;
        let r = self.inner.put(name, data, opts).await;
        self.after(fault, Op::Put, name, r)
    }

    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()> {
        let fault = self.before(Op::PutBlock, name).await?;
        let r = self.inner.put_block(name, id, data, md5).await;
        self.after(fault, Op::PutBlock, name, r)
    }

    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag> {
        self.run_hook(name).await;
        let fault = self.before(Op::PutBlockList, name).await?;
        let r = self.inner.put_block_list(name, ids, md5).await;
        self.after(fault, Op::PutBlockList, name, r)
    }

    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[BlockId],
        opts: &PutOptions,
    ) -> LakeResult<ETag> {
        self.run_hook(name).await;
        let fault = self.before(Op::PutBlockList, name).await?;
        let r = self.inner.commit_blocks(name, ids, opts).await;
        self.after(fault, Op::PutBlockList, name, r)
    }

    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList> {
        let fault = self.before(Op::BlockList, name).await?;
        let r = self.inner.get_block_list(name).await;
        self.after(fault, Op::BlockList, name, r)
    }

    async fn delete(&self, name: &str) -> LakeResult<()> {
        let fault = self.before(Op::Delete, name).await?;
        let r = self.inner.delete(name).await;
        self.after(fault, Op::Delete, name, r)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        let fault = self.before(Op::Lease, name).await?;
        let r = self.inner.acquire_lease(name, secs, proposed).await;
        self.after(fault, Op::Lease, name, r)
    }

    async fn renew_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let fault = self.before(Op::Lease, name).await?;
        let r = self.inner.renew_lease(name, lease).await;
        self.after(fault, Op::Lease, name, r)
    }

    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let fault = self.before(Op::Lease, name).await?;
        let r = self.inner.release_lease(name, lease).await;
        self.after(fault, Op::Lease, name, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::memory::MemoryLake;

    #[tokio::test]
    async fn a_rule_can_let_calls_through_before_it_fires() {
        let lake = FaultyLake::new(Arc::new(MemoryLake::new()));
        lake.fail_after(Op::PutBlock, 2, Fault::Throttle, Some(1));
        let ids: Vec<BlockId> = (0..4).map(|n| BlockId::numbered("u", n)).collect();
        let put = |n: usize| lake.put_block("o", &ids[n], Bytes::from_static(b"x"), None);
        put(0).await.unwrap();
        put(1).await.unwrap();
        assert!(matches!(put(2).await, Err(LakeError::Throttled { .. })));
        put(3).await.unwrap();
        assert_eq!(lake.calls(Op::PutBlock), 4);
        assert_eq!(lake.injected.load(Ordering::Relaxed), 1);
        // Only the two blocks staged before the fault and the one after are there.
        let staged = lake.get_block_list("o").await.unwrap().uncommitted;
        assert_eq!(staged.len(), 3);
    }

    #[tokio::test]
    async fn block_listing_and_lease_renewal_can_be_faulted() {
        let mem = Arc::new(MemoryLake::new());
        mem.insert("lock", "x");
        let lake = FaultyLake::new(mem.clone());
        lake.fail(Op::BlockList, Fault::Reset, 1);
        assert!(matches!(
            lake.get_block_list("lock").await,
            Err(LakeError::Connection { .. })
        ));
        lake.get_block_list("lock").await.unwrap();
        let lease = lake
            .acquire_lease("lock", Some(15), &LeaseId::random())
            .await
            .unwrap();
        // The renewal reaches the lake, its answer does not.
        lake.fail(Op::Lease, Fault::LostReply, 1);
        assert!(lake.renew_lease("lock", &lease).await.is_err());
        lake.renew_lease("lock", &lease).await.unwrap();
        assert_eq!(lake.calls(Op::BlockList), 2);
        assert_eq!(lake.calls(Op::Lease), 3);
    }
}
