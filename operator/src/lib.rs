//! `tidepool-operator`: reconciles `DatasetCache` and `CheckpointSync` objects into
//! PersistentVolumes, PVCs, per-node `CachePool` assignments and aggregated status.
//!
//! It touches no lake and holds no storage credentials (DESIGN.md, "Components").
//! Layers, one way: [`runtime`] (process wiring, leader election, admin server) →
//! [`reconcile`] (API calls) → [`plan`] (pure decisions).
pub mod admin;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod runtime;
pub mod uninstall;

pub use error::Error;
pub use runtime::{OperatorConfig, RunError, run};
