//! Moderation end to end: the admin API (off without a token, the token checked, input
//! validated), bans by user, device and address (live connections closed with 4007, handshakes
//! refused with 403, lifted again), the listing of bans in force, the per-address limit on
//! connection attempts, reports and the automatic ban they lead to, and bans across instances
//! sharing a Redis (single and Cluster).

mod common;

use std::future::Future;

use common::redis::{RedisCluster, RedisServer};
use common::{http_request, now_secs, sign, Client, Closed, TestServer, PATIENCE, SECRET};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The admin token of the test servers.
const ADMIN: &str = "admin-token-admin-token-admin-token!";

/// A server with the admin API on and `extra` flags.
async fn with_admin(extra: &[&str]) -> TestServer {
    let mut args = vec!["--admin-token", ADMIN];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// An admin request with `token` (none: no `Authorization`); returns the status and the JSON
/// body (`Null` when there is none).
async fn admin_as(
    server: &TestServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let (status, text) = http_request(server.addr, method, path, &headers, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn admin(server: &TestServer, method: &str, path: &str, body: &str) -> (u16, Value) {
    admin_as(server, Some(ADMIN), method, path, body).await
}

/// Bans through the admin API and returns the ban it answers with.
async fn ban(
    server: &TestServer,
    kind: &str,
    value: &str,
    ttl_s: u64,
    reason: Option<&str>,
) -> Value {
    let mut body = json!({"kind": kind, "value": value, "ttl_s": ttl_s});
    if let Some(reason) = reason {
        body["reason"] = json!(reason);
    }
    let (status, ban) = admin(server, "POST", "/v1/admin/bans", &body.to_string()).await;
    assert_eq!(status, 201, "ban refused: {ban}");
    ban
}

/// A token for `user` on `device`.
fn device_token(user: &str, device: &str) -> String {
    sign(
        json!({"sub": user, "device_id": device, "exp": now_secs() + 3600}),
        SECRET,
    )
}

/// The handshake request to `server` with `token`.
fn handshake(server: &TestServer, token: &str) -> http::Request<()> {
    let mut request = server.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Connects as `user` with `token` and reads the `welcome`.
async fn connect_with_token(server: &TestServer, user: &str, token: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(handshake(server, token))
        .await
        .unwrap_or_else(|e| panic!("{user}: handshake fails: {e}"));
    Client::new(ws, user).welcomed().await
}

/// A handshake with `token` that must be refused: the HTTP response.
async fn refused(server: &TestServer, token: &str) -> http::Response<Option<Vec<u8>>> {
    match tokio_tungstenite::connect_async(handshake(server, token)).await {
        Ok(_) => panic!("the handshake should have been refused"),
        Err(tungstenite::Error::Http(response)) => *response,
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// The status and JSON body of a refused handshake.
async fn refusal(server: &TestServer, token: &str) -> (u16, Value) {
    let response = refused(server, token).await;
    let body = response.body().as_deref().unwrap_or_default();
    (
        response.status().as_u16(),
        serde_json::from_slice(body).unwrap_or(Value::Null),
    )
}

/// Asserts that the server closes `client` with 4007 (banned), with no frame before it.
async fn assert_banned_out(client: &mut Client) {
    match client.next().await {
        Err(Closed::Code(code)) => assert_eq!(code, 4007, "{}: close code", client.user),
        other => panic!("{}: expected a close with 4007, got {other:?}", client.user),
    }
}

/// Sends `frame` with `reference` and returns its direct reply, passing over the events that
/// come before it (e.g. `peer_status` when the peer was just banned).
async fn reply(client: &mut Client, mut frame: Value, reference: &str) -> Value {
    frame["ref"] = json!(reference);
    client.send(frame).await;
    loop {
        match client.next().await {
            Ok(frame) if frame["ref"] == reference => return frame,
            Ok(_) => continue,
            Err(closed) => panic!("{}: closed ({closed:?}) instead of replying", client.user),
        }
    }
}

/// Asserts that `client` is still served.
async fn assert_served(client: &mut Client) {
    let status = reply(client, json!({"type": "status"}), "alive").await;
    assert_eq!(status["type"], "status", "{}: {status}", client.user);
}

/// Waits until `condition` holds (polling; no timing is asserted).
async fn eventually<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let wait = async {
        while !condition().await {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("never happened: {what}"));
}

// --- The admin API ---

#[tokio::test]
async fn the_admin_api_does_not_exist_without_a_token() {
    let server = TestServer::start(&[]).await;
    let body = json!({"kind": "user", "value": "u", "ttl_s": 60}).to_string();
    for (method, path, body) in [
        ("GET", "/v1/admin/bans", ""),
        ("POST", "/v1/admin/bans", body.as_str()),
        ("DELETE", "/v1/admin/bans/user/u", ""),
    ] {
        let (status, _) = admin(&server, method, path, body).await;
        assert_eq!(status, 404, "{method} {path}");
    }
}

#[tokio::test]
async fn the_admin_api_refuses_missing_and_forged_tokens() {
    let server = with_admin(&[]).await;
    let forged = ADMIN.replace('!', "?");
    for token in [
        None,
        Some(forged.as_str()),
        Some(""),
        Some(&ADMIN[..ADMIN.len() - 1]),
    ] {
        let (status, body) = admin_as(&server, token, "GET", "/v1/admin/bans", "").await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(body, json!({"error": "unauthorized"}));
    }
    let basic = [("authorization", "Basic YWRtaW46YWRtaW4=")];
    let (status, _) = http_request(server.addr, "GET", "/v1/admin/bans", &basic, "").await;
    assert_eq!(status, 401);
    let ban = json!({"kind": "user", "value": "u", "ttl_s": 60}).to_string();
    let (status, _) = admin_as(&server, Some(&forged), "POST", "/v1/admin/bans", &ban).await;
    assert_eq!(status, 401, "a forged token cannot ban");
    let (status, _) = admin_as(&server, None, "DELETE", "/v1/admin/bans/user/u", "").await;
    assert_eq!(status, 401);
    let (status, body) = admin(&server, "GET", "/v1/admin/bans", "").await;
    assert_eq!((status, body), (200, json!({"bans": []})));
}

#[tokio::test]
async fn the_admin_api_refuses_invalid_input_with_a_reason() {
    let server = with_admin(&[]).await;
    let long_reason = "x".repeat(201);
    let cases = [
        ("not json".to_string(), "invalid ban"),
        ("[1, 2]".to_string(), "not a JSON object"),
        (
            json!({"kind": "group", "value": "g", "ttl_s": 60}).to_string(),
            "unknown variant",
        ),
        (
            json!({"kind": "user", "value": "u"}).to_string(),
            "missing field `ttl_s`",
        ),
        (
            json!({"kind": "user", "value": "u", "ttl_s": 0}).to_string(),
            "ttl_s must be",
        ),
        (
            json!({"kind": "user", "value": "u", "ttl_s": -5}).to_string(),
            "ttl_s must be",
        ),
        (
            json!({"kind": "user", "value": "u", "ttl_s": 1.5}).to_string(),
            "ttl_s must be",
        ),
        (
            json!({"kind": "user", "value": "u", "ttl_s": 400_000_000}).to_string(),
            "ttl_s must be",
        ),
        (
            json!({"kind": "user", "value": "", "ttl_s": 60}).to_string(),
            "user id",
        ),
        (
            json!({"kind": "device", "value": "a\nb", "ttl_s": 60}).to_string(),
            "device id",
        ),
        (
            json!({"kind": "ip", "value": "10.0.0.300", "ttl_s": 60}).to_string(),
            "neither an IP address nor a CIDR range",
        ),
        (
            json!({"kind": "ip", "value": "0.0.0.0/0", "ttl_s": 60}).to_string(),
            "too wide a range",
        ),
        (
            json!({"kind": "ip", "value": "2001::/15", "ttl_s": 60}).to_string(),
            "too wide a range",
        ),
        (
            json!({"kind": "user", "value": "u", "ttl_s": 60, "reason": long_reason}).to_string(),
            "reason must be",
        ),
        (
            json!({"kind": "user", "value": "u", "ttl_s": 60, "until": 5}).to_string(),
            "unknown field",
        ),
    ];
    for (body, expected) in cases {
        let (status, reply) = admin(&server, "POST", "/v1/admin/bans", &body).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(reply["error"], "bad_request", "{body}: {reply}");
        let reason = reply["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(expected),
            "{body}: {reason:?} should mention {expected:?}"
        );
    }
    let huge = json!({"kind": "user", "value": "u", "ttl_s": 60, "reason": "x".repeat(9000)});
    let (status, reply) = admin(&server, "POST", "/v1/admin/bans", &huge.to_string()).await;
    assert_eq!(status, 413, "bodies are small");
    assert_eq!(reply["error"], "bad_request", "{reply}");
    let (status, reply) = admin(&server, "DELETE", "/v1/admin/bans/group/g", "").await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, _) = admin(&server, "DELETE", "/v1/admin/bans/ip/nonsense", "").await;
    assert_eq!(status, 400);
    let (status, reply) = admin(&server, "DELETE", "/v1/admin/bans/user/nobody", "").await;
    assert_eq!((status, reply["error"].as_str()), (404, Some("not_found")));
    let (_, list) = admin(&server, "GET", "/v1/admin/bans", "").await;
    assert_eq!(list, json!({"bans": []}), "nothing was banned");
}

// --- Bans ---

#[tokio::test]
async fn a_banned_user_is_closed_out_and_refused_until_the_ban_is_lifted() {
    let server = with_admin(&[]).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    common::match_up(&mut alice, &mut bob).await;

    let made = ban(&server, "user", "alice", 3600, Some("spam")).await;
    assert_eq!(made["kind"], "user");
    assert_eq!(made["value"], "alice");
    assert_eq!(made["reason"], "spam");
    let until = made["until_ms"].as_u64().expect("until_ms");
    assert!(
        until > now_secs() * 1000 + 3_000_000,
        "about an hour from now: {made}"
    );
    assert_banned_out(&mut alice).await;
    assert_served(&mut bob).await;

    let (status, body) = refusal(&server, &common::token("alice")).await;
    assert_eq!(status, 403);
    assert_eq!(body, json!({"error": "banned", "reason": "spam"}));
    let (_, list) = admin(&server, "GET", "/v1/admin/bans", "").await;
    assert_eq!(list, json!({"bans": [made]}));

    let metrics = server.metrics().await;
    for (name, value) in [
        (r#"matchgate_bans_total{source="admin"}"#, 1.0),
        (r#"matchgate_bans_total{source="reports"}"#, 0.0),
        ("matchgate_ban_disconnects_total", 1.0),
        (
            r#"matchgate_handshakes_refused_total{reason="banned"}"#,
            1.0,
        ),
        (r#"matchgate_disconnects_total{code="4007"}"#, 1.0),
    ] {
        assert_eq!(common::metric_value(&metrics, name), Some(value), "{name}");
    }

    let (status, _) = admin(&server, "DELETE", "/v1/admin/bans/user/alice", "").await;
    assert_eq!(status, 204);
    let (status, _) = admin(&server, "DELETE", "/v1/admin/bans/user/alice", "").await;
    assert_eq!(status, 404, "already lifted");
    let mut alice = server.connect("alice").await;
    assert_served(&mut alice).await;
}

#[tokio::test]
async fn bans_by_device_and_by_address() {
    let server = with_admin(&[]).await;
    let mut carol = connect_with_token(&server, "carol", &device_token("carol", "phone-7")).await;
    let mut dave = server.connect("dave").await;

    // The device id comes from the token: another account on the same device is refused too.
    ban(&server, "device", "phone-7", 3600, None).await;
    assert_banned_out(&mut carol).await;
    assert_served(&mut dave).await;
    let (status, body) = refusal(&server, &device_token("erin", "phone-7")).await;
    assert_eq!(status, 403);
    assert_eq!(body, json!({"error": "banned", "reason": "device"}));
    let mut erin = connect_with_token(&server, "erin", &device_token("erin", "tablet-1")).await;

    // Addresses are stored canonically: the IPv4-mapped form names 127.0.0.1.
    let made = ban(&server, "ip", "::ffff:127.0.0.1", 3600, Some("abuse")).await;
    assert_eq!(made["value"], "127.0.0.1");
    assert_banned_out(&mut dave).await;
    assert_banned_out(&mut erin).await;
    let (status, body) = refusal(&server, &common::token("frank")).await;
    assert_eq!((status, body["reason"].as_str()), (403, Some("abuse")));
    assert_eq!(server.metric("matchgate_ban_disconnects_total").await, 3.0);

    let (status, _) = admin(&server, "DELETE", "/v1/admin/bans/ip/127.0.0.1", "").await;
    assert_eq!(status, 204);
    let (status, _) = admin(&server, "DELETE", "/v1/admin/bans/device/phone-7", "").await;
    assert_eq!(status, 204);
    let mut carol = connect_with_token(&server, "carol", &device_token("carol", "phone-7")).await;
    assert_served(&mut carol).await;
}

#[tokio::test]
async fn the_list_shows_only_bans_in_force() {
    let server = with_admin(&[]).await;
    ban(&server, "user", "brief", 1, None).await;
    let long = ban(&server, "ip", "10.1.2.3", 3600, Some("scraper")).await;
    let (_, list) = admin(&server, "GET", "/v1/admin/bans", "").await;
    let bans = list["bans"].as_array().unwrap();
    assert!(bans.contains(&long), "{list}");
    let (server, long) = (&server, &long);
    eventually("the one-second ban ends", || async move {
        let (status, list) = admin(server, "GET", "/v1/admin/bans", "").await;
        assert_eq!(status, 200);
        list == json!({"bans": [long]})
    })
    .await;
    // Once it ends, the user gets in again.
    let mut brief = server.connect("brief").await;
    assert_served(&mut brief).await;
}

// --- Connection attempts per address ---

#[tokio::test]
async fn too_many_connection_attempts_from_one_address_get_429() {
    let server = TestServer::start(&["--ip-connects-per-minute", "2"]).await;
    let _first = server.connect("a").await;
    let _second = server.connect("b").await;
    let response = refused(&server, &common::token("c")).await;
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"], "rate_limited");
    let retry_ms = body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry_ms > 0 && retry_ms <= 60_000, "{body}");
    assert_eq!(
        server
            .metric(r#"matchgate_handshakes_refused_total{reason="rate_limited"}"#)
            .await,
        1.0
    );
    // Other endpoints are not limited.
    assert_eq!(common::http_get(server.addr, "/healthz").await.0, 200);
}

/// A handshake through a proxy that says the client is `client`.
fn forwarded(server: &TestServer, user: &str, client: &str) -> http::Request<()> {
    let mut request = handshake(server, &common::token(user));
    request.headers_mut().insert(
        "x-forwarded-for",
        format!("{client}, 127.0.0.1").parse().unwrap(),
    );
    request
}

#[tokio::test]
async fn behind_a_trusted_proxy_limits_and_bans_apply_to_the_forwarded_address() {
    let server = with_admin(&[
        "--ip-connects-per-minute",
        "1",
        "--trusted-proxies",
        "127.0.0.1,10.0.0.0/8",
    ])
    .await;
    // Each forwarded address has its own budget: one attempt each.
    for (user, client) in [("a", "198.51.100.1"), ("b", "198.51.100.2")] {
        let (ws, _) = tokio_tungstenite::connect_async(forwarded(&server, user, client))
            .await
            .unwrap_or_else(|e| panic!("{user} via {client}: {e}"));
        drop(ws);
    }
    match tokio_tungstenite::connect_async(forwarded(&server, "c", "198.51.100.1")).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 429),
        other => panic!(
            "a second attempt from 198.51.100.1 should get 429: {:?}",
            other.is_ok()
        ),
    }
    // An address ban hits the forwarded address, not the proxy.
    ban(&server, "ip", "198.51.100.3", 60, None).await;
    match tokio_tungstenite::connect_async(forwarded(&server, "d", "198.51.100.3")).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 403),
        other => panic!("198.51.100.3 is banned: {:?}", other.is_ok()),
    }
    let (ws, _) = tokio_tungstenite::connect_async(forwarded(&server, "e", "198.51.100.4"))
        .await
        .expect("another address gets in");
    drop(ws);
}

/// Connects `user` through the trusted proxy as coming from `client`, and reads the
/// `welcome`.
async fn connect_forwarded(server: &TestServer, user: &str, client: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(forwarded(server, user, client))
        .await
        .unwrap_or_else(|e| panic!("{user} via {client}: {e}"));
    Client::new(ws, user).welcomed().await
}

/// The HTTP status a handshake of `user` through the trusted proxy as `client` gets (101 when
/// it is let in).
async fn forwarded_status(server: &TestServer, user: &str, client: &str) -> u16 {
    match tokio_tungstenite::connect_async(forwarded(server, user, client)).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{user} via {client}: {e}"),
    }
}

#[tokio::test]
async fn ipv6_clients_share_one_connection_budget_per_prefix() {
    let server = with_admin(&[
        "--ip-connects-per-minute",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
    ])
    .await;
    assert_eq!(forwarded_status(&server, "a", "2001:db8:5::1").await, 101);
    // Another address of the same /64 is the same client.
    assert_eq!(forwarded_status(&server, "b", "2001:db8:5::2").await, 429);
    assert_eq!(
        forwarded_status(&server, "c", "2001:db8:5:0:ffff::9").await,
        429
    );
    // The next /64 is somebody else.
    assert_eq!(forwarded_status(&server, "d", "2001:db8:5:1::1").await, 101);
    let server = with_admin(&[
        "--ip-connects-per-minute",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
        "--ipv6-prefix-len",
        "48",
    ])
    .await;
    assert_eq!(forwarded_status(&server, "a", "2001:db8:5::1").await, 101);
    assert_eq!(
        forwarded_status(&server, "d", "2001:db8:5:1::1").await,
        429,
        "one /48"
    );
}

/// Address bans through the admin API of `servers[0]`, of clients connected through a trusted
/// proxy to the last of `servers`: a ban of one IPv6 address covers its /64, a CIDR ban its
/// range; live connections inside are closed, handshakes from inside refused, the rest served.
async fn address_bans_cover_prefixes_and_ranges(servers: &[TestServer]) {
    let (admin_side, clients) = (&servers[0], servers.last().unwrap());
    let mut alice = connect_forwarded(clients, "alice", "2001:db8:1::1").await;
    let mut bob = connect_forwarded(clients, "bob", "2001:db8:2::1").await;
    let mut carol = connect_forwarded(clients, "carol", "198.51.100.7").await;
    let mut dave = connect_forwarded(clients, "dave", "198.51.101.7").await;

    // One IPv6 address: its whole /64.
    let made = ban(admin_side, "ip", "2001:db8:1::2", 3600, None).await;
    assert_eq!(made["value"], "2001:db8:1::/64");
    assert_banned_out(&mut alice).await;
    for server in servers {
        assert_eq!(forwarded_status(server, "x", "2001:db8:1::99").await, 403);
        assert_eq!(forwarded_status(server, "y", "2001:db8:1:1::1").await, 101);
    }

    // An IPv4 range.
    let range = ban(admin_side, "ip", "198.51.100.99/24", 3600, Some("range")).await;
    assert_eq!(range["value"], "198.51.100.0/24", "host bits dropped");
    assert_banned_out(&mut carol).await;
    assert_served(&mut dave).await;
    assert_served(&mut bob).await;
    for server in servers {
        assert_eq!(forwarded_status(server, "x", "198.51.100.200").await, 403);
        assert_eq!(forwarded_status(server, "y", "198.51.101.200").await, 101);
    }

    // An IPv6 range wider than a client's prefix.
    ban(admin_side, "ip", "2001:db8:2::/48", 3600, None).await;
    assert_banned_out(&mut bob).await;
    assert_served(&mut dave).await;
    assert_eq!(
        forwarded_status(clients, "x", "2001:db8:2:ffff::1").await,
        403
    );
    assert_eq!(forwarded_status(clients, "y", "2001:db8:3::1").await, 101);

    let (_, list) = admin(admin_side, "GET", "/v1/admin/bans", "").await;
    let mut values: Vec<&str> = list["bans"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["value"].as_str())
        .collect();
    values.sort();
    assert_eq!(
        values,
        ["198.51.100.0/24", "2001:db8:1::/64", "2001:db8:2::/48"],
        "{list}"
    );

    // Lifted by any address of the /64, or by the range (its slash escaped in the path).
    let (status, _) = admin(admin_side, "DELETE", "/v1/admin/bans/ip/2001:db8:1::5", "").await;
    assert_eq!(status, 204);
    let (status, _) = admin(
        admin_side,
        "DELETE",
        "/v1/admin/bans/ip/198.51.100.0%2F24",
        "",
    )
    .await;
    assert_eq!(status, 204);
    let mut alice = connect_forwarded(clients, "alice", "2001:db8:1::1").await;
    assert_served(&mut alice).await;
    assert_eq!(forwarded_status(clients, "x", "198.51.100.200").await, 101);
}

#[tokio::test]
async fn address_bans_cover_prefixes_and_ranges_in_memory() {
    let server = with_admin(&["--trusted-proxies", "127.0.0.1"]).await;
    address_bans_cover_prefixes_and_ranges(&[server]).await;
}

#[tokio::test]
async fn address_bans_cover_prefixes_and_ranges_across_instances_in_redis() {
    let redis = RedisServer::start().await;
    let servers = instances(&single(&redis), 2, &["--trusted-proxies", "127.0.0.1"]).await;
    address_bans_cover_prefixes_and_ranges(&servers).await;
}

#[tokio::test]
async fn expired_bans_leave_the_redis_listing_when_a_ban_is_made() {
    let redis = RedisServer::start().await;
    let servers = instances(&single(&redis), 1, &[]).await;
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    ban(&servers[0], "ip", "10.9.8.7", 1, None).await;
    eventually("the one-second ban runs out", || {
        let mut conn = conn.clone();
        async move {
            let exists: bool = ::redis::cmd("EXISTS")
                .arg("{mg}:ban:ip:10.9.8.7")
                .query_async(&mut conn)
                .await
                .unwrap();
            !exists
        }
    })
    .await;
    // Nobody lists bans; making one is enough to drop what ran out.
    ban(&servers[0], "user", "troll", 3600, None).await;
    let listed: Vec<String> = ::redis::cmd("ZRANGE")
        .arg("{mg}:bans")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(listed, ["user:troll"]);
}

// --- Reports ---

/// Sends a report and returns the direct reply.
async fn report(client: &mut Client, mut body: Value, reference: &str) -> Value {
    body["type"] = json!("report");
    reply(client, body, reference).await
}

#[tokio::test]
async fn reports_are_validated_and_need_a_peer() {
    let server = TestServer::start(&[]).await;
    let mut loner = server.connect("loner").await;
    let reply = report(&mut loner, json!({"reason": "spam"}), "r1").await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "invalid_state", "{reply}");
    let reply = report(&mut loner, json!({"reason": "rude"}), "r2").await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    let long = "é".repeat(501);
    let reply = report(
        &mut loner,
        json!({"reason": "other", "details": long}),
        "r3",
    )
    .await;
    assert_eq!(reply["code"], "bad_request", "{reply}");

    let mut peer = server.connect("peer").await;
    common::match_up(&mut loner, &mut peer).await;
    let reply = report(
        &mut loner,
        json!({"reason": "other", "session_id": "s_not_a_session"}),
        "r4",
    )
    .await;
    assert_eq!(reply["code"], "invalid_state", "{reply}");
    let details = "é".repeat(500);
    let reply = report(
        &mut loner,
        json!({"reason": "other", "details": details}),
        "r5",
    )
    .await;
    assert_eq!(
        reply,
        json!({"type": "ack", "action": "report", "ref": "r5"})
    );
    assert_eq!(
        server
            .metric(r#"matchgate_reports_total{reason="other"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn distinct_reporters_ban_the_reported_user_and_a_repeat_counts_once() {
    let server = TestServer::start(&["--report-ban-threshold", "3"]).await;
    let mut troll = server.connect("troll").await;
    for (i, name) in ["r1", "r2", "r3"].into_iter().enumerate() {
        let mut reporter = server.connect(name).await;
        let (matched, _) = common::match_up(&mut troll, &mut reporter).await;
        let session = matched["session_id"].clone();
        if i == 0 {
            // The first reporter reports the current session, twice: it counts once.
            for reference in ["a", "b"] {
                let reply = report(&mut reporter, json!({"reason": "harassment"}), reference).await;
                assert_eq!(reply["type"], "ack", "{reply}");
            }
            reporter.request(json!({"type": "end"}), "e").await;
            troll.expect("session_ended").await;
        } else {
            // The others end first and report the most recent session, by id.
            reporter.request(json!({"type": "end"}), "e").await;
            troll.expect("session_ended").await;
            let body = json!({"reason": "nudity", "details": "camera", "session_id": session});
            let reply = report(&mut reporter, body, "a").await;
            assert_eq!(reply["type"], "ack", "{reply}");
        }
        if i < 2 {
            assert_served(&mut troll).await;
        }
    }
    assert_banned_out(&mut troll).await;
    let (status, body) = refusal(&server, &common::token("troll")).await;
    assert_eq!(status, 403);
    assert_eq!(body, json!({"error": "banned", "reason": "reports"}));
    let metrics = server.metrics().await;
    for (name, value) in [
        (r#"matchgate_reports_total{reason="harassment"}"#, 2.0),
        (r#"matchgate_reports_total{reason="nudity"}"#, 2.0),
        (r#"matchgate_bans_total{source="reports"}"#, 1.0),
        ("matchgate_ban_disconnects_total", 1.0),
    ] {
        assert_eq!(common::metric_value(&metrics, name), Some(value), "{name}");
    }
}

// --- Across instances sharing a Redis ---

/// `n` in-process instances on the Redis named by `redis_args`, with extra flags.
async fn instances(redis_args: &[String], n: usize, extra: &[&str]) -> Vec<TestServer> {
    let mut servers = Vec::new();
    for i in 0..n {
        let mut args: Vec<String> = redis_args.to_vec();
        args.extend(["--instance-id".into(), format!("inst{i}")]);
        args.extend(["--instance-heartbeat-ms".into(), "100".into()]);
        args.extend(["--admin-token".into(), ADMIN.into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.push(TestServer::start(&args).await);
    }
    servers
}

fn single(redis: &RedisServer) -> Vec<String> {
    vec!["--redis-url".into(), redis.url()]
}

fn cluster(redis: &RedisCluster) -> Vec<String> {
    vec![
        "--redis-url".into(),
        redis.urls().join(","),
        "--redis-cluster".into(),
    ]
}

async fn a_ban_through_one_instance_holds_on_every_instance(redis_args: Vec<String>) {
    let servers = instances(&redis_args, 2, &[]).await;
    let (a, b) = (&servers[0], &servers[1]);
    let mut alice = b.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut phone = connect_with_token(a, "gina", &device_token("gina", "phone-9")).await;

    let made = ban(a, "user", "alice", 3600, Some("spam")).await;
    assert_banned_out(&mut alice).await;
    assert_served(&mut bob).await;
    for server in [a, b] {
        let (status, body) = refusal(server, &common::token("alice")).await;
        assert_eq!((status, body["reason"].as_str()), (403, Some("spam")));
    }
    assert_eq!(b.metric("matchgate_ban_disconnects_total").await, 1.0);
    assert_eq!(
        a.metric(r#"matchgate_bans_total{source="admin"}"#).await,
        1.0
    );

    ban(b, "device", "phone-9", 3600, None).await;
    assert_banned_out(&mut phone).await;
    let (_, list) = admin(a, "GET", "/v1/admin/bans", "").await;
    assert_eq!(list["bans"].as_array().map(Vec::len), Some(2), "{list}");
    assert!(list["bans"].as_array().unwrap().contains(&made), "{list}");

    let (status, _) = admin(b, "DELETE", "/v1/admin/bans/user/alice", "").await;
    assert_eq!(status, 204);
    let mut alice = a.connect("alice").await;
    assert_served(&mut alice).await;
    let (_, list) = admin(b, "GET", "/v1/admin/bans", "").await;
    assert_eq!(list["bans"][0]["kind"], "device", "{list}");

    // A short ban leaves the listing by itself.
    ban(a, "ip", "10.9.8.7", 1, None).await;
    eventually("the one-second ban ends", || async move {
        let (_, list) = admin(b, "GET", "/v1/admin/bans", "").await;
        list["bans"].as_array().is_some_and(|bans| bans.len() == 1)
    })
    .await;
}

#[tokio::test]
async fn a_ban_through_one_instance_holds_on_every_instance_single_redis() {
    let redis = RedisServer::start().await;
    a_ban_through_one_instance_holds_on_every_instance(single(&redis)).await;
}

#[tokio::test]
async fn a_ban_through_one_instance_holds_on_every_instance_redis_cluster() {
    let redis = RedisCluster::start().await;
    a_ban_through_one_instance_holds_on_every_instance(cluster(&redis)).await;
}

#[tokio::test]
async fn a_ban_made_while_the_subscriptions_are_cut_still_closes_the_connection() {
    let redis = RedisServer::start().await;
    let servers = instances(&single(&redis), 2, &[]).await;
    let mut alice = servers[1].connect("alice").await;
    // Cut every pub/sub connection, then ban at once: the notice may be published while the
    // subscribers reconnect, and is then caught up with from the list of bans.
    assert!(
        redis.kill_subscribers().await >= 2,
        "both instances had a subscriber"
    );
    ban(&servers[0], "user", "alice", 3600, None).await;
    assert_banned_out(&mut alice).await;
}

#[tokio::test]
async fn reports_through_different_instances_ban_in_redis() {
    let redis = RedisServer::start().await;
    let servers = instances(&single(&redis), 2, &["--report-ban-threshold", "2"]).await;
    let mut troll = servers[0].connect("troll").await;
    for (i, name) in ["r1", "r2"].into_iter().enumerate() {
        let mut reporter = servers[1].connect(name).await;
        common::match_up(&mut troll, &mut reporter).await;
        // The first reporter reports twice: it counts once.
        for reference in ["a", "b"].into_iter().take(2 - i) {
            let reply = report(&mut reporter, json!({"reason": "spam"}), reference).await;
            assert_eq!(reply["type"], "ack", "{reply}");
        }
        if i == 0 {
            reporter.request(json!({"type": "end"}), "e").await;
            troll.expect("session_ended").await;
            assert_served(&mut troll).await;
        }
    }
    assert_banned_out(&mut troll).await;
    let (status, body) = refusal(&servers[1], &common::token("troll")).await;
    assert_eq!((status, body["reason"].as_str()), (403, Some("reports")));
    assert_eq!(
        servers[1]
            .metric(r#"matchgate_bans_total{source="reports"}"#)
            .await,
        1.0
    );
}
