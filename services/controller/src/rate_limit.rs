//! Token buckets, one per key (an API key, a worker token, a fleet, a client address), kept in
//! memory by each replica. Keys are held as a 16-byte digest, never as presented. The map is
//! bounded: buckets that have refilled are dropped first, and should it still be full (a flood
//! of distinct keys), it starts over rather than grow.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Buckets kept at most.
const MAX_BUCKETS: usize = 100_000;

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<[u8; 16], Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_minute` on average, in bursts of ten seconds' worth; `per_minute` = 0 turns
    /// limiting off (None).
    pub fn new(per_minute: u32) -> Option<RateLimiter> {
        RateLimiter::with_burst(per_minute, (f64::from(per_minute) / 6.0).max(1.0))
    }

    pub fn with_burst(per_minute: u32, burst: f64) -> Option<RateLimiter> {
        (per_minute > 0).then(|| RateLimiter {
            per_second: f64::from(per_minute) / 60.0,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    pub fn per_minute(&self) -> f64 {
        self.per_second * 60.0
    }

    /// Takes one token for `key`; Err(seconds to wait) when there is none.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), u64> {
        self.spend(key, now, true)
    }

    /// Whether `key` has a token, without taking it (a check before work that is only charged
    /// when it fails, such as an authentication).
    pub fn check(&self, key: &str, now: Instant) -> Result<(), u64> {
        self.spend(key, now, false)
    }

    fn spend(&self, key: &str, now: Instant, take: bool) -> Result<(), u64> {
        let digest = Sha256::digest(key.as_bytes());
        let id: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&id) {
            self.prune(&mut buckets, now);
        }
        let bucket = buckets.entry(id).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            if take {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.per_second).ceil().max(1.0) as u64)
        }
    }

    /// Drops the buckets that have refilled (as good as new); if none has, every bucket.
    fn prune(&self, buckets: &mut HashMap<[u8; 16], Bucket>, now: Instant) {
        let (per_second, burst) = (self.per_second, self.burst);
        buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst);
        if buckets.len() >= MAX_BUCKETS {
            tracing::warn!(buckets = buckets.len(), "rate limiter full of live buckets: starting over");
            buckets.clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_is_allowed_then_requests_wait_for_the_refill() {
        let limiter = RateLimiter::new(60).unwrap(); // 1 per second, bursts of 10
        let start = Instant::now();
        for _ in 0..10 {
            limiter.take("key-a", start).unwrap();
        }
        assert_eq!(limiter.take("key-a", start), Err(1));
        assert!(limiter.take("key-b", start).is_ok(), "another key has its own bucket");
        assert!(limiter.take("key-a", start + Duration::from_millis(1000)).is_ok(), "a second refills one token");
        assert_eq!(limiter.take("key-a", start + Duration::from_millis(1000)), Err(1));
        assert!(RateLimiter::new(0).is_none(), "0 turns limiting off");
    }

    #[test]
    fn a_check_does_not_spend() {
        let limiter = RateLimiter::with_burst(60, 1.0).unwrap();
        let now = Instant::now();
        assert!(limiter.check("k", now).is_ok());
        assert!(limiter.check("k", now).is_ok());
        limiter.take("k", now).unwrap();
        assert_eq!(limiter.check("k", now), Err(1));
    }

    #[test]
    fn a_flood_of_distinct_keys_does_not_grow_the_map_past_its_bound() {
        let limiter = RateLimiter::new(600).unwrap();
        let now = Instant::now();
        for i in 0..MAX_BUCKETS {
            let _ = limiter.take(&format!("key-{i}"), now);
        }
        assert_eq!(limiter.len(), MAX_BUCKETS);
        // Refilled buckets are dropped before anything else.
        let _ = limiter.take("fresh", now + Duration::from_secs(60));
        assert_eq!(limiter.len(), 1);
        // A full map of live buckets starts over rather than grows.
        for i in 0..MAX_BUCKETS {
            let _ = limiter.take(&format!("again-{i}"), now + Duration::from_secs(60));
        }
        assert!(limiter.len() <= MAX_BUCKETS, "{} buckets", limiter.len());
    }
}
