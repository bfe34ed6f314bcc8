//! Completing a claimed batch, inside its claim transaction: delete (or retain) the delivered
//! rows, schedule retries with their backoff, move dead rows to `outbox.dead_letters`, park the
//! keys of dead rows (`ordering.on_dead = "park"`). Each is one statement per batch.

use std::time::Duration;

use sqlx::PgConnection;

/// Marks delivered rows sent: deletes them, or moves them to `outbox.sent` when retention is on.
pub async fn mark_sent(
    conn: &mut PgConnection,
    ids: &[i64],
    retain: bool,
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let sql = if retain {
        "WITH d AS (DELETE FROM outbox.messages WHERE id = ANY($1) RETURNING *)
         INSERT INTO outbox.sent (id, message_id, topic, key, payload, headers, created_at, attempts)
         SELECT id, message_id, topic, key, payload, headers, created_at, attempts FROM d
         ON CONFLICT DO NOTHING"
    } else {
        "DELETE FROM outbox.messages WHERE id = ANY($1)"
    };
    Ok(sqlx::query(sql)
        .bind(ids)
        .execute(conn)
        .await?
        .rows_affected())
}

/// A failed attempt to record: the row becomes available again after `delay`.
#[derive(Debug, Clone)]
pub struct Retry {
    pub id: i64,
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
    let ids: Vec<i64> = retries.iter().map(|r| r.id).collect();
    let delays: Vec<i64> = retries.iter().map(|r| r.delay.as_millis() as i64).collect();
    let errors: Vec<&str> = retries.iter().map(|r| r.error.as_str()).collect();
    sqlx::query(
        "UPDATE outbox.messages m
            SET attempts = m.attempts + 1,
                available_at = now() + f.delay_ms * interval '1 millisecond',
                last_error = f.error,
                errors = m.errors || jsonb_build_array(jsonb_build_object(
                    'at', now(), 'attempt', m.attempts + 1, 'error', f.error))
           FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) AS f(id, delay_ms, error)
          WHERE m.id = f.id",
    )
    .bind(&ids)
    .bind(&delays)
    .bind(&errors)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves rows to `outbox.dead_letters` with their error history, the final error appended.
/// Never drops a row: should a dead letter with the same id exist already (it cannot while
/// `dead retry` moves rows), it is replaced and the two histories are concatenated.
pub async fn dead_letter(
    conn: &mut PgConnection,
    ids: &[i64],
    errors: &[String],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH f AS (SELECT * FROM UNNEST($1::bigint[], $2::text[]) AS f(id, error)),
              d AS (DELETE FROM outbox.messages m USING f WHERE m.id = f.id
                    RETURNING m.*, f.error AS final_error)
         INSERT INTO outbox.dead_letters
                (id, message_id, topic, key, payload, headers, created_at, attempts, last_error, errors)
         SELECT id, message_id, topic, key, payload, headers, created_at, attempts + 1, final_error,
                errors || jsonb_build_array(jsonb_build_object(
                    'at', now(), 'attempt', attempts + 1, 'error', final_error))
           FROM d
         ON CONFLICT (id) DO UPDATE SET
                message_id = EXCLUDED.message_id, topic = EXCLUDED.topic, key = EXCLUDED.key,
                payload = EXCLUDED.payload, headers = EXCLUDED.headers, created_at = EXCLUDED.created_at,
                attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
                errors = outbox.dead_letters.errors || EXCLUDED.errors, dead_at = now()",
    )
    .bind(ids)
    .bind(errors)
    .execute(conn)
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
