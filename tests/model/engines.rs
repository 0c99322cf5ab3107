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

use std::collections::HashSet;
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
use matchgate::redis_keys::Layout;

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

/// Records every frame the memory engine hands out, in delivery order.
#[derive(Default)]
struct Recorder(Mutex<Vec<(UserId, Frame)>>);

impl Bus for Recorder {
    fn deliver(&self, user: &UserId, frame: Frame) {
        self.0.lock().unwrap().push((user.clone(), frame));
    }
}

/// What the subscriber of a Redis engine received: payloads in order.
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
        for url in &target.urls {
            let client = redis::Client::open(url.as_str()).expect("Redis URL");
            let mut conn = client
                .get_multiplexed_async_connection()
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
        let (client, publisher) = owner.expect("a node that serves the deployment's slot");
        let mut pubsub = client.get_async_pubsub().await.expect("subscriber");
        pubsub.subscribe(&channel).await.expect("subscribing");
        let inbox = Arc::new(Inbox::default());
        let sink = inbox.clone();
        let listener = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(msg) = messages.next().await {
                let payload: String = msg.get_payload().unwrap_or_default();
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
                markers: AtomicU64::new(0),
                listener,
            },
        }
    }

    /// The frames handed out since the last call, in order, without those for `away` users.
    pub async fn frames(&self, away: &HashSet<UserId>) -> Vec<(UserId, Frame)> {
        let all = match &self.source {
            Source::Memory(bus) => std::mem::take(&mut *bus.0.lock().unwrap()),
            Source::Redis {
                inbox,
                publisher,
                channel,
                markers,
                ..
            } => {
                let marker = format!("M{}", markers.fetch_add(1, Ordering::SeqCst));
                let mut conn = publisher.clone();
                let () = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(&marker)
                    .query_async::<i64>(&mut conn)
                    .await
                    .map(|_| ())
                    .expect("publishing a marker");
                let payloads = tokio::time::timeout(PATIENCE, async {
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
                .expect("the marker came back from Redis");
                payloads.iter().filter_map(|p| parse_payload(p)).collect()
            }
        };
        all.into_iter()
            .filter(|(user, _)| !away.contains(user))
            .collect()
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

/// A published frame `F<user>\n<seq>\n<frame>` (seq 0: none); other messages (a replaced
/// connection's `K`) are no frames.
fn parse_payload(payload: &str) -> Option<(UserId, Frame)> {
    let rest = payload.strip_prefix('F')?;
    let (user, rest) = rest.split_once('\n')?;
    let (seq, text) = rest.split_once('\n')?;
    let seq: u64 = seq.parse().ok()?;
    Some((
        user.into(),
        Frame {
            seq: (seq > 0).then_some(seq),
            text: text.into(),
        },
    ))
}
