//! Checkpoints into the lake: committed steps become durable in a real Azurite (the
//! real Azure SDK), byte-exact and in native format, with faults, two nodes, a second
//! sync, and `kill -9` of the sync binary at random moments. Steps are written straight
//! into a volume's directory here (the FUSE side is `checkpoint_fs.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tidepool_csi::checkpoint::commit::CommitRule;
use tidepool_csi::checkpoint::journal::{CommitState, Journal};
use tidepool_csi::checkpoint::manifest::Layout;
use tidepool_csi::checkpoint::restore::{StepChoice, restore};
use tidepool_csi::checkpoint::store::{Committed, Store, VolumeConfig, VolumeLayout};
use tidepool_csi::checkpoint::sync::{SyncConfig, SyncError, Syncer};
use tidepool_csi::checkpoint::upload::UploadConfig;
use tidepool_csi::lake::faults::{Fault, FaultyLake};
use tidepool_csi::lake::retry::{RetryConfig, RetryingLake};
use tidepool_csi::lake::{Lake, Lister, Op};
use tidepool_csi::testing::lake_check::{check_manifests, check_manifests_with, get_all, md5_of};
use tidepool_csi::testing::{Azurite, pattern};

const MIB: usize = 1 << 20;

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A volume in its own pool, bound to `node` and the lake prefix `prefix`, the only
/// node writing its steps (`--nodes 1`).
fn volume(
    pool: &Path,
    az: &Azurite,
    container: &str,
    prefix: &str,
    node: &str,
    keep_local: Option<u32>,
) -> VolumeLayout {
    volume_of(pool, az, container, prefix, node, keep_local, Some(1))
}

/// A volume whose steps are written by `nodes` nodes (`None`: not set).
fn volume_of(
    pool: &Path,
    az: &Azurite,
    container: &str,
    prefix: &str,
    node: &str,
    keep_local: Option<u32>,
    nodes: Option<u32>,
) -> VolumeLayout {
    let url = az.url(container, prefix);
    let layout = VolumeLayout::for_url(pool, &url);
    layout
        .create(&VolumeConfig {
            url,
            node: node.into(),
            keep_local,
            keep_remote: None,
            nodes,
            owner_uid: None,
        })
        .unwrap();
    layout
}

/// Writes a step the way PyTorch DCP does (rank files, then `.metadata` last).
fn write_step(layout: &VolumeLayout, step: &str, files: &[(&str, Vec<u8>)], marker: bool) {
    let dir = layout.tree().join(step);
    for (p, data) in files {
        let path = dir.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }
    if marker {
        fs::write(dir.join(".metadata"), format!("{step} metadata")).unwrap();
    }
}

/// Commits whatever has a marker (as a mount restarting would).
fn commit(layout: &VolumeLayout, rule: CommitRule) -> Vec<Committed> {
    let quiet = rule.quiescence;
    let store = Store::open(layout.clone(), rule).unwrap();
    if let Some(q) = quiet {
        std::thread::sleep(q + Duration::from_millis(5));
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_steps_become_durable_and_restore_byte_exact() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "runs/a", "n1", None);
    let big = pattern(7, 5 * MIB + 12345);
    for (i, step) in ["step-100", "step-200", "step-300"].iter().enumerate() {
        write_step(
            &vol,
            step,
            &[
                ("__0_0.distcp", big.clone()),
                ("__1_0.distcp", pattern(i as u64, 300_000)),
                ("optim/state.bin", pattern(10 + i as u64, 0)),
            ],
            true,
        );
    }
    // An unfinished step (no marker) is not committed.
    write_step(
        &vol,
        "step-400",
        &[("__0_0.distcp", pattern(4, 1000))],
        false,
    );
    let commits = commit(&vol, CommitRule::default());
    assert_eq!(commits.len(), 3);
    let mut s = Syncer::start(lake.clone(), vol.clone(), "runs/a/", small_blocks())
        .await
        .unwrap();
    let report = s.pass().await.unwrap();
    assert_eq!(report.durable.len(), 3, "{report:?}");
    assert_eq!(report.uploaded_files, 12);
    // Native format: the blob of each file is the file.
    assert_eq!(get_all(&*lake, "runs/a/step-200/__0_0.distcp").await, big);
    let durable = check_manifests(&*lake, "runs/a/").await;
    assert_eq!(
        durable.keys().collect::<Vec<_>>(),
        ["step-100", "step-200", "step-300"]
    );
    assert_eq!(
        durable["step-300"]["__1_0.distcp"],
        md5_of(&pattern(2, 300_000))
    );
    assert!(!durable.contains_key("step-400"));
    for c in &commits {
        assert_eq!(
            Journal::open(&vol.journal_dir()).unwrap().state(c.seq),
            CommitState::Durable
        );
        assert!(
            !vol.staged(c.seq).exists(),
            "staged links released once durable"
        );
    }
    let st = s.status(None, &[]).unwrap();
    assert_eq!(st.latest_durable.as_ref().unwrap().step, "step-300");
    assert_eq!(st.pending_bytes, 0);
    s.stop().await;

    // Restore the latest, and a step by number, into empty directories.
    let out = tempfile::tempdir().unwrap();
    let r = restore(
        &*lake,
        "runs/a/",
        "lake",
        out.path(),
        &StepChoice::Latest,
        4,
    )
    .await
    .unwrap();
    assert_eq!(r.step, "step-300");
    assert_eq!(r.files, 4);
    assert_eq!(
        fs::read(out.path().join("step-300/__0_0.distcp")).unwrap(),
        big
    );
    assert_eq!(
        fs::read(out.path().join("step-300/optim/state.bin")).unwrap(),
        Vec::<u8>::new()
    );
    let r = restore(
        &*lake,
        "runs/a/",
        "lake",
        out.path(),
        &StepChoice::Named("100".into()),
        4,
    )
    .await
    .unwrap();
    assert_eq!(r.step, "step-100");
    assert_eq!(
        fs::read(out.path().join("step-100/.metadata")).unwrap(),
        b"step-100 metadata"
    );
    // A step without a manifest is refused, with the reason.
    let e = restore(
        &*lake,
        "runs/a/",
        "lake",
        out.path(),
        &StepChoice::Named("step-400".into()),
        4,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, SyncError::NotDurable { .. }), "{e}");
    assert!(e.to_string().contains("not durable"), "{e}");
    assert!(!out.path().join("step-400").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_object_fails_the_restore_and_leaves_no_file() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "r", "n1", None);
    write_step(&vol, "step-1", &[("w.bin", pattern(1, 2 * MIB))], true);
    commit(&vol, CommitRule::default());
    let mut s = Syncer::start(lake.clone(), vol.clone(), "r/", small_blocks())
        .await
        .unwrap();
    s.pass().await.unwrap();
    s.stop().await;
    // Someone overwrites the blob behind Tidepool's back.
    lake.put(
        "r/step-1/w.bin",
        bytes::Bytes::from(pattern(2, 2 * MIB)),
        &Default::default(),
    )
    .await
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let e = restore(&*lake, "r/", "lake", out.path(), &StepChoice::Latest, 2)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("MD5"), "{e}");
    assert!(
        !out.path().join("step-1/w.bin").exists(),
        "a damaged file is not left in place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sync_for_the_same_node_and_destination_is_refused() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let (p1, p2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v1 = volume(p1.path(), &az, "ckpt", "r", "n1", None);
    let v2 = volume(p2.path(), &az, "ckpt", "r", "n1", None);
    let s1 = Syncer::start(lake.clone(), v1.clone(), "r/", small_blocks())
        .await
        .unwrap();
    // Another machine (another volume) under the same node name: the lake lease.
    let e = Syncer::start(lake.clone(), v2.clone(), "r/", small_blocks())
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, SyncError::AnotherSync { .. }), "{e}");
    assert!(e.to_string().contains("--node-name"), "{e}");
    // A second sync of the same volume on this machine: the local lock.
    let e = Syncer::start(lake.clone(), v1.clone(), "r/", small_blocks())
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, SyncError::LocalLock { .. }), "{e}");
    // A clean stop releases the lease for the other machine.
    s1.stop().await;
    let s2 = Syncer::start(lake.clone(), v2, "r/", small_blocks())
        .await
        .unwrap();
    s2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_written_by_two_nodes_is_durable_only_with_both_parts() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let (p1, p2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n1 = volume_of(p1.path(), &az, "ckpt", "job", "node-1", None, Some(2));
    let n2 = volume_of(p2.path(), &az, "ckpt", "job", "node-2", None, Some(2));
    // Each node's mount notes the steps it writes; rank 0 (node-1) writes the marker.
    let st1 = Store::open(n1.clone(), CommitRule::default()).unwrap();
    let st2 = Store::open(n2.clone(), CommitRule::default()).unwrap();
    for (st, step) in [
        (&st1, "step-1"),
        (&st2, "step-1"),
        (&st1, "step-2"),
        (&st2, "step-2"),
    ] {
        use tidepool_csi::checkpoint::tree::{StepEvents, TreeEvent};
        st.event(TreeEvent::WriteOpened { step: step.into() });
    }
    let mut s1 = Syncer::start(lake.clone(), n1.clone(), "job/", small_blocks())
        .await
        .unwrap();
    let mut s2 = Syncer::start(lake.clone(), n2.clone(), "job/", small_blocks())
        .await
        .unwrap();
    // node-2's sync announces the steps its mount noted on its own, without a pass
    // (a pass may be busy uploading for minutes).
    let names = Layout::new("job/");
    let announced = tidepool_csi::testing::within(Duration::from_secs(5), || {
        let n = futures::executor::block_on(names_under(&*lake, &names.intents("step-2")));
        n.iter().any(|x| x.ends_with("/node-2")).then_some(())
    });
    assert!(announced.is_some(), "node-2's intent was not announced");
    for step in ["step-1", "step-2"] {
        write_step(&n1, step, &[("__0_0.distcp", pattern(1, 2 * MIB))], true);
    }
    // node-2 writes its part of step-1 and dies before writing step-2 (which it
    // announced): step-2 is never committed there.
    write_step(
        &n2,
        "step-1",
        &[("__1_0.distcp", pattern(2, 2 * MIB))],
        false,
    );
    // node-2 has no marker: nothing fires there before node-1 commits (no version of
    // node-1's to follow yet).
    assert!(
        commit(&n2, CommitRule::default()).is_empty(),
        "no rule fired on node-2 yet"
    );
    assert_eq!(commit(&n1, CommitRule::default()).len(), 2);
    let r = s1.pass().await.unwrap();
    assert!(r.durable.is_empty(), "node-2's parts are missing: {r:?}");
    assert_eq!(r.waiting.len(), 2);
    assert_eq!(r.waiting[0].nodes, vec!["node-2".to_owned()]);
    assert!(
        check_manifests(&*lake, "job/").await.is_empty(),
        "no manifest before every part is in"
    );
    // node-2 commits its part of a step once node-1's part is in (its sync, in the
    // background or in a pass, tells its mount which version to follow).
    let r = s2.pass().await.unwrap();
    assert!(r.durable.is_empty());
    let c2 = commit(&n2, CommitRule::default());
    assert_eq!(c2.len(), 1, "node-1's part made node-2 commit step-1");
    assert_eq!(c2[0].step, "step-1");
    assert!(c2[0].reason.contains("node-1"), "{}", c2[0].reason);
    let r = s2.pass().await.unwrap();
    assert_eq!(r.durable, vec!["step-1".to_owned()]);
    let r = s1.pass().await.unwrap();
    assert_eq!(r.durable, vec!["step-1".to_owned()]);
    assert_eq!(r.waiting.len(), 1);
    assert_eq!(r.waiting[0].step, "step-2");
    let m = check_manifests(&*lake, "job/").await;
    assert_eq!(
        m.keys().collect::<Vec<_>>(),
        ["step-1"],
        "step-2 is never falsely durable"
    );
    assert_eq!(
        m["step-1"].len(),
        3,
        "both nodes' files and the marker: {m:?}"
    );
    let st = s1.status(None, &r.waiting).unwrap();
    assert_eq!(st.waiting[0].nodes, vec!["node-2".to_owned()]);
    s1.stop().await;
    s2.stop().await;
    drop((st1, st2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lake_faults_are_retried_and_the_upload_completes_byte_exact() {
    init_log();
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let faulty = Arc::new(FaultyLake::new(azure.clone()));
    for (op, f) in [
        (Op::PutBlock, Fault::Throttle),
        (Op::PutBlock, Fault::Reset),
        (Op::PutBlock, Fault::LostReply),
        (Op::Put, Fault::Throttle),
        (Op::PutBlockList, Fault::LostReply),
    ] {
        faulty.fail_after(op, 1, f, Some(2));
    }
    let lake: Arc<dyn Lake> = Arc::new(RetryingLake::new(
        faulty.clone(),
        RetryConfig {
            max_attempts: 6,
            base_backoff: Duration::from_millis(5),
            ..RetryConfig::default()
        },
    ));
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "f", "n1", None);
    write_step(
        &vol,
        "step-1",
        &[("a", pattern(1, 6 * MIB)), ("b", pattern(2, 1000))],
        true,
    );
    commit(&vol, CommitRule::default());
    let mut s = Syncer::start(lake.clone(), vol.clone(), "f/", small_blocks())
        .await
        .unwrap();
    let r = s.pass().await.unwrap();
    assert_eq!(r.durable, vec!["step-1".to_owned()]);
    let m = check_manifests(&*azure, "f/").await;
    assert_eq!(m["step-1"]["a"], md5_of(&pattern(1, 6 * MIB)));

    // The lake goes away entirely: the pass fails with a clear error in the status,
    // and the next pass after it is back finishes the job.
    write_step(&vol, "step-2", &[("a", pattern(3, 3 * MIB))], true);
    commit(&vol, CommitRule::default());
    faulty.fail_always(Op::PutBlock, Fault::Throttle);
    faulty.fail_always(Op::Put, Fault::Throttle);
    let e = s.pass().await.unwrap_err();
    assert!(e.to_string().contains("throttling or unavailable"), "{e}");
    let st = s.status(Some(e.to_string()), &[]).unwrap();
    assert_eq!(st.latest_durable.as_ref().unwrap().step, "step-1");
    assert!(st.pending_bytes >= 3 * MIB as u64);
    faulty.heal();
    let r = s.pass().await.unwrap();
    assert_eq!(r.durable, vec!["step-2".to_owned()]);
    check_manifests(&*azure, "f/").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_local_moves_old_durable_steps_off_disk_and_keeps_the_rest() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "k", "n1", Some(2));
    for n in [1, 2, 3, 10] {
        write_step(&vol, &format!("step-{n}"), &[("w", pattern(n, 1000))], true);
    }
    write_step(&vol, "step-20", &[("w", pattern(20, 1000))], false);
    commit(&vol, CommitRule::default());
    let mut s = Syncer::start(lake.clone(), vol.clone(), "k/", small_blocks())
        .await
        .unwrap();
    let r = s.pass().await.unwrap();
    assert_eq!(
        r.removed_locally,
        vec!["step-1".to_owned(), "step-2".to_owned()],
        "ordered by step number"
    );
    for (n, present) in [(1, false), (2, false), (3, true), (10, true), (20, true)] {
        assert_eq!(
            vol.tree().join(format!("step-{n}")).exists(),
            present,
            "step-{n}"
        );
    }
    assert_eq!(
        check_manifests(&*lake, "k/").await.len(),
        4,
        "removed locally, still in the lake"
    );
    s.stop().await;
}

/// Blob names under a prefix.
async fn names_under(lake: &dyn Lake, prefix: &str) -> Vec<String> {
    let mut l = Lister::new(lake, prefix);
    let mut v = Vec::new();
    while let Some(p) = l.next_page().await.unwrap() {
        v.extend(p.into_iter().map(|o| o.name));
    }
    v
}

fn tidepool_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tidepool"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_sync_at_random_moments_loses_nothing_and_never_lies() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "kill", "n1", None);
    let mut expect = BTreeMap::new();
    let mut rng_state = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move |n: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % n
    };
    let runs: u64 = std::env::var("TIDEPOOL_KILL_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut killed_mid_way = 0;
    for run in 1..=runs {
        // A new step commits before each run, so every run has work to be killed in.
        let step = format!("step-{run}");
        let files = vec![
            ("model.bin", pattern(run, 12 * MIB + 17)),
            ("opt/a.bin", pattern(100 + run, 2 * MIB)),
            ("small.json", pattern(200 + run, 700)),
        ];
        for (p, d) in &files {
            expect.insert(format!("{step}/{p}"), md5_of(d));
        }
        write_step(&vol, &step, &files, true);
        expect.insert(
            format!("{step}/.metadata"),
            md5_of(format!("{step} metadata").as_bytes()),
        );
        assert_eq!(commit(&vol, CommitRule::default()).len(), 1);
        let mut child = Command::new(tidepool_bin())
            .args(["sync", "--cache-dir"])
            .arg(pool.path())
            .env(
                "AZURE_STORAGE_KEY",
                tidepool_csi::testing::azurite::ACCOUNT_KEY,
            )
            .env("TIDEPOOL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = 20 + rand(700);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let alive = child.try_wait().unwrap().is_none();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        // Whatever moment it died at: every manifest names exactly what is in the lake.
        let durable = check_manifests_with(&*lake, "kill/", false).await;
        if alive && !durable.contains_key(&step) {
            killed_mid_way += 1;
        }
        eprintln!(
            "run {run}: killed after {delay} ms, {} steps durable",
            durable.len()
        );
    }
    // One sync to the end.
    let out = Command::new(tidepool_bin())
        .args(["sync", "--once", "--cache-dir"])
        .arg(pool.path())
        .env(
            "AZURE_STORAGE_KEY",
            tidepool_csi::testing::azurite::ACCOUNT_KEY,
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let durable = check_manifests(&*lake, "kill/").await;
    assert_eq!(
        durable.len() as u64,
        runs,
        "every committed step is durable in the end"
    );
    let mut got = BTreeMap::new();
    for (step, files) in durable {
        for (p, m) in files {
            got.insert(format!("{step}/{p}"), m);
        }
    }
    assert_eq!(got, expect, "the lake holds exactly the committed bytes");
    // Nothing but the steps and Tidepool's own records.
    for n in names_under(&*lake, "kill/").await {
        assert!(
            n.starts_with("kill/_tidepool/") || expect.contains_key(n.trim_start_matches("kill/")),
            "unexpected blob {n}"
        );
    }
    assert!(
        killed_mid_way >= runs / 4,
        "the kills should land mid-upload ({killed_mid_way} of {runs} did)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_remote_deletes_old_steps_manifest_first_and_finishes_an_interrupted_deletion() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let pool = tempfile::tempdir().unwrap();
    let url = az.url("ckpt", "rr");
    let vol = VolumeLayout::for_url(pool.path(), &url);
    vol.create(&VolumeConfig {
        url,
        node: "n1".into(),
        keep_local: None,
        keep_remote: Some(2),
        nodes: Some(1),
        owner_uid: None,
    })
    .unwrap();
    for n in [1, 2, 3, 10] {
        write_step(
            &vol,
            &format!("step-{n}"),
            &[("w", pattern(n, 2 * MIB)), ("d/x", pattern(n + 50, 10))],
            true,
        );
    }
    // A step without a number: never deleted automatically (committed first here, as
    // steps found together commit in the order of their numbers).
    write_step(&vol, "final", &[("w", pattern(99, 1000))], true);
    commit(&vol, CommitRule::default());
    let mut s = Syncer::start(lake.clone(), vol.clone(), "rr/", small_blocks())
        .await
        .unwrap();
    let r = s.pass().await.unwrap();
    assert_eq!(r.durable.len(), 5);
    assert_eq!(
        r.removed_remotely,
        vec!["step-1".to_owned(), "step-2".to_owned()]
    );
    let m = check_manifests(&*lake, "rr/").await;
    assert_eq!(m.keys().collect::<Vec<_>>(), ["final", "step-10", "step-3"]);
    let out = tempfile::tempdir().unwrap();
    let r = restore(&*lake, "rr/", "lake", out.path(), &StepChoice::Latest, 2)
        .await
        .unwrap();
    assert_eq!(r.step, "step-10", "latest is the step made durable last");
    for gone in [
        "rr/step-1/",
        "rr/step-2/",
        "rr/_tidepool/parts/step-1/",
        "rr/_tidepool/intents/step-2/",
        "rr/_tidepool/deleting/",
    ] {
        assert!(
            names_under(&*lake, gone).await.is_empty(),
            "{gone} should be empty"
        );
    }
    // A deletion interrupted after the manifest went: the tombstone finishes it.
    let names = Layout::new("rr/");
    let manifest = get_all(&*lake, &names.manifest("step-3")).await;
    lake.put(
        &names.tombstone("step-3"),
        bytes::Bytes::from(manifest),
        &Default::default(),
    )
    .await
    .unwrap();
    lake.delete(&names.manifest("step-3")).await.unwrap();
    let r = s.pass().await.unwrap();
    assert_eq!(r.removed_remotely, vec!["step-3".to_owned()]);
    assert!(names_under(&*lake, "rr/step-3/").await.is_empty());
    assert_eq!(
        check_manifests(&*lake, "rr/")
            .await
            .keys()
            .collect::<Vec<_>>(),
        ["final", "step-10"]
    );
    // The local copies are untouched by lake retention.
    assert!(vol.tree().join("step-1/w").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_sas_is_a_status_error_in_words_and_the_upload_resumes_with_a_new_one() {
    use tidepool_csi::lake::azure::AzureLake;
    use tidepool_csi::lake::azure::sas::AccountKey;
    use tidepool_csi::lake::{Credentials, LakeUrl};
    init_log();
    let az = Azurite::start();
    let good: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let key = AccountKey::new(
        tidepool_csi::testing::azurite::ACCOUNT,
        &Azurite::account_key(),
    )
    .unwrap();
    let sas = |valid_from: time::OffsetDateTime| {
        let url = LakeUrl::parse(&az.url("ckpt", "")).unwrap();
        let s = key.account_sas("sco", "racwdl", Duration::from_secs(60), valid_from);
        Arc::new(AzureLake::connect(&url, &Credentials::Sas(s), &az.options()).unwrap())
            as Arc<dyn Lake>
    };
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "sas", "n1", None);
    // The node lease is taken with a valid token; then the token expires.
    let s = Syncer::start(
        sas(time::OffsetDateTime::now_utc()),
        vol.clone(),
        "sas/",
        small_blocks(),
    )
    .await
    .unwrap();
    s.stop().await;
    let expired = sas(time::OffsetDateTime::now_utc() - time::Duration::hours(2));
    write_step(&vol, "step-1", &[("w", pattern(1, 3 * MIB))], true);
    commit(&vol, CommitRule::default());
    let e = match Syncer::start(expired, vol.clone(), "sas/", small_blocks()).await {
        Ok(mut s) => {
            let e = s.pass().await.unwrap_err();
            s.stop().await;
            e
        }
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.contains("access denied") && msg.contains("credentials"),
        "{msg}"
    );
    assert!(!msg.contains("sig="), "no SAS signature in errors: {msg}");
    assert!(check_manifests(&*good, "sas/").await.is_empty());
    // With a valid token again, the same journal finishes the step.
    let mut s = Syncer::start(
        sas(time::OffsetDateTime::now_utc()),
        vol.clone(),
        "sas/",
        small_blocks(),
    )
    .await
    .unwrap();
    assert_eq!(s.pass().await.unwrap().durable, vec!["step-1".to_owned()]);
    s.stop().await;
    assert_eq!(check_manifests(&*good, "sas/").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_step_committed_again_is_withdrawn_first_and_republished_with_the_new_bytes() {
    init_log();
    let az = Azurite::start();
    let azure: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let faulty = Arc::new(FaultyLake::new(azure.clone()));
    let lake: Arc<dyn Lake> = faulty.clone();
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "re", "n1", None);
    write_step(&vol, "step-1", &[("w", pattern(1, 3 * MIB))], true);
    commit(&vol, CommitRule::default());
    let mut s = Syncer::start(lake.clone(), vol.clone(), "re/", small_blocks())
        .await
        .unwrap();
    assert_eq!(s.pass().await.unwrap().durable, vec!["step-1".to_owned()]);
    // The job writes the step again (same names, new bytes) and commits it.
    std::thread::sleep(Duration::from_millis(20));
    write_step(&vol, "step-1", &[("w", pattern(2, 3 * MIB))], true);
    let c = commit(&vol, CommitRule::default());
    assert_eq!(c.len(), 1, "the marker written again commits again");
    // The upload of the new bytes breaks off before its commit.
    faulty.fail_always(Op::PutBlockList, Fault::Throttle);
    assert!(s.pass().await.is_err());
    assert!(
        check_manifests(&*azure, "re/").await.is_empty(),
        "while the objects are being replaced, no manifest vouches for them"
    );
    faulty.heal();
    assert_eq!(s.pass().await.unwrap().durable, vec!["step-1".to_owned()]);
    let m = check_manifests(&*azure, "re/").await;
    assert_eq!(m["step-1"]["w"], md5_of(&pattern(2, 3 * MIB)));
    let st = s.status(None, &[]).unwrap();
    assert_eq!(st.latest_durable.unwrap().seq, c[0].seq);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_is_never_written_over_replaced_or_conflicting_objects() {
    init_log();
    let az = Azurite::start();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let (p1, p2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n1 = volume_of(p1.path(), &az, "ckpt", "cf", "node-1", None, Some(2));
    let n2 = volume_of(p2.path(), &az, "ckpt", "cf", "node-2", None, Some(2));
    let mut s1 = Syncer::start(lake.clone(), n1.clone(), "cf/", small_blocks())
        .await
        .unwrap();
    let mut s2 = Syncer::start(lake.clone(), n2.clone(), "cf/", small_blocks())
        .await
        .unwrap();
    // step-1: node-1's object is replaced in the lake after its part went in.
    write_step(&n1, "step-1", &[("a", pattern(1, 2 * MIB))], true);
    commit(&n1, CommitRule::default());
    s1.pass().await.unwrap();
    lake.put(
        "cf/step-1/a",
        bytes::Bytes::from(pattern(9, 10)),
        &Default::default(),
    )
    .await
    .unwrap();
    // node-2 writes its rank's file (no marker: rank 0 is on node-1) and follows.
    write_step(&n2, "step-1", &[("b", pattern(2, 1000))], false);
    Journal::open(&n2.journal_dir())
        .unwrap()
        .mark_seen("step-1")
        .unwrap();
    s2.pass().await.unwrap();
    assert_eq!(
        commit(&n2, CommitRule::default()).len(),
        1,
        "node-2 follows"
    );
    let r = s2.pass().await.unwrap();
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert!(
        r.failed[0]
            .1
            .contains("replaced or deleted since it was uploaded; node node-1 uploads it again"),
        "{r:?}"
    );
    assert!(check_manifests(&*lake, "cf/").await.is_empty());
    let st = s2.status(Some(r.failed[0].1.clone()), &[]).unwrap();
    assert!(st.latest_durable.is_none(), "not durable");
    // node-1 finds its object replaced when it publishes, and mends it.
    let r = s1.pass().await.unwrap();
    assert!(
        r.failed
            .iter()
            .any(|(_, e)| e.contains("this node uploads it again")),
        "{r:?}"
    );
    assert_eq!(s1.pass().await.unwrap().durable, ["step-1"]);
    assert_eq!(
        check_manifests(&*lake, "cf/").await["step-1"]["a"],
        md5_of(&pattern(1, 2 * MIB))
    );
    // step-2: both nodes wrote the same path with different bytes.
    write_step(&n1, "step-2", &[("same", pattern(3, 1000))], true);
    write_step(&n2, "step-2", &[("same", pattern(4, 1000))], false);
    Journal::open(&n2.journal_dir())
        .unwrap()
        .mark_seen("step-2")
        .unwrap(); // as node-2's mount notes a step it writes
    commit(&n1, CommitRule::default());
    s1.pass().await.unwrap();
    s2.pass().await.unwrap(); // node-1's part is in: node-2's mount is asked to commit
    assert_eq!(commit(&n2, CommitRule::default()).len(), 1);
    let r = s2.pass().await.unwrap();
    assert!(
        r.failed
            .iter()
            .any(|(s, e)| s == "step-2" && e.contains("both wrote same")),
        "{r:?}"
    );
    assert!(
        !check_manifests(&*lake, "cf/").await.contains_key("step-2"),
        "never falsely durable"
    );
    s1.stop().await;
    s2.stop().await;
}

#[test]
fn sigterm_stops_a_sync_in_the_middle_of_an_upload() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let az = Azurite::start();
    rt.block_on(az.create_container("ckpt"));
    let pool = tempfile::tempdir().unwrap();
    let vol = volume(pool.path(), &az, "ckpt", "term", "n1", None);
    write_step(&vol, "step-1", &[("big", pattern(1, 256 * MIB))], true);
    commit(&vol, CommitRule::default());
    let mut child = Command::new(tidepool_bin())
        .args(["sync", "--cache-dir"])
        .arg(pool.path())
        .env(
            "AZURE_STORAGE_KEY",
            tidepool_csi::testing::azurite::ACCOUNT_KEY,
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited =
        tidepool_csi::testing::within(Duration::from_secs(10), || child.try_wait().unwrap());
    let status = exited.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("tidepool sync did not stop within 10 s of SIGTERM")
    });
    assert!(status.success(), "{status}");
}
