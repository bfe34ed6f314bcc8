//! The dashboard and the alert rules against a real Prometheus scraping a real relay under load.
//!
//! A relay (the real binary, /metrics on a free port) publishes a steady load to NATS: normal
//! topics, a topic whose subject no stream captures (retriable errors → retries → dead letters),
//! a topic with no route (permanent errors → dead letters), delayed rows (lag that stays), a
//! held-back key and a parked key (the ordering panels).
//! A Prometheus server on a free port scrapes it every second with deploy/prometheus/alerts.yml
//! loaded. Then every query of every dashboard panel and every alert expression is evaluated
//! through Prometheus's HTTP API: any error fails at once, and each must return series before
//! the deadline. Alert expressions are silent while things are healthy, so for them the test
//! requires series from each operand without its threshold (see `alert_probes`), and evaluates
//! the full expression for errors.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_client::{enqueue_many, Message};
use support::observability::*;
use support::*;

fn relay_config(db_url: &str, nats: &str, stream: &str, prefix: &str, http_port: u16) -> String {
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
lag_interval_secs = 1
maintenance_interval_secs = 1
heartbeat_interval_secs = 1
relay_expiry_secs = 5
max_attempts = 3
retry_initial_ms = 50
retry_max_secs = 1

[http]
listen = "127.0.0.1:{http_port}"

[sinks.nats]
kind = "nats"
url = "{nats}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [
  {{ topics = ["obs.*"], subject = "{prefix}.{{topic}}" }},
  # No stream captures this subject: JetStream answers "no responders", a retriable error.
  {{ topics = ["orphan.*"], subject = "nostream_{prefix}.{{topic}}" }},
]
"#
    )
}

/// Enqueues until `stop`: 40 rows every 100 ms on two routed topics, and every second two rows
/// that end as retries then dead letters and one row with no route.
async fn load(pool: sqlx::PgPool, stop: Arc<AtomicBool>) {
    let mut tick = 0u64;
    while !stop.load(Ordering::Acquire) {
        let mut batch: Vec<Message> = (0..40)
            .map(|i| {
                Message::bytes(
                    if i % 2 == 0 {
                        "obs.orders"
                    } else {
                        "obs.users"
                    },
                    format!("load {tick} {i}"),
                )
            })
            .collect();
        if tick.is_multiple_of(10) {
            batch.push(Message::bytes("orphan.audit", b"no stream".to_vec()));
            batch.push(Message::bytes("orphan.audit", b"no stream".to_vec()));
            batch.push(Message::bytes("nowhere.unrouted", b"no route".to_vec()));
        }
        let result = match pool.acquire().await {
            Ok(mut conn) => enqueue_many(&mut conn, &batch)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            eprintln!("load: enqueue failed: {e}");
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_queries_return_series_from_a_real_prometheus() {
    let test = "dashboard_and_alert_queries_return_series_from_a_real_prometheus";
    let Some(prometheus_bin) = require_tool("prometheus", "PROMETHEUS_BIN", test) else {
        return;
    };
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("OBS"), unique("obs"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let http_port = free_port();
    let relay = RelayProcess::start(&relay_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        http_port,
    ));
    let relay_addr = format!("127.0.0.1:{http_port}");

    // Rows that stay waiting (available in an hour): the lag gauges always have a topic.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let delayed: Vec<Message> = (0..5)
        .map(|i| Message::bytes("obs.delayed", vec![i]).available_at(later))
        .collect();
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &delayed)
        .await
        .unwrap();
    // A key held back by a retry (its head row failed once and waits an hour) and a parked
    // key, so that the ordering panels have series. Both are what the relay itself writes.
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload, attempts, available_at)
         VALUES ('obs.delayed', 'held-key', 'x', 1, now() + interval '1 hour')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
         VALUES ('parked-key', 'obs.delayed', 0, 'parked-message', 'parked by the test')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(load(db.pool.clone(), Arc::clone(&stop)));

    wait_until(Duration::from_secs(30), "relay serves /metrics", || {
        let addr = relay_addr.clone();
        async move { matches!(http::get(&addr, "/metrics").await, Some((200, _))) }
    })
    .await;
    let arrived = consumer.collect(40, Duration::from_secs(30)).await;
    assert_eq!(
        arrived.len(),
        40,
        "the relay publishes the load; stderr:\n{}",
        relay.stderr()
    );

    let prometheus = PrometheusServer::start(
        &prometheus_bin,
        std::slice::from_ref(&relay_addr),
        &[deploy("prometheus/alerts.yml")],
        "1s",
    )
    .await;

    // Every alerting rule Prometheus loaded from alerts.yml.
    let rules = prometheus
        .api("/api/v1/rules?type=alert")
        .await
        .expect("rules API");
    let alerts: Vec<(String, String)> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["query"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(alerts.len(), 8, "alerts.yml has 8 rules: {alerts:?}");

    // The relay variable set to All, as dashboard_queries sets the topic variable.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/dashboards/outbox-relay.json"))
            .unwrap()
            .replace("$instance", ".*"),
    )
    .unwrap();
    let mut must_have_series: Vec<(String, String)> = dashboard_queries(&dashboard, "15s")
        .into_iter()
        .map(|(title, q)| (format!("panel {title:?}"), q))
        .collect();
    let mut must_evaluate: Vec<(String, String)> = Vec::new();
    for (name, expr) in &alerts {
        must_evaluate.push((format!("alert {name}"), expr.clone()));
        let probes = alert_probes(expr);
        assert!(
            !probes.is_empty(),
            "alert {name}: nothing to probe in {expr:?}"
        );
        must_have_series.extend(
            probes
                .into_iter()
                .map(|p| (format!("alert {name} (without threshold)"), p)),
        );
    }
    // The dashboard's variable queries.
    must_have_series.push((
        "variable topic".into(),
        "group by (topic) (outbox_pending_messages)".into(),
    ));
    must_have_series.push((
        "variable instance".into(),
        "group by (instance) (up{job=\"outbox-relay\"})".into(),
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut empty = Vec::new();
        for (what, q) in must_evaluate.iter().chain(must_have_series.iter()) {
            if let Err(e) = prometheus.query(q).await {
                panic!("{what}: Prometheus rejected {q:?}: {e}");
            }
        }
        for (what, q) in &must_have_series {
            if prometheus.query(q).await.unwrap().is_empty() {
                empty.push(format!("{what}: {q}"));
            }
        }
        // Rules Prometheus has evaluated report their health.
        let rules = prometheus.api("/api/v1/rules?type=alert").await.unwrap();
        let unhealthy: Vec<String> = rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| {
                format!(
                    "alert {}: health {} {}",
                    r["name"], r["health"], r["lastError"]
                )
            })
            .collect();
        if let Some(e) = unhealthy.iter().find(|u| u.contains("health \"err\"")) {
            panic!("{e}");
        }
        if empty.is_empty() && unhealthy.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "after 120 s these queries still return no series:\n  {}\n{}\nrelay stderr:\n{}\nprometheus log:\n{}",
                empty.join("\n  "),
                unhealthy.join("\n"),
                relay.stderr(),
                prometheus.log()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The relay counts itself live in the heartbeat table, and Prometheus scraped it as up.
    let instances = prometheus
        .query("max(outbox_relay_instances)")
        .await
        .unwrap();
    assert_eq!(instances[0]["value"][1], "1", "{instances:?}");
    let up = prometheus
        .query("sum(up{job=\"outbox-relay\"})")
        .await
        .unwrap();
    assert_eq!(up[0]["value"][1], "1", "{up:?}");
    // The no-route and no-stream rows ended as dead letters, visible as the alert's input.
    let dead = prometheus
        .query("max by (topic) (outbox_dead_letters) > 0")
        .await
        .unwrap();
    let topics: Vec<&str> = dead
        .iter()
        .filter_map(|s| s["metric"]["topic"].as_str())
        .collect();
    assert!(
        topics.contains(&"nowhere.unrouted") && topics.contains(&"orphan.audit"),
        "{dead:?}"
    );

    stop.store(true, Ordering::Release);
    loader.await.unwrap();
    drop(relay);
    consumer.delete_stream().await;
}
