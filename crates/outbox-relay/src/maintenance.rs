//! Maintenance tasks, each on its own interval, all stopped by the one shutdown token:
//! lag sampling (gauges), count compaction, retention cleanup of sent rows, removal of
//! sleeper registrations left by dead relays, and the relay heartbeat ([`crate::heartbeat`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::heartbeat::{self, Identity, RateTracker, SinkHealth};
use crate::metrics::Metrics;
use crate::relay::Relay;

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
    let lag = db::lag(&mut conn).await?;
    metrics
        .lag_query_duration_seconds
        .set(started.elapsed().as_secs_f64());
    let dead = db::dead_counts(&mut conn).await?;
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

/// Upserts this relay's heartbeat every `relay.heartbeat_interval_secs`, expires dead relays'
/// rows, and sets `outbox_relay_instances`. On shutdown the relay removes its own row.
async fn heartbeat_task(relay: Arc<Relay>, shutdown: CancellationToken) {
    let id = Identity::new();
    let interval = Duration::from_secs(relay.config.heartbeat_interval_secs);
    let expiry = Duration::from_secs(relay.config.relay_expiry_secs);
    let mut rates = RateTracker::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    tracing::info!(relay_id = %id.relay_id, hostname = %id.hostname, "relay heartbeat started");
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let sinks: Vec<SinkHealth> = relay
            .sinks
            .iter()
            .map(|s| SinkHealth {
                sink: s.name.clone(),
                kind: s.sink.kind().to_string(),
                up: s.is_up(),
                error: s.last_error(),
            })
            .collect();
        let publish_rates =
            rates.update(Instant::now(), heartbeat::delivered_totals(&relay.metrics));
        let result = async {
            let mut conn = relay.pool.acquire().await?;
            heartbeat::beat(&mut conn, &id, interval, &sinks, &publish_rates).await?;
            heartbeat::expire(&mut conn, expiry).await?;
            heartbeat::count_live(&mut conn, expiry).await
        }
        .await;
        match result {
            Ok(live) => {
                relay.metrics.relay_instances.set(live);
                failing = false;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(task = "heartbeat", error = %e, "relay heartbeat failed; retrying every interval");
            }
            Err(e) => {
                tracing::debug!(task = "heartbeat", error = %e, "relay heartbeat still failing")
            }
        }
    }
    let removed = tokio::time::timeout(Duration::from_secs(1), async {
        let mut conn = relay.pool.acquire().await?;
        heartbeat::remove(&mut conn, &id.relay_id).await
    })
    .await;
    if !matches!(removed, Ok(Ok(()))) {
        tracing::debug!(relay_id = %id.relay_id, "could not remove the heartbeat row; it expires on its own");
    }
}

pub fn spawn_all(
    relay: &Arc<Relay>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let cfg = &relay.config;
    let mut tasks = Vec::new();

    let (pool, metrics) = (relay.pool.clone(), Arc::clone(&relay.metrics));
    tasks.push(tokio::spawn(every(
        "lag",
        Duration::from_secs(cfg.lag_interval_secs),
        shutdown.clone(),
        move || {
            let (pool, metrics) = (pool.clone(), Arc::clone(&metrics));
            async move { sample_lag(&pool, &metrics).await }
        },
    )));

    let pool = relay.pool.clone();
    let interval = Duration::from_secs(cfg.maintenance_interval_secs);
    tasks.push(tokio::spawn(every(
        "compact_counts",
        interval,
        shutdown.clone(),
        move || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await?;
                db::compact_counts(&mut conn).await?;
                db::cleanup_sleepers(&mut conn).await?;
                Ok(())
            }
        },
    )));

    tasks.push(tokio::spawn(heartbeat_task(
        Arc::clone(relay),
        shutdown.clone(),
    )));

    if let Some(retention) = cfg.retention() {
        let pool = relay.pool.clone();
        let chunk = cfg.cleanup_chunk as i64;
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(every(
            "retention",
            interval,
            shutdown.clone(),
            move || {
                let (pool, stop) = (pool.clone(), stop.clone());
                async move {
                    let mut conn = pool.acquire().await?;
                    // Bounded chunks: each statement deletes at most `chunk` rows.
                    while !stop.is_cancelled()
                        && db::cleanup_sent(&mut conn, retention, chunk).await? as i64 == chunk
                    {
                    }
                    Ok(())
                }
            },
        )));
    }
    tasks
}
