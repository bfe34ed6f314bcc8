//! Per-message failures (guarantees.md, "Per-message failures"): permanent rejections
//! dead-letter at once with the reason, retriable ones back off and dead-letter after
//! `relay.max_attempts` with their error history, and neither blocks the other messages.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_client::{enqueue_many, Message};
use support::*;

#[derive(Debug, sqlx::FromRow)]
struct Dead {
    topic: String,
    attempts: i32,
    last_error: String,
    errors: serde_json::Value,
}

async fn dead(db: &TestDb, topic: &str) -> Option<Dead> {
    sqlx::query_as(
        "SELECT topic, attempts, last_error, errors FROM outbox.dead_letters WHERE topic = $1",
    )
    .bind(topic)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

fn history_times(errors: &serde_json::Value) -> Vec<DateTime<Utc>> {
    errors
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_dead_letter_at_once_and_retriable_ones_back_off_then_dead_letter() {
    // max_payload 4096: the client library refuses bigger messages before sending them.
    let nats = OwnedNats::start("max_payload: 4096").await;
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));

    let mut messages = Vec::new();
    let mut good = BTreeSet::new();
    for i in 0..100 {
        let id = format!("ok-{i}");
        good.insert(id.clone());
        messages.push(
            Message::bytes("ok.a", format!("good {i}").into_bytes())
                .message_id(id)
                .key("k"),
        );
        if i == 49 {
            // Bigger than the broker's max_payload: permanent.
            messages.push(Message::bytes("big.a", vec![7u8; 10_000]).message_id("big-1"));
            // A header value NATS cannot carry (CR/LF): permanent.
            messages.push(
                Message::bytes("badhdr.a", b"x".to_vec())
                    .header("h", "a\r\nb")
                    .message_id("badhdr-1"),
            );
            // No route for this topic: permanent.
            messages.push(Message::bytes("orphan.x", b"x".to_vec()).message_id("orphan-1"));
            // Routed to a subject no stream captures: retriable ("no_stream").
            messages.push(Message::bytes("lost.a", b"x".to_vec()).message_id("lost-1"));
        }
    }
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &messages)
        .await
        .unwrap();

    let http = free_port();
    let routes = format!(
        r#"[{{ topics = ["ok.*", "big.*", "badhdr.*"], subject = "{prefix}.{{topic}}" }}, {{ topics = ["lost.*"], subject = "nostream_{prefix}.{{topic}}" }}]"#
    );
    let relay_extra =
        "max_attempts = 3\nretry_initial_ms = 1000\nretry_max_secs = 2\nlag_interval_secs = 1";
    let relay = RelayProcess::start(&relay_config(
        &db.url,
        &nats.url(),
        &stream,
        &prefix,
        &routes,
        relay_extra,
        http,
    ));

    // The retriable failure: an attempt counted, the error recorded, the row pushed into the future.
    wait_until(
        Duration::from_secs(30),
        "lost-1 failed once and waits for its retry",
        || async {
            sqlx::query_scalar::<_, i32>(
                "SELECT attempts FROM outbox.messages WHERE message_id = 'lost-1'",
            )
            .fetch_optional(&db.pool)
            .await
            .unwrap()
            .is_some_and(|a| a >= 1)
        },
    )
    .await;
    let (attempts, last_error, delayed, history): (i32, String, bool, i64) = sqlx::query_as(
        "SELECT attempts, last_error, available_at > created_at, jsonb_array_length(errors)::bigint
           FROM outbox.messages WHERE message_id = 'lost-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!((1..3).contains(&attempts), "attempts {attempts}");
    assert!(
        last_error.contains(&format!(
            "no JetStream stream captures this subject (\"nostream_{prefix}.lost.a\")"
        )),
        "the error names the subject: {last_error}"
    );
    assert!(
        delayed,
        "a failed row must become available only after a backoff"
    );
    assert_eq!(
        history, attempts as i64,
        "one history entry per failed attempt"
    );

    // The permanent failures are dead already, and the good messages were not blocked.
    wait_until(
        Duration::from_secs(30),
        "good messages delivered and permanent failures dead-lettered",
        || async {
            let waiting: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox.messages WHERE topic <> 'lost.a'")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            waiting == 0 && db.dead_letters().await >= 3
        },
    )
    .await;
    for (topic, reason) in [
        ("big.a", "max_payload"),
        ("badhdr.a", "header"),
        ("orphan.x", "no route"),
    ] {
        let d = dead(&db, topic)
            .await
            .unwrap_or_else(|| panic!("{topic} is dead-lettered"));
        assert_eq!(d.attempts, 1, "{topic}: dead-lettered at the first attempt");
        assert!(
            d.last_error.contains(reason),
            "{topic}: reason {reason:?} in {:?}",
            d.last_error
        );
        assert_eq!(
            d.errors.as_array().unwrap().len(),
            1,
            "{topic}: {:?}",
            d.errors
        );
    }

    // The retriable failure dead-letters after max_attempts, with its whole history.
    wait_until(
        Duration::from_secs(30),
        "lost-1 dead-lettered after 3 attempts",
        || async { dead(&db, "lost.a").await.is_some() },
    )
    .await;
    let d = dead(&db, "lost.a").await.unwrap();
    assert_eq!(d.topic, "lost.a");
    assert_eq!(d.attempts, 3);
    assert!(
        d.last_error.contains("gave up after 3 attempts"),
        "{}",
        d.last_error
    );
    let times = history_times(&d.errors);
    assert_eq!(times.len(), 3, "{:?}", d.errors);
    // Exponential backoff with equal jitter from retry_initial_ms = 1000: at least 500 ms before
    // the second attempt and at least 1000 ms before the third.
    assert!(
        times[1] - times[0] >= chrono::Duration::milliseconds(500),
        "{times:?}"
    );
    assert!(
        times[2] - times[1] >= chrono::Duration::milliseconds(1000),
        "{times:?}"
    );

    // Metrics: dead letters per topic, retries, errors by type; the sink stays up.
    wait_until(
        Duration::from_secs(20),
        "dead-letter gauge shows every topic",
        || async {
            let body = http::get(http, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            ["big.a", "badhdr.a", "orphan.x", "lost.a"]
                .iter()
                .all(|t| http::metric_or_zero(&body, "outbox_dead_letters", &[("topic", t)]) == 1.0)
        },
    )
    .await;
    let (_, body) = http::get(http, "/metrics").await.unwrap();
    assert_eq!(
        http::metric_or_zero(&body, "outbox_retries_total", &[("topic", "lost.a")]),
        2.0,
        "{body}"
    );
    assert_eq!(
        http::metric_or_zero(&body, "outbox_published_total", &[("outcome", "dead")]),
        4.0
    );
    assert_eq!(
        http::metric_or_zero(
            &body,
            "outbox_published_total",
            &[("topic", "ok.a"), ("outcome", "delivered")]
        ),
        100.0
    );
    assert_eq!(
        http::metric_or_zero(
            &body,
            "outbox_publish_errors_total",
            &[("error_type", "too_large")]
        ),
        1.0
    );
    assert_eq!(
        http::metric_or_zero(
            &body,
            "outbox_publish_errors_total",
            &[("error_type", "invalid_header")]
        ),
        1.0
    );
    assert_eq!(
        http::metric_or_zero(
            &body,
            "outbox_publish_errors_total",
            &[("error_type", "no_route")]
        ),
        1.0
    );
    assert_eq!(
        http::metric_or_zero(
            &body,
            "outbox_publish_errors_total",
            &[("error_type", "no_stream")]
        ),
        3.0
    );
    assert_eq!(
        http::metric_or_zero(&body, "outbox_sink_up", &[("sink", "nats")]),
        1.0,
        "per-message failures must not open the circuit"
    );

    // An independent consumer: every good message arrived, nothing else did.
    let got = read_stream(&nats.jetstream().await, &stream).await;
    let ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(got.len(), 100, "relay stderr:\n{}", relay.stderr());
    assert_eq!(ids, good);
}

/// guarantees.md ("Per-message failures"), NATS: a topic that renders a subject NATS cannot
/// deliver (whitespace, an empty token, a wildcard) and a header without a name can never be
/// published: each row is dead-lettered at its first attempt with an error that names the
/// subject or header, and nothing of it reaches the stream. The retry delay is an hour, so a
/// row treated as retriable would still be waiting when the test gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_nats_cannot_deliver_and_nameless_headers_are_dead_lettered_at_once() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    // (topic, what the error must say besides the subject)
    let bad = [
        ("n.sp ace", "whitespace"),
        ("n.end.", "empty token"),
        ("n.a..b", "empty token"),
        ("n.star.*", "wildcard"),
        ("n.gt.>", "wildcard"),
        ("n.mid*dle", "wildcard"),
    ];
    let mut messages: Vec<Message> = bad
        .iter()
        .map(|(topic, _)| Message::bytes(*topic, b"x".to_vec()))
        .collect();
    messages.push(Message::bytes("n.ok", b"good".to_vec()).message_id("good-1"));
    enqueue_many(&mut db.pool.acquire().await.unwrap(), &messages)
        .await
        .unwrap();
    // Through the SQL function, as a service in another language would (the client crate
    // refuses a nameless header itself).
    sqlx::query(r#"SELECT * FROM outbox.enqueue('h.nameless', 'x', NULL, '{"": "v"}', NULL)"#)
        .execute(&db.pool)
        .await
        .unwrap();

    let relay = RelayProcess::start(&nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "max_attempts = 5\nretry_initial_ms = 3600000\nretry_max_secs = 3600",
    ));
    wait_until(
        Duration::from_secs(30),
        "every row delivered or dead-lettered",
        || async { db.waiting().await == 0 },
    )
    .await;

    for (topic, why) in bad {
        let d = dead(&db, topic)
            .await
            .unwrap_or_else(|| panic!("{topic:?} is dead-lettered"));
        assert_eq!(d.attempts, 1, "{topic:?}: at the first attempt");
        let subject = format!("{prefix}.{topic}");
        assert!(
            d.last_error.contains(&format!("subject {subject:?}"))
                && d.last_error.contains("is not a valid NATS subject")
                && d.last_error.contains(why),
            "{topic:?}: {}",
            d.last_error
        );
    }
    let d = dead(&db, "h.nameless")
        .await
        .expect("h.nameless is dead-lettered");
    assert_eq!(d.attempts, 1);
    assert!(
        d.last_error
            .contains(r#"header name "" is not valid for NATS"#),
        "{}",
        d.last_error
    );
    assert_eq!(
        consumer.stored().await,
        1,
        "only the good message reached the stream; relay stderr:\n{}",
        relay.stderr()
    );
}
