//! Helpers for the failure-semantics tests: a nats-server with a config file (limits, file
//! storage that survives restarts, graceful stop, SIGSTOP/SIGCONT), a tiny HTTP client for
//! `/readyz` and `/metrics`, relay configs with an HTTP port, and probes of the claim state.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{free_port, wait_until};

/// A `nats-server` owned by the test, configured by a file: JetStream on file storage in its
/// temporary directory (streams survive restarts), plus `extra` config lines.
pub struct OwnedNats {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
}

impl OwnedNats {
    pub async fn start(extra: &str) -> Self {
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
        };
        s.start_server().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("nats-server is running")
    }

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
        async_nats::jetstream::new(
            async_nats::connect(&self.url())
                .await
                .expect("connect to the owned NATS"),
        )
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

/// GET over plain HTTP/1.0; `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
    let mut stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .ok()?
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The sum of the samples of `name` whose labels include every `(label, value)` in `labels`.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes `/metrics` and returns [`metric`]; 0 when the relay does not answer.
pub async fn scrape(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    match http_get(port, "/metrics").await {
        Some((200, body)) => metric(&body, name, labels),
        _ => 0.0,
    }
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

/// Rows of this database's outbox that a new claim could lock right now.
pub async fn claimable(pool: &PgPool) -> i64 {
    let mut tx = pool.begin().await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM outbox.messages FOR UPDATE SKIP LOCKED) s",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    n
}

/// The backend pid of a relay's claim transaction that waits on the broker (`idle in
/// transaction` in database `db`, its claim statement done: it holds the row locks).
pub async fn wait_for_open_claim(pool: &PgPool, db: &str, timeout: Duration) -> i32 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT a.pid FROM pg_stat_activity a
               JOIN pg_locks l ON l.pid = a.pid AND l.relation = 'outbox.messages'::regclass AND l.mode = 'RowShareLock'
              WHERE a.datname = $1 AND a.application_name = 'outbox-relay' AND a.state = 'idle in transaction'
              ORDER BY a.state_change LIMIT 1",
        )
        .bind(db)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no relay claim transaction appeared within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
