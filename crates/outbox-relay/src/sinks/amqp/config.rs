//! `kind = "amqp"`: the RabbitMQ sink's settings, their defaults and their validation.

use std::path::PathBuf;

use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use serde::{Deserialize, Serialize};

use crate::sinks::{validate_template, RouteTopics};
use crate::Secret;

/// Local RabbitMQ with its stock guest account (which only accepts loopback connections).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ's default `max_message_size` (128 MiB): a bigger message makes the broker close the
/// channel, so the sink rejects it before sending.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 134_217_728;
/// AMQP short strings (exchange and queue names, routing keys, header names, `message_id`) are
/// at most 255 bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// `kind = "amqp"`: RabbitMQ (AMQP 0-9-1).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://[user[:password]@]host:port/vhost` (`amqps://` for TLS; the default vhost `/` is
    /// `%2f`; `?auth_mechanism=external` to log in with the client certificate). Credentials can
    /// come from the environment instead of the file: `OUTBOX_SINKS__<NAME>__URL`. They are
    /// never logged.
    pub url: String,
    /// The password of the URL's user, when it is not in the URL. Prefer `password_file` or
    /// `OUTBOX_SINKS__<NAME>__PASSWORD`: a password in the TOML file is readable by whoever can
    /// read the file.
    pub password: Secret,
    /// A file holding the password (a mounted secret); one trailing newline is ignored. Read at
    /// start and on every reconnection, so a rotated secret is picked up.
    pub password_file: Option<PathBuf>,
    /// `[sinks.<name>.tls]`: certificates for `amqps://`.
    pub tls: AmqpTls,
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
            password: Secret::default(),
            password_file: None,
            tls: AmqpTls::default(),
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

/// The URL's password is redacted, the password itself never shown.
impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &crate::redact_url(&self.url))
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("exchanges", &self.exchanges)
            .field("routes", &self.routes)
            .field("mandatory", &self.mandatory)
            .field("persistent", &self.persistent)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("reconnect_initial_ms", &self.reconnect_initial_ms)
            .field("reconnect_max_secs", &self.reconnect_max_secs)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

/// `[sinks.<name>.tls]`: how an `amqps://` connection checks the broker and proves who the
/// relay is. Every file is PEM and is read at start (a missing or malformed one is a
/// configuration error) and again on every reconnection (so renewed certificates are picked
/// up).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpTls {
    /// The CA certificate(s) that sign the broker's certificate. When set, only these are
    /// trusted (a private CA should not share trust with every public one); unset, the
    /// system's CA store.
    pub ca_file: Option<PathBuf>,
    /// The relay's client certificate (with its chain), for brokers that require one
    /// (`ssl_options.verify = verify_peer`, `fail_if_no_peer_cert = true`) and for
    /// `auth_mechanism=external`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1), unencrypted, readable by
    /// the relay's user only.
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it differs from the URL's host (a
    /// broker reached through an IP address or a tunnel). The check itself cannot be turned
    /// off.
    pub server_name: Option<String>,
}

impl AmqpTls {
    fn is_set(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.server_name.is_some()
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
        let uri = match self.url.parse::<AMQPUri>() {
            Ok(uri) if scheme_ok => uri,
            _ => {
                return Err(format!(
                    "url must look like amqp://user:password@host:5672/%2f (amqps:// for TLS), got {:?}",
                    crate::redact_url(&self.url)
                ))
            }
        };
        self.validate_security(&uri)?;
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

impl AmqpConfig {
    /// The login and TLS settings: one place for the password, TLS settings only with
    /// `amqps://`, the client certificate complete, EXTERNAL only with one, every file usable.
    fn validate_security(&self, uri: &AMQPUri) -> Result<(), String> {
        let tls = &self.tls;
        let external = uri.query.auth_mechanism == Some(SASLMechanism::External);
        if !matches!(
            uri.query.auth_mechanism,
            None | Some(SASLMechanism::Plain) | Some(SASLMechanism::External)
        ) {
            return Err(
                "url: auth_mechanism must be plain (user and password, the default) or external (the client certificate)"
                    .into(),
            );
        }
        // (lapin fills in `guest` for a URL without a password: ask the URL itself.)
        let url_password = url::Url::parse(&self.url).is_ok_and(|u| u.password().is_some());
        let set = [
            (url_password, "the url"),
            (!self.password.is_empty(), "password"),
            (self.password_file.is_some(), "password_file"),
        ];
        let given: Vec<&str> = set.iter().filter(|(on, _)| *on).map(|(_, k)| *k).collect();
        if given.len() > 1 {
            return Err(format!(
                "password: set in {}: keep it in one place (password_file or OUTBOX_SINKS__<NAME>__PASSWORD keep it out of the TOML file)",
                given.join(" and ")
            ));
        }
        if let Some(path) = &self.password_file {
            super::tls::read_password_file(path).map_err(|e| format!("password_file: {e}"))?;
        }
        if external && !given.is_empty() {
            return Err(format!(
                "url: auth_mechanism=external logs in with the client certificate, but a password is set in {}: remove it",
                given[0]
            ));
        }
        if uri.scheme == AMQPScheme::AMQP {
            if tls.is_set() {
                return Err(
                    "tls: settings given for a plaintext url (amqp://): use amqps:// (RabbitMQ's TLS port, 5671 by default), or remove [tls]"
                        .into(),
                );
            }
            if external {
                return Err(
                    "url: auth_mechanism=external needs TLS with a client certificate: use amqps:// and set tls.cert_file and tls.key_file"
                        .into(),
                );
            }
            return Ok(());
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                return Err("tls.key_file: set it with tls.cert_file (the certificate's private key)".into())
            }
            (None, Some(_)) => {
                return Err("tls.cert_file: set it with tls.key_file (the certificate the key belongs to)".into())
            }
            (None, None) if external => {
                return Err(
                    "url: auth_mechanism=external logs in with the client certificate: set tls.cert_file and tls.key_file"
                        .into(),
                )
            }
            _ => {}
        }
        super::tls::TlsSetup::new(tls, &uri.authority.host).map(|_| ())
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

    fn with(url: &str, f: impl FnOnce(&mut AmqpConfig)) -> Result<(), String> {
        let mut c = AmqpConfig {
            url: url.into(),
            ..AmqpConfig::default()
        };
        f(&mut c);
        c.validate()
    }

    fn private(dir: &std::path::Path, name: &str, contents: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn login_and_tls_settings_are_checked_at_start_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pw = private(d, "pw", "s3cret\n", 0o600);
        let empty = private(d, "empty", "\n", 0o600);
        let not_pem = private(d, "ca.pem", "not a certificate", 0o644);
        let tls_url = "amqps://relay@rabbit:5671/%2f";

        with("amqp://relay@rabbit/%2f", |c| {
            c.password_file = Some(pw.clone())
        })
        .unwrap();
        with(tls_url, |c| c.password = Secret::new("x")).unwrap();
        let e = with("amqp://relay:inline@rabbit/%2f", |c| {
            c.password_file = Some(pw.clone())
        })
        .unwrap_err();
        assert!(
            e.contains("the url and password_file: keep it in one place"),
            "{e}"
        );
        assert!(!e.contains("inline"), "{e}");
        let e = with(tls_url, |c| c.password_file = Some(d.join("missing"))).unwrap_err();
        assert!(
            e.starts_with("password_file: ") && e.contains("cannot be read"),
            "{e}"
        );
        let e = with(tls_url, |c| c.password_file = Some(empty.clone())).unwrap_err();
        assert!(e.contains("is empty"), "{e}");

        let e = with("amqp://relay@rabbit/%2f", |c| {
            c.tls.ca_file = Some(not_pem.clone())
        })
        .unwrap_err();
        assert!(
            e.starts_with("tls: settings given for a plaintext url (amqp://): use amqps://"),
            "{e}"
        );
        let e = with(tls_url, |c| c.tls.ca_file = Some(not_pem.clone())).unwrap_err();
        assert!(
            e.starts_with("tls.ca_file: ") && e.contains("holds no certificate"),
            "{e}"
        );
        let e = with(tls_url, |c| c.tls.ca_file = Some(d.join("nope.pem"))).unwrap_err();
        assert!(
            e.starts_with("tls.ca_file: ") && e.contains("cannot be read"),
            "{e}"
        );
        let e = with(tls_url, |c| c.tls.cert_file = Some(not_pem.clone())).unwrap_err();
        assert!(
            e.starts_with("tls.key_file: set it with tls.cert_file"),
            "{e}"
        );
        let e = with(tls_url, |c| c.tls.server_name = Some("bad name!".into())).unwrap_err();
        assert!(e.starts_with("tls.server_name: "), "{e}");

        let external = "amqps://relay@rabbit:5671/%2f?auth_mechanism=external";
        let e = with(external, |_| {}).unwrap_err();
        assert!(e.contains("set tls.cert_file and tls.key_file"), "{e}");
        let e = with("amqp://rabbit/%2f?auth_mechanism=external", |_| {}).unwrap_err();
        assert!(
            e.contains("needs TLS with a client certificate: use amqps://"),
            "{e}"
        );
        let e = with(external, |c| c.password_file = Some(pw.clone())).unwrap_err();
        assert!(
            e.contains("a password is set in password_file: remove it"),
            "{e}"
        );
        let e = with("amqp://rabbit/%2f?auth_mechanism=amqplain", |_| {}).unwrap_err();
        assert!(e.starts_with("url: auth_mechanism must be plain"), "{e}");
    }

    #[test]
    fn client_key_must_be_private_and_match_the_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let pki = outbox_testkit::tls::TestPki::new("amqp-unit");
        let (client, other) = (pki.client("relay"), pki.client("other"));
        let configure = |cert: &PathBuf, key: &PathBuf| {
            with("amqps://relay@rabbit:5671/%2f", |c| {
                c.tls.ca_file = Some(pki.ca_cert.clone());
                c.tls.cert_file = Some(cert.clone());
                c.tls.key_file = Some(key.clone());
            })
        };
        configure(&client.cert, &client.key).unwrap();
        let e = configure(&client.cert, &other.key).unwrap_err();
        assert!(
            e.starts_with("tls.key_file: ") && e.contains("does not go with the certificate"),
            "{e}"
        );
        std::fs::set_permissions(&client.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = configure(&client.cert, &client.key).unwrap_err();
        assert!(
            e.starts_with("tls.key_file: ")
                && e.contains("may be read by other users (mode 644): chmod 600"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_hides_the_password() {
        let c = AmqpConfig {
            url: "amqps://relay:in-url-secret@rabbit:5671/%2f".into(),
            password: Secret::new("key-secret"),
            ..AmqpConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("in-url-secret") && !shown.contains("key-secret"),
            "{shown}"
        );
        assert!(shown.contains("amqps://relay:***@rabbit"), "{shown}");
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
