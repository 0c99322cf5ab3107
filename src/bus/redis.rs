//! Cross-instance delivery in the scale-out mode: Redis pub/sub.
//!
//! Every instance listens on its own channel. The matching script publishes each frame on the
//! channel of the instance that holds the user's connection, in the same atomic step that logs
//! it, so frames arrive in `seq` order. Here they are handed to this instance's
//! [`Registry`](crate::registry::Registry) straight from the connection's reader: no queue in
//! between, and pushing never blocks.
//!
//! The subscription runs on a `ConnectionManager` that reconnects and re-subscribes by itself.
//! Pub/sub is at-most-once: messages published while the subscriber was away are lost, so
//! after a reconnection the [`Recovery`] signal fires and the instance catches every local
//! connection up from the users' logs (see `scaleout`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

use super::Frame;
use crate::matching::ConnId;
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::registry::Registry;

/// Raised after the subscription was lost and restored.
#[derive(Default)]
pub struct Recovery {
    lost: AtomicBool,
    pub restored: Notify,
}

/// Opens the subscriber connection and subscribes to `channel`. The returned manager must be
/// kept alive for as long as the subscription should last.
pub async fn subscribe(
    url: &str,
    channel: &str,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    recovery: Arc<Recovery>,
) -> redis::RedisResult<ConnectionManager> {
    // Push messages (and automatic re-subscription) need RESP3.
    let separator = if url.contains('?') { '&' } else { '?' };
    let client = redis::Client::open(format!("{url}{separator}protocol=resp3"))?;
    let sink = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
        match push.kind {
            PushKind::Message => {
                if let Some(Value::BulkString(payload)) = push.data.get(1) {
                    metrics.pubsub_received();
                    dispatch(&registry, payload);
                }
            }
            PushKind::Disconnection => {
                recovery.lost.store(true, Ordering::Release);
            }
            // A subscription confirmed after a disconnection: the manager re-subscribed.
            PushKind::Subscribe if recovery.lost.swap(false, Ordering::AcqRel) => {
                recovery.restored.notify_one();
            }
            _ => {}
        }
        Ok(())
    };
    let config = ConnectionManagerConfig::new()
        .set_push_sender(sink)
        .set_automatic_resubscription();
    let mut manager = client.get_connection_manager_with_config(config).await?;
    manager.subscribe(channel).await?;
    Ok(manager)
}

/// Hands one published message to the local connection it is for:
/// `F<user>\n<seq>\n<frame>` (seq 0: none) or `K<user>\n<conn>` (close a replaced connection;
/// `conn` as [`ConnId`] displays it).
fn dispatch(registry: &Registry, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let (kind, rest) = text.split_at(text.len().min(1));
    let Some((user, rest)) = rest.split_once('\n') else {
        return;
    };
    match kind {
        "F" => {
            let Some((seq, frame)) = rest.split_once('\n') else {
                return;
            };
            let seq = seq.parse::<u64>().ok().filter(|s| *s > 0);
            let user: crate::matching::UserId = user.into();
            registry.push(
                &user,
                Frame {
                    seq,
                    text: frame.into(),
                },
            );
        }
        "K" => {
            if let Some(conn) = ConnId::parse(rest) {
                registry.close_if(user, conn, close::REPLACED);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ConnectionHandle, Next};

    #[tokio::test]
    async fn dispatches_frames_and_kicks() {
        let registry = Registry::default();
        let (handle, outbox) = ConnectionHandle::new(ConnId(7), 8);
        registry.register("u\u{e9}".into(), handle);
        outbox.start_at(0);
        dispatch(&registry, "Fu\u{e9}\n1\n{\"type\":\"queued\"}".as_bytes());
        dispatch(&registry, b"Fnobody\n1\n{}");
        dispatch(&registry, b"garbage");
        match outbox.next().await {
            Next::Send(f) => {
                assert_eq!(f.seq, Some(1));
                assert_eq!(f.text.as_str(), "{\"type\":\"queued\"}");
            }
            Next::Close(c) => panic!("closed {c}"),
        }
        dispatch(&registry, "Ku\u{e9}\nc0000000000000008".as_bytes()); // another: ignored
        dispatch(&registry, "Ku\u{e9}\nc0000000000000007".as_bytes());
        assert!(matches!(outbox.next().await, Next::Close(close::REPLACED)));
    }
}
