//! The NATS sink against servers that require TLS and authentication (docs/sinks/nats.md,
//! "TLS and authentication"; docs/security.md): nats-servers owned by each test, configured
//! with certificates a private CA of the test issued (`TestPki`) and with users, tokens, NKeys
//! or an operator's JWTs; the real `outbox-relay` binary publishes, an independent JetStream
//! client reads what arrived. Every failure (an unknown CA, an expired or mismatched
//! certificate, a missing or refused client certificate, TLS on one side only, refused
//! credentials) is named on `/readyz` with the server, the cause and the key to fix; the sink
//! is down meanwhile, nothing is dead-lettered, and the fixed configuration delivers it all.

mod support;

use std::path::Path;
use std::time::Duration;

use outbox_testkit::relay::log_lines;
use outbox_testkit::tls::{write_private, TestPki};
use support::*;

/// A relay config whose NATS sink has `sink_keys` (TOML lines in `[sinks.nats]`) and whose
/// HTTP server listens on `port`.
fn config(db: &str, url: &str, stream: &str, prefix: &str, sink_keys: &str, port: u16) -> String {
    format!(
        r#"
[database]
url = "{db}"

[http]
listen = "127.0.0.1:{port}"

[sinks.nats]
kind = "nats"
url = "{url}"
connect_timeout_secs = 2
{sink_keys}
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{topic}}" }}]
"#
    )
}

/// A TLS server (certificate for `localhost` and `127.0.0.1` from `pki`), verifying client
/// certificates when `verify`; `auth` as given.
async fn tls_server(pki: &TestPki, verify: bool, auth: ServerAuth) -> OwnedNats {
    let client_cert = verify.then(|| pki.client("test-client"));
    OwnedNats::start_secured(NatsSecurity {
        tls: Some(ServerTls {
            cert: pki.server("nats"),
            ca: pki.ca_cert.clone(),
            verify,
            client: Some((pki.ca_cert.clone(), client_cert)),
        }),
        auth,
    })
    .await
}

/// A TOML string value for a path.
fn p(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Writes `contents` to `name` in `dir`, readable by its owner only; returns the path.
fn secret_file(dir: &Path, name: &str, contents: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    write_private(&path, contents);
    path
}

async fn enqueue(db: &TestDb, topic: &str, id: &str) {
    sqlx::query("SELECT * FROM outbox.enqueue($1, 'x', NULL, '{}', $2)")
        .bind(topic)
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn wait_delivered(db: &TestDb, relay: &RelayProcess) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while db.waiting().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows still waiting after 60 s; relay stderr:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        db.dead_letters().await,
        0,
        "relay stderr:\n{}",
        relay.stderr()
    );
}

/// Starts a relay on `db` whose sink has `sink_keys` against `url`, its HTTP server on `port`.
fn start_relay(
    db: &TestDb,
    url: &str,
    stream: &str,
    prefix: &str,
    sink_keys: &str,
    port: u16,
) -> RelayProcess {
    RelayProcess::start(&config(&db.url, url, stream, prefix, sink_keys, port))
}

/// Starts a relay with `sink_keys` against `url` and waits until it delivered every row.
async fn deliver_all(db: &TestDb, url: &str, stream: &str, prefix: &str, sink_keys: &str) {
    let relay = start_relay(db, url, stream, prefix, sink_keys, free_port());
    wait_delivered(db, &relay).await;
}

/// Waits until `/readyz` reports the NATS sink down with an error containing every one of
/// `want`; returns that error.
async fn readyz_error(addr: &str, relay: &RelayProcess, want: &[&str]) -> String {
    match http::readyz_sink_down(addr, "nats", want).await {
        Ok((error, _)) => error,
        Err(e) => panic!("{e}\nrelay stderr:\n{}", relay.stderr()),
    }
}

/// Waits until `outbox_sink_up` is 0 and a batch met the down sink: its rows were claimed and
/// released untouched (publish errors of type `circuit_open`).
async fn sink_down_after_a_batch(port: u16, relay: &RelayProcess) {
    let error_type = "circuit_open";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = http::scrape(port).await;
        let errors = http::metric_or_zero(
            &m,
            "outbox_publish_errors_total",
            &[("sink", "nats"), ("error_type", error_type)],
        );
        let up = http::metric(&m, "outbox_sink_up", &[("sink", "nats")]);
        if errors >= 1.0 && up == Some(0.0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {error_type} publish error with the sink down after 60 s; metrics:\n{}\nrelay stderr:\n{}",
            m.lines()
                .filter(|l| l.starts_with("outbox_publish_errors_total") || l.starts_with("outbox_sink_up"))
                .collect::<Vec<_>>()
                .join("\n"),
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// docs/sinks/nats.md: over TLS verified against the test's CA (a `tls://` URL and
/// `tls.ca_file`), the relay publishes, and JetStream's de-duplication works as in plain text:
/// the same message id enqueued again after delivery is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_the_ca_the_relay_publishes_and_a_republished_id_is_stored_once() {
    let pki = TestPki::new("nats-tls");
    let nats = tls_server(&pki, false, ServerAuth::None).await;
    let db = TestDb::new().await;
    let (stream, prefix, port) = (unique("S"), unique("t"), free_port());
    let keys = format!("tls = {{ ca_file = {} }}", p(&pki.ca_cert));
    let relay = start_relay(&db, &nats.tls_url(), &stream, &prefix, &keys, port);
    enqueue(&db, "tls.a", "tls-1").await;
    enqueue(&db, "tls.b", "tls-2").await;
    wait_delivered(&db, &relay).await;
    // The same id again, after the first was delivered and removed from the outbox.
    enqueue(&db, "tls.a", "tls-1").await;
    wait_delivered(&db, &relay).await;

    let mut ids: Vec<String> = read_stream(&nats.jetstream().await, &stream)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["tls-1", "tls-2"]);
    let metrics = http::scrape(port).await;
    assert_eq!(
        http::metric_or_zero(
            &metrics,
            "outbox_published_total",
            &[("outcome", "duplicate")]
        ),
        1.0,
        "{metrics}"
    );
    let stderr = relay.stderr();
    assert_eq!(
        log_lines(
            &stderr,
            "INFO",
            &[
                "NATS sink",
                "tls=required",
                &pki.ca_cert.display().to_string()
            ]
        ),
        1,
        "{stderr}"
    );
}

/// docs/sinks/nats.md, mutual TLS: a server that verifies clients refuses a relay without a
/// client certificate (named: set tls.cert_file and tls.key_file) and one whose certificate
/// another CA signed (named: the server refused it); with a certificate of the server's CA,
/// the relay publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_the_server_trusts() {
    let pki = TestPki::new("nats-mtls");
    let nats = tls_server(&pki, true, ServerAuth::None).await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    enqueue(&db, "mtls.a", "mtls-1").await;
    let ca = p(&pki.ca_cert);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let keys = format!("tls = {{ ca_file = {ca} }}");
    let relay = start_relay(&db, &nats.url(), &stream, &prefix, &keys, port);
    let error = readyz_error(
        &addr,
        &relay,
        &[
            "requires a client certificate",
            "sinks.nats.tls.cert_file",
            &nats.url(),
        ],
    )
    .await;
    assert!(error.contains("sinks.nats.tls.key_file"), "{error}");
    drop(relay);

    let stranger_ca = TestPki::new("stranger");
    let stranger = stranger_ca.client("relay");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let keys = format!(
        "tls = {{ ca_file = {ca}, cert_file = {}, key_file = {} }}",
        p(&stranger.cert),
        p(&stranger.key)
    );
    let relay = start_relay(&db, &nats.url(), &stream, &prefix, &keys, port);
    readyz_error(
        &addr,
        &relay,
        &["refused the client certificate", "sinks.nats.tls.cert_file"],
    )
    .await;
    drop(relay);
    assert_eq!(db.waiting().await, 1);
    assert_eq!(db.dead_letters().await, 0);

    let client = pki.client("relay");
    let keys = format!(
        "tls = {{ ca_file = {ca}, cert_file = {}, key_file = {} }}",
        p(&client.cert),
        p(&client.key)
    );
    deliver_all(&db, &nats.url(), &stream, &prefix, &keys).await;
    let stored = read_stream(&nats.jetstream().await, &stream).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "mtls-1");
}

/// Starts a relay with `sink_keys` (and `env`) against `nats`, enqueues one row and checks it
/// arrived; returns the relay's log. The secret must appear nowhere in it.
async fn delivers_with(
    nats: &OwnedNats,
    sink_keys: &str,
    env: &[(&str, &str)],
    secret: &str,
) -> String {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let id = unique("auth");
    enqueue(&db, "auth.t", &id).await;
    let relay = RelayProcess::start_with_env(
        &config(
            &db.url,
            &nats.url(),
            &stream,
            &prefix,
            sink_keys,
            free_port(),
        ),
        &[env, &[("RUST_LOG", "debug")]].concat(),
    );
    wait_delivered(&db, &relay).await;
    let stored = read_stream(&nats.jetstream().await, &stream).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, id);
    let stderr = relay.stderr();
    assert!(!stderr.contains(secret), "the secret leaked:\n{stderr}");
    stderr
}

/// docs/sinks/nats.md: `user` with `password_file` (the password never in the log, even at
/// debug level).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_file_authenticate() {
    let password = unique("pw");
    let nats = OwnedNats::start_with_user("relay", &password).await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(dir.path(), "password", &format!("{password}\n"));
    let keys = format!("user = \"relay\"\npassword_file = {}", p(&file));
    let stderr = delivers_with(&nats, &keys, &[], &password).await;
    assert_eq!(
        log_lines(
            &stderr,
            "INFO",
            &[
                "NATS sink",
                "user \"relay\" (password from sinks.nats.password_file)"
            ]
        ),
        1,
        "{stderr}"
    );
}

/// docs/sinks/nats.md: a token from a file named by `OUTBOX_SINKS__NATS__TOKEN_FILE`, over TLS
/// (the token never crosses the network in clear text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_a_file_authenticates_over_tls() {
    let token = unique("tok");
    let pki = TestPki::new("nats-token");
    let nats = tls_server(&pki, false, ServerAuth::Token(token.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(dir.path(), "token", &token);
    let keys = format!("tls = {{ ca_file = {} }}", p(&pki.ca_cert));
    let file = file.display().to_string();
    delivers_with(
        &nats,
        &keys,
        &[("OUTBOX_SINKS__NATS__TOKEN_FILE", &file)],
        &token,
    )
    .await;
}

/// docs/sinks/nats.md: an NKey user seed; the server lists only the public key, the log names
/// it, and the seed stays in the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_authenticates() {
    let (seed, public) = nats::nkey_user();
    let nats = OwnedNats::start_secured(NatsSecurity {
        tls: None,
        auth: ServerAuth::NKey { seed: seed.clone() },
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(dir.path(), "relay.nk", &format!("{seed}\n"));
    let keys = format!("nkey_seed_file = {}", p(&file));
    let stderr = delivers_with(&nats, &keys, &[], &seed).await;
    assert_eq!(
        log_lines(&stderr, "INFO", &["NATS sink", &format!("nkey {public}")]),
        1,
        "{stderr}"
    );
}

/// docs/sinks/nats.md: a `.creds` file against a server in operator (JWT) mode; a `.creds`
/// file of a user the server's operator never vouched for is refused, named by its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_authenticates_against_an_operator_mode_server() {
    let operator = OperatorSetup::new();
    let nats = OwnedNats::start_secured(NatsSecurity {
        tls: None,
        auth: ServerAuth::Operator(operator.clone()),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(dir.path(), "relay.creds", &operator.creds);
    let seed = operator
        .creds
        .lines()
        .find(|l| l.starts_with("SU"))
        .unwrap()
        .to_string();
    let keys = format!("credentials_file = {}", p(&file));
    delivers_with(&nats, &keys, &[], &seed).await;

    let foreign = secret_file(dir.path(), "foreign.creds", &operator.foreign_creds());
    let keys = format!("credentials_file = {}", p(&foreign));
    refused(
        &nats.url(),
        &keys,
        &["authorization violation", "sinks.nats.credentials_file"],
    )
    .await;
}

/// docs/sinks/nats.md: with a CA that did not sign the server's certificate, the sink is down
/// (`outbox_sink_up` 0, `/readyz` naming the server, the cause and `tls.ca_file`, one warning in
/// the log), its rows wait untouched and nothing is dead-lettered; restarted with the right
/// CA, the relay delivers every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_keeps_the_sink_down_and_loses_nothing_until_the_ca_is_fixed() {
    let pki = TestPki::new("nats-ca");
    let nats = tls_server(&pki, false, ServerAuth::None).await;
    let wrong = TestPki::new("wrong-ca");
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    for i in 0..5 {
        enqueue(&db, "ca.t", &format!("ca-{i}")).await;
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let keys = format!("tls = {{ ca_file = {} }}", p(&wrong.ca_cert));
    let relay = start_relay(&db, &nats.tls_url(), &stream, &prefix, &keys, port);
    let error = readyz_error(
        &addr,
        &relay,
        &[
            "not signed by the CA in sinks.nats.tls.ca_file",
            &nats.tls_url(),
            "UnknownIssuer",
        ],
    )
    .await;
    assert!(
        error.contains(&wrong.ca_cert.display().to_string()),
        "{error}"
    );
    // A batch met the down sink, and its rows are untouched.
    sink_down_after_a_batch(port, &relay).await;
    db.assert_untouched(5, "a wrong CA").await;
    let stderr = relay.stderr();
    assert_eq!(
        log_lines(
            &stderr,
            "WARN",
            &["cannot connect to NATS at", "tls.ca_file"]
        ),
        1,
        "{stderr}"
    );
    drop(relay);

    let keys = format!("tls = {{ ca_file = {} }}", p(&pki.ca_cert));
    deliver_all(&db, &nats.tls_url(), &stream, &prefix, &keys).await;
    assert_eq!(read_stream(&nats.jetstream().await, &stream).await.len(), 5);
}

/// docs/sinks/nats.md: a wrong password (from `password_file`) keeps the sink down with the
/// server's "authorization violation" and the keys to check, never the password; nothing is
/// dead-lettered; with the right password every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_keeps_the_sink_down_and_loses_nothing_until_it_is_fixed() {
    let password = unique("right");
    let nats = OwnedNats::start_with_user("relay", &password).await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    for i in 0..3 {
        enqueue(&db, "pw.t", &format!("pw-{i}")).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let wrong = unique("wrong");
    let file = secret_file(dir.path(), "password", &wrong);
    let keys = format!("user = \"relay\"\npassword_file = {}", p(&file));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let relay = RelayProcess::start_with_env(
        &config(&db.url, &nats.url(), &stream, &prefix, &keys, port),
        &[("RUST_LOG", "debug")],
    );
    let error = readyz_error(
        &addr,
        &relay,
        &[
            "authorization violation",
            "sinks.nats.user, sinks.nats.password_file",
            &nats.url(),
        ],
    )
    .await;
    assert!(!error.contains(&wrong), "{error}");
    sink_down_after_a_batch(port, &relay).await;
    db.assert_untouched(3, "a wrong password").await;
    let stderr = relay.stderr();
    assert!(!stderr.contains(&wrong), "the password leaked:\n{stderr}");
    drop(relay);

    secret_file(dir.path(), "password", &password);
    deliver_all(&db, &nats.url(), &stream, &prefix, &keys).await;
    assert_eq!(read_stream(&nats.jetstream().await, &stream).await.len(), 3);
}

/// Starts a relay with `sink_keys` against `url` and returns the sink's error on `/readyz`
/// once it contains every one of `want`.
async fn refused(url: &str, sink_keys: &str, want: &[&str]) -> String {
    let db = TestDb::new().await;
    let port = free_port();
    let relay = start_relay(&db, url, &unique("S"), &unique("t"), sink_keys, port);
    readyz_error(&format!("127.0.0.1:{port}"), &relay, want).await
}

/// docs/sinks/nats.md: an expired server certificate, one issued for another host, a server
/// that requires TLS while the sink has no CA for it, and a sink that requires TLS from a
/// server without it: each is named on `/readyz` with the server and what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_tls_mismatches_are_named() {
    let pki = TestPki::new("nats-bad");
    let ca = format!("tls = {{ ca_file = {} }}", p(&pki.ca_cert));
    let untrusted = |cert| NatsSecurity {
        tls: Some(ServerTls {
            cert,
            ca: pki.ca_cert.clone(),
            verify: false,
            client: None,
        }),
        auth: ServerAuth::None,
    };
    let servers = (
        OwnedNats::start_secured(untrusted(pki.expired_server("expired"))).await,
        OwnedNats::start_secured(untrusted(pki.server_for("elsewhere", &["nats.example"]))).await,
        tls_server(&pki, false, ServerAuth::None).await,
        OwnedNats::start("").await,
    );
    let (expired, elsewhere, tls_only, plain) = &servers;

    let (expired, elsewhere, tls_only, plain) = (
        expired.tls_url(),
        elsewhere.tls_url(),
        tls_only.url(),
        plain.url(),
    );
    let want_expired = ["has expired", expired.as_str()];
    let want_plain = ["does not offer TLS", plain.as_str()];
    let (a, b, c, d) = tokio::join!(
        refused(&expired, &ca, &want_expired),
        refused(
            &elsewhere,
            &ca,
            &["is not issued for \"127.0.0.1\"", "sinks.nats.url"]
        ),
        refused(
            &tls_only,
            "",
            &[
                "requires TLS",
                "not signed by a CA this machine trusts",
                "sinks.nats.tls.ca_file"
            ]
        ),
        refused(&plain, "tls = { required = true }", &want_plain),
    );
    for error in [a, b, c, d] {
        assert!(error.starts_with("not connected to NATS at "), "{error}");
    }
}

/// `outbox-relay run` with `sink_keys`: the exit code and stderr.
fn run_with(dir: &Path, sink_keys: &str) -> (Option<i32>, String) {
    let path = dir.join(format!("{}.toml", unique("relay")));
    std::fs::write(
        &path,
        config(
            &database_url(),
            "nats://127.0.0.1:4222",
            "S",
            "t",
            sink_keys,
            free_port(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(relay_bin())
        .arg("--config")
        .arg(&path)
        .arg("run")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// docs/sinks/nats.md: the TLS and credential files are read at start, and a missing or
/// malformed one, half a client certificate, or two ways to authenticate stop the relay with
/// exit code 2 and a message naming the key, without the secret.
#[test]
fn bad_tls_and_credential_settings_stop_the_relay_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new("nats-config");
    let client = pki.client("relay");
    let not_a_seed = secret_file(dir.path(), "bad.nk", "SUnot-a-seed-hunter2");
    let token = secret_file(dir.path(), "token", "hunter2-token");
    let cases = [
        (
            "tls = { ca_file = \"/nonexistent/ca.pem\" }".to_string(),
            vec!["sinks.nats.tls.ca_file: cannot read /nonexistent/ca.pem"],
        ),
        (
            format!("tls = {{ ca_file = {} }}", p(&token)),
            vec!["sinks.nats.tls.ca_file", "holds no PEM certificate"],
        ),
        (
            format!("tls = {{ cert_file = {} }}", p(&client.cert)),
            vec!["sinks.nats.tls.cert_file is set without tls.key_file"],
        ),
        (
            format!(
                "tls = {{ cert_file = {}, key_file = {} }}",
                p(&client.cert),
                p(&pki.server("other").key)
            ),
            vec![
                "sinks.nats.tls.cert_file and tls.key_file",
                "not a certificate and its key",
            ],
        ),
        (
            format!("nkey_seed_file = {}", p(&not_a_seed)),
            vec!["sinks.nats.nkey_seed_file", "does not hold an NKey seed"],
        ),
        (
            format!(
                "user = \"relay\"\npassword = \"hunter2-pw\"\ntoken_file = {}",
                p(&token)
            ),
            vec![
                "more than one way to authenticate",
                "user/password, token/token_file",
            ],
        ),
        (
            "password = \"hunter2-pw\"".to_string(),
            vec!["sinks.nats.user: a password is set but no user"],
        ),
        (
            "credentials_file = \"/nonexistent/relay.creds\"".to_string(),
            vec!["sinks.nats.credentials_file: cannot read /nonexistent/relay.creds"],
        ),
    ];
    for (keys, want) in cases {
        let (code, stderr) = run_with(dir.path(), &keys);
        assert_eq!(code, Some(2), "{keys}:\n{stderr}");
        for w in want {
            assert!(stderr.contains(w), "{keys}: wanted {w:?} in:\n{stderr}");
        }
        assert!(
            !stderr.contains("hunter2"),
            "{keys}: a secret leaked:\n{stderr}"
        );
    }
}
