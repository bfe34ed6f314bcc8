//! `kind = "kafka"`: the Kafka sink's settings, their defaults and their validation, and the
//! librdkafka configuration they become.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::sinks::{validate_template, RouteTopics};

/// Local Kafka, as `docker compose up` starts it.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// librdkafka settings the sink fixes: the delivery guarantees depend on them.
const FIXED: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("request.required.acks", "all"),
];

const PROPAGATION: &str = "topic.metadata.propagation.max.ms";
const PROPAGATION_DEFAULT_MS: u64 = 5_000;

/// librdkafka settings that have their own key in this section.
const OWN_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "brokers"),
    ("metadata.broker.list", "brokers"),
    ("message.timeout.ms", "message_timeout_ms"),
    ("delivery.timeout.ms", "message_timeout_ms"),
];

/// `kind = "kafka"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    pub routes: Vec<KafkaRoute>,
    /// How long librdkafka keeps trying to deliver one message (librdkafka's
    /// `message.timeout.ms`). A message not acknowledged by then fails as `unavailable` and
    /// its row is released. Keep it below `relay.publish_timeout_secs` (30 s by default) so the
    /// sink reports its own, classified errors before the relay gives up on the batch.
    pub message_timeout_ms: u64,
    /// How long `check()` (readiness, circuit-breaker probes) waits for the cluster's metadata.
    pub check_timeout_ms: u64,
    /// How long a publish waits for room when librdkafka's local queue is full before the
    /// sink reports itself unavailable.
    pub queue_full_timeout_ms: u64,
    /// Any other librdkafka setting, passed through verbatim: `security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, `compression.type`, `linger.ms`, `batch.size`…
    /// See <https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: DEFAULT_BROKERS.into(),
            routes: vec![KafkaRoute {
                topics: vec!["*".into()],
                topic: "{topic}".into(),
            }],
            // Below the relay's 30 s publish timeout, with room for the marking transaction.
            message_timeout_ms: 20_000,
            check_timeout_ms: 5_000,
            queue_full_timeout_ms: 5_000,
            librdkafka: BTreeMap::new(),
        }
    }
}

/// Topics → Kafka topic. `topic` may use `{topic}` and `{key}`; the outbox key is always the
/// Kafka message key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaRoute {
    pub topics: Vec<String>,
    #[serde(default = "default_topic_template")]
    pub topic: String,
}

fn default_topic_template() -> String {
    "{topic}".into()
}

impl RouteTopics for KafkaRoute {
    fn topics(&self) -> &[String] {
        &self.topics
    }
}

/// Whether `name` is a legal Kafka topic name (what the broker accepts).
pub(super) fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl KafkaConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err(
                "brokers must list at least one broker as host:port, e.g. \"127.0.0.1:9092\""
                    .into(),
            );
        }
        for broker in self.brokers.split(',') {
            let b = broker.trim();
            let b = b.split_once("://").map(|(_, rest)| rest).unwrap_or(b);
            if b.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(format!(
                    "brokers: {broker:?} is not host:port, e.g. \"127.0.0.1:9092\""
                ));
            }
        }
        if self.routes.is_empty() {
            return Err(
                "routes: add at least one [[sinks.<name>.routes]] with topics and topic".into(),
            );
        }
        for (i, route) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}].topic");
            validate_template(&field, &route.topic)?;
            let literal = route.topic.replace("{topic}", "").replace("{key}", "");
            if !literal
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(format!(
                    "{field}: Kafka topic names may contain only letters, digits, '.', '_' and '-', got {:?}",
                    route.topic
                ));
            }
        }
        if self.message_timeout_ms < 1_000 {
            return Err(format!(
                "message_timeout_ms must be at least 1000, got {}",
                self.message_timeout_ms
            ));
        }
        if self.check_timeout_ms == 0 {
            return Err("check_timeout_ms must be positive".into());
        }
        for (key, value) in &self.librdkafka {
            if let Some((_, fixed)) = FIXED.iter().find(|(k, _)| k == key) {
                if value != fixed && !(key.contains("acks") && value == "-1") {
                    return Err(format!(
                        "librdkafka.{key:?} = {value:?} is not allowed: the sink always uses {key} = {fixed} \
                         (delivery guarantees depend on it); remove the setting"
                    ));
                }
            }
            if let Some((_, own)) = OWN_KEYS.iter().find(|(k, _)| k == key) {
                return Err(format!(
                    "librdkafka.{key:?}: set `{own}` in this sink's section instead"
                ));
            }
        }
        // librdkafka checks every name and value without connecting anywhere.
        self.client_config().create_native_config().map_err(|e| {
            format!("librdkafka: {e}; see https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md")
        })?;
        Ok(())
    }

    /// How long a topic the broker reports unknown is retried before its rows are
    /// dead-lettered: librdkafka's `topic.metadata.propagation.max.ms` (5 s unless set in
    /// `librdkafka`), the time a new topic may take to reach every broker.
    pub(super) fn missing_topic_grace(&self) -> Duration {
        let ms = self
            .client_config()
            .get(PROPAGATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(PROPAGATION_DEFAULT_MS);
        Duration::from_millis(ms)
    }

    /// The producer configuration: defaults, then the pass-through settings, then the settings
    /// the sink fixes.
    pub(super) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            // An unknown topic fails its messages after this long instead of waiting for the
            // message timeout (which would report the whole sink unavailable). The sink asks
            // for a topic's metadata before producing to it (topics.rs), so librdkafka waits
            // this long only for a topic deleted since; the sink uses it as its grace period.
            .set(PROPAGATION, PROPAGATION_DEFAULT_MS.to_string())
            // Fail fast on a broker that refuses connections, and reconnect quickly.
            .set("socket.connection.setup.timeout.ms", "5000")
            .set("reconnect.backoff.max.ms", "2000")
            .set("linger.ms", "5");
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        for (k, v) in FIXED.iter().filter(|(k, _)| *k != "request.required.acks") {
            c.set(*k, *v);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        KafkaConfig::default().validate().unwrap();
    }

    #[test]
    fn rejects_bad_settings_in_sentences() {
        let mut c = KafkaConfig::default();
        c.librdkafka
            .insert("enable.idempotence".into(), "false".into());
        assert!(c
            .validate()
            .unwrap_err()
            .contains("enable.idempotence = true"));

        let mut c = KafkaConfig::default();
        c.librdkafka.insert("no.such.setting".into(), "1".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("no.such.setting"), "{e}");

        let mut c = KafkaConfig::default();
        c.librdkafka
            .insert("bootstrap.servers".into(), "x:1".into());
        assert!(c.validate().unwrap_err().contains("`brokers`"));

        let mut c = KafkaConfig::default();
        c.routes[0].topic = "events/{topic}".into();
        assert!(c.validate().unwrap_err().contains("routes[0].topic"));

        let c = KafkaConfig {
            brokers: "localhost".into(),
            ..KafkaConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("host:port"));
    }

    #[test]
    fn pass_through_and_fixed_settings() {
        let mut c = KafkaConfig::default();
        c.librdkafka
            .insert("compression.type".into(), "zstd".into());
        c.librdkafka.insert("acks".into(), "all".into());
        c.validate().unwrap();
        let cc = c.client_config();
        assert_eq!(cc.get("compression.type"), Some("zstd"));
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(c.missing_topic_grace(), Duration::from_secs(5));
        c.librdkafka
            .insert("topic.metadata.propagation.max.ms".into(), "800".into());
        assert_eq!(c.missing_topic_grace(), Duration::from_millis(800));
    }

    #[test]
    fn topic_names() {
        assert!(valid_topic_name("orders.created-v1_x"));
        assert!(!valid_topic_name("a b"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
    }
}
