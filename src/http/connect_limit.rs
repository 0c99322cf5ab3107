//! WebSocket connection attempts per client address: one token bucket per IP address
//! (`--ip-connects-per-minute`, as the burst and the refill per minute), checked before
//! anything else in the handshake, so that one address cannot keep the gateway busy verifying
//! tokens and asking the backend about bans.
//!
//! The limit is per instance. The map stays bounded without a background task: a bucket left
//! alone for a full refill period is full again, so forgetting it changes nothing; such buckets
//! are dropped whenever the map has doubled since the last sweep, which keeps the memory in
//! proportion to the addresses seen within about a minute.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::ratelimit::TokenBucket;

/// Below this many addresses a sweep is not worth the time.
const MIN_SWEEP: usize = 4096;

/// How long an empty bucket takes to fill up again: capacity / rate, one minute whatever the
/// limit.
const REFILL: Duration = Duration::from_secs(60);

pub struct ConnectLimiter {
    per_minute: u32,
    buckets: DashMap<IpAddr, Bucket>,
    /// Addresses at which the next sweep runs; `usize::MAX` while one runs.
    sweep_at: AtomicUsize,
}

struct Bucket {
    tokens: TokenBucket,
    last_attempt: Instant,
}

impl ConnectLimiter {
    pub fn new(per_minute: u32) -> Self {
        ConnectLimiter {
            per_minute,
            buckets: DashMap::new(),
            sweep_at: AtomicUsize::new(MIN_SWEEP),
        }
    }

    /// Counts one attempt from `ip`: allowed, or how long until the next one would be.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let allowed = {
            let mut bucket = self.buckets.entry(ip).or_insert_with(|| Bucket {
                tokens: TokenBucket::new(self.per_minute, f64::from(self.per_minute) / 60.0),
                last_attempt: now,
            });
            bucket.last_attempt = now;
            bucket.tokens.take()
        };
        // The entry's shard lock is released: the sweep may lock every shard.
        self.sweep_if_due(now);
        allowed
    }

    fn sweep_if_due(&self, now: Instant) {
        let due = self.sweep_at.load(Ordering::Relaxed);
        if self.buckets.len() < due {
            return;
        }
        // One sweeper at a time; the others carry on.
        if self
            .sweep_at
            .compare_exchange(due, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.buckets
            .retain(|_, b| now.duration_since(b.last_attempt) < REFILL);
        let next = (2 * self.buckets.len()).max(MIN_SWEEP);
        self.sweep_at.store(next, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_each_address_and_forgets_idle_ones() {
        let limiter = ConnectLimiter::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        limiter.attempt(a).unwrap();
        limiter.attempt(a).unwrap();
        let wait = limiter.attempt(a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(30));
        limiter.attempt(b).unwrap();

        // Many addresses; a minute later as many again: the sweep when the map has doubled
        // drops the idle ones.
        let many = |range: std::ops::Range<u32>| {
            for i in range {
                let _ = limiter.attempt(IpAddr::from(std::net::Ipv4Addr::from(i)));
            }
        };
        many(0..MIN_SWEEP as u32);
        assert_eq!(limiter.buckets.len(), MIN_SWEEP + 2, "nothing idle yet");
        tokio::time::advance(REFILL).await;
        many(MIN_SWEEP as u32..2 * MIN_SWEEP as u32);
        assert_eq!(limiter.buckets.len(), MIN_SWEEP);
        assert!(!limiter.buckets.contains_key(&a));
    }
}
