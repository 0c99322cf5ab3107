//! The connection registry: which user has a live WebSocket on this instance.
//!
//! A `DashMap` from user id to a [`ConnectionHandle`]. A handle can only push frames into the
//! connection's bounded outbound queue or ask the connection to close; the connection task owns
//! the socket. Pushing never blocks: when a client's queue is full the connection is closed as a
//! slow consumer (its events stay in the user's log for replay), so one slow reader cannot
//! stall matching for everyone else or grow memory without bound.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, Notify};

use crate::bus::Frame;
use crate::matching::{ConnId, UserId};
use crate::protocol::close;

/// Handle to one live connection.
#[derive(Clone)]
pub struct ConnectionHandle {
    id: ConnId,
    frames: mpsc::Sender<Frame>,
    control: Arc<Control>,
}

/// Out-of-band close request, readable even when the frame queue is full.
#[derive(Default)]
pub struct Control {
    close_code: AtomicU16,
    notify: Notify,
}

impl Control {
    /// Waits until someone asked this connection to close, and returns the close code.
    pub async fn closed(&self) -> u16 {
        loop {
            let code = self.close_code.load(Ordering::Acquire);
            if code != 0 {
                return code;
            }
            self.notify.notified().await;
        }
    }
}

impl ConnectionHandle {
    /// Creates a handle and the receiving ends the connection task keeps.
    pub fn new(id: ConnId, capacity: usize) -> (Self, mpsc::Receiver<Frame>, Arc<Control>) {
        let (frames, rx) = mpsc::channel(capacity);
        let control = Arc::new(Control::default());
        (
            ConnectionHandle {
                id,
                frames,
                control: control.clone(),
            },
            rx,
            control,
        )
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queues a frame; on overflow asks the connection to close as a slow consumer.
    pub fn push(&self, frame: Frame) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.frames.try_send(frame) {
            self.close(close::SLOW_CONSUMER);
        }
    }

    /// Asks the connection to close with `code`. The first request wins.
    pub fn close(&self, code: u16) {
        let _ =
            self.control
                .close_code
                .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.control.notify.notify_one();
    }
}

#[derive(Default)]
pub struct Registry {
    connections: DashMap<UserId, ConnectionHandle>,
}

impl Registry {
    /// Registers `handle` for `user` and returns the connection it replaces, if any.
    pub fn register(&self, user: UserId, handle: ConnectionHandle) -> Option<ConnectionHandle> {
        self.connections.insert(user, handle)
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

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}
