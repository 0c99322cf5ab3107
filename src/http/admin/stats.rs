//! The deployment at a glance through the admin API: `GET /v1/admin/stats` →
//! `{"instances": [{"instance", "connections"}], "pools": [{"pool", "waiting",
//! "estimated_wait_ms"}], "sessions", "matches": {"last_minute", "this_minute"}}`. In Redis
//! mode it covers every instance alive (from what Redis keeps); in memory mode the one
//! instance, named `local`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::http::{unavailable, App};

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/admin/stats", get(stats))
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let overview = match app.gateway.overview().await {
        Ok(overview) => overview,
        Err(e) => {
            tracing::warn!(error = %e, "admin stats failed");
            return unavailable("matching backend unavailable");
        }
    };
    let instances = if overview.instances.is_empty() {
        vec![(
            "local".to_string(),
            app.gateway.metrics.connections.get().max(0) as u64,
        )]
    } else {
        overview.instances
    };
    Json(json!({
        "instances": instances
            .iter()
            .map(|(instance, connections)| json!({ "instance": instance, "connections": connections }))
            .collect::<Vec<_>>(),
        "pools": overview
            .pools
            .iter()
            .map(|p| json!({
                "pool": p.pool,
                "waiting": p.waiting,
                "estimated_wait_ms": p.estimated_wait_ms,
            }))
            .collect::<Vec<_>>(),
        "sessions": overview.sessions,
        "matches": {
            "last_minute": overview.matches.last_minute,
            "this_minute": overview.matches.this_minute,
        },
    }))
    .into_response()
}
