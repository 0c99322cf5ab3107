//! One simulated user: a task that owns one WebSocket and drives it as a client app would,
//! following the protocol's events and `seq`.
//!
//! The task is the same in every scenario; its [`Policy`] decides what it does when it is
//! free: nothing (`idle`: hold the connection), enqueue again (`churn`, `cluster`: a closed
//! loop), or wait to be told (`rate`: the open-loop scheduler picks idle users).
//!
//! Cheap by construction, since it shares the CPU with the gateway it measures: one timer per
//! user (a single `Sleep` moved to the earliest of its deadlines: heartbeat, hold, match
//! timeout; tokio keeps timers in a wheel, so thousands cost little), frames parsed into a
//! borrowed view, client frames pre-encoded, and the shared bookkeeping locked once per
//! `matched`.
//!
//! Only the offerer of a session ends it (after its hold, with `skip` or `end`), so the two
//! members never race each other with requests that would be refused.
//!
//! A dropped connection (close code or EOF; counted as an error) is reopened with `resume`
//! and `last_seq`, on the same gateway or the next in the list, as a client behind a load
//! balancer would; after the replay the user compares its state with the `welcome`'s and
//! repeats a request that the old connection lost.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::connect::{self, ConnectError, Welcome, Ws};
use crate::run::{Ctx, Phase};
use crate::wire::{self, ServerFrame, REF_END, REF_ENQUEUE, REF_SKIP, REF_STATUS};

/// What a free user does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// Holds the connection and sends heartbeats, nothing else.
    Hold,
    /// Enqueues again at once; as offerer, ends a session with `end` with this probability,
    /// otherwise with `skip`.
    Closed { end_ratio: f64 },
    /// Waits for the scheduler; as offerer, ends every session with `end`.
    Open,
}

/// Where the user stands, as far as the events it received say.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Neither queued nor in a session; `retry_at` when a refused request is to be repeated.
    Idle { retry_at: Option<Instant> },
    /// Waits for `matched` since `since`: the user's own `enqueue` or `skip` (or the moment
    /// the gateway re-queued it).
    Waiting {
        since: Instant,
        /// `queued` (or a re-queueing `session_ended`) arrived: the gateway has the user.
        confirmed: bool,
        /// A `skip` was sent and its `session_ended` has not arrived yet.
        skipping: bool,
        /// The wait passed the match timeout: counted as `no_match`, never as a latency.
        timed_out: bool,
    },
    InSession {
        session: u64,
        /// When the offerer ends the session.
        act_at: Option<Instant>,
    },
    /// Sent `end`; waits for `session_ended` or `dequeued`.
    Leaving { since: Instant },
}

/// Whether the task goes on.
enum Flow {
    Continue,
    Exit,
}

/// Opens user `me`'s connection and runs it until the run closes.
pub async fn run(
    ctx: Arc<Ctx>,
    me: u32,
    mut phase: watch::Receiver<Phase>,
    commands: Option<mpsc::Receiver<Instant>>,
) {
    let name = format!("{}-{me}", ctx.user_prefix);
    let home = me as usize % ctx.targets.len();
    let source = ctx.sources[me as usize % ctx.sources.len()];
    let opened = {
        let _slot = ctx.connect_slots.acquire().await;
        let started = Instant::now();
        let opened = match ctx.auth.token(&name, &ctx.targets[home]).await {
            Ok(token) => connect::open(&ctx.targets[home], source, &token, None)
                .await
                .map(|(ws, welcome)| (token, ws, welcome)),
            Err(kind) => Err(ConnectError(kind)),
        };
        if opened.is_ok() {
            ctx.tally().handshake(started.elapsed());
        }
        opened
    };
    let (token, ws, welcome) = match opened {
        Ok(x) => x,
        Err(ConnectError(kind)) => {
            ctx.tally().error(kind);
            ctx.connect_attempt_done(false);
            return;
        }
    };
    ctx.connect_attempt_done(true);
    let now = Instant::now();
    let mut user = User {
        pool: me % ctx.pools,
        me,
        token,
        source,
        home,
        heartbeat_every: welcome.heartbeat_interval,
        next_heartbeat: now + welcome.heartbeat_interval,
        resume_token: welcome.resume_token,
        last_seq: welcome.last_seq,
        replay_until: None,
        state: State::Idle { retry_at: None },
        running: false,
        resync_pending: false,
        retry_after: None,
        reconnect_hint: None,
        requested_since_welcome: false,
        ws,
        ctx,
    };
    let initial = *phase.borrow_and_update();
    if let Flow::Continue = user.enter(initial).await {
        user.serve(phase, commands).await;
    }
    user.finish().await;
}

struct User {
    ctx: Arc<Ctx>,
    me: u32,
    pool: u32,
    token: String,
    source: IpAddr,
    /// Index of the target the connection is on.
    home: usize,
    ws: Ws,
    heartbeat_every: Duration,
    next_heartbeat: Instant,
    resume_token: Option<String>,
    /// The highest `seq` processed.
    last_seq: u64,
    /// After a resume: the `seq` the replay runs up to, and the `welcome`'s state, which the
    /// user's own state is compared with once the replay is through.
    replay_until: Option<(u64, String)>,
    state: State,
    /// Whether the run reached its running phase (users act until the window closes; before
    /// and after they only listen).
    running: bool,
    /// A `status` was sent to find out where the user stands after a refused request.
    resync_pending: bool,
    /// `retry_after_ms` of the last refused request.
    retry_after: Option<Duration>,
    /// A request (`enqueue`, `skip`, `end`) was sent on the current connection: the user's
    /// state is then newer than the `welcome`'s.
    requested_since_welcome: bool,
    /// From a `reconnect` frame: whether the state is lost (reconnect without resume), and
    /// when to come back.
    reconnect_hint: Option<(bool, Option<Duration>)>,
}

impl User {
    async fn serve(
        &mut self,
        mut phase: watch::Receiver<Phase>,
        mut commands: Option<mpsc::Receiver<Instant>>,
    ) {
        let timer = tokio::time::sleep_until(self.next_deadline().into());
        tokio::pin!(timer);
        loop {
            let deadline = tokio::time::Instant::from(self.next_deadline());
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            let flow = tokio::select! {
                changed = phase.changed() => {
                    let next = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Closing };
                    self.enter(next).await
                }
                message = self.ws.next() => match message {
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        self.lost(format!("close:{code}")).await
                    }
                    Some(Ok(_)) => Flow::Continue, // pings are answered by tungstenite
                    Some(Err(_)) | None => self.lost("eof".into()).await,
                },
                Some(intended) = next_command(&mut commands) => self.arrival(intended).await,
                () = &mut timer => self.on_timer(timer.deadline().into_std()).await,
            };
            if let Flow::Exit = flow {
                return;
            }
        }
    }

    /// The phase of the run changed.
    async fn enter(&mut self, phase: Phase) -> Flow {
        match phase {
            Phase::Connecting => Flow::Continue,
            Phase::Running => {
                self.running = true;
                if let State::Idle { retry_at: None } = self.state {
                    self.next_step().await;
                }
                Flow::Continue
            }
            Phase::Stopping => {
                self.running = false;
                Flow::Continue
            }
            Phase::Closing => Flow::Exit,
        }
    }

    /// Whether the user takes steps of its own now. The window's end is read from the
    /// shared flag rather than from the phase, which a task may see late.
    fn acting(&self) -> bool {
        self.running && !self.ctx.stopped()
    }

    /// The earliest moment something is due.
    fn next_deadline(&self) -> Instant {
        let timeout = self.ctx.match_timeout;
        let due = match self.state {
            State::Idle { retry_at } => retry_at,
            State::Waiting {
                since,
                timed_out: false,
                ..
            } => Some(since + timeout),
            State::Waiting { .. } => None,
            State::InSession { act_at, .. } => act_at,
            State::Leaving { since } => Some(since + timeout),
        };
        due.map_or(self.next_heartbeat, |d| d.min(self.next_heartbeat))
    }

    /// Handles everything due at `fired` (the deadline the timer was set to).
    async fn on_timer(&mut self, fired: Instant) -> Flow {
        if self.next_heartbeat <= fired {
            let heartbeat = self.ctx.frames.heartbeat.clone();
            self.send(heartbeat).await;
        }
        let now = Instant::now();
        match self.state {
            State::Idle {
                retry_at: Some(at), ..
            } if at <= fired => {
                self.state = State::Idle { retry_at: None };
                self.next_step().await;
            }
            State::Waiting {
                since,
                timed_out: false,
                ..
            } if since + self.ctx.match_timeout <= fired => {
                self.ctx.tally().error("no_match");
                if let State::Waiting { timed_out, .. } = &mut self.state {
                    *timed_out = true;
                }
                if self.acting() {
                    // Give up this wait: leave the queue (or the session that was about to
                    // arrive) and start over.
                    self.leave(now).await;
                }
            }
            State::InSession {
                session,
                act_at: Some(at),
            } if at <= fired => {
                self.state = State::InSession {
                    session,
                    act_at: None,
                };
                if self.acting() {
                    self.end_session(now).await;
                }
            }
            State::Leaving { since } if since + self.ctx.match_timeout <= fired => {
                // The `end` went unanswered: treat the connection as dead.
                self.ctx.tally().error("no_reply");
                self.state = State::Leaving { since: now };
                return self.reconnect().await;
            }
            _ => {}
        }
        Flow::Continue
    }

    /// The open-loop scheduler picked this user to enqueue at `intended`.
    async fn arrival(&mut self, intended: Instant) -> Flow {
        if let State::Idle { .. } = self.state {
            if self.acting() {
                self.enqueue(intended).await;
                return Flow::Continue;
            }
        }
        self.ctx.tally().count("arrivals_busy");
        Flow::Continue
    }

    async fn on_text(&mut self, text: &str) -> Flow {
        let Some(frame) = ServerFrame::parse(text) else {
            self.ctx.tally().error("bad_frame");
            return Flow::Continue;
        };
        if let Some(seq) = frame.seq {
            if seq <= self.last_seq {
                // Delivered before: the event already took effect.
                self.ctx.tally().error("seq_repeated");
                return Flow::Continue;
            }
            if seq != self.last_seq + 1 {
                self.ctx.tally().error("seq_gap");
            }
            self.last_seq = seq;
        }
        let now = Instant::now();
        match frame.kind {
            "queued" => match &mut self.state {
                State::Waiting { confirmed, .. } => *confirmed = true,
                // Only after an inconsistency (counted where it was found).
                _ => {
                    self.state = State::Waiting {
                        since: now,
                        confirmed: true,
                        skipping: false,
                        timed_out: false,
                    }
                }
            },
            "matched" => self.on_matched(&frame, now).await,
            "session_ended" => {
                self.on_session_ended(frame.requeued == Some(true), now)
                    .await
            }
            "dequeued" => self.become_idle(None).await,
            "error" => self.on_error(&frame).await,
            "status" if frame.reference == Some(REF_STATUS) => self.on_status(&frame, now).await,
            "reconnect" => {
                self.reconnect_hint = Some((
                    frame.reason == Some("state_lost"),
                    frame.retry_after_ms.map(Duration::from_millis),
                ));
            }
            "match_proposed" | "match_cancelled" => {
                // The accept phase needs a client that accepts; the load generator is not one.
                self.ctx.tally().error(format!("unexpected:{}", frame.kind));
            }
            _ => {} // heartbeat_ack, queue_update, peer_status, ack, ...
        }
        if let Some((until, _)) = &self.replay_until {
            if self.last_seq >= *until {
                let (_, state) = self.replay_until.take().expect("checked above");
                self.reconcile(&state).await;
            }
        }
        Flow::Continue
    }

    async fn on_matched(&mut self, frame: &ServerFrame<'_>, now: Instant) {
        let Some(session_id) = frame.session_id else {
            self.ctx.tally().error("bad_frame");
            return;
        };
        let key = wire::session_key(session_id);
        let wait = match self.state {
            State::Waiting {
                since,
                timed_out: false,
                ..
            } => Some(now.saturating_duration_since(since)),
            _ => None,
        };
        let in_window = self.ctx.in_window(now);
        let sighted = {
            let mut tally = self.ctx.tally();
            if let State::InSession { session, .. } = self.state {
                if session != key {
                    tally.matched_while_in_session();
                }
            }
            tally.matched(self.me, key, in_window, wait)
        };
        if sighted.completed_in_window {
            if let Some(max) = self.ctx.max_matches {
                if sighted.matches_in_window >= max {
                    self.ctx.request_stop("max_matches");
                }
            }
        }
        if let State::Leaving { .. } = self.state {
            return; // the `end` already sent ends this session too
        }
        let offerer = frame.role == Some("offerer");
        let act_at =
            (offerer && self.ctx.policy != Policy::Hold).then(|| now + self.ctx.hold.sample());
        self.state = State::InSession {
            session: key,
            act_at,
        };
        if act_at.is_some_and(|at| at <= now) && self.acting() {
            self.state = State::InSession {
                session: key,
                act_at: None,
            };
            self.end_session(now).await;
        }
    }

    async fn on_session_ended(&mut self, requeued: bool, now: Instant) {
        if !requeued {
            return self.become_idle(None).await;
        }
        // The skipper's wait runs from its `skip`; the peer's from this moment.
        let (since, timed_out) = match self.state {
            State::Waiting {
                since,
                skipping: true,
                timed_out,
                ..
            } => (since, timed_out),
            _ => (now, false),
        };
        self.state = State::Waiting {
            since,
            confirmed: true,
            skipping: false,
            timed_out,
        };
    }

    async fn on_error(&mut self, frame: &ServerFrame<'_>) {
        let code = frame.code.unwrap_or("none");
        self.ctx.tally().error(format!("error:{code}"));
        let refused_request = matches!(frame.reference, Some(REF_ENQUEUE | REF_SKIP | REF_END))
            // without `ref`: a message dropped by the per-connection rate limit
            || (frame.reference.is_none() && code == "rate_limited");
        if refused_request && !self.resync_pending {
            self.retry_after = frame.retry_after_ms.map(Duration::from_millis);
            self.resync_pending = true;
            let status = self.ctx.frames.status.clone();
            self.send(status).await;
        }
    }

    /// The reply to the `status` sent after a refused request: take the gateway's word for
    /// where the user stands (events still on their way correct it).
    async fn on_status(&mut self, frame: &ServerFrame<'_>, now: Instant) {
        self.resync_pending = false;
        let retry_at = self.retry_after.take().map(|d| now + d);
        match (frame.state, self.state) {
            (Some("idle"), _) => self.become_idle(retry_at).await,
            (Some("queued"), State::Waiting { .. }) => {
                if let State::Waiting { confirmed, .. } = &mut self.state {
                    *confirmed = true;
                }
            }
            (Some("queued"), _) => {
                self.state = State::Waiting {
                    since: now,
                    confirmed: true,
                    skipping: false,
                    timed_out: false,
                }
            }
            // In a session: its `matched` is on its way, or already processed.
            _ => {}
        }
    }

    /// After a resume's replay: the `welcome` said `server` (`idle`, `queued`, `in_session`);
    /// repeat what the old connection lost, or start over where the two disagree.
    async fn reconcile(&mut self, server: &str) {
        if self.requested_since_welcome {
            // A replayed event already moved the user on (e.g. a `session_ended` after which
            // it enqueued again): the `welcome`'s state is older than the user's.
            return;
        }
        let now = Instant::now();
        match (self.state, server) {
            (
                State::Waiting {
                    confirmed: true, ..
                },
                "queued",
            )
            | (State::InSession { .. }, "in_session") => {}
            (State::Waiting { skipping: true, .. }, "in_session") => {
                let skip = self.ctx.frames.skip.clone();
                self.request(skip).await;
            }
            (
                State::Waiting {
                    confirmed: false,
                    skipping: false,
                    ..
                },
                "idle",
            ) => {
                let enqueue = self.ctx.frames.enqueue(self.pool);
                self.request(enqueue).await;
            }
            (
                State::Waiting {
                    confirmed: false, ..
                },
                "queued",
            ) => {
                if let State::Waiting { confirmed, .. } = &mut self.state {
                    *confirmed = true;
                }
            }
            (State::Leaving { .. }, "queued" | "in_session") => {
                let end = self.ctx.frames.end.clone();
                self.request(end).await;
            }
            (State::Idle { .. }, "idle") => {
                if let State::Idle { retry_at: None } = self.state {
                    self.next_step().await;
                }
            }
            (_, server) => {
                self.ctx.tally().error("state_mismatch");
                self.start_over(server, now).await;
            }
        }
    }

    /// Drops the user's own view and goes by the gateway's `server` state: a queued user
    /// waits from now on, one in a session it knows nothing of leaves it.
    async fn start_over(&mut self, server: &str, now: Instant) {
        match server {
            "idle" => self.become_idle(None).await,
            "queued" => {
                self.state = State::Waiting {
                    since: now,
                    confirmed: true,
                    skipping: false,
                    timed_out: false,
                }
            }
            _ => self.leave(now).await,
        }
    }

    async fn become_idle(&mut self, retry_at: Option<Instant>) {
        self.state = State::Idle { retry_at };
        if retry_at.is_none() {
            self.next_step().await;
        }
    }

    /// A free user's next move, by policy.
    async fn next_step(&mut self) {
        if !self.acting() {
            return;
        }
        match self.ctx.policy {
            Policy::Hold => {}
            Policy::Closed { .. } => self.enqueue(Instant::now()).await,
            Policy::Open => self.ctx.free(self.pool, self.me),
        }
    }

    async fn enqueue(&mut self, since: Instant) {
        let enqueue = self.ctx.frames.enqueue(self.pool);
        self.request(enqueue).await;
        self.state = State::Waiting {
            since,
            confirmed: false,
            skipping: false,
            timed_out: false,
        };
    }

    async fn leave(&mut self, now: Instant) {
        let end = self.ctx.frames.end.clone();
        self.request(end).await;
        self.state = State::Leaving { since: now };
    }

    /// The offerer's hold is over.
    async fn end_session(&mut self, now: Instant) {
        let skip = match self.ctx.policy {
            Policy::Closed { end_ratio } => rand::random::<f64>() >= end_ratio,
            Policy::Open | Policy::Hold => false,
        };
        if skip {
            let skip = self.ctx.frames.skip.clone();
            self.request(skip).await;
            self.state = State::Waiting {
                since: now,
                confirmed: false,
                skipping: true,
                timed_out: false,
            };
        } else {
            self.leave(now).await;
        }
    }

    /// Sends a request that changes the user's state.
    async fn request(&mut self, frame: Utf8Bytes) {
        self.requested_since_welcome = true;
        self.send(frame).await;
    }

    /// Sends a frame; a failure shows up on the read side as a lost connection.
    async fn send(&mut self, frame: Utf8Bytes) {
        if self.ws.send(Message::Text(frame)).await.is_ok() {
            self.next_heartbeat = Instant::now() + self.heartbeat_every;
        }
    }

    /// The connection ended (counted as `kind`): reconnect, unless the run is over or the
    /// user only holds a connection (`idle` measures connections that stay up).
    async fn lost(&mut self, kind: String) -> Flow {
        self.ctx.tally().error(kind);
        self.ctx.connection_lost();
        if self.ctx.policy == Policy::Hold || self.ctx.closing() {
            return Flow::Exit;
        }
        self.reconnect().await
    }

    /// Reopens the connection with `resume` (unless the gateway said the state is lost),
    /// trying the user's gateway and then the others, with backoff.
    async fn reconnect(&mut self) -> Flow {
        /// About 20 s of attempts, longer than a gateway restart.
        const ATTEMPTS: usize = 12;
        self.ctx.tally().count("reconnects");
        let (state_lost, wait) = self.reconnect_hint.take().unwrap_or((false, None));
        if let Some(wait) = wait {
            tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
        }
        let query = match (&self.resume_token, state_lost) {
            (Some(token), false) => Some(format!("resume={token}&last_seq={}", self.last_seq)),
            _ => None,
        };
        let targets = &self.ctx.targets;
        let attempt = std::sync::atomic::AtomicUsize::new(0);
        let opened = (|| async {
            let k = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let index = (self.home + k) % targets.len();
            connect::open(&targets[index], self.source, &self.token, query.as_deref())
                .await
                .map(|opened| (index, opened))
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(ATTEMPTS)
                .with_jitter(),
        )
        .sleep(tokio::time::sleep)
        .await;
        let (index, (ws, welcome)) = match opened {
            Ok(x) => x,
            Err(ConnectError(kind)) => {
                let mut tally = self.ctx.tally();
                tally.error("reconnect_failed");
                tally.error(kind);
                return Flow::Exit;
            }
        };
        self.ctx.connection_restored();
        self.home = index;
        self.ws = ws;
        self.resync_pending = false;
        self.requested_since_welcome = false;
        self.adopt(welcome, query.is_some()).await;
        Flow::Continue
    }

    /// Takes over a reconnected session's `welcome`.
    async fn adopt(&mut self, welcome: Welcome, asked_to_resume: bool) {
        self.heartbeat_every = welcome.heartbeat_interval;
        self.next_heartbeat = Instant::now() + welcome.heartbeat_interval;
        if welcome.resume_token.is_some() {
            self.resume_token = welcome.resume_token;
        }
        {
            let mut tally = self.ctx.tally();
            tally.count("reconnected");
            if welcome.resumed {
                tally.count("resumed");
            } else if asked_to_resume {
                tally.error("not_resumed");
            }
        }
        if welcome.resumed && welcome.last_seq > self.last_seq {
            self.replay_until = Some((welcome.last_seq, welcome.state));
        } else {
            if !welcome.resumed {
                // Nothing is replayed: count from the gateway's seq on.
                self.last_seq = welcome.last_seq;
            }
            if asked_to_resume {
                self.reconcile(&welcome.state).await;
            } else {
                // The gateway said the state is lost (`state_lost`): a fresh start.
                self.start_over(&welcome.state, Instant::now()).await;
            }
        }
    }

    /// The run is over: note where the user stands and close.
    async fn finish(mut self) {
        let now = Instant::now();
        let stuck = |since: Instant| now.saturating_duration_since(since) > self.ctx.match_timeout;
        {
            let mut tally = self.ctx.tally();
            let (state, pending_since) = match self.state {
                State::Idle { .. } => ("idle", None),
                State::Waiting { since, .. } => ("queued", Some(since)),
                State::InSession { .. } => ("in_session", None),
                State::Leaving { since } => ("leaving", Some(since)),
            };
            tally.end_state(state);
            if pending_since.is_some_and(stuck) {
                tally.end_state("stuck");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }
}

async fn next_command(commands: &mut Option<mpsc::Receiver<Instant>>) -> Option<Instant> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
