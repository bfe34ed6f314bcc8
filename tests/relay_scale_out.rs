//! Several relay processes on one database: `FOR UPDATE SKIP LOCKED` hands every row to exactly
//! one of them, so nothing is missing and nothing is published twice.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use outbox_client::{enqueue_many, Message};
use support::*;

const N: usize = 20_000;

/// guarantees.md: several relays on one database never publish the same row twice in normal
/// operation, and every committed row is published.
///
/// 20,000 messages, 3 concurrent `outbox-relay run` processes. Checked three ways: the
/// independent consumer sees each of the 20,000 ids exactly once; the stream stores 20,000
/// messages; and the relays' own counters say 20,000 were delivered and 0 were acknowledged as
/// duplicates, i.e. JetStream's de-duplication was never needed to hide a double publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_messages_three_relays_none_missing_none_twice() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;

    // Small batches so the three relays interleave many claims.
    let config = nats_config(&db.url, &nats_url(), &stream, &prefix, "batch_size = 100");
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let relays: Vec<RelayProcess> = addrs
        .iter()
        .map(|a| {
            RelayProcess::start(&http::with_http(
                config.clone(),
                a.rsplit(':').next().unwrap().parse().unwrap(),
            ))
        })
        .collect();
    for a in &addrs {
        http::wait_healthy(a, Duration::from_secs(30)).await;
    }

    // Enqueue while all three run, in chunks as an application would.
    let mut expected = BTreeSet::new();
    for chunk in 0..(N / 1000) {
        let batch: Vec<Message> = (0..1000)
            .map(|i| {
                let n = chunk * 1000 + i;
                Message::bytes(format!("scale.t{}", n % 4), n.to_string().into_bytes())
                    .key(format!("k{}", n % 97))
            })
            .collect();
        for e in enqueue_many(&mut db.pool.acquire().await.unwrap(), &batch)
            .await
            .unwrap()
        {
            assert!(e.inserted);
            expected.insert(e.message_id);
        }
    }
    assert_eq!(expected.len(), N);

    let got = consumer.collect(N, Duration::from_secs(90)).await;
    let stderr = || {
        relays
            .iter()
            .map(|r| r.stderr())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert_eq!(
        got.len(),
        N,
        "missing messages; relay stderr:\n{}",
        stderr()
    );
    let seen: BTreeSet<String> = got.iter().map(|r| r.msg_id.clone()).collect();
    assert_eq!(seen.len(), N, "the consumer saw some id twice");
    assert_eq!(
        seen, expected,
        "the consumer saw ids that were not enqueued, or missed some"
    );
    assert!(
        consumer
            .collect(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "more than N messages arrived"
    );
    assert_eq!(consumer.stored().await, N as u64);
    wait_until(Duration::from_secs(20), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;

    // The relays' own accounting: every row delivered once, none needed de-duplication.
    let (mut delivered, mut duplicate) = (0.0, 0.0);
    for a in &addrs {
        let body = http::scrape(a).await;
        let d = http::metric(&body, "outbox_published_total", &[("outcome", "delivered")])
            .unwrap_or(0.0);
        assert!(
            d > 0.0,
            "relay {a} delivered nothing: the test did not exercise three relays"
        );
        delivered += d;
        duplicate += http::metric(&body, "outbox_published_total", &[("outcome", "duplicate")])
            .unwrap_or(0.0);
        assert_eq!(
            http::metric(&body, "outbox_unmarked_published_total", &[]),
            Some(0.0)
        );
    }
    assert_eq!(delivered, N as f64);
    assert_eq!(duplicate, 0.0);
    consumer.delete_stream().await;
}
