//! Uploading one local file to one blob, and downloading one verified.
//!
//! [`upload_file`] publishes exactly the bytes the journal committed, or nothing:
//! - The file is opened and `fstat`ed, and must still have the [`FileIdentity`] the
//!   journal recorded at commit (size, mtime, inode); after the last byte is read it is
//!   `fstat`ed again, before anything is committed. A file changed in between is
//!   [`UploadError::Changed`] and no blob is written (the caller commits again). The
//!   identity is only as fine as the kernel's timestamps: a write landing in the same
//!   clock tick as the write before the commit, that also keeps the size, goes unseen.
//! - Files up to [`UploadConfig::single_put_max`] go in one Put Blob with their
//!   `Content-MD5` (the lake refuses a body damaged on the way and stores the MD5).
//! - Larger files go in blocks of [`UploadConfig::block_size`], up to
//!   [`UploadConfig::parallel`] Put Blocks in flight, each with its own transactional
//!   MD5; the file is read once, in order, by one reader that also computes the whole
//!   file's MD5, which Put Block List stores as the blob's `Content-MD5`.
//! - Resumable: block ids are `tp1-<identity tag>-<index>`, where the tag is a hash of
//!   (size, mtime, inode, block size), so every id of one upload has the same length
//!   (29 bytes, as Azure requires) and the same file uploaded again produces the same
//!   ids. Before staging, Get Block List says which blocks the lake already holds (staged
//!   by an upload that was killed, or committed by one whose answer was lost); a block
//!   with our id and the expected size is not sent again (it is still read, for the
//!   whole-file MD5). A changed file has another tag and never reuses stale blocks.
//!   Blocks of an upload that is abandoned stay uncommitted until the blob's next
//!   commit or until Azure drops them (after a week).
//!
//! Memory bound: a block is read only when one of `parallel` slots is free, and its
//! buffer is dropped when its Put Block ends, so at most `parallel × block_size` bytes
//! of payload are held (64 MiB with the defaults) whatever the file size. A file above
//! 50,000 × `block_size` (390 GiB by default; Azure allows 50,000 blocks per blob) gets
//! larger blocks and proportionally fewer in flight, keeping the same bound as long as
//! one block fits in it. With a shared [`MemoryBudget`] (the sync's), every upload
//! running side by side also waits for its block's size to be granted first, so the
//! bound holds across files too.
//!
//! [`download_verified`] streams a blob into a temporary file next to the destination,
//! computing the MD5 as it writes, `fsync`s, and renames it into place only if size and
//! MD5 are the expected ones; on any failure the temporary file is removed and the
//! destination is untouched. It holds one network chunk at a time.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use md5::{Digest as _, Md5};
use sha2::Sha256;
use tokio::io::AsyncWriteExt as _;

use crate::lake::{BlockId, ETag, Lake, LakeError, PutOptions};

mod md5_lanes;

const MIB: u64 = 1 << 20;
/// Azure: at most 50,000 blocks in one blob.
const MAX_BLOCKS: u64 = 50_000;
/// Azure: at most 4000 MiB in one block.
const MAX_BLOCK: u64 = 4000 * MIB;

/// What the journal recorded of a file when it committed it; the file uploaded must
/// still be this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Inode number: a file replaced by another (rename over it) is another file even
    /// with the same size and mtime. The device is left out: it may be numbered anew
    /// after a reboot, the inode on a local file system is not.
    pub ino: u64,
}

impl FileIdentity {
    /// The identity of the file `m` describes (from `stat` or `fstat`).
    pub fn of(m: &std::fs::Metadata) -> Self {
        FileIdentity {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ino: m.ino(),
        }
    }

    /// What differs from `now`, in words; `None` when nothing does.
    fn differences(&self, now: &FileIdentity) -> Option<String> {
        let mut what = Vec::new();
        if self.size != now.size {
            what.push(format!("size {} → {}", self.size, now.size));
        }
        if self.mtime_ns != now.mtime_ns {
            what.push("modification time".to_owned());
        }
        if self.ino != now.ino {
            what.push("inode (replaced by another file)".to_owned());
        }
        (!what.is_empty()).then(|| what.join(", "))
    }

    /// 16 hex digits naming this content cut in blocks of `block`: part of every block
    /// id, so ids of another file version or another cut never match.
    fn tag(&self, block: u64) -> String {
        use sha2::Digest as _;
        let h = Sha256::digest(format!(
            "{}:{}:{}:{}",
            self.size, self.mtime_ns, self.ino, block
        ));
        h[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// How files are uploaded.
#[derive(Clone, Debug)]
pub struct UploadConfig {
    /// Files up to this size go in one request. 4 MiB: below it a file costs one
    /// round trip instead of at least two (blocks, then the list), and a retry resends
    /// at most 4 MiB; it is also less than the staged path's own memory bound.
    pub single_put_max: u64,
    /// Block size of larger files. 8 MiB: large enough that the per-request cost is
    /// small next to the transfer (8 MiB is ~0.1 s at 80 MB/s per connection), small
    /// enough that a failed block costs little to resend and fits the retry policy's
    /// per-attempt timeout even on a poor link; 50,000 of them make 390 GiB, beyond
    /// any checkpoint file we expect (larger files get larger blocks).
    pub block_size: u64,
    /// Put Blocks in flight per file. 8: one connection to Azure carries roughly
    /// 50–100 MB/s, 8 fill a multi-gigabit NIC share, and 8 × 8 MiB keeps the
    /// payload held in memory at 64 MiB per file.
    pub parallel: usize,
    /// A memory budget shared by uploads running side by side, in permits of 1 MiB:
    /// a block (or a small file) is read only once its size is granted, and given back
    /// when its request ends. The sync gives every upload of a volume one budget, so
    /// files in parallel never hold more than it whatever their number.
    pub budget: Option<Arc<MemoryBudget>>,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            single_put_max: 4 * MIB,
            block_size: 8 * MIB,
            parallel: 8,
            budget: None,
        }
    }
}

impl UploadConfig {
    /// Block size and blocks in flight for a file of `size` bytes: the configured ones,
    /// unless the file needs more than 50,000 blocks; then larger blocks (whole MiB)
    /// and fewer in flight, so that `parallel × block_size` stays the memory bound.
    fn plan(&self, size: u64) -> Option<(u64, usize)> {
        let block = self.block_size.max(1);
        let needed = size.div_ceil(MAX_BLOCKS);
        let block = if needed > block {
            needed.next_multiple_of(MIB)
        } else {
            block
        };
        if block > MAX_BLOCK {
            return None;
        }
        let budget = self.parallel.max(1) as u64 * self.block_size.max(1);
        Some((block, (budget / block).max(1) as usize))
    }
}

/// A file in the lake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    /// MD5 of the whole content (the blob's `Content-MD5`).
    pub md5: [u8; 16],
    pub etag: ETag,
}

/// Why a file did not go up (or come down). Names the file; never a credential.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} changed since it was committed ({what}); nothing was published, commit it again"
    )]
    Changed { path: PathBuf, what: String },
    #[error("{path} is gone since it was committed; nothing was published, commit it again")]
    Missing { path: PathBuf },
    #[error(
        "{path}: {size} bytes is more than one blob can hold (50,000 blocks of 4000 MiB); split the file"
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "{name} → {path}: the lake served {got_size} bytes with MD5 {got_md5}, the manifest says {expected_size} bytes with MD5 {expected_md5}; the blob was damaged or replaced, {path} was left as it was"
    )]
    Mismatch {
        name: String,
        path: PathBuf,
        expected_size: u64,
        expected_md5: String,
        got_size: u64,
        got_md5: String,
    },
    #[error(transparent)]
    Lake(#[from] LakeError),
}

/// Lower-case hex, as manifests and the journal write MD5s.
pub(crate) fn hex(md5: &[u8]) -> String {
    md5.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UploadError {
    let path = path.to_owned();
    move |source| UploadError::Io {
        action,
        path,
        source,
    }
}

/// Runs blocking file work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UploadError> + Send + 'static,
) -> Result<T, UploadError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The open file must still be the committed one.
fn check(file: &File, path: &Path, expect: &FileIdentity) -> Result<(), UploadError> {
    let now = FileIdentity::of(&file.metadata().map_err(io_err("checking", path))?);
    match expect.differences(&now) {
        None => Ok(()),
        Some(what) => Err(UploadError::Changed {
            path: path.to_owned(),
            what,
        }),
    }
}

/// Reads `len` bytes at `offset`; a file that ends sooner has changed.
fn read_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, UploadError> {
    let mut buf = vec![0u8; len];
    read_into(file, path, offset, &mut buf)?;
    Ok(buf)
}

/// Fills `buf` from `offset`; a file that ends sooner has changed.
fn read_into(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), UploadError> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(UploadError::Changed {
            path: path.to_owned(),
            what: "shorter than committed".to_owned(),
        }),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// Bytes of file data that uploads running side by side may hold, in whole MiB.
#[derive(Debug)]
pub struct MemoryBudget {
    sem: Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> Arc<MemoryBudget> {
        let total = (bytes / MIB).clamp(1, u32::MAX as u64 / 2) as u32;
        Arc::new(MemoryBudget {
            sem: Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
        })
    }

    /// MiB granted to nobody right now.
    pub fn available_mib(&self) -> usize {
        self.sem.available_permits()
    }
}

/// Waits for `bytes` of the shared budget (whole MiB, at least one; a block larger
/// than the whole budget takes all of it rather than waiting forever).
async fn grant(
    budget: Option<Arc<MemoryBudget>>,
    bytes: u64,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let budget = budget?;
    let want = bytes.div_ceil(MIB).clamp(1, budget.total as u64) as u32;
    budget.sem.clone().acquire_many_owned(want).await.ok()
}

/// A buffer of file data and the memory it is granted (`None` without a shared budget).
struct Buffer {
    data: Vec<u8>,
    _grant: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The first `len` bytes of a buffer, shared as [`Bytes`] by the request and the
/// whole-file MD5. When the last reference goes (the request sent and the MD5 past
/// them), the buffer goes back to its upload's free list with its grant, or, without
/// one or once the upload is over, is freed and its grant given back: the memory is
/// accounted for as long as it is really held, wherever it is held.
struct Held {
    buf: Option<Buffer>,
    len: usize,
    home: Option<tokio::sync::mpsc::UnboundedSender<Buffer>>,
}

impl Held {
    fn bytes(
        buf: Buffer,
        len: usize,
        home: Option<tokio::sync::mpsc::UnboundedSender<Buffer>>,
    ) -> Bytes {
        Bytes::from_owner(Held {
            buf: Some(buf),
            len,
            home,
        })
    }
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("taken only when dropped").data[..self.len]
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let (Some(buf), Some(home)) = (self.buf.take(), &self.home) {
            // A closed free list (the upload is over) drops the buffer right here.
            let _ = home.send(buf);
        }
    }
}

/// Uploads the file at `path` to the blob `name`, if it is still the file the journal
/// committed as `expect`. `progress` is called with the bytes done so far (sent, or
/// found already in the lake) as blocks complete. See the module doc for the protocol.
pub async fn upload_file(
    lake: &dyn Lake,
    name: &str,
    path: &Path,
    expect: FileIdentity,
    cfg: &UploadConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Uploaded, UploadError> {
    upload_file_if(
        lake,
        name,
        path,
        expect,
        cfg,
        progress,
        &PutOptions::default(),
    )
    .await
}

/// [`upload_file`] whose final write (the Put Blob, or the Put Block List) carries
/// `when`'s conditions (`If-Match`, `If-None-Match: *`): a compare-and-swap of the
/// whole object, whatever its size. A condition not met is the lake's error
/// ([`LakeError::Changed`], [`LakeError::Exists`], [`LakeError::NotFound`]).
pub async fn upload_file_if(
    lake: &dyn Lake,
    name: &str,
    path: &Path,
    expect: FileIdentity,
    cfg: &UploadConfig,
    progress: &(dyn Fn(u64) + Sync),
    when: &PutOptions,
) -> Result<Uploaded, UploadError> {
    let owned = path.to_owned();
    let file = blocking(move || {
        let file = File::open(&owned).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => UploadError::Missing {
                path: owned.clone(),
            },
            _ => io_err("opening", &owned)(e),
        })?;
        check(&file, &owned, &expect)?;
        Ok(file)
    })
    .await?;
    let file = Arc::new(file);
    let size = expect.size;

    if size <= cfg.single_put_max {
        let grant = grant(cfg.budget.clone(), size).await;
        let (f, p) = (file.clone(), path.to_owned());
        let data = blocking(move || {
            let data = read_at(&f, &p, 0, size as usize)?;
            check(&f, &p, &expect)?;
            Ok(data)
        })
        .await?;
        let data = Held::bytes(
            Buffer {
                data,
                _grant: grant,
            },
            size as usize,
            None,
        );
        let md5 = md5_lanes::digest(data.clone()).await;
        let opts = when.clone().with_md5(md5);
        let etag = lake.put(name, data, &opts).await?;
        progress(size);
        tracing::debug!(name, size, "uploaded in one request");
        return Ok(Uploaded { size, md5, etag });
    }

    let (block, parallel) = cfg.plan(size).ok_or_else(|| UploadError::TooLarge {
        path: path.to_owned(),
        size,
    })?;
    let count = size.div_ceil(block);
    let upload = format!("tp1-{}", expect.tag(block));
    let ids: Vec<BlockId> = (0..count)
        .map(|i| BlockId::numbered(&upload, i as u32))
        .collect();
    let listed = lake.get_block_list(name).await?;
    let present: std::collections::HashMap<BlockId, u64> = listed
        .committed
        .into_iter()
        .chain(listed.uncommitted)
        .collect();
    let done = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    // The whole file's MD5 takes the blocks in order, as the reader hands them on, while
    // earlier blocks are still being sent.
    let (to_whole, mut blocks_in_order) = tokio::sync::mpsc::channel::<Bytes>(parallel);
    let whole = async move {
        let mut state = md5_lanes::Md5State::default();
        for _ in 0..count {
            state = md5_lanes::update(state, blocks_in_order.recv().await?).await;
        }
        Some(state)
    };
    // At most `parallel` buffers, each granted its memory when made and kept until the
    // upload ends: a buffer whose block has been sent and hashed comes back through
    // `free` for a later block. Reused, its memory is not faulted in and zeroed again
    // for every block (the sync maps every 8 MiB allocation afresh: measured 2 s of CPU
    // per 2 GiB uploaded, more than the lake client's whole work).
    let (home, free) = tokio::sync::mpsc::unbounded_channel::<Buffer>();
    struct Reader {
        next: u64,
        made: usize,
        free: tokio::sync::mpsc::UnboundedReceiver<Buffer>,
        home: tokio::sync::mpsc::UnboundedSender<Buffer>,
        /// Per block: the lake holds it already.
        have: Vec<bool>,
    }
    let reader = Reader {
        next: 0,
        made: 0,
        free,
        home,
        have: (0..count)
            .map(|i| present.get(&ids[i as usize]) == Some(&(size - i * block).min(block)))
            .collect(),
    };
    let reader_file = file.clone();
    let sent = futures::stream::unfold(reader, move |mut r| {
        let (f, p) = (reader_file.clone(), path.to_owned());
        let (to_whole, budget) = (to_whole.clone(), cfg.budget.clone());
        async move {
            if r.next == count {
                return None;
            }
            let i = r.next;
            r.next += 1;
            let len = (size - i * block).min(block);
            let have = r.have[i as usize];
            // A free buffer, or a new one while fewer than `parallel` are made and the
            // budget grants it, whichever comes first.
            let buf = if r.made < parallel {
                tokio::select! {
                    biased;
                    Some(buf) = r.free.recv() => buf,
                    grant = grant(budget, len) => {
                        r.made += 1;
                        Buffer { data: Vec::new(), _grant: grant }
                    }
                }
            } else {
                r.free.recv().await.expect("the reader holds a sender")
            };
            let mut buf = buf;
            let read = blocking(move || {
                if buf.data.len() < len as usize {
                    buf.data = vec![0u8; len as usize];
                }
                read_into(&f, &p, i * block, &mut buf.data[..len as usize])?;
                Ok(buf)
            })
            .await;
            let data = match read {
                Ok(buf) => Held::bytes(buf, len as usize, Some(r.home.clone())),
                Err(e) => return Some((Err(e), r)),
            };
            // Fails only when the whole-file MD5 has stopped, which it does only once
            // this upload has failed.
            let _ = to_whole.send(data.clone()).await;
            Some((Ok((i, data, have)), r))
        }
    })
    // One reader, in order (the whole-file MD5 needs the bytes in order); it reads
    // block i only when a buffer and a place in buffer_unordered below are free.
    .map_ok(|(i, data, have)| {
        let (ids, done, skipped) = (&ids, &done, &skipped);
        async move {
            let len = data.len() as u64;
            if !have {
                // The block's own MD5, in a lane beside the whole file's.
                let md5 = md5_lanes::digest(data.clone()).await;
                lake.put_block(name, &ids[i as usize], data, Some(md5))
                    .await?
            } else {
                // A block the lake holds is not sent again: no need for its MD5.
                skipped.fetch_add(1, Ordering::Relaxed);
            }
            progress(done.fetch_add(len, Ordering::Relaxed) + len);
            Ok::<(), UploadError>(())
        }
    })
    .try_buffer_unordered(parallel)
    .try_collect::<()>();
    // A failed block ends `sent` and drops the reader with its sender, which ends
    // `whole` too.
    let (sent, whole) = futures::join!(sent, whole);
    sent?;
    let whole = whole.expect("the reader handed every block on");

    // Every byte read: the file must not have changed meanwhile.
    let (f, p) = (file.clone(), path.to_owned());
    blocking(move || check(&f, &p, &expect)).await?;
    let md5 = whole.finalize();
    let etag = lake
        .commit_blocks(name, &ids, &when.clone().with_md5(md5))
        .await?;
    tracing::debug!(
        name,
        size,
        blocks = count,
        resumed = skipped.load(Ordering::Relaxed),
        "uploaded in blocks"
    );
    Ok(Uploaded { size, md5, etag })
}

/// A temporary file removed when dropped unless kept (any error, or a cancelled
/// download, leaves nothing behind).
struct Temp {
    path: PathBuf,
    keep: bool,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Downloads the blob `name` to `dest` if its content has `expect_size` bytes and MD5
/// `expect_md5`; otherwise [`UploadError::Mismatch`], and `dest` is left as it was.
/// The bytes go to a temporary file in `dest`'s directory, are `fsync`ed, and the file
/// is renamed over `dest` (and the directory `fsync`ed), so `dest` is either absent,
/// its old self, or the whole verified content.
pub async fn download_verified(
    lake: &dyn Lake,
    name: &str,
    dest: &Path,
    expect_size: u64,
    expect_md5: [u8; 16],
) -> Result<(), UploadError> {
    let mismatch = |got_size: u64, got_md5: String| UploadError::Mismatch {
        name: name.to_owned(),
        path: dest.to_owned(),
        expected_size: expect_size,
        expected_md5: hex(&expect_md5),
        got_size,
        got_md5,
    };
    let meta = lake.head(name).await?;
    if meta.size != expect_size {
        let md5 = meta
            .content_md5
            .map_or_else(|| "unknown".to_owned(), |m| hex(&m));
        return Err(mismatch(meta.size, md5));
    }
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = Temp {
        path: dir.join(format!(
            ".{file_name}.tidepool-{:016x}.part",
            rand::random::<u64>()
        )),
        keep: false,
    };
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp.path)
        .await
        .map_err(io_err("creating", &temp.path))?;
    let mut body = lake.get_stream(name, 0..meta.size, &meta.etag).await?;
    let mut md5 = Md5::new();
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        md5.update(&chunk);
        got += chunk.len() as u64;
        out.write_all(&chunk)
            .await
            .map_err(io_err("writing", &temp.path))?;
    }
    out.flush().await.map_err(io_err("writing", &temp.path))?;
    out.sync_all()
        .await
        .map_err(io_err("syncing", &temp.path))?;
    drop(out);
    let md5: [u8; 16] = md5.finalize().into();
    if got != expect_size || md5 != expect_md5 {
        return Err(mismatch(got, hex(&md5)));
    }
    let (from, to) = (temp.path.clone(), dest.to_owned());
    blocking(move || {
        std::fs::rename(&from, &to).map_err(io_err("renaming into place", &to))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing the directory of", &to))
    })
    .await?;
    let mut temp = temp;
    temp.keep = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_keeps_the_memory_bound_and_the_block_count() {
        let cfg = UploadConfig::default();
        assert_eq!(cfg.plan(100 * MIB), Some((8 * MIB, 8)));
        // 1 TiB needs blocks of 21 MiB (50,000 of 20.97 MiB): 3 in flight, 63 MiB.
        let (block, parallel) = cfg.plan(1 << 40).unwrap();
        assert!(block * MAX_BLOCKS >= 1 << 40);
        assert_eq!((block, parallel), (21 * MIB, 3));
        // One block larger than the budget: one in flight.
        assert_eq!(cfg.plan(MAX_BLOCKS * 100 * MIB), Some((100 * MIB, 1)));
        assert_eq!(cfg.plan(MAX_BLOCKS * MAX_BLOCK + 1), None);
    }

    #[test]
    fn identity_tags_differ_for_any_change_and_ids_have_one_length() {
        let a = FileIdentity {
            size: 10,
            mtime_ns: 1,
            ino: 2,
        };
        let tags = [
            a.tag(8),
            FileIdentity { size: 11, ..a }.tag(8),
            FileIdentity { mtime_ns: 3, ..a }.tag(8),
            FileIdentity { ino: 4, ..a }.tag(8),
            a.tag(16),
        ];
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(t.len(), 16);
            assert!(tags[i + 1..].iter().all(|u| u != t), "{tags:?}");
        }
        let first = BlockId::numbered(&format!("tp1-{}", a.tag(8)), 0);
        let last = BlockId::numbered(&format!("tp1-{}", a.tag(8)), 49_999);
        assert_eq!((first.0.len(), last.0.len()), (29, 29));
    }
}
