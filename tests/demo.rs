//! The demo page: served in dev mode or with `--demo`, absent (404) otherwise; every file it
//! loads is the one in the repository, with its content type and the security headers. The
//! page itself is driven in a real browser by `tests/browser/`.

mod common;

use std::net::SocketAddr;

use common::{http_exchange, http_get, TestServer};

/// Every path the demo serves, with its file in the repository and its content type.
const FILES: [(&str, &str, &str); 4] = [
    ("/", "clients/demo/index.html", "text/html; charset=utf-8"),
    (
        "/demo/app.js",
        "clients/demo/app.js",
        "text/javascript; charset=utf-8",
    ),
    (
        "/demo/style.css",
        "clients/demo/style.css",
        "text/css; charset=utf-8",
    ),
    (
        "/demo/matchgate.js",
        "clients/js/dist/index.js",
        "text/javascript; charset=utf-8",
    ),
];

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn assert_demo_served(addr: SocketAddr) {
    for (path, file, content_type) in FILES {
        let response = http_exchange(addr, "GET", path, &[], "").await;
        assert_eq!(response.status, 200, "GET {path}");
        assert_eq!(response.body, repo_file(file), "GET {path} is {file}");
        assert_eq!(response.headers["content-type"], content_type, "{path}");
        assert_eq!(response.headers["x-content-type-options"], "nosniff");
        let csp = &response.headers["content-security-policy"];
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            // The SDK's heartbeat Worker, made from a blob: URL.
            "worker-src blob:",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} in {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
    }
}

async fn assert_demo_absent(addr: SocketAddr) {
    for (path, _, _) in FILES {
        assert_eq!(http_get(addr, path).await.0, 404, "GET {path}");
    }
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
}

#[tokio::test]
async fn dev_mode_serves_the_demo_page() {
    let server = TestServer::start_raw(&[]).await;
    assert_demo_served(server.addr).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_gateway_with_a_key_has_no_demo_page_unless_asked() {
    let server = TestServer::start(&[]).await;
    assert_demo_absent(server.addr).await;
    server.shutdown().await;

    let server = TestServer::start(&["--demo"]).await;
    assert_demo_served(server.addr).await;
    // The page does not open dev mode: tokens still come from the app's backend.
    let (status, _) = common::http_request(
        server.addr,
        "POST",
        "/v1/dev/token",
        &[("content-type", "application/json")],
        r#"{"device_id":"a"}"#,
    )
    .await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn everything_the_page_loads_is_served() {
    let server = TestServer::start_raw(&[]).await;
    let html = repo_file("clients/demo/index.html");
    let app = repo_file("clients/demo/app.js");
    // Local references: `src="/..."`, `href="/..."` in the page, `from "/..."` in the script.
    let mut referenced = Vec::new();
    for (text, marker) in [(&html, "src=\""), (&html, "href=\""), (&app, "from \"")] {
        for piece in text.split(marker).skip(1) {
            let target = piece.split('"').next().unwrap();
            if target.starts_with('/') {
                referenced.push(target.to_string());
            }
        }
    }
    for expected in ["/demo/app.js", "/demo/style.css", "/demo/matchgate.js"] {
        assert!(
            referenced.iter().any(|r| r == expected),
            "{expected} in {referenced:?}"
        );
    }
    for path in &referenced {
        assert_eq!(http_get(server.addr, path).await.0, 200, "GET {path}");
    }
    assert_eq!(http_get(server.addr, "/demo/nothing.js").await.0, 404);
    let (status, _) = common::http_request(server.addr, "POST", "/", &[], "").await;
    assert_eq!(status, 405);
    server.shutdown().await;
}
