//! The load generator (`src/bin/loadgen`), run as its users run it: the real binary with its
//! command line, against real gateways (in-process [`TestServer`]s, a gateway process for
//! `idle`, gateway processes and a `redis-server` for `cluster`), read back through its JSON
//! report. Small numbers and no assertion on any figure's size: these tests check that the
//! figures are there and that the accounting is right (a user who is never matched is an
//! error, never a fast match; sessions are seen by both members), not how fast anything is.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::process::GatewayProcess;
use common::redis::RedisServer;
use common::{TestServer, SECRET};
use serde_json::Value;

/// Gateway flags that let one client send as fast as a load generator does.
const UNLIMITED: [&str; 4] = [
    "--rate-limit-per-minute",
    "1000000",
    "--rate-limit-burst",
    "1000000",
];

/// A bound on every run, so that a broken build fails instead of hanging.
const DEADLINE: &str = "60";

/// What one run of the binary left behind.
struct Run {
    output: Output,
    report: Option<Value>,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// The JSON report; panics with the output if there is none.
    fn report(&self) -> &Value {
        self.report.as_ref().unwrap_or_else(|| {
            panic!(
                "no JSON report; status {}\nstdout:\n{}\nstderr:\n{}",
                self.output.status,
                self.stdout(),
                self.stderr()
            )
        })
    }

    fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
}

fn report_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "loadgen-test-{}-{:016x}.json",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Runs `loadgen <args> --json <file>` without blocking the test's runtime (which serves the
/// in-process gateway meanwhile).
async fn loadgen(args: &[&str]) -> Run {
    let path = report_path();
    let mut command = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    command
        .args(args)
        .arg("--json")
        .arg(&path)
        .env_remove("MATCHGATE_JWT_SECRET")
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("running the loadgen binary");
    let report = std::fs::read_to_string(&path)
        .ok()
        .map(|text| serde_json::from_str(&text).expect("the JSON report parses"));
    let _ = std::fs::remove_file(&path);
    Run { output, report }
}

/// `loadgen <scenario> --url <url> --secret <the test secret> --deadline-s 60 <args>`, with
/// `args` separated by spaces.
async fn loadgen_at(scenario: &str, url: &str, args: &str) -> Run {
    let mut all = vec![scenario, "--url", url, "--secret", SECRET];
    all.extend(["--deadline-s", DEADLINE]);
    all.extend(args.split_whitespace());
    loadgen(&all).await
}

fn number(report: &Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {report:#}"))
}

#[tokio::test]
async fn churn_matches_and_every_session_is_seen_by_both_members_once() {
    let server = TestServer::start(&UNLIMITED).await;
    let url = server.ws_url();
    let args = "--users 10 --hold-ms 0..20 --warmup-s 0.2 --duration-s 3 --max-matches 300 \
                --match-timeout-ms 30000";
    let run = loadgen_at("churn", &url, args).await;
    let report = run.report();
    assert_eq!(run.code(), Some(0), "{}{}", run.stdout(), run.stderr());
    assert!(number(report, "/matches") > 0.0, "{report:#}");
    assert_eq!(report["sessions"]["duplicate"], 0, "{report:#}");
    assert_eq!(report["sessions"]["half_seen"], 0, "{report:#}");
    // Two latency samples per measured match: each member's own wait.
    assert!(number(report, "/latency_ms/samples") >= 2.0 * number(report, "/matches"));
    assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
    assert_eq!(report["invariants_ok"], true);
    // The table on stdout carries the same figures.
    let table = run.stdout();
    for label in [
        "matches",
        "latency ms",
        "sessions",
        "cpu",
        "invariants    ok",
    ] {
        assert!(table.contains(label), "no {label:?} in:\n{table}");
    }
}

#[tokio::test]
async fn a_user_who_is_never_matched_is_a_no_match_error_not_a_latency_sample() {
    let server = TestServer::start(&UNLIMITED).await;
    let url = server.ws_url();
    // Three users in three preference pools: nobody has a partner.
    let run = loadgen_at(
        "churn",
        &url,
        "--users 3 --pools 3 --match-timeout-ms 200 --warmup-s 0 --duration-s 2",
    )
    .await;
    let report = run.report();
    assert!(number(report, "/errors/no_match") >= 1.0, "{report:#}");
    assert_eq!(report["latency_ms"]["samples"], 0, "{report:#}");
    assert_eq!(report["matches"], 0, "{report:#}");
    assert_eq!(report["sessions"]["seen"], 0, "{report:#}");
    // Errors are not broken guarantees: the run itself succeeded.
    assert_eq!(run.code(), Some(0), "{}{}", run.stdout(), run.stderr());
}

#[tokio::test]
async fn rate_writes_every_figure_and_its_configuration_as_json() {
    let server = TestServer::start(&UNLIMITED).await;
    let url = server.ws_url();
    // The gateway runs in this process, so its CPU is this process's.
    let args = format!(
        "--users 20 --rate 20 --warmup-s 0.2 --duration-s 1.5 --gateway-pid {}",
        std::process::id()
    );
    let run = loadgen_at("rate", &url, &args).await;
    let report = run.report();
    assert_eq!(run.code(), Some(0), "{}{}", run.stdout(), run.stderr());
    for pointer in [
        "/window_s",
        "/matches",
        "/matches_per_s",
        "/rate/offered_matches_per_s",
        "/rate/issued_matches_per_s",
        "/rate/arrivals_missed",
        "/latency_ms/samples",
        "/latency_ms/p50",
        "/latency_ms/p90",
        "/latency_ms/p99",
        "/latency_ms/p99_9",
        "/latency_ms/max",
        "/errors_total",
        "/sessions/seen",
        "/sessions/duplicate",
        "/sessions/half_seen",
        "/connections/opened",
        "/connections/connect_per_s",
        "/connections/handshake_ms/p99",
        "/cpu/clk_tck",
        "/cpu/gateway_s",
        "/cpu/loadgen_s",
        "/host/cpus",
        "/config/rate",
        "/config/users",
        "/config/duration_s",
        "/config/warmup_s",
        "/config/deadline_s",
    ] {
        number(report, pointer);
    }
    assert!(report["errors"].is_object());
    assert_eq!(report["scenario"], "rate");
    assert_eq!(report["config"]["url"][0], url.as_str());
    assert!(report["config"]["user_prefix"].is_string());
    // Its CPU per match is there whenever there are matches.
    if number(report, "/matches") > 0.0 {
        number(report, "/cpu/gateway_us_per_match");
    }
    let text = serde_json::to_string(report).unwrap();
    assert!(!text.contains(SECRET), "the secret leaked into the report");
}

#[tokio::test]
async fn idle_reports_the_gateway_rss_per_connection() {
    let gateway = GatewayProcess::start(&["--jwt-secret", SECRET]).await;
    gateway.wait_ready().await;
    let url = gateway.ws_url();
    let args = format!(
        "--conns 20 --duration-s 0.5 --source-ips 127.0.0.1,127.0.0.2 --gateway-pid {}",
        gateway.pid()
    );
    let run = loadgen_at("idle", &url, &args).await;
    let report = run.report();
    assert_eq!(run.code(), Some(0), "{}{}", run.stdout(), run.stderr());
    assert_eq!(report["connections"]["opened"], 20, "{report:#}");
    assert_eq!(report["idle"]["connections_measured"], 20, "{report:#}");
    assert_eq!(report["idle"]["connections_at_end"], 20, "{report:#}");
    number(report, "/idle/gateway_before_bytes");
    number(report, "/idle/gateway_after_bytes");
    number(report, "/idle/gateway_bytes_per_conn");
    number(report, "/idle/loadgen_bytes_per_conn");
    number(report, "/connections/connect_per_s");
    assert!(run.stdout().contains("per connection"), "{}", run.stdout());
}

#[tokio::test]
async fn refused_handshakes_are_counted_by_http_status() {
    let server = TestServer::start(&[]).await;
    let url = server.ws_url();
    let run = loadgen(&[
        "churn",
        "--url",
        &url,
        "--secret",
        "not-the-secret-the-gateway-checks-tokens-with",
        "--users",
        "3",
        "--warmup-s",
        "0",
        "--duration-s",
        "0.2",
        "--deadline-s",
        DEADLINE,
    ])
    .await;
    let report = run.report();
    assert_eq!(report["errors"]["http:401"], 3, "{report:#}");
    assert_eq!(report["connections"]["opened"], 0, "{report:#}");
    assert_eq!(report["connections"]["failed"], 3, "{report:#}");
    assert_eq!(run.code(), Some(1), "a run without any connection failed");
}

#[tokio::test]
async fn ctrl_c_ends_the_run_with_what_was_measured() {
    let server = TestServer::start(&UNLIMITED).await;
    let url = server.ws_url();
    let path = report_path();
    let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["churn", "--url", &url, "--secret", SECRET, "--users", "4"])
        .args([
            "--hold-ms",
            "10..20",
            "--warmup-s",
            "0",
            "--duration-s",
            "600",
        ])
        .arg("--json")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running the loadgen binary");
    // Interrupt once it measures (the report file appears only at the end).
    let pid = child.id().to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(&path).expect("a report after Ctrl-C");
    let _ = std::fs::remove_file(&path);
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["stopped_by"], "interrupted", "{report:#}");
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains("stopped by interrupted"));
}

#[tokio::test]
async fn bad_arguments_are_refused_with_a_message_naming_the_option() {
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "churn",
                "--url",
                "http://127.0.0.1:1/v1/ws",
                "--secret",
                "s",
            ],
            "--url",
        ),
        (&["churn", "--url", "ws://127.0.0.1:1/v1/ws"], "--secret"),
        (
            &[
                "churn",
                "--url",
                "ws://127.0.0.1:1/v1/ws",
                "--secret",
                "s",
                "--end-ratio",
                "1.5",
            ],
            "--end-ratio",
        ),
        (
            &[
                "churn",
                "--url",
                "ws://127.0.0.1:1/v1/ws",
                "--secret",
                "s",
                "--hold-ms",
                "9..3",
            ],
            "--hold-ms",
        ),
        (
            &[
                "idle",
                "--url",
                "ws://127.0.0.1:1/v1/ws",
                "--secret",
                "s",
                "--source-ips",
                "nowhere",
            ],
            "--source-ips",
        ),
        (
            &[
                "rate",
                "--url",
                "ws://127.0.0.1:1/v1/ws",
                "--secret",
                "s",
                "--rate",
                "0",
            ],
            "--rate",
        ),
    ];
    for (args, option) in cases {
        let run = loadgen(args).await;
        assert!(
            matches!(run.code(), Some(1 | 2)),
            "{args:?}: status {}",
            run.output.status
        );
        assert!(run.report.is_none(), "{args:?} wrote a report");
        assert!(
            run.stderr().contains(option),
            "{args:?}: the message does not name {option}:\n{}",
            run.stderr()
        );
    }
}

#[tokio::test]
async fn cluster_loses_nothing_when_an_instance_is_killed_and_restarted() {
    let redis = RedisServer::start().await;
    let run = loadgen(&[
        "cluster",
        "--redis-url",
        &redis.url(),
        "--gateway-bin",
        env!("CARGO_BIN_EXE_matchgate"),
        "--instances",
        "2",
        "--users",
        "12",
        "--hold-ms",
        "20..60",
        "--warmup-s",
        "0",
        "--duration-s",
        "4",
        "--kill-after-s",
        "1.5",
        "--kill-instance",
        "1",
        "--match-timeout-ms",
        "30000",
        "--drain-ms",
        "5000",
        "--deadline-s",
        DEADLINE,
    ])
    .await;
    let report = run.report();
    let cluster = &report["cluster"];
    if let Some(logs) = cluster["log_dir"].as_str() {
        let _ = std::fs::remove_dir_all(logs);
    }
    assert_eq!(cluster["killed"]["instance"], 1, "{report:#}");
    assert!(cluster["killed"]["new_pid"].is_u64(), "{report:#}");
    assert_eq!(cluster["nothing_lost"], true, "{report:#}");
    assert!(number(report, "/matches") > 0.0, "{report:#}");
    // The killed instance's users came back through `resume`, and the only errors are their
    // dropped connections: no request of theirs was refused (e.g. repeated after the replay).
    assert!(number(report, "/reconnects/resumed") >= 1.0, "{report:#}");
    let errors = report["errors"].as_object().unwrap();
    assert!(
        errors
            .keys()
            .all(|kind| kind == "eof" || kind.starts_with("close:")),
        "{report:#}"
    );
    assert_eq!(run.code(), Some(0), "{}{}", run.stdout(), run.stderr());
}
