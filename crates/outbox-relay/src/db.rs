//! Every SQL statement that matters, in one place: claim, mark sent, retry, dead-letter, lag.
//!
//! The claim holds its row locks for the life of one transaction: claim → publish → mark →
//! commit. If the relay dies, PostgreSQL aborts the transaction and the rows are claimable again
//! at once; if the relay hangs, `idle_in_transaction_session_timeout` (relay.claim_timeout_secs)
//! aborts it. See docs/architecture.md for why this beats a lease column.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Row};

use crate::sinks::OutboxRow;

pub mod dead;

/// The migrations in the workspace's `migrations/` folder, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Opens the relay's pool. Every session gets `idle_in_transaction_session_timeout`, so a claim
/// transaction of a relay that stopped talking is aborted and its rows released, and `jit = off`
/// (see below).
///
/// One plain connection is opened first: the pool's own first connect retries a refused
/// connection silently until `connect_timeout` and then reports only "pool timed out", while
/// this says what went wrong ("Connection refused", "password authentication failed") at once.
pub async fn connect(
    url: &str,
    max_connections: u32,
    connect_timeout: Duration,
    claim_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("outbox-relay")
        .options([
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", claim_timeout.as_millis()),
            ),
            (
                "statement_timeout",
                format!("{}ms", claim_timeout.as_millis()),
            ),
            // The claim's estimated cost crosses `jit_above_cost` with a large backlog (the
            // ordered claim with a share of the slots especially), and compiling it costs 20 to
            // 45 ms per claim against about 5 ms of execution. Every relay statement is short.
            ("jit", "off".to_string()),
        ])
        .log_statements(tracing::log::LevelFilter::Trace);
    let probe = tokio::time::timeout(connect_timeout, options.connect())
        .await
        .map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within database.connect_timeout_secs ({}s)",
                    connect_timeout.as_secs()
                ),
            ))
        })??;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// One statement, one round trip: the oldest available rows that no other relay holds, locked
/// until this transaction ends. `excluded` holds topics whose sink is down (circuit open).
const CLAIM_SQL: &str = "
SELECT id, message_id, topic, key, payload, headers, created_at, attempts
  FROM outbox.messages
 WHERE available_at <= now()
   AND topic <> ALL($2::text[])
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED";

/// The topics that have waiting rows and are not `$2` (excluded), from the count deltas (a few
/// rows per topic), each with its share of the batch. The claim while a circuit is open walks
/// these topics' ranges of `messages_topic_id_idx` instead of the primary key: the rows of a sink
/// that has been down for hours pile up at the head of the table, and walking past millions of
/// them on every claim (a heap fetch each, to read the topic) would slow every other sink to a
/// crawl. The range form `topic >= t AND topic <= t ORDER BY topic, id` keeps the planner on that
/// index (see [`LAG_SQL`]).
pub const ACTIVE_TOPICS_SQL: &str = "
active AS MATERIALIZED (
  SELECT topic FROM outbox.topic_counts
   GROUP BY topic HAVING sum(n) > 0 AND topic <> ALL($2::text[])
),
share AS MATERIALIZED (
  SELECT greatest(1, $1 / greatest(1, count(*)))::bigint AS n FROM active
)";

/// [`CLAIM_SQL`] while some topics are excluded: per active topic, its oldest available rows.
static CLAIM_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {ACTIVE_TOPICS_SQL}
SELECT c.* FROM active t CROSS JOIN LATERAL (
  SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.headers, m.created_at, m.attempts
    FROM outbox.messages m
   WHERE m.topic >= t.topic AND m.topic <= t.topic
     AND m.available_at <= now()
   ORDER BY m.topic, m.id
   LIMIT (SELECT n FROM share)
     FOR UPDATE SKIP LOCKED
) c
ORDER BY c.id"
    )
});

/// [`any_available`] while some topics are excluded.
static ANY_AVAILABLE_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {ACTIVE_TOPICS_SQL}
SELECT EXISTS (
  SELECT 1 FROM active t
   WHERE EXISTS (SELECT 1 FROM outbox.messages m
                  WHERE m.topic >= t.topic AND m.topic <= t.topic
                    AND m.available_at <= now()))"
    )
});

pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    excluded: &[String],
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let sql = if excluded.is_empty() {
        CLAIM_SQL
    } else {
        CLAIM_EXCLUDING_SQL.as_str()
    };
    let rows = sqlx::query(sql)
        .bind(limit)
        .bind(excluded)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(outbox_row).collect()
}

/// Maps a claimed row (the columns of the claim statements) to what the sinks see.
pub fn outbox_row(r: &sqlx::postgres::PgRow) -> Result<OutboxRow, sqlx::Error> {
    let headers: sqlx::types::Json<BTreeMap<String, String>> = r.try_get("headers")?;
    Ok(OutboxRow {
        id: r.try_get("id")?,
        message_id: r.try_get("message_id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("key")?,
        payload: r.try_get("payload")?,
        headers: headers.0,
        created_at: r.try_get("created_at")?,
        attempts: r.try_get("attempts")?,
    })
}

/// Whether anything is claimable, without taking locks (the idle poll). `excluded` as in
/// [`claim`], so that rows of a sink whose circuit is open do not wake the workers.
pub async fn any_available<'c, E: sqlx::PgExecutor<'c>>(
    conn: E,
    excluded: &[String],
) -> Result<bool, sqlx::Error> {
    // With topics excluded, per active topic (ACTIVE_TOPICS_SQL, $1 being the unused batch
    // size): the idle poll must not walk a down sink's backlog either.
    let sql = if excluded.is_empty() {
        "SELECT EXISTS (SELECT 1 FROM outbox.messages WHERE available_at <= now() AND topic <> ALL($2::text[]))"
    } else {
        ANY_AVAILABLE_EXCLUDING_SQL.as_str()
    };
    sqlx::query_scalar(sql)
        .bind(1i64)
        .bind(excluded)
        .fetch_one(conn)
        .await
}

/// Marks delivered rows sent: deletes them, or moves them to `outbox.sent` when retention is on.
pub async fn mark_sent(
    conn: &mut PgConnection,
    ids: &[i64],
    retain: bool,
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let sql = if retain {
        "WITH d AS (DELETE FROM outbox.messages WHERE id = ANY($1) RETURNING *)
         INSERT INTO outbox.sent (id, message_id, topic, key, payload, headers, created_at, attempts)
         SELECT id, message_id, topic, key, payload, headers, created_at, attempts FROM d
         ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM outbox.messages WHERE id = ANY($1)"
    };
    Ok(sqlx::query(sql)
        .bind(ids)
        .execute(conn)
        .await?
        .rows_affected())
}

/// A failed attempt to record: the row becomes available again after `delay`.
pub struct Retry {
    pub id: i64,
    pub delay: Duration,
    pub error: String,
}

pub async fn schedule_retries(
    conn: &mut PgConnection,
    retries: &[Retry],
) -> Result<(), sqlx::Error> {
    if retries.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = retries.iter().map(|r| r.id).collect();
    let delays: Vec<i64> = retries.iter().map(|r| r.delay.as_millis() as i64).collect();
    let errors: Vec<&str> = retries.iter().map(|r| r.error.as_str()).collect();
    sqlx::query(
        "UPDATE outbox.messages m
            SET attempts = m.attempts + 1,
                available_at = now() + f.delay_ms * interval '1 millisecond',
                last_error = f.error,
                errors = m.errors || jsonb_build_array(jsonb_build_object(
                    'at', now(), 'attempt', m.attempts + 1, 'error', f.error))
           FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) AS f(id, delay_ms, error)
          WHERE m.id = f.id",
    )
    .bind(&ids)
    .bind(&delays)
    .bind(&errors)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves rows to `outbox.dead_letters` with their error history, the final error appended.
/// Never drops a row: should a dead letter with the same id exist already (it cannot while
/// `dead retry` moves rows), it is replaced and the two histories are concatenated.
pub async fn dead_letter(
    conn: &mut PgConnection,
    ids: &[i64],
    errors: &[String],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH f AS (SELECT * FROM UNNEST($1::bigint[], $2::text[]) AS f(id, error)),
              d AS (DELETE FROM outbox.messages m USING f WHERE m.id = f.id
                    RETURNING m.*, f.error AS final_error)
         INSERT INTO outbox.dead_letters
                (id, message_id, topic, key, payload, headers, created_at, attempts, last_error, errors)
         SELECT id, message_id, topic, key, payload, headers, created_at, attempts + 1, final_error,
                errors || jsonb_build_array(jsonb_build_object(
                    'at', now(), 'attempt', attempts + 1, 'error', final_error))
           FROM d
         ON CONFLICT (id) DO UPDATE SET
                message_id = EXCLUDED.message_id, topic = EXCLUDED.topic, key = EXCLUDED.key,
                payload = EXCLUDED.payload, headers = EXCLUDED.headers, created_at = EXCLUDED.created_at,
                attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
                errors = outbox.dead_letters.errors || EXCLUDED.errors, dead_at = now()",
    )
    .bind(ids)
    .bind(errors)
    .execute(conn)
    .await?;
    Ok(())
}

/// Lag of one topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopicLag {
    pub topic: String,
    pub waiting: i64,
    pub oldest_created_at: Option<DateTime<Utc>>,
    pub oldest_age_seconds: f64,
}

/// Per-topic backlog without scanning the table: the count is the sum of the insert-only
/// deltas (a handful of rows per topic after compaction) and the oldest row is the first entry
/// of the topic's range in `messages_topic_id_idx`.
///
/// The oldest-row lookup is written `topic >= $t AND topic <= $t ORDER BY topic, id` on purpose:
/// with `topic = $t ORDER BY id` the planner may walk the primary key from the oldest row and
/// filter on topic, which reads most of the table to find the first row of a quiet topic whose
/// rows are all recent (measured: 230 ms at 200,000 rows, the cost of a COUNT(*)). In the range
/// form only `messages_topic_id_idx` yields that order, so each topic costs one index descent.
/// Measured with 5 million waiting rows by `cargo run --example lag_bench` (docs/metrics.md,
/// "Lag that stays cheap").
pub const LAG_SQL: &str = "SELECT c.topic, c.waiting, o.created_at,
                coalesce(extract(epoch FROM (now() - o.created_at)), 0)::float8 AS age
           FROM (SELECT topic, sum(n)::bigint AS waiting FROM outbox.topic_counts
                  GROUP BY topic HAVING sum(n) <> 0) c
           LEFT JOIN LATERAL (SELECT m.created_at FROM outbox.messages m
                               WHERE m.topic >= c.topic AND m.topic <= c.topic
                               ORDER BY m.topic, m.id LIMIT 1) o ON true
          ORDER BY c.topic";

pub async fn lag(conn: &mut PgConnection) -> Result<Vec<TopicLag>, sqlx::Error> {
    let rows = sqlx::query(LAG_SQL).fetch_all(conn).await?;
    rows.into_iter()
        .map(|r| {
            Ok(TopicLag {
                topic: r.try_get("topic")?,
                waiting: r.try_get("waiting")?,
                oldest_created_at: r.try_get("created_at")?,
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

/// Removes sleeper registrations whose listening session is gone.
pub async fn cleanup_sleepers(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM outbox.relay_sleepers WHERE pid NOT IN (SELECT pid FROM pg_stat_activity)",
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}
