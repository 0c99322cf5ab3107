//! The server: binds the listeners, wires the layers together, serves until told to stop,
//! then drains.
//!
//! Shutdown follows tokio-rs/mini-redis: a signal future ends the accept loops; a `watch` flag
//! tells every connection task to send `reconnect` and close with 1001 (and every HTTP
//! connection to finish its request and close); every task is tracked, and the server waits
//! (up to the drain timeout) until all have ended. Then the work tied to no connection
//! ([`Background`]: timers, media rooms, the detach queue, the Redis loops) is cancelled and
//! awaited, so a server that has returned from [`Server::run`] leaves no task behind.
//!
//! [`accept`] serves each socket, [`pending`] caps the sockets that have not become
//! WebSockets, and [`linger`] makes sure that a client the gateway closes hears why.
//!
//! The server is the composition root: the one module that reads the whole [`Config`]. It
//! hands every other layer its own section, or plain values (the media mode, the shared
//! Redis's [`Deployment`](crate::redis_keys::Deployment)), and picks the engine and the
//! moderation backend the gateway runs over.

mod accept;
mod linger;
mod pending;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::address::AddressKeys;
use crate::auth::{AuthMode, Authenticator, KeyError};
use crate::config::{Config, ConfigError};
use crate::connection::Settings;
use crate::gateway::{Gateway, Sections};
use crate::http::{demo, routers, App, ConnectLimiter};
use crate::matching::MatchError;
use crate::metrics::Metrics;
use crate::moderation;
use crate::privacy;
use crate::registry::Registry;
use crate::scaleout;
use crate::shutdown::{Background, Shutdown};
use crate::tls::{Tls, TlsError};
use crate::webhooks::Store as WebhookStore;
use pending::PendingLimits;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
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
    public: accept::Listener,
    internal: Option<accept::Listener>,
    shared: Arc<accept::Shared>,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    drain_timeout: Duration,
    /// Whether the demo page is served at `/`.
    demo: bool,
    /// Work tied to no connection: cancelled and awaited once the connections have drained.
    background: Background,
}

/// How long the background work may take to end after it was cancelled, at least (the drain
/// timeout may have run out on the connections already).
const BACKGROUND_STOP: Duration = Duration::from_secs(1);

/// Connections the kernel queues for a listener until they are accepted (capped by
/// `net.core.somaxconn`). The usual default, 128, overflows in a reconnect storm while the
/// process is busy, and every connection beyond it waits for a SYN retransmission (a second
/// or more).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr`, or says which address could not be bound.
fn listen(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let bind = || {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| StartError::Bind { addr, source })
}

impl Server {
    /// Validates the configuration, builds the layers and binds the listeners.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        privacy::init(&config.privacy);
        let deployment = config.redis.deployment();
        // Created first: the authenticator's key refresh runs in it too.
        let background = Background::default();
        let auth = Authenticator::from_config(
            &config.auth,
            &config.attributes,
            deployment.as_ref(),
            &background,
        )
        .await?;
        let public = listen(config.listen)?;
        let internal = config.internal_listen.map(listen).transpose()?;
        let (stop, stop_rx) = watch::channel(false);
        let tasks = TaskTracker::new();
        let sections = Sections {
            session: &config.session,
            rules: &config.rules,
            livekit: &config.livekit,
            moderation: &config.moderation,
            ledger: &config.ledger,
            webhooks: &config.webhooks,
            attributes: &config.attributes,
        };
        let (gateway, mode) = match scaleout::settings(
            &config.redis,
            &config.session,
            &config.rules,
            config.media_mode(),
            config.history_ttl(),
        ) {
            None => (
                Gateway::in_memory(
                    sections,
                    config.media_mode(),
                    config.history_ttl(),
                    background.clone(),
                ),
                Mode::Embedded,
            ),
            Some(settings) => {
                let registry = Arc::new(Registry::default());
                let metrics = Arc::new(Metrics::new());
                let partitions = config.redis.redis_partitions;
                let redis = scaleout::matchmaker(settings.clone(), partitions, metrics.clone())
                    .await
                    .map_err(StartError::Redis)?;
                let webhook_store =
                    deployment
                        .clone()
                        .map_or(WebhookStore::Memory, |redis| WebhookStore::Redis {
                            redis,
                            instance: settings.instance.clone(),
                        });
                let moderation =
                    moderation::from_config(&config.moderation, deployment, &registry, &metrics);
                let gateway = Gateway::new(
                    sections,
                    redis.clone(),
                    moderation,
                    registry,
                    metrics,
                    background.clone(),
                    webhook_store,
                );
                let mode = Mode::Redis {
                    instance: settings.instance.clone(),
                    cluster: settings.cluster,
                };
                scaleout::spawn(
                    &background,
                    gateway.clone(),
                    redis,
                    settings,
                    config.redis.instance_heartbeat_ms,
                    stop_rx.clone(),
                );
                (gateway, mode)
            }
        };
        gateway.spawn_room_sweep(stop_rx.clone());
        let addresses = AddressKeys::new(config.http.ipv6_prefix_len);
        let app = Arc::new(App {
            gateway,
            auth,
            settings: Arc::new(Settings::from_config(&config.connection)),
            allowed_origins: config.http.allowed_origins.clone(),
            connection_slots: Arc::new(Semaphore::new(config.http.max_connections)),
            connect_limiter: ConnectLimiter::new(config.http.ip_connects_per_minute),
            admin_token: config.moderation.admin_token.clone(),
            trusted_proxies: config.http.trusted_proxies.clone(),
            addresses,
            shutdown: stop_rx,
            tasks: tasks.clone(),
            next_conn: AtomicU64::new(u64::from(rand::random::<u32>()) << 32),
        });
        let metrics = app.gateway.metrics.clone();
        let tls = Tls::from_config(&config.tls, metrics.clone())?;
        if let Some(tls) = &tls {
            background.spawn(tls.clone().watch(Shutdown::new(app.shutdown.clone())));
        }
        let demo = config.auth.demo_page();
        let (mut public_router, internal_router) = routers(&app, internal.is_some());
        if demo {
            public_router = public_router.merge(demo::routes());
        }
        let public = accept::Listener {
            name: "public",
            tcp: public,
            router: public_router,
            pending: PendingLimits::new(
                config.http.max_pending_connections,
                Some(config.http.max_pending_per_address),
                addresses,
                config.http.trusted_proxies.clone(),
                metrics.pending_gauge("public"),
            ),
            tls,
        };
        // Operators' requests have a budget of their own, so that a flood of the public side
        // cannot lock them out.
        let internal = internal
            .zip(internal_router)
            .map(|(tcp, router)| accept::Listener {
                name: "internal",
                tcp,
                router,
                pending: PendingLimits::new(
                    config.http.max_pending_connections,
                    None,
                    addresses,
                    Vec::new(),
                    metrics.pending_gauge("internal"),
                ),
                // Operators' side stays plain: it is not exposed, and probes and scrapers
                // reach it without certificates.
                tls: None,
            });
        let shared = Arc::new(accept::Shared {
            http: accept::http1(&config.http),
            metrics,
            lingering: linger::Lingering::new(config.http.max_pending_connections, tasks.clone()),
            tasks,
            handshake_timeout: config.http.http_head_timeout_ms,
        });
        Ok(Server {
            mode,
            public,
            internal,
            shared,
            app,
            stop,
            drain_timeout: config.http.drain_timeout_ms,
            demo,
            background,
        })
    }

    /// The address of the public listener (`--listen`).
    pub fn local_addr(&self) -> SocketAddr {
        self.public
            .tcp
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address of the internal listener (`--internal-listen`), if there is one.
    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.internal.as_ref().map(|listener| {
            listener
                .tcp
                .local_addr()
                .expect("a bound listener has an address")
        })
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

    /// Whether the public listener speaks TLS (`--tls-cert`).
    pub fn tls(&self) -> bool {
        self.public.tls.is_some()
    }

    /// Whether the demo page is served at `/`.
    pub fn demo(&self) -> bool {
        self.demo
    }

    pub fn auth_mode(&self) -> AuthMode {
        self.app.auth.mode()
    }

    /// The server's background work (timers, media rooms, the detach queue, the Redis loops),
    /// for observing it: after [`Server::run`] returned, none of it runs any more.
    pub fn background(&self) -> Background {
        self.background.clone()
    }

    /// Serves until `signal` resolves, then drains: stops accepting, asks every connection to
    /// reconnect elsewhere, and waits for them up to the drain timeout.
    pub async fn run(self, signal: impl Future<Output = ()> + Send + 'static) {
        let Server {
            mode: _,
            public,
            internal,
            shared,
            app,
            stop,
            drain_timeout,
            demo: _,
            background,
        } = self;
        let gateway = app.gateway.clone();
        let ledger = gateway.ledger.clone();
        let webhooks = gateway.clone();
        // The routers hold the app from here on; when they are gone, so is it.
        drop(app);
        let stop_rx = Shutdown::new(stop.subscribe());
        let stop_accepting = async move {
            signal.await;
            tracing::info!("shutdown signal received: draining");
            gateway.start_draining();
            let _ = stop.send(true);
        };
        let internal = async {
            if let Some(internal) = internal {
                accept::serve(internal, shared.clone(), stop_rx.clone()).await;
            }
        };
        tokio::join!(
            stop_accepting,
            accept::serve(public, shared.clone(), stop_rx.clone()),
            internal
        );
        // Every connection (HTTP or WebSocket) and every lingering close is a tracked task.
        let tasks = &shared.tasks;
        tasks.close();
        let deadline = Instant::now() + drain_timeout;
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still open at the drain timeout: closing them");
        }
        webhooks.flush_webhooks(deadline).await;
        // The last sessions' ends, within what is left of the drain timeout.
        if let Some(ledger) = ledger {
            ledger.drain(deadline).await;
        }
        // What the connections left behind (grace timers of the users who just left, queue
        // updates, rooms, the detach queue) stops now.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(BACKGROUND_STOP);
        if !background.shut_down(left).await {
            tracing::warn!(
                running = background.running(),
                "background tasks still running after their cancellation"
            );
        }
        tracing::info!("shut down");
    }
}
