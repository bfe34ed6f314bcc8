//! The NATS calls: connect, ensure the stream, publish a batch and collect its acks.
//! No SQL, no metrics, no retry policy here.

use std::str::FromStr;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use async_nats::jetstream::context::{ContextBuilder, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures::future::join_all;

use super::config::NatsStreamConfig;
use crate::sinks::SinkError;

/// Acks allowed in flight on one connection: several batches' worth, so a batch never waits for
/// a permit held by its own earlier messages.
const MAX_ACKS_IN_FLIGHT: usize = 20_000;

/// `error_type` of a publish that no stream captured.
pub(super) const NO_STREAM: &str = "no_stream";

pub(super) struct NatsService {
    client: async_nats::Client,
    js: Context,
}

/// One message ready to send.
pub(super) struct Outgoing {
    pub subject: String,
    pub message_id: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// The broker's answer for one message.
pub(super) enum Ack {
    Stored { duplicate: bool },
    Failed(SinkError),
}

impl NatsService {
    /// Connects in the background: a broker that is down at start is not an error here, the
    /// client keeps reconnecting and [`NatsService::is_connected`] says when it is up.
    pub async fn connect(
        url: &str,
        name: &str,
        timeout: Duration,
        ack_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("outbox-relay/{name}"))
            .connection_timeout(timeout)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(url)
            .await
            .map_err(|e| {
                SinkError::unavailable("connect", format!("cannot connect to NATS: {e}"))
            })?;
        let js = ContextBuilder::new()
            .timeout(ack_timeout)
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Self { client, js })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Checks that the stream exists, creating it when `create` is set.
    pub async fn ensure_stream(&self, stream: &NatsStreamConfig) -> Result<(), SinkError> {
        if stream.create {
            let config = StreamConfig {
                name: stream.name.clone(),
                subjects: stream.subjects.clone(),
                duplicate_window: Duration::from_secs(stream.duplicate_window_secs),
                storage: if stream.storage == "memory" {
                    StorageType::Memory
                } else {
                    StorageType::File
                },
                ..Default::default()
            };
            self.js
                .get_or_create_stream(config)
                .await
                .map(|_| ())
                .map_err(|e| {
                    SinkError::unavailable(
                        "stream",
                        format!("cannot create JetStream stream {:?}: {e}", stream.name),
                    )
                })
        } else {
            self.js.get_stream(&stream.name).await.map(|_| ()).map_err(|e| {
                SinkError::unavailable(
                    "stream",
                    format!(
                        "JetStream stream {:?} is not usable ({e}): create it, or set stream.create = true",
                        stream.name
                    ),
                )
            })
        }
    }

    /// Whether JetStream answers for the stream (an info request, bounded by the ack timeout).
    pub async fn stream_reachable(&self, name: &str) -> Result<(), SinkError> {
        self.js.get_stream(name).await.map(|_| ()).map_err(|e| {
            SinkError::unavailable("stream", format!("stream {name:?} is not reachable: {e}"))
        })
    }

    /// Sends every message, then awaits all acks: one round trip for the batch, not per message.
    pub async fn publish_all(&self, batch: Vec<Outgoing>) -> Vec<Ack> {
        let mut acks: Vec<Option<Ack>> = Vec::with_capacity(batch.len());
        let mut pending = Vec::with_capacity(batch.len());
        for (i, msg) in batch.into_iter().enumerate() {
            let headers = match build_headers(&msg.headers) {
                Ok(h) => h,
                Err(e) => {
                    acks.push(Some(Ack::Failed(e)));
                    continue;
                }
            };
            let publish = PublishMessage::build()
                .headers(headers)
                .message_id(&msg.message_id)
                .payload(msg.payload);
            match self.js.send_publish(msg.subject, publish).await {
                Ok(fut) => {
                    acks.push(None);
                    pending.push(async move { (i, fut.await) });
                }
                Err(e) => acks.push(Some(Ack::Failed(classify(e.kind(), &e.to_string())))),
            }
        }
        for (i, result) in join_all(pending).await {
            acks[i] = Some(match result {
                Ok(ack) => Ack::Stored {
                    duplicate: ack.duplicate,
                },
                Err(e) => Ack::Failed(classify(e.kind(), &e.to_string())),
            });
        }
        acks.into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Ack::Failed(SinkError::unavailable(
                        "internal",
                        "no acknowledgement recorded",
                    ))
                })
            })
            .collect()
    }
}

fn build_headers(pairs: &[(String, String)]) -> Result<HeaderMap, SinkError> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        let n = HeaderName::from_str(name).map_err(|e| {
            SinkError::permanent(
                "invalid_header",
                format!("header name {name:?} is not valid for NATS: {e}"),
            )
        })?;
        let v = HeaderValue::from_str(value).map_err(|e| {
            SinkError::permanent(
                "invalid_header",
                format!("header {name:?} has a value NATS cannot carry: {e}"),
            )
        })?;
        map.insert(n, v);
    }
    Ok(map)
}

fn classify(kind: PublishErrorKind, text: &str) -> SinkError {
    match kind {
        PublishErrorKind::MaxPayloadExceeded => SinkError::permanent(
            "too_large",
            format!("message is larger than the NATS server's max_payload: {text}"),
        ),
        PublishErrorKind::StreamNotFound => SinkError::retriable(
            NO_STREAM,
            format!("no JetStream stream captures this subject: {text}"),
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
            format!("JetStream rejected the message: {text}"),
        ),
    }
}
