//! The matching domain: who waits in which pool, who is in which session, and the per-user
//! event log that makes resume possible.
//!
//! The seam between the transport and the state is four small traits, each with its written
//! contract, grouped by who calls them: [`ClientOperations`] (what a connected client asks
//! for), [`Timers`] (delays an earlier operation asked for), [`MediaEvents`] (what the media
//! side reports about sessions) and [`Administration`] (stats and leases, no user state).
//! [`Engine`] bundles them for the gateway. Each operation is one atomic step: it checks the
//! user's state, changes it, appends the resulting events to the users' logs (assigning
//! `seq`) and hands the frames to the [`Bus`](crate::bus::Bus) in that same step, so that every
//! user sees events in `seq` order no matter how many operations race. What the caller must do
//! afterwards comes back as an [`Outcome`], which the gateway applies in one place. The
//! in-memory implementation ([`memory`]) does this under one lock; the Redis implementation
//! ([`redis`]) does it in one function call of its Lua library. The transport never knows
//! which one runs.
//!
//! Identifiers ([`UserId`], [`ConnId`], [`Frame`]) live in the leaf module [`crate::ids`] and
//! are re-exported here.

pub mod memory;
pub mod overview;
pub mod partitioned;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use clap::ValueEnum;

use crate::attributes::Attributes;
use crate::flags::{count, millis, secs};
pub use crate::ids::{ConnId, Frame, UserId};
use crate::p2p::IceServers;
use crate::protocol::{EndReason, ErrorCode, Media, Prefs, Relay, StateName};

/// How matches get their media; both engines act on it inside their atomic matching step.
#[derive(Debug, Clone)]
pub enum MediaMode {
    /// LiveKit: a pair is *pending* until its room is ready ([`MediaEvents::media_ready`]);
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

/// The rules section of the configuration: safety and fairness rules, enforced in the matching
/// step, so in both backends.
#[derive(Debug, Clone, clap::Args)]
pub struct RulesConfig {
    /// Two users who were matched are not matched again within this many seconds...
    #[arg(
        long,
        env = "MATCHGATE_ANTI_REPEAT_WINDOW_S",
        default_value = "600",
        value_parser = secs(..)
    )]
    pub anti_repeat_window_s: Duration,

    /// ...unless one of them has waited this long with nobody else to meet, in ms.
    #[arg(
        long,
        env = "MATCHGATE_ANTI_REPEAT_FALLBACK_MS",
        default_value = "30000",
        value_parser = millis(..)
    )]
    pub anti_repeat_fallback_ms: Duration,

    /// A skip within this many seconds of the match counts as quick; a session that lasts at
    /// least this long resets the count and the cooldown level.
    #[arg(
        long,
        env = "MATCHGATE_SKIP_QUICK_S",
        default_value = "30",
        value_parser = secs(..)
    )]
    pub skip_quick_s: Duration,

    /// Quick skips within the window that start a cooldown.
    #[arg(
        long,
        env = "MATCHGATE_SKIP_LIMIT",
        default_value = "5",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub skip_limit: u32,

    /// The window over which quick skips are counted, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_SKIP_WINDOW_S",
        default_value = "300",
        value_parser = secs(1..)
    )]
    pub skip_window_s: Duration,

    /// Cooldowns in seconds, one per consecutive cooldown (the last one repeats).
    #[arg(
        long,
        env = "MATCHGATE_SKIP_COOLDOWNS_S",
        value_delimiter = ',',
        default_value = "60,300,900",
        value_parser = secs(1..)
    )]
    pub skip_cooldowns_s: Vec<Duration>,

    /// `enqueue`s allowed per user and minute (shared across instances).
    #[arg(
        long,
        env = "MATCHGATE_ENQUEUE_PER_MINUTE",
        default_value = "30",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub enqueue_per_minute: u32,

    /// Accept phase: with a value above 0, a match is first proposed (`match_proposed`) and
    /// both must `accept` within this many ms to get `matched`.
    #[arg(
        long,
        env = "MATCHGATE_ACCEPT_TIMEOUT_MS",
        default_value = "0",
        value_parser = millis(..)
    )]
    pub accept_timeout_ms: Duration,

    /// Where a user who declined a proposal (or let it time out) goes: `idle` or the `tail`
    /// of the queue. The other one always goes back to the head.
    #[arg(long, env = "MATCHGATE_DECLINE_TO", value_enum, default_value = "idle")]
    pub decline_to: DeclineTo,

    /// Preference relaxation: every this many ms of waiting, one more of the user's `soft`
    /// preference fields is dropped from the search.
    #[arg(
        long,
        env = "MATCHGATE_RELAX_AFTER_MS",
        default_value = "10000",
        value_parser = millis(100..)
    )]
    pub relax_after_ms: Duration,

    /// Interests: a user with interests is matched only with users who share one until it
    /// has waited this many ms; then with any compatible user (unless `interests_only`).
    #[arg(
        long,
        env = "MATCHGATE_INTERESTS_WAIT_MS",
        default_value = "10000",
        value_parser = millis(..)
    )]
    pub interests_wait_ms: Duration,

    /// Blocks kept per user: a user's block list keeps the most recent this many (the oldest
    /// block goes first).
    #[arg(
        long,
        env = "MATCHGATE_MAX_BLOCKS_PER_USER",
        default_value = "1000",
        value_parser = count(1..)
    )]
    pub max_blocks_per_user: usize,

    /// The blocks a user made are forgotten once the user has not been connected for this
    /// many seconds (default: 180 days).
    #[arg(
        long,
        env = "MATCHGATE_BLOCK_TTL_S",
        default_value = "15552000",
        value_parser = secs(1..=MAX_BLOCK_TTL_S)
    )]
    pub block_ttl_s: Duration,
}

/// The longest block TTL: ten years.
const MAX_BLOCK_TTL_S: u64 = 10 * 365 * 86_400;

/// Where a user who declined a proposed match goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeclineTo {
    Idle,
    Tail,
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
    /// How long a user with interests waits for someone sharing one before the search widens.
    pub interests_wait: Duration,
    /// Blocks kept per user: beyond it, the oldest block goes.
    pub max_blocks: usize,
    /// The blocks of a user who has not been connected for this long are forgotten.
    pub block_ttl: Duration,
}

impl Rules {
    pub fn from_config(c: &RulesConfig) -> Rules {
        Rules {
            anti_repeat_window: c.anti_repeat_window_s,
            anti_repeat_fallback: c.anti_repeat_fallback_ms,
            skip_quick: c.skip_quick_s,
            skip_limit: c.skip_limit,
            skip_window: c.skip_window_s,
            skip_cooldowns: c.skip_cooldowns_s.clone(),
            enqueue_per_minute: c.enqueue_per_minute,
            // 0 turns the accept phase off.
            accept_timeout: (!c.accept_timeout_ms.is_zero()).then_some(c.accept_timeout_ms),
            decline_to_tail: c.decline_to == DeclineTo::Tail,
            relax_after: c.relax_after_ms,
            interests_wait: c.interests_wait_ms,
            max_blocks: c.max_blocks_per_user,
            block_ttl: c.block_ttl_s,
        }
    }

    /// The cooldown after the `level`-th cooldown in a row (1-based).
    pub fn cooldown(&self, level: usize) -> Duration {
        let i = level.clamp(1, self.skip_cooldowns.len()) - 1;
        self.skip_cooldowns[i]
    }
}

/// What a reconnecting client presents to get missed events back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub token: String,
    pub last_seq: u64,
}

/// The result of [`ClientOperations::attach`].
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
    /// ([`MediaEvents::media_ready`] or [`MediaEvents::media_failed`] must follow).
    pub pending: Vec<PendingSession>,
    /// Sessions (live or pending) that this operation ended: their rooms must go.
    pub ended_sessions: Vec<Arc<str>>,
    /// Timers to arm: after the delay, [`Timers::wake`] with the user and the timer.
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
    /// Widen the search of the user's queue place `ticket` by one relaxation step. A paired
    /// user's timer is armed again instead (the match may be undone).
    Relax { ticket: u64 },
    /// The anti-repeat fallback of queue place `ticket` is due: recent peers are fair game.
    Rematch { ticket: u64 },
    /// The interests wait of queue place `ticket` passed: unless `interests_only`, the user
    /// becomes *open* and may meet, besides users sharing an interest, any compatible open
    /// user (one without interests, or widened too); it is told with `queue_update`
    /// `interests_widened`. A paired user's timer is armed again instead; a restored queue
    /// place keeps the flag, a new one (re-queue) starts without it.
    Interests { ticket: u64 },
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

/// The result of [`MediaEvents::media_ready`].
#[derive(Debug)]
pub struct MediaReady {
    /// The session went live; false when it was no longer pending (its room must go).
    pub live: bool,
    pub outcome: Outcome,
}

/// The result of [`MediaEvents::media_left`].
#[derive(Debug)]
pub struct MediaLeft {
    pub effect: MediaEffect,
    pub outcome: Outcome,
}

/// The result of [`ClientOperations::recent_peer`]: whom a report names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentPeer {
    pub session_id: Arc<str>,
    /// The peer's user id.
    pub peer: UserId,
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

/// What a connected client asks for, on behalf of the user its connection is attached as.
///
/// Contract, for every method:
/// - **Atomic.** One call is one step of the engine (see the module docs): it checks the user's
///   state, changes it, logs the resulting events (assigning `seq`) and hands them to the
///   [`Bus`](crate::bus::Bus), all at once. Calls racing for the same user or pool are applied
///   one after the other, in some order; each user's events carry `seq` in that order.
/// - **Refusals change nothing.** A call that does not fit the user's state fails with
///   [`MatchError::InvalidState`] (or `Cooldown`, `RateLimited`) and neither changes state nor
///   emits events. `Unavailable` means the backend could not be asked or did not answer; the
///   step may or may not have run (a Redis call that timed out), and its events tell.
/// - **What follows.** The returned [`Outcome`] lists what the caller must do afterwards
///   (metrics, queue updates, rooms, timers, the grace expiry); the engine itself runs no
///   timers.
/// - **No-ops** are stated per method; they return `Ok` with an empty outcome.
#[async_trait]
pub trait ClientOperations: Send + Sync + 'static {
    /// A connection for `user` came up: it takes over the user's state (queue place or session)
    /// and, with a valid `resume`, gets the events it missed. Fails with
    /// [`MatchError::Replaced`] (changing nothing) when a newer connection of the user is
    /// attached already: connection ids grow.
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError>;

    /// The connection `conn` of `user` went away: the user's state is held for the grace
    /// period (`Outcome::held`; [`Timers::expire`] must follow). A no-op when a newer
    /// connection took over or the user is already away.
    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError>;

    /// `user` waits for a match with `prefs`; `attributes` (from the user's token) are what
    /// other users' `want` is checked against while it waits, and on every re-queue after a
    /// session that follows. A user with `interests` (not `interests_only`) gets a
    /// [`Timer::Interests`] in the outcome, after any [`Timer::Relax`].
    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        attributes: Arc<Attributes>,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError>;

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError>;

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError>;

    /// Reads the user's state; changes nothing.
    async fn status(&self, user: &UserId) -> Result<Status, MatchError>;

    /// Blocks the peer of `session` (default: the current or most recent one) for good, in
    /// both directions; a live session with them ends (`end` for the blocker, `peer_ended`
    /// for the blocked).
    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError>;

    /// The peer of `user` in `session` (default: the current or most recent session), for
    /// reports. Reads only.
    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<RecentPeer, MatchError>;

    /// Accept phase: `user` accepts the proposal `match_id`.
    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError>;

    /// Accept phase: `user` declines the proposal `match_id`.
    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError>;

    /// Passes `message` to the peer of `user`'s live session, wherever the peer is connected,
    /// with the session id and (chat) the time: no `seq`, not logged, not replayed. A peer
    /// who is away misses it. `invalid_state` outside a live session. One user's messages
    /// reach the peer in the order of the calls.
    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError>;
}

/// What the gateway calls when a delay an earlier [`Outcome`] asked for has passed.
///
/// Contract: each call is one atomic step like a client operation's. A timer may go off late,
/// twice (the gateway retries one that failed with `Unavailable`) or after what it was armed
/// for is decided; every such call is a no-op that returns an empty outcome, so timers never
/// need cancelling.
#[async_trait]
pub trait Timers: Send + Sync + 'static {
    /// The grace period after `detach(user, conn)` ran out: drop the held state unless the user
    /// came back in the meantime (then a no-op). Dropping a queue place or session first
    /// holds the idle user for another grace period (`Outcome::held` again).
    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError>;

    /// Pushes `queue_update` to waiting users of `pool` whose position or estimate changed since
    /// they were last told (no `seq`: nothing to replay). A no-op for an empty pool.
    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError>;

    /// A timer an earlier outcome armed went off. A no-op when the queue place or proposal it
    /// names is no longer current.
    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError>;
}

/// Deployment-level questions that touch no user's state.
#[async_trait]
pub trait Administration: Send + Sync + 'static {
    /// Counts for the metrics endpoint; it is also what readiness asks to learn that the
    /// backend answers.
    async fn stats(&self) -> Result<Stats, MatchError>;

    /// Whether this instance holds the lease `name` for `ttl` (one instance of a deployment
    /// runs each periodic clean-up). Taking it again before it runs out extends it; atomic, so
    /// two instances never both hold it.
    async fn lease(&self, name: &str, ttl: Duration) -> Result<bool, MatchError>;

    /// Puts back blocks `blocker` made (oldest first), as the ledger remembers them after a
    /// restart or a Redis flush: like [`ClientOperations::block`] without a session, and kept for
    /// the block TTL from now unless `blocker` connects meanwhile.
    async fn restore_blocks(&self, blocker: &UserId, blocked: &[UserId]) -> Result<(), MatchError>;

    /// The matching state at a glance, for the admin API (see [`overview`]). Reads only.
    async fn overview(&self) -> Result<overview::Overview, MatchError>;

    /// A moderator ends the live session `session`: both members get `session_ended` with
    /// `ended_by_moderator` and neither is re-queued; one atomic step. `None` when no live
    /// session has that id.
    async fn moderator_end(&self, session: &str) -> Result<Option<Outcome>, MatchError>;
}

/// What the media side (room set-up, LiveKit's webhooks, the room sweep) reports about
/// sessions. Called by the gateway's media tasks, never on a client's behalf.
///
/// Contract: each call is one atomic step like a client operation's. A session is *pending*
/// from the match until exactly one of [`MediaEvents::media_ready`] and
/// [`MediaEvents::media_failed`] (or the engine's own deadline, or a member leaving) decides
/// it; whichever comes later finds nothing to do and is a no-op. Rooms are the caller's: the
/// engine only names sessions whose rooms must go (`Outcome::ended_sessions`).
#[async_trait]
pub trait MediaEvents: Send + Sync + 'static {
    /// The room of a pending session is ready: both members get `matched` with their `media`
    /// (offerer first). `live` is false when the session is no longer pending (a member left
    /// meanwhile): the room is then the caller's to delete.
    async fn media_ready(&self, session: &str, media: [Media; 2])
        -> Result<MediaReady, MatchError>;

    /// No room could be set up for a pending session: both members go back to their places
    /// at the head of the queue and get a `media_unavailable` error. A no-op (an outcome
    /// without ended sessions) when the session is no longer pending.
    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError>;

    /// The media server reports that `left` (a member's handle), or everybody when `None`,
    /// left the session's room: a live session ends with `media_disconnected`. Events are
    /// de-duplicated by `event_id` within `dedupe`: a repeated event is a no-op
    /// ([`MediaEffect::Duplicate`]).
    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<MediaLeft, MatchError>;

    /// Every session, for the sweep that matches them against the media server's rooms.
    /// Reads only.
    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError>;
}

/// A whole matching engine: what the gateway holds.
///
/// One bundle rather than four handles: both engines implement every part over one state, so
/// the gateway wires one object and its call sites stay `self.matchmaker.op(..)`. Code that
/// needs one part only asks for that part (the readiness probe takes `&dyn Administration`),
/// and an engine is whatever implements the four parts (the blanket impl).
pub trait Engine: ClientOperations + Timers + Administration + MediaEvents {}

impl<T: ClientOperations + Timers + Administration + MediaEvents> Engine for T {}
