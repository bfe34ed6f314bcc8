//! The admin with a large backlog: `admin`.
//!
//! `--admin-rows` waiting rows (10 million by default) in 100 topics and 100,000 keys, plus
//! 10,000 dead letters; every topic is paused before the relay starts, so the relay claims none
//! and the backlog stays while it serves its admin (a memory sink: no broker involved). Each
//! request is timed `REPEATS` times one after the other, after two warm-ups: the overview (API
//! and page), a search by topic, by key and by message id, the next page deep into a topic, one
//! message, and the dead-letter search. Reported: median and slowest, in milliseconds.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Opts;
use crate::bench_db::BenchDb;
use crate::stats::median;

const TOPICS: i64 = 100;
const KEYS: i64 = 100_000;
const DEAD: i64 = 10_000;
const REPEATS: usize = 20;
const TOKEN: &str = "bench-admin-token-0123456789";

#[derive(Debug, Clone, Serialize)]
pub struct AdminRequest {
    pub name: String,
    pub path: String,
    pub median_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminResult {
    pub waiting_rows: u64,
    pub dead_letters: i64,
    pub table_and_index_bytes: i64,
    pub requests: Vec<AdminRequest>,
}

pub async fn admin(o: &Opts, rows: u64) -> anyhow::Result<AdminResult> {
    let db = o.create_db("admin").await?;
    let result = admin_inner(o, &db, rows).await;
    db.drop_db().await;
    result
}

async fn admin_inner(o: &Opts, db: &BenchDb, rows: u64) -> anyhow::Result<AdminResult> {
    // Paused first: the relay must not drain what is measured.
    sqlx::query(
        "INSERT INTO outbox.topic_pauses (topic, paused_by, reason)
         SELECT 'bench.admin.' || t, 'outbox-bench', 'the admin benchmark'
           FROM generate_series(0, $1::bigint - 1) t",
    )
    .bind(TOPICS)
    .execute(&db.pool)
    .await?;
    const CHUNK: u64 = 500_000;
    let mut loaded = 0u64;
    while loaded < rows {
        let n = CHUNK.min(rows - loaded);
        sqlx::query(
            "INSERT INTO outbox.messages (topic, key, payload)
             SELECT 'bench.admin.' || (g % $2), 'k-' || (g % $3), convert_to(repeat('x', $4), 'UTF8')
               FROM generate_series($1::bigint, $1::bigint + $5::bigint - 1) g",
        )
        .bind(loaded as i64)
        .bind(TOPICS)
        .bind(KEYS)
        .bind(o.payload_bytes as i32)
        .bind(n as i64)
        .execute(&db.pool)
        .await?;
        loaded += n;
        eprintln!("  admin: {loaded} of {rows} rows loaded");
    }
    sqlx::query(
        "INSERT INTO outbox.dead_letters (id, message_id, topic, key, payload, headers, created_at, attempts, last_error, errors)
         SELECT 9000000000 + g, 'dead-' || g, 'bench.admin.' || (g % $2), 'k-' || g, 'x', '{}', now(), 10,
                'broker said no', '[]'
           FROM generate_series(1, $1::bigint) g",
    )
    .bind(DEAD)
    .bind(TOPICS)
    .execute(&db.pool)
    .await?;
    db.vacuum().await?;
    let size: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('outbox.messages')")
        .fetch_one(&db.pool)
        .await?;
    let (some_id, some_message_id): (i64, String) = sqlx::query_as(
        "SELECT id, message_id FROM outbox.messages WHERE id = (SELECT max(id) / 2 FROM outbox.messages)",
    )
    .fetch_one(&db.pool)
    .await?;

    let port = outbox_testkit::names::free_port();
    let config = format!(
        r#"
[database]
url = "{url}"
max_connections = 6

[relay]
workers = 1

[log]
level = "warn"

[http]
listen = "127.0.0.1:{port}"

[admin]
enabled = true

[[admin.users]]
name = "bench"
role = "read"
token = "{TOKEN}"

[sinks.memory]
kind = "memory"
"#,
        url = db.url
    );
    let relay = o.launcher.start_with_config("admin", &config)?;
    let auth = format!("Bearer {TOKEN}");
    let headers = [("Authorization", auth.as_str())];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((200, _)) =
            outbox_testkit::http::get_with(port, "/admin/api/overview", &headers).await
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay's admin did not answer within 2 minutes (log: {})",
            relay.stderr_path.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let requests = [
        ("overview (API)", "/admin/api/overview".to_string()),
        ("overview (page)", "/admin/overview".to_string()),
        (
            "search by topic",
            "/admin/api/messages?topic=bench.admin.7".to_string(),
        ),
        (
            "search by key",
            "/admin/api/messages?key=k-4242".to_string(),
        ),
        (
            "search by message id",
            format!("/admin/api/messages?message_id={some_message_id}"),
        ),
        (
            "a topic's page deep in the backlog",
            format!("/admin/api/messages?topic=bench.admin.7&before_id={some_id}"),
        ),
        (
            "one message",
            format!("/admin/api/messages/waiting/{some_id}"),
        ),
        (
            "dead letters of a topic",
            "/admin/api/messages?source=dead&topic=bench.admin.7".to_string(),
        ),
        (
            "messages page by key",
            "/admin/messages?key=k-4242".to_string(),
        ),
    ];
    let mut out = Vec::new();
    for (name, path) in requests {
        let mut times = Vec::with_capacity(REPEATS);
        for i in 0..REPEATS + 2 {
            let started = Instant::now();
            let answer = outbox_testkit::http::get_with(port, &path, &headers).await;
            let took = started.elapsed().as_secs_f64() * 1000.0;
            match answer {
                Some((200, _)) => {}
                other => anyhow::bail!("GET {path}: {other:?}"),
            }
            if i >= 2 {
                times.push(took);
            }
        }
        let max = times.iter().cloned().fold(0.0, f64::max);
        let med = median(&times);
        eprintln!("  admin: {name}: median {med:.1} ms, slowest {max:.1} ms");
        out.push(AdminRequest {
            name: name.to_string(),
            path,
            median_ms: med,
            max_ms: max,
        });
    }
    relay.stop().await;
    Ok(AdminResult {
        waiting_rows: rows,
        dead_letters: DEAD,
        table_and_index_bytes: size,
        requests: out,
    })
}
