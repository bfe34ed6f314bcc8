//! Kafka: [`TansuBroker`], a `tansu` broker (an Apache-Kafka-compatible broker in one binary)
//! that the caller owns, on a free port with its own directory, killed on drop; metadata probes;
//! [`KafkaReader`], a consumer independent of the relay; the relay's Kafka sink config
//! ([`kafka_config`]); [`KafkaTarget`] for the ordering tests.
//!
//! SASL: [`TansuBroker::require_scram`] creates a SCRAM user and restarts the broker with
//! `--authentication`; every client of the kit then logs in as that user. tansu 0.6.0 has no
//! TLS listener (its `--cert` and `--key` flags exclude each other and nothing uses the TLS
//! configuration they build), so Kafka over TLS cannot be tested end to end here, and its
//! SASL PLAIN accepts any password (only SCRAM checks it).
//!
//! tansu is installed by `.ci/kafka-deps.sh`. When it is missing, [`TansuBroker::start`] (the
//! tests' entry point) prints `SKIPPED: tansu not installed (run .ci/kafka-deps.sh)` and returns
//! `None`, unless `REQUIRE_TANSU=1` is set (CI), in which case the test fails;
//! [`TansuBroker::launch`] (the benchmark's) returns the reason as an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::names::{free_port, unique};
use crate::ordering::{
    read_until_stopped, Arrival, Arrivals, OrderedTarget, BATCH, POISON_TOPIC, POLL,
};
use crate::wait::wait_until;

/// Where the `tansu` binary is: `$TANSU_BIN`, then `PATH`, then `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
        p.is_file().then_some(p)
    })
}

/// Storage for an owned broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Forgets everything when the broker stops.
    Memory,
    /// SQLite file in the broker's own directory: survives a restart.
    Sqlite,
}

impl Storage {
    /// The `--storage-engine` URL.
    fn engine(self) -> &'static str {
        match self {
            Storage::Memory => "memory://tansu/",
            // Relative to the working directory, which is the broker's own directory.
            Storage::Sqlite => "sqlite://tansu.db",
        }
    }
}

/// A tansu broker owned by the caller.
pub struct TansuBroker {
    child: Option<Child>,
    bin: PathBuf,
    pub port: u16,
    pub dir: tempfile::TempDir,
    storage: Storage,
    die_with_parent: bool,
    /// The SCRAM login every client of the kit uses once [`TansuBroker::require_scram`] ran.
    pub sasl: Option<ScramLogin>,
}

/// A SCRAM user of an owned broker.
#[derive(Debug, Clone)]
pub struct ScramLogin {
    pub user: String,
    pub password: String,
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: &'static str,
}

impl TansuBroker {
    /// Starts a broker on a free port, or returns `None` (after printing why) when tansu is not
    /// installed; panics when it does not come up.
    pub async fn start(storage: Storage) -> Option<Self> {
        if tansu_bin().is_none() {
            if std::env::var("REQUIRE_TANSU").is_ok_and(|v| v == "1") {
                panic!("tansu not installed but REQUIRE_TANSU=1: run .ci/kafka-deps.sh");
            }
            crate::skip::skipped(
                "a Kafka test",
                "tansu is not installed (run .ci/kafka-deps.sh, or scripts/test install)",
            );
            return None;
        }
        Some(
            Self::launch(storage, false)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// Starts a broker on a free port and waits until it answers Kafka metadata requests; the
    /// reason when tansu is not installed, exits or does not answer within 30 s.
    /// `die_with_parent`: see [`crate::relay::die_with_parent`].
    pub async fn launch(storage: Storage, die_with_parent: bool) -> Result<Self, String> {
        let bin = tansu_bin().ok_or_else(|| {
            "tansu not installed (cargo install tansu, or set TANSU_BIN)".to_string()
        })?;
        let mut b = Self {
            child: None,
            bin,
            port: free_port(),
            dir: tempfile::tempdir().map_err(|e| format!("tempdir for tansu: {e}"))?,
            storage,
            die_with_parent,
            sasl: None,
        };
        b.try_restart().await?;
        Ok(b)
    }

    /// Creates `login`'s user (`tansu user create`), then restarts the broker with
    /// `--authentication`: from then on it serves only clients that log in (the kit's clients
    /// use `login`). Needs [`Storage::Sqlite`], where the user survives the restart; create the
    /// topics first (`tansu topic create` does not log in).
    pub async fn require_scram(&mut self, login: ScramLogin) {
        assert_eq!(
            self.storage,
            Storage::Sqlite,
            "users survive a restart only in SQLite"
        );
        let mechanism = match login.mechanism {
            "SCRAM-SHA-256" => "scram256",
            "SCRAM-SHA-512" => "scram512",
            other => panic!("tansu stores SCRAM-SHA-256 and SCRAM-SHA-512 users, not {other}"),
        };
        let out = tokio::process::Command::new(&self.bin)
            .args([
                "user",
                "create",
                "--broker",
                &self.url(),
                "--mechanism",
                mechanism,
            ])
            .args([&login.user, &login.password])
            .output()
            .await
            .expect("run tansu user create");
        assert!(
            out.status.success(),
            "tansu user create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.sasl = Some(login);
        self.restart().await;
    }

    /// librdkafka settings that reach this broker: `bootstrap.servers`, and the SCRAM login
    /// once [`TansuBroker::require_scram`] ran.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers());
        if let Some(login) = &self.sasl {
            c.set("security.protocol", "SASL_PLAINTEXT")
                .set("sasl.mechanism", login.mechanism)
                .set("sasl.username", &login.user)
                .set("sasl.password", &login.password);
        }
        c
    }

    /// `127.0.0.1:PORT`, for librdkafka's `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// `tansu --version`, as it prints it.
    pub fn version(&self) -> String {
        Command::new(&self.bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// SIGKILL: no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker (again) on the same port and data directory; waits until it answers
    /// Kafka metadata requests. Panics when it does not.
    pub async fn restart(&mut self) {
        if let Err(e) = self.try_restart().await {
            panic!("{e}");
        }
    }

    /// [`TansuBroker::restart`], returning why the broker did not come up.
    pub async fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .map_err(|e| format!("tansu log file: {e}"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(self.dir.path())
            .args(["broker", "--listener-url", &self.url()])
            .args(["--advertised-listener-url", &self.url()])
            .args(["--storage-engine", self.storage.engine()]);
        if self.sasl.is_some() {
            cmd.arg("--authentication");
        }
        cmd.env_remove("CLUSTER_ID")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.die_with_parent {
            crate::relay::die_with_parent(&mut cmd);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.answers().await {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "tansu exited while starting ({status}): {}",
                    self.log_tail()
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the owned tansu broker did not answer metadata requests within 30 s: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the broker answers a metadata request now.
    pub async fn answers(&self) -> bool {
        let config = self.client_config();
        tokio::task::spawn_blocking(move || metadata_ok_with(config))
            .await
            .unwrap_or(false)
    }

    /// `tansu topic create NAME --partitions N`; waits until the metadata lists every partition.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let out = tokio::process::Command::new(&self.bin)
            .args([
                "topic",
                "create",
                name,
                "--broker",
                &self.url(),
                "--partitions",
                &partitions.to_string(),
            ])
            .output()
            .await
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let brokers = self.brokers();
        let topic = name.to_string();
        wait_until(
            Duration::from_secs(20),
            "created topic appears in metadata",
            || {
                let (brokers, topic) = (brokers.clone(), topic.clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        partition_count(&brokers, &topic) == Some(partitions as usize)
                    })
                    .await
                    .unwrap_or(false)
                }
            },
        )
        .await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// The last 20 lines of the broker's log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the cluster at `brokers` answers a metadata request with at least one broker.
/// Blocking (librdkafka): call it from `spawn_blocking`.
pub fn metadata_ok(brokers: &str) -> bool {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    metadata_ok_with(config)
}

/// [`metadata_ok`] with the client settings `config` (a login).
pub fn metadata_ok_with(mut config: ClientConfig) -> bool {
    let Ok(consumer) = config
        .set("socket.connection.setup.timeout.ms", "1000")
        .create::<BaseConsumer>()
    else {
        return false;
    };
    consumer
        .fetch_metadata(None, Duration::from_secs(1))
        .is_ok_and(|m| !m.brokers().is_empty())
}

/// The partition count of `topic` in the cluster's metadata, once it lists the topic without
/// error. Blocking (librdkafka): call it from `spawn_blocking`.
pub fn partition_count(brokers: &str, topic: &str) -> Option<usize> {
    let consumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<BaseConsumer>()
        .ok()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(2))
        .ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    t.error().is_none().then(|| t.partitions().len())
}

/// One message as the independent consumer saw it.
#[derive(Debug, Clone)]
pub struct KafkaReceived {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub timestamp_ms: Option<i64>,
}

impl KafkaReceived {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
    pub fn message_id(&self) -> String {
        self.headers
            .get("outbox-message-id")
            .cloned()
            .unwrap_or_default()
    }
}

/// Reads every partition of some topics from the beginning (no consumer group: partitions are
/// assigned explicitly, so nothing depends on group coordination).
pub struct KafkaReader {
    consumer: StreamConsumer,
}

impl KafkaReader {
    /// `topics`: (name, partition count).
    pub fn new(brokers: &str, topics: &[(&str, i32)]) -> Self {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        Self::with_config(config, topics)
    }

    /// [`KafkaReader::new`] with the client settings `config` (brokers, a login).
    pub fn with_config(mut config: ClientConfig, topics: &[(&str, i32)]) -> Self {
        let consumer: StreamConsumer = config
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("create Kafka consumer");
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .expect("partition offset");
            }
        }
        consumer.assign(&tpl).expect("assign partitions");
        Self { consumer }
    }

    /// Reads until `n` messages arrived or `timeout` passed; returns what arrived.
    pub async fn collect(&self, n: usize, timeout: Duration) -> Vec<KafkaReceived> {
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => out.push(KafkaReceived {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| k.to_vec()),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| {
                                    (
                                        h.key.to_string(),
                                        String::from_utf8_lossy(h.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    timestamp_ms: m.timestamp().to_millis(),
                }),
                // Transient consumer errors (e.g. while a broker restarts) are retried.
                Ok(Err(e)) => eprintln!("consumer error (retrying): {e}"),
                Err(_) => break,
            }
        }
        out
    }
}

/// A relay config publishing every topic to Kafka at `brokers`, Kafka topic = `topic_template`.
/// `relay_extra` goes into `[relay]`, `kafka_extra` into the sink's section.
pub fn kafka_config(
    db_url: &str,
    brokers: &str,
    topic_template: &str,
    relay_extra: &str,
    kafka_extra: &str,
) -> String {
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
{relay_extra}

[http]
listen = ""

[sinks.kafka]
kind = "kafka"
brokers = "{brokers}"
routes = [{{ topics = ["*"], topic = "{topic_template}" }}]
{kafka_extra}
"#
    )
}

/// Kafka (a tansu broker the test owns, shared by the target's runs and kept alive until the
/// last consumer stops): [`crate::ordering::TOPIC`] goes to a Kafka topic of `partitions`
/// partitions, the outbox key is the Kafka key (one key, one partition); one reader over every
/// partition.
///
/// Kafka has no retriable per-message refusal: a broker refuses a record for good (too large,
/// invalid record, unknown topic, not authorised) and the sink dead-letters it; retriable
/// conditions (leader moves, replicas, the broker going away) concern a whole partition or
/// broker, are retried inside librdkafka and surface as `unavailable`. So the poisoned key's
/// messages ([`POISON_TOPIC`]) are routed to a Kafka topic that does not exist (tansu does not
/// create topics on demand): the broker reports it unknown and the sink refuses each message as
/// `unknown_topic` without producing it (retriable during the sink's grace period, then
/// permanent).
pub struct KafkaTarget {
    pub broker: Arc<TansuBroker>,
    pub topic: String,
    pub missing_topic: String,
    pub partitions: i32,
}

impl KafkaTarget {
    pub fn new(broker: &Arc<TansuBroker>) -> Self {
        Self {
            broker: Arc::clone(broker),
            topic: unique("ord"),
            missing_topic: unique("missing"),
            partitions: 4,
        }
    }
}

impl OrderedTarget for KafkaTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.kafka]
kind = "kafka"
brokers = "{brokers}"
routes = [
  {{ topics = ["{POISON_TOPIC}"], topic = "{missing}" }},
  {{ topics = ["*"], topic = "{topic}" }},
]
"#,
            brokers = self.broker.brokers(),
            missing = self.missing_topic,
            topic = self.topic
        )
    }

    fn poison_is_retriable(&self) -> bool {
        false
    }

    fn poison_error(&self) -> &'static str {
        // The permanent refusal (the sink's and librdkafka's wording alike), not the retriable
        // one of the grace period.
        "does not exist and the broker does not create it"
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        self.broker.create_topic(&self.topic, self.partitions).await;
        let reader = KafkaReader::new(
            &self.broker.brokers(),
            &[(self.topic.as_str(), self.partitions)],
        );
        tokio::spawn(async move {
            read_until_stopped(reader, &sink, &stop, |r| async move {
                let got = r.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|m| Arrival {
                    // The Kafka key (what partitions), not the header.
                    key: m.key.as_deref().map(|k| String::from_utf8_lossy(k).into()),
                    message_id: m.message_id(),
                    payload: m.payload,
                });
                (r, got.collect())
            })
            .await;
            // In-memory broker: its topics go with it when the last target drops it.
            drop(self.broker);
        })
    }

    fn name(&self) -> &'static str {
        "kafka"
    }
}
