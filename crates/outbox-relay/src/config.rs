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
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::error::Error;
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    /// Pool size; the relay needs `relay.workers` + 2.
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: defaults::DATABASE_URL.into(),
            max_connections: 8,
            connect_timeout_secs: 5,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty disables the server.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: defaults::HTTP_LISTEN.into(),
        }
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
        // The file and the `OUTBOX_…` variables, to learn whether they set `database.url`.
        let mut sources = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} does not exist: pass an existing TOML file with --config, or none to use the defaults",
                    path.display()
                )));
            }
            sources = sources.merge(Toml::file_exact(path));
        }
        let ignored = scan.ignored.clone();
        sources = sources.merge(
            Env::prefixed(ENV_PREFIX)
                .split("__")
                .ignore(&["config"])
                .filter(move |key| !ignored.iter().any(|i| key.as_str().eq_ignore_ascii_case(i))),
        );
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        // `DATABASE_URL`, the variable psql, sqlx and most tools read, counts only when neither
        // the file nor `OUTBOX_DATABASE__URL` sets `database.url`.
        let mut database_url_source = None;
        if let Some(url) = &scan.database_url {
            if !sources.contains("database.url") {
                figment = figment.merge(Serialized::default("database.url", url));
                database_url_source = Some("environment variable DATABASE_URL".to_string());
            }
        }
        let mut config: Config = figment.merge(sources).extract().map_err(|e| {
            Error::Config(
                e.into_iter()
                    .map(|e| describe_figment_error(&e))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })?;
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
