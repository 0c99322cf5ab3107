//! Authentication and admission at the handshake: JWT checks (HS256, ES256, leeway, audience,
//! issuer), the dev-mode token endpoint, the origin allow-list, the connection limit, and one
//! connection per user.

mod common;

use std::path::PathBuf;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{
    http_request, metric_value, now_secs, refused_handshake, sign, token, Client, TestServer,
    PATIENCE, SECRET,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Fixed key pairs (P-256 and RSA-2048) made for these tests only (`tests/fixtures/`); they
/// protect nothing.
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Signs with a fixture private key: ES256 or RS256.
fn sign_with_fixture(algorithm: Algorithm, claims: Value) -> String {
    let (file, key): (_, fn(&[u8]) -> _) = match algorithm {
        Algorithm::ES256 => ("es256-private.pem", EncodingKey::from_ec_pem),
        Algorithm::RS256 => ("rs256-private.pem", EncodingKey::from_rsa_pem),
        other => panic!("no fixture key for {other:?}"),
    };
    let pem = std::fs::read(fixture(file)).unwrap();
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key(&pem).unwrap()).unwrap()
}

fn sign_es256(claims: Value) -> String {
    sign_with_fixture(Algorithm::ES256, claims)
}

fn sign_rs256(claims: Value) -> String {
    sign_with_fixture(Algorithm::RS256, claims)
}

/// Algorithm confusion: an HS256 token "signed" with the public key file's text as the shared
/// secret, which a verifier that lets the token pick the algorithm would accept.
fn confused_token(public_key: &std::path::Path) -> String {
    let public_text = std::fs::read_to_string(public_key).unwrap();
    sign(
        json!({"sub": "attacker", "exp": now_secs() + 3600}),
        &public_text,
    )
}

/// A hand-built `alg: none` token: header, payload, empty signature.
fn unsigned_token(sub: &str) -> String {
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(json!({"sub": sub, "exp": now_secs() + 3600}).to_string());
    format!("{head}.{body}.")
}

/// Attempts a handshake with these headers; the raw result, for tests that inspect refusals.
async fn try_handshake(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tungstenite::Error,
> {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake answers")
        .map(|(ws, _)| ws)
}

/// Connects to `url` with these headers (the token travels in them or in the URL) and reads
/// the `welcome`.
async fn connect_at(url: &str, headers: &[(&str, &str)]) -> Client {
    let ws = try_handshake(url, headers)
        .await
        .unwrap_or_else(|e| panic!("handshake to {url} should succeed: {e}"));
    Client::new(ws, url).welcomed().await
}

async fn connect_bearer(server: &TestServer, jwt: &str) -> Client {
    let auth = format!("Bearer {jwt}");
    connect_at(&server.ws_url(), &[("authorization", &auth)]).await
}

/// Expects the handshake with this token to be refused with 401 and a well-formed body.
/// Returns the reason.
async fn expect_unauthorized(server: &TestServer, jwt: &str) -> String {
    let auth = format!("Bearer {jwt}");
    expect_unauthorized_with(server, &[("authorization", &auth)], jwt).await
}

async fn expect_unauthorized_with(
    server: &TestServer,
    headers: &[(&str, &str)],
    secret_part: &str,
) -> String {
    let (status, body) = refused_handshake(&server.ws_url(), headers).await;
    assert_eq!(status, 401, "body: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"], "unauthorized", "{v}");
    let reason = v["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("reason is a string: {v}"))
        .to_string();
    assert!(
        !reason.is_empty() && reason.len() <= 80,
        "reason should be short: {reason:?}"
    );
    if !secret_part.is_empty() {
        assert!(
            !reason.contains(secret_part),
            "reason leaks the token: {reason:?}"
        );
        // Not even a recognisable piece of it (the signature or the payload).
        for piece in secret_part.split('.').filter(|p| p.len() >= 8) {
            assert!(
                !reason.contains(piece),
                "reason leaks the token: {reason:?}"
            );
        }
    }
    assert_eq!(
        v.as_object().unwrap().len(),
        2,
        "only error and reason: {v}"
    );
    reason
}

async fn refused_count(server: &TestServer, reason: &str) -> f64 {
    let name = format!("matchgate_handshakes_refused_total{{reason=\"{reason}\"}}");
    metric_value(&server.metrics().await, &name).unwrap_or(0.0)
}

#[tokio::test]
async fn bearer_header_and_query_parameter_are_accepted() {
    let server = TestServer::start(&[]).await;
    let mut header = connect_bearer(&server, &token("alice")).await;
    assert_eq!(header.welcome["user_id"], "alice");
    let ack = header.request(json!({"type": "heartbeat"}), "h").await;
    assert_eq!(ack["type"], "heartbeat_ack");

    let url = format!("{}?access_token={}", server.ws_url(), token("bob"));
    let mut query = connect_at(&url, &[]).await;
    assert_eq!(query.welcome["user_id"], "bob");
    let status = query.request(json!({"type": "status"}), "s").await;
    assert_eq!(status["state"], "idle");
    assert_eq!(refused_count(&server, "unauthorized").await, 0.0);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let server = TestServer::start(&[]).await;
    let url = server.ws_url();

    // No token at all.
    let (status, body) = refused_handshake(&url, &[]).await;
    assert_eq!(status, 401, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "unauthorized");
    assert!(v["reason"].is_string(), "{v}");

    // Expired well beyond the leeway.
    let expired = sign(json!({"sub": "u", "exp": now_secs() - 3600}), SECRET);
    let reason = expect_unauthorized(&server, &expired).await;
    assert!(reason.contains("expired"), "{reason}");

    // Signed with another secret.
    let forged = sign(
        json!({"sub": "u", "exp": now_secs() + 3600}),
        "not-the-secret-not-the-secret-not-the-secret",
    );
    expect_unauthorized(&server, &forged).await;

    // alg none, in the header and in the query parameter.
    let unsigned = unsigned_token("u");
    expect_unauthorized(&server, &unsigned).await;
    let (status, _) = refused_handshake(&format!("{url}?access_token={unsigned}"), &[]).await;
    assert_eq!(status, 401);

    // Missing claims.
    let no_sub = sign(json!({"exp": now_secs() + 3600}), SECRET);
    let reason = expect_unauthorized(&server, &no_sub).await;
    assert!(reason.contains("sub"), "{reason}");
    let no_exp = sign(json!({"sub": "u"}), SECRET);
    let reason = expect_unauthorized(&server, &no_exp).await;
    assert!(reason.contains("exp"), "{reason}");

    // Another scheme, even with a good token.
    let good = token("u");
    let basic = format!("Basic {good}");
    expect_unauthorized_with(&server, &[("authorization", &basic)], &good).await;
    let bare = good.clone();
    expect_unauthorized_with(&server, &[("authorization", &bare)], &good).await;

    // Garbage.
    expect_unauthorized(&server, "garbage").await;
    expect_unauthorized(&server, "a.b.c").await;
    let long_garbage = "x".repeat(2000);
    expect_unauthorized(&server, &long_garbage).await;

    // 1 missing + expired + forged + 2 unsigned + 2 claims + 2 schemes + 3 garbage.
    assert_eq!(refused_count(&server, "unauthorized").await, 12.0);
    // The good token still works afterwards.
    let client = connect_bearer(&server, &good).await;
    assert_eq!(client.welcome["user_id"], "u");
}

#[tokio::test]
async fn expiry_leeway_is_configurable() {
    let recently_expired = sign(json!({"sub": "late", "exp": now_secs() - 5}), SECRET);

    let lenient = TestServer::start(&[]).await;
    let client = connect_bearer(&lenient, &recently_expired).await;
    assert_eq!(client.welcome["user_id"], "late");

    let strict = TestServer::start(&["--jwt-leeway-secs", "0"]).await;
    let reason = expect_unauthorized(&strict, &recently_expired).await;
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test]
async fn es256_public_key_accepts_only_es256_tokens() {
    let public = fixture("es256-public.pem");
    let server = TestServer::start_raw(&[
        "--jwt-public-key-file",
        public.to_str().unwrap(),
        "--jwt-algorithm",
        "ES256",
        "--jwt-allow-any-audience",
    ])
    .await;

    let good = sign_es256(json!({"sub": "ec-user", "exp": now_secs() + 3600}));
    let client = connect_bearer(&server, &good).await;
    assert_eq!(client.welcome["user_id"], "ec-user");

    expect_unauthorized(&server, &confused_token(&public)).await;
    // Any HS256 token, e.g. one with the usual test secret.
    expect_unauthorized(&server, &token("attacker")).await;
    // alg none.
    expect_unauthorized(&server, &unsigned_token("attacker")).await;
    // An ES256 token that expired long ago.
    let expired = sign_es256(json!({"sub": "ec-user", "exp": now_secs() - 3600}));
    expect_unauthorized(&server, &expired).await;
    // A tampered payload with the original signature.
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    parts[1] =
        URL_SAFE_NO_PAD.encode(json!({"sub": "admin", "exp": now_secs() + 3600}).to_string());
    expect_unauthorized(&server, &parts.join(".")).await;
    assert_eq!(refused_count(&server, "unauthorized").await, 5.0);
}

#[tokio::test]
async fn rs256_public_key_accepts_only_rs256_tokens() {
    let public = fixture("rs256-public.pem");
    // RS256 is the default algorithm for a key file.
    let server = TestServer::start_raw(&[
        "--jwt-public-key-file",
        public.to_str().unwrap(),
        "--jwt-allow-any-audience",
    ])
    .await;
    let good = sign_rs256(json!({"sub": "rsa-user", "exp": now_secs() + 3600}));
    let client = connect_bearer(&server, &good).await;
    assert_eq!(client.welcome["user_id"], "rsa-user");
    expect_unauthorized(&server, &confused_token(&public)).await;
    // An ES256 token: right shape, wrong algorithm for this deployment.
    let es = sign_es256(json!({"sub": "attacker", "exp": now_secs() + 3600}));
    expect_unauthorized(&server, &es).await;
    expect_unauthorized(&server, &unsigned_token("attacker")).await;
    assert_eq!(refused_count(&server, "unauthorized").await, 3.0);
}

#[tokio::test]
async fn a_bad_key_file_stops_the_start_with_a_clear_message() {
    let missing = matchgate::Server::bind(<matchgate::Config as clap::Parser>::parse_from([
        "matchgate",
        "--listen",
        "127.0.0.1:0",
        "--jwt-public-key-file",
        "/nonexistent/key.pem",
        "--jwt-allow-any-audience",
    ]))
    .await;
    let e = missing.err().expect("refused").to_string();
    assert!(e.contains("/nonexistent/key.pem"), "{e}");
    // An EC key where RSA is expected.
    let wrong = matchgate::Server::bind(<matchgate::Config as clap::Parser>::parse_from([
        "matchgate",
        "--listen",
        "127.0.0.1:0",
        "--jwt-public-key-file",
        fixture("es256-public.pem").to_str().unwrap(),
        "--jwt-allow-any-audience",
    ]))
    .await;
    let e = wrong.err().expect("refused").to_string();
    assert!(e.contains("RS256"), "{e}");
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let server = TestServer::start(&[
        "--jwt-audience",
        "matchgate",
        "--jwt-issuer",
        "https://auth.example",
    ])
    .await;
    let exp = now_secs() + 3600;
    let good = sign(
        json!({"sub": "u1", "exp": exp, "aud": "matchgate", "iss": "https://auth.example"}),
        SECRET,
    );
    let client = connect_bearer(&server, &good).await;
    assert_eq!(client.welcome["user_id"], "u1");

    let wrong_aud = sign(
        json!({"sub": "u2", "exp": exp, "aud": "another-app", "iss": "https://auth.example"}),
        SECRET,
    );
    expect_unauthorized(&server, &wrong_aud).await;
    let wrong_iss = sign(
        json!({"sub": "u2", "exp": exp, "aud": "matchgate", "iss": "https://evil.example"}),
        SECRET,
    );
    expect_unauthorized(&server, &wrong_iss).await;
    let both_wrong = sign(
        json!({"sub": "u2", "exp": exp, "aud": ["a", "b"], "iss": "x"}),
        SECRET,
    );
    expect_unauthorized(&server, &both_wrong).await;
    assert_eq!(refused_count(&server, "unauthorized").await, 3.0);
}

/// `--jwt-audience` and `--jwt-issuer` are documented as *required* claims: a token that lacks
/// them must not get in.
#[tokio::test]
async fn configured_audience_and_issuer_are_required_claims() {
    let server = TestServer::start(&[
        "--jwt-audience",
        "matchgate",
        "--jwt-issuer",
        "https://auth.example",
    ])
    .await;
    let exp = now_secs() + 3600;
    let no_aud = sign(
        json!({"sub": "u3", "exp": exp, "iss": "https://auth.example"}),
        SECRET,
    );
    let reason = expect_unauthorized(&server, &no_aud).await;
    assert!(reason.contains("aud"), "{reason}");
    let no_iss = sign(json!({"sub": "u4", "exp": exp, "aud": "matchgate"}), SECRET);
    let reason = expect_unauthorized(&server, &no_iss).await;
    assert!(reason.contains("iss"), "{reason}");
}

#[tokio::test]
async fn dev_mode_mints_tokens_that_connect() {
    let server = TestServer::start_raw(&[]).await;
    let json_header = [("content-type", "application/json")];
    let (status, body) = http_request(
        server.addr,
        "POST",
        "/v1/dev/token",
        &json_header,
        r#"{"device_id":"abc"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["user_id"], "dev-abc");
    assert!(v["expires_in"].as_u64().is_some_and(|s| s > 0), "{v}");
    let jwt = v["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();

    let mut client = connect_bearer(&server, &jwt).await;
    assert_eq!(client.welcome["user_id"], "dev-abc");
    let ack = client.request(json!({"type": "heartbeat"}), "h").await;
    assert_eq!(ack["type"], "heartbeat_ack");

    // A token signed with some other secret is no good in dev mode either.
    expect_unauthorized(&server, &token("abc")).await;

    let too_long = format!(r#"{{"device_id":"{}"}}"#, "a".repeat(129));
    for bad in [
        "not json",
        "",
        "{}",
        r#"{"device_id":""}"#,
        r#"{"device_id":"has spaces"}"#,
        r#"{"device_id":5}"#,
        r#"{"device_id":null}"#,
        r#"["abc"]"#,
        &too_long,
    ] {
        let (status, body) =
            http_request(server.addr, "POST", "/v1/dev/token", &json_header, bad).await;
        assert_eq!(status, 400, "{bad:?} gave {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["error"], "bad_request", "{v}");
        assert!(v["reason"].is_string(), "{v}");
    }
    // 128 characters is still fine.
    let longest = format!(r#"{{"device_id":"{}"}}"#, "b".repeat(128));
    let (status, body) =
        http_request(server.addr, "POST", "/v1/dev/token", &json_header, &longest).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn dev_tokens_may_carry_the_configured_attribute_claims() {
    let server = TestServer::start_raw(&[
        "--attribute-claims",
        "age_verified,country",
        "--require-attribute",
        "age_verified=true",
    ])
    .await;
    let json_header = [("content-type", "application/json")];
    let mint =
        |body: &'static str| http_request(server.addr, "POST", "/v1/dev/token", &json_header, body);
    let (status, body) =
        mint(r#"{"device_id":"adult","attributes":{"age_verified":true,"country":"de"}}"#).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut adult = connect_bearer(&server, v["access_token"].as_str().unwrap()).await;
    let queued = adult.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(queued["type"], "queued", "{queued}");

    let (status, body) = mint(r#"{"device_id":"kid"}"#).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut kid = connect_bearer(&server, v["access_token"].as_str().unwrap()).await;
    let e = kid.request(json!({"type": "enqueue"}), "q").await;
    assert_eq!(e["code"], "attribute_required", "{e}");

    for (bad, says) in [
        (
            r#"{"device_id":"x","attributes":{"gender":"f"}}"#,
            "attributes.gender",
        ),
        (
            r#"{"device_id":"x","attributes":{"sub":"someone-else"}}"#,
            "attributes.sub",
        ),
        (
            r#"{"device_id":"x","attributes":{"country":["de"]}}"#,
            "a string, a boolean or an integer",
        ),
        (
            r#"{"device_id":"x","attributes":["country"]}"#,
            "body must be",
        ),
    ] {
        let (status, body) = mint(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "bad_request", "{v}");
        assert!(v["reason"].as_str().unwrap().contains(says), "{bad}: {v}");
    }
}

#[tokio::test]
async fn dev_token_endpoint_is_absent_with_a_secret() {
    let server = TestServer::start(&[]).await;
    let (status, _) = http_request(
        server.addr,
        "POST",
        "/v1/dev/token",
        &[("content-type", "application/json")],
        r#"{"device_id":"abc"}"#,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn origin_allow_list() {
    let server = TestServer::start(&["--allowed-origins", "https://app.example"]).await;
    let jwt = token("o");
    let auth = format!("Bearer {jwt}");

    let (status, body) = refused_handshake(
        &server.ws_url(),
        &[("authorization", &auth), ("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "forbidden", "{v}");
    assert_eq!(refused_count(&server, "origin").await, 1.0);

    let allowed = connect_at(
        &server.ws_url(),
        &[("authorization", &auth), ("origin", "https://app.example")],
    )
    .await;
    assert_eq!(allowed.welcome["user_id"], "o");
    allowed.close().await;

    // Mobile apps send no Origin.
    let native = connect_bearer(&server, &token("native")).await;
    assert_eq!(native.welcome["user_id"], "native");
}

#[tokio::test]
async fn connection_limit_refuses_with_503_then_frees_the_slot() {
    let server = TestServer::start(&["--max-connections", "2"]).await;
    let a = server.connect("a").await;
    let _b = server.connect("b").await;

    let auth = format!("Bearer {}", token("c"));
    match try_handshake(&server.ws_url(), &[("authorization", &auth)]).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let retry = response
                .headers()
                .get("retry-after")
                .expect("Retry-After header")
                .to_str()
                .unwrap();
            assert!(retry.parse::<u64>().is_ok(), "Retry-After: {retry}");
            let body = response.body().as_deref().unwrap_or_default();
            let v: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["error"], "unavailable", "{v}");
        }
        Ok(_) => panic!("a third connection should be refused"),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
    assert_eq!(refused_count(&server, "capacity").await, 1.0);

    a.close().await;
    // The slot comes back once the server has finished with a's connection.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let ws = loop {
        match try_handshake(&server.ws_url(), &[("authorization", &auth)]).await {
            Ok(ws) => break ws,
            Err(tungstenite::Error::Http(r)) if r.status().as_u16() == 503 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot never came back"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("unexpected handshake error: {e}"),
        }
    };
    let mut c = Client::new(ws, "c");
    let welcome = c.expect("welcome").await;
    assert_eq!(welcome["user_id"], "c");
}

#[tokio::test]
async fn a_second_connection_replaces_the_first() {
    let server = TestServer::start(&[]).await;
    let mut first = server.connect("same").await;
    first.send(json!({"type": "enqueue"})).await;
    first.expect("queued").await;

    let mut second = server.connect("same").await;
    assert_eq!(second.welcome["user_id"], "same");
    assert_eq!(second.welcome["state"], "queued", "{}", second.welcome);
    match first.closed().await {
        common::Closed::Code(code) => assert_eq!(code, 4001),
        other => panic!("first connection should be closed with 4001, got {other:?}"),
    }
    let status = second.request(json!({"type": "status"}), "st").await;
    assert_eq!(status["state"], "queued");
    assert_eq!(status["position"], 0);
}

// Identity providers: keys from a JWKS, live token expiry, audiences, dev mode across
// instances.

/// A signing key of the test identity provider: its `kid`, algorithm and private key fixture
/// (`tests/fixtures/`, made for these tests only).
struct TestKey {
    kid: &'static str,
    alg: Algorithm,
    private: &'static str,
}

const RSA_A: TestKey = TestKey {
    kid: "rsa-a",
    alg: Algorithm::RS256,
    private: "rs256-private.pem",
};
const RSA_B: TestKey = TestKey {
    kid: "rsa-b",
    alg: Algorithm::RS256,
    private: "rs256-rotated-private.pem",
};
const EC_A: TestKey = TestKey {
    kid: "ec-a",
    alg: Algorithm::ES256,
    private: "es256-private.pem",
};
const ED_A: TestKey = TestKey {
    kid: "ed-a",
    alg: Algorithm::EdDSA,
    private: "ed25519-private.pem",
};

/// The audience the JWKS test servers require.
const AUDIENCE: &str = "matchgate";

impl TestKey {
    fn encoding(&self) -> EncodingKey {
        let pem = std::fs::read(fixture(self.private)).unwrap();
        match self.alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => panic!("no test key for {other:?}"),
        }
        .unwrap()
    }

    /// The public key as a JWK entry.
    fn jwk(&self) -> Value {
        let mut jwk = match self.alg {
            // jsonwebtoken cannot derive an Ed25519 public JWK; the fixture has it.
            Algorithm::EdDSA => serde_json::from_str(
                &std::fs::read_to_string(fixture("ed25519-public.jwk.json")).unwrap(),
            )
            .unwrap(),
            alg => serde_json::to_value(
                jsonwebtoken::jwk::Jwk::from_encoding_key(&self.encoding(), alg).unwrap(),
            )
            .unwrap(),
        };
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk
    }

    /// A token for `sub`, for this gateway's audience, valid for `secs`, signed with this key
    /// and naming `kid`.
    fn token_as(&self, kid: &str, sub: &str, secs: u64) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.into());
        let claims = json!({"sub": sub, "exp": now_secs() + secs, "aud": AUDIENCE});
        jsonwebtoken::encode(&header, &claims, &self.encoding()).unwrap()
    }

    fn token(&self, sub: &str) -> String {
        self.token_as(self.kid, sub, 3600)
    }

    /// A token like [`TestKey::token`], with these extra claims.
    fn token_with(&self, sub: &str, extra: Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.into());
        let mut claims = json!({"sub": sub, "exp": now_secs() + 3600, "aud": AUDIENCE});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding()).unwrap()
    }
}

/// The test identity provider's JWKS endpoint, on a loopback port: serves the set it was last
/// given (or an error) and counts the requests.
struct Jwks {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<JwksState>,
}

struct JwksState {
    /// Status and body of the answer.
    answer: std::sync::Mutex<(u16, String)>,
    requests: std::sync::atomic::AtomicUsize,
}

fn key_set(keys: &[&TestKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

impl Jwks {
    async fn serve(keys: &[&TestKey]) -> Jwks {
        use std::sync::atomic::Ordering;
        let state = std::sync::Arc::new(JwksState {
            answer: std::sync::Mutex::new((200, key_set(keys))),
            requests: Default::default(),
        });
        let served = state.clone();
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let state = served.clone();
                async move {
                    state.requests.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = state.answer.lock().unwrap().clone();
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Jwks { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.state.answer.lock().unwrap() = (200, key_set(keys));
    }

    fn fail(&self) {
        *self.state.answer.lock().unwrap() = (500, "down".into());
    }

    fn requests(&self) -> usize {
        self.state
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn wait_for_requests(&self, n: usize) {
        let wait = async {
            while self.requests() < n {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("the gateway should fetch the key set {n} times"));
    }

    /// A gateway that verifies with this key set, with `extra` flags.
    async fn gateway(&self, extra: &[&str]) -> TestServer {
        let url = self.url();
        let mut args = vec!["--jwks-url", &url, "--jwt-audience", AUDIENCE];
        args.extend_from_slice(extra);
        TestServer::start_raw(&args).await
    }
}

#[tokio::test]
async fn jwks_keys_of_each_algorithm_verify_the_tokens_naming_them() {
    let idp = Jwks::serve(&[&RSA_A, &EC_A, &ED_A]).await;
    let server = idp.gateway(&[]).await;
    for key in [&RSA_A, &EC_A, &ED_A] {
        let user = format!("user-{}", key.kid);
        let client = connect_bearer(&server, &key.token(&user)).await;
        assert_eq!(client.welcome["user_id"], user.as_str());
        client.close().await;
    }

    // Signed by a key the set does not hold, but naming one it does.
    let forged = RSA_B.token_as(RSA_A.kid, "forger", 3600);
    let reason = expect_unauthorized(&server, &forged).await;
    assert!(reason.contains("signature"), "{reason}");
    // An RS256 token naming the ES256 key: the key decides the algorithm, not the token.
    let confused = RSA_A.token_as(EC_A.kid, "confused", 3600);
    let reason = expect_unauthorized(&server, &confused).await;
    assert!(reason.contains("algorithm"), "{reason}");
    // HS256 with the RSA key's kid, and no kid at all.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(RSA_A.kid.into());
    let hs = jsonwebtoken::encode(
        &header,
        &json!({"sub": "hs", "exp": now_secs() + 60, "aud": AUDIENCE}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    expect_unauthorized(&server, &hs).await;
    let no_kid = sign_rs256(json!({"sub": "nokid", "exp": now_secs() + 60, "aud": AUDIENCE}));
    let reason = expect_unauthorized(&server, &no_kid).await;
    assert!(reason.contains("kid"), "{reason}");
    // A good key, but a token minted for another service.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(RSA_A.kid.into());
    let other_aud = jsonwebtoken::encode(
        &header,
        &json!({"sub": "other", "exp": now_secs() + 60, "aud": "another-service"}),
        &RSA_A.encoding(),
    )
    .unwrap();
    expect_unauthorized(&server, &other_aud).await;
    expect_unauthorized(&server, &unsigned_token("attacker")).await;
    assert_eq!(refused_count(&server, "unauthorized").await, 6.0);
}

#[tokio::test]
async fn jwks_tokens_give_attributes_as_hs256_tokens_do() {
    let idp = Jwks::serve(&[&RSA_A, &ED_A]).await;
    let server = idp
        .gateway(&[
            "--attribute-claims",
            "age_verified",
            "--require-attribute",
            "age_verified=true",
        ])
        .await;
    for key in [&RSA_A, &ED_A] {
        let mut without = connect_bearer(&server, &key.token("without")).await;
        let e = without.request(json!({"type": "enqueue"}), "q").await;
        assert_eq!(e["code"], "attribute_required", "{}: {e}", key.kid);
        without.close().await;
        let verified = key.token_with("verified", json!({"age_verified": true}));
        let mut with = connect_bearer(&server, &verified).await;
        let queued = with.request(json!({"type": "enqueue"}), "q").await;
        assert_eq!(queued["type"], "queued", "{}: {queued}", key.kid);
        with.request(json!({"type": "end"}), "e").await;
        with.close().await;
    }
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_and_the_old_one_still_verifies() {
    let idp = Jwks::serve(&[&RSA_A]).await;
    let server = idp.gateway(&[]).await;
    assert_eq!(idp.requests(), 1, "the set is loaded at start-up");
    connect_bearer(&server, &RSA_A.token("before"))
        .await
        .close()
        .await;

    // The provider starts signing with a new key and publishes both.
    idp.publish(&[&RSA_A, &RSA_B]);
    let client = connect_bearer(&server, &RSA_B.token("after")).await;
    assert_eq!(client.welcome["user_id"], "after");
    assert_eq!(
        idp.requests(),
        2,
        "the unknown kid made the gateway fetch again"
    );
    let client = connect_bearer(&server, &RSA_A.token("still")).await;
    assert_eq!(client.welcome["user_id"], "still");
    assert_eq!(idp.requests(), 2, "known kids need no fetch");
}

#[tokio::test]
async fn unknown_kids_make_at_most_one_fetch_per_interval() {
    let idp = Jwks::serve(&[&RSA_A]).await;
    let server = idp.gateway(&["--jwks-min-refetch-secs", "3600"]).await;
    assert_eq!(idp.requests(), 1);
    for i in 0..5 {
        let made_up = RSA_A.token_as(&format!("ghost-{i}"), "ghost", 3600);
        let reason = expect_unauthorized(&server, &made_up).await;
        assert!(reason.contains("kid"), "{reason}");
    }
    assert_eq!(
        idp.requests(),
        2,
        "five unknown kids within the interval: one fetch"
    );
    // A key published meanwhile waits for the next allowed fetch; known keys keep working.
    idp.publish(&[&RSA_A, &RSA_B]);
    expect_unauthorized(&server, &RSA_B.token("early")).await;
    connect_bearer(&server, &RSA_A.token("known")).await;
    assert_eq!(idp.requests(), 2);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_keys_and_a_later_one_brings_new_ones() {
    let idp = Jwks::serve(&[&RSA_A]).await;
    let server = idp.gateway(&["--jwks-refresh-secs", "1"]).await;
    idp.fail();
    // The third request is made after the second (a failed one) was answered.
    idp.wait_for_requests(3).await;
    let client = connect_bearer(&server, &RSA_A.token("kept")).await;
    assert_eq!(client.welcome["user_id"], "kept");
    // A set without a single usable key is a failure too.
    *idp.state.answer.lock().unwrap() = (200, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into());
    let seen = idp.requests();
    idp.wait_for_requests(seen + 2).await;
    connect_bearer(&server, &RSA_A.token("kept-again")).await;
    // The interval brings a rotated set without any token asking for it.
    idp.publish(&[&RSA_B]);
    let seen = idp.requests();
    idp.wait_for_requests(seen + 2).await;
    connect_bearer(&server, &RSA_B.token("rotated")).await;
}

#[tokio::test]
async fn a_jwks_file_verifies_like_a_url() {
    let dir = std::env::temp_dir().join(format!("matchgate-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(&file, key_set(&[&EC_A, &ED_A])).unwrap();
    let server = TestServer::start_raw(&[
        "--jwks-file",
        file.to_str().unwrap(),
        "--jwt-audience",
        AUDIENCE,
    ])
    .await;
    connect_bearer(&server, &ED_A.token("from-file")).await;
    expect_unauthorized(&server, &RSA_A.token("not-in-file")).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn start_error(args: &[&str]) -> String {
    let mut all = vec!["matchgate", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let config = <matchgate::Config as clap::Parser>::try_parse_from(all).expect("parses");
    match matchgate::Server::bind(config).await {
        Ok(_) => panic!("start-up with {args:?} should fail"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn public_keys_need_an_audience_unless_any_is_allowed() {
    let idp = Jwks::serve(&[&RSA_A]).await;
    let url = idp.url();
    let public = fixture("rs256-public.pem");
    for keys in [
        ["--jwks-url", url.as_str()],
        ["--jwt-public-key-file", public.to_str().unwrap()],
    ] {
        let e = start_error(&keys).await;
        assert!(
            e.contains("MATCHGATE_JWT_AUDIENCE") && e.contains("MATCHGATE_JWT_ALLOW_ANY_AUDIENCE"),
            "{e}"
        );
        let mut any = keys.to_vec();
        any.push("--jwt-allow-any-audience");
        TestServer::start_raw(&any).await;
    }
    // A shared secret belongs to this gateway alone: no audience needed.
    TestServer::start(&[]).await;
}

#[tokio::test]
async fn a_key_set_that_cannot_be_loaded_stops_the_start() {
    let closed = format!("http://127.0.0.1:{}/jwks.json", common::redis::free_port());
    let e = start_error(&["--jwks-url", &closed, "--jwt-audience", AUDIENCE]).await;
    assert!(e.contains(&closed), "{e}");
    let e = start_error(&[
        "--jwks-file",
        "/nonexistent/jwks.json",
        "--jwt-audience",
        AUDIENCE,
    ])
    .await;
    assert!(e.contains("/nonexistent/jwks.json"), "{e}");
    let idp = Jwks::serve(&[]).await;
    let e = start_error(&["--jwks-url", &idp.url(), "--jwt-audience", AUDIENCE]).await;
    assert!(e.contains("no usable key"), "{e}");
}

/// A gateway whose connections close as soon as their token expires (no leeway, no grace).
async fn strict_expiry() -> TestServer {
    TestServer::start(&["--jwt-leeway-secs", "0", "--token-expiry-grace-ms", "0"]).await
}

fn short_token(sub: &str, secs: u64) -> (String, u64) {
    let exp = now_secs() + secs;
    (sign(json!({"sub": sub, "exp": exp}), SECRET), exp)
}

#[tokio::test]
async fn without_a_refresh_the_connection_closes_with_4008() {
    let server = strict_expiry().await;
    let (jwt, exp) = short_token("brief", 2);
    let mut client = connect_bearer(&server, &jwt).await;
    let notice = client.expect("token_expiring").await;
    assert_eq!(notice["expires_at_ms"], exp * 1000);
    let closed = client.closed().await;
    assert!(matches!(closed, common::Closed::Code(4008)), "{closed:?}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "matchgate_disconnects_total{code=\"4008\"}"),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_refresh_moves_the_expiry() {
    let server = strict_expiry().await;
    let (jwt, first_exp) = short_token("renewer", 2);
    let mut client = connect_bearer(&server, &jwt).await;
    client.expect("token_expiring").await;
    let long = token("renewer");
    let ack = client
        .request(json!({"type": "refresh", "access_token": long}), "r1")
        .await;
    assert_eq!(
        ack,
        json!({"type": "ack", "action": "refresh", "ref": "r1"})
    );
    // Past the first token's deadline the connection still serves.
    while now_secs() <= first_exp + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let status = client.request(json!({"type": "status"}), "s1").await;
    assert_eq!(status["type"], "status");
    // A second short token: its own notice, then the close.
    let (short, second_exp) = short_token("renewer", 2);
    client
        .request(json!({"type": "refresh", "access_token": short}), "r2")
        .await;
    let notice = client.expect("token_expiring").await;
    assert_eq!(notice["expires_at_ms"], second_exp * 1000);
    let closed = client.closed().await;
    assert!(matches!(closed, common::Closed::Code(4008)), "{closed:?}");
}

#[tokio::test]
async fn a_refused_refresh_keeps_the_old_expiry() {
    let server = strict_expiry().await;
    let (jwt, _) = short_token("keeper", 2);
    let mut client = connect_bearer(&server, &jwt).await;
    client.expect("token_expiring").await;
    let expired = sign(json!({"sub": "keeper", "exp": now_secs() - 60}), SECRET);
    let forged = sign(
        json!({"sub": "keeper", "exp": now_secs() + 3600}),
        "some-other-secret-some-other-secret",
    );
    for (i, (bad, why)) in [
        (token("somebody-else"), "another user"),
        (expired, "expired"),
        (forged, "signature"),
        ("garbage".to_string(), "malformed"),
    ]
    .into_iter()
    .enumerate()
    {
        let reference = format!("bad-{i}");
        let error = client
            .request(json!({"type": "refresh", "access_token": bad}), &reference)
            .await;
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["code"], "unauthorized", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
    }
    let missing = client.request(json!({"type": "refresh"}), "bad-4").await;
    assert_eq!(missing["code"], "bad_request", "{missing}");
    // None of them moved the expiry.
    let closed = client.closed().await;
    assert!(matches!(closed, common::Closed::Code(4008)), "{closed:?}");
}

#[tokio::test]
async fn dev_tokens_work_on_every_instance_of_one_redis() {
    let redis = common::redis::RedisServer::start().await;
    let url = redis.url();
    let a = TestServer::start_raw(&["--redis-url", &url, "--instance-id", "dev-a"]).await;
    let b = TestServer::start_raw(&["--redis-url", &url, "--instance-id", "dev-b"]).await;
    let (status, body) = http_request(
        a.addr,
        "POST",
        "/v1/dev/token",
        &[("content-type", "application/json")],
        r#"{"device_id":"roamer"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let minted: Value = serde_json::from_str(&body).unwrap();
    let jwt = minted["access_token"].as_str().unwrap();
    let client = connect_bearer(&b, jwt).await;
    assert_eq!(client.welcome["user_id"], "dev-roamer");
}

#[tokio::test]
async fn dev_secret_flag_shares_the_secret_without_redis() {
    let secret = "a-dev-secret-for-tests-a-dev-secret";
    let a = TestServer::start_raw(&["--dev-secret", secret]).await;
    let b = TestServer::start_raw(&["--dev-secret", secret]).await;
    let (status, body) = http_request(
        a.addr,
        "POST",
        "/v1/dev/token",
        &[("content-type", "application/json")],
        r#"{"device_id":"d1"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let minted: Value = serde_json::from_str(&body).unwrap();
    connect_bearer(&b, minted["access_token"].as_str().unwrap()).await;
    let e = start_error(&["--jwt-secret", SECRET, "--dev-secret", secret]).await;
    assert!(e.contains("MATCHGATE_DEV_SECRET"), "{e}");
}
