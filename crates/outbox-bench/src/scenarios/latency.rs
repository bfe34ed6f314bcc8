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
        let db = BenchDb::create(&o.database_url, scenario).await?;
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

fn summarize(p: &Produced) -> (Percentiles, Percentiles, Percentiles) {
    let mut from_intended: Vec<u64> = p.arrivals.iter().map(|a| a.from_intended_us).collect();
    let mut from_commit: Vec<u64> = p
        .arrivals
        .iter()
        .filter_map(|a| {
            p.commits
                .commit_lag_us(a.slot)
                .map(|lag| a.from_intended_us.saturating_sub(lag))
        })
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
    /// Latency (intended send → consumer) of the messages scheduled in this window.
    pub latency: Percentiles,
    pub table_bytes: i64,
    pub index_bytes: i64,
    pub dead_tuples: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SteadyResult {
    pub sink: String,
    pub target_rate: f64,
    pub rate_basis: String,
    pub messages_per_tx: usize,
    pub secs: f64,
    pub sent: u64,
    pub received: u64,
    pub enqueue_errors: u64,
    pub from_intended: Percentiles,
    pub send_lag: Percentiles,
    pub windows: Vec<SteadyWindow>,
    pub end_table_bytes: i64,
    pub end_index_bytes: i64,
    pub end_live_tuples: i64,
    pub end_dead_tuples: i64,
    pub autovacuum_count: i64,
    pub relay_peak_rss_mib: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct TableSample {
    table_bytes: i64,
    index_bytes: i64,
    live: i64,
    dead: i64,
    autovacuums: i64,
}

async fn sample_table(pool: &sqlx::PgPool) -> anyhow::Result<TableSample> {
    let (table_bytes, index_bytes, live, dead, autovacuums): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT pg_table_size('outbox.messages'), pg_indexes_size('outbox.messages'),
                n_live_tup, n_dead_tup, autovacuum_count
           FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass",
        )
        .fetch_one(pool)
        .await?;
    Ok(TableSample {
        table_bytes,
        index_bytes,
        live,
        dead,
        autovacuums,
    })
}

pub async fn steady(
    o: &Opts,
    broker: &dyn Broker,
    rate: f64,
    basis: String,
) -> anyhow::Result<SteadyResult> {
    let mut rig = Rig::start(o, broker, &format!("steady_{}", broker.kind())).await?;
    // Table samples once per window, on their own connection.
    let sampler_pool = rig.db.pool.clone();
    let window = Duration::from_secs_f64(o.steady_window_secs);
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(window);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                if let Ok(s) = sample_table(&sampler_pool).await {
                    samples.push(s);
                }
            }
            samples
        })
    };
    let produced = produce(o, &mut rig, rate, o.steady_secs, o.steady_batch).await;
    stop.cancel();
    let samples = sampler.await.unwrap_or_default();
    // Statistics reach pg_stat_user_tables within about a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let end = sample_table(&rig.db.pool).await;
    let rss = rig.finish().await;
    let p = produced?;
    let end = end?;
    let (from_intended, _, send_lag) = summarize(&p);

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
        let mut lat: Vec<u64> = p
            .arrivals
            .iter()
            .filter(|a| {
                let intended = p
                    .schedule
                    .intended(a.slot)
                    .saturating_duration_since(p.schedule.start)
                    .as_micros() as u64;
                intended >= lo && intended < hi
            })
            .map(|a| a.from_intended_us)
            .collect();
        let s = samples.get(w).copied().unwrap_or_default();
        windows.push(SteadyWindow {
            start_secs: w as f64 * o.steady_window_secs,
            received_per_sec: received as f64 / o.steady_window_secs,
            latency: percentiles(&mut lat),
            table_bytes: s.table_bytes,
            index_bytes: s.index_bytes,
            dead_tuples: s.dead,
        });
    }
    Ok(SteadyResult {
        sink: broker.kind().to_string(),
        target_rate: p.schedule.rate(),
        rate_basis: basis,
        messages_per_tx: p.schedule.per_slot,
        secs: o.steady_secs,
        sent: p.schedule.messages(),
        received: p.arrivals.len() as u64,
        enqueue_errors: p.commits.errors.load(std::sync::atomic::Ordering::Relaxed),
        from_intended,
        send_lag,
        windows,
        end_table_bytes: end.table_bytes,
        end_index_bytes: end.index_bytes,
        end_live_tuples: end.live,
        end_dead_tuples: end.dead,
        autovacuum_count: end.autovacuums,
        relay_peak_rss_mib: rss,
    })
}
