//! NATS JetStream: [`OwnedNats`], a `nats-server` the caller owns (to stop, kill, freeze and
//! restart); [`NatsConsumer`] and [`read_stream`], readers independent of the relay; the
//! relay's NATS sink config ([`nats_config`], [`relay_config`]); [`NatsTarget`] for the
//! ordering tests. Tests that need no fault use the shared server at [`nats_url`] with unique
//! stream and subject names.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::names::{free_port, unique};
use crate::ordering::{read_until_stopped, Arrival, Arrivals, OrderedTarget, BATCH, POLL};
use crate::wait::{cleanup_on_own_runtime, wait_until};

/// The shared server: `NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
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

/// A relay config: `routes` is the TOML array of NATS routes; the stream (file storage,
/// subjects `<prefix>.>`) is created by the relay. `http_port` 0 disables HTTP.
pub fn relay_config(
    db_url: &str,
    nats_url: &str,
    stream: &str,
    prefix: &str,
    routes: &str,
    relay_extra: &str,
    http_port: u16,
) -> String {
    let listen = if http_port == 0 {
        String::new()
    } else {
        format!("127.0.0.1:{http_port}")
    };
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
{relay_extra}

[http]
listen = "{listen}"

[sinks.nats]
kind = "nats"
url = "{nats_url}"
connect_timeout_secs = 2
stream = {{ name = "{stream}", subjects = ["{prefix}.>"], create = true, storage = "file" }}
routes = {routes}
"#
    )
}

/// A `nats-server` owned by the test, configured by a file: JetStream on file storage in its
/// temporary directory (streams survive restarts), plus `extra` config lines.
pub struct OwnedNats {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    /// The one account's user and password, when the server requires them.
    user: Option<(String, String)>,
}

impl OwnedNats {
    /// Starts a server on a free port with `extra` config lines (e.g. `max_payload: 4096`).
    pub async fn start(extra: &str) -> Self {
        Self::start_server_with(extra, None).await
    }

    /// Starts a server that accepts only `user` with `password` ([`OwnedNats::url_as`]).
    pub async fn start_with_user(user: &str, password: &str) -> Self {
        let auth = format!("authorization {{\n  user: \"{user}\"\n  password: \"{password}\"\n}}");
        Self::start_server_with(&auth, Some((user.into(), password.into()))).await
    }

    async fn start_server_with(extra: &str, user: Option<(String, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n}}\n{extra}\n",
                store.display()
            ),
        )
        .unwrap();
        let mut s = Self {
            child: None,
            port,
            dir,
            conf,
            user,
        };
        s.start_server().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL with `user` and `password` in it.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// A client of the test, as the server's user if it has one (async_nats ignores
    /// credentials in a URL: they go in the connect options).
    pub async fn client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let options = match &self.user {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            None => async_nats::ConnectOptions::new(),
        };
        options.connect(self.url()).await
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("nats-server is running")
    }

    /// Starts the server (again); waits until it accepts connections.
    pub async fn start_server(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        wait_until(
            Duration::from_secs(20),
            "owned nats-server accepts connections",
            || async { self.client().await.is_ok() },
        )
        .await;
    }

    /// SIGTERM (JetStream flushes its store), then waits for the exit; SIGKILL after 15 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL: no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server ([`OwnedNats::stop`]) and starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop();
        self.start_server().await;
    }

    /// Freezes the server: connections stay open, nothing is answered (a network-silent broker).
    pub fn pause(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
    }

    /// A JetStream context on this server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await.expect("connect to the owned NATS"))
    }
}

impl Drop for OwnedNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every message in `stream` as (Nats-Msg-Id, payload), read by a fresh ordered consumer from
/// the first sequence. Independent of the relay.
pub async fn read_stream(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<(String, Vec<u8>)> {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let total = s.info().await.unwrap().state.messages as usize;
    let consumer = s
        .create_consumer(pull::Config {
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::with_capacity(total);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while out.len() < total {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                out.push((id, m.payload.to_vec()));
                let _ = m.ack().await;
            }
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) | Err(_) => panic!(
                "read {} of {total} stored messages before the deadline",
                out.len()
            ),
        }
    }
    out
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

/// Deletes a stream on drop (also when the test panicked): for a stream the relay creates.
pub struct DeleteStreamOnDrop {
    pub url: String,
    pub stream: String,
}

impl Drop for DeleteStreamOnDrop {
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

impl NatsConsumer {
    /// Deletes the test's stream.
    pub async fn delete_stream(&self) {
        let _ = self.context.delete_stream(&self.stream).await;
    }
}

/// JetStream: the stream captures `<prefix>.*` and the route publishes to `<prefix>.<key>`, so
/// the poisoned key (it contains a dot) lands on `<prefix>.poison.pill`, which no stream
/// captures: JetStream answers "no responders" and the sink reports a retriable failure.
pub struct NatsTarget {
    pub url: String,
    pub stream: String,
    pub prefix: String,
}

impl NatsTarget {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            stream: unique("ORD"),
            prefix: unique("ord"),
        }
    }
}

impl OrderedTarget for NatsTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.nats]
kind = "nats"
url = "{url}"
stream = {{ name = "{stream}", subjects = ["{prefix}.*"], create = false }}
routes = [{{ topics = ["*"], subject = "{prefix}.{{key}}" }}]
"#,
            url = self.url,
            stream = self.stream,
            prefix = self.prefix
        )
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let consumer =
            NatsConsumer::new(&self.url, &self.stream, &[format!("{}.*", self.prefix)]).await;
        tokio::spawn(async move {
            let consumer = read_until_stopped(consumer, &sink, &stop, |mut c| async move {
                let got = c.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|r| Arrival {
                    key: r.headers.get("outbox-key").cloned(),
                    message_id: r.msg_id,
                    payload: r.payload,
                });
                (c, got.collect())
            })
            .await;
            consumer.delete_stream().await;
        })
    }

    fn poison_error(&self) -> &'static str {
        // Followed by the subject, which the error names.
        "no JetStream stream captures this subject"
    }

    fn name(&self) -> &'static str {
        "nats"
    }
}
