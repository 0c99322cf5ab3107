//! Admin API requests for the tests: the token test servers run with, and a request helper
//! that answers with the status and the JSON body.

use serde_json::Value;

use super::{http_request, TestServer};

/// The admin token of the test servers (`--admin-token`).
pub const ADMIN_TOKEN: &str = "admin-token-admin-token-admin-token!";

/// An admin request with the test token; returns the status and the JSON body (`Null` when
/// there is none).
pub async fn admin(server: &TestServer, method: &str, path: &str, body: &str) -> (u16, Value) {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let headers = [("authorization", bearer.as_str())];
    let (status, text) = http_request(server.addr, method, path, &headers, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
