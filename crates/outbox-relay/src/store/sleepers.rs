//! The idle relays' registrations in `outbox.relay_sleepers` (enqueuers NOTIFY only while one
//! exists) and the advisory lock that closes the race between a registration and an enqueue in
//! flight (docs/architecture.md, "Wake-up").

use sqlx::postgres::PgListener;
use sqlx::PgConnection;

/// Registers the listening session as a sleeper.
pub async fn register<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox.relay_sleepers (pid) VALUES (pg_backend_pid()) ON CONFLICT DO NOTHING",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes the listening session's registration.
pub async fn unregister<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox.relay_sleepers WHERE pid = pg_backend_pid()")
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether no enqueue is between its check for sleepers and its commit: takes and at once
/// releases the wake-up advisory lock, which every enqueue holds (shared) for that span.
pub async fn no_enqueue_in_flight(conn: &mut PgListener) -> Result<bool, sqlx::Error> {
    let quiet: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(outbox.wakeup_lock_key())")
        .fetch_one(&mut *conn)
        .await?;
    if quiet {
        sqlx::query("SELECT pg_advisory_unlock(outbox.wakeup_lock_key())")
            .execute(&mut *conn)
            .await?;
    }
    Ok(quiet)
}

/// Removes sleeper registrations whose listening session is gone.
pub async fn cleanup_sleepers(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM outbox.relay_sleepers WHERE pid NOT IN (SELECT pid FROM pg_stat_activity)",
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}
