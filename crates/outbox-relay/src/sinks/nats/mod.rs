//! NATS JetStream sink.
//!
//! Each row is published to the subject its route renders (`outbox.{topic}` by default) with
//! `Nats-Msg-Id` set to the row's message id, so JetStream drops a re-publish within the
//! stream's duplicate window and answers `duplicate: true`, which the relay counts as delivered.
//! The whole batch is sent first and the acknowledgements are awaited afterwards.

mod config;
mod service;
mod sink;

pub use config::{NatsConfig, NatsRoute, NatsStreamConfig};
pub use sink::NatsSink;
