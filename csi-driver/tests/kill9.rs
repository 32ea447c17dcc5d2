//! The real `tidepool mount` binary against Azurite: a mount killed with `kill -9` in the
//! middle of a read leaves a cache the next mount reuses without ever serving a block
//! that was not completely written, and SIGTERM leaves nothing mounted.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use tidepool_csi::lake::{BlockId, Lake};
use tidepool_csi::mounts::{is_mounted, unmount_path};
use tidepool_csi::testing::{Azurite, MountProcess, pattern, within};

/// Whether `path` leaves the mount table within `limit`.
fn unmounted_within(path: &Path, limit: Duration) -> bool {
    within(limit, || (!is_mounted(path).unwrap()).then_some(())).is_some()
}

fn mount(url: &str, mnt: &Path, cache: &Path) -> MountProcess {
    MountProcess::start(
        Path::new(env!("CARGO_BIN_EXE_tidepool")),
        url,
        mnt,
        cache,
        &[],
    )
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
    first.signal(libc::SIGKILL);
    first.wait();
    reader.join().unwrap();
    // The dead mount stays in the table ("transport endpoint is not connected").
    let canon = mnt.canonicalize().unwrap_or(mnt.clone());
    if is_mounted(&canon).unwrap() {
        unmount_path(&canon).unwrap();
    }
    assert!(cache.join("v1/blobs").exists(), "the cache pool survived");

    let mut second = mount(&url, &mnt, &cache);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "after kill -9 and remount every byte matches the lake"
    );
    second.signal(libc::SIGTERM);
    let status = second.wait();
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(
        !is_mounted(&canon).unwrap(),
        "nothing left mounted after SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_file_open_detaches_the_mount_and_keeps_serving_it_until_closed() {
    let azurite = Azurite::start();
    azurite.create_container("data").await;
    let lake = azurite.lake("data").await;
    let data = pattern(9, 9 << 20);
    lake.put(
        "ds/open.bin",
        Bytes::from(data.clone()),
        &Default::default(),
    )
    .await
    .unwrap();
    let url = azurite.url("data", "ds");
    let work = tempfile::tempdir().unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("cache"));
    std::fs::create_dir_all(&mnt).unwrap();
    let canon = mnt.canonicalize().unwrap();

    let mut child = mount(&url, &mnt, &cache);
    let mut f = std::fs::File::open(mnt.join("open.bin")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    f.read_exact(&mut head).unwrap();
    child.signal(libc::SIGTERM);
    // Gone from the mount table at once, while the process stays to serve the open file.
    assert!(
        unmounted_within(&canon, Duration::from_secs(5)),
        "the busy mount was not detached after SIGTERM"
    );
    assert!(
        child.is_running(),
        "tidepool exited while a file of its mount was still open"
    );
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    head.extend_from_slice(&rest);
    assert!(
        head == data,
        "the open file reads every byte after the detach"
    );
    drop(f);
    // The last close ends the session: a clean exit.
    let status = child
        .exit_within(Duration::from_secs(5))
        .expect("tidepool did not exit after the last open file was closed");
    assert!(status.success(), "clean exit: {status}");

    // A second signal stops at once, even with a file open.
    let mut child = mount(&url, &mnt, &cache);
    let f = std::fs::File::open(mnt.join("open.bin")).unwrap();
    child.signal(libc::SIGTERM);
    assert!(
        unmounted_within(&canon, Duration::from_secs(5)),
        "the busy mount was not detached after the first SIGTERM"
    );
    std::thread::sleep(Duration::from_millis(200));
    child.signal(libc::SIGTERM);
    let status = child
        .exit_within(Duration::from_secs(5))
        .expect("a second SIGTERM did not stop tidepool");
    assert!(
        !status.success(),
        "stopping with files open is reported: {status}"
    );
    assert!(!is_mounted(&canon).unwrap(), "nothing left mounted");
    drop(f);
}
