//! The matching domain: who waits in which pool, who is in which session, and the per-user
//! event log that makes resume possible.
//!
//! [`Matchmaker`] is the narrow seam between the transport and the state. Each operation is one
//! atomic step: it checks the user's state, changes it, appends the resulting events to the
//! users' logs (assigning `seq`) and hands the frames to the [`Bus`](crate::bus::Bus) in that
//! same step, so that every user sees events in `seq` order no matter how many operations race.
//! The in-memory implementation does this under one lock; a Redis implementation does it in one
//! script. The transport never knows which one runs.

pub mod memory;
pub mod overview;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::bus::Frame;
use crate::p2p::IceServers;
use crate::protocol::{EndReason, ErrorCode, Media, Prefs, Relay, StateName};

/// How matches get their media; both engines act on it inside their atomic matching step.
#[derive(Debug, Clone)]
pub enum MediaMode {
    /// LiveKit: a pair is *pending* until its room is ready ([`Matchmaker::media_ready`]);
    /// a pair still pending after `pending` is undone by the backend itself.
    LiveKit { pending: Duration },
    /// Peer to peer: a pair is live at once, and each member's `matched` lists the ICE
    /// servers, with TURN credentials minted for it in the same step.
    P2p(Arc<IceServers>),
}

impl MediaMode {
    /// Whether a pair waits for a media room before it goes live.
    pub fn waits_for_room(&self) -> bool {
        matches!(self, MediaMode::LiveKit { .. })
    }
}

/// The safety and fairness rules both backends enforce inside their atomic matching step.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Users who met are not matched again within this window...
    pub anti_repeat_window: Duration,
    /// ...unless one of them has waited this long.
    pub anti_repeat_fallback: Duration,
    /// A skip this soon after the match is quick; a session this long resets the count.
    pub skip_quick: Duration,
    /// Quick skips within `skip_window` that start a cooldown.
    pub skip_limit: u32,
    pub skip_window: Duration,
    /// Consecutive cooldowns; the last one repeats.
    pub skip_cooldowns: Vec<Duration>,
    pub enqueue_per_minute: u32,
    /// Accept phase, when set: how long both have to accept.
    pub accept_timeout: Option<Duration>,
    /// A user who declined (or let a proposal time out) goes to the tail of the queue rather
    /// than idle.
    pub decline_to_tail: bool,
    /// Wait per preference relaxation step.
    pub relax_after: Duration,
    /// Blocks kept per user: beyond it, the oldest block goes.
    pub max_blocks: usize,
    /// The blocks of a user who has not been connected for this long are forgotten.
    pub block_ttl: Duration,
}

impl Rules {
    pub fn from_config(c: &crate::config::Config) -> Rules {
        Rules {
            anti_repeat_window: Duration::from_secs(c.anti_repeat_window_s),
            anti_repeat_fallback: Duration::from_millis(c.anti_repeat_fallback_ms),
            skip_quick: Duration::from_secs(c.skip_quick_s),
            skip_limit: c.skip_limit,
            skip_window: Duration::from_secs(c.skip_window_s),
            skip_cooldowns: c
                .skip_cooldowns_s
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            enqueue_per_minute: c.enqueue_per_minute,
            accept_timeout: (c.accept_timeout_ms > 0)
                .then(|| Duration::from_millis(c.accept_timeout_ms)),
            decline_to_tail: c.decline_to == crate::config::DeclineTo::Tail,
            relax_after: Duration::from_millis(c.relax_after_ms),
            max_blocks: c.max_blocks_per_user,
            block_ttl: Duration::from_secs(c.block_ttl_s),
        }
    }

    /// The cooldown after the `level`-th cooldown in a row (1-based).
    pub fn cooldown(&self, level: usize) -> Duration {
        let i = level.clamp(1, self.skip_cooldowns.len()) - 1;
        self.skip_cooldowns[i]
    }
}

/// A user id: the JWT `sub`.
pub type UserId = Arc<str>;

/// Identifies one WebSocket connection, so that a late disconnect of a replaced connection
/// cannot touch the state its successor took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Fixed-width hex, so that ids of one instance (which grow) also compare as strings.
impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{:016x}", self.0)
    }
}

impl ConnId {
    /// Reads the form [`ConnId`]'s `Display` writes.
    pub fn parse(s: &str) -> Option<ConnId> {
        let hex = s.strip_prefix('c').filter(|h| h.len() == 16)?;
        u64::from_str_radix(hex, 16).ok().map(ConnId)
    }
}

/// What a reconnecting client presents to get missed events back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub token: String,
    pub last_seq: u64,
}

/// The result of [`Matchmaker::attach`].
#[derive(Debug)]
pub struct Attached {
    pub state: StateName,
    /// Token for the next resume; it names the user's current event log.
    pub resume_token: String,
    /// The latest `seq` of this user at the moment of attaching.
    pub last_seq: u64,
    /// Whether the presented resume token was valid (and the replay is complete).
    pub resumed: bool,
    /// Events after the client's `last_seq`, in order, when `resumed`.
    pub replay: Vec<Frame>,
    pub outcome: Outcome,
}

/// The user's state as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: StateName,
    pub position: Option<u64>,
    pub estimated_wait_ms: Option<u64>,
    pub session_id: Option<Arc<str>>,
    /// In a session: the peer's handle and this user's role, as `matched` said them.
    pub peer: Option<Arc<str>>,
    pub role: Option<crate::protocol::Role>,
}

/// Side effects of an operation that the gateway acts on beyond delivery: metrics, throttled
/// queue updates, grace timers.
#[derive(Debug, Default)]
pub struct Outcome {
    /// For each user matched by this operation: how long they waited.
    pub waits: Vec<Duration>,
    /// Sessions that went live in this operation (the ledger and outbound webhooks record
    /// them; in Redis mode only the instance that ran the operation sees them, so each is
    /// recorded once).
    pub started: Vec<SessionStarted>,
    /// Live sessions that this operation ended, and why (from the initiator's side).
    pub closed: Vec<SessionClosed>,
    /// Pools whose waiting users' positions may have changed.
    pub changed_pools: Vec<Arc<str>>,
    /// After `detach`: the user's state is held and expires after the grace period.
    pub held: bool,
    /// In media mode: sessions matched by this operation that wait for their room
    /// ([`Matchmaker::media_ready`] or [`Matchmaker::media_failed`] must follow).
    pub pending: Vec<PendingSession>,
    /// Sessions (live or pending) that this operation ended: their rooms must go.
    pub ended_sessions: Vec<Arc<str>>,
    /// Timers to arm: after the delay, [`Matchmaker::wake`] with the user and the timer.
    pub timers: Vec<(Duration, UserId, Timer)>,
}

/// A session that went live: who met whom, from which pools, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStarted {
    pub session_id: Arc<str>,
    /// Offerer first.
    pub users: [UserId; 2],
    /// The pool each member waited in (the key of its full preferences), offerer first.
    pub pools: [Arc<str>; 2],
    /// As the members' `matched` said (unix ms).
    pub started_at_ms: u64,
}

/// A live session that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClosed {
    pub session_id: Arc<str>,
    /// Offerer first.
    pub users: [UserId; 2],
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// The member whose action or absence ended it; `None` when neither did (the media
    /// server closed the room for both).
    pub ended_by: Option<UserId>,
    /// Why, from the side of `ended_by` (`skip`, `end`, `timeout`, `media_disconnected`,
    /// `ended_by_moderator`).
    pub reason: EndReason,
}

/// Something a waiting user's state needs later, without anybody polling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// Widen the search of the user's queue place `ticket` by one relaxation step.
    Relax { ticket: u64 },
    /// The anti-repeat fallback of queue place `ticket` is due: recent peers are fair game.
    Rematch { ticket: u64 },
    /// The proposal `match_id` expires.
    Proposal { match_id: Arc<str> },
}

/// A matched pair whose `matched` events wait for a media room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSession {
    pub session_id: Arc<str>,
    /// The members' opaque per-session handles, offerer first.
    pub handles: [Arc<str>; 2],
}

/// A session as the media sweep sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: Arc<str>,
    /// When the pair was matched (unix ms).
    pub created_ms: u64,
    /// Still waiting for its room.
    pub pending: bool,
}

/// What a media event (a LiveKit webhook, or the sweep) did to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaEffect {
    /// The session was live and is now ended.
    Ended,
    /// The same event id was seen before: nothing done.
    Duplicate,
    /// No live session for that room (already ended, still pending, or never ours).
    NoSession,
}

/// Counts for the metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub queued: u64,
    pub sessions: u64,
}

/// Errors of the matching layer; mapped to protocol error codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error("{0}")]
    InvalidState(std::borrow::Cow<'static, str>),
    #[error("matching backend unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A newer connection of the same user took over while this one was attaching.
    #[error("replaced by a newer connection")]
    Replaced,
    /// Too many quick skips: refused until the cooldown is over.
    #[error("too many quick skips: wait for the cooldown")]
    Cooldown { retry_after_ms: u64 },
    /// Too many enqueues.
    #[error("too many enqueues: slow down")]
    RateLimited { retry_after_ms: u64 },
    /// Too many reports by this user (see [`crate::moderation`]).
    #[error("too many reports: try again later")]
    TooManyReports { retry_after_ms: u64 },
}

/// What a client is told when a backend is down: the backend's own error text (addresses,
/// driver messages) goes to the logs only.
pub const UNAVAILABLE_MESSAGE: &str = "a backend this action needs is unavailable: try again later";
/// What a client is told about a bug on our side.
pub const INTERNAL_MESSAGE: &str = "internal error";

impl MatchError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MatchError::InvalidState(_) => ErrorCode::InvalidState,
            MatchError::Unavailable(_) => ErrorCode::Unavailable,
            MatchError::Internal(_) | MatchError::Replaced => ErrorCode::Internal,
            MatchError::Cooldown { .. } => ErrorCode::Cooldown,
            MatchError::RateLimited { .. } | MatchError::TooManyReports { .. } => {
                ErrorCode::RateLimited
            }
        }
    }

    /// The `message` of the client's `error` frame: fixed text where the error carries
    /// details that are only for the logs.
    pub fn client_message(&self) -> std::borrow::Cow<'static, str> {
        match self {
            MatchError::Unavailable(_) => UNAVAILABLE_MESSAGE.into(),
            MatchError::Internal(_) => INTERNAL_MESSAGE.into(),
            other => other.to_string().into(),
        }
    }

    /// When the client may try again, where that is known.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            MatchError::Unavailable(_) => Some(1_000),
            MatchError::Cooldown { retry_after_ms }
            | MatchError::RateLimited { retry_after_ms }
            | MatchError::TooManyReports { retry_after_ms } => Some(*retry_after_ms),
            _ => None,
        }
    }

    /// Whether the client caused it (and pays from its error budget).
    pub fn client_caused(&self) -> bool {
        matches!(
            self,
            MatchError::InvalidState(_)
                | MatchError::Cooldown { .. }
                | MatchError::RateLimited { .. }
                | MatchError::TooManyReports { .. }
        )
    }
}

/// Matching state behind one narrow interface. See the module docs for the atomicity contract.
#[async_trait]
pub trait Matchmaker: Send + Sync + 'static {
    /// A connection for `user` came up: it takes over the user's state (queue place or session)
    /// and, with a valid `resume`, gets the events it missed.
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError>;

    /// The connection `conn` of `user` went away. A no-op when a newer connection took over.
    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError>;

    /// The grace period after `detach(user, conn)` ran out: drop the held state unless the user
    /// came back in the meantime.
    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError>;

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError>;

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError>;

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError>;

    async fn status(&self, user: &UserId) -> Result<Status, MatchError>;

    /// Pushes `queue_update` to waiting users of `pool` whose position or estimate changed since
    /// they were last told.
    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError>;

    async fn stats(&self) -> Result<Stats, MatchError>;

    /// The matching state at a glance, for the admin API (see [`overview`]).
    async fn overview(&self) -> Result<overview::Overview, MatchError>;

    /// The room of a pending session is ready: both members get `matched` with their `media`
    /// (offerer first). Returns false when the session is no longer pending (a member left
    /// meanwhile): the room is then the caller's to delete.
    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<(bool, Outcome), MatchError>;

    /// No room could be set up for a pending session: both members go back to their places
    /// at the head of the queue and get a `media_unavailable` error.
    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError>;

    /// The media server reports that `left` (a member's handle), or everybody when `None`,
    /// left the session's room: a live session ends with `media_disconnected`. Events are
    /// de-duplicated by `event_id` within `dedupe`.
    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<(MediaEffect, Outcome), MatchError>;

    /// A moderator ends the live session `session`: both members get `session_ended` with
    /// `ended_by_moderator` and neither is re-queued. False when no live session has that id.
    async fn moderator_end(&self, session: &str) -> Result<(bool, Outcome), MatchError>;

    /// Every session, for the sweep that matches them against the media server's rooms.
    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError>;

    /// Blocks the peer of `session` (default: the current or most recent one) for good, in
    /// both directions; a live session with them ends (`end` for the blocker, `peer_ended`
    /// for the blocked).
    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError>;

    /// The peer of `user` in `session` (default: the current or most recent session), for
    /// reports: the session id and the peer's user id.
    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<(Arc<str>, UserId), MatchError>;

    /// Accept phase: `user` accepts the proposal `match_id`.
    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError>;

    /// Accept phase: `user` declines the proposal `match_id`.
    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError>;

    /// A timer an earlier outcome armed went off.
    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError>;

    /// Whether this instance holds the lease `name` for `ttl` (one instance of a deployment
    /// runs each periodic clean-up). Taking it again before it runs out extends it.
    async fn lease(&self, name: &str, ttl: Duration) -> Result<bool, MatchError>;

    /// Passes `message` to the peer of `user`'s live session, wherever the peer is connected,
    /// with the session id and (chat) the time: no `seq`, not logged, not replayed. A peer
    /// who is away misses it. `invalid_state` outside a live session. One user's messages
    /// reach the peer in the order of the calls.
    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError>;
}
