//! The relay's configuration: one TOML file, every key overridable from the environment.
//!
//! Sources, later ones winning: built-in defaults (local services), `DATABASE_URL` (for
//! `database.url` only), the TOML file (if any), then `OUTBOX_…` environment variables where
//! `__` separates levels, e.g. `OUTBOX_DATABASE__URL`, `OUTBOX_RELAY__BATCH_SIZE`,
//! `OUTBOX_SINKS__NATS__URL`. Unknown keys are errors that suggest the nearest known key, and
//! [`Config::validate`] explains in sentences what to fix.
//!
//! An `OUTBOX_…` variable that looks like a key spelled with one underscore between levels
//! (`OUTBOX_DATABASE_URL`) is an error naming the double-underscore spelling; one that resembles
//! no key at all (`OUTBOX_SERVICE_HOST`, as Kubernetes sets for a service named `outbox`) is
//! ignored with a warning ([`Config::warnings`]), so the environment of a shared host or pod
//! cannot stop the relay.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::redact::{key_mode_too_open, world_readable_mode, Secret, SecretFileError};
use crate::sinks::SinkConfig;

/// Every default of the relay itself lives here, with the reason for its value; each sink's
/// defaults live in its folder (`sinks/<kind>/config.rs`).
pub mod defaults {
    /// Local PostgreSQL with trust auth, as on a developer machine.
    pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    /// Big enough that per-batch costs (round trips, fsync) are amortised, small enough that a
    /// batch publishes within a few milliseconds. The claim+delete loop alone runs at about
    /// 24k rows/s at 100 and 86k rows/s at 1,000 on the 2-core reference machine.
    pub const BATCH_SIZE: u32 = 500;
    /// Four claim transactions in flight, so that the broker's acknowledgement wait of some
    /// overlaps the claims and marks of others. Measured on the 2-core reference machine
    /// (docs/benchmarks.md): a Kafka drain went from 69k to 100k msg/s with 4 instead of 2,
    /// the database ceiling did not drop, and 8 gained nothing more.
    pub const WORKERS: u32 = 4;
    /// While the relay has seen work recently it polls this often instead of waiting for NOTIFY,
    /// so that busy enqueuers never pay for NOTIFY.
    pub const IDLE_POLL_MS: u64 = 2;
    /// After this long without work the relay registers for NOTIFY and sleeps.
    pub const SLEEP_AFTER_MS: u64 = 250;
    /// Fallback poll while sleeping: nothing depends on the notification arriving.
    pub const POLL_INTERVAL_MS: u64 = 1_000;
    /// A batch whose acknowledgements take longer than this is treated as a sink failure.
    pub const PUBLISH_TIMEOUT_SECS: u64 = 30;
    /// PostgreSQL aborts a claim transaction idle for this long (a relay that lost its way),
    /// releasing its rows to other relays. Must exceed the publish timeout.
    pub const CLAIM_TIMEOUT_SECS: u64 = 60;
    /// 0 deletes sent rows at once; a positive value keeps them in outbox.sent this long.
    pub const RETENTION_SECS: u64 = 0;
    /// Sent rows are cleaned in chunks of this many rows so no statement runs long.
    pub const CLEANUP_CHUNK: u32 = 5_000;
    pub const MAINTENANCE_INTERVAL_SECS: u64 = 10;
    /// Lag gauges are refreshed this often; the query reads one row per topic.
    pub const LAG_INTERVAL_SECS: u64 = 5;
    /// After this many failed attempts a message is dead-lettered.
    pub const MAX_ATTEMPTS: u32 = 10;
    pub const RETRY_INITIAL_MS: u64 = 500;
    pub const RETRY_MAX_SECS: u64 = 300;
    /// How long SIGTERM waits for in-flight batches before giving up on them.
    pub const SHUTDOWN_TIMEOUT_SECS: u64 = 30;
    /// Each relay upserts its row in outbox.relays this often (one tiny statement); `status`
    /// shows publish rates averaged over this window.
    /// One heartbeat per second: each renews the relay's `outbox.relays` row and its ordering
    /// slot leases (one small transaction), so `status` averages publish rates over a second and
    /// a few beats fit in one lease.
    pub const HEARTBEAT_MS: u64 = 1_000;
    /// A relay that stops heartbeating loses its ordering slots after this long: the time a dead
    /// relay's keys wait (only for efficiency: ordering never depends on the lease).
    pub const LEASE_MS: u64 = 5_000;
    /// A relay whose heartbeat is older than this is considered dead and its `outbox.relays` row
    /// is deleted. Twenty missed heartbeats: long enough to ride out a slow database, short
    /// enough that `outbox_relay_instances` drops within half a minute of a crash.
    pub const RELAY_EXPIRY_SECS: u64 = 20;
    /// Ordered delivery is the product's promise for keyed rows; rows without a key pay nothing
    /// for it. Set `ordering.enabled = false` to publish keyed rows unordered (the fastest mode).
    pub const ORDERING_ENABLED: bool = true;
    pub const HTTP_LISTEN: &str = "127.0.0.1:9187";
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub relay: RelayConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    /// Named sinks. With none configured, every topic goes to the local NATS (`nats`).
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Per-key ordering across relays (docs/ordering.md).
    pub ordering: OrderingConfig,
    /// How the relays of one database find each other: heartbeats and slot leases.
    pub cluster: ClusterConfig,
    /// The web admin and its JSON API on the HTTP server (docs/admin.md); off by default.
    pub admin: AdminConfig,
    /// Deprecated keys found while loading, each with its replacement (logged at start).
    #[serde(skip)]
    pub deprecations: Vec<String>,
    /// Other remarks about the sources (an ignored `OUTBOX_…` variable), logged at start.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// Where `database.url` came from when it was not the file or `OUTBOX_DATABASE__URL`
    /// (`DATABASE_URL`), so that a problem with it names the variable to fix.
    #[serde(skip)]
    pub database_url_source: Option<String>,
}

/// `[database]`: where the outbox lives and how to reach it safely.
///
/// The URL may carry everything (`postgres://user:pw@host/db?sslmode=verify-full&sslrootcert=…`),
/// but the keys beside it win over it: `password` / `password_file` over the URL's password,
/// `tls.*` over its `sslmode`, `sslrootcert`, `sslcert` and `sslkey`. That way the URL in the
/// TOML file holds no secret, and TLS settings are checked (files exist, key private) at start.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    /// The password, when it is not in the URL. Prefer `password_file` (or
    /// `OUTBOX_DATABASE__PASSWORD`): a password in the TOML file is readable by whoever can read
    /// the file.
    pub password: Secret,
    /// A file holding the password (a mounted secret); one trailing newline is ignored. Read
    /// once at start into `password`.
    pub password_file: Option<PathBuf>,
    pub tls: DatabaseTlsConfig,
    /// Pool size; the relay needs `relay.workers` + 2.
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: defaults::DATABASE_URL.into(),
            password: Secret::default(),
            password_file: None,
            tls: DatabaseTlsConfig::default(),
            max_connections: 8,
            connect_timeout_secs: 5,
        }
    }
}

/// The URL's password is redacted, the password itself never shown.
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::redact::redact_url(&self.url))
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .finish()
    }
}

/// `[database.tls]`: TLS to PostgreSQL. Each key, when set, wins over the URL's parameter of
/// the same meaning (in brackets).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseTlsConfig {
    /// (`sslmode`) Unset: the URL's `sslmode`, else `PGSSLMODE`, else `prefer`.
    pub mode: Option<SslMode>,
    /// (`sslrootcert`) PEM file of the CA(s) that sign the server's certificate, trusted in
    /// addition to the system's store. With it, `require` verifies the chain, as libpq does.
    pub ca_file: Option<PathBuf>,
    /// (`sslcert`) PEM file of the client certificate, for `cert` authentication.
    pub cert_file: Option<PathBuf>,
    /// (`sslkey`) PEM file of the client certificate's private key (`chmod 600`).
    pub key_file: Option<PathBuf>,
}

/// libpq's `sslmode` values, weakest first.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext, TLS only when the server insists.
    Allow,
    /// TLS when the server offers it, unverified; plaintext otherwise (the default).
    Prefer,
    /// TLS or fail; the certificate verified only when a CA file is given.
    Require,
    /// TLS, the certificate chain verified against the CA, any host name.
    VerifyCa,
    /// TLS, the chain verified and the host name checked against the certificate.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub batch_size: u32,
    pub workers: u32,
    pub idle_poll_ms: u64,
    pub sleep_after_ms: u64,
    pub poll_interval_ms: u64,
    pub publish_timeout_secs: u64,
    pub claim_timeout_secs: u64,
    pub retention_secs: u64,
    pub cleanup_chunk: u32,
    pub maintenance_interval_secs: u64,
    pub lag_interval_secs: u64,
    /// Vacuum the outbox's tables from the relay when autovacuum does not (off for the server
    /// or the table), so they do not grow without bound.
    pub vacuum_when_autovacuum_off: bool,
    pub max_attempts: u32,
    pub retry_initial_ms: u64,
    pub retry_max_secs: u64,
    pub shutdown_timeout_secs: u64,
    /// TESTING ONLY: this fraction of messages fails as retriable before being published
    /// (error type `injected_fault`). 0 (the default) in production.
    pub fault_injection_rate: f64,
    /// Deprecated: `cluster.heartbeat_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_secs: Option<u64>,
    /// Deprecated: `cluster.relay_expiry_secs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_expiry_secs: Option<u64>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        use defaults::*;
        Self {
            batch_size: BATCH_SIZE,
            workers: WORKERS,
            idle_poll_ms: IDLE_POLL_MS,
            sleep_after_ms: SLEEP_AFTER_MS,
            poll_interval_ms: POLL_INTERVAL_MS,
            publish_timeout_secs: PUBLISH_TIMEOUT_SECS,
            claim_timeout_secs: CLAIM_TIMEOUT_SECS,
            retention_secs: RETENTION_SECS,
            cleanup_chunk: CLEANUP_CHUNK,
            maintenance_interval_secs: MAINTENANCE_INTERVAL_SECS,
            lag_interval_secs: LAG_INTERVAL_SECS,
            vacuum_when_autovacuum_off: true,
            max_attempts: MAX_ATTEMPTS,
            retry_initial_ms: RETRY_INITIAL_MS,
            retry_max_secs: RETRY_MAX_SECS,
            shutdown_timeout_secs: SHUTDOWN_TIMEOUT_SECS,
            fault_injection_rate: 0.0,
            heartbeat_interval_secs: None,
            relay_expiry_secs: None,
        }
    }
}

impl RelayConfig {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_secs(self.publish_timeout_secs)
    }
    /// How long after the ordered claim returned a later publish round may still start: a round
    /// takes at most `publish_timeout_secs`, and the claim transaction is aborted after
    /// `claim_timeout_secs` without a statement. A quarter of the gap is kept for the mark.
    pub fn round_budget(&self) -> Duration {
        let gap = self
            .claim_timeout_secs
            .saturating_sub(self.publish_timeout_secs);
        Duration::from_millis(gap * 750)
    }
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_secs > 0).then(|| Duration::from_secs(self.retention_secs))
    }
}

/// What a dead-lettered message does to its key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDead {
    /// The key flows on with its next message (the dead letter stays for an operator).
    #[default]
    Release,
    /// The key is parked in `outbox.parked_keys`: its later messages wait until an operator
    /// runs `outbox-relay keys release|skip <key>`.
    Park,
}

/// `[ordering]`: per-key order (docs/ordering.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingConfig {
    pub enabled: bool,
    pub on_dead: OnDead,
    /// Deprecated: `cluster.lease_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Deprecated: `cluster.heartbeat_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        Self {
            enabled: defaults::ORDERING_ENABLED,
            on_dead: OnDead::Release,
            lease_ms: None,
            heartbeat_ms: None,
        }
    }
}

/// `[cluster]`: one heartbeat per relay renews its `outbox.relays` row (what `status` shows)
/// and its ordering slot leases, in one transaction.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub relay_expiry_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: defaults::HEARTBEAT_MS,
            lease_ms: defaults::LEASE_MS,
            relay_expiry_secs: defaults::RELAY_EXPIRY_SECS,
        }
    }
}

impl ClusterConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn relay_expiry(&self) -> Duration {
        Duration::from_secs(self.relay_expiry_secs)
    }
}

/// `[http]`: `/metrics`, `/healthz` and `/readyz` (docs/security.md, "The HTTP endpoints").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty disables the server.
    pub listen: String,
    /// A bearer token `/metrics` requires and `/readyz` requires for its details
    /// (`Authorization: Bearer <token>`); `/healthz` stays open. Empty: no token. Prefer
    /// `token_file` (or `OUTBOX_HTTP__TOKEN`) to the TOML file.
    pub token: Secret,
    /// A file holding the token (a mounted secret); one trailing newline is ignored. Read once
    /// at start into `token`.
    pub token_file: Option<PathBuf>,
    pub tls: HttpTlsConfig,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: defaults::HTTP_LISTEN.into(),
            token: Secret::default(),
            token_file: None,
            tls: HttpTlsConfig::default(),
        }
    }
}

/// `[http.tls]`: with both files, the endpoints answer HTTPS only. The files are read again
/// when they change (a renewed certificate).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTlsConfig {
    /// PEM file of the server certificate, followed by its intermediate CAs.
    pub cert_file: Option<PathBuf>,
    /// PEM file of its private key (unencrypted PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl HttpConfig {
    /// The shortest accepted token: 16 random characters are about 95 bits (letters and digits).
    pub const MIN_TOKEN_LEN: usize = 16;

    /// Reads `token_file` into `token`; returns a warning about the file, if any.
    fn resolve_token_file(&mut self) -> Result<Option<String>, Error> {
        resolve_secret_file("http.token", &mut self.token, self.token_file.as_deref())
    }

    /// What is wrong with the token and TLS settings (the files are parsed when the listener is
    /// bound, [`crate::http::bind`]).
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let token = self.token.expose();
        if !token.is_empty() && token.chars().count() < Self::MIN_TOKEN_LEN {
            problems.push(format!(
                "http.token is {} characters long: use at least {} random ones (e.g. `openssl rand -hex 32`)",
                token.chars().count(),
                Self::MIN_TOKEN_LEN
            ));
        }
        if token.chars().any(|c| !c.is_ascii_graphic()) {
            problems.push(
                "http.token may hold visible ASCII characters only (no spaces or line breaks): it is sent in an HTTP header".into(),
            );
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) | (None, Some(_)) => problems.push(
                "http.tls.cert_file and http.tls.key_file go together: set both for HTTPS, or neither".into(),
            ),
            (Some(cert), Some(key)) => {
                for (name, path) in [("cert_file", cert), ("key_file", key)] {
                    if let Err(e) = std::fs::File::open(path) {
                        problems.push(format!(
                            "http.tls.{name} = {} cannot be read ({e}): mount the file there and make it readable by the relay's user",
                            path.display()
                        ));
                    }
                }
            }
            (None, None) => {}
        }
        if self.listen.is_empty() && (!token.is_empty() || self.tls.cert_file.is_some()) {
            problems.push(
                "http.token and http.tls.* are set but http.listen is empty (no HTTP server): set http.listen, or remove them".into(),
            );
        }
        problems
    }
}

/// `[admin]`: the web admin and its JSON API, served by the HTTP server (`http.listen`) under
/// `path_prefix`, with accounts of its own (docs/admin.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin. Off by default: it shows payloads and can change what the relay does.
    pub enabled: bool,
    /// Where the admin lives on the HTTP server, e.g. `/admin` (behind a reverse proxy that
    /// forwards `https://ops.example.com/outbox/…`, set the proxy's prefix: `/outbox`).
    pub path_prefix: String,
    /// Who may use it: each account signs in with a password (HTTP basic auth, for people) or
    /// a bearer token (scripts), and has the `read` or the `admin` role.
    pub users: Vec<AdminUser>,
    /// How often the overview's lag chart is sampled; one hour of samples is kept in memory.
    pub lag_sample_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path_prefix: "/admin".into(),
            users: Vec::new(),
            lag_sample_secs: 10,
        }
    }
}

/// One admin account (`[[admin.users]]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminUser {
    /// The name shown in the audit trail; the basic-auth user name.
    pub name: String,
    /// `read`: every page and query. `admin`: also the actions (retry, purge, release, skip,
    /// pause, resume, replay).
    pub role: AdminRole,
    /// The basic-auth password (at least 12 characters). Prefer `password_file`.
    pub password: Secret,
    pub password_file: Option<PathBuf>,
    /// A bearer token for scripts (at least 16 characters). Prefer `token_file`.
    pub token: Secret,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    #[default]
    Read,
    Admin,
}

impl AdminConfig {
    pub const MIN_PASSWORD_LEN: usize = 12;

    /// Reads every account's password and token files; returns warnings about the files.
    fn resolve_secret_files(&mut self) -> Result<Vec<String>, Error> {
        let mut warnings = Vec::new();
        for (i, user) in self.users.iter_mut().enumerate() {
            let key = format!("admin.users[{i}]");
            warnings.extend(resolve_secret_file(
                &format!("{key}.password"),
                &mut user.password,
                user.password_file.as_deref(),
            )?);
            warnings.extend(resolve_secret_file(
                &format!("{key}.token"),
                &mut user.token,
                user.token_file.as_deref(),
            )?);
        }
        Ok(warnings)
    }

    pub fn sample_interval(&self) -> Duration {
        Duration::from_secs(self.lag_sample_secs.max(1))
    }

    fn problems(&self, http: &HttpConfig) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.enabled {
            return problems;
        }
        if http.listen.is_empty() {
            problems.push(
                "admin.enabled is true but http.listen is empty: the admin is served by the HTTP server, so set http.listen".into(),
            );
        }
        let p = &self.path_prefix;
        if !p.starts_with('/') || (p.len() > 1 && p.ends_with('/')) || p.contains("//") || p == "/"
        {
            problems.push(format!(
                "admin.path_prefix must start with / and not end with one, e.g. \"/admin\"; got {p:?}"
            ));
        }
        for reserved in ["/metrics", "/healthz", "/readyz"] {
            if p == reserved {
                problems.push(format!(
                    "admin.path_prefix {p:?} is taken by the relay's own endpoint: choose another, e.g. \"/admin\""
                ));
            }
        }
        if self.users.is_empty() {
            problems.push(
                "admin.enabled is true but admin.users is empty: add an account ([[admin.users]] with name, role and password_file or token_file)".into(),
            );
        }
        if self.lag_sample_secs == 0 {
            problems.push("admin.lag_sample_secs must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let key = format!("admin.users[{i}]");
            if u.name.is_empty() || u.name.contains(':') || u.name.chars().any(char::is_control) {
                problems.push(format!(
                    "{key}.name must be a non-empty name without ':' (it is the basic-auth user name), got {:?}",
                    u.name
                ));
            } else if !names.insert(u.name.as_str()) {
                problems.push(format!(
                    "{key}.name {:?} is used twice: account names must be unique",
                    u.name
                ));
            }
            if u.password.is_empty() && u.token.is_empty() {
                problems.push(format!(
                    "{key} ({:?}) has neither a password nor a token: set password_file (people) or token_file (scripts)",
                    u.name
                ));
            }
            let password = u.password.expose();
            if !password.is_empty() && password.chars().count() < Self::MIN_PASSWORD_LEN {
                problems.push(format!(
                    "{key}.password is {} characters long: use at least {}",
                    password.chars().count(),
                    Self::MIN_PASSWORD_LEN
                ));
            }
            let token = u.token.expose();
            if !token.is_empty()
                && (token.chars().count() < HttpConfig::MIN_TOKEN_LEN
                    || token.chars().any(|c| !c.is_ascii_graphic()))
            {
                problems.push(format!(
                    "{key}.token must be at least {} visible ASCII characters (e.g. `openssl rand -hex 32`)",
                    HttpConfig::MIN_TOKEN_LEN
                ));
            }
        }
        problems
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `outbox_relay=debug,sqlx=warn`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Loads defaults, then `path` (if given), then `OUTBOX_…` variables, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let scan = scan_env(std::env::vars());
        if !scan.errors.is_empty() {
            return Err(Error::Config(format!(
                "invalid configuration:\n  - {}",
                scan.errors.join("\n  - ")
            )));
        }
        let mut base = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} does not exist: pass an existing TOML file with --config, or none to use the defaults",
                    path.display()
                )));
            }
            base = base.merge(Toml::file_exact(path));
        }
        // `OUTBOX_<KEY>_FILE` variables are read as `<key>_file` when that is a key of its own
        // (`database.password_file`, `sinks.<name>.ca_file`); otherwise, once the key turns out
        // unknown, as "the value of <key> is in this file" (`OUTBOX_SINKS__NATS__TOKEN_FILE`).
        let candidates = file_variables(std::env::vars());
        let mut from_files: Vec<&FileVariable> = Vec::new();
        let mut warnings = Vec::new();
        let (mut config, database_url_source) = loop {
            // The file and the `OUTBOX_…` variables, to learn whether they set `database.url`.
            let mut sources = base.clone();
            let skip: Vec<String> = scan
                .ignored
                .iter()
                .cloned()
                .chain(from_files.iter().map(|v| v.key.clone()))
                .collect();
            sources = sources.merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    .ignore(&["config"])
                    .filter(move |key| {
                        let key = key.as_str().replace("__", ".");
                        !skip.iter().any(|i| key.eq_ignore_ascii_case(i))
                    }),
            );
            for variable in &from_files {
                let (value, warning) = read_secret_file(
                    &format!("environment variable {}", variable.name),
                    Path::new(&variable.path),
                )
                .map_err(|e| Error::Config(format!("invalid configuration: {e}")))?;
                warnings.extend(warning);
                sources = sources.merge(Serialized::default(&variable.target, value));
            }
            let mut figment = Figment::from(Serialized::defaults(Config::default()));
            // `DATABASE_URL`, the variable psql, sqlx and most tools read, counts only when
            // neither the file nor `OUTBOX_DATABASE__URL` sets `database.url`.
            let mut database_url_source = None;
            if let Some(url) = &scan.database_url {
                if !sources.contains("database.url") {
                    figment = figment.merge(Serialized::default("database.url", url));
                    database_url_source = Some("environment variable DATABASE_URL".to_string());
                }
            }
            match figment.merge(sources).extract::<Config>() {
                Ok(config) => break (config, database_url_source),
                Err(e) => {
                    let errors: Vec<figment::Error> = e.into_iter().collect();
                    let unknown = errors.iter().find_map(|e| {
                        let key = unknown_key(e)?;
                        candidates
                            .iter()
                            .find(|v| v.key == key && !from_files.iter().any(|f| f.key == key))
                    });
                    match unknown {
                        Some(variable) => from_files.push(variable),
                        None => {
                            return Err(Error::Config(
                                errors
                                    .iter()
                                    .map(describe_figment_error)
                                    .collect::<Vec<_>>()
                                    .join("\n"),
                            ))
                        }
                    }
                }
            }
        };
        warnings.extend(config.database.resolve_password_file()?);
        warnings.extend(config.http.resolve_token_file()?);
        warnings.extend(config.admin.resolve_secret_files()?);
        if config.database.ssl_mode().as_deref() == Some("verify-ca") {
            // sqlx 0.8's verify-ca check does not recognise the name-mismatch error of the
            // rustls it builds with, so the host name is checked as in verify-full.
            warnings.push("database.tls.mode (or sslmode) verify-ca checks the server's host name as well in this build, as verify-full does: connect with a host name the server's certificate lists".into());
        }
        config.database_url_source = database_url_source;
        config.warnings = scan
            .ignored
            .iter()
            .map(|name| {
                format!(
                    "ignoring environment variable {ENV_PREFIX}{}: it is not a configuration key (those are {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}DATABASE__URL); rename or unset it to silence this warning",
                    name.to_ascii_uppercase()
                )
            })
            .chain(warnings)
            .collect();
        config.apply_deprecated_keys();
        config.apply_default_sink();
        config.validate()?;
        Ok(config)
    }

    /// Moves the values of deprecated keys to their replacements (an explicitly set
    /// replacement wins) and records a warning for each.
    pub fn apply_deprecated_keys(&mut self) {
        let default = ClusterConfig::default();
        let mut heartbeats = Vec::new();
        if let Some(secs) = self.relay.heartbeat_interval_secs.take() {
            self.deprecations.push(
                "relay.heartbeat_interval_secs is deprecated: use cluster.heartbeat_ms".into(),
            );
            heartbeats.push(secs.saturating_mul(1000));
        }
        if let Some(ms) = self.ordering.heartbeat_ms.take() {
            self.deprecations
                .push("ordering.heartbeat_ms is deprecated: use cluster.heartbeat_ms".into());
            heartbeats.push(ms);
        }
        if self.cluster.heartbeat_ms == default.heartbeat_ms {
            // Both old loops are one now: it beats as often as the faster of them did.
            if let Some(ms) = heartbeats.into_iter().min() {
                self.cluster.heartbeat_ms = ms;
            }
        }
        if let Some(secs) = self.relay.relay_expiry_secs.take() {
            self.deprecations.push(
                "relay.relay_expiry_secs is deprecated: use cluster.relay_expiry_secs".into(),
            );
            if self.cluster.relay_expiry_secs == default.relay_expiry_secs {
                self.cluster.relay_expiry_secs = secs;
            }
        }
        if let Some(ms) = self.ordering.lease_ms.take() {
            self.deprecations
                .push("ordering.lease_ms is deprecated: use cluster.lease_ms".into());
            if self.cluster.lease_ms == default.lease_ms {
                self.cluster.lease_ms = ms;
            }
        }
    }

    /// With no sink configured, every topic goes to the local NATS as `outbox.<topic>` (or, in
    /// a build without NATS, to the first broker of [`SinkConfig::local_default`]).
    pub fn apply_default_sink(&mut self) {
        if self.sinks.is_empty() {
            if let Some(sink) = SinkConfig::local_default() {
                self.sinks.insert(sink.kind().into(), sink);
            }
        }
    }

    /// Checks every value and answers in sentences a person can act on.
    pub fn validate(&self) -> Result<(), Error> {
        let mut problems = Vec::new();
        let r = &self.relay;
        if !(self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            let source = self
                .database_url_source
                .as_ref()
                .map(|s| format!(" (from {s})"))
                .unwrap_or_default();
            problems.push(format!(
                "database.url{source} must be a postgres:// URL, got {:?}",
                crate::redact::redact_url(&self.database.url)
            ));
        }
        problems.extend(self.database.tls_problems());
        if self.database.max_connections < r.workers + 2 {
            problems.push(format!(
                "database.max_connections is {} but relay.workers = {} needs at least {}: raise it",
                self.database.max_connections,
                r.workers,
                r.workers + 2
            ));
        }
        if !(1..=10_000).contains(&r.batch_size) {
            problems.push(format!(
                "relay.batch_size must be between 1 and 10000, got {}",
                r.batch_size
            ));
        }
        if !(1..=64).contains(&r.workers) {
            problems.push(format!(
                "relay.workers must be between 1 and 64, got {}",
                r.workers
            ));
        }
        if r.idle_poll_ms == 0 || r.poll_interval_ms == 0 {
            problems.push("relay.idle_poll_ms and relay.poll_interval_ms must be above 0".into());
        }
        if r.publish_timeout_secs == 0 {
            problems.push("relay.publish_timeout_secs must be above 0".into());
        }
        if r.claim_timeout_secs <= r.publish_timeout_secs {
            problems.push(format!(
                "relay.claim_timeout_secs ({}) must be greater than relay.publish_timeout_secs ({}), or claims would be aborted while publishing",
                r.claim_timeout_secs, r.publish_timeout_secs
            ));
        }
        if !(1..=1000).contains(&r.max_attempts) {
            problems.push(format!(
                "relay.max_attempts must be between 1 and 1000, got {}",
                r.max_attempts
            ));
        }
        if r.retry_initial_ms == 0 || r.retry_max_secs * 1000 < r.retry_initial_ms {
            problems.push(
                "relay.retry_initial_ms must be above 0 and at most relay.retry_max_secs".into(),
            );
        }
        if r.cleanup_chunk == 0 || r.maintenance_interval_secs == 0 || r.lag_interval_secs == 0 {
            problems.push("relay.cleanup_chunk, relay.maintenance_interval_secs and relay.lag_interval_secs must be above 0".into());
        }
        if !(0.0..=1.0).contains(&r.fault_injection_rate) {
            problems.push(format!(
                "relay.fault_injection_rate (testing only) must be between 0 and 1, got {}",
                r.fault_injection_rate
            ));
        }
        let c = &self.cluster;
        if c.heartbeat_ms == 0 {
            problems.push("cluster.heartbeat_ms must be above 0".to_string());
        }
        if c.lease_ms < 2 * c.heartbeat_ms {
            problems.push(format!(
                "cluster.lease_ms ({}) must be at least twice cluster.heartbeat_ms ({}), or one late heartbeat would drop this relay's slots",
                c.lease_ms, c.heartbeat_ms
            ));
        }
        if c.relay_expiry_secs.saturating_mul(1000) < 2 * c.heartbeat_ms {
            problems.push(format!(
                "cluster.relay_expiry_secs ({}) must be at least twice cluster.heartbeat_ms ({} ms), or live relays would be expired between heartbeats",
                c.relay_expiry_secs, c.heartbeat_ms
            ));
        }
        problems.extend(self.http.problems());
        problems.extend(self.admin.problems(&self.http));
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen must be an address like 127.0.0.1:9187 (or empty to disable), got {:?}",
                self.http.listen
            ));
        }
        for (name, sink) in &self.sinks {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                problems.push(format!(
                    "sinks.{name}: sink names may use letters, digits, '_' and '-' only"
                ));
            }
            if let Err(e) = sink.validate() {
                problems.push(format!("sinks.{name}.{e}"));
            }
        }
        if let Err(e) = crate::routing::Router::new(&self.sinks) {
            problems.push(e);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "invalid configuration:\n  - {}",
                problems.join("\n  - ")
            )))
        }
    }
}

/// The prefix of the environment variables that override keys.
const ENV_PREFIX: &str = "OUTBOX_";

/// What [`scan_env`] found among the environment variables.
#[derive(Debug, Default, PartialEq)]
struct EnvScan {
    /// `OUTBOX_…` variables that look like a key misspelled: each a sentence with the fix.
    errors: Vec<String>,
    /// `OUTBOX_…` names (without the prefix, lowercase) that resemble no key: left out.
    ignored: Vec<String>,
    /// `DATABASE_URL`, when set and not empty.
    database_url: Option<String>,
}

/// Sorts the `OUTBOX_…` variables before figment reads them. A name with `__` is meant as a key
/// (figment reports it if unknown, with the nearest key); one without is a top-level section,
/// a key written with single underscores (an error naming the double-underscore spelling), or
/// something else (ignored).
fn scan_env(vars: impl Iterator<Item = (String, String)>) -> EnvScan {
    let leaves = known_leaves();
    let sections = known_sections();
    let mut scan = EnvScan::default();
    for (var, value) in vars {
        if var == "DATABASE_URL" {
            if !value.is_empty() {
                scan.database_url = Some(value);
            }
            continue;
        }
        if var.len() <= ENV_PREFIX.len()
            || !var.is_char_boundary(ENV_PREFIX.len())
            || !var[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX)
        {
            continue;
        }
        let name = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        if name == "config" || name.contains("__") || sections.contains(&name) {
            continue;
        }
        let to_var = |path: &str| {
            format!(
                "{ENV_PREFIX}{}",
                path.replace('.', "__").to_ascii_uppercase()
            )
        };
        // Single underscores where the levels need two: the key the name flattens to.
        let exact = leaves.iter().find(|p| p.replace('.', "_") == name);
        let near = || {
            leaves
                .iter()
                .map(|p| (edit_distance(&p.replace('.', "_"), &name), p))
                .filter(|(d, p)| *d <= 2 && *d < p.len() / 3)
                .min_by_key(|(d, _)| *d)
                .map(|(_, p)| p)
        };
        if let Some(path) = exact.or_else(near) {
            scan.errors.push(format!(
                "environment variable {var} is not a configuration key: did you mean {}? (a double underscore separates the levels: {ENV_PREFIX}<SECTION>__<KEY>)",
                to_var(path)
            ));
        } else if let Some(rest) = name.strip_prefix("sinks_") {
            let guess = match rest.split_once('_') {
                Some((sink, key)) => format!(
                    "did you mean {ENV_PREFIX}SINKS__{}__{}? ",
                    sink.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                ),
                None => String::new(),
            };
            scan.errors.push(format!(
                "environment variable {var} is not a configuration key: {guess}(a sink's keys are {ENV_PREFIX}SINKS__<NAME>__<KEY>, with double underscores)"
            ));
        } else {
            scan.ignored.push(name);
        }
    }
    scan
}

/// An `OUTBOX_…_FILE` variable: perhaps a key of its own, perhaps the file of another key's value.
#[derive(Debug, Clone, PartialEq)]
struct FileVariable {
    /// The variable's name as set.
    name: String,
    /// The key it names read literally, lowercase: `sinks.nats.token_file`.
    key: String,
    /// The key whose value the file holds: `sinks.nats.token`.
    target: String,
    /// The file.
    path: String,
}

/// The `OUTBOX_<SECTION>__…_FILE` variables (with at least one level separator).
fn file_variables(vars: impl Iterator<Item = (String, String)>) -> Vec<FileVariable> {
    vars.filter_map(|(name, path)| {
        let rest = name.get(ENV_PREFIX.len()..)?;
        if !name[..ENV_PREFIX.len()].eq_ignore_ascii_case(ENV_PREFIX) || !rest.contains("__") {
            return None;
        }
        let key = rest.to_ascii_lowercase().replace("__", ".");
        let target = key.strip_suffix("_file")?.to_string();
        (!target.ends_with('.')).then_some(FileVariable {
            name,
            key,
            target,
            path,
        })
    })
    .collect()
}

/// The dotted key of an "unknown key" error, lowercase.
fn unknown_key(e: &figment::Error) -> Option<String> {
    let figment::error::Kind::UnknownField(found, _) = &e.kind else {
        return None;
    };
    let mut path = e.path.clone();
    if path.last() != Some(found) {
        path.push(found.clone());
    }
    Some(path.join(".").to_ascii_lowercase())
}

/// Reads a secret from the file `path` named by `source` (a key or a variable): the contents
/// without one trailing newline, and a warning when every user of the machine may read the file.
pub fn read_secret_file(source: &str, path: &Path) -> Result<(String, Option<String>), String> {
    let value = crate::redact::read_secret_file(path).map_err(|e| match e {
        SecretFileError::Unreadable(e) => format!(
            "{source} names {}, which cannot be read ({e}): mount the secret there, make it readable by the relay's user, or unset {source}",
            path.display()
        ),
        SecretFileError::Empty => format!(
            "{source} names {}, which is empty: write the secret into it",
            path.display()
        ),
    })?;
    let warning = world_readable_mode(path).map(|mode| {
        format!(
            "{source} names {}, which every user of this machine may read (mode {mode:o}): chmod o-r it (a Kubernetes secret volume: defaultMode 0400 or 0440)",
            path.display()
        )
    });
    Ok((value.expose().to_string(), warning))
}

/// Reads the secret file `file`, set by the key `<key>_file`, into the key `key` (`value`),
/// which must not be set as well; returns a warning about the file, if any.
fn resolve_secret_file(
    key: &str,
    value: &mut Secret,
    file: Option<&Path>,
) -> Result<Option<String>, Error> {
    let Some(path) = file else {
        return Ok(None);
    };
    let variable = format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    );
    if !value.is_empty() {
        return Err(Error::Config(format!(
            "invalid configuration: {key} and {key}_file are both set: keep one ({variable}, {variable}_FILE)"
        )));
    }
    let (secret, warning) = read_secret_file(&format!("{key}_file ({variable}_FILE)"), path)
        .map_err(|e| Error::Config(format!("invalid configuration: {e}")))?;
    *value = Secret::new(secret);
    Ok(warning)
}

/// A query parameter of a URL (the last one of that name), if present.
fn url_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()?
        .query_pairs()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .last()
}

impl DatabaseConfig {
    /// Reads `password_file` into `password`; returns a warning about the file, if any.
    fn resolve_password_file(&mut self) -> Result<Option<String>, Error> {
        resolve_secret_file(
            "database.password",
            &mut self.password,
            self.password_file.as_deref(),
        )
    }

    /// The `sslmode` in effect as far as the configuration says: `tls.mode`, else the URL's
    /// `sslmode`, else `PGSSLMODE` (None: sqlx's default, `prefer`).
    pub fn ssl_mode(&self) -> Option<String> {
        self.tls
            .mode
            .map(|m| m.as_str().to_string())
            .or_else(|| url_param(&self.url, "sslmode"))
            .or_else(|| std::env::var("PGSSLMODE").ok())
    }

    /// The TLS file settings in effect, each with the name of the setting it came from: the
    /// `tls.*` key, else the URL's parameter.
    pub fn tls_files(&self) -> [(&'static str, Option<PathBuf>); 3] {
        let pick = |key: &Option<PathBuf>, key_name: &'static str, param: &'static str| match key {
            Some(path) => (key_name, Some(path.clone())),
            None => (param, url_param(&self.url, param).map(PathBuf::from)),
        };
        [
            pick(&self.tls.ca_file, "database.tls.ca_file", "sslrootcert"),
            pick(&self.tls.cert_file, "database.tls.cert_file", "sslcert"),
            pick(&self.tls.key_file, "database.tls.key_file", "sslkey"),
        ]
    }

    /// What is wrong with the TLS settings: files missing, unreadable, not PEM, a private key
    /// others may read, a certificate without its key.
    fn tls_problems(&self) -> Vec<String> {
        let name = |setting: &str| match setting {
            "sslrootcert" | "sslcert" | "sslkey" => format!("{setting} in database.url"),
            key => format!(
                "{key} ({ENV_PREFIX}{})",
                key.replace('.', "__").to_ascii_uppercase()
            ),
        };
        let [ca, cert, key] = self.tls_files();
        let mut problems = Vec::new();
        let checks = [
            (
                &ca,
                "-----BEGIN CERTIFICATE-----",
                "the PEM file of the CA that signs the server's certificate",
            ),
            (
                &cert,
                "-----BEGIN CERTIFICATE-----",
                "the PEM file of the client certificate",
            ),
            (
                &key,
                "PRIVATE KEY-----",
                "the PEM file of the client certificate's private key",
            ),
        ];
        for ((setting, path), marker, what) in checks {
            let Some(path) = path else { continue };
            match std::fs::read_to_string(path) {
                Err(e) => problems.push(format!(
                    "{} names {}, which cannot be read ({e}): point it at {what}{}",
                    name(setting),
                    path.display(),
                    if path.as_os_str() == "system" {
                        " (the system's trust store is always used: leave it out for that)"
                    } else {
                        ""
                    }
                )),
                Ok(text) if !text.contains(marker) => problems.push(format!(
                    "{} names {}, which is not PEM (no \"{marker}\" line): point it at {what}",
                    name(setting),
                    path.display()
                )),
                Ok(_) => {}
            }
        }
        if let (_, Some(path)) = &key {
            // libpq's rule: a key owned by the relay's user must be private to it (0600); one
            // owned by root may also be readable by its group (0640).
            let too_open = std::fs::metadata(path)
                .ok()
                .and_then(|meta| key_mode_too_open(&meta));
            if let Some((mode, allowed)) = too_open {
                problems.push(format!(
                    "{} names {}, a private key that others may read (mode {mode:o}): chmod {allowed:o} it (PostgreSQL's clients refuse such keys too)",
                    name(key.0),
                    path.display()
                ));
            }
        }
        if cert.1.is_some() != key.1.is_some() {
            let set = if cert.1.is_some() { &cert } else { &key };
            problems.push(format!(
                "{} is set without its pair: a client certificate needs both database.tls.cert_file and database.tls.key_file (or sslcert and sslkey in database.url)",
                name(set.0)
            ));
        }
        problems
    }
}

/// The top-level sections (`database`, `relay`, …), lowercase.
fn known_sections() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Every key of the default configuration as a dotted path (`database.url`, `relay.batch_size`).
fn known_leaves() -> Vec<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&path, v, out);
                }
            }
            _ if !prefix.is_empty() => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(value) = serde_json::to_value(Config::default()) {
        walk("", &value, &mut out);
    }
    out.retain(|p| p != "sinks");
    out
}

/// Levenshtein distance (characters), for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The candidate nearest to `found`, if it is close enough to be a likely misspelling.
fn nearest<'a>(found: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(found, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len().max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `a`, `b` or `c`, each in backticks.
fn one_of(candidates: &[&str]) -> String {
    let quoted: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
    match quoted.as_slice() {
        [] => "nothing".to_string(),
        [only] => only.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn describe_figment_error(e: &figment::Error) -> String {
    use figment::error::Kind;
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment variable"));
    // The path of the offending key; for an unknown key figment may stop at its table.
    let mut path = e.path.clone();
    if let Kind::UnknownField(found, _) = &e.kind {
        if path.last() != Some(found) {
            path.push(found.clone());
        }
    }
    let key = if path.is_empty() {
        String::from("(top level)")
    } else {
        path.join(".")
    };
    let env_var = |path: &[String]| {
        format!(
            "{ENV_PREFIX}{}",
            path.iter()
                .map(|k| k.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join("__")
        )
    };
    let source = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            // Name the exact variable to fix, e.g. OUTBOX_RELAY__BATCH_SIZE.
            _ if from_env && !path.is_empty() => {
                format!(" (from environment variable {})", env_var(&path))
            }
            Some(src) => format!(" (from {} {src})", m.name),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    match &e.kind {
        Kind::UnknownField(found, expected) => {
            let suggestion = match nearest(found, expected) {
                Some(near) if from_env => {
                    let mut fixed = path.clone();
                    if let Some(last) = fixed.last_mut() {
                        *last = near.to_string();
                    }
                    format!("did you mean {}? ", env_var(&fixed))
                }
                Some(near) => format!("did you mean `{near}`? "),
                None => String::new(),
            };
            format!(
                "invalid configuration: unknown key `{key}`{source}: {suggestion}the keys here are {}",
                one_of(expected)
            )
        }
        Kind::UnknownVariant(found, expected) => {
            let suggestion = nearest(found, expected)
                .map(|near| format!(" (did you mean `{near}`?)"))
                .unwrap_or_default();
            format!(
                "invalid configuration: key `{key}`{source}: `{found}` is not a known value{suggestion}: use {}",
                one_of(expected)
            )
        }
        kind => format!("invalid configuration: key `{key}`{source}: {kind}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "nats")]
    fn defaults_are_valid_and_route_everything_to_nats() {
        let mut c = Config::default();
        c.apply_default_sink();
        c.validate().unwrap();
        assert!(c.sinks.contains_key("nats"));
    }

    #[test]
    fn the_http_server_listens_on_loopback_unless_configured() {
        let listen: std::net::SocketAddr = Config::default().http.listen.parse().unwrap();
        assert!(
            listen.ip().is_loopback(),
            "metrics, readiness and status details stay on the machine by default: {listen}"
        );
    }

    #[test]
    fn deprecated_heartbeat_keys_map_to_the_cluster_section_with_a_warning() {
        let mut c = Config::default();
        c.relay.heartbeat_interval_secs = Some(2);
        c.relay.relay_expiry_secs = Some(7);
        c.ordering.heartbeat_ms = Some(200);
        c.ordering.lease_ms = Some(1_000);
        c.apply_deprecated_keys();
        assert_eq!(
            c.cluster,
            ClusterConfig {
                heartbeat_ms: 200,
                lease_ms: 1_000,
                relay_expiry_secs: 7
            }
        );
        assert_eq!(c.deprecations.len(), 4, "{:?}", c.deprecations);
        assert!(c.deprecations[0].contains("use cluster.heartbeat_ms"));

        let mut explicit = Config::default();
        explicit.cluster.heartbeat_ms = 500;
        explicit.ordering.heartbeat_ms = Some(200);
        explicit.apply_deprecated_keys();
        assert_eq!(explicit.cluster.heartbeat_ms, 500, "[cluster] wins");
    }

    #[test]
    fn timeouts_are_checked_against_each_other() {
        let mut c = Config::default();
        c.apply_default_sink();
        c.relay.claim_timeout_secs = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("relay.claim_timeout_secs (5) must be greater"),
            "{e}"
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn env_keys_with_single_underscores_get_the_double_underscore_spelling() {
        let scan = scan_env(vars(&[
            ("OUTBOX_DATABASE_URL", "postgres://x"),
            ("OUTBOX_RELAY_BATCH_SIZE", "10"),
            ("OUTBOX_RELAY_BATCH_SISE", "10"),
            ("OUTBOX_SINKS_NATS_URL", "nats://x"),
        ]));
        assert_eq!(scan.errors.len(), 4, "{:?}", scan.errors);
        assert!(
            scan.errors[0].contains("OUTBOX_DATABASE_URL")
                && scan.errors[0].contains("did you mean OUTBOX_DATABASE__URL?"),
            "{}",
            scan.errors[0]
        );
        assert!(scan.errors[1].contains("did you mean OUTBOX_RELAY__BATCH_SIZE?"));
        assert!(scan.errors[2].contains("did you mean OUTBOX_RELAY__BATCH_SIZE?"));
        assert!(scan.errors[3].contains("did you mean OUTBOX_SINKS__NATS__URL?"));
        assert!(scan.ignored.is_empty());
    }

    #[test]
    fn unrelated_env_variables_are_ignored_and_proper_keys_left_to_figment() {
        let scan = scan_env(vars(&[
            ("OUTBOX_SERVICE_HOST", "10.0.0.1"),
            ("OUTBOX_PORT", "tcp://10.0.0.1:5432"),
            ("OUTBOX_CONFIG", "relay.toml"),
            ("OUTBOX_DATABASE__URL", "postgres://x"),
            ("OUTBOX_DATABSE__URL", "postgres://x"),
            ("PATH", "/usr/bin"),
            ("DATABASE_URL", "postgres://fallback"),
        ]));
        assert!(scan.errors.is_empty(), "{:?}", scan.errors);
        assert_eq!(scan.ignored, vec!["service_host", "port"]);
        assert_eq!(scan.database_url.as_deref(), Some("postgres://fallback"));
        assert_eq!(scan_env(vars(&[("DATABASE_URL", "")])).database_url, None);
    }

    #[test]
    fn unknown_keys_and_values_suggest_the_nearest_without_nested_backticks() {
        let e = figment::Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[relay]\nbatch_sise = 10\n"))
            .extract::<Config>()
            .unwrap_err();
        let msg = describe_figment_error(&e.into_iter().next().unwrap());
        assert!(
            msg.starts_with("invalid configuration: unknown key `relay.batch_sise`"),
            "{msg}"
        );
        assert!(msg.contains("did you mean `batch_size`?"), "{msg}");
        assert!(msg.contains("`batch_size`, `workers`,"), "{msg}");
        assert!(!msg.contains("``") && !msg.contains("`one of"), "{msg}");

        let e = figment::Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[log]\nformat = \"jsno\"\n"))
            .extract::<Config>()
            .unwrap_err();
        let msg = describe_figment_error(&e.into_iter().next().unwrap());
        assert!(
            msg.contains(
                "`jsno` is not a known value (did you mean `json`?): use `text` or `json`"
            ),
            "{msg}"
        );
        assert!(!msg.contains("``"), "{msg}");
    }

    #[test]
    fn file_variables_name_the_key_they_fill() {
        let found = file_variables(vars(&[
            ("OUTBOX_DATABASE__PASSWORD_FILE", "/run/secrets/pg"),
            ("OUTBOX_SINKS__NATS__TOKEN_FILE", "/run/secrets/nats"),
            ("OUTBOX_CONFIG_FILE", "x"),
            ("OUTBOX_DATABASE__URL", "postgres://x"),
            ("OTHER__KEY_FILE", "x"),
        ]));
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].key, "database.password_file");
        assert_eq!(found[0].target, "database.password");
        assert_eq!(found[1].target, "sinks.nats.token");
        assert_eq!(found[1].path, "/run/secrets/nats");
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_and_warn_when_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret \r\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_secret_file("k", &path).unwrap(),
            ("s3cret ".to_string(), None)
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, warning) = read_secret_file("k", &path).unwrap();
        assert!(warning.unwrap().contains("(mode 644): chmod o-r"));
        std::fs::write(&path, "\n").unwrap();
        assert!(read_secret_file("k", &path)
            .unwrap_err()
            .contains("which is empty"));
        let e = read_secret_file("k", &dir.path().join("missing")).unwrap_err();
        assert!(
            e.starts_with("k names ") && e.contains("cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn tls_files_are_checked_and_named_by_the_setting_they_came_from() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let key = dir.path().join("client-key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut db = DatabaseConfig {
            url: format!(
                "postgres://app@db/x?sslmode=verify-full&sslrootcert=/missing/ca.pem&sslkey={}",
                key.display()
            ),
            ..DatabaseConfig::default()
        };
        let problems = db.tls_problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "sslrootcert in database.url names /missing/ca.pem, which cannot be read"
            ),
            "{}",
            problems[0]
        );
        assert!(
            problems[1].contains("a private key that others may read (mode 644)"),
            "{}",
            problems[1]
        );
        assert!(
            problems[2].starts_with("sslkey in database.url is set without its pair"),
            "{}",
            problems[2]
        );

        // The keys win over the URL's parameters.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        db.tls.ca_file = Some(cert.clone());
        db.tls.cert_file = Some(cert.clone());
        assert!(db.tls_problems().is_empty(), "{:?}", db.tls_problems());
        db.tls.ca_file = Some(key.clone());
        let problems = db.tls_problems();
        assert!(
            problems[0].starts_with("database.tls.ca_file (OUTBOX_DATABASE__TLS__CA_FILE) names")
                && problems[0].contains("which is not PEM"),
            "{problems:?}"
        );
    }

    #[test]
    fn database_debug_shows_no_password() {
        let db = DatabaseConfig {
            url: "postgres://app:in-url-pw@db/x".into(),
            password: "key-pw".into(),
            ..DatabaseConfig::default()
        };
        let shown = format!("{db:?}");
        assert!(
            !shown.contains("in-url-pw") && !shown.contains("key-pw"),
            "{shown}"
        );
        assert!(shown.contains("postgres://app:***@db/x"), "{shown}");
    }

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("batch_sise", "batch_size"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("relais", "relay"), 2);
        assert_eq!(
            nearest("relais", &["database", "relay", "http"]),
            Some("relay")
        );
        assert_eq!(nearest("frobnicate", &["database", "relay", "http"]), None);
    }
}
