//! A relay that dies between publishing and marking: its claim transaction aborts, the rows are
//! claimed again and re-published with the same `Nats-Msg-Id`, and JetStream drops the repeats.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use outbox_client::{enqueue_many, Message};
use support::*;

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

async fn enqueue_n(db: &TestDb, n: usize, topic: &str) -> Vec<(i64, String)> {
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let batch: Vec<Message> = (start..(start + 1000).min(n))
            .map(|i| Message::bytes(topic, i.to_string().into_bytes()))
            .collect();
        out.extend(
            enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
                .await
                .unwrap()
                .into_iter()
                .map(|e| (e.id, e.message_id)),
        );
    }
    out
}

/// Sessions the relay holds on the test's database (a killed relay's sessions end when
/// PostgreSQL notices, aborting its claim transactions).
async fn relay_sessions(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'outbox-relay'")
        .bind(&db.name)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// guarantees.md: a re-published message carries the same `Nats-Msg-Id`, JetStream reports it
/// as a duplicate, the relay counts it delivered (`outcome="duplicate"`) and the stream holds
/// each id once.
///
/// Deterministic crash simulation: the test publishes the first 100 of 300 rows itself, with the
/// ids and subjects the relay uses, exactly what a relay that published a batch and died before
/// its mark committed leaves behind (the rows are still waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_batch_is_acknowledged_as_duplicate_and_stored_once() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let rows = enqueue_n(&db, 300, "crash.sim").await;

    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    for (i, (_, message_id)) in rows.iter().take(100).enumerate() {
        let msg = PublishMessage::build()
            .message_id(message_id)
            .payload(i.to_string().into_bytes().into());
        let ack = js
            .send_publish(format!("{prefix}.crash.sim"), msg)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(!ack.duplicate);
    }
    assert_eq!(consumer.stored().await, 100);

    let addr = format!("127.0.0.1:{}", free_port());
    let relay = RelayProcess::start(&http::with_http(
        nats_config(&db.url, &nats_url(), &stream, &prefix, ""),
        port_of(&addr),
    ));
    wait_until(Duration::from_secs(30), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;

    http::wait_healthy(&addr, Duration::from_secs(10)).await;
    let body = http::scrape(&addr).await;
    let count = |outcome| {
        http::metric(
            &body,
            "outbox_published_total",
            &[("topic", "crash.sim"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        count("duplicate"),
        Some(100.0),
        "relay stderr:\n{}",
        relay.stderr()
    );
    assert_eq!(count("delivered"), Some(200.0));

    assert_eq!(consumer.stored().await, 300, "each id is stored once");
    let got = consumer.collect(300, Duration::from_secs(30)).await;
    let ids: BTreeSet<_> = got.iter().map(|r| r.msg_id.clone()).collect();
    let expected: BTreeSet<_> = rows.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!((got.len(), &ids), (300, &expected));
    assert!(consumer
        .collect(1, Duration::from_millis(300))
        .await
        .is_empty());
    consumer.delete_stream().await;
}

/// guarantees.md: a relay killed with SIGKILL mid-batch and restarted delivers everything; what
/// the dead relay published but had not marked is re-published with the same `Nats-Msg-Id` and
/// acknowledged as a duplicate.
///
/// The kill lands as soon as the stream holds a message while no row has been marked yet, i.e.
/// inside the first batch's publish/ack phase. Whatever the exact moment, the accounting must
/// balance: with N rows, R still waiting after the kill and S messages stored by the dead
/// relay, the restarted relay reports exactly N - S delivered and S - (N - R) duplicates, and
/// the stream ends with N messages, one per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_then_restart_delivers_everything_once() {
    const N: usize = 6_000;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let rows = enqueue_n(&db, N, "crash.kill").await;
    let config = nats_config(&db.url, &nats_url(), &stream, &prefix, "batch_size = 2000");

    let mut first = RelayProcess::start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if consumer.stored().await > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "first relay published nothing:\n{}",
            first.stderr()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.sigkill();
    wait_until(
        Duration::from_secs(30),
        "the killed relay's sessions are gone",
        || async { relay_sessions(&db).await == 0 },
    )
    .await;
    let waiting = db.waiting().await as u64;
    let stored = consumer.stored().await;
    let marked = N as u64 - waiting;
    assert!(
        stored >= marked,
        "rows were marked sent without being in the stream: stored {stored}, marked {marked}"
    );
    let unmarked_published = stored - marked;
    eprintln!(
        "killed: {stored} stored, {marked} marked, {unmarked_published} published but not marked"
    );

    let addr = format!("127.0.0.1:{}", free_port());
    let second = RelayProcess::start(&http::with_http(config, port_of(&addr)));
    wait_until(
        Duration::from_secs(60),
        "outbox drained after restart",
        || async { db.waiting().await == 0 },
    )
    .await;
    http::wait_healthy(&addr, Duration::from_secs(10)).await;
    // The relay adds to its counters right after COMMIT: the outbox can be empty a moment
    // before the last batch is counted. Wait for the total, then check how it splits.
    let outcome_of = |body: &str, outcome: &str| {
        http::metric(
            body,
            "outbox_published_total",
            &[("topic", "crash.kill"), ("outcome", outcome)],
        )
        .unwrap_or(0.0) as u64
    };
    let expected_total = N as u64 - stored + unmarked_published;
    wait_until(
        Duration::from_secs(30),
        "every batch counted in outbox_published_total",
        || async {
            let body = http::scrape(&addr).await;
            outcome_of(&body, "delivered") + outcome_of(&body, "duplicate") >= expected_total
        },
    )
    .await;
    let body = http::scrape(&addr).await;
    let count = |outcome| outcome_of(&body, outcome);
    assert_eq!(
        count("delivered"),
        N as u64 - stored,
        "relay stderr:\n{}",
        second.stderr()
    );
    assert_eq!(
        count("duplicate"),
        unmarked_published,
        "every re-published message was a JetStream duplicate"
    );

    assert_eq!(consumer.stored().await, N as u64, "each id is stored once");
    let got = consumer.collect(N, Duration::from_secs(60)).await;
    let ids: BTreeSet<_> = got.iter().map(|r| r.msg_id.clone()).collect();
    let expected: BTreeSet<_> = rows.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!(got.len(), N);
    assert_eq!(ids, expected);
    consumer.delete_stream().await;
}

/// guarantees.md: on SIGTERM the relay stops claiming, finishes its in-flight batches (publish,
/// acks, mark) and exits 0: every message in the stream is marked sent, none is left published
/// but unmarked, so the next relay re-publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_finishes_in_flight_batches_and_exits_0() {
    const N: usize = 6_000;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let rows = enqueue_n(&db, N, "crash.term").await;
    let config = nats_config(&db.url, &nats_url(), &stream, &prefix, "batch_size = 2000");

    let mut first = RelayProcess::start(&config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while consumer.stored().await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first relay published nothing:\n{}",
            first.stderr()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.sigterm();
    assert_eq!(
        first.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "stderr:\n{}",
        first.stderr()
    );
    assert!(
        first.stderr().contains("shutting down"),
        "stderr:\n{}",
        first.stderr()
    );
    let waiting = db.waiting().await as u64;
    let stored = consumer.stored().await;
    assert_eq!(
        stored,
        N as u64 - waiting,
        "published and marked must match after a graceful stop"
    );
    eprintln!("stopped: {stored} stored and marked, {waiting} waiting");

    let addr = format!("127.0.0.1:{}", free_port());
    let second = RelayProcess::start(&http::with_http(config, port_of(&addr)));
    wait_until(
        Duration::from_secs(60),
        "outbox drained after restart",
        || async { db.waiting().await == 0 },
    )
    .await;
    http::wait_healthy(&addr, Duration::from_secs(10)).await;
    // The relay adds to its counters right after COMMIT: the outbox can be empty a moment
    // before the last batch is counted. Wait for the total, then check how it splits.
    let outcome_of = |body: &str, outcome: &str| {
        http::metric(
            body,
            "outbox_published_total",
            &[("topic", "crash.term"), ("outcome", outcome)],
        )
        .unwrap_or(0.0) as u64
    };
    let expected_total = waiting;
    wait_until(
        Duration::from_secs(30),
        "every batch counted in outbox_published_total",
        || async {
            let body = http::scrape(&addr).await;
            outcome_of(&body, "delivered") + outcome_of(&body, "duplicate") >= expected_total
        },
    )
    .await;
    let body = http::scrape(&addr).await;
    let count = |outcome| outcome_of(&body, outcome);
    assert_eq!(
        count("delivered"),
        waiting,
        "relay stderr:\n{}",
        second.stderr()
    );
    assert_eq!(count("duplicate"), 0);
    let got = consumer.collect(N, Duration::from_secs(60)).await;
    let ids: BTreeSet<_> = got.iter().map(|r| r.msg_id.clone()).collect();
    let expected: BTreeSet<_> = rows.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!((got.len(), ids), (N, expected));
    assert_eq!(consumer.stored().await, N as u64);
    consumer.delete_stream().await;
}
