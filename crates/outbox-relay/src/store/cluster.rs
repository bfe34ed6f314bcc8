//! The relays of a cluster: the `outbox.relays` rows `status` reads (health, rates), the
//! ordering membership in `outbox.ordering_members` and the slot leases in
//! `outbox.partition_leases`. One heartbeat statement set per beat, in one transaction, so a
//! relay is live in both or in neither. Every time is the database's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};

/// Who a relay is: one id per process lifetime (a UUIDv7 made at start), used for its
/// `outbox.relays` row, its ordering membership and its slot leases alike.
#[derive(Debug, Clone)]
pub struct Identity {
    pub relay_id: String,
    pub hostname: String,
    pub pid: i32,
    pub version: &'static str,
    pub started_at: DateTime<Utc>,
}

/// What a relay reports about itself with each heartbeat.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub sinks: Vec<SinkHealth>,
    pub publish_rates: BTreeMap<String, f64>,
}

/// The ordering part of a heartbeat: the relay takes part in the slot split.
#[derive(Debug, Clone, Copy)]
pub struct Leases {
    /// How long the slots stay this relay's without another heartbeat.
    pub lease: Duration,
    /// The number of slots the key space is split into.
    pub slots: usize,
    /// Whether this relay may hold slots now: false while it cannot publish (its sinks are
    /// down), so that healthy relays take its slots over.
    pub eligible: bool,
}

/// What one heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Beat {
    /// Relays whose `outbox.relays` heartbeat is at most `expiry` old.
    pub live_relays: i64,
    /// Relays in the slot split (ordering members whose lease has not expired).
    pub members: i64,
    /// The number of slots this relay aims to hold.
    pub target: usize,
    /// The slots this relay holds after the beat, sorted.
    pub owned: Vec<i16>,
    /// This relay gave its slots up because a sink it cannot reach is up for another live
    /// ordering member: the keys of that sink's topics go to a relay that can publish them.
    pub yielded: bool,
    /// The topics operators paused (`outbox.topic_pauses`), by name.
    pub paused: Vec<String>,
}

/// One heartbeat, in one transaction: upsert this relay's `outbox.relays` row, delete the rows of
/// relays silent for longer than `expiry`, and with `leases` renew this relay's membership (which
/// is the lease of every slot it holds) and move toward `ceil(slots / members)` slots: release
/// the extras (highest first) or take slots that are free or held by a relay that is no longer
/// a live member (`SKIP LOCKED`, so two relays never fight over one). A slot row is written only
/// when it changes hands.
pub async fn heartbeat(
    conn: &mut PgConnection,
    me: &Identity,
    interval: Duration,
    expiry: Duration,
    report: &Report,
    leases: Option<Leases>,
) -> Result<Beat, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "INSERT INTO outbox.relays AS r
                (relay_id, hostname, pid, version, started_at, heartbeat_at, heartbeat_interval_ms, sinks, publish_rates)
         VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8)
         ON CONFLICT (relay_id) DO UPDATE
            SET heartbeat_at = now(), heartbeat_interval_ms = EXCLUDED.heartbeat_interval_ms,
                sinks = EXCLUDED.sinks, publish_rates = EXCLUDED.publish_rates",
    )
    .bind(&me.relay_id)
    .bind(&me.hostname)
    .bind(me.pid)
    .bind(me.version)
    .bind(me.started_at)
    .bind(interval.as_millis().min(i32::MAX as u128) as i32)
    .bind(sqlx::types::Json(&report.sinks))
    .bind(sqlx::types::Json(&report.publish_rates))
    .execute(&mut *tx)
    .await?;
    expire(&mut tx, expiry).await?;
    let live_relays = count_live(&mut tx, expiry).await?;
    let mut beat = Beat {
        live_relays,
        paused: super::admin::paused_topic_names(&mut tx).await?,
        ..Beat::default()
    };
    if let Some(mut leases) = leases {
        if leases.eligible && down_here_up_elsewhere(&mut tx, &me.relay_id, expiry).await? {
            leases.eligible = false;
            beat.yielded = true;
        }
        let (members, target, owned) = renew_leases(&mut tx, me, leases).await?;
        beat.members = members;
        beat.target = target;
        beat.owned = owned;
    }
    tx.commit().await?;
    Ok(beat)
}

/// Whether a sink this relay reports down is reported up by another live relay that takes part
/// in the slot split: then that relay can publish the keys this one holds and cannot, so this
/// one yields its slots. When a broker is down for every relay, none yields (each still
/// publishes its other sinks' keys).
async fn down_here_up_elsewhere(
    conn: &mut PgConnection,
    relay_id: &str,
    expiry: Duration,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
           SELECT 1
             FROM outbox.relays me CROSS JOIN LATERAL jsonb_array_elements(me.sinks) mine,
                  outbox.relays other CROSS JOIN LATERAL jsonb_array_elements(other.sinks) theirs
            WHERE me.relay_id = $1 AND other.relay_id <> $1
              AND other.heartbeat_at > now() - $2 * interval '1 millisecond'
              AND other.relay_id IN (SELECT m.relay_id FROM outbox.ordering_members m
                                      WHERE m.expires_at > now())
              AND (mine->>'up')::boolean IS NOT TRUE
              AND theirs->>'sink' = mine->>'sink'
              AND (theirs->>'up')::boolean)",
    )
    .bind(relay_id)
    .bind(expiry.as_millis() as i64)
    .fetch_one(conn)
    .await
}

async fn renew_leases(
    conn: &mut PgConnection,
    me: &Identity,
    leases: Leases,
) -> Result<(i64, usize, Vec<i16>), sqlx::Error> {
    let lease_ms = leases.lease.as_millis() as i64;
    if leases.eligible {
        sqlx::query(
            "INSERT INTO outbox.ordering_members (relay_id, hostname, pid, expires_at)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
             ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
        )
        .bind(&me.relay_id)
        .bind(&me.hostname)
        .bind(me.pid)
        .bind(lease_ms)
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query("DELETE FROM outbox.ordering_members WHERE relay_id = $1")
            .bind(&me.relay_id)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("DELETE FROM outbox.ordering_members WHERE expires_at < now()")
        .execute(&mut *conn)
        .await?;
    let members: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.ordering_members")
        .fetch_one(&mut *conn)
        .await?;
    let target = if leases.eligible {
        leases.slots.div_ceil(members.max(1) as usize)
    } else {
        0
    };
    // The leases are renewed by the membership row above: a slot is held while its relay is a
    // live member. Reading the owned slots writes nothing, so a steady heartbeat adds one row
    // version per beat (the member's), not one per slot, to tables that a held xmin horizon
    // keeps from being vacuumed.
    let mut owned: Vec<i16> =
        sqlx::query_scalar("SELECT slot FROM outbox.partition_leases WHERE relay_id = $1")
            .bind(&me.relay_id)
            .fetch_all(&mut *conn)
            .await?;
    owned.sort_unstable();
    if owned.len() > target {
        let extras = owned.split_off(target);
        sqlx::query(
            "UPDATE outbox.partition_leases SET relay_id = NULL, expires_at = '-infinity'
              WHERE relay_id = $1 AND slot = ANY($2)",
        )
        .bind(&me.relay_id)
        .bind(&extras)
        .execute(&mut *conn)
        .await?;
    } else if owned.len() < target {
        let taken: Vec<i16> = sqlx::query_scalar(
            "UPDATE outbox.partition_leases l
                SET relay_id = $1, expires_at = now() + $2 * interval '1 millisecond'
              WHERE l.slot IN (SELECT f.slot FROM outbox.partition_leases f
                                WHERE f.relay_id IS NULL
                                   OR NOT EXISTS (SELECT 1 FROM outbox.ordering_members m
                                                   WHERE m.relay_id = f.relay_id
                                                     AND m.expires_at > now())
                                ORDER BY f.slot LIMIT $3
                                  FOR UPDATE SKIP LOCKED)
             RETURNING l.slot",
        )
        .bind(&me.relay_id)
        .bind(lease_ms)
        .bind((target - owned.len()) as i64)
        .fetch_all(&mut *conn)
        .await?;
        owned.extend(taken);
        owned.sort_unstable();
    }
    Ok((members, target, owned))
}

/// A clean exit: this relay's slots are free at once instead of at lease expiry, and its
/// `outbox.relays` row and membership are gone.
pub async fn leave(conn: &mut PgConnection, relay_id: &str) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("UPDATE outbox.partition_leases SET relay_id = NULL, expires_at = '-infinity' WHERE relay_id = $1")
        .bind(relay_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM outbox.ordering_members WHERE relay_id = $1")
        .bind(relay_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM outbox.relays WHERE relay_id = $1")
        .bind(relay_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
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
