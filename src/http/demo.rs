//! The demo page: a small random video chat built on the JavaScript SDK, compiled into the
//! binary so that `cargo run` alone gives two browser windows a call. Served only in dev mode
//! or with `--demo` (the server merges these routes then; otherwise `/` is a 404).
//!
//! The files are plain ES modules without a build step (`clients/demo/`), plus the SDK's
//! single-file bundle (`clients/js/dist/index.js`) under `/demo/matchgate.js`. Every response
//! carries a Content-Security-Policy that allows only this origin's scripts and styles, the
//! gateway's own WebSocket, the SDK's heartbeat Worker (made from a `blob:` URL) and camera
//! streams, and forbids framing, so the page cannot be turned into anything else.

use axum::http::{header, HeaderName};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../clients/demo/index.html");
const APP_JS: &str = include_str!("../../clients/demo/app.js");
const STYLE_CSS: &str = include_str!("../../clients/demo/style.css");
const SDK_JS: &str = include_str!("../../clients/js/dist/index.js");

/// `connect-src 'self'` covers the same-origin `ws:`/`wss:` WebSocket (CSP Level 3).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; media-src 'self' blob: mediastream:; \
     connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The demo's routes; stateless, so they merge into any router.
pub fn routes() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/demo/app.js",
            get(|| async { page("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/demo/style.css",
            get(|| async { page("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/demo/matchgate.js",
            get(|| async { page("text/javascript; charset=utf-8", SDK_JS) }),
        )
}

/// One embedded file with its type and the security headers. `no-cache` so that a browser
/// asks again after the binary (and with it the page) changed.
fn page(
    content_type: &'static str,
    body: &'static str,
) -> ([(HeaderName, &'static str); 6], &'static str) {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
}
