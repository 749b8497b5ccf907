//! The balancer's latency estimates: each backend's [`Score`] against its calls' method
//! baselines and the wait of its [`Pending`] calls (what `p2c_ewma` picks by), the peak-EWMA
//! latency that `/backends` shows, and the monotonic clock their atomics share.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::telemetry::MethodLatency;

/// A slower observation is taken at once (the peak); a faster one is blended in with a weight
/// that grows with the time since the last. The estimate also decays while nothing is
/// observed, so a backend that was slow once gets probed again later instead of being starved
/// forever.
#[derive(Debug)]
pub(super) struct PeakEwma {
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
    pub(super) fn new() -> PeakEwma {
        PeakEwma {
            estimate: AtomicU64::new(EWMA_INITIAL_NS.to_bits()),
            updated_ns: AtomicU64::new(clock_ns()),
        }
    }

    pub(super) fn observe(&self, rtt: Duration) {
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

    pub(super) fn estimate_nanos(&self) -> f64 {
        self.estimate_at(clock_ns())
    }

    fn estimate_at(&self, now: u64) -> f64 {
        let value = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let idle = now.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        value * (-idle / EWMA_DECAY_NS).exp()
    }
}

/// Nanoseconds since the balancer first looked at the clock: the time the balancer's
/// observations are stamped with.
pub fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub(super) fn clock_ms() -> u64 {
    clock_ns() / 1_000_000
}

// === latency score ===

/// Latency differences smaller than this are noise on a shared machine: it is added to both
/// sides of every ratio, so 0.3 ms against 0.6 ms compares as 5.3 against 5.6, not as 1 to 2.
const NOISE_FLOOR_NS: f64 = 5e6;

/// A failed call, as a ratio: far worse than any latency a backend could show.
const FAILURE_RATIO: f32 = 1000.0;

/// The worst a latency can score, just under a failure: however slow an answer was, it is
/// not taken for a failure (the status page's `failing` mark reads failures apart).
const MAX_LATENCY_RATIO: f32 = FAILURE_RATIO - 1.0;

/// Calls a backend's score looks back over.
pub(super) const WINDOW: usize = 8;

/// The weight of one observation in a method's baseline; the baseline moves at most 2× per
/// observation, so a few long calls of a method barely move it.
const BASELINE_WEIGHT: f64 = 0.1;
const BASELINE_STEP: f64 = 2.0;

/// How fast an unobserved score returns to neutral (1.0): a backend avoided for a while is
/// judged afresh by its next calls.
const SCORE_DECAY_NS: f64 = 10e9;

/// Compares `rtt` with the typical latency of the same method across the cluster, `baseline`
/// (f64 nanoseconds as bits, 0 before the first observation), and folds `rtt` into it.
/// Returns the ratio: 1.0 is typical, 3.0 is three times slower than typical. Like is compared
/// with like: a slow method has a high baseline, so its calls do not make a backend look slow.
pub(super) fn ratio_to_baseline(baseline: &AtomicU64, rtt: Duration) -> f64 {
    let rtt = rtt.as_nanos() as f64;
    let typical = f64::from_bits(baseline.load(Ordering::Relaxed));
    if typical <= 0.0 {
        baseline.store(rtt.to_bits(), Ordering::Relaxed);
        return 1.0;
    }
    let step = rtt.min(typical * BASELINE_STEP);
    let next = typical + BASELINE_WEIGHT * (step - typical);
    // A lost race between two calls loses one observation; a lock here would serialise calls.
    baseline.store(next.to_bits(), Ordering::Relaxed);
    (rtt + NOISE_FLOOR_NS) / (typical + NOISE_FLOOR_NS)
}

/// How much the fast-answer latency rises with each slower answer: it follows the lower edge
/// of a method's latencies, so a share of slow calls (a batch caller of the same method) does
/// not make the fast ones look late, and a method that got slower for good is followed within
/// about a hundred answers.
const FASTEST_RISE: f64 = 1.02;

/// Without answers, the fast-answer latency halves this often: a method whose calls were all
/// refused (their deadlines shorter than it) is tried again, and taught afresh.
const FASTEST_HALF_LIFE_NS: f64 = 10e9;

/// Folds `rtt`, answered at `now_ns`, into a method's fast-answer latency: a faster answer takes
/// its place, a slower one raises it by 2% at most.
pub(super) fn follow_fastest(method: &MethodLatency, rtt: Duration, now_ns: u64) {
    let rtt = rtt.as_nanos() as f64;
    let current = f64::from_bits(method.fastest.load(Ordering::Relaxed));
    let next = match current {
        0.0 => rtt,
        current => rtt.min(current * FASTEST_RISE),
    };
    if next != current {
        method.fastest.store(next.to_bits(), Ordering::Relaxed);
        method.fastest_updated_ns.store(now_ns, Ordering::Relaxed);
    }
}

/// How long `method`'s fast answers take now (zero until its first answer): what deadline-aware
/// admission compares a call's remaining time with.
pub fn fast_latency(method: &MethodLatency) -> Duration {
    fast_latency_at(method, clock_ns())
}

fn fast_latency_at(method: &MethodLatency, now_ns: u64) -> Duration {
    let fastest = f64::from_bits(method.fastest.load(Ordering::Relaxed));
    let idle = now_ns.saturating_sub(method.fastest_updated_ns.load(Ordering::Relaxed));
    let decay = match idle as f64 / FASTEST_HALF_LIFE_NS {
        halvings if halvings < 0.1 => 1.0,
        halvings => 0.5f64.powf(halvings),
    };
    Duration::from_nanos((fastest * decay) as u64)
}

/// A backend's latency score: the lower median of its last `WINDOW` calls' ratios to their
/// methods' baselines (a failure counts as `FAILURE_RATIO`). A minority of long calls (up to
/// 4 of 8) leaves it where the rest put it; a backend slow or failing on most of its calls
/// takes their value. 1.0 is neutral. It decays back towards 1.0 while the backend is not
/// observed.
#[derive(Debug)]
pub(super) struct Score {
    /// f32 ratios, as bits: a ring the next observation overwrites at `next % WINDOW`.
    samples: [AtomicU32; WINDOW],
    next: AtomicUsize,
    /// The lower median of `samples` (f64 as bits), computed when a sample arrives.
    median: AtomicU64,
    updated_ns: AtomicU64,
}

impl Score {
    pub(super) fn new() -> Score {
        let score = Score {
            samples: Default::default(),
            next: AtomicUsize::new(0),
            median: AtomicU64::new(0),
            updated_ns: AtomicU64::new(0),
        };
        score.reset();
        score
    }

    /// Records one call's ratio. Racing calls may overwrite each other's sample; that is
    /// tolerated, since a lock here would serialise every call on the backend.
    #[cfg(test)]
    pub(super) fn observe(&self, ratio: f64) {
        self.observe_at(ratio, clock_ns());
    }

    /// `observe`, at `now_ns` on the balancer's clock.
    pub(super) fn observe_at(&self, ratio: f64, now_ns: u64) {
        self.record((ratio as f32).min(MAX_LATENCY_RATIO), now_ns);
    }

    /// Puts one sample in the ring and takes the median again.
    fn record(&self, ratio: f32, now_ns: u64) {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % WINDOW;
        self.samples[slot].store(ratio.to_bits(), Ordering::Relaxed);
        let mut sorted = [0f32; WINDOW];
        for (value, sample) in sorted.iter_mut().zip(&self.samples) {
            *value = f32::from_bits(sample.load(Ordering::Relaxed));
        }
        sorted.sort_unstable_by(f32::total_cmp);
        let median = f64::from(sorted[WINDOW / 2 - 1]);
        self.median.store(median.to_bits(), Ordering::Relaxed);
        self.updated_ns.store(now_ns, Ordering::Relaxed);
    }

    /// A failed call: the worst sample.
    pub(super) fn observe_failure(&self) {
        self.record(FAILURE_RATIO, clock_ns());
    }

    /// Whether most of its last `WINDOW` calls failed (not merely were slow), as last
    /// observed within `SCORE_DECAY_NS` of `now_ns`.
    pub(super) fn failing(&self, now_ns: u64) -> bool {
        let median = f64::from_bits(self.median.load(Ordering::Relaxed));
        let idle = now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        median >= f64::from(FAILURE_RATIO) && idle < SCORE_DECAY_NS
    }

    /// Back to neutral: a backend that answers again after failing is judged afresh.
    pub(super) fn reset(&self) {
        for sample in &self.samples {
            sample.store(1f32.to_bits(), Ordering::Relaxed);
        }
        self.median.store(1f64.to_bits(), Ordering::Relaxed);
        self.updated_ns.store(clock_ns(), Ordering::Relaxed);
    }

    /// The score at `now_ns` (the balancer's clock), decayed towards neutral while unobserved.
    pub(super) fn get(&self, now_ns: u64) -> f64 {
        let value = f64::from_bits(self.median.load(Ordering::Relaxed));
        let idle = now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        // Skip the exp() while the score is fresh: under 10 ms, the decay is under 0.1%.
        if idle < 1e7 {
            return value;
        }
        1.0 + (value - 1.0) * (-idle / SCORE_DECAY_NS).exp()
    }
}

// === calls awaiting an answer ===

/// The resolution of a method's typical latency in a [`Pending`] slot.
const EXPECTED_UNIT_NS: u64 = 100_000;
/// Bits of a slot that hold the typical latency, in `EXPECTED_UNIT_NS` (up to ~28 minutes);
/// the bits above hold when the call was picked, in ms plus one (0 is a free slot).
const EXPECTED_BITS: u32 = 24;
const EXPECTED_MAX: u64 = (1 << EXPECTED_BITS) - 1;

/// Calls sent to a backend that have no response headers yet, up to `WINDOW` of them, and
/// when the backend last answered any call. Each slot packs when the call was picked and its
/// method's typical latency into one word, so a reader never mixes two calls.
///
/// What counts is how long a call has waited *while the backend answered nothing at all*
/// ([`Pending::stall`]): a stopped or wedged backend scores worse with every millisecond,
/// before its first slow answer, while a backend that holds one long call and keeps answering
/// the others is not slow.
#[derive(Debug, Default)]
pub(super) struct Pending {
    slots: [AtomicU64; WINDOW],
    /// When the backend last sent response headers (ms on the balancer's clock).
    last_answer_ms: AtomicU64,
}

impl Pending {
    /// Tracks one call picked at `picked_ms` whose method usually answers in `baseline`
    /// (f64 nanoseconds as bits, 0 when unknown). Returns its slot, or `None` when all are
    /// taken (the others are enough to judge by) or the method has no baseline yet (its
    /// first call could be a long poll: nothing says how long is late).
    pub(super) fn start(&self, picked_ms: u64, baseline: &AtomicU64) -> Option<usize> {
        let typical = f64::from_bits(baseline.load(Ordering::Relaxed));
        if typical <= 0.0 {
            return None;
        }
        let typical = (typical as u64 / EXPECTED_UNIT_NS).min(EXPECTED_MAX);
        let packed = (picked_ms + 1) << EXPECTED_BITS | typical;
        self.slots.iter().position(|slot| {
            slot.compare_exchange(0, packed, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// The call in `slot` ended.
    pub(super) fn end(&self, slot: usize) {
        self.slots[slot].store(0, Ordering::Relaxed);
    }

    /// The backend answered a call, tracked or not, at `at_ms`.
    pub(super) fn answered(&self, at_ms: u64) {
        // A load first: under load many answers share a millisecond.
        if self.last_answer_ms.load(Ordering::Relaxed) < at_ms {
            self.last_answer_ms.fetch_max(at_ms, Ordering::Relaxed);
        }
    }

    /// The worst wait among the tracked calls, as a ratio like `ratio_to_baseline`'s: the
    /// time a call has waited since it was picked or since the backend last answered anything,
    /// whichever is later, against its method's typical latency. 0 without calls waiting.
    pub(super) fn stall(&self, now_ms: u64) -> f64 {
        let last_answer = self.last_answer_ms.load(Ordering::Relaxed);
        let mut worst = 0f64;
        for slot in &self.slots {
            let packed = slot.load(Ordering::Relaxed);
            if packed == 0 {
                continue;
            }
            let picked_ms = (packed >> EXPECTED_BITS) - 1;
            let typical_ns = ((packed & EXPECTED_MAX) * EXPECTED_UNIT_NS) as f64;
            let silent_ns = now_ms.saturating_sub(picked_ms.max(last_answer)) as f64 * 1e6;
            worst = worst.max((silent_ns + NOISE_FLOOR_NS) / (typical_ns + NOISE_FLOOR_NS));
        }
        worst.min(f64::from(FAILURE_RATIO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minority_of_long_calls_leaves_a_score_and_a_majority_moves_it() {
        let score = Score::new();
        for _ in 0..4 {
            score.observe(500.0);
        }
        let now = clock_ns();
        assert_eq!(score.get(now), 1.0);
        score.observe(500.0);
        assert_eq!(score.get(now), 500.0);
        for _ in 0..4 {
            score.observe(1.1);
        }
        assert!((score.get(now) - 1.1).abs() < 1e-6, "{}", score.get(now));
        let failing = Score::new();
        for _ in 0..5 {
            failing.observe_failure();
        }
        assert_eq!(failing.get(now), f64::from(FAILURE_RATIO));
        failing.reset();
        assert_eq!(failing.get(now), 1.0);
    }

    #[test]
    fn a_call_waiting_while_its_backend_answers_nothing_counts_as_latency() {
        let pending = Pending::default();
        // A 1 ms method; calls picked at t = 1000 ms.
        let fast = AtomicU64::new(1e6f64.to_bits());
        let first = pending.start(1000, &fast).unwrap();
        assert!((pending.stall(1000) - 5.0 / 6.0).abs() < 1e-9);
        // 60 ms without any answer: (60 + 5) / (1 + 5).
        assert!((pending.stall(1060) - 65.0 / 6.0).abs() < 1e-9);
        // The backend keeps answering other calls: the waiting one is a long call, not a
        // stall. It counts only from the last answer.
        let other = pending.start(1001, &fast).unwrap();
        pending.end(other);
        pending.answered(1058);
        assert!((pending.stall(1060) - 7.0 / 6.0).abs() < 1e-9);
        // A call of a slow method is not overdue at the same age.
        pending.end(first);
        let slow = AtomicU64::new(3e9f64.to_bits());
        pending.start(2000, &slow).unwrap();
        assert!(pending.stall(2060) < 0.1);
        // Every slot taken: the next call is not tracked.
        let full = Pending::default();
        assert!((0..WINDOW).all(|_| full.start(0, &fast).is_some()));
        assert_eq!(full.start(0, &fast), None);
        // An answer to an untracked call counts too: the backend is answering.
        full.answered(1000);
        assert!(full.stall(1010) < 3.0);
        assert_eq!(Pending::default().stall(5000), 0.0);
        // A method without a baseline yet is not tracked.
        assert_eq!(Pending::default().start(0, &AtomicU64::new(0)), None);
    }

    #[test]
    fn the_fast_answers_are_followed_not_the_slow_ones() {
        let method = MethodLatency::default();
        let ms = |n| Duration::from_millis(n);
        let now = clock_ns();
        follow_fastest(&method, ms(5), now);
        // Half the calls take 30 s: the fast ones still take 5 ms.
        for _ in 0..50 {
            follow_fastest(&method, ms(30_000), now);
            follow_fastest(&method, ms(5), now);
        }
        assert_eq!(fast_latency(&method), ms(5));
        // Slower for good: followed, 2% an answer.
        for _ in 0..120 {
            follow_fastest(&method, ms(50), now);
        }
        assert_eq!(fast_latency(&method), ms(50));
        // No answer for 20 s: a quarter.
        let later = now + 20_000_000_000;
        let decayed = fast_latency_at(&method, later).as_secs_f64() * 1e3;
        assert!((12.0..13.0).contains(&decayed), "{decayed}");
    }

    #[test]
    fn a_method_baseline_compares_like_with_like() {
        let baseline = AtomicU64::new(0);
        assert_eq!(ratio_to_baseline(&baseline, Duration::from_secs(3)), 1.0);
        let ratio = ratio_to_baseline(&baseline, Duration::from_millis(2900));
        assert!((0.9..1.1).contains(&ratio), "{ratio}");
        // One 3 s call of a 1 ms method barely moves its baseline.
        let fast = AtomicU64::new(0);
        ratio_to_baseline(&fast, Duration::from_millis(1));
        ratio_to_baseline(&fast, Duration::from_secs(3));
        let typical = f64::from_bits(fast.load(Ordering::Relaxed));
        assert!(typical < 1.2e6, "{typical}");
    }
}
