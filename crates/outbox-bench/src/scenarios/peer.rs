//! The relay against a peer on the same PostgreSQL: `peer`.
//!
//! The peer is graphile-worker ([`GRAPHILE_WORKER`], npm), a PostgreSQL job queue, draining
//! no-op jobs with `--peer-concurrency` (24) concurrent jobs; the relay drains the same number
//! of messages to NATS, ordered (its default), exactly as the `drain` scenario does
//! ([`throughput::drain`] with [`DrainSpec::plain`]). The two alternate, `--rounds` times (the
//! one that goes first alternates from round to round, so the machine's drift does not favour
//! either), and the ratio relay msg/s ÷ graphile-worker jobs/s is taken within each round;
//! reported are the rounds' ratios and their median.
//!
//! graphile-worker side, per round: a fresh database of its own (dropped afterwards);
//! graphile-worker's migrations (`runMigrations`); `--messages` jobs for the task `noop`, each
//! with a JSON payload carrying a `--payload-bytes`-character string, queued with
//! `graphile_worker.add_jobs` in chunks of 20,000; `VACUUM ANALYZE` of its tables (as the
//! relay's backlog gets); then `run()` with the no-op task, in graphile-worker's batching mode
//! (its documented setting for throughput): jobs fetched `--batch-size` (500) at a time, as
//! the relay claims them (`localQueue.size`), and completions written together
//! (`completeJobBatchDelay` 0). With its defaults, one fetch and one completion statement per
//! job, it drained about 1,500 jobs/s on the reference machine, a tenth of this. The pool has
//! `concurrency + 2` connections as its documentation advises (with its default of 10 it
//! warns, and ran at about half the rate); LISTEN/NOTIFY, prepared statements and the poll
//! interval are its defaults. The clock starts at the first completed job and stops when the jobs
//! table is empty, as the relay's starts at the first progress and stops at an empty outbox.
//!
//! The Node side is `crates/outbox-bench/peer/` (package.json, package-lock.json, drain.mjs),
//! compiled into this binary and installed with `npm ci` into
//! `$XDG_CACHE_HOME/outbox-bench/peer-graphile-worker-<version>` (or `~/.cache/…`) the first
//! time; later runs reuse it. It needs `node` and `npm` on PATH (graphile-worker 0.18 declares
//! Node ≥ 22.18, and runs on Node 20 too).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::throughput::{self, DrainResult, DrainSpec};
use super::Opts;
use crate::bench_db::BenchDb;
use crate::brokers::Broker;
use crate::stats::median;

/// The peer, as pinned in `peer/package.json`.
pub const GRAPHILE_WORKER: &str = "graphile-worker 0.18.0";

const PACKAGE_JSON: &str = include_str!("../../peer/package.json");
const PACKAGE_LOCK: &str = include_str!("../../peer/package-lock.json");
const DRAIN_MJS: &str = include_str!("../../peer/drain.mjs");
/// Written into the install directory after a successful `npm ci`, with the lock file's
/// contents: an install is reused only when it is complete and from the same lock file.
const INSTALLED_MARKER: &str = ".outbox-bench-installed";

/// What `drain.mjs drain` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphileDrain {
    pub jobs: u64,
    /// Seconds from the first completed job to an empty jobs table.
    pub secs: f64,
    /// Seconds from calling `run()` to the first completed job.
    pub startup_secs: f64,
    pub jobs_per_sec: f64,
    pub concurrency: usize,
    /// Jobs fetched (and locked) per query: graphile-worker's `localQueue.size`.
    pub local_queue: usize,
    pub max_pool_size: usize,
    /// graphile-worker's version, read from the installed package.
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerRound {
    /// 0-based.
    pub round: usize,
    /// Which drain ran first in this round: "graphile-worker" or "relay".
    pub first: &'static str,
    pub graphile: GraphileDrain,
    pub relay: DrainResult,
    /// Relay msg/s over graphile-worker jobs/s, both of this round.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    pub peer: String,
    /// `node --version`.
    pub node: String,
    pub concurrency: usize,
    pub messages: u64,
    pub payload_bytes: usize,
    pub sink: String,
    /// The relay's `[ordering] enabled` (its default).
    pub ordering: bool,
    pub rounds: Vec<PeerRound>,
    /// Medians over the rounds.
    pub graphile_jobs_per_sec: f64,
    pub relay_msgs_per_sec: f64,
    /// The median of the rounds' paired ratios.
    pub median_ratio: f64,
}

/// The install directory: `$XDG_CACHE_HOME/outbox-bench/…`, else `~/.cache/outbox-bench/…`.
fn install_dir() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context(
            "neither XDG_CACHE_HOME nor HOME is set: no cache directory for graphile-worker",
        )?;
    Ok(cache
        .join("outbox-bench")
        .join(format!("peer-{}", GRAPHILE_WORKER.replace(' ', "-"))))
}

/// Runs `program args…` in `dir` to completion (killed after `timeout`), returning its stdout;
/// fails with its stderr.
async fn run_tool(
    program: &str,
    args: &[&str],
    dir: &Path,
    env: &[(&str, &str)],
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Dies with the bench, as the relays do.
    outbox_testkit::relay::die_with_parent(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let what = format!("{program} {}", args.join(" "));
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "the peer scenario needs Node.js (20 or later) and npm on PATH, to run {GRAPHILE_WORKER}: \
             `{program}` was not found; install them (Debian: `apt-get install nodejs npm`)"
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot start `{what}`")),
    };
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("`{what}` did not finish in {timeout:?}"))??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "`{what}` failed ({}):\n{}",
        out.status,
        stderr.trim_end()
    );
    if !stderr.trim().is_empty() {
        eprintln!("  {program}: {}", stderr.trim_end().replace('\n', "\n  "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs graphile-worker into [`install_dir`] unless the same lock file is installed there
/// already; returns the directory and `node --version`.
async fn install() -> anyhow::Result<(PathBuf, String)> {
    let node = run_tool(
        "node",
        &["--version"],
        Path::new("."),
        &[],
        Duration::from_secs(30),
    )
    .await?
    .trim()
    .to_string();
    let dir = install_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let marker = dir.join(INSTALLED_MARKER);
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(PACKAGE_LOCK) {
        eprintln!("peer: installing {GRAPHILE_WORKER} into {}", dir.display());
        let _ = std::fs::remove_file(&marker);
        std::fs::write(dir.join("package.json"), PACKAGE_JSON)?;
        std::fs::write(dir.join("package-lock.json"), PACKAGE_LOCK)?;
        run_tool(
            "npm",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
            &dir,
            &[],
            Duration::from_secs(600),
        )
        .await?;
        std::fs::write(&marker, PACKAGE_LOCK)?;
    }
    // The script is small and may change without the packages changing: always rewritten.
    std::fs::write(dir.join("drain.mjs"), DRAIN_MJS)?;
    Ok((dir, node))
}

/// `node drain.mjs args…` against `db`.
async fn drain_mjs(
    dir: &Path,
    db: &BenchDb,
    args: &[&str],
    timeout: Duration,
) -> anyhow::Result<String> {
    let env = [
        ("PEER_DATABASE_URL", db.url.as_str()),
        // graphile-worker's switch for its per-job success log line (the script's logger
        // drops info lines anyway; this spares formatting them).
        ("NO_LOG_SUCCESS", "1"),
    ];
    let script = dir.join("drain.mjs");
    let script = script
        .to_str()
        .context("the install directory is not UTF-8")?;
    let mut all = vec![script];
    all.extend_from_slice(args);
    run_tool("node", &all, dir, &env, timeout).await
}

/// One graphile-worker drain of `o.messages` jobs in a database of its own.
async fn graphile_drain(o: &Opts, dir: &Path) -> anyhow::Result<GraphileDrain> {
    let db = BenchDb::create_empty(&o.database_url, "peer_graphile").await?;
    let result = graphile_drain_inner(o, dir, &db).await;
    db.drop_db().await;
    result
}

async fn graphile_drain_inner(o: &Opts, dir: &Path, db: &BenchDb) -> anyhow::Result<GraphileDrain> {
    drain_mjs(dir, db, &["migrate"], Duration::from_secs(120)).await?;
    const CHUNK: u64 = 20_000;
    // md5 gives 32 hex characters per call; repeat enough of them and cut to size.
    let (n, chars) = (o.messages, o.payload_bytes);
    let repeats = chars.div_ceil(32).max(1);
    let mut tx = db.pool.begin().await?;
    let mut done = 0;
    while done < n {
        let count = CHUNK.min(n - done);
        sqlx::query(&format!(
            "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
               SELECT ROW('noop',
                          json_build_object('p', substring(repeat(md5(g::text || $1::text), {repeats}) FROM 1 FOR {chars})),
                          NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
                 FROM generate_series(1, $2::bigint) g))"
        ))
        .bind(done as i64)
        .bind(count as i64)
        .execute(&mut *tx)
        .await?;
        done += count;
    }
    tx.commit().await?;
    for table in ["_private_jobs", "_private_tasks", "_private_job_queues"] {
        sqlx::query(&format!("VACUUM ANALYZE graphile_worker.{table}"))
            .execute(&db.pool)
            .await?;
    }
    let (jobs, concurrency) = (n.to_string(), o.peer_concurrency.to_string());
    let local_queue = o.batch_size.to_string();
    let args = ["drain", &jobs, &concurrency, &local_queue];
    let out = drain_mjs(dir, db, &args, o.drain_timeout()).await?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("drain.mjs printed no result: {}", out.trim_end()))
}

/// `--rounds` interleaved pairs: a graphile-worker drain and a relay drain through `nats`.
pub async fn peer(o: &Opts, nats: &dyn Broker) -> anyhow::Result<PeerResult> {
    let (dir, node) = install().await?;
    let node_major: Option<u32> = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok());
    if node_major.is_some_and(|m| m < 22) {
        eprintln!("peer: note: {GRAPHILE_WORKER} declares Node >= 22.18; running it on {node}");
    }
    let spec = DrainSpec::plain();
    let mut rounds = Vec::new();
    for round in 0..o.rounds {
        let graphile_first = round % 2 == 0;
        let (mut graphile, mut relay) = (None, None);
        for graphile_turn in [graphile_first, !graphile_first] {
            if graphile_turn {
                eprintln!(
                    "peer round {}/{}: {GRAPHILE_WORKER}, {} no-op jobs, concurrency {}",
                    round + 1,
                    o.rounds,
                    o.messages,
                    o.peer_concurrency
                );
                let g = graphile_drain(o, &dir).await?;
                eprintln!(
                    "  {:.0} jobs/s (start-up {:.2} s)",
                    g.jobs_per_sec, g.startup_secs
                );
                graphile = Some(g);
            } else {
                eprintln!(
                    "peer round {}/{}: relay drain to {}, {} messages, ordering {}",
                    round + 1,
                    o.rounds,
                    nats.kind(),
                    o.messages,
                    if spec.ordering { "on" } else { "off" }
                );
                let mut d = throughput::drain(o, nats, spec).await?;
                d.round = round;
                eprintln!("  {:.0} msg/s", d.msgs_per_sec);
                relay = Some(d);
            }
        }
        let (graphile, relay) = graphile.zip(relay).context("a round without both drains")?;
        let ratio = relay.msgs_per_sec / graphile.jobs_per_sec;
        eprintln!("  relay / graphile-worker: {ratio:.2}x");
        rounds.push(PeerRound {
            round,
            first: if graphile_first {
                "graphile-worker"
            } else {
                "relay"
            },
            graphile,
            relay,
            ratio,
        });
    }
    let of = |f: fn(&PeerRound) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    Ok(PeerResult {
        peer: rounds
            .first()
            .map(|r| format!("graphile-worker {}", r.graphile.version))
            .unwrap_or_else(|| GRAPHILE_WORKER.into()),
        node,
        concurrency: o.peer_concurrency,
        messages: o.messages,
        payload_bytes: o.payload_bytes,
        sink: nats.kind().to_string(),
        ordering: spec.ordering,
        graphile_jobs_per_sec: of(|r| r.graphile.jobs_per_sec),
        relay_msgs_per_sec: of(|r| r.relay.msgs_per_sec),
        median_ratio: of(|r| r.ratio),
        rounds,
    })
}
