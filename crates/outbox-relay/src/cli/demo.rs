//! `outbox-relay demo`: the whole product in one command on local defaults. It migrates,
//! creates sample users and their `user.created` outbox rows in one transaction each (through
//! the client crate), relays them to NATS JetStream, reads them back with an independent
//! consumer, and prints what arrived and the lag.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use outbox_client::{enqueue, Message};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::message::OutboxRow;
use crate::metrics::Metrics;
use crate::redact::redact_url;
use crate::relay::Relay;
use crate::sinks::{render_template, SinkConfig};
use crate::store;

pub async fn run(mut config: Config, count: u32) -> anyhow::Result<()> {
    let nats = match config.sinks.values().find_map(|s| match s {
        SinkConfig::Nats(n) => Some(n.clone()),
        #[allow(unreachable_patterns)]
        _ => None,
    }) {
        Some(n) => n,
        None => anyhow::bail!("the demo publishes to NATS: configure a sink with kind = \"nats\" (or use no config file)"),
    };
    // The demo's relay runs in this process; it needs no HTTP server.
    config.http.listen = String::new();

    let pool = store::connect(
        &config.database.url,
        config.database.max_connections,
        Duration::from_secs(config.database.connect_timeout_secs),
        Duration::from_secs(config.relay.claim_timeout_secs),
    )
    .await
    .with_context(|| {
        format!(
            "cannot connect to PostgreSQL at {}",
            redact_url(&config.database.url)
        )
    })?;
    store::migrate(&pool)
        .await
        .context("migrating the database")?;
    println!("1. migrated {}", redact_url(&config.database.url));

    store::demo::prepare(&pool).await?;

    // An independent consumer, created before anything is published, that sees only new messages.
    let client = async_nats::connect(&nats.url)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", redact_url(&nats.url)))?;
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: nats.stream.name.clone(),
            subjects: nats.stream.subjects.clone(),
            duplicate_window: Duration::from_secs(nats.stream.duplicate_window_secs),
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::New,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .context("creating the demo consumer")?;
    let mut messages = consumer.messages().await?;

    let run_id = uuid::Uuid::now_v7().to_string();
    let mut expected = BTreeMap::new();
    for i in 0..count {
        let email = format!("user{i}-{}@example.com", &run_id[..8]);
        let mut tx = pool.begin().await?;
        let id = store::demo::insert_user(&mut tx, &email).await?;
        let message = Message::json(
            "user.created",
            &serde_json::json!({ "id": id, "email": email }),
        )?
        .key(id.to_string())
        .header("demo-run", run_id.clone());
        let e = enqueue(&mut tx, &message).await?;
        tx.commit().await?;
        expected.insert(e.message_id, id);
    }
    println!(
        "2. created {count} users, each with its user.created outbox row in the same transaction"
    );

    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let relay = Relay::build(&config, pool.clone(), metrics, shutdown.clone()).await?;
    let relay_task = tokio::spawn(relay.run());
    let subject = render_template(
        &nats.routes[0].subject,
        &OutboxRow {
            id: 0,
            message_id: String::new(),
            topic: "user.created".into(),
            key: None,
            payload: vec![],
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            attempts: 0,
        },
    );
    println!(
        "3. relaying to NATS subject {subject} (stream {}); received:",
        nats.stream.name
    );

    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen < expected.len() {
        let next = tokio::time::timeout_at(deadline, messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => anyhow::bail!("reading from NATS: {e}"),
            Ok(None) | Err(_) => {
                shutdown.cancel();
                anyhow::bail!(
                    "only {seen} of {} messages arrived within 30 s: is NATS (JetStream) running at {}?",
                    expected.len(),
                    redact_url(&nats.url)
                )
            }
        };
        let _ = msg.ack().await;
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        if expected.contains_key(&id) {
            seen += 1;
            println!(
                "   {} Nats-Msg-Id={} {}",
                msg.subject,
                id,
                String::from_utf8_lossy(&msg.payload)
            );
        }
    }
    shutdown.cancel();
    let _ = relay_task.await;
    println!("4. all {seen} messages arrived. Lag now:");
    let status = super::status::collect(&pool).await?;
    print!("{}", super::status::render_table(&status));
    Ok(())
}
