//! The one place where the model tests meet the engines: each engine of the differential test
//! built from one configuration and one test clock, and the frames it handed out, in order.
//!
//! Memory delivers through a recording bus. Redis publishes each frame on the calling
//! instance's pub/sub channel inside its script; the adapter subscribes to that channel on the
//! node that owns the deployment's slot and, after every operation, publishes a marker on the
//! same node: everything before the marker is what the operation sent (Redis delivers one
//! node's messages to a subscriber in order). Frames to users whose connection is away are
//! dropped for memory (its bus hands them to the gateway, which has nobody to give them to;
//! Redis does not publish them): the caller says who is away.
//!
//! The model test needs more: every frame the engine gave a user, also one a user away will
//! only get in a resume's replay ([`Engine::handed_out`]). Redis writes such a frame to the
//! user's log without publishing it, so the adapter also subscribes to the keyspace events
//! of the deployment's logs (`notify-keyspace-events`, set on the node by the adapter): an
//! `rpush` arrives in order with the published frames, and the log's newest entries are the
//! frames it stands for. A call publishes once, when it ends (one message with all its frames
//! for the instance), so a call's `rpush`es come first and its message after them.
//!
//! It also holds what every engine test shares besides: the Redis servers of a test run
//! ([`Servers`], started once per run), the one factory of a case's engines
//! ([`Servers::engines`]), and the environment knobs `MODEL_ENGINES` ([`wanted`]) and
//! `MODEL_CASES` ([`cases`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use matchgate::bus::{Bus, Frame};
use matchgate::clock::ManualClock;
use matchgate::matching::memory::{MemoryMatchmaker, Policy};
use matchgate::matching::redis::{RedisMatchmaker, RedisSettings};
use matchgate::matching::{Engine as EngineOps, MediaMode, Outcome, Rules, UserId};
use matchgate::metrics::Metrics;
use matchgate::redis_keys::{Layout, Notice};

use super::common::redis::{RedisCluster, RedisServer};

/// What every engine of a run is built from.
#[derive(Clone)]
pub struct EngineConfig {
    pub requeue_peer_on_skip: bool,
    pub history_len: usize,
    pub history_ttl: Duration,
    pub resume_grace: Duration,
    pub media: MediaMode,
    pub rules: Rules,
}

/// Where a Redis engine runs: one server, or the nodes of a cluster.
#[derive(Clone)]
pub struct RedisTarget {
    pub urls: Vec<String>,
    pub cluster: bool,
}

/// The Redis servers of a test run.
pub struct Servers {
    pub single: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
}

impl Servers {
    /// Starts one server when `single`, a cluster when `cluster`.
    pub async fn start(single: bool, cluster: bool) -> Servers {
        Servers {
            single: if single {
                Some(RedisServer::start().await)
            } else {
                None
            },
            cluster: if cluster {
                Some(RedisCluster::start().await)
            } else {
                None
            },
        }
    }

    /// Starts what engine `name` (`memory`, `redis` or `cluster`) needs.
    pub async fn for_engine(name: &str) -> Servers {
        Servers::start(name == "redis", name == "cluster").await
    }

    /// The engines of one case, each on `clock`, built from `config`: memory (when `memory`),
    /// then one on each Redis target these servers offer, in `namespace` (fresh per case, so
    /// that cases never share keys).
    pub async fn engines(
        &self,
        memory: bool,
        namespace: &str,
        config: &EngineConfig,
        clock: &Arc<ManualClock>,
    ) -> Vec<Engine> {
        let mut engines = Vec::new();
        if memory {
            engines.push(Engine::memory(config, clock.clone()));
        }
        if let Some(r) = &self.single {
            let target = RedisTarget {
                urls: vec![r.url()],
                cluster: false,
            };
            engines.push(Engine::redis(&target, namespace, config, clock.clone()).await);
        }
        if let Some(c) = &self.cluster {
            let target = RedisTarget {
                urls: c.urls(),
                cluster: true,
            };
            engines.push(Engine::redis(&target, namespace, config, clock.clone()).await);
        }
        engines
    }
}

/// Whether to run engine `name` (`MODEL_ENGINES`, e.g. `memory,redis`; default all three).
pub fn wanted(name: &str) -> bool {
    std::env::var("MODEL_ENGINES")
        .map(|v| v.split(',').any(|e| e.trim() == name))
        .unwrap_or(true)
}

/// Generated cases per run: `MODEL_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Records every frame the memory engine hands out, in delivery order.
#[derive(Default)]
struct Recorder(Mutex<Vec<(UserId, Frame)>>);

impl Bus for Recorder {
    fn deliver(&self, user: &UserId, frame: Frame) {
        self.0.lock().unwrap().push((user.clone(), frame));
    }
}

/// What the subscriber of a Redis engine received, in order: published payloads, and
/// `L<user>` for each entry appended to a user's log.
#[derive(Default)]
struct Inbox {
    payloads: Mutex<Vec<String>>,
    arrived: tokio::sync::Notify,
}

enum Source {
    Memory(Arc<Recorder>),
    Redis {
        engine: Arc<RedisMatchmaker>,
        inbox: Arc<Inbox>,
        /// A plain connection to the node that owns the deployment's slot, for the markers.
        publisher: redis::aio::MultiplexedConnection,
        channel: String,
        /// The key of a user's log is this followed by the user id.
        log_prefix: String,
        markers: AtomicU64,
        listener: tokio::task::JoinHandle<()>,
    },
}

/// One engine under test.
pub struct Engine {
    pub name: &'static str,
    pub mm: Arc<dyn EngineOps>,
    source: Source,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Source::Redis { listener, .. } = &self.source {
            listener.abort();
        }
    }
}

/// How long a marker may take to come back before the run fails (only a dead Redis does that).
const PATIENCE: Duration = Duration::from_secs(10);

impl Engine {
    pub fn memory(config: &EngineConfig, clock: Arc<ManualClock>) -> Engine {
        let bus = Arc::new(Recorder::default());
        let policy = Policy {
            requeue_peer_on_skip: config.requeue_peer_on_skip,
            history_len: config.history_len,
            history_ttl: config.history_ttl,
            media: config.media.clone(),
            rules: config.rules.clone(),
        };
        Engine {
            name: "memory",
            mm: Arc::new(MemoryMatchmaker::with_clock(bus.clone(), policy, clock)),
            source: Source::Memory(bus),
        }
    }

    /// A Redis engine in its own namespace (so runs never share keys) reading `clock`.
    pub async fn redis(
        target: &RedisTarget,
        namespace: &str,
        config: &EngineConfig,
        clock: Arc<ManualClock>,
    ) -> Engine {
        let layout = Layout::new(namespace);
        let instance = "inst".to_string();
        let channel = layout.channel(&instance);
        let route_key = format!("{}:route", layout.prefix);
        // The library's key root (`key_root` in keys.lua) holds the logs.
        let log_prefix = format!("{}:v2:log:", layout.prefix);
        let settings = RedisSettings {
            urls: target.urls.clone(),
            cluster: target.cluster,
            layout,
            instance,
            requeue_peer_on_skip: config.requeue_peer_on_skip,
            history_len: config.history_len,
            history_ttl: config.history_ttl,
            resume_grace: config.resume_grace,
            pool_size: 2,
            batching: Default::default(),
            media: config.media.clone(),
            rules: config.rules.clone(),
            call_timeout: Duration::from_secs(10),
        };
        let engine = Arc::new(
            RedisMatchmaker::new(settings, Arc::new(Metrics::new()))
                .expect("Redis engine")
                .with_clock(clock),
        );
        // The node serving the deployment's slot answers a command on its keys; the others
        // redirect.
        let mut owner = None;
        // The client's default response timeout (500 ms) trips on a loaded machine: only a
        // dead Redis may fail a run.
        let patient = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PATIENCE))
            .set_response_timeout(Some(PATIENCE));
        for url in &target.urls {
            let client = redis::Client::open(url.as_str()).expect("Redis URL");
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&patient)
                .await
                .expect("connecting to Redis");
            let answer: redis::RedisResult<i64> = redis::cmd("EXISTS")
                .arg(&route_key)
                .query_async(&mut conn)
                .await;
            if answer.is_ok() {
                owner = Some((client, conn));
                break;
            }
        }
        let (client, mut publisher) = owner.expect("a node that serves the deployment's slot");
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Kl")
            .query_async(&mut publisher)
            .await
            .expect("enabling keyspace events");
        let keyspace = format!("__keyspace@0__:{log_prefix}");
        let mut pubsub = client.get_async_pubsub().await.expect("subscriber");
        pubsub.subscribe(&channel).await.expect("subscribing");
        pubsub
            .psubscribe(format!("{keyspace}*"))
            .await
            .expect("subscribing to the logs' keyspace events");
        let inbox = Arc::new(Inbox::default());
        let sink = inbox.clone();
        let listener = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let payload: String = msg.get_payload().unwrap_or_default();
                let payload = match msg.get_channel_name().strip_prefix(&keyspace) {
                    Some(user) if payload == "rpush" => format!("L{user}"),
                    // Other changes of a log (its expiry, trimming, deletion) are no frames.
                    Some(_) => continue,
                    None => payload,
                };
                sink.payloads.lock().unwrap().push(payload);
                sink.arrived.notify_waiters();
            }
        });
        Engine {
            name: if target.cluster { "cluster" } else { "redis" },
            mm: engine.clone(),
            source: Source::Redis {
                engine,
                inbox,
                publisher,
                channel,
                log_prefix,
                markers: AtomicU64::new(0),
                listener,
            },
        }
    }

    /// The frames handed out since the last call, in order, without those for `away` users.
    pub async fn frames(&self, away: &HashSet<UserId>) -> Vec<(UserId, Frame)> {
        let all = match &self.source {
            Source::Memory(bus) => std::mem::take(&mut *bus.0.lock().unwrap()),
            Source::Redis { .. } => self
                .received()
                .await
                .iter()
                .flat_map(|p| parse_payload(p))
                .collect(),
        };
        all.into_iter()
            .filter(|(user, _)| !away.contains(user))
            .collect()
    }

    /// Every frame the engine gave a user since the last call, in order: also those with a
    /// `seq` for `away` users (logged for their resume), but not those without (a
    /// `queue_update` or `error` for a user away reaches nobody, in either engine). Redis
    /// must have published every frame for a user not away, and logged every frame with a
    /// `seq`.
    pub async fn handed_out(&self, away: &HashSet<UserId>) -> Vec<(UserId, Frame)> {
        let Source::Redis {
            publisher,
            log_prefix,
            ..
        } = &self.source
        else {
            return self
                .frames(&HashSet::new())
                .await
                .into_iter()
                .filter(|(user, frame)| frame.seq.is_some() || !away.contains(user))
                .collect();
        };
        let payloads = self.received().await;
        // Each log entry is followed by its frame's publication unless its user was away:
        // the entries stand for the frames with a `seq`.
        let mut appended: Vec<(UserId, usize)> = Vec::new();
        for p in &payloads {
            if let Some(user) = p.strip_prefix('L') {
                match appended.iter_mut().find(|(u, _)| **u == *user) {
                    Some((_, n)) => *n += 1,
                    None => appended.push((user.into(), 1)),
                }
            }
        }
        let mut entries: HashMap<UserId, VecDeque<Frame>> = HashMap::new();
        for (user, n) in appended {
            let mut conn = publisher.clone();
            let newest: Vec<String> = redis::cmd("LRANGE")
                .arg(format!("{log_prefix}{user}"))
                .arg(-(n as i64))
                .arg(-1)
                .query_async(&mut conn)
                .await
                .expect("reading a log");
            assert_eq!(newest.len(), n, "{user}'s log lost entries it just got");
            let frames = newest.iter().map(|e| parse_log_entry(e)).collect();
            entries.insert(user, frames);
        }
        // The library publishes, when its call ends, every frame it logged for a user who is
        // not away, in the order it logged them; a frame for a user away is only logged. The
        // log entries (`rpush`) come in the order the frames were made, so a frame for a user
        // away goes out in its place among the published ones: before the first published
        // frame logged after it.
        let mut out = Vec::new();
        let mut logged: VecDeque<(UserId, Frame, bool)> = VecDeque::new();
        let flush_away = |logged: &mut VecDeque<(UserId, Frame, bool)>,
                          out: &mut Vec<(UserId, Frame)>| {
            while logged.front().is_some_and(|(_, _, away)| *away) {
                let (user, frame, _) = logged.pop_front().expect("a front");
                out.push((user, frame));
            }
        };
        for p in &payloads {
            if let Some(user) = p.strip_prefix('L') {
                let user: UserId = user.into();
                let entry = entries.get_mut(&user).and_then(|q| q.pop_front());
                let entry = entry.expect("a log entry for each append");
                let is_away = away.contains(&user);
                logged.push_back((user, entry, is_away));
                continue;
            }
            for (user, frame) in parse_payload(p) {
                if frame.seq.is_some() {
                    flush_away(&mut logged, &mut out);
                    let next = logged.pop_front().map(|(u, f, _)| (u, f));
                    assert_eq!(
                        next.as_ref(),
                        Some(&(user.clone(), frame.clone())),
                        "a frame with a seq published out of the order it was logged in, for a \
                         user away, or not logged: {p}"
                    );
                    out.push((user, frame));
                    // A frame for a user away goes out right after the frame logged before it:
                    // the library makes a session's two `session_ended` (or `matched`) one after
                    // the other, before any frame without a seq (a pushed `error`) that the
                    // same call makes next, and that frame arrives in the same message.
                    flush_away(&mut logged, &mut out);
                    continue;
                }
                out.push((user, frame));
            }
        }
        flush_away(&mut logged, &mut out);
        assert!(
            logged.is_empty(),
            "frames logged for connected users and not published: {logged:?}"
        );
        out
    }

    /// Redis: what the subscriber received up to a marker published now.
    async fn received(&self) -> Vec<String> {
        let Source::Redis {
            inbox,
            publisher,
            channel,
            markers,
            ..
        } = &self.source
        else {
            return Vec::new();
        };
        let marker = format!("M{}", markers.fetch_add(1, Ordering::SeqCst));
        let mut conn = publisher.clone();
        let () = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(&marker)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .expect("publishing a marker");
        tokio::time::timeout(PATIENCE, async {
            loop {
                let arrived = inbox.arrived.notified();
                {
                    let mut got = inbox.payloads.lock().unwrap();
                    if let Some(i) = got.iter().position(|p| *p == marker) {
                        let mut before: Vec<String> = got.drain(..=i).collect();
                        before.pop();
                        return before;
                    }
                }
                arrived.await;
            }
        })
        .await
        .expect("the marker came back from Redis")
    }

    /// Redis: what is wrong with the per-tag candidate lists (`P:tag:<tag>\n<pool>`, see
    /// keys.lua), both ways: an entry must be a connected waiting user at that ticket, with
    /// that interest, listed in that pool; and every connected waiting user with interests
    /// must have its entry in each of its pools. So no entry outlives a dequeue, an expiry
    /// or a match (an outsider's leftovers would grow without a bound), and none is missing.
    /// Memory: nothing (its own unit test checks its index).
    pub async fn index_faults(&self) -> Vec<String> {
        let Source::Redis {
            publisher,
            log_prefix,
            ..
        } = &self.source
        else {
            return Vec::new();
        };
        let mut conn = publisher.clone();
        let root = log_prefix.strip_suffix("log:").expect("the key root");
        let mut faults = Vec::new();
        let cmd = |c: &str, args: &[&str]| {
            let mut q = redis::cmd(c);
            for a in args {
                q.arg(*a);
            }
            q
        };
        let tag_keys: Vec<String> = cmd("KEYS", &[&format!("{root}tag:*")])
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut listed = HashSet::new();
        for key in tag_keys {
            let (tag, pool) = key[root.len() + 4..].split_once('\n').expect("tag\npool");
            let entries: Vec<(String, u64)> = cmd("ZRANGE", &[&key, "0", "-1", "WITHSCORES"])
                .query_async(&mut conn)
                .await
                .expect("ZRANGE");
            for (user, ticket) in entries {
                listed.insert((user.clone(), tag.to_string(), pool.to_string()));
                let (state, t, away, interests, own, wider) =
                    waiter(&mut conn, &format!("{root}user:{user}")).await;
                let ok = state.as_deref() == Some("queued")
                    && t.as_deref() == Some(&ticket.to_string())
                    && away.as_deref() == Some("0")
                    && interests.unwrap_or_default().split('\n').any(|i| i == tag)
                    && pools_of(own, wider).iter().any(|p| p == pool);
                if !ok {
                    faults.push(format!(
                        "{user} at ticket {ticket} in the list of {tag:?} in {pool:?}"
                    ));
                }
            }
        }
        let user_keys: Vec<String> = cmd("KEYS", &[&format!("{root}user:*")])
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        for key in user_keys {
            let (state, _, away, interests, own, wider) = waiter(&mut conn, &key).await;
            if state.as_deref() != Some("queued") || away.as_deref() != Some("0") {
                continue;
            }
            let user = &key[root.len() + 5..];
            for tag in interests
                .unwrap_or_default()
                .split('\n')
                .filter(|t| !t.is_empty())
            {
                for pool in pools_of(own.clone(), wider.clone()) {
                    if !listed.contains(&(user.to_string(), tag.to_string(), pool.clone())) {
                        faults.push(format!(
                            "{user} missing from the list of {tag:?} in {pool:?}"
                        ));
                    }
                }
            }
        }
        faults.sort();
        faults
    }

    /// Redis: one heartbeat tick of the instance, as its gateway runs it (with a period longer
    /// than any run, so that the instance is never taken for dead). Memory: nothing.
    pub async fn tick(&self) -> Option<Outcome> {
        let Source::Redis { engine, .. } = &self.source else {
            return None;
        };
        let tick = engine
            .tick(Duration::from_secs(100 * 3600), "")
            .await
            .expect("Redis tick");
        Some(tick.outcome)
    }
}

/// A log entry `<seq> <unix ms> <frame>`.
fn parse_log_entry(entry: &str) -> Frame {
    let mut parts = entry.splitn(3, ' ');
    let seq = parts.next().and_then(|s| s.parse().ok());
    let text = parts.nth(1).expect("a log entry's frame");
    Frame {
        seq,
        text: text.into(),
    }
}

/// The frames of a published message, in order (one frame `F<user>\n<seq>\n<frame>`, seq 0:
/// none, or a call's several notices); other notices (a replaced connection's `K`) are no
/// frames.
fn parse_payload(payload: &str) -> Vec<(UserId, Frame)> {
    Notice::decode_all(payload.as_bytes())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|notice| match notice {
            Notice::Frame { user, seq, text } => Some((
                user.into(),
                Frame {
                    seq,
                    text: text.into(),
                },
            )),
            _ => None,
        })
        .collect()
}

/// A user hash's state, ticket, away, interests, pool and wider_pools fields.
type WaiterFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The fields of the user hash at `key` that say where a waiting user is listed.
async fn waiter(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> WaiterFields {
    redis::cmd("HMGET")
        .arg(key)
        .arg(&[
            "state",
            "ticket",
            "away",
            "interests",
            "pool",
            "wider_pools",
        ])
        .query_async(conn)
        .await
        .expect("HMGET")
}

/// The pools a waiting user is listed in: its own and those of its wider_pools field.
fn pools_of(pool: Option<String>, wider: Option<String>) -> Vec<String> {
    let mut pools: Vec<String> = pool.into_iter().collect();
    for p in wider
        .unwrap_or_default()
        .split('\n')
        .filter(|p| !p.is_empty())
    {
        if !pools.iter().any(|q| q == p) {
            pools.push(p.to_string());
        }
    }
    pools
}
