//! Power of two random choices: draw two distinct backends and prefer the cheaper. O(1), and
//! it avoids the herd a global "least loaded" pick causes when many calls decide at once.
//!
//! The preference is proportional, not absolute: candidate `a` wins with probability
//! `cost(b) / (cost(a) + cost(b))`, so backends within noise of each other share evenly. (The
//! p2c_ewma cost is squared, see `Backend::cost`, so a far costlier backend gets almost no
//! calls but its probes.)
//! With `probe_at` (p2c_ewma: the time of the pick), a candidate not picked for two seconds
//! wins outright, one call per interval: a backend that was avoided is judged again by a
//! fresh answer.

use std::sync::Arc;

use super::Backend;

pub(super) fn pick(
    backends: &[Arc<Backend>],
    cost: impl Fn(&Backend) -> f64,
    probe_at: Option<u64>,
) -> Option<usize> {
    let n = backends.len();
    if n < 2 {
        return (n == 1).then_some(0);
    }
    let a = fastrand::usize(..n);
    // A second draw from the other n-1, so the two are always distinct.
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    let (backend_a, backend_b) = (&backends[a], &backends[b]);
    if let Some(now_ms) = probe_at {
        for (i, candidate) in [(a, backend_a), (b, backend_b)] {
            if candidate.due_for_probe(now_ms) && candidate.take_pick(now_ms) {
                return Some(i);
            }
        }
    }
    let (cost_a, cost_b) = (cost(backend_a), cost(backend_b));
    let total = cost_a + cost_b;
    let a_wins = if total > 0.0 && total.is_finite() {
        fastrand::f64() * total < cost_b
    } else {
        fastrand::bool()
    };
    let (index, chosen) = if a_wins {
        (a, backend_a)
    } else {
        (b, backend_b)
    };
    if let Some(now_ms) = probe_at {
        chosen.take_pick(now_ms);
    }
    Some(index)
}
