//! The session records both engines hand the gateway in their outcomes (what the ledger and
//! the outbound webhooks write): one `SessionStarted` when a pair goes live and one
//! `SessionClosed` when it ends, with the same users in the same order, the pools they waited
//! in, the start time `matched` carried, and who ended it and why. Driven through the engines'
//! public API, memory and a real `redis-server` alike, with the same script and the same
//! expectations.

mod common;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::redis::RedisServer;
use matchgate::bus::{Bus, Frame};
use matchgate::matching::memory::{MemoryMatchmaker, Policy};
use matchgate::matching::redis::{RedisMatchmaker, RedisSettings};
use matchgate::matching::{ConnId, Engine, MediaMode, Outcome, Resume, Rules, UserId};
use matchgate::metrics::Metrics;
use matchgate::p2p::IceServers;
use matchgate::protocol::{EndReason, Prefs};
use matchgate::redis_keys::Layout;
use matchgate::Config;

/// Frames go nowhere: the records are compared with the replayed `matched` frames instead.
struct Discard;

impl Bus for Discard {
    fn deliver(&self, _user: &UserId, _frame: Frame) {}
}

/// The `started_at_ms` of `user`'s latest `matched`, from a resume that replays its whole log
/// (a new connection `conn` takes over; nothing else changes).
async fn matched_at(mm: &dyn Engine, user: &UserId, conn: u64, token: &str) -> u64 {
    let resume = Resume {
        token: token.to_string(),
        last_seq: 0,
    };
    let attached = mm
        .attach(user, ConnId(conn), Some(resume))
        .await
        .expect("attach");
    assert!(attached.resumed, "the whole log is still there");
    let matched = attached
        .replay
        .iter()
        .rev()
        .map(|f| serde_json::from_str::<serde_json::Value>(f.text.as_str()).expect("JSON"))
        .find(|v| v["type"] == "matched")
        .expect("a matched frame");
    matched["started_at_ms"].as_u64().expect("started_at_ms")
}

fn rules() -> Rules {
    Rules::from_config(
        &Config::try_parse_from(["matchgate"])
            .expect("defaults parse")
            .rules,
    )
}

fn media() -> MediaMode {
    MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None)))
}

fn memory() -> Arc<dyn Engine> {
    Arc::new(MemoryMatchmaker::new(
        Arc::new(Discard),
        Policy {
            requeue_peer_on_skip: true,
            history_len: 128,
            history_ttl: Duration::from_secs(3600),
            media: media(),
            rules: rules(),
        },
    ))
}

fn redis(server: &RedisServer) -> Arc<dyn Engine> {
    let settings = RedisSettings {
        urls: vec![server.url()],
        cluster: false,
        layout: Layout::new("records"),
        instance: "i1".into(),
        requeue_peer_on_skip: true,
        history_len: 128,
        history_ttl: Duration::from_secs(3600),
        resume_grace: Duration::from_secs(60),
        pool_size: 2,
        batching: Default::default(),
        media: media(),
        rules: rules(),
        call_timeout: Duration::from_secs(10),
    };
    Arc::new(RedisMatchmaker::new(settings, Arc::new(Metrics::new())).expect("matchmaker"))
}

/// The user, and its resume token.
async fn attach(mm: &dyn Engine, user: &str, conn: u64) -> (UserId, String) {
    let id: UserId = user.into();
    let attached = mm.attach(&id, ConnId(conn), None).await.expect("attach");
    (id, attached.resume_token)
}

async fn enqueue(mm: &dyn Engine, user: &UserId) -> Outcome {
    mm.enqueue(user, Prefs::default(), Default::default(), None)
        .await
        .expect("enqueue")
}

/// The same script for every engine: a match, a skip, a match ended by the media server.
async fn script(mm: &dyn Engine) {
    let (a, a_token) = attach(mm, "ana", 1).await;
    let (b, b_token) = attach(mm, "bo", 2).await;
    let first = enqueue(mm, &a).await;
    assert!(first.started.is_empty() && first.closed.is_empty());
    let second = enqueue(mm, &b).await;
    assert_eq!(second.started.len(), 1, "{second:?}");
    let started = &second.started[0];
    assert_eq!(
        started.users,
        [a.clone(), b.clone()],
        "the offerer waited longer"
    );
    assert_eq!(started.pools[0], started.pools[1], "one default pool");
    assert!(!started.pools[0].is_empty());
    assert_eq!(
        started.started_at_ms,
        matched_at(mm, &a, 11, &a_token).await
    );
    assert_eq!(
        started.started_at_ms,
        matched_at(mm, &b, 12, &b_token).await
    );

    // The answerer skips: the record names it, with the session's start time.
    let skipped = mm.skip(&b, None).await.expect("skip");
    assert_eq!(skipped.closed.len(), 1, "{skipped:?}");
    let closed = &skipped.closed[0];
    assert_eq!(closed.session_id, started.session_id);
    assert_eq!(closed.users, started.users);
    assert_eq!(closed.started_at_ms, started.started_at_ms);
    assert!(closed.ended_at_ms >= closed.started_at_ms);
    assert_eq!(closed.ended_by.as_ref(), Some(&b));
    assert_eq!(closed.reason, EndReason::Skip);
    assert!(skipped.started.is_empty(), "the two avoid each other now");

    // Two more users; the media server closes their room for both: ended by nobody.
    let (c, _) = attach(mm, "cy", 3).await;
    let (d, _) = attach(mm, "di", 4).await;
    mm.end(&a, None).await.ok();
    mm.end(&b, None).await.ok();
    enqueue(mm, &c).await;
    let matched = enqueue(mm, &d).await;
    let session = matched.started[0].session_id.clone();
    assert_eq!(matched.started[0].users, [c.clone(), d.clone()]);
    let gone = mm
        .media_left(&session, None, "event-1", Duration::from_secs(60))
        .await
        .expect("media_left")
        .outcome;
    assert_eq!(gone.closed.len(), 1, "{gone:?}");
    assert_eq!(gone.closed[0].session_id, session);
    assert_eq!(gone.closed[0].ended_by, None);
    assert_eq!(gone.closed[0].reason, EndReason::MediaDisconnected);

    // Leaving the queue is no session: no record.
    assert!(enqueue(mm, &c).await.started.is_empty());
    let queued_end = mm.end(&c, None).await.expect("end while queued");
    assert!(queued_end.closed.is_empty() && queued_end.started.is_empty());
}

#[tokio::test]
async fn memory_engine_records_each_session_start_and_end() {
    script(&*memory()).await;
}

#[tokio::test]
async fn redis_engine_records_each_session_start_and_end() {
    let server = RedisServer::start().await;
    script(&*redis(&server)).await;
}
