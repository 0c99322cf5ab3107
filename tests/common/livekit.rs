//! A fake LiveKit server for the media tests: the Twirp `RoomService` (CreateRoom, DeleteRoom,
//! ListRooms) on an ephemeral loopback port, plus helpers that sign and post webhooks the way
//! the LiveKit server does.
//!
//! The fake checks what the real server checks (see /work/shared/notes/livekit.md and LiveKit's
//! `pkg/service/auth.go`, `roomservice.go`, `roomallocator.go`):
//!
//! - Auth runs first, for every path, like LiveKit's HTTP middleware: an `Authorization` header
//!   that does not start with `Bearer `, or a token that is not an HS256 JWT signed with the
//!   secret, with `iss` = the API key and valid `exp`/`nbf` (60 s leeway, like the server), gets
//!   401 with a plain-text body. No token at all is not refused there: the call then fails the
//!   grant check below, as on the real server.
//! - Routing (Twirp): anything but `POST /twirp/livekit.RoomService/{CreateRoom,DeleteRoom,
//!   ListRooms}` is 404 `bad_route`; a content type other than `application/protobuf` or
//!   `application/json` is 404 `bad_route`; a body that does not decode is 400 `malformed`.
//!   JSON bodies accept snake_case and camelCase names and ignore unknown fields (protojson).
//! - Grants (camelCase `video` object): CreateRoom and DeleteRoom need `roomCreate`, ListRooms
//!   needs `roomList`; otherwise 401 Twirp JSON `unauthenticated` "permissions denied".
//! - CreateRoom is create-or-get. Like the real room allocator, a new room starts from the
//!   server defaults (empty_timeout 300, departure_timeout 20, max_participants 0) and every
//!   call, first or later, overrides the options it sets to a non-zero value. Names longer
//!   than 256 bytes are 400 `invalid_argument`.
//! - DeleteRoom of an unknown room is 404 `not_found` "requested room does not exist".
//! - ListRooms with no names lists every room, else the named ones that exist.
//!
//! Replies to protobuf requests are protobuf; replies to JSON requests are protojson with
//! proto (snake_case) names and 64-bit numbers as strings, as the real server sends. Every
//! error the client is meant to parse is Twirp JSON `{"code","msg"}`.
//!
//! Every request is recorded as a [`Call`], whatever its outcome.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use livekit_protocol::{
    CreateRoomRequest, DeleteRoomRequest, DeleteRoomResponse, ListRoomsRequest, ListRoomsResponse,
    Room,
};
use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The API key tests share with the gateway.
pub const KEY: &str = "devkey";
/// The API secret tests share with the gateway (LiveKit wants at least 32 bytes).
pub const SECRET: &str = "devsecret-devsecret-devsecret-devsecret";

/// Path prefix of the RoomService Twirp methods.
pub const ROOM_SERVICE: &str = "/twirp/livekit.RoomService/";

/// LiveKit's default room settings (`room.empty_timeout`, `room.departure_timeout`).
pub const DEFAULT_EMPTY_TIMEOUT: u32 = 300;
pub const DEFAULT_DEPARTURE_TIMEOUT: u32 = 20;
/// LiveKit's default `limit.max_room_name_length`.
pub const MAX_ROOM_NAME_LENGTH: usize = 256;

/// How the fake behaves; switch at any time with [`FakeLiveKit::set_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers like a real server.
    Healthy,
    /// Every request gets 503 Twirp `unavailable` (before auth, like a proxy with no backend).
    Fail,
    /// Only CreateRoom gets 503 `unavailable`.
    FailCreate,
    /// Only DeleteRoom gets 503 `unavailable`.
    FailDelete,
    /// Accepts every request and never answers (recorded with status 0).
    Hang,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Call {
    /// The Twirp method ("CreateRoom", "DeleteRoom", "ListRooms"), or the path for a request
    /// outside the RoomService prefix.
    pub method: String,
    /// CreateRoom: `name`; DeleteRoom: `room`; ListRooms: the `names` joined with ','.
    /// Empty when the body could not be decoded.
    pub room: String,
    /// HTTP status answered; 0 while hanging ([`Mode::Hang`]).
    pub status: u16,
    /// The decoded request body (whichever wire format it came in) with proto field names and
    /// plain JSON numbers, every field present: CreateRoom `{"name", "empty_timeout",
    /// "departure_timeout", "max_participants", "metadata", "node_id"}`, DeleteRoom `{"room"}`,
    /// ListRooms `{"names": [..]}`. `null` when it could not be decoded.
    pub request: Value,
}

#[derive(Clone, Debug)]
struct StoredRoom {
    sid: String,
    name: String,
    empty_timeout: u32,
    departure_timeout: u32,
    max_participants: u32,
    metadata: String,
    creation_time: i64,
    creation_time_ms: i64,
}

impl StoredRoom {
    fn new(sid: String, name: &str, creation_time_ms: i64) -> StoredRoom {
        StoredRoom {
            sid,
            name: name.to_string(),
            empty_timeout: DEFAULT_EMPTY_TIMEOUT,
            departure_timeout: DEFAULT_DEPARTURE_TIMEOUT,
            max_participants: 0,
            metadata: String::new(),
            creation_time: creation_time_ms.div_euclid(1000),
            creation_time_ms,
        }
    }

    fn to_proto(&self) -> Room {
        Room {
            sid: self.sid.clone(),
            name: self.name.clone(),
            empty_timeout: self.empty_timeout,
            departure_timeout: self.departure_timeout,
            max_participants: self.max_participants,
            creation_time: self.creation_time,
            creation_time_ms: self.creation_time_ms,
            metadata: self.metadata.clone(),
            ..Default::default()
        }
    }

    /// What [`FakeLiveKit::room`] returns: plain JSON numbers.
    fn to_test_json(&self) -> Value {
        json!({
            "sid": self.sid,
            "name": self.name,
            "empty_timeout": self.empty_timeout,
            "departure_timeout": self.departure_timeout,
            "max_participants": self.max_participants,
            "metadata": self.metadata,
            "creation_time": self.creation_time,
            "creation_time_ms": self.creation_time_ms,
        })
    }

    /// protojson with proto names and 64-bit numbers as strings, as the server replies.
    fn to_wire_json(&self) -> Value {
        json!({
            "sid": self.sid,
            "name": self.name,
            "empty_timeout": self.empty_timeout,
            "departure_timeout": self.departure_timeout,
            "max_participants": self.max_participants,
            "creation_time": self.creation_time.to_string(),
            "creation_time_ms": self.creation_time_ms.to_string(),
            "metadata": self.metadata,
            "num_participants": 0,
            "num_publishers": 0,
            "active_recording": false,
        })
    }
}

struct Shared {
    key: String,
    secret: String,
    mode: Mode,
    /// In creation order.
    rooms: Vec<StoredRoom>,
    calls: Vec<Call>,
    next_sid: u64,
}

impl Shared {
    fn new_sid(&mut self) -> String {
        self.next_sid += 1;
        format!("RM_fake{:08}", self.next_sid)
    }

    fn find(&mut self, name: &str) -> Option<&mut StoredRoom> {
        self.rooms.iter_mut().find(|r| r.name == name)
    }
}

/// A running fake LiveKit server; stops when dropped.
pub struct FakeLiveKit {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Drop for FakeLiveKit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLiveKit {
    /// Starts a fake that accepts tokens signed with `secret` and issued by `key`.
    pub async fn start(key: &str, secret: &str) -> FakeLiveKit {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake LiveKit binds");
        let addr = listener.local_addr().expect("fake LiveKit address");
        let shared = Arc::new(Mutex::new(Shared {
            key: key.to_string(),
            secret: secret.to_string(),
            mode: Mode::Healthy,
            rooms: Vec::new(),
            calls: Vec::new(),
            next_sid: 0,
        }));
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLiveKit { addr, shared, task }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:<port>`, the host to give a RoomService client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Forgets the recorded calls (not the rooms).
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Names of the rooms that exist now, in creation order.
    pub fn rooms(&self) -> Vec<String> {
        self.lock().rooms.iter().map(|r| r.name.clone()).collect()
    }

    /// The stored room: `{"sid", "name", "empty_timeout", "departure_timeout",
    /// "max_participants", "metadata", "creation_time" (unix s), "creation_time_ms"}`, plain
    /// JSON numbers. These are the effective settings (server defaults for what no CreateRoom
    /// set); what the client sent is in [`Call::request`].
    pub fn room(&self, name: &str) -> Option<Value> {
        self.lock()
            .rooms
            .iter()
            .find(|r| r.name == name)
            .map(StoredRoom::to_test_json)
    }

    /// Creates (or re-dates) a room as if someone had created it at `creation_time_secs`, with
    /// the server's default settings. Not recorded as a call.
    pub fn insert_room(&self, name: &str, creation_time_secs: i64) {
        let mut shared = self.lock();
        if let Some(room) = shared.find(name) {
            room.creation_time = creation_time_secs;
            room.creation_time_ms = creation_time_secs * 1000;
            return;
        }
        let sid = shared.new_sid();
        shared
            .rooms
            .push(StoredRoom::new(sid, name, creation_time_secs * 1000));
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// Waits until `pred` holds for the calls so far and returns them; panics with the call
    /// list after `PATIENCE` (hang protection, not a timing assertion).
    pub async fn wait_for(&self, pred: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let waited = tokio::time::timeout(super::PATIENCE, async {
            loop {
                let calls = self.calls();
                if pred(&calls) {
                    return calls;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        match waited {
            Ok(calls) => calls,
            Err(_) => panic!(
                "fake LiveKit: the expected calls did not arrive; calls so far: {:#?}",
                self.calls()
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    CreateRoom,
    DeleteRoom,
    ListRooms,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

enum Request {
    Create(Box<CreateRoomRequest>),
    Delete(DeleteRoomRequest),
    List(ListRoomsRequest),
}

impl Request {
    fn room_label(&self) -> String {
        match self {
            Request::Create(r) => r.name.clone(),
            Request::Delete(r) => r.room.clone(),
            Request::List(r) => r.names.join(","),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Request::Create(r) => json!({
                "name": r.name,
                "empty_timeout": r.empty_timeout,
                "departure_timeout": r.departure_timeout,
                "max_participants": r.max_participants,
                "metadata": r.metadata,
                "node_id": r.node_id,
            }),
            Request::Delete(r) => json!({ "room": r.room }),
            Request::List(r) => json!({ "names": r.names }),
        }
    }
}

fn decode(rpc: Rpc, format: Format, body: &[u8]) -> Option<Request> {
    match (rpc, format) {
        (Rpc::CreateRoom, Format::Protobuf) => CreateRoomRequest::decode(body)
            .ok()
            .map(|r| Request::Create(Box::new(r))),
        (Rpc::CreateRoom, Format::Json) => serde_json::from_slice(body)
            .ok()
            .map(|r| Request::Create(Box::new(r))),
        (Rpc::DeleteRoom, Format::Protobuf) => {
            DeleteRoomRequest::decode(body).ok().map(Request::Delete)
        }
        (Rpc::DeleteRoom, Format::Json) => serde_json::from_slice(body).ok().map(Request::Delete),
        (Rpc::ListRooms, Format::Protobuf) => {
            ListRoomsRequest::decode(body).ok().map(Request::List)
        }
        (Rpc::ListRooms, Format::Json) => serde_json::from_slice(body).ok().map(Request::List),
    }
}

fn twirp_error(status: StatusCode, code: &str, msg: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({ "code": code, "msg": msg }).to_string()))
        .expect("response")
}

fn plain(status: StatusCode, text: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(text.to_string()))
        .expect("response")
}

fn reply(format: Format, proto: Vec<u8>, json: Value) -> Response {
    let (content_type, body) = match format {
        Format::Protobuf => ("application/protobuf", Body::from(proto)),
        Format::Json => ("application/json", Body::from(json.to_string())),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("response")
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ApiClaims {
    video: Option<ApiVideoGrant>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ApiVideoGrant {
    room_create: bool,
    room_list: bool,
}

/// LiveKit's auth middleware: `Err` is a plain-text 401; `Ok(None)` means no token was given.
fn authenticate(
    headers: &HeaderMap,
    uri: &Uri,
    key: &str,
    secret: &str,
) -> Result<Option<ApiVideoGrant>, String> {
    let header_value = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
        .unwrap_or_default();
    let token = if !header_value.is_empty() {
        match header_value.strip_prefix("Bearer ") {
            Some(token) => token.to_string(),
            None => return Err("invalid authorization header. Must start with Bearer ".into()),
        }
    } else {
        uri.query()
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
            .unwrap_or("")
            .to_string()
    };
    if token.is_empty() {
        return Ok(None);
    }
    let issuer = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .map_err(|_| "invalid authorization token".to_string())?
        .claims["iss"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if issuer != key {
        return Err(format!("invalid API key: {issuer}"));
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.leeway = 60;
    validation.set_issuer(&[key]);
    let claims = jsonwebtoken::decode::<ApiClaims>(
        &token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| format!("invalid token: {token}, error: {e}"))?
    .claims;
    Ok(Some(claims.video.unwrap_or_default()))
}

async fn handle(
    State(shared): State<Arc<Mutex<Shared>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let rpc = match path.strip_prefix(ROOM_SERVICE) {
        Some("CreateRoom") => Some(Rpc::CreateRoom),
        Some("DeleteRoom") => Some(Rpc::DeleteRoom),
        Some("ListRooms") => Some(Rpc::ListRooms),
        _ => None,
    };
    let method_name = path.strip_prefix(ROOM_SERVICE).unwrap_or(&path).to_string();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let format = match media_type.as_str() {
        "application/protobuf" => Some(Format::Protobuf),
        "application/json" => Some(Format::Json),
        _ => None,
    };
    let request = match (rpc, format) {
        (Some(rpc), Some(format)) => decode(rpc, format, &body),
        _ => None,
    };
    let (room_label, request_json) = request
        .as_ref()
        .map(|r| (r.room_label(), r.to_json()))
        .unwrap_or_default();

    let (mode, key, secret) = {
        let s = shared.lock().unwrap_or_else(|e| e.into_inner());
        (s.mode, s.key.clone(), s.secret.clone())
    };
    // Status 0: no answer (hanging).
    let record = |status: u16| {
        shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .calls
            .push(Call {
                method: method_name.clone(),
                room: room_label.clone(),
                status,
                request: request_json.clone(),
            });
    };
    let finish = |response: Response| {
        record(response.status().as_u16());
        response
    };

    if mode == Mode::Hang {
        record(0);
        std::future::pending::<()>().await;
    }
    let failing = match mode {
        Mode::Fail => true,
        Mode::FailCreate => rpc == Some(Rpc::CreateRoom),
        Mode::FailDelete => rpc == Some(Rpc::DeleteRoom),
        Mode::Healthy | Mode::Hang => false,
    };
    if failing {
        return finish(twirp_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "fake LiveKit is failing on purpose",
        ));
    }

    // LiveKit's auth middleware runs before Twirp routing.
    let grants = match authenticate(&headers, &uri, &key, &secret) {
        Ok(grants) => grants,
        Err(msg) => return finish(plain(StatusCode::UNAUTHORIZED, &msg)),
    };

    let Some(rpc) = rpc else {
        return finish(twirp_error(
            StatusCode::NOT_FOUND,
            "bad_route",
            &format!("no handler for path {path:?}"),
        ));
    };
    if method != Method::POST {
        return finish(twirp_error(
            StatusCode::NOT_FOUND,
            "bad_route",
            &format!(
                "unsupported method {:?} (only POST is allowed)",
                method.as_str()
            ),
        ));
    }
    let Some(format) = format else {
        return finish(twirp_error(
            StatusCode::NOT_FOUND,
            "bad_route",
            &format!("unexpected Content-Type: {content_type:?}"),
        ));
    };
    let Some(request) = request else {
        let what = match format {
            Format::Protobuf => "protobuf",
            Format::Json => "json",
        };
        return finish(twirp_error(
            StatusCode::BAD_REQUEST,
            "malformed",
            &format!("the {what} request could not be decoded"),
        ));
    };

    let grants = grants.unwrap_or_default();
    let allowed = match rpc {
        Rpc::CreateRoom | Rpc::DeleteRoom => grants.room_create,
        Rpc::ListRooms => grants.room_list,
    };
    if !allowed {
        return finish(twirp_error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "permissions denied",
        ));
    }

    let response = {
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        match request {
            Request::Create(req) => {
                if req.name.len() > MAX_ROOM_NAME_LENGTH {
                    twirp_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_argument",
                        &format!(
                            "room name length exceeds limits: max length {MAX_ROOM_NAME_LENGTH}"
                        ),
                    )
                } else {
                    if s.find(&req.name).is_none() {
                        let sid = s.new_sid();
                        s.rooms.push(StoredRoom::new(sid, &req.name, unix_now_ms()));
                    }
                    let room = s.find(&req.name).expect("room just stored");
                    if req.empty_timeout > 0 {
                        room.empty_timeout = req.empty_timeout;
                    }
                    if req.departure_timeout > 0 {
                        room.departure_timeout = req.departure_timeout;
                    }
                    if req.max_participants > 0 {
                        room.max_participants = req.max_participants;
                    }
                    if !req.metadata.is_empty() {
                        room.metadata = req.metadata.clone();
                    }
                    reply(format, room.to_proto().encode_to_vec(), room.to_wire_json())
                }
            }
            Request::Delete(req) => match s.rooms.iter().position(|r| r.name == req.room) {
                None => twirp_error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "requested room does not exist",
                ),
                Some(index) => {
                    s.rooms.remove(index);
                    reply(format, DeleteRoomResponse {}.encode_to_vec(), json!({}))
                }
            },
            Request::List(req) => {
                let rooms: Vec<&StoredRoom> = if req.names.is_empty() {
                    s.rooms.iter().collect()
                } else {
                    req.names
                        .iter()
                        .filter_map(|n| s.rooms.iter().find(|r| &r.name == n))
                        .collect()
                };
                let proto = ListRoomsResponse {
                    rooms: rooms.iter().map(|r| r.to_proto()).collect(),
                };
                let json = json!({
                    "rooms": rooms.iter().map(|r| r.to_wire_json()).collect::<Vec<_>>()
                });
                reply(format, proto.encode_to_vec(), json)
            }
        }
    };
    finish(response)
}

fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

/// A short stable id derived from `seed`, e.g. `RM_3f2a9c1b7d04`.
fn fake_sid(prefix: &str, seed: &str) -> String {
    let hash = Sha256::digest(seed.as_bytes());
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// The `Authorization` header value the LiveKit server sends with a webhook whose raw body is
/// `body`: an HS256 JWT with `{"sha256": base64(SHA-256(body)), "iss": key, "iat", "nbf",
/// "exp": now + 300}`, no `Bearer ` prefix.
pub fn sign_webhook(body: &str, key: &str, secret: &str) -> String {
    sign_webhook_at(body, key, secret, unix_now(), 300)
}

/// Like [`sign_webhook`], but issued at `issued_at` (unix seconds) and valid for
/// `valid_for_secs`, e.g. to send an expired signature.
pub fn sign_webhook_at(
    body: &str,
    key: &str,
    secret: &str,
    issued_at: i64,
    valid_for_secs: i64,
) -> String {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let sha256 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body.as_bytes()));
    let claims = json!({
        "sha256": sha256,
        "iss": key,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + valid_for_secs,
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign webhook")
}

/// A webhook body as the LiveKit server writes it (protojson of `WebhookEvent`: camelCase,
/// enums as names, 64-bit numbers as strings, defaults omitted), e.g.
/// `webhook_body("participant_left", "match-1", Some("alice"), "EV_1")`. The room and
/// participant sids are derived from their names, so events about one room share its sid.
/// With an identity, a `participant` object is included: state `ACTIVE` for
/// `participant_joined` and `track_*` events, otherwise `DISCONNECTED` (plus
/// `disconnectReason` `CLIENT_INITIATED` for `participant_left`).
pub fn webhook_body(event: &str, room: &str, identity: Option<&str>, id: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("JSON string");
    let now = unix_now();
    let mut out = format!(
        r#"{{"event":{},"room":{{"sid":{},"name":{},"emptyTimeout":300,"departureTimeout":20,"maxParticipants":2,"creationTime":"{}","creationTimeMs":"{}"}}"#,
        q(event),
        q(&fake_sid("RM_", room)),
        q(room),
        now - 60,
        (now - 60) * 1000,
    );
    if let Some(identity) = identity {
        let active = event == "participant_joined" || event.starts_with("track_");
        let state = if active { "ACTIVE" } else { "DISCONNECTED" };
        out.push_str(&format!(
            r#","participant":{{"sid":{},"identity":{},"state":"{}","joinedAt":"{}""#,
            q(&fake_sid("PA_", &format!("{room}/{identity}"))),
            q(identity),
            state,
            now - 30,
        ));
        if event == "participant_left" {
            out.push_str(r#","disconnectReason":"CLIENT_INITIATED""#);
        }
        out.push('}');
    }
    out.push_str(&format!(r#","id":{},"createdAt":"{}"}}"#, q(id), now));
    out
}

/// POSTs a webhook to `{base_url}/v1/livekit/webhook` as the LiveKit server does
/// (`content-type: application/webhook+json`, `user-agent: LiveKit`, `authorization` as given,
/// verbatim). `base_url` is `http://host:port`. Returns the status and body.
pub async fn post_webhook(
    base_url: &str,
    body: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let host = base_url.trim_start_matches("http://").trim_end_matches('/');
    let addr: SocketAddr = host
        .parse()
        .unwrap_or_else(|_| panic!("post_webhook wants http://ip:port, got {base_url:?}"));
    let mut headers = vec![
        ("content-type", "application/webhook+json"),
        ("user-agent", "LiveKit"),
    ];
    if let Some(authorization) = authorization {
        headers.push(("authorization", authorization));
    }
    super::http_request(addr, "POST", "/v1/livekit/webhook", &headers, body).await
}
