//! Kafka: one topic per benchmark (`outbox_bench_<hex>`, `--kafka-partitions` partitions), the
//! relay's Kafka sink routed to it (idempotent producer, `acks = all`: the sink's fixed
//! settings), and an rdkafka consumer with explicitly assigned partitions (no consumer group
//! coordination) as the independent reader.
//!
//! The broker is either an existing cluster (`--kafka-brokers host:port`) or, by default, a
//! `tansu` broker (a Kafka-protocol broker in one binary) that the bench starts on a free port
//! with its own temporary directory and kills when it ends: the test kit's launcher
//! (`outbox_testkit::kafka::TansuBroker`), as in the tests. Without `tansu` (`$TANSU_BIN`,
//! `PATH`, `~/.cargo/bin`) the Kafka rows are skipped with the reason.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use outbox_relay::sinks::kafka::{KafkaConfig, KafkaRoute};
use outbox_relay::sinks::{SinkConfig, IDEMPOTENCY_HEADER};
use outbox_testkit::kafka::{metadata_ok, partition_count, Storage, TansuBroker};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Broker, Destination, TOPIC};

pub struct KafkaBroker {
    brokers: String,
    partitions: i32,
    /// Replication factor of the benchmark topics: 1 on the bench's own single broker, the
    /// cluster's default (-1) on an existing one.
    replication: i32,
    admin: Arc<AdminClient<DefaultClientContext>>,
    version: String,
    owned: Option<TansuBroker>,
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "3000");
    c
}

impl KafkaBroker {
    /// An existing cluster at `brokers`.
    pub async fn external(brokers: &str, partitions: i32) -> anyhow::Result<Self> {
        let b = brokers.to_string();
        let ok = tokio::task::spawn_blocking(move || metadata_ok(&b)).await?;
        anyhow::ensure!(ok, "no Kafka broker answers at {brokers}");
        Self::with(
            brokers.to_string(),
            partitions,
            -1,
            format!("Kafka at {brokers}"),
            None,
        )
    }

    /// Starts a tansu broker of the bench's own on a free port. `storage` is `memory` or
    /// `sqlite` (a file in the broker's temporary directory).
    pub async fn start_tansu(storage: &str, partitions: i32) -> anyhow::Result<Self> {
        let engine = match storage {
            "memory" => Storage::Memory,
            _ => Storage::Sqlite,
        };
        let owned = TansuBroker::launch(engine, true)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; or pass --kafka-brokers host:port"))?;
        let version = format!(
            "{} ({storage} storage, started by the bench)",
            owned.version()
        );
        Self::with(owned.brokers(), partitions, 1, version, Some(owned))
    }

    fn with(
        brokers: String,
        partitions: i32,
        replication: i32,
        version: String,
        owned: Option<TansuBroker>,
    ) -> anyhow::Result<Self> {
        let admin = Arc::new(
            client_config(&brokers)
                .create()
                .context("cannot create a Kafka admin client")?,
        );
        Ok(Self {
            brokers,
            partitions,
            replication,
            admin,
            version,
            owned,
        })
    }
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

#[async_trait]
impl Broker for KafkaBroker {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    async fn prepare(&self, run: &str) -> anyhow::Result<Box<dyn Destination>> {
        if let Some(owned) = &self.owned {
            anyhow::ensure!(
                owned.answers().await,
                "the bench's tansu broker stopped answering: {}",
                owned.log_tail()
            );
        }
        let topic = format!("outbox_bench_{run}");
        let new = NewTopic::new(
            &topic,
            self.partitions,
            TopicReplication::Fixed(self.replication),
        );
        let results = self
            .admin
            .create_topics([&new], &admin_options())
            .await
            .with_context(|| format!("cannot create the Kafka topic {topic}"))?;
        for r in results {
            if let Err((name, code)) = r {
                anyhow::bail!("cannot create the Kafka topic {name}: {code}");
            }
        }
        let dest = KafkaDestination {
            brokers: self.brokers.clone(),
            topic: topic.clone(),
            partitions: self.partitions,
            admin: Arc::clone(&self.admin),
            stop: CancellationToken::new(),
            reader: Mutex::new(None),
        };
        // Wait until the metadata lists every partition, as the relay's producer needs it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (b, t) = (self.brokers.clone(), topic.clone());
            let n = tokio::task::spawn_blocking(move || partition_count(&b, &t)).await?;
            if n == Some(self.partitions as usize) {
                return Ok(Box::new(dest));
            }
            if Instant::now() > deadline {
                dest.cleanup().await;
                anyhow::bail!(
                    "the Kafka topic {topic} did not show {} partitions in the metadata within 20 s (saw {n:?})",
                    self.partitions
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct KafkaDestination {
    brokers: String,
    topic: String,
    partitions: i32,
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// Stops the consumer task.
    stop: CancellationToken,
    /// The consumer task: it must have ended (and the consumer be closed) before the topic is
    /// deleted. A fetch for a deleted topic gets tansu's unknown-topic answer, whose
    /// leader-change tag with a zero topic id crashes librdkafka 2.12 (a null topic name
    /// dereferenced in `rd_kafka_metadata_update_op`).
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[async_trait]
impl Destination for KafkaDestination {
    fn sink_config(&self) -> SinkConfig {
        SinkConfig::Kafka(KafkaConfig {
            brokers: self.brokers.clone(),
            routes: vec![KafkaRoute {
                topics: vec![TOPIC.into()],
                topic: self.topic.clone(),
            }],
            ..KafkaConfig::default()
        })
    }

    async fn consume(&self, tx: mpsc::UnboundedSender<(String, Instant)>) -> anyhow::Result<()> {
        let consumer: StreamConsumer = client_config(&self.brokers)
            .set("group.id", format!("{}_reader", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("cannot create the Kafka consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = self.stop.clone();
        let reader = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = consumer.recv() => m,
                    _ = stop.cancelled() => break,
                    _ = tx.closed() => break,
                };
                let at = Instant::now();
                // Transient consumer errors are retried by librdkafka.
                let Ok(m) = next else { continue };
                let id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == IDEMPOTENCY_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                    .unwrap_or_default();
                if tx.send((id, at)).is_err() {
                    break;
                }
            }
            // Closes the consumer (leaves no fetch in flight).
            drop(consumer);
        });
        if let Ok(mut slot) = self.reader.lock() {
            *slot = Some(reader);
        }
        Ok(())
    }

    /// Messages in the topic (high minus low watermark, summed over partitions). tansu 0.6's
    /// memory storage under-reports high watermarks after a fast drain (16,004 for 20,000
    /// messages that a consumer then read in full), so with it this is a lower bound.
    async fn stored(&self) -> anyhow::Result<u64> {
        let (brokers, topic, partitions) =
            (self.brokers.clone(), self.topic.clone(), self.partitions);
        tokio::task::spawn_blocking(move || {
            let c = client_config(&brokers).create::<BaseConsumer>()?;
            let mut total = 0;
            for p in 0..partitions {
                let (low, high) = c.fetch_watermarks(&topic, p, Duration::from_secs(5))?;
                total += (high - low).max(0) as u64;
            }
            Ok(total)
        })
        .await?
    }

    async fn cleanup(&self) {
        self.stop.cancel();
        let reader = self.reader.lock().ok().and_then(|mut r| r.take());
        if let Some(reader) = reader {
            let _ = reader.await;
        }
        let deleted = self
            .admin
            .delete_topics(&[self.topic.as_str()], &admin_options())
            .await;
        let failed = match deleted {
            Ok(results) => results
                .into_iter()
                .find_map(|r| r.err())
                .map(|(_, c)| c.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            eprintln!("warning: could not delete Kafka topic {}: {e}", self.topic);
        }
    }
}
