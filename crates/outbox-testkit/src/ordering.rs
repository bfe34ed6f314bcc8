//! Per-key ordering, independent of the broker: an [`OrderedTarget`] gives the relay's sink
//! config and an independent consumer that yields what arrived; [`OrderChecker`] checks per-key
//! order. Each broker's module implements the target (`nats::NatsTarget`, `amqp::AmqpTarget`,
//! `kafka::KafkaTarget`); a new broker adds its implementation there and one line per test.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
pub(crate) const BATCH: usize = 1000;
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// A consumer's loop: `read` (one call: the consumer in, the consumer and what it read out)
/// until `stop` is set, appending to `sink`; returns the consumer for its clean-up.
pub(crate) async fn read_until_stopped<C, F, Fut>(
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
