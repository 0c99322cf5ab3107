//! The Redis matchmaker of the scale-out mode: queue, sessions and event logs live in Redis and
//! every operation is one call (FCALL) of the function library `redis.lua`, so N instances
//! racing on the same pool can never match a user twice or put a user in two sessions.
//!
//! The library also publishes each frame on the pub/sub channel of the instance that holds the
//! user's connection (see [`crate::bus::redis`]), inside the same atomic step that appends it to
//! the user's log, so events reach every user in `seq` order. All keys share one hash tag, so
//! every call touches one slot and the same code runs against Redis Cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_redis::{Runtime, Timeouts};
use serde::{Deserialize, Deserializer};

use super::memory::{COOLDOWN, MEDIA_UNAVAILABLE};
use super::{
    Attached, ConnId, MatchError, Matchmaker, MediaEffect, MediaMode, Outcome, PendingSession,
    Resume, Rules, SessionInfo, Stats, Status, Timer, UserId,
};
use crate::bus::Frame;
use crate::clock::Clock;
use crate::ids::random_id;
use crate::metrics::Metrics;
use crate::p2p::IceServers;
use crate::protocol::{EndReason, IceServer, Media, Prefs, Relay, StateName};

/// The error of a call made before this instance's p2p configuration was in Redis.
const P2P_CONFIG_MISSING: &str = "p2p_config_missing";

/// How long an instance's p2p configuration stays in Redis; a call after that writes it again.
const P2P_CONFIG_TTL: Duration = Duration::from_secs(3600);

/// The function library with every matching operation, with `@VERSION@` for its version.
const LIBRARY: &str = include_str!("redis.lua");

/// The library text and its function's name, versioned by a hash of the text.
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

/// Where the Redis keys and channels of one deployment live.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Key prefix with the hash tag, e.g. `{mg}`.
    pub prefix: String,
    /// Pub/sub channel prefix; an instance listens on `<prefix><instance id>`.
    pub channel_prefix: String,
}

impl Layout {
    pub fn new(namespace: &str) -> Self {
        Layout {
            prefix: format!("{{{namespace}}}"),
            channel_prefix: format!("{namespace}:i:"),
        }
    }

    pub fn channel(&self, instance: &str) -> String {
        format!("{}{instance}", self.channel_prefix)
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
}

/// The rules as the library reads them (see `read_rules` in redis.lua).
fn rules_arg(r: &Rules) -> String {
    let ms = |d: Duration| d.as_millis().to_string();
    let cooldowns: Vec<String> = r.skip_cooldowns.iter().map(|d| ms(*d)).collect();
    [
        ms(r.anti_repeat_window),
        ms(r.anti_repeat_fallback),
        ms(r.skip_quick),
        r.skip_limit.to_string(),
        ms(r.skip_window),
        r.enqueue_per_minute.to_string(),
        ms(r.accept_timeout.unwrap_or_default()),
        if r.decline_to_tail { "1" } else { "0" }.to_string(),
        ms(r.relax_after),
        cooldowns.join(";"),
        r.max_blocks.to_string(),
        ms(r.block_ttl),
    ]
    .join(",")
}

enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl Shared {
    async fn query(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<String> {
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

pub struct RedisMatchmaker {
    pool: Pool,
    shared: std::sync::Mutex<Option<Shared>>,
    library: Library,
    settings: RedisSettings,
    route_key: String,
    rules: String,
    /// The media mode as the library reads it (argument 10).
    media: String,
    /// Media mode p2p: the arguments of the call that writes this instance's ICE servers.
    p2p_config: Option<[String; 5]>,
    metrics: Arc<Metrics>,
    /// Tests only: the clock every call's `now` comes from instead of Redis's `TIME`.
    test_clock: Option<Arc<dyn Clock>>,
}

/// What the library keeps of an instance's ICE servers (see `p2p_config` in redis.lua): the
/// TURN secret, the credential lifetime in s, the STUN entry and the TURN URLs as JSON ("" for
/// what is not configured), and how long the key lives, in ms.
fn p2p_config_args(ice: &IceServers) -> [String; 5] {
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
    let (secret, ttl, turn) = match ice.turn() {
        Some(t) => (
            t.secret.clone(),
            t.ttl.as_secs().to_string(),
            serde_json::to_string(&t.urls).expect("URLs serialise"),
        ),
        None => (String::new(), "0".into(), String::new()),
    };
    let keep = P2P_CONFIG_TTL.as_millis().to_string();
    [secret, ttl, stun, turn, keep]
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

#[derive(Deserialize, Default)]
#[serde(default)]
struct Reply {
    error: Option<String>,
    message: Option<String>,
    retry_after_ms: Option<u64>,
    #[serde(deserialize_with = "list")]
    timers: Vec<(u64, Arc<str>, String, String)>,
    // peer
    session: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    #[serde(deserialize_with = "list")]
    waits: Vec<u64>,
    #[serde(deserialize_with = "list")]
    ended: Vec<EndReason>,
    #[serde(deserialize_with = "list")]
    changed: Vec<Arc<str>>,
    held: bool,
    published: u64,
    #[serde(deserialize_with = "list")]
    pending: Vec<(Arc<str>, Arc<str>, Arc<str>)>,
    #[serde(deserialize_with = "list")]
    ended_sessions: Vec<Arc<str>>,
    // media_ready, lease
    live: bool,
    // media_left
    effect: Option<String>,
    // sessions
    #[serde(deserialize_with = "list")]
    session_list: Vec<(Arc<str>, u64, bool)>,
    // attach
    state: Option<StateName>,
    resume_token: String,
    last_seq: u64,
    resumed: bool,
    #[serde(deserialize_with = "list")]
    replay: Vec<(u64, String)>,
    // status
    status: Option<StatusReply>,
    // stats
    queued: u64,
    sessions: u64,
    // tick
    epoch: String,
    epoch_changed: bool,
    rejoined: bool,
    cleaned_users: u64,
    expired: u64,
    dead_instances: u64,
}

#[derive(Deserialize)]
struct StatusReply {
    state: StateName,
    position: Option<u64>,
    estimated_wait_ms: Option<u64>,
    session_id: Option<Arc<str>>,
    peer: Option<Arc<str>>,
    role: Option<crate::protocol::Role>,
}

impl Reply {
    /// The reply, or the error it reports.
    fn into_result(mut self) -> Result<Reply, MatchError> {
        match self.error.take() {
            None => Ok(self),
            Some(code) => {
                let message = self.message.take().unwrap_or_default();
                let retry_after_ms = self.retry_after_ms.unwrap_or(1);
                Err(match code.as_str() {
                    "invalid_state" => MatchError::InvalidState(message.into()),
                    "replaced" => MatchError::Replaced,
                    "cooldown" => MatchError::Cooldown { retry_after_ms },
                    "rate_limited" => MatchError::RateLimited { retry_after_ms },
                    _ => MatchError::Internal(message),
                })
            }
        }
    }

    fn outcome(&mut self) -> Outcome {
        Outcome {
            waits: self.waits.drain(..).map(Duration::from_millis).collect(),
            ended: std::mem::take(&mut self.ended),
            changed_pools: std::mem::take(&mut self.changed),
            held: self.held,
            pending: self
                .pending
                .drain(..)
                .map(|(session_id, h1, h2)| PendingSession {
                    session_id,
                    handles: [h1, h2],
                })
                .collect(),
            ended_sessions: std::mem::take(&mut self.ended_sessions),
            timers: self
                .timers
                .drain(..)
                .filter_map(|(delay, user, kind, arg)| {
                    let timer = match kind.as_str() {
                        "relax" => Timer::Relax {
                            ticket: arg.parse().ok()?,
                        },
                        "rematch" => Timer::Rematch {
                            ticket: arg.parse().ok()?,
                        },
                        "proposal" => Timer::Proposal {
                            match_id: arg.into(),
                        },
                        _ => return None,
                    };
                    Some((Duration::from_millis(delay), user, timer))
                })
                .collect(),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> MatchError {
    MatchError::Unavailable(e.to_string())
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
        Ok(RedisMatchmaker {
            pool,
            shared: std::sync::Mutex::new(None),
            library: Library::new(),
            route_key: format!("{}:route", settings.layout.prefix),
            rules: rules_arg(&settings.rules),
            media: match &settings.media {
                MediaMode::LiveKit { pending } => format!("livekit {}", pending.as_millis()),
                MediaMode::P2p(_) => format!("p2p {}", settings.instance),
            },
            p2p_config: match &settings.media {
                MediaMode::P2p(ice) => Some(p2p_config_args(ice)),
                MediaMode::LiveKit { .. } => None,
            },
            settings,
            metrics,
            test_clock: None,
        })
    }

    /// Tests only: every call reads its `now` from `clock` instead of Redis's `TIME` (see
    /// [`crate::clock`]), so that a test drives time deterministically. Key expiry in Redis
    /// still follows the real time.
    pub fn with_test_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.test_clock = Some(clock);
        self
    }

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

    /// Runs one operation of the library. In media mode p2p, the first call of an instance
    /// (and the first after its configuration expired or Redis lost its data) finds no ICE
    /// servers of this instance in Redis: they are written, and the call runs again.
    async fn call(&self, op: &str, subject: &str, args: &[&str]) -> Result<Reply, MatchError> {
        let fcall = self.fcall(op, subject, args);
        let mut reply = self.run(&fcall).await?;
        if reply.error.as_deref() == Some(P2P_CONFIG_MISSING) {
            self.write_p2p_config().await?;
            reply = self.run(&fcall).await?;
        }
        self.metrics.pubsub_published(reply.published);
        reply.into_result()
    }

    /// Writes this instance's ICE servers where its calls read them (`P:p2p:<instance>`).
    /// The TURN secret travels as an argument of this call only, never of the others.
    async fn write_p2p_config(&self) -> Result<(), MatchError> {
        let Some(args) = &self.p2p_config else {
            return Err(MatchError::Internal(
                "the library asks for a p2p configuration in LiveKit mode".into(),
            ));
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let fcall = self.fcall("p2p_config", &self.settings.instance, &args);
        self.run(&fcall).await?.into_result().map(|_| ())
    }

    /// The FCALL of one operation.
    fn fcall(&self, op: &str, subject: &str, args: &[&str]) -> redis::Cmd {
        let s = &self.settings;
        let mut fcall = redis::cmd("FCALL");
        fcall.arg(&self.library.function);
        // The test clock travels as a second key (same hash tag, never read or written): the
        // operation arguments are positional and may end in client text, a key cannot.
        match &self.test_clock {
            None => fcall.arg(1).arg(&self.route_key),
            Some(clock) => fcall.arg(2).arg(&self.route_key).arg(format!(
                "{}:test_now:{}",
                s.layout.prefix,
                clock.unix_ms()
            )),
        };
        fcall
            .arg(&s.layout.prefix)
            .arg(op)
            .arg(if s.requeue_peer_on_skip { "1" } else { "0" })
            .arg(s.history_len)
            .arg(s.history_ttl.as_millis() as u64)
            .arg(s.resume_grace.as_millis() as u64)
            .arg(&s.layout.channel_prefix)
            .arg(random_id("", 16))
            .arg(subject)
            .arg(&self.media)
            .arg(&self.rules);
        for a in args {
            fcall.arg(*a);
        }
        fcall
    }

    /// Sends one FCALL and reads its reply (loading the library where Redis lacks it).
    async fn run(&self, fcall: &redis::Cmd) -> Result<Reply, MatchError> {
        let s = &self.settings;
        let started = Instant::now();
        let result = tokio::time::timeout(s.call_timeout, async {
            let mut conn = self.connection().await?;
            match conn.query(fcall).await {
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
        let text = result?;
        serde_json::from_str(&text)
            .map_err(|e| MatchError::Internal(format!("bad script reply: {e}")))
    }

    /// Heartbeat of this instance plus a share of the clean-up every instance does: users of
    /// dead instances are treated as disconnected, held states past their grace expire.
    pub async fn tick(&self, period: Duration, known_epoch: &str) -> Result<Tick, MatchError> {
        let period_ms = (period.as_millis() as u64).to_string();
        let mut reply = self
            .call(
                "tick",
                &self.settings.instance,
                &[&period_ms, known_epoch, "1000", MEDIA_UNAVAILABLE],
            )
            .await?;
        Ok(Tick {
            outcome: reply.outcome(),
            epoch: std::mem::take(&mut reply.epoch),
            epoch_changed: reply.epoch_changed,
            rejoined: reply.rejoined,
            cleaned_users: reply.cleaned_users,
            expired: reply.expired,
            dead_instances: reply.dead_instances,
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
        let conn = conn.to_string();
        let last = last_seq.to_string();
        let reply = self.call("since", user, &[&conn, &last]).await?;
        Ok(reply.resumed.then(|| frames(reply.replay)))
    }
}

/// The script's encoding of an optional `ref`: "" when absent, "=<ref>" when present.
fn ref_arg(reference: Option<&str>) -> String {
    reference.map(|r| format!("={r}")).unwrap_or_default()
}

fn frames(replay: Vec<(u64, String)>) -> Vec<Frame> {
    replay
        .into_iter()
        .map(|(seq, text)| Frame {
            seq: Some(seq),
            text: text.into(),
        })
        .collect()
}

#[async_trait]
impl Matchmaker for RedisMatchmaker {
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        let conn = conn.to_string();
        let (token, last) = match &resume {
            Some(r) => (r.token.as_str(), r.last_seq.to_string()),
            None => ("", String::new()),
        };
        let mut reply = self
            .call(
                "attach",
                user,
                &[&conn, &self.settings.instance, token, &last],
            )
            .await?;
        Ok(Attached {
            state: reply.state.unwrap_or(StateName::Idle),
            resume_token: std::mem::take(&mut reply.resume_token),
            last_seq: reply.last_seq,
            resumed: reply.resumed,
            outcome: reply.outcome(),
            replay: frames(std::mem::take(&mut reply.replay)),
        })
    }

    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        Ok(self
            .call("detach", user, &[&conn.to_string()])
            .await?
            .outcome())
    }

    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        Ok(self
            .call("expire", user, &[&conn.to_string()])
            .await?
            .outcome())
    }

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError> {
        let json = serde_json::to_string(&prefs).expect("prefs serialise");
        // Every relaxation step's pool and preferences, so that the library can widen the
        // search without knowing how pools are keyed.
        let steps: Vec<Prefs> = (1..=prefs.soft.len())
            .filter_map(|step| prefs.relaxed(step))
            .collect();
        let keys: Vec<String> = steps.iter().map(Prefs::pool_key).collect();
        let relaxed = serde_json::to_string(&steps).expect("prefs serialise");
        Ok(self
            .call(
                "enqueue",
                user,
                &[
                    &json,
                    &prefs.pool_key(),
                    &ref_arg(reference),
                    &keys.join("\n"),
                    &relaxed,
                ],
            )
            .await?
            .outcome())
    }

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        Ok(self
            .call("skip", user, &[&ref_arg(reference), COOLDOWN])
            .await?
            .outcome())
    }

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        Ok(self
            .call("end", user, &[&ref_arg(reference)])
            .await?
            .outcome())
    }

    async fn status(&self, user: &UserId) -> Result<Status, MatchError> {
        let reply = self.call("status", user, &[]).await?;
        let s = reply
            .status
            .ok_or_else(|| MatchError::Internal("status reply without status".into()))?;
        Ok(Status {
            state: s.state,
            position: s.position,
            estimated_wait_ms: s.estimated_wait_ms,
            session_id: s.session_id,
            peer: s.peer,
            role: s.role,
        })
    }

    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError> {
        self.call("refresh", "", &[pool]).await.map(|_| ())
    }

    async fn stats(&self) -> Result<Stats, MatchError> {
        let reply = self.call("stats", "", &[]).await?;
        Ok(Stats {
            queued: reply.queued,
            sessions: reply.sessions,
        })
    }

    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<(bool, Outcome), MatchError> {
        let [a, b] = media.map(|m| serde_json::to_string(&m).expect("media serialises"));
        let mut reply = self.call("media_ready", "", &[session, &a, &b]).await?;
        Ok((reply.live, reply.outcome()))
    }

    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError> {
        Ok(self
            .call("media_failed", "", &[session, MEDIA_UNAVAILABLE])
            .await?
            .outcome())
    }

    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<(MediaEffect, Outcome), MatchError> {
        let ttl = dedupe.as_millis().max(1).to_string();
        let args = [session, left.unwrap_or(""), event_id, &ttl];
        let mut reply = self.call("media_left", "", &args).await?;
        let effect = match reply.effect.as_deref() {
            Some("ended") => MediaEffect::Ended,
            Some("duplicate") => MediaEffect::Duplicate,
            _ => MediaEffect::NoSession,
        };
        Ok((effect, reply.outcome()))
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError> {
        let reply = self.call("sessions", "", &[]).await?;
        Ok(reply
            .session_list
            .into_iter()
            .map(|(session_id, created_ms, pending)| SessionInfo {
                session_id,
                created_ms,
                pending,
            })
            .collect())
    }

    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError> {
        Ok(self
            .call("block", user, &[session.unwrap_or("")])
            .await?
            .outcome())
    }

    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<(Arc<str>, UserId), MatchError> {
        let reply = self.call("peer", user, &[session.unwrap_or("")]).await?;
        reply
            .session
            .zip(reply.peer)
            .ok_or_else(|| MatchError::Internal("peer reply without a peer".into()))
    }

    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        Ok(self.call("accept", user, &[match_id]).await?.outcome())
    }

    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        Ok(self.call("decline", user, &[match_id]).await?.outcome())
    }

    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError> {
        let (kind, arg) = match timer {
            Timer::Relax { ticket } => ("relax", ticket.to_string()),
            Timer::Rematch { ticket } => ("rematch", ticket.to_string()),
            Timer::Proposal { match_id } => ("proposal", match_id.to_string()),
        };
        Ok(self.call("wake", user, &[kind, &arg]).await?.outcome())
    }

    async fn lease(&self, name: &str, ttl: Duration) -> Result<bool, MatchError> {
        let ttl = ttl.as_millis().max(1).to_string();
        let reply = self
            .call("lease", &self.settings.instance, &[name, &ttl])
            .await?;
        Ok(reply.live)
    }

    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError> {
        // The library splices these into the frame as they are: the payload exactly as the
        // client sent it, the chat text as a JSON string.
        let json = match &message {
            Relay::Signal(payload) => std::borrow::Cow::Borrowed(payload.get()),
            Relay::Chat(text) => serde_json::to_string(text)
                .expect("strings serialise")
                .into(),
        };
        self.call("relay", user, &[message.name(), &json])
            .await
            .map(|_| ())
    }
}
