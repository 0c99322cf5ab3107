//! Authentication: JWT verification at the handshake and on `refresh`, and the dev-mode token
//! minter.
//!
//! Exactly one way of checking is configured per deployment (HS256 with a shared secret,
//! RS256/ES256 with a public key, or the keys of a JWKS, each of which carries its one
//! algorithm), so a token can never choose how it is checked; `alg: none` is refused by
//! construction. In dev mode (no key configured) the gateway signs its own HS256 tokens and
//! hands them out at `POST /v1/dev/token`; instances on one Redis share the dev secret, so a
//! dev token works on all of them.
//!
//! Besides the user (`sub`) and device (`device_id`), a verified token gives the user's
//! attributes: the claims `--attribute-claims` names (see [`crate::attributes`]), read the
//! same way whatever checked the signature.
//!
//! [`jwks`] holds the key set of an identity provider; [`expiry`] is the timer that closes a
//! connection whose token expired without a refresh. [`Authenticator::from_config`] takes this
//! module's section and, to share the dev secret, the Redis as a
//! [`Deployment`](crate::redis_keys::Deployment).

pub mod expiry;
pub mod jwks;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use clap::ValueEnum;

use crate::attributes::{AttributeConfig, Attributes};
use crate::flags::{millis, secs};
use crate::ids::random_id;
use crate::redis_keys::Deployment;
use crate::shutdown::Background;

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

    /// URL of the identity provider's JSON Web Key Set (its `jwks_uri`): tokens are verified
    /// with the key their `kid` names (RS256, ES256 or EdDSA).
    #[arg(
        long,
        env = "MATCHGATE_JWKS_URL",
        conflicts_with_all = ["jwt_secret", "jwt_public_key_file", "jwks_file"],
        value_parser = http_url
    )]
    pub jwks_url: Option<String>,

    /// A JSON Web Key Set file, read like `--jwks-url` (and read again on the same schedule).
    #[arg(
        long,
        env = "MATCHGATE_JWKS_FILE",
        conflicts_with_all = ["jwt_secret", "jwt_public_key_file"]
    )]
    pub jwks_file: Option<PathBuf>,

    /// How often the key set is loaded again, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_JWKS_REFRESH_SECS",
        default_value = "300",
        value_parser = secs(1..)
    )]
    pub jwks_refresh_secs: Duration,

    /// Shortest time between two loads of the key set caused by tokens naming an unknown
    /// `kid`, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_JWKS_MIN_REFETCH_SECS",
        default_value = "30",
        value_parser = secs(1..)
    )]
    pub jwks_min_refetch_secs: Duration,

    /// Accept tokens whatever their `aud`. Without it, a public key or JWKS needs
    /// `--jwt-audience`, so that tokens minted for another service are refused.
    #[arg(
        long,
        env = "MATCHGATE_JWT_ALLOW_ANY_AUDIENCE",
        conflicts_with = "jwt_audience"
    )]
    pub jwt_allow_any_audience: bool,

    /// How long before a connection's token expires the gateway sends `token_expiring`, in
    /// milliseconds (never before half of the token's remaining life has passed).
    #[arg(
        long,
        env = "MATCHGATE_TOKEN_EXPIRING_NOTICE_MS",
        default_value = "60000",
        value_parser = millis(..)
    )]
    pub token_expiring_notice_ms: Duration,

    /// How long after its token's `exp` (plus the JWT leeway) a connection without a valid
    /// `refresh` is closed with 4008, in milliseconds.
    #[arg(
        long,
        env = "MATCHGATE_TOKEN_EXPIRY_GRACE_MS",
        default_value = "10000",
        value_parser = millis(..)
    )]
    pub token_expiry_grace_ms: Duration,

    /// The dev-mode signing secret (at least 32 bytes). Without it a single instance makes a
    /// random one, and instances on one Redis share the one the first of them stored there.
    #[arg(long, env = "MATCHGATE_DEV_SECRET", hide_env_values = true)]
    pub dev_secret: Option<String>,
}

impl AuthConfig {
    /// Whether tokens are checked against a configured key or key set (otherwise: dev mode).
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key_file.is_none() && self.jwks().is_none()
    }

    /// Where the key set comes from, when tokens are checked against one.
    pub fn jwks(&self) -> Option<jwks::Source> {
        match (&self.jwks_url, &self.jwks_file) {
            (Some(url), _) => Some(jwks::Source::Url(url.clone())),
            (None, Some(path)) => Some(jwks::Source::File(path.clone())),
            (None, None) => None,
        }
    }

    /// Whether the demo page is served: in dev mode, or when asked for with `--demo`.
    pub fn demo_page(&self) -> bool {
        self.demo || self.dev_mode()
    }
}

/// A `--jwks-url`: http(s) only.
fn http_url(s: &str) -> Result<String, String> {
    if s.starts_with("https://") || s.starts_with("http://") {
        Ok(s.to_string())
    } else {
        Err("must be an http:// or https:// URL".into())
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
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    /// The client device, if the issuer names one: devices can be banned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The user's attributes, from the claims `--attribute-claims` names. Users without any
    /// share one empty map (a connection holds it while it lives).
    #[serde(skip)]
    pub attributes: Arc<Attributes>,
}

/// Claims as they arrive: presence is checked after the signature, so that a missing claim is
/// reported as such rather than as a malformed token.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    exp: Option<u64>,
    device_id: Option<String>,
    /// Every other claim, for the attributes: which ones those are is configuration.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

/// A claim's value as an attribute: a string as it is, a boolean as `true`/`false`, an
/// integer as its decimal text. Other types (fractions, arrays, objects, null) are no
/// attribute: the text both engines compare would not be obvious.
pub fn attribute_value(claim: &serde_json::Value) -> Option<String> {
    match claim {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Longest user or device id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Whether `id` can be a user or device id: ids travel inside Redis keys and pub/sub messages,
/// so they have a bounded length and no control characters.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

/// Why a token was refused. The text is the short reason sent with the 401 (or the refused
/// `refresh`); it never contains the token.
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
    #[error("token header names no key (kid)")]
    MissingKeyId,
    #[error("token names a key (kid) the key set does not have")]
    UnknownKey,
    #[error("token is for another user")]
    OtherSubject,
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
    #[error("cannot load the JSON Web Key Set from {from}: {error}")]
    Jwks {
        from: String,
        error: jwks::JwksError,
    },
    #[error(
        "cannot share the dev secret through Redis ({0}); set MATCHGATE_DEV_SECRET to the same \
         value on every instance to start without it"
    )]
    DevSecret(String),
}

/// How tokens are checked, for the start-up line and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Dev,
    Hs256,
    Rs256,
    Es256,
    Jwks,
}

impl std::fmt::Display for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMode::Dev => "dev (tokens from POST /v1/dev/token; NOT FOR PRODUCTION)",
            AuthMode::Hs256 => "jwt HS256",
            AuthMode::Rs256 => "jwt RS256",
            AuthMode::Es256 => "jwt ES256",
            AuthMode::Jwks => "jwt with JWKS keys (RS256, ES256, EdDSA by kid)",
        })
    }
}

/// The keys tokens are checked with.
enum Keys {
    /// One key and algorithm for every token.
    Fixed(Box<jwks::Key>),
    /// The key the token's `kid` names.
    Set(Arc<jwks::KeyStore>),
}

/// How long a live connection's token lasts past its `exp`, and when it is told.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryPolicy {
    /// `token_expiring` goes out this long before `exp`.
    pub notice: Duration,
    /// Without a refresh the connection closes this long after `exp` (leeway plus grace).
    pub grace: Duration,
}

pub struct Authenticator {
    mode: AuthMode,
    keys: Keys,
    expiry: ExpiryPolicy,
    /// Present in dev mode only: the key the dev endpoint signs with.
    dev_signer: Option<(EncodingKey, u64)>,
    /// The claims that become attributes (`--attribute-claims`).
    attribute_claims: Vec<String>,
    /// The attributes of every user whose token has none of those claims: one allocation
    /// shared by all their connections.
    no_attributes: Arc<Attributes>,
}

/// Why the dev endpoint mints no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevTokenError {
    /// A key is configured: tokens come from the deployment's own issuer.
    #[error("not in dev mode")]
    NotDevMode,
    /// An attribute asked for is not one of `--attribute-claims`, or has a type that is no
    /// attribute.
    #[error("{0}")]
    Attribute(String),
}

/// The claim checks every token gets, for a key of `algorithm`.
fn validation(config: &AuthConfig, algorithm: Algorithm) -> Validation {
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
    validation
}

impl Authenticator {
    pub async fn from_config(
        config: &AuthConfig,
        attributes: &AttributeConfig,
        redis: Option<&Deployment>,
        background: &Background,
    ) -> Result<Arc<Self>, KeyError> {
        // livekit-api's token code would install an HS-only provider if none is set; install
        // the full one first so RS256/ES256/EdDSA keep working (see the crate notes in the
        // README).
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let fixed = |mode, algorithm, decoding| {
            (
                mode,
                Keys::Fixed(Box::new(jwks::Key::new(
                    decoding,
                    validation(config, algorithm),
                ))),
            )
        };
        let mut dev_signer = None;
        let (mode, keys) = match (
            &config.jwt_secret,
            &config.jwt_public_key_file,
            config.jwks(),
        ) {
            (Some(secret), _, _) => fixed(
                AuthMode::Hs256,
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ),
            (None, Some(path), _) => {
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
                fixed(mode, alg, key)
            }
            (None, None, Some(source)) => {
                let shown = source.to_string();
                // The algorithm is each key's own; this one is replaced per key.
                let base = validation(config, Algorithm::RS256);
                let store = jwks::KeyStore::load(source, base, config.jwks_min_refetch_secs)
                    .await
                    .map_err(|error| KeyError::Jwks { from: shown, error })?;
                tracing::info!(source = %store.source(), kids = ?store.key_ids(), "key set loaded");
                store.refresh_every(config.jwks_refresh_secs, background);
                (AuthMode::Jwks, Keys::Set(store))
            }
            (None, None, None) => {
                let secret = dev_secret(config, redis).await?;
                dev_signer = Some((
                    EncodingKey::from_secret(secret.as_bytes()),
                    config.dev_token_ttl_secs.as_secs(),
                ));
                fixed(
                    AuthMode::Dev,
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
        };
        Ok(Arc::new(Authenticator {
            mode,
            keys,
            expiry: ExpiryPolicy {
                notice: config.token_expiring_notice_ms,
                grace: config.jwt_leeway_secs + config.token_expiry_grace_ms,
            },
            dev_signer,
            attribute_claims: attributes.attribute_claims.clone(),
            no_attributes: Arc::default(),
        }))
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    pub fn expiry(&self) -> ExpiryPolicy {
        self.expiry
    }

    /// Verifies a token and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if declares_alg_none(token) {
            return Err(AuthError::Unsigned);
        }
        let named;
        let key = match &self.keys {
            Keys::Fixed(key) => key.as_ref(),
            Keys::Set(store) => {
                let header =
                    jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
                let kid = header.kid.ok_or(AuthError::MissingKeyId)?;
                named = store.key(&kid).await?;
                named.as_ref()
            }
        };
        let data = jsonwebtoken::decode::<RawClaims>(token, key.decoding(), key.validation())
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
            attributes: self.attributes(&data.claims.other),
        })
    }

    /// The attributes in a verified token's other claims.
    fn attributes(&self, claims: &serde_json::Map<String, serde_json::Value>) -> Arc<Attributes> {
        let attributes: Attributes = self
            .attribute_claims
            .iter()
            .filter_map(|name| Some((name.clone(), attribute_value(claims.get(name)?)?)))
            .collect();
        if attributes.is_empty() {
            self.no_attributes.clone()
        } else {
            Arc::new(attributes)
        }
    }

    /// Verifies the token of a `refresh` on `user`'s connection: valid, and for the same user.
    pub async fn verify_refresh(&self, user: &str, token: &str) -> Result<Claims, AuthError> {
        let claims = self.verify(token).await?;
        if claims.sub != user {
            return Err(AuthError::OtherSubject);
        }
        Ok(claims)
    }

    /// Whether the dev endpoint mints tokens (dev mode).
    pub fn mints_dev_tokens(&self) -> bool {
        self.dev_signer.is_some()
    }

    /// Mints a dev-mode token for an anonymous device, with `attributes` as claims (each one
    /// of `--attribute-claims`, with a value an attribute can have), so that filters can be
    /// tried without an identity provider.
    pub fn mint_dev_token(
        &self,
        device_id: &str,
        attributes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, u64), DevTokenError> {
        let (key, ttl) = self.dev_signer.as_ref().ok_or(DevTokenError::NotDevMode)?;
        for (name, value) in attributes {
            if !self.attribute_claims.contains(name) {
                let claims = match self.attribute_claims.is_empty() {
                    true => "none".to_string(),
                    false => self.attribute_claims.join(","),
                };
                return Err(DevTokenError::Attribute(format!(
                    "attributes.{name}: not an attribute claim of this gateway (MATCHGATE_ATTRIBUTE_CLAIMS: {claims})"
                )));
            }
            if attribute_value(value).is_none() {
                return Err(DevTokenError::Attribute(format!(
                    "attributes.{name} must be a string, a boolean or an integer"
                )));
            }
        }
        let mut claims = attributes.clone();
        let fixed = serde_json::to_value(Claims {
            sub: format!("dev-{device_id}"),
            exp: jsonwebtoken::get_current_timestamp() + ttl,
            device_id: None,
            attributes: self.no_attributes.clone(),
        })
        .expect("claims serialise");
        if let serde_json::Value::Object(fixed) = fixed {
            claims.extend(fixed);
        }
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .expect("HS256 signing with an in-memory secret cannot fail");
        Ok((token, *ttl))
    }
}

/// How long start-up waits for Redis to hand out the shared dev secret.
const DEV_SECRET_TIMEOUT: Duration = Duration::from_secs(5);

/// The dev-mode signing secret: `--dev-secret`; else, with Redis, the one the first instance
/// stored there (`SET NX`), so that every instance verifies every other's dev tokens; else a
/// random one for this process.
async fn dev_secret(config: &AuthConfig, redis: Option<&Deployment>) -> Result<String, KeyError> {
    if let Some(secret) = &config.dev_secret {
        return Ok(secret.clone());
    }
    let candidate = random_id("", 32);
    let Some(redis) = redis else {
        return Ok(candidate);
    };
    let urls = redis.urls.clone();
    let key = redis.layout.dev_secret();
    let share = async {
        if redis.cluster {
            let client = redis::cluster::ClusterClient::new(urls)?;
            let mut con = client.get_async_connection().await?;
            set_once(&mut con, &key, &candidate).await
        } else {
            let client = redis::Client::open(urls[0].as_str())?;
            let mut con = client.get_multiplexed_async_connection().await?;
            set_once(&mut con, &key, &candidate).await
        }
    };
    match tokio::time::timeout(DEV_SECRET_TIMEOUT, share).await {
        Ok(Ok(secret)) => Ok(secret),
        Ok(Err(e)) => Err(KeyError::DevSecret(e.to_string())),
        Err(_) => Err(KeyError::DevSecret(format!(
            "no answer within {}s",
            DEV_SECRET_TIMEOUT.as_secs()
        ))),
    }
}

/// Stores `candidate` at `key` unless a value is there, and returns the value that is.
async fn set_once(
    con: &mut impl redis::aio::ConnectionLike,
    key: &str,
    candidate: &str,
) -> redis::RedisResult<String> {
    redis::cmd("SET")
        .arg(key)
        .arg(candidate)
        .arg("NX")
        .exec_async(con)
        .await?;
    redis::cmd("GET").arg(key).query_async(con).await
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

    async fn hs256() -> Arc<Authenticator> {
        let config = Config::parse_from([
            "matchgate",
            "--jwt-secret",
            SECRET,
            "--attribute-claims",
            "country,age_verified,age,tier",
        ]);
        Authenticator::from_config(
            &config.auth,
            &config.attributes,
            config.redis.deployment().as_ref(),
            &Background::default(),
        )
        .await
        .unwrap()
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

    #[tokio::test]
    async fn accepts_a_good_token() {
        let t = sign(serde_json::json!({"sub": "u1", "exp": now() + 60}), SECRET);
        let claims = hs256().await.verify(&t).await.unwrap();
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.device_id, None);
    }

    #[tokio::test]
    async fn reads_the_device_id() {
        let auth = hs256().await;
        let token = |device: serde_json::Value| {
            sign(
                serde_json::json!({"sub": "u1", "exp": now() + 60, "device_id": device}),
                SECRET,
            )
        };
        let phone = auth.verify(&token("phone-1".into())).await.unwrap();
        assert_eq!(phone.device_id.as_deref(), Some("phone-1"));
        assert_eq!(
            auth.verify(&token("".into())).await.unwrap_err(),
            AuthError::InvalidClaim("device_id")
        );
        assert_eq!(
            auth.verify(&token(7.into())).await.unwrap_err(),
            AuthError::Malformed
        );
    }

    #[tokio::test]
    async fn refuses_bad_tokens_with_reasons() {
        let auth = hs256().await;
        let expired = sign(
            serde_json::json!({"sub": "u1", "exp": now() - 3600}),
            SECRET,
        );
        assert_eq!(auth.verify(&expired).await.unwrap_err(), AuthError::Expired);
        let forged = sign(
            serde_json::json!({"sub": "u1", "exp": now() + 60}),
            "another-secret-another-secret-xx",
        );
        assert_eq!(
            auth.verify(&forged).await.unwrap_err(),
            AuthError::BadSignature
        );
        let no_sub = sign(serde_json::json!({"exp": now() + 60}), SECRET);
        assert_eq!(
            auth.verify(&no_sub).await.unwrap_err(),
            AuthError::MissingClaim("sub".into())
        );
        let no_exp = sign(serde_json::json!({"sub": "u1"}), SECRET);
        assert_eq!(
            auth.verify(&no_exp).await.unwrap_err(),
            AuthError::MissingClaim("exp".into())
        );
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"u1","exp":{}}}"#, now() + 60));
        let unsigned = format!("{head}.{body}.");
        assert_eq!(
            auth.verify(&unsigned).await.unwrap_err(),
            AuthError::Unsigned
        );
        assert_eq!(
            auth.verify("garbage").await.unwrap_err(),
            AuthError::Malformed
        );
        assert_eq!(auth.verify("").await.unwrap_err(), AuthError::Missing);
    }

    #[tokio::test]
    async fn dev_tokens_verify_only_in_dev_mode() {
        let config =
            Config::parse_from(["matchgate", "--attribute-claims", "country,age_verified"]);
        let dev = Authenticator::from_config(
            &config.auth,
            &config.attributes,
            config.redis.deployment().as_ref(),
            &Background::default(),
        )
        .await
        .unwrap();
        assert_eq!(dev.mode(), AuthMode::Dev);
        assert!(dev.mints_dev_tokens());
        let none = serde_json::Map::new();
        let (token, ttl) = dev.mint_dev_token("phone-1", &none).unwrap();
        assert_eq!(ttl, 3600);
        assert_eq!(dev.verify(&token).await.unwrap().sub, "dev-phone-1");
        assert!(!hs256().await.mints_dev_tokens());
        assert_eq!(
            hs256().await.mint_dev_token("x", &none).unwrap_err(),
            DevTokenError::NotDevMode
        );
        assert_eq!(
            hs256().await.verify(&token).await.unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[tokio::test]
    async fn dev_tokens_carry_the_attributes_asked_for() {
        let config =
            Config::parse_from(["matchgate", "--attribute-claims", "country,age_verified"]);
        let dev = Authenticator::from_config(
            &config.auth,
            &config.attributes,
            config.redis.deployment().as_ref(),
            &Background::default(),
        )
        .await
        .unwrap();
        let asked = |v: serde_json::Value| v.as_object().unwrap().clone();
        let (token, _) = dev
            .mint_dev_token(
                "p",
                &asked(serde_json::json!({"country": "de", "age_verified": true})),
            )
            .unwrap();
        let claims = dev.verify(&token).await.unwrap();
        assert_eq!(claims.sub, "dev-p");
        assert_eq!(claims.attributes["country"], "de");
        assert_eq!(claims.attributes["age_verified"], "true");
        // The attributes cannot overwrite who the token is for.
        for bad in [
            serde_json::json!({"gender": "f"}),
            serde_json::json!({"sub": "someone-else"}),
            serde_json::json!({"country": ["de"]}),
            serde_json::json!({"country": 1.5}),
        ] {
            let e = dev.mint_dev_token("p", &asked(bad.clone())).unwrap_err();
            assert!(matches!(e, DevTokenError::Attribute(_)), "{bad}: {e:?}");
        }
    }

    #[tokio::test]
    async fn attributes_are_the_configured_claims_as_text() {
        let auth = hs256().await;
        let token = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign(claims, SECRET)
        };
        let claims = auth
            .verify(&token(serde_json::json!({
                "country": "DE ",
                "age_verified": false,
                "age": 42,
                "tier": -3,
                "gender": "f",
            })))
            .await
            .unwrap();
        let got: Vec<(&str, &str)> = claims
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // As they are (no trimming), only the configured claims, in name order.
        assert_eq!(
            got,
            [
                ("age", "42"),
                ("age_verified", "false"),
                ("country", "DE "),
                ("tier", "-3")
            ]
        );
        // Other types are no attribute.
        let odd = auth
            .verify(&token(serde_json::json!({
                "country": ["de"],
                "age": 4.5,
                "tier": null,
                "age_verified": {"v": true},
            })))
            .await
            .unwrap();
        assert!(odd.attributes.is_empty());
        // Users without attributes share one map: no allocation per connection.
        let plain = auth.verify(&token(serde_json::json!({}))).await.unwrap();
        assert!(Arc::ptr_eq(&plain.attributes, &odd.attributes));
    }
}
