//! Cross-instance delivery in the scale-out mode: Redis pub/sub.
//!
//! Every instance listens on its own channel. The matching library publishes each frame on the
//! channel of the instance that holds the user's connection, in the same atomic step that logs
//! it, so frames arrive in `seq` order; what one call has for an instance travels as one
//! message of several notices, read here in order. Here they are handed to this instance's
//! [`Registry`](crate::registry::Registry) straight from the connection's reader: no queue in
//! between, and pushing never blocks.
//!
//! Every instance also listens on one broadcast channel of the deployment, where the
//! moderation backend announces new bans: each instance closes the banned identity's
//! connections it holds. What a ban closes is moderation's business: the subscriber hands
//! each ban notice to the `on_ban` it was given (so delivery does not depend on moderation).
//! Channel names and the message encoding are [`crate::redis_keys`]'s.
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

use crate::ids::{Frame, UserId};
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::redis_keys::Notice;
use crate::registry::Registry;

/// The longest wait between two attempts at reconnecting the subscriber.
const RECONNECT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Raised after the subscription was lost and restored.
#[derive(Default)]
pub struct Recovery {
    lost: AtomicBool,
    pub restored: Notify,
}

/// Opens the subscriber connection and subscribes to `channels`. Frames and kicks go to
/// `registry`; a ban notice goes to `on_ban` with the ban's kind and value as the notice
/// spells them. The returned manager must be kept alive for as long as the subscription
/// should last.
pub async fn subscribe(
    url: &str,
    channels: &[&str],
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    recovery: Arc<Recovery>,
    on_ban: impl Fn(&str, &str) + Send + Sync + 'static,
) -> redis::RedisResult<ConnectionManager> {
    // Push messages (and automatic re-subscription) need RESP3.
    let separator = if url.contains('?') { '&' } else { '?' };
    let client = redis::Client::open(format!("{url}{separator}protocol=resp3"))?;
    let sink = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
        match push.kind {
            PushKind::Message => {
                if let Some(Value::BulkString(payload)) = push.data.get(1) {
                    metrics.pubsub_received();
                    dispatch(&registry, &on_ban, payload);
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
    // Reconnect for as long as Redis is away: by default the manager gives up after six
    // attempts, and a subscriber sends no command that would make it try again, so after a
    // longer outage the instance would never hear of its users' events again.
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(usize::MAX)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_push_sender(sink)
        .set_automatic_resubscription();
    let mut manager = client.get_connection_manager_with_config(config).await?;
    manager.subscribe(channels).await?;
    Ok(manager)
}

/// Acts on one published message: one notice, or every notice of a call's message in order
/// (see [`Notice::decode_all`] for the encodings).
fn dispatch(registry: &Registry, on_ban: &impl Fn(&str, &str), payload: &[u8]) {
    for notice in Notice::decode_all(payload).unwrap_or_default() {
        match notice {
            Notice::Frame { user, seq, text } => registry.push(
                &UserId::from(user),
                Frame {
                    seq,
                    text: text.into(),
                },
            ),
            Notice::Kick { user, conn } => registry.close_if(user, conn, close::REPLACED),
            Notice::Ban { kind, value } => on_ban(kind, value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ConnId;
    use crate::moderation::{announced, BanKind};
    use crate::registry::{ConnectionHandle, Next};

    fn connection(
        registry: &Registry,
        user: &str,
        id: u64,
        ip: &str,
    ) -> Arc<crate::registry::Outbox> {
        let (handle, outbox) = ConnectionHandle::new(ConnId(id), 8, ip.parse().unwrap(), None);
        registry.register(user.into(), handle);
        outbox.start_at(0);
        outbox
    }

    #[tokio::test]
    async fn dispatches_frames_and_kicks() {
        let registry = Registry::default();
        let no_bans = |_: &str, _: &str| panic!("no ban was announced");
        let outbox = connection(&registry, "u\u{e9}", 7, "10.0.0.1");
        dispatch(
            &registry,
            &no_bans,
            "Fu\u{e9}\n1\n{\"type\":\"queued\"}".as_bytes(),
        );
        dispatch(&registry, &no_bans, b"Fnobody\n1\n{}");
        dispatch(&registry, &no_bans, b"garbage");
        match outbox.next().await {
            Next::Send(f) => {
                assert_eq!(f.seq, Some(1));
                assert_eq!(f.text.as_str(), "{\"type\":\"queued\"}");
            }
            Next::Close(c) => panic!("closed {c}"),
        }
        dispatch(
            &registry,
            &no_bans,
            "Ku\u{e9}\nc0000000000000008".as_bytes(),
        ); // another: ignored
        dispatch(
            &registry,
            &no_bans,
            "Ku\u{e9}\nc0000000000000007".as_bytes(),
        );
        assert!(matches!(outbox.next().await, Next::Close(close::REPLACED)));
    }

    #[tokio::test]
    async fn dispatches_every_notice_of_a_message_in_order() {
        let registry = Registry::default();
        let no_bans = |_: &str, _: &str| panic!("no ban was announced");
        let outbox = connection(&registry, "u", 7, "10.0.0.1");
        let message = Notice::encode_all(&[
            Notice::Frame {
                user: "u",
                seq: Some(1),
                text: "{\"n\":1}",
            },
            Notice::Frame {
                user: "nobody",
                seq: Some(9),
                text: "{}",
            },
            Notice::Frame {
                user: "u",
                seq: None,
                text: "{\"n\":\n2}",
            },
            // Another connection of u's: not this one.
            Notice::Kick {
                user: "u",
                conn: ConnId(8),
            },
        ]);
        dispatch(&registry, &no_bans, message.as_bytes());
        for (seq, text) in [(Some(1), "{\"n\":1}"), (None, "{\"n\":\n2}")] {
            match outbox.next().await {
                Next::Send(f) => {
                    assert_eq!(f.seq, seq);
                    assert_eq!(f.text.as_str(), text);
                }
                Next::Close(c) => panic!("closed {c}"),
            }
        }
        // And a kick inside a message closes the connection it names.
        let kick = Notice::Kick {
            user: "u",
            conn: ConnId(7),
        };
        dispatch(
            &registry,
            &no_bans,
            Notice::encode_all(&[kick.clone(), kick]).as_bytes(),
        );
        assert!(matches!(outbox.next().await, Next::Close(close::REPLACED)));
    }

    #[tokio::test]
    async fn a_ban_notice_closes_the_connections_it_names() {
        let registry = Registry::default();
        let metrics = Metrics::new();
        let on_ban = |kind: &str, value: &str| announced(&registry, &metrics, kind, value);
        let by_user = connection(&registry, "a", 1, "10.0.0.1");
        let by_ip = connection(&registry, "b", 2, "10.0.0.2");
        dispatch(&registry, &on_ban, b"Bnonsense\n10.0.0.1");
        dispatch(
            &registry,
            &on_ban,
            Notice::Ban {
                kind: BanKind::Ip.as_str(),
                value: "10.0.0.2",
            }
            .encode()
            .as_bytes(),
        );
        assert!(matches!(by_ip.next().await, Next::Close(close::BANNED)));
        dispatch(
            &registry,
            &on_ban,
            Notice::Ban {
                kind: BanKind::User.as_str(),
                value: "a",
            }
            .encode()
            .as_bytes(),
        );
        assert!(matches!(by_user.next().await, Next::Close(close::BANNED)));
    }
}
