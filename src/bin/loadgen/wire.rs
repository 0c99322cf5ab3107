//! The protocol as the load generator speaks it: the few client frames it sends, encoded once
//! at start-up and shared by every connection (a clone is a reference count, not a copy), and
//! one borrowed view of a server frame that reads only the fields the scenarios act on
//! (serde skips the rest without allocating).
//!
//! Requests carry a one-letter `ref`, so that an `error` reply says which request failed.

use serde::Deserialize;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// `ref` of `enqueue`.
pub const REF_ENQUEUE: &str = "e";
/// `ref` of `skip`.
pub const REF_SKIP: &str = "s";
/// `ref` of `end`.
pub const REF_END: &str = "x";
/// `ref` of `status`.
pub const REF_STATUS: &str = "t";

/// The client frames, pre-encoded.
pub struct ClientFrames {
    pub heartbeat: Utf8Bytes,
    pub skip: Utf8Bytes,
    pub end: Utf8Bytes,
    pub status: Utf8Bytes,
    /// `enqueue` for each preference pool (`prefs.topic` = `p<k>`; with one pool, no prefs).
    enqueue: Vec<Utf8Bytes>,
}

impl ClientFrames {
    pub fn new(pools: u32) -> ClientFrames {
        let enqueue = if pools == 1 {
            vec![Utf8Bytes::from_static(r#"{"type":"enqueue","ref":"e"}"#)]
        } else {
            (0..pools)
                .map(|k| {
                    format!(r#"{{"type":"enqueue","ref":"e","prefs":{{"topic":"p{k}"}}}}"#).into()
                })
                .collect()
        };
        ClientFrames {
            heartbeat: Utf8Bytes::from_static(r#"{"type":"heartbeat"}"#),
            skip: Utf8Bytes::from_static(r#"{"type":"skip","ref":"s"}"#),
            end: Utf8Bytes::from_static(r#"{"type":"end","ref":"x"}"#),
            status: Utf8Bytes::from_static(r#"{"type":"status","ref":"t"}"#),
            enqueue,
        }
    }

    /// `enqueue` for the users of pool `pool`.
    pub fn enqueue(&self, pool: u32) -> Utf8Bytes {
        self.enqueue[pool as usize % self.enqueue.len()].clone()
    }
}

/// The fields of a server frame the load generator reads; every other field is skipped.
/// Strings are borrowed from the frame (the protocol's identifiers and codes never contain
/// JSON escapes; a frame that has them is counted as `bad_frame`).
#[derive(Deserialize, Debug, Default)]
pub struct ServerFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub seq: Option<u64>,
    #[serde(borrow)]
    pub session_id: Option<&'a str>,
    #[serde(borrow)]
    pub role: Option<&'a str>,
    pub requeued: Option<bool>,
    #[serde(borrow)]
    pub code: Option<&'a str>,
    #[serde(rename = "ref", borrow)]
    pub reference: Option<&'a str>,
    pub retry_after_ms: Option<u64>,
    #[serde(borrow)]
    pub reason: Option<&'a str>,
    #[serde(borrow)]
    pub state: Option<&'a str>,
    // `welcome`
    pub heartbeat_interval_ms: Option<u64>,
    #[serde(borrow)]
    pub resume_token: Option<&'a str>,
    pub resumed: Option<bool>,
    pub last_seq: Option<u64>,
}

impl<'a> ServerFrame<'a> {
    pub fn parse(text: &'a str) -> Option<ServerFrame<'a>> {
        serde_json::from_str(text).ok()
    }
}

/// A session id reduced to 64 bits for the bookkeeping of sessions (a fixed-key SipHash, so
/// two runs agree; a collision among a few million sessions has odds of about 1 in 10^6 and
/// would show as one false `duplicate`).
pub fn session_key(session_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    session_id.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_are_valid_json_with_refs() {
        let frames = ClientFrames::new(3);
        for (frame, kind, reference) in [
            (frames.enqueue(2), "enqueue", Some(REF_ENQUEUE)),
            (frames.skip.clone(), "skip", Some(REF_SKIP)),
            (frames.end.clone(), "end", Some(REF_END)),
            (frames.status.clone(), "status", Some(REF_STATUS)),
            (frames.heartbeat.clone(), "heartbeat", None),
        ] {
            let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
            assert_eq!(v["type"], kind);
            assert_eq!(v["ref"].as_str(), reference);
        }
        let v: serde_json::Value = serde_json::from_str(frames.enqueue(2).as_str()).unwrap();
        assert_eq!(v["prefs"]["topic"], "p2");
        let one: serde_json::Value =
            serde_json::from_str(ClientFrames::new(1).enqueue(0).as_str()).unwrap();
        assert!(one.get("prefs").is_none());
    }

    #[test]
    fn server_frames_yield_the_needed_fields() {
        let matched = r#"{"type":"matched","session_id":"s_Q2xq8VnR3kYt0bWm1aPz7g","peer":"p_9f","role":"offerer","started_at_ms":1764086400480,"media":{"url":"wss://x","token":"t"},"seq":2}"#;
        let f = ServerFrame::parse(matched).unwrap();
        assert_eq!(f.kind, "matched");
        assert_eq!(f.session_id, Some("s_Q2xq8VnR3kYt0bWm1aPz7g"));
        assert_eq!(f.role, Some("offerer"));
        assert_eq!(f.seq, Some(2));

        let error = r#"{"type":"error","code":"rate_limited","message":"slow \"down\"","ref":"e","retry_after_ms":500}"#;
        let f = ServerFrame::parse(error).unwrap();
        assert_eq!(
            (f.code, f.reference, f.retry_after_ms),
            (Some("rate_limited"), Some("e"), Some(500))
        );

        let welcome = r#"{"type":"welcome","user_id":"u","connection_id":"c","protocol_version":1,"heartbeat_interval_ms":25000,"heartbeat_timeout_ms":50000,"max_message_bytes":4096,"resume_token":"r_abc","resumed":true,"last_seq":7,"state":"in_session"}"#;
        let f = ServerFrame::parse(welcome).unwrap();
        assert_eq!(f.heartbeat_interval_ms, Some(25000));
        assert_eq!(f.resume_token, Some("r_abc"));
        assert_eq!(
            (f.resumed, f.last_seq, f.state),
            (Some(true), Some(7), Some("in_session"))
        );

        assert!(ServerFrame::parse("not json").is_none());
        assert!(ServerFrame::parse(r#"{"no_type":1}"#).is_none());
    }

    #[test]
    fn session_keys_are_stable_and_distinct() {
        assert_eq!(session_key("s_a"), session_key("s_a"));
        assert_ne!(session_key("s_a"), session_key("s_b"));
    }
}
