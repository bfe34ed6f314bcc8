//! RabbitMQ (AMQP 0-9-1) sink, on lapin.
//!
//! Each row is published to its route's exchange with the routing key its template renders
//! (`{topic}` by default), `message_id` set to the row's idempotency key, the row's headers plus
//! `outbox-message-id`, `outbox-topic` and `outbox-key` as AMQP headers, `content_type` from a
//! `content-type` header, persistent delivery mode and the row's creation time as `timestamp`.
//!
//! What it guarantees:
//! - Each batch goes on a confirm-mode channel of its own: it is sent in full, then its
//!   confirms are awaited together; a row is [`Outcome::Delivered`](crate::sinks::Outcome) only when the broker acked
//!   it **and** did not return it. With `mandatory` (the default) an unroutable message comes
//!   back as a returned message: that row fails with error type `unroutable` and is retried,
//!   never counted as delivered. A nack fails the row with `nack` (retried).
//! - A connection supervisor reconnects with exponential backoff. While there is no usable
//!   connection every row fails as unavailable, so the relay releases it untouched (no attempt
//!   counted), opens the sink's circuit and `/readyz` reports the sink down; rows whose confirm
//!   never came are published again (same `message_id`) once the broker is back.
//! - Exchanges listed under `exchanges` are declared on every connection; any other exchange a
//!   route uses must exist, or the sink stays down with a message that says so.
//! - Credentials in the URL are never logged: errors carry the URL with its password
//!   redacted, the password is passed to the broker outside the URI, and [`LOG_DIRECTIVES`]
//!   keep lapin's frame dumps (which include the login frame) out of the logs.

mod config;
mod service;
mod sink;
mod tls;

use std::sync::Arc;

use async_trait::async_trait;

pub use config::{AmqpConfig, AmqpExchange, AmqpRoute, AmqpTls, DEFAULT_URL};
pub use sink::AmqpSink;

use crate::sinks::{route_topics, BrokerConfig, Sink, SinkError};

/// `kind = "amqp"`.
pub const KIND: &str = "amqp";

/// Log filter directives the binary adds to whatever filter is configured. At trace level lapin
/// prints every frame it writes, including `connection.start-ok` whose SASL response carries
/// the password (as a list of byte values); and it logs each returned message, payload and
/// headers included, at warn level, while this sink already reports unroutable rows itself.
pub const LOG_DIRECTIVES: &[&str] = &["lapin=info", "lapin::returned_messages=error"];

#[async_trait]
impl BrokerConfig for AmqpConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self) -> Result<(), String> {
        AmqpConfig::validate(self)
    }

    fn route_topics(&self) -> Vec<&[String]> {
        route_topics(&self.routes)
    }

    async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        Ok(Arc::new(AmqpSink::new(name, self.clone()).await?))
    }

    fn log_directives() -> &'static [&'static str] {
        LOG_DIRECTIVES
    }

    /// The local RabbitMQ, every topic to the `outbox` exchange with the topic as routing key.
    fn local_default() -> Option<Self> {
        Some(AmqpConfig::default())
    }
}
