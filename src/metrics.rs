//! Prometheus metrics behind `/metrics` (SPEC.md "Metrics"; prefix `sluice_`).
//!
//! Two kinds of series:
//! - **Per call, per backend**: the data plane bumps plain atomics and lock-free histograms
//!   held by the objects they describe: a [`BackendStats`] in each backend (created when the
//!   backend joins), a [`MethodStats`] per cluster and gRPC method (created on the method's
//!   first call), a [`ClusterStats`] per cluster. No label lookup happens per call. A scrape
//!   walks the current clusters and backends and turns them into series, so a backend that
//!   leaves discovery, or a cluster a reload removed, simply stops being exported.
//! - **Process-wide** (listeners, build, process): ordinary registered metrics, updated off
//!   the call path.
//!
//! Discovery series come from each cluster's discovery status and [`ClusterStats`] too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::proxy::grpc::{Code, GrpcPath};
use crate::proxy::Router;

/// Latency buckets, in seconds: from 1 ms to 10 min, because the calls worth seeing are the
/// ones that waited minutes (background.md).
const DURATION_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Distinct gRPC methods tracked per cluster. Paths come from clients, so without a cap a
/// client could create series without end; later methods are counted as `unknown`.
const MAX_METHODS_PER_CLUSTER: usize = 1000;

/// Who decided a call's status: the backend, or sluice itself (`origin` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Upstream = 0,
    Proxy = 1,
}

impl Origin {
    fn label(self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Proxy => "proxy",
        }
    }
}

/// Why sluice answered a call without a backend's answer (`sluice_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NoBackend = 0,
    Overloaded = 1,
    Deadline = 2,
    NoRoute = 3,
}

impl Reject {
    const ALL: [Reject; 4] = [
        Reject::NoBackend,
        Reject::Overloaded,
        Reject::Deadline,
        Reject::NoRoute,
    ];

    fn label(self) -> &'static str {
        match self {
            Reject::NoBackend => "no_backend",
            Reject::Overloaded => "overloaded",
            Reject::Deadline => "deadline",
            Reject::NoRoute => "no_route",
        }
    }
}

fn histogram(name: &str, help: &str, labels: &[(&str, &str)]) -> Histogram {
    let mut opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
    for (key, value) in labels {
        opts = opts.const_label(*key, *value);
    }
    // Constant names, valid label names, sorted positive buckets: construction cannot fail,
    // and `stats_export` below proves it; a fallback keeps an impossible error harmless.
    Histogram::with_opts(opts).unwrap_or_else(|_| {
        Histogram::with_opts(HistogramOpts::new("sluice_invalid", "invalid histogram"))
            .expect("a histogram without labels")
    })
}

// === per-backend ===

/// One backend's attempts by gRPC code, and their durations.
#[derive(Debug)]
pub struct BackendStats {
    codes: [AtomicU64; Code::COUNT],
    duration: Histogram,
}

impl BackendStats {
    pub fn new(cluster: &str, backend: &str) -> BackendStats {
        BackendStats {
            codes: Default::default(),
            duration: histogram(
                "sluice_upstream_request_duration_seconds",
                "Duration of attempts on a backend, from the pick to the last frame.",
                &[("cluster", cluster), ("backend", backend)],
            ),
        }
    }

    pub fn record(&self, code: Code, elapsed: Duration) {
        self.codes[code as usize].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(elapsed.as_secs_f64());
    }
}

// === per-method ===

/// One gRPC method's calls in one cluster, by code and origin, and their durations.
#[derive(Debug)]
pub struct MethodStats {
    service: Box<str>,
    method: Box<str>,
    codes: [[AtomicU64; Code::COUNT]; 2],
    duration: Histogram,
}

impl MethodStats {
    fn new(cluster: &str, service: &str, method: &str) -> MethodStats {
        MethodStats {
            service: service.into(),
            method: method.into(),
            codes: Default::default(),
            duration: histogram(
                "sluice_request_duration_seconds",
                "Duration of calls, from the request headers to the last frame.",
                &[
                    ("cluster", cluster),
                    ("grpc_service", service),
                    ("grpc_method", method),
                ],
            ),
        }
    }

    pub fn record(&self, code: Code, origin: Origin, elapsed: Duration) {
        self.codes[origin as usize][code as usize].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The methods seen in one cluster. A call looks its path up in an immutable map (no lock);
/// a method's first call copies the map with it added.
#[derive(Debug)]
struct MethodTable {
    cluster: String,
    by_path: ArcSwap<HashMap<Box<str>, Arc<MethodStats>, BuildPathHasher>>,
    /// Calls whose path is not `/service/method`, or beyond the cap.
    unknown: Arc<MethodStats>,
    adding: Mutex<()>,
}

impl MethodTable {
    fn new(cluster: &str) -> MethodTable {
        MethodTable {
            cluster: cluster.to_string(),
            by_path: ArcSwap::from_pointee(HashMap::default()),
            unknown: Arc::new(MethodStats::new(cluster, "unknown", "unknown")),
            adding: Mutex::new(()),
        }
    }

    fn get(&self, path: &str) -> Arc<MethodStats> {
        if let Some(stats) = self.by_path.load().get(path) {
            return Arc::clone(stats);
        }
        let Some(grpc) = GrpcPath::parse(path) else {
            return Arc::clone(&self.unknown);
        };
        // Full: a new path is `unknown` without taking the lock, so paths a client makes up
        // cannot make every call queue on it.
        if self.by_path.load().len() >= MAX_METHODS_PER_CLUSTER {
            return Arc::clone(&self.unknown);
        }
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.by_path.load();
        if let Some(stats) = current.get(path) {
            return Arc::clone(stats);
        }
        if current.len() >= MAX_METHODS_PER_CLUSTER {
            return Arc::clone(&self.unknown);
        }
        let stats = Arc::new(MethodStats::new(&self.cluster, grpc.service, grpc.method));
        let mut next = HashMap::clone(&current);
        next.insert(path.into(), Arc::clone(&stats));
        self.by_path.store(Arc::new(next));
        stats
    }

    fn all(&self) -> Vec<Arc<MethodStats>> {
        let mut all: Vec<Arc<MethodStats>> = self.by_path.load().values().cloned().collect();
        all.push(Arc::clone(&self.unknown));
        all
    }
}

/// FxHash (rustc's), for the per-call path lookup: a few instructions per 8 bytes where std's
/// SipHash takes hundreds per path. It is not flood-resistant, but the table it indexes holds
/// at most `MAX_METHODS_PER_CLUSTER` paths, so colliding paths cost a bounded probe, not a
/// growing one.
#[derive(Debug, Default, Clone, Copy)]
struct PathHasher(u64);

type BuildPathHasher = std::hash::BuildHasherDefault<PathHasher>;

impl std::hash::Hasher for PathHasher {
    fn write(&mut self, bytes: &[u8]) {
        const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(SEED);
        }
        for &byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(SEED);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

// === per-cluster ===

/// A cluster's call counters. Kept across reloads for a cluster that keeps its name, so
/// counters do not reset on SIGHUP.
#[derive(Debug)]
pub struct ClusterStats {
    methods: MethodTable,
    rejected: [AtomicU64; 4],
    retries: AtomicU64,
    discovery_updates: AtomicU64,
    discovery_errors: AtomicU64,
}

impl ClusterStats {
    pub fn new(cluster: &str) -> ClusterStats {
        ClusterStats {
            methods: MethodTable::new(cluster),
            rejected: Default::default(),
            retries: AtomicU64::new(0),
            discovery_updates: AtomicU64::new(0),
            discovery_errors: AtomicU64::new(0),
        }
    }

    /// The stats of the method `path` names; resolved once per call, by a map lookup.
    pub fn method(&self, path: &str) -> Arc<MethodStats> {
        self.methods.get(path)
    }

    pub fn rejected(&self, reason: Reject) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Discovery changed the backend set.
    pub fn discovery_updated(&self) {
        self.discovery_updates.fetch_add(1, Ordering::Relaxed);
    }

    /// A discovery connect, list or watch failed.
    pub fn discovery_failed(&self) {
        self.discovery_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// The `cluster` label of calls that matched no route. Not empty: Prometheus drops empty
/// labels, and dashboards could not select these series.
pub const NO_CLUSTER: &str = "(none)";

/// Calls that matched no route belong to no cluster: they count under `cluster="(none)"`.
pub fn unrouted() -> &'static ClusterStats {
    static UNROUTED: OnceLock<ClusterStats> = OnceLock::new();
    UNROUTED.get_or_init(|| ClusterStats::new(NO_CLUSTER))
}

// === process-wide ===

pub struct Metrics {
    registry: Registry,
    /// `sluice_downstream_connections{listener}`: open client connections.
    downstream_connections: IntGaugeVec,
    /// `sluice_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
}

impl Metrics {
    fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                "sluice_build_info",
                "Always 1; the labels say which sluice runs.",
            ),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        let downstream_connections = IntGaugeVec::new(
            Opts::new(
                "sluice_downstream_connections",
                "Open client connections, per listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(downstream_connections.clone()))?;
        let access_log_dropped = IntCounter::new(
            "sluice_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind.",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            downstream_connections,
            access_log_dropped,
        })
    }

    /// The open-connections gauge of one listener, resolved once when the listener starts.
    pub fn downstream_connections(&self, listener: &str) -> IntGauge {
        self.downstream_connections.with_label_values(&[listener])
    }

    /// The whole `/metrics` page: the registered series, then the series of every cluster
    /// and backend in `router`.
    pub fn encode(&self, router: &Router) -> Vec<u8> {
        let mut families = self.registry.gather();
        families.extend(router_families(router));
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

// === scrape: clusters and backends into series ===

/// Builds the per-cluster and per-backend families from the live objects. Runs per scrape,
/// off the call path; the vectors here are throw-away.
fn router_families(router: &Router) -> Vec<MetricFamily> {
    let build = || -> Result<Vec<MetricFamily>, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let requests = counter(
            "sluice_requests_total",
            "Calls finished, by gRPC code and by who decided it (origin = upstream or proxy).",
            &[
                "cluster",
                "grpc_service",
                "grpc_method",
                "grpc_code",
                "origin",
            ],
        )?;
        let upstream_requests = counter(
            "sluice_upstream_requests_total",
            "Attempts on a backend (a retried call counts once per backend tried), by gRPC code.",
            &["cluster", "backend", "grpc_code"],
        )?;
        let in_flight = gauge(
            "sluice_upstream_in_flight",
            "Streams open to a backend.",
            &["cluster", "backend"],
        )?;
        let up = gauge(
            "sluice_backend_up",
            "1 while a backend takes traffic; 0 while its connects fail.",
            &["cluster", "backend"],
        )?;
        let weights = gauge(
            "sluice_backend_weight",
            "A backend's weight (its fair share of the cluster's traffic is weight / sum).",
            &["cluster", "backend"],
        )?;
        let connections = gauge(
            "sluice_upstream_connections",
            "HTTP/2 connections open to a backend.",
            &["cluster", "backend"],
        )?;
        let backends = gauge(
            "sluice_backends",
            "Backends known, per cluster.",
            &["cluster"],
        )?;
        let rejected = counter(
            "sluice_rejected_total",
            "Calls sluice answered without a backend's answer, by reason.",
            &["cluster", "reason"],
        )?;
        let retries = counter(
            "sluice_retries_total",
            "Transparent retries on another backend.",
            &["cluster"],
        )?;
        let discovery_updates = counter(
            "sluice_discovery_updates_total",
            "Backend-set changes applied from discovery.",
            &["cluster", "source"],
        )?;
        let discovery_errors = counter(
            "sluice_discovery_errors_total",
            "Failed connects, lists and watches of a discovery source.",
            &["cluster", "source"],
        )?;
        let discovery_connected = gauge(
            "sluice_discovery_connected",
            "1 while the discovery source answers; 0 while routing on the last known set.",
            &["cluster", "source"],
        )?;
        let discovery_invalid = gauge(
            "sluice_discovery_invalid_values",
            "Keys under the etcd prefix skipped because their value could not be decoded.",
            &["cluster"],
        )?;
        let mut call_durations = Vec::new();
        let mut attempt_durations = Vec::new();

        let clusters = router
            .clusters()
            .iter()
            .map(|c| (c.name.as_str(), &*c.stats, Some(c)))
            .chain(std::iter::once((NO_CLUSTER, unrouted(), None)));
        for (name, stats, cluster) in clusters {
            for method in stats.methods.all() {
                for origin in [Origin::Upstream, Origin::Proxy] {
                    for code in Code::ALL {
                        let n =
                            method.codes[origin as usize][code as usize].load(Ordering::Relaxed);
                        if n > 0 {
                            requests
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
                    call_durations.extend(method.duration.collect());
                }
            }
            for reason in Reject::ALL {
                // Every cluster shows every reason, zeros included, so alerts on a rate
                // have a series to read; unrouted calls have only one reason.
                if cluster.is_some() == (reason != Reject::NoRoute) {
                    rejected
                        .with_label_values(&[name, reason.label()])
                        .inc_by(stats.rejected[reason as usize].load(Ordering::Relaxed));
                }
            }
            let Some(cluster) = cluster else { continue };
            retries
                .with_label_values(&[name])
                .inc_by(stats.retries.load(Ordering::Relaxed));
            let discovery = &cluster.discovery;
            let source = [name, discovery.source];
            discovery_updates
                .with_label_values(&source)
                .inc_by(stats.discovery_updates.load(Ordering::Relaxed));
            discovery_errors
                .with_label_values(&source)
                .inc_by(stats.discovery_errors.load(Ordering::Relaxed));
            discovery_connected
                .with_label_values(&source)
                .set(i64::from(discovery.is_connected()));
            if discovery.source == "etcd" {
                discovery_invalid
                    .with_label_values(&[name])
                    .set(discovery.invalid_values());
            }
            let set = cluster.backends();
            backends
                .with_label_values(&[name])
                .set(set.backends.len() as i64);
            for backend in &set.backends {
                let address = backend.address.0.as_str();
                let labels = [name, address];
                for code in Code::ALL {
                    let n = backend.stats.codes[code as usize].load(Ordering::Relaxed);
                    // OK always shows, so a backend's series exist from its first scrape.
                    if n > 0 || code == Code::Ok {
                        upstream_requests
                            .with_label_values(&[name, address, code.go_name()])
                            .inc_by(n);
                    }
                }
                attempt_durations.extend(backend.stats.duration.collect());
                in_flight
                    .with_label_values(&labels)
                    .set(backend.in_flight() as i64);
                up.with_label_values(&labels)
                    .set(i64::from(backend.is_up()));
                connections
                    .with_label_values(&labels)
                    .set(backend.pool.connections() as i64);
                weights
                    .with_label_values(&labels)
                    .set(i64::from(backend.weight()));
            }
        }
        let mut families = Vec::new();
        let collectors: [&dyn Collector; 13] = [
            &requests,
            &upstream_requests,
            &rejected,
            &retries,
            &in_flight,
            &up,
            &connections,
            &weights,
            &backends,
            &discovery_updates,
            &discovery_errors,
            &discovery_connected,
            &discovery_invalid,
        ];
        for collector in collectors {
            families.extend(collector.collect());
        }
        families.extend(merge(call_durations));
        families.extend(merge(attempt_durations));
        Ok(families)
    };
    build().unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_register() {
        let m = Metrics::new().unwrap();
        m.downstream_connections("grpc").set(2);
        let text = String::from_utf8(m.encode(&Router::empty())).unwrap();
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
    fn methods_are_resolved_once_and_capped() {
        let table = MethodTable::new("c");
        let a = table.get("/echo.v1.Echo/Unary");
        assert!(Arc::ptr_eq(&a, &table.get("/echo.v1.Echo/Unary")));
        assert_eq!((&*a.service, &*a.method), ("echo.v1.Echo", "Unary"));
        assert!(Arc::ptr_eq(&table.get("/not-grpc"), &table.unknown));
        for i in 0..MAX_METHODS_PER_CLUSTER {
            table.get(&format!("/s/m{i}"));
        }
        assert!(Arc::ptr_eq(&table.get("/s/one-too-many"), &table.unknown));
    }

    #[test]
    fn stats_export() {
        let stats = MethodStats::new("c", "s", "m");
        stats.record(Code::NotFound, Origin::Upstream, Duration::from_millis(3));
        let family = stats.duration.collect();
        assert_eq!(family[0].get_metric().len(), 1);
        assert_eq!(stats.duration.get_sample_count(), 1);
    }
}
