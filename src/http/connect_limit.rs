//! WebSocket connection attempts per client address: one token bucket per address key (an
//! IPv4 address, or an IPv6 prefix: see [`AddressKeys`](crate::address::AddressKeys)), with
//! `--ip-connects-per-minute` as the burst and the refill per minute, checked before anything
//! else in the handshake, so that one address cannot keep the gateway busy verifying tokens
//! and asking the backend about bans.
//!
//! The limit is per instance. The map stays bounded without a background task: a bucket left
//! alone for a full refill period is full again, so forgetting it changes nothing; such buckets
//! are dropped whenever the map has doubled since the last sweep, which keeps the memory in
//! proportion to the addresses seen within about a minute.
//!
//! Behind a load balancer that is not in `--trusted-proxies`, every client has the balancer's
//! address and the whole service gets one bucket. To make that visible, each bucket also keeps
//! a sketch of the users its address authenticated as lately (64 bits a minute, one bit per
//! user); a refusal of an address that authenticated as [`SHARED_USERS`] or more distinct
//! users is reported as probably shared, at most once a minute per address.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use ipnet::IpNet;
use tokio::time::Instant;

use crate::ratelimit::TokenBucket;

/// Below this many addresses a sweep is not worth the time.
const MIN_SWEEP: usize = 4096;

/// How long an empty bucket takes to fill up again: capacity / rate, one minute whatever the
/// limit.
const REFILL: Duration = Duration::from_secs(60);

/// Distinct users one address authenticated as, within a minute or two, that make a refusal
/// of it look like one of a proxy carrying many clients.
pub const SHARED_USERS: u32 = 8;

/// Least time between two reports of one shared address.
const REPORT_EVERY: Duration = Duration::from_secs(60);

pub struct ConnectLimiter {
    per_minute: u32,
    buckets: DashMap<IpNet, Bucket>,
    /// Addresses at which the next sweep runs; `usize::MAX` while one runs.
    sweep_at: AtomicUsize,
    /// Hashes user ids into the sketches (keyed per process).
    hasher: RandomState,
}

struct Bucket {
    tokens: TokenBucket,
    last_attempt: Instant,
    users: UserSketch,
    /// When a refusal of this address was last reported as shared.
    reported: Option<Instant>,
}

/// The users an address authenticated as: one bit per user hash, for the current minute and
/// the one before. Its bits count distinct users well while there are few of them, which is
/// all the question needs.
struct UserSketch {
    current: u64,
    previous: u64,
    since: Instant,
}

impl UserSketch {
    fn new(now: Instant) -> Self {
        UserSketch {
            current: 0,
            previous: 0,
            since: now,
        }
    }

    fn roll(&mut self, now: Instant) {
        let age = now.duration_since(self.since);
        if age >= REFILL {
            self.previous = if age < 2 * REFILL { self.current } else { 0 };
            self.current = 0;
            self.since = now;
        }
    }

    fn add(&mut self, hash: u64, now: Instant) {
        self.roll(now);
        self.current |= 1 << (hash % 64);
    }

    fn distinct(&mut self, now: Instant) -> u32 {
        self.roll(now);
        (self.current | self.previous).count_ones()
    }
}

/// A refused attempt.
#[derive(Debug)]
pub struct Refused {
    /// How long until the next attempt would be allowed.
    pub wait: Duration,
    /// The address authenticated as many distinct users lately: it is probably a proxy or
    /// load balancer. Set at most once a minute per address, so it can be logged each time.
    pub shared: bool,
}

impl ConnectLimiter {
    pub fn new(per_minute: u32) -> Self {
        ConnectLimiter {
            per_minute,
            buckets: DashMap::new(),
            sweep_at: AtomicUsize::new(MIN_SWEEP),
            hasher: RandomState::new(),
        }
    }

    /// Counts one attempt from the address `key`: allowed, or refused.
    pub fn attempt(&self, key: IpNet) -> Result<(), Refused> {
        let now = Instant::now();
        let result = {
            let mut bucket = self.buckets.entry(key).or_insert_with(|| Bucket {
                tokens: TokenBucket::new(self.per_minute, f64::from(self.per_minute) / 60.0),
                last_attempt: now,
                users: UserSketch::new(now),
                reported: None,
            });
            bucket.last_attempt = now;
            bucket.tokens.take().map_err(|wait| {
                let report_due = bucket
                    .reported
                    .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
                let shared = report_due && bucket.users.distinct(now) >= SHARED_USERS;
                if shared {
                    bucket.reported = Some(now);
                }
                Refused { wait, shared }
            })
        };
        // The entry's shard lock is released: the sweep may lock every shard.
        self.sweep_if_due(now);
        result
    }

    /// Notes that the address `key` authenticated as `user` (after an allowed attempt).
    pub fn authenticated(&self, key: IpNet, user: &str) {
        let hash = self.hasher.hash_one(user);
        if let Some(mut bucket) = self.buckets.get_mut(&key) {
            bucket.users.add(hash, Instant::now());
        }
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

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn limits_each_address_and_forgets_idle_ones() {
        let limiter = ConnectLimiter::new(2);
        let a = net("10.0.0.1/32");
        let b = net("10.0.0.2/32");
        limiter.attempt(a).unwrap();
        limiter.attempt(a).unwrap();
        let wait = limiter.attempt(a).unwrap_err().wait;
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(30));
        limiter.attempt(b).unwrap();

        // Many addresses; a minute later as many again: the sweep when the map has doubled
        // drops the idle ones.
        let many = |range: std::ops::Range<u32>| {
            for i in range {
                let _ = limiter.attempt(IpNet::from(std::net::IpAddr::from(
                    std::net::Ipv4Addr::from(i),
                )));
            }
        };
        many(0..MIN_SWEEP as u32);
        assert_eq!(limiter.buckets.len(), MIN_SWEEP + 2, "nothing idle yet");
        tokio::time::advance(REFILL).await;
        many(MIN_SWEEP as u32..2 * MIN_SWEEP as u32);
        assert_eq!(limiter.buckets.len(), MIN_SWEEP);
        assert!(!limiter.buckets.contains_key(&a));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_address_of_many_users_is_reported_once_a_minute() {
        let limiter = ConnectLimiter::new(40);
        let proxy = net("10.0.0.1/32");
        let person = net("10.0.0.2/32");
        for i in 0..40 {
            limiter.attempt(proxy).unwrap();
            limiter.authenticated(proxy, &format!("user-{i}"));
            limiter.attempt(person).unwrap();
            limiter.authenticated(person, "always-the-same");
        }
        assert!(limiter.attempt(proxy).unwrap_err().shared);
        assert!(!limiter.attempt(proxy).unwrap_err().shared, "once a minute");
        assert!(!limiter.attempt(person).unwrap_err().shared, "one user");
        tokio::time::advance(REPORT_EVERY + Duration::from_secs(5)).await;
        for _ in 0..40 {
            let _ = limiter.attempt(proxy);
        }
        let refused = limiter.attempt(proxy).unwrap_err();
        assert!(refused.shared, "the users of the minute before still count");
        // Two quiet minutes later the users are forgotten.
        tokio::time::advance(3 * REFILL).await;
        for _ in 0..40 {
            let _ = limiter.attempt(proxy);
        }
        assert!(!limiter.attempt(proxy).unwrap_err().shared);
    }
}
