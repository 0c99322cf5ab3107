//! What the benches share: both engines built as a gateway builds them (frames go nowhere:
//! delivery is not what is measured), a throw-away `redis-server` on a free loopback port,
//! and the measurement of one `enqueue` that finds nobody ([`time_enqueue`]). A folder
//! module, so that Cargo does not take it for a bench of its own.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::Bencher;
use matchgate::bus::{Bus, Frame};
use matchgate::matching::memory::{MemoryMatchmaker, Policy};
use matchgate::matching::redis::{RedisMatchmaker, RedisSettings};
use matchgate::matching::{ConnId, Engine, MediaMode, Rules, UserId};
use matchgate::metrics::Metrics;
use matchgate::p2p::IceServers;
use matchgate::protocol::Prefs;
use matchgate::redis_keys::Layout;
use matchgate::Config;

/// Frames go nowhere: delivery is not what is measured.
struct Discard;

impl Bus for Discard {
    fn deliver(&self, _user: &UserId, _frame: Frame) {}
}

/// The default rules, except that one user may enqueue as often as the bench needs.
fn rules() -> Rules {
    let config = Config::try_parse_from(["matchgate", "--enqueue-per-minute", "4000000000"])
        .expect("bench flags parse");
    Rules::from_config(&config.rules)
}

/// The default media mode (p2p) with no ICE servers: nothing to mint per match.
fn no_ice_servers() -> MediaMode {
    MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None)))
}

pub fn memory() -> Arc<dyn Engine> {
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

pub fn redis(url: &str, namespace: &str) -> Arc<dyn Engine> {
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
        batching: Default::default(),
        media: no_ice_servers(),
        rules: rules(),
        call_timeout: Duration::from_secs(10),
    };
    Arc::new(RedisMatchmaker::new(settings, Arc::new(Metrics::new())).expect("Redis matchmaker"))
}

/// For each engine (memory, then Redis on `server` under a namespace of its own), the engine
/// with `waiters` users put in by `fill`, and the attached, idle user whose `enqueue` a bench
/// times with [`time_enqueue`].
#[allow(dead_code)] // `hot_paths` measures enqueues that match instead
pub fn engines_with_waiters(
    rt: &tokio::runtime::Runtime,
    server: &RedisProcess,
    waiters: usize,
    fill: impl AsyncFn(&dyn Engine, usize),
) -> Vec<(&'static str, Arc<dyn Engine>, UserId)> {
    let engines = [
        ("memory", memory()),
        ("redis", redis(&server.url(), &format!("bench{waiters}"))),
    ];
    engines
        .into_iter()
        .map(|(name, mm)| {
            let probe: UserId = "probe".into();
            rt.block_on(async {
                fill(mm.as_ref(), waiters).await;
                mm.attach(&probe, ConnId(u64::MAX), None)
                    .await
                    .expect("attach");
            });
            (name, mm, probe)
        })
        .collect()
}

/// Times one `enqueue` of `probe` (attached, idle) with `prefs` per iteration, where it must
/// find nobody to match; the `end` that takes it out again is not measured.
#[allow(dead_code)] // `hot_paths` measures enqueues that match instead
pub fn time_enqueue(
    b: &mut Bencher<'_>,
    rt: &tokio::runtime::Runtime,
    mm: &dyn Engine,
    probe: &UserId,
    prefs: &Prefs,
) {
    b.iter_custom(|iters| {
        rt.block_on(async {
            let mut measured = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                mm.enqueue(probe, prefs.clone(), Default::default(), None)
                    .await
                    .expect("enqueue");
                measured += started.elapsed();
                mm.end(probe, None).await.expect("end");
            }
            measured
        })
    })
}

/// A `redis-server` child on a free loopback port, without persistence, killed on drop.
pub struct RedisProcess {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl RedisProcess {
    pub fn start() -> RedisProcess {
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

    pub fn url(&self) -> String {
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
