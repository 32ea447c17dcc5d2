//! Checkpoints out: the read-write checkpoint volume's core, its commit rules, the
//! on-disk journal of committed steps, and the sync that makes them durable in the lake.
//!
//! Layers, one way: `store` (the step tree on local disk and the commit rules) writes
//! the journal; `sync` reads the journal, uploads with `upload`, and publishes part
//! records and manifests (`manifest`). The lake layout is described in `manifest`.

pub mod commit;
pub mod journal;
pub mod manifest;
pub mod restore;
pub mod service;
pub mod store;
pub mod sync;
pub mod tree;
pub mod upload;
