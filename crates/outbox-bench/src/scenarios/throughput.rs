//! Database ceiling, drain and scale: how fast a backlog of `--messages` rows empties.
//!
//! The ceiling runs the relay's own SQL (the claim the drain's relay runs, and `store::mark_sent`, in
//! a BEGIN/COMMIT loop, same batch size and worker count as the relay, on a pool opened by
//! `outbox_relay::store::connect`) with no broker at all. With ordering on (the default) the relay
//! runs the ordered claim (`outbox_relay::store::claim_ordered`, every slot owned, as by a single
//! relay) even for rows without a key, so the ceiling does too. Drain and scale run real relay processes
//! against a real broker with acknowledgements, from the same preloaded backlog ([`DrainSpec`]:
//! unkeyed for drain; keyed, with ordering on and off, for scale).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Opts;
use crate::bench_db::{unique, BenchDb, Load};
use crate::brokers::{Broker, TOPIC};
use crate::machine;
use crate::relay_proc::RelayUsage;

#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    pub rows: u64,
    pub secs: f64,
    pub rows_per_sec: f64,
    pub machine_cpu_busy_pct: f64,
    /// "ordered" or "unordered": which of the relay's claims looped.
    pub claim: &'static str,
}

pub async fn ceiling(o: &Opts) -> anyhow::Result<CeilingResult> {
    let db = o.create_db("ceiling").await?;
    db.preload(o.messages, o.payload_bytes, TOPIC, 0, Load::Vacuumed)
        .await?;
    let database = outbox_relay::config::DatabaseConfig {
        url: db.url.clone(),
        ..Default::default()
    };
    let pool =
        outbox_relay::store::connect(&database, o.workers + 2, Duration::from_secs(60)).await?;
    // Open the workers' connections before the clock starts, as a running relay has them.
    let warm: Vec<_> =
        futures::future::try_join_all((0..o.workers).map(|_| pool.acquire())).await?;
    drop(warm);
    let ordered = outbox_relay::config::defaults::ORDERING_ENABLED;
    let all_slots: Arc<Vec<i16>> = Arc::new((0..outbox_relay::store::SLOTS as i16).collect());
    let rows = Arc::new(AtomicU64::new(0));
    let cpu0 = machine::cpu_jiffies();
    let started = Instant::now();
    let workers: Vec<_> = (0..o.workers)
        .map(|_| {
            let (pool, rows, batch) = (pool.clone(), Arc::clone(&rows), o.batch_size as i64);
            let slots = Arc::clone(&all_slots);
            tokio::spawn(async move {
                loop {
                    let mut tx = pool.begin().await?;
                    let claimed = if ordered {
                        outbox_relay::store::claim_ordered(&mut tx, batch, &[], &slots, 0).await?
                    } else {
                        outbox_relay::store::claim(&mut tx, batch, &[], 0).await?
                    };
                    if claimed.is_empty() {
                        tx.commit().await?;
                        return Ok::<_, sqlx::Error>(());
                    }
                    let locked: Vec<_> = claimed.iter().map(|r| r.locked()).collect();
                    outbox_relay::store::mark_sent(&mut tx, &locked, false).await?;
                    tx.commit().await?;
                    rows.fetch_add(locked.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in futures::future::join_all(workers).await {
        w??;
    }
    let secs = started.elapsed().as_secs_f64();
    let busy = machine::busy_pct(cpu0, machine::cpu_jiffies());
    pool.close().await;
    let left = db.waiting().await?;
    db.drop_db().await;
    let rows = rows.load(Ordering::Relaxed);
    anyhow::ensure!(
        left == 0 && rows == o.messages,
        "ceiling loop left {left} rows and marked {rows}"
    );
    Ok(CeilingResult {
        rows,
        secs,
        rows_per_sec: rows as f64 / secs,
        machine_cpu_busy_pct: busy,
        claim: if ordered { "ordered" } else { "unordered" },
    })
}

/// One drain: how many relay processes, and what the backlog and the relays look like.
#[derive(Debug, Clone, Copy)]
pub struct DrainSpec {
    pub relays: usize,
    /// Distinct keys over the backlog; 0: no keys.
    pub keys: u64,
    /// The relays' `[ordering] enabled`.
    pub ordering: bool,
    /// Start the relays on an empty outbox, wait until they have settled (each registered
    /// and, in ordered mode, the slots spread evenly over them), then commit the backlog at
    /// once: the rate measured is the relays' steady rate, not their start-up (a relay that
    /// joins gets its share of the slots only after a heartbeat or two, `lease_ms`).
    pub settle: bool,
}

impl DrainSpec {
    /// The drain scenario: one relay as configured by default, a backlog without keys.
    pub fn plain() -> Self {
        Self {
            relays: 1,
            keys: 0,
            ordering: outbox_relay::config::defaults::ORDERING_ENABLED,
            settle: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainResult {
    pub sink: String,
    /// The scale scenario's round (0-based); 0 for the drain scenario.
    pub round: usize,
    pub relays: usize,
    /// Distinct keys over the backlog (0: none).
    pub keys: u64,
    /// The relays' `[ordering] enabled`.
    pub ordering: bool,
    pub messages: u64,
    /// Seconds from the first observed progress to an empty outbox.
    pub secs: f64,
    /// Seconds from starting the relay process(es) to the first observed progress.
    pub startup_secs: f64,
    pub msgs_per_sec: f64,
    /// Filled in by the caller: this rate as a percentage of the same run's ceiling.
    pub pct_of_ceiling: f64,
    /// Largest peak RSS among the relay processes.
    pub relay_peak_rss_mib: f64,
    /// CPU time of all relay processes together.
    pub relay_cpu_seconds: f64,
    pub machine_cpu_busy_pct: f64,
    /// Messages the broker holds at the end (JetStream drops duplicates by message id).
    pub broker_stored: u64,
}

/// Waits until every relay has registered and, in ordered mode, the slots are spread over all of
/// them (each owns `floor` or `ceil` of `SLOTS / relays`).
async fn settle(
    db: &BenchDb,
    procs: &mut [crate::relay_proc::RelayProcess],
    spec: DrainSpec,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.relays")
            .fetch_one(&db.pool)
            .await?;
        let settled = live == spec.relays as i64
            && (!spec.ordering || {
                let owned: Vec<i64> = sqlx::query_scalar(
                    "SELECT count(*) FROM outbox.partition_leases l
                       JOIN outbox.ordering_members m USING (relay_id)
                      WHERE m.expires_at > now() GROUP BY l.relay_id",
                )
                .fetch_all(&db.pool)
                .await?;
                let share = outbox_relay::store::SLOTS / spec.relays;
                owned.len() == spec.relays
                    && owned.iter().sum::<i64>() == outbox_relay::store::SLOTS as i64
                    && owned
                        .iter()
                        .all(|&n| n as usize == share || n as usize == share + 1)
            });
        if settled {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} relay(s) did not settle within 60 s ({live} registered)",
            spec.relays
        );
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drains a preloaded backlog through relay processes publishing to `broker`.
pub async fn drain(o: &Opts, broker: &dyn Broker, spec: DrainSpec) -> anyhow::Result<DrainResult> {
    let run = unique("d").replace('_', "");
    let db = o.create_db(&format!("drain_{}", broker.kind())).await?;
    if !spec.settle {
        db.preload(
            o.messages,
            o.payload_bytes,
            TOPIC,
            spec.keys,
            Load::Vacuumed,
        )
        .await?;
    }
    let dest = broker.prepare(&run).await?;
    let result = drain_inner(o, broker, spec, &db, &*dest, &run).await;
    dest.cleanup().await;
    db.drop_db().await;
    result
}

async fn drain_inner(
    o: &Opts,
    broker: &dyn Broker,
    spec: DrainSpec,
    db: &BenchDb,
    dest: &dyn crate::brokers::Destination,
    run: &str,
) -> anyhow::Result<DrainResult> {
    let sinks = vec![(broker.kind().to_string(), dest.sink_config())];
    let spawned = Instant::now();
    let mut procs = Vec::new();
    for i in 0..spec.relays {
        procs.push(
            o.launcher
                .start(&format!("{run}-relay{i}"), &db.url, &sinks, spec.ordering)?,
        );
    }
    if spec.settle {
        settle(db, &mut procs, spec).await?;
        db.preload(o.messages, o.payload_bytes, TOPIC, spec.keys, Load::AtOnce)
            .await?;
    }
    let n = o.messages as i64;
    let deadline = spawned + o.drain_timeout();
    let mut first: Option<(Instant, i64, (u64, u64))> = None;
    let mut last_check = Instant::now();
    let end = loop {
        let waiting = db.waiting().await?;
        let now = Instant::now();
        if first.is_none() && waiting < n {
            first = Some((now, waiting, machine::cpu_jiffies()));
        }
        if waiting == 0 {
            break now;
        }
        if now > deadline {
            anyhow::bail!(
                "drain through {} did not finish in {:?}: {waiting} rows left",
                broker.kind(),
                o.drain_timeout()
            );
        }
        if now.duration_since(last_check) > Duration::from_secs(1) {
            for p in &mut procs {
                p.check_alive()?;
            }
            last_check = now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cpu_end = machine::cpu_jiffies();
    let mut usage = Vec::new();
    for p in procs {
        usage.push(p.stop().await);
    }
    let (t_first, waiting_first, cpu_first) = first.unwrap_or((spawned, n, cpu_end));
    let secs = end.duration_since(t_first).as_secs_f64().max(1e-6);
    let stored = dest.stored().await?;
    Ok(DrainResult {
        sink: broker.kind().to_string(),
        round: 0,
        relays: spec.relays,
        keys: spec.keys,
        ordering: spec.ordering,
        messages: o.messages,
        secs,
        startup_secs: t_first.duration_since(spawned).as_secs_f64(),
        msgs_per_sec: waiting_first as f64 / secs,
        pct_of_ceiling: 0.0,
        relay_peak_rss_mib: usage
            .iter()
            .map(|u: &RelayUsage| u.peak_rss_mib)
            .fold(0.0, f64::max),
        relay_cpu_seconds: usage.iter().map(|u| u.cpu_seconds).sum(),
        machine_cpu_busy_pct: machine::busy_pct(cpu_first, cpu_end),
        broker_stored: stored,
    })
}
