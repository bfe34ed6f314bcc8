//! The NATS calls: connect, ensure the stream, publish a batch and collect its acks; and the
//! connection's log (one line per change of state, not one per reconnection attempt).
//! No SQL, no metrics, no retry policy here.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::client::PublishErrorKind as ClientPublishErrorKind;
use async_nats::connection::State;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use async_nats::jetstream::context::{ContextBuilder, GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{Context, ErrorCode};
use async_nats::{ClientError, Event, ServerError, Subject};
use bytes::Bytes;
use futures::StreamExt;

use super::config::{NatsConfig, NatsStreamConfig};
use super::security::{self, split_credentials, Auth, Finding, Probe};
use crate::message::OutboxRow;
use crate::sinks::{standard_headers, SinkError, IDEMPOTENCY_HEADER, KEY_HEADER, TOPIC_HEADER};

/// `error_type` of a publish that no stream captured.
pub(super) const NO_STREAM: &str = "no_stream";

/// While NATS stays unreachable, how often the log says so again (each attempt in between is a
/// debug line): a reminder that an operator reading the last minutes of a log still finds.
const STILL_DOWN_EVERY: Duration = Duration::from_secs(60);

pub(super) struct NatsService {
    client: async_nats::Client,
    js: Context,
    link: Arc<Link>,
    /// How long a batch waits for its acks.
    ack_timeout: Duration,
    /// Whether an existing stream whose limits differ from the configured ones was reported.
    limits_reported: AtomicBool,
}

/// One message ready to send.
pub(super) struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// The broker's answer for one message.
#[derive(Clone)]
pub(super) enum Ack {
    Stored { duplicate: bool },
    Failed(SinkError),
}

impl NatsService {
    /// Connects in the background: a broker that is down at start is not an error here, the
    /// client keeps reconnecting and [`NatsService::is_connected`] says when it is up. Reads the
    /// TLS files (errors name the key); `auth` is the sink's authentication, its secret read.
    pub async fn connect(
        config: &NatsConfig,
        auth: &Auth,
        name: &str,
        ack_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let invalid = |e: String| SinkError::unavailable("config", format!("sinks.{name}.{e}"));
        let timeout = Duration::from_secs(config.connect_timeout_secs);
        let tls = security::tls_client_config(&config.tls).map_err(invalid)?;
        let (address, _) = split_credentials(&config.url);
        let probe = Probe::new(name, &config.url, &config.tls, Arc::clone(&tls), timeout);
        let link = Arc::new(Link::new(name, &config.url, auth.refused_hint(name), probe));
        let events = Arc::clone(&link);
        let options = auth.options().map_err(|e| {
            invalid(format!(
                "credentials_file: not a NATS credentials file ({e}): point it at the user's .creds file"
            ))
        })?;
        let client = options
            .tls_client_config((*tls).clone())
            .require_tls(security::requires_tls(&config.url, &config.tls))
            .name(format!("outbox-relay/{name}"))
            // The relay checks every subject it publishes to (`check_subject`, stricter than the
            // client's check, which would run again per message) and makes its reply subjects.
            .skip_subject_validation(true)
            .event_callback(move |event| {
                let link = Arc::clone(&events);
                async move {
                    let finding = link.diagnose(&event).await;
                    link.on_event(event, finding, Instant::now())
                }
            })
            .connection_timeout(timeout)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(address)
            .await
            .map_err(|e| {
                SinkError::unavailable(
                    "connect",
                    format!("cannot connect to NATS at {}: {e}", link.url),
                )
            })?;
        let js = ContextBuilder::new()
            .timeout(ack_timeout)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            link,
            ack_timeout,
            limits_reported: AtomicBool::new(false),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Why the sink is not connected: the server's URL (redacted) and the last attempt's
    /// failure, as `/readyz`, `status` and the relay's log show it.
    pub fn not_connected(&self) -> SinkError {
        self.link.not_connected()
    }

    /// Checks that the stream exists, creating it (with its limits) when `create` is set. An
    /// existing stream is used as it is: when its limits differ from the configured ones, that
    /// is logged once, and the stream is left alone (another relay or an operator owns it).
    pub async fn ensure_stream(&self, stream: &NatsStreamConfig) -> Result<(), SinkError> {
        let wanted = stream_config(stream);
        match self.js.get_stream(&stream.name).await {
            Ok(existing) => {
                if stream.create {
                    self.report_limits(&wanted, &existing.cached_info().config);
                }
                Ok(())
            }
            Err(e) if !stream_missing(e.kind()) => Err(SinkError::unavailable(
                "stream",
                format!("cannot look up JetStream stream {:?}: {e}", stream.name),
            )),
            Err(_) if !stream.create => Err(SinkError::unavailable(
                "stream",
                format!(
                    "JetStream stream {:?} does not exist: create it, or set stream.create = true",
                    stream.name
                ),
            )),
            Err(_) => {
                // `get_or_create`: another relay may create it between the look-up and here.
                let created = self.js.get_or_create_stream(wanted.clone()).await;
                let created = created.map_err(|e| {
                    SinkError::unavailable(
                        "stream",
                        format!("cannot create JetStream stream {:?}: {e}", stream.name),
                    )
                })?;
                let config = &created.cached_info().config;
                tracing::info!(
                    sink = %self.link.sink,
                    stream = %config.name,
                    subjects = ?config.subjects,
                    storage = %stream.storage,
                    max_age_secs = config.max_age.as_secs(),
                    max_bytes = config.max_bytes,
                    max_msgs = config.max_messages,
                    duplicate_window_secs = config.duplicate_window.as_secs(),
                    "created the JetStream stream"
                );
                self.report_limits(&wanted, config);
                Ok(())
            }
        }
    }

    /// Logs once when an existing stream's limits are not the configured ones.
    fn report_limits(&self, wanted: &StreamConfig, existing: &StreamConfig) {
        let differences = limit_differences(wanted, existing);
        if differences.is_empty() || self.limits_reported.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            sink = %self.link.sink,
            stream = %existing.name,
            differences = %differences.join(", "),
            "the existing JetStream stream has other limits than configured; the relay does not \
             change an existing stream: edit the stream on the server (nats stream edit), or \
             make stream.max_age_secs / max_bytes / max_msgs match it"
        );
    }

    /// Whether JetStream answers for the stream (an info request, bounded by the ack timeout).
    pub async fn stream_reachable(&self, name: &str) -> Result<(), SinkError> {
        self.js.get_stream(name).await.map(|_| ()).map_err(|e| {
            SinkError::unavailable("stream", format!("stream {name:?} is not reachable: {e}"))
        })
    }

    /// Sends every message, then awaits all acks: one round trip for the batch, not per message.
    ///
    /// Each message goes out as a plain publish with a reply subject of the batch's own inbox
    /// (`<inbox>.<index>`), and one subscription on `<inbox>.*` collects the acks: JetStream
    /// answers a publish that carries a reply subject on that subject, whoever sent it. This is
    /// what the JetStream context's `send_publish` does per message, without its per-message
    /// inbox, response registration, ack-permit and timer, and the boxed future around each ack:
    /// half the relay's CPU per message went there (docs/benchmarks.md, "CPU per message").
    /// The subscription is made before the first publish, on the same connection, so the server
    /// knows it before any ack can come.
    pub async fn publish_all(&self, batch: Vec<Outgoing>) -> Vec<Ack> {
        let n = batch.len();
        let mut acks: Vec<Option<Ack>> = (0..n).map(|_| None).collect();
        let inbox = self.client.new_inbox();
        let mut replies = match self.client.subscribe(format!("{inbox}.*")).await {
            Ok(s) => s,
            Err(e) => {
                let e = SinkError::unavailable(
                    "timeout",
                    format!("cannot subscribe to the acknowledgements: {e}"),
                );
                return vec![Ack::Failed(e); n];
            }
        };
        let mut awaited = 0usize;
        // Kept for the error messages; a `Subject` shares its bytes, so the clone is a count.
        let mut subjects = Vec::with_capacity(n);
        for (i, msg) in batch.into_iter().enumerate() {
            let subject = Subject::from(msg.subject);
            subjects.push(subject.clone());
            let sent = self
                .client
                .publish_with_reply_and_headers(
                    subject,
                    Subject::from(reply_subject(&inbox, i)),
                    msg.headers,
                    msg.payload,
                )
                .await;
            match sent {
                Ok(()) => awaited += 1,
                Err(e) => acks[i] = Some(Ack::Failed(refused(e.kind(), &e))),
            }
        }
        let deadline = tokio::time::Instant::now() + self.ack_timeout;
        while awaited > 0 {
            let next = tokio::time::timeout_at(deadline, replies.next()).await;
            let Ok(Some(message)) = next else { break };
            let index = message
                .subject
                .rsplit('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = index.filter(|&i| i < n) {
                if acks[i].is_none() {
                    acks[i] = Some(read_ack(&message, &subjects[i]));
                    awaited -= 1;
                }
            }
        }
        drop(replies);
        acks.into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Ack::Failed(SinkError::unavailable(
                        "timeout",
                        format!(
                            "no acknowledgement from NATS within {}s",
                            self.ack_timeout.as_secs()
                        ),
                    ))
                })
            })
            .collect()
    }
}

/// `<inbox>.<i>`, the reply subject of the batch's message `i`.
fn reply_subject(inbox: &str, i: usize) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(i);
    let mut subject = String::with_capacity(inbox.len() + 1 + digits.len());
    subject.push_str(inbox);
    subject.push('.');
    subject.push_str(digits);
    subject
}

/// The name JetStream deduplicates on, and the standard headers' names, built once.
const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
const IDEMPOTENCY: HeaderName = HeaderName::from_static(IDEMPOTENCY_HEADER);
const TOPIC: HeaderName = HeaderName::from_static(TOPIC_HEADER);
const KEY: HeaderName = HeaderName::from_static(KEY_HEADER);

/// A message's NATS headers: the row's own, then the standard headers (which win over a row
/// header of the same name), and `Nats-Msg-Id`, the message id JetStream deduplicates on. A row
/// header NATS cannot carry is the row's fault: a permanent failure that names it.
pub(super) fn build_headers(row: &OutboxRow) -> Result<HeaderMap, SinkError> {
    let mut map = HeaderMap::new();
    for (name, value) in &row.headers {
        if name.is_empty() {
            return Err(SinkError::permanent(
                "invalid_header",
                "header name \"\" is not valid for NATS: a header needs a name",
            ));
        }
        let n = HeaderName::from_str(name).map_err(|e| {
            SinkError::permanent(
                "invalid_header",
                format!("header name {name:?} is not valid for NATS: {e}"),
            )
        })?;
        map.insert(n, header_value(name, value)?);
    }
    for (name, value) in standard_headers(row) {
        let n = match name {
            IDEMPOTENCY_HEADER => IDEMPOTENCY,
            TOPIC_HEADER => TOPIC,
            KEY_HEADER => KEY,
            other => HeaderName::from_static(other),
        };
        map.insert(n, header_value(name, value)?);
    }
    map.insert(MSG_ID, header_value("Nats-Msg-Id", &row.message_id)?);
    Ok(map)
}

fn header_value(name: &str, value: &str) -> Result<HeaderValue, SinkError> {
    HeaderValue::from_str(value).map_err(|e| {
        SinkError::permanent(
            "invalid_header",
            format!("header {name:?} has a value NATS cannot carry: {e}"),
        )
    })
}

/// A publish the client refused before sending it.
fn refused(kind: ClientPublishErrorKind, e: &dyn std::fmt::Display) -> SinkError {
    match kind {
        ClientPublishErrorKind::MaxPayloadExceeded => SinkError::permanent(
            "too_large",
            format!("message is larger than the NATS server's max_payload: {e}"),
        ),
        ClientPublishErrorKind::InvalidSubject => SinkError::permanent(
            "invalid_subject",
            format!("the subject is not a valid NATS subject: {e}"),
        ),
        _ => SinkError::unavailable(
            "timeout",
            format!("cannot send to NATS (connection closed): {e}"),
        ),
    }
}

/// JetStream's answer to one publish: `{"stream":…,"seq":…[,"duplicate":true]}`, an API error
/// `{"error":{"code":…,"err_code":…,"description":…}}`, or the server's "no responders" status
/// when no stream captures the subject.
fn read_ack(message: &async_nats::Message, subject: &str) -> Ack {
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Ack::Failed(classify(
            PublishErrorKind::StreamNotFound,
            subject,
            "no responders",
        ));
    }
    let payload: &[u8] = &message.payload;
    // The common answer, `{"stream":"…","seq":…}`, is read without a JSON parse; anything else
    // is parsed: an error, or `"duplicate": true` (the server writes it with a space) for a
    // message id seen within the duplicate window.
    if payload.starts_with(b"{\"stream\":")
        && !contains(payload, b"\"error\"")
        && !contains(payload, b"\"duplicate\"")
    {
        return Ack::Stored { duplicate: false };
    }
    match serde_json::from_slice::<AckBody<'_>>(payload) {
        Ok(AckBody {
            error: None,
            stream: Some(_),
            duplicate,
        }) => Ack::Stored { duplicate },
        Ok(AckBody {
            error: Some(error), ..
        }) => {
            let kind = match ErrorCode(error.err_code.unwrap_or(0)) {
                ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => PublishErrorKind::WrongLastMessageId,
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE => PublishErrorKind::WrongLastSequence,
                _ => PublishErrorKind::Other,
            };
            let text = format!(
                "{} (code {}, error code {})",
                error.description.as_deref().unwrap_or("no description"),
                error.code,
                error.err_code.unwrap_or(0)
            );
            Ack::Failed(classify(kind, subject, &text))
        }
        _ => Ack::Failed(classify(
            PublishErrorKind::Other,
            subject,
            &format!(
                "unreadable acknowledgement {:?}",
                String::from_utf8_lossy(&message.payload)
            ),
        )),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[derive(serde::Deserialize)]
struct AckBody<'a> {
    #[serde(borrow, default)]
    stream: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: Option<u64>,
    #[serde(default)]
    description: Option<String>,
}

fn classify(kind: PublishErrorKind, subject: &str, text: &str) -> SinkError {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => SinkError::permanent(
            "too_large",
            format!("message is larger than the NATS server's max_payload: {text}"),
        ),
        PublishErrorKind::StreamNotFound => SinkError::retriable(
            NO_STREAM,
            format!("no JetStream stream captures this subject ({subject:?}): {text}"),
        ),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => {
            SinkError::unavailable("timeout", format!("no acknowledgement from NATS: {text}"))
        }
        _ if text.contains("maximum") || text.contains("exceeds") => SinkError::permanent(
            "too_large",
            format!("JetStream rejected the message: {text}"),
        ),
        _ => SinkError::retriable(
            "rejected",
            format!("JetStream rejected the message to {subject:?}: {text}"),
        ),
    }
}

/// The stream the relay creates: the configured subjects, storage, duplicate window and limits
/// (0 in the configuration is "no limit", which JetStream spells -1 for sizes and counts).
pub fn stream_config(stream: &NatsStreamConfig) -> StreamConfig {
    let unlimited_if_zero = |n: u64| {
        if n == 0 {
            -1
        } else {
            i64::try_from(n).unwrap_or(i64::MAX)
        }
    };
    StreamConfig {
        name: stream.name.clone(),
        subjects: stream.subjects.clone(),
        duplicate_window: Duration::from_secs(stream.duplicate_window_secs),
        storage: if stream.storage == "memory" {
            StorageType::Memory
        } else {
            StorageType::File
        },
        max_age: Duration::from_secs(stream.max_age_secs),
        max_bytes: unlimited_if_zero(stream.max_bytes),
        max_messages: unlimited_if_zero(stream.max_msgs),
        ..Default::default()
    }
}

/// The limits in which `existing` differs from `wanted`, as `key: existing (configured …)`.
fn limit_differences(wanted: &StreamConfig, existing: &StreamConfig) -> Vec<String> {
    let count = |n: i64| {
        if n <= 0 {
            "none".to_string()
        } else {
            n.to_string()
        }
    };
    let age = |d: Duration| {
        if d.is_zero() {
            "none".to_string()
        } else {
            d.as_secs().to_string()
        }
    };
    let mut out = Vec::new();
    let mut differ = |key: &str, existing: String, wanted: String| {
        if existing != wanted {
            out.push(format!("{key}: {existing} (configured {wanted})"));
        }
    };
    differ("max_age_secs", age(existing.max_age), age(wanted.max_age));
    differ(
        "max_bytes",
        count(existing.max_bytes),
        count(wanted.max_bytes),
    );
    differ(
        "max_msgs",
        count(existing.max_messages),
        count(wanted.max_messages),
    );
    out
}

fn stream_missing(kind: GetStreamErrorKind) -> bool {
    matches!(kind, GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// The connection as the log and the health check report it. async_nats reports every change
/// and every failed attempt as an [`Event`]; the library's own lines are filtered out (see
/// `LOG_DIRECTIVES`), because they repeat once per attempt, up to several a second, without the
/// server's address.
pub(super) struct Link {
    sink: String,
    /// The server's URL with its credentials redacted.
    url: String,
    /// What to check when the server refuses the credentials (names the sink's keys).
    refused_hint: String,
    state: Mutex<LinkState>,
    /// Diagnoses a failed attempt ([`Probe`]); `None` for a URL without a host.
    probe: Option<Probe>,
    /// The last diagnosis and when it ran: attempts come several a second at first, and one
    /// probe says the same for all of them.
    last_finding: Mutex<Option<(Instant, Option<Finding>)>>,
}

/// How long a diagnosis stands for the attempts that fail after it.
const FINDING_FRESH_FOR: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct LinkState {
    connected: bool,
    ever_connected: bool,
    /// Why the last connection attempt failed.
    cause: Option<Cause>,
    /// Since when the connection is down, and how many attempts failed since.
    down_since: Option<Instant>,
    failed_attempts: u64,
    /// When the log last said the connection is down (a warning).
    warned_at: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq)]
enum Cause {
    /// The server refused the credentials.
    Authorization,
    /// The TLS handshake failed, or TLS is required on one side and missing on the other.
    Tls(String),
    Other(String),
}

/// What the log says about one event.
#[derive(Debug, PartialEq)]
enum Note {
    Info(String),
    Warn(String),
    Debug(String),
    Nothing,
}

impl Link {
    fn new(sink: &str, url: &str, refused_hint: String, probe: Option<Probe>) -> Self {
        Self {
            sink: sink.to_owned(),
            url: crate::redact_url(url),
            refused_hint,
            state: Mutex::new(LinkState::default()),
            probe,
            last_finding: Mutex::new(None),
        }
    }

    /// The cause of a failed connection attempt, when async-nats's event names only the kind
    /// of error ("IO error", "TLS error"): a fresh diagnosis, or the last one if it is recent.
    async fn diagnose(&self, event: &Event) -> Option<Finding> {
        let Event::ClientError(ClientError::Other(e)) = event else {
            return None;
        };
        if e.contains("authorization violation") {
            return None;
        }
        let probe = self.probe.as_ref()?;
        let now = Instant::now();
        if let Some((at, finding)) = &*self.last_finding.lock().unwrap_or_else(|e| e.into_inner()) {
            if now.duration_since(*at) < FINDING_FRESH_FOR {
                return finding.clone();
            }
        }
        let finding = probe.diagnose().await;
        *self.last_finding.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), finding.clone()));
        finding
    }

    fn on_event(&self, event: Event, finding: Option<Finding>, now: Instant) {
        let note = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.note(event, finding, now, &self.url, &self.refused_hint)
        };
        let sink = self.sink.as_str();
        match note {
            Note::Info(message) => tracing::info!(sink, "{message}"),
            Note::Warn(message) => tracing::warn!(sink, "{message}"),
            Note::Debug(message) => tracing::debug!(sink, "{message}"),
            Note::Nothing => {}
        }
    }

    fn not_connected(&self) -> SinkError {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &state.cause {
            Some(Cause::Authorization) => SinkError::unavailable(
                "auth",
                format!(
                    "not connected to NATS at {}: {}",
                    self.url,
                    authorization_refused(&self.refused_hint)
                ),
            ),
            Some(Cause::Tls(e)) => {
                SinkError::unavailable("tls", format!("not connected to NATS at {}: {e}", self.url))
            }
            Some(Cause::Other(e)) => SinkError::unavailable(
                "disconnected",
                format!("not connected to NATS at {}: {e}", self.url),
            ),
            None => SinkError::unavailable(
                "disconnected",
                format!(
                    "not connected to NATS at {} (connecting; no attempt has failed yet)",
                    self.url
                ),
            ),
        }
    }
}

fn authorization_refused(hint: &str) -> String {
    format!("the server refused the credentials (authorization violation); {hint}")
}

impl LinkState {
    fn note(
        &mut self,
        event: Event,
        finding: Option<Finding>,
        now: Instant,
        url: &str,
        refused_hint: &str,
    ) -> Note {
        match event {
            Event::Connected => {
                let note = match (self.ever_connected, self.down_since) {
                    (false, _) => Note::Info(format!("connected to NATS at {url}")),
                    (true, Some(since)) => Note::Info(format!(
                        "connected to NATS at {url} again after {}s ({} failed attempts)",
                        now.duration_since(since).as_secs(),
                        self.failed_attempts
                    )),
                    (true, None) => Note::Info(format!("connected to NATS at {url} again")),
                };
                *self = LinkState {
                    connected: true,
                    ever_connected: true,
                    ..LinkState::default()
                };
                note
            }
            Event::Disconnected => {
                if !self.connected {
                    return Note::Nothing;
                }
                self.connected = false;
                self.down_since = Some(now);
                self.warned_at = Some(now);
                self.cause = Some(Cause::Other("the connection was lost".into()));
                Note::Warn(format!(
                    "lost the connection to NATS at {url}; reconnecting (messages whose \
                     acknowledgement did not come are published again)"
                ))
            }
            Event::ClientError(ClientError::Other(e)) => {
                let cause = if e.contains("authorization violation") {
                    Cause::Authorization
                } else {
                    match finding {
                        Some(Finding { tls: true, text }) => Cause::Tls(text),
                        Some(Finding { tls: false, text }) => Cause::Other(text),
                        None => Cause::Other(e),
                    }
                };
                let text = match &cause {
                    Cause::Authorization => format!(
                        "cannot connect to NATS at {url}: {}",
                        authorization_refused(refused_hint)
                    ),
                    Cause::Tls(e) | Cause::Other(e) => {
                        format!("cannot connect to NATS at {url}: {e}")
                    }
                };
                // A change of kind (unreachable → credentials refused) is news; another attempt
                // failing the same way is not.
                let first = match &self.cause {
                    Some(previous) => {
                        std::mem::discriminant(previous) != std::mem::discriminant(&cause)
                    }
                    None => self.warned_at.is_none(),
                };
                self.connected = false;
                self.down_since.get_or_insert(now);
                self.failed_attempts += 1;
                self.cause = Some(cause);
                let due = self
                    .warned_at
                    .is_some_and(|at| now.duration_since(at) >= STILL_DOWN_EVERY);
                if first || due {
                    self.warned_at = Some(now);
                    let since = self
                        .down_since
                        .map_or(0, |d| now.duration_since(d).as_secs());
                    if first {
                        Note::Warn(format!("{text}; retrying with backoff"))
                    } else {
                        Note::Warn(format!(
                            "{text}; still retrying (down for {since}s, {} failed attempts)",
                            self.failed_attempts
                        ))
                    }
                } else {
                    Note::Debug(format!(
                        "NATS connection attempt {} failed: {text}",
                        self.failed_attempts
                    ))
                }
            }
            Event::ClientError(e) => Note::Warn(format!("NATS client at {url}: {e}")),
            Event::ServerError(ServerError::AuthorizationViolation) => Note::Warn(format!(
                "NATS at {url} answered \"authorization violation\": the sink's user may not \
                 publish to a subject or use JetStream; check its permissions on the server"
            )),
            Event::ServerError(e) => Note::Warn(format!("NATS at {url} reported an error: {e}")),
            Event::LameDuckMode => Note::Warn(format!(
                "NATS at {url} is shutting down (lame duck mode); the client reconnects"
            )),
            Event::Closed => Note::Info(format!("connection to NATS at {url} closed")),
            Event::Draining | Event::SlowConsumer(_) => Note::Debug(format!("NATS: {event}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "nats://relay:***@127.0.0.1:4222";
    const HINT: &str = "check the user and password in sinks.events.url";

    fn io_error() -> Event {
        Event::ClientError(ClientError::Other("IO error".into()))
    }

    fn is_warn(n: &Note) -> bool {
        matches!(n, Note::Warn(_))
    }

    fn answer(payload: &'static str, status: Option<async_nats::StatusCode>) -> Ack {
        let message = async_nats::Message {
            subject: Subject::from_static("_INBOX.x.0"),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        };
        read_ack(&message, "orders.created")
    }

    /// The answers nats-server 2.9 writes: a plain ack, a duplicate (with a space before
    /// `true`), an API error, and "no responders" when no stream captures the subject.
    #[test]
    fn jetstream_answers_are_read_as_the_server_writes_them() {
        let stored = |a: Ack| match a {
            Ack::Stored { duplicate } => Some(duplicate),
            Ack::Failed(_) => None,
        };
        assert_eq!(
            stored(answer(r#"{"stream":"S","seq":7}"#, None)),
            Some(false)
        );
        assert_eq!(
            stored(answer(r#"{"stream":"S","domain":"d","seq":7}"#, None)),
            Some(false)
        );
        assert_eq!(
            stored(answer(r#"{"stream":"S","seq":7,"duplicate": true}"#, None)),
            Some(true)
        );
        assert_eq!(
            stored(answer(r#"{"stream":"S","seq":7,"duplicate":true}"#, None)),
            Some(true)
        );
        let Ack::Failed(e) = answer(
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            None,
        ) else {
            panic!("an API error is a failure");
        };
        assert!(e.to_string().contains("maximum messages exceeded"), "{e}");
        let Ack::Failed(e) = answer("", Some(async_nats::StatusCode::NO_RESPONDERS)) else {
            panic!("no responders is a failure");
        };
        assert_eq!(e.error_type, NO_STREAM);
        assert!(e.to_string().contains("orders.created"), "{e}");
        let Ack::Failed(e) = answer("not json", None) else {
            panic!("an unreadable answer is a failure");
        };
        assert!(e.to_string().contains("unreadable"), "{e}");
    }

    #[test]
    fn one_warning_per_change_of_state_and_a_reminder_a_minute() {
        let t0 = Instant::now();
        let mut s = LinkState::default();
        // Down at start: the first failure warns, the next attempts are debug lines.
        let first = s.note(io_error(), None, t0, URL, HINT);
        assert!(matches!(&first, Note::Warn(m) if m.contains(URL) && m.contains("IO error")));
        for i in 1..50 {
            let n = s.note(
                io_error(),
                None,
                t0 + Duration::from_millis(i * 100),
                URL,
                HINT,
            );
            assert!(matches!(n, Note::Debug(_)), "{n:?}");
        }
        // A minute later: one reminder, with how long and how many.
        let n = s.note(io_error(), None, t0 + STILL_DOWN_EVERY, URL, HINT);
        assert!(
            matches!(&n, Note::Warn(m) if m.contains("down for 60s")),
            "{n:?}"
        );
        assert!(!is_warn(&s.note(
            io_error(),
            None,
            t0 + STILL_DOWN_EVERY + Duration::from_secs(1),
            URL,
            HINT
        )));
        // A new cause is a change: it warns at once.
        let auth = Event::ClientError(ClientError::Other("authorization violation".into()));
        let n = s.note(auth, None, t0 + Duration::from_secs(61), URL, HINT);
        assert!(
            matches!(&n, Note::Warn(m) if m.contains("refused the credentials")),
            "{n:?}"
        );
        // Connected, disconnected, reconnected: one line each.
        assert!(matches!(
            s.note(
                Event::Connected,
                None,
                t0 + Duration::from_secs(62),
                URL,
                HINT
            ),
            Note::Info(_)
        ));
        assert!(is_warn(&s.note(
            Event::Disconnected,
            None,
            t0 + Duration::from_secs(70),
            URL,
            HINT
        )));
        assert_eq!(
            s.note(
                Event::Disconnected,
                None,
                t0 + Duration::from_secs(70),
                URL,
                HINT
            ),
            Note::Nothing
        );
        assert!(
            !is_warn(&s.note(io_error(), None, t0 + Duration::from_secs(71), URL, HINT)),
            "the disconnect already warned"
        );
        let n = s.note(
            Event::Connected,
            None,
            t0 + Duration::from_secs(75),
            URL,
            HINT,
        );
        assert!(
            matches!(&n, Note::Info(m) if m.contains("again after 5s")),
            "{n:?}"
        );
    }

    #[test]
    fn the_health_error_names_the_url_and_the_cause() {
        let link = Link::new(
            "events",
            "nats://relay:s3cret@127.0.0.1:4222",
            HINT.into(),
            None,
        );
        let e = link.not_connected();
        assert!(
            e.message.contains("nats://relay:***@127.0.0.1:4222"),
            "{}",
            e.message
        );
        link.on_event(
            Event::ClientError(ClientError::Other("authorization violation".into())),
            None,
            Instant::now(),
        );
        let e = link.not_connected();
        assert_eq!(e.error_type, "auth");
        assert!(
            e.message.contains("authorization violation") && !e.message.contains("s3cret"),
            "{}",
            e.message
        );
    }

    #[test]
    fn created_streams_carry_the_limits_and_zero_means_none() {
        let mut s = NatsStreamConfig::default();
        let c = stream_config(&s);
        assert_eq!(c.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.max_bytes, 1 << 30);
        assert_eq!(c.max_messages, -1);
        s.max_age_secs = 0;
        s.max_bytes = 0;
        s.max_msgs = 10;
        let unlimited = stream_config(&s);
        assert_eq!(
            (
                unlimited.max_age,
                unlimited.max_bytes,
                unlimited.max_messages
            ),
            (Duration::ZERO, -1, 10)
        );
        assert_eq!(
            limit_differences(&c, &unlimited),
            [
                "max_age_secs: none (configured 604800)",
                "max_bytes: none (configured 1073741824)",
                "max_msgs: 10 (configured none)"
            ]
        );
        assert!(limit_differences(&c, &c).is_empty());
    }
}
