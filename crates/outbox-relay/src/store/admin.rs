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

/// Where a message is: waiting in `outbox.messages`, dead in `outbox.dead_letters`, or sent and
/// kept by retention in `outbox.sent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Waiting,
    Dead,
    Sent,
}

impl Source {
    fn table(self) -> &'static str {
        match self {
            Source::Waiting => "outbox.messages",
            Source::Dead => "outbox.dead_letters",
            Source::Sent => "outbox.sent",
        }
    }

    /// The source's own time: when the row is due, was dead-lettered, was sent.
    fn time_column(self) -> &'static str {
        match self {
            Source::Waiting => "available_at",
            Source::Dead => "dead_at",
            Source::Sent => "sent_at",
        }
    }

    /// The error columns (sent rows have none).
    fn error_columns(self) -> &'static str {
        match self {
            Source::Waiting => "m.last_error, m.errors",
            Source::Dead => "m.last_error, m.errors",
            Source::Sent => "NULL::text AS last_error, '[]'::jsonb AS errors",
        }
    }
}

/// A message search: every given field must match; newest first, `limit` per page, the next
/// page from `before_id`. Each condition given is one the source's indexes serve (message id,
/// key, topic, id), except the time range, which narrows what they find (on its own it reads
/// the newest rows backwards until the page is full).
#[derive(Debug, Clone, PartialEq, Default, serde::Deserialize)]
pub struct MessageQuery {
    pub message_id: Option<String>,
    pub key: Option<String>,
    pub topic: Option<String>,
    /// Enqueued at or after.
    pub from: Option<DateTime<Utc>>,
    /// Enqueued before.
    pub to: Option<DateTime<Utc>>,
    pub before_id: Option<i64>,
}

/// One line of a search.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MessageSummary {
    pub source: Source,
    pub id: i64,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When it is due (waiting), was dead-lettered (dead) or sent (sent).
    pub at: DateTime<Utc>,
    pub attempts: i32,
    pub payload_bytes: i64,
    pub last_error: Option<String>,
}

/// Everything about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageDetail {
    pub summary: MessageSummary,
    pub payload: Vec<u8>,
    pub headers: serde_json::Value,
    pub errors: serde_json::Value,
}

/// The messages of `source` matching `q`, newest first, at most `limit`. The statement holds
/// only the conditions given, so that each combination is planned for its own index.
pub async fn search_messages(
    conn: &mut PgConnection,
    source: Source,
    q: &MessageQuery,
    limit: i64,
) -> Result<Vec<MessageSummary>, sqlx::Error> {
    let mut b = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT m.id, m.message_id, m.topic, m.key, m.created_at, m.{} AS at, m.attempts,
                octet_length(m.payload)::bigint AS payload_bytes, {}
           FROM {} m WHERE true",
        source.time_column(),
        source.error_columns(),
        source.table()
    ));
    if let Some(v) = &q.message_id {
        b.push(" AND m.message_id = ").push_bind(v.clone());
    }
    if let Some(v) = &q.key {
        b.push(" AND m.key = ").push_bind(v.clone());
    }
    if let Some(v) = &q.topic {
        b.push(" AND m.topic = ").push_bind(v.clone());
    }
    if let Some(v) = q.from {
        b.push(" AND m.created_at >= ").push_bind(v);
    }
    if let Some(v) = q.to {
        b.push(" AND m.created_at < ").push_bind(v);
    }
    if let Some(v) = q.before_id {
        b.push(" AND m.id < ").push_bind(v);
    }
    b.push(" ORDER BY m.id DESC LIMIT ").push_bind(limit);
    let rows = b.build().fetch_all(conn).await?;
    rows.iter().map(|r| summary(source, r)).collect()
}

fn summary(source: Source, r: &sqlx::postgres::PgRow) -> Result<MessageSummary, sqlx::Error> {
    Ok(MessageSummary {
        source,
        id: r.try_get("id")?,
        message_id: r.try_get("message_id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("key")?,
        created_at: r.try_get("created_at")?,
        at: r.try_get("at")?,
        attempts: r.try_get("attempts")?,
        payload_bytes: r.try_get("payload_bytes")?,
        last_error: r.try_get("last_error")?,
    })
}

/// One message of `source` by its id, with payload, headers and error history.
pub async fn message(
    conn: &mut PgConnection,
    source: Source,
    id: i64,
) -> Result<Option<MessageDetail>, sqlx::Error> {
    let sql = format!(
        "SELECT m.id, m.message_id, m.topic, m.key, m.created_at, m.{} AS at, m.attempts,
                octet_length(m.payload)::bigint AS payload_bytes, {}, m.payload, m.headers
           FROM {} m WHERE m.id = $1",
        source.time_column(),
        source.error_columns(),
        source.table()
    );
    let Some(r) = sqlx::query(&sql).bind(id).fetch_optional(conn).await? else {
        return Ok(None);
    };
    Ok(Some(MessageDetail {
        summary: summary(source, &r)?,
        payload: r.try_get("payload")?,
        headers: r
            .try_get::<sqlx::types::Json<serde_json::Value>, _>("headers")?
            .0,
        errors: r
            .try_get::<sqlx::types::Json<serde_json::Value>, _>("errors")?
            .0,
    }))
}

/// How many ordering slots each relay holds (at most 256 rows read).
pub async fn slots_by_relay(
    conn: &mut PgConnection,
) -> Result<std::collections::BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relay_id, count(*) FROM outbox.partition_leases
          WHERE relay_id IS NOT NULL GROUP BY relay_id",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}
