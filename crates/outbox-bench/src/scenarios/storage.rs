//! The claim's cost with deleted rows behind the live ones, while a transaction holds the xmin
//! horizon (so vacuum may not remove them): `deadrows`.
//!
//! A REPEATABLE READ transaction in the benchmark database takes its snapshot first; rows are
//! then inserted and deleted in chunks, as the relay deletes what it delivered, up to each step
//! of `--dead-rows` (cumulative); after each step 1,000 keyed live rows are enqueued and
//! analysed, and the claim of 500 rows runs 5 times each way (median reported):
//!
//! - `floor off`: the claim from the start of the table (floor 0), which is what every claim
//!   did before the claim floor;
//! - `floor on`: the claim from the floor the relay's advance computes (its two steps run
//!   here, on their own connection, exactly as the relay's maintenance task runs them);
//!
//! each for the unordered and the ordered claim (every slot owned). Dead tuples and the table's
//! size are reported beside them. Each claim is rolled back, so the live rows stay.

use std::time::Instant;

use serde::Serialize;
use sqlx::{Connection, PgConnection};

use super::Opts;
use crate::bench_db::BenchDb;
use crate::stats::median;

#[derive(Debug, Clone, Serialize)]
pub struct DeadRowsStep {
    /// Rows inserted and deleted behind the live ones, cumulative.
    pub deleted_rows: u64,
    /// Dead tuples pg_stat_user_tables counted at the measurement.
    pub dead_tuples: i64,
    pub table_bytes: i64,
    pub index_bytes: i64,
    pub floor: i64,
    /// Median milliseconds of 5 claims of 500 rows.
    pub unordered_floor_off_ms: f64,
    pub unordered_floor_on_ms: f64,
    pub ordered_floor_off_ms: f64,
    pub ordered_floor_on_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadRowsResult {
    pub live_rows: u64,
    pub claim_batch: i64,
    pub steps: Vec<DeadRowsStep>,
    /// Claim time at the last step over the time at 0 deleted rows, floor on (unordered,
    /// ordered).
    pub ratio_last_to_zero_unordered: f64,
    pub ratio_last_to_zero_ordered: f64,
}

const LIVE: u64 = 1_000;
const CLAIM: i64 = 500;
const REPEATS: usize = 5;

/// Inserts and deletes `n` rows in chunks (each chunk one insert and one delete statement).
async fn churn(conn: &mut PgConnection, n: u64, payload_bytes: usize) -> anyhow::Result<()> {
    const CHUNK: u64 = 50_000;
    let mut done = 0;
    while done < n {
        let count = CHUNK.min(n - done);
        sqlx::query(
            "WITH ins AS (
               INSERT INTO outbox.messages (topic, key, payload)
               SELECT 'bench.dead', 'k' || (g % 1000), convert_to(repeat('x', $2), 'UTF8')
                 FROM generate_series(1, $1::bigint) g
               RETURNING id)
             SELECT count(*) FROM ins",
        )
        .bind(count as i64)
        .bind(payload_bytes as i32)
        .execute(&mut *conn)
        .await?;
        sqlx::query("DELETE FROM outbox.messages WHERE topic = 'bench.dead'")
            .execute(&mut *conn)
            .await?;
        done += count;
    }
    Ok(())
}

async fn time_claims(pool: &sqlx::PgPool, ordered: bool, floor: i64) -> anyhow::Result<f64> {
    let slots: Vec<i16> = (0..outbox_relay::store::SLOTS as i16).collect();
    let mut ms = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let mut tx = pool.begin().await?;
        let started = Instant::now();
        let rows = if ordered {
            outbox_relay::store::claim_ordered(&mut tx, CLAIM, &[], &slots, floor).await?
        } else {
            outbox_relay::store::claim(&mut tx, CLAIM, &[], floor).await?
        };
        ms.push(started.elapsed().as_secs_f64() * 1e3);
        tx.rollback().await?;
        anyhow::ensure!(
            rows.len() as i64 == CLAIM,
            "the claim returned {} rows, expected {CLAIM}",
            rows.len()
        );
    }
    Ok(median(&ms))
}

/// Runs the floor's advance until a step raises it (the relay's task does this every 250 ms).
async fn raise_floor(conn: &mut PgConnection) -> anyhow::Result<i64> {
    use outbox_relay::store::floor::{advance, Step};
    let mut pending = None;
    for _ in 0..20 {
        match advance(conn, pending.as_ref()).await? {
            Step::Noted(h) => pending = Some(h),
            Step::Raised { floor, .. } => return Ok(floor),
            Step::Waiting { .. } => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            Step::Unsafe { reason } => anyhow::bail!("the claim floor is off: {reason}"),
        }
    }
    anyhow::bail!("the claim floor did not rise")
}

pub async fn dead_rows(o: &Opts, steps: &[u64]) -> anyhow::Result<DeadRowsResult> {
    let db = o.create_db("deadrows").await?;
    let result = dead_rows_inner(o, &db, steps).await;
    db.drop_db().await;
    result
}

async fn dead_rows_inner(o: &Opts, db: &BenchDb, steps: &[u64]) -> anyhow::Result<DeadRowsResult> {
    // The holder: a snapshot older than every row below.
    let mut holder = PgConnection::connect(&db.url).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut holder)
        .await?;
    sqlx::query("SELECT count(*) FROM outbox.messages")
        .execute(&mut holder)
        .await?;
    let mut worker = PgConnection::connect(&db.url).await?;
    let mut floor_conn = PgConnection::connect(&db.url).await?;
    let mut deleted = 0u64;
    let mut out = Vec::new();
    for &target in steps {
        eprintln!("  deadrows: {target} rows deleted behind the live ones");
        churn(&mut worker, target.saturating_sub(deleted), o.payload_bytes).await?;
        deleted = deleted.max(target);
        sqlx::query(
            "INSERT INTO outbox.messages (topic, key, payload)
             SELECT 'bench.live', 'k' || (g % 100), convert_to(repeat('y', $2), 'UTF8')
               FROM generate_series(1, $1::bigint) g",
        )
        .bind(LIVE as i64)
        .bind(o.payload_bytes as i32)
        .execute(&mut worker)
        .await?;
        sqlx::query("ANALYZE outbox.messages")
            .execute(&mut worker)
            .await?;
        let floor = raise_floor(&mut floor_conn).await?;
        // Statistics reach pg_stat_user_tables within about a second.
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        let (dead_tuples, table_bytes, index_bytes): (i64, i64, i64) = sqlx::query_as(
            "SELECT n_dead_tup, pg_table_size(relid), pg_indexes_size(relid)
               FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass",
        )
        .fetch_one(&mut worker)
        .await?;
        let step = DeadRowsStep {
            deleted_rows: target,
            dead_tuples,
            table_bytes,
            index_bytes,
            floor,
            unordered_floor_off_ms: time_claims(&db.pool, false, 0).await?,
            unordered_floor_on_ms: time_claims(&db.pool, false, floor).await?,
            ordered_floor_off_ms: time_claims(&db.pool, true, 0).await?,
            ordered_floor_on_ms: time_claims(&db.pool, true, floor).await?,
        };
        eprintln!(
            "    unordered {:.1} ms -> {:.1} ms with the floor; ordered {:.1} ms -> {:.1} ms ({} dead tuples)",
            step.unordered_floor_off_ms,
            step.unordered_floor_on_ms,
            step.ordered_floor_off_ms,
            step.ordered_floor_on_ms,
            step.dead_tuples
        );
        // The live rows go too (deleted, so they join the dead ones of the next step).
        sqlx::query("DELETE FROM outbox.messages WHERE topic = 'bench.live'")
            .execute(&mut worker)
            .await?;
        out.push(step);
    }
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    let first = out.first().cloned();
    let last = out.last().cloned();
    let ratio = |f: fn(&DeadRowsStep) -> f64| match (&first, &last) {
        (Some(a), Some(b)) if f(a) > 0.0 => f(b) / f(a),
        _ => 0.0,
    };
    Ok(DeadRowsResult {
        live_rows: LIVE,
        claim_batch: CLAIM,
        ratio_last_to_zero_unordered: ratio(|s| s.unordered_floor_on_ms),
        ratio_last_to_zero_ordered: ratio(|s| s.ordered_floor_on_ms),
        steps: out,
    })
}
