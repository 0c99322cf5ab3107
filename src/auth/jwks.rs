//! Verification keys from a JSON Web Key Set (an identity provider's `jwks_uri`, or a file).
//!
//! Tokens name their key with the header's `kid`; the store keeps every usable key of the set
//! at once, so during a rotation tokens signed with the old and the new key both verify. Each
//! key carries its one algorithm (RS256 for RSA, ES256 for P-256, EdDSA for Ed25519): a token
//! can never choose how it is checked. The set is loaded again on an interval and when a token
//! names a `kid` the store does not know (at most once per `min_refetch`, so tokens with made-up
//! `kid`s cannot turn the gateway into a fetch loop against the provider). A fetch is bounded in
//! time and size, and one that fails or yields no usable key keeps the keys the store has.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::time::Instant;

use super::AuthError;
use crate::shutdown::Background;

/// Largest key set document read.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Most keys kept from one set (providers publish a handful).
pub const MAX_JWKS_KEYS: usize = 64;

/// How long one fetch of the key set may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the key set comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Url(String),
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Url(url) => f.write_str(url),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Why a key set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("fetch took longer than {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
    #[error("the key set is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JSON Web Key Set: {0}")]
    Parse(String),
    #[error("no usable key (RS256, ES256 with P-256, or EdDSA with Ed25519, each with a kid)")]
    NoUsableKey,
}

/// One verification key and the checks that go with it.
pub struct Key {
    decoding: DecodingKey,
    validation: Validation,
}

impl Key {
    pub fn new(decoding: DecodingKey, validation: Validation) -> Key {
        Key {
            decoding,
            validation,
        }
    }

    pub fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }

    pub fn validation(&self) -> &Validation {
        &self.validation
    }
}

type Keys = HashMap<String, Arc<Key>>;

pub struct KeyStore {
    source: Source,
    http: reqwest::Client,
    /// The claim checks every key shares; each key adds its algorithm.
    base: Validation,
    keys: RwLock<Arc<Keys>>,
    /// When a token with an unknown `kid` last caused a fetch. The lock also makes concurrent
    /// such tokens wait for one fetch instead of starting one each.
    refetched: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
}

impl KeyStore {
    /// Loads the set once; start-up fails if that does not work, so that a wrong URL or file
    /// is found at once rather than as every token refused.
    pub async fn load(
        source: Source,
        base: Validation,
        min_refetch: Duration,
    ) -> Result<Arc<KeyStore>, JwksError> {
        // reqwest is built here with rustls but without a crypto provider of its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Source::Url(url) = &source {
            if url.starts_with("http://") {
                tracing::warn!(%url, "the key set is fetched without TLS: whoever can change it on the way can mint tokens");
            }
        }
        let store = KeyStore {
            source,
            http: reqwest::Client::new(),
            base,
            keys: RwLock::new(Arc::default()),
            refetched: tokio::sync::Mutex::new(None),
            min_refetch,
        };
        store.refresh().await?;
        Ok(Arc::new(store))
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The key ids the store holds, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.current().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn current(&self) -> Arc<Keys> {
        self.keys.read().expect("key set lock").clone()
    }

    /// Loads the set again and replaces the keys; on failure the keys stay as they were.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let body = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(body) => body?,
            Err(_) => return Err(JwksError::Timeout),
        };
        let keys = self.parse(&body)?;
        let count = keys.len();
        *self.keys.write().expect("key set lock") = Arc::new(keys);
        Ok(count)
    }

    async fn fetch(&self) -> Result<Vec<u8>, JwksError> {
        match &self.source {
            Source::File(path) => {
                let body = tokio::fs::read(path)
                    .await
                    .map_err(|e| JwksError::Fetch(e.to_string()))?;
                if body.len() > MAX_JWKS_BYTES {
                    return Err(JwksError::TooLarge);
                }
                Ok(body)
            }
            Source::Url(url) => {
                let mut response = self
                    .http
                    .get(url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| JwksError::Fetch(e.to_string()))?;
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| JwksError::Fetch(e.to_string()))?
                {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(JwksError::TooLarge);
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
        }
    }

    /// Reads the usable keys of a set. Keys of other types, for encryption, or without a `kid`
    /// are skipped (a provider may publish those next to the signing keys).
    fn parse(&self, body: &[u8]) -> Result<Keys, JwksError> {
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(body).map_err(|e| JwksError::Parse(e.to_string()))?;
        let mut keys = Keys::new();
        for value in set.keys {
            if keys.len() == MAX_JWKS_KEYS {
                tracing::warn!(source = %self.source, "key set has more than {MAX_JWKS_KEYS} usable keys; the rest are ignored");
                break;
            }
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            match usable(&jwk) {
                Some((kid, algorithm, decoding)) => {
                    let mut validation = self.base.clone();
                    validation.algorithms = vec![algorithm];
                    keys.insert(kid, Arc::new(Key::new(decoding, validation)));
                }
                None => tracing::debug!(kid = ?jwk.common.key_id, "key set entry skipped"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(keys)
    }

    /// The key named `kid`. An unknown `kid` makes the store fetch the set again first, unless
    /// it did so for an unknown `kid` less than `min_refetch` ago.
    pub async fn key(&self, kid: &str) -> Result<Arc<Key>, AuthError> {
        if let Some(key) = self.current().get(kid) {
            return Ok(key.clone());
        }
        let mut last = self.refetched.lock().await;
        // Another token's fetch may have brought it meanwhile.
        if let Some(key) = self.current().get(kid) {
            return Ok(key.clone());
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return Err(AuthError::UnknownKey);
        }
        *last = Some(Instant::now());
        match self.refresh().await {
            Ok(count) => {
                tracing::info!(source = %self.source, keys = count, "key set fetched again for an unknown kid")
            }
            Err(e) => {
                tracing::warn!(source = %self.source, error = %e, "cannot fetch the key set; keeping the keys held")
            }
        }
        self.current()
            .get(kid)
            .cloned()
            .ok_or(AuthError::UnknownKey)
    }

    /// Fetches the set every `every` while the store is in use.
    pub fn refresh_every(self: &Arc<Self>, every: Duration, background: &Background) {
        let store = Arc::downgrade(self);
        background.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(store) = store.upgrade() else {
                    return;
                };
                if let Err(e) = store.refresh().await {
                    tracing::warn!(source = %store.source, error = %e, "cannot fetch the key set; keeping the keys held");
                }
            }
        });
    }
}

/// The `kid`, algorithm and key of a set entry the gateway can verify with.
fn usable(jwk: &Jwk) -> Option<(String, Algorithm, DecodingKey)> {
    let kid = jwk.common.key_id.clone()?;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let declared = jwk.common.key_algorithm;
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) if matches!(declared, None | Some(KeyAlgorithm::RS256)) => {
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(p)
            if p.curve == EllipticCurve::P256
                && matches!(declared, None | Some(KeyAlgorithm::ES256)) =>
        {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(p)
            if p.curve == EllipticCurve::Ed25519
                && matches!(declared, None | Some(KeyAlgorithm::EdDSA)) =>
        {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, algorithm, decoding))
}
