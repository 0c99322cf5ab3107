//! Identities in logs: user ids, device ids and IP addresses appear as a keyed hash unless the
//! operator asked for them in full.
//!
//! Every log line that names a person routes the value through [`shown`]. By default
//! (`--log-identities hashed`) it prints the first 12 hex digits of SHA-256(key ‖ value): the
//! same user hashes alike within a process (and across instances that share
//! `--log-hash-key`), so lines can be correlated without the logs holding the identity. With
//! `--log-identities full`, or while the log filter enables debug for matchgate (someone is
//! debugging, and debug lines are not kept), values are printed as they are.
//!
//! The redactor is process-wide, set once when the first server starts: logging itself (the
//! `tracing` subscriber and its filter) is process-wide, and a global reaches every module that
//! logs (the registry, the bus, the gateway, the handshake) without threading a handle through
//! each of them. A process that never starts a server (unit tests) hashes with a random key.

use std::fmt;
use std::sync::OnceLock;

use rand::RngCore;
use sha2::{Digest, Sha256};

use clap::ValueEnum;

/// The privacy section of the configuration: how identities appear in logs.
#[derive(Debug, Clone, clap::Args)]
pub struct PrivacyConfig {
    /// How user ids and IP addresses appear in logs: `hashed` (a keyed hash, the default) or
    /// `full`. Debug logging (`MATCHGATE_LOG` at debug) always shows them in full.
    #[arg(
        long,
        env = "MATCHGATE_LOG_IDENTITIES",
        value_enum,
        default_value = "hashed"
    )]
    pub log_identities: LogIdentities,

    /// Key of the log hash, so that the same user hashes alike on every instance. Default:
    /// random per process.
    #[arg(long, env = "MATCHGATE_LOG_HASH_KEY", hide_env_values = true)]
    pub log_hash_key: Option<String>,
}

/// How identities appear in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogIdentities {
    Hashed,
    Full,
}

/// How identities are written into logs.
struct Redactor {
    full: bool,
    key: Vec<u8>,
}

impl Redactor {
    fn from_config(config: &PrivacyConfig) -> Self {
        Redactor {
            full: config.log_identities == LogIdentities::Full,
            key: match &config.log_hash_key {
                Some(key) => key.as_bytes().to_vec(),
                None => random_key(),
            },
        }
    }

    fn write(&self, value: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.full || tracing::enabled!(target: "matchgate", tracing::Level::DEBUG) {
            return f.write_str(value);
        }
        let digest = Sha256::new()
            .chain_update(&self.key)
            .chain_update(value.as_bytes())
            .finalize();
        for byte in &digest[..HASH_HEX_DIGITS / 2] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Hex digits of the hash shown: 48 bits, plenty to tell users apart in a log.
const HASH_HEX_DIGITS: usize = 12;

fn random_key() -> Vec<u8> {
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key
}

static REDACTOR: OnceLock<Redactor> = OnceLock::new();

fn redactor() -> &'static Redactor {
    REDACTOR.get_or_init(|| Redactor {
        full: false,
        key: random_key(),
    })
}

/// Sets how identities are logged, from the configuration. The first call wins: several
/// servers in one process (tests) share one logger.
pub fn init(config: &PrivacyConfig) {
    let _ = REDACTOR.set(Redactor::from_config(config));
}

/// An identity (user id, device id, IP address) as logs may show it.
pub struct Shown<T>(T);

/// Wraps an identity for a log field: `tracing::info!(user = %privacy::shown(&user), ...)`.
pub fn shown<T: fmt::Display>(identity: T) -> Shown<T> {
    Shown(identity)
}

impl<T: fmt::Display> fmt::Display for Shown<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redactor().write(&self.0.to_string(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use clap::Parser;

    fn render(r: &Redactor, value: &str) -> String {
        struct Via<'a>(&'a Redactor, &'a str);
        impl fmt::Display for Via<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.write(self.1, f)
            }
        }
        Via(r, value).to_string()
    }

    #[test]
    fn hashes_with_the_key_by_default_and_shows_in_full_on_request() {
        let keyed = |key: &str| {
            Redactor::from_config(&Config::parse_from(["matchgate", "--log-hash-key", key]).privacy)
        };
        let (a, b) = (keyed("k1"), keyed("k2"));
        let hashed = render(&a, "alice");
        assert_eq!(hashed.len(), HASH_HEX_DIGITS);
        assert!(!hashed.contains("alice"));
        assert_eq!(hashed, render(&keyed("k1"), "alice"), "same key, same hash");
        assert_ne!(hashed, render(&b, "alice"), "the key matters");
        assert_ne!(hashed, render(&a, "bob"));
        let full = Redactor::from_config(
            &Config::parse_from(["matchgate", "--log-identities", "full"]).privacy,
        );
        assert_eq!(render(&full, "10.0.0.1"), "10.0.0.1");
    }
}
