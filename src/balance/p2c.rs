//! Power of two random choices: draw two distinct backends and prefer the cheaper. O(1), and
//! it avoids the herd a global "least loaded" pick causes when many calls decide at once.
//!
//! The preference is proportional, not absolute: candidate `a` wins with probability
//! `cost(b) / (cost(a) + cost(b))`. Backends within noise of each other then share evenly
//! (an absolute rule let one slow sample starve a backend until its EWMA decayed: 1/191/108 of
//! 300 sequential demo calls). Under `p2c_ewma` one exception: a candidate more than 4× and
//! 50 ms slower than the other (by latency alone, so weights stay proportional) loses
//! outright; it is probed again once its estimate has decayed back within reach.

use std::sync::Arc;

use super::Backend;

pub(super) fn pick(
    backends: &[Arc<Backend>],
    cost: impl Fn(&Backend) -> f64,
    latency: Option<fn(&Backend) -> f64>,
) -> Option<usize> {
    match backends.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = fastrand::usize(..n);
            // A second draw from the other n-1, so the two are always distinct.
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            let (backend_a, backend_b) = (&backends[a], &backends[b]);
            // Far slower than the other candidate: not worth a call until its estimate has
            // decayed back within reach (it is then probed once, and set again by the answer).
            if let Some(latency) = latency {
                let (latency_a, latency_b) = (latency(backend_a), latency(backend_b));
                if far_slower(latency_a, latency_b) {
                    return Some(b);
                }
                if far_slower(latency_b, latency_a) {
                    return Some(a);
                }
            }
            let (cost_a, cost_b) = (cost(backend_a), cost(backend_b));
            let total = cost_a + cost_b;
            let a_wins = if total > 0.0 && total.is_finite() {
                fastrand::f64() * total < cost_b
            } else {
                fastrand::bool()
            };
            Some(if a_wins { a } else { b })
        }
    }
}

/// A candidate whose latency estimate is more than `SLOWER_BY` times the other's, and more than
/// `SLOWER_AT_LEAST_NS` above it, loses the draw outright. Otherwise the choice stays
/// proportional. In the incident replay (loadtest/incident.sh) the proportional rule alone still
/// sent 1% of calls to a backend 500 ms slower, enough to put it in the p99. The floor keeps
/// noise out: a scheduling hiccup that turns one 1 ms call into 20 ms is 20x, and without the
/// floor it shut a healthy backend out for the 15 s its peak estimate took to decay.
const SLOWER_BY: f64 = 4.0;
const SLOWER_AT_LEAST_NS: f64 = 50e6;

fn far_slower(latency: f64, other: f64) -> bool {
    latency > SLOWER_BY * other && latency - other > SLOWER_AT_LEAST_NS
}
