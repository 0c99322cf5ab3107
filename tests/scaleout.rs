//! Scale-out mode: several gateway instances sharing real Redis, clients spread across them
//! like a load balancer without sticky sessions. Every scenario runs twice: against one
//! `redis-server` and against a 3-master Redis Cluster, both started on ephemeral loopback
//! ports by the test.

mod common;

use common::redis::Backend;
use serde_json::json;

/// Runs a scenario against a single Redis and against a Redis Cluster.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn single_redis() {
                super::$name(super::Backend::single().await).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                super::$name(super::Backend::cluster().await).await;
            }
        }
    };
}

on_both!(users_on_different_instances_match_skip_and_end);
async fn users_on_different_instances_match_skip_and_end(redis: Backend) {
    let servers = redis.instances(2, &[]).await;
    let mut a = servers[0].connect("alice").await;
    let mut b = servers[1].connect("bob").await;
    let (m, mb) = common::match_up(&mut a, &mut b).await;
    let sid = m["session_id"].as_str().unwrap().to_string();
    for (c, matched) in [(&mut a, &m), (&mut b, &mb)] {
        let s = c.request(json!({"type": "status"}), "st").await;
        assert_eq!(s["session_id"], matched["session_id"]);
        assert_eq!(s["peer"], matched["peer"]);
        assert_eq!(s["role"], matched["role"]);
    }

    // skip across instances: both told, both re-queued (and they avoid each other).
    let ended = a.request(json!({"type": "skip"}), "s1").await;
    assert_eq!(ended["reason"], "skip");
    assert_eq!(ended["session_id"], sid.as_str());
    a.expect("queued").await;
    let eb = b.expect("session_ended").await;
    assert_eq!(eb["reason"], "peer_skipped");
    assert_eq!(eb["requeued"], true);
    let qb = b.expect("queued").await;
    assert_eq!(qb["position"], 1);

    // A third user on instance 0 takes alice (longest waiting), a fourth on 1 takes bob.
    let mut c = servers[0].connect("carol").await;
    c.send(json!({"type": "enqueue"})).await;
    c.expect("queued").await;
    let mc = c.expect("matched").await;
    let ma = a.expect("matched").await;
    assert_eq!(mc["session_id"], ma["session_id"]);

    // end across instances.
    let e = c.request(json!({"type": "end"}), "e").await;
    assert_eq!(e["reason"], "end");
    let ea = a.expect("session_ended").await;
    assert_eq!(ea["reason"], "peer_ended");
    assert_eq!(ea["requeued"], false);

    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "idle");
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "queued");
    assert_eq!(servers[1].metric("matchgate_queue_length").await, 1.0);
    assert_eq!(servers[0].metric("matchgate_sessions_active").await, 0.0);
    assert!(
        servers[0]
            .metric(r#"matchgate_pubsub_messages_total{direction="out"}"#)
            .await
            > 0.0
    );
    assert!(
        servers[1]
            .metric(r#"matchgate_pubsub_messages_total{direction="in"}"#)
            .await
            > 0.0
    );
}

on_both!(resume_on_another_instance_replays_missed_events);
async fn resume_on_another_instance_replays_missed_events(redis: Backend) {
    let servers = redis.instances(2, &["--resume-grace-ms", "20000"]).await;
    let mut a = servers[0].connect("alice").await;
    let mut b = servers[1].connect("bob").await;
    common::match_up(&mut a, &mut b).await;
    let token = a.welcome["resume_token"].as_str().unwrap().to_string();
    let last = a.last_seq();
    drop(a); // the connection drops without a close handshake
    let ps = b.expect("peer_status").await;
    assert_eq!(ps["state"], "reconnecting");
    // While alice is away, bob ends the session: alice's session_ended goes to her log.
    b.send(json!({"type": "end"})).await;
    b.expect("session_ended").await;

    let mut a2 = servers[1]
        .connect_with("alice", &format!("resume={token}&last_seq={last}"))
        .await;
    assert_eq!(a2.welcome["resumed"], true, "{}", a2.welcome);
    assert_eq!(a2.welcome["state"], "idle");
    let replayed = a2.expect("session_ended").await;
    assert_eq!(replayed["reason"], "peer_ended");
    assert_eq!(replayed["seq"], last + 1);
    // Nothing is delivered twice: the next event has the next seq.
    a2.send(json!({"type": "enqueue"})).await;
    let q = a2.expect("queued").await;
    assert_eq!(q["seq"], last + 2);
}

on_both!(a_second_connection_on_another_instance_replaces_the_first);
async fn a_second_connection_on_another_instance_replaces_the_first(redis: Backend) {
    let servers = redis.instances(2, &[]).await;
    let mut first = servers[0].connect("dana").await;
    first.send(json!({"type": "enqueue"})).await;
    first.expect("queued").await;
    let token = first.welcome["resume_token"].as_str().unwrap().to_string();
    let mut second = servers[1]
        .connect_with("dana", &format!("resume={token}&last_seq=1"))
        .await;
    assert_eq!(second.welcome["state"], "queued");
    assert_eq!(second.welcome["resumed"], true);
    match first.closed().await {
        common::Closed::Code(code) => assert_eq!(code, 4001),
        other => panic!("expected close 4001, got {other:?}"),
    }
    // The new connection gets the match.
    let mut eve = servers[0].connect("eve").await;
    eve.send(json!({"type": "enqueue"})).await;
    eve.expect("queued").await;
    eve.expect("matched").await;
    let m = second.expect("matched").await;
    assert_eq!(m["seq"], 2);
}

on_both!(a_reconnecting_waiter_keeps_its_place_and_is_matched_on_return);
async fn a_reconnecting_waiter_keeps_its_place_and_is_matched_on_return(redis: Backend) {
    let servers = redis.instances(2, &["--resume-grace-ms", "20000"]).await;
    let mut a = servers[0].connect("alice").await;
    let q = a.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(q["position"], 0);
    let token = a.welcome["resume_token"].as_str().unwrap().to_string();
    let last = a.last_seq();
    drop(a);
    // Once her connection is detached, alice waits apart: she keeps her place...
    let wait = async {
        let detached = r#"matchgate_detach_calls_total{result="ok"}"#;
        while servers[0].metric(detached).await < 1.0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(common::PATIENCE, wait)
        .await
        .expect("alice's connection is detached");
    let mut b = servers[1].connect("bob").await;
    let q = b.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(q["position"], 1, "alice counts: {q}");
    // ...but is not matched while away.
    let s = b.request(json!({"type": "status"}), "st").await;
    assert_eq!(
        (s["state"].as_str(), s["position"].as_u64()),
        (Some("queued"), Some(1))
    );
    // Back (on the other instance), she is matched at once, as the one who waited longer.
    let mut a = servers[1]
        .connect_with("alice", &format!("resume={token}&last_seq={last}"))
        .await;
    assert_eq!(a.welcome["state"], "queued");
    let ma = a.expect("matched").await;
    assert_eq!(ma["role"], "offerer");
    assert_eq!(b.expect("matched").await["session_id"], ma["session_id"]);
}
