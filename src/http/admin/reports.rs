//! Reviewing reports through the admin API:
//!
//! - `GET /v1/admin/reports?user=&reason=&state=&since_ms=&until_ms=&cursor=&limit=` →
//!   `{"reports": [...], "next_cursor"}`, newest first. `user` matches the reporter or the
//!   reported user; `since_ms` is inclusive, `until_ms` exclusive; `limit` is 1 to 200
//!   (default 50). A page may hold fewer than `limit` reports while `next_cursor` is not null
//!   (each call looks at a bounded number of reports); `next_cursor` is null at the end.
//! - `POST /v1/admin/reports/{id}/resolve` and `.../dismiss` → the report as it now stands;
//!   the same decision again changes nothing, 404 when there is no such report.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{backend_down, bad_request};
use crate::http::{refusal, App};
use crate::moderation::review::{
    ReportId, ReportQuery, ReviewState, StoredReport, DEFAULT_PAGE, MAX_PAGE,
};
use crate::protocol::ReportReason;

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/admin/reports", get(list))
        .route("/v1/admin/reports/{id}/resolve", post(resolve))
        .route("/v1/admin/reports/{id}/dismiss", post(dismiss))
}

async fn resolve(app: State<Arc<App>>, id: Path<String>) -> Response {
    review(app, id, ReviewState::Resolved).await
}

async fn dismiss(app: State<Arc<App>>, id: Path<String>) -> Response {
    review(app, id, ReviewState::Dismissed).await
}

/// The query string, every value as text so that each gets a message of its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    user: Option<String>,
    reason: Option<String>,
    state: Option<String>,
    since_ms: Option<String>,
    until_ms: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

impl ListParams {
    fn into_query(self) -> Result<ReportQuery, String> {
        let ms = |name: &str, value: Option<String>| {
            value
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("{name} must be a unix time in ms (got {v:?})"))
                })
                .transpose()
        };
        let user = match self.user {
            Some(u) if !crate::auth::is_valid_id(&u) => {
                return Err(format!(
                    "user must be 1 to {} bytes without control characters",
                    crate::auth::MAX_ID_BYTES
                ))
            }
            u => u.map(Into::into),
        };
        let reason = match self.reason {
            None => None,
            Some(r) => Some(
                ReportReason::ALL
                    .into_iter()
                    .find(|known| known.as_str() == r)
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            ReportReason::ALL.iter().map(|r| r.as_str()).collect();
                        format!("reason must be one of {} (got {r:?})", known.join(", "))
                    })?,
            ),
        };
        let state =
            match self.state {
                None => None,
                Some(s) => Some(ReviewState::parse(&s).ok_or_else(|| {
                    format!("state must be open, resolved or dismissed (got {s:?})")
                })?),
            };
        let since_ms = ms("since_ms", self.since_ms)?;
        let until_ms = ms("until_ms", self.until_ms)?;
        if let (Some(since), Some(until)) = (since_ms, until_ms) {
            if since >= until {
                return Err("since_ms must be before until_ms".into());
            }
        }
        let before = self
            .cursor
            .map(|c| {
                c.parse::<ReportId>()
                    .map_err(|_| format!("cursor {c:?} is not one this API gave"))
            })
            .transpose()?;
        let limit = match self.limit {
            None => DEFAULT_PAGE,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=MAX_PAGE).contains(l))
                .ok_or_else(|| format!("limit must be 1 to {MAX_PAGE} (got {l:?})"))?,
        };
        Ok(ReportQuery {
            user,
            reason,
            state,
            since_ms,
            until_ms,
            before,
            limit,
        })
    }
}

fn report_json(r: &StoredReport) -> Value {
    json!({
        "id": r.id.to_string(),
        "session_id": r.report.session_id,
        "reporter": r.report.reporter,
        "reported": r.report.reported,
        "reason": r.report.reason.as_str(),
        "details": r.report.details,
        "at_ms": r.report.at_ms,
        "state": r.state().as_str(),
        "reviewed_at_ms": r.review.map(|review| review.at_ms),
    })
}

async fn list(
    State(app): State<Arc<App>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let query = match params
        .map_err(|rejection| rejection.body_text())
        .and_then(|Query(params)| params.into_query())
    {
        Ok(query) => query,
        Err(reason) => return bad_request(&reason),
    };
    match app.gateway.moderation.reports(&query).await {
        Ok(page) => Json(json!({
            "reports": page.reports.iter().map(report_json).collect::<Vec<_>>(),
            "next_cursor": page.next.map(|id| id.to_string()),
        }))
        .into_response(),
        Err(e) => backend_down(e),
    }
}

async fn review(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    state: ReviewState,
) -> Response {
    let Ok(id) = id.parse::<ReportId>() else {
        return bad_request(&format!("{id:?} is not a report id (<ms>-<n>)"));
    };
    match app.gateway.moderation.review(id, state).await {
        Ok(Some(report)) => {
            tracing::info!(report = %id, state = state.as_str(), "report reviewed through the admin API");
            Json(report_json(&report)).into_response()
        }
        Ok(None) => refusal(StatusCode::NOT_FOUND, "not_found", "no such report"),
        Err(e) => backend_down(e),
    }
}
