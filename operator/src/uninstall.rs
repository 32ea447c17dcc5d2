//! What `helm uninstall` runs around the release, as the chart's hooks:
//! [`check`] before anything is deleted (pre-delete), [`cleanup`] after (post-delete).
//!
//! Uninstalling takes away the operator, which holds the finalizers of every
//! `DatasetCache` and `CheckpointSync`, and the node pods, which serve every mounted
//! Tidepool volume and upload committed checkpoints. So the check refuses while any of
//! those objects exists (deleting them first releases their volumes, and a
//! `CheckpointSync`'s deletion waits for its uploads), or while any pod uses a volume of
//! the CSI driver (its reads would fail with `ENOTCONN` and kubelet could not unmount
//! it without the plugin). The cleanup removes what the release's processes created
//! and Helm does not know: the nodes' `CachePool`s (once no node pod is left to create
//! them again) and the operator's leader-election Lease.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use tidepool_api::{CachePool, CheckpointSync, DatasetCache};

/// Why the uninstall must not go on: each list names what is in the way.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InUse {
    /// `namespace/name` of each DatasetCache.
    pub dataset_caches: Vec<String>,
    /// `namespace/name` of each CheckpointSync.
    pub checkpoint_syncs: Vec<String>,
    /// `namespace/pod` of each pod using a volume of the driver, with the claim.
    pub pods: Vec<(String, String)>,
}

impl InUse {
    pub fn is_empty(&self) -> bool {
        self.dataset_caches.is_empty() && self.checkpoint_syncs.is_empty() && self.pods.is_empty()
    }
}

/// At most this many names per list in the message (the count is always given).
const SHOWN: usize = 10;

fn names(v: &[String]) -> String {
    let mut s = v.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > SHOWN {
        s.push_str(&format!(" and {} more", v.len() - SHOWN));
    }
    s
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "Tidepool is still in use; uninstalling now would strand it, so nothing was deleted:"
        )?;
        if !self.dataset_caches.is_empty() {
            writeln!(
                f,
                "- {} DatasetCache(s): {}",
                self.dataset_caches.len(),
                names(&self.dataset_caches)
            )?;
        }
        if !self.checkpoint_syncs.is_empty() {
            writeln!(
                f,
                "- {} CheckpointSync(s): {} (a CheckpointSync's committed checkpoints upload only while Tidepool runs)",
                self.checkpoint_syncs.len(),
                names(&self.checkpoint_syncs)
            )?;
        }
        if !self.pods.is_empty() {
            let pods: Vec<String> = self
                .pods
                .iter()
                .map(|(p, c)| format!("{p} (claim {c})"))
                .collect();
            writeln!(
                f,
                "- {} pod(s) using Tidepool volumes: {} (their reads would fail once the node pods go, and kubelet could not unmount them)",
                pods.len(),
                names(&pods)
            )?;
        }
        writeln!(
            f,
            "Delete them first: `kubectl delete datasetcaches,checkpointsyncs --all -A --wait` (the operator releases each once no pod uses it, and a CheckpointSync once its checkpoints are in the lake), and the pods that mount Tidepool volumes. Then run `helm uninstall` again: it runs this check again (Helm shows the release as uninstalling meanwhile)."
        )?;
        write!(
            f,
            "To uninstall anyway, losing what is listed: `helm uninstall --no-hooks`."
        )
    }
}

/// What stands in the way of uninstalling (see the module docs); empty when nothing.
/// `driver` is the CSI driver's name (`csi.tidepool.dev`).
pub async fn check(client: &Client, driver: &str) -> Result<InUse, kube::Error> {
    let mut in_use = InUse::default();
    for c in Api::<DatasetCache>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        in_use.dataset_caches.push(key(&c));
    }
    for c in Api::<CheckpointSync>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        in_use.checkpoint_syncs.push(key(&c));
    }
    // The claims bound to the driver's volumes (the operator's and any made by hand).
    let mut claims: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pv in Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        let Some(spec) = pv.spec else { continue };
        if spec.csi.as_ref().map(|c| c.driver.as_str()) != Some(driver) {
            continue;
        }
        if let Some(r) = spec.claim_ref
            && let (Some(ns), Some(name)) = (r.namespace, r.name)
        {
            claims.entry(ns).or_default().insert(name);
        }
    }
    if !claims.is_empty() {
        for p in Api::<Pod>::all(client.clone())
            .list(&ListParams::default())
            .await?
        {
            let ns = p.namespace().unwrap_or_default();
            let Some(bound) = claims.get(&ns) else {
                continue;
            };
            // A pod that has ended holds no mount.
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded") | Some("Failed")) {
                continue;
            }
            for v in p.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
                if let Some(c) = &v.persistent_volume_claim
                    && bound.contains(&c.claim_name)
                {
                    in_use
                        .pods
                        .push((format!("{ns}/{}", p.name_any()), c.claim_name.clone()));
                }
            }
        }
    }
    in_use.dataset_caches.sort();
    in_use.checkpoint_syncs.sort();
    in_use.pods.sort();
    Ok(in_use)
}

/// `namespace/name` of an object, for messages.
fn key<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// What [`cleanup`] removes and where.
#[derive(Debug, Clone)]
pub struct Cleanup {
    /// The release namespace (node pods and the Lease live there).
    pub namespace: String,
    /// Label selector of the node pods (they recreate a deleted CachePool while they run).
    pub node_pods: String,
    /// The leader-election Lease's name, if the operator elects one.
    pub lease: Option<String>,
    /// How long to wait for the node pods to go.
    pub wait: Duration,
}

/// What [`cleanup`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub cache_pools: Vec<String>,
    pub lease: bool,
}

/// Removes the nodes' CachePools once no node pod is left (a running agent would
/// create its pool again) and the operator's Lease. Node pods still there after
/// `wait` are an error naming them (nothing is deleted then).
pub async fn cleanup(client: &Client, c: &Cleanup) -> Result<Cleaned, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &c.namespace);
    let lp = ListParams::default().labels(&c.node_pods);
    let deadline = tokio::time::Instant::now() + c.wait;
    loop {
        let left = match pods.list(&lp).await {
            Ok(l) => l,
            // The hook's RBAC is created just before it: the authorizer may lag.
            Err(kube::Error::Api(s)) if s.code == 403 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        if left.items.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let names: Vec<String> = left.items.iter().map(|p| p.name_any()).collect();
            return Err(format!(
                "node pods {} in namespace {} are still there after {:?}; their agents would create their CachePools again, so none was deleted: once they are gone, `kubectl delete cachepools --all`",
                names.join(", "),
                c.namespace,
                c.wait
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut done = Cleaned::default();
    let pools: Api<CachePool> = Api::all(client.clone());
    for p in pools
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?
    {
        let name = p.name_any();
        match pools.delete(&name, &DeleteParams::default()).await {
            Ok(_) => done.cache_pools.push(name),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(format!("deleting CachePool {name}: {e}")),
        }
    }
    if let Some(lease) = &c.lease {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &c.namespace);
        match leases.delete(lease, &DeleteParams::default()).await {
            Ok(_) => done.lease = true,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(format!("deleting Lease {}/{lease}: {e}", c.namespace)),
        }
    }
    Ok(done)
}
