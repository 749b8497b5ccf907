//! A route's rate limit (`routes[].rate_limit`): a token bucket per key (the client, the
//! client and method, or the whole route), held in a bounded LRU.
//!
//! A bucket holds up to `burst` tokens and gains `rate` per second; a call takes one. A call
//! that finds none is refused with RESOURCE_EXHAUSTED and told, in `grpc-retry-pushback-ms`,
//! when the next token will be there. With `fleet_wide`, the rate and burst are the fleet's,
//! and each instance takes its share: divided by the instances live in the fleet registry.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use tokio::time::Instant;

use crate::config::{RateKey, RateLimitConfig};
use crate::sync::lock;
use crate::telemetry::metrics;

/// One route's buckets.
pub struct RateLimiter {
    /// Tokens per second, and the bucket size, for the whole fleet when `fleet_wide`.
    rate: f64,
    burst: f64,
    pub per: RateKey,
    /// With `fleet_wide`: the live instances (at least 1), which the fleet registry updates.
    share_of: Option<Arc<AtomicUsize>>,
    buckets: Mutex<LruCache<u64, Bucket>>,
    evictions: prometheus::IntCounter,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("per", &self.per)
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// The limiter of route `route` (its name, or `routes[i]`); `instances` is the fleet's
    /// live instance count, for a `fleet_wide` limit.
    pub fn new(config: &RateLimitConfig, route: &str, instances: &Arc<AtomicUsize>) -> RateLimiter {
        let rate = config.rate.value.0;
        let burst = config
            .burst
            .map_or(rate.ceil().max(1.0), |b| f64::from(b.0));
        let capacity = NonZeroUsize::new(config.max_keys.0 as usize).unwrap_or(NonZeroUsize::MIN);
        RateLimiter {
            rate,
            burst,
            per: config.per,
            share_of: config.fleet_wide.then(|| Arc::clone(instances)),
            buckets: Mutex::new(LruCache::new(capacity)),
            evictions: metrics().rate_limit_evictions(route),
        }
    }

    /// Takes a token for `key` at `now`; or says how long until one will be there.
    pub fn take(&self, key: u64, now: Instant) -> Result<(), Duration> {
        let share = self
            .share_of
            .as_ref()
            .map_or(1.0, |n| n.load(Ordering::Relaxed).max(1) as f64);
        let (rate, burst) = (self.rate / share, (self.burst / share).max(1.0));
        let mut buckets = lock(&self.buckets);
        let bucket = match buckets.get_mut(&key) {
            Some(bucket) => bucket,
            None => {
                let fresh = Bucket {
                    tokens: burst,
                    at: now,
                };
                if buckets.push(key, fresh).is_some() {
                    self.evictions.inc();
                }
                buckets.get_mut(&key).ok_or(Duration::ZERO)?
            }
        };
        let gained = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + gained).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / rate;
        Err(Duration::from_secs_f64(wait).max(Duration::from_millis(1)))
    }

    /// Keys with a bucket now.
    #[cfg(test)]
    fn keys(&self) -> usize {
        lock(&self.buckets).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(yaml: &str) -> RateLimiter {
        let config: RateLimitConfig = serde_saphyr::from_str(yaml).unwrap();
        RateLimiter::new(&config, "test", &Arc::new(AtomicUsize::new(1)))
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = limiter("{ rate: 10/s, burst: 5 }");
        let start = Instant::now();
        for _ in 0..5 {
            assert!(limiter.take(1, start).is_ok());
        }
        let wait = limiter.take(1, start).unwrap_err();
        assert!((90..=101).contains(&wait.as_millis()), "{wait:?}");
        // Another key has its own bucket.
        assert!(limiter.take(2, start).is_ok());
        // One second later: ten more tokens, but never more than the burst.
        let later = start + Duration::from_secs(1);
        let taken = (0..20).filter(|_| limiter.take(1, later).is_ok()).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn the_lru_holds_max_keys_and_counts_evictions() {
        let limiter = limiter("{ rate: 1/s, max_keys: 3 }");
        let now = Instant::now();
        for key in 0..5 {
            assert!(limiter.take(key, now).is_ok());
        }
        assert_eq!(limiter.keys(), 3);
        assert_eq!(limiter.evictions.get(), 2);
    }

    #[test]
    fn a_fleet_wide_limit_is_shared_by_the_live_instances() {
        let config: RateLimitConfig =
            serde_saphyr::from_str("{ rate: 30/s, burst: 30, fleet_wide: true }").unwrap();
        let instances = Arc::new(AtomicUsize::new(3));
        let limiter = RateLimiter::new(&config, "fleet", &instances);
        let now = Instant::now();
        let taken = (0..100).filter(|_| limiter.take(7, now).is_ok()).count();
        assert_eq!(taken, 10);
    }
}
