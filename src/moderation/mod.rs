//! Moderation: reports users make about their peers, and bans of users, devices and IP
//! addresses.
//!
//! [`Moderation`] is a narrow engine trait like the matching ones ([`Engine`](crate::matching::Engine)) and
//! [`Bus`](crate::bus::Bus): the gateway (reports) and the HTTP layer (the handshake check and
//! the admin API) call it and never know whether the state lives in this process ([`memory`],
//! the embedded default) or in Redis, shared by every instance ([`redis`], the scale-out mode).
//!
//! A ban is checked once per WebSocket handshake, one backend call for all of the client's
//! names (user id, device id, address). A new ban also ends the banned identity's live
//! connections: the memory backend scans this instance's registry at once; the Redis backend
//! broadcasts the ban on the channel every instance subscribes to, and each instance scans its
//! own ([`disconnect_banned`]).
//!
//! Reports are kept (a bounded number) for people to review, and each counts its reporter
//! towards an automatic ban of the reported user: enough distinct reporters within the window
//! ban them ([`ReportPolicy`]). So that one account cannot flood the review store and push
//! other people's reports out of it, a user files at most one report per session (a second
//! one replaces the first) and at most [`ReportPolicy::per_hour`] reports an hour, counted by
//! user id in the backend, so across connections and instances.
//!
//! [`from_config`] picks the backend from this module's section ([`ModerationConfig`]) and, in
//! the scale-out mode, the shared Redis as a [`Deployment`].

pub mod memory;
pub mod redis;
pub mod review;

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::address::{ban_text, parse_ban_text, AddressKeys};
use crate::flags::{count, secs};
use crate::ids::unix_ms;
use crate::ids::UserId;
use crate::matching::MatchError;
use crate::metrics::Metrics;
use crate::protocol::{close, ReportReason};
use crate::redis_keys::Deployment;
use crate::registry::Registry;
use review::{ReportId, ReportPage, ReportQuery, ReviewState, StoredReport};

/// What a ban names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BanKind {
    /// A user id (the JWT `sub`).
    User,
    /// A device id (the JWT claim `device_id`).
    Device,
    /// A client IP address.
    Ip,
}

impl BanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BanKind::User => "user",
            BanKind::Device => "device",
            BanKind::Ip => "ip",
        }
    }

    pub fn parse(s: &str) -> Option<BanKind> {
        [BanKind::User, BanKind::Device, BanKind::Ip]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    /// The canonical form of a value of this kind, or why it cannot be one: ids as the tokens
    /// carry them; for addresses the network the ban covers, as [`ban_text`] writes it (an
    /// IPv4-mapped IPv6 address is the IPv4 address, an IPv6 address stands for its prefix, a
    /// range loses its host bits), so that a ban matches however the address was written.
    pub fn canonical(self, value: &str, addresses: &AddressKeys) -> Result<String, String> {
        match self {
            BanKind::Ip => addresses.ban_network(value).map(ban_text),
            BanKind::User | BanKind::Device if crate::auth::is_valid_id(value) => {
                Ok(value.to_string())
            }
            BanKind::User | BanKind::Device => Err(format!(
                "a {} id is 1 to {} bytes without control characters",
                self.as_str(),
                crate::auth::MAX_ID_BYTES
            )),
        }
    }
}

/// A ban: who, why, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    pub kind: BanKind,
    /// The user id, device id, or IP network in canonical text ([`BanKind::canonical`]).
    pub value: String,
    pub reason: Option<String>,
    /// When the ban ends (unix ms).
    pub until_ms: u64,
}

impl Ban {
    /// A ban of `kind`/`value` for `ttl` from now.
    pub fn new(kind: BanKind, value: String, reason: Option<String>, ttl: Duration) -> Ban {
        Ban {
            kind,
            value,
            reason,
            until_ms: unix_ms() + ttl.as_millis() as u64,
        }
    }

    /// What a refused handshake is told: the reason, or else the kind of ban.
    pub fn refusal_reason(&self) -> &str {
        self.reason.as_deref().unwrap_or(self.kind.as_str())
    }

    fn live(&self, now_ms: u64) -> bool {
        self.until_ms > now_ms
    }
}

/// Who is connecting: every name a ban can give.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub user: &'a str,
    pub device: Option<&'a str>,
    /// The networks covering the client's address that an address ban may name
    /// ([`AddressKeys::covering`]).
    pub networks: &'a [IpNet],
}

impl Identity<'_> {
    /// The names a ban would use, user first.
    fn names(&self) -> Vec<(BanKind, String)> {
        let mut names = vec![(BanKind::User, self.user.to_string())];
        if let Some(device) = self.device {
            names.push((BanKind::Device, device.to_string()));
        }
        names.extend(
            self.networks
                .iter()
                .map(|network| (BanKind::Ip, ban_text(*network))),
        );
        names
    }
}

/// One report, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub session_id: Arc<str>,
    pub reporter: UserId,
    pub reported: UserId,
    pub reason: ReportReason,
    pub details: Option<String>,
    /// When it was made (unix ms).
    pub at_ms: u64,
}

/// When reports ban a user by themselves.
#[derive(Debug, Clone, Copy)]
pub struct ReportPolicy {
    /// Distinct reporters within the window that ban; 0: reports never ban.
    pub threshold: u32,
    pub window: Duration,
    pub ban_ttl: Duration,
    /// Reports kept for review (the oldest go first).
    pub kept: usize,
    /// Reports one user may file per hour (a window that starts with its first report);
    /// replacing a report does not count.
    pub per_hour: u32,
}

/// The moderation section of the configuration: the admin API's token, and how reports turn
/// into bans.
#[derive(Debug, Clone, clap::Args)]
pub struct ModerationConfig {
    /// Bearer token of the admin API under `/v1/admin/` (at least 32 bytes). Without it the
    /// admin API is off.
    #[arg(long, env = "MATCHGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Distinct reporters within the report window that ban a user automatically (0: never).
    #[arg(long, env = "MATCHGATE_REPORT_BAN_THRESHOLD", default_value_t = 3)]
    pub report_ban_threshold: u32,

    /// The window for counting distinct reporters, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_REPORT_WINDOW_S",
        default_value = "86400",
        value_parser = secs(1..)
    )]
    pub report_window_s: Duration,

    /// How long an automatic ban lasts, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_REPORT_BAN_TTL_S",
        default_value = "86400",
        value_parser = secs(1..)
    )]
    pub report_ban_ttl_s: Duration,

    /// Reports kept (in memory, or in the Redis stream, trimmed to about this many).
    #[arg(
        long,
        env = "MATCHGATE_REPORTS_KEPT",
        default_value = "100000",
        value_parser = count(..)
    )]
    pub reports_kept: usize,

    /// Reports one user may file per hour (a window that starts with the first report), across
    /// connections and instances; beyond it `report` answers `rate_limited`.
    #[arg(
        long,
        env = "MATCHGATE_REPORTS_PER_HOUR",
        default_value = "20",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub reports_per_hour: u32,
}

/// The window of [`ReportPolicy::per_hour`], in ms.
pub const REPORT_RATE_WINDOW_MS: u64 = 3_600_000;

/// Sessions per reporter whose report can still be replaced (within the report window). A
/// user can report only its 16 most recent sessions (see `matching`): between reporting a
/// session and that session leaving the 16, at most 30 other sessions can be reported (the
/// 15 that were recent with it and up to 15 newer ones), so remembering the last 32 reported
/// sessions never misses a repeat.
pub const REPORTED_SESSIONS_KEPT: usize = 32;

/// The reason automatic bans carry.
pub const REPORTS_BAN_REASON: &str = "reports";

impl ReportPolicy {
    pub fn from_config(config: &ModerationConfig) -> Self {
        ReportPolicy {
            threshold: config.report_ban_threshold,
            window: config.report_window_s,
            ban_ttl: config.report_ban_ttl_s,
            kept: config.reports_kept,
            per_hour: config.reports_per_hour,
        }
    }

    /// The automatic ban `report` brings about. `distinct` is how many distinct users
    /// reported the same user within the window, this one included, or `None` when this
    /// reporter had already counted; `banned` whether the user is banned already (a ban in
    /// force, maybe a longer one an admin gave, is left alone).
    fn ban_due(&self, report: &Report, distinct: Option<u64>, banned: bool) -> Option<Ban> {
        let reached = distinct.is_some_and(|n| self.threshold > 0 && n >= self.threshold.into());
        (reached && !banned).then(|| {
            Ban::new(
                BanKind::User,
                report.reported.to_string(),
                Some(REPORTS_BAN_REASON.into()),
                self.ban_ttl,
            )
        })
    }
}

/// Errors of the moderation backends.
#[derive(Debug, thiserror::Error)]
pub enum ModerationError {
    #[error("moderation backend unavailable: {0}")]
    Unavailable(String),
    #[error("moderation backend returned bad data: {0}")]
    Corrupt(String),
    /// The reporter filed [`ReportPolicy::per_hour`] reports within the hour.
    #[error("too many reports")]
    TooManyReports { retry_after_ms: u64 },
}

/// Reports travel through the gateway's error mapping, like every other client action.
impl From<ModerationError> for MatchError {
    fn from(e: ModerationError) -> Self {
        match e {
            ModerationError::Unavailable(m) => MatchError::Unavailable(m),
            ModerationError::Corrupt(m) => MatchError::Internal(m),
            ModerationError::TooManyReports { retry_after_ms } => {
                MatchError::TooManyReports { retry_after_ms }
            }
        }
    }
}

/// Reports and bans behind one narrow interface. See the module docs.
#[async_trait]
pub trait Moderation: Send + Sync + 'static {
    /// The ban that refuses `who`, if any (one backend call).
    async fn ban_of(&self, who: &Identity<'_>) -> Result<Option<Ban>, ModerationError>;

    /// Bans (replacing a ban of the same kind and value) and closes the banned identity's
    /// live connections on every instance.
    async fn ban(&self, ban: &Ban) -> Result<(), ModerationError>;

    /// Lifts a ban; false when there was none in force.
    async fn unban(&self, kind: BanKind, value: &str) -> Result<bool, ModerationError>;

    /// The bans in force, the soonest to end first.
    async fn bans(&self) -> Result<Vec<Ban>, ModerationError>;

    /// Stores a report and counts its reporter towards an automatic ban of the reported user
    /// (a reporter counts once per reported user and window); returns the ban it brought
    /// about, already in force. A report about a session its reporter already reported within
    /// the window replaces the earlier one (and becomes the newest); any other report beyond
    /// the reporter's hourly limit is refused with [`ModerationError::TooManyReports`].
    async fn report(&self, report: Report) -> Result<ReportFiled, ModerationError>;

    /// The stored reports `query` selects, newest first (see [`review`]).
    async fn reports(&self, query: &ReportQuery) -> Result<ReportPage, ModerationError>;

    /// Records a review decision on a stored report and returns the report as it now stands;
    /// `None` when there is no such report (never stored, replaced, or trimmed). The same
    /// decision again changes nothing; a different one replaces it.
    async fn review(
        &self,
        id: ReportId,
        state: ReviewState,
    ) -> Result<Option<StoredReport>, ModerationError>;
}

/// What storing a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiled {
    /// The id it is stored under.
    pub id: ReportId,
    /// The automatic ban it brought about, already in force.
    pub ban: Option<Ban>,
}

/// The backend the configuration asks for: Redis in the scale-out mode (`redis`, the
/// deployment's), memory otherwise. `registry` and `metrics` are this instance's (the memory
/// backend closes banned connections in it directly).
pub fn from_config(
    config: &ModerationConfig,
    redis: Option<Deployment>,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
) -> Arc<dyn Moderation> {
    let policy = ReportPolicy::from_config(config);
    match redis {
        Some(deployment) => Arc::new(redis::RedisModeration::new(deployment, policy)),
        None => Arc::new(memory::MemoryModeration::new(
            registry.clone(),
            metrics.clone(),
            policy,
        )),
    }
}

/// Acts on a ban another instance announced (kind and value as the notice spells them): the
/// connections here it names close. An unknown kind (a newer instance's) is ignored.
pub fn announced(registry: &Registry, metrics: &Metrics, kind: &str, value: &str) {
    if let Some(kind) = BanKind::parse(kind) {
        disconnect_banned(registry, metrics, [(kind, value)]);
    }
}

/// Closes this instance's connections that any of `banned` (kinds and values) names, with
/// 4007. One scan of the registry, however many bans; each connection's address is looked up
/// once per prefix length among the banned networks.
pub fn disconnect_banned<'a>(
    registry: &Registry,
    metrics: &Metrics,
    banned: impl IntoIterator<Item = (BanKind, &'a str)>,
) {
    let mut users = HashSet::new();
    let mut devices = HashSet::new();
    let mut networks = HashSet::new();
    for (kind, value) in banned {
        match kind {
            BanKind::User => {
                users.insert(value);
            }
            BanKind::Device => {
                devices.insert(value);
            }
            BanKind::Ip => networks.extend(parse_ban_text(value)),
        }
    }
    let lengths: BTreeSet<u8> = networks.iter().map(IpNet::prefix_len).collect();
    let banned_address = |ip: IpAddr| {
        lengths.iter().any(|&len| {
            IpNet::new(ip, len).is_ok_and(|network| networks.contains(&network.trunc()))
        })
    };
    let closed = registry.close_where(
        |user, h| {
            users.contains(user)
                || h.device().is_some_and(|d| devices.contains(d))
                || banned_address(h.ip())
        },
        close::BANNED,
    );
    if closed > 0 {
        metrics.ban_disconnects(closed as u64);
        tracing::info!(
            connections = closed,
            "closed the connections of banned clients"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_and_addresses_canonical() {
        let keys = AddressKeys::new(64);
        let ip = |value| BanKind::Ip.canonical(value, &keys);
        assert_eq!(ip("::ffff:10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(ip("2001:DB8:0:0::1").unwrap(), "2001:db8::/64");
        assert_eq!(ip("2001:db8::/48").unwrap(), "2001:db8::/48");
        assert_eq!(ip("10.1.2.3/16").unwrap(), "10.1.0.0/16");
        assert!(ip("10.0.0.256").is_err());
        assert!(ip("0.0.0.0/0").is_err());
        assert!(BanKind::User.canonical("", &keys).is_err());
        assert!(BanKind::Device.canonical("a\nb", &keys).is_err());
        assert_eq!(
            BanKind::Device.canonical("phone-1", &keys).unwrap(),
            "phone-1"
        );
        assert_eq!(BanKind::parse("device"), Some(BanKind::Device));
        assert_eq!(BanKind::parse("Device"), None);
    }

    #[test]
    fn banned_networks_close_the_connections_inside_them() {
        use crate::ids::ConnId;
        use crate::registry::{ConnectionHandle, Next};
        use futures_util::FutureExt;
        let registry = Registry::default();
        let mut outboxes = Vec::new();
        for (i, ip) in ["10.1.2.3", "10.2.0.1", "2001:db8:1::5", "2001:db8:2::5"]
            .into_iter()
            .enumerate()
        {
            let (handle, outbox) =
                ConnectionHandle::new(ConnId(i as u64), 8, ip.parse().unwrap(), None);
            registry.register(format!("u{i}").into(), handle);
            outboxes.push(outbox);
        }
        let metrics = Metrics::new();
        disconnect_banned(
            &registry,
            &metrics,
            [
                (BanKind::Ip, "10.1.0.0/16"),
                (BanKind::Ip, "2001:db8:1::/48"),
            ],
        );
        let closed: Vec<bool> = outboxes
            .iter()
            .map(|outbox| {
                matches!(
                    outbox.next().now_or_never(),
                    Some(Next::Close(close::BANNED))
                )
            })
            .collect();
        assert_eq!(closed, [true, false, true, false]);
    }

    #[test]
    fn reports_ban_at_the_threshold_of_distinct_reporters() {
        let policy = ReportPolicy {
            threshold: 3,
            window: Duration::from_secs(60),
            ban_ttl: Duration::from_secs(60),
            kept: 10,
            per_hour: 10,
        };
        let report = Report {
            session_id: "s".into(),
            reporter: "r".into(),
            reported: "bad".into(),
            reason: ReportReason::Spam,
            details: None,
            at_ms: 0,
        };
        assert!(policy.ban_due(&report, Some(2), false).is_none());
        let ban = policy.ban_due(&report, Some(3), false).unwrap();
        assert_eq!((ban.kind, ban.value.as_str()), (BanKind::User, "bad"));
        assert_eq!(ban.refusal_reason(), REPORTS_BAN_REASON);
        assert!(policy.ban_due(&report, None, false).is_none(), "a repeat");
        assert!(policy.ban_due(&report, Some(4), true).is_none(), "banned");
        let never = ReportPolicy {
            threshold: 0,
            ..policy
        };
        assert!(never.ban_due(&report, Some(100), false).is_none());
    }
}
