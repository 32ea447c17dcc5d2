//! The node protection controller: keeps `cluster-autoscaler.kubernetes.io/scale-down-disabled`
//! on a Node while its `CachePool` reports checkpoint bytes not yet durable, and takes
//! it off once there are none (only where Tidepool put it). The decision is
//! [`crate::plan::node::protection_patch`]; this applies it as a JSON merge patch of the
//! Node's annotations (the one Node write the operator makes).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef},
};
use tidepool_api::CachePool;
use tracing::{info, warn};

use super::Context;
use crate::{Error, plan::node::protection_patch};

/// Reconciles one Node's protection.
pub async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = node.name_any();
    let pool = ctx.stores.pools.get(&ObjectRef::<CachePool>::new(&name));
    if let Some(patch) = protection_patch(&node, pool.as_deref()) {
        let keep =
            !patch["metadata"]["annotations"][crate::plan::node::SCALE_DOWN_DISABLED].is_null();
        Api::<Node>::all(ctx.client.clone())
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if keep {
            info!(node = %name, "node kept from scale-down: checkpoint bytes not yet durable");
        } else {
            info!(node = %name, "node released for scale-down: its checkpoints are durable");
        }
    }
    Ok(Action::await_change())
}

/// Retries a failed patch soon.
pub fn error_policy(node: Arc<Node>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(node = %node.name_any(), %error, "cannot update the node's scale-down protection; retrying");
    Action::requeue(Duration::from_secs(10))
}
