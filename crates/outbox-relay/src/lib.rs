//! outbox-relay: publishes committed transactional-outbox rows from PostgreSQL to NATS
//! JetStream, RabbitMQ and Kafka, at least once, marking a row sent only after the broker
//! acknowledged it.
//!
//! The map (docs/architecture.md draws it with the path of one batch):
//!
//! - [`relay`]: the process: HTTP first, then PostgreSQL, sinks, pipeline, cluster, and the
//!   orderly shutdown; [`run`] is the entry point;
//! - [`pipeline`]: claim → dispatch (route, publish, breaker) → rounds → complete → tally, and
//!   the worker loop;
//! - [`store`]: every SQL statement, one file per concern;
//! - [`sinks`]: the brokers, one folder each, behind one contract;
//! - [`cluster`]: relay identity, the heartbeat, ordering slot leases;
//! - [`wakeup`]: LISTEN/NOTIFY with adaptive polling; [`maintenance`]: periodic upkeep;
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; [`metrics`]: the Prometheus registry;
//! - [`config`], [`routing`], [`message`], [`error`], [`redact`]: the shared vocabulary;
//! - [`cli`]: the binary's commands (the only place that prints or uses `anyhow`).

#![forbid(unsafe_code)]
// Only the binary's command modules (`cli/`) print.
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod maintenance;
pub mod message;
pub mod metrics;
pub mod overview;
pub mod pipeline;
pub mod redact;
pub mod relay;
pub mod routing;
pub mod sinks;
pub mod store;
pub mod wakeup;

pub use error::{Error, Result};
pub use redact::{redact_url, Secret};
pub use relay::run;
