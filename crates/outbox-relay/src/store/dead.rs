//! The dead-letter statements behind `outbox-relay dead list|show|retry|purge`.
//!
//! Every statement takes the same [`DeadFilter`] (ids, id range, topics, keys, age since
//! `dead_at`), bound as parameters $1..$7 of [`FILTER_SQL`], so list, retry and purge (and their
//! dry runs) select exactly the same rows.
//! `retry` moves rows back into `outbox.messages` with their original id (`OVERRIDING SYSTEM
//! VALUE`), so they keep their position in the id order; a row whose message id is waiting
//! again (a new row enqueued with the same idempotency key) is left in `outbox.dead_letters`
//! and reported, never dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

/// Which dead letters a command applies to. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadFilter {
    /// Exact topic names; empty = every topic.
    pub topics: Vec<String>,
    /// Dead-lettered at least this long ago.
    pub older_than: Option<Duration>,
    /// Dead-lettered at most this long ago.
    pub newer_than: Option<Duration>,
    /// Lowest id (inclusive).
    pub id_from: Option<i64>,
    /// Highest id (inclusive).
    pub id_to: Option<i64>,
    /// Exactly these ids; empty = any id.
    pub ids: Vec<i64>,
    /// Exact ordering keys; empty = any key (or none).
    pub keys: Vec<String>,
}

impl DeadFilter {
    pub fn is_empty(&self) -> bool {
        *self == DeadFilter::default()
    }

    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.topics)
            .bind(self.older_than.map(|d| d.as_millis() as i64))
            .bind(self.newer_than.map(|d| d.as_millis() as i64))
            .bind(self.id_from)
            .bind(self.id_to)
            .bind(&self.ids)
            .bind(&self.keys)
    }
}

/// The filter as SQL over `outbox.dead_letters` (alias `d`), parameters $1..$7; the statements
/// bind their limit as $8.
const FILTER_SQL: &str = "
    (cardinality($1::text[]) = 0 OR d.topic = ANY($1::text[]))
AND ($2::bigint IS NULL OR d.dead_at <= now() - $2::bigint * interval '1 millisecond')
AND ($3::bigint IS NULL OR d.dead_at >= now() - $3::bigint * interval '1 millisecond')
AND ($4::bigint IS NULL OR d.id >= $4::bigint)
AND ($5::bigint IS NULL OR d.id <= $5::bigint)
AND (cardinality($6::bigint[]) = 0 OR d.id = ANY($6::bigint[]))
AND (cardinality($7::text[]) = 0 OR d.key = ANY($7::text[]))";

/// One line of `dead list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadSummary {
    pub id: i64,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub attempts: i32,
    pub payload_bytes: i64,
    pub created_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
    pub last_error: String,
}

/// Everything about one dead letter (`dead show`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
    pub last_error: String,
    /// `[{"at": ..., "attempt": n, "error": "..."}, ...]`, oldest first.
    pub errors: serde_json::Value,
}

pub async fn count(conn: &mut PgConnection, filter: &DeadFilter) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT count(*) FROM outbox.dead_letters d WHERE {FILTER_SQL}");
    let row = filter.bind(sqlx::query(&sql)).fetch_one(conn).await?;
    row.try_get(0)
}

/// Matching dead letters in id order, at most `limit` (all without one).
pub async fn list(
    conn: &mut PgConnection,
    filter: &DeadFilter,
    limit: Option<i64>,
) -> Result<Vec<DeadSummary>, sqlx::Error> {
    let sql = format!(
        "SELECT d.id, d.message_id, d.topic, d.key, d.attempts, length(d.payload)::bigint AS payload_bytes,
                d.created_at, d.dead_at, d.last_error
           FROM outbox.dead_letters d
          WHERE {FILTER_SQL}
          ORDER BY d.id
          LIMIT $8"
    );
    let rows = filter
        .bind(sqlx::query(&sql))
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DeadSummary {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                topic: r.try_get("topic")?,
                key: r.try_get("key")?,
                attempts: r.try_get("attempts")?,
                payload_bytes: r.try_get("payload_bytes")?,
                created_at: r.try_get("created_at")?,
                dead_at: r.try_get("dead_at")?,
                last_error: r.try_get("last_error")?,
            })
        })
        .collect()
}

pub async fn get(conn: &mut PgConnection, id: i64) -> Result<Option<DeadLetter>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, message_id, topic, key, payload, headers, attempts, created_at, dead_at, last_error, errors
           FROM outbox.dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let headers: sqlx::types::Json<BTreeMap<String, String>> = r.try_get("headers")?;
    Ok(Some(DeadLetter {
        id: r.try_get("id")?,
        message_id: r.try_get("message_id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("key")?,
        payload: r.try_get("payload")?,
        headers: headers.0,
        attempts: r.try_get("attempts")?,
        created_at: r.try_get("created_at")?,
        dead_at: r.try_get("dead_at")?,
        last_error: r.try_get("last_error")?,
        errors: r.try_get("errors")?,
    }))
}

/// What `retry` did with one dead letter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetryResult {
    pub id: i64,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    /// The error that dead-lettered it.
    pub last_error: String,
    /// Moved back into `outbox.messages` (attempts 0, available now).
    pub retried: bool,
    /// When not retried: the waiting row that already has this message id, if one was seen.
    pub conflicting_id: Option<i64>,
}

/// One statement: lock the matching dead letters, insert them into `outbox.messages` under
/// their original ids (skipping any whose id or message id is taken), delete from
/// `outbox.dead_letters` exactly the rows that were inserted, unpark the keys those dead letters
/// parked (`ordering.on_dead = "park"`: the retried row is the key's head again, so the key
/// flows from it), and report every selected row.
/// The conflict lookup reads the snapshot from before the insert, so it names the row that was
/// already waiting.
pub async fn retry(
    conn: &mut PgConnection,
    filter: &DeadFilter,
    limit: Option<i64>,
) -> Result<Vec<RetryResult>, sqlx::Error> {
    let sql = format!(
        "WITH sel AS (
            SELECT * FROM outbox.dead_letters d WHERE {FILTER_SQL} ORDER BY d.id LIMIT $8 FOR UPDATE
         ), ins AS (
            INSERT INTO outbox.messages
                   (id, message_id, topic, key, payload, headers, created_at, available_at, attempts, last_error, errors)
            OVERRIDING SYSTEM VALUE
            SELECT id, message_id, topic, key, payload, headers, created_at, now(), 0, NULL,
                   errors || jsonb_build_array(jsonb_build_object(
                       'at', now(), 'event', 'retried from dead letters; attempts reset'))
              FROM sel ORDER BY id
            ON CONFLICT DO NOTHING
            RETURNING id
         ), del AS (
            DELETE FROM outbox.dead_letters d USING ins WHERE d.id = ins.id RETURNING d.id
         ), unpark AS (
            DELETE FROM outbox.parked_keys p USING del WHERE p.dead_id = del.id
         )
         SELECT sel.id, sel.message_id, sel.topic, sel.key, sel.last_error, del.id IS NOT NULL AS retried,
                (SELECT m.id FROM outbox.messages m WHERE m.message_id = sel.message_id) AS conflicting_id
           FROM sel LEFT JOIN del ON del.id = sel.id
          ORDER BY sel.id"
    );
    let rows = filter
        .bind(sqlx::query(&sql))
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter()
        .map(|r| {
            let retried: bool = r.try_get("retried")?;
            Ok(RetryResult {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                topic: r.try_get("topic")?,
                key: r.try_get("key")?,
                last_error: r.try_get("last_error")?,
                retried,
                conflicting_id: if retried {
                    None
                } else {
                    r.try_get("conflicting_id")?
                },
            })
        })
        .collect()
}

/// The ids `purge` would delete, in id order (at most `limit`).
pub async fn select_ids(
    conn: &mut PgConnection,
    filter: &DeadFilter,
    limit: Option<i64>,
) -> Result<Vec<i64>, sqlx::Error> {
    let sql =
        format!("SELECT d.id FROM outbox.dead_letters d WHERE {FILTER_SQL} ORDER BY d.id LIMIT $8");
    let rows = filter
        .bind(sqlx::query(&sql))
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.into_iter().map(|r| r.try_get(0)).collect()
}

/// Deletes exactly these dead letters (the ones the operator confirmed); returns how many. A key
/// that one of them parked is unparked in the same statement: purging the message that parked
/// it is skipping it, so the key's later messages flow (otherwise the key would stay parked
/// with no dead letter left to act on).
pub async fn purge_ids(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "WITH unpark AS (DELETE FROM outbox.parked_keys WHERE dead_id = ANY($1))
         DELETE FROM outbox.dead_letters WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}
