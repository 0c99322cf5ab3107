//! Prometheus metrics of one gateway instance, served as text at `GET /metrics`.
//!
//! Each server owns its own registry (no process-global recorder), so that several instances
//! in one test process do not mix their figures. Gauges that mirror matching state (queue
//! length, active sessions) are read from the matchmaker at scrape time. Process and tokio
//! runtime figures are read at scrape time too ([`runtime`]).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

mod outbound;
mod runtime;

pub use outbound::{LedgerMetrics, WebhookMetrics};

use crate::protocol::{EndReason, ErrorCode, ReportReason};

type Label = [(&'static str, &'static str); 1];
type Labelled = Family<Label, Counter>;
type Labelled2 = Family<[(&'static str, &'static str); 2], Counter>;
type LabelledHistogram = Family<Label, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    queue_length: Gauge,
    sessions_active: Gauge,
    pub matches: Counter,
    sessions_ended: Labelled,
    protocol_errors: Labelled,
    handshakes_refused: Labelled,
    disconnects: Labelled,
    match_latency: Histogram,
    redis_call_seconds: Histogram,
    redis_errors: Counter,
    pubsub: Labelled,
    cleanup_runs: Counter,
    cleaned_users: Counter,
    livekit_rooms: Labelled,
    livekit_request_seconds: LabelledHistogram,
    livekit_request_errors: Labelled,
    livekit_webhooks: Labelled,
    pub livekit_sweeps: Counter,
    reports: Labelled,
    bans: Labelled,
    ban_disconnects: Counter,
    pending_connections: Family<Label, Gauge>,
    pending_refused: Labelled2,
    relayed: Labelled,
    /// Detaches waiting for the backend (see `gateway::detach`).
    pub detach_pending: Gauge,
    detach_calls: Labelled,
    tls_reloads: Labelled,
    tls_handshake_failures: Labelled,
    /// The session ledger's (see `ledger`).
    pub ledger: LedgerMetrics,
    /// Outbound webhooks (see `webhooks`).
    pub webhooks: WebhookMetrics,
}

/// Who made a ban.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanSource {
    /// The admin API.
    Admin,
    /// Reports reaching the threshold.
    Reports,
}

impl BanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BanSource::Admin => "admin",
            BanSource::Reports => "reports",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("matchgate");
        let connections = Gauge::default();
        let queue_length = Gauge::default();
        let sessions_active = Gauge::default();
        let matches = Counter::default();
        let sessions_ended = Labelled::default();
        let protocol_errors = Labelled::default();
        let handshakes_refused = Labelled::default();
        let disconnects = Labelled::default();
        // 0.1 ms to ~3.3 s: loopback matches sit at the low end, real waits at the high end.
        let match_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let redis_call_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let redis_errors = Counter::default();
        let pubsub = Labelled::default();
        let cleanup_runs = Counter::default();
        let cleaned_users = Counter::default();
        let livekit_rooms = Labelled::default();
        let livekit_request_seconds: LabelledHistogram =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        let livekit_request_errors = Labelled::default();
        let livekit_webhooks = Labelled::default();
        let livekit_sweeps = Counter::default();
        let reports = Labelled::default();
        let bans = Labelled::default();
        let ban_disconnects = Counter::default();
        let pending_connections = Family::<Label, Gauge>::default();
        let pending_refused = Labelled2::default();
        registry.register(
            "pending_connections",
            "TCP connections that are not WebSockets (yet): sending a request, or idle between \
             keep-alive HTTP requests, by listener (public, internal)",
            pending_connections.clone(),
        );
        registry.register(
            "pending_refused",
            "TCP connections closed at once because a cap on pending connections was reached, \
             by listener and cap: listener (--max-pending-connections), address \
             (--max-pending-per-address)",
            pending_refused.clone(),
        );
        let relayed = Labelled::default();
        registry.register(
            "relayed",
            "Messages clients of this instance relayed to their peers, by kind: signal, chat",
            relayed.clone(),
        );
        let detach_pending = Gauge::default();
        let detach_calls = Labelled::default();
        registry.register(
            "detach_pending",
            "Detaches of closed connections waiting for the matching backend (one per user at most)",
            detach_pending.clone(),
        );
        registry.register(
            "detach_calls",
            "Detach calls to the matching backend, by result: ok, error (one per closed, attached connection, plus retries)",
            detach_calls.clone(),
        );
        registry.register("reports", "Reports users made, by reason", reports.clone());
        registry.register(
            "bans",
            "Bans made through this instance, by source: admin (the admin API), reports (automatic)",
            bans.clone(),
        );
        registry.register(
            "ban_disconnects",
            "Connections this instance closed because a ban named them (close code 4007)",
            ban_disconnects.clone(),
        );
        registry.register(
            "livekit_sweeps",
            "Room sweeps run by this instance (one instance of a deployment holds the sweep lease)",
            livekit_sweeps.clone(),
        );
        registry.register(
            "livekit_rooms",
            "LiveKit rooms by what happened: created, deleted, create_failed (match undone), \
             delete_failed (after retries; the sweep catches it), orphan_found (a room without a session, deleted by the sweep)",
            livekit_rooms.clone(),
        );
        registry.register(
            "livekit_request_seconds",
            "Latency of LiveKit RoomService requests, by method",
            livekit_request_seconds.clone(),
        );
        registry.register(
            "livekit_request_errors",
            "Failed LiveKit RoomService requests (every attempt), by method",
            livekit_request_errors.clone(),
        );
        registry.register(
            "livekit_webhooks",
            "LiveKit webhooks by result: ended, no_session, duplicate, ignored (accepted); \
             unauthorized, bad_request, unavailable (rejected)",
            livekit_webhooks.clone(),
        );
        registry.register(
            "connections",
            "Live WebSocket connections on this instance",
            connections.clone(),
        );
        registry.register(
            "queue_length",
            "Users waiting for a match",
            queue_length.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions in progress",
            sessions_active.clone(),
        );
        registry.register("matches", "Matches made", matches.clone());
        registry.register(
            "sessions_ended",
            "Sessions ended, by the initiator's reason",
            sessions_ended.clone(),
        );
        registry.register(
            "protocol_errors",
            "Error frames sent to clients, by code",
            protocol_errors.clone(),
        );
        registry.register(
            "handshakes_refused",
            "WebSocket upgrades refused, by reason",
            handshakes_refused.clone(),
        );
        registry.register(
            "disconnects",
            "Connections closed by the server, by close code",
            disconnects.clone(),
        );
        registry.register(
            "match_latency_seconds",
            "Time from enqueue to matched, per matched user",
            match_latency.clone(),
        );
        registry.register(
            "redis_call_seconds",
            "Latency of matching calls to Redis (Redis mode)",
            redis_call_seconds.clone(),
        );
        registry.register(
            "redis_errors",
            "Failed matching calls to Redis: errors, timeouts, script failures (Redis mode)",
            redis_errors.clone(),
        );
        registry.register(
            "pubsub_messages",
            "Pub/sub messages published by this instance's calls (out) and received (in) (Redis mode)",
            pubsub.clone(),
        );
        registry.register(
            "cleanup_runs",
            "Heartbeat ticks that cleaned up after dead instances or expired held states (Redis mode)",
            cleanup_runs.clone(),
        );
        registry.register(
            "cleanup_users",
            "Users of dead instances marked disconnected, plus held states expired, by this instance (Redis mode)",
            cleaned_users.clone(),
        );
        // Every label value shows up from the start, so dashboards see zeros, not gaps.
        for reason in [
            EndReason::Skip,
            EndReason::End,
            EndReason::Timeout,
            EndReason::MediaDisconnected,
            EndReason::EndedByModerator,
        ] {
            let _ = sessions_ended.get_or_create(&[("reason", reason.as_str())]);
        }
        for direction in ["in", "out"] {
            let _ = pubsub.get_or_create(&[("direction", direction)]);
        }
        for code in ErrorCode::ALL {
            let _ = protocol_errors.get_or_create(&[("code", code.as_str())]);
        }
        for reason in ReportReason::ALL {
            let _ = reports.get_or_create(&[("reason", reason.as_str())]);
        }
        for source in [BanSource::Admin, BanSource::Reports] {
            let _ = bans.get_or_create(&[("source", source.as_str())]);
        }
        let _ = pending_connections.get_or_create(&[("listener", "public")]);
        for cap in ["listener", "address"] {
            let _ = pending_refused.get_or_create(&[("listener", "public"), ("cap", cap)]);
        }
        for kind in ["signal", "chat"] {
            let _ = relayed.get_or_create(&[("kind", kind)]);
        }
        for result in ["ok", "error"] {
            let _ = detach_calls.get_or_create(&[("result", result)]);
        }
        let tls_reloads = Labelled::default();
        let tls_handshake_failures = Labelled::default();
        registry.register(
            "tls_reloads",
            "Reloads of the TLS certificate (native TLS), by result: ok, error (the previous \
             certificate stays in use)",
            tls_reloads.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the public listener that failed, by reason: error, timeout",
            tls_handshake_failures.clone(),
        );
        for result in ["ok", "error"] {
            let _ = tls_reloads.get_or_create(&[("result", result)]);
        }
        for reason in ["error", "timeout"] {
            let _ = tls_handshake_failures.get_or_create(&[("reason", reason)]);
        }
        // The label values dashboards and alerts name show up from the start as well (others
        // appear on first use).
        for reason in [
            "unauthorized",
            "origin",
            "capacity",
            "draining",
            "not_ready",
            "bad_request",
            "banned",
            "rate_limited",
        ] {
            let _ = handshakes_refused.get_or_create(&[("reason", reason)]);
        }
        for code in [
            "1001", "1009", "1011", "1013", "4001", "4002", "4003", "4004", "4005", "4006", "4007",
        ] {
            let _ = disconnects.get_or_create(&[("code", code)]);
        }
        for method in ["CreateRoom", "DeleteRoom", "ListRooms"] {
            let _ = livekit_request_seconds.get_or_create(&[("method", method)]);
            let _ = livekit_request_errors.get_or_create(&[("method", method)]);
        }
        for event in [
            "created",
            "deleted",
            "create_failed",
            "delete_failed",
            "orphan_found",
        ] {
            let _ = livekit_rooms.get_or_create(&[("event", event)]);
        }
        for result in [
            "ended",
            "no_session",
            "duplicate",
            "ignored",
            "unauthorized",
            "bad_request",
            "unavailable",
        ] {
            let _ = livekit_webhooks.get_or_create(&[("result", result)]);
        }
        runtime::register(&mut registry);
        let ledger = LedgerMetrics::register(&mut registry);
        let webhooks = WebhookMetrics::register(&mut registry);
        Metrics {
            ledger,
            webhooks,
            registry,
            connections,
            queue_length,
            sessions_active,
            matches,
            sessions_ended,
            protocol_errors,
            handshakes_refused,
            disconnects,
            match_latency,
            redis_call_seconds,
            redis_errors,
            pubsub,
            cleanup_runs,
            cleaned_users,
            livekit_rooms,
            livekit_request_seconds,
            livekit_request_errors,
            livekit_webhooks,
            livekit_sweeps,
            reports,
            bans,
            ban_disconnects,
            pending_connections,
            pending_refused,
            relayed,
            detach_pending,
            detach_calls,
            tls_reloads,
            tls_handshake_failures,
        }
    }

    pub fn tls_reload(&self, result: &'static str) {
        self.tls_reloads.get_or_create(&[("result", result)]).inc();
    }

    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The gauge of pending connections on the listener `listener`.
    pub fn pending_gauge(&self, listener: &'static str) -> Gauge {
        self.pending_connections
            .get_or_create(&[("listener", listener)])
            .clone()
    }

    pub fn pending_refused(&self, listener: &'static str, cap: &'static str) {
        self.pending_refused
            .get_or_create(&[("listener", listener), ("cap", cap)])
            .inc();
    }

    /// A `signal` or `chat` passed on (its kind: `signal` or `chat`).
    pub fn relayed(&self, kind: &'static str) {
        self.relayed.get_or_create(&[("kind", kind)]).inc();
    }

    pub fn detach_call(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.detach_calls.get_or_create(&[("result", result)]).inc();
    }

    pub fn report(&self, reason: ReportReason) {
        self.reports
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    pub fn ban(&self, source: BanSource) {
        self.bans
            .get_or_create(&[("source", source.as_str())])
            .inc();
    }

    pub fn ban_disconnects(&self, connections: u64) {
        self.ban_disconnects.inc_by(connections);
    }

    pub fn livekit_request(&self, method: &'static str, took: Duration, ok: bool) {
        self.livekit_request_seconds
            .get_or_create(&[("method", method)])
            .observe(took.as_secs_f64());
        if !ok {
            self.livekit_request_errors
                .get_or_create(&[("method", method)])
                .inc();
        }
    }

    pub fn livekit_room(&self, what: &'static str) {
        self.livekit_rooms.get_or_create(&[("event", what)]).inc();
    }

    pub fn livekit_webhook(&self, result: &'static str) {
        self.livekit_webhooks
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub fn redis_call(&self, took: Duration, ok: bool) {
        self.redis_call_seconds.observe(took.as_secs_f64());
        if !ok {
            self.redis_errors.inc();
        }
    }

    pub fn pubsub_published(&self, n: u64) {
        if n > 0 {
            self.pubsub.get_or_create(&[("direction", "out")]).inc_by(n);
        }
    }

    pub fn pubsub_received(&self) {
        self.pubsub.get_or_create(&[("direction", "in")]).inc();
    }

    pub fn cleanup(&self, users: u64) {
        if users > 0 {
            self.cleanup_runs.inc();
            self.cleaned_users.inc_by(users);
        }
    }

    pub fn session_ended(&self, reason: EndReason) {
        self.sessions_ended
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    pub fn protocol_error(&self, code: ErrorCode) {
        self.protocol_errors
            .get_or_create(&[("code", code.as_str())])
            .inc();
    }

    pub fn handshake_refused(&self, reason: &'static str) {
        self.handshakes_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn disconnect(&self, code: &'static str) {
        self.disconnects.get_or_create(&[("code", code)]).inc();
    }

    pub fn matched_after(&self, waited: Duration) {
        self.match_latency.observe(waited.as_secs_f64());
    }

    /// Renders the Prometheus text format with the matching gauges set to the users waiting
    /// in queues and the sessions (the engine's stats: metrics do not depend on the engines,
    /// the Redis one of which counts its calls here).
    pub fn render(&self, queued: u64, sessions: u64) -> String {
        self.queue_length.set(queued as i64);
        self.sessions_active.set(sessions as i64);
        let mut out = String::new();
        let encoded = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|()| runtime::encode_process(&mut out))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out));
        encoded.expect("writing to a String cannot fail");
        out
    }
}
