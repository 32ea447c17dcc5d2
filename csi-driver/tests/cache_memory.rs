//! What a cold read leaves in RAM: whole blocks go to the cache file with direct I/O
//! (no second copy of the dataset in the page cache), the reader is answered from the
//! blocks fetched for it, which are released once read, and a file system that refuses
//! direct I/O gets buffered writes with the same bytes.

use std::path::Path;
use std::sync::Arc;

use tidepool_csi::cache::dataset::Dataset;
use tidepool_csi::cache::{CacheConfig, CachePool};
use tidepool_csi::lake::memory::MemoryLake;
use tidepool_csi::lake::{Lake, LakeUrl};
use tidepool_csi::testing::pattern;

const BLOCK: u64 = CacheConfig::DEFAULT_BLOCK;

async fn open(cfg: CacheConfig, lake: &Arc<MemoryLake>) -> (CachePool, Dataset) {
    let pool = CachePool::open(cfg).await.unwrap();
    let url = LakeUrl::parse("http://127.0.0.1:10000/devstoreaccount1/lake/m").unwrap();
    let lake: Arc<dyn Lake> = lake.clone();
    let ds = Dataset::open(pool.clone(), url, lake, true, |_| {})
        .await
        .unwrap();
    (pool, ds)
}

/// Fraction of `path`'s pages that are in the page cache now (mincore(2)).
fn page_cache_fraction(path: &Path) -> f64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096usize;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of a file we opened, only passed to mincore
    // (never dereferenced), unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap {}", path.display());
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0, "mincore");
        libc::munmap(p, len);
    }
    vec.iter().filter(|v| **v & 1 == 1).count() as f64 / pages as f64
}

/// Reads the whole file sequentially in 1 MiB reads, as the kernel asks for it.
async fn read_all(
    ds: &Dataset,
    name: &str,
    want: &[u8],
) -> Arc<tidepool_csi::cache::blob::CachedBlob> {
    let (_, snap) = ds.current();
    let e = snap.lookup(1, name).unwrap().unwrap();
    let blob = ds.blob(&e).unwrap();
    let step = 1 << 20;
    let mut off = 0;
    while off < want.len() {
        let got = blob.read(off as u64, step).await.unwrap();
        let end = (off + step).min(want.len());
        assert!(got[..] == want[off..end], "bytes at {off} differ");
        off = end;
    }
    blob
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_read_keeps_one_copy_in_ram_and_releases_what_it_read() {
    let lake = Arc::new(MemoryLake::new());
    // Eight whole blocks and a tail that is not a multiple of a page.
    let want = pattern(1, (8 * BLOCK + 12_345) as usize);
    lake.insert("m/big.bin", want.clone());
    for direct in [true, false] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut cfg = CacheConfig::new(dir.path(), 1 << 30);
        cfg.direct_io = direct;
        let (pool, ds) = open(cfg, &lake).await;
        let blob = read_all(&ds, "big.bin", &want).await;
        assert_eq!(
            pool.read_buffer_bytes(),
            0,
            "blocks read to their end are released from memory"
        );
        assert!(blob.residency().is_complete(), "every block cached");
        // The whole-file Content-MD5 check reads the file back once, in the background,
        // and drops its pages after: measure once it is done.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !blob.md5_verified() && std::time::Instant::now() < end {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            blob.md5_verified(),
            "the copy was checked against the lake's MD5"
        );
        let cached = page_cache_fraction(&blob.data_path);
        if direct {
            assert!(
                pool.direct_io(),
                "direct I/O refused on {}: run the tests on ext4/xfs",
                dir.path().display()
            );
            assert!(
                cached < 0.05,
                "{:.0}% of the cache file is in the page cache after a cold read with direct I/O",
                cached * 100.0
            );
        } else {
            assert!(
                cached > 0.9,
                "buffered writes leave the file in the page cache ({:.0}% found): the check above could not fail",
                cached * 100.0
            );
        }
        // A second reader of the written copy gets the same bytes from disk.
        drop(blob);
        drop(ds);
        drop(pool);
        let mut cfg = CacheConfig::new(dir.path(), 1 << 30);
        cfg.direct_io = direct;
        let (_pool, ds) = open(cfg, &lake).await;
        let gets = lake.gets.load(std::sync::atomic::Ordering::Relaxed);
        read_all(&ds, "big.bin", &want).await;
        assert_eq!(
            lake.gets.load(std::sync::atomic::Ordering::Relaxed),
            gets,
            "served from the cache file, no GET"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_held_in_memory_stays_within_the_read_buffer() {
    let lake = Arc::new(MemoryLake::new());
    let want = pattern(2, (24 * BLOCK) as usize);
    lake.insert("m/big.bin", want.clone());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cfg = CacheConfig::new(dir.path(), 1 << 30);
    cfg.read_buffer = 3 * BLOCK;
    let (pool, ds) = open(cfg, &lake).await;
    let (_, snap) = ds.current();
    let e = snap.lookup(1, "big.bin").unwrap().unwrap();
    let blob = ds.blob(&e).unwrap();
    // Readahead of the whole file, far more than the buffer holds.
    blob.prefetch(0..24);
    for _ in 0..200 {
        assert!(
            pool.read_buffer_bytes() <= 3 * BLOCK,
            "{} bytes held, over the 3-block budget",
            pool.read_buffer_bytes()
        );
        if blob.residency().is_complete() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(blob.residency().is_complete());
    assert!(pool.read_buffer_bytes() <= 3 * BLOCK);
    // Held blocks and blocks dropped from memory (read from disk) give the same bytes,
    // also for reads that span two blocks.
    for off in [0, BLOCK - 100, 20 * BLOCK + 7, 23 * BLOCK] {
        let got = blob.read(off, (BLOCK + 200) as usize).await.unwrap();
        let end = ((off + BLOCK + 200) as usize).min(want.len());
        assert!(got[..] == want[off as usize..end], "bytes at {off} differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_system_without_direct_io_gets_buffered_writes() {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a ramfs needs root");
        return;
    }
    // ramfs has no O_DIRECT: the first whole-block write is refused, the pool falls
    // back for good and the bytes are the same.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mount -t ramfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            // Detached: the pool's background task may still hold a file there for
            // a moment, and a busy unmount would leave the ramfs behind.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.path());
    let lake = Arc::new(MemoryLake::new());
    let want = pattern(3, (3 * BLOCK + 5) as usize);
    lake.insert("m/big.bin", want.clone());
    let (pool, ds) = open(CacheConfig::new(dir.path(), 1 << 30), &lake).await;
    assert!(pool.direct_io(), "on until a write is refused");
    let blob = read_all(&ds, "big.bin", &want).await;
    assert!(!pool.direct_io(), "ramfs refused direct I/O: switched off");
    // ramfs reports no sizes (0 blocks, 0 free): that is no limit, not a full disk
    // (taken for one, the cache shed every block it fetched).
    assert_eq!(pool.disk_free(), None);
    assert!(blob.residency().is_complete());
    drop(blob);
    drop(ds);
    drop(pool);
}
