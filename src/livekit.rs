//! LiveKit as the gateway uses it: rooms through the RoomService API, one join token per
//! session member, and verification of LiveKit's signed webhooks. All of it through the
//! official `livekit-api` crate; this module adds naming, timeouts, metrics and error mapping.
//!
//! A room is named `<prefix><session id>`, so that a webhook or a listed room leads straight
//! back to its session and the sweep never touches rooms that are not the gateway's. A
//! participant's identity is the member's opaque per-session handle (the `peer` value of
//! `matched`), never the user id: the other participant sees identities, and handles are
//! what the protocol already shows peers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_api::access_token::{AccessToken, AccessTokenError, TokenVerifier, VideoGrants};
use livekit_api::services::room::{CreateRoomOptions, RoomClient};
use livekit_api::services::{ServerError, ServerErrorCode, ServiceError};
use livekit_api::webhooks::{WebhookError, WebhookReceiver};

use crate::flags::{key_name, millis, secs};
use crate::metrics::Metrics;
use crate::protocol::Media;

/// The LiveKit section of the configuration: with `--livekit-url` (and the API key and
/// secret) media mode is `livekit`.
#[derive(Debug, Clone, clap::Args)]
pub struct LivekitConfig {
    /// LiveKit URL that clients connect to (`wss://...`). With it, plus the API key and secret,
    /// media mode is `livekit`: every match gets a room and a join token per user.
    #[arg(long, env = "MATCHGATE_LIVEKIT_URL", value_parser = parse_client_url)]
    pub livekit_url: Option<String>,

    /// LiveKit API (RoomService) base URL. Default: the client URL over http(s).
    #[arg(long, env = "MATCHGATE_LIVEKIT_API_URL", value_parser = parse_api_url)]
    pub livekit_api_url: Option<String>,

    /// LiveKit API key: signs RoomService calls and join tokens, checks webhooks.
    #[arg(long, env = "MATCHGATE_LIVEKIT_API_KEY")]
    pub livekit_api_key: Option<String>,

    /// LiveKit API secret.
    #[arg(long, env = "MATCHGATE_LIVEKIT_API_SECRET", hide_env_values = true)]
    pub livekit_api_secret: Option<String>,

    /// Prefix of room names; a room is `<prefix><session id>`. The sweep only ever deletes
    /// rooms with this prefix.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_ROOM_PREFIX",
        default_value = "mg_",
        value_parser = key_name
    )]
    pub livekit_room_prefix: String,

    /// Seconds LiveKit keeps a room nobody joined.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_EMPTY_TIMEOUT_S",
        default_value = "30",
        value_parser = secs(..=u64::from(u32::MAX))
    )]
    pub livekit_empty_timeout_s: Duration,

    /// Seconds LiveKit keeps a room after the last participant left.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_DEPARTURE_TIMEOUT_S",
        default_value = "10",
        value_parser = secs(..=u64::from(u32::MAX))
    )]
    pub livekit_departure_timeout_s: Duration,

    /// Participants a room admits.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_MAX_PARTICIPANTS",
        default_value = "2",
        value_parser = clap::value_parser!(u32).range(2..)
    )]
    pub livekit_max_participants: u32,

    /// Lifetime of a join token, in seconds (the time a client has to join the room).
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_TOKEN_TTL_S",
        default_value = "600",
        value_parser = secs(1..)
    )]
    pub livekit_token_ttl_s: Duration,

    /// Timeout of one RoomService request, in ms.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_REQUEST_TIMEOUT_MS",
        default_value = "2000",
        value_parser = millis(1..)
    )]
    pub livekit_request_timeout_ms: Duration,

    /// How long room creation is retried (with backoff) before both users get
    /// `media_unavailable` and go back to the head of the queue, in ms.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_CREATE_DEADLINE_MS",
        default_value = "8000",
        value_parser = millis(1..)
    )]
    pub livekit_create_deadline_ms: Duration,

    /// How often one instance compares LiveKit's rooms with the live sessions and cleans up
    /// both sides, in ms.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_SWEEP_INTERVAL_MS",
        default_value = "60000",
        value_parser = millis(100..)
    )]
    pub livekit_sweep_interval_ms: Duration,

    /// How long webhook event ids are remembered to drop duplicates, in seconds.
    #[arg(
        long,
        env = "MATCHGATE_LIVEKIT_WEBHOOK_DEDUPE_S",
        default_value = "600",
        value_parser = secs(1..)
    )]
    pub livekit_webhook_dedupe_s: Duration,
}

impl LivekitConfig {
    /// Whether matches get LiveKit rooms (media mode `livekit`; otherwise `p2p`).
    pub fn enabled(&self) -> bool {
        self.livekit_url.is_some()
    }

    /// How long a matched pair may wait for its room before the match is undone by the
    /// backend itself (beyond the creation deadline: the instance creating it may have died),
    /// given how long a dropped user's place is held; `None` without LiveKit.
    pub fn media_pending(&self, resume_grace: Duration) -> Option<Duration> {
        self.enabled().then(|| {
            self.livekit_create_deadline_ms + self.livekit_request_timeout_ms + resume_grace
        })
    }

    /// The RoomService base URL: as configured, or the client URL over http(s).
    pub fn api_base(&self) -> Option<String> {
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
}

/// The URL clients connect to.
fn parse_client_url(url: &str) -> Result<String, String> {
    let schemes = ["ws://", "wss://", "http://", "https://"];
    if schemes.iter().any(|s| url.starts_with(s)) {
        Ok(url.to_string())
    } else {
        Err("must start with wss:// (or ws://, https://, http://)".into())
    }
}

/// The RoomService URL.
fn parse_api_url(url: &str) -> Result<String, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_string())
    } else {
        Err("must start with https:// or http://".into())
    }
}

/// A duration as the whole seconds LiveKit's room options take.
fn whole_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Errors of the LiveKit layer.
#[derive(Debug, thiserror::Error)]
pub enum LiveKitError {
    #[error("RoomService request failed: {0}")]
    Request(#[from] ServiceError),
    #[error("RoomService request timed out")]
    Timeout,
    #[error("cannot sign a join token: {0}")]
    Token(#[from] AccessTokenError),
    #[error("webhook rejected: {0}")]
    Webhook(#[from] WebhookError),
}

/// A webhook event, reduced to what the gateway acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    pub id: String,
    pub kind: String,
    pub room: String,
    /// The participant's identity, on participant events.
    pub identity: Option<String>,
}

/// A room LiveKit reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub name: String,
    /// Unix seconds.
    pub created_s: i64,
}

pub struct LiveKit {
    rooms: RoomClient,
    url: Arc<str>,
    api_key: String,
    api_secret: String,
    room_prefix: String,
    empty_timeout: Duration,
    departure_timeout: Duration,
    max_participants: u32,
    token_ttl: Duration,
    request_timeout: Duration,
    webhooks: WebhookReceiver,
    metrics: Arc<Metrics>,
}

impl LiveKit {
    /// The LiveKit side of `config`, when media mode is on.
    pub fn from_config(config: &LivekitConfig, metrics: Arc<Metrics>) -> Option<LiveKit> {
        let url = config.livekit_url.as_deref()?;
        let api = config.api_base()?;
        let key = config.livekit_api_key.clone()?;
        let secret = config.livekit_api_secret.clone()?;
        let request_timeout = config.livekit_request_timeout_ms;
        Some(LiveKit {
            rooms: RoomClient::with_api_key(&api, &key, &secret)
                .with_request_timeout(request_timeout),
            url: url.into(),
            webhooks: WebhookReceiver::new(TokenVerifier::with_api_key(&key, &secret)),
            api_key: key,
            api_secret: secret,
            room_prefix: config.livekit_room_prefix.clone(),
            empty_timeout: config.livekit_empty_timeout_s,
            departure_timeout: config.livekit_departure_timeout_s,
            max_participants: config.livekit_max_participants,
            token_ttl: config.livekit_token_ttl_s,
            request_timeout,
            metrics,
        })
    }

    pub fn room_name(&self, session: &str) -> String {
        format!("{}{session}", self.room_prefix)
    }

    /// The session a room of ours belongs to.
    pub fn session_of<'a>(&self, room: &'a str) -> Option<&'a str> {
        room.strip_prefix(self.room_prefix.as_str())
            .filter(|s| !s.is_empty())
    }

    /// Times and counts one RoomService request. The crate has its own per-request timeout;
    /// the outer one also bounds connection set-up and reading the reply.
    async fn request<T>(
        &self,
        method: &'static str,
        call: impl std::future::Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, LiveKitError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.request_timeout * 2, call).await {
            Ok(r) => r.map_err(LiveKitError::from),
            Err(_) => Err(LiveKitError::Timeout),
        };
        self.metrics
            .livekit_request(method, started.elapsed(), result.is_ok());
        result
    }

    /// Creates the room of `session` (create-or-get: safe to repeat).
    pub async fn create_room(&self, session: &str) -> Result<String, LiveKitError> {
        let name = self.room_name(session);
        let options = CreateRoomOptions {
            // LiveKit counts in seconds; the parser kept them within u32.
            empty_timeout: whole_secs(self.empty_timeout),
            departure_timeout: whole_secs(self.departure_timeout),
            max_participants: self.max_participants,
            ..CreateRoomOptions::default()
        };
        self.request("CreateRoom", self.rooms.create_room(&name, options))
            .await?;
        Ok(name)
    }

    /// Deletes a room, which disconnects whoever is in it. A room that does not exist counts
    /// as deleted.
    pub async fn delete_room(&self, name: &str) -> Result<(), LiveKitError> {
        match self
            .request("DeleteRoom", self.rooms.delete_room(name))
            .await
        {
            Err(LiveKitError::Request(ServiceError::Twirp(ServerError::Twirp(e))))
                if e.code == ServerErrorCode::NOT_FOUND =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// The gateway's rooms that LiveKit currently has.
    pub async fn list_rooms(&self) -> Result<Vec<Room>, LiveKitError> {
        let rooms = self
            .request("ListRooms", self.rooms.list_rooms(Vec::new()))
            .await?;
        Ok(rooms
            .into_iter()
            .filter(|r| self.session_of(&r.name).is_some())
            .map(|r| Room {
                name: r.name,
                created_s: r.creation_time,
            })
            .collect())
    }

    /// A join token for `identity` in `room`: that room only, publish, subscribe and data.
    fn join_token(&self, room: &str, identity: &str) -> Result<String, LiveKitError> {
        Ok(AccessToken::with_api_key(&self.api_key, &self.api_secret)
            .with_identity(identity)
            .with_ttl(self.token_ttl)
            .with_grants(VideoGrants {
                room_join: true,
                room: room.to_string(),
                can_publish: Some(true),
                can_subscribe: Some(true),
                can_publish_data: Some(true),
                ..VideoGrants::default()
            })
            .to_jwt()?)
    }

    /// What each member's `matched.media` carries, in the order of `handles`.
    pub fn media(&self, room: &str, handles: &[Arc<str>; 2]) -> Result<[Media; 2], LiveKitError> {
        let room: Arc<str> = room.into();
        let media = |handle: &str| -> Result<Media, LiveKitError> {
            Ok(Media::LiveKit {
                url: self.url.clone(),
                room: room.clone(),
                token: self.join_token(&room, handle)?,
            })
        };
        Ok([media(&handles[0])?, media(&handles[1])?])
    }

    /// Checks a webhook's signature (the `Authorization` JWT signed with the API secret,
    /// carrying the SHA-256 of the exact body) and reads the event.
    pub fn verify_webhook(&self, body: &str, auth: &str) -> Result<WebhookEvent, LiveKitError> {
        let event = self.webhooks.receive(body, auth)?;
        Ok(WebhookEvent {
            id: event.id,
            kind: event.event,
            room: event.room.map(|r| r.name).unwrap_or_default(),
            identity: event.participant.map(|p| p.identity),
        })
    }
}
