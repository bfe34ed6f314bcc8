//! The Kafka calls: create the idempotent producer, produce a batch and collect its delivery
//! reports, fetch metadata. No SQL, no metrics, no retry policy here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext};

use super::topics::Lookup;
use crate::message::OutboxRow;
use crate::sinks::{message_headers, SinkError};

/// Receives librdkafka's client-level events. `AllBrokersDown` makes the sink report itself
/// unavailable at once instead of waiting for every message to time out; a broker that refused
/// the relay's TLS or SASL login is remembered ([`Refusal`]) so that the sink's errors say why.
pub(super) struct KafkaContext {
    sink: String,
    brokers_down: Arc<AtomicBool>,
    refusal: Refusal,
}

/// The last TLS or SASL refusal librdkafka reported, as a sentence naming the setting to fix;
/// cleared when a broker answers.
#[derive(Clone, Default)]
pub(super) struct Refusal(Arc<Mutex<Option<String>>>);

impl Refusal {
    fn set(&self, sentence: String) -> bool {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let changed = slot.as_deref() != Some(sentence.as_str());
        *slot = Some(sentence);
        changed
    }

    fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // Some connection failures (a handshake that times out) reach only the log.
        if fac == "FAIL" {
            if let Some(sentence) = refusal(&self.sink, None, log_message) {
                self.refusal.set(sentence);
            }
        }
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(sink = %self.sink, facility = fac, "librdkafka: {log_message}")
            }
            // librdkafka logs every failed (re)connection at LOG_ERR; the sink's state (breaker,
            // outcomes) carries the real signal, so these are warnings here.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(sink = %self.sink, facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(sink = %self.sink, facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(sink = %self.sink, facility = fac, "librdkafka: {log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(sentence) = refusal(&self.sink, error.rdkafka_error_code(), reason) {
            // Logged when it changes; librdkafka repeats it on every reconnection.
            if self.refusal.set(sentence.clone()) {
                tracing::warn!(sink = %self.sink, error = %sentence, "a Kafka broker refused the connection");
            }
            return;
        }
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                // Logged on the transition only; librdkafka repeats it while reconnecting.
                if !self.brokers_down.swap(true, Ordering::AcqRel) {
                    tracing::warn!(sink = %self.sink, reason, "all Kafka brokers are down");
                }
            }
            Some(RDKafkaErrorCode::Fatal) => {
                tracing::error!(sink = %self.sink, error = %error, reason, "fatal Kafka producer error")
            }
            _ => tracing::debug!(sink = %self.sink, error = %error, reason, "Kafka client error"),
        }
    }
}

type Client = FutureProducer<KafkaContext>;

pub(super) struct KafkaService {
    sink: String,
    config: ClientConfig,
    producer: RwLock<Arc<Client>>,
    brokers_down: Arc<AtomicBool>,
    refusal: Refusal,
    queue_full_timeout: Duration,
}

/// One message ready to produce.
pub(super) struct Outgoing<'a> {
    /// The Kafka topic, rendered from the route.
    pub topic: String,
    /// The row, whose key, headers, payload and creation time the record borrows: librdkafka
    /// copies them once into its own queue, so no copy of ours is needed before that.
    pub row: &'a OutboxRow,
}

/// The broker's answer for one message.
pub(super) enum Delivery {
    Stored,
    Failed(SinkError),
}

impl KafkaService {
    /// Creates the producer. librdkafka connects in the background: a cluster that is down is
    /// not an error here, only a configuration librdkafka refuses.
    pub fn new(
        sink: &str,
        config: ClientConfig,
        queue_full_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let brokers_down = Arc::new(AtomicBool::new(false));
        let refusal = Refusal::default();
        let producer = create(sink, &config, &brokers_down, &refusal)?;
        Ok(Self {
            sink: sink.into(),
            config,
            producer: RwLock::new(Arc::new(producer)),
            brokers_down,
            refusal,
            queue_full_timeout,
        })
    }

    /// `e` with the broker's refusal of the relay in its place, when there is one and `e`
    /// says the sink is unavailable: "timed out" is what a refused login looks like from here.
    pub fn explain(&self, e: SinkError) -> SinkError {
        if e.kind != crate::sinks::ErrorKind::Unavailable {
            return e;
        }
        match self.refusal.get() {
            Some(sentence) => SinkError::unavailable(
                "auth",
                format!(
                    "Kafka at {} refused the relay: {sentence}",
                    self.config.get("bootstrap.servers").unwrap_or_default()
                ),
            ),
            None => e,
        }
    }

    /// A broker answered: whatever refused the relay before is fixed.
    fn answered(&self) {
        self.brokers_down.store(false, Ordering::Release);
        self.refusal.clear();
    }

    fn producer(&self) -> Arc<Client> {
        self.producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether librdkafka last said that it reaches no broker at all.
    pub fn brokers_down(&self) -> bool {
        self.brokers_down.load(Ordering::Acquire)
    }

    /// Fetches the cluster metadata (on a blocking thread: librdkafka's call blocks). Success
    /// clears the "all brokers down" state.
    pub async fn fetch_metadata(&self, timeout: Duration) -> Result<usize, SinkError> {
        let producer = self.producer();
        let brokers = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| SinkError::unavailable("internal", format!("metadata task failed: {e}")))?
        .map_err(|e| {
            self.explain(SinkError::unavailable(
                "unreachable",
                format!("cannot fetch Kafka cluster metadata: {e}"),
            ))
        })?;
        if brokers == 0 {
            return Err(SinkError::unavailable(
                "unreachable",
                "the Kafka cluster reports no brokers",
            ));
        }
        self.answered();
        Ok(brokers)
    }

    /// Asks a broker about one topic (on a blocking thread: librdkafka's call blocks). A
    /// producer's request may make a broker with auto-create on create the topic (librdkafka's
    /// `allow.auto.create.topics`, on for producers), as producing to it would. No answer
    /// within `timeout` is the whole sink being unavailable, not this topic's fault.
    pub async fn lookup_topic(&self, topic: &str, timeout: Duration) -> Result<Lookup, SinkError> {
        let producer = self.producer();
        let name = topic.to_string();
        let answer = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map(|t| (t.error(), t.partitions().len()))
                })
        })
        .await
        .map_err(|e| SinkError::unavailable("internal", format!("metadata task failed: {e}")))?
        .map_err(|e| {
            self.explain(SinkError::unavailable(
                "unreachable",
                format!("cannot fetch the metadata of Kafka topic {topic:?}: {e}"),
            ))
        })?;
        self.answered();
        Ok(match answer {
            Some((None, partitions)) if partitions > 0 => Lookup::Exists,
            Some((Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART), _)) => {
                Lookup::Missing
            }
            _ => Lookup::Undecided,
        })
    }

    /// Produces every message in order (so one key's messages keep their order within their
    /// partition), then awaits all delivery reports: one wait for the batch, not per message.
    pub async fn produce_all(&self, batch: &[Outgoing<'_>]) -> Vec<Delivery> {
        let producer = self.producer();
        let mut out: Vec<Option<Delivery>> = Vec::with_capacity(batch.len());
        let mut pending: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(batch.len());
        let mut stop: Option<SinkError> = None;
        for (i, msg) in batch.iter().enumerate() {
            if let Some(e) = &stop {
                // A later message of the same key must not overtake one that was not queued.
                out.push(Some(Delivery::Failed(e.clone())));
                continue;
            }
            match self.enqueue(&producer, msg).await {
                Ok(fut) => {
                    out.push(None);
                    pending.push((i, fut));
                }
                Err(e) => {
                    if e.kind == crate::sinks::ErrorKind::Unavailable {
                        stop = Some(e.clone());
                    }
                    out.push(Some(Delivery::Failed(e)));
                }
            }
        }
        let reports = join_all(
            pending
                .into_iter()
                .map(|(i, fut)| async move { (i, fut.await) }),
        )
        .await;
        let mut any_stored = false;
        let mut reset: Option<(RDKafkaErrorCode, String)> = None;
        for (i, report) in reports {
            out[i] = Some(match report {
                Ok(Ok(_)) => {
                    any_stored = true;
                    Delivery::Stored
                }
                Ok(Err((e, _))) => {
                    if let Some(code) = e.rdkafka_error_code().filter(|c| needs_new_producer(*c)) {
                        reset.get_or_insert_with(|| (code, e.to_string()));
                    }
                    Delivery::Failed(self.explain(classify(&e)))
                }
                Err(_canceled) => Delivery::Failed(SinkError::unavailable(
                    "internal",
                    "the Kafka producer was closed before reporting",
                )),
            });
        }
        if any_stored {
            self.answered();
        }
        if let Some((code, reason)) = producer.client().fatal_error().or(reset) {
            self.replace_producer(&producer, code, &reason);
            // This may be the old producer's last handle, and destroying it blocks: not here.
            tokio::task::spawn_blocking(move || drop(producer));
        }
        out.into_iter()
            .map(|d| {
                d.unwrap_or_else(|| {
                    Delivery::Failed(SinkError::unavailable(
                        "internal",
                        "no delivery report recorded",
                    ))
                })
            })
            .collect()
    }

    /// Queues one message, waiting up to `queue_full_timeout` for room in librdkafka's queue.
    async fn enqueue(
        &self,
        producer: &Client,
        msg: &Outgoing<'_>,
    ) -> Result<DeliveryFuture, SinkError> {
        let row = msg.row;
        let mut headers = OwnedHeaders::new_with_capacity(row.headers.len() + 3);
        for (key, value) in message_headers(row) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&msg.topic)
            .payload(&row.payload[..])
            .headers(headers)
            .timestamp(row.created_at.timestamp_millis());
        if let Some(key) = &row.key {
            record = record.key(key.as_bytes());
        }
        let deadline = tokio::time::Instant::now() + self.queue_full_timeout;
        loop {
            match producer.send_result(record) {
                Ok(fut) => return Ok(fut),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < deadline =>
                {
                    // librdkafka's own thread drains the queue; give it a moment.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(classify(&e)),
            }
        }
    }

    /// After a fatal error (e.g. the idempotent producer's sequence state is broken) the
    /// producer accepts nothing more, and after errors that say the broker lost or refuses its
    /// idempotence state ([`needs_new_producer`]) it would fail every record: replace it. The rows of the failed batch were reported
    /// unavailable and will be produced again by the new producer.
    fn replace_producer(&self, failed: &Arc<Client>, code: RDKafkaErrorCode, reason: &str) {
        let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&slot, failed) {
            return; // another batch replaced it already
        }
        tracing::error!(sink = %self.sink, code = ?code, reason, "Kafka producer unusable; creating a new producer");
        match create(&self.sink, &self.config, &self.brokers_down, &self.refusal) {
            Ok(p) => {
                let old = std::mem::replace(&mut *slot, Arc::new(p));
                // Destroying a librdkafka client blocks; not on the async runtime.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => {
                tracing::error!(sink = %self.sink, error = %e, "cannot create a new Kafka producer")
            }
        }
    }
}

fn create(
    sink: &str,
    config: &ClientConfig,
    brokers_down: &Arc<AtomicBool>,
    refusal: &Refusal,
) -> Result<Client, SinkError> {
    let context = KafkaContext {
        sink: sink.into(),
        brokers_down: brokers_down.clone(),
        refusal: refusal.clone(),
    };
    config.create_with_context(context).map_err(|e| {
        SinkError::permanent(
            "config",
            format!("librdkafka refused the producer configuration: {e}"),
        )
    })
}

/// A sentence for a broker connection that failed because of TLS or SASL, naming the setting
/// to fix (below `sinks.<sink>.`); `None` for other failures (a broker down, a timeout).
pub(super) fn refusal(sink: &str, code: Option<RDKafkaErrorCode>, reason: &str) -> Option<String> {
    use RDKafkaErrorCode as C;
    let p = format!("sinks.{sink}.");
    let text = reason.to_ascii_lowercase();
    let hint = if matches!(code, Some(C::Authentication | C::SaslAuthenticationFailed))
        || text.contains("sasl authentication")
        || text.contains("authentication failed")
    {
        format!(
            "the broker refused the SASL login: check {p}librdkafka.\"sasl.username\", the password ({p}sasl_password_file or {p}sasl_password) and {p}librdkafka.\"sasl.mechanism\" (the broker must know the user for that mechanism)"
        )
    } else if text.contains("certificate verify failed") || text.contains("could not be verified") {
        if text.contains("expired") {
            "the broker's certificate has expired: renew it on the broker (if it is not expired, check this machine's clock)".to_string()
        } else {
            format!(
                "the broker's certificate is not signed by a CA the relay trusts, or does not name the host in {p}brokers: set {p}librdkafka.\"ssl.ca.location\" to the CA that issued it"
            )
        }
    } else if text.contains("connecting to a ssl listener") {
        format!(
            "the listener expects TLS: set {p}librdkafka.\"security.protocol\" to SSL or SASL_SSL and {p}librdkafka.\"ssl.ca.location\""
        )
    } else if text.contains("timed out in state ssl_handshake") {
        // A plaintext listener reads the ClientHello as the start of a Kafka request and waits
        // for the rest of it.
        format!(
            "the broker did not complete the TLS handshake: {p}librdkafka.\"security.protocol\" asks for TLS (SSL or SASL_SSL); check that this port is the broker's TLS listener and not a plaintext one"
        )
    } else if code == Some(C::SSL) || text.contains("ssl handshake failed") {
        if text.contains("wrong version number")
            || text.contains("packet length too long")
            || text.contains("record layer failure")
            || text.contains("unexpected eof")
        {
            format!(
                "the broker did not answer in TLS: {p}librdkafka.\"security.protocol\" asks for TLS (SSL or SASL_SSL) but this listener is plaintext"
            )
        } else if text.contains("alert") {
            format!(
                "the broker refused the relay's client certificate or requires one: set {p}librdkafka.\"ssl.certificate.location\" and \"ssl.key.location\" to a certificate signed by a CA the broker trusts"
            )
        } else {
            format!("check the TLS settings ({p}librdkafka.\"ssl.*\")")
        }
    } else {
        return None;
    };
    Some(format!("{reason}: {hint}"))
}

/// Sorts a librdkafka error into: the whole sink is unavailable (retry later, no attempt
/// counted), this row can never succeed (dead-letter it), or this row may succeed later.
pub(super) fn classify(error: &KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    let Some(code) = error.rdkafka_error_code() else {
        return SinkError::retriable("kafka", format!("Kafka producer error: {error}"));
    };
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => SinkError::permanent(
            "too_large",
            format!(
                "message too large for Kafka ({error}): raise message.max.bytes on the broker/topic and \
                 librdkafka.\"message.max.bytes\", or publish smaller payloads"
            ),
        ),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => SinkError::permanent(
            "unknown_topic",
            format!("the Kafka topic does not exist and the broker does not create it ({error}): create the topic"),
        ),
        C::TopicAuthorizationFailed => SinkError::permanent(
            "not_authorized",
            format!("not authorised to write to this Kafka topic ({error}): grant the relay's principal WRITE on it"),
        ),
        C::InvalidTopic => SinkError::permanent("invalid_topic", format!("invalid Kafka topic name ({error})")),
        C::InvalidRecord
        | C::InvalidMessage
        | C::InvalidTimestamp
        | C::UnsupportedForMessageFormat
        | C::PolicyViolation
        | C::BadMessage
        | C::InvalidArgument => SinkError::permanent("invalid_record", format!("Kafka rejected the record ({error})")),
        C::MessageTimedOut
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::ReplicaNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError
        | C::QueueFull
        | C::PurgeQueue
        | C::PurgeInflight
        | C::DestroyBroker
        | C::BrokerDestroy
        | C::Fatal
        | C::Authentication
        | C::SaslAuthenticationFailed
        | C::ClusterAuthorizationFailed
        | C::SSL
        | C::ThrottlingQuotaExceeded
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::InvalidProducerEpoch
        | C::ProducerFenced => SinkError::unavailable(unavailable_type(code), format!("Kafka unavailable: {error}")),
        // The broker failed the request for a reason of its own (UNKNOWN_SERVER_ERROR): not
        // this row's fault. Seen from a broker restarted without its idempotent-producer state,
        // which then fails every record of the old producer id; the sink replaces its producer.
        C::Unknown => SinkError::unavailable(
            "broker_error",
            format!("the Kafka broker failed the request with an unknown server error ({error}); the producer is replaced"),
        ),
        _ => SinkError::retriable("kafka", format!("Kafka producer error: {error}")),
    }
}

/// Delivery errors after which the sink starts a new producer (a new producer id): the broker
/// lost or refuses this producer's idempotence state.
fn needs_new_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Unknown | C::OutOfOrderSequenceNumber | C::UnknownProducerId
    )
}

fn unavailable_type(code: RDKafkaErrorCode) -> &'static str {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut | C::TimedOutQueue => {
            "timeout"
        }
        C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::PreferredLeaderNotAvailable => "leader_unavailable",
        C::NotEnoughReplicas | C::NotEnoughReplicasAfterAppend | C::ReplicaNotAvailable => {
            "not_enough_replicas"
        }
        C::QueueFull => "queue_full",
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::ClusterAuthorizationFailed
        | C::SSL => "auth",
        C::Fatal
        | C::OutOfOrderSequenceNumber
        | C::UnknownProducerId
        | C::InvalidProducerEpoch
        | C::ProducerFenced => "producer_fenced",
        _ => "unreachable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::ErrorKind;

    fn kind(code: RDKafkaErrorCode) -> (ErrorKind, &'static str) {
        let e = classify(&KafkaError::MessageProduction(code));
        (e.kind, e.error_type)
    }

    #[test]
    fn an_unknown_server_error_is_the_brokers_and_replaces_the_producer() {
        assert_eq!(
            kind(RDKafkaErrorCode::Unknown),
            (ErrorKind::Unavailable, "broker_error")
        );
        assert!(needs_new_producer(RDKafkaErrorCode::Unknown));
        assert!(!needs_new_producer(RDKafkaErrorCode::MessageTimedOut));
    }

    #[test]
    fn tls_and_sasl_refusals_name_the_setting() {
        use RDKafkaErrorCode as C;
        let said = |code, reason: &str| refusal("k", Some(code), reason).unwrap();
        let e = said(C::Authentication, "sasl_plaintext://127.0.0.1:9092/bootstrap: SASL authentication error: Authentication failed");
        assert!(e.contains("sinks.k.sasl_password_file"), "{e}");
        let e = said(C::SSL, "ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified");
        assert!(
            e.contains("set sinks.k.librdkafka.\"ssl.ca.location\""),
            "{e}"
        );
        let e = said(C::SSL, "ssl://b:9092/bootstrap: SSL handshake failed: error:0A00010B:SSL routines::wrong version number");
        assert!(e.contains("this listener is plaintext"), "{e}");
        let e = said(C::BrokerTransportFailure, "b:9093/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?)");
        assert!(e.contains("the listener expects TLS"), "{e}");
        let e = said(C::BrokerTransportFailure, "ssl://b:9092/bootstrap: Connection setup timed out in state SSL_HANDSHAKE (after 5002ms in state SSL_HANDSHAKE)");
        assert!(
            e.contains("did not complete the TLS handshake") && e.contains("security.protocol"),
            "{e}"
        );
        assert!(refusal("k", Some(C::BrokerTransportFailure), "Connection refused").is_none());
    }

    #[test]
    fn classification() {
        use RDKafkaErrorCode as C;
        assert_eq!(
            kind(C::MessageSizeTooLarge),
            (ErrorKind::Permanent, "too_large")
        );
        assert_eq!(
            kind(C::UnknownTopicOrPartition),
            (ErrorKind::Permanent, "unknown_topic")
        );
        assert_eq!(
            kind(C::UnknownTopic),
            (ErrorKind::Permanent, "unknown_topic")
        );
        assert_eq!(
            kind(C::TopicAuthorizationFailed),
            (ErrorKind::Permanent, "not_authorized")
        );
        assert_eq!(
            kind(C::InvalidRecord),
            (ErrorKind::Permanent, "invalid_record")
        );
        assert_eq!(
            kind(C::MessageTimedOut),
            (ErrorKind::Unavailable, "timeout")
        );
        assert_eq!(
            kind(C::AllBrokersDown),
            (ErrorKind::Unavailable, "unreachable")
        );
        assert_eq!(
            kind(C::NotLeaderForPartition),
            (ErrorKind::Unavailable, "leader_unavailable")
        );
        assert_eq!(
            kind(C::LeaderNotAvailable),
            (ErrorKind::Unavailable, "leader_unavailable")
        );
        assert_eq!(kind(C::QueueFull), (ErrorKind::Unavailable, "queue_full"));
        assert_eq!(kind(C::InvalidRequiredAcks).0, ErrorKind::Retriable);
        let e = classify(&KafkaError::MessageProduction(C::MessageSizeTooLarge));
        assert!(e.message.contains("message.max.bytes"), "{}", e.message);
    }
}
