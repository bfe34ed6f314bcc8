//! The sink contract for NATS: envelopes in, one outcome per envelope out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::config::NatsConfig;
use super::service::{Ack, NatsService, Outgoing, NO_STREAM};
use crate::sinks::{
    message_headers, render_template, Envelope, ErrorKind, Outcome, Sink, SinkError,
};

pub struct NatsSink {
    config: NatsConfig,
    service: NatsService,
    stream_ready: AtomicBool,
}

impl NatsSink {
    pub async fn new(name: &str, config: NatsConfig) -> Result<Self, SinkError> {
        let service = NatsService::connect(
            &config.url,
            name,
            Duration::from_secs(config.connect_timeout_secs),
            Duration::from_secs(10),
        )
        .await?;
        // Give the first connection a moment so a healthy broker is not reported down at start;
        // a broker that is down is not an error here (the relay's breaker probes it).
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(config.connect_timeout_secs);
        while !service.is_connected() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            config,
            service,
            stream_ready: AtomicBool::new(false),
        })
    }

    /// A per-message failure only costs the message an attempt when the broker itself is
    /// healthy. JetStream answers "no responders" (`no_stream`) and API errors while it is
    /// restarting or recovering its streams, and a connection can drop mid-batch; so when any
    /// row failed as retriable, ask for the stream once: if that fails too, the failures are
    /// the broker's, and they become [`ErrorKind::Unavailable`] (row released untouched,
    /// circuit opened) instead of burning attempts.
    async fn blame_broker_if_down(&self, outcomes: &mut [Outcome]) {
        let retriable =
            |o: &Outcome| matches!(o, Outcome::Failed(e) if e.kind == ErrorKind::Retriable);
        if !outcomes.iter().any(retriable) {
            return;
        }
        let down = if !self.service.is_connected() {
            Some("connection to NATS lost during the batch".to_string())
        } else {
            self.service
                .stream_reachable(&self.config.stream.name)
                .await
                .err()
                .map(|e| e.message)
        };
        if let Some(reason) = down {
            self.stream_ready.store(false, Ordering::Release);
            for o in outcomes.iter_mut().filter(|o| retriable(o)) {
                if let Outcome::Failed(e) = o {
                    *o = Outcome::Failed(SinkError::unavailable(
                        "jetstream_unavailable",
                        format!("{} (and JetStream is not answering: {reason})", e.message),
                    ));
                }
            }
        }
    }

    async fn ready(&self) -> Result<(), SinkError> {
        if !self.service.is_connected() {
            return Err(SinkError::unavailable(
                "disconnected",
                "not connected to NATS",
            ));
        }
        if !self.stream_ready.load(Ordering::Acquire) {
            self.service.ensure_stream(&self.config.stream).await?;
            self.stream_ready.store(true, Ordering::Release);
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn kind(&self) -> &'static str {
        super::KIND
    }

    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome> {
        if let Err(e) = self.ready().await {
            return vec![Outcome::Failed(e); batch.len()];
        }
        let outgoing = batch
            .iter()
            .map(|env| {
                let row = env.row;
                let headers = message_headers(row)
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                Outgoing {
                    subject: render_template(&self.config.routes[env.route].subject, row),
                    message_id: row.message_id.clone(),
                    headers,
                    payload: Bytes::copy_from_slice(&row.payload),
                }
            })
            .collect();
        let mut outcomes: Vec<Outcome> = self
            .service
            .publish_all(outgoing)
            .await
            .into_iter()
            .map(|ack| match ack {
                Ack::Stored { duplicate: false } => Outcome::Delivered,
                Ack::Stored { duplicate: true } => Outcome::Duplicate,
                Ack::Failed(e) => Outcome::Failed(e),
            })
            .collect();
        self.blame_broker_if_down(&mut outcomes).await;
        // No stream answered: it was deleted, or lost with a memory-storage server restart.
        // Look (and, with stream.create, create it again) before the next batch, instead of
        // failing every later message until it is dead-lettered.
        if outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Failed(e) if e.error_type == NO_STREAM))
        {
            self.stream_ready.store(false, Ordering::Release);
        }
        outcomes
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.stream_ready.store(false, Ordering::Release);
        self.ready().await
    }
}
