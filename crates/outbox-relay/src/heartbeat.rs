//! Live relay instances: the `outbox.relays` heartbeat table (migrations/0003_observability.sql).
//!
//! Every running relay upserts its row every `relay.heartbeat_interval_secs` with the health of
//! its sinks and its publish rate per topic over the last interval, deletes the rows of relays
//! whose heartbeat is older than `relay.relay_expiry_secs`, and counts the live rows into
//! `outbox_relay_instances`. A relay that stops cleanly deletes its own row. `outbox-relay
//! status` reads the table, so an operator sees sink health and publish rates without reaching
//! each relay over HTTP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus::core::Collector;
use sqlx::PgConnection;

use crate::metrics::Metrics;

/// What one relay says about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// A UUIDv7 made at start: unique per process lifetime.
    pub relay_id: String,
    pub hostname: String,
    pub pid: i32,
    pub version: &'static str,
    pub started_at: DateTime<Utc>,
}

impl Identity {
    pub fn new() -> Self {
        Self {
            relay_id: uuid::Uuid::now_v7().to_string(),
            hostname: hostname(),
            pid: std::process::id() as i32,
            version: env!("CARGO_PKG_VERSION"),
            started_at: Utc::now(),
        }
    }
}

impl Default for Identity {
    fn default() -> Self {
        Self::new()
    }
}

fn hostname() -> String {
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

/// One sink's health as a relay reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SinkHealth {
    pub sink: String,
    pub kind: String,
    pub up: bool,
    pub error: Option<String>,
}

/// One row of `outbox.relays`, as `status` reads it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayRow {
    pub relay_id: String,
    pub hostname: String,
    pub pid: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Seconds since the last heartbeat, by the database clock.
    pub heartbeat_age_seconds: f64,
    pub heartbeat_interval_ms: i32,
    pub sinks: Vec<SinkHealth>,
    pub publish_rates: BTreeMap<String, f64>,
}

impl RelayRow {
    /// Whether the relay beat within three of its intervals (one late beat is tolerated).
    pub fn is_fresh(&self) -> bool {
        self.heartbeat_age_seconds
            <= 3.0 * f64::from(self.heartbeat_interval_ms.max(1)) / 1000.0 + 1.0
    }
}

/// Upserts this relay's row.
pub async fn beat(
    conn: &mut PgConnection,
    id: &Identity,
    interval: Duration,
    sinks: &[SinkHealth],
    publish_rates: &BTreeMap<String, f64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox.relays AS r
                (relay_id, hostname, pid, version, started_at, heartbeat_at, heartbeat_interval_ms, sinks, publish_rates)
         VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8)
         ON CONFLICT (relay_id) DO UPDATE
            SET heartbeat_at = now(), heartbeat_interval_ms = EXCLUDED.heartbeat_interval_ms,
                sinks = EXCLUDED.sinks, publish_rates = EXCLUDED.publish_rates",
    )
    .bind(&id.relay_id)
    .bind(&id.hostname)
    .bind(id.pid)
    .bind(id.version)
    .bind(id.started_at)
    .bind(interval.as_millis().min(i32::MAX as u128) as i32)
    .bind(sqlx::types::Json(sinks))
    .bind(sqlx::types::Json(publish_rates))
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the rows of relays whose last heartbeat is older than `expiry`; returns how many.
pub async fn expire(conn: &mut PgConnection, expiry: Duration) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "DELETE FROM outbox.relays WHERE heartbeat_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(expiry.as_millis() as i64)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Relays whose heartbeat is at most `expiry` old.
pub async fn count_live(conn: &mut PgConnection, expiry: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox.relays WHERE heartbeat_at >= now() - $1 * interval '1 millisecond'")
        .bind(expiry.as_millis() as i64)
        .fetch_one(conn)
        .await
}

/// Removes this relay's row (clean shutdown).
pub async fn remove(conn: &mut PgConnection, relay_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM outbox.relays WHERE relay_id = $1")
        .bind(relay_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every row, oldest relay first. Returns an empty list when the table does not exist yet (a
/// database migrated before 0003), so `status` still works there.
pub async fn list(conn: &mut PgConnection) -> Result<Vec<RelayRow>, sqlx::Error> {
    let present: bool = sqlx::query_scalar("SELECT to_regclass('outbox.relays') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !present {
        return Ok(Vec::new());
    }
    let rows: Vec<RelayRowSql> = sqlx::query_as(
        "SELECT relay_id, hostname, pid, version, started_at, heartbeat_at,
                greatest(extract(epoch FROM (now() - heartbeat_at)), 0)::float8 AS heartbeat_age_seconds,
                heartbeat_interval_ms, sinks, publish_rates
           FROM outbox.relays ORDER BY started_at, relay_id",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| RelayRow {
            relay_id: r.relay_id,
            hostname: r.hostname,
            pid: r.pid,
            version: r.version,
            started_at: r.started_at,
            heartbeat_at: r.heartbeat_at,
            heartbeat_age_seconds: r.heartbeat_age_seconds,
            heartbeat_interval_ms: r.heartbeat_interval_ms,
            sinks: r.sinks.0,
            publish_rates: r.publish_rates.0,
        })
        .collect())
}

#[derive(sqlx::FromRow)]
struct RelayRowSql {
    relay_id: String,
    hostname: String,
    pid: i32,
    version: String,
    started_at: DateTime<Utc>,
    heartbeat_at: DateTime<Utc>,
    heartbeat_age_seconds: f64,
    heartbeat_interval_ms: i32,
    sinks: sqlx::types::Json<Vec<SinkHealth>>,
    publish_rates: sqlx::types::Json<BTreeMap<String, f64>>,
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
