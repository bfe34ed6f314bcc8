//! Enqueue outbox messages in the same transaction as your business rows.
//!
//! This crate is what applications link: it depends on sqlx, serde, serde_json, uuid and chrono,
//! and on nothing broker-related. It writes rows into `outbox.messages`; the `outbox-relay`
//! process publishes them to NATS, RabbitMQ or Kafka once the transaction has committed. A
//! rolled-back transaction leaves no row, so nothing is published for it.
//!
//! A complete program, which creates its own table: `examples/enqueue.rs`.
//!
//! **TLS.** The crate enables no TLS feature of sqlx and opens no connection: it writes on the
//! connection or transaction the application hands it, encrypted or not as the application's
//! own sqlx features (`tls-rustls-…` or `tls-native-tls`) and connect options (`sslmode`) made
//! it. Linking it adds no TLS stack and changes no TLS setting.
//!
//! ```no_run
//! use outbox_client::{enqueue, Message};
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct UserCreated<'a> {
//!     id: i64,
//!     email: &'a str,
//! }
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//!
//! let (user_id,): (i64,) =
//!     sqlx::query_as("INSERT INTO users (email) VALUES ($1) RETURNING id")
//!         .bind("ada@example.com")
//!         .fetch_one(&mut *tx)
//!         .await?;
//!
//! let message = Message::json(
//!     "user.created",
//!     &UserCreated { id: user_id, email: "ada@example.com" },
//! )?
//! .key(user_id.to_string()) // messages of one user keep their order
//! .header("source", "signup");
//! let enqueued = enqueue(&mut tx, &message).await?;
//!
//! tx.commit().await?; // the user and its event exist together, or neither does
//! println!("enqueued {} as row {}", enqueued.message_id, enqueued.id);
//! # Ok(())
//! # }
//! ```
//!
//! Guarantees:
//! - The message id is the idempotency key. It is a UUIDv7 unless you set one with
//!   [`Message::message_id`]. Enqueueing a message id that is already waiting (or, when the
//!   relay keeps sent rows, already sent) writes nothing and returns the existing row, so an
//!   application retry never publishes twice. A batch whose ids are all generated here skips
//!   those checks (a fresh UUIDv7 cannot exist yet), so it costs what a plain INSERT costs.
//! - [`enqueue_many`] writes any number of messages in one round trip, in order.
//! - A message id whose existing row the relay deletes in the instant between the INSERT and the
//!   lookup is written again; should that happen on every attempt, the error is
//!   [`Error::ConflictVanished`], and retrying the transaction is the fix
//!   ([`Error::is_retriable`]).
//! - The payload is published byte for byte; headers are carried as broker headers.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

/// Longest accepted message id (idempotency key), in bytes. AMQP's `message_id` is a short string.
pub const MAX_MESSAGE_ID_LEN: usize = 200;
/// Longest accepted topic name, in bytes (Kafka's topic limit).
pub const MAX_TOPIC_LEN: usize = 249;

/// Errors from enqueueing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message is not valid; the text says which field and how to fix it.
    #[error("invalid outbox message: {0}")]
    Invalid(String),
    /// The payload could not be serialized to JSON.
    #[error("could not serialize the payload to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A message id conflicted with an existing row that was gone by the time it was read, in
    /// every one of the enqueue's attempts: the relay published (and deleted) or dead-lettered
    /// that row in the instant between the INSERT and the lookup. Nothing is wrong with the
    /// message; retry the transaction, and the message is then written anew or found.
    #[error(
        "message id {message_id:?} conflicted with a row that was gone before it could be read \
         ({ENQUEUE_ROUNDS} times); retry the transaction"
    )]
    ConflictVanished {
        /// The message id whose row vanished.
        message_id: String,
    },
    /// The database refused the statement or could not be reached.
    #[error("database error while enqueueing: {0}")]
    Database(#[from] sqlx::Error),
}

impl Error {
    /// True when retrying the whole transaction may succeed: a vanished conflict, or a
    /// database error of the kind PostgreSQL asks to retry (serialization failure, deadlock).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::ConflictVanished { .. } => true,
            Error::Database(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("40001" | "40P01"))
            }
            _ => false,
        }
    }
}

/// One message to enqueue. Build it with [`Message::json`] or [`Message::bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    headers: BTreeMap<String, String>,
    message_id: Option<String>,
    available_at: Option<DateTime<Utc>>,
}

impl Message {
    /// A message whose payload is `value` serialized as JSON; sets `content-type: application/json`.
    pub fn json<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> Result<Self, Error> {
        Ok(Self::bytes(topic, serde_json::to_vec(value)?)
            .header("content-type", "application/json"))
    }

    /// A message whose payload is published exactly as these bytes.
    pub fn bytes(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            headers: BTreeMap::new(),
            message_id: None,
            available_at: None,
        }
    }

    /// The ordering key (for example the aggregate id): messages of one key keep their order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header, carried to the broker as a message header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the idempotency key. Without it, a fresh UUIDv7 is used.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Delays delivery until `at`.
    pub fn available_at(mut self, at: DateTime<Utc>) -> Self {
        self.available_at = Some(at);
        self
    }

    /// The topic (logical destination).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic; the same as [`Message::topic`].
    #[deprecated(note = "use Message::topic")]
    pub fn topic_name(&self) -> &str {
        &self.topic
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The ordering key, if set. (`key` is the builder method that sets it.)
    pub fn get_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The message id the application set; `None` means a UUIDv7 is generated at enqueue.
    /// (`message_id` is the builder method that sets it.)
    pub fn get_message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The delivery delay, if set. (`available_at` is the builder method that sets it.)
    pub fn get_available_at(&self) -> Option<DateTime<Utc>> {
        self.available_at
    }

    fn validate(&self) -> Result<(), Error> {
        if self.topic.is_empty() || self.topic.len() > MAX_TOPIC_LEN {
            return Err(Error::Invalid(format!(
                "topic must be 1 to {MAX_TOPIC_LEN} bytes long, got {} bytes",
                self.topic.len()
            )));
        }
        if let Some(id) = &self.message_id {
            if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN {
                return Err(Error::Invalid(format!(
                    "message_id must be 1 to {MAX_MESSAGE_ID_LEN} bytes long, got {} bytes",
                    id.len()
                )));
            }
        }
        if let Some(name) = self.headers.keys().find(|k| k.is_empty()) {
            return Err(Error::Invalid(format!(
                "header names must not be empty (got {name:?})"
            )));
        }
        Ok(())
    }
}

/// What [`enqueue`] wrote, or found already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The outbox row's sequence id.
    pub id: i64,
    /// The idempotency key.
    pub message_id: String,
    /// False when a row with this message id already existed and nothing was written.
    pub inserted: bool,
}

/// Enqueues one message on a transaction (`&mut tx`) or a connection (`&mut *conn`, e.g. from
/// `pool.acquire()`). The row exists for the relay once that transaction commits.
pub async fn enqueue(conn: &mut PgConnection, message: &Message) -> Result<Enqueued, Error> {
    let mut rows = enqueue_many(conn, std::slice::from_ref(message)).await?;
    rows.pop()
        .ok_or_else(|| Error::Invalid("the database returned no row for the message".into()))
}

/// The statement behind [`enqueue`] and [`enqueue_many`]: one round trip for any number of
/// messages. A message id that is already waiting (or already sent, with retention on) is not
/// written again; such ids are simply missing from what it returns.
const INSERT_SQL: &str = r#"
INSERT INTO outbox.messages (message_id, topic, key, payload, headers, available_at)
SELECT i.message_id, i.topic, i.key, i.payload, i.headers, coalesce(i.available_at, now())
  FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[], $6::timestamptz[])
       WITH ORDINALITY AS i(message_id, topic, key, payload, headers, available_at, ord)
 WHERE NOT EXISTS (SELECT 1 FROM outbox.sent s WHERE s.message_id = i.message_id)
 ORDER BY i.ord
ON CONFLICT (message_id) DO NOTHING
RETURNING id, message_id
"#;

/// The same INSERT for a batch whose message ids were all generated here: a fresh UUIDv7 cannot
/// exist already, so the idempotency checks (the `outbox.sent` lookup and the speculative
/// insertion of `ON CONFLICT`, together about a fifth of the statement's cost) are skipped. Should
/// one collide anyway, the unique constraint rejects it with an error: never a silent loss.
const INSERT_FRESH_SQL: &str = r#"
INSERT INTO outbox.messages (message_id, topic, key, payload, headers, available_at)
SELECT i.message_id, i.topic, i.key, i.payload, i.headers, coalesce(i.available_at, now())
  FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[], $6::timestamptz[])
       WITH ORDINALITY AS i(message_id, topic, key, payload, headers, available_at, ord)
 ORDER BY i.ord
RETURNING id, message_id
"#;

/// How many times a message id whose conflicting row vanished before the lookup is tried;
/// after that, [`Error::ConflictVanished`].
const ENQUEUE_ROUNDS: usize = 4;

/// Only when some message ids existed already: their rows, waiting or sent.
const EXISTING_SQL: &str = r#"
SELECT id, message_id FROM outbox.messages WHERE message_id = ANY($1)
UNION ALL
SELECT id, message_id FROM outbox.sent WHERE message_id = ANY($1)
"#;

/// Enqueues many messages in one round trip, in the order given (a second round trip only when
/// some message ids already existed). A message id repeated inside `messages` is written once;
/// its later copies return the first one's row with `inserted = false`.
///
/// Takes `&mut PgConnection` (what `&mut tx` derefs to) rather than a generic executor so that the
/// returned future is `Send` in `tokio::spawn` and web handlers.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    messages: &[Message],
) -> Result<Vec<Enqueued>, Error> {
    if messages.is_empty() {
        return Ok(Vec::new());
    }
    let n = messages.len();
    // Every message's id, generated where the application gave none.
    let mut all_ids = Vec::with_capacity(n);
    for m in messages {
        m.validate()?;
        all_ids.push(
            m.message_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        );
    }
    // First occurrences only: the rows to write.
    let mut first = std::collections::HashSet::with_capacity(n);
    let (mut ids, mut topics, mut keys, mut payloads, mut headers, mut available) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (m, id) in messages.iter().zip(&all_ids) {
        if first.insert(id.as_str()) {
            ids.push(id.as_str());
            topics.push(m.topic.as_str());
            keys.push(m.key.as_deref());
            payloads.push(m.payload.as_slice());
            headers.push(sqlx::types::Json(&m.headers));
            available.push(m.available_at);
        }
    }
    let mut rows: std::collections::HashMap<String, (i64, bool)> =
        std::collections::HashMap::with_capacity(ids.len());
    // Indexes of the rows still to write. A conflicting row can vanish between
    // the INSERT and the lookup (the relay sent and deleted it, or dead-lettered it); such ids
    // are inserted again, exactly as if the application had enqueued them a moment later.
    let mut pending: Vec<usize> = (0..ids.len()).collect();
    let sql = if messages.iter().any(|m| m.message_id.is_some()) {
        INSERT_SQL
    } else {
        INSERT_FRESH_SQL
    };
    for round in 0..ENQUEUE_ROUNDS {
        let inserted: Vec<(i64, String)> = sqlx::query_as(sql)
            .bind(pending.iter().map(|&i| ids[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| topics[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| keys[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| payloads[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| headers[i]).collect::<Vec<_>>())
            .bind(pending.iter().map(|&i| available[i]).collect::<Vec<_>>())
            .fetch_all(&mut *conn)
            .await?;
        rows.extend(inserted.into_iter().map(|(id, mid)| (mid, (id, true))));
        pending.retain(|&i| !rows.contains_key(ids[i]));
        if pending.is_empty() {
            break;
        }
        let missing: Vec<&str> = pending.iter().map(|&i| ids[i]).collect();
        let existing: Vec<(i64, String)> = sqlx::query_as(EXISTING_SQL)
            .bind(&missing)
            .fetch_all(&mut *conn)
            .await?;
        for (id, mid) in existing {
            rows.entry(mid).or_insert((id, false));
        }
        pending.retain(|&i| !rows.contains_key(ids[i]));
        if pending.is_empty() || round + 1 == ENQUEUE_ROUNDS {
            break;
        }
    }
    let mut seen = std::collections::HashSet::with_capacity(n);
    all_ids
        .into_iter()
        .map(|message_id| {
            let Some(&(id, inserted)) = rows.get(&message_id) else {
                return Err(Error::ConflictVanished { message_id });
            };
            let first_copy = seen.insert(message_id.clone());
            Ok(Enqueued {
                id,
                message_id,
                inserted: inserted && first_copy,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_sets_content_type_and_bytes() {
        let m = Message::json("user.created", &serde_json::json!({"id": 1})).unwrap();
        assert_eq!(m.payload(), br#"{"id":1}"#);
        assert_eq!(
            m.headers().get("content-type").map(String::as_str),
            Some("application/json")
        );
    }

    #[test]
    fn getters_return_what_the_builder_set() {
        let at = Utc::now();
        let m = Message::bytes("t", b"p".to_vec())
            .key("k")
            .header("h", "v")
            .message_id("m")
            .available_at(at);
        assert_eq!(m.topic(), "t");
        assert_eq!(m.payload(), b"p");
        assert_eq!(m.headers().get("h").map(String::as_str), Some("v"));
        assert_eq!(m.get_key(), Some("k"));
        assert_eq!(m.get_message_id(), Some("m"));
        assert_eq!(m.get_available_at(), Some(at));
        let bare = Message::bytes("t", Vec::new());
        assert_eq!(
            (
                bare.get_key(),
                bare.get_message_id(),
                bare.get_available_at()
            ),
            (None, None, None)
        );
    }

    #[test]
    fn a_vanished_conflict_is_retriable_and_says_so() {
        let e = Error::ConflictVanished {
            message_id: "m-1".into(),
        };
        assert!(e.is_retriable());
        assert!(e.to_string().contains("retry the transaction"), "{e}");
        assert!(!Error::Invalid("x".into()).is_retriable());
    }

    #[test]
    fn invalid_topic_and_id_are_named() {
        let err = Message::bytes("", b"x".to_vec()).validate().unwrap_err();
        assert!(
            err.to_string().contains("topic must be 1 to 249 bytes"),
            "{err}"
        );
        let err = Message::bytes("t", b"x".to_vec())
            .message_id("x".repeat(201))
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("message_id must be 1 to 200 bytes"),
            "{err}"
        );
    }
}
