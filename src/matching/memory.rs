//! The in-memory matchmaker of the embedded default.
//!
//! All state sits behind one mutex and every operation is a short critical section with no
//! `.await` inside, which makes each operation atomic and keeps events in `seq` order. Pools
//! are keyed by the exact preference set (its four fields), so an enqueue only ever looks at
//! its own pool: its cost does not depend on how many users wait elsewhere. Within a pool,
//! waiting users are ordered by an increasing ticket (FIFO); the matcher takes the first
//! eligible one: not the user, not blocked either way, not just skipped, not met within the
//! anti-repeat window (unless one of them waited past the fallback), and each one's `want`
//! holding for the other's token attributes. A user whose search widened (soft preferences)
//! is listed, with the same ticket, in the wider pools too.
//!
//! Interests split a pool further: a user with interests meets only users who share one until
//! its interests wait passes (then, unless `interests_only`, it is *open*: it meets any open
//! user too; a user without interests is open from the start). Each pool therefore indexes its
//! connected waiters per interest tag and keeps the open ones in a list of their own; a match
//! attempt walks the lists of the user's tags, and the open list only when the user is open,
//! so it never visits a user it shares nothing with and could not meet anyway.
//!
//! Waiting users whose connection dropped keep their ticket but are listed apart (see
//! [`Pool`]), so the matcher never visits them: a match attempt walks only connected waiters
//! it could meet, and among those only the ones the user blocked or was blocked by, avoids,
//! met recently, or whose `want` and its own do not fit (see [`State::try_match`]) before it
//! finds a partner.
//!
//! Where the behaviour spec of interests and `want` (issue 12) leaves a choice, this engine
//! (and the Redis library with it) does this:
//! - `matched.common_interests` is the set intersection: sorted by bytes, each tag once.
//! - The timers of an enqueue come in this order: `Relax`, `Interests`, then whatever the
//!   first match attempt arms (`Rematch`, `Proposal`).
//! - The anti-repeat fallback is armed only for candidates that pass every other rule
//!   (interests and `want` included): a recent peer who could not be met anyway holds
//!   nobody back.
//! - A `want.<attribute>` relaxation step changes no pool (`want` is not part of the pool
//!   key), so it lists the user nowhere new; it still emits its `queue_update` with
//!   `widened_to` and re-arms `Relax` like any other step.
//! - The `Interests` timer of a queue place that is already open (widened, or no interests)
//!   or `interests_only` is a no-op; a paired user's is re-armed whatever its flag.
//!
//! A pair goes through up to three phases: *proposed* (accept phase on: both must accept),
//! *pending* (media mode: the room is being made) and *live* (`matched` sent). Until live,
//! both keep their queue places, so that undoing the match puts them back where they were.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::overview::{MinuteCounts, Overview, PoolOverview};
use super::{
    Administration, Attached, ClientOperations, ConnId, MatchError, MediaEffect, MediaEvents,
    MediaLeft, MediaMode, MediaReady, Outcome, PendingSession, RecentPeer, Resume, Rules,
    SessionClosed, SessionInfo, SessionStarted, Stats, Status, Timer, Timers, UserId,
};
use crate::attributes::{want_holds, Attributes, Want};
use crate::bus::{Bus, Frame};
use crate::clock::{Clock, SystemClock};
use crate::ids::{random_id, KeyedHasher};
use crate::protocol::{
    encode_event, CancelReason, DequeueReason, EndReason, ErrorCode, Event, Media, PeerState,
    Prefs, Relay, Role, StateName,
};

/// Tunables of the matching rules and the replay log.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Whether the peer of a skipper (or of a user who timed out) goes back in the queue.
    pub requeue_peer_on_skip: bool,
    /// At most this many events are kept per user for replay.
    pub history_len: usize,
    /// Events older than this are not replayed.
    pub history_ttl: Duration,
    /// How matches get their media (LiveKit: a new session stays pending, no `matched` yet,
    /// until its room is ready).
    pub media: MediaMode,
    pub rules: Rules,
}

pub struct MemoryMatchmaker {
    state: Mutex<State>,
    bus: Arc<dyn Bus>,
    policy: Policy,
    clock: Arc<dyn Clock>,
}

impl MemoryMatchmaker {
    pub fn new(bus: Arc<dyn Bus>, policy: Policy) -> Self {
        Self::with_clock(bus, policy, Arc::new(SystemClock))
    }

    /// A matchmaker that reads every `now` from `clock` (tests drive time with a
    /// [`ManualClock`](crate::clock::ManualClock)).
    pub fn with_clock(bus: Arc<dyn Bus>, policy: Policy, clock: Arc<dyn Clock>) -> Self {
        MemoryMatchmaker {
            state: Mutex::new(State::default()),
            bus,
            policy,
            clock,
        }
    }

    /// Runs one atomic step.
    fn step<T>(
        &self,
        actor: Option<&UserId>,
        reference: Option<&str>,
        f: impl FnOnce(&mut State, &mut Step<'_>) -> Result<T, MatchError>,
    ) -> Result<(T, Outcome), MatchError> {
        let mut step = Step {
            bus: self.bus.as_ref(),
            policy: &self.policy,
            now: self.clock.now(),
            unix_ms: self.clock.unix_ms(),
            actor,
            reference,
            outcome: Outcome::default(),
        };
        // A panic inside a step would leave the state half-changed; there is no sensible
        // recovery from that, so propagating the poison is correct.
        let mut state = self.state.lock().expect("matchmaker state poisoned");
        state.prune_conduct(step.now);
        state.prune_blocks(step.now, self.policy.rules.block_ttl);
        let value = f(&mut state, &mut step)?;
        Ok((value, step.outcome))
    }
}

/// Context of one atomic step: where frames go and what the gateway must learn.
struct Step<'a> {
    bus: &'a dyn Bus,
    policy: &'a Policy,
    now: Instant,
    /// `now` in Unix milliseconds, for the times frames carry.
    unix_ms: u64,
    /// The user whose request this is: their first event is the direct reply and echoes `ref`.
    actor: Option<&'a UserId>,
    reference: Option<&'a str>,
    outcome: Outcome,
}

#[derive(Default)]
struct State {
    users: HashMap<UserId, User, KeyedHasher>,
    pools: HashMap<Arc<str>, Pool, KeyedHasher>,
    sessions: HashMap<Arc<str>, Session, KeyedHasher>,
    /// Media event ids already acted on, with when they may be forgotten, oldest first.
    seen_events: HashMap<String, Instant>,
    seen_order: VecDeque<(Instant, String)>,
    /// Blocker to the users they blocked; checked both ways.
    blocks: HashMap<UserId, BlockList, KeyedHasher>,
    /// Block lists to check for expiry, soonest first: at most one entry per list.
    block_expiry: BinaryHeap<Reverse<(Instant, UserId)>>,
    /// What a user did (sessions, skips, enqueues); outlives the user's connection state.
    conduct: HashMap<UserId, Conduct, KeyedHasher>,
    /// Users who left, with when their conduct may be forgotten, oldest first.
    forget: VecDeque<(Instant, UserId)>,
    next_ticket: u64,
    queued: u64,
    /// Smoothed wait of recently matched users across all pools, in ms.
    recent_wait_ms: Option<f64>,
    /// Sessions that went live, per minute (for the admin API's stats).
    matches: MinuteCounts,
}

struct User {
    conn: ConnId,
    /// The connection dropped and the grace period runs.
    away: bool,
    activity: Activity,
    /// The peer this user just skipped or was skipped by: never matched again right away.
    avoid: Option<UserId>,
    log: Log,
}

/// A session a user had.
struct Met {
    session_id: Arc<str>,
    peer: UserId,
    at: Instant,
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// The message of the error that announces a cooldown.
pub(crate) const COOLDOWN: &str = "too many quick skips: enqueue again when the cooldown is over";

/// At most this many recent sessions are kept per user.
const RECENT_KEPT: usize = 16;

/// A user's history: kept while it can matter (see [`State::forget_later`]), however often
/// the user reconnects.
#[derive(Default)]
struct Conduct {
    /// Sessions that went live, newest last: for anti-repeat, and the default target of
    /// `block` and `report`.
    recent: VecDeque<Met>,
    /// Quick skips within the window, oldest first.
    quick_skips: VecDeque<Instant>,
    /// Cooldowns in a row so far.
    level: usize,
    cooldown_until: Option<Instant>,
    /// The current one-minute enqueue window (it starts with its first enqueue) and its count.
    enqueues: Option<(Instant, u32)>,
    /// When the user last ended a session quickly (`end`, `block`, or leaving the media room
    /// within the quick-skip threshold): an `enqueue` soon after makes it a quick skip.
    quick_end: Option<Instant>,
}

/// The users one user blocked, bounded by [`Rules::max_blocks`] (the oldest goes first), and
/// forgotten [`Rules::block_ttl`] after the user was last connected.
struct BlockList {
    /// Oldest first; a block made again moves to the end.
    order: VecDeque<UserId>,
    members: HashSet<UserId>,
    /// When the blocker last attached or left for good.
    last_seen: Instant,
    /// An entry for this list waits in [`State::block_expiry`].
    expiry_queued: bool,
}

impl BlockList {
    fn new(now: Instant) -> Self {
        BlockList {
            order: VecDeque::new(),
            members: HashSet::new(),
            last_seen: now,
            expiry_queued: false,
        }
    }

    /// Adds (or refreshes) a block, dropping the oldest beyond `max`; returns whether it
    /// dropped one.
    fn add(&mut self, user: &UserId, max: usize) -> bool {
        if !self.members.insert(user.clone()) {
            // O(max) for a repeated block, which is rare; lookups stay O(1).
            self.order.retain(|u| u != user);
        }
        self.order.push_back(user.clone());
        let mut dropped = false;
        while self.order.len() > max {
            if let Some(oldest) = self.order.pop_front() {
                self.members.remove(&oldest);
                dropped = true;
            }
        }
        dropped
    }
}

impl Conduct {
    fn cooldown_left(&self, now: Instant) -> Option<Duration> {
        self.cooldown_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// What undoing a not-yet-live match does to one member.
enum Undo {
    /// Back to its old place in the queue, told this (if anything), and matched again.
    Back(Option<Event>),
    /// Out of the queue (idle), told this.
    Out(Event),
    /// Told this, then to the tail of the queue.
    Tail(Event),
}

enum Activity {
    Idle,
    Queued(Waiting),
    /// Paired, but not live yet (proposed, or waiting for the media room); to the client
    /// still `queued`. Keeps the queue place so that undoing the match puts the user back.
    Pending {
        session_id: Arc<str>,
        waiting: Waiting,
    },
    InSession {
        session_id: Arc<str>,
        prefs: Prefs,
        /// Kept for a re-queue after the session.
        attributes: Arc<Attributes>,
    },
}

struct Waiting {
    /// The pool of the full preferences (where the position counts).
    pool: Arc<str>,
    /// Wider pools the user is also listed in, one per relaxation step so far.
    wider: Vec<Arc<str>>,
    ticket: u64,
    prefs: Prefs,
    /// The attributes from the user's token at the enqueue: what others' `want` is checked
    /// against.
    attributes: Arc<Attributes>,
    /// Relaxation steps done so far (`wider` can be shorter: a step that changes no pool
    /// lists the user nowhere new).
    level: usize,
    /// `prefs.relaxed(level).want`, kept here so that checking a candidate clones nothing.
    want: Want,
    /// The interests wait passed (and the user is not `interests_only`).
    widened: bool,
    since: Instant,
    /// Position and estimate the user was last told.
    told: (u64, Option<u64>),
    /// The anti-repeat fallback timer is armed.
    fallback_armed: bool,
}

impl Waiting {
    /// Every pool the user is listed in.
    fn pools(&self) -> impl Iterator<Item = &Arc<str>> {
        std::iter::once(&self.pool).chain(self.wider.iter())
    }

    /// Whether the user may meet users who share none of its interests (who must be open
    /// too).
    fn open(&self) -> bool {
        self.prefs.interests.is_empty() || self.widened
    }
}

/// The user's event log: what resume replays.
struct Log {
    epoch: String,
    last_seq: u64,
    entries: VecDeque<(u64, Frame, Instant)>,
}

impl Log {
    fn new() -> Self {
        Log {
            epoch: random_id("r_", 16),
            last_seq: 0,
            entries: VecDeque::new(),
        }
    }

    fn trim(&mut self, now: Instant, policy: &Policy) {
        while self.entries.len() > policy.history_len
            || self
                .entries
                .front()
                .is_some_and(|(_, _, at)| now.duration_since(*at) > policy.history_ttl)
        {
            self.entries.pop_front();
        }
    }

    /// Events after `last_seq`, or `None` when some of them are no longer kept.
    fn since(&self, last_seq: u64) -> Option<Vec<Frame>> {
        if last_seq > self.last_seq {
            return None;
        }
        if last_seq == self.last_seq {
            return Some(Vec::new());
        }
        let first_kept = self.entries.front().map(|(s, _, _)| *s)?;
        if first_kept > last_seq + 1 {
            return None;
        }
        Some(
            self.entries
                .iter()
                .filter(|(s, _, _)| *s > last_seq)
                .map(|(_, f, _)| f.clone())
                .collect(),
        )
    }
}

/// The users waiting with one preference set, by ticket: the lowest ticket waited longest.
/// Connected users and users whose connection dropped (held for a resume) are listed apart:
/// both keep their place and count in positions, but only the connected ones can be matched,
/// so a match attempt never visits the others, however many there are.
///
/// The matcher does not walk `waiting` itself but the candidate lists: one per interest tag
/// and one of the open users (see [`Waiting::open`]). Every connected waiter is in at least
/// one of them (in its tags' lists, and in the open list once open), and a user can meet
/// exactly those in its tags' lists and, when open, those in the open list: so a match
/// attempt visits nobody it shares nothing with unless both are open.
#[derive(Default)]
struct Pool {
    /// Connected waiting users: what positions and queue updates count.
    waiting: BTreeMap<u64, UserId>,
    /// Waiting users who are away (reconnecting).
    away: BTreeMap<u64, UserId>,
    /// Connected waiting users by interest tag (a tag nobody waits with has no entry).
    tags: HashMap<String, BTreeMap<u64, UserId>, KeyedHasher>,
    /// Connected waiting users who are open.
    open: BTreeMap<u64, UserId>,
    /// Smoothed wait of users recently matched from this pool, in ms.
    recent_wait_ms: Option<f64>,
}

impl Pool {
    /// Lists a waiting user, among the connected (and in its candidate lists) or the away
    /// ones.
    fn list(&mut self, w: &Waiting, id: &UserId, away: bool) {
        if away {
            self.away.insert(w.ticket, id.clone());
        } else {
            self.waiting.insert(w.ticket, id.clone());
            self.index(w, id);
        }
    }

    fn unlist(&mut self, w: &Waiting) {
        self.waiting.remove(&w.ticket);
        self.away.remove(&w.ticket);
        self.unindex(w);
    }

    /// Puts a connected user in the candidate lists it belongs in.
    fn index(&mut self, w: &Waiting, id: &UserId) {
        for tag in &w.prefs.interests {
            self.tags
                .entry(tag.clone())
                .or_default()
                .insert(w.ticket, id.clone());
        }
        if w.open() {
            self.open.insert(w.ticket, id.clone());
        }
    }

    fn unindex(&mut self, w: &Waiting) {
        for tag in &w.prefs.interests {
            if let Some(list) = self.tags.get_mut(tag) {
                list.remove(&w.ticket);
                if list.is_empty() {
                    self.tags.remove(tag);
                }
            }
        }
        self.open.remove(&w.ticket);
    }

    /// Moves a waiting user between the connected and the away ones.
    fn set_away(&mut self, w: &Waiting, away: bool) {
        if away {
            if let Some(id) = self.waiting.remove(&w.ticket) {
                self.unindex(w);
                self.away.insert(w.ticket, id);
            }
        } else if let Some(id) = self.away.remove(&w.ticket) {
            self.index(w, &id);
            self.waiting.insert(w.ticket, id);
        }
    }

    /// A connected user listed here just became open: it joins the open list.
    fn open_up(&mut self, ticket: u64) {
        if let Some(id) = self.waiting.get(&ticket) {
            self.open.insert(ticket, id.clone());
        }
    }

    /// The candidate lists a user with `w` searches: its tags' lists, and the open list when
    /// it is open itself.
    fn candidates<'a>(
        &'a self,
        w: &'a Waiting,
    ) -> impl Iterator<Item = &'a BTreeMap<u64, UserId>> + 'a {
        w.prefs
            .interests
            .iter()
            .filter_map(|tag| self.tags.get(tag))
            .chain(w.open().then_some(&self.open))
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.away.is_empty()
    }

    fn len(&self) -> u64 {
        (self.waiting.len() + self.away.len()) as u64
    }

    /// How many wait ahead of `ticket`, connected or not.
    fn ahead(&self, ticket: u64) -> u64 {
        (self.waiting.range(..ticket).count() + self.away.range(..ticket).count()) as u64
    }
}

struct Session {
    members: [Member; 2],
    created_ms: u64,
    phase: Phase,
    /// When it went live, and the same as unix ms (what `matched` said).
    live_since: Option<Instant>,
    started_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accept phase: who accepted so far.
    Proposed {
        accepted: [bool; 2],
    },
    /// Waiting for the media room.
    Pending,
    Live,
}

#[derive(Clone)]
struct Member {
    user: UserId,
    handle: Arc<str>,
}

/// At most this many media event ids are remembered for de-duplication.
const MAX_SEEN_EVENTS: usize = 100_000;

/// The message of the `media_unavailable` error.
pub(crate) const MEDIA_UNAVAILABLE: &str =
    "no media room could be set up for your match; you are back at your place in the queue";

/// Weight of a new observation in the smoothed waits.
const EWMA_ALPHA: f64 = 0.2;

fn ewma(prev: Option<f64>, sample: f64) -> f64 {
    match prev {
        Some(p) => p + EWMA_ALPHA * (sample - p),
        None => sample,
    }
}

impl State {
    fn user(&self, id: &UserId) -> Result<&User, MatchError> {
        self.users.get(id).ok_or(MatchError::InvalidState(
            "no live connection for this user".into(),
        ))
    }

    fn user_mut(&mut self, id: &UserId) -> Result<&mut User, MatchError> {
        self.users.get_mut(id).ok_or(MatchError::InvalidState(
            "no live connection for this user".into(),
        ))
    }

    /// Appends an event to the user's log (if it has a `seq`) and hands it to the bus.
    fn emit(&mut self, step: &mut Step<'_>, to: &UserId, event: Event) {
        let Some(user) = self.users.get_mut(to) else {
            return;
        };
        let reference = if step.actor == Some(to) {
            step.reference.take()
        } else {
            None
        };
        let frame = if event.has_seq() {
            user.log.last_seq += 1;
            let seq = user.log.last_seq;
            let frame = Frame {
                seq: Some(seq),
                text: encode_event(&event, Some(seq), reference),
            };
            user.log.entries.push_back((seq, frame.clone(), step.now));
            user.log.trim(step.now, step.policy);
            frame
        } else {
            Frame {
                seq: None,
                text: encode_event(&event, None, reference),
            }
        };
        step.bus.deliver(to, frame);
    }

    fn estimate(&self, pool: &Pool, position: u64) -> Option<u64> {
        let per_user = pool.recent_wait_ms.or(self.recent_wait_ms)?;
        let ms = per_user * (position + 1) as f64;
        // Round to 100 ms: finer figures only cause needless updates.
        Some(((ms / 100.0).round() as u64) * 100)
    }

    /// Puts an idle user in the queue (a new ticket: not widened, whatever an earlier queue
    /// place was), tells them, and matches them if a partner waits.
    fn queue(
        &mut self,
        step: &mut Step<'_>,
        id: &UserId,
        prefs: Prefs,
        attributes: Arc<Attributes>,
    ) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let key: Arc<str> = prefs.pool_key().into();
        let rules = &step.policy.rules;
        if !prefs.soft.is_empty() {
            step.outcome
                .timers
                .push((rules.relax_after, id.clone(), Timer::Relax { ticket }));
        }
        if !prefs.interests.is_empty() && !prefs.interests_only {
            step.outcome.timers.push((
                rules.interests_wait,
                id.clone(),
                Timer::Interests { ticket },
            ));
        }
        let mut waiting = Waiting {
            pool: key.clone(),
            wider: Vec::new(),
            ticket,
            want: prefs.want.clone(),
            prefs,
            attributes,
            level: 0,
            widened: false,
            since: step.now,
            told: (0, None),
            fallback_armed: false,
        };
        // A user re-queued while away (the peer of a skipper, say) waits among the away ones.
        let away = self.users.get(id).is_some_and(|u| u.away);
        let pool = self.pools.entry(key.clone()).or_default();
        let position = pool.len();
        pool.list(&waiting, id, away);
        let pool = &self.pools[&key];
        let estimate = self.estimate(pool, position);
        waiting.told = (position, estimate);
        self.queued += 1;
        if let Some(user) = self.users.get_mut(id) {
            user.activity = Activity::Queued(waiting);
        }
        self.emit(
            step,
            id,
            Event::Queued {
                position,
                estimated_wait_ms: estimate,
            },
        );
        self.try_match(step, id);
    }

    fn blocked(&self, a: &UserId, b: &UserId) -> bool {
        self.blocks.get(a).is_some_and(|l| l.members.contains(b))
            || self.blocks.get(b).is_some_and(|l| l.members.contains(a))
    }

    /// Whether waiting `id` may be matched with `other`: `Some(true)` yes, `Some(false)` only
    /// once the anti-repeat fallback applies, `None` never (now).
    fn eligible(&self, step: &Step<'_>, id: &UserId, other: &UserId) -> Option<bool> {
        if other == id {
            return None;
        }
        let (user, o) = (self.users.get(id)?, self.users.get(other)?);
        let (Activity::Queued(w), Activity::Queued(ow)) = (&user.activity, &o.activity) else {
            return None;
        };
        // Away users are not among the candidates at all (see `Pool`).
        if user.avoid.as_ref() == Some(other) || o.avoid.as_ref() == Some(id) {
            return None;
        }
        if self.blocked(id, other) {
            return None;
        }
        // Interests need no check here: the candidate lists hold only users this one may meet
        // by interests (see `Pool`).
        if !want_holds(&w.want, &ow.attributes) || !want_holds(&ow.want, &w.attributes) {
            return None;
        }
        let rules = &step.policy.rules;
        let met = self.conduct.get(id).is_some_and(|c| {
            c.recent.iter().any(|m| {
                &m.peer == other && step.now.duration_since(m.at) < rules.anti_repeat_window
            })
        });
        let waited_enough =
            |since: Instant| step.now.duration_since(since) >= rules.anti_repeat_fallback;
        Some(!met || waited_enough(w.since) || waited_enough(ow.since))
    }

    /// When the waiting user `other` started waiting.
    fn waiting_since(&self, other: &UserId) -> Option<Instant> {
        match &self.users.get(other)?.activity {
            Activity::Queued(w) => Some(w.since),
            _ => None,
        }
    }

    /// Matches a waiting, connected user with the longest-waiting eligible user in any of its
    /// pools. When only recently met users are there, arms the anti-repeat fallback.
    ///
    /// The walk visits connected waiters only, and only in the candidate lists the user may
    /// meet by interests (its tags' lists; the open list once it is open), each in ticket
    /// order, stopping at the first eligible one or at the best ticket found so far. The ones
    /// it passes are those the user blocked (at most [`Rules::max_blocks`]) or was blocked by,
    /// the one it avoids and those avoiding it (after skips and declines), its recent partners
    /// (at most 16), and, the one exception without a bound, users in those lists whose
    /// `want` and its own do not fit each other's attributes. Nobody else can be passed over,
    /// so the work does not grow with the number of users waiting or reconnecting, nor with
    /// those waiting in tags the user does not have.
    fn try_match(&mut self, step: &mut Step<'_>, id: &UserId) {
        let Some(user) = self.users.get(id) else {
            return;
        };
        let Activity::Queued(w) = &user.activity else {
            return;
        };
        if user.away {
            return;
        }
        let mut best: Option<(u64, UserId)> = None;
        // The earliest start of waiting among the candidates held back by anti-repeat: the
        // fallback is due when either side has waited long enough.
        let mut held_back: Option<Instant> = None;
        for key in w.pools() {
            let Some(pool) = self.pools.get(key) else {
                continue;
            };
            for list in pool.candidates(w) {
                for (ticket, other) in list {
                    if best.as_ref().is_some_and(|(t, _)| t <= ticket) {
                        break;
                    }
                    match self.eligible(step, id, other) {
                        Some(true) => {
                            best = Some((*ticket, other.clone()));
                            break;
                        }
                        Some(false) => {
                            let since = self.waiting_since(other).unwrap_or(step.now);
                            held_back = Some(held_back.map_or(since, |h| h.min(since)));
                        }
                        None => {}
                    }
                }
            }
        }
        if let Some((_, partner)) = best {
            self.start_session(step, id, &partner);
            return;
        }
        let fallback = step.policy.rules.anti_repeat_fallback;
        if let Some(other_since) = held_back.filter(|_| !w.fallback_armed) {
            let longest = step.now.duration_since(w.since.min(other_since));
            let delay = fallback.saturating_sub(longest);
            let ticket = w.ticket;
            if let Some(User {
                activity: Activity::Queued(w),
                ..
            }) = self.users.get_mut(id)
            {
                w.fallback_armed = true;
            }
            step.outcome
                .timers
                .push((delay, id.clone(), Timer::Rematch { ticket }));
        }
    }

    /// Moves a waiting user between the connected and the away lists of its pools (its
    /// connection dropped, or it came back).
    fn set_away(&mut self, id: &UserId, away: bool) {
        let Some(User {
            activity: Activity::Queued(w),
            ..
        }) = self.users.get(id)
        else {
            return;
        };
        for key in w.pools() {
            if let Some(pool) = self.pools.get_mut(key) {
                pool.set_away(w, away);
            }
        }
    }

    /// Takes a waiting user out of every pool it is listed in. The caller reports the pools
    /// as changed ([`State::pools_changed`]) once it is done with them.
    fn take_waiting(&mut self, id: &UserId) -> Option<Waiting> {
        let user = self.users.get_mut(id)?;
        let Activity::Queued(waiting) = std::mem::replace(&mut user.activity, Activity::Idle)
        else {
            return None;
        };
        for key in waiting.pools() {
            if let Some(pool) = self.pools.get_mut(key) {
                pool.unlist(&waiting);
            }
        }
        self.queued -= 1;
        Some(waiting)
    }

    fn pools_changed(&mut self, step: &mut Step<'_>, waiting: &Waiting) {
        for key in waiting.pools() {
            self.pool_changed(step, key);
        }
    }

    /// Puts a paired user back at its old place (its ticket, relaxation level and interests
    /// flag) in every pool it was listed in.
    fn restore(&mut self, step: &mut Step<'_>, id: &UserId, waiting: Waiting) {
        let away = self.users.get(id).is_some_and(|u| u.away);
        for key in waiting.pools() {
            let pool = self.pools.entry(key.clone()).or_default();
            pool.list(&waiting, id, away);
            if !step.outcome.changed_pools.contains(key) {
                step.outcome.changed_pools.push(key.clone());
            }
        }
        self.queued += 1;
        if let Some(user) = self.users.get_mut(id) {
            user.activity = Activity::Queued(waiting);
        }
    }

    /// Takes a waiting user out of the queue and tells them why.
    fn dequeue(&mut self, step: &mut Step<'_>, id: &UserId, reason: DequeueReason) {
        if let Some(w) = self.take_waiting(id) {
            self.pools_changed(step, &w);
            self.emit(step, id, Event::Dequeued { reason });
        }
    }

    /// Drops a pool that nobody waits in any more, or reports that its positions changed.
    fn pool_changed(&mut self, step: &mut Step<'_>, key: &Arc<str>) {
        match self.pools.get(key) {
            Some(pool) if pool.is_empty() => {
                self.pools.remove(key);
            }
            Some(_) if !step.outcome.changed_pools.contains(key) => {
                step.outcome.changed_pools.push(key.clone())
            }
            _ => {}
        }
    }

    /// Pairs two waiting users: a proposal (accept phase), a pending session (media) or a live
    /// one.
    fn start_session(&mut self, step: &mut Step<'_>, a: &UserId, b: &UserId) {
        let (Some(wa), Some(wb)) = (self.take_waiting(a), self.take_waiting(b)) else {
            return;
        };
        // The user who waited longer offers.
        let ((first, w_first), (second, w_second)) = if wa.ticket < wb.ticket {
            ((a, wa), (b, wb))
        } else {
            ((b, wb), (a, wa))
        };
        let session_id: Arc<str> = random_id("s_", 16).into();
        let members = [
            Member {
                user: first.clone(),
                handle: random_id("p_", 9).into(),
            },
            Member {
                user: second.clone(),
                handle: random_id("p_", 9).into(),
            },
        ];
        for w in [&w_first, &w_second] {
            let ms = step.now.duration_since(w.since).as_secs_f64() * 1000.0;
            self.recent_wait_ms = Some(ewma(self.recent_wait_ms, ms));
            if let Some(pool) = self.pools.get_mut(&w.pool) {
                pool.recent_wait_ms = Some(ewma(pool.recent_wait_ms, ms));
            }
        }
        // Only now: a pool the pair leaves empty goes, with its smoothed wait.
        self.pools_changed(step, &w_first);
        self.pools_changed(step, &w_second);
        for (member, w) in [(first, w_first), (second, w_second)] {
            if let Some(user) = self.users.get_mut(member) {
                user.activity = Activity::Pending {
                    session_id: session_id.clone(),
                    waiting: w,
                };
            }
        }
        let policy = step.policy;
        let phase = match policy.rules.accept_timeout {
            Some(_) => Phase::Proposed {
                accepted: [false; 2],
            },
            None if step.policy.media.waits_for_room() => Phase::Pending,
            None => Phase::Live,
        };
        self.sessions.insert(
            session_id.clone(),
            Session {
                members: members.clone(),
                created_ms: step.unix_ms,
                phase,
                live_since: None,
                started_at_ms: 0,
            },
        );
        match phase {
            Phase::Proposed { .. } => {
                let timeout = policy.rules.accept_timeout.unwrap_or_default();
                let expires_at_ms = step.unix_ms + timeout.as_millis() as u64;
                for i in 0..2 {
                    self.emit(
                        step,
                        &members[i].user,
                        Event::MatchProposed {
                            match_id: session_id.clone(),
                            peer: members[1 - i].handle.clone(),
                            expires_at_ms,
                        },
                    );
                }
                step.outcome.timers.push((
                    timeout,
                    first.clone(),
                    Timer::Proposal {
                        match_id: session_id,
                    },
                ));
            }
            Phase::Pending => self.await_room(step, &session_id),
            Phase::Live => self.go_live(step, &session_id, None),
        }
    }

    /// Hands a paired session to the media side: its room is made outside this step.
    fn await_room(&mut self, step: &mut Step<'_>, session_id: &Arc<str>) {
        let Some(s) = self.sessions.get_mut(session_id) else {
            return;
        };
        s.phase = Phase::Pending;
        step.outcome.pending.push(PendingSession {
            session_id: session_id.clone(),
            handles: [s.members[0].handle.clone(), s.members[1].handle.clone()],
        });
    }

    /// Turns a paired session live: both get `matched` with their media: the room's (`rooms`,
    /// LiveKit), or else the ICE servers with TURN credentials minted here (p2p).
    fn go_live(&mut self, step: &mut Step<'_>, session_id: &Arc<str>, rooms: Option<[Media; 2]>) {
        let Some(s) = self.sessions.get_mut(session_id) else {
            return;
        };
        let started_at_ms = step.unix_ms;
        let media = match (rooms, &step.policy.media) {
            (Some(rooms), _) => rooms,
            // Each member's credentials name its own handle (what its peer knows it by).
            (None, MediaMode::P2p(ice)) => {
                [0, 1].map(|i| ice.media(&s.members[i].handle, started_at_ms))
            }
            // A LiveKit session goes live with its room only (`media_ready`).
            (None, MediaMode::LiveKit { .. }) => return,
        };
        s.phase = Phase::Live;
        s.live_since = Some(step.now);
        s.started_at_ms = started_at_ms;
        let members = s.members.clone();
        let interests = members.clone().map(|m| match self.users.get(&m.user) {
            Some(User {
                activity: Activity::Pending { waiting, .. },
                ..
            }) => waiting.prefs.interests.as_slice(),
            _ => &[],
        });
        let common_interests = common_interests(interests[0], interests[1]);
        let mut pools = [None, None];
        let window = step.policy.rules.anti_repeat_window;
        for i in 0..2 {
            let Some(user) = self.users.get_mut(&members[i].user) else {
                continue;
            };
            let Activity::Pending { waiting, .. } =
                std::mem::replace(&mut user.activity, Activity::Idle)
            else {
                continue;
            };
            step.outcome
                .waits
                .push(step.now.duration_since(waiting.since));
            pools[i] = Some(waiting.pool.clone());
            // Met somebody: nobody is avoided any more.
            user.avoid = None;
            user.activity = Activity::InSession {
                session_id: session_id.clone(),
                prefs: waiting.prefs,
                attributes: waiting.attributes,
            };
            let recent = &mut self
                .conduct
                .entry(members[i].user.clone())
                .or_default()
                .recent;
            recent.push_back(Met {
                session_id: session_id.clone(),
                peer: members[1 - i].user.clone(),
                at: step.now,
            });
            while recent.len() > RECENT_KEPT
                || recent
                    .front()
                    .is_some_and(|m| step.now.duration_since(m.at) > window.max(HOUR))
            {
                recent.pop_front();
            }
        }
        self.matches.add(started_at_ms);
        if let [Some(offerer_pool), Some(answerer_pool)] = pools {
            step.outcome.started.push(SessionStarted {
                session_id: session_id.clone(),
                users: [members[0].user.clone(), members[1].user.clone()],
                pools: [offerer_pool, answerer_pool],
                started_at_ms,
            });
        }
        for ((i, role), media) in [(0, Role::Offerer), (1, Role::Answerer)]
            .into_iter()
            .zip(media)
        {
            self.emit(
                step,
                &members[i].user,
                Event::Matched {
                    session_id: session_id.clone(),
                    peer: members[1 - i].handle.clone(),
                    role,
                    started_at_ms,
                    common_interests: common_interests.clone(),
                    media,
                },
            );
        }
        // A member whose connection dropped before the match went live: the other one learns
        // it right away, as in a running session.
        for i in 0..2 {
            if self.users.get(&members[i].user).is_some_and(|u| u.away) {
                self.emit(
                    step,
                    &members[1 - i].user,
                    Event::PeerStatus {
                        session_id: session_id.clone(),
                        state: PeerState::Reconnecting,
                    },
                );
            }
        }
    }

    /// Undoes a paired session that is not live yet; `verdict` says what happens to each
    /// member (given whether it had accepted).
    fn undo_match(
        &mut self,
        step: &mut Step<'_>,
        session_id: &Arc<str>,
        verdict: impl Fn(&UserId, bool) -> Undo,
    ) {
        let Some(session) = self.sessions.remove(session_id) else {
            return;
        };
        step.outcome.ended_sessions.push(session_id.clone());
        let accepted = match session.phase {
            Phase::Proposed { accepted } => accepted,
            _ => [true; 2],
        };
        let mut back = Vec::with_capacity(2);
        for (member, accepted) in session.members.iter().zip(accepted) {
            let Some(user) = self.users.get_mut(&member.user) else {
                continue;
            };
            let Activity::Pending { waiting, .. } =
                std::mem::replace(&mut user.activity, Activity::Idle)
            else {
                continue;
            };
            match verdict(&member.user, accepted) {
                Undo::Back(notice) => {
                    self.restore(step, &member.user, waiting);
                    if let Some(event) = notice {
                        self.emit(step, &member.user, event);
                    }
                    back.push(member.user.clone());
                }
                Undo::Out(event) => self.emit(step, &member.user, event),
                Undo::Tail(event) => {
                    self.emit(step, &member.user, event);
                    self.queue(step, &member.user, waiting.prefs, waiting.attributes);
                }
            }
        }
        for id in back {
            self.try_match(step, &id);
        }
    }

    /// `id` leaves its not-yet-live match (`end`, or the grace period ran out): it is out of
    /// the queue, and the other one goes back to its place, told only if it saw a proposal
    /// (a room being made is news it never had).
    fn leave_match(
        &mut self,
        step: &mut Step<'_>,
        id: &UserId,
        session_id: &Arc<str>,
        reason: DequeueReason,
    ) {
        let proposed = step.policy.rules.accept_timeout.is_some();
        self.undo_match(step, session_id, |member, _| {
            if member == id {
                Undo::Out(Event::Dequeued { reason })
            } else {
                Undo::Back(proposed.then(|| Event::MatchCancelled {
                    match_id: session_id.clone(),
                    reason: CancelReason::PeerLeft,
                    requeued: true,
                }))
            }
        });
    }

    /// A user who declined or let a proposal lapse: idle, or the tail of the queue.
    fn refused(rules: &Rules, session_id: &Arc<str>, reason: CancelReason) -> Undo {
        let tail = rules.decline_to_tail;
        let event = Event::MatchCancelled {
            match_id: session_id.clone(),
            reason,
            requeued: tail,
        };
        if tail {
            Undo::Tail(event)
        } else {
            Undo::Out(event)
        }
    }

    /// The session `id` is in, and the peer's user id.
    fn session_of(&self, id: &UserId) -> Option<(Arc<str>, UserId)> {
        let Activity::InSession { session_id, .. } = &self.users.get(id)?.activity else {
            return None;
        };
        let session = self.sessions.get(session_id)?;
        let peer = session.members.iter().find(|m| &m.user != id)?.user.clone();
        Some((session_id.clone(), peer))
    }

    /// The peer of `id` in `session` (default: the current live session, else the most recent
    /// one).
    fn peer_in(&self, id: &UserId, session: Option<&str>) -> Option<(Arc<str>, UserId)> {
        if let Some((sid, peer)) = self.session_of(id) {
            if session.is_none_or(|s| *s == *sid) {
                return Some((sid, peer));
            }
        }
        self.conduct
            .get(id)?
            .recent
            .iter()
            .rev()
            .find(|m| session.is_none_or(|s| *s == *m.session_id))
            .map(|m| (m.session_id.clone(), m.peer.clone()))
    }

    /// Ends `id`'s session: tells both sides why, then re-queues whoever the rule says.
    /// Returns how long the session was live.
    fn end_session(
        &mut self,
        step: &mut Step<'_>,
        id: &UserId,
        (own_reason, own_requeue): (EndReason, bool),
        (peer_reason, peer_requeue): (EndReason, bool),
    ) -> Result<Duration, MatchError> {
        let (session_id, peer) = self
            .session_of(id)
            .ok_or(MatchError::InvalidState("not in a session".into()))?;
        let session = self.sessions.remove(&session_id);
        let lived = session
            .as_ref()
            .and_then(|s| s.live_since)
            .map_or(Duration::ZERO, |t| step.now.duration_since(t));
        step.outcome.ended_sessions.push(session_id.clone());
        if let Some(s) = session {
            step.outcome.closed.push(SessionClosed {
                session_id: session_id.clone(),
                users: s.members.map(|m| m.user),
                started_at_ms: s.started_at_ms,
                ended_at_ms: step.unix_ms,
                ended_by: Some(id.clone()),
                reason: own_reason,
            });
        }
        // A real conversation: whatever skipping came before is forgiven.
        if lived >= step.policy.rules.skip_quick {
            for who in [id, &peer] {
                if let Some(c) = self.conduct.get_mut(who) {
                    c.quick_skips.clear();
                    c.level = 0;
                }
            }
        }
        let mut prefs = Vec::with_capacity(2);
        for (who, reason, requeue) in [
            (id, own_reason, own_requeue),
            (&peer, peer_reason, peer_requeue),
        ] {
            if let Some(user) = self.users.get_mut(who) {
                if let Activity::InSession {
                    prefs: p,
                    attributes,
                    ..
                } = std::mem::replace(&mut user.activity, Activity::Idle)
                {
                    prefs.push((who.clone(), p, attributes, requeue));
                }
            }
            self.emit(
                step,
                who,
                Event::SessionEnded {
                    session_id: session_id.clone(),
                    reason,
                    requeued: requeue,
                },
            );
        }
        for (who, p, attributes, requeue) in prefs {
            if requeue {
                self.queue(step, &who, p, attributes);
            }
        }
        Ok(lived)
    }

    /// Ends the live session of `offerer` for both members on behalf of neither (the media
    /// server closed the room, a moderator ended it): both get `reason`, nobody is re-queued,
    /// and the record names nobody as the one who ended it.
    fn end_for_both(
        &mut self,
        step: &mut Step<'_>,
        offerer: &UserId,
        reason: EndReason,
    ) -> Result<(), MatchError> {
        self.end_session(step, offerer, (reason, false), (reason, false))?;
        if let Some(closed) = step.outcome.closed.last_mut() {
            closed.ended_by = None;
        }
        Ok(())
    }

    /// The user is gone: their conduct is forgotten once nothing in it can matter any more
    /// (the anti-repeat window, an hour for `block`/`report` defaults, a skip window after the
    /// longest cooldown), unless they are back by then.
    fn forget_later(&mut self, step: &Step<'_>, id: &UserId) {
        let r = &step.policy.rules;
        let longest = r.skip_cooldowns.iter().max().copied().unwrap_or_default();
        let keep = r.anti_repeat_window.max(HOUR).max(longest + r.skip_window);
        self.forget.push_back((step.now + keep, id.clone()));
    }

    /// Forgets the conduct of users whose time came and who did not come back.
    fn prune_conduct(&mut self, now: Instant) {
        while self.forget.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, id)) = self.forget.pop_front() {
                if !self.users.contains_key(&id) {
                    self.conduct.remove(&id);
                }
            }
        }
    }

    /// The user left for good: the blocks it made are forgotten after the block TTL unless it
    /// comes back by then. One entry per block list waits at a time.
    fn expire_blocks_later(&mut self, step: &Step<'_>, id: &UserId) {
        let Some(list) = self.blocks.get_mut(id) else {
            return;
        };
        list.last_seen = step.now;
        if list.expiry_queued {
            return;
        }
        // A TTL too long to represent never runs out.
        if let Some(at) = step.now.checked_add(step.policy.rules.block_ttl) {
            list.expiry_queued = true;
            self.block_expiry.push(Reverse((at, id.clone())));
        }
    }

    /// Drops the block lists of users who have not been seen for `ttl`; a list whose owner is
    /// here again waits for its next departure, one whose owner came and left again waits
    /// for its new due time.
    fn prune_blocks(&mut self, now: Instant, ttl: Duration) {
        while self
            .block_expiry
            .peek()
            .is_some_and(|Reverse((at, _))| *at <= now)
        {
            let Some(Reverse((_, id))) = self.block_expiry.pop() else {
                break;
            };
            let Some(list) = self.blocks.get_mut(&id) else {
                continue;
            };
            if self.users.contains_key(&id) {
                list.expiry_queued = false;
                continue;
            }
            match list.last_seen.checked_add(ttl) {
                Some(at) if at <= now => {
                    self.blocks.remove(&id);
                }
                Some(at) => self.block_expiry.push(Reverse((at, id))),
                None => list.expiry_queued = false,
            }
        }
    }

    /// Remembers that the user ended a session that lasted `lived` (by `end`, `block`, or
    /// leaving the media room), for [`State::count_quick_end`].
    fn note_quick_end(&mut self, step: &Step<'_>, id: &UserId, lived: Duration) {
        if lived < step.policy.rules.skip_quick {
            self.conduct.entry(id.clone()).or_default().quick_end = Some(step.now);
        }
    }

    /// An `enqueue` soon after the user ended a session quickly: a quick skip by another name
    /// (otherwise `end` and `enqueue` would cycle partners with no cooldown). Refuses the
    /// enqueue with the cooldown it starts, if it starts one.
    fn count_quick_end(&mut self, step: &Step<'_>, id: &UserId) -> Result<(), MatchError> {
        let quick = step.policy.rules.skip_quick;
        let ended = self.conduct.get_mut(id).and_then(|c| c.quick_end.take());
        if ended.is_none_or(|at| step.now.duration_since(at) >= quick) {
            return Ok(());
        }
        match self.count_skip(step, id, Duration::ZERO) {
            Some(cooldown) => Err(MatchError::Cooldown {
                retry_after_ms: cooldown.as_millis() as u64,
            }),
            None => Ok(()),
        }
    }

    /// Refuses `enqueue` and `skip` during a cooldown.
    fn check_cooldown(&self, step: &Step<'_>, id: &UserId) -> Result<(), MatchError> {
        match self.conduct.get(id).and_then(|c| c.cooldown_left(step.now)) {
            Some(left) => Err(MatchError::Cooldown {
                retry_after_ms: left.as_millis() as u64 + 1,
            }),
            None => Ok(()),
        }
    }

    /// Counts an enqueue against the per-user rate: a one-minute window that starts with its
    /// first enqueue.
    fn count_enqueue(&mut self, step: &Step<'_>, id: &UserId) -> Result<(), MatchError> {
        let limit = step.policy.rules.enqueue_per_minute;
        let c = self.conduct.entry(id.clone()).or_default();
        let (start, count) = match c.enqueues {
            Some((start, count)) if step.now.duration_since(start) < MINUTE => (start, count),
            _ => (step.now, 0),
        };
        if count >= limit {
            let left = MINUTE.saturating_sub(step.now.duration_since(start));
            return Err(MatchError::RateLimited {
                retry_after_ms: left.as_millis() as u64 + 1,
            });
        }
        c.enqueues = Some((start, count + 1));
        Ok(())
    }

    /// Records a skip after a session of `lived`; returns the cooldown it starts, if any.
    fn count_skip(&mut self, step: &Step<'_>, id: &UserId, lived: Duration) -> Option<Duration> {
        let rules = &step.policy.rules;
        if lived >= rules.skip_quick {
            return None;
        }
        let c = self.conduct.entry(id.clone()).or_default();
        // A skip window without a cooldown since the last one: the next one starts short again.
        if c.cooldown_until
            .is_some_and(|until| step.now >= until + rules.skip_window)
        {
            c.level = 0;
            c.cooldown_until = None;
        }
        while c
            .quick_skips
            .front()
            .is_some_and(|t| step.now.duration_since(*t) >= rules.skip_window)
        {
            c.quick_skips.pop_front();
        }
        c.quick_skips.push_back(step.now);
        if c.quick_skips.len() < rules.skip_limit as usize {
            return None;
        }
        c.quick_skips.clear();
        c.level += 1;
        let cooldown = rules.cooldown(c.level);
        c.cooldown_until = Some(step.now + cooldown);
        Some(cooldown)
    }

    /// Like after a skip, the members of a paired session are not paired again right away.
    fn keep_apart(&mut self, session_id: &str) {
        let Some(s) = self.sessions.get(session_id) else {
            return;
        };
        let [a, b] = [s.members[0].user.clone(), s.members[1].user.clone()];
        for (who, other) in [(&a, &b), (&b, &a)] {
            if let Some(user) = self.users.get_mut(who) {
                user.avoid = Some(other.clone());
            }
        }
    }

    /// Which member (0 or 1) of the open proposal `match_id` the user is.
    fn proposal_member(&self, id: &UserId, match_id: &str) -> Result<usize, MatchError> {
        let no = || MatchError::InvalidState("no such proposal open".into());
        match &self.user(id)?.activity {
            Activity::Pending { session_id, .. } if **session_id == *match_id => {}
            _ => return Err(no()),
        }
        let s = self.sessions.get(match_id).ok_or_else(no)?;
        if !matches!(s.phase, Phase::Proposed { .. }) {
            return Err(no());
        }
        s.members.iter().position(|m| &m.user == id).ok_or_else(no)
    }

    /// Whether a timer of queue place `ticket` (relaxation, interests wait) finds `id` waiting
    /// there. A user paired from that place gets the timer again after `delay`: if the match
    /// is undone, the wait goes on from the restored place.
    fn timer_finds_waiting(
        &self,
        step: &mut Step<'_>,
        id: &UserId,
        ticket: u64,
        delay: Duration,
        timer: Timer,
    ) -> bool {
        match self.users.get(id).map(|u| &u.activity) {
            Some(Activity::Queued(w)) => w.ticket == ticket,
            Some(Activity::Pending { waiting, .. }) if waiting.ticket == ticket => {
                step.outcome.timers.push((delay, id.clone(), timer));
                false
            }
            _ => false,
        }
    }

    /// Widens the search of a waiting user by one relaxation step.
    fn relax(&mut self, step: &mut Step<'_>, id: &UserId, ticket: u64) {
        let after = step.policy.rules.relax_after;
        if !self.timer_finds_waiting(step, id, ticket, after, Timer::Relax { ticket }) {
            return;
        }
        let Some(User {
            activity: Activity::Queued(w),
            away,
            ..
        }) = self.users.get(id)
        else {
            return;
        };
        let away = *away;
        let level = w.level + 1;
        let Some(widened) = w.prefs.relaxed(level) else {
            return;
        };
        let key: Arc<str> = widened.pool_key().into();
        let more = level < w.prefs.soft.len();
        let base = w.pool.clone();
        // Dropping a `want` constraint changes no pool: the user is listed there already.
        let new_pool = !w.pools().any(|p| *p == key);
        if new_pool {
            self.pools.entry(key.clone()).or_default().list(w, id, away);
        }
        if let Some(User {
            activity: Activity::Queued(w),
            ..
        }) = self.users.get_mut(id)
        {
            if new_pool {
                w.wider.push(key);
            }
            w.level = level;
            w.want = widened.want.clone();
        }
        if more {
            step.outcome
                .timers
                .push((after, id.clone(), Timer::Relax { ticket }));
        }
        self.tell_widened(step, id, &base, ticket, Some(widened), false);
    }

    /// The interests wait of a waiting user passed: unless `interests_only`, it becomes open
    /// in every pool it is listed in (and in the wider ones to come), is told so, and may now
    /// meet any open user.
    fn widen_interests(&mut self, step: &mut Step<'_>, id: &UserId, ticket: u64) {
        let wait = step.policy.rules.interests_wait;
        if !self.timer_finds_waiting(step, id, ticket, wait, Timer::Interests { ticket }) {
            return;
        }
        let Some(User {
            activity: Activity::Queued(w),
            ..
        }) = self.users.get_mut(id)
        else {
            return;
        };
        if w.open() || w.prefs.interests_only {
            return;
        }
        w.widened = true;
        for key in w.pools() {
            if let Some(pool) = self.pools.get_mut(key) {
                pool.open_up(ticket);
            }
        }
        let base = w.pool.clone();
        self.tell_widened(step, id, &base, ticket, None, true);
    }

    /// Tells waiting `id` (queue place `ticket`, pool `base`) where it stands now that its
    /// search widened (`widened_to`: a relaxation step; `interests_widened`: the end of the
    /// interests wait), and tries to match it with what it may meet now.
    fn tell_widened(
        &mut self,
        step: &mut Step<'_>,
        id: &UserId,
        base: &Arc<str>,
        ticket: u64,
        widened_to: Option<Prefs>,
        interests_widened: bool,
    ) {
        let pool = &self.pools[base];
        let position = pool.ahead(ticket);
        let estimate = self.estimate(pool, position);
        if let Some(User {
            activity: Activity::Queued(w),
            ..
        }) = self.users.get_mut(id)
        {
            w.told = (position, estimate);
        }
        self.emit(
            step,
            id,
            Event::QueueUpdate {
                position,
                estimated_wait_ms: estimate,
                widened_to,
                interests_widened,
            },
        );
        self.try_match(step, id);
    }

    /// Records a media event id; false when it was seen within its dedupe window.
    fn first_sight(&mut self, event_id: &str, now: Instant, dedupe: Duration) -> bool {
        while let Some((until, _)) = self.seen_order.front() {
            if *until > now && self.seen_order.len() < MAX_SEEN_EVENTS {
                break;
            }
            if let Some((_, id)) = self.seen_order.pop_front() {
                self.seen_events.remove(&id);
            }
        }
        if self.seen_events.contains_key(event_id) {
            return false;
        }
        let until = now + dedupe;
        self.seen_events.insert(event_id.to_string(), until);
        self.seen_order.push_back((until, event_id.to_string()));
        true
    }

    fn status(&self, id: &UserId) -> Result<Status, MatchError> {
        let user = self.user(id)?;
        Ok(match &user.activity {
            Activity::Idle => Status {
                state: StateName::Idle,
                position: None,
                estimated_wait_ms: None,
                session_id: None,
                peer: None,
                role: None,
            },
            // The client learns of the match only with `matched` (a proposal names its
            // match id).
            Activity::Pending { .. } => Status {
                state: StateName::Queued,
                position: Some(0),
                estimated_wait_ms: None,
                session_id: None,
                peer: None,
                role: None,
            },
            Activity::Queued(w) => {
                let pool = &self.pools[&w.pool];
                let position = pool.ahead(w.ticket);
                Status {
                    state: StateName::Queued,
                    position: Some(position),
                    estimated_wait_ms: self.estimate(pool, position),
                    session_id: None,
                    peer: None,
                    role: None,
                }
            }
            Activity::InSession { session_id, .. } => {
                // members[0] offers; each member's peer is the other one's handle.
                let members = self.sessions.get(session_id).map(|s| &s.members);
                let me = members.and_then(|m| m.iter().position(|x| &x.user == id));
                Status {
                    state: StateName::InSession,
                    position: None,
                    estimated_wait_ms: None,
                    session_id: Some(session_id.clone()),
                    peer: members.zip(me).map(|(m, i)| m[1 - i].handle.clone()),
                    role: me.map(|i| {
                        if i == 0 {
                            Role::Offerer
                        } else {
                            Role::Answerer
                        }
                    }),
                }
            }
        })
    }
}

/// The interests two users share, sorted by bytes, each once: what both members' `matched`
/// says.
fn common_interests(a: &[String], b: &[String]) -> Vec<Arc<str>> {
    let shared: std::collections::BTreeSet<&str> = a
        .iter()
        .filter(|tag| b.contains(tag))
        .map(String::as_str)
        .collect();
    shared.into_iter().map(Arc::from).collect()
}

/// Whether an estimate moved enough to be worth a push (20%).
fn estimate_moved(old: Option<u64>, new: Option<u64>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => o.abs_diff(n) * 5 > o.max(n),
        (None, None) => false,
        _ => true,
    }
}

#[async_trait]
impl ClientOperations for MemoryMatchmaker {
    async fn attach(
        &self,
        user: &UserId,
        conn: ConnId,
        resume: Option<Resume>,
    ) -> Result<Attached, MatchError> {
        let (attached, outcome) = self.step(None, None, |state, step| {
            let entry = state.users.entry(user.clone()).or_insert_with(|| User {
                conn,
                away: false,
                activity: Activity::Idle,
                avoid: None,
                log: Log::new(),
            });
            // Connection ids grow: an older connection whose attach comes after a newer one's
            // must not take the user back.
            if !entry.away && entry.conn.0 > conn.0 {
                return Err(MatchError::Replaced);
            }
            let was_away = entry.away;
            entry.conn = conn;
            entry.away = false;
            entry.log.trim(step.now, step.policy);
            // Blocks are kept while their owner comes back (see `State::prune_blocks`).
            if let Some(blocks) = state.blocks.get_mut(user) {
                blocks.last_seen = step.now;
            }
            let replay = resume
                .filter(|r| r.token == entry.log.epoch)
                .and_then(|r| entry.log.since(r.last_seq));
            let attached = Attached {
                state: match entry.activity {
                    Activity::Idle => StateName::Idle,
                    Activity::Queued(_) | Activity::Pending { .. } => StateName::Queued,
                    Activity::InSession { .. } => StateName::InSession,
                },
                resume_token: entry.log.epoch.clone(),
                last_seq: entry.log.last_seq,
                resumed: replay.is_some(),
                replay: replay.unwrap_or_default(),
                outcome: Outcome::default(),
            };
            if was_away {
                if let Some((session_id, peer)) = state.session_of(user) {
                    state.emit(
                        step,
                        &peer,
                        Event::PeerStatus {
                            session_id,
                            state: PeerState::Connected,
                        },
                    );
                } else {
                    state.set_away(user, false);
                    state.try_match(step, user);
                }
            }
            Ok(attached)
        })?;
        Ok(Attached {
            outcome,
            ..attached
        })
    }

    async fn detach(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            let Some(entry) = state.users.get_mut(user) else {
                return Ok(());
            };
            if entry.conn != conn || entry.away {
                return Ok(());
            }
            entry.away = true;
            step.outcome.held = true;
            state.set_away(user, true);
            if let Some((session_id, peer)) = state.session_of(user) {
                state.emit(
                    step,
                    &peer,
                    Event::PeerStatus {
                        session_id,
                        state: PeerState::Reconnecting,
                    },
                );
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
        attributes: Arc<Attributes>,
        reference: Option<&str>,
    ) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(Some(user), reference, |state, step| {
            match state.user(user)?.activity {
                Activity::Idle => {}
                Activity::Queued(_) | Activity::Pending { .. } => {
                    return Err(MatchError::InvalidState("already queued".into()))
                }
                Activity::InSession { .. } => {
                    return Err(MatchError::InvalidState(
                        "already in a session: skip or end it first".into(),
                    ))
                }
            }
            state.check_cooldown(step, user)?;
            state.count_quick_end(step, user)?;
            state.count_enqueue(step, user)?;
            state.queue(step, user, prefs, attributes);
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(Some(user), reference, |state, step| {
            state.check_cooldown(step, user)?;
            let (session_id, peer) = state
                .session_of(user)
                .ok_or(MatchError::InvalidState("not in a session".into()))?;
            state.user_mut(user)?.avoid = Some(peer.clone());
            state.user_mut(&peer)?.avoid = Some(user.clone());
            let lived = state
                .sessions
                .get(&session_id)
                .and_then(|s| s.live_since)
                .map_or(Duration::ZERO, |t| step.now.duration_since(t));
            // The skip that starts a cooldown still ends the session, but does not re-queue.
            let cooldown = state.count_skip(step, user, lived);
            let requeue_peer = step.policy.requeue_peer_on_skip;
            state.end_session(
                step,
                user,
                (EndReason::Skip, cooldown.is_none()),
                (EndReason::PeerSkipped, requeue_peer),
            )?;
            if let Some(cooldown) = cooldown {
                state.emit(
                    step,
                    user,
                    Event::Error {
                        code: ErrorCode::Cooldown,
                        message: COOLDOWN.into(),
                        retry_after_ms: Some(cooldown.as_millis() as u64),
                    },
                );
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn end(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(Some(user), reference, |state, step| {
            match state.user(user)?.activity {
                Activity::Idle => Err(MatchError::InvalidState(
                    "not queued or in a session".into(),
                )),
                Activity::Queued(_) => {
                    state.dequeue(step, user, DequeueReason::End);
                    Ok(())
                }
                Activity::Pending { ref session_id, .. } => {
                    let session_id = session_id.clone();
                    state.leave_match(step, user, &session_id, DequeueReason::End);
                    Ok(())
                }
                Activity::InSession { .. } => {
                    let lived = state.end_session(
                        step,
                        user,
                        (EndReason::End, false),
                        (EndReason::PeerEnded, false),
                    )?;
                    state.note_quick_end(step, user, lived);
                    Ok(())
                }
            }
        })?;
        Ok(outcome)
    }

    async fn status(&self, user: &UserId) -> Result<Status, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        state.status(user)
    }

    async fn block(&self, user: &UserId, session: Option<&str>) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            state.user(user)?;
            let (session_id, peer) =
                state
                    .peer_in(user, session)
                    .ok_or(MatchError::InvalidState(
                        "no such session to block a peer from".into(),
                    ))?;
            let list = state
                .blocks
                .entry(user.clone())
                .or_insert_with(|| BlockList::new(step.now));
            // A dropped block may leave the blocker, if it waits, free to meet somebody who
            // waits too.
            if list.add(&peer, step.policy.rules.max_blocks) {
                state.try_match(step, user);
            }
            if state.session_of(user).is_some_and(|(s, _)| s == session_id) {
                let lived = state.end_session(
                    step,
                    user,
                    (EndReason::End, false),
                    (EndReason::PeerEnded, false),
                )?;
                state.note_quick_end(step, user, lived);
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn recent_peer(
        &self,
        user: &UserId,
        session: Option<&str>,
    ) -> Result<RecentPeer, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        state.user(user)?;
        state
            .peer_in(user, session)
            .map(|(session_id, peer)| RecentPeer { session_id, peer })
            .ok_or(MatchError::InvalidState("no such session".into()))
    }

    async fn accept(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            let i = state.proposal_member(user, match_id)?;
            let session_id: Arc<str> = match_id.into();
            let Some(s) = state.sessions.get_mut(match_id) else {
                return Ok(());
            };
            let Phase::Proposed { mut accepted } = s.phase else {
                return Ok(());
            };
            accepted[i] = true;
            s.phase = Phase::Proposed { accepted };
            if accepted == [true; 2] {
                if step.policy.media.waits_for_room() {
                    state.await_room(step, &session_id);
                } else {
                    state.go_live(step, &session_id, None);
                }
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn decline(&self, user: &UserId, match_id: &str) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            state.proposal_member(user, match_id)?;
            let session_id: Arc<str> = match_id.into();
            state.keep_apart(&session_id);
            let rules = &step.policy.rules;
            state.undo_match(step, &session_id, |member, _| {
                if member == user {
                    State::refused(rules, &session_id, CancelReason::Declined)
                } else {
                    Undo::Back(Some(Event::MatchCancelled {
                        match_id: session_id.clone(),
                        reason: CancelReason::PeerDeclined,
                        requeued: true,
                    }))
                }
            });
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn relay(&self, user: &UserId, message: Relay<'_>) -> Result<(), MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        let (session_id, peer) = state
            .session_of(user)
            .ok_or(MatchError::InvalidState("not in a session".into()))?;
        // Delivered under the lock, so that it cannot overtake the end of its session.
        let text = message.frame(&session_id, self.clock.unix_ms());
        self.bus.deliver(&peer, Frame { seq: None, text });
        Ok(())
    }
}

#[async_trait]
impl Timers for MemoryMatchmaker {
    async fn expire(&self, user: &UserId, conn: ConnId) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            let Some(entry) = state.users.get(user) else {
                return Ok(());
            };
            if entry.conn != conn || !entry.away {
                return Ok(());
            }
            // Two phases, one grace period apart: first the queue place or session goes (the
            // user's own `dequeued`/`session_ended` with reason `timeout` stays in the log, so a
            // client that comes back a little later learns why); then the idle user and the log.
            match &entry.activity {
                Activity::Idle => {
                    state.users.remove(user);
                    state.forget_later(step, user);
                    state.expire_blocks_later(step, user);
                }
                Activity::Queued(_) => {
                    state.dequeue(step, user, DequeueReason::Timeout);
                    step.outcome.held = true;
                }
                Activity::Pending { session_id, .. } => {
                    let session_id = session_id.clone();
                    state.leave_match(step, user, &session_id, DequeueReason::Timeout);
                    step.outcome.held = true;
                }
                Activity::InSession { .. } => {
                    let requeue_peer = step.policy.requeue_peer_on_skip;
                    state.end_session(
                        step,
                        user,
                        (EndReason::Timeout, false),
                        (EndReason::PeerDisconnected, requeue_peer),
                    )?;
                    step.outcome.held = true;
                }
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError> {
        self.step(None, None, |state, step| {
            let Some(p) = state.pools.get(pool) else {
                return Ok(());
            };
            let mut updates = Vec::new();
            // Positions count the away users too: walk both lists in ticket order.
            let mut away = p.away.keys().peekable();
            let mut away_ahead = 0;
            for (i, (ticket, id)) in p.waiting.iter().enumerate() {
                while away.next_if(|t| *t < ticket).is_some() {
                    away_ahead += 1;
                }
                let position = (i + away_ahead) as u64;
                let estimate = state.estimate(p, position);
                let Some(user) = state.users.get(id) else {
                    continue;
                };
                let Activity::Queued(w) = &user.activity else {
                    continue;
                };
                // Users listed here because their search widened are told about their own pool.
                if *w.pool != *pool {
                    continue;
                }
                if w.told.0 == position && !estimate_moved(w.told.1, estimate) {
                    continue;
                }
                updates.push((id.clone(), position, estimate));
            }
            for (id, position, estimate) in updates {
                if let Some(User {
                    activity: Activity::Queued(w),
                    ..
                }) = state.users.get_mut(&id)
                {
                    w.told = (position, estimate);
                }
                state.emit(
                    step,
                    &id,
                    Event::QueueUpdate {
                        position,
                        estimated_wait_ms: estimate,
                        widened_to: None,
                        interests_widened: false,
                    },
                );
            }
            Ok(())
        })?;
        Ok(())
    }

    async fn wake(&self, user: &UserId, timer: Timer) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            match timer {
                Timer::Relax { ticket } => state.relax(step, user, ticket),
                Timer::Interests { ticket } => state.widen_interests(step, user, ticket),
                Timer::Rematch { ticket } => {
                    if let Some(User {
                        activity: Activity::Queued(w),
                        ..
                    }) = state.users.get_mut(user)
                    {
                        if w.ticket == ticket {
                            w.fallback_armed = false;
                            state.try_match(step, user);
                        }
                    }
                }
                Timer::Proposal { match_id } => {
                    let proposed = state
                        .sessions
                        .get(&match_id)
                        .is_some_and(|s| matches!(s.phase, Phase::Proposed { .. }));
                    if proposed {
                        state.keep_apart(&match_id);
                        let rules = &step.policy.rules;
                        state.undo_match(step, &match_id, |_, accepted| {
                            if accepted {
                                Undo::Back(Some(Event::MatchCancelled {
                                    match_id: match_id.clone(),
                                    reason: CancelReason::PeerTimeout,
                                    requeued: true,
                                }))
                            } else {
                                State::refused(rules, &match_id, CancelReason::Timeout)
                            }
                        });
                    }
                }
            }
            Ok(())
        })?;
        Ok(outcome)
    }
}

#[async_trait]
impl Administration for MemoryMatchmaker {
    async fn stats(&self) -> Result<Stats, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        Ok(Stats {
            queued: state.queued,
            sessions: state.sessions.len() as u64,
        })
    }

    /// One process holds all the state: it always holds every lease.
    async fn lease(&self, _name: &str, _ttl: Duration) -> Result<bool, MatchError> {
        Ok(true)
    }

    async fn restore_blocks(&self, blocker: &UserId, blocked: &[UserId]) -> Result<(), MatchError> {
        let ((), _) = self.step(None, None, |state, step| {
            let list = state
                .blocks
                .entry(blocker.clone())
                .or_insert_with(|| BlockList::new(step.now));
            for peer in blocked {
                list.add(peer, step.policy.rules.max_blocks);
            }
            if !state.users.contains_key(blocker) {
                state.expire_blocks_later(step, blocker);
            }
            Ok(())
        })?;
        Ok(())
    }

    async fn overview(&self) -> Result<Overview, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        let mut pools: Vec<PoolOverview> = state
            .pools
            .iter()
            .filter(|(_, pool)| !pool.is_empty())
            .map(|(key, pool)| {
                let waiting = (pool.waiting.len() + pool.away.len()) as u64;
                PoolOverview {
                    pool: key.clone(),
                    waiting,
                    estimated_wait_ms: state.estimate(pool, waiting),
                }
            })
            .collect();
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        Ok(Overview {
            pools,
            sessions: state.sessions.len() as u64,
            matches: state.matches.at(self.clock.unix_ms()),
            instances: Vec::new(),
        })
    }

    async fn moderator_end(&self, session: &str) -> Result<Option<Outcome>, MatchError> {
        let (ended, outcome) = self.step(None, None, |state, step| {
            let Some(s) = state
                .sessions
                .get(session)
                .filter(|s| s.phase == Phase::Live)
            else {
                return Ok(false);
            };
            let offerer = s.members[0].user.clone();
            state.end_for_both(step, &offerer, EndReason::EndedByModerator)?;
            Ok(true)
        })?;
        Ok(ended.then_some(outcome))
    }
}

#[async_trait]
impl MediaEvents for MemoryMatchmaker {
    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<MediaReady, MatchError> {
        self.step(None, None, |state, step| {
            if !state
                .sessions
                .get(session)
                .is_some_and(|s| s.phase == Phase::Pending)
            {
                return Ok(false);
            }
            state.go_live(step, &session.into(), Some(media));
            Ok(true)
        })
        .map(|(live, outcome)| MediaReady { live, outcome })
    }

    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            if state
                .sessions
                .get(session)
                .is_some_and(|s| s.phase == Phase::Pending)
            {
                let message: Arc<str> = MEDIA_UNAVAILABLE.into();
                state.undo_match(step, &session.into(), |_, _| {
                    Undo::Back(Some(Event::Error {
                        code: ErrorCode::MediaUnavailable,
                        message: message.clone(),
                        retry_after_ms: None,
                    }))
                });
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn media_left(
        &self,
        session: &str,
        left: Option<&str>,
        event_id: &str,
        dedupe: Duration,
    ) -> Result<MediaLeft, MatchError> {
        self.step(None, None, |state, step| {
            if !state.first_sight(event_id, step.now, dedupe) {
                return Ok(MediaEffect::Duplicate);
            }
            let Some(s) = state
                .sessions
                .get(session)
                .filter(|s| s.phase == Phase::Live)
            else {
                return Ok(MediaEffect::NoSession);
            };
            let requeue_peer = step.policy.requeue_peer_on_skip;
            let reason = EndReason::MediaDisconnected;
            match left {
                // Whoever left ends it; the peer is treated as if skipped.
                Some(handle) => match s.members.iter().find(|m| &*m.handle == handle) {
                    Some(m) => {
                        let user = m.user.clone();
                        let lived = state.end_session(
                            step,
                            &user,
                            (reason, false),
                            (reason, requeue_peer),
                        )?;
                        state.note_quick_end(step, &user, lived);
                    }
                    None => return Ok(MediaEffect::NoSession),
                },
                // The room is gone for both.
                None => {
                    let offerer = s.members[0].user.clone();
                    state.end_for_both(step, &offerer, reason)?;
                }
            }
            Ok(MediaEffect::Ended)
        })
        .map(|(effect, outcome)| MediaLeft { effect, outcome })
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        Ok(state
            .sessions
            .iter()
            .map(|(id, s)| SessionInfo {
                session_id: id.clone(),
                created_ms: s.created_ms,
                pending: s.phase != Phase::Live,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    //! Interests and `want` (issue 12) in the memory engine, driven through its operations with
    //! a test clock; the Redis library is held to the same behaviour by the differential
    //! model test.

    use serde_json::{json, Value};

    use super::*;
    use crate::clock::ManualClock;
    use crate::p2p::IceServers;
    use crate::protocol::PrefField;

    const WAIT: Duration = Duration::from_secs(10);

    /// Every frame handed out, per user, parsed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(UserId, Value)>>);

    impl Bus for Recorder {
        fn deliver(&self, user: &UserId, frame: Frame) {
            let value = serde_json::from_str(frame.text.as_str()).expect("frames are JSON");
            self.0.lock().unwrap().push((user.clone(), value));
        }
    }

    struct Harness {
        mm: MemoryMatchmaker,
        bus: Arc<Recorder>,
        clock: Arc<ManualClock>,
    }

    impl Harness {
        /// An engine with p2p media; with `accept`, matches are proposed first.
        fn new(accept: bool) -> Harness {
            let bus = Arc::new(Recorder::default());
            let clock = Arc::new(ManualClock::new(1_000_000));
            let hour = Duration::from_secs(3600);
            let policy = Policy {
                requeue_peer_on_skip: true,
                history_len: 1000,
                history_ttl: hour,
                media: MediaMode::P2p(Arc::new(IceServers::new(Vec::new(), None))),
                rules: Rules {
                    anti_repeat_window: Duration::ZERO,
                    anti_repeat_fallback: Duration::ZERO,
                    // Zero: no skip is quick, so no cooldown gets in the way.
                    skip_quick: Duration::ZERO,
                    skip_limit: 5,
                    skip_window: hour,
                    skip_cooldowns: vec![hour],
                    enqueue_per_minute: u32::MAX,
                    accept_timeout: accept.then_some(hour),
                    decline_to_tail: false,
                    relax_after: WAIT,
                    interests_wait: WAIT,
                    max_blocks: 100,
                    block_ttl: hour,
                },
            };
            Harness {
                mm: MemoryMatchmaker::with_clock(bus.clone(), policy, clock.clone()),
                bus,
                clock,
            }
        }

        /// Attaches `name` and enqueues it with `prefs` (JSON) and `attributes`.
        async fn enqueue(&self, name: &str, prefs: Value, attributes: &[(&str, &str)]) -> Outcome {
            let id = user(name);
            if self.mm.status(&id).await.is_err() {
                let conn = ConnId(self.mm.state.lock().unwrap().users.len() as u64 + 1);
                self.mm.attach(&id, conn, None).await.unwrap();
            }
            let prefs: Prefs = serde_json::from_value(prefs).unwrap();
            let attributes = attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.mm
                .enqueue(&id, prefs, Arc::new(attributes), None)
                .await
                .unwrap()
        }

        /// The frames `name` got since the last call, taken.
        fn frames(&self, name: &str) -> Vec<Value> {
            let mut all = self.bus.0.lock().unwrap();
            let (mine, rest) = all.drain(..).partition(|(u, _)| **u == *name);
            *all = rest;
            mine.into_iter().map(|(_, v)| v).collect()
        }

        /// The types of the frames `name` got since the last call.
        fn types(&self, name: &str) -> Vec<String> {
            self.frames(name)
                .iter()
                .map(|f| f["type"].as_str().unwrap().to_string())
                .collect()
        }

        /// The `matched` frame `name` got since the last call.
        fn matched(&self, name: &str) -> Value {
            self.frames(name)
                .into_iter()
                .find(|f| f["type"] == "matched")
                .unwrap_or_else(|| panic!("{name} was not matched"))
        }

        /// The queue place of waiting (or paired) `name`: its ticket and interests flag.
        fn place(&self, name: &str) -> (u64, bool) {
            let state = self.mm.state.lock().unwrap();
            match &state.users[&user(name)].activity {
                Activity::Queued(w) | Activity::Pending { waiting: w, .. } => (w.ticket, w.widened),
                _ => panic!("{name} has no queue place"),
            }
        }

        fn state(&self, name: &str) -> &'static str {
            match self.mm.state.lock().unwrap().users[&user(name)].activity {
                Activity::Idle => "idle",
                Activity::Queued(_) => "queued",
                Activity::Pending { .. } => "pending",
                Activity::InSession { .. } => "in_session",
            }
        }

        /// Moves the clock past the interests wait and wakes `name`'s timer.
        async fn widen(&self, name: &str) -> Outcome {
            self.clock.advance(WAIT);
            let (ticket, _) = self.place(name);
            self.mm
                .wake(&user(name), Timer::Interests { ticket })
                .await
                .unwrap()
        }
    }

    fn user(name: &str) -> UserId {
        name.into()
    }

    fn interests_timers(outcome: &Outcome) -> Vec<(Duration, UserId, u64)> {
        outcome
            .timers
            .iter()
            .filter_map(|(delay, u, t)| match t {
                Timer::Interests { ticket } => Some((*delay, u.clone(), *ticket)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_sharer_is_chosen_over_an_older_user_who_shares_nothing() {
        let h = Harness::new(false);
        h.enqueue("open", json!({}), &[]).await;
        h.enqueue("music", json!({"interests": ["music"]}), &[])
            .await;
        h.enqueue("x", json!({"interests": ["chess"]}), &[]).await;
        // Nobody shares chess: x waits, even though two compatible users wait longer.
        assert_eq!(h.state("x"), "queued");
        h.enqueue("y", json!({"interests": ["go", "chess"]}), &[])
            .await;
        let (mx, my) = (h.matched("x"), h.matched("y"));
        assert_eq!(mx["session_id"], my["session_id"]);
        assert_eq!(mx["common_interests"], json!(["chess"]));
        assert_eq!(h.state("open"), "queued");
        assert_eq!(h.state("music"), "queued");
    }

    #[tokio::test]
    async fn the_longest_waiting_sharer_across_all_tags_is_chosen() {
        let h = Harness::new(false);
        h.enqueue("m", json!({"interests": ["music"]}), &[]).await;
        h.enqueue("c", json!({"interests": ["chess"]}), &[]).await;
        h.enqueue("a", json!({"interests": ["art"]}), &[]).await;
        h.enqueue("u", json!({"interests": ["chess", "music"]}), &[])
            .await;
        assert_eq!(h.matched("u")["session_id"], h.matched("m")["session_id"]);
        h.enqueue("v", json!({"interests": ["music", "chess", "art"]}), &[])
            .await;
        assert_eq!(h.matched("v")["session_id"], h.matched("c")["session_id"]);
        assert_eq!(h.state("a"), "queued");
    }

    #[tokio::test]
    async fn after_the_interests_wait_the_search_widens_to_open_users() {
        let h = Harness::new(false);
        let outcome = h.enqueue("x", json!({"interests": ["chess"]}), &[]).await;
        let (ticket, widened) = h.place("x");
        assert!(!widened);
        assert_eq!(interests_timers(&outcome), vec![(WAIT, user("x"), ticket)]);
        // An open user (no interests) does not meet x while x waits for a sharer.
        let outcome = h.enqueue("o", json!({}), &[]).await;
        assert!(
            interests_timers(&outcome).is_empty(),
            "no interests, no wait"
        );
        assert_eq!(h.state("x"), "queued");
        h.frames("x");

        h.widen("x").await;
        let frames = h.frames("x");
        assert_eq!(frames[0]["type"], "queue_update");
        assert_eq!(frames[0]["interests_widened"], true);
        assert_eq!(frames[0]["position"], 0);
        assert!(frames[0].get("widened_to").is_none());
        assert_eq!(frames[1]["type"], "matched");
        assert_eq!(frames[1]["common_interests"], json!([]));
        assert_eq!(h.matched("o")["session_id"], frames[1]["session_id"]);
    }

    #[tokio::test]
    async fn a_widened_user_meets_only_open_users_besides_sharers() {
        let h = Harness::new(false);
        h.enqueue("x", json!({"interests": ["chess"]}), &[]).await;
        h.enqueue("m", json!({"interests": ["music"]}), &[]).await;
        h.widen("x").await;
        // m waits for a music fan: x, though widened, is not one.
        assert_eq!(h.state("x"), "queued");
        assert_eq!(h.state("m"), "queued");
        h.enqueue("o", json!({}), &[]).await;
        assert_eq!(h.matched("o")["session_id"], h.matched("x")["session_id"]);
    }

    #[tokio::test]
    async fn interests_only_never_widens() {
        let h = Harness::new(false);
        let outcome = h
            .enqueue(
                "x",
                json!({"interests": ["chess"], "interests_only": true}),
                &[],
            )
            .await;
        assert!(interests_timers(&outcome).is_empty());
        h.enqueue("o", json!({}), &[]).await;
        h.frames("x");
        // Even a timer that goes off anyway changes nothing.
        let outcome = h.widen("x").await;
        assert!(outcome.timers.is_empty());
        assert!(h.frames("x").is_empty());
        assert!(!h.place("x").1);
        assert_eq!(h.state("o"), "queued");
        h.enqueue("y", json!({"interests": ["chess"]}), &[]).await;
        assert_eq!(h.matched("y")["session_id"], h.matched("x")["session_id"]);
    }

    #[tokio::test]
    async fn a_paired_user_waits_on_and_a_restored_one_keeps_its_flag() {
        let h = Harness::new(true);
        h.enqueue("x", json!({"interests": ["chess"]}), &[]).await;
        h.enqueue("y", json!({"interests": ["chess"]}), &[]).await;
        assert_eq!(h.state("x"), "pending");
        // The wait passes while x is paired: the timer is armed again, nothing else happens.
        let outcome = h.widen("x").await;
        let (ticket, widened) = h.place("x");
        assert_eq!(interests_timers(&outcome), vec![(WAIT, user("x"), ticket)]);
        assert!(!widened);
        // y declines: x is back at its place, still waiting for a sharer...
        let match_id = h.frames("y")[1]["match_id"].as_str().unwrap().to_string();
        h.mm.decline(&user("y"), &match_id).await.unwrap();
        assert_eq!(h.place("x"), (ticket, false));
        h.widen("x").await;
        assert_eq!(h.place("x"), (ticket, true));
        // ...then widened; paired with an open user and put back again, it keeps the flag.
        h.enqueue("o", json!({}), &[]).await;
        assert_eq!(h.state("x"), "pending");
        let match_id = h.frames("o")[1]["match_id"].as_str().unwrap().to_string();
        h.mm.decline(&user("o"), &match_id).await.unwrap();
        assert_eq!(h.place("x"), (ticket, true));
        h.frames("x");
        h.enqueue("p", json!({}), &[]).await;
        assert_eq!(h.state("x"), "pending", "the restored user is still open");
    }

    #[tokio::test]
    async fn a_requeue_starts_the_interests_wait_again() {
        let h = Harness::new(false);
        h.enqueue("x", json!({"interests": ["chess"]}), &[]).await;
        h.widen("x").await;
        h.enqueue("y", json!({"interests": ["chess"]}), &[]).await;
        assert_eq!(h.state("x"), "in_session");
        // y skips: both go back to the queue with new tickets, neither widened.
        let outcome = h.mm.skip(&user("y"), None).await.unwrap();
        let (x_ticket, x_widened) = h.place("x");
        let (y_ticket, _) = h.place("y");
        assert!(!x_widened);
        assert_eq!(
            interests_timers(&outcome),
            vec![(WAIT, user("y"), y_ticket), (WAIT, user("x"), x_ticket)]
        );
        // x waits for a sharer again: an open user does not meet it.
        h.enqueue("o", json!({}), &[]).await;
        assert_eq!(h.state("x"), "queued");
    }

    #[tokio::test]
    async fn a_want_must_hold_both_ways_and_a_missing_attribute_fails_it() {
        let h = Harness::new(false);
        h.enqueue("a", json!({"want": {"country": ["de", "at"]}}), &[])
            .await;
        // a's want fails for b's attributes.
        h.enqueue("b", json!({}), &[("country", "fr")]).await;
        // c's want fails for a, who has no `lang`.
        h.enqueue("c", json!({"want": {"lang": ["en"]}}), &[("country", "de")])
            .await;
        for name in ["a", "b", "c"] {
            assert_eq!(h.state(name), "queued", "{name}");
        }
        // d fits a both ways, and comes before b, who waited longer but fails a's want.
        h.enqueue("d", json!({}), &[("country", "at"), ("lang", "en")])
            .await;
        assert_eq!(h.matched("d")["session_id"], h.matched("a")["session_id"]);
        // e's want fails for b, who waited longer: e meets c (whose want e's `lang` fits).
        h.enqueue("e", json!({"want": {"country": ["de"]}}), &[("lang", "en")])
            .await;
        assert_eq!(h.matched("e")["session_id"], h.matched("c")["session_id"]);
        assert_eq!(h.state("b"), "queued");
    }

    #[tokio::test]
    async fn a_soft_want_is_dropped_at_its_relaxation_step() {
        let h = Harness::new(false);
        h.enqueue("b", json!({}), &[("country", "fr")]).await;
        h.enqueue(
            "a",
            json!({"topic": "t", "want": {"country": ["de"], "lang": ["en"]},
                   "soft": ["want.lang", "want.country"]}),
            &[],
        )
        .await;
        h.enqueue(
            "f",
            json!({"topic": "t"}),
            &[("lang", "en"), ("country", "fr")],
        )
        .await;
        assert_eq!(h.state("a"), "queued", "country is still wanted");
        h.frames("a");
        let (ticket, _) = h.place("a");
        // Step 1 drops want.lang: f still fails want.country.
        h.clock.advance(WAIT);
        let outcome =
            h.mm.wake(&user("a"), Timer::Relax { ticket })
                .await
                .unwrap();
        assert!(outcome
            .timers
            .contains(&(WAIT, user("a"), Timer::Relax { ticket })));
        let frames = h.frames("a");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["type"], "queue_update");
        assert_eq!(
            frames[0]["widened_to"],
            json!({"topic": "t", "want": {"country": ["de"]}})
        );
        assert!(frames[0].get("interests_widened").is_none());
        // Step 2 drops want.country: a meets f, who waited in a's own pool all along (b waits
        // elsewhere: want is not part of the pool).
        h.clock.advance(WAIT);
        h.mm.wake(&user("a"), Timer::Relax { ticket })
            .await
            .unwrap();
        let frames = h.frames("a");
        assert_eq!(frames[0]["widened_to"], json!({"topic": "t"}));
        assert_eq!(frames[1]["type"], "matched");
        assert_eq!(h.matched("f")["session_id"], frames[1]["session_id"]);
        assert_eq!(h.state("b"), "queued");
    }

    #[tokio::test]
    async fn common_interests_are_sorted_and_the_same_for_both() {
        let h = Harness::new(false);
        h.enqueue(
            "x",
            json!({"interests": ["zeta", "chess", "art", "Éclair"]}),
            &[],
        )
        .await;
        h.enqueue(
            "y",
            json!({"interests": ["art", "music", "Éclair", "zeta"]}),
            &[],
        )
        .await;
        let (mx, my) = (h.matched("x"), h.matched("y"));
        assert_eq!(mx["common_interests"], json!(["art", "zeta", "Éclair"]));
        assert_eq!(my["common_interests"], mx["common_interests"]);
    }

    #[tokio::test]
    async fn a_user_widened_while_away_is_open_when_back() {
        let h = Harness::new(false);
        h.enqueue("x", json!({"interests": ["chess"]}), &[]).await;
        h.mm.detach(&user("x"), ConnId(1)).await.unwrap();
        h.widen("x").await;
        assert_eq!(h.types("x"), ["queued", "queue_update"]);
        h.enqueue("o", json!({}), &[]).await;
        assert_eq!(h.state("o"), "queued", "x is away");
        h.mm.attach(&user("x"), ConnId(3), None).await.unwrap();
        assert_eq!(h.matched("x")["session_id"], h.matched("o")["session_id"]);
    }

    /// What `try_match` must never leave behind, written from the spec's definition rather
    /// than from the candidate lists: two connected waiting users in a common pool who may
    /// meet (no avoid or block between them, each one's `want` holding for the other's
    /// attributes, a shared interest or both open). Also checks that the candidate lists hold
    /// exactly the connected waiters, each in its tags' lists and, when open, the open list,
    /// and no empty tag list.
    fn check(state: &State) {
        let connected: Vec<(&UserId, &Waiting)> = state
            .users
            .iter()
            .filter_map(|(id, u)| match &u.activity {
                Activity::Queued(w) if !u.away => Some((id, w)),
                _ => None,
            })
            .collect();
        for (key, pool) in &state.pools {
            let listed: Vec<&(&UserId, &Waiting)> = connected
                .iter()
                .filter(|(_, w)| w.pools().any(|p| p == key))
                .collect();
            assert_eq!(pool.waiting.len(), listed.len(), "pool {key}");
            let mut tagged = 0;
            for (id, w) in &listed {
                assert_eq!(pool.waiting.get(&w.ticket), Some(*id));
                for tag in &w.prefs.interests {
                    assert_eq!(pool.tags[tag].get(&w.ticket), Some(*id), "tag {tag}");
                }
                tagged += w.prefs.interests.len();
                assert_eq!(pool.open.contains_key(&w.ticket), w.open(), "open {id}");
            }
            assert_eq!(pool.tags.values().map(BTreeMap::len).sum::<usize>(), tagged);
            // A tag nobody waits with any more leaves no list behind (or tags users came
            // with once would pile up).
            assert!(
                pool.tags.values().all(|l| !l.is_empty()),
                "empty tag list in {key}"
            );
            assert_eq!(
                pool.open.len(),
                listed.iter().filter(|(_, w)| w.open()).count()
            );
        }
        for (i, (a, wa)) in connected.iter().enumerate() {
            for (b, wb) in &connected[i + 1..] {
                let common_pool = wa.pools().any(|p| wb.pools().any(|q| p == q));
                let avoided = state.users[*a].avoid.as_ref() == Some(*b)
                    || state.users[*b].avoid.as_ref() == Some(*a);
                let wants =
                    want_holds(&wa.want, &wb.attributes) && want_holds(&wb.want, &wa.attributes);
                let share = wa
                    .prefs
                    .interests
                    .iter()
                    .any(|t| wb.prefs.interests.contains(t));
                let by_interests = share || (wa.open() && wb.open());
                assert!(
                    !(common_pool && !avoided && !state.blocked(a, b) && wants && by_interests),
                    "{a} and {b} could meet but both wait"
                );
            }
        }
    }

    #[tokio::test]
    async fn no_two_waiting_users_who_may_meet_are_left_apart() {
        const NAMES: [&str; 6] = ["u0", "u1", "u2", "u3", "u4", "u5"];
        for seed in 1..=60u64 {
            let h = Harness::new(seed % 2 == 0);
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut conn = 100;
            let mut timers: Vec<(UserId, Timer)> = Vec::new();
            for _ in 0..150 {
                let id = user(NAMES[next(6) as usize]);
                let away = h.mm.state.lock().unwrap().users.get(&id).map(|u| u.away);
                let outcome = match (away, next(7)) {
                    (None, _) | (Some(true), _) => {
                        conn += 1;
                        h.mm.attach(&id, ConnId(conn), None).await.unwrap().outcome
                    }
                    (Some(false), 0..=2) => {
                        let interests: Vec<String> = ["art", "chess", "go"]
                            .into_iter()
                            .filter(|_| next(2) == 0)
                            .map(String::from)
                            .collect();
                        let mut prefs = Prefs {
                            topic: (next(3) == 0).then(|| "t".to_string()),
                            interests_only: !interests.is_empty() && next(3) == 0,
                            interests,
                            ..Prefs::default()
                        };
                        if next(2) == 0 {
                            let country = ["de", "fr"][next(2) as usize].to_string();
                            prefs.want.insert("country".into(), vec![country]);
                            if next(2) == 0 {
                                prefs.soft.push(PrefField::Want("country".into()));
                            }
                        }
                        if prefs.topic.is_some() && next(2) == 0 {
                            prefs.soft.push(PrefField::Topic);
                        }
                        let mut attributes = Attributes::new();
                        if let Some(c) = [Some("de"), Some("fr"), None][next(3) as usize] {
                            attributes.insert("country".into(), c.into());
                        }
                        h.mm.enqueue(&id, prefs, Arc::new(attributes), None)
                            .await
                            .unwrap_or_default()
                    }
                    (Some(false), 3) => h.mm.skip(&id, None).await.unwrap_or_default(),
                    (Some(false), 4) => {
                        let proposal = match &h.mm.state.lock().unwrap().users[&id].activity {
                            Activity::Pending { session_id, .. } => Some(session_id.clone()),
                            _ => None,
                        };
                        match proposal {
                            Some(m) if next(2) == 0 => {
                                h.mm.accept(&id, &m).await.unwrap_or_default()
                            }
                            Some(m) => h.mm.decline(&id, &m).await.unwrap_or_default(),
                            None => h.mm.end(&id, None).await.unwrap_or_default(),
                        }
                    }
                    (Some(false), 5) => {
                        let conn = h.mm.state.lock().unwrap().users[&id].conn;
                        h.mm.detach(&id, conn).await.unwrap()
                    }
                    (Some(false), _) if !timers.is_empty() => {
                        h.clock.advance(WAIT);
                        let (who, timer) = timers.remove(next(timers.len() as u64) as usize);
                        h.mm.wake(&who, timer).await.unwrap()
                    }
                    (Some(false), _) => Outcome::default(),
                };
                timers.extend(outcome.timers.into_iter().map(|(_, u, t)| (u, t)));
                check(&h.mm.state.lock().unwrap());
            }
        }
    }
}
