//! The backend probe behind `/readyz`, answered from a cache.
//!
//! Load balancers, orchestrators and anyone who can reach the port ask for readiness, and each
//! answer needs the backends a handshake needs: the matching backend (a call of the Redis
//! function library in the scale-out mode) and the moderation backend (every handshake checks
//! bans; its connection reconnects on its own after an outage, and until it has, new clients
//! would be turned away with 1013). The answer is kept for [`PROBE_TTL`]: however many probes
//! arrive, the backends see at most one call each per interval, and concurrent probes wait for
//! the call in flight instead of making their own.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::matching::Administration;
use crate::moderation::{Identity, Moderation};

/// How long an answer of the backend is reused.
pub const PROBE_TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct BackendProbe {
    /// When the backend was last asked, and whether it answered.
    last: Mutex<Option<(Instant, bool)>>,
}

impl BackendProbe {
    /// Whether both backends answer, asking them at most once per [`PROBE_TTL`].
    pub(super) async fn answers(
        &self,
        matchmaker: &dyn Administration,
        moderation: &dyn Moderation,
    ) -> bool {
        // Held across the call: probes that arrive meanwhile get its answer.
        let mut last = self.last.lock().await;
        if let Some((at, answered)) = *last {
            if at.elapsed() < PROBE_TTL {
                return answered;
            }
        }
        // The ban check of a handshake, for nobody in particular.
        let nobody = Identity {
            user: "",
            device: None,
            networks: &[],
        };
        let answered = matchmaker.stats().await.is_ok() && moderation.ban_of(&nobody).await.is_ok();
        *last = Some((Instant::now(), answered));
        answered
    }
}
