//! One client's WebSocket: the task that owns the socket for the connection's whole life.
//!
//! A single task per connection runs one `select!` loop over: frames from the client, frames
//! queued for the client (its [`Outbox`] in the [`Registry`](crate::registry::Registry)), close requests
//! (replacement, slow consumer), the shutdown signal, the ping timer, the heartbeat
//! deadline and the token's expiry timer (answered by `refresh`). One task and no split halves keeps an idle connection small. Everything the
//! connection decides (limits, errors, close codes) is decided here; what a request means is
//! the [`Gateway`]'s business.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use rand::Rng;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::attributes::Attributes;
use crate::auth::expiry::{Due, TokenLifetime};
use crate::auth::Authenticator;
use crate::flags::{count, millis};
use crate::gateway::{Answer, Gateway};
use crate::ids::{ConnId, UserId};
use crate::matching::{MatchError, Resume};
use crate::protocol::{
    close, is_signal, parse_request, Action, ErrorCode, Relay, Reply, Request, PROTOCOL_VERSION,
    SIGNAL_ENVELOPE_BYTES,
};
use crate::ratelimit::TokenBucket;
use crate::registry::{ConnectionHandle, Next, Outbox};
use crate::shutdown::Shutdown;

/// The connection section of the configuration: frame sizes, rates, timeouts and the error
/// budget of each WebSocket.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionConfig {
    /// Largest client frame in bytes; larger frames close the connection with 1009 (`signal`
    /// frames have a limit of their own, `--max-signal-bytes`).
    #[arg(
        long,
        env = "MATCHGATE_MAX_MESSAGE_BYTES",
        default_value = "4096",
        value_parser = count(256..=1 << 20)
    )]
    pub max_message_bytes: usize,

    /// Largest `signal` payload in bytes (real SDP offers are often 4 to 8 KB). A larger
    /// payload gets `bad_request`; a `signal` frame larger than this plus 1 KiB closes with 1009.
    #[arg(
        long,
        env = "MATCHGATE_MAX_SIGNAL_BYTES",
        default_value = "16384",
        value_parser = count(256..=1 << 20)
    )]
    pub max_signal_bytes: usize,

    /// `signal`s allowed per minute and connection (a token bucket of its own, apart from the
    /// general message rate).
    #[arg(
        long,
        env = "MATCHGATE_SIGNAL_PER_MINUTE",
        default_value = "600",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub signal_per_minute: u32,

    /// Burst size of the `signal` rate limit (a burst of ICE candidates).
    #[arg(
        long,
        env = "MATCHGATE_SIGNAL_BURST",
        default_value = "60",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub signal_burst: u32,

    /// Capacity of each connection's outbound queue, in frames. A client that lets it fill up is
    /// closed with 4003.
    #[arg(
        long,
        env = "MATCHGATE_OUTBOUND_QUEUE",
        default_value = "64",
        value_parser = count(8..=65_536)
    )]
    pub outbound_queue: usize,

    /// How long one write to a client may take before it is treated as a slow consumer, in ms.
    #[arg(
        long,
        env = "MATCHGATE_WRITE_TIMEOUT_MS",
        default_value = "10000",
        value_parser = millis(..)
    )]
    pub write_timeout_ms: Duration,

    /// How often clients should send a heartbeat, and the server sends pings, in ms.
    #[arg(
        long,
        env = "MATCHGATE_HEARTBEAT_INTERVAL_MS",
        default_value = "25000",
        value_parser = millis(10..)
    )]
    pub heartbeat_interval_ms: Duration,

    /// A connection silent for `heartbeat_interval_ms` times this factor is closed with 4002.
    #[arg(
        long,
        env = "MATCHGATE_HEARTBEAT_TIMEOUT_FACTOR",
        default_value = "2",
        value_parser = parse_timeout_factor
    )]
    pub heartbeat_timeout_factor: f64,

    /// Client messages allowed per minute and connection (token bucket refill rate).
    #[arg(
        long,
        env = "MATCHGATE_RATE_LIMIT_PER_MINUTE",
        default_value = "120",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub rate_limit_per_minute: u32,

    /// Burst size of the per-connection message rate limit.
    #[arg(
        long,
        env = "MATCHGATE_RATE_LIMIT_BURST",
        default_value = "30",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub rate_limit_burst: u32,

    /// Errors a connection may cause before it is closed with 4004.
    #[arg(
        long,
        env = "MATCHGATE_ERROR_BUDGET",
        default_value = "10",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub error_budget: u32,

    /// One unit of the error budget comes back after this many ms.
    #[arg(
        long,
        env = "MATCHGATE_ERROR_BUDGET_REFILL_MS",
        default_value = "6000",
        value_parser = millis(1..)
    )]
    pub error_budget_refill_ms: Duration,

    /// Upper bound of the jittered `retry_after_ms` in the shutdown `reconnect` event.
    #[arg(
        long,
        env = "MATCHGATE_RECONNECT_JITTER_MS",
        default_value = "5000",
        value_parser = millis(..)
    )]
    pub reconnect_jitter_ms: Duration,
}

impl ConnectionConfig {
    /// How long a connection may stay silent before it is closed with 4002.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval_ms
            .mul_f64(self.heartbeat_timeout_factor)
    }
}

/// The heartbeat timeout factor: between 1 and 100.
fn parse_timeout_factor(s: &str) -> Result<f64, String> {
    let factor: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (1.0..=100.0).contains(&factor) {
        Ok(factor)
    } else {
        Err("must be between 1 and 100".into())
    }
}

/// Per-connection limits, derived once from the configuration and shared by all connections.
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_message_bytes: usize,
    /// Largest `signal` payload; a `signal` frame may be this plus [`SIGNAL_ENVELOPE_BYTES`].
    pub max_signal_bytes: usize,
    pub outbound_queue: usize,
    pub write_timeout: Duration,
    pub rate_per_minute: u32,
    pub rate_burst: u32,
    pub signal_per_minute: u32,
    pub signal_burst: u32,
    pub error_budget: u32,
    pub error_refill: Duration,
    pub reconnect_jitter: Duration,
}

impl Settings {
    pub fn from_config(c: &ConnectionConfig) -> Self {
        Settings {
            heartbeat_interval: c.heartbeat_interval_ms,
            heartbeat_timeout: c.heartbeat_timeout(),
            max_message_bytes: c.max_message_bytes,
            max_signal_bytes: c.max_signal_bytes,
            outbound_queue: c.outbound_queue,
            write_timeout: c.write_timeout_ms,
            rate_per_minute: c.rate_limit_per_minute,
            rate_burst: c.rate_limit_burst,
            signal_per_minute: c.signal_per_minute,
            signal_burst: c.signal_burst,
            error_budget: c.error_budget,
            error_refill: c.error_budget_refill_ms,
            reconnect_jitter: c.reconnect_jitter_ms,
        }
    }

    /// The largest frame the WebSocket layer reads: a `signal` frame's limit, when above
    /// `max_message_bytes` (the connection itself holds other frames to the smaller limit).
    pub fn max_frame_bytes(&self) -> usize {
        self.max_message_bytes
            .max(self.max_signal_bytes + SIGNAL_ENVELOPE_BYTES)
    }
}

/// Most bytes of queued frames written at once (the WebSocket layer buffers up to this much
/// before writing; see [`crate::http`]).
pub const BATCH_BYTES: usize = 16 * 1024;

/// Everything a connection task needs besides its socket.
pub struct Connection {
    pub gateway: Arc<Gateway>,
    pub settings: Arc<Settings>,
    pub user: UserId,
    /// Checks `refresh` tokens; `token_exp` is the `exp` of the token the connection holds.
    pub auth: Arc<Authenticator>,
    pub token_exp: u64,
    /// What the token says about the user (`--attribute-claims`): what other users' `want`
    /// is checked against when this connection enqueues, and what `--require-attribute`
    /// demands. Replaced by a successful `refresh`; a user already waiting keeps the ones
    /// they were queued with. Shared with every connection whose token has none.
    pub attributes: Arc<Attributes>,
    pub id: ConnId,
    /// The client's address and device id, which bans can name.
    pub ip: IpAddr,
    pub device: Option<Arc<str>>,
    /// Set when the handshake could not finish its checks (the ban check needs the backend):
    /// the connection then ends like one whose attach failed, so the client comes back later.
    pub unchecked: Option<MatchError>,
    pub resume: Option<Resume>,
    pub shutdown: Shutdown,
    /// Dropped when the task ends: the server's drain waits for all of these.
    pub _tracked: TaskTrackerToken,
    /// The connection's slot under `max_connections`.
    pub _permit: OwnedSemaphorePermit,
}

/// Why the loop stopped, and how to close the socket.
enum Exit {
    /// The client closed or the socket failed: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close::GOING_AWAY => "server shutting down",
        close::MESSAGE_TOO_BIG => "message too big",
        close::REPLACED => "replaced by a newer connection",
        close::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        close::SLOW_CONSUMER => "slow consumer",
        close::TOO_MANY_ERRORS => "too many errors",
        close::RESYNC => "resync: reconnect with resume",
        close::STATE_LOST => "state lost: reconnect",
        close::TRY_AGAIN_LATER => "try again later",
        close::BANNED => "banned",
        close::TOKEN_EXPIRED => "token expired",
        _ => "internal error",
    }
}

impl Connection {
    /// Runs the connection to its end. Both arguments come boxed: an `async fn` keeps its
    /// arguments twice in its state (rust-lang/rust#62958), which every idle connection's task
    /// would carry; boxed, that is two pointers.
    pub async fn run(mut self: Box<Self>, mut ws: Box<WebSocket>) {
        let gateway = self.gateway.clone();
        let (handle, outbox) = ConnectionHandle::new(
            self.id,
            self.settings.outbound_queue,
            self.ip,
            self.device.take(),
        );
        // If a newer connection of this user is already here, this one is not registered and
        // ends with 4001 without attaching.
        let current = gateway.registry.register(self.user.clone(), handle);
        gateway.metrics.connections.inc();

        let attached = match (current, self.unchecked.take()) {
            (false, _) => Err(MatchError::Replaced),
            (true, Some(e)) => Err(e),
            (true, None) => {
                gateway
                    .attach(&self.user, self.id, self.resume.take())
                    .await
            }
        };
        let exit = match attached {
            Ok(attached) => {
                let welcome = Reply::Welcome {
                    user_id: &self.user,
                    connection_id: &self.id.to_string(),
                    protocol_version: PROTOCOL_VERSION,
                    heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u64,
                    heartbeat_timeout_ms: self.settings.heartbeat_timeout.as_millis() as u64,
                    max_message_bytes: self.settings.max_message_bytes,
                    max_signal_bytes: self.settings.max_signal_bytes,
                    resume_token: &attached.resume_token,
                    resumed: attached.resumed,
                    last_seq: attached.last_seq,
                    state: attached.state,
                }
                .encode();
                let mut exit = self.send(&mut ws, welcome).await;
                for frame in attached.replay {
                    if exit.is_some() {
                        break;
                    }
                    exit = self.send(&mut ws, frame.text).await;
                }
                match exit {
                    Some(exit) => exit,
                    None => {
                        outbox.start_at(attached.last_seq);
                        self.serve(&mut ws, &outbox).await
                    }
                }
            }
            Err(MatchError::Replaced) => {
                Exit::Close(close::REPLACED, close_reason(close::REPLACED))
            }
            Err(e) => {
                let frame = gateway.attach_failed(self.id, &e);
                let _ = self.send(&mut ws, frame).await;
                Exit::Close(close::TRY_AGAIN_LATER, "try again later")
            }
        };

        if let Exit::Close(code, reason) = exit {
            gateway.metrics.disconnect(code_label(code));
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = tokio::time::timeout(
                self.settings.write_timeout,
                ws.send(Message::Close(Some(frame))),
            )
            .await;
        }
        gateway.registry.unregister(&self.user, self.id);
        gateway.metrics.connections.dec();
        gateway.detach(&self.user, self.id).await;
    }

    /// The main loop.
    async fn serve(&mut self, ws: &mut WebSocket, outbox: &Outbox) -> Exit {
        let s = self.settings.clone();
        let mut rate = TokenBucket::new(s.rate_burst, s.rate_per_minute as f64 / 60.0);
        let mut signals = TokenBucket::new(s.signal_burst, s.signal_per_minute as f64 / 60.0);
        let mut errors = TokenBucket::new(s.error_budget, 1.0 / s.error_refill.as_secs_f64());
        // The first ping is jittered so that connections opened together do not ping together.
        let first_ping = rand::rng().random_range(Duration::ZERO..s.heartbeat_interval);
        let mut ping = tokio::time::interval_at(Instant::now() + first_ping, s.heartbeat_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let deadline = tokio::time::sleep(s.heartbeat_timeout);
        tokio::pin!(deadline);
        let policy = self.auth.expiry();
        let mut token = TokenLifetime::new(self.token_exp, policy.notice, policy.grace);
        let expiry = tokio::time::sleep_until(token.deadline());
        tokio::pin!(expiry);

        loop {
            let reply = tokio::select! {
                biased;
                next = outbox.next() => match next {
                    Next::Close(code @ (close::RESYNC | close::STATE_LOST)) => {
                        let reason = if code == close::RESYNC { "resync" } else { "state_lost" };
                        return self.reconnect(ws, reason, code).await;
                    }
                    Next::Close(code) => return Exit::Close(code, close_reason(code)),
                    Next::Send(frame) => {
                        if let Some(exit) = self.send_queued(ws, frame.text, outbox).await {
                            return exit;
                        }
                        continue;
                    }
                },
                _ = self.shutdown.recv() => {
                    return self.reconnect(ws, "shutdown", close::GOING_AWAY).await;
                }
                incoming = ws.recv() => {
                    let message = match incoming {
                        None | Some(Ok(Message::Close(_))) => return Exit::Gone,
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return read_error(e),
                    };
                    let text = match message {
                        Message::Text(text) => text,
                        Message::Binary(_) => {
                            deadline.as_mut().reset(Instant::now() + s.heartbeat_timeout);
                            let frame = self.gateway.error_frame(
                                ErrorCode::BadRequest,
                                "binary frames are not supported: send JSON text frames",
                                None,
                                None,
                            );
                            if let Some(exit) = self.send_error(ws, frame, &mut errors).await {
                                return exit;
                            }
                            continue;
                        }
                        // Pings are answered by the WebSocket layer; pongs are not client
                        // traffic (see the protocol docs on heartbeats).
                        Message::Ping(_) | Message::Pong(_) => continue,
                        Message::Close(_) => return Exit::Gone,
                    };
                    deadline.as_mut().reset(Instant::now() + s.heartbeat_timeout);
                    let parsed = parse_request(&text, s.max_signal_bytes);
                    // The WebSocket layer reads frames up to a signal's limit: only a signal
                    // may be larger than max_message_bytes. The parse above tells; only a frame
                    // that failed it is read again, for its type (a signal refused for its
                    // payload is answered, not closed).
                    if text.len() > s.max_message_bytes {
                        let signal = match &parsed {
                            Ok(Request { action: Action::Relay(Relay::Signal(_)), .. }) => true,
                            Ok(_) => false,
                            Err(_) => is_signal(&text),
                        };
                        if !signal {
                            return Exit::Close(close::MESSAGE_TOO_BIG, close_reason(close::MESSAGE_TOO_BIG));
                        }
                    }
                    // Signals spend a budget of their own: a burst of ICE candidates must not
                    // starve the other messages, nor be starved by them. A refused signal's
                    // error echoes its `ref`; the general `rate_limited` stays without one.
                    let signal = match &parsed {
                        Ok(Request { action: Action::Relay(Relay::Signal(_)), reference }) => {
                            Some(reference.as_deref())
                        }
                        _ => None,
                    };
                    let bucket = if signal.is_some() { &mut signals } else { &mut rate };
                    if let Err(wait) = bucket.take() {
                        let frame = self.gateway.error_frame(
                            ErrorCode::RateLimited,
                            if signal.is_some() { "too many signals" } else { "too many messages" },
                            signal.flatten(),
                            Some(wait.as_millis() as u64 + 1),
                        );
                        if let Some(exit) = self.send_error(ws, frame, &mut errors).await {
                            return exit;
                        }
                        continue;
                    }
                    match parsed {
                        // The two awaits below are boxed: inline, their futures (a key fetch,
                        // a matchmaker call) would sit in every idle connection's task, sized
                        // for the largest of them, for the connection's whole life.
                        Ok(Request { action: Action::Refresh { access_token }, reference }) => {
                            match Box::pin(self.auth.verify_refresh(&self.user, &access_token)).await {
                                Ok(claims) => {
                                    token.renew(claims.exp);
                                    // What a later `enqueue` is matched by: a refreshed
                                    // token may say something new (a verified age).
                                    self.attributes = claims.attributes;
                                    expiry.as_mut().reset(token.deadline());
                                    Some(Reply::Ack { action: "refresh", reference: reference.as_deref() }.encode())
                                }
                                Err(e) => {
                                    let message = format!("refresh refused: {e}; the connection keeps its token");
                                    let frame = self.gateway.error_frame(ErrorCode::Unauthorized, &message, reference.as_deref(), None);
                                    if let Some(exit) = self.send_error(ws, frame, &mut errors).await {
                                        return exit;
                                    }
                                    continue;
                                }
                            }
                        }
                        Ok(request) => match Box::pin(self.gateway.handle(&self.user, self.id, &self.attributes, request)).await {
                            Some(Answer { frame, client_error: true }) => {
                                if let Some(exit) = self.send_error(ws, frame, &mut errors).await {
                                    return exit;
                                }
                                continue;
                            }
                            Some(Answer { frame, client_error: false }) => Some(frame),
                            None => None,
                        },
                        Err((e, reference)) => {
                            let frame = self.gateway.error_frame(e.code(), &e.to_string(), reference.as_deref(), None);
                            if let Some(exit) = self.send_error(ws, frame, &mut errors).await {
                                return exit;
                            }
                            continue;
                        }
                    }
                }
                _ = ping.tick() => {
                    if let Some(exit) = self.send_message(ws, Message::Ping(Default::default())).await {
                        return exit;
                    }
                    continue;
                }
                _ = &mut deadline => {
                    return Exit::Close(close::HEARTBEAT_TIMEOUT, close_reason(close::HEARTBEAT_TIMEOUT));
                }
                _ = &mut expiry => match token.fire() {
                    Due::Notice { expires_at_ms } => {
                        expiry.as_mut().reset(token.deadline());
                        Some(Reply::TokenExpiring { expires_at_ms }.encode())
                    }
                    Due::Close => {
                        return Exit::Close(close::TOKEN_EXPIRED, close_reason(close::TOKEN_EXPIRED));
                    }
                },
            };
            if let Some(frame) = reply {
                if let Some(exit) = self.send(ws, frame).await {
                    return exit;
                }
            }
        }
    }

    /// Tells the client to reconnect after a jittered delay (so that clients do not all come
    /// back at once), then closes with `code`.
    async fn reconnect(&self, ws: &mut WebSocket, reason: &str, code: u16) -> Exit {
        // The protocol counts in ms.
        let most = u64::try_from(self.settings.reconnect_jitter.as_millis()).unwrap_or(u64::MAX);
        let jitter = rand::rng().random_range(0..=most);
        let frame = Reply::Reconnect {
            reason,
            retry_after_ms: jitter,
        }
        .encode();
        if let Some(exit) = self.send(ws, frame).await {
            return exit;
        }
        Exit::Close(code, close_reason(code))
    }

    /// Sends an error frame and charges the error budget; an empty budget closes.
    async fn send_error(
        &self,
        ws: &mut WebSocket,
        frame: Utf8Bytes,
        budget: &mut TokenBucket,
    ) -> Option<Exit> {
        if let Some(exit) = self.send(ws, frame).await {
            return Some(exit);
        }
        budget
            .take()
            .err()
            .map(|_| Exit::Close(close::TOO_MANY_ERRORS, close_reason(close::TOO_MANY_ERRORS)))
    }

    async fn send(&self, ws: &mut WebSocket, text: Utf8Bytes) -> Option<Exit> {
        self.send_message(ws, Message::Text(text)).await
    }

    /// Writes `first` together with the frames queued behind it (a `queued` and its
    /// `matched`, say), up to [`BATCH_BYTES`]: one socket write where there would be one per
    /// frame, which is most of a match's cost on the gateway.
    async fn send_queued(
        &self,
        ws: &mut WebSocket,
        first: Utf8Bytes,
        outbox: &Outbox,
    ) -> Option<Exit> {
        let batch = async {
            let mut bytes = first.len();
            ws.feed(Message::Text(first)).await?;
            while bytes < BATCH_BYTES {
                let Some(frame) = outbox.try_next() else {
                    break;
                };
                bytes += frame.text.len();
                ws.feed(Message::Text(frame.text)).await?;
            }
            ws.flush().await
        };
        self.timed_write(batch).await
    }

    /// Writes one message.
    async fn send_message(&self, ws: &mut WebSocket, message: Message) -> Option<Exit> {
        self.timed_write(ws.send(message)).await
    }

    /// A write that cannot finish within the write timeout means the client does not read: it
    /// is treated as a slow consumer. Most writes finish at their first poll (the socket's
    /// buffer has room), so the timer is only set up for a write that has to wait: a timer
    /// per write costs a clock read and a runtime-handle lookup each time. The write (and
    /// the timer, when there is one) are boxed: inline they would sit in the state of every
    /// connection's task, idle or not.
    fn timed_write<'a>(
        &'a self,
        write: impl Future<Output = Result<(), axum::Error>> + 'a,
    ) -> impl Future<Output = Option<Exit>> + 'a {
        let mut write = Box::pin(write);
        async move {
            let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
            let written = match first {
                Poll::Ready(written) => Ok(written),
                Poll::Pending => {
                    Box::pin(tokio::time::timeout(self.settings.write_timeout, write)).await
                }
            };
            match written {
                Ok(Ok(())) => None,
                Ok(Err(_)) => Some(Exit::Gone),
                Err(_) => {
                    self.gateway
                        .metrics
                        .disconnect(code_label(close::SLOW_CONSUMER));
                    Some(Exit::Gone)
                }
            }
        }
    }
}

/// Maps a read error to an exit: oversized frames get their close code, anything else means
/// the socket is gone.
fn read_error(e: axum::Error) -> Exit {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => {
            Exit::Close(close::MESSAGE_TOO_BIG, close_reason(close::MESSAGE_TOO_BIG))
        }
        _ => Exit::Gone,
    }
}

fn code_label(code: u16) -> &'static str {
    match code {
        close::GOING_AWAY => "1001",
        close::MESSAGE_TOO_BIG => "1009",
        close::REPLACED => "4001",
        close::HEARTBEAT_TIMEOUT => "4002",
        close::SLOW_CONSUMER => "4003",
        close::TOO_MANY_ERRORS => "4004",
        close::RESYNC => "4005",
        close::STATE_LOST => "4006",
        close::TRY_AGAIN_LATER => "1013",
        close::BANNED => "4007",
        close::TOKEN_EXPIRED => "4008",
        _ => "1011",
    }
}
