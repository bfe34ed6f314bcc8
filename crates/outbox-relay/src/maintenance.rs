//! Maintenance tasks, each on its own interval, all stopped by the one shutdown token:
//! lag sampling (gauges), count compaction, retention cleanup of sent rows, removal of
//! sleeper registrations left by dead relays, the claim floor's advance, and VACUUM where
//! autovacuum is off. (The heartbeat is [`crate::cluster`]'s.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::metrics::Metrics;
use crate::store;

/// Runs `task` every `interval` until shutdown; failures are logged and retried next tick.
async fn every<F, Fut>(
    name: &'static str,
    interval: Duration,
    shutdown: CancellationToken,
    mut task: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = task().await {
            tracing::warn!(task = name, error = %e, "maintenance task failed; retrying next interval");
        }
    }
}

/// Samples per-topic lag and dead letters into the gauges. A topic that was exported before and
/// has nothing waiting now reads 0 (rather than vanishing), so graphs and `deriv()` see the drop.
pub async fn sample_lag(pool: &PgPool, metrics: &Metrics) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let lag = store::lag(&mut conn).await?;
    metrics
        .lag_query_duration_seconds
        .set(started.elapsed().as_secs_f64());
    let dead = store::dead_counts(&mut conn).await?;
    for topic in exported_topics(&metrics.pending_messages) {
        if !lag.iter().any(|l| l.topic == topic) {
            metrics.pending_messages.with_label_values(&[&topic]).set(0);
            metrics
                .scheduled_messages
                .with_label_values(&[&topic])
                .set(0);
            metrics
                .oldest_pending_age_seconds
                .with_label_values(&[&topic])
                .set(0.0);
        }
    }
    for l in &lag {
        metrics
            .pending_messages
            .with_label_values(&[&l.topic])
            .set(l.waiting);
        metrics
            .scheduled_messages
            .with_label_values(&[&l.topic])
            .set(l.scheduled);
        metrics
            .oldest_pending_age_seconds
            .with_label_values(&[&l.topic])
            .set(l.oldest_age_seconds);
    }
    for topic in exported_topics(&metrics.dead_letters) {
        if !dead.iter().any(|(t, _)| *t == topic) {
            metrics.dead_letters.with_label_values(&[&topic]).set(0);
        }
    }
    for (topic, n) in &dead {
        metrics.dead_letters.with_label_values(&[topic]).set(*n);
    }
    Ok(())
}

/// The `topic` label values a gauge currently exports.
fn exported_topics(gauge: &prometheus::IntGaugeVec) -> Vec<String> {
    use prometheus::core::Collector;
    gauge
        .collect()
        .iter()
        .flat_map(|f| f.get_metric().iter())
        .filter_map(|m| {
            m.get_label()
                .iter()
                .find(|l| l.name() == "topic")
                .map(|l| l.value().to_string())
        })
        .collect()
}

/// How often the claim floor advances a step (two steps raise it).
pub const FLOOR_STEP: Duration = Duration::from_millis(250);

/// After how long a transaction that keeps the floor down is worth a warning, and how often.
const FLOOR_STALL_WARNING: Duration = Duration::from_secs(60);

/// Keeps the claim floor ([`store::floor`]) rising, on a connection of its own (its queries read
/// `pg_locks`, and the relay's pool sessions must not wait for it). `shared` is what the
/// workers and the idle poll read.
pub async fn run_floor(
    pool: PgPool,
    shared: Arc<store::floor::Shared>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(FLOOR_STEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<store::floor::Horizon> = None;
    let mut conn: Option<sqlx::PgConnection> = None;
    let mut warned_at: Option<Instant> = None;
    let mut unsafe_logged = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match pool.acquire().await {
                Ok(c) => conn.insert(c.detach()),
                Err(e) => {
                    tracing::debug!(error = %e, "claim floor: no connection; retrying");
                    continue;
                }
            },
        };
        let step = match store::floor::advance(c, pending.as_ref()).await {
            Ok(step) => step,
            Err(e) => {
                tracing::warn!(error = %e, "claim floor: advance failed; retrying");
                conn = None;
                pending = None;
                continue;
            }
        };
        match step {
            store::floor::Step::Noted(h) => pending = Some(h),
            store::floor::Step::Raised { floor, horizon } => {
                metrics
                    .storage
                    .claim_floor_gap_ids
                    .set((horizon.last_id + 1 - floor).max(0));
                pending = Some(horizon);
                metrics.storage.claim_floor_stalled_seconds.set(0.0);
                warned_at = None;
                unsafe_logged = false;
            }
            store::floor::Step::Waiting { oldest_writer_secs } => {
                metrics
                    .storage
                    .claim_floor_stalled_seconds
                    .set(oldest_writer_secs);
                let due = warned_at.is_none_or(|t| t.elapsed() >= FLOOR_STALL_WARNING);
                if oldest_writer_secs >= FLOOR_STALL_WARNING.as_secs_f64() && due {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        open_secs = oldest_writer_secs.round(),
                        "a transaction that wrote to outbox.messages has been open for a long time: \
                         the claim floor cannot rise past the ids handed out before it began, so \
                         claims walk the rows deleted since (see pg_stat_activity for sessions \
                         'idle in transaction')"
                    );
                }
            }
            store::floor::Step::Unsafe { reason } => {
                pending = None;
                if !unsafe_logged {
                    unsafe_logged = true;
                    tracing::warn!(%reason, "claim floor disabled: claims scan from the first row");
                }
            }
        }
        match store::floor::read(&mut *c).await {
            Ok(floor) => {
                shared.set(floor);
                metrics.storage.claim_floor.set(floor);
            }
            Err(e) => tracing::debug!(error = %e, "claim floor: read failed"),
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// The tables the vacuum task may vacuum: learned once, on its first run with autovacuum off.
type Vacuumable = Arc<std::sync::Mutex<Option<Vec<&'static str>>>>;

/// VACUUM of the outbox's tables where autovacuum is off, once they hold `DEAD_ROWS_TO_VACUUM`
/// dead rows. Each run on a connection of its own, closed afterwards.
///
/// Only a table's owner may vacuum it (before PostgreSQL 17; from 17 also a role with MAINTAIN),
/// and PostgreSQL skips the others with a warning rather than an error. A relay that runs as the
/// least-privilege relay role (docs/security.md) owns nothing: the first run learns which tables
/// the role may vacuum, says once which it may not and what to do, and from then on vacuums only
/// the others (none: the task does nothing more).
async fn vacuum_if_needed(
    pool: &PgPool,
    metrics: &Metrics,
    vacuumable: &Vacuumable,
) -> Result<(), sqlx::Error> {
    const DEAD_ROWS_TO_VACUUM: i64 = 10_000;
    let known = vacuumable.lock().map(|v| v.clone()).unwrap_or_default();
    if known.as_ref().is_some_and(Vec::is_empty) {
        return Ok(());
    }
    let mut conn = pool.acquire().await?.detach();
    let result = async {
        if !store::vacuum::autovacuum_off(&mut conn).await? {
            return Ok(None);
        }
        let tables = match known {
            Some(tables) => tables,
            None => {
                let denied = store::vacuum::not_vacuumable(&mut conn).await?;
                let tables: Vec<&'static str> = store::vacuum::TABLES
                    .iter()
                    .copied()
                    .filter(|t| !denied.iter().any(|d| d == t))
                    .collect();
                if !denied.is_empty() {
                    tracing::warn!(
                        tables = %denied.join(", "),
                        "autovacuum is off, and the relay's database role may not VACUUM these \
                         outbox tables (only their owner may; from PostgreSQL 17 also a role \
                         with the MAINTAIN privilege): the relay leaves them alone, and their \
                         deleted rows stay until someone vacuums them. Turn autovacuum on for \
                         them, have their owner run VACUUM regularly, or (PostgreSQL 17+) GRANT \
                         MAINTAIN on them to the relay role; see docs/security.md, \"Roles: least \
                         privilege\""
                    );
                }
                if let Ok(mut v) = vacuumable.lock() {
                    *v = Some(tables.clone());
                }
                tables
            }
        };
        if tables.is_empty() || store::vacuum::dead_rows(&mut conn).await? < DEAD_ROWS_TO_VACUUM {
            return Ok(None);
        }
        store::vacuum::vacuum_tables(&mut conn, &tables)
            .await
            .map(Some)
    }
    .await;
    let _ = conn.close().await;
    let label = match &result {
        Ok(None) => return Ok(()),
        Ok(Some(store::vacuum::Vacuumed::Done)) => "done",
        Ok(Some(store::vacuum::Vacuumed::SkippedLocked)) => "skipped_locked",
        Err(_) => "failed",
    };
    metrics
        .storage
        .vacuums_total
        .with_label_values(&[label])
        .inc();
    if label == "skipped_locked" {
        tracing::info!("VACUUM of the outbox tables skipped: another session holds a conflicting lock; trying again next interval");
    }
    result.map(|_| ())
}

/// Starts every maintenance task; each stops when `shutdown` fires.
pub fn spawn_all(
    pool: &PgPool,
    metrics: &Arc<Metrics>,
    cfg: &RelayConfig,
    floor: &Arc<store::floor::Shared>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(run_floor(
        pool.clone(),
        Arc::clone(floor),
        Arc::clone(metrics),
        shutdown.clone(),
    ))];
    if cfg.vacuum_when_autovacuum_off {
        let (vacuum_pool, vacuum_metrics) = (pool.clone(), Arc::clone(metrics));
        let vacuumable = Vacuumable::default();
        tasks.push(tokio::spawn(every(
            "vacuum",
            Duration::from_secs(cfg.maintenance_interval_secs),
            shutdown.clone(),
            move || {
                let (pool, metrics) = (vacuum_pool.clone(), Arc::clone(&vacuum_metrics));
                let vacuumable = Arc::clone(&vacuumable);
                async move { vacuum_if_needed(&pool, &metrics, &vacuumable).await }
            },
        )));
    }
    let (lag_pool, metrics) = (pool.clone(), Arc::clone(metrics));
    tasks.push(tokio::spawn(every(
        "lag",
        Duration::from_secs(cfg.lag_interval_secs),
        shutdown.clone(),
        move || {
            let (pool, metrics) = (lag_pool.clone(), Arc::clone(&metrics));
            async move { sample_lag(&pool, &metrics).await }
        },
    )));

    let interval = Duration::from_secs(cfg.maintenance_interval_secs);
    let compact_pool = pool.clone();
    tasks.push(tokio::spawn(every(
        "compact_counts",
        interval,
        shutdown.clone(),
        move || {
            let pool = compact_pool.clone();
            async move {
                let mut conn = pool.acquire().await?;
                store::compact_counts(&mut conn).await?;
                store::sleepers::cleanup_sleepers(&mut conn).await?;
                Ok(())
            }
        },
    )));

    if let Some(retention) = cfg.retention() {
        let chunk = cfg.cleanup_chunk as i64;
        let stop = shutdown.clone();
        let retention_pool = pool.clone();
        tasks.push(tokio::spawn(every(
            "retention",
            interval,
            shutdown.clone(),
            move || {
                let (pool, stop) = (retention_pool.clone(), stop.clone());
                async move {
                    let mut conn = pool.acquire().await?;
                    // Bounded chunks: each statement deletes at most `chunk` rows.
                    while !stop.is_cancelled()
                        && store::cleanup_sent(&mut conn, retention, chunk).await? as i64 == chunk
                    {
                    }
                    Ok(())
                }
            },
        )));
    }
    tasks
}
