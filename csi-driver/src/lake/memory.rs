//! An in-process lake for fast unit and property tests, with the same observable
//! semantics as Azure for what Tidepool uses: name-ordered flat listing with paging,
//! ETags that change on every write, `If-Match` on ranged reads, create-only puts,
//! staged blocks that become visible only when committed (ids of one blob of equal
//! length, "latest" lookup on commit so a repeated commit succeeds), block listing,
//! idempotent delete, and exclusive leases that expire and can be renewed.
//!
//! Lease time is the monotonic clock plus an offset that tests move forward with
//! [`MemoryLake::pass_time`] (no test waits 15 s for a lease to expire). Writes carry no lease
//! id (the `Lake` trait has none), so an active lease refuses every write, as Azure
//! refuses a write without `x-ms-lease-id`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};
use parking_lot::Mutex;

use super::*;

/// Body chunk size: odd, so chunk edges fall anywhere relative to cache blocks.
const CHUNK: usize = 100_003;

/// Azure's longest block id, in bytes before base64.
const MAX_BLOCK_ID: usize = 64;

#[derive(Debug, Default)]
pub struct MemoryLake {
    state: Mutex<State>,
    version: AtomicU64,
    /// Ranged reads that reached the store, and the bytes they served (tests assert
    /// "each byte fetched once").
    pub gets: AtomicU64,
    pub bytes_served: AtomicU64,
    /// Time passed by [`MemoryLake::pass_time`], added to the clock leases see.
    skew: Mutex<Duration>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    /// Uncommitted blocks per blob name, in staging order (a re-staged id replaces its
    /// block in place).
    staged: HashMap<String, Vec<(String, Bytes)>>,
    leases: HashMap<String, Lease>,
}

#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    meta: ObjectMeta,
    /// Committed block ids and where their bytes are in `data` (empty after a put).
    blocks: Vec<(String, Range<usize>)>,
}

#[derive(Debug)]
struct Lease {
    id: String,
    /// `None`: infinite.
    secs: Option<u32>,
    until: Option<Instant>,
}

impl Lease {
    fn active(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now < t)
    }

    fn restart(&mut self, now: Instant) {
        self.until = self.secs.map(|s| now + Duration::from_secs(u64::from(s)));
    }
}

impl State {
    /// Whether another writer's active lease refuses a write without a lease id.
    fn leased(&self, name: &str, now: Instant) -> bool {
        self.leases.get(name).is_some_and(|l| l.active(now))
    }
}

impl MemoryLake {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the lake's lease clock forward by `d` (leases expire as if `d` had passed).
    pub fn pass_time(&self, d: Duration) {
        *self.skew.lock() += d;
    }

    fn now(&self) -> Instant {
        Instant::now() + *self.skew.lock()
    }

    fn next_etag(&self) -> ETag {
        ETag(format!(
            "\"0x{:016X}\"",
            self.version.fetch_add(1, Ordering::Relaxed) + 1
        ))
    }

    /// Store an object directly (test set-up); returns its new ETag.
    pub fn insert(&self, name: &str, data: impl Into<Bytes>) -> ETag {
        let data = data.into();
        let md5 = Md5::digest(&data).into();
        self.insert_with_md5(name, data, Some(md5))
    }

    /// Like [`MemoryLake::insert`] with a chosen `Content-MD5` (none, or a wrong one, as
    /// some writers leave).
    pub fn insert_with_md5(
        &self,
        name: &str,
        data: impl Into<Bytes>,
        content_md5: Option<[u8; 16]>,
    ) -> ETag {
        let mut st = self.state.lock();
        self.store(&mut st, name, data.into(), content_md5, Vec::new())
    }

    fn store(
        &self,
        st: &mut State,
        name: &str,
        data: Bytes,
        content_md5: Option<[u8; 16]>,
        blocks: Vec<(String, Range<usize>)>,
    ) -> ETag {
        let etag = self.next_etag();
        let meta = ObjectMeta {
            name: name.to_owned(),
            size: data.len() as u64,
            etag: etag.clone(),
            last_modified: SystemTime::now(),
            content_md5,
        };
        st.objects
            .insert(name.to_owned(), Object { data, meta, blocks });
        etag
    }

    /// The whole content of an object (test assertions).
    pub fn content(&self, name: &str) -> Option<Bytes> {
        self.state.lock().objects.get(name).map(|o| o.data.clone())
    }
}

/// `If-None-Match: *` and `If-Match`, as Azure answers them.
fn check_conditions(st: &State, name: &str, opts: &PutOptions) -> LakeResult<()> {
    let current = st.objects.get(name);
    if opts.if_none_match_any && current.is_some() {
        return Err(LakeError::Exists { name: name.into() });
    }
    if let Some(want) = &opts.if_match {
        match current {
            None => return Err(LakeError::NotFound { name: name.into() }),
            Some(o) if &o.meta.etag != want => {
                return Err(LakeError::Changed {
                    name: name.into(),
                    expected: want.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The least name greater than every name under `prefix` (which ends in `/`).
fn after_prefix(prefix: &str) -> String {
    let mut s = prefix[..prefix.len() - 1].to_owned();
    s.push('0'); // the character after '/'
    s
}

fn md5_mismatch(op: Op, name: &str) -> LakeError {
    LakeError::Other {
        op,
        name: name.into(),
        status: 400,
        detail: "Md5Mismatch".into(),
    }
}

#[async_trait]
impl Lake for MemoryLake {
    fn describe(&self) -> String {
        "memory://".into()
    }

    async fn list_page(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<ListPage> {
        let st = self.state.lock();
        let start = marker.unwrap_or(prefix).to_owned();
        let mut objects = Vec::new();
        let mut next = None;
        for (name, o) in st.objects.range(start..) {
            if !name.starts_with(prefix) {
                break;
            }
            if Some(name.as_str()) == marker {
                continue;
            }
            if objects.len() == max as usize {
                next = objects.last().map(|o: &ObjectMeta| o.name.clone());
                break;
            }
            objects.push(o.meta.clone());
        }
        Ok(ListPage { objects, next })
    }

    async fn list_level(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<LevelPage> {
        use std::ops::Bound;
        let max = max.max(1);
        let st = self.state.lock();
        // The marker is the last entry given, tagged: `o:` an object (listing resumes
        // after it), `p:` a prefix (resumes after every name under it).
        let mut from = match marker {
            None => Bound::Included(prefix.to_owned()),
            Some(m) => match (m.strip_prefix("o:"), m.strip_prefix("p:")) {
                (Some(o), _) => Bound::Excluded(o.to_owned()),
                (_, Some(p)) => Bound::Included(after_prefix(p)),
                _ => {
                    return Err(LakeError::Other {
                        op: Op::List,
                        name: prefix.into(),
                        status: 400,
                        detail: format!("bad marker {m}"),
                    });
                }
            },
        };
        let mut page = LevelPage::default();
        loop {
            let Some((name, o)) = st.objects.range((from.clone(), Bound::Unbounded)).next() else {
                return Ok(page);
            };
            if !name.starts_with(prefix) {
                return Ok(page);
            }
            if page.objects.len() + page.prefixes.len() == max as usize {
                let last = match (page.objects.last(), page.prefixes.last()) {
                    (Some(o), Some(p)) if o.name > *p => format!("o:{}", o.name),
                    (_, Some(p)) => format!("p:{p}"),
                    (Some(o), None) => format!("o:{}", o.name),
                    (None, None) => unreachable!("max is at least 1"),
                };
                page.next = Some(last);
                return Ok(page);
            }
            match name[prefix.len()..].find('/') {
                Some(i) => {
                    let p = name[..prefix.len() + i + 1].to_owned();
                    from = Bound::Included(after_prefix(&p));
                    page.prefixes.push(p);
                }
                None => {
                    from = Bound::Excluded(name.clone());
                    page.objects.push(o.meta.clone());
                }
            }
        }
    }

    async fn head(&self, name: &str) -> LakeResult<ObjectMeta> {
        let st = self.state.lock();
        st.objects
            .get(name)
            .map(|o| o.meta.clone())
            .ok_or_else(|| LakeError::NotFound { name: name.into() })
    }

    async fn get_stream(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &ETag,
    ) -> LakeResult<ByteStream> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let st = self.state.lock();
        let o = st
            .objects
            .get(name)
            .ok_or_else(|| LakeError::NotFound { name: name.into() })?;
        if &o.meta.etag != etag {
            return Err(LakeError::Changed {
                name: name.into(),
                expected: etag.clone(),
            });
        }
        let len = o.data.len() as u64;
        let start = range.start.min(len) as usize;
        let end = range.end.min(len) as usize;
        let body = o.data.slice(start..end.max(start));
        self.bytes_served
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        // In network-sized chunks, so consumers meet bodies split anywhere.
        let chunks: Vec<LakeResult<Bytes>> = (0..body.len())
            .step_by(CHUNK)
            .map(|i| Ok(body.slice(i..(i + CHUNK).min(body.len()))))
            .collect();
        Ok(futures::stream::iter(chunks).boxed())
    }

    async fn put(&self, name: &str, data: Bytes, opts: &PutOptions) -> LakeResult<ETag> {
        let md5: [u8; 16] = Md5::digest(&data).into();
        if opts.content_md5.is_some_and(|want| want != md5) {
            return Err(md5_mismatch(Op::Put, name));
        }
        let mut st = self.state.lock();
        check_conditions(&st, name, opts)?;
        if st.leased(name, self.now()) {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        // A copy, as for put_block.
        let data = Bytes::copy_from_slice(&data);
        Ok(self.store(&mut st, name, data, Some(md5), Vec::new()))
    }

    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()> {
        if let Some(want) = md5
            && <[u8; 16]>::from(Md5::digest(&data)) != want
        {
            return Err(md5_mismatch(Op::PutBlock, name));
        }
        let invalid = |detail: &str| LakeError::Other {
            op: Op::PutBlock,
            name: name.into(),
            status: 400,
            detail: detail.into(),
        };
        if id.0.is_empty() || id.0.len() > MAX_BLOCK_ID {
            return Err(invalid(
                "InvalidQueryParameterValue: block id of 1 to 64 bytes",
            ));
        }
        let mut st = self.state.lock();
        if st.leased(name, self.now()) {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        let staged = st.staged.entry(name.to_owned()).or_default();
        if staged
            .first()
            .is_some_and(|(other, _)| other.len() != id.0.len())
        {
            return Err(invalid(
                "InvalidBlobOrBlock: block ids of one blob must have the same length",
            ));
        }
        // A copy: the caller's buffer is its own again once this returns (the upload
        // recycles block buffers; a lake keeping them would starve it).
        let data = Bytes::copy_from_slice(&data);
        match staged.iter_mut().find(|(other, _)| *other == id.0) {
            Some(slot) => slot.1 = data,
            None => staged.push((id.0.clone(), data)),
        }
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
        let mut st = self.state.lock();
        check_conditions(&st, name, opts)?;
        if st.leased(name, self.now()) {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        let mut buf = BytesMut::new();
        let mut blocks = Vec::with_capacity(ids.len());
        {
            let staged = st.staged.get(name);
            let committed = st.objects.get(name);
            for id in ids {
                // "Latest": the uncommitted block, else the committed one.
                let bytes = staged
                    .and_then(|s| s.iter().find(|(n, _)| *n == id.0).map(|(_, b)| b.clone()))
                    .or_else(|| {
                        committed.and_then(|o| {
                            o.blocks
                                .iter()
                                .find(|(n, _)| *n == id.0)
                                .map(|(_, r)| o.data.slice(r.clone()))
                        })
                    })
                    .ok_or_else(|| LakeError::Other {
                        op: Op::PutBlockList,
                        name: name.into(),
                        status: 400,
                        detail: format!("InvalidBlockList: block {} was never staged", id.0),
                    })?;
                blocks.push((id.0.clone(), buf.len()..buf.len() + bytes.len()));
                buf.extend_from_slice(&bytes);
            }
        }
        st.staged.remove(name);
        Ok(self.store(&mut st, name, buf.freeze(), content_md5, blocks))
    }

    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList> {
        let st = self.state.lock();
        let committed = st
            .objects
            .get(name)
            .map(|o| {
                o.blocks
                    .iter()
                    .map(|(id, r)| (BlockId(id.clone()), (r.end - r.start) as u64))
                    .collect()
            })
            .unwrap_or_default();
        let uncommitted = st
            .staged
            .get(name)
            .map(|s| {
                s.iter()
                    .map(|(id, b)| (BlockId(id.clone()), b.len() as u64))
                    .collect()
            })
            .unwrap_or_default();
        Ok(BlockList {
            committed,
            uncommitted,
        })
    }

    async fn delete(&self, name: &str) -> LakeResult<()> {
        let mut st = self.state.lock();
        if st.leased(name, self.now()) {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        st.objects.remove(name);
        st.staged.remove(name);
        st.leases.remove(name);
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        let mut st = self.state.lock();
        if !st.objects.contains_key(name) {
            return Err(LakeError::NotFound { name: name.into() });
        }
        let now = self.now();
        if let Some(held) = st.leases.get(name)
            && held.active(now)
            && held.id != proposed.0
        {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        let mut lease = Lease {
            id: proposed.0.clone(),
            // Azure: 15..=60 seconds, or infinite.
            secs: secs.map(|s| s.clamp(15, 60)),
            until: None,
        };
        lease.restart(now);
        st.leases.insert(name.to_owned(), lease);
        Ok(proposed.clone())
    }

    async fn renew_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let now = self.now();
        let mut st = self.state.lock();
        if !st.objects.contains_key(name) {
            return Err(LakeError::NotFound { name: name.into() });
        }
        // Expired but not taken since: still ours to renew.
        match st.leases.get_mut(name) {
            Some(held) if held.id == lease.0 => {
                held.restart(now);
                Ok(())
            }
            _ => Err(LakeError::LeaseLost { name: name.into() }),
        }
    }

    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let mut st = self.state.lock();
        if st.leases.get(name).is_some_and(|l| l.id == lease.0) {
            st.leases.remove(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listing_pages_in_name_order_within_prefix() {
        let lake = MemoryLake::new();
        for n in ["a/3", "a/1", "b/1", "a/2", "a0"] {
            lake.insert(n, "x");
        }
        let mut lister = Lister::new(&lake, "a/").page_size(2);
        let mut names = vec![];
        let mut pages = 0;
        while let Some(page) = lister.next_page().await.unwrap() {
            pages += 1;
            names.extend(page.into_iter().map(|o| o.name));
        }
        assert_eq!(names, ["a/1", "a/2", "a/3"]);
        assert_eq!(pages, 2);
    }

    #[tokio::test]
    async fn ranged_get_is_pinned_to_etag_and_clipped() {
        let lake = MemoryLake::new();
        let e1 = lake.insert("f", "hello world");
        assert_eq!(
            &lake.get_range("f", 6..100, &e1).await.unwrap()[..],
            b"world"
        );
        lake.insert("f", "HELLO WORLD");
        assert!(matches!(
            lake.get_range("f", 0..5, &e1).await,
            Err(LakeError::Changed { .. })
        ));
    }

    #[tokio::test]
    async fn blocks_commit_in_list_order_and_leases_exclude() {
        let lake = MemoryLake::new();
        lake.put_block(
            "o",
            &BlockId::numbered("u", 1),
            Bytes::from_static(b"world"),
            None,
        )
        .await
        .unwrap();
        lake.put_block(
            "o",
            &BlockId::numbered("u", 0),
            Bytes::from_static(b"hello "),
            None,
        )
        .await
        .unwrap();
        assert!(lake.head("o").await.is_err(), "staged blocks are invisible");
        lake.put_block_list(
            "o",
            &[BlockId::numbered("u", 0), BlockId::numbered("u", 1)],
            None,
        )
        .await
        .unwrap();
        assert_eq!(&lake.content("o").unwrap()[..], b"hello world");
        assert!(
            lake.get_block_list("o")
                .await
                .unwrap()
                .uncommitted
                .is_empty(),
            "staged blocks are consumed by the commit"
        );
        let lease = lake
            .acquire_lease("o", Some(15), &LeaseId::random())
            .await
            .unwrap();
        assert!(matches!(
            lake.acquire_lease("o", Some(15), &LeaseId::random()).await,
            Err(LakeError::LeaseConflict { .. })
        ));
        assert_eq!(
            lake.acquire_lease("o", Some(15), &lease).await.unwrap(),
            lease,
            "the holder acquiring again keeps its lease"
        );
        lake.release_lease("o", &lease).await.unwrap();
        lake.delete("o").await.unwrap();
        lake.delete("o").await.unwrap();
    }

    #[tokio::test]
    async fn create_only_put_refuses_an_existing_blob_and_a_wrong_md5() {
        let lake = MemoryLake::new();
        let data = Bytes::from_static(b"manifest v1");
        let md5: [u8; 16] = Md5::digest(&data).into();
        let etag = lake
            .put("m", data.clone(), &PutOptions::create_only().with_md5(md5))
            .await
            .unwrap();
        assert_eq!(lake.head("m").await.unwrap().content_md5, Some(md5));
        let again = lake
            .put(
                "m",
                Bytes::from_static(b"manifest v2"),
                &PutOptions::create_only(),
            )
            .await;
        assert!(matches!(again, Err(LakeError::Exists { .. })), "{again:?}");
        assert_eq!(lake.head("m").await.unwrap().etag, etag, "left as it was");
        let bad = lake
            .put("n", data, &PutOptions::default().with_md5([0; 16]))
            .await;
        assert!(
            bad.is_err(),
            "a body that does not match its MD5 is refused"
        );
        assert!(matches!(
            lake.head("n").await,
            Err(LakeError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn block_lists_show_staged_and_committed_blocks_and_a_commit_repeats() {
        let lake = MemoryLake::new();
        assert_eq!(
            lake.get_block_list("o").await.unwrap(),
            BlockList::default()
        );
        let (a, b) = (BlockId::numbered("u", 0), BlockId::numbered("u", 1));
        lake.put_block("o", &a, Bytes::from_static(b"hello "), None)
            .await
            .unwrap();
        lake.put_block("o", &b, Bytes::from_static(b"world"), None)
            .await
            .unwrap();
        let bad = lake
            .put_block(
                "o",
                &BlockId("short".into()),
                Bytes::from_static(b"x"),
                None,
            )
            .await;
        assert!(bad.is_err(), "ids of one blob must have one length");
        let listed = lake.get_block_list("o").await.unwrap();
        assert_eq!(listed.uncommitted, [(a.clone(), 6), (b.clone(), 5)]);
        assert!(listed.committed.is_empty());

        let md5: [u8; 16] = Md5::digest(b"hello world").into();
        let ids = [a.clone(), b.clone()];
        lake.put_block_list("o", &ids, Some(md5)).await.unwrap();
        let listed = lake.get_block_list("o").await.unwrap();
        assert_eq!(listed.committed, [(a.clone(), 6), (b.clone(), 5)]);
        assert!(listed.uncommitted.is_empty());
        assert_eq!(lake.head("o").await.unwrap().content_md5, Some(md5));
        // The same commit again (its answer lost): the committed blocks are found.
        lake.put_block_list("o", &ids, Some(md5)).await.unwrap();
        assert_eq!(&lake.content("o").unwrap()[..], b"hello world");
        // Without an MD5 the committed blob has none (as in Azure).
        lake.put_block_list("o", std::slice::from_ref(&b), None)
            .await
            .unwrap();
        assert_eq!(&lake.content("o").unwrap()[..], b"world");
        assert_eq!(lake.head("o").await.unwrap().content_md5, None);
        // A single put leaves no committed blocks.
        lake.put("o", Bytes::from_static(b"x"), &PutOptions::default())
            .await
            .unwrap();
        assert_eq!(
            lake.get_block_list("o").await.unwrap(),
            BlockList::default()
        );
    }

    #[tokio::test]
    async fn leases_expire_renew_and_are_lost_to_another_writer() {
        let lake = MemoryLake::new();
        lake.insert("lock", "x");
        let ours = lake
            .acquire_lease("lock", Some(15), &LeaseId::random())
            .await
            .unwrap();
        lake.pass_time(Duration::from_secs(10));
        lake.renew_lease("lock", &ours).await.unwrap();
        lake.pass_time(Duration::from_secs(10));
        assert!(
            matches!(
                lake.acquire_lease("lock", Some(15), &LeaseId::random())
                    .await,
                Err(LakeError::LeaseConflict { .. })
            ),
            "renewed 10 s ago for 15 s: still held"
        );
        lake.pass_time(Duration::from_secs(10));
        lake.renew_lease("lock", &ours)
            .await
            .expect("expired but not taken since: renewable");
        lake.pass_time(Duration::from_secs(16));
        let theirs = lake
            .acquire_lease("lock", Some(15), &LeaseId::random())
            .await
            .expect("expired: free to take");
        assert!(matches!(
            lake.renew_lease("lock", &ours).await,
            Err(LakeError::LeaseLost { .. })
        ));
        lake.release_lease("lock", &theirs).await.unwrap();
        assert!(matches!(
            lake.renew_lease("lock", &theirs).await,
            Err(LakeError::LeaseLost { .. })
        ));
        assert!(matches!(
            lake.renew_lease("nope", &ours).await,
            Err(LakeError::NotFound { .. })
        ));
    }
}
