//! The outbox row as the relay carries it from the claim to the sinks: the one type the storage
//! layer, the pipeline and every sink share, so that none of them imports another's types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// One claimed outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    /// Failed attempts so far.
    pub attempts: i32,
}
