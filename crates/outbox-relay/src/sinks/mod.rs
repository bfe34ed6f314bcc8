//! The sink contract: a batch of outbox rows in, one outcome per row out.
//!
//! A sink owns its broker connection and nothing else: no SQL, no retry policy, no metrics
//! registry. It publishes the whole batch with many acknowledgements outstanding, awaits them,
//! and reports per row whether the broker confirmed it ([`Outcome::Delivered`],
//! [`Outcome::Duplicate`]) or why not ([`Outcome::Failed`]). The relay marks only confirmed rows
//! sent; everything else follows the retry policy in `pipeline::complete`.
//!
//! This module also owns what every sink shares: the [`SinkConfig`] enum the configuration
//! selects a kind with, the [`BrokerConfig`] trait each kind's configuration implements, the
//! headers every message carries ([`message_headers`]) and the completion of a batch's outcomes
//! ([`complete_outcomes`]).
//!
//! One folder per broker (`nats/`, `amqp/`, `kafka/`, and `memory/` for tests and dry runs),
//! each with `config.rs` (serde struct, defaults, `validate()`), `sink.rs` (this contract),
//! `service.rs` (the broker calls) and, in `mod.rs`, its [`BrokerConfig`] implementation.
//!
//! # Adding a broker
//!
//! A new broker `x` touches:
//! 1. its folder `sinks/x/`: a config struct (`Serialize`, `Deserialize`, `Default`,
//!    `deny_unknown_fields`) implementing [`BrokerConfig`], and a [`Sink`];
//! 2. here, `pub mod x;` and one line in the `sink_kinds!` list below: the variant of
//!    [`SinkConfig`], whose lowercased name is the `kind` value (a unit test checks that it is
//!    what [`BrokerConfig::kind`] says);
//! 3. if its client crate is optional, a feature `x = ["dep:…"]` in the crate's `Cargo.toml`
//!    (and in `default`), named in the `#[cfg]` of both lines above.
//!
//! Nothing else in the relay names a broker: validation, routing, building, log filters and
//! the default sink all go through [`SinkConfig::broker`] and [`log_directives`].

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(any(feature = "amqp", feature = "kafka"))]
pub(crate) mod files;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;

/// The header that carries the idempotency key on every broker (besides each broker's native
/// field: `Nats-Msg-Id`, AMQP `message_id`).
pub const IDEMPOTENCY_HEADER: &str = "outbox-message-id";
/// The header that carries the ordering key, when the row has one.
pub const KEY_HEADER: &str = "outbox-key";
/// The header that carries the logical topic.
pub const TOPIC_HEADER: &str = "outbox-topic";

pub use crate::message::OutboxRow;

/// A row with the index of the sink route that matched its topic.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub row: &'a OutboxRow,
    pub route: usize,
}

/// What happened to one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The broker acknowledged the message.
    Delivered,
    /// The broker acknowledged it as a repeat of a message it already has (same idempotency key).
    Duplicate,
    /// Not delivered; the error says whether retrying can help.
    Failed(SinkError),
}

/// How the relay should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The whole sink is unreachable (connection lost, authentication failed, timeout): the
    /// row is released untouched, no attempt is counted, and the sink's circuit breaker opens.
    Unavailable,
    /// This message failed but may succeed later (a nack, a returned message): count an
    /// attempt and retry it after a backoff.
    Retriable,
    /// Retrying cannot help (too large, invalid header, no route): dead-letter it now.
    Permanent,
}

/// A sink failure. `error_type` is a short, bounded name usable as a metric label; `message`
/// is the human explanation (never containing credentials).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub kind: ErrorKind,
    pub error_type: &'static str,
    pub message: String,
}

impl SinkError {
    pub fn unavailable(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Unavailable,
            error_type,
            message: message.into(),
        }
    }
    pub fn retriable(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retriable,
            error_type,
            message: message.into(),
        }
    }
    pub fn permanent(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            error_type,
            message: message.into(),
        }
    }
}

/// A destination broker.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The broker kind, as a metric label: `nats`, `amqp`, `kafka`.
    fn kind(&self) -> &'static str;

    /// Publishes the batch and returns exactly one outcome per envelope, in the same order.
    /// The relay enforces `relay.publish_timeout_secs` around this call.
    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome>;

    /// Whether the broker is reachable and the destinations exist (readiness, breaker probes).
    async fn check(&self) -> Result<(), SinkError>;
}

/// A route pattern list, shared by every sink's route type.
pub trait RouteTopics {
    fn topics(&self) -> &[String];
}

/// What a sink kind's configuration tells the relay: the only interface between the relay and
/// a broker's folder. Implemented by each `kind = "…"` configuration struct.
#[async_trait]
pub trait BrokerConfig: Send + Sync {
    /// The broker kind: the `kind` value in the configuration, as [`Sink::kind`] reports it.
    fn kind(&self) -> &'static str;

    /// Problems in sentences, prefixed by the key below `sinks.<name>`.
    fn validate(&self) -> Result<(), String>;

    /// The topic patterns of each route, in order (the index is [`Envelope::route`]).
    fn route_topics(&self) -> Vec<&[String]>;

    /// Builds the sink. Must not fail because the broker is down: sinks connect (and reconnect)
    /// in the background and report [`ErrorKind::Unavailable`] meanwhile.
    async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError>;

    /// Tracing filter directives the broker's client needs on top of the configured filter
    /// (e.g. to keep a client's frame dumps, which carry credentials, out of the logs).
    fn log_directives() -> &'static [&'static str]
    where
        Self: Sized,
    {
        &[]
    }

    /// The sink the relay uses when none is configured: this broker on its local default
    /// address, or `None` if this kind is never picked implicitly. The first kind in
    /// `sink_kinds!` that has one wins.
    fn local_default() -> Option<Self>
    where
        Self: Sized,
    {
        None
    }
}

/// The topic patterns of a list of routes, for [`BrokerConfig::route_topics`].
pub fn route_topics<R: RouteTopics>(routes: &[R]) -> Vec<&[String]> {
    routes.iter().map(RouteTopics::topics).collect()
}

/// Declares [`SinkConfig`] from the list of sink kinds, and everything that iterates over them.
macro_rules! sink_kinds {
    ($( $(#[cfg($cfg:meta)])? $variant:ident($config:ty), )+) => {
        /// A sink's configuration; `kind` selects the broker.
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        #[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
        pub enum SinkConfig {
            $( $(#[cfg($cfg)])? $variant($config), )+
        }

        impl SinkConfig {
            /// The kind's configuration behind this sink: the one place that looks at the
            /// variant.
            pub fn broker(&self) -> &dyn BrokerConfig {
                match self {
                    $( $(#[cfg($cfg)])? SinkConfig::$variant(c) => c, )+
                }
            }

            /// The sink to use when none is configured (see [`BrokerConfig::local_default`]),
            /// or `None` when no compiled-in kind has one.
            pub fn local_default() -> Option<SinkConfig> {
                $(
                    $(#[cfg($cfg)])?
                    if let Some(c) = <$config as BrokerConfig>::local_default() {
                        return Some(SinkConfig::$variant(c));
                    }
                )+
                None
            }

            /// Every compiled-in kind with its default configuration.
            pub fn every_kind() -> Vec<SinkConfig> {
                vec![$( $(#[cfg($cfg)])? SinkConfig::$variant(<$config>::default()), )+]
            }
        }

        /// The tracing filter directives of every compiled-in sink kind, to add to the
        /// configured filter.
        pub fn log_directives() -> Vec<&'static str> {
            let mut all = Vec::new();
            $(
                $(#[cfg($cfg)])?
                all.extend_from_slice(<$config as BrokerConfig>::log_directives());
            )+
            all
        }
    };
}

// The sink kinds: one line per broker, in the order `local_default` asks them.
sink_kinds! {
    #[cfg(feature = "nats")]
    Nats(nats::NatsConfig),
    #[cfg(feature = "kafka")]
    Kafka(kafka::KafkaConfig),
    #[cfg(feature = "amqp")]
    Amqp(amqp::AmqpConfig),
    Memory(memory::MemoryConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        self.broker().kind()
    }

    /// Problems in sentences, prefixed by the key below `sinks.<name>`.
    pub fn validate(&self) -> Result<(), String> {
        self.broker().validate()
    }

    /// The topic patterns of each route, in order.
    pub fn route_topics(&self) -> Vec<&[String]> {
        self.broker().route_topics()
    }

    /// Builds the sink. Must not fail because the broker is down: sinks connect (and reconnect)
    /// in the background and report [`ErrorKind::Unavailable`] meanwhile.
    pub async fn build(&self, name: &str) -> Result<Arc<dyn Sink>, SinkError> {
        self.broker().build(name).await
    }
}

/// The headers every sink adds to a message, after the row's own (same names on every
/// broker): the idempotency key, the logical topic, and the ordering key when the row has one.
pub fn standard_headers(row: &OutboxRow) -> impl Iterator<Item = (&'static str, &str)> {
    [
        Some((IDEMPOTENCY_HEADER, row.message_id.as_str())),
        Some((TOPIC_HEADER, row.topic.as_str())),
        row.key.as_deref().map(|key| (KEY_HEADER, key)),
    ]
    .into_iter()
    .flatten()
}

/// A message's headers as sinks send them: the row's own in name order, then
/// [`standard_headers`] (which win over a row header of the same name).
pub fn message_headers(row: &OutboxRow) -> impl Iterator<Item = (&str, &str)> {
    let standard = standard_headers(row).map(|(name, value)| (name as &str, value));
    row.headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(standard)
}

/// A batch's outcomes once every row has one: a row the sink recorded nothing for (a bug)
/// fails as [`ErrorKind::Unavailable`], so it is released untouched rather than lost.
pub fn complete_outcomes(outcomes: Vec<Option<Outcome>>) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Outcome::Failed(SinkError::unavailable("internal", "no outcome recorded"))
            })
        })
        .collect()
}

/// Fills `{topic}` and `{key}` in a destination template. A row without a key yields an empty
/// string for `{key}`.
pub fn render_template(template: &str, row: &OutboxRow) -> String {
    let key = row.key.as_deref().unwrap_or("");
    let mut out = String::with_capacity(template.len() + row.topic.len() + key.len());
    let mut rest = template;
    // One pass, once per message: the text up to each `{`, then the placeholder's value.
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("{topic}") {
            out.push_str(&row.topic);
            rest = after;
        } else if let Some(after) = rest.strip_prefix("{key}") {
            out.push_str(key);
            rest = after;
        } else {
            out.push('{');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Checks a template uses only the placeholders we know.
pub fn validate_template(field: &str, template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("{field}: unclosed '{{' in {template:?}"))?;
        let name = &rest[start + 1..start + end];
        if name != "topic" && name != "key" {
            return Err(format!(
                "{field}: unknown placeholder {{{name}}} in {template:?}; use {{topic}} or {{key}}"
            ));
        }
        rest = &rest[start + end + 1..];
    }
    if template.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use std::collections::BTreeMap;

    #[test]
    fn templates() {
        let row = OutboxRow {
            id: 1,
            message_id: "m".into(),
            topic: "user.created".into(),
            key: Some("42".into()),
            payload: vec![],
            headers: BTreeMap::new(),
            created_at: Utc::now(),
            attempts: 0,
        };
        assert_eq!(
            render_template("events.{topic}.{key}", &row),
            "events.user.created.42"
        );
        assert_eq!(
            render_template("{key}-{key}:{topic}", &row),
            "42-42:user.created"
        );
        assert_eq!(render_template("fixed", &row), "fixed");
        // A placeholder's value is not searched for placeholders again.
        let braces = OutboxRow {
            topic: "t.{key}".into(),
            key: None,
            ..row.clone()
        };
        assert_eq!(render_template("{topic}.{key}.", &braces), "t.{key}..");
        assert!(validate_template("subject", "a.{nope}")
            .unwrap_err()
            .contains("{nope}"));
        assert!(validate_template("subject", "a.{topic").is_err());
    }

    fn row(key: Option<&str>) -> OutboxRow {
        OutboxRow {
            id: 1,
            message_id: "m-1".into(),
            topic: "user.created".into(),
            key: key.map(Into::into),
            payload: vec![],
            headers: BTreeMap::from([
                ("content-type".to_string(), "application/json".to_string()),
                (KEY_HEADER.to_string(), "from the row".to_string()),
            ]),
            created_at: Utc::now(),
            attempts: 0,
        }
    }

    #[test]
    fn standard_headers_follow_the_row_headers() {
        let with_key = row(Some("42"));
        assert_eq!(
            message_headers(&with_key).collect::<Vec<_>>(),
            [
                ("content-type", "application/json"),
                (KEY_HEADER, "from the row"),
                (IDEMPOTENCY_HEADER, "m-1"),
                (TOPIC_HEADER, "user.created"),
                (KEY_HEADER, "42"),
            ]
        );
        let without_key = row(None);
        assert_eq!(
            standard_headers(&without_key).collect::<Vec<_>>(),
            [(IDEMPOTENCY_HEADER, "m-1"), (TOPIC_HEADER, "user.created")]
        );
    }

    #[test]
    fn missing_outcomes_are_unavailable() {
        let done = complete_outcomes(vec![Some(Outcome::Delivered), None]);
        assert_eq!(done[0], Outcome::Delivered);
        assert!(matches!(&done[1], Outcome::Failed(e)
            if e.kind == ErrorKind::Unavailable && e.error_type == "internal"));
    }

    #[test]
    fn every_kind_names_itself_as_its_serde_tag() {
        for sink in SinkConfig::every_kind() {
            let table = toml::Table::try_from(&sink).unwrap();
            assert_eq!(table["kind"].as_str(), Some(sink.kind()));
            let back: SinkConfig = toml::from_str(&toml::to_string(&table).unwrap()).unwrap();
            assert_eq!(back, sink);
            sink.validate().unwrap();
            assert!(!sink.route_topics().is_empty());
        }
    }

    #[test]
    fn a_local_default_exists_with_any_broker() {
        let default = SinkConfig::local_default();
        if cfg!(any(feature = "nats", feature = "amqp", feature = "kafka")) {
            default.unwrap().validate().unwrap();
        }
        #[cfg(feature = "nats")]
        assert_eq!(SinkConfig::local_default().unwrap().kind(), "nats");
    }
}
