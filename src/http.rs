//! HTTP endpoints: health, readiness, metrics, the dev token endpoint, the admin API, and the
//! WebSocket handshake, where every check (attempts per address, origin, token, bans,
//! capacity) happens before the upgrade.
//!
//! The client address is the TCP peer address, or behind `--trusted-proxies` the nearest
//! untrusted hop of `X-Forwarded-For` (see [`client_ip`]); the per-address limit and address
//! bans count it as [`AddressKeys`] say (an IPv6 client by its prefix).
//!
//! [`HttpConfig`] is the HTTP section of the configuration; the server reads it too (the
//! limits of its listeners, the drain), and it lives here so that the server stays the one
//! module that uses the whole configuration.

mod admin;
mod client_ip;
mod connect_limit;
pub mod demo;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::address::AddressKeys;
use crate::auth::{AuthError, Authenticator, DevTokenError};
use crate::connection::{Connection, Settings};
use crate::flags::{count, millis};
use crate::gateway::Gateway;
use crate::ids::ConnId;
use crate::matching::Resume;
use crate::moderation::Identity;
use crate::privacy;
use crate::shutdown::Shutdown;

pub use connect_limit::ConnectLimiter;

/// The HTTP section of the configuration: who may connect, how many, and how long a request
/// head or a drain may take.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Comma-separated `Origin` values allowed to open WebSockets (browsers). Empty: any origin.
    /// Requests without an `Origin` header (mobile apps) are always allowed.
    #[arg(
        long,
        env = "MATCHGATE_ALLOWED_ORIGINS",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = parse_origin
    )]
    pub allowed_origins: Vec<String>,

    /// Load balancers and proxies (IPs or CIDRs, comma-separated) whose `X-Forwarded-For` is
    /// believed: behind them the client address (for the per-address limit, address bans and
    /// logs) is the nearest untrusted hop of that header. Without it, the TCP peer.
    #[arg(
        long,
        env = "MATCHGATE_TRUSTED_PROXIES",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = parse_net
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Most concurrent WebSocket connections; beyond it the upgrade is refused with 503.
    #[arg(
        long,
        env = "MATCHGATE_MAX_CONNECTIONS",
        default_value = "100000",
        value_parser = count(1..)
    )]
    pub max_connections: usize,

    /// Longest time a client may take to send a request head (request line and headers), in
    /// ms; a slower one is disconnected. Also how long an idle keep-alive HTTP connection is
    /// kept open between requests.
    #[arg(
        long,
        env = "MATCHGATE_HTTP_HEAD_TIMEOUT_MS",
        default_value = "10000",
        value_parser = millis(100..=60_000)
    )]
    pub http_head_timeout_ms: Duration,

    /// Largest request head (request line and headers) in bytes; a larger one gets 431.
    #[arg(
        long,
        env = "MATCHGATE_HTTP_MAX_HEAD_BYTES",
        default_value = "16384",
        value_parser = count(1024..=1 << 20)
    )]
    pub http_max_head_bytes: usize,

    /// Most TCP connections on this instance that have not become WebSockets (yet): still
    /// sending a request, or idle between keep-alive HTTP requests. Beyond it new connections
    /// get 503 and are closed at once.
    #[arg(
        long,
        env = "MATCHGATE_MAX_PENDING_CONNECTIONS",
        default_value = "10000",
        value_parser = count(1..)
    )]
    pub max_pending_connections: usize,

    /// Most such connections from one client address (the TCP peer, counted like the other
    /// per-address limits; peers in `--trusted-proxies` are exempt). Beyond it new connections
    /// from that address get 429 and are closed at once.
    #[arg(
        long,
        env = "MATCHGATE_MAX_PENDING_PER_ADDRESS",
        default_value = "64",
        value_parser = count(1..)
    )]
    pub max_pending_per_address: usize,

    /// IPv6 clients count by this many leading bits of their address (a provider gives each
    /// subscriber a whole prefix), for the per-address limits and address bans. 32 to 128.
    #[arg(
        long,
        env = "MATCHGATE_IPV6_PREFIX_LEN",
        default_value = "64",
        value_parser = clap::value_parser!(u8).range(32..=128)
    )]
    pub ipv6_prefix_len: u8,

    /// WebSocket connection attempts allowed per client IP and minute (HTTP 429 beyond).
    #[arg(
        long,
        env = "MATCHGATE_IP_CONNECTS_PER_MINUTE",
        default_value = "60",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub ip_connects_per_minute: u32,

    /// How long a graceful shutdown waits for connections to close, in ms.
    #[arg(
        long,
        env = "MATCHGATE_DRAIN_TIMEOUT_MS",
        default_value = "10000",
        value_parser = millis(..)
    )]
    pub drain_timeout_ms: Duration,
}

/// A browser origin: scheme and host, no path.
fn parse_origin(s: &str) -> Result<String, String> {
    if (s.starts_with("http://") || s.starts_with("https://")) && !s.ends_with('/') {
        Ok(s.to_string())
    } else {
        Err("entries look like https://app.example.com".into())
    }
}

/// An IP network, or a single address as the network of just that address.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR network"))
}

/// Shared state of the HTTP layer.
pub struct App {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Authenticator>,
    pub settings: Arc<Settings>,
    pub allowed_origins: Vec<String>,
    pub connection_slots: Arc<Semaphore>,
    /// WebSocket connection attempts per client address.
    pub connect_limiter: ConnectLimiter,
    /// With it, the admin API exists.
    pub admin_token: Option<String>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How client addresses count for the per-address limit and bans.
    pub addresses: AddressKeys,
    pub shutdown: watch::Receiver<bool>,
    /// The server's tasks: every WebSocket connection holds a token, and the drain waits for
    /// them.
    pub tasks: TaskTracker,
    /// Connection ids: a random instance prefix in the high bits keeps them unique across
    /// instances, a counter in the low bits keeps them unique here.
    pub next_conn: AtomicU64,
}

/// The routes of the public listener and, with `internal`, those of the internal listener:
/// `/metrics` and the admin API are served on the internal one if there is one, else on the
/// public one; the health endpoints on both.
pub fn routers(app: &Arc<App>, internal: bool) -> (Router, Option<Router>) {
    let health = || {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
    };
    let mut operators = Router::new().route("/metrics", get(metrics));
    if let Some(token) = &app.admin_token {
        operators = operators.merge(admin::routes(token));
    }
    let mut public = health().route("/v1/ws", get(ws_handshake));
    if app.auth.mints_dev_tokens() {
        public = public.route("/v1/dev/token", post(dev_token));
    }
    if app.gateway.livekit_mode() {
        public = public.route(
            "/v1/livekit/webhook",
            post(livekit_webhook).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES)),
        );
    }
    if internal {
        (
            public.with_state(app.clone()),
            Some(health().merge(operators).with_state(app.clone())),
        )
    } else {
        (public.merge(operators).with_state(app.clone()), None)
    }
}

/// LiveKit's webhook bodies are a few KiB at most.
const MAX_WEBHOOK_BYTES: usize = 64 * 1024;

/// LiveKit signs the exact body bytes, so they are passed on untouched.
async fn livekit_webhook(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(body) = std::str::from_utf8(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not UTF-8\n").into_response();
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (status, text) = app.gateway.livekit_webhook(body, authorization).await;
    (status, format!("{text}\n")).into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.gateway.ready().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = app.gateway.metrics_text().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn refusal(status: StatusCode, error: &str, reason: &str) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": error, "reason": reason })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    device_id: String,
    /// Claims that become attributes (each one of `--attribute-claims`), so that a developer
    /// can try filters without an identity provider.
    #[serde(default)]
    attributes: serde_json::Map<String, serde_json::Value>,
}

/// Reads a request body that must be a JSON object: serde would also read a struct from an
/// array.
fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice::<serde_json::Value>(body).and_then(|v| {
        if v.is_object() {
            serde_json::from_value::<T>(v)
        } else {
            Err(serde::de::Error::custom("not a JSON object"))
        }
    })
}

async fn dev_token(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let request = match json_object::<DevTokenRequest>(&body) {
        Ok(r) => r,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                    "body must be {{\"device_id\": \"...\", \"attributes\": {{...}}}} (attributes optional): {e}"
                ),
            )
        }
    };
    let id = &request.device_id;
    let valid = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !valid {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "device_id must be 1 to 128 characters of A-Z a-z 0-9 - _ . :",
        );
    }
    match app.auth.mint_dev_token(id, &request.attributes) {
        Ok((token, ttl)) => Json(serde_json::json!({
            "access_token": token,
            "expires_in": ttl,
            "user_id": format!("dev-{id}"),
        }))
        .into_response(),
        Err(DevTokenError::NotDevMode) => StatusCode::NOT_FOUND.into_response(),
        Err(e @ DevTokenError::Attribute(_)) => {
            refusal(StatusCode::BAD_REQUEST, "bad_request", &e.to_string())
        }
    }
}

#[derive(Deserialize)]
struct WsQuery {
    access_token: Option<String>,
    resume: Option<String>,
    last_seq: Option<String>,
}

/// The token from `Authorization: Bearer` or, for browsers, the `access_token` parameter.
fn bearer_token<'a>(headers: &'a HeaderMap, query: &'a WsQuery) -> Result<&'a str, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        return match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
            _ => Err(AuthError::Malformed),
        };
    }
    query.access_token.as_deref().ok_or(AuthError::Missing)
}

async fn ws_handshake(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let gateway = &app.gateway;
    let ip = client_ip::client_ip(peer.ip(), &headers, &app.trusted_proxies);
    let address = app.addresses.key(ip);
    if let Err(refused) = app.connect_limiter.attempt(address) {
        tracing::debug!(ip = %privacy::shown(ip), "too many connection attempts");
        if refused.shared {
            tracing::warn!(
                address = %privacy::shown(address),
                "connection attempts refused (429) from an address that authenticated as many \
                 different users lately: it is probably a load balancer or proxy. List it in \
                 MATCHGATE_TRUSTED_PROXIES so that clients are told apart by X-Forwarded-For \
                 (or raise MATCHGATE_IP_CONNECTS_PER_MINUTE)"
            );
        }
        gateway.metrics.handshake_refused("rate_limited");
        return rate_limited(refused.wait);
    }
    let Ok(Query(query)) = query else {
        gateway.metrics.handshake_refused("bad_request");
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "malformed query string",
        );
    };
    if !app.allowed_origins.is_empty() {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| app.allowed_origins.iter().any(|a| a == o));
            if !allowed {
                gateway.metrics.handshake_refused("origin");
                return refusal(StatusCode::FORBIDDEN, "forbidden", "origin not allowed");
            }
        }
    }
    let verified = match bearer_token(&headers, &query) {
        Ok(token) => app.auth.verify(token).await,
        Err(e) => Err(e),
    };
    let claims = match verified {
        Ok(claims) => claims,
        Err(e) => {
            // The reason is safe to log and to return: it never includes the token.
            tracing::debug!(reason = %e, "handshake refused");
            gateway.metrics.handshake_refused("unauthorized");
            return refusal(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
        }
    };
    app.connect_limiter.authenticated(address, &claims.sub);
    let resume = match (query.resume, query.last_seq) {
        (None, _) => None,
        (Some(token), None) => Some(Resume { token, last_seq: 0 }),
        (Some(token), Some(seq)) => match seq.parse() {
            Ok(last_seq) => Some(Resume { token, last_seq }),
            Err(_) => {
                gateway.metrics.handshake_refused("bad_request");
                return refusal(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "last_seq must be a non-negative integer",
                );
            }
        },
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    if *app.shutdown.borrow() {
        gateway.metrics.handshake_refused("draining");
        return unavailable("draining");
    }
    if !gateway.subscribed() {
        gateway.metrics.handshake_refused("not_ready");
        return unavailable("not ready");
    }
    let networks = app.addresses.covering(ip);
    let identity = Identity {
        user: &claims.sub,
        device: claims.device_id.as_deref(),
        networks: &networks,
    };
    let unchecked = match gateway.moderation.ban_of(&identity).await {
        Ok(None) => None,
        Ok(Some(ban)) => {
            tracing::debug!(
                user = %privacy::shown(&claims.sub),
                ip = %privacy::shown(ip),
                ban = ban.kind.as_str(),
                "banned client refused"
            );
            gateway.metrics.handshake_refused("banned");
            return refusal(StatusCode::FORBIDDEN, "banned", ban.refusal_reason());
        }
        // Not let in: a ban that holds only while the backend answers would be no ban. The
        // client is told as when the matching backend is down (usually it is as well):
        // `error` `unavailable`, then 1013.
        Err(e) => {
            tracing::warn!(error = %e, "cannot check bans");
            Some(e.into())
        }
    };
    let Ok(permit) = app.connection_slots.clone().try_acquire_owned() else {
        gateway.metrics.handshake_refused("capacity");
        return unavailable("connection limit reached");
    };

    let connection = Connection {
        gateway: app.gateway.clone(),
        settings: app.settings.clone(),
        user: claims.sub.into(),
        auth: app.auth.clone(),
        token_exp: claims.exp,
        attributes: claims.attributes,
        id: ConnId(app.next_conn.fetch_add(1, Ordering::Relaxed)),
        ip,
        device: claims.device_id.map(Into::into),
        unchecked,
        resume,
        shutdown: Shutdown::new(app.shutdown.clone()),
        _tracked: app.tasks.token(),
        _permit: permit,
    };
    // Boxed before the upgrade task takes it: that task keeps the closure's slot for its
    // whole life, and a box is one pointer there.
    let connection = Box::new(connection);
    let s = &app.settings;
    upgrade
        // tungstenite's defaults (128 KiB read buffer allocated per connection, 64 MiB
        // messages) would dwarf everything else an idle connection costs. Client frames are
        // small (an `enqueue` is about 100 bytes); a larger one grows the buffer to fit, and
        // is read 512 bytes at a time (a 2 KiB signal in four reads).
        .read_buffer_size(512)
        // Frames are written when the connection flushes (once per batch of queued frames,
        // see `Connection`), not one by one; nothing is allocated up front.
        .write_buffer_size(crate::connection::BATCH_BYTES)
        .max_write_buffer_size(s.max_frame_bytes().max(64 * 1024) * 4)
        .max_message_size(s.max_frame_bytes())
        .max_frame_size(s.max_frame_bytes())
        .on_upgrade(move |ws| connection.run(Box::new(ws)))
}

/// 429 with when to try again, in the `Retry-After` header (whole seconds, rounded up) and in
/// the body (ms).
fn rate_limited(wait: std::time::Duration) -> Response {
    let retry_after_ms = wait.as_millis() as u64 + 1;
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(serde_json::json!({ "error": "rate_limited", "retry_after_ms": retry_after_ms })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, retry_after_ms.div_ceil(1000).into());
    response
}

fn unavailable(reason: &str) -> Response {
    let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, "unavailable", reason);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}
