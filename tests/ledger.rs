//! The session ledger against a real, throwaway PostgreSQL (started by the test, never the
//! machine's): migrations from empty and again, one correct row per ended session (memory, and
//! two Redis instances), a database outage that loses nothing within the bound and does not
//! hold up matching, what is dropped past the bound being counted, and blocks and bans that
//! outlive a Redis flush.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::postgres::PostgresServer;
use common::process::GatewayProcess;
use common::redis::{Backend, RedisServer};
use common::{http_request, match_up, refused_handshake, Client, TestServer, PATIENCE};

const ADMIN: &str = "admin-token-admin-token-admin-token";

/// `matchgate migrate` with `args`: exit code and output.
fn migrate(url: &str) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_matchgate"))
        .args(["migrate", "--database-url", url])
        .env_remove("MATCHGATE_DATABASE_URL")
        .output()
        .expect("running matchgate migrate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_once() {
    let pg = PostgresServer::start().await;
    let db = pg.client().await;
    let tables = "SELECT count(*) FROM information_schema.tables
        WHERE table_schema = 'public'
        AND table_name IN ('sessions', 'blocks', 'reports', 'bans', 'matchgate_migrations')";
    let count: i64 = db.query_one(tables, &[]).await.unwrap().get(0);
    assert_eq!(count, 0, "empty to begin with");

    let (code, out) = migrate(&pg.url());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("applied the ledger migrations [1]"), "{out}");
    let count: i64 = db.query_one(tables, &[]).await.unwrap().get(0);
    assert_eq!(count, 5);

    // Again: nothing to do, nothing changed.
    let (code, out) = migrate(&pg.url());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("up to date"), "{out}");
    let versions: Vec<i32> = db
        .query("SELECT version FROM matchgate_migrations", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1]);

    // A gateway on the migrated database starts (and migrates nothing more).
    let server = TestServer::start(&["--database-url", &pg.url()]).await;
    server.shutdown().await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM matchgate_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);

    // Bad input: a clear error, no panic.
    let (code, out) = migrate("postgres://nobody@127.0.0.1:1/none?connect_timeout=1");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("matchgate migrate:"), "{out}");
    let (code, out) = migrate("not a url at all ===");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("MATCHGATE_DATABASE_URL is invalid"), "{out}");
}

/// One session as both clients saw it, and how it ended.
struct Seen {
    session_id: String,
    offerer: String,
    answerer: String,
    started_at_ms: u64,
    ended_by: String,
    reason: &'static str,
}

/// Sends `frame` with `reference` and returns the reply that echoes it (events that come
/// first, like `queued` after a skip, are passed over).
async fn reply(c: &mut Client, mut frame: Value, reference: &str) -> Value {
    frame["ref"] = json!(reference);
    c.send(frame).await;
    loop {
        let v = c.next().await.expect("a reply");
        if v["ref"] == reference {
            return v;
        }
    }
}

/// `a` and `b` meet (`a` offers); then `a` (or `b`) ends the session with `action`; both go
/// back to idle. Returns what the ledger must hold.
async fn session(a: &mut Client, b: &mut Client, a_ends: bool, action: &'static str) -> Seen {
    let (ma, mb) = match_up(a, b).await;
    assert_eq!(ma["role"], "offerer");
    assert_eq!(ma["started_at_ms"], mb["started_at_ms"]);
    let (offerer, answerer) = (a.user.clone(), b.user.clone());
    let (ender, other) = if a_ends { (a, b) } else { (b, a) };
    ender.send(json!({"type": action})).await;
    assert_eq!(ender.expect("session_ended").await["reason"], action);
    other.expect("session_ended").await;
    let ended_by = ender.user.clone();
    // A skip puts users back in the queue: out again, for the next round.
    for c in [ender, other] {
        let status = reply(c, json!({"type": "status"}), "st").await;
        if status["state"] == "queued" {
            reply(c, json!({"type": "end"}), "out").await;
        }
    }
    Seen {
        session_id: ma["session_id"].as_str().unwrap().to_string(),
        offerer,
        answerer,
        started_at_ms: ma["started_at_ms"].as_u64().unwrap(),
        ended_by,
        reason: action,
    }
}

/// The clients `i` and `j` (different) of `clients`.
fn two(clients: &mut [Client], i: usize, j: usize) -> (&mut Client, &mut Client) {
    let (low, high) = clients.split_at_mut(i.max(j));
    if i < j {
        (&mut low[i], &mut high[0])
    } else {
        (&mut high[0], &mut low[j])
    }
}

/// Checks every column of the ledger's row for `seen`.
async fn assert_row(db: &tokio_postgres::Client, seen: &Seen) {
    let row = db
        .query_one(
            "SELECT offerer, answerer, offerer_pool, answerer_pool,
                (extract(epoch FROM started_at) * 1000)::bigint,
                (extract(epoch FROM ended_at) * 1000)::bigint,
                ended_by, end_reason, duration_ms
            FROM sessions WHERE session_id = $1",
            &[&seen.session_id],
        )
        .await
        .unwrap_or_else(|e| panic!("no row for {}: {e}", seen.session_id));
    assert_eq!(row.get::<_, String>(0), seen.offerer);
    assert_eq!(row.get::<_, String>(1), seen.answerer);
    let pools: (Option<String>, Option<String>) = (row.get(2), row.get(3));
    assert!(
        pools.0.is_some() && pools.0 == pools.1,
        "one default pool: {pools:?}"
    );
    let started: i64 = row.get(4);
    let ended: i64 = row.get(5);
    assert_eq!(
        started as u64, seen.started_at_ms,
        "started_at as matched said"
    );
    assert!(ended >= started);
    assert_eq!(
        row.get::<_, Option<String>>(6).as_deref(),
        Some(&*seen.ended_by)
    );
    assert_eq!(
        row.get::<_, Option<String>>(7).as_deref(),
        Some(seen.reason)
    );
    assert_eq!(row.get::<_, Option<i64>>(8), Some(ended - started));
}

/// Four sessions between the four `clients` (0 and 2 on one instance, 1 and 3 on the other
/// in Redis mode, so every pair spans both), ended by a skip or an end from either side (a
/// pair that skipped avoids each other for a while: the second round pairs them anew), then
/// checks that the ledger has exactly one correct row each.
async fn sessions_are_recorded(pg: &PostgresServer, clients: &mut [Client]) {
    let mut seen = Vec::new();
    let rounds = [
        (0, 1, true, "skip"),
        (2, 3, false, "skip"),
        (0, 3, false, "end"),
        (2, 1, true, "end"),
    ];
    for (i, j, a_ends, action) in rounds {
        let (a, b) = two(clients, i, j);
        seen.push(session(a, b, a_ends, action).await);
    }
    pg.wait_count(
        "SELECT count(*) FROM sessions WHERE ended_at IS NOT NULL",
        seen.len() as i64,
    )
    .await;
    let db = pg.client().await;
    let total: i64 = db
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total as usize, seen.len(), "one row per session");
    for s in &seen {
        assert_row(&db, s).await;
    }
}

#[tokio::test]
async fn each_ended_session_is_one_correct_row_in_memory_mode() {
    let pg = PostgresServer::start().await;
    let server = TestServer::start(&["--database-url", &pg.url()]).await;
    let mut clients = Vec::new();
    for user in ["ana", "bo", "cy", "di"] {
        clients.push(server.connect(user).await);
    }
    sessions_are_recorded(&pg, &mut clients).await;
    assert_eq!(
        server.metric("matchgate_ledger_written_total").await,
        8.0,
        "a start and an end per session"
    );
    assert_eq!(server.metric("matchgate_ledger_dropped_total").await, 0.0);
}

#[tokio::test]
async fn each_ended_session_is_one_correct_row_with_two_redis_instances() {
    let pg = PostgresServer::start().await;
    let redis = Backend::single().await;
    let url = pg.url();
    let servers = redis.instances(2, &["--database-url", &url]).await;
    // Each pair spans the two instances.
    let mut clients = Vec::new();
    for (i, user) in ["ana", "bo", "cy", "di"].into_iter().enumerate() {
        clients.push(servers[i % 2].connect(user).await);
    }
    sessions_are_recorded(&pg, &mut clients).await;
    let mut written = 0.0;
    for server in &servers {
        written += server.metric("matchgate_ledger_written_total").await;
        assert_eq!(server.metric("matchgate_ledger_dropped_total").await, 0.0);
    }
    assert_eq!(written, 8.0, "each record written once, by one instance");
}

/// `n` sessions between `a` and `b` while nobody checks the database; each must reach
/// `matched` and `session_ended`.
async fn sessions_while_down(a: &mut Client, b: &mut Client, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (ma, _) = match_up(a, b).await;
        a.request(json!({"type": "end"}), "e").await;
        b.expect("session_ended").await;
        ids.push(ma["session_id"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn a_database_outage_loses_nothing_within_the_bound_and_matching_goes_on() {
    let mut pg = PostgresServer::start().await;
    let server = TestServer::start(&["--database-url", &pg.url()]).await;
    let mut a = server.connect("ana").await;
    let mut b = server.connect("bo").await;
    pg.stop();
    let ids = sessions_while_down(&mut a, &mut b, 5).await;
    // The writer noticed the outage (and keeps the records).
    let deadline = std::time::Instant::now() + PATIENCE;
    while server.metric("matchgate_ledger_retries_total").await < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no retry counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.metric("matchgate_ledger_queue_depth").await > 0.0);
    pg.restart().await;
    pg.wait_count(
        "SELECT count(*) FROM sessions WHERE ended_at IS NOT NULL",
        ids.len() as i64,
    )
    .await;
    let db = pg.client().await;
    for id in &ids {
        let row = db
            .query_one(
                "SELECT offerer, answerer, ended_by, end_reason FROM sessions WHERE session_id = $1",
                &[id],
            )
            .await
            .unwrap();
        let values: (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            values,
            ("ana".into(), "bo".into(), "ana".into(), "end".into())
        );
    }
    assert_eq!(server.metric("matchgate_ledger_dropped_total").await, 0.0);
    assert_eq!(server.metric("matchgate_ledger_written_total").await, 10.0);
    assert_eq!(server.metric("matchgate_ledger_queue_depth").await, 0.0);
}

#[tokio::test]
async fn past_the_bound_records_are_dropped_and_counted() {
    let mut pg = PostgresServer::start().await;
    let server = TestServer::start(&["--database-url", &pg.url(), "--database-queue", "4"]).await;
    let mut a = server.connect("ana").await;
    let mut b = server.connect("bo").await;
    pg.stop();
    let ids = sessions_while_down(&mut a, &mut b, 10).await;
    let dropped = server.metric("matchgate_ledger_dropped_total").await;
    assert!(dropped >= 1.0, "20 records, room for 4 plus a batch");
    pg.restart().await;
    let deadline = std::time::Instant::now() + PATIENCE;
    while server.metric("matchgate_ledger_queue_depth").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never emptied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = server.metric("matchgate_ledger_written_total").await;
    let dropped = server.metric("matchgate_ledger_dropped_total").await;
    assert_eq!(
        written + dropped,
        2.0 * ids.len() as f64,
        "every record written or counted as dropped"
    );
    // What was written is all there: a start or an end makes a row.
    let db = pg.client().await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows >= 1 && rows as usize <= ids.len() && rows as f64 <= written);
}

#[tokio::test]
async fn a_batch_the_database_refuses_is_dropped_and_counted_and_the_queue_goes_on() {
    let pg = PostgresServer::start().await;
    let server = TestServer::start(&["--database-url", &pg.url()]).await;
    let db = pg.client().await;
    // Not an outage: this report breaks a rule of the database.
    db.batch_execute("ALTER TABLE reports ADD CONSTRAINT no_spam CHECK (reason <> 'spam')")
        .await
        .unwrap();
    let mut a = server.connect("ana").await;
    let mut b = server.connect("bo").await;
    match_up(&mut a, &mut b).await;
    // The session's start is written on its own, before the report.
    pg.wait_count("SELECT count(*) FROM sessions", 1).await;
    let ack = reply(&mut a, json!({"type": "report", "reason": "spam"}), "r1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let deadline = std::time::Instant::now() + PATIENCE;
    while server.metric("matchgate_ledger_dropped_total").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refused batch was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.metric("matchgate_ledger_retries_total").await >= 2.0);
    let ack = reply(&mut b, json!({"type": "report", "reason": "other"}), "r2").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    pg.wait_count("SELECT count(*) FROM reports WHERE reporter = 'bo'", 1)
        .await;
    let row = db
        .query_one("SELECT reported, reason, session_id FROM reports", &[])
        .await
        .unwrap();
    let (reported, reason): (String, String) = (row.get(0), row.get(1));
    assert_eq!((reported.as_str(), reason.as_str()), ("ana", "other"));
    assert_eq!(server.metric("matchgate_ledger_dropped_total").await, 1.0);
}

#[tokio::test]
async fn at_shutdown_what_is_queued_is_written_or_reported() {
    let mut pg = PostgresServer::start().await;
    let url = pg.url();
    let gateway = |drain_ms: &'static str| {
        let url = url.clone();
        async move {
            let args = [
                "--jwt-secret",
                common::SECRET,
                "--database-url",
                &url,
                "--drain-timeout-ms",
                drain_ms,
            ];
            let process = GatewayProcess::start(&args).await;
            process.wait_ready().await;
            process
        }
    };
    // The database up: the last session is in the ledger once the gateway has exited.
    let mut up = gateway("5000").await;
    let mut a = up.connect("ana").await;
    let mut b = up.connect("bo").await;
    let ids = sessions_while_down(&mut a, &mut b, 1).await;
    up.terminate();
    drop((a, b));
    assert!(up.wait_exit().await.success(), "{}", up.logs());
    let db = pg.client().await;
    let ended: i64 = db
        .query_one(
            "SELECT count(*) FROM sessions WHERE session_id = $1 AND ended_at IS NOT NULL",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1);

    // The database down: what could not be written is logged when the gateway stops.
    let mut down = gateway("300").await;
    pg.stop();
    let mut a = down.connect("ana").await;
    let mut b = down.connect("bo").await;
    sessions_while_down(&mut a, &mut b, 1).await;
    down.terminate();
    drop((a, b));
    down.wait_exit().await;
    assert!(
        down.logs()
            .contains("ledger records not written before shutdown records=2"),
        "{}",
        down.logs()
    );
}

/// The next event of `c` that is not a `queue_update`.
async fn next_event(c: &mut Client) -> Value {
    loop {
        let frame = c.next().await.expect("an event");
        if frame["type"] != "queue_update" {
            return frame;
        }
    }
}

/// The deployment's gateways, started fresh against `redis` (or in memory) and `pg`.
async fn gateways(redis: Option<&Backend>, pg: &PostgresServer) -> Vec<TestServer> {
    let url = pg.url();
    let flags = ["--database-url", url.as_str(), "--admin-token", ADMIN];
    match redis {
        Some(redis) => redis.instances(2, &flags).await,
        None => vec![TestServer::start(&flags).await],
    }
}

/// `ana` blocks `bo` and an admin bans `eve`; the state is lost (Redis flushed, or the
/// embedded gateway restarted), the gateways start again: `eve` is refused and ana and bo
/// never meet.
async fn blocks_and_bans_outlive_the_fast_path(redis: Option<Backend>) {
    let pg = PostgresServer::start().await;
    let servers = gateways(redis.as_ref(), &pg).await;
    let last = servers.len() - 1;
    let mut ana = servers[0].connect("ana").await;
    let mut bo = servers[last].connect("bo").await;
    match_up(&mut ana, &mut bo).await;
    let ack = reply(&mut ana, json!({"type": "block"}), "b").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    bo.expect("session_ended").await;
    let body = json!({"kind": "user", "value": "eve", "ttl_s": 3600, "reason": "spam"});
    let auth = format!("Bearer {ADMIN}");
    let (status, text) = http_request(
        servers[0].addr,
        "POST",
        "/v1/admin/bans",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    pg.wait_count(
        "SELECT count(*) FROM blocks WHERE blocker = 'ana' AND blocked = 'bo'",
        1,
    )
    .await;
    pg.wait_count("SELECT count(*) FROM bans WHERE value = 'eve'", 1)
        .await;
    drop((ana, bo));
    for server in servers {
        server.shutdown().await;
    }
    match &redis {
        Some(Backend::Single(redis)) => flushall(redis).await,
        Some(Backend::Cluster(cluster)) => {
            for node in &cluster.nodes {
                flushall(node).await;
            }
        }
        None => {}
    }

    let servers = gateways(redis.as_ref(), &pg).await;
    let (status, body) = refused_handshake(
        &servers[last].ws_url(),
        &[("authorization", &format!("Bearer {}", common::token("eve")))],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // ana and bo wait; whoever comes next meets one of them, never they each other.
    let mut ana = servers[0].connect("ana").await;
    let mut bo = servers[last].connect("bo").await;
    for c in [&mut ana, &mut bo] {
        c.send(json!({"type": "enqueue"})).await;
        c.expect("queued").await;
    }
    for c in [&mut ana, &mut bo] {
        let status = reply(c, json!({"type": "status"}), "st").await;
        assert_eq!(
            status["state"], "queued",
            "{}: the blocked pair met",
            c.user
        );
    }
    let mut cy = servers[0].connect("cy").await;
    cy.send(json!({"type": "enqueue"})).await;
    cy.expect("queued").await;
    let with_cy = next_event(&mut cy).await;
    assert_eq!(with_cy["type"], "matched");
    let ma = next_event(&mut ana).await;
    assert_eq!(
        ma["session_id"], with_cy["session_id"],
        "ana waited longest"
    );
    let mut di = servers[last].connect("di").await;
    di.send(json!({"type": "enqueue"})).await;
    di.expect("queued").await;
    let with_di = next_event(&mut di).await;
    let mb = next_event(&mut bo).await;
    assert_eq!(mb["type"], "matched");
    assert_eq!(mb["session_id"], with_di["session_id"]);
}

async fn flushall(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn blocks_and_bans_outlive_a_redis_flush() {
    blocks_and_bans_outlive_the_fast_path(Some(Backend::single().await)).await;
}

#[tokio::test]
async fn blocks_and_bans_outlive_a_redis_cluster_flush() {
    blocks_and_bans_outlive_the_fast_path(Some(Backend::cluster().await)).await;
}

#[tokio::test]
async fn blocks_and_bans_outlive_a_restart_of_the_embedded_mode() {
    blocks_and_bans_outlive_the_fast_path(None).await;
}
