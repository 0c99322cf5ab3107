//! The server: binds the listener, wires the layers together, serves until told to stop, then
//! drains.
//!
//! Shutdown follows tokio-rs/mini-redis: a signal future ends the accept loop; a `watch` flag
//! tells every connection task to send `reconnect` and close with 1001; each task holds an
//! `mpsc::Sender` clone, and the server waits (up to the drain timeout) until all are dropped.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;

use crate::auth::{AuthMode, Authenticator, KeyError};
use crate::config::{Config, ConfigError};
use crate::connection::Settings;
use crate::gateway::Gateway;
use crate::http::{demo, router, App, ConnectLimiter};
use crate::matching::MatchError;
use crate::metrics::Metrics;
use crate::privacy;
use crate::registry::Registry;
use crate::scaleout;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot set up Redis: {0}")]
    Redis(MatchError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Which backend an instance runs, for the start-up line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    Redis { instance: String, cluster: bool },
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Embedded => f.write_str("embedded (in-memory state, single instance)"),
            Mode::Redis { instance, cluster } => write!(
                f,
                "scale-out ({}, instance {instance})",
                if *cluster { "Redis Cluster" } else { "Redis" }
            ),
        }
    }
}

pub struct Server {
    mode: Mode,
    listener: TcpListener,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    drain_timeout: Duration,
    /// Whether the demo page is served at `/`.
    demo: bool,
}

impl Server {
    /// Validates the configuration, builds the layers and binds the listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        privacy::init(&config);
        let auth = Authenticator::from_config(&config)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done) = mpsc::channel(1);
        let (gateway, mode) = match scaleout::settings(&config) {
            None => (Gateway::in_memory(&config), Mode::Embedded),
            Some(settings) => {
                let registry = Arc::new(Registry::default());
                let metrics = Arc::new(Metrics::new());
                let redis = scaleout::matchmaker(settings.clone(), metrics.clone())
                    .map_err(StartError::Redis)?;
                let gateway = Gateway::new(&config, redis.clone(), registry, metrics);
                let mode = Mode::Redis {
                    instance: settings.instance.clone(),
                    cluster: settings.cluster,
                };
                scaleout::spawn(
                    gateway.clone(),
                    redis,
                    settings,
                    crate::bus::redis::broadcast_channel(&config.redis_namespace),
                    Duration::from_millis(config.instance_heartbeat_ms),
                    stop_rx.clone(),
                );
                (gateway, mode)
            }
        };
        gateway.spawn_room_sweep(stop_rx.clone());
        let app = Arc::new(App {
            gateway,
            auth,
            settings: Arc::new(Settings::from_config(&config)),
            allowed_origins: config.allowed_origins.clone(),
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            connect_limiter: ConnectLimiter::new(config.ip_connects_per_minute),
            admin_token: config.admin_token.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            shutdown: stop_rx,
            done: done_tx,
            next_conn: AtomicU64::new(u64::from(rand::random::<u32>()) << 32),
        });
        Ok(Server {
            mode,
            listener,
            app,
            stop,
            done,
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            demo: config.demo_page(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The media mode, for the start-up line.
    pub fn media(&self) -> &'static str {
        if self.app.gateway.livekit_mode() {
            "livekit"
        } else {
            "p2p"
        }
    }

    /// Whether the demo page is served at `/`.
    pub fn demo(&self) -> bool {
        self.demo
    }

    pub fn auth_mode(&self) -> AuthMode {
        self.app.auth.mode()
    }

    /// Serves until `signal` resolves, then drains: stops accepting, asks every connection to
    /// reconnect elsewhere, and waits for them up to the drain timeout.
    pub async fn run(self, signal: impl Future<Output = ()> + Send + 'static) {
        let Server {
            mode: _,
            listener,
            app,
            stop,
            mut done,
            drain_timeout,
            demo,
        } = self;
        let gateway = app.gateway.clone();
        let (signalled, mut signalled_rx) = oneshot::channel();
        let stop_accepting = async move {
            signal.await;
            tracing::info!("shutdown signal received: draining");
            gateway.start_draining();
            let _ = stop.send(true);
            let _ = signalled.send(());
        };
        // Frames are small and latency matters: no Nagle delay on any socket.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let mut routes = router(app);
        if demo {
            routes = routes.merge(demo::routes());
        }
        // The peer address is the client's address for bans and the per-address limit.
        let serve = axum::serve(
            listener,
            routes.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop_accepting)
        .into_future();
        tokio::pin!(serve);
        let mut served = false;
        tokio::select! {
            result = &mut serve => {
                served = true;
                if let Err(e) = result {
                    tracing::error!(error = %e, "server error");
                }
            }
            _ = &mut signalled_rx => {}
        }
        let deadline = Instant::now() + drain_timeout;
        // Stop accepting and let plain HTTP requests finish; upgraded connections are tracked
        // by `done` instead.
        if !served && tokio::time::timeout_at(deadline, serve).await.is_err() {
            tracing::warn!("HTTP connections still open at the drain timeout");
        }
        // `recv` returns `None` once every connection task has dropped its sender.
        if tokio::time::timeout_at(deadline, done.recv())
            .await
            .is_err()
        {
            tracing::warn!("connections still open at the drain timeout: closing them");
        }
        tracing::info!("shut down");
    }
}
