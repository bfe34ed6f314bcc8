//! Crash safety and shutdown (guarantees.md, "Crash safety", "Graceful shutdown"): rows a relay
//! claimed come back when it dies (at once) or hangs (after relay.claim_timeout_secs); losing
//! the database between publish and mark re-publishes with the same idempotency key; SIGTERM
//! drains in-flight work and exits 0, within relay.shutdown_timeout_secs even when the broker
//! hangs.
//!
//! The release times are printed (`RELEASE ...`): docs/guarantees.md quotes them.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outbox_client::{enqueue_many, Message};
use support::*;

fn routes(prefix: &str) -> String {
    format!(r#"[{{ topics = ["*"], subject = "{prefix}.{{topic}}" }}]"#)
}

async fn enqueue_n(db: &TestDb, topic: &str, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|i| {
                Message::bytes(topic, format!("m{i}").into_bytes()).key(format!("k{}", i % 50))
            })
            .collect();
        for e in enqueue_many(&mut db.pool.acquire().await.unwrap(), &msgs)
            .await
            .unwrap()
        {
            ids.insert(e.message_id);
        }
    }
    ids
}

/// SIGKILL while a claim waits on the broker: PostgreSQL sees the connection close and aborts
/// the transaction; the rows are claimable again at once, and the next relay re-publishes them
/// with the same Nats-Msg-Id (JetStream keeps one copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_releases_claimed_rows_at_once_and_republish_is_deduplicated() {
    let nats = OwnedNats::start("").await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let config = relay_config(
        &db.url,
        &nats.url(),
        &stream,
        &prefix,
        &routes(&prefix),
        "workers = 1\nbatch_size = 100",
        0,
    );

    // Let the relay create its stream, then freeze the broker so the next claim waits on acks.
    let mut relay = RelayProcess::start(&config);
    let first = enqueue_n(&db, "crash.kill", 1).await;
    wait_until(
        Duration::from_secs(30),
        "first message delivered",
        || async { db.waiting().await == 0 },
    )
    .await;
    nats.pause();
    let mut ids = enqueue_n(&db, "crash.kill", 300).await;
    ids.extend(first);
    wait_for_open_claim(&db.pool, &db.name, 300, Duration::from_secs(30)).await;

    relay.sigkill();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "rows released after SIGKILL",
        || async { claimable(&db.pool).await == 300 },
    )
    .await;
    println!("RELEASE after SIGKILL: {} ms", killed.elapsed().as_millis());

    nats.resume();
    let relay2 = RelayProcess::start(&config);
    wait_until(
        Duration::from_secs(60),
        "backlog drained by the restarted relay",
        || async { db.waiting().await == 0 },
    )
    .await;
    let got = read_stream(&nats.jetstream().await, &stream).await;
    let got_ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(got_ids, ids, "relay stderr:\n{}", relay2.stderr());
    assert_eq!(
        got.len(),
        ids.len(),
        "JetStream deduplicated the re-published messages"
    );
}

/// A relay that stops talking (SIGSTOP: no FIN, no RST) keeps its claim until PostgreSQL's
/// idle_in_transaction_session_timeout (= relay.claim_timeout_secs) aborts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_relay_releases_its_claim_after_claim_timeout() {
    let nats = OwnedNats::start("").await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let extra = "workers = 1\nbatch_size = 100\npublish_timeout_secs = 2\nclaim_timeout_secs = 3";
    let config = relay_config(
        &db.url,
        &nats.url(),
        &stream,
        &prefix,
        &routes(&prefix),
        extra,
        0,
    );

    let relay = RelayProcess::start(&config);
    let mut ids = enqueue_n(&db, "crash.stop", 1).await;
    wait_until(
        Duration::from_secs(30),
        "first message delivered",
        || async { db.waiting().await == 0 },
    )
    .await;
    nats.pause();
    ids.extend(enqueue_n(&db, "crash.stop", 300).await);
    // Freeze the relay while its open claim holds rows. A claim transaction seen idle may be
    // one that found nothing (it began before the 300 rows committed) and is about to commit:
    // then let the relay go on and catch the next one.
    let freeze_deadline = Instant::now() + Duration::from_secs(30);
    let backend = loop {
        let backend = wait_for_open_claim(&db.pool, &db.name, 300, Duration::from_secs(30)).await;
        unsafe {
            libc::kill(relay.pid(), libc::SIGSTOP);
        }
        if claimable(&db.pool).await < 300 {
            break backend;
        }
        unsafe {
            libc::kill(relay.pid(), libc::SIGCONT);
        }
        assert!(
            Instant::now() < freeze_deadline,
            "the relay never held a claim on the waiting rows"
        );
    };
    let stopped = Instant::now();
    // How long the claim had been idle when the relay froze (PostgreSQL's clock).
    let idle_before: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - state_change)::float8 FROM pg_stat_activity WHERE pid = $1",
    )
    .bind(backend)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
    .unwrap_or(0.0);
    wait_until(
        Duration::from_secs(20),
        "claim released by idle_in_transaction_session_timeout",
        || async { claimable(&db.pool).await == 300 },
    )
    .await;
    println!(
        "RELEASE after SIGSTOP: {} ms after the freeze ({:.0} ms idle before it; claim_timeout_secs = 3)",
        stopped.elapsed().as_millis(),
        idle_before * 1000.0
    );

    nats.resume();
    let relay2 = RelayProcess::start(&config);
    wait_until(
        Duration::from_secs(60),
        "backlog drained by another relay",
        || async { db.waiting().await == 0 },
    )
    .await;
    // The frozen relay wakes up: its transaction is gone, it must not lose or double-mark anything.
    unsafe {
        libc::kill(relay.pid(), libc::SIGCONT);
    }
    let got = read_stream(&nats.jetstream().await, &stream).await;
    let got_ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(got_ids, ids, "relay2 stderr:\n{}", relay2.stderr());
    assert_eq!(got.len(), ids.len());
}

/// The database connection dies after the broker confirmed a batch and before the mark: the
/// relay counts the rows in outbox_unmarked_published_total, reconnects, and publishes them
/// again; JetStream reports them as duplicates (same Nats-Msg-Id), nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_lost_between_publish_and_mark_republishes_as_duplicates() {
    let nats = OwnedNats::start("").await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let http = free_port();
    let extra = "workers = 1\nbatch_size = 100\npublish_timeout_secs = 20\nclaim_timeout_secs = 30";
    let relay = RelayProcess::start(&relay_config(
        &db.url,
        &nats.url(),
        &stream,
        &prefix,
        &routes(&prefix),
        extra,
        http,
    ));
    let mut ids = enqueue_n(&db, "crash.mark", 1).await;
    wait_until(
        Duration::from_secs(30),
        "first message delivered",
        || async { db.waiting().await == 0 },
    )
    .await;

    nats.pause();
    ids.extend(enqueue_n(&db, "crash.mark", 100).await);
    let backend = wait_for_open_claim(&db.pool, &db.name, 100, Duration::from_secs(30)).await;
    wait_until(
        Duration::from_secs(10),
        "in-flight gauge shows the claimed batch",
        || async { http::scrape_metric(http, "outbox_in_flight_messages", &[]).await == 100.0 },
    )
    .await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(backend)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(terminated);
    nats.resume();

    wait_until(
        Duration::from_secs(30),
        "mark failure counted as duplicate risk",
        || async {
            http::scrape_metric(http, "outbox_unmarked_published_total", &[]).await == 100.0
        },
    )
    .await;
    wait_until(
        Duration::from_secs(60),
        "backlog drained after reconnecting",
        || async { db.waiting().await == 0 },
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "re-published rows acknowledged as duplicates",
        || async {
            http::scrape_metric(http, "outbox_published_total", &[("outcome", "duplicate")]).await
                == 100.0
        },
    )
    .await;
    assert_eq!(
        http::scrape_metric(http, "outbox_in_flight_messages", &[]).await,
        0.0
    );
    let got = read_stream(&nats.jetstream().await, &stream).await;
    let got_ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(got_ids, ids, "relay stderr:\n{}", relay.stderr());
    assert_eq!(got.len(), ids.len());
}

/// SIGTERM under load: the relay stops claiming, finishes and marks the batches in flight,
/// exits 0. Every row it removed from the outbox is in the stream and vice versa (no batch
/// published and left unmarked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_batches_and_exits_zero() {
    let nats = OwnedNats::start("").await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let total = 20_000;
    let ids = enqueue_n(&db, "shutdown.drain", total).await;
    let extra = "batch_size = 200\nshutdown_timeout_secs = 20";
    let mut relay = RelayProcess::start(&relay_config(
        &db.url,
        &nats.url(),
        &stream,
        &prefix,
        &routes(&prefix),
        extra,
        0,
    ));
    wait_until(Duration::from_secs(60), "relay under way", || async {
        db.waiting().await < total as i64 - 1_000
    })
    .await;

    relay.sigterm();
    let code = relay.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM; stderr:\n{}",
        relay.stderr()
    );
    assert!(relay.stderr().contains("stopped"), "{}", relay.stderr());

    let waiting = db.waiting().await as usize;
    assert!(
        waiting > 0,
        "the relay stopped claiming before the backlog was empty"
    );
    assert_eq!(
        claimable(&db.pool).await as usize,
        waiting,
        "no row is left locked"
    );
    let got = read_stream(&nats.jetstream().await, &stream).await;
    let got_ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    let remaining: BTreeSet<String> =
        sqlx::query_scalar::<_, String>("SELECT message_id FROM outbox.messages")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        got_ids.len() + remaining.len(),
        total,
        "published + still waiting = everything"
    );
    assert!(
        got_ids.is_disjoint(&remaining),
        "a published row was left unmarked"
    );
    assert_eq!(
        got_ids.union(&remaining).cloned().collect::<BTreeSet<_>>(),
        ids
    );
}

/// SIGTERM while the broker hangs: the batch cannot finish, so after shutdown_timeout_secs the
/// relay abandons it (the claim rolls back) and still exits 0; the rows are claimable at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_hung_broker_exits_zero_within_the_deadline() {
    let nats = OwnedNats::start("").await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let extra = "workers = 1\nbatch_size = 50\npublish_timeout_secs = 60\nclaim_timeout_secs = 90\nshutdown_timeout_secs = 2";
    let mut relay = RelayProcess::start(&relay_config(
        &db.url,
        &nats.url(),
        &stream,
        &prefix,
        &routes(&prefix),
        extra,
        0,
    ));
    enqueue_n(&db, "shutdown.hung", 1).await;
    wait_until(
        Duration::from_secs(30),
        "first message delivered",
        || async { db.waiting().await == 0 },
    )
    .await;
    nats.pause();
    enqueue_n(&db, "shutdown.hung", 50).await;
    wait_for_open_claim(&db.pool, &db.name, 50, Duration::from_secs(30)).await;

    relay.sigterm();
    let started = Instant::now();
    // shutdown_timeout_secs = 2, then at most 5 s to close the pool: well inside 20 s.
    let code = relay.wait_exit(Duration::from_secs(20)).await;
    println!(
        "EXIT after SIGTERM with a hung broker: {} ms (shutdown_timeout_secs = 2)",
        started.elapsed().as_millis()
    );
    assert_eq!(code, Some(0), "stderr:\n{}", relay.stderr());
    assert!(
        relay.stderr().contains("did not finish in time"),
        "{}",
        relay.stderr()
    );
    wait_until(Duration::from_secs(10), "rows released", || async {
        claimable(&db.pool).await == 50
    })
    .await;
    nats.resume();
}
