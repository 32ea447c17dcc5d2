//! `tidepool-operator`: reconciles `DatasetCache` and `CheckpointSync` objects into
//! PersistentVolumes, PVCs, per-node `CachePool` assignments and aggregated status.
//!
//! It touches no lake and holds no storage credentials (DESIGN.md, "Components").
pub mod plan;
