//! `make bench`: measures, side by side in one run, and writes `bench-report.json`:
//!
//! 1. warm sequential read of a 1 GiB file through the mount vs a direct read of the
//!    same bytes from a local file (target ≥ 0.95×);
//! 2. cold read of that file through the mount vs a plain parallel ranged download with
//!    the Azure SDK from the same Azurite (target ≥ 0.9×);
//! 3. a tree of 5,000 small files read warm through the mount vs the same tree read
//!    locally (target ≥ 0.7×).
//!
//! The page cache is dropped before every timed pass, so "warm" means the NVMe cache pool
//! and "local" means the same disk. Azurite stands in for the lake's REST surface, not
//! its speed: the cold numbers compare Tidepool with the SDK on equal footing only.
//! This is a report: it prints and records what it measures and never fails on a target.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::testing::{Azurite, pattern};
use tidepool_csi::testing::azurite::ACCOUNT_KEY;

const BIG: u64 = 1 << 30;
const PART: u64 = 8 << 20;
const SMALL_FILES: usize = 5000;

fn drop_page_cache() {
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("warning: cannot drop the page cache (not root?); warm numbers include it");
    }
}

/// Reads every file under `root` (1 MiB buffers); returns bytes and seconds.
fn read_tree(root: &Path) -> (u64, f64) {
    let t = Instant::now();
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let meta = std::fs::metadata(&d).unwrap();
        if meta.is_file() {
            let mut f = std::fs::File::open(&d).unwrap();
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            continue;
        }
        for e in std::fs::read_dir(&d).unwrap() {
            stack.push(e.unwrap().path());
        }
    }
    (total, t.elapsed().as_secs_f64())
}

fn mount(bin: &Path, url: &str, mnt: &Path, cache: &Path) -> Child {
    let mut child = Command::new(bin)
        .args(["mount", url])
        .arg(mnt)
        .arg("--cache-dir")
        .arg(cache)
        .args(["--cache-size", "8GiB"])
        .env("AZURE_STORAGE_KEY", ACCOUNT_KEY)
        .stdout(Stdio::piped())
        .spawn()
        .expect("tidepool binary");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("mounted"), "{line}");
    child
}

fn stop(mut child: Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Marks a phase boundary on stderr with CLOCK_MONOTONIC, so a profile taken with
/// `perf record -k CLOCK_MONOTONIC` can be cut to one phase (`perf report --time A,B`).
fn phase(name: &str) {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    eprintln!("bench: phase {name} at {}.{:06}", ts.tv_sec, ts.tv_nsec / 1000);
}

fn mbs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

#[tokio::main]
async fn main() {
    let bin: PathBuf = std::env::var("TIDEPOOL_BIN").map(PathBuf::from).unwrap_or_else(|_| {
        std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("tidepool")
    });
    let out = std::env::var("BENCH_REPORT").unwrap_or_else(|_| "bench-report.json".into());
    let work = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "target".into())).unwrap();
    let azurite = Azurite::start();
    azurite.create_container("bench").await;
    let lake = Arc::new(azurite.lake("bench").await);

    eprintln!("bench: uploading 1 GiB and {SMALL_FILES} small files to Azurite ...");
    let local = work.path().join("local");
    std::fs::create_dir_all(local.join("small")).unwrap();
    let mut ids = vec![];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(local.join("big.bin")).unwrap();
        for i in 0..BIG / PART {
            let data = pattern(i, PART as usize);
            f.write_all(&data).unwrap();
            let id = BlockId::numbered("bench", i as u32);
            lake.put_block("ds/big.bin", &id, Bytes::from(data), None).await.unwrap();
            ids.push(id);
        }
    }
    lake.put_block_list("ds/big.bin", &ids, None).await.unwrap();
    let etag = lake.head("ds/big.bin").await.unwrap().etag;
    futures::stream::iter(0..SMALL_FILES)
        .for_each_concurrent(16, |i| {
            let lake = lake.clone();
            let local = local.clone();
            async move {
                let size = 4096 + (i * 7919) % 60_000;
                let data = pattern(10_000 + i as u64, size);
                let rel = format!("small/d{:02}/f{i:05}.bin", i % 50);
                std::fs::create_dir_all(local.join(&rel).parent().unwrap()).unwrap();
                std::fs::write(local.join(&rel), &data).unwrap();
                lake.put(&format!("ds/{rel}"), Bytes::from(data)).await.unwrap();
            }
        })
        .await;

    // 2b. Plain parallel SDK download (16 ranges in flight), bytes discarded.
    drop_page_cache();
    phase("sdk-download");
    let t = Instant::now();
    let got: u64 = futures::stream::iter(0..BIG / PART)
        .map(|i| {
            let lake = lake.clone();
            let etag = etag.clone();
            async move { lake.get_range("ds/big.bin", i * PART..(i + 1) * PART, &etag).await.unwrap().len() as u64 }
        })
        .buffer_unordered(16)
        .fold(0, |a, n| async move { a + n })
        .await;
    let sdk_secs = t.elapsed().as_secs_f64();
    assert_eq!(got, BIG);

    let url = azurite.url("bench", "ds");
    let mnt = work.path().join("mnt");
    let cache = work.path().join("cache");
    std::fs::create_dir_all(&mnt).unwrap();
    let child = mount(&bin, &url, &mnt, &cache);
    // 2a. Cold through the mount.
    drop_page_cache();
    phase("cold");
    let (n, cold_secs) = read_tree(&mnt.join("big.bin"));
    assert_eq!(n, BIG);
    // Fill the small-file tree into the cache (untimed), then the warm passes.
    phase("small-fill");
    read_tree(&mnt.join("small"));
    drop_page_cache();
    phase("warm");
    let (_, warm_secs) = read_tree(&mnt.join("big.bin"));
    drop_page_cache();
    phase("local");
    let (_, local_secs) = read_tree(&local.join("big.bin"));
    drop_page_cache();
    phase("small-warm");
    let (small_bytes, small_warm_secs) = read_tree(&mnt.join("small"));
    drop_page_cache();
    phase("small-local");
    let (_, small_local_secs) = read_tree(&local.join("small"));
    phase("end");
    stop(child);

    let row = |name: &str, ours: f64, base: f64, bytes: u64, target: f64| {
        let ratio = base / ours;
        eprintln!(
            "{name:<28} tidepool {:>8.0} MB/s   baseline {:>8.0} MB/s   ratio {ratio:.2} (target >= {target})",
            mbs(bytes, ours),
            mbs(bytes, base)
        );
        serde_json::json!({
            "tidepool_mb_s": mbs(bytes, ours), "baseline_mb_s": mbs(bytes, base),
            "tidepool_secs": ours, "baseline_secs": base, "bytes": bytes,
            "ratio": ratio, "target": target, "meets_target": ratio >= target,
        })
    };
    let report = serde_json::json!({
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
        "warm_1gib_vs_local_read": row("warm 1 GiB vs local", warm_secs, local_secs, BIG, 0.95),
        "cold_1gib_vs_sdk_parallel_download": row("cold 1 GiB vs SDK download", cold_secs, sdk_secs, BIG, 0.9),
        "warm_5000_small_files_vs_local": row("warm 5000 small vs local", small_warm_secs, small_local_secs, small_bytes, 0.7),
        "notes": "page cache dropped before every timed pass; Azurite stands in for the lake's API, not its speed",
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    eprintln!("bench: report written to {out}");
}
