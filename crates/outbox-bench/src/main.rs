//! `outbox-bench`: reproducible performance figures for outbox-relay, each measured against the
//! database's own ceiling in the same run. Prints tables and writes JSON.
//!
//! Scenarios (`--scenarios`, all by default):
//! 1. `ceiling`: the relay's claim + mark SQL looping with no broker (rows/s).
//! 2. `drain`: a preloaded backlog through each available sink (NATS JetStream, RabbitMQ,
//!    Kafka), real relay process, broker acks.
//! 3. `latency`: open-loop producer at fixed rates; commit → consumer percentiles.
//! 4. `enqueue`: client crate vs raw INSERT, 1 and 100 rows per transaction, wake-up states.
//! 5. `scale`: 1, 2, 4 relay processes draining one keyed backlog, ordering on and off.
//! 6. `steady`: a fraction (70 %) of the end-to-end maximum rate (closed-loop producer and relay
//!    together) for `--steady-secs`, with autovacuum on and/or off (`--steady-autovacuum`).
//! 7. `heldxmin`: the steady state at `--hold-rate` with a REPEATABLE READ transaction held open
//!    in the same database for `--hold-secs` after a baseline, then `--hold-after-secs`.
//! 8. `deadrows`: the claim's time with `--dead-rows` deleted rows behind the live ones while a
//!    transaction holds the xmin horizon, with and without the claim floor.
//! 9. `admin` (only when named): the admin's overview and message searches with `--admin-rows`
//!    waiting rows.
//! 10. `peer` (only when named: it needs Node.js and npm, installs graphile-worker from npm the
//!     first time, and takes minutes): graphile-worker 0.18.0 (`--peer-concurrency` 24) draining
//!     `--messages` no-op jobs, interleaved `--rounds` times with the relay's ordered drain of as
//!     many messages to NATS, on the same PostgreSQL; the ratio relay / graphile-worker per round
//!     and its median.
//!
//! See docs/benchmarks.md for the method and the results on the reference machine.

mod bench_db;
mod brokers;
mod machine;
mod producer;
mod relay_proc;
mod report;
mod scenarios;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::brokers::BrokerUrls;
use crate::relay_proc::RelayLauncher;
use crate::scenarios::throughput::DrainSpec;
use crate::scenarios::Opts;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Ceiling,
    Drain,
    Latency,
    Enqueue,
    Scale,
    Steady,
    Heldxmin,
    Deadrows,
    Admin,
    Peer,
}

#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    version,
    about = "Benchmarks outbox-relay: database ceiling, drain per sink, latency, enqueue, scale, steady state.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Child>,

    /// Scenarios to run, comma-separated. `admin` and `peer` run only when named.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceiling,drain,latency,enqueue,scale,steady,heldxmin,deadrows"
    )]
    scenarios: Vec<Scenario>,
    /// Small sizes and short durations: the whole run takes a few minutes.
    #[arg(long)]
    quick: bool,
    /// Sinks to drive, comma-separated: nats, amqp, kafka [default: every sink whose broker
    /// answers; Kafka needs `tansu` or --kafka-brokers].
    #[arg(long, value_delimiter = ',')]
    sinks: Vec<String>,
    /// Backlog size for ceiling, drain, scale and peer [default: 200000; quick: 20000].
    #[arg(long)]
    messages: Option<u64>,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Relay batch size (ceiling loop too) [default: the relay's default].
    #[arg(long)]
    batch_size: Option<u32>,
    /// Relay workers (ceiling loop too) [default: the relay's default].
    #[arg(long)]
    workers: Option<u32>,
    /// Repeat ceiling + drain this many times; medians are reported [default: 3; quick: 1].
    #[arg(long)]
    repeat: Option<usize>,
    /// Rounds of the enqueue, scale and peer scenarios. Within a round the cells compared with each
    /// other run back to back, in an order that rotates from round to round; reported are the
    /// medians over rounds and the median of the ratios paired within a round
    /// [default: 3; quick: 2].
    #[arg(long)]
    rounds: Option<usize>,
    /// The scale scenario's ordering modes: off (unordered), on (ordered); both by default.
    /// One alone is for profiling a mode; the ratio needs both.
    #[arg(long, value_delimiter = ',', default_value = "off,on", value_parser = ["off", "on"])]
    scale_modes: Vec<String>,
    /// Relay process counts for the scale scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    relays: Vec<usize>,
    /// Distinct keys of the scale scenario's backlog, drained with ordering on (ordered) and
    /// off (unordered).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Offered rates (messages/s) for the latency scenario.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,10000")]
    rates: Vec<f64>,
    /// Seconds per latency rate [default: 30; quick: 5].
    #[arg(long)]
    latency_secs: Option<f64>,
    /// Producer connections for the latency and steady scenarios.
    #[arg(long, default_value_t = 16)]
    producer_conns: usize,
    /// Seconds measured per enqueue cell (plus a fifth as warm-up) [default: 5; quick: 1].
    #[arg(long)]
    enqueue_secs: Option<f64>,
    /// Connection counts for the enqueue scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    enqueue_conns: Vec<usize>,
    /// Steady-state duration in seconds [default: 600; quick: 30].
    #[arg(long)]
    steady_secs: Option<f64>,
    /// Steady-state reporting window in seconds [default: 30; quick: 10].
    #[arg(long)]
    steady_window_secs: Option<f64>,
    /// Steady-state rate in messages/s [default: --steady-fraction of the end-to-end maximum
    /// rate, measured first].
    #[arg(long)]
    steady_rate: Option<f64>,
    /// Share of the end-to-end maximum rate offered in the steady state.
    #[arg(long, default_value_t = 0.7)]
    steady_fraction: f64,
    /// Messages per transaction in the steady state and in the maximum-rate run before it.
    #[arg(long, default_value_t = 10)]
    steady_batch: usize,
    /// Seconds of the end-to-end maximum-rate run (closed-loop producer while a relay
    /// publishes; the first fifth is warm-up) [default: 30; quick: 10].
    #[arg(long)]
    max_rate_secs: Option<f64>,
    /// Autovacuum settings of the steady state, comma-separated: on (the server's), off
    /// (`autovacuum_enabled = false` on the benchmark database's outbox tables).
    #[arg(long, value_delimiter = ',', default_value = "on", value_parser = ["on", "off"])]
    steady_autovacuum: Vec<String>,
    /// Offered rate of the held-xmin scenario (messages/s, `--steady-batch` per transaction).
    #[arg(long, default_value_t = 2000.0)]
    hold_rate: f64,
    /// Seconds before the holder begins [default: 120; quick: 30].
    #[arg(long)]
    hold_baseline_secs: Option<f64>,
    /// Seconds the REPEATABLE READ transaction stays open [default: 900; quick: 60].
    #[arg(long)]
    hold_secs: Option<f64>,
    /// Seconds measured after the holder ends [default: 120; quick: 60].
    #[arg(long)]
    hold_after_secs: Option<f64>,
    /// Deleted rows behind the live ones for `deadrows`, cumulative steps
    /// [default: 0,500000,1500000,5000000; quick: 0,100000,300000].
    #[arg(long, value_delimiter = ',')]
    dead_rows: Vec<u64>,
    /// Waiting rows of the `admin` scenario [default: 10000000; quick: 200000].
    #[arg(long)]
    admin_rows: Option<u64>,
    /// Concurrent jobs of graphile-worker in the `peer` scenario (its pool gets 2 connections
    /// more, as graphile-worker advises).
    #[arg(long, default_value_t = 24)]
    peer_concurrency: usize,
    /// PostgreSQL server; each benchmark creates (and drops) its own database there.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// JetStream storage of the benchmark streams: file (as in production) or memory.
    #[arg(long, default_value = "file", value_parser = ["file", "memory"])]
    nats_storage: String,
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// An existing Kafka cluster (host:port[,host:port…]) [default: the bench starts a `tansu`
    /// broker of its own on a free port, from $TANSU_BIN, PATH or ~/.cargo/bin].
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Storage of the bench's own tansu broker: memory, or sqlite (a file in a temporary
    /// directory).
    #[arg(long, default_value = "memory", value_parser = ["memory", "sqlite"])]
    kafka_storage: String,
    /// Partitions of each benchmark Kafka topic.
    #[arg(long, default_value_t = 4)]
    kafka_partitions: i32,
    /// The outbox-relay binary [default: next to this binary; else this binary runs the relay
    /// library in a child process].
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Create each benchmark database's schema with the relay binary's own `migrate` command
    /// instead of this bench's migrations: for runs paired against an earlier relay
    /// (`--relay-bin`) whose schema differs.
    #[arg(long, requires = "relay_bin")]
    relay_migrates: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Child {
    /// Internal: run the relay library as a child process (used when outbox-relay is not built).
    #[command(hide = true)]
    RelayChild {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Child::RelayChild { config }) = cli.command {
        return relay_proc::relay_child_main(config);
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn resolve(cli: &Cli) -> anyhow::Result<Opts> {
    let q = cli.quick;
    let pick = |v: Option<f64>, full: f64, quick: f64| v.unwrap_or(if q { quick } else { full });
    let defaults = outbox_relay::config::RelayConfig::default();
    let log_dir = cli
        .out
        .parent()
        .map(|p| p.join("logs"))
        .unwrap_or_else(|| PathBuf::from("target/bench/logs"));
    let batch_size = cli.batch_size.unwrap_or(defaults.batch_size);
    let workers = cli.workers.unwrap_or(defaults.workers);
    let o = Opts {
        database_url: cli.database_url.clone(),
        messages: cli.messages.unwrap_or(if q { 20_000 } else { 200_000 }),
        payload_bytes: cli.payload_bytes,
        batch_size,
        workers,
        repeat: cli.repeat.unwrap_or(if q { 1 } else { 3 }).max(1),
        rounds: cli.rounds.unwrap_or(if q { 2 } else { 3 }).max(1),
        relays: cli.relays.clone(),
        keys: cli.keys,
        rates: cli.rates.clone(),
        latency_secs: pick(cli.latency_secs, 30.0, 5.0),
        producer_conns: cli.producer_conns.max(1),
        enqueue_secs: pick(cli.enqueue_secs, 5.0, 1.0),
        enqueue_conns: cli.enqueue_conns.clone(),
        steady_secs: pick(cli.steady_secs, 600.0, 30.0),
        steady_window_secs: pick(cli.steady_window_secs, 30.0, 10.0),
        steady_rate: cli.steady_rate,
        steady_fraction: cli.steady_fraction,
        steady_batch: cli.steady_batch.max(1),
        max_rate_secs: pick(cli.max_rate_secs, 30.0, 10.0),
        dead_rows: if cli.dead_rows.is_empty() {
            if q {
                vec![0, 100_000, 300_000]
            } else {
                vec![0, 500_000, 1_500_000, 5_000_000]
            }
        } else {
            cli.dead_rows.clone()
        },
        hold_rate: cli.hold_rate,
        hold_baseline_secs: pick(cli.hold_baseline_secs, 120.0, 30.0),
        hold_secs: pick(cli.hold_secs, 900.0, 60.0),
        hold_after_secs: pick(cli.hold_after_secs, 120.0, 60.0),
        steady_autovacuum: cli.steady_autovacuum.clone(),
        admin_rows: cli
            .admin_rows
            .unwrap_or(if q { 200_000 } else { 10_000_000 }),
        peer_concurrency: cli.peer_concurrency,
        launcher: RelayLauncher::new(cli.relay_bin.clone(), batch_size, workers, log_dir)?,
        relay_migrates: cli.relay_migrates,
    };
    anyhow::ensure!(o.messages > 0, "--messages must be above 0");
    anyhow::ensure!(
        o.rates.iter().all(|r| *r > 0.0),
        "--rates must all be above 0"
    );
    anyhow::ensure!(
        o.relays.iter().all(|r| *r > 0),
        "--relays must all be above 0"
    );
    anyhow::ensure!(
        o.enqueue_conns.iter().all(|c| *c > 0),
        "--enqueue-conns must all be above 0"
    );
    anyhow::ensure!(
        o.steady_secs > 0.0
            && o.steady_window_secs > 0.0
            && o.latency_secs > 0.0
            && o.enqueue_secs > 0.0
            && o.max_rate_secs > 0.0,
        "durations must be above 0"
    );
    anyhow::ensure!(
        o.steady_fraction > 0.0 && o.steady_fraction <= 1.0,
        "--steady-fraction must be in (0, 1], got {}",
        o.steady_fraction
    );
    anyhow::ensure!(o.peer_concurrency > 0, "--peer-concurrency must be above 0");
    anyhow::ensure!(
        cli.kafka_partitions > 0,
        "--kafka-partitions must be above 0"
    );
    Ok(o)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let o = resolve(&cli)?;
    let wants = |s: Scenario| cli.scenarios.contains(&s);
    let urls = BrokerUrls {
        nats: cli.nats_url.clone(),
        nats_storage: cli.nats_storage.clone(),
        amqp: cli.amqp_url.clone(),
        kafka_brokers: cli.kafka_brokers.clone(),
        kafka_storage: cli.kafka_storage.clone(),
        kafka_partitions: cli.kafka_partitions,
    };
    let (brokers, skipped) = brokers::available(&urls, &cli.sinks).await;
    for s in &skipped {
        eprintln!("skipping sink {s}");
    }
    // The peer scenario's relay drains to NATS: checked before anything runs.
    let peer_nats = match brokers.iter().find(|b| b.kind() == "nats") {
        _ if !wants(Scenario::Peer) => None,
        Some(nats) => Some(nats),
        None => anyhow::bail!(
            "the peer scenario measures the relay's drain to NATS, and NATS is not available ({})",
            skipped
                .iter()
                .find(|s| s.starts_with("nats"))
                .map(String::as_str)
                .unwrap_or("--sinks leaves it out")
        ),
    };
    let admin = sqlx::PgPool::connect(&o.database_url).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at {}: {e}; start it or pass --database-url",
            outbox_relay::redact_url(&o.database_url)
        )
    })?;
    let versions = brokers
        .iter()
        .map(|b| (b.kind().to_string(), b.version()))
        .collect();
    let machine = machine::Machine::describe(&admin, versions).await;
    admin.close().await;

    let mut r = report::Report::new(&cli, &o, machine, skipped);
    eprintln!(
        "outbox-bench: {} messages of {} bytes, batch {}, {} workers, relay {}",
        o.messages,
        o.payload_bytes,
        o.batch_size,
        o.workers,
        o.launcher.describe()
    );

    if wants(Scenario::Ceiling) || wants(Scenario::Drain) {
        for i in 0..o.repeat {
            eprintln!("run {}/{}: ceiling", i + 1, o.repeat);
            let c = scenarios::throughput::ceiling(&o).await?;
            eprintln!("  ceiling {:.0} rows/s", c.rows_per_sec);
            let mut drains = Vec::new();
            if wants(Scenario::Drain) {
                for b in &brokers {
                    let mut d =
                        scenarios::throughput::drain(&o, b.as_ref(), DrainSpec::plain()).await?;
                    d.pct_of_ceiling = stats::pct(d.msgs_per_sec, c.rows_per_sec);
                    eprintln!(
                        "  drain {} {:.0} msg/s ({:.0} % of ceiling), relay peak RSS {:.1} MiB",
                        d.sink, d.msgs_per_sec, d.pct_of_ceiling, d.relay_peak_rss_mib
                    );
                    drains.push(d);
                }
            }
            r.throughput_runs
                .push(report::ThroughputRun { ceiling: c, drains });
        }
    }
    let ceiling = r.ceiling_median();

    if wants(Scenario::Latency) {
        for b in &brokers {
            for &rate in &o.rates {
                eprintln!(
                    "latency {} at {rate} msg/s for {} s",
                    b.kind(),
                    o.latency_secs
                );
                let l = scenarios::latency::latency(&o, b.as_ref(), rate).await?;
                eprintln!(
                    "  p50 {:.1} ms p99 {:.1} ms (from commit p99 {:.1} ms), received {}/{}",
                    l.from_intended.p50_ms,
                    l.from_intended.p99_ms,
                    l.from_commit.p99_ms,
                    l.received,
                    l.sent
                );
                r.latency.push(l);
            }
        }
    }

    if wants(Scenario::Enqueue) {
        eprintln!("enqueue: {} s per cell", o.enqueue_secs);
        r.enqueue = scenarios::enqueue::enqueue_bench(&o).await?;
    }

    if wants(Scenario::Scale) {
        // Each ordered drain runs right next to the unordered drain it is compared with (the
        // order of the two alternates from round to round), so the ratio of a pair is measured
        // under the same conditions; the report gives the median of the paired ratios.
        let modes: Vec<bool> = [false, true]
            .into_iter()
            .filter(|m| cli.scale_modes.iter().any(|s| (s == "on") == *m))
            .collect();
        for round in 0..o.rounds {
            for b in &brokers {
                for &relays in &o.relays {
                    let order: Vec<bool> = if round % 2 == 1 {
                        modes.iter().rev().copied().collect()
                    } else {
                        modes.clone()
                    };
                    for ordering in order {
                        eprintln!(
                            "scale round {}/{}: {relays} relay(s) through {}, {} keys, ordering {}",
                            round + 1,
                            o.rounds,
                            b.kind(),
                            o.keys,
                            if ordering { "on" } else { "off" }
                        );
                        let spec = DrainSpec {
                            relays,
                            keys: o.keys,
                            ordering,
                            settle: true,
                        };
                        let mut d = scenarios::throughput::drain(&o, b.as_ref(), spec).await?;
                        d.round = round;
                        d.pct_of_ceiling = ceiling
                            .map(|c| stats::pct(d.msgs_per_sec, c))
                            .unwrap_or(0.0);
                        eprintln!("  {:.0} msg/s", d.msgs_per_sec);
                        r.scale.push(d);
                    }
                }
            }
        }
    }

    if wants(Scenario::Steady) {
        for b in &brokers {
            let (rate, basis) = match o.steady_rate {
                Some(rate) => (rate, "--steady-rate".to_string()),
                None => {
                    eprintln!(
                        "steady: end-to-end maximum rate through {} ({} s, closed loop, {} msg/tx)",
                        b.kind(),
                        o.max_rate_secs,
                        o.steady_batch
                    );
                    let m = scenarios::latency::max_rate(&o, b.as_ref()).await?;
                    eprintln!(
                        "  delivered {:.0} msg/s, enqueued {:.0} msg/s, backlog {} -> {}",
                        m.delivered_per_sec, m.enqueued_per_sec, m.backlog_start, m.backlog_end
                    );
                    let basis = format!(
                        "{:.0} % of the end-to-end maximum rate measured before it ({:.0} msg/s)",
                        o.steady_fraction * 100.0,
                        m.delivered_per_sec
                    );
                    let rate = o.steady_fraction * m.delivered_per_sec;
                    r.max_rate.push(m);
                    (rate, basis)
                }
            };
            anyhow::ensure!(
                rate > 0.0,
                "the steady rate through {} came out as {rate:.0} msg/s; pass --steady-rate",
                b.kind()
            );
            eprintln!(
                "steady: {rate:.0} msg/s through {} for {} s",
                b.kind(),
                o.steady_secs
            );
            for av in &o.steady_autovacuum {
                eprintln!("steady: autovacuum {av}");
                let spec = scenarios::latency::SteadySpec {
                    autovacuum_off: av == "off",
                    hold: None,
                };
                r.steady.push(
                    scenarios::latency::steady(&o, b.as_ref(), rate, basis.clone(), &spec).await?,
                );
            }
        }
    }

    if wants(Scenario::Heldxmin) {
        for b in &brokers {
            let total = o.hold_baseline_secs + o.hold_secs + o.hold_after_secs;
            eprintln!(
                "heldxmin: {:.0} msg/s through {} for {total:.0} s, a REPEATABLE READ transaction open from t = {:.0} s for {:.0} s",
                o.hold_rate,
                b.kind(),
                o.hold_baseline_secs,
                o.hold_secs
            );
            let mut ho = o.clone();
            ho.steady_secs = total;
            let spec = scenarios::latency::SteadySpec {
                autovacuum_off: false,
                hold: Some((o.hold_baseline_secs, o.hold_secs)),
            };
            r.steady.push(
                scenarios::latency::steady(
                    &ho,
                    b.as_ref(),
                    o.hold_rate,
                    "--hold-rate".into(),
                    &spec,
                )
                .await?,
            );
        }
    }

    if wants(Scenario::Deadrows) {
        eprintln!(
            "deadrows: claims with {:?} deleted rows behind the live ones",
            o.dead_rows
        );
        r.dead_rows = Some(scenarios::storage::dead_rows(&o, &o.dead_rows).await?);
    }

    if wants(Scenario::Admin) {
        eprintln!(
            "admin: the overview and searches with {} waiting rows",
            o.admin_rows
        );
        r.admin = Some(scenarios::admin::admin(&o, o.admin_rows).await?);
    }

    if let Some(nats) = peer_nats {
        eprintln!(
            "peer: {} rounds of {} no-op jobs through {} and {} messages through the relay to NATS",
            o.rounds,
            o.messages,
            scenarios::peer::GRAPHILE_WORKER,
            o.messages
        );
        r.peer = Some(scenarios::peer::peer(&o, nats.as_ref()).await?);
    }

    r.finish();
    r.print();
    r.write(&cli.out)?;
    eprintln!("results written to {}", cli.out.display());
    Ok(())
}
