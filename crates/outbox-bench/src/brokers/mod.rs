//! The brokers a benchmark can drive, behind one small interface.
//!
//! A [`Broker`] creates, per benchmark, destinations of its own (a stream, an exchange and
//! queue, a topic) and hands back a [`Destination`]: the relay's [`SinkConfig`] routing the
//! benchmark topic there, an independent consumer that reports when each message arrived, a
//! count of what the broker holds, and cleanup.
//!
//! One file per broker (`nats.rs`, `amqp.rs`, `kafka.rs`) implements these two traits and is
//! registered in [`available`]; every scenario then covers it.

use std::time::Instant;

use async_trait::async_trait;
use outbox_relay::sinks::SinkConfig;
use tokio::sync::mpsc;

pub mod amqp;
pub mod kafka;
pub mod nats;

/// The topic every benchmark message is enqueued on.
pub const TOPIC: &str = "bench.event";

/// Connection settings for every broker.
#[derive(Debug, Clone)]
pub struct BrokerUrls {
    pub nats: String,
    pub nats_storage: String,
    pub amqp: String,
    /// An existing Kafka cluster; None starts a tansu broker of the bench's own.
    pub kafka_brokers: Option<String>,
    /// Storage of the bench's own tansu broker: `memory` or `sqlite`.
    pub kafka_storage: String,
    pub kafka_partitions: i32,
}

/// The sink kinds the bench knows, in report order.
pub const KINDS: &[&str] = &["nats", "amqp", "kafka"];

/// Each kind's drain target: the share of the database's own claim+mark ceiling its drain must
/// reach, set by what its broker can take on the reference machine (docs/benchmarks.md,
/// "Targets"). The report evaluates these in this order.
pub const DRAIN_TARGETS_PCT: &[(&str, f64)] = &[("nats", 80.0), ("kafka", 70.0), ("amqp", 60.0)];

#[async_trait]
pub trait Broker: Send + Sync {
    /// The sink kind, as in the relay's config (`nats`, `amqp`, `kafka`).
    fn kind(&self) -> &'static str;
    /// The broker's version, for the report.
    fn version(&self) -> String;
    /// Creates destinations named after `run` (unique per benchmark).
    async fn prepare(&self, run: &str) -> anyhow::Result<Box<dyn Destination>>;
}

#[async_trait]
pub trait Destination: Send + Sync {
    /// The sink configuration that routes [`TOPIC`] to this destination.
    fn sink_config(&self) -> SinkConfig;
    /// Starts an independent consumer that sends `(message id, arrival instant)` for every
    /// message it receives, until the receiver is dropped or [`Destination::cleanup`] runs.
    async fn consume(&self, tx: mpsc::UnboundedSender<(String, Instant)>) -> anyhow::Result<()>;
    /// Messages the broker holds for this destination.
    async fn stored(&self) -> anyhow::Result<u64>;
    /// Deletes what [`Broker::prepare`] created.
    async fn cleanup(&self);
}

/// The brokers that answer, in report order. Unreachable ones are reported as skipped.
pub async fn available(
    urls: &BrokerUrls,
    wanted: &[String],
) -> (Vec<Box<dyn Broker>>, Vec<String>) {
    let mut brokers: Vec<Box<dyn Broker>> = Vec::new();
    let mut skipped = Vec::new();
    let wants = |k: &str| wanted.is_empty() || wanted.iter().any(|w| w == k);
    if wants("nats") {
        match nats::NatsBroker::connect(&urls.nats, &urls.nats_storage).await {
            Ok(b) => brokers.push(Box::new(b)),
            Err(e) => skipped.push(format!("nats: {e:#}")),
        }
    }
    if wants("amqp") {
        match amqp::AmqpBroker::connect(&urls.amqp).await {
            Ok(b) => brokers.push(Box::new(b)),
            Err(e) => skipped.push(format!("amqp: {e:#}")),
        }
    }
    if wants("kafka") {
        let kafka = match &urls.kafka_brokers {
            Some(b) => kafka::KafkaBroker::external(b, urls.kafka_partitions).await,
            None => {
                kafka::KafkaBroker::start_tansu(&urls.kafka_storage, urls.kafka_partitions).await
            }
        };
        match kafka {
            Ok(b) => brokers.push(Box::new(b)),
            Err(e) => skipped.push(format!("kafka: {e:#}")),
        }
    }
    for w in wanted {
        if !KINDS.contains(&w.as_str()) {
            skipped.push(format!("{w}: unknown sink (known: {})", KINDS.join(", ")));
        }
    }
    (brokers, skipped)
}
