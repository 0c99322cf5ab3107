//! The Rust and Lua halves of the Redis layout agree: what the matching library publishes
//! (written by its own helpers in `src/matching/lua/events.lua`) arrives on the channel
//! [`Layout::channel`] names and decodes with [`Notice::decode`] into what the client got.
//! Runs against a real `redis-server` on an ephemeral port, with gateway instances in
//! process.

mod common;

use common::redis::Backend;
use common::{Closed, PATIENCE};
use futures_util::StreamExt;
use matchgate::redis_keys::{Layout, Notice};
use serde_json::json;

/// A subscription to every instance channel of the deployment `mg`.
async fn listen(url: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(url).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    let layout = Layout::new("mg");
    pubsub
        .psubscribe(format!("{}*", layout.channel_prefix))
        .await
        .unwrap();
    pubsub
}

/// The next message on an instance channel that decodes to a notice `wanted` accepts; every
/// message there must decode.
async fn next_notice(
    pubsub: &mut redis::aio::PubSub,
    wanted: impl Fn(&Notice<'_>) -> bool,
) -> (String, Vec<u8>) {
    let layout = Layout::new("mg");
    let read = async {
        let mut messages = pubsub.on_message();
        loop {
            let message = messages.next().await.expect("subscribed");
            let channel = message.get_channel_name().to_string();
            let payload = message.get_payload_bytes().to_vec();
            let instance = channel
                .strip_prefix(&layout.channel_prefix)
                .expect("on an instance channel");
            assert_eq!(layout.channel(instance), channel);
            let notice = Notice::decode(&payload).unwrap_or_else(|| {
                panic!(
                    "the Rust decoder cannot read what Lua published: {:?}",
                    String::from_utf8_lossy(&payload)
                )
            });
            if wanted(&notice) {
                return (channel, payload);
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the notice is published")
}

#[tokio::test]
async fn frames_and_kicks_published_by_lua_decode_in_rust() {
    let redis = Backend::single().await;
    let url = match &redis {
        Backend::Single(r) => r.url(),
        Backend::Cluster(_) => unreachable!(),
    };
    let mut pubsub = listen(&url).await;
    let servers = redis.instances(2, &[]).await;
    let user = "u\u{e9}-keys";
    let mut first = servers[0].connect(user).await;

    // A frame with a seq: what the client reads is exactly the published text.
    first
        .send(json!({"type": "enqueue", "ref": "q", "prefs": {}}))
        .await;
    let queued = first.expect("queued").await;
    let (_, payload) = next_notice(&mut pubsub, |n| {
        matches!(n, Notice::Frame { user: u, text, .. } if *u == user && text.contains("\"queued\""))
    })
    .await;
    match Notice::decode(&payload).unwrap() {
        Notice::Frame { seq, text, .. } => {
            let published: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(published, queued);
            assert_eq!(seq, queued["seq"].as_u64());
            assert!(seq.is_some(), "a state change carries its seq");
        }
        other => panic!("not a frame: {other:?}"),
    }

    // A kick: the same user connects through the other instance, whose Lua step tells the
    // first instance (on its channel) to close the replaced connection.
    let _second = servers[1].connect(user).await;
    let (channel, payload) = next_notice(
        &mut pubsub,
        |n| matches!(n, Notice::Kick { user: u, .. } if *u == user),
    )
    .await;
    assert!(matches!(
        Notice::decode(&payload),
        Some(Notice::Kick { .. })
    ));
    let closed = tokio::time::timeout(PATIENCE, first.closed())
        .await
        .expect("the replaced connection closes");
    assert!(
        matches!(closed, Closed::Code(c) if c == matchgate::protocol::close::REPLACED),
        "{closed:?}"
    );
    // The kick went to the instance that held the first connection (`inst0-<suffix>`).
    assert!(channel.starts_with("mg:i:inst0-"), "{channel}");
}
