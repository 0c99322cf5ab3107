//! Telling the matchmaker that a connection is gone, also while the backend is down.
//!
//! A user whose detach is lost would look connected forever (sitting in queues, matched with
//! people who then wait for a ghost), so a detach the backend refuses is retried until it goes
//! through. During an outage every closing connection would otherwise start a retry loop of its
//! own, and clients told to come back later reconnect (and close again) every second: the work
//! has to be bounded. Hence:
//!
//! - only connections whose attach succeeded are detached: one that never attached (refused
//!   at the handshake's ban check, or its attach failed) left nothing to undo;
//! - a detach the backend refuses goes to one queue per instance, which holds at most one
//!   entry per user (a newer connection's detach replaces an older one's; a user who attaches
//!   again leaves the queue, since the attach took its state over). It can only hold users
//!   who were attached here when the backend went away, so it is bounded by this instance's
//!   connections; `matchgate_detach_pending` shows it;
//! - one task drains the queue, and runs only while the queue is not empty: it retries with
//!   [`backoff`](crate::backoff) while the backend is down and, once it answers, goes through
//!   the queue at most [`DRAIN_PER_SECOND`] detaches a second, so that a recovering backend is
//!   not hit by every waiting detach at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;

use super::{Gateway, Origin};
use crate::backoff;
use crate::ids::{ConnId, UserId};
use crate::matching::MatchError;
use crate::privacy;

/// Detaches per second while the queue drains.
pub const DRAIN_PER_SECOND: u32 = 1_000;
/// Backoff of the drain while the backend is down.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub(super) struct Detaches {
    /// The latest connection of each user whose attach succeeded here and that was not
    /// detached yet: the only connections that get detached.
    attached: DashMap<UserId, ConnId>,
    queue: Mutex<Queue>,
    /// `matchgate_detach_pending`: the queue's length.
    pending: Gauge,
}

/// Detaches waiting for the backend.
#[derive(Default)]
struct Queue {
    /// The connection to detach, per user.
    conns: HashMap<UserId, ConnId>,
    /// Users in the order they were queued (one entry per key of `conns`; a user whose entry
    /// was withdrawn is skipped when it comes up).
    order: VecDeque<UserId>,
    /// The drain task runs.
    draining: bool,
}

impl Queue {
    /// Queues `conn` of `user` unless a newer connection of the user is queued already.
    /// Returns whether the drain task has to be started.
    fn push(&mut self, user: &UserId, conn: ConnId) -> bool {
        match self.conns.get_mut(user) {
            Some(queued) => queued.0 = queued.0.max(conn.0),
            None => {
                self.conns.insert(user.clone(), conn);
                self.order.push_back(user.clone());
            }
        }
        !std::mem::replace(&mut self.draining, true)
    }

    /// The next detach, or `None` (and the drain task ends) when the queue is empty.
    fn pop(&mut self) -> Option<(UserId, ConnId)> {
        while let Some(user) = self.order.pop_front() {
            if let Some(conn) = self.conns.remove(&user) {
                return Some((user, conn));
            }
        }
        self.draining = false;
        None
    }
}

impl Detaches {
    pub(super) fn new(pending: Gauge) -> Self {
        Detaches {
            attached: DashMap::new(),
            queue: Mutex::default(),
            pending,
        }
    }

    /// Runs `f` on the queue and updates the gauge.
    fn with_queue<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> T {
        // The critical sections cannot panic; recover the data if one ever did.
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let value = f(&mut queue);
        self.pending.set(queue.conns.len() as i64);
        value
    }

    /// `conn` of `user` attached: it is the one to detach, and whatever an older connection
    /// left in the queue is void (the attach took the user's state over).
    pub(super) fn attached(&self, user: &UserId, conn: ConnId) {
        self.attached
            .entry(user.clone())
            .and_modify(|latest| latest.0 = latest.0.max(conn.0))
            .or_insert(conn);
        self.with_queue(|queue| {
            if queue
                .conns
                .get(user)
                .is_some_and(|queued| queued.0 < conn.0)
            {
                queue.conns.remove(user);
            }
        });
    }

    /// Whether `conn` of `user` needs a detach: it attached, and no newer connection of the
    /// user attached since. Forgets it either way.
    fn take(&self, user: &UserId, conn: ConnId) -> bool {
        self.attached
            .remove_if(user, |_, latest| *latest == conn)
            .is_some()
    }

    /// Whether a newer connection of `user` than `conn` attached meanwhile.
    fn superseded(&self, user: &UserId, conn: ConnId) -> bool {
        self.attached.get(user).is_some_and(|c| c.0 > conn.0)
    }

    fn pending(&self) -> usize {
        self.with_queue(|queue| queue.conns.len())
    }
}

impl Gateway {
    /// Tells the matchmaker that a connection is gone (nothing to do if it never attached). While
    /// the backend is unavailable the detach waits in the instance's queue.
    pub async fn detach(self: &Arc<Self>, user: &UserId, conn: ConnId) {
        if !self.detaches.take(user, conn) {
            return;
        }
        // Others wait already: the backend is down, or just back and being caught up with.
        // Their turn comes first, and this one must not hit a backend known to be away.
        if self.detaches.pending() == 0 {
            match self.call_detach(user, conn).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(%conn, error = %e, "detach failed: queued for a retry")
                }
            }
        }
        self.queue_detach(user, conn);
    }

    /// One detach call, counted, its outcome applied.
    async fn call_detach(self: &Arc<Self>, user: &UserId, conn: ConnId) -> Result<(), MatchError> {
        let result = self.matchmaker.detach(user, conn).await;
        self.metrics.detach_call(result.is_ok());
        self.apply(Origin::Connection(user, conn), result?);
        Ok(())
    }

    fn queue_detach(self: &Arc<Self>, user: &UserId, conn: ConnId) {
        if self.detaches.with_queue(|queue| queue.push(user, conn)) {
            self.background.spawn(self.clone().drain_detaches());
        }
    }

    /// Works through the detach queue until it is empty: paced, and backing off while the
    /// backend is down.
    async fn drain_detaches(self: Arc<Self>) {
        let mut pace = tokio::time::interval(Duration::from_secs(1) / DRAIN_PER_SECOND);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut delays = backoff::Delays::new(RETRY_FIRST, RETRY_MAX);
        loop {
            let Some((user, conn)) = self.detaches.with_queue(Queue::pop) else {
                return;
            };
            pace.tick().await;
            match self.call_detach(&user, conn).await {
                Ok(()) => delays = backoff::Delays::new(RETRY_FIRST, RETRY_MAX),
                Err(MatchError::Unavailable(e)) => {
                    // Back in line, unless the user has attached again meanwhile.
                    if !self.detaches.superseded(&user, conn) {
                        self.detaches.with_queue(|queue| queue.push(&user, conn));
                    }
                    let delay = delays.next_delay();
                    tracing::debug!(error = %e, ?delay, "backend still unavailable for detaches");
                    tokio::time::sleep(delay).await;
                }
                // Not an outage: trying again would fail again.
                Err(e) => tracing::error!(
                    %conn,
                    user = %privacy::shown(&user),
                    error = %e,
                    "detach failed for good"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_the_latest_connection_per_user_in_order() {
        let mut q = Queue::default();
        let (a, b): (UserId, UserId) = ("a".into(), "b".into());
        assert!(q.push(&a, ConnId(1)), "the first entry starts the drain");
        assert!(!q.push(&b, ConnId(5)));
        assert!(!q.push(&a, ConnId(3)));
        assert!(!q.push(&a, ConnId(2)), "an older connection does not win");
        assert_eq!(q.conns.len(), 2);
        assert_eq!(q.pop(), Some((a.clone(), ConnId(3))));
        assert_eq!(q.pop(), Some((b, ConnId(5))));
        assert_eq!(q.pop(), None);
        assert!(!q.draining, "an empty queue ends the drain");
        assert!(q.push(&a, ConnId(4)), "and the next entry starts it again");
    }

    #[test]
    fn only_the_latest_attached_connection_is_detached() {
        let d = Detaches::new(Gauge::default());
        let u: UserId = "u".into();
        assert!(!d.take(&u, ConnId(1)), "never attached");
        d.attached(&u, ConnId(1));
        d.attached(&u, ConnId(2));
        assert!(!d.take(&u, ConnId(1)), "taken over by a newer connection");
        assert!(d.superseded(&u, ConnId(1)));
        assert!(d.take(&u, ConnId(2)));
        assert!(!d.take(&u, ConnId(2)), "once");
        d.with_queue(|q| q.push(&u, ConnId(3)));
        assert_eq!(d.pending.get(), 1);
        d.attached(&u, ConnId(4));
        assert_eq!(
            d.pending(),
            0,
            "attaching again withdraws the queued detach"
        );
        assert_eq!(d.pending.get(), 0);
    }
}
