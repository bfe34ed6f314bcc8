//! End to end through Kafka: the client crate or the SQL function enqueues, the real
//! `outbox-relay` binary publishes to a `tansu` broker the test owns (a Kafka-protocol broker on
//! a free port), an independent rdkafka consumer checks what arrived. Fault injection that a
//! real broker cannot do on demand (authorisation failures, leader changes) uses librdkafka's
//! mock cluster against the sink itself.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::Utc;
use outbox_client::{enqueue, Message};
use outbox_relay::sinks::kafka::{KafkaConfig, KafkaRoute, KafkaSink};
use outbox_relay::sinks::{Envelope, ErrorKind, OutboxRow, Outcome, Sink};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::kafka::*;
use support::*;

/// Payload bytes, key, headers and the idempotency key arrive exactly as enqueued; the
/// outbox key is the Kafka message key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_delivers_exact_bytes_key_headers_and_id() {
    let Some(broker) = TansuBroker::start(Storage::Memory).await else {
        return;
    };
    let db = TestDb::new().await;
    let prefix = unique("t");
    let (paid, shipped) = (
        format!("{prefix}-order.paid"),
        format!("{prefix}-order.shipped"),
    );
    broker.create_topic(&paid, 3).await;
    broker.create_topic(&shipped, 1).await;

    // Through the client crate: arbitrary bytes (not UTF-8), a key, headers.
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
    tx.commit().await.unwrap();
    // Through the SQL function, as a service in another language would; no key.
    sqlx::query("SELECT * FROM outbox.enqueue('order.shipped', '{\"a\":1}', NULL, '{\"h\":\"v\"}', 'my-id-1')")
        .execute(&db.pool)
        .await
        .unwrap();

    let relay = RelayProcess::start(&kafka_config(
        &db.url,
        &broker.brokers(),
        &format!("{prefix}-{{topic}}"),
        "",
        "",
    ));
    let reader = KafkaReader::new(&broker.brokers(), &[(&paid, 3), (&shipped, 1)]);
    let got = reader.collect(2, Duration::from_secs(60)).await;
    assert_eq!(
        got.len(),
        2,
        "relay stderr:\n{}\ntansu log:\n{}",
        relay.stderr(),
        broker.log()
    );
    let by_id: BTreeMap<_, _> = got.iter().map(|r| (r.message_id(), r)).collect();

    let m1 = by_id[&e1.message_id];
    assert_eq!(m1.topic, paid);
    assert_eq!(m1.payload, payload);
    assert_eq!(m1.key.as_deref(), Some(&b"order-7"[..]));
    assert_eq!(m1.headers["trace-id"], "abc");
    assert_eq!(m1.headers["x-n"], "1");
    assert_eq!(m1.headers["outbox-message-id"], e1.message_id);
    assert_eq!(m1.headers["outbox-key"], "order-7");
    assert_eq!(m1.headers["outbox-topic"], "order.paid");
    assert_eq!(m1.headers.len(), 5, "{:?}", m1.headers);

    let m2 = by_id["my-id-1"];
    assert_eq!(m2.topic, shipped);
    assert_eq!(m2.payload, br#"{"a":1}"#);
    assert_eq!(m2.key, None);
    assert_eq!(m2.headers["h"], "v");
    assert!(!m2.headers.contains_key("outbox-key"));

    wait_until(Duration::from_secs(10), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
}

/// 10,000 messages over 100 keys: each key's messages land in one partition, in enqueue order.
/// (One worker: with several workers, two batches of one key may be produced concurrently.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_10k_messages_100_keys_keep_enqueue_order_per_partition() {
    let Some(broker) = TansuBroker::start(Storage::Memory).await else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("ordered");
    broker.create_topic(&topic, 4).await;
    const N: i64 = 10_000;
    // One statement, evaluated in series order: ids (enqueue order) ascend with n.
    sqlx::query(
        "SELECT outbox.enqueue('orders', n::text, 'key-' || (n % 100)) FROM generate_series(1, $1) AS n ORDER BY n",
    )
    .bind(N)
    .execute(&db.pool)
    .await
    .unwrap();

    let relay = RelayProcess::start(&kafka_config(
        &db.url,
        &broker.brokers(),
        &topic,
        "workers = 1",
        "",
    ));
    let reader = KafkaReader::new(&broker.brokers(), &[(&topic, 4)]);
    let got = reader.collect(N as usize, Duration::from_secs(180)).await;
    assert_eq!(got.len(), N as usize, "relay stderr:\n{}", relay.stderr());
    // The start-up log names the brokers and the routes, once.
    assert_eq!(
        outbox_testkit::relay::log_lines(&relay.stderr(), "INFO", &["Kafka sink", "routes="]),
        1,
        "{}",
        relay.stderr()
    );

    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = BTreeSet::new();
    for m in &got {
        let key = m.key_str();
        let n: i64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        assert_eq!(
            key,
            format!("key-{}", n % 100),
            "key travels with its message"
        );
        let p = *partition_of.entry(key.clone()).or_insert(m.partition);
        assert_eq!(
            p, m.partition,
            "all of {key}'s messages are in one partition"
        );
        // The consumer reads each partition in offset order: the enqueue order must match.
        if let Some(prev) = last.insert(key.clone(), n) {
            assert!(n > prev, "{key}: message {n} arrived after {prev}");
        }
        assert!(seen.insert(n), "message {n} arrived twice");
    }
    assert_eq!(seen.len(), N as usize);
    assert_eq!(partition_of.len(), 100);
    assert!(
        partition_of.values().collect::<BTreeSet<_>>().len() > 1,
        "keys spread over partitions"
    );
    wait_until(Duration::from_secs(20), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
}

/// The broker is killed (SIGKILL) while rows are flowing, then restarted on the same data:
/// every message arrives (re-publishes carry the same outbox-message-id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_killed_and_restarted_loses_nothing() {
    let Some(mut broker) = TansuBroker::start(Storage::Sqlite).await else {
        return;
    };
    let db = TestDb::new().await;
    let topic = unique("restart");
    broker.create_topic(&topic, 2).await;
    let relay = RelayProcess::start(&kafka_config(
        &db.url,
        &broker.brokers(),
        &topic,
        "workers = 1\nbatch_size = 200",
        "message_timeout_ms = 3000\ncheck_timeout_ms = 1000",
    ));

    // An enqueuer that keeps rows coming while the broker goes away and comes back.
    const CHUNKS: i64 = 60;
    const PER_CHUNK: i64 = 100;
    let pool = db.pool.clone();
    let (chunks_done_tx, chunks_done) = tokio::sync::watch::channel(0i64);
    let enqueuer = tokio::spawn(async move {
        for c in 0..CHUNKS {
            sqlx::query(
                "SELECT outbox.enqueue('restart', n::text, 'k' || (n % 10)) FROM generate_series($1, $2) AS n ORDER BY n",
            )
            .bind(c * PER_CHUNK)
            .bind(c * PER_CHUNK + PER_CHUNK - 1)
            .execute(&pool)
            .await
            .unwrap();
            chunks_done_tx.send_replace(c + 1);
            tokio::time::sleep(Duration::from_millis(25)).await; // pacing, not synchronisation
        }
    });

    // Kill the broker once a third of the rows went through.
    let delivered = || async {
        let enqueued = *chunks_done.borrow() * PER_CHUNK;
        enqueued - db.waiting().await
    };
    wait_until(
        Duration::from_secs(60),
        "a third of the rows delivered",
        || async { delivered().await >= CHUNKS * PER_CHUNK / 3 },
    )
    .await;
    broker.kill();
    // While it is down rows accumulate; restart once the enqueuer has finished.
    enqueuer.await.unwrap();
    assert!(db.waiting().await > 0, "rows wait while the broker is down");
    broker.restart().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while db.waiting().await > 0 {
        if tokio::time::Instant::now() >= deadline {
            let stderr = relay.stderr();
            let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
            let heads: Vec<(Option<String>, i32, Option<String>, f64)> = sqlx::query_as(
                "SELECT DISTINCT ON (key) key, attempts, last_error,
                        extract(epoch FROM available_at - now())::float8
                   FROM outbox.messages ORDER BY key, id",
            )
            .fetch_all(&db.pool)
            .await
            .unwrap();
            panic!(
                "outbox not drained 120 s after the broker came back: {} rows waiting\nthe oldest row of each key (key, attempts, last error, due in s): {heads:#?}\nrelay stderr (last lines, newest first):\n{}\ntansu log (tail):\n{}",
                db.waiting().await,
                tail.join("\n"),
                broker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broker outage is the sink's failure, never a message's: nothing was dead-lettered.
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "relay stderr:\n{}", relay.stderr());
    let reader = KafkaReader::new(&broker.brokers(), &[(&topic, 2)]);
    let total = (CHUNKS * PER_CHUNK) as usize;
    let mut ids = BTreeSet::new();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ids.len() < total && tokio::time::Instant::now() < deadline {
        for m in reader.collect(1, Duration::from_secs(5)).await {
            ids.insert(
                std::str::from_utf8(&m.payload)
                    .unwrap()
                    .parse::<i64>()
                    .unwrap(),
            );
            got.push(m);
        }
    }
    let missing: Vec<i64> = (0..CHUNKS * PER_CHUNK)
        .filter(|n| !ids.contains(n))
        .take(20)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {total} messages lost, e.g. {missing:?}\nrelay stderr:\n{}",
        total - ids.len(),
        relay.stderr()
    );
    // A message published twice (its report was lost with the broker) carries the same id.
    let mut id_of: HashMap<Vec<u8>, String> = HashMap::new();
    for m in &got {
        let prev = id_of
            .entry(m.payload.clone())
            .or_insert_with(|| m.message_id());
        assert_eq!(
            *prev,
            m.message_id(),
            "a re-published row keeps its outbox-message-id"
        );
    }
}

/// An oversized message and a message for a topic that does not exist are dead-lettered with a
/// clear reason; the rows of the same key around them are delivered, in enqueue order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_oversized_or_unknown_topic_row_fails_alone() {
    let Some(broker) = TansuBroker::start(Storage::Memory).await else {
        return;
    };
    let db = TestDb::new().await;
    let prefix = unique("t");
    let good = format!("{prefix}-good");
    broker.create_topic(&good, 2).await;

    let mut messages = Vec::new();
    for i in 0..3 {
        messages.push(Message::bytes("good", format!("before-{i}")).key("k"));
    }
    // librdkafka's default message.max.bytes is 1,000,000.
    messages.push(Message::bytes("good", vec![7u8; 2_000_000]).key("k"));
    messages.push(Message::bytes("missing", "nowhere").key("k"));
    for i in 0..3 {
        messages.push(Message::bytes("good", format!("after-{i}")).key("k"));
    }
    let enqueued = outbox_client::enqueue_many(&mut db.pool.acquire().await.unwrap(), &messages)
        .await
        .unwrap();
    let (big_id, missing_id) = (
        enqueued[3].message_id.clone(),
        enqueued[4].message_id.clone(),
    );

    let relay = RelayProcess::start(&kafka_config(
        &db.url,
        &broker.brokers(),
        &format!("{prefix}-{{topic}}"),
        "",
        "",
    ));
    let reader = KafkaReader::new(&broker.brokers(), &[(&good, 2)]);
    let got = reader.collect(6, Duration::from_secs(60)).await;
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    // In enqueue order: ordering is on (the default), and a dead-lettered row releases its key
    // (docs/ordering.md, O1 and O3), so the rows after the two bad ones follow the rows before.
    assert_eq!(
        payloads,
        ["before-0", "before-1", "before-2", "after-0", "after-1", "after-2"],
        "relay stderr:\n{}",
        relay.stderr()
    );

    wait_until(
        Duration::from_secs(60),
        "both bad rows dead-lettered",
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.dead_letters")
                .fetch_one(&db.pool)
                .await
                .unwrap()
                == 2
        },
    )
    .await;
    let errors: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT message_id, last_error FROM outbox.dead_letters",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(
        errors[&big_id].contains("message too large"),
        "{}",
        errors[&big_id]
    );
    assert!(
        errors[&big_id].contains("message.max.bytes"),
        "{}",
        errors[&big_id]
    );
    assert!(
        errors[&missing_id].contains("does not exist"),
        "{}",
        errors[&missing_id]
    );
    assert_eq!(db.waiting().await, 0);
    // Nothing extra arrived (e.g. the big one after all).
    assert!(reader.collect(1, Duration::from_secs(2)).await.is_empty());
}

fn row(n: i64) -> OutboxRow {
    OutboxRow {
        id: n,
        message_id: format!("mock-{n}"),
        topic: "mock".into(),
        key: Some("k".into()),
        payload: n.to_string().into_bytes(),
        headers: BTreeMap::new(),
        created_at: Utc::now(),
        attempts: 0,
    }
}

async fn publish_one(sink: &KafkaSink, n: i64) -> Outcome {
    publish_via(sink, n, 0).await
}

async fn publish_via(sink: &KafkaSink, n: i64, route: usize) -> Outcome {
    let r = row(n);
    let mut out = sink.publish(&[Envelope { row: &r, route }]).await;
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn failure(outcome: Outcome) -> (ErrorKind, &'static str, String) {
    match outcome {
        Outcome::Failed(e) => (e.kind, e.error_type, e.message),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A topic the broker does not have is refused at once (the sink asks for its metadata
/// instead of letting librdkafka hold the message for `topic.metadata.propagation.max.ms`):
/// retriable while it has been missing for less than that (it may have been created moments
/// ago), permanent after; once created it is produced to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_refuses_a_missing_topic_at_once_and_takes_it_once_created() {
    let Some(broker) = TansuBroker::start(Storage::Memory).await else {
        return;
    };
    let (late, gone) = (unique("late"), unique("gone"));
    let grace = Duration::from_millis(2_000);
    let config = KafkaConfig {
        brokers: broker.brokers(),
        routes: [&late, &gone]
            .map(|t| KafkaRoute {
                topics: vec!["*".into()],
                topic: t.clone(),
            })
            .into(),
        librdkafka: [(
            "topic.metadata.propagation.max.ms".to_string(),
            grace.as_millis().to_string(),
        )]
        .into(),
        ..KafkaConfig::default()
    };
    config.validate().unwrap();
    let sink = KafkaSink::new("tansu", config).unwrap();

    // Created after the first refusal: retried, then delivered.
    let started = std::time::Instant::now();
    let (kind, error_type, message) = failure(publish_via(&sink, 1, 0).await);
    assert!(
        started.elapsed() < grace,
        "refused after {:?}",
        started.elapsed()
    );
    assert_eq!((kind, error_type), (ErrorKind::Retriable, "unknown_topic"));
    assert!(message.contains(&late), "{message}");
    broker.create_topic(&late, 1).await;
    assert_eq!(publish_via(&sink, 1, 0).await, Outcome::Delivered);

    // Never created: retriable, then permanent once missing for the grace period.
    let first = std::time::Instant::now();
    assert_eq!(
        failure(publish_via(&sink, 2, 1).await).0,
        ErrorKind::Retriable
    );
    wait_until(
        Duration::from_secs(20),
        "a topic missing for the grace period is refused for good",
        || async { failure(publish_via(&sink, 2, 1).await).0 == ErrorKind::Permanent },
    )
    .await;
    assert!(
        first.elapsed() >= grace,
        "permanent after {:?}",
        first.elapsed()
    );
    let (_, error_type, message) = failure(publish_via(&sink, 3, 1).await);
    assert_eq!(error_type, "unknown_topic");
    assert!(
        message.contains(&gone) && message.contains("create the topic"),
        "{message}"
    );
    // The other topic is not affected.
    assert_eq!(publish_via(&sink, 4, 0).await, Outcome::Delivered);
}

/// Fault injection with librdkafka's mock cluster: broker-side rejections of one message are
/// permanent for that row; an unreachable cluster makes the sink unavailable; a transient
/// leader change is retried inside the producer and the message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_classifies_broker_errors() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("mock-topic", 1, 1).unwrap();
    let config = KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        routes: vec![KafkaRoute {
            topics: vec!["*".into()],
            topic: "mock-topic".into(),
        }],
        message_timeout_ms: 3_000,
        check_timeout_ms: 1_000,
        ..KafkaConfig::default()
    };
    config.validate().unwrap();
    let sink = KafkaSink::new("mock", config).unwrap();
    sink.check().await.unwrap();
    assert_eq!(publish_one(&sink, 1).await, Outcome::Delivered);

    // A leader change is retried by the producer itself.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
    );
    assert_eq!(publish_one(&sink, 2).await, Outcome::Delivered);

    // (Authorisation last: librdkafka remembers it for the topic until the next metadata refresh.)
    for (err, error_type) in [
        (
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            "too_large",
        ),
        (
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD,
            "invalid_record",
        ),
        (
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
            "not_authorized",
        ),
    ] {
        cluster.request_errors(RDKafkaApiKey::Produce, &[err]);
        match publish_one(&sink, 3).await {
            Outcome::Failed(e) => {
                assert_eq!(
                    (e.kind, e.error_type),
                    (ErrorKind::Permanent, error_type),
                    "{err:?}: {e}"
                );
            }
            other => panic!("{err:?}: expected a permanent failure, got {other:?}"),
        }
    }
    // A permanent failure does not poison the producer: the next message goes through.
    wait_until(
        Duration::from_secs(20),
        "producer delivers again after permanent failures",
        || async { publish_one(&sink, 4).await == Outcome::Delivered },
    )
    .await;

    // The whole cluster down: unavailable, and check() says so.
    cluster.broker_down(-1).unwrap();
    match publish_one(&sink, 5).await {
        Outcome::Failed(e) => assert_eq!(e.kind, ErrorKind::Unavailable, "{e}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(sink.check().await.unwrap_err().kind, ErrorKind::Unavailable);
    cluster.broker_up(-1).unwrap();
    wait_until(
        Duration::from_secs(20),
        "check() passes once the broker is back",
        || async { sink.check().await.is_ok() },
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "delivers once the broker is back",
        || async { publish_one(&sink, 6).await == Outcome::Delivered },
    )
    .await;
}
