//! `outbox-relay keys list|release|skip` and the ordering section of `outbox-relay status`.
//!
//! - `list`: held-back keys (their oldest message failed and waits for its next attempt) and
//!   parked keys (`ordering.on_dead = "park"`: a dead letter parked them).
//! - `release <key>`: unparks the key; its dead letter stays in `outbox.dead_letters` (see
//!   `outbox-relay dead`), the key's later messages flow again.
//! - `skip <key>`: gives up on what blocks the key: if its oldest message waits for a retry,
//!   that message is dead-lettered now ("skipped by an operator"); a parked key is unparked.

use clap::Subcommand;
use sqlx::PgPool;

use crate::store::keys as sql;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List held-back keys (oldest message waiting for a retry) and parked keys.
    List {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// At most this many keys of each kind.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Unpark a key: its later messages flow again; its dead letter stays.
    Release {
        /// The key, exactly as enqueued.
        key: String,
    },
    /// Dead-letter the key's failing oldest message now (if it waits for a retry) and unpark it.
    Skip {
        /// The key, exactly as enqueued.
        key: String,
    },
}

/// The ordering part of `status`.
#[derive(Debug, serde::Serialize)]
pub struct KeysStatus {
    pub held_back: Vec<sql::HeldKey>,
    pub parked: Vec<sql::ParkedKey>,
}

pub async fn collect(pool: &PgPool, limit: i64) -> Result<KeysStatus, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    Ok(KeysStatus {
        held_back: sql::held_keys(&mut conn, limit).await?,
        parked: sql::parked_keys(&mut conn, limit).await?,
    })
}

pub fn render_table(s: &KeysStatus) -> String {
    let mut out = String::new();
    if s.held_back.is_empty() {
        out.push_str("HELD-BACK KEYS: none\n");
    } else {
        out.push_str(&format!(
            "{:<24}  {:<20}  {:>8}  {:>6}  {:<25}  LAST ERROR\n",
            "HELD-BACK KEY", "TOPIC", "ATTEMPTS", "BEHIND", "NEXT ATTEMPT"
        ));
        for k in &s.held_back {
            out.push_str(&format!(
                "{:<24}  {:<20}  {:>8}  {:>6}  {:<25}  {}\n",
                k.key,
                k.topic,
                k.attempts,
                k.behind,
                k.next_attempt_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                k.last_error.as_deref().unwrap_or("")
            ));
        }
    }
    if s.parked.is_empty() {
        out.push_str("PARKED KEYS: none\n");
    } else {
        out.push_str(&format!(
            "{:<24}  {:<20}  {:>8}  {:>7}  {:<25}  REASON\n",
            "PARKED KEY", "TOPIC", "DEAD ID", "WAITING", "PARKED AT"
        ));
        for k in &s.parked {
            out.push_str(&format!(
                "{:<24}  {:<20}  {:>8}  {:>7}  {:<25}  {}\n",
                k.key,
                k.topic,
                k.dead_id,
                k.waiting,
                k.parked_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                k.reason
            ));
        }
    }
    out
}

/// Runs a `keys` command; prints to stdout (CLI output).
pub async fn run(pool: &PgPool, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::List { json, limit } => {
            let s = collect(pool, limit.clamp(1, 100_000)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", render_table(&s));
            }
        }
        KeysCommand::Release { key } => {
            let mut conn = pool.acquire().await?;
            if sql::release(&mut conn, &key).await? {
                println!("key {key:?} released: its later messages flow again (its dead letter stays; see `outbox-relay dead`)");
            } else {
                anyhow::bail!(
                    "key {key:?} is not parked: `outbox-relay keys list` shows the parked keys"
                );
            }
        }
        KeysCommand::Skip { key } => {
            let mut conn = pool.acquire().await?;
            let s = sql::skip(&mut conn, &key).await?;
            if let Some(m) = &s.dead_lettered {
                println!("key {key:?}: message {m} dead-lettered (skipped)");
            }
            if s.unparked {
                println!("key {key:?}: unparked");
            }
            println!("key {key:?}: its later messages flow again");
        }
    }
    Ok(())
}
