//! Clusters, their backends, and the per-stream pick.
//!
//! A [`Cluster`] holds its backend set behind an `ArcSwap`: discovery swaps a whole new set in,
//! and a call loads the current snapshot without a lock. A [`Backend`] carries the load and
//! state the balancers read, as atomics. Which algorithm picks is a closed set: [`Balancer`],
//! one file each.

mod backend;
mod ewma;
mod least_request;
mod limit;
mod marks;
mod outlier;
mod p2c;
mod queue;
mod registry;
mod retry_budget;
mod round_robin;
mod shedding;
mod source;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::{info, warn};

pub use backend::{Backend, BackendSnapshot, BackendState, Endpoint, InFlight};
pub use ewma::{clock_ns, fast_latency};
pub use limit::{LimitPolicy, Sample};
pub use marks::Mark;
pub use queue::{ClientId, SlotQueue, Waiter, Wake};
pub use registry::Clusters;
pub use retry_budget::RetryBudget;
pub use source::{SourceKind, SourceState, SourceStatus, SourceView};

use crate::config::{
    BackendAddr, BalancerKind, ClientKeyConfig, ClusterConfig, OutlierDetection, RetryOn,
};
use crate::overrides::Overrides;
use crate::sync::lock;
use crate::telemetry::{ClusterStats, DiscoveryGauges, Scrape};
use crate::transport::tls::ClientTls;
use crate::transport::UpstreamPolicy;
use crate::wire::Code;

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
    fn pick(&self, set: &BackendSet, now_ns: u64) -> Option<usize> {
        match self {
            Balancer::P2cEwma => {
                let cost = |b: &Backend| b.cost(now_ns);
                p2c::pick(&set.backends, cost, Some(now_ns / 1_000_000))
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
    /// Connect timeout, keepalive and idle timeout of the backend connections.
    pub upstream: UpstreamPolicy,
    pub max_deadline: Duration,
    pub max_attempts: u32,
    /// The gRPC codes (bit `1 << code`) a backend's trailers-only answer is retried on.
    pub retry_on: u32,
    /// Retry a call whose connection died before any byte of its response came back.
    pub retry_lost_connection: bool,
    /// How long a call may wait for a free backend slot.
    pub queue_timeout: Duration,
    /// Calls that may wait at once; beyond it, shed at once.
    pub max_queued: usize,
    pub outlier_detection: OutlierDetection,
    /// Who a client is, when a full queue sheds the client with the most waiting
    /// (`client_key`).
    pub client_key: ClientKeyConfig,
}

impl ClusterSettings {
    /// Whether a trailers-only answer with `code` may be retried on another backend.
    pub fn retries_on(&self, code: Code) -> bool {
        self.retry_on & (1 << code as u32) != 0
    }
}

/// `retry.retry_on` as a bit set of gRPC codes.
fn retry_codes(retry_on: &[RetryOn]) -> u32 {
    retry_on
        .iter()
        .map(|on| match on {
            RetryOn::Unavailable => Code::Unavailable,
            RetryOn::ResourceExhausted => Code::ResourceExhausted,
            RetryOn::Internal => Code::Internal,
            RetryOn::Cancelled => Code::Cancelled,
        })
        .fold(0, |codes, code| codes | (1 << code as u32))
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
    ready: AtomicBool,
    /// Where the backends come from, and whether that source answers (written by discovery).
    pub source: SourceStatus,
    /// True while no backend is usable and calls try them all anyway (panic mode).
    panic: AtomicBool,
    /// Held while outlier detection decides an ejection (outlier.rs).
    ejecting: Mutex<()>,
    /// Backends discovery removed while they held calls: `/backends` shows them as
    /// `draining` until their last call ends (the call's `InFlight` keeps one alive).
    draining: Mutex<Vec<Weak<Backend>>>,
    /// Call counters; a reload hands them to the next cluster of the same name.
    pub stats: Arc<ClusterStats>,
    /// Calls waiting for a backend slot; shared with the backends, and kept across reloads.
    pub queue: Arc<SlotQueue>,
    /// Whether it is shedding calls, for the log (shedding.rs).
    shedding: shedding::Shedding,
    /// The operator's drains and weights, applied to each backend set (`reapply_overrides`).
    overrides: Arc<Overrides>,
}

/// What a pick found.
pub enum Pick {
    /// A backend, with the slot taken on it.
    Backend(Arc<Backend>, InFlight),
    /// Every candidate holds its cap: wait in the queue.
    Full,
    /// The cluster has no backends.
    Empty,
}

impl Cluster {
    /// A cluster for `config`; `tls` is its upstream TLS, built from `config.tls`'s files;
    /// `client_key` is the top-level `client_key`.
    pub fn new(
        config: &ClusterConfig,
        tls: Option<Arc<ClientTls>>,
        client_key: &ClientKeyConfig,
        overrides: Arc<Overrides>,
    ) -> Cluster {
        let stats = Arc::new(ClusterStats::new(&config.name.value));
        let queue = Arc::new(SlotQueue::new(LimitPolicy::new(config)));
        Cluster::with_state(config, tls, client_key, stats, queue, overrides)
    }

    /// The next generation of `previous` (on reload): it carries on counting in the same
    /// stats, and its calls wait in the same queue, under the new limits.
    pub fn after(
        config: &ClusterConfig,
        tls: Option<Arc<ClientTls>>,
        client_key: &ClientKeyConfig,
        previous: &Cluster,
    ) -> Cluster {
        let queue = Arc::clone(&previous.queue);
        if queue.policy.set(config) {
            // New limits may make room: every waiter looks again (those that find none keep
            // their places).
            queue.wake_all();
        }
        let stats = Arc::clone(&previous.stats);
        let overrides = Arc::clone(&previous.overrides);
        let cluster = Cluster::with_state(config, tls, client_key, stats, queue, overrides);
        cluster.shedding.carry_on(&previous.shedding);
        cluster
    }

    fn with_state(
        config: &ClusterConfig,
        tls: Option<Arc<ClientTls>>,
        client_key: &ClientKeyConfig,
        stats: Arc<ClusterStats>,
        queue: Arc<SlotQueue>,
        overrides: Arc<Overrides>,
    ) -> Cluster {
        Cluster {
            stats,
            queue,
            overrides,
            name: config.name.value.clone(),
            settings: ClusterSettings {
                upstream: UpstreamPolicy::of(config, tls),
                max_deadline: config.max_deadline.0,
                max_attempts: config.retry.max_attempts.0,
                retry_on: retry_codes(&config.retry.retry_on),
                retry_lost_connection: config.retry.on_lost_connection,
                queue_timeout: config.queue_timeout.0,
                max_queued: config.max_queued as usize,
                outlier_detection: config.outlier_detection,
                client_key: client_key.clone(),
            },
            balancer: Balancer::new(config.balancer),
            backends: ArcSwap::from_pointee(BackendSet::default()),
            retry_budget: RetryBudget::new(config.retry.budget_ratio.0),
            ready: Default::default(),
            source: SourceStatus::new(&config.discovery.value),
            panic: AtomicBool::new(false),
            ejecting: Mutex::new(()),
            draining: Mutex::new(Vec::new()),
            shedding: Default::default(),
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
        *lock(&self.draining) = lock(&previous.draining).clone();
        if previous.is_ready() {
            self.ready.store(true, Ordering::Release);
        }
    }

    /// Replaces the backend set. Backends that stay keep their state and connections (a new
    /// weight is taken in place); new ones start fresh; removed ones finish their in-flight
    /// streams and are then dropped. Returns whether anything changed.
    pub fn update(&self, endpoints: &[Endpoint]) -> bool {
        let current = self.backends.load();
        let mut existing: HashMap<&BackendAddr, &Arc<Backend>> =
            current.backends.iter().map(|b| (&b.address, b)).collect();
        let mut changed = endpoints.len() != current.backends.len();
        let mut next = Vec::with_capacity(endpoints.len());
        let overrides = self.overrides.current();
        for endpoint in endpoints {
            let backend = match existing.remove(&endpoint.address) {
                Some(backend) => Arc::clone(backend),
                None => {
                    changed = true;
                    self.revive_or_add(endpoint)
                }
            };
            let set = overrides.backend(&self.name, &endpoint.address.0);
            // The round-robin schedule is built from the weights: rebuild it.
            changed |= backend.set_weight(endpoint.weight, set.weight);
            changed |= backend.set_drained(set.drained);
            next.push(backend);
        }
        changed |= !existing.is_empty();
        self.start_draining(existing.into_values());
        if changed {
            self.backends.store(Arc::new(BackendSet::new(next)));
        }
        self.ready.store(true, Ordering::Release);
        changed
    }

    /// Applies the operator's overrides again to the current set, after they changed;
    /// returns whether any backend changed. Logs each drain and weight that takes effect.
    pub fn reapply_overrides(&self) -> bool {
        let overrides = self.overrides.current();
        let current = self.backends.load();
        let mut changed = false;
        for backend in &current.backends {
            let set = overrides.backend(&self.name, &backend.address.0);
            if backend.set_drained(set.drained) {
                let now = if set.drained { "drained" } else { "undrained" };
                info!(cluster = %self.name, backend = %backend.address, in_flight = backend.in_flight(),
                    "backend {now} by the operator");
                changed = true;
            }
            if backend.set_weight(backend.discovered_weight(), set.weight) {
                info!(cluster = %self.name, backend = %backend.address, weight = backend.weight(),
                    "backend weight set by the operator");
                changed = true;
            }
        }
        if changed {
            let backends = current.backends.clone();
            self.backends.store(Arc::new(BackendSet::new(backends)));
        }
        changed
    }

    /// Whether any backend may take a call now (not drained, not in backoff, not ejected,
    /// not failing checks): a split gives a cluster without one no share of its calls.
    pub fn has_usable_backend(&self) -> bool {
        let now = clock_ns() / 1_000_000;
        self.backends
            .load()
            .backends
            .iter()
            .any(|b| b.is_usable(now))
    }

    /// The addresses of the current backends.
    pub fn addresses(&self) -> Vec<String> {
        (self.backends.load().backends.iter())
            .map(|b| b.address.0.clone())
            .collect()
    }

    /// A backend for a new endpoint: the one still draining at that address, if any (it keeps
    /// its connections and statistics), else a new one.
    fn revive_or_add(&self, endpoint: &Endpoint) -> Arc<Backend> {
        let mut draining = lock(&self.draining);
        let found = draining
            .iter()
            .filter_map(Weak::upgrade)
            .find(|b| b.address == endpoint.address);
        if let Some(backend) = found {
            draining.retain(|b| !std::ptr::eq(b.as_ptr(), Arc::as_ptr(&backend)));
            backend.set_removed(false);
            return backend;
        }
        let queue = Arc::clone(&self.queue);
        Arc::new(Backend::new(endpoint, self.source.kind, &self.name, queue))
    }

    /// Marks removed backends draining. All are kept (weakly): one whose calls already
    /// ended leaves the list at the next look, and a call that picked it from the old set
    /// just before the swap still shows it. (A call that picks it after such a look and
    /// before the swap is not shown; it still runs to its end.)
    fn start_draining<'b>(&self, removed: impl Iterator<Item = &'b Arc<Backend>>) {
        let mut draining = lock(&self.draining);
        draining.retain(|b| b.upgrade().is_some_and(|b| b.in_flight() > 0));
        for backend in removed {
            backend.set_removed(true);
            draining.push(Arc::downgrade(backend));
        }
    }

    /// Backends discovery removed that still hold calls (`/backends`, state `draining`).
    pub fn draining(&self) -> Vec<Arc<Backend>> {
        let mut draining = lock(&self.draining);
        draining.retain(|b| b.upgrade().is_some_and(|b| b.in_flight() > 0));
        draining.iter().filter_map(Weak::upgrade).collect()
    }

    /// What `/backends` lists: the discovered backends, then the draining ones (each once,
    /// though discovery may swap the set between the two reads).
    pub fn listed_backends(&self) -> Vec<Arc<Backend>> {
        let mut listed = self.backends().backends.clone();
        for backend in self.draining() {
            if !listed.iter().any(|b| Arc::ptr_eq(b, &backend)) {
                listed.push(backend);
            }
        }
        listed
    }

    /// Hands this cluster and its backends to a `/metrics` scrape.
    pub fn export(&self, scrape: &mut Scrape) {
        let set = self.backends();
        let discovery = DiscoveryGauges {
            source: self.source.kind.label(),
            connected: self.source.is_connected(),
            invalid_values: (self.source.kind == SourceKind::Etcd)
                .then(|| self.source.invalid_values()),
        };
        let backends = set.backends.len();
        let (panic, queued) = (self.in_panic(), self.queue.len());
        scrape.cluster(&self.name, &self.stats, discovery, backends, panic, queued);
        for backend in &set.backends {
            let stats = &backend.stats;
            scrape.backend(&self.name, &backend.address.0, stats, backend.gauges());
        }
    }

    /// Picks a backend for one attempt and takes a slot on it, avoiding those in `tried`,
    /// those in connect backoff, ejected or full, when another choice exists. When none is
    /// usable, it tries them all rather than fail every call (panic mode, as Envoy's); a
    /// backend at its cap is never used. While calls wait in the queue, a new call (not
    /// `queued`) waits behind them rather than take a slot first.
    pub fn pick(&self, tried: &[Arc<Backend>], queued: bool) -> Pick {
        if !queued && !self.queue.is_empty() {
            return Pick::Full;
        }
        let set = self.backends.load();
        let now_ns = clock_ns();
        let now = now_ns / 1_000_000;
        let untried = |b: &Arc<Backend>| !tried.iter().any(|t| Arc::ptr_eq(t, b));
        let usable = |b: &Arc<Backend>| b.is_usable(now) && b.has_room() && untried(b);
        if let Some(i) = self.balancer.pick(&set, now_ns) {
            let chosen = &set.backends[i];
            if let Some(slot) = usable(chosen)
                .then(|| chosen.try_start_stream(now))
                .flatten()
            {
                self.leave_panic(chosen);
                return Pick::Backend(Arc::clone(chosen), slot);
            }
        }
        // Rare path (a retry; a backend in backoff, ejected or full): scan from a random
        // offset for one that is usable and untried, then usable though tried (a healthy
        // backend again beats an ejected one, as in Envoy), then one at least not tried,
        // then any.
        let n = set.backends.len();
        if n == 0 {
            return Pick::Empty;
        }
        let start = fastrand::usize(..n);
        // A drained backend is never picked, not even in panic mode.
        let rotated = || {
            (0..n)
                .map(|k| &set.backends[(start + k) % n])
                .filter(|b| !b.is_drained())
        };
        if rotated().next().is_none() {
            return Pick::Empty;
        }
        let take = |b: &Arc<Backend>| Some(Pick::Backend(Arc::clone(b), b.try_start_stream(now)?));
        let usable_again = |b: &&Arc<Backend>| b.is_usable(now) && b.has_room();
        let found = (rotated().filter(|b| usable(b)).find_map(take)).or_else(|| {
            // Without tried backends, this scan would be the one above again.
            (!tried.is_empty())
                .then(|| rotated().filter(usable_again).find_map(take))
                .flatten()
        });
        if let Some(pick) = found {
            if let Pick::Backend(backend, _) = &pick {
                self.leave_panic(backend);
            }
            return pick;
        }
        if !set.backends.iter().any(|b| b.is_usable(now)) {
            self.enter_panic();
        } else if rotated().any(|b| b.is_usable(now) && !b.has_room()) {
            // Usable backends exist, and they are full: wait for a slot.
            return Pick::Full;
        }
        let fallback = rotated().filter(|b| untried(b)).find_map(take);
        fallback
            .or_else(|| rotated().find_map(take))
            .unwrap_or(Pick::Full)
    }

    /// True while no backend is usable and calls try them all (`sluice_panic_mode`).
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    fn enter_panic(&self) {
        if !self.panic.swap(true, Ordering::Relaxed) {
            warn!(cluster = %self.name,
                "panic mode: no backend is usable (all in connect backoff or ejected); calls try them all");
        }
    }

    /// Panic mode ends with a pick of a backend that is healthy, not merely out of its
    /// connect backoff: while every connect keeps failing, it does not flip on and off.
    fn leave_panic(&self, picked: &Backend) {
        // A load first: the common case writes nothing.
        if self.panic.load(Ordering::Relaxed)
            && picked.state() == BackendState::Healthy
            && self.panic.swap(false, Ordering::Relaxed)
        {
            info!(cluster = %self.name, "panic mode over: a backend is usable again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn endpoints(addrs: &[(&str, u32)]) -> Vec<Endpoint> {
        addrs
            .iter()
            .map(|(a, w)| Endpoint {
                address: BackendAddr(a.to_string()),
                weight: *w,
            })
            .collect()
    }

    /// The backend a pick finds (its slot is freed at once).
    fn picked(c: &Cluster, tried: &[Arc<Backend>]) -> Arc<Backend> {
        match c.pick(tried, false) {
            Pick::Backend(backend, _slot) => backend,
            Pick::Full | Pick::Empty => panic!("no backend picked"),
        }
    }

    pub(super) fn cluster(balancer: &str) -> Cluster {
        let yaml = format!(
            "listeners: [{{name: l, address: \"127.0.0.1:1\"}}]\nclusters: [{{name: c, balancer: {balancer}, discovery: {{static: [\"a:1\"]}}}}]"
        );
        let config = crate::config::Config::parse(&yaml, "t").unwrap();
        Cluster::new(
            &config.clusters[0],
            None,
            &config.client_key,
            Overrides::new(),
        )
    }

    #[test]
    fn update_keeps_surviving_backends_and_reports_change() {
        let c = cluster("p2c_ewma");
        assert!(c.update(&endpoints(&[("a:1", 1), ("b:1", 1)])));
        let a = Arc::clone(&c.backends().backends[0]);
        assert!(!c.update(&endpoints(&[("a:1", 1), ("b:1", 1)])));
        assert!(c.update(&endpoints(&[("a:1", 1)])));
        assert!(Arc::ptr_eq(&a, &c.backends().backends[0]));
    }

    #[test]
    fn a_removed_backend_drains_and_a_returning_one_is_revived() {
        let c = cluster("round_robin");
        c.update(&endpoints(&[("a:1", 1)]));
        let Pick::Backend(a, slot) = c.pick(&[], false) else {
            panic!("no pick");
        };
        c.update(&endpoints(&[("b:1", 1)]));
        assert_eq!(a.state(), BackendState::Draining);
        assert!(Arc::ptr_eq(&c.draining()[0], &a));
        // Listed again while its call runs: the same backend, with its connections.
        c.update(&endpoints(&[("a:1", 2), ("b:1", 1)]));
        assert!(c.draining().is_empty());
        assert!(Arc::ptr_eq(&c.backends().backends[0], &a));
        assert_eq!((a.state(), a.weight()), (BackendState::Healthy, 2));
        // Removed again: listed while its call runs, gone when it ends.
        c.update(&endpoints(&[("b:1", 1)]));
        assert_eq!(c.draining().len(), 1);
        drop(slot);
        assert!(c.draining().is_empty());
    }

    #[test]
    fn a_weight_change_keeps_the_backend() {
        let c = cluster("round_robin");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]));
        let a = Arc::clone(&c.backends().backends[0]);
        assert!(c.update(&endpoints(&[("a:1", 3), ("b:1", 1)])));
        assert!(Arc::ptr_eq(&a, &c.backends().backends[0]));
        assert_eq!(a.weight(), 3);
        let picks_a = (0..400)
            .filter(|_| picked(&c, &[]).address.0 == "a:1")
            .count();
        assert_eq!(picks_a, 300);
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let c = cluster("round_robin");
        c.update(&endpoints(&[("a:1", 3), ("b:1", 1)]));
        let mut count_a = 0;
        for _ in 0..400 {
            if picked(&c, &[]).address.0 == "a:1" {
                count_a += 1;
            }
        }
        assert_eq!(count_a, 300);
    }

    #[test]
    fn every_balancer_honours_weights() {
        for kind in ["p2c_ewma", "least_request", "round_robin"] {
            let c = cluster(kind);
            c.update(&endpoints(&[("heavy:1", 3), ("light:1", 1)]));
            let heavy = (0..8000)
                .filter(|_| picked(&c, &[]).address.0 == "heavy:1")
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
            c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]));
            let a = Arc::clone(&c.backends().backends[0]);
            for _ in 0..50 {
                assert_eq!(picked(&c, &[Arc::clone(&a)]).address.0, "b:1", "{kind}");
            }
        }
    }

    #[test]
    fn a_retry_goes_back_to_a_healthy_backend_before_an_ejected_one() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]));
        let (a, b) = (
            Arc::clone(&c.backends().backends[0]),
            Arc::clone(&c.backends().backends[1]),
        );
        b.eject(ewma::clock_ms(), 10_000);
        for _ in 0..20 {
            assert!(Arc::ptr_eq(&picked(&c, &[Arc::clone(&a)]), &a));
        }
        assert!(!c.in_panic());
    }

    #[test]
    fn panic_mode_ends_with_a_healthy_backend_not_a_retried_failing_one() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("a:1", 1)]));
        let a = Arc::clone(&c.backends().backends[0]);
        a.connect_failed();
        let _ = c.pick(&[], false);
        assert!(c.in_panic());
        // Its backoff over, the failing backend is tried again: that alone does not end it.
        c.leave_panic(&a);
        assert!(c.in_panic());
        a.connect_succeeded();
        let _ = c.pick(&[], false);
        assert!(!c.in_panic());
    }

    fn slow_picks(c: &Cluster) -> usize {
        (0..1000)
            .filter(|_| picked(c, &[]).address.0 == "slow:1")
            .count()
    }

    #[test]
    fn p2c_weighs_latency_against_the_method_baseline() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("fast:1", 1), ("slow:1", 1)]));
        let set = c.backends();
        let baseline = crate::telemetry::MethodLatency::default();
        let (fast, slow) = (&set.backends[0], &set.backends[1]);
        fast.observe_latency(Duration::from_millis(1), &baseline, clock_ns());
        // Within the noise floor: an even share.
        slow.observe_latency(Duration::from_millis(3), &baseline, clock_ns());
        assert!((400..600).contains(&slow_picks(&c)), "{}", slow_picks(&c));
        // A few long calls are not a slow backend: it keeps its share.
        for _ in 0..3 {
            slow.observe_latency(Duration::from_secs(3), &baseline, clock_ns());
        }
        assert!((400..600).contains(&slow_picks(&c)), "{}", slow_picks(&c));
        // Slow on call after call: it loses nearly all of it.
        for _ in 0..10 {
            fast.observe_latency(Duration::from_millis(1), &baseline, clock_ns());
            slow.observe_latency(Duration::from_millis(300), &baseline, clock_ns());
        }
        assert!(slow_picks(&c) < 50, "{}", slow_picks(&c));
    }

    #[test]
    fn p2c_avoids_a_backend_that_fails_fast() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("fast:1", 1), ("slow:1", 1)]));
        let set = c.backends();
        let baseline = crate::telemetry::MethodLatency::default();
        for _ in 0..10 {
            set.backends[0].observe_latency(Duration::from_millis(1), &baseline, clock_ns());
            // Answers in no time, with a failure.
            set.backends[1].observe_failure();
        }
        assert!(slow_picks(&c) < 50, "{}", slow_picks(&c));
    }
}
