//! `outbox-relay topics pause|resume|list`, `outbox-relay replay` and `outbox-relay audit`
//! against a real database, a real relay and NATS (docs/operations.md, "Operator actions").

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;

/// Runs the CLI on `db` with stdin closed (not a terminal).
fn cli(db: &TestDb, args: &[&str]) -> Output {
    Command::new(relay_bin())
        .args(args)
        .env("OUTBOX_DATABASE__URL", &db.url)
        .env("RUST_LOG", "warn")
        .env("USER", "test-operator")
        .stdin(Stdio::null())
        .output()
        .expect("run outbox-relay")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Enqueues `n` rows of `topic` under `key`, payloads `<key>-<i>`, in one transaction.
async fn enqueue_rows(db: &TestDb, topic: &str, key: &str, n: usize) {
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| format!("{key}-{i}").into_bytes()).collect();
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT $1, $2, p FROM unnest($3::bytea[]) WITH ORDINALITY AS u(p, i) ORDER BY i",
    )
    .bind(topic)
    .bind(key)
    .bind(&payloads)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn waiting_of(db: &TestDb, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE topic = $1")
        .bind(topic)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn with_http(config: String, port: u16) -> String {
    config.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_topic_waits_while_others_flow_and_drains_when_resumed() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let port = free_port();
    let relay = RelayProcess::start(&with_http(
        nats_config(&db.url, &nats_url(), &stream, &prefix, ""),
        port,
    ));

    let out = cli(
        &db,
        &["topics", "pause", "held", "--reason", "consumer migration"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paused"), "{}", stdout(&out));
    let again = json(&cli(&db, &["topics", "pause", "held", "--json"]));
    assert_eq!(again["paused"], false, "a second pause changes nothing");
    wait_until(
        Duration::from_secs(30),
        "the relay reports the pause",
        || async {
            http::scrape_metric(port, "outbox_topic_paused", &[("topic", "held")]).await == 1.0
        },
    )
    .await;

    // The paused topic's rows are enqueued first: a relay that ignored the pause would claim
    // them in the same batches as the others.
    enqueue_rows(&db, "held", "k-held", 20).await;
    enqueue_rows(&db, "flowing", "k-flowing", 20).await;
    let got = consumer.collect(20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20, "relay stderr:\n{}", relay.stderr());
    assert!(
        got.iter().all(|m| m.subject == format!("{prefix}.flowing")),
        "only the flowing topic is published: {:?}",
        got.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    wait_until(Duration::from_secs(30), "flowing drained", || async {
        waiting_of(&db, "flowing").await == 0
    })
    .await;
    assert_eq!(waiting_of(&db, "held").await, 20, "the paused topic waits");

    let status = json(&cli(&db, &["status", "--json"]));
    let held = status["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "held")
        .unwrap_or_else(|| panic!("held in status: {status}"));
    assert_eq!(held["paused"], true);
    assert_eq!(held["waiting"], 20);
    assert_eq!(status["paused_topics"][0]["reason"], "consumer migration");
    let table = stdout(&cli(&db, &["status"]));
    assert!(table.contains("PAUSED"), "{table}");
    let list = json(&cli(&db, &["topics", "list", "--json"]));
    assert_eq!(list[0]["topic"], "held");
    assert!(
        list[0]["paused_by"]
            .as_str()
            .unwrap()
            .starts_with("test-operator@"),
        "{list}"
    );

    let out = cli(&db, &["topics", "resume", "held"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = consumer.collect(20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20, "relay stderr:\n{}", relay.stderr());
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("k-held-{i}")).collect();
    assert_eq!(payloads, expected, "resumed in key order");
    wait_until(
        Duration::from_secs(30),
        "the relay drops the paused series",
        || async {
            http::scrape_metric(port, "outbox_topic_paused", &[("topic", "held")]).await == 0.0
        },
    )
    .await;

    let out = cli(&db, &["topics", "resume", "held"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not paused"), "{}", stderr(&out));

    let audit = json(&cli(&db, &["audit", "--json"]));
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["topics.resume", "topics.pause"], "{audit}");
    assert_eq!(audit[1]["target"]["reason"], "consumer migration");
    assert_eq!(audit[1]["via"], "cli");
    consumer.delete_stream().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_publishes_kept_rows_again_under_new_ids_in_key_order() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let relay = RelayProcess::start(&nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "retention_secs = 3600",
    ));
    enqueue_rows(&db, "orders", "k1", 3).await;
    enqueue_rows(&db, "orders", "k2", 2).await;
    let first = consumer.collect(5, Duration::from_secs(30)).await;
    assert_eq!(first.len(), 5, "relay stderr:\n{}", relay.stderr());
    wait_until(Duration::from_secs(30), "rows kept as sent", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.sent")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 5
    })
    .await;

    // Bad selections are refused with what to pass.
    let out = cli(&db, &["replay", "--topic", "orders"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
    let out = cli(&db, &["replay", "--from-id", "9", "--to-id", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
    let out = cli(&db, &["replay", "--key", "nobody"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no sent rows match"),
        "{}",
        stdout(&out)
    );

    let dry = json(&cli(&db, &["replay", "--key", "k1", "--dry-run", "--json"]));
    assert_eq!(dry["would_replay"].as_array().unwrap().len(), 3);
    assert_eq!(db.waiting().await, 0, "a dry run changes nothing");
    let out = cli(&db, &["replay", "--key", "k1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));

    let done = json(&cli(&db, &["replay", "--key", "k1", "--yes", "--json"]));
    assert_eq!(done["replayed"], 3);
    let again = consumer.collect(3, Duration::from_secs(30)).await;
    assert_eq!(again.len(), 3, "relay stderr:\n{}", relay.stderr());
    let originals: Vec<&Received> = first
        .iter()
        .filter(|m| String::from_utf8_lossy(&m.payload).starts_with("k1-"))
        .collect();
    assert_eq!(originals.len(), 3);
    for (i, (new, old)) in again.iter().zip(&originals).enumerate() {
        assert_eq!(new.payload, format!("k1-{i}").into_bytes(), "key order");
        assert_eq!(new.payload, old.payload);
        assert_ne!(new.msg_id, old.msg_id, "a replay is a new message");
        assert_eq!(
            new.headers.get("outbox-replay-of"),
            Some(&old.msg_id),
            "the original id travels in a header"
        );
    }

    let audit = json(&cli(&db, &["audit", "--json"]));
    assert_eq!(audit[0]["action"], "replay", "{audit}");
    assert_eq!(audit[0]["affected"], 3);
    assert_eq!(audit[0]["target"]["key"], "k1");
    consumer.delete_stream().await;
}
