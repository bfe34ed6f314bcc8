//! The ordering SQL: the ordered claim, slot leases and membership, parked keys.
//!
//! The ordered claim is the only place where the order is enforced; slot ownership just keeps
//! the keys of one slot on one relay so that the claim rarely has to hold anything back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use crate::sinks::OutboxRow;

/// The keys with a row waiting for a retry (attempts > 0, not due yet), read once per claim
/// from the partial index `messages_key_retry_idx` (empty unless messages are failing), so the
/// candidates' check is one hash probe each instead of an index probe of the key's head.
macro_rules! blocked_keys {
    () => {
        "blocked AS MATERIALIZED (
  SELECT DISTINCT b.key FROM outbox.messages b
   WHERE b.key IS NOT NULL AND b.attempts > 0 AND b.available_at > now()
)"
    };
}

/// The keyed-row condition of `cand` (rows of table `m`): unkeyed, or in an owned slot with a
/// key that is not parked and has no row waiting for a retry.
macro_rules! cand_condition {
    () => {
        "(m.key IS NULL OR (
           m.slot = ANY($3::smallint[])
       AND NOT EXISTS (SELECT 1 FROM outbox.parked_keys p WHERE p.key = m.key)
       AND NOT EXISTS (SELECT 1 FROM blocked bk WHERE bk.key = m.key)))"
    };
}

/// Steps 2 and 3, the same whichever way `cand` was found. `first_outside` is the oldest row of
/// the key that is not in `cand`, or NULL when nothing before the key's last candidate is
/// missing, found with as little index reading as possible: one probe for a row older than the
/// key's first candidate (then every candidate of the key goes), which settles a key with a
/// single candidate (most keys of a batch); only a key with several candidates reads on from
/// its first one to the first row that is not a candidate.
macro_rules! ordered_tail {
    () => {
        "keys AS (
  SELECT c.key, min(c.id) AS first_id, count(*) AS n
    FROM cand c WHERE c.key IS NOT NULL GROUP BY c.key
),
cut AS (
  SELECT k.key,
         CASE WHEN EXISTS (SELECT 1 FROM outbox.messages e
                            WHERE e.key = k.key AND e.id < k.first_id)
              THEN k.first_id
              WHEN k.n = 1 THEN NULL
              ELSE (SELECT e.id FROM outbox.messages e
                     WHERE e.key = k.key AND e.id > k.first_id
                       AND e.id NOT IN (SELECT c.id FROM cand c)
                     ORDER BY e.id LIMIT 1)
         END AS first_outside
    FROM keys k
)
SELECT c.* FROM cand c
  LEFT JOIN cut k ON k.key = c.key
 WHERE c.key IS NULL OR k.first_outside IS NULL OR c.id < k.first_outside
 ORDER BY c.id"
    };
}

/// Steps 2 and 3 of the plain form, where `cand` is the oldest rows of the whole table in `id`
/// order: every row up to the last candidate was visited by `cand`'s scan, so the rows of the
/// owned slots up to that id that are not candidates (locked by another relay or worker, delayed,
/// waiting for a retry, of an excluded topic, of a parked or blocked key) are found by one
/// second pass over the same `id` range, not by index probes per key. `gaps` holds, per key
/// with such a row, the oldest one; every candidate of the key from it on is dropped. A key's
/// rows all share its slot, so the pass reads the owned slots only; rows above the last
/// candidate cannot precede any candidate, and only keyed candidates need the check, so the pass
/// ends at the last keyed candidate and is skipped (`id <= NULL`) for a batch without keys. The
/// same rule as `ordered_tail`, at a fraction of its cost: one range pass instead of one or two
/// index probes per key of the batch.
macro_rules! ordered_gaps_tail {
    () => {
        "gaps AS (
  SELECT e.key, min(e.id) AS first_outside
    FROM outbox.messages e
   WHERE e.id <= (SELECT max(c.id) FROM cand c WHERE c.key IS NOT NULL)
     AND e.slot = ANY($3::smallint[])
     AND e.id NOT IN (SELECT c.id FROM cand c)
   GROUP BY e.key
)
SELECT c.* FROM cand c
  LEFT JOIN gaps g ON g.key = c.key
 WHERE g.first_outside IS NULL OR c.id < g.first_outside
 ORDER BY c.id"
    };
}

/// One statement, one snapshot, one round trip:
///
/// 1. `cand`: the oldest available rows that are unkeyed or in an owned slot, whose key is not
///    parked and has no row waiting for a retry (`blocked`), locked with `FOR UPDATE SKIP
///    LOCKED`. The blocked-key check keeps a poisoned key's backlog from filling the batch; it
///    is an optimisation, step 2 is the rule.
/// 2. `first_outside`: per key in `cand`, the oldest row of the key that is NOT in `cand`
///    (waiting for a retry, delayed, locked by another relay that still has it in flight, or
///    enqueued after the scan). Rows of the key from that one on are dropped: they stay locked
///    until this transaction ends and are left untouched. Here found by `gaps` (see
///    `ordered_gaps_tail`): rows enqueued after the scan have higher ids than every candidate.
///
/// So every keyed row returned has all earlier rows of its key in the same batch, and the
/// batch returns, per key, a prefix of the key's waiting rows.
const ORDERED_CLAIM_SQL: &str = concat!(
    "
WITH ",
    blocked_keys!(),
    ",
cand AS MATERIALIZED (
  SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.headers, m.created_at, m.attempts
    FROM outbox.messages m
   WHERE m.available_at <= now()
     AND m.topic <> ALL($2::text[])
     AND ",
    cand_condition!(),
    "
   ORDER BY m.id
   LIMIT $1
     FOR UPDATE OF m SKIP LOCKED
),
",
    ordered_gaps_tail!()
);

/// [`ORDERED_CLAIM_SQL`] while some topics are excluded (a sink's circuit is open): `cand` is
/// taken per active topic from `messages_topic_id_idx`, so a down sink's backlog at the head of
/// the table is not walked on every claim (see `db::ACTIVE_TOPICS_SQL`). Step 2 is the same rule
/// with index probes per key (`ordered_tail`): a pass over the `id` range up to the last
/// candidate would walk that backlog after all.
static ORDERED_CLAIM_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {active}, {blocked},
cand AS MATERIALIZED (
  SELECT c.* FROM active t CROSS JOIN LATERAL (
    SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.headers, m.created_at, m.attempts
      FROM outbox.messages m
     WHERE m.topic >= t.topic AND m.topic <= t.topic
       AND m.available_at <= now()
       AND {cond}
     ORDER BY m.topic, m.id
     LIMIT (SELECT n FROM share)
       FOR UPDATE OF m SKIP LOCKED
  ) c
),
{tail}",
        active = crate::db::ACTIVE_TOPICS_SQL,
        blocked = blocked_keys!(),
        cond = cand_condition!(),
        tail = ordered_tail!()
    )
});

/// Claims an ordered batch (see [`ORDERED_CLAIM_SQL`]); `slots` are the slots this relay owns.
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    excluded: &[String],
    slots: &[i16],
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let sql = if excluded.is_empty() {
        ORDERED_CLAIM_SQL
    } else {
        ORDERED_CLAIM_EXCLUDING_SQL.as_str()
    };
    let rows = sqlx::query(sql)
        .bind(limit)
        .bind(excluded)
        .bind(slots)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(crate::db::outbox_row).collect()
}

/// What one heartbeat decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub live_relays: i64,
    pub target: usize,
    pub owned: Vec<i16>,
}

/// One heartbeat, in one transaction: record this relay as live, forget relays whose
/// heartbeat expired, renew this relay's leases, then move toward `ceil(slots / live relays)`
/// slots: release the extras (highest first) or take free and expired slots (`SKIP LOCKED`, so
/// two relays never fight over one). Every time is the database's clock.
pub async fn heartbeat(
    conn: &mut PgConnection,
    relay_id: &str,
    hostname: &str,
    lease: Duration,
    slots: usize,
) -> Result<Beat, sqlx::Error> {
    let lease_ms = lease.as_millis() as i64;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(
        "INSERT INTO outbox.ordering_members (relay_id, hostname, pid, expires_at)
         VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
         ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
    )
    .bind(relay_id)
    .bind(hostname)
    .bind(std::process::id() as i32)
    .bind(lease_ms)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM outbox.ordering_members WHERE expires_at < now()")
        .execute(&mut *tx)
        .await?;
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.ordering_members")
        .fetch_one(&mut *tx)
        .await?;
    let target = slots.div_ceil(live.max(1) as usize);
    let mut owned: Vec<i16> = sqlx::query_scalar(
        "UPDATE outbox.partition_leases SET expires_at = now() + $2 * interval '1 millisecond'
          WHERE relay_id = $1 RETURNING slot",
    )
    .bind(relay_id)
    .bind(lease_ms)
    .fetch_all(&mut *tx)
    .await?;
    owned.sort_unstable();
    if owned.len() > target {
        let extras = owned.split_off(target);
        sqlx::query(
            "UPDATE outbox.partition_leases SET relay_id = NULL, expires_at = '-infinity'
              WHERE relay_id = $1 AND slot = ANY($2)",
        )
        .bind(relay_id)
        .bind(&extras)
        .execute(&mut *tx)
        .await?;
    } else if owned.len() < target {
        let taken: Vec<i16> = sqlx::query_scalar(
            "UPDATE outbox.partition_leases l
                SET relay_id = $1, expires_at = now() + $2 * interval '1 millisecond'
              WHERE l.slot IN (SELECT f.slot FROM outbox.partition_leases f
                                WHERE f.relay_id IS NULL OR f.expires_at < now()
                                ORDER BY f.slot LIMIT $3
                                  FOR UPDATE SKIP LOCKED)
             RETURNING l.slot",
        )
        .bind(relay_id)
        .bind(lease_ms)
        .bind((target - owned.len()) as i64)
        .fetch_all(&mut *tx)
        .await?;
        owned.extend(taken);
        owned.sort_unstable();
    }
    tx.commit().await?;
    Ok(Beat {
        live_relays: live,
        target,
        owned,
    })
}

/// A clean exit: the slots are free at once instead of at lease expiry.
pub async fn leave(conn: &mut PgConnection, relay_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox.partition_leases SET relay_id = NULL, expires_at = '-infinity' WHERE relay_id = $1")
        .bind(relay_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM outbox.ordering_members WHERE relay_id = $1")
        .bind(relay_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// `on_dead = "park"`: parks the keys of the rows just dead-lettered (same transaction).
pub async fn park_dead(conn: &mut PgConnection, dead_ids: &[i64]) -> Result<u64, sqlx::Error> {
    if dead_ids.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
         SELECT d.key, d.topic, d.id, d.message_id, d.last_error
           FROM outbox.dead_letters d
          WHERE d.id = ANY($1) AND d.key IS NOT NULL
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(dead_ids)
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// A key whose oldest waiting message failed and waits for its next attempt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldKey {
    pub key: String,
    pub topic: String,
    pub head_id: i64,
    pub message_id: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Messages of the key waiting behind the head.
    pub behind: i64,
}

/// A key parked after a dead letter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedKey {
    pub key: String,
    pub topic: String,
    pub dead_id: i64,
    pub message_id: String,
    pub reason: String,
    pub parked_at: DateTime<Utc>,
    /// Messages of the key waiting until it is released.
    pub waiting: i64,
}

/// Held-back keys, oldest first. Only a key's head can be waiting for a retry (a later
/// message is never published before an earlier one succeeded), so these are the keyed rows
/// with attempts > 0 that have no earlier row: `messages_key_retry_idx` finds them.
pub async fn held_keys(conn: &mut PgConnection, limit: i64) -> Result<Vec<HeldKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT m.key, m.topic, m.id, m.message_id, m.attempts, m.available_at, m.last_error,
                (SELECT count(*) FROM outbox.messages w WHERE w.key = m.key AND w.id > m.id) AS behind
           FROM outbox.messages m
          WHERE m.key IS NOT NULL AND m.attempts > 0
            AND NOT EXISTS (SELECT 1 FROM outbox.messages e WHERE e.key = m.key AND e.id < m.id)
          ORDER BY m.id
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(HeldKey {
                key: r.try_get("key")?,
                topic: r.try_get("topic")?,
                head_id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                attempts: r.try_get("attempts")?,
                next_attempt_at: r.try_get("available_at")?,
                last_error: r.try_get("last_error")?,
                behind: r.try_get("behind")?,
            })
        })
        .collect()
}

pub async fn parked_keys(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<ParkedKey>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.key, p.topic, p.dead_id, p.message_id, p.reason, p.parked_at,
                (SELECT count(*) FROM outbox.messages w WHERE w.key = p.key) AS waiting
           FROM outbox.parked_keys p
          ORDER BY p.parked_at, p.key
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(ParkedKey {
                key: r.try_get("key")?,
                topic: r.try_get("topic")?,
                dead_id: r.try_get("dead_id")?,
                message_id: r.try_get("message_id")?,
                reason: r.try_get("reason")?,
                parked_at: r.try_get("parked_at")?,
                waiting: r.try_get("waiting")?,
            })
        })
        .collect()
}

/// Held-back and parked keys per topic, for the gauges.
pub async fn key_counts(
    conn: &mut PgConnection,
) -> Result<(Vec<(String, i64)>, Vec<(String, i64)>), sqlx::Error> {
    let held = sqlx::query_as(
        "SELECT topic, count(DISTINCT key) FROM outbox.messages
          WHERE key IS NOT NULL AND attempts > 0 GROUP BY topic",
    )
    .fetch_all(&mut *conn)
    .await?;
    let parked = sqlx::query_as("SELECT topic, count(*) FROM outbox.parked_keys GROUP BY topic")
        .fetch_all(&mut *conn)
        .await?;
    Ok((held, parked))
}

/// Unparks `key`; the dead letter stays. Returns false when the key was not parked.
pub async fn release(conn: &mut PgConnection, key: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("DELETE FROM outbox.parked_keys WHERE key = $1")
        .bind(key)
        .execute(conn)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// What `keys skip` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The head message moved to the dead letters, if the key was held back by a retry.
    pub dead_lettered: Option<String>,
    pub unparked: bool,
}

/// Why `keys skip` could not act.
#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    #[error("key {0:?} is neither held back (its oldest message has not failed) nor parked: nothing to skip")]
    NothingToSkip(String),
    #[error("the oldest message of key {0:?} is being published right now: try again in a moment")]
    InFlight(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Gives up on what blocks `key`: dead-letters its head if the head waits for a retry (the
/// reason says an operator skipped it), and unparks the key. One transaction.
pub async fn skip(conn: &mut PgConnection, key: &str) -> Result<Skipped, SkipError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let head: Option<(i64, String, i32)> = sqlx::query_as(
        "SELECT id, message_id, attempts FROM outbox.messages WHERE key = $1 ORDER BY id LIMIT 1
            FOR UPDATE SKIP LOCKED",
    )
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    let locked_head: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox.messages WHERE key = $1 AND id < coalesce($2, 9223372036854775807))",
    )
    .bind(key)
    .bind(head.as_ref().map(|h| h.0))
    .fetch_one(&mut *tx)
    .await?;
    if locked_head {
        return Err(SkipError::InFlight(key.to_string()));
    }
    let mut dead_lettered = None;
    if let Some((id, message_id, attempts)) = head {
        if attempts > 0 {
            crate::db::dead_letter(
                &mut tx,
                &[id],
                &[
                    "skipped by an operator (outbox-relay keys skip) while waiting for a retry"
                        .to_string(),
                ],
            )
            .await?;
            dead_lettered = Some(message_id);
        }
    }
    let unparked = release(&mut tx, key).await?;
    if dead_lettered.is_none() && !unparked {
        return Err(SkipError::NothingToSkip(key.to_string()));
    }
    tx.commit().await?;
    Ok(Skipped {
        dead_lettered,
        unparked,
    })
}
