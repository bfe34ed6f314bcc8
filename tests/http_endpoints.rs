//! The relay's HTTP server: `/metrics` after real traffic, `/healthz`, and `/readyz` following
//! the broker (a `nats-server` the test owns, stopped and started again); a relay whose NATS
//! cannot be used from the start (nothing listens on its port, or the server refuses the
//! relay's password) still serves `/healthz`, `/readyz` (503, naming the server and the cause),
//! its heartbeat and `status`, and its log says what is wrong once per change of state, with the
//! (redacted) URL, instead of once per reconnection attempt.

mod support;

use std::time::Duration;

use chrono::Utc;
use outbox_client::{enqueue_many, Message};
use outbox_testkit::relay::log_lines;
use support::*;

type Labels = Vec<(&'static str, &'static str)>;

/// guarantees.md: `/metrics` exposes the lag gauges, per-outcome and per-error counters, the
/// delivery latency and batch size histograms; `/healthz` answers 200 while the process runs;
/// `/readyz` answers 200 only while the database and the sink's broker are reachable (503
/// with the reason while NATS is down, 200 again once it is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_traffic_and_broker() {
    let db = TestDb::new().await;
    let mut nats = OwnedNats::start("").await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats.url(), &stream, &[format!("{prefix}.>")]).await;

    // 20 rows to deliver, 5 delayed by an hour (they stay pending: the lag gauges), 1 whose
    // topic no route matches (a publish error, dead-lettered).
    let mut batch: Vec<Message> = (0..20).map(|i| Message::bytes("ok.now", vec![i])).collect();
    let later = Utc::now() + chrono::Duration::hours(1);
    batch.extend((0..5).map(|i| Message::bytes("ok.later", vec![i]).available_at(later)));
    batch.push(Message::bytes("nope.unrouted", b"x".to_vec()));
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        r#"
[database]
url = "{db}"
[relay]
lag_interval_secs = 1
maintenance_interval_secs = 1
[http]
listen = "{addr}"
[sinks.nats]
kind = "nats"
url = "{nats}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [{{ topics = ["ok.*"], subject = "{prefix}.{{topic}}" }}]
"#,
        db = db.url,
        nats = nats.url()
    );
    let relay = RelayProcess::start(&config);
    http::wait_healthy(&addr, Duration::from_secs(30)).await;
    assert_eq!(
        consumer.collect(20, Duration::from_secs(30)).await.len(),
        20,
        "stderr:\n{}",
        relay.stderr()
    );

    // (sample name, labels it must carry, expected value)
    let wanted: Vec<(&str, Labels, f64)> = vec![
        ("outbox_pending_messages", vec![("topic", "ok.later")], 5.0),
        (
            "outbox_published_total",
            vec![
                ("topic", "ok.now"),
                ("sink", "nats"),
                ("outcome", "delivered"),
            ],
            20.0,
        ),
        (
            "outbox_published_total",
            vec![("topic", "nope.unrouted"), ("outcome", "dead")],
            1.0,
        ),
        (
            "outbox_publish_errors_total",
            vec![("topic", "nope.unrouted"), ("error_type", "no_route")],
            1.0,
        ),
        (
            "outbox_delivery_latency_seconds_count",
            vec![("sink", "nats")],
            20.0,
        ),
        ("outbox_dead_letters", vec![("topic", "nope.unrouted")], 1.0),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let body = loop {
        let body = http::scrape(&addr).await;
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(name, labels, v)| http::metric(&body, name, labels) != Some(*v))
            .collect();
        if missing.is_empty() {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed {missing:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let age = http::metric(
        &body,
        "outbox_oldest_pending_age_seconds",
        &[("topic", "ok.later")],
    )
    .expect("age gauge");
    assert!(age >= 0.0);
    assert!(http::metric(&body, "outbox_batch_size_count", &[]).unwrap() >= 1.0);
    assert!(
        http::metric(&body, "outbox_batch_size_sum", &[]).unwrap() >= 21.0,
        "every claimed row is counted"
    );
    assert!(body.contains("# TYPE outbox_delivery_latency_seconds histogram"));
    assert!(body.contains("# TYPE outbox_batch_size histogram"));

    assert_eq!(http::get(&addr, "/healthz").await.map(|r| r.0), Some(200));
    let (status, ready) = http::get(&addr, "/readyz").await.unwrap();
    assert_eq!(status, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["ready"], true);

    // The broker goes away while the relay is idle: not ready, with the reason; still alive.
    nats.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let last = loop {
        let r = http::get(&addr, "/readyz").await;
        if let Some((503, body)) = r {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still answers {r:?} with NATS down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(body["database"], true);
    assert_eq!(body["sinks"][0]["sink"], "nats");
    assert_eq!(body["sinks"][0]["up"], false);
    assert!(body["sinks"][0]["error"].is_string(), "{body}");
    assert_eq!(http::get(&addr, "/healthz").await.map(|r| r.0), Some(200));

    // Back again: ready again (the relay reconnects and re-creates its memory stream).
    nats.restart().await;
    wait_until(Duration::from_secs(30), "/readyz answers 200 again", || {
        let addr = addr.clone();
        async move { matches!(http::get(&addr, "/readyz").await, Some((200, _))) }
    })
    .await;
    drop(relay);
}

/// guarantees.md ("Database restart"): a relay started while its database cannot be reached
/// answers `/healthz` 200 (alive and retrying: a liveness probe must not restart it), `/readyz`
/// 503 with the reason and `outbox_database_up 0`, instead of refusing connections; once the
/// database exists it connects by itself and `/readyz` turns 200 on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_served_while_the_database_is_unreachable_at_start() {
    use sqlx::Connection as _;
    let admin_url = database_url();
    let name = unique("outbox_test");
    let mut db_url = url::Url::parse(&admin_url).unwrap();
    db_url.set_path(&format!("/{name}"));
    let (stream, prefix) = (unique("S"), unique("t"));
    let _created = DeleteStreamOnDrop {
        url: nats_url(),
        stream: stream.clone(),
    };
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = http::with_http(
        nats_config(db_url.as_str(), &nats_url(), &stream, &prefix, ""),
        port,
    );
    let mut relay = RelayProcess::start(&config);
    http::wait_healthy(&addr, Duration::from_secs(30)).await;
    match http::get(&addr, "/readyz").await {
        Some((503, body)) => assert!(body.contains("connecting to PostgreSQL"), "{body}"),
        other => panic!("/readyz while the database is missing: {other:?}"),
    }
    let metrics = http::scrape(&addr).await;
    assert_eq!(
        http::metric(&metrics, "outbox_database_up", &[]),
        Some(0.0),
        "{metrics}"
    );

    // The database appears, already migrated (a copy of a migrated template, so the relay
    // cannot connect between its creation and its migration): the relay becomes ready.
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap();
    let template = format!("{name}_tpl");
    sqlx::query(&format!("CREATE DATABASE {template}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut template_url = db_url.clone();
    template_url.set_path(&format!("/{template}"));
    let pool = sqlx::PgPool::connect(template_url.as_str()).await.unwrap();
    outbox_relay::store::migrate(&pool).await.unwrap();
    pool.close().await;
    sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {template}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut ready = None;
    while tokio::time::Instant::now() < deadline {
        ready = http::get(&addr, "/readyz").await;
        if matches!(ready, Some((200, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stderr = relay.stderr();
    relay.sigkill();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let _ = js.delete_stream(&stream).await;
    assert!(
        matches!(ready, Some((200, _))),
        "/readyz once the database exists: {ready:?}\nrelay stderr:\n{stderr}"
    );
    assert!(stderr.contains("cannot reach PostgreSQL"), "{stderr}");
    // The start-up check of the server's autovacuum (docs/operations.md, "Vacuum"): warned
    // about exactly when it is off.
    let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        stderr.contains("autovacuum is off"),
        autovacuum == "off",
        "autovacuum = {autovacuum}; relay stderr:\n{stderr}"
    );
}

/// `outbox-relay status --json` on the relay's config file.
fn status_json(relay: &RelayProcess) -> serde_json::Value {
    let out = std::process::Command::new(relay_bin())
        .arg("--config")
        .arg(relay.dir.path().join("relay.toml"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// docs/operations.md: a relay whose broker is unreachable at start is alive (`/healthz` 200,
/// so a liveness probe does not restart it), not ready (`/readyz` 503 naming the server), and
/// heartbeats, so `status` shows the sink down with the same reason. Nothing listens on the
/// NATS port for the whole test, so every answer came before the sink could connect. Its log
/// names the database and the sink (URL, stream, routes) at start, and says "cannot connect" once
/// while the connection attempts go on at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_nats_is_unreachable_at_start_serves_health_readiness_and_status() {
    let db = TestDb::new().await;
    let closed = free_port();
    let nats = format!("nats://127.0.0.1:{closed}");
    let (stream, prefix) = (unique("S"), unique("t"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = http::with_http(nats_config(&db.url, &nats, &stream, &prefix, ""), port);
    let relay = RelayProcess::start_with_env(
        &config,
        &[("RUST_LOG", "info,outbox_relay::sinks::nats=debug")],
    );

    http::wait_healthy(&addr, Duration::from_secs(30)).await;
    let (_, ready) = http::readyz_sink_down(
        &addr,
        "nats",
        &[&format!("not connected to NATS at {nats}")],
    )
    .await
    .unwrap();
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["database"], true, "{ready}");
    assert_eq!(ready["sinks"][0]["sink"], "nats", "{ready}");
    assert_eq!(ready["sinks"][0]["up"], false, "{ready}");
    assert_eq!(http::get(&addr, "/healthz").await.map(|r| r.0), Some(200));

    // The heartbeat carries the sink's health: `status` shows it down, with the reason.
    let mut status = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(30),
        "status shows the live relay and its NATS sink down",
        || {
            status = status_json(&relay);
            let s = &status;
            let ok = s["relays"].as_array().is_some_and(|r| r.len() == 1)
                && s["sinks"][0]["up"] == false
                && s["sinks"][0]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(&nats));
            async move { ok }
        },
    )
    .await;
    assert_eq!(status["relays"][0]["pid"], relay.pid(), "{status:#}");

    // Several attempts have failed: each one is a debug line, and only the first a warning.
    wait_until(
        Duration::from_secs(30),
        "three failed connection attempts logged at debug",
        || {
            let n = log_lines(
                &relay.stderr(),
                "DEBUG",
                &["NATS connection attempt", &nats],
            );
            async move { n >= 3 }
        },
    )
    .await;
    let stderr = relay.stderr();
    assert_eq!(
        log_lines(&stderr, "WARN", &["cannot connect to NATS at", &nats]),
        1,
        "one warning while the attempts go on:\n{stderr}"
    );
    assert!(
        !stderr.contains("client error"),
        "the client library's per-attempt lines are filtered out:\n{stderr}"
    );
    // Start-up: the sink with its URL, stream and routes; the database; what runs.
    assert_eq!(
        log_lines(
            &stderr,
            "INFO",
            &["NATS sink", &nats, &stream, &format!("{prefix}.{{topic}}")]
        ),
        1,
        "{stderr}"
    );
    let database = outbox_relay::redact_url(&db.url);
    assert_eq!(
        log_lines(
            &stderr,
            "INFO",
            &[
                "relay running",
                &format!("database={database}"),
                "sinks=nats"
            ]
        ),
        1,
        "{stderr}"
    );
}

/// docs/sinks/nats.md: a wrong password is named as such (the server's "authorization
/// violation", and what to check) with the redacted URL on `/readyz`, in `status` and in the
/// relay's log, never with the password; with the right one in the URL (percent-encoded where
/// it has to be), the relay connects and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_nats_password_is_named_on_readiness_status_and_in_the_log() {
    let nats = OwnedNats::start_with_user("relay", "p@ss:word").await;
    let db = TestDb::new().await;
    let wrong = unique("wrong");
    let (stream, prefix) = (unique("S"), unique("t"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = http::with_http(
        nats_config(&db.url, &nats.url_as("relay", &wrong), &stream, &prefix, ""),
        port,
    );
    let relay = RelayProcess::start(&config);
    let redacted = format!("nats://relay:***@127.0.0.1:{}", nats.port);

    let (error, ready) =
        http::readyz_sink_down(&addr, "nats", &["authorization violation", &redacted])
            .await
            .unwrap();
    assert!(error.contains("check the user and password"), "{error}");
    assert!(!ready.to_string().contains(&wrong), "{ready}");

    wait_until(
        Duration::from_secs(30),
        "status names the authorization failure",
        || {
            let status = status_json(&relay);
            let ok = status["sinks"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("authorization violation") && e.contains(&redacted));
            async move { ok }
        },
    )
    .await;
    let stderr = relay.stderr();
    assert!(
        log_lines(
            &stderr,
            "WARN",
            &[
                "refused the credentials",
                "authorization violation",
                &redacted
            ]
        ) >= 1,
        "{stderr}"
    );
    assert!(!stderr.contains(&wrong), "the password leaked:\n{stderr}");
    drop(relay);

    // The right password: the relay is ready and publishes.
    sqlx::query("SELECT * FROM outbox.enqueue('auth.t', 'x', NULL, '{}', 'auth-1')")
        .execute(&db.pool)
        .await
        .unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = http::with_http(
        nats_config(
            &db.url,
            &nats.url_as("relay", "p%40ss:word"),
            &stream,
            &prefix,
            "",
        ),
        port,
    );
    let relay = RelayProcess::start(&config);
    wait_until(
        Duration::from_secs(30),
        "published with the right password",
        || async { db.waiting().await == 0 },
    )
    .await;
    assert!(
        matches!(http::get(&addr, "/readyz").await, Some((200, _))),
        "relay stderr:\n{}",
        relay.stderr()
    );
    let stored = read_stream(&nats.jetstream().await, &stream).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, "auth-1");
}
