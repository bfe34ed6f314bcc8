//! End to end through NATS JetStream: the client crate or the SQL function enqueues, the real
//! `outbox-relay` binary publishes, an independent JetStream consumer checks what arrived.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_client::{enqueue, Message};
use support::*;

/// guarantees.md G1: payload bytes, headers, key and message id arrive exactly as enqueued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_delivers_exact_bytes_headers_key_and_id() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;

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
    // Through the SQL function, as a service in another language would.
    let (id2, mid2): (i64, String) = sqlx::query_as(
        "SELECT id, message_id FROM outbox.enqueue('order.shipped', '{\"a\":1}', 'order-7', '{\"h\":\"v\"}', 'my-id-1')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(id2 > e1.id);
    assert_eq!(mid2, "my-id-1");

    let relay = RelayProcess::start(&nats_config(&db.url, &nats_url(), &stream, &prefix, ""));
    let got = consumer.collect(2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "relay stderr:\n{}", relay.stderr());
    let by_id: BTreeMap<_, _> = got.iter().map(|r| (r.msg_id.clone(), r)).collect();

    let m1 = by_id[&e1.message_id];
    assert_eq!(m1.subject, format!("{prefix}.order.paid"));
    assert_eq!(m1.payload, payload);
    assert_eq!(m1.headers["trace-id"], "abc");
    assert_eq!(m1.headers["x-n"], "1");
    assert_eq!(m1.headers["outbox-key"], "order-7");
    assert_eq!(m1.headers["outbox-message-id"], e1.message_id);
    assert_eq!(m1.headers["outbox-topic"], "order.paid");

    let m2 = by_id["my-id-1"];
    assert_eq!(m2.subject, format!("{prefix}.order.shipped"));
    assert_eq!(m2.payload, br#"{"a":1}"#);
    assert_eq!(m2.headers["h"], "v");

    wait_until(Duration::from_secs(10), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    consumer.delete_stream().await;
}

/// guarantees.md: a rolled-back transaction leaves no outbox row and nothing is published; a
/// committed one is published. The negative check is not a timing guess: the committed
/// message was enqueued after the rolled-back ones (higher id, and the relay claims in id
/// order), it arrived, the table is empty and the stream holds exactly one message, so the
/// relay had already looked past the rolled-back rows when it published the committed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_nothing_commit_publishes() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    sqlx::query("CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let relay = RelayProcess::start(&nats_config(&db.url, &nats_url(), &stream, &prefix, ""));

    // Rolled back: a business row plus outbox rows through the client crate and the SQL function.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO users (email) VALUES ('rolled@back')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let rolled = enqueue(
        &mut tx,
        &Message::bytes("user.created", b"rolled".to_vec()).message_id("rb-client"),
    )
    .await
    .unwrap();
    let (rolled_sql,): (i64,) = sqlx::query_as(
        "SELECT id FROM outbox.enqueue('user.created', 'rolled', NULL, '{}', 'rb-sql')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    // Committed afterwards, same shape.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO users (email) VALUES ('ada@example.com')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let committed = enqueue(
        &mut tx,
        &Message::bytes("user.created", b"committed".to_vec()).message_id("c-client"),
    )
    .await
    .unwrap();
    let (committed_sql,): (i64,) = sqlx::query_as(
        "SELECT id FROM outbox.enqueue('user.created', 'committed too', NULL, '{}', 'c-sql')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(committed.id > rolled.id && committed.id > rolled_sql && committed_sql > committed.id);

    let got = consumer.collect(2, Duration::from_secs(30)).await;
    let ids: Vec<&str> = got.iter().map(|r| r.msg_id.as_str()).collect();
    assert_eq!(
        ids,
        ["c-client", "c-sql"],
        "relay stderr:\n{}",
        relay.stderr()
    );
    assert_eq!(got[0].payload, b"committed");
    wait_until(Duration::from_secs(10), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    assert_eq!(
        consumer.stored().await,
        2,
        "the stream holds the committed messages only"
    );
    assert!(consumer
        .collect(1, Duration::from_millis(300))
        .await
        .is_empty());
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(users, 1);
    consumer.delete_stream().await;
}

/// guarantees.md: enqueueing an existing message id is a no-op that returns the existing row
/// (client crate, `enqueue_many` with a duplicate inside the batch, and the SQL function), so
/// application retries never double-publish; `enqueue_many` keeps the given order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_is_idempotent_and_enqueue_many_keeps_order() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;

    // Client crate, one message twice: the second call writes nothing and returns the first row.
    let first = enqueue(
        &mut db.pool.acquire().await.unwrap(),
        &Message::bytes("idem.a", b"one".to_vec()).message_id("dup-1"),
    )
    .await
    .unwrap();
    let again = enqueue(
        &mut db.pool.acquire().await.unwrap(),
        &Message::bytes("idem.a", b"two".to_vec()).message_id("dup-1"),
    )
    .await
    .unwrap();
    assert!(first.inserted);
    assert_eq!(
        again,
        outbox_client::Enqueued {
            id: first.id,
            message_id: "dup-1".into(),
            inserted: false
        }
    );

    // SQL function, same contract.
    let sql =
        "SELECT id, message_id, inserted FROM outbox.enqueue('idem.b', 'x', NULL, '{}', 'dup-sql')";
    let s1: (i64, String, bool) = sqlx::query_as(sql).fetch_one(&db.pool).await.unwrap();
    let s2: (i64, String, bool) = sqlx::query_as(sql).fetch_one(&db.pool).await.unwrap();
    assert!(s1.2);
    assert_eq!(s2, (s1.0, "dup-sql".to_string(), false));

    // enqueue_many: one statement, order kept, a duplicate inside the batch and one of an
    // existing row.
    let batch = vec![
        Message::bytes("idem.c", b"m1".to_vec()).message_id("m-1"),
        Message::bytes("idem.c", b"m2".to_vec()).message_id("m-2"),
        Message::bytes("idem.c", b"m1 again".to_vec()).message_id("m-1"),
        Message::bytes("idem.c", b"m3".to_vec()).message_id("m-3"),
        Message::bytes("idem.c", b"dup-1 again".to_vec()).message_id("dup-1"),
    ];
    let out = outbox_client::enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();
    let shape: Vec<(&str, bool)> = out
        .iter()
        .map(|e| (e.message_id.as_str(), e.inserted))
        .collect();
    assert_eq!(
        shape,
        [
            ("m-1", true),
            ("m-2", true),
            ("m-1", false),
            ("m-3", true),
            ("dup-1", false)
        ]
    );
    assert!(
        out[0].id < out[1].id && out[1].id < out[3].id,
        "ids follow the given order: {out:?}"
    );
    assert_eq!(out[2].id, out[0].id);
    assert_eq!(out[4].id, first.id);

    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT message_id, payload FROM outbox.messages ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected: Vec<(String, Vec<u8>)> = [
        ("dup-1", "one"),
        ("dup-sql", "x"),
        ("m-1", "m1"),
        ("m-2", "m2"),
        ("m-3", "m3"),
    ]
    .iter()
    .map(|(id, p)| (id.to_string(), p.as_bytes().to_vec()))
    .collect();
    assert_eq!(rows, expected);

    // Each row is published once, in id order (one claimed batch, sent in order).
    let relay = RelayProcess::start(&nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "workers = 1",
    ));
    let got = consumer.collect(5, Duration::from_secs(30)).await;
    let got: Vec<(String, Vec<u8>)> = got.into_iter().map(|r| (r.msg_id, r.payload)).collect();
    assert_eq!(got, expected, "relay stderr:\n{}", relay.stderr());
    wait_until(Duration::from_secs(10), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    assert_eq!(consumer.stored().await, 5);
    consumer.delete_stream().await;
}

/// Client crate: a batch whose ids are all generated takes the statement without idempotency
/// checks; it still writes every row, in the given order, and a batch mixing generated and
/// application ids still treats an existing application id as a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_many_with_generated_ids_keeps_order_and_mixed_batches_stay_idempotent() {
    let db = TestDb::new().await;
    let fresh: Vec<Message> = (0..50u8)
        .map(|i| Message::bytes("gen.a", vec![i]).key(format!("k{}", i % 3)))
        .collect();
    let out = outbox_client::enqueue_many(&mut db.pool.acquire().await.unwrap(), &fresh)
        .await
        .unwrap();
    assert_eq!(out.len(), 50);
    assert!(out.iter().all(|e| e.inserted), "{out:?}");
    assert!(out.windows(2).all(|w| w[0].id < w[1].id), "{out:?}");
    let stored: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT message_id, payload FROM outbox.messages ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected: Vec<(String, Vec<u8>)> = out
        .iter()
        .zip(0..50u8)
        .map(|(e, i)| (e.message_id.clone(), vec![i]))
        .collect();
    assert_eq!(stored, expected);

    let mixed = vec![
        Message::bytes("gen.b", b"new".to_vec()),
        Message::bytes("gen.b", b"again".to_vec()).message_id(out[7].message_id.clone()),
        Message::bytes("gen.b", b"app".to_vec()).message_id("app-1"),
    ];
    let got = outbox_client::enqueue_many(&mut db.pool.acquire().await.unwrap(), &mixed)
        .await
        .unwrap();
    let shape: Vec<bool> = got.iter().map(|e| e.inserted).collect();
    assert_eq!(shape, [true, false, true]);
    assert_eq!(got[1].id, out[7].id);
    assert!(got[0].id > out[49].id && got[2].id > got[0].id);
    assert_eq!(db.waiting().await, 52);
}

/// guarantees.md: with `stream.create = true`, a stream that disappears while the relay runs
/// (deleted, or lost with a memory-storage server restart) is created again and delivery
/// resumes; the messages are not burned through their attempts into the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_stream_is_recreated_and_delivery_resumes() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    enqueue(
        &mut db.pool.acquire().await.unwrap(),
        &Message::bytes("re.create", b"1".to_vec()).message_id("before"),
    )
    .await
    .unwrap();
    let relay = RelayProcess::start(&nats_config(&db.url, &nats_url(), &stream, &prefix, ""));
    wait_until(Duration::from_secs(30), "first message relayed", || async {
        db.waiting().await == 0
    })
    .await;
    assert_eq!(
        js.get_stream(&stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages,
        1
    );

    js.delete_stream(&stream).await.unwrap();
    enqueue(
        &mut db.pool.acquire().await.unwrap(),
        &Message::bytes("re.create", b"2".to_vec()).message_id("after"),
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "second message relayed",
        || async { db.waiting().await == 0 },
    )
    .await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "relay stderr:\n{}", relay.stderr());

    // The stream exists again (created by the relay) and holds the second message only.
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let got = consumer.collect(1, Duration::from_secs(10)).await;
    assert_eq!(
        got.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>(),
        ["after"]
    );
    assert_eq!(consumer.stored().await, 1);
    consumer.delete_stream().await;
}

/// docs/sinks/nats.md ("Stream limits"): a stream the relay creates gets the configured
/// `max_age_secs`, `max_bytes` and `max_msgs`; an existing stream is used as it is, and the
/// relay's log says where its limits differ from the configured ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_streams_get_the_configured_limits_and_existing_ones_are_left_alone() {
    let db = TestDb::new().await;
    let (old_stream, old_prefix) = (unique("OLD"), unique("o"));
    let (new_stream, new_prefix) = (unique("NEW"), unique("n"));
    // Created before the relay starts, without limits.
    let existing = NatsConsumer::new(&nats_url(), &old_stream, &[format!("{old_prefix}.>")]).await;
    let _created = DeleteStreamOnDrop {
        url: nats_url(),
        stream: new_stream.clone(),
    };
    for topic in ["old.t", "new.t"] {
        enqueue(
            &mut db.pool.acquire().await.unwrap(),
            &Message::bytes(topic, b"x".to_vec()),
        )
        .await
        .unwrap();
    }
    let config = format!(
        r#"
[database]
url = "{db}"

[http]
listen = ""

[sinks.old]
kind = "nats"
url = "{nats}"
stream = {{ name = "{old_stream}", subjects = ["{old_prefix}.>"], create = true, storage = "memory" }}
routes = [{{ topics = ["old.*"], subject = "{old_prefix}.{{topic}}" }}]

[sinks.new]
kind = "nats"
url = "{nats}"
stream = {{ name = "{new_stream}", subjects = ["{new_prefix}.>"], create = true, storage = "memory", max_age_secs = 3600, max_bytes = 1048576, max_msgs = 1000 }}
routes = [{{ topics = ["new.*"], subject = "{new_prefix}.{{topic}}" }}]
"#,
        db = db.url,
        nats = nats_url(),
    );
    let relay = RelayProcess::start(&config);
    wait_until(Duration::from_secs(30), "both messages relayed", || async {
        db.waiting().await == 0
    })
    .await;

    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let created = js
        .get_stream(&new_stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(created.max_age, Duration::from_secs(3600));
    assert_eq!(created.max_bytes, 1_048_576);
    assert_eq!(created.max_messages, 1000);
    let untouched = js
        .get_stream(&old_stream)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(untouched.max_age, Duration::ZERO);
    assert_eq!(untouched.max_bytes, -1);
    assert_eq!(untouched.max_messages, -1);
    assert_eq!(existing.stored().await, 1);

    let stderr = relay.stderr();
    let noted: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("has other limits than configured"))
        .collect();
    assert_eq!(noted.len(), 1, "reported once:\n{stderr}");
    assert!(
        noted[0].contains(&old_stream)
            && noted[0].contains("max_age_secs: none (configured 604800)")
            && noted[0].contains("max_bytes: none (configured 1073741824)"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("created the JetStream stream") && l.contains(&new_stream)),
        "{stderr}"
    );
}

/// guarantees.md ("Crash safety", the price of the transaction): an ordered batch publishes one
/// message per key per round with no statement in between, so a hot key (thousands of rows in
/// one batch) could outlast `claim_timeout_secs`, have its claim aborted and be republished for
/// ever. The relay stops starting rounds in time instead: every batch commits (no "database
/// unavailable", nothing published without being marked), and the key's 20,000 messages
/// arrive once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_batch_stops_its_rounds_before_the_claim_timeout_aborts_it() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let n = 20_000usize;
    let mut conn = db.pool.acquire().await.unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let batch: Vec<Message> = chunk
            .iter()
            .map(|i| {
                Message::bytes("hot.key", i.to_string().into_bytes())
                    .message_id(format!("hot-{i}"))
                    .key("the-hot-key")
            })
            .collect();
        outbox_client::enqueue_many(&mut conn, &batch)
            .await
            .unwrap();
    }
    drop(conn);
    let relay = RelayProcess::start(&nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "batch_size = 10000\nworkers = 1\npublish_timeout_secs = 1\nclaim_timeout_secs = 2",
    ));
    wait_until(Duration::from_secs(120), "the hot key drained", || async {
        db.waiting().await == 0
    })
    .await;
    let stderr = relay.stderr();
    assert!(
        !stderr.contains("database unavailable"),
        "a claim was aborted:\n{stderr}"
    );
    let got = consumer.collect(n, Duration::from_secs(30)).await;
    let expected: Vec<String> = (0..n).map(|i| format!("hot-{i}")).collect();
    assert_eq!(
        got.iter().map(|r| r.msg_id.clone()).collect::<Vec<_>>(),
        expected,
        "every message once, in enqueue order"
    );
    consumer.delete_stream().await;
}
