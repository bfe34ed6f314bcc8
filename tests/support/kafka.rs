//! Kafka test harness: a `tansu` broker the test owns (free port, own data directory, killed
//! on drop), topic creation, and an rdkafka consumer independent of the relay.
//!
//! tansu is an Apache-Kafka-compatible broker (a single Rust binary), installed by
//! `.ci/kafka-deps.sh`. When it is missing, [`TansuBroker::start`] prints
//! `SKIPPED: tansu not installed (run .ci/kafka-deps.sh)` and returns `None`, unless
//! `REQUIRE_TANSU=1` is set (CI), in which case the test fails.
//!
//! Included by the Kafka tests as `#[path = "support/kafka.rs"] mod kafka_support;` next to
//! `mod support;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::support::{free_port, unique, wait_until};

/// Where the `tansu` binary is: `$TANSU_BIN`, then `PATH`, then `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .find(|p| p.is_file())
        })
        .unwrap_or(None);
    on_path.or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
        p.is_file().then_some(p)
    })
}

/// Storage for a test broker.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Forgets everything when the broker stops.
    Memory,
    /// SQLite file in the broker's own directory: survives a restart.
    Sqlite,
}

/// A tansu broker owned by the test.
pub struct TansuBroker {
    child: Option<Child>,
    bin: PathBuf,
    pub port: u16,
    pub dir: tempfile::TempDir,
    storage: Storage,
}

impl TansuBroker {
    /// Starts a broker on a free port, or returns `None` (after printing why) when tansu is not
    /// installed.
    pub async fn start(storage: Storage) -> Option<Self> {
        let Some(bin) = tansu_bin() else {
            if std::env::var("REQUIRE_TANSU").is_ok_and(|v| v == "1") {
                panic!("tansu not installed but REQUIRE_TANSU=1: run .ci/kafka-deps.sh");
            }
            println!("SKIPPED: tansu not installed (run .ci/kafka-deps.sh)");
            return None;
        };
        let mut b = Self {
            child: None,
            bin,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            storage,
        };
        b.restart().await;
        Some(b)
    }

    /// `127.0.0.1:PORT`, for librdkafka's `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker (again) on the same port and data directory; waits until it answers
    /// Kafka metadata requests.
    pub async fn restart(&mut self) {
        self.kill();
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/".to_string(),
            // Relative to the working directory, which is the broker's own directory.
            Storage::Sqlite => "sqlite://tansu.db".to_string(),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log file");
        let child = Command::new(&self.bin)
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &self.url(),
                "--advertised-listener-url",
                &self.url(),
            ])
            .args(["--storage-engine", &storage])
            .env_remove("CLUSTER_ID")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tansu broker");
        self.child = Some(child);
        let brokers = self.brokers();
        wait_until(
            Duration::from_secs(30),
            "owned tansu broker answers metadata requests",
            || {
                let brokers = brokers.clone();
                async move {
                    tokio::task::spawn_blocking(move || metadata_ok(&brokers))
                        .await
                        .unwrap_or(false)
                }
            },
        )
        .await;
    }

    /// `tansu topic create NAME --partitions N`.
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
        // Wait until the broker's metadata lists every partition.
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
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn metadata_ok(brokers: &str) -> bool {
    let Ok(consumer) = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "1000")
        .create::<rdkafka::consumer::BaseConsumer>()
    else {
        return false;
    };
    consumer
        .fetch_metadata(None, Duration::from_secs(1))
        .is_ok_and(|m| !m.brokers().is_empty())
}

fn partition_count(brokers: &str, topic: &str) -> Option<usize> {
    let consumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create::<rdkafka::consumer::BaseConsumer>()
        .ok()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(2))
        .ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() {
        return None;
    }
    Some(t.partitions().len())
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
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
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
