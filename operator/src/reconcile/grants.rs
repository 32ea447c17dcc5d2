//! The node agent's access to lake credentials, granted by name and per namespace.
//!
//! The node pods run privileged on every GPU node; they hold no cluster-wide right to
//! Secrets or service account tokens. For each namespace that has `DatasetCache`s or
//! `CheckpointSync`s, the operator keeps one Role (`--node-grant-name`) that allows
//! exactly `get` of the Secrets they name (`credentials.secretRef`) and `create` of
//! tokens for the service accounts they name (`credentials.workloadIdentity`), both by
//! `resourceNames`, and one RoleBinding of it to the node pods' service account
//! (`--node-service-account`). Nothing else in the namespace is reachable.
//!
//! Order: an object's grant is written before its pools are assigned (so an agent never
//! asks before it may), and withdrawn after its assignments are released at deletion (a
//! `CheckpointSync` keeps its grant while its nodes still upload). A namespace whose last
//! object goes loses its Role and RoleBinding.
//!
//! The operator itself never reads a Secret. To write a Role that grants what it does
//! not hold, Kubernetes requires `escalate` on it, and `bind` to bind it; the chart
//! gives both only for this one Role name (`resourceNames`), and a
//! ValidatingAdmissionPolicy limits what that Role and RoleBinding may contain (see
//! `charts/tidepool/templates/rbac-operator.yaml`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch},
};
use serde_json::json;
use tidepool_api::{CheckpointSync, DatasetCache, LakeLocation};
use tracing::info;

use super::{Context, Reconciled, apply_params};
use crate::{Error, plan::Workload};

/// Where the grants go and whom they name.
#[derive(Clone, Debug)]
pub struct GrantsConfig {
    /// Namespace of the node pods' service account.
    pub node_namespace: String,
    /// Name of the node pods' service account.
    pub node_service_account: String,
    /// Name of the Role and RoleBinding in each workload namespace.
    pub name: String,
    /// A namespace's grant is written again after this long even when nothing changed
    /// (at its objects' next reconcile), so that a Role or RoleBinding deleted or
    /// edited by hand comes back.
    pub resync: Duration,
}

/// The default of [`GrantsConfig::resync`].
pub const RESYNC: Duration = Duration::from_secs(600);

/// What this process wrote, and which objects it released.
#[derive(Default)]
pub struct GrantState {
    written: HashMap<String, (Wanted, Instant)>,
    /// Objects whose grant went with their deletion: the shared stores may still hold
    /// them for a moment, and they must not bring it back.
    released: HashSet<String>,
}

/// What the node agent may read in one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Secrets, by name.
    pub secrets: BTreeSet<String>,
    /// Service accounts whose tokens it may request, by name.
    pub service_accounts: BTreeSet<String>,
}

impl Wanted {
    fn add(&mut self, location: &LakeLocation) {
        let Some(c) = &location.credentials else {
            return;
        };
        if let Some(s) = &c.secret_ref {
            self.secrets.insert(s.name.clone());
        }
        if let Some(w) = &c.workload_identity {
            self.service_accounts.insert(w.service_account_name.clone());
        }
    }

    /// Nothing to grant.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty() && self.service_accounts.is_empty()
    }
}

/// What every object in `namespace` needs, except the one whose uid is `releasing` (its
/// deletion has released its assignments). Objects being deleted still count: a
/// `CheckpointSync` uploads its pending commits with these credentials.
pub fn wanted(
    namespace: &str,
    datasets: &[&DatasetCache],
    checkpoints: &[&CheckpointSync],
    releasing: Option<&str>,
) -> Wanted {
    let mut w = Wanted::default();
    let counts = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.namespace.as_deref() == Some(namespace)
            && (releasing.is_none() || m.uid.as_deref() != releasing)
    };
    for d in datasets.iter().filter(|d| counts(d.meta())) {
        w.add(d.location());
    }
    for c in checkpoints.iter().filter(|c| counts(c.meta())) {
        w.add(c.location());
    }
    w
}

/// The Role that grants `wanted`.
pub fn role(config: &GrantsConfig, namespace: &str, wanted: &Wanted) -> serde_json::Value {
    let mut rules = Vec::new();
    if !wanted.secrets.is_empty() {
        rules.push(json!({
            "apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
            "resourceNames": wanted.secrets,
        }));
    }
    if !wanted.service_accounts.is_empty() {
        rules.push(json!({
            "apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"],
            "resourceNames": wanted.service_accounts,
        }));
    }
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": config.name, "namespace": namespace, "labels": labels()},
        "rules": rules,
    })
}

/// The RoleBinding of [`role`] to the node pods' service account.
pub fn role_binding(config: &GrantsConfig, namespace: &str) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": config.name, "namespace": namespace, "labels": labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": config.name},
        "subjects": [{
            "kind": "ServiceAccount",
            "name": config.node_service_account,
            "namespace": config.node_namespace,
        }],
    })
}

fn labels() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by", "tidepool-operator"),
        ("app.kubernetes.io/component", "node-credentials"),
    ])
}

/// Bring the grant of `obj`'s namespace up to date with every object there (`obj` put
/// into the view: the controller may see it before the shared stores do), less the
/// object `releasing`. Writes only when the namespace's grant differs from what this
/// process last wrote there.
pub async fn sync_namespace<K: Reconciled>(
    ctx: &Context,
    obj: &K,
    releasing: Option<&str>,
) -> Result<(), Error> {
    let Some(config) = &ctx.grants else {
        return Ok(());
    };
    let namespace = obj.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let mut state = ctx.grants_state.lock().await;
    let mut datasets = ctx.stores.datasets.state();
    let mut checkpoints = ctx.stores.checkpoints.state();
    obj.put_into(&mut datasets, &mut checkpoints);
    let datasets: Vec<&DatasetCache> = datasets.iter().map(|d| &**d).collect();
    let checkpoints: Vec<&CheckpointSync> = checkpoints.iter().map(|c| &**c).collect();
    if let Some(uid) = releasing {
        state.released.insert(uid.to_owned());
    }
    // Forget released objects the stores no longer hold.
    let present: HashSet<&str> = datasets
        .iter()
        .filter_map(|d| d.meta().uid.as_deref())
        .chain(checkpoints.iter().filter_map(|c| c.meta().uid.as_deref()))
        .collect();
    state.released.retain(|uid| present.contains(uid.as_str()));
    let released = &state.released;
    let datasets: Vec<&DatasetCache> = datasets
        .into_iter()
        .filter(|d| !d.meta().uid.as_ref().is_some_and(|u| released.contains(u)))
        .collect();
    let checkpoints: Vec<&CheckpointSync> = checkpoints
        .into_iter()
        .filter(|c| !c.meta().uid.as_ref().is_some_and(|u| released.contains(u)))
        .collect();
    let want = wanted(&namespace, &datasets, &checkpoints, releasing);
    if let Some((w, at)) = state.written.get(&namespace)
        && *w == want
        && at.elapsed() < config.resync
    {
        return Ok(());
    }
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), &namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &namespace);
    let written = async {
        if want.is_empty() {
            for deleted in [
                bindings
                    .delete(&config.name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
                roles
                    .delete(&config.name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            ] {
                match deleted {
                    Ok(()) => {}
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            info!(%namespace, "node credentials grant removed");
        } else {
            roles
                .patch(
                    &config.name,
                    &apply_params(),
                    &Patch::Apply(&role(config, &namespace, &want)),
                )
                .await?;
            bindings
                .patch(
                    &config.name,
                    &apply_params(),
                    &Patch::Apply(&role_binding(config, &namespace)),
                )
                .await?;
            info!(
                %namespace,
                secrets = ?want.secrets,
                service_accounts = ?want.service_accounts,
                "node credentials granted"
            );
        }
        Ok(())
    };
    match written.await {
        Ok(()) => {}
        // A namespace the operator may not grant in (rbac.workloadNamespaces): nothing
        // to remove, and nothing granted; the objects there are assigned all the same,
        // and their nodes report the credentials as forbidden, which their status
        // quotes. Tried again at the next reconcile.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            tracing::warn!(%namespace, reason = %s.message, "the operator may not grant the node credentials in this namespace (the chart's rbac.workloadNamespaces)");
            state.written.remove(&namespace);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    state.written.insert(namespace, (want, Instant::now()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(ns: &str, uid: &str, creds: serde_json::Value) -> DatasetCache {
        serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "DatasetCache",
            "metadata": {"name": uid, "namespace": ns, "uid": uid},
            "spec": {"source": {"url": "https://a.blob.core.windows.net/c", "credentials": creds}},
        }))
        .unwrap()
    }

    fn checkpoint(ns: &str, uid: &str, creds: serde_json::Value) -> CheckpointSync {
        serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "CheckpointSync",
            "metadata": {"name": uid, "namespace": ns, "uid": uid},
            "spec": {"destination": {"url": "https://a.blob.core.windows.net/c", "credentials": creds}},
        }))
        .unwrap()
    }

    fn names(s: &BTreeSet<String>) -> Vec<&str> {
        s.iter().map(String::as_str).collect()
    }

    #[test]
    fn a_namespace_gets_exactly_the_names_its_objects_use() {
        let d1 = dataset("team-a", "d1", json!({"secretRef": {"name": "lake-a"}}));
        let d2 = dataset(
            "team-a",
            "d2",
            json!({"workloadIdentity": {"serviceAccountName": "trainer",
                   "clientId": "c", "tenantId": "t"}}),
        );
        let d3 = dataset("team-b", "d3", json!({"secretRef": {"name": "lake-b"}}));
        let d4 = dataset("team-a", "d4", json!({"managedIdentity": {}}));
        let c1 = checkpoint("team-a", "c1", json!({"secretRef": {"name": "ckpt-a"}}));
        let w = wanted("team-a", &[&d1, &d2, &d3, &d4], &[&c1], None);
        assert_eq!(names(&w.secrets), ["ckpt-a", "lake-a"]);
        assert_eq!(names(&w.service_accounts), ["trainer"]);

        // The object being released no longer counts; the others still do.
        let w = wanted("team-a", &[&d1, &d2, &d3, &d4], &[&c1], Some("c1"));
        assert_eq!(names(&w.secrets), ["lake-a"]);
        // Another namespace sees only its own.
        let w = wanted("team-b", &[&d1, &d2, &d3, &d4], &[&c1], None);
        assert_eq!(names(&w.secrets), ["lake-b"]);
        assert!(w.service_accounts.is_empty());
        // Managed identity and no credentials grant nothing.
        assert!(wanted("team-a", &[&d4], &[], None).is_empty());
    }

    #[test]
    fn the_role_names_every_resource_and_binds_only_the_node() {
        let config = GrantsConfig {
            node_namespace: "tidepool-system".into(),
            node_service_account: "tidepool-node".into(),
            name: "tidepool-node-credentials".into(),
            resync: RESYNC,
        };
        let d1 = dataset("team-a", "d1", json!({"secretRef": {"name": "lake-a"}}));
        let role = role(&config, "team-a", &wanted("team-a", &[&d1], &[], None));
        let rules = role["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 1, "{role}");
        assert_eq!(rules[0]["resources"], json!(["secrets"]));
        assert_eq!(rules[0]["verbs"], json!(["get"]));
        assert_eq!(rules[0]["resourceNames"], json!(["lake-a"]));
        let binding = role_binding(&config, "team-a");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "tidepool-node", "namespace": "tidepool-system"}])
        );
        assert_eq!(binding["roleRef"]["name"], "tidepool-node-credentials");
    }
}
