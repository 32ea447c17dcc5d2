//! The `tidepool agent` binary against a real control plane (etcd + kube-apiserver +
//! kube-controller-manager, `tidepool_api::envtest`) and a real lake (Azurite): it
//! creates its node's CachePool, acts on the assignments written into it, and reports
//! status the server's schema accepts; with the operator binary running too, a
//! DatasetCache reaches Ready from the agent's reports. Skipped, with a line saying
//! so, where the envtest binaries are missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tidepool_api::cache_pool::NodeDatasetPhase;
use tidepool_api::envtest::ControlPlane;
use tidepool_api::{CachePool, DatasetCache, Phase, control_plane_or_skip};
use tidepool_csi::lake::Lake;
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
    // Assign as the operator does: an Eager dataset with a Secret, and one whose
    // Secret does not exist.
    let url = az.url("data", "ds");
    let assign = |secret: &str, uid: &str, name: &str| {
        json!({"owner": {"namespace": "ml-a", "name": name, "uid": uid, "generation": 1},
               "volumeHandle": format!("tidepool-{uid}"),
               "source": {"url": url, "credentials": {"secretRef": {"name": secret}}},
               "prefetch": {"policy": "Eager"}})
    };
    let spec = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
        "spec": {"datasets": [assign("lake", "u1", "good"), assign("nope", "u2", "bad")], "checkpointSyncs": []}});
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
        "both datasets reported, the good one Ready",
        || async {
            let st = pool_status(&client, "agent-a").await?;
            let good = st.datasets.iter().find(|d| d.uid == "u1")?;
            (good.phase == NodeDatasetPhase::Ready
                && good.bytes_cached == total as i64
                && st.datasets.len() == 2)
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
