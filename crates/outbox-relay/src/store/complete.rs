//! Completing a claimed batch, inside its claim transaction: delete (or retain) the delivered
//! rows, schedule retries with their backoff, move dead rows to `outbox.dead_letters`, park the
//! keys of dead rows (`ordering.on_dead = "park"`). Each is one statement per batch.
//!
//! The statements on `outbox.messages` address the claimed rows by their `ctid` (a TID scan),
//! not by id. An index whose second column is `id` can compete with the primary key for an
//! `id = ANY(…)` lookup: once vacuum had recorded the drained table as empty, the planner costed
//! a full scan of the former `messages_topic_id_idx (topic, id)`, with the id as a condition on
//! its second column, the same as the primary-key lookup, and picked it; under a held xmin
//! horizon that index holds an entry for every deleted row, and the scan read them all, once per
//! id of the batch (docs/architecture.md, "Storage under a held xmin horizon"). The per-topic
//! index is now partial (migrations/0010) so that conditions on `id` alone cannot use it, and a
//! TID scan reads exactly the rows named, whatever indexes the table gains later.
//!
//! This is safe because the claim transaction holds each claimed row's `FOR UPDATE` lock until
//! it ends: nobody else can update or delete the row, and vacuum cannot remove it, so its `ctid`
//! stays put. Within one completion a row is delivered, retried or dead, never two of them, so
//! no statement meets a row that an earlier one of the same transaction updated (and so moved).
//! Each statement returns the ids it touched and [`check_touched`] compares them with the rows
//! it was given: a mismatch cannot happen, but should it, the completion fails and the claim
//! transaction is rolled back (nothing is marked, the rows are claimed again).

use std::time::Duration;

use sqlx::PgConnection;

use crate::message::Locked;

/// [`mark_sent`] without retention: deletes the rows at the ctids `$1`.
pub const MARK_SENT_SQL: &str =
    "DELETE FROM outbox.messages WHERE ctid = ANY($1::tid[]) RETURNING id";

/// [`mark_sent`] with retention: moves the rows at the ctids `$1` to `outbox.sent`.
pub const MARK_SENT_RETAIN_SQL: &str =
    "WITH d AS (DELETE FROM outbox.messages WHERE ctid = ANY($1::tid[]) RETURNING *),
      s AS (INSERT INTO outbox.sent
                   (id, message_id, topic, key, payload, headers, created_at, attempts)
            SELECT id, message_id, topic, key, payload, headers, created_at, attempts FROM d
            ON CONFLICT DO NOTHING)
 SELECT id FROM d";

/// [`schedule_retries`]: per row at ctid `$1[i]`, the next attempt after `$2[i]` ms, the error
/// `$3[i]`. The join on `ctid` is a TID scan per row.
pub const SCHEDULE_RETRIES_SQL: &str = "UPDATE outbox.messages m
    SET attempts = m.attempts + 1,
        available_at = now() + f.delay_ms * interval '1 millisecond',
        last_error = f.error,
        errors = m.errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'attempt', m.attempts + 1, 'error', f.error))
   FROM UNNEST($1::tid[], $2::bigint[], $3::text[]) AS f(ctid, delay_ms, error)
  WHERE m.ctid = f.ctid
RETURNING m.id";

/// [`dead_letter`]: deletes the rows at the ctids `$1` and inserts them into
/// `outbox.dead_letters`, row `$2[i]` with the final error `$3[i]`.
pub const DEAD_LETTER_SQL: &str =
    "WITH f AS (SELECT * FROM UNNEST($2::bigint[], $3::text[]) AS f(id, error)),
      d AS (DELETE FROM outbox.messages m WHERE m.ctid = ANY($1::tid[]) RETURNING m.*),
      i AS (INSERT INTO outbox.dead_letters
                   (id, message_id, topic, key, payload, headers, created_at, attempts, last_error,
                    errors)
            SELECT d.id, d.message_id, d.topic, d.key, d.payload, d.headers, d.created_at,
                   d.attempts + 1, f.error,
                   d.errors || jsonb_build_array(jsonb_build_object(
                       'at', now(), 'attempt', d.attempts + 1, 'error', f.error))
              FROM d JOIN f ON f.id = d.id
            ON CONFLICT (id) DO UPDATE SET
                   message_id = EXCLUDED.message_id, topic = EXCLUDED.topic, key = EXCLUDED.key,
                   payload = EXCLUDED.payload, headers = EXCLUDED.headers,
                   created_at = EXCLUDED.created_at, attempts = EXCLUDED.attempts,
                   last_error = EXCLUDED.last_error,
                   errors = outbox.dead_letters.errors || EXCLUDED.errors, dead_at = now())
 SELECT id FROM d";

fn ctids(rows: &[Locked]) -> Vec<&str> {
    rows.iter().map(|r| r.ctid.as_str()).collect()
}

/// Checks that a completion statement touched exactly `rows` (`touched`: the ids it returned);
/// returns how many. A row missing or a row too many means that a `ctid` no longer addressed
/// the row claimed with it, which the row locks rule out; should it happen all the same, the
/// error fails the completion and the claim transaction is rolled back.
fn check_touched(what: &str, rows: &[Locked], mut touched: Vec<i64>) -> Result<u64, sqlx::Error> {
    let mut expected: Vec<i64> = rows.iter().map(|r| r.id).collect();
    expected.sort_unstable();
    touched.sort_unstable();
    if touched == expected {
        return Ok(touched.len() as u64);
    }
    let missing: Vec<i64> = expected
        .iter()
        .filter(|id| touched.binary_search(id).is_err())
        .copied()
        .collect();
    let unexpected: Vec<i64> = touched
        .iter()
        .filter(|id| expected.binary_search(id).is_err())
        .copied()
        .collect();
    let message = format!(
        "{what} by ctid touched {} rows of outbox.messages instead of the {} claimed \
         (ids not found at their ctid: {}; ids not claimed: {}); the claim transaction is \
         rolled back and its rows will be claimed again",
        touched.len(),
        expected.len(),
        first_ids(&missing),
        first_ids(&unexpected),
    );
    tracing::error!("{message}");
    Err(sqlx::Error::Protocol(message))
}

/// At most ten ids, for a message.
fn first_ids(ids: &[i64]) -> String {
    let shown: Vec<String> = ids.iter().take(10).map(i64::to_string).collect();
    match ids.len() {
        0 => "none".to_string(),
        n if n > 10 => format!("{}, … ({n} in all)", shown.join(", ")),
        _ => shown.join(", "),
    }
}

/// Marks delivered rows sent: deletes them, or moves them to `outbox.sent` when retention is on.
/// Returns the number of rows marked.
pub async fn mark_sent(
    conn: &mut PgConnection,
    rows: &[Locked],
    retain: bool,
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let sql = if retain {
        MARK_SENT_RETAIN_SQL
    } else {
        MARK_SENT_SQL
    };
    let touched: Vec<i64> = sqlx::query_scalar(sql)
        .bind(ctids(rows))
        .fetch_all(conn)
        .await?;
    check_touched("marking delivered rows sent", rows, touched)
}

/// A failed attempt to record: the row becomes available again after `delay`.
#[derive(Debug, Clone)]
pub struct Retry {
    pub row: Locked,
    pub delay: Duration,
    pub error: String,
}

pub async fn schedule_retries(
    conn: &mut PgConnection,
    retries: &[Retry],
) -> Result<(), sqlx::Error> {
    if retries.is_empty() {
        return Ok(());
    }
    let rows: Vec<Locked> = retries.iter().map(|r| r.row.clone()).collect();
    let delays: Vec<i64> = retries.iter().map(|r| r.delay.as_millis() as i64).collect();
    let errors: Vec<&str> = retries.iter().map(|r| r.error.as_str()).collect();
    let touched: Vec<i64> = sqlx::query_scalar(SCHEDULE_RETRIES_SQL)
        .bind(ctids(&rows))
        .bind(&delays)
        .bind(&errors)
        .fetch_all(conn)
        .await?;
    check_touched("scheduling retries", &rows, touched)?;
    Ok(())
}

/// Moves rows to `outbox.dead_letters` with their error history, the final error (`errors[i]`
/// for `rows[i]`) appended. Never drops a row: should a dead letter with the same id exist
/// already (it cannot while `dead retry` moves rows), it is replaced and the two histories are
/// concatenated.
pub async fn dead_letter(
    conn: &mut PgConnection,
    rows: &[Locked],
    errors: &[String],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let touched: Vec<i64> = sqlx::query_scalar(DEAD_LETTER_SQL)
        .bind(ctids(rows))
        .bind(&ids)
        .bind(errors)
        .fetch_all(conn)
        .await?;
    check_touched("dead-lettering rows", rows, touched)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn locked(id: i64) -> Locked {
        Locked {
            id,
            ctid: format!("(0,{id})"),
        }
    }

    #[test]
    fn the_touched_rows_must_be_the_claimed_ones() {
        let rows = [locked(3), locked(1), locked(2)];
        assert_eq!(check_touched("marking", &rows, vec![1, 2, 3]).unwrap(), 3);
        let e = check_touched("marking", &rows, vec![1, 3, 7]).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("ids not found at their ctid: 2;"),
            "{message}"
        );
        assert!(message.contains("ids not claimed: 7)"), "{message}");
        assert!(message.contains("rolled back"), "{message}");
        let many: Vec<Locked> = (1..=12).map(locked).collect();
        let message = check_touched("marking", &many, vec![])
            .unwrap_err()
            .to_string();
        assert!(message.contains("(12 in all)"), "{message}");
    }
}
