//! `kind = "amqp"`: the RabbitMQ sink's settings, their defaults and their validation.

use serde::{Deserialize, Serialize};

use crate::sinks::{validate_template, RouteTopics};

/// Local RabbitMQ with its stock guest account (which only accepts loopback connections).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ's default `max_message_size` (128 MiB): a bigger message makes the broker close the
/// channel, so the sink rejects it before sending.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 134_217_728;
/// AMQP short strings (exchange and queue names, routing keys, header names, `message_id`) are
/// at most 255 bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// `kind = "amqp"`: RabbitMQ (AMQP 0-9-1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://[user:password@]host:port/vhost` (`amqps://` for TLS; the default vhost `/` is
    /// `%2f`). Credentials can come from the environment instead of the file:
    /// `OUTBOX_SINKS__<NAME>__URL`. They are never logged.
    pub url: String,
    /// Exchanges the relay declares (idempotently) on every connection. An exchange a route
    /// uses that is not listed here must already exist: the relay checks it and reports the
    /// sink down until it does.
    pub exchanges: Vec<AmqpExchange>,
    pub routes: Vec<AmqpRoute>,
    /// Publish with `mandatory`: a message no queue is bound for comes back from the broker and
    /// is retried instead of being counted as delivered. Turn off only for exchanges where
    /// dropping unroutable messages is intended.
    pub mandatory: bool,
    /// Delivery mode 2: the broker writes the message to disk in durable queues.
    pub persistent: bool,
    /// How long one connection attempt (TCP, TLS, AMQP handshake, channel setup) may take.
    pub connect_timeout_secs: u64,
    /// First delay between reconnection attempts; it doubles after each failure.
    pub reconnect_initial_ms: u64,
    /// Longest delay between reconnection attempts.
    pub reconnect_max_secs: u64,
    /// Messages larger than this are dead-lettered without being sent (the broker would close
    /// the channel). Match the broker's `max_message_size`.
    pub max_message_bytes: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            exchanges: vec![AmqpExchange::default()],
            routes: vec![AmqpRoute {
                topics: vec!["*".into()],
                exchange: "outbox".into(),
                routing_key: "{topic}".into(),
            }],
            mandatory: true,
            persistent: true,
            connect_timeout_secs: 5,
            reconnect_initial_ms: 200,
            reconnect_max_secs: 10,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// An exchange the relay declares. `name` is required; the rest default to a durable topic
/// exchange.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpExchange {
    pub name: String,
    /// `direct`, `fanout`, `topic`, `headers`, or a plugin's type such as `x-consistent-hash`.
    #[serde(rename = "type", default = "default_exchange_type")]
    pub kind: String,
    /// Survives a broker restart.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Deleted by the broker when its last binding goes away.
    #[serde(default)]
    pub auto_delete: bool,
}

fn default_exchange_type() -> String {
    "topic".into()
}

fn default_true() -> bool {
    true
}

impl Default for AmqpExchange {
    fn default() -> Self {
        Self {
            name: "outbox".into(),
            kind: "topic".into(),
            durable: true,
            auto_delete: false,
        }
    }
}

/// Topics → exchange and routing key. `routing_key` may use `{topic}` and `{key}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpRoute {
    pub topics: Vec<String>,
    /// The exchange to publish to; `""` is the default exchange, which routes to the queue
    /// named by the routing key.
    pub exchange: String,
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
}

fn default_routing_key() -> String {
    "{topic}".into()
}

impl RouteTopics for AmqpRoute {
    fn topics(&self) -> &[String] {
        &self.topics
    }
}

impl AmqpConfig {
    /// Exchanges routes use that the relay does not declare: they must exist.
    pub fn undeclared_exchanges(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for route in &self.routes {
            let name = route.exchange.as_str();
            if !name.is_empty()
                && !self.exchanges.iter().any(|e| e.name == name)
                && !out.contains(&name)
            {
                out.push(name);
            }
        }
        out
    }

    pub fn validate(&self) -> Result<(), String> {
        let scheme_ok = self.url.starts_with("amqp://") || self.url.starts_with("amqps://");
        if !scheme_ok || self.url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(format!(
                "url must look like amqp://user:password@host:5672/%2f (amqps:// for TLS), got {:?}",
                crate::redact_url(&self.url)
            ));
        }
        for (i, ex) in self.exchanges.iter().enumerate() {
            if ex.name.is_empty() || ex.name.starts_with("amq.") {
                return Err(format!(
                    "exchanges[{i}].name must be a non-empty name not starting with \"amq.\" (the broker reserves those), got {:?}",
                    ex.name
                ));
            }
            check_short(&format!("exchanges[{i}].name"), &ex.name)?;
            let builtin = matches!(ex.kind.as_str(), "direct" | "fanout" | "topic" | "headers");
            if !builtin && !ex.kind.starts_with("x-") {
                return Err(format!(
                    "exchanges[{i}].type must be \"direct\", \"fanout\", \"topic\", \"headers\" or a plugin type starting with \"x-\", got {:?}",
                    ex.kind
                ));
            }
            if self.exchanges[..i].iter().any(|e| e.name == ex.name) {
                return Err(format!(
                    "exchanges[{i}]: exchange {:?} is listed twice; keep one",
                    ex.name
                ));
            }
        }
        if self.routes.is_empty() {
            return Err(
                "routes: add at least one [[sinks.<name>.routes]] with topics, exchange and routing_key".into()
            );
        }
        for (i, route) in self.routes.iter().enumerate() {
            check_short(&format!("routes[{i}].exchange"), &route.exchange)?;
            validate_template(&format!("routes[{i}].routing_key"), &route.routing_key)?;
        }
        if self.connect_timeout_secs == 0 {
            return Err("connect_timeout_secs must be above 0".into());
        }
        if self.reconnect_initial_ms == 0
            || self.reconnect_max_secs * 1000 < self.reconnect_initial_ms
        {
            return Err(
                "reconnect_initial_ms must be above 0 and at most reconnect_max_secs".into(),
            );
        }
        if self.max_message_bytes == 0 {
            return Err("max_message_bytes must be above 0".into());
        }
        Ok(())
    }
}

fn check_short(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_SHORT_STRING {
        return Err(format!(
            "{field} is {} bytes long; AMQP allows at most {MAX_SHORT_STRING}",
            value.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        AmqpConfig::default().validate().unwrap();
        assert!(AmqpConfig::default().undeclared_exchanges().is_empty());
    }

    #[test]
    fn bad_values_are_explained() {
        let c = AmqpConfig {
            url: "http://u:secret@h".into(),
            ..AmqpConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.starts_with("url must look like amqp://"), "{e}");
        assert!(!e.contains("secret"), "{e}");

        let mut c = AmqpConfig::default();
        c.exchanges[0].kind = "fast".into();
        assert!(c.validate().unwrap_err().contains("exchanges[0].type"));

        let mut c = AmqpConfig::default();
        c.routes[0].routing_key = "{topc}".into();
        assert!(c
            .validate()
            .unwrap_err()
            .contains("routes[0].routing_key: unknown placeholder {topc}"));
    }

    #[test]
    fn exchange_entries_need_a_name_and_default_to_durable_topic() {
        let c: AmqpConfig = toml::from_str(
            r#"exchanges = [{ name = "events" }]
routes = [{ topics = ["*"], exchange = "events" }]"#,
        )
        .unwrap();
        assert_eq!(
            c.exchanges[0],
            AmqpExchange {
                name: "events".into(),
                ..AmqpExchange::default()
            }
        );
        assert_eq!(c.routes[0].routing_key, "{topic}");
        let e = toml::from_str::<AmqpConfig>(r#"exchanges = [{ type = "direct" }]"#).unwrap_err();
        assert!(e.to_string().contains("missing field `name`"), "{e}");
    }

    #[test]
    fn unlisted_exchanges_must_exist() {
        let mut c = AmqpConfig::default();
        c.routes.push(AmqpRoute {
            topics: vec!["a".into()],
            exchange: "events".into(),
            routing_key: "{key}".into(),
        });
        c.routes.push(AmqpRoute {
            topics: vec!["b".into()],
            exchange: "".into(),
            routing_key: "q".into(),
        });
        assert_eq!(c.undeclared_exchanges(), vec!["events"]);
    }
}
