//! Kafka sink (rdkafka, librdkafka built from source).
//!
//! Each row is produced to the Kafka topic its route renders (`{topic}` by default) with the
//! outbox key as the message key, so one key's messages land in one partition, in enqueue order
//! (the producer is idempotent, `acks=all`, and the batch is queued in claim order). Headers
//! are carried, plus `outbox-message-id` (the idempotency key), `outbox-topic` and
//! `outbox-key`; the Kafka timestamp is the row's `created_at`.
//!
//! The whole batch is queued first, then the delivery reports are awaited; a row is
//! [`Outcome::Delivered`](crate::sinks::Outcome::Delivered) only after its report succeeded.
//! Errors are sorted in `service.rs`: broker down, timeouts, leader changes and a full queue make
//! the whole sink unavailable (rows released, no attempt counted); a message too large, an
//! unknown topic, a topic the relay may not write to or an invalid record fail that row alone,
//! permanently. Before producing to a topic it does not know yet, the sink asks the broker
//! whether it exists (`topics.rs`), so a missing topic is refused at once instead of holding
//! the batch for librdkafka's `topic.metadata.propagation.max.ms`. Kafka does not report duplicates: a re-published row (after a crash or a
//! timeout) arrives again with the same `outbox-message-id` header, for consumers to drop.

mod config;
mod service;
mod sink;
mod topics;

use std::sync::Arc;

use async_trait::async_trait;

pub use config::{KafkaConfig, KafkaRoute, DEFAULT_BROKERS};
pub use sink::KafkaSink;

use crate::sinks::{route_topics, BrokerConfig, Sink, SinkError};

/// `kind = "kafka"`.
pub const KIND: &str = "kafka";

#[async_trait]
impl BrokerConfig for KafkaConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self) -> Result<(), String> {
        KafkaConfig::validate(self)
    }

    fn route_topics(&self) -> Vec<&[String]> {
        route_topics(&self.routes)
    }

    async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        Ok(Arc::new(KafkaSink::new(name, self.clone())?))
    }

    /// The local Kafka, every topic to the Kafka topic of the same name.
    fn local_default() -> Option<Self> {
        Some(KafkaConfig::default())
    }
}
