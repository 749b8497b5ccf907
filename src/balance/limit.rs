//! Each backend's adaptive concurrency limit (`adaptive_concurrency`): how many calls it may
//! hold unanswered, learned from how fast it answers.
//!
//! The limit counts *unanswered* calls: sent, response headers not yet come. That is the work a
//! backend has queued or running; a stream that has answered and now streams for hours does not
//! count (`max_concurrent_streams_per_backend`, the ceiling, counts every stream).
//!
//! The rule follows Netflix's Gradient2 (the limit moves by `tolerance × light-load latency /
//! recent latency`, between 0.5 and 1, plus a small term that lets it grow while answers stay
//! fast), with these differences:
//! - Each answer's latency is compared with its own method's latency under light load, so fast
//!   and slow methods mix freely, and a backend is judged against its own usual level, so a
//!   slower machine is not mistaken for an overloaded one.
//! - Only answers given under light load (the backend held at most half its limit, or only the
//!   call answered) teach that level, so a long overload cannot teach it that slow is normal.
//!   The first ones count more the lighter their load, so a backend that fills up as it starts
//!   is judged by its first, fast answers.
//! - Every answer moves the limit a `1/load` part of a step, so it moves one step per round of
//!   answers whatever the load: fast enough to catch a backend filling up, slow enough not to
//!   overshoot while answers already on their way still say the old limit's story.
//! - RESOURCE_EXHAUSTED from the backend before any response message, or a deadline that
//!   passes before it answers, counts as the worst latency.
//! - Under light load, the limit only comes down, or climbs back towards `initial_limit`: a
//!   limit cut in an overload recovers within seconds, and grows past its start only when
//!   calls need it.
//! - A call may go past the limit, raising it, when the pace of the backend's answers shows
//!   room for it (`try_exceed`): a generous start that costs nothing when the backend keeps
//!   up, and calls that hold for long before answering (long polls) are never held back
//!   waiting for answers to grow the limit.
//!
//! There is no probe window that drops the limit on a timer. The state is atomics; racing
//! answers may lose an update, which a lock on every answer would cost more than it is worth.
//! How the constants were chosen: `loadtest/RESULTS.md`, "Overload of the whole service".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::ewma::clock_ns;
use crate::config::{AdaptiveConcurrency, AdaptiveSettings, ClusterConfig};
use crate::telemetry::{LightLoad, MethodLatency};

/// Latency differences below this are noise on a shared machine: added to both sides of each
/// comparison, as the balancer's score does (ewma.rs).
const NOISE_FLOOR_NS: f64 = 5e6;

/// The weight of one answer in the recent level: about the last four answers.
const RECENT_WEIGHT: f64 = 0.25;

/// The first this-many light-load answers set a level as their mean, each weighted by
/// 1/load²...
const START_SAMPLES: u32 = 64;
/// ...then it follows answers over about this long, one answer moving it at most
/// `LEARN_MAX_WEIGHT`.
const LEARN_TIME_NS: f64 = 10e9;
const LEARN_MAX_WEIGHT: f64 = 0.125;
const LEARN_EVERY_NS: u64 = 1_000_000;

/// The limit's growth term is this times √limit, and at least one call.
const GROWTH: f64 = 0.5;

/// The weight of one answer in the interval between answers: about the last eight.
const INTERVAL_WEIGHT: f64 = 0.125;

/// The cluster's limits, shared by its backends and its queue, and set again on reload:
/// `max_concurrent_streams_per_backend` and the `adaptive_concurrency` settings.
#[derive(Debug)]
pub struct LimitPolicy {
    /// Streams one backend may hold at most, answered or not.
    cap: AtomicU64,
    adaptive: AtomicBool,
    min_limit: AtomicU64,
    initial_limit: AtomicU64,
    /// f64 bits.
    tolerance: AtomicU64,
}

impl LimitPolicy {
    pub fn new(config: &ClusterConfig) -> LimitPolicy {
        let policy = LimitPolicy {
            cap: AtomicU64::new(1),
            adaptive: AtomicBool::new(false),
            min_limit: AtomicU64::new(1),
            initial_limit: AtomicU64::new(1),
            tolerance: AtomicU64::new(2f64.to_bits()),
        };
        policy.set(config);
        policy
    }

    /// Takes a (reloaded) cluster's settings; returns whether any changed.
    pub fn set(&self, config: &ClusterConfig) -> bool {
        let before = self.settings();
        let cap = u64::from(config.max_concurrent_streams_per_backend.0);
        let settings = match config.adaptive_concurrency {
            AdaptiveConcurrency::On(settings) => Some(settings),
            AdaptiveConcurrency::Off => None,
        };
        let AdaptiveSettings {
            min_limit,
            initial_limit,
            tolerance,
        } = settings.unwrap_or_default();
        // A floor above the ceiling is the ceiling: `max_concurrent_streams_per_backend: 1`
        // keeps meaning one call at a time.
        let min = u64::from(min_limit.0).min(cap);
        self.min_limit.store(min, Ordering::Relaxed);
        let initial = u64::from(initial_limit.0).clamp(min, cap);
        self.initial_limit.store(initial, Ordering::Relaxed);
        self.tolerance
            .store(tolerance.0.to_bits(), Ordering::Relaxed);
        self.adaptive.store(settings.is_some(), Ordering::Relaxed);
        self.cap.store(cap, Ordering::SeqCst);
        self.settings() != before
    }

    /// Everything `set` sets, to tell a change.
    fn settings(&self) -> (u64, bool, u64, u64, u64) {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        (
            load(&self.cap),
            self.is_adaptive(),
            load(&self.min_limit),
            load(&self.initial_limit),
            load(&self.tolerance),
        )
    }

    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    pub fn is_adaptive(&self) -> bool {
        self.adaptive.load(Ordering::Relaxed)
    }

    fn bounds(&self) -> (f64, f64) {
        let min = self.min_limit.load(Ordering::Relaxed) as f64;
        (min, (self.cap() as f64).max(min))
    }

    fn initial(&self) -> f64 {
        self.initial_limit.load(Ordering::Relaxed) as f64
    }

    fn tolerance(&self) -> f64 {
        f64::from_bits(self.tolerance.load(Ordering::Relaxed))
    }
}

/// How one answered attempt went, for the limit.
#[derive(Debug, Clone, Copy)]
pub enum Sample {
    /// Response headers after this long (ns).
    Answered(f64),
    /// RESOURCE_EXHAUSTED from the backend before any message, or the deadline passed before
    /// it answered.
    Dropped,
}

/// One backend's unanswered calls and the limit on them.
#[derive(Debug)]
pub(super) struct AdaptiveLimit {
    /// Calls picked for this backend whose response headers have not come (nor the call
    /// ended); what the limit bounds.
    awaiting: AtomicU64,
    /// The limit, f64 bits; the whole part is what calls are admitted under.
    limit: AtomicU64,
    /// The backend's recent latency against its methods' light-load latency, a ratio (f64
    /// bits; 1.0 is as fast as light load).
    recent: AtomicU64,
    /// The same ratio under light load: this backend's own level (a slower machine has a
    /// higher one, and is judged against it). 1.0 until learned.
    calm: LightLoad,
    /// Its latency under light load, all methods together (ns), and the time between its
    /// answers lately (f64 ns bits, 0 until two answers came) and its last answer: by
    /// Little's law, one more call would take about `(unanswered + 1) × interval`.
    calm_rtt: LightLoad,
    interval: AtomicU64,
    last_answer_ns: AtomicU64,
    /// The admitted count the log last reported (shedding.rs).
    reported: AtomicU64,
}

impl AdaptiveLimit {
    pub(super) fn new(policy: &LimitPolicy) -> AdaptiveLimit {
        AdaptiveLimit {
            awaiting: AtomicU64::new(0),
            limit: AtomicU64::new(policy.initial().to_bits()),
            recent: AtomicU64::new(1f64.to_bits()),
            calm: LightLoad::default(),
            calm_rtt: LightLoad::default(),
            interval: AtomicU64::new(0),
            last_answer_ns: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        }
    }

    /// The admitted count as last reported and now, when it has halved or doubled since; it
    /// counts as reported then.
    /// (The first look only takes note.)
    pub(super) fn moved(&self, policy: &LimitPolicy) -> Option<(u64, u64)> {
        if !policy.is_adaptive() {
            return None;
        }
        let now = self.admitted(policy);
        let was = self.reported.load(Ordering::Relaxed);
        let moved = was != 0 && (now * 2 <= was || now >= was * 2);
        if was == 0 || moved {
            self.reported.store(now, Ordering::Relaxed);
        }
        moved.then_some((was, now))
    }

    pub(super) fn awaiting(&self) -> u64 {
        self.awaiting.load(Ordering::Relaxed)
    }

    /// Whether one more unanswered call would be taken now, by `try_take` or `try_exceed`.
    pub(super) fn has_room(&self, policy: &LimitPolicy) -> bool {
        // SeqCst: ordered with the queue's length (see `SlotQueue::len`).
        let awaiting = self.awaiting.load(Ordering::SeqCst);
        awaiting < self.admitted(policy) || self.may_exceed(awaiting + 1, policy)
    }

    /// The limit as it stands, within the policy's bounds (the ceiling when adaptive
    /// concurrency is off).
    pub(super) fn value(&self, policy: &LimitPolicy) -> f64 {
        if !policy.is_adaptive() {
            return policy.cap() as f64;
        }
        let (min, max) = policy.bounds();
        f64::from_bits(self.limit.load(Ordering::Relaxed)).clamp(min, max)
    }

    /// The whole calls admitted: at least one.
    pub(super) fn admitted(&self, policy: &LimitPolicy) -> u64 {
        (self.value(policy) as u64).max(1)
    }

    /// Takes an unanswered-call slot unless `admitted` are taken; returns the number taken,
    /// this one included.
    pub(super) fn try_take(&self, admitted: u64) -> Option<u64> {
        // SeqCst: pairs with the queue's length, as the in-flight count does (queue.rs).
        self.awaiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < admitted).then_some(n + 1)
            })
            .ok()
            .map(|n| n + 1)
    }

    /// A call answered or ended: its slot is free.
    pub(super) fn release(&self) {
        self.awaiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Takes a slot past the limit when the backend's answers show room for one more call:
    /// at the pace it answers, one more would still be answered within `tolerance` of its
    /// light-load latency (or it has not answered twice yet). Demand the latency does not
    /// object to raises the limit at once, so calls that hold for long without answering
    /// (long polls) are not held back waiting for answers to grow it. Returns the load, this
    /// call included.
    pub(super) fn try_exceed(&self, policy: &LimitPolicy) -> Option<u64> {
        let load = self.awaiting() + 1;
        if !self.may_exceed(load, policy) {
            return None;
        }
        self.awaiting.fetch_add(1, Ordering::SeqCst);
        let raised = (load as f64).min(policy.cap() as f64);
        let current = f64::from_bits(self.limit.load(Ordering::Relaxed));
        self.limit
            .store(current.max(raised).to_bits(), Ordering::Relaxed);
        Some(load)
    }

    /// Whether a `load`-th unanswered call, past the limit, would still be answered in time
    /// (see `try_exceed`); never with the limit fixed (`adaptive_concurrency: off`).
    fn may_exceed(&self, load: u64, policy: &LimitPolicy) -> bool {
        if !policy.is_adaptive() {
            return false;
        }
        let interval = f64::from_bits(self.interval.load(Ordering::Relaxed));
        if interval <= 0.0 || self.calm_rtt.samples.load(Ordering::Relaxed) == 0 {
            return true;
        }
        // A backend that stopped answering has no room, however fast it answered before.
        let silent = clock_ns().saturating_sub(self.last_answer_ns.load(Ordering::Relaxed));
        let pace = interval.max(silent as f64);
        let calm_rtt = f64::from_bits(self.calm_rtt.mean.load(Ordering::Relaxed));
        load as f64 * pace <= policy.tolerance() * (calm_rtt + NOISE_FLOOR_NS)
    }

    /// Learns from one attempt that held `load` unanswered calls on this backend when it was
    /// picked (itself included), of `method`, ended at `now` (ns on the balancer's clock).
    /// Returns by how many calls the admitted count grew.
    pub(super) fn observe(
        &self,
        sample: Sample,
        load: u64,
        method: &MethodLatency,
        policy: &LimitPolicy,
        now: u64,
    ) -> u64 {
        if !policy.is_adaptive() {
            return 0;
        }
        let limit = self.value(policy);
        let load = load.max(1) as f64;
        let target = match sample {
            Sample::Dropped => limit * 0.5 + growth(limit),
            Sample::Answered(rtt) => self.target(rtt, load, limit, method, policy, now),
        };
        // A `1/load` part of the step: one whole step per round of answers.
        let next = limit + (target - limit) / load;
        let (min, max) = policy.bounds();
        let next = next.clamp(min, max);
        self.limit.store(next.to_bits(), Ordering::Relaxed);
        (next as u64).saturating_sub(limit as u64)
    }

    /// Times the answer that came at `now`, for the pace of answers.
    fn answered_at(&self, now: u64) {
        let last = self.last_answer_ns.swap(now, Ordering::Relaxed);
        if last == 0 {
            return;
        }
        let since = now.saturating_sub(last) as f64;
        let weight = match f64::from_bits(self.interval.load(Ordering::Relaxed)) {
            0.0 => 1.0,
            _ => INTERVAL_WEIGHT,
        };
        ewma(&self.interval, since, weight);
    }

    /// Where an answer in `rtt` ns at `load`, at `now`, says the limit should go (see the
    /// module doc).
    fn target(
        &self,
        rtt: f64,
        load: f64,
        limit: f64,
        method: &MethodLatency,
        policy: &LimitPolicy,
        now: u64,
    ) -> f64 {
        self.answered_at(now);
        let typical = mean_or(&method.light_load, rtt);
        let ratio = (rtt + NOISE_FLOOR_NS) / (typical + NOISE_FLOOR_NS);
        let recent = ewma(&self.recent, ratio, RECENT_WEIGHT);
        // At most half the limit, and always a lone call: the backend holds no queue of ours.
        let light = load <= (limit / 2.0).max(1.0);
        if light {
            learn(&method.light_load, rtt, load, now);
            learn(&self.calm, ratio, load, now);
            learn(&self.calm_rtt, rtt, load, now);
        }
        let calm = mean_or(&self.calm, 1.0);
        let gradient = (policy.tolerance() * calm / recent).clamp(0.5, 1.0);
        let target = limit * gradient + growth(limit);
        match light {
            // Light load says nothing of what more calls would do: no growth past the start.
            true => target.min(limit.max(policy.initial())),
            false => target,
        }
    }
}

fn growth(limit: f64) -> f64 {
    (GROWTH * limit.sqrt()).max(1.0)
}

/// Moves the f64 in `value` a `weight` of the way to `sample`; returns the new value.
fn ewma(value: &AtomicU64, sample: f64, weight: f64) -> f64 {
    let current = f64::from_bits(value.load(Ordering::Relaxed));
    let next = current + weight * (sample - current);
    value.store(next.to_bits(), Ordering::Relaxed);
    next
}

/// The mean `light` has learned, or `otherwise` before its first sample.
fn mean_or(light: &LightLoad, otherwise: f64) -> f64 {
    match light.samples.load(Ordering::Relaxed) {
        0 => otherwise,
        _ => f64::from_bits(light.mean.load(Ordering::Relaxed)),
    }
}

/// Folds a light-load `value`, seen at `load`, into `light`: the first `START_SAMPLES` as a
/// mean weighted by 1/load², then over `LEARN_TIME_NS`, at most once a millisecond (a skipped
/// answer's time goes to the next one's weight), so busy backends do not write these shared
/// words on every answer.
fn learn(light: &LightLoad, value: f64, load: f64, now: u64) {
    let samples = light.samples.load(Ordering::Relaxed);
    let weight = if samples < START_SAMPLES {
        light.samples.store(samples + 1, Ordering::Relaxed);
        light.updated_ns.store(now, Ordering::Relaxed);
        let own = 1.0 / (load * load);
        let total = f64::from_bits(light.weight.load(Ordering::Relaxed)) + own;
        light.weight.store(total.to_bits(), Ordering::Relaxed);
        own / total
    } else {
        let elapsed = now.saturating_sub(light.updated_ns.load(Ordering::Relaxed));
        if elapsed < LEARN_EVERY_NS {
            return;
        }
        light.updated_ns.store(now, Ordering::Relaxed);
        (elapsed as f64 / LEARN_TIME_NS).min(LEARN_MAX_WEIGHT)
    };
    ewma(&light.mean, value, weight);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    fn policy(extra: &str) -> LimitPolicy {
        let yaml = format!(
            "listeners: [{{name: l, address: \"127.0.0.1:1\"}}]\nclusters: [{{name: c, discovery: {{static: [\"a:1\"]}}{extra}}}]"
        );
        let config = crate::config::Config::parse(&yaml, "t").unwrap();
        LimitPolicy::new(&config.clusters[0])
    }

    /// `n` answers in `rtt_ms` of `method`, each given at `load` (`None`: at the limit, as
    /// when calls wait for it).
    fn answers(
        limit: &AdaptiveLimit,
        policy: &LimitPolicy,
        method: &MethodLatency,
        (rtt_ms, load, n): (f64, Option<u64>, usize),
    ) {
        for _ in 0..n {
            let load = load.unwrap_or_else(|| limit.admitted(policy));
            limit.observe(
                Sample::Answered(rtt_ms * MS),
                load,
                method,
                policy,
                clock_ns(),
            );
        }
    }

    #[test]
    fn a_backend_that_slows_under_load_is_limited_and_climbs_back() {
        let (p, m) = (policy(""), MethodLatency::default());
        let limit = AdaptiveLimit::new(&p);
        // Light load, 25 ms: what the backend's usual latency is.
        answers(&limit, &p, &m, (25.0, Some(1), 20));
        assert_eq!(limit.admitted(&p), 20);
        // Full, and four times slower: the limit comes down, not below the floor.
        answers(&limit, &p, &m, (100.0, None, 100));
        let low = limit.admitted(&p);
        assert!((3..8).contains(&low), "{low}");
        // As fast as usual again, with calls waiting: it grows back, by about √limit/2 a
        // round of answers (here some 15 rounds, a few hundred milliseconds).
        answers(&limit, &p, &m, (25.0, None, 200));
        assert!(limit.admitted(&p) >= 20, "{}", limit.admitted(&p));
    }

    #[test]
    fn answers_within_tolerance_never_bring_it_down() {
        let (p, m) = (policy(""), MethodLatency::default());
        let limit = AdaptiveLimit::new(&p);
        answers(&limit, &p, &m, (25.0, Some(2), 20));
        // Full, and 1.5 times the usual latency: growing, not shrinking.
        answers(&limit, &p, &m, (37.0, None, 200));
        assert!(limit.admitted(&p) > 20, "{}", limit.admitted(&p));
    }

    #[test]
    fn each_method_is_judged_against_its_own_latency() {
        let p = policy("");
        let (fast, slow) = (MethodLatency::default(), MethodLatency::default());
        let limit = AdaptiveLimit::new(&p);
        for _ in 0..10 {
            answers(&limit, &p, &fast, (1.0, Some(1), 1));
            answers(&limit, &p, &slow, (300.0, Some(1), 1));
        }
        // A mix of 1 ms and 300 ms calls under load is each method at its usual speed.
        for _ in 0..100 {
            answers(&limit, &p, &fast, (1.0, None, 1));
            answers(&limit, &p, &slow, (300.0, None, 1));
        }
        assert!(limit.admitted(&p) >= 20, "{}", limit.admitted(&p));
    }

    #[test]
    fn a_slower_machine_is_judged_against_its_own_level() {
        let (p, m) = (policy(""), MethodLatency::default());
        let (quick, slow) = (AdaptiveLimit::new(&p), AdaptiveLimit::new(&p));
        for _ in 0..20 {
            answers(&quick, &p, &m, (10.0, Some(1), 1));
            answers(&slow, &p, &m, (40.0, Some(1), 1));
        }
        // Four times slower than its peer, as it always is: not overloaded.
        answers(&slow, &p, &m, (40.0, None, 100));
        assert!(slow.admitted(&p) >= 20, "{}", slow.admitted(&p));
    }

    #[test]
    fn drops_cut_the_limit() {
        let (p, m) = (policy(""), MethodLatency::default());
        let limit = AdaptiveLimit::new(&p);
        for _ in 0..20 {
            limit.observe(Sample::Dropped, 20, &m, &p, clock_ns());
        }
        assert!(limit.admitted(&p) <= 14, "{}", limit.admitted(&p));
    }

    #[test]
    fn the_pace_of_answers_tells_whether_one_more_call_fits() {
        let (p, m) = (policy(""), MethodLatency::default());
        let limit = AdaptiveLimit::new(&p);
        // No answers yet: nothing says there is no room.
        assert!(limit.may_exceed(1000, &p));
        answers(&limit, &p, &m, (25.0, Some(1), 3));
        assert!(limit.may_exceed(2, &p));
        // Silent for longer than twice its usual latency: no room, however fast it was.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!limit.may_exceed(1, &p));
        assert_eq!(limit.try_exceed(&p), None);
    }

    #[test]
    fn off_keeps_the_cap_and_bounds_hold() {
        let (off, m) = (
            policy(", max_concurrent_streams_per_backend: 7, adaptive_concurrency: off"),
            MethodLatency::default(),
        );
        let limit = AdaptiveLimit::new(&off);
        answers(&limit, &off, &m, (500.0, None, 50));
        assert_eq!(limit.admitted(&off), 7);
        assert!(!limit.may_exceed(8, &off) && limit.try_exceed(&off).is_none());
        // A ceiling below the floor and the start: one call at a time means one.
        let one = policy(", max_concurrent_streams_per_backend: 1");
        assert_eq!(AdaptiveLimit::new(&one).admitted(&one), 1);
    }
}
