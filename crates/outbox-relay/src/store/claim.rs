//! The claims: the oldest claimable rows, locked with `FOR UPDATE SKIP LOCKED` until the claim
//! transaction ends, unordered or ordered (per-key prefix rule, docs/ordering.md); and the idle
//! poll that asks, without locks, whether anything is claimable.
//!
//! The claim holds its row locks for the life of one transaction: claim → publish → mark →
//! commit. If the relay dies, PostgreSQL aborts the transaction and the rows are claimable again
//! at once; if the relay hangs, `idle_in_transaction_session_timeout` (relay.claim_timeout_secs)
//! aborts it. See docs/architecture.md for why this beats a lease column.

use std::collections::BTreeMap;

use sqlx::{PgConnection, Row};

use crate::message::OutboxRow;

/// The number of slots the key space is split into; fixed by migrations/0004_ordering.sql (the
/// stored `slot` column of `outbox.messages`).
pub const SLOTS: usize = 256;

/// One statement, one round trip: the oldest available rows that no other relay holds, locked
/// until this transaction ends. `excluded` holds topics whose sink is down (circuit open).
const CLAIM_SQL: &str = "
SELECT id, message_id, topic, key, payload, headers, created_at, attempts
  FROM outbox.messages
 WHERE available_at <= now()
   AND topic <> ALL($2::text[])
 ORDER BY id
 LIMIT $1
   FOR UPDATE SKIP LOCKED";

/// The topics that have waiting rows and are not `$2` (excluded), from the count deltas (a few
/// rows per topic), each with its share of the batch. The claim while a circuit is open walks
/// these topics' ranges of `messages_topic_id_idx` instead of the primary key: the rows of a sink
/// that has been down for hours pile up at the head of the table, and walking past millions of
/// them on every claim (a heap fetch each, to read the topic) would slow every other sink to a
/// crawl. The range form `topic >= t AND topic <= t ORDER BY topic, id` keeps the planner on that
/// index (see [`LAG_SQL`]).
pub const ACTIVE_TOPICS_SQL: &str = "
active AS MATERIALIZED (
  SELECT topic FROM outbox.topic_counts
   GROUP BY topic HAVING sum(n) > 0 AND topic <> ALL($2::text[])
),
share AS MATERIALIZED (
  SELECT greatest(1, $1 / greatest(1, count(*)))::bigint AS n FROM active
)";

/// [`CLAIM_SQL`] while some topics are excluded: per active topic, its oldest available rows.
static CLAIM_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {ACTIVE_TOPICS_SQL}
SELECT c.* FROM active t CROSS JOIN LATERAL (
  SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.headers, m.created_at, m.attempts
    FROM outbox.messages m
   WHERE m.topic >= t.topic AND m.topic <= t.topic
     AND m.available_at <= now()
   ORDER BY m.topic, m.id
   LIMIT (SELECT n FROM share)
     FOR UPDATE SKIP LOCKED
) c
ORDER BY c.id"
    )
});

/// [`any_available`] while some topics are excluded.
static ANY_AVAILABLE_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {ACTIVE_TOPICS_SQL}
SELECT EXISTS (
  SELECT 1 FROM active t
   WHERE EXISTS (SELECT 1 FROM outbox.messages m
                  WHERE m.topic >= t.topic AND m.topic <= t.topic
                    AND m.available_at <= now()))"
    )
});

pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    excluded: &[String],
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    let sql = if excluded.is_empty() {
        CLAIM_SQL
    } else {
        CLAIM_EXCLUDING_SQL.as_str()
    };
    let rows = sqlx::query(sql)
        .bind(limit)
        .bind(excluded)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(outbox_row).collect()
}

/// Maps a claimed row (the columns of the claim statements) to an [`OutboxRow`].
fn outbox_row(r: &sqlx::postgres::PgRow) -> Result<OutboxRow, sqlx::Error> {
    let headers: sqlx::types::Json<BTreeMap<String, String>> = r.try_get("headers")?;
    Ok(OutboxRow {
        id: r.try_get("id")?,
        message_id: r.try_get("message_id")?,
        topic: r.try_get("topic")?,
        key: r.try_get("key")?,
        payload: r.try_get("payload")?,
        headers: headers.0,
        created_at: r.try_get("created_at")?,
        attempts: r.try_get("attempts")?,
    })
}

/// Whether anything is claimable, without taking locks (the idle poll). `excluded` as in
/// [`claim`], so that rows of a sink whose circuit is open do not wake the workers.
pub async fn any_available<'c, E: sqlx::PgExecutor<'c>>(
    conn: E,
    excluded: &[String],
) -> Result<bool, sqlx::Error> {
    // With topics excluded, per active topic (ACTIVE_TOPICS_SQL, $1 being the unused batch
    // size): the idle poll must not walk a down sink's backlog either.
    let sql = if excluded.is_empty() {
        "SELECT EXISTS (SELECT 1 FROM outbox.messages WHERE available_at <= now() AND topic <> ALL($2::text[]))"
    } else {
        ANY_AVAILABLE_EXCLUDING_SQL.as_str()
    };
    sqlx::query_scalar(sql)
        .bind(1i64)
        .bind(excluded)
        .fetch_one(conn)
        .await
}

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
/// the table is not walked on every claim (see [`ACTIVE_TOPICS_SQL`]). Step 2 is the same rule
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
        active = ACTIVE_TOPICS_SQL,
        blocked = blocked_keys!(),
        cond = cand_condition!(),
        tail = ordered_tail!()
    )
});

/// Claims an ordered batch (see [`ORDERED_CLAIM_SQL`]); `slots` are the slots this relay owns.
pub async fn claim_ordered(
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
    rows.iter().map(outbox_row).collect()
}
