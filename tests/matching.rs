//! Matching flows on one in-memory instance: match, roles, FIFO, prefs, skip, end, status and
//! queue updates, invalid transitions.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn two_users_match_with_complementary_roles() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    assert_eq!(a.welcome["user_id"], "alice");
    assert_eq!(a.welcome["state"], "idle");
    assert_eq!(a.welcome["protocol_version"], 1);

    let queued = a.request(json!({"type": "enqueue"}), "q1").await;
    assert_eq!(queued["type"], "queued");
    assert_eq!(queued["position"], 0);
    let queued_b = b.request(json!({"type": "enqueue"}), "q2").await;
    assert_eq!(queued_b["type"], "queued");

    let ma = a.expect("matched").await;
    let mb = b.expect("matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert_eq!(ma["role"], "offerer", "the user who waited longer offers");
    assert_eq!(mb["role"], "answerer");
    // Peer handles are opaque: never the real user id, and different on each side.
    assert_ne!(ma["peer"], "bob");
    assert_ne!(mb["peer"], "alice");
    assert_ne!(ma["peer"], mb["peer"]);
    // seq increases by one per state event.
    assert_eq!(queued["seq"], 1);
    assert_eq!(ma["seq"], 2);
    assert_eq!(server.metric("matchgate_matches_total").await, 1.0);
    assert_eq!(server.metric("matchgate_sessions_active").await, 1.0);
}

#[tokio::test]
async fn fifo_takes_the_longest_waiting_compatible_user() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    common::match_up(&mut a, &mut b).await;

    // a skips: a is re-queued first, then b; they avoid each other, so both wait.
    let ended = a.request(json!({"type": "skip"}), "s").await;
    assert_eq!(ended["type"], "session_ended");
    assert_eq!(ended["reason"], "skip");
    assert_eq!(ended["requeued"], true);
    let qa = a.expect("queued").await;
    assert_eq!(qa["position"], 0);
    let eb = b.expect("session_ended").await;
    assert_eq!(eb["reason"], "peer_skipped");
    assert_eq!(eb["requeued"], true);
    let qb = b.expect("queued").await;
    assert_eq!(qb["position"], 1, "b waits behind a");

    // c arrives: takes a (waited longest). d arrives: takes b.
    let mut c = server.connect("c").await;
    c.send(json!({"type": "enqueue"})).await;
    c.expect("queued").await;
    let mc = c.expect("matched").await;
    let ma = a.expect("matched").await;
    assert_eq!(mc["session_id"], ma["session_id"]);
    assert_eq!(ma["role"], "offerer");

    let mut d = server.connect("d").await;
    d.send(json!({"type": "enqueue"})).await;
    d.expect("queued").await;
    let md = d.expect("matched").await;
    // b's position changed from 1 to 0 when a left; the throttled update may arrive first.
    let mut mb = b.next().await.unwrap();
    if mb["type"] == "queue_update" {
        assert_eq!(mb["position"], 0);
        mb = b.expect("matched").await;
    }
    assert_eq!(mb["type"], "matched");
    assert_eq!(md["session_id"], mb["session_id"]);
}

#[tokio::test]
async fn prefs_keep_users_apart() {
    let server = TestServer::start(&[]).await;
    let mut music = server.connect("m").await;
    let mut sport = server.connect("s").await;
    let mut music2 = server.connect("m2").await;
    music
        .send(json!({"type": "enqueue", "prefs": {"topic": "music", "language": "en"}}))
        .await;
    music.expect("queued").await;
    sport
        .send(json!({"type": "enqueue", "prefs": {"topic": "sport", "language": "en"}}))
        .await;
    let q = sport.expect("queued").await;
    assert_eq!(q["position"], 0, "a different pool: nobody ahead");
    // Only language set is a different pool from topic+language.
    let status = sport.request(json!({"type": "status"}), "st").await;
    assert_eq!(status["state"], "queued");
    music2
        .send(json!({"type": "enqueue", "prefs": {"language": "en", "topic": "music"}}))
        .await;
    music2.expect("queued").await;
    let a = music.expect("matched").await;
    let b = music2.expect("matched").await;
    assert_eq!(a["session_id"], b["session_id"]);
    let status = sport.request(json!({"type": "status"}), "st2").await;
    assert_eq!(status["state"], "queued", "sport still waits: {status}");
    assert_eq!(server.metric("matchgate_queue_length").await, 1.0);
}

#[tokio::test]
async fn end_in_session_tells_the_peer_and_requeues_nobody() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    a.send(json!({"type": "enqueue"})).await;
    b.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.expect("queued").await;
    let m = a.expect("matched").await;
    b.expect("matched").await;

    let ended = a.request(json!({"type": "end"}), "e1").await;
    assert_eq!(ended["type"], "session_ended");
    assert_eq!(ended["reason"], "end");
    assert_eq!(ended["requeued"], false);
    assert_eq!(ended["session_id"], m["session_id"]);
    let eb = b.expect("session_ended").await;
    assert_eq!(eb["reason"], "peer_ended");
    assert_eq!(eb["requeued"], false);
    for c in [&mut a, &mut b] {
        let s = c.request(json!({"type": "status"}), "st").await;
        assert_eq!(s["state"], "idle");
    }
    assert_eq!(
        server
            .metric(r#"matchgate_sessions_ended_total{reason="end"}"#)
            .await,
        1.0
    );
    assert_eq!(server.metric("matchgate_sessions_active").await, 0.0);
}

#[tokio::test]
async fn end_while_queued_leaves_the_queue() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("a").await;
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    let left = a.request(json!({"type": "end"}), "bye").await;
    assert_eq!(left["type"], "dequeued");
    assert_eq!(left["reason"], "end");
    // Nobody waits now: a new user does not match a.
    let mut b = server.connect("b").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "queued");
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "idle");
}

#[tokio::test]
async fn skip_without_requeueing_the_peer_when_configured() {
    let server = TestServer::start(&["--requeue-peer-on-skip", "false"]).await;
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    a.send(json!({"type": "enqueue"})).await;
    b.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.expect("queued").await;
    a.expect("matched").await;
    b.expect("matched").await;
    a.send(json!({"type": "skip"})).await;
    a.expect("session_ended").await;
    a.expect("queued").await;
    let eb = b.expect("session_ended").await;
    assert_eq!(eb["reason"], "peer_skipped");
    assert_eq!(eb["requeued"], false);
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "idle");
}

#[tokio::test]
async fn invalid_transitions_change_nothing() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("a").await;
    for (frame, why) in [
        (json!({"type": "skip"}), "skip while idle"),
        (json!({"type": "end"}), "end while idle"),
    ] {
        let e = a.request(frame, "x").await;
        assert_eq!(e["type"], "error", "{why}");
        assert_eq!(e["code"], "invalid_state", "{why}");
    }
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    let e = a.request(json!({"type": "enqueue"}), "again").await;
    assert_eq!(e["code"], "invalid_state");
    let e = a.request(json!({"type": "skip"}), "skip-queued").await;
    assert_eq!(e["code"], "invalid_state");
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "queued");
    assert_eq!(s["position"], 0);

    let mut b = server.connect("b").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    b.expect("matched").await;
    let m = a.expect("matched").await;
    let e = a.request(json!({"type": "enqueue"}), "in-session").await;
    assert_eq!(e["code"], "invalid_state");
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "in_session");
    // status repeats what `matched` said, for a client that lost it.
    assert_eq!(s["session_id"], m["session_id"]);
    assert_eq!(s["peer"], m["peer"]);
    assert_eq!(s["role"], m["role"]);
    assert!(
        server
            .metric(r#"matchgate_protocol_errors_total{code="invalid_state"}"#)
            .await
            >= 5.0
    );
}

#[tokio::test]
async fn heartbeat_is_acknowledged() {
    let server = TestServer::start(&[]).await;
    let mut a = server.connect("a").await;
    let ack = a.request(json!({"type": "heartbeat"}), "hb").await;
    assert_eq!(ack["type"], "heartbeat_ack");
    assert!(ack["server_time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    a.send(json!({"type": "heartbeat"})).await;
    let ack = a.expect("heartbeat_ack").await;
    assert!(ack.get("ref").is_none());
}

#[tokio::test]
async fn queue_update_tells_a_waiting_user_they_moved_up() {
    let server = TestServer::start(&["--queue-update-interval-ms", "50"]).await;
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    a.send(json!({"type": "enqueue", "prefs": {"topic": "t"}}))
        .await;
    b.send(json!({"type": "enqueue", "prefs": {"topic": "t"}}))
        .await;
    a.expect("queued").await;
    b.expect("queued").await;
    a.expect("matched").await;
    b.expect("matched").await;
    b.send(json!({"type": "skip"})).await;
    b.expect("session_ended").await;
    b.expect("queued").await;
    a.expect("session_ended").await;
    let qa = a.expect("queued").await;
    assert_eq!(qa["position"], 1);
    // b (ahead of a) leaves the queue: a moves to the front.
    b.send(json!({"type": "end"})).await;
    b.expect("dequeued").await;
    let update = a.expect("queue_update").await;
    assert_eq!(update["position"], 0);
    assert!(
        update.get("seq").is_none(),
        "queue updates are not replayed"
    );
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["position"], 0);
}

#[test]
fn the_schema_check_rejects_undocumented_frames() {
    // Guards the guard: if the harness stopped checking, every test above would pass vacuously.
    let ok = json!({"type": "heartbeat_ack", "server_time_ms": 1});
    common::check_frame(&ok);
    for bad in [
        json!({"type": "heartbeat_ack", "server_time_ms": 1, "extra": true}),
        json!({"type": "matched", "session_id": "s"}),
        json!({"type": "no_such_type"}),
    ] {
        let result = std::panic::catch_unwind(|| common::check_frame(&bad));
        assert!(result.is_err(), "accepted {bad}");
    }
}
