//! `CachePool`: one per node, named after the node, owned by its `Node` (so it is
//! garbage-collected with it).
//!
//! Two writers, two halves, never crossing:
//! - `spec` is written by the operator only: the datasets and checkpoint syncs assigned
//!   to the node, each self-contained (source, credential reference and the namespace
//!   it resolves in, policies, owner uid and generation), so the agent acts without
//!   reading any `DatasetCache` or `CheckpointSync`.
//! - `status` is written by the node's agent only: capacity, usage, a heartbeat and
//!   per-assignment progress. A heartbeat older than the operator's staleness bound
//!   makes the node count as not ready.
//!
//! Each node's agent creates its own pool when it starts; the operator assigns into
//! pools that exist and never creates one.
//!
//! Validation: the pool carries no CEL rules. Its lake locations and policies are
//! copies of `DatasetCache` and `CheckpointSync` specs that the API server already
//! validated, and only Tidepool's own components write it; the same rules again,
//! multiplied by every item of every list, would exceed the API server's CEL cost
//! budget (it refuses the CRD). What it does carry are bounds on every list and string
//! ([`MAX_DATASETS`], [`MAX_CHECKPOINT_SYNCS`], names as long as Kubernetes allows), so
//! that a bug can never grow one object without limit.

// `printcolumn(type_ = …)` repeats by design; clippy reads the derive's arguments as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Most datasets one node's pool holds. Far more than a node serves at once; the
/// operator assigns the oldest first and reports the rest as not placed.
pub const MAX_DATASETS: usize = 256;
/// Most checkpoint syncs one node's pool holds.
pub const MAX_CHECKPOINT_SYNCS: usize = 64;
/// Most conditions in a status.
const MAX_CONDITIONS: u64 = 16;

/// The schema of `T` with every CEL rule (`x-kubernetes-validations`) removed, at any
/// depth (see the module docs for why the pool has none).
fn without_rules<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("x-kubernetes-validations");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut schema = g.subschema_for::<T>();
    let mut value = serde_json::to_value(&schema).expect("a schema is JSON");
    strip(&mut value);
    schema = Schema::try_from(value).expect("still a schema");
    schema
}

/// `without_rules` of a list, at most `MAX` items long.
fn bounded_list<T: JsonSchema, const MAX: usize>(g: &mut SchemaGenerator) -> Schema {
    let mut schema = without_rules::<Vec<T>>(g);
    schema.insert("maxItems".into(), (MAX as u64).into());
    schema
}

fn conditions_schema(g: &mut SchemaGenerator) -> Schema {
    let mut schema = g.subschema_for::<Vec<Condition>>();
    schema.insert("maxItems".into(), MAX_CONDITIONS.into());
    schema
}

use crate::{
    checkpoint_sync::{CommitRule, Retention},
    dataset_cache::{Prefetch, Refresh},
    lake::LakeLocation,
};

/// The cache pool of one node: what should be resident there (spec, from the operator)
/// and what is (status, from the node's agent).
#[derive(
    CustomResource, Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Default,
)]
#[kube(
    group = "tidepool.dev",
    version = "v1alpha1",
    kind = "CachePool",
    shortname = "cpool",
    category = "tidepool",
    status = "CachePoolStatus",
    doc = "The node-local NVMe cache of one node (named after the node): assignments from the operator, progress from the node's agent.",
    printcolumn(
        name = "Datasets",
        type_ = "integer",
        json_path = ".status.datasetCount",
        description = "Datasets the agent serves"
    ),
    printcolumn(
        name = "Capacity",
        type_ = "integer",
        json_path = ".status.capacityBytes",
        description = "Pool capacity in bytes"
    ),
    printcolumn(
        name = "Used",
        type_ = "integer",
        json_path = ".status.usedBytes",
        description = "Bytes used in the pool"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.heartbeatTime",
        description = "Last report from the node's agent"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CachePoolSpec {
    /// Datasets that should be resident on this node. Written by the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "bounded_list::<DatasetAssignment, MAX_DATASETS>")]
    pub datasets: Vec<DatasetAssignment>,
    /// Checkpoint syncs that run on this node. Written by the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "bounded_list::<CheckpointAssignment, MAX_CHECKPOINT_SYNCS>")]
    pub checkpoint_syncs: Vec<CheckpointAssignment>,
}

/// Identity of the object an assignment comes from.
#[derive(
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    Clone,
    Debug,
    PartialEq,
    Eq,
    Default,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentOwner {
    /// Namespace of the owning object; credential references resolve in it.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// Name of the owning object.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Uid of the owning object: a deleted and re-created object is a new assignment.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// `metadata.generation` of the owning object this assignment was computed from.
    #[serde(default)]
    pub generation: i64,
}

/// One dataset the node should cache.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetAssignment {
    /// The `DatasetCache` this comes from.
    pub owner: AssignmentOwner,
    /// CSI volume handle of the dataset's PersistentVolume.
    #[schemars(length(max = 128))]
    pub volume_handle: String,
    /// Lake prefix and credential reference (resolved in `owner.namespace`).
    pub source: LakeLocation,
    /// Prefetch policy.
    #[serde(default)]
    pub prefetch: Prefetch,
    /// Refresh policy.
    #[serde(default)]
    pub refresh: Refresh,
    /// Never evict.
    #[serde(default)]
    pub pinned: bool,
}

/// One checkpoint sync the node should run.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointAssignment {
    /// The `CheckpointSync` this comes from.
    pub owner: AssignmentOwner,
    /// CSI volume handle of the checkpoint PersistentVolume.
    #[schemars(length(max = 128))]
    pub volume_handle: String,
    /// Lake prefix and credential reference (resolved in `owner.namespace`).
    pub destination: LakeLocation,
    /// Commit rule.
    #[serde(default)]
    pub commit: CommitRule,
    /// Retention.
    #[serde(default)]
    pub retention: Retention,
}

/// What the node's agent reports. Written by the agent only.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CachePoolStatus {
    /// The pool `metadata.generation` (spec) the agent has acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pool capacity in bytes.
    #[serde(default)]
    pub capacity_bytes: i64,
    /// Bytes used in the pool.
    #[serde(default)]
    pub used_bytes: i64,
    /// When the agent last reported. The operator treats a pool whose heartbeat is
    /// older than its staleness bound as not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,
    /// Number of entries in `datasets` (for `kubectl get`).
    #[serde(default)]
    pub dataset_count: i32,
    /// Per-dataset progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "bounded_list::<DatasetNodeStatus, MAX_DATASETS>")]
    pub datasets: Vec<DatasetNodeStatus>,
    /// Per-checkpoint-sync progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "bounded_list::<CheckpointNodeStatus, MAX_CHECKPOINT_SYNCS>")]
    pub checkpoint_syncs: Vec<CheckpointNodeStatus>,
    /// Agent conditions (e.g. `Ready`, `DiskPressure`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Where this node's agent shares its cache with the cluster's other agents (the
    /// cluster-wide cache); absent when it does not. The agents read it from every pool
    /// to know their peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerStatus>,
}

/// A node agent's side of the cluster-wide cache, as its peers see it.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// `IP:port` where the agent serves its peers.
    #[schemars(length(max = 64))]
    pub endpoint: String,
    /// Whether it serves blocks to peers (false: it only takes, as a node about to go
    /// away does; no block is placed on it).
    #[serde(default)]
    pub serving: bool,
    /// Ids of the datasets it holds (a digest of each dataset's lake URL, the same on
    /// every node): blocks of a dataset are placed on, and served to, only nodes that
    /// hold it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "bounded_list::<String, MAX_DATASETS>")]
    pub datasets: Vec<String>,
}

/// Progress of one dataset on one node.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetNodeStatus {
    /// Namespace of the `DatasetCache`.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// Name of the `DatasetCache`.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Uid of the `DatasetCache` (a report about an older incarnation is ignored).
    #[schemars(length(max = 64))]
    pub uid: String,
    /// Pending, Listing, Warming, Ready or Failed.
    #[serde(default)]
    pub phase: NodeDatasetPhase,
    /// Snapshot being served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub snapshot: Option<String>,
    /// Objects in the snapshot (so far, while `Listing`).
    #[serde(default)]
    pub objects: i64,
    /// Bytes cached on this node.
    #[serde(default)]
    pub bytes_cached: i64,
    /// Total bytes of the snapshot.
    #[serde(default)]
    pub bytes_total: i64,
    /// Bytes of this dataset the node fetched from the lake since its agent started.
    #[serde(default)]
    pub bytes_from_lake: i64,
    /// Bytes of this dataset the node took from its peers (the cluster-wide cache)
    /// since its agent started: lake bytes saved.
    #[serde(default)]
    pub bytes_from_peers: i64,
    /// Human-readable detail, e.g. why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub message: Option<String>,
}

/// Phase of one dataset on one node.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum NodeDatasetPhase {
    /// Assigned, not started.
    #[default]
    Pending,
    /// Listing the source into a snapshot. Volumes on the node already serve what is
    /// listed: a name the listing has not reached waits for it.
    Listing,
    /// Prefetching.
    Warming,
    /// Serving reads (for `OnDemand`: as soon as the snapshot is listed).
    Ready,
    /// Cannot serve; see `message`.
    Failed,
}

/// Progress of one checkpoint sync on one node.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointNodeStatus {
    /// Namespace of the `CheckpointSync`.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// Name of the `CheckpointSync`.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Uid of the `CheckpointSync`.
    #[schemars(length(max = 64))]
    pub uid: String,
    /// Latest step committed on this node; absent if the node holds no checkpoint data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_committed_step: Option<i64>,
    /// Latest step whose part on this node is uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_durable_step: Option<i64>,
    /// Bytes committed on this node and not yet uploaded.
    #[serde(default)]
    pub pending_bytes: i64,
    /// Set when uploads fail; see `message`.
    #[serde(default)]
    pub failed: bool,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub message: Option<String>,
}
