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

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::Media;

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
    empty_timeout_s: u32,
    departure_timeout_s: u32,
    max_participants: u32,
    token_ttl: Duration,
    request_timeout: Duration,
    webhooks: WebhookReceiver,
    metrics: Arc<Metrics>,
}

impl LiveKit {
    /// The LiveKit side of `config`, when media mode is on.
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Option<LiveKit> {
        let url = config.livekit_url.as_deref()?;
        let api = config.livekit_api_base()?;
        let key = config.livekit_api_key.clone()?;
        let secret = config.livekit_api_secret.clone()?;
        let request_timeout = Duration::from_millis(config.livekit_request_timeout_ms);
        Some(LiveKit {
            rooms: RoomClient::with_api_key(&api, &key, &secret)
                .with_request_timeout(request_timeout),
            url: url.into(),
            webhooks: WebhookReceiver::new(TokenVerifier::with_api_key(&key, &secret)),
            api_key: key,
            api_secret: secret,
            room_prefix: config.livekit_room_prefix.clone(),
            empty_timeout_s: config.livekit_empty_timeout_s,
            departure_timeout_s: config.livekit_departure_timeout_s,
            max_participants: config.livekit_max_participants,
            token_ttl: Duration::from_secs(config.livekit_token_ttl_s),
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
            empty_timeout: self.empty_timeout_s,
            departure_timeout: self.departure_timeout_s,
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
