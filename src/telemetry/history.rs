//! Five minutes of each backend's history, for the status page's charts: calls, failures and
//! the p99 latency per 5-second bin. The per-second sampler closes a bin for every backend at
//! the same moment, so the bins of a cluster's backends line up (cold path: one lock per bin
//! and per page view).

use std::collections::VecDeque;
use std::time::Duration;

use prometheus::core::Metric;
use prometheus::Histogram;
use serde::Serialize;

use super::stats::DURATION_BUCKETS;

/// How long one bin lasts.
pub const BIN: Duration = Duration::from_secs(5);
/// Bins kept: five minutes.
pub const BINS: usize = 60;

/// The counters' totals when the last bin closed.
#[derive(Debug, Clone, Default)]
struct Totals {
    requests: u64,
    failures: u64,
    /// Cumulative counts of the attempt-duration histogram, one per finite bucket, then all.
    buckets: [u64; DURATION_BUCKETS.len() + 1],
}

/// One bin: attempts, failed attempts, and the p99 of the attempts' durations in ms (none
/// without attempts).
#[derive(Debug, Clone, Copy)]
struct Bin {
    requests: u64,
    failures: u64,
    p99_ms: Option<f64>,
}

#[derive(Debug, Default)]
pub(super) struct History {
    /// Zero at first: a backend's first bin counts from when it joined.
    at_last_bin: Totals,
    bins: VecDeque<Bin>,
}

/// What the status page reads of one backend: one value per bin, oldest first, each array as
/// long as the others. The newest bin is the last; every backend's newest bin closed at the
/// same moment.
#[derive(Debug, Default, Serialize)]
pub struct HistoryView {
    pub requests: Vec<u64>,
    pub failures: Vec<u64>,
    pub p99_ms: Vec<Option<f64>>,
}

impl History {
    /// Closes a bin with the totals now: `requests` and `failures` as `/backends` counts them,
    /// and `duration`, the backend's attempt-duration histogram.
    pub(super) fn close_bin(&mut self, requests: u64, failures: u64, duration: &Histogram) {
        let now = totals(requests, failures, duration);
        let last = &self.at_last_bin;
        let mut in_bin = [0u64; DURATION_BUCKETS.len() + 1];
        for (bucket, (n, l)) in in_bin.iter_mut().zip(now.buckets.iter().zip(&last.buckets)) {
            *bucket = n.saturating_sub(*l);
        }
        self.bins.push_back(Bin {
            requests: now.requests.saturating_sub(last.requests),
            failures: now.failures.saturating_sub(last.failures),
            p99_ms: quantile(0.99, &in_bin).map(|seconds| seconds * 1e3),
        });
        if self.bins.len() > BINS {
            self.bins.pop_front();
        }
        self.at_last_bin = now;
    }

    pub(super) fn view(&self) -> HistoryView {
        HistoryView {
            requests: self.bins.iter().map(|b| b.requests).collect(),
            failures: self.bins.iter().map(|b| b.failures).collect(),
            p99_ms: self.bins.iter().map(|b| b.p99_ms).collect(),
        }
    }
}

fn totals(requests: u64, failures: u64, duration: &Histogram) -> Totals {
    let mut buckets = [0u64; DURATION_BUCKETS.len() + 1];
    let metric = duration.metric();
    let histogram = metric.get_histogram();
    for (slot, bucket) in buckets.iter_mut().zip(histogram.get_bucket()) {
        *slot = bucket.cumulative_count();
    }
    buckets[DURATION_BUCKETS.len()] = histogram.get_sample_count();
    Totals {
        requests,
        failures,
        buckets,
    }
}

/// The `q` quantile (in seconds) of the observations counted in `cumulative` (per finite
/// bucket of `DURATION_BUCKETS`, then all), interpolated within its bucket as Prometheus'
/// `histogram_quantile` does. Above the last finite bound it reports that bound. `None`
/// without observations.
fn quantile(q: f64, cumulative: &[u64; DURATION_BUCKETS.len() + 1]) -> Option<f64> {
    let total = cumulative[DURATION_BUCKETS.len()];
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut below, mut lower) = (0u64, 0.0);
    for (count, upper) in cumulative.iter().zip(DURATION_BUCKETS) {
        if *count as f64 >= rank && *count > below {
            let within = (rank - below as f64) / (*count - below) as f64;
            return Some(lower + (upper - lower) * within);
        }
        (below, lower) = (*count, upper);
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::HistogramOpts;

    fn histogram() -> Histogram {
        let opts = HistogramOpts::new("t", "t").buckets(DURATION_BUCKETS.to_vec());
        Histogram::with_opts(opts).unwrap()
    }

    #[test]
    fn bins_count_what_happened_in_them_and_estimate_the_p99() {
        let duration = histogram();
        let mut history = History::default();
        // 99 calls of 1.5 ms and one of 3 s: the p99 lies in the (1 ms, 2.5 ms] bucket.
        for _ in 0..99 {
            duration.observe(0.0015);
        }
        duration.observe(3.0);
        history.close_bin(100, 1, &duration);
        // Nothing in the next bin.
        history.close_bin(100, 1, &duration);
        // 10 calls of 400 ms in the third, 5 of them failed.
        for _ in 0..10 {
            duration.observe(0.4);
        }
        history.close_bin(110, 6, &duration);
        let view = history.view();
        assert_eq!(view.requests, [100, 0, 10]);
        assert_eq!(view.failures, [1, 0, 5]);
        let p99 = view.p99_ms[0].unwrap();
        assert!((1.0..=2.5).contains(&p99), "{p99}");
        assert_eq!(view.p99_ms[1], None);
        let p99 = view.p99_ms[2].unwrap();
        assert!((250.0..=500.0).contains(&p99), "{p99}");
    }

    #[test]
    fn five_minutes_are_kept() {
        let duration = histogram();
        let mut history = History::default();
        for n in 0..(BINS as u64 + 10) {
            history.close_bin(n, 0, &duration);
        }
        assert_eq!(history.view().requests.len(), BINS);
    }

    #[test]
    fn past_the_last_bucket_the_quantile_is_its_bound() {
        let mut cumulative = [0u64; DURATION_BUCKETS.len() + 1];
        cumulative[DURATION_BUCKETS.len()] = 3;
        assert_eq!(quantile(0.99, &cumulative), Some(600.0));
    }
}
