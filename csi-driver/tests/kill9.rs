//! The real `tidepool mount` binary against Azurite: a mount killed with `kill -9` in the
//! middle of a read leaves a cache the next mount reuses without ever serving a block
//! that was not completely written, and SIGTERM leaves nothing mounted.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tidepool_csi::fs::{is_mounted, unmount_path};
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::{Azurite, pattern};

fn mount(url: &str, mnt: &Path, cache: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["mount", url])
        .arg(mnt)
        .arg("--cache-dir")
        .arg(cache)
        .env("AZURE_STORAGE_KEY", ACCOUNT_KEY)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("mounted"), "mount did not come up: {line:?}");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_read_then_remount_reads_exact_bytes_and_sigterm_unmounts() {
    let azurite = Azurite::start();
    azurite.create_container("data").await;
    let lake = azurite.lake("data").await;
    let data = pattern(7, 48 << 20);
    let mut ids = vec![];
    for (i, chunk) in data.chunks(8 << 20).enumerate() {
        let id = BlockId::numbered("t", i as u32);
        lake.put_block("ds/model.bin", &id, Bytes::copy_from_slice(chunk), None)
            .await
            .unwrap();
        ids.push(id);
    }
    lake.put_block_list("ds/model.bin", &ids, None)
        .await
        .unwrap();
    let url = azurite.url("data", "ds");
    let work = tempfile::tempdir().unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("cache"));
    std::fs::create_dir_all(&mnt).unwrap();

    let mut first = mount(&url, &mnt, &cache);
    // Read part of the file, then kill -9 the mount while a reader is still going.
    let path = mnt.join("model.bin");
    let mut f = std::fs::File::open(&path).unwrap();
    let mut head = vec![0u8; 12 << 20];
    f.read_exact(&mut head).unwrap();
    assert_eq!(head, data[..12 << 20]);
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = f.read_to_end(&mut rest); // fails when the mount dies: that is the point
    });
    std::thread::sleep(Duration::from_millis(30));
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    reader.join().unwrap();
    // The dead mount stays in the table ("transport endpoint is not connected").
    let canon = mnt.canonicalize().unwrap_or(mnt.clone());
    if is_mounted(&canon) {
        unmount_path(&canon).unwrap();
    }
    assert!(cache.join("v1/blobs").exists(), "the cache pool survived");

    let mut second = mount(&url, &mnt, &cache);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "after kill -9 and remount every byte matches the lake"
    );
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let status = second.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(!is_mounted(&canon), "nothing left mounted after SIGTERM");
}
