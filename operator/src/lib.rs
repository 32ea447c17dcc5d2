//! `tidepool-operator`: reconciles `DatasetCache` and `CheckpointSync` objects into
//! PersistentVolumes, PVCs, per-node `CachePool` assignments and aggregated status.
//!
//! It touches no lake and holds no storage credentials (DESIGN.md, "Components").
//! Layers: [`plan`] (pure decisions) ← [`reconcile`] (API calls) ← `run` (controllers,
//! leader election, admin server).
pub mod error;
pub mod metrics;
pub mod plan;
pub mod reconcile;

pub use error::Error;
