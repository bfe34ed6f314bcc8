//! Wake-ups: an idle relay registers in `outbox.relay_sleepers` and waits on LISTEN; the next
//! committed row's insert trigger sees the registration and NOTIFYs, so the row is published at
//! once rather than at the next fallback poll.

mod support;

use std::time::Duration;

use outbox_client::{enqueue, Message};
use support::*;

async fn sleepers(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox.relay_sleepers")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// guarantees.md: a row committed while the relay sleeps is published on the NOTIFY, without
/// waiting for the fallback poll. The fallback poll is set to 60 s and each message must
/// arrive within 20 s, so only the notification can deliver it in time (a behavioural check,
/// not a latency figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_row_wakes_a_sleeping_relay_before_the_fallback_poll() {
    let db = TestDb::new().await;
    let (stream, prefix) = (unique("S"), unique("t"));
    let mut consumer = NatsConsumer::new(&nats_url(), &stream, &[format!("{prefix}.>")]).await;
    let relay = RelayProcess::start(&nats_config(
        &db.url,
        &nats_url(),
        &stream,
        &prefix,
        "poll_interval_ms = 60000\nsleep_after_ms = 100",
    ));

    for round in 0..3 {
        wait_until(
            Duration::from_secs(20),
            "the idle relay registered as a sleeper",
            || async { sleepers(&db).await == 1 },
        )
        .await;
        let id = format!("wake-{round}");
        if round == 1 {
            // Through the SQL function, in an explicit transaction.
            let mut tx = db.pool.begin().await.unwrap();
            sqlx::query("SELECT outbox.enqueue('wake.up', 'x', NULL, '{}', $1)")
                .bind(&id)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        } else {
            enqueue(
                &mut db.pool.acquire().await.unwrap(),
                &Message::bytes("wake.up", b"x".to_vec()).message_id(id.clone()),
            )
            .await
            .unwrap();
        }
        let got = consumer.collect(1, Duration::from_secs(20)).await;
        assert_eq!(
            got.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>(),
            [id.as_str()],
            "round {round}: the sleeping relay was not woken; stderr:\n{}",
            relay.stderr()
        );
    }
    wait_until(Duration::from_secs(10), "outbox drained", || async {
        db.waiting().await == 0
    })
    .await;
    consumer.delete_stream().await;
}
