//! The completion statements on the table state that once made them read a whole index per
//! claimed row (docs/architecture.md, "Storage under a held xmin horizon"): vacuum recorded the
//! drained `outbox.messages` as empty (`reltuples` 0), then, while a snapshot held the xmin
//! horizon, thousands of rows were delivered, so every index still holds their entries. Marking
//! a batch by id then planned a full scan of the per-topic index `(topic, id)` (the id a
//! condition on its second column), once per id. The per-topic index is now partial
//! (`messages_by_topic_idx … WHERE topic IS NOT NULL`, migrations/0010), which no condition on
//! `id` alone can use, and the completion addresses the claimed rows by `ctid`: a TID scan,
//! whatever the statistics say. Checked through the plans (the relay's session
//! settings, generic plans as a long-lived session ends up with) and through the index
//! statistics of a batch completed by the pipeline's own code.

mod support;

use std::time::Duration;

use outbox_relay::config::DatabaseConfig;
use outbox_relay::message::{Claimed, Locked, OutboxRow};
use outbox_relay::pipeline::complete::{Completion, RetryPolicy};
use outbox_relay::pipeline::RowOutcome;
use outbox_relay::sinks::{Outcome, SinkError};
use outbox_relay::store;
use outbox_relay::store::complete::{
    DEAD_LETTER_SQL, MARK_SENT_RETAIN_SQL, MARK_SENT_SQL, SCHEDULE_RETRIES_SQL,
};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use support::*;

/// Rows delivered while the horizon is held: dead entries in every index of the table.
const DELIVERED_UNDER_THE_HOLD: i64 = 20_000;

async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The relay's pool ([`store::connect`]: its session settings, sequential and bitmap scans off),
/// its sessions planning every statement generically (`plan_cache_mode`, added through the URL),
/// as a long-lived relay session ends up doing for the statements it repeats.
async fn relay_pool(db: &TestDb, connections: u32) -> PgPool {
    let mut url = url::Url::parse(&db.url).unwrap();
    url.query_pairs_mut()
        .append_pair("options[plan_cache_mode]", "force_generic_plan");
    let config = DatabaseConfig {
        url: url.to_string(),
        ..Default::default()
    };
    let pool = store::connect(&config, connections, Duration::from_secs(120))
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for (setting, value) in [
        ("enable_seqscan", "off"),
        ("enable_bitmapscan", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ] {
        let got: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(got, value, "{setting}");
    }
    pool
}

/// Puts `outbox.messages` in the state of the defect and returns the connection holding the
/// horizon (keep it open) and the ids of `live` rows inserted last (topic `p.x`).
async fn held_horizon_state(db: &TestDb, live: i64) -> (PgConnection, Vec<i64>) {
    let mut setup = PgConnection::connect(&db.url).await.unwrap();
    // No autovacuum or autoanalyze during the test: the statistics stay as set up here.
    exec(
        &mut setup,
        "ALTER TABLE outbox.messages SET (autovacuum_enabled = off)",
    )
    .await;
    exec(
        &mut setup,
        "INSERT INTO outbox.messages (topic, payload)
         SELECT 'p.x', 'x'::bytea FROM generate_series(1, 200)",
    )
    .await;
    exec(&mut setup, "DELETE FROM outbox.messages").await;
    exec(&mut setup, "VACUUM ANALYZE outbox.messages").await;
    let reltuples: Vec<(String, f32)> = sqlx::query_as(
        "SELECT c.relname::text, c.reltuples FROM pg_class c
          WHERE c.oid IN ('outbox.messages'::regclass, 'outbox.messages_pkey'::regclass,
                          'outbox.messages_by_topic_idx'::regclass)",
    )
    .fetch_all(&mut setup)
    .await
    .unwrap();
    assert!(
        reltuples.iter().all(|(_, n)| *n == 0.0),
        "vacuum records the drained table as empty: {reltuples:?}"
    );

    // A REPEATABLE READ snapshot holds the xmin horizon: nothing deleted from now on can be
    // removed, from the table or from its indexes.
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    exec(&mut holder, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    exec(&mut holder, "SELECT 1").await;
    let holding: bool =
        sqlx::query_scalar("SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = $1")
            .bind(holder_pid(&mut holder).await)
            .fetch_one(&mut setup)
            .await
            .unwrap();
    assert!(holding, "the snapshot holds the xmin horizon");

    exec(
        &mut setup,
        &format!(
            "INSERT INTO outbox.messages (topic, payload)
             SELECT 'p.x', 'x'::bytea FROM generate_series(1, {DELIVERED_UNDER_THE_HOLD})"
        ),
    )
    .await;
    exec(&mut setup, "DELETE FROM outbox.messages").await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox.messages (topic, payload)
         SELECT 'p.x', convert_to('live-' || i, 'UTF8') FROM generate_series(1, $1) i
         RETURNING id",
    )
    .bind(live)
    .fetch_all(&mut setup)
    .await
    .unwrap();
    flush_stats(&mut setup).await;
    setup.close().await.unwrap();
    (holder, ids)
}

async fn holder_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Flushes this session's statistics now (PostgreSQL 15 flushes them at most once a second).
/// The flush runs before the session answers `ReadyForQuery`; the second statement makes sure
/// that answer has arrived.
async fn flush_stats(conn: &mut PgConnection) {
    exec(conn, "SELECT pg_stat_force_next_flush()").await;
    exec(conn, "SELECT 1").await;
}

/// `(idx_scan, idx_tup_read)` of an index of `outbox.messages`, read in a transaction of its own
/// (a fresh statistics snapshot).
async fn index_reads(db: &TestDb, index: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes
          WHERE schemaname = 'outbox' AND indexrelname = $1",
    )
    .bind(index)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Every node of a JSON plan, depth first.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    if let Some(children) = plan.get("Plans").and_then(Value::as_array) {
        for child in children {
            nodes(child, out);
        }
    }
}

/// The generic plan of `sql` (prepared with `types`, run with `args`) on `conn`: its scans of
/// `outbox.messages`, as `(node type, index name)`.
async fn scans_of_messages(
    conn: &mut PgConnection,
    name: &str,
    sql: &str,
    types: &str,
    args: &str,
) -> Vec<(String, Option<String>)> {
    exec(conn, &format!("PREPARE {name}({types}) AS {sql}")).await;
    let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) EXECUTE {name}({args})"))
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    exec(conn, &format!("DEALLOCATE {name}")).await;
    let mut all = Vec::new();
    nodes(&plan[0]["Plan"], &mut all);
    all.iter()
        .filter(|n| n["Relation Name"] == "messages" && n["Node Type"] != "ModifyTable")
        .map(|n| {
            (
                n["Node Type"].as_str().unwrap().to_string(),
                n["Index Name"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// Asserts that nothing scanned `messages_by_topic_idx` since `reads` (idx_scan, idx_tup_read),
/// and moves `reads` on.
async fn no_topic_index_reads(db: &TestDb, pool: &PgPool, reads: &mut (i64, i64), what: &str) {
    flush_stats(&mut pool.acquire().await.unwrap()).await;
    let after = index_reads(db, "messages_by_topic_idx").await;
    assert_eq!(
        (after.0 - reads.0, after.1 - reads.1),
        (0, 0),
        "{what} scanned messages_by_topic_idx (idx_scan, idx_tup_read)"
    );
    *reads = after;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_statements_are_tid_scans_and_id_conditions_use_the_primary_key() {
    let db = TestDb::new().await;
    let (holder, _) = held_horizon_state(&db, 10).await;
    let pool = relay_pool(&db, 1).await;
    let mut conn = pool.acquire().await.unwrap();

    // The state is the defect's (empty statistics, a held horizon), yet a condition on `id`
    // alone plans the primary key: the per-topic index is partial and cannot serve it. The
    // ordered claim's pass over the batch's id range is such a condition.
    for (name, sql, types, args) in [
        (
            "by_id",
            "DELETE FROM outbox.messages WHERE id = ANY($1)",
            "bigint[]",
            "'{1,2,3}'",
        ),
        (
            "id_range",
            "SELECT e.key, e.id FROM outbox.messages e
              WHERE e.id >= $1 AND e.id <= $2 AND e.slot = ANY('{1,2}'::smallint[])",
            "bigint, bigint",
            "1, 100",
        ),
    ] {
        let plan = scans_of_messages(&mut conn, name, sql, types, args).await;
        assert_eq!(
            plan,
            [("Index Scan".to_string(), Some("messages_pkey".to_string()))],
            "{name}: a condition on id alone must plan the primary key"
        );
    }

    let ctids = r#"'{"(0,1)","(0,2)"}'"#;
    for (name, sql, types, args) in [
        ("mark_sent", MARK_SENT_SQL, "text[]", ctids.to_string()),
        (
            "mark_sent_retain",
            MARK_SENT_RETAIN_SQL,
            "text[]",
            ctids.to_string(),
        ),
        (
            "schedule_retries",
            SCHEDULE_RETRIES_SQL,
            "text[], bigint[], text[]",
            format!("{ctids}, '{{1000,2000}}', '{{a,b}}'"),
        ),
        (
            "dead_letter",
            DEAD_LETTER_SQL,
            "text[], bigint[], text[]",
            format!("{ctids}, '{{1,2}}', '{{a,b}}'"),
        ),
    ] {
        let scans = scans_of_messages(&mut conn, name, sql, types, &args).await;
        assert!(!scans.is_empty(), "{name}: no scan of outbox.messages");
        assert!(
            scans.iter().all(|(node, _)| node == "Tid Scan"),
            "{name}: {scans:?}"
        );
    }
    drop(holder);
}

fn outcomes(n: usize, outcome: impl Fn(usize) -> RowOutcome) -> Vec<RowOutcome> {
    (0..n).map(outcome).collect()
}

fn split(claimed: Vec<Claimed>) -> (Vec<OutboxRow>, Vec<Locked>) {
    claimed.into_iter().map(Claimed::into_parts).unzip()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completing_batches_under_a_held_horizon_does_not_scan_the_topic_index() {
    let db = TestDb::new().await;
    let (holder, live) = held_horizon_state(&db, 150).await;
    let floor = live[0];
    let pool = relay_pool(&db, 1).await;
    let policy = RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
    };
    // idx_scan counts the scans of the index, idx_tup_read the entries they returned (not the
    // entries they stepped over): marking by id scanned the index once per id.
    let mut reads = index_reads(&db, "messages_by_topic_idx").await;

    // Batch 1, unordered: 60 delivered (deleted), 20 retried, 20 dead-lettered.
    let mut tx = pool.begin().await.unwrap();
    let (rows, locked) = split(store::claim(&mut tx, 100, &[], floor).await.unwrap());
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        live[..100],
        "the oldest rows"
    );
    let first = outcomes(100, |i| match i {
        0..60 => RowOutcome::Sink(Outcome::Delivered),
        60..80 => RowOutcome::Sink(Outcome::Failed(SinkError::retriable("nack", "nacked"))),
        _ => RowOutcome::Sink(Outcome::Failed(SinkError::permanent("reject", "rejected"))),
    });
    Completion::new(&rows, &locked, &first, &policy)
        .apply(tx, false, false)
        .await
        .unwrap();
    no_topic_index_reads(
        &db,
        &pool,
        &mut reads,
        "the unordered claim and its completion",
    )
    .await;

    // Batch 2, ordered: the other 50 (the retried rows are not due), delivered with retention.
    // The ordered claim's pass over the batch's id range is a condition on `id` alone: it reads
    // the primary key, not the partial per-topic index.
    let all: Vec<i16> = (0..store::SLOTS as i16).collect();
    let mut tx = pool.begin().await.unwrap();
    let (rows, locked) = split(
        store::claim_ordered(&mut tx, 100, &[], &all, floor)
            .await
            .unwrap(),
    );
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), live[100..]);
    let second = outcomes(50, |_| RowOutcome::Sink(Outcome::Delivered));
    Completion::new(&rows, &locked, &second, &policy)
        .apply(tx, true, false)
        .await
        .unwrap();
    no_topic_index_reads(
        &db,
        &pool,
        &mut reads,
        "the ordered claim and its completion",
    )
    .await;

    // Every row went where its outcome sent it.
    let waiting: Vec<(i64, i32)> =
        sqlx::query_as("SELECT id, attempts FROM outbox.messages ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        waiting,
        live[60..80].iter().map(|&id| (id, 1)).collect::<Vec<_>>(),
        "only the retried rows wait, one attempt counted"
    );
    let dead: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox.dead_letters ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, live[80..100]);
    let sent: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox.sent ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(sent, live[100..]);
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ctid_that_no_longer_addresses_its_row_fails_the_completion_and_marks_nothing() {
    let db = TestDb::new().await;
    let live: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox.messages (topic, payload)
         SELECT 'p.x', 'x'::bytea FROM generate_series(1, 3) RETURNING id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // One connection: the next use of the pool is the connection the failed completion used,
    // its rollback sent first.
    let pool = relay_pool(&db, 1).await;
    let policy = RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(1),
    };
    let mut tx = pool.begin().await.unwrap();
    let (rows, locked) = split(store::claim(&mut tx, 10, &[], 0).await.unwrap());
    assert_eq!(locked.iter().map(|l| l.id).collect::<Vec<_>>(), live);
    // Something in the claim transaction updates a claimed row: its new version is elsewhere.
    sqlx::query("UPDATE outbox.messages SET last_error = 'moved' WHERE id = $1")
        .bind(live[1])
        .execute(&mut *tx)
        .await
        .unwrap();
    let delivered = outcomes(3, |_| RowOutcome::Sink(Outcome::Delivered));
    let error = Completion::new(&rows, &locked, &delivered, &policy)
        .apply(tx, true, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("ids not found at their ctid: {}", live[1])),
        "{error}"
    );

    // Rolled back: nothing marked, every row claimable again.
    let mut tx = pool.begin().await.unwrap();
    let again = store::claim(&mut tx, 10, &[], 0).await.unwrap();
    assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), live);
    let last_error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM outbox.messages WHERE id = $1")
            .bind(live[1])
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(last_error, None);
    tx.rollback().await.unwrap();
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.sent")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(sent, 0);
}

/// The lag statement (every metrics refresh, `status`, the admin's overview) reads each topic's
/// first fresh row with one descent of `messages_by_topic_idx` and the set-aside rows from their
/// own partial index: with a large backlog per topic it reads a handful of index entries per
/// topic, never the topic's rows (the per-topic form of the set-aside lookup planned a walk of
/// every row of each topic through the topic index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_reads_a_few_index_entries_per_topic_whatever_the_backlog() {
    // Wide enough rows and enough of them that the per-topic form planned the topic index
    // (10,000 rows of 256 bytes per topic: 990 ms for the lag of 40 topics).
    const TOPICS: i64 = 40;
    const ROWS: i64 = 400_000;
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 'lag.' || (g % $1), 'k-' || g, convert_to(repeat('x', 256), 'UTF8')
           FROM generate_series(1, $2) g",
    )
    .bind(TOPICS)
    .bind(ROWS)
    .execute(&db.pool)
    .await
    .unwrap();
    // A few rows set aside (a retry's backoff, one due, one not), in two topics.
    sqlx::query(
        "UPDATE outbox.messages SET attempts = 1,
                available_at = created_at + CASE WHEN id % 2 = 0 THEN interval '1 hour' ELSE interval '1 ms' END
          WHERE id IN (SELECT id FROM outbox.messages WHERE topic IN ('lag.1', 'lag.2') ORDER BY id LIMIT 4)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    exec(
        &mut db.pool.acquire().await.unwrap(),
        "ANALYZE outbox.messages, outbox.topic_counts",
    )
    .await;
    let pool = relay_pool(&db, 1).await;
    flush_stats(&mut pool.acquire().await.unwrap()).await;
    let before = index_reads(&db, "messages_by_topic_idx").await;

    let mut conn = pool.acquire().await.unwrap();
    let lag = store::lag::lag(&mut conn).await.unwrap();
    flush_stats(&mut conn).await;
    drop(conn);

    assert_eq!(lag.len(), TOPICS as usize);
    assert_eq!(lag.iter().map(|t| t.waiting).sum::<i64>(), ROWS);
    assert_eq!(lag.iter().map(|t| t.scheduled).sum::<i64>(), 2, "{lag:?}");
    let after = index_reads(&db, "messages_by_topic_idx").await;
    let read = after.1 - before.1;
    assert!(
        read <= TOPICS * 10,
        "the lag read {read} entries of messages_by_topic_idx for {TOPICS} topics of {} rows each",
        ROWS / TOPICS
    );
}
