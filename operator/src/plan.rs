//! Pure planning: (spec, observed) → desired children, pool assignments and status.
//!
//! Nothing here talks to the API server or reads a clock: reconcilers pass in what
//! they observed (from reflector stores) and the current time, then write what comes
//! out. That keeps every decision table-testable, including clusters with many nodes
//! and many datasets.
//!
//! - [`volume`]: the PersistentVolume and the pre-bound PVC of an object.
//! - [`pool`]: the full spec of every `CachePool`, from every object and node label.
//! - [`status`]: status aggregated from the pools an object is assigned to.
//! - [`node`]: the scale-down protection of nodes with checkpoint bytes not yet durable.

pub mod node;
pub mod pool;
pub mod status;
pub mod volume;

use kube::ResourceExt;
use tidepool_api::{
    CheckpointSync, DatasetCache, LakeLocation,
    volume::{VolumeAttributes, VolumeKind},
};

/// What the planners need to know about a `DatasetCache` or `CheckpointSync`.
pub trait Workload: kube::Resource<DynamicType = ()> {
    /// Kind, as in the API.
    const KIND: &'static str;
    /// `ReadOnlyMany` for datasets, `ReadWriteMany` for checkpoints.
    const ACCESS_MODE: &'static str;
    /// Where the data lives in the lake.
    fn location(&self) -> &LakeLocation;
    /// The PVC name pods mount.
    fn claim(&self) -> String;
    /// What the PV tells the node about the volume (see `tidepool_api::volume`).
    fn volume_attributes(&self) -> VolumeAttributes;
}

impl Workload for DatasetCache {
    const KIND: &'static str = "DatasetCache";
    const ACCESS_MODE: &'static str = "ReadOnlyMany";
    fn location(&self) -> &LakeLocation {
        &self.spec.source
    }
    fn claim(&self) -> String {
        self.claim_name()
    }
    fn volume_attributes(&self) -> VolumeAttributes {
        VolumeAttributes {
            kind: VolumeKind::DatasetCache,
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
            uid: self.uid().unwrap_or_default(),
            url: self.spec.source.url.clone(),
            prefetch: self.spec.prefetch.clone(),
            refresh: self.spec.refresh.clone(),
            pinned: self.spec.pinned,
        }
    }
}

impl Workload for CheckpointSync {
    const KIND: &'static str = "CheckpointSync";
    const ACCESS_MODE: &'static str = "ReadWriteMany";
    fn location(&self) -> &LakeLocation {
        &self.spec.destination
    }
    fn claim(&self) -> String {
        self.claim_name()
    }
    fn volume_attributes(&self) -> VolumeAttributes {
        VolumeAttributes {
            kind: VolumeKind::CheckpointSync,
            namespace: self.namespace().unwrap_or_default(),
            name: self.name_any(),
            uid: self.uid().unwrap_or_default(),
            url: self.spec.destination.url.clone(),
            prefetch: Default::default(),
            refresh: Default::default(),
            pinned: false,
        }
    }
}
