//! The Prometheus exporter behind `/metrics` (prefix `sluice_`; every series is listed in
//! docs/operations.md).
//!
//! Two kinds of series:
//! - **Per call, per backend**: counters the data plane bumps in [`super::stats`]. This module
//!   knows nothing of routers or clusters: at scrape time whoever owns the live state
//!   implements [`Export`] and hands each cluster and backend to a [`Scrape`], which turns them
//!   into series. A backend that leaves discovery, or a cluster a reload removed, simply stops
//!   being exported.
//! - **Process-wide** (listeners, build, process): ordinary registered metrics, updated off
//!   the call path.

use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::stats::{unrouted, BackendStats, ClusterStats, HealthResult, Hedge, Reject, NO_CLUSTER};
use crate::sync::lock;
use crate::wire::{Code, Origin};

/// Implemented by the owner of the clusters (the router): adds every cluster and backend it
/// holds to `scrape`. Runs once per scrape, off the call path.
pub trait Export {
    fn export(&self, scrape: &mut Scrape);
}

/// What a discovery source looks like to `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct DiscoveryGauges<'a> {
    /// `static` or `etcd`.
    pub source: &'a str,
    pub connected: bool,
    /// Undecodable values skipped (etcd only).
    pub invalid_values: Option<i64>,
}

/// A backend's live state at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct BackendGauges {
    pub in_flight: u64,
    /// Unanswered calls it may hold now (`adaptive_concurrency`, else the cap).
    pub concurrency_limit: u64,
    pub up: bool,
    pub connections: usize,
    pub weight: u32,
}

// === impl Scrape ===

/// The per-cluster and per-backend series of one scrape. The vectors are throw-away.
pub struct Scrape {
    requests: IntCounterVec,
    upstream_requests: IntCounterVec,
    connect_failures: IntCounterVec,
    ejections: IntCounterVec,
    health_checks: IntCounterVec,
    panic_mode: IntGaugeVec,
    queue_depth: IntGaugeVec,
    queue_waits: Vec<MetricFamily>,
    rejected: IntCounterVec,
    retries: IntCounterVec,
    hedges: IntCounterVec,
    in_flight: IntGaugeVec,
    concurrency_limit: IntGaugeVec,
    up: IntGaugeVec,
    connections: IntGaugeVec,
    weights: IntGaugeVec,
    backends: IntGaugeVec,
    discovery_updates: IntCounterVec,
    discovery_errors: IntCounterVec,
    discovery_connected: IntGaugeVec,
    discovery_invalid: IntGaugeVec,
    call_durations: Vec<MetricFamily>,
    attempt_durations: Vec<MetricFamily>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

const CLUSTER_BACKEND: &[&str] = &["cluster", "backend"];
const CLUSTER_SOURCE: &[&str] = &["cluster", "source"];

impl Scrape {
    fn new() -> Result<Scrape, prometheus::Error> {
        Ok(Scrape {
            requests: counter(
                "sluice_requests_total",
                "Calls finished, by gRPC code and by who decided it (origin = upstream or proxy).",
                &["cluster", "grpc_service", "grpc_method", "grpc_code", "origin"],
            )?,
            upstream_requests: counter(
                "sluice_upstream_requests_total",
                "Attempts sent to a backend (a retried call counts once per backend tried), by gRPC code.",
                &["cluster", "backend", "grpc_code"],
            )?,
            connect_failures: counter(
                "sluice_upstream_connect_failures_total",
                "Attempts that got no stream because the connect or HTTP/2 handshake failed.",
                CLUSTER_BACKEND,
            )?,
            ejections: counter(
                "sluice_outlier_ejections_total",
                "Times outlier detection ejected a backend after failures in a row.",
                CLUSTER_BACKEND,
            )?,
            health_checks: counter(
                "sluice_health_checks_total",
                "Active grpc.health.v1 checks of a backend, by result.",
                &["cluster", "backend", "result"],
            )?,
            panic_mode: gauge(
                "sluice_panic_mode",
                "1 while no backend of the cluster is usable and sluice tries them all.",
                &["cluster"],
            )?,
            queue_depth: gauge(
                "sluice_queue_depth",
                "Calls waiting for a backend slot.",
                &["cluster"],
            )?,
            queue_waits: Vec::new(),
            rejected: counter(
                "sluice_rejected_total",
                "Calls sluice answered without a backend's answer, by reason.",
                &["cluster", "reason"],
            )?,
            retries: counter(
                "sluice_retries_total",
                "Transparent retries on another backend.",
                &["cluster"],
            )?,
            hedges: counter(
                "sluice_hedges_total",
                "Hedged attempts (a route's hedging), by result: won (answered first), lost (cancelled: the first attempt answered first, or the call ended), failed (failed before answering).",
                &["cluster", "result"],
            )?,
            in_flight: gauge(
                "sluice_upstream_in_flight",
                "Streams open to a backend.",
                CLUSTER_BACKEND,
            )?,
            concurrency_limit: gauge(
                "sluice_concurrency_limit",
                "Unanswered calls a backend may hold now: learned from its latency (adaptive_concurrency), at most max_concurrent_streams_per_backend.",
                CLUSTER_BACKEND,
            )?,
            up: gauge(
                "sluice_backend_up",
                "1 while a backend takes traffic; 0 while its connects fail.",
                CLUSTER_BACKEND,
            )?,
            connections: gauge(
                "sluice_upstream_connections",
                "HTTP/2 connections open to a backend.",
                CLUSTER_BACKEND,
            )?,
            weights: gauge(
                "sluice_backend_weight",
                "A backend's weight (its fair share of the cluster's traffic is weight / sum).",
                CLUSTER_BACKEND,
            )?,
            backends: gauge(
                "sluice_backends",
                "Backends known, per cluster.",
                &["cluster"],
            )?,
            discovery_updates: counter(
                "sluice_discovery_updates_total",
                "Backend-set changes applied from discovery.",
                CLUSTER_SOURCE,
            )?,
            discovery_errors: counter(
                "sluice_discovery_errors_total",
                "Failed connects, lists and watches of a discovery source.",
                CLUSTER_SOURCE,
            )?,
            discovery_connected: gauge(
                "sluice_discovery_connected",
                "1 while the discovery source answers; 0 while routing on the last known set.",
                CLUSTER_SOURCE,
            )?,
            discovery_invalid: gauge(
                "sluice_discovery_invalid_values",
                "Keys under the etcd prefix skipped because their value could not be decoded.",
                &["cluster"],
            )?,
            call_durations: Vec::new(),
            attempt_durations: Vec::new(),
        })
    }

    /// Adds one cluster's call counters, its discovery source, and its backend count.
    pub fn cluster(
        &mut self,
        name: &str,
        stats: &ClusterStats,
        discovery: DiscoveryGauges<'_>,
        backends: usize,
        panic: bool,
        queue_depth: usize,
    ) {
        self.panic_mode
            .with_label_values(&[name])
            .set(i64::from(panic));
        self.queue_depth
            .with_label_values(&[name])
            .set(queue_depth as i64);
        self.queue_waits.extend(stats.queue_wait.collect());
        self.calls(name, stats, true);
        self.retries
            .with_label_values(&[name])
            .inc_by(stats.retries());
        for result in Hedge::ALL {
            let count = stats.hedges(result);
            if count > 0 {
                self.hedges
                    .with_label_values(&[name, result.label()])
                    .inc_by(count);
            }
        }
        let source = [name, discovery.source];
        self.discovery_updates
            .with_label_values(&source)
            .inc_by(stats.discovery_updates());
        self.discovery_errors
            .with_label_values(&source)
            .inc_by(stats.discovery_errors());
        self.discovery_connected
            .with_label_values(&source)
            .set(i64::from(discovery.connected));
        if let Some(invalid) = discovery.invalid_values {
            self.discovery_invalid
                .with_label_values(&[name])
                .set(invalid);
        }
        self.backends
            .with_label_values(&[name])
            .set(backends as i64);
    }

    /// Adds one backend of `cluster`: its attempts by code and its live gauges.
    pub fn backend(
        &mut self,
        cluster: &str,
        address: &str,
        stats: &BackendStats,
        gauges: BackendGauges,
    ) {
        for code in Code::ALL {
            let n = stats.attempts_with(code);
            // OK always shows, so a backend's series exist from its first scrape.
            if n > 0 || code == Code::Ok {
                self.upstream_requests
                    .with_label_values(&[cluster, address, code.go_name()])
                    .inc_by(n);
            }
        }
        let labels = [cluster, address];
        self.connect_failures
            .with_label_values(&labels)
            .inc_by(stats.connect_failures());
        self.ejections
            .with_label_values(&labels)
            .inc_by(stats.ejections());
        for result in HealthResult::ALL {
            let n = stats.health_checks(result);
            if n > 0 {
                self.health_checks
                    .with_label_values(&[cluster, address, result.label()])
                    .inc_by(n);
            }
        }
        self.attempt_durations.extend(stats.duration.collect());
        self.in_flight
            .with_label_values(&labels)
            .set(gauges.in_flight as i64);
        self.concurrency_limit
            .with_label_values(&labels)
            .set(gauges.concurrency_limit as i64);
        self.up.with_label_values(&labels).set(i64::from(gauges.up));
        self.connections
            .with_label_values(&labels)
            .set(gauges.connections as i64);
        self.weights
            .with_label_values(&labels)
            .set(i64::from(gauges.weight));
    }

    /// Calls by method, code and origin, and rejections. Every cluster shows every reason,
    /// zeros included, so alerts on a rate have a series to read; unrouted calls (`routed`
    /// false) have only one reason.
    fn calls(&mut self, name: &str, stats: &ClusterStats, routed: bool) {
        for method in stats.methods() {
            for origin in Origin::ALL {
                for code in Code::ALL {
                    let n = method.codes[origin as usize][code as usize]
                        .load(std::sync::atomic::Ordering::Relaxed);
                    if n > 0 {
                        self.requests
                            .with_label_values(&[
                                name,
                                &method.service,
                                &method.method,
                                code.go_name(),
                                origin.label(),
                            ])
                            .inc_by(n);
                    }
                }
            }
            if method.duration.get_sample_count() > 0 {
                self.call_durations.extend(method.duration.collect());
            }
        }
        for reason in Reject::ALL {
            if routed == (reason != Reject::NoRoute) {
                self.rejected
                    .with_label_values(&[name, reason.label()])
                    .inc_by(stats.rejected_count(reason));
            }
        }
    }

    fn into_families(self) -> Vec<MetricFamily> {
        let collectors: [&dyn Collector; 20] = [
            &self.health_checks,
            &self.queue_depth,
            &self.requests,
            &self.upstream_requests,
            &self.connect_failures,
            &self.ejections,
            &self.panic_mode,
            &self.rejected,
            &self.retries,
            &self.hedges,
            &self.in_flight,
            &self.concurrency_limit,
            &self.up,
            &self.connections,
            &self.weights,
            &self.backends,
            &self.discovery_updates,
            &self.discovery_errors,
            &self.discovery_connected,
            &self.discovery_invalid,
        ];
        let mut families: Vec<MetricFamily> = collectors.iter().flat_map(|c| c.collect()).collect();
        families.extend(merge(self.call_durations));
        families.extend(merge(self.queue_waits));
        families.extend(merge(self.attempt_durations));
        families
    }
}

/// One family per name: histograms collected one by one each come as their own family.
fn merge(families: Vec<MetricFamily>) -> Option<MetricFamily> {
    let mut families = families.into_iter();
    let mut first = families.next()?;
    for mut family in families {
        first.mut_metric().extend(family.take_metric());
    }
    Some(first)
}

// === impl Metrics ===

/// The process-wide registry.
pub struct Metrics {
    registry: Registry,
    /// `sluice_downstream_connections{listener}`: open client connections.
    downstream_connections: IntGaugeVec,
    /// `sluice_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// `sluice_tls_handshake_errors_total{listener, reason}`.
    tls_handshake_errors: IntCounterVec,
    /// `sluice_downstream_connections_refused_total{listener}`.
    connections_refused: IntCounterVec,
    /// `sluice_grpc_web_origin_refused_total{listener}`.
    grpc_web_origin_refused: IntCounterVec,
    /// `sluice_rate_limit_keys_evicted_total{route}`.
    rate_limit_evictions: IntCounterVec,
    /// `sluice_trace_spans_exported_total`, `sluice_trace_spans_dropped_total{reason}`.
    trace_spans_exported: IntCounter,
    trace_spans_dropped: IntCounterVec,
    /// `sluice_overrides_revision`, `sluice_overrides_stale`.
    overrides_revision: prometheus::IntGauge,
    overrides_stale: prometheus::IntGauge,
    /// `sluice_tls_certificate_expiry_timestamp_seconds{listener, cluster, name}`: one of
    /// `listener` and `cluster` is empty (Prometheus reads an empty label as absent).
    tls_expiry: IntGaugeVec,
    /// The clusters' series of it, so a reload can take down those of removed clusters.
    cluster_certificates: std::sync::Mutex<Vec<(String, String)>>,
}

/// Why a handshake failed (`sluice_tls_handshake_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// A TLS listener's client spoke cleartext: its first byte starts no TLS record.
    NotTls,
    /// The client offered protocols, and `h2` was not one of them.
    NoH2,
    /// mTLS: the client sent no certificate, or one the client CA does not vouch for.
    ClientCertificate,
    /// The client closed, or sent no TLS, or broke the protocol.
    Protocol,
    /// No handshake within the time allowed.
    Timeout,
}

impl HandshakeFailure {
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::NoH2 => "no_h2",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Timeout => "timeout",
        }
    }
}

/// A cluster's client certificate, for `sluice_tls_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone)]
pub struct ClusterCertificate {
    pub cluster: String,
    /// The certificate's file, as the config names it.
    pub file: String,
    /// When it expires, in seconds since the Unix epoch.
    pub expires_at: i64,
}

/// Whose certificate an expiry is: a listener's, or a cluster's (its client certificate).
#[derive(Debug, Clone, Copy)]
pub enum CertificateOwner<'a> {
    Listener(&'a str),
    Cluster(&'a str),
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build = gauge(
            "sluice_build_info",
            "Always 1; the labels say which sluice runs.",
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let downstream_connections = gauge(
            "sluice_downstream_connections",
            "Open client connections, per listener.",
            &["listener"],
        )?;
        registry.register(Box::new(downstream_connections.clone()))?;
        let access_log_dropped = IntCounter::new(
            "sluice_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind.",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let tls_handshake_errors = counter(
            "sluice_tls_handshake_errors_total",
            "Failed TLS handshakes on a listener, by reason: no_h2, client_certificate, not_tls, protocol, timeout.",
            &["listener", "reason"],
        )?;
        registry.register(Box::new(tls_handshake_errors.clone()))?;
        let connections_refused = counter(
            "sluice_downstream_connections_refused_total",
            "Client connections closed on arrival because the listener had max_connections open.",
            &["listener"],
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let grpc_web_origin_refused = counter(
            "sluice_grpc_web_origin_refused_total",
            "gRPC-Web requests (calls and preflights) from an origin not in the listener's grpc_web.allowed_origins: answered without CORS headers, so the browser keeps the answer from the page.",
            &["listener"],
        )?;
        registry.register(Box::new(grpc_web_origin_refused.clone()))?;
        let rate_limit_evictions = counter(
            "sluice_rate_limit_keys_evicted_total",
            "Rate-limit buckets evicted because a route's rate_limit.max_keys keys were held; an evicted client starts again with a full bucket.",
            &["route"],
        )?;
        registry.register(Box::new(rate_limit_evictions.clone()))?;
        let trace_spans_exported = IntCounter::new(
            "sluice_trace_spans_exported_total",
            "Spans the OTLP collector accepted (tracing.otlp).",
        )?;
        registry.register(Box::new(trace_spans_exported.clone()))?;
        let trace_spans_dropped = counter(
            "sluice_trace_spans_dropped_total",
            "Spans dropped instead of exported, by reason: queue_full (the export fell behind), export_failed (the collector refused them, failed, or did not answer in time).",
            &["reason"],
        )?;
        registry.register(Box::new(trace_spans_dropped.clone()))?;
        let overrides_revision = prometheus::IntGauge::new(
            "sluice_overrides_revision",
            "The revision of the runtime overrides this instance applies: a count of local changes, or the etcd revision of the fleet's overrides.",
        )?;
        registry.register(Box::new(overrides_revision.clone()))?;
        let overrides_stale = prometheus::IntGauge::new(
            "sluice_overrides_stale",
            "Runtime overrides that name a cluster or route the running config does not have.",
        )?;
        registry.register(Box::new(overrides_stale.clone()))?;
        let tls_expiry = gauge(
            "sluice_tls_certificate_expiry_timestamp_seconds",
            "When a certificate sluice serves or presents expires (notAfter), in seconds since the Unix epoch; name is its file.",
            &["listener", "cluster", "name"],
        )?;
        registry.register(Box::new(tls_expiry.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            downstream_connections,
            access_log_dropped,
            tls_handshake_errors,
            connections_refused,
            grpc_web_origin_refused,
            rate_limit_evictions,
            trace_spans_exported,
            trace_spans_dropped,
            overrides_revision,
            overrides_stale,
            tls_expiry,
            cluster_certificates: Default::default(),
        })
    }

    /// Replaces the clusters' certificate expiries with `current` (cluster, file, notAfter):
    /// a cluster removed, or a file no longer used, leaves no stale series behind to keep an
    /// expiry alert firing.
    pub fn set_cluster_certificates(&self, current: &[ClusterCertificate]) {
        let mut published = lock(&self.cluster_certificates);
        for (cluster, name) in published.drain(..) {
            let _ = self.tls_expiry.remove_label_values(&["", &cluster, &name]);
        }
        for certificate in current {
            let (cluster, file) = (&certificate.cluster, &certificate.file);
            let owner = CertificateOwner::Cluster(cluster);
            self.tls_certificate_expires(owner, file, certificate.expires_at);
            published.push((cluster.clone(), file.clone()));
        }
    }

    /// Counts a client connection refused at `max_connections`.
    pub fn downstream_connection_refused(&self, listener: &str) {
        self.connections_refused
            .with_label_values(&[listener])
            .inc();
    }

    /// The counter of gRPC-Web requests refused for their origin on `listener`.
    pub fn grpc_web_origin_refused(&self, listener: &str) -> prometheus::IntCounter {
        self.grpc_web_origin_refused.with_label_values(&[listener])
    }

    /// The counter of rate-limit buckets evicted on `route`, resolved once per route.
    pub fn rate_limit_evictions(&self, route: &str) -> prometheus::IntCounter {
        self.rate_limit_evictions.with_label_values(&[route])
    }

    /// Counts spans the collector accepted.
    pub fn trace_spans_exported(&self, spans: u64) {
        self.trace_spans_exported.inc_by(spans);
    }

    /// The counter of spans dropped for `reason` (`queue_full`, `export_failed`).
    pub fn trace_spans_dropped(&self, reason: &str) -> prometheus::IntCounter {
        self.trace_spans_dropped.with_label_values(&[reason])
    }

    /// Publishes the revision of the overrides in force, and how many name nothing running.
    pub fn overrides_applied(&self, revision: u64, stale: usize) {
        self.overrides_revision.set(revision as i64);
        self.overrides_stale.set(stale as i64);
    }

    /// Counts a failed TLS handshake on `listener`.
    pub fn tls_handshake_failed(&self, listener: &str, reason: HandshakeFailure) {
        self.tls_handshake_errors
            .with_label_values(&[listener, reason.label()])
            .inc();
    }

    /// Publishes when the certificate in file `name` expires.
    pub fn tls_certificate_expires(&self, owner: CertificateOwner<'_>, name: &str, at: i64) {
        let (listener, cluster) = match owner {
            CertificateOwner::Listener(l) => (l, ""),
            CertificateOwner::Cluster(c) => ("", c),
        };
        self.tls_expiry
            .with_label_values(&[listener, cluster, name])
            .set(at);
    }

    /// The open-connections gauge of one listener, resolved once when the listener starts.
    pub fn downstream_connections(&self, listener: &str) -> IntGauge {
        self.downstream_connections.with_label_values(&[listener])
    }

    /// The whole `/metrics` page: the registered series, then what `source` exports, then the
    /// calls that matched no route.
    pub fn encode(&self, source: &dyn Export) -> Vec<u8> {
        let mut families = self.registry.gather();
        match Scrape::new() {
            Ok(mut scrape) => {
                source.export(&mut scrape);
                scrape.calls(NO_CLUSTER, unrouted(), false);
                families.extend(scrape.into_families());
            }
            Err(error) => tracing::error!(%error, "/metrics: cannot build the per-cluster series"),
        }
        // A vector with no series yet collects as an empty family, which the encoder refuses.
        families.retain(|f| !f.get_metric().is_empty());
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(%error, "/metrics: encoding failed; the page is cut short");
        }
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    // The names and labels are constants, so registering cannot fail at run time; the test
    // `process_metrics_register` proves it.
    METRICS.get_or_init(|| Metrics::new().expect("metric definitions are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl Export for Nothing {
        fn export(&self, _: &mut Scrape) {}
    }

    #[test]
    fn a_reload_takes_down_the_expiry_of_certificates_no_longer_used() {
        let m = Metrics::new().unwrap();
        m.tls_certificate_expires(CertificateOwner::Listener("grpc"), "server.pem", 7);
        let certificate = |cluster: &str, at| ClusterCertificate {
            cluster: cluster.into(),
            file: format!("{cluster}.pem"),
            expires_at: at,
        };
        m.set_cluster_certificates(&[certificate("old", 5)]);
        m.set_cluster_certificates(&[certificate("new", 6)]);
        let text = String::from_utf8(m.encode(&Nothing)).unwrap();
        assert!(!text.contains("old.pem"), "{text}");
        assert!(text.contains("cluster=\"new\""), "{text}");
        assert!(text.contains("name=\"server.pem\""), "{text}");
    }

    #[test]
    fn process_metrics_register() {
        let m = Metrics::new().unwrap();
        m.downstream_connections("grpc").set(2);
        let text = String::from_utf8(m.encode(&Nothing)).unwrap();
        assert!(
            text.contains("sluice_downstream_connections{listener=\"grpc\"} 2"),
            "{text}"
        );
        assert!(text.contains("sluice_build_info{version="), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(
            text.contains("sluice_rejected_total{cluster=\"(none)\",reason=\"no_route\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn scrape_exports_what_an_owner_hands_it() {
        struct One(ClusterStats, BackendStats);
        impl Export for One {
            fn export(&self, scrape: &mut Scrape) {
                let discovery = DiscoveryGauges {
                    source: "static",
                    connected: true,
                    invalid_values: None,
                };
                scrape.cluster("c", &self.0, discovery, 1, false, 0);
                let gauges = BackendGauges {
                    in_flight: 3,
                    concurrency_limit: 7,
                    up: true,
                    connections: 1,
                    weight: 2,
                };
                scrape.backend("c", "b:1", &self.1, gauges);
            }
        }
        let one = One(ClusterStats::new("c"), BackendStats::new("c", "b:1"));
        one.1.record_connect_failure();
        let text = String::from_utf8(Metrics::new().unwrap().encode(&one)).unwrap();
        for want in [
            "sluice_upstream_in_flight{backend=\"b:1\",cluster=\"c\"} 3",
            "sluice_backend_weight{backend=\"b:1\",cluster=\"c\"} 2",
            "sluice_upstream_connect_failures_total{backend=\"b:1\",cluster=\"c\"} 1",
            "sluice_upstream_requests_total{backend=\"b:1\",cluster=\"c\",grpc_code=\"OK\"} 0",
            "sluice_backends{cluster=\"c\"} 1",
            "sluice_rejected_total{cluster=\"c\",reason=\"deadline\"} 0",
            "sluice_rejected_total{cluster=\"c\",reason=\"unmeetable_deadline\"} 0",
            "sluice_concurrency_limit{backend=\"b:1\",cluster=\"c\"} 7",
        ] {
            assert!(text.contains(want), "want {want} in:\n{text}");
        }
    }
}
