//! The Helm chart (`charts/tidepool/`), through the real Helm engine: Helm 4's Go SDK as
//! the PyPI package `helm-python-sdk` ships it (a shared library with a ctypes binding;
//! `make deps` installs it pinned into `.tools/helm-venv`). A small Python driver (in
//! [`DRIVER`]) renders, lints, validates values and installs/upgrades/uninstalls
//! releases; every check is made here, on what Helm produced.
//!
//! - Rendered with the default values and with `ci/all-on-values.yaml` (every option
//!   on); every object parsed into its `k8s-openapi` type, and a field the type does not
//!   know (a typo, a field at the wrong level) fails the test.
//! - `helm lint --strict` clean for both; `values.schema.json` refuses typos.
//! - The policy a reviewer would check: no RBAC wildcards and exactly the rules the
//!   binaries need, resources and a liveness probe on every container, only the
//!   mounting container privileged, no `latest` images by default.
//! - The node agents' peer cache: its flags, a generated secret mounted for the agent
//!   alone (the user's instead, on request; kept across upgrades), and a NetworkPolicy
//!   that opens the peer port to the node pods only and leaves their other ports open.
//! - On a real API server (envtest, `tidepool_api::envtest`; skipped with a line saying
//!   so where its binaries are missing): installed by the Helm engine (the server accepts
//!   every object), upgraded with a changed value, uninstalled (refused by the
//!   pre-delete hook while a DatasetCache exists; then nothing left but the CRDs, which
//!   Helm never deletes, with the hook pods run by [`HookKubelet`]); then the operator and agent binaries run with the
//!   chart's service accounts (impersonated) to show that its RBAC is enough for a
//!   DatasetCache to get its PV, PVC, pool assignment and a status from the agent (the
//!   `tidepool` binary is taken from beside `tidepool-operator`, where `cargo test
//!   --workspace` builds it; skipped with a line saying so where it is not).
//!
//! Where the Helm engine is not installed the tests print one `SKIPPED` line (run
//! `make deps`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Node, PersistentVolume, PersistentVolumeClaim, PodSpec,
    Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::storage::v1::CSIDriver;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tidepool_api::{CachePool, DatasetCache};

/// The Helm engine's version this test was written against (`make deps` pins it).
const HELM_SDK: &str = "0.2.2";

/// The driver: one request (JSON on stdin), one answer (JSON on stdout). Manifests are
/// split and parsed by Helm's own YAML reader (`values_from_yaml`, sigs.k8s.io/yaml), the
/// one Helm applies them with.
const DRIVER: &str = r#"
import json, re, sys
import helm_python as helm

def objects(manifests):
    out = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        # releaseutil.SplitManifests' separator.
        for doc in re.split(r"(?:^|\s*\n)---\s*", manifests[path]):
            if not doc.strip():
                continue
            obj = helm.values_from_yaml(doc)
            if obj:
                out.append({"template": path, "object": obj})
    return out

def notes(manifests):
    return "".join(v for k, v in manifests.items() if k.endswith("NOTES.txt"))

def main():
    req = json.load(sys.stdin)
    op = req["op"]
    values = req.get("values")
    if op == "version":
        return {"sdk": helm.__version__, "helm": helm.helm_sdk_version()}
    if op == "values_file":
        return helm.values_from_yaml(open(req["path"]).read())
    if op == "render":
        with helm.Chart.load(req["chart"]) as chart:
            # As an install does: the schema first, then the templates.
            chart.validate_schema(chart.merge_values(values))
            m = chart.render(values, name=req["release"], namespace=req["namespace"],
                             is_install=True)
            return {"objects": objects(m), "notes": notes(m),
                    "crds": sorted(c["filename"] for c in chart.crds),
                    "appVersion": chart.metadata.get("appVersion")}
    if op == "lint":
        return helm.lint(req["chart"], values, strict=True, namespace=req["namespace"],
                         kube_version=req["kube_version"])
    cfg = helm.Config(kubeconfig_path=req["kubeconfig"], namespace=req["namespace"])
    with cfg:
        if op == "install":
            r = cfg.install(req["chart"], req["release"], values, namespace=req["namespace"],
                            create_namespace=True, timeout=120)
        elif op == "upgrade":
            r = cfg.upgrade(req["chart"], req["release"], values, namespace=req["namespace"],
                            timeout=120)
        elif op == "uninstall":
            r = cfg.uninstall(req["release"], timeout=120, wait="watcher")
            r = r.get("release", r)
        else:
            raise SystemExit("unknown op " + op)
        return {"version": r.get("revision"), "status": r.get("status"),
                "objects": objects({"manifest": r.get("manifest") or ""}),
                "notes": r.get("notes") or ""}

try:
    answer = main()
except helm.HelmError as e:
    answer = {"error": type(e).__name__ + ": " + str(e)}
json.dump(answer, sys.stdout)
"#;

/// The Helm engine: the Python of the venv `make deps` made.
#[derive(Clone)]
struct Helm {
    python: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

fn chart_dir() -> PathBuf {
    workspace().join("charts/tidepool")
}

impl Helm {
    /// `$TIDEPOOL_HELM_PYTHON`, else `.tools/helm-venv/bin/python`; `None` with a
    /// SKIPPED line where it is missing.
    fn find(test: &str) -> Option<Helm> {
        let python = std::env::var_os("TIDEPOOL_HELM_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join(".tools/helm-venv/bin/python"));
        if !python.exists() {
            tidepool_api::skip::skip(
                tidepool_api::skip::Need::Helm,
                test,
                &format!(
                    "{} is missing: run `make deps` (pip installs helm-python-sdk=={HELM_SDK} there)",
                    python.display()
                ),
            );
            return None;
        }
        let helm = Helm { python };
        let v = helm.call(json!({"op": "version"}));
        assert_eq!(
            v["sdk"], HELM_SDK,
            "helm-python-sdk {HELM_SDK} expected (make deps installs it): {v}"
        );
        Some(helm)
    }

    fn call(&self, request: Value) -> Value {
        use std::io::Write as _;
        let mut child = Command::new(&self.python)
            .args(["-c", DRIVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.python.display()));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the Helm driver failed on {}: {}",
            request["op"],
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "the Helm driver's answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Renders the chart as `helm install tidepool -n tidepool-system` would.
    fn render(&self, values: &Value) -> Result<Rendered, String> {
        let r = self.call(json!({
            "op": "render", "chart": chart_dir(), "values": values,
            "release": "tidepool", "namespace": NS,
        }));
        if let Some(e) = r.get("error") {
            return Err(e.as_str().unwrap_or_default().to_owned());
        }
        Ok(serde_json::from_value(r).expect("render answer"))
    }

    fn all_on_values(&self) -> Value {
        self.call(json!({
            "op": "values_file",
            "path": chart_dir().join("ci/all-on-values.yaml"),
        }))
    }
}

const NS: &str = "tidepool-system";

#[derive(Deserialize)]
struct Rendered {
    objects: Vec<Templated>,
    notes: String,
    crds: Vec<String>,
    #[serde(rename = "appVersion")]
    app_version: String,
}

#[derive(Deserialize, Clone)]
struct Templated {
    template: String,
    object: Value,
}

/// Every object of a render, typed.
#[derive(Default)]
struct Objects {
    deployments: Vec<Deployment>,
    daemonsets: Vec<DaemonSet>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    csi_drivers: Vec<CSIDriver>,
    service_monitors: Vec<ServiceMonitor>,
    pod_monitors: Vec<PodMonitor>,
    config_maps: Vec<ConfigMap>,
    /// The node agents' peer secret (`peer-secret.yaml`).
    secrets: Vec<Secret>,
    /// Who may reach the node pods (`node-networkpolicy.yaml`).
    network_policies: Vec<NetworkPolicy>,
    /// The uninstall hooks (`uninstall-hooks.yaml`).
    jobs: Vec<Job>,
    /// What limits the operator's node credentials grant (`rbac-operator.yaml`).
    admission_policies: Vec<ValidatingAdmissionPolicy>,
    admission_policy_bindings: Vec<ValidatingAdmissionPolicyBinding>,
}

// Prometheus Operator's monitoring.coreos.com/v1, the fields the chart uses (names and
// types from its API reference); any other field fails the parse.
#[derive(Deserialize, serde::Serialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}
#[derive(Deserialize, serde::Serialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<Endpoint>,
}
#[derive(Deserialize, serde::Serialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}
#[derive(Deserialize, serde::Serialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    pod_metrics_endpoints: Vec<Endpoint>,
}
#[derive(Deserialize, serde::Serialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}
#[derive(Deserialize, serde::Serialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    port: String,
    path: String,
    scheme: String,
    interval: String,
    scrape_timeout: String,
}

/// Parses `v` into `K`, and fails on any field of `v` that `K` does not carry back
/// (k8s-openapi's types skip unknown fields silently; a round trip shows them).
fn typed<K: DeserializeOwned + serde::Serialize>(t: &Templated) -> K {
    let what = format!(
        "{} {} (from {})",
        t.object["kind"].as_str().unwrap_or("?"),
        t.object["metadata"]["name"].as_str().unwrap_or("?"),
        t.template
    );
    let k: K = serde_json::from_value(t.object.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse into its type: {e}\n{:#}", t.object));
    let back = serde_json::to_value(&k).unwrap();
    let mut unknown = Vec::new();
    not_carried(&t.object, &back, String::new(), &mut unknown);
    assert!(
        unknown.is_empty(),
        "{what}: fields its type does not know (or changed): {unknown:?}"
    );
    k
}

fn not_carried(orig: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                if v.is_null() {
                    continue;
                }
                match b.get(k) {
                    Some(bv) => not_carried(v, bv, format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (v, bv)) in o.iter().zip(b).enumerate() {
                not_carried(v, bv, format!("{path}[{i}]"), out);
            }
        }
        (o, b) if o == b => {}
        (o, b) => out.push(format!("{path}: {o} became {b}")),
    }
}

fn parse(objects: &[Templated]) -> Objects {
    let mut all = Objects::default();
    for t in objects {
        let api = t.object["apiVersion"].as_str().unwrap_or_default();
        match (api, t.object["kind"].as_str().unwrap_or_default()) {
            ("apps/v1", "Deployment") => all.deployments.push(typed(t)),
            ("apps/v1", "DaemonSet") => all.daemonsets.push(typed(t)),
            ("v1", "Service") => all.services.push(typed(t)),
            ("v1", "ServiceAccount") => all.service_accounts.push(typed(t)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => all.cluster_roles.push(typed(t)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                all.cluster_role_bindings.push(typed(t))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => all.roles.push(typed(t)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => all.role_bindings.push(typed(t)),
            ("storage.k8s.io/v1", "CSIDriver") => all.csi_drivers.push(typed(t)),
            ("monitoring.coreos.com/v1", "ServiceMonitor") => all.service_monitors.push(typed(t)),
            ("monitoring.coreos.com/v1", "PodMonitor") => all.pod_monitors.push(typed(t)),
            ("batch/v1", "Job") => all.jobs.push(typed(t)),
            ("v1", "ConfigMap") => all.config_maps.push(typed(t)),
            ("v1", "Secret") => all.secrets.push(typed(t)),
            ("networking.k8s.io/v1", "NetworkPolicy") => all.network_policies.push(typed(t)),
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
                all.admission_policies.push(typed(t))
            }
            ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
                all.admission_policy_bindings.push(typed(t))
            }
            (api, kind) => panic!(
                "{} renders a {api} {kind}, which this test does not know: add it here",
                t.template
            ),
        }
    }
    all
}

fn kinds(objects: &[Templated]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in objects {
        *m.entry(t.object["kind"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    m
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

fn has_arg(c: &Container, arg: &str) -> bool {
    args(c).iter().any(|a| a == arg)
}

/// The DaemonSet of `component` (`node`, `keeper`: its `app.kubernetes.io/component`
/// label), if rendered.
fn daemonset<'a>(o: &'a Objects, component: &str) -> Option<&'a DaemonSet> {
    o.daemonsets.iter().find(|d| {
        d.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .is_some_and(|c| c == component)
    })
}

fn pod_of(d: &DaemonSet) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn node_pod(o: &Objects) -> &PodSpec {
    pod_of(daemonset(o, "node").expect("the node DaemonSet"))
}

fn keeper_pod(o: &Objects) -> Option<&PodSpec> {
    daemonset(o, "keeper").map(pod_of)
}

fn operator_pod(o: &Objects) -> &PodSpec {
    o.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

#[test]
fn renders_into_typed_objects_with_default_and_all_on_values() {
    let Some(helm) = Helm::find("renders_into_typed_objects_with_default_and_all_on_values") else {
        return;
    };
    let defaults = helm.render(&json!({})).unwrap();
    assert_eq!(
        kinds(&defaults.objects),
        BTreeMap::from(
            [
                ("CSIDriver", 1),
                ("ClusterRole", 4),
                ("ClusterRoleBinding", 4),
                ("DaemonSet", 2),
                ("Deployment", 1),
                ("Job", 2),
                ("NetworkPolicy", 1),
                ("Role", 2),
                ("RoleBinding", 2),
                ("Secret", 1),
                ("Service", 1),
                ("ServiceAccount", 3),
                ("ValidatingAdmissionPolicy", 1),
                ("ValidatingAdmissionPolicyBinding", 1),
            ]
            .map(|(k, n)| (k.to_owned(), n))
        )
    );
    let d = parse(&defaults.objects);
    // By default the agents serve /metrics on 9090 in their pods (args below), and
    // nothing scrapes them until a PodMonitor is asked for.
    assert!(d.pod_monitors.is_empty());
    assert!(d.config_maps.is_empty(), "no dashboard unless asked for");
    let off = parse(&helm.render(&json!({"node": {"agent": {"metrics": {"port": 0, "podMonitor": {"enabled": true}}}}})).unwrap().objects);
    assert!(
        !args(container(node_pod(&off), "agent"))
            .iter()
            .any(|a| a.starts_with("--admin-addr"))
    );
    assert!(
        off.pod_monitors.is_empty(),
        "no PodMonitor for a port that is off"
    );
    // The generated CRDs go with the chart (Helm installs crds/ before the templates).
    assert_eq!(
        defaults.crds,
        [
            "tidepool/crds/cachepools.tidepool.dev.yaml",
            "tidepool/crds/checkpointsyncs.tidepool.dev.yaml",
            "tidepool/crds/datasetcaches.tidepool.dev.yaml"
        ]
    );
    for o in &defaults.objects {
        let ns = o.object["metadata"]["namespace"].as_str();
        let cluster_scoped = matches!(
            o.object["kind"].as_str().unwrap(),
            "CSIDriver"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "ValidatingAdmissionPolicy"
                | "ValidatingAdmissionPolicyBinding"
        );
        assert_eq!(
            ns,
            (!cluster_scoped).then_some(NS),
            "namespace of {}",
            o.template
        );
    }

    // The operator: leader election on, probes, metrics port.
    let op = container(operator_pod(&d), "operator");
    assert_eq!(
        op.image.as_deref(),
        Some(
            format!(
                "ghcr.io/tidepool-dev/tidepool-operator:{}",
                defaults.app_version
            )
            .as_str()
        )
    );
    assert_eq!(
        op.command.as_deref(),
        Some(&["tidepool-operator".to_owned()][..])
    );
    assert!(
        has_arg(op, "--lease-name=tidepool-operator"),
        "{:?}",
        args(op)
    );
    assert!(!has_arg(op, "--no-leader-election"));
    assert!(has_arg(op, "--admin-addr=0.0.0.0:8080"));
    let get = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| h.path.clone().unwrap_or_default())
    };
    assert_eq!(get(&op.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(get(&op.readiness_probe).as_deref(), Some("/readyz"));
    let env: BTreeMap<_, _> = op
        .env
        .iter()
        .flatten()
        .map(|e| {
            let from = e
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.clone());
            (e.name.clone(), e.value.clone().or(from).unwrap_or_default())
        })
        .collect();
    assert_eq!(env["POD_NAMESPACE"], "metadata.namespace");
    assert_eq!(env["POD_NAME"], "metadata.name");
    let svc = &d.services[0];
    let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("metrics"), 8080));

    // The node DaemonSet: the three binaries with the flags of their --help, the pool
    // as a hostPath, system-node-critical.
    let pod = node_pod(&d);
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let names: Vec<_> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["csi", "agent", "node-driver-registrar", "liveness-probe"]
    );
    let csi = container(pod, "csi");
    assert_eq!(
        args(csi),
        [
            "csi",
            "--endpoint=unix:///csi/csi.sock",
            "--node-id=$(NODE_NAME)",
            "--agent-socket=/var/lib/tidepool/agent.sock",
            "--state-dir=/var/lib/tidepool/csi",
            "--keeper-socket=/var/lib/tidepool/keeper/keeper.sock",
            // A keeper of an earlier release, until its pod is replaced.
            "--keeper-socket=/var/lib/tidepool/keeper.sock",
            "--log=warn,tidepool_csi=info"
        ]
    );
    // The keeper: its own DaemonSet on the same nodes, left alone by chart upgrades,
    // on the pool's socket, probed by asking it, no API access.
    let keeper_ds = daemonset(&d, "keeper").expect("the keeper DaemonSet by default");
    assert_eq!(
        keeper_ds
            .spec
            .as_ref()
            .unwrap()
            .update_strategy
            .as_ref()
            .and_then(|u| u.type_.as_deref()),
        Some("OnDelete")
    );
    let kp = pod_of(keeper_ds);
    assert_eq!(kp.automount_service_account_token, Some(false));
    assert_eq!(
        kp.tolerations, pod.tolerations,
        "the keeper runs where the node pod does"
    );
    assert_eq!(kp.node_selector, pod.node_selector);
    let keeper = container(kp, "keeper");
    assert_eq!(
        args(keeper),
        [
            "keeper",
            "--socket=/var/lib/tidepool/keeper/keeper.sock",
            "--log=warn,tidepool_csi=info"
        ]
    );
    // Its socket's directory only: none of the pool's data.
    let mounts: Vec<(&str, &str)> = keeper
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(mounts, [("keeper-dir", "/var/lib/tidepool/keeper")]);
    let host: Vec<String> = kp
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    assert_eq!(host, ["/var/lib/tidepool/keeper"]);
    assert_eq!(
        keeper
            .liveness_probe
            .as_ref()
            .and_then(|p| p.exec.as_ref())
            .and_then(|e| e.command.clone()),
        Some(
            [
                "tidepool",
                "keeper",
                "--check",
                "--socket=/var/lib/tidepool/keeper/keeper.sock"
            ]
            .map(String::from)
            .to_vec()
        )
    );
    let agent = container(pod, "agent");
    assert_eq!(
        args(agent),
        [
            "agent",
            "--node-name=$(NODE_NAME)",
            "--cache-dir=/var/lib/tidepool",
            "--cache-size=100GiB",
            "--socket=/var/lib/tidepool/agent.sock",
            "--heartbeat=10s",
            "--threads=4",
            "--sync-parallel=8",
            // The lake endpoints allowed by default: Azure's, over HTTPS.
            "--lake-endpoint=*.blob.core.windows.net",
            "--lake-endpoint=*.blob.storage.azure.net",
            "--lake-endpoint=*.blob.core.usgovcloudapi.net",
            "--lake-endpoint=*.blob.core.chinacloudapi.cn",
            // The peer cache, on by default (peers_are_on_by_default checks the rest).
            "--peer-listen=0.0.0.0:7446",
            "--peer-advertise=$(POD_IP)",
            "--peer-secret-file=/etc/tidepool/peer/secret",
            "--peer-timeout=2s",
            "--admin-addr=0.0.0.0:9090",
            "--log=warn,tidepool_csi=info"
        ]
    );
    let caps = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(
        caps,
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "SYS_RESOURCE",
            "SYS_ADMIN"
        ],
        "the agent's capabilities by default, each explained in values.yaml"
    );
    let pool = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "pool")
        .and_then(|v| v.host_path.as_ref())
        .expect("the pool is a hostPath");
    assert_eq!(pool.path, "/var/lib/tidepool");
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")),
        "GPU nodes' taint tolerated by default"
    );

    // The CSIDriver.
    let drv = &d.csi_drivers[0];
    assert_eq!(
        drv.metadata.name.as_deref(),
        Some(tidepool_api::volume::CSI_DRIVER)
    );
    let spec = &drv.spec;
    assert_eq!(spec.attach_required, Some(false));
    assert_eq!(spec.pod_info_on_mount, Some(true));
    assert_eq!(
        spec.volume_lifecycle_modes.as_deref(),
        Some(&["Persistent".to_owned()][..])
    );
    assert_eq!(spec.fs_group_policy.as_deref(), Some("None"));
    assert_eq!(spec.token_requests, None);
    assert_eq!(spec.requires_republish, Some(false));

    // NOTES tell what to apply next.
    assert!(
        defaults.notes.contains("kind: DatasetCache"),
        "{}",
        defaults.notes
    );
    assert!(
        defaults
            .notes
            .contains("rollout status daemonset/tidepool-node")
    );

    // Every option on.
    let all_on = helm.all_on_values();
    let r = helm.render(&all_on).unwrap();
    let a = parse(&r.objects);
    assert_eq!(a.service_monitors.len(), 1);
    assert_eq!(a.pod_monitors.len(), 2, "the operator's and the nodes'");
    check_all_on(&a, &r);
}

/// What each option of `ci/all-on-values.yaml` must change.
fn check_all_on(a: &Objects, r: &Rendered) {
    let op_pod = operator_pod(a);
    let op = container(op_pod, "operator");
    let dep = a.deployments[0].spec.as_ref().unwrap();
    assert_eq!(
        a.deployments[0].metadata.name.as_deref(),
        Some("tp-operator")
    );
    assert_eq!(dep.replicas, Some(2));
    assert_eq!(
        op.image.as_deref(),
        Some("registry.example.com/tidepool/tidepool-operator:0.1.0-rc.1")
    );
    assert_eq!(op.image_pull_policy.as_deref(), Some("Always"));
    assert!(has_arg(op, "--lease-name=tidepool-leader"));
    assert!(has_arg(op, "--admin-addr=0.0.0.0:9090"));
    assert!(has_arg(op, "--stale-after=90s"));
    assert_eq!(
        args(op).last().map(String::as_str),
        Some("--stale-after=3m")
    );
    assert_eq!(
        op_pod.service_account_name.as_deref(),
        Some("tidepool-controller")
    );
    assert_eq!(
        op_pod.priority_class_name.as_deref(),
        Some("system-cluster-critical")
    );
    assert!(op.env.iter().flatten().any(|e| e.name == "RUST_LOG"
        && e.value.as_deref() == Some("warn,tidepool_operator=debug,tidepool_api=debug")));
    assert_eq!(
        op_pod.image_pull_secrets.as_ref().unwrap()[0].name,
        "registry-credentials"
    );
    let labels = a.deployments[0].metadata.labels.as_ref().unwrap();
    assert_eq!(labels["team"], "ml-platform");

    let pod = node_pod(a);
    let csi = container(pod, "csi");
    let agent = container(pod, "agent");
    // Trailing slash of the pool path dropped; kubelet dir followed everywhere.
    assert!(has_arg(csi, "--agent-socket=/mnt/nvme/tidepool/agent.sock"));
    assert!(has_arg(agent, "--cache-size=1.5TiB"));
    assert!(has_arg(agent, "--no-passthrough"));
    assert!(has_arg(agent, "--heartbeat=5s"));
    assert!(has_arg(agent, "--threads=8"));
    assert!(has_arg(agent, "--log=warn,tidepool_csi=debug"));
    assert_eq!(
        &args(agent)[args(agent).len() - 2..],
        ["--retries=8", "--deadline=2m"]
    );
    assert!(has_arg(agent, "--sync-parallel=16"));
    assert!(has_arg(agent, "--managed-identity-namespace=ml-team-a"));
    let caps = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert!(
        !caps.iter().any(|c| c == "SYS_ADMIN"),
        "no CAP_SYS_ADMIN without passthrough: {caps:?}"
    );
    assert!(
        !caps.iter().any(|c| c == "SYS_RESOURCE"),
        "no CAP_SYS_RESOURCE without raiseFileLimit: {caps:?}"
    );
    let registrar = container(pod, "node-driver-registrar");
    assert!(has_arg(
        registrar,
        "--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/csi.tidepool.dev/csi.sock"
    ));
    assert!(has_arg(registrar, "--http-endpoint=:19809"));
    let probe = container(pod, "liveness-probe");
    assert!(has_arg(probe, "--health-port=19808"));
    let kubelet_mount = csi
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "kubelet-dir")
        .unwrap();
    assert_eq!(kubelet_mount.mount_path, "/var/lib/k0s/kubelet");
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.present"],
        "true"
    );
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("tidepool-node-agent")
    );
    let tpl_labels = daemonset(a, "node")
        .unwrap()
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(tpl_labels["azure.workload.identity/use"], "true");
    let node_sa = a
        .service_accounts
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("tidepool-node-agent"))
        .unwrap();
    assert_eq!(
        node_sa.metadata.annotations.as_ref().unwrap()["azure.workload.identity/client-id"],
        "00000000-0000-0000-0000-000000000001"
    );

    // Token requests make kubelet republish.
    let drv = &a.csi_drivers[0].spec;
    assert_eq!(
        drv.token_requests.as_ref().unwrap()[0].audience,
        "api://AzureADTokenExchange"
    );
    assert_eq!(drv.requires_republish, Some(true));

    // The operator grants node credentials only in the listed namespaces, and has no
    // cluster-wide binding for them.
    let creds: BTreeSet<_> = a
        .role_bindings
        .iter()
        .filter(|b| b.role_ref.name == "tp-operator-node-grants")
        .map(|b| b.metadata.namespace.clone().unwrap())
        .collect();
    assert_eq!(
        creds,
        BTreeSet::from(["ml-team-a".into(), "ml-team-b".into()])
    );
    assert!(
        !a.cluster_role_bindings
            .iter()
            .any(|b| b.role_ref.name == "tp-operator-node-grants")
    );
    assert_eq!(grant_name(a), "tp-node-credentials");
    assert!(has_arg(
        op,
        "--node-service-account=tidepool-system/tidepool-node-agent"
    ));

    // The monitors select the operator's Service / pods and name ports that exist.
    let svc = &a.services[0];
    let svc_port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(svc_port.port, 8443);
    let sm = &a.service_monitors[0];
    assert!(selects(
        &sm.spec.selector,
        svc.metadata.labels.as_ref().unwrap()
    ));
    assert_eq!(sm.spec.endpoints[0].port, svc_port.name.clone().unwrap());
    assert_eq!(
        sm.metadata.labels.as_ref().unwrap()["release"],
        "prometheus"
    );
    assert_eq!(sm.spec.namespace_selector.match_names, [NS]);
    let pm = a
        .pod_monitors
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some("tp-operator"))
        .expect("the operator PodMonitor");
    let pod_labels = a.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert!(selects(&pm.spec.selector, pod_labels));
    assert!(op.ports.iter().flatten().any(|p| p.name.as_deref()
        == Some(pm.spec.pod_metrics_endpoints[0].port.as_str())
        && p.container_port == 9090));
    // The node pods' agent metrics: on the chosen port, scraped by their own PodMonitor.
    let agent = container(node_pod(a), "agent");
    assert!(
        has_arg(agent, "--admin-addr=0.0.0.0:9464"),
        "{:?}",
        args(agent)
    );
    let npm = a
        .pod_monitors
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some("tp-node"))
        .expect("the node PodMonitor");
    let node_labels = a
        .daemonsets
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("tp-node"))
        .and_then(|d| d.spec.as_ref()?.template.metadata.as_ref()?.labels.as_ref())
        .expect("node pod labels");
    assert!(selects(&npm.spec.selector, node_labels));
    assert!(
        !selects(&pm.spec.selector, node_labels),
        "the operator's does not scrape nodes"
    );
    assert!(agent.ports.iter().flatten().any(|p| p.name.as_deref()
        == Some(npm.spec.pod_metrics_endpoints[0].port.as_str())
        && p.container_port == 9464));
    // The nodes' Grafana dashboard: the chart's file, verbatim, labelled for the sidecar.
    let dash = a
        .config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("tp-dashboards"))
        .expect("the dashboards ConfigMap");
    let labels = dash.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["grafana_dashboard"], "1");
    assert_eq!(labels["team"], "ml-platform");
    let json = &dash.data.as_ref().unwrap()["tidepool-nodes.json"];
    assert_eq!(
        json,
        &std::fs::read_to_string(chart_dir().join("dashboards/tidepool-nodes.json")).unwrap()
    );
    let parsed: Value = serde_json::from_str(json).expect("the dashboard is JSON");
    assert!(!parsed["panels"].as_array().unwrap().is_empty());
    assert!(
        r.notes
            .contains("ServiceMonitor and the PodMonitor tp-operator"),
        "{}",
        r.notes
    );
    assert!(r.notes.contains("passthrough is off"));

    // The peer cache: another port and timeout, a node that only takes, the user's
    // Secret instead of the chart's.
    let agent = container(node_pod(a), "agent");
    assert!(has_arg(agent, "--peer-listen=0.0.0.0:17446"));
    assert!(has_arg(agent, "--peer-timeout=500ms"));
    assert!(has_arg(agent, "--peer-no-serve"));
    assert!(a.secrets.is_empty(), "existingSecret: no chart Secret");
    assert_eq!(peer_secret_volume(node_pod(a)), "tidepool-peer-secret");
    check_peer_policy(a, 17446);
    assert!(r.notes.contains("serve none"), "{}", r.notes);
}

fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    sel.match_expressions.is_none()
        && sel
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v))
}

/// `node.keeper.enabled: false`: no keeper DaemonSet, and the plugin is not told of one.
#[test]
fn the_keeper_can_be_left_out() {
    let Some(helm) = Helm::find("the_keeper_can_be_left_out") else {
        return;
    };
    let r = helm
        .render(&json!({"node": {"keeper": {"enabled": false}}}))
        .unwrap();
    let o = parse(&r.objects);
    assert_eq!(kinds(&r.objects)["DaemonSet"], 1);
    assert!(daemonset(&o, "keeper").is_none());
    let csi = container(node_pod(&o), "csi");
    assert!(
        !args(csi).iter().any(|a| a.starts_with("--keeper-socket")),
        "{:?}",
        args(csi)
    );
}

/// The file `--peer-secret-file` names, followed through the agent's mounts to the
/// Secret volume and its key: returns the Secret's name (the key must be `secret`).
fn peer_secret_volume(pod: &PodSpec) -> String {
    let agent = container(pod, "agent");
    let file = args(agent)
        .iter()
        .find_map(|a| a.strip_prefix("--peer-secret-file=").map(str::to_owned))
        .expect("--peer-secret-file");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| file.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("{file} is on no mount of the agent"));
    assert_eq!(
        mount.read_only,
        Some(true),
        "the secret is mounted read-only"
    );
    let in_volume = &file[mount.mount_path.len() + 1..];
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.secret.as_ref())
        .unwrap_or_else(|| panic!("volume {} is not a Secret", mount.name));
    // Root's only: the agent runs as root.
    assert_eq!(volume.default_mode, Some(0o400));
    let item = volume
        .items
        .iter()
        .flatten()
        .find(|i| i.path == in_volume)
        .unwrap_or_else(|| panic!("no item of the Secret volume is {in_volume}"));
    assert_eq!(item.key, "secret");
    // No other container sees it.
    for c in &pod.containers {
        if c.name != "agent" {
            assert!(
                !c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == mount.name),
                "{} mounts the peer secret",
                c.name
            );
        }
    }
    volume.secret_name.clone().expect("secretName")
}

/// The node pods' NetworkPolicy: the peer port only from the node pods of this release
/// (in this namespace), and every other port a node pod container declares or is probed
/// on still open to every source.
fn check_peer_policy(o: &Objects, peer_port: i32) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(o.network_policies.len(), 1);
    let np = &o.network_policies[0];
    assert_eq!(np.metadata.namespace.as_deref(), Some(NS));
    let spec = np.spec.as_ref().unwrap();
    let labels_of = |component| {
        daemonset(o, component)
            .and_then(|d| d.spec.as_ref()?.template.metadata.as_ref()?.labels.clone())
            .unwrap_or_default()
    };
    let node_labels = labels_of("node");
    let pod_selector = spec.pod_selector.as_ref().expect("a podSelector");
    assert!(selects(pod_selector, &node_labels), "selects the node pods");
    if daemonset(o, "keeper").is_some() {
        assert!(!selects(pod_selector, &labels_of("keeper")));
    }
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    assert!(spec.egress.is_none());
    let rules = spec.ingress.clone().unwrap_or_default();
    let pod = node_pod(o);
    // Named ports resolve to the containers' ports.
    let named: BTreeMap<String, i32> = pod
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| Some((p.name.clone()?, p.container_port)))
        .collect();
    let number = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(s) => *named
            .get(s)
            .unwrap_or_else(|| panic!("no container port named {s}")),
    };
    let opens = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule, port: i32| {
        rule.ports.iter().flatten().any(|p| {
            p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                && p.port.as_ref().is_some_and(|q| number(q) == port)
                && p.end_port.is_none()
        })
    };
    // Every rule that opens the peer port lets in node pods of this release and nothing
    // else (a podSelector alone: this namespace only).
    let peer_rules: Vec<_> = rules.iter().filter(|r| opens(r, peer_port)).collect();
    assert!(
        !peer_rules.is_empty(),
        "the peer port {peer_port} is not open"
    );
    for r in &peer_rules {
        let from = r.from.as_deref().unwrap_or_default();
        assert!(!from.is_empty(), "the peer port is open to everyone: {r:?}");
        for peer in from {
            assert!(
                peer.ip_block.is_none() && peer.namespace_selector.is_none(),
                "{peer:?}"
            );
            let sel = peer.pod_selector.as_ref().expect("a podSelector");
            assert!(
                sel.match_labels.as_ref().is_some_and(|l| !l.is_empty()),
                "{sel:?}"
            );
            assert!(selects(sel, &node_labels), "{sel:?}");
        }
    }
    // Everything else the pod listens on or is probed on: open to every source.
    let mut others = BTreeSet::new();
    for c in &pod.containers {
        others.extend(c.ports.iter().flatten().map(|p| p.container_port));
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            if let Some(h) = &probe.http_get {
                others.insert(number(&h.port));
            }
            if let Some(t) = &probe.tcp_socket {
                others.insert(number(&t.port));
            }
        }
    }
    others.remove(&peer_port);
    assert!(others.len() >= 2, "{others:?}");
    for port in others {
        assert!(
            rules
                .iter()
                .any(|r| r.from.as_ref().is_none_or(|f| f.is_empty()) && opens(r, port)),
            "port {port} of the node pod is no longer open to every source: {rules:?}"
        );
    }
}

fn env_from_field(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.clone())
}

/// By default the node agents share their caches: the flags, the pod IP they advertise,
/// a generated secret mounted for the agent alone, and a NetworkPolicy that opens the
/// peer port to the node pods only while leaving the pod's other ports as they were.
#[test]
fn peers_are_on_by_default() {
    let Some(helm) = Helm::find("peers_are_on_by_default") else {
        return;
    };
    let r = helm.render(&json!({})).unwrap();
    let o = parse(&r.objects);
    let pod = node_pod(&o);
    let agent = container(pod, "agent");
    let peer_args: Vec<_> = args(agent)
        .into_iter()
        .filter(|a| a.starts_with("--peer-"))
        .collect();
    assert_eq!(
        peer_args,
        [
            "--peer-listen=0.0.0.0:7446",
            "--peer-advertise=$(POD_IP)",
            "--peer-secret-file=/etc/tidepool/peer/secret",
            "--peer-timeout=2s",
        ]
    );
    // $(POD_IP) expands only if the container defines it; the pod's own IP is where
    // other nodes reach it (the node pod is not on the host's network).
    assert_eq!(
        env_from_field(agent, "POD_IP").as_deref(),
        Some("status.podIP")
    );
    assert!(pod.host_network.is_none());
    assert!(
        agent
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("peer")
                && p.container_port == 7446
                && p.protocol.as_deref() == Some("TCP"))
    );

    // The chart's Secret: random, long enough, and what the agent reads.
    assert_eq!(o.secrets.len(), 1);
    let secret = &o.secrets[0];
    assert_eq!(secret.metadata.name.as_deref(), Some("tidepool-peer"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some(NS));
    let bytes = &secret.data.as_ref().unwrap()["secret"].0;
    assert!(bytes.len() >= 32, "{} bytes", bytes.len());
    assert!(
        bytes.iter().all(|b| b.is_ascii_alphanumeric()),
        "no whitespace or odd bytes"
    );
    assert_eq!(peer_secret_volume(pod), "tidepool-peer");
    // Another install gets another secret (lookup finds none offline).
    let again = parse(&helm.render(&json!({})).unwrap().objects);
    assert_ne!(again.secrets[0].data, secret.data);

    check_peer_policy(&o, 7446);
    // With the agent's metrics off, the policy lists the ports that are left.
    let off = parse(
        &helm
            .render(&json!({"node": {"agent": {"metrics": {"port": 0}}}}))
            .unwrap()
            .objects,
    );
    check_peer_policy(&off, 7446);
    let listed: Vec<_> = off.network_policies[0]
        .spec
        .as_ref()
        .unwrap()
        .ingress
        .iter()
        .flatten()
        .flat_map(|r| r.ports.iter().flatten())
        .filter_map(|p| p.port.clone())
        .collect();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert!(!listed.contains(&IntOrString::Int(9090)), "{listed:?}");

    assert!(r.notes.contains("TCP port 7446"), "{}", r.notes);
    assert!(
        r.notes.contains("NetworkPolicy tidepool-node"),
        "{}",
        r.notes
    );
}

/// `node.peers.enabled: false`: no peer flag, port, env, Secret or NetworkPolicy.
#[test]
fn peers_can_be_turned_off() {
    let Some(helm) = Helm::find("peers_can_be_turned_off") else {
        return;
    };
    let r = helm
        .render(&json!({"node": {"peers": {"enabled": false}}}))
        .unwrap();
    let o = parse(&r.objects);
    let pod = node_pod(&o);
    let agent = container(pod, "agent");
    assert!(
        !args(agent).iter().any(|a| a.starts_with("--peer")),
        "{:?}",
        args(agent)
    );
    assert!(env_from_field(agent, "POD_IP").is_none());
    assert!(
        !agent
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("peer"))
    );
    assert!(
        !pod.volumes.iter().flatten().any(|v| v.secret.is_some()),
        "no Secret volume"
    );
    assert!(o.secrets.is_empty());
    assert!(o.network_policies.is_empty());
    assert!(!r.notes.contains("Peer cache"), "{}", r.notes);

    // The NetworkPolicy alone can be left out; the peer cache stays on.
    let r = helm
        .render(&json!({"node": {"peers": {"networkPolicy": {"enabled": false}}}}))
        .unwrap();
    let o = parse(&r.objects);
    assert!(o.network_policies.is_empty());
    assert!(has_arg(
        container(node_pod(&o), "agent"),
        "--peer-listen=0.0.0.0:7446"
    ));
    assert!(r.notes.contains("no NetworkPolicy"), "{}", r.notes);
}

/// `node.peers.existingSecret`: the chart makes no Secret and mounts the named one;
/// `serve: false` makes the agents take without serving.
#[test]
fn peers_existing_secret_and_take_only_nodes() {
    let Some(helm) = Helm::find("peers_existing_secret_and_take_only_nodes") else {
        return;
    };
    let o = parse(
        &helm
            .render(&json!({"node": {"peers": {"existingSecret": "cluster-peer-secret"}}}))
            .unwrap()
            .objects,
    );
    assert!(o.secrets.is_empty());
    assert_eq!(peer_secret_volume(node_pod(&o)), "cluster-peer-secret");
    assert!(!has_arg(
        container(node_pod(&o), "agent"),
        "--peer-no-serve"
    ));

    let r = helm
        .render(&json!({"node": {"peers": {"serve": false}}}))
        .unwrap();
    let o = parse(&r.objects);
    let agent = container(node_pod(&o), "agent");
    assert!(has_arg(agent, "--peer-no-serve"), "{:?}", args(agent));
    assert!(has_arg(agent, "--peer-listen=0.0.0.0:7446"));
    assert!(r.notes.contains("serve none"), "{}", r.notes);

    // A peer port that another port of the pod already has is refused, naming both.
    for (values, other) in [
        (
            json!({"node": {"peers": {"port": 9090}}}),
            "node.agent.metrics.port",
        ),
        (
            json!({"node": {"peers": {"port": 9808}}}),
            "node.livenessProbe.healthPort",
        ),
        (
            json!({"node": {"peers": {"port": 9809}}}),
            "node.registrar.healthPort",
        ),
    ] {
        let e = helm
            .render(&values)
            .err()
            .unwrap_or_else(|| panic!("{values} accepted"));
        assert!(e.contains("node.peers.port") && e.contains(other), "{e}");
    }
}

#[test]
fn helm_lint_strict_is_clean() {
    let Some(helm) = Helm::find("helm_lint_strict_is_clean") else {
        return;
    };
    for (what, values) in [
        ("default values", json!({})),
        ("all-on values", helm.all_on_values()),
    ] {
        let report = helm.call(json!({
            "op": "lint", "chart": chart_dir(), "values": values,
            "namespace": NS, "kube_version": "v1.33.0",
        }));
        assert!(report.get("error").is_none(), "{what}: {report}");
        assert_eq!(report["total_charts_linted"], 1, "{what}: {report}");
        assert_eq!(report["errors"], json!([]), "{what}: {report}");
        // Severity 1 is information (e.g. "icon is recommended"); warnings (2) and
        // errors (3) fail --strict.
        let findings: Vec<_> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(findings.is_empty(), "{what}: lint findings {findings:?}");
    }
}

#[test]
fn values_schema_refuses_typos_and_contradictions() {
    let Some(helm) = Helm::find("values_schema_refuses_typos_and_contradictions") else {
        return;
    };
    for (values, expect) in [
        (json!({"node": {"pool": {"paht": "/mnt"}}}), "paht"),
        (json!({"operator": {"replica": 2}}), "replica"),
        (json!({"logLevel": "verbose"}), "logLevel"),
        (json!({"node": {"pool": {"size": "100 gigs"}}}), "size"),
        (
            json!({"node": {"pool": {"path": "var/lib/tidepool"}}}),
            "path",
        ),
        (
            json!({"operator": {"staleAfter": "2 minutes"}}),
            "staleAfter",
        ),
        (
            json!({"node": {"agent": {"resources": {"limit": {"memory": "1Gi"}}}}}),
            "limit",
        ),
        (
            json!({"node": {"tolerations": [{"key": "gpu", "operator": "Exist"}]}}),
            "operator",
        ),
        (
            json!({"operator": {"image": {"pullPolicy": "Sometimes"}}}),
            "pullPolicy",
        ),
        // Lake endpoints: a path, or nothing at all, is not an endpoint.
        (
            json!({"node": {"lake": {"allowedEndpoints": ["https://evil.example/x"]}}}),
            "allowedEndpoints",
        ),
        (
            json!({"node": {"lake": {"allowedEndpoints": []}}}),
            "allowedEndpoints",
        ),
        (
            json!({"node": {"lake": {"managedIdentityNamespaces": ["Team A"]}}}),
            "managedIdentityNamespaces",
        ),
        (
            json!({"rbac": {"nodeCredentials": "cluster"}}),
            "nodeCredentials",
        ),
        (json!({"node": {"peers": {"port": 0}}}), "port"),
        (json!({"node": {"peers": {"port": 70000}}}), "port"),
        (
            json!({"node": {"peers": {"timeout": "2 seconds"}}}),
            "timeout",
        ),
        (json!({"node": {"peers": {"serve": "no"}}}), "serve"),
        (
            json!({"node": {"peers": {"existingSecret": "Peer Secret"}}}),
            "existingSecret",
        ),
        (
            json!({"node": {"peers": {"networkPolicy": {"enable": true}}}}),
            "enable",
        ),
        // Two replicas without leader election would be two leaders.
        (
            json!({"operator": {"replicas": 2, "leaderElection": {"enabled": false}}}),
            "enabled",
        ),
    ] {
        match helm.render(&values) {
            Ok(_) => panic!("{values} was accepted"),
            Err(e) => assert!(
                e.contains(expect),
                "{values}: the error should name {expect}: {e}"
            ),
        }
    }
    // A single replica may run without it.
    helm.render(&json!({"operator": {"replicas": 1, "leaderElection": {"enabled": false}}}))
        .unwrap();
}

/// Who may do what, as (apiGroup, resource, verb) triples, over every rule a subject
/// gets from the render (ClusterRoles through ClusterRoleBindings and RoleBindings, Roles
/// through RoleBindings).
fn grants(o: &Objects, sa: &str) -> BTreeMap<(String, String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
    let is_sa = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount" && s.name == sa)
    };
    let mut add = |rules: &[PolicyRule], scope: &str| {
        for r in rules {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    for v in &r.verbs {
                        let names = r
                            .resource_names
                            .as_ref()
                            .map(|n| format!("{scope} names {n:?}"))
                            .unwrap_or_else(|| scope.to_owned());
                        out.entry((g.clone(), res.clone(), v.clone()))
                            .or_default()
                            .insert(names);
                    }
                }
            }
        }
    };
    let cluster_role = |name: &str| {
        o.cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("ClusterRole {name} is bound but not rendered"))
    };
    for b in &o.cluster_role_bindings {
        if is_sa(&b.subjects) {
            add(
                cluster_role(&b.role_ref.name)
                    .rules
                    .as_deref()
                    .unwrap_or_default(),
                "cluster",
            );
        }
    }
    for b in &o.role_bindings {
        if !is_sa(&b.subjects) {
            continue;
        }
        let ns = b.metadata.namespace.clone().unwrap();
        let rules = if b.role_ref.kind == "Role" {
            o.roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(&b.role_ref.name))
                .expect("bound Role rendered")
                .rules
                .clone()
        } else {
            cluster_role(&b.role_ref.name).rules.clone()
        };
        add(
            rules.as_deref().unwrap_or_default(),
            &format!("namespace {ns}"),
        );
    }
    out
}

/// The node credentials grant's name, from the operator's arguments.
fn grant_name(o: &Objects) -> String {
    let pod = operator_pod(o);
    let op = container(pod, "operator");
    args(op)
        .iter()
        .find_map(|a| a.strip_prefix("--node-grant-name="))
        .expect("the operator is told the grant's name")
        .to_owned()
}

fn triples(g: &BTreeMap<(String, String, String), BTreeSet<String>>) -> BTreeSet<String> {
    g.keys().map(|(a, r, v)| format!("{a}/{r}:{v}")).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `rbac.nodeCredentials: none`: the operator gets no right over Roles and is not told
/// to grant, and the node still holds no Secret; the administrator grants by hand.
#[test]
fn without_operator_grants_nobody_can_read_secrets() {
    let Some(helm) = Helm::find("without_operator_grants_nobody_can_read_secrets") else {
        return;
    };
    let r = helm
        .render(&json!({"rbac": {"nodeCredentials": "none"}}))
        .unwrap();
    let o = parse(&r.objects);
    let op_pod = operator_pod(&o);
    let op_sa = op_pod.service_account_name.clone().unwrap();
    let op = grants(&o, &op_sa);
    assert!(
        !op.keys().any(|(g, _, _)| g == "rbac.authorization.k8s.io"),
        "{op:?}"
    );
    let node = grants(&o, &node_pod(&o).service_account_name.clone().unwrap());
    assert!(
        !node
            .keys()
            .any(|(_, r, _)| r == "secrets" || r.starts_with("serviceaccounts"))
    );
    assert!(o.admission_policies.is_empty() && o.admission_policy_bindings.is_empty());
    let op = container(op_pod, "operator");
    assert!(
        !args(op).iter().any(|a| a.starts_with("--node-")),
        "{:?}",
        args(op)
    );
}

#[test]
fn policy_a_reviewer_would_check() {
    let Some(helm) = Helm::find("policy_a_reviewer_would_check") else {
        return;
    };
    for (what, values) in [
        ("default values", json!({})),
        ("all-on values", helm.all_on_values()),
    ] {
        let r = helm.render(&values).unwrap();
        let o = parse(&r.objects);

        // No wildcards anywhere in RBAC, no escalation verbs, no non-resource URLs.
        let rules = o
            .cluster_roles
            .iter()
            .flat_map(|r| r.rules.iter().flatten())
            .chain(o.roles.iter().flat_map(|r| r.rules.iter().flatten()));
        for rule in rules {
            let all = rule
                .api_groups
                .iter()
                .flatten()
                .chain(rule.resources.iter().flatten())
                .chain(rule.verbs.iter());
            // escalate and bind: only on the node credentials Role, by name (the
            // operator's grants; the admission policy is checked on the API server below).
            let named_grant = rule.resources.as_deref() == Some(&["roles".to_owned()][..])
                && rule
                    .resource_names
                    .as_ref()
                    .is_some_and(|n| n.len() == 1 && n[0].ends_with("-node-credentials"));
            for word in all {
                assert!(!word.contains('*'), "{what}: wildcard in {rule:?}");
                assert_ne!(word, "impersonate", "{what}: {rule:?}");
                if ["escalate", "bind"].contains(&word.as_str()) {
                    assert!(named_grant, "{what}: {word} in {rule:?}");
                }
            }
            assert!(rule.non_resource_urls.is_none(), "{what}: {rule:?}");
        }
        for b in &o.cluster_role_bindings {
            assert_ne!(b.role_ref.name, "cluster-admin", "{what}");
        }

        // Exactly what the binaries call (operator/src/{runtime,reconcile,leader}.rs and
        // csi-driver/src/agent/kube.rs); envtest below shows it is also enough.
        let op_sa = operator_pod(&o).service_account_name.clone().unwrap();
        assert_eq!(
            triples(&grants(&o, &op_sa)),
            set(&[
                "/nodes:get",
                "/nodes:list",
                "/nodes:patch",
                "/nodes:watch",
                "/persistentvolumeclaims:create",
                "/persistentvolumeclaims:delete",
                "/persistentvolumeclaims:get",
                "/persistentvolumeclaims:list",
                "/persistentvolumeclaims:patch",
                "/persistentvolumeclaims:watch",
                "/persistentvolumes:create",
                "/persistentvolumes:delete",
                "/persistentvolumes:get",
                "/persistentvolumes:patch",
                "coordination.k8s.io/leases:create",
                "coordination.k8s.io/leases:get",
                "coordination.k8s.io/leases:update",
                "events.k8s.io/events:create",
                "events.k8s.io/events:patch",
                "tidepool.dev/cachepools:get",
                "tidepool.dev/cachepools:list",
                "tidepool.dev/cachepools:patch",
                "tidepool.dev/cachepools:watch",
                "tidepool.dev/checkpointsyncs/status:patch",
                "tidepool.dev/checkpointsyncs:get",
                "tidepool.dev/checkpointsyncs:list",
                "tidepool.dev/checkpointsyncs:patch",
                "tidepool.dev/checkpointsyncs:watch",
                "tidepool.dev/datasetcaches/status:patch",
                "tidepool.dev/datasetcaches:get",
                "tidepool.dev/datasetcaches:list",
                "tidepool.dev/datasetcaches:patch",
                "tidepool.dev/datasetcaches:watch",
                "rbac.authorization.k8s.io/rolebindings:create",
                "rbac.authorization.k8s.io/rolebindings:delete",
                "rbac.authorization.k8s.io/rolebindings:get",
                "rbac.authorization.k8s.io/rolebindings:patch",
                "rbac.authorization.k8s.io/roles:bind",
                "rbac.authorization.k8s.io/roles:create",
                "rbac.authorization.k8s.io/roles:delete",
                "rbac.authorization.k8s.io/roles:escalate",
                "rbac.authorization.k8s.io/roles:get",
                "rbac.authorization.k8s.io/roles:patch",
            ]),
            "{what}: operator"
        );
        // Roles and RoleBindings: the node credentials grant only, by name; in every
        // namespace or only in rbac.workloadNamespaces.
        for ((group, _, _), scopes) in &grants(&o, &op_sa) {
            if group != "rbac.authorization.k8s.io" {
                continue;
            }
            let expected: BTreeSet<String> = if values.pointer("/rbac/workloadNamespaces").is_some()
            {
                ["ml-team-a", "ml-team-b"]
                    .iter()
                    .map(|ns| format!("namespace {ns} names [\"{}\"]", grant_name(&o)))
                    .collect()
            } else {
                set(&[&format!("cluster names [\"{}\"]", grant_name(&o))])
            };
            assert_eq!(*scopes, expected, "{what}");
        }
        let op_grants = grants(&o, &op_sa);
        // Leases: read and renewed by name, in the release namespace only.
        let lease = &op_grants[&(
            "coordination.k8s.io".to_owned(),
            "leases".to_owned(),
            "update".to_owned(),
        )];
        assert_eq!(lease.len(), 1, "{what}: {lease:?}");
        let lease = lease.iter().next().unwrap();
        assert!(
            lease.starts_with(&format!("namespace {NS} names")),
            "{what}: {lease}"
        );
        let node_sa = node_pod(&o).service_account_name.clone().unwrap();
        let agent = grants(&o, &node_sa);
        assert_eq!(
            triples(&agent),
            set(&[
                "/nodes:get",
                "tidepool.dev/cachepools/status:patch",
                "tidepool.dev/cachepools:create",
                "tidepool.dev/cachepools:get",
                "tidepool.dev/cachepools:list",
                "tidepool.dev/cachepools:watch",
            ]),
            "{what}: node agent"
        );
        // No Secret and no token by itself: the operator grants them per namespace.
        assert!(
            !agent
                .keys()
                .any(|(_, r, _)| r == "secrets" || r.starts_with("serviceaccounts")),
            "{what}"
        );

        // The uninstall hooks: read what is in the way; after, delete the pools and the
        // Lease. Their account and its RBAC are hooks too: they exist only while a hook
        // runs (or after one failed, for its logs).
        let hook_pods: Vec<&PodSpec> = o
            .jobs
            .iter()
            .map(|j| j.spec.as_ref().unwrap().template.spec.as_ref().unwrap())
            .collect();
        assert_eq!(hook_pods.len(), 2, "{what}");
        let hook_sa = hook_pods[0].service_account_name.clone().unwrap();
        let hook = grants(&o, &hook_sa);
        assert_eq!(
            triples(&hook),
            set(&[
                "/persistentvolumes:list",
                "/pods:list",
                "coordination.k8s.io/leases:delete",
                "tidepool.dev/cachepools:delete",
                "tidepool.dev/cachepools:list",
                "tidepool.dev/checkpointsyncs:list",
                "tidepool.dev/datasetcaches:list",
            ]),
            "{what}: uninstall hooks"
        );
        let lease = &hook[&(
            "coordination.k8s.io".to_owned(),
            "leases".to_owned(),
            "delete".to_owned(),
        )];
        assert!(
            lease.len() == 1
                && lease
                    .iter()
                    .all(|l| l.starts_with(&format!("namespace {NS} names"))),
            "{what}: {lease:?}"
        );
        let hook_objects = r
            .objects
            .iter()
            .filter(|t| t.template.ends_with("uninstall-hooks.yaml"))
            .collect::<Vec<_>>();
        // Its account, a ClusterRole and a Role with their bindings, and two Jobs.
        assert_eq!(hook_objects.len(), 7, "{what}");
        for t in hook_objects {
            assert!(
                t.object["metadata"]["annotations"]["helm.sh/hook"]
                    .as_str()
                    .is_some_and(|h| h.contains("delete")),
                "{what}: {} {} is not a hook",
                t.object["kind"],
                t.object["metadata"]["name"]
            );
        }
        for (j, pod) in o.jobs.iter().zip(&hook_pods) {
            let who = format!("{what}: Job {}", j.metadata.name.as_deref().unwrap());
            assert_eq!(j.spec.as_ref().unwrap().backoff_limit, Some(0), "{who}");
            assert_eq!(pod.restart_policy.as_deref(), Some("Never"), "{who}");
            let psc = pod.security_context.as_ref().unwrap();
            assert_eq!(psc.run_as_non_root, Some(true), "{who}");
            let c = &pod.containers[0];
            let res = c.resources.as_ref().unwrap();
            let req = res.requests.as_ref().unwrap();
            assert!(
                req.contains_key("cpu") && req.contains_key("memory"),
                "{who}"
            );
            assert!(
                res.limits
                    .as_ref()
                    .is_some_and(|l| l.contains_key("memory")),
                "{who}"
            );
            let sc = c.security_context.as_ref().unwrap();
            assert_ne!(sc.privileged, Some(true), "{who}");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{who}");
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{who}");
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_owned()][..]),
                "{who}"
            );
            assert_eq!(
                c.image,
                container(operator_pod(&o), "operator").image,
                "{who}"
            );
        }

        // Every container: requests and a memory limit, and probes.
        let mut pods = vec![("operator", operator_pod(&o)), ("node", node_pod(&o))];
        pods.extend(keeper_pod(&o).map(|p| ("keeper", p)));
        for (pod_name, pod) in pods {
            for c in &pod.containers {
                let who = format!("{what}: {pod_name} container {}", c.name);
                let res = c
                    .resources
                    .as_ref()
                    .unwrap_or_else(|| panic!("{who}: resources"));
                let req = res
                    .requests
                    .as_ref()
                    .unwrap_or_else(|| panic!("{who}: requests"));
                assert!(
                    req.contains_key("cpu") && req.contains_key("memory"),
                    "{who}"
                );
                assert!(
                    res.limits
                        .as_ref()
                        .is_some_and(|l| l.contains_key("memory")),
                    "{who}: memory limit"
                );
                assert!(c.liveness_probe.is_some(), "{who}: liveness probe");
                let image = c.image.as_deref().unwrap();
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(!tag.is_empty() && tag != "latest", "{who}: image {image}");
                let sc = c
                    .security_context
                    .as_ref()
                    .unwrap_or_else(|| panic!("{who}"));
                let privileged = sc.privileged == Some(true);
                assert_eq!(
                    privileged,
                    pod_name == "node" && c.name == "csi",
                    "{who}: only the mounting container is privileged"
                );
                let bidirectional = c
                    .volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.mount_propagation.as_deref() == Some("Bidirectional"));
                assert_eq!(
                    bidirectional, privileged,
                    "{who}: Bidirectional propagation"
                );
                if !privileged {
                    assert_eq!(sc.allow_privilege_escalation, Some(false), "{who}");
                    let caps = sc.capabilities.as_ref().unwrap_or_else(|| panic!("{who}"));
                    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{who}");
                }
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{who}");
            }
            assert!(
                pod.host_network.is_none() && pod.host_pid.is_none(),
                "{what}: {pod_name}"
            );
        }
        assert!(
            container(operator_pod(&o), "operator")
                .readiness_probe
                .is_some(),
            "{what}"
        );
        let op_sc = operator_pod(&o).security_context.as_ref().unwrap();
        assert_eq!(op_sc.run_as_non_root, Some(true), "{what}");
        // The Bidirectional mount is kubelet's directory, nothing else.
        let csi = container(node_pod(&o), "csi");
        let bidi: Vec<_> = csi
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.mount_propagation.is_some())
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(bidi, ["kubelet-dir"], "{what}");
        // Images default to the chart's appVersion.
        if values == json!({}) {
            for c in &node_pod(&o).containers[..2] {
                assert!(
                    c.image
                        .as_deref()
                        .unwrap()
                        .ends_with(&format!(":{}", r.app_version)),
                    "{what}: {:?}",
                    c.image
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// On a real API server.

/// One test at a time on the control plane: both install the cluster-scoped CSIDriver.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// The object as the server has it (`None`: not found).
async fn server_copy(client: &Client, obj: &Value) -> Option<DynamicObject> {
    let (group, version) = match obj["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", obj["apiVersion"].as_str().unwrap()),
    };
    let gvk = GroupVersionKind::gvk(group, version, obj["kind"].as_str().unwrap());
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("the server does not serve {gvk:?}: {e}"));
    let name = obj["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj["metadata"]["namespace"].as_str().unwrap(),
            &ar,
        ),
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    api.get_opt(name).await.unwrap()
}

/// Helm's answer to an install, upgrade or uninstall.
fn release(helm: &Helm, op: &str, kubeconfig: &Path, release: &str, values: &Value) -> Value {
    let r = try_release(helm, op, kubeconfig, &chart_dir(), release, values);
    assert!(
        r.get("error").is_none(),
        "helm {op} {release}: {}",
        r["error"]
    );
    r
}

fn try_release(
    helm: &Helm,
    op: &str,
    kubeconfig: &Path,
    chart: &Path,
    release: &str,
    values: &Value,
) -> Value {
    helm.call(json!({
        "op": op, "kubeconfig": kubeconfig, "chart": chart, "release": release,
        "namespace": NS, "values": values,
    }))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Stand-ins for the Prometheus Operator's CRDs (not on the envtest server): the fields
/// the chart writes, with the API's types, and no others (the server prunes nothing
/// silently: Helm's apply then fails on an unknown field).
async fn monitoring_crds(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let endpoint = json!({"type": "object", "properties": {
        "port": {"type": "string"}, "path": {"type": "string"},
        "scheme": {"type": "string", "enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
    }});
    let selector = json!({"type": "object", "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    }});
    let ns_selector = json!({"type": "object", "properties": {
        "matchNames": {"type": "array", "items": {"type": "string"}},
        "any": {"type": "boolean"},
    }});
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (kind, plural, list) in [
        ("ServiceMonitor", "servicemonitors", "endpoints"),
        ("PodMonitor", "podmonitors", "podMetricsEndpoints"),
    ] {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "listKind": format!("{kind}List"),
                          "singular": kind.to_lowercase()},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {
                    "openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "required": ["selector"], "properties": {
                            "selector": selector, "namespaceSelector": ns_selector,
                            list: {"type": "array", "items": endpoint},
                        }},
                    }},
                }}],
            },
        }))
        .unwrap();
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("chart-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        tidepool_api::envtest::wait_established(&api, &name)
            .await
            .unwrap();
    }
}

async fn create_namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("namespace {name}: {e}"),
    }
}

/// Installs with `values`, checks every object is on the server, and returns the objects.
async fn install_and_check(
    helm: &Helm,
    client: &Client,
    kubeconfig: &Path,
    name: &str,
    values: &Value,
) -> Vec<Templated> {
    let r = release(helm, "install", kubeconfig, name, values);
    assert_eq!(r["version"], 1);
    assert_eq!(r["status"], "deployed", "{r}");
    let objects: Vec<Templated> = serde_json::from_value(r["objects"].clone()).unwrap();
    assert!(!objects.is_empty());
    // The same objects as the offline render, each accepted and stored by the server.
    parse(&objects);
    for o in &objects {
        let got = server_copy(client, &o.object).await;
        assert!(
            got.is_some(),
            "{} {} is not on the server after install",
            o.object["kind"],
            o.object["metadata"]["name"]
        );
    }
    assert!(r["notes"].as_str().unwrap().contains("kind: DatasetCache"));
    objects
}

/// What kubelet does for the chart's uninstall hooks, played by the test: envtest has
/// no kubelet (kube-controller-manager's Job controller makes the hook pods, and Helm
/// waits for their Jobs). Each hook pod's command runs, as built, with its service
/// account's RBAC (impersonated) and its namespace, and its exit status becomes the
/// pod's phase, which the Job controller and then Helm act on. Pods being deleted in the
/// release namespace are let go, as kubelet does once their containers stopped.
struct HookKubelet {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<HookRun>>,
}

/// One hook pod, run.
#[derive(Debug, Clone)]
struct HookRun {
    job: String,
    ok: bool,
    output: String,
}

impl HookKubelet {
    fn start(cp: &'static tidepool_api::envtest::ControlPlane, client: &Client) -> HookKubelet {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{DeleteParams, ListParams};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (client, halt) = (client.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // Removed when the task ends, or is dropped with the runtime.
            let tmp = tempfile::Builder::new()
                .prefix("tidepool-hooks-")
                .tempdir()
                .unwrap();
            let dir = tmp.path().to_owned();
            let pods: Api<Pod> = Api::namespaced(client, NS);
            let mut runs: Vec<HookRun> = Vec::new();
            let mut seen = BTreeSet::new();
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                for p in pods.list(&ListParams::default()).await.unwrap().items {
                    let name = p.name_any();
                    if p.metadata.deletion_timestamp.is_some() {
                        let _ = pods
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await;
                        continue;
                    }
                    let hook = p.labels().get("app.kubernetes.io/component")
                        == Some(&"uninstall".to_owned());
                    // A pod that ended (an earlier uninstall's failed hook) stays ended.
                    let ended = matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded") | Some("Failed")
                    );
                    if !hook || ended || !seen.insert(name.clone()) {
                        continue;
                    }
                    let spec = p.spec.clone().unwrap();
                    let c = spec.containers[0].clone();
                    assert_eq!(
                        c.command.as_deref(),
                        Some(&["tidepool-operator".to_owned()][..])
                    );
                    let kc = impersonating(cp, spec.service_account_name.as_deref().unwrap(), &dir);
                    let out = tokio::task::spawn_blocking(move || {
                        Command::new(env!("CARGO_BIN_EXE_tidepool-operator"))
                            .args(c.args.unwrap_or_default())
                            .arg("--kubeconfig")
                            .arg(kc)
                            .env("POD_NAMESPACE", NS)
                            .output()
                            .unwrap()
                    })
                    .await
                    .unwrap();
                    let ok = out.status.success();
                    let code = out.status.code().unwrap_or(137);
                    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    );
                    let status = json!({"status": {
                        "phase": if ok { "Succeeded" } else { "Failed" },
                        "containerStatuses": [{
                            "name": spec.containers[0].name, "ready": false, "restartCount": 0,
                            "image": spec.containers[0].image, "imageID": "",
                            "state": {"terminated": {"exitCode": code,
                                "reason": if ok { "Completed" } else { "Error" },
                                "startedAt": now, "finishedAt": now}}}]}});
                    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .unwrap();
                    runs.push(HookRun {
                        job: p.labels().get("job-name").cloned().unwrap_or(name),
                        ok,
                        output: format!(
                            "{}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            runs
        });
        HookKubelet { stop, task }
    }

    async fn stop(self) -> Vec<HookRun> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// `helm uninstall`, its hooks run by a [`HookKubelet`]: Helm's answer and the hooks' runs.
async fn uninstall(
    helm: &Helm,
    cp: &'static tidepool_api::envtest::ControlPlane,
    client: &Client,
    name: &str,
) -> (Value, Vec<HookRun>) {
    let kubelet = HookKubelet::start(cp, client);
    let (helm, kubeconfig, name) = (helm.clone(), cp.kubeconfig.clone(), name.to_owned());
    let r = tokio::task::spawn_blocking(move || {
        try_release(
            &helm,
            "uninstall",
            &kubeconfig,
            &chart_dir(),
            &name,
            &Value::Null,
        )
    })
    .await
    .unwrap();
    (r, kubelet.stop().await)
}

async fn uninstall_and_check(
    helm: &Helm,
    client: &Client,
    cp: &'static tidepool_api::envtest::ControlPlane,
    name: &str,
    objects: &[Templated],
) -> Vec<HookRun> {
    let (r, runs) = uninstall(helm, cp, client, name).await;
    assert!(
        r.get("error").is_none(),
        "helm uninstall {name}: {r} (hooks: {runs:?})"
    );
    // Both hooks ran (`<fullname>-uninstall-…`), and succeeded.
    let mut jobs: Vec<(&str, bool)> = runs
        .iter()
        .map(|h| {
            (
                h.job.rsplit_once("-uninstall-").map_or("", |(_, k)| k),
                h.ok,
            )
        })
        .collect();
    jobs.sort();
    assert_eq!(jobs, [("check", true), ("cleanup", true)], "{runs:?}");
    for o in objects {
        let obj = o.object.clone();
        eventually(
            Duration::from_secs(60),
            &format!(
                "{} {} gone after uninstall",
                obj["kind"], obj["metadata"]["name"]
            ),
            || {
                let obj = obj.clone();
                async move {
                    match server_copy(client, &obj).await {
                        None => Some(()),
                        // Deleted with a finalizer pending (garbage collection).
                        Some(d) if d.metadata.deletion_timestamp.is_some() => Some(()),
                        Some(_) => None,
                    }
                }
            },
        )
        .await;
    }
    // Nothing the release's processes made stays: no CachePool.
    assert_eq!(
        Api::<CachePool>::all(client.clone())
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        0
    );
    // Helm never deletes CRDs: the users' DatasetCaches survive an uninstall.
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(
        crds.get_opt("datasetcaches.tidepool.dev")
            .await
            .unwrap()
            .is_some()
    );
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_upgrades_and_uninstalls_on_a_real_api_server() {
    const TEST: &str = "installs_upgrades_and_uninstalls_on_a_real_api_server";
    let Some(helm) = Helm::find(TEST) else {
        return;
    };
    let cp = tidepool_api::control_plane_or_skip!(TEST);
    let _one = SERIAL.lock().await;
    let client = cp.client().await;

    // Defaults, as the README's `helm install tidepool charts/tidepool -n tidepool-system
    // --create-namespace`: the namespace and the CRDs come with it.
    let objects = install_and_check(&helm, &client, &cp.kubeconfig, "tidepool", &json!({})).await;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ["datasetcaches", "checkpointsyncs", "cachepools"] {
        let name = format!("{crd}.tidepool.dev");
        tidepool_api::envtest::wait_established(&crds, &name)
            .await
            .unwrap();
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let before = deployments.get("tidepool-operator").await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let peer_secret = secrets.get("tidepool-peer").await.unwrap().data;
    assert!(
        peer_secret
            .as_ref()
            .is_some_and(|d| d["secret"].0.len() >= 32)
    );
    assert_eq!(before.spec.as_ref().unwrap().replicas, Some(1));

    // Upgrade with changed values: two replicas, debug logs, another pool size.
    let changed = json!({
        "operator": {"replicas": 2},
        "logLevel": "debug",
        "node": {"pool": {"size": "800GiB"}},
    });
    let r = release(&helm, "upgrade", &cp.kubeconfig, "tidepool", &changed);
    assert_eq!(r["version"], 2);
    assert_eq!(r["status"], "deployed", "{r}");
    // The peer secret is read back, not made anew: running agents keep agreeing.
    assert_eq!(
        secrets.get("tidepool-peer").await.unwrap().data,
        peer_secret,
        "the upgrade changed the peer secret"
    );
    let after = deployments.get("tidepool-operator").await.unwrap();
    assert_eq!(after.spec.as_ref().unwrap().replicas, Some(2));
    let env = after.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(env.iter().any(|e| e.name == "RUST_LOG"
        && e.value.as_deref() == Some("warn,tidepool_operator=debug,tidepool_api=debug")));
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), NS);
    let ds = daemonsets.get("tidepool-node").await.unwrap();
    let agent = ds.spec.unwrap().template.spec.unwrap().containers[1].clone();
    assert!(has_arg(&agent, "--cache-size=800GiB"), "{:?}", agent.args);
    // The keeper (OnDelete) keeps the pod template it runs with (the log level changed
    // everywhere else): Helm 4's --wait finds it current, never "Updated: 0/N".
    let keeper = daemonsets.get("tidepool-keeper").await.unwrap();
    assert_eq!(
        keeper.metadata.generation,
        Some(1),
        "the upgrade left the keeper's template alone"
    );
    // Asked for, the upgrade writes this release's keeper template.
    let mut asked = changed.clone();
    asked["node"]["keeper"] = json!({"upgrade": true});
    let r = release(&helm, "upgrade", &cp.kubeconfig, "tidepool", &asked);
    assert_eq!(r["status"], "deployed", "{r}");
    let keeper = daemonsets.get("tidepool-keeper").await.unwrap();
    assert_eq!(keeper.metadata.generation, Some(2));
    let args = keeper.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.iter().any(|a| a.contains("tidepool_csi=debug")),
        "{args:?}"
    );
    // Uninstalling while a DatasetCache exists is refused by the pre-delete hook, saying
    // what is in the way; nothing is deleted. Once it is gone, the uninstall goes on.
    create_namespace(&client, "ml-in-use").await;
    let datasets: Api<DatasetCache> = Api::namespaced(client.clone(), "ml-in-use");
    datasets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "DatasetCache",
                "metadata": {"name": "in-use"},
                "spec": {"source": {"url": "https://acct.blob.core.windows.net/d/p"}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let (r, runs) = uninstall(&helm, cp, &client, "tidepool").await;
    assert!(r.get("error").is_some(), "the uninstall went on: {r}");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(
        !runs[0].ok
            && runs[0]
                .output
                .contains("1 DatasetCache(s): ml-in-use/in-use"),
        "{runs:?}"
    );
    for o in &objects {
        assert!(
            server_copy(&client, &o.object).await.is_some(),
            "{} {} deleted by a refused uninstall",
            o.object["kind"],
            o.object["metadata"]["name"]
        );
    }
    datasets
        .delete("in-use", &Default::default())
        .await
        .unwrap();
    // A node's pool, as its agent made it: the post-delete hook deletes it.
    Api::<CachePool>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "CachePool",
                "metadata": {"name": "gpu-node-1"}, "spec": {}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let runs = uninstall_and_check(&helm, &client, cp, "tidepool", &objects).await;
    assert!(
        runs.iter()
            .any(|h| h.output.contains("deleted 1 CachePool(s): gpu-node-1")),
        "{runs:?}"
    );

    // Every option on: the monitoring CRDs (stand-ins) and the listed workload
    // namespaces must exist first.
    monitoring_crds(&client).await;
    for ns in ["ml-team-a", "ml-team-b"] {
        create_namespace(&client, ns).await;
    }
    let all_on = helm.all_on_values();
    let objects = install_and_check(&helm, &client, &cp.kubeconfig, "tidepool", &all_on).await;
    assert!(objects.iter().any(|o| o.object["kind"] == "ServiceMonitor"));
    uninstall_and_check(&helm, &client, cp, "tidepool", &objects).await;

    // The server's word counts: a field no schema has makes the install fail (so the
    // installs above prove every object was accepted as written, nothing dropped).
    let bad = std::env::temp_dir().join(format!("tidepool-chart-bad-{}", std::process::id()));
    copy_dir(&chart_dir(), &bad);
    std::fs::write(
        bad.join("templates/zz-bad.yaml"),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: bad\n  namespace: {{ .Release.Namespace }}\nautomountServiceAccountTokens: false\n",
    )
    .unwrap();
    let r = try_release(&helm, "install", &cp.kubeconfig, &bad, "bad", &json!({}));
    let _ = std::fs::remove_dir_all(&bad);
    let err = r["error"]
        .as_str()
        .unwrap_or_else(|| panic!("the install succeeded: {r}"));
    assert!(err.contains("automountServiceAccountTokens"), "{err}");
    // What the failed install did create goes with its release.
    let (r, _) = uninstall(&helm, cp, &client, "bad").await;
    assert!(r.get("error").is_none(), "{r}");
    let drivers: Api<CSIDriver> = Api::all(client.clone());
    eventually(
        Duration::from_secs(30),
        "the failed release's CSIDriver gone",
        || async {
            drivers
                .get_opt(tidepool_api::volume::CSI_DRIVER)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
}

/// What a SubjectAccessReview answers: may `user` (a service account's user name, with
/// the groups every service account has) do `verb` on `resource` (`name`) in `namespace`?
/// `resource` is written as kubectl does: `secrets`, `serviceaccounts/token`,
/// `roles.rbac.authorization.k8s.io`.
async fn can(
    client: &Client,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    // "resource[.group][/subresource]", as kubectl writes it.
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (resource, None),
    };
    let (resource, group) = match resource.split_once('.') {
        Some((r, g)) => (r, Some(g.to_owned())),
        None => (resource, None),
    };
    let sa_ns = user.split(':').nth(2).unwrap_or_default();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{sa_ns}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                group,
                verb: Some(verb.to_owned()),
                resource: Some(resource.to_owned()),
                subresource,
                namespace: Some(namespace.to_owned()),
                name: name.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.map(|s| s.allowed).unwrap_or(false)
}

/// A kubeconfig that acts as `system:serviceaccount:<NS>:<sa>` (impersonated by the
/// envtest admin), so a binary run with it has exactly the chart's RBAC.
fn impersonating(cp: &tidepool_api::envtest::ControlPlane, sa: &str, dir: &Path) -> PathBuf {
    let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let user = format!(
        "  user:\n    as: system:serviceaccount:{NS}:{sa}\n    as-groups:\n    - system:serviceaccounts\n    - system:serviceaccounts:{NS}\n    - system:authenticated\n"
    );
    let kc = admin.replacen("  user:\n", &user, 1);
    assert_ne!(kc, admin, "the envtest kubeconfig has a user entry");
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, kc).unwrap();
    path
}

/// A process killed on drop; its log printed if the test fails.
struct Proc {
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    fn start(cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_is_enough_for_the_operator_and_the_agent() {
    const TEST: &str = "the_charts_rbac_is_enough_for_the_operator_and_the_agent";
    let Some(helm) = Helm::find(TEST) else {
        return;
    };
    let cp = tidepool_api::control_plane_or_skip!(TEST);
    let operator_bin = PathBuf::from(env!("CARGO_BIN_EXE_tidepool-operator"));
    let agent_bin = operator_bin.with_file_name("tidepool");
    if !agent_bin.exists() {
        tidepool_api::envtest::skip(
            TEST,
            &format!(
                "{} is not built (cargo build -p tidepool-csi; `cargo test --workspace` builds it)",
                agent_bin.display()
            ),
        );
        return;
    }
    let _one = SERIAL.lock().await;
    let client = cp.client().await;
    let objects = install_and_check(&helm, &client, &cp.kubeconfig, "tidepool", &json!({})).await;
    // Removed at the end, failed or not.
    let tmp = tempfile::Builder::new()
        .prefix("tidepool-chart-rbac-")
        .tempdir()
        .unwrap();
    let work = tmp.path().to_owned();
    std::fs::create_dir_all(work.join("pool")).unwrap();
    let op_kc = impersonating(cp, "tidepool-operator", &work);
    let node_kc = impersonating(cp, "tidepool-node", &work);

    let grant = grant_name(&parse(&objects));
    assert_eq!(grant, "tidepool-node-credentials");
    let node_sa = "system:serviceaccount:tidepool-system:tidepool-node";
    let op_sa = "system:serviceaccount:tidepool-system:tidepool-operator";

    // What a workload namespace and a GPU node look like.
    let ns = "ml-rbac";
    create_namespace(&client, ns).await;

    // Before any object names them: neither account may read a Secret or mint a token,
    // here or in kube-system.
    for space in [ns, "kube-system"] {
        for who in [node_sa, op_sa] {
            assert!(
                !can(&client, who, "get", "secrets", space, Some("nope")).await,
                "{who} in {space}"
            );
            assert!(
                !can(&client, who, "list", "secrets", space, None).await,
                "{who} in {space}"
            );
            assert!(
                !can(
                    &client,
                    who,
                    "create",
                    "serviceaccounts/token",
                    space,
                    Some("default")
                )
                .await,
                "{who} in {space}"
            );
        }
    }
    let node = "chart-rbac-n1";
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node, "labels": {"gpu": "a100"}},
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    // The agent, as the node pods' service account: it creates its pool (owned by the
    // Node) and reports status.
    let agent = Proc::start(
        Command::new(&agent_bin)
            .args([
                "agent",
                "--node-name",
                node,
                "--heartbeat",
                "2s",
                "--no-passthrough",
            ])
            .args(["--retries", "1", "--deadline", "5s"])
            // The datasets below name http://127.0.0.1:9 (nothing answers there): allowed,
            // so that the agent gets as far as resolving their credentials.
            .args(["--lake-endpoint", "http://127.0.0.1:9"])
            .arg("--cache-dir")
            .arg(work.join("pool"))
            .arg("--kubeconfig")
            .arg(&node_kc)
            .env("TIDEPOOL_LOG", "info"),
        work.join("agent.log"),
    );
    let pools: Api<CachePool> = Api::all(client.clone());
    let pool = eventually(
        Duration::from_secs(30),
        "the agent's pool with a heartbeat",
        || async {
            let p = pools.get_opt(node).await.unwrap()?;
            p.status.as_ref()?.heartbeat_time.as_ref()?;
            Some(p)
        },
    )
    .await;
    assert_eq!(pool.owner_references()[0].kind, "Node");

    // The operator, as the operator's service account, on the chart's Lease.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let operator = Proc::start(
        Command::new(&operator_bin)
            .arg("--kubeconfig")
            .arg(&op_kc)
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .args(["--lease-namespace", NS, "--lease-name", "tidepool-operator"])
            .args(["--identity", "op-1"])
            // As the chart's Deployment runs it.
            .arg(format!("--node-service-account={NS}/tidepool-node"))
            .arg(format!("--node-grant-name={grant}"))
            // Reconciles every 5 s, and grants written again after 1 s: the test
            // deletes one by hand below.
            .args(["--stale-after=10s", "--node-grant-resync=1s"])
            .env("RUST_LOG", "info,kube=warn"),
        work.join("operator.log"),
    );

    // Two datasets whose credentials the agent must look up: a Secret and a workload
    // identity token, neither of which exists. "not found" (not "forbidden") shows that
    // the chart lets the agent ask.
    let datasets: Api<DatasetCache> = Api::namespaced(client.clone(), ns);
    let mut uids = Vec::new();
    for (name, creds) in [
        ("with-secret", json!({"secretRef": {"name": "nope"}})),
        (
            "with-identity",
            json!({"workloadIdentity": {"serviceAccountName": "trainer",
                   "clientId": "00000000-0000-0000-0000-000000000001",
                   "tenantId": "00000000-0000-0000-0000-000000000002"}}),
        ),
    ] {
        let d: DatasetCache = serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "DatasetCache",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "source": {"url": "http://127.0.0.1:9/data/set", "credentials": creds},
                "nodeSelector": {"matchLabels": {"gpu": "a100"}},
            },
        }))
        .unwrap();
        let d = datasets.create(&PostParams::default(), &d).await.unwrap();
        uids.push(d.uid().unwrap());
    }

    // The operator's work: PV and PVC, the pool's assignments, the status, the Lease.
    for (uid, name) in uids.iter().zip(["with-secret", "with-identity"]) {
        let pv: Api<PersistentVolume> = Api::all(client.clone());
        eventually(Duration::from_secs(30), "the PV", || async {
            pv.get_opt(&format!("tidepool-{uid}")).await.unwrap()
        })
        .await;
        let pvc: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        eventually(Duration::from_secs(30), "the PVC", || async {
            pvc.get_opt(name).await.unwrap()
        })
        .await;
        eventually(
            Duration::from_secs(30),
            "the DatasetCache's status",
            || async {
                let d = datasets.get(name).await.unwrap();
                d.status?.observed_generation
            },
        )
        .await;
    }
    eventually(
        Duration::from_secs(30),
        "both assigned to the pool",
        || async {
            let p = pools.get(node).await.unwrap();
            (p.spec.datasets.len() == 2).then_some(())
        },
    )
    .await;
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), NS)
        .get("tidepool-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("op-1"),
        "the operator leads on the chart's Lease"
    );

    // The agent's answers: each credential looked up and not found.
    let st = eventually(
        Duration::from_secs(60),
        "both datasets reported by the agent",
        || async {
            let st = pools.get(node).await.unwrap().status?;
            let all = uids.iter().all(|u| {
                st.datasets
                    .iter()
                    .any(|d| &d.uid == u && d.message.is_some())
            });
            all.then_some(st)
        },
    )
    .await;
    let message = |uid: &str| {
        st.datasets
            .iter()
            .find(|d| d.uid == uid)
            .and_then(|d| d.message.clone())
            .unwrap()
    };
    let secret = message(&uids[0]);
    assert!(
        secret.contains(&format!("Secret {ns}/nope not found")),
        "{secret}"
    );
    let token = message(&uids[1]);
    assert!(
        token.contains(&format!("service account {ns}/trainer")) && token.contains("not found"),
        "{token}"
    );
    for m in [&secret, &token] {
        assert!(!m.to_lowercase().contains("forbidden"), "{m}");
    }

    // Exactly what the objects name, in their namespace: the node may get Secret "nope"
    // and tokens of "trainer" in ml-rbac, and nothing else.
    assert!(can(&client, node_sa, "get", "secrets", ns, Some("nope")).await);
    assert!(
        can(
            &client,
            node_sa,
            "create",
            "serviceaccounts/token",
            ns,
            Some("trainer")
        )
        .await
    );
    assert!(!can(&client, node_sa, "get", "secrets", ns, Some("other")).await);
    assert!(!can(&client, node_sa, "list", "secrets", ns, None).await);
    assert!(
        !can(
            &client,
            node_sa,
            "create",
            "serviceaccounts/token",
            ns,
            Some("default")
        )
        .await
    );
    assert!(
        !can(
            &client,
            node_sa,
            "get",
            "secrets",
            "kube-system",
            Some("nope")
        )
        .await
    );
    assert!(
        !can(
            &client,
            node_sa,
            "create",
            "serviceaccounts/token",
            "kube-system",
            Some("trainer")
        )
        .await
    );
    // The operator itself still reads no Secret.
    assert!(!can(&client, op_sa, "get", "secrets", ns, Some("nope")).await);

    // A grant deleted by hand comes back (a new RoleBinding, and it works). Meanwhile
    // the agent is refused: its log is checked up to here.
    let agent_log_before = agent.log().len();
    let rb: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let before = rb.get(&grant).await.unwrap().uid().unwrap();
    rb.delete(&grant, &Default::default()).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "the RoleBinding written again",
        || async {
            let now = rb.get_opt(&grant).await.unwrap()?.uid()?;
            (now != before).then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "the grant in effect again",
        || async {
            can(&client, node_sa, "get", "secrets", ns, Some("nope"))
                .await
                .then_some(())
        },
    )
    .await;

    // The operator's right to write the grant reaches no further than the grant: another
    // Role name is refused by RBAC, other rules or another subject under the grant's
    // name by the chart's admission policy.
    let as_operator = {
        let kc = kube::config::Kubeconfig::read_from(&op_kc).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    };
    // Every attempt is a dry run (it passes authorization and admission, and nothing is
    // stored), repeated until refused: an admission policy takes effect a moment after
    // it is created, and the chart was installed just now.
    let attack = PatchParams::apply("attacker").force().dry_run();
    let roles: Api<Role> = Api::namespaced(as_operator.clone(), "kube-system");
    let rule = |resource: &str, verb: &str, names: &[&str]| json!({"apiGroups": [""], "resources": [resource], "verbs": [verb], "resourceNames": names});
    let refused_role = |name: &str, rules: Value, why: &'static str, says: &'static str| {
        let (roles, attack) = (roles.clone(), attack.clone());
        let name = name.to_owned();
        async move {
            let body = json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": name, "namespace": "kube-system"}, "rules": rules,
            });
            let s = eventually(Duration::from_secs(30), why, || async {
                match roles.patch(&name, &attack, &Patch::Apply(&body)).await {
                    Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Some(s),
                    Ok(_) => None,
                    Err(e) => panic!("{why}: {e}"),
                }
            })
            .await;
            assert!(s.message.contains(says), "{why}: {s:?}");
        }
    };
    refused_role(
        "admin-of-kube-system",
        json!([rule("secrets", "get", &["x"])]),
        "a Role of another name refused",
        "cannot patch resource \"roles\"",
    )
    .await;
    let policy = "may only allow get of named Secrets";
    refused_role(
        &grant,
        json!([rule("pods", "get", &["x"])]),
        "the grant's name with another rule refused",
        policy,
    )
    .await;
    refused_role(
        &grant,
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]),
        "the grant's name with every Secret refused",
        policy,
    )
    .await;
    let bindings: Api<RoleBinding> = Api::namespaced(as_operator.clone(), ns);
    let body = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": grant, "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": grant},
        "subjects": [{"kind": "ServiceAccount", "name": "tidepool-operator", "namespace": NS}],
    });
    let s = eventually(
        Duration::from_secs(30),
        "binding the grant to the operator refused",
        || async {
            match bindings.patch(&grant, &attack, &Patch::Apply(&body)).await {
                Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Some(s),
                Ok(_) => None,
                Err(e) => panic!("{e}"),
            }
        },
    )
    .await;
    assert!(
        s.message
            .contains("may only bind its Role to the node pods' service account"),
        "{s:?}"
    );
    assert!(!can(&client, op_sa, "get", "secrets", ns, Some("nope")).await);

    // rbac.workloadNamespaces: the operator may grant in ml-rbac only. A DatasetCache
    // elsewhere is still assigned, and its status quotes its node: forbidden. (From
    // here the operator's log says so too: it is checked up to here.)
    let operator_log_before = operator.log().len();
    let upgraded = release(
        &helm,
        "upgrade",
        &cp.kubeconfig,
        "tidepool",
        &json!({"rbac": {"workloadNamespaces": [ns]}}),
    );
    assert_eq!(upgraded["status"], "deployed", "{upgraded}");
    // The authorizer sees the new bindings a moment after they are written.
    eventually(
        Duration::from_secs(30),
        "the operator's grant rights in ml-rbac only",
        || async {
            let elsewhere = can(
                &client,
                op_sa,
                "patch",
                "roles",
                "ml-elsewhere",
                Some(&grant),
            );
            let here = can(
                &client,
                op_sa,
                "patch",
                "roles.rbac.authorization.k8s.io",
                ns,
                Some(&grant),
            );
            (!elsewhere.await && here.await).then_some(())
        },
    )
    .await;
    create_namespace(&client, "ml-elsewhere").await;
    let elsewhere: Api<DatasetCache> = Api::namespaced(client.clone(), "ml-elsewhere");
    elsewhere
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "DatasetCache",
                "metadata": {"name": "outside", "namespace": "ml-elsewhere"},
                "spec": {
                    "source": {"url": "http://127.0.0.1:9/data/set",
                               "credentials": {"secretRef": {"name": "lake"}}},
                    "nodeSelector": {"matchLabels": {"gpu": "a100"}},
                },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let ready = eventually(
        Duration::from_secs(60),
        "the outside DatasetCache's Ready condition quoting its node",
        || async {
            let d = elsewhere.get("outside").await.unwrap();
            let c = d
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            c.message.contains(&format!("node {node}:")).then_some(c)
        },
    )
    .await;
    assert!(
        ready.message.contains("forbidden") && ready.message.contains("Secret ml-elsewhere/lake"),
        "{}",
        ready.message
    );
    assert!(
        !can(
            &client,
            node_sa,
            "get",
            "secrets",
            "ml-elsewhere",
            Some("lake")
        )
        .await
    );
    elsewhere
        .delete("outside", &Default::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the outside DatasetCache gone",
        || async {
            elsewhere
                .get_opt("outside")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;

    // Deleting releases everything (the operator deletes PV and PVC, removes the
    // assignments and its finalizer).
    for name in ["with-secret", "with-identity"] {
        datasets.delete(name, &Default::default()).await.unwrap();
    }
    eventually(
        Duration::from_secs(60),
        "the DatasetCaches gone",
        || async {
            datasets
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;
    for uid in &uids {
        let pv: Api<PersistentVolume> = Api::all(client.clone());
        eventually(Duration::from_secs(30), "the PV gone", || async {
            match pv.get_opt(&format!("tidepool-{uid}")).await.unwrap() {
                None => Some(()),
                Some(p) if p.metadata.deletion_timestamp.is_some() => Some(()),
                Some(_) => None,
            }
        })
        .await;
    }
    // The grant went with the namespace's last object.
    eventually(
        Duration::from_secs(30),
        "the node's grant withdrawn",
        || async {
            (!can(&client, node_sa, "get", "secrets", ns, Some("nope")).await).then_some(())
        },
    )
    .await;
    assert!(
        !can(
            &client,
            node_sa,
            "create",
            "serviceaccounts/token",
            ns,
            Some("trainer")
        )
        .await
    );
    assert!(
        Api::<Role>::namespaced(client.clone(), ns)
            .get_opt(&grant)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .get_opt(&grant)
            .await
            .unwrap()
            .is_none()
    );
    for (p, upto) in [(&operator, operator_log_before), (&agent, agent_log_before)] {
        let log = p.log();
        let log = log[..upto.min(log.len())].to_lowercase();
        assert!(!log.contains("forbidden"), "{}:\n{log}", p.log.display());
    }
    drop((operator, agent));
    Api::<Node>::all(client.clone())
        .delete(node, &Default::default())
        .await
        .unwrap();
    uninstall_and_check(&helm, &client, cp, "tidepool", &objects).await;
    drop(tmp);
}

/// The unknown-field check itself: a typo the type would skip silently is reported.
#[test]
fn the_typed_check_reports_fields_its_type_does_not_know() {
    let t = Templated {
        template: "t.yaml".into(),
        object: json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "x", "labels": {"a": "b"}, "anotations": {"c": "d"}},
            "automountServiceAccountTokens": false,
        }),
    };
    let err = std::panic::catch_unwind(|| typed::<ServiceAccount>(&t)).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(".metadata.anotations"), "{msg}");
    assert!(msg.contains(".automountServiceAccountTokens"), "{msg}");
    // And a correct object passes.
    let ok = Templated {
        template: "t.yaml".into(),
        object: json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}}),
    };
    typed::<ServiceAccount>(&ok);
}
