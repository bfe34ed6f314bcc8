//! Measures the relay's claims with millions of waiting rows: the figures of "The claim at 10
//! million rows" in docs/architecture.md come from here.
//!
//! ```text
//! cargo run --release --example claim_bench -- [ROWS] [RUNS]     # default 10000000 30
//! ```
//!
//! It creates (and at the end drops) its own database `outbox_claim_bench` next to
//! `DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres) and fills it, through
//! the relay's migrations and triggers, with ROWS rows of topic `down.t` (the backlog of a sink
//! that has been down for a while: the oldest ids) followed by 10,000 rows of topic `up.t`, both
//! keyed (1,000 and 100 keys). Then it times, in rolled-back transactions, batch 500, the
//! functions the relay runs (`store::claim`, `store::claim_ordered`):
//! 1. nothing excluded (every sink up): the scan stops after the batch;
//! 2. `down.t` excluded (its sink's circuit open): the per-topic form;
//! 3. for contrast, the plain form with `down.t` excluded, which walks the down sink's backlog;
//!
//! each unordered and ordered (all 256 slots owned, and a quarter of them as with 4 relays).

use std::time::{Duration, Instant};

use outbox_relay::store;
use sqlx::{Connection, PgConnection};

const BATCH: i64 = 500;

fn url_with_db(base: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(base)?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1000.0
}

/// Runs `claim` `runs` times, each in a transaction rolled back afterwards; the median and the
/// rows claimed.
async fn time_claims<F>(
    pool: &sqlx::PgPool,
    runs: usize,
    mut claim: F,
) -> anyhow::Result<(f64, usize)>
where
    F: for<'c> FnMut(
        &'c mut PgConnection,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<usize, sqlx::Error>> + Send + 'c>,
    >,
{
    let mut times = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs {
        let mut tx = pool.begin().await?;
        let started = Instant::now();
        rows = claim(&mut tx).await?;
        times.push(started.elapsed());
        tx.rollback().await?;
    }
    Ok((median_ms(times), rows))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows: i64 = args
        .first()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let runs: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(30);
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = "outbox_claim_bench";
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let url = url_with_db(&admin_url, name)?;
    let result = run(&url, rows, runs).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(url: &str, rows: i64, runs: usize) -> anyhow::Result<()> {
    // The relay's own session settings (jit off, timeouts) except the statement timeout, which
    // the fill would exceed.
    let database = outbox_relay::config::DatabaseConfig {
        url: url.to_string(),
        connect_timeout_secs: 10,
        ..Default::default()
    };
    let pool = store::connect(&database, 2, Duration::ZERO).await?;
    store::migrate(&pool).await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 'down.t', 'k' || (g % 1000), '\\x00112233445566778899aabbccddeeff'::bytea
           FROM generate_series(1, $1) g",
    )
    .bind(rows)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 'up.t', 'u' || (g % 100), '\\x00112233445566778899aabbccddeeff'::bytea
           FROM generate_series(1, 10000) g",
    )
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox.messages")
        .execute(&pool)
        .await?;
    let mut conn = pool.acquire().await?;
    store::compact_counts(&mut conn).await?;
    drop(conn);
    println!(
        "filled {rows} rows of down.t + 10000 rows of up.t in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let down = vec!["down.t".to_string()];
    let all_slots: Vec<i16> = (0..256).collect();
    let quarter: Vec<i16> = (0..64).collect();
    println!("{:<51}| median ms | rows", format!("claim (batch {BATCH})"));
    println!("---------------------------------------------------|-----------|-----");
    let report = |what: &str, (ms, n): (f64, usize)| println!("{what:<51}| {ms:>9.2} | {n}");

    report(
        "unordered, nothing excluded",
        time_claims(&pool, runs, |c| {
            Box::pin(async move { Ok(store::claim(c, BATCH, &[], 0).await?.len()) })
        })
        .await?,
    );
    report(
        "ordered (256 slots), nothing excluded",
        time_claims(&pool, runs, |c| {
            let s = all_slots.clone();
            Box::pin(async move { Ok(store::claim_ordered(c, BATCH, &[], &s, 0).await?.len()) })
        })
        .await?,
    );
    report(
        "ordered (64 slots), nothing excluded",
        time_claims(&pool, runs, |c| {
            let s = quarter.clone();
            Box::pin(async move { Ok(store::claim_ordered(c, BATCH, &[], &s, 0).await?.len()) })
        })
        .await?,
    );
    report(
        "unordered, down.t excluded (per-topic form)",
        time_claims(&pool, runs, |c| {
            let d = down.clone();
            Box::pin(async move { Ok(store::claim(c, BATCH, &d, 0).await?.len()) })
        })
        .await?,
    );
    report(
        "ordered (256 slots), down.t excluded (per-topic)",
        time_claims(&pool, runs, |c| {
            let (d, s) = (down.clone(), all_slots.clone());
            Box::pin(async move { Ok(store::claim_ordered(c, BATCH, &d, &s, 0).await?.len()) })
        })
        .await?,
    );
    report(
        "idle poll, down.t excluded (per-topic form)",
        time_claims(&pool, runs, |c| {
            let d = down.clone();
            Box::pin(async move { Ok(store::any_available(c, &d, 0).await? as usize) })
        })
        .await?,
    );
    // The plain form with an exclusion: what the relay ran before the per-topic form. Few
    // runs: each walks the whole backlog.
    let slow_runs = runs.clamp(1, 3);
    report(
        "contrast: plain unordered form, down.t excluded",
        time_claims(&pool, slow_runs, |c| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT id FROM outbox.messages
                      WHERE available_at <= now() AND topic <> ALL('{down.t}'::text[])
                      ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED",
                )
                .fetch_all(c)
                .await?;
                Ok(rows.len())
            })
        })
        .await?,
    );
    pool.close().await;
    Ok(())
}
