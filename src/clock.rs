//! Where the matching engines read the time: the system clock in production, a clock the test
//! moves by hand in the differential model test (`tests/model.rs`).
//!
//! Every rule of both engines is written against one `now` per atomic step; with a
//! [`ManualClock`] the memory engine reads it here and the Redis engine passes it into its
//! library instead of Redis's `TIME`, so the same operation sequence, at the same instants,
//! must produce the same events in both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of the current time, as a monotonic instant and as Unix milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
    fn unix_ms(&self) -> u64;
}

/// The real time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> u64 {
        crate::ids::unix_ms()
    }
}

/// A clock that stands still until [`ManualClock::advance`] moves it, in whole milliseconds.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_unix_ms: u64,
    elapsed_ms: AtomicU64,
}

impl ManualClock {
    /// A clock that reads `start_unix_ms` until moved.
    pub fn new(start_unix_ms: u64) -> Self {
        ManualClock {
            start: Instant::now(),
            start_unix_ms,
            elapsed_ms: AtomicU64::new(0),
        }
    }

    /// Moves the clock forward (sub-millisecond parts are dropped).
    pub fn advance(&self, by: Duration) {
        self.elapsed_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    /// How far the clock was moved since it was made.
    pub fn elapsed(&self) -> Duration {
        Duration::from_millis(self.elapsed_ms.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn unix_ms(&self) -> u64 {
        self.start_unix_ms + self.elapsed_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        let before = clock.now();
        assert_eq!(clock.unix_ms(), 1_000);
        assert_eq!(clock.now(), before);
        clock.advance(Duration::from_millis(2_500));
        assert_eq!(clock.unix_ms(), 3_500);
        assert_eq!(clock.now() - before, Duration::from_millis(2_500));
    }
}
