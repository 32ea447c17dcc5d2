//! Named reconcile scenarios against kube's tower-test mock API server.
//!
//! Each scenario lists, in order, every request the reconciler must make (method,
//! path, the fields that matter in the body) and what the API server answers. A
//! missing, extra, reordered or wrong request fails the scenario: the verifier
//! asserts each request as it arrives, then that none follows.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::{
    api::core::v1::{Node, PersistentVolumeClaim},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Client,
    api::ObjectMeta,
    client::Body,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{self, store::Writer},
        watcher,
    },
};
use serde_json::{Value, json};
use tidepool_api::{
    CachePool, CachePoolSpec, CachePoolStatus, CheckpointSync, DatasetCache, DatasetCacheSpec,
    LakeLocation,
    cache_pool::{DatasetNodeStatus, NodeDatasetPhase},
    checkpoint_sync::CheckpointSyncSpec,
    lake::{LakeCredentials, SecretRef},
};

use super::*;
use crate::plan::pool::desired_spec;

const NOW: i64 = 1_700_000_000;

fn now() -> Timestamp {
    Timestamp::from_second(NOW).unwrap()
}

/// One expected request and the answer to it.
struct Expect {
    method: Method,
    path: &'static str,
    /// Substrings the query must contain (e.g. the field manager).
    query: &'static [&'static str],
    /// Assertions on the request body; returns the response body.
    respond: Box<dyn FnOnce(Value) -> (StatusCode, Value) + Send>,
}

fn expect(
    method: Method,
    path: &'static str,
    respond: impl FnOnce(Value) -> (StatusCode, Value) + Send + 'static,
) -> Expect {
    Expect {
        method,
        path,
        query: &[],
        respond: Box::new(respond),
    }
}

/// A server-side apply: PATCH with our field manager, forced.
fn expect_apply(
    path: &'static str,
    respond: impl FnOnce(Value) -> (StatusCode, Value) + Send + 'static,
) -> Expect {
    Expect {
        method: Method::PATCH,
        path,
        query: &["fieldManager=tidepool-operator", "force=true"],
        respond: Box::new(respond),
    }
}

/// The GET of a pool that precedes each write of it: answered with `pool`.
fn expect_pool_get(pool: CachePool) -> Expect {
    let path: &'static str = Box::leak(
        format!(
            "/apis/tidepool.dev/v1alpha1/cachepools/{}",
            pool.metadata.name.as_deref().unwrap()
        )
        .into_boxed_str(),
    );
    expect(Method::GET, path, move |_| ok(pool))
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

fn ok(v: impl serde::Serialize) -> (StatusCode, Value) {
    (StatusCode::OK, serde_json::to_value(v).unwrap())
}

/// Serve `expected` in order; then assert that no further request arrives.
fn verifier(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    expected: Vec<Expect>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for (i, e) in expected.into_iter().enumerate() {
            let (request, send) = handle
                .next_request()
                .await
                .unwrap_or_else(|| panic!("request #{i} ({} {}) never came", e.method, e.path));
            let got = format!("{} {}", request.method(), request.uri().path());
            assert_eq!(got, format!("{} {}", e.method, e.path), "request #{i}");
            let query = request.uri().query().unwrap_or_default().to_owned();
            for q in e.query {
                assert!(
                    query.contains(q),
                    "request #{i} {got}: query {query:?} lacks {q}"
                );
            }
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (status, answer) = (e.respond)(body);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!(
                "unexpected extra request: {} {}",
                request.method(),
                request.uri()
            );
        }
    })
}

fn writer<K>(objects: &[K]) -> (Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o.clone()));
    }
    (store, writer)
}

struct World {
    nodes: Vec<Node>,
    pools: Vec<CachePool>,
    datasets: Vec<DatasetCache>,
    checkpoints: Vec<CheckpointSync>,
}

/// Run one reconcile of `obj` in `world` against `expected` requests.
async fn run<K: Reconciled>(obj: K, world: World, expected: Vec<Expect>) -> Result<Action, Error> {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    // Writers must outlive the reconcile: a dropped writer empties nothing, but keep them explicit.
    let (nodes, _w1) = writer(&world.nodes);
    let (pools, _w2) = writer(&world.pools);
    let (datasets, _w3) = writer(&world.datasets);
    let (checkpoints, _w4) = writer(&world.checkpoints);
    let ctx = Arc::new(Context {
        client: client.clone(),
        stores: Stores {
            nodes,
            pools,
            datasets,
            checkpoints,
        },
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "tidepool-operator".into(),
                instance: None,
            },
        ),
        metrics: Metrics::shared(),
        stale_after: SignedDuration::from_secs(120),
        now,
        pool_writes: Default::default(),
        grants: None,
        grants_state: Default::default(),
    });
    let server = verifier(handle, expected);
    let result = reconcile(Arc::new(obj), ctx.clone()).await;
    drop(ctx);
    server.await.expect("verifier");
    result
}

fn node(name: &str, gpu: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("gpu".to_owned(), gpu.to_owned())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pool(name: &str, heartbeat_age: i64, dataset_phase: Option<NodeDatasetPhase>) -> CachePool {
    let mut p = CachePool::new(name, CachePoolSpec::default());
    p.metadata.uid = Some(format!("pool-{name}"));
    p.metadata.resource_version = Some("7".into());
    p.status = Some(CachePoolStatus {
        heartbeat_time: Some(Time(Timestamp::from_second(NOW - heartbeat_age).unwrap())),
        capacity_bytes: 1 << 40,
        datasets: dataset_phase
            .map(|phase| DatasetNodeStatus {
                namespace: "ml".into(),
                name: "imagenet".into(),
                uid: "u1".into(),
                phase,
                snapshot: Some("s1".into()),
                objects: 3,
                bytes_cached: 300,
                bytes_total: 300,
                message: None,
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    });
    p
}

/// `imagenet` in `ml`, selecting `gpu=h100` nodes, SAS secret, with our finalizer.
fn dataset() -> DatasetCache {
    let mut d = DatasetCache::new(
        "imagenet",
        DatasetCacheSpec {
            source: LakeLocation {
                url: "https://acct.blob.core.windows.net/datasets/imagenet".into(),
                credentials: Some(LakeCredentials {
                    secret_ref: Some(SecretRef {
                        name: "lake-sas".into(),
                    }),
                    ..Default::default()
                }),
            },
            node_selector: Some(LabelSelector {
                match_labels: Some([("gpu".to_owned(), "h100".to_owned())].into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    d.metadata.namespace = Some("ml".into());
    d.metadata.uid = Some("u1".into());
    d.metadata.generation = Some(1);
    d.metadata.finalizers = Some(vec![FINALIZER.into()]);
    d
}

/// Pools with `d` already assigned where it matches.
fn assigned(mut pools: Vec<CachePool>, nodes: &[Node], d: &DatasetCache) -> Vec<CachePool> {
    for p in &mut pools {
        let labels = nodes
            .iter()
            .find(|n| n.metadata.name == p.metadata.name)
            .map(|n| n.metadata.labels.clone().unwrap_or_default());
        p.spec = desired_spec(p, labels.as_ref(), &[d], &[], None);
    }
    pools
}

fn owned_pvc(d: &DatasetCache) -> PersistentVolumeClaim {
    crate::plan::volume::desired_pvc(d)
}

fn with_status(mut d: DatasetCache, pools: &[CachePool], nodes: &[Node]) -> DatasetCache {
    let pools_r: Vec<&CachePool> = pools.iter().collect();
    let nodes_r: Vec<&Node> = nodes.iter().collect();
    let observed = Observed {
        nodes: &nodes_r,
        pools: &pools_r,
        datasets: &[],
        checkpoints: &[],
    };
    let clock = Clock {
        now: now(),
        stale_after: SignedDuration::from_secs(120),
    };
    d.status = Some(d.plan_status(&d.assigned_pools(&observed), &clock));
    d
}

const DSC: &str = "/apis/tidepool.dev/v1alpha1/namespaces/ml/datasetcaches/imagenet";
const DSC_STATUS: &str = "/apis/tidepool.dev/v1alpha1/namespaces/ml/datasetcaches/imagenet/status";
const PV: &str = "/api/v1/persistentvolumes/tidepool-u1";
const PVC: &str = "/api/v1/namespaces/ml/persistentvolumeclaims/imagenet";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";

#[tokio::test]
async fn new_dataset_gets_its_finalizer_before_anything_else() {
    let mut d = dataset();
    d.metadata.finalizers = None;
    let world = World {
        nodes: vec![node("n1", "h100")],
        pools: vec![pool("n1", 5, None)],
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let obj = d.clone();
    let expected = vec![expect(Method::PATCH, DSC, move |body| {
        assert!(
            body.to_string().contains(FINALIZER),
            "json patch adds the finalizer: {body}"
        );
        let mut o = obj;
        o.metadata.finalizers = Some(vec![FINALIZER.into()]);
        ok(o)
    })];
    let action = run(d, world, expected).await.unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn new_dataset_creates_pv_and_pvc_assigns_matching_pools_and_reports_ready() {
    let d = dataset();
    let nodes = vec![node("n1", "h100"), node("n2", "a100")];
    let world = World {
        nodes,
        pools: vec![
            pool("n1", 5, Some(NodeDatasetPhase::Ready)),
            pool("n2", 5, None),
        ],
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let pool_answer = pool("n1", 5, Some(NodeDatasetPhase::Ready));
    let pool_now = pool_answer.clone();
    let status_obj = d.clone();
    let expected = vec![
        expect(Method::GET, PV, |_| not_found()),
        expect_apply(PV, |body| {
            assert_eq!(body["spec"]["csi"]["driver"], "csi.tidepool.dev");
            assert_eq!(body["spec"]["accessModes"], json!(["ReadOnlyMany"]));
            assert_eq!(
                body["spec"]["csi"]["nodeStageSecretRef"],
                json!({"name": "lake-sas", "namespace": "ml"})
            );
            assert_eq!(body["spec"]["claimRef"]["name"], "imagenet");
            ok(body)
        }),
        expect(Method::GET, PVC, |_| not_found()),
        expect_apply(PVC, |body| {
            assert_eq!(body["spec"]["volumeName"], "tidepool-u1");
            assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "u1");
            assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
            ok(body)
        }),
        expect_pool_get(pool_now),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n1", move |body| {
            let datasets = body["spec"]["datasets"]
                .as_array()
                .expect("datasets assigned");
            assert_eq!(datasets.len(), 1);
            assert_eq!(
                datasets[0]["owner"],
                json!({"namespace": "ml", "name": "imagenet", "uid": "u1", "generation": 1})
            );
            assert_eq!(
                datasets[0]["source"]["credentials"]["secretRef"]["name"],
                "lake-sas"
            );
            ok(pool_answer)
        }),
        // n2 (gpu=a100) is not selected: no write to it.
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["reason"], "Ready");
            assert_eq!(body["type"], "Normal");
            ok(body)
        }),
        expect_apply(DSC_STATUS, move |body| {
            let s = &body["status"];
            assert_eq!(
                (
                    s["phase"].as_str(),
                    s["nodesDesired"].as_i64(),
                    s["nodesReady"].as_i64()
                ),
                (Some("Ready"), Some(1), Some(1))
            );
            assert_eq!(s["bytesCached"], 300);
            assert_eq!(s["snapshot"]["id"], "s1");
            assert_eq!(s["claimName"], "imagenet");
            assert_eq!(s["observedGeneration"], 1);
            ok(status_obj)
        }),
    ];
    let action = run(d, world, expected).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(60)),
        "requeue at half the staleness bound"
    );
}

#[tokio::test]
async fn steady_state_reconcile_only_reads() {
    let nodes = vec![node("n1", "h100")];
    let pools = assigned(
        vec![pool("n1", 5, Some(NodeDatasetPhase::Ready))],
        &nodes,
        &dataset(),
    );
    let d = with_status(dataset(), &pools, &nodes);
    let pvc = owned_pvc(&d);
    let pv = crate::plan::volume::desired_pv(&d);
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let expected = vec![
        expect(Method::GET, PV, move |_| ok(pv)),
        expect(Method::GET, PVC, move |_| ok(pvc)),
    ];
    run(d, world, expected).await.unwrap();
}

#[tokio::test]
async fn stale_pool_counts_as_not_ready_and_says_so() {
    let nodes = vec![node("n1", "h100"), node("n2", "h100")];
    let fresh = assigned(
        vec![
            pool("n1", 5, Some(NodeDatasetPhase::Ready)),
            pool("n2", 5, Some(NodeDatasetPhase::Ready)),
        ],
        &nodes,
        &dataset(),
    );
    let d = with_status(dataset(), &fresh, &nodes);
    assert_eq!(d.status.as_ref().unwrap().phase, Phase::Ready);
    // n2's agent stops reporting 10 minutes ago; its last word was "Ready".
    let mut pools = fresh.clone();
    pools[1].status.as_mut().unwrap().heartbeat_time =
        Some(Time(Timestamp::from_second(NOW - 600).unwrap()));
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let (pvc, pv, obj) = (
        owned_pvc(&d),
        crate::plan::volume::desired_pv(&d),
        d.clone(),
    );
    let expected = vec![
        expect(Method::GET, PV, move |_| ok(pv)),
        expect(Method::GET, PVC, move |_| ok(pvc)),
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(
                (body["type"].as_str(), body["reason"].as_str()),
                (Some("Warning"), Some("Degraded"))
            );
            assert_eq!(body["note"], "phase Ready -> Degraded");
            ok(body)
        }),
        expect_apply(DSC_STATUS, move |body| {
            let s = &body["status"];
            assert_eq!(
                (s["phase"].as_str(), s["nodesReady"].as_i64()),
                (Some("Degraded"), Some(1))
            );
            let cond = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "PoolsReporting")
                .unwrap()
                .clone();
            assert_eq!(
                (cond["status"].as_str(), cond["reason"].as_str()),
                (Some("False"), Some("StaleHeartbeat"))
            );
            assert!(cond["message"].as_str().unwrap().contains("n2"), "{cond}");
            ok(obj)
        }),
    ];
    run(d, world, expected).await.unwrap();
}

#[tokio::test]
async fn foreign_pvc_of_the_same_name_is_not_taken_over() {
    let nodes = vec![node("n1", "h100")];
    let pools = assigned(
        vec![pool("n1", 5, Some(NodeDatasetPhase::Ready))],
        &nodes,
        &dataset(),
    );
    let d = dataset();
    let mut foreign = owned_pvc(&d);
    foreign.metadata.owner_references = None;
    let pv = crate::plan::volume::desired_pv(&d);
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let obj = d.clone();
    let expected = vec![
        expect(Method::GET, PV, move |_| ok(pv)),
        expect(Method::GET, PVC, move |_| ok(foreign)),
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["reason"], "Failed");
            ok(body)
        }),
        expect_apply(DSC_STATUS, move |body| {
            let s = &body["status"];
            assert_eq!(s["phase"], "Failed");
            let ready = s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .unwrap()
                .clone();
            assert_eq!(ready["reason"], "ClaimConflict");
            assert!(
                ready["message"].as_str().unwrap().contains("ml/imagenet"),
                "{ready}"
            );
            ok(obj)
        }),
    ];
    run(d, world, expected).await.unwrap();
}

fn deleting(mut d: DatasetCache) -> DatasetCache {
    d.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(NOW - 1).unwrap()));
    d
}

#[tokio::test]
async fn deletion_waits_while_the_claim_is_in_use_and_keeps_pool_assignments() {
    let nodes = vec![node("n1", "h100")];
    let pools = assigned(
        vec![pool("n1", 5, Some(NodeDatasetPhase::Ready))],
        &nodes,
        &dataset(),
    );
    let d = deleting(with_status(dataset(), &pools, &nodes));
    let pvc = owned_pvc(&d);
    let mut terminating = pvc.clone();
    terminating.metadata.deletion_timestamp = Some(Time(now()));
    terminating.metadata.finalizers = Some(vec!["kubernetes.io/pvc-protection".into()]);
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let obj = d.clone();
    let expected = vec![
        expect(Method::GET, PVC, move |_| ok(pvc)),
        expect(Method::DELETE, PVC, move |_| ok(terminating)),
        expect_apply(DSC_STATUS, move |body| {
            let cond = body["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Deleting")
                .unwrap()
                .clone();
            assert_eq!(
                (cond["status"].as_str(), cond["reason"].as_str()),
                (Some("True"), Some("WaitingForClaim"))
            );
            assert!(
                cond["message"]
                    .as_str()
                    .unwrap()
                    .contains("while a pod uses it")
            );
            ok(obj)
        }),
        // No pool write, no PV delete, no finalizer removal while the pod reads.
    ];
    let err = run(d, world, expected).await.unwrap_err();
    assert!(err.is_waiting(), "{err}");
}

#[tokio::test]
async fn second_wait_does_not_delete_again_or_rewrite_status() {
    let nodes = vec![node("n1", "h100")];
    let pools = assigned(
        vec![pool("n1", 5, Some(NodeDatasetPhase::Ready))],
        &nodes,
        &dataset(),
    );
    let mut d = deleting(with_status(dataset(), &pools, &nodes));
    let update = ConditionUpdate { type_: DELETING, status: true, reason: "WaitingForClaim", message: "waiting for PersistentVolumeClaim ml/imagenet to go away; Kubernetes keeps it while a pod uses it".into() };
    conditions::set(
        &mut d.status.as_mut().unwrap().conditions,
        update,
        Some(1),
        now(),
    );
    let mut terminating = owned_pvc(&d);
    terminating.metadata.deletion_timestamp = Some(Time(now()));
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let expected = vec![expect(Method::GET, PVC, move |_| ok(terminating))];
    assert!(run(d, world, expected).await.unwrap_err().is_waiting());
}

#[tokio::test]
async fn deletion_after_claim_is_gone_releases_pools_deletes_pv_and_removes_finalizer() {
    let nodes = vec![node("n1", "h100"), node("n2", "h100")];
    let pools = assigned(
        vec![
            pool("n1", 5, Some(NodeDatasetPhase::Ready)),
            pool("n2", 5, None),
        ],
        &nodes,
        &dataset(),
    );
    let d = deleting(with_status(dataset(), &pools, &nodes));
    let pv = crate::plan::volume::desired_pv(&d);
    let (p1, p2, obj) = (pools[0].clone(), pools[1].clone(), d.clone());
    let (g1, g2) = (p1.clone(), p2.clone());
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let expected = vec![
        expect(Method::GET, PVC, |_| not_found()),
        expect_pool_get(g1),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n1", move |body| {
            assert_eq!(
                body["spec"],
                json!({"datasets": [], "checkpointSyncs": []}),
                "assignment released, the lists sent empty (never an empty object: the server would store null)"
            );
            ok(p1)
        }),
        expect_pool_get(g2),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n2", move |body| {
            assert_eq!(
                body["spec"]["datasets"],
                json!([]),
                "assignment released: {body}"
            );
            ok(p2)
        }),
        expect(Method::DELETE, PV, move |_| ok(pv)),
        expect(Method::PATCH, DSC, move |body| {
            let ops = body.to_string();
            assert!(
                ops.contains("\"remove\"") && ops.contains("/metadata/finalizers/0"),
                "{ops}"
            );
            ok(obj)
        }),
    ];
    assert_eq!(
        run(d, world, expected).await.unwrap(),
        Action::await_change()
    );
}

#[tokio::test]
async fn cleanup_tolerates_apply_never_having_run() {
    // Deleted before the first apply: no PVC, no assignment, no PV.
    let d = deleting(dataset());
    let obj = d.clone();
    let world = World {
        nodes: vec![node("n1", "h100")],
        pools: vec![pool("n1", 5, None)],
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let expected = vec![
        expect(Method::GET, PVC, |_| not_found()),
        expect(Method::DELETE, PV, |_| not_found()),
        expect(Method::PATCH, DSC, move |_| ok(obj)),
    ];
    assert_eq!(
        run(d, world, expected).await.unwrap(),
        Action::await_change()
    );
}

#[tokio::test]
async fn checkpoint_sync_is_read_write_and_assigned_to_every_pool() {
    let mut c = CheckpointSync::new(
        "ckpt",
        CheckpointSyncSpec {
            destination: LakeLocation {
                url: "https://acct.blob.core.windows.net/ckpt/run1".into(),
                credentials: None,
            },
            ..Default::default()
        },
    );
    c.metadata.namespace = Some("ml".into());
    c.metadata.uid = Some("c1".into());
    c.metadata.generation = Some(1);
    c.metadata.finalizers = Some(vec![FINALIZER.into()]);
    let nodes = vec![node("n1", "h100"), node("n2", "a100")];
    let world = World {
        nodes,
        pools: vec![pool("n1", 5, None), pool("n2", 5, None)],
        datasets: vec![],
        checkpoints: vec![c.clone()],
    };
    let (p1, p2, obj) = (pool("n1", 5, None), pool("n2", 5, None), c.clone());
    let (g1, g2) = (p1.clone(), p2.clone());
    let expected = vec![
        expect(Method::GET, "/api/v1/persistentvolumes/tidepool-c1", |_| {
            not_found()
        }),
        expect_apply("/api/v1/persistentvolumes/tidepool-c1", |body| {
            assert_eq!(body["spec"]["accessModes"], json!(["ReadWriteMany"]));
            assert!(
                body["spec"]["csi"].get("nodeStageSecretRef").is_none(),
                "anonymous: no secret"
            );
            ok(body)
        }),
        expect(
            Method::GET,
            "/api/v1/namespaces/ml/persistentvolumeclaims/ckpt",
            |_| not_found(),
        ),
        expect_apply("/api/v1/namespaces/ml/persistentvolumeclaims/ckpt", ok),
        expect_pool_get(g1),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n1", move |body| {
            assert_eq!(
                body["spec"]["checkpointSyncs"][0]["volumeHandle"],
                "tidepool-c1"
            );
            ok(p1)
        }),
        expect_pool_get(g2),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n2", move |body| {
            assert_eq!(body["spec"]["checkpointSyncs"][0]["owner"]["name"], "ckpt");
            ok(p2)
        }),
        expect_apply(
            "/apis/tidepool.dev/v1alpha1/namespaces/ml/checkpointsyncs/ckpt/status",
            move |body| {
                // Both agents are alive but have not reported on the sync yet.
                assert_eq!(
                    (
                        body["status"]["phase"].as_str(),
                        body["status"]["nodesDesired"].as_i64()
                    ),
                    (Some("Pending"), Some(2))
                );
                ok(obj)
            },
        ),
    ];
    run(c, world, expected).await.unwrap();
}

#[tokio::test]
async fn relabelled_node_gets_assignment_on_next_reconcile() {
    // n2 was a100 (nothing assigned); it is now h100.
    let nodes = vec![node("n1", "h100"), node("n2", "h100")];
    let before = vec![node("n1", "h100"), node("n2", "a100")];
    let pools = assigned(
        vec![
            pool("n1", 5, Some(NodeDatasetPhase::Ready)),
            pool("n2", 5, None),
        ],
        &before,
        &dataset(),
    );
    let d = with_status(dataset(), &pools, &before);
    let (pv, pvc, p2, obj) = (
        crate::plan::volume::desired_pv(&d),
        owned_pvc(&d),
        pools[1].clone(),
        d.clone(),
    );
    let g2 = p2.clone();
    let world = World {
        nodes,
        pools,
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let expected = vec![
        expect(Method::GET, PV, move |_| ok(pv)),
        expect(Method::GET, PVC, move |_| ok(pvc)),
        expect_pool_get(g2),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n2", move |body| {
            assert_eq!(body["spec"]["datasets"][0]["owner"]["name"], "imagenet");
            assert_eq!(
                body["metadata"]["resourceVersion"], "7",
                "written only over what was read just before"
            );
            ok(p2)
        }),
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["note"], "phase Ready -> Warming");
            ok(body)
        }),
        expect_apply(DSC_STATUS, move |body| {
            assert_eq!(
                (
                    body["status"]["nodesDesired"].as_i64(),
                    body["status"]["nodesReady"].as_i64()
                ),
                (Some(2), Some(1))
            );
            ok(obj)
        }),
    ];
    run(d, world, expected).await.unwrap();
}

#[tokio::test]
async fn pool_changed_under_the_reconcile_is_retried_not_overwritten() {
    let d = dataset();
    let world = World {
        nodes: vec![node("n1", "h100")],
        pools: vec![pool("n1", 5, None)],
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let (pv, pvc) = (crate::plan::volume::desired_pv(&d), owned_pvc(&d));
    let conflict = || {
        (
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                   "message": "the object has been modified; please apply your changes to the latest version and try again"}),
        )
    };
    // The pool keeps moving under the operator (its agent's status, say). Each
    // attempt reads it again and writes with what it read; none overwrites blindly.
    let mut expected = vec![
        expect(Method::GET, PV, move |_| ok(pv)),
        expect(Method::GET, PVC, move |_| ok(pvc)),
    ];
    for attempt in 0..POOL_WRITE_ATTEMPTS {
        let mut p = pool("n1", 5, None);
        p.metadata.resource_version = Some(format!("{}", 10 + attempt));
        expected.push(expect_pool_get(p));
        expected.push(expect_apply(
            "/apis/tidepool.dev/v1alpha1/cachepools/n1",
            move |body| {
                assert_eq!(
                    body["metadata"]["resourceVersion"],
                    format!("{}", 10 + attempt),
                    "written over what was just read"
                );
                conflict()
            },
        ));
    }
    // No status write from a stale view.
    let err = run(d, world, expected).await.unwrap_err();
    assert!(
        matches!(err, Error::PoolChanged { ref pool } if pool == "n1"),
        "{err}"
    );
    assert_eq!(err.metric_label(), "pool_changed");
}

#[tokio::test]
async fn a_pool_whose_status_moved_is_read_again_and_written() {
    let d = dataset();
    let world = World {
        nodes: vec![node("n1", "h100")],
        pools: vec![pool("n1", 5, None)],
        datasets: vec![d.clone()],
        checkpoints: vec![],
    };
    let (pv, pvc, obj) = (
        crate::plan::volume::desired_pv(&d),
        owned_pvc(&d),
        d.clone(),
    );
    let mut moved = pool("n1", 4, None);
    moved.metadata.resource_version = Some("8".into());
    let answer = moved.clone();
    let expected = vec![
        expect(Method::GET, PV, move |_| ok(pv)),
        expect(Method::GET, PVC, move |_| ok(pvc)),
        expect_pool_get(pool("n1", 5, None)),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n1", |_| {
            (
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "modified"}),
            )
        }),
        // The agent wrote a heartbeat meanwhile: read again, write again.
        expect_pool_get(moved),
        expect_apply("/apis/tidepool.dev/v1alpha1/cachepools/n1", move |body| {
            assert_eq!(body["metadata"]["resourceVersion"], "8");
            assert_eq!(body["spec"]["datasets"][0]["owner"]["uid"], "u1");
            ok(answer)
        }),
        // A first status (Pending: the agent has not reported on it yet), no event.
        expect_apply(DSC_STATUS, move |body| {
            assert_eq!(body["status"]["phase"], "Pending");
            ok(obj)
        }),
    ];
    run(d, world, expected).await.unwrap();
}
