//! Authentication at the WebSocket handshake: JWT verification, and the dev-mode token minter.
//!
//! Exactly one algorithm is accepted per deployment (HS256 with a shared secret, or RS256/ES256
//! with a public key), so a token can never choose how it is checked; `alg: none` is refused by
//! construction. In dev mode (no key configured) the gateway signs its own HS256 tokens with a
//! random per-process secret and hands them out at `POST /v1/dev/token`.

use std::collections::HashSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::config::secs;
use crate::ids::random_id;

/// The authentication section of the configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
    /// Shared secret for HS256 tokens (at least 32 bytes). Without it and without a public key
    /// file the gateway runs in dev mode.
    #[arg(long, env = "MATCHGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key file for RS256 or ES256 tokens.
    #[arg(
        long,
        env = "MATCHGATE_JWT_PUBLIC_KEY_FILE",
        conflicts_with = "jwt_secret"
    )]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Algorithm of the public key file.
    #[arg(
        long,
        env = "MATCHGATE_JWT_ALGORITHM",
        value_enum,
        default_value = "RS256"
    )]
    pub jwt_algorithm: KeyAlgorithm,

    /// Allowed clock skew when checking `exp` and `nbf`, in seconds.
    #[arg(long, env = "MATCHGATE_JWT_LEEWAY_SECS", default_value = "30", value_parser = secs(..))]
    pub jwt_leeway_secs: Duration,

    /// Required `iss` claim, if set.
    #[arg(long, env = "MATCHGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, if set.
    #[arg(
        long,
        env = "MATCHGATE_JWT_AUDIENCE",
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    pub jwt_audience: Option<String>,

    /// Allow dev mode (no key configured) on an address other than loopback. Without it such
    /// a start is refused: anyone who can reach the gateway could mint tokens for any user.
    #[arg(long, env = "MATCHGATE_DEV")]
    pub dev: bool,

    /// Serve the demo page (a small video chat built on the JavaScript SDK) at `/` even with a
    /// key configured. In dev mode it is always served; otherwise it is off, since a production
    /// gateway's own site is elsewhere.
    #[arg(long, env = "MATCHGATE_DEMO")]
    pub demo: bool,

    /// Lifetime of tokens from the dev-mode endpoint `POST /v1/dev/token`, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_DEV_TOKEN_TTL_SECS",
        default_value = "3600",
        value_parser = secs(..)
    )]
    pub dev_token_ttl_secs: Duration,
}

impl AuthConfig {
    /// Whether tokens are checked against a configured key (otherwise: dev mode).
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key_file.is_none()
    }

    /// Whether the demo page is served: in dev mode, or when asked for with `--demo`.
    pub fn demo_page(&self) -> bool {
        self.demo || self.dev_mode()
    }
}

/// Algorithm for tokens verified with a public key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyAlgorithm {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

/// The claims the gateway reads. Others are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    /// The client device, if the issuer names one: devices can be banned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// Claims as they arrive: presence is checked after the signature, so that a missing claim is
/// reported as such rather than as a malformed token.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<u64>,
    device_id: Option<String>,
}

/// Longest user or device id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Whether `id` can be a user or device id: ids travel inside Redis keys and pub/sub messages,
/// so they have a bounded length and no control characters.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

/// Why a token was refused. The text is the short reason sent with the 401; it never contains
/// the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("bad signature")]
    BadSignature,
    #[error("unsigned tokens (alg none) are not accepted")]
    Unsigned,
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    #[error("token lacks required claim {0}")]
    MissingClaim(String),
    #[error("token claim {0} is not a valid id")]
    InvalidClaim(&'static str),
    #[error("wrong issuer or audience")]
    WrongIssuerOrAudience,
    #[error("malformed token")]
    Malformed,
}

/// Start-up problems with the configured keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read public key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("public key file {path} is not a valid {alg} PEM key: {source}")]
    Parse {
        path: String,
        alg: &'static str,
        source: jsonwebtoken::errors::Error,
    },
}

/// How tokens are checked, for the start-up line and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Dev,
    Hs256,
    Rs256,
    Es256,
}

impl std::fmt::Display for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMode::Dev => "dev (tokens from POST /v1/dev/token; NOT FOR PRODUCTION)",
            AuthMode::Hs256 => "jwt HS256",
            AuthMode::Rs256 => "jwt RS256",
            AuthMode::Es256 => "jwt ES256",
        })
    }
}

pub struct Authenticator {
    mode: AuthMode,
    decoding: DecodingKey,
    validation: Validation,
    /// Present in dev mode only: the key the dev endpoint signs with.
    dev_signer: Option<(EncodingKey, u64)>,
}

impl Authenticator {
    pub fn from_config(config: &AuthConfig) -> Result<Self, KeyError> {
        // livekit-api's token code would install an HS-only provider if none is set; install
        // the full one first so RS256/ES256 keep working (see the crate notes in the README).
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();

        let (mode, algorithm, decoding, dev_signer) =
            match (&config.jwt_secret, &config.jwt_public_key_file) {
                (Some(secret), _) => (
                    AuthMode::Hs256,
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                    None,
                ),
                (None, Some(path)) => {
                    let shown = path.display().to_string();
                    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                        path: shown.clone(),
                        source,
                    })?;
                    let (mode, alg, key, name) = match config.jwt_algorithm {
                        KeyAlgorithm::Rs256 => (
                            AuthMode::Rs256,
                            Algorithm::RS256,
                            DecodingKey::from_rsa_pem(&pem),
                            "RS256",
                        ),
                        KeyAlgorithm::Es256 => (
                            AuthMode::Es256,
                            Algorithm::ES256,
                            DecodingKey::from_ec_pem(&pem),
                            "ES256",
                        ),
                    };
                    let key = key.map_err(|source| KeyError::Parse {
                        path: shown,
                        alg: name,
                        source,
                    })?;
                    (mode, alg, key, None)
                }
                (None, None) => {
                    let secret = random_id("", 32);
                    (
                        AuthMode::Dev,
                        Algorithm::HS256,
                        DecodingKey::from_secret(secret.as_bytes()),
                        Some((
                            EncodingKey::from_secret(secret.as_bytes()),
                            // `expires_in` and `exp` are in seconds.
                            config.dev_token_ttl_secs.as_secs(),
                        )),
                    )
                }
            };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.jwt_leeway_secs.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_string(), "sub".to_string()]);
        // jsonwebtoken only compares `aud`/`iss` when present: configured ones must also be
        // required, or a token that leaves them out would pass.
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Authenticator {
            mode,
            decoding,
            validation,
            dev_signer,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if declares_alg_none(token) {
            return Err(AuthError::Unsigned);
        }
        let data = jsonwebtoken::decode::<RawClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                    AuthError::WrongIssuerOrAudience
                }
                _ => AuthError::Malformed,
            })?;
        let exp = data
            .claims
            .exp
            .ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        let sub = data
            .claims
            .sub
            .filter(|sub| is_valid_id(sub))
            .ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
        let device_id = data.claims.device_id;
        if device_id.as_deref().is_some_and(|d| !is_valid_id(d)) {
            return Err(AuthError::InvalidClaim("device_id"));
        }
        Ok(Claims {
            sub,
            exp,
            device_id,
        })
    }

    /// Mints a dev-mode token for an anonymous device. `None` outside dev mode.
    pub fn mint_dev_token(&self, device_id: &str) -> Option<(String, u64)> {
        let (key, ttl) = self.dev_signer.as_ref()?;
        let claims = Claims {
            sub: format!("dev-{device_id}"),
            exp: jsonwebtoken::get_current_timestamp() + ttl,
            device_id: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .expect("HS256 signing with an in-memory secret cannot fail");
        Some((token, *ttl))
    }
}

/// Whether the token's header says `"alg": "none"`, so that the refusal can say why.
fn declares_alg_none(token: &str) -> bool {
    #[derive(Deserialize)]
    struct Head {
        alg: Option<String>,
    }
    let Some(head) = token.split('.').next() else {
        return false;
    };
    URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()
        .and_then(|raw| serde_json::from_slice::<Head>(&raw).ok())
        .and_then(|h| h.alg)
        .is_some_and(|alg| alg.eq_ignore_ascii_case("none"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use clap::Parser;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn hs256() -> Authenticator {
        let config = Config::parse_from(["matchgate", "--jwt-secret", SECRET]);
        Authenticator::from_config(&config.auth).unwrap()
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn accepts_a_good_token() {
        let t = sign(serde_json::json!({"sub": "u1", "exp": now() + 60}), SECRET);
        let claims = hs256().verify(&t).unwrap();
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.device_id, None);
    }

    #[test]
    fn reads_the_device_id() {
        let claims = |device: serde_json::Value| {
            let t = sign(
                serde_json::json!({"sub": "u1", "exp": now() + 60, "device_id": device}),
                SECRET,
            );
            hs256().verify(&t)
        };
        let phone = claims("phone-1".into()).unwrap();
        assert_eq!(phone.device_id.as_deref(), Some("phone-1"));
        assert_eq!(
            claims("".into()).unwrap_err(),
            AuthError::InvalidClaim("device_id")
        );
        assert_eq!(claims(7.into()).unwrap_err(), AuthError::Malformed);
    }

    #[test]
    fn refuses_bad_tokens_with_reasons() {
        let auth = hs256();
        let expired = sign(
            serde_json::json!({"sub": "u1", "exp": now() - 3600}),
            SECRET,
        );
        assert_eq!(auth.verify(&expired).unwrap_err(), AuthError::Expired);
        let forged = sign(
            serde_json::json!({"sub": "u1", "exp": now() + 60}),
            "another-secret-another-secret-xx",
        );
        assert_eq!(auth.verify(&forged).unwrap_err(), AuthError::BadSignature);
        let no_sub = sign(serde_json::json!({"exp": now() + 60}), SECRET);
        assert_eq!(
            auth.verify(&no_sub).unwrap_err(),
            AuthError::MissingClaim("sub".into())
        );
        let no_exp = sign(serde_json::json!({"sub": "u1"}), SECRET);
        assert_eq!(
            auth.verify(&no_exp).unwrap_err(),
            AuthError::MissingClaim("exp".into())
        );
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"u1","exp":{}}}"#, now() + 60));
        let unsigned = format!("{head}.{body}.");
        assert_eq!(auth.verify(&unsigned).unwrap_err(), AuthError::Unsigned);
        assert_eq!(auth.verify("garbage").unwrap_err(), AuthError::Malformed);
        assert_eq!(auth.verify("").unwrap_err(), AuthError::Missing);
    }

    #[test]
    fn dev_tokens_verify_only_in_dev_mode() {
        let dev = Authenticator::from_config(&Config::parse_from(["matchgate"]).auth).unwrap();
        assert_eq!(dev.mode(), AuthMode::Dev);
        let (token, ttl) = dev.mint_dev_token("phone-1").unwrap();
        assert_eq!(ttl, 3600);
        assert_eq!(dev.verify(&token).unwrap().sub, "dev-phone-1");
        assert!(hs256().mint_dev_token("x").is_none());
        assert_eq!(hs256().verify(&token).unwrap_err(), AuthError::BadSignature);
    }
}
