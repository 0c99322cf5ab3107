//! The Redis engine called directly (no gateway) against a real `redis-server`, with the test
//! clock (`RedisMatchmaker::with_clock`) where a rule depends on time: the recent
//! partner a `block` or `report` defaults to outlives an hour as in the memory engine, both
//! engines make ids of one format, and the test clock drives the rules.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use common::redis::RedisServer;
use matchgate::bus::{Bus, Frame};
use matchgate::clock::ManualClock;
use matchgate::matching::memory::{MemoryMatchmaker, Policy};
use matchgate::matching::redis::{RedisMatchmaker, RedisSettings};
use matchgate::matching::{
    ClientOperations, ConnId, Engine, MatchError, MediaMode, Rules, Timers, UserId,
};
use matchgate::metrics::Metrics;
use matchgate::p2p::IceServers;
use matchgate::protocol::Prefs;
use matchgate::redis_keys::Layout;
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
