//! Graceful shutdown signalling, after tokio-rs/mini-redis.
//!
//! The server flips one `watch` flag; every connection task holds a [`Shutdown`] and learns of
//! it in its `select!` loop. Unlike a broadcast, a `watch` also tells a connection that was
//! still being set up when the signal fired. Completion is tracked separately: every connection
//! task runs in the server's `TaskTracker`, and the server waits until all of them have ended.
//!
//! Background work that belongs to no connection (timers, media rooms, the detach queue, the
//! Redis loops, the ledger writer, webhook deliveries, the key-set refresh) runs in
//! [`Background`]: tracked by a tokio-util `TaskTracker` and cancelled by a
//! `CancellationToken` once the connections have drained (and the ledger and webhooks have had
//! the rest of the drain timeout to finish), so that a drained server leaves no task behind.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone)]
pub struct Shutdown {
    signal: watch::Receiver<bool>,
}

impl Shutdown {
    pub fn new(signal: watch::Receiver<bool>) -> Self {
        Shutdown { signal }
    }

    /// Resolves once shutdown has been signalled (at once if it already was).
    pub async fn recv(&mut self) {
        // An error means the sender is gone, which only happens when the server is gone.
        let _ = self.signal.wait_for(|stop| *stop).await;
    }
}

/// The instance's background work (timers, room set-up and removal, the detach queue, the
/// Redis loops): every task is tracked, and the drain cancels and awaits them.
///
/// A task spawned here runs until it ends by itself or the background is shut down, whichever
/// comes first: cancellation drops it at its next `.await`. That is safe for every task the
/// gateway runs: what a cancelled timer or detach would have done is done anyway after the
/// process is gone (the Redis engine's clean-up of a dead instance and its held states), or
/// goes with the process (the embedded engine's state). The ledger's writes and the webhook
/// deliveries are drained before the shutdown; in Redis mode a webhook delivery cut short is
/// taken over from the outbox by another instance.
#[derive(Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Background {
    /// Runs `task` in the background until it ends or [`Background::shut_down`] is called. A
    /// task spawned after that ends at once.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Tasks that have not ended yet.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Whether [`Background::shut_down`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Cancels every task and waits up to `timeout` until all have ended. Returns whether
    /// they all did.
    pub async fn shut_down(&self, timeout: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutting_down_cancels_and_awaits_every_task() {
        let background = Background::default();
        let (finished_tx, mut finished) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..3 {
            background.spawn(std::future::pending());
        }
        let done = finished_tx.clone();
        background.spawn(async move {
            let _ = done.send(());
        });
        finished.recv().await.expect("a short task runs to its end");
        assert_eq!(background.running(), 3, "the endless ones still run");
        assert!(background.shut_down(Duration::from_secs(5)).await);
        assert_eq!(background.running(), 0);
        // Too late: ends at once, without running.
        background.spawn(async move {
            let _ = finished_tx.send(());
        });
        assert!(background.shut_down(Duration::from_secs(5)).await);
        assert_eq!(background.running(), 0);
        assert!(
            finished.try_recv().is_err(),
            "nothing ran after the shutdown"
        );
    }
}
