//! Ending a live session through the admin API: `POST /v1/admin/sessions/{id}/end` → 200
//! `{"session_id", "ended": true}`; both members get `session_ended` with reason
//! `ended_by_moderator` and neither is re-queued. 404 when no live session has that id (also
//! when it already ended: asking twice ends it once).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::bad_request;
use crate::http::{refusal, unavailable, App};

/// Session ids are short random strings; anything longer is not one.
const MAX_SESSION_ID_BYTES: usize = 128;

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/admin/sessions/{id}/end", post(end))
}

async fn end(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if id.is_empty() || id.len() > MAX_SESSION_ID_BYTES || id.bytes().any(|b| b.is_ascii_control())
    {
        return bad_request(&format!(
            "a session id is 1 to {MAX_SESSION_ID_BYTES} bytes without control characters"
        ));
    }
    match app.gateway.moderator_end(&id).await {
        Ok(true) => {
            tracing::info!(session = %id, "session ended through the admin API");
            Json(serde_json::json!({ "session_id": id, "ended": true })).into_response()
        }
        Ok(false) => refusal(
            StatusCode::NOT_FOUND,
            "not_found",
            "no live session with this id",
        ),
        Err(e) => {
            tracing::warn!(error = %e, "admin session end failed");
            unavailable("matching backend unavailable")
        }
    }
}
