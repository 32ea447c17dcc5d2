//! Keeping a node with checkpoint bytes not yet durable from being scaled away.
//!
//! While a node's `CachePool` reports committed checkpoint bytes not yet in the lake,
//! the node carries `cluster-autoscaler.kubernetes.io/scale-down-disabled: "true"` (the
//! cluster autoscaler's and Karpenter-compatible tools' way to say "never remove this
//! node"), with [`MARK`] beside it saying Tidepool set it. Once the node has nothing
//! pending, both go, but only if Tidepool set them: an annotation a person or another
//! tool put there is left alone. A pool whose agent stopped reporting keeps its last
//! report (pending bytes it cannot confirm as uploaded keep the node).

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};
use tidepool_api::CachePool;

/// The cluster autoscaler's annotation.
pub const SCALE_DOWN_DISABLED: &str = "cluster-autoscaler.kubernetes.io/scale-down-disabled";
/// Tidepool's mark beside it: the pending bytes, when they were first seen.
pub const MARK: &str = "tidepool.dev/checkpoints-pending";

/// Checkpoint bytes not yet durable that `pool`'s agent reports.
pub fn pending_bytes(pool: &CachePool) -> i64 {
    pool.status
        .as_ref()
        .map(|s| {
            s.checkpoint_syncs
                .iter()
                .map(|c| c.pending_bytes.max(0))
                .fold(0i64, i64::saturating_add)
        })
        .unwrap_or(0)
}

/// The merge patch of `node`'s annotations that protection needs now, if any.
pub fn protection_patch(node: &Node, pool: Option<&CachePool>) -> Option<Value> {
    let annotations = node.metadata.annotations.as_ref();
    let ours = annotations.is_some_and(|a| a.contains_key(MARK));
    let disabled = annotations
        .and_then(|a| a.get(SCALE_DOWN_DISABLED))
        .is_some_and(|v| v == "true");
    let pending = pool.map(pending_bytes).unwrap_or(0);
    if pending > 0 && !ours && !disabled {
        Some(json!({"metadata": {"annotations": {
            SCALE_DOWN_DISABLED: "true",
            MARK: format!("{pending} bytes of checkpoints not yet durable on this node; Tidepool removes both annotations once they are"),
        }}}))
    } else if pending == 0 && ours {
        Some(json!({"metadata": {"annotations": {
            SCALE_DOWN_DISABLED: Value::Null,
            MARK: Value::Null,
        }}}))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::ObjectMeta;
    use tidepool_api::cache_pool::{CachePoolSpec, CachePoolStatus, CheckpointNodeStatus};

    use super::*;

    fn node(annotations: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("gpu-1".into()),
                annotations: (!annotations.is_empty()).then(|| {
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pool(pending: &[i64]) -> CachePool {
        let mut p = CachePool::new("gpu-1", CachePoolSpec::default());
        p.status = Some(CachePoolStatus {
            checkpoint_syncs: pending
                .iter()
                .enumerate()
                .map(|(i, &b)| CheckpointNodeStatus {
                    uid: format!("u{i}"),
                    pending_bytes: b,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        p
    }

    #[test]
    fn a_node_is_kept_while_it_has_pending_bytes_and_released_after() {
        let patch = protection_patch(&node(&[]), Some(&pool(&[0, 5000]))).unwrap();
        assert_eq!(
            patch["metadata"]["annotations"][SCALE_DOWN_DISABLED],
            "true"
        );
        assert!(
            patch["metadata"]["annotations"][MARK]
                .as_str()
                .unwrap()
                .starts_with("5000 bytes")
        );
        // Already kept: nothing to do while bytes are pending.
        let kept = node(&[(SCALE_DOWN_DISABLED, "true"), (MARK, "x")]);
        assert_eq!(protection_patch(&kept, Some(&pool(&[7]))), None);
        // Nothing pending: released.
        let patch = protection_patch(&kept, Some(&pool(&[0]))).unwrap();
        assert_eq!(
            patch["metadata"]["annotations"][SCALE_DOWN_DISABLED],
            Value::Null
        );
        assert_eq!(patch["metadata"]["annotations"][MARK], Value::Null);
        // A node without a pool (no agent there): nothing pending.
        assert!(protection_patch(&kept, None).is_some());
        assert_eq!(protection_patch(&node(&[]), None), None);
    }

    #[test]
    fn an_annotation_someone_else_set_is_left_alone() {
        let theirs = node(&[(SCALE_DOWN_DISABLED, "true")]);
        assert_eq!(protection_patch(&theirs, Some(&pool(&[9]))), None);
        assert_eq!(protection_patch(&theirs, Some(&pool(&[0]))), None);
    }
}
