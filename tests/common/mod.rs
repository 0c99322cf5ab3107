//! Test harness: a real gateway on an ephemeral loopback port, real WebSocket clients, and a
//! schema check of every frame the server sends against `protocol/schemas/server/`.
//!
//! Waiting helpers use a generous timeout only so that a broken build fails instead of hanging;
//! no test asserts how long anything takes.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod admin;
pub mod livekit;
pub mod postgres;
pub mod process;
pub mod redis;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use matchgate::{Config, Server};

/// The HS256 secret test servers run with.
pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// Rules that would get in the way of tests about other things (the same pairs meet again
/// and again, users skip, enqueue and connect fast, all from 127.0.0.1); the tests of these
/// rules set them explicitly.
pub const RELAXED_RULES: [&str; 8] = [
    "--anti-repeat-window-s",
    "0",
    "--skip-limit",
    "1000000",
    "--enqueue-per-minute",
    "1000000",
    "--ip-connects-per-minute",
    "1000000",
];

/// [`RELAXED_RULES`] as environment variables, for gateway processes.
pub const RELAXED_RULES_ENV: [(&str, &str); 4] = [
    ("MATCHGATE_ANTI_REPEAT_WINDOW_S", "0"),
    ("MATCHGATE_SKIP_LIMIT", "1000000"),
    ("MATCHGATE_ENQUEUE_PER_MINUTE", "1000000"),
    ("MATCHGATE_IP_CONNECTS_PER_MINUTE", "1000000"),
];

/// Hang protection for every wait.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub addr: SocketAddr,
    /// The internal listener (`--internal-listen`), if the server has one.
    pub internal: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The server's background work (timers, rooms, Redis loops), to observe the drain.
    pub background: matchgate::shutdown::Background,
}

impl TestServer {
    /// A server with the test secret and `extra` flags.
    pub async fn start(extra: &[&str]) -> TestServer {
        let mut args = vec!["--jwt-secret", SECRET];
        args.extend_from_slice(extra);
        Self::start_raw(&args).await
    }

    /// A server with exactly these flags (plus an ephemeral listen address, and the relaxed
    /// rules of [`RELAXED_RULES`] where the flags do not say otherwise).
    pub async fn start_raw(extra: &[&str]) -> TestServer {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let mut args = vec!["matchgate", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        for pair in RELAXED_RULES.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend_from_slice(pair);
            }
        }
        let config = <Config as clap::Parser>::try_parse_from(args).expect("test config parses");
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.local_addr();
        let internal = server.internal_addr();
        let background = server.background();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let server = TestServer {
            addr,
            internal,
            stop: Some(stop),
            task: Some(task),
            background,
        };
        // A scale-out instance takes traffic once it has subscribed. (Asked on the internal
        // listener where there is one: it is plain HTTP even when the public one is TLS.)
        let ready = async {
            while http_get(internal.unwrap_or(addr), "/readyz").await.0 != 200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .expect("server becomes ready");
        server
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Connects `user` with a fresh token and reads the `welcome`.
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_with(user, "").await
    }

    /// Connects with extra query parameters (e.g. `resume=...&last_seq=3`).
    pub async fn connect_with(&self, user: &str, query: &str) -> Client {
        connect_to(&self.ws_url(), user, query).await
    }

    /// Triggers a graceful shutdown and waits for the server to finish draining.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server drains")
                .unwrap();
        }
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// The Prometheus text of `/metrics` (from the internal listener, if there is one).
    pub async fn metrics(&self) -> String {
        http_get(self.internal.unwrap_or(self.addr), "/metrics")
            .await
            .1
    }

    /// One sample of `/metrics`, by its full name with labels, e.g.
    /// `matchgate_sessions_ended_total{reason="skip"}`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The handshake request for `ws_url` as `user` (a fresh token in the `Authorization` header),
/// with extra query parameters.
pub fn ws_request(ws_url: &str, user: &str, query: &str) -> http::Request<()> {
    let url = if query.is_empty() {
        ws_url.to_string()
    } else {
        format!("{ws_url}?{query}")
    };
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(user)).parse().unwrap(),
    );
    request
}

/// Opens a WebSocket to `ws_url` as `user`, with extra query parameters, and reads the
/// `welcome`.
pub async fn connect_to(ws_url: &str, user: &str, query: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(ws_request(ws_url, user, query))
        .await
        .unwrap_or_else(|e| panic!("handshake to {ws_url} fails: {e}"));
    Client::new(ws, user).welcomed().await
}

/// `a` then `b` enqueue with no prefs and are matched with each other (so `a` offers); returns
/// both `matched` frames.
pub async fn match_up(a: &mut Client, b: &mut Client) -> (Value, Value) {
    a.send(json!({"type": "enqueue"})).await;
    a.expect("queued").await;
    b.send(json!({"type": "enqueue"})).await;
    b.expect("queued").await;
    let ma = a.expect("matched").await;
    let mb = b.expect("matched").await;
    assert_eq!(ma["session_id"], mb["session_id"]);
    assert_ne!(ma["role"], mb["role"]);
    (ma, mb)
}

/// A signed HS256 token for `sub`, valid for an hour.
pub fn token(sub: &str) -> String {
    sign(json!({ "sub": sub, "exp": now_secs() + 3600 }), SECRET)
}

pub fn sign(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// How a server frame failed the contract.
fn schemas() -> &'static HashMap<String, jsonschema::Validator> {
    static SCHEMAS: OnceLock<HashMap<String, jsonschema::Validator>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("protocol/schemas/server");
        let mut map = HashMap::new();
        for entry in std::fs::read_dir(&dir).expect("protocol/schemas/server exists") {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let schema: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            let validator = jsonschema::validator_for(&schema)
                .unwrap_or_else(|e| panic!("schema {} does not compile: {e}", path.display()));
            map.insert(name, validator);
        }
        assert!(!map.is_empty(), "no server schemas found");
        map
    })
}

/// Panics unless `frame` is valid against the schema of its `type`.
pub fn check_frame(frame: &Value) {
    let kind = frame["type"]
        .as_str()
        .unwrap_or_else(|| panic!("server frame without a type: {frame}"));
    let validator = schemas()
        .get(kind)
        .unwrap_or_else(|| panic!("server sent type {kind:?}, which has no schema: {frame}"));
    let errors: Vec<String> = validator
        .iter_errors(frame)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "server frame violates protocol/schemas/server/{kind}.json: {errors:?}\nframe: {frame}"
    );
}

/// What the server did instead of sending a text frame.
#[derive(Debug)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The stream ended without a close frame.
    Eof,
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub user: String,
    /// Every text frame received, in order, already schema-checked.
    pub seen: Vec<Value>,
    /// The last text frame received, exactly as it came.
    pub last_raw: String,
    pub welcome: Value,
}

impl Client {
    /// A client over an open WebSocket whose `welcome` has not been read yet.
    pub fn new(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, user: &str) -> Client {
        Client {
            ws,
            user: user.to_string(),
            seen: Vec::new(),
            last_raw: String::new(),
            welcome: Value::Null,
        }
    }

    /// Reads the `welcome` and keeps it.
    pub async fn welcomed(mut self) -> Client {
        self.welcome = self.expect("welcome").await;
        self
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// The next text frame, or an error describing how the connection ended.
    pub async fn next(&mut self) -> Result<Value, Closed> {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame from the server", self.user));
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("server frames are JSON");
                    check_frame(&v);
                    self.seen.push(v.clone());
                    self.last_raw = t.to_string();
                    return Ok(v);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Closed::Code(
                        frame.map(|f| u16::from(f.code)).unwrap_or(1005),
                    ))
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Closed::Eof),
            }
        }
    }

    /// The next frame, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        match self.next().await {
            Ok(v) => {
                assert_eq!(v["type"], kind, "{}: expected {kind}, got {v}", self.user);
                v
            }
            Err(c) => panic!("{}: expected {kind}, connection ended: {c:?}", self.user),
        }
    }

    /// Reads until the connection closes and returns how; frames on the way are kept in `seen`.
    pub async fn closed(&mut self) -> Closed {
        loop {
            if let Err(c) = self.next().await {
                return c;
            }
        }
    }

    /// Sends a request and returns its direct reply (checked to echo the `ref`).
    pub async fn request(&mut self, mut frame: Value, reference: &str) -> Value {
        frame["ref"] = json!(reference);
        self.send(frame).await;
        let reply = self.next().await.expect("a reply");
        assert_eq!(reply["ref"], reference, "reply does not echo ref: {reply}");
        reply
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        // Drain until the server acknowledges, so the server sees a clean close.
        while let Ok(Some(_)) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }

    /// The highest `seq` seen so far.
    pub fn last_seq(&self) -> u64 {
        self.seen
            .iter()
            .filter_map(|v| v["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }
}

/// A minimal HTTP/1.1 request over a raw socket; returns the status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let response = http_exchange(addr, method, path, headers, body).await;
    (response.status, response.body)
}

/// An HTTP response as [`http_exchange`] reads it.
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// A minimal HTTP/1.1 request over a raw socket; returns status, headers and body.
pub async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("HTTP response")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "").await
}

/// A WebSocket handshake that is expected to fail: returns the HTTP status and body.
pub async fn refused_handshake(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("handshake to {url} should have been refused"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            (status, body)
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}
