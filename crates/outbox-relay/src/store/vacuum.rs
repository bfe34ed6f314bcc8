//! Vacuum of the outbox's tables by the relay itself, for servers where autovacuum does not run
//! (off for the server, or for `outbox.messages`): without it, every deleted row stays in the
//! table and its indexes for good.

use sqlx::PgConnection;

/// The tables the relay churns: rows inserted and deleted (or updated) all the time.
pub const TABLES: &[&str] = &[
    "outbox.messages",
    "outbox.topic_counts",
    "outbox.claim_floor",
    "outbox.relay_sleepers",
    "outbox.partition_leases",
    "outbox.relays",
    "outbox.ordering_members",
];

/// Whether autovacuum is off for the server or for `outbox.messages`.
pub async fn autovacuum_off<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT current_setting('autovacuum') = 'off'
             OR coalesce((SELECT o.option_value::boolean = false
                            FROM pg_class c, pg_options_to_table(c.reloptions) o
                           WHERE c.oid = 'outbox.messages'::regclass
                             AND o.option_name = 'autovacuum_enabled'), false)",
    )
    .fetch_one(conn)
    .await
}

/// Dead rows in the churned tables, as the statistics collector last counted them.
pub async fn dead_rows<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables
          WHERE schemaname = 'outbox'
            AND relname IN ('messages', 'topic_counts', 'claim_floor', 'relay_sleepers',
                            'partition_leases', 'relays', 'ordering_members')",
    )
    .fetch_one(conn)
    .await
}

/// The tables of [`TABLES`] that the connected role may not VACUUM. Before PostgreSQL 17 only a
/// table's owner (or the database's, or a superuser) may; from 17 also a role with the MAINTAIN
/// privilege on it (or `pg_maintain`). A VACUUM of a table the role may not vacuum does not fail:
/// PostgreSQL skips it with a warning, so this is the only way to know.
pub async fn not_vacuumable<'c, E: sqlx::PgExecutor<'c>>(
    conn: E,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT t.name FROM unnest($1::text[]) WITH ORDINALITY AS t(name, ord)
           JOIN pg_class c ON c.oid = to_regclass(t.name)
          WHERE NOT pg_has_role(c.relowner, 'USAGE')
            AND NOT pg_has_role((SELECT d.datdba FROM pg_database d
                                  WHERE d.datname = current_database()), 'USAGE')
            AND NOT CASE WHEN current_setting('server_version_num')::int >= 170000
                         THEN has_table_privilege(c.oid, 'MAINTAIN') ELSE false END
          ORDER BY t.ord",
    )
    .bind(TABLES)
    .fetch_all(conn)
    .await
}

/// What a [`vacuum`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vacuumed {
    Done,
    /// Another session holds a lock that conflicts with VACUUM (another VACUUM, an ANALYZE, an
    /// index build): nothing waited behind it; the next interval tries again.
    SkippedLocked,
}

/// Vacuums the churned tables ([`TABLES`]) on a connection of its own (VACUUM cannot run in a
/// transaction, and must not be cut short by the pool sessions' statement timeout). Its lock
/// conflicts with no enqueue, claim or mark; it waits at most 100 ms for a conflicting one and
/// gives up.
pub async fn vacuum(conn: &mut PgConnection) -> Result<Vacuumed, sqlx::Error> {
    vacuum_tables(conn, TABLES).await
}

/// [`vacuum`] of some of [`TABLES`] only: the ones the role may vacuum ([`not_vacuumable`]).
pub async fn vacuum_tables(
    conn: &mut PgConnection,
    tables: &[&str],
) -> Result<Vacuumed, sqlx::Error> {
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET lock_timeout = '100ms'")
        .execute(&mut *conn)
        .await?;
    match sqlx::query(&format!("VACUUM (TRUNCATE false) {}", tables.join(", ")))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(Vacuumed::Done),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            Ok(Vacuumed::SkippedLocked)
        }
        Err(e) => Err(e),
    }
}
