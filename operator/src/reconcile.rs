//! Reconcilers for `DatasetCache` and `CheckpointSync`: one generic flow, two kinds.
//!
//! `reconcile` only dispatches through [`kube::runtime::finalizer`]; the work is in
//! [`apply`] and [`cleanup`]. Every write is a server-side apply under one field
//! manager ([`FIELD_MANAGER`]), or a delete.
//!
//! Apply (idempotent, every step repeatable):
//! 1. PV and PVC are created when absent. Both specs are immutable once bound, so an
//!    existing one is left alone; a same-named PVC that this object does not control
//!    is never taken over (status says so).
//! 2. Every `CachePool` whose spec differs from the plan is applied (whole spec).
//! 3. Status is applied if it changed; an Event is published when the phase changes.
//! 4. Requeue after half the staleness bound, so a node that stops reporting is
//!    noticed without any watch event.
//!
//! Cleanup (tolerates apply never having run):
//! 1. Delete the PVC; while it still exists (a pod uses it), set `Deleting` with the
//!    reason and return [`Error::WaitingForClaim`] so the finalizer stays.
//! 2. A `CheckpointSync` whose nodes still have committed bytes to upload waits
//!    ([`Error::WaitingForUploads`], `Deleting` says how many and where), unless it is
//!    annotated `tidepool.dev/discard-pending: "true"`.
//! 3. Release the object's assignments from every pool (an agent then removes a
//!    checkpoint volume's local files, all durable).
//! 4. Delete the PV. Then the finalizer helper removes the finalizer.

pub mod grants;
pub mod protection;
pub mod workload;

use std::{fmt::Debug, sync::Arc, time::Duration};

use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim},
    apimachinery::pkg::apis::meta::v1::Condition,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        finalizer::{Event as Finalizer, finalizer},
        reflector::Store,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tidepool_api::{
    CachePool, CheckpointSync, DatasetCache, Phase,
    conditions::{self, ConditionUpdate, DELETING, READY},
};
use tracing::{info, instrument, warn};

use crate::{
    Error,
    metrics::{ErrorLabels, KindLabels, Metrics},
    plan::{
        Workload,
        pool::{Observed, changed_pools, desired_spec},
        status::Clock,
        volume::{controlled_by, desired_pv, desired_pvc, volume_name},
    },
};

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "tidepool-operator";
/// Finalizer on `DatasetCache` and `CheckpointSync`.
pub const FINALIZER: &str = "tidepool.dev/cleanup";
/// Requeue delay while deletion waits for a PVC: pods usually go away within seconds
/// to minutes, and the check is one GET.
pub const CLAIM_WAIT_REQUEUE: Duration = Duration::from_secs(5);
/// Requeue delay after a pool changed under a reconcile: the watch delivers the new
/// version within milliseconds, a second is plenty.
pub const POOL_CHANGED_REQUEUE: Duration = Duration::from_secs(1);
/// Requeue delay after an API failure.
pub const ERROR_REQUEUE: Duration = Duration::from_secs(15);

/// Reflector stores the planners read.
#[derive(Clone)]
pub struct Stores {
    /// Nodes.
    pub nodes: Store<Node>,
    /// Cache pools.
    pub pools: Store<CachePool>,
    /// Dataset caches.
    pub datasets: Store<DatasetCache>,
    /// Checkpoint syncs.
    pub checkpoints: Store<CheckpointSync>,
}

/// Shared state of every reconcile.
pub struct Context {
    /// API client.
    pub client: Client,
    /// What the cluster looks like.
    pub stores: Stores,
    /// Event publisher.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Pools whose heartbeat is older than this count as not ready.
    pub stale_after: SignedDuration,
    /// The clock (injected so tests are deterministic).
    pub now: fn() -> Timestamp,
    /// Held while pools are planned and written: one writer at a time (see
    /// [`sync_pools`]).
    pub pool_writes: tokio::sync::Mutex<()>,
    /// The node agent's per-namespace grants (see [`grants`]); None: not managed (the
    /// administrator grants the node's service account what it needs).
    pub grants: Option<grants::GrantsConfig>,
    /// What [`grants`] wrote; held while it plans and writes.
    pub grants_state: tokio::sync::Mutex<grants::GrantState>,
}

/// A kind the generic flow reconciles.
pub trait Reconciled:
    Workload
    + Resource<Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The status type.
    type Status: Serialize + Clone + PartialEq + Debug + Send + Sync;
    /// Pools the object is (to be) assigned to.
    fn assigned_pools<'a>(&self, observed: &Observed<'a>) -> Vec<&'a CachePool>;
    /// Planned status.
    fn plan_status(&self, pools: &[&CachePool], clock: &Clock) -> Self::Status;
    /// Current status.
    fn current_status(&self) -> Option<&Self::Status>;
    /// Phase of a status.
    fn phase(status: &Self::Status) -> Phase;
    /// Conditions of a status.
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition>;
    /// Mark a status as failed (e.g. claim conflict).
    fn set_phase(status: &mut Self::Status, phase: Phase);
    /// Objects of this kind that `pool` names (assignments and status entries).
    fn named_in(pool: &CachePool) -> Vec<(String, String)>;
    /// Why deletion must wait before the object's assignments go (nothing to wait for:
    /// `None`). A `CheckpointSync` waits for the committed bytes its nodes still have to
    /// upload: the assignment is what they upload with.
    fn waits_before_release(&self, _pools: &[&CachePool]) -> Option<String> {
        None
    }
    /// Puts this object into a view of all objects, replacing an older copy of it.
    fn put_into(
        &self,
        datasets: &mut Vec<Arc<DatasetCache>>,
        checkpoints: &mut Vec<Arc<CheckpointSync>>,
    );
}

/// Entry point of the controller: dispatch through the finalizer helper.
#[instrument(skip_all, fields(kind = K::KIND, namespace = obj.namespace().unwrap_or_default(), name = %obj.name_any()))]
pub async fn reconcile<K: Reconciled>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    let labels = KindLabels { kind: K::KIND };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let namespace = obj.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) => apply(&*obj, &ctx).await,
            Finalizer::Cleanup(obj) => cleanup(&*obj, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        // Surface the reconciler's own error unwrapped, so its class is visible.
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    result
}

/// Requeue policy and error accounting.
pub fn error_policy<K: Reconciled>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::PoolChanged { .. } = error {
        // Not a fault: another reconcile wrote the pool first. Retry on a fresh view soon.
        ctx.metrics
            .errors
            .get_or_create(&ErrorLabels {
                kind: K::KIND,
                error: error.metric_label(),
            })
            .inc();
        return Action::requeue(POOL_CHANGED_REQUEUE);
    }
    if error.is_waiting() {
        info!(kind = K::KIND, name = %obj.name_any(), %error, "deletion waiting");
        return Action::requeue(CLAIM_WAIT_REQUEUE);
    }
    warn!(kind = K::KIND, name = %obj.name_any(), %error, "reconcile failed");
    ctx.metrics
        .errors
        .get_or_create(&ErrorLabels {
            kind: K::KIND,
            error: error.metric_label(),
        })
        .inc();
    Action::requeue(ERROR_REQUEUE)
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

struct Snapshot {
    nodes: Vec<Arc<Node>>,
    pools: Vec<Arc<CachePool>>,
    datasets: Vec<Arc<DatasetCache>>,
    checkpoints: Vec<Arc<CheckpointSync>>,
}

impl Snapshot {
    fn take(stores: &Stores) -> Self {
        Self {
            nodes: stores.nodes.state(),
            pools: stores.pools.state(),
            datasets: stores.datasets.state(),
            checkpoints: stores.checkpoints.state(),
        }
    }
}

/// Attempts at writing one pool whose resourceVersion keeps moving (status writes by
/// its agent) before the reconcile is retried on a fresh view.
const POOL_WRITE_ATTEMPTS: usize = 5;

/// Apply every pool spec that differs from the plan. `obj`: the object being reconciled
/// (put into the view: the controller may see it before the shared stores do);
/// `releasing`: uid whose assignments go (its cleanup).
///
/// Pool writes are serialised in the process (both controllers write pools), and each
/// is planned from the pool as the server has it right then (one GET per pool that
/// needs a change), applied with that resourceVersion as a precondition. A conflict
/// means someone wrote the pool since the GET: usually its agent's status (which moves
/// the resourceVersion and nothing we plan from), so the pool is read again and planned
/// again. A spec written by someone else is therefore never undone from a stale view,
/// and status writes cannot starve spec writes.
async fn sync_pools<K: Reconciled>(
    ctx: &Context,
    obj: &K,
    releasing: Option<&str>,
) -> Result<Vec<Arc<CachePool>>, Error> {
    let _one_writer = ctx.pool_writes.lock().await;
    let mut snap = Snapshot::take(&ctx.stores);
    obj.put_into(&mut snap.datasets, &mut snap.checkpoints);
    let nodes: Vec<&Node> = snap.nodes.iter().map(|n| &**n).collect();
    let pools: Vec<&CachePool> = snap.pools.iter().map(|p| &**p).collect();
    let datasets: Vec<&DatasetCache> = snap.datasets.iter().map(|d| &**d).collect();
    let checkpoints: Vec<&CheckpointSync> = snap.checkpoints.iter().map(|c| &**c).collect();
    let observed = Observed {
        nodes: &nodes,
        pools: &pools,
        datasets: &datasets,
        checkpoints: &checkpoints,
    };
    let api: Api<CachePool> = Api::all(ctx.client.clone());
    for (name, _) in changed_pools(&observed, releasing) {
        let labels = nodes
            .iter()
            .find(|n| n.name_any() == name)
            .map(|n| n.labels());
        let mut written = false;
        for _ in 0..POOL_WRITE_ATTEMPTS {
            let Some(fresh) = api.get_opt(&name).await? else {
                written = true; // the pool is gone (its node was removed)
                break;
            };
            let spec = desired_spec(&fresh, labels, &datasets, &checkpoints, releasing);
            if spec == fresh.spec {
                written = true;
                break;
            }
            info!(pool = %name, datasets = spec.datasets.len(), checkpoint_syncs = spec.checkpoint_syncs.len(), "assigning pool");
            let body = serde_json::json!({
                "apiVersion": CachePool::api_version(&()),
                "kind": CachePool::kind(&()),
                "metadata": {"resourceVersion": fresh.resource_version()},
                // Lists are always sent, empty or not: a server-side apply of an empty
                // object is stored as null (kubernetes/kubernetes#135841), which the
                // schema refuses, and the last assignment could never be removed.
                "spec": {
                    "datasets": spec.datasets,
                    "checkpointSyncs": spec.checkpoint_syncs,
                },
            });
            match api
                .patch(&name, &apply_params(), &Patch::Apply(&body))
                .await
            {
                Ok(_) => {
                    written = true;
                    break;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !written {
            return Err(Error::PoolChanged { pool: name });
        }
    }
    Ok(snap.pools)
}

async fn write_status<K: Reconciled>(
    obj: &K,
    status: &K::Status,
    ctx: &Context,
) -> Result<(), Error> {
    if obj.current_status() == Some(status) {
        return Ok(());
    }
    let namespace = obj.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&obj.name_any(), &apply_params(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

async fn publish_phase_change<K: Reconciled>(obj: &K, new: Phase, ctx: &Context) {
    let old = obj.current_status().map(K::phase);
    if old == Some(new) || (old.is_none() && new == Phase::Pending) {
        return;
    }
    let type_ = if matches!(new, Phase::Degraded | Phase::Failed) {
        EventType::Warning
    } else {
        EventType::Normal
    };
    let note = match old {
        Some(old) => format!("phase {} -> {}", old.as_str(), new.as_str()),
        None => format!("phase {}", new.as_str()),
    };
    let event = Event {
        type_,
        reason: new.as_str().to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    // An event that cannot be published is not worth failing the reconcile for.
    if let Err(error) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(%error, "cannot publish event");
    }
}

/// Make the cluster match `obj`.
pub async fn apply<K: Reconciled>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    let namespace = obj.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let uid = obj.uid().ok_or(Error::MissingMetadata("uid"))?;
    let pv_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let pv_name = volume_name(&uid);
    let claim = obj.claim();

    if pv_api.get_opt(&pv_name).await?.is_none() {
        info!(pv = %pv_name, "creating PersistentVolume");
        pv_api
            .patch(&pv_name, &apply_params(), &Patch::Apply(&desired_pv(obj)))
            .await?;
    }
    let conflict = match pvc_api.get_opt(&claim).await? {
        None => {
            info!(pvc = %claim, "creating PersistentVolumeClaim");
            pvc_api
                .patch(&claim, &apply_params(), &Patch::Apply(&desired_pvc(obj)))
                .await?;
            false
        }
        Some(pvc) => !controlled_by(&pvc, obj),
    };

    // The agents may read the credentials before they are told to use them.
    grants::sync_namespace(ctx, obj, None).await?;
    let pools = sync_pools(ctx, obj, None).await?;
    let status = {
        let nodes = ctx.stores.nodes.state();
        let nodes: Vec<&Node> = nodes.iter().map(|n| &**n).collect();
        let pools: Vec<&CachePool> = pools.iter().map(|p| &**p).collect();
        let observed = Observed {
            nodes: &nodes,
            pools: &pools,
            datasets: &[],
            checkpoints: &[],
        };
        let assigned = obj.assigned_pools(&observed);
        let clock = Clock {
            now: (ctx.now)(),
            stale_after: ctx.stale_after,
        };
        let mut status = obj.plan_status(&assigned, &clock);
        conditions::remove(K::conditions(&mut status), DELETING);
        if conflict {
            K::set_phase(&mut status, Phase::Failed);
            let update = ConditionUpdate {
                type_: READY,
                status: false,
                reason: "ClaimConflict",
                message: format!(
                    "PersistentVolumeClaim {namespace}/{claim} exists and does not belong to this {}; delete it or set spec.claimName",
                    K::KIND
                ),
            };
            conditions::set(
                K::conditions(&mut status),
                update,
                obj.meta().generation,
                clock.now,
            );
        }
        status
    };
    publish_phase_change(obj, K::phase(&status), ctx).await;
    write_status(obj, &status, ctx).await?;
    Ok(Action::requeue(ctx.stale_after.unsigned_abs() / 2))
}

/// Remove everything `obj` caused, in the order that keeps running pods served.
pub async fn cleanup<K: Reconciled>(obj: &K, ctx: &Context) -> Result<Action, Error> {
    let namespace = obj.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let uid = obj.uid().ok_or(Error::MissingMetadata("uid"))?;
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let claim = obj.claim();

    if let Some(pvc) = pvc_api.get_opt(&claim).await?
        && controlled_by(&pvc, obj)
    {
        if pvc.metadata.deletion_timestamp.is_none() {
            info!(pvc = %claim, "deleting PersistentVolumeClaim");
            pvc_api.delete(&claim, &DeleteParams::default()).await?;
        }
        let mut status = obj.current_status().cloned().unwrap_or_else(|| {
            obj.plan_status(
                &[],
                &Clock {
                    now: (ctx.now)(),
                    stale_after: ctx.stale_after,
                },
            )
        });
        let update = ConditionUpdate {
            type_: DELETING,
            status: true,
            reason: "WaitingForClaim",
            message: format!(
                "waiting for PersistentVolumeClaim {namespace}/{claim} to go away; Kubernetes keeps it while a pod uses it"
            ),
        };
        conditions::set(
            K::conditions(&mut status),
            update,
            obj.meta().generation,
            (ctx.now)(),
        );
        write_status(obj, &status, ctx).await?;
        return Err(Error::WaitingForClaim {
            namespace,
            name: claim,
        });
    }

    let pools = ctx.stores.pools.state();
    let pools: Vec<&CachePool> = pools.iter().map(|p| &**p).collect();
    if let Some(why) = obj.waits_before_release(&pools) {
        let mut status = obj.current_status().cloned().unwrap_or_else(|| {
            obj.plan_status(
                &pools,
                &Clock {
                    now: (ctx.now)(),
                    stale_after: ctx.stale_after,
                },
            )
        });
        conditions::set(
            K::conditions(&mut status),
            ConditionUpdate {
                type_: DELETING,
                status: true,
                reason: "WaitingForUploads",
                message: why.clone(),
            },
            obj.meta().generation,
            (ctx.now)(),
        );
        write_status(obj, &status, ctx).await?;
        return Err(Error::WaitingForUploads(why));
    }
    sync_pools(ctx, obj, Some(&uid)).await?;
    // No node uses the credentials any more.
    grants::sync_namespace(ctx, obj, Some(&uid)).await?;
    let pv_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv_name = volume_name(&uid);
    match pv_api.delete(&pv_name, &DeleteParams::default()).await {
        Ok(_) => info!(pv = %pv_name, "deleted PersistentVolume"),
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// Phases of every object in a store, for the per-phase gauges.
pub fn phases<K: Reconciled>(store: &Store<K>) -> Vec<Phase> {
    store
        .state()
        .iter()
        .map(|o| o.current_status().map(K::phase).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod scenarios;
