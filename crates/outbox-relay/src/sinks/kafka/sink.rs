//! The sink contract for Kafka: envelopes in, one outcome per envelope out.

use std::time::Duration;

use async_trait::async_trait;

use super::config::{valid_topic_name, KafkaConfig};
use super::service::{Delivery, KafkaService, Outgoing};
use crate::sinks::{
    render_template, Envelope, Outcome, Sink, SinkError, IDEMPOTENCY_HEADER, KEY_HEADER,
    TOPIC_HEADER,
};

pub struct KafkaSink {
    config: KafkaConfig,
    service: KafkaService,
}

impl KafkaSink {
    /// Creates the producer; it connects in the background, so a cluster that is down is not
    /// an error (publishes report `unavailable` until it is back).
    pub fn new(name: &str, config: KafkaConfig) -> Result<Self, SinkError> {
        let service = KafkaService::new(
            name,
            config.client_config(),
            Duration::from_millis(config.queue_full_timeout_ms),
        )?;
        Ok(Self { config, service })
    }

    fn outgoing(&self, env: &Envelope<'_>) -> Result<Outgoing, SinkError> {
        let row = env.row;
        let topic = render_template(&self.config.routes[env.route].topic, row);
        if !valid_topic_name(&topic) {
            return Err(SinkError::permanent(
                "invalid_topic",
                format!(
                    "{topic:?} is not a valid Kafka topic name (letters, digits, '.', '_', '-', at most 249): \
                     change the route's topic template or the outbox topic"
                ),
            ));
        }
        let mut headers: Vec<(String, String)> = row
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        headers.push((IDEMPOTENCY_HEADER.into(), row.message_id.clone()));
        headers.push((TOPIC_HEADER.into(), row.topic.clone()));
        if let Some(key) = &row.key {
            headers.push((KEY_HEADER.into(), key.clone()));
        }
        Ok(Outgoing {
            topic,
            key: row.key.clone(),
            headers,
            payload: row.payload.clone(),
            timestamp_ms: row.created_at.timestamp_millis(),
        })
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome> {
        if self.service.brokers_down() {
            let e = SinkError::unavailable(
                "unreachable",
                "librdkafka reports that no Kafka broker is reachable",
            );
            return vec![Outcome::Failed(e); batch.len()];
        }
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        let mut to_send = Vec::with_capacity(batch.len());
        let mut slots = Vec::with_capacity(batch.len());
        for env in batch {
            match self.outgoing(env) {
                Ok(msg) => {
                    slots.push(outcomes.len());
                    outcomes.push(None);
                    to_send.push(msg);
                }
                Err(e) => outcomes.push(Some(Outcome::Failed(e))),
            }
        }
        for (slot, delivery) in slots
            .into_iter()
            .zip(self.service.produce_all(&to_send).await)
        {
            outcomes[slot] = Some(match delivery {
                Delivery::Stored => Outcome::Delivered,
                Delivery::Failed(e) => Outcome::Failed(e),
            });
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::Failed(SinkError::unavailable("internal", "no outcome recorded"))
                })
            })
            .collect()
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.service
            .fetch_metadata(Duration::from_millis(self.config.check_timeout_ms))
            .await
            .map(|_| ())
    }
}
