//! Real `redis-server` processes for the Redis scale-out tests: a standalone server and a
//! three-master cluster, each on ephemeral loopback ports with a throw-away working directory.
//!
//! The servers run with persistence off (`--save "" --appendonly no`), so a restart always comes
//! back empty. The system Redis on 6379 is never touched: every port is picked by binding
//! `127.0.0.1:0`. Children are killed and temp dirs removed on drop; when a test panics, the
//! server log is printed so the failure shows what Redis saw.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TestServer;

/// One command on the Redis at `url`, on a connection of its own.
pub async fn command(url: &str, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

/// How long a server may take to answer PING, or a cluster to report `cluster_state:ok`.
const STARTUP: Duration = Duration::from_secs(10);
/// How often start-up conditions are re-checked.
const POLL: Duration = Duration::from_millis(25);
/// Attempts at finding a port that is still free when `redis-server` binds it.
const PORT_ATTEMPTS: usize = 5;

/// A free TCP port on 127.0.0.1 (bound and released again, so a race is possible but rare;
/// [`RedisServer::start`] retries on a bind failure).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral loopback port")
        .port()
}

/// A fresh, uniquely named directory under the system temp dir.
fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "matchgate-{prefix}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}

/// A standalone `redis-server` child process on an ephemeral loopback port.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    /// Extra `redis-server` arguments, kept so that [`RedisServer::restart`] reuses them.
    extra: Vec<String>,
    child: Option<Child>,
    /// Whether this value owns `dir` (a cluster owns the dirs of its nodes).
    owns_dir: bool,
}

impl RedisServer {
    /// Cuts every pub/sub connection (the subscribers of all instances) and returns how many.
    pub async fn kill_subscribers(&self) -> i64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Starts an empty server on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        let mut server = Self::start_in(temp_dir("redis"), |_| Vec::new()).await;
        server.owns_dir = true;
        server
    }

    /// Starts a server in `dir` with `extra(port)` as additional arguments, retrying on another
    /// port when the picked one was taken in the meantime.
    async fn start_in(dir: PathBuf, extra: impl Fn(u16) -> Vec<String>) -> RedisServer {
        let mut attempt = 1;
        loop {
            let port = free_port();
            let mut server = RedisServer {
                port,
                dir: dir.clone(),
                extra: extra(port),
                child: None,
                owns_dir: false,
            };
            match server.launch().await {
                Ok(()) => return server,
                Err(e) if attempt < PORT_ATTEMPTS && e.contains("Address already in use") => {
                    attempt += 1;
                }
                Err(e) => panic!("redis-server on port {port} did not start: {e}"),
            }
        }
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's working directory (log file, cluster config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything the server logged so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the server (SIGKILL) and reaps it. A no-op when it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if it runs and starts it again on the same port, empty, waiting until it
    /// answers PING. A cluster node keeps its `nodes-PORT.conf`, so it rejoins its cluster (with
    /// no keys).
    pub async fn restart(&mut self) {
        self.stop();
        // Persistence is off, but make sure no snapshot can bring data back.
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        if let Err(e) = self.launch().await {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// Whether the server answers PING with PONG right now.
    pub async fn ping(&self) -> bool {
        ping_port(self.port).await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("redis-{}.log", self.port))
    }

    /// Spawns `redis-server` on `self.port` and waits for PONG. On failure the child is reaped
    /// and the error carries the log.
    async fn launch(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("opening the log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| format!("spawning redis-server (is it on PATH?): {e}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + STARTUP;
        loop {
            if self.ping().await {
                return Ok(());
            }
            if !self.is_running() {
                self.stop();
                return Err(format!("redis-server exited; log:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("no PONG within {STARTUP:?}; log:\n{}", self.log()));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- redis-server :{} log ---\n{}", self.port, self.log());
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Three masters (no replicas) forming a Redis Cluster covering all 16384 slots.
pub struct RedisCluster {
    /// The nodes, in the order they were created.
    pub nodes: Vec<RedisServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create` and
    /// waits until every node reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let dir = temp_dir("redis-cluster");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("creating a node dir");
            // The cluster bus gets its own free port: the default (port + 10000) can overflow
            // for ports picked from the ephemeral range.
            let node = RedisServer::start_in(node_dir, |port| {
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    format!("nodes-{port}.conf"),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                    "--cluster-port".into(),
                    free_port().to_string(),
                ]
            })
            .await;
            nodes.push(node);
        }
        let cluster = RedisCluster { nodes, dir };
        cluster.create();
        cluster.wait_ok().await;
        cluster
    }

    /// `redis://127.0.0.1:PORT/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The client port of every node.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The logs of all nodes, one after the other.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node :{} ---\n{}", n.port, n.log()))
            .collect()
    }

    /// Runs `redis-cli --cluster create` over all nodes.
    fn create(&self) {
        let log_path = self.dir.join("cluster-create.log");
        let log = File::create(&log_path).expect("creating the cluster-create log");
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .status()
            .expect("spawning redis-cli (is it on PATH?)");
        assert!(
            status.success(),
            "redis-cli --cluster create failed ({status}):\n{}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            self.logs()
        );
    }

    /// Waits until every node reports `cluster_state:ok`, knows all nodes and sees all slots
    /// served.
    async fn wait_ok(&self) {
        let deadline = Instant::now() + STARTUP;
        let expected_nodes = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let mut all_ok = true;
            let mut last = String::new();
            for node in &self.nodes {
                let info = cluster_info(node.port).await.unwrap_or_default();
                let ok = info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains(&expected_nodes);
                if !ok {
                    all_ok = false;
                    last = format!("node :{}:\n{info}", node.port);
                    break;
                }
            }
            if all_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {STARTUP:?}; {last}\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Redis a scale-out scenario runs against: one server, or a 3-master cluster.
pub enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    pub async fn single() -> Backend {
        Backend::Single(RedisServer::start().await)
    }

    pub async fn cluster() -> Backend {
        Backend::Cluster(RedisCluster::start().await)
    }

    /// The gateway flags that point at this Redis.
    pub fn args(&self) -> Vec<String> {
        match self {
            Backend::Single(r) => vec!["--redis-url".into(), r.url()],
            Backend::Cluster(c) => vec![
                "--redis-url".into(),
                c.urls().join(","),
                "--redis-cluster".into(),
            ],
        }
    }

    /// `n` in-process instances against this Redis, with extra flags.
    pub async fn instances(&self, n: usize, extra: &[&str]) -> Vec<TestServer> {
        let mut servers = Vec::new();
        for i in 0..n {
            let mut args: Vec<String> = self.args();
            args.extend([
                "--instance-id".into(),
                format!("inst{i}"),
                "--instance-heartbeat-ms".into(),
                "100".into(),
            ]);
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            servers.push(TestServer::start(&args).await);
        }
        servers
    }
}

/// A one-shot connection to the server on `port`, bounded by a short timeout.
async fn connect(port: u16) -> Option<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

/// Whether the server on `port` answers PING with PONG.
async fn ping_port(port: u16) -> bool {
    let Some(mut conn) = connect(port).await else {
        return false;
    };
    let pong = tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    matches!(pong, Ok(Ok(ref s)) if s == "PONG")
}

/// The `CLUSTER INFO` text of the node on `port`.
async fn cluster_info(port: u16) -> Option<String> {
    let mut conn = connect(port).await?;
    tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<String>(&mut conn),
    )
    .await
    .ok()?
    .ok()
}
