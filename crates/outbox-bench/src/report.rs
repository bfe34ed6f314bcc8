//! The results: printed as tables, written as JSON, and checked against the targets of the
//! benchmark issue.

use std::path::Path;

use serde::Serialize;

use crate::machine::Machine;
use crate::scenarios::enqueue::{EnqueueCell, Method, Wake};
use crate::scenarios::latency::{LatencyResult, MaxRateResult, SteadyResult};
use crate::scenarios::throughput::{CeilingResult, DrainResult};
use crate::scenarios::Opts;
use crate::stats::{median, pct};

#[derive(Debug, Serialize)]
pub struct Settings {
    pub command: String,
    pub quick: bool,
    pub messages: u64,
    pub payload_bytes: usize,
    pub batch_size: u32,
    pub workers: u32,
    pub repeat: usize,
    pub rounds: usize,
    pub latency_secs: f64,
    pub producer_conns: usize,
    pub enqueue_secs: f64,
    pub keys: u64,
    pub steady_secs: f64,
    pub steady_window_secs: f64,
    pub steady_fraction: f64,
    pub steady_batch: usize,
    pub max_rate_secs: f64,
    pub nats_storage: String,
    pub kafka: String,
    pub kafka_partitions: i32,
    pub relay: String,
}

/// One ceiling and the drains measured right after it.
#[derive(Debug, Serialize)]
pub struct ThroughputRun {
    pub ceiling: CeilingResult,
    pub drains: Vec<DrainResult>,
}

#[derive(Debug, Serialize)]
pub struct DrainSummary {
    pub sink: String,
    pub median_msgs_per_sec: f64,
    /// Median over runs of (drain / ceiling of the same run).
    pub median_pct_of_ceiling: f64,
    pub max_relay_peak_rss_mib: f64,
    pub runs: usize,
}

/// Ordered versus unordered throughput of the same keyed backlog, per sink and relay count.
#[derive(Debug, Serialize)]
pub struct ScaleRatio {
    pub sink: String,
    pub relays: usize,
    /// Medians over the rounds.
    pub unordered_msgs_per_sec: f64,
    pub ordered_msgs_per_sec: f64,
    /// Ordered as a percentage of unordered: the median of the ratios of the rounds (each
    /// ordered drain against the unordered drain of the same round).
    pub ordered_pct_of_unordered: f64,
    /// The ratio of each round.
    pub round_pcts: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    /// None when the scenario did not run.
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Machine,
    pub settings: Settings,
    pub skipped_sinks: Vec<String>,
    pub throughput_runs: Vec<ThroughputRun>,
    pub ceiling_median_rows_per_sec: Option<f64>,
    pub drain_summary: Vec<DrainSummary>,
    pub latency: Vec<LatencyResult>,
    pub enqueue: Vec<EnqueueCell>,
    pub scale: Vec<DrainResult>,
    pub scale_ratios: Vec<ScaleRatio>,
    /// The end-to-end maximum rate per sink, measured before its steady state (not run when
    /// `--steady-rate` is given).
    pub max_rate: Vec<MaxRateResult>,
    pub steady: Vec<SteadyResult>,
    /// The claim with deleted rows behind the live ones (`deadrows`).
    pub dead_rows: Option<crate::scenarios::storage::DeadRowsResult>,
    /// The admin with a large backlog (`admin`).
    pub admin: Option<crate::scenarios::admin::AdminResult>,
    /// The relay's drain against graphile-worker's, paired per round (`peer`).
    pub peer: Option<crate::scenarios::peer::PeerResult>,
    pub targets: Vec<Target>,
}

impl Report {
    pub fn new(cli: &crate::Cli, o: &Opts, machine: Machine, skipped: Vec<String>) -> Self {
        let started_at = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%dT%H:%M:%SZ")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Self {
            started_at,
            machine,
            settings: Settings {
                command: std::env::args().collect::<Vec<_>>().join(" "),
                quick: cli.quick,
                messages: o.messages,
                payload_bytes: o.payload_bytes,
                batch_size: o.batch_size,
                workers: o.workers,
                repeat: o.repeat,
                rounds: o.rounds,
                latency_secs: o.latency_secs,
                producer_conns: o.producer_conns,
                enqueue_secs: o.enqueue_secs,
                keys: o.keys,
                steady_secs: o.steady_secs,
                steady_window_secs: o.steady_window_secs,
                steady_fraction: o.steady_fraction,
                steady_batch: o.steady_batch,
                max_rate_secs: o.max_rate_secs,
                nats_storage: cli.nats_storage.clone(),
                kafka: match &cli.kafka_brokers {
                    Some(b) => format!("existing cluster at {b}"),
                    None => format!("own tansu broker, {} storage", cli.kafka_storage),
                },
                kafka_partitions: cli.kafka_partitions,
                relay: o.launcher.describe(),
            },
            skipped_sinks: skipped,
            throughput_runs: Vec::new(),
            ceiling_median_rows_per_sec: None,
            drain_summary: Vec::new(),
            latency: Vec::new(),
            enqueue: Vec::new(),
            scale: Vec::new(),
            scale_ratios: Vec::new(),
            max_rate: Vec::new(),
            steady: Vec::new(),
            dead_rows: None,
            admin: None,
            peer: None,
            targets: Vec::new(),
        }
    }

    pub fn ceiling_median(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .throughput_runs
            .iter()
            .map(|r| r.ceiling.rows_per_sec)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    fn drains_of<'a>(&'a self, sink: &'a str) -> impl Iterator<Item = &'a DrainResult> + 'a {
        self.throughput_runs
            .iter()
            .flat_map(|r| r.drains.iter())
            .filter(move |d| d.sink == sink)
    }

    fn enqueue_cells(
        &self,
        method: Method,
        wake: Wake,
        conns: usize,
    ) -> impl Iterator<Item = &EnqueueCell> + '_ {
        self.enqueue
            .iter()
            .filter(move |c| c.method == method && c.wake == wake && c.conns == conns)
    }

    /// The median over rounds.
    fn enqueue_rate(&self, method: Method, wake: Wake, conns: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .enqueue_cells(method, wake, conns)
            .map(|c| c.rows_per_sec)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    /// `100 - wake / base` in % per round (both cells of the same round), and their median.
    fn enqueue_costs(&self, method: Method, wake: Wake, base: Wake, conns: usize) -> Vec<f64> {
        self.enqueue_cells(method, wake, conns)
            .filter_map(|w| {
                let b = self
                    .enqueue_cells(method, base, conns)
                    .find(|b| b.round == w.round)?;
                Some(100.0 - pct(w.rows_per_sec, b.rows_per_sec))
            })
            .collect()
    }

    /// Medians and the targets.
    pub fn finish(&mut self) {
        self.ceiling_median_rows_per_sec = self.ceiling_median();
        let mut sinks: Vec<String> = self
            .throughput_runs
            .iter()
            .flat_map(|r| r.drains.iter().map(|d| d.sink.clone()))
            .collect();
        sinks.dedup();
        sinks.sort();
        sinks.dedup();
        self.drain_summary = sinks
            .iter()
            .map(|s| {
                let rates: Vec<f64> = self.drains_of(s).map(|d| d.msgs_per_sec).collect();
                let pcts: Vec<f64> = self.drains_of(s).map(|d| d.pct_of_ceiling).collect();
                DrainSummary {
                    sink: s.clone(),
                    median_msgs_per_sec: median(&rates),
                    median_pct_of_ceiling: median(&pcts),
                    max_relay_peak_rss_mib: self
                        .drains_of(s)
                        .map(|d| d.relay_peak_rss_mib)
                        .fold(0.0, f64::max),
                    runs: rates.len(),
                }
            })
            .collect();

        let mut targets = Vec::new();
        for &(sink, need) in crate::brokers::DRAIN_TARGETS_PCT {
            let s = self.drain_summary.iter().find(|d| d.sink == sink);
            targets.push(Target {
                name: format!("drain to {sink}"),
                target: format!(">= {need:.0} % of the database ceiling"),
                measured: s
                    .map(|s| format!("{:.1} % (median of {})", s.median_pct_of_ceiling, s.runs))
                    .unwrap_or_else(|| "not run".into()),
                met: s.map(|s| s.median_pct_of_ceiling >= need),
            });
        }
        let mut groups: Vec<(String, usize)> = self
            .scale
            .iter()
            .map(|d| (d.sink.clone(), d.relays))
            .collect();
        groups.dedup();
        groups.sort();
        groups.dedup();
        self.scale_ratios = groups
            .into_iter()
            .filter_map(|(sink, relays)| {
                let of = |ordering: bool| {
                    self.scale
                        .iter()
                        .filter(|d| d.sink == sink && d.relays == relays && d.ordering == ordering)
                        .collect::<Vec<_>>()
                };
                let (unordered, ordered) = (of(false), of(true));
                let round_pcts: Vec<f64> = ordered
                    .iter()
                    .filter_map(|o| {
                        let u = unordered.iter().find(|u| u.round == o.round)?;
                        Some(pct(o.msgs_per_sec, u.msgs_per_sec))
                    })
                    .collect();
                if round_pcts.is_empty() {
                    return None;
                }
                let rate = |v: &[&DrainResult]| {
                    median(&v.iter().map(|d| d.msgs_per_sec).collect::<Vec<_>>())
                };
                Some(ScaleRatio {
                    sink: sink.clone(),
                    relays,
                    unordered_msgs_per_sec: rate(&unordered),
                    ordered_msgs_per_sec: rate(&ordered),
                    ordered_pct_of_unordered: median(&round_pcts),
                    round_pcts,
                })
            })
            .collect();
        let scale_sinks: Vec<&str> = crate::brokers::KINDS
            .iter()
            .copied()
            .filter(|k| self.scale_ratios.iter().any(|r| r.sink == *k))
            .collect();
        if scale_sinks.is_empty() {
            targets.push(Target {
                name: "ordered vs unordered throughput".into(),
                target: ">= 60 %".into(),
                measured: "not run".into(),
                met: None,
            });
        }
        for sink in scale_sinks {
            let ratios: Vec<&ScaleRatio> = self
                .scale_ratios
                .iter()
                .filter(|r| r.sink == sink)
                .collect();
            targets.push(Target {
                name: format!("ordered vs unordered throughput ({sink})"),
                target: ">= 60 % at every relay count".into(),
                measured: ratios
                    .iter()
                    .map(|r| format!("{}r {:.1} %", r.relays, r.ordered_pct_of_unordered))
                    .chain(std::iter::once(format!(
                        "(medians of {} paired rounds)",
                        ratios.iter().map(|r| r.round_pcts.len()).min().unwrap_or(0)
                    )))
                    .collect::<Vec<_>>()
                    .join(", "),
                met: Some(ratios.iter().all(|r| r.ordered_pct_of_unordered >= 60.0)),
            });
        }
        if let Some(a) = &self.admin {
            let slowest = a
                .requests
                .iter()
                .max_by(|x, y| x.median_ms.total_cmp(&y.median_ms));
            targets.push(Target {
                name: format!(
                    "admin overview and searches, {} waiting rows",
                    a.waiting_rows
                ),
                target: "median <= 200 ms each".into(),
                measured: slowest
                    .map(|q| format!("slowest median {:.1} ms ({})", q.median_ms, q.name))
                    .unwrap_or_default(),
                met: Some(a.requests.iter().all(|q| q.median_ms <= 200.0)),
            });
        }
        if let Some(p) = &self.peer {
            targets.push(Target {
                name: format!("ordered drain to {} vs {}", p.sink, p.peer),
                target: ">= 2.5x its jobs/s".into(),
                measured: format!(
                    "{:.2}x (median of {} paired rounds: {})",
                    p.median_ratio,
                    p.rounds.len(),
                    p.rounds
                        .iter()
                        .map(|r| format!("{:.2}x", r.ratio))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                met: Some(p.median_ratio >= 2.5),
            });
        }
        let l = self
            .latency
            .iter()
            .find(|l| l.sink == "nats" && (l.target_rate - 1000.0).abs() < 0.5);
        targets.push(Target {
            name: "latency at 1,000 msg/s (nats)".into(),
            target: "p99 commit -> ack <= 20 ms".into(),
            measured: l
                .map(|l| {
                    format!(
                        "p99 {:.1} ms from intended send, {:.1} ms from commit",
                        l.from_intended.p99_ms, l.from_commit.p99_ms
                    )
                })
                .unwrap_or_else(|| "not run".into()),
            met: l.map(|l| l.from_intended.p99_ms <= 20.0 && l.received == l.sent),
        });
        let conns = self.enqueue.iter().map(|c| c.conns).max().unwrap_or(16);
        let batch = self
            .enqueue_rate(Method::ClientBatch, Wake::Busy, conns)
            .zip(self.enqueue_rate(Method::RawBatch, Wake::Busy, conns));
        targets.push(Target {
            name: format!("batch enqueue vs raw INSERT ({conns} conns)"),
            target: ">= 90 %".into(),
            measured: batch
                .map(|(c, r)| format!("{:.1} %", pct(c, r)))
                .unwrap_or_else(|| "not run".into()),
            met: batch.map(|(c, r)| pct(c, r) >= 90.0),
        });
        // The wake-up part of the insert trigger is the same whoever inserts (client or raw
        // SQL, one row or a hundred), so every paired round of every method at this connection
        // count measures the same cost: the target is judged on the median of all those pairs,
        // which a single method's three rounds cannot pin down on a noisy machine (the spread
        // between rounds is larger than the cost). Per-method medians are printed beside it.
        let per_method: Vec<(Method, Vec<f64>)> = Method::ALL
            .into_iter()
            .map(|m| (m, self.enqueue_costs(m, Wake::Busy, Wake::NoWakeup, conns)))
            .filter(|(_, c)| !c.is_empty())
            .collect();
        let pooled: Vec<f64> = per_method.iter().flat_map(|(_, c)| c.clone()).collect();
        targets.push(Target {
            name: format!("wake-up cost to enqueuers ({conns} conns, relays busy)"),
            target: "<= 10 %".into(),
            measured: if pooled.is_empty() {
                "not run".into()
            } else {
                format!(
                    "{:.1} % (median of {} paired rounds over the 4 methods; per method: {})",
                    median(&pooled),
                    pooled.len(),
                    per_method
                        .iter()
                        .map(|(m, c)| format!("{} {:.1} %", m.label(), median(c)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            met: (!pooled.is_empty()).then(|| median(&pooled) <= 10.0),
        });
        let rss = self
            .throughput_runs
            .iter()
            .flat_map(|r| r.drains.iter())
            .chain(self.scale.iter())
            .map(|d| d.relay_peak_rss_mib)
            .reduce(f64::max);
        targets.push(Target {
            name: "relay peak RSS at full throughput".into(),
            target: "<= 64 MiB".into(),
            measured: rss
                .map(|r| format!("{r:.1} MiB"))
                .unwrap_or_else(|| "not run".into()),
            met: rss.map(|r| r <= 64.0),
        });
        self.targets = targets;
    }

    pub fn print(&self) {
        let m = &self.machine;
        println!();
        let brokers = m
            .brokers
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "machine: {} x {}, {} MiB, PostgreSQL {}, brokers: {}, load at start {}",
            m.nproc,
            m.cpu_model,
            m.mem_total_mib,
            m.postgres,
            if brokers.is_empty() { "none" } else { &brokers },
            m.load_average_at_start
        );
        for s in &self.skipped_sinks {
            println!("skipped sink {s}");
        }
        println!(
            "settings: {} messages x {} B, batch {}, {} workers, relay {}",
            self.settings.messages,
            self.settings.payload_bytes,
            self.settings.batch_size,
            self.settings.workers,
            self.settings.relay
        );
        if !self.throughput_runs.is_empty() {
            println!("\n## Ceiling and drain (msg/s; % of the same run's ceiling)");
            println!(
                "{:<5} {:>12} {:<8} {:>12} {:>8} {:>10} {:>9} {:>8}",
                "run", "ceiling", "sink", "drain", "%", "RSS MiB", "relay s", "cpu %"
            );
            for (i, r) in self.throughput_runs.iter().enumerate() {
                if r.drains.is_empty() {
                    println!("{:<5} {:>12.0}", i + 1, r.ceiling.rows_per_sec);
                }
                for d in &r.drains {
                    println!(
                        "{:<5} {:>12.0} {:<8} {:>12.0} {:>7.1}% {:>10.1} {:>9.1} {:>7.0}%",
                        i + 1,
                        r.ceiling.rows_per_sec,
                        d.sink,
                        d.msgs_per_sec,
                        d.pct_of_ceiling,
                        d.relay_peak_rss_mib,
                        d.relay_cpu_seconds,
                        d.machine_cpu_busy_pct
                    );
                }
            }
            for s in &self.drain_summary {
                println!(
                    "median {:>11.0} {:<8} {:>12.0} {:>7.1}%",
                    self.ceiling_median_rows_per_sec.unwrap_or(0.0),
                    s.sink,
                    s.median_msgs_per_sec,
                    s.median_pct_of_ceiling
                );
            }
        }
        if !self.latency.is_empty() {
            println!("\n## Latency, open loop (ms; from intended send time / from commit)");
            println!(
                "{:<6} {:>7} {:>9} {:>15} {:>15} {:>15} {:>15} {:>12} {:>11}",
                "sink", "rate", "achieved", "p50", "p90", "p99", "max", "lag p99", "received"
            );
            for l in &self.latency {
                let pair = |a: f64, b: f64| format!("{a:.1} / {b:.1}");
                println!(
                    "{:<6} {:>7.0} {:>9.0} {:>15} {:>15} {:>15} {:>15} {:>12.1} {:>11}",
                    l.sink,
                    l.target_rate,
                    l.achieved_rate,
                    pair(l.from_intended.p50_ms, l.from_commit.p50_ms),
                    pair(l.from_intended.p90_ms, l.from_commit.p90_ms),
                    pair(l.from_intended.p99_ms, l.from_commit.p99_ms),
                    pair(l.from_intended.max_ms, l.from_commit.max_ms),
                    l.send_lag.p99_ms,
                    format!("{}/{}", l.received, l.sent)
                );
            }
        }
        if !self.enqueue.is_empty() {
            println!("\n## Enqueue (rows/s, median of rounds)");
            let mut conns: Vec<usize> = self.enqueue.iter().map(|c| c.conns).collect();
            conns.sort();
            conns.dedup();
            print!("{:<34}", "method");
            for c in &conns {
                for w in Wake::ALL {
                    print!(" {:>16}", format!("{c}c {}", w.label()));
                }
            }
            println!();
            for m in Method::ALL {
                print!("{:<34}", m.label());
                for &c in &conns {
                    for w in Wake::ALL {
                        match self.enqueue_rate(m, w, c) {
                            Some(r) => print!(" {r:>16.0}"),
                            None => print!(" {:>16}", "-"),
                        }
                    }
                }
                println!();
            }
            println!(
                "wake-up cost (100 - state / no-wakeup, % per round, paired within the round; median):"
            );
            for &c in &conns {
                for m in Method::ALL {
                    for w in [Wake::Busy, Wake::Sleeping] {
                        let costs = self.enqueue_costs(m, w, Wake::NoWakeup, c);
                        if costs.is_empty() {
                            continue;
                        }
                        println!(
                            "  {c:>2}c {:<9} {:<34} {:>7.1} %  rounds: {}",
                            w.label(),
                            m.label(),
                            median(&costs),
                            costs
                                .iter()
                                .map(|x| format!("{x:.1}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
            }
        }
        if !self.scale.is_empty() {
            println!(
                "\n## Scale (relay processes draining one backlog of {} keys; ordering off / on)",
                self.settings.keys
            );
            println!(
                "{:<6} {:<7} {:<6} {:<9} {:>10} {:>9} {:>14} {:>10}",
                "round", "relays", "sink", "ordering", "msg/s", "% ceil", "max RSS MiB", "relay s"
            );
            for d in &self.scale {
                println!(
                    "{:<6} {:<7} {:<6} {:<9} {:>10.0} {:>8.1}% {:>14.1} {:>10.1}",
                    d.round + 1,
                    d.relays,
                    d.sink,
                    if d.ordering { "on" } else { "off" },
                    d.msgs_per_sec,
                    d.pct_of_ceiling,
                    d.relay_peak_rss_mib,
                    d.relay_cpu_seconds
                );
            }
            if !self.scale_ratios.is_empty() {
                println!(
                    "ordered / unordered (median of the rounds' ratios; medians of the rates):"
                );
                for r in &self.scale_ratios {
                    println!(
                        "{:<7} {:<6} {:>8.1}%  ({:.0} / {:.0} msg/s; rounds {})",
                        r.relays,
                        r.sink,
                        r.ordered_pct_of_unordered,
                        r.ordered_msgs_per_sec,
                        r.unordered_msgs_per_sec,
                        r.round_pcts
                            .iter()
                            .map(|p| format!("{p:.1} %"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        if !self.max_rate.is_empty() {
            println!(
                "\n## End-to-end maximum rate (closed-loop producer + relay; basis of the steady rate)"
            );
            println!(
                "{:<6} {:>8} {:>7} {:>12} {:>12} {:>18}",
                "sink", "msg/tx", "conns", "enqueued/s", "delivered/s", "backlog start/end"
            );
            for m in &self.max_rate {
                println!(
                    "{:<6} {:>8} {:>7} {:>12.0} {:>12.0} {:>18}",
                    m.sink,
                    m.messages_per_tx,
                    m.producer_conns,
                    m.enqueued_per_sec,
                    m.delivered_per_sec,
                    format!("{} / {}", m.backlog_start, m.backlog_end)
                );
            }
        }
        for s in &self.steady {
            let what = if s.hold.is_some() {
                "Held xmin"
            } else {
                "Steady state"
            };
            println!(
                "\n## {what}, {} (autovacuum {}): {:.0} msg/s ({}), {} msg/tx, {} s",
                s.sink, s.autovacuum, s.target_rate, s.rate_basis, s.messages_per_tx, s.secs
            );
            let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |c| format!("{c:.1}"));
            println!(
                "{:>7} {:>5} {:>10} {:>10} {:>9} {:>9} {:>11} {:>10} {:>10} {:>10} {:>10} {:>11} {:>5} {:>12} {:>12} {:>10} {:>9}",
                "t (s)",
                "held",
                "recv/s",
                "sent/s",
                "p50 ms",
                "p99 ms",
                "commit p99",
                "acked p99",
                "claim p99",
                "publ p99",
                "mark p99",
                "tx lag p99",
                "ckpt",
                "table KiB",
                "index KiB",
                "dead tup",
                "waiting"
            );
            for w in &s.windows {
                println!(
                    "{:>7.0} {:>5} {:>10.0} {:>10} {:>9.1} {:>9.1} {:>11.1} {:>10} {:>10} {:>10} {:>10} {:>11.1} {:>5} {:>12} {:>12} {:>10} {:>9}",
                    w.start_secs,
                    if w.held { "yes" } else { "" },
                    w.received_per_sec,
                    w.published_per_sec
                        .map(|c| format!("{c:.0}"))
                        .unwrap_or_else(|| "-".into()),
                    w.latency.p50_ms,
                    w.latency.p99_ms,
                    w.from_commit.p99_ms,
                    ms(w.acked_p99_ms),
                    ms(w.claim_p99_ms),
                    ms(w.publish_p99_ms),
                    ms(w.mark_p99_ms),
                    w.commit_lag_p99_ms,
                    w.checkpoints,
                    w.table_bytes / 1024,
                    w.index_bytes / 1024,
                    w.dead_tuples,
                    w.waiting
                );
            }
            println!(
                "end: table {} KiB, indexes {} KiB, live {}, dead {}, autovacuums {}, relay VACUUMs {}; overall p99 {:.1} ms (commit -> consumer {:.1} ms), received {}/{}, relay RSS {:.1} MiB",
                s.end_table_bytes / 1024,
                s.end_index_bytes / 1024,
                s.end_live_tuples,
                s.end_dead_tuples,
                s.autovacuum_count,
                s.relay_vacuums,
                s.from_intended.p99_ms,
                s.from_commit.p99_ms,
                s.received,
                s.sent,
                s.relay_peak_rss_mib
            );
            if let Some(h) = &s.hold {
                println!(
                    "holder {:.0} s from t = {:.0} s: commit p99 baseline {:.1} ms, worst held window {:.1} ms (bar {:.1} ms); lowest window {:.1} % of offered; claim p99 baseline {} ms, held max {} ms; waiting 30 s after: {}",
                    h.secs,
                    h.start_secs,
                    h.baseline_p99_ms,
                    h.held_max_window_p99_ms,
                    h.p99_bar_ms,
                    h.min_window_delivered_pct,
                    h.claim_p99_baseline_ms.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
                    h.claim_p99_held_max_ms.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
                    h.waiting_30s_after.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
                );
            }
        }
        if let Some(d) = &self.dead_rows {
            println!(
                "\n## Claim of {} rows with deleted rows behind {} live ones (held xmin; median of 5, ms)",
                d.claim_batch, d.live_rows
            );
            println!(
                "{:>10} {:>10} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
                "deleted",
                "dead tup",
                "table MiB",
                "unord off",
                "unord on",
                "ord off",
                "ord on",
                "floor"
            );
            for st in &d.steps {
                println!(
                    "{:>10} {:>10} {:>11.0} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>11}",
                    st.deleted_rows,
                    st.dead_tuples,
                    (st.table_bytes + st.index_bytes) as f64 / 1048576.0,
                    st.unordered_floor_off_ms,
                    st.unordered_floor_on_ms,
                    st.ordered_floor_off_ms,
                    st.ordered_floor_on_ms,
                    st.floor
                );
            }
            println!(
                "floor on, last step / 0 deleted: unordered {:.2}x, ordered {:.2}x",
                d.ratio_last_to_zero_unordered, d.ratio_last_to_zero_ordered
            );
        }
        if let Some(a) = &self.admin {
            println!(
                "\n## The admin with {} waiting rows ({:.0} MiB), {} dead letters (ms, median and slowest of 20)",
                a.waiting_rows,
                a.table_and_index_bytes as f64 / 1048576.0,
                a.dead_letters
            );
            for q in &a.requests {
                println!(
                    "{:<36} {:>8.1} {:>8.1}  {}",
                    q.name, q.median_ms, q.max_ms, q.path
                );
            }
        }
        if let Some(p) = &self.peer {
            println!(
                "\n## Peer: {} (concurrency {}, local queue {}, pool {}, {}) vs the relay's drain to {} (ordering {}); {} jobs/messages x {} B",
                p.peer,
                p.concurrency,
                p.rounds.first().map(|r| r.graphile.local_queue).unwrap_or(0),
                p.rounds.first().map(|r| r.graphile.max_pool_size).unwrap_or(0),
                p.node,
                p.sink,
                if p.ordering { "on" } else { "off" },
                p.messages,
                p.payload_bytes
            );
            println!(
                "{:<6} {:<16} {:>14} {:>12} {:>10} {:>10}",
                "round", "first", "graphile jobs/s", "relay msg/s", "ratio", "relay RSS"
            );
            for r in &p.rounds {
                println!(
                    "{:<6} {:<16} {:>14.0} {:>12.0} {:>9.2}x {:>10.1}",
                    r.round + 1,
                    r.first,
                    r.graphile.jobs_per_sec,
                    r.relay.msgs_per_sec,
                    r.ratio,
                    r.relay.relay_peak_rss_mib
                );
            }
            println!(
                "median {:<16} {:>14.0} {:>12.0} {:>9.2}x  (median of the rounds' paired ratios)",
                "", p.graphile_jobs_per_sec, p.relay_msgs_per_sec, p.median_ratio
            );
        }
        println!("\n## Targets");
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            };
            println!(
                "{:<7} {:<48} {:<38} {}",
                verdict, t.name, t.target, t.measured
            );
        }
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}
