//! The gateway core: turns protocol requests into engine operations and acts on what they
//! report (metrics, grace timers, throttled queue updates, media rooms).
//!
//! It is the only place where the transport meets the matching domain. Connections call it with
//! parsed requests and get an [`Answer`] back; it never touches a socket. Frames reach sockets
//! through the [`Bus`](crate::bus::Bus) and the [`Registry`]. It holds the engine as one
//! [`Engine`] (the four traits of [`crate::matching`]); every [`Outcome`] an operation
//! returns, whoever called it (a connection, a timer, the media side, the Redis heartbeat), is
//! acted on in one step, [`Gateway::apply`]. The timers and other work it starts run in the
//! server's [`Background`], so the drain cancels and awaits them.
//!
//! It is built from its own section ([`SessionConfig`]), the LiveKit section and the attribute
//! policy ([`AttributeConfig`]: what `want` may name, what a user needs to be queued), over the
//! engine and moderation backend the server picked ([`Gateway::in_memory`] builds the embedded
//! ones from the rules and moderation sections), never from the whole configuration.

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

use crate::attributes::{AttributeConfig, AttributePolicy, AttributeRefusal, Attributes};
use crate::backoff;
use crate::bus::local::LocalBus;
use crate::flags::{count, millis};
use crate::ids::{unix_ms, ConnId, KeyedHasher, UserId};
use crate::livekit::{LiveKit, LivekitConfig};
use crate::matching::memory::{MemoryMatchmaker, Policy};
use crate::matching::{
    Attached, Engine, MatchError, MediaMode, Outcome, Resume, RulesConfig, Timer,
};
use crate::metrics::Metrics;
use crate::moderation::{Moderation, ModerationConfig};
use crate::protocol::{Action, ErrorCode, Reply, Request};
use crate::registry::Registry;
use crate::shutdown::Background;

/// The session section of the configuration: what survives a dropped connection, and how
/// often waiting users hear about the queue.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionConfig {
    /// How long a dropped user's queue place or session is held for a resume, in ms.
    #[arg(
        long,
        env = "MATCHGATE_RESUME_GRACE_MS",
        default_value = "15000",
        value_parser = millis(..)
    )]
    pub resume_grace_ms: Duration,

    /// Events kept per user for replay after a resume.
    /// Keep it above the outbound queue, so that a slow consumer closed for a full queue gets
    /// everything back by resuming.
    #[arg(
        long,
        env = "MATCHGATE_HISTORY_LEN",
        default_value = "128",
        value_parser = count(1..)
    )]
    pub history_len: usize,

    /// Whether the peer of a user who skips (or times out) is put back in the queue.
    #[arg(
        long,
        env = "MATCHGATE_REQUEUE_PEER_ON_SKIP",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub requeue_peer_on_skip: bool,

    /// Least time between two `queue_update`s for the users of one pool, in ms.
    #[arg(
        long,
        env = "MATCHGATE_QUEUE_UPDATE_INTERVAL_MS",
        default_value = "1000",
        value_parser = millis(..)
    )]
    pub queue_update_interval_ms: Duration,
}

/// Retries per timer (about a minute of backend trouble).
const WAKE_RETRIES: usize = 14;

/// The direct reply to one request (when its reply is not an event).
#[derive(Debug)]
pub struct Answer {
    pub frame: Utf8Bytes,
    /// An `error` the client caused: it pays from the connection's error budget. Not when the
    /// backend is down or we have a bug.
    pub client_error: bool,
}

impl Answer {
    fn reply(frame: Utf8Bytes) -> Answer {
        Answer {
            frame,
            client_error: false,
        }
    }
}

/// Who an [`Outcome`] is applied for.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// An operation of this connection of the user: a held state (after `detach`, or the
    /// first phase of an expiry) expires after the grace period unless they come back.
    Connection(&'a UserId, ConnId),
    /// Background work tied to no connection (timers, media, the heartbeat): it never holds
    /// a state.
    Background,
}

pub struct Gateway {
    matchmaker: Arc<dyn Engine>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    resume_grace: Duration,
    queue_update_interval: Duration,
    /// Pools with a queue update already scheduled: at most one per pool and interval.
    refresh_pending: DashMap<Arc<str>, (), KeyedHasher>,
    draining: AtomicBool,
    /// False while a scale-out instance has no pub/sub subscription yet.
    subscribed: AtomicBool,
    /// Media mode: LiveKit rooms for sessions.
    media: Option<media::Rooms>,
    /// Reports and bans.
    pub(crate) moderation: Arc<dyn crate::moderation::Moderation>,
    /// Which attributes `want` may name and which ones a user needs to be queued: checked
    /// here, before the engine, so that a refused `enqueue` changes nothing.
    attributes: AttributePolicy,
    /// Readiness answers of the backend, cached.
    probe: probe::BackendProbe,
    /// Which connections to detach, and the detaches waiting for the backend.
    detaches: detach::Detaches,
    /// Where timers, room set-ups and removals and the detach queue run.
    background: Background,
    /// The session ledger, with `--database-url`.
    pub(crate) ledger: Option<Arc<crate::ledger::Ledger>>,
    /// Outbound webhooks, when configured.
    webhooks: Option<Arc<crate::webhooks::Webhooks>>,
}

/// The configuration sections a gateway reads (the server hands them over; the gateway never
/// sees the whole configuration).
#[derive(Clone, Copy)]
pub struct Sections<'a> {
    pub session: &'a SessionConfig,
    pub rules: &'a RulesConfig,
    pub livekit: &'a LivekitConfig,
    pub moderation: &'a ModerationConfig,
    pub ledger: &'a crate::ledger::LedgerConfig,
    pub webhooks: &'a crate::webhooks::WebhookConfig,
    pub attributes: &'a AttributeConfig,
}

impl Gateway {
    /// The embedded default: in-memory matching, moderation and in-process delivery, from
    /// the sections the gateway and the engine read, the media mode and how long events stay
    /// replayable.
    pub fn in_memory(
        sections: Sections<'_>,
        media: MediaMode,
        history_ttl: Duration,
        background: Background,
    ) -> Arc<Self> {
        let session = sections.session;
        let registry = Arc::new(Registry::default());
        let metrics = Arc::new(Metrics::new());
        let bus = Arc::new(LocalBus::new(registry.clone()));
        let matchmaker = Arc::new(MemoryMatchmaker::new(
            bus,
            Policy {
                requeue_peer_on_skip: session.requeue_peer_on_skip,
                history_len: session.history_len,
                history_ttl,
                media,
                rules: crate::matching::Rules::from_config(sections.rules),
            },
        ));
        let moderation =
            crate::moderation::from_config(sections.moderation, None, &registry, &metrics);
        Self::new(
            sections,
            matchmaker,
            moderation,
            registry,
            metrics,
            background,
            crate::webhooks::Store::Memory,
        )
    }

    /// A gateway over any engine and moderation backend; `registry` must be the one its bus
    /// delivers into. Its background work runs in `background`; its webhook events wait in
    /// `webhook_store`.
    pub fn new(
        sections: Sections<'_>,
        matchmaker: Arc<dyn Engine>,
        moderation: Arc<dyn Moderation>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        background: Background,
        webhook_store: crate::webhooks::Store,
    ) -> Arc<Self> {
        let (session, livekit) = (sections.session, sections.livekit);
        let ledger = crate::ledger::Ledger::from_config(sections.ledger, metrics.ledger.clone());
        if let Some(ledger) = &ledger {
            let blocks = crate::ledger::BlockScope {
                ttl: sections.rules.block_ttl_s,
                max_per_user: sections.rules.max_blocks_per_user,
            };
            ledger.start(matchmaker.clone(), moderation.clone(), blocks, &background);
        }
        Arc::new(Gateway {
            moderation,
            attributes: sections.attributes.policy(),
            ledger,
            matchmaker,
            registry,
            resume_grace: session.resume_grace_ms,
            queue_update_interval: session.queue_update_interval_ms,
            refresh_pending: DashMap::default(),
            draining: AtomicBool::new(false),
            subscribed: AtomicBool::new(true),
            probe: probe::BackendProbe::default(),
            media: LiveKit::from_config(livekit, metrics.clone()).map(|client| media::Rooms {
                livekit: client,
                create_deadline: livekit.livekit_create_deadline_ms,
                orphan_age: livekit
                    .media_pending(session.resume_grace_ms)
                    .unwrap_or_default(),
                webhook_dedupe: livekit.livekit_webhook_dedupe_s,
                sweep_interval: livekit.livekit_sweep_interval_ms,
                creating: Arc::new(tokio::sync::Semaphore::new(media::CONCURRENT_CREATES)),
                deleting: Arc::new(tokio::sync::Semaphore::new(media::CONCURRENT_DELETES)),
                queued_deletes: Arc::new(AtomicUsize::new(0)),
            }),
            detaches: detach::Detaches::new(metrics.detach_pending.clone()),
            webhooks: crate::webhooks::Webhooks::from_config(
                sections.webhooks,
                &metrics.webhooks,
                webhook_store,
                &background,
            ),
            metrics,
            background,
        })
    }

    /// Whether the instance should get traffic: not draining, subscribed for deliveries, and
    /// its matching and moderation backends answer (asked at most once a second).
    pub async fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.subscribed.load(Ordering::Acquire)
            && self.ledger.as_ref().is_none_or(|l| l.restored())
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
        self.metrics.render(stats.queued, stats.sessions)
    }

    pub async fn attach(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        let mut attached = self.matchmaker.attach(user, conn, resume).await?;
        self.detaches.attached(user, conn);
        let outcome = std::mem::take(&mut attached.outcome);
        self.apply(Origin::Connection(user, conn), outcome);
        Ok(attached)
    }

    /// The `error` frame for a connection that could not attach (or was let in unchecked):
    /// details go to the log with the connection's id, the client gets fixed text.
    pub fn attach_failed(&self, conn: ConnId, e: &MatchError) -> Utf8Bytes {
        tracing::warn!(%conn, error = %e, "attach failed");
        self.error_frame(e.code(), &e.client_message(), None, Some(1_000))
    }

    /// Handles one request and returns the direct reply, if the reply is not an event (events
    /// travel through the bus).
    pub async fn handle(
        self: &Arc<Self>,
        user: &UserId,
        conn: ConnId,
        attributes: &Arc<Attributes>,
        req: Request<'_>,
    ) -> Option<Answer> {
        let reference = req.reference.as_deref();
        let result = match req.action {
            Action::Enqueue(prefs) => {
                if let Err(e) = self.attributes.admit(&prefs.want, attributes) {
                    return Some(self.attribute_refusal(&e, reference));
                }
                self.matchmaker
                    .enqueue(user, prefs, attributes.clone(), reference)
                    .await
            }
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
                let result = self.block(user, session_id.as_deref()).await;
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
            // The connection answers `refresh` itself (it owns the token's timer) and never
            // passes it on.
            Action::Refresh { .. } => unreachable!("refresh is answered by the connection"),
            Action::Heartbeat => {
                let ack = Reply::HeartbeatAck {
                    server_time_ms: unix_ms(),
                    reference,
                };
                return Some(Answer::reply(ack.encode()));
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
                        Answer::reply(status.encode())
                    }
                    Err(e) => self.match_error(conn, &e, reference),
                })
            }
        };
        match result {
            Ok(outcome) => {
                self.apply(Origin::Connection(user, conn), outcome);
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
    ) -> Answer {
        match result {
            Ok(outcome) => {
                self.apply(Origin::Connection(user, conn), outcome);
                Answer::reply(Reply::Ack { action, reference }.encode())
            }
            Err(e) => self.match_error(conn, &e, reference),
        }
    }

    /// The error answer for a failed operation of connection `conn`. Errors the client did
    /// not cause (the backend is down, or we have a bug) are logged with their details, which
    /// the client does not get.
    fn match_error(&self, conn: ConnId, e: &MatchError, reference: Option<&str>) -> Answer {
        if !e.client_caused() {
            tracing::warn!(%conn, error = %e, "request failed");
        }
        let message = e.client_message();
        Answer {
            frame: self.error_frame(e.code(), &message, reference, e.retry_after_ms()),
            client_error: e.client_caused(),
        }
    }

    /// The `error` for an `enqueue` the attribute policy refused: the one place its refusals
    /// get their protocol codes.
    fn attribute_refusal(&self, e: &AttributeRefusal, reference: Option<&str>) -> Answer {
        let code = match e {
            AttributeRefusal::NotFilterable { .. } => ErrorCode::BadRequest,
            AttributeRefusal::Required(_) => ErrorCode::AttributeRequired,
        };
        Answer {
            frame: self.error_frame(code, &e.to_string(), reference, None),
            client_error: true,
        }
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

    /// Acts on what an operation reported, whoever called it: metrics, queue updates, rooms
    /// to set up or remove, timers to arm, and (for a connection's operation) the expiry of a
    /// held state. The one place an [`Outcome`] is acted on.
    pub fn apply(self: &Arc<Self>, origin: Origin<'_>, outcome: Outcome) {
        if outcome.held {
            match origin {
                Origin::Connection(user, conn) => self.schedule_expiry(user.clone(), conn),
                Origin::Background => {
                    debug_assert!(false, "held states need a user and a connection");
                    tracing::error!("a background operation held a state: nothing expires it");
                }
            }
        }
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
        if let Some(ledger) = &self.ledger {
            ledger.sessions(outcome.started, outcome.closed);
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
        self.background.spawn(async move {
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
                Ok(outcome) => gateway.apply(Origin::Background, outcome),
                Err(e) => tracing::error!(error = %e, "timer failed for good"),
            }
        });
    }

    /// Queue updates are throttled per pool: the first change arms one timer, later changes
    /// within the interval ride along. Nothing runs while no pool changes.
    fn schedule_refresh(self: &Arc<Self>, pool: Arc<str>) {
        if self.refresh_pending.insert(pool.clone(), ()).is_some() {
            return;
        }
        let gateway = self.clone();
        self.background.spawn(async move {
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
        self.background.spawn(async move {
            tokio::time::sleep(gateway.resume_grace).await;
            match gateway.matchmaker.expire(&user, conn).await {
                Ok(outcome) => gateway.apply(Origin::Connection(&user, conn), outcome),
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
        });
    }
}
