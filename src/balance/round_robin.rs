//! Weighted round robin over a schedule precomputed when the backend set changes, so the pick
//! is one atomic increment.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Backend;

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub(super) fn pick(&self, schedule: &[u32]) -> Option<usize> {
        if schedule.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(schedule[turn % schedule.len()] as usize)
    }
}

/// Smooth weighted round robin (NGINX's): weights 3 and 1 give a a b a, not a a a b, so a heavy
/// backend's turns are spread out.
/// A drained backend has no turns.
pub(super) fn schedule(backends: &[Arc<Backend>]) -> Vec<u32> {
    let turns = |b: &Backend| if b.is_drained() { 0 } else { b.weight() as i64 };
    let total: i64 = backends.iter().map(|b| turns(b)).sum();
    let mut current = vec![0i64; backends.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, b) in current.iter_mut().zip(backends) {
            *c += turns(b);
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
        else {
            break;
        };
        current[best] -= total;
        order.push(best as u32);
    }
    order
}
