//! The HTTP endpoints' security (docs/security.md, "The HTTP endpoints"): the bearer token
//! (`/metrics` needs it, `/readyz` tells its details only with it, `/healthz` stays open),
//! HTTPS with a test CA (and a renewed certificate picked up without a restart), a plaintext
//! request to the TLS port refused, the warning for an address other hosts reach without a token,
//! and bad settings refused at start with what to fix.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_testkit::tls::TestPki;
use support::*;

/// A relay on a database and stream of its own, its HTTP server on `port`, with `env` added.
/// The guard deletes the stream (the relay creates it); bound before the relay (`let (_created,
/// relay) = …`), it drops after it.
fn start_relay(db: &TestDb, port: u16, env: &[(&str, &str)]) -> (DeleteStreamOnDrop, RelayProcess) {
    let stream = unique("S");
    let config = http::with_http(
        nats_config(&db.url, &nats_url(), &stream, &unique("t"), ""),
        port,
    );
    let created = DeleteStreamOnDrop {
        url: nats_url(),
        stream,
    };
    (created, RelayProcess::start_with_env(&config, env))
}

/// Waits until `/healthz` on `port` answers over HTTPS to a client that trusts only `ca`.
async fn wait_https(port: u16, ca: &Path, what: &str) {
    wait_until(Duration::from_secs(30), what, || async {
        http::get_tls(port, "/healthz", &[], ca).await.is_ok()
    })
    .await;
}

const TOKEN: &str = "s3cret-token-0123456789abcdef";

/// With `http.token` (here from a file, `OUTBOX_HTTP__TOKEN_FILE`): `/metrics` answers 401
/// without the token or with a wrong one, 200 with it; `/readyz` answers its status with
/// `{"ready": …}` alone without a token, its details with it, 401 with a wrong one; `/healthz`
/// answers 200 whatever is sent. The token never shows in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_metrics_and_the_readiness_details_but_not_liveness() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    let (_created, relay) = start_relay(
        &db,
        port,
        &[("OUTBOX_HTTP__TOKEN_FILE", token_file.to_str().unwrap())],
    );
    http::wait_healthy(port, Duration::from_secs(30)).await;
    let right = format!("Bearer {TOKEN}");
    let auth = |value: &str| vec![("Authorization", value.to_string())];
    let get = |path: &'static str, headers: Vec<(&'static str, String)>| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http::get_with(port, path, &headers)
            .await
            .expect("the relay answers")
    };

    let (status, body) = get("/metrics", vec![]).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("Authorization: Bearer <http.token>"),
        "{body}"
    );
    for wrong in [
        "Bearer not-the-token-0123456789".to_string(),
        format!("Bearer {TOKEN}x"),
        format!("Basic {TOKEN}"),
        "Bearer".to_string(),
    ] {
        assert_eq!(get("/metrics", auth(&wrong)).await.0, 401, "{wrong}");
    }
    let (status, body) = get("/metrics", auth(&right)).await;
    assert_eq!(status, 200);
    assert!(body.contains("outbox_database_up"), "{body}");
    // The scheme is case-insensitive (RFC 9110).
    assert_eq!(
        get("/metrics", auth(&format!("bearer {TOKEN}"))).await.0,
        200
    );

    wait_until(Duration::from_secs(30), "the relay is ready", || async {
        http::get_with(port, "/readyz", &[("Authorization", right.as_str())])
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    let (status, body) = get("/readyz", vec![]).await;
    assert_eq!((status, body.trim()), (200, r#"{"ready":true}"#));
    let (status, body) = get("/readyz", auth(&right)).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""sinks":[{"#), "the details: {body}");
    assert_eq!(
        get("/readyz", auth("Bearer wrong-wrong-wrong-wrong"))
            .await
            .0,
        401
    );

    for headers in [vec![], auth(&right), auth("Bearer wrong-wrong-wrong-wrong")] {
        assert_eq!(get("/healthz", headers).await, (200, "ok\n".to_string()));
    }
    assert!(!relay.stderr().contains(TOKEN), "{}", relay.stderr());
}

/// With `http.tls.cert_file` and `key_file`: HTTPS with a certificate of the test's CA; a client
/// that trusts another CA fails the handshake; a plaintext request to the port gets no HTTP
/// answer; a renewed certificate (another CA) replaces the old one without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_configured_certificate_and_picks_up_a_renewed_one() {
    let db = TestDb::new().await;
    let pki = TestPki::new("http");
    let server = pki.server("relay-http");
    let other = TestPki::new("other");
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&server.cert, &cert).unwrap();
    std::fs::copy(&server.key, &key).unwrap();
    let (_created, relay) = start_relay(
        &db,
        port,
        &[
            ("OUTBOX_HTTP__TLS__CERT_FILE", cert.to_str().unwrap()),
            ("OUTBOX_HTTP__TLS__KEY_FILE", key.to_str().unwrap()),
        ],
    );
    wait_https(port, &pki.ca_cert, "HTTPS /healthz answers").await;
    assert_eq!(
        http::get_tls(port, "/healthz", &[], &pki.ca_cert).await,
        Ok((200, "ok\n".to_string()))
    );
    let (status, body) = http::get_tls(port, "/metrics", &[], &pki.ca_cert)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("outbox_database_up"));
    // "localhost" is in the certificate as well.
    let localhost = format!("localhost:{port}");
    assert_eq!(
        http::get_tls(&localhost, "/healthz", &[], &pki.ca_cert)
            .await
            .map(|(s, _)| s),
        Ok(200)
    );

    let refused = http::get_tls(port, "/healthz", &[], &other.ca_cert)
        .await
        .expect_err("a client that trusts another CA");
    assert!(
        refused.contains("TLS handshake") && refused.contains("UnknownIssuer"),
        "{refused}"
    );
    assert_eq!(
        http::get(port, "/healthz").await,
        None,
        "plaintext HTTP to the TLS port gets no HTTP answer"
    );

    // Renewal: a certificate of the other CA written over the files (key first, as a secret
    // volume's atomic swap leaves both consistent at once; here the reload waits for both).
    let renewed = other.server("relay-http");
    std::fs::copy(&renewed.key, &key).unwrap();
    std::fs::copy(&renewed.cert, &cert).unwrap();
    wait_https(port, &other.ca_cert, "the renewed certificate is served").await;
    assert!(http::get_tls(port, "/healthz", &[], &pki.ca_cert)
        .await
        .is_err());
    assert!(
        relay.stderr().contains("HTTPS certificate reloaded"),
        "{}",
        relay.stderr()
    );
}

/// An address other hosts reach, without a token: the relay serves, and warns at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_without_a_token_is_warned_about() {
    let db = TestDb::new().await;
    let port = free_port();
    let (_created, relay) = start_relay(
        &db,
        port,
        &[("OUTBOX_HTTP__LISTEN", &format!("0.0.0.0:{port}"))],
    );
    http::wait_healthy(port, Duration::from_secs(30)).await;
    assert!(
        relay
            .stderr()
            .contains("reachable from other hosts without a token"),
        "{}",
        relay.stderr()
    );
}

/// Bad HTTP settings stop `outbox-relay run` at start (exit 2) with a message that names the key
/// and what to do, and never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_settings_are_refused_with_what_to_fix() {
    let pki = TestPki::new("bad");
    let good = pki.server("a");
    let unrelated = pki.server("b");
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("OUTBOX_HTTP__TOKEN", "short-tok".into())],
            "http.token is 9 characters long: use at least 16",
        ),
        (
            vec![("OUTBOX_HTTP__TOKEN", "has a space in it 0123456789".into())],
            "http.token may hold visible ASCII characters only",
        ),
        (
            vec![
                ("OUTBOX_HTTP__TOKEN", TOKEN.into()),
                ("OUTBOX_HTTP__TOKEN_FILE", path(&token_file)),
            ],
            "http.token and http.token_file are both set",
        ),
        (
            vec![("OUTBOX_HTTP__TLS__CERT_FILE", path(&good.cert))],
            "http.tls.cert_file and http.tls.key_file go together",
        ),
        (
            vec![
                ("OUTBOX_HTTP__TLS__CERT_FILE", "/nonexistent/tls.crt".into()),
                ("OUTBOX_HTTP__TLS__KEY_FILE", path(&good.key)),
            ],
            "http.tls.cert_file = /nonexistent/tls.crt cannot be read",
        ),
        (
            vec![
                ("OUTBOX_HTTP__TLS__CERT_FILE", path(&not_pem)),
                ("OUTBOX_HTTP__TLS__KEY_FILE", path(&good.key)),
            ],
            "holds no PEM certificate",
        ),
        (
            vec![
                ("OUTBOX_HTTP__TLS__CERT_FILE", path(&good.cert)),
                ("OUTBOX_HTTP__TLS__KEY_FILE", path(&not_pem)),
            ],
            "http.tls.key_file",
        ),
        (
            vec![
                ("OUTBOX_HTTP__TLS__CERT_FILE", path(&good.cert)),
                ("OUTBOX_HTTP__TLS__KEY_FILE", path(&unrelated.key)),
            ],
            "does not go with the certificate of http.tls.cert_file",
        ),
    ];
    for (env, says) in cases {
        let mut cmd = Command::new(relay_bin());
        cmd.arg("run")
            // Nothing listens there: the settings are checked before any connection.
            .env("OUTBOX_DATABASE__URL", "postgres://nobody@127.0.0.1:1/none")
            .env("OUTBOX_HTTP__LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{env:?}: expected {says:?} in:\n{stderr}"
        );
        assert!(!stderr.contains(TOKEN), "{stderr}");
    }
}
