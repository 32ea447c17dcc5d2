//! An in-process lake for fast unit and property tests, with the same observable
//! semantics as Azure for what Tidepool uses: name-ordered flat listing with paging,
//! ETags that change on every write, `If-Match` on ranged reads, staged blocks that
//! become visible only when committed, idempotent delete and exclusive leases.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};
use parking_lot::Mutex;

use super::*;

/// Body chunk size: odd, so chunk edges fall anywhere relative to cache blocks.
const CHUNK: usize = 100_003;

#[derive(Debug, Default)]
pub struct MemoryLake {
    state: Mutex<State>,
    version: AtomicU64,
    /// Ranged reads that reached the store, and the bytes they served (tests assert
    /// "each byte fetched once").
    pub gets: AtomicU64,
    pub bytes_served: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    staged: HashMap<(String, String), Bytes>,
    leases: HashMap<String, String>,
}

#[derive(Debug, Clone)]
struct Object {
    data: Bytes,
    meta: ObjectMeta,
}

impl MemoryLake {
    pub fn new() -> Self {
        Self::default()
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
        let data = data.into();
        let etag = self.next_etag();
        let meta = ObjectMeta {
            name: name.to_owned(),
            size: data.len() as u64,
            etag: etag.clone(),
            last_modified: SystemTime::now(),
            content_md5,
        };
        self.state
            .lock()
            .objects
            .insert(name.to_owned(), Object { data, meta });
        etag
    }

    /// The whole content of an object (test assertions).
    pub fn content(&self, name: &str) -> Option<Bytes> {
        self.state.lock().objects.get(name).map(|o| o.data.clone())
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

    async fn put(&self, name: &str, data: Bytes) -> LakeResult<ETag> {
        if self.state.lock().leases.contains_key(name) {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        Ok(self.insert(name, data))
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
            return Err(LakeError::Other {
                op: Op::PutBlock,
                name: name.into(),
                status: 400,
                detail: "Md5Mismatch".into(),
            });
        }
        self.state
            .lock()
            .staged
            .insert((name.to_owned(), id.0.clone()), data);
        Ok(())
    }

    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        content_md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag> {
        let mut buf = BytesMut::new();
        {
            let st = self.state.lock();
            if st.leases.contains_key(name) {
                return Err(LakeError::LeaseConflict { name: name.into() });
            }
            for id in ids {
                let b = st
                    .staged
                    .get(&(name.to_owned(), id.0.clone()))
                    .ok_or_else(|| LakeError::Other {
                        op: Op::PutBlockList,
                        name: name.into(),
                        status: 400,
                        detail: format!("InvalidBlockList: block {} was never staged", id.0),
                    })?;
                buf.extend_from_slice(b);
            }
        }
        let data = buf.freeze();
        let etag = self.insert(name, data);
        let mut st = self.state.lock();
        st.staged.retain(|(n, _), _| n != name);
        if let (Some(md5), Some(o)) = (content_md5, st.objects.get_mut(name)) {
            o.meta.content_md5 = Some(md5);
        }
        Ok(etag)
    }

    async fn delete(&self, name: &str) -> LakeResult<()> {
        let mut st = self.state.lock();
        if st.leases.contains_key(name) {
            return Err(LakeError::LeaseConflict { name: name.into() });
        }
        st.objects.remove(name);
        Ok(())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        _secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        let mut st = self.state.lock();
        if !st.objects.contains_key(name) {
            return Err(LakeError::NotFound { name: name.into() });
        }
        match st.leases.get(name) {
            Some(held) if *held != proposed.0 => {
                Err(LakeError::LeaseConflict { name: name.into() })
            }
            _ => {
                st.leases.insert(name.to_owned(), proposed.0.clone());
                Ok(proposed.clone())
            }
        }
    }

    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        let mut st = self.state.lock();
        if st.leases.get(name) == Some(&lease.0) {
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
}
