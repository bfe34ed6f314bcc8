//! The claim statements themselves, against a real database: with a topic excluded (its sink's
//! circuit open) both the unordered and the ordered claim take the per-topic form
//! (docs/architecture.md, "While a sink's circuit is open"), and must return the same rows the
//! plain form would: only non-excluded topics, oldest first, every active topic served, and in
//! ordered mode still a per-key prefix.

mod support;

use outbox_client::{enqueue_many, Message};
use outbox_relay::store;
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
    store::compact_counts(&mut db.pool.acquire().await.unwrap())
        .await
        .unwrap();
}

fn assert_claimed(rows: &[outbox_relay::message::Claimed], limit: usize) {
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
    let rows = store::claim(&mut tx, 20, &excluded, 0).await.unwrap();
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
    let slots: Vec<i16> = (0..store::SLOTS as i16).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim_ordered(&mut tx, 20, &excluded, &slots, 0)
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
    assert!(store::any_available(&mut *tx, &excluded, 0).await.unwrap());
    let everything = vec!["down.x".into(), "a.x".into(), "b.x".into()];
    assert!(!store::any_available(&mut *tx, &everything, 0)
        .await
        .unwrap());
    assert!(store::claim(&mut tx, 20, &everything, 0)
        .await
        .unwrap()
        .is_empty());
    tx.rollback().await.unwrap();
}

/// The plain ordered claim (nothing excluded) finds the rows that stop a key by one pass over
/// the scanned `id` range (`gaps`), not by per-key probes: each key must still come back as a
/// prefix of its waiting rows, cut at the first row that is locked by another transaction,
/// delayed, or waiting for a retry, and not at all when its head is such a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_claim_cuts_each_key_at_its_first_unclaimable_row() {
    let db = TestDb::new().await;
    // Interleaved keys, as enqueued by concurrent aggregates, plus unkeyed rows.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut batch = Vec::new();
    for i in 0..6 {
        for key in [
            "free",
            "locked_mid",
            "locked_head",
            "delayed_mid",
            "retry_head",
        ] {
            let mut m = Message::bytes("t.x", format!("{key}{i}").into_bytes()).key(key);
            if key == "delayed_mid" && i == 3 {
                m = m.available_at(later);
            }
            batch.push(m);
        }
        batch.push(Message::bytes("t.x", format!("plain{i}").into_bytes()));
    }
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();
    let ids_of = |key: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM outbox.messages WHERE key = $1 ORDER BY id",
            )
            .bind(key)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let (free, locked_mid, locked_head, delayed_mid) = (
        ids_of("free").await,
        ids_of("locked_mid").await,
        ids_of("locked_head").await,
        ids_of("delayed_mid").await,
    );
    // A retry is waiting on retry_head's first row (attempts > 0, due later).
    sqlx::query(
        "UPDATE outbox.messages SET attempts = 1, available_at = now() + interval '1 hour'
          WHERE id = (SELECT min(id) FROM outbox.messages WHERE key = 'retry_head')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Another relay holds locked_mid's 3rd row and locked_head's 1st row.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox.messages WHERE id = ANY($1) FOR UPDATE")
        .bind(vec![locked_mid[2], locked_head[0]])
        .fetch_all(&mut *other)
        .await
        .unwrap();

    let slots: Vec<i16> = (0..store::SLOTS as i16).collect();
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim_ordered(&mut tx, 1000, &[], &slots, 0)
        .await
        .unwrap();
    let got = |key: &str| -> Vec<i64> {
        rows.iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(
        got("free"),
        free,
        "a key with nothing in its way: every row"
    );
    assert_eq!(got("locked_mid"), locked_mid[..2], "cut at the locked row");
    assert!(got("locked_head").is_empty(), "head locked: nothing");
    assert_eq!(
        got("delayed_mid"),
        delayed_mid[..3],
        "cut at the delayed row"
    );
    assert!(
        got("retry_head").is_empty(),
        "head waiting for a retry: nothing"
    );
    assert_eq!(rows.iter().filter(|r| r.key.is_none()).count(), 6);
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "id order");
    tx.rollback().await.unwrap();

    // With a batch limit that ends inside the keys, and only some slots owned, each key is
    // still a prefix and no key of a slot not owned comes back.
    let slot_of: i16 =
        sqlx::query_scalar("SELECT slot FROM outbox.messages WHERE key = 'free' LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let rows = store::claim_ordered(&mut tx, 10, &[], &[slot_of], 0)
        .await
        .unwrap();
    assert!(!rows.is_empty() && rows.len() <= 10);
    for r in rows.iter().filter(|r| r.key.is_some()) {
        let slot: i16 = sqlx::query_scalar("SELECT slot FROM outbox.messages WHERE id = $1")
            .bind(r.id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(slot, slot_of, "row {} of a slot not owned", r.id);
    }
    let got_free: Vec<i64> = rows
        .iter()
        .filter(|r| r.key.as_deref() == Some("free"))
        .map(|r| r.id)
        .collect();
    assert_eq!(got_free, free[..got_free.len()], "a prefix of free's rows");
    tx.rollback().await.unwrap();
    other.rollback().await.unwrap();
}
