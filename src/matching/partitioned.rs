//! The Redis matching state split into partitions (`--redis-partitions N`), so that a Redis
//! Cluster's masters add matching throughput: each partition is a complete
//! [`RedisMatchmaker`] whose keys share a hash tag of their own (see
//! [`Layout::partition`]), so one operation stays one atomic call on one slot, and the
//! partitions' slots spread over the masters.
//!
//! What goes where:
//! - **Users** are partitioned by a stable hash of their id ([`partition_of`]): a user's state,
//!   event log, conduct, recent partners and blocks live in its partition, and every operation
//!   on behalf of a user (client operations, timers, expiry, catching up) goes there. A user
//!   never changes partition while N stays the same. Users of different partitions never
//!   meet, so every pool is split N ways: positions, estimates and the chance of finding a
//!   peer are per partition, which costs small pools (a pool with a handful of waiting users
//!   matches less often). Blocks and recent partners need nothing global: the two users of a
//!   session, hence of a block, are always in the same partition.
//! - **Sessions** live in the partition of their members; the library marks the first
//!   character of each session id with the partition (see `new_id` in `prelude.lua`), so the
//!   media events and `moderator_end`, which name a session only, go straight to it. An id
//!   that names no partition goes to partition 0, which does not know it either.
//! - **Per pool** (`refresh_pool`) and **per instance** (the heartbeat `tick`) work runs on
//!   every partition; each partition tracks the instances and cleans up after dead ones on its
//!   own. **Administration** merges: `stats` and `overview` add the partitions up, `sessions`
//!   lists them all, the lease lives in partition 0.
//! - **Global** state stays where it was, under the deployment's own tag: bans and reports
//!   (moderation), the dev secret, the webhook outbox, and the record of N itself.
//!
//! Every partition publishes frames on the same per-instance channel; in Redis Cluster a
//! classic `PUBLISH` reaches subscribers on every node (over the cluster bus), so the
//! subscriber is unchanged.
//!
//! All instances of a deployment must agree on N, or they would look for one user in two
//! places: the first instance records N beside the global state, and an instance configured
//! otherwise refuses to start ([`PartitionedMatchmaker::agree_on_partitions`]; checked again
//! at every heartbeat, which records N anew after Redis lost its data). Changing N is a new
//! deployment for every user whose partition changes: their queue place or session is left
//! behind (it times out) and their blocks come back only through the ledger's restore.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::try_join_all;

use super::overview::{MinuteCounts, Overview, PoolOverview};
use super::redis::{RedisMatchmaker, RedisSettings, Tick};
use super::{
    Administration, Attached, ClientOperations, ConnId, MatchError, MediaEvents, MediaLeft,
    MediaReady, Outcome, RecentPeer, Resume, SessionInfo, Stats, Status, Timer, Timers, UserId,
};
use crate::attributes::Attributes;
use crate::bus::Frame;
use crate::metrics::Metrics;
use crate::protocol::{Media, Prefs, Relay};

/// The most partitions: a session id marks its partition with one URL-safe base64 character.
pub const MAX_PARTITIONS: usize = 64;

/// The alphabet of session ids, whose first character after `s_` names the partition.
const ID_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The partition of `user` among `count`: FNV-1a (64 bit) of the id, mod `count`. Fixed by
/// this definition rather than by a library's hasher, since every instance, whatever its
/// build, must place a user in the same partition.
pub fn partition_of(user: &str, count: usize) -> usize {
    let hash = user.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % count as u64) as usize
}

/// The partition a session id names (see the module docs); 0 for an id that names none.
pub fn session_partition(session: &str, count: usize) -> usize {
    session
        .strip_prefix("s_")
        .and_then(|id| id.bytes().next())
        .and_then(|c| ID_ALPHABET.iter().position(|&a| a == c))
        .filter(|&p| p < count)
        .unwrap_or(0)
}

/// A connection for the record of N, which is a plain key rather than library state.
#[derive(Clone)]
enum RecordConnection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Where N is recorded, and how to reach it.
struct Record {
    key: String,
    settings: RedisSettings,
    connection: tokio::sync::Mutex<Option<RecordConnection>>,
}

impl Record {
    async fn connect(&self) -> redis::RedisResult<RecordConnection> {
        let s = &self.settings;
        Ok(if s.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(s.urls.clone())
                .response_timeout(s.call_timeout)
                .build()?;
            RecordConnection::Cluster(client.get_async_connection().await?)
        } else {
            let client = redis::Client::open(s.urls[0].as_str())?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(s.call_timeout));
            RecordConnection::Single(
                redis::aio::ConnectionManager::new_with_config(client, config).await?,
            )
        })
    }

    /// Records `count` unless a count is recorded, and answers the one that was (`None`: this
    /// call recorded it). One `SET NX GET` (Redis 7), so two instances starting together
    /// cannot both record theirs.
    async fn record(&self, count: usize) -> redis::RedisResult<Option<String>> {
        let mut guard = self.connection.lock().await;
        let connection = match guard.as_ref() {
            Some(c) => c.clone(),
            None => guard.insert(self.connect().await?).clone(),
        };
        drop(guard);
        let mut set = redis::cmd("SET");
        set.arg(&self.key).arg(count).arg("NX").arg("GET");
        match connection {
            RecordConnection::Single(mut c) => set.query_async(&mut c).await,
            RecordConnection::Cluster(mut c) => set.query_async(&mut c).await,
        }
    }
}

/// N complete Redis matchmakers, one per partition, behind the one [`super::Engine`] the
/// gateway holds.
pub struct PartitionedMatchmaker {
    partitions: Vec<RedisMatchmaker>,
    record: Record,
}

impl PartitionedMatchmaker {
    /// `count` partitions of the deployment `settings` describe (its layout is the
    /// deployment's: each partition gets [`crate::redis_keys::Layout::partition`] of it).
    pub fn new(
        settings: RedisSettings,
        count: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, MatchError> {
        if !(1..=MAX_PARTITIONS).contains(&count) {
            return Err(MatchError::Internal(format!(
                "{count} partitions: 1 to {MAX_PARTITIONS} are possible"
            )));
        }
        let partitions = (0..count)
            .map(|index| {
                let mut partition = settings.clone();
                partition.layout = settings.layout.partition(index, count);
                RedisMatchmaker::new(partition, metrics.clone())
            })
            .collect::<Result<_, _>>()?;
        Ok(PartitionedMatchmaker {
            partitions,
            record: Record {
                key: settings.layout.partitions(),
                settings,
                connection: tokio::sync::Mutex::new(None),
            },
        })
    }

    /// The partition engines, in order (tests look into them).
    pub fn partitions(&self) -> &[RedisMatchmaker] {
        &self.partitions
    }

    fn user(&self, user: &UserId) -> &RedisMatchmaker {
        &self.partitions[partition_of(user, self.partitions.len())]
    }

    fn session(&self, session: &str) -> &RedisMatchmaker {
        &self.partitions[session_partition(session, self.partitions.len())]
    }

    /// Records this instance's N in the deployment's Redis if none is recorded, and fails
    /// with [`MatchError::Internal`] naming both when another N is: instances that disagree
    /// would look for one user in two partitions. `Unavailable` when Redis does not answer.
    pub async fn agree_on_partitions(&self) -> Result<(), MatchError> {
        let count = self.partitions.len();
        let recorded =
            tokio::time::timeout(self.record.settings.call_timeout, self.record.record(count))
                .await
                .map_err(|_| MatchError::Unavailable("Redis call timed out".into()))?;
        match recorded.map_err(|e| MatchError::Unavailable(e.to_string()))? {
            None => Ok(()),
            Some(theirs) if theirs == count.to_string() => Ok(()),
            Some(theirs) => Err(MatchError::Internal(format!(
                "this instance runs with --redis-partitions {count}, but the deployment in this \
                 Redis runs with {theirs} (recorded at {}): every instance of a deployment needs \
                 the same number; to change it, stop all instances and delete that key",
                self.record.key
            ))),
        }
    }

    /// The heartbeat on every partition (see [`RedisMatchmaker::tick`]), after checking that
    /// N still agrees. `known_epoch` and the answered epoch list the partitions' epochs,
    /// comma-separated: a partition that lost its data (its own master restarted empty) counts
    /// as Redis having lost it.
    pub async fn tick(&self, period: Duration, known_epoch: &str) -> Result<Tick, MatchError> {
        self.agree_on_partitions().await?;
        let known: Vec<&str> = known_epoch.split(',').collect();
        let ticks = try_join_all(
            self.partitions
                .iter()
                .enumerate()
                .map(|(i, p)| p.tick(period, known.get(i).copied().unwrap_or_default())),
        )
        .await?;
        let mut epochs = Vec::with_capacity(ticks.len());
        let mut all = Tick::default();
        let mut outcomes = Vec::with_capacity(ticks.len());
        for tick in ticks {
            epochs.push(tick.epoch);
            all.epoch_changed |= tick.epoch_changed;
            all.rejoined |= tick.rejoined;
            all.cleaned_users += tick.cleaned_users;
            all.expired += tick.expired;
            // Each partition declares the same dead instances.
            all.dead_instances = all.dead_instances.max(tick.dead_instances);
            outcomes.push(tick.outcome);
        }
        all.epoch = epochs.join(",");
        all.outcome = merge(outcomes);
        Ok(all)
    }

    /// See [`RedisMatchmaker::since`].
    pub async fn since(
        &self,
        user: &UserId,
        conn: ConnId,
        last_seq: u64,
    ) -> Result<Option<Vec<Frame>>, MatchError> {
        self.user(user).since(user, conn, last_seq).await
    }

    /// Runs `f` on every partition at once.
    async fn each<'a, T, F, Fut>(&'a self, f: F) -> Result<Vec<T>, MatchError>
    where
        F: Fn(&'a RedisMatchmaker) -> Fut,
        Fut: std::future::Future<Output = Result<T, MatchError>>,
    {
        try_join_all(self.partitions.iter().map(f)).await
    }
}

/// The outcomes of one step that ran on several partitions, as one.
fn merge(outcomes: Vec<Outcome>) -> Outcome {
    let mut all = Outcome::default();
    for o in outcomes {
        all.waits.extend(o.waits);
        all.started.extend(o.started);
        all.closed.extend(o.closed);
        all.changed_pools.extend(o.changed_pools);
        all.held |= o.held;
        all.pending.extend(o.pending);
        all.ended_sessions.extend(o.ended_sessions);
        all.timers.extend(o.timers);
    }
    all
}

/// The partitions' overviews as one: pools by name with their waiting users added up and the
/// estimate averaged over them, instances with their connections added up.
fn merge_overviews(overviews: Vec<Overview>) -> Overview {
    use std::collections::BTreeMap;
    let mut pools: BTreeMap<Arc<str>, (u64, u64, u64)> = BTreeMap::new();
    let mut instances: BTreeMap<String, u64> = BTreeMap::new();
    let (mut sessions, mut last, mut this) = (0, 0, 0);
    for o in overviews {
        for p in o.pools {
            // waiting, and the estimates weighted by the waiting users they cover.
            let entry = pools.entry(p.pool).or_default();
            entry.0 += p.waiting;
            if let Some(ms) = p.estimated_wait_ms {
                entry.1 += ms * p.waiting.max(1);
                entry.2 += p.waiting.max(1);
            }
        }
        for (instance, connections) in o.instances {
            *instances.entry(instance).or_default() += connections;
        }
        sessions += o.sessions;
        last += o.matches.last_minute;
        this += o.matches.this_minute;
    }
    Overview {
        pools: pools
            .into_iter()
            .map(|(pool, (waiting, weighted, weight))| PoolOverview {
                pool,
                waiting,
                estimated_wait_ms: (weight > 0).then(|| weighted / weight),
            })
            .collect(),
        sessions,
        matches: MinuteCounts::from_buckets(last, this, crate::ids::unix_ms()),
        instances: instances.into_iter().collect(),
    }
}

#[async_trait]
impl ClientOperations for PartitionedMatchmaker {
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        self.user(user).attach(user, conn, resume).await
    }

    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        self.user(user).detach(user, conn).await
    }

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        attributes: Arc<Attributes>,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError> {
        let partition = self.user(user);
        partition.enqueue(user, prefs, attributes, reference).await
    }

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        self.user(user).skip(user, reference).await
    }

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        self.user(user).end(user, reference).await
    }

    async fn status(&self, user: &UserId) -> Result<Status, MatchError> {
        self.user(user).status(user).await
    }

    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError> {
        self.user(user).block(user, session).await
    }

    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<RecentPeer, MatchError> {
        self.user(user).recent_peer(user, session).await
    }

    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        self.user(user).accept(user, match_id).await
    }

    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        self.user(user).decline(user, match_id).await
    }

    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError> {
        self.user(user).relay(user, message).await
    }
}

#[async_trait]
impl Timers for PartitionedMatchmaker {
    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        self.user(user).expire(user, conn).await
    }

    /// Every partition has its share of the pool's waiting users.
    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError> {
        self.each(|p| p.refresh_pool(pool)).await.map(|_| ())
    }

    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError> {
        self.user(user).wake(user, timer).await
    }
}

#[async_trait]
impl Administration for PartitionedMatchmaker {
    async fn stats(&self) -> Result<Stats, MatchError> {
        let all = self.each(|p| p.stats()).await?;
        Ok(all.into_iter().fold(Stats::default(), |sum, s| Stats {
            queued: sum.queued + s.queued,
            sessions: sum.sessions + s.sessions,
        }))
    }

    /// Leases are deployment-wide: partition 0 holds them all.
    async fn lease(&self, name: &str, ttl: Duration) -> Result<bool, MatchError> {
        self.partitions[0].lease(name, ttl).await
    }

    async fn restore_blocks(&self, blocker: &UserId, blocked: &[UserId]) -> Result<(), MatchError> {
        self.user(blocker).restore_blocks(blocker, blocked).await
    }

    async fn overview(&self) -> Result<Overview, MatchError> {
        Ok(merge_overviews(self.each(|p| p.overview()).await?))
    }

    async fn moderator_end(&self, session: &str) -> Result<Option<Outcome>, MatchError> {
        self.session(session).moderator_end(session).await
    }
}

#[async_trait]
impl MediaEvents for PartitionedMatchmaker {
    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<MediaReady, MatchError> {
        self.session(session).media_ready(session, media).await
    }

    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError> {
        self.session(session).media_failed(session).await
    }

    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<MediaLeft, MatchError> {
        let partition = self.session(session);
        partition.media_left(session, left, event_id, dedupe).await
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError> {
        Ok(self.each(|p| p.sessions()).await?.concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_takes_every_user_and_session() {
        for id in ["", "alice", "s_AAAA", "s_____", "x"] {
            assert_eq!(partition_of(id, 1), 0);
            assert_eq!(session_partition(id, 1), 0);
        }
    }

    #[test]
    fn users_spread_over_the_partitions() {
        let count = 3;
        let mut seen = [0usize; 3];
        for i in 0..3000 {
            let p = partition_of(&format!("user{i}"), count);
            seen[p] += 1;
        }
        // Not a statistical test: every partition gets a fair share of a thousand.
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        // Fixed by definition: the same on every instance and in every build.
        assert_eq!(
            partition_of("alice", 3),
            (0x508b_2abb_65a0_3907_u64 % 3) as usize
        );
        assert_eq!(
            partition_of("alice", 64),
            (0x508b_2abb_65a0_3907_u64 % 64) as usize
        );
    }

    #[test]
    fn a_session_id_names_its_partition_or_partition_0() {
        for (p, &mark) in ID_ALPHABET.iter().enumerate() {
            let id = format!("s_{}BCDEFGHIJKLMNOPQRSTUV", mark as char);
            assert_eq!(session_partition(&id, MAX_PARTITIONS), p);
            assert_eq!(session_partition(&id, p + 1), p);
            // An id marked beyond the partitions there are, or no session id at all.
            assert_eq!(session_partition(&id, p.max(1)), 0);
        }
        for bad in ["", "s_", "p_abc", "room-1", "s_!abc", "s_é"] {
            assert_eq!(session_partition(bad, 8), 0, "{bad}");
        }
    }
}
