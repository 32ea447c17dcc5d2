//! `make demo`: the main job end to end on the embedded default.
//!
//! Starts Azurite on 127.0.0.1, uploads a generated dataset (a few hundred small files
//! and some large ones, checksummed as they are generated), mounts it with the real
//! `tidepool mount` binary (a real FUSE mount), reads everything through the mount and
//! verifies every checksum, reads it again warm, then stops the mount with SIGTERM and
//! checks that nothing is left mounted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::testing::Azurite;

const SMALL_FILES: u64 = 280;
const LARGE_FILES: u64 = 16;
const LARGE_SIZE: u64 = 24 << 20;
const UPLOAD_BLOCK: u64 = 8 << 20;

fn bytes_for(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    // Deterministic, position-dependent content: a misplaced block changes the checksum.
    let mut out = Vec::with_capacity(len);
    let mut x = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (offset / 8)).wrapping_add(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn tidepool_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TIDEPOOL_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("tidepool")
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

fn read_tree(root: &Path, expect: &BTreeMap<String, (u64, u32)>) -> (u64, Duration) {
    let started = Instant::now();
    let mut total = 0;
    let mut seen = 0;
    let mut stack = vec![root.to_owned()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readdir through the mount") {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let mut f = std::fs::File::open(&p).unwrap();
            let mut crc = 0u32;
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                len += n as u64;
            }
            let want = expect
                .get(&rel)
                .unwrap_or_else(|| panic!("unexpected file {rel} in the mount"));
            assert_eq!(
                (len, crc),
                *want,
                "{rel}: content differs from what was uploaded"
            );
            total += len;
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        expect.len(),
        "every uploaded file is visible in the mount"
    );
    (total, started.elapsed())
}

fn drop_page_cache() {
    // Make the warm pass read the NVMe cache, not the kernel's page cache of the mount.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[tokio::main]
async fn main() {
    let t0 = Instant::now();
    println!("== 1/5 starting Azurite (local Azure Blob emulator) on 127.0.0.1");
    let azurite = Azurite::start();
    azurite.create_container("datasets").await;
    let lake = azurite.lake("datasets").await;

    println!(
        "== 2/5 uploading a generated dataset: {SMALL_FILES} small files + {LARGE_FILES} x {} MiB",
        LARGE_SIZE >> 20
    );
    let mut expect = BTreeMap::new();
    let upload_started = Instant::now();
    let mut uploaded = 0u64;
    for i in 0..SMALL_FILES {
        let size = 2_000 + (i * 7_919) % 250_000;
        let data = bytes_for(i, 0, size as usize);
        let name = format!("imagenet-mini/train/class-{:02}/img-{i:04}.jpg", i % 10);
        expect.insert(
            name["imagenet-mini/".len()..].to_owned(),
            (size, crc32c::crc32c(&data)),
        );
        lake.put(&name, Bytes::from(data), &Default::default())
            .await
            .expect("put");
        uploaded += size;
    }
    for i in 0..LARGE_FILES {
        let name = format!("imagenet-mini/shards/shard-{i:03}.tar");
        let mut ids = Vec::new();
        let mut crc = 0u32;
        let mut off = 0;
        while off < LARGE_SIZE {
            let n = UPLOAD_BLOCK.min(LARGE_SIZE - off);
            let data = bytes_for(1000 + i, off, n as usize);
            crc = crc32c::crc32c_append(crc, &data);
            let id = BlockId::numbered("demo", ids.len() as u32);
            lake.put_block(&name, &id, Bytes::from(data), None)
                .await
                .expect("put block");
            ids.push(id);
            off += n;
        }
        lake.put_block_list(&name, &ids, None)
            .await
            .expect("put block list");
        expect.insert(name["imagenet-mini/".len()..].to_owned(), (LARGE_SIZE, crc));
        uploaded += LARGE_SIZE;
    }
    println!(
        "   {} files, {:.0} MiB in {:.1}s",
        expect.len(),
        uploaded as f64 / (1 << 20) as f64,
        upload_started.elapsed().as_secs_f64()
    );

    let work = tempfile::tempdir().expect("tempdir");
    let mnt = work.path().join("mnt");
    let cache = work.path().join("cache");
    std::fs::create_dir_all(&mnt).unwrap();
    let url = azurite.url("datasets", "imagenet-mini");
    println!("== 3/5 tidepool mount {url} {}", mnt.display());
    let mut child = Command::new(tidepool_bin())
        .args(["mount", &url])
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(&cache)
        .args(["--cache-size", "4GiB"])
        .env(
            "AZURE_STORAGE_KEY",
            tidepool_csi::testing::azurite::ACCOUNT_KEY,
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the tidepool binary (cargo build --release first)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("tidepool printed nothing").unwrap();
    println!("   {ready}");
    assert!(ready.contains("mounted"), "mount did not come up: {ready}");

    println!("== 4/5 reading every file through the mount and verifying checksums");
    drop_page_cache();
    let (bytes, cold) = read_tree(&mnt, &expect);
    println!(
        "   cold (from the lake): {:.0} MiB in {:.2}s = {:.0} MiB/s",
        bytes as f64 / (1 << 20) as f64,
        cold.as_secs_f64(),
        mib_s(bytes, cold)
    );
    drop_page_cache();
    let (bytes, warm) = read_tree(&mnt, &expect);
    println!(
        "   warm (from local NVMe cache): {:.0} MiB in {:.2}s = {:.0} MiB/s ({:.1}x cold)",
        bytes as f64 / (1 << 20) as f64,
        warm.as_secs_f64(),
        mib_s(bytes, warm),
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    println!("   all {} checksums match", expect.len());

    println!("== 5/5 stopping the mount (SIGTERM) and cleaning up");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    for l in lines.map_while(Result::ok) {
        println!("   {l}");
    }
    assert!(status.success(), "tidepool exited with {status}");
    let still = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&mnt.to_string_lossy().into_owned());
    assert!(!still, "nothing may be left mounted");
    drop(azurite);
    println!(
        "demo OK in {:.1}s: every byte read through the mount matched the lake; nothing left mounted",
        t0.elapsed().as_secs_f64()
    );
}
