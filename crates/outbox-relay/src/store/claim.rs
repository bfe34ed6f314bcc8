//! The claims: the oldest claimable rows, locked with `FOR UPDATE SKIP LOCKED` until the claim
//! transaction ends, unordered or ordered (per-key prefix rule, docs/ordering.md); and the idle
//! poll that asks, without locks, whether anything is claimable.
//!
//! The claim holds its row locks for the life of one transaction: claim → publish → mark →
//! commit. If the relay dies, PostgreSQL aborts the transaction and the rows are claimable again
//! at once; if the relay hangs, `idle_in_transaction_session_timeout` (relay.claim_timeout_secs)
//! aborts it. See docs/architecture.md for why this beats a lease column.
//!
//! Every claim reads two sources (docs/architecture.md, "Storage under a held xmin horizon"):
//! the *fresh* rows from the claim floor on (`id >= floor`, [`super::floor`]), so the rows
//! deleted below the floor are never walked, whether or not vacuum could remove them; and the
//! *set-aside* rows (delayed or retried: `available_at > created_at`) that are due, from their
//! partial index by due time, whatever their id. Every live row below the floor is set aside, so
//! the two together are every claimable row.

use std::collections::BTreeMap;

use sqlx::postgres::{PgRow, PgTypeInfo};
use sqlx::{Column, PgConnection, Row};

use crate::message::{Claimed, OutboxRow};

/// The number of slots the key space is split into; fixed by migrations/0004_ordering.sql (the
/// stored `slot` column of `outbox.messages`).
pub const SLOTS: usize = 256;

/// The columns every claim returns (of table `m`), with the row's `ctid` as text (sqlx has no
/// `tid` type): the completion statements address the claimed rows by it ([`super::complete`]).
/// A `FOR UPDATE` lock taken on a row that a concurrent transaction has updated locks its newest
/// version, and the row returned, `ctid` included, is that version.
macro_rules! claim_columns {
    () => {
        "m.id, m.ctid::text AS ctid, m.message_id, m.topic, m.key, m.payload, m.headers, \
         m.created_at, m.attempts"
    };
}

/// The due set-aside rows below the floor `$3` (rows at or above it are the fresh scan's),
/// oldest due first, from `messages_set_aside_due_idx`. `$cond` narrows them further.
macro_rules! due_set_aside {
    ($cond:expr) => {
        concat!(
            "SELECT ",
            claim_columns!(),
            " FROM outbox.messages m
   WHERE m.available_at > m.created_at AND m.available_at <= now() AND m.id < $3
     AND m.topic <> ALL($2::text[])
     AND ",
            $cond,
            "
   ORDER BY m.available_at, m.id
   LIMIT $1
     FOR UPDATE OF m SKIP LOCKED"
        )
    };
}

/// The fresh rows from the floor `$3` on, in id order, as many as the batch has room for after
/// `due`.
macro_rules! fresh_rows {
    ($cond:expr) => {
        concat!(
            "SELECT ",
            claim_columns!(),
            " FROM outbox.messages m
   WHERE m.id >= $3 AND m.available_at <= now()
     AND m.topic <> ALL($2::text[])
     AND ",
            $cond,
            "
   ORDER BY m.id
   LIMIT (SELECT $1 - count(*) FROM due)
     FOR UPDATE OF m SKIP LOCKED"
        )
    };
}

/// One statement, one round trip: the oldest available rows that no other relay holds, locked
/// until this transaction ends. `$2` holds topics whose sink is down (circuit open), `$3` is
/// the claim floor.
const CLAIM_SQL: &str = concat!(
    "
WITH due AS MATERIALIZED (
  ",
    due_set_aside!("true"),
    "
), fresh AS MATERIALIZED (
  ",
    fresh_rows!("true"),
    "
)
SELECT * FROM due UNION ALL SELECT * FROM fresh
 ORDER BY id"
);

/// The topics that have waiting rows and are not `$2` (excluded), from the count deltas (a few
/// rows per topic), each with its share of the batch. The claim while a circuit is open walks
/// these topics' ranges of `messages_by_topic_idx` instead of the primary key: the rows of a sink
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

/// The fresh rows of each active topic (`t`, see [`ACTIVE_TOPICS_SQL`]) from the floor `$3` on:
/// the row comparison starts the scan of `messages_by_topic_idx` at `(topic, floor)`.
macro_rules! fresh_rows_per_topic {
    ($cond:expr) => {
        concat!(
            "SELECT c.* FROM active t CROSS JOIN LATERAL (
    SELECT ",
            claim_columns!(),
            " FROM outbox.messages m
     WHERE (m.topic, m.id) >= (t.topic, $3) AND m.topic <= t.topic
       AND m.available_at <= now()
       AND ",
            $cond,
            "
     ORDER BY m.topic, m.id
     LIMIT (SELECT n FROM share)
       FOR UPDATE OF m SKIP LOCKED
  ) c"
        )
    };
}

/// [`CLAIM_SQL`] while some topics are excluded: the due set-aside rows, and per active topic its
/// oldest fresh rows.
static CLAIM_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {ACTIVE_TOPICS_SQL},
due AS MATERIALIZED (
  {due}
), fresh AS MATERIALIZED (
  {fresh}
)
SELECT * FROM due UNION ALL SELECT * FROM fresh
 ORDER BY id",
        due = due_set_aside!("true"),
        fresh = fresh_rows_per_topic!("true"),
    )
});

/// [`any_available`] while some topics are excluded.
static ANY_AVAILABLE_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {ACTIVE_TOPICS_SQL}
SELECT EXISTS (
  SELECT 1 FROM active t
   WHERE EXISTS (SELECT 1 FROM outbox.messages m
                  WHERE (m.topic, m.id) >= (t.topic, $3) AND m.topic <= t.topic
                    AND m.available_at <= now()))
    OR {DUE_EXISTS}"
    )
});

/// Claims an unordered batch of at most `limit` rows, none of the topics `excluded`; `floor` is
/// the claim floor ([`super::floor`]; 0 scans from the start).
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    excluded: &[String],
    floor: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let sql = if excluded.is_empty() {
        CLAIM_SQL
    } else {
        CLAIM_EXCLUDING_SQL.as_str()
    };
    let rows = sqlx::query(sql)
        .bind(limit)
        .bind(excluded)
        .bind(floor)
        .fetch_all(&mut *conn)
        .await?;
    claimed_all(&rows)
}

/// The columns of `claim_columns!`, in their order, with their types: [`claimed`] reads them by
/// position and without a type check per value (the look-up by name and the check per column
/// and row were a tenth of the relay's CPU per message); [`claimed_all`] checks names and types
/// once per batch instead.
const COLUMNS: [(&str, Compatible); 9] = [
    ("id", compatible::<i64>),
    ("ctid", compatible::<String>),
    ("message_id", compatible::<String>),
    ("topic", compatible::<String>),
    ("key", compatible::<String>),
    ("payload", compatible::<Vec<u8>>),
    ("headers", compatible::<sqlx::types::JsonValue>),
    ("created_at", compatible::<chrono::DateTime<chrono::Utc>>),
    ("attempts", compatible::<i32>),
];

/// Whether a column's type decodes as the Rust type it is read as.
type Compatible = fn(&PgTypeInfo) -> bool;

fn compatible<T: sqlx::Type<sqlx::Postgres>>(ty: &PgTypeInfo) -> bool {
    T::compatible(ty)
}

/// Maps the rows of a claim statement to [`Claimed`] rows, after checking once that the
/// statement returned the columns of `claim_columns!` in their order, with their types.
fn claimed_all(rows: &[PgRow]) -> Result<Vec<Claimed>, sqlx::Error> {
    if let Some(first) = rows.first() {
        let columns = first.columns();
        let fits = columns.len() == COLUMNS.len()
            && columns
                .iter()
                .zip(COLUMNS)
                .all(|(c, (name, ok))| c.name() == name && ok(c.type_info()));
        if !fits {
            return Err(sqlx::Error::Protocol(format!(
                "a claim statement returned the columns {:?} instead of {:?}",
                columns
                    .iter()
                    .map(|c| format!("{} {}", c.name(), c.type_info()))
                    .collect::<Vec<_>>(),
                COLUMNS.map(|(name, _)| name)
            )));
        }
    }
    rows.iter().map(claimed).collect()
}

/// Maps a claimed row (the columns of the claim statements, checked by [`claimed_all`]) to a
/// [`Claimed`].
fn claimed(r: &PgRow) -> Result<Claimed, sqlx::Error> {
    let row = OutboxRow {
        id: r.try_get_unchecked(0)?,
        message_id: r.try_get_unchecked(2)?,
        topic: r.try_get_unchecked(3)?,
        key: r.try_get_unchecked(4)?,
        payload: r.try_get_unchecked(5)?,
        headers: headers(r, 6)?,
        created_at: r.try_get_unchecked(7)?,
        attempts: r.try_get_unchecked(8)?,
    };
    Ok(Claimed {
        row,
        ctid: r.try_get_unchecked(1)?,
    })
}

/// The `jsonb` headers at column `i`; the common `{}` without a JSON parse (binary `jsonb` is a
/// version byte, 1, and the text).
fn headers(r: &PgRow, i: usize) -> Result<BTreeMap<String, String>, sqlx::Error> {
    let raw = r.try_get_raw(i)?;
    if matches!(raw.as_bytes(), Ok(b"\x01{}" | b"{}")) {
        return Ok(BTreeMap::new());
    }
    let headers: sqlx::types::Json<BTreeMap<String, String>> = r.try_get_unchecked(i)?;
    Ok(headers.0)
}

/// Whether a due set-aside row below the floor `$3` exists (not of the topics `$2`).
const DUE_EXISTS: &str = "EXISTS (
  SELECT 1 FROM outbox.messages d
   WHERE d.available_at > d.created_at AND d.available_at <= now() AND d.id < $3
     AND d.topic <> ALL($2::text[]))";

/// [`any_available`] with nothing excluded: the fresh scan from the floor (in id order, so that
/// the planner walks the primary key from `$3` rather than the table from its start), or a due
/// set-aside row.
static ANY_AVAILABLE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT EXISTS (SELECT 1 FROM outbox.messages m
                 WHERE m.id >= $3 AND m.available_at <= now() AND m.topic <> ALL($2::text[])
                 ORDER BY m.id LIMIT 1)
            OR {DUE_EXISTS}"
    )
});

/// Whether anything is claimable, without taking locks (the idle poll). `excluded` and `floor`
/// as in [`claim`], so that rows of a sink whose circuit is open do not wake the workers.
pub async fn any_available<'c, E: sqlx::PgExecutor<'c>>(
    conn: E,
    excluded: &[String],
    floor: i64,
) -> Result<bool, sqlx::Error> {
    // With topics excluded, per active topic (ACTIVE_TOPICS_SQL, $1 being the unused batch
    // size): the idle poll must not walk a down sink's backlog either.
    let sql = if excluded.is_empty() {
        ANY_AVAILABLE_SQL.as_str()
    } else {
        ANY_AVAILABLE_EXCLUDING_SQL.as_str()
    };
    sqlx::query_scalar(sql)
        .bind(1i64)
        .bind(excluded)
        .bind(floor)
        .fetch_one(conn)
        .await
}

/// The keys with a row waiting for a retry (attempts > 0, not due yet), read once per claim
/// from the set-aside rows that are not due yet (`messages_set_aside_due_idx` from `now()` on:
/// empty unless messages are failing or scheduled), so the candidates' check is one hash probe
/// each instead of an index probe of the key's head.
macro_rules! blocked_keys {
    () => {
        "blocked AS MATERIALIZED (
  SELECT DISTINCT b.key FROM outbox.messages b
   WHERE b.available_at > now() AND b.available_at > b.created_at
     AND b.key IS NOT NULL AND b.attempts > 0
)"
    };
}

/// The keyed-row condition of `cand` (rows of table `m`): unkeyed, or in an owned slot (`$4`)
/// with a key that is not parked and has no row waiting for a retry.
macro_rules! cand_condition {
    () => {
        "(m.key IS NULL OR (
           m.slot = ANY($4::smallint[])
       AND NOT EXISTS (SELECT 1 FROM outbox.parked_keys p WHERE p.key = m.key)
       AND NOT EXISTS (SELECT 1 FROM blocked bk WHERE bk.key = m.key)))"
    };
}

/// Per key of `cand`, its oldest set-aside row below the floor that is not a candidate (from
/// `messages_set_aside_key_idx`: one probe of a mostly empty index per key). Below the floor
/// every live row is set aside, so with this, step 2 needs to read nothing under the floor.
macro_rules! set_aside_gaps {
    () => {
        "SELECT k.key, a.id FROM (SELECT DISTINCT c.key FROM cand c WHERE c.key IS NOT NULL) k
      CROSS JOIN LATERAL (
        SELECT e.id FROM outbox.messages e
         WHERE e.key = k.key AND e.available_at > e.created_at AND e.id < $3
           AND e.id NOT IN (SELECT c.id FROM cand c)
         ORDER BY e.id LIMIT 1) a"
    };
}

/// Step 1, the candidates: the due set-aside rows below the floor, then the fresh rows from it
/// on, that are unkeyed or in an owned slot, whose key is not parked and has no row waiting for
/// a retry (`blocked`), locked with `FOR UPDATE SKIP LOCKED`. `$fresh` is [`fresh_rows`] or
/// [`fresh_rows_per_topic`].
macro_rules! ordered_cand {
    ($fresh:expr) => {
        concat!(
            "due AS MATERIALIZED (
  ",
            due_set_aside!(cand_condition!()),
            "
), fresh AS MATERIALIZED (
  ",
            $fresh,
            "
), cand AS MATERIALIZED (
  SELECT * FROM due UNION ALL SELECT * FROM fresh
)"
        )
    };
}

/// Steps 2 and 3 with index probes per key, for [`ORDERED_CLAIM_EXCLUDING_SQL`]. `first_outside`
/// is the oldest row of the key that is not in `cand`, or NULL when nothing before the key's last
/// candidate is missing, found with as little index reading as possible: one probe for a row
/// older than the key's first candidate from the floor on, and one for a set-aside row below
/// it (then every candidate of the key goes), which settles a key with a single candidate (most
/// keys of a batch); only a key with several candidates reads on from its first one to the first
/// row that is not a candidate.
macro_rules! ordered_tail {
    () => {
        "keys AS (
  SELECT c.key, min(c.id) AS first_id, count(*) AS n
    FROM cand c WHERE c.key IS NOT NULL GROUP BY c.key
),
cut AS (
  SELECT k.key,
         CASE WHEN EXISTS (SELECT 1 FROM outbox.messages e
                            WHERE e.key = k.key AND e.id >= $3 AND e.id < k.first_id)
                OR EXISTS (SELECT 1 FROM outbox.messages e
                            WHERE e.key = k.key AND e.available_at > e.created_at
                              AND e.id < least(k.first_id, $3))
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

/// Steps 2 and 3 of the plain form, where the fresh candidates are the oldest fresh rows of the
/// whole table in `id` order: every row from the floor up to the last candidate was visited by
/// that scan, so the rows of the owned slots in that range that are not candidates (locked by
/// another relay or worker, delayed, waiting for a retry, of an excluded topic, of a parked or
/// blocked key) are found by one second pass over the same `id` range, not by index probes per
/// key; below the floor, only set-aside rows can precede a candidate ([`set_aside_gaps`]).
/// `gaps` holds, per key with such a row, the oldest one; every candidate of the key from it on
/// is dropped. A key's rows all share its slot, so the pass reads the owned slots only; rows
/// above the last candidate cannot precede any candidate, and only keyed candidates need the
/// check, so the pass ends at the last keyed candidate and is skipped (`id <= NULL`) for a batch
/// without keys. The same rule as `ordered_tail`, at a fraction of its cost.
macro_rules! ordered_gaps_tail {
    () => {
        concat!(
            "gaps AS (
  SELECT x.key, min(x.id) AS first_outside FROM (
    SELECT e.key, e.id FROM outbox.messages e
     WHERE e.id >= $3
       AND e.id <= (SELECT max(c.id) FROM cand c WHERE c.key IS NOT NULL)
       AND e.slot = ANY($4::smallint[])
       AND e.id NOT IN (SELECT c.id FROM cand c)
    UNION ALL
    ",
            set_aside_gaps!(),
            "
  ) x GROUP BY x.key
)
SELECT c.* FROM cand c
  LEFT JOIN gaps g ON g.key = c.key
 WHERE g.first_outside IS NULL OR c.id < g.first_outside
 ORDER BY c.id"
        )
    };
}

/// One statement, one snapshot, one round trip:
///
/// 1. `cand`: the candidates ([`ordered_cand`]). The blocked-key check keeps a poisoned key's
///    backlog from filling the batch; it is an optimisation, step 2 is the rule.
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
",
    ordered_cand!(fresh_rows!(cand_condition!())),
    ",
",
    ordered_gaps_tail!()
);

/// [`ORDERED_CLAIM_SQL`] while some topics are excluded (a sink's circuit is open): the fresh
/// candidates are taken per active topic from `messages_by_topic_idx`, so a down sink's backlog
/// at the head of the table is not walked on every claim (see [`ACTIVE_TOPICS_SQL`]). Step 2 is
/// the same rule with index probes per key (`ordered_tail`): a pass over the `id` range up to
/// the last candidate would walk that backlog after all.
static ORDERED_CLAIM_EXCLUDING_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {active}, {blocked},
{cand},
{tail}",
        active = ACTIVE_TOPICS_SQL,
        blocked = blocked_keys!(),
        cand = ordered_cand!(fresh_rows_per_topic!(cand_condition!())),
        tail = ordered_tail!()
    )
});

/// Claims an ordered batch (see [`ORDERED_CLAIM_SQL`]); `slots` are the slots this relay owns,
/// `floor` the claim floor ([`super::floor`]; 0 scans from the start).
pub async fn claim_ordered(
    conn: &mut PgConnection,
    limit: i64,
    excluded: &[String],
    slots: &[i16],
    floor: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let sql = if excluded.is_empty() {
        ORDERED_CLAIM_SQL
    } else {
        ORDERED_CLAIM_EXCLUDING_SQL.as_str()
    };
    let rows = sqlx::query(sql)
        .bind(limit)
        .bind(excluded)
        .bind(floor)
        .bind(slots)
        .fetch_all(&mut *conn)
        .await?;
    claimed_all(&rows)
}
