//! The cache against a reference model: random sequences of reads (any offset, any
//! length, several files), pool reopens (a restart) and evictions under a tiny capacity
//! must always return exactly the lake's bytes; and prewarm with --include globs.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use tidepool_csi::cache::dataset::{Dataset, PrewarmProgress, include_set};
use tidepool_csi::cache::{CacheConfig, CachePool};
use tidepool_csi::lake::memory::MemoryLake;
use tidepool_csi::lake::{Lake, LakeUrl};

const BLOCK: u64 = 4096;
const SIZES: &[u64] = &[0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 9 * BLOCK + 123];

#[derive(Clone, Debug)]
enum Step {
    Read {
        file: usize,
        offset: u64,
        len: usize,
    },
    Restart,
    Evict,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..SIZES.len(), 0..40_000u64, 0..20_000usize).prop_map(|(file, offset, len)| Step::Read { file, offset, len }),
        1 => Just(Step::Restart),
        1 => Just(Step::Evict),
    ]
}

fn body(i: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|j| (j.wrapping_mul(31) ^ (i as u64 * 7)) as u8)
        .collect()
}

async fn open(
    dir: &std::path::Path,
    lake: &Arc<MemoryLake>,
    capacity: u64,
) -> (CachePool, Dataset) {
    let mut cfg = CacheConfig::new(dir, capacity);
    cfg.block_size = BLOCK;
    let pool = CachePool::open(cfg).await.unwrap();
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/m").unwrap();
    let lake: Arc<dyn Lake> = lake.clone();
    let ds = Dataset::open(pool.clone(), url, lake, true, |_| {})
        .await
        .unwrap();
    (pool, ds)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn reads_always_match_the_lake(steps in proptest::collection::vec(step(), 1..40), capacity_blocks in 4u64..40) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let lake = Arc::new(MemoryLake::new());
            let model: Vec<Vec<u8>> = SIZES.iter().enumerate().map(|(i, &n)| body(i, n)).collect();
            for (i, b) in model.iter().enumerate() {
                lake.insert(&format!("m/f{i}"), b.clone());
            }
            let dir = tempfile::tempdir().unwrap();
            let capacity = capacity_blocks * BLOCK;
            let (mut pool, mut ds) = open(dir.path(), &lake, capacity).await;
            for s in steps {
                match s {
                    Step::Read { file, offset, len } => {
                        let (_, snap) = ds.current();
                        let e = snap.lookup(1, &format!("f{file}")).unwrap().unwrap();
                        let blob = ds.blob(&e).unwrap();
                        let got = blob.read(offset, len).await.unwrap();
                        let m = &model[file];
                        let start = (offset as usize).min(m.len());
                        let end = (offset as usize + len).min(m.len());
                        prop_assert_eq!(&got[..], &m[start..end], "file {} offset {} len {}", file, offset, len);
                    }
                    Step::Restart => {
                        pool.flush().unwrap();
                        drop(ds);
                        drop(pool);
                        (pool, ds) = open(dir.path(), &lake, capacity).await;
                    }
                    Step::Evict => {
                        // No reader is left between steps, so eviction reaches the low
                        // watermark; but a fetch a read started ahead of its reader may
                        // still hold its file open for a moment (an open file is never
                        // evicted): evict again until such fetches have landed, 5 s at most.
                        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
                        loop {
                            pool.flush().unwrap();
                            pool.evict_now().unwrap();
                            if pool.used() <= (capacity as f64 * 0.9) as u64
                                || std::time::Instant::now() > end
                            {
                                break;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        prop_assert!(pool.used() <= (capacity as f64 * 0.9) as u64, "used {} capacity {}", pool.used(), capacity);
                    }
                }
            }
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarm_fetches_exactly_the_included_files_then_reads_need_no_lake() {
    let lake = Arc::new(MemoryLake::new());
    for i in 0..20u64 {
        lake.insert(
            &format!("m/train/part-{i:02}.parquet"),
            body(i as usize, 3 * BLOCK + i),
        );
        lake.insert(
            &format!("m/eval/part-{i:02}.parquet"),
            body(100 + i as usize, BLOCK),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (_pool, ds) = open(dir.path(), &lake, 1 << 30).await;
    let include = include_set(&["train/**/*.parquet".to_owned()]).unwrap();
    let progress = PrewarmProgress::default();
    let summary = ds.prewarm(include.as_ref(), 4, &progress).await.unwrap();
    let want: u64 = (0..20u64).map(|i| 3 * BLOCK + i).sum();
    assert_eq!(summary.files, 20);
    assert_eq!(summary.bytes, want);
    assert_eq!(progress.bytes_total.load(Ordering::Relaxed), want);
    assert!(summary.failed.is_empty());
    // Included files are served without the lake; excluded ones were not fetched.
    let gets = lake.gets.load(Ordering::Relaxed);
    let (_, snap) = ds.current();
    let train = snap.lookup(1, "train").unwrap().unwrap();
    let e = snap.lookup(train.ino, "part-07.parquet").unwrap().unwrap();
    assert_eq!(
        ds.blob(&e).unwrap().read(0, 1 << 20).await.unwrap(),
        body(7, 3 * BLOCK + 7)
    );
    assert_eq!(
        lake.gets.load(Ordering::Relaxed),
        gets,
        "prewarmed file read with no GET"
    );
    let eval = snap.lookup(1, "eval").unwrap().unwrap();
    let e = snap.lookup(eval.ino, "part-07.parquet").unwrap().unwrap();
    assert_eq!(
        ds.blob(&e).unwrap().residency().resident_blocks(),
        0,
        "excluded files are not fetched"
    );
    // A bad glob is a clear error naming the pattern.
    let err = include_set(&["train/[".to_owned()]).unwrap_err();
    assert!(err.to_string().contains("train/["), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_swaps_in_a_new_snapshot_only_when_the_lake_changed() {
    let lake = Arc::new(MemoryLake::new());
    lake.insert("m/a.txt", "version one");
    let dir = tempfile::tempdir().unwrap();
    let (_pool, ds) = open(dir.path(), &lake, 1 << 30).await;
    let (seq1, snap1) = ds.current();
    ds.hold(seq1, 1); // what the kernel does when it learns an inode
    assert!(
        ds.refresh().await.unwrap().is_none(),
        "nothing changed: same snapshot"
    );
    assert_eq!(ds.current().0, seq1);
    lake.insert("m/a.txt", "version two!");
    lake.insert("m/b.txt", "new file");
    assert!(
        ds.refresh().await.unwrap().is_some(),
        "changed lake: new snapshot"
    );
    let (seq2, snap2) = ds.current();
    assert_ne!(seq1, seq2);
    assert!(snap2.lookup(1, "b.txt").unwrap().is_some());
    assert_eq!(snap2.lookup(1, "a.txt").unwrap().unwrap().size, 12);
    // The old snapshot still answers for inodes handed out before the refresh...
    assert!(ds.snapshot(seq1).is_some());
    assert!(snap1.lookup(1, "b.txt").unwrap().is_none());
    // ...until the kernel forgets them.
    ds.forget(seq1, 1);
    assert!(ds.snapshot(seq1).is_none());
    assert_eq!(ds.open_snapshots(), 1);
    let new_a = snap2.lookup(1, "a.txt").unwrap().unwrap();
    assert_eq!(
        ds.blob(&new_a).unwrap().read(0, 100).await.unwrap(),
        &b"version two!"[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_damaged_before_a_reboot_is_caught_and_fetched_again() {
    let lake = Arc::new(MemoryLake::new());
    let want = body(3, 5 * BLOCK);
    lake.insert("m/w.bin", want.clone());
    let dir = tempfile::tempdir().unwrap();
    let open_in_boot = |boot: u8| {
        let lake = lake.clone();
        let dir = dir.path().to_owned();
        async move {
            let mut cfg = CacheConfig::new(&dir, 1 << 30);
            cfg.block_size = BLOCK;
            cfg.boot = [boot; 16];
            let pool = CachePool::open(cfg).await.unwrap();
            let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/m").unwrap();
            let ds = Dataset::open(pool.clone(), url, lake as Arc<dyn Lake>, true, |_| {})
                .await
                .unwrap();
            let (_, snap) = ds.current();
            let e = snap.lookup(1, "w.bin").unwrap().unwrap();
            (pool, ds, e)
        }
    };
    let (pool, ds, e) = open_in_boot(1).await;
    let blob = ds.blob(&e).unwrap();
    assert_eq!(blob.read(0, want.len()).await.unwrap(), want);
    let data_path = blob.data_path.clone();
    drop((blob, ds));
    pool.flush().unwrap();
    drop(pool);
    // What a power cut can leave: a slot on disk whose data never made it.
    let mut bytes = std::fs::read(&data_path).unwrap();
    bytes[2 * BLOCK as usize + 17] ^= 0xff;
    std::fs::write(&data_path, bytes).unwrap();
    let served = lake.bytes_served.load(Ordering::Relaxed);

    let (_pool, ds, e) = open_in_boot(2).await;
    let blob = ds.blob(&e).unwrap();
    assert_eq!(
        blob.read(0, want.len()).await.unwrap(),
        want,
        "after a reboot every block is checked before it is served"
    );
    assert_eq!(
        lake.bytes_served.load(Ordering::Relaxed),
        served + BLOCK,
        "only the damaged block is fetched again"
    );
    assert!(
        blob.residency().is_trusted(),
        "all blocks checked: trusted for the rest of this boot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_block_get_that_breaks_off_is_resumed_and_every_byte_is_exact() {
    use std::time::Duration;
    use tidepool_csi::lake::Op;
    use tidepool_csi::lake::faults::{Fault, FaultyLake};
    use tidepool_csi::lake::retry::{RetryConfig, RetryingLake};

    let mem = Arc::new(MemoryLake::new());
    let want = body(9, 10 * BLOCK + 77);
    mem.insert("m/run.bin", want.clone());
    let faulty = Arc::new(FaultyLake::new(mem.clone()));
    let retry = RetryConfig {
        attempt_timeout: Duration::from_millis(300),
        base_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..RetryConfig::default()
    };
    let lake: Arc<dyn Lake> = Arc::new(RetryingLake::new(faulty.clone(), retry));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = CacheConfig::new(dir.path(), 1 << 30);
    cfg.block_size = BLOCK;
    cfg.get_size = 4 * BLOCK;
    let pool = CachePool::open(cfg).await.unwrap();
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/m").unwrap();
    let ds = Dataset::open(pool, url, lake, false, |_| {}).await.unwrap();
    let (_, snap) = ds.current();
    let e = snap.lookup(1, "run.bin").unwrap().unwrap();
    let blob = ds.blob(&e).unwrap();
    // The first GET's body breaks off halfway, the resumed one stalls halfway.
    faulty.fail(Op::Get, Fault::Truncate, 1);
    faulty.fail(Op::Get, Fault::Stall, 1);
    assert_eq!(blob.read(0, want.len()).await.unwrap(), want);
    assert_eq!(blob.residency().resident_blocks(), 11);
    // Three GETs of up to four blocks cover the file; the two faults add two resumes.
    assert_eq!(faulty.calls(Op::Get), 3 + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_the_index_lost_in_a_crash_are_counted_again_at_the_next_start() {
    let lake = Arc::new(MemoryLake::new());
    lake.insert("m/a.bin", body(1, 3 * BLOCK));
    lake.insert("m/b.bin", body(2, 2 * BLOCK + 1));
    let dir = tempfile::tempdir().unwrap();
    {
        let (pool, ds) = open(dir.path(), &lake, 1 << 30).await;
        let (_, snap) = ds.current();
        for name in ["a.bin", "b.bin"] {
            let e = snap.lookup(1, name).unwrap().unwrap();
            ds.blob(&e).unwrap().read(0, 1 << 20).await.unwrap();
        }
        assert_eq!(pool.used(), 5 * BLOCK + 1);
        pool.flush().unwrap();
    }
    // A crash between a block landing and the next index commit leaves files the
    // index does not count; losing the whole index is the extreme case of that.
    std::fs::remove_file(dir.path().join("v1/index.redb")).unwrap();
    let (pool, ds) = open(dir.path(), &lake, 1 << 30).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pool.used() != 5 * BLOCK + 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        pool.used(),
        5 * BLOCK + 1,
        "every cached byte on disk is counted (and so can be evicted)"
    );
    let (_, snap) = ds.current();
    let e = snap.lookup(1, "b.bin").unwrap().unwrap();
    assert_eq!(
        ds.blob(&e).unwrap().read(0, 1 << 20).await.unwrap(),
        body(2, 2 * BLOCK + 1)
    );
    assert_eq!(
        lake.bytes_served.load(Ordering::Relaxed),
        5 * BLOCK + 1,
        "and reused, not fetched again"
    );
    assert_eq!(
        pool.used(),
        5 * BLOCK + 1,
        "a reused file is not counted twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_block_blob_is_checked_against_its_content_md5_once_complete() {
    let lake = Arc::new(MemoryLake::new());
    let good = body(4, 6 * BLOCK + 5);
    lake.insert("m/good.bin", good.clone());
    // A writer that set a Content-MD5 that does not describe the bytes.
    let odd = body(5, 3 * BLOCK);
    lake.insert_with_md5("m/odd.bin", odd.clone(), Some([7; 16]));
    let dir = tempfile::tempdir().unwrap();
    let (_pool, ds) = open(dir.path(), &lake, 1 << 30).await;
    let (_, snap) = ds.current();

    let e = snap.lookup(1, "good.bin").unwrap().unwrap();
    let blob = ds.blob(&e).unwrap();
    assert_eq!(blob.read(0, 1 << 20).await.unwrap(), good);
    assert!(
        eventually(|| blob.md5_verified()).await,
        "the whole local copy matches the lake's MD5"
    );

    let before = lake.bytes_served.load(Ordering::Relaxed);
    let e = snap.lookup(1, "odd.bin").unwrap().unwrap();
    let blob = ds.blob(&e).unwrap();
    assert_eq!(
        blob.read(0, 1 << 20).await.unwrap(),
        odd,
        "the lake's bytes are served"
    );
    // The check runs once the last block is in, beside the readers: it drops the copy,
    // which the next read (perhaps the one still running) fetches again, and the
    // second mismatch is recorded.
    assert!(eventually(|| blob.md5_mismatch() || blob.residency().resident_blocks() == 0).await);
    assert_eq!(blob.read(0, 1 << 20).await.unwrap(), odd);
    assert!(eventually(|| blob.md5_mismatch()).await);
    assert!(!blob.md5_verified());
    assert_eq!(
        lake.bytes_served.load(Ordering::Relaxed) - before,
        2 * odd.len() as u64,
        "fetched once more before concluding"
    );
    assert_eq!(blob.read(0, 1 << 20).await.unwrap(), odd);
    assert_eq!(
        lake.bytes_served.load(Ordering::Relaxed) - before,
        2 * odd.len() as u64,
        "and not again"
    );
}

/// Polls `f` for up to ten seconds.
async fn eventually(f: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_larger_than_the_pool_is_read_whole_within_the_pool() {
    let lake = Arc::new(MemoryLake::new());
    let want = body(6, 60 * BLOCK);
    lake.insert_with_md5("m/huge.bin", want.clone(), None);
    let dir = tempfile::tempdir().unwrap();
    let (pool, ds) = open(dir.path(), &lake, 20 * BLOCK).await;
    let (_, snap) = ds.current();
    let e = snap.lookup(1, "huge.bin").unwrap().unwrap();
    let blob = ds.blob(&e).unwrap();
    // One reader streams through three times the pool while the file stays open.
    for i in 0..60u64 {
        let got = blob.read(i * BLOCK, BLOCK as usize).await.unwrap();
        assert_eq!(
            got,
            want[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize],
            "block {i}"
        );
        if i % 5 == 4 {
            pool.evict_now().unwrap();
            assert!(
                pool.used() <= 18 * BLOCK,
                "block {i}: {} bytes used, over the high watermark",
                pool.used()
            );
        }
    }
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&blob.data_path).unwrap().blocks() * 512;
    assert!(
        on_disk <= 20 * BLOCK,
        "{on_disk} bytes allocated on disk for a pool of {}",
        20 * BLOCK
    );
    // What was shed reads back exactly (fetched again).
    assert_eq!(
        blob.read(0, 3 * BLOCK as usize).await.unwrap(),
        want[..3 * BLOCK as usize]
    );
}

/// A case proptest found (CI, 2026-12-04): three reads of a 10-block file through a
/// 7-block pool, so blocks are shed from the file being read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_file_larger_than_the_pool_match_the_lake() {
    for _ in 0..200 {
        let lake = Arc::new(MemoryLake::new());
        let model: Vec<Vec<u8>> = SIZES.iter().enumerate().map(|(i, &n)| body(i, n)).collect();
        for (i, b) in model.iter().enumerate() {
            lake.insert(&format!("m/f{i}"), b.clone());
        }
        let dir = tempfile::tempdir().unwrap();
        let (_pool, ds) = open(dir.path(), &lake, 7 * BLOCK).await;
        for (offset, len) in [(23065u64, 7613usize), (4112, 12125), (2537, 18707)] {
            let (_, snap) = ds.current();
            let e = snap.lookup(1, "f5").unwrap().unwrap();
            let blob = ds.blob(&e).unwrap();
            let got = blob.read(offset, len).await.unwrap();
            let m = &model[5];
            let (start, end) = (
                (offset as usize).min(m.len()),
                (offset as usize + len).min(m.len()),
            );
            assert_eq!(&got[..], &m[start..end]);
        }
    }
}

/// An agent restarted while a dataset is being listed takes up the same snapshot where
/// its listing stopped: every inode number it served before means the same file after
/// (the kernel still holds them), even though the lake changed in between in a way that
/// would number a fresh listing differently; the rest is listed then.
#[tokio::test]
async fn an_agent_restarted_mid_listing_resumes_the_same_snapshot() {
    use std::time::Duration;
    use tidepool_csi::lake::Op;
    use tidepool_csi::lake::faults::{Fault, FaultyLake};
    use tidepool_csi::lake::parallel::ListOptions;

    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryLake::new());
    for i in 0..30 {
        mem.insert(&format!("m/d{}/f{i:02}", i / 10), body(i, 100));
    }
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/m").unwrap();
    let start = |lake: Arc<dyn Lake>| {
        let (dir, url) = (dir.path().to_owned(), url.clone());
        async move {
            let mut cfg = CacheConfig::new(&dir, 1 << 20);
            cfg.listing = ListOptions {
                page_size: 5,
                ..ListOptions::sequential()
            };
            let pool = CachePool::open(cfg).await.unwrap();
            Dataset::start(pool, url, lake, true).await.unwrap()
        }
    };
    let held = Arc::new(FaultyLake::new(mem.clone()));
    held.fail_after(Op::List, 2, Fault::Hold, None);
    let ds = start(held.clone()).await;
    let (seq, snap) = ds.current();
    tokio::time::timeout(Duration::from_secs(30), snap.wait_past("d0/f09"))
        .await
        .expect("the first pages are served within 30 s")
        .unwrap();
    assert!(!snap.complete());
    let served: Vec<_> = (2..40).filter_map(|i| snap.get(i).unwrap()).collect();
    assert!(served.len() >= 10 && served.len() < 33, "{}", served.len());
    drop((ds, snap));
    // While the agent is down, a name lands before where the listing was.
    mem.insert("m/d0/a-new", body(99, 10));
    let ds = start(mem.clone()).await;
    let (again, snap) = ds.current();
    assert_eq!(again, seq, "the same snapshot, taken up");
    tokio::time::timeout(Duration::from_secs(30), snap.wait_complete())
        .await
        .expect("listed within 30 s")
        .unwrap();
    for e in &served {
        assert_eq!(
            snap.get(e.ino).unwrap().as_ref(),
            Some(e),
            "inode {}",
            e.ino
        );
    }
    assert_eq!(
        snap.summary().objects,
        30,
        "everything after the stop is listed"
    );
    // Each file reads the lake's bytes.
    for e in &served {
        if let Some(i) = e.name.strip_prefix('f') {
            let i: usize = i.parse().unwrap();
            let got = ds.blob(e).unwrap().read(0, 100).await.unwrap();
            assert_eq!(&got[..], &body(i, 100)[..]);
        }
    }
    drop((ds, snap));
    // A complete snapshot is reused as it is.
    assert_eq!(start(mem.clone()).await.current().0, seq);
}

/// A lake that cannot be listed at all fails the open (the stage, with the lake's own
/// error, so the agent answers with its code) instead of a mount whose every lookup
/// fails; a listing that fails after serving began is retried, and a name it has not
/// reached waits for it.
#[tokio::test]
async fn a_lake_that_cannot_be_listed_fails_the_open_and_a_later_failure_is_retried() {
    use std::time::Duration;
    use tidepool_csi::cache::CacheError;
    use tidepool_csi::cache::snapshot::SnapshotError;
    use tidepool_csi::lake::faults::{Fault, FaultyLake};
    use tidepool_csi::lake::parallel::ListOptions;
    use tidepool_csi::lake::{LakeError, Op};

    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryLake::new());
    for i in 0..30 {
        mem.insert(&format!("m/f{i:02}"), body(i, 10));
    }
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/m").unwrap();
    let mut cfg = CacheConfig::new(dir.path(), 1 << 20);
    cfg.listing = ListOptions {
        page_size: 10,
        ..ListOptions::sequential()
    };
    let pool = CachePool::open(cfg).await.unwrap();
    let lake = Arc::new(FaultyLake::new(mem.clone()));
    lake.fail_always(Op::List, Fault::Reset);
    let err = Dataset::start(pool.clone(), url.clone(), lake.clone(), true)
        .await
        .expect_err("an unlistable lake fails the open");
    assert!(
        matches!(
            err,
            CacheError::Snapshot(SnapshotError::Lake(LakeError::Connection { .. }))
        ),
        "{err:?}"
    );
    // Listable at first, failing after the first page: served, retried, completed.
    lake.heal();
    lake.fail_after(Op::List, 2, Fault::Reset, Some(1));
    let ds = Dataset::start(pool, url, lake.clone(), true).await.unwrap();
    let (_, snap) = ds.current();
    tokio::time::timeout(Duration::from_secs(30), snap.wait_complete())
        .await
        .expect("the retry (after 1 s) completes the listing")
        .unwrap();
    assert_eq!(snap.summary().objects, 30);
}
