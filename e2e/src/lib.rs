//! Tidepool's end-to-end suite: what the scenarios in `tests/e2e/` share.
//!
//! The suite runs against a real cluster where the chart (`charts/tidepool`) is installed
//! and the e2e lake (`manifests/azurite.yaml`: Azurite in namespace `tidepool-e2e`) runs:
//! locally `make kind-up deploy e2e` (`kind-config.yaml`: one control plane, two workers,
//! one labelled `tidepool.dev/gpu=true`). Every scenario works the product the way a user
//! does: it seeds the lake, applies Tidepool objects, runs Jobs that read and write
//! through the PVCs, and checks what a user would notice (bytes equal, status fields,
//! objects gone).
//!
//! Invariants:
//! - **Never a pass that did not run.** [`Env::connect`] panics, saying what is missing and
//!   how to get it, when there is no cluster, when it does not answer, when Tidepool or the
//!   lake are not deployed there, or when the nodes are not labelled as the suite needs.
//!   Nothing is skipped.
//! - **Checksums come from two independent sides.** The lake side is computed by the
//!   seeding Job (or the writing Job) from the very bytes it sent; the reading side by
//!   `sha256sum` in a Job reading through a Tidepool mount. Every name must match too:
//!   a missing or extra file fails like a wrong byte.
//! - **One namespace per scenario** (`e2e-<scenario>-<run>`), deleted when the scenario ends,
//!   pass or fail (`TIDEPOOL_E2E_KEEP=1` keeps it for a post-mortem); lake prefixes are
//!   `<run>/<scenario>/`, so runs never see each other's data.
//! - **Waits are bounded and say what they saw.** A timeout reports the last state seen and
//!   the namespace's pods and events ([`Scenario::diagnose`]).

pub mod env;
pub mod scenario;
pub mod sums;
pub mod wait;
pub mod workload;

pub use env::Env;
pub use scenario::{Scenario, SeedFile, Seeded};
pub use sums::Sums;
pub use wait::Check;
pub use workload::{Mount, Workload};
