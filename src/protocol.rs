//! The wire protocol v1: what clients send, what the gateway pushes, and the stable codes.
//!
//! This module is the Rust side of the contract in `protocol/` (JSON Schemas and the AsyncAPI
//! document). Client frames are parsed in two steps so that every failure maps to a precise
//! error code: first the envelope (`type`, `ref`), then the typed body. Server events are
//! serialised exactly once, into a shared frame, together with their `seq`.
//!
//! Relayed messages (`signal`, `chat`) borrow from the client's frame: a signal's payload is
//! kept as the raw JSON text the client sent and relayed byte for byte, never re-serialised.

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::attributes::{is_attribute_name, Want, MAX_ATTRIBUTE_NAME_LEN};

/// Protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted `ref`.
pub const MAX_REF_LEN: usize = 64;

/// Longest accepted preference value.
pub const MAX_PREF_LEN: usize = 64;

/// Longest accepted `chat.text`, in characters.
pub const MAX_CHAT_CHARS: usize = 1000;

/// How much larger than `max_signal_bytes` a `signal` frame may be: room for `type`, a `ref`
/// (up to 64 characters, escaped) and a few unknown fields around the payload.
pub const SIGNAL_ENVELOPE_BYTES: usize = 1024;

/// What a client asks for. Borrows from the client's frame (see [`Relay`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<'a> {
    Enqueue(Prefs),
    Skip,
    End,
    Heartbeat,
    Status,
    /// Block the peer of `session_id` (default: the current or most recent session).
    Block {
        session_id: Option<String>,
    },
    /// Report the peer of `session_id` (default: the current or most recent session).
    Report {
        reason: ReportReason,
        details: Option<String>,
        session_id: Option<String>,
    },
    /// Accept or decline a proposed match (accept phase).
    Accept {
        match_id: String,
    },
    Decline {
        match_id: String,
    },
    /// A message for the peer of the live session.
    Relay(Relay<'a>),
    /// A new token for the connection's user, answering `token_expiring`. The connection
    /// answers it itself: it owns the token's timer.
    Refresh {
        access_token: String,
    },
}

/// A message a member of a live session sends its peer through the gateway: not logged, not
/// replayed, no `seq`. The gateway only checks it and adds the session id.
#[derive(Debug, Clone)]
pub enum Relay<'a> {
    /// `signal`: a JSON object of at most `max_signal_bytes` (WebRTC offers, answers, ICE
    /// candidates, or anything the app wants), exactly as the client wrote it.
    Signal(&'a RawValue),
    /// `chat`: 1 to [`MAX_CHAT_CHARS`] characters, none of them control characters.
    Chat(Cow<'a, str>),
}

impl Relay<'_> {
    /// The client message type, which is also the `action` of its `ack`.
    pub fn name(&self) -> &'static str {
        match self {
            Relay::Signal(_) => "signal",
            Relay::Chat(_) => "chat",
        }
    }

    /// The frame the peer receives: one serialisation, the payload copied as it came.
    pub fn frame(&self, session_id: &str, sent_at_ms: u64) -> Utf8Bytes {
        match self {
            Relay::Signal(payload) => encode(&Relayed::Signal {
                session_id,
                payload,
            }),
            Relay::Chat(text) => encode(&Relayed::Chat {
                session_id,
                text,
                sent_at_ms,
            }),
        }
    }
}

/// Payloads compare by their text (`RawValue` has no equality of its own).
impl PartialEq for Relay<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Relay::Signal(a), Relay::Signal(b)) => a.get() == b.get(),
            (Relay::Chat(a), Relay::Chat(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Relay<'_> {}

/// A relayed message as the peer receives it.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Relayed<'a> {
    Signal {
        session_id: &'a str,
        payload: &'a RawValue,
    },
    Chat {
        session_id: &'a str,
        text: &'a str,
        sent_at_ms: u64,
    },
}

/// Longest accepted `report.details`, in characters.
pub const MAX_REPORT_DETAILS: usize = 500;

/// Why a user reports a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportReason {
    Spam,
    Nudity,
    Harassment,
    Underage,
    Other,
}

impl ReportReason {
    pub const ALL: [ReportReason; 5] = [
        ReportReason::Spam,
        ReportReason::Nudity,
        ReportReason::Harassment,
        ReportReason::Underage,
        ReportReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReportReason::Spam => "spam",
            ReportReason::Nudity => "nudity",
            ReportReason::Harassment => "harassment",
            ReportReason::Underage => "underage",
            ReportReason::Other => "other",
        }
    }
}

/// A parsed client frame: the action and the `ref` its direct reply echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub action: Action<'a>,
    pub reference: Option<String>,
}

/// Matching preferences. Two users are compatible when all four fields are equal and each
/// one's `want` holds for the other's attributes (from their tokens). Users with `interests`
/// are matched first with a user who shares one; after the interests wait, with anybody
/// compatible unless `interests_only`. Entries named in `soft` may be dropped, in that order,
/// one per relaxation step, when the user waits long.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Interest tags (at most [`MAX_INTERESTS`]; trimmed and lowercased when parsed, each 1 to
    /// [`MAX_INTEREST_LEN`] characters, duplicates dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interests: Vec<String>,
    /// Never widen to users who share no interest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interests_only: bool,
    /// Constraints on the peer's attributes (see [`crate::attributes::want_holds`]).
    #[serde(default, skip_serializing_if = "Want::is_empty")]
    pub want: Want,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soft: Vec<PrefField>,
}

/// The most interest tags in `prefs.interests`.
pub const MAX_INTERESTS: usize = 10;
/// The longest interest tag, in characters.
pub const MAX_INTEREST_LEN: usize = 32;

/// What `soft` names: a preference field, or a `want` constraint (`"want.<attribute>"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PrefField {
    Topic,
    Format,
    Language,
    Region,
    /// The constraint `want.<attribute>`.
    Want(String),
}

impl TryFrom<String> for PrefField {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        Ok(match name.as_str() {
            "topic" => PrefField::Topic,
            "format" => PrefField::Format,
            "language" => PrefField::Language,
            "region" => PrefField::Region,
            other => match other.strip_prefix("want.") {
                Some(attribute) if !attribute.is_empty() => PrefField::Want(attribute.to_string()),
                _ => {
                    return Err(format!(
                        "unknown soft field {other:?}: expected topic, format, language, region or want.<attribute>"
                    ))
                }
            },
        })
    }
}

impl From<PrefField> for String {
    fn from(field: PrefField) -> String {
        match field {
            PrefField::Topic => "topic".into(),
            PrefField::Format => "format".into(),
            PrefField::Language => "language".into(),
            PrefField::Region => "region".into(),
            PrefField::Want(attribute) => format!("want.{attribute}"),
        }
    }
}

impl Prefs {
    /// Checks the preferences and brings `interests` into their one form (trimmed, lowercased,
    /// without duplicates), so that both engines compare tags as plain text.
    fn normalise(mut self) -> Result<Prefs, ParseError> {
        for (name, value) in [
            ("topic", &self.topic),
            ("format", &self.format),
            ("language", &self.language),
            ("region", &self.region),
        ] {
            if let Some(v) = value {
                if !is_text(v, MAX_PREF_LEN) {
                    return Err(ParseError::BadRequest(format!(
                        "prefs.{name} must be 1 to {MAX_PREF_LEN} characters, none of them control characters"
                    )));
                }
            }
        }
        self.interests = normalise_interests(std::mem::take(&mut self.interests))?;
        if self.interests_only && self.interests.is_empty() {
            return Err(ParseError::BadRequest(
                "prefs.interests_only needs prefs.interests".into(),
            ));
        }
        check_want(&self.want)?;
        for (i, f) in self.soft.iter().enumerate() {
            if self.soft[..i].contains(f) {
                return Err(ParseError::BadRequest(
                    "prefs.soft must not name a field twice".into(),
                ));
            }
            if !self.has(f) {
                return Err(ParseError::BadRequest(format!(
                    "prefs.soft names {}, which is not set",
                    String::from(f.clone())
                )));
            }
        }
        Ok(self)
    }

    /// Whether the field or constraint `f` is set.
    fn has(&self, f: &PrefField) -> bool {
        match f {
            PrefField::Topic => self.topic.is_some(),
            PrefField::Format => self.format.is_some(),
            PrefField::Language => self.language.is_some(),
            PrefField::Region => self.region.is_some(),
            PrefField::Want(attribute) => self.want.contains_key(attribute),
        }
    }

    /// The preferences searched at relaxation step `step`: the first `step` soft fields
    /// dropped. `None` past the last step.
    pub fn relaxed(&self, step: usize) -> Option<Prefs> {
        if step > self.soft.len() {
            return None;
        }
        let mut p = Prefs {
            soft: Vec::new(),
            ..self.clone()
        };
        for f in &self.soft[..step] {
            match f {
                PrefField::Topic => p.topic = None,
                PrefField::Format => p.format = None,
                PrefField::Language => p.language = None,
                PrefField::Region => p.region = None,
                PrefField::Want(attribute) => {
                    p.want.remove(attribute);
                }
            }
        }
        Some(p)
    }

    /// The pool these preferences belong to (`soft` aside). Values are length-prefixed so that
    /// no two different preference sets can produce the same key.
    pub fn pool_key(&self) -> String {
        let mut key = String::new();
        for v in [&self.topic, &self.format, &self.language, &self.region] {
            match v {
                Some(v) => {
                    key.push_str(&v.len().to_string());
                    key.push(':');
                    key.push_str(v);
                }
                None => key.push('-'),
            }
            key.push('|');
        }
        key
    }
}

/// The most attributes `prefs.want` may constrain.
pub const MAX_WANT_ATTRIBUTES: usize = 8;
/// The most values `prefs.want` may list for one attribute.
pub const MAX_WANT_VALUES: usize = 16;
/// The longest value in `prefs.want`, in characters.
pub const MAX_WANT_VALUE_LEN: usize = 64;

/// Whether `s` is 1 to `max` characters, none of them control characters.
fn is_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.chars().count() <= max && !s.chars().any(char::is_control)
}

/// `prefs.interests` in their one form: each tag trimmed and lowercased, then checked (1 to
/// [`MAX_INTEREST_LEN`] characters, no control characters); a repeated tag is dropped (the
/// first one kept, order kept). More than [`MAX_INTERESTS`] tags are refused before anything
/// else, so that a huge list costs nothing.
fn normalise_interests(raw: Vec<String>) -> Result<Vec<String>, ParseError> {
    if raw.len() > MAX_INTERESTS {
        return Err(ParseError::BadRequest(format!(
            "prefs.interests has {} tags: at most {MAX_INTERESTS}",
            raw.len()
        )));
    }
    let mut tags: Vec<String> = Vec::with_capacity(raw.len());
    for tag in raw {
        let tag = tag.trim().to_lowercase();
        if !is_text(&tag, MAX_INTEREST_LEN) {
            return Err(ParseError::BadRequest(format!(
                "prefs.interests: each tag must be 1 to {MAX_INTEREST_LEN} characters after trimming, none of them control characters"
            )));
        }
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    Ok(tags)
}

/// The shape of `prefs.want`: at most [`MAX_WANT_ATTRIBUTES`] attributes with valid names,
/// each with 1 to [`MAX_WANT_VALUES`] values of 1 to [`MAX_WANT_VALUE_LEN`] characters.
/// Which attributes a deployment lets clients filter on is the gateway's check.
fn check_want(want: &Want) -> Result<(), ParseError> {
    if want.len() > MAX_WANT_ATTRIBUTES {
        return Err(ParseError::BadRequest(format!(
            "prefs.want constrains {} attributes: at most {MAX_WANT_ATTRIBUTES}",
            want.len()
        )));
    }
    for (name, values) in want {
        if !is_attribute_name(name) {
            return Err(ParseError::BadRequest(format!(
                "prefs.want: attribute names are 1 to {MAX_ATTRIBUTE_NAME_LEN} of a-z 0-9 _ (got {:?})",
                name.chars().take(MAX_ATTRIBUTE_NAME_LEN + 1).collect::<String>()
            )));
        }
        if values.is_empty() || values.len() > MAX_WANT_VALUES {
            return Err(ParseError::BadRequest(format!(
                "prefs.want.{name} must list 1 to {MAX_WANT_VALUES} values"
            )));
        }
        if !values.iter().all(|v| is_text(v, MAX_WANT_VALUE_LEN)) {
            return Err(ParseError::BadRequest(format!(
                "prefs.want.{name}: each value must be 1 to {MAX_WANT_VALUE_LEN} characters, none of them control characters"
            )));
        }
    }
    Ok(())
}

/// Why a client frame was refused. Carries the `ref` when it could be read, so that even a
/// rejected request's error echoes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
}

impl ParseError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::BadRequest(_) => ErrorCode::BadRequest,
            ParseError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

/// The fields every client frame shares; everything else is read per type.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    #[serde(rename = "ref")]
    reference: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct EnqueueBody {
    #[serde(default)]
    prefs: Option<Prefs>,
}

#[derive(Deserialize)]
struct SessionBody {
    #[serde(default)]
    session_id: Option<String>,
}

#[derive(Deserialize)]
struct ReportBody {
    reason: ReportReason,
    #[serde(default)]
    details: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
}

#[derive(Deserialize)]
struct RefreshBody {
    access_token: String,
}

#[derive(Deserialize)]
struct MatchBody {
    match_id: String,
}

#[derive(Deserialize)]
struct SignalBody<'a> {
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChatBody<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

/// Whether a client frame is a `signal`, the one kind of frame that may be larger than
/// `max_message_bytes`.
pub fn is_signal(text: &str) -> bool {
    serde_json::from_str::<Envelope>(text)
        .is_ok_and(|e| matches!(e.kind, Some(serde_json::Value::String(k)) if k == "signal"))
}

/// Reads the typed body of a frame of type `kind`.
fn body<'a, T: Deserialize<'a>>(
    text: &'a str,
    kind: &str,
    reference: &Option<String>,
) -> Result<T, (ParseError, Option<String>)> {
    serde_json::from_str(text).map_err(|e| {
        (
            ParseError::BadRequest(format!("invalid {kind}: {e}")),
            reference.clone(),
        )
    })
}

/// Parses one client text frame; a `signal` payload may have up to `max_signal_bytes`. On
/// failure returns the error together with the `ref` if the frame carried a valid one.
pub fn parse_request(
    text: &str,
    max_signal_bytes: usize,
) -> Result<Request<'_>, (ParseError, Option<String>)> {
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| {
        let msg = if e.is_data() {
            "a frame must be a JSON object".to_string()
        } else {
            format!("malformed JSON: {e}")
        };
        (ParseError::BadRequest(msg), None)
    })?;
    let reference = match envelope.reference {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.chars().count() <= MAX_REF_LEN => Some(s),
        Some(_) => {
            return Err((
                ParseError::BadRequest(format!(
                    "ref must be a string of at most {MAX_REF_LEN} characters"
                )),
                None,
            ))
        }
    };
    let kind = match envelope.kind {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => {
            return Err((
                ParseError::BadRequest("type must be a string".into()),
                reference,
            ))
        }
        None => return Err((ParseError::BadRequest("missing type".into()), reference)),
    };
    let action = match kind.as_str() {
        "enqueue" => {
            let body: EnqueueBody = match serde_json::from_str(text) {
                Ok(b) => b,
                Err(e) => {
                    return Err((
                        ParseError::BadRequest(format!("invalid enqueue: {e}")),
                        reference,
                    ))
                }
            };
            match body.prefs.unwrap_or_default().normalise() {
                Ok(prefs) => Action::Enqueue(prefs),
                Err(e) => return Err((e, reference)),
            }
        }
        "skip" => Action::Skip,
        "end" => Action::End,
        "heartbeat" => Action::Heartbeat,
        "status" => Action::Status,
        "block" => {
            let b: SessionBody = body(text, "block", &reference)?;
            Action::Block {
                session_id: b.session_id,
            }
        }
        "report" => {
            let b: ReportBody = body(text, "report", &reference)?;
            if b.details
                .as_ref()
                .is_some_and(|d| d.chars().count() > MAX_REPORT_DETAILS)
            {
                return Err((
                    ParseError::BadRequest(format!(
                        "report.details must be at most {MAX_REPORT_DETAILS} characters"
                    )),
                    reference,
                ));
            }
            Action::Report {
                reason: b.reason,
                details: b.details,
                session_id: b.session_id,
            }
        }
        "accept" => Action::Accept {
            match_id: body::<MatchBody>(text, "accept", &reference)?.match_id,
        },
        "decline" => Action::Decline {
            match_id: body::<MatchBody>(text, "decline", &reference)?.match_id,
        },
        "refresh" => Action::Refresh {
            access_token: body::<RefreshBody>(text, "refresh", &reference)?.access_token,
        },
        "signal" => {
            let b: SignalBody = body(text, "signal", &reference)?;
            match b.payload {
                Some(p) if !p.get().starts_with('{') || p.get().len() > max_signal_bytes => {
                    return Err((
                        ParseError::BadRequest(format!(
                            "signal.payload must be a JSON object of at most {max_signal_bytes} bytes"
                        )),
                        reference,
                    ))
                }
                Some(p) => Action::Relay(Relay::Signal(p)),
                None => {
                    return Err((
                        ParseError::BadRequest("signal needs a payload (a JSON object)".into()),
                        reference,
                    ))
                }
            }
        }
        "chat" => {
            let b: ChatBody = body(text, "chat", &reference)?;
            if !is_text(&b.text, MAX_CHAT_CHARS) {
                return Err((
                    ParseError::BadRequest(format!(
                        "chat.text must be 1 to {MAX_CHAT_CHARS} characters, none of them control characters"
                    )),
                    reference,
                ));
            }
            Action::Relay(Relay::Chat(b.text))
        }
        _ => {
            let mut shown = kind;
            shown.truncate(shown.floor_char_boundary(MAX_REF_LEN));
            return Err((ParseError::UnknownType(shown), reference));
        }
    };
    Ok(Request { action, reference })
}

/// Stable error codes (`error.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    InvalidState,
    RateLimited,
    Unavailable,
    Internal,
    /// No media room could be set up for a match; both users went back to the queue.
    MediaUnavailable,
    /// Too many quick skips: `enqueue` and `skip` are refused until `retry_after_ms`.
    Cooldown,
    /// A `refresh` token was refused (invalid, expired, or for another user); the connection
    /// keeps its current token and expiry.
    Unauthorized,
    /// The deployment requires an attribute (`--require-attribute`) that the user's token
    /// does not carry with the required value: `enqueue` is refused.
    AttributeRequired,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::InvalidState,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::MediaUnavailable,
        ErrorCode::Cooldown,
        ErrorCode::Unauthorized,
        ErrorCode::AttributeRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::MediaUnavailable => "media_unavailable",
            ErrorCode::Cooldown => "cooldown",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::AttributeRequired => "attribute_required",
        }
    }
}

/// WebSocket close codes the gateway uses. Documented in `protocol/README.md`.
pub mod close {
    /// Server shutting down; a `reconnect` event preceded it.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame exceeded `max_message_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// The backend is unavailable right now (connecting while Redis is down).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Another connection for the same user took over.
    pub const REPLACED: u16 = 4001;
    /// No client message within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4003;
    /// The per-connection error budget ran out.
    pub const TOO_MANY_ERRORS: u16 = 4004;
    /// Events may have been lost between instances: reconnect with `resume` to get them from
    /// the log, in order.
    pub const RESYNC: u16 = 4005;
    /// The gateway's backend lost all state (e.g. Redis restarted empty): reconnect; the queue
    /// place or session is gone.
    pub const STATE_LOST: u16 = 4006;
    /// The user, device or address was banned. Do not reconnect.
    pub const BANNED: u16 = 4007;
    /// The connection's token expired (past the leeway and the expiry grace) without a valid
    /// `refresh`. Reconnect with a new token.
    pub const TOKEN_EXPIRED: u16 = 4008;
}

/// A user's state as the protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateName {
    Idle,
    Queued,
    InSession,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Offerer,
    Answerer,
}

/// Why a session ended, from the point of view of the user who receives the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Skip,
    End,
    PeerSkipped,
    PeerEnded,
    PeerDisconnected,
    Timeout,
    /// The media server reported that a participant left the room or the room closed.
    MediaDisconnected,
    /// A moderator ended the session through the admin API.
    EndedByModerator,
}

impl EndReason {
    pub const ALL: [EndReason; 8] = [
        EndReason::Skip,
        EndReason::End,
        EndReason::PeerSkipped,
        EndReason::PeerEnded,
        EndReason::PeerDisconnected,
        EndReason::Timeout,
        EndReason::MediaDisconnected,
        EndReason::EndedByModerator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Skip => "skip",
            EndReason::End => "end",
            EndReason::PeerSkipped => "peer_skipped",
            EndReason::PeerEnded => "peer_ended",
            EndReason::PeerDisconnected => "peer_disconnected",
            EndReason::Timeout => "timeout",
            EndReason::MediaDisconnected => "media_disconnected",
            EndReason::EndedByModerator => "ended_by_moderator",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DequeueReason {
    End,
    Timeout,
}

/// Why a proposed match was called off, from the receiver's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// You declined.
    Declined,
    /// The other one declined.
    PeerDeclined,
    /// You did not accept in time.
    Timeout,
    /// The other one did not accept in time.
    PeerTimeout,
    /// The other one left (ended, disconnected past the grace period).
    PeerLeft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    Reconnecting,
    Connected,
}

/// An event for one user. Events with [`Event::has_seq`] change the user's state: they get a
/// `seq`, go into the user's replay log and are never dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Queued {
        position: u64,
        estimated_wait_ms: Option<u64>,
    },
    QueueUpdate {
        position: u64,
        estimated_wait_ms: Option<u64>,
        /// Set when the search just widened: the preferences searched from now on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        widened_to: Option<Prefs>,
        /// Set when the interests wait just passed: users who share no interest are now
        /// searched too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        interests_widened: bool,
    },
    Dequeued {
        reason: DequeueReason,
    },
    Matched {
        session_id: Arc<str>,
        peer: Arc<str>,
        role: Role,
        started_at_ms: u64,
        /// The interests both members named, sorted (empty when they share none).
        common_interests: Vec<Arc<str>>,
        /// How to set up the call.
        media: Media,
    },
    SessionEnded {
        session_id: Arc<str>,
        reason: EndReason,
        requeued: bool,
    },
    PeerStatus {
        session_id: Arc<str>,
        state: PeerState,
    },
    /// Accept phase: a partner was found; `accept` (or `decline`) before `expires_at_ms`.
    MatchProposed {
        match_id: Arc<str>,
        peer: Arc<str>,
        expires_at_ms: u64,
    },
    /// Accept phase: the proposal is off.
    MatchCancelled {
        match_id: Arc<str>,
        reason: CancelReason,
        requeued: bool,
    },
    /// A pushed error that is not a reply (e.g. `media_unavailable`): the state it reports
    /// (back in the queue) is the one the client already knew, so it needs no `seq`.
    Error {
        code: ErrorCode,
        message: Arc<str>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl Event {
    /// Whether this event changes the user's state (and so carries a `seq`).
    pub fn has_seq(&self) -> bool {
        !matches!(self, Event::QueueUpdate { .. } | Event::Error { .. })
    }
}

/// How one session member sets up the call: what `matched.media` carries, by provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider")]
pub enum Media {
    /// A LiveKit room and this member's join token.
    #[serde(rename = "livekit")]
    LiveKit {
        url: Arc<str>,
        room: Arc<str>,
        token: String,
    },
    /// A direct WebRTC connection between the two clients, signalled through `signal`, with
    /// these ICE servers.
    #[serde(rename = "p2p")]
    P2p { ice_servers: Vec<IceServer> },
}

/// One entry of `media.ice_servers`, in the shape of the browser's `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Arc<[String]>,
    /// TURN only: `<unix expiry>:<the member's handle>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN only: base64(HMAC-SHA1(TURN secret, username)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Serialises an event with its `seq` and `ref` into a frame: the one serialisation it gets.
///
/// The frame is the event's object with `seq` and then `ref` added after its fields. They are
/// written after the event's closing brace is taken off, rather than through a wrapper with
/// `#[serde(flatten)]`, which goes through serde's generic map path for every field.
pub fn encode_event(event: &Event, seq: Option<u64>, reference: Option<&str>) -> Utf8Bytes {
    encode_with(|buf| {
        write_json(buf, event);
        if seq.is_none() && reference.is_none() {
            return;
        }
        let closing = buf.pop();
        debug_assert_eq!(closing, Some(b'}'), "an event serialises as a JSON object");
        if let Some(seq) = seq {
            buf.extend_from_slice(b",\"seq\":");
            write_json(buf, &seq);
        }
        if let Some(reference) = reference {
            buf.extend_from_slice(b",\"ref\":");
            write_json(buf, reference);
        }
        buf.push(b'}');
    })
}

/// Direct replies and informational frames: no `seq`, never replayed.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply<'a> {
    Welcome {
        user_id: &'a str,
        connection_id: &'a str,
        protocol_version: u32,
        heartbeat_interval_ms: u64,
        heartbeat_timeout_ms: u64,
        max_message_bytes: usize,
        max_signal_bytes: usize,
        resume_token: &'a str,
        resumed: bool,
        last_seq: u64,
        state: StateName,
    },
    HeartbeatAck {
        server_time_ms: u64,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Status {
        state: StateName,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        estimated_wait_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<Role>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Reconnect {
        reason: &'a str,
        retry_after_ms: u64,
    },
    /// The connection's token expires at `expires_at_ms`: answer with `refresh`, or the
    /// connection closes with 4008 (after the leeway and the expiry grace).
    TokenExpiring { expires_at_ms: u64 },
    /// The direct reply to `block`, `report`, `accept`, `decline`, `signal`, `chat` and
    /// `refresh`: the events they may cause (a session ending, `matched`, `match_cancelled`)
    /// carry no `ref`.
    Ack {
        action: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl Reply<'_> {
    pub fn encode(&self) -> Utf8Bytes {
        encode(self)
    }
}

fn encode<T: Serialize>(value: &T) -> Utf8Bytes {
    encode_with(|buf| write_json(buf, value))
}

thread_local! {
    /// Where frames are serialised before they get a buffer of their exact size: one
    /// allocation per frame, where `serde_json::to_string` grows a fresh `String` from 128
    /// bytes, copying it at each step, and leaves it with spare capacity (which then costs
    /// `Bytes` a second allocation for its shared header).
    static ENCODE_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The encode buffer is kept up to this size; one grown past it (a large `signal` relayed) is
/// given back, so that a thread does not hold the largest frame it ever wrote.
const ENCODE_BUFFER_KEPT: usize = 4096;

/// Runs `write` on the thread's encode buffer and returns what it wrote as a frame.
fn encode_with(write: impl FnOnce(&mut Vec<u8>)) -> Utf8Bytes {
    ENCODE_BUFFER.with_borrow_mut(|buf| {
        buf.clear();
        write(buf);
        let text = String::from(std::str::from_utf8(buf).expect("serde_json writes UTF-8"));
        if buf.capacity() > ENCODE_BUFFER_KEPT {
            *buf = Vec::new();
        }
        text.into()
    })
}

fn write_json<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) {
    // Serialising our own types cannot fail: no maps with non-string keys, no fallible
    // Serialize impls, and writing to a Vec does not fail.
    serde_json::to_writer(buf, value).expect("protocol types always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_SIGNAL: usize = 16_384;

    fn parse(text: &str) -> Result<Request<'_>, (ParseError, Option<String>)> {
        parse_request(text, MAX_SIGNAL)
    }

    #[test]
    fn parses_every_action() {
        let r = parse(r#"{"type":"enqueue","ref":"a1","prefs":{"topic":"music"}}"#).unwrap();
        assert_eq!(r.reference.as_deref(), Some("a1"));
        assert_eq!(
            r.action,
            Action::Enqueue(Prefs {
                topic: Some("music".into()),
                ..Prefs::default()
            })
        );
        for (t, a) in [
            ("skip", Action::Skip),
            ("end", Action::End),
            ("heartbeat", Action::Heartbeat),
            ("status", Action::Status),
        ] {
            let text = format!(r#"{{"type":"{t}","extra":1}}"#);
            let r = parse(&text).unwrap();
            assert_eq!(r.action, a);
            assert_eq!(r.reference, None);
        }
    }

    #[test]
    fn classifies_bad_frames() {
        let code = |s: &str| parse(s).unwrap_err().0.code();
        assert_eq!(code("{not json"), ErrorCode::BadRequest);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"ref":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"enqueue","prefs":{"topic":5}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"enqueue","prefs":{"colour":"red"}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"enqueue","prefs":{"topic":""}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"enqueue","prefs":{"topic":"a\nb"}}"#),
            ErrorCode::BadRequest
        );
        let (_, r) = parse(r#"{"type":"dance","ref":"r9"}"#).unwrap_err();
        assert_eq!(r.as_deref(), Some("r9"));
    }

    /// The prefs of an `enqueue` with these `prefs`, or the code and message it was refused
    /// with.
    fn enqueue_prefs(prefs: serde_json::Value) -> Result<Prefs, (ErrorCode, String)> {
        let frame = serde_json::json!({"type": "enqueue", "ref": "e", "prefs": prefs}).to_string();
        match parse(&frame) {
            Ok(Request {
                action: Action::Enqueue(prefs),
                ..
            }) => Ok(prefs),
            Ok(r) => panic!("not an enqueue: {r:?}"),
            Err((e, reference)) => {
                assert_eq!(reference.as_deref(), Some("e"), "the error echoes the ref");
                Err((e.code(), e.to_string()))
            }
        }
    }

    /// Asserts that `prefs` are refused with `bad_request` and a message saying `says`.
    #[track_caller]
    fn refused_prefs(prefs: serde_json::Value, says: &str) {
        match enqueue_prefs(prefs.clone()) {
            Ok(p) => panic!("{prefs} accepted as {p:?}"),
            Err((code, message)) => {
                assert_eq!(code, ErrorCode::BadRequest, "{prefs}");
                assert!(message.contains(says), "{prefs}: {message}");
            }
        }
    }

    #[test]
    fn interests_are_trimmed_lowercased_and_deduplicated() {
        let p = enqueue_prefs(serde_json::json!({
            "interests": ["  Jazz ", "ÉCOLE", "jazz", "go", "JAZZ", "Go "],
            "interests_only": true,
        }))
        .unwrap();
        assert_eq!(p.interests, ["jazz", "école", "go"]);
        assert!(p.interests_only);
        // Ten tags fit, also when duplicates bring them down; 32 characters fit.
        let ten: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        assert_eq!(
            enqueue_prefs(serde_json::json!({ "interests": ten }))
                .unwrap()
                .interests,
            ten
        );
        let long = "ü".repeat(MAX_INTEREST_LEN);
        enqueue_prefs(serde_json::json!({ "interests": [format!(" {long} ")] })).unwrap();
        // No interests: an empty list is the same as none.
        assert_eq!(
            enqueue_prefs(serde_json::json!({ "interests": [] })).unwrap(),
            Prefs::default()
        );
    }

    #[test]
    fn refuses_bad_interests() {
        let eleven: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
        refused_prefs(serde_json::json!({ "interests": eleven }), "at most 10");
        // Eleven even if duplicates would bring them down: the limit is on what was sent.
        refused_prefs(
            serde_json::json!({ "interests": vec!["a"; 11] }),
            "at most 10",
        );
        for bad in ["", "   ", "a\nb", "tab\there", "\u{85}"] {
            refused_prefs(serde_json::json!({ "interests": [bad] }), "prefs.interests");
        }
        refused_prefs(
            serde_json::json!({ "interests": ["x".repeat(MAX_INTEREST_LEN + 1)] }),
            "1 to 32 characters",
        );
        refused_prefs(
            serde_json::json!({ "interests": "jazz" }),
            "invalid enqueue",
        );
        refused_prefs(serde_json::json!({ "interests": [5] }), "invalid enqueue");
        refused_prefs(
            serde_json::json!({ "interests_only": true }),
            "needs prefs.interests",
        );
        refused_prefs(
            serde_json::json!({ "interests": [], "interests_only": true }),
            "needs prefs.interests",
        );
        refused_prefs(
            serde_json::json!({ "interests_only": "yes" }),
            "invalid enqueue",
        );
    }

    #[test]
    fn reads_want_and_refuses_bad_shapes() {
        let p = enqueue_prefs(serde_json::json!({
            "want": {"country": ["de", "at"], "age_verified": ["true"]},
            "soft": ["want.country"],
        }))
        .unwrap();
        assert_eq!(p.want["country"], ["de", "at"]);
        assert_eq!(p.soft, [PrefField::Want("country".into())]);
        let relaxed = p.relaxed(1).unwrap();
        assert!(!relaxed.want.contains_key("country"));
        assert!(relaxed.want.contains_key("age_verified"));

        let nine: serde_json::Map<String, serde_json::Value> = (0..9)
            .map(|i| (format!("a{i}"), serde_json::json!(["x"])))
            .collect();
        refused_prefs(serde_json::json!({ "want": nine }), "at most 8");
        for name in ["", "Country", "coun try", "país", &"a".repeat(33)] {
            refused_prefs(
                serde_json::json!({ "want": { name: ["x"] } }),
                "attribute names",
            );
        }
        refused_prefs(
            serde_json::json!({ "want": {"country": []} }),
            "1 to 16 values",
        );
        let seventeen: Vec<String> = (0..17).map(|i| i.to_string()).collect();
        refused_prefs(
            serde_json::json!({ "want": {"country": seventeen} }),
            "1 to 16 values",
        );
        for bad in [String::new(), "a\u{0}".into(), "x".repeat(65)] {
            refused_prefs(
                serde_json::json!({ "want": {"country": [bad]} }),
                "prefs.want.country",
            );
        }
        refused_prefs(
            serde_json::json!({ "want": {"country": "de"} }),
            "invalid enqueue",
        );
        refused_prefs(
            serde_json::json!({ "want": {"country": [1]} }),
            "invalid enqueue",
        );
        refused_prefs(
            serde_json::json!({ "want": ["country"] }),
            "invalid enqueue",
        );
    }

    #[test]
    fn soft_may_name_only_want_constraints_that_are_set() {
        refused_prefs(
            serde_json::json!({"soft": ["want.country"]}),
            "prefs.soft names want.country, which is not set",
        );
        refused_prefs(
            serde_json::json!({"want": {"gender": ["f"]}, "soft": ["want.country"]}),
            "want.country",
        );
        refused_prefs(
            serde_json::json!({"want": {"country": ["de"]}, "soft": ["want.country", "want.country"]}),
            "twice",
        );
        refused_prefs(serde_json::json!({"soft": ["want."]}), "unknown soft field");
        refused_prefs(serde_json::json!({"soft": ["want"]}), "unknown soft field");
        refused_prefs(
            serde_json::json!({"soft": ["interests"]}),
            "unknown soft field",
        );
    }

    #[test]
    fn a_signal_payload_is_kept_byte_for_byte() {
        let text = r#"{"type":"signal","ref":"s1","payload":{ "sdp" : "v=0\r\n", "n":1.50 }}"#;
        let r = parse(text).unwrap();
        assert_eq!(r.reference.as_deref(), Some("s1"));
        let Action::Relay(relay) = r.action else {
            panic!("not a relay: {:?}", r.action)
        };
        assert_eq!(relay.name(), "signal");
        let frame = relay.frame("s_1", 5);
        assert_eq!(
            frame.as_str(),
            r#"{"type":"signal","session_id":"s_1","payload":{ "sdp" : "v=0\r\n", "n":1.50 }}"#
        );
        assert!(is_signal(text));
        assert!(!is_signal(r#"{"type":"chat","text":"signal"}"#));
        assert!(!is_signal("{not json"));
    }

    #[test]
    fn refuses_bad_signals() {
        let refused = |s: &str| {
            let (e, r) = parse(s).unwrap_err();
            assert_eq!(e.code(), ErrorCode::BadRequest, "{s}");
            assert_eq!(r.as_deref(), Some("x"), "{s}");
        };
        refused(r#"{"type":"signal","ref":"x"}"#);
        refused(r#"{"type":"signal","ref":"x","payload":null}"#);
        refused(r#"{"type":"signal","ref":"x","payload":[1]}"#);
        refused(r#"{"type":"signal","ref":"x","payload":"offer"}"#);
        // Not JSON at all: no `ref` can be read.
        let (e, r) = parse(r#"{"type":"signal","ref":"x","payload":{"a":}}"#).unwrap_err();
        assert_eq!((e.code(), r), (ErrorCode::BadRequest, None));
        // The limit is on the payload's bytes as sent.
        let fits = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_SIGNAL - 8));
        assert_eq!(fits.len(), MAX_SIGNAL);
        parse(&format!(r#"{{"type":"signal","payload":{fits}}}"#)).unwrap();
        let over = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_SIGNAL - 7));
        refused(&format!(
            r#"{{"type":"signal","ref":"x","payload":{over}}}"#
        ));
    }

    #[test]
    fn checks_chat_text() {
        let chat = |text: &str| {
            let frame = serde_json::json!({"type": "chat", "ref": "c", "text": text}).to_string();
            match parse(&frame) {
                Ok(Request {
                    action: Action::Relay(Relay::Chat(text)),
                    ..
                }) => Ok(text.into_owned()),
                Ok(r) => panic!("not a chat: {r:?}"),
                Err((e, _)) => Err(e.code()),
            }
        };
        assert_eq!(chat("h\u{e9}llo \"you\""), Ok("h\u{e9}llo \"you\"".into()));
        assert_eq!(
            chat(&"\u{1f600}".repeat(MAX_CHAT_CHARS)).map(|_| ()),
            Ok(())
        );
        for bad in ["", "a\nb", "tab\t", "\u{7f}", "\u{85}"] {
            assert_eq!(chat(bad), Err(ErrorCode::BadRequest), "{bad:?}");
        }
        assert_eq!(
            chat(&"a".repeat(MAX_CHAT_CHARS + 1)),
            Err(ErrorCode::BadRequest)
        );
        let code = |s: &str| parse(s).unwrap_err().0.code();
        assert_eq!(code(r#"{"type":"chat"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"chat","text":5}"#), ErrorCode::BadRequest);
        // Escaped in the frame, the text is relayed as one JSON string.
        let r = parse(r#"{"type":"chat","text":"\u0041\"b"}"#).unwrap();
        let Action::Relay(relay) = r.action else {
            panic!("not a relay")
        };
        assert_eq!(
            relay.frame("s_2", 7).as_str(),
            r#"{"type":"chat","session_id":"s_2","text":"A\"b","sent_at_ms":7}"#
        );
    }

    #[test]
    fn media_is_tagged_by_provider() {
        let p2p = Media::P2p {
            ice_servers: vec![
                IceServer {
                    urls: vec!["stun:stun.example.com:3478".to_string()].into(),
                    username: None,
                    credential: None,
                },
                IceServer {
                    urls: vec!["turn:turn.example.com:3478?transport=udp".to_string()].into(),
                    username: Some("1764090000:p_a".into()),
                    credential: Some("c2VjcmV0".into()),
                },
            ],
        };
        assert_eq!(
            serde_json::to_string(&p2p).unwrap(),
            r#"{"provider":"p2p","ice_servers":[{"urls":["stun:stun.example.com:3478"]},{"urls":["turn:turn.example.com:3478?transport=udp"],"username":"1764090000:p_a","credential":"c2VjcmV0"}]}"#
        );
        let lk = Media::LiveKit {
            url: "wss://lk.example".into(),
            room: "mg_s".into(),
            token: "a.b.c".into(),
        };
        assert_eq!(
            serde_json::to_string(&lk).unwrap(),
            r#"{"provider":"livekit","url":"wss://lk.example","room":"mg_s","token":"a.b.c"}"#
        );
    }

    #[test]
    fn pool_keys_do_not_collide() {
        let a = Prefs {
            topic: Some("a|b".into()),
            ..Prefs::default()
        };
        let b = Prefs {
            topic: Some("a".into()),
            format: Some("b".into()),
            ..Prefs::default()
        };
        assert_ne!(a.pool_key(), b.pool_key());
        assert_eq!(a.pool_key(), a.clone().pool_key());
        assert_ne!(Prefs::default().pool_key(), a.pool_key());
    }

    #[test]
    fn events_carry_seq_and_ref() {
        let frame = encode_event(
            &Event::Dequeued {
                reason: DequeueReason::End,
            },
            Some(3),
            Some("x"),
        );
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "dequeued");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["ref"], "x");
        assert_eq!(v["reason"], "end");
    }

    /// The frames are byte for byte what the earlier encoder wrote: the event flattened into a
    /// wrapper with `seq` and `ref` after it. Clients see no change, not even in field order.
    #[test]
    fn events_encode_as_the_flattened_wrapper_did() {
        #[derive(Serialize)]
        struct Sequenced<'a> {
            #[serde(flatten)]
            event: &'a Event,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
            reference: Option<&'a str>,
        }
        let session_id: Arc<str> = "s_1".into();
        let events = [
            Event::Queued {
                position: 3,
                estimated_wait_ms: None,
            },
            Event::QueueUpdate {
                position: 1,
                estimated_wait_ms: Some(1_200),
                widened_to: Some(Prefs {
                    topic: Some("t".into()),
                    interests: vec!["chess".into()],
                    ..Prefs::default()
                }),
                interests_widened: true,
            },
            Event::Dequeued {
                reason: DequeueReason::Timeout,
            },
            Event::Matched {
                session_id: session_id.clone(),
                peer: "p_\"quoted\"".into(),
                role: Role::Offerer,
                started_at_ms: 1_764_090_000_000,
                common_interests: vec!["chess".into(), "go".into()],
                media: Media::P2p {
                    ice_servers: vec![IceServer {
                        urls: vec!["stun:stun.example.com:3478".to_string()].into(),
                        username: Some("1764090000:p_a".into()),
                        credential: Some("c2VjcmV0".into()),
                    }],
                },
            },
            Event::SessionEnded {
                session_id: session_id.clone(),
                reason: EndReason::PeerSkipped,
                requeued: true,
            },
            Event::PeerStatus {
                session_id,
                state: PeerState::Reconnecting,
            },
            Event::MatchProposed {
                match_id: "m_1".into(),
                peer: "p_b".into(),
                expires_at_ms: 5,
            },
            Event::MatchCancelled {
                match_id: "m_1".into(),
                reason: CancelReason::PeerDeclined,
                requeued: false,
            },
            Event::Error {
                code: ErrorCode::MediaUnavailable,
                message: "no room: \u{1}".into(),
                retry_after_ms: Some(1_000),
            },
        ];
        for event in &events {
            for (seq, reference) in [
                (None, None),
                (Some(7), None),
                (None, Some("r")),
                (Some(u64::MAX), Some("a \"ref\"\n\u{e9}")),
            ] {
                let wrapped = Sequenced {
                    event,
                    seq,
                    reference,
                };
                assert_eq!(
                    encode_event(event, seq, reference).as_str(),
                    serde_json::to_string(&wrapped).unwrap(),
                );
            }
        }
    }
}
