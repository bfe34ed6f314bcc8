//! Per-key ordering across relays (docs/ordering.md), end to end on real PostgreSQL and a real
//! broker, checked by an independent consumer. Each scenario is generic over
//! [`OrderedTarget`]: another broker plugs in with one implementation in its module of the test
//! kit (crates/outbox-testkit/src/<broker>.rs) and one `#[tokio::test]` line per scenario.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_client::{enqueue_many, Message};
use rand::Rng;
use support::amqp::AmqpTarget;
use support::kafka::{KafkaTarget, Storage, TansuBroker};
use support::ordering::*;
use support::*;

fn relay_toml(db_url: &str, sink_toml: &str, relay_extra: &str, ordering_extra: &str) -> String {
    format!(
        "[database]\nurl = \"{db_url}\"\n\n[relay]\n{relay_extra}\n\n[http]\nlisten = \"\"\n\n[ordering]\n{ordering_extra}\n{sink_toml}"
    )
}

/// Enqueues `per_key` messages for each key, seq-major (every key's #0, then every key's #1…),
/// `per_tx` messages per transaction; a key's messages are enqueued in seq order.
async fn enqueue_all(pool: &sqlx::PgPool, keys: &[String], per_key: u32, per_tx: usize) {
    let mut all = Vec::with_capacity(keys.len() * per_key as usize);
    for seq in 0..per_key {
        for k in keys {
            let topic = if k == POISON_KEY { POISON_TOPIC } else { TOPIC };
            all.push(Message::bytes(topic, payload(k, seq)).key(k.clone()));
        }
    }
    for chunk in all.chunks(per_tx) {
        let mut tx = pool.begin().await.unwrap();
        enqueue_many(&mut tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
}

fn drain(arrivals: &Arrivals, checker: &mut OrderChecker) -> usize {
    let batch: Vec<Arrival> = std::mem::take(&mut *arrivals.lock().unwrap());
    for a in &batch {
        checker.check(a);
    }
    batch.len()
}

fn cli(config_path: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(relay_bin())
        .arg("--config")
        .arg(config_path)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// 4 relays, 200 keys, 50,000 messages, random per-message failures, relays killed
/// (SIGKILL), stopped (SIGTERM) and added mid-run: every key arrives in enqueue order, a
/// repeat only as an exact copy, nothing lost, nothing dead.
async fn ordered_under_failures_kills_and_joins<T: OrderedTarget>(target: T) {
    const KEYS: usize = 200;
    const PER_KEY: u32 = 250;
    const TOTAL: usize = KEYS * PER_KEY as usize;
    let db = TestDb::new().await;
    let (arrivals, stop): (Arrivals, _) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicBool::new(false)),
    );
    let (sink_toml, broker) = (target.sink_toml(), target.name());
    let consumer = target
        .start_consumer(Arc::clone(&arrivals), Arc::clone(&stop))
        .await;
    let config = relay_toml(
        &db.url,
        &sink_toml,
        "batch_size = 500\nfault_injection_rate = 0.03\nretry_initial_ms = 20\nretry_max_secs = 1\nmax_attempts = 1000\nshutdown_timeout_secs = 10",
        "heartbeat_ms = 200\nlease_ms = 1000",
    );
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k:03}")).collect();
    let mut relays: Vec<RelayProcess> = (0..4).map(|_| RelayProcess::start(&config)).collect();
    let producer = {
        let (pool, keys) = (db.pool.clone(), keys.clone());
        tokio::spawn(async move { enqueue_all(&pool, &keys, PER_KEY, 1_000).await })
    };

    // Chaos at delivery milestones (fractions of TOTAL): (kill -9, sigterm, start).
    let events: [(f64, usize, usize, usize); 5] = [
        (0.10, 1, 0, 1),
        (0.25, 0, 0, 1),
        (0.40, 2, 0, 1),
        (0.55, 1, 0, 1),
        (0.70, 0, 1, 0),
    ];
    let (mut next_event, mut kills, mut stops, mut starts) = (0, 0, 0, 0);
    let mut checker = OrderChecker::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    let mut rng = rand::rng();
    while checker.delivered < TOTAL {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {TOTAL} arrived in order, {} waiting in the outbox; last relay stderr:\n{}",
            checker.delivered,
            db.waiting().await,
            relays.last().map(|r| r.stderr()).unwrap_or_default()
        );
        if drain(&arrivals, &mut checker) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !checker.violations.is_empty() {
            break;
        }
        while next_event < events.len()
            && checker.delivered as f64 >= events[next_event].0 * TOTAL as f64
        {
            let (_, k, t, s) = events[next_event];
            for _ in 0..k {
                let i = rng.random_range(0..relays.len());
                relays.remove(i).sigkill();
                kills += 1;
            }
            for _ in 0..t {
                let mut r = relays.remove(0);
                r.sigterm();
                assert_eq!(
                    r.wait_exit(Duration::from_secs(20)).await,
                    Some(0),
                    "SIGTERM exit:\n{}",
                    r.stderr()
                );
                stops += 1;
            }
            for _ in 0..s {
                relays.push(RelayProcess::start(&config));
                starts += 1;
            }
            next_event += 1;
        }
    }
    assert!(
        checker.violations.is_empty(),
        "order violations: {:?}",
        &checker.violations[..checker.violations.len().min(20)]
    );
    producer.await.unwrap();
    wait_until(Duration::from_secs(30), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    // Late repeats (re-publishes of rows whose mark was lost to a kill) still get checked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drain(&arrivals, &mut checker);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let retried: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    println!(
        "ordering[{broker}]: enqueued {TOTAL}, in order {}, duplicates {}, violations {}, dead {dead}, waiting {retried}, \
         relays killed {kills}, stopped {stops}, started {starts}, {:.1}s",
        checker.delivered,
        checker.duplicates,
        checker.violations.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        checker.violations.is_empty(),
        "order violations: {:?}",
        &checker.violations[..checker.violations.len().min(20)]
    );
    assert_eq!(checker.delivered, TOTAL);
    assert!(checker.per_key().values().all(|&n| n == PER_KEY));
    assert_eq!(dead, 0);
    stop.store(true, Ordering::Release);
    consumer.await.unwrap();
}

/// one poisoned key (the broker always refuses it) does not slow the others. Prints
/// the other keys' throughput with and without it; checks the poisoned key is held back, never
/// published, listed by `keys list`, and that `keys skip` dead-letters its head.
async fn poisoned_key_does_not_slow_the_others<T: OrderedTarget, F: Fn() -> T>(make_target: F) {
    const KEYS: usize = 50;
    const PER_KEY: u32 = 100;
    let mut rates = Vec::new();
    for poisoned in [false, true] {
        let db = TestDb::new().await;
        let (arrivals, stop): (Arrivals, _) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let target = make_target();
        let (sink_toml, broker) = (target.sink_toml(), target.name());
        let (target_retriable, poison_error) =
            (target.poison_is_retriable(), target.poison_error());
        let consumer = target
            .start_consumer(Arc::clone(&arrivals), Arc::clone(&stop))
            .await;
        let mut keys: Vec<String> = (0..KEYS).map(|k| format!("k{k:03}")).collect();
        if poisoned {
            // Its messages are interleaved with everybody else's, from the first to the last.
            keys.insert(0, POISON_KEY.to_string());
        }
        enqueue_all(&db.pool, &keys, PER_KEY, 1_000).await;
        let config = relay_toml(
            &db.url,
            &sink_toml,
            "retry_initial_ms = 20\nretry_max_secs = 1\nmax_attempts = 1000",
            "heartbeat_ms = 200\nlease_ms = 1000",
        );
        let started = Instant::now();
        let relays: Vec<RelayProcess> = (0..2).map(|_| RelayProcess::start(&config)).collect();
        let others = KEYS * PER_KEY as usize;
        let mut checker = OrderChecker::default();
        let deadline = started + Duration::from_secs(90);
        while checker.delivered < others {
            assert!(
                Instant::now() < deadline,
                "timed out: {} of {others}; stderr:\n{}",
                checker.delivered,
                relays[0].stderr()
            );
            if drain(&arrivals, &mut checker) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let elapsed = started.elapsed();
        let rate = others as f64 / elapsed.as_secs_f64();
        println!(
            "ordering[{broker}] poison={poisoned}: {others} messages of {KEYS} other keys in {:.2}s = {rate:.0} msg/s",
            elapsed.as_secs_f64()
        );
        rates.push(rate);
        assert!(checker.violations.is_empty(), "{:?}", checker.violations);
        assert_eq!(
            checker.per_key().get(POISON_KEY),
            None,
            "a poisoned message was published"
        );

        if poisoned && !target_retriable {
            // A permanent refusal dead-letters each message, which releases the key (O3): the
            // poisoned key drains into the dead letters, one message after the other, in order.
            wait_until(
                Duration::from_secs(60),
                "every poisoned message dead-lettered",
                || async {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM outbox.dead_letters WHERE key = $1",
                    )
                    .bind(POISON_KEY)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap()
                        == PER_KEY as i64
                },
            )
            .await;
            let errors: Vec<String> =
                sqlx::query_scalar("SELECT last_error FROM outbox.dead_letters WHERE key = $1")
                    .bind(POISON_KEY)
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            assert!(
                errors.iter().all(|e| e.contains(poison_error)),
                "refused for another reason than {poison_error:?}: {errors:?}"
            );
            // In the order of the transactions that dead-lettered them (their xids: each one
            // claimed its row only after the previous one committed).
            let order: Vec<String> = sqlx::query_scalar(
                "SELECT convert_from(payload, 'UTF8') FROM outbox.dead_letters WHERE key = $1 ORDER BY xmin::text::bigint, id",
            )
            .bind(POISON_KEY)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            let expected: Vec<String> = (0..PER_KEY)
                .map(|seq| String::from_utf8(payload(POISON_KEY, seq)).unwrap())
                .collect();
            assert_eq!(
                order, expected,
                "the poisoned key's messages are tried (and dead-lettered) in enqueue order"
            );
            wait_until(Duration::from_secs(10), "outbox drained", || async {
                db.waiting().await == 0
            })
            .await;
        } else if poisoned {
            let config_path = relays[0].dir.path().join("relay.toml");
            let (ok, out, err) = cli(&config_path, &["keys", "list", "--json"]);
            assert!(ok, "keys list failed: {err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let held = v["held_back"].as_array().unwrap();
            let p = held
                .iter()
                .find(|k| k["key"] == POISON_KEY)
                .unwrap_or_else(|| panic!("poisoned key not listed: {out}"));
            assert_eq!(p["behind"], PER_KEY as i64 - 1, "{out}");
            assert!(p["attempts"].as_i64().unwrap() >= 1);
            let last_error = p["last_error"].as_str().unwrap_or_default();
            assert!(last_error.contains(poison_error), "{out}");
            let (ok, status, err) = cli(&config_path, &["status"]);
            assert!(
                ok && status.contains(POISON_KEY),
                "status must show the held-back key: {status}{err}"
            );
            // skip: the failing head goes to the dead letters; the next one becomes the head.
            let skipped = || {
                let (pool, config_path) = (db.pool.clone(), config_path.clone());
                async move {
                    let (ok, _, _) = cli(&config_path, &["keys", "skip", POISON_KEY]);
                    let dead: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM outbox.dead_letters WHERE key = $1 AND last_error LIKE 'skipped%'")
                            .bind(POISON_KEY)
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                    ok && dead == 1
                }
            };
            // The head may be in flight at that instant (skip then says "try again").
            wait_until(
                Duration::from_secs(20),
                "keys skip dead-letters the poisoned head",
                skipped,
            )
            .await;
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE key = $1")
                    .bind(POISON_KEY)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            assert_eq!(left, PER_KEY as i64 - 1);
        } else {
            wait_until(Duration::from_secs(10), "outbox drained", || async {
                db.waiting().await == 0
            })
            .await;
        }
        drop(relays);
        stop.store(true, Ordering::Release);
        consumer.await.unwrap();
    }
    println!(
        "ordering poison: other keys' throughput without a poisoned key {:.0} msg/s, with one {:.0} msg/s ({:.0} %)",
        rates[0],
        rates[1],
        100.0 * rates[1] / rates[0]
    );
}

/// `on_dead = "park"`: a dead-lettered message parks its key (later messages wait,
/// untouched); `keys release` lets the next one be tried; other keys are not affected.
async fn park_and_release<T: OrderedTarget>(target: T) {
    let db = TestDb::new().await;
    let (arrivals, stop): (Arrivals, _) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(AtomicBool::new(false)),
    );
    let sink_toml = target.sink_toml();
    let consumer = target
        .start_consumer(Arc::clone(&arrivals), Arc::clone(&stop))
        .await;
    enqueue_all(
        &db.pool,
        &[POISON_KEY.to_string(), "good".to_string()],
        3,
        100,
    )
    .await;
    let config = relay_toml(
        &db.url,
        &sink_toml,
        "retry_initial_ms = 20\nretry_max_secs = 1\nmax_attempts = 2",
        "on_dead = \"park\"\nheartbeat_ms = 200\nlease_ms = 1000",
    );
    let relay = RelayProcess::start(&config);
    let config_path = relay.dir.path().join("relay.toml");
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(POISON_KEY)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    wait_until(Duration::from_secs(30), "poisoned key parked", || async {
        count("SELECT count(*) FROM outbox.parked_keys WHERE key = $1").await == 1
    })
    .await;
    let mut checker = OrderChecker::default();
    wait_until(Duration::from_secs(30), "the good key delivered", || {
        drain(&arrivals, &mut checker);
        let n = checker.per_key().get("good").copied();
        async move { n == Some(3) }
    })
    .await;
    assert_eq!(
        count("SELECT count(*) FROM outbox.dead_letters WHERE key = $1").await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM outbox.messages WHERE key = $1 AND attempts = 0").await,
        2
    );
    let (ok, out, err) = cli(&config_path, &["keys", "list", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parked"][0]["key"], POISON_KEY, "{out}");
    assert_eq!(v["parked"][0]["waiting"], 2, "{out}");

    let (ok, _, err) = cli(&config_path, &["keys", "release", POISON_KEY]);
    assert!(ok, "{err}");
    // The next message is tried (twice), dead-lettered, and parks the key again.
    wait_until(
        Duration::from_secs(30),
        "second dead letter parks the key again",
        || async {
            count("SELECT count(*) FROM outbox.dead_letters WHERE key = $1").await == 2
                && count("SELECT count(*) FROM outbox.parked_keys WHERE key = $1").await == 1
        },
    )
    .await;
    let (ok, _, err) = cli(&config_path, &["keys", "release", "no-such-key"]);
    assert!(!ok && err.contains("is not parked"), "{err}");
    drain(&arrivals, &mut checker);
    assert!(checker.violations.is_empty(), "{:?}", checker.violations);
    assert_eq!(checker.per_key().get(POISON_KEY), None);
    drop(relay);
    stop.store(true, Ordering::Release);
    consumer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ordered_under_failures_kills_and_joins() {
    ordered_under_failures_kills_and_joins(NatsTarget::new(&nats_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_poisoned_key_does_not_slow_the_others() {
    poisoned_key_does_not_slow_the_others(|| NatsTarget::new(&nats_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_park_and_release() {
    park_and_release(NatsTarget::new(&nats_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_ordered_under_failures_kills_and_joins() {
    ordered_under_failures_kills_and_joins(AmqpTarget::new(&amqp_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_poisoned_key_does_not_slow_the_others() {
    poisoned_key_does_not_slow_the_others(|| AmqpTarget::new(&amqp_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_park_and_release() {
    park_and_release(AmqpTarget::new(&amqp_url())).await;
}

/// A tansu broker for one Kafka test, shared by its targets; `None` (the test returns) when
/// tansu is not installed, see crates/outbox-testkit/src/kafka.rs.
async fn tansu() -> Option<Arc<TansuBroker>> {
    TansuBroker::start(Storage::Memory).await.map(Arc::new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_ordered_under_failures_kills_and_joins() {
    let Some(broker) = tansu().await else { return };
    ordered_under_failures_kills_and_joins(KafkaTarget::new(&broker)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_poisoned_key_does_not_slow_the_others() {
    let Some(broker) = tansu().await else { return };
    poisoned_key_does_not_slow_the_others(|| KafkaTarget::new(&broker)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_park_and_release() {
    let Some(broker) = tansu().await else { return };
    park_and_release(KafkaTarget::new(&broker)).await;
}
