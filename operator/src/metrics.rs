//! Prometheus metrics. Every metric name is a constant here, in one place.
//!
//! - `tidepool_reconciles_total{kind}`: reconciles run.
//! - `tidepool_reconcile_errors_total{kind,error}`: failed reconciles, by error class
//!   A deletion waiting for a pod to release its PVC is not counted: it is not a fault.
//! - `tidepool_reconcile_duration_seconds{kind}`: reconcile latency.
//! - `tidepool_objects{kind,phase}`: objects per phase, refreshed at scrape time from
//!   the reflector stores (so it never drifts from what the cluster says).

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tidepool_api::Phase;

/// Counter: reconciles run (the registry appends `_total`).
pub const RECONCILES: &str = "tidepool_reconciles";
/// Counter: failed reconciles by error class (the registry appends `_total`).
pub const RECONCILE_ERRORS: &str = "tidepool_reconcile_errors";
/// Histogram: reconcile duration in seconds.
pub const RECONCILE_DURATION: &str = "tidepool_reconcile_duration_seconds";
/// Gauge: objects per kind and phase.
pub const OBJECTS: &str = "tidepool_objects";

/// Labels of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `DatasetCache` or `CheckpointSync`.
    pub kind: &'static str,
}

/// Labels of error metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `DatasetCache` or `CheckpointSync`.
    pub kind: &'static str,
    /// Error class ([`crate::Error::metric_label`]).
    pub error: &'static str,
}

/// Labels of per-phase gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `DatasetCache` or `CheckpointSync`.
    pub kind: &'static str,
    /// Phase.
    pub phase: &'static str,
}

/// The operator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<KindLabels, Counter>,
    /// Failed reconciles.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations.
    pub duration: Family<KindLabels, Histogram>,
    /// Objects per phase.
    pub objects: Family<PhaseLabels, Gauge>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        // 5 ms .. ~20 s: a reconcile is a handful of API calls; longer means trouble.
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.005, 2.0, 12,
            ))
        });
        let objects = Family::<PhaseLabels, Gauge>::default();
        let mut registry = Registry::default();
        registry.register(RECONCILES, "Reconciles run", reconciles.clone());
        registry.register(
            RECONCILE_ERRORS,
            "Failed reconciles by error class",
            errors.clone(),
        );
        registry.register(
            RECONCILE_DURATION,
            "Reconcile duration in seconds",
            duration.clone(),
        );
        registry.register(OBJECTS, "Objects per kind and phase", objects.clone());
        Self {
            reconciles,
            errors,
            duration,
            objects,
            registry,
        }
    }
}

impl Metrics {
    /// Shared handle.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Set the per-phase gauges of `kind` from the phases of every object.
    pub fn set_phases(&self, kind: &'static str, phases: impl IntoIterator<Item = Phase>) {
        let mut counts = [0i64; Phase::ALL.len()];
        for phase in phases {
            counts[Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0)] += 1;
        }
        for (phase, count) in Phase::ALL.iter().zip(counts) {
            self.objects
                .get_or_create(&PhaseLabels {
                    kind,
                    phase: phase.as_str(),
                })
                .set(count);
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_and_counts_phases() {
        let m = Metrics::default();
        m.reconciles
            .get_or_create(&KindLabels {
                kind: "DatasetCache",
            })
            .inc();
        m.errors
            .get_or_create(&ErrorLabels {
                kind: "DatasetCache",
                error: "kube",
            })
            .inc();
        m.duration
            .get_or_create(&KindLabels {
                kind: "DatasetCache",
            })
            .observe(0.02);
        m.set_phases("DatasetCache", [Phase::Ready, Phase::Ready, Phase::Failed]);
        let text = m.encode();
        assert!(
            text.contains(r#"tidepool_reconciles_total{kind="DatasetCache"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tidepool_reconcile_errors_total{kind="DatasetCache",error="kube"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("tidepool_reconcile_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(r#"tidepool_objects{kind="DatasetCache",phase="Ready"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tidepool_objects{kind="DatasetCache",phase="Warming"} 0"#),
            "{text}"
        );
    }
}
