//! Media mode `livekit`: a room and a token per member for every match, the room deleted after
//! every kind of end, signed webhooks, and the sweep. LiveKit itself cannot run here: a fake
//! RoomService on a loopback port checks what the real one checks (see `common::livekit`),
//! and the official Node SDK cross-checks tokens and webhook signatures when it is installed.

mod common;

use std::collections::HashSet;

use common::livekit::{
    post_webhook, sign_webhook, webhook_body, Call, FakeLiveKit, Mode, KEY, SECRET as LK_SECRET,
};
use common::redis::RedisServer;
use common::{match_up, Client, TestServer};
use serde_json::{json, Value};

/// Media flags for a gateway in front of `fake`, plus `extra` (flag and value pairs).
fn media_args(fake: &FakeLiveKit, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--livekit-url",
        "wss://media.example.test",
        "--livekit-api-url",
        &fake.url(),
        "--livekit-api-key",
        KEY,
        "--livekit-api-secret",
        LK_SECRET,
        "--livekit-empty-timeout-s",
        "17",
        "--livekit-departure-timeout-s",
        "4",
        "--livekit-request-timeout-ms",
        "300",
        "--livekit-create-deadline-ms",
        "600",
        "--resume-grace-ms",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A flag in `extra` replaces the default above.
    for pair in extra.chunks(2) {
        if let Some(i) = args.iter().position(|a| a == pair[0]) {
            args.drain(i..i + 2);
        }
        args.extend(pair.iter().map(|s| s.to_string()));
    }
    args
}

async fn gateway(fake: &FakeLiveKit, extra: &[&str]) -> TestServer {
    let args = media_args(fake, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start(&args).await
}

fn creates(calls: &[Call], room: &str) -> usize {
    calls
        .iter()
        .filter(|c| c.method == "CreateRoom" && c.room == room && c.status == 200)
        .count()
}

fn deletes(calls: &[Call], room: &str) -> usize {
    calls
        .iter()
        .filter(|c| c.method == "DeleteRoom" && c.room == room)
        .count()
}

/// Posts `body` signed the way LiveKit signs it.
async fn post_signed(base: &str, body: &str) -> (u16, String) {
    post_webhook(base, body, Some(&sign_webhook(body, KEY, LK_SECRET))).await
}

/// Decodes a join token with the API secret, checking signature, issuer and expiry.
fn join_claims(token: &str) -> Value {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[KEY]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(LK_SECRET.as_bytes()),
        &validation,
    )
    .expect("join token verifies with the API secret")
    .claims
}

#[tokio::test]
async fn a_match_gets_a_room_first_then_one_token_per_member() {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    let server = gateway(&fake, &["--livekit-token-ttl-s", "900"]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    let ma = a.expect("matched").await;
    // The room existed before anyone heard of the match.
    let room = ma["media"]["room"].as_str().unwrap().to_string();
    assert_eq!(creates(&fake.calls(), &room), 1);
    let mb = b.expect("matched").await;
    assert_eq!(room, format!("mg_{}", ma["session_id"].as_str().unwrap()));
    assert_eq!(mb["media"]["room"], room.as_str());
    let stored = fake.room(&room).expect("the room exists");
    assert_eq!(stored["max_participants"], 2);
    assert_eq!(stored["empty_timeout"], 17);
    assert_eq!(stored["departure_timeout"], 4);

    for (me, peer_view) in [(&ma, &mb), (&mb, &ma)] {
        assert_eq!(me["media"]["provider"], "livekit");
        assert_eq!(me["media"]["url"], "wss://media.example.test");
        let claims = join_claims(me["media"]["token"].as_str().unwrap());
        // The identity is the member's handle, which is what the peer knows them as.
        assert_eq!(claims["sub"], peer_view["peer"]);
        assert!(!claims["sub"].as_str().unwrap().contains("alice"));
        assert!(!claims["sub"].as_str().unwrap().contains("bob"));
        let video = &claims["video"];
        assert_eq!(video["roomJoin"], true);
        assert_eq!(video["room"], room.as_str());
        assert_eq!(video["canPublish"], true);
        assert_eq!(video["canSubscribe"], true);
        assert_eq!(video["canPublishData"], true);
        assert!(video.get("roomCreate").is_none() && video.get("roomAdmin").is_none());
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(),
            900
        );
    }
    assert_eq!(
        server
            .metric("matchgate_livekit_rooms_total{event=\"created\"}")
            .await,
        1.0
    );
}

/// `a` then `b` enqueue; returns once the gateway has asked LiveKit for their room.
async fn pair_up_until_the_room_is_asked_for(fake: &FakeLiveKit, a: &mut Client, b: &mut Client) {
    for c in [a, b] {
        c.send(json!({"type": "enqueue"})).await;
        c.expect("queued").await;
    }
    fake.wait_for(|calls| calls.iter().any(|c| c.method == "CreateRoom"))
        .await;
}

/// Matches `a` and `b` and returns the room and both `matched` frames.
async fn matched_room(a: &mut Client, b: &mut Client) -> (String, Value, Value) {
    let (ma, mb) = match_up(a, b).await;
    let room = ma["media"]["room"].as_str().unwrap().to_string();
    (room, ma, mb)
}

#[tokio::test]
async fn the_room_goes_after_every_kind_of_end() {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    let server = gateway(&fake, &["--requeue-peer-on-skip", "false"]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;

    // skip
    let (room, _, _) = matched_room(&mut a, &mut b).await;
    a.send(json!({"type": "skip"})).await;
    a.expect("session_ended").await;
    a.expect("queued").await;
    b.expect("session_ended").await;
    fake.wait_for(|c| deletes(c, &room) == 1).await;
    assert!(!fake.rooms().contains(&room));
    a.send(json!({"type": "end"})).await;
    a.expect("dequeued").await;

    // end
    let mut c = server.connect("carol").await;
    let (room, _, _) = matched_room(&mut a, &mut c).await;
    c.send(json!({"type": "end"})).await;
    c.expect("session_ended").await;
    a.expect("session_ended").await;
    fake.wait_for(|calls| deletes(calls, &room) == 1).await;

    // disconnect, then the grace period runs out
    let (room, _, _) = matched_room(&mut a, &mut c).await;
    c.close().await;
    a.expect("peer_status").await;
    let ended = a.expect("session_ended").await;
    assert_eq!(ended["reason"], "peer_disconnected");
    fake.wait_for(|calls| deletes(calls, &room) == 1).await;
    assert!(fake.rooms().is_empty(), "rooms left: {:?}", fake.rooms());
}

/// The next `matched`, allowing only what a waiting user may see meanwhile.
async fn next_matched(c: &mut Client) -> Value {
    loop {
        let v = c.next().await.expect("open");
        match v["type"].as_str() {
            Some("matched") => return v,
            Some("error") => assert_eq!(v["code"], "media_unavailable"),
            Some("queue_update") => {}
            _ => panic!("unexpected frame while queued: {v}"),
        }
    }
}

#[tokio::test]
async fn livekit_failing_sends_both_back_to_the_queue_and_recovery_matches_them() {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    fake.set_mode(Mode::FailCreate);
    let server = gateway(&fake, &[]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    for c in [&mut a, &mut b] {
        let e = c.expect("error").await;
        assert_eq!(e["code"], "media_unavailable");
        assert!(e.get("seq").is_none() && e.get("ref").is_none());
    }
    // Several attempts were made before giving up.
    assert!(
        fake.calls()
            .iter()
            .filter(|c| c.method == "CreateRoom")
            .count()
            >= 2
    );
    fake.set_mode(Mode::Healthy);
    // Still queued the whole time: once LiveKit is back, they are matched (perhaps after one
    // more `media_unavailable` from an attempt that was already running).
    let ma = next_matched(&mut a).await;
    let mb = next_matched(&mut b).await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert!(ma["media"]["token"].is_string());
    assert!(
        server
            .metric("matchgate_livekit_rooms_total{event=\"create_failed\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_hanging_livekit_is_bounded_and_leaving_meanwhile_loses_nothing() {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    fake.set_mode(Mode::Hang);
    let server = gateway(&fake, &["--livekit-create-deadline-ms", "5000"]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    let mut c = server.connect("carol").await;
    pair_up_until_the_room_is_asked_for(&fake, &mut a, &mut b).await;
    // While the room is being made, both still look queued.
    let status = a.request(json!({"type": "status"}), "s1").await;
    assert_eq!(status["state"], "queued");
    let again = a.request(json!({"type": "enqueue"}), "e1").await;
    assert_eq!(again["code"], "invalid_state");
    // bob leaves: he is out, alice keeps her place and meets carol.
    b.send(json!({"type": "end"})).await;
    assert_eq!(b.expect("dequeued").await["reason"], "end");
    fake.set_mode(Mode::Healthy);
    c.send(json!({"type": "enqueue"})).await;
    c.expect("queued").await;
    let ma = a.expect("matched").await;
    let mc = c.expect("matched").await;
    assert_eq!(ma["session_id"], mc["session_id"]);
    // bob heard nothing more; his abandoned room (if it was made) is deleted.
    let status = b.request(json!({"type": "status"}), "s2").await;
    assert_eq!(status["state"], "idle");
}

/// A gateway in front of a fresh fake LiveKit, with alice and bob matched in a room.
struct InRoom {
    fake: FakeLiveKit,
    server: TestServer,
    /// The gateway's base URL, for webhooks.
    base: String,
    a: Client,
    b: Client,
    room: String,
    /// bob's `matched`: its `peer` is alice's handle.
    mb: Value,
}

async fn in_room() -> InRoom {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    let server = gateway(&fake, &[]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    let (room, _, mb) = matched_room(&mut a, &mut b).await;
    InRoom {
        fake,
        base: server.http_url(""),
        server,
        a,
        b,
        room,
        mb,
    }
}

#[tokio::test]
async fn a_participant_leaving_ends_the_session_and_requeues_the_peer() {
    let InRoom {
        fake,
        server,
        base,
        mut a,
        mut b,
        room,
        mb,
    } = in_room().await;
    // alice's identity is the handle bob knows her by.
    let alice = mb["peer"].as_str().unwrap();
    let body = webhook_body("participant_left", &room, Some(alice), "EV_1");
    let (status, text) = post_signed(&base, &body).await;
    assert_eq!((status, text.trim()), (200, "ended"));
    let ea = a.expect("session_ended").await;
    assert_eq!(ea["reason"], "media_disconnected");
    assert_eq!(ea["requeued"], false);
    let eb = b.expect("session_ended").await;
    assert_eq!(eb["reason"], "media_disconnected");
    assert_eq!(eb["requeued"], true);
    b.expect("queued").await;
    fake.wait_for(|c| deletes(c, &room) == 1).await;

    // The same event again: a duplicate, nothing happens.
    let (status, text) = post_signed(&base, &body).await;
    assert_eq!((status, text.trim()), (200, "duplicate"));
    // A different event for the room of a session that already ended.
    let late = webhook_body("room_finished", &room, None, "EV_2");
    let (status, text) = post_signed(&base, &late).await;
    assert_eq!((status, text.trim()), (200, "no_session"));
    // Nobody heard anything more: alice is idle, bob still waits.
    assert_eq!(
        a.request(json!({"type": "status"}), "s").await["state"],
        "idle"
    );
    assert_eq!(
        b.request(json!({"type": "status"}), "s").await["state"],
        "queued"
    );
    assert_eq!(
        server
            .metric("matchgate_livekit_webhooks_total{result=\"duplicate\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn room_finished_ends_the_session_for_both() {
    let InRoom {
        fake: _fake,
        server: _server,
        base,
        mut a,
        mut b,
        room,
        ..
    } = in_room().await;
    let body = webhook_body("room_finished", &room, None, "EV_9");
    let (status, _) = post_signed(&base, &body).await;
    assert_eq!(status, 200);
    for c in [&mut a, &mut b] {
        let e = c.expect("session_ended").await;
        assert_eq!(e["reason"], "media_disconnected");
        assert_eq!(e["requeued"], false);
    }
}

#[tokio::test]
async fn forged_tampered_unsigned_and_foreign_webhooks_change_nothing() {
    let InRoom {
        fake,
        server,
        base,
        mut a,
        b: _b,
        room,
        mb,
    } = in_room().await;
    let alice = mb["peer"].as_str().unwrap();
    let body = webhook_body("participant_left", &room, Some(alice), "EV_F1");

    // Signed with the wrong secret.
    let forged = sign_webhook(&body, KEY, "not-the-secret-not-the-secret-not-the");
    assert_eq!(post_webhook(&base, &body, Some(&forged)).await.0, 401);
    // Signed by the wrong key name.
    let other_key = sign_webhook(&body, "otherkey", LK_SECRET);
    assert_eq!(post_webhook(&base, &body, Some(&other_key)).await.0, 401);
    // A valid signature over a different body.
    let tampered = body.replace("EV_F1", "EV_F2");
    let signature = sign_webhook(&body, KEY, LK_SECRET);
    assert_eq!(
        post_webhook(&base, &tampered, Some(&signature)).await.0,
        401
    );
    // No signature at all; a Bearer-prefixed one is not how LiveKit signs either.
    assert_eq!(post_webhook(&base, &body, None).await.0, 401);
    assert_eq!(
        post_webhook(&base, &body, Some(&format!("Bearer {signature}")))
            .await
            .0,
        401
    );
    // Signed, but not an event.
    let junk = "{not json";
    assert_eq!(
        post_webhook(&base, junk, Some(&sign_webhook(junk, KEY, LK_SECRET)))
            .await
            .0,
        400
    );
    // Properly signed, but for rooms that are not this gateway's sessions.
    for other in ["mg_s_doesnotexist", "someone-elses-room"] {
        let body = webhook_body(
            "participant_left",
            other,
            Some(alice),
            &format!("EV_{other}"),
        );
        let (status, text) = post_signed(&base, &body).await;
        assert_eq!((status, text.trim()), (200, "no_session"));
    }
    // Events the gateway does not act on are acknowledged.
    let joined = webhook_body("participant_joined", &room, Some(alice), "EV_J");
    let (status, text) = post_signed(&base, &joined).await;
    assert_eq!((status, text.trim()), (200, "ignored"));

    // The session is untouched.
    let status = a.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "in_session");
    assert_eq!(deletes(&fake.calls(), &room), 0);
    assert_eq!(
        server
            .metric("matchgate_livekit_webhooks_total{result=\"unauthorized\"}")
            .await,
        5.0
    );
}

#[tokio::test]
async fn without_livekit_there_is_no_webhook_endpoint_and_media_is_p2p() {
    let server = TestServer::start(&[]).await;
    let base = server.http_url("");
    let body = webhook_body("room_finished", "mg_s_x", None, "EV_X");
    let (status, _) = post_signed(&base, &body).await;
    assert_eq!(status, 404);
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    let (ma, _) = match_up(&mut a, &mut b).await;
    assert_eq!(ma["media"], json!({"provider": "p2p", "ice_servers": []}));
}

#[tokio::test]
async fn the_sweep_deletes_orphan_rooms_and_ends_sessions_whose_room_vanished() {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    let old = common::now_secs() as i64 - 3600;
    fake.insert_room("mg_s_orphan", old);
    fake.insert_room("not-ours", old);
    let server = gateway(&fake, &["--livekit-sweep-interval-ms", "100"]).await;
    fake.wait_for(|c| deletes(c, "mg_s_orphan") == 1).await;
    assert!(fake.rooms().contains(&"not-ours".to_string()));

    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    let (room, _, _) = matched_room(&mut a, &mut b).await;
    // LiveKit closes the room and its webhook never arrives.
    let rooms = livekit_api::services::room::RoomClient::with_api_key(&fake.url(), KEY, LK_SECRET);
    rooms.delete_room(&room).await.unwrap();
    for c in [&mut a, &mut b] {
        let e = c.expect("session_ended").await;
        assert_eq!(e["reason"], "media_disconnected");
    }
    assert!(fake.rooms().contains(&"not-ours".to_string()));
    assert!(
        server
            .metric("matchgate_livekit_rooms_total{event=\"orphan_found\"}")
            .await
            >= 1.0
    );
}

/// Two instances sharing one Redis, like behind a load balancer without sticky sessions.
async fn redis_pair(redis: &RedisServer, fake: &FakeLiveKit, extra: &[&str]) -> Vec<TestServer> {
    let mut servers = Vec::new();
    for i in 0..2 {
        let mut args = media_args(fake, extra);
        args.extend([
            "--redis-url".to_string(),
            redis.url(),
            "--instance-id".to_string(),
            format!("inst{i}"),
            "--instance-heartbeat-ms".to_string(),
            "100".to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        servers.push(TestServer::start(&args).await);
    }
    servers
}

#[tokio::test]
async fn across_instances_media_webhooks_and_the_sweep_work_once() {
    let redis = RedisServer::start().await;
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    let old = common::now_secs() as i64 - 3600;
    fake.insert_room("mg_s_orphan", old);
    let servers = redis_pair(&redis, &fake, &["--livekit-sweep-interval-ms", "100"]).await;
    let mut a = servers[0].connect("alice").await;
    let mut b = servers[1].connect("bob").await;
    let (room, ma, mb) = matched_room(&mut a, &mut b).await;
    assert_eq!(creates(&fake.calls(), &room), 1);
    assert_eq!(
        join_claims(ma["media"]["token"].as_str().unwrap())["sub"],
        mb["peer"]
    );
    assert_eq!(
        join_claims(mb["media"]["token"].as_str().unwrap())["sub"],
        ma["peer"]
    );

    // The webhook reaches the instance bob is not on... and the one he is on: each once.
    let bob = ma["peer"].as_str().unwrap();
    let body = webhook_body("participant_connection_aborted", &room, Some(bob), "EV_R1");
    let signature = sign_webhook(&body, KEY, LK_SECRET);
    let first = post_webhook(&servers[0].http_url(""), &body, Some(&signature)).await;
    let second = post_webhook(&servers[1].http_url(""), &body, Some(&signature)).await;
    assert_eq!((first.0, first.1.trim()), (200, "ended"));
    assert_eq!((second.0, second.1.trim()), (200, "duplicate"));
    let eb = b.expect("session_ended").await;
    assert_eq!(
        (eb["reason"].as_str(), eb["requeued"].as_bool()),
        (Some("media_disconnected"), Some(false))
    );
    let ea = a.expect("session_ended").await;
    assert_eq!(
        (ea["reason"].as_str(), ea["requeued"].as_bool()),
        (Some("media_disconnected"), Some(true))
    );
    fake.wait_for(|c| deletes(c, &room) == 1).await;

    // One instance sweeps: the orphan is deleted once, and the other instance never sweeps.
    fake.wait_for(|c| deletes(c, "mg_s_orphan") == 1).await;
    let mut sweeps = Vec::new();
    loop {
        sweeps.clear();
        for s in &servers {
            sweeps.push(s.metric("matchgate_livekit_sweeps_total").await);
        }
        if sweeps.iter().sum::<f64>() >= 5.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(sweeps.contains(&0.0), "both instances swept: {sweeps:?}");
    assert_eq!(deletes(&fake.calls(), "mg_s_orphan"), 1);
}

#[tokio::test]
async fn in_redis_mode_a_hanging_livekit_is_bounded_too() {
    let redis = RedisServer::start().await;
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    fake.set_mode(Mode::Hang);
    let servers = redis_pair(&redis, &fake, &[]).await;
    let mut a = servers[0].connect("alice").await;
    let mut b = servers[1].connect("bob").await;
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.expect("error").await["code"], "media_unavailable");
    }
    fake.set_mode(Mode::Healthy);
    let ma = next_matched(&mut a).await;
    assert!(ma["media"]["token"].is_string());
    let mut seen = HashSet::new();
    for c in servers.iter() {
        seen.insert(c.metric("matchgate_sessions_active").await as u64);
    }
    assert!(seen.contains(&1), "one session: {seen:?}");
}

/// The official LiveKit server SDK for Node verifies our join tokens, and webhooks it signs
/// the way the LiveKit server does are accepted. Runs where `.ci/run` installed the SDK
/// (`MATCHGATE_LIVEKIT_SDK_DIR`); elsewhere it says so and passes.
#[tokio::test]
async fn official_sdk_accepts_our_tokens_and_we_accept_its_webhooks() {
    let Some(sdk) = std::env::var_os("MATCHGATE_LIVEKIT_SDK_DIR") else {
        eprintln!(
            "SKIPPED: MATCHGATE_LIVEKIT_SDK_DIR is not set (.ci/run installs livekit-server-sdk)"
        );
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/livekit-sdk.mjs");
    let node = |args: &[&str]| {
        let out = std::process::Command::new("node")
            .arg(script)
            .args(args)
            .env("LIVEKIT_SDK_DIR", &sdk)
            .output()
            .expect("node runs");
        assert!(
            out.status.success(),
            "node {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    let server = gateway(&fake, &[]).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    let (room, ma, mb) = matched_room(&mut a, &mut b).await;
    for (me, peer_view) in [(&ma, &mb), (&mb, &ma)] {
        let claims: Value = serde_json::from_str(
            node(&[
                "verify-token",
                KEY,
                LK_SECRET,
                me["media"]["token"].as_str().unwrap(),
            ])
            .trim(),
        )
        .unwrap();
        assert_eq!(claims["sub"], peer_view["peer"]);
        assert_eq!(claims["video"]["room"], room.as_str());
        assert_eq!(claims["video"]["roomJoin"], true);
    }
    let body = webhook_body("participant_left", &room, mb["peer"].as_str(), "EV_SDK");
    let file = std::env::temp_dir().join(format!("mg-webhook-{}.json", std::process::id()));
    std::fs::write(&file, &body).unwrap();
    let auth = node(&["sign-webhook", KEY, LK_SECRET, file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    let (status, text) = post_webhook(&server.http_url(""), &body, Some(auth.trim())).await;
    assert_eq!((status, text.trim()), (200, "ended"));
    assert_eq!(
        a.expect("session_ended").await["reason"],
        "media_disconnected"
    );
}

#[tokio::test]
async fn a_member_dropping_while_the_room_is_made_is_announced_with_the_match() {
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    fake.set_mode(Mode::Hang);
    let server = gateway(
        &fake,
        &[
            "--resume-grace-ms",
            "30000",
            "--livekit-create-deadline-ms",
            "30000",
        ],
    )
    .await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    pair_up_until_the_room_is_asked_for(&fake, &mut a, &mut b).await;
    let token = b.welcome["resume_token"].as_str().unwrap().to_string();
    let last = b.last_seq();
    b.close().await;
    fake.set_mode(Mode::Healthy);
    let ma = a.expect("matched").await;
    assert_eq!(a.expect("peer_status").await["state"], "reconnecting");
    // bob comes back and gets his `matched` from the log; alice hears he is back.
    let mut b = server
        .connect_with("bob", &format!("resume={token}&last_seq={last}"))
        .await;
    assert_eq!(b.welcome["resumed"], true);
    let mb = b.expect("matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert!(mb["media"]["token"].is_string());
    assert_eq!(a.expect("peer_status").await["state"], "connected");
}

#[tokio::test]
async fn a_pending_match_whose_instance_died_is_undone_by_the_others() {
    use common::process::GatewayProcess;
    let redis = RedisServer::start().await;
    let fake = FakeLiveKit::start(KEY, LK_SECRET).await;
    fake.set_mode(Mode::Hang);
    // A grace long enough for bob to come back through another instance.
    let flags = [
        "--livekit-create-deadline-ms",
        "1500",
        "--resume-grace-ms",
        "5000",
    ];
    let mut survivor = redis_pair(&redis, &fake, &flags).await;
    survivor.truncate(1);
    let mut args = media_args(&fake, &flags);
    args.extend([
        "--jwt-secret".to_string(),
        common::SECRET.to_string(),
        "--redis-url".to_string(),
        redis.url(),
        "--instance-id".to_string(),
        "doomed".to_string(),
        "--instance-heartbeat-ms".to_string(),
        "100".to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut doomed = GatewayProcess::start(&args).await;
    doomed.wait_ready().await;
    let mut a = survivor[0].connect("alice").await;
    let mut b = doomed.connect("bob").await;
    // bob's enqueue makes the match, so the doomed instance sets up the room...
    pair_up_until_the_room_is_asked_for(&fake, &mut a, &mut b).await;
    // ...and dies before LiveKit answers. bob comes back through the other instance, so
    // nothing expires: only the pending deadline in Redis can undo the match.
    doomed.kill9();
    let query = format!(
        "resume={}&last_seq={}",
        b.welcome["resume_token"].as_str().unwrap(),
        b.last_seq()
    );
    let mut b = survivor[0].connect_with("bob", &query).await;
    assert_eq!(b.welcome["resumed"], true);
    assert_eq!(b.welcome["state"], "queued");
    for c in [&mut a, &mut b] {
        let e = loop {
            let v = c.next().await.expect("open");
            if v["type"] != "queue_update" {
                break v;
            }
        };
        assert_eq!(e["code"], "media_unavailable", "{e}");
    }
    // Back in the queue, they are paired again by the survivor, which makes the room.
    fake.set_mode(Mode::Healthy);
    let ma = next_matched(&mut a).await;
    let mb = next_matched(&mut b).await;
    assert_eq!(ma["session_id"], mb["session_id"]);
}
