//! The relay's migration history lives in `outbox._sqlx_migrations`, apart from the
//! application's `public._sqlx_migrations`: an application that uses sqlx migrations and the
//! relay migrate the same database in either order, again and again, and a history an earlier
//! relay left in the public table is moved over.

mod support;

use std::path::Path;

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
