//! Waits that repeat: exponential backoff and jitter, for every loop that retries something
//! failing (etcd watches, `sluice register`, connects to a backend) or repeats on a timer
//! (health checks, connection max age, pushback). Imports nothing from the crate.

use std::time::Duration;

/// The wait before each retry of something that keeps failing: `first`, then doubling, at
/// most `max`, back to `first` after a success.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next try; the one after it is twice as long, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// It worked: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// `first` doubled `times` times, at most `max` (no overflow, however large `times`).
pub fn doubled(first: Duration, times: u32, max: Duration) -> Duration {
    first
        .saturating_mul(1u32.checked_shl(times).unwrap_or(u32::MAX))
        .min(max)
}

/// `value` times a random factor between `low` and `high` (0.9 and 1.1: ±10%), so the timers
/// of many tasks started together do not fire together.
pub fn jitter(value: Duration, low: f64, high: f64) -> Duration {
    value.mul_f64(low + fastrand::f64() * (high - low))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backoff_doubles_to_its_max_and_starts_again_after_a_success() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| backoff.next_wait()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), ms(100));
        assert_eq!(doubled(ms(250), 2, ms(3000)), ms(1000));
        assert_eq!(doubled(ms(250), 64, ms(3000)), ms(3000));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        for _ in 0..1000 {
            let value = jitter(Duration::from_secs(10), 0.9, 1.1);
            assert!(value >= Duration::from_secs(9) && value <= Duration::from_secs(11));
        }
    }
}
