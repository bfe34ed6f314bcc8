//! Operator actions beyond dead letters and keys: pausing topics, replaying sent rows, and the
//! audit trail of every action (`outbox.topic_pauses`, `outbox.admin_audit`, migration 0012).
//!
//! - A paused topic is in `outbox.topic_pauses`; every relay reads that table with its
//!   heartbeat (once a second) and leaves the topic's rows out of its claims until it is resumed.
//!   Rows already claimed finish their batch.
//! - Replay copies rows that retention kept in `outbox.sent` back into `outbox.messages` under a
//!   new message id, with the original one in the header [`REPLAY_OF_HEADER`]: a broker that
//!   deduplicates by message id (JetStream's `Nats-Msg-Id` window, a consumer's idempotency
//!   table) would drop the same id as a duplicate, which is the opposite of what a replay is for.
//!   Consumers that must recognise a replay read the header.
//! - Every action writes one `outbox.admin_audit` row: who, through what, what, on which
//!   selection, how many rows it changed.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

/// The header a replayed message carries: the message id of the row it copies.
pub const REPLAY_OF_HEADER: &str = "outbox-replay-of";

/// A topic an operator paused.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopicPause {
    pub topic: String,
    pub paused_at: DateTime<Utc>,
    pub paused_by: String,
    pub reason: Option<String>,
}

/// Pauses `topic`; false when it was paused already (the first pause's author and reason stay).
pub async fn pause_topic(
    conn: &mut PgConnection,
    topic: &str,
    by: &str,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO outbox.topic_pauses (topic, paused_by, reason) VALUES ($1, $2, $3)
         ON CONFLICT (topic) DO NOTHING",
    )
    .bind(topic)
    .bind(by)
    .bind(reason)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Resumes `topic`; false when it was not paused.
pub async fn resume_topic(conn: &mut PgConnection, topic: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("DELETE FROM outbox.topic_pauses WHERE topic = $1")
        .bind(topic)
        .execute(conn)
        .await?
        .rows_affected();
    Ok(deleted == 1)
}

/// Every paused topic, by name.
pub async fn paused_topics(conn: &mut PgConnection) -> Result<Vec<TopicPause>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT topic, paused_at, paused_by, reason FROM outbox.topic_pauses ORDER BY topic",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TopicPause {
                topic: r.try_get("topic")?,
                paused_at: r.try_get("paused_at")?,
                paused_by: r.try_get("paused_by")?,
                reason: r.try_get("reason")?,
            })
        })
        .collect()
}

/// The names of the paused topics (the heartbeat's read).
pub async fn paused_topic_names(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT topic FROM outbox.topic_pauses ORDER BY topic")
        .fetch_all(conn)
        .await
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub via: String,
    pub action: String,
    pub target: serde_json::Value,
    pub affected: i64,
}

/// Who acts, and through what (`cli` or `http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub via: &'static str,
}

/// Records one action.
pub async fn audit(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    target: &serde_json::Value,
    affected: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox.admin_audit (actor, via, action, target, affected)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&actor.name)
    .bind(actor.via)
    .bind(action)
    .bind(sqlx::types::Json(target))
    .bind(affected)
    .execute(conn)
    .await?;
    Ok(())
}

/// The newest `limit` audit entries with an id below `before` (all when `None`), newest first.
pub async fn audit_entries(
    conn: &mut PgConnection,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, at, actor, via, action, target, affected FROM outbox.admin_audit
          WHERE $2::bigint IS NULL OR id < $2::bigint
          ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .bind(before)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(AuditEntry {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                actor: r.try_get("actor")?,
                via: r.try_get("via")?,
                action: r.try_get("action")?,
                target: r
                    .try_get::<sqlx::types::Json<serde_json::Value>, _>("target")?
                    .0,
                affected: r.try_get("affected")?,
            })
        })
        .collect()
}

/// Which sent rows a replay copies. At least one of the id range, the key or the time range
/// must be given (checked by [`ReplaySelection::validate`]); every given field must match.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReplaySelection {
    /// Lowest id (inclusive).
    pub id_from: Option<i64>,
    /// Highest id (inclusive).
    pub id_to: Option<i64>,
    /// Exactly this ordering key.
    pub key: Option<String>,
    /// Exactly this topic.
    pub topic: Option<String>,
    /// Sent at or after.
    pub sent_from: Option<DateTime<Utc>>,
    /// Sent before.
    pub sent_to: Option<DateTime<Utc>>,
}

impl ReplaySelection {
    /// What is wrong with the selection, said so that the caller knows what to pass.
    pub fn validate(&self) -> Result<(), String> {
        if self.id_from.is_none()
            && self.id_to.is_none()
            && self.key.is_none()
            && self.sent_from.is_none()
            && self.sent_to.is_none()
        {
            return Err(
                "say which sent rows to replay: an id range (--from-id/--to-id), a key (--key) \
                 or a time range (--sent-after/--sent-before); --topic alone is too wide"
                    .into(),
            );
        }
        if let (Some(a), Some(b)) = (self.id_from, self.id_to) {
            if a > b {
                return Err(format!(
                    "the id range is empty: --from-id {a} is above --to-id {b}"
                ));
            }
        }
        if let (Some(a), Some(b)) = (self.sent_from, self.sent_to) {
            if a >= b {
                return Err(format!(
                    "the time range is empty: --sent-after {a} is not before --sent-before {b}"
                ));
            }
        }
        Ok(())
    }
}

/// The selection as SQL over `outbox.sent` (alias `s`), parameters $1..$6; the statements bind
/// their limit as $7.
const REPLAY_FILTER_SQL: &str = "
    ($1::bigint IS NULL OR s.id >= $1::bigint)
AND ($2::bigint IS NULL OR s.id <= $2::bigint)
AND ($3::text IS NULL OR s.key = $3::text)
AND ($4::text IS NULL OR s.topic = $4::text)
AND ($5::timestamptz IS NULL OR s.sent_at >= $5::timestamptz)
AND ($6::timestamptz IS NULL OR s.sent_at < $6::timestamptz)";

fn bind_replay<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    s: &'q ReplaySelection,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(s.id_from)
        .bind(s.id_to)
        .bind(&s.key)
        .bind(&s.topic)
        .bind(s.sent_from)
        .bind(s.sent_to)
}

/// A sent row a replay copies (or, in a dry run, would copy).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Replayed {
    /// The sent row's id and message id.
    pub sent_id: i64,
    pub original_message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub sent_at: DateTime<Utc>,
    /// The new row's id and message id (`None` in a dry run).
    pub new_id: Option<i64>,
    pub new_message_id: Option<String>,
}

/// The sent rows the selection matches, at most `limit`, in id order (a dry run, or the list to
/// confirm).
pub async fn replay_candidates(
    conn: &mut PgConnection,
    selection: &ReplaySelection,
    limit: i64,
) -> Result<Vec<Replayed>, sqlx::Error> {
    let sql = format!(
        "SELECT s.id, s.message_id, s.topic, s.key, s.sent_at FROM outbox.sent s
          WHERE {REPLAY_FILTER_SQL} ORDER BY s.id LIMIT $7"
    );
    let rows = bind_replay(sqlx::query(&sql), selection)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Replayed {
                sent_id: r.try_get("id")?,
                original_message_id: r.try_get("message_id")?,
                topic: r.try_get("topic")?,
                key: r.try_get("key")?,
                sent_at: r.try_get("sent_at")?,
                new_id: None,
                new_message_id: None,
            })
        })
        .collect()
}

/// Copies the matching sent rows (at most `limit`, in id order) into `outbox.messages` as new
/// messages: a new message id, the original in the [`REPLAY_OF_HEADER`] header, the payload,
/// key and topic unchanged. New ids are taken in the sent rows' order, so a key's replayed
/// messages are published in their original order (after whatever of the key is waiting).
pub async fn replay(
    conn: &mut PgConnection,
    selection: &ReplaySelection,
    limit: i64,
) -> Result<Vec<Replayed>, sqlx::Error> {
    let sql = format!(
        "WITH picked AS (
           SELECT s.id, s.message_id, s.topic, s.key, s.payload, s.headers, s.sent_at
             FROM outbox.sent s
            WHERE {REPLAY_FILTER_SQL}
            ORDER BY s.id LIMIT $7),
         numbered AS (
           SELECT p.*, outbox.uuid_v7()::text AS new_message_id FROM picked p),
         inserted AS (
           INSERT INTO outbox.messages (message_id, topic, key, payload, headers)
           SELECT n.new_message_id, n.topic, n.key, n.payload,
                  n.headers || jsonb_build_object('{REPLAY_OF_HEADER}', n.message_id)
             FROM numbered n ORDER BY n.id
           RETURNING id, message_id)
         SELECT n.id AS sent_id, n.message_id, n.topic, n.key, n.sent_at,
                i.id AS new_id, i.message_id AS new_message_id
           FROM numbered n JOIN inserted i ON i.message_id = n.new_message_id
          ORDER BY n.id"
    );
    let rows = bind_replay(sqlx::query(&sql), selection)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Replayed {
                sent_id: r.try_get("sent_id")?,
                original_message_id: r.try_get("message_id")?,
                topic: r.try_get("topic")?,
                key: r.try_get("key")?,
                sent_at: r.try_get("sent_at")?,
                new_id: Some(r.try_get("new_id")?),
                new_message_id: Some(r.try_get("new_message_id")?),
            })
        })
        .collect()
}
