//! The chaos test (guarantees.md, "Chaos"): producers enqueue 50,000 messages over 200 keys
//! through the client crate while 3 relay processes run; meanwhile a random relay is SIGKILLed
//! and restarted every few seconds, the broker is stopped and restarted, and PostgreSQL is
//! restarted once. Broker and database are owned by the test (their own ports and directories).
//! Then an independent JetStream consumer reads the whole stream and checks: nothing lost,
//! every duplicate an exact repeat of an idempotency key already seen, backlog 0.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_client::{enqueue_many, Message};
use rand::Rng;
use support::*;

const TOTAL: usize = 50_000;
const KEYS: usize = 200;
const PRODUCERS: usize = 4;
const BATCH: usize = 25;
/// Each producer commits one batch per tick: 4 × 25 / 80 ms ≈ 1,250 messages/s, so the
/// enqueueing spans the faults (about 40 s).
const TICK: Duration = Duration::from_millis(80);
const KILL_EVERY: Duration = Duration::from_secs(3);

/// One producer transaction: BEGIN, enqueue the batch, COMMIT.
async fn enqueue_in_tx(pool: &sqlx::PgPool, messages: &[Message]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    enqueue_many(&mut tx, messages).await.map_err(|e| match e {
        outbox_client::Error::Database(e) => e,
        other => panic!("invalid message: {other}"),
    })?;
    tx.commit().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_kills_broker_and_database_restarts_lose_nothing() {
    let mut pg = OwnedPostgres::start().await;
    let db_url = pg.create_migrated_database().await;
    let mut nats = OwnedNats::start("").await;
    let (stream, prefix) = (unique("CHAOS"), unique("c"));
    let routes = format!(r#"[{{ topics = ["*"], subject = "{prefix}.{{topic}}" }}]"#);
    let extra = "workers = 2\nbatch_size = 200\npublish_timeout_secs = 5\nclaim_timeout_secs = 10";
    let config = relay_config(&db_url, &nats.url(), &stream, &prefix, &routes, extra, 0).replace(
        &format!("url = \"{db_url}\""),
        &format!("url = \"{db_url}\"\nconnect_timeout_secs = 2"),
    );
    let mut relays: Vec<RelayProcess> = (0..3).map(|_| RelayProcess::start(&config)).collect();

    // Producers: deterministic message ids, so retrying a transaction whose outcome is unknown
    // never creates a second message. Only committed enqueues count.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&db_url)
        .await
        .unwrap();
    let committed: Arc<Mutex<HashMap<String, Vec<u8>>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(TOTAL)));
    let failed_tx = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (pool, committed, failed_tx) =
                (pool.clone(), Arc::clone(&committed), Arc::clone(&failed_tx));
            // Not spawned: the client crate's generic `Acquire` on a transaction makes the
            // future not `Send` for every lifetime; the producers run on the test's own task,
            // concurrently with the chaos below (tokio::join!).
            async move {
                let mut ticker = tokio::time::interval(TICK);
                let per = TOTAL / PRODUCERS;
                for start in (0..per).step_by(BATCH) {
                    ticker.tick().await;
                    let batch: Vec<(String, Vec<u8>, Message)> = (start..(start + BATCH).min(per))
                        .map(|seq| {
                            let n = p * per + seq;
                            let key = format!("key-{}", n % KEYS);
                            let id = format!("chaos-{p}-{seq}");
                            let payload =
                                format!("{{\"producer\":{p},\"seq\":{seq},\"key\":\"{key}\"}}")
                                    .into_bytes();
                            let msg = Message::bytes(format!("chaos.t{}", n % 4), payload.clone())
                                .key(key)
                                .message_id(&id);
                            (id, payload, msg)
                        })
                        .collect();
                    let messages: Vec<Message> = batch.iter().map(|(_, _, m)| m.clone()).collect();
                    loop {
                        match enqueue_in_tx(&pool, &messages).await {
                            Ok(()) => break,
                            Err(_) => {
                                failed_tx.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    let mut c = committed.lock().unwrap();
                    for (id, payload, _) in batch {
                        c.insert(id, payload);
                    }
                }
            }
        })
        .collect();

    // Chaos: kill a random relay every few seconds; broker down once; PostgreSQL restarted once.
    let done = Arc::new(AtomicBool::new(false));
    let producing = {
        let done = Arc::clone(&done);
        async move {
            futures::future::join_all(producers).await;
            done.store(true, Ordering::Release);
        }
    };
    let started = Instant::now();
    let (mut kills, mut relay_restarts, mut broker_restarts, mut pg_restarts) =
        (0u32, 0u32, 0u32, 0u32);
    let chaos = async {
        let mut next_kill = started + KILL_EVERY;
        while !(done.load(Ordering::Acquire) && broker_restarts >= 1 && pg_restarts >= 1) {
            let t = started.elapsed();
            if broker_restarts == 0 && t >= Duration::from_secs(8) {
                nats.stop();
                tokio::time::sleep(Duration::from_secs(3)).await;
                nats.start_server().await;
                broker_restarts += 1;
                println!("chaos: broker restarted at {:?}", started.elapsed());
            }
            if pg_restarts == 0 && t >= Duration::from_secs(20) {
                pg.stop();
                tokio::time::sleep(Duration::from_secs(2)).await;
                pg.start_server().await;
                pg_restarts += 1;
                println!("chaos: PostgreSQL restarted at {:?}", started.elapsed());
            }
            if Instant::now() >= next_kill && !done.load(Ordering::Acquire) {
                let i = rand::rng().random_range(0..relays.len());
                relays[i].sigkill();
                kills += 1;
                relays[i] = RelayProcess::start(&config);
                relay_restarts += 1;
                next_kill = Instant::now() + KILL_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "producers did not finish within 4 minutes"
            );
        }
    };
    tokio::join!(producing, chaos);
    let enqueued = committed.lock().unwrap().clone();
    assert_eq!(
        enqueued.len(),
        TOTAL,
        "every producer batch eventually committed"
    );

    // Final backlog 0 with the 3 relays still running.
    let backlog = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox.messages")
            .fetch_one(&pool)
            .await
            .unwrap_or(-1)
    };
    wait_until(Duration::from_secs(180), "final backlog 0", || async {
        backlog().await == 0
    })
    .await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();

    // The independent consumer.
    let got = read_stream(&nats.jetstream().await, &stream).await;
    let mut seen: HashMap<&str, &[u8]> = HashMap::with_capacity(got.len());
    let (mut duplicates, mut not_exact, mut unexpected) = (0usize, 0usize, 0usize);
    for (id, payload) in &got {
        match seen.get(id.as_str()) {
            Some(first) => {
                duplicates += 1;
                if *first != payload.as_slice() {
                    not_exact += 1;
                }
            }
            None => {
                if enqueued.get(id).map(|p| p.as_slice()) != Some(payload.as_slice()) {
                    unexpected += 1;
                }
                seen.insert(id, payload);
            }
        }
    }
    let received: BTreeSet<&str> = seen.keys().copied().collect();
    let lost: Vec<&String> = enqueued
        .keys()
        .filter(|id| !received.contains(id.as_str()))
        .collect();
    println!(
        "CHAOS enqueued={} received={} duplicates={} lost={} dead_letters={} kills={} relay_restarts={} broker_restarts={} postgres_restarts={} failed_producer_tx={} elapsed={:?}",
        enqueued.len(),
        got.len(),
        duplicates,
        lost.len(),
        dead,
        kills,
        relay_restarts,
        broker_restarts,
        pg_restarts,
        failed_tx.load(Ordering::Relaxed),
        started.elapsed()
    );
    let stderr_tail: String = relays
        .iter()
        .map(|r| r.stderr())
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        lost.is_empty(),
        "lost {} messages, e.g. {:?}\n{stderr_tail}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        not_exact, 0,
        "a duplicate differs from the first copy of its idempotency key"
    );
    assert_eq!(
        unexpected, 0,
        "messages that were never enqueued (or with other bytes) arrived"
    );
    assert_eq!(
        dead, 0,
        "faults of the broker, the database or the relays must not dead-letter anything"
    );
    assert!(kills >= 5 && broker_restarts >= 1 && pg_restarts >= 1);
    for r in &mut relays {
        r.sigterm();
    }
    for r in &mut relays {
        assert_eq!(
            r.wait_exit(Duration::from_secs(40)).await,
            Some(0),
            "{}",
            r.stderr()
        );
    }
}
