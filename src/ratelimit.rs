//! A token bucket small enough to live in every connection (a few words of state, no clock
//! object, no allocation). Used for the per-connection message rate and the error budget.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    /// Tokens added per second.
    rate: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens, refilled by `rate_per_sec` tokens each second.
    pub fn new(capacity: u32, rate_per_sec: f64) -> Self {
        TokenBucket {
            capacity: capacity as f64,
            tokens: capacity as f64,
            rate: rate_per_sec,
            updated: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_a_burst_then_refills() {
        let mut b = TokenBucket::new(3, 2.0);
        for _ in 0..3 {
            b.take().unwrap();
        }
        let wait = b.take().unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        b.take().unwrap();
        assert!(b.take().is_err());
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            b.take().unwrap();
        }
        assert!(b.take().is_err(), "refill is capped at the capacity");
    }
}
