//! The ledger's writer: takes what has gathered on the queue (up to a batch), writes it in one
//! transaction (one `INSERT ... SELECT FROM UNNEST(...)` per run of records of one kind, so a
//! batch costs a few round trips however large), and retries with backoff until it is
//! written. Runs keep the queue's order, so a ban lifted right after it was made ends lifted.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Pool, Transaction};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;

use super::{
    time, LedgerError, LedgerMetrics, Record, BATCH_MAX, CALL_TIMEOUT, REFUSALS_BEFORE_DROP,
};
use crate::backoff::Delays;

/// Writes what arrives on `queue` until every sender is gone.
pub(super) async fn run(pool: Pool, mut queue: mpsc::Receiver<Record>, metrics: LedgerMetrics) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while queue.recv_many(&mut batch, BATCH_MAX).await > 0 {
        write_until_done(&pool, &batch, &metrics, &queue).await;
        batch.clear();
    }
}

/// Writes `batch`, trying again while the database is down or slow; drops it (logged,
/// counted) when the database keeps refusing it, or when the ledger is gone meanwhile.
async fn write_until_done(
    pool: &Pool,
    batch: &[Record],
    metrics: &LedgerMetrics,
    queue: &mpsc::Receiver<Record>,
) {
    let n = batch.len() as u64;
    let mut delays = Delays::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut refusals = 0;
    loop {
        let result = tokio::time::timeout(CALL_TIMEOUT, write(pool, batch))
            .await
            .unwrap_or(Err(LedgerError::Timeout));
        let error = match result {
            Ok(()) => {
                metrics.written.inc_by(n);
                metrics.queue_depth.dec_by(n as i64);
                return;
            }
            Err(e) => e,
        };
        if !error.transient() {
            refusals += 1;
        }
        if refusals >= REFUSALS_BEFORE_DROP || queue.is_closed() {
            tracing::error!(records = n, error = %error, "ledger batch dropped");
            metrics.dropped.inc_by(n);
            metrics.queue_depth.dec_by(n as i64);
            return;
        }
        metrics.retries.inc();
        tracing::warn!(records = n, error = %error, "ledger write failed: trying again");
        tokio::time::sleep(delays.next_delay()).await;
    }
}

/// One transaction for the whole batch.
async fn write(pool: &Pool, batch: &[Record]) -> Result<(), LedgerError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    for run in statements(batch) {
        write_run(&tx, &run).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The batch as the runs of records that one statement each writes, in the order to write
/// them. The writes of session starts and ends, blocks and reports commute (upserts that do
/// not depend on each other), so each of these kinds is one statement however they
/// interleave (starts first: an end then completes its row). Bans and their lifts do not
/// commute: they keep the queue's order, one statement per run of one kind.
pub(super) fn statements(batch: &[Record]) -> Vec<Vec<&Record>> {
    let mut commuting: Vec<Vec<&Record>> = Vec::new();
    let mut ordered: Vec<Vec<&Record>> = Vec::new();
    for record in batch {
        let same = |run: &Vec<&Record>| run[0].kind() == record.kind();
        let (runs, at) = match record {
            Record::Ban { .. } | Record::Unban { .. } => {
                let last = ordered.last().is_some_and(same).then(|| ordered.len() - 1);
                (&mut ordered, last)
            }
            _ => {
                let found = commuting.iter().position(same);
                (&mut commuting, found)
            }
        };
        match at {
            Some(i) => runs[i].push(record),
            None => runs.push(vec![record]),
        }
    }
    commuting.sort_by_key(|run| !matches!(run[0], Record::Started(_)));
    commuting.extend(ordered);
    commuting
}

/// A session that went live: its row, unless its end came first (another instance in Redis
/// mode), which leaves only the pools to fill in.
const STARTED: &str = "INSERT INTO sessions
    (session_id, offerer, answerer, offerer_pool, answerer_pool, started_at)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::timestamptz[])
    ON CONFLICT (session_id) DO UPDATE SET
        offerer_pool = EXCLUDED.offerer_pool, answerer_pool = EXCLUDED.answerer_pool";

/// A session that ended: completes its row (or makes it, if its start was not written).
const CLOSED: &str = "INSERT INTO sessions
    (session_id, offerer, answerer, started_at, ended_at, ended_by, end_reason, duration_ms)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[],
        $5::timestamptz[], $6::text[], $7::text[], $8::int8[])
    ON CONFLICT (session_id) DO UPDATE SET
        ended_at = EXCLUDED.ended_at, ended_by = EXCLUDED.ended_by,
        end_reason = EXCLUDED.end_reason, duration_ms = EXCLUDED.duration_ms";

const BLOCKS: &str = "INSERT INTO blocks (blocker, blocked, session_id, created_at)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[])
    ON CONFLICT (blocker, blocked) DO UPDATE SET
        session_id = EXCLUDED.session_id, created_at = EXCLUDED.created_at";

const REPORTS: &str = "INSERT INTO reports
    (report_id, session_id, reporter, reported, reason, details, created_at)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::timestamptz[])
    ON CONFLICT (report_id) DO NOTHING";

const BANS: &str = "INSERT INTO bans
    (ban_id, kind, value, reason, source, created_at, until)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::timestamptz[], $7::timestamptz[])
    ON CONFLICT (ban_id) DO NOTHING";

/// Lifts the bans of each kind and value made up to the time of the lift.
const UNBANS: &str = "UPDATE bans SET lifted_at = u.at
    FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS u(kind, value, at)
    WHERE bans.kind = u.kind AND bans.value = u.value AND bans.lifted_at IS NULL
        AND bans.created_at <= u.at";

/// Writes records of one kind with one statement.
async fn write_run(tx: &Transaction<'_>, run: &[&Record]) -> Result<(), LedgerError> {
    let (sql, columns): (&str, Vec<Box<dyn ToSql + Sync + Send>>) = match &run[0] {
        Record::Started(_) => {
            let mut c = Columns::default();
            for r in run {
                let Record::Started(s) = r else { continue };
                c.text(0, &s.session_id);
                c.text(1, &s.users[0]);
                c.text(2, &s.users[1]);
                c.text(3, &s.pools[0]);
                c.text(4, &s.pools[1]);
                c.time(5, s.started_at_ms);
            }
            (STARTED, c.finish(&[T, T, T, T, T, Ts]))
        }
        Record::Closed(_) => {
            let mut c = Columns::default();
            for r in run {
                let Record::Closed(s) = r else { continue };
                c.text(0, &s.session_id);
                c.text(1, &s.users[0]);
                c.text(2, &s.users[1]);
                c.time(3, s.started_at_ms);
                c.time(4, s.ended_at_ms);
                c.maybe_text(5, s.ended_by.as_deref());
                c.text(6, s.reason.as_str());
                c.int(7, s.ended_at_ms.saturating_sub(s.started_at_ms) as i64);
            }
            (CLOSED, c.finish(&[T, T, T, Ts, Ts, T, T, I]))
        }
        Record::Block { .. } => {
            // One statement may not touch a row twice: the latest of repeated blocks counts.
            let mut seen = HashSet::new();
            let mut latest: Vec<&Record> = run
                .iter()
                .copied()
                .rev()
                .filter(|r| match r {
                    Record::Block {
                        blocker, blocked, ..
                    } => seen.insert((blocker, blocked)),
                    _ => false,
                })
                .collect();
            latest.reverse();
            let mut c = Columns::default();
            for r in latest {
                let Record::Block {
                    blocker,
                    blocked,
                    session_id,
                    at_ms,
                } = r
                else {
                    continue;
                };
                c.text(0, blocker);
                c.text(1, blocked);
                c.text(2, session_id);
                c.time(3, *at_ms);
            }
            (BLOCKS, c.finish(&[T, T, T, Ts]))
        }
        Record::Report { .. } => {
            let mut c = Columns::default();
            for r in run {
                let Record::Report { report_id, report } = r else {
                    continue;
                };
                c.text(0, report_id);
                c.text(1, &report.session_id);
                c.text(2, &report.reporter);
                c.text(3, &report.reported);
                c.text(4, report.reason.as_str());
                c.maybe_text(5, report.details.as_deref());
                c.time(6, report.at_ms);
            }
            (REPORTS, c.finish(&[T, T, T, T, T, T, Ts]))
        }
        Record::Ban { .. } => {
            let mut c = Columns::default();
            for r in run {
                let Record::Ban {
                    ban_id,
                    ban,
                    source,
                    at_ms,
                } = r
                else {
                    continue;
                };
                c.text(0, ban_id);
                c.text(1, ban.kind.as_str());
                c.text(2, &ban.value);
                c.maybe_text(3, ban.reason.as_deref());
                c.text(4, source.as_str());
                c.time(5, *at_ms);
                c.time(6, ban.until_ms);
            }
            (BANS, c.finish(&[T, T, T, T, T, Ts, Ts]))
        }
        Record::Unban { .. } => {
            let mut c = Columns::default();
            for r in run {
                let Record::Unban { kind, value, at_ms } = r else {
                    continue;
                };
                c.text(0, kind.as_str());
                c.text(1, value);
                c.time(2, *at_ms);
            }
            (UNBANS, c.finish(&[T, T, Ts]))
        }
    };
    let statement = tx.prepare_cached(sql).await?;
    let params: Vec<&(dyn ToSql + Sync)> = columns
        .iter()
        .map(|c| &**c as &(dyn ToSql + Sync))
        .collect();
    tx.execute(&statement, &params).await?;
    Ok(())
}

/// The type of a column.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Time,
    Int,
}
use Kind::{Int as I, Text as T, Time as Ts};

/// The columns of one statement, one array each, filled row by row.
#[derive(Default)]
struct Columns {
    texts: Vec<Vec<Option<String>>>,
    times: Vec<Vec<SystemTime>>,
    ints: Vec<Vec<i64>>,
}

impl Columns {
    fn slot<V>(columns: &mut Vec<Vec<V>>, i: usize) -> &mut Vec<V> {
        if columns.len() <= i {
            columns.resize_with(i + 1, Vec::new);
        }
        &mut columns[i]
    }

    fn text(&mut self, i: usize, value: &str) {
        self.maybe_text(i, Some(value));
    }

    fn maybe_text(&mut self, i: usize, value: Option<&str>) {
        Self::slot(&mut self.texts, i).push(value.map(str::to_string));
    }

    fn time(&mut self, i: usize, ms: u64) {
        Self::slot(&mut self.times, i).push(time(ms));
    }

    fn int(&mut self, i: usize, value: i64) {
        Self::slot(&mut self.ints, i).push(value);
    }

    /// The arrays in statement order; `kinds` names the type of each parameter.
    fn finish(mut self, kinds: &[Kind]) -> Vec<Box<dyn ToSql + Sync + Send>> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| -> Box<dyn ToSql + Sync + Send> {
                match kind {
                    Kind::Text => Box::new(std::mem::take(Self::slot(&mut self.texts, i))),
                    Kind::Time => Box::new(std::mem::take(Self::slot(&mut self.times, i))),
                    Kind::Int => Box::new(std::mem::take(Self::slot(&mut self.ints, i))),
                }
            })
            .collect()
    }
}
