//! Hostile and broken clients: malformed and wrongly typed frames, binary and oversized frames,
//! flooding, and the error budget. Each gets its error or close code, and nobody else notices.

mod common;

use common::{Client, Closed, TestServer};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Sends a raw text frame and expects an `error` with this code in reply.
async fn expect_error(client: &mut Client, text: &str, code: &str) -> Value {
    client.send_raw(Message::text(text.to_string())).await;
    let reply = client.expect("error").await;
    assert_eq!(reply["code"], code, "{text:?} gave {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    reply
}

fn close_code(closed: Closed) -> u16 {
    match closed {
        Closed::Code(code) => code,
        Closed::Eof => panic!("the connection ended without a close frame"),
    }
}

#[tokio::test]
async fn malformed_json_is_answered_and_the_connection_stays_usable() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("c").await;
    c.send(json!({"type": "enqueue"})).await;
    c.expect("queued").await;

    let e = expect_error(&mut c, "{not json", "bad_request").await;
    assert!(e.get("ref").is_none(), "{e}");
    expect_error(&mut c, r#"{"type":"heartbeat""#, "bad_request").await;
    expect_error(&mut c, "", "bad_request").await;

    let ack = c.request(json!({"type": "heartbeat"}), "h1").await;
    assert_eq!(ack["type"], "heartbeat_ack");
    let status = c.request(json!({"type": "status"}), "s1").await;
    assert_eq!(status["state"], "queued", "{status}");
    assert_eq!(status["position"], 0);
}

#[tokio::test]
async fn non_object_and_binary_frames_are_bad_requests() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("c").await;
    expect_error(&mut c, "[1,2]", "bad_request").await;
    expect_error(&mut c, r#"[{"type":"heartbeat"}]"#, "bad_request").await;
    expect_error(&mut c, "42", "bad_request").await;
    expect_error(&mut c, r#""heartbeat""#, "bad_request").await;
    expect_error(&mut c, "null", "bad_request").await;

    c.send_raw(Message::binary(br#"{"type":"heartbeat"}"#.to_vec()))
        .await;
    let e = c.expect("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");

    let ack = c.request(json!({"type": "heartbeat"}), "h").await;
    assert_eq!(ack["type"], "heartbeat_ack");
}

#[tokio::test]
async fn unknown_and_missing_types() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("c").await;

    let e = expect_error(&mut c, r#"{"type":"dance","ref":"r9"}"#, "unknown_type").await;
    assert_eq!(e["ref"], "r9", "the error echoes the ref: {e}");
    let e = expect_error(&mut c, r#"{"type":"Heartbeat"}"#, "unknown_type").await;
    assert!(e.get("ref").is_none(), "{e}");
    // A very long unknown type does not make the error frame long.
    let long = format!(r#"{{"type":"{}","ref":"r10"}}"#, "x".repeat(1000));
    let e = expect_error(&mut c, &long, "unknown_type").await;
    assert_eq!(e["ref"], "r10");
    assert!(e.to_string().len() < 400, "{e}");

    let e = expect_error(&mut c, r#"{"ref":"r11"}"#, "bad_request").await;
    assert_eq!(e["ref"], "r11", "{e}");
    expect_error(&mut c, r#"{}"#, "bad_request").await;
    expect_error(&mut c, r#"{"type":null}"#, "bad_request").await;

    let ack = c.request(json!({"type": "heartbeat"}), "h").await;
    assert_eq!(ack["type"], "heartbeat_ack");
}

#[tokio::test]
async fn wrongly_typed_fields_are_bad_requests_and_change_nothing() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("c").await;
    let long_pref = "t".repeat(65);
    let long_ref = "r".repeat(65);
    let cases = [
        json!({"type": 5}),
        json!({"type": ["enqueue"]}),
        json!({"type": "enqueue", "prefs": {"topic": 5}}),
        json!({"type": "enqueue", "prefs": {"colour": "red"}}),
        json!({"type": "enqueue", "prefs": {"topic": ""}}),
        json!({"type": "enqueue", "prefs": {"topic": long_pref}}),
        json!({"type": "enqueue", "prefs": {"region": "eu", "language": ""}}),
        json!({"type": "enqueue", "prefs": "music"}),
        json!({"type": "enqueue", "prefs": [1]}),
        json!({"type": "heartbeat", "ref": 5}),
        json!({"type": "heartbeat", "ref": {"id": "x"}}),
        json!({"type": "heartbeat", "ref": long_ref}),
    ];
    // Within the default error budget of 10 per connection: two connections share the cases.
    let (first, second) = cases.split_at(cases.len() / 2);
    for (client, cases) in [(&mut c, first), (&mut server.connect("d").await, second)] {
        for case in cases {
            let e = expect_error(client, &case.to_string(), "bad_request").await;
            assert!(
                e.get("ref").is_none(),
                "no valid ref to echo in {case}: {e}"
            );
        }
        let status = client.request(json!({"type": "status"}), "s").await;
        assert_eq!(status["state"], "idle", "a refused enqueue changes nothing");
    }

    // A bad prefs value with a good ref: the error echoes it.
    let e = expect_error(
        &mut c,
        r#"{"type":"enqueue","ref":"e1","prefs":{"topic":""}}"#,
        "bad_request",
    )
    .await;
    assert_eq!(e["ref"], "e1");
    // Boundaries: 64 characters are fine for prefs and ref; unknown top-level fields ignored.
    let ok = c
        .request(
            json!({"type": "enqueue", "prefs": {"topic": "t".repeat(64)}, "future": true}),
            &"r".repeat(64),
        )
        .await;
    assert_eq!(ok["type"], "queued", "{ok}");
}

#[tokio::test]
async fn bad_interests_and_wants_are_bad_requests_that_echo_the_ref_and_change_nothing() {
    let server = TestServer::start(&[
        "--attribute-claims",
        "country",
        "--filterable-attributes",
        "country",
        "--error-budget",
        "100",
    ])
    .await;
    let mut c = server.connect("c").await;
    let eleven: Vec<String> = (0..11).map(|i| format!("tag{i}")).collect();
    let nine: serde_json::Map<String, Value> =
        (0..9).map(|i| (format!("a{i}"), json!(["x"]))).collect();
    let seventeen: Vec<String> = (0..17).map(|i| i.to_string()).collect();
    // Each case with what the message must say.
    let cases = [
        (json!({"interests": eleven}), "at most 10"),
        (json!({"interests": vec!["same"; 11]}), "at most 10"),
        (json!({"interests": ["jazz", "   "]}), "prefs.interests"),
        (json!({"interests": [""]}), "prefs.interests"),
        (json!({"interests": ["x".repeat(33)]}), "1 to 32 characters"),
        (json!({"interests": ["a\u{1}b"]}), "control characters"),
        (json!({"interests": "jazz"}), "invalid enqueue"),
        (json!({"interests": [1]}), "invalid enqueue"),
        (
            json!({"interests_only": true}),
            "interests_only needs prefs.interests",
        ),
        (
            json!({"interests": [], "interests_only": true}),
            "interests_only needs",
        ),
        (json!({"interests_only": 1}), "invalid enqueue"),
        (json!({"want": nine}), "at most 8"),
        (json!({"want": {"Country": ["de"]}}), "attribute names"),
        (json!({"want": {"": ["de"]}}), "attribute names"),
        (json!({"want": {"country": []}}), "1 to 16 values"),
        (json!({"want": {"country": seventeen}}), "1 to 16 values"),
        (json!({"want": {"country": [""]}}), "prefs.want.country"),
        (
            json!({"want": {"country": ["x".repeat(65)]}}),
            "prefs.want.country",
        ),
        (json!({"want": {"country": "de"}}), "invalid enqueue"),
        (json!({"want": ["country"]}), "invalid enqueue"),
        (json!({"soft": ["want.country"]}), "which is not set"),
        (
            json!({"want": {"country": ["de"]}, "soft": ["want.gender"]}),
            "want.gender, which is not set",
        ),
        (
            json!({"want": {"country": ["de"]}, "soft": ["want.country", "want.country"]}),
            "twice",
        ),
        (json!({"soft": ["want."]}), "unknown soft field"),
        (json!({"soft": ["interests"]}), "unknown soft field"),
    ];
    for (i, (prefs, says)) in cases.iter().enumerate() {
        let reference = format!("b{i}");
        let e = c
            .request(json!({"type": "enqueue", "prefs": prefs}), &reference)
            .await;
        assert_eq!(e["code"], "bad_request", "{prefs}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(says), "{prefs}: {message}");
    }
    let status = c.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "idle", "a refused enqueue changes nothing");
    // The limits themselves are fine.
    let ten: Vec<String> = (0..10).map(|i| format!(" Tag{i} ")).collect();
    let sixteen: Vec<String> = (0..16).map(|i| "v".repeat(64 - i)).collect();
    let ok = c
        .request(
            json!({"type": "enqueue", "prefs": {
                "interests": ten,
                "interests_only": true,
                "want": {"country": sixteen},
                "soft": ["want.country"],
            }}),
            "ok",
        )
        .await;
    assert_eq!(ok["type"], "queued", "{ok}");
}

#[tokio::test]
async fn oversized_frame_closes_with_1009_and_nobody_else_notices() {
    let server = TestServer::start(&[]).await;
    // A queued user and a session, before the offence.
    let mut waiting = server.connect("waiting").await;
    waiting
        .send(json!({"type": "enqueue", "prefs": {"topic": "lonely"}}))
        .await;
    waiting.expect("queued").await;
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    common::match_up(&mut a, &mut b).await;

    let mut offender = server.connect("offender").await;
    assert_eq!(offender.welcome["max_message_bytes"], 4096);
    // Valid JSON, a valid message even, just too big.
    let big = json!({"type": "heartbeat", "padding": "p".repeat(5000)}).to_string();
    assert!(big.len() > 4096);
    offender.send_raw(Message::text(big)).await;
    assert_eq!(close_code(offender.closed().await), 1009);
    assert!(
        !offender
            .seen
            .iter()
            .any(|f| f["type"] == "heartbeat_ack" || f["type"] == "error"),
        "the oversized frame is not processed: {:?}",
        offender.seen
    );

    // The queued user keeps the place and still gets matched.
    let status = waiting.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "queued");
    assert_eq!(status["position"], 0);
    let mut partner = server.connect("partner").await;
    partner
        .send(json!({"type": "enqueue", "prefs": {"topic": "lonely"}}))
        .await;
    partner.expect("queued").await;
    let m1 = partner.expect("matched").await;
    let m2 = waiting.expect("matched").await;
    assert_eq!(m1["session_id"], m2["session_id"]);

    // The session goes on.
    let status = a.request(json!({"type": "status"}), "sa").await;
    assert_eq!(status["state"], "in_session");
    let ended = a.request(json!({"type": "end"}), "e").await;
    assert_eq!(ended["type"], "session_ended");
    let peer = b.expect("session_ended").await;
    assert_eq!(peer["reason"], "peer_ended");

    // The offender can come back (and is idle: it held no state).
    let again = server.connect("offender").await;
    assert_eq!(again.welcome["state"], "idle");
}

#[tokio::test]
async fn flooding_is_rate_limited_then_closed_with_4004() {
    let server =
        TestServer::start(&["--rate-limit-burst", "5", "--rate-limit-per-minute", "60"]).await;
    let mut c = server.connect("flood").await;
    // One message at a time, as fast as the replies come back: no sleeps, so the bucket (one
    // token per second) has no time to refill noticeably.
    let mut acks = 0;
    let mut limited = 0;
    let mut code = None;
    for i in 0..200 {
        c.send(json!({"type": "heartbeat", "ref": format!("h{i}")}))
            .await;
        match c.next().await {
            Ok(frame) if frame["type"] == "heartbeat_ack" => acks += 1,
            Ok(frame) => {
                assert_eq!(frame["type"], "error", "{frame}");
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                let retry = frame["retry_after_ms"].as_u64();
                assert!(
                    retry.is_some_and(|ms| ms > 0),
                    "rate_limited carries retry_after_ms: {frame}"
                );
                limited += 1;
            }
            Err(closed) => {
                code = Some(close_code(closed));
                break;
            }
        }
    }
    assert_eq!(code, Some(4004), "flooding ends the connection");
    assert!(acks >= 5, "the burst is served: {acks} acks");
    assert!(limited >= 1, "some messages are refused");
    // Default error budget: 10 errors, the 11th closes.
    assert_eq!(limited, 11, "error budget of 10, the 11th error closes");
    assert_eq!(
        server
            .metric("matchgate_protocol_errors_total{code=\"rate_limited\"}")
            .await,
        11.0
    );
}

#[tokio::test]
async fn a_client_that_floods_without_reading_still_learns_why_it_was_closed() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("flood").await;
    // 600 heartbeats written in one go, nothing read meanwhile: far more than the rate limit
    // and the error budget allow, so the gateway closes while most of them are still unread.
    // Writes may fail once the gateway has closed; what matters is what the client reads.
    for i in 0..600 {
        let frame = json!({"type": "heartbeat", "ref": format!("h{i}")});
        if c.ws.feed(Message::text(frame.to_string())).await.is_err() {
            break;
        }
    }
    let _ = c.ws.flush().await;
    // Like a client busy with something else, read only once the gateway has long closed.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        close_code(c.closed().await),
        4004,
        "frames read: {:?}",
        c.seen
    );
    let limited = c
        .seen
        .iter()
        .filter(|frame| frame["code"] == "rate_limited")
        .count();
    assert_eq!(limited, 11, "every error before the close arrives too");
}

#[tokio::test]
async fn a_burst_of_messages_gets_rate_limited() {
    // Sent all at once without reading: some are answered, the rest are refused.
    let server =
        TestServer::start(&["--rate-limit-burst", "5", "--rate-limit-per-minute", "60"]).await;
    let mut c = server.connect("burst").await;
    for _ in 0..8 {
        c.send(json!({"type": "heartbeat"})).await;
    }
    let mut acks = 0;
    let mut limited = 0;
    for _ in 0..8 {
        let frame = c.next().await.expect("a reply per message");
        match frame["type"].as_str() {
            Some("heartbeat_ack") => acks += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                assert!(frame["retry_after_ms"].as_u64().is_some(), "{frame}");
                limited += 1;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert!(acks >= 5 && limited >= 1, "{acks} acks, {limited} refused");
}

#[tokio::test]
async fn error_budget_exhausted_closes_with_4004() {
    let server = TestServer::start(&["--error-budget", "3"]).await;
    let mut c = server.connect("sloppy").await;
    for _ in 0..4 {
        c.send_raw(Message::text("{oops")).await;
    }
    let closed = c.closed().await;
    let errors: Vec<&Value> = c.seen.iter().filter(|f| f["type"] == "error").collect();
    assert_eq!(
        errors.len(),
        4,
        "every error is sent before the close: {:?}",
        c.seen
    );
    assert!(errors.iter().all(|e| e["code"] == "bad_request"));
    assert_eq!(close_code(closed), 4004);
    assert_eq!(
        server
            .metric("matchgate_disconnects_total{code=\"4004\"}")
            .await,
        1.0
    );

    // Another connection is unaffected, and a fresh connection has a fresh budget.
    let mut again = server.connect("sloppy").await;
    expect_error(&mut again, "{oops", "bad_request").await;
    let ack = again.request(json!({"type": "heartbeat"}), "h").await;
    assert_eq!(ack["type"], "heartbeat_ack");
}

#[tokio::test]
async fn bad_input_errors_are_counted_in_metrics() {
    let server = TestServer::start(&[]).await;
    let name = "matchgate_protocol_errors_total{code=\"bad_request\"}";
    assert_eq!(server.metric(name).await, 0.0);
    let mut c = server.connect("c").await;
    expect_error(&mut c, "{not json", "bad_request").await;
    expect_error(&mut c, "[1]", "bad_request").await;
    c.send_raw(Message::binary(vec![1, 2, 3])).await;
    c.expect("error").await;
    expect_error(
        &mut c,
        r#"{"type":"enqueue","prefs":{"topic":5}}"#,
        "bad_request",
    )
    .await;
    expect_error(&mut c, r#"{"type":"dance"}"#, "unknown_type").await;
    assert_eq!(server.metric(name).await, 4.0);
    assert_eq!(
        server
            .metric("matchgate_protocol_errors_total{code=\"unknown_type\"}")
            .await,
        1.0
    );
}
