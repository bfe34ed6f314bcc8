//! The pipeline against the in-memory sink and a real PostgreSQL: retries with backoff,
//! dead-lettering, the circuit breaker, routing failures and per-key hold-back, each in a
//! relay running in this process, with the sink's outcomes scripted per message. No broker,
//! so these run in a second or two each.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use outbox_client::{enqueue, Message};
use outbox_relay::config::Config;
use outbox_relay::metrics::Metrics;
use outbox_relay::relay::Relay;
use outbox_relay::sinks::memory::{MemoryConfig, MemoryRoute, MemorySink};
use outbox_relay::sinks::{ErrorKind, SinkConfig};
use support::*;
use tokio_util::sync::CancellationToken;

/// A relay in this process, publishing `topics` to the memory sink `sink`; stopped on drop.
struct MemoryRelay {
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

/// The configuration of a relay publishing `topics` to the memory sink `sink`.
fn memory_config(db: &TestDb, sink: &str, topics: &[&str], ordered: bool) -> Config {
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.http.listen = String::new();
    config.relay.retry_initial_ms = 20;
    config.relay.retry_max_secs = 1;
    config.relay.max_attempts = 3;
    config.relay.idle_poll_ms = 5;
    config.relay.poll_interval_ms = 50;
    config.ordering.enabled = ordered;
    config.cluster.heartbeat_ms = 100;
    config.cluster.lease_ms = 1_000;
    config.sinks = BTreeMap::from([(
        sink.to_string(),
        SinkConfig::Memory(MemoryConfig {
            routes: vec![MemoryRoute {
                topics: topics.iter().map(|t| t.to_string()).collect(),
                destination: "{topic}".into(),
            }],
            deduplicate: true,
        }),
    )]);
    config.validate().unwrap();
    config
}

impl MemoryRelay {
    async fn start(db: &TestDb, sink: &str, topics: &[&str], ordered: bool) -> Self {
        let config = memory_config(db, sink, topics, ordered);
        let pool = outbox_relay::relay::connect_with_retry(&config, &CancellationToken::new())
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let relay = Relay::build(&config, pool, Arc::clone(&metrics), shutdown.clone())
            .await
            .unwrap();
        Self {
            shutdown,
            task: Some(tokio::spawn(relay.run())),
            metrics,
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the relay stops within 10 s")
                .unwrap();
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        http::metric(&self.metrics.render(), name, labels).unwrap_or(0.0)
    }
}

impl Drop for MemoryRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn enqueue_one(db: &TestDb, message: Message) -> String {
    let mut tx = db.pool.begin().await.unwrap();
    let e = enqueue(&mut tx, &message).await.unwrap();
    tx.commit().await.unwrap();
    e.message_id
}

async fn dead_letter(db: &TestDb, message_id: &str) -> Option<(i32, String)> {
    sqlx::query_as("SELECT attempts, last_error FROM outbox.dead_letters WHERE message_id = $1")
        .bind(message_id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_failures_are_retried_with_backoff_until_delivered() {
    let db = TestDb::new().await;
    let name = unique("mem");
    let sink = MemorySink::shared(&name);
    let topic = unique("t");
    let relay = MemoryRelay::start(&db, &name, &[&topic], false).await;
    let id = uuid::Uuid::now_v7().to_string();
    sink.fail(id.clone(), ErrorKind::Retriable, 2);
    enqueue_one(&db, Message::bytes(&topic, b"x".to_vec()).message_id(&id)).await;

    let delivered = sink.wait_delivered(1, Duration::from_secs(20)).await;
    assert_eq!(delivered[0].message_id, id);
    let attempts: Vec<i32> = sink
        .published()
        .iter()
        .filter(|p| p.message_id == id)
        .map(|p| p.attempts)
        .collect();
    assert_eq!(attempts, [0, 1, 2], "two failed attempts, then delivered");
    wait_until(
        Duration::from_secs(10),
        "the row is marked sent and counted",
        || async {
            db.waiting().await == 0
                && relay.counter(
                    "outbox_published_total",
                    &[("topic", &topic), ("outcome", "delivered")],
                ) >= 1.0
        },
    )
    .await;
    assert_eq!(
        relay.counter("outbox_retries_total", &[("topic", &topic)]),
        2.0
    );
    assert_eq!(
        relay.counter(
            "outbox_published_total",
            &[("topic", &topic), ("outcome", "delivered")]
        ),
        1.0
    );
    relay.stop().await;
    MemorySink::unregister(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_and_permanent_failures_are_dead_lettered_with_their_reason() {
    let db = TestDb::new().await;
    let name = unique("mem");
    let sink = MemorySink::shared(&name);
    let topic = unique("t");
    let relay = MemoryRelay::start(&db, &name, &[&topic], false).await;
    let (retried, rejected) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    sink.fail(retried.clone(), ErrorKind::Retriable, 10);
    sink.fail(rejected.clone(), ErrorKind::Permanent, 1);
    enqueue_one(
        &db,
        Message::bytes(&topic, b"r".to_vec()).message_id(&retried),
    )
    .await;
    enqueue_one(
        &db,
        Message::bytes(&topic, b"p".to_vec()).message_id(&rejected),
    )
    .await;

    wait_until(
        Duration::from_secs(20),
        "both rows dead-lettered",
        || async {
            dead_letter(&db, &retried).await.is_some()
                && dead_letter(&db, &rejected).await.is_some()
        },
    )
    .await;
    let (attempts, error) = dead_letter(&db, &retried).await.unwrap();
    assert_eq!(attempts, 3, "relay.max_attempts = 3");
    assert!(error.contains("gave up after 3 attempts"), "{error}");
    let (attempts, _) = dead_letter(&db, &rejected).await.unwrap();
    assert_eq!(attempts, 1, "a permanent failure is not retried");
    assert_eq!(db.waiting().await, 0);
    assert!(sink.delivered().is_empty());
    relay.stop().await;
    MemorySink::unregister(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrouted_topic_is_dead_lettered_as_no_route() {
    let db = TestDb::new().await;
    let name = unique("mem");
    let topic = unique("t");
    let relay = MemoryRelay::start(&db, &name, &[&topic], false).await;
    let stray = enqueue_one(&db, Message::bytes(unique("nowhere"), b"?".to_vec())).await;
    wait_until(
        Duration::from_secs(10),
        "the stray row dead-lettered",
        || async { dead_letter(&db, &stray).await.is_some() },
    )
    .await;
    let (_, error) = dead_letter(&db, &stray).await.unwrap();
    assert!(error.contains("no route matches topic"), "{error}");
    // The batch's metrics are counted just after its transaction commits.
    wait_until(
        Duration::from_secs(10),
        "the no_route error counted",
        || async {
            relay.counter("outbox_publish_errors_total", &[("error_type", "no_route")]) >= 1.0
        },
    )
    .await;
    assert_eq!(
        relay.counter("outbox_publish_errors_total", &[("error_type", "no_route")]),
        1.0
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_sink_opens_the_circuit_counts_no_attempt_and_drains_after() {
    let db = TestDb::new().await;
    let name = unique("mem");
    let sink = MemorySink::shared(&name);
    sink.set_available(false);
    let topic = unique("t");
    let relay = MemoryRelay::start(&db, &name, &[&topic], false).await;
    for i in 0..20u8 {
        enqueue_one(&db, Message::bytes(&topic, vec![i])).await;
    }
    wait_until(Duration::from_secs(10), "the circuit opens", || async {
        relay.counter("outbox_sink_up", &[("sink", &name)]) == 0.0 && sink.check_calls() >= 2
    })
    .await;
    let attempts: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(attempts), 0) FROM outbox.messages")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "an outage burns no attempts");
    assert_eq!(db.waiting().await, 20);

    sink.set_available(true);
    sink.wait_delivered(20, Duration::from_secs(20)).await;
    wait_until(Duration::from_secs(10), "the backlog drains", || async {
        db.waiting().await == 0
    })
    .await;
    assert_eq!(relay.counter("outbox_sink_up", &[("sink", &name)]), 1.0);
    relay.stop().await;
    MemorySink::unregister(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_a_failed_head_holds_back_its_key_only_and_order_holds() {
    let db = TestDb::new().await;
    let name = unique("mem");
    let sink = MemorySink::shared(&name);
    let topic = unique("t");
    let head = uuid::Uuid::now_v7().to_string();
    sink.fail(head.clone(), ErrorKind::Retriable, 1);
    // One transaction: the key's rows are claimed in one batch behind a failing head.
    let mut tx = db.pool.begin().await.unwrap();
    enqueue(
        &mut tx,
        &Message::bytes(&topic, b"0".to_vec())
            .key("k")
            .message_id(&head),
    )
    .await
    .unwrap();
    for i in 1..5u8 {
        enqueue(&mut tx, &Message::bytes(&topic, vec![i]).key("k"))
            .await
            .unwrap();
        enqueue(&mut tx, &Message::bytes(&topic, vec![i]).key("other"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = MemoryRelay::start(&db, &name, &[&topic], true).await;

    let delivered = sink.wait_delivered(9, Duration::from_secs(20)).await;
    let of_k: Vec<Vec<u8>> = delivered
        .iter()
        .filter(|p| p.key.as_deref() == Some("k"))
        .map(|p| p.payload.clone())
        .collect();
    assert_eq!(
        of_k,
        [vec![b'0'], vec![1], vec![2], vec![3], vec![4]],
        "key order"
    );
    let first_k = sink
        .published()
        .iter()
        .position(|p| p.key.as_deref() == Some("k") && p.message_id != head);
    let failed_head = sink.published().iter().position(|p| p.message_id == head);
    assert!(
        failed_head < first_k,
        "nothing of k was published before its head failed"
    );
    assert_eq!(
        relay.counter(
            "outbox_publish_errors_total",
            &[("error_type", "held_back")]
        ),
        0.0,
        "held-back rows are not errors"
    );
    assert!(
        relay.counter(
            "outbox_published_total",
            &[("topic", &topic), ("outcome", "held_back")]
        ) >= 4.0,
        "k's four later rows were held back behind its failed head"
    );
    assert_eq!(
        relay.counter(
            "outbox_published_total",
            &[("topic", &topic), ("outcome", "released")]
        ),
        0.0,
        "`released` means the sink was down, and it was not"
    );
    relay.stop().await;
    MemorySink::unregister(&name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_publish_gives_its_ordering_slots_to_the_others() {
    let db = TestDb::new().await;
    let (good, bad) = (unique("good"), unique("bad"));
    let good_sink = MemorySink::shared(&good);
    MemorySink::shared(&bad).set_available(false);
    let topic = unique("t");
    let healthy = MemoryRelay::start(&db, &good, &[&topic], true).await;
    let broken = MemoryRelay::start(&db, &bad, &[&topic], true).await;
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..200u32 {
        let key = format!("key-{}", i % 50);
        enqueue(
            &mut tx,
            &Message::bytes(&topic, ordering::payload(&key, i / 50)).key(key),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    // Every key, whichever relay held its slot at first, is published by the healthy relay, in
    // key order across the hand-over.
    let delivered = good_sink.wait_delivered(200, Duration::from_secs(30)).await;
    assert_eq!(delivered.len(), 200);
    let mut checker = ordering::OrderChecker::default();
    for m in &delivered {
        checker.check(&ordering::Arrival {
            key: m.key.clone(),
            message_id: m.message_id.clone(),
            payload: m.payload.clone(),
        });
    }
    assert!(checker.violations.is_empty(), "{:?}", checker.violations);
    assert_eq!(checker.delivered, 200, "each message once, in key order");
    wait_until(
        Duration::from_secs(10),
        "the healthy relay holds every slot, the broken one none",
        || async {
            healthy.counter("outbox_partitions_owned", &[]) == 256.0
                && broken.counter("outbox_partitions_owned", &[]) == 0.0
        },
    )
    .await;
    healthy.stop().await;
    broken.stop().await;
    MemorySink::unregister(&good);
    MemorySink::unregister(&bad);
}

/// A relay in a runtime of its own, on a thread of its own, so that it can crash: shutting the
/// runtime down drops every task mid-flight and closes its connections, and PostgreSQL rolls
/// its claims back, as when the process dies.
struct CrashableRelay {
    crash: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CrashableRelay {
    fn start(config: Config) -> Self {
        let (crash, crashed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.spawn(async move {
                let pool =
                    outbox_relay::relay::connect_with_retry(&config, &CancellationToken::new())
                        .await
                        .unwrap();
                let relay = Relay::build(
                    &config,
                    pool,
                    Arc::new(Metrics::new()),
                    CancellationToken::new(),
                )
                .await
                .unwrap();
                relay.run().await;
            });
            let _ = crashed.recv();
            runtime.shutdown_background();
        });
        Self {
            crash: Some(crash),
            thread: Some(thread),
        }
    }

    fn crash(&mut self) {
        if let Some(crash) = self.crash.take() {
            let _ = crash.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CrashableRelay {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The claim floor under everything at once: enqueuers whose transactions stay open a while
/// (the floor must wait for them), delayed rows and retried rows (set aside below the floor),
/// two ordered relays, one of which crashes half-way and is replaced. Every message arrives,
/// and every key's messages arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_under_concurrent_enqueue_delays_retries_and_a_relay_crash_loses_nothing_and_keeps_key_order(
) {
    use outbox_testkit::ordering::{payload, Arrival, OrderChecker};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TASKS: usize = 3;
    const TXS: usize = 40;
    const ROWS: usize = 5;
    const KEYS_PER_TASK: usize = 4;
    let db = TestDb::new().await;
    let name = unique("mem");
    let sink = MemorySink::shared(&name);
    let topic = unique("t");
    let mut crashing = CrashableRelay::start(memory_config(&db, &name, &[&topic], true));
    let steady = MemoryRelay::start(&db, &name, &[&topic], true).await;

    let committed = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..TASKS)
        .map(|task| {
            let (pool, topic, sink, committed) = (
                db.pool.clone(),
                topic.clone(),
                MemorySink::shared(&name),
                Arc::clone(&committed),
            );
            tokio::spawn(async move {
                let mut next = [0u32; KEYS_PER_TASK];
                for t in 0..TXS {
                    let mut tx = pool.begin().await.unwrap();
                    for r in 0..ROWS {
                        let n = t * ROWS + r;
                        let k = n % KEYS_PER_TASK;
                        let key = format!("p{task}k{k}");
                        let id = uuid::Uuid::now_v7().to_string();
                        let mut m = Message::bytes(&topic, payload(&key, next[k]))
                            .key(&key)
                            .message_id(&id);
                        next[k] += 1;
                        if n % 11 == 3 {
                            m = m.available_at(
                                chrono::Utc::now() + chrono::Duration::milliseconds(300),
                            );
                        }
                        if n % 9 == 4 {
                            sink.fail(id, ErrorKind::Retriable, 1);
                        }
                        enqueue(&mut tx, &m).await.unwrap();
                    }
                    if t % 8 == 0 {
                        // An application transaction that stays open after its enqueue.
                        tokio::time::sleep(Duration::from_millis(60)).await;
                    }
                    tx.commit().await.unwrap();
                    committed.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    wait_until(
        Duration::from_secs(60),
        "half the transactions committed",
        || {
            let committed = Arc::clone(&committed);
            async move { committed.load(Ordering::SeqCst) >= TASKS * TXS / 2 }
        },
    )
    .await;
    crashing.crash();
    let replacement = MemoryRelay::start(&db, &name, &[&topic], true).await;
    for p in producers {
        p.await.unwrap();
    }

    let total = TASKS * TXS * ROWS;
    let delivered = sink.wait_delivered(total, Duration::from_secs(90)).await;
    let mut checker = OrderChecker::default();
    for m in &delivered {
        checker.check(&Arrival {
            key: m.key.clone(),
            message_id: m.message_id.clone(),
            payload: m.payload.clone(),
        });
    }
    assert!(checker.violations.is_empty(), "{:?}", checker.violations);
    assert_eq!(checker.delivered, total, "every message delivered once");
    let expected = (TXS * ROWS / KEYS_PER_TASK) as u32;
    assert!(
        checker.per_key().values().all(|n| *n == expected),
        "{:?}",
        checker.per_key()
    );
    wait_until(Duration::from_secs(30), "the outbox is empty", || async {
        db.waiting().await == 0
    })
    .await;
    steady.stop().await;
    replacement.stop().await;
    MemorySink::unregister(&name);
}

/// A relay with one sink down while another relay reaches that sink gives its ordering slots to
/// the others; when the broker is down for every relay, nobody yields (each still publishes its
/// other sinks' keys). The heartbeat's own statements, against a real database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_a_sink_down_that_another_relay_reaches_yields_its_slots() {
    use outbox_relay::store::cluster::{heartbeat, Leases, Report, SinkHealth};
    let db = TestDb::new().await;
    let (a, b) = (
        outbox_relay::cluster::new_identity(),
        outbox_relay::cluster::new_identity(),
    );
    let report = |x_up: bool| Report {
        sinks: vec![
            SinkHealth {
                sink: "x".into(),
                kind: "nats".into(),
                up: x_up,
                error: (!x_up).then(|| "not connected".into()),
            },
            SinkHealth {
                sink: "y".into(),
                kind: "amqp".into(),
                up: true,
                error: None,
            },
        ],
        publish_rates: Default::default(),
    };
    let leases = Some(Leases {
        lease: Duration::from_secs(30),
        slots: outbox_relay::store::SLOTS,
        eligible: true,
    });
    let beat = |id: outbox_relay::store::cluster::Identity, x_up: bool| {
        let pool = db.pool.clone();
        let report = report(x_up);
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let (interval, expiry) = (Duration::from_secs(1), Duration::from_secs(20));
            heartbeat(&mut conn, &id, interval, expiry, &report, leases)
                .await
                .unwrap()
        }
    };
    // Both reach x: the slots are split.
    beat(a.clone(), true).await;
    beat(b.clone(), true).await;
    let a1 = beat(a.clone(), true).await;
    assert!(!a1.yielded && !a1.owned.is_empty());

    // x is down for a only: a yields, b takes every slot.
    let a2 = beat(a.clone(), false).await;
    assert!(
        a2.yielded,
        "a relay that cannot reach x while b can keeps no slot"
    );
    assert!(a2.owned.is_empty());
    let b2 = beat(b.clone(), true).await;
    assert_eq!(b2.owned.len(), outbox_relay::store::SLOTS);

    // x is down for both: nobody yields, the slots are split again.
    let b3 = beat(b.clone(), false).await;
    assert!(!b3.yielded);
    let a3 = beat(a.clone(), false).await;
    assert!(!a3.yielded);
    let b4 = beat(b.clone(), false).await;
    assert!(!b4.yielded && b4.owned.len() < outbox_relay::store::SLOTS);
    let a4 = beat(a.clone(), false).await;
    assert!(!a4.owned.is_empty(), "a takes slots again");
}

/// The slot leases ride on the membership row: a steady heartbeat writes no slot row (so a held
/// xmin horizon does not pile up 256 row versions per relay per beat), and the slots of a relay
/// whose membership expired go to the relays that are still live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_heartbeats_write_no_slot_rows_and_expired_members_lose_their_slots() {
    use outbox_relay::store::cluster::{heartbeat, Leases, Report};
    let db = TestDb::new().await;
    let (a, b) = (
        outbox_relay::cluster::new_identity(),
        outbox_relay::cluster::new_identity(),
    );
    let leases = |lease: Duration| {
        Some(Leases {
            lease,
            slots: outbox_relay::store::SLOTS,
            eligible: true,
        })
    };
    let beat = |id: outbox_relay::store::cluster::Identity, lease: Duration| {
        let pool = db.pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let (interval, expiry) = (Duration::from_secs(1), Duration::from_secs(20));
            heartbeat(
                &mut conn,
                &id,
                interval,
                expiry,
                &Report::default(),
                leases(lease),
            )
            .await
            .unwrap()
        }
    };
    let versions = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(ctid::text || ':' || xmin::text, ',' ORDER BY slot)
               FROM outbox.partition_leases",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let long = Duration::from_secs(60);
    let first = beat(a.clone(), long).await;
    assert_eq!(first.owned.len(), outbox_relay::store::SLOTS);
    let before = versions().await;
    for _ in 0..5 {
        let again = beat(a.clone(), long).await;
        assert_eq!(again.owned, first.owned, "a steady relay keeps its slots");
    }
    assert_eq!(
        versions().await,
        before,
        "renewing the leases must not write the slot rows"
    );

    // b joins; a releases half on its next beat, b takes them.
    beat(b.clone(), long).await;
    let a2 = beat(a.clone(), long).await;
    let b2 = beat(b.clone(), long).await;
    assert_eq!(a2.owned.len(), outbox_relay::store::SLOTS / 2);
    assert_eq!(b2.owned.len(), outbox_relay::store::SLOTS / 2);

    // a's membership expires (as when it stops beating): b takes a's slots, although their rows
    // still name a.
    sqlx::query("UPDATE outbox.ordering_members SET expires_at = now() - interval '1 second' WHERE relay_id = $1")
        .bind(&a.relay_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let b3 = beat(b.clone(), long).await;
    assert_eq!(b3.owned.len(), outbox_relay::store::SLOTS);
}
