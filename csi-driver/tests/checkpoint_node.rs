//! The checkpoint volume on a node as a cluster runs it: the real `tidepool agent` (which
//! also uploads every checkpoint volume's committed steps) and `tidepool csi`
//! processes, kubelet's CSI calls over the plugin's socket, real FUSE, a real lake
//! (Azurite). A job writes steps through the published target while the agent is
//! killed with `kill -9`, once with a file half-written and once in the middle of an
//! upload; every committed step becomes durable with exactly the bytes written (each
//! checked by a restore, which verifies MD5 per file against the manifest).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tidepool_csi::checkpoint::manifest::Layout;
use tidepool_csi::checkpoint::restore::{StepChoice, durable_steps, restore};
use tidepool_csi::checkpoint::store::VolumeLayout;
use tidepool_csi::checkpoint::sync::SyncStatus;
use tidepool_csi::csi_proto as pb;
use tidepool_csi::lake::Lake;
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::node::{
    NodePaths, NodeProcess, csi_clients, free_port, http_get, rw_capability, sample,
};
use tidepool_csi::testing::{Azurite, pattern};

struct Node {
    paths: NodePaths,
    _work: tempfile::TempDir,
    url: String,
}

impl Node {
    fn new() -> Node {
        let work = tempfile::tempdir().unwrap();
        let paths = NodePaths::new(Path::new(env!("CARGO_BIN_EXE_tidepool")), work.path());
        Node {
            paths,
            _work: work,
            url: String::new(),
        }
    }
    fn staging(&self) -> PathBuf {
        self.paths.work.join("kubelet/staging/ckpt")
    }
    fn target(&self) -> PathBuf {
        self.paths.work.join("kubelet/pods/p1/volumes/mount")
    }
    fn context(&self) -> HashMap<String, String> {
        HashMap::from([
            ("tidepool.dev/kind".into(), "CheckpointSync".into()),
            ("tidepool.dev/namespace".into(), "ml".into()),
            ("tidepool.dev/name".into(), "llm".into()),
            ("tidepool.dev/uid".into(), "u2".into()),
            ("tidepool.dev/url".into(), self.url.clone()),
        ])
    }
    fn stage_req(&self) -> pb::NodeStageVolumeRequest {
        pb::NodeStageVolumeRequest {
            volume_id: "ckpt".into(),
            publish_context: Default::default(),
            staging_target_path: self.staging().display().to_string(),
            volume_capability: Some(rw_capability()),
            secrets: HashMap::from([("accountKey".into(), ACCOUNT_KEY.into())]),
            volume_context: self.context(),
        }
    }
    fn publish_req(&self) -> pb::NodePublishVolumeRequest {
        pb::NodePublishVolumeRequest {
            volume_id: "ckpt".into(),
            publish_context: Default::default(),
            staging_target_path: self.staging().display().to_string(),
            target_path: self.target().display().to_string(),
            volume_capability: Some(rw_capability()),
            readonly: false,
            secrets: Default::default(),
            volume_context: self.context(),
        }
    }
    fn volume(&self) -> VolumeLayout {
        let all = VolumeLayout::all(&self.paths.pool).unwrap();
        assert_eq!(all.len(), 1, "one checkpoint volume in the pool");
        all[0].clone()
    }
    fn mounts_left(&self) -> Vec<PathBuf> {
        self.paths.mounts_left()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.paths.detach_mounts();
    }
}

/// Files written into one step: relative path → bytes.
type Step = Vec<(String, Vec<u8>)>;

fn write_file(path: &Path, data: &[u8]) {
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Waits until `step` is durable in the lake (its manifest is there).
async fn wait_durable(
    lake: &dyn Lake,
    names: &Layout,
    step: &str,
    procs: &[&NodeProcess],
    vol: &VolumeLayout,
) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let steps = durable_steps(lake, names).await.unwrap();
        if steps.iter().any(|(s, _)| s == step) {
            return;
        }
        if Instant::now() > end {
            let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
            panic!(
                "{step} did not become durable within 120 s; status: {:?}\nlogs:\n{}",
                SyncStatus::read(vol).ok(),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Restores `step` (MD5-verified against its manifest) and compares every file with
/// what was written; nothing else may be in it.
async fn check_restored(lake: &dyn Lake, prefix: &str, step: &str, files: &Step) {
    let dir = tempfile::tempdir().unwrap();
    let r = restore(
        lake,
        prefix,
        "test",
        dir.path(),
        &StepChoice::Named(step.into()),
        4,
    )
    .await
    .unwrap_or_else(|e| panic!("restoring {step}: {e}"));
    assert_eq!(
        r.files as usize,
        files.len(),
        "{step}: files in the manifest"
    );
    for (rel, data) in files {
        let got = std::fs::read(dir.path().join(step).join(rel)).unwrap();
        assert!(got == *data, "{step}/{rel}: restored bytes differ");
    }
}

async fn checkpoint_volume_survives_kill_9(passthrough: bool) {
    let az = Azurite::start();
    let lake = az.lake("ckpt").await;
    let mut n = Node::new();
    n.url = az.url("ckpt", "job1");
    let url = tidepool_csi::lake::LakeUrl::parse(&n.url).unwrap();
    let prefix = url.prefix.as_str();
    let names = Layout::new(prefix);
    let extra: &[&str] = if passthrough {
        &[]
    } else {
        &["--no-passthrough"]
    };
    let mut agent = n.paths.start_agent_with("1GiB", extra);
    let _csi = n.paths.start_csi();
    let (_, mut node) = csi_clients(&n.paths.csi_socket).await;
    node.node_stage_volume(n.stage_req()).await.unwrap();
    node.node_publish_volume(n.publish_req()).await.unwrap();
    let root = n.target();
    let vol = n.volume();

    // 1. A DCP step: rank files, then `.metadata` last.
    let mut s100: Step = Vec::new();
    std::fs::create_dir(root.join("step-100")).unwrap();
    for r in 0..3u64 {
        let rel = format!("__{r}_0.distcp");
        let data = pattern(100 + r, 300_000 + 70_001 * r as usize);
        write_file(&root.join("step-100").join(&rel), &data);
        s100.push((rel, data));
    }
    let meta = pattern(199, 1234);
    write_file(&root.join("step-100/.metadata"), &meta);
    s100.push((".metadata".into(), meta));
    wait_durable(&lake, &names, "step-100", &[&agent], &vol).await;
    check_restored(&lake, prefix, "step-100", &s100).await;

    // A second pod mounts the claim `readOnly` (kubelet publishes with `readonly`): it
    // reads the step, and every write through its target fails with EROFS, while the
    // writer's target stays writable.
    let ro_target = n.paths.work.join("kubelet/pods/p2/volumes/mount");
    node.node_publish_volume(pb::NodePublishVolumeRequest {
        target_path: ro_target.display().to_string(),
        readonly: true,
        ..n.publish_req()
    })
    .await
    .unwrap();
    for (rel, data) in &s100 {
        let got = std::fs::read(ro_target.join("step-100").join(rel)).unwrap();
        assert!(got == *data, "step-100/{rel} through the read-only target");
    }
    let refused = [
        std::fs::OpenOptions::new()
            .write(true)
            .open(ro_target.join("step-100/.metadata"))
            .map(drop),
        std::fs::File::create(ro_target.join("step-100/new")).map(drop),
        std::fs::create_dir(ro_target.join("step-101")),
        std::fs::remove_file(ro_target.join("step-100/.metadata")),
    ];
    for r in refused {
        let e = r.expect_err("a write through a read-only publish");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    }
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: "ckpt".into(),
        target_path: ro_target.display().to_string(),
    })
    .await
    .unwrap();

    // 2. The agent dies while the job has a file half-written, a directory open and
    //    an Orbax temporary directory in progress. The plugin hands the live
    //    connection to the new agent, which takes it over: the open file keeps
    //    writing, the old entries keep resolving, the rename commits.
    std::fs::create_dir(root.join("step-200")).unwrap();
    let big = pattern(200, 24 << 20);
    let half = big.len() / 2;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(root.join("step-200/__0_0.distcp"))
        .unwrap();
    f.write_all_at(&big[..half], 0).unwrap();
    let orbax_tmp = root.join("step-300.orbax-checkpoint-tmp-7");
    std::fs::create_dir_all(orbax_tmp.join("state")).unwrap();
    let mut s300: Step = Vec::new();
    let d = pattern(300, 2 << 20);
    write_file(&orbax_tmp.join("state/array.zarr"), &d);
    s300.push(("state/array.zarr".into(), d));
    let listing = std::fs::read_dir(root.join("step-100")).unwrap();

    agent.kill9();
    // The rest of the file is written while no agent runs (without passthrough the
    // writes wait in the kernel for the next one).
    let writer = {
        let big = big.clone();
        std::thread::spawn(move || {
            f.write_all_at(&big[half..], half as u64)?;
            f.sync_all()?;
            drop(f);
            Ok::<_, std::io::Error>(())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = n.paths.start_agent_with("1GiB", extra);
    writer.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the write across the agent's restart failed: {e}\nagent:\n{}",
            agent.log()
        )
    });
    let listed: Vec<String> = listing
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed.len(),
        4,
        "a listing opened before the restart completes"
    );
    for (rel, data) in &s100 {
        let got = std::fs::read(root.join("step-100").join(rel)).unwrap_or_else(|e| {
            panic!(
                "step-100/{rel} after the restart: {e}\nagent:\n{}",
                agent.log()
            )
        });
        assert!(
            got == *data,
            "step-100/{rel} reads back exact after the restart"
        );
    }
    let mut s200: Step = vec![("__0_0.distcp".into(), big)];
    let d = pattern(201, 777_777);
    write_file(&root.join("step-200/__1_0.distcp"), &d);
    s200.push(("__1_0.distcp".into(), d));
    let meta = pattern(299, 999);
    write_file(&root.join("step-200/.metadata"), &meta);
    s200.push((".metadata".into(), meta));
    let d = pattern(301, 40_000);
    write_file(&orbax_tmp.join("state/meta.json"), &d);
    s300.push(("state/meta.json".into(), d));
    std::fs::rename(&orbax_tmp, root.join("step-300")).unwrap();
    write_file(&root.join("step-300/commit_success.txt"), b"ok");
    s300.push(("commit_success.txt".into(), b"ok".to_vec()));
    wait_durable(&lake, &names, "step-200", &[&agent], &vol).await;
    wait_durable(&lake, &names, "step-300", &[&agent], &vol).await;
    check_restored(&lake, prefix, "step-200", &s200).await;
    check_restored(&lake, prefix, "step-300", &s300).await;

    // 3. The agent dies in the middle of uploading a large step; the next one resumes
    //    it (and serves the volume on).
    std::fs::create_dir(root.join("step-400")).unwrap();
    let mut s400: Step = Vec::new();
    for r in 0..2u64 {
        let rel = format!("__{r}_0.distcp");
        let data = pattern(400 + r, 40 << 20);
        write_file(&root.join("step-400").join(&rel), &data);
        s400.push((rel, data));
    }
    write_file(&root.join("step-400/.metadata"), b"m");
    s400.push((".metadata".into(), b"m".to_vec()));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let uploading = SyncStatus::read(&vol)
            .ok()
            .and_then(|s| s.latest_committed)
            .is_some_and(|c| c.step == "step-400");
        if uploading || Instant::now() > end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill9();
    let admin = free_port();
    let with_admin: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--admin-addr", &admin])
        .collect();
    let agent = n.paths.start_agent_with("1GiB", &with_admin);
    wait_durable(&lake, &names, "step-400", &[&agent], &vol).await;
    check_restored(&lake, prefix, "step-400", &s400).await;
    let st = SyncStatus::read(&vol).unwrap();
    assert_eq!(st.pending_files, 0, "{st:?}");
    assert_eq!(st.last_error, None, "{st:?}");
    // The agent's metrics say the same of the volume.
    let (_, m) = http_get(&admin, "/metrics");
    assert_eq!(
        sample(&m, "tidepool_node_volumes{kind=\"checkpoint\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "tidepool_node_checkpoint_pending_bytes{volume=\"ckpt\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(
            &m,
            "tidepool_node_checkpoint_oldest_pending_seconds{volume=\"ckpt\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(&m, "tidepool_node_checkpoint_sync_failing{volume=\"ckpt\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &m,
            "tidepool_node_checkpoint_latest_durable_step{volume=\"ckpt\"}"
        ),
        400.0
    );

    // 4. Done: the pod's target and the staging mount go; the steps stay durable.
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: "ckpt".into(),
        target_path: n.target().display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: "ckpt".into(),
        staging_target_path: n.staging().display().to_string(),
    })
    .await
    .unwrap();
    assert_eq!(
        n.mounts_left(),
        Vec::<PathBuf>::new(),
        "nothing left mounted"
    );
    let steps: Vec<String> = durable_steps(&lake, &names)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, ["step-100", "step-200", "step-300", "step-400"]);
    drop((agent, _csi));

    // 5. The job resumes on another node: its checkpoint volume (a fresh pool, nothing
    //    on local disk) shows the durable steps read-only, fetched from the lake.
    let mut other = Node::new();
    other.paths.node = "other-node".into();
    other.url = n.url.clone();
    let _agent2 = other.paths.start_agent_with("1GiB", extra);
    let _csi2 = other.paths.start_csi();
    let (_, mut node2) = csi_clients(&other.paths.csi_socket).await;
    node2.node_stage_volume(other.stage_req()).await.unwrap();
    node2
        .node_publish_volume(other.publish_req())
        .await
        .unwrap();
    let root2 = other.target();
    let mut listed: Vec<String> = std::fs::read_dir(&root2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["step-100", "step-200", "step-300", "step-400"],
        "the other node's volume lists the durable steps"
    );
    for (step, files) in [
        ("step-100", &s100),
        ("step-300", &s300),
        ("step-400", &s400),
    ] {
        for (rel, data) in files.iter() {
            let got = std::fs::read(root2.join(step).join(rel))
                .unwrap_or_else(|e| panic!("{step}/{rel} on the other node: {e}"));
            assert!(
                got == *data,
                "{step}/{rel} reads back exact on the other node"
            );
        }
    }
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(root2.join("step-100/.metadata"))
        .expect_err("a step from the lake is read-only");
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_volume_with_passthrough_survives_kill_9_of_the_agent() {
    checkpoint_volume_survives_kill_9(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_volume_without_passthrough_survives_kill_9_of_the_agent() {
    checkpoint_volume_survives_kill_9(false).await;
}
