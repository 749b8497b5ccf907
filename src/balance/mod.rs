//! Clusters and their backends, and the per-stream pick.
//!
//! A [`Cluster`] holds its backend set behind an `ArcSwap`: discovery swaps a whole new set in,
//! and a call loads the current snapshot without a lock. A [`Backend`] carries the live numbers
//! the balancers read (in-flight count, peak-EWMA latency) as atomics, and its upstream
//! connection [`Pool`]. Which algorithm picks is a closed set: [`Balancer`], one file each.

mod least_request;
mod p2c;
mod round_robin;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::{BackendAddr, BalancerKind, ClusterConfig};
use crate::discovery::DiscoveryStatus;
use crate::metrics::{BackendStats, ClusterStats};
use crate::proxy::grpc::Code;
use crate::proxy::pool::Pool;

/// One discovered backend: where it is and how much it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: BackendAddr,
    pub weight: u32,
}

/// Weights above this are clamped, which keeps the round-robin schedule small.
const MAX_WEIGHT: u32 = 100;

// === Backend ===

/// A backend and its live state. Shared by the cluster's snapshot and by every call that
/// picked it, so a backend removed from discovery lives until its last call ends.
#[derive(Debug)]
pub struct Backend {
    pub address: BackendAddr,
    /// Changed in place when discovery changes it, so the backend keeps its connections.
    weight: AtomicU32,
    /// Which discovery source found it (`static`, `etcd`), for `/backends`.
    pub source: &'static str,
    /// Streams sent to this backend and not yet finished.
    in_flight: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    latency: PeakEwma,
    /// After a failed connect, the backend is skipped until this time (ms on [`clock`]), then
    /// given another chance. Doubles on each consecutive failure up to `MAX_CONNECT_BACKOFF`.
    skip_until_ms: AtomicU64,
    connect_failures: AtomicU64,
    pub pool: Pool,
    /// Attempts by gRPC code and their durations, for `/metrics`.
    pub stats: BackendStats,
    /// Counter samples of the last `RATE_WINDOW`, taken each second by the rate sampler, for
    /// `/backends`' recent rates (cold path: one lock per second and per page view).
    recent: Mutex<VecDeque<RateSample>>,
}

/// The `requests` and `failures` counters at one moment.
#[derive(Debug, Clone, Copy)]
struct RateSample {
    at: Instant,
    requests: u64,
    failures: u64,
}

/// How far back `/backends` looks for `rps` and `error_ratio`.
const RATE_WINDOW: Duration = Duration::from_secs(10);

const BASE_CONNECT_BACKOFF: Duration = Duration::from_millis(250);
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(10);

impl Backend {
    pub fn new(endpoint: &Endpoint, source: &'static str, cluster: &str) -> Backend {
        Backend {
            stats: BackendStats::new(cluster, &endpoint.address.0),
            address: endpoint.address.clone(),
            weight: AtomicU32::new(endpoint.weight.clamp(1, MAX_WEIGHT)),
            source,
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: PeakEwma::new(),
            skip_until_ms: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            pool: Pool::new(),
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// False while the backend sits out a connect backoff.
    pub fn is_available(&self) -> bool {
        self.skip_until_ms.load(Ordering::Relaxed) <= clock_ms()
    }

    /// False from a failed connect until the next one succeeds, including the moments between
    /// backoffs when it may be tried again (`sluice_backend_up`, `state`).
    pub fn is_up(&self) -> bool {
        self.connect_failures.load(Ordering::Relaxed) == 0
    }

    /// Marks one stream started; the returned guard marks it finished when dropped.
    pub fn start_stream(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            backend: Arc::clone(self),
        }
    }

    /// Records the time from sending the request to the backend's response headers.
    pub fn observe_latency(&self, rtt: Duration) {
        self.latency.observe(rtt);
    }

    /// Records how one attempt on this backend ended: its gRPC code (the backend's, or the
    /// one sluice gave for it) and how long it took from the pick. Server-side failure codes
    /// count as the backend's failures.
    pub fn finish_attempt(&self, code: Code, elapsed: Duration) {
        if code.is_server_error() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.record(code, elapsed);
    }

    /// A connect failed: back off from this backend, and count the failure against it.
    pub fn record_connect_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let streak = self.connect_failures.fetch_add(1, Ordering::Relaxed).min(8);
        let backoff = (BASE_CONNECT_BACKOFF * 2u32.pow(streak as u32)).min(MAX_CONNECT_BACKOFF);
        self.skip_until_ms
            .store(clock_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        // Also weigh it down for p2c once the backoff ends, until it answers again.
        self.latency.observe(Duration::from_secs(1));
    }

    pub fn record_connect_success(&self) {
        if self.connect_failures.swap(0, Ordering::Relaxed) != 0 {
            self.skip_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The peak-EWMA latency estimate, in nanoseconds.
    fn latency_nanos(&self) -> f64 {
        self.latency.estimate_nanos()
    }

    /// The p2c cost: latency × load, over the weight. Lower is better.
    fn cost(&self) -> f64 {
        self.latency.estimate_nanos() * (self.in_flight() as f64 + 1.0) / self.weight() as f64
    }

    fn sample_now(&self) -> RateSample {
        RateSample {
            at: Instant::now(),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Records the counters (the rate sampler calls this every second), keeping one sample
    /// at least `RATE_WINDOW` old.
    pub fn sample_rates(&self) {
        let now = self.sample_now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back(now);
        while recent.len() > 2 && now.at.duration_since(recent[1].at) >= RATE_WINDOW {
            recent.pop_front();
        }
    }

    /// Calls per second and the share of them that failed, over about the last 10 s.
    pub fn recent_rates(&self) -> (f64, f64) {
        let now = self.sample_now();
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(oldest) = recent.front() else {
            return (0.0, 0.0);
        };
        let seconds = now.at.duration_since(oldest.at).as_secs_f64();
        let requests = now.requests.saturating_sub(oldest.requests);
        let failures = now.failures.saturating_sub(oldest.failures);
        if seconds < 0.5 || requests == 0 {
            return (0.0, 0.0);
        }
        (
            requests as f64 / seconds,
            (failures as f64 / requests as f64).min(1.0),
        )
    }

    pub fn snapshot(&self) -> BackendSnapshot {
        let (rps, error_ratio) = self.recent_rates();
        BackendSnapshot {
            rps,
            error_ratio,
            address: self.address.to_string(),
            state: if self.is_up() { "healthy" } else { "unhealthy" },
            in_flight: self.in_flight(),
            ewma_latency_ms: self.latency.estimate_nanos() / 1e6,
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            weight: self.weight(),
            source: self.source,
            upstream_connections: self.pool.connections(),
        }
    }
}

/// One in-flight stream on a backend; dropping it ends the stream's share of the load.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
}

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What `/backends` shows of one backend (field names are SPEC.md's).
#[derive(Debug, Serialize)]
pub struct BackendSnapshot {
    pub address: String,
    pub state: &'static str,
    pub in_flight: u64,
    pub ewma_latency_ms: f64,
    pub requests: u64,
    pub failures: u64,
    pub weight: u32,
    pub source: &'static str,
    pub upstream_connections: usize,
    /// Attempts per second over about the last 10 s.
    pub rps: f64,
    /// The share of those attempts that failed (0 to 1).
    pub error_ratio: f64,
}

// === PeakEwma ===

/// Peak-EWMA latency, as in Finagle and Linkerd: a slower observation is taken at once (the
/// peak), a faster one is blended in with a weight that grows with the time since the last.
/// The estimate also decays while nothing is observed, so a backend that was slow once gets
/// probed again later instead of being starved forever.
#[derive(Debug)]
struct PeakEwma {
    /// f64 nanoseconds, as bits. Racing updates may lose one observation; that is tolerated,
    /// since a lock here would serialise every call on the backend.
    estimate: AtomicU64,
    updated_ns: AtomicU64,
}

/// How fast old observations fade; Linkerd uses 10 s as well.
const EWMA_DECAY_NS: f64 = 10e9;
/// A new backend's assumed latency, so it is neither flooded nor starved before it answers.
const EWMA_INITIAL_NS: f64 = 1e6;

impl PeakEwma {
    fn new() -> PeakEwma {
        PeakEwma {
            estimate: AtomicU64::new(EWMA_INITIAL_NS.to_bits()),
            updated_ns: AtomicU64::new(clock_ns()),
        }
    }

    fn observe(&self, rtt: Duration) {
        let now = clock_ns();
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate_at(now);
        let next = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
            let w = (-elapsed / EWMA_DECAY_NS).exp();
            current * w + rtt * (1.0 - w)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.updated_ns.store(now, Ordering::Relaxed);
    }

    fn estimate_nanos(&self) -> f64 {
        self.estimate_at(clock_ns())
    }

    fn estimate_at(&self, now: u64) -> f64 {
        let value = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let idle = now.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        value * (-idle / EWMA_DECAY_NS).exp()
    }
}

/// A monotonic clock shared by the atomics above: nanoseconds since first use.
fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn clock_ms() -> u64 {
    clock_ns() / 1_000_000
}

// === Balancer ===

/// The pick algorithms (config `balancer`).
#[derive(Debug)]
pub enum Balancer {
    P2cEwma,
    LeastRequest,
    RoundRobin(round_robin::RoundRobin),
}

impl Balancer {
    fn new(kind: BalancerKind) -> Balancer {
        match kind {
            BalancerKind::P2cEwma => Balancer::P2cEwma,
            BalancerKind::LeastRequest => Balancer::LeastRequest,
            BalancerKind::RoundRobin => Balancer::RoundRobin(round_robin::RoundRobin::default()),
        }
    }

    /// Picks an index into `set`, or `None` when it is empty. O(1), lock-free.
    fn pick(&self, set: &BackendSet) -> Option<usize> {
        match self {
            Balancer::P2cEwma => {
                p2c::pick(&set.backends, Backend::cost, Some(Backend::latency_nanos))
            }
            Balancer::LeastRequest => p2c::pick(&set.backends, least_request::cost, None),
            Balancer::RoundRobin(rr) => rr.pick(&set.schedule),
        }
    }
}

/// An immutable backend set, swapped whole on each discovery change.
#[derive(Debug, Default)]
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
    /// Round-robin order: indexes into `backends`, each repeated by its weight, interleaved.
    schedule: Vec<u32>,
}

impl BackendSet {
    fn new(backends: Vec<Arc<Backend>>) -> BackendSet {
        let schedule = round_robin::schedule(&backends);
        BackendSet { backends, schedule }
    }
}

// === Cluster ===

/// Per-cluster settings a call reads.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub connect_timeout: Duration,
    pub max_deadline: Duration,
    pub max_attempts: u32,
}

/// A named group of interchangeable backends behind one balancer.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub settings: ClusterSettings,
    balancer: Balancer,
    backends: ArcSwap<BackendSet>,
    pub retry_budget: RetryBudget,
    /// Set once the first discovery result arrived (`/readyz`).
    ready: std::sync::atomic::AtomicBool,
    /// Where the backends come from, and whether that source answers.
    pub discovery: DiscoveryStatus,
    /// Call counters; a reload hands them to the next cluster of the same name.
    pub stats: Arc<ClusterStats>,
}

impl Cluster {
    pub fn new(config: &ClusterConfig) -> Cluster {
        Cluster::with_stats(config, Arc::new(ClusterStats::new(&config.name)))
    }

    /// A cluster that carries on counting in `stats` (those of its predecessor on reload).
    pub fn with_stats(config: &ClusterConfig, stats: Arc<ClusterStats>) -> Cluster {
        Cluster {
            stats,
            name: config.name.clone(),
            settings: ClusterSettings {
                connect_timeout: config.connect_timeout.0,
                max_deadline: config.max_deadline.0,
                max_attempts: config.retry.max_attempts,
            },
            balancer: Balancer::new(config.balancer),
            backends: ArcSwap::from_pointee(BackendSet::default()),
            retry_budget: RetryBudget::new(config.retry.budget_ratio),
            ready: Default::default(),
            discovery: DiscoveryStatus::new(&config.discovery),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn backends(&self) -> arc_swap::Guard<Arc<BackendSet>> {
        self.backends.load()
    }

    /// Takes over another cluster's backends (on reload), so those that stay keep their
    /// connections and statistics when the next `update` runs. A cluster that was ready stays
    /// ready: its set is known while the new watch lists again.
    pub fn adopt_backends(&self, previous: &Cluster) {
        self.backends.store(previous.backends.load_full());
        if previous.is_ready() {
            self.ready.store(true, Ordering::Release);
        }
    }

    /// Replaces the backend set. Backends that stay keep their state and connections (a new
    /// weight is taken in place); new ones start fresh; removed ones finish their in-flight
    /// streams and are then dropped. Returns whether anything changed.
    pub fn update(&self, endpoints: &[Endpoint], source: &'static str) -> bool {
        let current = self.backends.load();
        let mut existing: HashMap<&BackendAddr, &Arc<Backend>> =
            current.backends.iter().map(|b| (&b.address, b)).collect();
        let mut changed = endpoints.len() != current.backends.len();
        let mut next = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            match existing.remove(&endpoint.address) {
                Some(backend) => {
                    let weight = endpoint.weight.clamp(1, MAX_WEIGHT);
                    if backend.weight.swap(weight, Ordering::Relaxed) != weight {
                        // The round-robin schedule is built from the weights: rebuild it.
                        changed = true;
                    }
                    next.push(Arc::clone(backend));
                }
                None => {
                    changed = true;
                    next.push(Arc::new(Backend::new(endpoint, source, &self.name)));
                }
            }
        }
        changed |= !existing.is_empty();
        if changed {
            self.backends.store(Arc::new(BackendSet::new(next)));
        }
        self.ready.store(true, Ordering::Release);
        changed
    }

    /// Picks a backend for one attempt, avoiding those in `tried` and those in connect
    /// backoff when another choice exists.
    pub fn pick(&self, tried: &[Arc<Backend>]) -> Option<Arc<Backend>> {
        let set = self.backends.load();
        let usable =
            |b: &Arc<Backend>| b.is_available() && !tried.iter().any(|t| Arc::ptr_eq(t, b));
        if let Some(i) = self.balancer.pick(&set) {
            let chosen = &set.backends[i];
            if usable(chosen) {
                return Some(Arc::clone(chosen));
            }
        }
        // Rare path (a retry, or a backend in backoff): scan from a random offset for one
        // that is usable, then for one that was at least not tried, then take any.
        let n = set.backends.len();
        if n == 0 {
            return None;
        }
        let start = fastrand::usize(..n);
        let rotated = || (0..n).map(|k| &set.backends[(start + k) % n]);
        rotated()
            .find(|b| usable(b))
            .or_else(|| rotated().find(|b| !tried.iter().any(|t| Arc::ptr_eq(t, b))))
            .or_else(|| rotated().next())
            .cloned()
    }
}

// === RetryBudget ===

/// Keeps retries under `ratio` of requests: each request deposits `ratio` of a token, each
/// retry withdraws one. A small starting balance lets a quiet cluster still retry.
#[derive(Debug)]
pub struct RetryBudget {
    /// Milli-tokens.
    balance: AtomicU64,
    deposit: u64,
}

const RETRY_BUDGET_FLOOR: u64 = 10_000;
const RETRY_BUDGET_CAP: u64 = 100_000;

impl RetryBudget {
    fn new(ratio: f64) -> RetryBudget {
        RetryBudget {
            balance: AtomicU64::new(RETRY_BUDGET_FLOOR),
            deposit: (ratio * 1000.0) as u64,
        }
    }

    pub fn on_request(&self) {
        if self.deposit > 0 && self.balance.load(Ordering::Relaxed) < RETRY_BUDGET_CAP {
            self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(addrs: &[(&str, u32)]) -> Vec<Endpoint> {
        addrs
            .iter()
            .map(|(a, w)| Endpoint {
                address: BackendAddr(a.to_string()),
                weight: *w,
            })
            .collect()
    }

    fn cluster(balancer: &str) -> Cluster {
        let yaml = format!(
            "listeners: [{{name: l, address: \"127.0.0.1:1\"}}]\nclusters: [{{name: c, balancer: {balancer}, discovery: {{static: [\"a:1\"]}}}}]"
        );
        let config = crate::config::Config::parse(&yaml, "t").unwrap();
        Cluster::new(&config.clusters[0])
    }

    #[test]
    fn update_keeps_surviving_backends_and_reports_change() {
        let c = cluster("p2c_ewma");
        assert!(c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]), "static"));
        let a = Arc::clone(&c.backends().backends[0]);
        assert!(!c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]), "static"));
        assert!(c.update(&endpoints(&[("a:1", 1)]), "static"));
        assert!(Arc::ptr_eq(&a, &c.backends().backends[0]));
    }

    #[test]
    fn a_weight_change_keeps_the_backend() {
        let c = cluster("round_robin");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]), "etcd");
        let a = Arc::clone(&c.backends().backends[0]);
        assert!(c.update(&endpoints(&[("a:1", 3), ("b:1", 1)]), "etcd"));
        assert!(Arc::ptr_eq(&a, &c.backends().backends[0]));
        assert_eq!(a.weight(), 3);
        let picks_a = (0..400)
            .filter(|_| c.pick(&[]).unwrap().address.0 == "a:1")
            .count();
        assert_eq!(picks_a, 300);
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let c = cluster("round_robin");
        c.update(&endpoints(&[("a:1", 3), ("b:1", 1)]), "static");
        let mut count_a = 0;
        for _ in 0..400 {
            if c.pick(&[]).unwrap().address.0 == "a:1" {
                count_a += 1;
            }
        }
        assert_eq!(count_a, 300);
    }

    #[test]
    fn every_balancer_honours_weights() {
        for kind in ["p2c_ewma", "least_request", "round_robin"] {
            let c = cluster(kind);
            c.update(&endpoints(&[("heavy:1", 3), ("light:1", 1)]), "etcd");
            let heavy = (0..8000)
                .filter(|_| c.pick(&[]).unwrap().address.0 == "heavy:1")
                .count() as f64;
            let ratio = heavy / (8000.0 - heavy);
            assert!(
                (2.6..=3.4).contains(&ratio),
                "{kind}: heavy/light = {ratio}"
            );
        }
    }

    #[test]
    fn pick_avoids_tried_backends() {
        for kind in ["p2c_ewma", "least_request", "round_robin"] {
            let c = cluster(kind);
            c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]), "static");
            let a = Arc::clone(&c.backends().backends[0]);
            for _ in 0..50 {
                assert_eq!(
                    c.pick(&[Arc::clone(&a)]).unwrap().address.0,
                    "b:1",
                    "{kind}"
                );
            }
        }
    }

    #[test]
    fn p2c_prefers_the_faster_backend() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("fast:1", 1), ("slow:1", 1)]), "static");
        let set = c.backends();
        set.backends[0].observe_latency(Duration::from_millis(1));
        set.backends[1].observe_latency(Duration::from_millis(3));
        let slow_picks = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().address.0 == "slow:1")
            .count();
        // 3x slower: still proportional, about 1 draw in 4.
        assert!(
            (150..350).contains(&slow_picks),
            "slow picked {slow_picks} of 1000"
        );
        set.backends[1].observe_latency(Duration::from_millis(20));
        let slow_picks = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().address.0 == "slow:1")
            .count();
        // 20x but only 19 ms slower (one hiccup can do that): still proportional, ~1 in 21.
        assert!(
            (15..110).contains(&slow_picks),
            "slow picked {slow_picks} of 1000"
        );
        set.backends[1].observe_latency(Duration::from_millis(500));
        let slow_picks = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().address.0 == "slow:1")
            .count();
        // 500 ms slower: left alone until its estimate decays back within reach.
        assert_eq!(slow_picks, 0);
    }

    #[test]
    fn retry_budget_runs_out_and_refills() {
        let budget = RetryBudget::new(0.5);
        let mut granted = 0;
        while budget.try_withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 10);
        budget.on_request();
        budget.on_request();
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }
}
