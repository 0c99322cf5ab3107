//! Native TLS: `wss://` on the public listener without a TLS-terminating proxy.
//!
//! Off by default (plain `ws://` behind a load balancer that terminates TLS). With
//! `--tls-cert` and `--tls-key` (PEM files) the public listener speaks TLS through rustls
//! (ring). The files are read and checked at start-up: a file that is not PEM, holds no
//! certificate or no key, or a key that does not belong to the certificate stops the start
//! with an error that names the file.
//!
//! Certificates are renewed while the gateway runs (cert-manager, certbot), so they are
//! reloaded without a restart: on SIGHUP, and when the files change. The change check is
//! one low-rate task that compares both files' modification time and size every
//! `--tls-reload-interval-ms`: two `stat` calls per interval, nothing per connection. A
//! notify (inotify) watch was not used because Kubernetes mounts secrets through a symlink
//! that is swapped on update, which a watch on the file path misses while `stat` (following
//! the link) sees it. Each accepted connection takes the configuration current at that moment,
//! so new connections get the new certificate and established ones keep theirs. A reload that
//! fails (a half-written file, a key for another certificate) keeps the old certificate, is
//! logged and counted (`matchgate_tls_reloads_total{result="error"}`), and is tried again on the
//! next change or SIGHUP.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The TLS flags, flattened into [`crate::Config`].
#[derive(Debug, Clone, clap::Args)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first) for `wss://` on `--listen`. With `--tls-key`, the
    /// public listener speaks TLS; without both, plain `ws://` (for a TLS-terminating proxy).
    /// Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "MATCHGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long, env = "MATCHGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// How often the certificate and key files are checked for changes (modification time
    /// and size), in ms.
    #[arg(
        long,
        env = "MATCHGATE_TLS_RELOAD_INTERVAL_MS",
        default_value = "10000",
        value_parser = crate::flags::millis(100..=3_600_000)
    )]
    pub tls_reload_interval_ms: Duration,
}

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not valid PEM: {detail}", path.display())]
    BadPem { path: PathBuf, detail: String },
    #[error("{} holds no PEM private key (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)", path.display())]
    NoKey { path: PathBuf },
    #[error("the key {} does not fit the certificate {}: {detail}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// The TLS side of the public listener: the current configuration, swapped on reload.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    current: RwLock<TlsAcceptor>,
    metrics: Arc<Metrics>,
}

impl Tls {
    /// Loads and checks the files, or `None` when TLS is off.
    pub fn from_config(
        config: &TlsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Tls>>, TlsError> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(None);
        };
        let acceptor = load(cert, key)?;
        Ok(Some(Arc::new(Tls {
            cert: cert.clone(),
            key: key.clone(),
            interval: config.tls_reload_interval_ms,
            current: RwLock::new(acceptor),
            metrics,
        })))
    }

    /// The acceptor for a new connection: the certificate current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the files again; on success new connections get the new certificate.
    pub fn reload(&self) -> Result<(), TlsError> {
        let result = load(&self.cert, &self.key);
        self.metrics
            .tls_reload(if result.is_ok() { "ok" } else { "error" });
        let acceptor = result?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = acceptor;
        Ok(())
    }

    /// Reloads on SIGHUP and when the files change, until `stop`. The SIGHUP handler is in
    /// place when this returns (before the future first runs), so that a SIGHUP sent right
    /// after start-up reloads instead of killing the process.
    pub fn watch(self: Arc<Self>, mut stop: Shutdown) -> impl std::future::Future<Output = ()> {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot install a SIGHUP handler: TLS certificates reload on file change only");
                None
            }
        };
        let mut seen = self.files_stamp();
        async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<Option<()>>();
                let why = tokio::select! {
                    _ = stop.recv() => return,
                    _ = hangup => "SIGHUP",
                    _ = tick.tick() => {
                        let now = self.files_stamp();
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        "file change"
                    }
                };
                match self.reload() {
                    Ok(()) => tracing::info!(
                        cert = %self.cert.display(),
                        "TLS certificate reloaded ({why}): new connections use it"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS certificate reload ({why}) failed: still serving the previous one"
                    ),
                }
            }
        }
    }

    /// Modification time and size of both files (`None` for one that cannot be read).
    fn files_stamp(&self) -> [Option<(SystemTime, u64)>; 2] {
        let stamp = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        [stamp(&self.cert), stamp(&self.key)]
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads and checks a certificate chain and its key.
fn load(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let bad_pem = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::BadPem {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_owned(),
        },
        e => bad_pem(key, e),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        // Checks that the key parses and belongs to the leaf certificate.
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            detail: match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    "it is the key of another certificate".into()
                }
                e => e.to_string(),
            },
        })?;
    // WebSockets upgrade HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn config(cert: &str, key: &str) -> TlsConfig {
        TlsConfig {
            tls_cert: Some(fixture(cert)),
            tls_key: Some(fixture(key)),
            tls_reload_interval_ms: Duration::from_millis(10_000),
        }
    }

    fn error(cert: &str, key: &str) -> String {
        match Tls::from_config(&config(cert, key), Arc::new(Metrics::new())) {
            Ok(_) => panic!("{cert} with {key} loads"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_matching_pair_loads_and_tls_is_off_without_files() {
        let metrics = Arc::new(Metrics::new());
        assert!(
            Tls::from_config(&config("server1.pem", "server1-key.pem"), metrics.clone())
                .unwrap()
                .is_some()
        );
        let off = TlsConfig {
            tls_cert: None,
            tls_key: None,
            tls_reload_interval_ms: Duration::from_millis(10_000),
        };
        assert!(Tls::from_config(&off, metrics).unwrap().is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_file_named() {
        let e = error("server1.pem", "server2-key.pem");
        assert!(
            e.contains("does not fit") && e.contains("server2-key.pem"),
            "{e}"
        );
        let e = error("server1-key.pem", "server1-key.pem");
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = error("server1.pem", "server1.pem");
        assert!(e.contains("no PEM private key"), "{e}");
        let e = error("generate.sh", "server1-key.pem");
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = error("missing.pem", "server1-key.pem");
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
    }
}
