//! Delivery of frames to users wherever their connection lives.
//!
//! The [`Bus`] is the cross-instance seam (Centrifugo calls it the broker): a matchmaker hands
//! it frames that are already serialised and sequenced, and the bus brings each to the
//! connection that holds the user. The in-process implementation writes straight into this
//! instance's [`Registry`](crate::registry::Registry); a Redis implementation routes through
//! pub/sub to the instance that holds the user. Delivery is at-most-once by design: every
//! frame with a `seq` is also in the user's event log, so a lost delivery is recovered by
//! resume and replay.
//!
//! The bus names no engine: frames and user ids come from the leaf [`crate::ids`] (re-exported
//! here as [`Frame`]), and the Redis subscriber hands ban notices to whoever subscribed it.

pub mod local;
pub mod redis;

pub use crate::ids::Frame;
use crate::ids::UserId;

/// Hands frames to users' connections. Must never block: it is called inside a matchmaker's
/// atomic step, and a slow client must not hold anyone else up.
pub trait Bus: Send + Sync + 'static {
    fn deliver(&self, user: &UserId, frame: Frame);
}
