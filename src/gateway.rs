//! The gateway core: turns protocol requests into matchmaker operations and acts on what they
//! report (metrics, grace timers, throttled queue updates).
//!
//! It is the only place where the transport meets the matching domain. Connections call it with
//! parsed requests; it never touches a socket. Frames reach sockets through the
//! [`Bus`](crate::bus::Bus) and the [`Registry`].

mod detach;
mod media;
mod moderation;
mod probe;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use backon::Retryable;
use dashmap::DashMap;

use crate::backoff;
use crate::bus::local::LocalBus;
use crate::config::Config;
use crate::ids::unix_ms;
use crate::livekit::LiveKit;
use crate::matching::memory::{MemoryMatchmaker, Policy};
use crate::matching::{Attached, ConnId, MatchError, Matchmaker, Outcome, Resume, Timer, UserId};
use crate::metrics::Metrics;
use crate::protocol::{Action, ErrorCode, Reply, Request};
use crate::registry::Registry;

/// Retries per timer (about a minute of backend trouble).
const WAKE_RETRIES: usize = 14;

pub struct Gateway {
    matchmaker: Arc<dyn Matchmaker>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    resume_grace: Duration,
    queue_update_interval: Duration,
    /// Pools with a queue update already scheduled: at most one per pool and interval.
    refresh_pending: DashMap<Arc<str>, ()>,
    draining: AtomicBool,
    /// False while a scale-out instance has no pub/sub subscription yet.
    subscribed: AtomicBool,
    /// Media mode: LiveKit rooms for sessions.
    media: Option<media::Rooms>,
    /// Reports and bans.
    pub(crate) moderation: Arc<dyn crate::moderation::Moderation>,
    /// Readiness answers of the backend, cached.
    probe: probe::BackendProbe,
    /// Which connections to detach, and the detaches waiting for the backend.
    detaches: detach::Detaches,
    /// Outbound webhooks, when configured.
    webhooks: Option<Arc<crate::webhooks::Webhooks>>,
}

impl Gateway {
    /// The embedded default: in-memory matching, in-process delivery.
    pub fn in_memory(config: &Config) -> Arc<Self> {
        let registry = Arc::new(Registry::default());
        let bus = Arc::new(LocalBus::new(registry.clone()));
        let matchmaker = Arc::new(MemoryMatchmaker::new(
            bus,
            Policy {
                requeue_peer_on_skip: config.requeue_peer_on_skip,
                history_len: config.history_len,
                history_ttl: config.history_ttl(),
                media: config.media_mode(),
                rules: crate::matching::Rules::from_config(config),
            },
        ));
        Self::new(config, matchmaker, registry, Arc::new(Metrics::new()))
    }

    /// A gateway over any matchmaker; `registry` must be the one its bus delivers into.
    pub fn new(
        config: &Config,
        matchmaker: Arc<dyn Matchmaker>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            moderation: crate::moderation::from_config(config, &registry, &metrics),
            matchmaker,
            registry,
            resume_grace: config.resume_grace(),
            queue_update_interval: Duration::from_millis(config.queue_update_interval_ms),
            refresh_pending: DashMap::new(),
            draining: AtomicBool::new(false),
            subscribed: AtomicBool::new(true),
            probe: probe::BackendProbe::default(),
            media: LiveKit::from_config(config, metrics.clone()).map(|livekit| media::Rooms {
                livekit,
                create_deadline: Duration::from_millis(config.livekit_create_deadline_ms),
                orphan_age: config.media_pending().unwrap_or_default(),
                webhook_dedupe: Duration::from_secs(config.livekit_webhook_dedupe_s),
                sweep_interval: Duration::from_millis(config.livekit_sweep_interval_ms),
                creating: Arc::new(tokio::sync::Semaphore::new(media::CONCURRENT_CREATES)),
                deleting: Arc::new(tokio::sync::Semaphore::new(media::CONCURRENT_DELETES)),
                queued_deletes: Arc::new(AtomicUsize::new(0)),
            }),
            detaches: detach::Detaches::new(metrics.detach_pending.clone()),
            webhooks: crate::webhooks::Webhooks::from_config(&config.webhooks, &metrics.webhooks),
            metrics,
        })
    }

    /// Whether the instance should get traffic: not draining, subscribed for deliveries, and
    /// its matching and moderation backends answer (asked at most once a second).
    pub async fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.subscribed.load(Ordering::Acquire)
            && self
                .probe
                .answers(&*self.matchmaker, &*self.moderation)
                .await
    }

    /// Whether deliveries can reach connections here (false until a scale-out instance has
    /// subscribed): a connection accepted earlier could miss its first events.
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    pub fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Release);
    }

    /// Whether matches get LiveKit rooms (media mode `livekit`; otherwise `p2p`).
    pub fn livekit_mode(&self) -> bool {
        self.media.is_some()
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub async fn metrics_text(&self) -> String {
        let stats = self.matchmaker.stats().await.unwrap_or_default();
        self.metrics.render(stats)
    }

    pub async fn attach(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        let mut attached = self.matchmaker.attach(user, conn, resume).await?;
        self.detaches.attached(user, conn);
        self.apply(user, conn, std::mem::take(&mut attached.outcome));
        Ok(attached)
    }

    /// The `error` frame for a connection that could not attach (or was let in unchecked):
    /// details go to the log with the connection's id, the client gets fixed text.
    pub fn attach_failed(&self, conn: ConnId, e: &MatchError) -> Utf8Bytes {
        tracing::warn!(%conn, error = %e, "attach failed");
        self.error_frame(e.code(), &e.client_message(), None, Some(1_000))
    }

    /// Handles one request and returns the direct reply frame, if the reply is not an event
    /// (events travel through the bus), and whether it is an error the client caused.
    pub async fn handle(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        req: Request<'_>,
    ) -> Option<(Utf8Bytes, bool)> {
        let reference = req.reference.as_deref();
        let result = match req.action {
            Action::Enqueue(prefs) => self.matchmaker.enqueue(user, prefs, reference).await,
            Action::Skip => self.matchmaker.skip(user, reference).await,
            Action::End => self.matchmaker.end(user, reference).await,
            // These change no state of the sender's that an event would report in every case
            // (the other one may not have accepted yet; there may be no live session): their
            // direct reply is an `ack`, and the events they cause carry no `ref`.
            Action::Accept { match_id } => {
                let result = self.matchmaker.accept(user, &match_id).await;
                return Some(self.acknowledge(user, conn, "accept", result, reference));
            }
            Action::Decline { match_id } => {
                let result = self.matchmaker.decline(user, &match_id).await;
                return Some(self.acknowledge(user, conn, "decline", result, reference));
            }
            // Relayed as they come: awaited one after the other, so the peer gets one
            // connection's messages in the order it sent them. Never logged.
            Action::Relay(message) => {
                let action = message.name();
                let result = self.matchmaker.relay(user, message).await;
                if result.is_ok() {
                    self.metrics.relayed(action);
                }
                let result = result.map(|()| Outcome::default());
                return Some(self.acknowledge(user, conn, action, result, reference));
            }
            Action::Block { session_id } => {
                let result = self.matchmaker.block(user, session_id.as_deref()).await;
                return Some(self.acknowledge(user, conn, "block", result, reference));
            }
            Action::Report {
                reason,
                details,
                session_id,
            } => {
                return Some(
                    self.report(
                        user,
                        conn,
                        reason,
                        details,
                        session_id.as_deref(),
                        reference,
                    )
                    .await,
                );
            }
            Action::Heartbeat => {
                let ack = Reply::HeartbeatAck {
                    server_time_ms: unix_ms(),
                    reference,
                };
                return Some((ack.encode(), false));
            }
            Action::Status => {
                return Some(match self.matchmaker.status(user).await {
                    Ok(s) => {
                        let status = Reply::Status {
                            state: s.state,
                            position: s.position,
                            estimated_wait_ms: s.estimated_wait_ms,
                            session_id: s.session_id.as_deref(),
                            peer: s.peer.as_deref(),
                            role: s.role,
                            reference,
                        };
                        (status.encode(), false)
                    }
                    Err(e) => self.match_error(conn, &e, reference),
                })
            }
        };
        match result {
            Ok(outcome) => {
                self.apply(user, conn, outcome);
                None
            }
            Err(e) => Some(self.match_error(conn, &e, reference)),
        }
    }

    /// Applies an operation answered with an `ack`, or its error.
    fn acknowledge(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        action: &str,
        result: Result<Outcome, MatchError>,
        reference: Option<&str>,
    ) -> (Utf8Bytes, bool) {
        match result {
            Ok(outcome) => {
                self.apply(user, conn, outcome);
                (Reply::Ack { action, reference }.encode(), false)
            }
            Err(e) => self.match_error(conn, &e, reference),
        }
    }

    /// The error frame for a failed operation of connection `conn`, and whether the client
    /// caused it (and so pays from its error budget): not when the backend is down or we have
    /// a bug. Those are logged with their details, which the client does not get.
    fn match_error(
        &self,
        conn: ConnId,
        e: &MatchError,
        reference: Option<&str>,
    ) -> (Utf8Bytes, bool) {
        if !e.client_caused() {
            tracing::warn!(%conn, error = %e, "request failed");
        }
        let message = e.client_message();
        let frame = self.error_frame(e.code(), &message, reference, e.retry_after_ms());
        (frame, e.client_caused())
    }

    /// Builds an `error` frame and counts it.
    pub fn error_frame(
        &self,
        code: ErrorCode,
        message: &str,
        reference: Option<&str>,
        retry_after_ms: Option<u64>,
    ) -> Utf8Bytes {
        self.metrics.protocol_error(code);
        Reply::Error {
            code,
            message,
            reference,
            retry_after_ms,
        }
        .encode()
    }

    /// Sends the webhook event `event` makes, when webhooks are configured.
    pub(crate) fn notify(&self, event: impl FnOnce() -> crate::webhooks::Event) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.send(event());
        }
    }

    /// At shutdown: delivers the webhook events still waiting, until `deadline`.
    pub async fn flush_webhooks(&self, deadline: tokio::time::Instant) {
        if let Some(webhooks) = &self.webhooks {
            let left = webhooks.flush(deadline).await;
            if left > 0 {
                tracing::warn!(
                    events = left,
                    "webhook events not delivered at the drain timeout"
                );
            }
        }
    }

    /// Acts on what a background operation (not tied to one connection) reported.
    pub fn apply_outcome(self: &Arc<Self>, outcome: Outcome) {
        debug_assert!(!outcome.held, "held states need a user and a connection");
        self.effects(outcome);
    }

    /// What every outcome entails: metrics, queue updates, and rooms to set up or remove.
    fn effects(self: &Arc<Self>, outcome: Outcome) {
        for waited in &outcome.waits {
            self.metrics.matched_after(*waited);
        }
        for _ in 0..outcome.waits.len() / 2 {
            self.metrics.matches.inc();
        }
        for closed in &outcome.closed {
            self.metrics.session_ended(closed.reason);
        }
        if let Some(webhooks) = &self.webhooks {
            for started in &outcome.started {
                webhooks.send(crate::webhooks::Event::session_started(started));
            }
            for closed in &outcome.closed {
                webhooks.send(crate::webhooks::Event::session_ended(closed));
            }
        }
        for pool in outcome.changed_pools {
            self.schedule_refresh(pool);
        }
        for pending in outcome.pending {
            self.set_up_room(pending);
        }
        for session in outcome.ended_sessions {
            self.remove_room(&session);
        }
        for (delay, user, timer) in outcome.timers {
            self.schedule_wake(delay, user, timer);
        }
    }

    /// Arms a timer an outcome asked for. One small task per timer; timers only exist for
    /// users who wait (relaxation, anti-repeat fallback) or have a proposal open.
    fn schedule_wake(self: &Arc<Self>, delay: Duration, user: UserId, timer: Timer) {
        let gateway = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A timer that fails (backend briefly away) is tried again: a lost one would leave
            // a user waiting for a widening or a fallback that never comes.
            let wake = || gateway.matchmaker.wake(&user, timer.clone());
            let policy = backoff::policy(
                Duration::from_millis(250),
                Duration::from_secs(5),
                Some(WAKE_RETRIES),
            );
            let woken = wake
                .retry(policy)
                .when(|e| matches!(e, MatchError::Unavailable(_)))
                .notify(|e, _| tracing::warn!(error = %e, "timer failed: trying again"))
                .await;
            match woken {
                Ok(outcome) => gateway.apply_outcome(outcome),
                Err(e) => tracing::error!(error = %e, "timer failed for good"),
            }
        });
    }

    /// Acts on what an operation reported.
    fn apply(self: &Arc<Self>, user: &UserId, conn: ConnId, outcome: Outcome) {
        if outcome.held {
            self.schedule_expiry(user.clone(), conn);
        }
        self.effects(outcome);
    }

    /// Queue updates are throttled per pool: the first change arms one timer, later changes
    /// within the interval ride along. Nothing runs while no pool changes.
    fn schedule_refresh(self: &Arc<Self>, pool: Arc<str>) {
        if self.refresh_pending.insert(pool.clone(), ()).is_some() {
            return;
        }
        let gateway = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(gateway.queue_update_interval).await;
            gateway.refresh_pending.remove(&pool);
            if let Err(e) = gateway.matchmaker.refresh_pool(&pool).await {
                tracing::warn!(error = %e, "queue update failed");
            }
        });
    }

    /// After the grace period the held state of a dropped connection goes, unless the user
    /// came back (the matchmaker checks that under its lock).
    fn schedule_expiry(self: &Arc<Self>, user: UserId, conn: ConnId) {
        let gateway = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(gateway.resume_grace).await;
            match gateway.matchmaker.expire(&user, conn).await {
                Ok(outcome) => gateway.apply(&user, conn, outcome),
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
        });
    }
}
