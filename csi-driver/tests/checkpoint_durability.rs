//! Durable means durable: one test for each way the checkpoint path once called lost
//! or mixed bytes safe, each checking the lake itself (every manifest's objects, by
//! size, Content-MD5 and bytes) rather than the project's own status. Real stores and
//! syncs over the real Azure SDK and Azurite; the rewrite in place goes through a real
//! FUSE mount, the power loss through a real ext4 on a loop device (root, as in CI).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tidepool_csi::checkpoint::commit::CommitRule;
use tidepool_csi::checkpoint::journal::{CommitState, Journal};
use tidepool_csi::checkpoint::manifest::Layout;
use tidepool_csi::checkpoint::restore::{StepChoice, restore};
use tidepool_csi::checkpoint::store::{Committed, Store, VolumeConfig, VolumeLayout};
use tidepool_csi::checkpoint::sync::{PassReport, SyncConfig, Syncer};
use tidepool_csi::checkpoint::tree::{StepEvents, TreeEvent};
use tidepool_csi::checkpoint::upload::UploadConfig;
use tidepool_csi::lake::faults::{Fault, FaultyLake};
use tidepool_csi::lake::{Lake, Op, PutOptions};
use tidepool_csi::testing::disk::LoopExt4;
use tidepool_csi::testing::lake_check::{check_destination, check_manifests, get_all, md5_of};
use tidepool_csi::testing::{Azurite, pattern};

const MIB: usize = 1 << 20;

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A volume in its own pool for `url`, on node `node`.
fn volume(pool: &Path, url: &str, node: &str, cfg: VolumeConfig) -> VolumeLayout {
    let layout = VolumeLayout::for_url(pool, url);
    layout
        .create(&VolumeConfig {
            url: url.to_owned(),
            node: node.into(),
            ..cfg
        })
        .unwrap();
    layout
}

fn nodes(n: u32) -> VolumeConfig {
    VolumeConfig {
        nodes: Some(n),
        ..VolumeConfig::default()
    }
}

/// Writes files into a step directory of the volume's tree (as the job does when no
/// mount is running: the tests here drive the store directly).
fn write_files(layout: &VolumeLayout, dir: &str, files: &[(&str, Vec<u8>)]) {
    for (p, data) in files {
        let path = layout.tree().join(dir).join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }
}

/// Commits what is due, as a mount starting on the volume would.
fn commit(layout: &VolumeLayout) -> Vec<Committed> {
    let store = Store::open(layout.clone(), CommitRule::default()).unwrap();
    store.tick().into_iter().map(|r| r.unwrap()).collect()
}

fn small_blocks() -> SyncConfig {
    SyncConfig {
        upload: UploadConfig {
            single_put_max: MIB as u64,
            block_size: MIB as u64,
            parallel: 4,
            budget: None,
        },
        lease_secs: 15,
        ..SyncConfig::default()
    }
}

async fn start(lake: &Arc<dyn Lake>, layout: &VolumeLayout, prefix: &str) -> Syncer {
    Syncer::start(lake.clone(), layout.clone(), prefix, small_blocks())
        .await
        .unwrap()
}

/// Restores `choice` and returns path → MD5 of what came back.
async fn restored(
    lake: &dyn Lake,
    prefix: &str,
    choice: StepChoice,
) -> (String, BTreeMap<String, String>) {
    let out = tempfile::tempdir().unwrap();
    let r = restore(lake, prefix, "lake", out.path(), &choice, 4)
        .await
        .unwrap();
    let mut files = BTreeMap::new();
    let mut stack = vec![r.dir.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(&r.dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.insert(rel, md5_of(&fs::read(e.path()).unwrap()));
            }
        }
    }
    (r.step, files)
}

fn md5s(files: &[(&str, Vec<u8>)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(p, d)| (p.to_string(), md5_of(d)))
        .collect()
}

/// Finding 1: a node whose sync is down (never started, crash-looping, partitioned) is
/// waited for when the number of nodes is set, for the DCP pattern (rank 0's node sees
/// the marker) and for Orbax's multi-host pattern (the other host's part stays in its
/// temporary directory, never renamed on its own volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_sync_is_down_keeps_the_step_from_being_durable() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let url = az.url("ckpt", "job");
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = volume(pa.path(), &url, "gpu-a", nodes(2));
    let b = volume(pb.path(), &url, "gpu-b", nodes(2));
    // DCP: rank 1 on gpu-b, rank 0 and the metadata on gpu-a.
    let dcp_a = [
        ("__0_0.distcp", pattern(1, 2 * MIB)),
        (".metadata", pattern(2, 300)),
    ];
    let dcp_b = [("__1_0.distcp", pattern(3, 2 * MIB))];
    write_files(&b, "step-1", &dcp_b);
    // Orbax, two hosts: gpu-a is the primary and renames its temporary directory; gpu-b
    // keeps its part under the temporary name.
    let orbax_a = [
        ("default/params/0.0", pattern(4, 700_000)),
        ("default/_METADATA", pattern(5, 100)),
        (
            "commit_success.txt",
            b"Checkpoint commit was successful".to_vec(),
        ),
    ];
    let orbax_b = [("default/params/1.0", pattern(6, 500_000))];
    write_files(&b, "10.orbax-checkpoint-tmp-1712", &orbax_b);
    // gpu-b's mount notes the steps it writes (an Orbax temporary directory as its
    // final name); its sync is down.
    {
        let store_b = Store::open(b.clone(), CommitRule::default()).unwrap();
        for dir in ["step-1", "10.orbax-checkpoint-tmp-1712"] {
            store_b.event(TreeEvent::WriteOpened { step: dir.into() });
        }
    }
    assert_eq!(
        Journal::open(&b.journal_dir()).unwrap().seen().unwrap(),
        ["10", "step-1"],
        "the temporary directory is noted as the step it becomes"
    );
    write_files(&a, "step-1", &dcp_a);
    assert_eq!(commit(&a).len(), 1);
    // gpu-a, Orbax's primary, renames its temporary directory (of the same name as
    // gpu-b's: the hosts of one save share it) when every host is done.
    write_files(&a, "10.orbax-checkpoint-tmp-1712", &orbax_a);
    {
        let store_a = Store::open(a.clone(), CommitRule::default()).unwrap();
        fs::rename(
            a.tree().join("10.orbax-checkpoint-tmp-1712"),
            a.tree().join("10"),
        )
        .unwrap();
        store_a.event(TreeEvent::StepRenamed {
            from: "10.orbax-checkpoint-tmp-1712".into(),
            to: "10".into(),
        });
        assert_eq!(store_a.tick().len(), 1, "the rename commits");
    }
    let mut sa = start(&lake, &a, "job/").await;
    let mut last = PassReport::default();
    for _ in 0..3 {
        last = sa.pass().await.unwrap();
        assert!(last.durable.is_empty(), "{last:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        check_manifests(&*lake, "job/").await.is_empty(),
        "nothing is durable while gpu-b's part is missing"
    );
    let w = last.waiting.iter().find(|w| w.step == "step-1").unwrap();
    assert!(
        w.detail.contains("1 of the 2 nodes") && w.detail.contains("1 more"),
        "{w:?}"
    );
    let st = sa.status(None, &last.waiting).unwrap();
    assert!(st.latest_durable.is_none());
    assert_eq!(st.expected_nodes, Some(2));

    // gpu-b's sync comes back: it follows gpu-a's versions, its mount commits, and
    // both steps become durable with both nodes' files.
    let mut sb = start(&lake, &b, "job/").await;
    sb.pass().await.unwrap();
    let followed = commit(&b);
    assert_eq!(
        followed.iter().map(|c| c.step.as_str()).collect::<Vec<_>>(),
        ["step-1", "10"],
        "{followed:?}"
    );
    assert!(followed.iter().all(|c| c.reason.contains("gpu-a")));
    let r = sb.pass().await.unwrap();
    let mut durable = r.durable.clone();
    durable.sort();
    assert_eq!(durable, ["10", "step-1"], "{r:?}");
    let r = sa.pass().await.unwrap();
    assert_eq!(
        r.durable.len(),
        2,
        "gpu-a finds its versions published: {r:?}"
    );
    let lake_view = check_destination(&*lake, "job/", true).await;
    let mut want: BTreeMap<String, String> = md5s(&dcp_a);
    want.extend(md5s(&dcp_b));
    assert_eq!(lake_view["step-1"].files, want);
    assert_eq!(lake_view["step-1"].head.nodes, ["gpu-a", "gpu-b"]);
    assert_eq!(lake_view["step-1"].head.expected_nodes, Some(2));
    let mut want = md5s(&orbax_a);
    want.extend(md5s(&orbax_b));
    assert_eq!(lake_view["10"].files, want);
    assert_eq!(lake_view["10"].nodes["default/params/1.0"], "gpu-b");
    assert_eq!(
        restored(&*lake, "job/", StepChoice::Named("10".into()))
            .await
            .1,
        want
    );
    sa.stop().await;
    sb.stop().await;
}

/// Without a node count, a step waits for the nodes that announced it, and a settle
/// window after that (so a sync that starts a little late is not left out).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_node_count_a_step_waits_for_announced_nodes_and_a_settle_window() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let url = az.url("ckpt", "settle");
    let pa = tempfile::tempdir().unwrap();
    let a = volume(pa.path(), &url, "gpu-a", VolumeConfig::default());
    write_files(
        &a,
        "step-1",
        &[("w", pattern(1, 1000)), (".metadata", pattern(2, 10))],
    );
    commit(&a);
    let mut sa = Syncer::start(
        lake.clone(),
        a.clone(),
        "settle/",
        SyncConfig {
            settle: Duration::from_secs(3),
            ..small_blocks()
        },
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let r = sa.pass().await.unwrap();
    assert!(r.durable.is_empty());
    assert!(r.waiting[0].settles_in_ms.is_some(), "{r:?}");
    assert!(r.waiting[0].detail.contains("set --nodes"), "{r:?}");
    // Another node announces the step meanwhile: it is waited for.
    lake.put(
        &Layout::new("settle/").intent("step-1", "gpu-b"),
        bytes::Bytes::new(),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = sa.pass().await.unwrap();
    assert!(r.durable.is_empty());
    assert_eq!(r.waiting[0].nodes, ["gpu-b"]);
    lake.delete(&Layout::new("settle/").intent("step-1", "gpu-b"))
        .await
        .unwrap();
    let r = sa.pass().await.unwrap();
    assert_eq!(r.durable, ["step-1"], "{r:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "never before the window"
    );
    assert_eq!(sa.status(None, &[]).unwrap().expected_nodes, None);
    sa.stop().await;
}

/// Finding 2: a durable step that commits again has its manifest withdrawn before its
/// objects are replaced; from then on nothing reports it durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_withdrawn_step_is_never_reported_durable() {
    init_log();
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let faulty = Arc::new(FaultyLake::new(azure.clone()));
    let lake: Arc<dyn Lake> = faulty.clone();
    let url = az.url("ckpt", "wd");
    let p = tempfile::tempdir().unwrap();
    let v = volume(p.path(), &url, "n1", nodes(1));
    let v1 = [("w", pattern(1, 3 * MIB)), (".metadata", pattern(2, 10))];
    write_files(&v, "step-1", &v1);
    let c1 = commit(&v);
    let mut s = start(&lake, &v, "wd/").await;
    assert_eq!(s.pass().await.unwrap().durable, ["step-1"]);
    assert_eq!(
        s.status(None, &[]).unwrap().latest_durable.unwrap().step,
        "step-1"
    );
    // Rewritten and committed again; the upload of the new bytes fails part-way.
    let v2 = [("w", pattern(3, 3 * MIB)), (".metadata", pattern(4, 10))];
    write_files(&v, "step-1", &v2);
    assert_eq!(commit(&v).len(), 1);
    faulty.fail_always(Op::PutBlock, Fault::Throttle);
    assert!(s.pass().await.is_err());
    let journal = Journal::open(&v.journal_dir()).unwrap();
    assert!(
        matches!(journal.state(c1[0].seq), CommitState::Dropped(_)),
        "{:?}",
        journal.state(c1[0].seq)
    );
    let st = s.status(None, &[]).unwrap();
    assert_eq!(st.latest_durable, None, "a withdrawn step is not durable");
    assert!(check_manifests(&*azure, "wd/").await.is_empty());
    faulty.heal();
    assert_eq!(s.pass().await.unwrap().durable, ["step-1"]);
    assert_eq!(check_manifests(&*azure, "wd/").await["step-1"], md5s(&v2));
    s.stop().await;
}

/// A durable step another node (or retention elsewhere, or a person) withdraws or
/// deletes is durable no more on this node either, from its next pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_gone_from_the_lake_makes_the_step_not_durable_here() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let url = az.url("ckpt", "gone");
    let p = tempfile::tempdir().unwrap();
    let v = volume(p.path(), &url, "n1", nodes(1));
    for n in [1, 2] {
        write_files(
            &v,
            &format!("step-{n}"),
            &[("w", pattern(n, 1000)), (".metadata", pattern(9, 9))],
        );
    }
    commit(&v);
    let mut s = start(&lake, &v, "gone/").await;
    assert_eq!(s.pass().await.unwrap().durable.len(), 2);
    assert_eq!(
        s.status(None, &[]).unwrap().latest_durable.unwrap().step,
        "step-2"
    );
    lake.delete(&Layout::new("gone/").manifest("step-2"))
        .await
        .unwrap();
    let r = s.pass().await.unwrap();
    assert!(
        r.dropped
            .iter()
            .any(|(_, why)| why.contains("gone from the lake")),
        "{r:?}"
    );
    assert_eq!(
        s.status(None, &[]).unwrap().latest_durable.unwrap().step,
        "step-1"
    );
    s.stop().await;
}

/// Finding 6: "newest" is by when a step became durable. A run that restarts its
/// numbering into the same destination keeps its new steps, locally and in the lake,
/// and `restore --step latest` takes the new run's step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_restarts_its_numbering_keeps_its_new_steps() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let url = az.url("ckpt", "renum");
    let p = tempfile::tempdir().unwrap();
    let v = volume(
        p.path(),
        &url,
        "n1",
        VolumeConfig {
            nodes: Some(1),
            keep_local: Some(2),
            keep_remote: Some(2),
            ..VolumeConfig::default()
        },
    );
    let mut s = start(&lake, &v, "renum/").await;
    for n in [5000u64, 5001, 100] {
        let step = format!("step-{n}");
        write_files(
            &v,
            &step,
            &[("w", pattern(n, 2000)), (".metadata", pattern(n + 1, 10))],
        );
        commit(&v);
        let r = s.pass().await.unwrap();
        assert_eq!(r.durable, std::slice::from_ref(&step), "{r:?}");
        // Azure stamps manifests in whole seconds: the next run's step is a later one.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let m = check_manifests(&*lake, "renum/").await;
    assert_eq!(m.keys().collect::<Vec<_>>(), ["step-100", "step-5001"]);
    for (n, present) in [(5000, false), (5001, true), (100, true)] {
        assert_eq!(
            v.tree().join(format!("step-{n}")).exists(),
            present,
            "step-{n} on local disk"
        );
    }
    let (step, files) = restored(&*lake, "renum/", StepChoice::Latest).await;
    assert_eq!(step, "step-100");
    assert_eq!(files["w"], md5_of(&pattern(100, 2000)));
    assert_eq!(
        s.status(None, &[]).unwrap().latest_durable.unwrap().step,
        "step-100"
    );
    s.stop().await;
}

/// Finding 8: a manifest is written only over what the publisher saw before it looked
/// at the parts. Another node that starts replacing the step's objects between that
/// look and the write (withdrawing the step first) makes the write fail, so no manifest
/// ever vouches for objects being replaced; the new version is published later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_is_never_published_over_a_withdrawal_that_came_after_its_look() {
    init_log();
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let faulty = Arc::new(FaultyLake::new(azure.clone()));
    let lake: Arc<dyn Lake> = faulty.clone();
    let url = az.url("ckpt", "race");
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = volume(pa.path(), &url, "gpu-a", nodes(2));
    let b = volume(pb.path(), &url, "gpu-b", nodes(2));
    write_files(
        &a,
        "step-1",
        &[
            ("__0_0", pattern(1, 2 * MIB)),
            (".metadata", pattern(2, 10)),
        ],
    );
    write_files(&b, "step-1", &[("__1_0", pattern(3, 1000))]);
    Journal::open(&b.journal_dir())
        .unwrap()
        .mark_seen("step-1")
        .unwrap();
    commit(&a);
    let mut sa = start(&lake, &a, "race/").await;
    let mut sb = start(&lake, &b, "race/").await;
    assert!(sa.pass().await.unwrap().durable.is_empty());
    sb.pass().await.unwrap();
    assert_eq!(commit(&b).len(), 1, "gpu-b follows gpu-a");
    // Right before gpu-b writes the manifest (its second write of that name in its
    // pass: the first is its own withdrawal before uploading), another writer begins
    // replacing the step's objects the way a node does: it withdraws the step (its
    // part, then the manifest's name) and replaces its object.
    let names = Layout::new("race/");
    {
        let azure = azure.clone();
        let names = names.clone();
        faulty.before_write(
            &names.manifest("step-1"),
            1,
            Box::new(move || {
                Box::pin(async move {
                    azure.delete(&names.part("step-1", "gpu-a")).await.unwrap();
                    azure
                        .put(
                            &names.manifest("step-1"),
                            bytes::Bytes::new(),
                            &PutOptions::default(),
                        )
                        .await
                        .unwrap();
                    azure
                        .put(
                            &names.object("step-1", "__0_0"),
                            pattern(7, 1000).into(),
                            &PutOptions::default(),
                        )
                        .await
                        .unwrap();
                })
            }),
        );
    }
    let r = sb.pass().await.unwrap();
    assert!(r.durable.is_empty(), "{r:?}");
    assert!(
        r.waiting[0]
            .detail
            .contains("changed the manifest of step-1"),
        "the write was refused: {r:?}"
    );
    assert!(
        check_manifests(&*azure, "race/").await.is_empty(),
        "no manifest over objects being replaced"
    );
    assert!(sb.status(None, &[]).unwrap().latest_durable.is_none());
    // gpu-a finds its object replaced behind its commit: it says so, uploads it again
    // from the commit's staged copy, and the version is published whole.
    let r = sa.pass().await.unwrap();
    assert!(
        r.failed
            .iter()
            .any(|(_, e)| e.contains("this node uploads it again")),
        "{r:?}"
    );
    assert!(check_manifests(&*azure, "race/").await.is_empty());
    assert_eq!(sa.pass().await.unwrap().durable, ["step-1"]);
    assert_eq!(
        sb.pass().await.unwrap().durable,
        ["step-1"],
        "published by gpu-a"
    );
    let m = check_manifests(&*azure, "race/").await;
    assert_eq!(m["step-1"]["__0_0"], md5_of(&pattern(1, 2 * MIB)));
    // A new version led by gpu-a: committed, uploaded, followed by gpu-b (its file
    // unchanged), published.
    write_files(
        &a,
        "step-1",
        &[
            ("__0_0", pattern(8, 2 * MIB)),
            (".metadata", pattern(9, 10)),
        ],
    );
    assert_eq!(commit(&a).len(), 1);
    assert!(sa.pass().await.unwrap().durable.is_empty());
    assert!(
        check_manifests(&*azure, "race/").await.is_empty(),
        "withdrawn"
    );
    let r = sb.pass().await.unwrap();
    assert!(
        !r.dropped.is_empty(),
        "gpu-b's durable commit is durable no more: {r:?}"
    );
    assert!(sb.status(None, &[]).unwrap().latest_durable.is_none());
    assert_eq!(commit(&b).len(), 1, "gpu-b follows the new version");
    let r = sb.pass().await.unwrap();
    assert_eq!(r.durable, ["step-1"], "{r:?}");
    let m = check_manifests(&*azure, "race/").await;
    assert_eq!(m["step-1"]["__0_0"], md5_of(&pattern(8, 2 * MIB)));
    assert_eq!(m["step-1"]["__1_0"], md5_of(&pattern(3, 1000)));
    sa.stop().await;
    sb.stop().await;
}

/// Finding 9: a durable step rewritten in place when the mount dies (a new shard
/// written, the marker not yet) is not committed by the old marker when the volume
/// opens again: nothing vouches for a half-replaced step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewrite_torn_by_a_crash_is_never_committed_by_the_old_marker() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let url = az.url("ckpt", "torn");
    let p = tempfile::tempdir().unwrap();
    let v = volume(p.path(), &url, "n1", nodes(1));
    let v1 = [
        (".metadata", pattern(1, 100)),
        ("__0_0.distcp", pattern(2, 4000)),
        ("__1_0.distcp", pattern(3, 4000)),
    ];
    write_files(&v, "step-1", &v1);
    assert_eq!(commit(&v).len(), 1);
    let mut s = start(&lake, &v, "torn/").await;
    assert_eq!(s.pass().await.unwrap().durable, ["step-1"]);
    // The job starts saving step-1 again: rank 0's shard is rewritten, then the mount
    // is killed (no store runs here), before the other shard and the marker.
    std::thread::sleep(Duration::from_millis(20));
    write_files(&v, "step-1", &[("__0_0.distcp", pattern(4, 4000))]);
    assert!(commit(&v).is_empty(), "the old marker commits nothing");
    let r = s.pass().await.unwrap();
    assert!(r.durable.is_empty() && r.dropped.is_empty(), "{r:?}");
    assert_eq!(
        restored(&*lake, "torn/", StepChoice::Latest).await.1,
        md5s(&v1)
    );
    // The save completes: its marker commits the new version.
    write_files(
        &v,
        "step-1",
        &[
            ("__1_0.distcp", pattern(5, 4000)),
            (".metadata", pattern(6, 100)),
        ],
    );
    assert_eq!(commit(&v).len(), 1);
    assert_eq!(s.pass().await.unwrap().durable, ["step-1"]);
    let want = md5s(&[
        (".metadata", pattern(6, 100)),
        ("__0_0.distcp", pattern(4, 4000)),
        ("__1_0.distcp", pattern(5, 4000)),
    ]);
    assert_eq!(restored(&*lake, "torn/", StepChoice::Latest).await.1, want);
    s.stop().await;
}

/// Finding 4: a commit's data is on stable storage before its commit record. After a
/// power loss right after the commit, the committed files are whole and the step
/// becomes durable with exactly their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_survives_a_power_loss_right_after_it() {
    init_log();
    let disk = LoopExt4::new();
    let url = "https://acct.blob.core.windows.net/c/power";
    let v = volume(&disk.mnt, url, "n1", nodes(1));
    let files = [
        ("__0_0.distcp", pattern(1, 5 * MIB)),
        ("state/optim.bin", pattern(2, 300_000)),
        (".metadata", pattern(3, 200)),
    ];
    write_files(&v, "step-1", &files);
    let c = commit(&v);
    assert_eq!(c.len(), 1);
    let after = disk.after_power_loss();
    let v2 = VolumeLayout::for_url(&after.mnt, url);
    let journal = Journal::open(&v2.journal_dir()).unwrap();
    assert_eq!(
        journal.seqs().unwrap(),
        [c[0].seq],
        "the commit record survived"
    );
    let lake: Arc<dyn Lake> = Arc::new(tidepool_csi::lake::memory::MemoryLake::new());
    let mut s = start(&lake, &v2, "power/").await;
    let r = s.pass().await.unwrap();
    assert_eq!(r.durable, ["step-1"], "{r:?}");
    assert_eq!(
        check_manifests(&*lake, "power/").await["step-1"],
        md5s(&files)
    );
    for (p, data) in &files {
        assert!(
            get_all(&*lake, &format!("power/step-1/{p}")).await == *data,
            "{p}"
        );
    }
    s.stop().await;
}

/// The CSI plugin's record of a staged and published volume is on stable storage when
/// the call answers: after a power loss it is there, whole (so the plugin binds its
/// targets again), and a record removed at unstage stays removed.
#[test]
fn the_plugins_records_survive_a_power_loss() {
    use tidepool_api::volume::{VolumeAttributes, VolumeKind};
    use tidepool_csi::csi::node::{Records, Staged};
    let disk = LoopExt4::new();
    let records = Records::new(disk.mnt.join("csi")).unwrap();
    let staged = |id: &str| Staged {
        volume_id: id.into(),
        staging_path: format!("/var/lib/kubelet/plugins/x/{id}/globalmount").into(),
        attributes: VolumeAttributes {
            kind: VolumeKind::CheckpointSync,
            namespace: "ml".into(),
            name: id.into(),
            uid: format!("uid-{id}"),
            url: "https://acct.blob.core.windows.net/c/ckpt".into(),
            prefetch: Default::default(),
            refresh: Default::default(),
            pinned: false,
        },
        targets: [format!("/var/lib/kubelet/pods/p/{id}/mount").into()].into(),
        read_only_targets: Default::default(),
    };
    records.put(&staged("kept")).unwrap();
    records.put(&staged("gone")).unwrap();
    {
        // Both on disk before the second is removed.
        let after = disk.after_power_loss();
        let r = Records::new(after.mnt.join("csi")).unwrap();
        assert_eq!(r.get("gone"), Some(staged("gone")));
    }
    records.remove("gone").unwrap();
    let after = disk.after_power_loss();
    let r = Records::new(after.mnt.join("csi")).unwrap();
    assert_eq!(
        r.get("kept"),
        Some(staged("kept")),
        "the record survived, whole"
    );
    assert_eq!(r.get("gone"), None, "the removal survived");
    assert_eq!(r.all(), [staged("kept")]);
}
