//! The scale-out mode: N identical instances sharing one Redis (or Redis Cluster), with no
//! sticky sessions.
//!
//! Besides the [`PartitionedMatchmaker`] (state: one or more partitions, each a complete
//! Redis matchmaker) and the pub/sub subscriber (delivery), each instance
//! runs two background loops:
//! - a heartbeat tick: refreshes this instance's liveness key and takes a share of the
//!   clean-up every instance does (users of instances that died without a clean shutdown,
//!   held states whose grace period ran out); and notices when Redis lost its data, or when
//!   this instance was itself taken for dead, and sends its clients to reconnect;
//! - a recovery loop: after the pub/sub connection was lost and restored, catches every local
//!   connection up from the users' logs, since messages published meanwhile are gone, and
//!   closes the local connections that bans announced meanwhile name.
//!
//! All three run in the server's [`Background`]; ban notices reach
//! [`moderation::announced`] through the subscriber's callback, so delivery does not depend
//! on moderation.
//!
//! [`RedisConfig`] is the Redis section of the configuration. The engine's [`settings`] are
//! built from it and the sections and values the server passes in; the other clients of the
//! shared Redis (moderation, the dev secret) get only its [`Deployment`], so they do not
//! depend on this module.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::backoff;
use crate::bus::redis::{subscribe, Recovery};
use crate::flags::{count, key_name, millis};
use crate::gateway::{Gateway, Origin, SessionConfig};
use crate::ids::random_id;
use crate::matching::partitioned::{PartitionedMatchmaker, MAX_PARTITIONS};
use crate::matching::redis::{Batching, RedisSettings};
use crate::matching::{MatchError, MediaMode, RulesConfig};
use crate::metrics::Metrics;
use crate::moderation::{self, disconnect_banned};
use crate::protocol::close;
use crate::redis_keys::{Deployment, Layout};
use crate::shutdown::Background;

/// The Redis section of the configuration: the scale-out mode is on with `--redis-url`.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisConfig {
    /// Redis URL: switches matching state and cross-instance delivery from memory to Redis
    /// (scale-out mode). With `--redis-cluster`, a comma-separated list of cluster nodes.
    #[arg(long, env = "MATCHGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Treat `--redis-url` as a Redis Cluster (comma-separated seed nodes).
    #[arg(long, env = "MATCHGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Namespace of all Redis keys and channels; also the keys' hash tag. Deployments that share
    /// a Redis need different namespaces.
    #[arg(
        long,
        env = "MATCHGATE_REDIS_NAMESPACE",
        default_value = "mg",
        value_parser = key_name
    )]
    pub redis_namespace: String,

    /// Partitions of the matching state, each under its own hash tag, so that Redis Cluster
    /// masters add throughput: users are spread by a hash of their id and only meet users of
    /// their partition (see README "Redis partitions"). Every instance of a deployment needs
    /// the same number; start-up refuses another than the one Redis records.
    #[arg(
        long,
        env = "MATCHGATE_REDIS_PARTITIONS",
        default_value = "1",
        value_parser = count(1..=MAX_PARTITIONS as u64)
    )]
    pub redis_partitions: usize,

    /// Redis connections in the command pool.
    #[arg(
        long,
        env = "MATCHGATE_REDIS_POOL_SIZE",
        default_value = "16",
        value_parser = count(1..)
    )]
    pub redis_pool_size: usize,

    /// Group commit: matching calls to Redis in flight at once from this instance. While they
    /// are, the operations asked for meanwhile queue (at most calls in flight × operations per
    /// call; beyond that they wait) and go together in the next call.
    #[arg(
        long,
        env = "MATCHGATE_REDIS_CALLS_IN_FLIGHT",
        default_value = "2",
        value_parser = count(1..=64)
    )]
    pub redis_calls_in_flight: usize,

    /// Group commit: operations one matching call to Redis carries at most (each still its own
    /// atomic step with its own answer).
    #[arg(
        long,
        env = "MATCHGATE_REDIS_OPS_PER_CALL",
        default_value = "64",
        value_parser = count(1..=4096)
    )]
    pub redis_ops_per_call: usize,

    /// How long one matching call to Redis may take before the action answers `unavailable`
    /// (the operation may still have been applied), in ms.
    #[arg(
        long,
        env = "MATCHGATE_REDIS_CALL_TIMEOUT_MS",
        default_value = "2000",
        value_parser = millis(10..)
    )]
    pub redis_call_timeout_ms: Duration,

    /// This instance's id among the instances sharing a Redis. Default: random at start-up.
    #[arg(long, env = "MATCHGATE_INSTANCE_ID", value_parser = parse_instance_id)]
    pub instance_id: Option<String>,

    /// How often an instance refreshes its liveness in Redis and helps with clean-up, in ms.
    /// An instance silent for two periods is treated as dead.
    #[arg(
        long,
        env = "MATCHGATE_INSTANCE_HEARTBEAT_MS",
        default_value = "2000",
        value_parser = millis(50..)
    )]
    pub instance_heartbeat_ms: Duration,
}

impl RedisConfig {
    /// The Redis node URLs, if the scale-out mode is on.
    pub fn urls(&self) -> Option<Vec<String>> {
        self.redis_url
            .as_ref()
            .map(|u| u.split(',').map(|s| s.trim().to_string()).collect())
    }

    /// Where the shared Redis is, for its clients besides the matching engine; `None` in the
    /// embedded mode.
    pub fn deployment(&self) -> Option<Deployment> {
        Some(Deployment {
            urls: self.urls()?,
            cluster: self.redis_cluster,
            layout: Layout::new(&self.redis_namespace),
        })
    }
}

/// An instance id: 1 to 64 printable characters.
fn parse_instance_id(id: &str) -> Result<String, String> {
    if id.is_empty() || id.len() > 64 || id.bytes().any(|b| !b.is_ascii_graphic()) {
        Err("must be 1 to 64 printable characters".into())
    } else {
        Ok(id.to_string())
    }
}

/// The longest wait between two attempts at subscribing or at the first heartbeat.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Settings of the Redis matchmaker from the Redis, session and rules sections, the media mode
/// and how long events stay replayable; `None` in the embedded mode.
pub fn settings(
    redis: &RedisConfig,
    session: &SessionConfig,
    rules: &RulesConfig,
    media: MediaMode,
    history_ttl: Duration,
) -> Option<RedisSettings> {
    let urls = redis.urls()?;
    Some(RedisSettings {
        urls,
        cluster: redis.redis_cluster,
        layout: Layout::new(&redis.redis_namespace),
        // A per-process suffix: an instance restarted under the same configured id must not
        // inherit (and so never clean up) the users its previous run left behind.
        instance: match &redis.instance_id {
            Some(id) => format!("{id}-{}", random_id("", 4)),
            None => random_id("", 6),
        },
        requeue_peer_on_skip: session.requeue_peer_on_skip,
        media,
        rules: crate::matching::Rules::from_config(rules),
        call_timeout: redis.redis_call_timeout_ms,
        history_len: session.history_len,
        history_ttl,
        resume_grace: session.resume_grace_ms,
        pool_size: redis.redis_pool_size,
        batching: Batching {
            in_flight: redis.redis_calls_in_flight,
            max_ops: redis.redis_ops_per_call,
        },
    })
}

/// The matchmaker over `partitions` partitions. Refuses (`Internal`) when the deployment's
/// Redis records another number of partitions; when Redis does not answer yet, every
/// heartbeat checks it, the first one before this instance takes traffic.
pub async fn matchmaker(
    settings: RedisSettings,
    partitions: usize,
    metrics: Arc<Metrics>,
) -> Result<Arc<PartitionedMatchmaker>, MatchError> {
    let engine = PartitionedMatchmaker::new(settings, partitions, metrics)?;
    match engine.agree_on_partitions().await {
        Ok(()) => {}
        Err(MatchError::Unavailable(e)) => {
            tracing::warn!(error = %e, "cannot check the partitions in Redis yet");
        }
        Err(e) => return Err(e),
    }
    Ok(Arc::new(engine))
}

/// Starts the subscriber (on this instance's channel and the deployment's `broadcast`
/// channel), the heartbeat and the recovery loops in `background`; they end when `stop` flips
/// (or when the background is shut down).
pub fn spawn(
    background: &Background,
    gateway: Arc<Gateway>,
    redis: Arc<PartitionedMatchmaker>,
    settings: RedisSettings,
    heartbeat: Duration,
    stop: watch::Receiver<bool>,
) {
    let recovery = Arc::new(Recovery::default());
    gateway.set_subscribed(false);
    let instance = Arc::new(Instance {
        gateway,
        redis,
        period: heartbeat,
        known_epoch: tokio::sync::Mutex::new(String::new()),
    });
    background.spawn(subscriber(
        instance.clone(),
        settings,
        recovery.clone(),
        stop.clone(),
    ));
    background.spawn(ticks(instance.clone(), stop.clone()));
    background.spawn(catch_up(instance, recovery, stop));
}

/// Keeps this instance subscribed to its channel and the broadcast channel. The connection
/// manager re-subscribes after disconnections by itself; this loop only has to get the first
/// subscription in place, which may take a while when the gateway starts before Redis does.
async fn subscriber(
    instance: Arc<Instance>,
    settings: RedisSettings,
    recovery: Arc<Recovery>,
    mut stop: watch::Receiver<bool>,
) {
    let channel = settings.layout.channel(&settings.instance);
    let channels = [channel.as_str(), settings.layout.broadcast()];
    let mut delays = backoff::Delays::new(Duration::from_millis(100), RETRY_MAX);
    let manager = loop {
        let attempt = subscribe(
            &settings.urls[0],
            &channels,
            instance.gateway.registry.clone(),
            instance.gateway.metrics.clone(),
            recovery.clone(),
            {
                let gateway = instance.gateway.clone();
                move |kind: &str, value: &str| {
                    moderation::announced(&gateway.registry, &gateway.metrics, kind, value)
                }
            },
        );
        tokio::select! {
            result = attempt => match result {
                Ok(manager) => break manager,
                Err(e) => tracing::warn!(error = %e, "cannot subscribe yet; retrying"),
            },
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(delays.next_delay()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    };
    tracing::info!(%channel, "subscribed");
    // Take traffic only once this instance is on the liveness list: an instance that crashed
    // before its first heartbeat would otherwise leave users nobody ever cleans up.
    let mut delays = backoff::Delays::new(Duration::from_millis(50), RETRY_MAX);
    loop {
        match instance.tick().await {
            Ok(_) => break,
            Err(e) => tracing::warn!(error = %e, "first heartbeat failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delays.next_delay()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
    instance.gateway.set_subscribed(true);
    let _ = stop.wait_for(|s| *s).await;
    drop(manager);
}

/// One instance's view of the shared dataset, used by the heartbeat and recovery loops.
struct Instance {
    gateway: Arc<Gateway>,
    redis: Arc<PartitionedMatchmaker>,
    period: Duration,
    /// The dataset id this instance has seen; a different one means Redis lost everything.
    known_epoch: tokio::sync::Mutex<String>,
}

impl Instance {
    /// One heartbeat: liveness, a share of the clean-up, and the check that Redis still holds
    /// the state this instance's clients rely on. Returns false when that state is gone.
    async fn tick(&self) -> Result<bool, MatchError> {
        let mut known = self.known_epoch.lock().await;
        let tick = self.redis.tick(self.period, &known).await?;
        let intact = !tick.epoch_changed;
        if tick.epoch_changed {
            tracing::error!(
                "Redis lost its data (restarted without persistence?): every client must start over"
            );
            self.gateway.registry.close_all(close::STATE_LOST);
        } else if tick.rejoined {
            tracing::warn!(
                "this instance had been taken for dead: its clients reconnect to re-attach"
            );
            self.gateway.registry.close_all(close::RESYNC);
        }
        *known = tick.epoch;
        if tick.dead_instances > 0 {
            tracing::warn!(count = tick.dead_instances, "instances found dead");
        }
        self.gateway
            .metrics
            .cleanup(tick.cleaned_users + tick.expired);
        self.gateway.apply(Origin::Background, tick.outcome);
        Ok(intact)
    }

    /// Brings every local connection up to date from the logs after pub/sub lost messages.
    async fn catch_up(&self) {
        // If Redis came back empty, the clients are told so; there is nothing to catch up.
        match self.tick().await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(error = %e, "cannot check Redis before catching up"),
        }
        tracing::info!("pub/sub restored: catching connections up from the logs");
        for (user, handle) in self.gateway.registry.snapshot() {
            // A connection still attaching gets its replay from the attach itself.
            let Some(last) = handle.last_seq() else {
                continue;
            };
            match self.redis.since(&user, handle.id(), last).await {
                Ok(Some(frames)) => frames.into_iter().for_each(|f| handle.push(f)),
                // Replaced elsewhere while the notice to close was lost: close as replaced,
                // so that this (older) client does not come back and take over again.
                Err(MatchError::Replaced) => {
                    handle.close(close::REPLACED);
                }
                // The log no longer covers the gap, or Redis is not back yet: the client
                // resumes, which recovers whatever can be recovered.
                Ok(None) | Err(_) => {
                    handle.close(close::RESYNC);
                }
            }
        }
        // Bans announced meanwhile were missed too: whatever the bans in force name goes.
        match self.gateway.moderation.bans().await {
            Ok(bans) => {
                let banned = bans.iter().map(|b| (b.kind, b.value.as_str()));
                disconnect_banned(&self.gateway.registry, &self.gateway.metrics, banned);
            }
            Err(e) => tracing::warn!(error = %e, "cannot catch up with bans"),
        }
    }
}

async fn ticks(instance: Arc<Instance>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(instance.period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = instance.tick().await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

async fn catch_up(
    instance: Arc<Instance>,
    recovery: Arc<Recovery>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = recovery.restored.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        instance.catch_up().await;
    }
}
