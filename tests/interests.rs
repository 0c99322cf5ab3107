//! Property tests of issue 12's matching filters over every engine (memory, Redis, Redis
//! Cluster; one test per engine, each engine built by the model tests' factory in
//! `model/engines.rs`): interests, `interests_only`, `want` constraints against the token's
//! attributes, and the interests wait.
//!
//! proptest generates sequences by 2 to 8 users in one pool (the default preferences): each
//! user has fixed attributes (country, gender; see `model/asks.rs`), and the operations are
//! `enqueue` with interests (0 to 3 of 4 tags), `interests_only` now and then and `want`
//! constraints now and then, `end`, `detach`, `attach` (a new connection) and clock advances
//! that cross the interests wait. The test plays the gateway: it arms the timers the outcomes
//! ask for and fires them (`wake`) at their due time while it advances its manual clock.
//!
//! The client-visible state comes from the frames each user got (`handed_out`: also those a
//! user away gets only in a resume), and from what the test did (connections, each user's
//! latest enqueue, the timers it fired). A user is *open* when it asked for no interests, or
//! its queue place was widened: the test fired the `Timer::Interests` armed with that place
//! (by the enqueue that made it) while the user waited there, not `interests_only` (timers
//! due at the same moment fire one by one, in arming order, so the flag is set by the firing,
//! not read off the clock). Two users are *compatible* when each one's `want` holds for the
//! other's attributes and they share an interest or both are open. After every step:
//!
//! (a) every pair (the two `matched` of a session) is compatible at that moment: never a pair
//!     whose wants fail either way, never two not-yet-widened users sharing no interest; both
//!     `matched` carry the same `common_interests`, the sorted intersection of their interests;
//! (b) the pair is the step's actor (the user who enqueued, attached, or whose timer fired)
//!     and the oldest waiting connected user compatible with it: nobody compatible waited longer;
//! (c) no two waiting connected users are compatible (also between timers due at the same
//!     moment: nobody with a compatible partner waits past the interests wait);
//!
//! and a `queue_update` with `interests_widened` reaches exactly the connected user whose
//! place the step widened. Named examples run first on each engine.
//!
//! The rules these properties do not model are kept out of the way as in `tests/model.rs`
//! (no anti-repeat, no cooldowns, no enqueue limit, no accept phase, no relaxation: `soft`
//! `want.<attr>` is the differential test's, p2p media); the grace period outlasts a run, so
//! nobody expires. `MODEL_CASES`, `MODEL_ENGINES` and `MODEL_TRACE` work as in the model
//! tests. No timing is asserted: time is the test's clock.

#[path = "model/asks.rs"]
mod asks;
mod common;
#[allow(dead_code)] // the model tests use more of the adapter
#[path = "model/engines.rs"]
mod engines;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use asks::{ask_strategy, common, traits_strategy, Ask, Traits};
use engines::{cases, wanted, Engine, EngineConfig, Servers};
use matchgate::attributes::{want_holds, Attributes};
use matchgate::clock::{Clock, ManualClock};
use matchgate::matching::{ConnId, MatchError, MediaMode, Outcome, Rules, Timer, UserId};
use matchgate::p2p::IceServers;
use matchgate::protocol::Prefs;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;

const MAX_USERS: usize = 8;
const MAX_OPS: usize = 60;
/// Cases per engine unless `MODEL_CASES` says otherwise.
const DEFAULT_CASES: u32 = 64;
const WAIT: Duration = Duration::from_secs(10);
const HOUR: Duration = Duration::from_secs(3600);
const START_MS: u64 = 1_700_000_000_000;
/// The longest advance: a run stays well within the grace period.
const MAX_ADVANCE_MS: u64 = 16_000;
const _: () = assert!(MAX_ADVANCE_MS * (MAX_OPS as u64) < HOUR.as_secs() * 1000);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Enqueue {
        user: usize,
        ask: Ask,
    },
    End {
        user: usize,
    },
    Detach {
        user: usize,
    },
    /// A new connection takes over (no resume).
    Attach {
        user: usize,
    },
    Advance {
        ms: u64,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Enqueue { user, ask } => write!(f, "enqueue(u{user}, {ask:?})"),
            Op::End { user } => write!(f, "end(u{user})"),
            Op::Detach { user } => write!(f, "detach(u{user})"),
            Op::Attach { user } => write!(f, "attach(u{user})"),
            Op::Advance { ms } => write!(f, "advance({ms} ms)"),
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    traits: Vec<Traits>,
    ops: Vec<Op>,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let user = 0..MAX_USERS;
    // No `soft`: relaxation is the differential test's (here a want holds for a whole wait).
    let ask = ask_strategy().prop_map(|ask| Ask {
        soft_want: false,
        ..ask
    });
    prop_oneof![
        6 => (user.clone(), ask).prop_map(|(user, ask)| Op::Enqueue { user, ask }),
        3 => user.clone().prop_map(|user| Op::End { user }),
        1 => user.clone().prop_map(|user| Op::Detach { user }),
        1 => user.prop_map(|user| Op::Attach { user }),
        3 => prop_oneof![Just(1_000u64), Just(4_000), Just(9_000), Just(10_000), Just(MAX_ADVANCE_MS)]
            .prop_map(|ms| Op::Advance { ms }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(traits_strategy(), 2..=MAX_USERS),
        proptest::collection::vec(op_strategy(), 1..=MAX_OPS),
    )
        .prop_map(|(traits, ops)| {
            let n = traits.len();
            let ops = ops
                .into_iter()
                .map(|op| match op {
                    Op::Enqueue { user, ask } => Op::Enqueue {
                        user: user % n,
                        ask,
                    },
                    Op::End { user } => Op::End { user: user % n },
                    Op::Detach { user } => Op::Detach { user: user % n },
                    Op::Attach { user } => Op::Attach { user: user % n },
                    Op::Advance { .. } => op,
                })
                .collect();
            Case { traits, ops }
        })
}

fn config() -> EngineConfig {
    EngineConfig {
        requeue_peer_on_skip: false,
        history_len: 1000,
        history_ttl: HOUR,
        resume_grace: HOUR,
        media: MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None))),
        rules: Rules {
            // Zero: anti-repeat would hold back compatible pairs (tested in tests/safety.rs).
            anti_repeat_window: Duration::ZERO,
            anti_repeat_fallback: Duration::ZERO,
            skip_quick: HOUR,
            // An enqueue after `end` counts as a quick skip: never a cooldown here.
            skip_limit: u32::MAX,
            skip_window: HOUR,
            skip_cooldowns: vec![HOUR],
            enqueue_per_minute: u32::MAX,
            accept_timeout: None,
            decline_to_tail: false,
            relax_after: HOUR,
            interests_wait: WAIT,
            max_blocks: 1000,
            block_ttl: HOUR,
        },
    }
}

fn user_id(u: usize) -> UserId {
    format!("u{u}").into()
}

/// A user's place in line: the order of its `queued` among all, and whether the interests
/// wait of this place ended (its timer fired while the user waited here).
#[derive(Clone, Copy, Debug)]
struct Place {
    order: u64,
    widened: bool,
}

#[derive(Default)]
struct User {
    connected: bool,
    conn: u64,
    /// What the user's latest accepted `enqueue` asked for (a re-queue keeps it).
    ask: Ask,
    waiting: Option<Place>,
    /// The ticket of the interests timer armed with the user's latest queue place.
    interests_ticket: Option<u64>,
}

/// A waiting user as the compatibility rule sees it.
#[derive(Clone, Copy)]
struct Waiter<'a> {
    ask: Ask,
    place: Place,
    attributes: &'a Attributes,
}

impl Waiter<'_> {
    fn open(&self) -> bool {
        self.ask.tags == 0 || self.place.widened
    }
}

fn compatible(a: Waiter, b: Waiter) -> bool {
    want_holds(&a.ask.want(), b.attributes)
        && want_holds(&b.ask.want(), a.attributes)
        && (a.ask.tags & b.ask.tags != 0 || (a.open() && b.open()))
}

/// One engine driven as its gateway would, with the client-visible state of each user.
struct World {
    engine: Engine,
    clock: Arc<ManualClock>,
    attributes: Vec<Attributes>,
    users: Vec<User>,
    next_conn: u64,
    queued: u64,
    /// Armed timers: (due unix ms, arming order, user, timer).
    timers: Vec<(u64, u64, usize, Timer)>,
    armed: u64,
    trace: Vec<String>,
}

/// What one matched member said: user, `common_interests`, and its place before the match.
type Member = (usize, Value, Place);

impl World {
    /// A fresh engine of `servers` (memory when `memory`), every user attached once.
    async fn new(
        servers: &Servers,
        memory: bool,
        namespace: &str,
        traits: &[Traits],
    ) -> Result<World, String> {
        let clock = Arc::new(ManualClock::new(START_MS));
        let mut engines = servers.engines(memory, namespace, &config(), &clock).await;
        let mut w = World {
            engine: engines.pop().expect("the engine under test"),
            clock,
            attributes: traits.iter().map(|t| t.attributes()).collect(),
            users: traits.iter().map(|_| User::default()).collect(),
            next_conn: 1,
            queued: 0,
            timers: Vec::new(),
            armed: 0,
            trace: Vec::new(),
        };
        for user in 0..traits.len() {
            w.step(Op::Attach { user }).await?;
        }
        Ok(w)
    }

    fn now(&self) -> u64 {
        self.clock.unix_ms()
    }

    /// Performs `op` and checks every property; returns the frames it produced, per user in
    /// order (across the timers an advance fired).
    async fn step(&mut self, op: Op) -> Result<Vec<(usize, Value)>, String> {
        let mm = self.engine.mm.clone();
        let desc = format!("{op:?}");
        match op {
            Op::Enqueue { user, ask } => {
                let prefs = ask.apply(Prefs::default());
                let attributes = Arc::new(self.attributes[user].clone());
                let r = mm.enqueue(&user_id(user), prefs, attributes, None).await;
                if r.is_ok() {
                    // A new queue place: its interests timer (if any) comes with the outcome.
                    self.users[user].ask = ask;
                    self.users[user].interests_ticket = None;
                }
                self.settle(Some(user), desc, r).await
            }
            Op::End { user } => {
                let r = mm.end(&user_id(user), None).await;
                self.settle(None, desc, r).await
            }
            Op::Detach { user } => {
                let u = &mut self.users[user];
                if !u.connected {
                    return Ok(Vec::new());
                }
                u.connected = false;
                let r = mm.detach(&user_id(user), ConnId(u.conn)).await;
                self.settle(None, desc, r).await
            }
            Op::Attach { user } => {
                let conn = self.next_conn;
                self.next_conn += 1;
                self.users[user].connected = true;
                self.users[user].conn = conn;
                let r = mm.attach(&user_id(user), ConnId(conn), None).await;
                self.settle(Some(user), desc, r.map(|a| a.outcome)).await
            }
            Op::Advance { ms } => {
                let target = self.now() + ms;
                let mut frames = Vec::new();
                while let Some(i) = self.next_due(target) {
                    let (at, _, user, timer) = self.timers.remove(i);
                    self.clock.advance(Duration::from_millis(at - self.now()));
                    let desc = format!("fire {timer:?} of u{user}");
                    // The step widens the user's place if the timer is that place's and the
                    // user may widen (before its search, in the same step).
                    let u = &mut self.users[user];
                    let widens = match (&timer, &mut u.waiting) {
                        (Timer::Interests { ticket }, Some(place)) => {
                            let mine = u.interests_ticket == Some(*ticket);
                            let widens = mine && !place.widened && !u.ask.only && u.ask.tags != 0;
                            place.widened |= widens;
                            widens
                        }
                        _ => false,
                    };
                    let r = mm.wake(&user_id(user), timer).await;
                    let fired = self.settle(Some(user), desc, r).await?;
                    let told = fired.iter().any(|(u, v)| {
                        *u == user && v.get("interests_widened") == Some(&Value::Bool(true))
                    });
                    if told != (widens && self.users[user].connected) {
                        let m = format!("u{user} widened: {widens}, told so: {told}");
                        return Err(self.fail(String::new(), m));
                    }
                    frames.extend(fired);
                }
                self.clock
                    .advance(Duration::from_millis(target - self.now()));
                self.trace
                    .push(format!("@{} {desc}", self.now() - START_MS));
                self.check_waiting()?;
                Ok(frames)
            }
        }
    }

    /// The earliest armed timer due by `by` (in arming order among equals).
    fn next_due(&self, by: u64) -> Option<usize> {
        let due = self.timers.iter().enumerate().filter(|(_, t)| t.0 <= by);
        due.min_by_key(|(_, t)| (t.0, t.1)).map(|(i, _)| i)
    }

    fn waiter(&self, u: usize) -> Option<Waiter<'_>> {
        let user = &self.users[u];
        Some(Waiter {
            ask: user.ask,
            place: user.waiting?,
            attributes: &self.attributes[u],
        })
    }

    /// Takes in what an operation did (its timers, the frames) and checks (a), (b) and (c).
    async fn settle(
        &mut self,
        actor: Option<usize>,
        desc: String,
        result: Result<Outcome, MatchError>,
    ) -> Result<Vec<(usize, Value)>, String> {
        let now = self.now();
        let before: Vec<Option<Place>> = self.users.iter().map(|u| u.waiting).collect();
        let result_text = match result {
            Ok(outcome) => {
                for (delay, user, timer) in outcome.timers {
                    let u: usize = user[1..].parse().expect("a test user");
                    if let Timer::Interests { ticket } = timer {
                        self.users[u].interests_ticket = Some(ticket);
                    }
                    let at = now + delay.as_millis() as u64;
                    self.timers.push((at, self.armed, u, timer));
                    self.armed += 1;
                }
                "ok".to_string()
            }
            Err(e) => e.code().as_str().to_string(),
        };
        let away = (0..self.users.len())
            .filter(|&u| !self.users[u].connected)
            .map(user_id)
            .collect();
        let mut frames = Vec::new();
        let mut sessions: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        let mut line = format!("@{} {desc} -> {result_text}", now - START_MS);
        for (user, frame) in self.engine.handed_out(&away).await {
            let u: usize = user[1..].parse().expect("a test user");
            let v: Value = serde_json::from_str(&frame.text).expect("a JSON frame");
            let kind = v["type"].as_str().unwrap_or("?").to_string();
            line.push_str(&format!("; u{u} {kind}"));
            match kind.as_str() {
                "queued" => {
                    self.users[u].waiting = Some(Place {
                        order: self.queued,
                        widened: false,
                    });
                    self.queued += 1;
                }
                "dequeued" => self.users[u].waiting = None,
                "matched" => {
                    let Some(place) = self.users[u].waiting.take() else {
                        return Err(self.fail(line, format!("u{u} matched while not waiting")));
                    };
                    line.push_str(&format!(" common {}", v["common_interests"]));
                    let sid = v["session_id"].as_str().unwrap_or_default().to_string();
                    let member = (u, v["common_interests"].clone(), place);
                    sessions.entry(sid).or_default().push(member);
                }
                "queue_update" if v.get("interests_widened").is_some() => {
                    line.push_str(" widened");
                    // Whether it is the step's widening is checked where timers fire.
                    if v["interests_widened"] != Value::Bool(true) {
                        return Err(self.fail(line, format!("u{u} got {v}")));
                    }
                }
                _ => {}
            }
            frames.push((u, v));
        }
        self.trace.push(line.clone());
        for members in sessions.values() {
            if let Err(m) = self.check_pair(actor, members, &before) {
                return Err(self.fail(String::new(), m));
            }
        }
        self.check_waiting()?;
        Ok(frames)
    }

    /// (a) and (b) for one session.
    fn check_pair(
        &self,
        actor: Option<usize>,
        members: &[Member],
        before: &[Option<Place>],
    ) -> Result<(), String> {
        let [(x, cx, px), (y, cy, py)] = members else {
            return Err(format!("a session reached {} users", members.len()));
        };
        let waiter = |u: usize, place: Place| Waiter {
            ask: self.users[u].ask,
            place,
            attributes: &self.attributes[u],
        };
        let (wx, wy) = (waiter(*x, *px), waiter(*y, *py));
        let expected = common(&wx.ask.interests(), &wy.ask.interests());
        if *cx != *cy || *cx != serde_json::json!(expected) {
            return Err(format!(
                "u{x} and u{y} share {expected:?}, their matched say {cx} and {cy}"
            ));
        }
        if !compatible(wx, wy) {
            return Err(format!(
                "u{x} ({:?}, {:?}) and u{y} ({:?}, {:?}) were matched but are not compatible",
                wx.ask, wx.attributes, wy.ask, wy.attributes
            ));
        }
        let (a, wa, c, pc) = match actor {
            Some(a) if a == *x => (a, wx, *y, *py),
            Some(a) if a == *y => (a, wy, *x, *px),
            _ => {
                return Err(format!(
                    "u{x} and u{y} were matched, not by the step's actor"
                ))
            }
        };
        for (w, place) in before.iter().enumerate() {
            let Some(place) = *place else { continue };
            if w == a || w == c || !self.users[w].connected || place.order > pc.order {
                continue;
            }
            if compatible(wa, waiter(w, place)) {
                return Err(format!(
                    "u{a} was matched with u{c}, but u{w} waited longer and is compatible with u{a}"
                ));
            }
        }
        Ok(())
    }

    /// (c): no two waiting connected users are compatible.
    fn check_waiting(&self) -> Result<(), String> {
        let waiting: Vec<(usize, Waiter)> = (0..self.users.len())
            .filter(|&u| self.users[u].connected)
            .filter_map(|u| Some((u, self.waiter(u)?)))
            .collect();
        for (i, (x, wx)) in waiting.iter().enumerate() {
            for (y, wy) in &waiting[i + 1..] {
                if compatible(*wx, *wy) {
                    let m = format!("u{x} and u{y} both wait, connected and compatible");
                    return Err(self.fail(String::new(), m));
                }
            }
        }
        Ok(())
    }

    fn fail(&self, line: String, message: String) -> String {
        let mut trace = self.trace.join("\n  ");
        if !line.is_empty() && self.trace.last() != Some(&line) {
            trace.push_str(&format!("\n  {line}"));
        }
        let traits: Vec<_> = self.attributes.iter().enumerate().collect();
        format!(
            "{}: {message}\nattributes: {traits:?}\ntrace:\n  {trace}",
            self.engine.name
        )
    }
}

/// The frames of `user` of type `kind`.
fn of<'a>(frames: &'a [(usize, Value)], user: usize, kind: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|(u, v)| *u == user && v["type"] == kind)
        .map(|(_, v)| v)
        .collect()
}

fn country(c: u8) -> Traits {
    Traits {
        country: c,
        gender: 0,
    }
}

/// Named examples: (name, users' attributes, the steps, what their frames must show).
type Example = (
    &'static str,
    Vec<Traits>,
    Vec<Op>,
    fn(&[(usize, Value)]) -> Result<(), String>,
);

fn examples() -> Vec<Example> {
    let enqueue = |user, ask| Op::Enqueue { user, ask };
    vec![
        (
            "common_interests is the sorted intersection, the same in both matched",
            vec![Traits::default(); 2],
            vec![
                enqueue(0, Ask::tags(&["music", "chess", "art"])),
                enqueue(1, Ask::tags(&["music", "chess"])),
            ],
            |frames| {
                let shared: Vec<&Value> = [0, 1]
                    .iter()
                    .flat_map(|u| of(frames, *u, "matched"))
                    .map(|m| &m["common_interests"])
                    .collect();
                let want = serde_json::json!(["chess", "music"]);
                (shared == [&want, &want])
                    .then_some(())
                    .ok_or(format!("common_interests: {shared:?}"))
            },
        ),
        (
            "interests_only never widens; a sharer still finds it",
            vec![Traits::default(); 3],
            vec![
                enqueue(
                    0,
                    Ask {
                        only: true,
                        ..Ask::tags(&["dogs"])
                    },
                ),
                enqueue(1, Ask::default()),
                Op::Advance { ms: 3 * 16_000 },
                enqueue(2, Ask::tags(&["art", "dogs"])),
            ],
            |frames| {
                let widened = frames
                    .iter()
                    .filter(|(_, v)| v.get("interests_widened").is_some())
                    .count();
                let u0 = of(frames, 0, "matched");
                let ok = widened == 0
                    && of(frames, 1, "matched").is_empty()
                    && u0.len() == 1
                    && u0[0]["common_interests"] == serde_json::json!(["dogs"]);
                ok.then_some(())
                    .ok_or(format!("widened {widened}, u0 matched {u0:?}"))
            },
        ),
        (
            "after the interests wait, a user meets one who shares nothing",
            vec![Traits::default(); 2],
            vec![
                enqueue(0, Ask::tags(&["art"])),
                enqueue(1, Ask::default()),
                Op::Advance { ms: 9_000 },
                Op::Advance { ms: 1_000 },
            ],
            |frames| {
                let widened = of(frames, 0, "queue_update");
                let m = of(frames, 1, "matched");
                let ok = widened.len() == 1
                    && widened[0]["interests_widened"] == Value::Bool(true)
                    && m.len() == 1
                    && m[0]["common_interests"] == serde_json::json!([]);
                ok.then_some(())
                    .ok_or(format!("u0 queue_update {widened:?}, u1 matched {m:?}"))
            },
        ),
        (
            "a want must hold both ways",
            // u0 de, u1 at, u2 fr, u3 de.
            vec![country(1), country(2), country(3), country(1)],
            vec![
                // u0 wants fr: not u1 (at).
                enqueue(
                    0,
                    Ask {
                        want: 2,
                        ..Ask::default()
                    },
                ),
                enqueue(1, Ask::default()),
                // u3 wants de|at: u0 fits it, but u0's want fails on u3; u1 fits both ways.
                enqueue(
                    3,
                    Ask {
                        want: 1,
                        ..Ask::default()
                    },
                ),
                // u2 (fr) wants de|at: u0 (de) fits it, and u0's want holds for u2.
                enqueue(
                    2,
                    Ask {
                        want: 1,
                        ..Ask::default()
                    },
                ),
            ],
            |frames| {
                let peers: Vec<usize> = [0, 1, 2, 3]
                    .iter()
                    .map(|u| of(frames, *u, "matched").len())
                    .collect();
                let first = frames
                    .iter()
                    .position(|(u, v)| *u == 3 && v["type"] == "matched");
                let second = frames
                    .iter()
                    .position(|(u, v)| *u == 2 && v["type"] == "matched");
                let ok = peers == [1, 1, 1, 1] && first < second;
                ok.then_some(()).ok_or(format!(
                    "matched per user: {peers:?}; expected u3-u1, then u2-u0"
                ))
            },
        ),
    ]
}

/// The engine `name` under test, with its servers and a runtime.
struct Subject {
    rt: tokio::runtime::Runtime,
    memory: bool,
    servers: Servers,
    runs: AtomicU64,
}

impl Subject {
    async fn world(&self, traits: &[Traits]) -> Result<World, String> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        World::new(&self.servers, self.memory, &format!("int{n}"), traits).await
    }

    fn run_case(&self, case: &Case) -> Result<(), String> {
        self.rt.block_on(async {
            let mut w = self.world(&case.traits).await?;
            for op in &case.ops {
                w.step(*op).await?;
            }
            if std::env::var_os("MODEL_TRACE").is_some() {
                eprintln!("case passed:\n  {}", w.trace.join("\n  "));
            }
            Ok(())
        })
    }

    fn run_example(&self, example: &Example) -> Result<(), String> {
        let (name, traits, ops, expect) = example;
        self.rt.block_on(async {
            let mut w = self.world(traits).await?;
            let mut frames = Vec::new();
            for op in ops {
                frames.extend(w.step(*op).await?);
            }
            expect(&frames).map_err(|e| w.fail(String::new(), format!("{name}: {e}")))
        })
    }
}

fn check(name: &'static str) {
    if !wanted(name) {
        eprintln!("{name} left out by MODEL_ENGINES");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let servers = rt.block_on(Servers::for_engine(name));
    let subject = Subject {
        rt,
        memory: name == "memory",
        servers,
        runs: AtomicU64::new(0),
    };
    let mut result = examples().iter().try_for_each(|e| subject.run_example(e));
    if result.is_ok() {
        let mut runner = TestRunner::new(Config {
            cases: cases(DEFAULT_CASES),
            failure_persistence: None,
            ..Config::default()
        });
        result = runner
            .run(&case_strategy(), |case| {
                subject.run_case(&case).map_err(TestCaseError::fail)
            })
            .map_err(|e| e.to_string());
    }
    // Stopped before the panic, so that a failure shows the message, not the servers' logs.
    drop(subject);
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn memory_matches_by_interests_and_wants() {
    check("memory");
}

#[test]
fn redis_matches_by_interests_and_wants() {
    check("redis");
}

#[test]
fn cluster_matches_by_interests_and_wants() {
    check("cluster");
}
