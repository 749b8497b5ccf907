//! The counters the data plane bumps per call, held by the objects they describe: a
//! [`BackendStats`] per backend, a [`MethodStats`] per cluster and gRPC method, a
//! [`ClusterStats`] per cluster. Plain atomics and lock-free histograms: no label lookup per
//! call. The exporter ([`super::metrics`]) turns them into series at scrape time.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{Histogram, HistogramOpts};
use rustc_hash::FxBuildHasher;

use super::history::{History, HistoryView};
use crate::sync::lock;
use crate::wire::{Code, GrpcPath, Origin};

/// Latency buckets, in seconds: from 1 ms to 10 min, because the calls worth seeing are the
/// ones that waited minutes.
pub(super) const DURATION_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Distinct gRPC methods tracked per cluster. Paths come from clients, so without a cap a
/// client could create series without end; later methods are counted as `unknown`.
pub const MAX_METHODS_PER_CLUSTER: usize = 1000;

/// How far back `/backends` looks for `rps` and `error_ratio`.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// How one active health check of a backend ended (`sluice_health_checks_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthResult {
    Serving = 0,
    NotServing = 1,
    Timeout = 2,
    /// Transport failure, or a gRPC error other than UNIMPLEMENTED.
    Error = 3,
    /// No grpc.health.v1 service: counted, and treated as serving.
    Unimplemented = 4,
}

impl HealthResult {
    pub const ALL: [HealthResult; 5] = [
        HealthResult::Serving,
        HealthResult::NotServing,
        HealthResult::Timeout,
        HealthResult::Error,
        HealthResult::Unimplemented,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HealthResult::Serving => "serving",
            HealthResult::NotServing => "not_serving",
            HealthResult::Timeout => "timeout",
            HealthResult::Error => "error",
            HealthResult::Unimplemented => "unimplemented",
        }
    }

    /// Whether the backend passed: serving, or without a health service at all.
    pub fn passed(self) -> bool {
        matches!(self, HealthResult::Serving | HealthResult::Unimplemented)
    }
}

/// Why sluice answered a call without a backend's answer. [`Reject::label`] is its
/// `sluice_rejected_total{reason}`; [`Reject::cause`], finer, goes in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NoBackend = 0,
    /// No slot within `queue_timeout`.
    QueueTimeout = 1,
    /// `max_queued` calls waited already.
    QueueFull = 2,
    /// The queue was full and this call's client had the most waiting: it made room.
    Displaced = 3,
    Deadline = 4,
    NoRoute = 5,
    /// The remaining deadline was shorter than the expected wait plus the method's usual
    /// latency: never sent.
    UnmeetableDeadline = 6,
    /// The route's rate limit had no token for the call's client.
    RateLimited = 7,
}

impl Reject {
    pub const COUNT: usize = 8;

    pub const ALL: [Reject; Reject::COUNT] = [
        Reject::NoBackend,
        Reject::QueueTimeout,
        Reject::QueueFull,
        Reject::Displaced,
        Reject::Deadline,
        Reject::NoRoute,
        Reject::UnmeetableDeadline,
        Reject::RateLimited,
    ];

    /// The metric's reason: every kind of shedding for overload is `overloaded`.
    pub fn label(self) -> &'static str {
        match self {
            Reject::NoBackend => "no_backend",
            Reject::QueueTimeout | Reject::QueueFull | Reject::Displaced => "overloaded",
            Reject::Deadline => "deadline",
            Reject::NoRoute => "no_route",
            Reject::UnmeetableDeadline => "unmeetable_deadline",
            Reject::RateLimited => "rate_limited",
        }
    }

    /// The access log's `rejected`: the reason, with overload told apart.
    pub fn cause(self) -> &'static str {
        match self {
            Reject::QueueTimeout => "queue_timeout",
            Reject::QueueFull => "queue_full",
            Reject::Displaced => "displaced",
            other => other.label(),
        }
    }
}

pub(super) fn histogram(name: &str, help: &str, labels: &[(&str, &str)]) -> Histogram {
    let mut opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
    for (key, value) in labels {
        opts = opts.const_label(*key, *value);
    }
    // Constant names, valid label names, sorted positive buckets: construction cannot fail,
    // and the test `stats_export` proves it; a fallback keeps an impossible error harmless.
    Histogram::with_opts(opts).unwrap_or_else(|_| {
        Histogram::with_opts(HistogramOpts::new("sluice_invalid", "invalid histogram"))
            .expect("a histogram without labels")
    })
}

// === impl BackendStats ===

/// One backend's attempts. The one set of counters for a backend, each with one meaning:
/// - `codes[c]`: attempts whose request was sent to the backend and ended with gRPC code `c`
///   (the backend's, or the one sluice gave when the deadline passed or the client left);
/// - `connect_failures`: attempts that never got a stream because the connect or the HTTP/2
///   handshake failed (these are not in `codes`).
///
/// `/backends` shows `requests` = all of them, and `failures` = the server-side failure codes
/// plus the failed connects.
#[derive(Debug)]
pub struct BackendStats {
    codes: [AtomicU64; Code::COUNT],
    connect_failures: AtomicU64,
    /// Times outlier detection ejected the backend.
    ejections: AtomicU64,
    /// Active health checks, by [`HealthResult`].
    health_checks: [AtomicU64; 5],
    pub(super) duration: Histogram,
    /// Samples of `(requests, failures)` over the last `RATE_WINDOW`, taken each second by the
    /// rate sampler (cold path: one lock per second and per page view).
    recent: Mutex<VecDeque<RateSample>>,
    /// Five minutes in 5 s bins, for the status page's charts.
    history: Mutex<History>,
}

/// A backend's attempts over about the last 10 s (`BackendStats::recent_rates`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecentRates {
    /// How many: the sample size behind the two rates.
    pub requests: u64,
    pub per_second: f64,
    /// The share that failed on the server side (0 to 1).
    pub error_ratio: f64,
}

/// The `requests` and `failures` totals at one moment.
#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Instant,
    requests: u64,
    failures: u64,
}

impl BackendStats {
    pub fn new(cluster: &str, backend: &str) -> BackendStats {
        BackendStats {
            codes: Default::default(),
            connect_failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            health_checks: Default::default(),
            duration: histogram(
                "sluice_upstream_request_duration_seconds",
                "Duration of attempts on a backend, from the pick to the last frame.",
                &[("cluster", cluster), ("backend", backend)],
            ),
            recent: Mutex::new(VecDeque::new()),
            history: Mutex::new(History::default()),
        }
    }

    /// One attempt whose request went to the backend ended with `code`, `elapsed` after the
    /// pick.
    pub fn record(&self, code: Code, elapsed: Duration) {
        self.codes[code as usize].fetch_add(1, Ordering::Relaxed);
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// One attempt found no stream: the connect or handshake failed.
    pub fn record_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// One active health check ended with `result`.
    pub fn record_health(&self, result: HealthResult) {
        self.health_checks[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn health_checks(&self, result: HealthResult) -> u64 {
        self.health_checks[result as usize].load(Ordering::Relaxed)
    }

    /// Outlier detection ejected the backend.
    pub fn record_ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn attempts_with(&self, code: Code) -> u64 {
        self.codes[code as usize].load(Ordering::Relaxed)
    }

    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
    }

    /// Every attempt: sent, or failed to connect.
    pub fn requests(&self) -> u64 {
        let sent: u64 = self.codes.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        sent + self.connect_failures()
    }

    /// Attempts that failed on the server side: a failure code, or a failed connect.
    pub fn failures(&self) -> u64 {
        let failed: u64 = Code::ALL
            .iter()
            .filter(|c| c.is_server_error())
            .map(|c| self.attempts_with(*c))
            .sum();
        failed + self.connect_failures()
    }

    fn sample_now(&self) -> RateSample {
        RateSample {
            at: Instant::now(),
            requests: self.requests(),
            failures: self.failures(),
        }
    }

    /// Records the totals (the rate sampler calls this every second), keeping one sample at
    /// least `RATE_WINDOW` old.
    pub fn sample_rates(&self) {
        let now = self.sample_now();
        let mut recent = lock(&self.recent);
        recent.push_back(now);
        while recent.len() > 2 && now.at.duration_since(recent[1].at) >= RATE_WINDOW {
            recent.pop_front();
        }
    }

    /// Closes a bin of the five-minute history (the sampler calls this every 5 s, for every
    /// backend at once).
    pub fn close_history_bin(&self) {
        let mut history = lock(&self.history);
        history.close_bin(self.requests(), self.failures(), &self.duration);
    }

    pub fn history(&self) -> HistoryView {
        let history = lock(&self.history);
        history.view()
    }

    /// Attempts over about the last 10 s: how many, per second, and the share that failed.
    pub fn recent_rates(&self) -> RecentRates {
        let now = self.sample_now();
        let recent = lock(&self.recent);
        let Some(oldest) = recent.front() else {
            return RecentRates::default();
        };
        let seconds = now.at.duration_since(oldest.at).as_secs_f64();
        let requests = now.requests.saturating_sub(oldest.requests);
        let failures = now.failures.saturating_sub(oldest.failures);
        if seconds < 0.5 || requests == 0 {
            return RecentRates::default();
        }
        RecentRates {
            requests,
            per_second: requests as f64 / seconds,
            error_ratio: (failures as f64 / requests as f64).min(1.0),
        }
    }
}

// === impl MethodStats ===

/// One gRPC method's calls in one cluster, by code and origin, and their durations.
#[derive(Debug)]
pub struct MethodStats {
    pub(super) service: Box<str>,
    pub(super) method: Box<str>,
    pub(super) codes: [[AtomicU64; Code::COUNT]; 2],
    pub(super) duration: Histogram,
    /// What the balancer and the concurrency limits learn of the method's latency. Kept here,
    /// beside the counters, because the call already holds this object: no second lookup per
    /// call.
    pub latency: MethodLatency,
}

/// One method's latency across its cluster, as the balance layer learns it.
#[derive(Debug, Default)]
pub struct MethodLatency {
    /// Typical latency to response headers (f64 nanoseconds as bits, 0 until the first
    /// answer), which the balancer compares each backend's with.
    pub baseline: AtomicU64,
    /// The latency of its fast answers (f64 nanoseconds as bits, 0 until the first answer):
    /// what a call of it takes when nothing delays it, for deadline-aware admission.
    pub fastest: AtomicU64,
    /// When `fastest` last changed (ns on the balancer's clock).
    pub fastest_updated_ns: AtomicU64,
    /// Latency to response headers when the backend answering was lightly loaded (in
    /// nanoseconds), which the concurrency limits compare each answer with.
    pub light_load: LightLoad,
    /// Recent latencies to response headers, for hedging's adaptive delay (recorded only on
    /// routes that hedge).
    pub percentiles: super::percentile::LatencyPercentiles,
}

/// A mean learned from answers given under light load (balance/limit.rs learns it): plain
/// data here, so the object a call already holds can carry it.
#[derive(Debug, Default)]
pub struct LightLoad {
    /// The mean (f64 as bits; meaningful once `samples` > 0).
    pub mean: AtomicU64,
    /// The sum of the first samples' weights (f64 as bits).
    pub weight: AtomicU64,
    pub samples: AtomicU32,
    /// When it last learned (ns on the balancer's clock).
    pub updated_ns: AtomicU64,
}

impl MethodStats {
    fn new(cluster: &str, service: &str, method: &str) -> MethodStats {
        MethodStats {
            service: service.into(),
            method: method.into(),
            codes: Default::default(),
            latency: MethodLatency::default(),
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
///
/// The map hashes with FxHash (`rustc-hash`): a few instructions per 8 bytes where std's
/// SipHash takes hundreds per path. It is not flood-resistant, but the map holds at most
/// `MAX_METHODS_PER_CLUSTER` paths, so colliding paths cost a bounded probe.
#[derive(Debug)]
struct MethodTable {
    cluster: String,
    by_path: ArcSwap<HashMap<Box<str>, Arc<MethodStats>, FxBuildHasher>>,
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
        let _adding = lock(&self.adding);
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

// === impl ClusterStats ===

/// A cluster's call counters. Kept across reloads for a cluster that keeps its name, so
/// counters do not reset on SIGHUP.
#[derive(Debug)]
pub struct ClusterStats {
    methods: MethodTable,
    /// How long calls waited for a backend slot (`sluice_queue_wait_seconds`).
    pub(super) queue_wait: Histogram,
    rejected: [AtomicU64; Reject::COUNT],
    retries: AtomicU64,
    hedges: [AtomicU64; Hedge::ALL.len()],
    discovery_updates: AtomicU64,
    discovery_errors: AtomicU64,
}

/// How a hedge ended (`sluice_hedges_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hedge {
    /// It answered first: its answer went to the client, and the first attempt was cancelled.
    Won,
    /// The first attempt answered first: the hedge was cancelled.
    Lost,
    /// It failed before answering (connect, refused, a `retry_on` status).
    Failed,
}

impl Hedge {
    pub const ALL: [Hedge; 3] = [Hedge::Won, Hedge::Lost, Hedge::Failed];

    pub fn label(self) -> &'static str {
        match self {
            Hedge::Won => "won",
            Hedge::Lost => "lost",
            Hedge::Failed => "failed",
        }
    }
}

impl ClusterStats {
    pub fn new(cluster: &str) -> ClusterStats {
        ClusterStats {
            methods: MethodTable::new(cluster),
            queue_wait: histogram(
                "sluice_queue_wait_seconds",
                "Time calls waited for a backend slot (max_concurrent_streams_per_backend).",
                &[("cluster", cluster)],
            ),
            rejected: Default::default(),
            retries: AtomicU64::new(0),
            hedges: Default::default(),
            discovery_updates: AtomicU64::new(0),
            discovery_errors: AtomicU64::new(0),
        }
    }

    /// The stats of the method `path` names; resolved once per call, by a map lookup.
    pub fn method(&self, path: &str) -> Arc<MethodStats> {
        self.methods.get(path)
    }

    pub(super) fn methods(&self) -> Vec<Arc<MethodStats>> {
        self.methods.all()
    }

    pub fn rejected(&self, reason: Reject) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn rejected_count(&self, reason: Reject) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Calls shed for overload so far: queue timeouts, a full queue, displaced, and
    /// unmeetable deadlines.
    pub fn shed(&self) -> u64 {
        [
            Reject::QueueTimeout,
            Reject::QueueFull,
            Reject::Displaced,
            Reject::UnmeetableDeadline,
        ]
        .into_iter()
        .map(|reason| self.rejected_count(reason))
        .sum()
    }

    /// A call waited `waited` in the queue for a backend slot.
    pub fn queued(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn hedged(&self, result: Hedge) {
        self.hedges[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn hedges(&self, result: Hedge) -> u64 {
        self.hedges[result as usize].load(Ordering::Relaxed)
    }

    /// Discovery changed the backend set.
    pub fn discovery_updated(&self) {
        self.discovery_updates.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn discovery_updates(&self) -> u64 {
        self.discovery_updates.load(Ordering::Relaxed)
    }

    /// A discovery connect, list or watch failed.
    pub fn discovery_failed(&self) {
        self.discovery_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn discovery_errors(&self) -> u64 {
        self.discovery_errors.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let family = prometheus::core::Collector::collect(&stats.duration);
        assert_eq!(family[0].get_metric().len(), 1);
        assert_eq!(stats.duration.get_sample_count(), 1);
    }

    #[test]
    fn backend_counters_have_one_meaning_each() {
        let stats = BackendStats::new("c", "b:1");
        stats.record(Code::Ok, Duration::from_millis(1));
        stats.record(Code::NotFound, Duration::from_millis(1));
        stats.record(Code::Unavailable, Duration::from_millis(1));
        stats.record_connect_failure();
        // A failed connect is one attempt and one failure, counted once.
        assert_eq!(stats.requests(), 4);
        assert_eq!(stats.failures(), 2);
        assert_eq!(stats.attempts_with(Code::Unavailable), 1);
        assert_eq!(stats.connect_failures(), 1);
    }
}
