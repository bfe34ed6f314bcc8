//! The command line: `migrate`, `run`, `status`, `dead`, `keys`, `topics`, `replay`, `audit`,
//! `demo`. Exit codes: 0 success,
//! 1 runtime failure, 2 bad usage or bad configuration ([`crate::Error::is_usage`]).
//!
//! The command modules below are the binary's: the only code of the crate that prints to
//! stdout or returns `anyhow` errors.

#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod dead;
#[cfg(feature = "nats")]
pub mod demo;
pub mod keys;
pub mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Publishes transactional-outbox rows from PostgreSQL to NATS, RabbitMQ and Kafka."
)]
pub struct Cli {
    /// TOML configuration file. Without one, defaults point at local services; every key can
    /// be overridden with OUTBOX_<SECTION>__<KEY> environment variables (double underscores),
    /// and DATABASE_URL sets database.url when neither the file nor OUTBOX_DATABASE__URL does.
    #[arg(long, short, global = true, env = "OUTBOX_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations (idempotent): prints each version applied, or that the
    /// database is up to date.
    Migrate,
    /// Relay outbox rows to the brokers until SIGTERM or SIGINT, then finish in-flight work.
    Run,
    /// Show the backlog per topic (waiting rows, age of the oldest, publish rate, dead letters),
    /// sink health and live relays, read from the database.
    Status {
        /// Print JSON instead of a table (with --watch: one JSON object per line).
        #[arg(long)]
        json: bool,
        /// Keep refreshing (every second by default) until interrupted.
        #[arg(long, short)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 1.0, value_name = "SECS", requires = "watch", value_parser = parse_interval)]
        interval: f64,
    },
    /// Inspect, retry or purge dead letters (messages the relay gave up on).
    Dead {
        #[command(subcommand)]
        command: dead::DeadCommand,
    },
    /// Held-back and parked ordering keys: list them, release or skip one.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Pause a topic (no relay claims its rows until it is resumed), resume it, list the paused.
    Topics {
        #[command(subcommand)]
        command: admin::TopicsCommand,
    },
    /// Publish sent rows again (kept by relay.retention_secs) as new messages, selected by id
    /// range, key or time range.
    Replay(admin::ReplayArgs),
    /// Who did what and when: every dead, keys, topics and replay action, newest first.
    Audit {
        /// At most this many entries.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The main job end to end, in a database and a NATS stream of its own: sample users, three
    /// events per user under its key (each in one transaction with its change), relayed to NATS,
    /// read back in per-key order, the status while the relay runs, and what to run next.
    Demo {
        /// How many sample users to create (three events each).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
        /// The demo's database, on the server of database.url; created when missing.
        #[arg(long, default_value = "outbox_demo", value_name = "NAME", value_parser = parse_database)]
        database: String,
        /// Keep the demo's NATS stream (it is deleted at the end otherwise).
        #[arg(long)]
        keep: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // The demo talks to a person: only warnings and errors, unless RUST_LOG says otherwise.
    let level = match cli.command {
        Command::Demo { .. } if config.log.level == "info" => "warn".to_string(),
        _ => config.log.level.clone(),
    };
    // Migrating logs PostgreSQL's notices at INFO ("trigger … does not exist, skipping": the
    // migrations' `IF EXISTS` at work, not a problem) and may warn of slow statements (a
    // migration rewriting a table); `migrate` prints what it applied instead. PostgreSQL's
    // warnings still show.
    let quiet: &[&str] = match cli.command {
        Command::Migrate | Command::Demo { .. } => &["sqlx=error", "sqlx::postgres::notice=warn"],
        _ => &[],
    };
    init_logging(&config, &level, quiet);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<crate::Error>()
                .is_some_and(crate::Error::is_usage) =>
        {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}{}", privilege_advice(&e));
            ExitCode::from(1)
        }
    }
}

/// For a statement PostgreSQL refused for want of a privilege (SQLSTATE 42501): where the
/// privileges each command needs are written down.
fn privilege_advice(e: &anyhow::Error) -> &'static str {
    let denied = e.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|code| code == "42501")
    });
    if denied {
        "; the database role of database.url lacks a privilege this command needs: \
         docs/security.md (\"Roles: least privilege\") lists which role runs which command, and \
         deploy/sql/roles.sql grants them"
    } else {
        ""
    }
}

async fn dispatch(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            // No statement or idle timeout: a migration may rewrite a large outbox table
            // (0004 adds a stored column), which must not be cut off at claim_timeout_secs.
            let pool = connect_with_timeout(&config, std::time::Duration::ZERO).await?;
            crate::store::privileges::check_migrate(&pool).await?;
            let before = crate::store::history::applied_versions(&pool).await?;
            crate::store::migrate(&pool).await?;
            let after = crate::store::history::applied_versions(&pool).await?;
            print!(
                "{}",
                render_migrated(
                    &crate::redact::redact_url(&config.database.url),
                    &crate::store::history::known(),
                    &before,
                    &after
                )
            );
            Ok(())
        }
        Command::Run => {
            let shutdown = CancellationToken::new();
            tokio::spawn(wait_for_signal(shutdown.clone()));
            Ok(crate::relay::run(config, shutdown).await?)
        }
        Command::Status {
            json,
            watch,
            interval,
        } => {
            let pool = connect_once(&config).await?;
            crate::store::check_schema(&pool).await?;
            if watch {
                status::watch(&pool, json, std::time::Duration::from_secs_f64(interval)).await
            } else {
                status::print(&pool, json).await
            }
        }
        Command::Dead { command } => {
            let pool = connect_once(&config).await?;
            crate::store::check_schema(&pool).await?;
            dead::run(&pool, command, &config).await
        }
        Command::Keys { command } => {
            let pool = connect_once(&config).await?;
            crate::store::check_schema(&pool).await?;
            keys::run(&pool, command).await
        }
        Command::Topics { command } => {
            let pool = connect_once(&config).await?;
            crate::store::check_schema(&pool).await?;
            admin::topics(&pool, command).await
        }
        Command::Replay(args) => {
            let pool = connect_once(&config).await?;
            crate::store::check_schema(&pool).await?;
            admin::replay(&pool, args).await
        }
        Command::Audit { limit, json } => {
            let pool = connect_once(&config).await?;
            crate::store::check_schema(&pool).await?;
            admin::audit(&pool, limit, json).await
        }
        #[cfg(feature = "nats")]
        Command::Demo {
            count,
            database,
            keep,
        } => {
            demo::run(
                config,
                demo::DemoArgs {
                    count,
                    database,
                    keep,
                },
            )
            .await
        }
        #[cfg(not(feature = "nats"))]
        Command::Demo { .. } => anyhow::bail!(
            "the demo publishes to NATS, and this build has no NATS sink: build with the `nats` feature"
        ),
    }
}

/// What `migrate` did: the versions it applied with their descriptions, or "up to date".
fn render_migrated(url: &str, known: &[(i64, String)], before: &[i64], after: &[i64]) -> String {
    let applied: Vec<&(i64, String)> = known
        .iter()
        .filter(|(v, _)| after.contains(v) && !before.contains(v))
        .collect();
    if applied.is_empty() {
        return match known.iter().rev().find(|(v, _)| after.contains(v)) {
            Some((v, d)) => format!("{url} is up to date (latest migration {v:04} {d})\n"),
            None => format!("{url} is up to date\n"),
        };
    }
    let mut out = format!("applied {} migration(s) to {url}:\n", applied.len());
    for (v, d) in applied {
        out.push_str(&format!("  {v:04} {d}\n"));
    }
    out
}

/// A database name the demo may create: lowercase letters, digits and `_`.
fn parse_database(raw: &str) -> Result<String, String> {
    let ok = raw.len() <= 63
        && raw.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(raw.to_string())
    } else {
        Err(format!(
            "{raw:?} is not a database name the demo creates: use lowercase letters, digits and '_' (at most 63), e.g. outbox_demo"
        ))
    }
}

fn parse_interval(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{raw:?} is not a number of seconds between 0.1 and 3600"
        )),
    }
}

/// For one-shot commands: connect or fail with a clear message.
async fn connect_once(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    connect_with_timeout(
        config,
        std::time::Duration::from_secs(config.relay.claim_timeout_secs),
    )
    .await
}

/// `statement_timeout`: the sessions' statement and idle-in-transaction timeout (zero: none).
async fn connect_with_timeout(
    config: &Config,
    statement_timeout: std::time::Duration,
) -> anyhow::Result<sqlx::PgPool> {
    crate::store::connect(&config.database, 2, statement_timeout)
        .await
        .map_err(|source| {
            crate::Error::Connect {
                url: crate::redact::redact_url(&config.database.url),
                source,
            }
            .into()
        })
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn init_logging(config: &Config, level: &str, quiet: &[&str]) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for directive in crate::sinks::log_directives()
        .into_iter()
        .chain(quiet.iter().copied())
    {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colours only on a terminal: escape codes inside `key=value` fields break log files and
    // pipelines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
