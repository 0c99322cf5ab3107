//! The `matchgate` binary: parse the configuration, set up logging, serve until SIGTERM or
//! SIGINT, then drain. `matchgate migrate` applies the ledger's migrations and exits.

use clap::{Parser, Subcommand};
use matchgate::auth::AuthMode;
use matchgate::config::{Config, LogFormat};
use matchgate::Server;
use tracing_subscriber::EnvFilter;

/// The command line: the gateway's configuration, and what to do (serve, without a command).
#[derive(Parser)]
#[command(
    name = "matchgate",
    version,
    about = "Realtime matchmaking gateway for random video chat"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the session ledger's database migrations (`--database-url` /
    /// `MATCHGATE_DATABASE_URL`) and exit; the gateway also applies them when it starts.
    Migrate,
}

#[tokio::main]
async fn main() {
    let Cli { command, config } = Cli::parse();
    if let Some(Command::Migrate) = command {
        std::process::exit(migrate(&config).await);
    }
    if config.healthcheck {
        // The internal listener is plain HTTP even when the public one speaks TLS.
        let target = match (config.internal_listen, &config.tls.tls_cert) {
            (Some(internal), _) => internal,
            (None, None) => config.listen,
            (None, Some(_)) => {
                eprintln!("matchgate --healthcheck: with --tls-cert, set --internal-listen (the probe speaks plain HTTP)");
                std::process::exit(1);
            }
        };
        std::process::exit(healthcheck(target).await);
    }
    init_logging(&config);
    let server = match Server::bind(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("matchgate: {e}");
            std::process::exit(2);
        }
    };
    let addr = server.local_addr();
    let mode = server.mode().clone();
    if server.auth_mode() == AuthMode::Dev {
        tracing::warn!(
            "DEV MODE: no MATCHGATE_JWT_SECRET or MATCHGATE_JWT_PUBLIC_KEY_FILE set; anyone can get a token from POST /v1/dev/token. Never run this in production."
        );
    }
    let scheme = if server.tls() { "wss" } else { "ws" };
    tracing::info!(
        "matchgate listening on {addr} ({scheme}://{addr}/v1/ws), mode: {mode}, auth: {}, media: {}",
        server.auth_mode(),
        server.media()
    );
    if let Some(internal) = server.internal_addr() {
        tracing::info!(
            "internal listener on {internal}: /metrics, the admin API, /healthz, /readyz"
        );
    }
    if server.demo() {
        let scheme = if server.tls() { "https" } else { "http" };
        tracing::info!("demo page at {scheme}://{addr}/: open it in two browser windows");
    }
    server.run(shutdown_signal()).await;
}

/// `matchgate migrate`: exit code 0 when the database has every migration, 2 otherwise.
async fn migrate(config: &Config) -> i32 {
    match matchgate::ledger::migrate(&config.ledger).await {
        Ok(applied) if applied.is_empty() => {
            println!("matchgate: the ledger's database is up to date");
            0
        }
        Ok(applied) => {
            println!("matchgate: applied the ledger migrations {applied:?}");
            0
        }
        Err(e) => {
            eprintln!("matchgate migrate: {e}");
            2
        }
    }
}

/// Exit code 0 when `GET /healthz` at `listen` (plain HTTP) answers 200, 1 otherwise.
async fn healthcheck(listen: std::net::SocketAddr) -> i32 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe).await {
        Ok(Some(true)) => 0,
        _ => 1,
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("matchgate: invalid MATCHGATE_LOG {:?}: {e}", config.log);
        std::process::exit(2);
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
