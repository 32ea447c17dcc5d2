//! The end-to-end scenarios (issue 12), one module each, against the cluster of the
//! current kubeconfig context. `make e2e` runs them one at a time (`--test-threads=1`):
//! two of them disturb the node pods every scenario depends on.
//!
//! Without a cluster where Tidepool and the e2e lake are deployed, every scenario fails
//! at its first line (`Scenario::start`), saying what is missing.

mod checkpoint;
mod dataset;
mod delete;
mod node_restart;
mod upgrade;
