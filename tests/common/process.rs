//! The real `matchgate` binary as a child process, for tests that need several gateways, crashes
//! (SIGKILL) or signal-driven shutdown (SIGTERM).
//!
//! The gateway listens on `127.0.0.1:0`; its address is parsed from the start-up log line
//! `matchgate listening on 127.0.0.1:PORT`. Two background threads read stdout and stderr into
//! one buffer ([`GatewayProcess::logs`]), which is printed when a test panics while the process
//! is alive or after it exited. The child is killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{http_get, metric_value, Client, PATIENCE};

/// How often the harness re-checks the child and its output.
const POLL: Duration = Duration::from_millis(20);

/// The marker in the start-up line that precedes the bound address.
const LISTENING: &str = "matchgate listening on ";

/// What the reader threads collected.
#[derive(Default)]
struct Output {
    /// stdout and stderr, interleaved by line, ANSI colours removed.
    logs: String,
    /// The address from the start-up line, once seen.
    addr: Option<SocketAddr>,
}

/// A running `matchgate` binary.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Child,
    output: Arc<Mutex<Output>>,
    /// The exit status, once reaped.
    status: Option<ExitStatus>,
}

impl GatewayProcess {
    /// Runs the gateway with `--listen 127.0.0.1:0` plus `args`, and returns once it logged its
    /// address. Panics (with the logs) if it exits first or takes longer than [`PATIENCE`].
    pub async fn start(args: &[&str]) -> GatewayProcess {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`GatewayProcess::start`] with extra environment variables (e.g. `MATCHGATE_*`
    /// settings that have no flag of their own).
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> GatewayProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_matchgate"));
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            // The harness parses human-readable lines; settings of the surrounding shell must
            // not leak in.
            .env_remove("MATCHGATE_LOG_FORMAT")
            .env_remove("MATCHGATE_LISTEN")
            .env("MATCHGATE_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(super::RELAXED_RULES_ENV)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawning the matchgate binary");

        let output = Arc::new(Mutex::new(Output::default()));
        spawn_reader(child.stdout.take().expect("piped stdout"), &output);
        spawn_reader(child.stderr.take().expect("piped stderr"), &output);

        let deadline = Instant::now() + PATIENCE;
        loop {
            let addr = output.lock().unwrap().addr;
            if let Some(addr) = addr {
                return GatewayProcess {
                    addr,
                    child,
                    output,
                    status: None,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Give the readers a moment to drain the pipes for the message.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "matchgate {args:?} exited before listening ({status}); output:\n{}",
                    output.lock().unwrap().logs
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "matchgate {args:?} did not log its address within {PATIENCE:?}; output:\n{}",
                    output.lock().unwrap().logs
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.output.lock().unwrap().logs.clone()
    }

    /// Waits until `GET /readyz` answers 200 (a scale-out instance takes traffic once it has
    /// subscribed); panics with the logs after [`PATIENCE`]. [`Self::start`] does not wait for
    /// this, so that tests can observe a gateway that is not ready.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        while http_get(self.addr, "/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "matchgate never became ready; output:\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the logs contain `needle`; panics with the logs after [`PATIENCE`].
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.output.lock().unwrap().logs.contains(needle) {
            assert!(
                Instant::now() < deadline,
                "matchgate never logged {needle:?}; output:\n{}",
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Kills the process with SIGKILL (a crash: no drain, no clean-up) and reaps it.
    pub fn kill9(&mut self) -> ExitStatus {
        if self.is_running() {
            let _ = self.child.kill(); // SIGKILL on unix
        }
        self.wait()
    }

    /// Sends SIGTERM (a graceful shutdown request) without waiting; see [`Self::wait`] and
    /// [`Self::wait_exit`].
    pub fn terminate(&mut self) {
        if !self.is_running() {
            return;
        }
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Blocks until the process exits; panics with the logs after [`PATIENCE`].
    ///
    /// This blocks the calling thread: in a single-threaded test runtime, clients of the same
    /// test cannot make progress meanwhile. Use [`Self::wait_exit`] when they must (e.g. to
    /// answer close frames during a drain).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.exited_by(deadline) {
                return status;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Like [`Self::wait`], but yields to the runtime while waiting.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.exited_by(deadline) {
                return status;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The exit status if the process has exited; panics with the logs once `deadline` passed.
    fn exited_by(&mut self, deadline: Instant) -> Option<ExitStatus> {
        let status = self.try_status();
        assert!(
            status.is_some() || Instant::now() < deadline,
            "matchgate (pid {}) did not exit within {PATIENCE:?}; output:\n{}",
            self.child.id(),
            self.logs()
        );
        status
    }

    /// Connects `user` with a fresh token and reads the `welcome`.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_with(user, "").await
    }

    /// Connects with extra query parameters (e.g. `resume=...&last_seq=3`) and reads the
    /// `welcome`.
    pub async fn connect_with(&self, user: &str, query: &str) -> Client {
        super::connect_to(&self.ws_url(), user, query).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        http_get(self.addr, "/metrics").await.1
    }

    /// One sample of `/metrics`, by its full name with labels.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- matchgate {} (pid {}) output ---\n{}",
                self.addr,
                self.child.id(),
                self.logs()
            );
        }
    }
}

/// Reads `stream` line by line into `output` until EOF, noting the listening address.
fn spawn_reader(stream: impl Read + Send + 'static, output: &Arc<Mutex<Output>>) {
    let output = Arc::clone(output);
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = strip_ansi(&String::from_utf8_lossy(&raw));
            let mut out = output.lock().unwrap();
            if out.addr.is_none() {
                out.addr = parse_listening(&line);
            }
            out.logs.push_str(&line);
            if !line.ends_with('\n') {
                out.logs.push('\n');
            }
        }
    });
}

/// The address in a `matchgate listening on ADDR ...` line.
pub(crate) fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(LISTENING)? + LISTENING.len()..];
    rest.split(|c: char| c.is_whitespace() || c == '"')
        .next()?
        .parse()
        .ok()
}

/// `text` without ANSI escape sequences (`ESC [ ... final-byte`).
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}
