//! `outbox-relay keys list|release|skip` and the ordering section of `outbox-relay status`.
//!
//! - `list`: held-back keys (their oldest message failed and waits for its next attempt) and
//!   parked keys (`ordering.on_dead = "park"`: a dead letter parked them).
//! - `release <key>... [--topic <topic>]...`: unparks the named keys, or every key parked for
//!   the topics, or the named keys only if parked for the topics (the parked list is keyed by
//!   key and shows its topic); the dead letters stay in `outbox.dead_letters` (see
//!   `outbox-relay dead`), the keys' later messages flow again.
//! - `skip <key> [--topic <topic>] [--dry-run]`: gives up on what blocks the key: if its oldest
//!   message waits for a retry, that message is dead-lettered now ("skipped by an operator"); a
//!   parked key is unparked; with --topic, only if what blocks it belongs to that topic.

use clap::Subcommand;
use sqlx::PgPool;

pub use crate::overview::{collect_keys as collect, KeysStatus};
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
    /// Unpark keys: their later messages flow again; their dead letters stay. Name the keys,
    /// or give --topic to release every key parked for that topic (the TOPIC column of
    /// `keys list`), or both to release the named keys only if parked for that topic.
    #[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["keys", "topic"])))]
    Release {
        /// The keys, exactly as enqueued (the KEY column of `keys list`).
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
        /// Only keys parked for this topic; repeat for several.
        #[arg(long, value_name = "TOPIC")]
        topic: Vec<String>,
        /// Print the keys that would be released and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Dead-letter the key's failing oldest message now (if it waits for a retry) and unpark it.
    Skip {
        /// The key, exactly as enqueued (the KEY column of `keys list`).
        #[arg(value_name = "KEY")]
        key: String,
        /// Only if what blocks the key belongs to this topic (the TOPIC column of `keys list`).
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
        /// Print what would be skipped and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
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
        KeysCommand::Release {
            keys,
            topic,
            dry_run,
            json,
        } => release(pool, &keys, &topic, dry_run, json).await?,
        KeysCommand::Skip {
            key,
            topic,
            dry_run,
            json,
        } => {
            let mut conn = pool.acquire().await?;
            let s = sql::skip(&mut conn, &key, topic.as_deref(), dry_run).await?;
            if !dry_run {
                let affected = i64::from(s.dead_lettered.is_some()) + i64::from(s.unparked);
                super::admin::record(
                    &mut conn,
                    "keys.skip",
                    serde_json::json!({ "key": key, "topic": topic, "dead_lettered": s.dead_lettered }),
                    affected,
                )
                .await?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", render_skipped(&s));
            }
        }
    }
    Ok(())
}

/// What `keys skip` did, one line per step, in the tense of `--dry-run`.
fn render_skipped(s: &sql::Skipped) -> String {
    let (key, topic) = (&s.key, &s.topic);
    let (dead, unpark, flow) = if s.dry_run {
        (
            "would be dead-lettered",
            "would be unparked",
            "would flow again; nothing changed",
        )
    } else {
        ("dead-lettered (skipped)", "unparked", "flow again")
    };
    let mut out = String::new();
    if let Some(m) = &s.dead_lettered {
        out += &format!("key {key:?} (topic {topic}): message {m} {dead}\n");
    }
    if s.unparked {
        out += &format!("key {key:?} (topic {topic}): {unpark}\n");
    }
    out += &format!("key {key:?} (topic {topic}): its later messages {flow}\n");
    out
}

/// `keys release`: the parked keys among `keys` (all, when none is named) parked for one of
/// `topics` (any, when none is given). A named key that is not released is an error naming
/// why: not parked, or parked for another topic. The others are released all the same.
async fn release(
    pool: &PgPool,
    keys: &[String],
    topics: &[String],
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let matching = sql::parked_matching(&mut conn, keys, topics).await?;
    let mut problems = Vec::new();
    for key in keys {
        if matching.iter().any(|p| &p.key == key) {
            continue;
        }
        let elsewhere = sql::parked_matching(&mut conn, std::slice::from_ref(key), &[]).await?;
        problems.push(match elsewhere.first() {
            Some(p) => format!(
                "key {key:?} is parked for topic {:?}, not {}: `outbox-relay keys release {key} --topic {}` releases it",
                p.topic,
                topics
                    .iter()
                    .map(|t| format!("{t:?}"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                p.topic
            ),
            None => format!(
                "key {key:?} is not parked: `outbox-relay keys list` shows the parked keys"
            ),
        });
    }
    if keys.is_empty() && matching.is_empty() {
        problems.push(format!(
            "no key is parked for topic {}: `outbox-relay keys list` shows the parked keys",
            topics
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    let released = if dry_run {
        Vec::new()
    } else {
        let names: Vec<String> = matching.iter().map(|p| p.key.clone()).collect();
        let released = sql::release_keys(&mut conn, &names).await?;
        super::admin::record(
            &mut conn,
            "keys.release",
            serde_json::json!({ "keys": released, "topics": topics }),
            released.len() as i64,
        )
        .await?;
        released
    };
    // Released, or (dry run) would be: those still parked a moment ago.
    let acted: Vec<&sql::ParkedKey> = matching
        .iter()
        .filter(|p| dry_run || released.contains(&p.key))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": dry_run,
                if dry_run { "would_release" } else { "released" }: acted,
                "errors": problems,
            }))?
        );
    } else {
        for p in &acted {
            let verb = if dry_run {
                "would be released"
            } else {
                "released"
            };
            println!(
                "key {:?} (topic {}) {verb}: its {} waiting message(s) flow again; its dead letter {} stays (`outbox-relay dead show {}`)",
                p.key, p.topic, p.waiting, p.dead_id, p.dead_id
            );
        }
        if dry_run {
            println!(
                "dry run: {} key(s) would be released; nothing changed",
                acted.len()
            );
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    Ok(())
}
