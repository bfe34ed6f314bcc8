//! The relay's migration history lives in `outbox._sqlx_migrations`, apart from the
//! application's `public._sqlx_migrations`: an application that uses sqlx migrations and the
//! relay migrate the same database in either order, again and again, and a history an earlier
//! relay left in the public table is moved over.

mod support;

use std::path::Path;
use std::time::Duration;

use outbox_relay::store;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgPool};
use support::*;

/// An application's own sqlx migrations: one table of its own, as `sqlx::migrate!()` would
/// apply them.
async fn app_migrator(dir: &Path) -> Migrator {
    std::fs::write(
        dir.join("20240101000000_users.sql"),
        "CREATE TABLE app_users (id bigint PRIMARY KEY, email text NOT NULL);",
    )
    .unwrap();
    Migrator::new(dir).await.unwrap()
}

async fn versions(pool: &PgPool, table: &str) -> Vec<i64> {
    let present: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
    if !present {
        return Vec::new();
    }
    sqlx::query_scalar(&format!("SELECT version FROM {table} ORDER BY version"))
        .fetch_all(pool)
        .await
        .unwrap()
}

fn relay_versions() -> Vec<i64> {
    store::MIGRATOR.iter().map(|m| m.version).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_first_then_relay_then_both_again() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let app = app_migrator(dir.path()).await;
    app.run(&db.pool).await.unwrap();
    store::migrate(&db.pool).await.unwrap();
    app.run(&db.pool)
        .await
        .expect("the application's migrator still finds only its own versions");
    store::migrate(&db.pool).await.unwrap();
    assert_eq!(
        versions(&db.pool, "public._sqlx_migrations").await,
        [20240101000000]
    );
    assert_eq!(
        versions(&db.pool, "outbox._sqlx_migrations").await,
        relay_versions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_first_then_application_then_both_again() {
    let db = TestDb::empty().await;
    store::migrate(&db.pool).await.unwrap();
    assert!(
        versions(&db.pool, "public._sqlx_migrations")
            .await
            .is_empty(),
        "the relay writes nothing into the public history"
    );
    let dir = tempfile::tempdir().unwrap();
    let app = app_migrator(dir.path()).await;
    app.run(&db.pool).await.unwrap();
    store::migrate(&db.pool).await.unwrap();
    app.run(&db.pool).await.unwrap();
    assert_eq!(
        versions(&db.pool, "public._sqlx_migrations").await,
        [20240101000000]
    );
    assert_eq!(
        versions(&db.pool, "outbox._sqlx_migrations").await,
        relay_versions()
    );
    // The relay's session settings did not leak into the pool.
    let search_path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!search_path.starts_with("outbox"), "{search_path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_left_in_the_public_table_is_moved_over_and_the_application_keeps_its_own() {
    let db = TestDb::empty().await;
    // What a relay before this change did: its history in public._sqlx_migrations, beside
    // the application's.
    store::MIGRATOR.run(&db.pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = app_migrator(dir.path()).await;
    // On a connection of its own: sqlx's migrator returns this error while still holding its
    // advisory lock, which must end with the session.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let shared = app.run(&mut conn).await;
    conn.close().await.unwrap();
    assert!(
        shared.is_err(),
        "sharing one history breaks the application's migrator"
    );
    let mut expected = relay_versions();
    assert_eq!(
        versions(&db.pool, "public._sqlx_migrations").await,
        expected
    );

    store::migrate(&db.pool).await.unwrap();
    assert_eq!(
        versions(&db.pool, "outbox._sqlx_migrations").await,
        expected
    );
    assert!(versions(&db.pool, "public._sqlx_migrations")
        .await
        .is_empty());
    app.run(&db.pool)
        .await
        .expect("the application migrates once the relay's rows are gone");
    store::migrate(&db.pool).await.unwrap();
    expected.sort_unstable();
    assert_eq!(
        versions(&db.pool, "outbox._sqlx_migrations").await,
        expected
    );
    assert_eq!(
        versions(&db.pool, "public._sqlx_migrations").await,
        [20240101000000]
    );
}

/// The storage migrations (0006 to 0008: the claim floor and the set-aside indexes) on a
/// database at the schema before them, with rows waiting, retrying, delayed, of a parked key,
/// and one in flight (locked by a claim that is still open while the migration runs): every row
/// is kept, untouched, and each is claimable when it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_migration_keeps_waiting_retrying_delayed_parked_and_in_flight_rows() {
    use std::borrow::Cow;

    let db = TestDb::empty().await;
    // The schema as it was before the claim floor: the relay's migrations up to 0005.
    let before = Migrator {
        migrations: Cow::Owned(
            store::MIGRATOR
                .iter()
                .filter(|m| m.version <= 5)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    let mut conn = db.pool.acquire().await.unwrap().detach();
    sqlx::query("CREATE SCHEMA outbox")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("SET search_path TO outbox, public")
        .execute(&mut conn)
        .await
        .unwrap();
    before.run(&mut conn).await.unwrap();
    conn.close().await.unwrap();

    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox.messages (topic, key, payload)
         SELECT 'm.x', 'k' || (g % 3), convert_to('row ' || g, 'UTF8')
           FROM generate_series(1, 12) g
         RETURNING id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // Retrying (due in an hour), delayed (an hour), and key k2 parked.
    sqlx::query(
        "UPDATE outbox.messages SET attempts = 1, available_at = now() + interval '1 hour',
                last_error = 'broker down' WHERE id = $1",
    )
    .bind(ids[0])
    .execute(&db.pool)
    .await
    .unwrap();
    let delayed: i64 = sqlx::query_scalar(
        "SELECT id FROM outbox.enqueue('m.x', 'later'::bytea, p_available_at => now() + interval '1 hour')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox.parked_keys (key, topic, dead_id, message_id, reason)
         VALUES ('k2', 'm.x', 0, 'gone', 'rejected')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before_rows: Vec<(i64, String, i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT id, message_id, attempts, available_at FROM outbox.messages ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();

    // In flight: a claim holds the newest row while the migration runs.
    let mut claim = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox.messages WHERE id = $1 FOR UPDATE")
        .bind(ids[11])
        .execute(&mut *claim)
        .await
        .unwrap();
    // The migration runs beside the open claim. The index builds do not wait for it (a READ
    // COMMITTED claim between statements holds no snapshot for them to wait for); dropping the
    // old per-topic index concurrently waits for the transactions that use the table, so it
    // finishes once the claim ends, as a relay's claim does within relay.claim_timeout_secs.
    // The claim keeps its row all along, then ends as a relay's would when its broker
    // confirmed nothing: rolled back.
    let (migrated, ()) = tokio::join!(store::migrate(&db.pool), async {
        wait_until(
            Duration::from_secs(60),
            "the index swap waits for the open claim",
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND wait_event_type = 'Lock'
                        AND query LIKE '%DROP INDEX CONCURRENTLY IF EXISTS outbox.messages_topic_id_idx%')",
                )
                .fetch_one(&db.pool)
                .await
                .unwrap()
            },
        )
        .await;
        let still_locked: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM outbox.messages WHERE id = $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(ids[11])
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            still_locked, None,
            "the claim kept its lock through the migration"
        );
        claim.rollback().await.unwrap();
    });
    migrated.unwrap();
    assert_eq!(
        versions(&db.pool, "outbox._sqlx_migrations").await,
        relay_versions()
    );

    let after_rows: Vec<(i64, String, i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT id, message_id, attempts, available_at FROM outbox.messages ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(after_rows, before_rows, "every row kept as it was");

    // Raise the floor as the relay does, then claim: the due rows of unparked keys whose
    // heads are not waiting. k1's head is retrying (held back), k2 is parked: k0 goes, the
    // row that was in flight included.
    let mut floor_conn = db.pool.acquire().await.unwrap().detach();
    let mut pending = None;
    let floor = loop {
        match store::floor::advance(&mut floor_conn, pending.as_ref())
            .await
            .unwrap()
        {
            store::floor::Step::Noted(h) => pending = Some(h),
            store::floor::Step::Raised { floor, .. } => break floor,
            other => panic!("the floor did not rise: {other:?}"),
        }
    };
    assert!(floor <= ids[1], "the oldest fresh waiting row is the floor");
    let all: Vec<i16> = (0..store::SLOTS as i16).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim_ordered(&mut tx, 100, &[], &all, floor)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let got: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let k0: Vec<i64> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % 3 == 0)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(got, k0, "key k0's rows, in order");

    // Everything due and unparked: every row comes back.
    sqlx::query("UPDATE outbox.messages SET available_at = created_at + interval '1 millisecond' WHERE available_at > now()")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox.parked_keys")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim_ordered(&mut tx, 100, &[], &all, floor)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut got: Vec<i64> = rows.iter().map(|r| r.id).collect();
    got.sort();
    let mut expected: Vec<i64> = ids.clone();
    expected.push(delayed);
    assert_eq!(got, expected);
}
