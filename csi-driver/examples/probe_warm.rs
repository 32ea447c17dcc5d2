// Throwaway experiment (not committed): first warm pass after a cold read.
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::{Azurite, pattern};

fn drop_caches() {
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

fn read_all(p: &Path) -> f64 {
    let t = Instant::now();
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    t.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let bin = std::env::var("TIDEPOOL_BIN").unwrap();
    let extra: Vec<String> = std::env::var("MOUNT_ARGS").unwrap_or_default().split_whitespace().map(String::from).collect();
    let work = tempfile::tempdir_in("/work/main/target").unwrap();
    let az = Azurite::start();
    let lake = az.lake("bench").await;
    let mut ids = vec![];
    let local = work.path().join("local.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&local).unwrap();
        for i in 0..128u32 { f.write_all(&pattern(i as u64, 8 << 20)).unwrap(); }
    }
    for i in 0..128u32 {
        let id = BlockId::numbered("b", i);
        lake.put_block("ds/big.bin", &id, Bytes::from(pattern(i as u64, 8 << 20)), None).await.unwrap();
        ids.push(id);
    }
    lake.put_block_list("ds/big.bin", &ids, None).await.unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut child = Command::new(&bin)
        .args(["mount", &az.url("bench", "ds")])
        .arg(&mnt)
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .args(["--cache-size", "8GiB", "--log", "info"])
        .args(&extra)
        .env("AZURE_STORAGE_KEY", ACCOUNT_KEY)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let pid = child.id();
    drop_caches();
    eprintln!("cold {:.2}", read_all(&mnt.join("big.bin")));
    let strace = if std::env::var("STRACE").is_ok() {
        Some(Command::new("strace").args(["-f", "-tt", "-e", "trace=ioctl,openat,pread64", "-o", "/tmp/probe/strace.out", "-p", &pid.to_string()]).spawn().unwrap())
    } else { None };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let order = std::env::var("ORDER").unwrap_or("lw".into());
    for i in 0..3 {
        for c in order.chars() {
            drop_caches();
            if c == 'l' { eprintln!("local {i} {:.2}", read_all(&local)); }
            else { eprintln!("warm {i} {:.2}", read_all(&mnt.join("big.bin"))); }
        }
    }
    if let Some(mut s) = strace { unsafe { libc::kill(s.id() as i32, libc::SIGINT) }; let _ = s.wait(); }
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
}
