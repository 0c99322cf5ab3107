//! The connection registry: which user has a live WebSocket on this instance.
//!
//! A `DashMap` from user id to a [`ConnectionHandle`]. A handle can only push frames into the
//! connection's bounded outbound queue or ask the connection to close; the connection task owns
//! the socket. Pushing never blocks: when a client's queue is full the connection is closed as a
//! slow consumer (its events stay in the user's log for replay), so one slow reader cannot
//! stall matching for everyone else or grow memory without bound.
//!
//! A handle also knows the connection's client address and device id (when the token names
//! one), so that a ban of either finds the connections it must close.
//!
//! It depends on the shared identifiers of [`crate::ids`] only, not on the bus that feeds it
//! nor on the engines.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use dashmap::DashMap;

use crate::ids::{ConnId, Frame, KeyedHasher, UserId};
use crate::protocol::close;

/// A connection's bounded outbound queue plus its close request, behind one lock. Written for
/// this purpose instead of a tokio `mpsc` channel because an idle connection must cost almost
/// nothing: this allocates only while frames are queued, where a channel allocates a block of
/// slots up front for every connection.
///
/// It has one reader, the connection task, so the wake-up is the task's waker kept under the
/// same lock (no `Notify`, whose every `notify_one` and wait cost a second synchronisation).
/// The waker is stored only when [`Outbox::next`] found nothing to do and is taken by the
/// first push after that: the task is woken once when its outbox goes from empty to
/// non-empty, not once per frame. A frame pushed while the task is busy (writing, handling a
/// request) wakes nobody; the task finds it when it comes back to [`Outbox::next`].
pub struct Outbox {
    state: Mutex<OutboxState>,
    capacity: usize,
}

#[derive(Default)]
struct OutboxState {
    frames: VecDeque<Frame>,
    /// The first close request wins.
    close: Option<u16>,
    /// The `seq` of the last event queued; `None` until the connection has attached (frames
    /// are buffered as they come until then).
    last_seq: Option<u64>,
    /// The connection task, while it waits in [`Outbox::next`] with nothing to do.
    waiter: Option<Waker>,
}

impl OutboxState {
    /// Takes the waiting task's waker, to wake it once the lock is released (waking under
    /// the lock would let the task run into it).
    fn wake(&mut self) -> Option<Waker> {
        self.waiter.take()
    }
}

/// What a connection should do next.
pub enum Next {
    Send(Frame),
    Close(u16),
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Outbox {
            state: Mutex::new(OutboxState::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        // The critical sections below cannot panic; recover the data if one ever did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame; on overflow asks the connection to close as a slow consumer.
    ///
    /// Events arrive in `seq` order. One at or below the last queued `seq` is a duplicate
    /// (already replayed or re-sent) and is dropped; one beyond the next `seq` means frames were
    /// lost in transit, and the connection is closed so that the client resumes and gets them
    /// from the log in order.
    pub fn push(&self, frame: Frame) {
        let waiter = {
            let mut state = self.lock();
            if state.close.is_some() {
                return;
            }
            if let (Some(seq), Some(last)) = (frame.seq, state.last_seq) {
                if seq <= last {
                    return;
                }
                if seq > last + 1 {
                    state.close = Some(close::RESYNC);
                    state.frames = VecDeque::new();
                    let waiter = state.wake();
                    drop(state);
                    return wake(waiter);
                }
                state.last_seq = Some(seq);
            }
            if state.frames.len() >= self.capacity {
                state.close = Some(close::SLOW_CONSUMER);
                state.frames = VecDeque::new();
            } else {
                state.frames.push_back(frame);
            }
            state.wake()
        };
        wake(waiter);
    }

    /// Starts ordered delivery after the client has been brought up to `last_seq` (by the
    /// `welcome` state and the replay): buffered events up to it are dropped.
    pub fn start_at(&self, last_seq: u64) {
        let mut state = self.lock();
        state.frames.retain(|f| f.seq.is_none_or(|s| s > last_seq));
        let mut last = last_seq;
        let mut contiguous = true;
        for seq in state.frames.iter().filter_map(|f| f.seq) {
            contiguous &= seq == last + 1;
            last = seq;
        }
        if !contiguous {
            state.close.get_or_insert(close::RESYNC);
        }
        state.last_seq = Some(last);
        let waiter = state.wake();
        drop(state);
        wake(waiter);
    }

    /// The `seq` of the last event queued, once delivery has started.
    pub fn last_seq(&self) -> Option<u64> {
        self.lock().last_seq
    }

    /// Asks the connection to close with `code`; false when it was asked before (the first
    /// request wins).
    pub fn close(&self, code: u16) -> bool {
        let (first, waiter) = {
            let mut state = self.lock();
            let first = state.close.is_none();
            state.close.get_or_insert(code);
            (first, state.wake())
        };
        wake(waiter);
        first
    }

    /// Waits for a frame to send or a close request (which takes precedence). Cancel-safe:
    /// nothing is taken from the queue unless it is returned.
    ///
    /// The check and the storing of the waker happen under one lock, so a push cannot fall
    /// between them unseen. A waker left behind by a wait that was cancelled (the connection's
    /// `select!` took another branch) only causes one needless poll of the task.
    pub async fn next(&self) -> Next {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if let Some(code) = state.close {
                return Poll::Ready(Next::Close(code));
            }
            if let Some(frame) = state.frames.pop_front() {
                return Poll::Ready(Next::Send(frame));
            }
            match &mut state.waiter {
                Some(waiter) if waiter.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The next queued frame without waiting, so that frames queued together go out in one
    /// write. `None` when the queue is empty or a close was asked for (which [`Self::next`]
    /// then reports first).
    pub fn try_next(&self) -> Option<Frame> {
        let mut state = self.lock();
        if state.close.is_some() {
            return None;
        }
        state.frames.pop_front()
    }
}

fn wake(waiter: Option<Waker>) {
    if let Some(waiter) = waiter {
        waiter.wake();
    }
}

/// Handle to one live connection: it can push frames and ask for a close, nothing else.
#[derive(Clone)]
pub struct ConnectionHandle {
    id: ConnId,
    outbox: Arc<Outbox>,
    ip: IpAddr,
    device: Option<Arc<str>>,
}

impl ConnectionHandle {
    /// Creates a handle for a connection from `ip` (and `device`, if its token names one) and
    /// the outbox the connection task reads.
    pub fn new(
        id: ConnId,
        capacity: usize,
        ip: IpAddr,
        device: Option<Arc<str>>,
    ) -> (Self, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(capacity));
        (
            ConnectionHandle {
                id,
                outbox: outbox.clone(),
                ip,
                device,
            },
            outbox,
        )
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The client's address (canonical: an IPv4-mapped IPv6 address is the IPv4 address).
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn device(&self) -> Option<&str> {
        self.device.as_deref()
    }

    pub fn push(&self, frame: Frame) {
        self.outbox.push(frame);
    }

    /// Asks the connection to close; false when it was asked before.
    pub fn close(&self, code: u16) -> bool {
        self.outbox.close(code)
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.outbox.last_seq()
    }
}

#[derive(Default)]
pub struct Registry {
    connections: DashMap<UserId, ConnectionHandle, KeyedHasher>,
}

impl Registry {
    /// Registers `handle` for `user` and closes the connection it replaces, if any. Connection
    /// ids grow, so a connection older than the registered one (its upgrade finished later)
    /// does not take over: it is closed instead, and `false` is returned.
    pub fn register(&self, user: UserId, handle: ConnectionHandle) -> bool {
        match self.connections.entry(user) {
            dashmap::Entry::Occupied(mut e) if e.get().id.0 < handle.id.0 => {
                e.insert(handle).close(close::REPLACED);
                true
            }
            dashmap::Entry::Occupied(_) => {
                handle.close(close::REPLACED);
                false
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(handle);
                true
            }
        }
    }

    /// Removes the user's entry only if it still belongs to connection `id`.
    pub fn unregister(&self, user: &UserId, id: ConnId) {
        self.connections.remove_if(user, |_, h| h.id == id);
    }

    pub fn push(&self, user: &UserId, frame: Frame) {
        if let Some(handle) = self.connections.get(user) {
            handle.push(frame);
        }
    }

    /// Closes the user's connection if it is still connection `id`.
    pub fn close_if(&self, user: &str, id: ConnId, code: u16) {
        if let Some(handle) = self.connections.get(user) {
            if handle.id == id {
                handle.close(code);
            }
        }
    }

    /// Closes every connection `matches` picks; returns how many were not closing already. A
    /// scan of all connections: for rare events (bans), not for delivery.
    pub fn close_where(
        &self,
        matches: impl Fn(&str, &ConnectionHandle) -> bool,
        code: u16,
    ) -> usize {
        self.connections
            .iter()
            .filter(|entry| matches(entry.key(), entry.value()) && entry.value().close(code))
            .count()
    }

    /// Asks every connection to close with `code`.
    pub fn close_all(&self, code: u16) {
        for entry in self.connections.iter() {
            entry.value().close(code);
        }
    }

    /// A snapshot of the live connections, for catching them up after lost deliveries.
    pub fn snapshot(&self) -> Vec<(UserId, ConnectionHandle)> {
        self.connections
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn frame(seq: u64) -> Frame {
        Frame {
            seq: Some(seq),
            text: format!("{{\"seq\":{seq}}}").into(),
        }
    }

    #[tokio::test]
    async fn delivers_in_order_then_closes_a_slow_consumer() {
        let registry = Registry::default();
        let user: UserId = "u".into();
        let (handle, outbox) = ConnectionHandle::new(ConnId(1), 2, LOOPBACK, None);
        registry.register(user.clone(), handle);
        outbox.start_at(0);
        registry.push(&user, frame(1));
        registry.push(&user, frame(2));
        assert!(matches!(outbox.next().await, Next::Send(f) if f.seq == Some(1)));
        registry.push(&user, frame(3));
        registry.push(&user, frame(4)); // over capacity: 2 and 3 are queued
        assert!(matches!(
            outbox.next().await,
            Next::Close(close::SLOW_CONSUMER)
        ));
        // Closing is final: later frames are not queued.
        registry.push(&user, frame(5));
        assert!(matches!(
            outbox.next().await,
            Next::Close(close::SLOW_CONSUMER)
        ));
    }

    #[tokio::test]
    async fn drops_duplicates_and_closes_on_a_gap() {
        let (handle, outbox) = ConnectionHandle::new(ConnId(1), 8, LOOPBACK, None);
        // Before attaching, frames are buffered whatever their seq.
        handle.push(frame(4));
        handle.push(frame(6));
        handle.push(frame(5));
        // The client was brought up to 5: 4 and 5 go, 6 stays.
        outbox.start_at(5);
        assert!(matches!(outbox.next().await, Next::Send(f) if f.seq == Some(6)));
        handle.push(frame(6)); // duplicate
        handle.push(frame(7));
        assert!(matches!(outbox.next().await, Next::Send(f) if f.seq == Some(7)));
        assert_eq!(outbox.last_seq(), Some(7));
        handle.push(frame(9)); // 8 was lost
        assert!(matches!(outbox.next().await, Next::Close(close::RESYNC)));
    }

    #[tokio::test]
    async fn try_next_takes_what_is_queued_and_leaves_a_close_to_next() {
        let (handle, outbox) = ConnectionHandle::new(ConnId(1), 8, LOOPBACK, None);
        outbox.start_at(0);
        assert!(outbox.try_next().is_none(), "nothing queued");
        handle.push(frame(1));
        handle.push(frame(2));
        assert_eq!(outbox.try_next().and_then(|f| f.seq), Some(1));
        handle.close(close::REPLACED);
        assert!(outbox.try_next().is_none(), "a close comes first");
        assert!(matches!(outbox.next().await, Next::Close(close::REPLACED)));
    }

    /// A waker that counts how often it is woken.
    #[derive(Default)]
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl CountingWaker {
        fn wakes(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Polls `outbox.next()` once with `waker`.
    fn poll_next(outbox: &Outbox, waker: &Waker) -> Poll<Next> {
        let mut cx = std::task::Context::from_waker(waker);
        std::pin::pin!(outbox.next()).as_mut().poll(&mut cx)
    }

    use std::future::Future;

    #[test]
    fn wakes_the_task_once_when_the_outbox_stops_being_empty() {
        let (handle, outbox) = ConnectionHandle::new(ConnId(1), 8, LOOPBACK, None);
        outbox.start_at(0);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());

        assert!(poll_next(&outbox, &waker).is_pending(), "nothing queued");
        handle.push(frame(1));
        handle.push(frame(2));
        assert_eq!(counter.wakes(), 1, "one wake-up for the two frames");
        assert!(
            matches!(poll_next(&outbox, &waker), Poll::Ready(Next::Send(f)) if f.seq == Some(1))
        );
        assert_eq!(outbox.try_next().and_then(|f| f.seq), Some(2));

        // The task is busy (writing): a frame pushed now wakes nobody, and is still the next
        // thing it gets.
        handle.push(frame(3));
        assert_eq!(counter.wakes(), 1);
        assert!(
            matches!(poll_next(&outbox, &waker), Poll::Ready(Next::Send(f)) if f.seq == Some(3))
        );

        // A close wakes a waiting task too.
        assert!(poll_next(&outbox, &waker).is_pending());
        handle.close(close::REPLACED);
        assert_eq!(counter.wakes(), 2);
        assert!(matches!(
            poll_next(&outbox, &waker),
            Poll::Ready(Next::Close(close::REPLACED))
        ));
    }

    #[tokio::test]
    async fn a_waiting_task_gets_frames_pushed_from_another_task() {
        let (handle, outbox) = ConnectionHandle::new(ConnId(1), 8, LOOPBACK, None);
        outbox.start_at(0);
        let reader = tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < 5 {
                if let Next::Send(f) = outbox.next().await {
                    seqs.extend(f.seq);
                }
            }
            seqs
        });
        // Pushed one by one with the reader let run in between (so that it waits on an empty
        // outbox each time), then two at once.
        for seq in 1..=3 {
            handle.push(frame(seq));
            tokio::task::yield_now().await;
        }
        handle.push(frame(4));
        handle.push(frame(5));
        assert_eq!(reader.await.unwrap(), vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_newer_connection_is_not_unregistered_by_the_old_one() {
        let registry = Registry::default();
        let user: UserId = "u".into();
        let (old, old_outbox) = ConnectionHandle::new(ConnId(1), 8, LOOPBACK, None);
        let (new, new_outbox) = ConnectionHandle::new(ConnId(2), 8, LOOPBACK, None);
        new_outbox.start_at(0);
        let (older, older_outbox) = ConnectionHandle::new(ConnId(0), 8, LOOPBACK, None);
        assert!(registry.register(user.clone(), old));
        assert!(registry.register(user.clone(), new));
        // An older connection arriving late does not take over.
        assert!(!registry.register(user.clone(), older));
        assert!(matches!(
            older_outbox.next().await,
            Next::Close(close::REPLACED)
        ));
        assert!(matches!(
            old_outbox.next().await,
            Next::Close(close::REPLACED)
        ));
        registry.unregister(&user, ConnId(1));
        assert_eq!(registry.len(), 1);
        registry.push(&user, frame(1));
        assert!(matches!(new_outbox.next().await, Next::Send(_)));
        registry.unregister(&user, ConnId(2));
        assert!(registry.is_empty());
    }
}
