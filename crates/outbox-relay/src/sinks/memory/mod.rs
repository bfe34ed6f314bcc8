//! In-memory sink (`kind = "memory"`), for tests and dry runs: no broker, no network.
//!
//! It keeps every message handed to it, with the headers and destination a broker would have
//! received and the outcome it answered, and lets a test decide those outcomes: per message id
//! or per topic, a queue of [`Outcome`](crate::sinks::Outcome)s consumed one per publish
//! ([`MemorySink::script`], [`MemorySink::fail`]), or a function of the row
//! ([`MemorySink::respond_with`]). Unscripted rows are delivered, or reported as duplicates
//! when their message id was delivered before (as JetStream does within its duplicate window).
//! [`MemorySink::set_available`] takes the whole "broker" down and up: `check()` fails and
//! every row fails as unavailable, which is what the relay's circuit breaker reacts to.
//!
//! A sink the relay builds from its configuration is registered under its sink name, so a
//! test reaches it with [`MemorySink::shared`] (before or after the relay built it); a test
//! that drives a sink directly makes its own with [`MemorySink::new`]. Sink names are global to
//! the process: give each test its own.

mod config;
mod sink;

use std::sync::Arc;

use async_trait::async_trait;

pub use config::{MemoryConfig, MemoryRoute};
pub use sink::{failure, MemorySink, PublishedMessage};

use crate::sinks::{route_topics, BrokerConfig, Sink, SinkError};

/// `kind = "memory"`.
pub const KIND: &str = "memory";

#[async_trait]
impl BrokerConfig for MemoryConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate(&self) -> Result<(), String> {
        MemoryConfig::validate(self)
    }

    fn route_topics(&self) -> Vec<&[String]> {
        route_topics(&self.routes)
    }

    /// The sink registered under `name` (created if no test asked for it first), now using
    /// this configuration.
    async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        let sink = MemorySink::shared(name);
        sink.configure(self.clone());
        Ok(Arc::new(sink))
    }
}
