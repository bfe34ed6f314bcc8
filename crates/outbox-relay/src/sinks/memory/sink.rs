//! The sink contract in memory: records each message, answers the scripted outcome.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::config::MemoryConfig;
use crate::sinks::{
    message_headers, render_template, Envelope, ErrorKind, OutboxRow, Outcome, Sink, SinkError,
};

/// Sinks built from the configuration, by sink name.
static REGISTRY: LazyLock<Mutex<HashMap<String, MemorySink>>> = LazyLock::new(Default::default);

/// `error_type` of scripted failures and of publishes while the sink is unavailable.
const SCRIPTED: &str = "scripted";
const UNAVAILABLE: &str = "memory_unavailable";

/// A failure of `kind`, for [`MemorySink::script`]; its `error_type` is `scripted`.
pub fn failure(kind: ErrorKind) -> Outcome {
    let message = format!("scripted {kind:?} failure");
    Outcome::Failed(SinkError {
        kind,
        error_type: SCRIPTED,
        message,
    })
}

/// One message as the sink received it, and what it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedMessage {
    /// The route's `destination` rendered for the row.
    pub destination: String,
    /// The index of the route that matched the row's topic.
    pub route: usize,
    pub message_id: String,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// The headers as sinks send them: the row's own, then the standard ones
    /// ([`crate::sinks::message_headers`]).
    pub headers: Vec<(String, String)>,
    /// The row's failed attempts when it was published.
    pub attempts: i32,
    pub outcome: Outcome,
}

impl PublishedMessage {
    /// The last header of that name (the one a consumer reading a map would see).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

type Responder = Arc<dyn Fn(&OutboxRow) -> Option<Outcome> + Send + Sync>;

#[derive(Default)]
struct State {
    config: MemoryConfig,
    unavailable: bool,
    delay: Duration,
    scripts: HashMap<String, VecDeque<Outcome>>,
    responder: Option<Responder>,
    published: Vec<PublishedMessage>,
    delivered_ids: HashSet<String>,
    publish_calls: usize,
    check_calls: usize,
}

struct Inner {
    name: String,
    state: Mutex<State>,
    changed: Notify,
}

/// An in-memory sink; clones are handles on the same sink. See the module documentation.
#[derive(Clone)]
pub struct MemorySink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemorySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySink")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl MemorySink {
    /// A sink of its own (not registered), with the default configuration: every topic, to the
    /// destination `{topic}`, deduplicating.
    pub fn new(name: impl Into<String>) -> Self {
        Self::with_config(name, MemoryConfig::default())
    }

    /// A sink of its own (not registered) with this configuration.
    pub fn with_config(name: impl Into<String>, config: MemoryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                state: Mutex::new(State {
                    config,
                    ..State::default()
                }),
                changed: Notify::new(),
            }),
        }
    }

    /// The sink registered under `name`: the one the relay builds for `[sinks.<name>]` with
    /// `kind = "memory"`. Created (with the default configuration) if it does not exist yet, so
    /// a test can script it before the relay starts.
    pub fn shared(name: &str) -> Self {
        lock(&REGISTRY)
            .entry(name.to_owned())
            .or_insert_with(|| Self::new(name))
            .clone()
    }

    /// Removes the sink registered under `name`; handles already given out keep working.
    pub fn unregister(name: &str) -> Option<Self> {
        lock(&REGISTRY).remove(name)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Replaces the configuration (routes, deduplication); recorded messages and scripts stay.
    pub fn configure(&self, config: MemoryConfig) {
        self.state().config = config;
    }

    /// Queues outcomes for the rows whose message id, or else whose topic, is `key`: each
    /// publish of such a row takes the next one. A message id's queue is used before its
    /// topic's; once both are empty the row gets the default answer.
    pub fn script(&self, key: impl Into<String>, outcomes: impl IntoIterator<Item = Outcome>) {
        self.state()
            .scripts
            .entry(key.into())
            .or_default()
            .extend(outcomes);
    }

    /// Queues `times` failures of `kind` for `key` (a message id or a topic), as
    /// [`MemorySink::script`] does.
    pub fn fail(&self, key: impl Into<String>, kind: ErrorKind, times: usize) {
        self.script(key, std::iter::repeat_n(failure(kind), times));
    }

    /// Answers rows that no script covers with `respond(row)`; `None` falls back to the
    /// default answer (delivered, or duplicate).
    pub fn respond_with(
        &self,
        respond: impl Fn(&OutboxRow) -> Option<Outcome> + Send + Sync + 'static,
    ) {
        self.state().responder = Some(Arc::new(respond));
    }

    /// Drops every script and the responder.
    pub fn clear_scripts(&self) {
        let mut state = self.state();
        state.scripts.clear();
        state.responder = None;
    }

    /// Takes the "broker" down (`false`) or back up (`true`). While down, `check()` fails and
    /// every row of a publish fails as [`ErrorKind::Unavailable`] without being recorded or
    /// consuming a script.
    pub fn set_available(&self, available: bool) {
        self.state().unavailable = !available;
    }

    /// Makes every publish take this long before answering (e.g. to exceed the relay's
    /// publish timeout).
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// Every message handed to the sink while available, in order, with what it answered
    /// (failures and duplicates included).
    pub fn published(&self) -> Vec<PublishedMessage> {
        self.state().published.clone()
    }

    /// The messages answered [`Outcome::Delivered`], in order: what a consumer would read.
    pub fn delivered(&self) -> Vec<PublishedMessage> {
        self.state()
            .published
            .iter()
            .filter(|m| m.outcome == Outcome::Delivered)
            .cloned()
            .collect()
    }

    /// How often `publish` was called (batches, including those refused while unavailable).
    pub fn publish_calls(&self) -> usize {
        self.state().publish_calls
    }

    /// How often `check` was called (readiness, circuit-breaker probes).
    pub fn check_calls(&self) -> usize {
        self.state().check_calls
    }

    /// Forgets the recorded messages, the delivered message ids and the counters.
    pub fn clear_published(&self) {
        let mut state = self.state();
        state.published.clear();
        state.delivered_ids.clear();
        state.publish_calls = 0;
        state.check_calls = 0;
    }

    /// Waits until at least `n` messages were delivered, or `timeout` passed; returns the
    /// delivered messages either way.
    pub async fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<PublishedMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let delivered = self.delivered();
            if delivered.len() >= n {
                return delivered;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.delivered();
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// The scripted answer for `row`, if any (consuming it).
    fn scripted(&self, row: &OutboxRow) -> Option<Outcome> {
        let mut state = self.state();
        [&row.message_id, &row.topic]
            .into_iter()
            .find_map(|key| state.scripts.get_mut(key.as_str())?.pop_front())
    }

    fn record(&self, env: &Envelope<'_>, answer: Option<Outcome>) -> Outcome {
        let row = env.row;
        let mut state = self.state();
        let outcome = answer.unwrap_or_else(|| {
            if state.config.deduplicate && state.delivered_ids.contains(&row.message_id) {
                Outcome::Duplicate
            } else {
                Outcome::Delivered
            }
        });
        if outcome == Outcome::Delivered {
            state.delivered_ids.insert(row.message_id.clone());
        }
        let destination = match state.config.routes.get(env.route) {
            Some(route) => render_template(&route.destination, row),
            None => row.topic.clone(),
        };
        state.published.push(PublishedMessage {
            destination,
            route: env.route,
            message_id: row.message_id.clone(),
            topic: row.topic.clone(),
            key: row.key.clone(),
            payload: row.payload.clone(),
            headers: message_headers(row)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            attempts: row.attempts,
            outcome: outcome.clone(),
        });
        outcome
    }

    fn unavailable(&self) -> SinkError {
        SinkError::unavailable(
            UNAVAILABLE,
            format!("memory sink {:?} is set unavailable", self.inner.name),
        )
    }
}

/// A poisoned lock only means a test panicked while holding it; the data is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl Sink for MemorySink {
    fn kind(&self) -> &'static str {
        super::KIND
    }

    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome> {
        let delay = {
            let mut state = self.state();
            state.publish_calls += 1;
            state.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.state().unavailable {
            return vec![Outcome::Failed(self.unavailable()); batch.len()];
        }
        let responder = self.state().responder.clone();
        let outcomes = batch
            .iter()
            .map(|env| {
                let answer = self
                    .scripted(env.row)
                    .or_else(|| responder.as_ref().and_then(|respond| respond(env.row)));
                self.record(env, answer)
            })
            .collect();
        self.inner.changed.notify_waiters();
        outcomes
    }

    async fn check(&self) -> Result<(), SinkError> {
        let mut state = self.state();
        state.check_calls += 1;
        if state.unavailable {
            return Err(self.unavailable());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::Utc;

    use super::*;
    use crate::sinks::{SinkConfig, IDEMPOTENCY_HEADER, KEY_HEADER, TOPIC_HEADER};

    fn row(message_id: &str, topic: &str) -> OutboxRow {
        OutboxRow {
            id: 1,
            message_id: message_id.into(),
            topic: topic.into(),
            key: Some("k".into()),
            payload: b"{}".to_vec(),
            headers: BTreeMap::from([("content-type".into(), "application/json".into())]),
            created_at: Utc::now(),
            attempts: 0,
        }
    }

    async fn publish(sink: &dyn Sink, rows: &[OutboxRow]) -> Vec<Outcome> {
        let batch: Vec<Envelope<'_>> = rows.iter().map(|row| Envelope { row, route: 0 }).collect();
        sink.publish(&batch).await
    }

    fn kinds(outcomes: &[Outcome]) -> Vec<Option<ErrorKind>> {
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Failed(e) => Some(e.kind),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn records_what_a_broker_would_receive_and_deduplicates() {
        let sink = MemorySink::new("records");
        let rows = [row("m-1", "user.created"), row("m-2", "user.deleted")];
        assert_eq!(
            publish(&sink, &rows).await,
            [Outcome::Delivered, Outcome::Delivered]
        );
        let first = &sink.published()[0];
        assert_eq!(first.destination, "user.created");
        assert_eq!(first.payload, b"{}");
        assert_eq!(
            first.headers,
            [
                ("content-type", "application/json"),
                (IDEMPOTENCY_HEADER, "m-1"),
                (TOPIC_HEADER, "user.created"),
                (KEY_HEADER, "k"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert_eq!(first.header(IDEMPOTENCY_HEADER), Some("m-1"));

        assert_eq!(publish(&sink, &rows[..1]).await, [Outcome::Duplicate]);
        assert_eq!(sink.published().len(), 3);
        assert_eq!(sink.delivered().len(), 2);
        assert_eq!(sink.publish_calls(), 2);

        sink.configure(MemoryConfig {
            deduplicate: false,
            ..MemoryConfig::default()
        });
        assert_eq!(publish(&sink, &rows[..1]).await, [Outcome::Delivered]);
    }

    #[tokio::test]
    async fn scripts_by_message_id_before_topic_then_default() {
        let sink = MemorySink::new("scripts");
        sink.fail("orders", ErrorKind::Retriable, 2);
        sink.script("m-1", [failure(ErrorKind::Permanent)]);
        let rows = [row("m-1", "orders"), row("m-2", "orders")];

        let first = publish(&sink, &rows).await;
        assert_eq!(
            kinds(&first),
            [Some(ErrorKind::Permanent), Some(ErrorKind::Retriable)]
        );
        let second = publish(&sink, &rows).await;
        assert_eq!(kinds(&second), [Some(ErrorKind::Retriable), None]);
        assert_eq!(
            publish(&sink, &rows).await,
            [Outcome::Delivered, Outcome::Duplicate]
        );
        assert!(matches!(&first[0], Outcome::Failed(e) if e.error_type == "scripted"));
        assert_eq!(sink.published()[0].outcome, first[0]);
    }

    #[tokio::test]
    async fn responder_answers_what_no_script_covers() {
        let sink = MemorySink::new("responder");
        sink.script("m-1", [Outcome::Duplicate]);
        sink.respond_with(|row| (row.topic == "poison").then(|| failure(ErrorKind::Permanent)));
        let rows = [row("m-1", "poison"), row("m-2", "poison"), row("m-3", "ok")];
        assert_eq!(
            kinds(&publish(&sink, &rows).await),
            [None, Some(ErrorKind::Permanent), None]
        );
        sink.clear_scripts();
        assert_eq!(
            publish(&sink, &rows[1..2]).await,
            [Outcome::Delivered],
            "no responder after clear_scripts"
        );
    }

    #[tokio::test]
    async fn unavailable_fails_everything_and_check() {
        let sink = MemorySink::new("breaker");
        sink.script("m-1", [failure(ErrorKind::Retriable)]);
        sink.set_available(false);
        assert_eq!(sink.check().await.unwrap_err().kind, ErrorKind::Unavailable);
        let rows = [row("m-1", "t"), row("m-2", "t")];
        assert_eq!(
            kinds(&publish(&sink, &rows).await),
            [Some(ErrorKind::Unavailable); 2]
        );
        assert!(sink.published().is_empty(), "nothing reached the broker");

        sink.set_available(true);
        sink.check().await.unwrap();
        assert_eq!(sink.check_calls(), 2);
        assert_eq!(
            kinds(&publish(&sink, &rows).await),
            [Some(ErrorKind::Retriable), None],
            "the script was kept for when the sink is back"
        );
    }

    #[tokio::test]
    async fn built_from_config_it_is_the_shared_sink_of_that_name() {
        let handle = MemorySink::shared("memory-sink-unit-test");
        handle.fail("t", ErrorKind::Unavailable, 1);
        let config: SinkConfig = toml::from_str(
            r#"kind = "memory"
routes = [{ topics = ["*"], destination = "dest.{topic}.{key}" }]"#,
        )
        .unwrap();
        assert_eq!(config.kind(), "memory");
        let sink = config.build("memory-sink-unit-test").await.unwrap();
        assert_eq!(sink.kind(), "memory");
        let rows = [row("m-1", "t"), row("m-2", "t")];
        assert_eq!(
            kinds(&publish(sink.as_ref(), &rows).await),
            [Some(ErrorKind::Unavailable), None]
        );
        assert_eq!(handle.delivered()[0].destination, "dest.t.k");
        assert!(MemorySink::unregister("memory-sink-unit-test").is_some());
    }

    #[tokio::test]
    async fn waits_for_deliveries_and_delays_publishes() {
        let sink = MemorySink::new("wait");
        sink.set_delay(Duration::from_millis(300));
        let publisher = {
            let sink = sink.clone();
            tokio::spawn(async move {
                let rows = [row("m-1", "t")];
                publish(&sink, &rows).await
            })
        };
        let none = sink.wait_delivered(1, Duration::from_millis(50)).await;
        assert!(none.is_empty());
        let one = sink.wait_delivered(1, Duration::from_secs(10)).await;
        assert_eq!(one.len(), 1);
        assert_eq!(publisher.await.unwrap(), [Outcome::Delivered]);
    }
}
