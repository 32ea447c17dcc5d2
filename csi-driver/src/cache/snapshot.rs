//! Snapshots: immutable, on-disk listings of a dataset taken at one time.
//!
//! A snapshot is built by streaming the lake's listing page by page, in name order,
//! into its own redb file (`v1/datasets/<dataset>/snapshots/<seq>.redb`), so a listing
//! of ten million objects never sits whole in memory: memory is the pages of the
//! listing in flight (its directories are listed many at once, see
//! [`ParallelLister`]), the directory stack and redb's bounded page cache.
//!
//! The flat namespace becomes a tree: `a/b/c.bin` creates directories `a` and `a/b`.
//! The listing is in name order, so every directory's subtree is contiguous, and a stack
//! of open directories is all the state the builder needs. Names the tree cannot hold
//! are skipped with a warning and counted: empty path segments (`a//b`), `.` and `..`,
//! directory markers (`dir/`, zero-length, as ADLS and some tools write them, which
//! just create the directory) and a file shadowed by a directory of the same name
//! (`a` and `a/b`: the directory wins, as in every other object-store file system).
//!
//! Inodes: each entry gets a local number in listing order (root = 1); the file system
//! makes them globally unique by adding the snapshot's sequence number in the high bits,
//! so inode numbers are derived from persistent state and survive an agent restart.
//!
//! Tables:
//! - `entries`: local ino → encoded [`Entry`];
//! - `children`: (parent ino, position) → child ino, the directory's order for readdir
//!   (the position is the readdir cookie);
//! - `lookup`: (parent ino, name) → child ino;
//! - `meta`: summary (objects, bytes, skipped, complete flag).
//!
//! A snapshot file is written once and then only read; it is visible to the pool only
//! after its `complete` flag is committed durably, so a crash mid-listing leaves a file
//! that the next start deletes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::lake::parallel::{ListOptions, ParallelLister};
use crate::lake::{ETag, Lake, LakeError, ObjectMeta};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const CHILDREN: TableDefinition<(u64, u64), u64> = TableDefinition::new("children");
const LOOKUP: TableDefinition<(u64, &str), u64> = TableDefinition::new("lookup");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Local inode of the snapshot's root directory.
pub const ROOT: u64 = 1;

/// Objects written per redb transaction while building: big enough to amortise commits,
/// small enough that redb's dirty pages stay a few tens of MiB.
const BATCH: usize = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// One file or directory of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub parent: u64,
    pub kind: Kind,
    pub name: String,
    /// Full blob name in the container (files only; empty for directories).
    pub blob: String,
    pub size: u64,
    pub etag: ETag,
    pub mtime: SystemTime,
    pub md5: Option<[u8; 16]>,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.name.len() + self.blob.len() + self.etag.0.len());
        v.push(match self.kind {
            Kind::File => 0,
            Kind::Dir => 1,
        });
        v.extend_from_slice(&self.parent.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        let d = self.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
        v.extend_from_slice(&d.as_secs().to_le_bytes());
        v.extend_from_slice(&d.subsec_nanos().to_le_bytes());
        match self.md5 {
            Some(m) => {
                v.push(1);
                v.extend_from_slice(&m);
            }
            None => v.push(0),
        }
        for s in [&self.name, &self.blob, &self.etag.0] {
            v.extend_from_slice(&(s.len() as u32).to_le_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        v
    }

    fn decode(ino: u64, b: &[u8]) -> Option<Entry> {
        let mut r = Reader(b);
        let kind = if r.u8()? == 0 { Kind::File } else { Kind::Dir };
        let parent = r.u64()?;
        let size = r.u64()?;
        let secs = r.u64()?;
        let nanos = r.u32()?;
        let md5 = if r.u8()? == 1 {
            Some(r.take(16)?.try_into().ok()?)
        } else {
            None
        };
        let name = r.str()?;
        let blob = r.str()?;
        let etag = ETag(r.str()?);
        Some(Entry {
            ino,
            parent,
            kind,
            name,
            blob,
            size,
            etag,
            mtime: UNIX_EPOCH + Duration::new(secs, nanos),
            md5,
        })
    }
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// Totals of a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub objects: u64,
    pub bytes: u64,
    pub dirs: u64,
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("snapshot store {path}: {cause}")]
    Store {
        path: PathBuf,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("snapshot {path} is incomplete (a crash during listing?); it will be rebuilt")]
    Incomplete { path: PathBuf },
}

fn store_err(path: &Path) -> impl Fn(redb::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Store {
        path: path.to_owned(),
        cause: Box::new(e),
    }
}

/// Runs redb work on a blocking thread.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
) -> Result<T, SnapshotError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(store_err(path)),
        Err(e) => Err(SnapshotError::Store {
            path: path.to_owned(),
            cause: Box::new(e),
        }),
    }
}

/// A read-only, complete snapshot.
#[derive(Debug)]
pub struct Snapshot {
    db: Database,
    path: PathBuf,
    summary: Summary,
    /// A digest of the listing (names, sizes, ETags): equal digests, equal snapshots.
    digest: u64,
}

impl Snapshot {
    /// Lists `prefix` of `lake` into a new snapshot file at `path`, calling `progress`
    /// with the running count of objects after every page. The listing is taken by
    /// many requests at once ([`ListOptions::default`]).
    pub async fn build(
        lake: &dyn Lake,
        prefix: &str,
        path: &Path,
        progress: impl FnMut(u64),
    ) -> Result<Snapshot, SnapshotError> {
        Self::build_with(lake, prefix, path, ListOptions::default(), progress).await
    }

    /// [`Snapshot::build`] with the listing split as `opts` says. The snapshot is the
    /// same for any `opts` (the listing comes in name order either way).
    pub async fn build_with(
        lake: &dyn Lake,
        prefix: &str,
        path: &Path,
        opts: ListOptions,
        mut progress: impl FnMut(u64),
    ) -> Result<Snapshot, SnapshotError> {
        let owned = path.to_owned();
        // redb's file creation and commits (tens of MiB written and synced per batch)
        // run on blocking threads, never on the runtime that serves reads.
        let db = blocking(path, move || {
            let _ = std::fs::remove_file(&owned);
            Database::builder()
                .set_cache_size(32 << 20)
                .create(&owned)
                .map_err(redb::Error::from)
        })
        .await?;
        let mut state = (Builder::new(prefix), db);
        let mut lister = ParallelLister::new(lake, prefix, opts);
        while let Some(page) = lister.next_page().await? {
            for obj in page {
                state.0.add(obj);
            }
            if state.0.pending.len() >= BATCH {
                state = blocking(path, move || {
                    let (mut b, db) = state;
                    b.flush(&db, false)?;
                    Ok((b, db))
                })
                .await?;
            }
            progress(state.0.summary.objects);
        }
        let (b, db) = blocking(path, move || {
            let (mut b, db) = state;
            b.finish(&db)?;
            Ok((b, db))
        })
        .await?;
        Ok(Snapshot {
            db,
            path: path.to_owned(),
            summary: b.summary,
            digest: b.digest,
        })
    }

    /// Opens a complete snapshot written earlier.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        let err = store_err(path);
        let db = Database::builder()
            .set_cache_size(32 << 20)
            .open(path)
            .map_err(|e| err(e.into()))?;
        let (summary, digest, complete) = {
            let tx = db.begin_read().map_err(|e| err(e.into()))?;
            let meta = tx.open_table(META).map_err(|e| err(e.into()))?;
            let get = |k: &str| meta.get(k).ok().flatten().map(|v| v.value()).unwrap_or(0);
            (
                Summary {
                    objects: get("objects"),
                    bytes: get("bytes"),
                    dirs: get("dirs"),
                    skipped: get("skipped"),
                },
                get("digest"),
                get("complete") == 1,
            )
        };
        if !complete {
            return Err(SnapshotError::Incomplete {
                path: path.to_owned(),
            });
        }
        Ok(Snapshot {
            db,
            path: path.to_owned(),
            summary,
            digest,
        })
    }

    pub fn summary(&self) -> Summary {
        self.summary
    }

    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, ino: u64) -> Result<Option<Entry>, SnapshotError> {
        let err = store_err(&self.path);
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(ENTRIES).map_err(|e| err(e.into()))?;
        Ok(t.get(ino)
            .map_err(|e| err(e.into()))?
            .and_then(|v| Entry::decode(ino, v.value())))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Option<Entry>, SnapshotError> {
        let err = store_err(&self.path);
        let ino = {
            let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
            let t = tx.open_table(LOOKUP).map_err(|e| err(e.into()))?;
            t.get((parent, name))
                .map_err(|e| err(e.into()))?
                .map(|v| v.value())
        };
        match ino {
            Some(ino) => self.get(ino),
            None => Ok(None),
        }
    }

    /// Up to `max` children of `dir` from position `from` on, with their positions
    /// (a position + 1 is the cookie for the next call).
    pub fn children(
        &self,
        dir: u64,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Entry)>, SnapshotError> {
        let err = store_err(&self.path);
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let ch = tx.open_table(CHILDREN).map_err(|e| err(e.into()))?;
        let en = tx.open_table(ENTRIES).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in ch
            .range((dir, from)..(dir, u64::MAX))
            .map_err(|e| err(e.into()))?
        {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            let ino = v.value();
            if let Some(e) = en
                .get(ino)
                .map_err(|e| err(e.into()))?
                .and_then(|b| Entry::decode(ino, b.value()))
            {
                out.push((k.value().1, e));
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Every file in listing order, streamed in chunks of `chunk` (prefetch walks this).
    pub fn files_from(&self, after_ino: u64, chunk: usize) -> Result<Vec<Entry>, SnapshotError> {
        self.files_near(after_ino, true, chunk)
    }

    /// Files before `before_ino` in listing order, nearest first (up to `n`).
    pub fn files_before(&self, before_ino: u64, n: usize) -> Result<Vec<Entry>, SnapshotError> {
        self.files_near(before_ino, false, n)
    }

    /// Up to `n` files after (`forward`) or before `ino` in listing order, nearest first.
    fn files_near(&self, ino: u64, forward: bool, n: usize) -> Result<Vec<Entry>, SnapshotError> {
        let err = store_err(&self.path);
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let en = tx.open_table(ENTRIES).map_err(|e| err(e.into()))?;
        let items: Box<dyn Iterator<Item = _>> = if forward {
            Box::new(
                en.range(ino.saturating_add(1)..)
                    .map_err(|e| err(e.into()))?,
            )
        } else {
            Box::new(en.range(..ino).map_err(|e| err(e.into()))?.rev())
        };
        let mut out = Vec::new();
        for item in items {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            if let Some(e) = Entry::decode(k.value(), v.value()).filter(|e| e.kind == Kind::File) {
                out.push(e);
                if out.len() >= n {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Streaming tree builder.
struct Builder {
    prefix: String,
    next_ino: u64,
    /// Open directories from the root down: (path relative to prefix ending in '/', ino,
    /// number of children so far).
    stack: Vec<(String, u64, u64)>,
    pending: Vec<(Entry, u64)>,
    summary: Summary,
    digest: u64,
    /// Child counts of directories no longer on the stack are final; the root's and the
    /// stack's are written at flush time.
    shadowed: Vec<(u64, String)>,
}

impl Builder {
    fn new(prefix: &str) -> Self {
        Builder {
            prefix: prefix.to_owned(),
            next_ino: ROOT + 1,
            stack: vec![(String::new(), ROOT, 0)],
            pending: Vec::new(),
            summary: Summary::default(),
            digest: 0xcbf2_9ce4_8422_2325,
            shadowed: Vec::new(),
        }
    }

    fn mix(&mut self, bytes: &[u8]) {
        // FNV-1a: a cheap, stable digest to detect "nothing changed" on refresh.
        for b in bytes {
            self.digest ^= *b as u64;
            self.digest = self.digest.wrapping_mul(0x100_0000_01b3);
        }
    }

    fn add(&mut self, obj: ObjectMeta) {
        let Some(rel) = obj.name.strip_prefix(&self.prefix) else {
            return;
        };
        let rel = rel.to_owned();
        if rel.is_empty() {
            return;
        }
        let is_marker = rel.ends_with('/');
        let trimmed = rel.trim_end_matches('/');
        let parts: Vec<&str> = trimmed.split('/').collect();
        if trimmed.is_empty()
            || parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == "..")
            || (is_marker && obj.size > 0)
        {
            tracing::warn!(blob = %obj.name, "skipping a blob whose name cannot be a path in the mount");
            self.summary.skipped += 1;
            return;
        }
        self.mix(obj.name.as_bytes());
        self.mix(&obj.size.to_le_bytes());
        self.mix(obj.etag.0.as_bytes());
        let dirs = if is_marker {
            &parts[..]
        } else {
            &parts[..parts.len() - 1]
        };
        // Pop directories that are not ancestors of this name.
        let mut depth = 0;
        while depth + 1 < self.stack.len() && depth < dirs.len() {
            let want = format!("{}/", dirs[..=depth].join("/"));
            if self.stack[depth + 1].0 != want {
                break;
            }
            depth += 1;
        }
        self.stack.truncate(depth + 1);
        for i in depth..dirs.len() {
            let path = format!("{}/", dirs[..=i].join("/"));
            let parent = self.stack.last().unwrap().1;
            let ino = self.alloc();
            let e = Entry {
                ino,
                parent,
                kind: Kind::Dir,
                name: dirs[i].to_owned(),
                blob: String::new(),
                size: 0,
                etag: ETag(String::new()),
                mtime: obj.last_modified,
                md5: None,
            };
            let pos = self.child_pos();
            self.pending.push((e, pos));
            self.summary.dirs += 1;
            self.stack.push((path, ino, 0));
        }
        if is_marker {
            return;
        }
        let parent = self.stack.last().unwrap().1;
        let ino = self.alloc();
        let e = Entry {
            ino,
            parent,
            kind: Kind::File,
            name: parts[parts.len() - 1].to_owned(),
            blob: obj.name.clone(),
            size: obj.size,
            etag: obj.etag,
            mtime: obj.last_modified,
            md5: obj.content_md5,
        };
        let pos = self.child_pos();
        self.pending.push((e, pos));
        self.summary.objects += 1;
        self.summary.bytes += obj.size;
    }

    fn alloc(&mut self) -> u64 {
        let i = self.next_ino;
        self.next_ino += 1;
        i
    }

    fn child_pos(&mut self) -> u64 {
        let top = self.stack.last_mut().unwrap();
        let p = top.2;
        top.2 += 1;
        p
    }

    fn flush(&mut self, db: &Database, last: bool) -> Result<(), redb::Error> {
        let mut tx = db.begin_write()?;
        tx.set_durability(if last {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        {
            let mut en = tx.open_table(ENTRIES)?;
            let mut ch = tx.open_table(CHILDREN)?;
            let mut lk = tx.open_table(LOOKUP)?;
            for (e, pos) in self.pending.drain(..) {
                if let Some(existing) = lk.get((e.parent, e.name.as_str()))?.map(|v| v.value()) {
                    // Same name twice in one directory: only a file then a directory of
                    // that name can do this (the listing has unique names). The
                    // directory wins; the file stays in `entries` but is unreachable.
                    self.shadowed.push((existing, e.name.clone()));
                }
                en.insert(e.ino, e.encode().as_slice())?;
                ch.insert((e.parent, pos), e.ino)?;
                lk.insert((e.parent, e.name.as_str()), e.ino)?;
            }
            if last {
                let root = Entry {
                    ino: ROOT,
                    parent: ROOT,
                    kind: Kind::Dir,
                    name: String::new(),
                    blob: String::new(),
                    size: 0,
                    etag: ETag(String::new()),
                    mtime: SystemTime::now(),
                    md5: None,
                };
                en.insert(ROOT, root.encode().as_slice())?;
                // Hide shadowed files from readdir too.
                for (ino, name) in self.shadowed.drain(..) {
                    tracing::warn!(
                        name,
                        "a file and a directory share a name; the directory is shown"
                    );
                    let parent = en
                        .get(ino)?
                        .and_then(|v| Entry::decode(ino, v.value()))
                        .map(|e| e.parent);
                    if let Some(parent) = parent {
                        let pos = ch
                            .range((parent, 0)..(parent, u64::MAX))?
                            .filter_map(|r| r.ok())
                            .find(|(_, v)| v.value() == ino)
                            .map(|(k, _)| k.value().1);
                        if let Some(pos) = pos {
                            ch.remove((parent, pos))?;
                        }
                    }
                    self.summary.objects -= 1;
                    self.summary.skipped += 1;
                    if let Some(e) = en.get(ino)?.and_then(|v| Entry::decode(ino, v.value())) {
                        self.summary.bytes -= e.size;
                    }
                }
                let mut meta = tx.open_table(META)?;
                meta.insert("objects", self.summary.objects)?;
                meta.insert("bytes", self.summary.bytes)?;
                meta.insert("dirs", self.summary.dirs)?;
                meta.insert("skipped", self.summary.skipped)?;
                meta.insert("digest", self.digest)?;
                meta.insert("complete", 1)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn finish(&mut self, db: &Database) -> Result<(), redb::Error> {
        self.flush(db, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::memory::MemoryLake;

    async fn build(names: &[&str]) -> (tempfile::TempDir, Snapshot) {
        let lake = MemoryLake::new();
        for n in names {
            // Directory markers are zero-length, as ADLS and tools write them.
            let body = if n.ends_with('/') {
                Vec::new()
            } else {
                n.as_bytes().to_vec()
            };
            lake.insert(n, body);
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshot::build(&lake, "ds/", &dir.path().join("s.redb"), |_| {})
            .await
            .unwrap();
        (dir, s)
    }

    fn names(s: &Snapshot, dir: u64) -> Vec<String> {
        s.children(dir, 0, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.name)
            .collect()
    }

    #[tokio::test]
    async fn flat_listing_becomes_a_tree() {
        let (_d, s) = build(&[
            "ds/a/b/c.bin",
            "ds/a/b-c",
            "ds/a/b/d.bin",
            "ds/top.txt",
            "other/x",
        ])
        .await;
        assert_eq!(s.summary().objects, 4);
        assert_eq!(s.summary().dirs, 2);
        let mut root = names(&s, ROOT);
        root.sort();
        assert_eq!(root, ["a", "top.txt"]);
        let a = s.lookup(ROOT, "a").unwrap().unwrap();
        assert_eq!(a.kind, Kind::Dir);
        let mut in_a = names(&s, a.ino);
        in_a.sort();
        assert_eq!(in_a, ["b", "b-c"]);
        let b = s.lookup(a.ino, "b").unwrap().unwrap();
        assert_eq!(names(&s, b.ino), ["c.bin", "d.bin"]);
        let c = s.lookup(b.ino, "c.bin").unwrap().unwrap();
        assert_eq!(c.blob, "ds/a/b/c.bin");
        assert_eq!(c.size, "ds/a/b/c.bin".len() as u64);
        assert_eq!(s.get(c.ino).unwrap().unwrap(), c);
    }

    #[tokio::test]
    async fn the_snapshot_is_the_same_however_the_listing_is_split() {
        let lake = MemoryLake::new();
        for n in [
            "ds/x",
            "ds/x/y",
            "ds/x.y",
            "ds/x0",
            "ds/bad//name",
            "ds/marker/",
            "ds/m/a/b/c",
        ] {
            lake.insert(n, n.as_bytes().to_vec());
        }
        for i in 0..3000 {
            lake.insert(&format!("ds/d{}/e{}/f{i:05}", i % 7, i % 3), vec![1; i % 5]);
        }
        let dir = tempfile::tempdir().unwrap();
        let build = |name: &str, opts: ListOptions| {
            let path = dir.path().join(name);
            let lake = &lake;
            async move {
                Snapshot::build_with(lake, "ds/", &path, opts, |_| {})
                    .await
                    .unwrap()
            }
        };
        let flat = build("flat.redb", ListOptions::sequential()).await;
        let split = build("split.redb", ListOptions::default()).await;
        let small = ListOptions {
            parallelism: 3,
            split_depth: 3,
            page_size: 7,
        };
        let small = build("small.redb", small).await;
        assert_eq!(flat.summary().objects, 3004);
        for s in [&split, &small] {
            assert_eq!(s.summary(), flat.summary());
            assert_eq!(s.digest(), flat.digest());
            for ino in ROOT..=flat.summary().objects + flat.summary().dirs + 1 {
                // Directories carry the time of the build.
                let undated = |e: Option<Entry>| {
                    e.map(|e| match e.kind {
                        Kind::Dir => Entry {
                            mtime: UNIX_EPOCH,
                            ..e
                        },
                        Kind::File => e,
                    })
                };
                let (got, want) = (s.get(ino).unwrap(), flat.get(ino).unwrap());
                assert_eq!(undated(got), undated(want), "inode {ino}");
            }
        }
    }

    #[tokio::test]
    async fn unrepresentable_names_are_skipped_and_directory_shadows_file() {
        let (_d, s) = build(&["ds/x", "ds/x/y", "ds/bad//name", "ds/dot/./f", "ds/marker/"]).await;
        assert_eq!(names(&s, ROOT).len(), 2, "{:?}", names(&s, ROOT)); // x (dir), marker (dir)
        let x = s.lookup(ROOT, "x").unwrap().unwrap();
        assert_eq!(x.kind, Kind::Dir);
        assert_eq!(names(&s, x.ino), ["y"]);
        assert!(s.lookup(ROOT, "marker").unwrap().unwrap().kind == Kind::Dir);
        assert_eq!(s.summary().objects, 1);
        assert_eq!(s.summary().skipped, 3);
    }

    #[tokio::test]
    async fn reopened_snapshot_is_identical_and_paging_readdir_resumes() {
        let names_in: Vec<String> = (0..2500).map(|i| format!("ds/d/f{i:05}")).collect();
        let refs: Vec<&str> = names_in.iter().map(|s| s.as_str()).collect();
        let (dir, s) = build(&refs).await;
        let digest = s.digest();
        drop(s);
        let s = Snapshot::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(s.digest(), digest);
        let d = s.lookup(ROOT, "d").unwrap().unwrap();
        let mut seen = vec![];
        let mut from = 0;
        loop {
            let page = s.children(d.ino, from, 1000).unwrap();
            if page.is_empty() {
                break;
            }
            from = page.last().unwrap().0 + 1;
            seen.extend(page.into_iter().map(|(_, e)| e.name));
        }
        assert_eq!(seen.len(), 2500);
        assert_eq!(seen[1234], "f01234");
    }
}
