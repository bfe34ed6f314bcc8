//! A user and its `user.created` event, written in one transaction: both exist after the commit,
//! or neither does. The relay (`outbox-relay run`) then publishes the event.
//!
//! Run against the local PostgreSQL, once the outbox schema exists (`outbox-relay migrate`):
//!
//! ```sh
//! cargo run -p outbox-relay -- migrate
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run -p outbox-client --example enqueue
//! ```
//!
//! The example creates its own table, `example_users`, if it is missing.

use outbox_client::{enqueue, Enqueued, Message};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Serialize)]
struct UserCreated<'a> {
    id: i64,
    email: &'a str,
}

/// Creates the example's table, then inserts a user and enqueues its event in one transaction.
pub async fn run(database_url: &str) -> Result<Enqueued, Box<dyn std::error::Error>> {
    let pool = PgPool::connect(database_url)
        .await
        .map_err(|e| format!("cannot connect to {database_url} (set DATABASE_URL): {e}"))?;
    let schema: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox.messages')::text")
        .fetch_one(&pool)
        .await?;
    if schema.is_none() {
        return Err("the outbox schema is missing in this database: run `outbox-relay migrate` first (cargo run -p outbox-relay -- migrate)".into());
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_users (id bigserial PRIMARY KEY, email text NOT NULL)",
    )
    .execute(&pool)
    .await?;

    let email = "ada@example.com";
    let mut tx = pool.begin().await?;
    let user_id: i64 =
        sqlx::query_scalar("INSERT INTO example_users (email) VALUES ($1) RETURNING id")
            .bind(email)
            .fetch_one(&mut *tx)
            .await?;
    let message = Message::json("user.created", &UserCreated { id: user_id, email })?
        .key(user_id.to_string()) // the messages of one user keep their order
        .header("source", "signup");
    let enqueued = enqueue(&mut tx, &message).await?;
    tx.commit().await?; // the user and its event exist together, or neither does
    pool.close().await;
    Ok(enqueued)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let enqueued = run(&url).await?;
    println!(
        "enqueued user.created {} as outbox row {} (inserted={})",
        enqueued.message_id, enqueued.id, enqueued.inserted
    );
    Ok(())
}
