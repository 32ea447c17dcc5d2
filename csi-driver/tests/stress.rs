//! The real `tidepool mount` under the load a busy node puts on it: concurrent readers
//! of random whole files, a pool far smaller than the dataset (so eviction and block
//! shedding run all the time), passthrough on, `--refresh` on while a writer replaces
//! files and adds new ones in the lake, and every byte of every read checked.
//!
//! A read must return exactly one version of the file that the lake held at some point
//! (never zeros, never a mix), or fail with EIO when the file was overwritten in the lake
//! after the snapshot that the reader opened. Duration: `TIDEPOOL_STRESS_SECS` (default
//! 20 s in `make test`; `make soak` runs it for 10 minutes).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::mounts::is_mounted;
use tidepool_csi::testing::{Azurite, FuseUring, MountProcess, pattern};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// The dataset of the report: 200 files of four sizes, ~360 MiB, in a 96 MiB pool.
const SIZES: [usize; 4] = [4 * KIB, 300 * KIB, 2 * MIB, 5 * MIB];
const FILES: usize = 200;
const POOL: &str = "96MiB";
const READERS: usize = 8;

/// Every version of every file the lake has held: name → CRC32C of each version.
type Versions = Arc<Mutex<HashMap<String, HashSet<u32>>>>;

async fn upload(lake: &impl Lake, name: &str, data: &[u8]) {
    if data.len() <= 4 * MIB {
        lake.put(name, Bytes::copy_from_slice(data), &Default::default())
            .await
            .unwrap();
        return;
    }
    let mut ids = vec![];
    for (i, chunk) in data.chunks(4 * MIB).enumerate() {
        let id = BlockId::numbered("s", i as u32);
        lake.put_block(name, &id, Bytes::copy_from_slice(chunk), None)
            .await
            .unwrap();
        ids.push(id);
    }
    lake.put_block_list(name, &ids, None).await.unwrap();
}

fn secs() -> u64 {
    std::env::var("TIDEPOOL_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// What one reader saw.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    bytes: AtomicU64,
    eio_overwritten: AtomicU64,
    wrong: Mutex<Vec<String>>,
}

fn describe_wrong(name: &str, got: &[u8]) -> String {
    let zeros_from = got.iter().position(|&b| b == 0).unwrap_or(got.len());
    let all_zero = got.iter().all(|&b| b == 0);
    format!(
        "{name}: {} bytes read, CRC matches no version the lake ever held{}",
        got.len(),
        if all_zero {
            " (all zeros)".to_string()
        } else {
            format!(" (first zero byte at {zeros_from})")
        }
    )
}

fn reader(
    mnt: PathBuf,
    names: Arc<Mutex<Vec<String>>>,
    versions: Versions,
    overwritten: Arc<Mutex<HashSet<String>>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut x = seed | 1;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let name = {
            let n = names.lock().unwrap();
            n[(x % n.len() as u64) as usize].clone()
        };
        let path = mnt.join(&name);
        match std::fs::read(&path) {
            Ok(got) => {
                tally.reads.fetch_add(1, Ordering::Relaxed);
                tally.bytes.fetch_add(got.len() as u64, Ordering::Relaxed);
                let crc = crc32c::crc32c(&got);
                let known = versions
                    .lock()
                    .unwrap()
                    .get(&name)
                    .is_some_and(|v| v.contains(&crc));
                if !known {
                    tally
                        .wrong
                        .lock()
                        .unwrap()
                        .push(describe_wrong(&name, &got));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            // A new name the refresh has not picked up yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                // Allowed only for a file replaced in the lake after the snapshot the
                // reader opened (reads never mix versions; they fail instead).
                if overwritten.lock().unwrap().contains(&name) {
                    tally.eio_overwritten.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally
                        .wrong
                        .lock()
                        .unwrap()
                        .push(format!("{name}: EIO, but it was never changed in the lake"));
                    stop.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tally.wrong.lock().unwrap().push(format!("{name}: {e}"));
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Bytes the pool's data files occupy on disk (allocated, not apparent: files are
/// sparse).
fn pool_disk_bytes(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(subs) = std::fs::read_dir(cache.join("v1/blobs")) else {
        return 0;
    };
    for sub in subs.flatten() {
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(m) = f.metadata() {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_on_a_pool_far_smaller_than_the_data_never_see_a_wrong_byte() {
    stress(&["--no-io-uring"]).await;
}

/// The same load with every request but FORGET coming through FUSE over io_uring (one
/// queue per CPU; READs answered later from other threads through the queue's mailbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_through_fuse_over_io_uring() {
    let Some(_uring) = FuseUring::enable_for("the_same_through_fuse_over_io_uring") else {
        return;
    };
    stress(&[]).await;
}

/// Runs the load against `tidepool mount ... EXTRA`: through io_uring unless EXTRA says
/// `--no-io-uring`, and then the mount's log must show it served through io_uring.
async fn stress(extra: &[&str]) {
    let uring = !extra.contains(&"--no-io-uring");
    let azurite = Azurite::start();
    let lake = azurite.lake("data").await;
    let versions: Versions = Arc::default();
    let mut names = vec![];
    let mut total = 0;
    for i in 0..FILES {
        let len = SIZES[i % SIZES.len()];
        let name = format!("f{i:03}-{}k.bin", len / KIB);
        let data = pattern(i as u64 + 1, len);
        upload(&lake, &format!("ds/{name}"), &data).await;
        versions
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default()
            .insert(crc32c::crc32c(&data));
        names.push(name);
        total += len;
    }
    assert!(
        total > 3 * 96 * MIB,
        "the dataset is far larger than the pool"
    );

    let work = tempfile::tempdir().unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("cache"));
    std::fs::create_dir_all(&mnt).unwrap();
    // The pool's own log (evictions with its idea of usage), shown if the pool is
    // found over its size.
    let log = work.path().join("mount.log");
    let mut child = MountProcess::start_logged(
        Path::new(env!("CARGO_BIN_EXE_tidepool")),
        &azurite.url("data", "ds"),
        &mnt,
        &cache,
        &[
            "--cache-size",
            POOL,
            "--refresh",
            "2s",
            "--log",
            "warn,tidepool_csi::cache=info,tidepool_csi::fuse=info,tidepool_csi::fs=info",
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
        Some(&log),
    );
    let mnt = mnt.canonicalize().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let names = Arc::new(Mutex::new(names));
    let overwritten: Arc<Mutex<HashSet<String>>> = Arc::default();
    let readers: Vec<_> = (0..READERS)
        .map(|r| {
            let (mnt, names, versions, overwritten, stop, tally) = (
                mnt.clone(),
                names.clone(),
                versions.clone(),
                overwritten.clone(),
                stop.clone(),
                tally.clone(),
            );
            std::thread::spawn(move || {
                reader(
                    mnt,
                    names,
                    versions,
                    overwritten,
                    0x5eed + r as u64 * 7919,
                    stop,
                    tally,
                )
            })
        })
        .collect();

    // The writer: every 1.5 s replace one file with a new version and add a new one, so
    // that refreshes swap snapshots under the readers.
    let run = Duration::from_secs(secs());
    let start = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let mut peak_disk = 0;
    let mut peak_at = Duration::ZERO;
    let mut round = 0u64;
    while start.elapsed() < run && !stop.load(Ordering::Relaxed) {
        round += 1;
        let victim = names.lock().unwrap()[(round * 37 % FILES as u64) as usize].clone();
        let len = SIZES[(round % 3) as usize + 1];
        let data = pattern(1_000_000 + round, len);
        // Record the new version and the overwrite before the lake has it, so a reader
        // never sees a version the test does not know yet.
        overwritten.lock().unwrap().insert(victim.clone());
        versions
            .lock()
            .unwrap()
            .entry(victim.clone())
            .or_default()
            .insert(crc32c::crc32c(&data));
        upload(&lake, &format!("ds/{victim}"), &data).await;
        let new = format!("new-{round:04}.bin");
        let data = pattern(2_000_000 + round, SIZES[(round % 4) as usize]);
        versions
            .lock()
            .unwrap()
            .entry(new.clone())
            .or_default()
            .insert(crc32c::crc32c(&data));
        upload(&lake, &format!("ds/{new}"), &data).await;
        names.lock().unwrap().push(new);
        // Drop the page cache now and then, so reads reach the cache files again
        // instead of pages the kernel kept from an earlier, correct read.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
        for _ in 0..15 {
            let d = pool_disk_bytes(&cache);
            if d > peak_disk {
                peak_at = start.elapsed();
            }
            peak_disk = peak_disk.max(d);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let wrong = tally.wrong.lock().unwrap().clone();
    let reads = tally.reads.load(Ordering::Relaxed);
    eprintln!(
        "{reads} reads ({} MiB) in {:?}, {} EIO on files replaced in the lake, peak pool on disk {} MiB",
        tally.bytes.load(Ordering::Relaxed) >> 20,
        start.elapsed(),
        tally.eio_overwritten.load(Ordering::Relaxed),
        peak_disk >> 20
    );
    assert!(wrong.is_empty(), "wrong reads: {wrong:#?}");
    assert!(reads > 100, "the readers made progress ({reads} reads)");
    // The pool stays near its size: 96 MiB plus the files open right now (8 readers, at
    // most 5 MiB each) plus the blocks of residency maps and directories.
    if peak_disk >= (96 + 8 * 5 + 24) * MIB as u64 {
        // What the pool thought around the peak (its log has wall-clock times).
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let evictions: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("changed in the lake") && !l.contains("EIO"))
            .collect();
        panic!(
            "the pool outgrew its size: {} MiB on disk, {:?} into the run (started at {:?}); the pool's log (without lake-change lines):\n{}",
            peak_disk >> 20,
            peak_at,
            started_wall,
            evictions.join("\n")
        );
    }

    child.signal(libc::SIGTERM);
    let status = child.wait();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(!is_mounted(&mnt).unwrap(), "nothing left mounted");
    // How the requests came: the mount logs it when it ends.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let served = text
        .lines()
        .find(|l| l.contains("the mount served these requests"))
        .unwrap_or_else(|| panic!("the mount logged what it served:\n{text}"));
    let through: u64 = served
        .split("through_io_uring=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a through_io_uring count in {served:?}"));
    if uring {
        assert!(
            text.contains("serving FUSE requests through io_uring"),
            "the kernel offered io_uring and the mount took it:\n{text}"
        );
        assert!(
            through >= reads,
            "every open and read came through io_uring ({through} requests for {reads} reads): {served}"
        );
    } else {
        assert_eq!(through, 0, "--no-io-uring kept to /dev/fuse: {served}");
    }
}
