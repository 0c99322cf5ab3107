//! The moderation backend of the scale-out mode: bans and reports in the Redis (or Redis
//! Cluster) the instances share, so a ban made through any instance holds on all of them.
//!
//! Keys, all under the deployment's hash tag `{ns}`, named by [`Layout`] in
//! [`crate::redis_keys`]:
//! - `{ns}:ban:<kind>:<value>`: a ban (its JSON), expiring with it (`PX`);
//! - `{ns}:bans`: a sorted set of `<kind>:<value>` by end time, for listing (what ran out is
//!   pruned whenever a ban is made or bans are listed);
//! - `{ns}:reporters:<user>`: who reported a user, by time, trimmed to the report window;
//! - `{ns}:reports`: the report stream, trimmed (`MAXLEN ~`) to `--reports-kept`; a report
//!   that replaces an earlier one (same reporter and session) deletes that entry (`XDEL`);
//! - `{ns}:report_reviews`: review decisions by stream id (`<state> <ms>`); decisions on
//!   entries the stream dropped go in a sweep once there are twice `--reports-kept` of them;
//! - `{ns}:filed:<user>`: how many reports a user filed in the current hour, expiring with it;
//! - `{ns}:filed_sessions:<user>`: the sessions a user reported lately, with their stream
//!   entries, newest first, trimmed and expiring with the report window.
//!
//! Every operation is one call of the script `redis.lua`; a new ban is published in the same
//! call on the channel every instance subscribes to (see [`crate::bus::redis`]; the notice is a [`Notice::Ban`]), where each
//! instance closes the banned identity's connections it holds. The connection to Redis is
//! opened on first use (the gateway may start before Redis) and reconnects by itself.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisResult, Script, ScriptInvocation};
use tokio::sync::OnceCell;

use super::review::{
    ReportId, ReportPage, ReportQuery, Review, ReviewState, StoredReport, SCAN_BUDGET,
};
use super::{
    Ban, BanKind, Identity, Moderation, ModerationError, Report, ReportFiled, ReportPolicy,
    REPORTED_SESSIONS_KEPT, REPORT_RATE_WINDOW_MS,
};
use crate::ids::unix_ms;
use crate::protocol::ReportReason;
use crate::redis_keys::{ban_member, Deployment, Layout, Notice};

/// How long one call may take before it counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisModeration {
    urls: Vec<String>,
    cluster: bool,
    layout: Layout,
    policy: ReportPolicy,
    script: Script,
    connection: OnceCell<Connection>,
}

/// A multiplexed connection, cloned for each call.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn invoke<T: FromRedisValue>(mut self, call: &ScriptInvocation<'_>) -> RedisResult<T> {
        match &mut self {
            Connection::Single(c) => call.invoke_async(c).await,
            Connection::Cluster(c) => call.invoke_async(c).await,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> ModerationError {
    ModerationError::Unavailable(e.to_string())
}

impl RedisModeration {
    /// The backend for the scale-out mode, in the deployment's Redis.
    pub fn new(redis: Deployment, policy: ReportPolicy) -> Self {
        RedisModeration {
            urls: redis.urls,
            cluster: redis.cluster,
            layout: redis.layout,
            policy,
            script: Script::new(include_str!("redis.lua")),
            connection: OnceCell::new(),
        }
    }

    async fn connect(&self) -> RedisResult<Connection> {
        if self.cluster {
            let client = redis::cluster::ClusterClient::new(self.urls.clone())?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.urls[0].as_str())?;
            Ok(Connection::Single(ConnectionManager::new(client).await?))
        }
    }

    /// Runs one call of the script, connecting first if need be. A call that finds the
    /// connection dropped (Redis restarted, say) is tried once more: the connection has
    /// reconnected meanwhile, and the first handshake after a blip should not fail for it.
    async fn call<T: FromRedisValue>(
        &self,
        call: ScriptInvocation<'_>,
    ) -> Result<T, ModerationError> {
        let run = async {
            let connection = self
                .connection
                .get_or_try_init(|| self.connect())
                .await
                .map_err(unavailable)?;
            match connection.clone().invoke(&call).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => {
                    connection.clone().invoke(&call).await
                }
                other => other,
            }
            .map_err(unavailable)
        };
        tokio::time::timeout(CALL_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(unavailable("Redis call timed out")))
    }

    fn ban_key(&self, kind: BanKind, value: &str) -> String {
        self.layout.ban(kind.as_str(), value)
    }

    fn listing_key(&self) -> String {
        self.layout.bans()
    }

    fn stream_key(&self) -> String {
        self.layout.reports()
    }

    fn reviews_key(&self) -> String {
        self.layout.report_reviews()
    }
}

/// A stream entry as the script returns it: id, field-value pairs, review decision ("" or
/// `<state> <ms>`).
type Entry = (String, Vec<String>, String);

/// Reads a stream entry back into a stored report.
fn stored((id, fields, decision): Entry) -> Result<StoredReport, ModerationError> {
    let corrupt = |what: &str| ModerationError::Corrupt(format!("report {id}: {what}"));
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|pair| pair[0] == name)
            .and_then(|pair| pair.get(1))
            .map(String::as_str)
    };
    let text = |name: &str| field(name).ok_or_else(|| corrupt(name));
    let reason = text("reason")?;
    let reason = ReportReason::ALL
        .into_iter()
        .find(|r| r.as_str() == reason)
        .ok_or_else(|| corrupt("reason"))?;
    let review = match decision.split_once(' ') {
        None => None,
        Some((state, ms)) => Some(Review {
            state: ReviewState::parse(state).ok_or_else(|| corrupt("review"))?,
            at_ms: ms.parse().map_err(|_| corrupt("review"))?,
        }),
    };
    Ok(StoredReport {
        id: id.parse().map_err(|_| corrupt("id"))?,
        report: Report {
            session_id: text("session_id")?.into(),
            reporter: text("reporter")?.into(),
            reported: text("reported")?.into(),
            reason,
            details: field("details").filter(|d| !d.is_empty()).map(Into::into),
            at_ms: text("at_ms")?.parse().map_err(|_| corrupt("at_ms"))?,
        },
        review,
    })
}

/// A ban's entry in the listing, and the tail of its key.
fn member(kind: BanKind, value: &str) -> String {
    ban_member(kind.as_str(), value)
}

fn decode(json: &str) -> Result<Ban, ModerationError> {
    serde_json::from_str(json).map_err(|e| ModerationError::Corrupt(format!("a ban: {e}")))
}

#[async_trait]
impl Moderation for RedisModeration {
    async fn ban_of(&self, who: &Identity<'_>) -> Result<Option<Ban>, ModerationError> {
        let mut call = self.script.prepare_invoke();
        for (kind, value) in who.names() {
            call.key(self.ban_key(kind, &value));
        }
        call.arg("check");
        let found: Vec<Option<String>> = self.call(call).await?;
        // The user's own ban first, as `names` lists them.
        found
            .into_iter()
            .flatten()
            .next()
            .map(|json| decode(&json))
            .transpose()
    }

    async fn ban(&self, ban: &Ban) -> Result<(), ModerationError> {
        let json = serde_json::to_string(ban).expect("a ban serialises");
        let ttl_ms = ban.until_ms.saturating_sub(unix_ms()).max(1);
        let mut call = self.script.prepare_invoke();
        call.key(self.ban_key(ban.kind, &ban.value))
            .key(self.listing_key())
            .arg("ban")
            .arg(member(ban.kind, &ban.value))
            .arg(json)
            .arg(ban.until_ms)
            .arg(ttl_ms)
            .arg(self.layout.broadcast())
            .arg(
                Notice::Ban {
                    kind: ban.kind.as_str(),
                    value: &ban.value,
                }
                .encode(),
            )
            .arg(unix_ms());
        self.call::<i64>(call).await.map(drop)
    }

    async fn unban(&self, kind: BanKind, value: &str) -> Result<bool, ModerationError> {
        let mut call = self.script.prepare_invoke();
        call.key(self.ban_key(kind, value))
            .key(self.listing_key())
            .arg("unban")
            .arg(member(kind, value));
        Ok(self.call::<i64>(call).await? > 0)
    }

    async fn bans(&self) -> Result<Vec<Ban>, ModerationError> {
        let mut call = self.script.prepare_invoke();
        call.key(self.listing_key())
            .arg("list")
            .arg(unix_ms())
            .arg(self.layout.ban_prefix());
        let found: Vec<String> = self.call(call).await?;
        found.iter().map(|json| decode(json)).collect()
    }

    async fn report(&self, report: Report) -> Result<ReportFiled, ModerationError> {
        let mut call = self.script.prepare_invoke();
        call.key(self.layout.reporters(&report.reported))
            .key(self.layout.reports())
            .key(self.ban_key(BanKind::User, &report.reported))
            .key(self.layout.filed(&report.reporter))
            .key(self.layout.filed_sessions(&report.reporter))
            .arg("report")
            .arg(report.at_ms)
            .arg(self.policy.window.as_millis() as u64)
            .arg(self.policy.kept)
            .arg(&*report.session_id)
            .arg(&*report.reporter)
            .arg(&*report.reported)
            .arg(report.reason.as_str())
            .arg(report.details.as_deref().unwrap_or_default())
            .arg(self.policy.per_hour)
            .arg(REPORT_RATE_WINDOW_MS)
            .arg(REPORTED_SESSIONS_KEPT);
        let (distinct, banned, retry_after_ms, id): (u64, bool, u64, String) =
            self.call(call).await?;
        if retry_after_ms > 0 {
            return Err(ModerationError::TooManyReports { retry_after_ms });
        }
        // Two reports racing past the threshold may both ban: the second only renews it.
        let due = self
            .policy
            .ban_due(&report, (distinct > 0).then_some(distinct), banned);
        if let Some(ban) = &due {
            self.ban(ban).await?;
        }
        let id = id
            .parse()
            .map_err(|e| ModerationError::Corrupt(format!("a report id: {e}")))?;
        Ok(ReportFiled { id, ban: due })
    }

    async fn reports(&self, query: &ReportQuery) -> Result<ReportPage, ModerationError> {
        let upper = query
            .upper()
            .map_or_else(|| "+".to_string(), |id| format!("({id}"));
        let mut call = self.script.prepare_invoke();
        call.key(self.stream_key())
            .key(self.reviews_key())
            .arg("reports")
            .arg(upper)
            .arg(query.lower().to_string())
            .arg(SCAN_BUDGET);
        let (exhausted, walked): (bool, Vec<Entry>) = self.call(call).await?;
        let walked = walked
            .into_iter()
            .map(stored)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ReportPage::from_walk(query, walked, exhausted))
    }

    async fn review(
        &self,
        id: ReportId,
        state: ReviewState,
    ) -> Result<Option<StoredReport>, ModerationError> {
        let mut call = self.script.prepare_invoke();
        call.key(self.stream_key())
            .key(self.reviews_key())
            .arg("review")
            .arg(id.to_string())
            .arg(state.as_str())
            .arg(unix_ms())
            .arg(self.policy.kept);
        let entry: Option<Entry> = self.call(call).await?;
        entry.map(stored).transpose()
    }
}
