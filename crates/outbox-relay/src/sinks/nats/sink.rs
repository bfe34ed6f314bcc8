//! The sink contract for NATS: envelopes in, one outcome per envelope out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::config::{check_subject, NatsConfig};
use super::security::{self, Auth};
use super::service::{build_headers, Ack, NatsService, Outgoing, NO_STREAM};
use crate::sinks::{
    complete_outcomes, render_template, Envelope, ErrorKind, Outcome, Sink, SinkError,
};

pub struct NatsSink {
    config: NatsConfig,
    service: NatsService,
    stream_ready: AtomicBool,
}

impl NatsSink {
    pub async fn new(name: &str, config: NatsConfig) -> Result<Self, SinkError> {
        let stream = &config.stream;
        let auth = Auth::from_config(&config)
            .map_err(|e| SinkError::unavailable("config", format!("sinks.{name}.{e}")))?;
        tracing::info!(
            sink = name,
            url = %crate::redact_url(&config.url),
            tls = %security::describe_tls(&config),
            auth = %auth.describe(name),
            stream = %stream.name,
            stream_create = stream.create,
            stream_subjects = ?stream.subjects,
            routes = %describe_routes(&config),
            "NATS sink"
        );
        security::warn_about_exposure(name, &config, &auth);
        let service = NatsService::connect(&config, &auth, name, Duration::from_secs(10)).await?;
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
            return Err(self.service.not_connected());
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
        // A subject NATS cannot deliver is the row's fault and stays so: it is dead-lettered
        // now, never sent (the server would answer "invalid subject" or "no responders", which
        // look retriable, and a wildcard subject reaches no consumer of concrete subjects).
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut sent = Vec::with_capacity(batch.len());
        let mut outgoing = Vec::with_capacity(batch.len());
        for (i, env) in batch.iter().enumerate() {
            let row = env.row;
            let template = &self.config.routes[env.route].subject;
            let subject = render_template(template, row);
            if let Err(why) = check_subject(&subject) {
                outcomes[i] = Some(Outcome::Failed(SinkError::permanent(
                    "invalid_subject",
                    format!(
                        "subject {subject:?} (from {template:?} for topic {:?}) is not a valid NATS subject: it {why}",
                        row.topic
                    ),
                )));
                continue;
            }
            let headers = match build_headers(row) {
                Ok(h) => h,
                Err(e) => {
                    outcomes[i] = Some(Outcome::Failed(e));
                    continue;
                }
            };
            sent.push(i);
            outgoing.push(Outgoing {
                subject,
                headers,
                payload: Bytes::copy_from_slice(&row.payload),
            });
        }
        let acks = self.service.publish_all(outgoing).await;
        for (i, ack) in sent.into_iter().zip(acks) {
            outcomes[i] = Some(match ack {
                Ack::Stored { duplicate: false } => Outcome::Delivered,
                Ack::Stored { duplicate: true } => Outcome::Duplicate,
                Ack::Failed(e) => Outcome::Failed(e),
            });
        }
        let mut outcomes = complete_outcomes(outcomes);
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

/// The routes for the start-up log: `["order.*"] -> orders.{topic}; …`.
fn describe_routes(config: &NatsConfig) -> String {
    config
        .routes
        .iter()
        .map(|r| format!("{:?} -> {}", r.topics, r.subject))
        .collect::<Vec<_>>()
        .join("; ")
}
