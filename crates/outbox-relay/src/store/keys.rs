//! Keys held back and parked (docs/ordering.md): what `status` and `outbox-relay keys list`
//! show, the gauges, and the operator actions `keys release` (by key, by topic, or both) and
//! `keys skip`.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use crate::message::Locked;

/// A key whose oldest waiting message failed and waits for its next attempt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldKey {
    pub key: String,
    pub topic: String,
    pub head_id: i64,
    pub message_id: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Messages of the key waiting behind the head.
    pub behind: i64,
}

/// A key parked after a dead letter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedKey {
    pub key: String,
    pub topic: String,
    pub dead_id: i64,
    pub message_id: String,
    pub reason: String,
    pub parked_at: DateTime<Utc>,
    /// Messages of the key waiting until it is released.
    pub waiting: i64,
}

/// Held-back keys, oldest first. Only a key's head can be waiting for a retry (a later
/// message is never published before an earlier one succeeded), so these are the keyed rows
/// with attempts > 0 that have no earlier row: `messages_key_retry_idx` finds them.
pub async fn held_keys(conn: &mut PgConnection, limit: i64) -> Result<Vec<HeldKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT m.key, m.topic, m.id, m.message_id, m.attempts, m.available_at, m.last_error,
                (SELECT count(*) FROM outbox.messages w WHERE w.key = m.key AND w.id > m.id) AS behind
           FROM outbox.messages m
          WHERE m.key IS NOT NULL AND m.attempts > 0
            AND NOT EXISTS (SELECT 1 FROM outbox.messages e WHERE e.key = m.key AND e.id < m.id)
          ORDER BY m.id
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(HeldKey {
                key: r.try_get("key")?,
                topic: r.try_get("topic")?,
                head_id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                attempts: r.try_get("attempts")?,
                next_attempt_at: r.try_get("available_at")?,
                last_error: r.try_get("last_error")?,
                behind: r.try_get("behind")?,
            })
        })
        .collect()
}

pub async fn parked_keys(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<ParkedKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.key, p.topic, p.dead_id, p.message_id, p.reason, p.parked_at,
                (SELECT count(*) FROM outbox.messages w WHERE w.key = p.key) AS waiting
           FROM outbox.parked_keys p
          ORDER BY p.parked_at, p.key
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter().map(parked_key).collect()
}

/// Held-back and parked keys per topic, for the gauges.
pub async fn key_counts(
    conn: &mut PgConnection,
) -> Result<(Vec<(String, i64)>, Vec<(String, i64)>), sqlx::Error> {
    let held = sqlx::query_as(
        "SELECT topic, count(DISTINCT key) FROM outbox.messages
          WHERE key IS NOT NULL AND attempts > 0 GROUP BY topic",
    )
    .fetch_all(&mut *conn)
    .await?;
    let parked = sqlx::query_as("SELECT topic, count(*) FROM outbox.parked_keys GROUP BY topic")
        .fetch_all(&mut *conn)
        .await?;
    Ok((held, parked))
}

/// Parked keys that are among `keys` (empty: any key) and parked for one of `topics` (empty:
/// any topic), in the order of `parked_keys`.
pub async fn parked_matching(
    conn: &mut PgConnection,
    keys: &[String],
    topics: &[String],
) -> Result<Vec<ParkedKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.key, p.topic, p.dead_id, p.message_id, p.reason, p.parked_at,
                (SELECT count(*) FROM outbox.messages w WHERE w.key = p.key) AS waiting
           FROM outbox.parked_keys p
          WHERE (cardinality($1::text[]) = 0 OR p.key = ANY($1::text[]))
            AND (cardinality($2::text[]) = 0 OR p.topic = ANY($2::text[]))
          ORDER BY p.parked_at, p.key",
    )
    .bind(keys)
    .bind(topics)
    .fetch_all(conn)
    .await?;
    rows.iter().map(parked_key).collect()
}

/// Maps a row of the parked-key statements to a [`ParkedKey`].
fn parked_key(r: &sqlx::postgres::PgRow) -> Result<ParkedKey, sqlx::Error> {
    Ok(ParkedKey {
        key: r.try_get("key")?,
        topic: r.try_get("topic")?,
        dead_id: r.try_get("dead_id")?,
        message_id: r.try_get("message_id")?,
        reason: r.try_get("reason")?,
        parked_at: r.try_get("parked_at")?,
        waiting: r.try_get("waiting")?,
    })
}

/// Unparks exactly these keys (their dead letters stay); returns the keys that were parked.
pub async fn release_keys(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("DELETE FROM outbox.parked_keys WHERE key = ANY($1) RETURNING key")
        .bind(keys)
        .fetch_all(conn)
        .await
}

/// Unparks `key`; the dead letter stays. Returns false when the key was not parked.
pub async fn release(conn: &mut PgConnection, key: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM outbox.parked_keys WHERE key = $1")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// What `keys skip` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub key: String,
    /// The topic of what blocked the key: its failing head, or the dead letter that parked it.
    pub topic: String,
    /// The head message moved to the dead letters, if the key was held back by a retry.
    pub dead_lettered: Option<String>,
    pub unparked: bool,
    /// True when nothing was changed (`--dry-run`).
    pub dry_run: bool,
}

/// Why `keys skip` could not act.
#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    #[error("key {0:?} is neither held back (its oldest message has not failed) nor parked: nothing to skip")]
    NothingToSkip(String),
    #[error("the oldest message of key {0:?} is being published right now: try again in a moment")]
    InFlight(String),
    #[error("key {key:?} is blocked on topic {actual:?}, not {wanted:?}: `outbox-relay keys skip {key} --topic {actual}` skips it")]
    OtherTopic {
        key: String,
        actual: String,
        wanted: String,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Gives up on what blocks `key`: dead-letters its head if the head waits for a retry (the
/// reason says an operator skipped it), and unparks the key. One transaction. With `topic`,
/// only when what blocks the key belongs to that topic (the TOPIC column of `keys list`); with
/// `dry_run`, the transaction is rolled back and the result says what would have been done.
pub async fn skip(
    conn: &mut PgConnection,
    key: &str,
    topic: Option<&str>,
    dry_run: bool,
) -> Result<Skipped, SkipError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // The head's ctid: dead_letter addresses it by that (the lock taken here keeps it put).
    let head: Option<(i64, String, i32, String, String)> = sqlx::query_as(
        "SELECT id, message_id, attempts, topic, ctid::text FROM outbox.messages WHERE key = $1
          ORDER BY id LIMIT 1
            FOR UPDATE SKIP LOCKED",
    )
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    let locked_head: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox.messages WHERE key = $1 AND id < coalesce($2, 9223372036854775807))",
    )
    .bind(key)
    .bind(head.as_ref().map(|h| h.0))
    .fetch_one(&mut *tx)
    .await?;
    if locked_head {
        return Err(SkipError::InFlight(key.to_string()));
    }
    let parked_topic: Option<String> =
        sqlx::query_scalar("SELECT topic FROM outbox.parked_keys WHERE key = $1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
    let failing_head = head.filter(|h| h.2 > 0);
    let Some(blocked_on) = failing_head
        .as_ref()
        .map(|h| h.3.clone())
        .or_else(|| parked_topic.clone())
    else {
        return Err(SkipError::NothingToSkip(key.to_string()));
    };
    if let Some(wanted) = topic.filter(|t| *t != blocked_on) {
        return Err(SkipError::OtherTopic {
            key: key.to_string(),
            actual: blocked_on,
            wanted: wanted.to_string(),
        });
    }
    let mut dead_lettered = None;
    if let Some((id, message_id, _, _, ctid)) = failing_head {
        super::complete::dead_letter(
            &mut tx,
            &[Locked { id, ctid }],
            &[
                "skipped by an operator (outbox-relay keys skip) while waiting for a retry"
                    .to_string(),
            ],
        )
        .await?;
        dead_lettered = Some(message_id);
    }
    let unparked = release(&mut tx, key).await?;
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(Skipped {
        key: key.to_string(),
        topic: blocked_on,
        dead_lettered,
        unparked,
        dry_run,
    })
}
