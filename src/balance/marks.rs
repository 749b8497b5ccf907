//! Why a backend stands out from its peers: `/backends`' `mark`, the status page's badge.
//! Judged by what the balancer acts on (its latency score, its state, its concurrency limit),
//! so the page points at the backend the balancer is already steering around.

use serde::Serialize;

use super::backend::{BackendSnapshot, BackendState};
use super::ewma::clock_ns;
use super::Cluster;

/// Why a backend stands out. When several apply, the first in this order is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// It fails its health checks, or its last connect failed.
    Unhealthy,
    /// Outlier detection took it out.
    Ejected,
    /// Discovery removed it; its calls run to their end.
    Draining,
    /// The operator drained it; its calls run to their end.
    Drained,
    /// Most of its recent calls failed, or its error ratio is well above its peers'.
    Failing,
    /// Its calls take far longer than the same methods' calls take on its peers.
    Slow,
    /// It holds as many unanswered calls as its concurrency limit allows.
    AtLimit,
}

/// Slow: the balancer judges its calls at least this many times slower than its methods'
/// typical latency, and than its best peer. (Both sides of that ratio carry a 5 ms noise
/// floor, so 3 means "30 ms where 5 ms is typical", not "3 ms where 1 ms is".)
const SLOW_FACTOR: f64 = 3.0;

/// A stall counts toward `Slow` from this ratio up (about 100 ms of silence where 5 ms is
/// typical): the balancer reacts to a shorter one at once, but the page, read every 2 s,
/// should not mark a backend for one scheduling hiccup.
const STALL_FLOOR: f64 = 20.0;

/// Failing by error ratio: this far above its peers' ratio (5 points) ...
const ERROR_MARGIN: f64 = 0.05;
/// ... over at least this many attempts in the last 10 s.
const MIN_ATTEMPTS: u64 = 20;

impl Cluster {
    /// `/backends`' view of every listed backend, each with its mark.
    pub fn backend_views(&self) -> Vec<BackendSnapshot> {
        let now_ns = clock_ns();
        let listed = self.listed_backends();
        let mut views: Vec<BackendSnapshot> = listed.iter().map(|b| b.snapshot()).collect();
        let judged: Vec<Judged> = (listed.iter())
            .map(|b| {
                let (score, stall) = (b.score(now_ns), b.stall(now_ns));
                let stall = if stall >= STALL_FLOOR { stall } else { 0.0 };
                Judged {
                    latency: score.max(stall),
                    failing: b.failing(now_ns),
                }
            })
            .collect();
        let marks: Vec<Option<Mark>> = (0..views.len()).map(|i| mark(&views, &judged, i)).collect();
        for (view, mark) in views.iter_mut().zip(marks) {
            view.mark = mark;
        }
        views
    }
}

/// What the balancer thinks of one backend: its latency as `Backend::latency_judgement` has
/// it (a short stall left out), and whether most of its recent calls failed.
struct Judged {
    latency: f64,
    failing: bool,
}

/// The mark of `views[i]`, against its healthy peers.
fn mark(views: &[BackendSnapshot], judged: &[Judged], i: usize) -> Option<Mark> {
    let view = &views[i];
    match view.state {
        BackendState::Unhealthy => return Some(Mark::Unhealthy),
        BackendState::Ejected => return Some(Mark::Ejected),
        BackendState::Draining => return Some(Mark::Draining),
        BackendState::Drained => return Some(Mark::Drained),
        BackendState::Healthy => {}
    }
    let peers: Vec<usize> = (0..views.len())
        .filter(|&k| k != i && views[k].state == BackendState::Healthy)
        .collect();
    if judged[i].failing || fails_more_than(views, &peers, i) {
        return Some(Mark::Failing);
    }
    let best_peer = peers.iter().map(|&k| judged[k].latency).reduce(f64::min);
    if best_peer.is_some_and(|best| judged[i].latency >= SLOW_FACTOR * best.max(1.0)) {
        return Some(Mark::Slow);
    }
    let full = view.concurrency_limit > 0 && view.unanswered >= view.concurrency_limit;
    full.then_some(Mark::AtLimit)
}

/// Whether `views[i]` failed a share of its recent attempts well above what `peers` failed
/// together, with enough attempts to tell.
fn fails_more_than(views: &[BackendSnapshot], peers: &[usize], i: usize) -> bool {
    let view = &views[i];
    let requests: u64 = peers.iter().map(|&k| views[k].recent_requests).sum();
    if view.recent_requests < MIN_ATTEMPTS || requests == 0 {
        return false;
    }
    let failures: f64 = (peers.iter())
        .map(|&k| views[k].error_ratio * views[k].recent_requests as f64)
        .sum();
    view.error_ratio >= failures / requests as f64 + ERROR_MARGIN
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::tests::{cluster, endpoints};
    use crate::telemetry::MethodLatency;

    fn marks(c: &Cluster) -> Vec<Option<Mark>> {
        c.backend_views().iter().map(|v| v.mark).collect()
    }

    #[test]
    fn a_backend_far_slower_than_its_peers_is_slow_and_they_are_not() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1), ("c:1", 1)]));
        let set = c.backends();
        let method = MethodLatency::default();
        assert_eq!(marks(&c), [None, None, None], "nothing observed yet");
        for _ in 0..10 {
            for (k, ms) in [(0, 4), (1, 6), (2, 300)] {
                let rtt = Duration::from_millis(ms);
                set.backends[k].observe_latency(rtt, &method, clock_ns());
            }
        }
        assert_eq!(marks(&c), [None, None, Some(Mark::Slow)]);
    }

    #[test]
    fn a_service_slow_everywhere_marks_no_backend() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]));
        let set = c.backends();
        let method = MethodLatency::default();
        for _ in 0..10 {
            for backend in &set.backends {
                backend.observe_latency(Duration::from_millis(300), &method, clock_ns());
            }
        }
        assert_eq!(marks(&c), [None, None]);
    }

    #[test]
    fn a_backend_that_answers_very_slowly_is_slow_not_failing() {
        let c = cluster("p2c_ewma");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]));
        let set = c.backends();
        let method = MethodLatency::default();
        for _ in 0..10 {
            set.backends[0].observe_latency(Duration::from_millis(2), &method, clock_ns());
            set.backends[1].observe_latency(Duration::from_secs(20), &method, clock_ns());
        }
        assert_eq!(marks(&c), [None, Some(Mark::Slow)]);
    }

    #[test]
    fn a_backend_failing_most_calls_is_failing() {
        let c = cluster("round_robin");
        c.update(&endpoints(&[("a:1", 1), ("b:1", 1)]));
        let set = c.backends();
        let method = MethodLatency::default();
        for _ in 0..8 {
            set.backends[0].observe_latency(Duration::from_millis(2), &method, clock_ns());
            set.backends[1].observe_failure();
        }
        assert_eq!(marks(&c), [None, Some(Mark::Failing)]);
    }
}
