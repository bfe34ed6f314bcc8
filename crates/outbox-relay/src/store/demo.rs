//! The demo's sample business table, `outbox_demo.users`: a row per user, inserted in the
//! same transaction as the user's `user.created` outbox row.

use sqlx::{PgConnection, PgPool};

/// Creates the demo schema and table when missing.
pub async fn prepare(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("CREATE SCHEMA IF NOT EXISTS outbox_demo")
        .execute(pool)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS outbox_demo.users (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            email text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts a user (inside the caller's transaction); returns its id.
pub async fn insert_user(conn: &mut PgConnection, email: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO outbox_demo.users (email) VALUES ($1) RETURNING id")
        .bind(email)
        .fetch_one(conn)
        .await
}
