//! The cluster of relays on one database: this relay's identity, and the one heartbeat loop
//! that renews its `outbox.relays` row (sink health and publish rates for `status`), its
//! ordering membership and slot leases, and rebalances toward `ceil(256 / live relays)` slots
//! per relay. No external coordinator: the database is the only shared state, and every time is
//! the database's clock (docs/ordering.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus::core::Collector;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::pipeline::claim::Slots;
use crate::pipeline::dispatch::Dispatcher;
use crate::store::cluster::{self as sql, Identity, Leases, Report};
use crate::store::{self, SLOTS};
use crate::wakeup::Wakeup;

/// The machine's name (best effort): `HOSTNAME`, else the kernel's.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A new identity for this process: a UUIDv7, unique per process lifetime.
pub fn new_identity() -> Identity {
    Identity {
        relay_id: uuid::Uuid::now_v7().to_string(),
        hostname: hostname(),
        pid: std::process::id() as i32,
        version: env!("CARGO_PKG_VERSION"),
        started_at: Utc::now(),
    }
}

/// This relay's membership: who it is, how often it beats, and (in ordered mode) its slots.
pub struct Member {
    pub identity: Identity,
    pub config: ClusterConfig,
    /// `Some` in ordered mode: the slots the claims read.
    pub slots: Option<Arc<Slots>>,
}

/// What the heartbeat loop reads and updates.
pub struct Context {
    pub pool: PgPool,
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub wakeup: Arc<Wakeup>,
    /// How often the held-back and parked key gauges are sampled.
    pub gauges_every: Duration,
}

impl Context {
    /// Reads the paused topics once, before the workers claim anything: a topic paused while
    /// no relay ran must not lose a batch to the moment before the first heartbeat. A failed
    /// read is left to the heartbeat, which reads them again every interval.
    pub async fn load_pauses(&self) {
        let read = async {
            let mut conn = self.pool.acquire().await?;
            store::admin::paused_topic_names(&mut conn).await
        };
        match read.await {
            Ok(topics) => self.apply_pauses(topics),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the paused topics yet; the heartbeat reads them again")
            }
        }
    }

    /// Makes `topics` the paused set, saying which were paused or resumed since the last read.
    fn apply_pauses(&self, topics: Vec<String>) {
        let (paused, resumed) = self.dispatcher.set_paused(topics);
        for topic in &paused {
            tracing::warn!(topic = %topic, "topic paused by an operator: not claiming its rows until it is resumed (outbox-relay topics resume)");
            self.metrics.topic_paused.with_label_values(&[topic]).set(1);
        }
        for topic in &resumed {
            tracing::info!(topic = %topic, "topic resumed: claiming its rows again");
            let _ = self.metrics.topic_paused.remove_label_values(&[topic]);
        }
    }
}

impl Member {
    pub fn new(config: ClusterConfig, ordered: bool) -> Self {
        Self {
            identity: new_identity(),
            config,
            slots: ordered.then(|| Arc::new(Slots::default())),
        }
    }

    /// Spawns the heartbeat loop; it stops when `shutdown` fires. Call [`Member::leave`] once
    /// the workers are done.
    pub fn spawn(
        self: &Arc<Self>,
        ctx: Context,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.run(ctx, shutdown).await })
    }

    async fn run(&self, ctx: Context, shutdown: CancellationToken) {
        let id = &self.identity;
        let mut ticker = tokio::time::interval(self.config.heartbeat());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rates = RateTracker::default();
        let mut gauges_at = Instant::now();
        let mut last: Option<(i64, usize)> = None;
        let mut failing = false;
        let mut last_eligible = true;
        let mut last_yielded = false;
        // When the slots of the last successful heartbeat lapse: from then on the claims use
        // none of them, and `outbox_partitions_owned` must say so while heartbeats fail.
        let mut lease_until: Option<Instant> = None;
        tracing::info!(relay_id = %id.relay_id, hostname = %id.hostname, "relay heartbeat started");
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let started = Instant::now();
            let report = Report {
                sinks: ctx.dispatcher.health(),
                publish_rates: rates.update(started, delivered_totals(&ctx.metrics)),
            };
            // A relay none of whose sinks can publish holds no slots: the healthy relays take
            // its keys over (ordering never depends on who holds a slot, docs/ordering.md).
            let can_publish = report.sinks.iter().any(|s| s.up);
            if self.slots.is_some() && can_publish != last_eligible {
                if can_publish {
                    tracing::info!(relay_id = %id.relay_id, "a sink is up again: taking ordering slots again");
                } else {
                    tracing::warn!(relay_id = %id.relay_id, "no sink can publish: giving up this relay's ordering slots to the other relays");
                }
                last_eligible = can_publish;
            }
            let leases = self.slots.as_ref().map(|_| Leases {
                lease: self.config.lease(),
                slots: SLOTS,
                eligible: can_publish,
            });
            let beat = async {
                let mut conn = ctx.pool.acquire().await?;
                let interval = self.config.heartbeat();
                let expiry = self.config.relay_expiry();
                sql::heartbeat(&mut conn, id, interval, expiry, &report, leases).await
            }
            .await;
            match beat {
                Ok(beat) => {
                    failing = false;
                    ctx.metrics.relay_instances.set(beat.live_relays);
                    ctx.apply_pauses(beat.paused);
                    if let Some(slots) = &self.slots {
                        if beat.yielded != last_yielded {
                            if beat.yielded {
                                tracing::warn!(relay_id = %id.relay_id, "a sink of this relay is down while another relay can publish to it: giving this relay's ordering slots to the others");
                            } else {
                                tracing::info!(relay_id = %id.relay_id, "taking ordering slots again: no sink of this relay is down where another relay can publish");
                            }
                            last_yielded = beat.yielded;
                        }
                        if last != Some((beat.members, beat.owned.len())) {
                            tracing::info!(relay_id = %id.relay_id, live_relays = beat.members, target = beat.target,
                                owned = beat.owned.len(), "ordering slots rebalanced");
                        }
                        last = Some((beat.members, beat.owned.len()));
                        ctx.metrics
                            .ordering
                            .partitions_owned
                            .set(beat.owned.len() as i64);
                        lease_until = Some(started + self.config.lease());
                        if slots.set(beat.owned, started + self.config.lease()) {
                            ctx.wakeup.bump();
                        }
                    }
                }
                Err(_) if lease_until.is_some_and(|t| Instant::now() >= t) => {
                    lease_until = None;
                    ctx.metrics.ordering.partitions_owned.set(0);
                    tracing::warn!(relay_id = %id.relay_id,
                        "relay heartbeat still failing: this relay's ordering slot leases have lapsed");
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(relay_id = %id.relay_id, error = %e,
                        "relay heartbeat failed; retrying every interval (keyed rows stop being claimed here when the slot leases expire)");
                }
                Err(e) => tracing::debug!(error = %e, "relay heartbeat still failing"),
            }
            if self.slots.is_some() && started >= gauges_at {
                gauges_at = started + ctx.gauges_every;
                if let Err(e) = sample_key_gauges(&ctx.pool, &ctx.metrics).await {
                    tracing::debug!(error = %e, "cannot sample held-back keys");
                }
            }
        }
    }

    /// After the workers stopped: frees this relay's slots at once (so the others take them
    /// over without waiting for the lease to expire) and removes its `outbox.relays` row.
    pub async fn leave(&self, pool: &PgPool, metrics: &Metrics) {
        if let Some(slots) = &self.slots {
            slots.clear();
            metrics.ordering.partitions_owned.set(0);
        }
        let id = &self.identity.relay_id;
        let result = async {
            let mut conn = pool.acquire().await?;
            sql::leave(&mut conn, id).await
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(relay_id = %id, "left the cluster: slots released, heartbeat row removed")
            }
            Err(e) => {
                tracing::warn!(relay_id = %id, error = %e, "cannot leave the cluster cleanly; the slots and the heartbeat row expire on their own")
            }
        }
    }
}

async fn sample_key_gauges(pool: &PgPool, metrics: &Metrics) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let (held, parked) = store::keys::key_counts(&mut conn).await?;
    let m = &metrics.ordering;
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

/// Rows marked delivered (outcomes `delivered` and `duplicate`) per topic since start, read from
/// `outbox_published_total`.
pub fn delivered_totals(metrics: &Metrics) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for family in metrics.published_total.collect() {
        for m in family.get_metric() {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
            };
            if matches!(label("outcome").as_deref(), Some("delivered" | "duplicate")) {
                if let Some(topic) = label("topic") {
                    *totals.entry(topic).or_insert(0) += m.get_counter().value() as u64;
                }
            }
        }
    }
    totals
}

/// Turns successive delivered totals into per-second rates.
#[derive(Debug, Default)]
pub struct RateTracker {
    last: Option<(Instant, BTreeMap<String, u64>)>,
}

impl RateTracker {
    /// The rate per topic since the previous call (empty on the first call). Topics that
    /// published nothing in the interval report 0 while they are known.
    pub fn update(&mut self, now: Instant, totals: BTreeMap<String, u64>) -> BTreeMap<String, f64> {
        let rates = match &self.last {
            Some((then, before)) => {
                let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
                totals
                    .iter()
                    .map(|(topic, n)| {
                        let prev = before.get(topic).copied().unwrap_or(0);
                        (topic.clone(), n.saturating_sub(prev) as f64 / secs)
                    })
                    .collect()
            }
            None => BTreeMap::new(),
        };
        self.last = Some((now, totals));
        rates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_come_from_successive_totals() {
        let mut t = RateTracker::default();
        let start = Instant::now();
        assert!(t
            .update(start, BTreeMap::from([("a".into(), 10)]))
            .is_empty());
        let r = t.update(
            start + Duration::from_secs(2),
            BTreeMap::from([("a".into(), 30), ("b".into(), 4)]),
        );
        assert_eq!(r["a"], 10.0);
        assert_eq!(r["b"], 2.0);
        let r = t.update(
            start + Duration::from_secs(4),
            BTreeMap::from([("a".into(), 30), ("b".into(), 4)]),
        );
        assert_eq!(r["a"], 0.0);
    }

    #[test]
    fn delivered_totals_count_delivered_and_duplicates_only() {
        let m = Metrics::new();
        m.published_total
            .with_label_values(&["t", "nats", "delivered"])
            .inc_by(5);
        m.published_total
            .with_label_values(&["t", "nats", "duplicate"])
            .inc_by(2);
        m.published_total
            .with_label_values(&["t", "nats", "retry"])
            .inc_by(7);
        m.published_total
            .with_label_values(&["u", "nats", "dead"])
            .inc_by(1);
        assert_eq!(delivered_totals(&m), BTreeMap::from([("t".into(), 7)]));
    }
}
