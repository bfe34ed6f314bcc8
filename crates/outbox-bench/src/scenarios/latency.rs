//! Latency at fixed rates, and the steady state: an open-loop producer (see
//! [`crate::producer`]) enqueues through the client crate while a real relay publishes and an
//! independent consumer records each arrival.
//!
//! Two latencies per message: from the *intended* send time (includes any producer lag, so
//! an overloaded system cannot hide it: no coordinated omission) and from the moment COMMIT
//! returned (the relay's own share: commit → broker ack → consumer). The producer's send lag
//! (intended → committed) is reported beside them.
//!
//! [`max_rate`] measures what the steady state's rate is based on: a closed-loop producer and a
//! relay running together, rate = messages taken out of the outbox per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;

use super::Opts;
use crate::bench_db::{unique, BenchDb};
use crate::brokers::{Broker, Destination, TOPIC};
use crate::producer::{self, Schedule};
use crate::relay_proc::RelayProcess;
use crate::stats::{percentiles, Percentiles};

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub sink: String,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub secs: f64,
    pub sent: u64,
    pub received: u64,
    pub enqueue_errors: u64,
    /// Intended send time → consumer (what a user of the system experiences).
    pub from_intended: Percentiles,
    /// COMMIT returned → consumer.
    pub from_commit: Percentiles,
    /// Intended send time → COMMIT returned (producer lag; large means the database could not
    /// keep up with the offered rate).
    pub send_lag: Percentiles,
    pub relay_peak_rss_mib: f64,
}

/// A database, a destination with a consumer, and a relay that has delivered one message.
struct Rig {
    db: BenchDb,
    dest: Box<dyn Destination>,
    relay: Option<RelayProcess>,
    rx: mpsc::UnboundedReceiver<(String, Instant)>,
}

impl Rig {
    async fn start(o: &Opts, broker: &dyn Broker, scenario: &str) -> anyhow::Result<Self> {
        let run = unique("l").replace('_', "");
        let db = o.create_db(scenario).await?;
        let dest = match broker.prepare(&run).await {
            Ok(d) => d,
            Err(e) => {
                db.drop_db().await;
                return Err(e);
            }
        };
        let mut rig = Self {
            db,
            dest,
            relay: None,
            rx: mpsc::unbounded_channel().1,
        };
        if let Err(e) = rig.start_relay(o, broker, &run).await {
            rig.finish().await;
            return Err(e);
        }
        Ok(rig)
    }

    async fn start_relay(
        &mut self,
        o: &Opts,
        broker: &dyn Broker,
        run: &str,
    ) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.rx = rx;
        self.dest.consume(tx).await?;
        let sinks = vec![(broker.kind().to_string(), self.dest.sink_config())];
        self.relay = Some(o.launcher.start(
            &format!("{run}-relay"),
            &self.db.url,
            &sinks,
            outbox_relay::config::defaults::ORDERING_ENABLED,
        )?);
        // One message end to end before the clock starts: relay connected, stream ready.
        outbox_client::enqueue(
            &mut *self.db.pool.acquire().await?,
            &outbox_client::Message::bytes(TOPIC, b"warm-up".to_vec()).message_id("warmup"),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((id, _))) if id == "warmup" => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if let Some(r) = self.relay.as_mut() {
                        r.check_alive()?;
                    }
                    anyhow::bail!(
                        "the warm-up message did not arrive through {} within 30 s",
                        broker.kind()
                    )
                }
            }
        }
    }

    async fn finish(mut self) -> f64 {
        let rss = match self.relay.take() {
            Some(r) => r.stop().await.peak_rss_mib,
            None => 0.0,
        };
        self.dest.cleanup().await;
        self.db.drop_db().await;
        rss
    }
}

/// `--producer-conns` connections to the rig's database, all open.
async fn producer_pool(o: &Opts, db: &BenchDb) -> anyhow::Result<sqlx::PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(o.producer_conns as u32)
        .min_connections(o.producer_conns as u32)
        .connect(&db.url)
        .await?;
    // Open every producer connection before the clock starts.
    let warm: Vec<_> =
        futures::future::try_join_all((0..o.producer_conns).map(|_| pool.acquire())).await?;
    drop(warm);
    Ok(pool)
}

struct Produced {
    schedule: Arc<Schedule>,
    arrivals: Vec<producer::Arrival>,
    commits: Arc<producer::Commits>,
}

async fn produce(
    o: &Opts,
    rig: &mut Rig,
    rate: f64,
    secs: f64,
    per_tx: usize,
) -> anyhow::Result<Produced> {
    let pool = producer_pool(o, &rig.db).await?;
    let schedule = Arc::new(Schedule::new(
        rate,
        secs,
        per_tx,
        Duration::from_millis(300),
    ));
    let commits = producer::new_commits(&schedule);
    let payload = Arc::new(o.payload());
    let producing = tokio::spawn(producer::run(
        pool.clone(),
        Arc::clone(&schedule),
        payload,
        o.producer_conns,
        Arc::clone(&commits),
    ));
    let end = schedule.intended(schedule.slots);
    let deadline = tokio::time::Instant::from_std(end) + Duration::from_secs(60);
    let mut seen = std::collections::HashSet::with_capacity(schedule.messages() as usize);
    let mut arrivals = producer::collect_arrivals(
        &mut rig.rx,
        &schedule,
        schedule.messages(),
        deadline,
        &mut seen,
    )
    .await;
    producing.await?;
    // Above the database's commit rate the producer is still committing at that deadline (its
    // lag is the point of the open loop): wait for what it committed late, 30 s after its last
    // commit, so that a missing message means one that did not arrive.
    let missing = schedule.messages().saturating_sub(arrivals.len() as u64);
    if missing > 0 {
        let late = producer::collect_arrivals(
            &mut rig.rx,
            &schedule,
            missing,
            tokio::time::Instant::now() + Duration::from_secs(30),
            &mut seen,
        )
        .await;
        arrivals.extend(late);
    }
    pool.close().await;
    Ok(Produced {
        schedule,
        arrivals,
        commits,
    })
}

impl Produced {
    /// COMMIT returned → consumer, of one arrival (when its commit was recorded).
    fn commit_to_arrival_us(&self, a: &producer::Arrival) -> Option<u64> {
        self.commits
            .commit_lag_us(a.slot)
            .map(|lag| a.from_intended_us.saturating_sub(lag))
    }

    /// When an arrival was meant to be sent, in microseconds since the schedule's start.
    fn intended_us(&self, a: &producer::Arrival) -> u64 {
        self.schedule
            .intended(a.slot)
            .saturating_duration_since(self.schedule.start)
            .as_micros() as u64
    }
}

fn summarize(p: &Produced) -> (Percentiles, Percentiles, Percentiles) {
    let mut from_intended: Vec<u64> = p.arrivals.iter().map(|a| a.from_intended_us).collect();
    let mut from_commit: Vec<u64> = p
        .arrivals
        .iter()
        .filter_map(|a| p.commit_to_arrival_us(a))
        .collect();
    let mut lag: Vec<u64> = (0..p.schedule.slots)
        .filter_map(|s| p.commits.commit_lag_us(s))
        .collect();
    (
        percentiles(&mut from_intended),
        percentiles(&mut from_commit),
        percentiles(&mut lag),
    )
}

pub async fn latency(o: &Opts, broker: &dyn Broker, rate: f64) -> anyhow::Result<LatencyResult> {
    let mut rig = Rig::start(o, broker, &format!("latency_{}", broker.kind())).await?;
    let produced = produce(o, &mut rig, rate, o.latency_secs, 1).await;
    let rss = rig.finish().await;
    let p = produced?;
    let (from_intended, from_commit, send_lag) = summarize(&p);
    let received = p.arrivals.len() as u64;
    let span = p.arrivals.iter().map(|a| a.at_us).max().unwrap_or(0) as f64 / 1e6;
    Ok(LatencyResult {
        sink: broker.kind().to_string(),
        target_rate: rate,
        achieved_rate: if span > 0.0 {
            received as f64 / span
        } else {
            0.0
        },
        secs: o.latency_secs,
        sent: p.schedule.messages(),
        received,
        enqueue_errors: p.commits.errors.load(std::sync::atomic::Ordering::Relaxed),
        from_intended,
        from_commit,
        send_lag,
        relay_peak_rss_mib: rss,
    })
}

/// The end-to-end maximum rate: a closed-loop producer and a relay sharing the machine.
#[derive(Debug, Clone, Serialize)]
pub struct MaxRateResult {
    pub sink: String,
    /// Length of the run; the first fifth is a warm-up, not measured.
    pub secs: f64,
    pub measured_secs: f64,
    pub messages_per_tx: usize,
    pub producer_conns: usize,
    /// Messages committed per second by the producer in the measured part.
    pub enqueued_per_sec: f64,
    /// Messages the relay took out of the outbox per second in the measured part (committed
    /// minus the backlog's growth): the end-to-end maximum rate.
    pub delivered_per_sec: f64,
    /// Waiting rows at the start and at the end of the measured part: a growing backlog means
    /// the relay was the bottleneck, a flat one the producer.
    pub backlog_start: i64,
    pub backlog_end: i64,
    pub relay_peak_rss_mib: f64,
}

/// Measures the end-to-end maximum rate through `broker`: `--producer-conns` connections
/// enqueue `--steady-batch` messages per transaction as fast as they can for `--max-rate-secs`
/// while a relay publishes. The steady state runs at a fraction of it.
pub async fn max_rate(o: &Opts, broker: &dyn Broker) -> anyhow::Result<MaxRateResult> {
    let rig = Rig::start(o, broker, &format!("maxrate_{}", broker.kind())).await?;
    let measured = max_rate_inner(o, &rig).await;
    let rss = rig.finish().await;
    let mut r = measured?;
    r.sink = broker.kind().to_string();
    r.relay_peak_rss_mib = rss;
    Ok(r)
}

async fn max_rate_inner(o: &Opts, rig: &Rig) -> anyhow::Result<MaxRateResult> {
    let pool = producer_pool(o, &rig.db).await?;
    let committed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs_f64(o.max_rate_secs);
    let warm_end = start + Duration::from_secs_f64(o.max_rate_secs / 5.0);
    let producing = tokio::spawn(producer::closed_loop(
        pool.clone(),
        Arc::new(o.payload()),
        o.producer_conns,
        o.steady_batch,
        end.into_std(),
        Arc::clone(&committed),
    ));
    let load = || committed.load(std::sync::atomic::Ordering::Relaxed);
    // The clock decides when to sample: the measurement is a fixed window of a running system.
    tokio::time::sleep_until(warm_end).await;
    let (c0, b0, t0) = (load(), rig.db.waiting().await?, Instant::now());
    tokio::time::sleep_until(end).await;
    let (c1, b1, t1) = (load(), rig.db.waiting().await?, Instant::now());
    producing.await?;
    pool.close().await;
    let measured_secs = t1.duration_since(t0).as_secs_f64().max(1e-6);
    let enqueued = c1.saturating_sub(c0) as f64;
    let delivered = (enqueued - (b1 - b0) as f64).max(0.0);
    Ok(MaxRateResult {
        sink: String::new(),
        secs: o.max_rate_secs,
        measured_secs,
        messages_per_tx: o.steady_batch,
        producer_conns: o.producer_conns,
        enqueued_per_sec: enqueued / measured_secs,
        delivered_per_sec: delivered / measured_secs,
        backlog_start: b0,
        backlog_end: b1,
        relay_peak_rss_mib: 0.0,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct SteadyWindow {
    pub start_secs: f64,
    /// Messages that arrived at the consumer in this window, per second.
    pub received_per_sec: f64,
    /// Messages the relay marked sent in this window (broker acknowledged), per second, from
    /// `outbox_published_total`: beside `received_per_sec` it tells a relay that stalled from
    /// a consumer that did.
    pub published_per_sec: Option<f64>,
    /// Latency (intended send → consumer) of the messages scheduled in this window.
    pub latency: Percentiles,
    /// COMMIT returned → consumer, of the messages scheduled in this window.
    pub from_commit: Percentiles,
    /// p99 of the relay's claim statement in this window (from `outbox_claim_duration_seconds`'s
    /// buckets: the upper bound of the bucket holding the 99th percentile), in milliseconds.
    pub claim_p99_ms: Option<f64>,
    /// p99 of publishing one batch, broker acknowledgements included
    /// (`outbox_publish_duration_seconds`, bucket upper bound), in milliseconds.
    pub publish_p99_ms: Option<f64>,
    /// p99 of marking a batch sent (`outbox_mark_duration_seconds`, bucket upper bound).
    pub mark_p99_ms: Option<f64>,
    /// p99 from a row's `created_at` to the broker's acknowledgement, as the relay sees it
    /// (`outbox_delivery_latency_seconds`, bucket upper bound): beside `from_commit`, which ends
    /// at the consumer, it tells a pause before the acknowledgement from one after it.
    pub acked_p99_ms: Option<f64>,
    /// p99 of how late the producer's COMMITs returned against their intended times, for the
    /// transactions scheduled in this window: a pause of the producer or of PostgreSQL's
    /// commits shows here.
    pub commit_lag_p99_ms: f64,
    /// PostgreSQL checkpoints begun in this window (`pg_stat_bgwriter`, timed and requested).
    pub checkpoints: i64,
    /// A transaction held the xmin horizon for at least part of this window.
    pub held: bool,
    pub table_bytes: i64,
    pub index_bytes: i64,
    pub dead_tuples: i64,
    /// Rows waiting at the end of the window.
    pub waiting: i64,
}

/// The held-xmin phase of a steady run and what it did to the bars.
#[derive(Debug, Clone, Serialize)]
pub struct HoldSummary {
    pub start_secs: f64,
    pub secs: f64,
    /// p99 commit → consumer over the windows before the holder began.
    pub baseline_p99_ms: f64,
    /// The worst window p99 (commit → consumer) while the holder was open.
    pub held_max_window_p99_ms: f64,
    /// 2 × baseline + 20 ms.
    pub p99_bar_ms: f64,
    /// The lowest share of the offered rate delivered in any full window.
    pub min_window_delivered_pct: f64,
    pub claim_p99_baseline_ms: Option<f64>,
    pub claim_p99_held_max_ms: Option<f64>,
    /// Rows waiting at the end of the first window that ends 30 s or more after the holder.
    pub waiting_30s_after: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SteadyResult {
    pub sink: String,
    pub target_rate: f64,
    pub rate_basis: String,
    pub messages_per_tx: usize,
    pub secs: f64,
    /// `on` (the server's stock autovacuum) or `off` (`autovacuum_enabled = false` on the
    /// outbox tables of the benchmark database).
    pub autovacuum: String,
    pub sent: u64,
    pub received: u64,
    pub enqueue_errors: u64,
    pub from_intended: Percentiles,
    pub from_commit: Percentiles,
    pub send_lag: Percentiles,
    pub windows: Vec<SteadyWindow>,
    pub hold: Option<HoldSummary>,
    pub end_table_bytes: i64,
    pub end_index_bytes: i64,
    pub end_live_tuples: i64,
    pub end_dead_tuples: i64,
    pub autovacuum_count: i64,
    pub relay_vacuums: f64,
    pub relay_peak_rss_mib: f64,
}

/// How a steady run is set up beyond its rate.
#[derive(Debug, Clone, Default)]
pub struct SteadySpec {
    pub autovacuum_off: bool,
    /// A REPEATABLE READ transaction in the benchmark database from `start` for `secs`.
    pub hold: Option<(f64, f64)>,
}

#[derive(Debug, Clone, Default)]
struct TableSample {
    table_bytes: i64,
    index_bytes: i64,
    live: i64,
    dead: i64,
    autovacuums: i64,
    waiting: i64,
    checkpoints: i64,
    metrics: String,
}

async fn sample_table(pool: &sqlx::PgPool, metrics: Option<&str>) -> anyhow::Result<TableSample> {
    let (table_bytes, index_bytes, live, dead, autovacuums): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT pg_table_size('outbox.messages'), pg_indexes_size('outbox.messages'),
                n_live_tup, n_dead_tup, autovacuum_count
           FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass",
        )
        .fetch_one(pool)
        .await?;
    let waiting: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(n), 0)::bigint FROM outbox.topic_counts")
            .fetch_one(pool)
            .await?;
    let checkpoints: i64 =
        sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
            .fetch_one(pool)
            .await?;
    let metrics = match metrics {
        Some(addr) => outbox_testkit::http::scrape(addr).await,
        None => String::new(),
    };
    Ok(TableSample {
        table_bytes,
        index_bytes,
        live,
        dead,
        autovacuums,
        waiting,
        checkpoints,
        metrics,
    })
}

/// A histogram's buckets in a Prometheus scrape (upper bound in seconds, cumulative count),
/// summed over its label sets.
fn histogram_buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((le, count)) = bucket(line) else {
            continue;
        };
        match buckets.iter_mut().find(|(l, _)| *l == le) {
            Some((_, n)) => *n += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// One `…_bucket{…,le="…"} count` line: (upper bound in seconds, cumulative count).
fn bucket(line: &str) -> Option<(f64, f64)> {
    let le = line.split("le=\"").nth(1)?.split('"').next()?;
    let le = if le == "+Inf" {
        f64::INFINITY
    } else {
        le.parse().ok()?
    };
    let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
    Some((le, count))
}

/// Rows the relay marked sent (`outbox_published_total`, outcomes `delivered` and `duplicate`).
fn published_total(metrics: &str) -> Option<f64> {
    let rows: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("outbox_published_total{"))
        .filter(|l| l.contains("outcome=\"delivered\"") || l.contains("outcome=\"duplicate\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!rows.is_empty()).then(|| rows.iter().sum())
}

/// The p99 (bucket upper bound, ms) of histogram `name`'s observations between two scrapes.
fn p99_between(name: &str, before: &str, after: &str) -> Option<f64> {
    let (a, b) = (
        histogram_buckets(before, name),
        histogram_buckets(after, name),
    );
    if b.is_empty() {
        return None;
    }
    let delta: Vec<(f64, f64)> = b
        .iter()
        .map(|(le, n)| {
            let prev = a
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, m)| *m)
                .unwrap_or(0.0);
            (*le, n - prev)
        })
        .collect();
    let total = delta.last().map(|(_, n)| *n).unwrap_or(0.0);
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map(|(le, _)| le * 1e3)
}

/// Holds the xmin horizon of the benchmark database from `start` for `secs`: a REPEATABLE READ
/// transaction that has read the outbox, as a long report would.
async fn hold_xmin(url: String, start: Duration, secs: Duration) -> anyhow::Result<()> {
    use sqlx::Connection;
    tokio::time::sleep(start).await;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut conn)
        .await?;
    sqlx::query("SELECT count(*) FROM outbox.dead_letters")
        .execute(&mut conn)
        .await?;
    eprintln!(
        "  holder: REPEATABLE READ transaction open for {} s",
        secs.as_secs()
    );
    tokio::time::sleep(secs).await;
    sqlx::query("ROLLBACK").execute(&mut conn).await?;
    eprintln!("  holder: ended");
    Ok(())
}

pub async fn steady(
    o: &Opts,
    broker: &dyn Broker,
    rate: f64,
    basis: String,
    spec: &SteadySpec,
) -> anyhow::Result<SteadyResult> {
    // The relay serves /metrics here, for the claim's duration per window.
    let metrics_addr = format!("127.0.0.1:{}", outbox_testkit::names::free_port());
    let mut o = o.clone();
    o.launcher.http_listen = metrics_addr.clone();
    let o = &o;
    let name = match (spec.hold.is_some(), spec.autovacuum_off) {
        (true, _) => "heldxmin",
        (false, true) => "steady_avoff",
        (false, false) => "steady",
    };
    let mut rig = Rig::start(o, broker, &format!("{name}_{}", broker.kind())).await?;
    if spec.autovacuum_off {
        for table in [
            "messages",
            "topic_counts",
            "claim_floor",
            "relay_sleepers",
            "partition_leases",
            "relays",
            "ordering_members",
        ] {
            sqlx::query(&format!(
                "ALTER TABLE outbox.{table} SET (autovacuum_enabled = false)"
            ))
            .execute(&rig.db.pool)
            .await?;
        }
    }
    // Table samples once per window, on their own connection.
    let sampler_pool = rig.db.pool.clone();
    let window = Duration::from_secs_f64(o.steady_window_secs);
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = stop.clone();
        let addr = metrics_addr.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(window);
            tick.tick().await;
            let first = sample_table(&sampler_pool, Some(&addr))
                .await
                .unwrap_or_default();
            samples.push(first);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                if let Ok(s) = sample_table(&sampler_pool, Some(&addr)).await {
                    samples.push(s);
                }
            }
            samples
        })
    };
    let holder = spec.hold.map(|(start, secs)| {
        tokio::spawn(hold_xmin(
            rig.db.url.clone(),
            Duration::from_secs_f64(start),
            Duration::from_secs_f64(secs),
        ))
    });
    let produced = produce(o, &mut rig, rate, o.steady_secs, o.steady_batch).await;
    stop.cancel();
    let samples = sampler.await.unwrap_or_default();
    if let Some(h) = holder {
        h.abort();
    }
    // Statistics reach pg_stat_user_tables within about a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let end = sample_table(&rig.db.pool, Some(&metrics_addr)).await;
    let rss = rig.finish().await;
    let p = produced?;
    let end = end?;
    let (from_intended, from_commit, send_lag) = summarize(&p);

    let window_us = (o.steady_window_secs * 1e6) as u64;
    let n_windows = (o.steady_secs / o.steady_window_secs).ceil() as usize;
    let mut windows = Vec::with_capacity(n_windows);
    for w in 0..n_windows {
        let (lo, hi) = (w as u64 * window_us, (w as u64 + 1) * window_us);
        let received = p
            .arrivals
            .iter()
            .filter(|a| a.at_us >= lo && a.at_us < hi)
            .count();
        let in_window: Vec<&producer::Arrival> = p
            .arrivals
            .iter()
            .filter(|a| (lo..hi).contains(&p.intended_us(a)))
            .collect();
        let mut lat: Vec<u64> = in_window.iter().map(|a| a.from_intended_us).collect();
        let mut commit: Vec<u64> = in_window
            .iter()
            .filter_map(|a| p.commit_to_arrival_us(a))
            .collect();
        // samples[0] is taken at the start; samples[w + 1] at the end of window w.
        let s = samples.get(w + 1).cloned().unwrap_or_default();
        let before = samples.get(w).map(|s| s.metrics.as_str()).unwrap_or("");
        let start_secs = w as f64 * o.steady_window_secs;
        let held = spec
            .hold
            .is_some_and(|(hs, hl)| start_secs < hs + hl && start_secs + o.steady_window_secs > hs);
        windows.push(SteadyWindow {
            start_secs,
            received_per_sec: received as f64 / o.steady_window_secs,
            published_per_sec: published_total(&s.metrics)
                .map(|n| (n - published_total(before).unwrap_or(0.0)) / o.steady_window_secs),
            latency: percentiles(&mut lat),
            from_commit: percentiles(&mut commit),
            claim_p99_ms: p99_between("outbox_claim_duration_seconds", before, &s.metrics),
            publish_p99_ms: p99_between("outbox_publish_duration_seconds", before, &s.metrics),
            mark_p99_ms: p99_between("outbox_mark_duration_seconds", before, &s.metrics),
            acked_p99_ms: p99_between("outbox_delivery_latency_seconds", before, &s.metrics),
            commit_lag_p99_ms: {
                let interval_us = p.schedule.interval.as_secs_f64() * 1e6;
                let first = (lo as f64 / interval_us).ceil() as u64;
                let last = ((hi as f64 / interval_us).ceil() as u64).min(p.schedule.slots);
                let mut lag: Vec<u64> = (first..last)
                    .filter_map(|slot| p.commits.commit_lag_us(slot))
                    .collect();
                percentiles(&mut lag).p99_ms
            },
            checkpoints: s.checkpoints - samples.get(w).map_or(s.checkpoints, |b| b.checkpoints),
            held,
            table_bytes: s.table_bytes,
            index_bytes: s.index_bytes,
            dead_tuples: s.dead,
            waiting: s.waiting,
        });
    }
    let hold = spec.hold.map(|(hs, hl)| {
        let full = |w: &&SteadyWindow| w.start_secs + o.steady_window_secs <= o.steady_secs;
        let baseline: Vec<&SteadyWindow> = windows
            .iter()
            .filter(|w| w.start_secs + o.steady_window_secs <= hs)
            .collect();
        let mut base_commit: Vec<u64> = p
            .arrivals
            .iter()
            .filter(|a| (p.intended_us(a) as f64) < hs * 1e6)
            .filter_map(|a| p.commit_to_arrival_us(a))
            .collect();
        let baseline_p99_ms = percentiles(&mut base_commit).p99_ms;
        let held: Vec<&SteadyWindow> = windows.iter().filter(|w| w.held).collect();
        let max_opt = |v: Vec<Option<f64>>| {
            v.into_iter()
                .flatten()
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
        };
        HoldSummary {
            start_secs: hs,
            secs: hl,
            baseline_p99_ms,
            held_max_window_p99_ms: held
                .iter()
                .map(|w| w.from_commit.p99_ms)
                .fold(0.0, f64::max),
            p99_bar_ms: 2.0 * baseline_p99_ms + 20.0,
            min_window_delivered_pct: windows
                .iter()
                .filter(full)
                .map(|w| 100.0 * w.received_per_sec / p.schedule.rate())
                .fold(f64::INFINITY, f64::min),
            claim_p99_baseline_ms: max_opt(baseline.iter().map(|w| w.claim_p99_ms).collect()),
            claim_p99_held_max_ms: max_opt(held.iter().map(|w| w.claim_p99_ms).collect()),
            waiting_30s_after: windows
                .iter()
                .find(|w| w.start_secs + o.steady_window_secs >= hs + hl + 30.0)
                .map(|w| w.waiting),
        }
    });
    Ok(SteadyResult {
        sink: broker.kind().to_string(),
        target_rate: p.schedule.rate(),
        rate_basis: basis,
        messages_per_tx: p.schedule.per_slot,
        secs: o.steady_secs,
        autovacuum: if spec.autovacuum_off { "off" } else { "on" }.into(),
        sent: p.schedule.messages(),
        received: p.arrivals.len() as u64,
        enqueue_errors: p.commits.errors.load(std::sync::atomic::Ordering::Relaxed),
        from_intended,
        from_commit,
        send_lag,
        windows,
        hold,
        end_table_bytes: end.table_bytes,
        end_index_bytes: end.index_bytes,
        end_live_tuples: end.live,
        end_dead_tuples: end.dead,
        autovacuum_count: end.autovacuums,
        relay_vacuums: outbox_testkit::http::metric_or_zero(
            &end.metrics,
            "outbox_vacuums_total",
            &[("result", "done")],
        ),
        relay_peak_rss_mib: rss,
    })
}
