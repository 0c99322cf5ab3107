//! The one retry policy of the crate: exponential backoff with jitter, capped, built on
//! [`backon`]. Every loop that retries something after a failure (detaching a connection while
//! the backend is down, a timer, a LiveKit request, subscribing, the first heartbeat) takes its
//! delays from here, so that no two loops back off differently and nothing hammers a backend
//! that just came back: the jitter (up to the delay itself again) spreads retries that started
//! together, e.g. those of every instance after a Redis restart.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The delays of one retry loop: `first`, doubling up to `max`, each with jitter, for at most
/// `attempts` retries (`None`: until the caller stops).
pub fn policy(first: Duration, max: Duration, attempts: Option<usize>) -> ExponentialBuilder {
    let builder = ExponentialBuilder::new()
        .with_jitter()
        .with_factor(2.0)
        .with_min_delay(first)
        .with_max_delay(max);
    match attempts {
        Some(n) => builder.with_max_times(n),
        None => builder.without_max_times(),
    }
}

/// The delays of a loop that retries until it succeeds or is stopped, for loops that sleep
/// by themselves (e.g. inside a `select!`) rather than through [`backon::Retryable`].
pub struct Delays {
    delays: ExponentialBackoff,
    max: Duration,
}

impl Delays {
    pub fn new(first: Duration, max: Duration) -> Self {
        Delays {
            delays: policy(first, max, None).build(),
            max,
        }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // The policy has no attempt limit: the fallback is never taken.
        self.delays.next().unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_of_at_most_the_delay() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let mut delays = Delays::new(first, max);
        let delays: Vec<Duration> = (0..8).map(|_| delays.next_delay()).collect();
        let base = [100, 200, 400, 800, 1000, 1000, 1000, 1000].map(Duration::from_millis);
        for (delay, base) in delays.iter().zip(base) {
            assert!(
                *delay >= base && *delay <= base * 2,
                "{delay:?} for {base:?}"
            );
        }
        assert_eq!(policy(first, max, Some(3)).build().count(), 3);
    }
}
