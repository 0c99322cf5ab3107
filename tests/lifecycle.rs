//! Connection lifecycle: heartbeat timeout and server pings, resume and replay within the grace
//! period, expiry after it, replacement by a newer connection, slow consumers, graceful drain,
//! health and metrics endpoints.
//!
//! Short timing flags keep the tests quick, but nothing here asserts how long anything takes:
//! every wait is for an event (a frame, a close, a metric reaching a value), bounded only by the
//! harness's hang protection.
//!
//! Some tests must know that the gateway has noticed a dropped connection before they go on.
//! Where no peer can see it, they poll `matchgate_connections`: the connection task decrements
//! that gauge and detaches the user in the same poll (the in-memory matchmaker never yields),
//! and `#[tokio::test]` runs everything on one thread, so a scrape that sees the lower count
//! comes after the detach.

mod common;

use std::time::Duration;

use common::{metric_value, Client, Closed, TestServer, PATIENCE};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// Polls `/metrics` until sample `name` satisfies `ok` and returns it.
async fn wait_metric(
    server: &TestServer,
    name: &str,
    ok: impl Fn(Option<f64>) -> bool,
) -> Option<f64> {
    let poll = async {
        loop {
            let value = metric_value(&server.metrics().await, name);
            if ok(value) {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    match tokio::time::timeout(PATIENCE, poll).await {
        Ok(value) => value,
        Err(_) => panic!(
            "metric {name} never reached the expected value:\n{}",
            server.metrics().await
        ),
    }
}

/// Waits until the gateway counts exactly `n` live connections.
async fn wait_connections(server: &TestServer, n: usize) {
    wait_metric(server, "matchgate_connections", |v| v == Some(n as f64)).await;
}

fn resume_query(resume_token: &Value, last_seq: u64) -> String {
    let resume_token = resume_token.as_str().expect("resume_token is a string");
    format!("resume={resume_token}&last_seq={last_seq}")
}

/// The next frame that is not a `queue_update` (those are throttled pushes that may come at any
/// time while a user waits).
async fn next_event(c: &mut Client) -> Value {
    loop {
        match c.next().await {
            Ok(v) if v["type"] == "queue_update" => continue,
            Ok(v) => return v,
            Err(e) => panic!("{}: connection ended: {e:?}", c.user),
        }
    }
}

async fn expect_event(c: &mut Client, kind: &str) -> Value {
    let v = next_event(c).await;
    assert_eq!(v["type"], kind, "{}: expected {kind}, got {v}", c.user);
    v
}

/// The `seq`s of every frame `c` received, in order.
fn seqs(c: &Client) -> Vec<u64> {
    c.seen.iter().filter_map(|v| v["seq"].as_u64()).collect()
}

/// Asserts that `seqs` go up by exactly one from `first`.
fn assert_consecutive(who: &str, seqs: &[u64], first: u64) {
    let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "{who}: seqs must go up by one from {first}");
}

/// Connects `a` and `b` and matches them (`a` waited longer, so `a` is the offerer).
async fn matched_pair(server: &TestServer, a: &str, b: &str) -> (Client, Client) {
    let mut a = server.connect(a).await;
    let mut b = server.connect(b).await;
    a.send(json!({"type": "enqueue"})).await;
    expect_event(&mut a, "queued").await;
    b.send(json!({"type": "enqueue"})).await;
    expect_event(&mut b, "queued").await;
    let ma = expect_event(&mut a, "matched").await;
    let mb = expect_event(&mut b, "matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    (a, b)
}

/// The next raw WebSocket message (pings included), failing on the end of the stream.
async fn raw_next(c: &mut Client) -> Message {
    tokio::time::timeout(PATIENCE, c.ws.next())
        .await
        .unwrap_or_else(|_| panic!("{}: nothing from the server", c.user))
        .unwrap_or_else(|| panic!("{}: stream ended", c.user))
        .unwrap_or_else(|e| panic!("{}: read error {e}", c.user))
}

// ---------------------------------------------------------------------------------------------
// Heartbeats and pings

#[tokio::test]
async fn a_silent_client_is_closed_with_4002() {
    let server = TestServer::start(&[
        "--heartbeat-interval-ms",
        "100",
        "--heartbeat-timeout-factor",
        "2",
    ])
    .await;
    let mut a = server.connect("silent").await;
    assert_eq!(a.welcome["heartbeat_interval_ms"], 100);
    assert_eq!(a.welcome["heartbeat_timeout_ms"], 200);
    // Reading makes tungstenite answer the server's pings with pongs: pongs are not client
    // traffic, so the connection still times out.
    match a.closed().await {
        Closed::Code(code) => assert_eq!(code, 4002, "heartbeat timeout close code"),
        Closed::Eof => panic!("expected close 4002, the stream just ended"),
    }
    assert_eq!(
        a.seen.len(),
        1,
        "nothing but the welcome was due: {:?}",
        a.seen
    );
    wait_metric(
        &server,
        r#"matchgate_disconnects_total{code="4002"}"#,
        |v| v == Some(1.0),
    )
    .await;
    wait_connections(&server, 0).await;
}

#[tokio::test]
async fn heartbeats_keep_a_connection_open_and_the_server_pings() {
    // Timeout 400 ms; heartbeats every ~50 ms for at least 16 rounds, i.e. for well over the
    // timeout, so without the heartbeats this connection would be closed with 4002.
    let server = TestServer::start(&[
        "--heartbeat-interval-ms",
        "100",
        "--heartbeat-timeout-factor",
        "4",
    ])
    .await;
    let mut a = server.connect("steady").await;
    let mut pings = 0;
    let mut rounds = 0;
    while rounds < 16 || pings == 0 {
        assert!(rounds < 1000, "no WebSocket ping from the server");
        a.send(json!({"type": "heartbeat"})).await;
        // Read raw frames up to the ack, counting the server's pings on the way.
        loop {
            match raw_next(&mut a).await {
                Message::Ping(_) => pings += 1,
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    common::check_frame(&v);
                    assert_eq!(v["type"], "heartbeat_ack", "unexpected frame {v}");
                    break;
                }
                Message::Close(f) => panic!("closed while sending heartbeats: {f:?}"),
                other => panic!("unexpected message {other:?}"),
            }
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pings > 0);
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "still served after {rounds} rounds");
    assert_eq!(s["state"], "idle");
    assert_eq!(
        metric_value(
            &server.metrics().await,
            r#"matchgate_disconnects_total{code="4002"}"#
        )
        .unwrap_or(0.0),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Resume within the grace period

#[tokio::test]
async fn resume_in_a_session_restores_it_and_tells_the_peer() {
    let server = TestServer::start(&["--resume-grace-ms", "60000"]).await;
    let (a, mut b) = matched_pair(&server, "a", "b").await;
    let session_id = b.seen.last().unwrap()["session_id"].clone();
    let resume_token = a.welcome["resume_token"].clone();
    let a_last = a.last_seq();
    assert_eq!(a_last, 2, "queued, matched");
    // Abrupt drop: no close handshake, the TCP connection just goes.
    drop(a);
    let ps = expect_event(&mut b, "peer_status").await;
    assert_eq!(ps["state"], "reconnecting");
    assert_eq!(ps["session_id"], session_id);
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "in_session", "the session is held");

    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "in_session");
    assert_eq!(a.welcome["last_seq"], a_last, "a missed nothing");
    assert_eq!(
        a.welcome["resume_token"], resume_token,
        "same log, same token"
    );
    let ps = expect_event(&mut b, "peer_status").await;
    assert_eq!(ps["state"], "connected");
    assert_eq!(ps["session_id"], session_id);
    assert_consecutive("b", &seqs(&b), 1);

    // Nothing was replayed: the next frame is the reply to this request.
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status");
    assert_eq!(s["state"], "in_session");
    assert_eq!(s["session_id"], session_id);
    // The session goes on as before.
    let ended = a.request(json!({"type": "end"}), "e").await;
    assert_eq!(ended["type"], "session_ended");
    assert_eq!(ended["seq"], a_last + 1);
    let eb = expect_event(&mut b, "session_ended").await;
    assert_eq!(eb["reason"], "peer_ended");
}

#[tokio::test]
async fn events_missed_while_away_are_replayed_once_after_welcome() {
    let server = TestServer::start(&["--resume-grace-ms", "60000"]).await;
    let (a, mut b) = matched_pair(&server, "a", "b").await;
    let session_id = b.seen.last().unwrap()["session_id"].clone();
    let resume_token = a.welcome["resume_token"].clone();
    let a_last = a.last_seq();
    drop(a);
    let ps = expect_event(&mut b, "peer_status").await;
    assert_eq!(ps["state"], "reconnecting");
    // While a is away b ends the session: a's session_ended (peer_ended) goes to its log.
    let ended = b.request(json!({"type": "end"}), "e").await;
    assert_eq!(ended["type"], "session_ended");
    assert_eq!(ended["reason"], "end");

    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "idle");
    assert_eq!(a.welcome["last_seq"], a_last + 1);
    let replayed = a.expect("session_ended").await;
    assert_eq!(replayed["seq"], a_last + 1);
    assert_eq!(replayed["reason"], "peer_ended");
    assert_eq!(replayed["requeued"], false);
    assert_eq!(replayed["session_id"], session_id);
    assert!(
        replayed.get("ref").is_none(),
        "b's ref is not a's: {replayed}"
    );
    // Exactly once: the next frame is the reply to a new request, not a duplicate.
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "no duplicate replay: {s}");
    assert_eq!(s["state"], "idle");
    // The session is over: b is not told that a came back.
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "no peer_status after the session: {s}");
    assert_eq!(s["state"], "idle");
    // a's next event continues the sequence.
    let q = a.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(q["type"], "queued");
    assert_eq!(q["seq"], a_last + 2);
}

#[tokio::test]
async fn resume_while_queued_keeps_the_place_and_is_not_matched_while_away() {
    let server = TestServer::start(&["--resume-grace-ms", "60000"]).await;
    let mut a = server.connect("a").await;
    let q = a.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(q["position"], 0);
    let resume_token = a.welcome["resume_token"].clone();
    let a_last = a.last_seq();
    drop(a);
    wait_connections(&server, 0).await;

    // b arrives while a is away: a keeps its place (b is behind it) but is not matched.
    let mut b = server.connect("b").await;
    let qb = b.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(qb["type"], "queued");
    assert_eq!(qb["position"], 1, "a reconnecting user keeps the place");
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "b was not matched: {s}");
    assert_eq!(s["state"], "queued");
    assert_eq!(server.metric("matchgate_matches_total").await, 0.0);
    assert_eq!(server.metric("matchgate_queue_length").await, 2.0);

    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "queued");
    assert_eq!(a.welcome["last_seq"], a_last);
    // Back: a is matched with b at once, and as the one who waited longer it offers.
    let ma = expect_event(&mut a, "matched").await;
    assert_eq!(ma["seq"], a_last + 1);
    assert_eq!(ma["role"], "offerer", "a kept its place: {ma}");
    let mb = expect_event(&mut b, "matched").await;
    assert_eq!(mb["role"], "answerer");
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert_eq!(server.metric("matchgate_matches_total").await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Expiry after the grace period

#[tokio::test]
async fn a_queued_user_who_stays_away_is_removed_after_the_grace_period() {
    let server = TestServer::start(&["--resume-grace-ms", "200"]).await;
    let mut a = server.connect("a").await;
    a.request(json!({"type": "enqueue"}), "q").await;
    let resume_token = a.welcome["resume_token"].clone();
    let a_last = a.last_seq();
    assert_eq!(server.metric("matchgate_queue_length").await, 1.0);
    drop(a);
    wait_metric(&server, "matchgate_queue_length", |v| v == Some(0.0)).await;

    // Back a little too late: the place is gone, and the replay says why.
    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "idle");
    let gone = expect_event(&mut a, "dequeued").await;
    assert_eq!(gone["reason"], "timeout");
    assert_eq!(gone["seq"], a_last + 1);
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "idle");
    drop(a);
    // Much later (well past a second grace period), the user and the log are gone too.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(
        a.welcome["resumed"], false,
        "the log is gone: {}",
        a.welcome
    );
    assert_eq!(a.welcome["state"], "idle");
    assert_eq!(a.welcome["last_seq"], 0);
    assert_ne!(a.welcome["resume_token"], resume_token);
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "nothing replayed: {s}");
    // A newcomer does not match the expired user.
    let mut b = server.connect("b").await;
    b.request(json!({"type": "enqueue"}), "q").await;
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "queued");
}

#[tokio::test]
async fn a_session_ends_when_a_user_stays_away_and_the_peer_is_requeued() {
    let server = TestServer::start(&["--resume-grace-ms", "200"]).await;
    let (a, mut b) = matched_pair(&server, "a", "b").await;
    let session_id = b.seen.last().unwrap()["session_id"].clone();
    let resume_token = a.welcome["resume_token"].clone();
    let a_last = a.last_seq();
    let timeouts_before = server
        .metric(r#"matchgate_sessions_ended_total{reason="timeout"}"#)
        .await;
    drop(a);
    let ps = expect_event(&mut b, "peer_status").await;
    assert_eq!(ps["state"], "reconnecting");
    let ended = expect_event(&mut b, "session_ended").await;
    assert_eq!(ended["reason"], "peer_disconnected");
    assert_eq!(ended["requeued"], true);
    assert_eq!(ended["session_id"], session_id);
    let q = expect_event(&mut b, "queued").await;
    assert_eq!(q["position"], 0);
    assert_consecutive("b", &seqs(&b), 1);
    assert_eq!(
        server
            .metric(r#"matchgate_sessions_ended_total{reason="timeout"}"#)
            .await,
        timeouts_before + 1.0
    );
    assert_eq!(server.metric("matchgate_sessions_active").await, 0.0);
    assert_eq!(server.metric("matchgate_queue_length").await, 1.0);

    // a comes back too late: the session is over, and the replay says why.
    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "idle");
    let own = expect_event(&mut a, "session_ended").await;
    assert_eq!(own["reason"], "timeout");
    assert_eq!(own["requeued"], false);
    assert_eq!(own["session_id"], session_id);
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "nothing else replayed: {s}");
    assert_eq!(s["state"], "idle");
}

// ---------------------------------------------------------------------------------------------
// Invalid resumes

#[tokio::test]
async fn an_invalid_resume_still_takes_over_the_state_but_replays_nothing() {
    let server = TestServer::start(&["--resume-grace-ms", "60000"]).await;
    let mut a = server.connect("a").await;
    a.request(json!({"type": "enqueue"}), "q").await;
    let resume_token = a.welcome["resume_token"].clone();
    drop(a);
    wait_connections(&server, 0).await;

    // A wrong token, with a last_seq that would otherwise replay the `queued`.
    let mut a = server
        .connect_with("a", "resume=r_not-the-token&last_seq=0")
        .await;
    assert_eq!(a.welcome["resumed"], false, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "queued", "the held state is taken over");
    assert_eq!(a.welcome["last_seq"], 1);
    assert_eq!(
        a.welcome["resume_token"], resume_token,
        "the token for the next resume is the valid one"
    );
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "nothing replayed: {s}");
    assert_eq!(s["state"], "queued");
    assert_eq!(s["position"], 0);
    drop(a);
    wait_connections(&server, 0).await;

    // The right token with a last_seq beyond the log: the client's view cannot be trusted.
    let mut a = server
        .connect_with("a", &resume_query(&resume_token, 99))
        .await;
    assert_eq!(a.welcome["resumed"], false, "{}", a.welcome);
    assert_eq!(a.welcome["state"], "queued");
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "nothing replayed: {s}");
    drop(a);
    wait_connections(&server, 0).await;

    // The right token and last_seq 0: everything is replayed.
    let mut a = server
        .connect_with("a", &resume_query(&resume_token, 0))
        .await;
    assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
    let q = a.expect("queued").await;
    assert_eq!(q["seq"], 1);
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "replayed once: {s}");
}

// ---------------------------------------------------------------------------------------------
// Replacement

#[tokio::test]
async fn a_second_connection_replaces_the_first_without_duplicates() {
    let server = TestServer::start(&["--resume-grace-ms", "60000"]).await;
    let (mut a1, mut b) = matched_pair(&server, "a", "b").await;
    let session_id = b.seen.last().unwrap()["session_id"].clone();
    let resume_token = a1.welcome["resume_token"].clone();
    let a_last = a1.last_seq();
    // b ends the session; a1 does not read it (it sits unread in a1's socket).
    let ended = b.request(json!({"type": "end"}), "e").await;
    assert_eq!(ended["type"], "session_ended");

    let mut a2 = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(a2.welcome["resumed"], true, "{}", a2.welcome);
    assert_eq!(a2.welcome["state"], "idle");
    // a1 may or may not get the session_ended it was sent before; then it is closed with 4001.
    match a1.closed().await {
        Closed::Code(code) => assert_eq!(code, 4001, "replaced"),
        Closed::Eof => panic!("a1: expected close 4001, the stream just ended"),
    }
    // seen: welcome, queued, matched, then at most the unread session_ended.
    for v in &a1.seen[3..] {
        assert_eq!(v["type"], "session_ended", "a1 got nothing else: {v}");
    }
    wait_metric(
        &server,
        r#"matchgate_disconnects_total{code="4001"}"#,
        |v| v == Some(1.0),
    )
    .await;

    // a2 gets the missed event once, then its own, in sequence.
    let replayed = a2.expect("session_ended").await;
    assert_eq!(replayed["reason"], "peer_ended");
    assert_eq!(replayed["session_id"], session_id);
    let q = a2.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(q["type"], "queued");
    b.request(json!({"type": "enqueue"}), "q").await;
    expect_event(&mut a2, "matched").await;
    expect_event(&mut b, "matched").await;
    let skipped = b.request(json!({"type": "skip"}), "s").await;
    assert_eq!(skipped["type"], "session_ended");
    let e = expect_event(&mut a2, "session_ended").await;
    assert_eq!(e["reason"], "peer_skipped");
    expect_event(&mut a2, "queued").await;
    assert_consecutive("a2", &seqs(&a2), a_last + 1);
    // b saw no reconnect of a: a replacement is not a disconnect.
    assert!(
        b.seen.iter().all(|v| v["type"] != "peer_status"),
        "b: {:?}",
        b.seen
    );
    assert_consecutive("b", &seqs(&b), 1);
    let s = a2.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "no stray frame: {s}");
    assert_eq!(server.metric("matchgate_connections").await, 2.0);
}

/// The protocol promises the missed events to a new connection with a valid resume token, on
/// replacement as after a drop within the grace period. The grace period bounds how long a user
/// may be *away*; how old an event is must not matter while the user was never away.
#[tokio::test]
async fn a_replacement_after_a_quiet_spell_still_gets_the_missed_event() {
    let server = TestServer::start(&["--resume-grace-ms", "300"]).await;
    let (mut a1, mut b) = matched_pair(&server, "a", "b").await;
    let resume_token = a1.welcome["resume_token"].clone();
    let a_last = a1.last_seq();
    // b ends the session; a1's session_ended sits unread in a1's socket (as if lost on a
    // half-dead network path), while to the server a1 is still connected.
    let ended = b.request(json!({"type": "end"}), "e").await;
    assert_eq!(ended["type"], "session_ended");
    // Stay connected and quiet for longer than the grace period (the heartbeat timeout is the
    // default 50 s, so the server keeps a1). This only makes the event older than the grace
    // period; nothing is timed.
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    let mut a2 = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    match a1.closed().await {
        Closed::Code(code) => assert_eq!(code, 4001, "replaced"),
        Closed::Eof => panic!("a1: expected close 4001, the stream just ended"),
    }
    assert_eq!(
        a2.welcome["resumed"], true,
        "a was never away, so its missed event must still be replayable: {}",
        a2.welcome
    );
    assert_eq!(a2.welcome["state"], "idle");
    let replayed = a2.expect("session_ended").await;
    assert_eq!(replayed["seq"], a_last + 1);
    assert_eq!(replayed["reason"], "peer_ended");
}

// ---------------------------------------------------------------------------------------------
// Graceful drain

#[tokio::test]
async fn shutdown_asks_every_client_to_reconnect_then_closes_with_1001() {
    // A drain timeout far beyond the harness's patience: the server must finish because every
    // connection ended, not because the drain timed out.
    let mut server = TestServer::start(&[
        "--reconnect-jitter-ms",
        "500",
        "--drain-timeout-ms",
        "600000",
    ])
    .await;
    let (a, b) = matched_pair(&server, "a", "b").await;
    let mut c = server.connect("c").await;
    c.request(json!({"type": "enqueue", "prefs": {"topic": "other"}}), "q")
        .await;
    let idle = server.connect("d").await;
    let url = server.ws_url();
    let addr = server.addr;

    server.trigger_shutdown();
    for mut client in [a, b, c, idle] {
        // An event already on its way (e.g. the peer's reconnecting) may come first.
        let reconnect = loop {
            match client.next().await {
                Ok(v) if v["type"] == "reconnect" => break v,
                Ok(v) if v.get("seq").is_some() || v["type"] == "queue_update" => continue,
                Ok(v) => panic!("{}: unexpected frame before reconnect: {v}", client.user),
                Err(e) => panic!("{}: closed before reconnect: {e:?}", client.user),
            }
        };
        assert_eq!(reconnect["reason"], "shutdown");
        let retry = reconnect["retry_after_ms"].as_u64().unwrap();
        assert!(
            retry <= 500,
            "retry_after_ms {retry} above the jitter bound"
        );
        match client.next().await {
            Err(Closed::Code(code)) => assert_eq!(code, 1001, "{}", client.user),
            other => panic!("{}: expected close 1001, got {other:?}", client.user),
        }
    }

    // Draining: a new handshake must not succeed (refused with 503, or the port is closed).
    let request = common::ws_request(&url, "late", "");
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("the handshake attempt ends")
    {
        Ok((_, response)) => panic!(
            "a handshake succeeded while draining: {}",
            response.status()
        ),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503)
        }
        Err(_) => {} // connection refused or reset: the listener is gone
    }
    server.shutdown().await;
    // Afterwards nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Health and metrics

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start(&[]).await;
    let (status, _) = common::http_get(server.addr, "/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = common::http_get(server.addr, "/readyz").await;
    assert_eq!(status, 200);

    let (a, mut b) = matched_pair(&server, "a", "b").await;
    let c = server.connect("c").await;
    b.request(json!({"type": "bogus"}), "x").await;
    let text = server.metrics().await;
    for name in [
        "matchgate_connections",
        "matchgate_queue_length",
        "matchgate_matches_total",
        "matchgate_sessions_active",
        "matchgate_sessions_ended_total",
        "matchgate_protocol_errors_total",
        "matchgate_match_latency_seconds_bucket",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "/metrics lacks {name}:\n{text}"
        );
    }
    assert_eq!(metric_value(&text, "matchgate_connections"), Some(3.0));
    assert_eq!(metric_value(&text, "matchgate_sessions_active"), Some(1.0));
    assert_eq!(metric_value(&text, "matchgate_matches_total"), Some(1.0));
    assert_eq!(
        metric_value(
            &text,
            r#"matchgate_protocol_errors_total{code="unknown_type"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&text, "matchgate_match_latency_seconds_count"),
        Some(2.0),
        "one observation per matched user"
    );

    // One clean close, one abrupt drop: the gauge follows both.
    c.close().await;
    wait_connections(&server, 2).await;
    drop(a);
    wait_connections(&server, 1).await;
    drop(b);
    wait_connections(&server, 0).await;
    let (status, _) = common::http_get(server.addr, "/readyz").await;
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// Slow consumers

/// Connects `user` over a socket whose receive buffer is shrunk before the handshake, so that
/// the server's writes back up quickly once the client stops reading.
async fn connect_small_receive_buffer(server: &TestServer, user: &str) -> Client {
    let request = common::ws_request(&server.ws_url(), user, "");
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    clamp_mss(&socket);
    let stream = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .expect("handshake succeeds");
    Client::new(ws, user).welcomed().await
}

/// Advertises a small MSS in the SYN (Linux). The server's kernel sizes the socket's initial
/// send buffer from the peer's MSS (`tcp_sndbuf_expand`: 2 x 10 segments x per-segment memory);
/// on loopback (MSS ~64 KiB) that is megabytes, so without the clamp tens of thousands of
/// events are needed before the server's writes block, and how many depends on
/// `net.ipv4.tcp_wmem`. Elsewhere this does nothing and the test just needs more events.
fn clamp_mss(socket: &TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        extern "C" {
            fn setsockopt(fd: i32, level: i32, name: i32, value: *const u32, len: u32) -> i32;
        }
        const IPPROTO_TCP: i32 = 6;
        const TCP_MAXSEG: i32 = 2;
        let mss: u32 = 536;
        // SAFETY: a valid socket descriptor and a pointer to a live u32 of the given length.
        let rc = unsafe {
            setsockopt(
                socket.as_raw_fd(),
                IPPROTO_TCP,
                TCP_MAXSEG,
                &mss,
                std::mem::size_of::<u32>() as u32,
            )
        };
        assert_eq!(rc, 0, "setsockopt(TCP_MAXSEG) failed");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_and_loses_nothing_on_resume() {
    const SLOW_CONSUMER: &str = r#"matchgate_disconnects_total{code="4003"}"#;
    let server = TestServer::start(&[
        "--outbound-queue",
        "8",
        "--history-len",
        "100000",
        "--rate-limit-burst",
        "100000",
        "--rate-limit-per-minute",
        "6000000",
        // Long enough that neither the held state nor the log expires during the test.
        "--resume-grace-ms",
        "600000",
        // A blocked write gives up after 1 s instead of 10 s (nothing is timed here).
        "--write-timeout-ms",
        "1000",
    ])
    .await;
    let mut a = connect_small_receive_buffer(&server, "a").await;
    let resume_token = a.welcome["resume_token"].clone();
    let mut b = server.connect("b").await;
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    a.expect("matched").await;
    b.expect("matched").await;

    // a stops reading. Every reconnect of b puts two peer_status events in a's log and queue.
    let mut reconnects = 0;
    let mut detected = false;
    while reconnects < 50_000 {
        drop(b);
        b = server.connect("b").await;
        assert_eq!(b.welcome["state"], "in_session");
        reconnects += 1;
        if reconnects % 10 == 0
            && metric_value(&server.metrics().await, SLOW_CONSUMER).is_some_and(|n| n > 0.0)
        {
            detected = true;
            break;
        }
    }
    assert!(
        detected,
        "a never became a slow consumer after {reconnects} reconnects of its peer:\n{}",
        server.metrics().await
    );
    assert_eq!(
        server.metric(SLOW_CONSUMER).await,
        1.0,
        "one slow consumer, counted once"
    );

    // Now a reads: what made it through, then the end of the connection. The server gave up
    // on a blocked write, so there may be no close frame, and the kernel may even reset the
    // connection and discard data in flight (e.g. when a's pong to a late ping hits the
    // closed socket): whatever a got must be a gap-free prefix, and resume must supply the rest.
    let end = a.closed().await;
    assert!(
        matches!(end, Closed::Eof | Closed::Code(4003)),
        "a's connection should end as a slow consumer: {end:?}"
    );
    let got = seqs(&a);
    assert_consecutive("a (first connection)", &got, 1);
    let a_last = a.last_seq();
    // seen: welcome, queued, matched, then peer_status events only.
    for v in &a.seen[3..] {
        assert_eq!(v["type"], "peer_status", "{v}");
    }
    drop(a);

    let mut a = server
        .connect_with("a", &resume_query(&resume_token, a_last))
        .await;
    assert_eq!(
        a.welcome["resumed"], true,
        "every missed event is still in the log: {}",
        a.welcome
    );
    assert_eq!(a.welcome["state"], "in_session");
    let latest = a.welcome["last_seq"].as_u64().unwrap();
    assert!(
        latest > a_last,
        "a must have missed events (read up to {a_last}, latest {latest})"
    );
    for _ in a_last..latest {
        let v = a.expect("peer_status").await;
        assert!(v["seq"].is_u64());
    }
    assert_consecutive("a (replay)", &seqs(&a), a_last + 1);
    assert_eq!(a.last_seq(), latest);
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["type"], "status", "nothing after the replay: {s}");
    assert_eq!(s["state"], "in_session");
    eprintln!(
        "slow consumer: {reconnects} reconnects of the peer; a read {a_last} events, {} replayed",
        latest - a_last
    );
}

/// A drained server leaves no background task behind: the grace expiry of a user who just
/// left (armed for ten minutes), queue updates and, in the scale-out mode, the subscriber,
/// heartbeat and recovery loops are all tracked while the server runs and cancelled and
/// awaited by the drain.
async fn drain_leaves_no_background_task(extra: &[&str]) {
    let mut args = vec!["--resume-grace-ms", "600000"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args).await;
    let background = server.background.clone();
    let mut waiting = server.connect("waits").await;
    waiting
        .send(json!({"type": "enqueue", "ref": "q", "prefs": {}}))
        .await;
    waiting.expect("queued").await;
    let leaving = server.connect("leaves").await;
    leaving.close().await;
    // The detach armed the expiry: a tracked task, sleeping for the whole grace period.
    let armed = async {
        while background.running() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, armed)
        .await
        .expect("background work is tracked");
    assert!(!background.is_shut_down());
    server.shutdown().await;
    assert!(background.is_shut_down());
    assert_eq!(
        background.running(),
        0,
        "background tasks outlived the drain"
    );
}

#[tokio::test]
async fn a_drained_embedded_server_leaves_no_background_task() {
    drain_leaves_no_background_task(&[]).await;
}

#[tokio::test]
async fn a_drained_scale_out_server_leaves_no_background_task() {
    let redis = common::redis::Backend::single().await;
    let args = redis.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    drain_leaves_no_background_task(&args).await;
}
