//! What the admin API's stats show of the matching state: who waits in which pool and how
//! long a newcomer would wait there, how many sessions are open, how many matches were made
//! lately, and (Redis mode) which instances are alive with how many users connected to each.
//! Both engines answer it from what they keep anyway; in Redis mode it covers the whole
//! deployment.

use std::sync::Arc;

/// The matching state at a glance ([`super::Matchmaker::overview`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    /// Pools somebody waits in (connected, or away within the resume grace).
    pub pools: Vec<PoolOverview>,
    /// Sessions open: live, or matched and waiting for acceptance or a media room.
    pub sessions: u64,
    /// Sessions that went live in the previous whole minute (UTC), and so far in this one.
    pub matches: MinuteCounts,
    /// Redis mode: the instances alive and the users connected to each. Empty in memory mode,
    /// where the only instance counts its own connections.
    pub instances: Vec<(String, u64)>,
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOverview {
    /// The pool's key (its preferences, length-prefixed: see `Prefs::pool_key`).
    pub pool: Arc<str>,
    /// Users listed there, those whose widened search reaches it included.
    pub waiting: u64,
    /// What a user who joined now would be told (`None` until the pool or any pool matched).
    pub estimated_wait_ms: Option<u64>,
}

/// Counts per UTC minute: the previous whole minute and the current one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteCounts {
    pub last_minute: u64,
    pub this_minute: u64,
    /// The minute (unix ms / 60,000) `this_minute` counts.
    minute: u64,
}

impl MinuteCounts {
    /// Counts one at `now_ms`.
    pub fn add(&mut self, now_ms: u64) {
        self.roll(now_ms);
        self.this_minute += 1;
    }

    /// The counts as of `now_ms`.
    pub fn at(mut self, now_ms: u64) -> MinuteCounts {
        self.roll(now_ms);
        self
    }

    /// From what Redis keeps: the counts of the previous and the current minute.
    pub fn from_buckets(last_minute: u64, this_minute: u64, now_ms: u64) -> MinuteCounts {
        MinuteCounts {
            last_minute,
            this_minute,
            minute: now_ms / 60_000,
        }
    }

    fn roll(&mut self, now_ms: u64) {
        let minute = now_ms / 60_000;
        if minute > self.minute {
            self.last_minute = if minute == self.minute + 1 {
                self.this_minute
            } else {
                0
            };
            self.this_minute = 0;
            self.minute = minute;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_counts_roll_over_and_forget_quiet_minutes() {
        let mut counts = MinuteCounts::default();
        counts.add(60_000);
        counts.add(61_000);
        let now = counts.at(119_999);
        assert_eq!((now.last_minute, now.this_minute), (0, 2));
        counts.add(120_000);
        assert_eq!((counts.last_minute, counts.this_minute), (2, 1));
        let later = counts.at(240_000);
        assert_eq!(
            (later.last_minute, later.this_minute),
            (0, 0),
            "a quiet minute"
        );
    }
}
