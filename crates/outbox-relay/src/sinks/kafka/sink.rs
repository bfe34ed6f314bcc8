//! The sink contract for Kafka: envelopes in, one outcome per envelope out.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};

use super::config::{valid_topic_name, KafkaConfig};
use super::service::{Delivery, KafkaService, Outgoing};
use super::topics::Topics;
use crate::sinks::{complete_outcomes, render_template, Envelope, Outcome, Sink, SinkError};

/// At most this many metadata requests at a time for the new topics of one batch.
const LOOKUPS_IN_FLIGHT: usize = 8;

pub struct KafkaSink {
    config: KafkaConfig,
    service: KafkaService,
    topics: Topics,
}

impl KafkaSink {
    /// Creates the producer; it connects in the background, so a cluster that is down is not
    /// an error (publishes report `unavailable` until it is back).
    pub fn new(name: &str, config: KafkaConfig) -> Result<Self, SinkError> {
        let routes = config
            .routes
            .iter()
            .map(|r| format!("{:?} -> {}", r.topics, r.topic))
            .collect::<Vec<_>>()
            .join("; ");
        let setting = |k: &str| config.librdkafka.get(k).map_or("", String::as_str);
        tracing::info!(
            sink = name,
            brokers = %config.brokers,
            routes = %routes,
            security_protocol = setting("security.protocol"),
            sasl_mechanism = setting("sasl.mechanism"),
            sasl_username = setting("sasl.username"),
            "Kafka sink"
        );
        let client_config = config
            .client_config()
            .map_err(|e| SinkError::permanent("config", format!("sinks.{name}.{e}")))?;
        let service = KafkaService::new(
            name,
            client_config,
            Duration::from_millis(config.queue_full_timeout_ms),
        )?;
        let topics = Topics::new(config.missing_topic_grace());
        Ok(Self {
            config,
            service,
            topics,
        })
    }

    /// Asks the broker about the batch's topics the sink has not produced to yet (one request
    /// per topic) and returns the error for the rows of each missing one. A broker that does
    /// not answer makes the whole sink unavailable.
    async fn refused_topics(
        &self,
        to_send: &[Outgoing<'_>],
    ) -> Result<HashMap<String, SinkError>, SinkError> {
        let new: BTreeSet<String> = to_send
            .iter()
            .filter(|m| !self.topics.is_known(&m.topic))
            .map(|m| m.topic.clone())
            .collect();
        if new.is_empty() {
            return Ok(HashMap::new());
        }
        let timeout = Duration::from_millis(self.config.check_timeout_ms);
        let answers: Vec<_> = stream::iter(new)
            .map(|topic: String| async move {
                let lookup = self.service.lookup_topic(&topic, timeout).await?;
                Ok::<_, SinkError>((topic, lookup))
            })
            .buffer_unordered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await?;
        let now = Instant::now();
        Ok(answers
            .into_iter()
            .filter_map(|(topic, lookup)| {
                let refused = self.topics.record(&topic, lookup, now)?;
                Some((topic, refused))
            })
            .collect())
    }

    fn outgoing<'a>(&self, env: &Envelope<'a>) -> Result<Outgoing<'a>, SinkError> {
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
        Ok(Outgoing { topic, row })
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        super::KIND
    }

    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome> {
        if self.service.brokers_down() {
            let e = self.service.explain(SinkError::unavailable(
                "unreachable",
                "librdkafka reports that no Kafka broker is reachable",
            ));
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
        let refused = match self.refused_topics(&to_send).await {
            Ok(refused) => refused,
            Err(e) => {
                for slot in slots {
                    outcomes[slot] = Some(Outcome::Failed(e.clone()));
                }
                return complete_outcomes(outcomes);
            }
        };
        let (mut produce, mut produce_slots) = (Vec::with_capacity(to_send.len()), Vec::new());
        for (slot, msg) in slots.into_iter().zip(to_send) {
            match refused.get(&msg.topic) {
                Some(e) => outcomes[slot] = Some(Outcome::Failed(e.clone())),
                None => {
                    produce_slots.push(slot);
                    produce.push(msg);
                }
            }
        }
        let deliveries = self.service.produce_all(&produce).await;
        for ((slot, msg), delivery) in produce_slots.into_iter().zip(&produce).zip(deliveries) {
            outcomes[slot] = Some(match delivery {
                Delivery::Stored => Outcome::Delivered,
                Delivery::Failed(e) => {
                    if e.error_type == "unknown_topic" {
                        // Deleted since the sink last asked: ask again before the next message.
                        self.topics.forget(&msg.topic);
                    }
                    Outcome::Failed(e)
                }
            });
        }
        complete_outcomes(outcomes)
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.service
            .fetch_metadata(Duration::from_millis(self.config.check_timeout_ms))
            .await
            .map(|_| ())
    }
}
