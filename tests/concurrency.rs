//! Concurrency: 1,000 WebSocket clients (distinct users) run seeded random scripts against one
//! in-memory gateway at once; afterwards the frames all of them received are checked against
//! the matching invariants and against `/metrics`.
//!
//! Every client runs in its own task: a reader task records every frame it receives (with a
//! global receive order) while the script sends `enqueue` (prefs from three small pools, so
//! that matches happen), `skip`, `end`, `status` and short pauses, chosen from the state it
//! tracks from the events it has received. Each request carries a `ref` and the script waits
//! for its direct reply, but events caused by other users arrive at any time. At the end every
//! client ends whatever it is in until the gateway says it is idle, then closes.
//!
//! What is checked, over the frames of all clients:
//! - every `matched` session id reaches exactly two clients, two different users, one
//!   `offerer` and one `answerer`, who enqueued with the same prefs;
//! - per client, events follow the state machine (idle -> queued -> in session -> ...): no
//!   `matched` while in a session, every `session_ended` names the current session;
//! - per client, `seq` goes up by exactly one on every frame that carries it;
//! - both sides of every session got its `session_ended`, with the reasons paired
//!   (`skip`/`peer_skipped`, `end`/`peer_ended`) and the documented `requeued` flags;
//! - after a skip, the next partner of either side is somebody else;
//! - every request got exactly one direct reply, of a fitting type; the only errors are
//!   `invalid_state`, and those that were certain (skip or end while idle) came;
//! - `/metrics` agrees at the end: no session, nobody queued, one match per session id.
//!
//! The scripts are reproducible per client (`MATCHGATE_SOAK_SEED` overrides the seed); the
//! interleaving between clients is whatever the scheduler makes of it.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Barrier, Semaphore};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::{check_frame, Client, TestServer, PATIENCE};

const CLIENTS: usize = 1_000;
const STEPS: usize = 20;
const SEED: u64 = 0x6d61_7463_6867_6174;
/// Handshakes in flight at once: keeps the accept backlog from overflowing.
const CONNECTING_AT_ONCE: usize = 64;

/// The prefs a client may enqueue with, as sent on the wire. Three pools: no prefs (absent or
/// empty), music in English (keys in both orders) and sport.
const PREFS: &[Option<&str>] = &[
    None,
    Some(r#"{}"#),
    Some(r#"{"topic":"music","language":"en"}"#),
    Some(r#"{"language":"en","topic":"music"}"#),
    Some(r#"{"topic":"sport"}"#),
    Some(r#"{"topic":"sport"}"#),
];

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The pool a set of prefs belongs to: the four fields, each a value or absent.
fn pool_of(prefs: Option<&str>) -> String {
    let v: Value = prefs.map_or(Value::Null, |p| serde_json::from_str(p).unwrap());
    ["topic", "format", "language", "region"]
        .iter()
        .map(|k| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string())
        .collect::<Vec<_>>()
        .join("|")
}

/// What the reader hands the script.
enum Inbound {
    Frame(Value),
    /// The connection ended before the client closed it.
    Lost(String),
}

/// Everything one client saw and did.
struct ClientLog {
    user: String,
    welcome: Value,
    /// Frames after the welcome, with a receive order that is global across clients.
    frames: Vec<(u64, Value)>,
    /// Requests by `ref`: (type, pool for enqueues).
    sent: HashMap<String, (String, Option<String>)>,
    problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    Idle,
    Queued,
    InSession,
}

struct Script {
    user: String,
    rng: StdRng,
    sink: SplitSink<Ws, Message>,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    /// The state as the events received so far say. The gateway may be ahead (events in flight)
    /// except when this says idle: only the client's own `enqueue` leaves idle.
    state: Local,
    sent: HashMap<String, (String, Option<String>)>,
    problems: Vec<String>,
}

impl Script {
    fn absorb(&mut self, inbound: Inbound) -> Value {
        let v = match inbound {
            Inbound::Frame(v) => v,
            Inbound::Lost(why) => panic!("{}: {why}", self.user),
        };
        match v["type"].as_str() {
            Some("queued") => self.state = Local::Queued,
            Some("matched") => self.state = Local::InSession,
            Some("dequeued") => self.state = Local::Idle,
            Some("session_ended") if v["requeued"] == true => self.state = Local::Queued,
            Some("session_ended") => self.state = Local::Idle,
            _ => {}
        }
        v
    }

    /// Takes in what has arrived, without waiting.
    fn catch_up(&mut self) {
        while let Ok(inbound) = self.inbox.try_recv() {
            self.absorb(inbound);
        }
    }

    async fn recv(&mut self) -> Value {
        let inbound = tokio::time::timeout(PATIENCE, self.inbox.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: no frame from the server (state {:?}, sent {:?})",
                    self.user,
                    self.state as u8,
                    self.sent.len()
                )
            })
            .unwrap_or_else(|| panic!("{}: reader stopped", self.user));
        self.absorb(inbound)
    }

    /// Sends `{"type": kind, "ref": .., "prefs": ..}` and waits for the direct reply.
    async fn request(&mut self, kind: &str, prefs: Option<Option<&str>>) -> Value {
        let reference = format!("{}.{}", self.user, self.sent.len());
        let mut text = format!(r#"{{"type":"{kind}","ref":"{reference}""#);
        if let Some(Some(p)) = prefs {
            text.push_str(&format!(r#","prefs":{p}"#));
        }
        text.push('}');
        self.sent.insert(
            reference.clone(),
            (kind.to_string(), prefs.map(|p| pool_of(p))),
        );
        self.sink
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.user));
        loop {
            let v = self.recv().await;
            if v["ref"] == reference.as_str() {
                return v;
            }
        }
    }

    /// A request the state makes certain to fail: skip or end while idle.
    async fn certainly_invalid(&mut self, kind: &str) {
        let reply = self.request(kind, None).await;
        if reply["type"] != "error" || reply["code"] != "invalid_state" {
            self.problems.push(format!(
                "{kind} while idle: expected invalid_state, got {reply}"
            ));
        }
        let status = self.request("status", None).await;
        if status["state"] != "idle" {
            self.problems
                .push(format!("{kind} while idle changed the state: {status}"));
        }
    }

    async fn pause(&mut self) {
        match self.rng.random_range(0..=5u64) {
            0 => tokio::task::yield_now().await,
            ms => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    async fn step(&mut self) {
        self.catch_up();
        let roll = self.rng.random_range(0..100);
        match self.state {
            Local::Idle => match roll {
                0..60 => {
                    let prefs = PREFS[self.rng.random_range(0..PREFS.len())];
                    self.request("enqueue", Some(prefs)).await;
                }
                60..70 => {
                    let status = self.request("status", None).await;
                    if status["state"] != "idle" {
                        self.problems
                            .push(format!("idle by its events, but status says {status}"));
                    }
                }
                70..73 => self.certainly_invalid("skip").await,
                73..76 => self.certainly_invalid("end").await,
                _ => self.pause().await,
            },
            Local::Queued => match roll {
                0..12 => {
                    self.request("end", None).await;
                }
                12..22 => {
                    self.request("status", None).await;
                }
                // Invalid unless a match or a peer's end is in flight.
                22..24 => {
                    self.request("enqueue", Some(None)).await;
                }
                24..26 => {
                    self.request("skip", None).await;
                }
                _ => self.pause().await,
            },
            Local::InSession => match roll {
                0..40 => {
                    self.request("skip", None).await;
                }
                40..60 => {
                    self.request("end", None).await;
                }
                60..70 => {
                    self.request("status", None).await;
                }
                70..73 => {
                    self.request("enqueue", Some(Some(r#"{"topic":"sport"}"#)))
                        .await;
                }
                _ => self.pause().await,
            },
        }
    }

    /// Ends whatever the user is in until the gateway says idle, then waits until the events
    /// in flight have arrived.
    async fn wind_down(&mut self) {
        // Idle is final once reached: nothing but the user's own enqueue leaves it.
        for attempt in 0.. {
            assert!(attempt < 10, "{}: end never reached idle", self.user);
            let reply = self.request("end", None).await;
            if reply["type"] == "error" {
                if reply["code"] != "invalid_state" {
                    self.problems.push(format!("end failed: {reply}"));
                }
                break;
            }
        }
        while self.state != Local::Idle {
            self.recv().await;
        }
        let status = self.request("status", None).await;
        if status["state"] != "idle" {
            self.problems.push(format!("after winding down: {status}"));
        }
    }
}

/// Reads every frame until the connection ends, schema-checks and records it.
async fn read_frames(
    mut stream: SplitStream<Ws>,
    inbox: mpsc::UnboundedSender<Inbound>,
    clock: Arc<AtomicU64>,
    closing: Arc<AtomicBool>,
) -> (Vec<(u64, Value)>, Vec<String>) {
    let mut frames = Vec::new();
    let mut problems = Vec::new();
    let lost = |why: String, problems: &mut Vec<String>| {
        if !closing.load(Ordering::Acquire) {
            problems.push(why.clone());
            let _ = inbox.send(Inbound::Lost(why));
        }
    };
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                let order = clock.fetch_add(1, Ordering::Relaxed);
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    problems.push(format!("not JSON: {text}"));
                    continue;
                };
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| check_frame(&v))) {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "schema check failed".into());
                    problems.push(why);
                }
                frames.push((order, v.clone()));
                let _ = inbox.send(Inbound::Frame(v));
            }
            Some(Ok(Message::Binary(_))) => problems.push("a binary frame".into()),
            Some(Ok(Message::Close(frame))) => {
                lost(
                    format!("server closed the connection: {frame:?}"),
                    &mut problems,
                );
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                lost(format!("connection failed: {e}"), &mut problems);
                break;
            }
            None => {
                lost(
                    "connection ended without a close frame".into(),
                    &mut problems,
                );
                break;
            }
        }
    }
    (frames, problems)
}

async fn run_client(
    server: Arc<TestServer>,
    index: usize,
    seed: u64,
    connecting: Arc<Semaphore>,
    start: Arc<Barrier>,
    clock: Arc<AtomicU64>,
) -> ClientLog {
    let user = format!("u{index:04}");
    let client = {
        let _permit = connecting.acquire().await.unwrap();
        server.connect(&user).await
    };
    let Client { ws, welcome, .. } = client;
    let (sink, stream) = ws.split();
    let (tx, inbox) = mpsc::unbounded_channel();
    let closing = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_frames(stream, tx, clock, closing.clone()));
    tokio::time::timeout(PATIENCE, start.wait())
        .await
        .expect("every client connects");

    let mut script = Script {
        user: user.clone(),
        rng: StdRng::seed_from_u64(seed.wrapping_add(index as u64)),
        sink,
        inbox,
        state: Local::Idle,
        sent: HashMap::new(),
        problems: Vec::new(),
    };
    for _ in 0..STEPS {
        script.step().await;
    }
    script.wind_down().await;

    closing.store(true, Ordering::Release);
    let _ = script
        .sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await;
    let (frames, mut problems) = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap_or_else(|_| panic!("{user}: the server does not finish the close"))
        .unwrap();
    problems.append(&mut script.problems);
    ClientLog {
        user,
        welcome,
        frames,
        sent: script.sent,
        problems,
    }
}

/// One side of a session, as its `matched` frame and the prefs of its queue entry say.
struct Side {
    client: usize,
    role: String,
    pool: String,
}

/// One side's end of a session.
struct End {
    client: usize,
    reason: String,
}

#[derive(Default)]
struct Totals {
    frames: usize,
    requests: usize,
    skips: usize,
    ends: usize,
    dequeues: usize,
    invalid: usize,
    queue_updates: usize,
}

/// Where a client is by the events it received so far.
enum Walk {
    Idle,
    Queued,
    /// `session_ended` with `requeued: true` arrived; `queued` must follow.
    Requeuing,
    InSession(String),
}

/// Checks one client's frames on their own; collects the sessions it was in.
fn walk_client(
    index: usize,
    log: &ClientLog,
    sides: &mut HashMap<String, Vec<Side>>,
    ends: &mut HashMap<String, Vec<End>>,
    history: &mut Vec<(String, String)>,
    totals: &mut Totals,
    problems: &mut Vec<String>,
) {
    let mut problem = |frame: &Value, what: String| {
        problems.push(format!("{}: {what} (frame {frame})", log.user));
    };
    if log.welcome["state"] != "idle" || log.welcome["last_seq"] != 0 {
        problem(&log.welcome, "a fresh user's welcome".into());
    }
    let mut next_seq = log.welcome["last_seq"].as_u64().unwrap_or(0) + 1;
    let mut state = Walk::Idle;
    let mut pool: Option<String> = None;
    let mut replies: HashMap<&str, usize> = HashMap::new();
    totals.frames += log.frames.len();
    totals.requests += log.sent.len();

    for (_, v) in &log.frames {
        let kind = v["type"].as_str().unwrap_or("");
        let is_event = matches!(
            kind,
            "queued" | "dequeued" | "matched" | "session_ended" | "peer_status"
        );
        match v.get("seq").and_then(Value::as_u64) {
            Some(seq) => {
                if !is_event {
                    problem(v, "a seq on a frame that is not an event".into());
                }
                if seq != next_seq {
                    problem(v, format!("seq {seq} where {next_seq} was next"));
                }
                next_seq = seq + 1;
            }
            None if is_event => problem(v, "an event without seq".into()),
            None => {}
        }

        // The direct reply to a request: exactly one, of a type that fits.
        let request = v["ref"].as_str().map(|r| (r, log.sent.get(r)));
        if let Some((reference, sent)) = request {
            *replies.entry(reference).or_default() += 1;
            let fits = match sent.map(|(k, _)| k.as_str()) {
                None => false,
                Some(_) if kind == "error" => true,
                Some("enqueue") => kind == "queued",
                Some("skip") => kind == "session_ended" && v["reason"] == "skip",
                Some("end") => {
                    (kind == "session_ended" || kind == "dequeued") && v["reason"] == "end"
                }
                Some("status") => kind == "status",
                Some(_) => false,
            };
            if !fits {
                problem(v, format!("not a reply to the request {sent:?}"));
            }
        }

        match kind {
            "queued" => {
                match (&state, request) {
                    (Walk::Idle, Some((_, Some((_, Some(p)))))) => pool = Some(p.clone()),
                    // A requeue keeps the prefs of the entry the session came from.
                    (Walk::Requeuing, None) => {}
                    _ => problem(v, "queued out of turn".into()),
                }
                state = Walk::Queued;
            }
            "dequeued" => {
                if !matches!(state, Walk::Queued) || request.is_none() {
                    problem(v, "dequeued while not queued, or unasked".into());
                }
                if v["reason"] != "end" {
                    problem(v, "nobody timed out here".into());
                }
                totals.dequeues += 1;
                state = Walk::Idle;
            }
            "queue_update" => {
                totals.queue_updates += 1;
                if !matches!(state, Walk::Queued) {
                    problem(v, "a queue update while not queued".into());
                }
            }
            "matched" => {
                let sid = v["session_id"].as_str().unwrap_or("").to_string();
                if !matches!(state, Walk::Queued) {
                    problem(v, "matched while not queued (two sessions at once?)".into());
                }
                sides.entry(sid.clone()).or_default().push(Side {
                    client: index,
                    role: v["role"].as_str().unwrap_or("").to_string(),
                    pool: pool.clone().unwrap_or_default(),
                });
                history.push((sid.clone(), String::new()));
                state = Walk::InSession(sid);
            }
            "session_ended" => {
                let sid = v["session_id"].as_str().unwrap_or("");
                let reason = v["reason"].as_str().unwrap_or("");
                match &state {
                    Walk::InSession(current) if current == sid => {}
                    _ => problem(v, "session_ended for a session it is not in".into()),
                }
                let (own, requeued) = match reason {
                    "skip" => (true, true),
                    "end" => (true, false),
                    "peer_skipped" => (false, true),
                    "peer_ended" => (false, false),
                    _ => {
                        problem(v, "nobody disconnected or timed out here".into());
                        (request.is_some(), v["requeued"] == true)
                    }
                };
                if own != request.is_some() || v["requeued"] != requeued {
                    problem(v, "reason, ref and requeued do not fit together".into());
                }
                match reason {
                    "skip" => totals.skips += 1,
                    "end" => totals.ends += 1,
                    _ => {}
                }
                if let Some(last) = history.last_mut() {
                    last.1 = reason.to_string();
                }
                ends.entry(sid.to_string()).or_default().push(End {
                    client: index,
                    reason: reason.to_string(),
                });
                state = if v["requeued"] == true {
                    Walk::Requeuing
                } else {
                    Walk::Idle
                };
            }
            "error" => {
                if v["code"] != "invalid_state" {
                    problem(
                        v,
                        "the only error a valid client can get is invalid_state".into(),
                    );
                }
                totals.invalid += 1;
            }
            "status" => {}
            _ => problem(v, "unexpected frame".into()),
        }
    }

    if !matches!(state, Walk::Idle) {
        problems.push(format!("{}: not idle after winding down", log.user));
    }
    for reference in log.sent.keys() {
        let n = replies.get(reference.as_str()).copied().unwrap_or(0);
        if n != 1 {
            problems.push(format!("{}: {n} replies to {reference}", log.user));
        }
    }
}

/// Both ends of every connection live in this process: fail with a hint, not with a handshake
/// error halfway through. (Linux only; elsewhere the handshakes tell.)
fn check_open_files_limit() {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(soft) = soft {
        let needed = 2 * CLIENTS + 200;
        assert!(
            soft >= needed,
            "this test opens {needed} file descriptors but the limit is {soft}: \
             run `ulimit -n $(ulimit -Hn)` first (as .ci/run does)"
        );
    }
}

/// Flags every instance in these tests runs with.
const FLAGS: [&str; 10] = [
    // Invariants, not latency: on a busy 2-core machine a Redis call can queue for seconds
    // behind a thousand others, which must not turn into `unavailable`.
    "--redis-call-timeout-ms",
    "60000",
    "--rate-limit-burst",
    "1000",
    "--rate-limit-per-minute",
    "600000",
    // Races make some requests invalid (a match in flight): not a misbehaving client.
    "--error-budget",
    "1000",
    // Queue updates while everything else happens (the default 1 s outlasts the run).
    "--queue-update-interval-ms",
    "5",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_at_once_keep_every_matching_invariant() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = Arc::new(TestServer::start(&FLAGS).await);
    soak("memory, 1 instance", vec![server]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_on_three_redis_instances_keep_every_matching_invariant() {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = common::redis::RedisServer::start().await;
    let url = redis.url();
    let mut servers = Vec::new();
    for id in ["i0", "i1", "i2"] {
        let mut args = FLAGS.to_vec();
        args.extend(["--redis-url", &url, "--instance-id", id]);
        servers.push(Arc::new(TestServer::start(&args).await));
    }
    soak("Redis, 3 instances", servers).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_on_three_instances_over_redis_cluster_keep_every_matching_invariant() {
    let _one = ONE_AT_A_TIME.lock().await;
    let cluster = common::redis::RedisCluster::start().await;
    let urls = cluster.urls().join(",");
    let mut servers = Vec::new();
    for id in ["c0", "c1", "c2"] {
        let mut args = FLAGS.to_vec();
        args.extend(["--redis-url", &urls, "--redis-cluster", "--instance-id", id]);
        servers.push(Arc::new(TestServer::start(&args).await));
    }
    soak("Redis Cluster, 3 instances", servers).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_with_livekit_rooms_on_two_redis_instances_keep_every_invariant() {
    let _one = ONE_AT_A_TIME.lock().await;
    use common::livekit::{FakeLiveKit, KEY, SECRET};
    let fake = FakeLiveKit::start(KEY, SECRET).await;
    let redis = common::redis::RedisServer::start().await;
    let (url, api) = (redis.url(), fake.url());
    let mut servers = Vec::new();
    for id in ["m0", "m1"] {
        let mut args = FLAGS.to_vec();
        args.extend(["--redis-url", &url, "--instance-id", id]);
        args.extend([
            "--livekit-url",
            "wss://media.example.test",
            "--livekit-api-url",
            &api,
        ]);
        args.extend(["--livekit-api-key", KEY, "--livekit-api-secret", SECRET]);
        servers.push(Arc::new(TestServer::start(&args).await));
    }
    let sessions = soak("Redis, 2 instances, LiveKit rooms", servers).await;
    // Every session had its room before `matched`, and every room is gone once everybody
    // is idle (the deletes run in the background).
    let calls = fake
        .wait_for(|calls| {
            let deleted: BTreeSet<&str> = calls
                .iter()
                .filter(|c| c.method == "DeleteRoom")
                .map(|c| c.room.as_str())
                .collect();
            sessions
                .iter()
                .all(|s| deleted.contains(format!("mg_{s}").as_str()))
        })
        .await;
    let created: BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.method == "CreateRoom" && c.status == 200)
        .map(|c| c.room.as_str())
        .collect();
    for s in &sessions {
        assert!(
            created.contains(format!("mg_{s}").as_str()),
            "no room for {s}"
        );
    }
    let left = fake.rooms();
    assert!(left.is_empty(), "rooms outlived their sessions: {left:?}");
}

/// The soaks run one at a time: together they would starve this 2-core box (and each other's
/// Redis calls) and measure the machine instead of the gateway.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the random scripts of all clients, spread round-robin over `servers` like a load
/// balancer without stickiness, and checks every invariant. Returns the matched session ids.
async fn soak(label: &str, servers: Vec<Arc<TestServer>>) -> BTreeSet<String> {
    check_open_files_limit();
    let seed = std::env::var("MATCHGATE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    let t0 = Instant::now();
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let start = Arc::new(Barrier::new(CLIENTS));
    let clock = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(run_client(
                servers[i % servers.len()].clone(),
                i,
                seed,
                connecting.clone(),
                start.clone(),
                clock.clone(),
            ))
        })
        .collect();
    let mut logs = Vec::with_capacity(CLIENTS);
    for task in tasks {
        match task.await {
            Ok(log) => logs.push(log),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let ran = t0.elapsed();

    let mut problems: Vec<String> = Vec::new();
    let mut sides: HashMap<String, Vec<Side>> = HashMap::new();
    let mut ends: HashMap<String, Vec<End>> = HashMap::new();
    let mut histories: Vec<Vec<(String, String)>> = Vec::with_capacity(CLIENTS);
    let mut totals = Totals::default();
    for (i, log) in logs.iter().enumerate() {
        problems.extend(log.problems.iter().map(|p| format!("{}: {p}", log.user)));
        let mut history = Vec::new();
        walk_client(
            i,
            log,
            &mut sides,
            &mut ends,
            &mut history,
            &mut totals,
            &mut problems,
        );
        histories.push(history);
    }

    // Every session: two different users, complementary roles, one pool, both ends seen.
    let mut peer_of: HashMap<(&str, usize), usize> = HashMap::new();
    for (sid, s) in &sides {
        if s.len() != 2 {
            problems.push(format!("session {sid} reached {} clients", s.len()));
            continue;
        }
        let (a, b) = (&s[0], &s[1]);
        if a.client == b.client || logs[a.client].user == logs[b.client].user {
            problems.push(format!(
                "session {sid}: {} matched with themselves",
                logs[a.client].user
            ));
        }
        let roles: BTreeSet<&str> = [a.role.as_str(), b.role.as_str()].into();
        if roles != BTreeSet::from(["answerer", "offerer"]) {
            problems.push(format!("session {sid}: roles {roles:?}"));
        }
        if a.pool != b.pool {
            problems.push(format!("session {sid}: prefs {} and {}", a.pool, b.pool));
        }
        peer_of.insert((sid, a.client), b.client);
        peer_of.insert((sid, b.client), a.client);
        let mut reasons: Vec<&str> = Vec::new();
        let mut clients: BTreeSet<usize> = BTreeSet::new();
        for e in ends.get(sid).into_iter().flatten() {
            reasons.push(&e.reason);
            clients.insert(e.client);
        }
        reasons.sort_unstable();
        let paired = reasons == ["peer_skipped", "skip"] || reasons == ["end", "peer_ended"];
        if !paired || clients != BTreeSet::from([a.client, b.client]) {
            problems.push(format!(
                "session {sid} of {} and {}: ends {reasons:?} seen by {clients:?}",
                logs[a.client].user, logs[b.client].user
            ));
        }
    }
    for sid in ends.keys().filter(|sid| !sides.contains_key(*sid)) {
        problems.push(format!("session {sid} ended but never matched"));
    }
    // Skipping somebody (or being skipped) keeps the pair apart for the next match.
    for (i, history) in histories.iter().enumerate() {
        for pair in history.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            if !before.1.contains("skip") {
                continue;
            }
            let (p, q) = (
                peer_of.get(&(before.0.as_str(), i)),
                peer_of.get(&(after.0.as_str(), i)),
            );
            if let Some(p) = p.filter(|_| p == q) {
                problems.push(format!(
                    "{} matched again right after a skip with {}",
                    logs[i].user, logs[*p].user
                ));
            }
        }
    }

    let matches = sides.len();
    let skipped_sessions = totals.skips;
    let ended_sessions = totals.ends;
    println!(
        "concurrency ({label}): {CLIENTS} clients x {STEPS} steps (seed {seed:#x}) in {:.2}s: {matches} \
         matches, {skipped_sessions} skips, {ended_sessions} ends of sessions, {} dequeues, \
         {} invalid_state, {} queue updates; {} requests, {} frames received",
        ran.as_secs_f64(),
        totals.dequeues,
        totals.invalid,
        totals.queue_updates,
        totals.requests,
        totals.frames,
    );

    // Gauges describe the shared state (any instance answers the same); counters are per
    // instance and add up.
    let mut texts = Vec::new();
    for server in &servers {
        texts.push(server.metrics().await);
    }
    let metric = |name: &str| {
        let value = |text: &String| {
            common::metric_value(text, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
        };
        if name.contains("_total") {
            texts.iter().map(value).sum()
        } else {
            value(&texts[0])
        }
    };
    for (name, want) in [
        ("matchgate_sessions_active", 0),
        ("matchgate_queue_length", 0),
        ("matchgate_matches_total", matches),
        (
            r#"matchgate_sessions_ended_total{reason="skip"}"#,
            skipped_sessions,
        ),
        (
            r#"matchgate_sessions_ended_total{reason="end"}"#,
            ended_sessions,
        ),
        (
            r#"matchgate_protocol_errors_total{code="invalid_state"}"#,
            totals.invalid,
        ),
        (r#"matchgate_protocol_errors_total{code="rate_limited"}"#, 0),
    ] {
        if metric(name) != want as f64 {
            problems.push(format!(
                "/metrics: {name} is {}, expected {want}",
                metric(name)
            ));
        }
    }

    assert!(
        matches > CLIENTS && skipped_sessions > CLIENTS / 10,
        "the scripts hardly matched anybody: {matches} matches, {skipped_sessions} skips"
    );
    assert!(
        problems.is_empty(),
        "{} invariant violations, the first ones:\n{}",
        problems.len(),
        problems
            .iter()
            .take(30)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    );
    sides.into_keys().collect()
}
