//! Opening one client connection: a token (minted with the HS256 secret or fetched from the
//! gateway's dev endpoint), a TCP socket bound to a chosen loopback source address before it
//! connects, the WebSocket handshake with small buffers, and the `welcome`.
//!
//! Binding the source address is what takes a run past one address's ephemeral ports (about
//! 28,000): the socket is marked `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen at connect
//! time per destination rather than reserved per source address at bind time.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use futures_util::StreamExt;

use crate::wire::ServerFrame;

pub type Ws = WebSocketStream<TcpStream>;

/// Longest time for TCP connect, handshake and `welcome` together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of minted tokens: longer than any run.
const TOKEN_TTL_S: u64 = 24 * 3600;

/// A gateway to connect to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The WebSocket URL as given (`ws://host:port/v1/ws`).
    pub url: String,
    pub addr: SocketAddr,
}

impl Target {
    /// Checks the URL and resolves its host.
    pub async fn resolve(url: &str) -> Result<Target, String> {
        let uri: tungstenite::http::Uri = url
            .parse()
            .map_err(|e| format!("--url {url:?}: not a URL: {e}"))?;
        if uri.scheme_str() != Some("ws") {
            return Err(format!(
                "--url {url:?}: only ws:// is supported (the load generator talks to gateways on this machine)"
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("--url {url:?}: no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("--url {url:?}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("--url {url:?}: {host} has no address"))?;
        Ok(Target {
            url: url.to_string(),
            addr,
        })
    }

    /// `http://host:port<path>` of the same gateway.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Where tokens come from.
pub enum Auth {
    /// Minted locally with the gateway's HS256 secret.
    Secret(EncodingKey),
    /// Fetched from `POST /v1/dev/token` of the gateway the user connects to.
    Dev(reqwest::Client),
}

impl Auth {
    pub fn secret(secret: &str) -> Auth {
        // jsonwebtoken picks one crypto provider per process and panics without one.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        Auth::Secret(EncodingKey::from_secret(secret.as_bytes()))
    }

    pub fn dev() -> Auth {
        Auth::Dev(http_client())
    }

    /// A token for user `name` (the JWT `sub`, or the dev endpoint's `device_id`).
    pub async fn token(&self, name: &str, target: &Target) -> Result<String, String> {
        match self {
            Auth::Secret(key) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let claims = serde_json::json!({ "sub": name, "exp": now + TOKEN_TTL_S });
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
                    .map_err(|e| format!("token:{e}"))
            }
            Auth::Dev(client) => {
                #[derive(serde::Deserialize)]
                struct DevToken {
                    access_token: String,
                }
                let response = client
                    .post(target.http_url("/v1/dev/token"))
                    .json(&serde_json::json!({ "device_id": name }))
                    .timeout(HANDSHAKE_TIMEOUT)
                    .send()
                    .await
                    .map_err(|_| "dev_token:unreachable".to_string())?;
                let status = response.status();
                if !status.is_success() {
                    return Err(format!("dev_token:http_{}", status.as_u16()));
                }
                let body: DevToken = response
                    .json()
                    .await
                    .map_err(|_| "dev_token:bad_body".to_string())?;
                Ok(body.access_token)
            }
        }
    }
}

/// A client for the gateways' HTTP endpoints. reqwest is built here with rustls but without a
/// crypto provider (livekit-api chooses that), and refuses to build a client before one is
/// installed, even for plain `http://`.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The parts of `welcome` a user keeps.
pub struct Welcome {
    pub heartbeat_interval: Duration,
    pub resume_token: Option<String>,
    pub resumed: bool,
    pub last_seq: u64,
    /// `idle`, `queued` or `in_session`.
    pub state: String,
}

/// How opening a connection failed, as the key it is counted under in `errors`.
#[derive(Debug)]
pub struct ConnectError(pub String);

/// Small buffers: a run holds thousands of connections whose frames are a few hundred bytes
/// (tungstenite's defaults would allocate 128 KiB per connection up front).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10))
}

/// Opens a connection to `target` from `source` with `token` (and `query`, e.g. a resume),
/// and reads the `welcome`.
pub async fn open(
    target: &Target,
    source: IpAddr,
    token: &str,
    query: Option<&str>,
) -> Result<(Ws, Welcome), ConnectError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, open_inner(target, source, token, query)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError("connect:timeout".into())),
    }
}

async fn open_inner(
    target: &Target,
    source: IpAddr,
    token: &str,
    query: Option<&str>,
) -> Result<(Ws, Welcome), ConnectError> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| io_error(&e))?;
    if source.is_ipv4() {
        set_bind_address_no_port(&socket);
    }
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| io_error(&e))?;
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(|e| io_error(&e))?;
    let _ = stream.set_nodelay(true);

    let url = match query {
        Some(q) => format!("{}?{q}", target.url),
        None => target.url.clone(),
    };
    let mut request = url
        .into_client_request()
        .map_err(|_| ConnectError("connect:bad_url".into()))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| ConnectError("token:not_a_header_value".into()))?;
    request.headers_mut().insert("authorization", bearer);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(response) => {
                    ConnectError(format!("http:{}", response.status().as_u16()))
                }
                tungstenite::Error::Io(e) => io_error(&e),
                _ => ConnectError("connect:handshake".into()),
            })?;

    let welcome = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame = ServerFrame::parse(text.as_str())
                    .filter(|f| f.kind == "welcome")
                    .ok_or_else(|| ConnectError("connect:no_welcome".into()))?;
                break Welcome {
                    heartbeat_interval: Duration::from_millis(
                        frame.heartbeat_interval_ms.unwrap_or(25_000).max(100),
                    ),
                    resume_token: frame.resume_token.map(str::to_string),
                    resumed: frame.resumed.unwrap_or(false),
                    last_seq: frame.last_seq.unwrap_or(0),
                    state: frame.state.unwrap_or("idle").to_string(),
                };
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                return Err(ConnectError(format!("close:{code}")));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(ConnectError("connect:eof".into())),
        }
    };
    Ok((ws, welcome))
}

fn io_error(e: &std::io::Error) -> ConnectError {
    ConnectError(format!("connect:{:?}", e.kind()))
}

/// Lets the kernel pick the source port at `connect` (per destination) instead of at `bind`.
fn set_bind_address_no_port(socket: &TcpSocket) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd, a pointer to a c_int that outlives the call, and its size.
    // Failure (an old kernel) only means fewer ports per source address.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
