//! Outbound webhooks: the gateway tells the app's backend what happened (`session.started`,
//! `session.ended`, `report.created`, `user.banned`) with signed HTTP POSTs to
//! `--webhook-url`.
//!
//! Each event gets a random id when it is made and keeps it through every retry, so that a
//! receiver can drop the duplicates that at-least-once delivery brings. The body is signed with
//! HMAC-SHA256 under `--webhook-secret` over `<timestamp>.<body>` (the timestamp in unix
//! seconds, fresh for every attempt, so a receiver can refuse old replays); the README shows a
//! receiver's check. A failed attempt (connection error, timeout, 5xx, 408, 429) is retried with
//! the crate's backoff ([`crate::backoff`]); any other answer is final.
//!
//! Where events wait depends on the mode ([`Store`]). In the embedded mode they wait in a
//! bounded queue in the process, which dies with it like the rest of the embedded state: a
//! draining instance goes on delivering until the drain timeout, and what is still queued when
//! the process exits is lost (logged; the metrics show how much is queued). In Redis mode the
//! instance that made an event writes it to the deployment's outbox stream ([`outbox`]), and
//! every instance delivers from that stream through one consumer group, so an event outlives
//! the instance that made it or was sending it. Either way at most [`CONCURRENT_DELIVERIES`]
//! are on their way at once per instance, so a slow or dead receiver never slows matching, and
//! memory stays bounded: past `--webhook-queue` events waiting in the process are dropped,
//! logged and counted, never silently.

mod outbox;

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::flags::ConfigError;
use crate::ids::{random_id, unix_ms};
use crate::matching::{SessionClosed, SessionStarted};
use crate::metrics::{BanSource, WebhookMetrics};
use crate::moderation::review::ReportId;
use crate::moderation::{Ban, Report};
use crate::redis_keys::Deployment;
use crate::shutdown::Background;

/// Deliveries in flight at once (each may be waiting between retries).
pub const CONCURRENT_DELIVERIES: usize = 8;

/// The headers of every delivery.
pub const ID_HEADER: &str = "Matchgate-Webhook-Id";
pub const TIMESTAMP_HEADER: &str = "Matchgate-Webhook-Timestamp";
pub const SIGNATURE_HEADER: &str = "Matchgate-Webhook-Signature";

/// The shortest secret accepted: 32 bytes, like the other secrets of the gateway.
const MIN_SECRET_BYTES: usize = 32;

/// The configuration of outbound webhooks (flattened into [`crate::Config`]).
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookConfig {
    /// Where outbound webhooks are POSTed (`http://` or `https://`). Without it, none are sent.
    #[arg(long, env = "MATCHGATE_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Key of the HMAC-SHA256 signature of every webhook (at least 32 bytes); required with
    /// `--webhook-url`.
    #[arg(long, env = "MATCHGATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Webhook events waiting in each instance for delivery (Redis mode: for their write to the
    /// outbox); beyond it new events are dropped
    /// (logged and counted in `matchgate_webhook_events_total{result="dropped"}`).
    #[arg(
        long,
        env = "MATCHGATE_WEBHOOK_QUEUE",
        default_value = "10000",
        value_parser = crate::flags::count(1..=1_000_000)
    )]
    pub webhook_queue: usize,

    /// How long one delivery attempt may take, in ms.
    #[arg(
        long,
        env = "MATCHGATE_WEBHOOK_TIMEOUT_MS",
        default_value = "5000",
        value_parser = crate::flags::millis(100..=60_000)
    )]
    pub webhook_timeout_ms: Duration,

    /// Retries of a failed delivery (0.5 s, doubling up to a minute, with jitter) before the
    /// event counts as failed.
    #[arg(
        long,
        env = "MATCHGATE_WEBHOOK_RETRIES",
        default_value = "10",
        value_parser = crate::flags::count(..=100)
    )]
    pub webhook_retries: usize,

    /// Redis mode: events the deployment's outbox stream keeps at most (trimmed approximately,
    /// oldest first; what is trimmed before delivery is counted as `trimmed`).
    #[arg(
        long,
        env = "MATCHGATE_WEBHOOK_OUTBOX_LEN",
        default_value = "100000",
        value_parser = crate::flags::count(100..=10_000_000)
    )]
    pub webhook_outbox_len: usize,

    /// Redis mode: how long, in ms, an event taken by an instance may go without a sign of
    /// life from it before another instance takes it over (the instance died).
    #[arg(
        long,
        env = "MATCHGATE_WEBHOOK_CLAIM_IDLE_MS",
        default_value = "30000",
        value_parser = crate::flags::millis(600..=3_600_000)
    )]
    pub webhook_claim_idle_ms: Duration,
}

impl WebhookConfig {
    /// Checks the receiver's URL and the secret at start-up (not in clap, whose error would
    /// print them).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |reason: String| {
            Err(ConfigError {
                flags: vec!["webhook-url", "webhook-secret"],
                reason,
            })
        };
        let Some(url) = &self.webhook_url else {
            if self.webhook_secret.is_some() {
                return fail(
                    "MATCHGATE_WEBHOOK_SECRET is set without MATCHGATE_WEBHOOK_URL".into(),
                );
            }
            return Ok(());
        };
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return fail(format!(
                    "MATCHGATE_WEBHOOK_URL must be an http:// or https:// URL with a host (got {url:?})"
                ))
            }
        }
        match &self.webhook_secret {
            Some(s) if s.len() >= MIN_SECRET_BYTES => {}
            Some(s) => {
                return fail(format!(
                    "MATCHGATE_WEBHOOK_SECRET must be at least {MIN_SECRET_BYTES} bytes (got {})",
                    s.len()
                ))
            }
            None => return fail("MATCHGATE_WEBHOOK_URL needs MATCHGATE_WEBHOOK_SECRET".into()),
        }
        Ok(())
    }
}

/// One event, as the receiver gets it (the body of the POST).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique per event and the same in every retry: the receiver's de-duplication key.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// When the event was made (unix ms).
    pub created_at_ms: u64,
    pub data: serde_json::Value,
}

impl Event {
    fn new(kind: &'static str, data: serde_json::Value) -> Event {
        Event {
            id: random_id("evt_", 16),
            kind,
            created_at_ms: unix_ms(),
            data,
        }
    }

    pub fn session_started(s: &SessionStarted) -> Event {
        Event::new(
            "session.started",
            json!({
                "session_id": s.session_id,
                "users": s.users,
                "pools": s.pools,
                "started_at_ms": s.started_at_ms,
            }),
        )
    }

    pub fn session_ended(s: &SessionClosed) -> Event {
        Event::new(
            "session.ended",
            json!({
                "session_id": s.session_id,
                "users": s.users,
                "started_at_ms": s.started_at_ms,
                "ended_at_ms": s.ended_at_ms,
                "duration_ms": s.ended_at_ms.saturating_sub(s.started_at_ms),
                "ended_by": s.ended_by,
                "reason": s.reason.as_str(),
            }),
        )
    }

    pub fn report_created(id: ReportId, r: &Report) -> Event {
        Event::new(
            "report.created",
            json!({
                "report_id": id.to_string(),
                "session_id": r.session_id,
                "reporter": r.reporter,
                "reported": r.reported,
                "reason": r.reason.as_str(),
                "details": r.details,
                "at_ms": r.at_ms,
            }),
        )
    }

    pub fn user_banned(ban: &Ban, source: BanSource) -> Event {
        Event::new(
            "user.banned",
            json!({
                "kind": ban.kind.as_str(),
                "value": ban.value,
                "reason": ban.reason,
                "until_ms": ban.until_ms,
                "source": source.as_str(),
            }),
        )
    }
}

/// Where events wait for delivery.
pub enum Store {
    /// In this process's queue (the embedded mode).
    Memory,
    /// In the deployment's outbox stream, delivered by every instance (`instance` names this
    /// one in the consumer group).
    Redis { redis: Deployment, instance: String },
}

/// The sending side: hands events to the delivery task (embedded mode) or the outbox writer
/// (Redis mode).
pub struct Webhooks {
    queue: mpsc::Sender<Parcel>,
    metrics: WebhookMetrics,
    /// Cancelled when the drain begins: in Redis mode the instance then takes no new events
    /// from the outbox (what it has not taken is the other instances' to deliver).
    closing: CancellationToken,
}

/// An event ready to go: what every attempt sends, and its id and kind for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parcel {
    id: String,
    kind: String,
    body: Vec<u8>,
}

impl Parcel {
    fn of(event: &Event) -> Parcel {
        Parcel {
            id: event.id.clone(),
            kind: event.kind.to_string(),
            body: serde_json::to_vec(event).expect("an event serialises"),
        }
    }
}

/// Where and how events go.
struct Target {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Vec<u8>,
    retries: usize,
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Worth another try: no answer, 5xx, 408 or 429.
    #[error("{0}")]
    Transient(String),
    /// The receiver refused the event for good.
    #[error("refused with HTTP {0}")]
    Refused(u16),
}

impl Webhooks {
    /// The webhooks `config` asks for (none without a URL), with their tasks in `background`,
    /// events waiting in `store`. The configuration was validated at start-up.
    pub fn from_config(
        config: &WebhookConfig,
        metrics: &WebhookMetrics,
        store: Store,
        background: &Background,
    ) -> Option<Arc<Self>> {
        let url = reqwest::Url::parse(config.webhook_url.as_deref()?).ok()?;
        let secret = config.webhook_secret.clone()?.into_bytes();
        // reqwest is built with rustls but without a crypto provider, and will not build a
        // client before one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(config.webhook_timeout_ms)
            .redirect(reqwest::redirect::Policy::none())
            .build();
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the webhook client: no webhooks are sent");
                return None;
            }
        };
        let couriers = Couriers {
            target: Arc::new(Target {
                client,
                url,
                secret,
                retries: config.webhook_retries,
            }),
            slots: Arc::new(Semaphore::new(CONCURRENT_DELIVERIES)),
            metrics: metrics.clone(),
            background: background.clone(),
        };
        let (queue, parcels) = mpsc::channel(config.webhook_queue);
        let closing = CancellationToken::new();
        match store {
            Store::Memory => background.spawn(dispatch(parcels, couriers)),
            Store::Redis { redis, instance } => {
                let outbox = Arc::new(outbox::Outbox::new(redis, &instance, config));
                outbox::start(outbox, parcels, couriers, closing.clone());
            }
        }
        Some(Arc::new(Webhooks {
            queue,
            metrics: metrics.clone(),
            closing,
        }))
    }

    /// Queues `event` for delivery (or for the outbox); past the bound it is dropped (logged
    /// and counted).
    pub fn send(&self, event: Event) {
        // Counted before it is queued: the delivery task may finish it at once.
        self.metrics.queued.inc();
        if let Err(e) = self.queue.try_send(Parcel::of(&event)) {
            self.metrics.queued.dec();
            self.metrics.count("dropped");
            let parcel = e.into_inner();
            tracing::warn!(
                id = %parcel.id,
                kind = parcel.kind,
                "webhook queue full: event dropped"
            );
        }
    }

    /// Waits until every event accepted so far is delivered or failed (in Redis mode: written
    /// to the outbox, and the deliveries this instance took are finished), or until `deadline`
    /// (a draining instance sends what it has before it exits); returns how many are left.
    pub async fn flush(&self, deadline: tokio::time::Instant) -> u64 {
        self.closing.cancel();
        loop {
            let left = self.metrics.queued.get().max(0) as u64;
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(FLUSH_POLL).await;
        }
    }
}

/// How often a flush looks at the queue.
const FLUSH_POLL: Duration = Duration::from_millis(20);

/// What delivers: the receiver, the slots that bound the deliveries in flight, the metrics,
/// and where the delivery tasks run.
#[derive(Clone)]
struct Couriers {
    target: Arc<Target>,
    slots: Arc<Semaphore>,
    metrics: WebhookMetrics,
    background: Background,
}

impl Couriers {
    /// Delivers `parcel` in a task holding `slot`, counts the result, then runs `finished`
    /// (the answer is final then: delivered, refused for good, or out of retries).
    fn deliver<F, Fut>(&self, slot: OwnedSemaphorePermit, parcel: Parcel, finished: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let target = self.target.clone();
        let metrics = self.metrics.clone();
        self.background.spawn(async move {
            let result = target.deliver(&parcel, &metrics).await;
            match result {
                Ok(()) => metrics.count("delivered"),
                Err(e) => {
                    metrics.count("failed");
                    tracing::warn!(id = %parcel.id, kind = parcel.kind, error = %e, "webhook not delivered");
                }
            }
            finished().await;
            metrics.queued.dec();
            drop(slot);
        });
    }
}

/// The embedded mode: takes events off the queue and delivers up to [`CONCURRENT_DELIVERIES`]
/// at once. Ends when the gateway (the only sender) is gone.
async fn dispatch(mut parcels: mpsc::Receiver<Parcel>, couriers: Couriers) {
    // A slot first, then an event: an event taken off the queue is always on its way, so at
    // most the queue's bound plus the slots are waiting.
    while let Ok(slot) = couriers.slots.clone().acquire_owned().await {
        let Some(parcel) = parcels.recv().await else {
            return;
        };
        couriers.deliver(slot, parcel, || async {});
    }
}

impl Target {
    /// Delivers one event, retrying what is worth retrying.
    async fn deliver(&self, parcel: &Parcel, metrics: &WebhookMetrics) -> Result<(), Failure> {
        let policy = backoff::policy(
            Duration::from_millis(500),
            Duration::from_secs(60),
            Some(self.retries),
        );
        (|| self.attempt(&parcel.id, &parcel.body))
            .retry(policy)
            .when(|f| matches!(f, Failure::Transient(_)))
            .notify(|e, delay| {
                metrics.retries.inc();
                tracing::debug!(id = %parcel.id, error = %e, ?delay, "webhook attempt failed: trying again");
            })
            .await
    }

    async fn attempt(&self, id: &str, body: &[u8]) -> Result<(), Failure> {
        let timestamp = unix_ms() / 1000;
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, id)
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature(&self.secret, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
        let status = response.status();
        match status.as_u16() {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(Failure::Transient(format!("HTTP {status}"))),
            other => Err(Failure::Refused(other)),
        }
    }
}

/// The signature header's value: `v1=` and the hex HMAC-SHA256 of `<timestamp>.<body>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + 2 * digest.len());
    out.push_str("v1=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: Option<&str>, secret: Option<&str>) -> WebhookConfig {
        WebhookConfig {
            webhook_url: url.map(Into::into),
            webhook_secret: secret.map(Into::into),
            webhook_queue: 10,
            webhook_timeout_ms: Duration::from_secs(1),
            webhook_retries: 3,
            webhook_outbox_len: 1000,
            webhook_claim_idle_ms: Duration::from_secs(30),
        }
    }

    const SECRET: &str = "webhook-secret-webhook-secret-32b";

    #[test]
    fn bad_urls_and_secrets_are_refused_at_start_up() {
        assert!(config(None, None).validate().is_ok());
        assert!(config(Some("http://127.0.0.1:9/hook"), Some(SECRET))
            .validate()
            .is_ok());
        for url in ["not a url", "ftp://example.com/", "http://", "/relative"] {
            assert!(config(Some(url), Some(SECRET)).validate().is_err(), "{url}");
        }
        assert!(config(Some("https://example.com/"), None)
            .validate()
            .is_err());
        assert!(config(Some("https://example.com/"), Some("short"))
            .validate()
            .is_err());
        assert!(config(None, Some(SECRET)).validate().is_err());
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_and_body() {
        // Known answer, from Python: hmac.new(b"key", b"42.{}", hashlib.sha256).hexdigest().
        assert_eq!(
            signature(b"key", 42, b"{}"),
            "v1=479f5fabf373d659ed01b17cee79df2e457070f7b1795243f56bb889e667bdf7"
        );
        assert_ne!(signature(b"key", 43, b"{}"), signature(b"key", 42, b"{}"));
    }
}
