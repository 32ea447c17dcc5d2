//! The `tidepool-operator` binary, as built (so feature unification and TLS set-up are
//! what ships), against a real control plane: etcd, kube-apiserver and, when present,
//! kube-controller-manager (PV binding, PVC protection, garbage collection). See
//! `tidepool_api::envtest`. Each test skips with a line saying so where the binaries
//! are missing.
//!
//! Node agents do not run here: the tests create Nodes and their CachePools and write
//! pool status the way an agent does (its own field manager, status subresource).
//! Tests run one at a time (one operator deployment at a time); each uses its own
//! namespace and node names.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tidepool_api::envtest::ControlPlane;
use tidepool_api::{CachePool, CheckpointSync, DatasetCache, Phase, control_plane_or_skip};

/// The field manager an agent writes pool status with.
const AGENT: &str = "tidepool-agent";
const URL: &str = "https://acct.blob.core.windows.net/datasets/imagenet";

/// One test at a time: each runs its own operator processes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running operator process, killed on drop.
struct Operator {
    child: Child,
    identity: String,
    log: PathBuf,
}

impl Operator {
    fn start(cp: &ControlPlane, lease_ns: &str, identity: &str) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!(
            "tidepool-operator-{}-{identity}.log",
            std::process::id()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tidepool-operator"))
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .args(["--lease-namespace", lease_ns, "--identity", identity])
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Operator {
            child,
            identity: identity.to_owned(),
            log,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- operator {} log ---\n{}", self.identity, self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `limit`.
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
        if Instant::now() > end {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Env {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    /// Unique per test: node names and label values carry it.
    id: String,
}

async fn env(cp: &'static ControlPlane, test: &str) -> Env {
    static N: AtomicU32 = AtomicU32::new(0);
    let id = format!("{test}-{}", N.fetch_add(1, Ordering::Relaxed));
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let ns = format!("t-{id}");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    Env { cp, client, ns, id }
}

impl Env {
    fn node_name(&self, n: &str) -> String {
        format!("{}-{n}", self.id)
    }

    /// A Node with `gpu=<gpu>` and `test=<id>` labels, and its CachePool as the node's
    /// agent creates it: named after the node, owned by it.
    async fn node_with_pool(&self, n: &str, gpu: &str) -> String {
        let name = self.node_name(n);
        let labels = BTreeMap::from([
            ("gpu".to_owned(), gpu.to_owned()),
            ("test".to_owned(), self.id.clone()),
        ]);
        let node = Api::<Node>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &Node {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let pool = CachePool {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.clone(),
                    uid: node.uid().unwrap(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: Default::default(),
            status: None,
        };
        Api::<CachePool>::all(self.client.clone())
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
        name
    }

    async fn pool(&self, name: &str) -> CachePool {
        Api::<CachePool>::all(self.client.clone())
            .get(name)
            .await
            .unwrap()
    }

    /// Writes pool status as the node's agent does: heartbeat at `heartbeat`, every
    /// listed dataset Ready with `bytes` cached.
    async fn report(&self, pool: &str, heartbeat: Timestamp, datasets: &[(&DatasetCache, i64)]) {
        let entries: Vec<_> = datasets
            .iter()
            .map(|(d, bytes)| {
                json!({
                    "namespace": d.namespace().unwrap(),
                    "name": d.name_any(),
                    "uid": d.uid().unwrap(),
                    "phase": "Ready",
                    "snapshot": "s1",
                    "objects": 10,
                    "bytesCached": bytes,
                    "bytesTotal": bytes,
                })
            })
            .collect();
        let body = json!({
            "apiVersion": "tidepool.dev/v1alpha1",
            "kind": "CachePool",
            "status": {
                "capacityBytes": 1_000_000_000_000i64,
                "usedBytes": 0,
                "heartbeatTime": Time(heartbeat),
                "datasetCount": entries.len(),
                "datasets": entries,
            }
        });
        Api::<CachePool>::all(self.client.clone())
            .patch_status(pool, &PatchParams::apply(AGENT), &Patch::Apply(&body))
            .await
            .unwrap();
    }

    async fn dataset(&self, name: &str, gpu: &str) -> DatasetCache {
        let d: DatasetCache = serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1",
            "kind": "DatasetCache",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "source": {"url": URL},
                "nodeSelector": {"matchLabels": {"gpu": gpu, "test": self.id}},
            },
        }))
        .unwrap();
        Api::<DatasetCache>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &d)
            .await
            .unwrap()
    }

    async fn get_dataset(&self, name: &str) -> Option<DatasetCache> {
        Api::<DatasetCache>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .unwrap()
    }

    fn assigned(pool: &CachePool, uid: &str) -> usize {
        pool.spec
            .datasets
            .iter()
            .filter(|a| a.owner.uid == uid)
            .count()
            + pool
                .spec
                .checkpoint_syncs
                .iter()
                .filter(|a| a.owner.uid == uid)
                .count()
    }

    async fn pvc(&self, name: &str) -> Option<PersistentVolumeClaim> {
        Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .unwrap()
    }

    async fn pv(&self, uid: &str) -> Option<PersistentVolume> {
        Api::<PersistentVolume>::all(self.client.clone())
            .get_opt(&format!("tidepool-{uid}"))
            .await
            .unwrap()
    }
}

fn bound(pvc: &PersistentVolumeClaim) -> bool {
    pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_cache_lifecycle_on_a_real_api_server() {
    let cp = control_plane_or_skip!("dataset_cache_lifecycle_on_a_real_api_server");
    let _one = SERIAL.lock().await;
    let e = env(cp, "dsc").await;
    let a100 = e.node_with_pool("a", "a100").await;
    let a100b = e.node_with_pool("b", "a100").await;
    let h100 = e.node_with_pool("c", "h100").await;
    let _op = Operator::start(cp, &e.ns, "op-1");

    let d = e.dataset("imagenet", "a100").await;
    let uid = d.uid().unwrap();
    // Assigned to exactly the two matching pools, once each.
    for pool in [&a100, &a100b] {
        eventually(
            Duration::from_secs(30),
            "assignment on a matching pool",
            || async { (Env::assigned(&e.pool(pool).await, &uid) == 1).then_some(()) },
        )
        .await;
    }
    assert_eq!(
        Env::assigned(&e.pool(&h100).await, &uid),
        0,
        "not on the h100 pool"
    );
    let a = e.pool(&a100).await.spec.datasets[0].clone();
    assert_eq!(a.source.url, URL);
    assert_eq!(a.owner.namespace, e.ns);
    assert_eq!(a.volume_handle, format!("tidepool-{uid}"));

    // PV and PVC exist, pre-bound; with the controller manager they bind.
    let pvc = eventually(Duration::from_secs(30), "the PVC", || async {
        e.pvc("imagenet").await
    })
    .await;
    let pv = e.pv(&uid).await.expect("the PV");
    assert_eq!(
        pv.spec.as_ref().unwrap().csi.as_ref().unwrap().driver,
        "csi.tidepool.dev"
    );
    assert_eq!(
        pvc.spec.as_ref().unwrap().access_modes,
        Some(vec!["ReadOnlyMany".to_owned()])
    );
    if e.cp.has_controller_manager() {
        eventually(Duration::from_secs(60), "PVC Bound", || async {
            e.pvc("imagenet").await.filter(bound).map(|_| ())
        })
        .await;
    }

    // Agents report: status is summed.
    let now = Timestamp::now();
    e.report(&a100, now, &[(&d, 100)]).await;
    e.report(&a100b, now, &[(&d, 50)]).await;
    let st = eventually(
        Duration::from_secs(30),
        "DatasetCache Ready with 150 bytes",
        || async {
            let s = e.get_dataset("imagenet").await?.status?;
            (s.phase == Phase::Ready && s.bytes_cached == 150).then_some(s)
        },
    )
    .await;
    assert_eq!((st.nodes_desired, st.nodes_ready), (2, 2));
    assert_eq!(st.claim_name.as_deref(), Some("imagenet"));

    // One agent goes silent (its last heartbeat is old): that node is not ready.
    e.report(
        &a100b,
        Timestamp::from_second(now.as_second() - 3600).unwrap(),
        &[(&d, 50)],
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "Degraded after a stale heartbeat",
        || async {
            let s = e.get_dataset("imagenet").await?.status?;
            (s.phase == Phase::Degraded && s.nodes_ready == 1).then_some(())
        },
    )
    .await;

    // Field ownership as the server records it: spec by the operator, status by the agent.
    let pool = e.pool(&a100).await;
    let managers: Vec<(String, Option<String>)> = pool
        .managed_fields()
        .iter()
        .map(|m| (m.manager.clone().unwrap_or_default(), m.subresource.clone()))
        .collect();
    assert!(
        managers.contains(&("tidepool-operator".to_owned(), None)),
        "{managers:?}"
    );
    assert!(
        managers.contains(&(AGENT.to_owned(), Some("status".to_owned()))),
        "{managers:?}"
    );

    // Delete: PVC, assignments and PV go, then the object itself (its finalizer released).
    Api::<DatasetCache>::namespaced(e.client.clone(), &e.ns)
        .delete("imagenet", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the DatasetCache to be gone",
        || async { e.get_dataset("imagenet").await.is_none().then_some(()) },
    )
    .await;
    assert!(e.pvc("imagenet").await.is_none(), "PVC deleted");
    assert!(e.pv(&uid).await.is_none(), "PV deleted");
    for pool in [&a100, &a100b, &h100] {
        let p = e.pool(pool).await;
        assert_eq!(Env::assigned(&p, &uid), 0, "{pool}: assignment released");
        assert!(
            p.spec.datasets.is_empty(),
            "{pool}: the last assignment went"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_sync_gets_a_rwx_claim_and_every_pool() {
    let cp = control_plane_or_skip!("checkpoint_sync_gets_a_rwx_claim_and_every_pool");
    let _one = SERIAL.lock().await;
    let e = env(cp, "cks").await;
    let pools = [
        e.node_with_pool("a", "a100").await,
        e.node_with_pool("b", "h100").await,
    ];
    let _op = Operator::start(cp, &e.ns, "op-1");
    let c: CheckpointSync = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1",
        "kind": "CheckpointSync",
        "metadata": {"name": "ckpt", "namespace": e.ns},
        "spec": {"destination": {"url": URL}, "retention": {"keepLocal": 2}},
    }))
    .unwrap();
    let api = Api::<CheckpointSync>::namespaced(e.client.clone(), &e.ns);
    let c = api.create(&PostParams::default(), &c).await.unwrap();
    let uid = c.uid().unwrap();
    for pool in &pools {
        eventually(
            Duration::from_secs(30),
            "assignment on every pool",
            || async { (Env::assigned(&e.pool(pool).await, &uid) == 1).then_some(()) },
        )
        .await;
    }
    let pvc = eventually(Duration::from_secs(30), "the PVC", || async {
        e.pvc("ckpt").await
    })
    .await;
    assert_eq!(
        pvc.spec.as_ref().unwrap().access_modes,
        Some(vec!["ReadWriteMany".to_owned()])
    );
    if e.cp.has_controller_manager() {
        eventually(Duration::from_secs(60), "PVC Bound", || async {
            e.pvc("ckpt").await.filter(bound).map(|_| ())
        })
        .await;
    }
    api.delete("ckpt", &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "the CheckpointSync to be gone",
        || async { api.get_opt("ckpt").await.unwrap().is_none().then_some(()) },
    )
    .await;
    assert!(e.pv(&uid).await.is_none());
    for pool in &pools {
        assert_eq!(Env::assigned(&e.pool(pool).await, &uid), 0);
    }
}

/// The Lease's holder, if any.
async fn holder(client: &Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt("tidepool-operator")
        .await
        .unwrap()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies_and_nothing_is_duplicated() {
    let cp = control_plane_or_skip!(
        "a_standby_takes_over_when_the_leader_dies_and_nothing_is_duplicated"
    );
    let _one = SERIAL.lock().await;
    let e = env(cp, "leader").await;
    let pool = e.node_with_pool("a", "a100").await;
    let mut ops = [
        Operator::start(cp, &e.ns, "op-a"),
        Operator::start(cp, &e.ns, "op-b"),
    ];
    let first = eventually(Duration::from_secs(30), "a leader", || async {
        holder(&e.client, &e.ns).await
    })
    .await;
    let d1 = e.dataset("one", "a100").await;
    eventually(Duration::from_secs(30), "the leader assigns", || async {
        (Env::assigned(&e.pool(&pool).await, &d1.uid().unwrap()) == 1).then_some(())
    })
    .await;

    // kill -9 the leader: the standby takes over within the lease duration (15 s)
    // plus its retry period.
    let leader = ops.iter_mut().find(|o| o.identity == first).unwrap();
    leader.kill9();
    let killed_at = Instant::now();
    let second = eventually(Duration::from_secs(30), "the standby to lead", || async {
        holder(&e.client, &e.ns).await.filter(|h| *h != first)
    })
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(25),
        "took over after {:?}",
        killed_at.elapsed()
    );
    let standby = ops.iter_mut().find(|o| o.identity == second).unwrap();
    assert!(standby.running());

    // The new leader works, and nothing is duplicated.
    let d2 = e.dataset("two", "a100").await;
    eventually(
        Duration::from_secs(30),
        "the new leader assigns",
        || async { (Env::assigned(&e.pool(&pool).await, &d2.uid().unwrap()) == 1).then_some(()) },
    )
    .await;
    let p = e.pool(&pool).await;
    assert_eq!(p.spec.datasets.len(), 2, "{:?}", p.spec.datasets);
    assert_eq!(Env::assigned(&p, &d1.uid().unwrap()), 1);
    // The PV comes from the DatasetCache's own reconcile, which may follow the pool's
    // assignment by a moment.
    let ours = ListParams::default().labels(&format!("tidepool.dev/namespace={}", e.ns));
    let pv_api = Api::<PersistentVolume>::all(e.client.clone());
    eventually(
        Duration::from_secs(30),
        "a PV for each DatasetCache",
        || async { (pv_api.list(&ours).await.unwrap().items.len() >= 2).then_some(()) },
    )
    .await;
    let pvs = pv_api.list(&ours).await.unwrap();
    let all: Vec<_> = Api::<PersistentVolume>::all(e.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.name_any(), p.labels().clone()))
        .collect();
    assert_eq!(pvs.items.len(), 2, "one PV per DatasetCache: {all:?}");
    let lease = Api::<Lease>::namespaced(e.client.clone(), &e.ns)
        .get("tidepool-operator")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_reconcile_converges_after_restart() {
    let cp = control_plane_or_skip!("an_operator_killed_mid_reconcile_converges_after_restart");
    let _one = SERIAL.lock().await;
    let e = env(cp, "restart").await;
    let pool = e.node_with_pool("a", "a100").await;
    let mut op = Operator::start(cp, &e.ns, "op-a");
    let mut uids = vec![];
    for i in 0..6 {
        uids.push(e.dataset(&format!("d{i}"), "a100").await.uid().unwrap());
    }
    // Killed while those are being reconciled (some written, some not).
    tokio::time::sleep(Duration::from_millis(700)).await;
    op.kill9();
    // Restarted under the same identity (a pod restarted in place): it holds the
    // lease at once.
    let _op = Operator::start(cp, &e.ns, "op-a");
    eventually(
        Duration::from_secs(60),
        "every dataset assigned once, with a PVC",
        || async {
            let p = e.pool(&pool).await;
            for (i, uid) in uids.iter().enumerate() {
                if Env::assigned(&p, uid) != 1 || e.pvc(&format!("d{i}")).await.is_none() {
                    return None;
                }
            }
            (p.spec.datasets.len() == uids.len()).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_takes_its_pool_with_it_and_statuses_follow() {
    let cp = control_plane_or_skip!("a_deleted_node_takes_its_pool_with_it_and_statuses_follow");
    if !cp.has_controller_manager() {
        tidepool_api::envtest::skip(
            "a_deleted_node_takes_its_pool_with_it_and_statuses_follow",
            &"garbage collection needs kube-controller-manager among the envtest binaries",
        );
        return;
    }
    let _one = SERIAL.lock().await;
    let e = env(cp, "nodegc").await;
    let a = e.node_with_pool("a", "a100").await;
    let b = e.node_with_pool("b", "a100").await;
    let _op = Operator::start(cp, &e.ns, "op-a");
    let d = e.dataset("data", "a100").await;
    let now = Timestamp::now();
    e.report(&a, now, &[(&d, 10)]).await;
    e.report(&b, now, &[(&d, 10)]).await;
    eventually(Duration::from_secs(30), "Ready on two nodes", || async {
        let s = e.get_dataset("data").await?.status?;
        (s.phase == Phase::Ready && s.nodes_desired == 2).then_some(())
    })
    .await;
    Api::<Node>::all(e.client.clone())
        .delete(&b, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the pool of the deleted node to be collected",
        || async {
            Api::<CachePool>::all(e.client.clone())
                .get_opt(&b)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "status over the remaining node",
        || async {
            let s = e.get_dataset("data").await?.status?;
            (s.phase == Phase::Ready && s.nodes_desired == 1 && s.bytes_cached == 10).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_writes_and_operator_spec_writes_never_conflict() {
    let cp = control_plane_or_skip!("agent_status_writes_and_operator_spec_writes_never_conflict");
    let _one = SERIAL.lock().await;
    let e = env(cp, "owners").await;
    let pool = e.node_with_pool("a", "a100").await;
    let _op = Operator::start(cp, &e.ns, "op-a");
    // The agent reports as fast as it can while the operator assigns and releases.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agent = {
        let (client, pool, stop) = (e.client.clone(), pool.clone(), stop.clone());
        tokio::spawn(async move {
            let api = Api::<CachePool>::all(client);
            let mut writes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({
                    "apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
                    "status": {"heartbeatTime": Time(Timestamp::now()), "usedBytes": writes},
                });
                // Server-side apply without force: a conflict would be an error here.
                api.patch_status(&pool, &PatchParams::apply(AGENT), &Patch::Apply(&body))
                    .await
                    .expect("the agent's status write conflicted");
                writes += 1;
            }
            writes
        })
    };
    let mut uids = vec![];
    for i in 0..5 {
        uids.push(e.dataset(&format!("d{i}"), "a100").await.uid().unwrap());
    }
    eventually(
        Duration::from_secs(60),
        "every dataset assigned while the agent writes",
        || async {
            let p = e.pool(&pool).await;
            uids.iter().all(|u| Env::assigned(&p, u) == 1).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let writes = agent.await.unwrap();
    assert!(writes > 10, "the agent kept writing ({writes} writes)");
    let p = e.pool(&pool).await;
    assert_eq!(p.spec.datasets.len(), 5);
    assert!(
        p.status.unwrap().used_bytes > 0,
        "the agent's status stayed"
    );
}

/// A node whose agent reports checkpoint bytes not yet durable is kept from
/// scale-down (the cluster autoscaler's annotation, with Tidepool's mark beside it)
/// until they are durable; the CheckpointSync names the node and its bytes. An
/// annotation someone else set is never taken off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_checkpoints_not_yet_durable_is_kept_from_scale_down() {
    let cp =
        control_plane_or_skip!("a_node_with_checkpoints_not_yet_durable_is_kept_from_scale_down");
    let _one = SERIAL.lock().await;
    let e = env(cp, "keep").await;
    let a = e.node_with_pool("a", "a100").await;
    let b = e.node_with_pool("b", "a100").await;
    let _op = Operator::start(cp, &e.ns, "op-k");
    let c: CheckpointSync = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1",
        "kind": "CheckpointSync",
        "metadata": {"name": "ckpt", "namespace": e.ns},
        "spec": {"destination": {"url": URL}, "commit": {"nodes": 2}},
    }))
    .unwrap();
    let api = Api::<CheckpointSync>::namespaced(e.client.clone(), &e.ns);
    let c = api.create(&PostParams::default(), &c).await.unwrap();
    let uid = c.uid().unwrap();
    // b's annotation is a person's: Tidepool leaves it.
    let nodes = Api::<Node>::all(e.client.clone());
    nodes
        .patch(
            &b,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "cluster-autoscaler.kubernetes.io/scale-down-disabled": "true"}}})),
        )
        .await
        .unwrap();
    let report = |pool: String, pending: i64| {
        let (client, uid, ns) = (e.client.clone(), uid.clone(), e.ns.clone());
        async move {
            let body = json!({
                "apiVersion": "tidepool.dev/v1alpha1",
                "kind": "CachePool",
                "status": {
                    "capacityBytes": 1_000_000_000i64,
                    "usedBytes": 0,
                    "heartbeatTime": Time(Timestamp::now()),
                    "checkpointSyncs": [{"namespace": ns, "name": "ckpt", "uid": uid,
                                         "latestCommittedStep": 7, "pendingBytes": pending}],
                }
            });
            Api::<CachePool>::all(client)
                .patch_status(&pool, &PatchParams::apply(AGENT), &Patch::Apply(&body))
                .await
                .unwrap();
        }
    };
    let annotations = |name: String| {
        let nodes = nodes.clone();
        async move {
            nodes
                .get(&name)
                .await
                .unwrap()
                .metadata
                .annotations
                .unwrap_or_default()
        }
    };
    report(a.clone(), 4096).await;
    report(b.clone(), 100).await;
    eventually(
        Duration::from_secs(30),
        "node a kept from scale-down",
        || async {
            let an = annotations(a.clone()).await;
            (an.get("cluster-autoscaler.kubernetes.io/scale-down-disabled")
                .map(String::as_str)
                == Some("true")
                && an.contains_key("tidepool.dev/checkpoints-pending"))
            .then_some(())
        },
    )
    .await;
    let st = eventually(
        Duration::from_secs(30),
        "pending bytes per node",
        || async {
            let s = api.get("ckpt").await.ok()?.status?;
            (s.pending_nodes.len() == 2).then_some(s)
        },
    )
    .await;
    assert_eq!(st.pending_bytes, 4196);
    assert_eq!(
        (st.pending_nodes[0].node.as_str(), st.pending_nodes[0].bytes),
        (a.as_str(), 4096)
    );
    // Durable: released (a); b's own annotation stays.
    report(a.clone(), 0).await;
    report(b.clone(), 0).await;
    eventually(Duration::from_secs(30), "node a released", || async {
        let an = annotations(a.clone()).await;
        (!an.contains_key("cluster-autoscaler.kubernetes.io/scale-down-disabled")
            && !an.contains_key("tidepool.dev/checkpoints-pending"))
        .then_some(())
    })
    .await;
    let an = annotations(b.clone()).await;
    assert_eq!(
        an.get("cluster-autoscaler.kubernetes.io/scale-down-disabled")
            .map(String::as_str),
        Some("true"),
        "a person's annotation is left alone"
    );
    assert!(!an.contains_key("tidepool.dev/checkpoints-pending"));
}

/// Deleting a `CheckpointSync` waits while a node still has committed bytes of it to
/// upload (its assignment is what that node uploads with), says so in `Deleting`, and
/// goes on once they are durable; annotated `tidepool.dev/discard-pending: "true"` it
/// does not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_checkpoint_sync_waits_for_its_pending_uploads() {
    let cp = control_plane_or_skip!("deleting_a_checkpoint_sync_waits_for_its_pending_uploads");
    let _one = SERIAL.lock().await;
    let e = env(cp, "delpend").await;
    let a = e.node_with_pool("a", "a100").await;
    let _op = Operator::start(cp, &e.ns, "op-d");
    let api = Api::<CheckpointSync>::namespaced(e.client.clone(), &e.ns);
    for name in ["held", "forced"] {
        let c: CheckpointSync = serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1",
            "kind": "CheckpointSync",
            "metadata": {"name": name, "namespace": e.ns},
            "spec": {"destination": {"url": format!("{URL}/{name}")}},
        }))
        .unwrap();
        api.create(&PostParams::default(), &c).await.unwrap();
    }
    let held = api.get("held").await.unwrap();
    let forced = api.get("forced").await.unwrap();
    eventually(Duration::from_secs(30), "both assigned", || async {
        let p = e.pool(&a).await;
        (Env::assigned(&p, &held.uid().unwrap()) == 1
            && Env::assigned(&p, &forced.uid().unwrap()) == 1)
            .then_some(())
    })
    .await;
    let report = |pending: i64| {
        let (client, ns, pool) = (e.client.clone(), e.ns.clone(), a.clone());
        let entries: Vec<_> = [&held, &forced]
            .iter()
            .map(|c| {
                json!({"namespace": ns, "name": c.name_any(), "uid": c.uid().unwrap(),
                       "latestCommittedStep": 3, "pendingBytes": pending})
            })
            .collect();
        async move {
            let body = json!({
                "apiVersion": "tidepool.dev/v1alpha1",
                "kind": "CachePool",
                "status": {"capacityBytes": 1_000_000_000i64, "usedBytes": 0,
                           "heartbeatTime": Time(Timestamp::now()),
                           "checkpointSyncs": entries}
            });
            Api::<CachePool>::all(client)
                .patch_status(&pool, &PatchParams::apply(AGENT), &Patch::Apply(&body))
                .await
                .unwrap();
        }
    };
    report(1234).await;
    api.patch(
        "forced",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"tidepool.dev/discard-pending": "true"}}}),
        ),
    )
    .await
    .unwrap();
    for name in ["held", "forced"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    eventually(Duration::from_secs(60), "the forced one gone", || async {
        api.get_opt("forced").await.unwrap().is_none().then_some(())
    })
    .await;
    let msg = eventually(
        Duration::from_secs(60),
        "held says why it waits",
        || async {
            let s = api.get_opt("held").await.unwrap()?.status?;
            s.conditions
                .iter()
                .find(|c| c.type_ == "Deleting" && c.reason == "WaitingForUploads")
                .map(|c| c.message.clone())
        },
    )
    .await;
    assert!(
        msg.contains("1234 bytes") && msg.contains(&a) && msg.contains("discard-pending"),
        "{msg}"
    );
    assert_eq!(
        Env::assigned(&e.pool(&a).await, &held.uid().unwrap()),
        1,
        "its node keeps the assignment it uploads with"
    );
    // Uploaded: the deletion finishes.
    report(0).await;
    eventually(Duration::from_secs(60), "held gone", || async {
        api.get_opt("held").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(Env::assigned(&e.pool(&a).await, &held.uid().unwrap()), 0);
}

/// `tidepool-operator uninstall-check --kubeconfig <k>`: its exit status and output.
fn uninstall_check(kubeconfig: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool-operator"))
        .arg("uninstall-check")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The chart's uninstall hooks, as built, on a cluster of their own (the check looks at
/// the whole cluster): the pre-delete check refuses while a DatasetCache or a
/// CheckpointSync exists or a pod uses a Tidepool volume, naming each, and lets the
/// uninstall go on once none is left; the post-delete clean-up deletes the CachePools
/// and the operator's Lease, but only once no node pod is left to create them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_is_refused_while_tidepool_is_in_use_and_leaves_nothing_behind() {
    let _cp = control_plane_or_skip!(
        "uninstall_is_refused_while_tidepool_is_in_use_and_leaves_nothing_behind"
    );
    let _one = SERIAL.lock().await;
    let cp = ControlPlane::start().unwrap();
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    let (ok, out) = uninstall_check(&cp.kubeconfig);
    assert!(ok && out.contains("can go on"), "{out}");

    let ns = "ml";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for n in [ns, "tidepool-system"] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let caches = Api::<DatasetCache>::namespaced(client.clone(), ns);
    caches
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "DatasetCache",
                "metadata": {"name": "imagenet", "namespace": ns},
                "spec": {"source": {"url": URL}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let syncs = Api::<CheckpointSync>::namespaced(client.clone(), ns);
    syncs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "CheckpointSync",
                "metadata": {"name": "llama", "namespace": ns},
                "spec": {"destination": {"url": format!("{URL}/ckpt")}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let (ok, out) = uninstall_check(&cp.kubeconfig);
    assert!(!ok, "{out}");
    assert!(
        out.contains("1 DatasetCache(s): ml/imagenet")
            && out.contains("1 CheckpointSync(s): ml/llama")
            && out.contains("kubectl delete datasetcaches,checkpointsyncs --all -A --wait")
            && out.contains("nothing was deleted"),
        "{out}"
    );
    caches
        .delete("imagenet", &DeleteParams::default())
        .await
        .unwrap();
    syncs
        .delete("llama", &DeleteParams::default())
        .await
        .unwrap();

    // A volume of the driver made by hand, bound, and a pod using it; and a claim of
    // another driver's volume, whose pod is not Tidepool's business.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for (pv, driver, claim) in [
        ("by-hand", "csi.tidepool.dev", "data"),
        ("other", "disk.csi.azure.com", "scratch"),
    ] {
        pvs.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": pv},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
                         "csi": {"driver": driver, "volumeHandle": pv},
                         "claimRef": {"namespace": ns, "name": claim}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns);
    match sa
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("{e}"),
    }
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns);
    for (pod, claim) in [("trainer", "data"), ("other", "scratch")] {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": pod},
                "spec": {"containers": [{"name": "c", "image": "busybox"}],
                         "automountServiceAccountToken": false,
                         "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    let (ok, out) = uninstall_check(&cp.kubeconfig);
    assert!(!ok, "{out}");
    assert!(
        out.contains("1 pod(s) using Tidepool volumes: ml/trainer (claim data)"),
        "{out}"
    );
    assert!(
        !out.contains("DatasetCache(s)") && !out.contains("ml/other"),
        "{out}"
    );
    pods.delete("trainer", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the pod gone", || async {
        pods.get_opt("trainer")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let (ok, out) = uninstall_check(&cp.kubeconfig);
    assert!(ok, "{out}");

    // Post-delete: a node pod still terminating keeps the CachePools (its agent would
    // create its own again); once it is gone, they and the Lease go.
    let pools: Api<CachePool> = Api::all(client.clone());
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
                "metadata": {"name": "gpu-1"}, "spec": {}}))
            .unwrap(),
        )
        .await
        .unwrap();
    Api::<Lease>::namespaced(client.clone(), "tidepool-system")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "tidepool-operator"}})).unwrap(),
        )
        .await
        .unwrap();
    let sys_sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        client.clone(),
        "tidepool-system",
    );
    let _ = sys_sa
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
        )
        .await;
    let sys_pods =
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), "tidepool-system");
    sys_pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "tidepool-node-x",
                             "labels": {"app.kubernetes.io/instance": "tidepool",
                                        "app.kubernetes.io/component": "node"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}],
                         "automountServiceAccountToken": false}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let cleanup = |wait: &str| {
        Command::new(env!("CARGO_BIN_EXE_tidepool-operator"))
            .arg("uninstall-cleanup")
            .arg("--kubeconfig")
            .arg(&cp.kubeconfig)
            .args(["--namespace", "tidepool-system"])
            .args([
                "--node-pods",
                "app.kubernetes.io/instance=tidepool,app.kubernetes.io/component=node",
            ])
            .args(["--lease", "tidepool-operator", "--wait", wait])
            .output()
            .unwrap()
    };
    let out = cleanup("3s");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && text.contains("tidepool-node-x")
            && text.contains("none was deleted"),
        "{text}"
    );
    assert!(pools.get_opt("gpu-1").await.unwrap().is_some());
    sys_pods
        .delete("tidepool-node-x", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let out = cleanup("30s");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("deleted 1 CachePool(s): gpu-1"), "{text}");
    assert!(pools.get_opt("gpu-1").await.unwrap().is_none());
    assert!(
        Api::<Lease>::namespaced(client.clone(), "tidepool-system")
            .get_opt("tidepool-operator")
            .await
            .unwrap()
            .is_none()
    );
}
