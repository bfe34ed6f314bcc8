//! `outbox-relay topics pause|resume|list`, `outbox-relay replay` and `outbox-relay audit`, and
//! the audit record every changing command writes ([`record`]).
//!
//! - `topics pause <topic> [--reason …]`: every relay stops claiming the topic's rows within a
//!   heartbeat (rows already claimed finish their batch); `status` marks it PAUSED and the
//!   relays export `outbox_topic_paused`. `topics resume <topic>` undoes it.
//! - `replay`: copies rows that retention kept in `outbox.sent` back into the outbox as new
//!   messages (a new message id; the original in the `outbox-replay-of` header, see
//!   [`crate::store::admin`] for why), selected by id range, key or time range, optionally
//!   narrowed to one topic; `--dry-run` lists them, a terminal asks before more than one row.
//! - `audit`: the newest entries of the audit trail.

use std::io::{BufRead, IsTerminal, Write};

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use sqlx::{PgConnection, PgPool};

use crate::store::admin::{self as sql, Actor, ReplaySelection};

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Stop every relay from claiming this topic's rows (within a heartbeat) until resumed.
    Pause {
        /// The topic, exactly as enqueued.
        topic: String,
        /// Why: shown by `topics list`, `status` and the audit trail.
        #[arg(long)]
        reason: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Let the relays claim a paused topic's rows again.
    Resume {
        /// The topic, exactly as paused (`topics list`).
        topic: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The paused topics: when, by whom, why.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `outbox-relay replay`: which sent rows, and how to confirm.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Only sent rows with id >= this (the ids of `outbox.sent`, which are the original outbox ids).
    #[arg(long, value_name = "ID")]
    pub from_id: Option<i64>,
    /// Only sent rows with id <= this.
    #[arg(long, value_name = "ID")]
    pub to_id: Option<i64>,
    /// Only this ordering key (exact).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Only this topic (exact); needs one of the other selections.
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// Only rows sent at or after this time (RFC 3339, e.g. 2026-12-03T08:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub sent_after: Option<DateTime<Utc>>,
    /// Only rows sent before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub sent_before: Option<DateTime<Utc>>,
    /// At most this many rows, oldest first.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub limit: i64,
    /// Print what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask.
    #[arg(long, short, conflicts_with = "dry_run")]
    pub yes: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ReplayArgs {
    pub fn selection(&self) -> Result<ReplaySelection, crate::Error> {
        let s = ReplaySelection {
            id_from: self.from_id,
            id_to: self.to_id,
            key: self.key.clone(),
            topic: self.topic.clone(),
            sent_from: self.sent_after,
            sent_to: self.sent_before,
        };
        s.validate().map_err(crate::Error::Usage)?;
        Ok(s)
    }
}

/// Who runs this command: the operating-system user and the machine, as the audit trail shows
/// it (`alice@ops-1`).
pub fn cli_actor() -> Actor {
    let user = ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    Actor {
        name: format!("{user}@{}", crate::cluster::hostname()),
        via: "cli",
    }
}

/// Records a CLI action in the audit trail.
pub async fn record(
    conn: &mut PgConnection,
    action: &str,
    target: serde_json::Value,
    affected: i64,
) -> anyhow::Result<()> {
    sql::audit(conn, &cli_actor(), action, &target, affected)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the action was done, but recording it in outbox.admin_audit failed: {e}"
            )
        })
}

pub async fn topics(pool: &PgPool, command: TopicsCommand) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    match command {
        TopicsCommand::Pause {
            topic,
            reason,
            json,
        } => {
            let actor = cli_actor();
            let paused =
                sql::pause_topic(&mut conn, &topic, &actor.name, reason.as_deref()).await?;
            if paused {
                record(
                    &mut conn,
                    "topics.pause",
                    serde_json::json!({ "topic": topic, "reason": reason }),
                    1,
                )
                .await?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "topic": topic, "paused": paused })
                );
            } else if paused {
                println!(
                    "topic {topic:?} paused: the relays stop claiming its rows within a heartbeat; `outbox-relay topics resume {topic}` undoes it"
                );
            } else {
                println!("topic {topic:?} was paused already; nothing changed");
            }
        }
        TopicsCommand::Resume { topic, json } => {
            let resumed = sql::resume_topic(&mut conn, &topic).await?;
            if resumed {
                record(
                    &mut conn,
                    "topics.resume",
                    serde_json::json!({ "topic": topic }),
                    1,
                )
                .await?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "topic": topic, "resumed": resumed })
                );
            } else if resumed {
                println!(
                    "topic {topic:?} resumed: the relays claim its rows again within a heartbeat"
                );
            } else {
                return Err(crate::Error::Usage(format!(
                    "topic {topic:?} is not paused: `outbox-relay topics list` shows the paused topics"
                ))
                .into());
            }
        }
        TopicsCommand::List { json } => {
            let paused = sql::paused_topics(&mut conn).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&paused)?);
            } else {
                print!("{}", render_paused(&paused));
            }
        }
    }
    Ok(())
}

pub fn render_paused(paused: &[sql::TopicPause]) -> String {
    if paused.is_empty() {
        return "PAUSED TOPICS: none\n".into();
    }
    let mut out = format!(
        "{:<32}  {:<20}  {:<24}  REASON\n",
        "PAUSED TOPIC", "SINCE", "BY"
    );
    for p in paused {
        out += &format!(
            "{:<32}  {:<20}  {:<24}  {}\n",
            p.topic,
            p.paused_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            p.paused_by,
            p.reason.as_deref().unwrap_or("")
        );
    }
    out
}

pub async fn replay(pool: &PgPool, args: ReplayArgs) -> anyhow::Result<()> {
    let selection = args.selection()?;
    let mut conn = pool.acquire().await?;
    let candidates = sql::replay_candidates(&mut conn, &selection, args.limit).await?;
    if candidates.is_empty() {
        let msg = "no sent rows match: only rows kept by retention (relay.retention_secs) can be replayed, and `outbox.sent` holds none in this selection";
        if args.json {
            println!("{}", serde_json::json!({ "replayed": 0, "note": msg }));
        } else {
            println!("{msg}");
        }
        return Ok(());
    }
    if args.dry_run {
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "dry_run": true, "would_replay": candidates })
                )?
            );
        } else {
            print!("{}", render_replayed(&candidates));
            println!(
                "dry run: {} sent row(s) would be replayed as new messages; nothing changed",
                candidates.len()
            );
        }
        return Ok(());
    }
    if candidates.len() > 1 && !args.yes {
        confirm_replay(candidates.len())?;
    }
    let replayed = sql::replay(&mut conn, &selection, args.limit).await?;
    record(
        &mut conn,
        "replay",
        serde_json::to_value(&selection)?,
        replayed.len() as i64,
    )
    .await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "replayed": replayed.len(), "messages": replayed })
            )?
        );
    } else {
        print!("{}", render_replayed(&replayed));
        println!(
            "replayed {} message(s): new message ids, the original in the {} header",
            replayed.len(),
            sql::REPLAY_OF_HEADER
        );
    }
    Ok(())
}

fn confirm_replay(n: usize) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(crate::Error::Usage(format!(
            "refusing to replay {n} message(s) without confirmation: stdin is not a terminal, so pass --yes (--dry-run shows which)"
        ))
        .into());
    }
    eprint!(
        "This publishes {n} sent message(s) again, as new messages. Type {n} or 'yes' to confirm: "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    let answer = answer.trim();
    if answer == n.to_string() || answer.eq_ignore_ascii_case("yes") {
        Ok(())
    } else {
        anyhow::bail!("not confirmed (got {answer:?}); nothing replayed")
    }
}

fn render_replayed(rows: &[sql::Replayed]) -> String {
    let mut out = format!(
        "{:>10}  {:<38}  {:<24}  {:<20}  NEW MESSAGE ID\n",
        "SENT ID", "MESSAGE ID", "TOPIC", "KEY"
    );
    for r in rows {
        out += &format!(
            "{:>10}  {:<38}  {:<24}  {:<20}  {}\n",
            r.sent_id,
            r.original_message_id,
            r.topic,
            r.key.as_deref().unwrap_or("-"),
            r.new_message_id.as_deref().unwrap_or("-")
        );
    }
    out
}

pub async fn audit(pool: &PgPool, limit: i64, json: bool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let entries = sql::audit_entries(&mut conn, limit, None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("AUDIT: no actions recorded");
        return Ok(());
    }
    println!(
        "{:>6}  {:<20}  {:<24}  {:<4}  {:<14}  {:>8}  TARGET",
        "ID", "AT", "ACTOR", "VIA", "ACTION", "AFFECTED"
    );
    for e in &entries {
        println!(
            "{:>6}  {:<20}  {:<24}  {:<4}  {:<14}  {:>8}  {}",
            e.id,
            e.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            e.actor,
            e.via,
            e.action,
            e.affected,
            e.target
        );
    }
    Ok(())
}
