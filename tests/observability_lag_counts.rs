//! The lag counts (`outbox.topic_counts` deltas, read by `store::lag`) stay exact while enqueuers,
//! relay deletes (mark sent, retention moves, dead letters, retries, rollbacks) and count
//! compaction all run concurrently. Checked two ways: in any single snapshot the deltas add up
//! to `COUNT(*)` per topic, and at the end `store::lag` equals `COUNT(*)` per topic.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_client::{enqueue_many, Message};
use outbox_relay::store;
use support::*;

const TOPICS: [&str; 3] = ["lag.a", "lag.b", "lag.c"];

async fn counts_in_one_snapshot(
    pool: &sqlx::PgPool,
) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .unwrap();
    let deltas: Vec<(String, i64)> = sqlx::query_as(
        "SELECT topic, sum(n)::bigint FROM outbox.topic_counts GROUP BY topic HAVING sum(n) <> 0",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let real: Vec<(String, i64)> =
        sqlx::query_as("SELECT topic, count(*) FROM outbox.messages GROUP BY topic")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.commit().await.unwrap();
    (deltas.into_iter().collect(), real.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_counts_stay_exact_under_concurrent_enqueue_delete_and_compaction() {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    let enqueuers_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let enqueued = Arc::new(AtomicU64::new(0));
    let removed = Arc::new(AtomicU64::new(0));
    let compactions = Arc::new(AtomicU64::new(0));
    let mut enqueuers = Vec::new();
    for w in 0..4u64 {
        let (pool, enqueued) = (pool.clone(), Arc::clone(&enqueued));
        enqueuers.push(tokio::spawn(async move {
            for i in 0..250u64 {
                let n = 1 + ((w * 7 + i * 13) % 20) as usize;
                let batch: Vec<Message> = (0..n)
                    .map(|j| {
                        let topic = TOPICS[(i as usize + j) % TOPICS.len()];
                        let m = Message::bytes(topic, vec![j as u8; 16]);
                        // Every 10th batch repeats an earlier id: a no-op that must not count.
                        if j == 0 && i % 10 == 9 {
                            m.message_id(format!("dup-{w}-{}", i - 1))
                        } else if j == 0 {
                            m.message_id(format!("dup-{w}-{i}"))
                        } else {
                            m
                        }
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                let rows = enqueue_many(&mut tx, &batch).await.unwrap();
                if i % 5 == 4 {
                    tx.rollback().await.unwrap(); // rolled back: its deltas vanish with it
                } else {
                    tx.commit().await.unwrap();
                    enqueued.fetch_add(
                        rows.iter().filter(|r| r.inserted).count() as u64,
                        Ordering::Relaxed,
                    );
                }
            }
        }));
    }
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let (pool, done, removed) = (
            pool.clone(),
            Arc::clone(&enqueuers_done),
            Arc::clone(&removed),
        );
        workers.push(tokio::spawn(async move {
            let mut round = 0u64;
            loop {
                round += 1;
                let mut tx = pool.begin().await.unwrap();
                let rows = store::claim(&mut tx, 40, &[], 0).await.unwrap();
                if rows.is_empty() {
                    tx.commit().await.unwrap();
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    tokio::task::yield_now().await;
                    continue;
                }
                let ids: Vec<_> = rows.iter().map(|r| r.locked()).collect();
                // A mix of what the relay does with a batch: most delivered (deleted, or moved
                // to outbox.sent as with retention), some dead-lettered, some retried later.
                let third = ids.len() / 3;
                let (sent, rest) = ids.split_at(ids.len() - third);
                let (dead, retry) = rest.split_at(rest.len() / 2);
                store::mark_sent(&mut tx, sent, (round + w).is_multiple_of(2))
                    .await
                    .unwrap();
                let errors: Vec<String> = dead.iter().map(|_| "rejected".to_string()).collect();
                store::dead_letter(&mut tx, dead, &errors).await.unwrap();
                let retries: Vec<store::Retry> = retry
                    .iter()
                    .map(|row| store::Retry {
                        row: row.clone(),
                        delay: Duration::from_millis(5),
                        error: "nack".into(),
                    })
                    .collect();
                store::schedule_retries(&mut tx, &retries).await.unwrap();
                if round.is_multiple_of(7) {
                    tx.rollback().await.unwrap(); // a relay crash: rows released, deltas gone
                } else {
                    tx.commit().await.unwrap();
                    removed.fetch_add((sent.len() + dead.len()) as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    let compactor = {
        let (pool, stop, compactions) = (pool.clone(), Arc::clone(&stop), Arc::clone(&compactions));
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let mut conn = pool.acquire().await.unwrap();
                store::compact_counts(&mut conn).await.unwrap();
                compactions.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let checker = {
        let (pool, stop) = (pool.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut checks = 0u32;
            while !stop.load(Ordering::Acquire) {
                let (deltas, real) = counts_in_one_snapshot(&pool).await;
                assert_eq!(
                    deltas, real,
                    "in one snapshot the count deltas must equal COUNT(*) per topic"
                );
                checks += 1;
            }
            checks
        })
    };

    let deadline = Duration::from_secs(120);
    tokio::time::timeout(deadline, futures::future::try_join_all(enqueuers))
        .await
        .expect("enqueuers finish")
        .expect("an enqueuer panicked");
    enqueuers_done.store(true, Ordering::Release);
    // Workers stop once nothing is claimable; retried rows wait a few ms, so some remain or not.
    tokio::time::timeout(deadline, futures::future::try_join_all(workers))
        .await
        .expect("workers finish")
        .unwrap();
    stop.store(true, Ordering::Release);
    compactor.await.unwrap();
    let checks = checker.await.unwrap();

    let (deltas, real) = counts_in_one_snapshot(&pool).await;
    assert_eq!(deltas, real);
    let mut conn = pool.acquire().await.unwrap();
    let lag: BTreeMap<String, i64> = store::lag(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.topic, l.waiting))
        .collect();
    assert_eq!(lag, real, "store::lag must equal COUNT(*) per topic");
    let total: i64 = real.values().sum();
    assert_eq!(
        total as u64,
        enqueued.load(Ordering::Relaxed) - removed.load(Ordering::Relaxed),
        "waiting = committed enqueues - committed removals"
    );
    // After one more compaction, a single delta row per topic remains.
    store::compact_counts(&mut conn).await.unwrap();
    let delta_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.topic_counts")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(
        delta_rows as usize <= TOPICS.len(),
        "{delta_rows} delta rows after compaction"
    );
    let lag_after: BTreeMap<String, i64> = store::lag(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.topic, l.waiting))
        .collect();
    assert_eq!(lag_after, real);

    // The run exercised what it claims to.
    assert!(
        enqueued.load(Ordering::Relaxed) > 1_000,
        "enqueued {}",
        enqueued.load(Ordering::Relaxed)
    );
    assert!(
        removed.load(Ordering::Relaxed) > 500,
        "removed {}",
        removed.load(Ordering::Relaxed)
    );
    assert!(
        compactions.load(Ordering::Relaxed) > 10,
        "compactions {}",
        compactions.load(Ordering::Relaxed)
    );
    assert!(checks > 10, "snapshot checks {checks}");
}
