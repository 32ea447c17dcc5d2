//! Real FUSE mounts of a dataset (needs root and /dev/fuse, as in CI): what a training
//! job sees through the mount, with the in-memory lake and the fault injector behind it.
//! The real binary against Azurite is in `kill9.rs` and `stress.rs`.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tidepool_csi::cache::dataset::Dataset;
use tidepool_csi::cache::{CacheConfig, CachePool};
use tidepool_csi::fs::{DatasetFs, FsConfig, Mount, MountStats, mount_config};
use tidepool_csi::lake::faults::{Fault, FaultyLake};
use tidepool_csi::lake::memory::MemoryLake;
use tidepool_csi::lake::retry::{RetryConfig, RetryingLake};
use tidepool_csi::lake::{Lake, LakeUrl, Op};
use tidepool_csi::testing::pattern;

const BLOCK: u64 = 64 * 1024;

struct Fixture {
    rt: tokio::runtime::Runtime,
    cache: tempfile::TempDir,
    mnt: tempfile::TempDir,
    mount: Option<Mount>,
    stats: Arc<MountStats>,
    ds: Option<Arc<Dataset>>,
}

impl Fixture {
    fn path(&self, p: &str) -> PathBuf {
        self.mnt.path().join(p)
    }

    fn mount(
        lake: Arc<dyn Lake>,
        cache: tempfile::TempDir,
        tweak: impl FnOnce(&mut CacheConfig),
    ) -> Fixture {
        Self::mount_with(lake, cache, tweak, mount_config(true, 4, "tidepool-test"))
    }

    fn mount_with(
        lake: Arc<dyn Lake>,
        cache: tempfile::TempDir,
        tweak: impl FnOnce(&mut CacheConfig),
        config: tidepool_csi::fs::MountConfig,
    ) -> Fixture {
        Self::mount_opened(lake, cache, tweak, config, false)
    }

    /// Mounts with the dataset opened as an agent opens it (`early`): served as soon
    /// as it is listing, not when the listing is complete.
    fn mount_opened(
        lake: Arc<dyn Lake>,
        cache: tempfile::TempDir,
        tweak: impl FnOnce(&mut CacheConfig),
        config: tidepool_csi::fs::MountConfig,
        early: bool,
    ) -> Fixture {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let mut cfg = CacheConfig::new(cache.path(), 1 << 30);
        cfg.block_size = BLOCK;
        cfg.small_file_threshold = BLOCK;
        cfg.max_readahead = 8 * BLOCK;
        cfg.get_size = 2 * BLOCK;
        tweak(&mut cfg);
        let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/ds").unwrap();
        let ds = rt.block_on(async {
            let pool = CachePool::open(cfg).await.unwrap();
            let ds = if early {
                Dataset::start(pool, url, lake, false).await
            } else {
                Dataset::open(pool, url, lake, false, |_| {}).await
            };
            Arc::new(ds.unwrap())
        });
        let stats = Arc::new(MountStats::default());
        let fs = DatasetFs::new(
            ds.clone(),
            rt.handle().clone(),
            FsConfig {
                ttl: Duration::from_secs(60),
                passthrough: true,
                uid: 0,
                gid: 0,
            },
            stats.clone(),
        );
        let mount =
            Mount::spawn(fs, mnt.path(), &config).expect("mount (needs root and /dev/fuse)");
        Fixture {
            rt,
            cache,
            mnt,
            mount: Some(mount),
            stats,
            ds: Some(ds),
        }
    }

    fn unmount(&mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount().unwrap();
        }
        self.ds = None;
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.unmount();
        let _ = &self.rt;
    }
}

fn is_mounted(p: &Path) -> bool {
    tidepool_csi::mounts::is_mounted(&fs::canonicalize(p).unwrap_or(p.to_owned())).unwrap()
}

fn sample_lake() -> (Arc<MemoryLake>, Vec<u8>) {
    let lake = Arc::new(MemoryLake::new());
    let big = pattern(1, (10 * BLOCK + 12345) as usize);
    lake.insert("ds/big.bin", big.clone());
    lake.insert("ds/small.txt", "hello tidepool\n");
    lake.insert("ds/empty", Vec::new());
    for i in 0..50 {
        lake.insert(
            &format!("ds/train/shard-{i:03}.bin"),
            pattern(100 + i, 1000 + i as usize * 37),
        );
    }
    lake.insert("ds/train/nested/deep/file.json", "{}");
    lake.insert("elsewhere/not-in-dataset", "x");
    (lake, big)
}

/// Runs `f` on a thread pinned to `cpu`; its result, or `None` if it has not returned
/// within `limit` (the thread is left behind, blocked).
fn on_cpu_within<T: Send + 'static>(
    cpu: usize,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for cpu < 1024.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Through FUSE over io_uring the kernel hands a request to the queue of the caller's
/// CPU, and to no other. A queue that fails (here: its ring refuses an answer, by fault
/// injection) would leave every later request from that CPU waiting forever; the
/// connection is ended instead, so a reader on that CPU gets an error at once
/// (ECONNABORTED), and one on another CPU ENOTCONN (the volume must be mounted again,
/// as after any lost connection), and the mount ends saying why. Before, the reader
/// hung.
#[test]
fn a_failed_io_uring_queue_ends_the_connection_instead_of_stranding_its_cpu() {
    let Some(_uring) = tidepool_csi::testing::FuseUring::enable_for(
        "a_failed_io_uring_queue_ends_the_connection_instead_of_stranding_its_cpu",
    ) else {
        return;
    };
    let (lake, big) = sample_lake();
    let mut config = mount_config(true, 4, "tidepool-test");
    config.io_uring = true;
    let mut fx = Fixture::mount_with(lake, tempfile::tempdir().unwrap(), |_| {}, config);
    let conn = fx.mount.as_ref().unwrap().connection().clone();
    // Two CPUs where there are two (the machine this runs on has).
    let other = 1 % std::thread::available_parallelism().map_or(1, |n| n.get());
    // Served through the rings while they work: every CPU's reads exact.
    for cpu in [0, other] {
        let p = fx.path("big.bin");
        let got = on_cpu_within(cpu, Duration::from_secs(60), move || fs::read(p).unwrap())
            .expect("a read through a working queue returns");
        assert!(got == big, "CPU {cpu}: big.bin exact");
    }
    assert!(
        conn.io_uring_requests() > 0,
        "the kernel switched the connection to io_uring"
    );
    // CPU 0's queue fails at its next answer.
    tidepool_csi::fuse::uring::FAIL_QUEUE.store(0, Ordering::Relaxed);
    let p = fx.path("small.txt");
    let r = on_cpu_within(0, Duration::from_secs(30), move || {
        fs::read(p).map_err(|e| e.raw_os_error())
    });
    tidepool_csi::fuse::uring::FAIL_QUEUE.store(-1, Ordering::Relaxed);
    let Some(r) = r else {
        // Ended here, so that the stranded reader and the unmount let the test end.
        let _ = conn.abort("the test");
        panic!("a reader on the failed queue's CPU was left waiting");
    };
    // The request under way when the connection ended fails with ECONNABORTED, later
    // ones with ENOTCONN.
    assert!(
        matches!(r, Err(Some(libc::ECONNABORTED | libc::ENOTCONN))),
        "the connection was ended: {r:?}"
    );
    let p = fx.path("big.bin");
    let r = on_cpu_within(other, Duration::from_secs(30), move || {
        fs::read(p).map_err(|e| e.raw_os_error())
    })
    .expect("a reader on another CPU is answered");
    assert_eq!(r, Err(Some(libc::ENOTCONN)), "the whole volume is down");
    // The mount ends, and says why (`tidepool mount` exits with it).
    let err = fx.mount.take().unwrap().join().unwrap_err().to_string();
    assert!(
        err.contains("the queue of CPU 0 failed") && err.contains("mount again"),
        "{err}"
    );
    assert!(!is_mounted(fx.mnt.path()), "and leaves no mount behind");
}

#[test]
fn reads_are_byte_exact_at_odd_offsets_and_sizes() {
    let (lake, big) = sample_lake();
    let fx = Fixture::mount(lake, tempfile::tempdir().unwrap(), |_| {});
    let f = fs::File::open(fx.path("big.bin")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), big.len() as u64);
    for (off, len) in [
        (0, 1),
        (1, 4095),
        (BLOCK - 3, 7),
        (3 * BLOCK + 17, 2 * BLOCK + 5),
        (big.len() as u64 - 10, 100),
        (big.len() as u64 + 5, 10),
    ] {
        let mut buf = vec![0u8; len as usize];
        let n = f.read_at(&mut buf, off).unwrap();
        let want = &big[(off as usize).min(big.len())..((off + len) as usize).min(big.len())];
        assert_eq!(&buf[..n], want, "offset {off} len {len}");
    }
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    assert_eq!(
        fs::read_to_string(fx.path("small.txt")).unwrap(),
        "hello tidepool\n"
    );
    assert_eq!(fs::read(fx.path("empty")).unwrap(), b"");
}

#[test]
fn directory_listing_matches_the_lake() {
    let (lake, _) = sample_lake();
    let fx = Fixture::mount(lake, tempfile::tempdir().unwrap(), |_| {});
    let mut root: Vec<String> = fs::read_dir(fx.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    root.sort();
    assert_eq!(root, ["big.bin", "empty", "small.txt", "train"]);
    let train: Vec<_> = fs::read_dir(fx.path("train"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(train.len(), 51);
    let shard = fs::metadata(fx.path("train/shard-007.bin")).unwrap();
    assert_eq!(shard.len(), 1000 + 7 * 37);
    assert!(shard.is_file());
    assert!(shard.permissions().readonly());
    assert!(fs::metadata(fx.path("train/nested/deep")).unwrap().is_dir());
    assert_eq!(
        fs::read_to_string(fx.path("train/nested/deep/file.json")).unwrap(),
        "{}"
    );
    assert_eq!(
        fs::metadata(fx.path("nope")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}

#[test]
fn many_concurrent_readers_get_the_same_bytes_and_each_block_is_fetched_once() {
    let (lake, big) = sample_lake();
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    let path = fx.path("big.bin");
    let before = lake.bytes_served.load(Ordering::Relaxed);
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let path = &path;
            let big = &big;
            s.spawn(move || {
                let mut f = fs::File::open(path).unwrap();
                // Every reader starts somewhere else and wraps around.
                let start = (t * 7919 * 13) % big.len() as u64;
                f.seek(SeekFrom::Start(start)).unwrap();
                let mut tail = Vec::new();
                f.read_to_end(&mut tail).unwrap();
                assert_eq!(tail, big[start as usize..], "reader {t}");
            });
        }
    });
    let served = lake.bytes_served.load(Ordering::Relaxed) - before;
    assert_eq!(
        served,
        big.len() as u64,
        "each byte is fetched exactly once however many readers want it"
    );
}

#[test]
fn fully_resident_files_are_opened_with_passthrough() {
    let (lake, big) = sample_lake();
    let fx = Fixture::mount(lake, tempfile::tempdir().unwrap(), |_| {});
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    let reads_cold = fx.stats.reads.load(Ordering::Relaxed);
    assert!(reads_cold > 0);
    // The kernel sends the cold reader's RELEASE after its close returned, and while
    // that handle is open the file is not passthrough: wait for it (and for the file to
    // be whole in the cache).
    let conn = fx.mount.as_ref().unwrap().connection().clone();
    let ds = fx.ds.clone().unwrap();
    tidepool_csi::testing::within(Duration::from_secs(10), || {
        let released = conn
            .request_counts()
            .iter()
            .any(|&(op, n, _)| op == "RELEASE" && n >= 1);
        (released && ds.cached_bytes().unwrap() == big.len() as u64).then_some(())
    })
    .expect("the cold reader's handle released, and big.bin whole in the cache");
    // Drop the page cache so the second read must go to the file system again.
    drop_caches(&fx.path("big.bin"));
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    // Both later opens (the fadvise one and the read) are passthrough.
    assert_eq!(
        fx.stats.passthrough_opens.load(Ordering::Relaxed),
        2,
        "opens of a resident file are passthrough"
    );
    assert_eq!(
        fx.stats.reads.load(Ordering::Relaxed),
        reads_cold,
        "passthrough reads never reach Tidepool"
    );
}

fn drop_caches(p: &Path) {
    // POSIX_FADV_DONTNEED on the FUSE file drops its pages from the page cache.
    use std::os::fd::AsRawFd;
    let f = fs::File::open(p).unwrap();
    // SAFETY: posix_fadvise(2) on a descriptor `f` owns for the whole call.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn after_a_reboot_opens_never_wait_for_a_whole_file_check() {
    let (lake, big) = sample_lake();
    let cache = tempfile::tempdir().unwrap();
    let mut fx = Fixture::mount(lake.clone(), cache, |c| c.boot = [1; 16]);
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    fx.unmount();
    let cache = std::mem::replace(&mut fx.cache, tempfile::tempdir().unwrap());
    drop(fx);
    // Another boot: every cached block must be checked before it is served again.
    let fx = Fixture::mount(lake, cache, |c| c.boot = [2; 16]);
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    assert_eq!(
        fx.stats.passthrough_opens.load(Ordering::Relaxed),
        0,
        "the first open did not read the whole file to check it (it used ordinary reads, checked block by block)"
    );
    // The whole-file check ran in the background: a later open is passthrough.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx.stats.passthrough_opens.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        drop_caches(&fx.path("big.bin"));
    }
    assert!(fx.stats.passthrough_opens.load(Ordering::Relaxed) > 0);
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
}

#[test]
fn every_kind_of_write_is_refused_with_erofs() {
    let (lake, _) = sample_lake();
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    let erofs =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(
        fs::OpenOptions::new()
            .write(true)
            .open(fx.path("small.txt"))
            .map(|_| ()),
    );
    erofs(fs::File::create(fx.path("new.txt")).map(|_| ()));
    erofs(fs::create_dir(fx.path("newdir")));
    erofs(fs::remove_file(fx.path("small.txt")));
    erofs(fs::rename(fx.path("small.txt"), fx.path("moved.txt")));
    assert_eq!(
        fs::read_to_string(fx.path("small.txt")).unwrap(),
        "hello tidepool\n",
        "nothing was lost"
    );
    assert_eq!(
        &lake.content("ds/small.txt").unwrap()[..],
        b"hello tidepool\n"
    );
}

#[test]
fn a_blob_changed_in_the_lake_gives_eio_not_mixed_content() {
    let (lake, big) = sample_lake();
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    let f = fs::File::open(fx.path("big.bin")).unwrap();
    let mut first = vec![0u8; BLOCK as usize];
    f.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, big[..BLOCK as usize]);
    // Someone overwrites the blob in the lake after the snapshot was taken.
    lake.insert("ds/big.bin", pattern(999, big.len()));
    let mut later = vec![0u8; BLOCK as usize];
    // (Far enough from the first read that readahead has not fetched it.)
    let err = f.read_exact_at(&mut later, 9 * BLOCK).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // What was already cached is still the snapshot's version.
    f.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, big[..BLOCK as usize]);
}

#[test]
fn lake_faults_are_retried_and_a_dead_lake_fails_with_eio_in_bounded_time() {
    let (mem, big) = sample_lake();
    let faulty = Arc::new(FaultyLake::new(mem));
    let retry = RetryConfig {
        max_attempts: 4,
        attempt_timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(2),
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    };
    let lake: Arc<dyn Lake> = Arc::new(RetryingLake::new(faulty.clone(), retry));
    let fx = Fixture::mount(lake, tempfile::tempdir().unwrap(), |_| {});
    // Transient faults: the reader never notices.
    faulty.fail(Op::Get, Fault::Throttle, 2);
    faulty.fail(Op::Get, Fault::Reset, 1);
    faulty.fail(Op::Get, Fault::Truncate, 1);
    let mut buf = vec![0u8; 100];
    let f = fs::File::open(fx.path("big.bin")).unwrap();
    f.read_exact_at(&mut buf, 5).unwrap();
    assert_eq!(buf, big[5..105]);
    assert!(faulty.injected.load(Ordering::Relaxed) >= 4);
    // A lake that stops answering: EIO, within the deadline (plus scheduling slack).
    faulty.fail_always(Op::Get, Fault::Hang);
    let t = Instant::now();
    let err = f.read_exact_at(&mut buf, 9 * BLOCK).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "a dead lake must not hang a read ({:?})",
        t.elapsed()
    );
    // Healed: the same read works.
    faulty.heal();
    f.read_exact_at(&mut buf, 9 * BLOCK).unwrap();
    assert_eq!(buf, big[9 * BLOCK as usize..9 * BLOCK as usize + 100]);
}

#[test]
fn cache_survives_remount_and_is_reused() {
    let (lake, big) = sample_lake();
    let cache = tempfile::tempdir().unwrap();
    let cache_path = cache.path().to_owned();
    let mut fx = Fixture::mount(lake.clone(), cache, |_| {});
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    let mnt = fx.mnt.path().to_owned();
    fx.unmount();
    assert!(!is_mounted(&mnt), "nothing left mounted");
    let cache = std::mem::replace(&mut fx.cache, tempfile::tempdir().unwrap());
    drop(fx);
    assert!(cache_path.join("v1/FORMAT").exists());
    let before = lake.gets.load(Ordering::Relaxed);
    let fx = Fixture::mount(lake.clone(), cache, |_| {});
    assert_eq!(fs::read(fx.path("big.bin")).unwrap(), big);
    assert_eq!(
        lake.gets.load(Ordering::Relaxed),
        before,
        "warm cache: no GET after remount"
    );
}

#[test]
fn eviction_keeps_the_pool_under_its_size() {
    let lake = Arc::new(MemoryLake::new());
    for i in 0..40 {
        lake.insert(&format!("ds/f{i:02}"), pattern(i, 2 * BLOCK as usize));
    }
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |c| {
        c.capacity = 20 * BLOCK
    });
    for i in 0..40 {
        assert_eq!(
            fs::read(fx.path(&format!("f{i:02}"))).unwrap(),
            pattern(i, 2 * BLOCK as usize)
        );
    }
    let pool = fx.ds.as_ref().unwrap().pool().clone();
    pool.evict_now().unwrap();
    assert!(
        pool.used() <= 18 * BLOCK,
        "used {} over the high watermark",
        pool.used()
    );
    let on_disk: u64 = walk(&fx.cache.path().join("v1/blobs"))
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        on_disk <= 20 * BLOCK,
        "{on_disk} bytes of data files on disk"
    );
    // Evicted files read again correctly.
    assert_eq!(
        fs::read(fx.path("f00")).unwrap(),
        pattern(0, 2 * BLOCK as usize)
    );
}

fn walk(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out.into_iter()
}

fn small_files_lake(n: u64) -> Arc<MemoryLake> {
    let lake = Arc::new(MemoryLake::new());
    for i in 0..n {
        lake.insert(&format!("ds/imgs/{i:04}.jpg"), pattern(500 + i, 1000));
    }
    lake
}

/// Waits (bounded) until the lake has served at least `bytes` in all.
fn served_at_least(lake: &MemoryLake, bytes: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lake.bytes_served.load(Ordering::Relaxed) < bytes && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    lake.bytes_served.load(Ordering::Relaxed)
}

#[test]
fn a_walk_in_listing_order_gets_the_next_small_files_fetched_ahead_either_way() {
    use tidepool_csi::cache::dataset::WALK_AHEAD;
    let lake = small_files_lake(200);
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    // Forwards: three files in listing order...
    for i in 0..3 {
        assert_eq!(
            fs::read(fx.path(&format!("imgs/{i:04}.jpg"))).unwrap(),
            pattern(500 + i, 1000)
        );
    }
    // ...and the next ones are on their way before anyone opens them (the walk is
    // seen at the second open; the third file was already fetched ahead).
    let ahead = WALK_AHEAD as u64;
    let got = served_at_least(&lake, (2 + ahead) * 1000);
    assert!(
        got >= (2 + ahead) * 1000,
        "forward walk: next files prefetched ({got} bytes served)"
    );
    // Backwards from the end (a walk that pops a stack).
    let before = lake.bytes_served.load(Ordering::Relaxed);
    for i in (196..200).rev() {
        assert_eq!(
            fs::read(fx.path(&format!("imgs/{i:04}.jpg"))).unwrap(),
            pattern(500 + i, 1000)
        );
    }
    let got = served_at_least(&lake, before + (2 + ahead) * 1000) - before;
    assert!(
        got >= (2 + ahead) * 1000,
        "backward walk: previous files prefetched ({got} bytes served)"
    );
    // The walk goes on to the start: every file reads back exactly, and however much
    // was fetched ahead, no file was fetched twice.
    for i in (0..196).rev() {
        assert_eq!(
            fs::read(fx.path(&format!("imgs/{i:04}.jpg"))).unwrap(),
            pattern(500 + i, 1000)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lake.bytes_served.load(Ordering::Relaxed), 200 * 1000);
}

#[test]
fn random_opens_fetch_only_what_is_read() {
    let lake = small_files_lake(2000);
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    // Far apart, in no order: no walk to follow.
    let picks = [1500u64, 20, 1900, 700, 1200, 90, 1650, 400];
    for &i in &picks {
        assert_eq!(
            fs::read(fx.path(&format!("imgs/{i:04}.jpg"))).unwrap(),
            pattern(500 + i, 1000)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        lake.bytes_served.load(Ordering::Relaxed),
        picks.len() as u64 * 1000,
        "nothing fetched that was not read"
    );
}

fn snapshot_files(cache: &Path) -> usize {
    walk(&cache.join("v1/datasets"))
        .filter(|p| p.extension().is_some_and(|e| e == "redb"))
        .count()
}

/// Asks the kernel to drop unused dentries and inodes (it then sends FORGETs).
fn drop_dentries() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

#[test]
fn a_replaced_snapshot_is_released_once_the_kernel_forgot_it() {
    let lake = Arc::new(MemoryLake::new());
    lake.insert("ds/a.txt", "version one");
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    let ds = fx.ds.clone().unwrap();
    let open = fs::File::open(fx.path("a.txt")).unwrap();
    let read_open = || {
        let mut buf = [0u8; 64];
        let n = open.read_at(&mut buf, 0).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    assert_eq!(read_open(), "version one");
    lake.insert("ds/a.txt", "version two!");
    assert!(fx.rt.block_on(ds.refresh()).unwrap().is_some());
    // The open file still needs the old snapshot: kept, whatever the kernel drops.
    drop_dentries();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ds.open_snapshots(), 2);
    assert_eq!(snapshot_files(fx.cache.path()), 2);
    assert_eq!(read_open(), "version one", "an open file keeps its version");
    // Closed and forgotten by the kernel: released, file and all.
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ds.open_snapshots() > 1 && Instant::now() < deadline {
        drop_dentries();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ds.open_snapshots(), 1, "only the current snapshot is kept");
    assert_eq!(
        snapshot_files(fx.cache.path()),
        1,
        "the replaced snapshot's file is deleted"
    );
    assert_eq!(
        fs::read_to_string(fx.path("a.txt")).unwrap(),
        "version two!"
    );
    // Refresh after refresh, the mount keeps one snapshot on disk once the kernel
    // lets go of the old ones.
    for v in ["three", "four", "five"] {
        lake.insert("ds/a.txt", format!("version {v}"));
        assert!(fx.rt.block_on(ds.refresh()).unwrap().is_some());
        drop_dentries(); // instead of waiting out the entry TTL
        assert_eq!(
            fs::read_to_string(fx.path("a.txt")).unwrap(),
            format!("version {v}")
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshot_files(fx.cache.path()) > 1 && Instant::now() < deadline {
        drop_dentries();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (ds.open_snapshots(), snapshot_files(fx.cache.path())),
        (1, 1)
    );
}

#[test]
fn a_refresh_lets_the_kernel_drop_the_replaced_snapshot_without_memory_pressure() {
    let lake = Arc::new(MemoryLake::new());
    lake.insert("ds/a.txt", "version one");
    lake.insert("ds/d/e/b.txt", "deep");
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |_| {});
    let ds = fx.ds.clone().unwrap();
    let releaser = fx.mount.as_ref().unwrap().snapshot_releaser();
    // The kernel learns inodes at every level, and one file stays open.
    assert_eq!(fs::read_to_string(fx.path("d/e/b.txt")).unwrap(), "deep");
    let open = fs::File::open(fx.path("a.txt")).unwrap();
    // Its bytes are cached before the lake changes (the fetch at open is
    // asynchronous; one finishing after the change would rightly refuse to mix
    // versions, with EIO).
    let mut buf = [0u8; 32];
    let n = open.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"version one");
    lake.insert("ds/a.txt", "version two!");
    let old = fx.rt.block_on(ds.refresh()).unwrap().expect("changed");
    releaser.forget_snapshot(&old);
    drop(old);
    let n = open.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"version one", "an open file keeps its version");
    assert_eq!(
        fs::read_to_string(fx.path("a.txt")).unwrap(),
        "version two!",
        "a new open sees the new snapshot at once (no waiting out the entry TTL)"
    );
    assert_eq!(
        ds.open_snapshots(),
        2,
        "the open file holds the old snapshot"
    );
    drop(open);
    // No drop_caches here: the kernel lets go by itself once the file is closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ds.open_snapshots() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ds.open_snapshots(), 1, "the replaced snapshot was released");
    assert_eq!(snapshot_files(fx.cache.path()), 1, "and its file deleted");
    assert_eq!(fs::read_to_string(fx.path("d/e/b.txt")).unwrap(), "deep");
}

#[test]
fn open_files_overflowing_the_pool_shed_blocks_but_never_under_a_passthrough_reader() {
    let lake = Arc::new(MemoryLake::new());
    // `a` is the larger, so it is the evictor's first choice were it not pinned.
    let (a, b) = (
        pattern(71, 16 * BLOCK as usize),
        pattern(72, 12 * BLOCK as usize),
    );
    lake.insert("ds/a.bin", a.clone());
    lake.insert("ds/b.bin", b.clone());
    let fx = Fixture::mount(lake.clone(), tempfile::tempdir().unwrap(), |c| {
        c.capacity = 20 * BLOCK
    });
    let pool = fx.ds.as_ref().unwrap().pool().clone();
    assert_eq!(fs::read(fx.path("a.bin")).unwrap(), a);
    // Opened again, fully cached: the kernel reads it directly.
    let pt_before = fx.stats.passthrough_opens.load(Ordering::Relaxed);
    let fa = fs::File::open(fx.path("a.bin")).unwrap();
    assert_eq!(
        fx.stats.passthrough_opens.load(Ordering::Relaxed),
        pt_before + 1
    );
    // A second open file pushes the pool over: only its own blocks can go.
    let fb = fs::File::open(fx.path("b.bin")).unwrap();
    let mut got = vec![0u8; b.len()];
    fb.read_exact_at(&mut got, 0).unwrap();
    assert!(got == b);
    pool.evict_now().unwrap();
    assert!(pool.used() <= 18 * BLOCK, "{} bytes used", pool.used());
    let mut got = vec![0u8; a.len()];
    fa.read_exact_at(&mut got, 0).unwrap();
    assert!(got == a, "the passthrough reader's file is whole");
    let mut got = vec![0u8; b.len()];
    fb.read_exact_at(&mut got, 0).unwrap();
    assert!(got == b, "shed blocks of the other are fetched again");
}

/// Two ranks on one node, one an epoch behind the other in time: the second reads the
/// same cold file while the first one's fetches are still in flight. Both read every
/// byte exact, and the lake serves each byte once: the second reader waits for the
/// blocks being fetched, never fetches them again.
#[test]
fn a_second_reader_of_a_file_being_fetched_gets_the_same_fetch() {
    let mem = Arc::new(MemoryLake::new());
    let big = pattern(5, (24 * BLOCK + 999) as usize);
    mem.insert("ds/big.bin", big.clone());
    let faulty = Arc::new(FaultyLake::new(mem.clone()));
    // A far lake: every GET takes a while, so the two readers overlap.
    faulty.set_latency(Op::Get, Duration::from_millis(100));
    let fx = Fixture::mount(faulty, tempfile::tempdir().unwrap(), |_| {});
    let readers: Vec<_> = [0u64, 50]
        .into_iter()
        .map(|delay| {
            let path = fx.path("big.bin");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                let f = fs::File::open(&path).unwrap();
                let mut out = Vec::new();
                let mut buf = vec![0u8; 128 * 1024];
                loop {
                    let n = f.read_at(&mut buf, out.len() as u64).unwrap();
                    if n == 0 {
                        return out;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            })
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == big, "every byte exact");
    }
    assert_eq!(
        mem.bytes_served.load(Ordering::Relaxed),
        big.len() as u64,
        "each byte fetched from the lake once"
    );
}

/// A dataset is served while it is being listed: a file the listing has passed reads
/// exact at once; a name it has not reached waits for it (off the worker thread: the
/// mount has one, and it answers other requests meanwhile) and then gets the answer the
/// complete listing gives, including a file the listing later finds shadowed by a
/// directory of its name; `ls` is never shown a partial directory as whole.
#[test]
fn a_dataset_is_served_while_it_is_listed_and_every_answer_is_the_final_one() {
    served_while_listed(false);
}

/// The same through io_uring, where a waiting request holds one of its CPU's ring
/// entries (not its thread) and is answered through the queue's mailbox.
#[test]
fn a_dataset_is_served_while_it_is_listed_through_io_uring() {
    let Some(_uring) = tidepool_csi::testing::FuseUring::enable_for(
        "a_dataset_is_served_while_it_is_listed_through_io_uring",
    ) else {
        return;
    };
    served_while_listed(true);
}

fn served_while_listed(io_uring: bool) {
    let mem = Arc::new(MemoryLake::new());
    let early = pattern(3, 100_000);
    mem.insert("ds/a/early.bin", early.clone());
    for i in 0..20 {
        mem.insert(&format!("ds/a/f{i:02}"), vec![i as u8; 10]);
    }
    mem.insert("ds/b.txt", b"b".to_vec());
    // `m` is a file and a directory: the directory is what the mount shows.
    mem.insert("ds/m", b"shadowed".to_vec());
    mem.insert("ds/m/inner", b"inner".to_vec());
    let late = pattern(4, 50_000);
    mem.insert("ds/z/late.bin", late.clone());
    let lake = Arc::new(FaultyLake::new(mem.clone()));
    // The listing (sequential, 11 names a page) gets its first two pages (a/... and
    // b.txt), then waits until the test lets it go on.
    lake.fail_after(Op::List, 2, Fault::Hold, None);
    let mut config = mount_config(true, 1, "tidepool-test");
    config.io_uring = io_uring;
    let fx = Fixture::mount_opened(
        lake.clone(),
        tempfile::tempdir().unwrap(),
        |c| {
            c.listing = tidepool_csi::lake::parallel::ListOptions {
                page_size: 11,
                ..tidepool_csi::lake::parallel::ListOptions::sequential()
            }
        },
        config,
        true,
    );
    let ds = fx.ds.clone().unwrap();
    let snap = ds.current().1;
    fx.rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(60), snap.wait_past("b.txt")).await
        })
        .expect("the first pages are served within a minute")
        .expect("the first pages are listed");
    assert!(!snap.complete(), "the listing is held");
    // Listed: reads exact, and a name in a finished directory is known to be missing.
    assert_eq!(fs::read(fx.path("a/early.bin")).unwrap(), early);
    assert_eq!(
        fs::metadata(fx.path("a/nothing")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    // Not listed yet: waits (on the runtime, not the one worker thread).
    let waiting: Vec<_> = ["z/late.bin", "m", "m/inner"]
        .into_iter()
        .map(|p| {
            let path = fx.path(p);
            std::thread::spawn(move || fs::metadata(path).map(|m| (m.is_dir(), m.len())))
        })
        .collect();
    let root_ls = {
        let path = fx.path("");
        std::thread::spawn(move || {
            let mut v: Vec<String> = fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The one worker thread still answers what is listed.
    assert_eq!(fs::read(fx.path("a/f07")).unwrap(), vec![7u8; 10]);
    let names: usize = fs::read_dir(fx.path("a")).unwrap().count();
    assert_eq!(names, 21, "directory a is listed whole");
    assert!(
        waiting.iter().all(|t| !t.is_finished()) && !root_ls.is_finished(),
        "names the listing has not reached wait for it"
    );
    assert!(!snap.complete());
    lake.heal();
    let got: Vec<_> = waiting
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert_eq!(got, [(false, 50_000), (true, 0), (false, 5)]);
    assert_eq!(root_ls.join().unwrap(), ["a", "b.txt", "m", "z"]);
    assert_eq!(fs::read(fx.path("z/late.bin")).unwrap(), late);
    assert_eq!(fs::read(fx.path("m/inner")).unwrap(), b"inner");
    assert!(snap.complete());
    assert_eq!(
        snap.summary().objects,
        24,
        "the shadowed file is not counted"
    );
    if io_uring {
        assert!(
            fx.mount.as_ref().unwrap().connection().io_uring_requests() > 0,
            "served through io_uring"
        );
    }
}
