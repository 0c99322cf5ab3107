//! Random identifiers: session ids, peer handles, resume tokens, dev secrets.

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

/// `prefix` followed by `bytes` random bytes in lower-case hex: the one format of the ids both
/// matching engines make (session ids and resume tokens: 16 bytes; peer handles: 8), the
/// Redis library's `new_id` included.
pub fn hex_id(prefix: &str, bytes: usize) -> String {
    let mut buf = [0u8; 32];
    let buf = &mut buf[..bytes.min(32)];
    rand::rng().fill_bytes(buf);
    let mut id = String::with_capacity(prefix.len() + buf.len() * 2);
    id.push_str(prefix);
    for b in buf.iter() {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
