//! The cluster under test: found, checked and described once per scenario.
//!
//! [`Env::connect`] refuses to go on (panics, with the reason and what to do) unless the
//! suite can really run: a reachable API server at Kubernetes >= 1.33, the Tidepool CRDs,
//! the chart's release (node DaemonSet and operator), the e2e lake, exactly one node
//! labelled as the "gpu" node and one more node with a Tidepool pool. This is what makes
//! `make e2e` (or a bare `cargo test`) fail, never pass, where there is no cluster.
//!
//! Settings (environment, all optional):
//! - `TIDEPOOL_E2E_RELEASE` (default `tidepool`), `TIDEPOOL_E2E_RELEASE_NAMESPACE`
//!   (`tidepool-system`): the Helm release under test, as `make deploy` installs it;
//! - `TIDEPOOL_E2E_LAKE_NAMESPACE` (`tidepool-e2e`): where `manifests/azurite.yaml` runs;
//! - `TIDEPOOL_E2E_GPU_LABEL` (`tidepool.dev/gpu=true`): the label of the "gpu" node.

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Node, Pod, Secret},
};
use kube::{Api, Client, ResourceExt, api::ListParams};
use tidepool_api::{CachePool, DatasetCache};

use crate::wait::{self, Check};

/// What to do when the suite cannot run; ends every refusal.
pub const HOW_TO_RUN: &str = "The e2e suite runs only against a cluster where Tidepool is \
deployed: `make images kind-up deploy` (needs Docker, kind, kubectl and helm) then `make e2e`, or \
without Docker `make images node-up` (a local two-node cluster from the Kubernetes binaries in \
TIDEPOOL_NODE_BIN) then `make e2e`, or point KUBECONFIG at another cluster where the chart and \
e2e/manifests/azurite.yaml are installed. See e2e/README.md.";

/// The lake's Secret (`accountName`, `accountKey`) and Deployment in the lake namespace
/// (manifests/azurite.yaml).
const LAKE_SECRET: &str = "azurite-account";
const LAKE_DEPLOYMENT: &str = "azurite";

/// Tidepool's minimum Kubernetes version (DESIGN.md, "Platforms").
const MIN_MINOR: u32 = 33;

/// How long the first contact with the API server may take before the cluster counts as
/// unreachable (a kind cluster whose Docker daemon is gone hangs rather than refuses).
const CONTACT: Duration = Duration::from_secs(30);

/// The in-cluster lake.
#[derive(Clone, Debug)]
pub struct Lake {
    /// `http://<account>.<namespace>.svc.cluster.local:10000`: virtual-host style, the
    /// account being the Service's name (see manifests/azurite.yaml).
    pub endpoint: String,
    pub account: String,
    /// The account key (base64), from the lake's Secret.
    pub key: String,
    /// The Azurite image the lake runs; the seeding Jobs run its Node.js.
    pub image: String,
}

/// The cluster under test.
#[derive(Clone)]
pub struct Env {
    pub client: Client,
    pub release: String,
    pub release_namespace: String,
    /// `key=value` of the "gpu" node's label.
    pub gpu_label: (String, String),
    /// The one node carrying the gpu label.
    pub gpu_node: String,
    /// Another node with a Tidepool pool (where a job resumes).
    pub other_node: String,
    /// The image of the chart's node containers (`tidepool`), reused by the suite's
    /// readers and writers.
    pub node_image: String,
    pub lake: Lake,
}

fn setting(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn refuse(why: impl std::fmt::Display) -> ! {
    panic!("e2e cannot run: {why}\n{HOW_TO_RUN}")
}

impl Env {
    /// Connects to the cluster of the current kubeconfig context and checks that the suite
    /// can run there; waits (bounded) for Tidepool to be rolled out and ready. Panics with
    /// the reason otherwise.
    pub async fn connect() -> Env {
        // kube is built with ring only, but rustls wants a process-wide provider chosen
        // when more than one could be compiled in (as in the rest of the workspace).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match tokio::time::timeout(CONTACT, Client::try_default()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => refuse(format!(
                "no Kubernetes cluster is configured here (no usable KUBECONFIG, ~/.kube/config or in-cluster config): {e}"
            )),
            Err(_) => refuse("loading the Kubernetes client configuration took more than 30 s"),
        };
        let info = match tokio::time::timeout(CONTACT, client.apiserver_version()).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => refuse(format!(
                "the cluster of the current kubeconfig context does not answer: {e}"
            )),
            Err(_) => {
                refuse("the cluster of the current kubeconfig context did not answer within 30 s")
            }
        };
        let minor: u32 = info
            .minor
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap_or(0);
        if info.major != "1" || minor < MIN_MINOR {
            refuse(format!(
                "the cluster runs Kubernetes {}, Tidepool needs >= 1.{MIN_MINOR} (kind: use a \
                 release >= v0.29, or KIND_NODE_IMAGE=kindest/node:v1.33.x)",
                info.git_version
            ));
        }

        let release = setting("TIDEPOOL_E2E_RELEASE", "tidepool");
        let release_namespace = setting("TIDEPOOL_E2E_RELEASE_NAMESPACE", "tidepool-system");
        let lake_namespace = setting("TIDEPOOL_E2E_LAKE_NAMESPACE", "tidepool-e2e");
        let gpu = setting("TIDEPOOL_E2E_GPU_LABEL", "tidepool.dev/gpu=true");
        let gpu_label = match gpu.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => refuse(format!("TIDEPOOL_E2E_GPU_LABEL={gpu:?} is not key=value")),
        };

        if let Err(e) = Api::<DatasetCache>::all(client.clone())
            .list(&ListParams::default().limit(1))
            .await
        {
            refuse(format!(
                "the Tidepool CRDs are not installed (listing DatasetCaches failed: {e}); `make deploy` installs the chart with them"
            ));
        }

        let daemonset = node_daemonset(&client, &release, &release_namespace).await;
        let node_image = daemonset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.iter().find(|c| c.name == "agent"))
            .and_then(|c| c.image.clone())
            .unwrap_or_else(|| {
                refuse(format!(
                    "the DaemonSet {} has no `agent` container with an image; is it Tidepool's chart?",
                    daemonset.name_any()
                ))
            });

        let lake = lake(&client, &lake_namespace).await;

        let nodes = Api::<Node>::all(client.clone());
        let gpu_nodes = nodes
            .list(&ListParams::default().labels(&gpu))
            .await
            .unwrap_or_else(|e| refuse(format!("listing nodes failed: {e}")));
        let gpu_node = match gpu_nodes.items.as_slice() {
            [n] => n.name_any(),
            [] => refuse(format!(
                "no node is labelled {gpu}; label one worker so (kind-config.yaml does it for worker 1)"
            )),
            many => refuse(format!(
                "{} nodes are labelled {gpu}; the suite needs exactly one \"gpu\" node",
                many.len()
            )),
        };

        let mut env = Env {
            client,
            release,
            release_namespace,
            gpu_label,
            gpu_node,
            other_node: String::new(),
            node_image,
            lake,
        };
        env.other_node = env.wait_ready().await;
        env
    }

    /// The `app.kubernetes.io/...` selector of the release's pods of one component
    /// (`node` or `operator`).
    pub fn selector(&self, component: &str) -> String {
        format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
            self.release
        )
    }

    /// Waits (up to [`wait::SETTLE`]) until the node DaemonSet and the operator are rolled
    /// out and ready and both the gpu node and another node have a `CachePool`; returns the
    /// other node. Scenarios that disturb Tidepool (a deleted pod, an upgrade) call it again
    /// before they finish.
    pub async fn wait_ready(&self) -> String {
        let this = self;
        let result = wait::until("Tidepool rolled out and ready", wait::SETTLE, move || async move {
            let ds = node_daemonset(&this.client, &this.release, &this.release_namespace).await;
            if let Err(why) = daemonset_rolled_out(&ds) {
                return Check::Waiting(why);
            }
            let operators = Api::<Deployment>::namespaced(
                this.client.clone(),
                &this.release_namespace,
            )
            .list(&ListParams::default().labels(&this.selector("operator")))
            .await;
            match operators.map(|l| l.items) {
                Ok(list) if list.len() == 1 => {
                    if let Err(why) = deployment_rolled_out(&list[0]) {
                        return Check::Waiting(why);
                    }
                }
                Ok(list) => {
                    return Check::Failed(format!(
                        "{} operator Deployments in release {}; expected one",
                        list.len(),
                        this.release
                    ));
                }
                Err(e) => return Check::Waiting(format!("listing Deployments: {e}")),
            }
            let pools = match Api::<CachePool>::all(this.client.clone())
                .list(&ListParams::default())
                .await
            {
                Ok(l) => l.items,
                Err(e) => return Check::Waiting(format!("listing CachePools: {e}")),
            };
            if !pools.iter().any(|p| p.name_any() == this.gpu_node) {
                return Check::Waiting(format!(
                    "no CachePool for the gpu node {} yet",
                    this.gpu_node
                ));
            }
            let nodes = Api::<Node>::all(this.client.clone());
            for p in &pools {
                let name = p.name_any();
                if name == this.gpu_node {
                    continue;
                }
                if let Ok(Some(node)) = nodes.get_opt(&name).await
                    && node.labels().get(&this.gpu_label.0) != Some(&this.gpu_label.1)
                {
                    return Check::Done(name);
                }
            }
            Check::Waiting(format!(
                "no CachePool of a node other than the gpu node {} (pools: {:?}); the suite needs a second worker running Tidepool",
                this.gpu_node,
                pools.iter().map(|p| p.name_any()).collect::<Vec<_>>()
            ))
        })
        .await;
        result.unwrap_or_else(|e| refuse(e))
    }

    /// The node DaemonSet's pod on `node`, if there is one.
    pub async fn node_pod(&self, node: &str) -> Option<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), &self.release_namespace)
            .list(
                &ListParams::default()
                    .labels(&self.selector("node"))
                    .fields(&format!("spec.nodeName={node}")),
            )
            .await
            .ok()?
            .items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
    }

    /// The node agent's `/metrics` on `node`, through the API server's pod proxy (so
    /// the suite needs no route to pod addresses); the chart's default port.
    pub async fn node_metrics(&self, node: &str) -> String {
        let pod = self
            .node_pod(node)
            .await
            .unwrap_or_else(|| refuse(format!("no node pod on {node}")));
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}:9090/proxy/metrics",
            self.release_namespace,
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let req = http::Request::get(&path)
            .body(Vec::new())
            .expect("a valid request");
        self.client
            .request_text(req)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The release's node DaemonSet, as it is now.
    pub async fn node_daemonset(&self) -> DaemonSet {
        node_daemonset(&self.client, &self.release, &self.release_namespace).await
    }
}

async fn node_daemonset(client: &Client, release: &str, namespace: &str) -> DaemonSet {
    let selector = format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=node");
    let list = Api::<DaemonSet>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap_or_else(|e| refuse(format!("listing DaemonSets in {namespace} failed: {e}")));
    match <[DaemonSet; 1]>::try_from(list.items) {
        Ok([ds]) => ds,
        Err(items) => refuse(format!(
            "Tidepool is not installed as Helm release {release:?} in namespace {namespace:?}: \
             {} node DaemonSets match {selector} (expected one)",
            items.len()
        )),
    }
}

/// Ok when every scheduled pod runs the current template and is available.
pub fn daemonset_rolled_out(ds: &DaemonSet) -> Result<(), String> {
    let generation = ds.metadata.generation.unwrap_or_default();
    let s = ds.status.clone().unwrap_or_default();
    let desired = s.desired_number_scheduled;
    let updated = s.updated_number_scheduled.unwrap_or_default();
    let available = s.number_available.unwrap_or_default();
    if s.observed_generation.unwrap_or_default() < generation {
        return Err(format!(
            "DaemonSet {} generation {generation} not observed yet",
            ds.name_any()
        ));
    }
    if desired < 2 || updated != desired || available != desired || s.number_ready != desired {
        return Err(format!(
            "DaemonSet {}: {desired} desired, {updated} updated, {} ready, {available} available (needs >= 2 nodes)",
            ds.name_any(),
            s.number_ready
        ));
    }
    Ok(())
}

fn deployment_rolled_out(d: &Deployment) -> Result<(), String> {
    let generation = d.metadata.generation.unwrap_or_default();
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let s = d.status.clone().unwrap_or_default();
    if s.observed_generation.unwrap_or_default() < generation
        || s.updated_replicas.unwrap_or_default() != want
        || s.ready_replicas.unwrap_or_default() != want
    {
        return Err(format!(
            "operator Deployment {}: {want} wanted, {} updated, {} ready",
            d.name_any(),
            s.updated_replicas.unwrap_or_default(),
            s.ready_replicas.unwrap_or_default()
        ));
    }
    Ok(())
}

async fn lake(client: &Client, namespace: &str) -> Lake {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(LAKE_SECRET)
        .await
        .unwrap_or_else(|e| refuse(format!("reading the lake's Secret in {namespace}: {e}")))
        .unwrap_or_else(|| {
            refuse(format!(
                "the e2e lake is not deployed (no Secret azurite-account in namespace {namespace}); \
                 `make deploy` applies e2e/manifests/azurite.yaml"
            ))
        });
    let field = |key: &str| -> String {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .unwrap_or_else(|| refuse(format!("the lake's Secret has no key {key}")));
        String::from_utf8(bytes)
            .unwrap_or_else(|_| refuse(format!("the lake's {key} is not UTF-8")))
    };
    let account = field("accountName");
    let key = field("accountKey");
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let deployments = &deployments;
    let ready = wait::until("the e2e lake (Azurite) ready", wait::SETTLE, move || async move {
        match deployments.get_opt(LAKE_DEPLOYMENT).await {
            Ok(Some(d)) => match deployment_rolled_out(&d) {
                Ok(()) => Check::Done(d),
                Err(why) => Check::Waiting(why),
            },
            Ok(None) => Check::Failed(format!(
                "no Deployment azurite in namespace {namespace}; `make deploy` applies e2e/manifests/azurite.yaml"
            )),
            Err(e) => Check::Waiting(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|e| refuse(e));
    let image = ready
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_else(|| refuse("the azurite Deployment names no image"));
    Lake {
        endpoint: format!("http://{account}.{namespace}.svc.cluster.local:10000"),
        account,
        key,
        image,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Namespace, Service};

    use super::*;

    /// Each document of the manifest `make deploy` applies, parsed into its Kubernetes type
    /// and serialised back, is unchanged (a misspelled field would be dropped), and the
    /// names the suite relies on hold: the Secret and Deployment it reads, and an account
    /// named like the Service (the URL's first host label is the account on both sides).
    #[test]
    fn the_lake_manifest_is_what_the_suite_reads() {
        let text = include_str!("../manifests/azurite.yaml");
        let mut secret = None;
        let mut service = None;
        let mut deployment = None;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = value["kind"].as_str().unwrap().to_owned();
            let back = match kind.as_str() {
                "Namespace" => serde_json::to_value(
                    serde_json::from_value::<Namespace>(value.clone()).unwrap(),
                ),
                "Secret" => {
                    let s: Secret = serde_json::from_value(value.clone()).unwrap();
                    secret = Some(s.clone());
                    serde_json::to_value(s)
                }
                "Deployment" => {
                    let d: Deployment = serde_json::from_value(value.clone()).unwrap();
                    deployment = Some(d.clone());
                    serde_json::to_value(d)
                }
                "Service" => {
                    let s: Service = serde_json::from_value(value.clone()).unwrap();
                    service = Some(s.clone());
                    serde_json::to_value(s)
                }
                other => panic!("unexpected kind {other}"),
            }
            .unwrap();
            assert_eq!(back, value, "{kind} round-trips");
        }
        let secret = secret.expect("a Secret");
        assert_eq!(secret.name_any(), LAKE_SECRET);
        let data = secret.string_data.expect("stringData");
        assert!(data.contains_key("accountKey"));
        assert_eq!(
            data.get("accountName").map(String::as_str),
            Some(service.expect("a Service").name_any().as_str()),
            "the account is named like the Service"
        );
        assert_eq!(
            deployment.expect("a Deployment").name_any(),
            LAKE_DEPLOYMENT
        );
    }
}
