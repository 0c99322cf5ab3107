//! The relay of `signal` and `chat` between the members of a live session, and media mode
//! `p2p` (the ICE servers and TURN credentials of `matched`).
//!
//! Scenarios marked `on_every_engine!` run three times: on the in-memory engine, and across two
//! instances sharing a real `redis-server` and a real 3-master Redis Cluster, with the two users
//! on different instances. Relayed frames are compared byte for byte with what was sent; TURN
//! credentials are recomputed here with HMAC-SHA1, independently of the gateway's code.

mod common;

use base64::Engine as _;
use common::redis::{command, Backend, RedisServer};
use common::{match_up, Client, Closed, TestServer, SECRET};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;
use tokio_tungstenite::tungstenite::Message;

/// Where a scenario runs.
enum Engine {
    Memory,
    Redis(Backend),
}

impl Engine {
    /// Fresh gateways with `flags`: one in memory, or two instances on the Redis.
    async fn gateways(&self, flags: &[&str]) -> Vec<TestServer> {
        match self {
            Engine::Memory => vec![TestServer::start(flags).await],
            Engine::Redis(backend) => backend.instances(2, flags).await,
        }
    }
}

/// Runs a scenario on the in-memory engine, on one Redis and on a Redis Cluster.
macro_rules! on_every_engine {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(super::Engine::Memory).await;
            }

            #[tokio::test]
            async fn single_redis() {
                super::$name(super::Engine::Redis(super::Backend::single().await)).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                super::$name(super::Engine::Redis(super::Backend::cluster().await)).await;
            }
        }
    };
}

/// `a` on the first gateway and `b` on the last (another instance, with Redis), matched with
/// each other (`a` offers); returns both `matched`.
async fn pair(servers: &[TestServer], a: &str, b: &str) -> (Client, Client, Value, Value) {
    let mut a = servers[0].connect(a).await;
    let mut b = servers[servers.len() - 1].connect(b).await;
    let (ma, mb) = match_up(&mut a, &mut b).await;
    (a, b, ma, mb)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A signal frame as a client writes it, with the payload text exactly as given.
fn signal_frame(reference: &str, payload: &str) -> Message {
    Message::text(format!(
        r#"{{"type":"signal","ref":"{reference}","payload":{payload}}}"#
    ))
}

/// Sends `frame` with `ref` and expects `error` `code` echoing it.
async fn refused(c: &mut Client, frame: Value, code: &str) {
    let e = c.request(frame.clone(), "no").await;
    assert_eq!(e["type"], "error", "{frame} got {e}");
    assert_eq!(e["code"], code, "{frame} got {e}");
}

/// A `status` round trip: proves that nothing else was on its way to `c` before it.
async fn settled(c: &mut Client) -> Value {
    c.request(json!({"type": "status"}), "sync").await
}

on_every_engine!(signals_and_chat_reach_the_peer_in_order_byte_for_byte);
async fn signals_and_chat_reach_the_peer_in_order_byte_for_byte(engine: Engine) {
    // Room for all 100 at once in the sender's budget and in the peer's outbound queue (a peer
    // that cannot take them is a slow consumer, which is not what this is about).
    let flags = ["--signal-burst", "1000", "--outbound-queue", "256"];
    let servers = engine.gateways(&flags).await;
    let (mut a, mut b, ma, _) = pair(&servers, "alice", "bob").await;
    let sid = ma["session_id"].as_str().unwrap().to_string();
    // Written the way no serialiser would write them: a re-encoded payload would differ.
    let payload = |i: usize| {
        format!(
            r#"{{ "n" :{i}, "sdp":"v=0\r\no=- {i} 2 IN IP4 127.0.0.1\r\n", "x": 1.50e2, "u":"\u00e9\/" , "deep":{{"a":[1, 2 ,{{}}]}} }}"#
        )
    };
    for i in 0..100 {
        a.send_raw(signal_frame(&format!("s{i}"), &payload(i)))
            .await;
    }
    for i in 0..100 {
        let ack = a.expect("ack").await;
        assert_eq!(
            ack,
            json!({"type": "ack", "action": "signal", "ref": format!("s{i}")})
        );
    }
    for i in 0..100 {
        b.expect("signal").await;
        assert_eq!(
            b.last_raw,
            format!(
                r#"{{"type":"signal","session_id":"{sid}","payload":{}}}"#,
                payload(i)
            )
        );
    }

    // Signals and chat of one sender stay in order, whichever rate budget they spend.
    let before = now_ms();
    b.send(json!({"type": "signal", "ref": "b1", "payload": {"type": "answer"}}))
        .await;
    b.send(json!({"type": "chat", "ref": "b2", "text": "hi \"there\" \u{2713}"}))
        .await;
    b.send(json!({"type": "signal", "ref": "b3", "payload": {"candidate": null}}))
        .await;
    for (r, action) in [("b1", "signal"), ("b2", "chat"), ("b3", "signal")] {
        let ack = b.expect("ack").await;
        assert_eq!(
            (ack["ref"].as_str(), ack["action"].as_str()),
            (Some(r), Some(action))
        );
    }
    let first = a.expect("signal").await;
    assert_eq!(first["payload"], json!({"type": "answer"}));
    let chat = a.expect("chat").await;
    assert_eq!(chat["session_id"], sid.as_str());
    assert_eq!(chat["text"], "hi \"there\" \u{2713}");
    let sent_at = chat["sent_at_ms"].as_u64().unwrap();
    assert!(
        (before..=now_ms()).contains(&sent_at),
        "sent_at_ms {sent_at}"
    );
    let third = a.expect("signal").await;
    assert_eq!(third["payload"], json!({"candidate": null}));
    settled(&mut a).await;
    settled(&mut b).await;

    // Counted on the sender's instance.
    let mut relayed = [0.0; 2];
    for server in &servers {
        for (i, kind) in ["signal", "chat"].iter().enumerate() {
            relayed[i] += server
                .metric(&format!(r#"matchgate_relayed_total{{kind="{kind}"}}"#))
                .await;
        }
    }
    assert_eq!(relayed, [102.0, 1.0]);
}

on_every_engine!(relays_need_a_live_session);
async fn relays_need_a_live_session(engine: Engine) {
    let servers = engine.gateways(&["--accept-timeout-ms", "60000"]).await;
    let mut a = servers[0].connect("alice").await;
    let mut b = servers[servers.len() - 1].connect("bob").await;
    let signal = json!({"type": "signal", "payload": {"type": "offer", "sdp": "v=0"}});
    let chat = json!({"type": "chat", "text": "hello?"});
    // Idle.
    refused(&mut a, signal.clone(), "invalid_state").await;
    refused(&mut a, chat.clone(), "invalid_state").await;
    // Queued.
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    refused(&mut a, signal.clone(), "invalid_state").await;
    refused(&mut a, chat.clone(), "invalid_state").await;
    // Proposed (accept phase): a pair, but not a live session yet.
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    let proposal = a.expect("match_proposed").await;
    b.expect("match_proposed").await;
    refused(&mut a, signal.clone(), "invalid_state").await;
    refused(&mut b, chat.clone(), "invalid_state").await;
    // Live.
    for c in [&mut a, &mut b] {
        c.send(json!({"type": "accept", "match_id": proposal["match_id"]}))
            .await;
    }
    for c in [&mut a, &mut b] {
        let mut kinds = [
            c.next().await.expect("open")["type"].clone(),
            c.next().await.expect("open")["type"].clone(),
        ];
        kinds.sort_by_key(|k| k.to_string());
        assert_eq!(kinds, [json!("ack"), json!("matched")]);
    }
    let ack = a.request(signal.clone(), "live").await;
    assert_eq!(ack["type"], "ack");
    let got = b.expect("signal").await;
    assert_eq!(got["payload"], signal["payload"]);
    // Over.
    b.send(json!({"type": "end"})).await;
    b.expect("session_ended").await;
    a.expect("session_ended").await;
    refused(&mut a, signal.clone(), "invalid_state").await;
    refused(&mut a, chat, "invalid_state").await;
    // Nothing refused reached the other one.
    assert_eq!(settled(&mut b).await["state"], "idle");
}

#[tokio::test]
async fn bad_signals_and_chats_get_bad_request_and_reach_nobody() {
    let server = TestServer::start(&["--max-signal-bytes", "1024", "--error-budget", "100"]).await;
    let (mut a, mut b, _, _) = pair(std::slice::from_ref(&server), "alice", "bob").await;
    for payload in [
        json!(null),
        json!([1, 2]),
        json!("offer"),
        json!(5),
        json!({"pad": "x".repeat(1024 - 10 + 1)}),
    ] {
        refused(
            &mut a,
            json!({"type": "signal", "payload": payload}),
            "bad_request",
        )
        .await;
    }
    refused(&mut a, json!({"type": "signal"}), "bad_request").await;
    for text in [
        json!(""),
        json!("a".repeat(1001)),
        json!("line\nbreak"),
        json!("tab\there"),
        json!("nul\u{0}"),
        json!("del\u{7f}"),
        json!("c1\u{85}"),
        json!(42),
    ] {
        refused(&mut a, json!({"type": "chat", "text": text}), "bad_request").await;
    }
    refused(&mut a, json!({"type": "chat"}), "bad_request").await;

    // At the limits: accepted, and the only frames the peer gets.
    let fits = json!({"pad": "x".repeat(1024 - 10)}).to_string();
    assert_eq!(fits.len(), 1024);
    a.send_raw(signal_frame("fits", &fits)).await;
    assert_eq!(a.expect("ack").await["ref"], "fits");
    let longest = "\u{e9}".repeat(1000);
    let ack = a
        .request(json!({"type": "chat", "text": longest}), "longest")
        .await;
    assert_eq!(ack["action"], "chat");
    b.expect("signal").await;
    assert!(b.last_raw.ends_with(&format!(r#""payload":{fits}}}"#)));
    assert_eq!(b.expect("chat").await["text"], longest.as_str());
    assert_eq!(settled(&mut b).await["state"], "in_session");
}

#[tokio::test]
async fn only_signals_may_exceed_max_message_bytes_and_only_up_to_their_own_limit() {
    let server = TestServer::start(&[]).await;
    let (mut a, mut b, _, _) = pair(std::slice::from_ref(&server), "alice", "bob").await;
    assert_eq!(a.welcome["max_message_bytes"], 4096);
    assert_eq!(a.welcome["max_signal_bytes"], 16384);
    // A payload of exactly max_signal_bytes (a large SDP offer) crosses.
    let offer_of = |sdp: usize| json!({"type": "offer", "sdp": "a".repeat(sdp)}).to_string();
    let room = 16384 - offer_of(0).len();
    let offer = offer_of(room);
    assert_eq!(offer.len(), 16384);
    a.send_raw(signal_frame("big", &offer)).await;
    assert_eq!(a.expect("ack").await["ref"], "big");
    b.expect("signal").await;
    assert!(b.last_raw.ends_with(&format!(r#""payload":{offer}}}"#)));
    // One byte more: refused, the connection stays.
    let over = offer_of(room + 1);
    a.send_raw(signal_frame("over", &over)).await;
    let e = a.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_request"), Some("over"))
    );

    // A signal frame beyond max_signal_bytes + 1024: closed with 1009.
    let limit = 16384 + 1024;
    let head = r#"{"type":"signal","payload":{"sdp":""#;
    let padded = |len: usize| format!("{head}{}\"}}}}", "a".repeat(len - head.len() - 3));
    assert_eq!(padded(limit + 1).len(), limit + 1);
    a.send_raw(Message::text(padded(limit + 1))).await;
    assert!(matches!(a.closed().await, Closed::Code(1009)));

    // Other frames keep max_message_bytes: 4096 bytes pass, 4097 close with 1009.
    let heartbeat = |len: usize| {
        let head = r#"{"type":"heartbeat","pad":""#;
        format!("{head}{}\"}}", "x".repeat(len - head.len() - 2))
    };
    let mut c = server.connect("carol").await;
    c.send_raw(Message::text(heartbeat(4096))).await;
    c.expect("heartbeat_ack").await;
    c.send_raw(Message::text(heartbeat(4097))).await;
    assert!(matches!(c.closed().await, Closed::Code(1009)));
    let mut d = server.connect("dave").await;
    let chat = json!({"type": "chat", "text": "y".repeat(4100)}).to_string();
    d.send_raw(Message::text(chat)).await;
    assert!(matches!(d.closed().await, Closed::Code(1009)));
    // Not JSON, but large: not a signal either.
    let mut e = server.connect("erin").await;
    e.send_raw(Message::text(format!(
        "{{\"type\":\"signal\",{}",
        "z".repeat(5000)
    )))
    .await;
    assert!(matches!(e.closed().await, Closed::Code(1009)));
}

#[tokio::test]
async fn a_burst_of_signals_passes_and_a_flood_is_limited_then_closed() {
    // The default burst (60); slow refills, so that a slow machine cannot refill the buckets
    // while the flood runs: 3 errors are let through, the 4th closes.
    let server = TestServer::start(&[
        "--signal-per-minute",
        "1",
        "--error-budget",
        "3",
        "--error-budget-refill-ms",
        "600000",
    ])
    .await;
    let (mut a, mut b, _, _) = pair(std::slice::from_ref(&server), "alice", "bob").await;
    // A burst of 50 ICE candidates at once: all through, in order.
    let candidate = |i: usize| {
        json!({"candidate": {"candidate": format!("candidate:{i} 1 udp 2122260223 127.0.0.1 {} typ host", 50000 + i), "sdpMid": "0"}})
            .to_string()
    };
    for i in 0..50 {
        a.send_raw(signal_frame(&format!("c{i}"), &candidate(i)))
            .await;
    }
    for i in 0..50 {
        assert_eq!(a.expect("ack").await["ref"], format!("c{i}"));
        b.expect("signal").await;
        assert!(b
            .last_raw
            .ends_with(&format!(r#""payload":{}}}"#, candidate(i))));
    }
    // A flood: beyond the bucket each signal is refused (echoing its ref, with when to try
    // again) and costs error budget, until the connection is closed with 4004. One frame at a
    // time, so that the gateway has read everything when it closes.
    let (mut acks, mut limited) = (50, 0);
    let closed = loop {
        let i = acks + limited;
        assert!(i < 1000, "never limited");
        a.send_raw(signal_frame(&format!("c{i}"), &candidate(i)))
            .await;
        match a.next().await {
            Ok(v) if v["type"] == "ack" => {
                assert_eq!(limited, 0, "an ack after the bucket ran dry: {v}");
                acks += 1;
            }
            Ok(v) => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                assert_eq!(v["message"], "too many signals");
                assert_eq!(v["ref"], format!("c{i}"));
                assert!(v["retry_after_ms"].as_u64().unwrap() > 0);
                limited += 1;
                // The error the budget has no room for is followed by the close.
                if limited == 4 {
                    break a.closed().await;
                }
            }
            Err(closed) => panic!("closed without an error first: {closed:?}"),
        }
    };
    assert!(matches!(closed, Closed::Code(4004)), "{closed:?}");
    assert!(acks >= 60, "the burst of 60 passed: {acks}");
    // The peer got exactly the signals that were acknowledged, then the sender's drop.
    for _ in 50..acks {
        b.expect("signal").await;
    }
    assert_eq!(b.expect("peer_status").await["state"], "reconnecting");
}

#[tokio::test]
async fn signals_and_other_messages_spend_separate_budgets() {
    let server = TestServer::start(&[
        "--signal-burst",
        "3",
        "--signal-per-minute",
        "1",
        "--rate-limit-burst",
        "5",
        "--rate-limit-per-minute",
        "1",
        "--error-budget",
        "100",
    ])
    .await;
    let (mut a, mut b, _, _) = pair(std::slice::from_ref(&server), "alice", "bob").await;
    // Alice spends her general budget: heartbeats are refused (no ref: not looked at)...
    let refused_heartbeat = loop {
        a.send(json!({"type": "heartbeat", "ref": "h"})).await;
        let v = a.next().await.expect("open");
        if v["type"] == "error" {
            break v;
        }
        assert_eq!(v["type"], "heartbeat_ack");
    };
    assert_eq!(refused_heartbeat["code"], "rate_limited");
    assert!(refused_heartbeat.get("ref").is_none());
    // ...but her signals pass, up to their own burst.
    for i in 0..3 {
        let ack = a
            .request(json!({"type": "signal", "payload": {"i": i}}), "s")
            .await;
        assert_eq!(ack["type"], "ack");
    }
    let e = a
        .request(json!({"type": "signal", "payload": {"i": 3}}), "s4")
        .await;
    assert_eq!(
        (e["code"].as_str(), e["message"].as_str()),
        (Some("rate_limited"), Some("too many signals"))
    );
    for i in 0..3 {
        assert_eq!(b.expect("signal").await["payload"]["i"], i);
    }
    // Bob spends his signal budget; his other messages still pass.
    for i in 0..3 {
        b.request(json!({"type": "signal", "payload": {"i": i}}), "t")
            .await;
    }
    let e = b
        .request(json!({"type": "signal", "payload": {"i": 3}}), "t4")
        .await;
    assert_eq!(e["code"], "rate_limited");
    let ack = b
        .request(json!({"type": "chat", "text": "still here"}), "c")
        .await;
    assert_eq!(ack["action"], "chat");
    b.request(json!({"type": "heartbeat"}), "h").await;
}

on_every_engine!(relayed_messages_are_not_replayed_after_a_resume);
async fn relayed_messages_are_not_replayed_after_a_resume(engine: Engine) {
    let servers = engine.gateways(&["--resume-grace-ms", "20000"]).await;
    let (mut a, mut b, _, _) = pair(&servers, "alice", "bob").await;
    a.request(json!({"type": "signal", "payload": {"n": 1}}), "s1")
        .await;
    assert_eq!(b.expect("signal").await["payload"]["n"], 1);
    let token = b.welcome["resume_token"].as_str().unwrap().to_string();
    drop(b); // gone without a close handshake
    assert_eq!(a.expect("peer_status").await["state"], "reconnecting");
    // Sent while bob is away: acknowledged, and lost.
    let ack = a
        .request(json!({"type": "signal", "payload": {"n": 2}}), "s2")
        .await;
    assert_eq!(ack["type"], "ack");
    let ack = a
        .request(json!({"type": "chat", "text": "are you there?"}), "c")
        .await;
    assert_eq!(ack["type"], "ack");

    // Bob resumes (on alice's instance) from the very start: his events come again, the
    // relayed messages do not.
    let mut b = servers[0]
        .connect_with("bob", &format!("resume={token}&last_seq=0"))
        .await;
    assert_eq!(b.welcome["resumed"], true);
    assert_eq!(b.welcome["state"], "in_session");
    b.expect("queued").await;
    b.expect("matched").await;
    assert_eq!(settled(&mut b).await["state"], "in_session");
    assert_eq!(a.expect("peer_status").await["state"], "connected");
    // From now on they flow again (the SDK restarts ICE at this point).
    a.request(json!({"type": "signal", "payload": {"n": 3}}), "s3")
        .await;
    assert_eq!(b.expect("signal").await["payload"]["n"], 3);
}

/// HMAC-SHA1 of `username` under `secret`, in base64: what coturn's `use-auth-secret` checks.
fn turn_credential(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

on_every_engine!(matched_lists_the_ice_servers_with_credentials_of_each_members_own);
async fn matched_lists_the_ice_servers_with_credentials_of_each_members_own(engine: Engine) {
    // Nothing configured: no servers (enough on loopback and LANs).
    let servers = engine.gateways(&[]).await;
    let (_a, _b, ma, mb) = pair(&servers, "u1", "u2").await;
    for m in [&ma, &mb] {
        assert_eq!(m["media"], json!({"provider": "p2p", "ice_servers": []}));
    }
    // STUN only.
    let stun = "stun:127.0.0.1:3478,stun:[::1]:3478";
    let servers = engine.gateways(&["--stun-urls", stun]).await;
    let (_a, _b, ma, _) = pair(&servers, "u3", "u4").await;
    let stun_entry = json!({"urls": ["stun:127.0.0.1:3478", "stun:[::1]:3478"]});
    assert_eq!(
        ma["media"],
        json!({"provider": "p2p", "ice_servers": [stun_entry]})
    );
    // STUN and TURN. The second secret is longer than a SHA-1 block (HMAC hashes it first)
    // and not ASCII.
    let turn_urls = ["turn:127.0.0.1:3478?transport=udp", "turns:127.0.0.1:5349"];
    let long = format!("{}\u{e9}", "long-secret-".repeat(9));
    for (round, secret) in ["a-turn-secret-of-40-bytes-0123456789abcd", &long]
        .into_iter()
        .enumerate()
    {
        let flags = [
            "--stun-urls",
            stun,
            "--turn-urls",
            &turn_urls.join(","),
            "--turn-secret",
            secret,
            "--turn-ttl-s",
            "600",
        ];
        let servers = engine.gateways(&flags).await;
        let (a, b) = (format!("alice{round}"), format!("bob{round}"));
        let (_a, _b, ma, mb) = pair(&servers, &a, &b).await;
        for (me, other, user) in [(&ma, &mb, &a), (&mb, &ma, &b)] {
            let ice = me["media"]["ice_servers"].as_array().unwrap();
            assert_eq!(me["media"]["provider"], "p2p");
            assert_eq!(ice.len(), 2, "{me}");
            assert_eq!(ice[0], stun_entry);
            assert_eq!(ice[1]["urls"], json!(turn_urls));
            // Named after my own handle: the one the other member was told as `peer`.
            let username = ice[1]["username"].as_str().unwrap();
            let expiry = me["started_at_ms"].as_u64().unwrap() / 1000 + 600;
            assert_eq!(
                username,
                format!("{expiry}:{}", other["peer"].as_str().unwrap())
            );
            assert!(!username.contains(user.as_str()));
            assert_eq!(ice[1]["credential"], turn_credential(secret, username));
        }
        assert_ne!(
            ma["media"]["ice_servers"][1]["credential"],
            mb["media"]["ice_servers"][1]["credential"]
        );
    }
}

fn strings(v: &redis::Value) -> Vec<String> {
    match v {
        redis::Value::Array(items) => items.iter().flat_map(strings).collect(),
        redis::Value::BulkString(b) => vec![String::from_utf8_lossy(b).into_owned()],
        redis::Value::SimpleString(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// The TURN secret reaches Redis only in the call that writes an instance's configuration,
/// never as an argument of the matching calls (where SLOWLOG and MONITOR would show it), and
/// a configuration that is gone (expired, flushed) is written again by the next call.
#[tokio::test]
async fn in_redis_the_turn_secret_is_only_an_argument_of_the_configuration_write() {
    use futures_util::StreamExt as _;
    let redis = RedisServer::start().await;
    let url = redis.url();
    // Every command with all its arguments (SLOWLOG cuts each argument at 128 bytes).
    let monitor = redis::Client::open(url.as_str())
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let collect = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut lines = monitor.into_on_message::<String>();
            while let Some(line) = lines.next().await {
                seen.lock().unwrap().push(line);
            }
        })
    };
    let secret = "slowlog-turn-secret-0123456789abcdefghij";
    let flags = [
        "--turn-urls",
        "turn:127.0.0.1:3478",
        "--turn-secret",
        secret,
    ];
    let backend = Backend::Single(redis);
    let servers = backend.instances(2, &flags).await;
    let (mut a, mut b, _, _) = pair(&servers, "alice", "bob").await;
    a.request(json!({"type": "end"}), "e").await;
    b.expect("session_ended").await;

    // The instances' configurations disappear: the next calls write them again.
    let keys = strings(&command(&url, &["KEYS", "{mg}:v2:p2p:*"]).await);
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        command(&url, &["DEL", key]).await;
    }
    let (ma, mb) = match_up(&mut a, &mut b).await;
    for (me, other) in [(&ma, &mb), (&mb, &ma)] {
        let turn = &me["media"]["ice_servers"][0];
        let username = turn["username"].as_str().unwrap();
        assert!(username.ends_with(other["peer"].as_str().unwrap()));
        assert_eq!(turn["credential"], turn_credential(secret, username));
    }
    // A command after the last call, so that every call before it was seen.
    command(&url, &["ECHO", "monitor-done"]).await;
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("monitor-done"))
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    collect.abort();

    let (mut writes, mut calls) = (0, 0);
    for line in seen.lock().unwrap().iter() {
        // The calls themselves, not the commands the library runs inside them.
        if !line.contains("\"FCALL\"") {
            continue;
        }
        calls += 1;
        if line.contains(secret) {
            assert!(line.contains("\"p2p_config\""), "{line}");
            writes += 1;
        }
    }
    assert!(calls > 10, "{calls} matching calls seen");
    assert!(
        writes >= 3,
        "two start-up writes and at least one rewrite: {writes}"
    );
}

#[tokio::test]
async fn a_p2p_configuration_that_makes_no_sense_stops_the_start() {
    let long = "s".repeat(32);
    for (flags, says) in [
        (
            vec!["--turn-urls", "turn:127.0.0.1:3478"],
            "MATCHGATE_TURN_URLS needs MATCHGATE_TURN_SECRET",
        ),
        (
            vec!["--turn-secret", long.as_str()],
            "MATCHGATE_TURN_SECRET is set but MATCHGATE_TURN_URLS is not",
        ),
        (
            vec!["--turn-urls", "turn:t:3478", "--turn-secret", "too-short"],
            "MATCHGATE_TURN_SECRET must be at least 32 bytes",
        ),
        (vec!["--stun-urls", "udp://s:3478"], "--stun-urls"),
        (vec!["--max-signal-bytes", "10"], "--max-signal-bytes"),
        (vec!["--signal-per-minute", "0"], "--signal-per-minute"),
    ] {
        let mut args = vec![
            "matchgate",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
        ];
        args.extend(&flags);
        // A flag's own rule is clap's (the value is refused as it is parsed); a rule across
        // flags is checked when the server starts.
        let refusal = match <matchgate::Config as clap::Parser>::try_parse_from(&args) {
            Err(e) => e.to_string(),
            Ok(config) => match matchgate::Server::bind(config).await {
                Ok(_) => panic!("{flags:?} started"),
                Err(e) => e.to_string(),
            },
        };
        assert!(refusal.contains(says), "{flags:?}: {refusal}");
    }
}

#[tokio::test]
async fn the_start_up_line_names_the_media_mode() {
    let gateway = common::process::GatewayProcess::start(&[
        "--jwt-secret",
        SECRET,
        "--stun-urls",
        "stun:127.0.0.1:3478",
    ])
    .await;
    gateway.wait_for_log("media: p2p").await;
}
