//! `outbox-relay status --watch --json` as an operator's script runs it: one JSON object per
//! line, refreshed every interval, with per-topic waiting rows, oldest age, publish rate and dead
//! letters, per-sink health and the live relays (read from the relays' heartbeats).

mod support;

use std::process::Stdio;
use std::time::Duration;

use outbox_client::{enqueue_many, Message};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

fn config(db_url: &str, nats: &str, stream: &str, prefix: &str) -> String {
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
heartbeat_interval_secs = 1
relay_expiry_secs = 5
lag_interval_secs = 1

[http]
listen = ""

[sinks.nats]
kind = "nats"
url = "{nats}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [{{ topics = ["st.*"], subject = "{prefix}.{{topic}}" }}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_json_prints_one_object_per_refresh() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("ST"), unique("st"));
    let consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    // A relay that died an hour ago without removing its heartbeat: the live relay expires it.
    sqlx::query(
        "INSERT INTO outbox.relays (relay_id, hostname, pid, version, started_at, heartbeat_at, heartbeat_interval_ms)
         VALUES ('dead-relay', 'gone', 1, '0.0.0', now() - interval '2 hours', now() - interval '1 hour', 2000)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let cfg = config(&db.url, &nats_url(), &stream, &prefix);
    let relay = RelayProcess::start(&cfg);

    // Waiting rows that stay (available in an hour), a dead letter (no route), and a steady load.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut first: Vec<Message> = (0..3)
        .map(|i| Message::bytes("st.later", vec![i]).available_at(later))
        .collect();
    first.push(Message::bytes("unrouted.topic", b"x".to_vec()));
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &first)
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let batch: Vec<Message> = (0..20)
                    .map(|i| Message::bytes("st.orders", vec![i]))
                    .collect();
                enqueue_many(&mut pool.acquire().await.unwrap(), &batch)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let config_path = relay.dir.path().join("relay.toml");
    let mut child = tokio::process::Command::new(relay_bin())
        .arg("--config")
        .arg(&config_path)
        .args(["status", "--watch", "--json", "--interval", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn status --watch");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // Read lines until one shows the relay publishing; at most 60 lines (30 s).
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let ready = loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "status --watch stopped printing ({other:?}); relay stderr:\n{}",
                relay.stderr()
            ),
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        seen.push(v.clone());
        let orders = v["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == "st.orders")
            .cloned();
        let publishing = orders
            .as_ref()
            .and_then(|t| t["publish_rate_per_second"].as_f64())
            .is_some_and(|r| r > 0.0);
        if seen.len() >= 2
            && publishing
            && v["live_relays"] == 1
            && v["sinks"].as_array().is_some_and(|s| !s.is_empty())
        {
            break v;
        }
        assert!(
            seen.len() < 60,
            "no line showed the relay publishing; last: {v:#}"
        );
    };

    // Successive lines are successive samples.
    let at: Vec<chrono::DateTime<chrono::Utc>> = seen
        .iter()
        .map(|v| v["at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[1] > w[0]), "{at:?}");

    let topics: std::collections::BTreeMap<String, serde_json::Value> = ready["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["topic"].as_str().unwrap().to_string(), t.clone()))
        .collect();
    let later_topic = &topics["st.later"];
    // Scheduled an hour ahead: waiting, but not due, so not late.
    assert_eq!(later_topic["waiting"], 3);
    assert_eq!(later_topic["scheduled"], 3);
    assert_eq!(later_topic["oldest_age_seconds"].as_f64().unwrap(), 0.0);
    assert!(later_topic["oldest_due_since"].is_null());
    assert_eq!(later_topic["dead_letters"], 0);
    assert_eq!(topics["unrouted.topic"]["dead_letters"], 1);
    assert_eq!(topics["unrouted.topic"]["waiting"], 0);
    assert!(
        topics["st.orders"]["publish_rate_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(topics["st.orders"]["waiting"].is_i64());

    let sink = &ready["sinks"][0];
    assert_eq!(sink["sink"], "nats");
    assert_eq!(sink["kind"], "nats");
    assert_eq!(sink["up"], true);
    assert_eq!(sink["relays_up"], 1);
    assert_eq!(sink["relays_reporting"], 1);
    assert_eq!(
        ready["relays"].as_array().unwrap().len(),
        1,
        "the dead relay's row expired: {ready:#}"
    );
    let r = &ready["relays"][0];
    assert_eq!(r["pid"], relay.pid());
    assert!(r["heartbeat_age_seconds"].as_f64().unwrap() < 5.0);
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));

    // The one-shot table shows the same picture.
    let out = std::process::Command::new(relay_bin())
        .arg("--config")
        .arg(&config_path)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("PUBLISH/S")
            && table.contains("st.later")
            && table.contains("RELAYS: 1 live"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("nats") && l.contains(" up ")),
        "{table}"
    );

    // A relay that stops cleanly removes its heartbeat: no live relay, sinks unknown.
    stop.store(true, std::sync::atomic::Ordering::Release);
    loader.await.unwrap();
    relay.sigterm();
    let mut relay = relay;
    assert_eq!(
        relay.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        relay.stderr()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("a line after the relay stopped")
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["live_relays"] == 0 {
            assert!(v["relays"].as_array().unwrap().is_empty(), "{v:#}");
            assert!(v["sinks"].as_array().unwrap().is_empty(), "{v:#}");
            break;
        }
    }
    child.kill().await.ok();
    consumer.delete_stream().await;
}

/// A delayed row counts as scheduled until it is due, then as late from when it became due (not
/// from its enqueue); a retried row is late from its enqueue. The relay exports both in
/// `outbox_scheduled_messages` and `outbox_oldest_pending_age_seconds`. (The topics are paused
/// so that the rows stay while they are looked at.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rows_are_counted_and_age_from_when_they_became_due() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("SD"), unique("sd"));
    // Declared before the relay, so dropped after it: the stream the relay creates goes too.
    let _created = DeleteStreamOnDrop {
        url: nats_url(),
        stream: stream.clone(),
    };
    sqlx::query(
        "INSERT INTO outbox.topic_pauses (topic, paused_by)
         VALUES ('due.delayed', 'test'), ('due.retried', 'test')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox.messages (topic, payload, created_at, available_at, attempts) VALUES
           ('due.delayed', 'later', now() - interval '1 hour', now() + interval '1 hour', 0),
           ('due.delayed', 'due',   now() - interval '1 hour', now() - interval '10 seconds', 0),
           ('due.retried', 'retry', now() - interval '1 hour', now() - interval '10 seconds', 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let port = free_port();
    let config = nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "lag_interval_secs = 1",
    )
    .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    let relay = RelayProcess::start(&config);
    wait_until(Duration::from_secs(30), "lag exported", || async {
        http::scrape_metric(port, "outbox_pending_messages", &[("topic", "due.delayed")]).await
            == 2.0
    })
    .await;
    let body = http::scrape(port).await;
    let gauge = |name: &str, topic: &str| http::metric(&body, name, &[("topic", topic)]);
    assert_eq!(
        gauge("outbox_scheduled_messages", "due.delayed"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(gauge("outbox_scheduled_messages", "due.retried"), Some(0.0));
    let delayed_age = gauge("outbox_oldest_pending_age_seconds", "due.delayed").unwrap();
    assert!(
        (5.0..1800.0).contains(&delayed_age),
        "due 10 s ago, enqueued an hour ago: {delayed_age} s; relay stderr:\n{}",
        relay.stderr()
    );
    let retried_age = gauge("outbox_oldest_pending_age_seconds", "due.retried").unwrap();
    assert!(
        retried_age >= 3590.0,
        "a failing message is late from its enqueue: {retried_age} s"
    );
}
