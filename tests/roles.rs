//! Least-privilege roles (docs/security.md, "Roles: least privilege"): `deploy/sql/roles.sql`
//! run by psql as the owner of the outbox tables, then an application's login role in the
//! enqueue group and the relay's login role in the relay group, each refused what it must not do.
//!
//! Roles are cluster-wide: every test creates its own, with unique names, in a database of its
//! own, and drops them at the end ([`Roles`]'s `Drop`).

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use outbox_client::{enqueue_many, Message};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use support::*;

/// The two group roles of `deploy/sql/roles.sql` and one login role in each, for one database.
struct Roles {
    /// The database's URL as its owner (`postgres`).
    owner_url: String,
    enqueue: String,
    relay: String,
    app_login: String,
    relay_login: String,
    _cleanup: DropRoles,
}

/// Drops roles when dropped: first what they own and hold in the database of `url` (DROP ROLE
/// refuses a role that holds any privilege), then the roles. The test's database goes
/// afterwards, with its TestDb.
struct DropRoles {
    url: String,
    names: Vec<String>,
}

impl Drop for DropRoles {
    fn drop(&mut self) {
        let (url, names) = (self.url.clone(), self.names.clone());
        cleanup_on_own_runtime(async move {
            let Ok(mut conn) = PgConnection::connect(&url).await else {
                return;
            };
            let _ = sqlx::query(&format!("DROP OWNED BY {}", names.join(", ")))
                .execute(&mut conn)
                .await;
            for name in &names {
                let _ = sqlx::query(&format!("DROP ROLE IF EXISTS {name}"))
                    .execute(&mut conn)
                    .await;
            }
            conn.close().await.ok();
        });
    }
}

fn roles_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/sql/roles.sql")
}

/// `psql <url> -f deploy/sql/roles.sql` with the role names; `None` when psql is missing.
fn run_roles_script(url: &str, enqueue: &str, relay: &str) -> Option<Output> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-X", "-q", "-f"])
        .arg(roles_script())
        .arg("-v")
        .arg(format!("enqueue_role={enqueue}"))
        .arg("-v")
        .arg(format!("relay_role={relay}"))
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run psql: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `outbox-relay <args>` against the database at `url` (no config file), logging warnings only.
fn relay_cli(url: &str, args: &[&str]) -> Output {
    Command::new(relay_bin())
        .args(args)
        .env("OUTBOX_DATABASE__URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run outbox-relay")
}

/// `url` with its user replaced.
fn url_as(url: &str, user: &str) -> String {
    let mut u = url::Url::parse(url).expect("database URL");
    u.set_username(user).expect("a URL with a user");
    u.to_string()
}

impl Roles {
    /// Runs the script on `db` with fresh role names and creates the two login roles; `None`
    /// (with the reason printed) when psql is not installed.
    async fn install(db: &TestDb) -> Option<Self> {
        let (enqueue, relay) = (unique("enq"), unique("rel"));
        let (app_login, relay_login) = (unique("app"), unique("relay"));
        let roles = Self {
            owner_url: db.url.clone(),
            _cleanup: DropRoles {
                url: db.url.clone(),
                names: vec![
                    app_login.clone(),
                    relay_login.clone(),
                    enqueue.clone(),
                    relay.clone(),
                ],
            },
            enqueue,
            relay,
            app_login,
            relay_login,
        };
        let Some(out) = run_roles_script(&db.url, &roles.enqueue, &roles.relay) else {
            skip::skipped(
                "a roles test",
                "psql is not installed (apt-get install postgresql-client); it runs deploy/sql/roles.sql",
            );
            return None;
        };
        // From here on the roles exist: dropped with `roles`, also when an assertion fails.
        assert!(out.status.success(), "roles.sql failed:\n{}", text(&out));
        let mut owner = PgConnection::connect(&db.url).await.unwrap();
        for (login, group) in [
            (&roles.app_login, &roles.enqueue),
            (&roles.relay_login, &roles.relay),
        ] {
            sqlx::query(&format!("CREATE ROLE {login} LOGIN IN ROLE {group}"))
                .execute(&mut owner)
                .await
                .unwrap();
        }
        owner.close().await.ok();
        Some(roles)
    }

    fn app_url(&self) -> String {
        url_as(&self.owner_url, &self.app_login)
    }

    fn relay_url(&self) -> String {
        url_as(&self.owner_url, &self.relay_login)
    }

    async fn pool(url: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect as {url}: {e}"))
    }
}

/// The SQLSTATE of a failed statement ("42501": insufficient_privilege).
fn sqlstate(result: Result<impl Sized, sqlx::Error>) -> String {
    match result {
        Ok(_) => "succeeded".into(),
        Err(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned())
            .unwrap_or_else(|| format!("not a database error: {e}")),
    }
}

/// Runs each statement on `pool` and asserts PostgreSQL refused it for want of a privilege.
async fn assert_refused(pool: &PgPool, who: &str, statements: &[&str]) {
    for sql in statements {
        let code = sqlstate(sqlx::query(sql).execute(pool).await);
        assert_eq!(code, "42501", "{who} must be refused: {sql}");
    }
}

/// The application role enqueues every supported way (the SQL functions, a plain INSERT, an
/// INSERT with ON CONFLICT and RETURNING, the client crate) and is refused everything else:
/// reading, changing or deleting outbox rows, the other outbox tables, and DDL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_role_may_enqueue_and_nothing_else() {
    let db = TestDb::new().await;
    let Some(roles) = Roles::install(&db).await else {
        return;
    };
    let app = Roles::pool(&roles.app_url()).await;

    // The SQL functions (bytea, text and jsonb payloads; idempotent per message id).
    let (_, inserted): (i64, bool) = sqlx::query_as(
        "SELECT id, inserted FROM outbox.enqueue('a.fn', 'x'::bytea, NULL, '{}', 'fn-1')",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    assert!(inserted);
    let (_, again): (i64, bool) = sqlx::query_as(
        "SELECT id, inserted FROM outbox.enqueue('a.fn', 'x'::bytea, NULL, '{}', 'fn-1')",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    assert!(!again, "the existing row is found, as for the owner");
    sqlx::query("SELECT * FROM outbox.enqueue('a.fn', 'text', 'k1')")
        .execute(&app)
        .await
        .unwrap();
    sqlx::query(r#"SELECT * FROM outbox.enqueue('a.fn', '{"j": 1}'::jsonb)"#)
        .execute(&app)
        .await
        .unwrap();
    let many: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT ord, inserted FROM outbox.enqueue_many('a.many', ARRAY['1', '2', '3']::text[], NULL, NULL, ARRAY['m-1', 'm-2', 'm-1'])",
    )
    .fetch_all(&app)
    .await
    .unwrap();
    assert_eq!(many, vec![(1, true), (2, true), (3, false)]);
    // A plain INSERT, and one with the idempotency clause and RETURNING.
    sqlx::query("INSERT INTO outbox.messages (topic, key, payload, headers) VALUES ('a.sql', 'k2', 'p', '{\"h\": \"v\"}')")
        .execute(&app)
        .await
        .unwrap();
    let returned: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox.messages (message_id, topic, payload) VALUES ('sql-1', 'a.sql', 'p')
         ON CONFLICT (message_id) DO NOTHING RETURNING id",
    )
    .fetch_all(&app)
    .await
    .unwrap();
    assert_eq!(returned.len(), 1);
    // The client crate, with generated and with given message ids.
    let mut conn = app.acquire().await.unwrap();
    enqueue_many(
        &mut conn,
        &[
            Message::bytes("a.client", b"c1".to_vec()),
            Message::bytes("a.client", b"c2".to_vec()).key("k3"),
        ],
    )
    .await
    .unwrap();
    let again = enqueue_many(
        &mut conn,
        &[Message::bytes("a.client", b"c3".to_vec()).message_id("fn-1")],
    )
    .await
    .unwrap();
    assert!(!again[0].inserted, "an existing message id is found");
    drop(conn);

    // Everything arrived, and the counts the relay's lag reads were kept by the trigger.
    let topics: Vec<(String, i64)> =
        sqlx::query_as("SELECT topic, count(*) FROM outbox.messages GROUP BY topic ORDER BY topic")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        topics,
        vec![
            ("a.client".to_string(), 2),
            ("a.fn".to_string(), 3),
            ("a.many".to_string(), 2),
            ("a.sql".to_string(), 2),
        ]
    );
    let counted: i64 = sqlx::query_scalar("SELECT sum(n)::bigint FROM outbox.topic_counts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(counted, 9);

    assert_refused(
        &app,
        "the application role",
        &[
            // Outbox rows: no payload, topic, key or header to read; nothing to change.
            "SELECT * FROM outbox.messages",
            "SELECT payload FROM outbox.messages",
            "SELECT topic, key, headers FROM outbox.messages",
            "SELECT payload FROM outbox.sent",
            "UPDATE outbox.messages SET available_at = now()",
            "DELETE FROM outbox.messages",
            "DELETE FROM outbox.messages WHERE id = 1",
            "TRUNCATE outbox.messages",
            // Columns that are the relay's.
            "INSERT INTO outbox.messages (topic, payload, attempts) VALUES ('t', 'p', 5)",
            "INSERT INTO outbox.messages (topic, payload, created_at) VALUES ('t', 'p', now())",
            // The other outbox tables.
            "SELECT * FROM outbox.dead_letters",
            "SELECT * FROM outbox.topic_counts",
            "INSERT INTO outbox.topic_counts VALUES ('t', 1)",
            "SELECT * FROM outbox.relays",
            "SELECT * FROM outbox.relay_sleepers",
            "SELECT * FROM outbox.claim_floor",
            "UPDATE outbox.claim_floor SET floor = 0",
            "SELECT * FROM outbox.parked_keys",
            "SELECT * FROM outbox.partition_leases",
            "SELECT * FROM outbox.ordering_members",
            "SELECT * FROM outbox._sqlx_migrations",
            // DDL.
            "CREATE TABLE outbox.mine (a int)",
            "CREATE TABLE public.mine (a int)",
            "CREATE FUNCTION outbox.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "ALTER TABLE outbox.messages ADD COLUMN mine int",
            "DROP TABLE outbox.messages",
        ],
    )
    .await;
    app.close().await;
}

/// The relay binary, run as the relay role, does its whole job to NATS: claims, publishes,
/// marks (keeping sent rows with retention on, and cleaning old ones), dead-letters, heartbeats
/// and leases slots; `status`, `dead list` and `keys list` work as that role. The role may not
/// create tables (outbox, public), change or drop outbox tables, and `migrate` says it must run
/// as the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_role_relays_end_to_end_and_may_not_change_the_schema() {
    let db = TestDb::new().await;
    let Some(roles) = Roles::install(&db).await else {
        return;
    };
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;

    // An old sent row, past the retention period: the relay's cleanup deletes it.
    sqlx::query(
        "INSERT INTO outbox.sent (id, message_id, topic, payload, headers, created_at, attempts, sent_at)
         VALUES (-1, 'old-sent', 'r.old', 'p', '{}', now() - interval '2 hours', 0, now() - interval '2 hours')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // The application enqueues, as the application role: keyed and unkeyed rows, and one whose
    // subject NATS cannot carry (dead-lettered at its first attempt).
    let app = Roles::pool(&roles.app_url()).await;
    let mut messages: Vec<Message> = (0..20)
        .map(|i| {
            Message::bytes("r.ok", format!("m{i}").into_bytes())
                .message_id(format!("ok-{i}"))
                .key(format!("k{}", i % 3))
        })
        .collect();
    messages.push(Message::bytes("r.plain", b"unkeyed".to_vec()).message_id("plain-1"));
    messages.push(Message::bytes("r.sp ace", b"x".to_vec()).message_id("bad-1"));
    enqueue_many(&mut app.acquire().await.unwrap(), &messages)
        .await
        .unwrap();
    app.close().await;

    let relay_url = roles.relay_url();
    let relay = RelayProcess::start(&nats_config(
        &relay_url,
        &nats_url(),
        &stream,
        &prefix,
        "retention_secs = 3600\nmaintenance_interval_secs = 1\nlag_interval_secs = 1",
    ));
    let got = consumer.collect(21, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 21, "relay stderr:\n{}", relay.stderr());
    wait_until(
        Duration::from_secs(30),
        "every row sent or dead-lettered, and the old sent row cleaned",
        || async {
            let (waiting, dead, sent, old): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM outbox.messages), (SELECT count(*) FROM outbox.dead_letters),
                        (SELECT count(*) FROM outbox.sent WHERE id > 0),
                        (SELECT count(*) FROM outbox.sent WHERE id < 0)",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            waiting == 0 && dead == 1 && sent == 21 && old == 0
        },
    )
    .await;
    // The heartbeat and the ordered mode's slot leases, written as the relay role.
    let (relays, leased): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox.relays),
                (SELECT count(*) FROM outbox.partition_leases WHERE relay_id IS NOT NULL)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (relays, leased),
        (1, 256),
        "one live relay holding every slot"
    );

    // The operator's commands, as the relay role.
    let cli = |args: &[&str]| relay_cli(&relay_url, args);
    let status = cli(&["status"]);
    assert!(status.status.success(), "status:\n{}", text(&status));
    assert!(
        text(&status).contains("r.sp ace"),
        "status shows the dead letter's topic:\n{}",
        text(&status)
    );
    let dead = cli(&["dead", "list"]);
    assert!(dead.status.success(), "dead list:\n{}", text(&dead));
    assert!(text(&dead).contains("r.sp ace"), "{}", text(&dead));
    let keys = cli(&["keys", "list"]);
    assert!(keys.status.success(), "keys list:\n{}", text(&keys));
    for args in [
        &["dead", "retry", "--topic", "r.sp ace", "--dry-run"][..],
        &["dead", "purge", "--topic", "r.sp ace", "--dry-run"],
        &[
            "topics",
            "pause",
            "r.paused",
            "--reason",
            "as the relay role",
        ],
        &["topics", "list"],
        &["topics", "resume", "r.paused"],
        &[
            "replay",
            "--from-id",
            "1",
            "--to-id",
            "1000000",
            "--dry-run",
        ],
        &["audit"],
    ] {
        let out = cli(args);
        assert!(out.status.success(), "{args:?}:\n{}", text(&out));
    }

    // No DDL.
    let relay_pool = Roles::pool(&relay_url).await;
    assert_refused(
        &relay_pool,
        "the relay role",
        &[
            "CREATE TABLE outbox.mine (a int)",
            "CREATE TABLE public.mine (a int)",
            "CREATE INDEX ON outbox.messages (payload)",
            "ALTER TABLE outbox.messages ADD COLUMN mine int",
            "ALTER TABLE outbox.dead_letters SET (autovacuum_enabled = false)",
            "DROP TABLE outbox.relays",
            "TRUNCATE outbox.dead_letters",
            "CREATE FUNCTION outbox.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "INSERT INTO outbox._sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99, 'x', true, '', 0)",
        ],
    )
    .await;
    relay_pool.close().await;

    let migrate = cli(&["migrate"]);
    assert_eq!(
        migrate.status.code(),
        Some(1),
        "migrate as the relay role:\n{}",
        text(&migrate)
    );
    let said = text(&migrate);
    assert!(
        said.contains(&format!("database role \"{}\"", roles.relay_login))
            && said.contains("belong to role \"postgres\"")
            && said.contains("Roles: least privilege"),
        "migrate names the role, the owner and where to read more:\n{said}"
    );
    assert!(
        !relay.stderr().contains("permission denied"),
        "the relay was refused something:\n{}",
        relay.stderr()
    );
}

/// `run` as a role that lacks one of the relay's privileges stops at start with an error that
/// names the privilege and where the grants are; a command refused by PostgreSQL mid-way says
/// the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_privilege_is_named_at_start() {
    let db = TestDb::new().await;
    let Some(roles) = Roles::install(&db).await else {
        return;
    };
    db.execute(&format!(
        "REVOKE UPDATE ON outbox.claim_floor FROM {}; REVOKE SELECT ON SEQUENCE outbox.messages_id_seq FROM {0}",
        roles.relay
    ))
    .await;
    let mut relay = RelayProcess::start(&nats_config(
        &roles.relay_url(),
        &nats_url(),
        &unique("S"),
        &unique("t"),
        "",
    ));
    let code = relay.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "the relay stops:\n{}", relay.stderr());
    let said = relay.stderr();
    assert!(
        said.contains(&format!(
            "database role \"{}\" lacks privileges",
            roles.relay_login
        )) && said
            .contains("SELECT on sequence outbox.messages_id_seq, UPDATE on outbox.claim_floor")
            && said.contains("deploy/sql/roles.sql")
            && said.contains("docs/security.md"),
        "{said}"
    );

    db.execute(&format!(
        "REVOKE SELECT ON outbox.dead_letters FROM {}",
        roles.relay
    ))
    .await;
    let out = relay_cli(&roles.relay_url(), &["dead", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("permission denied for table dead_letters")
            && text(&out).contains("Roles: least privilege"),
        "{}",
        text(&out)
    );
}

/// The script grants the relay role exactly the privileges `run` checks for (no more), is
/// idempotent, and refuses to run as a role that does not own the outbox tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_script_grants_what_the_relay_checks_and_nothing_more() {
    let db = TestDb::new().await;
    let Some(roles) = Roles::install(&db).await else {
        return;
    };
    // Something granted by hand since: the next run of the script takes it back.
    db.execute(&format!(
        "GRANT SELECT ON outbox.dead_letters TO {}",
        roles.enqueue
    ))
    .await;
    let again = run_roles_script(&db.url, &roles.enqueue, &roles.relay).unwrap();
    assert!(again.status.success(), "{}", text(&again));

    let granted: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema || '.' || table_name, privilege_type FROM information_schema.role_table_grants
          WHERE grantee::text = $1 ORDER BY 1, 2",
    )
    .bind(&roles.relay)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut wanted: Vec<(String, String)> = outbox_relay::store::privileges::RELAY_TABLES
        .iter()
        .flat_map(|(t, ps)| ps.iter().map(|p| (t.to_string(), p.to_string())))
        .collect();
    wanted.sort();
    assert_eq!(granted, wanted);
    let enqueue_tables: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT table_name::text FROM information_schema.role_column_grants WHERE grantee::text = $1
         UNION SELECT DISTINCT table_name::text FROM information_schema.role_table_grants WHERE grantee::text = $1
         ORDER BY 1",
    )
    .bind(&roles.enqueue)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(enqueue_tables, vec!["messages", "sent"]);

    let relay = Roles::pool(&roles.relay_url()).await;
    outbox_relay::store::privileges::check_relay(&relay, "run")
        .await
        .expect("the relay role has what `run` needs");
    let app = Roles::pool(&roles.app_url()).await;
    let refused = outbox_relay::store::privileges::check_relay(&app, "run")
        .await
        .expect_err("the application role is not the relay role")
        .to_string();
    assert!(refused.contains("SELECT on outbox.messages"), "{refused}");
    app.close().await;
    relay.close().await;

    // Run as the relay's login role, the script says whom to run it as.
    let out = run_roles_script(&roles.relay_url(), &roles.enqueue, &roles.relay).unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("run this script as postgres, the owner of the outbox tables"),
        "{}",
        text(&out)
    );
}

/// With autovacuum off and the relay running as the relay role (which owns no table), the relay
/// says once which tables it may not vacuum and stops trying; the owner may vacuum them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_may_not_vacuum_says_so_once() {
    let db = TestDb::new().await;
    let Some(roles) = Roles::install(&db).await else {
        return;
    };
    let mut owner = db.pool.acquire().await.unwrap();
    assert!(outbox_relay::store::vacuum::not_vacuumable(&mut *owner)
        .await
        .unwrap()
        .is_empty());
    drop(owner);
    let relay_pool = Roles::pool(&roles.relay_url()).await;
    let denied = outbox_relay::store::vacuum::not_vacuumable(&relay_pool)
        .await
        .unwrap();
    assert_eq!(denied, outbox_relay::store::vacuum::TABLES);
    relay_pool.close().await;

    db.execute("ALTER TABLE outbox.messages SET (autovacuum_enabled = false)")
        .await;
    let stream = unique("S");
    let _created = DeleteStreamOnDrop {
        url: nats_url(),
        stream: stream.clone(),
    };
    let relay = RelayProcess::start(&nats_config(
        &roles.relay_url(),
        &nats_url(),
        &stream,
        &unique("t"),
        "maintenance_interval_secs = 1",
    ));
    wait_until(
        Duration::from_secs(30),
        "the warning about VACUUM",
        || async { relay.stderr().contains("may not VACUUM") },
    )
    .await;
    // Two more rounds of the maintenance tasks (each folds the count deltas written here).
    for round in 0..2 {
        db.execute("INSERT INTO outbox.topic_counts VALUES ('v', 1), ('v', -1)")
            .await;
        wait_until(
            Duration::from_secs(30),
            &format!("compaction round {round}"),
            || async {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.topic_counts")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap()
                    == 0
            },
        )
        .await;
    }
    let said = relay.stderr();
    assert_eq!(said.matches("may not VACUUM").count(), 1, "{said}");
    assert!(
        said.contains("outbox.messages, outbox.topic_counts"),
        "{said}"
    );
    assert!(!said.contains("maintenance task failed"), "{said}");
}

/// The owner need not be a superuser: a plain role with CREATE on the database migrates (and,
/// once the schema is there, migrates again without CREATE on the database), and runs the
/// script, which without CREATEROLE says which roles to have created first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_owner_role_migrates_and_runs_the_script() {
    let db = TestDb::empty().await;
    let (owner, enqueue, relay) = (unique("own"), unique("enq"), unique("rel"));
    let _cleanup = DropRoles {
        url: db.url.clone(),
        names: vec![owner.clone(), enqueue.clone(), relay.clone()],
    };
    db.execute(&format!(
        "CREATE ROLE {owner} LOGIN; GRANT CREATE ON DATABASE {} TO {owner}",
        db.name
    ))
    .await;
    let owner_url = url_as(&db.url, &owner);
    let migrate = || relay_cli(&owner_url, &["migrate"]);
    let first = migrate();
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("applied"), "{}", text(&first));
    let tables_owner: String = sqlx::query_scalar(
        "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = 'outbox.messages'::regclass",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables_owner, owner);
    db.execute(&format!(
        "REVOKE CREATE ON DATABASE {} FROM {owner}",
        db.name
    ))
    .await;
    let again = migrate();
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("is up to date"), "{}", text(&again));

    let Some(out) = run_roles_script(&owner_url, &enqueue, &relay) else {
        skip::skipped(
            "a_plain_owner_role_migrates_and_runs_the_script (the script part)",
            "psql is not installed (apt-get install postgresql-client)",
        );
        return;
    };
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!(
            "role {enqueue} does not exist, and role {owner} may not create roles"
        )) && text(&out).contains(&format!("CREATE ROLE {enqueue} NOLOGIN")),
        "{}",
        text(&out)
    );
    db.execute(&format!(
        "CREATE ROLE {enqueue} NOLOGIN; CREATE ROLE {relay} NOLOGIN"
    ))
    .await;
    let out = run_roles_script(&owner_url, &enqueue, &relay).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let may_insert: bool = sqlx::query_scalar(
        "SELECT has_column_privilege($1, 'outbox.messages', 'payload', 'INSERT')",
    )
    .bind(&enqueue)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(may_insert);
}
