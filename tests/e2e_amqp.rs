//! End to end through RabbitMQ: the client crate or the SQL function enqueues, the real
//! `outbox-relay` binary publishes with the AMQP sink, an independent lapin consumer checks what
//! arrived. Each test has its own database, exchange and queues (deleted at the end); the broker
//! restart test runs its own RabbitMQ node.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use outbox_client::{enqueue, Message};
use support::amqp::*;
use support::*;

async fn message_ids(db: &TestDb, topic_like: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT message_id FROM outbox.messages WHERE topic LIKE $1 ORDER BY id")
        .bind(topic_like)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Guarantee (docs/sinks/amqp.md): payload bytes, headers, `message_id` and the key arrive exactly as enqueued,
/// with persistent delivery mode, content type and timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_delivers_exact_bytes_headers_message_id_and_key() {
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&amqp_url(), &exchange).await;
    topo.bind_queue(&queue, "#").await;

    // Through the client crate: bytes that are not UTF-8, a key, headers.
    let payload: Vec<u8> = (0..=255u8).rev().collect();
    let mut tx = db.pool.begin().await.unwrap();
    let e1 = enqueue(
        &mut tx,
        &Message::bytes("order.paid", payload.clone())
            .key("order-7")
            .header("trace-id", "abc")
            .header("x-n", "1"),
    )
    .await
    .unwrap();
    // JSON sets content-type, which becomes the AMQP content type.
    let e3 = enqueue(
        &mut tx,
        &Message::json("order.noted", &serde_json::json!({"n": 3})).unwrap(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // Through the SQL function, as a service in another language would.
    let (mid2,): (String,) = sqlx::query_as(
        "SELECT message_id FROM outbox.enqueue('order.shipped', '{\"a\":1}', 'order-7', '{\"h\":\"v\"}', 'my-id-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(mid2, "my-id-1");

    let relay = RelayProcess::start(&amqp_config(&db.url, &amqp_url(), &exchange, "", "", ""));
    let mut consumer = AmqpConsumer::new(&amqp_url(), &queue).await;
    let got = consumer.collect(3, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 3, "relay stderr:\n{}", relay.stderr());
    // The start-up log names the broker, what it declares and the routes, once.
    assert_eq!(
        outbox_testkit::relay::log_lines(&relay.stderr(), "INFO", &["RabbitMQ sink", "routes="]),
        1,
        "{}",
        relay.stderr()
    );
    let by_id: BTreeMap<_, _> = got
        .iter()
        .map(|r| (r.message_id.clone().unwrap_or_default(), r))
        .collect();

    let m1 = by_id[&e1.message_id];
    assert_eq!(m1.exchange, exchange);
    assert_eq!(m1.routing_key, "order.paid");
    assert_eq!(m1.payload, payload);
    assert_eq!(m1.delivery_mode, Some(2), "persistent");
    assert!(
        m1.timestamp.unwrap_or(0) > 1_600_000_000,
        "timestamp set: {:?}",
        m1.timestamp
    );
    assert_eq!(m1.content_type, None);
    assert_eq!(m1.headers["trace-id"], "abc");
    assert_eq!(m1.headers["x-n"], "1");
    assert_eq!(m1.headers["outbox-key"], "order-7");
    assert_eq!(m1.headers["outbox-message-id"], e1.message_id);
    assert_eq!(m1.headers["outbox-topic"], "order.paid");
    assert_eq!(m1.headers.len(), 5, "no other headers: {:?}", m1.headers);

    let m2 = by_id["my-id-1"];
    assert_eq!(m2.routing_key, "order.shipped");
    assert_eq!(m2.payload, br#"{"a":1}"#);
    assert_eq!(m2.headers["h"], "v");
    assert_eq!(m2.headers["outbox-key"], "order-7");

    let m3 = by_id[&e3.message_id];
    assert_eq!(m3.payload, br#"{"n":3}"#);
    assert_eq!(m3.content_type.as_deref(), Some("application/json"));
    assert!(
        !m3.headers.contains_key("outbox-key"),
        "no key, no key header"
    );

    wait_until(Duration::from_secs(20), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    consumer.close().await;
    topo.delete().await;
}

/// Guarantee (docs/sinks/amqp.md): with `mandatory`, a message no queue is bound for is returned by the broker;
/// the relay does not mark it sent, records the error and retries it; other messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_unroutable_message_is_not_marked_sent() {
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&amqp_url(), &exchange).await;
    topo.bind_queue(&queue, "ok.#").await;

    for i in 0..5 {
        sqlx::query("SELECT * FROM outbox.enqueue('ok.t', $1::text, NULL, '{}', $2)")
            .bind(format!("ok {i}"))
            .bind(format!("ok-{i}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    sqlx::query("SELECT * FROM outbox.enqueue('lost.t', 'nobody listens', NULL, '{}', 'lost-1')")
        .execute(&db.pool)
        .await
        .unwrap();
    for i in 5..10 {
        sqlx::query("SELECT * FROM outbox.enqueue('ok.t', $1::text, NULL, '{}', $2)")
            .bind(format!("ok {i}"))
            .bind(format!("ok-{i}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }

    let relay = RelayProcess::start(&amqp_config(&db.url, &amqp_url(), &exchange, "", "", ""));
    let mut consumer = AmqpConsumer::new(&amqp_url(), &queue).await;
    let got = consumer.collect(10, Duration::from_secs(60)).await;
    let ids: BTreeSet<String> = got.iter().filter_map(|r| r.message_id.clone()).collect();
    assert_eq!(
        ids,
        (0..10).map(|i| format!("ok-{i}")).collect(),
        "relay stderr:\n{}",
        relay.stderr()
    );

    // The unroutable row stays in the outbox with its attempt and reason recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row: Option<(i32, Option<String>)> = sqlx::query_as(
            "SELECT attempts, last_error FROM outbox.messages WHERE message_id = 'lost-1'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if matches!(&row, Some((a, Some(e))) if *a >= 1 && e.contains("unroutable")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unroutable row did not record its failure in 30s: {row:?}; relay stderr:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting: Vec<String> = sqlx::query_scalar("SELECT message_id FROM outbox.messages")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        waiting,
        vec!["lost-1".to_string()],
        "only the unroutable row waits"
    );
    let error: String =
        sqlx::query_scalar("SELECT last_error FROM outbox.messages WHERE message_id = 'lost-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(error.starts_with("unroutable: no queue bound"), "{error}");
    assert!(
        error.contains(&exchange) && error.contains("lost.t"),
        "{error}"
    );
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        sent, 0,
        "a retriable failure is not dead-lettered on its first attempts"
    );
    // Nothing else reached the queue.
    assert!(consumer
        .collect(1, Duration::from_millis(500))
        .await
        .is_empty());

    consumer.close().await;
    topo.delete().await;
}

/// Guarantee (docs/sinks/amqp.md): 20,000 messages through 3 relay processes: none missing, none published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_20k_messages_three_relays_none_missing_none_twice() {
    const N: usize = 20_000;
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&amqp_url(), &exchange).await;
    topo.bind_queue(&queue, "#").await;

    sqlx::query(
        "SELECT e.* FROM generate_series(1, $1) AS i,
             LATERAL outbox.enqueue('bulk.' || (i % 4), convert_to(i::text, 'UTF8'), 'k' || (i % 97)) AS e",
    )
    .bind(N as i32)
    .execute(&db.pool)
    .await
    .unwrap();
    let expected: BTreeSet<String> = message_ids(&db, "bulk.%").await.into_iter().collect();
    assert_eq!(expected.len(), N);

    let mut consumer = AmqpConsumer::new(&amqp_url(), &queue).await;
    let config = amqp_config(
        &db.url,
        &amqp_url(),
        &exchange,
        "batch_size = 500\nworkers = 2",
        "",
        "",
    );
    let relays: Vec<RelayProcess> = (0..3).map(|_| RelayProcess::start(&config)).collect();

    let got = consumer.collect(N, Duration::from_secs(300)).await;
    let stderr = || {
        relays
            .iter()
            .map(|r| r.stderr())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert_eq!(
        got.len(),
        N,
        "messages arrived; relay stderr:\n{}",
        stderr()
    );
    wait_until(Duration::from_secs(30), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;

    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *counts
            .entry(r.message_id.clone().expect("message_id set"))
            .or_default() += 1;
    }
    let twice: Vec<_> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "published twice: {twice:?}");
    let received: BTreeSet<String> = counts.into_keys().collect();
    assert_eq!(received, expected, "none missing");
    // Nothing more arrives after the outbox is empty.
    assert!(
        consumer.collect(1, Duration::from_secs(1)).await.is_empty(),
        "an extra message arrived"
    );
    assert_eq!(topo.ready(&queue).await, 0);

    consumer.close().await;
    topo.delete().await;
}

/// Guarantee (docs/sinks/amqp.md): one key's messages keep their order in one queue with one relay (workers = 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_one_key_keeps_its_order_with_one_relay() {
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&amqp_url(), &exchange).await;
    topo.bind_queue(&queue, "#").await;
    let relay = RelayProcess::start(&amqp_config(
        &db.url,
        &amqp_url(),
        &exchange,
        "workers = 1\nbatch_size = 100",
        "",
        "",
    ));
    let mut consumer = AmqpConsumer::new(&amqp_url(), &queue).await;

    // Three waves while the relay runs, so the key's messages span many batches; two keys
    // interleaved.
    const PER_WAVE: i32 = 1_000;
    for wave in 0..3 {
        sqlx::query(
            "SELECT e.* FROM generate_series($1, $2) AS i,
                 LATERAL outbox.enqueue('ord.t', convert_to(i::text, 'UTF8'), CASE WHEN i % 3 = 0 THEN 'b' ELSE 'a' END) AS e
             ORDER BY i",
        )
        .bind(wave * PER_WAVE + 1)
        .bind((wave + 1) * PER_WAVE)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let total = (3 * PER_WAVE) as usize;
    let got = consumer.collect(total, Duration::from_secs(120)).await;
    assert_eq!(got.len(), total, "relay stderr:\n{}", relay.stderr());
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &got {
        let seq: i64 = String::from_utf8(r.payload.clone())
            .unwrap()
            .parse()
            .unwrap();
        per_key
            .entry(r.headers["outbox-key"].clone())
            .or_default()
            .push(seq);
    }
    for (key, seqs) in &per_key {
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, &sorted, "key {key} arrived out of order");
    }
    assert_eq!(per_key["a"].len() + per_key["b"].len(), total);

    consumer.close().await;
    topo.delete().await;
}

/// Guarantee (docs/sinks/amqp.md): the broker stopped and started again mid-run loses nothing; meanwhile the sink
/// is reported down on /readyz, its rows wait without attempts burned, and the NATS sink
/// configured beside it keeps flowing. Runs its own RabbitMQ node, never the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_restart_loses_nothing_and_nats_keeps_flowing() {
    let mut node = match RabbitNode::start().await {
        Ok(n) => n,
        Err(e) if RabbitNode::server_bin().is_err() => {
            skip::skipped(
                "amqp_broker_restart_loses_nothing_and_nats_keeps_flowing",
                &e.to_string(),
            );
            return;
        }
        Err(e) => panic!("cannot start a RabbitMQ node for this test: {e}"),
    };
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&node.url(), &exchange).await;
    topo.bind_queue(&queue, "a.#").await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut nats = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;

    let http = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[database]
url = "{db}"

[http]
listen = "{http}"

[sinks.rabbit]
kind = "amqp"
url = "{amqp}"
exchanges = [{{ name = "{exchange}", type = "topic", durable = true }}]
routes = [{{ topics = ["a.*"], exchange = "{exchange}", routing_key = "{{topic}}" }}]

[sinks.nats]
kind = "nats"
url = "{nats}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [{{ topics = ["n.*"], subject = "{prefix}.{{topic}}" }}]
"#,
        db = db.url,
        amqp = node.url(),
        nats = nats_url(),
    );
    // Keys `a0`..`a9` for the AMQP topics, `n0`..`n9` for the NATS ones: with per-key ordering a
    // NATS message whose key has earlier messages waiting for RabbitMQ would (rightly) wait too.
    let enqueue_range = |topic: &'static str, from: i32, to: i32| {
        let pool = db.pool.clone();
        async move {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT e.message_id FROM generate_series($2, $3) AS i,
                     LATERAL outbox.enqueue($1, convert_to(i::text, 'UTF8'), left($1, 1) || (i % 10)) AS e",
            )
            .bind(topic)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
            .unwrap();
            ids
        }
    };
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut phases: Vec<(&str, BTreeSet<String>)> = Vec::new();

    // Phase 1: the broker is up.
    let ids: BTreeSet<String> = enqueue_range("a.one", 1, 500).await.into_iter().collect();
    expected.extend(ids.iter().cloned());
    phases.push(("a.one", ids));
    let relay = RelayProcess::start(&config);
    wait_until(Duration::from_secs(60), "phase 1 published", || async {
        db.waiting().await == 0
    })
    .await;
    assert_eq!(
        topo.ready(&queue).await,
        500,
        "relay stderr:\n{}",
        relay.stderr()
    );

    // Phase 2: stop the broker while the relay is publishing.
    let ids: BTreeSet<String> = enqueue_range("a.two", 1, 5_000).await.into_iter().collect();
    expected.extend(ids.iter().cloned());
    phases.push(("a.two", ids));
    wait_until(
        Duration::from_secs(60),
        "phase 2 publishing started",
        || async { db.waiting().await < 5_000 },
    )
    .await;
    node.stop().await;
    wait_until(Duration::from_secs(60), "/readyz reports the AMQP sink down", || async {
        matches!(http::get(&http, "/readyz").await, Some((503, body)) if body.contains(r#""sink":"rabbit","up":false"#))
    })
    .await;

    // While it is down: more AMQP rows wait untouched, and NATS keeps flowing.
    let ids: BTreeSet<String> = enqueue_range("a.three", 1, 500).await.into_iter().collect();
    expected.extend(ids.iter().cloned());
    phases.push(("a.three", ids));
    enqueue_range("n.one", 1, 300).await;
    let nats_got = nats.collect(300, Duration::from_secs(60)).await;
    assert_eq!(
        nats_got.len(),
        300,
        "NATS kept flowing while RabbitMQ was down; relay stderr:\n{}",
        relay.stderr()
    );
    let (waiting, max_attempts): (i64, Option<i32>) = sqlx::query_as(
        "SELECT count(*), max(attempts) FROM outbox.messages WHERE topic = 'a.three'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(waiting, 500, "rows wait while the broker is down");
    assert_eq!(
        max_attempts,
        Some(0),
        "no attempts burned while the sink is unavailable"
    );
    // Phase 3: the broker is back; everything arrives.
    node.restart()
        .await
        .expect("restart the owned RabbitMQ node");
    wait_until(
        Duration::from_secs(120),
        "outbox drained after the restart",
        || async { db.waiting().await == 0 },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "/readyz reports ready again",
        || async { matches!(http::get(&http, "/readyz").await, Some((200, _))) },
    )
    .await;
    // Count before consuming: a consumer would take messages out of the ready count.
    let ready = topo_ready_after_restart(&node.url(), &queue).await;
    let mut consumer = AmqpConsumer::new(&node.url(), &queue).await;
    let got = consumer
        .collect(ready as usize, Duration::from_secs(60))
        .await;
    let received: BTreeSet<String> = got.iter().filter_map(|r| r.message_id.clone()).collect();
    let missing: Vec<_> = expected.difference(&received).collect();
    let per_phase: Vec<String> = phases
        .iter()
        .map(|(name, ids)| format!("{name}: {} missing", ids.difference(&received).count()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost across the restart ({per_phase:?}; ready {ready}, got {}); first: {:?}\nrelay stderr:\n{}\nnode log:\n{}",
        missing.len(),
        got.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        relay.stderr(),
        node.log_tail()
    );
    assert_eq!(
        received, expected,
        "exactly the enqueued messages (re-published ones carry the same message_id)"
    );
    let duplicates = got.len() - received.len();
    eprintln!("{} messages, {duplicates} re-published after the restart (unconfirmed when the broker stopped)", got.len());

    consumer.close().await;
    // The test's connection died with the broker; delete the topology on a fresh one.
    let mut topo2 = Topology::new(&node.url(), &exchange).await;
    topo2.adopt_queue(&queue);
    topo2.delete().await;
    drop(topo);
    nats.delete_stream().await;
}

async fn topo_ready_after_restart(url: &str, queue: &str) -> u32 {
    let (conn, channel) = connect(url).await;
    let n = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("the durable queue survived the restart")
        .message_count();
    let _ = conn.close(200, "done".into()).await;
    n
}

/// Guarantee (docs/sinks/amqp.md): credentials never appear in logs or errors, even at trace level, and the
/// sink is reported down with the broker's reason (ACCESS_REFUSED) and what to check when they
/// are wrong, on /readyz and in the relay's log. The URL comes from the
/// environment (`OUTBOX_SINKS__<NAME>__URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_credentials_from_env_never_logged() {
    let db = TestDb::new().await;
    let secret = unique("pw");
    let http = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[database]
url = "{db}"

[http]
listen = "{http}"

[sinks.rabbit]
kind = "amqp"
routes = [{{ topics = ["*"], exchange = "amq.topic", routing_key = "{{topic}}" }}]
exchanges = []
"#,
        db = db.url
    );
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_password(Some(&secret)).unwrap();
    let relay = RelayProcess::start_with_env(
        &config,
        &[
            ("OUTBOX_SINKS__RABBIT__URL", url.as_str()),
            ("RUST_LOG", "trace,sqlx=info,hyper=info,h2=info"),
        ],
    );
    let last = std::sync::Mutex::new(String::new());
    wait_until(Duration::from_secs(60), "/readyz reports the sink down with the broker's reason", || async {
        let got = http::get(&http, "/readyz").await;
        if let Some((503, b)) = &got {
            *last.lock().unwrap() = b.clone();
        }
        matches!(&got, Some((503, b)) if b.contains(r#""sink":"rabbit","up":false"#) && b.contains("ACCESS_REFUSED"))
    })
    .await;
    let body = last.into_inner().unwrap();
    let stderr = relay.stderr();
    assert!(
        stderr.contains("amqp://guest:***@127.0.0.1"),
        "the redacted URL is logged:\n{stderr}"
    );
    assert!(stderr.contains("TRACE"), "the relay ran at trace level");
    // The refusal is named with what to check, on /readyz and in the relay's own warning.
    assert!(
        body.contains("the broker refused the login: check the user and password"),
        "{body}"
    );
    assert!(
        stderr.lines().any(|l| l.contains("WARN")
            && l.contains("ACCESS_REFUSED")
            && l.contains("amqp://guest:***@127.0.0.1")
            && l.contains("check the user and password")),
        "the relay's log names the refusal:\n{stderr}"
    );
    assert!(
        !stderr.contains(&secret),
        "the password leaked into the logs"
    );
    // lapin's trace logs print frames with byte strings as lists of numbers.
    let as_numbers = secret
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        !stderr.contains(&as_numbers),
        "the password leaked into the logs as bytes"
    );
    assert!(
        !body.contains(&secret),
        "the password leaked into /readyz: {body}"
    );
}

/// Guarantee (docs/sinks/amqp.md): an exchange the relay does not declare must exist; until it
/// does the sink is down (with the reason on /readyz) and its rows wait untouched; once it is
/// created the rows flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_missing_exchange_keeps_the_sink_down_until_created() {
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let http = format!("127.0.0.1:{}", free_port());
    let config = format!(
        r#"
[database]
url = "{db}"

[http]
listen = "{http}"

[sinks.rabbit]
kind = "amqp"
url = "{amqp}"
exchanges = []
routes = [{{ topics = ["*"], exchange = "{exchange}", routing_key = "{{topic}}" }}]
reconnect_max_secs = 1
"#,
        db = db.url,
        amqp = amqp_url(),
    );
    sqlx::query("SELECT * FROM outbox.enqueue('m.t', 'x', NULL, '{}', 'm-1')")
        .execute(&db.pool)
        .await
        .unwrap();
    let relay = RelayProcess::start(&config);
    wait_until(Duration::from_secs(60), "/readyz names the missing exchange", || async {
        matches!(http::get(&http, "/readyz").await, Some((503, body))
            if body.contains("is not usable") && body.contains("NOT_FOUND") && body.contains(&exchange))
    })
    .await;
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM outbox.messages WHERE message_id = 'm-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "no attempt counted while the sink is down");

    let mut topo = Topology::new(&amqp_url(), &exchange).await;
    topo.bind_queue(&queue, "#").await;
    let mut consumer = AmqpConsumer::new(&amqp_url(), &queue).await;
    let got = consumer.collect(1, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1, "relay stderr:\n{}", relay.stderr());
    assert_eq!(got[0].message_id.as_deref(), Some("m-1"));
    wait_until(Duration::from_secs(30), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;

    consumer.close().await;
    topo.delete().await;
}

/// Guarantee (docs/sinks/amqp.md): returned messages are credited to the right rows, even when
/// the broker's acks cover many messages at once and returns arrive before earlier messages'
/// acks: in large batches with unroutable messages spread among routable ones, exactly the
/// unroutable rows stay in the outbox and every routable one arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_returned_messages_are_credited_to_the_right_rows() {
    const N: i32 = 3_000;
    let db = TestDb::new().await;
    let (exchange, queue) = (unique("ex"), unique("q"));
    let mut topo = Topology::new(&amqp_url(), &exchange).await;
    topo.bind_queue(&queue, "ok.#").await;
    // Every 7th message is unroutable.
    let ids: Vec<(String, String)> = sqlx::query_as(
        "SELECT e.message_id, t FROM generate_series(1, $1) AS i,
             LATERAL (SELECT CASE WHEN i % 7 = 0 THEN 'lost.t' ELSE 'ok.t' END AS t) AS tt,
             LATERAL outbox.enqueue(tt.t, convert_to(i::text, 'UTF8')) AS e",
    )
    .bind(N)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let lost: BTreeSet<String> = ids
        .iter()
        .filter(|(_, t)| t == "lost.t")
        .map(|(id, _)| id.clone())
        .collect();
    let ok: BTreeSet<String> = ids
        .iter()
        .filter(|(_, t)| t == "ok.t")
        .map(|(id, _)| id.clone())
        .collect();

    let relay = RelayProcess::start(&amqp_config(
        &db.url,
        &amqp_url(),
        &exchange,
        "batch_size = 1000\nworkers = 2\nretry_initial_ms = 60000\nretry_max_secs = 60",
        "",
        "",
    ));
    let mut consumer = AmqpConsumer::new(&amqp_url(), &queue).await;
    let got = consumer.collect(ok.len(), Duration::from_secs(120)).await;
    wait_until(Duration::from_secs(60), "every unroutable row records its failure", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox.messages WHERE attempts >= 1 AND last_error LIKE 'unroutable%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n >= lost.len() as i64
    })
    .await;
    let waiting: BTreeSet<String> = sqlx::query_scalar("SELECT message_id FROM outbox.messages")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        waiting,
        lost,
        "exactly the unroutable rows wait; relay stderr:\n{}",
        relay.stderr()
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *counts
            .entry(r.message_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    assert!(
        consumer.collect(1, Duration::from_secs(1)).await.is_empty(),
        "an extra message arrived"
    );
    assert!(
        counts.values().all(|c| *c == 1),
        "a routable message was published twice"
    );
    assert_eq!(
        counts.into_keys().collect::<BTreeSet<_>>(),
        ok,
        "every routable message arrived"
    );

    consumer.close().await;
    topo.delete().await;
}
