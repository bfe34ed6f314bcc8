//! The relay's migration history as `outbox-relay migrate` reports it: which of the embedded
//! migrations ([`super::MIGRATOR`]) a database has recorded, read before and after migrating.
//!
//! The history lives in `outbox._sqlx_migrations` ([`super::migrate`]); a database that an
//! earlier relay migrated may still have it in `public._sqlx_migrations`, where only the rows
//! with the relay's own version and checksum count (the ones `migrate` moves over).

use sqlx::PgPool;

/// Versions of the relay's migrations that the database has recorded as applied, ascending.
pub async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let (ours, public): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('outbox._sqlx_migrations') IS NOT NULL,
                to_regclass('public._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    let table = match (ours, public) {
        (true, _) => "outbox._sqlx_migrations",
        (false, true) => "public._sqlx_migrations",
        (false, false) => return Ok(Vec::new()),
    };
    let versions: Vec<i64> = super::MIGRATOR.iter().map(|m| m.version).collect();
    let checksums: Vec<Vec<u8>> = super::MIGRATOR
        .iter()
        .map(|m| m.checksum.to_vec())
        .collect();
    sqlx::query_scalar(&format!(
        "SELECT h.version FROM {table} h
           JOIN unnest($1::bigint[], $2::bytea[]) AS o(version, checksum)
             ON o.version = h.version AND o.checksum = h.checksum
          WHERE h.success
          ORDER BY h.version"
    ))
    .bind(&versions)
    .bind(&checksums)
    .fetch_all(pool)
    .await
}

/// `(version, description)` of every embedded migration, ascending.
pub fn known() -> Vec<(i64, String)> {
    super::MIGRATOR
        .iter()
        .map(|m| (m.version, m.description.to_string()))
        .collect()
}
