//! Outbound webhooks against a receiver in the test (a real HTTP server on a loopback port):
//! every delivery is signed over its timestamp and body and verified here with the secret;
//! the events say what happened (sessions, reports, bans); a receiver that fails the first
//! attempts gets the same event again with the same id; one that refuses gets it once; a
//! receiver that never answers fills the bounded queue and the rest is dropped and counted; a
//! draining instance delivers what it still has;
//! with two instances on one Redis each session event is sent by exactly one of them; the
//! events an instance had taken when it was killed are taken over from the Redis outbox and
//! delivered by another with the same ids (one Redis, and Redis Cluster); a full outbox trims
//! the oldest and counts every one; and a bad receiver URL is refused at start-up.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::admin::{admin, ADMIN_TOKEN};
use common::process::GatewayProcess;
use common::redis::{Backend, RedisServer};
use common::{match_up, TestServer, PATIENCE};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "webhook-secret-webhook-secret-webhook!";

/// What the receiver answers.
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    /// 503, then 429, for the first this many attempts of each event id; then 200.
    FailFirst(usize),
    /// 400 to everything.
    Refuse,
    /// Never answers.
    Hang,
    /// 503 until [`Receiver::open`] is called, then 200.
    UnavailableUntilOpened,
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    status: u16,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

struct Receiver {
    addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    opened: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let opened = Arc::new(AtomicBool::new(false));
        let state = (answer, deliveries.clone(), opened.clone());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            deliveries,
            opened,
        }
    }

    /// From now on, [`Answer::UnavailableUntilOpened`] answers 200.
    fn open(&self) {
        self.opened.store(true, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    /// The events answered with 200, by id.
    fn delivered(&self) -> HashMap<String, Value> {
        self.deliveries()
            .iter()
            .filter(|d| d.status == 200)
            .map(|d| (d.id.clone(), d.json()))
            .collect()
    }

    /// Waits until `n` distinct events were answered with 200.
    async fn until_delivered(&self, n: usize) -> HashMap<String, Value> {
        eventually(&format!("{n} events delivered"), || {
            self.delivered().len() >= n
        })
        .await;
        self.delivered()
    }
}

type ReceiverState = (Answer, Arc<Mutex<Vec<Delivery>>>, Arc<AtomicBool>);

async fn receive(
    State((answer, deliveries, opened)): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let id = header("matchgate-webhook-id");
    let status = {
        let mut list = deliveries.lock().unwrap();
        let earlier = list.iter().filter(|d| d.id == id).count();
        let status = match answer {
            Answer::Ok => StatusCode::OK,
            Answer::FailFirst(n) if earlier < n && earlier % 2 == 0 => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Answer::FailFirst(n) if earlier < n => StatusCode::TOO_MANY_REQUESTS,
            Answer::FailFirst(_) => StatusCode::OK,
            Answer::Refuse => StatusCode::BAD_REQUEST,
            Answer::Hang => StatusCode::OK,
            Answer::UnavailableUntilOpened if opened.load(Ordering::SeqCst) => StatusCode::OK,
            Answer::UnavailableUntilOpened => StatusCode::SERVICE_UNAVAILABLE,
        };
        list.push(Delivery {
            id,
            timestamp: header("matchgate-webhook-timestamp"),
            signature: header("matchgate-webhook-signature"),
            body: String::from_utf8(body.to_vec()).expect("a UTF-8 body"),
            status: status.as_u16(),
        });
        status
    };
    if matches!(answer, Answer::Hang) {
        std::future::pending::<()>().await;
    }
    status
}

/// A receiver's check, written from the README: HMAC-SHA256 under the secret over
/// `<timestamp>.<body>`, hex, after `v1=`.
fn verifies(secret: &str, d: &Delivery) -> bool {
    let Some(hex) = d.signature.strip_prefix("v1=") else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(d.timestamp.as_bytes());
    mac.update(b".");
    mac.update(d.body.as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == hex
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("never happened: {what}"));
}

fn flags<'a>(receiver: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--webhook-url",
        receiver,
        "--webhook-secret",
        SECRET,
        "--admin-token",
        ADMIN_TOKEN,
    ];
    flags.extend_from_slice(extra);
    flags
}

fn events_of<'a>(events: &'a HashMap<String, Value>, kind: &str) -> Vec<&'a Value> {
    events.values().filter(|e| e["type"] == kind).collect()
}

#[tokio::test]
async fn events_are_signed_and_say_what_happened() {
    let receiver = Receiver::start(Answer::Ok).await;
    let url = receiver.url();
    let server = TestServer::start(&flags(&url, &[])).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    let (matched, _) = match_up(&mut a, &mut b).await;
    let session = matched["session_id"].as_str().unwrap();
    let reply = a
        .request(
            json!({"type": "report", "reason": "spam", "details": "ads"}),
            "r",
        )
        .await;
    assert_eq!(reply["type"], "ack");
    a.request(json!({"type": "end"}), "e").await;
    b.expect("session_ended").await;
    let ban = json!({"kind": "user", "value": "carol", "ttl_s": 60, "reason": "abuse"});
    let (status, _) = admin(&server, "POST", "/v1/admin/bans", &ban.to_string()).await;
    assert_eq!(status, 201);

    let events = receiver.until_delivered(4).await;
    for d in receiver.deliveries() {
        assert!(verifies(SECRET, &d), "signature of {d:?}");
        assert!(!verifies("another-secret-another-secret-another", &d));
        let tampered = Delivery {
            body: format!("{} ", d.body),
            ..d.clone()
        };
        assert!(!verifies(SECRET, &tampered), "the body is signed");
        let stale = Delivery {
            timestamp: "1".into(),
            ..d.clone()
        };
        assert!(!verifies(SECRET, &stale), "the timestamp is signed");
        assert!(d.timestamp.parse::<u64>().is_ok(), "{d:?}");
        assert_eq!(d.json()["id"], d.id, "the header names the body's id");
    }
    let kinds: HashSet<&str> = events
        .values()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        HashSet::from([
            "session.started",
            "session.ended",
            "report.created",
            "user.banned"
        ])
    );
    let started = &events_of(&events, "session.started")[0]["data"];
    assert_eq!(started["session_id"], session);
    assert_eq!(started["users"], json!(["alice", "bob"]));
    assert_eq!(started["started_at_ms"], matched["started_at_ms"]);
    let ended = &events_of(&events, "session.ended")[0]["data"];
    assert_eq!(ended["session_id"], session);
    assert_eq!(ended["ended_by"], "alice");
    assert_eq!(ended["reason"], "end");
    assert_eq!(
        ended["duration_ms"].as_u64().unwrap(),
        ended["ended_at_ms"].as_u64().unwrap() - ended["started_at_ms"].as_u64().unwrap()
    );
    let report = &events_of(&events, "report.created")[0]["data"];
    assert_eq!(
        (
            &report["reporter"],
            &report["reported"],
            &report["reason"],
            &report["details"]
        ),
        (
            &json!("alice"),
            &json!("bob"),
            &json!("spam"),
            &json!("ads")
        )
    );
    let (_, listed) = admin(&server, "GET", "/v1/admin/reports", "").await;
    assert_eq!(
        report["report_id"], listed["reports"][0]["id"],
        "the id the admin API lists"
    );
    let banned = &events_of(&events, "user.banned")[0]["data"];
    assert_eq!(
        (
            &banned["kind"],
            &banned["value"],
            &banned["reason"],
            &banned["source"]
        ),
        (
            &json!("user"),
            &json!("carol"),
            &json!("abuse"),
            &json!("admin")
        )
    );
    assert_eq!(
        server
            .metric(r#"matchgate_webhook_events_total{result="delivered"}"#)
            .await,
        4.0
    );
}

/// A receiver answering with `answer`, a gateway sending to it, and a session between alice and
/// bob that alice just ended: two events (`session.started`, `session.ended`) on their way.
async fn one_session_ended(
    answer: Answer,
) -> (Receiver, TestServer, common::Client, common::Client) {
    let receiver = Receiver::start(answer).await;
    let server = TestServer::start(&flags(&receiver.url(), &[])).await;
    let mut a = server.connect("alice").await;
    let mut b = server.connect("bob").await;
    match_up(&mut a, &mut b).await;
    a.request(json!({"type": "end"}), "e").await;
    (receiver, server, a, b)
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_event_again() {
    let (receiver, server, _a, _b) = one_session_ended(Answer::FailFirst(2)).await;
    let events = receiver.until_delivered(2).await;
    let deliveries = receiver.deliveries();
    for id in events.keys() {
        let attempts: Vec<&Delivery> = deliveries.iter().filter(|d| &d.id == id).collect();
        let statuses: Vec<u16> = attempts.iter().map(|d| d.status).collect();
        assert_eq!(statuses, [503, 429, 200], "{id}");
        assert!(
            attempts.iter().all(|d| d.body == attempts[0].body),
            "the same event"
        );
        assert!(attempts.iter().all(|d| verifies(SECRET, d)));
    }
    let metric = |name: &'static str| {
        let server = &server;
        async move { server.metric(name).await }
    };
    assert_eq!(metric("matchgate_webhook_retries_total").await, 4.0);
    assert_eq!(
        metric(r#"matchgate_webhook_events_total{result="delivered"}"#).await,
        2.0
    );
    assert_eq!(
        metric(r#"matchgate_webhook_events_total{result="failed"}"#).await,
        0.0
    );
}

#[tokio::test]
async fn a_draining_instance_delivers_what_it_still_has() {
    let (receiver, server, a, mut b) = one_session_ended(Answer::FailFirst(2)).await;
    b.expect("session_ended").await;
    a.close().await;
    b.close().await;
    // The events still wait for their retries: the drain sends them before it ends.
    server.shutdown().await;
    assert_eq!(receiver.delivered().len(), 2);
}

#[tokio::test]
async fn a_refusing_receiver_gets_each_event_once() {
    let (receiver, server, _a, _b) = one_session_ended(Answer::Refuse).await;
    let failed = r#"matchgate_webhook_events_total{result="failed"}"#;
    let wait = async {
        while server.metric(failed).await < 2.0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("both events fail");
    let deliveries = receiver.deliveries();
    let ids: HashSet<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        (deliveries.len(), ids.len()),
        (2, 2),
        "a 400 is not retried"
    );
    assert_eq!(server.metric("matchgate_webhook_retries_total").await, 0.0);
}

#[tokio::test]
async fn past_the_bound_events_are_dropped_and_counted() {
    let receiver = Receiver::start(Answer::Hang).await;
    let url = receiver.url();
    let extra = ["--webhook-queue", "2", "--webhook-timeout-ms", "60000"];
    let server = TestServer::start(&flags(&url, &extra)).await;
    let sessions = 8;
    for i in 0..sessions {
        let mut a = server.connect(&format!("a{i}")).await;
        let mut b = server.connect(&format!("b{i}")).await;
        match_up(&mut a, &mut b).await;
        a.request(json!({"type": "end"}), "e").await;
    }
    let events = (2 * sessions) as f64;
    let dropped = r#"matchgate_webhook_events_total{result="dropped"}"#;
    let depth = "matchgate_webhook_queue_depth";
    // Every event is either waiting (queued or on its way to a receiver that never answers)
    // or dropped: none is lost without a trace.
    let wait = async {
        while server.metric(dropped).await + server.metric(depth).await < events {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("every event accounted for");
    let waiting = server.metric(depth).await;
    assert!(waiting <= 2.0 + 8.0, "bounded: {waiting}");
    assert_eq!(server.metric(dropped).await + waiting, events);
    assert!(server.metric(dropped).await >= events - 10.0);
}

#[tokio::test]
async fn with_two_redis_instances_each_session_event_is_sent_once() {
    let receiver = Receiver::start(Answer::Ok).await;
    let url = receiver.url();
    let redis = Backend::single().await;
    let servers = redis.instances(2, &flags(&url, &[])).await;
    let sessions = 12;
    let mut ids = Vec::new();
    for i in 0..sessions {
        let mut a = servers[0].connect(&format!("a{i}")).await;
        let mut b = servers[1].connect(&format!("b{i}")).await;
        let (matched, _) = match_up(&mut a, &mut b).await;
        ids.push(matched["session_id"].as_str().unwrap().to_string());
        // Ended from either side, so both instances produce events.
        let ender = if i % 2 == 0 { &mut a } else { &mut b };
        ender.request(json!({"type": "end"}), "e").await;
    }
    let events = receiver.until_delivered(2 * sessions).await;
    let delivered = r#"matchgate_webhook_events_total{result="delivered"}"#;
    let wait = async {
        loop {
            let total = servers[0].metric(delivered).await + servers[1].metric(delivered).await;
            if total >= (2 * sessions) as f64 {
                return total;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let total = tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("all delivered");
    assert_eq!(
        total,
        (2 * sessions) as f64,
        "no instance sent an event twice"
    );
    let mut per_session: HashMap<(String, String), usize> = HashMap::new();
    for event in receiver.delivered().values() {
        let key = (
            event["type"].as_str().unwrap().to_string(),
            event["data"]["session_id"].as_str().unwrap().to_string(),
        );
        *per_session.entry(key).or_default() += 1;
    }
    assert_eq!(events.len(), 2 * sessions);
    for id in &ids {
        for kind in ["session.started", "session.ended"] {
            assert_eq!(
                per_session.get(&(kind.to_string(), id.clone())),
                Some(&1),
                "{kind} {id}"
            );
        }
    }
    for d in receiver.deliveries() {
        assert!(verifies(SECRET, &d));
    }
}

#[tokio::test]
async fn events_of_a_killed_instance_are_taken_over_from_the_outbox() {
    taken_over(Backend::single().await).await;
}

#[tokio::test]
async fn events_of_a_killed_instance_are_taken_over_from_the_outbox_on_redis_cluster() {
    taken_over(Backend::cluster().await).await;
}

async fn taken_over(redis: Backend) {
    let receiver = Receiver::start(Answer::UnavailableUntilOpened).await;
    let url = receiver.url();
    let backend = redis.args();
    let instance = |id: &'static str| {
        let mut args: Vec<&str> = backend.iter().map(String::as_str).collect();
        args.extend([
            "--instance-id",
            id,
            "--instance-heartbeat-ms",
            "100",
            "--webhook-claim-idle-ms",
            "1000",
        ]);
        args.extend(flags(&url, &[]));
        args
    };
    // Instance A makes the events and takes them from the outbox (nobody else is there), but
    // the receiver refuses every attempt: they are all still A's when it dies.
    let mut doomed_args = vec!["--jwt-secret", common::SECRET];
    doomed_args.extend(instance("a"));
    let mut doomed = GatewayProcess::start(&doomed_args).await;
    doomed.wait_ready().await;
    let sessions = 4;
    for i in 0..sessions {
        let mut a = doomed.connect(&format!("a{i}")).await;
        let mut b = doomed.connect(&format!("b{i}")).await;
        match_up(&mut a, &mut b).await;
        a.request(json!({"type": "end"}), "e").await;
    }
    let attempted = || {
        receiver
            .deliveries()
            .iter()
            .map(|d| d.id.clone())
            .collect::<HashSet<_>>()
    };
    eventually("A tried every event", || attempted().len() >= 2 * sessions).await;
    let made = attempted();
    assert_eq!(made.len(), 2 * sessions);
    assert!(receiver.delivered().is_empty());
    doomed.kill9();

    // B comes up after A is gone: what it delivers, it can only have taken over.
    receiver.open();
    let survivor = TestServer::start(&instance("b")).await;
    let events = receiver.until_delivered(2 * sessions).await;
    let delivered: HashSet<String> = events.keys().cloned().collect();
    assert_eq!(delivered, made, "every event A made, with its id");
    for kind in ["session.started", "session.ended"] {
        assert_eq!(events_of(&events, kind).len(), sessions, "{kind}");
    }
    for d in receiver.deliveries() {
        assert!(verifies(SECRET, &d));
    }
    assert!(
        survivor.metric("matchgate_webhook_claimed_total").await >= (2 * sessions) as f64,
        "B took them over"
    );
}

#[tokio::test]
async fn a_full_outbox_trims_the_oldest_and_counts_them() {
    let receiver = Receiver::start(Answer::Hang).await;
    let url = receiver.url();
    let redis = RedisServer::start().await;
    let redis_url = redis.url();
    let extra = [
        "--redis-url",
        redis_url.as_str(),
        "--webhook-outbox-len",
        "100",
        "--webhook-timeout-ms",
        "60000",
    ];
    let server = TestServer::start(&flags(&url, &extra)).await;
    // Every ban is one event; the receiver never answers, so none leaves the outbox.
    let events = 400;
    for i in 0..events {
        let ban = json!({"kind": "user", "value": format!("u{i}"), "ttl_s": 60, "reason": "x"});
        let (status, _) = admin(&server, "POST", "/v1/admin/bans", &ban.to_string()).await;
        assert_eq!(status, 201);
    }
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let trimmed = r#"matchgate_webhook_events_total{result="trimmed"}"#;
    // Every event written is either still in the outbox or trimmed (and counted).
    let wait = async {
        loop {
            let len: u64 = redis::cmd("XLEN")
                .arg("{mg}:webhook_outbox")
                .query_async(&mut connection)
                .await
                .unwrap();
            let trimmed = server.metric(trimmed).await;
            if len as f64 + trimmed == events as f64 {
                return (len, trimmed);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let (len, trimmed) = tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("every event written and accounted for");
    assert!(trimmed > 0.0, "the bound trimmed some");
    // Trimmed approximately: whole nodes of the stream (100 entries each by default).
    assert!(len < 100 + 100, "bounded: {len}");
    assert_eq!(
        server
            .metric(r#"matchgate_webhook_events_total{result="dropped"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_bad_receiver_url_is_refused_at_start_up() {
    for (flags, needle) in [
        (
            vec![
                "--webhook-url",
                "ftp://example.com/hook",
                "--webhook-secret",
                SECRET,
            ],
            "MATCHGATE_WEBHOOK_URL",
        ),
        (
            vec!["--webhook-url", "not a url", "--webhook-secret", SECRET],
            "MATCHGATE_WEBHOOK_URL",
        ),
        (
            vec!["--webhook-url", "http://127.0.0.1:9/hook"],
            "MATCHGATE_WEBHOOK_SECRET",
        ),
        (
            vec![
                "--webhook-url",
                "http://127.0.0.1:9/hook",
                "--webhook-secret",
                "short",
            ],
            "MATCHGATE_WEBHOOK_SECRET",
        ),
    ] {
        let mut args = vec![
            "matchgate",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            common::SECRET,
        ];
        args.extend_from_slice(&flags);
        let config = <matchgate::Config as clap::Parser>::try_parse_from(args).expect("parses");
        match matchgate::Server::bind(config).await {
            Ok(_) => panic!("{flags:?} was accepted"),
            Err(e) => assert!(e.to_string().contains(needle), "{flags:?}: {e}"),
        }
    }
}
