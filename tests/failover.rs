//! Scale-out failures: an instance killed with SIGKILL in the middle of sessions, Redis stopped
//! and restarted empty under load, and the pub/sub connection cut. Real `redis-server` and real
//! gateway processes; no timing assertions, only waiting for the documented outcome.

mod common;

use std::time::Duration;

use common::process::GatewayProcess;
use common::redis::{RedisCluster, RedisServer};
use common::{http_get, Closed, TestServer, PATIENCE};
use serde_json::json;

/// Polls `check` until it holds (bounded by the harness' patience).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let wait = async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("never happened: {what}"));
}

/// Flags selecting the Redis a gateway process uses: one server, or a cluster.
fn redis_args(redis: &RedisServer) -> Vec<String> {
    vec!["--redis-url".into(), redis.url()]
}

fn cluster_args(cluster: &RedisCluster) -> Vec<String> {
    vec![
        "--redis-url".into(),
        cluster.urls().join(","),
        "--redis-cluster".into(),
    ]
}

async fn gateway(backend: &[String], id: &str) -> GatewayProcess {
    let mut args: Vec<String> = [
        "--jwt-secret",
        common::SECRET,
        "--instance-id",
        id,
        "--instance-heartbeat-ms",
        "100",
        "--resume-grace-ms",
        "300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend_from_slice(backend);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let g = GatewayProcess::start(&args).await;
    g.wait_ready().await;
    g
}

/// An in-process instance `id` on `redis`, with a short heartbeat and extra flags.
async fn in_process(redis: &RedisServer, id: &str, extra: &[&str]) -> TestServer {
    let url = redis.url();
    let mut args = vec![
        "--redis-url",
        &url,
        "--instance-id",
        id,
        "--instance-heartbeat-ms",
        "100",
    ];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

#[tokio::test]
async fn a_killed_instance_is_cleaned_up_by_exactly_one_survivor() {
    let redis = RedisServer::start().await;
    killed_instance(&redis_args(&redis)).await;
}

#[tokio::test]
async fn a_killed_instance_is_cleaned_up_by_exactly_one_survivor_on_redis_cluster() {
    let cluster = RedisCluster::start().await;
    killed_instance(&cluster_args(&cluster)).await;
}

async fn killed_instance(backend: &[String]) {
    let mut doomed = gateway(backend, "doomed").await;
    let survivors = [gateway(backend, "s1").await, gateway(backend, "s2").await];

    // Three sessions with one side on the doomed instance, plus a user waiting there alone.
    let mut peers = Vec::new();
    let mut on_doomed = Vec::new();
    for i in 0..3 {
        let mut a = doomed.connect(&format!("d{i}")).await;
        let mut b = survivors[i % 2].connect(&format!("p{i}")).await;
        common::match_up(&mut a, &mut b).await;
        on_doomed.push(a);
        peers.push(b);
    }
    let mut lonely = doomed.connect("lonely").await;
    lonely
        .send(json!({"type": "enqueue", "prefs": {"topic": "nobody-else"}}))
        .await;
    lonely.expect("queued").await;

    doomed.kill9();

    // Each peer is told at once that its partner is reconnecting, then, after the grace
    // period, that the session is over; it goes back to the queue.
    for b in &mut peers {
        let ps = b.expect("peer_status").await;
        assert_eq!(ps["state"], "reconnecting");
        let ended = b.expect("session_ended").await;
        assert_eq!(ended["reason"], "peer_disconnected");
        assert_eq!(ended["requeued"], true);
        b.expect("queued").await;
    }
    // The three peers now wait together (they are compatible), so the queue holds at most
    // the peers that did not match each other; the lonely user is gone from it.
    let s0 = &survivors[0];
    eventually("sessions and queue settle", || async {
        let sessions = s0.metric("matchgate_sessions_active").await;
        let queued = s0.metric("matchgate_queue_length").await;
        sessions * 2.0 + queued == 3.0
    })
    .await;
    // Exactly one survivor cleaned up each of the four users of the dead instance: each was
    // marked disconnected, lost its place or session, and was finally forgotten (3 steps).
    let cleaned = || async {
        let mut users = 0.0;
        for s in &survivors {
            users += s.metric("matchgate_cleanup_users_total").await;
        }
        users
    };
    eventually("clean-up counted", || async { cleaned().await >= 12.0 }).await;
    // Give a duplicate clean-up every chance to show up (several heartbeat periods).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cleaned().await,
        12.0,
        "each clean-up step happens exactly once"
    );

    // A user of the dead instance who comes back later finds a clean slate.
    let back = survivors[0].connect("d0").await;
    assert_eq!(back.welcome["state"], "idle");
    let lonely_back = survivors[1].connect("lonely").await;
    assert_eq!(lonely_back.welcome["state"], "idle");
}

#[tokio::test]
async fn redis_outage_gives_clear_errors_and_recovers_without_a_restart() {
    let mut redis = RedisServer::start().await;
    let server = in_process(&redis, "solo", &[]).await;
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    common::match_up(&mut a, &mut b).await;

    redis.stop();

    // Actions that need Redis fail clearly; the connection stays; heartbeats still work.
    let e = a.request(json!({"type": "skip"}), "while-down").await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "unavailable");
    assert!(e["retry_after_ms"].as_u64().unwrap() > 0);
    let ack = a.request(json!({"type": "heartbeat"}), "hb").await;
    assert_eq!(ack["type"], "heartbeat_ack");
    eventually("readyz turns 503", || async {
        http_get(server.addr, "/readyz").await.0 == 503
    })
    .await;
    // A client that connects meanwhile is told to come back later, not left hanging.
    let request = common::ws_request(&server.ws_url(), "newcomer", "");
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut newcomer = common::Client::new(ws, "newcomer");
    let e = newcomer.expect("error").await;
    assert_eq!(e["code"], "unavailable");
    match newcomer.closed().await {
        Closed::Code(code) => assert_eq!(code, 1013),
        other => panic!("expected close 1013, got {other:?}"),
    }

    // Redis comes back empty: the gateway notices and tells every client its state is gone.
    redis.restart().await;
    for c in [&mut a, &mut b] {
        let r = c.expect("reconnect").await;
        assert_eq!(r["reason"], "state_lost");
        match c.closed().await {
            Closed::Code(code) => assert_eq!(code, 4006),
            other => panic!("expected close 4006, got {other:?}"),
        }
    }
    eventually("readyz back to 200", || async {
        http_get(server.addr, "/readyz").await.0 == 200
    })
    .await;
    // Everything works again without restarting the gateway: once ready, the gateway lets
    // clients in (readiness covers the ban check, whose connection reconnects on its own).
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    assert_eq!(a.welcome["state"], "idle");
    common::match_up(&mut a, &mut b).await;
    assert!(server.metric("matchgate_redis_errors_total").await >= 1.0);
}

#[tokio::test]
async fn a_cut_subscription_is_restored_and_nothing_is_lost() {
    let redis = RedisServer::start().await;
    let s0 = in_process(&redis, "a", &[]).await;
    let s1 = in_process(&redis, "b", &[]).await;
    let mut a = s0.connect("alice").await;
    let mut b = s1.connect("bob").await;
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;

    // Cut every pub/sub connection, then act at once: frames may be published while the
    // subscribers reconnect.
    assert!(
        redis.kill_subscribers().await >= 2,
        "both instances had a subscriber"
    );
    b.send(json!({"type": "enqueue"})).await;

    // Each side ends up with the match: delivered live, caught up after the subscription came
    // back, or (if the log had to be consulted) after a resume.
    let mut sessions = Vec::new();
    for c in [&mut a, &mut b] {
        let session = loop {
            match c.next().await {
                Ok(f) if f["type"] == "matched" => break f["session_id"].clone(),
                Ok(_) => continue,
                Err(Closed::Code(4005)) => panic!("resync close: covered by the resume path"),
                Err(other) => panic!("connection ended: {other:?}"),
            }
        };
        sessions.push(session);
    }
    assert_eq!(sessions[0], sessions[1]);
    // And the seqs have no holes.
    for c in [&a, &b] {
        let seqs: Vec<u64> = c.seen.iter().filter_map(|f| f["seq"].as_u64()).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{}", c.user);
    }
}

#[tokio::test]
async fn redis_restarting_under_load_costs_no_crash_and_no_stuck_client() {
    let mut redis = RedisServer::start().await;
    let mut servers = Vec::new();
    for id in ["x", "y"] {
        let unlimited = [
            "--rate-limit-burst",
            "100000",
            "--rate-limit-per-minute",
            "6000000",
            "--error-budget",
            "100000",
        ];
        servers.push(in_process(&redis, id, &unlimited).await);
    }
    const USERS: usize = 60;
    let mut tasks = Vec::new();
    for i in 0..USERS {
        let mut c = servers[i % 2].connect(&format!("load{i}")).await;
        tasks.push(tokio::spawn(async move {
            // Cycle enqueue / end as fast as answers come, through the outage. Every error
            // must be `unavailable` (or `invalid_state` when a match raced the script), and
            // the connection must stay open until the gateway says the state is lost.
            let mut unavailable = 0;
            let mut n = 0u64;
            loop {
                let action = if n.is_multiple_of(2) {
                    "enqueue"
                } else {
                    "end"
                };
                n += 1;
                let reference = n.to_string();
                c.send(json!({"type": action, "ref": reference})).await;
                let reply = loop {
                    match c.next().await {
                        Ok(f) if f["ref"] == reference.as_str() || f["type"] == "reconnect" => {
                            break f
                        }
                        Ok(_) => continue,
                        Err(closed) => panic!("{}: closed before state_lost: {closed:?}", c.user),
                    }
                };
                match reply["type"].as_str().unwrap() {
                    "reconnect" => {
                        assert_eq!(reply["reason"], "state_lost");
                        match c.closed().await {
                            Closed::Code(code) => assert_eq!(code, 4006),
                            other => panic!("expected 4006, got {other:?}"),
                        }
                        return unavailable;
                    }
                    "error" => {
                        let code = reply["code"].as_str().unwrap();
                        assert!(
                            code == "unavailable" || code == "invalid_state",
                            "unexpected error {reply}"
                        );
                        if code == "unavailable" {
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    // Let the load run, take Redis away, bring it back empty.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().await;
    let mut errors = 0;
    for t in tasks {
        errors += tokio::time::timeout(PATIENCE, t)
            .await
            .expect("every client hears that its state is lost")
            .expect("client task");
    }
    assert!(errors > 0, "the outage was noticed by some requests");
    // Both instances are alive and serve a fresh round of matches.
    for s in &servers {
        assert_eq!(http_get(s.addr, "/healthz").await.0, 200);
        eventually("ready again", || async {
            http_get(s.addr, "/readyz").await.0 == 200
        })
        .await;
    }
    let mut a = servers[0].connect("load0").await;
    let mut b = servers[1].connect("load1").await;
    common::match_up(&mut a, &mut b).await;
}

fn signal(process: &GatewayProcess, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &process.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test]
async fn an_instance_restarted_under_the_same_id_does_not_inherit_ghosts() {
    let redis = RedisServer::start().await;
    let backend = redis_args(&redis);
    let witness = gateway(&backend, "witness").await;
    let mut a = gateway(&backend, "a").await;
    let mut ghost = a.connect("ghost").await;
    ghost.send(json!({"type": "enqueue"})).await;
    ghost.expect("queued").await;
    a.kill9();
    let _a_again = gateway(&backend, "a").await;
    // The previous run of "a" is found dead and its user leaves the queue, although an
    // instance called "a" is alive again.
    eventually("the ghost leaves the queue", || async {
        witness.metric("matchgate_queue_length").await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_pause_of_redis_itself_kills_nobody() {
    let redis = RedisServer::start().await;
    let backend = redis_args(&redis);
    let g = [gateway(&backend, "g0").await, gateway(&backend, "g1").await];
    let mut a = g[0].connect("a").await;
    let mut b = g[1].connect("b").await;
    common::match_up(&mut a, &mut b).await;
    // Redis stalls for ten heartbeat periods: nobody can check in, every score goes stale.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Several periods later, nobody was declared dead: no clean-up, the session goes on.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for gw in &g {
        assert_eq!(gw.metric("matchgate_cleanup_users_total").await, 0.0);
    }
    let s = a.request(json!({"type": "status"}), "st").await;
    assert_eq!(s["state"], "in_session");
    let e = a.request(json!({"type": "end"}), "e").await;
    assert_eq!(e["reason"], "end");
    let eb = b.expect("session_ended").await;
    assert_eq!(
        eb["reason"], "peer_ended",
        "no peer_status came first: {eb}"
    );
}

#[tokio::test]
async fn an_instance_taken_for_dead_sends_its_clients_back_and_serves_them_again() {
    let redis = RedisServer::start().await;
    let backend = redis_args(&redis);
    let other = gateway(&backend, "other").await;
    let sleepy = gateway(&backend, "sleepy").await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = sleepy.connect(&format!("s{i}")).await;
        c.send(json!({"type": "enqueue", "prefs": {"topic": format!("t{i}")}}))
            .await;
        c.expect("queued").await;
        clients.push(c);
    }
    // Frozen for many heartbeat periods: the other instance takes it for dead and cleans up.
    signal(&sleepy, "-STOP");
    eventually("the other instance cleaned up", || async {
        other.metric("matchgate_cleanup_users_total").await >= 3.0
    })
    .await;
    signal(&sleepy, "-CONT");
    for c in &mut clients {
        let r = c.expect("reconnect").await;
        assert_eq!(r["reason"], "resync");
        match c.closed().await {
            Closed::Code(code) => assert_eq!(code, 4005),
            other => panic!("expected 4005, got {other:?}"),
        }
    }
    // Back on the same instance, the clients are served and stay served.
    let mut back = Vec::new();
    for i in 0..3 {
        let mut c = sleepy.connect(&format!("s{i}")).await;
        // Within the grace period the old place is still held; either way, start over.
        if c.welcome["state"] == "queued" {
            c.send(json!({"type": "end"})).await;
            c.expect("dequeued").await;
        }
        c.send(json!({"type": "enqueue", "prefs": {"topic": "together"}}))
            .await;
        c.expect("queued").await;
        back.push(c);
    }
    // Several heartbeat periods later they are still attached: the newcomer is matched.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut newcomer = other.connect("newcomer").await;
    newcomer
        .send(json!({"type": "enqueue", "prefs": {"topic": "together"}}))
        .await;
    newcomer.expect("queued").await;
    newcomer.expect("matched").await;
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A handshake during an outage: the client is let in unchecked (bans cannot be read), told
/// `unavailable` with fixed text, and closed with 1013.
async fn turned_away(url: &str, user: &str) {
    let request = common::ws_request(url, user, "");
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut c = common::Client::new(ws, user);
    let e = c.expect("error").await;
    assert_eq!(e["code"], "unavailable", "{e}");
    assert_eq!(e["message"], UNAVAILABLE, "{e}");
    match c.closed().await {
        Closed::Code(code) => assert_eq!(code, 1013),
        other => panic!("expected close 1013, got {other:?}"),
    }
}

/// What clients are told when a backend is down, whatever the Redis client said.
const UNAVAILABLE: &str = "a backend this action needs is unavailable: try again later";

#[tokio::test]
async fn an_outage_creates_one_detach_per_attached_user_however_many_reconnect() {
    const ATTACHED: usize = 20;
    const HANDSHAKES: usize = 2_000;
    const REPEATERS: usize = 200;
    let mut redis = RedisServer::start().await;
    // All the handshakes come from one address, REPEATERS at a time: let them all be pending.
    let mut args = redis_args(&redis);
    args.extend([
        "--max-pending-per-address".to_string(),
        REPEATERS.to_string(),
    ]);
    let g = gateway(&args, "solo").await;
    let mut clients = Vec::new();
    for i in 0..ATTACHED {
        clients.push(g.connect(&format!("u{i}")).await);
    }
    let ok = r#"matchgate_detach_calls_total{result="ok"}"#;
    let before = g.metric(ok).await;

    redis.stop();
    // The attached users drop: their detaches wait for Redis, one per user.
    for c in clients {
        c.close().await;
    }
    eventually("every attached user's detach waits", || async {
        g.metric("matchgate_detach_pending").await == ATTACHED as f64
    })
    .await;
    let rss_before = rss_kib(g.pid());
    // Clients told to come back later do so, again and again: the attached users and others.
    let url = g.ws_url();
    for round in 0..HANDSHAKES / REPEATERS {
        let handshakes = (0..REPEATERS).map(|i| {
            let url = url.clone();
            async move { turned_away(&url, &format!("u{i}")).await }
        });
        futures_util::future::join_all(handshakes).await;
        assert_eq!(
            g.metric("matchgate_detach_pending").await,
            ATTACHED as f64,
            "connections that never attached add no detach work (round {round})"
        );
    }
    let grown_kib = rss_kib(g.pid()).saturating_sub(rss_before);
    assert!(
        grown_kib < 16 * 1024,
        "{HANDSHAKES} refused handshakes left {grown_kib} KiB behind"
    );

    // Redis is back: the queue drains, one call per attached user.
    redis.restart().await;
    eventually("the detach queue drains", || async {
        g.metric("matchgate_detach_pending").await == 0.0
    })
    .await;
    assert_eq!(g.metric(ok).await - before, ATTACHED as f64);
    // The gateway serves again.
    eventually("readyz back to 200", || async {
        http_get(g.addr, "/readyz").await.0 == 200
    })
    .await;
    // The restarted Redis is empty: the heartbeat that sees its new epoch tells every client
    // to start over (4006). Readiness may come back first; new clients connect after that.
    g.wait_for_log("Redis lost its data").await;
    let mut a = g.connect("a").await;
    let mut b = g.connect("b").await;
    common::match_up(&mut a, &mut b).await;
}

#[tokio::test]
async fn clients_get_no_backend_details_and_the_log_names_the_connection() {
    let mut redis = RedisServer::start().await;
    let g = gateway(&redis_args(&redis), "solo").await;
    let mut a = g.connect("a").await;
    redis.stop();
    let e = a.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(e["code"], "unavailable", "{e}");
    assert_eq!(e["message"], UNAVAILABLE, "{e}");
    // The details are in the log, with the connection's id.
    let conn = a.welcome["connection_id"].as_str().unwrap().to_string();
    g.wait_for_log("request failed").await;
    let logs = g.logs();
    let line = logs.lines().find(|l| l.contains("request failed")).unwrap();
    assert!(line.contains(&format!("conn={conn}")), "{line}");
    assert!(line.contains("matching backend unavailable"), "{line}");
    // The same at the handshake, where the ban check needs Redis.
    turned_away(&g.ws_url(), "b").await;
}
