//! The media side of the gateway (media mode `livekit`): a room for every match before anyone
//! hears of it, the room's removal after every kind of end, LiveKit's webhooks, and a sweep
//! that reconciles rooms with sessions after crashes.
//!
//! The engine keeps a new session *pending* (both users still look queued) and reports it in
//! the [`Outcome`](crate::matching::Outcome). A task per pending session creates the room,
//! retrying with backoff up to the creation deadline, then calls
//! [`media_ready`](crate::matching::MediaEvents::media_ready) (both get `matched` with their
//! token) or [`media_failed`](crate::matching::MediaEvents::media_failed) (both go back to
//! their queue places with a `media_unavailable` error). None of this runs under the
//! matchmaker's lock or inside a Redis call, so a slow LiveKit never holds up anybody else's
//! matching. If the instance dies meanwhile, the Redis backend undoes the pending match by
//! itself after a deadline.
//!
//! Room removal is fire-and-forget with retries: a bounded number of deletes run at once and a
//! bounded number wait; beyond that (or after the retries) the sweep removes the room later.
//!
//! Every task here runs in the gateway's [`Background`](crate::shutdown::Background), so the
//! drain cancels and awaits them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use backon::Retryable;
use livekit_api::webhooks::WebhookError;
use tokio::sync::{watch, Semaphore};

use super::{Gateway, Origin};
use crate::backoff;
use crate::ids::{random_id, unix_ms};
use crate::livekit::{LiveKit, LiveKitError};
use crate::matching::{MatchError, MediaEffect, MediaLeft, MediaReady, PendingSession};
use crate::protocol::ErrorCode;

/// Room creations in flight at once; more pending sessions wait for a slot (their deadline
/// runs meanwhile).
pub(super) const CONCURRENT_CREATES: usize = 64;
/// Room deletions in flight at once.
pub(super) const CONCURRENT_DELETES: usize = 32;
/// Deletions waiting for a slot; beyond this they are left to the sweep.
const MAX_QUEUED_DELETES: usize = 10_000;
/// Retries per deletion (after the first attempt) before it is left to the sweep.
const DELETE_RETRIES: usize = 4;
/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The sweep's lease name (one instance of a deployment sweeps at a time).
const SWEEP_LEASE: &str = "livekit-sweep";

pub(super) struct Rooms {
    pub livekit: LiveKit,
    pub create_deadline: Duration,
    /// Rooms without a session, and live sessions without a room, are only cleaned up once
    /// they are older than this: younger ones may still be in the middle of being set up.
    pub orphan_age: Duration,
    pub webhook_dedupe: Duration,
    pub sweep_interval: Duration,
    pub creating: Arc<Semaphore>,
    pub deleting: Arc<Semaphore>,
    pub queued_deletes: Arc<AtomicUsize>,
}

impl Gateway {
    /// Sets up the room of a pending session in the background.
    pub(super) fn set_up_room(self: &Arc<Self>, pending: PendingSession) {
        if self.media.is_none() {
            return;
        }
        let gateway = self.clone();
        self.background.spawn(async move {
            let Some(rooms) = &gateway.media else { return };
            let deadline = tokio::time::Instant::now() + rooms.create_deadline;
            let created = tokio::time::timeout_at(deadline, async {
                let _slot = rooms.creating.acquire().await;
                // Every error is retried until the deadline, even ones that look final (bad
                // credentials): a failed match puts both users straight back in the queue, so
                // failing fast would spin.
                let create = || rooms.livekit.create_room(&pending.session_id);
                create
                    .retry(backoff::policy(FIRST_BACKOFF, MAX_BACKOFF, None))
                    .notify(|e, _| {
                        tracing::warn!(error = %e, session = %pending.session_id, "room creation failed");
                    })
                    .await
            })
            .await;
            let media = created.ok().and_then(Result::ok).and_then(|room| {
                match rooms.livekit.media(&room, &pending.handles) {
                    Ok(media) => Some(media),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot sign join tokens");
                        None
                    }
                }
            });
            match media {
                Some(media) => {
                    gateway.metrics.livekit_room("created");
                    match gateway
                        .matchmaker
                        .media_ready(&pending.session_id, media)
                        .await
                    {
                        Ok(MediaReady {
                            live: true,
                            outcome,
                        }) => gateway.apply(Origin::Background, outcome),
                        // A member left while the room was being made: the room goes again.
                        Ok(MediaReady {
                            live: false,
                            outcome,
                        }) => {
                            gateway.apply(Origin::Background, outcome);
                            gateway.remove_room(&pending.session_id);
                        }
                        // The backend undoes the pending match by itself; the sweep removes
                        // the room.
                        Err(e) => tracing::warn!(error = %e, "cannot announce a match"),
                    }
                }
                None => {
                    gateway.metrics.livekit_room("create_failed");
                    match gateway.matchmaker.media_failed(&pending.session_id).await {
                        Ok(outcome) => {
                            if outcome.ended_sessions.is_empty() {
                                // Undone earlier, by a member leaving, perhaps before a
                                // creation that timed out on our side still happened: that
                                // room goes too. (Undone now, the outcome deletes it.)
                                gateway.remove_room(&pending.session_id);
                            } else {
                                // Both were told.
                                for _ in 0..2 {
                                    gateway.metrics.protocol_error(ErrorCode::MediaUnavailable);
                                }
                            }
                            gateway.apply(Origin::Background, outcome);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot undo a match"),
                    }
                }
            }
        });
    }

    /// Deletes the room of an ended session in the background (idempotent; a room that does
    /// not exist counts as deleted).
    pub(super) fn remove_room(self: &Arc<Self>, session: &str) {
        let Some(rooms) = &self.media else { return };
        if rooms.queued_deletes.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED_DELETES {
            rooms.queued_deletes.fetch_sub(1, Ordering::AcqRel);
            self.metrics.livekit_room("delete_failed");
            return;
        }
        let name = rooms.livekit.room_name(session);
        let gateway = self.clone();
        self.background.spawn(async move {
            let Some(rooms) = &gateway.media else { return };
            let slot = rooms.deleting.acquire().await;
            rooms.queued_deletes.fetch_sub(1, Ordering::AcqRel);
            let _slot = slot;
            let delete = || rooms.livekit.delete_room(&name);
            let deleted = delete
                .retry(backoff::policy(
                    FIRST_BACKOFF,
                    MAX_BACKOFF,
                    Some(DELETE_RETRIES),
                ))
                .notify(|e, _| tracing::warn!(error = %e, room = %name, "room deletion failed"))
                .await;
            let event = if deleted.is_ok() {
                "deleted"
            } else {
                "delete_failed"
            };
            gateway.metrics.livekit_room(event);
        });
    }

    /// Handles one LiveKit webhook: checks its signature and acts on participants leaving and
    /// rooms closing. Answers what LiveKit should hear: 2xx for anything it need not resend,
    /// 401 for a bad signature, 503 when the backend is down (LiveKit retries).
    pub async fn livekit_webhook(
        self: &Arc<Self>,
        body: &str,
        authorization: Option<&str>,
    ) -> (StatusCode, &'static str) {
        let Some(rooms) = &self.media else {
            return (StatusCode::NOT_FOUND, "media mode is off");
        };
        let event = match authorization.map(|auth| rooms.livekit.verify_webhook(body, auth)) {
            Some(Ok(event)) => event,
            // Signed correctly, but not an event.
            Some(Err(LiveKitError::Webhook(WebhookError::InvalidData(e)))) => {
                tracing::debug!(error = %e, "webhook body unreadable");
                self.metrics.livekit_webhook("bad_request");
                return (StatusCode::BAD_REQUEST, "body is not a webhook event");
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "webhook rejected");
                self.metrics.livekit_webhook("unauthorized");
                return (StatusCode::UNAUTHORIZED, "invalid webhook signature");
            }
            None => {
                self.metrics.livekit_webhook("unauthorized");
                return (StatusCode::UNAUTHORIZED, "missing Authorization header");
            }
        };
        let left = match event.kind.as_str() {
            "participant_left" | "participant_connection_aborted" => match &event.identity {
                Some(identity) => Some(identity.as_str()),
                None => {
                    self.metrics.livekit_webhook("bad_request");
                    return (
                        StatusCode::BAD_REQUEST,
                        "participant event without participant",
                    );
                }
            },
            "room_finished" => None,
            _ => {
                self.metrics.livekit_webhook("ignored");
                return (StatusCode::OK, "ignored");
            }
        };
        let Some(session) = rooms.livekit.session_of(&event.room) else {
            self.metrics.livekit_webhook("no_session");
            return (StatusCode::OK, "no_session");
        };
        // LiveKit always sends an id; without one there is nothing to de-duplicate on.
        let event_id = if event.id.is_empty() {
            random_id("anon_", 16)
        } else {
            event.id
        };
        match self
            .matchmaker
            .media_left(session, left, &event_id, rooms.webhook_dedupe)
            .await
        {
            Ok(MediaLeft { effect, outcome }) => {
                self.apply(Origin::Background, outcome);
                let result = match effect {
                    MediaEffect::Ended => "ended",
                    MediaEffect::Duplicate => "duplicate",
                    MediaEffect::NoSession => "no_session",
                };
                self.metrics.livekit_webhook(result);
                (StatusCode::OK, result)
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook not applied");
                self.metrics.livekit_webhook("unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "backend unavailable: retry",
                )
            }
        }
    }

    /// Runs the room sweep every interval until `stop` flips (media mode only).
    pub fn spawn_room_sweep(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(rooms) = &self.media else { return };
        let interval = rooms.sweep_interval;
        let gateway = self.clone();
        self.background.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.changed() => return,
                }
                // The holder renews every interval; a generous margin keeps a busy holder from
                // losing the lease to another instance, at the price of a slower take-over
                // when it dies.
                let ttl = interval * 2 + Duration::from_secs(10);
                match gateway.matchmaker.lease(SWEEP_LEASE, ttl).await {
                    Ok(true) => {
                        if let Err(e) = gateway.sweep_rooms().await {
                            tracing::warn!(error = %e, "room sweep failed");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "room sweep lease failed"),
                }
            }
        });
    }

    /// One reconciliation of LiveKit's rooms with the sessions: rooms whose session is gone
    /// are deleted; live sessions whose room is gone (a `room_finished` webhook that never
    /// arrived) are ended. Sessions whose users are gone end by the grace expiry, which runs
    /// exactly once per user in both backends.
    async fn sweep_rooms(self: &Arc<Self>) -> Result<(), SweepError> {
        let Some(rooms) = &self.media else {
            return Ok(());
        };
        self.metrics.livekit_sweeps.inc();
        // Sessions first: a session live by then already had its room, so the listing that
        // follows shows it unless the room is really gone.
        let sessions = self.matchmaker.sessions().await?;
        let listed = rooms.livekit.list_rooms().await?;
        let now_ms = unix_ms();
        let old_enough = |created_ms: u64| {
            now_ms.saturating_sub(created_ms) >= rooms.orphan_age.as_millis() as u64
        };
        let known: HashSet<&str> = sessions.iter().map(|s| &*s.session_id).collect();
        let mut with_room = HashSet::new();
        for room in &listed {
            let Some(session) = rooms.livekit.session_of(&room.name) else {
                continue;
            };
            with_room.insert(session);
            let created_ms = u64::try_from(room.created_s).unwrap_or(0) * 1000;
            if !known.contains(session) && old_enough(created_ms) {
                tracing::info!(room = %room.name, "deleting a room without a session");
                self.metrics.livekit_room("orphan_found");
                self.remove_room(session);
            }
        }
        for s in &sessions {
            if !s.pending && !with_room.contains(&*s.session_id) && old_enough(s.created_ms) {
                let event_id = format!("sweep:{}", s.session_id);
                let MediaLeft { outcome, .. } = self
                    .matchmaker
                    .media_left(&s.session_id, None, &event_id, rooms.webhook_dedupe)
                    .await?;
                tracing::info!(session = %s.session_id, "ended a session whose room is gone");
                self.apply(Origin::Background, outcome);
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error(transparent)]
    LiveKit(#[from] crate::livekit::LiveKitError),
    #[error(transparent)]
    Match(#[from] MatchError),
}
