//! The command line: bad configuration exits 2 naming the key, an unreachable database is
//! retried with backoff instead of crashing, `--help` everywhere, `status --json`, `migrate`
//! twice on a fresh database, and the README's main job (`demo`) end to end.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use outbox_client::{enqueue_many, Message};
use sqlx::Connection;
use support::*;

/// The binary with a clean `OUTBOX_*` environment (and no `DATABASE_URL`, which would stand in
/// for `database.url`) plus `env`; killed if it runs past 30 s.
fn run_cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env_remove("DATABASE_URL");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OUTBOX_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn outbox-relay");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("wait for outbox-relay"),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("outbox-relay {args:?} did not exit within 30 s");
        }
    }
}

/// `outbox-relay --config <file> run` with `toml` as the file.
fn run_with_config(toml: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).unwrap();
    run_cli(&["--config", path.to_str().unwrap(), "run"], env)
}

fn assert_config_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit code 2; stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "stderr does not mention {n:?}:\n{stderr}"
        );
    }
}

/// guarantees.md: bad configuration exits with code 2 and a message naming the bad key.
#[test]
fn bad_config_exits_2_and_names_the_key() {
    // Unknown key in the TOML file.
    let out = run_with_config("[relay]\nbatch_sise = 10\n", &[]);
    assert_config_error(
        &out,
        &[
            "unknown key `relay.batch_sise`",
            "did you mean `batch_size`?",
            "`batch_size`, `workers`",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("``") && !stderr.contains("`one of"),
        "the list of keys is quoted once per key:\n{stderr}"
    );

    // Unknown top-level section.
    let out = run_with_config("[relais]\nbatch_size = 10\n", &[]);
    assert_config_error(&out, &["relais", "did you mean `relay`?"]);

    // Wrong value type.
    let out = run_with_config("[relay]\nbatch_size = \"many\"\n", &[]);
    assert_config_error(&out, &["relay.batch_size"]);

    // Bad environment override (no config file at all).
    let out = run_cli(&["run"], &[("OUTBOX_RELAY__BATCH_SIZE", "abc")]);
    assert_config_error(
        &out,
        &["relay.batch_size", "OUTBOX_RELAY__BATCH_SIZE", "\"abc\""],
    );

    // A value out of range says what is allowed.
    let out = run_cli(&["run"], &[("OUTBOX_RELAY__BATCH_SIZE", "0")]);
    assert_config_error(&out, &["relay.batch_size must be between 1 and 10000"]);

    // Invalid route pattern.
    let toml = r#"
[sinks.events]
kind = "nats"
routes = [{ topics = ["orders.[paid"], subject = "outbox.{topic}" }]
"#;
    let out = run_with_config(toml, &[]);
    assert_config_error(&out, &["sinks.events.routes[0].topics", "orders.[paid"]);

    // Unknown placeholder in a route's subject.
    let toml = r#"
[sinks.events]
kind = "nats"
routes = [{ topics = ["orders.*"], subject = "outbox.{tpoic}" }]
"#;
    let out = run_with_config(toml, &[]);
    assert_config_error(&out, &["sinks.events", "{tpoic}"]);

    // A config file that does not exist.
    let out = run_cli(&["--config", "/nonexistent/relay.toml", "run"], &[]);
    assert_config_error(&out, &["/nonexistent/relay.toml"]);
}

/// The environment: `OUTBOX_DATABASE_URL` (one underscore) is refused with the spelling that
/// works; an `OUTBOX_…` variable that is no key at all (Kubernetes sets `OUTBOX_SERVICE_HOST`
/// for a service named `outbox`) is ignored with a warning naming it; `DATABASE_URL` sets
/// `database.url` unless the file or `OUTBOX_DATABASE__URL` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_misspellings_are_explained_strangers_ignored_and_database_url_is_a_fallback() {
    let db = TestDb::new().await;
    let topic = unique("env.topic");
    enqueue_many(
        &mut db.pool.acquire().await.unwrap(),
        &[Message::bytes(&topic, vec![1])],
    )
    .await
    .unwrap();
    let shows_topic = |out: &Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            json["topics"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["topic"] == topic.as_str()),
            "status read another database: {json}"
        );
    };

    let out = run_cli(&["status"], &[("OUTBOX_DATABASE_URL", &db.url)]);
    assert_config_error(
        &out,
        &[
            "environment variable OUTBOX_DATABASE_URL is not a configuration key",
            "did you mean OUTBOX_DATABASE__URL?",
        ],
    );
    let out = run_cli(&["status"], &[("OUTBOX_RELAY_BATCH_SIZE", "10")]);
    assert_config_error(&out, &["did you mean OUTBOX_RELAY__BATCH_SIZE?"]);

    let out = run_cli(
        &["status", "--json"],
        &[
            ("OUTBOX_DATABASE__URL", &db.url),
            ("OUTBOX_SERVICE_HOST", "10.0.0.1"),
        ],
    );
    shows_topic(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ignoring environment variable OUTBOX_SERVICE_HOST"),
        "{stderr}"
    );

    shows_topic(&run_cli(
        &["status", "--json"],
        &[("DATABASE_URL", &db.url)],
    ));
    let closed = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    shows_topic(&run_cli(
        &["status", "--json"],
        &[("DATABASE_URL", &closed), ("OUTBOX_DATABASE__URL", &db.url)],
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!("[database]\nurl = \"{closed}\"\nconnect_timeout_secs = 2\n"),
    )
    .unwrap();
    let out = run_cli(
        &["--config", path.to_str().unwrap(), "status"],
        &[("DATABASE_URL", &db.url)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the file wins over DATABASE_URL: {stderr}"
    );
    assert!(stderr.contains(&closed), "{stderr}");
    let out = run_cli(&["status"], &[("DATABASE_URL", "mysql://db/app")]);
    assert_config_error(
        &out,
        &["database.url (from environment variable DATABASE_URL)"],
    );
}

/// guarantees.md: with the database unreachable, `run` logs a clear error and retries with
/// growing backoff instead of exiting (no crash loop); SIGTERM still stops it cleanly (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_is_retried_with_backoff_and_sigterm_exits_0() {
    let closed = free_port();
    let config = format!(
        "[database]\nurl = \"postgres://postgres@127.0.0.1:{closed}/postgres\"\nconnect_timeout_secs = 2\n[http]\nlisten = \"\"\n"
    );
    let mut relay = RelayProcess::start(&config);
    let attempts = |stderr: &str| -> Vec<u64> {
        stderr
            .lines()
            .filter(|l| l.contains("cannot reach PostgreSQL"))
            .map(|l| {
                let v = l
                    .split("retry_in_ms=")
                    .nth(1)
                    .expect("retry_in_ms field")
                    .split_whitespace()
                    .next()
                    .unwrap();
                v.parse().unwrap()
            })
            .collect()
    };
    wait_until(
        Duration::from_secs(30),
        "four connection attempts logged",
        || {
            let n = attempts(&relay.stderr()).len();
            async move { n >= 4 }
        },
    )
    .await;
    let stderr = relay.stderr();
    let delays = attempts(&stderr);
    assert!(
        delays.windows(2).all(|w| w[1] > w[0]),
        "backoff does not grow: {delays:?}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{closed}")),
        "the error names the database:\n{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "the error says why:\n{stderr}"
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay exited instead of retrying:\n{stderr}"
    );

    relay.sigterm();
    assert_eq!(
        relay.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "stderr:\n{}",
        relay.stderr()
    );
}

/// Every command answers `--help`.
#[test]
fn help_works_on_every_command() {
    for args in [
        &["--help"][..],
        &["migrate", "--help"],
        &["run", "--help"],
        &["status", "--help"],
        &["demo", "--help"],
        &["help", "run"],
    ] {
        let out = run_cli(args, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("Usage:"), "{args:?} printed:\n{stdout}");
    }
    let out = run_cli(&["--help"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for command in ["migrate", "run", "status", "demo"] {
        assert!(
            stdout.contains(command),
            "top-level help does not list {command}:\n{stdout}"
        );
    }
    // Bad usage is exit code 2 too.
    assert_eq!(run_cli(&["frobnicate"], &[]).status.code(), Some(2));
}

/// `status --json` shows waiting rows per topic and the age of the oldest; the table shows the
/// same topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_waiting_counts_and_oldest_age_per_topic() {
    let db = TestDb::new().await;
    let batch: Vec<Message> = (0..3)
        .map(|i| Message::bytes("orders.created", vec![i]))
        .chain((0..2).map(|i| Message::bytes("users.created", vec![i])))
        .collect();
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();
    // Make one orders row an hour old (enqueued then, due then): the oldest age must come from
    // it.
    sqlx::query(
        "UPDATE outbox.messages
            SET created_at = now() - interval '1 hour', available_at = now() - interval '1 hour'
          WHERE id = (SELECT min(id) FROM outbox.messages WHERE topic = 'orders.created')",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let env = [("OUTBOX_DATABASE__URL", db.url.as_str())];
    let out = run_cli(&["status", "--json"], &env);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    let topics = json["topics"].as_array().expect("topics array");
    let find = |name: &str| {
        topics
            .iter()
            .find(|t| t["topic"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {json}"))
    };
    assert_eq!(find("orders.created")["waiting"], 3);
    assert_eq!(find("users.created")["waiting"], 2);
    let orders_age = find("orders.created")["oldest_age_seconds"]
        .as_f64()
        .unwrap();
    let users_age = find("users.created")["oldest_age_seconds"]
        .as_f64()
        .unwrap();
    assert!(
        (3600.0..3900.0).contains(&orders_age),
        "orders age {orders_age}"
    );
    assert!((0.0..300.0).contains(&users_age), "users age {users_age}");
    assert_eq!(topics.len(), 2);

    let out = run_cli(&["status"], &env);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        table.contains("orders.created")
            && table.contains("users.created")
            && table.contains("WAITING"),
        "{table}"
    );
}

/// `outbox-relay migrate` creates the schema on an empty database, listing what it applied, and
/// says "up to date" the second time; `outbox-relay demo` (the README's main job) works in a
/// database of its own (created, then found again) and a stream of its own (deleted, or kept
/// with `--keep`), every keyed message arrives in per-key order, the status shows its relay live
/// with the sink up, and it ends with the commands to run next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_the_demo_relays_every_message() {
    let db = TestDb::empty().await;
    let env = [("OUTBOX_DATABASE__URL", db.url.as_str())];
    let mut printed = Vec::new();
    for round in 1..=2 {
        let out = run_cli(&["migrate"], &env);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "migrate #{round}: {stderr}");
        // PostgreSQL's notices ("… does not exist, skipping") are the migrations' IF EXISTS at
        // work: not shown.
        assert!(
            !stderr.contains("skipping") && !stderr.contains("notice"),
            "migrate #{round} logged notices:\n{stderr}"
        );
        printed.push(stdout);
    }
    let (first, second) = (&printed[0], &printed[1]);
    assert!(first.starts_with("applied "), "{first}");
    for line in [
        "  0001 outbox\n",
        "  0003 observability\n",
        "  0004 ordering\n",
    ] {
        assert!(
            first.contains(line),
            "the first migrate lists {line:?}:\n{first}"
        );
    }
    assert!(
        second.contains("is up to date (latest migration") && !second.contains("0001"),
        "the second migrate applies nothing:\n{second}"
    );
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'outbox'
            AND tablename IN ('messages', 'sent', 'dead_letters', 'partition_leases')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables, 4, "the schema exists after migrate");

    // The demo: its own database (named here so that parallel tests do not share it) and its
    // own stream; only the NATS URL comes from the config file.
    let demo_db = unique("outbox_demo_test");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(
        &path,
        format!("[sinks.nats]\nkind = \"nats\"\nurl = \"{}\"\n", nats_url()),
    )
    .unwrap();
    let demo = |extra: &[&str]| {
        let mut args = vec![
            "--config",
            path.to_str().unwrap(),
            "demo",
            "--count",
            "7",
            "--database",
            &demo_db,
        ];
        args.extend_from_slice(extra);
        let out = run_cli(&args, &env);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "demo failed\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stream = stdout
            .split("stream ")
            .nth(1)
            .and_then(|s| s.split([',', ' ', ';']).next())
            .unwrap_or_else(|| panic!("the demo names its stream:\n{stdout}"))
            .to_string();
        (stdout, stream)
    };
    let context = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let mut demo_url = url::Url::parse(&db.url).unwrap();
    demo_url.set_path(&format!("/{demo_db}"));
    let drop_demo_db = || async {
        let mut admin = sqlx::PgConnection::connect(&database_url()).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS {demo_db} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
    };

    let (stdout, stream) = demo(&[]);
    assert!(stream.starts_with("OUTBOX_DEMO_"), "{stream}\n{stdout}");
    for needle in [
        &format!("1. database {demo_db} at "),
        "(created)",
        "4. all 21 messages arrived",
        "each of the 7 keys received its events in the order they were enqueued",
        "RELAYS: 1 live",
        &format!("(stream {stream} deleted; --keep keeps it)"),
        "outbox-relay migrate ",
        "outbox-relay run ",
        "outbox-relay status --watch ",
    ] {
        assert!(
            stdout.contains(needle),
            "the demo prints {needle:?}:\n{stdout}"
        );
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("nats") && l.contains(" up ") && l.contains("1/1")),
        "the status shows the sink up while the relay runs:\n{stdout}"
    );
    assert!(
        context.get_stream(&stream).await.is_err(),
        "the demo's stream is deleted at the end"
    );
    let in_configured: bool = sqlx::query_scalar("SELECT to_regclass('outbox_demo.users') IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        in_configured,
        "the demo leaves the configured database alone"
    );
    assert_eq!(db.waiting().await, 0);

    // Again with --keep: the same database, a new stream holding all 21 messages, kept.
    let (stdout, kept) = demo(&["--keep"]);
    assert!(stdout.contains("(already there)"), "{stdout}");
    assert!(stdout.contains(&format!("(stream {kept} kept")), "{stdout}");
    let messages = match context.get_stream(&kept).await {
        Ok(mut s) => s.info().await.ok().map(|i| i.state.messages),
        Err(_) => None,
    };
    let _ = context.delete_stream(&kept).await;
    assert_eq!(
        messages,
        Some(21),
        "the kept stream holds the run's messages"
    );

    let demo_pool = sqlx::PgPool::connect(demo_url.as_str()).await.unwrap();
    let (users, waiting): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_demo.users), (SELECT count(*) FROM outbox.messages)",
    )
    .fetch_one(&demo_pool)
    .await
    .unwrap();
    demo_pool.close().await;
    drop_demo_db().await;
    assert_eq!(
        (users, waiting),
        (14, 0),
        "7 users per run, the backlog drained"
    );
}

/// A database that does not exist gets advice about the database, not "start it"; a database
/// without the outbox schema is named in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_schema_errors_name_what_to_fix() {
    let mut missing = url::Url::parse(&database_url()).unwrap();
    let name = unique("outbox_absent");
    missing.set_path(&format!("/{name}"));
    let out = run_cli(&["status"], &[("OUTBOX_DATABASE__URL", missing.as_str())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("create that database"), "{stderr}");
    assert!(!stderr.contains("Start it"), "{stderr}");

    let db = TestDb::empty().await;
    let out = run_cli(&["status"], &[("OUTBOX_DATABASE__URL", &db.url)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the outbox schema is missing in database \"{}\"",
            db.name
        )),
        "{stderr}"
    );

    // A schema an older relay migrated: the relay says so instead of failing statement by
    // statement (or blaming a privilege).
    let old = TestDb::new().await;
    sqlx::query("DROP TABLE outbox.admin_audit")
        .execute(&old.pool)
        .await
        .unwrap();
    for command in [&["status"][..], &["run"]] {
        let out = run_cli(
            command,
            &[
                ("OUTBOX_DATABASE__URL", &old.url),
                ("OUTBOX_HTTP__LISTEN", ""),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {stderr}");
        assert!(
            stderr.contains("predates this relay") && stderr.contains("run `outbox-relay migrate`"),
            "{command:?}: {stderr}"
        );
    }
}
