//! The SQL enqueue API (docs/enqueue-sql.md): the documented examples for other languages
//! (docs/examples/) run as written against a fresh database and leave the outbox rows they
//! promise, through every supported write path (`outbox.enqueue` with bytes, text and jsonb,
//! `outbox.enqueue_many`, a plain INSERT); and the limits and guarantees the page states hold.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/examples")
        .join(name)
}

/// `(topic, key, message_id, payload as JSON, content-type header)` of every row with a JSON
/// payload, in id order.
type Row = (
    String,
    Option<String>,
    String,
    serde_json::Value,
    ContentType,
);
type ContentType = Option<String>;
/// [`Row`] with the payload as stored.
type RawRow = (String, Option<String>, String, Vec<u8>, ContentType);

async fn rows(db: &TestDb) -> Vec<Row> {
    let rows: Vec<RawRow> = sqlx::query_as(
        "SELECT topic, key, message_id, payload, headers->>'content-type' FROM outbox.messages
          WHERE topic <> 'order.audit' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, k, m, p, c)| {
            let json = serde_json::from_slice(&p)
                .unwrap_or_else(|e| panic!("payload of {m} is not JSON ({e}): {p:?}"));
            (t, k, m, json, c)
        })
        .collect()
}

/// What every example writes: its order's four messages (one through each write path), the
/// three order lines written once although enqueued twice.
async fn assert_example_rows(db: &TestDb) {
    let rows = rows(db).await;
    let of = |topic: &str| rows.iter().filter(|r| r.0 == topic).collect::<Vec<_>>();
    let created = of("order.created");
    assert_eq!(created.len(), 1, "{rows:?}");
    assert_eq!(created[0].3["total_cents"], 4200);
    let order_id = created[0].3["order_id"].to_string();
    assert_eq!(created[0].1.as_deref(), Some(order_id.as_str()));

    // outbox.enqueue with a jsonb payload: the JSON text, content-type added.
    let paid = of("order.paid");
    assert_eq!(paid.len(), 1, "{rows:?}");
    assert_eq!(paid[0].3["paid_cents"], 4200);
    assert_eq!(paid[0].1.as_deref(), Some(order_id.as_str()));
    assert_eq!(paid[0].4.as_deref(), Some("application/json"));

    // outbox.enqueue_many, called twice with the same message ids: three rows, in array order.
    let lines = of("order.line_added");
    let got: Vec<(&str, i64, Option<&str>)> = lines
        .iter()
        .map(|r| (r.2.as_str(), r.3["line"].as_i64().unwrap(), r.1.as_deref()))
        .collect();
    let key = Some(order_id.as_str());
    assert_eq!(
        got,
        [
            ("example-line-1", 1, key),
            ("example-line-2", 2, key),
            ("example-line-3", 3, key)
        ],
        "{rows:?}"
    );

    // The plain INSERT.
    let archived = of("order.archived");
    assert_eq!(archived.len(), 1, "{rows:?}");
    assert_eq!(archived[0].2, "example-archived-1");
    assert_eq!(archived[0].3["order_id"].to_string(), order_id);
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
            skip::skipped(
                "an SQL example",
                &format!(
                    "cannot run {:?} ({e}): install the PostgreSQL client (Debian: apt-get install postgresql-client) or run scripts/test",
                    cmd.get_program()
                ),
            );
            None
        }
    }
}

#[tokio::test]
async fn psql_example_enqueues_inside_the_transaction_and_is_idempotent() {
    let db = TestDb::new().await;
    let Some(out) = run(Command::new("psql")
        .arg(&db.url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-f"])
        .arg(example("enqueue.sql")))
    else {
        return;
    };
    assert_example_rows(&db).await;
    let audits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox.messages WHERE message_id = 'example-audit-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audits, 1, "the repeated message id must be written once");
    // The second enqueue_many call answered inserted = false for each line.
    assert_eq!(out.matches("| example-line-").count(), 6, "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("| example-line-") && l.trim_end().ends_with("| f"))
            .count(),
        3,
        "{out}"
    );
}

#[tokio::test]
async fn python_psycopg_example_enqueues() {
    let probe = Command::new("python3")
        .args(["-c", "import psycopg"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        skip::skipped(
            "python_psycopg_example_enqueues",
            "python3 with psycopg is not installed (pip install 'psycopg[binary]', or run scripts/test)",
        );
        return;
    }
    let db = TestDb::new().await;
    let out = run(Command::new("python3")
        .arg(example("enqueue.py"))
        .env("DATABASE_URL", &db.url))
    .unwrap();
    assert!(out.contains("inserted=True"), "{out}");
    assert_eq!(out.matches("inserted=False").count(), 3, "{out}");
    assert_example_rows(&db).await;
}

#[tokio::test]
async fn node_pg_example_enqueues() {
    let probe = Command::new("node").args(["-e", "require('pg')"]).output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        skip::skipped(
            "node_pg_example_enqueues",
            "node with the pg package is not available (npm install pg and set NODE_PATH, or run scripts/test)",
        );
        return;
    }
    let db = TestDb::new().await;
    let out = run(Command::new("node")
        .arg(example("enqueue.js"))
        .env("DATABASE_URL", &db.url))
    .unwrap();
    assert!(out.contains("inserted=true"), "{out}");
    assert_eq!(out.matches("inserted=false").count(), 3, "{out}");
    assert_example_rows(&db).await;
}

/// The database's error for `sql`: its constraint name (if any) and message.
async fn refused(db: &TestDb, sql: &str) -> (Option<String>, String) {
    match sqlx::query(sql).execute(&db.pool).await {
        Ok(_) => panic!("accepted: {sql}"),
        Err(sqlx::Error::Database(e)) => (e.constraint().map(String::from), e.message().into()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

#[tokio::test]
async fn topic_and_message_id_limits_count_bytes() {
    let db = TestDb::new().await;
    // 249 and 200 bytes, of one-byte and of two-byte characters: accepted.
    for (topic, id) in [
        ("t".repeat(249), "i".repeat(200)),
        ("é".repeat(124), "é".repeat(100)),
    ] {
        sqlx::query("SELECT * FROM outbox.enqueue($1, 'x'::text, p_message_id => $2)")
            .bind(&topic)
            .bind(&id)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    // 200 characters but 400 bytes; 225 characters but 450 bytes: refused, by name.
    let (constraint, _) = refused(
        &db,
        &format!(
            "SELECT * FROM outbox.enqueue('{}', 'x'::text)",
            "é".repeat(200)
        ),
    )
    .await;
    assert_eq!(constraint.as_deref(), Some("messages_topic_length"));
    let (constraint, _) = refused(
        &db,
        &format!(
            "SELECT * FROM outbox.enqueue('t', 'x'::text, p_message_id => '{}')",
            "é".repeat(225)
        ),
    )
    .await;
    assert_eq!(constraint.as_deref(), Some("messages_message_id_length"));
    // A plain INSERT meets the same constraints, and so does outbox.enqueue_many.
    let (constraint, _) = refused(
        &db,
        &format!(
            "INSERT INTO outbox.messages (topic, payload) VALUES ('{}', 'x')",
            "é".repeat(125)
        ),
    )
    .await;
    assert_eq!(constraint.as_deref(), Some("messages_topic_length"));
    let (constraint, _) = refused(
        &db,
        &format!(
            "SELECT * FROM outbox.enqueue_many('t', ARRAY['x']::text[], p_message_ids => ARRAY['{}'])",
            "é".repeat(101)
        ),
    )
    .await;
    assert_eq!(constraint.as_deref(), Some("messages_message_id_length"));
    // The migration validated both constraints (they were added NOT VALID, then validated).
    let validated: Vec<(String, bool)> = sqlx::query_as(
        "SELECT conname::text, convalidated FROM pg_constraint
          WHERE conrelid = 'outbox.messages'::regclass
            AND conname IN ('messages_topic_length', 'messages_message_id_length') ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        validated,
        [
            ("messages_message_id_length".to_string(), true),
            ("messages_topic_length".to_string(), true)
        ]
    );
}

#[tokio::test]
async fn enqueue_takes_a_jsonb_payload() {
    let db = TestDb::new().await;
    let (inserted,): (bool,) =
        sqlx::query_as(r#"SELECT inserted FROM outbox.enqueue('t', '{"a":1}'::jsonb)"#)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(inserted);
    // A content-type of the caller's own wins over the default one.
    sqlx::query(r#"SELECT * FROM outbox.enqueue('u', '[1]'::jsonb, p_headers => '{"content-type": "application/vnd.x+json", "h": "v"}')"#)
        .execute(&db.pool)
        .await
        .unwrap();
    let got: Vec<(Vec<u8>, serde_json::Value)> =
        sqlx::query_as("SELECT payload, headers FROM outbox.messages ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(got[0].0, br#"{"a": 1}"#);
    assert_eq!(
        got[0].1,
        serde_json::json!({"content-type": "application/json"})
    );
    assert_eq!(got[1].0, b"[1]");
    assert_eq!(
        got[1].1,
        serde_json::json!({"content-type": "application/vnd.x+json", "h": "v"})
    );
    // Text literals still go to the text overload, as before there was a jsonb one.
    sqlx::query("SELECT * FROM outbox.enqueue('v', 'plain words')")
        .execute(&db.pool)
        .await
        .unwrap();
}

type ManyRow = (i32, i64, String, bool);

#[tokio::test]
async fn enqueue_many_writes_in_order_with_one_insert_and_is_idempotent_per_message_id() {
    let db = TestDb::new().await;
    // 2,000 messages in one call: one INSERT statement (one count delta from the statement
    // trigger), ids in array order.
    let payloads: Vec<Vec<u8>> = (0..2000).map(|i| format!("m{i}").into_bytes()).collect();
    let keys: Vec<Option<String>> = (0..2000)
        .map(|i| (i % 3 != 0).then(|| format!("k{}", i % 7)))
        .collect();
    let out: Vec<ManyRow> =
        sqlx::query_as("SELECT * FROM outbox.enqueue_many('bulk', $1::bytea[], $2::text[])")
            .bind(&payloads)
            .bind(&keys)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(out.len(), 2000);
    assert!(out.iter().all(|r| r.3), "every row is new");
    assert!(out
        .windows(2)
        .all(|w| w[0].0 + 1 == w[1].0 && w[0].1 < w[1].1));
    let stored: Vec<(i64, Vec<u8>, Option<String>)> =
        sqlx::query_as("SELECT id, payload, key FROM outbox.messages ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        out.iter()
            .zip(payloads.iter().zip(&keys))
            .map(|(r, (p, k))| (r.1, p.clone(), k.clone()))
            .collect::<Vec<_>>()
    );
    let deltas: Vec<i64> =
        sqlx::query_scalar("SELECT n FROM outbox.topic_counts WHERE topic = 'bulk'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(deltas, [2000], "one INSERT statement for the whole batch");

    // Message ids: one already waiting ("w"), one already sent ("s", retention on), one
    // repeated inside the call ("d"), one new ("n"), one generated (NULL).
    sqlx::query("SELECT * FROM outbox.enqueue('ids', 'old'::text, p_message_id => 'w')")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox.sent (id, message_id, topic, payload, headers, created_at, attempts)
         VALUES (1000000, 's', 'ids', 'old', '{}', now(), 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let waiting_id: i64 =
        sqlx::query_scalar("SELECT id FROM outbox.messages WHERE message_id = 'w'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let out: Vec<ManyRow> = sqlx::query_as(
        r#"SELECT * FROM outbox.enqueue_many('ids', ARRAY['{"n":1}','{"n":2}','{"n":3}','{"n":4}','{"n":5}','{"n":6}']::jsonb[],
                p_headers => ARRAY[NULL, NULL, '{"h": "v"}', NULL, NULL, NULL]::jsonb[],
                p_message_ids => ARRAY['d', 'w', 'n', 's', 'd', NULL])"#,
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let summary: Vec<(i32, &str, bool)> = out.iter().map(|r| (r.0, r.2.as_str(), r.3)).collect();
    assert_eq!(
        &summary[..5],
        [
            (1, "d", true),
            (2, "w", false),
            (3, "n", true),
            (4, "s", false),
            (5, "d", false)
        ]
    );
    assert_eq!((summary[5].0, summary[5].2), (6, true));
    assert_eq!(out[1].1, waiting_id, "the waiting row's id comes back");
    assert_eq!(out[3].1, 1000000, "the sent row's id comes back");
    assert_eq!(out[4].1, out[0].1, "a repeated id returns its first row");
    let written: Vec<(String, Vec<u8>, serde_json::Value)> = sqlx::query_as(
        "SELECT message_id, payload, headers FROM outbox.messages WHERE topic = 'ids' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let json = serde_json::json!({"content-type": "application/json"});
    assert_eq!(
        written,
        [
            ("w".to_string(), b"old".to_vec(), serde_json::json!({})),
            ("d".to_string(), br#"{"n": 1}"#.to_vec(), json.clone()),
            (
                "n".to_string(),
                br#"{"n": 3}"#.to_vec(),
                serde_json::json!({"content-type": "application/json", "h": "v"})
            ),
            (out[5].2.clone(), br#"{"n": 6}"#.to_vec(), json),
        ]
    );

    // An empty array enqueues nothing.
    let none: Vec<ManyRow> = sqlx::query_as("SELECT * FROM outbox.enqueue_many('t', '{}'::text[])")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn enqueue_many_refuses_arrays_that_do_not_line_up_and_says_what_to_pass() {
    let db = TestDb::new().await;
    for (sql, says) in [
        (
            "SELECT * FROM outbox.enqueue_many('t', ARRAY['a','b']::text[], ARRAY['k'])",
            "2 payloads but 1 keys, NULL headers, NULL message ids",
        ),
        (
            "SELECT * FROM outbox.enqueue_many('t', ARRAY['a','b']::text[], p_message_ids => ARRAY['x','y','z'])",
            "2 payloads but NULL keys, NULL headers, 3 message ids",
        ),
        (
            "SELECT * FROM outbox.enqueue_many('t', ARRAY['a',NULL]::text[])",
            "element 2 of p_payloads is NULL",
        ),
        (
            "SELECT * FROM outbox.enqueue_many('t', NULL::bytea[])",
            "p_payloads is NULL",
        ),
    ] {
        let (_, message) = refused(&db, sql).await;
        assert!(message.contains(says), "{sql}: {message}");
    }
    assert_eq!(db.waiting().await, 0);
}

/// A role (cluster-wide, so named uniquely and dropped on drop) for which the rows of topic
/// `vanishing` are invisible: a message id of such a row conflicts on insert, but the lookup of
/// the existing row finds nothing, exactly as when the relay deletes the row in between. The
/// function runs with its owner's rights (SECURITY DEFINER, migration 0009), so the role is made
/// its owner: the function's lookups then see what the role sees.
struct VanishingRole {
    name: String,
    admin_url: String,
}

impl VanishingRole {
    async fn create(db: &TestDb, message_id: &str) -> Self {
        let name = unique("outbox_vanish");
        for sql in [
            format!("CREATE ROLE {name} NOLOGIN"),
            format!("GRANT USAGE ON SCHEMA outbox TO {name}"),
            format!("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA outbox TO {name}"),
            "ALTER TABLE outbox.messages ENABLE ROW LEVEL SECURITY".into(),
            format!("CREATE POLICY see ON outbox.messages FOR SELECT TO {name} USING (topic <> 'vanishing')"),
            format!("CREATE POLICY add ON outbox.messages FOR INSERT TO {name} WITH CHECK (true)"),
            format!("ALTER FUNCTION outbox.enqueue_many(text, bytea[], text[], jsonb[], text[], timestamptz) OWNER TO {name}"),
            format!("INSERT INTO outbox.messages (topic, payload, message_id) VALUES ('vanishing', 'x', '{message_id}')"),
        ] {
            sqlx::query(&sql).execute(&db.pool).await.unwrap();
        }
        Self {
            name,
            admin_url: db.url.clone(),
        }
    }
}

impl Drop for VanishingRole {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.admin_url.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                        let _ = sqlx::query(&format!("DROP OWNED BY {name}"))
                            .execute(&mut c)
                            .await;
                        let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {name}"))
                            .execute(&mut c)
                            .await;
                    }
                });
        })
        .join();
    }
}

#[tokio::test]
async fn enqueue_many_reports_a_conflicting_row_that_vanished_as_a_serialization_failure() {
    let db = TestDb::new().await;
    let role = VanishingRole::create(&db, "gone").await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL ROLE {}", role.name))
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query(
        "SELECT * FROM outbox.enqueue_many('t', ARRAY['a','b']::text[], p_message_ids => ARRAY['fine','gone'])",
    )
    .execute(&mut *tx)
    .await
    .unwrap_err();
    let db_err = err.as_database_error().expect("a database error");
    assert_eq!(db_err.code().as_deref(), Some("40001"), "{db_err}");
    assert!(
        db_err
            .message()
            .contains("message id gone conflicted with a row that was gone"),
        "{db_err}"
    );
    tx.rollback().await.unwrap();
}
