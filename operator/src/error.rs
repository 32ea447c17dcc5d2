//! The reconciler boundary's error type. Each variant maps to one metric label and one
//! requeue policy (see `reconcile::error_policy`).
//!
//! Messages carry their cause in the text and expose no `source()`: logs print `%e`
//! and `anyhow` prints the chain, and either way a cause must appear exactly once.

/// Reconcile errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API request failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(kube::Error),
    /// Deletion waits for the PVC, which Kubernetes keeps while a pod uses it.
    #[error(
        "waiting for PersistentVolumeClaim {namespace}/{name} to be deleted; Kubernetes keeps it while a pod uses it"
    )]
    WaitingForClaim {
        /// Namespace of the PVC.
        namespace: String,
        /// Name of the PVC.
        name: String,
    },
    /// Deletion waits for committed checkpoint bytes still on their way to the lake.
    #[error("{0}")]
    WaitingForUploads(String),
    /// A pool changed between observing and writing it (optimistic concurrency).
    #[error("CachePool {pool} changed while its spec was planned; retrying on a fresh view")]
    PoolChanged {
        /// The pool (node) name.
        pool: String,
    },
    /// The object lacks metadata the API server always sets (namespace, uid).
    #[error("object has no {0}; was it read from the API server?")]
    MissingMetadata(&'static str),
    /// Adding or removing the finalizer failed, or the wrapped work failed.
    #[error("{0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl Error {
    /// Label of `tidepool_reconcile_errors_total{error=…}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::WaitingForClaim { .. } => "waiting_for_claim",
            Error::WaitingForUploads(_) => "waiting_for_uploads",
            Error::MissingMetadata(_) => "missing_metadata",
            Error::PoolChanged { .. } => "pool_changed",
            Error::Finalizer(inner) => match &**inner {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }

    /// Whether this is a normal wait rather than a fault.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.metric_label(),
            "waiting_for_claim" | "waiting_for_uploads"
        )
    }
}
