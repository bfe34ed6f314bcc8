//! Support shared by the end-to-end tests (`tests/`) and the benchmark command
//! (`crates/outbox-bench`): real PostgreSQL, real brokers and the real relay binary, each use
//! isolated by unique names, free ports and temporary directories.
//!
//! One module per role, one per broker:
//!
//! - [`names`]: unique names and free ports.
//! - [`wait`]: polling a condition with a deadline; bounded async clean-up from `Drop`.
//! - [`pg`]: a fresh migrated database per test ([`pg::TestDb`]), a PostgreSQL server the
//!   caller owns ([`pg::OwnedPostgres`]), probes of the claim state.
//! - [`relay`]: the `outbox-relay` binary run with a per-test config file; the caller passes
//!   the binary's path.
//! - [`http`]: the one HTTP GET, the one Prometheus text parser, `/metrics` scraping and
//!   `/healthz` waiting.
//! - [`nats`], [`amqp`], [`kafka`]: per broker, a server the caller owns, an independent
//!   consumer, the relay's sink config and its ordering-test target. A new broker adds one
//!   such module.
//! - [`observability`]: the repository's deploy/ files, `promtool` and an owned Prometheus.
//! - [`ordering`]: the broker-independent per-key order checker and target trait.
//! - [`tls`]: a private CA per test and the certificates it issues (good, expired, wrong host).

pub mod amqp;
pub mod browser;
pub mod http;
pub mod kafka;
pub mod names;
pub mod nats;
pub mod observability;
pub mod ordering;
pub mod pg;
pub mod relay;
pub mod skip;
pub mod tls;
pub mod wait;
