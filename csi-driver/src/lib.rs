//! Tidepool's node side: the lake client, the node-local cache pool, the FUSE file
//! systems and the `tidepool` CLI's library entry points.
//!
//! Dependencies point one way: `cli` → `fs` (FUSE adapter) → `cache` (pool, snapshots,
//! residency) → `lake` (object-store trait and implementations).

#![warn(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod cache;
pub mod checkpoint;
pub mod cli;
pub mod csi;
pub mod csi_proto;
pub mod durable;
pub mod fdpass;
pub mod fs;
pub mod fuse;
pub mod keeper;
pub mod lake;
pub mod mounts;
pub mod peer;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
