//! `outbox-relay dead list|show|retry|purge`: the operator's view of `outbox.dead_letters`.
//!
//! A dead letter is a message the relay gave up on (a permanent rejection, no route, or
//! `relay.max_attempts` failed attempts). It stays in the database with its payload and full
//! error history until an operator retries it (back into `outbox.messages`, attempts reset,
//! available at once, original id kept) or purges it.
//!
//! `list`, `retry` and `purge` take the same selection: ids, `--topic`, `--key`, an id range and
//! ages, all of which must match. `retry` and `purge` have `--dry-run` (print the rows, change
//! nothing); `purge` always asks for confirmation on a terminal (or needs `--yes`), `retry` asks
//! when it would retry everything (no ids, no filter). A retry of a topic that the loaded
//! configuration does not route prints a hint: the relays would dead-letter it again at once.
//! The SQL is in [`crate::store::dead`]; this module parses, confirms and prints.

pub use crate::message::hex_dump;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use chrono::Utc;
use clap::{Args, Subcommand};
use sqlx::PgPool;

use crate::config::Config;
use crate::store::dead::{self as sql, DeadFilter, DeadLetter, DeadSummary, RetryResult};

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead letters, lowest id first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show at most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: payload (text if UTF-8, else a hex dump), headers, error history.
    Show {
        /// The dead letter's id (the outbox row id, as `list` shows it).
        id: i64,
        /// Print JSON (the payload as `payload_text` when UTF-8, and always as `payload_hex`).
        #[arg(long)]
        json: bool,
    },
    /// Move matching dead letters back into the outbox: attempts reset, available now, same id.
    /// Without ids or a filter (everything) it asks first on a terminal and otherwise needs
    /// --yes.
    Retry {
        #[command(flatten)]
        filter: FilterArgs,
        /// Retry at most this many (lowest ids first).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        limit: Option<i64>,
        #[command(flatten)]
        confirm: ConfirmArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete matching dead letters for good. Asks for confirmation on a terminal; otherwise
    /// requires --yes.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Purge at most this many (lowest ids first).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        limit: Option<i64>,
        #[command(flatten)]
        confirm: ConfirmArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Filters shared by list, retry and purge; every one given must match. Ages count from when
/// the row was dead-lettered.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only these dead letters (ids as `list` shows them); several may be given.
    #[arg(value_name = "ID")]
    pub ids: Vec<i64>,
    /// Only this topic (exact name); repeat for several.
    #[arg(long, value_name = "TOPIC")]
    pub topic: Vec<String>,
    /// Only this ordering key (exact); repeat for several.
    #[arg(long, value_name = "KEY")]
    pub key: Vec<String>,
    /// Only rows dead-lettered at least this long ago: 30s, 10m, 2h, 3d, 1w.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// Only rows dead-lettered at most this long ago: 30s, 10m, 2h, 3d, 1w.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub newer_than: Option<Duration>,
    /// Only ids >= this.
    #[arg(long, value_name = "ID")]
    pub id_from: Option<i64>,
    /// Only ids <= this.
    #[arg(long, value_name = "ID")]
    pub id_to: Option<i64>,
}

/// How retry and purge make sure the operator means it.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct ConfirmArgs {
    /// Print what would be affected and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask: act on everything that matches.
    #[arg(long, short, conflicts_with = "dry_run")]
    pub yes: bool,
}

impl FilterArgs {
    pub fn to_filter(&self) -> Result<DeadFilter, crate::Error> {
        if let (Some(from), Some(to)) = (self.id_from, self.id_to) {
            if from > to {
                return Err(crate::Error::Usage(format!(
                    "--id-from ({from}) is greater than --id-to ({to}): swap them"
                )));
            }
        }
        Ok(DeadFilter {
            topics: self.topic.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
            id_from: self.id_from,
            id_to: self.id_to,
            ids: self.ids.clone(),
            keys: self.key.clone(),
        })
    }
}

/// Parses an age such as `45s`, `10m`, `2h`, `3d` or `1w`.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("{s:?} is not an age: use a number and a unit, like 30s, 10m, 2h, 3d or 1w")
    })?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => {
            return Err(format!(
                "{s:?} has no known unit: use s, m, h, d or w (e.g. 10m, 2h, 3d)"
            ))
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Runs a `dead` command. `config` is the configuration this command loaded: retry checks the
/// retried topics against its routes.
pub async fn run(pool: &PgPool, command: DeadCommand, config: &Config) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    match command {
        DeadCommand::List {
            filter,
            limit,
            json,
        } => {
            let filter = filter.to_filter()?;
            let rows = sql::list(&mut conn, &filter, Some(limit)).await?;
            let total = sql::count(&mut conn, &filter).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "total": total, "dead_letters": rows })
                    )?
                );
            } else {
                print!("{}", render_list(&rows, total));
            }
        }
        DeadCommand::Show { id, json } => {
            let dead = sql::get(&mut conn, id).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no dead letter with id {id}; `outbox-relay dead list` shows the ids"
                )
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&show_json(&dead))?);
            } else {
                print!("{}", render_show(&dead));
            }
        }
        DeadCommand::Retry {
            filter,
            limit,
            confirm,
            json,
        } => {
            let filter = filter.to_filter()?;
            let router =
                crate::routing::Router::new(&config.sinks).map_err(crate::Error::Config)?;
            if confirm.dry_run {
                let rows = sql::list(&mut conn, &filter, limit).await?;
                let hints = route_hints(&router, rows.iter().map(|r| r.topic.as_str()));
                print_dry_run("retry", &rows, &hints, json)?;
                return Ok(());
            }
            // The rows are chosen once, and exactly those are retried: nothing dead-lettered
            // after the confirmation is retried with them.
            let ids = sql::select_ids(&mut conn, &filter, limit).await?;
            if ids.is_empty() {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "retried": 0, "skipped": 0, "results": [] })
                    );
                } else {
                    print!("{}", render_retry(&[]));
                }
                return Ok(());
            }
            if filter.is_empty() && !confirm.yes {
                confirm_all("retry", ids.len())?;
            }
            let chosen = DeadFilter {
                ids,
                ..DeadFilter::default()
            };
            let results = sql::retry(&mut conn, &chosen, None).await?;
            let skipped = results.iter().filter(|r| !r.retried).count();
            super::admin::record(
                &mut conn,
                "dead.retry",
                serde_json::json!({ "ids": chosen.ids }),
                (results.len() - skipped) as i64,
            )
            .await?;
            let hints = route_hints(
                &router,
                results
                    .iter()
                    .filter(|r| r.retried)
                    .map(|r| r.topic.as_str()),
            );
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "retried": results.len() - skipped, "skipped": skipped, "results": results,
                        "hints": hints
                    }))?
                );
            } else {
                print!("{}", render_retry(&results));
            }
            for hint in &hints {
                eprintln!("hint: {hint}");
            }
            if skipped > 0 {
                anyhow::bail!(
                    "{skipped} dead letter(s) were not retried because a message with the same message_id is waiting in outbox.messages; they stay in outbox.dead_letters (purge them, or retry after that message is delivered)"
                );
            }
        }
        DeadCommand::Purge {
            filter,
            limit,
            confirm,
            json,
        } => {
            let filter = filter.to_filter()?;
            if confirm.dry_run {
                let rows = sql::list(&mut conn, &filter, limit).await?;
                print_dry_run("purge", &rows, &[], json)?;
                return Ok(());
            }
            let ids = sql::select_ids(&mut conn, &filter, limit).await?;
            if ids.is_empty() {
                if json {
                    println!("{}", serde_json::json!({ "purged": 0 }));
                } else {
                    println!("no dead letters match; nothing purged");
                }
                return Ok(());
            }
            if !confirm.yes {
                confirm_purge(ids.len(), &filter)?;
            }
            let purged = sql::purge_ids(&mut conn, &ids).await?;
            super::admin::record(
                &mut conn,
                "dead.purge",
                serde_json::json!({ "ids": ids }),
                purged as i64,
            )
            .await?;
            if json {
                println!("{}", serde_json::json!({ "purged": purged }));
            } else {
                println!("purged {purged} dead letter(s)");
            }
        }
    }
    Ok(())
}

/// `--dry-run` of `verb`: the rows it would act on, nothing changed.
fn print_dry_run(
    verb: &str,
    rows: &[DeadSummary],
    hints: &[String],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": true,
                format!("would_{verb}"): rows.len(),
                "dead_letters": rows,
                "hints": hints,
            }))?
        );
    } else {
        println!(
            "dry run: would {verb} {} dead letter(s); nothing changed",
            rows.len()
        );
        if !rows.is_empty() {
            print!("{}", render_list(rows, rows.len() as i64));
        }
        for hint in hints {
            eprintln!("hint: {hint}");
        }
    }
    Ok(())
}

/// One sentence per topic among `topics` that no route of this command's configuration
/// matches: retried, its messages would be dead-lettered again at once ("no route").
fn route_hints<'a>(
    router: &crate::routing::Router,
    topics: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let mut unrouted: BTreeMap<&str, usize> = BTreeMap::new();
    for topic in topics {
        if router.route(topic).is_none() {
            *unrouted.entry(topic).or_default() += 1;
        }
    }
    unrouted
        .into_iter()
        .map(|(topic, n)| {
            format!(
                "no sink routes topic {topic:?} in the configuration this command loaded, so relays running with it dead-letter these {n} message(s) again at once (\"no route\"): add the topic, or a pattern matching it, to a sink's routes (docs/configuration.md), restart the relays, then retry"
            )
        })
        .collect()
}

/// For `verb` run without any filter: asks on a terminal; refuses when stdin is not one.
fn confirm_all(verb: &str, n: usize) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(crate::Error::Usage(format!(
            "refusing to {verb} all {n} dead letter(s) without confirmation: no ids or filter were given and stdin is not a terminal; pass --yes to {verb} them all, or choose some with ids, --topic, --key, --id-from/--id-to or --older-than/--newer-than (--dry-run shows which)"
        ))
        .into());
    }
    eprint!("No ids or filter given: this will {verb} ALL {n} dead letter(s). Type {n} or 'yes' to confirm: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    let answer = answer.trim();
    if answer == n.to_string() || answer.eq_ignore_ascii_case("yes") {
        Ok(())
    } else {
        anyhow::bail!("not confirmed (got {answer:?}); nothing done")
    }
}

/// Asks on the terminal; refuses when stdin is not a terminal (scripts must pass --yes).
fn confirm_purge(n: usize, filter: &DeadFilter) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(crate::Error::Usage(format!(
            "refusing to purge {n} dead letter(s) without confirmation: stdin is not a terminal, so pass --yes (--dry-run shows which)"
        ))
        .into());
    }
    let scope = if filter.is_empty() {
        "ALL".to_string()
    } else {
        "the matching".to_string()
    };
    eprint!("This deletes {scope} {n} dead letter(s) for good. Type {n} or 'yes' to confirm: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    let answer = answer.trim();
    if answer == n.to_string() || answer.eq_ignore_ascii_case("yes") {
        Ok(())
    } else {
        anyhow::bail!("not confirmed (got {answer:?}); nothing purged")
    }
}

fn ago(at: chrono::DateTime<Utc>) -> String {
    let secs = (Utc::now() - at).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        format!("{}…", flat.chars().take(max - 1).collect::<String>())
    }
}

pub fn render_list(rows: &[DeadSummary], total: i64) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no dead letters match\n");
        return out;
    }
    let tw = rows.iter().map(|r| r.topic.len()).max().unwrap_or(5).max(5);
    let key = |r: &DeadSummary| one_line(r.key.as_deref().unwrap_or("-"), 40);
    let kw = rows
        .iter()
        .map(|r| key(r).chars().count())
        .max()
        .unwrap_or(3)
        .max(3);
    let _ = writeln!(
        out,
        "{:>12}  {:<tw$}  {:<kw$}  {:>8}  {:>8}  LAST ERROR",
        "ID", "TOPIC", "KEY", "ATTEMPTS", "DEAD FOR"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>12}  {:<tw$}  {:<kw$}  {:>8}  {:>8}  {}",
            r.id,
            r.topic,
            key(r),
            r.attempts,
            ago(r.dead_at),
            one_line(&r.last_error, 100)
        );
    }
    if (rows.len() as i64) < total {
        let _ = writeln!(
            out,
            "({} of {total} shown; raise --limit or narrow the filters to see the rest)",
            rows.len()
        );
    } else {
        let _ = writeln!(out, "({total} dead letter(s))");
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// One history entry as a line: `#3 2024-05-01T10:00:00Z  error text`.
fn history_line(entry: &serde_json::Value) -> String {
    let at = entry.get("at").and_then(|v| v.as_str()).unwrap_or("?");
    let what = entry
        .get("error")
        .or_else(|| entry.get("event"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| entry.to_string());
    match entry.get("attempt").and_then(|v| v.as_i64()) {
        Some(n) => format!("attempt {n:<3} {at}  {what}"),
        None => format!("            {at}  {what}"),
    }
}

pub fn render_show(d: &DeadLetter) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id:          {}", d.id);
    let _ = writeln!(out, "message_id:  {}", d.message_id);
    let _ = writeln!(out, "topic:       {}", d.topic);
    let _ = writeln!(out, "key:         {}", d.key.as_deref().unwrap_or("(none)"));
    let _ = writeln!(out, "created_at:  {}", d.created_at.to_rfc3339());
    let _ = writeln!(
        out,
        "dead_at:     {} ({} ago)",
        d.dead_at.to_rfc3339(),
        ago(d.dead_at)
    );
    let _ = writeln!(out, "attempts:    {}", d.attempts);
    let _ = writeln!(out, "last_error:  {}", d.last_error);
    if d.headers.is_empty() {
        let _ = writeln!(out, "headers:     (none)");
    } else {
        let _ = writeln!(out, "headers:");
        for (k, v) in &d.headers {
            let _ = writeln!(out, "  {k}: {v}");
        }
    }
    match std::str::from_utf8(&d.payload) {
        Ok(text) => {
            let _ = writeln!(out, "payload:     {} bytes, UTF-8 text:", d.payload.len());
            out.push_str(text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        Err(_) => {
            let _ = writeln!(out, "payload:     {} bytes, binary (hex):", d.payload.len());
            out.push_str(&hex_dump(&d.payload));
        }
    }
    let history = d.errors.as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "error history ({} entries, oldest first):",
        history.len()
    );
    for entry in &history {
        let _ = writeln!(out, "  {}", history_line(entry));
    }
    out
}

pub fn show_json(d: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "message_id": d.message_id,
        "topic": d.topic,
        "key": d.key,
        "headers": d.headers,
        "attempts": d.attempts,
        "created_at": d.created_at,
        "dead_at": d.dead_at,
        "last_error": d.last_error,
        "errors": d.errors,
        "payload_bytes": d.payload.len(),
        "payload_text": std::str::from_utf8(&d.payload).ok(),
        "payload_hex": hex(&d.payload),
    })
}

pub fn render_retry(results: &[RetryResult]) -> String {
    let mut out = String::new();
    if results.is_empty() {
        out.push_str("no dead letters match; nothing retried\n");
        return out;
    }
    let mut retried = 0;
    for r in results {
        if r.retried {
            retried += 1;
        } else {
            let why = match r.conflicting_id {
                Some(id) => format!("outbox row {id} with the same message_id is waiting"),
                None => {
                    "a row with the same id or message_id appeared in outbox.messages".to_string()
                }
            };
            let _ = writeln!(
                out,
                "skipped {} (topic {}, message_id {}): {why}",
                r.id, r.topic, r.message_id
            );
        }
    }
    let _ = writeln!(
        out,
        "retried {retried} dead letter(s): back in outbox.messages with attempts reset, available now; {} skipped",
        results.len() - retried
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_units_and_explain_mistakes() {
        assert_eq!(parse_age("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_age("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_age("2h").unwrap(), Duration::from_secs(7_200));
        assert_eq!(parse_age("3d").unwrap(), Duration::from_secs(259_200));
        assert_eq!(parse_age("1w").unwrap(), Duration::from_secs(604_800));
        assert!(parse_age("10").unwrap_err().contains("no known unit"));
        assert!(parse_age("m").unwrap_err().contains("not an age"));
        assert!(parse_age("3 days").unwrap_err().contains("unit"));
    }

    #[test]
    fn id_range_must_be_ordered() {
        let f = FilterArgs {
            id_from: Some(9),
            id_to: Some(3),
            ..Default::default()
        };
        assert!(f.to_filter().unwrap_err().to_string().contains("swap them"));
    }

    #[test]
    fn hex_dump_shows_offsets_and_ascii() {
        let dump = hex_dump(&[0x00, 0x41, 0xff]);
        assert_eq!(
            dump,
            format!("00000000  00 41 ff {}  |.A.|\n", "   ".repeat(13))
        );
        assert_eq!(hex(&[0xde, 0xad]), "dead");
    }
}
