//! The admin API's moderation operations end to end, in memory and across two instances on a
//! real `redis-server` (and a Redis Cluster for the reports and the stats): reports listed (filters, cursor pages, bounded page size) and reviewed
//! (resolve, dismiss, idempotent), a live session ended by id (both members told
//! `ended_by_moderator`), and the deployment's figures (connections per instance, pools, open
//! sessions, matches per minute; cluster-wide in Redis mode). Every bad input gets a 4xx with a
//! JSON error.

mod common;

use common::admin::{admin, ADMIN_TOKEN};
use common::redis::Backend;
use common::{http_request, match_up, Client, TestServer};
use serde_json::{json, Value};

/// Where the state lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Memory,
    Redis,
    RedisCluster,
}

/// One server in memory mode, or two instances on a fresh Redis or Redis Cluster (kept alive
/// by the backend).
async fn deployment(mode: Mode) -> (Option<Backend>, Vec<TestServer>) {
    let flags = ["--admin-token", ADMIN_TOKEN];
    let backend = match mode {
        Mode::Memory => return (None, vec![TestServer::start(&flags).await]),
        Mode::Redis => Backend::single().await,
        Mode::RedisCluster => Backend::cluster().await,
    };
    let servers = backend.instances(2, &flags).await;
    (Some(backend), servers)
}

/// The server user number `i` connects to: alternating between instances.
fn pick(servers: &[TestServer], i: usize) -> &TestServer {
    &servers[i % servers.len()]
}

async fn report(client: &mut Client, reason: &str, reference: &str) {
    let reply = client
        .request(json!({"type": "report", "reason": reason}), reference)
        .await;
    assert_eq!(reply["type"], "ack", "{}: {reply}", client.user);
}

/// Every report of a listing, walking the cursor with pages of `limit`.
async fn walk(server: &TestServer, filter: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/admin/reports?limit={limit}{filter}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = admin(server, "GET", &path, "").await;
        assert_eq!(status, 200, "{path}: {page}");
        let reports = page["reports"].as_array().unwrap();
        assert!(reports.len() <= limit);
        all.extend(reports.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return all,
        }
    }
}

fn ids(reports: &[Value]) -> Vec<&str> {
    reports.iter().map(|r| r["id"].as_str().unwrap()).collect()
}

fn id_ms(report: &Value) -> u64 {
    let id = report["id"].as_str().unwrap();
    id.split_once('-').unwrap().0.parse().unwrap()
}

async fn reports_are_listed_and_reviewed(mode: Mode) {
    let (_backend, servers) = deployment(mode).await;
    let mut a = pick(&servers, 0).connect("alice").await;
    let mut b = pick(&servers, 1).connect("bob").await;
    let mut c = pick(&servers, 2).connect("carol").await;
    match_up(&mut a, &mut b).await;
    report(&mut a, "spam", "r1").await;
    report(&mut b, "harassment", "r2").await;
    a.request(json!({"type": "end"}), "e").await;
    b.expect("session_ended").await;
    match_up(&mut a, &mut c).await;
    report(&mut c, "other", "r3").await;

    // Any instance lists every report, newest first.
    for server in &servers {
        let (status, page) = admin(server, "GET", "/v1/admin/reports", "").await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["next_cursor"], Value::Null);
        let reports = page["reports"].as_array().unwrap();
        let who: Vec<(&str, &str, &str)> = reports
            .iter()
            .map(|r| {
                (
                    r["reporter"].as_str().unwrap(),
                    r["reported"].as_str().unwrap(),
                    r["reason"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            who,
            [
                ("carol", "alice", "other"),
                ("bob", "alice", "harassment"),
                ("alice", "bob", "spam"),
            ]
        );
        assert!(reports.iter().all(|r| r["state"] == "open"));
        assert!(reports.iter().all(|r| r["reviewed_at_ms"].is_null()));
    }
    let all = walk(&servers[0], "", 50).await;
    let mut sorted = ids(&all);
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        std::cmp::Reverse((ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap()))
    });
    assert_eq!(ids(&all), sorted, "newest first");
    // Pages of one walk the same list, each id once.
    assert_eq!(ids(&walk(&servers[0], "", 1).await), ids(&all));
    assert_eq!(ids(&walk(&servers[0], "", 2).await), ids(&all));

    // Filters.
    let by_bob = walk(&servers[0], "&user=bob", 50).await;
    assert_eq!(ids(&by_bob), ids(&all[1..]), "reporter or reported");
    let spam = walk(&servers[0], "&reason=spam", 50).await;
    assert_eq!(ids(&spam), ids(&all[2..]));
    let carol_other = walk(&servers[0], "&user=carol&reason=other", 50).await;
    assert_eq!(ids(&carol_other), ids(&all[..1]));
    assert!(walk(&servers[0], "&user=nobody", 50).await.is_empty());
    let since = id_ms(&all[1]);
    let recent = walk(&servers[0], &format!("&since_ms={since}"), 50).await;
    assert!(recent.iter().all(|r| id_ms(r) >= since));
    assert!(ids(&recent).starts_with(&ids(&all[..2])));
    let older = walk(&servers[0], &format!("&until_ms={since}"), 50).await;
    assert!(older.iter().all(|r| id_ms(r) < since));
    assert_eq!(
        recent.len() + older.len(),
        all.len(),
        "the two ranges split the list"
    );

    // Reviews: recorded, visible, idempotent.
    let bobs = all[1]["id"].as_str().unwrap();
    let path = format!("/v1/admin/reports/{bobs}/resolve");
    let (status, resolved) = admin(&servers[0], "POST", &path, "").await;
    assert_eq!(status, 200, "{resolved}");
    assert_eq!(resolved["state"], "resolved");
    assert_eq!(resolved["id"], all[1]["id"]);
    let at = resolved["reviewed_at_ms"].as_u64().expect("reviewed_at_ms");
    let (status, again) = admin(pick(&servers, 1), "POST", &path, "").await;
    assert_eq!(status, 200);
    assert_eq!(again, resolved, "the same decision again changes nothing");
    let alices = all[2]["id"].as_str().unwrap();
    let path = format!("/v1/admin/reports/{alices}/dismiss");
    let (status, dismissed) = admin(&servers[0], "POST", &path, "").await;
    assert_eq!((status, &dismissed["state"]), (200, &json!("dismissed")));
    for server in &servers {
        let listed = walk(server, "", 50).await;
        let states: Vec<&str> = listed
            .iter()
            .map(|r| r["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["open", "resolved", "dismissed"]);
        assert_eq!(listed[1]["reviewed_at_ms"], json!(at));
    }
    assert_eq!(ids(&walk(&servers[0], "&state=resolved", 50).await), [bobs]);
    assert_eq!(
        ids(&walk(&servers[0], "&state=open", 1).await),
        ids(&all[..1])
    );

    // Bad input: a 4xx with a JSON error, nothing changed.
    for path in [
        "/v1/admin/reports?limit=0",
        "/v1/admin/reports?limit=201",
        "/v1/admin/reports?limit=x",
        "/v1/admin/reports?reason=rude",
        "/v1/admin/reports?state=closed",
        "/v1/admin/reports?since_ms=yesterday",
        "/v1/admin/reports?since_ms=10&until_ms=10",
        "/v1/admin/reports?cursor=abc",
        "/v1/admin/reports?bogus=1",
    ] {
        let (status, body) = admin(&servers[0], "GET", path, "").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"], "bad_request", "{path}: {body}");
        assert!(
            body["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{path}: {body}"
        );
    }
    for (path, expected) in [
        ("/v1/admin/reports/abc/resolve", 400),
        ("/v1/admin/reports/1-2-3/dismiss", 400),
        ("/v1/admin/reports/1-999999/resolve", 404),
    ] {
        let (status, body) = admin(&servers[0], "POST", path, "").await;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let (status, _) = http_request(servers[0].addr, "GET", "/v1/admin/reports", &[], "").await;
    assert_eq!(status, 401);
    assert_eq!(walk(&servers[0], "", 50).await.len(), 3);
}

#[tokio::test]
async fn reports_are_listed_and_reviewed_in_memory() {
    reports_are_listed_and_reviewed(Mode::Memory).await;
}

#[tokio::test]
async fn reports_are_listed_and_reviewed_in_redis() {
    reports_are_listed_and_reviewed(Mode::Redis).await;
}

#[tokio::test]
async fn reports_are_listed_and_reviewed_in_redis_cluster() {
    reports_are_listed_and_reviewed(Mode::RedisCluster).await;
}

async fn a_moderator_ends_a_live_session(mode: Mode) {
    let (_backend, servers) = deployment(mode).await;
    let mut a = pick(&servers, 0).connect("alice").await;
    let mut b = pick(&servers, 1).connect("bob").await;
    let (matched, _) = match_up(&mut a, &mut b).await;
    let session = matched["session_id"].as_str().unwrap();
    let path = format!("/v1/admin/sessions/{session}/end");
    // Through the instance neither member is connected to, when there are two.
    let via = servers.last().unwrap();
    let (status, body) = admin(via, "POST", &path, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"session_id": session, "ended": true}));
    for client in [&mut a, &mut b] {
        let ended = client.expect("session_ended").await;
        assert_eq!(ended["session_id"], session);
        assert_eq!(ended["reason"], "ended_by_moderator");
        assert_eq!(ended["requeued"], false);
        let status = client.request(json!({"type": "status"}), "s").await;
        assert_eq!(status["state"], "idle", "{}: {status}", client.user);
    }
    assert_eq!(
        via.metric(r#"matchgate_sessions_ended_total{reason="ended_by_moderator"}"#)
            .await,
        1.0
    );
    let (status, body) = admin(via, "POST", &path, "").await;
    assert_eq!(
        (status, &body["error"]),
        (404, &json!("not_found")),
        "ended once"
    );
    let long = "s".repeat(200);
    for (path, expected) in [
        (format!("/v1/admin/sessions/{long}/end"), 400),
        ("/v1/admin/sessions/s_nothing/end".to_string(), 404),
    ] {
        let (status, body) = admin(via, "POST", &path, "").await;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(body["error"].is_string());
    }
    // A pair waiting to be matched again is not a live session either.
    match_up(&mut a, &mut b).await;
}

#[tokio::test]
async fn a_moderator_ends_a_live_session_in_memory() {
    a_moderator_ends_a_live_session(Mode::Memory).await;
}

#[tokio::test]
async fn a_moderator_ends_a_live_session_in_redis() {
    a_moderator_ends_a_live_session(Mode::Redis).await;
}

async fn stats_show_the_whole_deployment(mode: Mode) {
    let (_backend, servers) = deployment(mode).await;
    let mut clients = Vec::new();
    for (i, topic) in ["x", "y"].into_iter().enumerate() {
        let mut waiter = pick(&servers, i).connect(&format!("waiter-{topic}")).await;
        waiter
            .send(json!({"type": "enqueue", "prefs": {"topic": topic}}))
            .await;
        waiter.expect("queued").await;
        clients.push(waiter);
    }
    let mut a = pick(&servers, 0).connect("alice").await;
    let mut b = pick(&servers, 0).connect("bob").await;
    match_up(&mut a, &mut b).await;
    for server in &servers {
        let (status, stats) = admin(server, "GET", "/v1/admin/stats", "").await;
        assert_eq!(status, 200, "{stats}");
        let pools = stats["pools"].as_array().unwrap();
        let waiting: Vec<u64> = pools
            .iter()
            .map(|p| p["waiting"].as_u64().unwrap())
            .collect();
        assert_eq!(waiting, [1, 1], "{stats}");
        assert!(pools[0]["pool"].as_str().unwrap().contains('x'), "{stats}");
        assert!(pools[1]["pool"].as_str().unwrap().contains('y'), "{stats}");
        assert_eq!(stats["sessions"], 1, "{stats}");
        let matches = &stats["matches"];
        let total =
            matches["last_minute"].as_u64().unwrap() + matches["this_minute"].as_u64().unwrap();
        assert_eq!(total, 1, "{stats}");
        let mut instances: Vec<(String, u64)> = stats["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                // Instance ids carry a random suffix (which may hold a '-' of its own) after
                // the configured name and a '-'.
                let name = i["instance"].as_str().unwrap();
                let name = name.split_once('-').map_or(name, |(n, _)| n);
                (name.to_string(), i["connections"].as_u64().unwrap())
            })
            .collect();
        instances.sort();
        let expected: Vec<(String, u64)> = if mode != Mode::Memory {
            vec![("inst0".into(), 3), ("inst1".into(), 1)]
        } else {
            vec![("local".into(), 4)]
        };
        assert_eq!(instances, expected, "{stats}");
    }
    // A pool nobody waits in any more is not listed.
    clients[0].request(json!({"type": "end"}), "leave").await;
    let (_, stats) = admin(&servers[0], "GET", "/v1/admin/stats", "").await;
    assert_eq!(stats["pools"].as_array().unwrap().len(), 1, "{stats}");
}

#[tokio::test]
async fn stats_show_the_whole_deployment_in_memory() {
    stats_show_the_whole_deployment(Mode::Memory).await;
}

#[tokio::test]
async fn stats_show_the_whole_deployment_in_redis() {
    stats_show_the_whole_deployment(Mode::Redis).await;
}

#[tokio::test]
async fn stats_show_the_whole_deployment_in_redis_cluster() {
    stats_show_the_whole_deployment(Mode::RedisCluster).await;
}
