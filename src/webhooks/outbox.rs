//! The Redis mode's outbox: webhook events wait in one stream of the deployment
//! ([`Layout::webhook_outbox`](crate::redis_keys::Layout::webhook_outbox)) instead of a
//! process, so that an event outlives the instance that made it or was sending it.
//!
//! Three tasks per instance, all in the server's [`Background`](crate::shutdown::Background):
//! - the writer takes the events this instance made off its bounded in-process queue and
//!   appends them (in batches) with `XADD MAXLEN ~ --webhook-outbox-len`; what the bound trims
//!   before it was delivered is counted as `trimmed` by the instance that wrote past it. While
//!   Redis does not answer, the writer retries and the in-process queue fills (then drops,
//!   counted), as in the embedded mode;
//! - the reader takes entries through the consumer group [`GROUP`] (`XREADGROUP` with a
//!   `COUNT` of the free delivery slots and a blocking wait of [`READ_BLOCK`], on a connection
//!   of its own) and delivers them; after the final answer (delivered, refused, or out of
//!   retries) the entry is acknowledged and deleted (`XACK` + `XDEL`);
//! - the keeper, every sixth of `--webhook-claim-idle-ms`, renews the entries this instance
//!   holds (`XCLAIM` to itself, which resets their idle time: a delivery waiting minutes
//!   between retries is still alive) and takes over those of other instances idle longer than
//!   `--webhook-claim-idle-ms` (`XAUTOCLAIM`): their instance died, or lost Redis for that long.
//!
//! Delivery stays at least once with the event's id: an instance that dies after a delivery
//! and before its `XACK` has that event sent again by the instance that takes it over.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisResult, Script, Value};
use tokio::sync::{mpsc, OnceCell, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::{Couriers, Parcel, WebhookConfig};
use crate::backoff::{self, Delays};
use crate::redis_keys::Deployment;

/// The consumer group every instance of the deployment delivers through.
pub const GROUP: &str = "webhooks";

/// How long one read waits for new entries before it asks again.
pub const READ_BLOCK: Duration = Duration::from_secs(5);

/// How long any other call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Events appended in one call at most.
const WRITE_BATCH: usize = 100;

/// Appends a batch of events (`ARGV[1]` the bound, then id, kind and body of each) and
/// returns how many entries the bound trimmed.
const APPEND: &str = r"
local before = redis.call('XLEN', KEYS[1])
for i = 2, #ARGV, 3 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'id', ARGV[i], 'kind', ARGV[i + 1], 'body', ARGV[i + 2])
end
return before + (#ARGV - 1) / 3 - redis.call('XLEN', KEYS[1])
";

/// A connection to the deployment's Redis: one server or a cluster (the outbox is one key,
/// so one slot).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn open(redis: &Deployment, response_timeout: Duration) -> RedisResult<Connection> {
        if redis.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(redis.urls.clone())
                .response_timeout(response_timeout)
                .build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(redis.urls[0].as_str())?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout));
            Ok(Connection::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self.clone() {
            Connection::Single(mut c) => cmd.query_async(&mut c).await,
            Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }

    async fn pipe(&self, pipe: &redis::Pipeline) -> RedisResult<()> {
        match self.clone() {
            Connection::Single(mut c) => pipe.query_async(&mut c).await,
            Connection::Cluster(mut c) => pipe.query_async(&mut c).await,
        }
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self.clone() {
            Connection::Single(mut c) => call.invoke_async(&mut c).await,
            Connection::Cluster(mut c) => call.invoke_async(&mut c).await,
        }
    }
}

/// The outbox of one deployment, as one instance sees it.
pub struct Outbox {
    redis: Deployment,
    key: String,
    /// This instance's name in the consumer group.
    consumer: String,
    max_len: usize,
    claim_idle: Duration,
    append: Script,
    /// The connection of every call but the blocking read.
    commands: OnceCell<Connection>,
    /// Entries this instance took and has not finished (waiting for a slot or on their way):
    /// the keeper renews them. At most the slots plus one read's `COUNT`.
    held: Mutex<HashSet<String>>,
}

/// Starts the writer (events from `parcels` into the outbox), the reader and the keeper;
/// the reader and the keeper take nothing new once `closing` is cancelled (the drain).
pub fn start(
    outbox: Arc<Outbox>,
    parcels: mpsc::Receiver<Parcel>,
    couriers: Couriers,
    closing: CancellationToken,
) {
    let background = couriers.background.clone();
    background.spawn(outbox.clone().write(parcels, couriers.clone()));
    background.spawn(outbox.clone().read(couriers.clone(), closing.clone()));
    background.spawn(outbox.keep(couriers, closing));
}

impl Outbox {
    pub fn new(redis: Deployment, instance: &str, config: &WebhookConfig) -> Outbox {
        Outbox {
            key: redis.layout.webhook_outbox(),
            redis,
            consumer: instance.to_string(),
            max_len: config.webhook_outbox_len,
            claim_idle: config.webhook_claim_idle_ms,
            append: Script::new(APPEND),
            commands: OnceCell::new(),
            held: Mutex::new(HashSet::new()),
        }
    }

    async fn commands(&self) -> RedisResult<Connection> {
        let run = async {
            self.commands
                .get_or_try_init(|| Connection::open(&self.redis, CALL_TIMEOUT))
                .await
                .cloned()
        };
        tokio::time::timeout(CALL_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(timed_out()))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer: appends what this instance made, retrying while Redis does not answer.
    /// Ends when the gateway (the only sender) is gone.
    async fn write(self: Arc<Self>, mut parcels: mpsc::Receiver<Parcel>, couriers: Couriers) {
        let metrics = couriers.metrics;
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while parcels.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            let appended = (|| self.append(&batch))
                .retry(backoff::policy(
                    Duration::from_millis(100),
                    Duration::from_secs(5),
                    None,
                ))
                .notify(|e, delay| {
                    tracing::warn!(error = %e, ?delay, events = batch.len(), "cannot write webhook events to the outbox: trying again");
                })
                .await;
            match appended {
                Ok(trimmed) if trimmed > 0 => {
                    tracing::warn!(
                        events = trimmed,
                        "webhook outbox full: the oldest events were trimmed"
                    );
                    metrics
                        .events
                        .get_or_create(&[("result", "trimmed")])
                        .inc_by(trimmed);
                }
                Ok(_) => {}
                // The policy retries without end: only a cancelled writer stops retrying.
                Err(e) => tracing::error!(error = %e, "webhook events not written"),
            }
            metrics.queued.dec_by(batch.len() as i64);
            batch.clear();
        }
    }

    async fn append(&self, batch: &[Parcel]) -> RedisResult<u64> {
        let mut call = self.append.key(&self.key);
        call.arg(self.max_len);
        for parcel in batch {
            call.arg(&parcel.id).arg(&parcel.kind).arg(&parcel.body);
        }
        let connection = self.commands().await?;
        timed(connection.invoke(&call)).await
    }

    /// Creates the consumer group (and the stream) unless it exists. From `0`: whatever is in
    /// the stream is still to be delivered.
    async fn ensure_group(&self, connection: &Connection) -> RedisResult<()> {
        let create = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .to_owned();
        match timed(connection.query::<()>(&create)).await {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// The reader: waits for a free slot, then for new entries, and delivers them.
    async fn read(self: Arc<Self>, couriers: Couriers, closing: CancellationToken) {
        let mut delays = Delays::new(Duration::from_millis(100), Duration::from_secs(5));
        // Its own connection: a blocking read holds the connection it runs on.
        let mut reading: Option<Connection> = None;
        loop {
            let slot = tokio::select! {
                _ = closing.cancelled() => return,
                slot = couriers.slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            let count = 1 + couriers.slots.available_permits();
            let taken = tokio::select! {
                _ = closing.cancelled() => return,
                taken = self.take(&mut reading, count) => taken,
            };
            match taken {
                Ok(entries) => {
                    delays = Delays::new(Duration::from_millis(100), Duration::from_secs(5));
                    self.hand_over(entries, vec![slot], &couriers).await;
                }
                Err(e) => {
                    drop(slot);
                    // Connect again and make sure of the group: Redis may have restarted empty.
                    reading = None;
                    let delay = delays.next_delay();
                    tracing::warn!(error = %e, ?delay, "cannot read the webhook outbox: trying again");
                    tokio::select! {
                        _ = closing.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Up to `count` entries no instance has taken yet, waiting up to [`READ_BLOCK`] for them.
    async fn take(
        &self,
        reading: &mut Option<Connection>,
        count: usize,
    ) -> RedisResult<Vec<(String, Option<Parcel>)>> {
        let connection = match reading {
            Some(connection) => connection,
            None => {
                let connection =
                    timed(Connection::open(&self.redis, READ_BLOCK + CALL_TIMEOUT)).await?;
                self.ensure_group(&connection).await?;
                reading.insert(connection)
            }
        };
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .to_owned();
        let reply: Value = connection.query(&read).await?;
        // Nil when nothing came; else one stream: [[key, entries]].
        let entries = match reply {
            Value::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                Value::Array(mut stream) if stream.len() == 2 => stream.pop(),
                _ => None,
            },
            _ => None,
        };
        Ok(entries.map(parse_entries).unwrap_or_default())
    }

    /// Delivers the entries this instance just took, each in a slot: first those in `slots`,
    /// then as slots free up. An entry that is no event (not written by a gateway) is
    /// finished at once, counted as failed.
    async fn hand_over(
        self: &Arc<Self>,
        entries: Vec<(String, Option<Parcel>)>,
        mut slots: Vec<OwnedSemaphorePermit>,
        couriers: &Couriers,
    ) {
        self.held()
            .extend(entries.iter().map(|(entry, _)| entry.clone()));
        for (entry, parcel) in entries {
            let Some(parcel) = parcel else {
                tracing::warn!(entry, "an outbox entry that is no webhook event: deleted");
                couriers.metrics.count("failed");
                self.finish(&entry).await;
                continue;
            };
            let slot = match slots.pop() {
                Some(slot) => slot,
                None => match couriers.slots.clone().acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            couriers.metrics.queued.inc();
            let outbox = self.clone();
            couriers.deliver(
                slot,
                parcel,
                move || async move { outbox.finish(&entry).await },
            );
        }
    }

    /// After the final answer: acknowledges and deletes the entry. If Redis does not answer,
    /// the entry stays pending and is delivered again after a takeover (at least once).
    async fn finish(&self, entry: &str) {
        let done = redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(&self.key)
            .arg(GROUP)
            .arg(entry)
            .cmd("XDEL")
            .arg(&self.key)
            .arg(entry)
            .to_owned();
        let finish = || async { timed(self.commands().await?.pipe(&done)).await };
        let result = finish
            .retry(backoff::policy(
                Duration::from_millis(100),
                Duration::from_secs(2),
                Some(5),
            ))
            .await;
        if let Err(e) = result {
            tracing::warn!(entry, error = %e, "cannot acknowledge a webhook event: it will be sent again");
        }
        self.held().remove(entry);
    }

    /// The keeper: renews what this instance holds and, until the drain, takes over what
    /// others left idle.
    async fn keep(self: Arc<Self>, couriers: Couriers, closing: CancellationToken) {
        let every = self.claim_idle / 6;
        // Where the scan of the pending entries goes on (XAUTOCLAIM's cursor).
        let mut cursor = "0-0".to_string();
        loop {
            tokio::time::sleep(every).await;
            // Renewing goes on while the instance drains (until the background stops): the
            // deliveries it finishes meanwhile stay its own.
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, "cannot renew the webhook events on their way");
            }
            if closing.is_cancelled() {
                continue;
            }
            if let Err(e) = self.take_over(&mut cursor, &couriers).await {
                tracing::warn!(error = %e, "cannot take over idle webhook events");
            }
        }
    }

    /// Resets the idle time of every entry this instance holds.
    async fn renew(&self) -> RedisResult<()> {
        let held: Vec<String> = self.held().iter().cloned().collect();
        if held.is_empty() {
            return Ok(());
        }
        let claim = redis::cmd("XCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(0)
            .arg(&held)
            .arg("JUSTID")
            .to_owned();
        timed(self.commands().await?.query::<Value>(&claim)).await?;
        Ok(())
    }

    /// Takes over, as free slots allow, entries idle longer than the bound, and delivers them.
    async fn take_over(
        self: &Arc<Self>,
        cursor: &mut String,
        couriers: &Couriers,
    ) -> RedisResult<()> {
        let mut slots = Vec::new();
        while slots.len() < super::CONCURRENT_DELIVERIES {
            match couriers.slots.clone().try_acquire_owned() {
                Ok(slot) => slots.push(slot),
                Err(_) => break,
            }
        }
        if slots.is_empty() {
            return Ok(());
        }
        let claim = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg(cursor.as_str())
            .arg("COUNT")
            .arg(slots.len())
            .to_owned();
        let reply: Value = timed(self.commands().await?.query(&claim)).await?;
        // [next cursor, entries, ids of deleted entries (dropped from the pending list)].
        let Value::Array(mut parts) = reply else {
            return Ok(());
        };
        let entries = if parts.len() >= 2 {
            parse_entries(parts.swap_remove(1))
        } else {
            Vec::new()
        };
        if let Some(next) = parts.first().and_then(text) {
            *cursor = next;
        }
        let entries: Vec<_> = {
            let held = self.held();
            entries
                .into_iter()
                .filter(|(entry, _)| !held.contains(entry))
                .collect()
        };
        if !entries.is_empty() {
            tracing::info!(events = entries.len(), "taking over idle webhook events");
            couriers.metrics.claimed.inc_by(entries.len() as u64);
        }
        self.hand_over(entries, slots, couriers).await;
        Ok(())
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis call timed out",
    ))
}

async fn timed<T>(call: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Stream entries (`[[id, [field, value, ...]], ...]`) as their ids and events; an entry
/// without the three fields of an event has none.
fn parse_entries(entries: Value) -> Vec<(String, Option<Parcel>)> {
    let Value::Array(entries) = entries else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut parts) = entry else {
                return None;
            };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = text(&parts[0])?;
            Some((id, parse_parcel(fields)))
        })
        .collect()
}

fn parse_parcel(fields: Value) -> Option<Parcel> {
    let Value::Array(fields) = fields else {
        return None;
    };
    let (mut id, mut kind, mut body) = (None, None, None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else {
            return None;
        };
        match text(name)?.as_str() {
            "id" => id = text(value),
            "kind" => kind = text(value),
            "body" => match value {
                Value::BulkString(bytes) => body = Some(bytes.clone()),
                _ => return None,
            },
            _ => {}
        }
    }
    Some(Parcel {
        id: id?,
        kind: kind?,
        body: body?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_parse_into_events_and_anything_else_into_none() {
        let entry =
            |id: &str, fields: Vec<Value>| Value::Array(vec![bulk(id), Value::Array(fields)]);
        let entries = Value::Array(vec![
            entry(
                "1-0",
                vec![
                    bulk("id"),
                    bulk("evt_1"),
                    bulk("kind"),
                    bulk("user.banned"),
                    bulk("body"),
                    bulk("{}"),
                ],
            ),
            entry("2-0", vec![bulk("id"), bulk("evt_2")]),
            entry("3-0", vec![bulk("id")]),
            Value::Array(vec![bulk("4-0"), Value::Nil]),
        ]);
        let parsed = parse_entries(entries);
        assert_eq!(
            parsed,
            vec![
                (
                    "1-0".to_string(),
                    Some(Parcel {
                        id: "evt_1".into(),
                        kind: "user.banned".into(),
                        body: b"{}".to_vec()
                    })
                ),
                ("2-0".to_string(), None),
                ("3-0".to_string(), None),
                ("4-0".to_string(), None),
            ]
        );
        assert!(parse_entries(Value::Nil).is_empty());
    }
}
