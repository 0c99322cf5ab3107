//! The HTTP layer under clients that do not play along: request heads that never end or never
//! stop growing, idle keep-alive connections, many sockets that never become WebSockets (per
//! address and per listener), probes hammering `/readyz`, `/metrics` and the admin API on the
//! internal listener, and a load balancer the gateway was not told about.
//!
//! Raw sockets are used where an HTTP client would hide what the gateway does; sockets that
//! must come from different client addresses bind a source address in 127.0.0.0/8.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::process::GatewayProcess;
use common::redis::RedisServer;
use common::{http_get, http_request, metric_value, TestServer, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// The start of a WebSocket handshake whose last header never ends.
const UNFINISHED_HEAD: &[u8] = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nX-Pad: ";

/// A TCP connection to `addr` from the loopback address `source`.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket
        .connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting from {source}: {e}"))
}

/// Reads until the gateway closes the socket (an end of stream or a reset both count) and
/// returns what it sent; panics if it is still open after [`PATIENCE`].
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the gateway closes the socket");
    got
}

/// The status code of an HTTP response, if `raw` starts with one.
fn status(raw: &[u8]) -> Option<u16> {
    std::str::from_utf8(raw.get(9..12)?).ok()?.parse().ok()
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let server = TestServer::start(&["--http-head-timeout-ms", "500"]).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(UNFINISHED_HEAD).await.unwrap();
    slow.write_all(&[b'a'; 1000]).await.unwrap();
    let answer = read_until_closed(&mut slow).await;
    assert!(
        answer.is_empty() || status(&answer) == Some(408),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(http_get(server.addr, "/healthz").await.0, 200);
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let server = TestServer::start(&[]).await;
    let mut big = TcpStream::connect(server.addr).await.unwrap();
    big.write_all(UNFINISHED_HEAD).await.unwrap();
    // 100 KB of one header, and still no end: the gateway answers after 16 KiB. Writing on
    // may fail once it has; what matters is that the answer arrives.
    let _ = big.write_all(&vec![b'a'; 100_000]).await;
    let answer = read_until_closed(&mut big).await;
    assert_eq!(
        status(&answer),
        Some(431),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A head just under the limit is served.
    let pad = "a".repeat(15_000);
    let (code, _) = http_request(server.addr, "GET", "/healthz", &[("x-pad", &pad)], "").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = TestServer::start(&["--http-head-timeout-ms", "500"]).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    // HTTP/1.1 keeps the connection open by default; two requests on it, then silence.
    for _ in 0..2 {
        idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        while !response.ends_with(b"ok\n") {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
                .await
                .expect("a response")
                .unwrap();
            assert!(n > 0, "closed while a request was answered");
            response.extend_from_slice(&buf[..n]);
        }
        assert_eq!(status(&response), Some(200));
    }
    let rest = read_until_closed(&mut idle).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// The value of `name` in the metrics served at `addr`.
async fn metric_at(addr: SocketAddr, name: &str) -> f64 {
    let text = http_get(addr, "/metrics").await.1;
    metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

const PENDING: &str = r#"matchgate_pending_connections{listener="public"}"#;

async fn wait_pending(internal: SocketAddr, n: f64) {
    let wait = async {
        while metric_at(internal, PENDING).await != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("never {n} pending connections"));
}

#[tokio::test]
async fn connections_that_do_not_upgrade_are_capped_per_address_and_per_listener() {
    let server = TestServer::start(&[
        "--max-pending-per-address",
        "3",
        "--max-pending-connections",
        "7",
        "--trusted-proxies",
        "127.0.0.9",
        "--internal-listen",
        "127.0.0.1:0",
    ])
    .await;
    let internal = server.internal.unwrap();
    // Silent sockets: not a byte sent.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from("127.0.0.2", server.addr).await);
    }
    wait_pending(internal, 3.0).await;
    let mut fourth = connect_from("127.0.0.2", server.addr).await;
    assert_eq!(status(&read_until_closed(&mut fourth).await), Some(429));
    // Another address has a budget of its own, a trusted proxy has none.
    held.push(connect_from("127.0.0.3", server.addr).await);
    for _ in 0..3 {
        held.push(connect_from("127.0.0.9", server.addr).await);
    }
    wait_pending(internal, 7.0).await;
    let mut eighth = connect_from("127.0.0.4", server.addr).await;
    assert_eq!(status(&read_until_closed(&mut eighth).await), Some(503));
    for (cap, refused) in [("address", 1.0), ("listener", 1.0)] {
        let name = format!(r#"matchgate_pending_refused_total{{listener="public",cap="{cap}"}}"#);
        assert_eq!(metric_at(internal, &name).await, refused, "{name}");
    }
    // The internal listener has a budget of its own.
    assert_eq!(http_get(internal, "/healthz").await.0, 200);

    // Closed sockets give their slots back; a WebSocket gives its slot back once upgraded.
    held.truncate(3);
    wait_pending(internal, 3.0).await;
    let mut client = server.connect("alice").await;
    wait_pending(internal, 3.0).await;
    let reply = client
        .request(serde_json::json!({"type": "status"}), "s")
        .await;
    assert_eq!(reply["state"], "idle");
}

/// The soft limit on open files of this process (the gateway child inherits it).
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft = line.split_whitespace().nth(3).unwrap();
    soft.parse().unwrap_or(u64::MAX)
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn two_thousand_slow_sockets_are_all_closed_and_do_not_lock_anyone_out() {
    const SLOW: usize = 2000;
    assert!(
        open_files_limit() >= 3 * SLOW as u64,
        "this test opens {SLOW} sockets: raise the open files limit (ulimit -n 20000)"
    );
    // The real binary, so that its memory is its own; default caps and timeouts.
    let gateway = GatewayProcess::start(&["--jwt-secret", common::SECRET]).await;
    gateway.wait_ready().await;
    let mut warm = gateway.connect("warm-up").await;
    warm.request(serde_json::json!({"type": "status"}), "w")
        .await;
    let before = rss_kib(gateway.pid());

    // 2,000 sockets from 40 addresses (below the default 64 per address), each with a head
    // that will never end.
    let sources: Vec<String> = (1..=40).map(|i| format!("127.0.1.{i}")).collect();
    let open = |i: usize| {
        let source = &sources[i % sources.len()];
        async move {
            let mut socket = connect_from(source, gateway.addr).await;
            socket.write_all(UNFINISHED_HEAD).await.unwrap();
            socket.write_all(&[b'a'; 4096]).await.unwrap();
            socket
        }
    };
    let mut slow = Vec::with_capacity(SLOW);
    let opening = Instant::now();
    for batch in (0..SLOW).collect::<Vec<_>>().chunks(100) {
        slow.extend(futures_util::future::join_all(batch.iter().map(|&i| open(i))).await);
    }
    // The scrape is a pending connection too while it is answered.
    let held = async {
        while gateway.metric(PENDING).await < (SLOW + 1) as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, held)
        .await
        .expect("the gateway holds the slow sockets");
    let during = rss_kib(gateway.pid());
    println!("opened in {:?}", opening.elapsed());

    // Meanwhile everybody else is served.
    assert_eq!(http_get(gateway.addr, "/healthz").await.0, 200);
    let mut alice = gateway.connect("alice").await;
    let reply = alice
        .request(serde_json::json!({"type": "status"}), "s")
        .await;
    assert_eq!(reply["state"], "idle");

    // Every slow socket is closed, with a 408 or without an answer.
    let closed = futures_util::future::join_all(slow.iter_mut().map(read_until_closed)).await;
    for answer in &closed {
        assert!(
            answer.is_empty() || status(answer) == Some(408),
            "{}",
            String::from_utf8_lossy(answer)
        );
    }
    let per_socket = (during.saturating_sub(before)) * 1024 / SLOW as u64;
    println!(
        "RSS {before} KiB before, {during} KiB with {SLOW} slow sockets: {per_socket} bytes each"
    );
    assert!(
        per_socket < 64 * 1024,
        "each slow socket costs {per_socket} bytes of gateway memory"
    );
    let released = async {
        while gateway.metric(PENDING).await != 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, released)
        .await
        .expect("every slot is given back");
    let reply = alice
        .request(serde_json::json!({"type": "status"}), "t")
        .await;
    assert_eq!(reply["state"], "idle");
}

#[tokio::test]
async fn readiness_probes_reach_the_backend_at_most_once_a_second() {
    let redis = RedisServer::start().await;
    // Instance heartbeats are FCALLs too: one a minute keeps them out of the count.
    let server = TestServer::start(&[
        "--redis-url",
        &redis.url(),
        "--instance-heartbeat-ms",
        "60000",
    ])
    .await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    const PROBES: usize = 300;
    for _ in 0..PROBES {
        assert_eq!(http_get(server.addr, "/readyz").await.0, 200);
    }
    let seconds = started.elapsed().as_secs();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let fcalls: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap());
    // One call per started second of probing, one heartbeat at most.
    assert!(
        fcalls <= seconds + 2,
        "{PROBES} probes in {seconds} s made {fcalls} backend calls"
    );
}

#[tokio::test]
async fn metrics_and_the_admin_api_move_to_the_internal_listener() {
    let admin = "admin-token-admin-token-admin-token!";
    let server =
        TestServer::start(&["--admin-token", admin, "--internal-listen", "127.0.0.1:0"]).await;
    let internal = server.internal.expect("an internal listener");
    let bearer = format!("Bearer {admin}");
    let auth = [("authorization", bearer.as_str())];
    // Public side: the health endpoints and the WebSocket, nothing for operators.
    assert_eq!(http_get(server.addr, "/metrics").await.0, 404);
    let (code, _) = http_request(server.addr, "GET", "/v1/admin/bans", &auth, "").await;
    assert_eq!(code, 404);
    assert_eq!(http_get(server.addr, "/readyz").await.0, 200);
    let mut alice = server.connect("alice").await;
    alice
        .request(serde_json::json!({"type": "heartbeat"}), "h")
        .await;
    // Internal side: metrics, the admin API and the health endpoints, no WebSocket.
    let (code, text) = http_get(internal, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(metric_value(&text, "matchgate_connections"), Some(1.0));
    let (code, body) = http_request(internal, "GET", "/v1/admin/bans", &auth, "").await;
    assert_eq!((code, body.trim()), (200, r#"{"bans":[]}"#));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(http_get(internal, path).await.0, 200, "{path}");
    }
    assert_eq!(http_get(internal, "/v1/ws").await.0, 404);
}

#[tokio::test]
async fn a_load_balancer_the_gateway_was_not_told_about_is_reported_once() {
    const LIMIT: usize = 20;
    let gateway = GatewayProcess::start_with_env(
        &["--jwt-secret", common::SECRET],
        &[("MATCHGATE_IP_CONNECTS_PER_MINUTE", "20")],
    )
    .await;
    gateway.wait_ready().await;
    // Many users through one address (as behind a proxy missing from --trusted-proxies),
    // until the address is out of attempts.
    let mut clients = Vec::new();
    for i in 0..LIMIT {
        clients.push(gateway.connect(&format!("user-{i}")).await);
    }
    let mut refused = 0;
    for i in 0..5 {
        let bearer = format!("Bearer {}", common::token(&format!("late-{i}")));
        let (code, _) =
            common::refused_handshake(&gateway.ws_url(), &[("authorization", &bearer)]).await;
        refused += usize::from(code == 429);
    }
    assert_eq!(refused, 5);
    let warning = "probably a load balancer or proxy";
    gateway.wait_for_log(warning).await;
    assert_eq!(
        gateway.logs().matches(warning).count(),
        1,
        "once a minute per address:\n{}",
        gateway.logs()
    );
}
