//! Graceful shutdown signalling, after tokio-rs/mini-redis.
//!
//! The server flips one `watch` flag; every connection task holds a [`Shutdown`] and learns of
//! it in its `select!` loop. Unlike a broadcast, a `watch` also tells a connection that was
//! still being set up when the signal fired. Completion is tracked separately: each task holds
//! a clone of an `mpsc::Sender`, and the server waits until all of them are dropped.

use tokio::sync::watch;

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
