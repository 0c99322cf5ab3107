//! All configuration, parsed once at start-up: command-line flags, each with a `MATCHGATE_*`
//! environment variable and a documented default.
//!
//! [`Config`] holds what belongs to the process (addresses, logging) and flattens one section
//! per concern, each defined next to the module that uses it: [`AuthConfig`] in `auth`,
//! [`HttpConfig`] in `http`, [`ConnectionConfig`] in `connection`, [`SessionConfig`] in
//! `gateway`, [`RulesConfig`] in `matching`, [`ModerationConfig`] in `moderation`,
//! [`RedisConfig`] in `scaleout`, [`LivekitConfig`] in `livekit`, [`P2pConfig`] in `p2p`,
//! [`PrivacyConfig`] in `privacy` and [`AttributeConfig`] in `attributes`. A new flag goes into the section of the module that reads
//! it. Flag and environment names are flat and stable (they are the deployments' interface,
//! pinned by a test against `tests/fixtures/config_flags.txt`); the sections only say who owns
//! a flag.
//!
//! Only the composition root (`server`, and the binaries) uses the whole [`Config`]: every
//! other module takes its own section, or plain values the root derives here from several
//! sections ([`Config::media_mode`], [`Config::history_ttl`]). The sections' value parsers
//! live in the leaf [`crate::flags`], so no module depends back on this one (see
//! `tests/module_graph.rs`).
//!
//! Values are checked in two places. A rule about one flag is part of its value parser (a range,
//! a format), so clap refuses a bad value naming the flag; durations are parsed there too,
//! into [`Duration`], in the unit the flag's name carries ([`millis`](crate::flags::millis),
//! [`secs`](crate::flags::secs)), so no caller converts units. Rules that relate several flags, and checks of secret values (which clap's
//! error would echo), live in one place: [`Config::validate`].
//!
//! With no configuration at all the gateway runs the embedded default: in-memory state, dev-mode
//! auth, listening on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

pub use crate::attributes::AttributeConfig;
pub use crate::auth::AuthConfig;
pub use crate::connection::ConnectionConfig;
pub use crate::flags::ConfigError;
pub use crate::gateway::SessionConfig;
pub use crate::http::HttpConfig;
pub use crate::livekit::LivekitConfig;
use crate::matching::MediaMode;
pub use crate::matching::RulesConfig;
pub use crate::moderation::ModerationConfig;
pub use crate::p2p::P2pConfig;
pub use crate::privacy::PrivacyConfig;
pub use crate::scaleout::RedisConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "matchgate",
    version,
    about = "Realtime matchmaking gateway for random video chat"
)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket traffic.
    #[arg(long, env = "MATCHGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of an internal listener for operators: `/metrics` and the admin API move there
    /// (and leave `--listen`), next to `/healthz` and `/readyz`. Without it, everything is
    /// served on `--listen`.
    #[arg(long, env = "MATCHGATE_INTERNAL_LISTEN")]
    pub internal_listen: Option<SocketAddr>,

    /// Log format: human-readable lines or one JSON object per line.
    #[arg(
        long,
        env = "MATCHGATE_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,

    /// Log filter in `tracing` syntax (e.g. `info`, `matchgate=debug`).
    #[arg(long, env = "MATCHGATE_LOG", default_value = "info")]
    pub log: String,

    #[command(flatten)]
    pub auth: AuthConfig,

    #[command(flatten)]
    pub http: HttpConfig,

    #[command(flatten)]
    pub connection: ConnectionConfig,

    #[command(flatten)]
    pub session: SessionConfig,

    #[command(flatten)]
    pub redis: RedisConfig,

    #[command(flatten)]
    pub livekit: LivekitConfig,

    #[command(flatten)]
    pub p2p: P2pConfig,

    #[command(flatten)]
    pub rules: RulesConfig,

    #[command(flatten)]
    pub attributes: AttributeConfig,

    #[command(flatten)]
    pub moderation: ModerationConfig,

    #[command(flatten)]
    pub privacy: PrivacyConfig,

    /// Instead of serving: probe `GET /healthz` of the gateway at `--listen` and exit 0 when it
    /// answers 200 (for container health checks in images without curl).
    #[arg(long)]
    pub healthcheck: bool,

    /// Native TLS (`--tls-cert`, `--tls-key`): see [`crate::tls`].
    #[command(flatten)]
    pub tls: crate::tls::TlsConfig,

    #[command(flatten)]
    pub ledger: crate::ledger::LedgerConfig,

    // --- Outbound webhooks (see `webhooks`) ---
    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookConfig,
}

/// Refuses a configuration for `reason`, a rule about `flags`.
fn refuse(flags: &[&'static str], reason: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        flags: flags.to_vec(),
        reason: reason.into(),
    })
}

/// Refuses a secret shorter than 32 bytes (one that could be guessed).
fn long_secret(flag: &'static str, env: &str, secret: Option<&String>) -> Result<(), ConfigError> {
    match secret {
        Some(secret) if secret.len() < 32 => refuse(
            &[flag],
            format!("{env} must be at least 32 bytes (got {})", secret.len()),
        ),
        _ => Ok(()),
    }
}

impl Config {
    /// The rules that relate several flags, and the checks of secrets (a value parser's error
    /// would print the value). Called once at start-up; every other rule is in a flag's value
    /// parser.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        long_secret(
            "jwt-secret",
            "MATCHGATE_JWT_SECRET",
            auth.jwt_secret.as_ref(),
        )?;
        if auth.dev_mode() && !self.listen.ip().is_loopback() && !auth.dev {
            return refuse(
                &["listen", "jwt-secret", "jwt-public-key-file", "dev"],
                format!(
                    "no MATCHGATE_JWT_SECRET or MATCHGATE_JWT_PUBLIC_KEY_FILE, and {} is not a loopback address: \
                     configure a key, or set MATCHGATE_DEV=true to run the unauthenticated dev mode there",
                    self.listen
                ),
            );
        }
        let public_keys = auth.jwt_public_key_file.is_some() || auth.jwks().is_some();
        if public_keys && auth.jwt_audience.is_none() && !auth.jwt_allow_any_audience {
            return refuse(
                &[
                    "jwt-audience",
                    "jwt-allow-any-audience",
                    "jwt-public-key-file",
                    "jwks-url",
                    "jwks-file",
                ],
                "a public key or JWKS is configured without MATCHGATE_JWT_AUDIENCE: tokens minted \
                 for any other service of the same identity provider would be accepted. Set \
                 MATCHGATE_JWT_AUDIENCE to this gateway's audience, or \
                 MATCHGATE_JWT_ALLOW_ANY_AUDIENCE=true if that is what you want",
            );
        }
        if auth.dev_secret.is_some() && !auth.dev_mode() {
            return refuse(
                &[
                    "dev-secret",
                    "jwt-secret",
                    "jwt-public-key-file",
                    "jwks-url",
                    "jwks-file",
                ],
                "MATCHGATE_DEV_SECRET is for dev mode only: a key is configured",
            );
        }
        long_secret(
            "dev-secret",
            "MATCHGATE_DEV_SECRET",
            auth.dev_secret.as_ref(),
        )?;
        self.ledger.validate()?;
        self.webhooks.validate()?;
        self.attributes.validate()?;
        if self
            .internal_listen
            .is_some_and(|internal| internal == self.listen && internal.port() != 0)
        {
            return refuse(
                &["internal-listen", "listen"],
                format!(
                    "MATCHGATE_INTERNAL_LISTEN must differ from MATCHGATE_LISTEN (both {})",
                    self.listen
                ),
            );
        }
        let http = &self.http;
        if http.max_pending_per_address > http.max_pending_connections {
            return refuse(
                &["max-pending-per-address", "max-pending-connections"],
                format!(
                    "MATCHGATE_MAX_PENDING_PER_ADDRESS must not exceed MATCHGATE_MAX_PENDING_CONNECTIONS (got {} and {})",
                    http.max_pending_per_address, http.max_pending_connections
                ),
            );
        }
        self.validate_redis()?;
        self.validate_media()?;
        long_secret(
            "admin-token",
            "MATCHGATE_ADMIN_TOKEN",
            self.moderation.admin_token.as_ref(),
        )
    }

    /// Several nodes are a cluster, a cluster needs nodes, and every URL parses (checked here,
    /// not by clap: a URL may hold a password).
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let redis = &self.redis;
        let Some(url) = &redis.redis_url else {
            if redis.redis_cluster {
                return refuse(
                    &["redis-cluster", "redis-url"],
                    "MATCHGATE_REDIS_CLUSTER needs MATCHGATE_REDIS_URL",
                );
            }
            return Ok(());
        };
        let urls: Vec<&str> = url.split(',').map(str::trim).collect();
        if urls.len() > 1 && !redis.redis_cluster {
            return refuse(
                &["redis-url", "redis-cluster"],
                "MATCHGATE_REDIS_URL lists several nodes: set MATCHGATE_REDIS_CLUSTER=true",
            );
        }
        for u in urls {
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u) {
                return refuse(
                    &["redis-url"],
                    format!("MATCHGATE_REDIS_URL {u:?} is invalid: {e}"),
                );
            }
        }
        Ok(())
    }

    /// LiveKit is all or nothing, and excludes the p2p settings; TURN URLs and secret go
    /// together.
    fn validate_media(&self) -> Result<(), ConfigError> {
        let lk = &self.livekit;
        let (key, secret) = (&lk.livekit_api_key, &lk.livekit_api_secret);
        if lk.livekit_url.is_none() {
            if key.is_some() || secret.is_some() || lk.livekit_api_url.is_some() {
                return refuse(
                    &["livekit-url", "livekit-api-key", "livekit-api-secret", "livekit-api-url"],
                    "MATCHGATE_LIVEKIT_API_* are set but MATCHGATE_LIVEKIT_URL is not: set it to turn media on",
                );
            }
        } else if key.as_deref().is_none_or(str::is_empty)
            || secret.as_deref().is_none_or(str::is_empty)
        {
            return refuse(
                &["livekit-url", "livekit-api-key", "livekit-api-secret"],
                "MATCHGATE_LIVEKIT_URL needs MATCHGATE_LIVEKIT_API_KEY and MATCHGATE_LIVEKIT_API_SECRET",
            );
        }
        let p2p = &self.p2p;
        let configured =
            !p2p.stun_urls.is_empty() || !p2p.turn_urls.is_empty() || p2p.turn_secret.is_some();
        if lk.enabled() && configured {
            return refuse(
                &["livekit-url", "stun-urls", "turn-urls", "turn-secret"],
                "MATCHGATE_STUN_URLS, MATCHGATE_TURN_URLS and MATCHGATE_TURN_SECRET are for media mode p2p, \
                 but MATCHGATE_LIVEKIT_URL turns LiveKit on: set one or the other",
            );
        }
        match (&p2p.turn_secret, p2p.turn_urls.is_empty()) {
            (None, false) => refuse(
                &["turn-urls", "turn-secret"],
                "MATCHGATE_TURN_URLS needs MATCHGATE_TURN_SECRET: TURN credentials are signed with it",
            ),
            (Some(_), true) => refuse(
                &["turn-secret", "turn-urls"],
                "MATCHGATE_TURN_SECRET is set but MATCHGATE_TURN_URLS is not: list the TURN servers",
            ),
            // Every client sees usernames and credentials: a short secret could be found by
            // trying candidates against them offline.
            _ => long_secret("turn-secret", "MATCHGATE_TURN_SECRET", p2p.turn_secret.as_ref()),
        }
    }

    /// How matches get their media.
    pub fn media_mode(&self) -> MediaMode {
        match self.media_pending() {
            Some(pending) => MediaMode::LiveKit { pending },
            None => MediaMode::P2p(Arc::new(self.p2p.ice_servers())),
        }
    }

    /// How long a matched pair may wait for its room before the match is undone by the
    /// backend itself ([`LivekitConfig::media_pending`]).
    pub fn media_pending(&self) -> Option<Duration> {
        self.livekit.media_pending(self.session.resume_grace_ms)
    }

    /// How long events stay replayable. A connection that dies silently is noticed only after
    /// the heartbeat timeout (or a write timeout), and the grace period starts then: events
    /// sent just before the silence must still be there when the client resumes.
    pub fn history_ttl(&self) -> Duration {
        self.session.resume_grace_ms
            + self.connection.heartbeat_timeout()
            + self.connection.write_timeout_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["matchgate"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("parses")
    }

    /// The configuration as the gateway takes it: parsed and validated, or the error message
    /// (clap's for a flag's own rule, [`ConfigError`]'s for a rule across flags).
    fn check(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["matchgate"];
        all.extend_from_slice(args);
        let config = Config::try_parse_from(all).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// Asserts that `args` are refused with a message that contains `says`.
    #[track_caller]
    fn refused(args: &[&str], says: &str) {
        match check(args) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => assert!(e.contains(says), "{args:?}: {e}"),
        }
    }

    /// Asserts that `args` break a rule across flags (not a flag's own rule), and that the
    /// error names exactly `flags` and says `says`.
    #[track_caller]
    fn breaks_rule(args: &[&str], flags: &[&str], says: &str) {
        let e = parse(args).validate().expect_err("refused");
        assert_eq!(e.flags, flags, "{args:?}: {e}");
        let shown = e.to_string();
        assert!(shown.contains(says), "{args:?}: {shown}");
        for flag in flags {
            assert!(shown.contains(&format!("--{flag}")), "{args:?}: {shown}");
        }
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let c = parse(&[]);
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.auth.dev_mode());
        assert!(c.session.requeue_peer_on_skip);
        assert_eq!(c.connection.heartbeat_timeout(), Duration::from_secs(50));
    }

    #[test]
    fn durations_are_parsed_in_the_unit_of_the_flag_name() {
        let c = parse(&[]);
        assert_eq!(
            c.connection.heartbeat_interval_ms,
            Duration::from_millis(25_000)
        );
        assert_eq!(c.rules.anti_repeat_window_s, Duration::from_secs(600));
        assert_eq!(c.auth.jwt_leeway_secs, Duration::from_secs(30));
        assert_eq!(
            c.rules.skip_cooldowns_s,
            [60, 300, 900].map(Duration::from_secs)
        );
        assert_eq!(c.rules.block_ttl_s, Duration::from_secs(180 * 86_400));
        let c = parse(&[
            "--resume-grace-ms",
            "1500",
            "--livekit-token-ttl-s",
            "7",
            "--dev-token-ttl-secs",
            "60",
            "--skip-cooldowns-s",
            "1,2",
        ]);
        assert_eq!(c.session.resume_grace_ms, Duration::from_millis(1500));
        assert_eq!(c.livekit.livekit_token_ttl_s, Duration::from_secs(7));
        assert_eq!(c.auth.dev_token_ttl_secs, Duration::from_secs(60));
        assert_eq!(c.rules.skip_cooldowns_s, [1, 2].map(Duration::from_secs));
        // History outlives the grace period by the heartbeat timeout and a write timeout.
        assert_eq!(
            c.history_ttl(),
            Duration::from_millis(1500 + 50_000 + 10_000)
        );
        refused(&["--resume-grace-ms", "1.5"], "--resume-grace-ms");
        refused(&["--resume-grace-ms=-1"], "--resume-grace-ms");
        refused(&["--skip-cooldowns-s", "60,0"], "--skip-cooldowns-s");
        refused(&["--skip-cooldowns-s", ""], "--skip-cooldowns-s");
    }

    /// A complete LiveKit configuration.
    const LIVEKIT: [&str; 6] = [
        "--livekit-url",
        "wss://x.livekit.cloud",
        "--livekit-api-key",
        "k",
        "--livekit-api-secret",
        "s",
    ];

    #[test]
    fn livekit_is_all_or_nothing_and_checked() {
        let c = parse(&[]);
        assert!(!c.livekit.enabled() && c.media_pending().is_none());
        let lk = LIVEKIT;
        let c = check(&lk).unwrap();
        assert!(c.livekit.enabled());
        assert!(matches!(c.media_mode(), MediaMode::LiveKit { .. }));
        // The creation deadline, one more request and the resume grace.
        assert_eq!(
            c.media_pending(),
            Some(Duration::from_millis(8_000 + 2_000 + 15_000))
        );
        assert_eq!(c.livekit.api_base().unwrap(), "https://x.livekit.cloud");
        let mut bad = lk.to_vec();
        bad[1] = "livekit.example.com";
        refused(&bad, "wss://");
        let mut bad = lk.to_vec();
        bad.extend(["--livekit-room-prefix", "a b"]);
        refused(&bad, "--livekit-room-prefix");
        let mut bad = lk.to_vec();
        bad.extend(["--livekit-max-participants", "1"]);
        refused(&bad, "--livekit-max-participants");
        let mut bad = lk.to_vec();
        bad.extend(["--livekit-sweep-interval-ms", "99"]);
        refused(&bad, "--livekit-sweep-interval-ms");
        refused(&["--livekit-api-url", "10.0.0.5:7880"], "https://");
        let mut api = lk.to_vec();
        api.extend(["--livekit-api-url", "http://10.0.0.5:7880"]);
        assert_eq!(
            check(&api).unwrap().livekit.api_base().unwrap(),
            "http://10.0.0.5:7880"
        );
    }

    #[test]
    fn rule_livekit_url_needs_the_api_key_and_secret() {
        breaks_rule(
            &["--livekit-url", "ws://lk:7880", "--livekit-api-key", "k"],
            &["livekit-url", "livekit-api-key", "livekit-api-secret"],
            "MATCHGATE_LIVEKIT_API_SECRET",
        );
        breaks_rule(
            &["--livekit-url", "ws://lk:7880", "--livekit-api-secret", "s"],
            &["livekit-url", "livekit-api-key", "livekit-api-secret"],
            "MATCHGATE_LIVEKIT_API_KEY",
        );
    }

    #[test]
    fn rule_livekit_api_settings_need_the_url() {
        for args in [
            &["--livekit-api-key", "k"][..],
            &["--livekit-api-secret", "s"],
            &["--livekit-api-url", "http://lk:7880"],
        ] {
            breaks_rule(
                args,
                &[
                    "livekit-url",
                    "livekit-api-key",
                    "livekit-api-secret",
                    "livekit-api-url",
                ],
                "MATCHGATE_LIVEKIT_URL is not",
            );
        }
    }

    #[test]
    fn rule_livekit_excludes_the_p2p_settings() {
        let secret = "s".repeat(32);
        for extra in [
            &["--stun-urls", "stun:s:3478"][..],
            &["--turn-urls", "turn:t:3478", "--turn-secret", &secret],
        ] {
            let mut both = LIVEKIT.to_vec();
            both.extend(extra);
            breaks_rule(
                &both,
                &["livekit-url", "stun-urls", "turn-urls", "turn-secret"],
                "media mode p2p",
            );
        }
    }

    #[test]
    fn rule_turn_urls_need_the_turn_secret_and_the_secret_the_urls() {
        breaks_rule(
            &["--turn-urls", "turn:t:3478"],
            &["turn-urls", "turn-secret"],
            "MATCHGATE_TURN_URLS needs MATCHGATE_TURN_SECRET",
        );
        breaks_rule(
            &["--turn-secret", &"s".repeat(32)],
            &["turn-secret", "turn-urls"],
            "MATCHGATE_TURN_URLS is not",
        );
    }

    #[test]
    fn rule_dev_mode_off_loopback_needs_dev() {
        breaks_rule(
            &["--listen", "0.0.0.0:8080"],
            &["listen", "jwt-secret", "jwt-public-key-file", "dev"],
            "MATCHGATE_DEV",
        );
        check(&["--listen", "0.0.0.0:8080", "--dev"]).unwrap();
        check(&[
            "--listen",
            "0.0.0.0:8080",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
        ])
        .unwrap();
    }

    #[test]
    fn rule_the_internal_listener_differs_from_the_public_one() {
        breaks_rule(
            &[
                "--listen",
                "127.0.0.1:8080",
                "--internal-listen",
                "127.0.0.1:8080",
            ],
            &["internal-listen", "listen"],
            "INTERNAL_LISTEN",
        );
        // Port 0 (any free port) twice gives two different ports.
        check(&[
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .unwrap();
    }

    #[test]
    fn rule_pending_per_address_within_pending_connections() {
        breaks_rule(
            &[
                "--max-pending-connections",
                "10",
                "--max-pending-per-address",
                "11",
            ],
            &["max-pending-per-address", "max-pending-connections"],
            "MAX_PENDING_PER_ADDRESS",
        );
        check(&[
            "--max-pending-connections",
            "10",
            "--max-pending-per-address",
            "10",
        ])
        .unwrap();
    }

    #[test]
    fn rule_several_redis_nodes_are_a_cluster_and_a_cluster_needs_nodes() {
        breaks_rule(
            &["--redis-url", "redis://a:1,redis://b:2"],
            &["redis-url", "redis-cluster"],
            "REDIS_CLUSTER",
        );
        breaks_rule(
            &["--redis-cluster"],
            &["redis-cluster", "redis-url"],
            "MATCHGATE_REDIS_URL",
        );
        check(&["--redis-url", "redis://a:1,redis://b:2", "--redis-cluster"]).unwrap();
    }

    #[test]
    fn rule_filtered_and_required_attributes_come_from_the_token() {
        breaks_rule(
            &[
                "--attribute-claims",
                "country",
                "--filterable-attributes",
                "gender",
            ],
            &["filterable-attributes", "attribute-claims"],
            "names gender",
        );
        breaks_rule(
            &["--require-attribute", "age_verified=true"],
            &["require-attribute", "attribute-claims"],
            "age_verified is not in MATCHGATE_ATTRIBUTE_CLAIMS",
        );
        check(&[
            "--attribute-claims",
            "country,age_verified",
            "--filterable-attributes",
            "country",
            "--require-attribute",
            "age_verified=true",
        ])
        .unwrap();
    }

    #[test]
    fn secrets_are_checked_without_being_shown() {
        let short = "hunter2-hunter2";
        for (args, flag) in [
            (vec!["--jwt-secret", short], "jwt-secret"),
            (vec!["--admin-token", short], "admin-token"),
            (
                vec!["--turn-urls", "turn:t:3478", "--turn-secret", short],
                "turn-secret",
            ),
            (
                vec!["--redis-url", "http://user:hunter2-hunter2@nope"],
                "redis-url",
            ),
        ] {
            let e = parse(&args).validate().expect_err("refused");
            assert_eq!(e.flags, [flag], "{args:?}: {e}");
            if flag != "redis-url" {
                assert!(e.to_string().contains("at least 32 bytes"), "{e}");
                assert!(!e.to_string().contains(short), "{e}");
            }
        }
    }

    #[test]
    fn p2p_is_the_default_and_turn_needs_urls_and_a_long_secret() {
        let c = parse(&[]);
        let MediaMode::P2p(ice) = c.media_mode() else {
            panic!("p2p is the default")
        };
        assert!(ice.stun_urls().is_empty() && ice.turn().is_none());
        let secret = "s".repeat(32);
        let turn = [
            "--stun-urls",
            "stun:stun.example.com:3478,stuns:stun.example.com:5349",
            "--turn-urls",
            "turn:turn.example.com:3478?transport=udp,turns:turn.example.com:5349",
            "--turn-secret",
            &secret,
        ];
        let c = check(&turn).unwrap();
        let MediaMode::P2p(ice) = c.media_mode() else {
            panic!("p2p")
        };
        assert_eq!(ice.stun_urls().len(), 2);
        let t = ice.turn().unwrap();
        assert_eq!(t.urls.len(), 2);
        assert_eq!(t.ttl, Duration::from_secs(3600));
        refused(
            &turn[..4],
            "MATCHGATE_TURN_URLS needs MATCHGATE_TURN_SECRET",
        );
        refused(&["--turn-secret", &secret], "MATCHGATE_TURN_URLS is not");
        refused(
            &["--turn-urls", "turn:t:3478", "--turn-secret", "short"],
            "MATCHGATE_TURN_SECRET must be at least 32 bytes",
        );
        refused(&["--stun-urls", "stun.example.com"], "--stun-urls");
        refused(&["--stun-urls", "stun:"], "--stun-urls");
        refused(&["--stun-urls", "stun:a b"], "--stun-urls");
        refused(
            &["--turn-urls", "http://t", "--turn-secret", &secret],
            "--turn-urls",
        );
        let mut short_ttl = turn.to_vec();
        short_ttl.extend(["--turn-ttl-s", "59"]);
        refused(&short_ttl, "--turn-ttl-s");
        let mut long_ttl = turn.to_vec();
        long_ttl.extend(["--turn-ttl-s", "604801"]);
        refused(&long_ttl, "--turn-ttl-s");
        let mut both = LIVEKIT.to_vec();
        both.extend(["--stun-urls", "stun:s:3478"]);
        refused(&both, "media mode p2p");
        refused(&["--max-signal-bytes", "100"], "--max-signal-bytes");
        refused(&["--signal-burst", "0"], "--signal-burst");
    }

    #[test]
    fn rejects_nonsense_with_a_clear_message() {
        refused(&["--jwt-secret", "short"], "at least 32 bytes");
        refused(&["--max-message-bytes", "10"], "MAX_MESSAGE_BYTES");
        refused(&["--listen", "0.0.0.0:8080"], "MATCHGATE_DEV");
        refused(&["--redis-url", "http://nope"], "REDIS_URL");
        refused(&["--redis-url", "redis://a:1,redis://b:2"], "REDIS_CLUSTER");
        refused(&["--redis-namespace", "a{b}"], "NAMESPACE");
        refused(&["--instance-id", "a b"], "--instance-id");
        refused(&["--jwt-audience", ""], "--jwt-audience");
        for flags in [
            ["--reports-per-hour", "0"],
            ["--max-blocks-per-user", "0"],
            ["--block-ttl-s", "0"],
            ["--block-ttl-s", "315360001"],
            ["--heartbeat-timeout-factor", "0.5"],
            ["--heartbeat-timeout-factor", "NaN"],
            ["--outbound-queue", "7"],
            ["--history-len", "0"],
            ["--relax-after-ms", "99"],
            ["--redis-call-timeout-ms", "9"],
            ["--instance-heartbeat-ms", "49"],
        ] {
            let name = flags[0].trim_start_matches("--").replace('-', "_");
            refused(&flags, &name.to_uppercase());
        }
        refused(&["--allowed-origins", "example.com"], "ALLOWED_ORIGINS");
        refused(
            &["--allowed-origins", "https://a.example/"],
            "ALLOWED_ORIGINS",
        );
        refused(&["--listen", "nowhere"], "--listen");
        refused(
            &["--jwt-secret", "x", "--jwt-public-key-file", "/k.pem"],
            "--jwt-public-key-file",
        );
    }

    #[test]
    fn demo_page_in_dev_mode_or_when_asked_for() {
        assert!(parse(&[]).auth.demo_page());
        let keyed = ["--jwt-secret", "0123456789abcdef0123456789abcdef"];
        assert!(!parse(&keyed).auth.demo_page());
        let mut asked = keyed.to_vec();
        asked.push("--demo");
        assert!(parse(&asked).auth.demo_page());
        assert!(Config::try_parse_from(["matchgate", "--demo=maybe"]).is_err());
    }

    #[test]
    fn http_limits_are_checked() {
        let c = parse(&[]);
        assert_eq!(c.http.http_head_timeout_ms, Duration::from_millis(10_000));
        assert_eq!(c.http.http_max_head_bytes, 16 * 1024);
        assert_eq!(c.http.ipv6_prefix_len, 64);
        assert!(c.internal_listen.is_none());
        for (args, named) in [
            (
                &["--http-head-timeout-ms", "10"][..],
                "HTTP_HEAD_TIMEOUT_MS",
            ),
            (
                &["--http-head-timeout-ms", "60001"][..],
                "HTTP_HEAD_TIMEOUT_MS",
            ),
            (&["--http-max-head-bytes", "100"][..], "HTTP_MAX_HEAD_BYTES"),
            (&["--max-pending-connections", "0"][..], "MAX_PENDING"),
            (
                &["--max-pending-per-address", "0"][..],
                "MAX_PENDING_PER_ADDRESS",
            ),
            (
                &[
                    "--max-pending-connections",
                    "10",
                    "--max-pending-per-address",
                    "11",
                ][..],
                "MAX_PENDING_PER_ADDRESS",
            ),
            (&["--ipv6-prefix-len", "16"][..], "IPV6_PREFIX_LEN"),
            (&["--ipv6-prefix-len", "129"][..], "IPV6_PREFIX_LEN"),
            (
                &[
                    "--listen",
                    "127.0.0.1:8080",
                    "--internal-listen",
                    "127.0.0.1:8080",
                ][..],
                "INTERNAL_LISTEN",
            ),
        ] {
            refused(args, named);
        }
        check(&[
            "--internal-listen",
            "10.0.0.5:9090",
            "--ipv6-prefix-len",
            "48",
        ])
        .unwrap();
    }

    /// The public interface of the configuration: every flag with its environment variable,
    /// default and help text, one line each, sorted by flag. Compared with the checked-in
    /// `tests/fixtures/config_flags.txt`, so that moving a field between sections cannot
    /// rename, re-default or re-document a flag a deployment relies on. A new flag is added to
    /// the list on purpose: `UPDATE_FLAG_LIST=1 cargo test --lib flags_env_names` rewrites it.
    #[test]
    fn flags_env_names_defaults_and_help_are_unchanged() {
        use clap::CommandFactory;
        let one_line = |s: Option<&clap::builder::StyledStr>| {
            s.map(|s| s.to_string().replace('\n', "\\n"))
                .unwrap_or_default()
        };
        let mut lines: Vec<String> = Config::command()
            .get_arguments()
            .filter_map(|arg| {
                let long = arg.get_long()?;
                let env = arg
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let defaults: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                Some(format!(
                    "--{long}\tenv={env}\tdefault={}\taction={:?}\tdelimiter={:?}\thidden_env_values={}\thelp={}\tlong_help={}",
                    defaults.join(","),
                    arg.get_action(),
                    arg.get_value_delimiter(),
                    arg.is_hide_env_values_set(),
                    one_line(arg.get_help()),
                    one_line(arg.get_long_help()),
                ))
            })
            .collect();
        lines.sort();
        let actual = lines.join("\n") + "\n";
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/config_flags.txt"
        );
        if std::env::var_os("UPDATE_FLAG_LIST").is_some() {
            std::fs::write(path, &actual).unwrap();
        }
        let expected = std::fs::read_to_string(path).unwrap_or_default();
        let (expected, actual): (Vec<&str>, Vec<&str>) =
            (expected.lines().collect(), actual.lines().collect());
        let missing: Vec<&&str> = expected.iter().filter(|l| !actual.contains(l)).collect();
        let new: Vec<&&str> = actual.iter().filter(|l| !expected.contains(l)).collect();
        assert!(
            missing.is_empty() && new.is_empty(),
            "flags changed (UPDATE_FLAG_LIST=1 rewrites the list if that is meant)\n\
             gone or changed: {missing:#?}\nnew or changed: {new:#?}"
        );
    }

    #[test]
    fn parses_lists_and_booleans() {
        let c = check(&[
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--requeue-peer-on-skip",
            "false",
        ])
        .unwrap();
        assert_eq!(c.http.allowed_origins.len(), 2);
        assert!(!c.session.requeue_peer_on_skip);
    }
}
