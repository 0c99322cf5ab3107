//! The Redis matchmaker of the scale-out mode: queue, sessions and event logs live in Redis and
//! every operation is one atomic step of a call (FCALL) of a function library, so N instances
//! racing on the same pool can never match a user twice or put a user in two sessions.
//!
//! Group commit ([`Batching`]): while this instance's calls are in flight, the operations
//! asked for meanwhile queue (boundedly) and go together in its next call, which runs them in
//! order, each as its own step with its own reply or error, the batch atomic as a whole. What
//! a call costs Redis besides its operations (the call, the settings, the time, one
//! publication per instance) is then paid once for many. Each matchmaker has its own queue
//! and task, so several can run side by side (one per Redis deployment).
//!
//! The library is written in Lua in `src/matching/lua/`, one file per concern and one per
//! operation (`ops/`), and assembled here (`LIBRARY`) into one text in a fixed order: a file
//! may use what the files before it define. Its function is named after a hash of the whole
//! text, so old and new gateways each call their own version during a rolling upgrade; the key
//! layout it writes is versioned too (see `keys.lua`). Each call passes
//! the instance's settings (the same JSON text in every call, decoded once by the library)
//! and, for each operation, its name and one JSON object of named arguments; each operation
//! answers with its own typed reply next to the [`Outcome`] every operation has.
//!
//! The library also publishes each frame on the pub/sub channel of the instance that holds the
//! user's connection (see [`crate::bus::redis`]), inside the same atomic call that appends it to
//! the user's log, so events reach every user in `seq` order: one message per instance and
//! call, carrying that call's frames for the instance in order. All keys share one hash tag, so
//! every call touches one slot and the same code runs against Redis Cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_redis::{Runtime, Timeouts};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::memory::{COOLDOWN, MEDIA_UNAVAILABLE};
use super::overview::{MinuteCounts, Overview, PoolOverview};
use super::{
    Administration, Attached, ClientOperations, ConnId, MatchError, MediaEffect, MediaEvents,
    MediaLeft, MediaMode, MediaReady, Outcome, PendingSession, RecentPeer, Resume, Rules,
    SessionClosed, SessionInfo, SessionStarted, Stats, Status, Timer, Timers, UserId,
};
use crate::attributes::Attributes;
use crate::bus::Frame;
use crate::clock::Clock;
use crate::ids::random_id;
use crate::metrics::Metrics;
use crate::p2p::IceServers;
use crate::protocol::{EndReason, IceServer, Media, Prefs, Relay, Role, StateName};
use crate::redis_keys::Layout;

/// The error of a call made before this instance's p2p configuration was in Redis.
const P2P_CONFIG_MISSING: &str = "p2p_config_missing";

/// How long an instance's p2p configuration stays in Redis; a call after that writes it again.
const P2P_CONFIG_TTL: Duration = Duration::from_secs(3600);

/// How many users or expiries one heartbeat tick cleans up at most.
const TICK_BUDGET: u64 = 1000;

/// The function library with every matching operation, with `@VERSION@` for its version:
/// the files of `src/matching/lua/` in the order in which they build on each other (see
/// `prelude.lua`): call state and ids, the key layout, users' hashes, the concerns, the operations, and the
/// dispatcher that registers the function.
const LIBRARY: &str = concat!(
    include_str!("lua/prelude.lua"),
    include_str!("lua/keys.lua"),
    include_str!("lua/hashes.lua"),
    include_str!("lua/events.lua"),
    include_str!("lua/pools.lua"),
    include_str!("lua/conduct.lua"),
    include_str!("lua/p2p.lua"),
    include_str!("lua/sessions.lua"),
    include_str!("lua/matching.lua"),
    include_str!("lua/ending.lua"),
    include_str!("lua/connections.lua"),
    include_str!("lua/ops/attach.lua"),
    include_str!("lua/ops/detach.lua"),
    include_str!("lua/ops/expire.lua"),
    include_str!("lua/ops/enqueue.lua"),
    include_str!("lua/ops/skip.lua"),
    include_str!("lua/ops/end.lua"),
    include_str!("lua/ops/status.lua"),
    include_str!("lua/ops/refresh.lua"),
    include_str!("lua/ops/since.lua"),
    include_str!("lua/ops/stats.lua"),
    include_str!("lua/ops/tick.lua"),
    include_str!("lua/ops/media_ready.lua"),
    include_str!("lua/ops/media_failed.lua"),
    include_str!("lua/ops/media_left.lua"),
    include_str!("lua/ops/sessions.lua"),
    include_str!("lua/ops/block.lua"),
    include_str!("lua/ops/peer.lua"),
    include_str!("lua/ops/accept.lua"),
    include_str!("lua/ops/decline.lua"),
    include_str!("lua/ops/wake.lua"),
    include_str!("lua/ops/relay.lua"),
    include_str!("lua/ops/p2p_config.lua"),
    include_str!("lua/ops/lease.lua"),
    include_str!("lua/ops/restore_blocks.lua"),
    include_str!("lua/ops/overview.lua"),
    include_str!("lua/ops/moderator_end.lua"),
    include_str!("lua/dispatch.lua"),
);

/// Pools the admin API's stats list at most (those listed in most recently).
const OVERVIEW_POOLS: usize = 1000;

/// The library text and its function's name, versioned by a hash of the whole text.
struct Library {
    code: String,
    function: String,
}

impl Library {
    fn new() -> Self {
        let hash = redis::Script::new(LIBRARY).get_hash().to_string();
        let version = &hash[..12];
        Library {
            code: LIBRARY.replace("@VERSION@", version),
            function: format!("matchgate_{version}"),
        }
    }
}

/// Settings of the Redis matchmaker.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub urls: Vec<String>,
    pub cluster: bool,
    pub layout: Layout,
    pub instance: String,
    pub requeue_peer_on_skip: bool,
    pub history_len: usize,
    pub history_ttl: Duration,
    pub resume_grace: Duration,
    pub pool_size: usize,
    /// How matches get their media. LiveKit: how long a matched pair may wait for its room
    /// before the tick undoes the match (covers an instance that died while setting the room
    /// up).
    pub media: MediaMode,
    pub rules: Rules,
    /// How long one Redis call may take before the operation counts as unavailable.
    pub call_timeout: Duration,
    /// Group commit: calls in flight and operations per call.
    pub batching: Batching,
}

/// The settings every call passes to the library (see `dispatch.lua`): the same JSON text in
/// every call of one instance, so the library decodes it once.
#[derive(Serialize)]
struct LibrarySettings<'a> {
    key_prefix: &'a str,
    /// The partition session ids are marked with (see `new_id` in `prelude.lua`).
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<usize>,
    channel_prefix: &'a str,
    requeue_peer_on_skip: bool,
    history_len: usize,
    history_ttl_ms: u64,
    resume_grace_ms: u64,
    media: LibraryMedia<'a>,
    rules: LibraryRules,
}

#[derive(Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum LibraryMedia<'a> {
    /// A paired session waits for its room, at most `pending_ms`.
    Livekit { pending_ms: u64 },
    /// Sessions start live with the ICE servers this instance wrote (`p2p_config`).
    P2p { instance: &'a str },
}

/// [`Rules`] as the library reads them, durations in ms.
#[derive(Serialize)]
struct LibraryRules {
    anti_repeat_window_ms: u64,
    anti_repeat_fallback_ms: u64,
    skip_quick_ms: u64,
    skip_limit: u32,
    skip_window_ms: u64,
    skip_cooldowns_ms: Vec<u64>,
    enqueue_per_minute: u32,
    /// 0: no accept phase.
    accept_timeout_ms: u64,
    decline_to_tail: bool,
    relax_after_ms: u64,
    interests_wait_ms: u64,
    max_blocks: usize,
    block_ttl_ms: u64,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl LibraryRules {
    fn new(r: &Rules) -> Self {
        LibraryRules {
            anti_repeat_window_ms: ms(r.anti_repeat_window),
            anti_repeat_fallback_ms: ms(r.anti_repeat_fallback),
            skip_quick_ms: ms(r.skip_quick),
            skip_limit: r.skip_limit,
            skip_window_ms: ms(r.skip_window),
            skip_cooldowns_ms: r.skip_cooldowns.iter().map(|d| ms(*d)).collect(),
            enqueue_per_minute: r.enqueue_per_minute,
            accept_timeout_ms: ms(r.accept_timeout.unwrap_or_default()),
            decline_to_tail: r.decline_to_tail,
            relax_after_ms: ms(r.relax_after),
            interests_wait_ms: ms(r.interests_wait),
            max_blocks: r.max_blocks,
            block_ttl_ms: ms(r.block_ttl),
        }
    }
}

fn library_settings(s: &RedisSettings) -> String {
    let settings = LibrarySettings {
        key_prefix: &s.layout.prefix,
        partition: s.layout.partition,
        channel_prefix: &s.layout.channel_prefix,
        requeue_peer_on_skip: s.requeue_peer_on_skip,
        history_len: s.history_len,
        history_ttl_ms: ms(s.history_ttl),
        resume_grace_ms: ms(s.resume_grace),
        media: match &s.media {
            MediaMode::LiveKit { pending } => LibraryMedia::Livekit {
                pending_ms: ms(*pending),
            },
            MediaMode::P2p(_) => LibraryMedia::P2p {
                instance: &s.instance,
            },
        },
        rules: LibraryRules::new(&s.rules),
    };
    serde_json::to_string(&settings).expect("settings serialise")
}

enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl Shared {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Shared::Single(c) => cmd.query_async(c).await,
            Shared::Cluster(c) => cmd.query_async(c).await,
        }
    }

    /// Loads (or replaces) the function library; on a cluster, on every primary.
    async fn load_library(&mut self, library: &Library) -> redis::RedisResult<()> {
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(&library.code);
        match self {
            Shared::Single(c) => load.query_async::<()>(c).await,
            Shared::Cluster(c) => load.query_async::<()>(c).await,
        }
    }
}

/// A connection taken from the pool. deadpool checks a connection with a PING each time it
/// hands one out, a round trip per operation; but a multiplexed connection is built to be
/// shared, so one is cloned for every call and replaced through the pool only after an error.
#[derive(Clone)]
enum Shared {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Group commit: how this instance's operations share calls. While calls are in flight, the
/// operations asked for meanwhile queue, and the next call takes as many of them as it may,
/// in order: Redis then spends its fixed cost per call (the call itself, the settings, the
/// time, the p2p configuration, one PUBLISH per instance) once for many operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Calls in flight at once: more than one keeps Redis busy while a reply travels back.
    pub in_flight: usize,
    /// Operations one call takes at most.
    pub max_ops: usize,
}

impl Batching {
    /// How many operations may wait for a call: one full call per call in flight. Beyond
    /// that, asking for an operation waits for room (within its call timeout).
    pub fn queue_bound(&self) -> usize {
        self.in_flight * self.max_ops
    }
}

impl Default for Batching {
    /// What the gateway's flags default to (see `scaleout`).
    fn default() -> Self {
        Batching {
            in_flight: 2,
            max_ops: 64,
        }
    }
}

/// One operation waiting for its call: its name, its arguments (JSON), and where its reply
/// (the library's JSON) goes.
struct Queued {
    operation: &'static str,
    args: String,
    reply: oneshot::Sender<Result<String, MatchError>>,
}

pub struct RedisMatchmaker {
    link: Arc<Link>,
    /// Operations on their way into a call (bounded: [`Batching::queue_bound`]).
    queue: mpsc::Sender<Queued>,
    /// The other end of `queue`, until the first operation starts the task that makes the
    /// calls ([`send_batches`]) on the runtime it runs on.
    batches: std::sync::Mutex<Option<mpsc::Receiver<Queued>>>,
    batching: Batching,
    settings: RedisSettings,
}

/// What makes the calls: the connection, the library and what every call passes along. Shared
/// by the matchmaker and the task that sends the batches, which ends when the matchmaker goes.
struct Link {
    pool: Pool,
    shared: std::sync::Mutex<Option<Shared>>,
    library: Library,
    route_key: String,
    /// The settings argument of every call (see [`LibrarySettings`]).
    library_settings: String,
    /// Media mode p2p: the arguments of the operation that writes this instance's ICE servers.
    p2p_config: Option<Value>,
    call_timeout: Duration,
    /// For tests only: see [`RedisMatchmaker::with_clock`].
    clock: Option<Arc<dyn Clock>>,
    metrics: Arc<Metrics>,
}

/// What the library keeps of an instance's ICE servers (see `p2p.lua`): the TURN secret, the
/// credential lifetime in s, the STUN entry and the TURN URLs as JSON ("" for what is not
/// configured), and how long the key lives, in ms.
fn p2p_config_args(ice: &IceServers) -> Value {
    let stun = if ice.stun_urls().is_empty() {
        String::new()
    } else {
        let entry = IceServer {
            urls: ice.stun_urls().into(),
            username: None,
            credential: None,
        };
        serde_json::to_string(&entry).expect("ICE servers serialise")
    };
    let (secret, credential_ttl_s, turn) = match ice.turn() {
        Some(t) => (
            t.secret.clone(),
            t.ttl.as_secs(),
            serde_json::to_string(&t.urls).expect("URLs serialise"),
        ),
        None => (String::new(), 0, String::new()),
    };
    json!({
        "secret": secret,
        "credential_ttl_s": credential_ttl_s,
        "stun": stun,
        "turn": turn,
        "keep_ms": ms(P2P_CONFIG_TTL),
    })
}

/// What the instance learns from one heartbeat tick.
#[derive(Debug, Default)]
pub struct Tick {
    pub outcome: Outcome,
    /// The dataset id; a different one than before means Redis lost its data.
    pub epoch: String,
    pub epoch_changed: bool,
    /// This instance had been taken for dead: its users were cleaned up.
    pub rejoined: bool,
    pub cleaned_users: u64,
    pub expired: u64,
    pub dead_instances: u64,
}

/// Lua's cjson encodes an empty table as `{}`: accept that for every list.
fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrEmpty<T> {
        List(Vec<T>),
        Empty {},
    }
    Ok(match ListOrEmpty::deserialize(d)? {
        ListOrEmpty::List(v) => v,
        ListOrEmpty::Empty {} => Vec::new(),
    })
}

/// What the library answers (see `result` and `fail` in `prelude.lua`).
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer<T> {
    Error(ErrorReply),
    Done(Done<T>),
}

#[derive(Deserialize)]
struct ErrorReply {
    code: String,
    #[serde(default)]
    message: String,
    retry_after_ms: Option<u64>,
}

impl ErrorReply {
    fn into_error(self) -> MatchError {
        let retry_after_ms = self.retry_after_ms.unwrap_or(1);
        match self.code.as_str() {
            "invalid_state" => MatchError::InvalidState(self.message.into()),
            "replaced" => MatchError::Replaced,
            "cooldown" => MatchError::Cooldown { retry_after_ms },
            "rate_limited" => MatchError::RateLimited { retry_after_ms },
            _ => MatchError::Internal(self.message),
        }
    }
}

/// A successful operation: the outcome every operation has and its own reply `T`.
#[derive(Deserialize)]
struct Done<T> {
    outcome: OutcomeReply,
    reply: T,
}

/// The reply of the operations that answer nothing but their outcome.
#[derive(Deserialize)]
struct NoReply {}

/// [`Outcome`] as the library writes it.
#[derive(Deserialize)]
struct OutcomeReply {
    #[serde(deserialize_with = "list")]
    waits: Vec<u64>,
    #[serde(deserialize_with = "list")]
    started: Vec<StartedReply>,
    #[serde(deserialize_with = "list")]
    closed: Vec<ClosedReply>,
    #[serde(deserialize_with = "list")]
    changed_pools: Vec<Arc<str>>,
    held: bool,
    #[serde(deserialize_with = "list")]
    pending: Vec<PendingReply>,
    #[serde(deserialize_with = "list")]
    ended_sessions: Vec<Arc<str>>,
    #[serde(deserialize_with = "list")]
    timers: Vec<TimerReply>,
}

#[derive(Deserialize)]
struct OverviewReply {
    #[serde(deserialize_with = "list")]
    pools: Vec<PoolReply>,
    #[serde(deserialize_with = "list")]
    instances: Vec<InstanceReply>,
    sessions: u64,
    matches_last_minute: u64,
    matches_this_minute: u64,
}

#[derive(Deserialize)]
struct PoolReply {
    pool: Arc<str>,
    waiting: u64,
    estimated_wait_ms: Option<u64>,
}

#[derive(Deserialize)]
struct InstanceReply {
    instance: String,
    connections: u64,
}

#[derive(Deserialize)]
struct ModeratorEndReply {
    ended: bool,
}

/// [`SessionStarted`] as the library writes it.
#[derive(Deserialize)]
struct StartedReply {
    session_id: Arc<str>,
    users: [UserId; 2],
    pools: [Arc<str>; 2],
    started_at_ms: u64,
}

/// [`SessionClosed`] as the library writes it.
#[derive(Deserialize)]
struct ClosedReply {
    session_id: Arc<str>,
    users: [UserId; 2],
    started_at_ms: u64,
    ended_at_ms: u64,
    #[serde(default)]
    ended_by: Option<UserId>,
    reason: EndReason,
}

#[derive(Deserialize)]
struct PendingReply {
    session_id: Arc<str>,
    handles: [Arc<str>; 2],
}

#[derive(Deserialize)]
struct TimerReply {
    delay_ms: u64,
    user: UserId,
    #[serde(flatten)]
    timer: TimerKind,
}

/// [`Timer`] as the library writes it (and reads it back in `wake`).
#[derive(Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum TimerKind {
    Relax { ticket: u64 },
    Rematch { ticket: u64 },
    Interests { ticket: u64 },
    Proposal { match_id: Arc<str> },
}

impl From<TimerKind> for Timer {
    fn from(t: TimerKind) -> Timer {
        match t {
            TimerKind::Relax { ticket } => Timer::Relax { ticket },
            TimerKind::Rematch { ticket } => Timer::Rematch { ticket },
            TimerKind::Interests { ticket } => Timer::Interests { ticket },
            TimerKind::Proposal { match_id } => Timer::Proposal { match_id },
        }
    }
}

impl From<Timer> for TimerKind {
    fn from(t: Timer) -> TimerKind {
        match t {
            Timer::Relax { ticket } => TimerKind::Relax { ticket },
            Timer::Rematch { ticket } => TimerKind::Rematch { ticket },
            Timer::Interests { ticket } => TimerKind::Interests { ticket },
            Timer::Proposal { match_id } => TimerKind::Proposal { match_id },
        }
    }
}

impl From<OutcomeReply> for Outcome {
    fn from(r: OutcomeReply) -> Outcome {
        Outcome {
            waits: r.waits.into_iter().map(Duration::from_millis).collect(),
            started: r
                .started
                .into_iter()
                .map(|s| SessionStarted {
                    session_id: s.session_id,
                    users: s.users,
                    pools: s.pools,
                    started_at_ms: s.started_at_ms,
                })
                .collect(),
            closed: r
                .closed
                .into_iter()
                .map(|c| SessionClosed {
                    session_id: c.session_id,
                    users: c.users,
                    started_at_ms: c.started_at_ms,
                    ended_at_ms: c.ended_at_ms,
                    ended_by: c.ended_by,
                    reason: c.reason,
                })
                .collect(),
            changed_pools: r.changed_pools,
            held: r.held,
            pending: r
                .pending
                .into_iter()
                .map(|p| PendingSession {
                    session_id: p.session_id,
                    handles: p.handles,
                })
                .collect(),
            ended_sessions: r.ended_sessions,
            timers: r
                .timers
                .into_iter()
                .map(|t| (Duration::from_millis(t.delay_ms), t.user, t.timer.into()))
                .collect(),
        }
    }
}

/// An event replayed from a user's log.
#[derive(Deserialize)]
struct Replayed {
    seq: u64,
    frame: String,
}

fn frames(replay: Vec<Replayed>) -> Vec<Frame> {
    replay
        .into_iter()
        .map(|r| Frame {
            seq: Some(r.seq),
            text: r.frame.into(),
        })
        .collect()
}

#[derive(Deserialize)]
struct AttachReply {
    state: StateName,
    resume_token: String,
    last_seq: u64,
    resumed: bool,
    #[serde(deserialize_with = "list")]
    replay: Vec<Replayed>,
}

#[derive(Deserialize)]
struct SinceReply {
    resumed: bool,
    #[serde(deserialize_with = "list")]
    replay: Vec<Replayed>,
}

#[derive(Deserialize)]
struct StatusReply {
    state: StateName,
    position: Option<u64>,
    estimated_wait_ms: Option<u64>,
    session_id: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    role: Option<Role>,
}

#[derive(Deserialize)]
struct StatsReply {
    queued: u64,
    sessions: u64,
}

#[derive(Deserialize)]
struct TickReply {
    epoch: String,
    epoch_changed: bool,
    rejoined: bool,
    cleaned_users: u64,
    expired: u64,
    dead_instances: u64,
}

#[derive(Deserialize)]
struct MediaReadyReply {
    went_live: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum MediaLeftEffect {
    Ended,
    Duplicate,
    NoSession,
}

#[derive(Deserialize)]
struct MediaLeftReply {
    effect: MediaLeftEffect,
}

#[derive(Deserialize)]
struct SessionsReply {
    #[serde(deserialize_with = "list")]
    sessions: Vec<SessionReply>,
}

#[derive(Deserialize)]
struct SessionReply {
    session_id: Arc<str>,
    matched_at_ms: u64,
    pending: bool,
}

#[derive(Deserialize)]
struct PeerReply {
    session_id: Arc<str>,
    peer: UserId,
}

#[derive(Deserialize)]
struct LeaseReply {
    held: bool,
}

fn unavailable(e: impl std::fmt::Display) -> MatchError {
    MatchError::Unavailable(e.to_string())
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, MatchError> {
    serde_json::from_str(text).map_err(|e| MatchError::Internal(format!("bad library reply: {e}")))
}

/// The same failure for each operation of a failed call: unavailable stays unavailable,
/// anything else is a bug of ours.
fn each(e: &MatchError) -> MatchError {
    match e {
        MatchError::Unavailable(m) => MatchError::Unavailable(m.clone()),
        other => MatchError::Internal(other.to_string()),
    }
}

/// Makes the calls of one instance: waits for a first operation and for a free call slot,
/// then takes every operation queued meanwhile (up to `max_ops`) into one call. Ends when the
/// matchmaker (the queue's sender) is gone, after the calls in flight.
async fn send_batches(link: Arc<Link>, mut queue: mpsc::Receiver<Queued>, batching: Batching) {
    let slots = Arc::new(Semaphore::new(batching.in_flight));
    while let Some(first) = queue.recv().await {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut batch = vec![first];
        while batch.len() < batching.max_ops {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Nobody waits for these any more (timed out or gone): better not done at all.
        batch.retain(|op| !op.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let link = link.clone();
        tokio::spawn(async move {
            match link.batch(&batch).await {
                Ok(replies) => {
                    for (op, reply) in batch.into_iter().zip(replies) {
                        let _ = op.reply.send(Ok(reply));
                    }
                }
                Err(e) => {
                    for op in batch {
                        let _ = op.reply.send(Err(each(&e)));
                    }
                }
            }
            drop(slot);
        });
    }
}

impl Link {
    fn lock_shared(&self) -> std::sync::MutexGuard<'_, Option<Shared>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connection(&self) -> Result<Shared, MatchError> {
        if let Some(shared) = self.lock_shared().clone() {
            return Ok(shared);
        }
        let shared = match &self.pool {
            Pool::Single(p) => Shared::Single((*p.get().await.map_err(unavailable)?).clone()),
            Pool::Cluster(p) => Shared::Cluster((*p.get().await.map_err(unavailable)?).clone()),
        };
        *self.lock_shared() = Some(shared.clone());
        Ok(shared)
    }

    /// An operation's arguments as the library reads them: with the entropy for the ids it
    /// makes (and the test clock, if set).
    fn args(&self, mut args: Value) -> String {
        args["entropy"] = random_id("", 16).into();
        if let Some(clock) = &self.clock {
            args["now_ms"] = clock.unix_ms().into();
        }
        args.to_string()
    }

    /// Runs a batch of operations in one call and returns their replies, in order. In media
    /// mode p2p, the first call of an instance (and the first after its configuration expired
    /// or Redis lost its data) finds no ICE servers of this instance in Redis and changes
    /// nothing: they are written, and the batch runs again.
    async fn batch(&self, batch: &[Queued]) -> Result<Vec<String>, MatchError> {
        let ops = batch.iter().map(|op| (op.operation, op.args.as_str()));
        let fcall = self.fcall(ops);
        let mut replies = self.run(&fcall, batch.len()).await?;
        if p2p_config_missing(&replies[0]) {
            self.write_p2p_config().await?;
            replies = self.run(&fcall, batch.len()).await?;
        }
        Ok(replies)
    }

    /// Writes this instance's ICE servers where its calls read them (`P:p2p:<instance>`).
    /// The TURN secret travels as an argument of this operation only, never of the others.
    async fn write_p2p_config(&self) -> Result<(), MatchError> {
        let Some(args) = &self.p2p_config else {
            return Err(MatchError::Internal(
                "the library asks for a p2p configuration in LiveKit mode".into(),
            ));
        };
        let fcall = self.fcall([("p2p_config", self.args(args.clone()).as_str())].into_iter());
        let replies = self.run(&fcall, 1).await?;
        match parse::<Answer<NoReply>>(&replies[0])? {
            Answer::Done(_) => Ok(()),
            Answer::Error(e) => Err(e.into_error()),
        }
    }

    /// The FCALL of a batch: the settings, then each operation's name and arguments.
    fn fcall<'a>(&self, ops: impl Iterator<Item = (&'a str, &'a str)>) -> redis::Cmd {
        let mut fcall = redis::cmd("FCALL");
        fcall
            .arg(&self.library.function)
            .arg(1)
            .arg(&self.route_key)
            .arg(&self.library_settings);
        for (operation, args) in ops {
            fcall.arg(operation).arg(args);
        }
        fcall
    }

    /// Sends one FCALL (loading the library where Redis lacks it) and reads its `ops` replies.
    async fn run(&self, fcall: &redis::Cmd, ops: usize) -> Result<Vec<String>, MatchError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.call_timeout, async {
            let mut conn = self.connection().await?;
            match conn.query::<(u64, Vec<String>)>(fcall).await {
                // A Redis that started empty (or a new cluster node) lacks the library: load it
                // and try once more.
                Err(e) if e.to_string().contains("Function not found") => {
                    conn.load_library(&self.library)
                        .await
                        .map_err(unavailable)?;
                    conn.query(fcall).await
                }
                other => other,
            }
            .map_err(unavailable)
        })
        .await
        .unwrap_or_else(|_| Err(unavailable("Redis call timed out")));
        if result.is_err() {
            // The connection may be broken: the next call takes a fresh one from the pool.
            self.lock_shared().take();
        }
        self.metrics.redis_call(started.elapsed(), result.is_ok());
        let (published, replies) = result?;
        self.metrics.pubsub_published(published);
        if replies.len() != ops {
            return Err(MatchError::Internal(format!(
                "bad library reply: {} replies to {ops} operations",
                replies.len()
            )));
        }
        Ok(replies)
    }
}

/// Whether a reply says that this instance's p2p configuration is not in Redis (then the
/// whole call changed nothing, see `dispatch.lua`).
fn p2p_config_missing(reply: &str) -> bool {
    #[derive(Deserialize)]
    struct Code {
        code: String,
    }
    #[derive(Deserialize)]
    struct Error {
        error: Code,
    }
    serde_json::from_str::<Error>(reply).is_ok_and(|e| e.error.code == P2P_CONFIG_MISSING)
}

impl RedisMatchmaker {
    pub fn new(settings: RedisSettings, metrics: Arc<Metrics>) -> Result<Self, MatchError> {
        let pool_config = deadpool_redis::PoolConfig {
            max_size: settings.pool_size,
            timeouts: Timeouts {
                wait: Some(settings.call_timeout),
                create: Some(settings.call_timeout),
                recycle: Some(settings.call_timeout),
            },
            ..Default::default()
        };
        let pool = if settings.cluster {
            let mut config = deadpool_redis::cluster::Config::from_urls(settings.urls.clone());
            config.pool = Some(pool_config);
            Pool::Cluster(
                config
                    .create_pool(Some(Runtime::Tokio1))
                    .map_err(unavailable)?,
            )
        } else {
            // redis-rs gives every multiplexed connection a 500 ms response timeout of its own;
            // the call timeout is the one that should apply.
            let connection = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(settings.call_timeout))
                .set_connection_timeout(Some(settings.call_timeout));
            let manager =
                deadpool_redis::Manager::new_with_config(settings.urls[0].as_str(), connection)
                    .map_err(unavailable)?;
            Pool::Single(
                deadpool_redis::Pool::builder(manager)
                    .config(pool_config)
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(unavailable)?,
            )
        };
        let batching = settings.batching;
        if batching.in_flight == 0 || batching.max_ops == 0 {
            return Err(MatchError::Internal(format!(
                "batching needs at least one call in flight and one operation per call: {batching:?}"
            )));
        }
        let (queue, batches) = mpsc::channel(batching.queue_bound());
        let link = Link {
            pool,
            shared: std::sync::Mutex::new(None),
            library: Library::new(),
            route_key: settings.layout.route(),
            library_settings: library_settings(&settings),
            p2p_config: match &settings.media {
                MediaMode::P2p(ice) => {
                    let mut args = p2p_config_args(ice);
                    args["instance"] = settings.instance.as_str().into();
                    Some(args)
                }
                MediaMode::LiveKit { .. } => None,
            },
            call_timeout: settings.call_timeout,
            clock: None,
            metrics,
        };
        Ok(RedisMatchmaker {
            link: Arc::new(link),
            queue,
            batches: std::sync::Mutex::new(Some(batches)),
            batching,
            settings,
        })
    }

    /// For tests only (the differential model test drives the engines' time): every call
    /// passes `clock`'s time as `now_ms`, which the library reads instead of Redis's `TIME` in
    /// every rule (queue waits, anti-repeat, cooldowns, the enqueue rate, grace periods,
    /// deadlines, liveness). Key expiry, which only collects garbage (logs, de-duplication
    /// marks, leases, the state of users gone for good), stays on Redis's own clock. The
    /// gateway never sets it. Before the first operation only.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        Arc::get_mut(&mut self.link)
            .expect("the clock is set before the first operation")
            .clock = Some(clock);
        self
    }

    /// Runs one operation of the library with its named `args` and reads its reply `T`: it
    /// joins the next call of this instance (group commit, see [`Batching`]) and answers as if
    /// it had been called alone. Waiting for room in the queue and for the call together take
    /// at most the call timeout; an operation whose caller gave up before its call was sent
    /// is left out of it.
    async fn call<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        args: Value,
    ) -> Result<Done<T>, MatchError> {
        self.start_batches();
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            operation,
            args: self.link.args(args),
            reply,
        };
        let text = tokio::time::timeout(self.link.call_timeout, async {
            self.queue
                .send(queued)
                .await
                .map_err(|_| unavailable("the Redis batches stopped"))?;
            answer
                .await
                .map_err(|_| unavailable("the Redis batches stopped"))?
        })
        .await
        .unwrap_or_else(|_| Err(unavailable("Redis call timed out")))?;
        match parse::<Answer<T>>(&text)? {
            Answer::Done(done) => Ok(done),
            Answer::Error(e) => Err(e.into_error()),
        }
    }

    /// Starts the task that makes this instance's calls, on the first operation (so on the
    /// runtime the operations run on).
    fn start_batches(&self) {
        let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = batches.take() {
            tokio::spawn(send_batches(self.link.clone(), queue, self.batching));
        }
    }

    /// An operation that answers nothing but its outcome.
    async fn outcome(&self, operation: &'static str, args: Value) -> Result<Outcome, MatchError> {
        Ok(self.call::<NoReply>(operation, args).await?.outcome.into())
    }

    /// Heartbeat of this instance plus a share of the clean-up every instance does: users of
    /// dead instances are treated as disconnected, held states past their grace expire.
    pub async fn tick(&self, period: Duration, known_epoch: &str) -> Result<Tick, MatchError> {
        let done = self
            .call::<TickReply>(
                "tick",
                json!({
                    "instance": self.settings.instance,
                    "period_ms": ms(period),
                    "known_epoch": (!known_epoch.is_empty()).then_some(known_epoch),
                    "budget": TICK_BUDGET,
                    "media_unavailable_message": MEDIA_UNAVAILABLE,
                }),
            )
            .await?;
        let r = done.reply;
        Ok(Tick {
            outcome: done.outcome.into(),
            epoch: r.epoch,
            epoch_changed: r.epoch_changed,
            rejoined: r.rejoined,
            cleaned_users: r.cleaned_users,
            expired: r.expired,
            dead_instances: r.dead_instances,
        })
    }

    /// Events of `user` after `last_seq`, for catching a connection up after pub/sub lost
    /// messages. `None` when the log no longer covers them.
    pub async fn since(
        &self,
        user: &UserId,
        conn: ConnId,
        last_seq: u64,
    ) -> Result<Option<Vec<Frame>>, MatchError> {
        let args = json!({"user": user, "connection": conn.to_string(), "last_seq": last_seq});
        let r = self.call::<SinceReply>("since", args).await?.reply;
        Ok(r.resumed.then(|| frames(r.replay)))
    }
}

#[async_trait]
impl ClientOperations for RedisMatchmaker {
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        let args = json!({
            "user": user,
            "connection": conn.to_string(),
            "instance": self.settings.instance,
            "resume_token": resume.as_ref().map(|r| &r.token),
            "last_seq": resume.as_ref().map(|r| r.last_seq),
        });
        let done = self.call::<AttachReply>("attach", args).await?;
        let r = done.reply;
        Ok(Attached {
            state: r.state,
            resume_token: r.resume_token,
            last_seq: r.last_seq,
            resumed: r.resumed,
            outcome: done.outcome.into(),
            replay: frames(r.replay),
        })
    }

    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        let args = json!({"user": user, "connection": conn.to_string()});
        self.outcome("detach", args).await
    }

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        attributes: Arc<Attributes>,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError> {
        // Every relaxation step's pool and preferences, so that the library can widen the
        // search without knowing how pools are keyed.
        let steps: Vec<Prefs> = (1..=prefs.soft.len())
            .filter_map(|step| prefs.relaxed(step))
            .collect();
        let relaxed_pools: Vec<String> = steps.iter().map(Prefs::pool_key).collect();
        // The `want` of every level, the full preferences first ("" when it wants nothing),
        // as JSON texts the library decodes only when it compares them; none at all for the
        // many users who want nothing.
        let wants = (!prefs.want.is_empty()).then(|| {
            std::iter::once(&prefs.want)
                .chain(steps.iter().map(|p| &p.want))
                .map(|want| {
                    if want.is_empty() {
                        String::new()
                    } else {
                        serde_json::to_string(want).expect("wants serialise")
                    }
                })
                .collect::<Vec<_>>()
        });
        let args = json!({
            "user": user,
            "ref": reference,
            "pool": prefs.pool_key(),
            "relaxed_pools": relaxed_pools,
            // Text the library stores and splices into `widened_to` as it is.
            "relaxed_prefs": serde_json::to_string(&steps).expect("prefs serialise"),
            "interests": prefs.interests,
            "interests_only": prefs.interests_only,
            // Text, decoded only when somebody's want is checked against it.
            "attributes": (!attributes.is_empty())
                .then(|| serde_json::to_string(&*attributes).expect("attributes serialise")),
            "wants": wants,
        });
        self.outcome("enqueue", args).await
    }

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        let args = json!({"user": user, "ref": reference, "cooldown_message": COOLDOWN});
        self.outcome("skip", args).await
    }

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        self.outcome("end", json!({"user": user, "ref": reference}))
            .await
    }

    async fn status(&self, user: &UserId) -> Result<Status, MatchError> {
        let s = self
            .call::<StatusReply>("status", json!({"user": user}))
            .await?
            .reply;
        Ok(Status {
            state: s.state,
            position: s.position,
            estimated_wait_ms: s.estimated_wait_ms,
            session_id: s.session_id,
            peer: s.peer,
            role: s.role,
        })
    }

    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError> {
        self.outcome("block", json!({"user": user, "session": session}))
            .await
    }

    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<RecentPeer, MatchError> {
        let args = json!({"user": user, "session": session});
        let r = self.call::<PeerReply>("peer", args).await?.reply;
        Ok(RecentPeer {
            session_id: r.session_id,
            peer: r.peer,
        })
    }

    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        self.outcome("accept", json!({"user": user, "match_id": match_id}))
            .await
    }

    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        self.outcome("decline", json!({"user": user, "match_id": match_id}))
            .await
    }

    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError> {
        // The library splices this into the frame as it is: the payload exactly as the client
        // sent it, the chat text as a JSON string.
        let json = match &message {
            Relay::Signal(payload) => std::borrow::Cow::Borrowed(payload.get()),
            Relay::Chat(text) => serde_json::to_string(text)
                .expect("strings serialise")
                .into(),
        };
        let args = json!({"user": user, "kind": message.name(), "json": json});
        self.outcome("relay", args).await.map(|_| ())
    }
}

#[async_trait]
impl Timers for RedisMatchmaker {
    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        let args = json!({"user": user, "connection": conn.to_string()});
        self.outcome("expire", args).await
    }

    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError> {
        self.outcome("refresh", json!({"pool": pool}))
            .await
            .map(|_| ())
    }

    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError> {
        let args = json!({"user": user, "timer": TimerKind::from(timer)});
        self.outcome("wake", args).await
    }
}

#[async_trait]
impl Administration for RedisMatchmaker {
    async fn stats(&self) -> Result<Stats, MatchError> {
        let r = self.call::<StatsReply>("stats", json!({})).await?.reply;
        Ok(Stats {
            queued: r.queued,
            sessions: r.sessions,
        })
    }

    async fn lease(&self, name: &str, ttl: Duration) -> Result<bool, MatchError> {
        let args = json!({
            "instance": self.settings.instance,
            "name": name,
            "ttl_ms": ms(ttl).max(1),
        });
        Ok(self.call::<LeaseReply>("lease", args).await?.reply.held)
    }

    async fn restore_blocks(&self, blocker: &UserId, blocked: &[UserId]) -> Result<(), MatchError> {
        let args = json!({"user": blocker, "blocked": blocked});
        self.outcome("restore_blocks", args).await.map(|_| ())
    }

    async fn overview(&self) -> Result<Overview, MatchError> {
        let args = json!({"max_pools": OVERVIEW_POOLS});
        let r = self.call::<OverviewReply>("overview", args).await?.reply;
        let mut pools: Vec<PoolOverview> = r
            .pools
            .into_iter()
            .map(|p| PoolOverview {
                pool: p.pool,
                waiting: p.waiting,
                estimated_wait_ms: p.estimated_wait_ms,
            })
            .collect();
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        Ok(Overview {
            pools,
            sessions: r.sessions,
            matches: MinuteCounts::from_buckets(
                r.matches_last_minute,
                r.matches_this_minute,
                crate::ids::unix_ms(),
            ),
            instances: r
                .instances
                .into_iter()
                .map(|i| (i.instance, i.connections))
                .collect(),
        })
    }

    async fn moderator_end(&self, session: &str) -> Result<Option<Outcome>, MatchError> {
        let done = self
            .call::<ModeratorEndReply>("moderator_end", json!({"session": session}))
            .await?;
        Ok(done.reply.ended.then(|| done.outcome.into()))
    }
}

#[async_trait]
impl MediaEvents for RedisMatchmaker {
    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<MediaReady, MatchError> {
        let [offerer, answerer] =
            media.map(|m| serde_json::to_string(&m).expect("media serialises"));
        let args = json!({
            "session": session,
            "offerer_media": offerer,
            "answerer_media": answerer,
        });
        let done = self.call::<MediaReadyReply>("media_ready", args).await?;
        Ok(MediaReady {
            live: done.reply.went_live,
            outcome: done.outcome.into(),
        })
    }

    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError> {
        let args = json!({"session": session, "message": MEDIA_UNAVAILABLE});
        self.outcome("media_failed", args).await
    }

    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<MediaLeft, MatchError> {
        let args = json!({
            "session": session,
            "left": left,
            "event_id": event_id,
            "dedupe_ms": ms(dedupe).max(1),
        });
        let done = self.call::<MediaLeftReply>("media_left", args).await?;
        let effect = match done.reply.effect {
            MediaLeftEffect::Ended => MediaEffect::Ended,
            MediaLeftEffect::Duplicate => MediaEffect::Duplicate,
            MediaLeftEffect::NoSession => MediaEffect::NoSession,
        };
        Ok(MediaLeft {
            effect,
            outcome: done.outcome.into(),
        })
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError> {
        let r = self
            .call::<SessionsReply>("sessions", json!({}))
            .await?
            .reply;
        Ok(r.sessions
            .into_iter()
            .map(|s| SessionInfo {
                session_id: s.session_id,
                created_ms: s.matched_at_ms,
                pending: s.pending,
            })
            .collect())
    }
}
