//! A live connection does not outlive its token: the timer of one connection's token.
//!
//! `notice` before the token's `exp` the connection tells the client (`token_expiring`), but
//! never before half of the token's remaining life (as of when the connection got it) has
//! passed: a client whose tokens live shorter than `notice` would otherwise be asked to
//! refresh again right after every refresh. A valid `refresh` moves `exp` and starts over;
//! without one the connection closes at `exp` plus `grace` (the JWT leeway and the expiry
//! grace). Each connection owns one such timer,
//! driven by its own task's `select!`: nothing ever scans all connections.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// What the timer asks the connection to do when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Send `token_expiring` with this `expires_at_ms`.
    Notice { expires_at_ms: u64 },
    /// The token expired and no refresh came: close.
    Close,
}

#[derive(Debug, Clone)]
pub struct TokenLifetime {
    expires_at_ms: u64,
    /// When the connection got the token, in Unix ms.
    received_at_ms: u64,
    noticed: bool,
    notice: Duration,
    grace: Duration,
}

impl TokenLifetime {
    /// The timer of a token with this `exp` (Unix seconds).
    pub fn new(exp_secs: u64, notice: Duration, grace: Duration) -> Self {
        TokenLifetime {
            expires_at_ms: exp_secs.saturating_mul(1000),
            received_at_ms: unix_ms(),
            noticed: false,
            notice,
            grace,
        }
    }

    /// When the timer fires next.
    pub fn deadline(&self) -> Instant {
        let at_ms = if self.noticed {
            self.expires_at_ms
                .saturating_add(self.grace.as_millis() as u64)
        } else {
            let halfway =
                self.received_at_ms + self.expires_at_ms.saturating_sub(self.received_at_ms) / 2;
            self.expires_at_ms
                .saturating_sub(self.notice.as_millis() as u64)
                .max(halfway)
        };
        let in_ms = at_ms.saturating_sub(unix_ms());
        // A far-off deadline (an `exp` centuries ahead) stays far off without overflowing.
        Instant::now() + Duration::from_millis(in_ms.min(u32::MAX as u64 * 1000))
    }

    /// The timer fired: what to do (the next [`deadline`](Self::deadline) follows from it).
    pub fn fire(&mut self) -> Due {
        if self.noticed {
            Due::Close
        } else {
            self.noticed = true;
            Due::Notice {
                expires_at_ms: self.expires_at_ms,
            }
        }
    }

    /// A refresh brought a token with this `exp`: the timer starts over from it.
    pub fn renew(&mut self, exp_secs: u64) {
        self.expires_at_ms = exp_secs.saturating_mul(1000);
        self.received_at_ms = unix_ms();
        self.noticed = false;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_then_closes_and_a_renewal_starts_over() {
        let exp = unix_ms() / 1000 + 3600;
        let mut t = TokenLifetime::new(exp, Duration::from_secs(60), Duration::from_secs(10));
        let notice_at = t.deadline();
        assert_eq!(
            t.fire(),
            Due::Notice {
                expires_at_ms: exp * 1000
            }
        );
        let close_at = t.deadline();
        assert!(close_at > notice_at);
        assert_eq!(t.fire(), Due::Close);
        t.renew(exp + 3600);
        assert!(t.deadline() > close_at);
        assert_eq!(
            t.fire(),
            Due::Notice {
                expires_at_ms: (exp + 3600) * 1000
            }
        );
    }

    #[test]
    fn a_token_shorter_than_the_notice_is_noticed_halfway() {
        let exp = unix_ms() / 1000 + 20;
        let t = TokenLifetime::new(exp, Duration::from_secs(60), Duration::from_secs(10));
        let wait = t.deadline() - Instant::now();
        assert!(
            wait > Duration::from_secs(8) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
    }

    #[test]
    fn an_expired_token_is_noticed_at_once() {
        let exp = unix_ms() / 1000 - 5;
        let t = TokenLifetime::new(exp, Duration::from_secs(60), Duration::from_secs(10));
        assert!(t.deadline() <= Instant::now());
    }
}
