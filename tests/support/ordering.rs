//! Ordering test harness, independent of the broker: a [`OrderedTarget`] gives the relay's sink
//! config and an independent consumer that yields what arrived; [`OrderChecker`] checks per-key
//! order. Implemented for NATS JetStream, RabbitMQ and Kafka; a new broker adds one
//! `OrderedTarget` implementation and one line per test.
//!
//! Included by `tests/ordering.rs` next to `mod support;`, `mod amqp_support;` and
//! `mod kafka_support;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::amqp_support::{AmqpConsumer, Topology};
use crate::kafka_support::{KafkaReader, TansuBroker};
use crate::support::{unique, NatsConsumer};

/// One message as an independent consumer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub key: Option<String>,
    pub message_id: String,
    pub payload: Vec<u8>,
}

/// A broker under test: the relay's `[sinks.*]` section and a consumer.
pub trait OrderedTarget: Send + 'static {
    /// The `[sinks.x]` TOML. Messages are enqueued with the topic [`TOPIC`], those of
    /// [`POISON_KEY`] with [`POISON_TOPIC`]; the poisoned key's messages must be refused by the
    /// broker (not by the relay), every time: retriable where the broker has such a per-message
    /// refusal (see [`OrderedTarget::poison_is_retriable`]).
    fn sink_toml(&self) -> String;
    /// Whether the broker's refusal of the poisoned key is retriable (the key is held back and
    /// retried) or permanent (each message is dead-lettered, which releases the key).
    fn poison_is_retriable(&self) -> bool {
        true
    }
    /// Part of the error every refusal of the poisoned key records (`last_error`): proof that
    /// the broker refused it, for the reason the target set up.
    fn poison_error(&self) -> &'static str;
    /// Creates the destination (stream, queue, topic), then collects arrivals in the background
    /// into `sink` until `stop` is set; then deletes the destination and returns.
    #[allow(async_fn_in_trait)]
    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()>;
    fn name(&self) -> &'static str;
}

/// A key whose messages the broker always refuses (see [`OrderedTarget::sink_toml`]).
pub const POISON_KEY: &str = "poison.pill";
/// The outbox topic of every message but the poisoned key's.
pub const TOPIC: &str = "ordered.event";
/// The outbox topic of the poisoned key's messages (same ordering rules: order is per key).
pub const POISON_TOPIC: &str = "ordered.poison";

pub type Arrivals = Arc<Mutex<Vec<Arrival>>>;

/// How many messages a consumer reads at most per call, and how long it waits for them.
const BATCH: usize = 1000;
const POLL: Duration = Duration::from_millis(50);

/// A consumer's loop: `read` (one call: the consumer in, the consumer and what it read out)
/// until `stop` is set, appending to `sink`; returns the consumer for its clean-up.
async fn read_until_stopped<C, F, Fut>(
    mut consumer: C,
    sink: &Arrivals,
    stop: &AtomicBool,
    mut read: F,
) -> C
where
    F: FnMut(C) -> Fut,
    Fut: std::future::Future<Output = (C, Vec<Arrival>)>,
{
    while !stop.load(Ordering::Acquire) {
        let (c, got) = read(consumer).await;
        consumer = c;
        if !got.is_empty() {
            sink.lock().unwrap().extend(got);
        }
    }
    consumer
}

/// JetStream: the stream captures `<prefix>.*` and the route publishes to `<prefix>.<key>`, so
/// the poisoned key (it contains a dot) lands on `<prefix>.poison.pill`, which no stream
/// captures: JetStream answers "no responders" and the sink reports a retriable failure.
pub struct NatsTarget {
    pub url: String,
    pub stream: String,
    pub prefix: String,
}

impl NatsTarget {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            stream: unique("ORD"),
            prefix: unique("ord"),
        }
    }
}

impl OrderedTarget for NatsTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.nats]
kind = "nats"
url = "{url}"
stream = {{ name = "{stream}", subjects = ["{prefix}.*"], create = false }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{key}}" }}]
"#,
            url = self.url,
            stream = self.stream,
            prefix = self.prefix
        )
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let consumer =
            NatsConsumer::new(&self.url, &self.stream, &[format!("{}.*", self.prefix)]).await;
        tokio::spawn(async move {
            let consumer = read_until_stopped(consumer, &sink, &stop, |mut c| async move {
                let got = c.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|r| Arrival {
                    key: r.headers.get("outbox-key").cloned(),
                    message_id: r.msg_id,
                    payload: r.payload,
                });
                (c, got.collect())
            })
            .await;
            consumer.delete_stream().await;
        })
    }

    fn poison_error(&self) -> &'static str {
        "no JetStream stream captures this subject"
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}

/// RabbitMQ: the relay publishes to the test's topic exchange with routing key `<prefix>.<key>`;
/// one durable queue bound with `<prefix>.*` (one queue keeps each key's order). The poisoned
/// key (it contains a dot) yields `<prefix>.poison.pill`, which the binding does not match:
/// the message is published `mandatory`, RabbitMQ returns it, and the sink reports a retriable
/// `unroutable` failure.
pub struct AmqpTarget {
    pub url: String,
    pub exchange: String,
    pub queue: String,
    pub prefix: String,
}

impl AmqpTarget {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            exchange: unique("ord_ex"),
            queue: unique("ord_q"),
            prefix: unique("ord"),
        }
    }
}

impl OrderedTarget for AmqpTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.rabbit]
kind = "amqp"
url = "{url}"
exchanges = [{{ name = "{exchange}", type = "topic", durable = true }}]
routes = [{{ topics = ["*"], exchange = "{exchange}", routing_key = "{prefix}.{{key}}" }}]
"#,
            url = self.url,
            exchange = self.exchange,
            prefix = self.prefix
        )
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let mut topology = Topology::new(&self.url, &self.exchange).await;
        topology
            .bind_queue(&self.queue, &format!("{}.*", self.prefix))
            .await;
        let consumer = AmqpConsumer::new(&self.url, &self.queue).await;
        tokio::spawn(async move {
            let consumer = read_until_stopped(consumer, &sink, &stop, |mut c| async move {
                let got = c.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|r| Arrival {
                    key: r.headers.get("outbox-key").cloned(),
                    message_id: r.message_id.unwrap_or_default(),
                    payload: r.payload,
                });
                (c, got.collect())
            })
            .await;
            consumer.close().await;
            topology.delete().await;
        })
    }

    fn poison_error(&self) -> &'static str {
        "unroutable: no queue bound"
    }

    fn name(&self) -> &'static str {
        "amqp"
    }
}

/// Kafka (a tansu broker the test owns, shared by the target's runs and kept alive until the
/// last consumer stops): [`TOPIC`] goes to a Kafka topic of `partitions` partitions, the
/// outbox key is the Kafka key (one key, one partition); one reader over every partition.
///
/// Kafka has no retriable per-message refusal: a broker refuses a record for good (too large,
/// invalid record, unknown topic, not authorised) and the sink dead-letters it; retriable
/// conditions (leader moves, replicas, the broker going away) concern a whole partition or
/// broker, are retried inside librdkafka and surface as `unavailable`. So the poisoned key's
/// messages ([`POISON_TOPIC`]) are routed to a Kafka topic that does not exist (tansu does not
/// create topics on demand): the broker reports it unknown and the sink refuses each message as
/// `unknown_topic` without producing it (retriable during the sink's grace period, then
/// permanent).
pub struct KafkaTarget {
    pub broker: Arc<TansuBroker>,
    pub topic: String,
    pub missing_topic: String,
    pub partitions: i32,
}

impl KafkaTarget {
    pub fn new(broker: &Arc<TansuBroker>) -> Self {
        Self {
            broker: Arc::clone(broker),
            topic: unique("ord"),
            missing_topic: unique("missing"),
            partitions: 4,
        }
    }
}

impl OrderedTarget for KafkaTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.kafka]
kind = "kafka"
brokers = "{brokers}"
routes = [
  {{ topics = ["{POISON_TOPIC}"], topic = "{missing}" }},
  {{ topics = ["*"], topic = "{topic}" }},
]
"#,
            brokers = self.broker.brokers(),
            missing = self.missing_topic,
            topic = self.topic
        )
    }

    fn poison_is_retriable(&self) -> bool {
        false
    }

    fn poison_error(&self) -> &'static str {
        // The permanent refusal (the sink's and librdkafka's wording alike), not the retriable
        // one of the grace period.
        "does not exist and the broker does not create it"
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        self.broker.create_topic(&self.topic, self.partitions).await;
        let reader = KafkaReader::new(
            &self.broker.brokers(),
            &[(self.topic.as_str(), self.partitions)],
        );
        tokio::spawn(async move {
            read_until_stopped(reader, &sink, &stop, |r| async move {
                let got = r.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|m| Arrival {
                    // The Kafka key (what partitions), not the header.
                    key: m.key.as_deref().map(|k| String::from_utf8_lossy(k).into()),
                    message_id: m.message_id(),
                    payload: m.payload,
                });
                (r, got.collect())
            })
            .await;
            // In-memory broker: its topics go with it when the last target drops it.
            drop(self.broker);
        })
    }

    fn name(&self) -> &'static str {
        "kafka"
    }
}

/// Payloads are `<key>/<seq>`, seq counting from 0 per key in enqueue order.
pub fn payload(key: &str, seq: u32) -> Vec<u8> {
    format!("{key}/{seq}").into_bytes()
}

fn parse(p: &[u8]) -> (String, u32) {
    let s = std::str::from_utf8(p).expect("utf-8 payload");
    let (k, n) = s.rsplit_once('/').expect("payload key/seq");
    (k.to_string(), n.parse().expect("seq"))
}

/// Checks arrivals incrementally: per key, every new message is the next in enqueue order
/// (no gap, no reordering); a repeat must be an exact copy of an already-seen message.
#[derive(Default)]
pub struct OrderChecker {
    next: HashMap<String, u32>,
    seen: HashMap<(String, u32), Arrival>,
    pub delivered: usize,
    pub duplicates: usize,
    pub violations: Vec<String>,
}

impl OrderChecker {
    pub fn check(&mut self, a: &Arrival) {
        let (key, seq) = parse(&a.payload);
        if a.key.as_deref() != Some(key.as_str()) {
            self.violations.push(format!(
                "message {} carries key {:?}, payload says {key:?}",
                a.message_id, a.key
            ));
        }
        let next = self.next.entry(key.clone()).or_insert(0);
        if seq == *next {
            *next += 1;
            self.delivered += 1;
            self.seen.insert((key, seq), a.clone());
        } else if seq < *next {
            self.duplicates += 1;
            if self.seen.get(&(key.clone(), seq)) != Some(a) {
                self.violations.push(format!(
                    "key {key}: repeat of #{seq} differs from the first copy"
                ));
            }
        } else {
            self.violations.push(format!(
                "key {key}: got #{seq} while #{} had not arrived yet",
                *next
            ));
            // Resynchronise so one violation is reported once.
            *next = seq + 1;
        }
    }

    /// Per key: how many arrived in order.
    pub fn per_key(&self) -> BTreeMap<String, u32> {
        self.next.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}
