//! NATS JetStream sink.
//!
//! Each row is published to the subject its route renders (`outbox.{topic}` by default) with
//! `Nats-Msg-Id` set to the row's message id, so JetStream drops a re-publish within the
//! stream's duplicate window and answers `duplicate: true`, which the relay counts as delivered.
//! The whole batch is sent first and the acknowledgements are awaited afterwards.

mod config;
mod security;
mod service;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;

pub use config::{NatsConfig, NatsRoute, NatsStreamConfig, NatsTlsConfig, DEFAULT_URL};
pub use service::stream_config;
pub use sink::NatsSink;

use crate::sinks::{route_topics, BrokerConfig, Sink, SinkError};

/// `kind = "nats"`.
pub const KIND: &str = "nats";

/// Log filter directives the binary adds to whatever filter is configured. async_nats logs every
/// failed reconnection attempt (`event: client error: nats: IO error` at info, "authorization
/// violation" at error), several a second at first and every 4 s after, without the server's
/// address. The sink reports the same events itself, with the URL, once per change of state
/// (each attempt at debug, a reminder every minute while down), so the library's lines are
/// left out.
pub const LOG_DIRECTIVES: &[&str] = &["async_nats=off"];

#[async_trait]
impl BrokerConfig for NatsConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self) -> Result<(), String> {
        NatsConfig::validate(self)
    }

    fn route_topics(&self) -> Vec<&[String]> {
        route_topics(&self.routes)
    }

    async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        Ok(Arc::new(NatsSink::new(name, self.clone()).await?))
    }

    fn log_directives() -> &'static [&'static str] {
        LOG_DIRECTIVES
    }

    /// With no sink configured, every topic goes to the local NATS as `outbox.<topic>`.
    fn local_default() -> Option<Self> {
        Some(NatsConfig::default())
    }
}
