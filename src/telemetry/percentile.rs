//! A method's recent latency percentiles, for hedging's adaptive delay: a log-scale histogram
//! of atomic counters, halved once it holds `WINDOW` samples so it follows the method's
//! current latency. Recording is one atomic add; a percentile is a walk over 64 counters.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Buckets grow by 2^(1/4) (about 19%) from 50 µs, so 64 of them reach about 3 minutes.
const BUCKETS: usize = 64;
const FIRST_US: f64 = 50.0;
const GROWTH: f64 = 1.189_207_115; // 2^(1/4)
/// Samples before the counts are halved: the percentiles follow the last few thousand calls.
const WINDOW: u32 = 4096;
/// Fewer samples than this give no percentile: too few to say where a tail begins.
const MIN_SAMPLES: u32 = 20;

#[derive(Debug)]
pub struct LatencyPercentiles {
    counts: [AtomicU32; BUCKETS],
    total: AtomicU32,
}

impl Default for LatencyPercentiles {
    fn default() -> Self {
        LatencyPercentiles {
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
            total: AtomicU32::new(0),
        }
    }
}

impl LatencyPercentiles {
    pub fn record(&self, latency: Duration) {
        let us = latency.as_secs_f64() * 1e6;
        let bucket = match us <= FIRST_US {
            true => 0,
            false => ((us / FIRST_US).log(GROWTH).ceil() as usize).min(BUCKETS - 1),
        };
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        if self.total.fetch_add(1, Ordering::Relaxed) + 1 >= WINDOW {
            self.halve();
        }
    }

    /// Halves every count (racing recorders may lose a sample or two: an estimate anyway).
    fn halve(&self) {
        let mut total = 0;
        for count in &self.counts {
            let halved = count.load(Ordering::Relaxed) / 2;
            count.store(halved, Ordering::Relaxed);
            total += halved;
        }
        self.total.store(total, Ordering::Relaxed);
    }

    /// The latency below which `percentile` percent of the recent samples fell (the upper
    /// edge of its bucket); `None` until there are enough samples.
    pub fn percentile(&self, percentile: f64) -> Option<Duration> {
        let counts: [u32; BUCKETS] =
            std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed));
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if total < u64::from(MIN_SAMPLES) {
            return None;
        }
        let rank = (total as f64 * percentile / 100.0).ceil() as u64;
        let mut seen = 0u64;
        let bucket = counts.iter().position(|&c| {
            seen += u64::from(c);
            seen >= rank
        })?;
        let upper_us = FIRST_US * GROWTH.powi(bucket as i32);
        Some(Duration::from_secs_f64(upper_us / 1e6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_find_the_tail_within_a_bucket() {
        let latencies = LatencyPercentiles::default();
        assert_eq!(latencies.percentile(95.0), None, "no samples yet");
        for i in 0..1000u64 {
            // 1 ms for 96%, 200 ms for 4%.
            let ms = if i % 25 == 0 { 200 } else { 1 };
            latencies.record(Duration::from_millis(ms));
        }
        let p95 = latencies.percentile(95.0).unwrap();
        assert!(
            p95 >= Duration::from_millis(1) && p95 < Duration::from_micros(1200),
            "{p95:?}"
        );
        let p99 = latencies.percentile(99.0).unwrap();
        assert!(
            p99 >= Duration::from_millis(200) && p99 < Duration::from_millis(240),
            "{p99:?}"
        );
    }

    #[test]
    fn old_samples_fade() {
        let latencies = LatencyPercentiles::default();
        for _ in 0..WINDOW {
            latencies.record(Duration::from_millis(100));
        }
        for _ in 0..3 * WINDOW {
            latencies.record(Duration::from_millis(2));
        }
        let p95 = latencies.percentile(95.0).unwrap();
        assert!(p95 < Duration::from_millis(3), "{p95:?}");
    }
}
