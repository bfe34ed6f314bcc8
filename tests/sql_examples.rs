//! The documented enqueue examples for other languages (docs/examples/) run as written against
//! a fresh database and leave the outbox rows they promise.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/examples")
        .join(name)
}

async fn created_rows(db: &TestDb) -> Vec<(String, Option<String>, serde_json::Value)> {
    let rows: Vec<(String, Option<String>, Vec<u8>)> = sqlx::query_as(
        "SELECT topic, key, payload FROM outbox.messages WHERE topic = 'order.created' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, k, p)| {
            (
                t,
                k,
                serde_json::from_slice(&p).expect("payload is the JSON document"),
            )
        })
        .collect()
}

fn run(cmd: &mut Command) -> Option<String> {
    // Never wait on a terminal, and let the database report a lock wait instead of hanging.
    cmd.stdin(std::process::Stdio::null())
        .env("PGOPTIONS", "-c lock_timeout=20s -c statement_timeout=60s")
        .env("PGCONNECT_TIMEOUT", "10");
    match cmd.output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "example failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(e) => {
            println!("SKIPPED: cannot run {:?}: {e}", cmd.get_program());
            None
        }
    }
}

#[tokio::test]
async fn psql_example_enqueues_inside_the_transaction_and_is_idempotent() {
    let db = TestDb::new().await;
    let Some(_) = run(Command::new("psql")
        .arg(&db.url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-f"])
        .arg(example("enqueue.sql")))
    else {
        return;
    };
    let rows = created_rows(&db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2["total_cents"], 4200);
    assert_eq!(
        rows[0].1.as_deref(),
        Some(rows[0].2["order_id"].to_string().as_str())
    );
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.messages WHERE message_id = 'example-audit-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audits, 1, "the repeated message id must be written once");
}

#[tokio::test]
async fn python_psycopg_example_enqueues() {
    let probe = Command::new("python3")
        .args(["-c", "import psycopg"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        println!("SKIPPED: python3 with psycopg is not installed (pip install 'psycopg[binary]')");
        return;
    }
    let db = TestDb::new().await;
    let out = run(Command::new("python3")
        .arg(example("enqueue.py"))
        .env("DATABASE_URL", &db.url))
    .unwrap();
    assert!(out.contains("inserted=True"), "{out}");
    let rows = created_rows(&db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2["total_cents"], 4200);
}

#[tokio::test]
async fn node_pg_example_enqueues() {
    let probe = Command::new("node").args(["-e", "require('pg')"]).output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        println!(
            "SKIPPED: node with the pg package is not available (npm install pg; set NODE_PATH)"
        );
        return;
    }
    let db = TestDb::new().await;
    let out = run(Command::new("node")
        .arg(example("enqueue.js"))
        .env("DATABASE_URL", &db.url))
    .unwrap();
    assert!(out.contains("inserted=true"), "{out}");
    let rows = created_rows(&db).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2["total_cents"], 4200);
}
