//! Lag without `COUNT(*)` (insert-only count deltas plus a few index descents per topic), dead
//! letters per topic, and the periodic upkeep of the tables: count compaction and the retention
//! cleanup of sent rows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

/// Lag of one topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopicLag {
    pub topic: String,
    /// Rows waiting, scheduled ones included.
    pub waiting: i64,
    /// Of those, rows delayed or scheduled for a retry that are not due yet.
    pub scheduled: i64,
    /// Since when the oldest due row has been due: its `created_at`, or its `available_at` when
    /// it was delayed at enqueue (a row scheduled for later is not late before its time). A
    /// retried row counts from `created_at`: a failing message is late.
    pub oldest_due_since: Option<DateTime<Utc>>,
    pub oldest_age_seconds: f64,
}

/// Per-topic backlog without scanning the table: the count is the sum of the insert-only
/// deltas (a handful of rows per topic after compaction); the oldest due row is the older of
/// the topic's first fresh row from the claim floor on (one descent of `messages_by_topic_idx`,
/// so the rows deleted below the floor are not walked) and its oldest due set-aside row;
/// set-aside rows (delayed, or waiting out a retry's backoff) are read once for all topics from
/// `messages_set_aside_due_idx`, which holds only them: asked per topic, the planner may read
/// every row of the topic through `messages_by_topic_idx` to find its few set-aside ones
/// (measured: 25 ms per topic of 10,000 rows, 2.5 s for 100 such topics).
///
/// The fresh-row lookup is written `(topic, id) >= ($t, floor) AND topic <= $t ORDER BY topic,
/// id` on purpose: with `topic = $t ORDER BY id` the planner may walk the primary key and filter
/// on topic, which reads most of the table to find the first row of a quiet topic whose rows
/// are all recent (measured: 230 ms at 200,000 rows, the cost of a COUNT(*)). In the range form
/// only `messages_by_topic_idx` yields that order, so each topic costs one index descent.
/// Measured with 5 million waiting rows by `cargo run --example lag_bench` (docs/metrics.md,
/// "Lag that stays cheap").
pub const LAG_SQL: &str = "
WITH f AS MATERIALIZED (SELECT coalesce((SELECT floor FROM outbox.claim_floor), 0) AS floor),
     sa AS MATERIALIZED (
       SELECT d.topic,
              min(CASE WHEN d.attempts = 0 THEN d.available_at ELSE d.created_at END)
                FILTER (WHERE d.available_at <= now()) AS due_since,
              count(*) FILTER (WHERE d.available_at > now()) AS scheduled
         FROM outbox.messages d
        WHERE d.available_at > d.created_at
        GROUP BY d.topic)
SELECT c.topic, c.waiting, coalesce(sa.scheduled, 0) AS scheduled, o.since,
       coalesce(extract(epoch FROM (now() - o.since)), 0)::float8 AS age
  FROM (SELECT topic, sum(n)::bigint AS waiting FROM outbox.topic_counts
         GROUP BY topic HAVING sum(n) <> 0) c
  LEFT JOIN sa ON sa.topic = c.topic
  LEFT JOIN LATERAL (
    SELECT least(
      (SELECT m.created_at FROM outbox.messages m
        WHERE (m.topic, m.id) >= (c.topic, (SELECT floor FROM f)) AND m.topic <= c.topic
          AND m.available_at <= m.created_at
        ORDER BY m.topic, m.id LIMIT 1),
      sa.due_since
    ) AS since) o ON true
 ORDER BY c.topic";

pub async fn lag(conn: &mut PgConnection) -> Result<Vec<TopicLag>, sqlx::Error> {
    let rows = sqlx::query(LAG_SQL).fetch_all(conn).await?;
    rows.into_iter()
        .map(|r| {
            Ok(TopicLag {
                topic: r.try_get("topic")?,
                waiting: r.try_get("waiting")?,
                scheduled: r.try_get("scheduled")?,
                oldest_due_since: r.try_get("since")?,
                oldest_age_seconds: r.try_get::<f64, _>("age")?.max(0.0),
            })
        })
        .collect()
}

/// Dead letters per topic (for the gauge and `status`).
pub async fn dead_counts(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT topic, count(*) FROM outbox.dead_letters GROUP BY topic ORDER BY topic")
        .fetch_all(conn)
        .await
}

/// Folds the per-statement count deltas into one row per topic.
pub async fn compact_counts(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "WITH moved AS (DELETE FROM outbox.topic_counts RETURNING topic, n)
         INSERT INTO outbox.topic_counts (topic, n)
         SELECT topic, sum(n) FROM moved GROUP BY topic HAVING sum(n) <> 0",
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Deletes at most `chunk` sent rows older than `retention`; returns how many.
pub async fn cleanup_sent(
    conn: &mut PgConnection,
    retention: Duration,
    chunk: i64,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM outbox.sent WHERE id IN (
            SELECT id FROM outbox.sent WHERE sent_at < now() - $1 * interval '1 millisecond'
             ORDER BY sent_at LIMIT $2)",
    )
    .bind(retention.as_millis() as i64)
    .bind(chunk)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}
