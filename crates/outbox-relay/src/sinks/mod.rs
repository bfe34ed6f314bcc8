//! The sink contract: a batch of outbox rows in, one outcome per row out.
//!
//! A sink owns its broker connection and nothing else: no SQL, no retry policy, no metrics
//! registry. It publishes the whole batch with many acknowledgements outstanding, awaits them,
//! and reports per row whether the broker confirmed it ([`Outcome::Delivered`],
//! [`Outcome::Duplicate`]) or why not ([`Outcome::Failed`]). The relay marks only confirmed rows
//! sent; everything else follows the retry policy in [`crate::relay`].
//!
//! One folder per broker (`nats/`, `amqp/`, `kafka/`), each with `config.rs` (serde struct,
//! defaults, `validate()`), `sink.rs` (this contract) and `service.rs` (the broker calls).
//! Adding a broker is a new folder plus one variant in [`SinkConfig`].

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod amqp;
pub mod kafka;
pub mod nats;

/// The header that carries the idempotency key on every broker (besides each broker's native
/// field: `Nats-Msg-Id`, AMQP `message_id`).
pub const IDEMPOTENCY_HEADER: &str = "outbox-message-id";
/// The header that carries the ordering key, when the row has one.
pub const KEY_HEADER: &str = "outbox-key";
/// The header that carries the logical topic.
pub const TOPIC_HEADER: &str = "outbox-topic";

pub use crate::message::OutboxRow;

/// A row with the index of the sink route that matched its topic.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub row: &'a OutboxRow,
    pub route: usize,
}

/// What happened to one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The broker acknowledged the message.
    Delivered,
    /// The broker acknowledged it as a repeat of a message it already has (same idempotency key).
    Duplicate,
    /// Not delivered; the error says whether retrying can help.
    Failed(SinkError),
}

/// How the relay should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The whole sink is unreachable (connection lost, authentication failed, timeout): the
    /// row is released untouched, no attempt is counted, and the sink's circuit breaker opens.
    Unavailable,
    /// This message failed but may succeed later (a nack, a returned message): count an
    /// attempt and retry it after a backoff.
    Retriable,
    /// Retrying cannot help (too large, invalid header, no route): dead-letter it now.
    Permanent,
}

/// A sink failure. `error_type` is a short, bounded name usable as a metric label; `message`
/// is the human explanation (never containing credentials).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub kind: ErrorKind,
    pub error_type: &'static str,
    pub message: String,
}

impl SinkError {
    pub fn unavailable(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            error_type,
            message: message.into(),
        }
    }
    pub fn retriable(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retriable,
            error_type,
            message: message.into(),
        }
    }
    pub fn permanent(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            error_type,
            message: message.into(),
        }
    }
}

/// A destination broker.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The broker kind, as a metric label: `nats`, `amqp`, `kafka`.
    fn kind(&self) -> &'static str;

    /// Publishes the batch and returns exactly one outcome per envelope, in the same order.
    /// The relay enforces `relay.publish_timeout_secs` around this call.
    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome>;

    /// Whether the broker is reachable and the destinations exist (readiness, breaker probes).
    async fn check(&self) -> Result<(), SinkError>;
}

/// A route pattern list, shared by every sink's route type.
pub trait RouteTopics {
    fn topics(&self) -> &[String];
}

/// A sink's configuration; `kind` selects the broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    Nats(nats::NatsConfig),
    Kafka(kafka::KafkaConfig),
    Amqp(amqp::AmqpConfig),
}

impl SinkConfig {
    pub fn default_nats() -> Self {
        SinkConfig::Nats(nats::NatsConfig::default())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Nats(_) => "nats",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Amqp(_) => "amqp",
        }
    }

    /// Problems in sentences, prefixed by the key below `sinks.<name>`.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            SinkConfig::Nats(c) => c.validate(),
            SinkConfig::Kafka(c) => c.validate(),
            SinkConfig::Amqp(c) => c.validate(),
        }
    }

    /// The topic patterns of each route, in order.
    pub fn route_topics(&self) -> Vec<&[String]> {
        match self {
            SinkConfig::Nats(c) => c.routes.iter().map(|r| r.topics()).collect(),
            SinkConfig::Kafka(c) => c.routes.iter().map(|r| r.topics()).collect(),
            SinkConfig::Amqp(c) => c.routes.iter().map(|r| r.topics()).collect(),
        }
    }

    /// Builds the sink. Must not fail because the broker is down: sinks connect (and reconnect)
    /// in the background and report [`ErrorKind::Unavailable`] meanwhile.
    pub async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        match self {
            SinkConfig::Nats(c) => Ok(Arc::new(nats::NatsSink::new(name, c.clone()).await?)),
            SinkConfig::Kafka(c) => Ok(Arc::new(kafka::KafkaSink::new(name, c.clone())?)),
            SinkConfig::Amqp(c) => Ok(Arc::new(amqp::AmqpSink::new(name, c.clone()).await?)),
        }
    }
}

/// Fills `{topic}` and `{key}` in a destination template. A row without a key yields an empty
/// string for `{key}`.
pub fn render_template(template: &str, row: &OutboxRow) -> String {
    template
        .replace("{topic}", &row.topic)
        .replace("{key}", row.key.as_deref().unwrap_or(""))
}

/// Checks a template uses only the placeholders we know.
pub fn validate_template(field: &str, template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("{field}: unclosed '{{' in {template:?}"))?;
        let name = &rest[start + 1..start + end];
        if name != "topic" && name != "key" {
            return Err(format!(
                "{field}: unknown placeholder {{{name}}} in {template:?}; use {{topic}} or {{key}}"
            ));
        }
        rest = &rest[start + end + 1..];
    }
    if template.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use std::collections::BTreeMap;

    #[test]
    fn templates() {
        let row = OutboxRow {
            id: 1,
            message_id: "m".into(),
            topic: "user.created".into(),
            key: Some("42".into()),
            payload: vec![],
            headers: BTreeMap::new(),
            created_at: Utc::now(),
            attempts: 0,
        };
        assert_eq!(
            render_template("events.{topic}.{key}", &row),
            "events.user.created.42"
        );
        assert!(validate_template("subject", "a.{nope}")
            .unwrap_err()
            .contains("{nope}"));
        assert!(validate_template("subject", "a.{topic").is_err());
    }
}
