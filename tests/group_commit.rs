//! Group commit in the Redis engine (`matching::redis`, `Batching`): the operations an
//! instance asks for while its call is in flight go together in its next call, each still its
//! own step with its own answer, and what the call publishes for an instance travels as one
//! message. Engines called directly (no gateway) against a real `redis-server`.
//!
//! To hold a call in flight without relying on timing, Redis is paused for writes
//! (`CLIENT PAUSE ... WRITE`): the call waits inside Redis (counted in `blocked_clients`) until
//! the test unpauses it, while the test's single-threaded runtime queues the next operations.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::redis::{command, RedisServer};
use common::PATIENCE;
use futures_util::StreamExt;
use matchgate::matching::redis::{Batching, RedisMatchmaker, RedisSettings};
use matchgate::matching::{
    Administration, ClientOperations, ConnId, MatchError, MediaMode, Outcome, Rules, UserId,
};
use matchgate::metrics::Metrics;
use matchgate::p2p::IceServers;
use matchgate::protocol::Prefs;
use matchgate::redis_keys::{Layout, Notice};
use serde_json::Value;

/// Rules that never refuse the test's traffic (no anti-repeat, skip or rate limits).
fn lenient_rules() -> Rules {
    use clap::Parser;
    let config = matchgate::Config::try_parse_from(
        std::iter::once("matchgate").chain(common::RELAXED_RULES),
    )
    .expect("flags parse");
    Rules::from_config(&config.rules)
}

fn engine(
    url: &str,
    instance: &str,
    batching: Batching,
    call_timeout: Duration,
) -> RedisMatchmaker {
    let settings = RedisSettings {
        urls: vec![url.to_string()],
        cluster: false,
        layout: Layout::new("mg"),
        instance: instance.into(),
        requeue_peer_on_skip: true,
        history_len: 1000,
        history_ttl: Duration::from_secs(3600),
        resume_grace: Duration::from_secs(5),
        pool_size: 2,
        batching,
        media: MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None))),
        rules: lenient_rules(),
        call_timeout,
    };
    RedisMatchmaker::new(settings, Arc::new(Metrics::new())).expect("Redis matchmaker")
}

/// An `INFO` section's text.
async fn info(url: &str, section: &str) -> String {
    match command(url, &["INFO", section]).await {
        redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO answered {other:?}"),
    }
}

/// A number from an `INFO` section, e.g. `blocked_clients` or `cmdstat_fcall:calls`.
async fn info_number(url: &str, section: &str, field: &str) -> u64 {
    info(url, section)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim_start_matches([':', '='])
                .split([',', '\r'])
                .next()
        })
        .map_or(0, |n| n.parse().unwrap())
}

async fn fcalls(url: &str) -> u64 {
    info_number(url, "commandstats", "cmdstat_fcall:calls").await
}

/// Pauses every write on the server until [`unpause`]; a call sent meanwhile waits in Redis.
async fn pause(url: &str) {
    command(url, &["CLIENT", "PAUSE", "600000", "WRITE"]).await;
}

async fn unpause(url: &str) {
    command(url, &["CLIENT", "UNPAUSE"]).await;
}

/// Waits until `n` clients wait in the paused server (the calls in flight).
async fn until_blocked(url: &str, n: u64) {
    tokio::time::timeout(PATIENCE, async {
        while info_number(url, "clients", "blocked_clients").await != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the call reaches Redis");
}

/// Lets every spawned task run up to its first wait: on the test's single-threaded runtime,
/// the operations they started are then queued in their order.
async fn let_tasks_queue() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// A subscription to every instance channel of the deployment `mg`.
async fn listen(url: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .psubscribe(format!("{}*", Layout::new("mg").channel_prefix))
        .await
        .unwrap();
    pubsub
}

/// The messages on the instance channels up to a marker published on `channel` now: each as
/// its channel and its notices as owned (user, seq, frame JSON) frames and kicked users.
async fn messages_until_marker(
    url: &str,
    pubsub: &mut redis::aio::PubSub,
    channel: &str,
) -> Vec<(String, Vec<Received>)> {
    let marker = "Bmarker\nend";
    command(url, &["PUBLISH", channel, marker]).await;
    let mut out = Vec::new();
    let mut messages = pubsub.on_message();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let message = messages.next().await.expect("subscribed");
            let payload = message.get_payload_bytes().to_vec();
            if payload == marker.as_bytes() {
                return;
            }
            let notices = Notice::decode_all(&payload).unwrap_or_else(|| {
                panic!(
                    "the Rust decoder cannot read what Lua published: {:?}",
                    String::from_utf8_lossy(&payload)
                )
            });
            let received = notices
                .into_iter()
                .map(|n| match n {
                    Notice::Frame { user, seq, text } => Received::Frame {
                        user: user.into(),
                        seq,
                        frame: serde_json::from_str(text).expect("a frame is JSON"),
                    },
                    Notice::Kick { user, .. } => Received::Kick(user.into()),
                    Notice::Ban { .. } => panic!("no ban on an instance channel"),
                })
                .collect();
            out.push((message.get_channel_name().to_string(), received));
        }
    })
    .await
    .expect("the marker comes back");
    out
}

#[derive(Debug)]
enum Received {
    Frame {
        user: UserId,
        seq: Option<u64>,
        frame: Value,
    },
    Kick(UserId),
}

fn user(name: &str) -> UserId {
    name.into()
}

async fn enqueue(engine: &RedisMatchmaker, u: &UserId) -> Result<Outcome, MatchError> {
    engine
        .enqueue(u, Prefs::default(), Default::default(), None)
        .await
}

#[tokio::test]
async fn operations_asked_while_a_call_is_in_flight_share_the_next_call_each_with_its_answer() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let batching = Batching {
        in_flight: 1,
        max_ops: 64,
    };
    let engine = Arc::new(engine(&url, "i1", batching, Duration::from_secs(60)));
    // Loads the library and writes this instance's p2p configuration.
    engine.attach(&user("warm"), ConnId(1), None).await.unwrap();
    let mut pubsub = listen(&url).await;
    command(&url, &["CONFIG", "RESETSTAT"]).await;

    pause(&url).await;
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.attach(&user("a"), ConnId(2), None).await })
    };
    until_blocked(&url, 1).await;
    // Queued in this order while the first call waits; b's attach and enqueue in order
    // (operations of one user are sequential in the gateway; here the queue keeps them so).
    let ops: Vec<tokio::task::JoinHandle<Result<Outcome, MatchError>>> = vec![
        {
            let e = engine.clone();
            tokio::spawn(async move {
                e.attach(&user("b"), ConnId(3), None)
                    .await
                    .map(|a| a.outcome)
            })
        },
        {
            let e = engine.clone();
            tokio::spawn(async move { enqueue(&e, &user("a")).await })
        },
        // Refused (nobody of that name is connected): its neighbours are not affected.
        {
            let e = engine.clone();
            tokio::spawn(async move { enqueue(&e, &user("ghost")).await })
        },
        {
            let e = engine.clone();
            tokio::spawn(async move { enqueue(&e, &user("b")).await })
        },
        // Refused: a is in a session by now, made by the operation before in this call.
        {
            let e = engine.clone();
            tokio::spawn(async move { enqueue(&e, &user("a")).await })
        },
    ];
    let_tasks_queue().await;
    unpause(&url).await;

    first.await.unwrap().expect("the first attach");
    let mut answers = Vec::new();
    for op in ops {
        answers.push(op.await.unwrap());
    }
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    let queued = answers[1].as_ref().expect("a queues");
    assert!(queued.started.is_empty());
    assert!(
        matches!(&answers[2], Err(MatchError::InvalidState(m)) if m.contains("no live connection")),
        "{:?}",
        answers[2]
    );
    let matched = answers[3].as_ref().expect("b queues and meets a");
    assert_eq!(matched.started.len(), 1);
    let mut pair = matched.started[0].users.to_vec();
    pair.sort();
    assert_eq!(pair, [user("a"), user("b")]);
    assert!(
        matches!(&answers[4], Err(MatchError::InvalidState(m)) if m.contains("already in a session")),
        "{:?}",
        answers[4]
    );
    // Two calls: the first attach, then everything queued behind it.
    assert_eq!(fcalls(&url).await, 2);

    // The second call's frames for the instance: one message, in the order they were made.
    let messages = messages_until_marker(&url, &mut pubsub, &Layout::new("mg").channel("i1")).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let types: Vec<(String, String)> = messages[0]
        .1
        .iter()
        .map(|r| match r {
            Received::Frame { user, frame, .. } => (
                user.to_string(),
                frame["type"].as_str().unwrap().to_string(),
            ),
            Received::Kick(u) => panic!("nobody was replaced, yet {u} was kicked"),
        })
        .collect();
    let expected = [
        ("a", "queued"),
        ("b", "queued"),
        ("a", "matched"),
        ("b", "matched"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(u, t)| (u.to_string(), t.to_string()))
        .collect();
    assert_eq!(types, expected);
}

/// The commands the library ran inside calls (every `cmdstat_*` but the calls themselves and
/// what the test asks), from `INFO commandstats`.
async fn commands_inside_calls(url: &str) -> u64 {
    info(url, "commandstats")
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| l.split_once(":calls="))
        .filter(|(name, _)| !["fcall", "info", "config", "publish"].contains(name))
        .map(|(_, rest)| rest.split(',').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// What one match costs Redis in commands run by the library: a budget, so that a change that
/// adds reads or writes to the hot path raises it on purpose (BENCHMARKS.md, "Redis: commands
/// and instructions per match"). Before the per-call hash cache (`hashes.lua`) this cycle ran
/// 109 commands.
#[tokio::test]
async fn a_match_and_its_end_stay_within_their_budget_of_redis_commands() {
    const BUDGET: u64 = 72;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let batching = Batching {
        in_flight: 1,
        max_ops: 64,
    };
    let engine = engine(&url, "i1", batching, Duration::from_secs(60));
    for (name, conn) in [("a", 1), ("b", 2)] {
        engine
            .attach(&user(name), ConnId(conn), None)
            .await
            .unwrap();
    }
    command(&url, &["CONFIG", "RESETSTAT"]).await;

    enqueue(&engine, &user("a")).await.expect("a queues");
    let matched = enqueue(&engine, &user("b")).await.expect("b queues");
    assert_eq!(matched.started.len(), 1, "a and b meet");
    let ended = engine.end(&user("a"), None).await.expect("a ends it");
    assert_eq!(ended.closed.len(), 1);
    assert_eq!(fcalls(&url).await, 3);

    let commands = commands_inside_calls(&url).await;
    println!("one match and its end: {commands} commands inside the library");
    assert!(
        commands <= BUDGET,
        "one match and its end ran {commands} commands inside the library, over the budget of {BUDGET}"
    );
}

#[tokio::test]
async fn operations_beyond_the_queue_bound_wait_for_room_and_calls_take_at_most_their_share() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    // Room for two queued operations; each call takes two at most.
    let batching = Batching {
        in_flight: 1,
        max_ops: 2,
    };
    assert_eq!(batching.queue_bound(), 2);
    let engine = Arc::new(engine(&url, "i1", batching, Duration::from_secs(60)));
    engine.attach(&user("warm"), ConnId(1), None).await.unwrap();
    command(&url, &["CONFIG", "RESETSTAT"]).await;

    pause(&url).await;
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.attach(&user("u0"), ConnId(10), None).await })
    };
    until_blocked(&url, 1).await;
    // More than fit: those beyond the bound wait for room, none is refused.
    let users: Vec<UserId> = (1..=7).map(|i| user(&format!("u{i}"))).collect();
    let waiting: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let (engine, u) = (engine.clone(), u.clone());
            tokio::spawn(async move { engine.attach(&u, ConnId(11 + i as u64), None).await })
        })
        .collect();
    let_tasks_queue().await;
    unpause(&url).await;
    first.await.unwrap().expect("the first attach");
    for op in waiting {
        op.await
            .unwrap()
            .expect("an attach beyond the bound waits, then runs");
    }
    // 1 + 7 operations, at most 2 per call.
    assert!(fcalls(&url).await > 4);
    let stats = engine.stats().await.unwrap();
    assert_eq!((stats.queued, stats.sessions), (0, 0));
    for u in &users {
        assert_eq!(
            engine.status(u).await.unwrap().state,
            matchgate::protocol::StateName::Idle,
            "{u} attached"
        );
    }
}

#[tokio::test]
async fn every_operation_of_a_call_that_times_out_answers_unavailable() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let batching = Batching {
        in_flight: 1,
        max_ops: 64,
    };
    let engine = Arc::new(engine(&url, "i1", batching, Duration::from_millis(300)));
    engine.attach(&user("warm"), ConnId(1), None).await.unwrap();

    pause(&url).await;
    let ops: Vec<_> = (0..5)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .attach(&user(&format!("u{i}")), ConnId(10 + i), None)
                    .await
            })
        })
        .collect();
    for op in ops {
        let answer = op.await.unwrap();
        assert!(
            matches!(answer, Err(MatchError::Unavailable(_))),
            "{:?}",
            answer.map(|a| a.state)
        );
    }
    unpause(&url).await;
    // The engine recovers: the next operations run.
    let later = engine.attach(&user("later"), ConnId(20), None).await;
    assert!(later.is_ok(), "{:?}", later.err());
    enqueue(&engine, &user("later")).await.unwrap();
}

/// Users on two instances enqueue and end as fast as they can, all at once, so that each
/// instance's calls carry many operations. Whatever the batching: no session is started
/// twice or with one user on both sides, a user is never in two sessions at a time, every
/// user's frames arrive in `seq` order without a gap, and the counts agree with the users'
/// states at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_on_two_instances_keep_the_invariants() {
    const USERS: usize = 40;
    const ROUNDS: usize = 12;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut pubsub = listen(&url).await;
    let small = Batching {
        in_flight: 1,
        max_ops: 4,
    };
    let engines = [
        Arc::new(engine(&url, "i1", small, Duration::from_secs(60))),
        Arc::new(engine(
            &url,
            "i2",
            Batching::default(),
            Duration::from_secs(60),
        )),
    ];
    let users: Vec<UserId> = (0..USERS).map(|i| user(&format!("user{i}"))).collect();
    for (i, u) in users.iter().enumerate() {
        engines[i % 2]
            .attach(u, ConnId(i as u64 + 1), None)
            .await
            .unwrap();
    }
    command(&url, &["CONFIG", "RESETSTAT"]).await;

    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let (engine, u) = (engines[i % 2].clone(), u.clone());
            tokio::spawn(async move {
                let mut started = Vec::new();
                let mut operations = 0;
                for _ in 0..ROUNDS {
                    // Refused only when a peer's operation matched this user meanwhile.
                    match enqueue(&engine, &u).await {
                        Ok(outcome) => started.extend(outcome.started),
                        Err(MatchError::InvalidState(_)) => {}
                        Err(e) => panic!("enqueue: {e}"),
                    }
                    // Ends the wait or the session this user is in; idle only when a peer
                    // ended it meanwhile.
                    match engine.end(&u, None).await {
                        Ok(outcome) => started.extend(outcome.started),
                        Err(MatchError::InvalidState(_)) => {}
                        Err(e) => panic!("end: {e}"),
                    }
                    operations += 2;
                }
                (started, operations)
            })
        })
        .collect();
    let mut started = Vec::new();
    let mut operations = 0;
    for task in tasks {
        let (s, n) = task.await.unwrap();
        started.extend(s);
        operations += n;
    }
    let calls = fcalls(&url).await;
    assert!(
        calls <= operations,
        "{calls} calls for {operations} operations"
    );

    // Each session started once, between two different users.
    let mut sessions = HashSet::new();
    for s in &started {
        assert!(
            sessions.insert(s.session_id.clone()),
            "{} twice",
            s.session_id
        );
        assert_ne!(s.users[0], s.users[1]);
    }
    // Every frame each user got, in the order it arrived (a user's frames all come through the
    // channel of its instance).
    let mut frames: HashMap<UserId, Vec<(Option<u64>, Value)>> = HashMap::new();
    for channel in ["i1", "i2"] {
        let channel = Layout::new("mg").channel(channel);
        for (_, notices) in messages_until_marker(&url, &mut pubsub, &channel).await {
            for n in notices {
                match n {
                    Received::Frame { user, seq, frame } => {
                        frames.entry(user).or_default().push((seq, frame))
                    }
                    Received::Kick(u) => panic!("nobody was replaced, yet {u} was kicked"),
                }
            }
        }
    }
    let mut matched_total = 0;
    for u in &users {
        let got = frames.remove(u).unwrap_or_default();
        let seqs: Vec<u64> = got.iter().filter_map(|(s, _)| *s).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{u}'s frames in seq order without a gap");
        // matched and session_ended alternate: never two sessions at a time.
        let mut in_session = false;
        for (_, frame) in &got {
            match frame["type"].as_str().unwrap() {
                "matched" => {
                    assert!(!in_session, "{u} matched while in a session: {got:?}");
                    assert!(sessions.contains(frame["session_id"].as_str().unwrap()));
                    in_session = true;
                    matched_total += 1;
                }
                "session_ended" => {
                    assert!(in_session, "{u}: a session ended that was not running");
                    in_session = false;
                }
                _ => {}
            }
        }
    }
    assert_eq!(matched_total, 2 * sessions.len());
    // The counts agree with where everybody is.
    let stats = engines[0].stats().await.unwrap();
    let (mut queued, mut in_session) = (0, 0);
    for u in &users {
        match engines[0].status(u).await.unwrap().state {
            matchgate::protocol::StateName::Queued => queued += 1,
            matchgate::protocol::StateName::InSession => in_session += 1,
            _ => {}
        }
    }
    assert_eq!(stats.queued, queued);
    assert_eq!(stats.sessions * 2, in_session);
}
