//! Every SQL statement the relay runs, one file per concern. Nothing outside this module
//! builds a query (`.ci/run` checks that `sqlx::query` appears nowhere else in the crate), so a
//! schema change is reviewed here, and the benchmarks and examples use these functions as their
//! stable API.
//!
//! - [`claim`]: the unordered and ordered claims and the idle poll;
//! - [`complete`]: marking a batch: sent, retried, dead-lettered, keys parked;
//! - [`lag`]: lag without `COUNT(*)`, dead-letter counts, compaction and retention cleanup;
//! - [`dead`]: the dead-letter commands;
//! - [`keys`]: held-back and parked keys and their commands;
//! - [`cluster`]: relay heartbeats, ordering membership and slot leases;
//! - [`sleepers`]: idle relays' registrations for NOTIFY;
//! - [`demo`]: the demo's sample table.
//!
//! This module and the ones below it import no sink and no pipeline type: rows come back as
//! [`crate::message::OutboxRow`].

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

pub mod claim;
pub mod cluster;
pub mod complete;
pub mod dead;
pub mod demo;
pub mod keys;
pub mod lag;
pub mod sleepers;

pub use claim::{any_available, claim, claim_ordered, SLOTS};
pub use complete::{dead_letter, mark_sent, park_dead, schedule_retries, Retry};
pub use lag::{cleanup_sent, compact_counts, dead_counts, lag, TopicLag, LAG_SQL};

/// The migrations in the workspace's `migrations/` folder, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Opens the relay's pool. Every session gets `idle_in_transaction_session_timeout`, so a claim
/// transaction of a relay that stopped talking is aborted and its rows released, and `jit = off`
/// (see below).
///
/// One plain connection is opened first: the pool's own first connect retries a refused
/// connection silently until `connect_timeout` and then reports only "pool timed out", while
/// this says what went wrong ("Connection refused", "password authentication failed") at once.
pub async fn connect(
    url: &str,
    max_connections: u32,
    connect_timeout: Duration,
    claim_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("outbox-relay")
        .options([
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", claim_timeout.as_millis()),
            ),
            (
                "statement_timeout",
                format!("{}ms", claim_timeout.as_millis()),
            ),
            // The claim's estimated cost crosses `jit_above_cost` with a large backlog (the
            // ordered claim with a share of the slots especially), and compiling it costs 20 to
            // 45 ms per claim against about 5 ms of execution. Every relay statement is short.
            ("jit", "off".to_string()),
        ])
        .log_statements(tracing::log::LevelFilter::Trace);
    let probe = tokio::time::timeout(connect_timeout, options.connect())
        .await
        .map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within database.connect_timeout_secs ({}s)",
                    connect_timeout.as_secs()
                ),
            ))
        })??;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Fails with [`crate::Error::SchemaMissing`] when the outbox schema is missing.
pub async fn check_schema(pool: &PgPool) -> crate::Result<()> {
    let present: bool = sqlx::query_scalar("SELECT to_regclass('outbox.messages') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if present {
        Ok(())
    } else {
        Err(crate::Error::SchemaMissing)
    }
}

/// The server's `autovacuum` setting is on (or cannot be read).
pub async fn autovacuum_on(pool: &PgPool) -> bool {
    let setting: Result<String, _> = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
        .await;
    !matches!(setting.as_deref(), Ok("off"))
}

/// One trivial statement: whether the pool can reach the database now.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}
