//! The admin API under `/v1/admin/`: bans of users, devices and IP addresses or ranges.
//!
//! It exists only when `--admin-token` is set (otherwise its routes are not there: 404), and
//! every request must carry that token as `Authorization: Bearer`; the comparison takes the
//! same time whatever the presented token, so it cannot be guessed byte by byte.
//!
//! - `POST /v1/admin/bans` `{"kind", "value", "ttl_s", "reason"?}` → 201 with the ban;
//! - `DELETE /v1/admin/bans/{kind}/{value}` → 204, or 404 when no such ban is in force;
//! - `GET /v1/admin/bans` → `{"bans": [...]}`, the bans in force.
//!
//! Reports ([`reports`]), ending sessions ([`sessions`]) and the deployment's figures
//! ([`stats`]) have modules of their own behind the same guard.

mod reports;
mod sessions;
mod stats;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{json_object, refusal, unavailable, App};
use crate::address::AddressKeys;
use crate::metrics::BanSource;
use crate::moderation::{Ban, BanKind, ModerationError};
use crate::privacy;

/// Admin requests are a few hundred bytes.
const MAX_BODY_BYTES: usize = 8 * 1024;

/// Longest ban: ten years.
const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// Longest ban reason, in characters.
const MAX_REASON_CHARS: usize = 200;

/// The admin routes, guarded by `token`.
pub(super) fn routes(token: &str) -> Router<Arc<App>> {
    let expected = Arc::new(digest(token));
    Router::new()
        .route("/v1/admin/bans", get(list_bans).post(create_ban))
        .route("/v1/admin/bans/{kind}/{value}", delete(delete_ban))
        .merge(reports::routes())
        .merge(sessions::routes())
        .merge(stats::routes())
        .route_layer(middleware::from_fn(move |request, next| {
            authorize(expected.clone(), request, next)
        }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lets the request through only with the admin token. Digests of equal length are compared
/// without an early exit, so the time taken says nothing about the token.
async fn authorize(expected: Arc<[u8; 32]>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| digest(token.trim()));
    let allowed = presented.is_some_and(|p| {
        p.iter()
            .zip(expected.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    });
    if allowed {
        return next.run(request).await;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": "unauthorized" })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn bad_request(reason: &str) -> Response {
    refusal(StatusCode::BAD_REQUEST, "bad_request", reason)
}

fn backend_down(e: ModerationError) -> Response {
    tracing::warn!(error = %e, "admin request failed");
    unavailable("moderation backend unavailable")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBan {
    kind: BanKind,
    value: String,
    /// Any number, so that a fraction or a negative one gets a message of its own.
    ttl_s: serde_json::Number,
    #[serde(default)]
    reason: Option<String>,
}

impl NewBan {
    /// The ban asked for, or what is wrong with the request.
    fn into_ban(self, addresses: &AddressKeys) -> Result<Ban, String> {
        let Some(ttl_s) = self.ttl_s.as_u64().filter(|s| (1..=MAX_TTL_S).contains(s)) else {
            return Err(format!(
                "ttl_s must be a whole number of seconds from 1 to {MAX_TTL_S} (ten years)"
            ));
        };
        if self
            .reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON_CHARS)
        {
            return Err(format!(
                "reason must be at most {MAX_REASON_CHARS} characters"
            ));
        }
        let value = self.kind.canonical(&self.value, addresses)?;
        let reason = self.reason.filter(|r| !r.is_empty());
        Ok(Ban::new(
            self.kind,
            value,
            reason,
            Duration::from_secs(ttl_s),
        ))
    }
}

async fn create_ban(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    // Too large a body (413) gets a JSON answer like every other refusal.
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return refusal(rejection.status(), "bad_request", &rejection.body_text())
        }
    };
    let ban = match json_object::<NewBan>(&body)
        .map_err(|e| {
            format!("invalid ban (expected {{\"kind\", \"value\", \"ttl_s\", \"reason\"?}}): {e}")
        })
        .and_then(|ban| ban.into_ban(&app.addresses))
    {
        Ok(ban) => ban,
        Err(reason) => return bad_request(&reason),
    };
    if let Err(e) = app.gateway.moderation.ban(&ban).await {
        return backend_down(e);
    }
    app.gateway.metrics.ban(BanSource::Admin);
    if let Some(ledger) = &app.gateway.ledger {
        ledger.ban(&ban, BanSource::Admin);
    }
    app.gateway
        .notify(|| crate::webhooks::Event::user_banned(&ban, BanSource::Admin));
    tracing::info!(
        kind = ban.kind.as_str(),
        value = %privacy::shown(&ban.value),
        until_ms = ban.until_ms,
        "banned through the admin API"
    );
    (StatusCode::CREATED, Json(ban)).into_response()
}

async fn delete_ban(
    State(app): State<Arc<App>>,
    Path((kind, value)): Path<(String, String)>,
) -> Response {
    let Some(kind) = BanKind::parse(&kind) else {
        return bad_request("kind must be user, device or ip");
    };
    let canonical = match kind.canonical(&value, &app.addresses) {
        Ok(canonical) => canonical,
        Err(reason) => return bad_request(&reason),
    };
    let moderation = &app.gateway.moderation;
    let mut lifted = moderation.unban(kind, &canonical).await;
    let mut lifted_value = canonical.clone();
    // A ban of one IPv6 address made before addresses counted by prefix is stored as that
    // address.
    if let (Ok(false), Ok(IpAddr::V6(exact))) = (&lifted, value.parse::<IpAddr>()) {
        if exact.to_ipv4_mapped().is_none() {
            lifted_value = exact.to_string();
            lifted = moderation.unban(kind, &lifted_value).await;
        }
    }
    match lifted {
        Ok(true) => {
            if let Some(ledger) = &app.gateway.ledger {
                ledger.unban(kind, &lifted_value);
            }
            tracing::info!(
                kind = kind.as_str(),
                value = %privacy::shown(&canonical),
                "ban lifted through the admin API"
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => refusal(StatusCode::NOT_FOUND, "not_found", "no such ban in force"),
        Err(e) => backend_down(e),
    }
}

async fn list_bans(State(app): State<Arc<App>>) -> Response {
    match app.gateway.moderation.bans().await {
        Ok(bans) => Json(serde_json::json!({ "bans": bans })).into_response(),
        Err(e) => backend_down(e),
    }
}
