//! Steps that are durable in the lake but not on this node, seen through the
//! checkpoint volume (real FUSE mounts, needs root and /dev/fuse, and a real Azurite):
//! a job resuming on another node reads them byte-exact and read-only, retention on
//! the writing node leaves them readable from the lake, steps made durable or deleted
//! elsewhere come and go, and an object changed behind its manifest is EIO, never
//! other bytes.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidepool_csi::cache::{CacheConfig, CachePool};
use tidepool_csi::checkpoint::commit::CommitRule;
use tidepool_csi::checkpoint::manifest::Layout;
use tidepool_csi::checkpoint::restore::durable_steps;
use tidepool_csi::checkpoint::store::{Store, VolumeConfig, VolumeLayout};
use tidepool_csi::checkpoint::sync::{PassReport, SyncConfig, Syncer};
use tidepool_csi::checkpoint::tree::{CheckpointTree, LakeSteps, OpenWriters, TreeConfig};
use tidepool_csi::fs::{Mount, MountStats};
use tidepool_csi::fuse::{MountOptions, SessionConfig};
use tidepool_csi::lake::{Lake, LakeUrl, PutOptions};
use tidepool_csi::mounts::is_mounted;
use tidepool_csi::testing::{Azurite, MountProcess, pattern, within};
use tokio::runtime::Runtime;

const MIB: usize = 1 << 20;

/// One node: its own pool directory (volume and cache), its mount, and its sync.
struct Node {
    mount: Option<Mount>,
    mnt: tempfile::TempDir,
    layout: VolumeLayout,
    store: Arc<Store>,
    syncer: Option<Syncer>,
    _pool: tempfile::TempDir,
}

impl Node {
    fn start(
        rt: &Runtime,
        az: &Azurite,
        lake: &Arc<dyn Lake>,
        prefix: &str,
        name: &str,
        keep_local: Option<u32>,
    ) -> Node {
        Node::start_of(rt, az, lake, prefix, name, keep_local, 1)
    }

    /// A node of a job that `nodes` nodes write.
    fn start_of(
        rt: &Runtime,
        az: &Azurite,
        lake: &Arc<dyn Lake>,
        prefix: &str,
        name: &str,
        keep_local: Option<u32>,
        nodes: u32,
    ) -> Node {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let pool_dir = tempfile::tempdir().unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let url_s = az.url("ckpt", prefix);
        let url = LakeUrl::parse(&url_s).unwrap();
        let layout = VolumeLayout::for_url(pool_dir.path(), &url_s);
        layout
            .create(&VolumeConfig {
                url: url_s,
                node: name.into(),
                keep_local,
                keep_remote: None,
                nodes: Some(nodes),
                owner_uid: None,
            })
            .unwrap();
        let pool = rt
            .block_on(CachePool::open(CacheConfig::new(
                pool_dir.path().join("cache"),
                512 << 20,
            )))
            .unwrap();
        let steps = LakeSteps {
            refresh: Duration::from_millis(500),
            ..LakeSteps::new(lake.clone(), &url, pool, rt.handle().clone())
        };
        let store = Arc::new(Store::open(layout.clone(), CommitRule::default()).unwrap());
        let tree = Arc::new(
            CheckpointTree::new(
                &layout.tree(),
                TreeConfig {
                    lake: Some(steps),
                    ..TreeConfig::default()
                },
                store.clone(),
            )
            .unwrap(),
        );
        store.attach(Arc::downgrade(&tree) as std::sync::Weak<dyn OpenWriters>);
        let mount = Mount::serve(
            tree,
            Arc::new(MountStats::default()),
            mnt.path(),
            &MountOptions {
                fsname: format!("test-{name}"),
                subtype: "tidepool".into(),
                read_only: false,
                allow_other: true,
                default_permissions: true,
            },
            SessionConfig::read_write(4, true),
        )
        .expect("mount (needs root and /dev/fuse)");
        let syncer = rt
            .block_on(Syncer::start(
                lake.clone(),
                layout.clone(),
                &url.prefix,
                SyncConfig {
                    lease_secs: 15,
                    ..SyncConfig::default()
                },
            ))
            .unwrap();
        Node {
            mount: Some(mount),
            mnt,
            layout,
            store,
            syncer: Some(syncer),
            _pool: pool_dir,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    /// Writes `files` into step `step` through the mount, `.metadata` last (the DCP
    /// commit marker), and waits for the commit.
    fn write_step(&self, step: &str, files: &[(&str, Vec<u8>)]) {
        for (rel, data) in files {
            let path = self.p(&format!("{step}/{rel}"));
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        fs::write(self.p(&format!("{step}/.metadata")), step).unwrap();
        within(Duration::from_secs(5), || {
            let done: Vec<_> = self.store.tick().into_iter().map(|r| r.unwrap()).collect();
            done.iter().any(|c| c.step == step).then_some(())
        })
        .unwrap_or_else(|| panic!("{step} did not commit"));
    }

    fn sync(&mut self, rt: &Runtime) -> PassReport {
        rt.block_on(self.syncer.as_mut().unwrap().pass()).unwrap()
    }

    /// The root's names, sorted.
    fn ls(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.mnt.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn stop(mut self, rt: &Runtime) {
        if let Some(m) = self.mount.take() {
            m.unmount().unwrap();
        }
        if let Some(s) = self.syncer.take() {
            rt.block_on(s.stop());
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_job_on_another_node_reads_durable_steps_read_only_and_retention_keeps_them_readable() {
    let rt = runtime();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(rt.block_on(az.lake("ckpt")));
    let big = pattern(1, 9 * MIB + 12_345);
    let step1: Vec<(&str, Vec<u8>)> = vec![
        ("__0_0.distcp", big.clone()),
        ("__1_0.distcp", pattern(2, 300_000)),
        ("optim/state/rank0.bin", pattern(3, 5_000)),
        ("optim/empty", Vec::new()),
    ];
    let step2: Vec<(&str, Vec<u8>)> = vec![("__0_0.distcp", pattern(4, 2 * MIB + 1))];

    // Node A writes two steps and keeps one on disk once both are durable.
    let mut a = Node::start(&rt, &az, &lake, "run/", "a", Some(1));
    a.write_step("step-1", &step1);
    a.write_step("step-2", &step2);
    let r = a.sync(&rt);
    assert_eq!(r.durable, vec!["step-1", "step-2"], "{r:?}");
    assert_eq!(r.removed_locally, vec!["step-1"], "{r:?}");
    assert!(
        !a.layout.tree().join("step-1").exists(),
        "step-1 left A's disk"
    );

    // Node B (another pool, nothing local) sees both, with every size and byte.
    let mut b = Node::start(&rt, &az, &lake, "run/", "b", None);
    assert_eq!(b.ls(), vec!["step-1", "step-2"]);
    // Listed as a directory lists itself: `.` and `..` too (as `ls -a` shows them).
    assert_eq!(
        tidepool_csi::testing::raw_dir_names(&b.p("step-1")).unwrap(),
        vec![
            ".",
            "..",
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "optim"
        ]
    );
    assert_eq!(
        tidepool_csi::testing::raw_dir_names(&b.p("step-1/optim")).unwrap(),
        vec![".", "..", "empty", "state"]
    );
    for (rel, data) in step1
        .iter()
        .chain([(".metadata", b"step-1".to_vec())].iter())
    {
        let p = b.p(&format!("step-1/{rel}"));
        assert_eq!(fs::metadata(&p).unwrap().len(), data.len() as u64, "{rel}");
        assert!(fs::read(&p).unwrap() == *data, "step-1/{rel}: bytes differ");
    }
    assert!(fs::read(b.p("step-2/__0_0.distcp")).unwrap() == step2[0].1);
    assert!(fs::metadata(b.p("step-1/optim")).unwrap().is_dir());
    // Read in random order too (the kernel's cache dropped first).
    {
        let f = File::open(b.p("step-1/__0_0.distcp")).unwrap();
        for off in [8 * MIB + 7, 3, 4 * MIB - 2, 6 * MIB] {
            let mut buf = vec![0u8; 100_000];
            let n = f.read_at(&mut buf, off as u64).unwrap();
            assert!(n > 0);
            assert!(buf[..n] == big[off..off + n], "offset {off}");
        }
    }

    // Read-only: nothing in them changes, nothing at the root renames or removes them.
    let s1 = b.p("step-1");
    assert_eq!(errno_of(File::create(s1.join("new"))), libc::EROFS);
    assert_eq!(
        errno_of(OpenOptions::new().write(true).open(s1.join("__1_0.distcp"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(s1.join(".metadata"))
        ),
        libc::EROFS
    );
    assert_eq!(errno_of(fs::create_dir(s1.join("d"))), libc::EROFS);
    assert_eq!(
        errno_of(fs::remove_file(s1.join("__1_0.distcp"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::rename(s1.join("__1_0.distcp"), s1.join("x"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::set_permissions(
            s1.join("__1_0.distcp"),
            fs::Permissions::from_mode(0o666)
        )),
        libc::EROFS
    );
    assert_eq!(errno_of(fs::rename(&s1, b.p("renamed"))), libc::EROFS);
    assert_eq!(errno_of(fs::remove_dir(b.p("step-2"))), libc::EROFS);
    assert_eq!(
        fs::read(s1.join("__1_0.distcp")).unwrap(),
        step1[1].1,
        "still intact"
    );

    // B saves its own step beside them; it becomes durable from B.
    b.write_step("step-3", &[("__0_0.distcp", pattern(5, 1_500_000))]);
    let tmp = b.p("tmp-step");
    fs::create_dir(&tmp).unwrap();
    assert_eq!(
        errno_of(fs::rename(&tmp, b.p("step-2"))),
        libc::EROFS,
        "a local directory cannot replace a step in the lake"
    );
    fs::remove_dir(&tmp).unwrap();
    let r = b.sync(&rt);
    assert_eq!(r.durable, vec!["step-3"], "{r:?}");
    assert_eq!(b.ls(), vec!["step-1", "step-2", "step-3"]);

    // A: the step B made durable appears; the step retention took off A's disk reads
    // from the lake through A's volume, byte-exact.
    within(Duration::from_secs(15), || {
        a.ls().contains(&"step-3".to_owned()).then_some(())
    })
    .expect("A sees the step B made durable");
    assert!(fs::read(a.p("step-3/__0_0.distcp")).unwrap() == pattern(5, 1_500_000));
    assert_eq!(a.ls(), vec!["step-1", "step-2", "step-3"]);
    // The kernel keeps A's entries of the removed local directory for their TTL (1 s);
    // then it asks again and gets the lake's step (remote node ids have bit 63 set).
    within(Duration::from_secs(10), || {
        fs::metadata(a.p("step-1"))
            .ok()
            .filter(|m| m.ino() & (1 << 63) != 0)
    })
    .expect("A shows step-1 from the lake");
    for (rel, data) in &step1 {
        assert!(
            fs::read(a.p(&format!("step-1/{rel}"))).unwrap() == *data,
            "A: step-1/{rel} from the lake"
        );
    }
    assert!(
        !a.layout.tree().join("step-1").exists(),
        "not restored to disk"
    );
    assert_eq!(
        errno_of(File::create(a.p("step-1/x"))),
        libc::EROFS,
        "read-only on A too"
    );

    // A step deleted from the lake (manifest gone) leaves B's volume; A keeps its local
    // copy of it.
    let names = Layout::new("run/");
    rt.block_on(lake.delete(&names.manifest("step-2"))).unwrap();
    within(Duration::from_secs(15), || {
        (b.ls() == vec!["step-1", "step-3"]).then_some(())
    })
    .expect("step-2 leaves B's listing");
    // And its lookups, within the moment the kernel takes to drop its entry.
    within(Duration::from_millis(500), || {
        (errno_of(fs::metadata(b.p("step-2"))) == libc::ENOENT).then_some(())
    })
    .expect("step-2 is not found on B any more");
    assert!(a.ls().contains(&"step-2".to_owned()));
    let durable = rt.block_on(durable_steps(&*lake, &names)).unwrap();
    assert_eq!(durable.len(), 2, "{durable:?}");
    b.stop(&rt);
    a.stop(&rt);
}

#[test]
fn an_object_changed_behind_its_manifest_is_eio_never_other_bytes() {
    let rt = runtime();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(rt.block_on(az.lake("ckpt")));
    let big = pattern(11, 10 * MIB + 3);
    let small = pattern(12, 70_000);
    let mut a = Node::start(&rt, &az, &lake, "x/", "a", None);
    a.write_step(
        "step-7",
        &[
            ("big.bin", big.clone()),
            ("small.bin", small.clone()),
            ("gone.bin", pattern(13, 1000)),
        ],
    );
    assert_eq!(a.sync(&rt).durable, vec!["step-7"]);
    let b = Node::start(&rt, &az, &lake, "x/", "b", None);
    let names = Layout::new("x/");

    // B starts reading the large file: its first 4 KiB only (no readahead).
    let f = File::open(b.p("step-7/big.bin")).unwrap();
    // SAFETY: plain posix_fadvise(2) on a descriptor this test owns.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert!(head == big[..4096]);

    // Behind the manifest's back: same sizes, other bytes; one object deleted.
    let put = |name: &str, data: Vec<u8>| {
        rt.block_on(lake.put(name, Bytes::from(data), &PutOptions::default()))
            .unwrap();
    };
    put(
        &names.object("step-7", "small.bin"),
        pattern(99, small.len()),
    );
    put(&names.object("step-7", "big.bin"), pattern(98, big.len()));
    rt.block_on(lake.delete(&names.object("step-7", "gone.bin")))
        .unwrap();

    assert_eq!(
        fs::metadata(b.p("step-7/small.bin")).unwrap().len(),
        small.len() as u64,
        "the manifest's size"
    );
    assert_eq!(errno_of(fs::read(b.p("step-7/small.bin"))), libc::EIO);
    assert_eq!(errno_of(fs::read(b.p("step-7/gone.bin"))), libc::EIO);
    // The open file: what was read stays right, the rest fails.
    let mut rest = vec![0u8; 4096];
    assert_eq!(
        errno_of(f.read_exact_at(&mut rest, 8 * MIB as u64)),
        libc::EIO
    );
    f.read_exact_at(&mut head, 0).unwrap();
    assert!(
        head == big[..4096],
        "bytes already verified stay the step's"
    );
    // A newly opened reader of the large file gets EIO too, never the new bytes.
    assert_eq!(errno_of(fs::read(b.p("step-7/big.bin"))), libc::EIO);
    drop(f);
    b.stop(&rt);
    a.stop(&rt);
}

#[test]
fn tidepool_mount_checkpoint_on_a_fresh_node_shows_the_durable_steps() {
    let rt = runtime();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(rt.block_on(az.lake("ckpt")));
    let weights = pattern(21, 6 * MIB + 5);
    let mut a = Node::start(&rt, &az, &lake, "job/", "a", None);
    a.write_step("step-40", &[("model/weights.bin", weights.clone())]);
    assert_eq!(a.sync(&rt).durable, vec!["step-40"]);

    // The job resumes on a node with an empty --cache-dir.
    let work = tempfile::tempdir().unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("pool"));
    fs::create_dir_all(&mnt).unwrap();
    let mut m = MountProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_tidepool")),
        &az.url("ckpt", "job/"),
        &mnt,
        &cache,
        &["--checkpoint", "--node-name", "gpu-9"],
    );
    let names: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["step-40"]);
    assert!(fs::read(mnt.join("step-40/model/weights.bin")).unwrap() == weights);
    assert_eq!(
        errno_of(File::create(mnt.join("step-40/model/x"))),
        libc::EROFS
    );
    // The job's own next step is written beside it as usual.
    fs::create_dir(mnt.join("step-50")).unwrap();
    fs::write(mnt.join("step-50/w"), b"next").unwrap();
    assert_eq!(fs::read(mnt.join("step-50/w")).unwrap(), b"next");
    m.signal(libc::SIGTERM);
    assert!(m.wait().success(), "SIGTERM is a clean exit");
    assert!(!is_mounted(&mnt.canonicalize().unwrap()).unwrap());
    a.stop(&rt);
}

/// A multi-node job resumed on the nodes that saved the step: each node's volume holds
/// its own files of the step, and once the step is durable it shows the lake's other
/// files of that version beside them, read-only and byte-exact (rank 1's node finds
/// rank 0's `.metadata` and shard, in subdirectories too). Once a node changes the
/// step, it shows its own files only until the step is durable again.
#[test]
fn a_step_two_nodes_saved_is_whole_on_each_of_them_once_durable() {
    let rt = runtime();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(rt.block_on(az.lake("ckpt")));
    let mut a = Node::start_of(&rt, &az, &lake, "two/", "a", None, 2);
    let mut b = Node::start_of(&rt, &az, &lake, "two/", "b", None, 2);
    // DCP: rank 1 on b (no marker: b follows a's version); rank 0 and the metadata on a.
    let on_b: Vec<(&str, Vec<u8>)> = vec![
        ("__1_0.distcp", pattern(11, 3 * MIB + 7)),
        ("optim/rank1.bin", pattern(12, 40_000)),
    ];
    for (rel, data) in &on_b {
        let p = b.p(&format!("step-1/{rel}"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }
    let on_a: Vec<(&str, Vec<u8>)> = vec![
        ("__0_0.distcp", pattern(10, 2 * MIB + 3)),
        ("optim/rank0.bin", pattern(13, 50_000)),
    ];
    a.write_step("step-1", &on_a);
    // b follows a's version, each uploads its part, and the step is durable on both.
    let (mut on_a_durable, mut on_b_durable) = (false, false);
    within(Duration::from_secs(60), || {
        on_b_durable |= b.sync(&rt).durable.iter().any(|s| s == "step-1");
        for c in b.store.tick() {
            c.unwrap();
        }
        on_a_durable |= a.sync(&rt).durable.iter().any(|s| s == "step-1");
        (on_a_durable && on_b_durable).then_some(())
    })
    .expect("step-1 durable on both nodes");

    // Each node shows the whole step as soon as its own mark says durable under the
    // manifest the lake lists; a pass may still be settling one node's mark when the
    // other's says durable, so passes go on until both do (within seconds).
    let whole = [
        ".",
        "..",
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "optim",
    ];
    let mut last = (Vec::new(), Vec::new());
    let shown = within(Duration::from_secs(30), || {
        last = (
            tidepool_csi::testing::raw_dir_names(&a.p("step-1")).unwrap(),
            tidepool_csi::testing::raw_dir_names(&b.p("step-1")).unwrap(),
        );
        if last.0 == whole && last.1 == whole {
            return Some(());
        }
        a.sync(&rt);
        b.sync(&rt);
        None
    });
    assert!(
        shown.is_some(),
        "step-1 on a and b: {last:?}, not {whole:?} on both"
    );
    let mut all = on_a.clone();
    all.extend(on_b.iter().cloned());
    all.push((".metadata", b"step-1".to_vec()));
    for n in [&a, &b] {
        assert_eq!(
            tidepool_csi::testing::raw_dir_names(&n.p("step-1")).unwrap(),
            [
                ".",
                "..",
                ".metadata",
                "__0_0.distcp",
                "__1_0.distcp",
                "optim"
            ]
        );
        assert_eq!(
            tidepool_csi::testing::raw_dir_names(&n.p("step-1/optim")).unwrap(),
            [".", "..", "rank0.bin", "rank1.bin"]
        );
        for (rel, data) in &all {
            let got = fs::read(n.p(&format!("step-1/{rel}"))).unwrap();
            assert!(got == *data, "step-1/{rel}: bytes differ");
        }
    }
    // The other node's files are the lake's: read-only.
    assert_eq!(
        errno_of(fs::remove_file(b.p("step-1/.metadata"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(File::create(b.p("step-1/__0_0.distcp"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::remove_file(a.p("step-1/optim/rank1.bin"))),
        libc::EROFS
    );
    assert!(fs::read(b.p("step-1/.metadata")).unwrap() == b"step-1");

    // b changes the step: from then on b shows its own files only (a's are of the
    // version b just left).
    fs::write(b.p("step-1/extra.bin"), b"new").unwrap();
    within(Duration::from_secs(5), || {
        (!b.p("step-1/.metadata").exists()).then_some(())
    })
    .expect("a's files leave b's view of the changed step");
    assert_eq!(
        tidepool_csi::testing::raw_dir_names(&b.p("step-1")).unwrap(),
        [".", "..", "__1_0.distcp", "extra.bin", "optim"]
    );
    a.stop(&rt);
    b.stop(&rt);
}
