//! The claim floor: an id below which the claims' scan of fresh rows never starts, so that the
//! rows deleted before it cost nothing, whether or not vacuum could remove them
//! (docs/architecture.md, "Storage under a held xmin horizon").
//!
//! The invariant: every live row of `outbox.messages` with `id < floor` is *set aside*
//! (`available_at > created_at`: delayed at enqueue, scheduled for a retry, or re-inserted by
//! `dead retry`), and such rows are found through their partial indexes whatever their id. It
//! holds for ever once it holds: rows never leave the set-aside state, and a new row gets an id
//! from the identity sequence above every value handed out before.
//!
//! Raising the floor is the one delicate step, because ids are handed out at insert and become
//! visible at commit, in a different order. [`Advance`] raises it in two steps:
//!
//! 1. It notes the sequence's last value `L` and the transactions that hold `RowExclusiveLock`
//!    on `outbox.messages`. Every transaction that took an id `<= L` took that lock before its
//!    `nextval` and holds it until it ends, so it has ended already or is one of those noted.
//! 2. On a later tick, once none of the noted transactions is still running, every row with
//!    `id <= L` is either committed (and visible to a new snapshot) or never will be. The new
//!    floor is the oldest live row in `[floor, L]` that is not set aside, or `L + 1`.
//!
//! The scan of step 2 starts at the old floor: each deleted row is walked once by the advance,
//! not by every claim. Nothing here takes a lock a transaction could queue behind.

use sqlx::{PgConnection, Row};

/// The floor as stored: 0 on a fresh schema.
pub async fn read<'c, E: sqlx::PgExecutor<'c>>(conn: E) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT floor FROM outbox.claim_floor")
        .fetch_optional(conn)
        .await
        .map(|f| f.unwrap_or(0))
}

/// Step 1's notes: the sequence's last value and the transactions that could hold ids below it.
#[derive(Debug, Clone, PartialEq)]
pub struct Horizon {
    pub last_id: i64,
    pub writers: Vec<String>,
}

/// What one [`advance`] call did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The floor was raised (or confirmed) to `floor`; a new horizon was noted.
    Raised { floor: i64, horizon: Horizon },
    /// A noted transaction is still running: nothing changed. `oldest_writer_secs` is how long
    /// the oldest of them has been running.
    Waiting { oldest_writer_secs: f64 },
    /// No horizon was noted yet: one is now.
    Noted(Horizon),
    /// The sequence hands out cached values (`CACHE > 1`) or went backwards: a session may
    /// insert an id below any floor, so the floor is reset to 0 and stays there.
    Unsafe { reason: String },
}

/// Notes the sequence's last value, then the transactions that may still insert at or below it.
/// The order matters: a transaction that takes an id after the first read is not needed.
async fn note(conn: &mut PgConnection) -> Result<Result<Horizon, String>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT coalesce(pg_sequence_last_value(s.seqrelid), 0) AS last_id, s.seqcache
           FROM pg_sequence s
          WHERE s.seqrelid = pg_get_serial_sequence('outbox.messages', 'id')::regclass",
    )
    .fetch_one(&mut *conn)
    .await?;
    let (last_id, cache): (i64, i64) = (row.try_get("last_id")?, row.try_get("seqcache")?);
    if cache > 1 {
        return Ok(Err(format!(
            "the id sequence of outbox.messages has CACHE {cache}: sessions hold ids that \
             they insert later, so no floor is safe (ALTER SEQUENCE ... CACHE 1 restores it)"
        )));
    }
    let writers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT virtualtransaction FROM pg_locks
          WHERE locktype = 'relation' AND relation = 'outbox.messages'::regclass
            AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Ok(Horizon { last_id, writers }))
}

/// One step of the floor's advance (see the module documentation); `pending` is the horizon the
/// previous step noted. Runs each statement on its own (no transaction spans the steps).
pub async fn advance(
    conn: &mut PgConnection,
    pending: Option<&Horizon>,
) -> Result<Step, sqlx::Error> {
    let Some(horizon) = pending else {
        return Ok(match note(conn).await? {
            Ok(h) => Step::Noted(h),
            Err(reason) => unsafe_reset(conn, reason).await?,
        });
    };
    if !horizon.writers.is_empty() {
        let (running, oldest_secs): (i64, f64) = sqlx::query_as(
            "SELECT count(DISTINCT l.virtualtransaction),
                    coalesce(extract(epoch FROM now() - min(a.xact_start)), 0)::float8
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'relation' AND l.relation = 'outbox.messages'::regclass
                AND l.virtualtransaction = ANY($1)",
        )
        .bind(&horizon.writers)
        .fetch_one(&mut *conn)
        .await?;
        if running > 0 {
            return Ok(Step::Waiting {
                oldest_writer_secs: oldest_secs.max(0.0),
            });
        }
    }
    // Every row with id <= last_id is committed or never will be: this statement's snapshot,
    // taken now, sees all of them.
    let floor: i64 = sqlx::query_scalar(
        "WITH oldest AS (
                SELECT m.id FROM outbox.messages m
                 WHERE m.id >= (SELECT floor FROM outbox.claim_floor) AND m.id <= $1
                   AND m.available_at <= m.created_at
                 ORDER BY m.id LIMIT 1)
         UPDATE outbox.claim_floor c
            SET floor = greatest(c.floor, coalesce((SELECT id FROM oldest), $1 + 1)),
                raised_at = now()
         RETURNING c.floor",
    )
    .bind(horizon.last_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(match note(conn).await? {
        Ok(next) if next.last_id + 1 < floor => {
            unsafe_reset(
                conn,
                format!(
                    "the id sequence of outbox.messages went back (last value {}, floor {floor}): \
                     it was reset or altered",
                    next.last_id
                ),
            )
            .await?
        }
        Ok(next) => Step::Raised {
            floor,
            horizon: next,
        },
        Err(reason) => unsafe_reset(conn, reason).await?,
    })
}

async fn unsafe_reset(conn: &mut PgConnection, reason: String) -> Result<Step, sqlx::Error> {
    sqlx::query("UPDATE outbox.claim_floor SET floor = 0, raised_at = now() WHERE floor <> 0")
        .execute(&mut *conn)
        .await?;
    Ok(Step::Unsafe { reason })
}

/// The floor as this relay last read it, shared by its workers and its idle poll. A stale value
/// is safe as long as it is not above the stored one, and the stored one only rises (a reset
/// to 0 reaches the relays at their next step).
#[derive(Debug, Default)]
pub struct Shared(std::sync::atomic::AtomicI64);

impl Shared {
    pub fn get(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, floor: i64) {
        self.0.store(floor, std::sync::atomic::Ordering::Relaxed);
    }
}
