//! `CheckpointSync`: a read-write PVC on local NVMe whose committed checkpoint steps
//! are replicated to the lake.
//!
//! It is assigned to every node that has a pool: checkpoints are written wherever the
//! job runs, and a job must be able to resume anywhere. A step is durable only when
//! every node holding part of it has uploaded its part (DESIGN.md, "Checkpoints").

// `printcolumn(type_ = …)` repeats by design; clippy reads the derive's arguments as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{Phase, dataset_cache::DURATION_PATTERN, lake::LakeLocation};

/// A read-write checkpoint volume on local NVMe, replicated step by step to the lake.
#[derive(CustomResource, Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "tidepool.dev",
    version = "v1alpha1",
    kind = "CheckpointSync",
    namespaced,
    shortname = "cks",
    category = "tidepool",
    status = "CheckpointSyncStatus",
    doc = "A read-write checkpoint volume on local NVMe whose committed steps are replicated to the lake.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Aggregated phase over the nodes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.nodesReady",
        description = "Nodes whose sync is healthy"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.nodesDesired",
        description = "Nodes with a cache pool"
    ),
    printcolumn(
        name = "Durable",
        type_ = "integer",
        json_path = ".status.latestDurableStep",
        description = "Latest step durable in the lake"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pendingBytes",
        description = "Bytes committed but not yet durable, summed over nodes (per node: status.pendingNodes)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSyncSpec {
    /// Lake prefix that receives the checkpoints, and the credentials to write it.
    pub destination: LakeLocation,
    /// When a step (a top-level directory such as `step-1000/`) counts as committed.
    #[serde(default)]
    pub commit: CommitRule,
    /// How many steps to keep.
    #[serde(default)]
    pub retention: Retention,
    /// Name of the PVC that pods mount. Defaults to the name of this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
}

/// Commit rule of a step directory.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CommitRule {
    /// A step is committed when one of these files appears in it. Defaults to
    /// `.metadata` (PyTorch DCP) and `commit_success.txt` (Orbax).
    #[serde(default = "default_markers")]
    #[schemars(length(max = 16))]
    pub markers: Vec<String>,
    /// Also commit a step when nothing in it changed for this long (e.g. `5m`).
    /// Absent: markers (and renames into the final name) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("commit.quiescence must be a positive duration"))]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub quiescence: Option<String>,
    /// The number of nodes that write each step (the job's node count: one per pod of a
    /// multi-node job that mounts this volume on its own node). A step is durable only
    /// once that many nodes have their part of one version of it in the lake, whether or
    /// not those nodes' agents are running. Absent: a step waits for the nodes that
    /// announced it and a settle window, and a node whose agent was down from the start
    /// can be left out of it; set it for every multi-node job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub nodes: Option<i32>,
}

fn default_markers() -> Vec<String> {
    vec![".metadata".to_owned(), "commit_success.txt".to_owned()]
}

impl Default for CommitRule {
    fn default() -> Self {
        Self {
            markers: default_markers(),
            quiescence: None,
            nodes: None,
        }
    }
}

/// How many steps to keep, locally and in the lake.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Durable steps kept on local NVMe; older ones stay readable from the lake.
    /// 0 keeps all.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub keep_local: i32,
    /// Steps kept in the lake; older ones are deleted there. 0 keeps all.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub keep_remote: i32,
}

/// Committed bytes of one node not yet durable.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PendingNode {
    /// The node (its `CachePool`).
    #[schemars(length(max = 253))]
    pub node: String,
    /// Bytes committed on that node and not yet durable in the lake.
    pub bytes: i64,
}

/// Observed state, summed from every node's `CachePool`.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSyncStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Warming, Ready, Degraded or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// Nodes with a cache pool (every one of them can hold checkpoint data).
    #[serde(default)]
    pub nodes_desired: i32,
    /// Nodes whose agent reports this sync healthy and has reported recently.
    #[serde(default)]
    pub nodes_ready: i32,
    /// Latest step committed on any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_committed_step: Option<i64>,
    /// Latest step durable on every node that holds checkpoint data: resuming from it
    /// is safe on any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_durable_step: Option<i64>,
    /// Bytes committed but not yet uploaded, summed over nodes.
    #[serde(default)]
    pub pending_bytes: i64,
    /// The nodes holding committed bytes not yet durable, most first (at most 256).
    /// Wait for a node to leave this list before draining or removing it: its agent
    /// keeps uploading as long as it runs, and the operator keeps the node from being
    /// scaled down meanwhile (see the `cluster-autoscaler.kubernetes.io/scale-down-disabled`
    /// annotation it sets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub pending_nodes: Vec<PendingNode>,
    /// The PVC that pods mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// The PersistentVolume bound to the PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// `Ready`, `PoolsReporting` (stale heartbeats) and `Deleting` conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl CheckpointSync {
    /// The PVC name: `spec.claimName` or the object's name.
    pub fn claim_name(&self) -> String {
        self.spec
            .claim_name
            .clone()
            .unwrap_or_else(|| kube::ResourceExt::name_any(self))
    }
}
