//! RabbitMQ over TLS, with a password file or the client certificate (SASL EXTERNAL), against
//! a RabbitMQ node the test owns: a TLS listener that requires a client certificate signed by
//! the test's CA, a user of its own, the EXTERNAL plugin. One node serves every case (a node
//! takes seconds to start). The deliveries and the refusals that must leave the sink down with
//! nothing dead-lettered run through the real `outbox-relay` binary; the other refusals through
//! the sink itself, each checked for the sentence that names the setting to fix.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use outbox_relay::sinks::amqp::{AmqpConfig, AmqpExchange, AmqpRoute, AmqpTls};
use outbox_relay::sinks::BrokerConfig;
use outbox_testkit::tls::{write_private, CertFiles, TestPki};
use support::amqp::*;
use support::*;

/// The node, its PKI, and the files the cases share.
struct Fixture {
    node: RabbitNode,
    pki: TestPki,
    other: TestPki,
    /// The client certificate of user `relay`, signed by the node's CA.
    client: CertFiles,
    password: String,
    password_file: PathBuf,
    _dir: tempfile::TempDir,
}

const USER: &str = "relay";

async fn fixture() -> Option<Fixture> {
    let pki = TestPki::new("rabbit");
    let other = TestPki::new("other");
    let client = pki.client(USER);
    let password = unique("pw");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("rabbit-password");
    write_private(&password_file, &format!("{password}\n"));
    let options = RabbitOptions {
        tls: Some(RabbitTls {
            ca_cert: pki.ca_cert.clone(),
            server: pki.server("rabbit-node"),
            require_client_cert: true,
            external: true,
        }),
        user: Some((USER.into(), password.clone())),
    };
    let node = match RabbitNode::start_with(options).await {
        Ok(n) => n,
        Err(e) if RabbitNode::server_bin().is_err() => {
            skip::skipped("a RabbitMQ TLS test", &e.to_string());
            return None;
        }
        Err(e) => panic!("cannot start a RabbitMQ node with a TLS listener: {e}"),
    };
    Some(Fixture {
        node,
        pki,
        other,
        client,
        password,
        password_file,
        _dir: dir,
    })
}

/// `[sinks.rabbit.tls]` as TOML lines.
fn tls_toml(ca: &Path, client: Option<&CertFiles>) -> String {
    let mut out = format!("[sinks.rabbit.tls]\nca_file = \"{}\"\n", ca.display());
    if let Some(c) = client {
        out.push_str(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        ));
    }
    out
}

/// A relay config with an HTTP listener; `sink_extra` goes into `[sinks.rabbit]`, `tls` after it.
fn relay_config(
    db: &TestDb,
    url: &str,
    exchange: &str,
    http: &str,
    sink_extra: &str,
    tls: &str,
) -> String {
    let config = amqp_config(&db.url, url, exchange, "", sink_extra, tls);
    config.replace(
        "[http]\nlisten = \"\"",
        &format!("[http]\nlisten = \"{http}\""),
    )
}

async fn enqueue(db: &TestDb, topic: &str, n: i32) {
    sqlx::query(
        "SELECT outbox.enqueue($1, convert_to(i::text, 'UTF8')) FROM generate_series(1, $2) AS i",
    )
    .bind(topic)
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Runs the relay with `config` and checks that the `n` rows it has to publish arrive.
async fn delivers(f: &Fixture, what: &str, url: &str, sink_extra: &str, tls: &str) {
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&f.node.url(), &exchange).await;
    topo.bind_queue(&queue, "#").await;
    enqueue(&db, "sec.t", 20).await;
    let http = format!("127.0.0.1:{}", free_port());
    let relay = RelayProcess::start(&relay_config(&db, url, &exchange, &http, sink_extra, tls));
    let mut consumer = AmqpConsumer::new(&f.node.url(), &queue).await;
    let got = consumer.collect(20, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 20, "{what}: relay stderr:\n{}", relay.stderr());
    wait_until(Duration::from_secs(20), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    let stderr = relay.stderr();
    assert!(
        stderr.contains("connected to RabbitMQ"),
        "{what}: the relay logs its connection:\n{stderr}"
    );
    assert!(
        !stderr.contains(&f.password),
        "{what}: the password leaked into the log"
    );
    consumer.close().await;
    topo.delete().await;
}

/// Runs the relay with `config`, waits for `/readyz` to report the sink down with a reason
/// containing every one of `expect`, and checks that its rows wait untouched: no attempt
/// counted, nothing dead-lettered, `outbox_sink_up` 0.
async fn stays_down(
    f: &Fixture,
    what: &str,
    url: &str,
    sink_extra: &str,
    tls: &str,
    expect: &[&str],
) {
    let db = TestDb::new().await;
    let exchange = unique("ex");
    enqueue(&db, "sec.t", 10).await;
    let http = format!("127.0.0.1:{}", free_port());
    let relay = RelayProcess::start(&relay_config(&db, url, &exchange, &http, sink_extra, tls));
    let (_, body) = http::readyz_sink_down(&http, "rabbit", expect)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}\nrelay stderr:\n{}", relay.stderr()));
    // Let the workers try to publish for a while: each attempt must release the rows untouched.
    wait_until(
        Duration::from_secs(30),
        "the circuit opened on a publish attempt",
        || async {
            http::scrape_metric(&http, "outbox_sink_up", &[("sink", "rabbit")]).await == 0.0
        },
    )
    .await;
    db.assert_untouched(10, what).await;
    let stderr = relay.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && expect.iter().all(|e| l.contains(e))),
        "{what}: the relay's log names the problem:\n{stderr}"
    );
    assert!(
        !stderr.contains(&f.password),
        "{what}: the password leaked into the log"
    );
    assert!(
        !body.to_string().contains(&f.password),
        "{what}: the password leaked into /readyz"
    );
}

/// The sink's configuration for the in-process cases, with the fixture's password file.
fn sink_config(f: &Fixture, url: String, tls: AmqpTls) -> AmqpConfig {
    AmqpConfig {
        url,
        password_file: Some(f.password_file.clone()),
        tls,
        exchanges: vec![AmqpExchange {
            name: unique("ex"),
            ..AmqpExchange::default()
        }],
        routes: vec![AmqpRoute {
            topics: vec!["*".into()],
            exchange: "amq.topic".into(),
            routing_key: "{topic}".into(),
        }],
        connect_timeout_secs: 5,
        ..AmqpConfig::default()
    }
}

/// Builds the sink and returns its state after the first connection attempt: `Ok` when it
/// connected, else the reason it reports.
async fn check(config: &AmqpConfig) -> Result<(), String> {
    config.validate().map_err(|e| format!("invalid: {e}"))?;
    let sink = config.build("rabbit").await.map_err(|e| e.message)?;
    sink.check().await.map_err(|e| e.message)
}

fn tls(ca: &Path, client: Option<&CertFiles>) -> AmqpTls {
    AmqpTls {
        ca_file: Some(ca.to_path_buf()),
        cert_file: client.map(|c| c.cert.clone()),
        key_file: client.map(|c| c.key.clone()),
        server_name: None,
    }
}

/// Guarantee (docs/sinks/amqp.md, "TLS and authentication"): `amqps://` with the CA and client
/// certificate of `[tls]` delivers, logging in with the password of `password_file` or with the
/// client certificate (EXTERNAL); a CA that did not sign the broker's certificate or a wrong
/// password leaves the sink down with a sentence naming the key to fix, its rows untouched and
/// nothing dead-lettered; the other refusals (no client certificate, one the broker does not
/// trust, a wrong server name, TLS against the plaintext port and the reverse) each say what to
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_delivers_with_ca_client_certificate_and_password_file_or_external_and_refusals_say_what_to_fix(
) {
    let Some(f) = fixture().await else { return };
    let pw_file = format!("password_file = \"{}\"", f.password_file.display());
    let trusted = tls_toml(&f.pki.ca_cert, Some(&f.client));

    // Through the relay binary.
    delivers(&f, "password_file", &f.node.tls_url(), &pw_file, &trusted).await;
    let external = format!("{}?auth_mechanism=external", f.node.tls_url());
    delivers(&f, "EXTERNAL", &external, "", &trusted).await;
    stays_down(
        &f,
        "a CA that did not sign the broker's certificate",
        &f.node.tls_url(),
        &pw_file,
        &tls_toml(&f.other.ca_cert, Some(&f.client)),
        &[
            "not signed by a CA the relay trusts",
            "set sinks.rabbit.tls.ca_file",
            "amqps://relay@127.0.0.1",
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong-password");
    write_private(&wrong, "not-the-password\n");
    stays_down(
        &f,
        "a wrong password",
        &f.node.tls_url(),
        &format!("password_file = \"{}\"", wrong.display()),
        &trusted,
        &[
            "ACCESS_REFUSED",
            "the broker refused the login: check the user and password",
            "sinks.rabbit.password_file",
        ],
    )
    .await;

    // Through the sink in this process.
    let good = sink_config(&f, f.node.tls_url(), tls(&f.pki.ca_cert, Some(&f.client)));
    check(&good)
        .await
        .expect("the trusted configuration connects");

    let cases: Vec<(&str, AmqpConfig, &[&str])> = vec![
        (
            "no client certificate",
            sink_config(&f, f.node.tls_url(), tls(&f.pki.ca_cert, None)),
            &[
                "requires a client certificate",
                "set sinks.rabbit.tls.cert_file",
            ],
        ),
        (
            "a client certificate the broker does not trust",
            sink_config(
                &f,
                f.node.tls_url(),
                tls(&f.pki.ca_cert, Some(&f.other.client(USER))),
            ),
            &[
                "refused the relay's client certificate",
                "sinks.rabbit.tls.cert_file must be signed",
            ],
        ),
        (
            "a server name the certificate does not list",
            sink_config(
                &f,
                f.node.tls_url(),
                AmqpTls {
                    server_name: Some("rabbit.example.com".into()),
                    ..tls(&f.pki.ca_cert, Some(&f.client))
                },
            ),
            &[
                "not valid for \"rabbit.example.com\"",
                "sinks.rabbit.tls.server_name",
            ],
        ),
        (
            "amqps:// against the plaintext port",
            sink_config(
                &f,
                format!("amqps://{USER}@127.0.0.1:{}/%2f", f.node.port),
                tls(&f.pki.ca_cert, Some(&f.client)),
            ),
            &["did not answer in TLS", "amqp://"],
        ),
        (
            "amqp:// against the TLS port",
            sink_config(
                &f,
                format!("amqp://{USER}@127.0.0.1:{}/%2f", f.node.tls_port.unwrap()),
                AmqpTls::default(),
            ),
            &[
                "before the AMQP handshake",
                "use amqps:// in sinks.rabbit.url",
            ],
        ),
    ];
    for (what, config, expect) in cases {
        let e = check(&config).await.expect_err(what);
        println!("{what}: {e}");
        for needle in expect {
            assert!(e.contains(needle), "{what}: {needle:?} missing from: {e}");
        }
        assert!(!e.contains(&f.password), "{what}: the password leaked: {e}");
    }

    // The certificate names 127.0.0.1 and localhost: tls.server_name picks the name to check
    // when the URL's host is another one.
    let renamed = sink_config(
        &f,
        format!("amqps://{USER}@localhost:{}/%2f", f.node.tls_port.unwrap()),
        AmqpTls {
            server_name: Some("127.0.0.1".into()),
            ..tls(&f.pki.ca_cert, Some(&f.client))
        },
    );
    check(&renamed)
        .await
        .expect("tls.server_name names a name of the certificate");
}
