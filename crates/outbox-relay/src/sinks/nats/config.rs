//! `kind = "nats"`: the NATS sink's settings, their defaults and their validation.

use serde::{Deserialize, Serialize};

use crate::sinks::{validate_template, RouteTopics};

/// Local NATS with JetStream.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// `kind = "nats"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:port`; credentials are never logged.
    pub url: String,
    /// The stream the subjects belong to; checked at start, created when `create = true`.
    pub stream: NatsStreamConfig,
    pub routes: Vec<NatsRoute>,
    /// How long one connection attempt may take.
    pub connect_timeout_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            stream: NatsStreamConfig::default(),
            routes: vec![NatsRoute {
                topics: vec!["*".into()],
                subject: "outbox.{topic}".into(),
            }],
            connect_timeout_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsStreamConfig {
    pub name: String,
    /// Subjects the stream captures when the relay creates it.
    pub subjects: Vec<String>,
    /// Create the stream if it does not exist (otherwise a missing stream is an error).
    pub create: bool,
    /// JetStream's duplicate window when the relay creates the stream: a re-publish of the same
    /// message id inside it is dropped. Longer than the relay's worst redelivery delay.
    pub duplicate_window_secs: u64,
    /// `file` (durable) or `memory`.
    pub storage: String,
}

impl Default for NatsStreamConfig {
    fn default() -> Self {
        Self {
            name: "OUTBOX".into(),
            subjects: vec!["outbox.>".into()],
            create: true,
            duplicate_window_secs: 120,
            storage: "file".into(),
        }
    }
}

/// Topics → subject. `subject` may use `{topic}` and `{key}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NatsRoute {
    pub topics: Vec<String>,
    pub subject: String,
}

impl RouteTopics for NatsRoute {
    fn topics(&self) -> &[String] {
        &self.topics
    }
}

impl NatsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("nats://") || self.url.starts_with("tls://")) {
            return Err(format!(
                "url must look like nats://host:4222, got {:?}",
                crate::redact_url(&self.url)
            ));
        }
        if self.stream.name.is_empty() || self.stream.name.contains(['.', '*', '>', ' ']) {
            return Err(format!(
                "stream.name must be a non-empty name without '.', '*', '>' or spaces, got {:?}",
                self.stream.name
            ));
        }
        if self.stream.create && self.stream.subjects.is_empty() {
            return Err(
                "stream.subjects must list the subjects to capture when stream.create = true"
                    .into(),
            );
        }
        if !matches!(self.stream.storage.as_str(), "file" | "memory") {
            return Err(format!(
                "stream.storage must be \"file\" or \"memory\", got {:?}",
                self.stream.storage
            ));
        }
        if self.routes.is_empty() {
            return Err(
                "routes: add at least one [[sinks.<name>.routes]] with topics and subject".into(),
            );
        }
        for (i, route) in self.routes.iter().enumerate() {
            validate_template(&format!("routes[{i}].subject"), &route.subject)?;
            if route.subject.contains([' ', '*', '>']) {
                return Err(format!(
                    "routes[{i}].subject must be a concrete subject (no spaces or wildcards), got {:?}",
                    route.subject
                ));
            }
        }
        Ok(())
    }
}
