//! The checkpoint volume under load (needs root and /dev/fuse): writer threads saving
//! steps the ways frameworks do (DCP: shards then `.metadata` renamed into place;
//! Orbax: a temporary directory renamed; rewrites at random offsets before the commit),
//! rotating old steps away as `save_total_limit` does, readers reading committed steps
//! back, and the sync uploading all the while, through real FUSE (passthrough) to
//! Azurite. At the end every step ever committed must be durable with exactly the bytes
//! written, including the steps the job deleted before they were uploaded (or before
//! the ticker committed them). Writers stay at most [`BACKLOG`] steps ahead of the lake:
//! the lake is one Azurite process on a shared machine, and what this test checks is
//! that no byte is lost, not how fast the upload goes (`make bench` measures that).
//! `TIDEPOOL_CKPT_STRESS_SECS` sets the length (default 10 s).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use md5::{Digest, Md5};
use tidepool_csi::checkpoint::commit::CommitRule;
use tidepool_csi::checkpoint::manifest::{Layout, read_manifest};
use tidepool_csi::checkpoint::restore::durable_steps;
use tidepool_csi::checkpoint::store::{Store, VolumeConfig, VolumeLayout};
use tidepool_csi::checkpoint::sync::{SyncConfig, Syncer};
use tidepool_csi::checkpoint::tree::{CheckpointTree, OpenWriters, TreeConfig};
use tidepool_csi::fs::{Mount, MountStats};
use tidepool_csi::fuse::{MountOptions, SessionConfig};
use tidepool_csi::lake::Lake;
use tidepool_csi::testing::{Azurite, pattern};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// xorshift, per thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Writes one file the way a framework might: in chunks, sometimes out of order, with
/// a pwrite over part of it before the final content; returns the final bytes' MD5.
fn write_file(path: &Path, seed: u64, rng: &mut Rng) -> String {
    let size = match rng.next(4) {
        0 => rng.next(4096) as usize,
        1 => 64 * 1024 + rng.next(1 << 20) as usize,
        _ => (1 << 20) + rng.next(6 << 20) as usize,
    };
    let data = pattern(seed, size);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    if rng.next(3) == 0 && size > 8192 {
        // Scribble first (a retry of a failed save), then the real content.
        f.write_all_at(&pattern(seed ^ 0xdead, size / 2), (size / 3) as u64)
            .unwrap();
        f.write_all_at(&data[size / 2..], (size / 2) as u64)
            .unwrap();
        f.write_all_at(&data[..size / 2], 0).unwrap();
        f.set_len(size as u64).unwrap();
    } else {
        for chunk in data.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
    }
    if rng.next(2) == 0 {
        f.sync_all().unwrap();
    }
    hex(&Md5::digest(&data))
}

type Expect = Arc<Mutex<BTreeMap<String, BTreeMap<String, String>>>>;

/// Steps written and not yet durable that the writers let pile up before they wait.
const BACKLOG: u64 = 32;

/// How long the lake may go without a new durable step before the test gives up.
const STALLED: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_rotation_readers_and_the_sync_together_lose_no_byte() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let secs: u64 = std::env::var("TIDEPOOL_CKPT_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let pool = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let url = az.url("ckpt", "stress");
    let layout = VolumeLayout::for_url(pool.path(), &url);
    layout
        .create(&VolumeConfig {
            url,
            node: "n1".into(),
            keep_local: Some(4),
            keep_remote: None,
            nodes: Some(1),
            owner_uid: None,
        })
        .unwrap();
    let store = Arc::new(Store::open(layout.clone(), CommitRule::default()).unwrap());
    let tree = Arc::new(
        CheckpointTree::new(&layout.tree(), TreeConfig::default(), store.clone()).unwrap(),
    );
    store.attach(Arc::downgrade(&tree) as std::sync::Weak<dyn OpenWriters>);
    let mount = Mount::serve(
        tree.clone(),
        Arc::new(MountStats::default()),
        mnt.path(),
        &MountOptions {
            fsname: "stress".into(),
            subtype: "tidepool".into(),
            read_only: false,
            allow_other: true,
            default_permissions: true,
        },
        SessionConfig::read_write(4, true),
    )
    .expect("mount (needs root and /dev/fuse)");
    let stop_ticker = Arc::new(AtomicBool::new(false));
    let ticker = store.spawn_ticker(Duration::from_millis(100), stop_ticker.clone());
    let syncer = Syncer::start(
        lake.clone(),
        layout.clone(),
        "stress/",
        SyncConfig::default(),
    )
    .await
    .unwrap();
    let (stop_sync, stop_rx) = tokio::sync::watch::channel(false);
    let sync_task = tokio::spawn(syncer.run(Some(store.clone()), stop_rx));

    let root: PathBuf = mnt.path().to_owned();
    let expect: Expect = Arc::default();
    let next_step = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let read_ok = Arc::new(AtomicU64::new(0));
    let names = Layout::new("stress/");
    // How many steps the lake holds durable, for the writers' backlog.
    let durable_now = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (lake, names, durable_now, stop) = (
            lake.clone(),
            names.clone(),
            durable_now.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(d) = durable_steps(&*lake, &names).await {
                    durable_now.store(d.len() as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut threads = Vec::new();
    for w in 0..3u64 {
        let (root, expect, next_step, stop, durable_now) = (
            root.clone(),
            expect.clone(),
            next_step.clone(),
            stop.clone(),
            durable_now.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9 + w * 7919);
            let mut mine: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let written = expect.lock().unwrap().len() as u64;
                if written > durable_now.load(Ordering::Relaxed) + BACKLOG {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let n = next_step.fetch_add(1, Ordering::Relaxed);
                let step = format!("step-{n}");
                let mut files = BTreeMap::new();
                let orbax = rng.next(2) == 0;
                let dir = if orbax {
                    root.join(format!("{step}.orbax-checkpoint-tmp-{n}"))
                } else {
                    root.join(&step)
                };
                fs::create_dir_all(dir.join("shards")).unwrap();
                for f in 0..(2 + rng.next(4)) {
                    let rel = if f % 2 == 0 {
                        format!("shards/__{f}_0.distcp")
                    } else {
                        format!("f{f}.bin")
                    };
                    let md5 = write_file(&dir.join(&rel), n * 100 + f, &mut rng);
                    files.insert(rel, md5);
                }
                if orbax {
                    fs::write(dir.join("commit_success.txt"), b"ok").unwrap();
                    files.insert("commit_success.txt".into(), hex(&Md5::digest(b"ok")));
                    fs::rename(&dir, root.join(&step)).unwrap();
                } else {
                    let meta = format!("{{\"step\": {n}}}");
                    fs::write(dir.join(".metadata.tmp"), &meta).unwrap();
                    fs::rename(dir.join(".metadata.tmp"), dir.join(".metadata")).unwrap();
                    files.insert(".metadata".into(), hex(&Md5::digest(meta.as_bytes())));
                }
                expect.lock().unwrap().insert(step.clone(), files);
                mine.push(step);
                // save_total_limit = 2: the job deletes its older steps, uploaded or not.
                while mine.len() > 2 {
                    let old = mine.remove(0);
                    fs::remove_dir_all(root.join(old)).unwrap();
                }
            }
        }));
    }
    for r in 0..2u64 {
        let (root, expect, stop, read_ok) =
            (root.clone(), expect.clone(), stop.clone(), read_ok.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x1234_5678 + r);
            while !stop.load(Ordering::Relaxed) {
                let pick = {
                    let e = expect.lock().unwrap();
                    if e.is_empty() {
                        None
                    } else {
                        let i = rng.next(e.len() as u64) as usize;
                        e.iter().nth(i).map(|(s, f)| (s.clone(), f.clone()))
                    }
                };
                let Some((step, files)) = pick else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                for (rel, md5) in files {
                    match fs::read(root.join(&step).join(&rel)) {
                        Ok(b) => {
                            assert_eq!(
                                hex(&Md5::digest(&b)),
                                md5,
                                "{step}/{rel} read back differs"
                            );
                            read_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        // Rotated away meanwhile (or retention moved it off disk).
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e) => panic!("{step}/{rel}: {e}"),
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a writer or reader failed");
    }
    let expect = expect.lock().unwrap().clone();
    eprintln!(
        "{} steps written, {} files read back exact",
        expect.len(),
        read_ok.load(Ordering::Relaxed)
    );
    watcher.await.unwrap();
    // Every step committed; then every one durable (the sync keeps running), as long as
    // the lake keeps taking steps.
    let mut last = (0, Instant::now());
    loop {
        let durable = durable_steps(&*lake, &names).await.unwrap();
        if durable.len() == expect.len() {
            break;
        }
        if durable.len() > last.0 {
            last = (durable.len(), Instant::now());
        }
        if last.1.elapsed() > STALLED {
            let missing: Vec<_> = expect
                .keys()
                .filter(|s| !durable.iter().any(|d| &d.0 == *s))
                .collect();
            panic!(
                "{} of {} steps durable, none more for {STALLED:?}; not durable: {missing:?}; mount status: {:?}",
                durable.len(),
                expect.len(),
                fs::read_to_string(layout.mount_status_path()).ok()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every manifest lists exactly what was written, and the lake holds those bytes.
    for (step, files) in &expect {
        let doc = get_all(&*lake, &names.manifest(step)).await;
        let mut got = BTreeMap::new();
        read_manifest(&doc[..], |o| {
            got.insert(o.path, o.md5);
            Ok(())
        })
        .unwrap();
        assert_eq!(&got, files, "manifest of {step}");
        for (rel, md5) in files {
            let bytes = get_all(&*lake, &names.object(step, rel)).await;
            assert_eq!(&hex(&Md5::digest(&bytes)), md5, "{step}/{rel} in the lake");
        }
    }
    let _ = stop_sync.send(true);
    sync_task.await.unwrap().unwrap();
    stop_ticker.store(true, Ordering::Relaxed);
    ticker.join().unwrap();
    mount.unmount().unwrap();
    assert!(
        read_ok.load(Ordering::Relaxed) > 0,
        "the readers read something"
    );
}

async fn get_all(lake: &dyn Lake, name: &str) -> Vec<u8> {
    let m = lake
        .head(name)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut body = lake.get_stream(name, 0..m.size, &m.etag).await.unwrap();
    let mut v = Vec::new();
    while let Some(c) = body.next().await {
        v.extend_from_slice(&c.unwrap());
    }
    v
}
