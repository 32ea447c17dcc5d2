//! The CRDs against a real kube-apiserver (envtest.rs): they install as a user installs
//! them (`kubectl apply -f crds/`), and every CEL rule and schema bound has a valid and
//! an invalid object whose verdict comes from the server itself (dry-run creates), not
//! from an in-process interpreter. Skipped, with a line saying so, where the envtest
//! binaries are missing.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tidepool_api::control_plane_or_skip;
use tidepool_api::envtest::{ControlPlane, wait_established};
use tidepool_api::generate::crds;

const URL: &str = "https://acct.blob.core.windows.net/datasets/imagenet";

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

async fn setup(cp: &ControlPlane) -> Client {
    let client = cp.client().await;
    cp.install_crds(&client).await.unwrap();
    client
}

fn api(client: &Client, kind: &str) -> Api<DynamicObject> {
    let plural = match kind {
        "DatasetCache" => "datasetcaches",
        "CheckpointSync" => "checkpointsyncs",
        "CachePool" => "cachepools",
        _ => unreachable!(),
    };
    let ar = ApiResource {
        group: "tidepool.dev".into(),
        version: "v1alpha1".into(),
        api_version: "tidepool.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    if kind == "CachePool" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), "default", &ar)
    }
}

/// The server's verdict on creating `kind` with `spec` (dry run: nothing is stored):
/// `Ok` or the server's message.
async fn verdict(client: &Client, kind: &str, spec: Value) -> Result<(), String> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "probe"},
        "spec": spec,
    }))
    .unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api(client, kind).create(&pp, &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err(format!("{} ({})", s.message, s.code)),
        Err(e) => panic!("{kind}: {e}"),
    }
}

async fn expect(client: &Client, kind: &str, cases: Vec<(&str, Value, Option<&str>)>) {
    for (name, spec, want) in cases {
        let got = verdict(client, kind, spec).await;
        match (want, got) {
            (None, Ok(())) => {}
            (None, Err(e)) => panic!("{kind} {name}: valid, but the server refused it: {e}"),
            (Some(want), Ok(())) => {
                panic!("{kind} {name}: invalid, but the server accepted it (expected {want:?})")
            }
            (Some(want), Err(e)) => assert!(
                e.contains(want) && e.contains("(422)"),
                "{kind} {name}: the server said {e:?}, expected a 422 mentioning {want:?}"
            ),
        }
    }
}

#[tokio::test]
async fn kubectl_apply_of_crds_installs_every_kind() {
    let cp = control_plane_or_skip!("kubectl_apply_of_crds_installs_every_kind");
    let Some(kubectl) = cp.kubectl() else {
        tidepool_api::envtest::skip(
            "kubectl_apply_of_crds_installs_every_kind",
            &"no kubectl among the envtest binaries",
        );
        return;
    };
    let out = std::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig)
        .args(["apply", "-f"])
        .arg(repo().join("crds"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl apply -f crds/ failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = cp.client().await;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        wait_established(&api, &crd.name_any()).await.unwrap();
    }
    // The chart ships the same files.
    for crd in crds() {
        let file = format!("{}.yaml", crd.name_any());
        assert_eq!(
            std::fs::read(repo().join("crds").join(&file)).unwrap(),
            std::fs::read(repo().join("charts/tidepool/crds").join(&file)).unwrap(),
            "{file}: the chart's copy differs"
        );
    }
}

#[tokio::test]
async fn dataset_cache_rules_are_enforced_by_the_server() {
    let cp = control_plane_or_skip!("dataset_cache_rules_are_enforced_by_the_server");
    let client = setup(cp).await;
    let wi = json!({"serviceAccountName": "sa", "clientId": "c", "tenantId": "t"});
    expect(
        &client,
        "DatasetCache",
        vec![
            ("anonymous", json!({"source": {"url": URL}}), None),
            (
                "sas secret",
                json!({"source": {"url": URL, "credentials": {"secretRef": {"name": "lake"}}}}),
                None,
            ),
            (
                "workload identity",
                json!({"source": {"url": URL, "credentials": {"workloadIdentity": wi}}}),
                None,
            ),
            (
                "managed identity, Azurite URL",
                json!({"source": {"url": "http://127.0.0.1:10000/devstoreaccount1/c", "credentials": {"managedIdentity": {}}}}),
                None,
            ),
            (
                "interval refresh",
                json!({"source": {"url": URL}, "refresh": {"policy": "Interval", "interval": "1h30m"}}),
                None,
            ),
            (
                "eager globs, pinned, claim name, selector",
                json!({"source": {"url": URL}, "prefetch": {"policy": "Eager", "include": ["train/**"]}, "pinned": true, "claimName": "data", "nodeSelector": {"matchLabels": {"gpu": "a100"}}}),
                None,
            ),
            (
                "two credential kinds",
                json!({"source": {"url": URL, "credentials": {"secretRef": {"name": "s"}, "managedIdentity": {}}}}),
                Some("set exactly one of"),
            ),
            (
                "three credential kinds",
                json!({"source": {"url": URL, "credentials": {"secretRef": {"name": "s"}, "managedIdentity": {}, "workloadIdentity": wi}}}),
                Some("set exactly one of"),
            ),
            (
                "not http",
                json!({"source": {"url": "ftp://acct/container"}}),
                Some("url must be http(s)"),
            ),
            (
                "no container",
                json!({"source": {"url": "https://acct.blob.core.windows.net/"}}),
                Some("url must be http(s)"),
            ),
            (
                "empty url",
                json!({"source": {"url": ""}}),
                Some("spec.source.url"),
            ),
            (
                "url too long",
                json!({"source": {"url": format!("https://a/c/{}", "x".repeat(2100))}}),
                Some("spec.source.url"),
            ),
            ("no source", json!({}), Some("spec.source")),
            (
                "interval without duration",
                json!({"source": {"url": URL}, "refresh": {"policy": "Interval"}}),
                Some("refresh.interval is required"),
            ),
            (
                "zero interval",
                json!({"source": {"url": URL}, "refresh": {"policy": "Interval", "interval": "0s"}}),
                Some("positive duration"),
            ),
            (
                "interval not a duration",
                json!({"source": {"url": URL}, "refresh": {"policy": "Interval", "interval": "daily"}}),
                Some("spec.refresh.interval"),
            ),
            (
                "unknown refresh policy",
                json!({"source": {"url": URL}, "refresh": {"policy": "Sometimes"}}),
                Some("spec.refresh.policy"),
            ),
            (
                "unknown prefetch policy",
                json!({"source": {"url": URL}, "prefetch": {"policy": "Lazy"}}),
                Some("spec.prefetch.policy"),
            ),
            (
                "too many globs",
                json!({"source": {"url": URL}, "prefetch": {"policy": "Eager", "include": vec!["a/**"; 65]}}),
                Some("spec.prefetch.include"),
            ),
            (
                "empty secret name",
                json!({"source": {"url": URL, "credentials": {"secretRef": {"name": ""}}}}),
                Some("spec.source.credentials.secretRef.name"),
            ),
            (
                "empty claim name",
                json!({"source": {"url": URL}, "claimName": ""}),
                Some("spec.claimName"),
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn checkpoint_sync_rules_are_enforced_by_the_server() {
    let cp = control_plane_or_skip!("checkpoint_sync_rules_are_enforced_by_the_server");
    let client = setup(cp).await;
    expect(
        &client,
        "CheckpointSync",
        vec![
            ("minimal", json!({"destination": {"url": URL}}), None),
            (
                "quiescence and retention",
                json!({"destination": {"url": URL}, "commit": {"markers": [".metadata"], "quiescence": "5m"}, "retention": {"keepLocal": 2, "keepRemote": 10}}),
                None,
            ),
            (
                "zero quiescence",
                json!({"destination": {"url": URL}, "commit": {"quiescence": "0s"}}),
                Some("commit.quiescence must be a positive duration"),
            ),
            (
                "negative keepLocal",
                json!({"destination": {"url": URL}, "retention": {"keepLocal": -1}}),
                Some("spec.retention.keepLocal"),
            ),
            (
                "negative keepRemote",
                json!({"destination": {"url": URL}, "retention": {"keepRemote": -3}}),
                Some("spec.retention.keepRemote"),
            ),
            (
                "too many markers",
                json!({"destination": {"url": URL}, "commit": {"markers": vec!["m"; 17]}}),
                Some("spec.commit.markers"),
            ),
            (
                "s3 url and two credential kinds",
                json!({"destination": {"url": "s3://bucket/x", "credentials": {"secretRef": {"name": "a"}, "managedIdentity": {}}}}),
                Some("url must be"),
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn cache_pool_specs_and_statuses_are_bounded_by_the_server() {
    let cp = control_plane_or_skip!("cache_pool_specs_and_statuses_are_bounded_by_the_server");
    let client = setup(cp).await;
    let owner = json!({"namespace": "ml", "name": "imagenet", "uid": "u1", "generation": 1});
    let assignment = json!({"owner": owner, "volumeHandle": "tidepool-u1", "source": {"url": URL}});
    expect(
        &client,
        "CachePool",
        vec![
            ("empty", json!({}), None),
            (
                "one dataset",
                json!({"datasets": [assignment.clone()]}),
                None,
            ),
            (
                "one checkpoint sync",
                json!({"checkpointSyncs": [{"owner": owner, "volumeHandle": "tidepool-u2", "destination": {"url": URL}}]}),
                None,
            ),
            (
                "too many datasets",
                json!({"datasets": vec![assignment.clone(); 257]}),
                Some("spec.datasets"),
            ),
            (
                "an owner name too long",
                json!({"datasets": [{"owner": {"namespace": "ml", "name": "n".repeat(254), "uid": "u"}, "volumeHandle": "h", "source": {"url": URL}}]}),
                Some("spec.datasets[0].owner.name"),
            ),
        ],
    )
    .await;
}
