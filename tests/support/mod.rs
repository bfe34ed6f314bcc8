//! Shared test harness: real PostgreSQL and real brokers, each test isolated.
//!
//! - [`TestDb`]: a fresh database per test (`outbox_test_<uuid>`), migrated, dropped on drop.
//! - [`RelayProcess`]: the real `outbox-relay` binary with a per-test config file; SIGKILL,
//!   SIGTERM, exit status, captured stderr.
//! - [`NatsServer`]: a `nats-server -js` the test owns (free port, temporary store), for fault
//!   tests; the shared server at `NATS_URL` (default 127.0.0.1:4222) for the rest, with unique
//!   stream and subject names per test.
//! - [`wait_until`]: polls a condition with a deadline; it fails the test when time runs out.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A short unique name: `prefix_<12 hex chars>`.
pub fn unique(prefix: &str) -> String {
    // The random tail of a UUIDv7 (the head is a timestamp shared by tests started together).
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &id[20..])
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL is a URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// A database of its own, migrated. Dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    admin_url: String,
}

impl TestDb {
    /// A fresh database, migrated.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        outbox_relay::store::migrate(&db.pool).await.unwrap();
        db
    }

    /// A fresh database without the outbox schema (for `outbox-relay migrate` itself).
    pub async fn empty() -> Self {
        let admin_url = database_url();
        let name = unique("outbox_test");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to PostgreSQL (DATABASE_URL)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap();
        Self {
            name,
            url,
            pool,
            admin_url,
        }
    }

    pub async fn waiting(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox.messages")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name, pool) =
            (self.admin_url.clone(), self.name.clone(), self.pool.clone());
        // Drop runs inside the test's runtime; use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Bounded: with a current-thread test runtime (blocked in this drop), a
                // connection still being returned to the pool never is, and close() would wait
                // for ever. DROP DATABASE ... WITH (FORCE) ends any connection left.
                let _ = tokio::time::timeout(Duration::from_secs(5), pool.close()).await;
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn relay_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_outbox-relay"))
}

/// A running `outbox-relay run` with its own config file; killed on drop.
pub struct RelayProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
}

impl RelayProcess {
    /// Starts `outbox-relay run` with `config_toml` as its config file.
    pub fn start(config_toml: &str) -> Self {
        Self::start_with_env(config_toml, &[])
    }

    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, config_toml).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(relay_bin());
        cmd.arg("--config")
            .arg(&config_path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // A RUST_LOG passed in `env` (or set for the test run) wins over this default.
        if std::env::var("RUST_LOG").is_err() && !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "outbox_relay=info,warn");
        }
        let child = cmd.spawn().expect("spawn outbox-relay");
        Self {
            child,
            dir,
            stderr_path,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
    }

    /// Waits for the process to exit, at most `timeout`; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file for a relay on `db_url` publishing every topic to NATS `stream` under
/// `<prefix>.{topic}`. `extra` is appended verbatim (more `[relay]` keys go in `relay_extra`).
pub fn nats_config(
    db_url: &str,
    nats_url: &str,
    stream: &str,
    prefix: &str,
    relay_extra: &str,
) -> String {
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
{relay_extra}

[http]
listen = ""

[sinks.nats]
kind = "nats"
url = "{nats_url}"
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "memory" }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{topic}}" }}]
"#
    )
}

/// A `nats-server -js` owned by the test: its own port and store, killed and deleted on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub store: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut s = Self {
            child: None,
            port,
            store,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again) on the same port and store; waits until it accepts connections.
    pub async fn restart(&mut self) {
        self.stop();
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let url = self.url();
        wait_until(
            Duration::from_secs(20),
            "owned nats-server accepts connections",
            || {
                let url = url.clone();
                async move { async_nats::connect(&url).await.is_ok() }
            },
        )
        .await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A NATS JetStream consumer independent of the relay: reads every message of `stream`.
pub struct NatsConsumer {
    pub messages: async_nats::jetstream::consumer::pull::Stream,
    pub context: async_nats::jetstream::Context,
    pub stream: String,
    url: String,
}

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub subject: String,
    pub msg_id: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

impl NatsConsumer {
    /// Creates the stream (memory storage, `subjects`) if needed and a consumer from the start.
    pub async fn new(nats_url: &str, stream: &str, subjects: &[String]) -> Self {
        use async_nats::jetstream::{consumer::pull, stream::Config, stream::StorageType};
        let client = async_nats::connect(nats_url)
            .await
            .expect("connect to NATS");
        let context = async_nats::jetstream::new(client);
        let s = context
            .get_or_create_stream(Config {
                name: stream.to_string(),
                subjects: subjects.to_vec(),
                storage: StorageType::Memory,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .expect("create stream");
        let consumer = s
            .create_consumer(pull::Config {
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .expect("create consumer");
        let messages = consumer.messages().await.expect("consume");
        Self {
            messages,
            context,
            stream: stream.into(),
            url: nats_url.into(),
        }
    }

    /// Reads until `n` messages arrived or `timeout` passed; returns what arrived.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        use futures::StreamExt;
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.messages.next()).await {
                Ok(Some(Ok(m))) => {
                    let _ = m.ack().await;
                    let mut headers = std::collections::BTreeMap::new();
                    if let Some(h) = &m.headers {
                        for (k, vs) in h.iter() {
                            if let Some(v) = vs.first() {
                                headers.insert(k.to_string(), v.as_str().to_string());
                            }
                        }
                    }
                    out.push(Received {
                        subject: m.subject.to_string(),
                        msg_id: headers.get("Nats-Msg-Id").cloned().unwrap_or_default(),
                        headers,
                        payload: m.payload.to_vec(),
                    });
                }
                Ok(Some(Err(e))) => panic!("consumer error: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    /// Messages stored in the stream (JetStream drops duplicates inside its window).
    pub async fn stored(&self) -> u64 {
        let mut s = self.context.get_stream(&self.stream).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

/// Runs `cleanup` to completion (at most 5 s) on a thread with a runtime of its own: for `Drop`
/// implementations, which may run while the test's runtime is shutting down after a panic.
pub fn cleanup_on_own_runtime<F>(cleanup: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), cleanup).await;
        });
    })
    .join();
}

impl Drop for NatsConsumer {
    /// Deletes the stream, also when the test panicked, through a NATS connection of its own.
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.stream.clone());
        cleanup_on_own_runtime(async move {
            if let Ok(client) = async_nats::connect(&url).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await;
            }
        });
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

impl NatsConsumer {
    /// Deletes the test's stream.
    pub async fn delete_stream(&self) {
        let _ = self.context.delete_stream(&self.stream).await;
    }
}

// Failure-semantics helpers (issue 5): owned PostgreSQL, owned NATS with a config file, HTTP.
pub mod faults;
pub mod pg;
