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
//! A snapshot is served while it is being listed ([`Snapshot::start`]): the listing
//! comes in name order, so what is committed is a prefix of the whole, and an answer is
//! given only once it is final (see [`Snapshot::lookup_now`]) and durable. The builder's
//! state is committed with the entries, so a listing stopped by a crash is taken up
//! where its last durable commit left it ([`Snapshot::resume`]) and the numbers it gave
//! keep their meaning. Once complete, a snapshot file is only read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use crate::lake::parallel::{ListOptions, ParallelLister};
use crate::lake::{ETag, Lake, LakeError, ObjectMeta};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const CHILDREN: TableDefinition<(u64, u64), u64> = TableDefinition::new("children");
const LOOKUP: TableDefinition<(u64, &str), u64> = TableDefinition::new("lookup");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

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
    #[error("listing the dataset failed: {0}")]
    Listing(String),
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

/// How far the listing behind a snapshot has come.
#[derive(Clone, Debug, Default)]
pub struct Listed {
    /// Totals of what is in the snapshot so far (final once `complete`).
    pub summary: Summary,
    /// The last name listed and durably committed (relative to the prefix): every name
    /// up to it is in the snapshot for good. Entries after it may be committed too
    /// (unsynced); they are not served until a durable commit passes them.
    pub upto: String,
    /// The listing reached its end: the snapshot is whole and never changes again.
    pub complete: bool,
    /// A digest of the listing (names, sizes, ETags), once complete.
    pub digest: u64,
    /// The listing's last attempt failed with this (it is retried); cleared by progress.
    pub error: Option<String>,
    /// The listing cannot go on (see `error`): the snapshot stays as it is.
    pub stopped: bool,
}

impl Listed {
    /// Something is committed (or the listing is complete, if empty).
    pub fn started(&self) -> bool {
        self.complete || !self.upto.is_empty()
    }
}

/// A snapshot, complete or still being listed. A snapshot being listed answers for
/// every name the listing has passed (see [`Snapshot::lookup_now`] and
/// [`Snapshot::children`]): listing in name order makes what it has a prefix of the
/// whole, so an answer given early is the answer the complete snapshot gives.
#[derive(Debug)]
pub struct Snapshot {
    db: Arc<Database>,
    path: PathBuf,
    listed: Arc<watch::Sender<Listed>>,
    /// The task listing into this snapshot, stopped when the snapshot is dropped.
    builder: Option<tokio::task::AbortHandle>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(b) = &self.builder {
            b.abort();
        }
    }
}

/// Waits on a snapshot's listing (see [`Snapshot::watch`]); ends with an error when
/// the snapshot is closed.
pub struct ListingWatch(watch::Receiver<Listed>);

impl ListingWatch {
    /// See [`Snapshot::wait_past`].
    pub async fn wait_past(mut self, name: &str) -> Result<(), SnapshotError> {
        loop {
            {
                let l = self.0.borrow_and_update();
                if l.complete || l.upto.as_str() >= name {
                    return Ok(());
                }
                if let Some(e) = &l.error {
                    return Err(SnapshotError::Listing(e.clone()));
                }
            }
            if self.0.changed().await.is_err() {
                return Err(SnapshotError::Listing("the snapshot was closed".into()));
            }
        }
    }
}

/// Marks the listing stopped when its task ends without completing (aborted with its
/// snapshot, or a panic), so that nothing waits on it forever.
struct StopGuard(Arc<watch::Sender<Listed>>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.send_if_modified(|l| {
            if l.complete || l.stopped {
                return false;
            }
            l.stopped = true;
            l.error.get_or_insert_with(|| "the listing stopped".into());
            true
        });
    }
}

/// What a lookup in a snapshot still being listed can say now.
#[derive(Debug)]
pub enum Lookup {
    Found(Entry),
    Missing,
    /// Not known until the listing passes this name (relative to the prefix).
    Wait(String),
}

/// What is listed is committed durably, and served, this often while listing (and at
/// the first page): how far a snapshot being listed may lag its listing. Each is a sync
/// of the snapshot file; commits every [`BATCH`] objects in between are not synced.
const COMMIT_EVERY: Duration = Duration::from_millis(500);

/// A listing that failed is tried again after this, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

impl Snapshot {
    /// Lists `prefix` of `lake` into a new snapshot file at `path`, calling `progress`
    /// with the running count of objects as it goes, and returns it complete. The
    /// listing is taken by many requests at once ([`ListOptions::default`]).
    pub async fn build(
        lake: &dyn Lake,
        prefix: &str,
        path: &Path,
        progress: impl FnMut(u64) + Send,
    ) -> Result<Snapshot, SnapshotError> {
        Self::build_with(lake, prefix, path, ListOptions::default(), progress).await
    }

    /// [`Snapshot::build`] with the listing split as `opts` says. The snapshot is the
    /// same for any `opts` (the listing comes in name order either way). A failed
    /// listing is an error (not retried).
    pub async fn build_with(
        lake: &dyn Lake,
        prefix: &str,
        path: &Path,
        opts: ListOptions,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<Snapshot, SnapshotError> {
        let (db, b) = Self::create(path).await?;
        let listed = Arc::new(watch::Sender::new(Listed::default()));
        let mut b = b.with_prefix(prefix);
        let mut report = |l: &Listed| progress(l.summary.objects);
        list_into(lake, path, &db, opts, &listed, &mut b, &mut report).await?;
        Ok(Snapshot {
            db,
            path: path.to_owned(),
            listed,
            builder: None,
        })
    }

    /// Starts listing `prefix` of `lake` into a new snapshot file at `path` and returns
    /// the snapshot once its first page is committed, to serve while the listing goes
    /// on in the background (retried after failures, resumed where it stopped). A lake
    /// that cannot be listed at all (credentials refused, no such container) is an
    /// error here, not at the first lookup. Needs a tokio runtime.
    pub async fn start(
        lake: Arc<dyn Lake>,
        prefix: &str,
        path: &Path,
        opts: ListOptions,
    ) -> Result<Snapshot, SnapshotError> {
        let (db, b) = Self::create(path).await?;
        let (first_error, failed) = tokio::sync::oneshot::channel();
        let snap = Self::spawn(
            lake,
            path,
            db,
            b.with_prefix(prefix),
            opts,
            Some(first_error),
        );
        let mut rx = snap.listed.subscribe();
        let started = async {
            while !rx.borrow_and_update().started() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            e = failed => {
                // A dropped sender: the listing ended without an error.
                if let Ok(e) = e {
                    return Err(e);
                }
            }
            _ = started => {}
        }
        Ok(snap)
    }

    /// Takes up the listing of a snapshot that was being listed when its process
    /// stopped, after the last name it committed: the entries it has keep their
    /// numbers, so inodes the kernel holds from before still mean the same files.
    /// A complete snapshot is opened as it is.
    pub async fn resume(
        lake: Arc<dyn Lake>,
        prefix: &str,
        path: &Path,
        opts: ListOptions,
    ) -> Result<Snapshot, SnapshotError> {
        let owned = path.to_owned();
        let (db, state) = blocking(path, move || {
            // A builder of this file stopped in this process may still be finishing a
            // commit on a blocking thread: its handle closes within moments.
            let mut tries = 0;
            let db = loop {
                match Database::builder().set_cache_size(32 << 20).open(&owned) {
                    Err(redb::DatabaseError::DatabaseAlreadyOpen) if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    r => break r.map_err(redb::Error::from)?,
                }
            };
            let state = Builder::load(&db)?;
            Ok((Arc::new(db), state))
        })
        .await?;
        match state {
            Some(b) if b.prefix == prefix => {
                tracing::info!(snapshot = %path.display(), objects = b.summary.objects, after = %b.upto, "resuming a listing that stopped part way");
                Ok(Self::spawn(lake, path, db, b, opts, None))
            }
            // Complete (or written by an older version): served as it is, from the
            // database just opened, off the runtime.
            Some(_) | None => {
                let owned = path.to_owned();
                tokio::task::spawn_blocking(move || Self::complete_from(db, &owned))
                    .await
                    .map_err(|e| SnapshotError::Store {
                        path: path.to_owned(),
                        cause: Box::new(e),
                    })?
            }
        }
    }

    /// Creates the file with its root directory and the builder's starting state,
    /// committed durably.
    async fn create(path: &Path) -> Result<(Arc<Database>, Builder), SnapshotError> {
        let owned = path.to_owned();
        // redb's file creation and commits (tens of MiB written and synced per batch)
        // run on blocking threads, never on the runtime that serves reads.
        blocking(path, move || {
            let _ = std::fs::remove_file(&owned);
            let db = Database::builder()
                .set_cache_size(32 << 20)
                .create(&owned)
                .map_err(redb::Error::from)?;
            let mut b = Builder::new("");
            b.flush(&db, Durable::Yes)?;
            Ok((Arc::new(db), b))
        })
        .await
    }

    fn spawn(
        lake: Arc<dyn Lake>,
        path: &Path,
        db: Arc<Database>,
        mut b: Builder,
        opts: ListOptions,
        mut first_error: Option<tokio::sync::oneshot::Sender<SnapshotError>>,
    ) -> Snapshot {
        let listed = Arc::new(watch::Sender::new(b.listed(false)));
        let task = {
            let (path, db, listed) = (path.to_owned(), db.clone(), listed.clone());
            tokio::spawn(async move {
                let _stopped = StopGuard(listed.clone());
                let mut wait = RETRY_FIRST;
                loop {
                    let upto_before = listed.borrow().upto.clone();
                    let r = list_into(
                        lake.as_ref(),
                        &path,
                        &db,
                        opts,
                        &listed,
                        &mut b,
                        &mut |_| {},
                    )
                    .await;
                    let Err(e) = r else {
                        let l = listed.borrow().clone();
                        tracing::info!(snapshot = %path.display(), objects = l.summary.objects, bytes = l.summary.bytes, "listing complete");
                        return;
                    };
                    listed.send_modify(|l| l.error = Some(e.to_string()));
                    if !listed.borrow().started()
                        && let Some(tx) = first_error.take()
                    {
                        // Nothing served yet: whoever started the listing gets the error.
                        let _ = tx.send(e);
                        return;
                    }
                    if listed.borrow().upto != upto_before {
                        // It went on before failing: start the backoff again.
                        wait = RETRY_FIRST;
                    }
                    tracing::warn!(snapshot = %path.display(), error = %e, retry_in = ?wait, "listing failed; the part listed is served, names not listed yet fail with EIO until the retry lists again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                    // Start again from what is committed: the builder's memory may hold
                    // a batch that never was.
                    let (p, d) = (path.clone(), db.clone());
                    match blocking(&path, move || Builder::load(&d)).await {
                        Ok(Some(loaded)) => b = loaded,
                        other => {
                            let why = match other {
                                Err(e) => e.to_string(),
                                _ => format!("{} lost its listing state", p.display()),
                            };
                            tracing::error!(snapshot = %p.display(), error = %why, "cannot resume the listing");
                            listed.send_modify(|l| {
                                l.error = Some(why);
                                l.stopped = true;
                            });
                            return;
                        }
                    }
                }
            })
        };
        Snapshot {
            db,
            path: path.to_owned(),
            listed,
            builder: Some(task.abort_handle()),
        }
    }

    /// Opens a complete snapshot written earlier.
    pub fn open(path: &Path) -> Result<Snapshot, SnapshotError> {
        let db = Database::builder()
            .set_cache_size(32 << 20)
            .open(path)
            .map_err(|e| store_err(path)(e.into()))?;
        Self::complete_from(Arc::new(db), path)
    }

    /// The complete snapshot in the open database `db` (an error if it is not).
    fn complete_from(db: Arc<Database>, path: &Path) -> Result<Snapshot, SnapshotError> {
        let err = store_err(path);
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
            listed: Arc::new(watch::Sender::new(Listed {
                summary,
                upto: String::new(),
                complete: true,
                digest,
                error: None,
                stopped: false,
            })),
            builder: None,
        })
    }

    /// How far the listing has come.
    pub fn listed(&self) -> Listed {
        self.listed.borrow().clone()
    }

    pub fn complete(&self) -> bool {
        self.listed.borrow().complete
    }

    /// Waits until the listing has passed `name` (relative to the prefix), or is
    /// complete; an error if the listing's last attempt failed (it is retried) or it
    /// stopped.
    pub async fn wait_past(&self, name: &str) -> Result<(), SnapshotError> {
        self.watch().wait_past(name).await
    }

    /// A handle to wait on the listing that does not keep the snapshot open (a
    /// waiting request must not keep a snapshot nobody serves, nor its listing, alive).
    pub fn watch(&self) -> ListingWatch {
        ListingWatch(self.listed.subscribe())
    }

    /// Waits until the snapshot is complete, through the listing's retries; an error
    /// only if the listing cannot go on at all.
    pub async fn wait_complete(&self) -> Result<(), SnapshotError> {
        self.wait_complete_or(false).await
    }

    /// Waits until the snapshot is complete; an error as soon as an attempt of the
    /// listing fails (it is still retried).
    pub async fn wait_complete_or_error(&self) -> Result<(), SnapshotError> {
        self.wait_complete_or(true).await
    }

    async fn wait_complete_or(&self, fail_fast: bool) -> Result<(), SnapshotError> {
        let mut rx = self.listed.subscribe();
        loop {
            {
                let l = rx.borrow_and_update();
                if l.complete {
                    return Ok(());
                }
                if let Some(e) = l.error.as_ref().filter(|_| fail_fast || l.stopped) {
                    return Err(SnapshotError::Listing(e.clone()));
                }
            }
            if rx.changed().await.is_err() {
                return Err(SnapshotError::Listing("the listing stopped".into()));
            }
        }
    }

    /// The path of directory `dir` relative to the prefix, with a trailing `/` (empty
    /// for the root).
    fn dir_path(&self, dir: u64) -> Result<String, SnapshotError> {
        let mut parts = Vec::new();
        let mut ino = dir;
        while ino != ROOT {
            let e = self.get(ino)?.ok_or_else(|| SnapshotError::Store {
                path: self.path.clone(),
                cause: format!("directory {ino} is missing").into(),
            })?;
            parts.push(e.name);
            ino = e.parent;
            if parts.len() > 4096 {
                return Err(SnapshotError::Store {
                    path: self.path.clone(),
                    cause: "a directory loop".into(),
                });
            }
        }
        let mut p = String::new();
        for n in parts.iter().rev() {
            p.push_str(n);
            p.push('/');
        }
        Ok(p)
    }

    /// The name past which entry `name` (of `kind`, or absent) of the directory at
    /// `dir_path` is final and durable. Every name that makes or shadows a file or an
    /// absent name sorts before `name0`; a directory is made by names from `name/` on,
    /// which sort after any file of its name, so it is final once the durable listing
    /// reached it.
    fn final_after(dir_path: &str, name: &str, kind: Option<Kind>) -> String {
        match kind {
            Some(Kind::Dir) => format!("{dir_path}{name}/"),
            _ => format!("{dir_path}{name}0"),
        }
    }

    /// Whether `l` (taken before the read that found it) makes an answer about `name`
    /// at `dir_path` final.
    fn is_final(l: &Listed, dir_path: &str, name: &str, kind: Option<Kind>) -> bool {
        l.complete || l.upto >= Self::final_after(dir_path, name, kind)
    }

    /// A lookup answered only when its answer is final (see [`Snapshot::final_after`]).
    /// Answers are judged by how far the durable listing was before the read: what the
    /// read sees is at least that, and an entry found beyond it (an unsynced commit) is
    /// not served, so a restart that loses it never changes what was answered.
    pub fn lookup_now(&self, parent: u64, name: &str) -> Result<Lookup, SnapshotError> {
        let l = self.listed();
        let found = self.lookup(parent, name)?;
        if l.complete {
            return Ok(found.map_or(Lookup::Missing, Lookup::Found));
        }
        let path = self.dir_path(parent)?;
        let kind = found.as_ref().map(|e| e.kind);
        if !Self::is_final(&l, &path, name, kind) {
            return Ok(Lookup::Wait(Self::final_after(&path, name, kind)));
        }
        Ok(found.map_or(Lookup::Missing, Lookup::Found))
    }

    /// `None` if [`Snapshot::children`] of `dir` from `from` can answer now (with at
    /// least one entry, or the end of the directory); else the name the listing must
    /// pass first.
    pub fn children_wait(&self, dir: u64, from: u64) -> Result<Option<String>, SnapshotError> {
        let l = self.listed();
        if l.complete {
            return Ok(None);
        }
        let path = self.dir_path(dir)?;
        let next = self.children_all(dir, from, 1)?;
        let bound = match next.first() {
            Some((_, e)) => Self::final_after(&path, &e.name, Some(e.kind)),
            None if dir == ROOT => return Ok(Some(String::from(char::MAX))),
            // Every name in the directory sorts before `path` with its `/` made `0`.
            None => format!("{}0", &path[..path.len() - 1]),
        };
        Ok((l.upto < bound).then_some(bound))
    }

    /// Totals so far (final once complete).
    pub fn summary(&self) -> Summary {
        self.listed.borrow().summary
    }

    /// A digest of the listing (names, sizes, ETags): equal digests, equal snapshots.
    /// Zero until complete.
    pub fn digest(&self) -> u64 {
        self.listed.borrow().digest
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
    /// (a position + 1 is the cookie for the next call). While the listing goes on,
    /// only children whose entry is final (see [`Snapshot::lookup_now`]): it stops
    /// before the first that is not.
    pub fn children(
        &self,
        dir: u64,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Entry)>, SnapshotError> {
        let l = self.listed();
        let mut out = self.children_all(dir, from, max)?;
        if !l.complete {
            let path = self.dir_path(dir)?;
            let unsure = out
                .iter()
                .position(|(_, e)| !Self::is_final(&l, &path, &e.name, Some(e.kind)));
            if let Some(i) = unsure {
                out.truncate(i);
            }
        }
        Ok(out)
    }

    /// [`Snapshot::children`] as committed, final or not.
    fn children_all(
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

/// Lists into `b` and commits to `db` as it goes, publishing progress to `listed`.
async fn list_into(
    lake: &dyn Lake,
    path: &Path,
    db: &Arc<Database>,
    opts: ListOptions,
    listed: &watch::Sender<Listed>,
    b: &mut Builder,
    report: &mut (dyn FnMut(&Listed) + Send),
) -> Result<(), SnapshotError> {
    let resumed_after = (!b.upto.is_empty()).then(|| format!("{}{}", b.prefix, b.upto));
    let mut lister = ParallelLister::new(lake, &b.prefix.clone(), opts);
    if let Some(after) = &resumed_after {
        lister = lister.after(after);
    }
    let mut committed = Instant::now();
    let mut advanced = false;
    loop {
        // What is listed is committed within COMMIT_EVERY, even while the next page is
        // slow to come (the lister keeps its place when a wait for a page is dropped).
        let next = if advanced {
            let deadline = tokio::time::Instant::from_std(committed + COMMIT_EVERY);
            tokio::time::timeout_at(deadline, lister.next_page())
                .await
                .ok()
        } else {
            Some(lister.next_page().await)
        };
        let next = match next {
            Some(Err(e)) => {
                // What was listed before the failure is kept: a retry goes on from it.
                if advanced {
                    commit(b, db, path, Durable::Yes).await?;
                    listed.send_replace(b.listed(false));
                }
                return Err(e.into());
            }
            Some(Ok(page)) => Some(page),
            None => None,
        };
        let page = match next {
            Some(Some(page)) => page,
            Some(None) => break,
            None => Vec::new(),
        };
        if !page.is_empty() && listed.borrow().error.is_some() {
            // The lake answers again: names not listed yet wait for it again.
            listed.send_modify(|l| l.error = None);
        }
        for obj in page {
            if resumed_after.as_ref().is_some_and(|a| obj.name <= *a) {
                continue;
            }
            b.add(obj);
            advanced = true;
        }
        let due = advanced && committed.elapsed() >= COMMIT_EVERY;
        let first = advanced && !listed.borrow().started();
        if due || first {
            // Durable, then served.
            commit(b, db, path, Durable::Yes).await?;
            listed.send_replace(b.listed(false));
            report(&listed.borrow());
            committed = Instant::now();
            advanced = false;
        } else if b.pending.len() >= BATCH {
            // Memory stays bounded; made durable (and served) by the next timed commit.
            commit(b, db, path, Durable::No).await?;
        }
    }
    commit(b, db, path, Durable::Last).await?;
    listed.send_replace(b.listed(true));
    report(&listed.borrow());
    Ok(())
}

/// How a commit of the builder is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durable {
    /// Not synced: bounds the builder's memory; nothing in it is served until a later
    /// durable commit.
    No,
    /// Synced: what it holds may be served.
    Yes,
    /// Synced, with the totals and the complete flag.
    Last,
}

/// Commits `b`'s pending entries on a blocking thread.
async fn commit(
    b: &mut Builder,
    db: &Arc<Database>,
    path: &Path,
    how: Durable,
) -> Result<(), SnapshotError> {
    let mut owned = std::mem::replace(b, Builder::new(""));
    let db = db.clone();
    let back = blocking(path, move || {
        owned.flush(&db, how)?;
        Ok(owned)
    })
    .await?;
    *b = back;
    Ok(())
}

/// Streaming tree builder.
struct Builder {
    prefix: String,
    /// The last name added (relative to the prefix).
    upto: String,
    next_ino: u64,
    /// Open directories from the root down: (path relative to prefix ending in '/', ino,
    /// number of children so far).
    stack: Vec<(String, u64, u64)>,
    pending: Vec<(Entry, u64)>,
    summary: Summary,
    digest: u64,
}

impl Builder {
    fn new(prefix: &str) -> Self {
        Builder {
            prefix: prefix.to_owned(),
            upto: String::new(),
            next_ino: ROOT + 1,
            stack: vec![(String::new(), ROOT, 0)],
            pending: Vec::new(),
            summary: Summary::default(),
            digest: 0xcbf2_9ce4_8422_2325,
        }
    }

    fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    fn listed(&self, complete: bool) -> Listed {
        Listed {
            summary: self.summary,
            upto: self.upto.clone(),
            complete,
            digest: if complete { self.digest } else { 0 },
            error: None,
            stopped: false,
        }
    }

    /// The state a listing stopped in (as of its last commit); `None` for a complete
    /// snapshot or one without a state (written by an older version).
    fn load(db: &Database) -> Result<Option<Builder>, redb::Error> {
        let tx = db.begin_read()?;
        let complete = match tx.open_table(META) {
            Ok(meta) => meta.get("complete")?.map(|v| v.value()) == Some(1),
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(e.into()),
        };
        if complete {
            return Ok(None);
        }
        let state = match tx.open_table(STATE) {
            Ok(t) => t.get("builder")?.map(|v| v.value().to_vec()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(state.and_then(|v| Builder::decode(&v)))
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let s = |v: &mut Vec<u8>, x: &str| {
            v.extend_from_slice(&(x.len() as u32).to_le_bytes());
            v.extend_from_slice(x.as_bytes());
        };
        s(&mut v, &self.prefix);
        s(&mut v, &self.upto);
        let sum = &self.summary;
        for n in [
            self.next_ino,
            sum.objects,
            sum.bytes,
            sum.dirs,
            sum.skipped,
            self.digest,
        ] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend_from_slice(&(self.stack.len() as u32).to_le_bytes());
        for (path, ino, count) in &self.stack {
            s(&mut v, path);
            v.extend_from_slice(&ino.to_le_bytes());
            v.extend_from_slice(&count.to_le_bytes());
        }
        v
    }

    fn decode(b: &[u8]) -> Option<Builder> {
        let mut r = Reader(b);
        let prefix = r.str()?;
        let upto = r.str()?;
        let next_ino = r.u64()?;
        let summary = Summary {
            objects: r.u64()?,
            bytes: r.u64()?,
            dirs: r.u64()?,
            skipped: r.u64()?,
        };
        let digest = r.u64()?;
        let n = r.u32()?;
        let mut stack = Vec::new();
        for _ in 0..n {
            stack.push((r.str()?, r.u64()?, r.u64()?));
        }
        (!stack.is_empty()).then_some(Builder {
            prefix,
            upto,
            next_ino,
            stack,
            pending: Vec::new(),
            summary,
            digest,
        })
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
        self.upto.clone_from(&rel);
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

    /// Commits the pending entries, the state to resume from and, for the last, the
    /// totals and the complete flag. Only what a durable commit holds is served: an
    /// entry never is before it would survive a crash, so a resumed listing never gives
    /// its number to another name.
    fn flush(&mut self, db: &Database, how: Durable) -> Result<(), redb::Error> {
        let last = how == Durable::Last;
        let mut tx = db.begin_write()?;
        tx.set_durability(if how == Durable::No {
            redb::Durability::None
        } else {
            redb::Durability::Immediate
        })?;
        {
            let mut en = tx.open_table(ENTRIES)?;
            let mut ch = tx.open_table(CHILDREN)?;
            let mut lk = tx.open_table(LOOKUP)?;
            if en.get(ROOT)?.is_none() {
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
            }
            for (e, pos) in self.pending.drain(..) {
                if let Some(existing) = lk.get((e.parent, e.name.as_str()))?.map(|v| v.value()) {
                    // Same name twice in one directory: only a file then a directory of
                    // that name can do this (the listing has unique names, and a file
                    // sorts before the names under a directory of its name). The
                    // directory wins: the file leaves readdir now, before any reader
                    // could have been shown it as final, and stays unreachable in
                    // `entries`.
                    tracing::warn!(
                        name = e.name,
                        "a file and a directory share a name; the directory is shown"
                    );
                    let pos = ch
                        .range((e.parent, 0)..(e.parent, u64::MAX))?
                        .rev()
                        .filter_map(|r| r.ok())
                        .find(|(_, v)| v.value() == existing)
                        .map(|(k, _)| k.value().1);
                    if let Some(pos) = pos {
                        ch.remove((e.parent, pos))?;
                    }
                    let size = en
                        .get(existing)?
                        .and_then(|v| Entry::decode(existing, v.value()))
                        .map_or(0, |f| f.size);
                    self.summary.objects -= 1;
                    self.summary.bytes -= size;
                    self.summary.skipped += 1;
                }
                en.insert(e.ino, e.encode().as_slice())?;
                ch.insert((e.parent, pos), e.ino)?;
                lk.insert((e.parent, e.name.as_str()), e.ino)?;
            }
            tx.open_table(STATE)?
                .insert("builder", self.encode().as_slice())?;
            let mut meta = tx.open_table(META)?;
            meta.insert("objects", self.summary.objects)?;
            meta.insert("bytes", self.summary.bytes)?;
            meta.insert("dirs", self.summary.dirs)?;
            meta.insert("skipped", self.summary.skipped)?;
            if last {
                meta.insert("digest", self.digest)?;
                meta.insert("complete", 1)?;
            }
        }
        tx.commit()?;
        Ok(())
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

    /// Fails, rather than hangs, if the listing never gets there.
    async fn within(f: impl std::future::Future<Output = Result<(), SnapshotError>>) {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("listed within 30 s")
            .unwrap();
    }

    fn held_lake(names: &[&str], pages_before_hold: u32) -> Arc<crate::lake::faults::FaultyLake> {
        use crate::lake::faults::{Fault, FaultyLake};
        let mem = MemoryLake::new();
        for n in names {
            mem.insert(n, n.as_bytes().to_vec());
        }
        let lake = Arc::new(FaultyLake::new(Arc::new(mem)));
        lake.fail_after(crate::lake::Op::List, pages_before_hold, Fault::Hold, None);
        lake
    }

    fn paged(n: u32) -> ListOptions {
        ListOptions {
            page_size: n,
            ..ListOptions::sequential()
        }
    }

    #[tokio::test]
    async fn a_snapshot_being_listed_answers_only_what_is_final() {
        let listing = [
            "ds/a/1", "ds/a/2", "ds/b", "ds/b/x", "ds/c", "ds/d/e/f", "ds/z",
        ];
        let lake = held_lake(&listing, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = Snapshot::start(lake.clone(), "ds/", &path, paged(3))
            .await
            .unwrap();
        within(s.wait_past("b")).await;
        assert!(!s.complete());
        assert_eq!(s.listed().upto, "b");
        let Lookup::Found(a) = s.lookup_now(ROOT, "a").unwrap() else {
            panic!("a directory is final once it exists")
        };
        assert!(
            matches!(s.lookup_now(a.ino, "1").unwrap(), Lookup::Found(e) if e.kind == Kind::File)
        );
        assert!(matches!(s.lookup_now(a.ino, "3").unwrap(), Lookup::Missing));
        // `b` is a file so far, but `b/x` may still come (it does): not final.
        assert!(matches!(s.lookup_now(ROOT, "b").unwrap(), Lookup::Wait(w) if w == "b0"));
        assert!(matches!(s.lookup_now(ROOT, "c").unwrap(), Lookup::Wait(w) if w == "c0"));
        assert_eq!(names(&s, ROOT), ["a"]);
        assert_eq!(s.children_wait(ROOT, 1).unwrap().as_deref(), Some("b0"));
        assert_eq!(names(&s, a.ino), ["1", "2"]);
        assert_eq!(
            s.children_wait(a.ino, 2).unwrap(),
            None,
            "a is listed whole"
        );
        lake.heal();
        within(s.wait_complete()).await;
        assert!(
            matches!(s.lookup_now(ROOT, "b").unwrap(), Lookup::Found(e) if e.kind == Kind::Dir)
        );
        assert_eq!(names(&s, ROOT), ["a", "b", "c", "d", "z"]);
        // The same snapshot as one built in one go.
        let whole =
            Snapshot::build_with(&*lake, "ds/", &dir.path().join("w.redb"), paged(3), |_| {})
                .await
                .unwrap();
        assert_eq!(s.summary(), whole.summary());
        assert_eq!(s.digest(), whole.digest());
        for ino in ROOT + 1..20 {
            assert_eq!(s.get(ino).unwrap(), whole.get(ino).unwrap(), "inode {ino}");
        }
        drop(s);
        assert_eq!(Snapshot::open(&path).unwrap().summary(), whole.summary());
    }

    #[tokio::test]
    async fn a_listing_resumed_after_a_stop_keeps_every_number_it_gave() {
        let mut names: Vec<String> = (0..40).map(|i| format!("ds/d{}/f{i:02}", i / 10)).collect();
        names.push("ds/d1".into()); // shadowed by d1/ later
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let lake = held_lake(&refs, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = Snapshot::start(lake.clone(), "ds/", &path, paged(8))
            .await
            .unwrap();
        within(s.wait_past("d1/f11")).await;
        let before: Vec<(u64, Option<Entry>)> =
            (ROOT + 1..40).map(|i| (i, s.get(i).unwrap())).collect();
        let upto = s.listed().upto;
        assert!(
            before.iter().any(|(_, e)| e.is_none()),
            "part of the listing only"
        );
        // The process stops mid-listing (the builder dies with it); meanwhile the lake
        // gets a name that sorts before where the listing was (a fresh listing would
        // number everything after it differently) and one after it.
        drop(s);
        let mem = MemoryLake::new();
        for n in names
            .iter()
            .map(|s| s.as_str())
            .chain(["ds/d0/aaa", "ds/d3/zzz"])
        {
            mem.insert(n, n.as_bytes().to_vec());
        }
        let s = Snapshot::resume(Arc::new(mem), "ds/", &path, paged(8))
            .await
            .unwrap();
        assert_eq!(
            s.listed().upto,
            upto,
            "resumed where the last commit left it"
        );
        within(s.wait_complete()).await;
        for (ino, e) in &before {
            if let Some(e) = e {
                assert_eq!(
                    s.get(*ino).unwrap().as_ref(),
                    Some(e),
                    "inode {ino} kept its file"
                );
            }
        }
        let d3 = s.lookup(ROOT, "d3").unwrap().unwrap();
        assert!(
            s.lookup(d3.ino, "zzz").unwrap().is_some(),
            "names after the stop are listed"
        );
        let d0 = s.lookup(ROOT, "d0").unwrap().unwrap();
        assert!(
            s.lookup(d0.ino, "aaa").unwrap().is_none(),
            "names before it were listed already"
        );
        assert_eq!(s.summary().objects, 41);
        assert_eq!(s.lookup(ROOT, "d1").unwrap().unwrap().kind, Kind::Dir);
    }

    /// Entries of an unsynced commit (made every 20,000 objects between synced ones)
    /// are never served: a crash loses them, and a resumed listing would give their
    /// numbers to other names. A directory, final as soon as it exists, is judged by
    /// the durable listing too.
    #[tokio::test]
    async fn entries_of_an_unsynced_commit_are_not_served() {
        let obj = |name: &str| ObjectMeta {
            name: name.into(),
            size: 1,
            etag: ETag("e".into()),
            last_modified: UNIX_EPOCH,
            content_md5: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (db, b) = Snapshot::create(&path).await.unwrap();
        let mut b = b.with_prefix("ds/");
        b.add(obj("ds/a/m/zz"));
        b.flush(&db, Durable::Yes).unwrap();
        let published = b.listed(false);
        b.add(obj("ds/a/n/x"));
        b.add(obj("ds/a/o"));
        b.flush(&db, Durable::No).unwrap();
        let s = Snapshot {
            db,
            path,
            listed: Arc::new(watch::Sender::new(published)),
            builder: None,
        };
        let Lookup::Found(a) = s.lookup_now(ROOT, "a").unwrap() else {
            panic!("a is durable")
        };
        assert!(
            s.lookup(a.ino, "n").unwrap().is_some(),
            "committed, unsynced"
        );
        assert!(matches!(s.lookup_now(a.ino, "n").unwrap(), Lookup::Wait(w) if w == "a/n/"));
        assert!(matches!(s.lookup_now(a.ino, "o").unwrap(), Lookup::Wait(w) if w == "a/o0"));
        assert_eq!(names(&s, a.ino), ["m"]);
        assert_eq!(s.children_wait(a.ino, 1).unwrap().as_deref(), Some("a/n/"));
    }

    /// A request waiting on a listing does not keep the snapshot (nor its listing)
    /// alive: closing the snapshot stops the listing and ends the wait with an error
    /// (the request gets EIO) instead of leaving it waiting forever.
    #[tokio::test]
    async fn closing_a_snapshot_being_listed_ends_every_wait() {
        let lake = held_lake(&["ds/a", "ds/b", "ds/c"], 1);
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshot::start(lake.clone(), "ds/", &dir.path().join("s.redb"), paged(1))
            .await
            .unwrap();
        let waiting = s.watch();
        drop(s);
        let r = tokio::time::timeout(Duration::from_secs(30), waiting.wait_past("c"))
            .await
            .expect("the wait ends");
        assert!(matches!(r, Err(SnapshotError::Listing(_))), "{r:?}");
        lake.heal();
    }

    /// While a listing's attempt has failed, a wait for a name it has not reached ends
    /// at once with the error (the request gets EIO, not a wait on a dead lake); once
    /// the lake answers again the retry goes on, the error is cleared and the listing
    /// completes.
    #[tokio::test]
    async fn a_failed_attempt_fails_waits_until_the_retry_lists_again() {
        use crate::lake::faults::{Fault, FaultyLake};
        let mem = MemoryLake::new();
        for i in 0..30 {
            mem.insert(&format!("ds/f{i:02}"), vec![1]);
        }
        let lake = Arc::new(FaultyLake::new(Arc::new(mem)));
        lake.fail_after(crate::lake::Op::List, 2, Fault::Reset, Some(1));
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshot::start(lake, "ds/", &dir.path().join("s.redb"), paged(10))
            .await
            .unwrap();
        let mut rx = s.listed.subscribe();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|l| l.error.is_some()))
            .await
            .expect("the attempt fails")
            .unwrap();
        drop(rx);
        assert!(matches!(
            s.wait_past("f29").await,
            Err(SnapshotError::Listing(_))
        ));
        within(s.wait_complete()).await;
        assert_eq!(s.listed().error, None);
        assert_eq!(s.summary().objects, 30);
        within(s.wait_past("f29")).await;
    }
}
