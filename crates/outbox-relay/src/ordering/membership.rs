//! The membership task: heartbeats in `outbox.ordering_members`, slot leases in
//! `outbox.partition_leases`, rebalancing toward `ceil(256 / live relays)` slots per relay, and
//! the held-back/parked key gauges. No external coordinator: the database is the only shared
//! state, and every time is the database's clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{sql, Ordering, SLOTS};
use crate::relay::Relay;

/// The machine's name, for `outbox.ordering_members` (best effort).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Spawns the heartbeat loop; it leaves (frees its slots) when `shutdown` fires and the
/// workers are done, see [`leave`].
pub fn spawn(
    relay: &Arc<Relay>,
    ordering: &Arc<Ordering>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (relay, ordering, shutdown) = (Arc::clone(relay), Arc::clone(ordering), shutdown.clone());
    tokio::spawn(async move { run(relay, ordering, shutdown).await })
}

async fn run(relay: Arc<Relay>, ordering: Arc<Ordering>, shutdown: CancellationToken) {
    let host = hostname();
    let mut ticker = tokio::time::interval(Duration::from_millis(ordering.config.heartbeat_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gauges_every = Duration::from_secs(relay.config.lag_interval_secs);
    let mut gauges_at = Instant::now();
    let mut last: Option<sql::Beat> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        let beat = async {
            let mut conn = relay.pool.acquire().await?;
            sql::heartbeat(
                &mut conn,
                &ordering.relay_id,
                &host,
                ordering.lease(),
                SLOTS,
            )
            .await
        }
        .await;
        match beat {
            Ok(beat) => {
                if last.as_ref().map(|l| (l.live_relays, l.owned.len()))
                    != Some((beat.live_relays, beat.owned.len()))
                {
                    tracing::info!(relay_id = %ordering.relay_id, live_relays = beat.live_relays, target = beat.target,
                        owned = beat.owned.len(), "ordering slots rebalanced");
                }
                if ordering.set_owned(beat.owned.clone(), started + ordering.lease()) {
                    relay.wakeup.bump();
                }
                last = Some(beat);
            }
            Err(e) => {
                tracing::warn!(relay_id = %ordering.relay_id, error = %e,
                    "ordering heartbeat failed; keyed rows stop being claimed here when the leases expire");
            }
        }
        if started >= gauges_at {
            gauges_at = started + gauges_every;
            if let Err(e) = sample_gauges(&relay, &ordering).await {
                tracing::debug!(error = %e, "cannot sample held-back keys");
            }
        }
    }
}

async fn sample_gauges(relay: &Relay, ordering: &Ordering) -> Result<(), sqlx::Error> {
    let mut conn = relay.pool.acquire().await?;
    let (held, parked) = sql::key_counts(&mut conn).await?;
    let m = &ordering.metrics;
    m.held_back_keys.reset();
    for (topic, n) in held {
        m.held_back_keys.with_label_values(&[&topic]).set(n);
    }
    m.parked_keys.reset();
    for (topic, n) in parked {
        m.parked_keys.with_label_values(&[&topic]).set(n);
    }
    Ok(())
}

/// After the workers stopped: frees this relay's slots at once so the others take them over
/// without waiting for the lease to expire.
pub async fn leave(relay: &Relay, ordering: &Ordering) {
    ordering.clear_owned();
    let result = async {
        let mut conn = relay.pool.acquire().await?;
        sql::leave(&mut conn, &ordering.relay_id).await
    }
    .await;
    match result {
        Ok(()) => tracing::info!(relay_id = %ordering.relay_id, "ordering slots released"),
        Err(e) => {
            tracing::warn!(relay_id = %ordering.relay_id, error = %e, "cannot release ordering slots; they expire with their leases")
        }
    }
}
