//! All configuration in one place: command-line flags, each with a `MATCHGATE_*` environment
//! variable and a documented default, validated once at start-up.
//!
//! With no configuration at all the gateway runs the embedded default: in-memory state, dev-mode
//! auth, listening on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::matching::MediaMode;
use crate::p2p::{IceServers, Turn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Algorithm for tokens verified with a public key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyAlgorithm {
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

/// Where a user who declined a proposed match goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeclineTo {
    Idle,
    Tail,
}

/// How identities appear in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogIdentities {
    Hashed,
    Full,
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
    #[arg(long, env = "MATCHGATE_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,

    /// Required `iss` claim, if set.
    #[arg(long, env = "MATCHGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, if set.
    #[arg(long, env = "MATCHGATE_JWT_AUDIENCE")]
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
    #[arg(long, env = "MATCHGATE_DEV_TOKEN_TTL_SECS", default_value_t = 3600)]
    pub dev_token_ttl_secs: u64,

    /// Comma-separated `Origin` values allowed to open WebSockets (browsers). Empty: any origin.
    /// Requests without an `Origin` header (mobile apps) are always allowed.
    #[arg(
        long,
        env = "MATCHGATE_ALLOWED_ORIGINS",
        value_delimiter = ',',
        num_args = 0..
    )]
    pub allowed_origins: Vec<String>,

    /// Load balancers and proxies (IPs or CIDRs, comma-separated) whose `X-Forwarded-For` is
    /// believed: behind them the client address (for the per-address limit, address bans and
    /// logs) is the nearest untrusted hop of that header. Without it, the TCP peer.
    #[arg(
        long,
        env = "MATCHGATE_TRUSTED_PROXIES",
        value_delimiter = ',',
        num_args = 0..,
        value_parser = parse_net
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Most concurrent WebSocket connections; beyond it the upgrade is refused with 503.
    #[arg(long, env = "MATCHGATE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Longest time a client may take to send a request head (request line and headers), in
    /// ms; a slower one is disconnected. Also how long an idle keep-alive HTTP connection is
    /// kept open between requests.
    #[arg(long, env = "MATCHGATE_HTTP_HEAD_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_head_timeout_ms: u64,

    /// Largest request head (request line and headers) in bytes; a larger one gets 431.
    #[arg(long, env = "MATCHGATE_HTTP_MAX_HEAD_BYTES", default_value_t = 16_384)]
    pub http_max_head_bytes: usize,

    /// Most TCP connections on this instance that have not become WebSockets (yet): still
    /// sending a request, or idle between keep-alive HTTP requests. Beyond it new connections
    /// get 503 and are closed at once.
    #[arg(
        long,
        env = "MATCHGATE_MAX_PENDING_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_pending_connections: usize,

    /// Most such connections from one client address (the TCP peer, counted like the other
    /// per-address limits; peers in `--trusted-proxies` are exempt). Beyond it new connections
    /// from that address get 429 and are closed at once.
    #[arg(long, env = "MATCHGATE_MAX_PENDING_PER_ADDRESS", default_value_t = 64)]
    pub max_pending_per_address: usize,

    /// IPv6 clients count by this many leading bits of their address (a provider gives each
    /// subscriber a whole prefix), for the per-address limits and address bans. 32 to 128.
    #[arg(long, env = "MATCHGATE_IPV6_PREFIX_LEN", default_value_t = 64)]
    pub ipv6_prefix_len: u8,

    /// Largest client frame in bytes; larger frames close the connection with 1009 (`signal`
    /// frames have a limit of their own, `--max-signal-bytes`).
    #[arg(long, env = "MATCHGATE_MAX_MESSAGE_BYTES", default_value_t = 4096)]
    pub max_message_bytes: usize,

    /// Largest `signal` payload in bytes (real SDP offers are often 4 to 8 KB). A larger
    /// payload gets `bad_request`; a `signal` frame larger than this plus 1 KiB closes with 1009.
    #[arg(long, env = "MATCHGATE_MAX_SIGNAL_BYTES", default_value_t = 16_384)]
    pub max_signal_bytes: usize,

    /// `signal`s allowed per minute and connection (a token bucket of its own, apart from the
    /// general message rate).
    #[arg(long, env = "MATCHGATE_SIGNAL_PER_MINUTE", default_value_t = 600)]
    pub signal_per_minute: u32,

    /// Burst size of the `signal` rate limit (a burst of ICE candidates).
    #[arg(long, env = "MATCHGATE_SIGNAL_BURST", default_value_t = 60)]
    pub signal_burst: u32,

    /// Capacity of each connection's outbound queue, in frames. A client that lets it fill up is
    /// closed with 4003.
    #[arg(long, env = "MATCHGATE_OUTBOUND_QUEUE", default_value_t = 64)]
    pub outbound_queue: usize,

    /// How long one write to a client may take before it is treated as a slow consumer, in ms.
    #[arg(long, env = "MATCHGATE_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    /// How often clients should send a heartbeat, and the server sends pings, in ms.
    #[arg(
        long,
        env = "MATCHGATE_HEARTBEAT_INTERVAL_MS",
        default_value_t = 25_000
    )]
    pub heartbeat_interval_ms: u64,

    /// A connection silent for `heartbeat_interval_ms` times this factor is closed with 4002.
    #[arg(
        long,
        env = "MATCHGATE_HEARTBEAT_TIMEOUT_FACTOR",
        default_value_t = 2.0
    )]
    pub heartbeat_timeout_factor: f64,

    /// How long a dropped user's queue place or session is held for a resume, in ms.
    #[arg(long, env = "MATCHGATE_RESUME_GRACE_MS", default_value_t = 15_000)]
    pub resume_grace_ms: u64,

    /// Events kept per user for replay after a resume.
    /// Keep it above the outbound queue, so that a slow consumer closed for a full queue gets
    /// everything back by resuming.
    #[arg(long, env = "MATCHGATE_HISTORY_LEN", default_value_t = 128)]
    pub history_len: usize,

    /// Whether the peer of a user who skips (or times out) is put back in the queue.
    #[arg(
        long,
        env = "MATCHGATE_REQUEUE_PEER_ON_SKIP",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub requeue_peer_on_skip: bool,

    /// Least time between two `queue_update`s for the users of one pool, in ms.
    #[arg(
        long,
        env = "MATCHGATE_QUEUE_UPDATE_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub queue_update_interval_ms: u64,

    /// Client messages allowed per minute and connection (token bucket refill rate).
    #[arg(long, env = "MATCHGATE_RATE_LIMIT_PER_MINUTE", default_value_t = 120)]
    pub rate_limit_per_minute: u32,

    /// Burst size of the per-connection message rate limit.
    #[arg(long, env = "MATCHGATE_RATE_LIMIT_BURST", default_value_t = 30)]
    pub rate_limit_burst: u32,

    /// Errors a connection may cause before it is closed with 4004.
    #[arg(long, env = "MATCHGATE_ERROR_BUDGET", default_value_t = 10)]
    pub error_budget: u32,

    /// One unit of the error budget comes back after this many ms.
    #[arg(
        long,
        env = "MATCHGATE_ERROR_BUDGET_REFILL_MS",
        default_value_t = 6_000
    )]
    pub error_budget_refill_ms: u64,

    /// How long a graceful shutdown waits for connections to close, in ms.
    #[arg(long, env = "MATCHGATE_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// Upper bound of the jittered `retry_after_ms` in the shutdown `reconnect` event.
    #[arg(long, env = "MATCHGATE_RECONNECT_JITTER_MS", default_value_t = 5_000)]
    pub reconnect_jitter_ms: u64,

    /// Redis URL: switches matching state and cross-instance delivery from memory to Redis
    /// (scale-out mode). With `--redis-cluster`, a comma-separated list of cluster nodes.
    #[arg(long, env = "MATCHGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Treat `--redis-url` as a Redis Cluster (comma-separated seed nodes).
    #[arg(long, env = "MATCHGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Namespace of all Redis keys and channels; also the keys' hash tag. Deployments that share
    /// a Redis need different namespaces.
    #[arg(long, env = "MATCHGATE_REDIS_NAMESPACE", default_value = "mg")]
    pub redis_namespace: String,

    /// Redis connections in the command pool.
    #[arg(long, env = "MATCHGATE_REDIS_POOL_SIZE", default_value_t = 16)]
    pub redis_pool_size: usize,

    /// How long one matching call to Redis may take before the action answers `unavailable`
    /// (the operation may still have been applied), in ms.
    #[arg(long, env = "MATCHGATE_REDIS_CALL_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_call_timeout_ms: u64,

    /// This instance's id among the instances sharing a Redis. Default: random at start-up.
    #[arg(long, env = "MATCHGATE_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// How often an instance refreshes its liveness in Redis and helps with clean-up, in ms.
    /// An instance silent for two periods is treated as dead.
    #[arg(long, env = "MATCHGATE_INSTANCE_HEARTBEAT_MS", default_value_t = 2_000)]
    pub instance_heartbeat_ms: u64,

    /// LiveKit URL that clients connect to (`wss://...`). With it, plus the API key and secret,
    /// media mode is `livekit`: every match gets a room and a join token per user.
    #[arg(long, env = "MATCHGATE_LIVEKIT_URL")]
    pub livekit_url: Option<String>,

    /// LiveKit API (RoomService) base URL. Default: the client URL over http(s).
    #[arg(long, env = "MATCHGATE_LIVEKIT_API_URL")]
    pub livekit_api_url: Option<String>,

    /// LiveKit API key: signs RoomService calls and join tokens, checks webhooks.
    #[arg(long, env = "MATCHGATE_LIVEKIT_API_KEY")]
    pub livekit_api_key: Option<String>,

    /// LiveKit API secret.
    #[arg(long, env = "MATCHGATE_LIVEKIT_API_SECRET", hide_env_values = true)]
    pub livekit_api_secret: Option<String>,

    /// Prefix of room names; a room is `<prefix><session id>`. The sweep only ever deletes
    /// rooms with this prefix.
    #[arg(long, env = "MATCHGATE_LIVEKIT_ROOM_PREFIX", default_value = "mg_")]
    pub livekit_room_prefix: String,

    /// Seconds LiveKit keeps a room nobody joined.
    #[arg(long, env = "MATCHGATE_LIVEKIT_EMPTY_TIMEOUT_S", default_value_t = 30)]
    pub livekit_empty_timeout_s: u32,

    /// Seconds LiveKit keeps a room after the last participant left.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_DEPARTURE_TIMEOUT_S",
        default_value_t = 10
    )]
    pub livekit_departure_timeout_s: u32,

    /// Participants a room admits.
    #[arg(long, env = "MATCHGATE_LIVEKIT_MAX_PARTICIPANTS", default_value_t = 2)]
    pub livekit_max_participants: u32,

    /// Lifetime of a join token, in seconds (the time a client has to join the room).
    #[arg(long, env = "MATCHGATE_LIVEKIT_TOKEN_TTL_S", default_value_t = 600)]
    pub livekit_token_ttl_s: u64,

    /// Timeout of one RoomService request, in ms.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_REQUEST_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    pub livekit_request_timeout_ms: u64,

    /// How long room creation is retried (with backoff) before both users get
    /// `media_unavailable` and go back to the head of the queue, in ms.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_CREATE_DEADLINE_MS",
        default_value_t = 8_000
    )]
    pub livekit_create_deadline_ms: u64,

    /// How often one instance compares LiveKit's rooms with the live sessions and cleans up
    /// both sides, in ms.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_SWEEP_INTERVAL_MS",
        default_value_t = 60_000
    )]
    pub livekit_sweep_interval_ms: u64,

    /// How long webhook event ids are remembered to drop duplicates, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_WEBHOOK_DEDUPE_S",
        default_value_t = 600
    )]
    pub livekit_webhook_dedupe_s: u64,

    /// STUN server URLs (`stun:host:port`, comma-separated) listed in every `matched` of media
    /// mode `p2p` (the mode without LiveKit).
    #[arg(long, env = "MATCHGATE_STUN_URLS", value_delimiter = ',', num_args = 0..)]
    pub stun_urls: Vec<String>,

    /// TURN server URLs (`turn:host:port?transport=udp`, `turns:...`, comma-separated) listed,
    /// with per-member credentials, in every `matched` of media mode `p2p`. Needs
    /// `--turn-secret`.
    #[arg(long, env = "MATCHGATE_TURN_URLS", value_delimiter = ',', num_args = 0..)]
    pub turn_urls: Vec<String>,

    /// Secret shared with the TURN server (coturn: `use-auth-secret` with this as
    /// `static-auth-secret`), at least 32 bytes; it signs the time-limited TURN credentials.
    #[arg(long, env = "MATCHGATE_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<String>,

    /// Lifetime of TURN credentials, from the match, in seconds.
    #[arg(long, env = "MATCHGATE_TURN_TTL_S", default_value_t = 3600)]
    pub turn_ttl_s: u64,

    // --- Safety and fairness rules (enforced in the matching step, so in both backends) ---
    /// Two users who were matched are not matched again within this many seconds...
    #[arg(long, env = "MATCHGATE_ANTI_REPEAT_WINDOW_S", default_value_t = 600)]
    pub anti_repeat_window_s: u64,

    /// ...unless one of them has waited this long with nobody else to meet, in ms.
    #[arg(
        long,
        env = "MATCHGATE_ANTI_REPEAT_FALLBACK_MS",
        default_value_t = 30_000
    )]
    pub anti_repeat_fallback_ms: u64,

    /// A skip within this many seconds of the match counts as quick; a session that lasts at
    /// least this long resets the count and the cooldown level.
    #[arg(long, env = "MATCHGATE_SKIP_QUICK_S", default_value_t = 30)]
    pub skip_quick_s: u64,

    /// Quick skips within the window that start a cooldown.
    #[arg(long, env = "MATCHGATE_SKIP_LIMIT", default_value_t = 5)]
    pub skip_limit: u32,

    /// The window over which quick skips are counted, in seconds.
    #[arg(long, env = "MATCHGATE_SKIP_WINDOW_S", default_value_t = 300)]
    pub skip_window_s: u64,

    /// Cooldowns in seconds, one per consecutive cooldown (the last one repeats).
    #[arg(
        long,
        env = "MATCHGATE_SKIP_COOLDOWNS_S",
        value_delimiter = ',',
        default_value = "60,300,900"
    )]
    pub skip_cooldowns_s: Vec<u64>,

    /// `enqueue`s allowed per user and minute (shared across instances).
    #[arg(long, env = "MATCHGATE_ENQUEUE_PER_MINUTE", default_value_t = 30)]
    pub enqueue_per_minute: u32,

    /// Accept phase: with a value above 0, a match is first proposed (`match_proposed`) and
    /// both must `accept` within this many ms to get `matched`.
    #[arg(long, env = "MATCHGATE_ACCEPT_TIMEOUT_MS", default_value_t = 0)]
    pub accept_timeout_ms: u64,

    /// Where a user who declined a proposal (or let it time out) goes: `idle` or the `tail`
    /// of the queue. The other one always goes back to the head.
    #[arg(long, env = "MATCHGATE_DECLINE_TO", value_enum, default_value = "idle")]
    pub decline_to: DeclineTo,

    /// Preference relaxation: every this many ms of waiting, one more of the user's `soft`
    /// preference fields is dropped from the search.
    #[arg(long, env = "MATCHGATE_RELAX_AFTER_MS", default_value_t = 10_000)]
    pub relax_after_ms: u64,

    /// Blocks kept per user: a user's block list keeps the most recent this many (the oldest
    /// block goes first).
    #[arg(long, env = "MATCHGATE_MAX_BLOCKS_PER_USER", default_value_t = 1_000)]
    pub max_blocks_per_user: usize,

    /// The blocks a user made are forgotten once the user has not been connected for this
    /// many seconds (default: 180 days).
    #[arg(long, env = "MATCHGATE_BLOCK_TTL_S", default_value_t = 180 * 86_400)]
    pub block_ttl_s: u64,

    // --- Moderation ---
    /// Bearer token of the admin API under `/v1/admin/` (at least 32 bytes). Without it the
    /// admin API is off.
    #[arg(long, env = "MATCHGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// WebSocket connection attempts allowed per client IP and minute (HTTP 429 beyond).
    #[arg(long, env = "MATCHGATE_IP_CONNECTS_PER_MINUTE", default_value_t = 60)]
    pub ip_connects_per_minute: u32,

    /// Distinct reporters within the report window that ban a user automatically (0: never).
    #[arg(long, env = "MATCHGATE_REPORT_BAN_THRESHOLD", default_value_t = 3)]
    pub report_ban_threshold: u32,

    /// The window for counting distinct reporters, in seconds.
    #[arg(long, env = "MATCHGATE_REPORT_WINDOW_S", default_value_t = 86_400)]
    pub report_window_s: u64,

    /// How long an automatic ban lasts, in seconds.
    #[arg(long, env = "MATCHGATE_REPORT_BAN_TTL_S", default_value_t = 86_400)]
    pub report_ban_ttl_s: u64,

    /// Reports kept (in memory, or in the Redis stream, trimmed to about this many).
    #[arg(long, env = "MATCHGATE_REPORTS_KEPT", default_value_t = 100_000)]
    pub reports_kept: usize,

    /// Reports one user may file per hour (a window that starts with the first report), across
    /// connections and instances; beyond it `report` answers `rate_limited`.
    #[arg(long, env = "MATCHGATE_REPORTS_PER_HOUR", default_value_t = 20)]
    pub reports_per_hour: u32,

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

    /// Instead of serving: probe `GET /healthz` of the gateway at `--listen` and exit 0 when it
    /// answers 200 (for container health checks in images without curl).
    #[arg(long)]
    pub healthcheck: bool,

    // --- Outbound webhooks (see `webhooks`) ---
    #[command(flatten)]
    pub webhooks: crate::webhooks::WebhookConfig,
}

/// An IP network, or a single address as the network of just that address.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR network"))
}

/// The longest block TTL: ten years.
const MAX_BLOCK_TTL_S: u64 = 10 * 365 * 86_400;

/// A configuration that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks values that clap's types cannot express. Called once at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < 32 {
                return fail(format!(
                    "MATCHGATE_JWT_SECRET must be at least 32 bytes (got {})",
                    secret.len()
                ));
            }
        }
        if self.dev_mode() && !self.listen.ip().is_loopback() && !self.dev {
            return fail(format!(
                "no MATCHGATE_JWT_SECRET or MATCHGATE_JWT_PUBLIC_KEY_FILE, and {} is not a loopback address: \
                 configure a key, or set MATCHGATE_DEV=true to run the unauthenticated dev mode there",
                self.listen
            ));
        }
        if let Some(aud) = &self.jwt_audience {
            if aud.is_empty() {
                return fail("MATCHGATE_JWT_AUDIENCE must not be empty when set".into());
            }
        }
        if !(256..=1 << 20).contains(&self.max_message_bytes) {
            return fail(format!(
                "MATCHGATE_MAX_MESSAGE_BYTES must be between 256 and 1048576 (got {})",
                self.max_message_bytes
            ));
        }
        if !(256..=1 << 20).contains(&self.max_signal_bytes) {
            return fail(format!(
                "MATCHGATE_MAX_SIGNAL_BYTES must be between 256 and 1048576 (got {})",
                self.max_signal_bytes
            ));
        }
        if self.signal_per_minute == 0 || self.signal_burst == 0 {
            return fail(
                "MATCHGATE_SIGNAL_PER_MINUTE and MATCHGATE_SIGNAL_BURST must be at least 1".into(),
            );
        }
        if self.max_connections == 0 {
            return fail("MATCHGATE_MAX_CONNECTIONS must be at least 1".into());
        }
        self.validate_http()?;
        if !(8..=65_536).contains(&self.outbound_queue) {
            return fail(format!(
                "MATCHGATE_OUTBOUND_QUEUE must be between 8 and 65536 (got {})",
                self.outbound_queue
            ));
        }
        if self.heartbeat_interval_ms < 10 {
            return fail("MATCHGATE_HEARTBEAT_INTERVAL_MS must be at least 10".into());
        }
        if !(self.heartbeat_timeout_factor >= 1.0 && self.heartbeat_timeout_factor <= 100.0) {
            return fail(format!(
                "MATCHGATE_HEARTBEAT_TIMEOUT_FACTOR must be between 1 and 100 (got {})",
                self.heartbeat_timeout_factor
            ));
        }
        if self.history_len == 0 {
            return fail("MATCHGATE_HISTORY_LEN must be at least 1".into());
        }
        if self.rate_limit_per_minute == 0 || self.rate_limit_burst == 0 {
            return fail(
                "MATCHGATE_RATE_LIMIT_PER_MINUTE and MATCHGATE_RATE_LIMIT_BURST must be at least 1"
                    .into(),
            );
        }
        if self.error_budget == 0 || self.error_budget_refill_ms == 0 {
            return fail(
                "MATCHGATE_ERROR_BUDGET and MATCHGATE_ERROR_BUDGET_REFILL_MS must be at least 1"
                    .into(),
            );
        }
        if let Some(url) = &self.redis_url {
            let urls: Vec<&str> = url.split(',').map(str::trim).collect();
            if urls.len() > 1 && !self.redis_cluster {
                return fail(
                    "MATCHGATE_REDIS_URL lists several nodes: set MATCHGATE_REDIS_CLUSTER=true"
                        .into(),
                );
            }
            for u in urls {
                if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u) {
                    return fail(format!("MATCHGATE_REDIS_URL {u:?} is invalid: {e}"));
                }
            }
        } else if self.redis_cluster {
            return fail("MATCHGATE_REDIS_CLUSTER needs MATCHGATE_REDIS_URL".into());
        }
        let ns_ok = !self.redis_namespace.is_empty()
            && self.redis_namespace.len() <= 32
            && self
                .redis_namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ns_ok {
            return fail(format!(
                "MATCHGATE_REDIS_NAMESPACE must be 1 to 32 of A-Z a-z 0-9 _ - (got {:?})",
                self.redis_namespace
            ));
        }
        if let Some(id) = &self.instance_id {
            if id.is_empty() || id.len() > 64 || id.bytes().any(|b| !b.is_ascii_graphic()) {
                return fail(format!(
                    "MATCHGATE_INSTANCE_ID must be 1 to 64 printable characters (got {id:?})"
                ));
            }
        }
        if self.instance_heartbeat_ms < 50
            || self.redis_pool_size == 0
            || self.redis_call_timeout_ms < 10
        {
            return fail(
                "MATCHGATE_INSTANCE_HEARTBEAT_MS must be at least 50, MATCHGATE_REDIS_POOL_SIZE at least 1 and MATCHGATE_REDIS_CALL_TIMEOUT_MS at least 10"
                    .into(),
            );
        }
        self.validate_livekit()?;
        self.validate_p2p()?;
        self.validate_rules()?;
        self.webhooks.validate()?;
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                return fail(format!(
                    "MATCHGATE_ALLOWED_ORIGINS entries look like https://app.example.com (got {origin:?})"
                ));
            }
        }
        Ok(())
    }

    fn validate_http(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if !(100..=60_000).contains(&self.http_head_timeout_ms) {
            return fail(format!(
                "MATCHGATE_HTTP_HEAD_TIMEOUT_MS must be between 100 and 60000 (got {})",
                self.http_head_timeout_ms
            ));
        }
        if !(1024..=1 << 20).contains(&self.http_max_head_bytes) {
            return fail(format!(
                "MATCHGATE_HTTP_MAX_HEAD_BYTES must be between 1024 and 1048576 (got {})",
                self.http_max_head_bytes
            ));
        }
        if self.max_pending_connections == 0
            || !(1..=self.max_pending_connections).contains(&self.max_pending_per_address)
        {
            return fail(format!(
                "MATCHGATE_MAX_PENDING_CONNECTIONS must be at least 1 and MATCHGATE_MAX_PENDING_PER_ADDRESS between 1 and it (got {} and {})",
                self.max_pending_connections, self.max_pending_per_address
            ));
        }
        if !(32..=128).contains(&self.ipv6_prefix_len) {
            return fail(format!(
                "MATCHGATE_IPV6_PREFIX_LEN must be between 32 and 128 (got {})",
                self.ipv6_prefix_len
            ));
        }
        if self
            .internal_listen
            .is_some_and(|internal| internal == self.listen && internal.port() != 0)
        {
            return fail(format!(
                "MATCHGATE_INTERNAL_LISTEN must differ from MATCHGATE_LISTEN (both {})",
                self.listen
            ));
        }
        Ok(())
    }

    fn validate_rules(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        if self.skip_cooldowns_s.is_empty() || self.skip_cooldowns_s.contains(&0) {
            return fail(
                "MATCHGATE_SKIP_COOLDOWNS_S must list at least one cooldown, each at least 1 s"
                    .into(),
            );
        }
        if self.skip_limit == 0 || self.skip_window_s == 0 || self.enqueue_per_minute == 0 {
            return fail(
                "MATCHGATE_SKIP_LIMIT, MATCHGATE_SKIP_WINDOW_S and MATCHGATE_ENQUEUE_PER_MINUTE must be at least 1"
                    .into(),
            );
        }
        if self.relax_after_ms < 100 {
            return fail("MATCHGATE_RELAX_AFTER_MS must be at least 100".into());
        }
        if let Some(token) = &self.admin_token {
            if token.len() < 32 {
                return fail(format!(
                    "MATCHGATE_ADMIN_TOKEN must be at least 32 bytes (got {})",
                    token.len()
                ));
            }
        }
        if self.ip_connects_per_minute == 0
            || self.report_window_s == 0
            || self.report_ban_ttl_s == 0
        {
            return fail(
                "MATCHGATE_IP_CONNECTS_PER_MINUTE, MATCHGATE_REPORT_WINDOW_S and MATCHGATE_REPORT_BAN_TTL_S must be at least 1"
                    .into(),
            );
        }
        if self.reports_per_hour == 0 {
            return fail("MATCHGATE_REPORTS_PER_HOUR must be at least 1".into());
        }
        if self.max_blocks_per_user == 0 {
            return fail("MATCHGATE_MAX_BLOCKS_PER_USER must be at least 1".into());
        }
        if !(1..=MAX_BLOCK_TTL_S).contains(&self.block_ttl_s) {
            return fail(format!(
                "MATCHGATE_BLOCK_TTL_S must be between 1 and {MAX_BLOCK_TTL_S} (ten years), got {}",
                self.block_ttl_s
            ));
        }
        Ok(())
    }

    fn validate_livekit(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        let (url, key, secret) = (
            &self.livekit_url,
            &self.livekit_api_key,
            &self.livekit_api_secret,
        );
        if url.is_none() {
            if key.is_some() || secret.is_some() || self.livekit_api_url.is_some() {
                return fail("MATCHGATE_LIVEKIT_API_* are set but MATCHGATE_LIVEKIT_URL is not: set it to turn media on".into());
            }
            return Ok(());
        }
        if key.as_deref().is_none_or(str::is_empty) || secret.as_deref().is_none_or(str::is_empty) {
            return fail(
                "MATCHGATE_LIVEKIT_URL needs MATCHGATE_LIVEKIT_API_KEY and MATCHGATE_LIVEKIT_API_SECRET"
                    .into(),
            );
        }
        let schemes = ["ws://", "wss://", "http://", "https://"];
        if !url
            .as_deref()
            .is_some_and(|u| schemes.iter().any(|s| u.starts_with(s)))
        {
            return fail(format!(
                "MATCHGATE_LIVEKIT_URL must start with wss:// (or ws://, https://, http://), got {url:?}"
            ));
        }
        if let Some(api) = &self.livekit_api_url {
            if !(api.starts_with("http://") || api.starts_with("https://")) {
                return fail(format!(
                    "MATCHGATE_LIVEKIT_API_URL must start with https:// or http://, got {api:?}"
                ));
            }
        }
        let prefix_ok = !self.livekit_room_prefix.is_empty()
            && self.livekit_room_prefix.len() <= 32
            && self
                .livekit_room_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !prefix_ok {
            return fail(format!(
                "MATCHGATE_LIVEKIT_ROOM_PREFIX must be 1 to 32 of A-Z a-z 0-9 _ - (got {:?})",
                self.livekit_room_prefix
            ));
        }
        if self.livekit_max_participants < 2 {
            return fail("MATCHGATE_LIVEKIT_MAX_PARTICIPANTS must be at least 2".into());
        }
        if self.livekit_token_ttl_s == 0
            || self.livekit_request_timeout_ms == 0
            || self.livekit_create_deadline_ms == 0
            || self.livekit_sweep_interval_ms < 100
            || self.livekit_webhook_dedupe_s == 0
        {
            return fail(
                "MATCHGATE_LIVEKIT_TOKEN_TTL_S, _REQUEST_TIMEOUT_MS, _CREATE_DEADLINE_MS and \
                 _WEBHOOK_DEDUPE_S must be at least 1, _SWEEP_INTERVAL_MS at least 100"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_p2p(&self) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(ConfigError(msg));
        let configured =
            !self.stun_urls.is_empty() || !self.turn_urls.is_empty() || self.turn_secret.is_some();
        if self.livekit() && configured {
            return fail(
                "MATCHGATE_STUN_URLS, MATCHGATE_TURN_URLS and MATCHGATE_TURN_SECRET are for media mode p2p, \
                 but MATCHGATE_LIVEKIT_URL turns LiveKit on: set one or the other"
                    .into(),
            );
        }
        for (var, urls, schemes) in [
            ("MATCHGATE_STUN_URLS", &self.stun_urls, ["stun:", "stuns:"]),
            ("MATCHGATE_TURN_URLS", &self.turn_urls, ["turn:", "turns:"]),
        ] {
            for url in urls {
                let scheme_ok = schemes
                    .iter()
                    .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
                if !scheme_ok || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return fail(format!(
                        "{var} entries look like {}host:port (got {url:?})",
                        schemes[0]
                    ));
                }
            }
        }
        match (&self.turn_secret, self.turn_urls.is_empty()) {
            (None, false) => {
                return fail(
                    "MATCHGATE_TURN_URLS needs MATCHGATE_TURN_SECRET: TURN credentials are signed with it"
                        .into(),
                )
            }
            (Some(_), true) => {
                return fail(
                    "MATCHGATE_TURN_SECRET is set but MATCHGATE_TURN_URLS is not: list the TURN servers"
                        .into(),
                )
            }
            // Every client sees usernames and credentials: a short secret could be found by
            // trying candidates against them offline.
            (Some(secret), false) if secret.len() < 32 => {
                return fail(format!(
                    "MATCHGATE_TURN_SECRET must be at least 32 bytes (got {})",
                    secret.len()
                ))
            }
            _ => {}
        }
        if !(60..=7 * 86_400).contains(&self.turn_ttl_s) {
            return fail(format!(
                "MATCHGATE_TURN_TTL_S must be between 60 and 604800 (got {})",
                self.turn_ttl_s
            ));
        }
        Ok(())
    }

    /// The RoomService base URL: as configured, or the client URL over http(s).
    pub fn livekit_api_base(&self) -> Option<String> {
        if let Some(api) = &self.livekit_api_url {
            return Some(api.clone());
        }
        let url = self.livekit_url.as_ref()?;
        Some(if let Some(rest) = url.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = url.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            url.clone()
        })
    }

    /// Whether matches get LiveKit rooms (media mode `livekit`; otherwise `p2p`).
    pub fn livekit(&self) -> bool {
        self.livekit_url.is_some()
    }

    /// How matches get their media.
    pub fn media_mode(&self) -> MediaMode {
        match self.media_pending() {
            Some(pending) => MediaMode::LiveKit { pending },
            None => {
                let turn = self.turn_secret.as_ref().map(|secret| Turn {
                    urls: self.turn_urls.clone().into(),
                    secret: secret.clone(),
                    ttl: Duration::from_secs(self.turn_ttl_s),
                });
                MediaMode::P2p(Arc::new(IceServers::new(self.stun_urls.clone(), turn)))
            }
        }
    }

    /// How long a matched pair may wait for its room before the match is undone by the
    /// backend itself (beyond the creation deadline: the instance creating it may have died).
    pub fn media_pending(&self) -> Option<Duration> {
        self.livekit().then(|| {
            Duration::from_millis(self.livekit_create_deadline_ms + self.livekit_request_timeout_ms)
                + self.resume_grace()
        })
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval()
            .mul_f64(self.heartbeat_timeout_factor)
    }

    pub fn resume_grace(&self) -> Duration {
        Duration::from_millis(self.resume_grace_ms)
    }

    /// How long events stay replayable. A connection that dies silently is noticed only after
    /// the heartbeat timeout (or a write timeout), and the grace period starts then: events
    /// sent just before the silence must still be there when the client resumes.
    pub fn history_ttl(&self) -> Duration {
        self.resume_grace()
            + self.heartbeat_timeout()
            + Duration::from_millis(self.write_timeout_ms)
    }

    /// The Redis node URLs, if the scale-out mode is on.
    pub fn redis_urls(&self) -> Option<Vec<String>> {
        self.redis_url
            .as_ref()
            .map(|u| u.split(',').map(|s| s.trim().to_string()).collect())
    }

    /// Whether the demo page is served: in dev mode, or when asked for with `--demo`.
    pub fn demo_page(&self) -> bool {
        self.demo || self.dev_mode()
    }

    /// Whether tokens are checked against a configured key (otherwise: dev mode).
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key_file.is_none()
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

    #[test]
    fn defaults_are_the_embedded_mode() {
        let c = parse(&[]);
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.dev_mode());
        assert!(c.requeue_peer_on_skip);
        assert_eq!(c.heartbeat_timeout(), Duration::from_secs(50));
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
        assert!(!c.livekit() && c.media_pending().is_none());
        let lk = LIVEKIT;
        let c = parse(&lk);
        c.validate().unwrap();
        assert!(c.livekit());
        assert!(matches!(c.media_mode(), MediaMode::LiveKit { .. }));
        assert_eq!(c.livekit_api_base().unwrap(), "https://x.livekit.cloud");
        let c = parse(&["--livekit-url", "ws://lk:7880", "--livekit-api-key", "k"]);
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("LIVEKIT_API_SECRET"), "{e}");
        let e = parse(&["--livekit-api-key", "k"]).validate().unwrap_err();
        assert!(e.to_string().contains("MATCHGATE_LIVEKIT_URL"), "{e}");
        let mut bad = lk.to_vec();
        bad[1] = "livekit.example.com";
        let e = parse(&bad).validate().unwrap_err();
        assert!(e.to_string().contains("wss://"), "{e}");
        let mut bad = lk.to_vec();
        bad.extend(["--livekit-room-prefix", "a b"]);
        assert!(parse(&bad).validate().is_err());
        let mut bad = lk.to_vec();
        bad.extend(["--livekit-max-participants", "1"]);
        assert!(parse(&bad).validate().is_err());
        let mut api = lk.to_vec();
        api.extend(["--livekit-api-url", "http://10.0.0.5:7880"]);
        assert_eq!(
            parse(&api).livekit_api_base().unwrap(),
            "http://10.0.0.5:7880"
        );
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
        let c = parse(&turn);
        c.validate().unwrap();
        let MediaMode::P2p(ice) = c.media_mode() else {
            panic!("p2p")
        };
        assert_eq!(ice.stun_urls().len(), 2);
        let t = ice.turn().unwrap();
        assert_eq!(t.urls.len(), 2);
        assert_eq!(t.ttl, Duration::from_secs(3600));
        let refused = |args: &[&str], says: &str| {
            let e = parse(args).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        };
        refused(
            &turn[..4],
            "MATCHGATE_TURN_URLS needs MATCHGATE_TURN_SECRET",
        );
        refused(&["--turn-secret", &secret], "MATCHGATE_TURN_URLS is not");
        refused(
            &["--turn-urls", "turn:t:3478", "--turn-secret", "short"],
            "MATCHGATE_TURN_SECRET must be at least 32 bytes",
        );
        refused(&["--stun-urls", "stun.example.com"], "MATCHGATE_STUN_URLS");
        refused(&["--stun-urls", "stun:"], "MATCHGATE_STUN_URLS");
        refused(
            &["--turn-urls", "http://t", "--turn-secret", &secret],
            "MATCHGATE_TURN_URLS",
        );
        let mut short_ttl = turn.to_vec();
        short_ttl.extend(["--turn-ttl-s", "0"]);
        refused(&short_ttl, "MATCHGATE_TURN_TTL_S");
        let mut both = LIVEKIT.to_vec();
        both.extend(["--stun-urls", "stun:s:3478"]);
        refused(&both, "media mode p2p");
        refused(&["--max-signal-bytes", "100"], "MATCHGATE_MAX_SIGNAL_BYTES");
        refused(&["--signal-burst", "0"], "MATCHGATE_SIGNAL_BURST");
    }

    #[test]
    fn rejects_nonsense_with_a_clear_message() {
        let e = parse(&["--jwt-secret", "short"]).validate().unwrap_err();
        assert!(e.to_string().contains("at least 32 bytes"), "{e}");
        let e = parse(&["--max-message-bytes", "10"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("MAX_MESSAGE_BYTES"), "{e}");
        let e = parse(&["--listen", "0.0.0.0:8080"]).validate().unwrap_err();
        assert!(e.to_string().contains("MATCHGATE_DEV"), "{e}");
        parse(&["--listen", "0.0.0.0:8080", "--dev"])
            .validate()
            .unwrap();
        let e = parse(&["--redis-url", "http://nope"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("REDIS_URL"), "{e}");
        let e = parse(&["--redis-url", "redis://a:1,redis://b:2"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("REDIS_CLUSTER"), "{e}");
        parse(&["--redis-url", "redis://a:1,redis://b:2", "--redis-cluster"])
            .validate()
            .unwrap();
        let e = parse(&["--redis-namespace", "a{b}"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("NAMESPACE"), "{e}");
        for flags in [
            ["--reports-per-hour", "0"],
            ["--max-blocks-per-user", "0"],
            ["--block-ttl-s", "0"],
        ] {
            let e = parse(&flags).validate().unwrap_err();
            let name = flags[0].trim_start_matches("--").replace('-', "_");
            assert!(e.to_string().contains(&name.to_uppercase()), "{e}");
        }
        let e = parse(&["--allowed-origins", "example.com"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("ALLOWED_ORIGINS"), "{e}");
        assert!(Config::try_parse_from(["matchgate", "--listen", "nowhere"]).is_err());
        assert!(Config::try_parse_from([
            "matchgate",
            "--jwt-secret",
            "x",
            "--jwt-public-key-file",
            "/k.pem"
        ])
        .is_err());
    }

    #[test]
    fn demo_page_in_dev_mode_or_when_asked_for() {
        assert!(parse(&[]).demo_page());
        let keyed = ["--jwt-secret", "0123456789abcdef0123456789abcdef"];
        assert!(!parse(&keyed).demo_page());
        let mut asked = keyed.to_vec();
        asked.push("--demo");
        assert!(parse(&asked).demo_page());
        assert!(Config::try_parse_from(["matchgate", "--demo=maybe"]).is_err());
    }

    #[test]
    fn http_limits_are_checked() {
        let c = parse(&[]);
        assert_eq!(c.http_head_timeout_ms, 10_000);
        assert_eq!(c.http_max_head_bytes, 16 * 1024);
        assert_eq!(c.ipv6_prefix_len, 64);
        assert!(c.internal_listen.is_none());
        for (args, named) in [
            (
                &["--http-head-timeout-ms", "10"][..],
                "HTTP_HEAD_TIMEOUT_MS",
            ),
            (&["--http-max-head-bytes", "100"][..], "HTTP_MAX_HEAD_BYTES"),
            (&["--max-pending-connections", "0"][..], "MAX_PENDING"),
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
            let e = parse(args).validate().unwrap_err();
            assert!(e.to_string().contains(named), "{args:?}: {e}");
        }
        parse(&[
            "--internal-listen",
            "10.0.0.5:9090",
            "--ipv6-prefix-len",
            "48",
        ])
        .validate()
        .unwrap();
    }

    #[test]
    fn parses_lists_and_booleans() {
        let c = parse(&[
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--requeue-peer-on-skip",
            "false",
        ]);
        c.validate().unwrap();
        assert_eq!(c.allowed_origins.len(), 2);
        assert!(!c.requeue_peer_on_skip);
    }
}
