//! Vacuum of the outbox's tables by the relay itself, for servers where autovacuum does not run
//! (off for the server, or for `outbox.messages`): without it, every deleted row stays in the
//! table and its indexes for good.

use sqlx::PgConnection;

/// The tables the relay churns: rows inserted and deleted (or updated) all the time.
const TABLES: &str = "outbox.messages, outbox.topic_counts, outbox.claim_floor, \
                      outbox.relay_sleepers, outbox.partition_leases, outbox.relays, \
                      outbox.ordering_members";

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

/// What a [`vacuum`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vacuumed {
    Done,
    /// Another session holds a lock that conflicts with VACUUM (another VACUUM, an ANALYZE, an
    /// index build): nothing waited behind it; the next interval tries again.
    SkippedLocked,
}

/// Vacuums the churned tables on a connection of its own (VACUUM cannot run in a transaction,
/// and must not be cut short by the pool sessions' statement timeout). Its lock conflicts with
/// no enqueue, claim or mark; it waits at most 100 ms for a conflicting one and gives up.
pub async fn vacuum(conn: &mut PgConnection) -> Result<Vacuumed, sqlx::Error> {
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET lock_timeout = '100ms'")
        .execute(&mut *conn)
        .await?;
    match sqlx::query(&format!("VACUUM (TRUNCATE false) {TABLES}"))
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
