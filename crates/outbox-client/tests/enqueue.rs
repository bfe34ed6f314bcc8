//! The client against a real PostgreSQL, a fresh migrated database per test: the crate's example
//! runs as written, and a conflicting row that vanishes before it can be read is reported as
//! [`Error::ConflictVanished`].

use outbox_client::{enqueue, enqueue_many, Error, Message};
use outbox_testkit::names::unique;
use outbox_testkit::pg::TestDb;

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../examples/enqueue.rs"]
mod example;

#[tokio::test]
async fn the_example_writes_the_user_and_its_event_in_one_transaction() {
    let db = TestDb::new().await;
    let enqueued = example::run(&db.url).await.expect("the example runs");
    assert!(enqueued.inserted);
    let (user_id,): (i64,) = sqlx::query_as("SELECT id FROM example_users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (topic, key, payload, headers): (String, Option<String>, Vec<u8>, serde_json::Value) =
        sqlx::query_as("SELECT topic, key, payload, headers FROM outbox.messages WHERE id = $1")
            .bind(enqueued.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(topic, "user.created");
    assert_eq!(key, Some(user_id.to_string()));
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"id": user_id, "email": "ada@example.com"})
    );
    assert_eq!(headers["source"], "signup");
    assert_eq!(headers["content-type"], "application/json");
}

#[tokio::test]
async fn the_example_says_to_migrate_when_the_outbox_schema_is_missing() {
    let db = TestDb::empty().await;
    let err = example::run(&db.url).await.unwrap_err().to_string();
    assert!(err.contains("run `outbox-relay migrate` first"), "{err}");
}

#[tokio::test]
async fn a_conflicting_row_that_vanishes_on_every_attempt_is_conflict_vanished() {
    let db = TestDb::new().await;
    // A role that cannot see the rows of topic `vanishing` (row-level security): their message
    // ids conflict on insert, but the lookup of the existing row finds nothing, as when the
    // relay deletes the row in between. Roles are cluster-wide: named uniquely, dropped below.
    let role = unique("outbox_vanish");
    for sql in [
        format!("CREATE ROLE {role} NOLOGIN"),
        format!("GRANT USAGE ON SCHEMA outbox TO {role}"),
        format!("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA outbox TO {role}"),
        "ALTER TABLE outbox.messages ENABLE ROW LEVEL SECURITY".into(),
        format!(
            "CREATE POLICY see ON outbox.messages FOR SELECT TO {role} USING (topic <> 'vanishing')"
        ),
        format!("CREATE POLICY add ON outbox.messages FOR INSERT TO {role} WITH CHECK (true)"),
        "INSERT INTO outbox.messages (topic, payload, message_id) VALUES ('vanishing', 'x', 'gone')"
            .into(),
    ] {
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
    }
    let result = async {
        let mut tx = db.pool.begin().await?;
        sqlx::query(&format!("SET LOCAL ROLE {role}"))
            .execute(&mut *tx)
            .await?;
        let one = enqueue(
            &mut tx,
            &Message::bytes("t", b"x".to_vec()).message_id("gone"),
        )
        .await;
        let many = enqueue_many(
            &mut tx,
            &[
                Message::bytes("t", b"a".to_vec()).message_id("fine"),
                Message::bytes("t", b"b".to_vec()).message_id("gone"),
            ],
        )
        .await;
        tx.rollback().await?;
        Ok::<_, sqlx::Error>((one, many))
    }
    .await;
    for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(&sql).execute(&db.pool).await.unwrap();
    }
    let (one, many) = result.unwrap();
    for r in [one.map(|_| ()), many.map(|_| ())] {
        match r {
            Err(e @ Error::ConflictVanished { .. }) => {
                assert!(e.is_retriable());
                let Error::ConflictVanished { message_id } = e else {
                    unreachable!()
                };
                assert_eq!(message_id, "gone");
            }
            other => panic!("expected ConflictVanished, got {other:?}"),
        }
    }
}
