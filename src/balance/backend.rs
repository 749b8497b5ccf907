//! One backend as the balancer sees it: its load (in-flight streams, latency score,
//! weight) and its state (connect backoff). It refers to its upstream connections and its
//! counters, which live in the transport and telemetry layers.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::ewma::{clock_ms, follow_fastest, ratio_to_baseline, PeakEwma, Pending, Score};
use super::limit::{AdaptiveLimit, Sample};
use super::marks::Mark;
use super::queue::SlotQueue;
use super::source::SourceKind;
use crate::config::BackendAddr;
use crate::telemetry::{BackendGauges, BackendStats, MethodLatency};
use crate::transport::Pool;

/// Weights above this are clamped, which keeps the round-robin schedule small.
pub(super) const MAX_WEIGHT: u32 = 100;

const BASE_CONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// A backend that went away is tried again at least this often, so one that returns serves
/// again within a few seconds.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(3);

/// A backend not picked for this long gets the next call it is drawn for: one probe at a time,
/// so an avoided backend is judged again by a fresh answer.
const PROBE_AFTER_MS: u64 = 2_000;

/// One discovered backend: where it is and how much it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: BackendAddr,
    pub weight: u32,
}

/// What `/backends` says of a backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    Healthy,
    /// Outlier detection took it out after failures in a row, until its ejection time ends.
    Ejected,
    /// Its last connect failed, or it fails its active health checks; it gets no new calls
    /// until that ends (a backend in connect backoff is tried again when the backoff ends).
    Unhealthy,
    /// Discovery removed it; the calls it still holds run to their end, and it takes no new
    /// ones. It leaves `/backends` with its last call.
    Draining,
    /// The operator drained it (`sluice ctl drain`): it takes no new calls, its calls run to
    /// their end, its health checks go on, and it stays listed until undrained.
    Drained,
}

/// The longest an ejection lasts, however often a backend was ejected.
const MAX_EJECTION_MS: u64 = 5 * 60 * 1000;

/// A backend and its live load and state. Shared by the cluster's snapshot and by every call
/// that picked it, so a backend removed from discovery lives until its last call ends.
#[derive(Debug)]
pub struct Backend {
    pub address: BackendAddr,
    /// Which discovery source found it.
    pub source: SourceKind,
    /// The weight picks use: the operator's override, else discovery's. Changed in place, so
    /// the backend keeps its connections.
    weight: AtomicU32,
    /// The weight discovery gave it, for when an override is lifted.
    discovered_weight: AtomicU32,
    /// The operator drained it (state `drained`): never picked, not even in panic mode.
    drained: AtomicBool,
    /// Streams sent to this backend and not yet finished.
    in_flight: AtomicU64,
    /// Calls sent and not yet answered, and the adaptive limit on them (limit.rs).
    limit: AdaptiveLimit,
    /// Peak-EWMA latency to response headers, for `/backends` (`ewma_latency_ms`).
    latency: PeakEwma,
    /// What `p2c_ewma` picks by: calls' latencies against their methods' baselines, with
    /// failures as the worst latency (ewma.rs).
    score: Score,
    /// Calls sent and not answered yet: their wait counts as latency while the backend
    /// answers nothing (`Pending::stall`).
    pending: Pending,
    /// When the balancer last picked it (ms on the balancer's clock), for probing.
    last_pick_ms: AtomicU64,
    /// After a failed connect, the backend is skipped until this time (ms on the balancer's
    /// clock), then given another chance. Doubles on each consecutive failure up to
    /// `MAX_CONNECT_BACKOFF`.
    skip_until_ms: AtomicU64,
    /// Consecutive failed connects; 0 once one succeeds.
    connect_streak: AtomicU64,
    /// Failed attempts in a row, for outlier detection; 0 after a success.
    failure_streak: AtomicU32,
    /// Until when outlier detection keeps it out (ms on the balancer's clock); 0: never was.
    ejected_until_ms: AtomicU64,
    /// How often it was ejected: the n-th ejection lasts n times the base ejection time.
    ejections: AtomicU32,
    /// Ejected, and not yet answered well since.
    on_probation: AtomicBool,
    /// Active health checks: failed ones in a row, passed ones in a row, and whether the
    /// checks took it out.
    checks_failed: AtomicU32,
    checks_passed: AtomicU32,
    failing_checks: AtomicBool,
    /// Discovery removed it (state `draining`).
    removed: AtomicBool,
    /// The HTTP/2 connections to this backend (transport layer).
    pub transport: Arc<Pool>,
    /// This backend's attempt counters (telemetry layer); the proxy records into them.
    pub stats: Arc<BackendStats>,
    /// The cluster's queue of calls waiting for a slot, and the limits its backends take
    /// slots under.
    queue: Arc<SlotQueue>,
}

impl Backend {
    pub fn new(
        endpoint: &Endpoint,
        source: SourceKind,
        cluster: &str,
        queue: Arc<SlotQueue>,
    ) -> Backend {
        Backend {
            limit: AdaptiveLimit::new(&queue.policy),
            queue,
            stats: Arc::new(BackendStats::new(cluster, &endpoint.address.0)),
            transport: Arc::new(Pool::new()),
            address: endpoint.address.clone(),
            weight: AtomicU32::new(endpoint.weight.clamp(1, MAX_WEIGHT)),
            discovered_weight: AtomicU32::new(endpoint.weight.clamp(1, MAX_WEIGHT)),
            drained: AtomicBool::new(false),
            source,
            in_flight: AtomicU64::new(0),
            latency: PeakEwma::new(),
            score: Score::new(),
            pending: Pending::default(),
            last_pick_ms: AtomicU64::new(clock_ms()),
            skip_until_ms: AtomicU64::new(0),
            connect_streak: AtomicU64::new(0),
            failure_streak: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            on_probation: AtomicBool::new(false),
            checks_failed: AtomicU32::new(0),
            checks_passed: AtomicU32::new(0),
            failing_checks: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Takes discovery's weight and the operator's override (which wins); returns whether
    /// the weight picks use changed.
    pub(super) fn set_weight(&self, discovered: u32, overridden: Option<u32>) -> bool {
        let discovered = discovered.clamp(1, MAX_WEIGHT);
        self.discovered_weight.store(discovered, Ordering::Relaxed);
        let weight = overridden.unwrap_or(discovered).clamp(1, MAX_WEIGHT);
        self.weight.swap(weight, Ordering::Relaxed) != weight
    }

    pub(super) fn discovered_weight(&self) -> u32 {
        self.discovered_weight.load(Ordering::Relaxed)
    }

    /// Drains it (`true`) or lifts the drain; returns whether that changed.
    pub(super) fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::Relaxed) != drained
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Draining once discovery removed it; ejected while outlier detection keeps it out;
    /// unhealthy while it fails its health checks, and from a failed connect until the next
    /// one succeeds, including the moments between backoffs when it may be tried again
    /// (`sluice_backend_up`, `state`).
    pub fn state(&self) -> BackendState {
        if self.removed.load(Ordering::Relaxed) {
            BackendState::Draining
        } else if self.is_drained() {
            BackendState::Drained
        } else if self.is_ejected(clock_ms()) {
            BackendState::Ejected
        } else if self.failing_checks.load(Ordering::Relaxed) {
            BackendState::Unhealthy
        } else if self.connect_streak.load(Ordering::Relaxed) == 0 {
            BackendState::Healthy
        } else {
            BackendState::Unhealthy
        }
    }

    /// Discovery removed it (`true`), or listed it again while it was draining (`false`).
    pub(super) fn set_removed(&self, removed: bool) {
        self.removed.store(removed, Ordering::Relaxed);
    }

    pub(super) fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// May take a call: not drained, not in connect backoff, not ejected, not failing its
    /// health checks.
    pub(super) fn is_usable(&self, now_ms: u64) -> bool {
        !self.is_drained()
            && self.skip_until_ms.load(Ordering::Relaxed) <= now_ms
            && !self.is_ejected(now_ms)
            && !self.failing_checks.load(Ordering::Relaxed)
    }

    /// Forgets what health checks said (the cluster's checks were turned off by a reload).
    pub fn clear_health_checks(&self) {
        self.failing_checks.store(false, Ordering::Relaxed);
        self.checks_failed.store(0, Ordering::Relaxed);
        self.checks_passed.store(0, Ordering::Relaxed);
    }

    /// Counts one active health check; returns the new verdict when it changed: `Some(false)`
    /// after `unhealthy_threshold` failures in a row, `Some(true)` after `healthy_threshold`
    /// passes in a row.
    pub fn health_checked(&self, passed: bool, unhealthy: u32, healthy: u32) -> Option<bool> {
        let failing = self.failing_checks.load(Ordering::Relaxed);
        if passed {
            self.checks_failed.store(0, Ordering::Relaxed);
            let passes = self.checks_passed.fetch_add(1, Ordering::Relaxed) + 1;
            if failing && passes >= healthy {
                self.failing_checks.store(false, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.checks_passed.store(0, Ordering::Relaxed);
            let failures = self.checks_failed.fetch_add(1, Ordering::Relaxed) + 1;
            if !failing && failures >= unhealthy {
                self.failing_checks.store(true, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// Counts one failed attempt; returns the failures in a row.
    pub(super) fn count_failure(&self) -> u32 {
        self.failure_streak.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts one good attempt: the streak ends. A backend back from an ejection is on
    /// probation until this first good answer (returns true then, once). After a quiet spell
    /// as long as its last ejection, its next ejection is short again.
    pub(super) fn count_success(&self, now_ms: u64, base_ejection_ms: u64) -> bool {
        if self.failure_streak.load(Ordering::Relaxed) != 0 {
            self.failure_streak.store(0, Ordering::Relaxed);
        }
        let ejections = self.ejections.load(Ordering::Relaxed);
        if ejections == 0 {
            return false;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if now_ms >= until + base_ejection_ms * u64::from(ejections) {
            self.ejections.store(0, Ordering::Relaxed);
        }
        self.on_probation.swap(false, Ordering::Relaxed)
    }

    /// Takes the backend out for `base_ejection_ms` times the number of its ejections, at most
    /// five minutes; returns how long.
    pub(super) fn eject(&self, now_ms: u64, base_ejection_ms: u64) -> u64 {
        let nth = u64::from(self.ejections.fetch_add(1, Ordering::Relaxed)) + 1;
        let length = (base_ejection_ms * nth).min(MAX_EJECTION_MS);
        self.ejected_until_ms
            .store(now_ms + length, Ordering::Relaxed);
        self.failure_streak.store(0, Ordering::Relaxed);
        self.on_probation.store(true, Ordering::Relaxed);
        self.stats.record_ejection();
        length
    }

    /// Takes one of the backend's slots, unless it holds its limit of unanswered calls or its
    /// cap of streams already; the returned guard frees the slot (and wakes the head of the
    /// cluster's queue) when dropped.
    pub(super) fn try_start_stream(self: &Arc<Self>, now_ms: u64) -> Option<InFlight> {
        let policy = &self.queue.policy;
        let (cap, admitted) = (policy.cap(), self.limit.admitted(policy));
        let load = (self.limit.try_take(admitted)).or_else(|| self.limit.try_exceed(policy))?;
        let within_cap = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            });
        if within_cap.is_err() {
            // No wakeup for this release: a waiter that picks and fails here would wake
            // itself, round and round. (A call that looked during this moment waits for the
            // next slot freed instead.)
            self.limit.release();
            return None;
        }
        Some(InFlight {
            backend: Arc::clone(self),
            picked_ms: now_ms,
            pending: None,
            load,
            answered: false,
        })
    }

    /// Below its cap of streams, and below its limit of unanswered calls or with room for
    /// one more by the pace of its answers (limit.rs, `try_exceed`).
    pub(super) fn has_room(&self) -> bool {
        let policy = &self.queue.policy;
        // SeqCst, as the writes (see `SlotQueue::len`).
        self.in_flight.load(Ordering::SeqCst) < policy.cap() && self.limit.has_room(policy)
    }

    /// How many unanswered calls it may hold now (`concurrency_limit`).
    pub fn concurrency_limit(&self) -> u64 {
        self.limit.admitted(&self.queue.policy)
    }

    /// Calls sent to it and not answered yet.
    pub fn unanswered(&self) -> u64 {
        self.limit.awaiting()
    }

    /// The limit as last reported and now, when it has halved or doubled since (for the log).
    pub(super) fn limit_moved(&self) -> Option<(u64, u64)> {
        self.limit.moved(&self.queue.policy)
    }

    /// Teaches the concurrency limit how an attempt went, at `now_ns` ([`clock_ns`]): `load`
    /// is what the attempt's [`InFlight::load`] said. A limit that grew lets as many waiting
    /// calls in.
    ///
    /// [`clock_ns`]: super::clock_ns
    pub fn observe_limit(&self, sample: Sample, load: u64, method: &MethodLatency, now_ns: u64) {
        let policy = &self.queue.policy;
        let grown = self.limit.observe(sample, load, method, policy, now_ns);
        for _ in 0..grown.min(self.queue.len() as u64) {
            self.queue.slot_freed();
        }
    }

    /// Records the time from sending the request to the backend's response headers, at
    /// `now_ns` ([`clock_ns`]), against `method`'s typical latency across the cluster, which
    /// this observation updates too (and its fast-answer latency).
    ///
    /// [`clock_ns`]: super::clock_ns
    pub fn observe_latency(&self, rtt: Duration, method: &MethodLatency, now_ns: u64) {
        self.latency.observe(rtt);
        self.score
            .observe_at(ratio_to_baseline(&method.baseline, rtt), now_ns);
        follow_fastest(method, rtt, now_ns);
    }

    /// The backend failed a call (a server-side failure code or reset from it, or a deadline
    /// that passed while it held the call): to the balancer that is the worst latency, so a
    /// backend that fails fast never looks attractive.
    pub fn observe_failure(&self) {
        self.score.observe_failure();
    }

    /// Marks the backend picked; returns whether it had not been for `PROBE_AFTER_MS` (only
    /// one caller sees true per interval).
    pub(super) fn take_pick(&self, now_ms: u64) -> bool {
        let last = self.last_pick_ms.swap(now_ms, Ordering::Relaxed);
        now_ms.saturating_sub(last) >= PROBE_AFTER_MS
    }

    /// True when not picked for `PROBE_AFTER_MS`: the next draw should take it.
    pub(super) fn due_for_probe(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_pick_ms.load(Ordering::Relaxed)) >= PROBE_AFTER_MS
    }

    /// A connect failed: back off from this backend, and weigh it down for p2c once the
    /// backoff ends, until it answers again. Returns true when this turned it unhealthy.
    pub fn connect_failed(&self) -> bool {
        let streak = self.connect_streak.fetch_add(1, Ordering::Relaxed);
        let times = u32::try_from(streak).unwrap_or(u32::MAX);
        let backoff = crate::pace::doubled(BASE_CONNECT_BACKOFF, times, MAX_CONNECT_BACKOFF);
        self.skip_until_ms
            .store(clock_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
        self.observe_failure();
        streak == 0
    }

    /// A connect succeeded. Returns true when this turned it healthy again.
    pub fn connect_succeeded(&self) -> bool {
        // A load first: the swap (a write to a shared line) only when there was a streak.
        if self.connect_streak.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let was_down = self.connect_streak.swap(0, Ordering::Relaxed) != 0;
        if was_down {
            self.skip_until_ms.store(0, Ordering::Relaxed);
            // Its failures said nothing about how it serves now.
            self.score.reset();
        }
        was_down
    }

    /// The peak-EWMA latency estimate, in nanoseconds.
    pub(super) fn latency_nanos(&self) -> f64 {
        self.latency.estimate_nanos()
    }

    /// How slow the balancer judges it at `now_ns`: its score (its recent calls against their
    /// methods' typical latency; 1.0 is typical, a failure counts 1000) or, when worse, the
    /// wait of its calls while it answers nothing.
    pub(super) fn latency_judgement(&self, now_ns: u64) -> f64 {
        self.score(now_ns).max(self.stall(now_ns))
    }

    /// The score alone.
    pub(super) fn score(&self, now_ns: u64) -> f64 {
        self.score.get(now_ns)
    }

    /// Most of its recent calls failed (not merely were slow), as lately observed.
    pub(super) fn failing(&self, now_ns: u64) -> bool {
        self.score.failing(now_ns)
    }

    /// The stall alone: how long its calls have waited while it answered nothing, against
    /// their methods' typical latency (`Pending::stall`).
    pub(super) fn stall(&self, now_ns: u64) -> f64 {
        self.pending.stall(now_ns / 1_000_000)
    }

    /// The p2c cost at `now_ns`: (latency score × load) squared, over the weight. Lower is
    /// better. The score is the worse of the answered calls' score and the wait of the calls
    /// still pending, so a backend that stops answering loses traffic before its first slow
    /// answer (as Finagle's and Linkerd's peak EWMA count pending time).
    /// Squared so the proportional choice stays near even between backends within noise
    /// (scores 1.05 and 1.0: 48% / 52%) but leaves a backend 60 times slower one draw in
    /// 3,600, not one in 60 (in the incident replay the linear choice still sent 1% of calls
    /// to a backend 500 ms slower, which put those 500 ms in the p99), and so in-flight counts
    /// balance firmly under concurrency. The weight stays linear: at low load shares follow
    /// weights exactly; under heavy concurrency, calls in flight follow the square root of
    /// the weights (docs/configuration.md, "Balancers").
    /// The load is also scaled by how full the backend is against its concurrency limit,
    /// `limit / (limit - unanswered)`: 1 when idle, 2 at half its limit, and the limit itself
    /// when full, so a backend near its limit is a worse pick than its in-flight count says.
    pub(super) fn cost(&self, now_ns: u64) -> f64 {
        let score = self.latency_judgement(now_ns);
        let limit = self.limit.value(&self.queue.policy);
        let headroom = (limit - self.limit.awaiting() as f64).max(1.0);
        let load = score * (self.in_flight() as f64 + 1.0) * (limit / headroom);
        load * load / self.weight() as f64
    }

    /// What `/metrics` shows of the backend's live state.
    pub fn gauges(&self) -> BackendGauges {
        BackendGauges {
            in_flight: self.in_flight(),
            concurrency_limit: self.concurrency_limit(),
            up: self.state() == BackendState::Healthy,
            connections: self.transport.connections(),
            // The weight picks use: none while drained, so a drained backend's missing
            // traffic is not a skewed share (SluiceBackendTrafficShareSkewed).
            weight: if self.is_drained() { 0 } else { self.weight() },
        }
    }

    /// What `/backends` shows of it; `mark` is left for the cluster, which sees its peers
    /// (marks.rs).
    pub fn snapshot(&self) -> BackendSnapshot {
        let recent = self.stats.recent_rates();
        let now = clock_ms();
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        BackendSnapshot {
            ejected_for_ms: (until > now).then(|| until - now),
            rps: recent.per_second,
            error_ratio: recent.error_ratio,
            recent_requests: recent.requests,
            mark: None,
            address: self.address.to_string(),
            state: self.state(),
            in_flight: self.in_flight(),
            unanswered: self.unanswered(),
            concurrency_limit: self.concurrency_limit(),
            ewma_latency_ms: self.latency_nanos() / 1e6,
            requests: self.stats.requests(),
            failures: self.stats.failures(),
            weight: self.weight(),
            source: self.source,
            upstream_connections: self.transport.connections(),
        }
    }
}

/// One in-flight stream on a backend; dropping it ends the stream's share of the load.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
    /// When the balancer picked the backend (ms on its clock).
    picked_ms: u64,
    /// The backend's `Pending` slot while the request awaits its response headers.
    pending: Option<usize>,
    /// The backend's unanswered calls when it was picked, this one included.
    load: u64,
    /// The response headers came: the call no longer counts against the concurrency limit.
    answered: bool,
}

impl InFlight {
    /// The backend's unanswered calls when it was picked, this one included: whether it
    /// answered under light or heavy load (limit.rs).
    pub fn load(&self) -> u64 {
        self.load
    }

    /// The request went out: until `answered`, its age counts against the backend once it
    /// passes `baseline`, its method's typical latency across the cluster.
    pub fn sent(&mut self, method: &MethodLatency) {
        self.pending = self.backend.pending.start(self.picked_ms, &method.baseline);
    }

    /// The response headers came, `after` the attempt began (right after the pick): the
    /// call no longer waits, and the backend has answered.
    pub fn answered(&mut self, after: Duration) {
        if let Some(slot) = self.pending.take() {
            self.backend.pending.end(slot);
        }
        let at = self.picked_ms + after.as_millis() as u64;
        self.backend.pending.answered(at);
        self.release_unanswered();
    }

    /// Frees the call's place under the concurrency limit unless it was freed already;
    /// returns whether this call freed it.
    fn release_once(&mut self) -> bool {
        let first = !self.answered;
        if first {
            self.answered = true;
            self.backend.limit.release();
        }
        first
    }

    /// Frees the call's place under the concurrency limit, once, and lets a waiting call in
    /// when that place is what it waits for: the limit is learned, and the stream slot the
    /// call still holds is not the one missing.
    fn release_unanswered(&mut self) {
        if !self.release_once() {
            return;
        }
        let backend = &self.backend;
        let policy = &backend.queue.policy;
        if policy.is_adaptive() && backend.in_flight.load(Ordering::SeqCst) < policy.cap() {
            backend.queue.slot_freed();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(slot) = self.pending.take() {
            self.backend.pending.end(slot);
        }
        let unanswered = self.release_once();
        // SeqCst: pairs with the queue's length (queue.rs).
        let streams = self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        // One wakeup per slot a waiter can use: an answered call freed its place under the
        // learned limit already, and its stream slot then matters only at the cap. (A useless
        // wakeup costs the woken waiter a pick.)
        let policy = &self.backend.queue.policy;
        if unanswered || streams >= policy.cap() || !policy.is_adaptive() {
            self.backend.queue.slot_freed();
        }
    }
}

/// What `/backends` shows of one backend.
#[derive(Debug, Serialize)]
pub struct BackendSnapshot {
    pub address: String,
    pub state: BackendState,
    /// While ejected: how long until it takes calls again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub in_flight: u64,
    /// Of those, the calls the backend has not answered yet (what `concurrency_limit` bounds).
    pub unanswered: u64,
    /// How many unanswered calls it may hold now: learned by `adaptive_concurrency`, else
    /// `max_concurrent_streams_per_backend`.
    pub concurrency_limit: u64,
    pub ewma_latency_ms: f64,
    /// Attempts on this backend: requests sent, plus connects that failed.
    pub requests: u64,
    /// Of those, the ones that failed on the server side: a failure code (UNKNOWN,
    /// DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS) or a failed connect.
    pub failures: u64,
    pub weight: u32,
    pub source: SourceKind,
    pub upstream_connections: usize,
    /// Attempts per second over about the last 10 s.
    pub rps: f64,
    /// The share of those attempts that failed (0 to 1).
    pub error_ratio: f64,
    /// How many attempts those two rates are over: their sample size.
    pub recent_requests: u64,
    /// Why it stands out from its peers, if it does (marks.rs); the status page's badge.
    pub mark: Option<Mark>,
}
