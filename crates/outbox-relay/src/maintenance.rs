//! Maintenance tasks, each on its own interval, all stopped by the one shutdown token:
//! lag sampling (gauges), count compaction, retention cleanup of sent rows, and removal of
//! sleeper registrations left by dead relays. (The heartbeat is [`crate::cluster`]'s.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
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

/// Starts every maintenance task; each stops when `shutdown` fires.
pub fn spawn_all(
    pool: &PgPool,
    metrics: &Arc<Metrics>,
    cfg: &RelayConfig,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
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
