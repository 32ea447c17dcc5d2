//! Tidepool's Kubernetes API, group `tidepool.dev`, version `v1alpha1`.
//!
//! Three kinds, one concept per module:
//! - [`DatasetCache`] (namespaced, `dsc`): a lake prefix staged onto node-local NVMe and
//!   mounted read-only through a PVC.
//! - [`CheckpointSync`] (namespaced, `cks`): a read-write PVC whose committed steps are
//!   replicated to the lake.
//! - [`CachePool`] (cluster-scoped, `cpool`): one per node, named after the node. Its
//!   spec is written by the operator (what should be resident there), its status by
//!   that node's agent (what is).
//!
//! Invariants:
//! - Invalid user specs are rejected by the API server: every rule a controller would
//!   otherwise discover late is an OpenAPI constraint or a CEL rule
//!   (`x-kubernetes-validations`) generated from these types. CEL rules only use
//!   functions Kubernetes ships (`has`, `matches`, `duration`, arithmetic).
//! - Every status carries `observedGeneration` and standard `conditions`.
//! - The YAML in `crds/` and `charts/tidepool/crds/` is generated from these types
//!   ([`generate`]); a test fails when it drifts.
//! - No type here holds a secret: credentials are references (a Secret name, a service
//!   account, a managed identity client id).

pub mod cache_pool;
pub mod checkpoint_sync;
pub mod conditions;
pub mod dataset_cache;
#[cfg(feature = "envtest")]
pub mod envtest;
pub mod generate;
pub mod lake;
/// Loud, logged test skips (test support).
#[cfg(feature = "envtest")]
pub mod skip;
pub mod volume;

pub use cache_pool::{CachePool, CachePoolSpec, CachePoolStatus};
pub use checkpoint_sync::{CheckpointSync, CheckpointSyncSpec, CheckpointSyncStatus};
pub use dataset_cache::{DatasetCache, DatasetCacheSpec, DatasetCacheStatus};
pub use lake::{LakeCredentials, LakeLocation};

/// API group of every Tidepool kind.
pub const GROUP: &str = "tidepool.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Aggregated lifecycle phase shared by `DatasetCache` and `CheckpointSync` status.
#[derive(
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Default,
)]
pub enum Phase {
    /// Accepted, but no node has reported on it yet (or no node matches).
    #[default]
    Pending,
    /// Nodes are listing or prefetching; not every desired node is ready.
    Warming,
    /// Every desired node is ready.
    Ready,
    /// Some nodes are ready, others failed or stopped reporting.
    Degraded,
    /// No node is ready and at least one reports a failure.
    Failed,
}

impl Phase {
    /// Every phase, for per-phase metrics.
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Warming,
        Phase::Ready,
        Phase::Degraded,
        Phase::Failed,
    ];

    /// The spelling used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Warming => "Warming",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
        }
    }
}
