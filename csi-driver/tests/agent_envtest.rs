//! The `tidepool agent` binary against a real control plane (etcd + kube-apiserver +
//! kube-controller-manager, `tidepool_api::envtest`) and a real lake (Azurite): it
//! creates its node's CachePool, acts on the assignments written into it, and reports
//! status the server's schema accepts; with the operator binary running too, a
//! DatasetCache reaches Ready from the agent's reports. A checkpoint sync assignment is
//! reported from its volume's files by the agent's pool side run in the test process
//! (to ask its resolvers too). Skipped, with a line saying so, where the envtest
//! binaries are missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tidepool_api::cache_pool::NodeDatasetPhase;
use tidepool_api::envtest::ControlPlane;
use tidepool_api::volume::{VolumeAttributes, VolumeKind};
use tidepool_api::{CachePool, DatasetCache, Phase, control_plane_or_skip};
use tidepool_csi::agent::datasets::LakeSettings;
use tidepool_csi::agent::{Agent, AgentConfig, CheckpointSettings, checkpoints};
use tidepool_csi::cache::{CacheConfig, CachePool as Pool};
use tidepool_csi::checkpoint::commit::CommitRule;
use tidepool_csi::checkpoint::manifest::Layout;
use tidepool_csi::checkpoint::store::{Store, VolumeConfig, VolumeLayout};
use tidepool_csi::checkpoint::sync::{SyncConfig, Syncer};
use tidepool_csi::lake::{Credentials, Lake, LakeUrl, Secret as LakeSecret};
use tidepool_csi::testing::azurite::ACCOUNT_KEY;
use tidepool_csi::testing::{Azurite, pattern};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A child process killed on drop, its log printed if the test failed.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ---\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Proc { child, log, name }
}

async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn node(client: &Client, name: &str) {
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    labels: Some(BTreeMap::from([("gpu".to_owned(), name.to_owned())])),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

async fn namespace(client: &Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

async fn lake_secret(client: &Client, ns: &str) {
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("lake".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "accountKey".to_owned(),
                    ByteString(ACCOUNT_KEY.as_bytes().to_vec()),
                )])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

fn agent(cp: &ControlPlane, node: &str, work: &Path) -> Proc {
    spawn(
        "agent",
        Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["agent", "--node-name", node, "--heartbeat", "2s"])
            // The test lake: Azurite on 127.0.0.1 over HTTP.
            .args(["--lake-endpoint", "http://127.0.0.1"])
            .arg("--cache-dir")
            .arg(work.join("pool"))
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .env("TIDEPOOL_LOG", "info"),
        work,
    )
}

async fn upload(az: &Azurite) -> u64 {
    let lake = az.lake("data").await;
    let mut total = 0;
    for i in 0..20u64 {
        let data = pattern(i, 100_000 + i as usize * 7_000);
        total += data.len() as u64;
        lake.put(
            &format!("ds/f{i:02}.bin"),
            Bytes::from(data),
            &Default::default(),
        )
        .await
        .unwrap();
    }
    total
}

async fn pool_status(client: &Client, node: &str) -> Option<tidepool_api::CachePoolStatus> {
    Api::<CachePool>::all(client.clone())
        .get_opt(node)
        .await
        .unwrap()?
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_creates_its_pool_serves_assignments_and_reports_them() {
    let cp =
        control_plane_or_skip!("the_agent_creates_its_pool_serves_assignments_and_reports_them");
    let _one = SERIAL.lock().await;
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let az = Azurite::start();
    let total = upload(&az).await;
    node(&client, "agent-a").await;
    namespace(&client, "ml-a").await;
    lake_secret(&client, "ml-a").await;
    let work = tempfile::tempdir().unwrap();
    let _agent = agent(cp, "agent-a", work.path());

    // The pool exists, owned by its Node.
    let pools: Api<CachePool> = Api::all(client.clone());
    let pool = eventually(Duration::from_secs(30), "the agent's CachePool", || async {
        pools.get_opt("agent-a").await.unwrap()
    })
    .await;
    let owner = &pool.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", "agent-a")
    );
    // Assign as the operator does: an Eager dataset with a Secret, one whose Secret
    // does not exist, and one on an endpoint this agent may not open (its Secret
    // exists: the refusal comes first, and nothing is sent there).
    let url = az.url("data", "ds");
    let assign = |secret: &str, uid: &str, name: &str| {
        json!({"owner": {"namespace": "ml-a", "name": name, "uid": uid, "generation": 1},
               "volumeHandle": format!("tidepool-{uid}"),
               "source": {"url": url, "credentials": {"secretRef": {"name": secret}}},
               "prefetch": {"policy": "Eager"}})
    };
    let mut elsewhere = assign("lake", "u3", "elsewhere");
    elsewhere["source"]["url"] = json!("https://attacker.example.com/data/ds");
    // And one that asks for the node's managed identity, which no namespace may use
    // unless the administrator says so (--managed-identity-namespace).
    let mut node_identity = assign("lake", "u4", "node-identity");
    node_identity["source"]["credentials"] = json!({"managedIdentity": {}});
    let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
        "spec": {"datasets": [assign("lake", "u1", "good"), assign("nope", "u2", "bad"), elsewhere, node_identity], "checkpointSyncs": []}});
    pools
        .patch(
            "agent-a",
            &PatchParams::apply("tidepool-operator"),
            &Patch::Apply(&spec),
        )
        .await
        .unwrap();
    let st = eventually(
        Duration::from_secs(60),
        "every dataset reported, the good one Ready",
        || async {
            let st = pool_status(&client, "agent-a").await?;
            let good = st.datasets.iter().find(|d| d.uid == "u1")?;
            (good.phase == NodeDatasetPhase::Ready
                && good.bytes_cached == total as i64
                && st.datasets.len() == 4)
                .then_some(st)
        },
    )
    .await;
    let good = st.datasets.iter().find(|d| d.uid == "u1").unwrap();
    assert_eq!((good.objects, good.bytes_total), (20, total as i64));
    let bad = st.datasets.iter().find(|d| d.uid == "u2").unwrap();
    assert_eq!(bad.phase, NodeDatasetPhase::Failed);
    let msg = bad.message.as_deref().unwrap();
    assert!(msg.contains("Secret ml-a/nope not found"), "{msg}");
    let refused = st.datasets.iter().find(|d| d.uid == "u3").unwrap();
    assert_eq!(refused.phase, NodeDatasetPhase::Failed);
    let msg = refused.message.as_deref().unwrap();
    assert!(
        msg.contains("lake endpoint https://attacker.example.com is not allowed on this node")
            && msg.contains("node.lake.allowedEndpoints"),
        "{msg}"
    );
    let identity = st.datasets.iter().find(|d| d.uid == "u4").unwrap();
    assert_eq!(identity.phase, NodeDatasetPhase::Failed);
    let msg = identity.message.as_deref().unwrap();
    assert!(
        msg.contains("managed identity is not enabled for namespace ml-a")
            && msg.contains("--managed-identity-namespace"),
        "{msg}"
    );
    assert!(
        !format!("{st:?}").contains(ACCOUNT_KEY),
        "no credential in status"
    );
    assert!(st.capacity_bytes > 0 && st.used_bytes >= total as i64);
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    // The heartbeat moves.
    let beat = st.heartbeat_time.clone().unwrap();
    eventually(Duration::from_secs(20), "a newer heartbeat", || async {
        let st = pool_status(&client, "agent-a").await?;
        (st.heartbeat_time?.0 > beat.0).then_some(())
    })
    .await;
    // Field ownership: the agent owns status only.
    let pool = pools.get("agent-a").await.unwrap();
    for m in pool.managed_fields() {
        if m.manager.as_deref() == Some("tidepool-agent") {
            assert!(
                m.operation.as_deref() == Some("Update")
                    || m.subresource.as_deref() == Some("status"),
                "{m:?}"
            );
        }
    }
    // The assignment goes: so does its status entry.
    let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
        "spec": {"datasets": [assign("lake", "u1", "good")], "checkpointSyncs": []}});
    pools
        .patch(
            "agent-a",
            &PatchParams::apply("tidepool-operator"),
            &Patch::Apply(&spec),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the removed assignment leaves the status",
        || async {
            let st = pool_status(&client, "agent-a").await?;
            (st.datasets.len() == 1).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operator_a_dataset_cache_becomes_ready_from_the_agents_reports() {
    let cp = control_plane_or_skip!(
        "with_the_operator_a_dataset_cache_becomes_ready_from_the_agents_reports"
    );
    let _one = SERIAL.lock().await;
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let az = Azurite::start();
    upload(&az).await;
    node(&client, "agent-b").await;
    namespace(&client, "ml-b").await;
    lake_secret(&client, "ml-b").await;
    let work = tempfile::tempdir().unwrap();
    let _agent = agent(cp, "agent-b", work.path());
    let operator_bin = Path::new(env!("CARGO_BIN_EXE_tidepool"))
        .parent()
        .unwrap()
        .join("tidepool-operator");
    if !operator_bin.exists() {
        tidepool_api::envtest::skip(
            "with_the_operator_a_dataset_cache_becomes_ready_from_the_agents_reports",
            &format!(
                "{} is not built (cargo build -p tidepool-operator)",
                operator_bin.display()
            ),
        );
        return;
    }
    let _operator = spawn(
        "operator",
        Command::new(&operator_bin)
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .args(["--no-leader-election", "--admin-addr", "127.0.0.1:0"]),
        work.path(),
    );
    let d: DatasetCache = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "DatasetCache",
        "metadata": {"name": "imagenet", "namespace": "ml-b"},
        "spec": {"source": {"url": az.url("data", "ds"), "credentials": {"secretRef": {"name": "lake"}}},
                 "prefetch": {"policy": "Eager"},
                 "nodeSelector": {"matchLabels": {"gpu": "agent-b"}}},
    }))
    .unwrap();
    let api: Api<DatasetCache> = Api::namespaced(client.clone(), "ml-b");
    api.create(&PostParams::default(), &d).await.unwrap();
    let st = eventually(Duration::from_secs(90), "DatasetCache Ready", || async {
        let s = api.get("imagenet").await.ok()?.status?;
        (s.phase == Phase::Ready).then_some(s)
    })
    .await;
    assert_eq!((st.nodes_desired, st.nodes_ready), (1, 1));
    assert!(st.bytes_cached > 0);
    assert_eq!(st.snapshot.as_ref().map(|s| s.objects), Some(20));
}

/// Writes `step` (a file and its `.metadata` marker) into `layout` and commits it, as
/// the checkpoint mount does.
fn commit_step(layout: &VolumeLayout, step: &str) {
    let dir = layout.tree().join(step);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.bin"), pattern(1, 300_000)).unwrap();
    std::fs::write(dir.join(".metadata"), step).unwrap();
    let store = Store::open(layout.clone(), CommitRule::default()).unwrap();
    let done: Vec<_> = store.tick().into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(done.len(), 1, "{step} commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_assignment_reports_its_steps_and_gives_its_volume_settings() {
    let cp = control_plane_or_skip!(
        "a_checkpoint_assignment_reports_its_steps_and_gives_its_volume_settings"
    );
    let _one = SERIAL.lock().await;
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let az = Azurite::start();
    node(&client, "agent-c").await;
    namespace(&client, "ml-c").await;
    lake_secret(&client, "ml-c").await;
    let work = tempfile::tempdir().unwrap();
    let pool_dir = work.path().join("pool");

    // The volume as a checkpoint mount on this node leaves it: step-1 durable in the
    // lake, step-2 committed and waiting for the part of node gpu-b (which announced
    // the step and never put its part in).
    let url = az.url("ckpt", "runs/c");
    let layout = checkpoints::volume_layout(&pool_dir, &url).unwrap();
    layout
        .create(&VolumeConfig {
            url: LakeUrl::parse(&url).unwrap().to_string(),
            node: "agent-c".into(),
            keep_local: None,
            keep_remote: None,
            nodes: None,
            // Filled in by the agent from the assignment below.
            owner_uid: None,
        })
        .unwrap();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    lake.put(
        &Layout::new("runs/c/").intent("step-2", "gpu-b"),
        Bytes::new(),
        &Default::default(),
    )
    .await
    .unwrap();
    // No settle window: the intents alone decide here.
    let mut sync = Syncer::start(
        lake.clone(),
        layout.clone(),
        "runs/c/",
        SyncConfig {
            settle: Duration::ZERO,
            ..SyncConfig::default()
        },
    )
    .await
    .unwrap();
    commit_step(&layout, "step-1");
    commit_step(&layout, "step-2");
    assert_eq!(sync.pass().await.unwrap().durable, vec!["step-1"]);
    sync.stop().await;

    // The agent's pool side.
    let cache = Pool::open(CacheConfig::new(&pool_dir, 1 << 30))
        .await
        .unwrap();
    let agent = Agent::new(
        AgentConfig {
            node_name: "agent-c".into(),
            socket: work.path().join("agent.sock"),
            lake: LakeSettings::default(),
            fuse_threads: 1,
            passthrough: false,
            managed_identity_namespaces: Vec::new(),
        },
        cache,
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let pool_side = tokio::spawn(tidepool_csi::agent::kube::run(
        agent.clone(),
        client.clone(),
        Duration::from_secs(1),
    ));
    let pools: Api<CachePool> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "the agent's CachePool", || async {
        pools.get_opt("agent-c").await.unwrap()
    })
    .await;
    // Assign as the operator does: the volume above with a Secret, a commit rule and
    // a retention; and another whose Secret does not exist.
    let assign = |uid: &str, name: &str, prefix: &str, secret: &str| {
        json!({"owner": {"namespace": "ml-c", "name": name, "uid": uid, "generation": 1},
               "volumeHandle": format!("tidepool-{uid}"),
               "destination": {"url": az.url("ckpt", prefix), "credentials": {"secretRef": {"name": secret}}},
               "commit": {"markers": ["DONE"], "quiescence": "5m"},
               "retention": {"keepLocal": 2, "keepRemote": 0}})
    };
    let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
        "spec": {"datasets": [], "checkpointSyncs": [
            assign("c1", "llama", "runs/c", "lake"),
            assign("c2", "other", "runs/other", "nope")]}});
    pools
        .patch(
            "agent-c",
            &PatchParams::apply("tidepool-operator"),
            &Patch::Apply(&spec),
        )
        .await
        .unwrap();
    let st = eventually(
        Duration::from_secs(30),
        "both checkpoint syncs in the pool's status",
        || async {
            let st = pool_status(&client, "agent-c").await?;
            (st.checkpoint_syncs.len() == 2).then_some(st)
        },
    )
    .await;
    let good = st.checkpoint_syncs.iter().find(|c| c.uid == "c1").unwrap();
    assert_eq!(
        (
            good.latest_committed_step,
            good.latest_durable_step,
            good.pending_bytes,
            good.failed
        ),
        (Some(2), Some(1), 0, false),
        "{good:?}"
    );
    let msg = good.message.as_deref().unwrap_or_default();
    assert!(msg.contains("step-2 waits for node gpu-b"), "{msg}");
    let bad = st.checkpoint_syncs.iter().find(|c| c.uid == "c2").unwrap();
    assert!(bad.failed, "{bad:?}");
    assert_eq!(
        (bad.latest_committed_step, bad.pending_bytes),
        (None, 0),
        "nothing written for it on this node"
    );
    let msg = bad.message.as_deref().unwrap();
    assert!(msg.contains("Secret ml-c/nope not found"), "{msg}");
    assert!(
        !format!("{st:?}").contains(ACCOUNT_KEY),
        "no credential in status"
    );

    // The volume served for the assignment gets its settings and credentials.
    let attrs = |kind: VolumeKind, uid: &str| VolumeAttributes {
        kind,
        namespace: "ml-c".into(),
        name: "llama".into(),
        uid: uid.into(),
        url: url.clone(),
        prefetch: Default::default(),
        refresh: Default::default(),
        pinned: false,
    };
    let settings = agent.checkpoint_settings.lock().clone().unwrap();
    assert_eq!(
        settings(&attrs(VolumeKind::CheckpointSync, "c1")),
        Some(CheckpointSettings {
            rule: CommitRule {
                markers: vec!["DONE".into()],
                quiescence: Some(Duration::from_secs(300)),
            },
            keep_local: Some(2),
            keep_remote: None,
            nodes: None,
            owner_uid: Some("c1".into()),
        })
    );
    assert_eq!(
        settings(&attrs(VolumeKind::CheckpointSync, "unknown")),
        None
    );
    let credentials = agent.assignment_credentials.lock().clone().unwrap();
    assert_eq!(
        credentials(&attrs(VolumeKind::CheckpointSync, "c1")),
        Some(Credentials::AccountKey(LakeSecret::new(
            ACCOUNT_KEY.to_owned()
        )))
    );
    assert_eq!(
        credentials(&attrs(VolumeKind::CheckpointSync, "c2")),
        None,
        "nothing to hand out while its Secret is missing"
    );
    // Step-2 is committed and not in the lake: were the CheckpointSync's assignment
    // taken away (deleted with tidepool.dev/discard-pending), its files stay.
    pool_side.abort();
    let _ = pool_side.await;
    // (As a pod's mount of it, or the agent's sync of it, records its owner.)
    let cfg = layout.read_config().unwrap();
    layout
        .create(&VolumeConfig {
            owner_uid: Some("c1".into()),
            ..cfg
        })
        .unwrap();
    assert_eq!(
        agent.remove_unassigned_checkpoints(&Default::default()),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(
        layout.read_config().is_ok(),
        "a volume with a pending commit is kept"
    );
}

/// Committed steps are never stranded by an agent restart: a checkpoint volume with a
/// commit not yet uploaded, that no pod mounts (unstaged, or its node's agent replaced
/// since), is uploaded by the agent with the credentials of its CheckpointSync's
/// assignment, and takes the assignment's node count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_nobody_mounts_uploads_its_commits_after_an_agent_restart() {
    let cp =
        control_plane_or_skip!("a_volume_nobody_mounts_uploads_its_commits_after_an_agent_restart");
    let _one = SERIAL.lock().await;
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let az = Azurite::start();
    node(&client, "agent-d").await;
    namespace(&client, "ml-d").await;
    lake_secret(&client, "ml-d").await;
    let work = tempfile::tempdir().unwrap();
    let pool_dir = work.path().join("pool");
    let url = az.url("ckpt", "runs/d");
    // What a previous agent left: step-1 committed, nothing uploaded, no volume staged.
    let layout = checkpoints::volume_layout(&pool_dir, &url).unwrap();
    layout
        .create(&VolumeConfig {
            url: LakeUrl::parse(&url).unwrap().to_string(),
            node: "agent-d".into(),
            ..VolumeConfig::default()
        })
        .unwrap();
    commit_step(&layout, "step-1");
    // A new agent, its pool side and its syncs.
    let cache = Pool::open(CacheConfig::new(&pool_dir, 1 << 30))
        .await
        .unwrap();
    let agent = Agent::new(
        AgentConfig {
            node_name: "agent-d".into(),
            socket: work.path().join("agent.sock"),
            lake: LakeSettings::default(),
            fuse_threads: 1,
            passthrough: false,
            managed_identity_namespaces: Vec::new(),
        },
        cache,
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let syncs = tokio::spawn(tidepool_csi::checkpoint::service::run_pool(
        pool_dir.clone(),
        agent.sync_source(),
        SyncConfig::default(),
        Duration::from_millis(500),
        Vec::new(),
        stop_rx,
    ));
    let pool_side = tokio::spawn(tidepool_csi::agent::kube::run(
        agent.clone(),
        client.clone(),
        Duration::from_secs(1),
    ));
    let pools: Api<CachePool> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "the agent's CachePool", || async {
        pools.get_opt("agent-d").await.unwrap()
    })
    .await;
    let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
        "spec": {"datasets": [], "checkpointSyncs": [
            {"owner": {"namespace": "ml-d", "name": "llama", "uid": "d1", "generation": 1},
             "volumeHandle": "tidepool-d1",
             "destination": {"url": url, "credentials": {"secretRef": {"name": "lake"}}},
             "commit": {"markers": [".metadata"], "nodes": 1},
             "retention": {"keepLocal": 0, "keepRemote": 0}}]}});
    pools
        .patch(
            "agent-d",
            &PatchParams::apply("tidepool-operator"),
            &Patch::Apply(&spec),
        )
        .await
        .unwrap();
    let lake: Arc<dyn Lake> = Arc::new(az.lake("ckpt").await);
    let names = Layout::new("runs/d/");
    eventually(
        Duration::from_secs(60),
        "step-1 durable in the lake",
        || async {
            tidepool_csi::checkpoint::restore::durable_steps(&*lake, &names)
                .await
                .unwrap()
                .iter()
                .any(|(s, _)| s == "step-1")
                .then_some(())
        },
    )
    .await;
    let m = tidepool_csi::testing::lake_check::check_manifests(&*lake, "runs/d/").await;
    assert_eq!(
        m["step-1"]["model.bin"],
        tidepool_csi::testing::lake_check::md5_of(&pattern(1, 300_000))
    );
    assert_eq!(
        layout.read_config().unwrap().nodes,
        Some(1),
        "the assignment's node count reached the volume"
    );
    let st = eventually(
        Duration::from_secs(30),
        "the pool reports it durable",
        || async {
            let st = pool_status(&client, "agent-d").await?;
            let c = st.checkpoint_syncs.into_iter().find(|c| c.uid == "d1")?;
            (c.latest_durable_step == Some(1)).then_some(c)
        },
    )
    .await;
    assert_eq!((st.pending_bytes, st.failed), (0, false), "{st:?}");
    // The CheckpointSync is deleted (its assignment goes, once nothing is pending): the
    // volume's local files leave the pool, and its sync ends.
    let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
        "spec": {"datasets": [], "checkpointSyncs": []}});
    pools
        .patch(
            "agent-d",
            &PatchParams::apply("tidepool-operator"),
            &Patch::Apply(&spec),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the volume's files gone",
        || async { (!layout.dir.exists()).then_some(()) },
    )
    .await;
    assert!(
        checkpoints::volume_layout(&pool_dir, &url)
            .unwrap()
            .read_config()
            .is_err()
    );
    let _ = stop.send(true);
    let _ = syncs.await;
    pool_side.abort();
}

/// A TCP proxy in front of the lake that counts the bytes the lake sends: what the
/// lake serves, counted at the lake's side of the network.
struct CountingProxy {
    port: u16,
    served: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: u16) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(lake) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut lr, mut lw) = lake.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut cr, &mut lw).await;
                        let _ = lw.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            match lr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    counter
                                        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        CountingProxy { port, served, task }
    }

    fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_warm_one_dataset_and_the_lake_serves_it_about_once() {
    let cp =
        control_plane_or_skip!("three_agents_warm_one_dataset_and_the_lake_serves_it_about_once");
    let _one = SERIAL.lock().await;
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let az = Azurite::start();
    // 24 files of 1 to 3.3 MiB (one 4 MiB block each, with the Content-MD5 Azure
    // stores for a Put Blob).
    let lake = az.lake("data").await;
    let mut total = 0u64;
    for i in 0..24u64 {
        let data = pattern(1000 + i, (1 << 20) + i as usize * 100_003);
        total += data.len() as u64;
        lake.put(
            &format!("shared/f{i:02}.bin"),
            Bytes::from(data),
            &Default::default(),
        )
        .await
        .unwrap();
    }
    let proxy = CountingProxy::start(az.port()).await;
    namespace(&client, "ml-p").await;
    lake_secret(&client, "ml-p").await;
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("peer-secret");
    std::fs::write(&secret, "a-cluster-secret-of-enough-bytes\n").unwrap();
    let names = ["peer-a", "peer-b", "peer-c"];
    let mut agents = Vec::new();
    for name in names {
        node(&client, name).await;
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        agents.push(spawn(
            "agent",
            Command::new(env!("CARGO_BIN_EXE_tidepool"))
                .args(["agent", "--node-name", name, "--heartbeat", "2s"])
                .args(["--lake-endpoint", "http://127.0.0.1"])
                .args(["--peer-listen", &addr])
                .arg("--peer-secret-file")
                .arg(&secret)
                .arg("--cache-dir")
                .arg(dir.join("pool"))
                .arg("--kubeconfig")
                .arg(&cp.kubeconfig)
                .env("TIDEPOOL_LOG", "info"),
            &dir,
        ));
    }
    let pools: Api<CachePool> = Api::all(client.clone());
    for name in names {
        eventually(
            Duration::from_secs(30),
            "each agent's CachePool with its peer endpoint",
            || async { pool_status(&client, name).await?.peer },
        )
        .await;
    }
    // One Eager dataset, assigned to all three at once (as the operator would), read
    // through the counting proxy.
    let url = format!(
        "http://127.0.0.1:{}/devstoreaccount1/data/shared",
        proxy.port
    );
    let before = proxy.served();
    for name in names {
        let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
            "spec": {"datasets": [{"owner": {"namespace": "ml-p", "name": "shared", "uid": "up1", "generation": 1},
                "volumeHandle": "tidepool-up1",
                "source": {"url": url, "credentials": {"secretRef": {"name": "lake"}}},
                "prefetch": {"policy": "Eager"}}], "checkpointSyncs": []}});
        pools
            .patch(
                name,
                &PatchParams::apply("tidepool-operator"),
                &Patch::Apply(&spec),
            )
            .await
            .unwrap();
    }
    let mut statuses = Vec::new();
    for name in names {
        statuses.push(
            eventually(
                Duration::from_secs(120),
                "the dataset Ready and whole on every node",
                || async {
                    let st = pool_status(&client, name).await?;
                    let d = st.datasets.iter().find(|d| d.uid == "up1")?;
                    (d.phase == NodeDatasetPhase::Ready && d.bytes_cached == total as i64)
                        .then_some(st)
                },
            )
            .await,
        );
    }
    let served = proxy.served() - before;
    eprintln!("the lake sent {served} bytes for a {total}-byte dataset on three nodes");
    // Each byte about once (plus listings and HTTP headers), where three independent
    // nodes would take three times the dataset.
    assert!(
        served < total + total / 2,
        "the lake sent {served} bytes for a {total}-byte dataset warmed on three nodes"
    );
    let entry = |st: &tidepool_api::CachePoolStatus| {
        st.datasets.iter().find(|d| d.uid == "up1").unwrap().clone()
    };
    let from_lake: i64 = statuses.iter().map(|s| entry(s).bytes_from_lake).sum();
    let from_peers: i64 = statuses.iter().map(|s| entry(s).bytes_from_peers).sum();
    assert!(
        from_peers as u64 >= total + total / 2,
        "the nodes took only {from_peers} bytes from each other"
    );
    assert_eq!(
        from_lake + from_peers,
        3 * total as i64,
        "every byte counted once per node"
    );
    for st in &statuses {
        let p = st.peer.as_ref().unwrap();
        assert!(
            p.serving && p.endpoint.starts_with("127.0.0.1:") && p.datasets.len() == 1,
            "{p:?}"
        );
    }
    drop(agents);
}
