//! The demo's database and sample business table, `outbox_demo.users`: a row per user,
//! inserted or updated in the same transaction as the user's outbox row.

use sqlx::{Connection, PgConnection, PgPool};

use crate::config::DatabaseConfig;

/// Creates database `name` on the server of `server` (its URL's database is the one to connect
/// to), unless it exists; returns whether it was created. `name` must be a plain identifier
/// (the caller checks).
pub async fn ensure_database(server: &DatabaseConfig, name: &str) -> Result<bool, sqlx::Error> {
    let mut admin = super::connect_one(server).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
    let created = if exists {
        false
    } else {
        match sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
        {
            Ok(_) => true,
            // Another demo created it a moment ago.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => false,
            Err(e) => return Err(e),
        }
    };
    let _ = admin.close().await;
    Ok(created)
}

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
    sqlx::query("ALTER TABLE outbox_demo.users ADD COLUMN IF NOT EXISTS active boolean NOT NULL DEFAULT false")
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

/// Changes a user's email (inside the caller's transaction).
pub async fn change_email(
    conn: &mut PgConnection,
    id: i64,
    email: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox_demo.users SET email = $2 WHERE id = $1")
        .bind(id)
        .bind(email)
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks a user active (inside the caller's transaction).
pub async fn activate(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox_demo.users SET active = true WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}
