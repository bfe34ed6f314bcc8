//! Every SQL statement the relay runs, one file per concern. Nothing outside this module
//! builds a query (`.ci/run` checks that `sqlx::query` appears nowhere else in the crate), so a
//! schema change is reviewed here, and the benchmarks and examples use these functions as their
//! stable API.
//!
//! - [`claim`]: the unordered and ordered claims and the idle poll;
//! - [`floor`]: the claim floor, below which the claims never scan for fresh rows;
//! - [`complete`]: marking a batch: sent, retried, dead-lettered, keys parked;
//! - [`lag`]: lag without `COUNT(*)`, dead-letter counts, compaction and retention cleanup;
//! - [`dead`]: the dead-letter commands;
//! - [`keys`]: held-back and parked keys and their commands;
//! - [`cluster`]: relay heartbeats, ordering membership and slot leases;
//! - [`sleepers`]: idle relays' registrations for NOTIFY;
//! - [`vacuum`]: the relay's own VACUUM where autovacuum is off;
//! - [`privileges`]: the privileges each command needs, checked before it starts;
//! - [`demo`]: the demo's sample table.
//!
//! This module and the ones below it import no sink and no pipeline type: rows come back as
//! [`crate::message::OutboxRow`].

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::config::{DatabaseConfig, SslMode};

pub mod admin;
pub mod claim;
pub mod cluster;
pub mod complete;
pub mod dead;
pub mod demo;
pub mod floor;
pub mod history;
pub mod keys;
pub mod lag;
pub mod privileges;
pub mod sleepers;
pub mod vacuum;

pub use claim::{any_available, claim, claim_ordered, SLOTS};
pub use complete::{dead_letter, mark_sent, park_dead, schedule_retries, Retry};
pub use lag::{cleanup_sent, compact_counts, dead_counts, lag, TopicLag, LAG_SQL};

/// The migrations in the workspace's `migrations/` folder, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The connection options of the `[database]` section: the URL (with its `sslmode`,
/// `sslrootcert`, `sslcert`, `sslkey`, and libpq's `PG…` variables and `~/.pgpass` as sqlx reads
/// them), then the keys that win over it: `password`, `tls.mode`, `tls.ca_file`,
/// `tls.cert_file`, `tls.key_file`.
///
/// As in libpq, `require` with a CA file verifies the certificate chain (`verify-ca`): a CA
/// given and then not checked would be a trap.
pub fn connect_options(db: &DatabaseConfig) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(&db.url)?;
    if !db.password.is_empty() {
        options = options.password(db.password.expose());
    }
    if let Some(mode) = db.tls.mode {
        options = options.ssl_mode(pg_ssl_mode(mode));
    }
    if let Some(path) = &db.tls.ca_file {
        options = options.ssl_root_cert(path);
    }
    if let Some(path) = &db.tls.cert_file {
        options = options.ssl_client_cert(path);
    }
    if let Some(path) = &db.tls.key_file {
        options = options.ssl_client_key(path);
    }
    let [(_, ca), _, _] = db.tls_files();
    if ca.is_some() && matches!(options.get_ssl_mode(), PgSslMode::Require) {
        options = options.ssl_mode(PgSslMode::VerifyCa);
    }
    Ok(options)
}

fn pg_ssl_mode(mode: SslMode) -> PgSslMode {
    match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Allow => PgSslMode::Allow,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require => PgSslMode::Require,
        SslMode::VerifyCa => PgSslMode::VerifyCa,
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    }
}

/// Opens one connection with the `[database]` settings, for statements outside the relay's
/// pool (creating the demo's database). `allow` is resolved as in [`connect`].
pub async fn connect_one(db: &DatabaseConfig) -> Result<sqlx::PgConnection, sqlx::Error> {
    let options = connect_options(db)?;
    let timeout = Duration::from_secs(db.connect_timeout_secs);
    Ok(probe(&options, timeout).await?.1)
}

/// Opens the relay's pool. Every session gets `idle_in_transaction_session_timeout`, so a claim
/// transaction of a relay that stopped talking is aborted and its rows released, and `jit = off`
/// (see below). `statement_timeout` of zero sets neither timeout (for migrations).
///
/// One plain connection is opened first: the pool's own first connect retries a refused
/// connection silently until `connect_timeout` and then reports only "pool timed out", while
/// this says what went wrong ("Connection refused", "password authentication failed", a
/// certificate the relay does not trust) at once.
pub async fn connect(
    db: &DatabaseConfig,
    max_connections: u32,
    statement_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let connect_timeout = Duration::from_secs(db.connect_timeout_secs);
    let options = connect_options(db)?
        .application_name("outbox-relay")
        .options([
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", statement_timeout.as_millis()),
            ),
            (
                "statement_timeout",
                format!("{}ms", statement_timeout.as_millis()),
            ),
            // The claim's estimated cost crosses `jit_above_cost` with a large backlog (the
            // ordered claim with a share of the slots especially), and compiling it costs 20 to
            // 45 ms per claim against about 5 ms of execution. Every relay statement is short.
            ("jit", "off".to_string()),
            // Every relay statement on a large table reads a short index range. While the xmin
            // horizon is held, VACUUM counts the deleted rows it may not remove in
            // `reltuples`, so the planner believes `outbox.messages` holds millions of rows and
            // may pick a sequential or bitmap scan of the whole table for the claim (measured:
            // claims of 1 to 5 s, the relay stalled for two minutes, at 1.4 million deleted rows
            // with autovacuum on). Tables without a usable index are still scanned.
            ("enable_seqscan", "off".to_string()),
            ("enable_bitmapscan", "off".to_string()),
        ])
        .log_statements(tracing::log::LevelFilter::Trace);
    let (options, probe) = probe(&options, connect_timeout).await?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(connect_timeout)
        .connect_with(options)
        .await
}

/// One connection within `timeout`, and the options that made it. sqlx treats `allow` as
/// `disable`; here it is libpq's `allow`: plaintext first, TLS (unverified) when the server
/// refuses plaintext.
async fn probe(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<(PgConnectOptions, sqlx::PgConnection), sqlx::Error> {
    let attempt = |options: PgConnectOptions| async move {
        let conn = tokio::time::timeout(timeout, options.connect())
            .await
            .map_err(|_| {
                sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within database.connect_timeout_secs ({}s)",
                        timeout.as_secs()
                    ),
                ))
            })??;
        Ok::<_, sqlx::Error>((options, conn))
    };
    if !matches!(options.get_ssl_mode(), PgSslMode::Allow) {
        return attempt(options.clone()).await;
    }
    let plaintext = options.clone().ssl_mode(PgSslMode::Disable);
    match attempt(plaintext).await {
        Err(e) if crate::error::plaintext_refused(&e) => {
            attempt(options.clone().ssl_mode(PgSslMode::Require)).await
        }
        other => other,
    }
}

/// Applies the migrations, keeping the relay's migration history in `outbox._sqlx_migrations`.
///
/// sqlx records applied migrations in a table named `_sqlx_migrations`, found through the
/// session's `search_path`: by default `public._sqlx_migrations`, the table every sqlx
/// application uses for its own history. Sharing it breaks both sides (each finds versions it
/// does not know), so the relay migrates on a session of its own whose `search_path` starts
/// with `outbox`. A history that an earlier relay left in `public._sqlx_migrations` is moved over
/// first: the rows whose version and checksum are the relay's own, nothing else.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    // A connection of its own, closed afterwards: its search_path never reaches the pool.
    let mut conn = pool.acquire().await?.detach();
    // Only when missing: even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the database,
    // which the owner of an existing outbox schema need not have.
    sqlx::query(
        "DO $$ BEGIN
           IF to_regnamespace('outbox') IS NULL THEN CREATE SCHEMA IF NOT EXISTS outbox; END IF;
         END $$",
    )
    .execute(&mut conn)
    .await?;
    adopt_history(&mut conn).await?;
    sqlx::query("SET search_path TO outbox, public")
        .execute(&mut conn)
        .await?;
    let result = MIGRATOR.run(&mut conn).await;
    let _ = conn.close().await;
    result
}

/// Moves the relay's rows of `public._sqlx_migrations` to `outbox._sqlx_migrations`, once: only
/// while the latter does not exist yet.
async fn adopt_history(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let (ours_exists, public_exists): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('outbox._sqlx_migrations') IS NOT NULL,
                to_regclass('public._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    if ours_exists || !public_exists {
        return Ok(());
    }
    let versions: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let checksums: Vec<Vec<u8>> = MIGRATOR.iter().map(|m| m.checksum.to_vec()).collect();
    let mut tx = conn.begin().await?;
    sqlx::query(
        "CREATE TABLE outbox._sqlx_migrations (LIKE public._sqlx_migrations INCLUDING ALL)",
    )
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(
        "WITH ours AS (SELECT * FROM unnest($1::bigint[], $2::bytea[]) AS o(version, checksum)),
              moved AS (DELETE FROM public._sqlx_migrations p USING ours o
                         WHERE p.version = o.version AND p.checksum = o.checksum
                        RETURNING p.*)
         INSERT INTO outbox._sqlx_migrations SELECT * FROM moved",
    )
    .bind(&versions)
    .bind(&checksums)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    if moved > 0 {
        tracing::info!(
            migrations = moved,
            "moved the relay's migration history from public._sqlx_migrations to outbox._sqlx_migrations"
        );
    }
    Ok(())
}

/// Fails with [`crate::Error::SchemaMissing`] (naming the database) when the outbox schema is
/// missing, and with [`crate::Error::SchemaOutdated`] when it lacks what the newest migration
/// adds.
pub async fn check_schema(pool: &PgPool) -> crate::Result<()> {
    let (present, database, newest): (bool, String, bool) = sqlx::query_as(
        "SELECT to_regclass('outbox.messages') IS NOT NULL, current_database()::text,
                to_regclass(($1::text)) IS NOT NULL",
    )
    .bind(NEWEST_OBJECT)
    .fetch_one(pool)
    .await?;
    match (present, newest) {
        (true, true) => Ok(()),
        (true, false) => Err(crate::Error::SchemaOutdated {
            database,
            missing: NEWEST_OBJECT.into(),
        }),
        (false, _) => Err(crate::Error::SchemaMissing { database }),
    }
}

/// A table of the newest migration the relay's statements need (0012_admin.sql): a schema
/// without it was migrated by an older relay, or by a tool that has not applied the newer files.
/// (Checked by object, not by `outbox._sqlx_migrations`, which other migration tools do not
/// write.)
const NEWEST_OBJECT: &str = "outbox.admin_audit";

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
