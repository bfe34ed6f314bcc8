//! Kafka with SASL SCRAM against a tansu broker the test owns (`--authentication`, a SCRAM
//! user), through the real `outbox-relay` binary: the password from `sasl_password_file`
//! delivers; a wrong one leaves the sink down with a sentence naming the keys to fix, rows
//! untouched, nothing dead-lettered. tansu has no TLS listener, so TLS is tested where a real
//! handshake can fail: a TLS listener (`openssl s_server`) whose certificate the relay does not
//! trust, and TLS asked of tansu's plaintext listener. Bad combinations of settings are refused
//! at start by the binary.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_relay::sinks::kafka::{KafkaConfig, KafkaRoute};
use outbox_relay::sinks::BrokerConfig;
use outbox_testkit::kafka::{KafkaReader, ScramLogin, Storage, TansuBroker};
use outbox_testkit::tls::{write_private, TestPki};
use support::kafka::kafka_config;
use support::*;

async fn enqueue(db: &TestDb, topic: &str, n: i32) {
    sqlx::query(
        "SELECT outbox.enqueue($1, convert_to(i::text, 'UTF8'), 'k' || i % 3) FROM generate_series(1, $2) AS i",
    )
    .bind(topic)
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// The SCRAM settings of `[sinks.kafka]` with the password in `password_file`.
fn scram_toml(login: &ScramLogin, password_file: &Path) -> String {
    format!(
        r#"sasl_password_file = "{}"
librdkafka = {{ "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "{}", "sasl.username" = "{}" }}"#,
        password_file.display(),
        login.mechanism,
        login.user
    )
}

/// Guarantee (docs/sinks/kafka.md, "TLS and authentication"): with SASL SCRAM the relay logs in
/// with the password of `sasl_password_file` and delivers; with a wrong password the sink stays
/// down, `/readyz` and the log say the broker refused the SASL login and which keys to check, its
/// rows wait with no attempt counted and nothing is dead-lettered, and the password appears
/// nowhere in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_scram_login_from_a_password_file_delivers_and_a_wrong_password_keeps_the_sink_down()
{
    let Some(mut broker) = TansuBroker::start(Storage::Sqlite).await else {
        return;
    };
    let topic = unique("sec");
    broker.create_topic(&topic, 1).await;
    let login = ScramLogin {
        user: "relay".into(),
        password: unique("pw"),
        mechanism: "SCRAM-SHA-512",
    };
    broker.require_scram(login.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("kafka-password");
    write_private(&good, &format!("{}\n", login.password));
    let wrong = dir.path().join("wrong-password");
    write_private(&wrong, "not-the-password\n");

    // The right password: delivered.
    let db = TestDb::new().await;
    enqueue(&db, "sec.t", 12).await;
    let relay = RelayProcess::start(&kafka_config(
        &db.url,
        &broker.brokers(),
        &topic,
        "",
        &scram_toml(&login, &good),
    ));
    let reader = KafkaReader::with_config(broker.client_config(), &[(topic.as_str(), 1)]);
    let got = reader.collect(12, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 12, "relay stderr:\n{}", relay.stderr());
    wait_until(Duration::from_secs(20), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    let stderr = relay.stderr();
    assert!(
        stderr.contains("security_protocol=\"SASL_PLAINTEXT\"")
            || stderr.contains("security_protocol=SASL_PLAINTEXT"),
        "the sink's start line names the protocol:\n{stderr}"
    );
    assert!(
        !stderr.contains(&login.password),
        "the password leaked into the log"
    );
    drop(relay);

    // A wrong password: down, untouched, explained.
    let db = TestDb::new().await;
    enqueue(&db, "sec.t", 5).await;
    let http = format!("127.0.0.1:{}", free_port());
    let config = kafka_config(
        &db.url,
        &broker.brokers(),
        &topic,
        "",
        &scram_toml(&login, &wrong),
    )
    .replace(
        "[http]\nlisten = \"\"",
        &format!("[http]\nlisten = \"{http}\""),
    );
    let relay = RelayProcess::start(&config);
    let expect = [
        "refused the SASL login",
        "sinks.kafka.sasl_password_file",
        r#"sinks.kafka.librdkafka."sasl.username""#,
    ];
    let (_, body) = http::readyz_sink_down(&http, "kafka", &expect)
        .await
        .unwrap_or_else(|e| panic!("{e}\nrelay stderr:\n{}", relay.stderr()));
    wait_until(Duration::from_secs(60), "the circuit opened", || async {
        http::scrape_metric(&http, "outbox_sink_up", &[("sink", "kafka")]).await == 0.0
    })
    .await;
    db.assert_untouched(5, "a wrong password").await;
    let stderr = relay.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("refused the SASL login")),
        "the relay's log names the refusal:\n{stderr}"
    );
    assert!(!stderr.contains(&login.password) && !body.to_string().contains(&login.password));
}

/// `openssl s_server` on a free port: a real TLS listener (it speaks no Kafka), killed on drop.
struct TlsListener {
    child: Child,
    port: u16,
}

impl TlsListener {
    async fn start(cert: &Path, key: &Path) -> Option<Self> {
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            skip::skipped(
                "kafka_tls_handshake_failures_name_the_setting_to_fix (the TLS listener case)",
                "the openssl command is not installed",
            );
            return None;
        };
        let listener = Self { child, port };
        wait_until(
            Duration::from_secs(20),
            "openssl s_server listens",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        Some(listener)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the sink and waits until its check fails with every one of `expect`.
async fn refused(what: &str, config: KafkaConfig, expect: &[&str]) {
    config.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
    let sink = config.build("kafka").await.expect("the sink builds");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = match sink.check().await {
            Ok(()) => panic!("{what}: the sink reports itself up"),
            Err(e) => e.message,
        };
        if expect.iter().all(|x| e.contains(x)) {
            println!("{what}: {e}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: after 30 s the sink still says: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tls_sink(brokers: String, settings: &[(&str, &str)]) -> KafkaConfig {
    KafkaConfig {
        brokers,
        routes: vec![KafkaRoute {
            topics: vec!["*".into()],
            topic: "{topic}".into(),
        }],
        check_timeout_ms: 2_000,
        librdkafka: settings
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        ..KafkaConfig::default()
    }
}

/// Guarantee (docs/sinks/kafka.md, "TLS and authentication"): a TLS failure leaves the sink down
/// with a sentence naming the setting: a broker certificate not signed by the CA of
/// `ssl.ca.location`, and TLS asked of a plaintext listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_tls_handshake_failures_name_the_setting_to_fix() {
    let pki = TestPki::new("kafka");
    let other = TestPki::new("other");
    let server = pki.server("kafka-broker");
    let Some(listener) = TlsListener::start(&server.cert, &server.key).await else {
        return;
    };
    let other_ca = other.ca_cert.display().to_string();
    refused(
        "a broker certificate from another CA",
        tls_sink(
            format!("127.0.0.1:{}", listener.port),
            &[("security.protocol", "SSL"), ("ssl.ca.location", &other_ca)],
        ),
        &[
            "refused the relay",
            "certificate verify failed",
            "set sinks.kafka.librdkafka.\"ssl.ca.location\" to the CA that issued it",
        ],
    )
    .await;

    let Some(broker) = TansuBroker::start(Storage::Memory).await else {
        return;
    };
    let ca = pki.ca_cert.display().to_string();
    refused(
        "TLS asked of a plaintext listener",
        tls_sink(
            broker.brokers(),
            &[("security.protocol", "SSL"), ("ssl.ca.location", &ca)],
        ),
        &[
            "refused the relay",
            "did not complete the TLS handshake",
            "sinks.kafka.librdkafka.\"security.protocol\" asks for TLS",
        ],
    )
    .await;
}

/// Guarantee (docs/sinks/kafka.md, "TLS and authentication"): settings that cannot work are
/// refused at start, before anything connects, with the key to fix: SASL without a mechanism, a
/// CA file that does not exist, the password inline in the librdkafka table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_security_settings_that_cannot_work_are_refused_at_start() {
    let cases = [
        (
            r#"librdkafka = { "security.protocol" = "SASL_SSL" }"#,
            "needs librdkafka.\"sasl.mechanism\"",
        ),
        (
            r#"librdkafka = { "security.protocol" = "SSL", "ssl.ca.location" = "/nonexistent/ca.pem" }"#,
            "librdkafka.\"ssl.ca.location\": /nonexistent/ca.pem cannot be read",
        ),
        (
            r#"librdkafka = { "security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-256", "sasl.username" = "u", "sasl.password" = "inline-secret-77" }"#,
            "holds a secret",
        ),
    ];
    for (settings, expect) in cases {
        let config = kafka_config(
            "postgres://postgres@127.0.0.1:5432/postgres",
            "127.0.0.1:9092",
            "{topic}",
            "",
            settings,
        );
        let mut relay = RelayProcess::start(&config);
        let code = relay.wait_exit(Duration::from_secs(30)).await;
        let stderr = relay.stderr();
        assert!(
            code.is_some_and(|c| c != 0),
            "exits with an error: {code:?}\n{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "sinks.kafka.{}",
                expect.split(':').next().unwrap()
            )) || stderr.contains(expect),
            "{expect:?} missing from:\n{stderr}"
        );
        assert!(
            stderr.contains(expect),
            "{expect:?} missing from:\n{stderr}"
        );
        assert!(
            !stderr.contains("inline-secret-77"),
            "the secret leaked:\n{stderr}"
        );
    }
}
