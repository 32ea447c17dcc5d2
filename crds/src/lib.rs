//! Tidepool's Kubernetes API, group `tidepool.dev`, version `v1alpha1`.
//!
//! The CRD types land with issue 3 ("The Kubernetes API"); until then this crate is
//! intentionally empty so that nothing pretends to work.
