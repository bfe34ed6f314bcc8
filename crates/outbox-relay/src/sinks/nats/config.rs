//! `kind = "nats"`: the NATS sink's settings, their defaults and their validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::security;
use crate::redact::Secret;
use crate::sinks::{validate_template, RouteTopics};

/// Local NATS with JetStream.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// `kind = "nats"`.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port` (TLS required); credentials in it
    /// (`nats://user:password@host`, `nats://token@host`) still work but are better set with
    /// the keys below, which keep them out of the URL. Never logged with its secret.
    pub url: String,
    /// TLS: the CA that signs the server's certificate, a client certificate, whether TLS is
    /// required.
    pub tls: NatsTlsConfig,
    /// User name, with `password` or `password_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The user's password. Prefer `password_file` (or `OUTBOX_SINKS__<NAME>__PASSWORD`).
    pub password: Secret,
    /// A file holding the user's password; one trailing newline is ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An authentication token (the server's `authorization { token }`).
    pub token: Secret,
    /// A file holding the token; one trailing newline is ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A file holding an NKey user seed (`SU…`, as `nk -gen user` writes it): the relay signs
    /// the server's challenge with it, the seed never leaves the process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (a user JWT and its NKey seed, as `nsc` writes it), for servers in
    /// operator (decentralised JWT) mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// The stream the subjects belong to; checked at start, created when `create = true`.
    pub stream: NatsStreamConfig,
    pub routes: Vec<NatsRoute>,
    /// How long one connection attempt may take.
    pub connect_timeout_secs: u64,
}

/// `[sinks.<name>.tls]`. Setting any file implies `required`; so does a `tls://` URL.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// Refuse to talk to a server that does not offer TLS (otherwise TLS is used when the
    /// server requires it, verified against the system's CAs).
    pub required: bool,
    /// PEM file of the CA(s) that sign the server's certificate. When set, only these are
    /// trusted (not the system's CAs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate, for servers that verify clients (`verify: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl NatsTlsConfig {
    /// Whether a file is set: then the relay talks TLS or not at all.
    pub fn any_file(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// The URL with its credentials redacted; secrets print as `***` ([`Secret`]).
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &crate::redact_url(&self.url))
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("token", &self.token)
            .field("token_file", &self.token_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("credentials_file", &self.credentials_file)
            .field("stream", &self.stream)
            .field("routes", &self.routes)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            tls: NatsTlsConfig::default(),
            user: None,
            password: Secret::default(),
            password_file: None,
            token: Secret::default(),
            token_file: None,
            nkey_seed_file: None,
            credentials_file: None,
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
    /// When the relay creates the stream: messages older than this are removed (0: no limit).
    pub max_age_secs: u64,
    /// When the relay creates the stream: above this size the oldest messages are removed
    /// (0: no limit). JetStream reserves it from the server's store when the stream is made.
    pub max_bytes: u64,
    /// When the relay creates the stream: above this count the oldest messages are removed
    /// (0: no limit).
    pub max_msgs: u64,
}

/// The limits of a stream the relay creates, chosen so that an unattended stream cannot fill
/// the broker's disk (docs/sinks/nats.md, "Stream limits").
pub mod defaults {
    /// 7 days: longer than a consumer stays down over a long weekend, short enough that a
    /// forgotten stream empties itself.
    pub const MAX_AGE_SECS: u64 = 7 * 24 * 3600;
    /// 1 GiB. JetStream reserves a stream's `max_bytes` from the server's store when the stream
    /// is created and refuses a stream that does not fit ("insufficient storage resources
    /// available"): measured on nats-server 2.9 with a 58 GB store, a sixth 10 GiB stream was
    /// refused, and one 10 GiB memory stream took the whole default memory store of a 24 GiB
    /// machine. 1 GiB fits beside other streams on a small server; size it for production.
    pub const MAX_BYTES: u64 = 1 << 30;
    /// No count limit: size and age bound the stream already.
    pub const MAX_MSGS: u64 = 0;
}

impl Default for NatsStreamConfig {
    fn default() -> Self {
        Self {
            name: "OUTBOX".into(),
            subjects: vec!["outbox.>".into()],
            create: true,
            duplicate_window_secs: 120,
            storage: "file".into(),
            max_age_secs: defaults::MAX_AGE_SECS,
            max_bytes: defaults::MAX_BYTES,
            max_msgs: defaults::MAX_MSGS,
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
        if i64::try_from(self.stream.max_bytes).is_err()
            || i64::try_from(self.stream.max_msgs).is_err()
        {
            return Err("stream.max_bytes and stream.max_msgs must be at most 2^63 - 1".into());
        }
        // The files are read and parsed as the sink will at start (and dropped again), so that
        // a missing, unreadable or malformed one stops the relay here, naming its key.
        security::check_tls_files(&self.tls)?;
        security::Auth::from_config(self)?;
        for (i, route) in self.routes.iter().enumerate() {
            validate_template(&format!("routes[{i}].subject"), &route.subject)?;
            // Checked with every placeholder filled in, so that only what a row brings in can
            // make a rendered subject invalid (checked again per message).
            let sample = route
                .subject
                .replace("{topic}", "topic")
                .replace("{key}", "key");
            if let Err(why) = check_subject(&sample) {
                return Err(format!(
                    "routes[{i}].subject must render a concrete NATS subject, but {:?} {why}",
                    route.subject
                ));
            }
        }
        Ok(())
    }
}

/// Why `subject` cannot be published to, if it cannot: NATS subjects are tokens separated by
/// `.`, none of them empty, without whitespace; `*` and `>` are wildcards, which only
/// subscribers use (a message published to `a.*` reaches no consumer of `a.b`).
pub fn check_subject(subject: &str) -> Result<(), &'static str> {
    if subject.is_empty() {
        return Err("is empty");
    }
    // One pass per message: the client's own check is off (the relay checks here, more strictly).
    let (mut whitespace, mut wildcard, mut empty_token) = (false, false, false);
    let mut token_len = 0usize;
    for c in subject.chars() {
        match c {
            '.' => {
                empty_token |= token_len == 0;
                token_len = 0;
                continue;
            }
            '*' | '>' => wildcard = true,
            c if c.is_whitespace() => whitespace = true,
            _ => {}
        }
        token_len += 1;
    }
    empty_token |= token_len == 0;
    if whitespace {
        return Err("contains whitespace");
    }
    if wildcard {
        return Err(
            "contains a wildcard ('*' or '>'), which no consumer of concrete subjects receives",
        );
    }
    if empty_token {
        return Err("has an empty token (it starts or ends with '.', or contains '..')");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_checked_as_nats_reads_them() {
        assert_eq!(check_subject("outbox.user.created"), Ok(()));
        assert_eq!(check_subject("outbox.ünïcode"), Ok(()));
        for bad in [
            "", "n.sp ace", "n.tab\tx", "n.end.", ".n.start", "a..b", "n.*", "n.>", "n.a*b",
        ] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_subjects_must_render_concrete_subjects() {
        let mut c = NatsConfig::default();
        c.validate().unwrap();
        for bad in [
            "outbox.{topic}.",
            "outbox..{topic}",
            "outbox.*",
            "outbox.{topic} x",
        ] {
            c.routes[0].subject = bad.into();
            let e = c.validate().unwrap_err();
            assert!(e.starts_with("routes[0].subject must render"), "{e}");
        }
        // A key that may be empty leaves an empty token only for rows without a key: checked
        // per message, not refused here.
        c.routes[0].subject = "outbox.{topic}.{key}".into();
        c.validate().unwrap();
    }

    #[test]
    fn created_streams_are_bounded_by_default() {
        let s = NatsStreamConfig::default();
        assert_eq!(s.max_age_secs, 7 * 24 * 3600);
        assert_eq!(s.max_bytes, 1 << 30);
        assert_eq!(s.max_msgs, 0);
        let parsed: NatsStreamConfig = toml::from_str("max_age_secs = 0\nmax_bytes = 5").unwrap();
        assert_eq!((parsed.max_age_secs, parsed.max_bytes), (0, 5));
    }
}
