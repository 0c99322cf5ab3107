//! The accept loop and HTTP/1.1 on each accepted socket, with the limits that keep sockets and
//! memory bounded before a connection becomes a WebSocket.
//!
//! `axum::serve` has no request-head timeout, no head size limit of its own and no cap on
//! connections that never finish a request, so the gateway serves its router with hyper
//! directly:
//! - each accepted socket first needs a [`Pending`] slot (caps per listener and per address,
//!   checked before a byte is read); a refused one gets a short 503 or 429 and is closed;
//! - hyper reads the request head within `--http-head-timeout-ms` (the timer also runs while
//!   a keep-alive connection waits for its next request, so it is the idle timeout too) and
//!   answers a head over `--http-max-head-bytes` with 431;
//! - the router sees the TCP peer as `ConnectInfo<SocketAddr>`, sockets run without Nagle's
//!   delay, WebSocket upgrades go through (the slot is given back when the connection
//!   upgrades, and `--max-connections` takes over);
//! - every socket closes [lingering](super::linger);
//! - on shutdown the loop stops accepting and each connection finishes its request in flight
//!   and closes (hyper's graceful shutdown);
//! - with [native TLS](crate::tls) the TLS handshake comes first, inside the pending slot and
//!   within the head timeout, so a client that opens sockets and never finishes a handshake is
//!   bounded like one that never finishes a request head.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::linger::{Lingering, LingeringStream};
use super::pending::{Pending, PendingLimits};
use crate::http::HttpConfig;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tls::Tls;

/// How long the loop pauses after an accept error that is not about one connection (out of
/// file descriptors, say), so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// hyper's HTTP/1.1 settings from the configuration.
pub fn http1(config: &HttpConfig) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.http_head_timeout_ms)
        .max_header_size(config.http_max_head_bytes)
        // The read buffer grows while a head is read; it need not outgrow the head limit by
        // much (hyper's minimum is 8 KiB, its default 400 KiB).
        .max_buf_size((2 * config.http_max_head_bytes).max(16 * 1024));
    builder
}

/// One listener and what it serves.
pub struct Listener {
    /// `public` or `internal`, for metrics.
    pub name: &'static str,
    pub tcp: TcpListener,
    pub router: Router,
    pub pending: Arc<PendingLimits>,
    /// `Some`: the listener speaks TLS.
    pub tls: Option<Arc<Tls>>,
}

/// Everything the connections of all listeners share.
pub struct Shared {
    pub http: http1::Builder,
    pub metrics: Arc<Metrics>,
    pub lingering: Arc<Lingering>,
    pub tasks: TaskTracker,
    /// How long a client has for the TLS handshake (the request head timeout).
    pub handshake_timeout: Duration,
}

/// Accepts connections until `stop` turns true, each served on its own tracked task.
pub async fn serve(listener: Listener, shared: Arc<Shared>, mut stop: Shutdown) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "cannot accept connections");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stop.recv() => return,
        };
        // Frames are small and latency matters: no Nagle delay on any socket.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let socket = shared.lingering.wrap(tcp);
        match listener.pending.admit(peer.ip()) {
            Ok(pending) => {
                let router = listener.router.clone();
                let (shared, stop) = (shared.clone(), stop.clone());
                match &listener.tls {
                    None => shared
                        .tasks
                        .clone()
                        .spawn(connection(socket, peer, router, shared, stop, pending)),
                    Some(tls) => shared.tasks.clone().spawn(tls_connection(
                        tls.acceptor(),
                        socket,
                        peer,
                        router,
                        shared,
                        stop,
                        pending,
                    )),
                };
            }
            Err(refusal) => {
                shared
                    .metrics
                    .pending_refused(listener.name, refusal.as_str());
                // A whole response fits in the empty socket buffer: the write does not wait.
                let _ = socket.try_write(refusal.response());
            }
        }
    }
}

/// Runs the TLS handshake (within the head timeout, holding the pending slot), then serves
/// HTTP/1.1 over it.
async fn tls_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    socket: LingeringStream,
    peer: SocketAddr,
    router: Router,
    shared: Arc<Shared>,
    mut stop: Shutdown,
    pending: Pending,
) {
    let handshake = tokio::time::timeout(shared.handshake_timeout, acceptor.accept(socket));
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                shared.metrics.tls_handshake_failed("error");
                return;
            }
            Err(_) => {
                shared.metrics.tls_handshake_failed("timeout");
                return;
            }
        },
        _ = stop.recv() => return,
    };
    connection(stream, peer, router, shared, stop, pending).await;
}

/// Serves HTTP/1.1 on one socket until it closes or upgrades to a WebSocket.
async fn connection<S>(
    socket: S,
    peer: SocketAddr,
    router: Router,
    shared: Arc<Shared>,
    mut stop: Shutdown,
    _pending: Pending,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        // What `into_make_service_with_connect_info` would add: the TCP peer.
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().call(request)
    });
    let conn = shared
        .http
        .serve_connection(TokioIo::new(socket), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.recv() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Errors that concern one incoming connection only (it went away before it was accepted).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
