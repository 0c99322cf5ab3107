//! Identifiers every layer shares, and the one value they pass around: who a user is
//! ([`UserId`]), which of their connections is meant ([`ConnId`]), a serialised server frame
//! ([`Frame`]); and random ids (session ids, peer handles, resume tokens, dev secrets).
//!
//! A leaf: it depends on nothing else in the crate, so the matching engines, the bus, the
//! registry and the Redis key layout can all name these types without depending on each other.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;

/// `prefix` followed by `bytes` random bytes in URL-safe base64. 16 bytes make ids that cannot
/// be guessed; shorter ones serve where only uniqueness within a session matters.
pub fn random_id(prefix: &str, bytes: usize) -> String {
    let mut buf = [0u8; 32];
    let buf = &mut buf[..bytes.min(32)];
    rand::rng().fill_bytes(buf);
    let mut id = String::with_capacity(prefix.len() + bytes * 4 / 3 + 2);
    id.push_str(prefix);
    URL_SAFE_NO_PAD.encode_string(buf, &mut id);
    id
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A user id: the JWT `sub`.
pub type UserId = Arc<str>;

/// The hasher of the maps every match goes through (the engine's users, pools and sessions,
/// the registry of connections): aHash with random keys. Their keys include text an outsider
/// chooses (user ids from tokens, pool names from preferences), so the hasher must be keyed,
/// or a client could pick keys that collide; aHash is keyed like the standard library's
/// SipHash-1-3 and costs a fraction of it on short keys.
pub type KeyedHasher = ahash::RandomState;

/// Identifies one WebSocket connection, so that a late disconnect of a replaced connection
/// cannot touch the state its successor took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Fixed-width hex, so that ids of one instance (which grow) also compare as strings.
impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{:016x}", self.0)
    }
}

impl ConnId {
    /// Reads the form [`ConnId`]'s `Display` writes.
    pub fn parse(s: &str) -> Option<ConnId> {
        let hex = s.strip_prefix('c').filter(|h| h.len() == 16)?;
        u64::from_str_radix(hex, 16).ok().map(ConnId)
    }
}

/// One serialised server frame. `seq` is set for events that change the user's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: Option<u64>,
    pub text: Utf8Bytes,
}
