//! The contract between the operator's PersistentVolumes and the CSI driver.
//!
//! The operator writes these keys into `spec.csi.volumeAttributes` of every PV it
//! creates; kubelet hands them to the CSI driver as `volume_context`. They name the
//! object the volume belongs to, so the node agent can find its assignment in the
//! node's `CachePool`. No source URL or credential is duplicated here: the pool is the
//! single source of truth for what a volume serves.

/// CSI driver name (`CSIDriver` object and `spec.csi.driver` of every PV).
pub const CSI_DRIVER: &str = "csi.tidepool.dev";
/// Volume attribute: `DatasetCache` or `CheckpointSync`.
pub const ATTR_KIND: &str = "tidepool.dev/kind";
/// Volume attribute: namespace of the owning object.
pub const ATTR_NAMESPACE: &str = "tidepool.dev/namespace";
/// Volume attribute: name of the owning object.
pub const ATTR_NAME: &str = "tidepool.dev/name";
/// Volume attribute: uid of the owning object (a re-created object gets a new volume).
pub const ATTR_UID: &str = "tidepool.dev/uid";
/// Label on PVs and PVCs: the kind of the owning object.
pub const LABEL_KIND: &str = "tidepool.dev/kind";
/// Label on PVs and PVCs: namespace of the owning object (PVs are cluster-scoped).
pub const LABEL_NAMESPACE: &str = "tidepool.dev/namespace";
/// Label on PVs and PVCs: name of the owning object.
pub const LABEL_NAME: &str = "tidepool.dev/name";
