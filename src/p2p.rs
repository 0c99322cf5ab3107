//! Peer-to-peer media (media mode `p2p`, the default without LiveKit): the two clients connect
//! to each other with WebRTC, exchange their offer, answer and ICE candidates through the
//! gateway (`signal`), and learn from `matched.media` which ICE servers to use.
//!
//! STUN servers are passed on as configured. A TURN server needs credentials, and a static
//! password handed to every client would be a password for everybody: instead each member of
//! a session gets its own time-limited credentials in the TURN REST scheme
//! (draft-uberti-behave-turn-rest), which coturn checks with `use-auth-secret`: the username
//! is `<unix expiry>:<the member's opaque handle>` and the credential is
//! base64(HMAC-SHA1(shared secret, username)). The TURN server needs nothing but the same
//! secret; the handle (the `peer` value the other member sees, fresh per session) keeps user
//! ids out of the TURN server's logs.
//!
//! Credentials are minted inside the atomic matching step that makes the session live: here
//! for the in-memory engine, and by the same formula in the Redis library (`p2p_media` in
//! `matching/lua/p2p.lua`), which the tests check against [`turn_credential`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::flags::secs;
use crate::protocol::{IceServer, Media};

/// The p2p section of the configuration: the ICE servers of media mode `p2p`.
#[derive(Debug, Clone, clap::Args)]
pub struct P2pConfig {
    /// STUN server URLs (`stun:host:port`, comma-separated) listed in every `matched` of media
    /// mode `p2p` (the mode without LiveKit).
    #[arg(
        long,
        env = "MATCHGATE_STUN_URLS",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = parse_stun_url
    )]
    pub stun_urls: Vec<String>,

    /// TURN server URLs (`turn:host:port?transport=udp`, `turns:...`, comma-separated) listed,
    /// with per-member credentials, in every `matched` of media mode `p2p`. Needs
    /// `--turn-secret`.
    #[arg(
        long,
        env = "MATCHGATE_TURN_URLS",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = parse_turn_url
    )]
    pub turn_urls: Vec<String>,

    /// Secret shared with the TURN server (coturn: `use-auth-secret` with this as
    /// `static-auth-secret`), at least 32 bytes; it signs the time-limited TURN credentials.
    #[arg(long, env = "MATCHGATE_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,

    /// Lifetime of TURN credentials, from the match, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_TURN_TTL_S",
        default_value = "3600",
        value_parser = secs(60..=7 * 86_400)
    )]
    pub turn_ttl_s: Duration,
}

impl P2pConfig {
    /// The ICE servers this configuration lists.
    pub fn ice_servers(&self) -> IceServers {
        let turn = self.turn_secret.as_ref().map(|secret| Turn {
            urls: self.turn_urls.clone().into(),
            secret: secret.clone(),
            ttl: self.turn_ttl_s,
        });
        IceServers::new(self.stun_urls.clone(), turn)
    }
}

fn parse_stun_url(url: &str) -> Result<String, String> {
    parse_ice_url(url, ["stun:", "stuns:"])
}

fn parse_turn_url(url: &str) -> Result<String, String> {
    parse_ice_url(url, ["turn:", "turns:"])
}

/// An ICE server URL: one of `schemes`, something after it, and no white space.
fn parse_ice_url(url: &str, schemes: [&str; 2]) -> Result<String, String> {
    let scheme_ok = schemes
        .iter()
        .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
    if scheme_ok && !url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(url.to_string())
    } else {
        Err(format!("entries look like {}host:port", schemes[0]))
    }
}

/// The ICE servers every `matched` of media mode `p2p` lists.
#[derive(Clone)]
pub struct IceServers {
    /// The STUN entry, when STUN URLs are configured.
    stun: Option<IceServer>,
    turn: Option<Turn>,
}

/// TURN servers and what their credentials are made of.
#[derive(Clone)]
pub struct Turn {
    pub urls: Arc<[String]>,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`).
    pub secret: String,
    /// How long credentials stay valid after the match.
    pub ttl: Duration,
}

/// Never prints the TURN secret.
impl std::fmt::Debug for IceServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceServers")
            .field("stun", &self.stun_urls())
            .field("turn", &self.turn.as_ref().map(|t| (&t.urls, t.ttl)))
            .finish()
    }
}

impl IceServers {
    pub fn new(stun_urls: Vec<String>, turn: Option<Turn>) -> Self {
        IceServers {
            stun: (!stun_urls.is_empty()).then(|| IceServer {
                urls: stun_urls.into(),
                username: None,
                credential: None,
            }),
            turn,
        }
    }

    pub fn stun_urls(&self) -> &[String] {
        self.stun.as_ref().map_or(&[], |s| &s.urls)
    }

    pub fn turn(&self) -> Option<&Turn> {
        self.turn.as_ref()
    }

    /// The `media` of one member's `matched`: the STUN entry as configured and the TURN
    /// entry with credentials for `handle` (the member's own handle), valid from the match
    /// (`matched_at_ms`, unix ms) for the TURN lifetime.
    pub fn media(&self, handle: &str, matched_at_ms: u64) -> Media {
        let mut ice_servers = Vec::with_capacity(2);
        ice_servers.extend(self.stun.clone());
        if let Some(turn) = &self.turn {
            let username = turn_username(matched_at_ms / 1000 + turn.ttl.as_secs(), handle);
            ice_servers.push(IceServer {
                urls: turn.urls.clone(),
                credential: Some(turn_credential(&turn.secret, &username)),
                username: Some(username),
            });
        }
        Media::P2p { ice_servers }
    }
}

/// A TURN REST username: the expiry (unix seconds) and who it is for.
pub fn turn_username(expiry_s: u64, handle: &str) -> String {
    format!("{expiry_s}:{handle}")
}

/// The TURN REST credential of `username`: base64(HMAC-SHA1(secret, username)).
pub fn turn_credential(secret: &str, username: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(hmac_sha1(secret.as_bytes(), username.as_bytes()))
}

fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The seven HMAC-SHA1 test cases of RFC 2202, section 3 (short keys, a key of one
    /// block and keys longer than a block, which are hashed first).
    #[test]
    fn hmac_sha1_passes_rfc_2202() {
        let cases: [(Vec<u8>, Vec<u8>, &str); 7] = [
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                "b617318655057264e28bc0b6fb378c8ef146be00",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79",
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                "125d7342b9ac11cd91a39af48aa17b4f63f175d3",
            ),
            (
                (1..=25).collect(),
                vec![0xcd; 50],
                "4c9007f4026250c6bc8414f9bf50c86c2d7235da",
            ),
            (
                vec![0x0c; 20],
                b"Test With Truncation".to_vec(),
                "4c1a03424b55e07fe7f27be1d58bb9324a9a5a04",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "aa4ae5e15272d00e95705637ce8a3b55ed402112",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data"
                    .to_vec(),
                "e8e99d0f45237d786d6bbaa7965c7808bbff1a91",
            ),
        ];
        for (i, (key, data, digest)) in cases.iter().enumerate() {
            assert_eq!(hmac_sha1(key, data).to_vec(), hex(digest), "case {}", i + 1);
        }
        // The credential is that digest in standard base64 (RFC 2202 case 2).
        assert_eq!(
            turn_credential("Jefe", "what do ya want for nothing?"),
            base64::engine::general_purpose::STANDARD
                .encode(hex("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"))
        );
    }

    #[test]
    fn members_get_their_own_expiring_credentials() {
        let ice = IceServers::new(
            vec!["stun:stun.example.com:3478".into()],
            Some(Turn {
                urls: vec!["turn:turn.example.com:3478?transport=udp".to_string()].into(),
                secret: "north-wind".into(),
                ttl: Duration::from_secs(3600),
            }),
        );
        let Media::P2p { ice_servers } = ice.media("p_abc", 1_764_086_400_999) else {
            panic!("not p2p")
        };
        assert_eq!(ice_servers.len(), 2);
        assert_eq!(&*ice_servers[0].urls, ["stun:stun.example.com:3478"]);
        assert!(ice_servers[0].username.is_none() && ice_servers[0].credential.is_none());
        let username = ice_servers[1].username.as_deref().unwrap();
        assert_eq!(username, "1764090000:p_abc");
        assert_eq!(
            ice_servers[1].credential.as_deref().unwrap(),
            turn_credential("north-wind", username)
        );
        assert!(!format!("{ice:?}").contains("north-wind"));
        let none = IceServers::new(Vec::new(), None);
        assert_eq!(
            none.media("p_x", 0),
            Media::P2p {
                ice_servers: Vec::new()
            }
        );
    }
}
