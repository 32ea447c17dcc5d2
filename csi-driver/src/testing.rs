//! Test support shared by the integration tests, `make demo` and `make bench`.
//!
//! Library code rather than `#[cfg(test)]` because integration tests, examples and
//! benches link the library as an ordinary dependency. Nothing here is used by the
//! `tidepool` binary's data path.

pub mod azurite;

pub use self::azurite::{Azurite, TlsFiles};
