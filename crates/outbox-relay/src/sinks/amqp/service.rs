//! The AMQP calls: connect and reconnect in the background, declare or check the exchanges,
//! publish a batch on a confirm-mode channel of its own and collect its confirms.
//! No SQL, no metrics, no retry policy here.
//!
//! Each batch in flight has a channel to itself (taken from a pool, returned afterwards):
//! - lapin assigns a delivery tag and queues the frames under two different locks, so two
//!   tasks sending on one channel could put messages on the wire in the other order than their
//!   tags, and confirms would be credited to the wrong messages;
//! - lapin hands a returned message to whichever confirm it resolves next (and a `multiple`
//!   ack resolves many, in no particular order), not necessarily the returned message's own.
//!   With the channel to itself, every confirm resolved while a batch is in flight belongs to
//!   that batch, so the batch credits returned messages by their `message_id` instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use lapin::auth::AuthProvider;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{
    AsyncTcpStream, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    Event, ExchangeKind,
};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::config::{AmqpConfig, AmqpExchange, AmqpTls};
use super::tls::{read_password_file, TlsSetup};
use crate::sinks::SinkError;
use crate::Secret;

/// How often the supervisor looks at the connection state (besides the connection's error
/// events, which arrive at once).
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The connection as the publishers see it.
#[derive(Clone)]
enum Link {
    /// The first connection attempt has not finished yet.
    Starting,
    Up(Arc<Live>),
    Down {
        reason: String,
    },
}

/// An open connection and its idle confirm-mode channels.
pub(super) struct Live {
    connection: Connection,
    idle: std::sync::Mutex<Vec<Channel>>,
    /// Set when a channel failed: the supervisor then reconnects and re-runs the declarations
    /// and checks (a channel is closed by the broker when, say, its exchange was deleted).
    reset: AtomicBool,
}

/// One message ready to send.
pub(super) struct Outgoing<'a> {
    /// The idempotency key, also the message's `message_id` property.
    pub message_id: String,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub payload: &'a [u8],
    pub properties: BasicProperties,
}

/// The broker's answer for one message.
pub(super) enum Ack {
    /// Acked and not returned: a queue has it.
    Confirmed,
    /// Acked, but returned first because no queue was bound for it (`mandatory`).
    Returned {
        reply_code: u16,
        reply_text: String,
    },
    /// The broker refused it (e.g. a queue at its limit with `overflow = reject-publish`).
    Nacked,
    Failed(SinkError),
}

/// A connection supervised by a background task.
pub(super) struct AmqpService {
    link: watch::Receiver<Link>,
    _stop: DropGuard,
}

/// What the supervisor needs to (re)connect.
struct Settings {
    sink: String,
    /// `sinks.<name>.`, the prefix of the keys errors name.
    prefix: String,
    /// The URI handed to lapin, without the password.
    uri: AMQPUri,
    /// The URL without its password, for logs and errors.
    redacted: String,
    login: Login,
    /// `[tls]`, read again on every connection (renewed certificates are picked up); `None`
    /// for `amqp://`.
    tls: Option<AmqpTls>,
    declare: Vec<AmqpExchange>,
    check: Vec<String>,
    connect_timeout: Duration,
    reconnect_initial: Duration,
    reconnect_max: Duration,
}

/// How the relay logs in.
#[derive(Clone)]
enum Login {
    /// SASL PLAIN with a password from the URL or the `password` key.
    Plain { user: String, password: Secret },
    /// SASL PLAIN with the password of `password_file`, read on every connection (a rotated
    /// secret is picked up at the next reconnection).
    PlainFromFile {
        user: String,
        file: std::path::PathBuf,
    },
    /// SASL EXTERNAL: the broker takes the user name from the client certificate.
    External,
}

impl Login {
    /// `properties` with this login's provider for one connection attempt; errors name the
    /// key to fix.
    fn apply(
        &self,
        properties: ConnectionProperties,
        prefix: &str,
    ) -> Result<ConnectionProperties, String> {
        let plain = |user: &str, password: &Secret| PlainAuth {
            response: Secret::new(format!("\0{user}\0{}", password.expose())),
        };
        Ok(match self {
            Login::Plain { user, password } => properties.with_auth_provider(plain(user, password)),
            Login::PlainFromFile { user, file } => {
                let password =
                    read_password_file(file).map_err(|e| format!("{prefix}password_file: {e}"))?;
                properties.with_auth_provider(plain(user, &password))
            }
            Login::External => properties.with_auth_provider(ExternalAuth),
        })
    }

    /// What to say when the broker refused the login.
    fn refused_hint(&self, prefix: &str, uri: &AMQPUri) -> String {
        match self {
            Login::External => format!(
                "the broker refused the EXTERNAL login: the client certificate's subject ({prefix}tls.cert_file; its CN with RabbitMQ's ssl_cert_login_from = common_name) must be an existing RabbitMQ user allowed to use vhost {:?}, and the rabbitmq_auth_mechanism_ssl plugin enabled",
                uri.vhost
            ),
            Login::Plain { user, .. } => format!(
                "the broker refused the login: check the user and password (user {user:?}; the password from {prefix}password or {prefix}url) and that the user may use vhost {:?}",
                uri.vhost
            ),
            Login::PlainFromFile { user, file } => format!(
                "the broker refused the login: check the user and password (user {user:?}; the password in {}, {prefix}password_file) and that the user may use vhost {:?}",
                file.display(),
                uri.vhost
            ),
        }
    }
}

/// SASL PLAIN, so that the password is not part of the URI handed to lapin (which keeps it in
/// structures it may print with `Debug`); only the login frame carries it, and
/// [`super::LOG_DIRECTIVES`] keep lapin's frame dumps out of the logs.
struct PlainAuth {
    response: Secret,
}

impl AuthProvider for PlainAuth {
    fn mechanism(&self) -> ShortString {
        ShortString::from("PLAIN")
    }

    fn auth_starter(&self) -> Result<LongString, String> {
        Ok(LongString::from(self.response.expose().to_string()))
    }
}

/// SASL EXTERNAL: an empty response; the TLS client certificate is the credential.
struct ExternalAuth;

impl AuthProvider for ExternalAuth {}

impl AmqpService {
    /// Starts the supervisor. Never fails because the broker is down: it keeps reconnecting with
    /// backoff, and [`AmqpService::channel`] says whether the sink can publish meanwhile.
    pub fn start(sink: &str, config: &AmqpConfig) -> Result<Self, SinkError> {
        let redacted = crate::redact_url(&config.url);
        let mut uri: AMQPUri = config.url.parse().map_err(|e| {
            SinkError::permanent(
                "config",
                format!("url {redacted:?} is not a valid AMQP URI: {e}"),
            )
        })?;
        let info = &mut uri.authority.userinfo;
        let user = info.username.clone();
        let login = match uri.query.auth_mechanism {
            Some(SASLMechanism::External) => Login::External,
            _ => match &config.password_file {
                Some(file) => Login::PlainFromFile {
                    user,
                    file: file.clone(),
                },
                None if !config.password.is_empty() => Login::Plain {
                    user,
                    password: config.password.clone(),
                },
                None => Login::Plain {
                    user,
                    password: Secret::new(info.password.clone()),
                },
            },
        };
        info.password = "***".into();
        let settings = Settings {
            sink: sink.to_string(),
            prefix: format!("sinks.{sink}."),
            tls: (uri.scheme == AMQPScheme::AMQPS).then(|| config.tls.clone()),
            uri,
            redacted,
            login,
            declare: config.exchanges.clone(),
            check: config
                .undeclared_exchanges()
                .into_iter()
                .map(String::from)
                .collect(),
            connect_timeout: Duration::from_secs(config.connect_timeout_secs),
            reconnect_initial: Duration::from_millis(config.reconnect_initial_ms),
            reconnect_max: Duration::from_secs(config.reconnect_max_secs),
        };
        let (tx, rx) = watch::channel(Link::Starting);
        let stop = CancellationToken::new();
        tokio::spawn(supervise(settings, tx, stop.clone()));
        Ok(Self {
            link: rx,
            _stop: stop.drop_guard(),
        })
    }

    /// Waits (at most `timeout`) until the first connection attempt has finished, so that a
    /// healthy broker is not reported down at start.
    pub async fn wait_first_attempt(&self, timeout: Duration) {
        let mut rx = self.link.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|l| !matches!(l, Link::Starting))).await;
    }

    /// The live connection, or why there is none.
    pub fn live(&self) -> Result<Arc<Live>, SinkError> {
        match &*self.link.borrow() {
            Link::Starting => Err(SinkError::unavailable(
                "disconnected",
                "still connecting to RabbitMQ",
            )),
            Link::Down { reason } => Err(SinkError::unavailable("disconnected", reason.clone())),
            Link::Up(live) => {
                if !live.connection.status().connected() || live.reset.load(Ordering::Acquire) {
                    Err(SinkError::unavailable(
                        "disconnected",
                        "the RabbitMQ connection was lost; reconnecting",
                    ))
                } else if live.connection.status().blocked() {
                    Err(SinkError::unavailable(
                        "blocked",
                        "RabbitMQ blocked publishing (a memory or disk alarm on the broker)",
                    ))
                } else {
                    Ok(Arc::clone(live))
                }
            }
        }
    }
}

impl Live {
    /// An idle channel of this connection, or a new one in confirm mode.
    async fn acquire(&self) -> Result<Channel, SinkError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => break,
            }
        }
        open_confirm_channel(&self.connection).await.map_err(|e| {
            self.reset.store(true, Ordering::Release);
            SinkError::unavailable("connection", e)
        })
    }

    /// Sends every message on a channel of the batch's own, then awaits all confirms: one wait
    /// for the batch, not a round trip per message. A send that fails (connection or channel
    /// lost) fails the rest of the batch the same way.
    pub async fn publish_all(&self, batch: Vec<Outgoing<'_>>, mandatory: bool) -> Vec<Ack> {
        let channel = match self.acquire().await {
            Ok(c) => c,
            Err(e) => return batch.iter().map(|_| Ack::Failed(e.clone())).collect(),
        };
        let options = BasicPublishOptions {
            mandatory,
            immediate: false,
        };
        let mut acks: Vec<Option<Ack>> = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        let mut pending = Vec::with_capacity(batch.len());
        let mut broken: Option<SinkError> = None;
        for (i, msg) in batch.into_iter().enumerate() {
            ids.push(msg.message_id);
            if let Some(e) = &broken {
                acks.push(Some(Ack::Failed(e.clone())));
                continue;
            }
            match channel
                .basic_publish(
                    msg.exchange,
                    msg.routing_key,
                    options,
                    msg.payload,
                    msg.properties,
                )
                .await
            {
                Ok(confirm) => {
                    acks.push(None);
                    pending.push(async move { (i, confirm.await) });
                }
                Err(e) => {
                    let e = SinkError::unavailable(
                        "connection",
                        format!("cannot publish to RabbitMQ: {e}"),
                    );
                    broken = Some(e.clone());
                    acks.push(Some(Ack::Failed(e)));
                }
            }
        }
        // Returned messages, by message_id: lapin may attach one to another message's confirm.
        let mut returned: HashMap<String, (u16, String)> = HashMap::new();
        let mut acked = Vec::with_capacity(pending.len());
        for (i, result) in join_all(pending).await {
            match result {
                Ok(Confirmation::Ack(r)) => {
                    note_returned(&mut returned, r);
                    acked.push((i, true));
                }
                Ok(Confirmation::Nack(r)) => {
                    note_returned(&mut returned, r);
                    acked.push((i, false));
                }
                Ok(Confirmation::NotRequested) => {
                    acks[i] = Some(Ack::Failed(SinkError::unavailable(
                        "internal",
                        "the channel is not in confirm mode; reconnecting",
                    )));
                    broken.get_or_insert_with(|| SinkError::unavailable("internal", ""));
                }
                Err(e) => {
                    acks[i] = Some(Ack::Failed(SinkError::unavailable(
                        "connection",
                        format!("no confirm from RabbitMQ (connection lost?): {e}"),
                    )));
                    broken.get_or_insert_with(|| SinkError::unavailable("connection", ""));
                }
            }
        }
        for (i, ack) in acked {
            acks[i] = Some(match returned.remove(&ids[i]) {
                Some((reply_code, reply_text)) => Ack::Returned {
                    reply_code,
                    reply_text,
                },
                None if ack => Ack::Confirmed,
                None => Ack::Nacked,
            });
        }
        if !returned.is_empty() {
            // A returned message that is none of this batch's: should not happen on a channel of
            // its own; treat the whole batch as unconfirmed rather than guess.
            tracing::error!(
                count = returned.len(),
                "RabbitMQ returned messages this batch did not send; releasing the batch"
            );
            let e = SinkError::unavailable("internal", "returned message not in the batch");
            acks.iter_mut()
                .for_each(|a| *a = Some(Ack::Failed(e.clone())));
            broken = Some(e);
        }
        if broken.is_some() || !channel.status().connected() {
            // Let the supervisor reconnect and re-run the declarations and checks.
            self.reset.store(true, Ordering::Release);
        } else {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(channel);
        }
        acks.into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Ack::Failed(SinkError::unavailable("internal", "no confirm recorded"))
                })
            })
            .collect()
    }
}

/// Connects, holds the connection until it breaks, and reconnects with exponential backoff,
/// until the service is dropped.
async fn supervise(settings: Settings, tx: watch::Sender<Link>, stop: CancellationToken) {
    let sink = settings.sink.as_str();
    let mut delay = settings.reconnect_initial;
    let mut was_up = true;
    loop {
        let attempt = tokio::time::timeout(settings.connect_timeout, connect(&settings));
        let result = tokio::select! {
            r = attempt => r.unwrap_or_else(|_| Err(format!(
                "RabbitMQ at {} did not complete the connection within connect_timeout_secs ({}s)",
                settings.redacted,
                settings.connect_timeout.as_secs()
            ))),
            _ = stop.cancelled() => return,
        };
        match result {
            Ok((connection, channel, mut events)) => {
                tracing::info!(sink, broker = %settings.redacted, "connected to RabbitMQ; channel in confirm mode");
                delay = settings.reconnect_initial;
                was_up = true;
                let live = Arc::new(Live {
                    connection,
                    idle: std::sync::Mutex::new(vec![channel]),
                    reset: AtomicBool::new(false),
                });
                tx.send_replace(Link::Up(Arc::clone(&live)));
                let connection = &live.connection;
                let reason = tokio::select! {
                    reason = watch_link(&live, &mut events) => reason,
                    _ = stop.cancelled() => {
                        let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, ShortString::from("relay stopping"))).await;
                        return;
                    }
                };
                tracing::warn!(sink, broker = %settings.redacted, reason = %reason,
                    "lost the RabbitMQ connection; unconfirmed messages will be published again; reconnecting");
                tx.send_replace(Link::Down { reason });
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    connection.close(200, ShortString::from("reconnecting")),
                )
                .await;
                // Reconnect at once; back off only if that fails.
            }
            Err(reason) => {
                if was_up {
                    tracing::warn!(sink, error = %reason, retry_in_ms = delay.as_millis() as u64,
                        "RabbitMQ unavailable; retrying with backoff");
                } else {
                    tracing::debug!(sink, error = %reason, retry_in_ms = delay.as_millis() as u64, "RabbitMQ still unavailable");
                }
                was_up = false;
                tx.send_replace(Link::Down { reason });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                delay = (delay * 2).min(settings.reconnect_max);
            }
        }
    }
}

type Events = std::pin::Pin<Box<dyn futures::Stream<Item = Event> + Send>>;

/// Opens a connection, declares and checks the exchanges, and opens the publishing channel in
/// confirm mode. Errors are sentences without credentials that name the setting to fix.
async fn connect(s: &Settings) -> Result<(Connection, Channel, Events), String> {
    let failed = |e: String| format!("cannot connect to RabbitMQ at {}: {e}", s.redacted);
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("outbox-relay/{}", s.sink)));
    let properties = s.login.apply(properties, &s.prefix).map_err(failed)?;
    let tls = match &s.tls {
        Some(tls) => Some(
            TlsSetup::new(tls, &s.uri.authority.host)
                .map_err(|e| failed(format!("{}{e}", s.prefix)))?,
        ),
        None => None,
    };
    // The TLS failure, in a sentence, when the handshake is what failed; and whether it
    // succeeded (with TLS 1.3 the broker checks the client certificate after the client
    // finished its part of the handshake, and may then just drop the connection).
    let handshake = Arc::new(std::sync::Mutex::new(None::<String>));
    let tls_up = Arc::new(AtomicBool::new(false));
    let runtime = lapin::runtime::default_runtime().map_err(|e| failed(e.to_string()))?;
    let (tls_in, handshake_in, prefix) = (tls.clone(), Arc::clone(&handshake), s.prefix.clone());
    let tls_up_in = Arc::clone(&tls_up);
    let opened = Connection::connector(
        s.uri.clone(),
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = (uri.authority.host.as_str(), uri.authority.port);
            let addresses: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host(host).await?.collect();
            let stream = AsyncTcpStream::connect(&runtime, addresses).await?;
            let Some(tls) = &tls_in else {
                return Ok(stream);
            };
            let stream = stream
                .into_rustls(&tls.connector, &tls.server_name)
                .await
                .map_err(|e| {
                    let sentence = tls.describe_failure(&e, &prefix);
                    *handshake_in.lock().unwrap_or_else(|p| p.into_inner()) = Some(sentence);
                    lapin::Error::from(e)
                })?;
            tls_up_in.store(true, Ordering::Release);
            Ok(stream)
        },
        properties,
    )
    .await;
    let connection = opened.map_err(|e| {
        if let Some(sentence) = handshake.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return failed(sentence);
        }
        if let (Some(tls), lapin::ErrorKind::IOError(io)) = (&tls, e.kind()) {
            if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                return failed(tls.describe_failure(io, &s.prefix));
            }
            if tls_up.load(Ordering::Acquire) && closed_before_handshake(&e) {
                return failed(tls.describe_drop_after_handshake(&e.to_string(), &s.prefix));
            }
        }
        let text = e.to_string();
        let hint = if text.contains("ACCESS_REFUSED") {
            format!("; {}", s.login.refused_hint(&s.prefix, &s.uri))
        } else if tls.is_none() && closed_before_handshake(&e) {
            format!(
                "; the server closed the connection before the AMQP handshake: if the port is a TLS listener (RabbitMQ's 5671), use amqps:// in {}url",
                s.prefix
            )
        } else {
            String::new()
        };
        failed(format!("{text}{hint}"))
    })?;
    let events: Events = Box::pin(connection.events_listener());
    match setup(&connection, s).await {
        Ok(channel) => Ok((connection, channel, events)),
        Err(e) => {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(200, ShortString::from("setup failed")),
            )
            .await;
            Err(e)
        }
    }
}

async fn setup(connection: &Connection, s: &Settings) -> Result<Channel, String> {
    // Declarations go on their own channel: a failed one closes the channel it ran on.
    let admin = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    for ex in &s.declare {
        let kind = match ex.kind.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_string()),
        };
        let options = ExchangeDeclareOptions {
            durable: ex.durable,
            auto_delete: ex.auto_delete,
            ..Default::default()
        };
        admin
            .exchange_declare(short(&ex.name)?, kind, options, FieldTable::default())
            .await
            .map_err(|e| {
                format!(
                    "cannot declare exchange {:?} (type {}, durable {}): {e}; if it already exists with other settings, make exchanges[] match it",
                    ex.name, ex.kind, ex.durable
                )
            })?;
    }
    for name in &s.check {
        let options = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        admin
            .exchange_declare(short(name)?, ExchangeKind::Direct, options, FieldTable::default())
            .await
            .map_err(|e| {
                format!(
                    "exchange {name:?} is not usable ({e}): create it on the broker, or list it under exchanges so the relay declares it"
                )
            })?;
    }
    let _ = admin.close(200, ShortString::from("setup done")).await;
    open_confirm_channel(connection).await
}

async fn open_confirm_channel(connection: &Connection) -> Result<Channel, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot put the channel in confirm mode: {e}"))?;
    Ok(channel)
}

/// Returns why the link broke: an error event, the connection no longer open, or a publisher
/// that saw a channel fail (so that the declarations and checks run again).
async fn watch_link(live: &Live, events: &mut Events) -> String {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Event::Error(e)) => return format!("RabbitMQ connection error: {e}"),
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(reason = %reason, "RabbitMQ blocked publishing; the sink reports itself unavailable until it unblocks");
                }
                Some(Event::ConnectionUnblocked) => tracing::info!("RabbitMQ unblocked publishing"),
                Some(_) => {}
                None => return "the RabbitMQ connection ended".into(),
            },
            _ = tick.tick() => {
                if !live.connection.status().connected() {
                    return "the RabbitMQ connection is closed".into();
                }
                if live.reset.load(Ordering::Acquire) {
                    return "a publishing channel failed (closed by the broker, or the connection dropped)".into();
                }
            }
        }
    }
}

/// Whether the connection ended before the broker's first AMQP frame: what a TLS listener does
/// with a plaintext client.
fn closed_before_handshake(e: &lapin::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("eof")
        || text.contains("reset")
        || text.contains("closed")
        || text.contains("broken pipe")
        || text.contains("parse")
}

/// Records a returned message under its `message_id`.
fn note_returned(
    returned: &mut HashMap<String, (u16, String)>,
    message: Option<lapin::message::BasicReturnMessage>,
) {
    if let Some(m) = message {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        returned.insert(
            id.unwrap_or_default(),
            (m.reply_code, m.reply_text.to_string()),
        );
    }
}

fn short(value: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|e| format!("{value:?}: {e}"))
}
