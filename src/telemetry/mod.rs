//! What sluice tells operators: counters and histograms ([`stats`]), the `/metrics`
//! exporter ([`metrics`]), five minutes of each backend's history for the status page
//! ([`history`]), the access log ([`access_log`]) and the trace id that joins it with
//! the backends' logs ([`request_id`]), and the W3C trace context and spans of each call
//! ([`trace`]), exported over OTLP (`otlp`, with the `otlp` feature). Knows nothing of routers, clusters or connections:
//! their owners hand it numbers.

pub mod access_log;
pub mod history;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod percentile;
pub mod request_id;
#[cfg(feature = "otlp")]
mod span_proto;
pub mod stats;
pub mod trace;

pub use history::HistoryView;
pub use metrics::{
    metrics, BackendGauges, CertificateOwner, ClusterCertificate, DiscoveryGauges, Export,
    HandshakeFailure, Scrape,
};
pub use stats::{
    unrouted, BackendStats, ClusterStats, HealthResult, Hedge, LightLoad, MethodLatency,
    MethodStats, RecentRates, Reject,
};
