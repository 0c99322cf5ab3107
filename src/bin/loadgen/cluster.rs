//! The `cluster` scenario's own gateways: `--instances` matchgate processes sharing one Redis,
//! each on a free loopback port, with the settings a benchmark needs, and the SIGKILL and
//! restart of one of them mid-run.
//!
//! The instances get a fixed environment and nothing of the caller's `MATCHGATE_*` variables,
//! so the run is what its report says: the HS256 secret, the Redis URL, a fresh namespace per
//! run (no state of an earlier run in the same Redis is met), warnings-only logs, and the
//! protection rules that would refuse a benchmark's traffic lifted (all users come from a few
//! addresses, skip and re-enqueue at machine speed and meet the same peers again). Extra
//! `--gateway-arg`s override these (flags win over the environment). Each instance's output
//! goes to a log file in a directory named in the report.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::ClusterArgs;

/// How long an instance may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(50);
/// How long instances get to drain on SIGTERM at the end before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings every instance runs with (see the module documentation).
pub const BENCHMARK_ENV: [(&str, &str); 8] = [
    ("MATCHGATE_LOG", "warn"),
    ("MATCHGATE_ANTI_REPEAT_WINDOW_S", "0"),
    ("MATCHGATE_SKIP_LIMIT", "1000000"),
    ("MATCHGATE_ENQUEUE_PER_MINUTE", "1000000"),
    ("MATCHGATE_IP_CONNECTS_PER_MINUTE", "1000000"),
    ("MATCHGATE_RATE_LIMIT_PER_MINUTE", "1000000"),
    ("MATCHGATE_RATE_LIMIT_BURST", "1000000"),
    ("NO_COLOR", "1"),
];

pub struct Instance {
    pub port: u16,
    child: Child,
}

pub struct Cluster {
    bin: PathBuf,
    env: Vec<(String, String)>,
    extra: Vec<String>,
    log_dir: PathBuf,
    http: reqwest::Client,
    pub instances: Vec<Instance>,
}

impl Cluster {
    /// Starts the instances and waits until each is ready.
    pub async fn start(
        args: &ClusterArgs,
        secret: &str,
        namespace: &str,
        log_dir: PathBuf,
    ) -> Result<Cluster, String> {
        let bin = match &args.gateway_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(|e| format!("cannot locate this executable: {e}"))?
                .with_file_name("matchgate"),
        };
        if !bin.is_file() {
            return Err(format!(
                "--gateway-bin: {} is not a file (build it with `cargo build --release`)",
                bin.display()
            ));
        }
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
        let mut env: Vec<(String, String)> = BENCHMARK_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("MATCHGATE_JWT_SECRET".into(), secret.into()));
        env.push(("MATCHGATE_REDIS_URL".into(), args.redis_url.clone()));
        env.push(("MATCHGATE_REDIS_NAMESPACE".into(), namespace.into()));
        let mut cluster = Cluster {
            bin,
            env,
            extra: args.gateway_arg.clone(),
            log_dir,
            http: crate::connect::http_client(),
            instances: Vec::new(),
        };
        for index in 0..args.instances as usize {
            let port = free_port()?;
            let child = cluster.launch(index, port).await?;
            cluster.instances.push(Instance { port, child });
        }
        Ok(cluster)
    }

    pub fn urls(&self) -> Vec<String> {
        self.instances
            .iter()
            .map(|i| format!("ws://127.0.0.1:{}/v1/ws", i.port))
            .collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.instances.iter().map(|i| i.child.id()).collect()
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// SIGKILLs instance `index` (a crash: no drain) and starts it again on its port; returns
    /// the new pid.
    pub async fn kill_and_restart(&mut self, index: usize) -> Result<u32, String> {
        /// The port may still be held for a moment by the dead process's sockets.
        const ATTEMPTS: usize = 10;
        let port = self.instances[index].port;
        let child = &mut self.instances[index].child;
        child
            .kill()
            .map_err(|e| format!("kill instance {index}: {e}"))?;
        let _ = child.wait();
        let mut last_error = String::new();
        for _ in 0..ATTEMPTS {
            match self.launch(index, port).await {
                Ok(child) => {
                    let pid = child.id();
                    self.instances[index].child = child;
                    return Ok(pid);
                }
                Err(e) => {
                    last_error = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(last_error)
    }

    /// Spawns instance `index` on `port` and waits until `/readyz` answers 200.
    async fn launch(&self, index: usize, port: u16) -> Result<Child, String> {
        let log_path = self.log_dir.join(format!("gateway-{index}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut command = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MATCHGATE_") {
                command.env_remove(key);
            }
        }
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let ready_url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "instance {index} exited ({status}) before it was ready; its log:\n{}",
                    tail(&log_path)
                ));
            }
            let ready = self
                .http
                .get(&ready_url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "instance {index} not ready within {READY_TIMEOUT:?}; its log:\n{}",
                    tail(&log_path)
                ));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Asks every instance to drain (SIGTERM) and kills those still running after
    /// [`STOP_TIMEOUT`].
    pub async fn stop(&mut self) {
        for instance in &self.instances {
            // SAFETY: kill(2) with the pid of a child this process spawned and has not reaped.
            unsafe {
                libc::kill(instance.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for instance in &mut self.instances {
            while matches!(instance.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(READY_POLL).await;
            }
            let _ = instance.child.kill();
            let _ = instance.child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for instance in &mut self.instances {
            if matches!(instance.child.try_wait(), Ok(None)) {
                let _ = instance.child.kill();
                let _ = instance.child.wait();
            }
        }
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The pid of the Redis at `url`, from `INFO server` (meaningful when it runs on this
/// machine, which is where the load generator may send traffic anyway).
pub async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}
