//! The claim statements themselves, against a real database: with a topic excluded (its sink's
//! circuit open) both the unordered and the ordered claim take the per-topic form
//! (docs/architecture.md, "While a sink's circuit is open"), and must return the same rows the
//! plain form would: only non-excluded topics, oldest first, every active topic served, and in
//! ordered mode still a per-key prefix.

mod support;

use outbox_client::{enqueue_many, Message};
use outbox_relay::{db, ordering};
use support::*;

async fn fill(db: &TestDb) {
    // Interleaved: down.x (excluded) first and most, then a.x and b.x; keyed rows for b.x.
    let mut batch = Vec::new();
    for i in 0..300 {
        batch.push(
            Message::bytes("down.x", format!("d{i}").into_bytes()).key(format!("d{}", i % 7)),
        );
    }
    for i in 0..40 {
        batch.push(Message::bytes("a.x", format!("a{i}").into_bytes()));
        batch.push(Message::bytes("b.x", format!("b{i}").into_bytes()).key(format!("k{}", i % 4)));
    }
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();
    db::compact_counts(&mut db.pool.acquire().await.unwrap())
        .await
        .unwrap();
}

fn assert_claimed(rows: &[outbox_relay::sinks::OutboxRow], limit: usize) {
    assert!(
        !rows.is_empty() && rows.len() <= limit,
        "{} rows",
        rows.len()
    );
    assert!(
        rows.iter().all(|r| r.topic != "down.x"),
        "an excluded topic was claimed"
    );
    assert!(
        rows.windows(2).all(|w| w[0].id < w[1].id),
        "not in id order"
    );
    for topic in ["a.x", "b.x"] {
        assert!(
            rows.iter().any(|r| r.topic == topic),
            "{topic} got no share"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_with_an_excluded_topic_serve_every_other_topic_oldest_first() {
    let db = TestDb::new().await;
    fill(&db).await;
    let excluded = vec!["down.x".to_string()];

    let mut tx = db.pool.begin().await.unwrap();
    let rows = db::claim(&mut tx, 20, &excluded).await.unwrap();
    assert_claimed(&rows, 20);
    // Each active topic's share is its oldest rows.
    for topic in ["a.x", "b.x"] {
        let oldest: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM outbox.messages WHERE topic = $1 ORDER BY id LIMIT 10",
        )
        .bind(topic)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let got: Vec<i64> = rows
            .iter()
            .filter(|r| r.topic == topic)
            .map(|r| r.id)
            .collect();
        assert_eq!(got, oldest, "{topic}: its 10 oldest rows");
    }
    tx.rollback().await.unwrap();

    // Ordered: all slots owned; b.x's keyed rows come as per-key prefixes.
    let slots: Vec<i16> = (0..ordering::SLOTS as i16).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let rows = ordering::sql::claim(&mut tx, 20, &excluded, &slots)
        .await
        .unwrap();
    assert_claimed(&rows, 20);
    for key in ["k0", "k1", "k2", "k3"] {
        let got: Vec<i64> = rows
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .map(|r| r.id)
            .collect();
        let prefix: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM outbox.messages WHERE key = $1 ORDER BY id LIMIT $2",
        )
        .bind(key)
        .bind(got.len() as i64)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(got, prefix, "key {key}: a prefix of its rows");
    }
    // The idle poll agrees: something is claimable outside down.x, nothing when all is excluded.
    assert!(db::any_available(&mut *tx, &excluded).await.unwrap());
    let everything = vec!["down.x".into(), "a.x".into(), "b.x".into()];
    assert!(!db::any_available(&mut *tx, &everything).await.unwrap());
    assert!(db::claim(&mut tx, 20, &everything)
        .await
        .unwrap()
        .is_empty());
    tx.rollback().await.unwrap();
}
