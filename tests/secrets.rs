//! Secrets stay secret: with a distinctive database password (from a file, and in the URL) and
//! a broker password, every command of the binary runs at log level `trace` (text and JSON
//! logs), including failures (a configuration error, a refused connection, a wrong password, an
//! unreachable database while `run` retries), and no output — stdout, stderr, `/readyz`,
//! `/healthz`, `/metrics`, `--help` — contains any of them. Also: the `_FILE` convention and its
//! errors.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use outbox_client::{enqueue, Message};
use outbox_testkit::pg::{ServerSetup, ServerTls};
use outbox_testkit::tls::TestPki;
use sqlx::Connection;
use support::*;

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    relay::run_command(&relay_bin(), args, env, Duration::from_secs(60))
}

/// Writes `contents` into `dir/name` with `mode`; returns the path.
fn secret_file(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Everything the commands printed or served, each part labelled, searched at the end.
#[derive(Default)]
struct Transcript {
    parts: Vec<(String, String)>,
}

impl Transcript {
    fn add(&mut self, label: impl Into<String>, text: impl Into<String>) {
        self.parts.push((label.into(), text.into()));
    }

    /// Records a finished command; checks its exit code.
    fn command(&mut self, label: &str, out: &Output, expect_code: i32) {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(expect_code),
            "{label}: exit code\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        self.add(format!("{label} (stdout)"), stdout);
        self.add(format!("{label} (stderr)"), stderr);
    }

    fn text(&self, label: &str) -> &str {
        self.parts
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("no output labelled {label}"))
    }

    fn assert_free_of(&self, secrets: &[&str]) {
        for (label, text) in &self.parts {
            for secret in secrets {
                if let Some(at) = text.find(secret) {
                    let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                    let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
                    panic!(
                        "{label} shows a secret:\n{}",
                        &text[from..to].replace(secret, "<<SECRET>>")
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn no_command_shows_a_database_or_broker_secret_at_any_log_level() {
    let tag = unique("s");
    let db_secret = format!("DbPw{tag}Zq");
    let wrong_secret = format!("WrongPw{tag}Zq");
    let broker_secret = format!("BrokerPw{tag}Zq");

    let pki = TestPki::new("pg");
    let server = pki.server("pg-server");
    let pg = OwnedPostgres::start_with(ServerSetup {
        tls: Some(ServerTls {
            cert: server.cert,
            key: server.key,
            client_ca: None,
        }),
        hba: Some(vec!["hostssl all all 127.0.0.1/32 scram-sha-256".into()]),
    })
    .await;
    pg.execute(&format!("ALTER ROLE postgres PASSWORD '{db_secret}'"))
        .await;
    let nats = OwnedNats::start_with_user("relay", &broker_secret).await;

    let dir = tempfile::tempdir().unwrap();
    let password_file = secret_file(dir.path(), "db-password", &format!("{db_secret}\n"), 0o600);
    let wrong_file = secret_file(dir.path(), "wrong-password", &wrong_secret, 0o600);
    let broker_file = secret_file(dir.path(), "broker-password", &broker_secret, 0o600);
    let stream = unique("SECRETS").to_ascii_uppercase();
    let prefix = unique("secrets");
    let http_port = free_port();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[http]
listen = "127.0.0.1:{http_port}"

[sinks.nats]
kind = "nats"
url = "{nats_url}"
user = "relay"
password = "{broker_secret}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{topic}}" }}]
"#,
            nats_url = nats.url()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let ca = pki.ca_cert.display().to_string();
    let url = pg.url();
    let url_with_secret = url.replace("postgres@", &format!("postgres:{db_secret}@"));
    let password_file = password_file.display().to_string();

    let mut transcript = Transcript::default();
    // Two ways to hand over the database password: a file, and the URL.
    let ways: [(&str, Vec<(&str, &str)>); 2] = [
        (
            "password file",
            vec![
                ("OUTBOX_DATABASE__URL", url.as_str()),
                ("OUTBOX_DATABASE__PASSWORD_FILE", password_file.as_str()),
            ],
        ),
        (
            "password in URL",
            vec![("OUTBOX_DATABASE__URL", url_with_secret.as_str())],
        ),
    ];
    for (way, database) in &ways {
        let mut env: Vec<(&str, &str)> = vec![
            ("OUTBOX_CONFIG", config.as_str()),
            ("RUST_LOG", "trace"),
            ("OUTBOX_LOG__LEVEL", "trace"),
            ("OUTBOX_DATABASE__TLS__MODE", "verify-full"),
            ("OUTBOX_DATABASE__TLS__CA_FILE", ca.as_str()),
        ];
        env.extend(database.iter().copied());
        for help in [
            &["--help"][..],
            &["run", "--help"],
            &["status", "--help"],
            &["dead", "--help"],
            &["keys", "--help"],
            &["topics", "--help"],
            &["replay", "--help"],
            &["audit", "--help"],
        ] {
            transcript.command(&format!("{way}: {help:?}"), &cli(help, &env), 0);
        }
        transcript.command(&format!("{way}: migrate"), &cli(&["migrate"], &env), 0);
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["dead", "list"],
            &["dead", "list", "--json"],
            &["keys", "list"],
            &["keys", "list", "--json"],
            &["dead", "retry", "--topic", "none", "--dry-run"],
            &["dead", "purge", "--topic", "none", "--dry-run"],
            &[
                "topics",
                "pause",
                "secrets.t",
                "--reason",
                "checking the output",
            ],
            &["topics", "list"],
            &["topics", "resume", "secrets.t"],
            &["replay", "--from-id", "1", "--to-id", "10", "--dry-run"],
            &["audit"],
            &["audit", "--json"],
        ] {
            transcript.command(&format!("{way}: {args:?}"), &cli(args, &env), 0);
        }
        for format in ["text", "json"] {
            let mut env = env.clone();
            env.push(("OUTBOX_LOG__FORMAT", format));
            run_relay_once(
                &pg,
                &env,
                http_port,
                &format!("{way}: run ({format})"),
                &mut transcript,
            )
            .await;
        }

        // Failures: a configuration error, a refused connection, an unreachable database.
        let mut bad = env.clone();
        bad.push(("OUTBOX_RELAY__BATCH_SIZE", "0"));
        transcript.command(&format!("{way}: config error"), &cli(&["status"], &bad), 2);
        let mut down = env.clone();
        let down_url = url_with_secret.replace(&pg.port.to_string(), &free_port().to_string());
        down.push(("OUTBOX_DATABASE__URL", down_url.as_str()));
        transcript.command(
            &format!("{way}: database down"),
            &cli(&["status"], &down),
            1,
        );
        run_relay_against_down_database(
            &down,
            &format!("{way}: run, database down"),
            &mut transcript,
        )
        .await;
    }

    // A wrong password from a file; a database URL that is not one, with a password in it.
    let wrong_file = wrong_file.display().to_string();
    let base: Vec<(&str, &str)> = vec![
        ("OUTBOX_CONFIG", config.as_str()),
        ("RUST_LOG", "trace"),
        ("OUTBOX_DATABASE__TLS__MODE", "verify-full"),
        ("OUTBOX_DATABASE__TLS__CA_FILE", ca.as_str()),
    ];
    let mut wrong = base.clone();
    wrong.extend([
        ("OUTBOX_DATABASE__URL", url.as_str()),
        ("OUTBOX_DATABASE__PASSWORD_FILE", wrong_file.as_str()),
    ]);
    let out = cli(&["status"], &wrong);
    transcript.command("wrong password", &out, 1);
    assert!(
        transcript
            .text("wrong password (stderr)")
            .contains("password authentication failed"),
        "{}",
        transcript.text("wrong password (stderr)")
    );
    let not_postgres = format!("mysql://postgres:{db_secret}@127.0.0.1/x");
    let mut invalid = base.clone();
    invalid.push(("OUTBOX_DATABASE__URL", not_postgres.as_str()));
    transcript.command("not a postgres URL", &cli(&["status"], &invalid), 2);
    assert!(transcript
        .text("not a postgres URL (stderr)")
        .contains("mysql://postgres:***@127.0.0.1/x"));

    // The broker password from a file (the `_FILE` convention on a sink key), at trace level.
    let broker_file = broker_file.display().to_string();
    let config_without = dir.path().join("relay-no-broker-password.toml");
    std::fs::write(
        &config_without,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&format!("password = \"{broker_secret}\"\n"), ""),
    )
    .unwrap();
    let config_without = config_without.display().to_string();
    let mut env = base.clone();
    env.retain(|(k, _)| *k != "OUTBOX_CONFIG");
    env.extend([
        ("OUTBOX_CONFIG", config_without.as_str()),
        ("OUTBOX_DATABASE__URL", url.as_str()),
        ("OUTBOX_DATABASE__PASSWORD_FILE", password_file.as_str()),
        ("OUTBOX_SINKS__NATS__PASSWORD_FILE", broker_file.as_str()),
    ]);
    run_relay_once(
        &pg,
        &env,
        http_port,
        "broker password file: run",
        &mut transcript,
    )
    .await;

    // The logs were really at trace level (or the search proves nothing).
    let run_log = transcript.text("password file: run (text) (stderr)");
    assert!(run_log.contains("TRACE"), "no TRACE lines in:\n{run_log}");
    transcript.assert_free_of(&[&db_secret, &wrong_secret, &broker_secret]);
}

/// `outbox-relay run` until it has published one message to the authenticated NATS; records
/// its stderr and its HTTP endpoints' answers, then stops it with SIGTERM.
async fn run_relay_once(
    pg: &OwnedPostgres,
    env: &[(&str, &str)],
    http_port: u16,
    label: &str,
    transcript: &mut Transcript,
) {
    let config = env
        .iter()
        .find(|(k, _)| *k == "OUTBOX_CONFIG")
        .map(|(_, v)| v.to_string())
        .unwrap();
    let env: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "OUTBOX_CONFIG")
        .collect();
    let mut relay = RelayProcess::spawn(
        &relay_bin(),
        &std::fs::read_to_string(&config).unwrap(),
        &env,
    );
    http::wait_healthy(http_port, Duration::from_secs(30)).await;
    let mut conn = sqlx::PgConnection::connect_with(&pg.admin_options("postgres"))
        .await
        .unwrap();
    enqueue(
        &mut conn,
        &Message::bytes("secrets", b"payload".to_vec()).key("k"),
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the relay publishes the message",
        || {
            let options = pg.admin_options("postgres");
            async move {
                let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                n == 0
            }
        },
    )
    .await;
    conn.close().await.ok();
    for path in ["/readyz", "/healthz", "/metrics"] {
        let (status, body) = http::get(http_port, path)
            .await
            .unwrap_or_else(|| panic!("{label}: no answer on {path}"));
        assert_eq!(status, 200, "{label}: {path}: {body}");
        transcript.add(format!("{label}: {path}"), body);
    }
    relay.sigterm();
    let code = relay.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        code,
        Some(0),
        "{label}: exit code; stderr:\n{}",
        relay.stderr()
    );
    transcript.add(format!("{label} (stderr)"), relay.stderr());
}

/// `outbox-relay run` against a database that does not answer: it logs its retries; stopped
/// with SIGTERM after the first.
async fn run_relay_against_down_database(
    env: &[(&str, &str)],
    label: &str,
    transcript: &mut Transcript,
) {
    let config = env
        .iter()
        .rev()
        .find(|(k, _)| *k == "OUTBOX_CONFIG")
        .map(|(_, v)| v.to_string())
        .unwrap();
    let mut env: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "OUTBOX_CONFIG")
        .collect();
    env.push(("OUTBOX_HTTP__LISTEN", ""));
    let mut relay = RelayProcess::spawn(
        &relay_bin(),
        &std::fs::read_to_string(&config).unwrap(),
        &env,
    );
    wait_until(
        Duration::from_secs(30),
        "the relay logs a failed connection",
        || {
            let seen = relay.stderr().contains("cannot reach PostgreSQL");
            async move { seen }
        },
    )
    .await;
    relay.sigterm();
    relay.wait_exit(Duration::from_secs(30)).await;
    transcript.add(format!("{label} (stderr)"), relay.stderr());
}

#[tokio::test]
async fn file_variables_fill_any_key_and_say_what_is_wrong_with_the_file() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // `database.url_file` is no key: the variable puts the file's contents into `database.url`.
    let url_file = secret_file(dir.path(), "url", &format!("{}\n", db.url), 0o600);
    let url_file = url_file.display().to_string();
    let out = cli(
        &["status", "--json"],
        &[
            ("OUTBOX_DATABASE__URL", "postgres://nobody@127.0.0.1:1/none"),
            ("OUTBOX_DATABASE__URL_FILE", url_file.as_str()),
            ("OUTBOX_HTTP__LISTEN", ""),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A file every user may read: a warning that says how to fix it.
    let open_file = secret_file(dir.path(), "open-url", &db.url, 0o644);
    let open_file = open_file.display().to_string();
    let out = cli(
        &["status"],
        &[
            ("OUTBOX_DATABASE__URL_FILE", open_file.as_str()),
            ("OUTBOX_HTTP__LISTEN", ""),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("environment variable OUTBOX_DATABASE__URL_FILE names")
            && stderr.contains("which every user of this machine may read (mode 644): chmod o-r"),
        "{stderr}"
    );

    // A missing file, for a key of its own and through the convention: exit 2, named.
    for var in [
        "OUTBOX_DATABASE__PASSWORD_FILE",
        "OUTBOX_SINKS__N__URL_FILE",
    ] {
        let out = cli(
            &["status"],
            &[
                (var, "/nonexistent/secret"),
                ("OUTBOX_SINKS__N__KIND", "nats"),
                ("OUTBOX_HTTP__LISTEN", ""),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{var}) names /nonexistent/secret, which cannot be read"
            )) || stderr.contains(&format!(
                "environment variable {var} names /nonexistent/secret, which cannot be read"
            )),
            "{var}: {stderr}"
        );
    }

    // Both the password and its file: one must go.
    let out = cli(
        &["status"],
        &[
            ("OUTBOX_DATABASE__PASSWORD", "x"),
            ("OUTBOX_DATABASE__PASSWORD_FILE", url_file.as_str()),
            ("OUTBOX_HTTP__LISTEN", ""),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("database.password and database.password_file are both set"),
        "{stderr}"
    );
}
