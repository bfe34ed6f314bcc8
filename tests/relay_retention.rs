//! Retention: with `relay.retention_secs` > 0, sent rows move to `outbox.sent` in the mark
//! transaction, stay there for the period (re-enqueueing their id is a no-op meanwhile), and
//! the maintenance task deletes them afterwards in bounded chunks.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use outbox_client::{enqueue, enqueue_many, Message};
use support::*;

async fn count(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM outbox.{table}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// guarantees.md: with retention on, sent rows are kept in outbox.sent (their ids still
/// de-duplicate enqueues) and removed by the cleanup once the period has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_rows_are_retained_then_cleaned_up() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let batch: Vec<Message> = (0..30).map(|i| Message::bytes("kept", vec![i])).collect();
    let enqueued = enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();
    let expected: BTreeSet<String> = enqueued.iter().map(|e| e.message_id.clone()).collect();

    let relay = RelayProcess::start(&nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "retention_secs = 4\nmaintenance_interval_secs = 1\ncleanup_chunk = 7",
    ));
    assert_eq!(
        consumer.collect(30, Duration::from_secs(30)).await.len(),
        30,
        "stderr:\n{}",
        relay.stderr()
    );
    wait_until(
        Duration::from_secs(10),
        "all 30 rows moved to outbox.sent",
        || async { count(&db, "messages").await == 0 && count(&db, "sent").await == 30 },
    )
    .await;
    let sent: BTreeSet<String> = sqlx::query_scalar("SELECT message_id FROM outbox.sent")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(sent, expected);

    // While retained, the id still de-duplicates: an application retry writes nothing.
    let again = enqueue(
        &mut db.pool.acquire().await.unwrap(),
        &Message::bytes("kept", vec![0]).message_id(enqueued[0].message_id.clone()),
    )
    .await
    .unwrap();
    assert!(!again.inserted);
    assert_eq!(again.id, enqueued[0].id);
    let (sql_id, inserted): (i64, bool) =
        sqlx::query_as("SELECT id, inserted FROM outbox.enqueue('kept', 'x', NULL, '{}', $1)")
            .bind(&enqueued[1].message_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((sql_id, inserted), (enqueued[1].id, false));
    assert_eq!(count(&db, "messages").await, 0);

    wait_until(
        Duration::from_secs(30),
        "the cleanup emptied outbox.sent after the retention period",
        || async { count(&db, "sent").await == 0 },
    )
    .await;
    assert_eq!(consumer.stored().await, 30, "retention never re-publishes");
    consumer.delete_stream().await;
}

/// The cleanup statement deletes at most one chunk of rows older than the retention period,
/// oldest first, and never a younger row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_in_bounded_chunks_and_only_expired_rows() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox.sent (id, message_id, topic, payload, headers, created_at, attempts, sent_at)
         SELECT g, 'old-' || g, 't', decode('00', 'hex'), '{}'::jsonb, now(), 0, now() - interval '1 hour' FROM generate_series(1, 30) g
         UNION ALL
         SELECT g, 'new-' || g, 't', decode('00', 'hex'), '{}'::jsonb, now(), 0, now() FROM generate_series(31, 35) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let mut chunks = Vec::new();
    loop {
        let n = outbox_relay::store::cleanup_sent(&mut conn, Duration::from_secs(600), 7)
            .await
            .unwrap();
        chunks.push(n);
        if n < 7 {
            break;
        }
    }
    assert_eq!(chunks, [7, 7, 7, 7, 2, 0][..chunks.len()].to_vec());
    assert_eq!(chunks.iter().sum::<u64>(), 30);
    let left: Vec<String> = sqlx::query_scalar("SELECT message_id FROM outbox.sent ORDER BY id")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        left,
        (31..=35).map(|i| format!("new-{i}")).collect::<Vec<_>>()
    );
}
