//! The cost of one `enqueue` with 0 and with 5,000 unsuitable waiters ahead of it in the same
//! pool, in both engines: the in-memory matchmaker called directly, and the Redis matchmaker
//! against a throw-away `redis-server` this bench starts on a free loopback port.
//!
//! The unsuitable waiters are users who enqueued and then dropped their connection: their queue
//! place is held for a resume, but nobody can be matched with them. Each measured `enqueue`
//! finds nobody to match (the pool holds only such waiters), so it measures the matching
//! attempt itself; the `end` that takes the user out again is not measured.
//!
//! Run: `cargo bench --bench enqueue` (needs `redis-server` on the `PATH`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use matchgate::bus::{Bus, Frame};
use matchgate::matching::memory::{MemoryMatchmaker, Policy};
use matchgate::matching::redis::{RedisMatchmaker, RedisSettings};
use matchgate::matching::{ConnId, Engine, MediaMode, Rules, UserId};
use matchgate::metrics::Metrics;
use matchgate::p2p::IceServers;
use matchgate::protocol::Prefs;
use matchgate::redis_keys::Layout;
use matchgate::Config;

/// Unsuitable waiters ahead of the measured enqueue.
const WAITERS: [usize; 2] = [0, 5_000];

/// Frames go nowhere: delivery is not what is measured.
struct Discard;

impl Bus for Discard {
    fn deliver(&self, _user: &UserId, _frame: Frame) {}
}

/// The default rules, except that one user may enqueue as often as the bench needs.
fn rules() -> Rules {
    let config = Config::try_parse_from(["matchgate", "--enqueue-per-minute", "4000000000"])
        .expect("bench flags parse");
    Rules::from_config(&config)
}

/// The default media mode (p2p) with no ICE servers: nothing to mint per match.
fn no_ice_servers() -> MediaMode {
    MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None)))
}

fn memory() -> Arc<dyn Engine> {
    Arc::new(MemoryMatchmaker::new(
        Arc::new(Discard),
        Policy {
            requeue_peer_on_skip: true,
            history_len: 128,
            history_ttl: Duration::from_secs(3600),
            media: no_ice_servers(),
            rules: rules(),
        },
    ))
}

fn redis(url: &str, namespace: &str) -> Arc<dyn Engine> {
    let settings = RedisSettings {
        urls: vec![url.to_string()],
        cluster: false,
        layout: Layout::new(namespace),
        instance: "bench".into(),
        requeue_peer_on_skip: true,
        history_len: 128,
        history_ttl: Duration::from_secs(3600),
        // Held places must outlast the bench.
        resume_grace: Duration::from_secs(3600),
        pool_size: 4,
        media: no_ice_servers(),
        rules: rules(),
        call_timeout: Duration::from_secs(10),
    };
    Arc::new(RedisMatchmaker::new(settings, Arc::new(Metrics::new())).expect("Redis matchmaker"))
}

/// `n` users who enqueued in the default pool and then dropped their connection.
async fn fill(mm: &dyn Engine, n: usize) {
    for i in 0..n {
        let user: UserId = format!("gone-{i}").into();
        let conn = ConnId(i as u64 + 1);
        mm.attach(&user, conn, None).await.expect("attach");
        mm.enqueue(&user, Prefs::default(), None)
            .await
            .expect("enqueue");
        mm.detach(&user, conn).await.expect("detach");
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = RedisProcess::start();
    let mut group = c.benchmark_group("enqueue");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(5));
    for waiters in WAITERS {
        let engines = [
            ("memory", memory()),
            ("redis", redis(&server.url(), &format!("bench{waiters}"))),
        ];
        for (name, mm) in engines {
            let probe: UserId = "probe".into();
            rt.block_on(async {
                fill(mm.as_ref(), waiters).await;
                mm.attach(&probe, ConnId(u64::MAX), None)
                    .await
                    .expect("attach");
            });
            group.bench_function(BenchmarkId::new(name, waiters), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut measured = Duration::ZERO;
                        for _ in 0..iters {
                            let started = Instant::now();
                            mm.enqueue(&probe, Prefs::default(), None)
                                .await
                                .expect("enqueue");
                            measured += started.elapsed();
                            mm.end(&probe, None).await.expect("end");
                        }
                        measured
                    })
                })
            });
        }
    }
    group.finish();
}

/// A `redis-server` child on a free loopback port, without persistence, killed on drop.
struct RedisProcess {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl RedisProcess {
    fn start() -> RedisProcess {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("matchgate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server (is it on the PATH?)");
        let server = RedisProcess { port, dir, child };
        let client = redis::Client::open(server.url()).expect("Redis URL");
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .get_connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
