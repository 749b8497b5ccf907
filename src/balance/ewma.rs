//! Peak-EWMA latency, as in Finagle and Linkerd, and the monotonic clock the balancer's atomics
//! share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// Nanoseconds since the balancer first looked at the clock.
pub(super) fn clock_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub(super) fn clock_ms() -> u64 {
    clock_ns() / 1_000_000
}
