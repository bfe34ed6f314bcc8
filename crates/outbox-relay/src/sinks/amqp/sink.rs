//! The sink contract for RabbitMQ: envelopes in, one outcome per envelope out.

use std::time::Duration;

use async_trait::async_trait;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use super::config::AmqpConfig;
use super::service::{Ack, AmqpService, Outgoing};
use crate::sinks::{
    complete_outcomes, message_headers, render_template, Envelope, OutboxRow, Outcome, Sink,
    SinkError,
};

/// Delivery mode 2: the broker stores the message on disk (in durable queues).
const PERSISTENT: u8 = 2;
const TRANSIENT: u8 = 1;

pub struct AmqpSink {
    config: AmqpConfig,
    service: AmqpService,
}

impl AmqpSink {
    /// Starts connecting in the background and waits for the first attempt (at most
    /// `connect_timeout_secs`); a broker that is down is not an error here.
    pub async fn new(name: &str, config: AmqpConfig) -> Result<Self, SinkError> {
        let routes = config
            .routes
            .iter()
            .map(|r| {
                format!(
                    "{:?} -> exchange {:?} key {}",
                    r.topics, r.exchange, r.routing_key
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let declared: Vec<&str> = config.exchanges.iter().map(|e| e.name.as_str()).collect();
        tracing::info!(
            sink = name,
            url = %crate::redact_url(&config.url),
            declares = ?declared,
            must_exist = ?config.undeclared_exchanges(),
            routes = %routes,
            mandatory = config.mandatory,
            "RabbitMQ sink"
        );
        let service = AmqpService::start(name, &config)?;
        service
            .wait_first_attempt(Duration::from_secs(config.connect_timeout_secs + 1))
            .await;
        Ok(Self { config, service })
    }

    /// The AMQP message for one row, or why it can never be sent (names, keys and header names
    /// are AMQP short strings of at most 255 bytes).
    fn outgoing<'a>(&self, env: &Envelope<'a>) -> Result<Outgoing<'a>, SinkError> {
        let row = env.row;
        let route = &self.config.routes[env.route];
        if row.payload.len() as u64 > self.config.max_message_bytes {
            return Err(SinkError::permanent(
                "too_large",
                format!(
                    "payload is {} bytes, above max_message_bytes ({}): RabbitMQ would refuse it",
                    row.payload.len(),
                    self.config.max_message_bytes
                ),
            ));
        }
        let routing_key = render_template(&route.routing_key, row);
        let routing_key = ShortString::try_new(routing_key).map_err(|e| {
            invalid(format!(
                "the routing key rendered from {:?} is too long: {e}",
                route.routing_key
            ))
        })?;
        let exchange = ShortString::try_new(route.exchange.clone())
            .map_err(|e| invalid(format!("exchange name too long: {e}")))?;
        Ok(Outgoing {
            message_id: row.message_id.clone(),
            exchange,
            routing_key,
            payload: &row.payload,
            properties: self.properties(row)?,
        })
    }

    fn properties(&self, row: &OutboxRow) -> Result<BasicProperties, SinkError> {
        let mut headers = FieldTable::default();
        for (name, value) in message_headers(row) {
            let key = ShortString::try_new(name.to_owned())
                .map_err(|e| invalid(format!("header name {name:?} is not valid for AMQP: {e}")))?;
            headers.insert(key, AMQPValue::LongString(LongString::from(value)));
        }
        let message_id = ShortString::try_new(row.message_id.clone())
            .map_err(|e| invalid(format!("message id is too long for AMQP's message_id: {e}")))?;
        let mut properties = BasicProperties::default()
            .with_message_id(message_id)
            .with_headers(headers)
            .with_delivery_mode(if self.config.persistent {
                PERSISTENT
            } else {
                TRANSIENT
            })
            .with_timestamp(row.created_at.timestamp().max(0) as u64)
            .with_app_id(ShortString::from("outbox-relay"));
        if let Some(ct) = header(row, "content-type") {
            let ct = ShortString::try_new(ct)
                .map_err(|e| invalid(format!("content-type header is too long: {e}")))?;
            properties = properties.with_content_type(ct);
        }
        if let Some(ce) = header(row, "content-encoding") {
            let ce = ShortString::try_new(ce)
                .map_err(|e| invalid(format!("content-encoding header is too long: {e}")))?;
            properties = properties.with_content_encoding(ce);
        }
        Ok(properties)
    }
}

fn invalid(message: String) -> SinkError {
    SinkError::permanent("invalid_message", message)
}

/// A header by case-insensitive name.
fn header(row: &OutboxRow, name: &str) -> Option<String> {
    row.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

#[async_trait]
impl Sink for AmqpSink {
    fn kind(&self) -> &'static str {
        super::KIND
    }

    async fn publish(&self, batch: &[Envelope<'_>]) -> Vec<Outcome> {
        let live = match self.service.live() {
            Ok(l) => l,
            Err(e) => return vec![Outcome::Failed(e); batch.len()],
        };
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        let mut sent = Vec::with_capacity(batch.len());
        let mut outgoing = Vec::with_capacity(batch.len());
        for (i, env) in batch.iter().enumerate() {
            match self.outgoing(env) {
                Ok(msg) => {
                    sent.push(i);
                    outgoing.push(msg);
                }
                Err(e) => outcomes[i] = Some(Outcome::Failed(e)),
            }
        }
        let acks = live.publish_all(outgoing, self.config.mandatory).await;
        for (i, ack) in sent.into_iter().zip(acks) {
            let route = &self.config.routes[batch[i].route];
            outcomes[i] = Some(match ack {
                Ack::Confirmed => Outcome::Delivered,
                Ack::Returned { reply_code, reply_text } => Outcome::Failed(SinkError::retriable(
                    "unroutable",
                    format!(
                        "unroutable: no queue bound to exchange {:?} for routing key {:?} (broker returned it: {reply_code} {reply_text}); bind a queue, the message is retried",
                        route.exchange,
                        render_template(&route.routing_key, batch[i].row),
                    ),
                )),
                Ack::Nacked => Outcome::Failed(SinkError::retriable(
                    "nack",
                    format!(
                        "nack: RabbitMQ refused the message on exchange {:?} (e.g. a queue at its length limit with overflow = reject-publish); it is retried",
                        route.exchange
                    ),
                )),
                Ack::Failed(e) => Outcome::Failed(e),
            });
        }
        complete_outcomes(outcomes)
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.service.live().map(|_| ())
    }
}
