//! The in-memory matchmaker of the embedded default.
//!
//! All state sits behind one mutex and every operation is a short critical section with no
//! `.await` inside, which makes each operation atomic and keeps events in `seq` order. Pools
//! are keyed by the exact preference set, so an enqueue only ever looks at its own pool: its
//! cost does not depend on how many users wait elsewhere. Within a pool, waiting users are
//! ordered by an increasing ticket (FIFO); the matcher takes the first compatible one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Attached, ConnId, MatchError, Matchmaker, MediaEffect, Outcome, PendingSession, Resume,
    SessionInfo, Stats, Status, UserId,
};
use crate::bus::{Bus, Frame};
use crate::ids::{random_id, unix_ms};
use crate::protocol::{
    encode_event, DequeueReason, EndReason, ErrorCode, Event, Media, PeerState, Prefs, Role,
    StateName,
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
    /// Media mode: a new session stays pending (no `matched` yet) until its room is ready.
    pub media: bool,
}

pub struct MemoryMatchmaker {
    state: Mutex<State>,
    bus: Arc<dyn Bus>,
    policy: Policy,
}

impl MemoryMatchmaker {
    pub fn new(bus: Arc<dyn Bus>, policy: Policy) -> Self {
        MemoryMatchmaker {
            state: Mutex::new(State::default()),
            bus,
            policy,
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
            now: Instant::now(),
            actor,
            reference,
            outcome: Outcome::default(),
        };
        // A panic inside a step would leave the state half-changed; there is no sensible
        // recovery from that, so propagating the poison is correct.
        let mut state = self.state.lock().expect("matchmaker state poisoned");
        let value = f(&mut state, &mut step)?;
        Ok((value, step.outcome))
    }
}

/// Context of one atomic step: where frames go and what the gateway must learn.
struct Step<'a> {
    bus: &'a dyn Bus,
    policy: &'a Policy,
    now: Instant,
    /// The user whose request this is: their first event is the direct reply and echoes `ref`.
    actor: Option<&'a UserId>,
    reference: Option<&'a str>,
    outcome: Outcome,
}

#[derive(Default)]
struct State {
    users: HashMap<UserId, User>,
    pools: HashMap<Arc<str>, Pool>,
    sessions: HashMap<Arc<str>, Session>,
    /// Media event ids already acted on, with when they may be forgotten, oldest first.
    seen_events: HashMap<String, Instant>,
    seen_order: VecDeque<(Instant, String)>,
    next_ticket: u64,
    queued: u64,
    /// Smoothed wait of recently matched users across all pools, in ms.
    recent_wait_ms: Option<f64>,
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

enum Activity {
    Idle,
    Queued(Waiting),
    /// Matched, waiting for the media room; to the client still `queued`. Keeps the queue
    /// place so that a failed room puts the user back where they were.
    Pending {
        session_id: Arc<str>,
        waiting: Waiting,
    },
    InSession {
        session_id: Arc<str>,
        prefs: Prefs,
    },
}

struct Waiting {
    pool: Arc<str>,
    ticket: u64,
    prefs: Prefs,
    since: Instant,
    /// Position and estimate the user was last told.
    told: (u64, Option<u64>),
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

#[derive(Default)]
struct Pool {
    /// Waiting users by ticket: the lowest ticket waited longest.
    waiting: BTreeMap<u64, UserId>,
    /// Smoothed wait of users recently matched from this pool, in ms.
    recent_wait_ms: Option<f64>,
}

struct Session {
    members: [Member; 2],
    created_ms: u64,
    /// Waiting for its media room.
    pending: bool,
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

    /// Puts an idle user in the queue, tells them, and matches them if a partner waits.
    fn queue(&mut self, step: &mut Step<'_>, id: &UserId, prefs: Prefs) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let key: Arc<str> = prefs.pool_key().into();
        let pool = self.pools.entry(key.clone()).or_default();
        let position = pool.waiting.len() as u64;
        pool.waiting.insert(ticket, id.clone());
        let pool = &self.pools[&key];
        let estimate = self.estimate(pool, position);
        self.queued += 1;
        if let Some(user) = self.users.get_mut(id) {
            user.activity = Activity::Queued(Waiting {
                pool: key,
                ticket,
                prefs,
                since: step.now,
                told: (position, estimate),
            });
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

    /// Matches a waiting, connected user with the longest-waiting compatible user in its pool.
    fn try_match(&mut self, step: &mut Step<'_>, id: &UserId) {
        let Some(user) = self.users.get(id) else {
            return;
        };
        let Activity::Queued(waiting) = &user.activity else {
            return;
        };
        if user.away {
            return;
        }
        let key = waiting.pool.clone();
        let Some(pool) = self.pools.get(&key) else {
            return;
        };
        let partner = pool.waiting.values().find(|other| {
            *other != id
                && user.avoid.as_ref() != Some(*other)
                && self
                    .users
                    .get(*other)
                    .is_some_and(|o| !o.away && o.avoid.as_ref() != Some(id))
        });
        let Some(partner) = partner.cloned() else {
            return;
        };
        self.start_session(step, &key, id, &partner);
    }

    fn take_waiting(&mut self, id: &UserId) -> Option<Waiting> {
        let user = self.users.get_mut(id)?;
        let Activity::Queued(waiting) = std::mem::replace(&mut user.activity, Activity::Idle)
        else {
            return None;
        };
        if let Some(pool) = self.pools.get_mut(&waiting.pool) {
            pool.waiting.remove(&waiting.ticket);
        }
        self.queued -= 1;
        Some(waiting)
    }

    /// Takes a waiting user out of the queue and tells them why.
    fn dequeue(&mut self, step: &mut Step<'_>, id: &UserId, reason: DequeueReason) {
        if let Some(w) = self.take_waiting(id) {
            self.emit(step, id, Event::Dequeued { reason });
            self.pool_changed(step, &w.pool);
        }
    }

    /// Drops a pool that nobody waits in any more, or reports that its positions changed.
    fn pool_changed(&mut self, step: &mut Step<'_>, key: &Arc<str>) {
        match self.pools.get(key) {
            Some(pool) if pool.waiting.is_empty() => {
                self.pools.remove(key);
            }
            Some(_) if !step.outcome.changed_pools.contains(key) => {
                step.outcome.changed_pools.push(key.clone())
            }
            _ => {}
        }
    }

    fn start_session(&mut self, step: &mut Step<'_>, key: &Arc<str>, a: &UserId, b: &UserId) {
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
        let started_at_ms = unix_ms();
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
        let pending = step.policy.media;
        for w in [&w_first, &w_second] {
            let waited = step.now.duration_since(w.since);
            // With media, the wait ends with `matched`, once the room is ready.
            if !pending {
                step.outcome.waits.push(waited);
            }
            let ms = waited.as_secs_f64() * 1000.0;
            self.recent_wait_ms = Some(ewma(self.recent_wait_ms, ms));
            if let Some(pool) = self.pools.get_mut(key) {
                pool.recent_wait_ms = Some(ewma(pool.recent_wait_ms, ms));
            }
        }
        for (member, w) in [(first, w_first), (second, w_second)] {
            if let Some(user) = self.users.get_mut(member) {
                user.activity = if pending {
                    Activity::Pending {
                        session_id: session_id.clone(),
                        waiting: w,
                    }
                } else {
                    // Met somebody: nobody is avoided any more. (A pending match that is
                    // undone does not count: the avoided peer stays avoided.)
                    user.avoid = None;
                    Activity::InSession {
                        session_id: session_id.clone(),
                        prefs: w.prefs,
                    }
                };
            }
        }
        if pending {
            step.outcome.pending.push(PendingSession {
                session_id: session_id.clone(),
                handles: [members[0].handle.clone(), members[1].handle.clone()],
            });
        } else {
            self.announce(step, &session_id, &members, started_at_ms, None);
        }
        self.sessions.insert(
            session_id,
            Session {
                members,
                created_ms: started_at_ms,
                pending,
            },
        );
        self.pool_changed(step, key);
    }

    /// Sends `matched` to both members (offerer first), with their media when there is some.
    fn announce(
        &mut self,
        step: &mut Step<'_>,
        session_id: &Arc<str>,
        members: &[Member; 2],
        started_at_ms: u64,
        media: Option<[Media; 2]>,
    ) {
        let mut media = media.map(|[a, b]| [Some(a), Some(b)]);
        for (i, role) in [(0, Role::Offerer), (1, Role::Answerer)] {
            self.emit(
                step,
                &members[i].user,
                Event::Matched {
                    session_id: session_id.clone(),
                    peer: members[1 - i].handle.clone(),
                    role,
                    started_at_ms,
                    media: media.as_mut().and_then(|m| m[i].take()),
                },
            );
        }
    }

    /// Undoes a pending session. `leaver` (with why) becomes idle and is told; every other
    /// member goes back to its old place in the queue, told `error` when `error` says so, and
    /// is matched again if it can be.
    fn cancel_pending(
        &mut self,
        step: &mut Step<'_>,
        session_id: &Arc<str>,
        leaver: Option<(&UserId, DequeueReason)>,
        error: Option<&Arc<str>>,
    ) {
        let Some(session) = self.sessions.remove(session_id) else {
            return;
        };
        step.outcome.ended_sessions.push(session_id.clone());
        let mut back = Vec::with_capacity(2);
        for member in &session.members {
            let Some(user) = self.users.get_mut(&member.user) else {
                continue;
            };
            let Activity::Pending { waiting, .. } =
                std::mem::replace(&mut user.activity, Activity::Idle)
            else {
                continue;
            };
            match leaver {
                Some((id, reason)) if *id == member.user => {
                    self.emit(step, id, Event::Dequeued { reason });
                }
                _ => {
                    let pool = self.pools.entry(waiting.pool.clone()).or_default();
                    pool.waiting.insert(waiting.ticket, member.user.clone());
                    self.queued += 1;
                    if !step.outcome.changed_pools.contains(&waiting.pool) {
                        step.outcome.changed_pools.push(waiting.pool.clone());
                    }
                    user.activity = Activity::Queued(waiting);
                    if let Some(message) = error {
                        self.emit(
                            step,
                            &member.user,
                            Event::Error {
                                code: ErrorCode::MediaUnavailable,
                                message: message.clone(),
                                retry_after_ms: None,
                            },
                        );
                    }
                    back.push(member.user.clone());
                }
            }
        }
        for id in back {
            self.try_match(step, &id);
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

    /// Ends `id`'s session: tells both sides why, then re-queues whoever the rule says.
    fn end_session(
        &mut self,
        step: &mut Step<'_>,
        id: &UserId,
        (own_reason, own_requeue): (EndReason, bool),
        (peer_reason, peer_requeue): (EndReason, bool),
    ) -> Result<(), MatchError> {
        let (session_id, peer) = self
            .session_of(id)
            .ok_or(MatchError::InvalidState("not in a session".into()))?;
        self.sessions.remove(&session_id);
        step.outcome.ended_sessions.push(session_id.clone());
        let mut prefs = Vec::with_capacity(2);
        for (who, reason, requeue) in [
            (id, own_reason, own_requeue),
            (&peer, peer_reason, peer_requeue),
        ] {
            if let Some(user) = self.users.get_mut(who) {
                if let Activity::InSession { prefs: p, .. } =
                    std::mem::replace(&mut user.activity, Activity::Idle)
                {
                    prefs.push((who.clone(), p, requeue));
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
        step.outcome.ended.push(own_reason);
        for (who, p, requeue) in prefs {
            if requeue {
                self.queue(step, &who, p);
            }
        }
        Ok(())
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
            // The client learns of the match only with `matched`.
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
                let position = pool.waiting.range(..w.ticket).count() as u64;
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

/// Whether an estimate moved enough to be worth a push (20%).
fn estimate_moved(old: Option<u64>, new: Option<u64>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => o.abs_diff(n) * 5 > o.max(n),
        (None, None) => false,
        _ => true,
    }
}

#[async_trait]
impl Matchmaker for MemoryMatchmaker {
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
                }
                Activity::Queued(_) => {
                    state.dequeue(step, user, DequeueReason::Timeout);
                    step.outcome.held = true;
                }
                Activity::Pending { session_id, .. } => {
                    let session_id = session_id.clone();
                    state.cancel_pending(
                        step,
                        &session_id,
                        Some((user, DequeueReason::Timeout)),
                        None,
                    );
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

    async fn enqueue(
        &self,
        user: &UserId,
        prefs: Prefs,
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
            state.queue(step, user, prefs);
            Ok(())
        })?;
        Ok(outcome)
    }

    async fn skip(&self, user: &UserId, reference: Option<&str>) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(Some(user), reference, |state, step| {
            let (_, peer) = state
                .session_of(user)
                .ok_or(MatchError::InvalidState("not in a session".into()))?;
            state.user_mut(user)?.avoid = Some(peer.clone());
            state.user_mut(&peer)?.avoid = Some(user.clone());
            let requeue_peer = step.policy.requeue_peer_on_skip;
            state.end_session(
                step,
                user,
                (EndReason::Skip, true),
                (EndReason::PeerSkipped, requeue_peer),
            )
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
                    state.cancel_pending(step, &session_id, Some((user, DequeueReason::End)), None);
                    Ok(())
                }
                Activity::InSession { .. } => state.end_session(
                    step,
                    user,
                    (EndReason::End, false),
                    (EndReason::PeerEnded, false),
                ),
            }
        })?;
        Ok(outcome)
    }

    async fn status(&self, user: &UserId) -> Result<Status, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        state.status(user)
    }

    async fn refresh_pool(&self, pool: &str) -> Result<(), MatchError> {
        self.step(None, None, |state, step| {
            let Some(p) = state.pools.get(pool) else {
                return Ok(());
            };
            let mut updates = Vec::new();
            for (position, id) in p.waiting.values().enumerate() {
                let position = position as u64;
                let estimate = state.estimate(p, position);
                let Some(user) = state.users.get(id) else {
                    continue;
                };
                let Activity::Queued(w) = &user.activity else {
                    continue;
                };
                if user.away || (w.told.0 == position && !estimate_moved(w.told.1, estimate)) {
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
                    },
                );
            }
            Ok(())
        })?;
        Ok(())
    }

    async fn stats(&self) -> Result<Stats, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        Ok(Stats {
            queued: state.queued,
            sessions: state.sessions.len() as u64,
        })
    }

    async fn media_ready(
        &self,
        session: &str,
        media: [Media; 2],
    ) -> Result<(bool, Outcome), MatchError> {
        self.step(None, None, |state, step| {
            let Some(s) = state.sessions.get_mut(session).filter(|s| s.pending) else {
                return Ok(false);
            };
            s.pending = false;
            let members = s.members.clone();
            let session_id: Arc<str> = session.into();
            for member in &members {
                if let Some(user) = state.users.get_mut(&member.user) {
                    if let Activity::Pending { waiting, .. } =
                        std::mem::replace(&mut user.activity, Activity::Idle)
                    {
                        step.outcome
                            .waits
                            .push(step.now.duration_since(waiting.since));
                        user.avoid = None;
                        user.activity = Activity::InSession {
                            session_id: session_id.clone(),
                            prefs: waiting.prefs,
                        };
                    }
                }
            }
            state.announce(step, &session_id, &members, unix_ms(), Some(media));
            // A member whose connection dropped while the room was being made: the other one
            // learns it right away, as in a running session.
            for i in 0..2 {
                if state.users.get(&members[i].user).is_some_and(|u| u.away) {
                    state.emit(
                        step,
                        &members[1 - i].user,
                        Event::PeerStatus {
                            session_id: session_id.clone(),
                            state: PeerState::Reconnecting,
                        },
                    );
                }
            }
            Ok(true)
        })
    }

    async fn media_failed(&self, session: &str) -> Result<Outcome, MatchError> {
        let ((), outcome) = self.step(None, None, |state, step| {
            if state.sessions.get(session).is_some_and(|s| s.pending) {
                let message: Arc<str> = MEDIA_UNAVAILABLE.into();
                state.cancel_pending(step, &session.into(), None, Some(&message));
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
    ) -> Result<(MediaEffect, Outcome), MatchError> {
        self.step(None, None, |state, step| {
            if !state.first_sight(event_id, step.now, dedupe) {
                return Ok(MediaEffect::Duplicate);
            }
            let Some(s) = state.sessions.get(session).filter(|s| !s.pending) else {
                return Ok(MediaEffect::NoSession);
            };
            let requeue_peer = step.policy.requeue_peer_on_skip;
            let reason = EndReason::MediaDisconnected;
            let ended = match left {
                // Whoever left ends it; the peer is treated as if skipped.
                Some(handle) => match s.members.iter().find(|m| &*m.handle == handle) {
                    Some(m) => {
                        let user = m.user.clone();
                        state.end_session(step, &user, (reason, false), (reason, requeue_peer))
                    }
                    None => return Ok(MediaEffect::NoSession),
                },
                // The room is gone for both.
                None => {
                    let user = s.members[0].user.clone();
                    state.end_session(step, &user, (reason, false), (reason, false))
                }
            };
            ended.map(|()| MediaEffect::Ended)
        })
    }

    async fn sessions(&self) -> Result<Vec<SessionInfo>, MatchError> {
        let state = self.state.lock().expect("matchmaker state poisoned");
        Ok(state
            .sessions
            .iter()
            .map(|(id, s)| SessionInfo {
                session_id: id.clone(),
                created_ms: s.created_ms,
                pending: s.pending,
            })
            .collect())
    }

    /// One process holds all the state: it always holds every lease.
    async fn lease(&self, _name: &str, _ttl: Duration) -> Result<bool, MatchError> {
        Ok(true)
    }
}
