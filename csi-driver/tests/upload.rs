//! The checkpoint upload and verified download against a real Azurite through the real
//! Azure SDK: files of every size class land byte-exact with their size and MD5 in the
//! lake; an interrupted upload resumes sending only the blocks the lake lacks; a file
//! changed after its commit or during its upload publishes nothing; lake faults are
//! ridden out; a download that does not match its manifest leaves nothing behind; and
//! memory stays within `parallel × block_size` whatever the file size, measured by a
//! counting global allocator while no other test of this binary runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};
use parking_lot::Mutex;
use tidepool_csi::checkpoint::upload::{
    FileIdentity, UploadConfig, UploadError, Uploaded, download_verified, upload_file,
};
use tidepool_csi::lake::faults::{Fault, FaultyLake};
use tidepool_csi::lake::retry::{RetryConfig, RetryingLake};
use tidepool_csi::lake::{
    BlockId, BlockList, ByteStream, ETag, Lake, LakeError, LakeResult, LeaseId, LevelPage,
    ListPage, ObjectMeta, Op, PutOptions,
};
use tidepool_csi::testing::{Azurite, pattern};

// ---------------------------------------------------------------------------------
// Heap accounting: every allocation of this test binary is counted, so the memory
// test sees what the upload really holds (read buffers, SDK and HTTP copies).

struct CountingAlloc;

static HEAP_NOW: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = HEAP_NOW.fetch_add(n, Ordering::Relaxed) + n;
    HEAP_PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HEAP_NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new) };
        if !p.is_null() {
            HEAP_NOW.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Tests share the heap: the memory test runs alone (write), the others together (read).
static HEAP_EXCLUSIVE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Peak heap growth above the level at the call, while `f` runs.
async fn peak_growth<T>(f: impl Future<Output = T>) -> (T, usize) {
    let base = HEAP_NOW.load(Ordering::Relaxed);
    HEAP_PEAK.store(base, Ordering::Relaxed);
    let out = f.await;
    (out, HEAP_PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

// ---------------------------------------------------------------------------------

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Small sizes so that every path runs in a few MiB: one request up to 64 KiB, blocks
/// of 1 MiB, 4 in flight.
fn small_cfg() -> UploadConfig {
    UploadConfig {
        single_put_max: 64 * KIB,
        block_size: MIB,
        parallel: 4,
        budget: None,
    }
}

/// More attempts than faults injected into any one operation, so that even a block
/// that meets every fault in a row gets through.
fn fast_retries() -> RetryConfig {
    RetryConfig {
        max_attempts: 8,
        attempt_timeout: Duration::from_secs(20),
        deadline: Duration::from_secs(60),
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(10),
    }
}

/// Writes `data` to `dir/name` with an mtime in the past (so that any later write is
/// seen as a change whatever the clock's tick) and returns what a journal would record.
fn commit(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, FileIdentity) {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
    drop(f);
    let id = FileIdentity::of(&std::fs::metadata(&path).unwrap());
    (path, id)
}

fn md5_of(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

async fn upload(
    lake: &dyn Lake,
    name: &str,
    path: &Path,
    id: FileIdentity,
) -> Result<Uploaded, UploadError> {
    upload_file(lake, name, path, id, &small_cfg(), &|_| {}).await
}

/// A lake wrapper that watches Put Block: calls, bytes and the most in flight at once.
#[derive(Debug)]
struct Watched {
    inner: Arc<dyn Lake>,
    put_blocks: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    bytes_in_flight: AtomicU64,
    max_bytes_in_flight: AtomicU64,
}

impl Watched {
    fn new(inner: Arc<dyn Lake>) -> Self {
        Watched {
            inner,
            put_blocks: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            bytes_in_flight: AtomicU64::new(0),
            max_bytes_in_flight: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Lake for Watched {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn list_page(&self, p: &str, m: Option<&str>, n: u32) -> LakeResult<ListPage> {
        self.inner.list_page(p, m, n).await
    }
    async fn list_level(&self, p: &str, m: Option<&str>, n: u32) -> LakeResult<LevelPage> {
        self.inner.list_level(p, m, n).await
    }
    async fn head(&self, name: &str) -> LakeResult<ObjectMeta> {
        self.inner.head(name).await
    }
    async fn get_stream(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
        etag: &ETag,
    ) -> LakeResult<ByteStream> {
        self.inner.get_stream(name, range, etag).await
    }
    async fn put(&self, name: &str, data: Bytes, opts: &PutOptions) -> LakeResult<ETag> {
        self.inner.put(name, data, opts).await
    }
    async fn put_block(
        &self,
        name: &str,
        id: &BlockId,
        data: Bytes,
        md5: Option<[u8; 16]>,
    ) -> LakeResult<()> {
        let n = data.len() as u64;
        self.put_blocks.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Ordering::Relaxed);
        let bytes = self.bytes_in_flight.fetch_add(n, Ordering::Relaxed) + n;
        self.max_bytes_in_flight.fetch_max(bytes, Ordering::Relaxed);
        let r = self.inner.put_block(name, id, data, md5).await;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.bytes_in_flight.fetch_sub(n, Ordering::Relaxed);
        r
    }
    async fn put_block_list(
        &self,
        name: &str,
        ids: &[BlockId],
        md5: Option<[u8; 16]>,
    ) -> LakeResult<ETag> {
        self.inner.put_block_list(name, ids, md5).await
    }
    async fn get_block_list(&self, name: &str) -> LakeResult<BlockList> {
        self.inner.get_block_list(name).await
    }
    async fn delete(&self, name: &str) -> LakeResult<()> {
        self.inner.delete(name).await
    }
    async fn acquire_lease(
        &self,
        name: &str,
        secs: Option<u32>,
        proposed: &LeaseId,
    ) -> LakeResult<LeaseId> {
        self.inner.acquire_lease(name, secs, proposed).await
    }
    async fn renew_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        self.inner.renew_lease(name, lease).await
    }
    async fn release_lease(&self, name: &str, lease: &LeaseId) -> LakeResult<()> {
        self.inner.release_lease(name, lease).await
    }
}

/// Downloads `name` verified and asserts the bytes are `data`.
async fn assert_round_trip(lake: &dyn Lake, name: &str, dir: &Path, data: &[u8]) {
    let dest = dir.join(format!("back-{}", name.replace('/', "_")));
    download_verified(lake, name, &dest, data.len() as u64, md5_of(data))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let back = std::fs::read(&dest).unwrap();
    assert!(back == data, "{name}: downloaded bytes differ");
}

#[tokio::test]
async fn files_of_every_size_land_byte_exact_with_their_size_and_md5() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let lake = az.lake("sizes").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg();
    let sizes = [
        0,
        1,
        cfg.single_put_max,     // the largest single request
        cfg.single_put_max + 1, // the smallest staged upload
        cfg.block_size,         // exactly one block
        cfg.block_size * 7 / 2, // 3.5 blocks
        30 * MIB + 12_345,      // 31 blocks, the last one short
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        let data = pattern(i as u64 + 1, size as usize);
        let (path, id) = commit(dir.path(), &format!("f{i}"), &data);
        let name = format!("step-1/f{i}.bin");
        let seen = Mutex::new(Vec::new());
        let up = upload_file(&lake, &name, &path, id, &cfg, &|n| seen.lock().push(n))
            .await
            .unwrap_or_else(|e| panic!("{size} bytes: {e}"));
        let md5 = md5_of(&data);
        assert_eq!((up.size, up.md5), (size, md5), "{size} bytes");
        let head = lake.head(&name).await.unwrap();
        assert_eq!(
            (head.size, head.content_md5, &head.etag),
            (size, Some(md5), &up.etag),
            "{size} bytes: the lake must show the size and Content-MD5"
        );
        let seen = seen.into_inner();
        assert_eq!(
            seen.last().copied(),
            Some(size),
            "progress ends at the size"
        );
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        let blocks = lake.get_block_list(&name).await.unwrap().committed;
        if size <= cfg.single_put_max {
            assert!(blocks.is_empty(), "{size} bytes go in one request");
        } else {
            assert_eq!(blocks.len() as u64, size.div_ceil(cfg.block_size));
            assert!(blocks.iter().all(|(b, _)| b.0.len() == blocks[0].0.0.len()));
        }
        assert_round_trip(&lake, &name, dir.path(), &data).await;
    }
}

#[tokio::test]
async fn an_interrupted_upload_resumes_sending_only_the_missing_blocks() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("resume").await);
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(7, (10 * MIB + 500) as usize); // 11 blocks
    let (path, id) = commit(dir.path(), "model.bin", &data);
    let name = "step-2/model.bin";

    // First attempt: the connection dies for good after 5 blocks (one in flight at a
    // time, so exactly 5 are staged), as when the node is killed mid-upload.
    let faulty = FaultyLake::new(azure.clone());
    faulty.fail_after(Op::PutBlock, 5, Fault::Reset, None);
    let one_at_a_time = UploadConfig {
        parallel: 1,
        ..small_cfg()
    };
    let err = upload_file(&faulty, name, &path, id, &one_at_a_time, &|_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, UploadError::Lake(LakeError::Connection { .. })),
        "{err}"
    );
    assert!(matches!(
        azure.head(name).await,
        Err(LakeError::NotFound { .. })
    ));
    let staged = azure.get_block_list(name).await.unwrap().uncommitted;
    assert_eq!(staged.len(), 5, "{staged:?}");

    // Again, healthy: only the 6 missing blocks are sent.
    let watched = Watched::new(azure.clone());
    let up = upload(&watched, name, &path, id).await.unwrap();
    assert_eq!(watched.put_blocks.load(Ordering::Relaxed), 11 - 5);
    assert_eq!(
        up.md5,
        md5_of(&data),
        "the skipped blocks still count in the MD5"
    );
    assert_eq!(azure.head(name).await.unwrap().content_md5, Some(up.md5));
    assert_round_trip(&*azure, name, dir.path(), &data).await;

    // Every block staged, the commit failed: the next upload sends no block at all.
    let name2 = "step-3/model.bin";
    let faulty = FaultyLake::new(azure.clone());
    faulty.fail_always(Op::PutBlockList, Fault::Throttle);
    let err = upload(&faulty, name2, &path, id).await.unwrap_err();
    assert!(
        matches!(err, UploadError::Lake(LakeError::Throttled { .. })),
        "{err}"
    );
    assert!(matches!(
        azure.head(name2).await,
        Err(LakeError::NotFound { .. })
    ));
    let watched = Watched::new(azure.clone());
    upload(&watched, name2, &path, id).await.unwrap();
    assert_eq!(watched.put_blocks.load(Ordering::Relaxed), 0);
    assert_round_trip(&*azure, name2, dir.path(), &data).await;

    // A committed upload repeated (its answer lost): nothing is sent again either.
    let watched = Watched::new(azure.clone());
    upload(&watched, name2, &path, id).await.unwrap();
    assert_eq!(watched.put_blocks.load(Ordering::Relaxed), 0);

    // The file changes and is committed again: stale blocks of the old version staged
    // under the same name are never reused, every block is sent.
    let name3 = "step-4/model.bin";
    let faulty = FaultyLake::new(azure.clone());
    faulty.fail_after(Op::PutBlock, 5, Fault::Reset, None);
    upload_file(&faulty, name3, &path, id, &one_at_a_time, &|_| {})
        .await
        .unwrap_err();
    let mut changed = data.clone();
    changed[3 * MIB as usize] ^= 0xff; // inside block 3, already staged
    let (path, id2) = {
        std::fs::write(&path, &changed).unwrap();
        (
            path.clone(),
            FileIdentity::of(&std::fs::metadata(&path).unwrap()),
        )
    };
    assert_ne!(id, id2);
    let watched = Watched::new(azure.clone());
    upload(&watched, name3, &path, id2).await.unwrap();
    assert_eq!(watched.put_blocks.load(Ordering::Relaxed), 11);
    assert_round_trip(&*azure, name3, dir.path(), &changed).await;
}

/// Something done to a committed file.
type Change = Box<dyn Fn(&Path)>;

#[tokio::test]
async fn a_file_changed_after_its_commit_publishes_nothing() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let lake = az.lake("changed").await;
    let dir = tempfile::tempdir().unwrap();
    for size in [100u64, 3 * MIB] {
        let data = pattern(size, size as usize);
        let name = format!("step-5/f{size}");
        let changes: [(&str, Change); 3] = [
            (
                "appended",
                Box::new(|p: &Path| {
                    use std::io::Write;
                    std::fs::File::options()
                        .append(true)
                        .open(p)
                        .unwrap()
                        .write_all(b"!")
                        .unwrap();
                }),
            ),
            (
                "rewritten, same size",
                Box::new(|p: &Path| {
                    let mut d = std::fs::read(p).unwrap();
                    d[0] ^= 1;
                    std::fs::write(p, d).unwrap();
                }),
            ),
            (
                "replaced by another file",
                Box::new(|p: &Path| {
                    let other = p.with_extension("new");
                    std::fs::copy(p, &other).unwrap();
                    let f = std::fs::File::options().write(true).open(&other).unwrap();
                    f.set_modified(std::fs::metadata(p).unwrap().modified().unwrap())
                        .unwrap();
                    std::fs::rename(&other, p).unwrap();
                }),
            ),
        ];
        for (what, change) in changes {
            let (path, id) = commit(dir.path(), "f", &data);
            change(&path);
            match upload(&lake, &name, &path, id).await {
                Err(e @ UploadError::Changed { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
                    assert!(msg.contains("commit it again"), "{msg}");
                }
                other => panic!("{size} bytes {what}: expected Changed, got {other:?}"),
            }
            assert!(
                matches!(lake.head(&name).await, Err(LakeError::NotFound { .. })),
                "{size} bytes {what}: nothing may be published"
            );
        }
    }
    let gone = dir.path().join("gone");
    let (_, id) = commit(dir.path(), "gone", b"x");
    std::fs::remove_file(&gone).unwrap();
    assert!(matches!(
        upload(&lake, "step-5/gone", &gone, id).await,
        Err(UploadError::Missing { .. })
    ));
}

#[tokio::test]
async fn a_file_changed_during_its_upload_publishes_nothing() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let lake = az.lake("during").await;
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(9, (6 * MIB) as usize);
    let (path, id) = commit(dir.path(), "opt.bin", &data);
    let name = "step-6/opt.bin";
    // The trainer writes the file again while its first block is on its way: the write
    // happens in the progress callback after the first block is in.
    let writes = AtomicU64::new(0);
    let err = upload_file(&lake, name, &path, id, &small_cfg(), &|_| {
        if writes.fetch_add(1, Ordering::Relaxed) == 0 {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.write_all_at(b"new step", 0).unwrap();
        }
    })
    .await
    .unwrap_err();
    assert!(matches!(err, UploadError::Changed { .. }), "{err}");
    assert!(matches!(
        lake.head(name).await,
        Err(LakeError::NotFound { .. })
    ));
    assert!(
        lake.get_block_list(name)
            .await
            .unwrap()
            .committed
            .is_empty(),
        "no block list may be committed"
    );
}

#[tokio::test]
async fn lake_faults_are_ridden_out_byte_exact() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("faults").await);
    let faulty = Arc::new(FaultyLake::new(azure.clone()));
    let lake = RetryingLake::new(faulty.clone(), fast_retries());
    let dir = tempfile::tempdir().unwrap();

    faulty.fail(Op::BlockList, Fault::Reset, 1);
    faulty.fail(Op::PutBlock, Fault::Throttle, 3);
    faulty.fail(Op::PutBlock, Fault::Reset, 2);
    faulty.fail(Op::PutBlock, Fault::LostReply, 1);
    faulty.fail(Op::PutBlockList, Fault::LostReply, 1);
    faulty.fail(Op::Put, Fault::Throttle, 1);
    faulty.fail(Op::Put, Fault::LostReply, 1);
    let big = pattern(11, (5 * MIB + 77) as usize);
    let small = pattern(12, 5000);
    let (big_path, big_id) = commit(dir.path(), "big", &big);
    let (small_path, small_id) = commit(dir.path(), "small", &small);
    let up = upload(&lake, "step-7/big", &big_path, big_id)
        .await
        .unwrap();
    assert_eq!(up.md5, md5_of(&big));
    upload(&lake, "step-7/small", &small_path, small_id)
        .await
        .unwrap();
    assert_eq!(
        faulty.injected.load(Ordering::Relaxed),
        10,
        "every fault struck"
    );

    // Downloads ride out broken bodies too.
    faulty.fail(Op::Get, Fault::Truncate, 2);
    faulty.fail(Op::Head, Fault::Throttle, 1);
    assert_round_trip(&lake, "step-7/big", dir.path(), &big).await;
    assert_round_trip(&lake, "step-7/small", dir.path(), &small).await;
    let head = azure.head("step-7/big").await.unwrap();
    assert_eq!(
        (head.size, head.content_md5),
        (big.len() as u64, Some(up.md5))
    );
}

#[tokio::test]
async fn a_download_that_does_not_match_leaves_nothing_behind() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let lake = az.lake("verify").await;
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(13, (2 * MIB) as usize);
    let (path, id) = commit(dir.path(), "w", &data);
    upload(&lake, "step-8/w", &path, id).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("w");
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };

    // The manifest's MD5 does not match what the lake serves.
    let mut wrong = md5_of(&data);
    wrong[0] ^= 1;
    let err = download_verified(&lake, "step-8/w", &dest, data.len() as u64, wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::Mismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("step-8/w") && msg.contains(&*dest.to_string_lossy()),
        "{msg}"
    );
    assert!(
        listing().is_empty(),
        "no file at dest, no temporary file: {:?}",
        listing()
    );

    // The blob was replaced by another of the same size: refused, and an older file at
    // dest stays as it was.
    std::fs::write(&dest, b"the previous restore").unwrap();
    let mut other = data.clone();
    other[MIB as usize] ^= 0x55;
    lake.put("step-8/w", Bytes::from(other), &PutOptions::default())
        .await
        .unwrap();
    let err = download_verified(&lake, "step-8/w", &dest, data.len() as u64, md5_of(&data))
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::Mismatch { .. }), "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"the previous restore");
    assert_eq!(listing(), ["w"]);

    // Another size: refused before any byte is fetched.
    let err = download_verified(&lake, "step-8/w", &dest, 5, md5_of(&data))
        .await
        .unwrap_err();
    assert!(
        matches!(err, UploadError::Mismatch { got_size, .. } if got_size == data.len() as u64),
        "{err}"
    );
    // A missing blob is the lake's NotFound.
    assert!(matches!(
        download_verified(&lake, "step-8/none", &dest, 1, [0; 16]).await,
        Err(UploadError::Lake(LakeError::NotFound { .. }))
    ));
    assert_eq!(listing(), ["w"]);
}

#[tokio::test]
async fn memory_stays_within_parallel_blocks_whatever_the_file_size() {
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("memory").await);
    let dir = tempfile::tempdir().unwrap();
    // 48 blocks; the bound is 4 of them. Written in pieces so the test itself never
    // holds the file.
    let path = dir.path().join("huge.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..48 {
            f.write_all(&pattern(100 + i, MIB as usize)).unwrap();
        }
    }
    let id = FileIdentity::of(&std::fs::metadata(&path).unwrap());
    let cfg = small_cfg();
    let bound = cfg.parallel as u64 * cfg.block_size;
    // A lake slower than the disk, as a far region is: blocks queue up for it.
    let slow = FaultyLake::new(azure.clone());
    slow.set_latency(Op::PutBlock, Duration::from_millis(100));
    let watched = Watched::new(Arc::new(slow));

    let _alone = HEAP_EXCLUSIVE.write().await;
    let (up, grown) = peak_growth(upload_file(
        &watched,
        "step-9/huge",
        &path,
        id,
        &cfg,
        &|_| {},
    ))
    .await;
    let up = up.unwrap();
    assert_eq!(up.size, 48 * MIB);
    // Payload in flight: never more than the bound, and blocks really went in parallel
    // (how many at once depends on the machine's load; never more than `parallel`).
    let most = watched.max_in_flight.load(Ordering::Relaxed);
    assert!(
        (2..=cfg.parallel as u64).contains(&most),
        "{most} in flight"
    );
    assert!(watched.max_bytes_in_flight.load(Ordering::Relaxed) <= bound);
    // The whole process: the bound plus room for the HTTP client's buffers, far below
    // the 48 MiB an unbounded upload would hold.
    assert!(
        (grown as u64) < bound + 4 * MIB,
        "heap grew by {} MiB during the upload (bound {} MiB)",
        grown as u64 / MIB,
        bound / MIB
    );

    // Downloading holds one chunk at a time.
    let dest = dir.path().join("back.bin");
    let (r, grown) = peak_growth(download_verified(
        &*azure,
        "step-9/huge",
        &dest,
        up.size,
        up.md5,
    ))
    .await;
    r.unwrap();
    assert!(
        (grown as u64) < 4 * MIB,
        "heap grew by {} MiB during the download",
        grown as u64 / MIB
    );
    drop(_alone);
    let (a, b) = (std::fs::read(&path).unwrap(), std::fs::read(&dest).unwrap());
    assert!(a == b, "downloaded bytes differ");
}

#[tokio::test]
async fn a_shared_budget_bounds_the_blocks_in_flight_across_files() {
    let _shared = HEAP_EXCLUSIVE.read().await;
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("budget").await);
    // Slow Put Blocks, so that every upload has all it may have in flight at once.
    let slow = Arc::new(FaultyLake::new(azure.clone()));
    slow.set_latency(Op::PutBlock, Duration::from_millis(30));
    let watched = Arc::new(Watched::new(slow));
    let dir = tempfile::tempdir().unwrap();
    let budget = tidepool_csi::checkpoint::upload::MemoryBudget::new(4 * MIB);
    let cfg = UploadConfig {
        budget: Some(budget.clone()),
        ..small_cfg()
    };
    let files: Vec<_> = (0..3)
        .map(|i| {
            let data = pattern(40 + i, 8 * MIB as usize);
            let (path, id) = commit(dir.path(), &format!("f{i}"), &data);
            (format!("b/f{i}"), path, id, data)
        })
        .collect();
    let uploads = files.iter().map(|(name, path, id, _)| {
        let (watched, cfg) = (watched.clone(), cfg.clone());
        async move { upload_file(&*watched, name, path, *id, &cfg, &|_| {}).await }
    });
    for r in futures::future::join_all(uploads).await {
        r.unwrap();
    }
    // Three files of 4 blocks in flight each would be 12 MiB without the budget.
    let max = watched.max_bytes_in_flight.load(Ordering::Relaxed);
    assert!(
        max <= 4 * MIB,
        "{max} bytes of blocks in flight with a 4 MiB budget"
    );
    assert!(max >= 2 * MIB, "the budget is used ({max})");
    assert_eq!(budget.available_mib(), 4, "every grant given back");
    for (name, _, _, data) in &files {
        assert_round_trip(&*azure, name, dir.path(), data).await;
    }
}
