//! The session ledger: an optional PostgreSQL record of who met whom, when and how it ended,
//! and of the blocks, reports and bans, for operators to answer questions after the fact. On
//! when `--database-url` is set.
//!
//! The database is never on the hot path. Whatever happens is put on a bounded in-process queue
//! ([`Ledger::record`] never waits); one writer task takes what has gathered (up to a batch)
//! and writes it in one transaction, one multi-row statement per run of records of one kind,
//! retrying with backoff ([`crate::backoff`]) while the database is down or slow. Every write
//! is idempotent (rows are keyed by ids the records carry), so a batch retried after a commit
//! whose answer was lost changes nothing. What does not fit in the queue is dropped, logged and
//! counted (`matchgate_ledger_dropped_total`), never silently.
//!
//! A session is one row, inserted when it goes live and completed (upserted) when it ends: a
//! crash of an embedded gateway, or an end record lost to a full queue, still leaves the
//! meeting on record (with no end) rather than nothing, and the two writes commute, since in
//! Redis mode the start and the end of one session may be seen by two instances (each outcome
//! is seen by the one instance that ran the operation, so each record is written once).
//!
//! At start-up the ledger applies its migrations ([`schema`]) and loads the blocks and bans it
//! holds back into the fast path (the matchmaker and the moderation backend, [`restore`]), so
//! they survive a Redis flush or a restart of the embedded mode; the instance is not ready
//! (`/readyz`) until that is done. Writes queued meanwhile wait for it.

mod restore;
mod schema;
mod write;

pub use restore::BlockScope;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use crate::backoff::Delays;
use crate::flags::ConfigError;
use crate::ids::{random_id, unix_ms};
use crate::matching::{Administration, MatchError, SessionClosed, SessionStarted, UserId};
use crate::metrics::{BanSource, LedgerMetrics};
use crate::moderation::{Ban, BanKind, Moderation, ModerationError, Report};

/// The ledger's settings (flattened into [`crate::Config`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LedgerConfig {
    /// PostgreSQL connection string of the session ledger (a URL like
    /// `postgres://matchgate:secret@db:5432/matchgate`, or `key=value` pairs). Without it
    /// nothing is recorded. The connection is not encrypted: use `sslmode=disable` or `prefer`
    /// (a private network, or a local TLS proxy).
    #[arg(
        long,
        env = "MATCHGATE_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub database_url: Option<String>,

    /// Ledger records that may wait for the database (while it is slow or down); beyond it new
    /// records are dropped, logged and counted in `matchgate_ledger_dropped_total`.
    #[arg(
        long,
        env = "MATCHGATE_DATABASE_QUEUE",
        default_value = "10000",
        value_parser = crate::flags::count(1..=1_000_000)
    )]
    pub database_queue: usize,
}

impl LedgerConfig {
    /// The URL is checked here rather than by clap, whose error would print it (and its
    /// password).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database_url {
            postgres_config(url).map_err(|reason| ConfigError {
                flags: vec!["database-url"],
                reason,
            })?;
        }
        Ok(())
    }
}

/// The driver's settings for `url`, or what is wrong with it (without the URL, which may
/// carry a password).
fn postgres_config(url: &str) -> Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("MATCHGATE_DATABASE_URL is invalid: {e}"))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(
            "MATCHGATE_DATABASE_URL asks for sslmode=require, but the ledger connects without \
             TLS: use sslmode=disable or prefer (a private network or a local TLS proxy)"
                .into(),
        );
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("matchgate");
    }
    Ok(config)
}

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one batch may take before it counts as failed and is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the start-up (migrations, loading the blocks and bans) may take before it is
/// tried again.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections per instance: the writer, and the start-up or `migrate`.
const POOL_SIZE: usize = 2;
/// Records written per transaction at most.
const BATCH_MAX: usize = 500;
/// A batch the database refuses (not an outage: bad data, a schema that does not fit) is
/// tried this many times, then dropped and counted, so that it cannot hold up the queue.
const REFUSALS_BEFORE_DROP: u32 = 3;

/// Errors of the ledger's database work.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database call timed out")]
    Timeout,
    #[error("restoring blocks: {0}")]
    Matching(#[from] MatchError),
    #[error("restoring bans: {0}")]
    Moderation(#[from] ModerationError),
}

impl LedgerError {
    /// Whether trying again later may succeed without anybody changing anything: the
    /// database (or a backend) is down, restarting, overloaded, or a transaction lost a race.
    fn transient(&self) -> bool {
        match self {
            LedgerError::Database(e) => e.code().is_none_or(|code| {
                // Connection exceptions, serialisation failures, insufficient resources,
                // operator intervention (e.g. a shutdown), system errors.
                ["08", "40", "53", "57", "58"]
                    .iter()
                    .any(|class| code.code().starts_with(class))
            }),
            _ => true,
        }
    }
}

/// What the ledger writes.
#[derive(Debug, Clone)]
pub enum Record {
    Started(SessionStarted),
    Closed(SessionClosed),
    Block {
        blocker: UserId,
        blocked: UserId,
        session_id: Arc<str>,
        at_ms: u64,
    },
    Report {
        /// Made up when queued, so that a retried batch writes it once.
        report_id: String,
        report: Report,
    },
    Ban {
        /// Made up when queued, like a report's.
        ban_id: String,
        ban: Ban,
        source: BanSource,
        at_ms: u64,
    },
    Unban {
        kind: BanKind,
        value: String,
        at_ms: u64,
    },
}

impl Record {
    /// Records of one kind are written by one statement.
    fn kind(&self) -> std::mem::Discriminant<Record> {
        std::mem::discriminant(self)
    }
}

/// The handle the gateway records through. See the module docs.
pub struct Ledger {
    queue: mpsc::Sender<Record>,
    /// Taken by [`Ledger::start`].
    receiver: std::sync::Mutex<Option<mpsc::Receiver<Record>>>,
    pool: Pool,
    metrics: LedgerMetrics,
    /// Migrations applied, and blocks and bans loaded.
    restored: Arc<AtomicBool>,
    /// When a drop was last logged (unix ms): at most one line a second.
    drop_logged_ms: AtomicU64,
}

/// A pool for `url` (already validated).
fn pool(url: &str) -> Result<Pool, String> {
    let manager = Manager::from_config(
        postgres_config(url)?,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CALL_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| format!("cannot set up the database pool: {e}"))
}

/// `matchgate migrate`: applies the migrations the database lacks; returns their versions.
pub async fn migrate(config: &LedgerConfig) -> Result<Vec<i32>, String> {
    let url = config
        .database_url
        .as_deref()
        .ok_or("MATCHGATE_DATABASE_URL (or --database-url) is not set")?;
    let pool = pool(url)?;
    let migrate = async {
        let mut client = pool.get().await?;
        schema::migrate(&mut client).await
    };
    tokio::time::timeout(CALL_TIMEOUT, migrate)
        .await
        .unwrap_or(Err(LedgerError::Timeout))
        .map_err(|e| e.to_string())
}

impl Ledger {
    /// The ledger the configuration asks for (`None` without `--database-url`); it records
    /// nothing until [`Ledger::start`].
    pub fn from_config(config: &LedgerConfig, metrics: LedgerMetrics) -> Option<Arc<Ledger>> {
        let url = config.database_url.as_deref()?;
        // The configuration was validated at start-up.
        let pool = pool(url).expect("a validated database URL");
        let (queue, receiver) = mpsc::channel(config.database_queue);
        Some(Arc::new(Ledger {
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
            pool,
            metrics,
            restored: Arc::new(AtomicBool::new(false)),
            drop_logged_ms: AtomicU64::new(0),
        }))
    }

    /// Spawns the task that migrates, loads the blocks and bans into `matchmaker` and
    /// `moderation` (retrying until the database answers), then writes what is queued. A
    /// second call does nothing.
    pub fn start(
        &self,
        matchmaker: Arc<dyn Administration>,
        moderation: Arc<dyn Moderation>,
        blocks: restore::BlockScope,
        background: &crate::shutdown::Background,
    ) {
        let Some(receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let pool = self.pool.clone();
        let metrics = self.metrics.clone();
        let restored = self.restored.clone();
        background.spawn(async move {
            let mut delays = Delays::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                let prepare = async {
                    let mut client = pool.get().await?;
                    let applied = schema::migrate(&mut client).await?;
                    let loaded = restore::load(&client, &*matchmaker, &*moderation, blocks).await?;
                    Ok::<_, LedgerError>((applied, loaded))
                };
                match tokio::time::timeout(STARTUP_TIMEOUT, prepare).await {
                    Ok(Ok((applied, loaded))) => {
                        tracing::info!(
                            migrations_applied = ?applied,
                            blockers = loaded.blockers,
                            blocks = loaded.blocks,
                            bans = loaded.bans,
                            "ledger ready: blocks and bans loaded from PostgreSQL"
                        );
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "ledger start-up failed: trying again")
                    }
                    Err(_) => tracing::warn!("ledger start-up timed out: trying again"),
                }
                if receiver.is_closed() {
                    return;
                }
                tokio::time::sleep(delays.next_delay()).await;
            }
            restored.store(true, Ordering::Release);
            write::run(pool, receiver, metrics).await;
        });
    }

    /// Whether the start-up is done: the blocks and bans of the ledger are in force here.
    pub fn restored(&self) -> bool {
        self.restored.load(Ordering::Acquire)
    }

    /// Queues `record` without waiting; a full queue drops it (logged, counted).
    pub fn record(&self, record: Record) {
        self.metrics.queue_depth.inc();
        if self.queue.try_send(record).is_ok() {
            return;
        }
        self.metrics.queue_depth.dec();
        self.metrics.dropped.inc();
        let now = unix_ms();
        let last = self.drop_logged_ms.load(Ordering::Relaxed);
        if now >= last + 1_000
            && self
                .drop_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                queued = self.metrics.queue_depth.get(),
                dropped_so_far = self.metrics.dropped.get(),
                "ledger queue full (the database is down or slow): records dropped"
            );
        }
    }

    /// The sessions an operation started and ended.
    pub fn sessions(&self, started: Vec<SessionStarted>, closed: Vec<SessionClosed>) {
        for s in started {
            self.record(Record::Started(s));
        }
        for c in closed {
            self.record(Record::Closed(c));
        }
    }

    pub fn block(&self, blocker: &UserId, blocked: UserId, session_id: Arc<str>) {
        self.record(Record::Block {
            blocker: blocker.clone(),
            blocked,
            session_id,
            at_ms: unix_ms(),
        });
    }

    pub fn report(&self, report: Report) {
        self.record(Record::Report {
            report_id: random_id("r_", 16),
            report,
        });
    }

    pub fn ban(&self, ban: &Ban, source: BanSource) {
        self.record(Record::Ban {
            ban_id: random_id("b_", 16),
            ban: ban.clone(),
            source,
            at_ms: unix_ms(),
        });
    }

    pub fn unban(&self, kind: BanKind, value: &str) {
        self.record(Record::Unban {
            kind,
            value: value.to_string(),
            at_ms: unix_ms(),
        });
    }

    /// At shutdown: waits (until `deadline`) for the queue to be written; what is left is
    /// logged and counted as dropped.
    pub async fn drain(&self, deadline: tokio::time::Instant) {
        while self.metrics.queue_depth.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.metrics.queue_depth.get();
        if left > 0 {
            self.metrics.dropped.inc_by(left as u64);
            tracing::error!(records = left, "ledger records not written before shutdown");
        }
    }
}

/// `ms` (unix) as a time for the database.
fn time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> crate::Config {
        let mut all = vec!["matchgate"];
        all.extend_from_slice(args);
        crate::Config::try_parse_from(all).expect("parses")
    }

    #[test]
    fn the_database_settings_are_checked_at_start_up() {
        let off = parse(&[]);
        off.validate().unwrap();
        assert!(off.ledger.database_url.is_none());
        assert_eq!(off.ledger.database_queue, 10_000);
        let on = parse(&["--database-url", "postgres://u:pw@db:5432/mg"]);
        on.validate().unwrap();
        parse(&["--database-url", "host=db user=u dbname=mg"])
            .validate()
            .unwrap();
        let e = parse(&["--database-url", "postgres://u:pw@db/mg?sslmode=require"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=require") && !e.contains("pw"), "{e}");
        let e = parse(&["--database-url", "postgres://u:pw@db/mg?bogus=1"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("MATCHGATE_DATABASE_URL is invalid"), "{e}");
        for queue in ["0", "1000001"] {
            let e = crate::Config::try_parse_from(["matchgate", "--database-queue", queue])
                .expect_err("out of range");
            assert!(e.to_string().contains("--database-queue"), "{e}");
        }
    }

    #[test]
    fn a_batch_is_a_statement_per_kind_and_bans_keep_their_order() {
        let unban = |v: &str| Record::Unban {
            kind: BanKind::User,
            value: v.into(),
            at_ms: 0,
        };
        let ban = |v: &str| Record::Ban {
            ban_id: v.into(),
            ban: Ban::new(BanKind::User, v.into(), None, Duration::from_secs(1)),
            source: BanSource::Admin,
            at_ms: 0,
        };
        let started = |id: &str| {
            Record::Started(SessionStarted {
                session_id: id.into(),
                users: ["a".into(), "b".into()],
                pools: ["p".into(), "p".into()],
                started_at_ms: 0,
            })
        };
        let closed = |id: &str| {
            Record::Closed(SessionClosed {
                session_id: id.into(),
                users: ["a".into(), "b".into()],
                started_at_ms: 0,
                ended_at_ms: 1,
                ended_by: None,
                reason: crate::protocol::EndReason::End,
            })
        };
        let batch = [
            closed("s0"),
            unban("x"),
            started("s1"),
            ban("y"),
            closed("s1"),
            ban("z"),
            unban("y"),
            started("s2"),
        ];
        let shape: Vec<(&str, usize)> = write::statements(&batch)
            .iter()
            .map(|run| {
                let kind = match run[0] {
                    Record::Started(_) => "started",
                    Record::Closed(_) => "closed",
                    Record::Ban { .. } => "ban",
                    Record::Unban { .. } => "unban",
                    _ => "other",
                };
                (kind, run.len())
            })
            .collect();
        assert_eq!(
            shape,
            [
                ("started", 2),
                ("closed", 2),
                ("unban", 1),
                ("ban", 2),
                ("unban", 1)
            ]
        );
    }
}
