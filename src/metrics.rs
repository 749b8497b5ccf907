//! The Prometheus registry behind `/metrics` (SPEC.md "Metrics"; prefix `sluice_`).
//!
//! One process-wide registry. So far it holds the discovery series; the per-call series come
//! with the metrics issue. Series of a cluster that a reload removed are deleted, so dashboards
//! don't show ghosts.

use std::sync::OnceLock;

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// `sluice_backends{cluster}`: backends known.
    pub backends: IntGaugeVec,
    /// `sluice_discovery_updates_total{cluster,source}`: backend-set changes applied.
    pub discovery_updates: IntCounterVec,
    /// `sluice_discovery_connected{cluster,source}`: 1 while the source answers; 0 while
    /// etcd is unreachable and the cluster routes on its last known set.
    pub discovery_connected: IntGaugeVec,
    /// `sluice_discovery_errors_total{cluster,source}`: failed connects, lists and watches.
    pub discovery_errors: IntCounterVec,
    /// `sluice_discovery_invalid_values{cluster}`: keys under the prefix skipped because
    /// their value could not be decoded.
    pub discovery_invalid_values: IntGaugeVec,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, _> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, _> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        Ok(Metrics {
            backends: gauge(
                "sluice_backends",
                "Backends known, per cluster.",
                &["cluster"],
            )?,
            discovery_updates: counter(
                "sluice_discovery_updates_total",
                "Backend-set changes applied from discovery.",
                &["cluster", "source"],
            )?,
            discovery_connected: gauge(
                "sluice_discovery_connected",
                "1 while the discovery source answers; 0 while routing on the last known set.",
                &["cluster", "source"],
            )?,
            discovery_errors: counter(
                "sluice_discovery_errors_total",
                "Failed connects, lists and watches of a discovery source.",
                &["cluster", "source"],
            )?,
            discovery_invalid_values: gauge(
                "sluice_discovery_invalid_values",
                "Keys under the etcd prefix skipped because their value could not be decoded.",
                &["cluster"],
            )?,
            registry,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding to a Vec fails only on a malformed metric family, which the typed
        // registrations above rule out; an empty page would show it.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Deletes every series of a cluster that is no longer configured.
    pub fn forget_cluster(&self, cluster: &str) {
        let _ = self.backends.remove_label_values(&[cluster]);
        let _ = self
            .discovery_invalid_values
            .remove_label_values(&[cluster]);
        for source in ["static", "etcd"] {
            let _ = self
                .discovery_updates
                .remove_label_values(&[cluster, source]);
            let _ = self
                .discovery_connected
                .remove_label_values(&[cluster, source]);
            let _ = self
                .discovery_errors
                .remove_label_values(&[cluster, source]);
        }
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    // The names and labels are constants, so registering cannot fail at run time; a test
    // (`metrics_register`) proves it.
    METRICS.get_or_init(|| Metrics::new().expect("metric definitions are valid"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_register() {
        let m = super::Metrics::new().unwrap();
        m.backends.with_label_values(&["c"]).set(2);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains("sluice_backends{cluster=\"c\"} 2"), "{text}");
        m.forget_cluster("c");
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(!text.contains("cluster=\"c\""), "{text}");
    }
}
