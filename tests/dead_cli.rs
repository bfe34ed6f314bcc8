//! `outbox-relay dead list|show|retry|purge` and `outbox-relay keys release|skip` against a real
//! database (guarantees.md, "Dead letters"; docs/operations.md), and a retried dead letter
//! delivered by the real relay.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use outbox_client::{enqueue, Message};
use support::*;

/// Runs the CLI on `db` with stdin closed (not a terminal).
fn cli(db: &TestDb, args: &[&str]) -> Output {
    Command::new(relay_bin())
        .args(args)
        .env("OUTBOX_DATABASE__URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run outbox-relay")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Inserts a dead letter as the relay would have left it, dead for `dead_secs_ago` seconds.
async fn insert_dead(db: &TestDb, id: i64, topic: &str, payload: &[u8], dead_secs_ago: i64) {
    insert_dead_keyed(db, id, topic, "key-1", payload, dead_secs_ago).await;
}

/// [`insert_dead`] with the ordering key `key`.
async fn insert_dead_keyed(
    db: &TestDb,
    id: i64,
    topic: &str,
    key: &str,
    payload: &[u8],
    dead_secs_ago: i64,
) {
    sqlx::query(
        "INSERT INTO outbox.dead_letters
                (id, message_id, topic, key, payload, headers, created_at, attempts, last_error, errors, dead_at)
         VALUES ($1, 'mid-' || $1, $2, $5, $3, '{\"h\":\"v\"}', now() - interval '1 day', 3,
                 'broker said no (gave up after 3 attempts)',
                 jsonb_build_array(
                   jsonb_build_object('at', now(), 'attempt', 1, 'error', 'first failure'),
                   jsonb_build_object('at', now(), 'attempt', 2, 'error', 'second failure'),
                   jsonb_build_object('at', now(), 'attempt', 3, 'error', 'broker said no (gave up after 3 attempts)')),
                 now() - $4 * interval '1 second')",
    )
    .bind(id)
    .bind(topic)
    .bind(payload)
    .bind(dead_secs_ago)
    .bind(key)
    .execute(&db.pool)
    .await
    .unwrap();
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_filters_limit_and_json() {
    let db = TestDb::new().await;
    insert_dead(&db, 1, "orders.paid", b"{\"n\":1}", 10).await; // 10 s ago
    insert_dead(&db, 2, "orders.paid", b"{\"n\":2}", 2 * 3600).await; // 2 h ago
    insert_dead(&db, 3, "users.created", b"{\"n\":3}", 3 * 86400).await; // 3 days ago
    insert_dead(&db, 4, "users.created", b"{\"n\":4}", 60).await; // 1 min ago

    let all = json(&cli(&db, &["dead", "list", "--json"]));
    assert_eq!(ids(&all), vec![1, 2, 3, 4]);
    assert_eq!(all["total"], 4);
    assert_eq!(all["dead_letters"][0]["payload_bytes"], 7);
    assert_eq!(
        all["dead_letters"][0]["last_error"],
        "broker said no (gave up after 3 attempts)"
    );

    assert_eq!(
        ids(&json(&cli(
            &db,
            &["dead", "list", "--json", "--topic", "users.created"]
        ))),
        vec![3, 4]
    );
    assert_eq!(
        ids(&json(&cli(
            &db,
            &[
                "dead",
                "list",
                "--json",
                "--topic",
                "users.created",
                "--topic",
                "orders.paid"
            ]
        ))),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        ids(&json(&cli(
            &db,
            &["dead", "list", "--json", "--older-than", "1h"]
        ))),
        vec![2, 3]
    );
    assert_eq!(
        ids(&json(&cli(
            &db,
            &["dead", "list", "--json", "--newer-than", "10m"]
        ))),
        vec![1, 4]
    );
    assert_eq!(
        ids(&json(&cli(
            &db,
            &[
                "dead",
                "list",
                "--json",
                "--older-than",
                "1h",
                "--newer-than",
                "1d"
            ]
        ))),
        vec![2]
    );
    assert_eq!(
        ids(&json(&cli(
            &db,
            &["dead", "list", "--json", "--id-from", "2", "--id-to", "3"]
        ))),
        vec![2, 3]
    );
    let limited = json(&cli(&db, &["dead", "list", "--json", "--limit", "2"]));
    assert_eq!(ids(&limited), vec![1, 2]);
    assert_eq!(limited["total"], 4);

    let table = cli(&db, &["dead", "list", "--limit", "3"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.contains("ATTEMPTS")
            && text.contains("orders.paid")
            && text.contains("broker said no"),
        "{text}"
    );
    assert!(text.contains("3 of 4 shown"), "{text}");

    let bad = cli(&db, &["dead", "list", "--older-than", "3 days"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("10m, 2h, 3d"), "{}", stderr(&bad));
    let swapped = cli(&db, &["dead", "list", "--id-from", "5", "--id-to", "1"]);
    assert_eq!(swapped.status.code(), Some(2));
    assert!(
        stderr(&swapped).contains("swap them"),
        "{}",
        stderr(&swapped)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_show_prints_text_or_hex_payload_and_the_error_history() {
    let db = TestDb::new().await;
    insert_dead(&db, 10, "t.text", "héllo wörld".as_bytes(), 5).await;
    insert_dead(&db, 11, "t.bin", &[0x00, 0xff, 0x41, 0x80], 5).await;

    let text = cli(&db, &["dead", "show", "10"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let out = stdout(&text);
    assert!(out.contains("UTF-8 text:\nhéllo wörld"), "{out}");
    assert!(out.contains("error history (3 entries"), "{out}");
    assert!(
        out.contains("attempt 1")
            && out.contains("first failure")
            && out.contains("second failure"),
        "{out}"
    );
    assert!(
        out.contains("h: v") && out.contains("key:         key-1"),
        "{out}"
    );

    let bin = stdout(&cli(&db, &["dead", "show", "11"]));
    assert!(
        bin.contains("binary (hex):\n00000000  00 ff 41 80"),
        "{bin}"
    );
    assert!(bin.contains("|..A.|"), "{bin}");

    let j = json(&cli(&db, &["dead", "show", "11", "--json"]));
    assert_eq!(j["payload_hex"], "00ff4180");
    assert!(j["payload_text"].is_null());
    assert_eq!(j["errors"].as_array().unwrap().len(), 3);
    let j = json(&cli(&db, &["dead", "show", "10", "--json"]));
    assert_eq!(j["payload_text"], "héllo wörld");

    let missing = cli(&db, &["dead", "show", "999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("no dead letter with id 999"),
        "{}",
        stderr(&missing)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_moves_rows_back_with_their_id_and_reports_message_id_conflicts() {
    let db = TestDb::new().await;
    insert_dead(&db, 21, "a", b"1", 5).await;
    insert_dead(&db, 22, "a", b"2", 5).await;
    insert_dead(&db, 23, "b", b"3", 5).await;
    // Meanwhile the application enqueued a new message with 22's idempotency key.
    let again = enqueue(
        &mut db.pool.acquire().await.unwrap(),
        &Message::bytes("a", b"new".to_vec()).message_id("mid-22"),
    )
    .await
    .unwrap();

    let out = cli(&db, &["dead", "retry", "--topic", "a"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a skipped row is an error to look at"
    );
    let text = stdout(&out);
    assert!(text.contains(&format!("skipped 22 (topic a, message_id mid-22): outbox row {} with the same message_id is waiting", again.id)), "{text}");
    assert!(text.contains("retried 1 dead letter(s)"), "{text}");
    assert!(
        stderr(&out).contains("1 dead letter(s) were not retried"),
        "{}",
        stderr(&out)
    );

    let (id, attempts, available_now, history): (i64, i32, bool, serde_json::Value) = sqlx::query_as(
        "SELECT id, attempts, available_at <= now(), errors FROM outbox.messages WHERE message_id = 'mid-21'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (id, attempts, available_now),
        (21, 0, true),
        "original id, attempts reset, available now"
    );
    let history = history.as_array().unwrap();
    assert_eq!(
        history.len(),
        4,
        "the error history is kept, with the retry noted"
    );
    assert!(history[3]["event"].as_str().unwrap().contains("retried"));
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox.dead_letters ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        vec![22, 23],
        "the conflicting row stays dead; topic b untouched"
    );

    let j = json(&cli(
        &db,
        &[
            "dead",
            "retry",
            "--id-from",
            "23",
            "--id-to",
            "23",
            "--json",
        ],
    ));
    assert_eq!(j["retried"], 1);
    assert_eq!(j["skipped"], 0);
    assert_eq!(j["results"][0]["id"], 23);
    let nothing = cli(&db, &["dead", "retry", "--topic", "zzz"]);
    assert!(nothing.status.success());
    assert!(stdout(&nothing).contains("nothing retried"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_purge_needs_yes_without_a_terminal_and_deletes_only_matching_rows() {
    let db = TestDb::new().await;
    for id in 31..=35 {
        insert_dead(&db, id, if id % 2 == 0 { "even" } else { "odd" }, b"x", 5).await;
    }
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.dead_letters")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };

    let refused = cli(&db, &["dead", "purge", "--topic", "odd"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("refusing to purge 3 dead letter(s) without confirmation"),
        "{}",
        stderr(&refused)
    );
    assert!(stderr(&refused).contains("--yes"));
    assert_eq!(count().await, 5, "nothing purged without confirmation");

    let j = json(&cli(
        &db,
        &[
            "dead", "purge", "--topic", "odd", "--limit", "2", "--yes", "--json",
        ],
    ));
    assert_eq!(j["purged"], 2);
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox.dead_letters ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, vec![32, 34, 35]);

    let out = cli(&db, &["dead", "purge", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("purged 3 dead letter(s)"));
    assert_eq!(count().await, 0);
    assert!(stdout(&cli(&db, &["dead", "purge", "--yes"])).contains("nothing purged"));
}

/// A key parked by a dead letter (`ordering.on_dead = "park"`) is unparked when that dead letter
/// is retried or purged, so no key stays parked with nothing left to act on; a parked key whose
/// dead letter is untouched stays parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_and_purge_unpark_the_keys_their_dead_letters_parked() {
    let db = TestDb::new().await;
    for id in [41, 42, 43] {
        insert_dead(&db, id, "parked", b"x", 5).await;
        sqlx::query(
            "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
             VALUES ('key-' || $1, 'parked', $1, 'mid-' || $1, 'broker said no')",
        )
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let parked = || async {
        sqlx::query_scalar::<_, i64>("SELECT dead_id FROM outbox.parked_keys ORDER BY dead_id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    let j = json(&cli(
        &db,
        &[
            "dead",
            "retry",
            "--id-from",
            "41",
            "--id-to",
            "41",
            "--json",
        ],
    ));
    assert_eq!(j["retried"], 1);
    assert_eq!(
        parked().await,
        vec![42, 43],
        "retrying 41 unparked its key only"
    );
    let out = cli(
        &db,
        &["dead", "purge", "--id-from", "42", "--id-to", "42", "--yes"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(parked().await, vec![43], "purging 42 unparked its key only");
}

/// On a terminal, purge asks and accepts the count (run under `script` for a pseudo-terminal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_purge_on_a_terminal_asks_for_the_count() {
    if Command::new("script").arg("--version").output().is_err() {
        skip::skipped(
            "dead_purge_on_a_terminal_asks_for_the_count",
            "`script` (util-linux) is not installed, so no pseudo-terminal for the confirmation prompt",
        );
        return;
    }
    let db = TestDb::new().await;
    insert_dead(&db, 41, "t", b"x", 5).await;
    insert_dead(&db, 42, "t", b"x", 5).await;
    let run = |answer: &str| {
        let mut child = Command::new("script")
            .args([
                "-qec",
                &format!("{} dead purge", relay_bin().display()),
                "/dev/null",
            ])
            .env("OUTBOX_DATABASE__URL", &db.url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let no = run("nope");
    assert!(
        String::from_utf8_lossy(&no.stdout).contains("Type 2 or 'yes' to confirm"),
        "{}",
        String::from_utf8_lossy(&no.stdout)
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 2, "a wrong answer purges nothing");
    let yes = run("2");
    assert!(
        String::from_utf8_lossy(&yes.stdout).contains("purged 2 dead letter(s)"),
        "{}",
        String::from_utf8_lossy(&yes.stdout)
    );

    // `dead retry` without a filter asks the same way.
    insert_dead(&db, 43, "t", b"x", 5).await;
    let retry = |answer: &str| {
        let mut child = Command::new("script")
            .args([
                "-qec",
                &format!("{} dead retry", relay_bin().display()),
                "/dev/null",
            ])
            .env("OUTBOX_DATABASE__URL", &db.url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{answer}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let no = retry("nope");
    let text = String::from_utf8_lossy(&no.stdout);
    assert!(
        text.contains("this will retry ALL 1 dead letter(s). Type 1 or 'yes' to confirm"),
        "{text}"
    );
    assert_eq!(
        dead_ids(&db).await,
        vec![43],
        "a wrong answer retries nothing"
    );
    let yes = retry("yes");
    let text = String::from_utf8_lossy(&yes.stdout);
    assert!(text.contains("retried 1 dead letter(s)"), "{text}");
    assert!(dead_ids(&db).await.is_empty());
}

async fn dead_ids(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM outbox.dead_letters ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// `dead retry 987654` and `dead purge <id>...` take ids the way `dead show` does; `dead list`
/// takes them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_purge_and_list_take_ids_like_show() {
    let db = TestDb::new().await;
    for id in 61..=64 {
        insert_dead(&db, id, "t", b"x", 5).await;
    }
    assert_eq!(
        ids(&json(&cli(&db, &["dead", "list", "62", "64", "--json"]))),
        vec![62, 64]
    );
    let out = cli(&db, &["dead", "retry", "61", "63"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("retried 2 dead letter(s)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(dead_ids(&db).await, vec![62, 64]);
    let out = cli(&db, &["dead", "purge", "64", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dead_ids(&db).await, vec![62]);
    let none = cli(&db, &["dead", "retry", "987654"]);
    assert!(none.status.success(), "{}", stderr(&none));
    assert!(
        stdout(&none).contains("nothing retried"),
        "{}",
        stdout(&none)
    );
}

/// `dead retry` without ids or a filter would retry everything: without a terminal it refuses
/// unless --yes; `--dry-run` on retry and purge prints the rows and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_of_everything_needs_yes_and_dry_runs_change_nothing() {
    let db = TestDb::new().await;
    for id in 71..=73 {
        insert_dead(&db, id, if id == 73 { "b" } else { "a" }, b"x", 5).await;
    }
    let refused = cli(&db, &["dead", "retry"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("refusing to retry all 3 dead letter(s)")
            && stderr(&refused).contains("--yes")
            && stderr(&refused).contains("--dry-run"),
        "{}",
        stderr(&refused)
    );
    let limited = cli(&db, &["dead", "retry", "--limit", "1"]);
    assert_eq!(limited.status.code(), Some(2), "a limit is not a filter");
    assert_eq!(dead_ids(&db).await, vec![71, 72, 73], "nothing retried");

    let dry = cli(&db, &["dead", "retry", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let text = stdout(&dry);
    assert!(
        text.contains("dry run: would retry 3 dead letter(s); nothing changed")
            && text.contains("71")
            && text.contains("73"),
        "{text}"
    );
    let dry = json(&cli(
        &db,
        &["dead", "purge", "--topic", "a", "--dry-run", "--json"],
    ));
    assert_eq!(dry["would_purge"], 2);
    assert_eq!(ids(&dry), vec![71, 72]);
    assert_eq!(
        dead_ids(&db).await,
        vec![71, 72, 73],
        "dry runs change nothing"
    );
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(waiting, 0);

    let with_filter = cli(&db, &["dead", "retry", "--topic", "b"]);
    assert!(
        with_filter.status.success(),
        "a filter needs no --yes: {}",
        stderr(&with_filter)
    );
    let all = json(&cli(&db, &["dead", "retry", "--yes", "--json"]));
    assert_eq!(all["retried"], 2);
    assert!(dead_ids(&db).await.is_empty());
}

/// `dead list` shows each letter's key and filters by it, like retry and purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_shows_the_key_and_every_verb_filters_by_it() {
    let db = TestDb::new().await;
    insert_dead_keyed(&db, 81, "orders", "customer-17", b"x", 5).await;
    insert_dead_keyed(&db, 82, "orders", "customer-42", b"x", 5).await;
    insert_dead_keyed(&db, 83, "orders", "customer-17", b"x", 5).await;
    let table = cli(&db, &["dead", "list"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let header = text.lines().next().unwrap();
    assert!(header.contains("TOPIC") && header.contains("KEY"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("82") && l.contains("customer-42")),
        "{text}"
    );
    assert_eq!(
        ids(&json(&cli(
            &db,
            &["dead", "list", "--key", "customer-17", "--json"]
        ))),
        vec![81, 83]
    );
    let dry = json(&cli(
        &db,
        &[
            "dead",
            "retry",
            "--key",
            "customer-42",
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(ids(&dry), vec![82]);
    let out = cli(&db, &["dead", "purge", "--key", "customer-17", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dead_ids(&db).await, vec![82]);
}

/// Retrying a letter of a topic that the command's configuration routes to no sink says that
/// the relay will dead-letter it again ("no route"); a routed topic gets no such hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_hints_when_the_topic_still_has_no_route() {
    let db = TestDb::new().await;
    insert_dead(&db, 91, "invoices.sent", b"x", 5).await;
    insert_dead(&db, 92, "orders.paid", b"x", 5).await;
    sqlx::query(
        "UPDATE outbox.dead_letters
            SET last_error = 'no route matches topic \"invoices.sent\": add it (or a pattern) to a sink''s routes'
          WHERE id = 91",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "[sinks.events]\nkind = \"nats\"\nroutes = [{ topics = [\"orders.*\"], subject = \"outbox.{topic}\" }]\n",
    )
    .unwrap();
    let config = path.to_str().unwrap();

    let dry = cli(
        &db,
        &["--config", config, "dead", "retry", "--dry-run", "91"],
    );
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        stderr(&dry).contains("hint: no sink routes topic \"invoices.sent\""),
        "{}",
        stderr(&dry)
    );
    let routed = cli(&db, &["--config", config, "dead", "retry", "92"]);
    assert!(routed.status.success(), "{}", stderr(&routed));
    assert!(!stderr(&routed).contains("hint"), "{}", stderr(&routed));
    let out = json(&cli(
        &db,
        &["--config", config, "dead", "retry", "91", "--json"],
    ));
    assert_eq!(out["retried"], 1);
    let hint = out["hints"][0].as_str().unwrap();
    assert!(
        hint.contains("invoices.sent") && hint.contains("dead-letter these 1 message(s) again"),
        "{hint}"
    );
}

/// `keys release` takes keys, `--topic` (every key parked for it), or both (the key only if it
/// is parked for that topic), consistent with the (key, topic) rows of `keys list`; `--dry-run`
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_release_by_key_by_topic_or_both() {
    let db = TestDb::new().await;
    for (i, (key, topic)) in [("ka", "t1"), ("kb", "t1"), ("kc", "t2")]
        .iter()
        .enumerate()
    {
        sqlx::query(
            "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
             VALUES ($1, $2, $3, 'mid-' || $3, 'broker said no')",
        )
        .bind(key)
        .bind(topic)
        .bind(100 + i as i64)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let parked = || async {
        sqlx::query_scalar::<_, String>("SELECT key FROM outbox.parked_keys ORDER BY key")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    let dry = cli(&db, &["keys", "release", "--topic", "t1", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains("key \"ka\" (topic t1) would be released")
            && stdout(&dry).contains("2 key(s) would be released; nothing changed"),
        "{}",
        stdout(&dry)
    );
    assert_eq!(parked().await, vec!["ka", "kb", "kc"]);

    let wrong = cli(&db, &["keys", "release", "kc", "--topic", "t1"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("key \"kc\" is parked for topic \"t2\", not \"t1\""),
        "{}",
        stderr(&wrong)
    );
    assert_eq!(parked().await, vec!["ka", "kb", "kc"], "kc stays parked");

    let by_topic = json(&cli(&db, &["keys", "release", "--topic", "t1", "--json"]));
    assert_eq!(by_topic["released"].as_array().unwrap().len(), 2);
    assert_eq!(parked().await, vec!["kc"]);
    let both = cli(&db, &["keys", "release", "kc", "--topic", "t2"]);
    assert!(both.status.success(), "{}", stderr(&both));
    assert!(parked().await.is_empty());

    let nothing = cli(&db, &["keys", "release", "--topic", "t9"]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(stderr(&nothing).contains("no key is parked for topic \"t9\""));
    let usage = cli(&db, &["keys", "release"]);
    assert_eq!(usage.status.code(), Some(2), "a key or --topic is required");
}

/// `keys skip` takes `--topic` like `keys release` (it acts only when what blocks the key is of
/// that topic) and `--dry-run` (says what it would do, changes nothing); it dead-letters a
/// held-back key's failing head and unparks a parked key, in text or JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_skip_by_key_with_topic_and_dry_run() {
    let db = TestDb::new().await;
    // "held": its oldest message failed once and waits for a retry; a second one waits behind.
    sqlx::query(
        "INSERT INTO outbox.messages (message_id, topic, key, payload, available_at, attempts, last_error)
         VALUES ('held-1', 't1', 'held', 'a', now() + interval '1 hour', 1, 'broker said no'),
                ('held-2', 't1', 'held', 'b', now(), 0, NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
         VALUES ('parked', 't2', 7, 'mid-7', 'broker said no')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let state = || async {
        let waiting: Vec<String> =
            sqlx::query_scalar("SELECT message_id FROM outbox.messages ORDER BY id")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        let parked: Vec<String> = sqlx::query_scalar("SELECT key FROM outbox.parked_keys")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        (waiting, parked)
    };
    let before = state().await;
    assert_eq!(
        before,
        (
            vec!["held-1".into(), "held-2".into()],
            vec!["parked".into()]
        )
    );

    let dry = cli(&db, &["keys", "skip", "held", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains("key \"held\" (topic t1): message held-1 would be dead-lettered")
            && stdout(&dry).contains("nothing changed"),
        "{}",
        stdout(&dry)
    );
    assert_eq!(state().await, before, "--dry-run changes nothing");

    let wrong = cli(&db, &["keys", "skip", "held", "--topic", "t2"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("key \"held\" is blocked on topic \"t1\", not \"t2\"")
            && stderr(&wrong).contains("keys skip held --topic t1"),
        "{}",
        stderr(&wrong)
    );
    assert_eq!(state().await, before, "a topic mismatch changes nothing");

    let held = json(&cli(
        &db,
        &["keys", "skip", "held", "--topic", "t1", "--json"],
    ));
    assert_eq!(held["dead_lettered"], "held-1", "{held}");
    assert_eq!(held["dry_run"], false);
    let dead: Vec<String> = sqlx::query_scalar(
        "SELECT message_id FROM outbox.dead_letters WHERE last_error LIKE 'skipped by an operator%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead, vec!["held-1"]);

    let parked = cli(&db, &["keys", "skip", "parked", "--topic", "t2"]);
    assert!(parked.status.success(), "{}", stderr(&parked));
    assert!(
        stdout(&parked).contains("key \"parked\" (topic t2): unparked"),
        "{}",
        stdout(&parked)
    );
    assert_eq!(state().await, (vec!["held-2".into()], vec![]));

    // Nothing blocks either key now: held-2 has never failed and nothing is parked.
    for key in ["held", "parked"] {
        let nothing = cli(&db, &["keys", "skip", key]);
        assert_eq!(nothing.status.code(), Some(1));
        assert!(
            stderr(&nothing).contains("nothing to skip"),
            "{}",
            stderr(&nothing)
        );
    }
}

/// A retried dead letter is published by the relay like any other row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_dead_letter_is_delivered() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    insert_dead(&db, 51, "revived", b"back from the dead", 5).await;
    let relay = RelayProcess::start(&nats_config(&db.url, &nats_url(), &stream, &prefix, ""));
    let out = cli(&db, &["dead", "retry", "--id-from", "51"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = consumer.collect(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "relay stderr:\n{}", relay.stderr());
    assert_eq!(got[0].msg_id, "mid-51");
    assert_eq!(got[0].payload, b"back from the dead");
    wait_until(Duration::from_secs(10), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    consumer.delete_stream().await;
}

/// Every changing `dead` and `keys` command leaves one audit entry (`outbox-relay audit`): who,
/// through what, what, on which rows, how many; dry runs leave none.
#[tokio::test]
async fn dead_and_keys_actions_are_recorded_in_the_audit_trail() {
    let db = TestDb::new().await;
    insert_dead_keyed(&db, 61, "audited", "ka", b"one", 5).await;
    insert_dead_keyed(&db, 62, "audited", "kb", b"two", 5).await;
    sqlx::query(
        "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
         VALUES ('kp', 'audited', 99, 'mid-99', 'broker said no')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for args in [
        &["dead", "retry", "61", "--dry-run"][..],
        &["dead", "retry", "61"],
        &["dead", "purge", "62", "--yes"],
        &["keys", "release", "kp"],
    ] {
        let out = Command::new(relay_bin())
            .args(args)
            .env("OUTBOX_DATABASE__URL", &db.url)
            .env("RUST_LOG", "warn")
            .env("USER", "night-shift")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let audit = json(&cli(&db, &["audit", "--json"]));
    let entries: Vec<(String, i64, serde_json::Value)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(
                e["actor"].as_str().unwrap().starts_with("night-shift@"),
                "{e}"
            );
            assert_eq!(e["via"], "cli");
            (
                e["action"].as_str().unwrap().to_string(),
                e["affected"].as_i64().unwrap(),
                e["target"].clone(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (
                "keys.release".into(),
                1,
                serde_json::json!({ "keys": ["kp"], "topics": [] })
            ),
            ("dead.purge".into(), 1, serde_json::json!({ "ids": [62] })),
            ("dead.retry".into(), 1, serde_json::json!({ "ids": [61] })),
        ],
        "newest first, dry runs not recorded"
    );
    let table = stdout(&cli(&db, &["audit"]));
    assert!(
        table.contains("dead.purge") && table.contains("night-shift@"),
        "{table}"
    );
}
