//! A read-only lake of any number of objects that holds none of them: names, sizes,
//! ETags and content are computed from an object's index, so a listing of ten million
//! objects costs no memory here, and what is measured (`make bench`, scale section) is
//! Tidepool's own cost of listing, building a snapshot, staging and reading.
//!
//! Object `i` (0-based) is `<prefix>dir<i / per_dir, 5 digits>/f<i, 9 digits>.bin`, so
//! name order is index order, `per_dir` files to a directory; its size is
//! `min_size + (i * 7919) % spread`, its content [`pattern`](super::pattern)`(i, size)`.
//! Writes are refused: it is a dataset.

use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::lake::{
    BlockId, BlockList, ByteStream, ETag, Lake, LakeError, LakeResult, LeaseId, LevelPage,
    ListPage, ObjectMeta, Op, PutOptions,
};

#[derive(Clone, Debug)]
pub struct SyntheticLake {
    prefix: String,
    objects: u64,
    per_dir: u64,
    min_size: u64,
    spread: u64,
}

impl SyntheticLake {
    /// `objects` objects under `prefix` (ending in `/`), `per_dir` to a directory, sizes
    /// from `min_size` to `min_size + spread - 1`.
    pub fn new(prefix: &str, objects: u64, per_dir: u64, min_size: u64, spread: u64) -> Self {
        SyntheticLake {
            prefix: prefix.to_owned(),
            objects,
            per_dir: per_dir.max(1),
            min_size,
            spread: spread.max(1),
        }
    }

    /// The name of object `i`.
    pub fn name(&self, i: u64) -> String {
        format!("{}dir{:05}/f{i:09}.bin", self.prefix, i / self.per_dir)
    }

    /// The size of object `i`.
    pub fn size(&self, i: u64) -> u64 {
        self.min_size + i.wrapping_mul(7919) % self.spread
    }

    /// Total bytes of every object.
    pub fn total_bytes(&self) -> u64 {
        (0..self.objects).map(|i| self.size(i)).sum()
    }

    /// The indexes of the objects whose names start with `prefix` (any prefix: name
    /// order is index order, so they are one range, found by binary search).
    fn range_of(&self, prefix: &str) -> Option<Range<u64>> {
        let first = |pred: &dyn Fn(&str) -> bool| {
            let (mut lo, mut hi) = (0, self.objects);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if pred(&self.name(mid)) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        let start = first(&|n| n < prefix);
        let end = first(&|n| n < prefix || n.starts_with(prefix));
        (start < end).then_some(start..end)
    }

    fn marker(&self, prefix: &str, m: &str) -> LakeResult<u64> {
        m.parse().map_err(|_| LakeError::Other {
            op: Op::List,
            name: prefix.into(),
            status: 400,
            detail: format!("bad marker {m}"),
        })
    }

    fn index_of(&self, name: &str) -> Option<u64> {
        let rest = name.strip_prefix(&self.prefix)?;
        let (dir, file) = rest.split_once("/f")?;
        let i: u64 = file.strip_suffix(".bin")?.parse().ok()?;
        (i < self.objects && dir == format!("dir{:05}", i / self.per_dir)).then_some(i)
    }

    fn meta(&self, i: u64) -> ObjectMeta {
        ObjectMeta {
            name: self.name(i),
            size: self.size(i),
            etag: ETag(format!("\"0x{i:x}\"")),
            last_modified: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            content_md5: None,
        }
    }

    fn refused(op: Op, name: &str) -> LakeError {
        LakeError::Other {
            op,
            name: name.into(),
            status: 403,
            detail: "the synthetic lake is read-only".into(),
        }
    }
}

#[async_trait]
impl Lake for SyntheticLake {
    fn describe(&self) -> String {
        format!("synthetic://{} objects", self.objects)
    }

    async fn list_page(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<ListPage> {
        let Some(range) = self.range_of(prefix) else {
            return Ok(ListPage::default());
        };
        // The marker is the index of the next object.
        let start = match marker {
            Some(m) => self.marker(prefix, m)?,
            None => range.start,
        };
        let end = (start + u64::from(max.max(1))).min(range.end);
        Ok(ListPage {
            objects: (start..end).map(|i| self.meta(i)).collect(),
            next: (end < range.end).then(|| end.to_string()),
        })
    }

    /// The top level holds one prefix per directory (the marker is a directory
    /// number); a directory's level holds its files. (A prefix ending inside a
    /// directory's name is listed flat, which is not a level listing: not needed here.)
    async fn list_level(
        &self,
        prefix: &str,
        marker: Option<&str>,
        max: u32,
    ) -> LakeResult<LevelPage> {
        if prefix.len() < self.prefix.len() {
            // Above our prefix: one prefix, the next segment of ours.
            let p = match self.prefix.strip_prefix(prefix) {
                Some(rest) if marker.is_none() && self.objects > 0 => {
                    vec![format!("{prefix}{}/", rest.split('/').next().unwrap_or(""))]
                }
                _ => vec![],
            };
            return Ok(LevelPage {
                prefixes: p,
                ..Default::default()
            });
        }
        if prefix != self.prefix {
            let page = self.list_page(prefix, marker, max).await?;
            return Ok(LevelPage {
                objects: page.objects,
                prefixes: vec![],
                next: page.next,
            });
        }
        let dirs = self.objects.div_ceil(self.per_dir);
        let start = match marker {
            Some(m) => self.marker(prefix, m)?,
            None => 0,
        };
        let end = (start + u64::from(max.max(1))).min(dirs);
        Ok(LevelPage {
            objects: vec![],
            prefixes: (start..end)
                .map(|d| format!("{}dir{d:05}/", self.prefix))
                .collect(),
            next: (end < dirs).then(|| end.to_string()),
        })
    }

    async fn head(&self, name: &str) -> LakeResult<ObjectMeta> {
        self.index_of(name)
            .map(|i| self.meta(i))
            .ok_or_else(|| LakeError::NotFound { name: name.into() })
    }

    async fn get_stream(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &ETag,
    ) -> LakeResult<ByteStream> {
        let i = self
            .index_of(name)
            .ok_or_else(|| LakeError::NotFound { name: name.into() })?;
        let meta = self.meta(i);
        if &meta.etag != etag {
            return Err(LakeError::Changed {
                name: name.into(),
                expected: etag.clone(),
            });
        }
        let data = super::pattern(i, meta.size as usize);
        let start = range.start.min(meta.size) as usize;
        let end = (range.end.min(meta.size) as usize).max(start);
        let body = Bytes::from(data).slice(start..end);
        Ok(futures::stream::iter([Ok(body)]).boxed())
    }

    async fn put(&self, name: &str, _data: Bytes, _opts: &PutOptions) -> LakeResult<ETag> {
        Err(Self::refused(Op::Put, name))
    }

    async fn put_block(
        &self,
        name: &str,
        _id: &BlockId,
        _data: Bytes,
        _md5: Option<[u8; 16]>,
    ) -> LakeResult<()> {
        Err(Self::refused(Op::PutBlock, name))
    }

    async fn put_block_list(
        &self,
        name: &str,
        _ids: &[BlockId],
        _content_md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag> {
        Err(Self::refused(Op::PutBlockList, name))
    }

    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList> {
        Err(Self::refused(Op::BlockList, name))
    }

    async fn delete(&self, name: &str) -> LakeResult<()> {
        Err(Self::refused(Op::Delete, name))
    }

    async fn acquire_lease(
        &self,
        name: &str,
        _secs: Option<u32>,
        _proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        Err(Self::refused(Op::Lease, name))
    }

    async fn renew_lease(&self, name: &str, _lease: &LeaseId) -> LakeResult<()> {
        Err(Self::refused(Op::Lease, name))
    }

    async fn release_lease(&self, name: &str, _lease: &LeaseId) -> LakeResult<()> {
        Err(Self::refused(Op::Lease, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::Lister;

    #[tokio::test]
    async fn lists_in_name_order_in_pages_and_serves_the_content_of_each_name() {
        let lake = SyntheticLake::new("d/", 2_503, 100, 10, 50);
        let mut l = Lister::new(&lake, "d/").page_size(1000);
        let mut names = Vec::new();
        let mut pages = 0;
        while let Some(page) = l.next_page().await.unwrap() {
            pages += 1;
            names.extend(page.into_iter().map(|o| (o.name, o.size)));
        }
        assert_eq!(pages, 3);
        assert_eq!(names.len(), 2_503);
        assert!(names.windows(2).all(|w| w[0].0 < w[1].0), "name order");
        assert_eq!(names[0].0, "d/dir00000/f000000000.bin");
        assert_eq!(names[2_502].0, "d/dir00025/f000002502.bin");
        let total: u64 = names.iter().map(|n| n.1).sum();
        assert_eq!(total, lake.total_bytes());
        let m = lake.head("d/dir00001/f000000123.bin").await.unwrap();
        let body = lake.get_range(&m.name, 0..m.size, &m.etag).await.unwrap();
        assert_eq!(
            &body[..],
            &crate::testing::pattern(123, m.size as usize)[..]
        );
        assert!(matches!(
            lake.head("d/dir00002/f000000123.bin").await,
            Err(LakeError::NotFound { .. })
        ));
        assert!(
            lake.put("d/x", Bytes::new(), &Default::default())
                .await
                .is_err()
        );
    }
}
