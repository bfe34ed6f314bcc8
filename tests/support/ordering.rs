//! Ordering test harness, independent of the broker: a [`OrderedTarget`] gives the relay's sink
//! config and an independent consumer that yields what arrived; [`OrderChecker`] checks per-key
//! order. NATS JetStream is implemented here; a new broker (AMQP, Kafka) adds one
//! `OrderedTarget` implementation and one line per test.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// The `[sinks.x]` TOML. `subject_template` may use `{topic}` and `{key}`; messages whose key
    /// is [`POISON_KEY`] must fail at the broker as retriable (e.g. not captured by the stream).
    fn sink_toml(&self) -> String;
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

pub type Arrivals = Arc<Mutex<Vec<Arrival>>>;

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
        let mut consumer =
            NatsConsumer::new(&self.url, &self.stream, &[format!("{}.*", self.prefix)]).await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let got = consumer.collect(1000, Duration::from_millis(50)).await;
                if !got.is_empty() {
                    let mut s = sink.lock().unwrap();
                    for r in got {
                        s.push(Arrival {
                            key: r.headers.get("outbox-key").cloned(),
                            message_id: r.msg_id,
                            payload: r.payload,
                        });
                    }
                }
            }
            consumer.delete_stream().await;
        })
    }

    fn name(&self) -> &'static str {
        "nats"
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
