//! `DatasetCache`: a lake prefix staged onto node-local NVMe, mounted read-only.
//!
//! The operator turns one `DatasetCache` into a PersistentVolume (driver
//! `csi.tidepool.dev`, `ReadOnlyMany`), a PVC named `claimName` pre-bound to it, and
//! an assignment in the `CachePool` of every node its `nodeSelector` matches. Status is
//! summed from those pools.

// `printcolumn(type_ = …)` repeats by design; clippy reads the derive's arguments as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{Phase, lake::LakeLocation};

/// Pattern of a positive Go duration (`30s`, `1h30m`): what `duration()` in CEL accepts.
pub(crate) const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A lake prefix cached on the NVMe of selected nodes and mounted read-only through a PVC.
#[derive(CustomResource, Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "tidepool.dev",
    version = "v1alpha1",
    kind = "DatasetCache",
    namespaced,
    shortname = "dsc",
    category = "tidepool",
    status = "DatasetCacheStatus",
    doc = "A lake prefix (Azure Blob) staged onto node-local NVMe and mounted read-only through a PVC.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Aggregated phase over the selected nodes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.nodesReady",
        description = "Nodes where the dataset is ready"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.nodesDesired",
        description = "Nodes selected for the dataset"
    ),
    printcolumn(
        name = "Cached",
        type_ = "integer",
        json_path = ".status.bytesCached",
        description = "Bytes cached, summed over nodes"
    ),
    printcolumn(
        name = "Claim",
        type_ = "string",
        json_path = ".status.claimName",
        description = "PVC that mounts the dataset",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DatasetCacheSpec {
    /// Lake prefix to cache and the credentials to read it.
    pub source: LakeLocation,
    /// Nodes that cache the dataset, by label. Empty or absent selects every node that
    /// has a Tidepool cache pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// When data is fetched onto the nodes.
    #[serde(default)]
    pub prefetch: Prefetch,
    /// When the lake is listed again to pick up new or changed objects.
    #[serde(default)]
    pub refresh: Refresh,
    /// Never evict this dataset's cached data to make room for others.
    #[serde(default)]
    pub pinned: bool,
    /// Name of the PVC that pods mount. Defaults to the name of this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
}

/// When cached data is fetched.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Prefetch {
    /// `OnDemand` fetches a file on first read; `Eager` fetches everything (or the
    /// `include` globs) as soon as the dataset is assigned to a node.
    #[serde(default)]
    pub policy: PrefetchPolicy,
    /// Path globs relative to the source prefix (e.g. `train/**`). Empty: everything.
    /// Only meaningful with `Eager`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub include: Vec<String>,
}

/// Prefetch policy.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum PrefetchPolicy {
    /// Fetch a file when it is first read.
    #[default]
    OnDemand,
    /// Fetch the whole selection before (and while) pods read.
    Eager,
}

/// When the lake is listed again.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.policy != 'Interval' || has(self.interval)").message("refresh.interval is required when refresh.policy is Interval"))]
pub struct Refresh {
    /// `Pinned` lists the lake once and serves that snapshot forever; `Interval` lists
    /// it again every `interval` (open files keep the version they opened).
    #[serde(default)]
    pub policy: RefreshPolicy,
    /// Time between listings, as a duration such as `15m` or `6h`. Must be positive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("refresh.interval must be a positive duration"))]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub interval: Option<String>,
}

/// Refresh policy.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RefreshPolicy {
    /// One snapshot, never refreshed.
    #[default]
    Pinned,
    /// A new snapshot every `interval`.
    Interval,
}

/// Observed state, summed from the `CachePool`s of the selected nodes.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetCacheStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Warming, Ready, Degraded or Failed.
    #[serde(default)]
    pub phase: Phase,
    /// Nodes selected for the dataset (that have a cache pool).
    #[serde(default)]
    pub nodes_desired: i32,
    /// Selected nodes whose agent reports the dataset ready and has reported recently.
    #[serde(default)]
    pub nodes_ready: i32,
    /// Bytes of the dataset cached, summed over nodes.
    #[serde(default)]
    pub bytes_cached: i64,
    /// Bytes of the dataset the nodes fetched from the lake, summed over nodes (each
    /// since its agent started).
    #[serde(default)]
    pub bytes_from_lake: i64,
    /// Bytes of the dataset the nodes took from each other instead of the lake (the
    /// cluster-wide cache), summed over nodes (each since its agent started).
    #[serde(default)]
    pub bytes_from_peers: i64,
    /// The snapshot most nodes serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSummary>,
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

/// An immutable listing of the source taken at one time.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSummary {
    /// Snapshot id, chosen by the node agent.
    pub id: String,
    /// Objects in the snapshot.
    #[serde(default)]
    pub objects: i64,
    /// Total bytes of the objects in the snapshot.
    #[serde(default)]
    pub bytes: i64,
}

impl DatasetCache {
    /// The PVC name: `spec.claimName` or the object's name.
    pub fn claim_name(&self) -> String {
        self.spec
            .claim_name
            .clone()
            .unwrap_or_else(|| kube::ResourceExt::name_any(self))
    }
}
