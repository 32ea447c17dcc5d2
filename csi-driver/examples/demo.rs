//! `make demo`: the main job end to end on the embedded default.
//!
//! Starts Azurite on 127.0.0.1, uploads a generated dataset (a few hundred small files
//! and some large ones, checksummed as they are generated), mounts it with the real
//! `tidepool mount` binary (a real FUSE mount), reads everything through the mount and
//! verifies every checksum, reads it again warm, then stops the mount with SIGTERM and
//! checks that nothing is left mounted. Then the checkpoint half: `tidepool mount
//! --checkpoint` (read-write), three steps written the way PyTorch DCP writes them
//! (rank shards, then `.metadata` renamed into place), `tidepool sync status` until they
//! are durable, `tidepool restore` of the latest into an empty directory, every file
//! compared with what was written, and a clean stop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
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
    println!("== 1/7 starting Azurite (local Azure Blob emulator) on 127.0.0.1");
    let azurite = Azurite::start();
    azurite.create_container("datasets").await;
    let lake = azurite.lake("datasets").await;

    println!(
        "== 2/7 uploading a generated dataset: {SMALL_FILES} small files + {LARGE_FILES} x {} MiB",
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
    println!("== 3/7 tidepool mount {url} {}", mnt.display());
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

    println!("== 4/7 reading every file through the mount and verifying checksums");
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

    println!("== 5/7 stopping the mount (SIGTERM)");
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
    checkpoints(&azurite, work.path()).await;
    drop(azurite);
    println!(
        "demo OK in {:.1}s: every byte read through the mount matched the lake; three checkpoint steps durable and restored byte-exact; nothing left mounted",
        t0.elapsed().as_secs_f64()
    );
}

/// Runs `tidepool` with Azurite's key; returns stdout, panics with stderr on failure.
fn tidepool(args: &[&str]) -> String {
    let out = Command::new(tidepool_bin())
        .args(args)
        .env(
            "AZURE_STORAGE_KEY",
            tidepool_csi::testing::azurite::ACCOUNT_KEY,
        )
        .output()
        .expect("run the tidepool binary");
    assert!(
        out.status.success(),
        "tidepool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Acts 6 and 7: a checkpoint volume, three steps written the way PyTorch DCP writes
/// them, the sync making them durable, and a restore of the latest, verified.
async fn checkpoints(azurite: &Azurite, work: &Path) {
    azurite.create_container("checkpoints").await;
    let url = azurite.url("checkpoints", "llama-8b/run-1");
    let (mnt, pool) = (work.join("ckpt"), work.join("ckpt-pool"));
    std::fs::create_dir_all(&mnt).unwrap();
    println!(
        "== 6/7 tidepool mount --checkpoint --nodes 1 {url} {} (read-write; committed steps upload to the lake; one machine writes each step)",
        mnt.display()
    );
    let mut child = Command::new(tidepool_bin())
        .args(["mount", "--checkpoint", &url])
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(&pool)
        .args(["--node-name", "demo-node", "--nodes", "1"])
        .env(
            "AZURE_STORAGE_KEY",
            tidepool_csi::testing::azurite::ACCOUNT_KEY,
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the tidepool binary");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("tidepool printed nothing").unwrap();
    println!("   {ready}");
    assert!(ready.contains("mounted"), "mount did not come up: {ready}");
    let mut written = BTreeMap::new();
    let started = Instant::now();
    let mut bytes = 0u64;
    for (n, step) in [100u64, 200, 300].iter().map(|n| (*n, format!("step-{n}"))) {
        let dir = mnt.join(&step);
        std::fs::create_dir_all(&dir).unwrap();
        // Each rank writes its shard; the coordinator writes .metadata last, through a
        // temporary name renamed into place: the commit marker.
        for rank in 0..2u64 {
            let data = bytes_for(10_000 + n * 10 + rank, 0, 48 << 20);
            let name = format!("__{rank}_0.distcp");
            let mut f = std::fs::File::create(dir.join(&name)).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
            written.insert(format!("{step}/{name}"), md5_hex(&data));
            bytes += data.len() as u64;
        }
        let meta = format!("{{\"step\": {n}, \"ranks\": 2}}");
        std::fs::write(dir.join(".metadata.tmp"), &meta).unwrap();
        std::fs::rename(dir.join(".metadata.tmp"), dir.join(".metadata")).unwrap();
        written.insert(format!("{step}/.metadata"), md5_hex(meta.as_bytes()));
    }
    println!(
        "   wrote 3 steps ({:.0} MiB) in {:.2}s; waiting for them to be durable:",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let pool_s = pool.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st: serde_json::Value = serde_json::from_str(
            tidepool(&["sync", "status", "--json", "--cache-dir", &pool_s])
                .lines()
                .next()
                .unwrap_or("null"),
        )
        .unwrap();
        if st["latest_durable"]["step"] == "step-300" && st["pending_bytes"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the steps did not become durable within 2 minutes: {st}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "   durable {:.2}s after the first write; `tidepool sync status`:",
        started.elapsed().as_secs_f64()
    );
    for l in tidepool(&["sync", "status", "--cache-dir", &pool_s]).lines() {
        println!("   | {l}");
    }
    let restored = work.join("restored");
    println!(
        "   tidepool restore {url} {} (the latest durable step, every file checked against the manifest's MD5)",
        restored.display()
    );
    print!(
        "   {}",
        tidepool(&["restore", &url, &restored.to_string_lossy()])
    );
    let mut checked = 0;
    for (path, md5) in written.iter().filter(|(p, _)| p.starts_with("step-300/")) {
        let got = std::fs::read(restored.join(path)).unwrap();
        assert_eq!(&md5_hex(&got), md5, "{path}: restored bytes differ");
        checked += 1;
    }
    println!("   all {checked} restored files match what the job wrote");

    println!("== 7/7 stopping the checkpoint mount (SIGTERM) and cleaning up");
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
}
