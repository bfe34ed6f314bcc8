//! Measures the lag query (`store::lag`, behind `outbox_pending_messages`,
//! `outbox_oldest_pending_age_seconds` and `outbox-relay status`) with millions of waiting rows,
//! and prints its EXPLAIN (ANALYZE, BUFFERS). The figures in docs/metrics.md come from here.
//!
//! ```text
//! cargo run --example lag_bench -- [ROWS] [TOPICS] [RUNS]     # default 5000000 20 50
//! ```
//!
//! The time is spent in PostgreSQL, so a debug build measures the same as a release build.
//! It creates (and at the end drops) its own database `outbox_lag_bench` next to
//! `DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres), fills it through the
//! same triggers the relay relies on
//! (plus a topic `rare` with 10 recent rows: the worst case for a plan that walks the primary
//! key), and times, for each phase:
//! 1. the lag query with the count deltas as enqueues leave them (one row per statement and topic);
//! 2. after the relay's compaction (one row per topic);
//! 3. after the oldest 10 % of rows were deleted as a relay publishing them would (dead index
//!    entries at the head of every topic's range, before vacuum), then after VACUUM;
//! 4. for contrast, the `COUNT(*) … GROUP BY topic` scan the delta table exists to avoid.

use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, PgConnection, Row};

fn url_with_db(base: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(base)?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

fn stats(mut times: Vec<Duration>) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:.3} ms, p95 {:.3} ms, max {:.3} ms ({} runs)",
        ms(pick(0.5)),
        ms(pick(0.95)),
        ms(*times.last().unwrap()),
        times.len()
    )
}

async fn time_query(
    conn: &mut PgConnection,
    sql: &str,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut times = Vec::with_capacity(runs);
    let mut rows = 0;
    for _ in 0..runs {
        let started = Instant::now();
        rows = sqlx::query(sql).fetch_all(&mut *conn).await?.len();
        times.push(started.elapsed());
    }
    Ok((times, rows))
}

async fn explain(conn: &mut PgConnection, sql: &str) -> anyhow::Result<String> {
    let rows = sqlx::query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"))
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> anyhow::Result<u64> {
        args.get(i)
            .map(|s| s.replace('_', "").parse::<u64>())
            .transpose()
            .map(|v| v.unwrap_or(default))
            .map_err(|e| {
                anyhow::anyhow!(
                    "usage: lag_bench [ROWS] [TOPICS] [RUNS] (whole numbers); argument {}: {e}",
                    i + 1
                )
            })
    };
    let (rows, topics, runs) = (
        arg(0, 5_000_000)?,
        arg(1, 20)?.max(1),
        arg(2, 50)?.max(1) as usize,
    );
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db = "outbox_lag_bench";
    let mut admin = PgConnection::connect(&base).await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await?;
    let url = url_with_db(&base, db)?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    outbox_relay::store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?.detach();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    println!("# lag_bench: {rows} waiting rows over {topics} topics, PostgreSQL {version}\n");

    // Fill through the real triggers, in statements of 50,000 rows (each appends one count delta
    // per topic, as enqueues do), created over the last hour so the oldest age is meaningful.
    let chunk = 50_000u64;
    let started = Instant::now();
    let mut done = 0u64;
    while done < rows {
        let n = chunk.min(rows - done);
        sqlx::query(
            "INSERT INTO outbox.messages (message_id, topic, key, payload, created_at)
             SELECT 'bench-' || g, 'topic_' || (g % $3), 'key-' || (g % 1000),
                    convert_to(repeat('x', 200), 'UTF8'),
                    now() - interval '1 hour' + (g::float8 / $4) * interval '1 hour'
               FROM generate_series($1::bigint, $2::bigint) AS g",
        )
        .bind(done as i64)
        .bind((done + n - 1) as i64)
        .bind(topics as i64)
        .bind(rows as f64)
        .execute(&mut conn)
        .await?;
        done += n;
    }
    // A low-volume topic whose rows are all recent: a plan that walked the primary key from
    // the oldest row would read the whole table to find its first row.
    sqlx::query(
        "INSERT INTO outbox.messages (message_id, topic, payload)
         SELECT 'bench-rare-' || g, 'rare', '\\x00' FROM generate_series(1, 10) AS g",
    )
    .execute(&mut conn)
    .await?;
    let size: String =
        sqlx::query_scalar("SELECT pg_size_pretty(pg_total_relation_size('outbox.messages'))")
            .fetch_one(&mut conn)
            .await?;
    println!(
        "filled in {:.1} s; outbox.messages is {size}",
        started.elapsed().as_secs_f64()
    );
    conn.execute("VACUUM ANALYZE outbox.messages").await?;
    conn.execute("ANALYZE outbox.topic_counts").await?;

    let lag_sql = outbox_relay::store::LAG_SQL;
    let deltas: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.topic_counts")
        .fetch_one(&mut conn)
        .await?;
    let (t, n) = time_query(&mut conn, lag_sql, runs).await?;
    println!(
        "\n## 1. lag query, {deltas} uncompacted count deltas: {} → {n} topics",
        stats(t)
    );

    let mut c = pool.acquire().await?;
    outbox_relay::store::compact_counts(&mut c).await?;
    drop(c);
    conn.execute("ANALYZE outbox.topic_counts").await?;
    let deltas: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.topic_counts")
        .fetch_one(&mut conn)
        .await?;
    let (t, n) = time_query(&mut conn, lag_sql, runs).await?;
    println!(
        "\n## 2. lag query after compaction ({deltas} delta rows): {} → {n} topics",
        stats(t)
    );
    println!("\n```text\n{}\n```", explain(&mut conn, lag_sql).await?);
    let lag = outbox_relay::store::lag(&mut conn).await?;
    let total: i64 = lag.iter().map(|l| l.waiting).sum();
    let oldest = lag.iter().map(|l| l.oldest_age_seconds).fold(0.0, f64::max);
    println!("\nlag says {total} rows waiting, oldest {oldest:.0} s");
    anyhow::ensure!(
        total as u64 == rows + 10,
        "lag reported {total} waiting rows, expected {rows}"
    );

    // A relay publishing the oldest 10 %: their index entries stay (dead) until vacuum.
    let head = (rows / 10) as i64;
    let started = Instant::now();
    sqlx::query(
        "DELETE FROM outbox.messages WHERE id <= (SELECT min(id) FROM outbox.messages) + $1",
    )
    .bind(head)
    .execute(&mut conn)
    .await?;
    println!(
        "\n## 3. deleted the oldest {head} rows in {:.1} s, no vacuum yet",
        started.elapsed().as_secs_f64()
    );
    let first = Instant::now();
    sqlx::query(lag_sql).fetch_all(&mut conn).await?;
    println!(
        "first lag query over the dead index entries: {:.3} ms",
        first.elapsed().as_secs_f64() * 1000.0
    );
    println!("\n```text\n{}\n```", explain(&mut conn, lag_sql).await?);
    let (t, _) = time_query(&mut conn, lag_sql, runs).await?;
    println!("then (dead entries marked by the first scan): {}", stats(t));
    conn.execute("VACUUM ANALYZE outbox.messages").await?;
    let (t, _) = time_query(&mut conn, lag_sql, runs).await?;
    println!("after VACUUM: {}", stats(t));

    let scan = "SELECT topic, count(*), min(created_at) FROM outbox.messages GROUP BY topic";
    let (t, _) = time_query(&mut conn, scan, 3).await?;
    println!(
        "\n## 4. for contrast, COUNT(*) GROUP BY topic over the table: {}",
        stats(t)
    );

    drop(conn);
    pool.close().await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}
