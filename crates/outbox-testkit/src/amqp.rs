//! RabbitMQ: [`Topology`], a per-test exchange and queues on a broker through a connection
//! independent of the relay (deleted by [`Topology::delete`], or on drop when a test
//! panicked); [`AmqpConsumer`], which reads a queue and acks what it read, reporting every
//! property the relay set; [`RabbitNode`], a node the caller owns (own node name, AMQP and
//! distribution ports, data and log directories) for broker stop/start tests that must not
//! disturb the shared broker at [`amqp_url`], optionally with a TLS listener, a user of its own
//! and SASL EXTERNAL ([`RabbitOptions`]); the relay's AMQP sink config ([`amqp_config`]);
//! [`AmqpTarget`] for the ordering tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::names::{free_port, unique};
use crate::ordering::{read_until_stopped, Arrival, Arrivals, OrderedTarget, BATCH, POLL};
use crate::tls::CertFiles;
use crate::wait::{cleanup_on_own_runtime, wait_until};

/// The shared broker: `AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A connection and a channel on it, independent of the relay.
pub async fn connect(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ (AMQP_URL)");
    let channel = conn.create_channel().await.expect("open a channel");
    (conn, channel)
}

/// A test's own topic exchange (durable, as the relay declares it) and queues.
pub struct Topology {
    pub url: String,
    pub exchange: String,
    pub queues: Vec<String>,
    conn: Connection,
    channel: Channel,
    deleted: bool,
}

impl Drop for Topology {
    /// A test that panicked before [`Topology::delete`] still removes its queues (with any
    /// messages) and exchange from the shared broker, through an AMQP connection of its own.
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        let (url, exchange, queues) =
            (self.url.clone(), self.exchange.clone(), self.queues.clone());
        cleanup_on_own_runtime(async move {
            let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
                return;
            };
            if let Ok(channel) = conn.create_channel().await {
                delete_all(&channel, &exchange, &queues).await;
            }
            let _ = conn.close(200, "test cleanup".into()).await;
        });
    }
}

async fn delete_all(channel: &Channel, exchange: &str, queues: &[String]) {
    for q in queues {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
}

impl Topology {
    pub async fn new(url: &str, exchange: &str) -> Self {
        let (conn, channel) = connect(url).await;
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the test exchange");
        Self {
            url: url.into(),
            exchange: exchange.into(),
            queues: Vec::new(),
            conn,
            channel,
            deleted: false,
        }
    }

    /// Declares a durable queue bound to the exchange with `binding_key`.
    pub async fn bind_queue(&mut self, queue: &str, binding_key: &str) {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the test queue");
        self.channel
            .queue_bind(
                queue.into(),
                self.exchange.as_str().into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the test queue");
        self.queues.push(queue.into());
    }

    /// Deletes `queue` with the topology (one declared on an earlier connection).
    pub fn adopt_queue(&mut self, queue: &str) {
        self.queues.push(queue.into());
    }

    /// Messages ready in `queue` (not delivered to a consumer).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("inspect the test queue")
            .message_count()
    }

    /// Deletes the queues and the exchange.
    pub async fn delete(mut self) {
        delete_all(&self.channel, &self.exchange, &self.queues).await;
        let _ = self.conn.close(200, "test done".into()).await;
        self.deleted = true;
    }
}

/// One message as the independent consumer saw it.
#[derive(Debug, Clone)]
pub struct AmqpReceived {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
    pub redelivered: bool,
}

/// Consumes one queue on its own connection; acks every message it returns.
pub struct AmqpConsumer {
    conn: Connection,
    consumer: lapin::Consumer,
}

impl AmqpConsumer {
    pub async fn new(url: &str, queue: &str) -> Self {
        let (conn, channel) = connect(url).await;
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = channel
            .basic_consume(
                queue.into(),
                unique("c").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the test queue");
        Self { conn, consumer }
    }

    /// Reads until `n` messages arrived or `timeout` passed; returns what arrived.
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<AmqpReceived> {
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    d.ack(BasicAckOptions::default()).await.expect("ack");
                    let p = &d.properties;
                    let mut headers = BTreeMap::new();
                    if let Some(h) = p.headers() {
                        for (k, v) in h {
                            let text = match v {
                                AMQPValue::LongString(s) => {
                                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                                }
                                AMQPValue::ShortString(s) => s.to_string(),
                                other => format!("{other:?}"),
                            };
                            headers.insert(k.to_string(), text);
                        }
                    }
                    out.push(AmqpReceived {
                        exchange: d.exchange.to_string(),
                        routing_key: d.routing_key.to_string(),
                        message_id: p.message_id().as_ref().map(|s| s.to_string()),
                        content_type: p.content_type().as_ref().map(|s| s.to_string()),
                        delivery_mode: *p.delivery_mode(),
                        timestamp: *p.timestamp(),
                        headers,
                        payload: d.data.clone(),
                        redelivered: d.redelivered,
                    });
                }
                Ok(Some(Err(e))) => panic!("consumer error: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        out
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

/// A relay config file: every topic to `exchange` (declared by the relay, topic type, durable)
/// with routing key `{topic}`; `sink_extra` goes into the sink's table, `relay_extra` into
/// `[relay]`, `extra` at the end.
pub fn amqp_config(
    db_url: &str,
    amqp_url: &str,
    exchange: &str,
    relay_extra: &str,
    sink_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[database]
url = "{db_url}"

[relay]
{relay_extra}

[http]
listen = ""

[sinks.rabbit]
kind = "amqp"
url = "{amqp_url}"
exchanges = [{{ name = "{exchange}", type = "topic", durable = true }}]
routes = [{{ topics = ["*"], exchange = "{exchange}", routing_key = "{{topic}}" }}]
{sink_extra}
{extra}
"#
    )
}

/// A RabbitMQ node owned by the test: its own node name, AMQP port, distribution port, data
/// and log directories, config file (listening on 127.0.0.1 only) and no plugins, so stopping
/// it cannot disturb the shared broker. Stopped (SIGTERM, then SIGKILL) and deleted on drop.
pub struct RabbitNode {
    child: Option<Child>,
    pub port: u16,
    /// The TLS listener's port, when [`RabbitOptions::tls`] asked for one.
    pub tls_port: Option<u16>,
    pub node: String,
    pub dir: tempfile::TempDir,
    dist_port: u16,
    user: (String, String),
}

/// How [`RabbitNode::start_with`] configures a node. The default is what [`RabbitNode::start`]
/// runs: a plaintext listener and the `guest` user.
#[derive(Debug, Clone, Default)]
pub struct RabbitOptions {
    /// A TLS listener beside the plaintext one.
    pub tls: Option<RabbitTls>,
    /// The node's only user (name, password), administrator of vhost `/`, instead of `guest`.
    pub user: Option<(String, String)>,
}

/// The TLS listener of an owned node (`listeners.ssl`, `ssl_options.*`).
#[derive(Debug, Clone)]
pub struct RabbitTls {
    /// The CA the node trusts for client certificates (`ssl_options.cacertfile`).
    pub ca_cert: PathBuf,
    /// The node's certificate and key.
    pub server: CertFiles,
    /// `verify_peer` and `fail_if_no_peer_cert`: every TLS client must show a certificate
    /// signed by `ca_cert`.
    pub require_client_cert: bool,
    /// SASL EXTERNAL (the `rabbitmq_auth_mechanism_ssl` plugin), the user being the client
    /// certificate's common name.
    pub external: bool,
}

impl RabbitNode {
    /// The server script, or `None` (with the reason) when RabbitMQ is not installed here.
    pub fn server_bin() -> Result<String, String> {
        let bin = std::env::var("RABBITMQ_SERVER_BIN")
            .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".into());
        if std::path::Path::new(&bin).exists() {
            Ok(bin)
        } else {
            Err(format!(
                "{bin} not found (set RABBITMQ_SERVER_BIN to the rabbitmq-server script)"
            ))
        }
    }

    pub async fn start() -> Result<Self, String> {
        Self::start_with(RabbitOptions::default()).await
    }

    /// A node configured by `options` (a TLS listener, a user of its own, EXTERNAL).
    pub async fn start_with(options: RabbitOptions) -> Result<Self, String> {
        Self::server_bin()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 3 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let (port, dist_port, tls_port) = (ports[0], ports[1], ports[2]);
        let node = format!("{}@localhost", unique("rabbit_test"));
        let d = dir.path();
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n");
        let mut plugins = Vec::new();
        let user = options
            .user
            .clone()
            .unwrap_or_else(|| ("guest".into(), "guest".into()));
        if options.user.is_some() {
            conf.push_str(&format!(
                "default_user = {}\ndefault_pass = {}\ndefault_vhost = /\ndefault_user_tags.administrator = true\n",
                user.0, user.1
            ));
        }
        if let Some(tls) = &options.tls {
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n",
                tls.ca_cert.display(),
                tls.server.cert.display(),
                tls.server.key.display()
            ));
            if tls.require_client_cert {
                conf.push_str(
                    "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
                );
            } else {
                conf.push_str("ssl_options.verify = verify_none\n");
            }
            if tls.external {
                plugins.push("rabbitmq_auth_mechanism_ssl");
                conf.push_str(
                    "auth_mechanisms.1 = PLAIN\nauth_mechanisms.2 = AMQPLAIN\nauth_mechanisms.3 = EXTERNAL\nssl_cert_login_from = common_name\n",
                );
            }
        }
        std::fs::write(
            d.join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(d.join("rabbitmq.conf"), conf).map_err(|e| e.to_string())?;
        std::fs::write(d.join("rabbitmq-env.conf"), "").map_err(|e| e.to_string())?;
        let mut s = Self {
            child: None,
            port,
            tls_port: options.tls.is_some().then_some(tls_port),
            node,
            dir,
            dist_port,
            user,
        };
        s.restart().await?;
        Ok(s)
    }

    /// The plaintext listener, with the node's user and password.
    pub fn url(&self) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:{}/%2f",
            self.user.0, self.user.1, self.port
        )
    }

    /// `amqps://<user>@127.0.0.1:<tls port>/%2f`: the TLS listener, without a password (the
    /// caller gives it, or logs in with EXTERNAL). Panics without a TLS listener.
    pub fn tls_url(&self) -> String {
        let port = self
            .tls_port
            .expect("the node was started without a TLS listener");
        format!("amqps://{}@127.0.0.1:{port}/%2f", self.user.0)
    }

    /// Stops the node gracefully (SIGTERM to the server script, which stops the Erlang VM) and
    /// waits for it to exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                kill_group(&mut child);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = self.url();
        wait_until(
            Duration::from_secs(30),
            "owned RabbitMQ node refuses connections",
            || {
                let url = url.clone();
                async move {
                    let attempt = tokio::time::timeout(
                        Duration::from_secs(2),
                        Connection::connect(&url, ConnectionProperties::default()),
                    );
                    matches!(attempt.await, Ok(Err(_)))
                }
            },
        )
        .await;
    }

    /// Starts the node (again) with the same name, ports and data; waits until it accepts AMQP
    /// connections (a first boot takes about half a minute on a busy 2-core machine).
    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop().await;
        let d = self.dir.path();
        let bin = Self::server_bin()?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_LOGS", d.join("log").join("node.log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", d.join("plugins-expand"))
            .env("RABBITMQ_PID_FILE", d.join("node.pid"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).map_err(|e| e.to_string())?);
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        self.child = Some(
            cmd.spawn()
                .map_err(|e| format!("cannot start rabbitmq-server: {e}"))?,
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        let url = self.url();
        loop {
            // Bounded: a node still booting can accept the TCP connection and leave the AMQP
            // handshake unanswered.
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            );
            if let Ok(Ok(conn)) = attempt.await {
                let _ = conn.close(200, "ready".into()).await;
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!(
                    "rabbitmq-server exited with {status} while starting; log: {}",
                    self.log_tail()
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the owned RabbitMQ node did not start in 180s; log: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("log").join("node.log"))
            .unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "{}\n{err}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

fn kill_group(child: &mut Child) {
    unsafe {
        libc::killpg(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            kill_group(&mut child);
        }
    }
}

/// RabbitMQ: the relay publishes to the test's topic exchange with routing key `<prefix>.<key>`;
/// one durable queue bound with `<prefix>.*` (one queue keeps each key's order). The poisoned
/// key (it contains a dot) yields `<prefix>.poison.pill`, which the binding does not match:
/// the message is published `mandatory`, RabbitMQ returns it, and the sink reports a retriable
/// `unroutable` failure.
pub struct AmqpTarget {
    pub url: String,
    pub exchange: String,
    pub queue: String,
    pub prefix: String,
}

impl AmqpTarget {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            exchange: unique("ord_ex"),
            queue: unique("ord_q"),
            prefix: unique("ord"),
        }
    }
}

impl OrderedTarget for AmqpTarget {
    fn sink_toml(&self) -> String {
        format!(
            r#"
[sinks.rabbit]
kind = "amqp"
url = "{url}"
exchanges = [{{ name = "{exchange}", type = "topic", durable = true }}]
routes = [{{ topics = ["*"], exchange = "{exchange}", routing_key = "{prefix}.{{key}}" }}]
"#,
            url = self.url,
            exchange = self.exchange,
            prefix = self.prefix
        )
    }

    async fn start_consumer(
        self,
        sink: Arrivals,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let mut topology = Topology::new(&self.url, &self.exchange).await;
        topology
            .bind_queue(&self.queue, &format!("{}.*", self.prefix))
            .await;
        let consumer = AmqpConsumer::new(&self.url, &self.queue).await;
        tokio::spawn(async move {
            let consumer = read_until_stopped(consumer, &sink, &stop, |mut c| async move {
                let got = c.collect(BATCH, POLL).await;
                let got = got.into_iter().map(|r| Arrival {
                    key: r.headers.get("outbox-key").cloned(),
                    message_id: r.message_id.unwrap_or_default(),
                    payload: r.payload,
                });
                (c, got.collect())
            })
            .await;
            consumer.close().await;
            topology.delete().await;
        })
    }

    fn poison_error(&self) -> &'static str {
        "unroutable: no queue bound"
    }

    fn name(&self) -> &'static str {
        "amqp"
    }
}
