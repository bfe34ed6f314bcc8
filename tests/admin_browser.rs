//! The admin's pages in a headless Chromium, as an operator paged at night uses them, against a
//! real relay, database and NATS: find a dead letter and retry it, release a parked key, pause a
//! topic and watch its backlog grow while others flow, replay a range and count it at an
//! independent consumer. With `OUTBOX_ADMIN_SCREENSHOTS=<dir>` it writes the screenshots
//! docs/admin.md shows.

mod support;

use std::time::Duration;

use outbox_testkit::browser::{Browser, Locator};
use support::*;

const USER: &str = "night-shift";
const PASSWORD: &str = "paged-at-3am-again";

fn config(db: &TestDb, stream: &str, prefix: &str, late: &str, port: u16) -> String {
    format!(
        r#"
[database]
url = "{db}"

[relay]
max_attempts = 1
retention_secs = 3600

[ordering]
on_dead = "park"

[http]
listen = "127.0.0.1:{port}"

[admin]
enabled = true
path_prefix = "/outbox"
lag_sample_secs = 1

[[admin.users]]
name = "{USER}"
role = "admin"
password = "{PASSWORD}"

[sinks.nats]
kind = "nats"
url = "{nats}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory", max_bytes = 67108864 }}
routes = [
  {{ topics = ["late.*"], subject = "{late}.{{topic}}" }},
  {{ topics = ["*"], subject = "{prefix}.{{topic}}" }},
]
"#,
        db = db.url,
        nats = nats_url(),
    )
}

async fn enqueue(db: &TestDb, topic: &str, key: &str, payloads: &[&str]) {
    for p in payloads {
        sqlx::query("INSERT INTO outbox.messages (topic, key, payload) VALUES ($1, $2, convert_to($3, 'UTF8'))")
            .bind(topic)
            .bind(key)
            .bind(p)
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_fixes_dead_letters_keys_and_topics_from_the_browser() {
    let Some(browser) = Browser::start(
        "an_operator_fixes_dead_letters_keys_and_topics_from_the_browser",
        1280,
        900,
    )
    .await
    else {
        return;
    };
    let shots = std::env::var_os("OUTBOX_ADMIN_SCREENSHOTS").map(std::path::PathBuf::from);
    let db = TestDb::new().await;
    let (stream, prefix, late) = (unique("S"), unique("t"), unique("late"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let port = free_port();
    let relay = RelayProcess::start(&config(&db, &stream, &prefix, &late, port));
    let base = format!("http://127.0.0.1:{port}/outbox");
    let signed_in = format!("http://{USER}:{PASSWORD}@127.0.0.1:{port}/outbox");

    // No stream captures the `late.*` subjects yet: each key's first message is dead-lettered
    // after its one attempt and parks its key; the second waits behind it.
    enqueue(&db, "late.orders", "k-retry", &["retry-1", "retry-2"]).await;
    enqueue(&db, "late.orders", "k-release", &["release-1", "release-2"]).await;
    wait_until(
        Duration::from_secs(60),
        "two dead letters, two parked keys",
        || async { count(&db, "SELECT count(*) FROM outbox.parked_keys").await == 2 },
    )
    .await;
    // The operator creates the missing stream.
    let mut late_consumer =
        NatsConsumer::new(&nats_url(), &unique("LATE"), &[format!("{late}.>")]).await;

    browser
        .client
        .goto(&format!("{signed_in}/overview"))
        .await
        .unwrap();
    browser
        .wait_for_text("late.orders", false, Duration::from_secs(30))
        .await;
    if let Some(dir) = &shots {
        browser
            .wait_for_text("Waiting rows, last hour", false, Duration::from_secs(5))
            .await;
        browser.screenshot(&dir.join("overview.png")).await;
    }

    // Release one parked key from the Keys page: its second message flows, its dead letter stays.
    browser.client.goto(&format!("{base}/keys")).await.unwrap();
    browser
        .wait_for_text("k-release", false, Duration::from_secs(10))
        .await;
    if let Some(dir) = &shots {
        browser.screenshot(&dir.join("keys.png")).await;
    }
    browser
        .client
        .find(Locator::XPath(
            "//tr[td[contains(., 'k-release')]]//button[contains(., 'Release')]",
        ))
        .await
        .expect("a Release button for k-release")
        .click()
        .await
        .unwrap();
    let got = late_consumer.collect(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "relay stderr:\n{}", relay.stderr());
    assert_eq!(got[0].payload, b"release-2");

    // Find the other dead letter on the Dead letters page, open it, retry it: both of its key's
    // messages arrive, in order.
    browser
        .client
        .goto(&format!("{base}/dead?key=k-retry"))
        .await
        .unwrap();
    browser
        .wait_for_text("late.orders", false, Duration::from_secs(10))
        .await;
    if let Some(dir) = &shots {
        browser.screenshot(&dir.join("dead-letters.png")).await;
    }
    let dead_id = count(
        &db,
        "SELECT id FROM outbox.dead_letters WHERE key = 'k-retry'",
    )
    .await;
    browser
        .client
        .find(Locator::LinkText(&dead_id.to_string()))
        .await
        .expect("a link to the dead letter")
        .click()
        .await
        .unwrap();
    browser
        .wait_for_text("retry-1", false, Duration::from_secs(10))
        .await;
    if let Some(dir) = &shots {
        browser.screenshot(&dir.join("message.png")).await;
    }
    browser
        .client
        .find(Locator::XPath("//button[normalize-space(.)='Retry']"))
        .await
        .expect("a Retry button")
        .click()
        .await
        .unwrap();
    let got = late_consumer.collect(2, Duration::from_secs(30)).await;
    let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        [b"retry-1".as_slice(), b"retry-2"],
        "in key order"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.parked_keys").await,
        0
    );

    // Pause a topic from the overview: its backlog grows while another topic flows. (An old
    // dead letter lists the topic on the overview before anything of it waits.)
    sqlx::query(
        "INSERT INTO outbox.dead_letters (id, message_id, topic, payload, headers, created_at, attempts, last_error, errors)
         VALUES (900000001, 'old-one', 'busy.orders', 'x', '{}', now(), 1, 'long ago', '[]')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    browser
        .client
        .goto(&format!("{base}/overview"))
        .await
        .unwrap();
    browser
        .wait_for_text("busy.orders", true, Duration::from_secs(30))
        .await;
    browser
        .click_and_confirm("tr:has(a[href$='topic=busy.orders']) button")
        .await;
    wait_until(
        Duration::from_secs(30),
        "the relay reports the pause",
        || async {
            http::scrape_metric(port, "outbox_topic_paused", &[("topic", "busy.orders")]).await
                == 1.0
        },
    )
    .await;
    let busy: Vec<String> = (1..=10).map(|i| format!("b-{i}")).collect();
    let busy: Vec<&str> = busy.iter().map(String::as_str).collect();
    enqueue(&db, "busy.orders", "kb", &busy).await;
    enqueue(&db, "calm.orders", "kc", &["c-1", "c-2"]).await;
    let flowing = consumer.collect(2, Duration::from_secs(30)).await;
    assert!(
        flowing.iter().all(|m| m.subject.ends_with(".calm.orders")),
        "only the other topic flows"
    );
    // The overview shows the backlog of the paused topic (reloaded until it has all 10).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        browser.client.refresh().await.unwrap();
        let row = browser
            .client
            .find(Locator::Css("tr:has(a[href$='topic=busy.orders'])"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let waiting = row.split_whitespace().nth(1).map(str::to_string);
        if waiting.as_deref() == Some("10") && row.contains("paused") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the paused topic's row never showed its 10 waiting rows: {row}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(dir) = &shots {
        browser.screenshot(&dir.join("overview-paused.png")).await;
    }
    browser
        .client
        .find(Locator::Css("tr:has(a[href$='topic=busy.orders']) button"))
        .await
        .expect("a Resume button")
        .click()
        .await
        .unwrap();
    let resumed = consumer.collect(10, Duration::from_secs(30)).await;
    assert_eq!(resumed.len(), 10, "the backlog drains after the resume");

    // Replay a range of sent rows from the Messages page; an independent consumer counts them.
    wait_until(
        Duration::from_secs(30),
        "the drained rows kept as sent",
        || async {
            count(
                &db,
                "SELECT count(*) FROM outbox.sent WHERE topic = 'busy.orders'",
            )
            .await
                == 10
        },
    )
    .await;
    let (from, to): (i64, i64) =
        sqlx::query_as("SELECT min(id), max(id) FROM outbox.sent WHERE topic = 'busy.orders'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    browser
        .client
        .goto(&format!("{base}/messages?source=sent&topic=busy.orders"))
        .await
        .unwrap();
    browser
        .wait_for_text("Replay sent ids", false, Duration::from_secs(10))
        .await;
    browser
        .client
        .find(Locator::Css("#replay input[name=id_from]"))
        .await
        .unwrap()
        .send_keys(&from.to_string())
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Css("#replay input[name=id_to]"))
        .await
        .unwrap()
        .send_keys(&to.to_string())
        .await
        .unwrap();
    if let Some(dir) = &shots {
        browser.screenshot(&dir.join("messages-sent.png")).await;
    }
    browser.click_and_confirm("#replay button").await;
    let mut independent = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let all = independent
        .collect(2 + 10 + 10, Duration::from_secs(30))
        .await;
    let replays = all
        .iter()
        .filter(|m| m.headers.contains_key("outbox-replay-of"))
        .count();
    assert_eq!(
        replays, 10,
        "every sent row of the range, once, as a new message"
    );

    browser.client.goto(&format!("{base}/audit")).await.unwrap();
    browser
        .wait_for_text("replay", false, Duration::from_secs(10))
        .await;
    let audit = browser.text().await;
    for action in [
        "keys.release",
        "dead.retry",
        "topics.pause",
        "topics.resume",
        "replay",
    ] {
        assert!(
            audit.contains(action),
            "{action} in the audit trail:\n{audit}"
        );
    }
    assert!(audit.contains(USER));
    if let Some(dir) = &shots {
        browser.screenshot(&dir.join("audit.png")).await;
    }
    browser.quit().await;
    consumer.delete_stream().await;
    late_consumer.delete_stream().await;
}
