//! NATS JetStream: one stream per benchmark (`OUTBOX_BENCH_<hex>`, subjects `<prefix>.>`), the
//! relay's NATS sink routed to it, and a pull consumer without acks as the independent reader.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::Context as JetStream;
use async_trait::async_trait;
use futures::StreamExt;
use outbox_relay::sinks::nats::{stream_config, NatsConfig, NatsRoute, NatsStreamConfig};
use outbox_relay::sinks::SinkConfig;
use tokio::sync::mpsc;

use super::{Broker, Destination, TOPIC};

pub struct NatsBroker {
    url: String,
    storage: String,
    client: async_nats::Client,
    js: JetStream,
}

impl NatsBroker {
    pub async fn connect(url: &str, storage: &str) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name("outbox-bench")
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .with_context(|| format!("cannot connect to NATS at {url}"))?;
        let js = async_nats::jetstream::new(client.clone());
        Ok(Self {
            url: url.to_string(),
            storage: storage.to_string(),
            client,
            js,
        })
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn version(&self) -> String {
        self.client.server_info().version
    }

    async fn prepare(&self, run: &str) -> anyhow::Result<Box<dyn Destination>> {
        let stream = format!("OUTBOX_BENCH_{}", run.to_uppercase());
        let prefix = format!("bench_{run}");
        let config = NatsStreamConfig {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            create: true,
            duplicate_window_secs: 120,
            storage: self.storage.clone(),
            ..Default::default()
        };
        // The stream holds every message of the run (no limits, the basis of the results in
        // docs/benchmarks.md): at its byte limit a JetStream store removes the oldest messages
        // as new ones arrive, broker work that a long steady state would otherwise measure.
        // The sink keeps the relay's default limits, which its file then leaves out, so that an
        // earlier relay (`--relay-bin`) that knows no limits reads it too; the relay does not
        // change an existing stream (it logs the difference once).
        let unlimited = NatsStreamConfig {
            max_age_secs: 0,
            max_bytes: 0,
            max_msgs: 0,
            ..config.clone()
        };
        self.js
            .create_stream(stream_config(&unlimited))
            .await
            .with_context(|| format!("cannot create JetStream stream {stream}"))?;
        let sink = NatsConfig {
            url: self.url.clone(),
            stream: config,
            routes: vec![NatsRoute {
                topics: vec![TOPIC.into()],
                subject: format!("{prefix}.{{topic}}"),
            }],
            ..Default::default()
        };
        Ok(Box::new(NatsDestination {
            js: self.js.clone(),
            stream,
            sink,
        }))
    }
}

struct NatsDestination {
    js: JetStream,
    stream: String,
    sink: NatsConfig,
}

#[async_trait]
impl Destination for NatsDestination {
    fn sink_config(&self) -> SinkConfig {
        SinkConfig::Nats(self.sink.clone())
    }

    async fn consume(&self, tx: mpsc::UnboundedSender<(String, Instant)>) -> anyhow::Result<()> {
        let stream = self.js.get_stream(&self.stream).await?;
        let consumer = stream
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await?;
        // Short pull requests: a pull request the client and the server disagree about ends
        // within `expires` (async-nats' default is 30 s, which shows up in the latencies as
        // 30-35 s pauses of delivery while the relay keeps publishing).
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1_000)
            .expires(Duration::from_secs(2))
            .heartbeat(Duration::from_millis(500))
            .messages()
            .await?;
        tokio::spawn(async move {
            while let Some(next) = messages.next().await {
                let at = Instant::now();
                let Ok(m) = next else { continue };
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                if tx.send((id, at)).is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    async fn stored(&self) -> anyhow::Result<u64> {
        let mut s = self.js.get_stream(&self.stream).await?;
        Ok(s.info().await?.state.messages)
    }

    async fn cleanup(&self) {
        if let Err(e) = self.js.delete_stream(&self.stream).await {
            eprintln!(
                "warning: could not delete JetStream stream {}: {e}",
                self.stream
            );
        }
    }
}
