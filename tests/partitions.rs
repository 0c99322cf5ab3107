//! Redis partitions (`--redis-partitions 3`) end to end: two instances on a real
//! `redis-server` and on a real 3-master Redis Cluster, with users of every partition. What
//! works with one partition works in each (matching across instances, skip, block, resume on
//! the other instance, p2p media with TURN, LiveKit rooms and webhooks, a moderator ending a
//! session through the instance neither member uses), stats add the partitions up, users of
//! different partitions never meet, every key of a user carries its partition's hash tag, the
//! partitions sit on different masters, and an instance configured with another number of
//! partitions than the deployment's refuses to start.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::admin::{admin, ADMIN_TOKEN};
use common::livekit::{post_webhook, sign_webhook, webhook_body, FakeLiveKit, KEY, SECRET as LK};
use common::redis::{Backend, RedisServer};
use common::{match_up, Client, SECRET};
use matchgate::matching::partitioned::{partition_of, session_partition};
use matchgate::redis_keys::{slot, Layout};
use serde_json::{json, Value};

const PARTITIONS: usize = 3;

/// The flags of every instance here: three partitions, the admin API, TURN (each partition
/// needs this instance's ICE servers), and a skip that does not re-queue the peer (so that
/// who meets whom next does not depend on the order of two enqueues).
const FLAGS: [&str; 18] = [
    "--redis-partitions",
    "3",
    "--admin-token",
    ADMIN_TOKEN,
    "--anti-repeat-window-s",
    "0",
    "--requeue-peer-on-skip",
    "false",
    "--resume-grace-ms",
    "20000",
    "--stun-urls",
    "stun:127.0.0.1:3478",
    "--turn-urls",
    "turn:127.0.0.1:3478",
    "--turn-secret",
    "a-turn-secret-of-40-bytes-0123456789abcd",
    "--turn-ttl-s",
    "600",
];

/// A user name starting with `name` whose partition is `partition`.
fn user_in(partition: usize, name: &str) -> String {
    (0..)
        .map(|k| format!("{name}-{k}"))
        .find(|u| partition_of(u, PARTITIONS) == partition)
        .unwrap()
}

/// The next frame that is not a `queue_update`.
async fn next_event(c: &mut Client) -> Value {
    loop {
        let v = c.next().await.expect("open");
        if v["type"] != "queue_update" {
            return v;
        }
    }
}

async fn state(c: &mut Client) -> Value {
    c.request(json!({"type": "status"}), "st").await["state"].clone()
}

async fn enqueue(c: &mut Client) {
    c.send(json!({"type": "enqueue"})).await;
    c.expect("queued").await;
}

/// The node URLs of a backend: one, or every master.
fn nodes(backend: &Backend) -> Vec<String> {
    match backend {
        Backend::Single(r) => vec![r.url()],
        Backend::Cluster(c) => c.urls(),
    }
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Every key of every node, by node.
async fn keys(backend: &Backend) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for url in nodes(backend) {
        let mut c = connection(&url).await;
        all.push(
            redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut c)
                .await
                .unwrap(),
        );
    }
    all
}

/// The hash tag of a key, braces included.
fn tag(key: &str) -> &str {
    &key[..=key.find('}').expect("every key has a hash tag")]
}

async fn everything_works_in_every_partition(backend: Backend) {
    let servers = backend.instances(2, &FLAGS).await;
    let mut users = Vec::new();
    let mut live = Vec::new();
    for p in 0..PARTITIONS {
        let [an, bn, cn, dn] = ["alice", "bob", "carol", "dave"].map(|n| user_in(p, n));
        users.extend([an.clone(), bn.clone(), cn.clone(), dn.clone()]);
        let mut a = servers[0].connect(&an).await;
        let mut b = servers[1].connect(&bn).await;

        // Matched across instances, in a session of this partition, with TURN credentials.
        let (ma, mb) = match_up(&mut a, &mut b).await;
        let sid = ma["session_id"].as_str().unwrap().to_string();
        assert_eq!(sid.len(), 24, "{sid}");
        assert_eq!(session_partition(&sid, PARTITIONS), p, "{sid}");
        for (c, m) in [(&mut a, &ma), (&mut b, &mb)] {
            assert_eq!(
                m["media"]["ice_servers"].as_array().unwrap().len(),
                2,
                "{m}"
            );
            let s = c.request(json!({"type": "status"}), "st").await;
            assert_eq!(
                (&s["session_id"], &s["peer"]),
                (&m["session_id"], &m["peer"])
            );
        }

        // skip across instances: alice waits again, and meets carol, not bob.
        let ended = a.request(json!({"type": "skip"}), "s1").await;
        assert_eq!(ended["reason"], "skip");
        a.expect("queued").await;
        let eb = b.expect("session_ended").await;
        assert_eq!(
            (&eb["reason"], &eb["requeued"]),
            (&json!("peer_skipped"), &json!(false))
        );
        let mut c = servers[1].connect(&cn).await;
        enqueue(&mut c).await;
        let mc = c.expect("matched").await;
        assert_eq!(next_event(&mut a).await["session_id"], mc["session_id"]);

        // block: alice and carol never meet again (no anti-repeat here); bob meets carol.
        a.send(json!({"type": "block", "ref": "b1"})).await;
        let mut frames = [a.next().await.unwrap(), a.next().await.unwrap()];
        frames.sort_by_key(|f| f["type"].to_string());
        assert_eq!(
            (&frames[0]["type"], &frames[1]["reason"]),
            (&json!("ack"), &json!("end"))
        );
        assert_eq!(c.expect("session_ended").await["reason"], "peer_ended");
        enqueue(&mut c).await;
        enqueue(&mut a).await;
        assert_eq!(state(&mut a).await, "queued");
        enqueue(&mut b).await;
        let mb = b.expect("matched").await;
        assert_eq!(next_event(&mut c).await["session_id"], mb["session_id"]);
        assert_eq!(state(&mut a).await, "queued");

        // A moderator ends it: the session id names its partition, whichever instance asks.
        let session = mb["session_id"].as_str().unwrap();
        let path = format!("/v1/admin/sessions/{session}/end");
        let (status, body) = admin(&servers[1], "POST", &path, "").await;
        assert_eq!((status, &body["ended"]), (200, &json!(true)), "{body}");
        for client in [&mut b, &mut c] {
            let ended = next_event(client).await;
            assert_eq!(ended["reason"], "ended_by_moderator", "{ended}");
            assert_eq!(state(client).await, "idle");
        }

        // alice resumes on the other instance, keeps her place and is matched there.
        let token = a.welcome["resume_token"].as_str().unwrap().to_string();
        let last = a.last_seq();
        drop(a);
        let query = format!("resume={token}&last_seq={last}");
        let mut a = servers[1].connect_with(&an, &query).await;
        assert_eq!(a.welcome["resumed"], true, "{}", a.welcome);
        assert_eq!(a.welcome["state"], "queued");
        let mut d = servers[0].connect(&dn).await;
        enqueue(&mut d).await;
        let md = d.expect("matched").await;
        assert_eq!(next_event(&mut a).await["session_id"], md["session_id"]);
        live.push((a, d));
    }

    // Users of different partitions never meet.
    let mut x = servers[0].connect(&user_in(0, "xavier")).await;
    let mut y = servers[1].connect(&user_in(1, "yvonne")).await;
    enqueue(&mut x).await;
    enqueue(&mut y).await;
    assert_eq!(state(&mut x).await, "queued");
    assert_eq!(state(&mut y).await, "queued");
    // The figures add the partitions up: a session live in each, two waiting.
    assert_eq!(servers[0].metric("matchgate_sessions_active").await, 3.0);
    assert_eq!(servers[1].metric("matchgate_queue_length").await, 2.0);
    let (status, overview) = admin(&servers[0], "GET", "/v1/admin/stats", "").await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["sessions"], 3, "{overview}");

    // Every key of a user carries the tag of the user's partition...
    let layout = Layout::new("mg");
    let tags: Vec<String> = (0..PARTITIONS)
        .map(|p| layout.partition(p, PARTITIONS).prefix)
        .collect();
    let by_node = keys(&backend).await;
    for user in &users {
        let own = &tags[partition_of(user, PARTITIONS)];
        let theirs: Vec<&String> = by_node
            .iter()
            .flatten()
            .filter(|k| k.ends_with(&format!(":{user}")))
            .collect();
        assert!(theirs.len() >= 3, "{user}: {theirs:?}");
        for key in theirs {
            assert_eq!(tag(key), own, "{user}: {key}");
        }
    }
    // ...and in a cluster, each partition's keys are on a master of their own.
    if let Backend::Cluster(_) = &backend {
        let mut c = connection(&nodes(&backend)[0]).await;
        let mut homes = BTreeMap::new();
        for t in &tags {
            let keyslot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{t}:x"))
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(keyslot, slot(&t[1..t.len() - 1]), "{t}");
            let holders: BTreeSet<usize> = (0..by_node.len())
                .filter(|&n| by_node[n].iter().any(|k| tag(k) == t))
                .collect();
            assert_eq!(holders.len(), 1, "{t} on {holders:?}");
            homes.insert(t.clone(), holders);
        }
        let masters: BTreeSet<_> = homes.values().flatten().collect();
        assert_eq!(masters.len(), PARTITIONS, "{homes:?}");
    }
}

#[tokio::test]
async fn everything_works_in_every_partition_on_one_redis() {
    everything_works_in_every_partition(Backend::single().await).await;
}

#[tokio::test]
async fn everything_works_in_every_partition_on_a_redis_cluster() {
    everything_works_in_every_partition(Backend::cluster().await).await;
}

#[tokio::test]
async fn livekit_rooms_and_webhooks_reach_the_session_in_its_partition() {
    let fake = FakeLiveKit::start(KEY, LK).await;
    let backend = Backend::single().await;
    let url = fake.url();
    let mut flags = vec![
        "--livekit-url",
        "wss://media.example.test",
        "--livekit-api-url",
        &url,
        "--livekit-api-key",
        KEY,
        "--livekit-api-secret",
        LK,
    ];
    flags.extend(&FLAGS[..4]);
    let servers = backend.instances(2, &flags).await;
    let base = servers[1].http_url("");
    for p in 0..PARTITIONS {
        let mut a = servers[0].connect(&user_in(p, "alice")).await;
        let mut b = servers[1].connect(&user_in(p, "bob")).await;
        // The room was set up and the session went live (media_ready) in its partition.
        let (ma, mb) = match_up(&mut a, &mut b).await;
        assert_eq!(
            session_partition(ma["session_id"].as_str().unwrap(), PARTITIONS),
            p
        );
        let room = ma["media"]["room"].as_str().unwrap();
        // alice leaves the room: the webhook, on the other instance, ends it (media_left).
        let body = webhook_body(
            "participant_left",
            room,
            mb["peer"].as_str(),
            &format!("E{p}"),
        );
        let (status, text) = post_webhook(&base, &body, Some(&sign_webhook(&body, KEY, LK))).await;
        assert_eq!((status, text.trim()), (200, "ended"));
        for c in [&mut a, &mut b] {
            assert_eq!(
                c.expect("session_ended").await["reason"],
                "media_disconnected"
            );
        }
    }
    // A room that names no session of any partition.
    let body = webhook_body("room_finished", "mg_s_x", None, "EX");
    let (status, text) = post_webhook(&base, &body, Some(&sign_webhook(&body, KEY, LK))).await;
    assert_eq!((status, text.trim()), (200, "no_session"));
}

/// Why the gateway with `args` (and the test secret) does not start.
async fn start_error(args: &[&str]) -> String {
    let mut all = vec![
        "matchgate",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        SECRET,
    ];
    all.extend_from_slice(args);
    let config = <matchgate::Config as clap::Parser>::try_parse_from(all).expect("parses");
    match matchgate::Server::bind(config).await {
        Ok(_) => panic!("start-up with {args:?} should fail"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn an_instance_with_another_number_of_partitions_refuses_to_start() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let first = Backend::Single(redis);
    let servers = first.instances(1, &FLAGS[..2]).await;
    let url = url.as_str();
    for other in [&["--redis-partitions", "2"][..], &[]] {
        let mut args = vec!["--redis-url", url];
        args.extend_from_slice(other);
        let e = start_error(&args).await;
        let n = other.get(1).unwrap_or(&"1");
        assert!(e.contains(&format!("--redis-partitions {n}")), "{e}");
        assert!(e.contains("runs with 3"), "{e}");
    }
    // The running instance is unaffected; one more with the same number joins.
    let mut a = servers[0].connect(&user_in(2, "alice")).await;
    enqueue(&mut a).await;
    let more = first.instances(1, &FLAGS[..2]).await;
    let mut b = more[0].connect(&user_in(2, "bob")).await;
    enqueue(&mut b).await;
    b.expect("matched").await;
    // Out of range, refused while parsing.
    for bad in ["0", "65", "x"] {
        let all = ["matchgate", "--redis-partitions", bad];
        let e = <matchgate::Config as clap::Parser>::try_parse_from(all).unwrap_err();
        assert!(e.to_string().contains("--redis-partitions"), "{e}");
    }
}
