//! Native TLS: `wss://` straight to the gateway, certificate reloads that new connections see
//! while established ones go on, bad files refused at start-up, and the TLS handshake bounded
//! like a request head. The certificates are the test CA's in tests/fixtures/tls (made once by
//! its generate.sh); the client trusts that CA only.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

use common::{match_up, ws_request, Client, TestServer, PATIENCE};
use matchgate::{Config, Server};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn certificate(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(fixture(name)).expect("fixture certificate")
}

/// A folder of its own for the certificate files a test rewrites.
fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "matchgate-{prefix}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Puts server `n`'s certificate and key at `dir/cert.pem` and `dir/key.pem` the way renewal
/// tools do: written aside, then renamed over (a reader never sees half a file).
fn install(dir: &Path, cert: &str, key: &str) {
    for (from, to) in [(cert, "cert.pem"), (key, "key.pem")] {
        let aside = dir.join(format!("{to}.new"));
        std::fs::copy(fixture(from), &aside).unwrap();
        std::fs::rename(&aside, dir.join(to)).unwrap();
    }
}

/// A wss:// connection as `user` that trusts the test CA only; returns the welcomed client
/// and the leaf certificate the server presented.
async fn connect_tls(addr: SocketAddr, user: &str) -> (Client, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate("ca.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the test CA's certificate");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let url = format!("wss://localhost:{}/v1/ws", addr.port());
    let (ws, _) =
        tokio_tungstenite::client_async(ws_request(&url, user, ""), MaybeTlsStream::Rustls(tls))
            .await
            .expect("WebSocket handshake over TLS");
    (Client::new(ws, user).welcomed().await, leaf)
}

async fn start_tls(dir: &Path, extra: &[&str]) -> TestServer {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--internal-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// Connects until the server presents `want` (a reload is picked up asynchronously).
async fn connect_until_served(addr: SocketAddr, user: &str, want: &CertificateDer<'_>) -> Client {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let (client, leaf) = connect_tls(addr, user).await;
            if leaf == *want {
                return client;
            }
            drop(client);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("new connections get the new certificate")
}

/// `a` and `b` are in a session: a chat each way gets through.
async fn chat_both_ways(a: &mut Client, b: &mut Client) {
    a.send(json!({"type": "chat", "ref": "a1", "text": "still here?"}))
        .await;
    a.expect("ack").await;
    assert_eq!(b.expect("chat").await["text"], "still here?");
    b.send(json!({"type": "chat", "ref": "b1", "text": "yes"}))
        .await;
    b.expect("ack").await;
    assert_eq!(a.expect("chat").await["text"], "yes");
}

#[tokio::test]
async fn a_wss_client_is_welcomed_and_matched_and_plain_ws_is_not_served() {
    let dir = temp_dir("tls");
    install(&dir, "server1.pem", "server1-key.pem");
    let server = start_tls(&dir, &[]).await;
    let (mut a, leaf) = connect_tls(server.addr, "alice").await;
    assert_eq!(leaf, certificate("server1.pem"));
    let (mut b, _) = connect_tls(server.addr, "bob").await;
    match_up(&mut a, &mut b).await;
    chat_both_ways(&mut a, &mut b).await;
    // A plaintext request on the TLS port is a failed handshake, not a served request.
    let url = format!("ws://{}/v1/ws", server.addr);
    assert!(
        tokio_tungstenite::connect_async(ws_request(&url, "carol", ""))
            .await
            .is_err()
    );
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn after_sighup_new_connections_get_the_new_certificate_and_old_ones_go_on() {
    let dir = temp_dir("tls-sighup");
    install(&dir, "server1.pem", "server1-key.pem");
    // No file check during the test: only the signal can cause the reload.
    let server = start_tls(&dir, &["--tls-reload-interval-ms", "3600000"]).await;
    let (mut a, leaf_a) = connect_tls(server.addr, "alice").await;
    let (mut b, _) = connect_tls(server.addr, "bob").await;
    assert_eq!(leaf_a, certificate("server1.pem"));
    match_up(&mut a, &mut b).await;

    install(&dir, "server2.pem", "server2-key.pem");
    // SAFETY: kill with our own pid and a signal the server handles.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    let _carol = connect_until_served(server.addr, "carol", &certificate("server2.pem")).await;
    assert!(
        server
            .metric("matchgate_tls_reloads_total{result=\"ok\"}")
            .await
            >= 1.0
    );

    // The connections made before the reload were not dropped and still carry frames.
    chat_both_ways(&mut a, &mut b).await;
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_file_change_is_picked_up_and_a_broken_one_keeps_the_working_certificate() {
    let dir = temp_dir("tls-watch");
    install(&dir, "server1.pem", "server1-key.pem");
    let server = start_tls(&dir, &["--tls-reload-interval-ms", "100"]).await;
    let (mut a, _) = connect_tls(server.addr, "alice").await;
    let (mut b, _) = connect_tls(server.addr, "bob").await;
    match_up(&mut a, &mut b).await;

    install(&dir, "server2.pem", "server2-key.pem");
    connect_until_served(server.addr, "carol", &certificate("server2.pem")).await;

    // A key that does not fit the certificate: the reload fails and is counted...
    let errors = "matchgate_tls_reloads_total{result=\"error\"}";
    assert_eq!(server.metric(errors).await, 0.0);
    install(&dir, "server1.pem", "server2-key.pem");
    tokio::time::timeout(PATIENCE, async {
        while server.metric(errors).await < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the failed reload is counted");
    // ...and the gateway goes on serving the last good certificate.
    let (_dave, leaf) = connect_tls(server.addr, "dave").await;
    assert_eq!(leaf, certificate("server2.pem"));
    chat_both_ways(&mut a, &mut b).await;
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn bad_files_refuse_to_start_with_a_clear_error() {
    let cases = [
        ("server1.pem", "server2-key.pem", "does not fit"),
        ("server1-key.pem", "server1-key.pem", "no PEM certificate"),
        ("server1.pem", "ca.pem", "no PEM private key"),
        ("server1.pem", "absent-key.pem", "cannot read"),
    ];
    for (cert, key, says) in cases {
        let (cert, key) = (fixture(cert), fixture(key));
        let config = <Config as clap::Parser>::try_parse_from([
            "matchgate",
            "--jwt-secret",
            common::SECRET,
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ])
        .unwrap();
        let e = match Server::bind(config).await {
            Ok(_) => panic!("{cert:?} with {key:?} starts"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(says), "{cert:?} with {key:?}: {e}");
    }
    // One without the other is a usage error.
    let e =
        <Config as clap::Parser>::try_parse_from(["matchgate", "--tls-cert", "c.pem"]).unwrap_err();
    assert!(e.to_string().contains("--tls-key"), "{e}");
}

#[tokio::test]
async fn a_handshake_that_never_comes_holds_a_pending_slot_until_the_head_timeout() {
    let dir = temp_dir("tls-pending");
    install(&dir, "server1.pem", "server1-key.pem");
    let server = start_tls(
        &dir,
        &[
            "--http-head-timeout-ms",
            "300",
            "--max-pending-connections",
            "2",
            "--max-pending-per-address",
            "2",
        ],
    )
    .await;
    // Two sockets that never start a handshake take both slots...
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let pending = "matchgate_pending_connections{listener=\"public\"}";
    tokio::time::timeout(PATIENCE, async {
        while server.metric(pending).await < 2.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("silent handshakes count as pending");
    // ...so a third is refused at once,
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let mut refusal = String::new();
    third.read_to_string(&mut refusal).await.unwrap();
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    // and the silent ones are closed when the head timeout ends their handshake.
    for mut socket in silent {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut rest))
            .await
            .expect("the server closes a socket that never shakes hands");
        assert!(rest.is_empty());
    }
    assert_eq!(
        server
            .metric("matchgate_tls_handshake_failures_total{reason=\"timeout\"}")
            .await,
        2.0
    );
    // The slots are free again: a real client gets in.
    connect_tls(server.addr, "alice").await;
    server.shutdown().await;
    std::fs::remove_dir_all(dir).unwrap();
}
