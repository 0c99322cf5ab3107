//! A real, throwaway PostgreSQL server for the ledger tests: `initdb` into a temp folder, then
//! `pg_ctl` starts it on a free loopback port with its unix socket in that folder. The
//! machine's own PostgreSQL (5432) is never touched. The server binaries come from the newest
//! `/usr/lib/postgresql/*/bin` (Debian's layout), else from `PATH`.
//!
//! PostgreSQL refuses to run as root: when the tests do (CI runs as root), every server
//! command runs as the `postgres` user (`runuser`), which owns the folder. Durability is off
//! (`fsync=off`): a stop is `pg_ctl stop -m immediate`, a crash, and committed rows survive
//! it anyway. The server is stopped and the folder removed on drop; when a test panics, the
//! server log is printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::free_port;
use super::PATIENCE;

/// Attempts at finding a port that is still free when the server binds it.
const PORT_ATTEMPTS: usize = 5;

pub struct PostgresServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// Run the server commands as `postgres` (the tests run as root).
    as_postgres: bool,
    running: bool,
}

/// The folder with `initdb` and `pg_ctl`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let initdb = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .expect("running sh");
    let path = String::from_utf8_lossy(&initdb.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "no PostgreSQL server binaries (initdb, pg_ctl): install postgresql (.ci/run does)"
    );
    Path::new(&path).parent().unwrap().to_path_buf()
}

impl PostgresServer {
    /// Creates a fresh cluster and starts it; the database `postgres` is empty.
    pub async fn start() -> PostgresServer {
        let dir = std::env::temp_dir().join(format!(
            "matchgate-postgres-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let mut server = PostgresServer {
            port: 0,
            dir,
            bin: bin_dir(),
            // SAFETY: geteuid has no preconditions.
            as_postgres: unsafe { libc::geteuid() } == 0,
            running: false,
        };
        if server.as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&server.dir)
                .status()
                .expect("running chown");
            assert!(status.success(), "chown of {} failed", server.dir.display());
        }
        let data = server.data();
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "matchgate", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut attempt = 1;
        loop {
            server.port = free_port();
            match server.launch() {
                Ok(()) => break,
                Err(e) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    eprintln!(
                        "postgres did not start on {} ({e}): another port",
                        server.port
                    );
                }
                Err(e) => panic!("postgres did not start: {e}"),
            }
        }
        server.wait_connectable().await;
        server
    }

    /// `postgres://matchgate@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://matchgate@127.0.0.1:{}/postgres", self.port)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server at once (`-m immediate`, like a crash). A no-op when it is stopped.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }

    /// Starts the stopped server again on the same port, with its data.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.launch() {
            panic!("postgres did not restart on port {}: {e}", self.port);
        }
        self.wait_connectable().await;
    }

    /// A connection for the test's own queries.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test postgres: {e}"));
        tokio::spawn(connection);
        client
    }

    /// Polls `sql` (one row, one `bigint` column) until it gives at least `n`; panics after
    /// [`PATIENCE`] with the last value.
    pub async fn wait_count(&self, sql: &str, n: i64) -> i64 {
        let deadline = Instant::now() + PATIENCE;
        let mut last = None;
        while Instant::now() < deadline {
            if let Ok(client) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await {
                let (client, connection) = client;
                tokio::spawn(connection);
                if let Ok(row) = client.query_one(sql, &[]).await {
                    let count: i64 = row.get(0);
                    if count >= n {
                        return count;
                    }
                    last = Some(count);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{sql:?} never reached {n} (last: {last:?})");
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A server command, as `postgres` when the tests run as root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.stdin(Stdio::null()).current_dir(&self.dir);
        command
    }

    fn launch(&mut self) -> Result<(), String> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-o", &options, "-w", "-t", "20", "start"])
            .output()
            .map_err(|e| format!("running pg_ctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start: {}{}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ));
        }
        self.running = true;
        Ok(())
    }

    async fn wait_connectable(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres on {} does not accept connections; log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- postgres :{} log ---\n{}", self.port, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
