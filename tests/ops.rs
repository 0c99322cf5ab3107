//! What operators read: the process and runtime metrics have sane values, and every metric the
//! deployment kit's dashboard and alert rules name is one the gateway exports (in memory and
//! in Redis mode), so that the kit cannot drift from the code.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::metric_value;
use common::redis::RedisServer;
use common::TestServer;

#[tokio::test]
async fn process_and_runtime_metrics_have_sane_values() {
    let server = TestServer::start(&[]).await;
    let _alice = server.connect("alice").await;
    let text = server.metrics().await;
    let value =
        |name: &str| metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    // A test process with a runtime, a server and a connection: more than a megabyte, less
    // than the machine.
    let rss = value("process_resident_memory_bytes");
    assert!((1e6..64e9).contains(&rss), "rss {rss}");
    assert!(value("process_virtual_memory_bytes") >= rss);
    // At least the listener, the server's socket of alice's connection and alice's own.
    let fds = value("process_open_fds");
    assert!(fds >= 3.0 && fds <= value("process_max_fds"), "fds {fds}");
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let started = value("process_start_time_seconds");
    assert!(
        started > 1.6e9 && started <= common::now_secs() as f64 + 1.0,
        "start time {started}"
    );
    // #[tokio::test] runs a current-thread runtime: one worker.
    assert_eq!(value("matchgate_tokio_workers"), 1.0);
    // The accept loop and alice's connection task at least.
    assert!(value("matchgate_tokio_alive_tasks") >= 2.0);
    assert!(value("matchgate_tokio_global_queue_depth") >= 0.0);

    // Each connection holds a descriptor: ten more connections, at least ten more.
    let mut more = Vec::new();
    for i in 0..10 {
        more.push(server.connect(&format!("user{i}")).await);
    }
    let after = metric_value(&server.metrics().await, "process_open_fds").unwrap();
    assert!(after >= fds + 10.0, "{fds} then {after}");
    server.shutdown().await;
}

/// The metric names (`matchgate_*`, `process_*`) a kit file mentions.
fn names_in(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    for prefix in ["matchgate_", "process_"] {
        for (at, _) in text.match_indices(prefix) {
            // A name starts at a boundary (not `foo_process_bar`).
            if at > 0 && is_name(bytes[at - 1]) {
                continue;
            }
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| at + n);
            names.insert(text[at..end].to_string());
        }
    }
    names
}

/// Every series name a scrape holds: the sample names, plus those the `# TYPE` lines declare.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut words = declared.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                // The base name too: prose names a histogram by it.
                "histogram" => &["", "_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for suffix in suffixes {
                names.insert(format!("{name}{suffix}"));
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn missing(kit: &BTreeSet<String>, text: &str) -> Vec<String> {
    let exported = exported(text);
    kit.iter()
        .filter(|name| !exported.contains(*name))
        .cloned()
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_exported_in_both_modes() {
    let mut kit = names_in("deploy/grafana/matchgate.json");
    let alerts = names_in("deploy/prometheus/alerts.yaml");
    // The kit covers what it says it covers (a name-extraction bug would pass vacuously).
    for name in [
        "matchgate_connections",
        "matchgate_matches_total",
        "matchgate_match_latency_seconds_bucket",
        "matchgate_redis_call_seconds_bucket",
        "matchgate_livekit_request_errors_total",
        "process_resident_memory_bytes",
        "matchgate_tokio_alive_tasks",
    ] {
        assert!(kit.contains(name), "the dashboard lacks {name}: {kit:?}");
    }
    assert!(
        alerts.contains("matchgate_redis_errors_total"),
        "{alerts:?}"
    );
    kit.extend(alerts);

    let memory = TestServer::start(&[]).await;
    let text = memory.metrics().await;
    assert_eq!(missing(&kit, &text), Vec::<String>::new(), "in memory");
    // A misspelt name is caught.
    let typo = BTreeSet::from(["matchgate_conections".to_string()]);
    assert_eq!(missing(&typo, &text), vec!["matchgate_conections"]);
    memory.shutdown().await;

    let redis = RedisServer::start().await;
    let scaled = TestServer::start(&["--redis-url", &redis.url()]).await;
    let text = scaled.metrics().await;
    assert_eq!(missing(&kit, &text), Vec::<String>::new(), "in Redis mode");
    scaled.shutdown().await;
}
