//! Self-tests of the process harness: real `redis-server` processes (standalone and cluster) and
//! the real `matchgate` binary, as used by the Redis scale-out tests.

mod common;

use common::process::{parse_listening, strip_ansi, GatewayProcess};
use common::redis::{RedisCluster, RedisServer};
use redis::AsyncCommands;

#[tokio::test]
async fn redis_server_serves_and_restarts_empty() {
    let mut server = RedisServer::start().await;
    assert_ne!(server.port, 6379, "never the system Redis");
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}/", server.port));
    assert!(server.ping().await);

    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = conn.set("harness:key", "value").await.unwrap();
    let got: String = conn.get("harness:key").await.unwrap();
    assert_eq!(got, "value");

    server.stop();
    assert!(!server.ping().await, "a stopped server does not answer");

    let port = server.port;
    server.restart().await;
    assert_eq!(server.port, port, "restart keeps the port");
    assert!(server.ping().await);
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let got: Option<String> = conn.get("harness:key").await.unwrap();
    assert_eq!(got, None, "a restarted server is empty");
}

#[tokio::test]
async fn redis_server_cleans_up_on_drop() {
    let server = RedisServer::start().await;
    let port = server.port;
    let dir = server.dir().to_path_buf();
    assert!(dir.exists());
    drop(server);
    assert!(!dir.exists(), "the temp dir is removed");
    let probe = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    assert!(
        probe.get_multiplexed_async_connection().await.is_err(),
        "the server is gone"
    );
}

#[tokio::test]
async fn two_servers_get_different_ports() {
    let a = RedisServer::start().await;
    let b = RedisServer::start().await;
    assert_ne!(a.port, b.port);
    assert!(a.ping().await && b.ping().await);
}

#[tokio::test]
async fn redis_cluster_forms_and_routes_hash_tags() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);

    for url in &urls {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(info.contains("cluster_state:ok"), "{url}: {info}");
    }

    let client = redis::cluster::ClusterClient::new(urls).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    // Several tags, so that keys land on more than one node; keys sharing a tag share a slot
    // and can be used together in one multi-key command.
    for tag in ["alpha", "beta", "gamma", "delta", "epsilon"] {
        let (a, b) = (format!("{{{tag}}}:a"), format!("{{{tag}}}:b"));
        let _: () = conn.set(&a, format!("{tag}-a")).await.unwrap();
        let _: () = conn.set(&b, format!("{tag}-b")).await.unwrap();
        let got: Vec<String> = conn.mget(&[&a, &b]).await.unwrap();
        assert_eq!(got, vec![format!("{tag}-a"), format!("{tag}-b")]);
    }
}

#[test]
fn the_listening_line_is_parsed_through_colours() {
    let line = "\u{1b}[2m2025-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                \u{1b}[2mmatchgate\u{1b}[0m\u{1b}[2m:\u{1b}[0m matchgate listening on \
                127.0.0.1:4321 (ws://127.0.0.1:4321/v1/ws), mode: embedded\n";
    assert_eq!(
        parse_listening(&strip_ansi(line)),
        Some("127.0.0.1:4321".parse().unwrap())
    );
    let json = r#"{"fields":{"message":"matchgate listening on 127.0.0.1:99 (ws://…)"}}"#;
    assert_eq!(parse_listening(json), Some("127.0.0.1:99".parse().unwrap()));
    assert_eq!(parse_listening("INFO something else"), None);
}

#[tokio::test]
async fn gateway_process_serves_and_dies_on_kill9() {
    let mut gateway = GatewayProcess::start(&["--jwt-secret", common::SECRET]).await;
    assert_eq!(gateway.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(gateway.addr.port(), 0);
    assert!(gateway.logs().contains("matchgate listening on"));

    let (status, _) = common::http_get(gateway.addr, "/healthz").await;
    assert_eq!(status, 200);
    gateway.wait_ready().await;

    let client = gateway.connect("harness-user").await;
    assert_eq!(client.welcome["type"], "welcome");

    let exit = gateway.kill9();
    assert!(!exit.success(), "SIGKILL is not a clean exit: {exit}");
    assert!(!gateway.is_running());
    assert!(
        tokio::net::TcpStream::connect(gateway.addr).await.is_err(),
        "nothing listens after kill9"
    );
}

#[tokio::test]
async fn gateway_process_drains_on_sigterm() {
    let mut gateway = GatewayProcess::start(&["--jwt-secret", common::SECRET]).await;
    gateway.terminate();
    let exit = gateway.wait_exit().await;
    assert!(
        exit.success(),
        "SIGTERM drains and exits 0: {exit}\n{}",
        gateway.logs()
    );
}

#[tokio::test]
#[should_panic(expected = "exited before listening")]
async fn gateway_process_reports_a_failed_start() {
    // Too short a secret: the binary refuses to start.
    GatewayProcess::start(&["--jwt-secret", "short"]).await;
}
