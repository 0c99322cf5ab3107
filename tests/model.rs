//! Model tests of the matching engines. This file: a model-based property test of every
//! engine (memory, Redis, Redis Cluster); `model/differential.rs`: the same kind of generated
//! sequences, with every rule on, run against the three engines and compared;
//! `model/broken.rs`: deliberately broken engines that the differential test must catch;
//! `model/engines.rs`: the one adapter between these tests and the engines (and the factory
//! of a run's engines, shared with `tests/interests.rs`); `model/asks.rs`: what generated users
//! ask for and carry (interests, `want`, attributes), shared with `tests/interests.rs`.
//!
//! The model test runs as one test per engine (`memory_keeps_the_model_invariants` and its
//! `redis_` and `cluster_` twins), each on the same generated sequences, the Redis engines on
//! real `redis-server` processes (one server or cluster per test run, a fresh namespace per
//! run of a case), through the adapter the differential test uses.
//!
//! proptest generates random sequences of operations by 2 to 12 users over 2 or 3 pools:
//! `attach` (a fresh, growing connection id, optionally with a resume), `enqueue`, `skip`,
//! `end`, `block` (the current or most recent peer), `detach` (the current or a stale
//! connection) and `expire` (the grace period of that connection ran out). They drive the real
//! engine through its public async API, with no sockets. The model sees every frame the engine
//! gave a user, in order: memory's through a recording bus, Redis's from its pub/sub channel
//! and, for a user away, from the user's log (what a resume replays; see `model/engines.rs`).
//! A frame without `seq` (`error`, `queue_update`) for a user away reaches nobody in either
//! engine, so the `error` that starts a cooldown is due only to a connected skipper. Every
//! user is attached once before the sequence starts.
//!
//! The reference model is the client-visible state, built only from the events the users
//! receive (`queued`, `dequeued`, `matched`, `session_ended`, `peer_status`, `queue_update`)
//! plus what the test itself did (connections, blocks): per user idle / waiting (pool, ticket
//! in order of `queued`) / in a session, whether it is connected, whom it avoids, its most
//! recent peer and its event log. Before each operation the model predicts whether it succeeds
//! (a refused one must be `InvalidState` and emit nothing) and which reasons its events carry;
//! every event must be a legal transition of the model. After every step it checks:
//!
//! 1. never a self-match: the two `matched` frames of a session go to two different users, with
//!    two different peer handles, each naming the other's handle (also as `status` reports it);
//! 2. every session id is new and reaches exactly two users, one offerer (the one who waited
//!    longer) and one answerer; both members get `session_ended` with matching reasons;
//! 3. nobody is in two sessions at once: `matched` only when waiting, `session_ended` and
//!    `peer_status` only for the current session;
//! 4. never a blocked pair: a block (of the current or most recent peer, as `recent_peer` also
//!    says) holds both ways, across either user's expiry and return, until the blocker's list
//!    of the `max_blocks` most recent blocks (generated small, or large) pushes it out;
//! 5. liveness: no two connected users wait in the same pool while eligible for each other
//!    (different users, not blocked either way, neither avoiding the other: a user who skipped
//!    or was skipped avoids that peer until it is matched with someone else); cross-checked
//!    with `status` (state, position, session, peer handle, role) of every user and `stats`;
//! 6. FIFO among equals: when two users are matched, both were waiting, connected and in the
//!    same pool, and no connected user who got in line earlier (re-queues after a skip go to
//!    the tail, timeouts leave) and was eligible for either partner is left waiting;
//! 7. `seq` grows by exactly 1 per user on every frame that has one (and restarts when an
//!    expired user's state is dropped), the `ref` of a request comes back on the first event
//!    of its actor only, `attach` reports the latest `seq`, and a resume replays exactly the
//!    frames the user got after its `last_seq` (or is refused after the log was dropped).
//!    `queue_update` frames (from `refresh_pool` on the changed pools) carry the model's
//!    position and go to connected waiting users only.
//!
//! Time is a manual clock that moves only by the grace period ([`GRACE`]) right before each
//! `expire`, as the gateway calls it when the grace period is over (Redis acts only on an
//! expiry that is due; memory trusts its gateway's timer). A run therefore stays within the
//! hour (at most [`MAX_OPS`] grace periods), and the grace period is long next to a run's real
//! time (Redis expires a held user's log after two grace periods of real time).
//!
//! Quick skips and cooldowns are modelled with every session quick and nothing expiring
//! within a run (the quick threshold, the skip window and the one cooldown are an hour): a
//! `skip`, and an `enqueue` after the user ended its session (`end`, or `block` of the current
//! peer), count as quick skips; the `skip_limit`-th (generated small, or never) starts the
//! cooldown: that skip ends the session without re-queueing the skipper and pushes an `error`
//! `cooldown`, that enqueue is refused with `Cooldown`; from then on `skip` and `enqueue` are
//! refused with `Cooldown` (before any other check but, for `enqueue`, the state).
//!
//! The policy keeps the rules that are not modelled out of the way: `anti_repeat_window` is
//! zero (anti-repeat would otherwise hold back eligible pairs and break the liveness property
//! above), enqueues are never limited, there is no accept phase, no preference relaxation (no
//! `soft` fields) and p2p media, so no timers are armed (the outcome's timers are ignored).
//! Those rules are tested end to end elsewhere: anti-repeat, cooldowns over time, the enqueue
//! rate, the accept phase and relaxation in `tests/safety.rs`, media in `tests/livekit.rs`.
//! `requeue_peer_on_skip` is generated both ways.
//!
//! `MODEL_CASES` sets the number of cases (for memory at least [`MEMORY_CASES`], its default;
//! for the Redis engines the differential test's default); `MODEL_ENGINES` picks the engines.
//!
//! A failure reports the trace of the failing run (each step with its result and events;
//! session ids shortened to S1, S2, ...) and the shortest failing sequence found by dropping
//! steps, on top of proptest's minimal input (its shrinking deletes each step only once). The
//! test writes no files (`failure_persistence: None`).

#[path = "model/asks.rs"]
mod asks;
#[path = "model/broken.rs"]
mod broken;
mod common;
#[path = "model/differential.rs"]
mod differential;
#[path = "model/engines.rs"]
mod engines;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use differential::{DEFAULT_CASES, START_MS};
use engines::{cases, wanted, Engine, EngineConfig, Servers};
use matchgate::bus::Frame;
use matchgate::clock::ManualClock;
use matchgate::matching::{ConnId, MatchError, MediaMode, Outcome, Resume, Rules, UserId};
use matchgate::p2p::IceServers;
use matchgate::protocol::{Prefs, Role, StateName};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;

const MAX_USERS: usize = 12;
const MAX_POOLS: usize = 3;
const MAX_OPS: usize = 200;
/// Cases for the memory engine, whose steps cost no round trips.
const MEMORY_CASES: u32 = 256;

/// Fails the step with a message when the condition does not hold.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// A step of a generated sequence. Users and pools are indexes (`u0`, `p0`, ...).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A new connection (ids only grow) takes over; with `resume`, presents the latest resume
    /// token the user was given and its latest `seq` minus this much.
    Attach {
        user: usize,
        resume: Option<u8>,
    },
    Enqueue {
        user: usize,
        pool: usize,
    },
    Skip {
        user: usize,
    },
    End {
        user: usize,
    },
    /// Blocks the current or most recent peer.
    Block {
        user: usize,
    },
    /// The user's current connection (or, when `stale`, an older one) goes away.
    Detach {
        user: usize,
        stale: bool,
    },
    /// The grace period after a detach of that connection ran out.
    Expire {
        user: usize,
        stale: bool,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stale = |s: bool| if s { ", stale conn" } else { "" };
        match *self {
            Op::Attach { user, resume: None } => write!(f, "attach(u{user})"),
            Op::Attach {
                user,
                resume: Some(back),
            } => write!(f, "attach(u{user}, resume from last_seq-{back})"),
            Op::Enqueue { user, pool } => write!(f, "enqueue(u{user}, p{pool})"),
            Op::Skip { user } => write!(f, "skip(u{user})"),
            Op::End { user } => write!(f, "end(u{user})"),
            Op::Block { user } => write!(f, "block(u{user})"),
            Op::Detach { user, stale: s } => write!(f, "detach(u{user}{})", stale(s)),
            Op::Expire { user, stale: s } => write!(f, "expire(u{user}{})", stale(s)),
        }
    }
}

impl Op {
    fn user(self) -> usize {
        match self {
            Op::Attach { user, .. }
            | Op::Enqueue { user, .. }
            | Op::Skip { user }
            | Op::End { user }
            | Op::Block { user }
            | Op::Detach { user, .. }
            | Op::Expire { user, .. } => user,
        }
    }

    /// Maps generated indexes onto the case's users and pools.
    fn fit(self, users: usize, pools: usize) -> Op {
        let mut op = self;
        match &mut op {
            Op::Attach { user, .. }
            | Op::Skip { user }
            | Op::End { user }
            | Op::Block { user }
            | Op::Detach { user, .. }
            | Op::Expire { user, .. } => *user %= users,
            Op::Enqueue { user, pool } => {
                *user %= users;
                *pool %= pools;
            }
        }
        op
    }

    /// The `ref` sent with client requests (echoed on the actor's first event).
    fn reference(self) -> Option<&'static str> {
        match self {
            Op::Enqueue { .. } | Op::Skip { .. } | Op::End { .. } => Some("r"),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    users: usize,
    pools: usize,
    requeue_peer_on_skip: bool,
    /// Quick skips that start the cooldown (`u32::MAX`: never).
    skip_limit: u32,
    /// Blocks kept per user.
    max_blocks: usize,
    ops: Vec<Op>,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let user = 0..MAX_USERS;
    prop_oneof![
        3 => (user.clone(), proptest::option::weighted(0.3, 0u8..4))
            .prop_map(|(user, resume)| Op::Attach { user, resume }),
        4 => (user.clone(), 0..MAX_POOLS).prop_map(|(user, pool)| Op::Enqueue { user, pool }),
        4 => user.clone().prop_map(|user| Op::Skip { user }),
        2 => user.clone().prop_map(|user| Op::End { user }),
        1 => user.clone().prop_map(|user| Op::Block { user }),
        2 => (user.clone(), proptest::bool::weighted(0.2))
            .prop_map(|(user, stale)| Op::Detach { user, stale }),
        2 => (user, proptest::bool::weighted(0.2))
            .prop_map(|(user, stale)| Op::Expire { user, stale }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        2..=MAX_USERS,
        2..=MAX_POOLS,
        any::<bool>(),
        prop_oneof![Just(u32::MAX), 2u32..6],
        prop_oneof![Just(1_000usize), 1usize..4],
        proptest::collection::vec(op_strategy(), 1..=MAX_OPS),
    )
        .prop_map(
            |(users, pools, requeue_peer_on_skip, skip_limit, max_blocks, ops)| Case {
                users,
                pools,
                requeue_peer_on_skip,
                skip_limit,
                max_blocks,
                ops: ops.into_iter().map(|op| op.fit(users, pools)).collect(),
            },
        )
}

/// The preferences of pool `p`: exact-match pools, no soft fields.
fn prefs(p: usize) -> Prefs {
    let mut prefs = Prefs::default();
    if p >= 1 {
        prefs.topic = Some("music".into());
    }
    if p >= 2 {
        prefs.language = Some("en".into());
    }
    prefs
}

fn user_id(u: usize) -> UserId {
    format!("u{u}").into()
}

/// What a user's client should believe, from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    Idle,
    Waiting { pool: usize, ticket: u64 },
    InSession { sid: String },
}

#[derive(Debug)]
struct UserModel {
    /// The engine holds state for the user (attached and not dropped by `expire`).
    exists: bool,
    conn: u64,
    old_conns: Vec<u64>,
    away: bool,
    act: Act,
    /// The pool of the user's latest queue place (where a re-queue goes).
    pool: Option<usize>,
    avoid: Option<usize>,
    /// The peer of the current or most recent session (what `block` targets).
    last_peer: Option<usize>,
    /// Bumped whenever the engine drops the user's state (and with it the event log).
    epoch: u32,
    /// The latest resume token from `attach`, and the epoch it belongs to.
    token: Option<(u32, String)>,
    last_seq: u64,
    /// Frames with a `seq` of the current epoch.
    log: Vec<(u64, String)>,
    /// Told `session_ended` with `requeued: true`; `queued` must follow in the same step.
    requeue_pending: bool,
    /// Quick skips counted towards the cooldown (conduct: outlives the user's state).
    quick: u32,
    /// In the cooldown (which outlasts the run).
    cooling: bool,
    /// Ended its session; the next `enqueue` counts as a quick skip.
    quick_end: bool,
    /// Whom it blocked, oldest first (outlives the user's state).
    blocked: VecDeque<usize>,
}

impl UserModel {
    fn new() -> Self {
        UserModel {
            exists: false,
            conn: 0,
            old_conns: Vec::new(),
            away: false,
            act: Act::Idle,
            pool: None,
            avoid: None,
            last_peer: None,
            epoch: 0,
            token: None,
            last_seq: 0,
            log: Vec::new(),
            requeue_pending: false,
            quick: 0,
            cooling: false,
            quick_end: false,
            blocked: VecDeque::new(),
        }
    }

    fn connected(&self) -> bool {
        self.exists && !self.away
    }

    fn waiting(&self) -> Option<(usize, u64)> {
        match self.act {
            Act::Waiting { pool, ticket } => Some((pool, ticket)),
            _ => None,
        }
    }

    /// Forgets what the engine dropped with the user's state (blocks stay, and so do the
    /// most recent peer, which outlives the connection state, and others' avoiding of this
    /// user).
    fn drop_state(&mut self) {
        self.exists = false;
        self.epoch += 1;
        self.last_seq = 0;
        self.log.clear();
        self.avoid = None;
        self.pool = None;
    }
}

/// A live session: members[0] offers; handles[i] is members[i]'s handle.
#[derive(Debug)]
struct Live {
    members: [usize; 2],
    handles: [String; 2],
}

/// The first of two frames that belong together (`matched` or `session_ended`).
struct Half {
    user: usize,
    v: Value,
}

struct Harness {
    /// The engine under test (the model sees every frame it gave a user, also one for a user
    /// away, which only a resume would replay).
    engine: Engine,
    /// The engines' time: it moves only when a grace period runs out.
    clock: Arc<ManualClock>,
    requeue_peer: bool,
    pools: usize,
    skip_limit: u32,
    max_blocks: usize,
    users: Vec<UserModel>,
    /// The user whose skip in this step starts a cooldown: an `error` `cooldown` is due.
    cooldown_push: Option<usize>,
    sessions: HashMap<String, Live>,
    seen_sessions: HashSet<String>,
    /// Short names for session ids in the trace.
    names: HashMap<String, usize>,
    next_ticket: u64,
    next_conn: u64,
    trace: Vec<String>,
    /// The events of the step being applied, for the trace.
    events: String,
    /// The last step was refused or had no effect (a detach or expire of a connection the
    /// engine ignores).
    noop: bool,
}

/// What the model expects of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Ok,
    InvalidState,
    Cooldown,
}

/// What the step that produced a batch of frames was.
#[derive(Clone, Copy)]
enum Cause {
    Op(Op),
    Refresh(usize),
}

/// The cooldown, the quick threshold and the skip window: longer than any run.
const HOUR: Duration = Duration::from_secs(3600);
/// The grace period after a detach, the one thing that moves the clock (by this much before
/// each `expire`). Long next to a run's real time, as Redis keeps a held user's log for two
/// grace periods of real time; short enough that a run stays within the hour.
const GRACE: Duration = Duration::from_secs(15);
const _: () = assert!(GRACE.as_secs() * (MAX_OPS as u64) < HOUR.as_secs());

fn config(case: &Case) -> EngineConfig {
    EngineConfig {
        requeue_peer_on_skip: case.requeue_peer_on_skip,
        history_len: 1000,
        history_ttl: HOUR,
        resume_grace: GRACE,
        media: MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None))),
        rules: Rules {
            // Zero: anti-repeat would hold back eligible pairs (tested in tests/safety.rs).
            anti_repeat_window: Duration::ZERO,
            anti_repeat_fallback: Duration::ZERO,
            skip_quick: HOUR,
            skip_limit: case.skip_limit,
            skip_window: HOUR,
            skip_cooldowns: vec![HOUR],
            enqueue_per_minute: u32::MAX,
            accept_timeout: None,
            decline_to_tail: false,
            relax_after: HOUR,
            interests_wait: HOUR,
            max_blocks: case.max_blocks,
            block_ttl: HOUR,
        },
    }
}

fn expect_if(ok: bool) -> Expect {
    if ok {
        Expect::Ok
    } else {
        Expect::InvalidState
    }
}

fn text(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_default().to_string()
}

impl Harness {
    fn new(case: &Case, engine: Engine, clock: Arc<ManualClock>) -> Self {
        Harness {
            engine,
            clock,
            requeue_peer: case.requeue_peer_on_skip,
            pools: case.pools,
            skip_limit: case.skip_limit,
            max_blocks: case.max_blocks,
            users: (0..case.users).map(|_| UserModel::new()).collect(),
            cooldown_push: None,
            sessions: HashMap::new(),
            seen_sessions: HashSet::new(),
            names: HashMap::new(),
            next_ticket: 0,
            next_conn: 1,
            trace: Vec::new(),
            events: String::new(),
            noop: false,
        }
    }

    /// The frames the engine gave users since the last call.
    async fn handed_out(&self) -> Vec<(UserId, Frame)> {
        let away = self
            .users
            .iter()
            .enumerate()
            .filter(|(_, m)| m.exists && m.away)
            .map(|(u, _)| user_id(u))
            .collect();
        self.engine.handed_out(&away).await
    }

    fn blocked(&self, a: usize, b: usize) -> bool {
        self.users[a].blocked.contains(&b) || self.users[b].blocked.contains(&a)
    }

    /// `u` blocks `t`: the newest of its at most `max_blocks` blocks.
    fn block(&mut self, u: usize, t: usize) {
        let list = &mut self.users[u].blocked;
        list.retain(|x| *x != t);
        list.push_back(t);
        while list.len() > self.max_blocks {
            list.pop_front();
        }
    }

    /// Counts a quick skip of `u`; true when it starts the cooldown.
    fn count_quick(&mut self, u: usize) -> bool {
        let m = &mut self.users[u];
        m.quick += 1;
        if m.quick < self.skip_limit {
            return false;
        }
        m.quick = 0;
        m.cooling = true;
        true
    }

    /// Whether `a` and `b` may be matched (both assumed waiting and connected).
    fn eligible(&self, a: usize, b: usize) -> bool {
        a != b
            && !self.blocked(a, b)
            && self.users[a].avoid != Some(b)
            && self.users[b].avoid != Some(a)
    }

    fn waiting_in(&self, pool: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.users
            .iter()
            .enumerate()
            .filter_map(move |(u, m)| match m.waiting() {
                Some((p, ticket)) if p == pool => Some((u, ticket)),
                _ => None,
            })
    }

    /// The user's queue position: how many in its pool got in line before it.
    fn position(&self, u: usize) -> Option<u64> {
        let (pool, ticket) = self.users[u].waiting()?;
        Some(self.waiting_in(pool).filter(|(_, t)| *t < ticket).count() as u64)
    }

    fn session_of(&self, u: usize) -> Option<(&String, &Live)> {
        match &self.users[u].act {
            Act::InSession { sid } => self.sessions.get_key_value(sid),
            _ => None,
        }
    }

    fn peer_of(&self, u: usize) -> Option<usize> {
        self.session_of(u)
            .map(|(_, s)| s.members[usize::from(s.members[0] == u)])
    }

    fn name(&mut self, sid: &str) -> String {
        let n = self.names.len() + 1;
        format!("S{}", self.names.entry(sid.to_string()).or_insert(n))
    }

    fn conn_for(&self, u: usize, stale: bool) -> u64 {
        let m = &self.users[u];
        if stale {
            // An older connection of the user, or one it never had.
            m.old_conns.last().copied().unwrap_or(0)
        } else {
            m.conn
        }
    }

    /// Runs one operation against the engine and the model, then checks everything.
    async fn step(&mut self, op: Op) -> Result<(), String> {
        let u = op.user();
        let id = user_id(u);
        let reference = op.reference();
        self.noop = false;
        // Predict the result and apply what the test itself changes.
        // For `expire`: whether it applies (the user is away with that connection).
        let mut expires = false;
        // Whether the operation ends the user's session by the user's choice: the next enqueue
        // is then a quick skip.
        let mut ends_session = false;
        let (expect, result): (Expect, Result<Outcome, MatchError>) = match op {
            Op::Attach { resume, .. } => return self.attach(u, resume).await,
            Op::Enqueue { pool, .. } => {
                let m = &self.users[u];
                let expect = if !m.exists || m.act != Act::Idle {
                    Expect::InvalidState
                } else if m.cooling {
                    Expect::Cooldown
                } else {
                    let ended = std::mem::take(&mut self.users[u].quick_end);
                    if ended && self.count_quick(u) {
                        Expect::Cooldown
                    } else {
                        Expect::Ok
                    }
                };
                (
                    expect,
                    self.engine
                        .mm
                        .enqueue(&id, prefs(pool), Default::default(), reference)
                        .await,
                )
            }
            Op::Skip { .. } => {
                let m = &self.users[u];
                let expect = if m.cooling {
                    Expect::Cooldown
                } else if m.exists && matches!(m.act, Act::InSession { .. }) {
                    Expect::Ok
                } else {
                    Expect::InvalidState
                };
                if expect == Expect::Ok && self.count_quick(u) {
                    self.cooldown_push = Some(u);
                }
                (expect, self.engine.mm.skip(&id, reference).await)
            }
            Op::End { .. } => {
                let m = &self.users[u];
                let ok = m.exists && m.act != Act::Idle;
                ends_session = ok && matches!(m.act, Act::InSession { .. });
                (expect_if(ok), self.engine.mm.end(&id, reference).await)
            }
            Op::Block { .. } => {
                let current = self.peer_of(u);
                let target = current.or(self.users[u].last_peer);
                let ok = self.users[u].exists && target.is_some();
                let engine = self.engine.mm.recent_peer(&id, None).await.ok();
                let engine = engine.map(|found| found.peer);
                ensure!(
                    engine == target.filter(|_| ok).map(user_id),
                    "the engine's current or most recent peer of u{u} is {engine:?}, the model's \
                     {:?}",
                    target.map(user_id)
                );
                if let (true, Some(t)) = (ok, target) {
                    self.block(u, t);
                }
                ends_session = ok && current.is_some();
                (expect_if(ok), self.engine.mm.block(&id, None).await)
            }
            Op::Detach { stale, .. } => {
                let conn = self.conn_for(u, stale);
                let m = &mut self.users[u];
                if m.exists && m.conn == conn && !m.away {
                    m.away = true;
                } else {
                    self.noop = true;
                }
                (Expect::Ok, self.engine.mm.detach(&id, ConnId(conn)).await)
            }
            Op::Expire { stale, .. } => {
                let conn = self.conn_for(u, stale);
                let m = &self.users[u];
                expires = m.exists && m.conn == conn && m.away;
                let drops = expires && m.act == Act::Idle;
                self.noop = !expires;
                // The gateway calls `expire` when the grace period is over: Redis acts only on
                // a due expiry.
                self.clock.advance(GRACE);
                let result = self.engine.mm.expire(&id, ConnId(conn)).await;
                if drops {
                    self.users[u].drop_state();
                }
                (Expect::Ok, result)
            }
        };
        let before = match &self.users[u].act {
            Act::InSession { sid } => Some(sid.clone()),
            _ => None,
        };
        let frames = self.handed_out().await;
        let summary = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        match result {
            Err(e) => {
                self.noop = true;
                self.trace.push(format!("{op:?} -> {summary}"));
                let got = match e {
                    MatchError::InvalidState(_) => Expect::InvalidState,
                    MatchError::Cooldown { .. } => Expect::Cooldown,
                    _ => Expect::Ok,
                };
                ensure!(
                    expect != Expect::Ok,
                    "refused although the model expects success: {e}"
                );
                ensure!(got == expect, "refused with {e:?}, expected {expect:?}");
                ensure!(
                    frames.is_empty(),
                    "a refused operation emitted frames: {frames:?}"
                );
            }
            Ok(outcome) => {
                let events = self.apply(Cause::Op(op), frames)?;
                self.trace.push(format!("{op:?} -> {summary}{events}"));
                // The `error` that tells of the cooldown has no `seq`: a skipper away misses it.
                if self
                    .cooldown_push
                    .is_some_and(|s| !self.users[s].connected())
                {
                    self.cooldown_push = None;
                }
                ensure!(
                    expect == Expect::Ok,
                    "succeeded although the model expects {expect:?}"
                );
                ensure!(
                    self.cooldown_push.is_none(),
                    "the skip that started a cooldown pushed no error"
                );
                self.check_actor(op, before, expires)?;
                self.refresh(&outcome).await?;
                if ends_session {
                    self.users[u].quick_end = true;
                }
            }
        }
        self.check_all().await
    }

    async fn attach(&mut self, u: usize, resume: Option<u8>) -> Result<(), String> {
        let conn = self.next_conn;
        self.next_conn += 1;
        let m = &self.users[u];
        let was_there = m.exists;
        let presented = match (resume, &m.token) {
            (Some(back), Some((epoch, token))) => Some((
                *epoch,
                Resume {
                    token: token.clone(),
                    last_seq: m.last_seq.saturating_sub(u64::from(back)),
                },
            )),
            _ => None,
        };
        let m = &mut self.users[u];
        if !m.exists {
            m.exists = true;
            m.act = Act::Idle;
        }
        if m.conn != 0 {
            m.old_conns.push(m.conn);
        }
        m.conn = conn;
        m.away = false;
        let attached = self
            .engine
            .mm
            .attach(
                &user_id(u),
                ConnId(conn),
                presented.as_ref().map(|(_, r)| r.clone()),
            )
            .await;
        let frames = self.handed_out().await;
        let op = Op::Attach { user: u, resume };
        let attached = match attached {
            Ok(a) => a,
            Err(e) => {
                self.trace.push(format!("{op:?} -> error: {e}"));
                return Err(format!("attach with a fresh connection refused: {e}"));
            }
        };
        let m = &self.users[u];
        let state = match m.act {
            Act::Idle => StateName::Idle,
            Act::Waiting { .. } => StateName::Queued,
            Act::InSession { .. } => StateName::InSession,
        };
        // `last_seq` and the replay are taken before the events of the attach itself.
        let seq_before = m.last_seq;
        let events = self.apply(Cause::Op(op), frames)?;
        self.trace.push(format!(
            "{op:?} -> ok (state {:?}, last_seq {}, resumed {}){events}",
            attached.state, attached.last_seq, attached.resumed
        ));
        ensure!(
            attached.state == state,
            "attach reports {:?}, the model says {state:?}",
            attached.state
        );
        ensure!(
            attached.last_seq == seq_before,
            "attach reports last_seq {}, the model says {seq_before}",
            attached.last_seq
        );
        let m = &self.users[u];
        if let Some((epoch, r)) = presented {
            let valid = was_there && epoch == m.epoch;
            ensure!(
                attached.resumed == valid,
                "resume with last_seq {} (token of epoch {epoch}, now {}) resumed={}, \
                 expected {valid}",
                r.last_seq,
                m.epoch,
                attached.resumed
            );
            let expected: Vec<(u64, String)> = if valid {
                m.log
                    .iter()
                    .filter(|(s, _)| *s > r.last_seq && *s <= seq_before)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            let got: Vec<(u64, String)> = attached
                .replay
                .iter()
                .map(|f| (f.seq.unwrap_or(0), f.text.to_string()))
                .collect();
            ensure!(
                got == expected,
                "replay after seq {} differs from the frames delivered:\n got {got:?}\n \
                 want {expected:?}",
                r.last_seq
            );
        } else {
            ensure!(
                !attached.resumed && attached.replay.is_empty(),
                "attach without resume replayed"
            );
        }
        let m = &mut self.users[u];
        match &m.token {
            Some((epoch, token)) if *epoch == m.epoch => ensure!(
                *token == attached.resume_token,
                "the resume token changed although the log was kept"
            ),
            Some((_, token)) => ensure!(
                *token != attached.resume_token,
                "a dropped log's resume token is still valid"
            ),
            None => {}
        }
        m.token = Some((m.epoch, attached.resume_token.clone()));
        self.refresh(&attached.outcome).await?;
        self.check_all().await
    }

    /// What the operation must have done to its actor, beyond what its events said.
    fn check_actor(&self, op: Op, before: Option<String>, expires: bool) -> Result<(), String> {
        let m = &self.users[op.user()];
        match op {
            Op::Enqueue { .. } => ensure!(m.act != Act::Idle, "enqueue left the user idle"),
            Op::Skip { .. } => {
                let old = before.unwrap_or_default();
                // The skip that starts a cooldown does not re-queue.
                ensure!(
                    !self.sessions.contains_key(&old) && (m.act != Act::Idle || m.cooling),
                    "skip did not end the session and re-queue the skipper"
                );
            }
            Op::End { .. } => ensure!(m.act == Act::Idle, "end left the user {:?}", m.act),
            Op::Block { .. } => {
                if let Some(old) = before {
                    ensure!(
                        !self.sessions.contains_key(&old) && m.act == Act::Idle,
                        "block did not end the session with the blocked peer"
                    );
                }
            }
            Op::Expire { .. } if expires => {
                ensure!(m.act == Act::Idle, "expire left the user {:?}", m.act)
            }
            _ => {}
        }
        Ok(())
    }

    /// Pushes queue updates for the pools the outcome changed, as the gateway does.
    async fn refresh(&mut self, outcome: &Outcome) -> Result<(), String> {
        let keys: Vec<String> = (0..self.pools).map(|p| prefs(p).pool_key()).collect();
        for k in &outcome.changed_pools {
            ensure!(
                keys.iter().any(|key| **k == **key),
                "changed pool {k:?} is none of ours"
            );
        }
        for p in 0..self.pools {
            let key = prefs(p).pool_key();
            if outcome.changed_pools.iter().any(|k| **k == *key) {
                self.engine
                    .mm
                    .refresh_pool(&key)
                    .await
                    .map_err(|e| format!("refresh_pool failed: {e}"))?;
                let frames = self.handed_out().await;
                let events = self.apply(Cause::Refresh(p), frames)?;
                if !events.is_empty() {
                    self.trace.push(format!("  refresh_pool(p{p}){events}"));
                }
            }
        }
        Ok(())
    }

    /// Feeds a step's frames, in delivery order, through the model; returns a summary.
    fn apply(&mut self, cause: Cause, frames: Vec<(UserId, Frame)>) -> Result<String, String> {
        self.events.clear();
        let mut half: Option<Half> = None;
        let mut seen: HashSet<usize> = HashSet::new();
        for (uid, frame) in frames {
            let u: usize = uid
                .strip_prefix('u')
                .and_then(|n| n.parse().ok())
                .filter(|u| *u < self.users.len())
                .ok_or_else(|| format!("frame for an unknown user {uid}"))?;
            let v: Value = serde_json::from_str(&frame.text)
                .map_err(|e| format!("frame is not JSON ({e}): {}", frame.text))?;
            let kind = text(&v, "type");
            let first = seen.insert(u);
            let line = self.describe(u, &kind, &v);
            self.events.push_str(&line);
            // 7: seq and ref.
            let m = &mut self.users[u];
            ensure!(
                m.exists,
                "frame for u{u}, whose state the engine dropped: {}",
                frame.text
            );
            match frame.seq {
                Some(seq) => {
                    ensure!(
                        v["seq"].as_u64() == Some(seq),
                        "frame seq {seq} but its text says {}",
                        v["seq"]
                    );
                    ensure!(
                        seq == m.last_seq + 1,
                        "u{u} got seq {seq} after {}",
                        m.last_seq
                    );
                    m.last_seq = seq;
                    m.log.push((seq, frame.text.to_string()));
                }
                None => {
                    ensure!(
                        v.get("seq").is_none() && (kind == "queue_update" || kind == "error"),
                        "a {kind} frame without seq: {}",
                        frame.text
                    );
                }
            }
            let want_ref = match cause {
                Cause::Op(op) if op.user() == u && first => op.reference(),
                _ => None,
            };
            ensure!(
                v.get("ref").and_then(Value::as_str) == want_ref,
                "u{u}'s {kind} carries ref {}, expected {want_ref:?}",
                v["ref"]
            );
            // Pairs: the second frame must follow the first directly.
            if let Some(h) = half.take() {
                let first_kind = text(&h.v, "type");
                ensure!(
                    kind == first_kind && v["session_id"] == h.v["session_id"],
                    "{first_kind} for u{} not directly followed by its partner's \
                     (got {kind} for u{u})",
                    h.user
                );
                match kind.as_str() {
                    "matched" => self.matched(cause, h, u, &v)?,
                    _ => self.ended(cause, h, u, &v)?,
                }
                continue;
            }
            match kind.as_str() {
                "matched" | "session_ended" => half = Some(Half { user: u, v }),
                "queued" => self.queued(cause, u, first, &v)?,
                "dequeued" => {
                    ensure!(
                        self.users[u].waiting().is_some(),
                        "dequeued while {:?}",
                        self.users[u].act
                    );
                    let want = match cause {
                        Cause::Op(Op::End { user }) if user == u => "end",
                        Cause::Op(Op::Expire { user, .. }) if user == u => "timeout",
                        _ => return Err(format!("u{u} dequeued by {}", cause_name(cause))),
                    };
                    ensure!(
                        v["reason"] == want,
                        "dequeued with reason {}, expected {want}",
                        v["reason"]
                    );
                    self.users[u].act = Act::Idle;
                }
                "peer_status" => {
                    let peer = self.peer_of(u);
                    let sid = self.session_of(u).map(|(s, _)| s.clone());
                    ensure!(
                        sid.is_some() && v["session_id"].as_str() == sid.as_deref(),
                        "peer_status for {} while u{u} is {:?}",
                        v["session_id"],
                        self.users[u].act
                    );
                    let want = match cause {
                        Cause::Op(Op::Detach { user, .. }) if Some(user) == peer => "reconnecting",
                        Cause::Op(Op::Attach { user, .. }) if Some(user) == peer => "connected",
                        _ => {
                            return Err(format!(
                                "peer_status {} to u{u} caused by {}",
                                v["state"],
                                cause_name(cause)
                            ))
                        }
                    };
                    ensure!(
                        v["state"] == want,
                        "peer_status {}, expected {want}",
                        v["state"]
                    );
                }
                "error" => {
                    ensure!(
                        matches!(cause, Cause::Op(Op::Skip { user }) if user == u)
                            && self.cooldown_push == Some(u)
                            && self.users[u].act == Act::Idle,
                        "error pushed to u{u} by {}: {}",
                        cause_name(cause),
                        frame.text
                    );
                    ensure!(
                        v["code"] == "cooldown" && v["retry_after_ms"] == 3_600_000,
                        "the skip that starts the cooldown pushed {}",
                        frame.text
                    );
                    self.cooldown_push = None;
                }
                "queue_update" => {
                    let Cause::Refresh(pool) = cause else {
                        return Err(format!("queue_update caused by {}", cause_name(cause)));
                    };
                    let m = &self.users[u];
                    ensure!(
                        m.connected() && m.waiting().is_some_and(|(p, _)| p == pool),
                        "queue_update of p{pool} to u{u}, which is {:?} (connected: {})",
                        m.act,
                        m.connected()
                    );
                    let want = self.position(u);
                    ensure!(
                        v["position"].as_u64() == want,
                        "queue_update tells u{u} position {}, the model says {want:?}",
                        v["position"]
                    );
                }
                _ => return Err(format!("unexpected frame for u{u}: {}", frame.text)),
            }
        }
        if let Some(h) = half {
            return Err(format!(
                "{} for u{} without its partner's",
                h.v["type"], h.user
            ));
        }
        for (u, m) in self.users.iter().enumerate() {
            ensure!(
                !m.requeue_pending,
                "u{u} was told requeued: true but got no queued"
            );
        }
        Ok(std::mem::take(&mut self.events))
    }

    fn describe(&mut self, u: usize, kind: &str, v: &Value) -> String {
        let sid = v["session_id"].as_str().map(|s| self.name(s));
        match kind {
            "queued" | "queue_update" => format!("; u{u} {kind} pos {}", v["position"]),
            "dequeued" => format!("; u{u} dequeued {}", v["reason"]),
            "matched" => format!(
                "; u{u} matched {} {}",
                sid.unwrap_or_default(),
                v["role"].as_str().unwrap_or_default()
            ),
            "session_ended" => format!(
                "; u{u} session_ended {} {} requeued {}",
                sid.unwrap_or_default(),
                v["reason"],
                v["requeued"]
            ),
            "peer_status" => format!(
                "; u{u} peer_status {} {}",
                sid.unwrap_or_default(),
                v["state"]
            ),
            _ => format!("; u{u} {kind}"),
        }
    }

    fn queued(&mut self, cause: Cause, u: usize, first: bool, v: &Value) -> Result<(), String> {
        let m = &self.users[u];
        ensure!(m.act == Act::Idle, "queued while {:?}", m.act);
        let pool = match cause {
            Cause::Op(Op::Enqueue { user, pool }) if user == u && first => pool,
            _ if m.requeue_pending => m.pool.ok_or("re-queued without a pool")?,
            _ => return Err(format!("u{u} queued by {}", cause_name(cause))),
        };
        let ahead = self.waiting_in(pool).count() as u64;
        ensure!(
            v["position"].as_u64() == Some(ahead),
            "queued at position {}, but {ahead} wait in p{pool}",
            v["position"]
        );
        let m = &mut self.users[u];
        m.act = Act::Waiting {
            pool,
            ticket: self.next_ticket,
        };
        m.pool = Some(pool);
        m.requeue_pending = false;
        self.next_ticket += 1;
        Ok(())
    }

    /// Both `matched` frames of a session: checks 1, 2, 3, 4 and 6.
    fn matched(&mut self, cause: Cause, first: Half, b: usize, v: &Value) -> Result<(), String> {
        let a = first.user;
        let sid = text(v, "session_id");
        ensure!(
            matches!(cause, Cause::Op(_)),
            "matched outside an operation"
        );
        ensure!(a != b, "self-match: u{a} matched with itself in {sid}");
        ensure!(
            self.seen_sessions.insert(sid.clone()),
            "session id {sid} used twice"
        );
        ensure!(
            first.v["role"] == "offerer" && v["role"] == "answerer",
            "roles {} and {}, expected offerer then answerer",
            first.v["role"],
            v["role"]
        );
        // Each frame names the other member's handle.
        let (handle_a, handle_b) = (text(v, "peer"), text(&first.v, "peer"));
        ensure!(
            !handle_a.is_empty() && !handle_b.is_empty() && handle_a != handle_b,
            "the handles of {sid}'s members are {handle_a:?} and {handle_b:?}"
        );
        let (ma, mb) = (&self.users[a], &self.users[b]);
        let (Some((pool, ticket_a)), Some((pool_b, ticket_b))) = (ma.waiting(), mb.waiting())
        else {
            return Err(format!(
                "matched u{a} ({:?}) with u{b} ({:?}): both must be waiting",
                ma.act, mb.act
            ));
        };
        ensure!(
            pool == pool_b,
            "matched u{a} of p{pool} with u{b} of p{pool_b}"
        );
        ensure!(
            ma.connected() && mb.connected(),
            "matched u{a} (connected: {}) with u{b} (connected: {})",
            ma.connected(),
            mb.connected()
        );
        ensure!(
            !self.blocked(a, b),
            "matched the blocked pair u{a} and u{b}"
        );
        ensure!(
            self.eligible(a, b),
            "matched u{a} (avoids {:?}) with u{b} (avoids {:?}) right after a skip",
            ma.avoid,
            mb.avoid
        );
        ensure!(
            ticket_a < ticket_b,
            "the offerer u{a} (ticket {ticket_a}) got in line after the answerer u{b} \
             (ticket {ticket_b})"
        );
        // 6: nobody eligible who got in line earlier is passed over.
        for (x, y) in [(a, b), (b, a)] {
            let tx = self.users[x].waiting().map_or(0, |(_, t)| t);
            for (z, tz) in self.waiting_in(pool) {
                ensure!(
                    z == a
                        || z == b
                        || tz >= tx
                        || !self.users[z].connected()
                        || !self.eligible(z, y),
                    "FIFO: u{y} was matched with u{x} (ticket {tx}) while u{z} (ticket {tz}), \
                     connected and eligible, waited longer in p{pool}"
                );
            }
        }
        for (me, peer) in [(a, b), (b, a)] {
            let m = &mut self.users[me];
            m.act = Act::InSession { sid: sid.clone() };
            m.avoid = None;
            m.last_peer = Some(peer);
        }
        self.sessions.insert(
            sid,
            Live {
                members: [a, b],
                handles: [handle_a, handle_b],
            },
        );
        Ok(())
    }

    /// Both `session_ended` frames of a session, the initiator's first.
    fn ended(&mut self, cause: Cause, first: Half, b: usize, v: &Value) -> Result<(), String> {
        let a = first.user;
        let sid = text(v, "session_id");
        let live = self
            .sessions
            .get(&sid)
            .ok_or_else(|| format!("session_ended for {sid}, which is not live"))?;
        ensure!(
            a != b && live.members.contains(&a) && live.members.contains(&b),
            "session_ended of {sid} to u{a} and u{b}, its members are {:?}",
            live.members
        );
        for u in [a, b] {
            ensure!(
                self.users[u].act == Act::InSession { sid: sid.clone() },
                "session_ended of {sid} to u{u}, which is {:?}",
                self.users[u].act
            );
        }
        let rq = self.requeue_peer;
        let want = match cause {
            Cause::Op(Op::Skip { user }) if user == a => {
                ("skip", self.cooldown_push != Some(a), "peer_skipped", rq)
            }
            Cause::Op(Op::End { user } | Op::Block { user }) if user == a => {
                ("end", false, "peer_ended", false)
            }
            Cause::Op(Op::Expire { user, .. }) if user == a => {
                ("timeout", false, "peer_disconnected", rq)
            }
            _ => {
                return Err(format!(
                    "session {sid} of u{a} ended by {}",
                    cause_name(cause)
                ))
            }
        };
        let got = (
            first.v["reason"].as_str().unwrap_or_default(),
            first.v["requeued"].as_bool() == Some(true),
            v["reason"].as_str().unwrap_or_default(),
            v["requeued"].as_bool() == Some(true),
        );
        ensure!(
            got == want,
            "session_ended (reason, requeued) of initiator and peer: got {got:?}, expected {want:?}"
        );
        if matches!(cause, Cause::Op(Op::Skip { .. })) {
            self.users[a].avoid = Some(b);
            self.users[b].avoid = Some(a);
        }
        self.users[a].act = Act::Idle;
        self.users[a].requeue_pending = want.1;
        self.users[b].act = Act::Idle;
        self.users[b].requeue_pending = want.3;
        self.sessions.remove(&sid);
        Ok(())
    }

    /// After every step: `status` of everyone, `stats`, and liveness (check 5).
    async fn check_all(&self) -> Result<(), String> {
        for (u, m) in self.users.iter().enumerate() {
            let status = self.engine.mm.status(&user_id(u)).await;
            if !m.exists {
                ensure!(
                    matches!(status, Err(MatchError::InvalidState(_))),
                    "status of u{u}, whose state was dropped: {status:?}"
                );
                continue;
            }
            let s = status.map_err(|e| format!("status of u{u} failed: {e}"))?;
            match &m.act {
                Act::Idle => ensure!(
                    s.state == StateName::Idle && s.position.is_none() && s.session_id.is_none(),
                    "status of u{u} is {s:?}, the model says idle"
                ),
                Act::Waiting { .. } => ensure!(
                    s.state == StateName::Queued && s.position == self.position(u),
                    "status of u{u} is {s:?}, the model says queued at {:?}",
                    self.position(u)
                ),
                Act::InSession { sid } => {
                    let live = &self.sessions[sid];
                    let i = usize::from(live.members[1] == u);
                    let role = [Role::Offerer, Role::Answerer][i];
                    ensure!(
                        s.state == StateName::InSession
                            && s.session_id.as_deref() == Some(sid.as_str())
                            && s.peer.as_deref() == Some(live.handles[1 - i].as_str())
                            && s.role == Some(role),
                        "status of u{u} is {s:?}, the model says in {sid} as {role:?} with \
                         peer handle {}",
                        live.handles[1 - i]
                    );
                }
            }
        }
        let stats = self
            .engine
            .mm
            .stats()
            .await
            .map_err(|e| format!("stats failed: {e}"))?;
        let waiting = self.users.iter().filter(|m| m.waiting().is_some()).count() as u64;
        ensure!(
            stats.queued == waiting && stats.sessions == self.sessions.len() as u64,
            "stats {stats:?}, the model has {waiting} waiting and {} sessions",
            self.sessions.len()
        );
        // 5: no two connected, mutually eligible users wait in the same pool.
        for p in 0..self.pools {
            let ready: Vec<usize> = self
                .waiting_in(p)
                .map(|(u, _)| u)
                .filter(|u| self.users[*u].connected())
                .collect();
            for (i, &x) in ready.iter().enumerate() {
                for &y in &ready[i + 1..] {
                    ensure!(
                        !self.eligible(x, y),
                        "liveness: u{x} and u{y} both wait in p{p}, connected and eligible \
                         (avoid: {:?}, {:?})",
                        self.users[x].avoid,
                        self.users[y].avoid
                    );
                }
            }
        }
        Ok(())
    }
}

fn cause_name(cause: Cause) -> String {
    match cause {
        Cause::Op(op) => format!("{op:?}"),
        Cause::Refresh(p) => format!("refresh_pool(p{p})"),
    }
}

/// A failed run: the message, the trace so far, and the steps that had an effect (refused and
/// no-op steps left out) up to and including the failing one.
struct Failure {
    message: String,
    effective: Vec<Op>,
}

/// The engine the model checks, and what it takes to make a fresh one for each run.
struct Subject {
    rt: tokio::runtime::Runtime,
    /// The memory engine (else the one Redis target of `servers`).
    memory: bool,
    servers: Servers,
    /// Runs so far: each Redis run gets a namespace of its own.
    runs: AtomicU64,
}

impl Subject {
    /// Starts the servers `name` (`memory`, `redis` or `cluster`) needs.
    fn new(name: &'static str) -> Subject {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let servers = rt.block_on(Servers::for_engine(name));
        Subject {
            rt,
            memory: name == "memory",
            servers,
            runs: AtomicU64::new(0),
        }
    }

    /// A fresh engine for a run, on a clock of its own.
    async fn engine(&self, case: &Case, clock: &Arc<ManualClock>) -> Engine {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let mut engines = self
            .servers
            .engines(self.memory, &format!("model{n}"), &config(case), clock)
            .await;
        engines.pop().expect("the subject's engine")
    }
}

/// Runs a case (after attaching every user once).
fn run_once(subject: &Subject, case: &Case) -> Result<(), Failure> {
    subject.rt.block_on(async {
        let clock = Arc::new(ManualClock::new(START_MS));
        let engine = subject.engine(case, &clock).await;
        let mut h = Harness::new(case, engine, clock);
        let setup = (0..case.users).map(|user| Op::Attach { user, resume: None });
        let mut effective = Vec::new();
        for (i, op) in setup.chain(case.ops.iter().copied()).enumerate() {
            let result = h.step(op).await;
            if i >= case.users && (result.is_err() || !h.noop) {
                effective.push(op);
            }
            if let Err(e) = result {
                let step = i
                    .checked_sub(case.users)
                    .map_or("setup".into(), |n| format!("#{n}"));
                if !h.events.is_empty() {
                    // The step failed while its events were applied: show those seen so far.
                    h.trace.push(format!("{op:?} -> ...{}", h.events));
                }
                let message = format!(
                    "step {step} {op:?}: {e}\n\nusers: {}, requeue_peer_on_skip: {}\ntrace (after \
                     attaching every user):\n  {}",
                    case.users,
                    case.requeue_peer_on_skip,
                    h.trace[case.users.min(h.trace.len())..].join("\n  "),
                );
                return Err(Failure { message, effective });
            }
        }
        Ok(())
    })
}

/// Runs a case; on failure, also looks for a shorter sequence that fails too (refused and
/// no-op steps dropped, then single steps left out while it still fails), which is what the
/// message shows: proptest's own shrinking deletes each step only once.
fn run(subject: &Subject, case: &Case) -> Result<(), String> {
    let Err(mut failure) = run_once(subject, case) else {
        return Ok(());
    };
    let mut best = case.clone();
    let with = |ops: Vec<Op>| Case {
        ops,
        ..case.clone()
    };
    if failure.effective.len() < best.ops.len() {
        if let Err(f) = run_once(subject, &with(failure.effective.clone())) {
            best = with(failure.effective.clone());
            failure = f;
        }
    }
    // Greedy deletion is quadratic: only for short sequences.
    let mut changed = best.ops.len() <= 30;
    while changed {
        changed = false;
        let mut i = 0;
        while i < best.ops.len() {
            let mut ops = best.ops.clone();
            ops.remove(i);
            match run_once(subject, &with(ops.clone())) {
                Err(f) => {
                    best = with(ops);
                    failure = f;
                    changed = true;
                }
                Ok(()) => i += 1,
            }
        }
    }
    Err(format!(
        "{}\n\nshortest failing sequence found: {:?}",
        failure.message, best.ops
    ))
}

/// Checks the model against engine `name` (unless `MODEL_ENGINES` leaves it out) on
/// `MODEL_CASES` generated cases (memory, whose steps cost no round trips, on at least
/// [`MEMORY_CASES`]).
fn check(name: &'static str) {
    if !wanted(name) {
        eprintln!("{name} left out by MODEL_ENGINES");
        return;
    }
    let cases = match name {
        "memory" => cases(DEFAULT_CASES).max(MEMORY_CASES),
        _ => cases(DEFAULT_CASES),
    };
    let subject = Subject::new(name);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case_strategy(), |case| {
        run(&subject, &case).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))
    });
    // Stopped before the panic, so that a failure shows the model's message, not the logs.
    drop(subject);
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn memory_keeps_the_model_invariants() {
    check("memory");
}

#[test]
fn redis_keeps_the_model_invariants() {
    check("redis");
}

#[test]
fn cluster_keeps_the_model_invariants() {
    check("cluster");
}
