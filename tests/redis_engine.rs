//! The Redis engine called directly (no gateway) against a real `redis-server`, with the test
//! clock (`RedisMatchmaker::with_clock`) where a rule depends on time: the recent
//! partner a `block` or `report` defaults to outlives an hour as in the memory engine, both
//! engines make ids of one format, the test clock drives the rules, and the interests index,
//! the interests wait and the `want` filters keep the keys `keys.lua` documents.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use common::redis::RedisServer;
use common::PATIENCE;
use futures_util::StreamExt;
use matchgate::attributes::{Attributes, Want};
use matchgate::bus::{Bus, Frame};
use matchgate::clock::ManualClock;
use matchgate::matching::memory::{MemoryMatchmaker, Policy};
use matchgate::matching::redis::{RedisMatchmaker, RedisSettings};
use matchgate::matching::{
    ClientOperations, ConnId, Engine, MatchError, MediaMode, Outcome, Rules, Timer, Timers, UserId,
};
use matchgate::metrics::Metrics;
use matchgate::p2p::IceServers;
use matchgate::protocol::{PrefField, Prefs};
use matchgate::redis_keys::{Layout, Notice};
use matchgate::Config;
use serde_json::Value;

const HOUR_MS: u64 = 3_600_000;

fn rules(flags: &[&str]) -> Rules {
    let config = Config::try_parse_from(std::iter::once("matchgate").chain(flags.iter().copied()))
        .expect("flags parse");
    Rules::from_config(&config.rules)
}

fn no_ice_servers() -> MediaMode {
    MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None)))
}

/// A Redis engine whose clock is `clock` (unix ms).
fn redis_engine(url: &str, rules: Rules, clock: Arc<ManualClock>) -> RedisMatchmaker {
    let settings = RedisSettings {
        urls: vec![url.to_string()],
        cluster: false,
        layout: Layout::new("mg"),
        instance: "i1".into(),
        requeue_peer_on_skip: true,
        history_len: 128,
        history_ttl: Duration::from_secs(4 * 3600),
        resume_grace: Duration::from_secs(5),
        pool_size: 2,
        batching: Default::default(),
        media: no_ice_servers(),
        rules,
        call_timeout: Duration::from_secs(10),
    };
    RedisMatchmaker::new(settings, Arc::new(Metrics::new()))
        .expect("Redis matchmaker")
        .with_clock(clock)
}

/// Keeps every frame the memory engine delivers.
#[derive(Default)]
struct Frames(Mutex<Vec<(UserId, Frame)>>);

impl Bus for Frames {
    fn deliver(&self, user: &UserId, frame: Frame) {
        self.0.lock().unwrap().push((user.clone(), frame));
    }
}

fn user(name: &str) -> UserId {
    name.into()
}

/// The events in `user`'s log in the Redis engine.
async fn redis_events(engine: &RedisMatchmaker, user: &UserId, conn: ConnId) -> Vec<Value> {
    let frames = engine.since(user, conn, 0).await.unwrap().expect("log");
    frames
        .iter()
        .map(|f| serde_json::from_str(&f.text).unwrap())
        .collect()
}

/// Connects a and b and matches them.
async fn match_pair(engine: &dyn Engine, a: &UserId, b: &UserId) {
    for (i, u) in [a, b].into_iter().enumerate() {
        engine.attach(u, ConnId(i as u64 + 1), None).await.unwrap();
    }
    for u in [a, b] {
        engine
            .enqueue(u, Prefs::default(), Default::default(), None)
            .await
            .unwrap();
    }
}

/// What an id looks like apart from its random part: the prefix, the alphabet and the length.
fn id_shape(id: &str) -> (String, usize) {
    let (prefix, random) = id.split_at(2);
    assert!(
        random
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{id}"
    );
    (prefix.to_string(), random.len())
}

#[tokio::test]
async fn both_engines_make_ids_of_one_format() {
    let redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let redis_engine = redis_engine(&redis.url(), rules(&[]), clock);
    let frames = Arc::new(Frames::default());
    let memory = MemoryMatchmaker::new(
        frames.clone(),
        Policy {
            requeue_peer_on_skip: true,
            history_len: 128,
            history_ttl: Duration::from_secs(3600),
            media: no_ice_servers(),
            rules: rules(&[]),
        },
    );
    let (a, b) = (user("alice"), user("bob"));

    let mut shapes = Vec::new();
    for engine in [&memory as &dyn Engine, &redis_engine] {
        let token = engine
            .attach(&a, ConnId(1), None)
            .await
            .unwrap()
            .resume_token;
        engine.attach(&b, ConnId(2), None).await.unwrap();
        for u in [&a, &b] {
            engine
                .enqueue(u, Prefs::default(), Default::default(), None)
                .await
                .unwrap();
        }
        let status = engine.status(&a).await.unwrap();
        let session = status.session_id.expect("in a session");
        let peer = status.peer.expect("a peer handle");
        shapes.push([id_shape(&token), id_shape(&session), id_shape(&peer)]);
    }
    assert_eq!(shapes[0], shapes[1], "memory, then Redis");
    assert_eq!(
        shapes[0],
        [
            ("r_".to_string(), 22),
            ("s_".to_string(), 22),
            ("p_".to_string(), 12)
        ]
    );
}

/// The recent partner `block` and `report` default to stays while the user is known, however
/// long ago the session started (memory.rs keeps it until a newer session pushes it out);
/// once the user is gone for good it expires with the rest of the user's conduct.
#[tokio::test]
async fn block_and_report_find_a_partner_met_over_an_hour_ago() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let start = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(start));
    let engine = redis_engine(&url, rules(&[]), clock.clone());
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    match_pair(&engine, &a, &b).await;
    let session = engine.status(&a).await.unwrap().session_id.unwrap();
    engine.end(&a, None).await.unwrap();

    // Two hours later (by the engine's clock), and no expiry by Redis's clock either.
    clock.advance(Duration::from_millis(2 * HOUR_MS));
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("{mg}:v2:recent:alice")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        ttl, -1,
        "kept while alice is known, not by the age of the session"
    );
    let found = engine.recent_peer(&a, None).await.unwrap();
    assert_eq!((found.session_id, found.peer), (session.clone(), b.clone()));
    engine.block(&a, None).await.unwrap();

    // A new session pushes out the ones older than the hour, as in memory.rs.
    engine.attach(&c, ConnId(3), None).await.unwrap();
    engine
        .enqueue(&a, Prefs::default(), Default::default(), None)
        .await
        .unwrap();
    engine
        .enqueue(&c, Prefs::default(), Default::default(), None)
        .await
        .unwrap();
    let newer = engine.status(&a).await.unwrap().session_id.unwrap();
    assert_ne!(newer, session);
    let err = engine.recent_peer(&a, Some(&session)).await.unwrap_err();
    assert!(matches!(err, MatchError::InvalidState(_)), "{err:?}");
    engine.end(&a, None).await.unwrap();

    // alice leaves for good: her conduct now expires (by Redis's clock), her state goes.
    engine.detach(&a, ConnId(1)).await.unwrap();
    for _ in 0..2 {
        clock.advance(Duration::from_millis(6_000));
        engine.expire(&a, ConnId(1)).await.unwrap();
    }
    let ttl: i64 = redis::cmd("PTTL")
        .arg("{mg}:v2:recent:alice")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "expires once alice is gone: {ttl}");
    let exists: bool = redis::cmd("EXISTS")
        .arg("{mg}:v2:user:alice")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
}

/// The test clock drives the rules: `started_at_ms` is its time, and the enqueue rate's
/// one-minute window runs on it (the retry hint counts from it, as memory.rs does).
#[tokio::test]
async fn the_test_clock_drives_the_rules() {
    let redis = RedisServer::start().await;
    let start = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(start));
    let engine = redis_engine(
        &redis.url(),
        rules(&["--enqueue-per-minute", "1"]),
        clock.clone(),
    );
    let (a, b) = (user("alice"), user("bob"));
    match_pair(&engine, &a, &b).await;
    let matched = redis_events(&engine, &a, ConnId(1))
        .await
        .into_iter()
        .find(|e| e["type"] == "matched")
        .expect("matched");
    assert_eq!(matched["started_at_ms"], start);

    // A session longer than a quick skip, then a second enqueue within the minute.
    clock.advance(Duration::from_millis(40_000));
    engine.end(&a, None).await.unwrap();
    let err = engine
        .enqueue(&a, Prefs::default(), Default::default(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MatchError::RateLimited {
                retry_after_ms: 20_001
            }
        ),
        "{err:?}"
    );
    clock.advance(Duration::from_millis(20_000));
    engine
        .enqueue(&a, Prefs::default(), Default::default(), None)
        .await
        .unwrap();
}

/// The default preferences' pool, as `Prefs::pool_key` names it.
const POOL: &str = "-|-|-|-|";

fn with_interests(tags: &[&str]) -> Prefs {
    Prefs {
        interests: tags.iter().map(|t| t.to_string()).collect(),
        ..Prefs::default()
    }
}

fn attributes(pairs: &[(&str, &str)]) -> Arc<Attributes> {
    Arc::new(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn want(attribute: &str, values: &[&str]) -> Want {
    Want::from([(
        attribute.to_string(),
        values.iter().map(|v| v.to_string()).collect(),
    )])
}

/// The members of the zset `key`, by score.
async fn members(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap()
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

fn tag_key(tag: &str) -> String {
    format!("{{mg}}:v2:tag:{tag}\n{POOL}")
}

/// The `matched` event in `user`'s log, if any.
async fn matched(engine: &RedisMatchmaker, user: &UserId, conn: ConnId) -> Option<Value> {
    redis_events(engine, user, conn)
        .await
        .into_iter()
        .find(|e| e["type"] == "matched")
}

/// The one timer of `kind` an outcome armed for `user`.
fn timer_of(outcome: &Outcome, user: &UserId, kind: fn(&Timer) -> bool) -> (Duration, Timer) {
    let found: Vec<_> = outcome
        .timers
        .iter()
        .filter(|(_, u, t)| u == user && kind(t))
        .map(|(delay, _, t)| (*delay, t.clone()))
        .collect();
    assert_eq!(found.len(), 1, "{:?}", outcome.timers);
    found[0].clone()
}

/// Users with interests wait in the list of each tag and in P:held until their interests
/// wait passes; only open users are in the open list (P:pool); a user who shares a tag meets
/// them at once, and both learn the tags they share, sorted by bytes (not by the locale).
#[tokio::test]
async fn the_interests_index_lists_users_by_tag_and_only_open_users_as_open() {
    let redis = RedisServer::start().await;
    let mut conn = redis_conn(&redis.url()).await;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = redis_engine(&redis.url(), rules(&[]), clock);
    let (a, b, c, d) = (user("alice"), user("bob"), user("carol"), user("dave"));
    for (i, u) in [&a, &b, &c, &d].into_iter().enumerate() {
        engine.attach(u, ConnId(i as u64 + 1), None).await.unwrap();
    }
    let prefs = [
        (&a, with_interests(&["fun", "chess", "éclair"])),
        (&b, with_interests(&["tennis"])),
        (&c, Prefs::default()),
    ];
    for (u, p) in prefs {
        engine
            .enqueue(u, p, Default::default(), None)
            .await
            .unwrap();
    }
    // Nobody shares a tag, and only carol is open: nobody meets anybody.
    assert_eq!(members(&mut conn, "{mg}:v2:pool:-|-|-|-|").await, ["carol"]);
    assert_eq!(
        members(&mut conn, "{mg}:v2:held:-|-|-|-|").await,
        ["alice", "bob"]
    );
    for tag in ["fun", "chess", "éclair"] {
        assert_eq!(members(&mut conn, &tag_key(tag)).await, ["alice"], "{tag}");
    }
    assert_eq!(members(&mut conn, &tag_key("tennis")).await, ["bob"]);
    // Positions count everybody waiting, whatever their interests.
    assert_eq!(engine.status(&c).await.unwrap().position, Some(2));

    // Away, alice leaves the candidate lists but keeps her place; back, she is listed again.
    engine.detach(&a, ConnId(1)).await.unwrap();
    assert!(members(&mut conn, &tag_key("chess")).await.is_empty());
    assert_eq!(engine.status(&b).await.unwrap().position, Some(1));
    engine.attach(&a, ConnId(5), None).await.unwrap();
    assert_eq!(members(&mut conn, &tag_key("chess")).await, ["alice"]);

    engine
        .enqueue(
            &d,
            with_interests(&["éclair", "go", "fun"]),
            Default::default(),
            None,
        )
        .await
        .unwrap();
    for (u, conn) in [(&a, ConnId(5)), (&d, ConnId(4))] {
        let m = matched(&engine, u, conn).await.expect("alice and dave met");
        assert_eq!(m["common_interests"], serde_json::json!(["fun", "éclair"]));
    }
    for tag in ["fun", "chess", "éclair", "go"] {
        assert!(members(&mut conn, &tag_key(tag)).await.is_empty(), "{tag}");
    }
    assert_eq!(
        members(&mut conn, "{mg}:v2:held:-|-|-|-|").await,
        ["bob"],
        "matched users leave every list"
    );
}

/// The next frame published for `user` that has the member `name` (a call publishes all its
/// notices for an instance in one message: each is read).
async fn published(pubsub: &mut redis::aio::PubSub, user: &str, name: &str) -> Value {
    let read = async {
        let mut messages = pubsub.on_message();
        loop {
            let payload: Vec<u8> = messages
                .next()
                .await
                .expect("subscribed")
                .get_payload()
                .unwrap();
            for notice in Notice::decode_all(&payload).expect("a notice the gateway reads") {
                let Notice::Frame { user: to, text, .. } = notice else {
                    continue;
                };
                let frame: Value = serde_json::from_str(text).unwrap();
                if to == user && frame.get(name).is_some() {
                    return frame;
                }
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("published")
}

/// The interests wait: armed with the enqueue (after the relaxation timer), re-armed while
/// paired, a no-op for an old queue place; when it passes, the user is told and becomes open
/// in every pool it is listed in, and meets an open user who shares nothing. Users who want
/// interests only get no such timer.
#[tokio::test]
async fn the_interests_wait_opens_a_waiting_user() {
    let redis = RedisServer::start().await;
    let mut conn = redis_conn(&redis.url()).await;
    let client = redis::Client::open(redis.url().as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("mg:i:i1").await.unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = redis_engine(
        &redis.url(),
        rules(&["--interests-wait-ms", "3000", "--relax-after-ms", "1000"]),
        clock.clone(),
    );
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    for (i, u) in [&a, &b, &c].into_iter().enumerate() {
        engine.attach(u, ConnId(i as u64 + 1), None).await.unwrap();
    }
    let only = Prefs {
        interests_only: true,
        ..with_interests(&["chess"])
    };
    let outcome = engine
        .enqueue(&b, only, Default::default(), None)
        .await
        .unwrap();
    assert!(outcome.timers.is_empty(), "{:?}", outcome.timers);

    let prefs = Prefs {
        language: Some("de".into()),
        soft: vec![PrefField::Language],
        ..with_interests(&["go"])
    };
    let outcome = engine
        .enqueue(&a, prefs, Default::default(), None)
        .await
        .unwrap();
    let kinds: Vec<_> = outcome.timers.iter().map(|(_, _, t)| t.clone()).collect();
    assert!(
        matches!(kinds[..], [Timer::Relax { .. }, Timer::Interests { .. }]),
        "{kinds:?}"
    );
    let (delay, wait) = timer_of(&outcome, &a, |t| matches!(t, Timer::Interests { .. }));
    assert_eq!(delay, Duration::from_millis(3000));
    let (_, relax) = timer_of(&outcome, &a, |t| matches!(t, Timer::Relax { .. }));

    // Her search widens to the pool without a language: still not open there.
    engine.wake(&a, relax).await.unwrap();
    assert_eq!(
        members(&mut conn, "{mg}:v2:held:-|-|-|-|").await,
        ["bob", "alice"]
    );
    engine
        .enqueue(&c, Prefs::default(), Default::default(), None)
        .await
        .unwrap();
    assert!(matched(&engine, &c, ConnId(3)).await.is_none());

    // A stale ticket changes nothing.
    engine
        .wake(&a, Timer::Interests { ticket: 0 })
        .await
        .unwrap();
    assert!(matched(&engine, &c, ConnId(3)).await.is_none());

    engine.wake(&a, wait).await.unwrap();
    let update = published(&mut pubsub, "alice", "interests_widened").await;
    assert_eq!(update["type"], "queue_update", "{update}");
    assert_eq!(update["interests_widened"], true, "{update}");
    assert!(update.get("widened_to").is_none(), "{update}");
    let m = matched(&engine, &a, ConnId(1))
        .await
        .expect("alice met carol");
    assert_eq!(m["common_interests"], serde_json::json!([]));
    assert!(matched(&engine, &c, ConnId(3)).await.is_some());
    // bob waits for a chess player, however long.
    assert_eq!(members(&mut conn, "{mg}:v2:held:-|-|-|-|").await, ["bob"]);
    assert!(members(&mut conn, "{mg}:v2:pool:-|-|-|-|").await.is_empty());
}

/// While paired (the accept phase), the interests wait is armed again; a match undone puts
/// the user back with the place it had, open or not as it was.
#[tokio::test]
async fn the_interests_wait_waits_while_paired() {
    let redis = RedisServer::start().await;
    let mut conn = redis_conn(&redis.url()).await;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = redis_engine(
        &redis.url(),
        rules(&["--accept-timeout-ms", "5000", "--interests-wait-ms", "3000"]),
        clock,
    );
    let (a, b) = (user("alice"), user("bob"));
    for (i, u) in [&a, &b].into_iter().enumerate() {
        engine.attach(u, ConnId(i as u64 + 1), None).await.unwrap();
    }
    let first = engine
        .enqueue(&a, with_interests(&["go"]), Default::default(), None)
        .await
        .unwrap();
    let (_, wait) = timer_of(&first, &a, |t| matches!(t, Timer::Interests { .. }));
    engine
        .enqueue(&b, with_interests(&["go"]), Default::default(), None)
        .await
        .unwrap();
    let proposal = redis_events(&engine, &a, ConnId(1))
        .await
        .into_iter()
        .find(|e| e["type"] == "match_proposed")
        .expect("proposed");
    let again = engine.wake(&a, wait.clone()).await.unwrap();
    assert_eq!(
        again.timers,
        [(Duration::from_millis(3000), a.clone(), wait.clone())]
    );
    engine
        .decline(&b, proposal["match_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(members(&mut conn, &tag_key("go")).await, ["alice"]);
    assert_eq!(members(&mut conn, "{mg}:v2:held:-|-|-|-|").await, ["alice"]);

    // Open now, she is proposed to carol, who shares nothing; undone, she stays open.
    engine.wake(&a, wait).await.unwrap();
    let c = user("carol");
    engine.attach(&c, ConnId(3), None).await.unwrap();
    engine
        .enqueue(&c, Prefs::default(), Default::default(), None)
        .await
        .unwrap();
    let proposal = redis_events(&engine, &c, ConnId(3))
        .await
        .into_iter()
        .find(|e| e["type"] == "match_proposed")
        .expect("proposed");
    engine
        .decline(&c, proposal["match_id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(members(&mut conn, "{mg}:v2:pool:-|-|-|-|").await, ["alice"]);
    assert!(members(&mut conn, "{mg}:v2:held:-|-|-|-|").await.is_empty());
    assert_eq!(members(&mut conn, &tag_key("go")).await, ["alice"]);
}

/// `want` holds both ways: each side's constraint against the other's attributes (from the
/// enqueue); a soft `want.<attribute>` drops at its relaxation step.
#[tokio::test]
async fn wants_hold_both_ways_and_soft_ones_relax() {
    let redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = redis_engine(&redis.url(), rules(&[]), clock);
    let (a, b, c, d) = (user("alice"), user("bob"), user("carol"), user("dave"));
    for (i, u) in [&a, &b, &c, &d].into_iter().enumerate() {
        engine.attach(u, ConnId(i as u64 + 1), None).await.unwrap();
    }
    let alice = Prefs {
        want: want("country", &["fr"]),
        soft: vec![PrefField::Want("country".into())],
        ..Prefs::default()
    };
    let outcome = engine
        .enqueue(&a, alice, attributes(&[("country", "de")]), None)
        .await
        .unwrap();
    let (_, relax) = timer_of(&outcome, &a, |t| matches!(t, Timer::Relax { .. }));
    // alice wants fr, bob is it.
    engine
        .enqueue(&b, Prefs::default(), attributes(&[("country", "it")]), None)
        .await
        .unwrap();
    // carol is fr, but wants at: alice (de) does not do for her, nor does bob (it).
    let carol = Prefs {
        want: want("country", &["at", "it2"]),
        ..Prefs::default()
    };
    engine
        .enqueue(&c, carol, attributes(&[("country", "fr")]), None)
        .await
        .unwrap();
    for (u, conn) in [(&a, ConnId(1)), (&b, ConnId(2)), (&c, ConnId(3))] {
        assert!(matched(&engine, u, conn).await.is_none(), "{u:?}");
    }
    // dave has no attributes: carol's want fails for him; bob is the oldest he may meet.
    engine
        .enqueue(&d, Prefs::default(), Default::default(), None)
        .await
        .unwrap();
    let status = engine.status(&d).await.unwrap();
    assert!(status.session_id.is_some(), "dave met somebody");
    assert_eq!(
        engine.status(&b).await.unwrap().session_id,
        status.session_id
    );

    // alice's want relaxes: carol still wants at, so alice waits; bob, re-queued when he
    // skips dave, has no want and she has none left: they meet.
    engine.wake(&a, relax).await.unwrap();
    assert!(matched(&engine, &a, ConnId(1)).await.is_none());
    engine.skip(&b, None).await.unwrap();
    let b_status = engine.status(&b).await.unwrap();
    assert!(b_status.session_id.is_some(), "bob, re-queued, met alice");
    assert_eq!(
        engine.status(&a).await.unwrap().session_id,
        b_status.session_id
    );
}

/// The commands Redis ran (MONITOR lines, the library's own included) while `work` ran.
async fn commands_during<F: std::future::Future<Output = ()>>(url: &str, work: F) -> Vec<String> {
    let monitor = redis::Client::open(url)
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let collect = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut lines = monitor.into_on_message::<String>();
            while let Some(line) = lines.next().await {
                seen.lock().unwrap().push(line);
            }
        })
    };
    let mut conn = redis_conn(url).await;
    let echo = |marker: &'static str| redis::cmd("ECHO").arg(marker).clone();
    // The monitor is on once it sees the first marker.
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("monitor-start"))
    {
        let _: String = echo("monitor-start").query_async(&mut conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: String = echo("monitor-go").query_async(&mut conn).await.unwrap();
    work.await;
    let _: String = echo("monitor-done").query_async(&mut conn).await.unwrap();
    let lines = tokio::time::timeout(PATIENCE, async {
        loop {
            {
                let seen = seen.lock().unwrap();
                if let Some(done) = seen.iter().position(|l| l.contains("monitor-done")) {
                    let go = seen.iter().position(|l| l.contains("monitor-go")).unwrap();
                    return seen[go..done].to_vec();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the monitor saw the end marker");
    collect.abort();
    lines
}

/// A search visits only the lists it may meet somebody in: with many users waiting who share
/// nothing, a user with interests reads no other user's hash and not the open list, and a
/// user without interests reads only the open list.
#[tokio::test]
async fn a_search_never_visits_users_who_share_nothing_unless_both_are_open() {
    let redis = RedisServer::start().await;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = redis_engine(&redis.url(), rules(&[]), clock);
    let others = 40;
    for i in 0..others {
        let u = user(&format!("u{i}"));
        engine.attach(&u, ConnId(i + 1), None).await.unwrap();
        let tag = format!("t{i}");
        engine
            .enqueue(&u, with_interests(&[&tag]), Default::default(), None)
            .await
            .unwrap();
    }
    let (fan, plain) = (user("chess-fan"), user("plain"));
    engine.attach(&fan, ConnId(100), None).await.unwrap();
    engine.attach(&plain, ConnId(101), None).await.unwrap();
    let lines = commands_during(&redis.url(), async {
        engine
            .enqueue(&fan, with_interests(&["chess"]), Default::default(), None)
            .await
            .unwrap();
        engine
            .enqueue(&plain, Prefs::default(), Default::default(), None)
            .await
            .unwrap();
    })
    .await;
    let read = |pattern: &str| lines.iter().filter(|l| l.contains(pattern)).count();
    assert_eq!(read("\"{mg}:v2:user:u"), 0, "{lines:#?}");
    assert_eq!(read("\"ZRANGE\" \"{mg}:v2:tag:chess"), 1, "{lines:#?}");
    assert_eq!(read("\"ZRANGE\" \"{mg}:v2:tag:t"), 0, "{lines:#?}");
    assert_eq!(
        read("\"ZRANGE\" \"{mg}:v2:pool:"),
        1,
        "only plain reads the open list"
    );
    // Neither met anybody: each of the others waits for its own tag.
    assert_eq!(
        engine.status(&plain).await.unwrap().position,
        Some(others + 1)
    );
}
