//! `kind = "kafka"`: the Kafka sink's settings, their defaults and their validation, and the
//! librdkafka configuration they become.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::sinks::files::{check_private_key, check_readable, read_secret_file};
use crate::sinks::{validate_template, RouteTopics};
use crate::Secret;

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

/// librdkafka settings whose value is a secret: each has a key of its own (a [`Secret`], also
/// readable from a file) or, where none fits, a sentence saying what to do instead.
const SECRET_KEYS: &[(&str, &str)] = &[
    ("sasl.password", "set `sasl_password_file` (or `sasl_password`, or OUTBOX_SINKS__<NAME>__SASL_PASSWORD) in this sink's section instead"),
    ("ssl.key.password", "set `ssl_key_password_file` (or `ssl_key_password`) in this sink's section instead"),
    ("ssl.keystore.password", "set `ssl_key_password_file` (or `ssl_key_password`) in this sink's section instead: with ssl.keystore.location it becomes the keystore's password"),
    ("ssl.key.pem", "write the key to a file readable by the relay's user only and set librdkafka.\"ssl.key.location\""),
    ("sasl.oauthbearer.client.secret", "OAUTHBEARER client credentials are not supported (this build of librdkafka has no HTTP client); use SCRAM or mutual TLS"),
];

/// librdkafka settings that name a file the relay checks at start: (key, may be a directory,
/// is a private key).
const FILE_KEYS: &[(&str, bool, bool)] = &[
    ("ssl.ca.location", true, false),
    ("ssl.certificate.location", false, false),
    ("ssl.key.location", false, true),
    ("ssl.keystore.location", false, true),
    ("ssl.crl.location", false, false),
    ("sasl.kerberos.keytab", false, true),
];

/// `kind = "kafka"`.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
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
    /// librdkafka's `sasl.password` (SASL PLAIN and SCRAM). Prefer `sasl_password_file` or
    /// `OUTBOX_SINKS__<NAME>__SASL_PASSWORD`: a password in the TOML file is readable by
    /// whoever can read the file.
    pub sasl_password: Secret,
    /// A file holding `sasl_password` (a mounted secret); one trailing newline is ignored. Read
    /// at start.
    pub sasl_password_file: Option<PathBuf>,
    /// The passphrase of an encrypted client key (librdkafka's `ssl.key.password`), or of the
    /// PKCS#12 keystore when `ssl.keystore.location` is set (`ssl.keystore.password`).
    pub ssl_key_password: Secret,
    /// A file holding `ssl_key_password`; one trailing newline is ignored.
    pub ssl_key_password_file: Option<PathBuf>,
    /// Any other librdkafka setting, passed through verbatim: `security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `ssl.ca.location`, `compression.type`, `linger.ms`…
    /// See <https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>. Settings
    /// whose value is a secret are refused here (they have keys of their own above); the file
    /// settings (`ssl.ca.location`, `ssl.key.location`, …) are checked at start.
    pub librdkafka: BTreeMap<String, String>,
}

/// Secrets are shown as `***`.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("routes", &self.routes)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("check_timeout_ms", &self.check_timeout_ms)
            .field("queue_full_timeout_ms", &self.queue_full_timeout_ms)
            .field("sasl_password", &self.sasl_password)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_key_password", &self.ssl_key_password)
            .field("ssl_key_password_file", &self.ssl_key_password_file)
            .field("librdkafka", &self.librdkafka)
            .finish()
    }
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
            sasl_password: Secret::default(),
            sasl_password_file: None,
            ssl_key_password: Secret::default(),
            ssl_key_password_file: None,
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
            if let Some((_, instead)) = SECRET_KEYS.iter().find(|(k, _)| k == key) {
                return Err(format!(
                    "librdkafka.{key:?} holds a secret, which this table would show in logs and keep in the file: {instead}"
                ));
            }
        }
        self.validate_security()?;
        // librdkafka checks every name and value without connecting anywhere.
        self.client_config()?.create_native_config().map_err(|e| {
            format!("librdkafka: {e}; see https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md")
        })?;
        Ok(())
    }

    /// A pass-through setting, by its name or librdkafka's alias.
    fn setting(&self, names: &[&str]) -> Option<&str> {
        names
            .iter()
            .find_map(|n| self.librdkafka.get(*n))
            .map(String::as_str)
    }

    /// TLS and SASL: the files exist (keys private), and the combinations make sense, so that
    /// a mistake is a sentence at start rather than a broker that refuses the relay later.
    fn validate_security(&self) -> Result<(), String> {
        const PROTOCOL: &str = "librdkafka.\"security.protocol\"";
        const MECHANISM: &str = "librdkafka.\"sasl.mechanism\"";
        for (key, dir_ok, private) in FILE_KEYS {
            let Some(value) = self.librdkafka.get(*key) else {
                continue;
            };
            if *key == "ssl.ca.location" && value == "probe" {
                continue;
            }
            let path = Path::new(value);
            let checked = if *private {
                check_private_key(path)
            } else {
                check_readable(path, *dir_ok)
            };
            checked.map_err(|e| format!("librdkafka.{key:?}: {e}"))?;
        }
        for (inline, file, name) in [
            (
                &self.sasl_password,
                &self.sasl_password_file,
                "sasl_password",
            ),
            (
                &self.ssl_key_password,
                &self.ssl_key_password_file,
                "ssl_key_password",
            ),
        ] {
            if !inline.is_empty() && file.is_some() {
                return Err(format!(
                    "{name}: set both as {name} and {name}_file: keep one ({name}_file keeps it out of the TOML file)"
                ));
            }
            if let Some(path) = file {
                read_secret_file(path).map_err(|e| format!("{name}_file: {e}"))?;
            }
        }
        let protocol = self
            .setting(&["security.protocol"])
            .unwrap_or("plaintext")
            .to_ascii_lowercase();
        let sasl = protocol.starts_with("sasl_");
        let tls = protocol.ends_with("ssl");
        let mechanism = self
            .setting(&["sasl.mechanism", "sasl.mechanisms"])
            .map(str::to_ascii_uppercase);
        let password = !self.sasl_password.is_empty() || self.sasl_password_file.is_some();
        let username = self.setting(&["sasl.username"]).is_some();
        if sasl {
            let Some(mechanism) = &mechanism else {
                return Err(format!(
                    "{PROTOCOL} = {protocol:?} needs {MECHANISM}: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (unset, librdkafka tries Kerberos, GSSAPI)"
                ));
            };
            if matches!(
                mechanism.as_str(),
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512"
            ) && !(username && password)
            {
                return Err(format!(
                    "{MECHANISM} = {mechanism:?} needs a user and a password: set librdkafka.\"sasl.username\" and sasl_password_file (or sasl_password, or OUTBOX_SINKS__<NAME>__SASL_PASSWORD)"
                ));
            }
            if mechanism == "PLAIN" && !tls {
                return Err(format!(
                    "{MECHANISM} = \"PLAIN\" over {PROTOCOL} = {protocol:?} sends the password in clear text: use SASL_SSL, or SCRAM-SHA-256 / SCRAM-SHA-512"
                ));
            }
        } else if username || password || mechanism.is_some() {
            return Err(format!(
                "SASL settings are set (sasl.username, sasl_password or sasl.mechanism) but {PROTOCOL} = {protocol:?} does not log in with SASL: set it to SASL_SSL (or SASL_PLAINTEXT with SCRAM), or remove them"
            ));
        }
        let tls_files: Vec<&str> = FILE_KEYS
            .iter()
            .map(|(k, _, _)| *k)
            .filter(|k| k.starts_with("ssl.") && self.librdkafka.contains_key(*k))
            .collect();
        if !tls && !tls_files.is_empty() {
            return Err(format!(
                "librdkafka.{:?} is set but {PROTOCOL} = {protocol:?} does not use TLS: set it to SSL or SASL_SSL, or remove the TLS settings",
                tls_files[0]
            ));
        }
        let has = |k: &str| self.librdkafka.contains_key(k);
        if has("ssl.certificate.location") != has("ssl.key.location") {
            return Err(
                "librdkafka.\"ssl.certificate.location\" and librdkafka.\"ssl.key.location\" go together: the client certificate and its private key"
                    .into(),
            );
        }
        if self
            .setting(&["enable.ssl.certificate.verification"])
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
        {
            return Err(
                "librdkafka.\"enable.ssl.certificate.verification\" = \"false\" would accept any broker certificate: remove it and set librdkafka.\"ssl.ca.location\" to the CA that signs the brokers' certificates"
                    .into(),
            );
        }
        if self
            .setting(&["ssl.endpoint.identification.algorithm"])
            .is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Err(
                "librdkafka.\"ssl.endpoint.identification.algorithm\" = \"none\" would accept a certificate issued for another host: remove it and list in `brokers` the names the brokers' certificates carry"
                    .into(),
            );
        }
        Ok(())
    }

    /// How long a topic the broker reports unknown is retried before its rows are
    /// dead-lettered: librdkafka's `topic.metadata.propagation.max.ms` (5 s unless set in
    /// `librdkafka`), the time a new topic may take to reach every broker.
    pub(super) fn missing_topic_grace(&self) -> Duration {
        let ms = self
            .settings()
            .get(PROPAGATION)
            .and_then(|v| v.parse().ok())
            .unwrap_or(PROPAGATION_DEFAULT_MS);
        Duration::from_millis(ms)
    }

    /// The producer configuration: [`KafkaConfig::settings`] and the secrets (read from their
    /// files now). Errors name the key.
    pub(super) fn client_config(&self) -> Result<ClientConfig, String> {
        let mut c = self.settings();
        let secret = |inline: &Secret, file: &Option<PathBuf>, name: &str| match file {
            Some(path) => read_secret_file(path).map_err(|e| format!("{name}_file: {e}")),
            None => Ok(inline.clone()),
        };
        let password = secret(
            &self.sasl_password,
            &self.sasl_password_file,
            "sasl_password",
        )?;
        if !password.is_empty() {
            c.set("sasl.password", password.expose());
        }
        let key_password = secret(
            &self.ssl_key_password,
            &self.ssl_key_password_file,
            "ssl_key_password",
        )?;
        if !key_password.is_empty() {
            let key = if self.librdkafka.contains_key("ssl.keystore.location") {
                "ssl.keystore.password"
            } else {
                "ssl.key.password"
            };
            c.set(key, key_password.expose());
        }
        Ok(c)
    }

    /// The producer configuration without secrets: defaults, then the pass-through settings,
    /// then the settings the sink fixes.
    fn settings(&self) -> ClientConfig {
        use rdkafka::config::RDKafkaLogLevel as L;
        let mut c = ClientConfig::new();
        // librdkafka's level follows the tracing filter at creation; warnings and errors are
        // always wanted: the sink reads some refusals (a TLS handshake that timed out) only
        // from them, and the tracing filter still decides what is printed.
        if matches!(c.log_level, L::Emerg | L::Alert | L::Critical | L::Error) {
            c.set_log_level(L::Warning);
        }
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
        let cc = c.client_config().unwrap();
        assert_eq!(cc.get("compression.type"), Some("zstd"));
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(c.missing_topic_grace(), Duration::from_secs(5));
        c.librdkafka
            .insert("topic.metadata.propagation.max.ms".into(), "800".into());
        assert_eq!(c.missing_topic_grace(), Duration::from_millis(800));
    }

    fn kafka(settings: &[(&str, &str)], f: impl FnOnce(&mut KafkaConfig)) -> Result<(), String> {
        let mut c = KafkaConfig::default();
        for (k, v) in settings {
            c.librdkafka.insert((*k).into(), (*v).into());
        }
        f(&mut c);
        c.validate()
    }

    fn file(dir: &Path, name: &str, contents: &str, mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn tls_and_sasl_settings_are_checked_at_start_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = file(d, "ca.pem", "ca", 0o644);
        let cert = file(d, "cert.pem", "cert", 0o644);
        let key = file(d, "key.pem", "key", 0o600);
        let open_key = file(d, "open-key.pem", "key", 0o644);
        let pw = PathBuf::from(file(d, "pw", "s3cret\n", 0o600));
        let scram = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "relay"),
            ("ssl.ca.location", ca.as_str()),
        ];

        kafka(&scram, |c| c.sasl_password_file = Some(pw.clone())).unwrap();
        let mut c = KafkaConfig::default();
        c.librdkafka
            .extend(scram.iter().map(|(k, v)| ((*k).into(), (*v).into())));
        c.sasl_password_file = Some(pw.clone());
        assert_eq!(
            c.client_config().unwrap().get("sasl.password"),
            Some("s3cret")
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");

        let e = kafka(&scram, |_| {}).unwrap_err();
        assert!(
            e.contains("needs a user and a password") && e.contains("sasl_password_file"),
            "{e}"
        );
        let e = kafka(&scram[..1], |_| {}).unwrap_err();
        assert!(e.contains("needs librdkafka.\"sasl.mechanism\""), "{e}");
        let e = kafka(
            &[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "u"),
            ],
            |c| c.sasl_password = Secret::new("x"),
        )
        .unwrap_err();
        assert!(e.contains("sends the password in clear text"), "{e}");
        let e = kafka(&[("sasl.username", "u")], |_| {}).unwrap_err();
        assert!(e.contains("does not log in with SASL"), "{e}");
        let e = kafka(&[("ssl.ca.location", ca.as_str())], |_| {}).unwrap_err();
        assert!(
            e.contains("librdkafka.\"ssl.ca.location\" is set but")
                && e.contains("does not use TLS"),
            "{e}"
        );
        let e = kafka(
            &[
                ("security.protocol", "SSL"),
                ("ssl.ca.location", "/nonexistent/ca.pem"),
            ],
            |_| {},
        )
        .unwrap_err();
        assert!(
            e.starts_with("librdkafka.\"ssl.ca.location\": /nonexistent/ca.pem cannot be read"),
            "{e}"
        );
        let e = kafka(
            &[
                ("security.protocol", "SSL"),
                ("ssl.certificate.location", cert.as_str()),
            ],
            |_| {},
        )
        .unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = kafka(
            &[
                ("security.protocol", "SSL"),
                ("ssl.certificate.location", cert.as_str()),
                ("ssl.key.location", open_key.as_str()),
            ],
            |_| {},
        )
        .unwrap_err();
        assert!(
            e.starts_with("librdkafka.\"ssl.key.location\": ") && e.contains("chmod 600"),
            "{e}"
        );
        kafka(
            &[
                ("security.protocol", "SSL"),
                ("ssl.ca.location", d.to_str().unwrap()),
                ("ssl.certificate.location", cert.as_str()),
                ("ssl.key.location", key.as_str()),
            ],
            |_| {},
        )
        .unwrap();
        let e = kafka(
            &[
                ("security.protocol", "SSL"),
                ("enable.ssl.certificate.verification", "false"),
            ],
            |_| {},
        )
        .unwrap_err();
        assert!(e.contains("would accept any broker certificate"), "{e}");
        let e = kafka(
            &[
                ("security.protocol", "SSL"),
                ("ssl.endpoint.identification.algorithm", "none"),
            ],
            |_| {},
        )
        .unwrap_err();
        assert!(e.contains("issued for another host"), "{e}");
        let e = kafka(&[("sasl.password", "inline-secret")], |_| {}).unwrap_err();
        assert!(
            e.contains("holds a secret")
                && e.contains("sasl_password_file")
                && !e.contains("inline-secret"),
            "{e}"
        );
        let e = kafka(&scram, |c| {
            c.sasl_password = Secret::new("a");
            c.sasl_password_file = Some(pw.clone());
        })
        .unwrap_err();
        assert!(e.starts_with("sasl_password: set both"), "{e}");
        let e = kafka(&scram, |c| c.sasl_password_file = Some(d.join("missing"))).unwrap_err();
        assert!(
            e.starts_with("sasl_password_file: ") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn topic_names() {
        assert!(valid_topic_name("orders.created-v1_x"));
        assert!(!valid_topic_name("a b"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
    }
}
