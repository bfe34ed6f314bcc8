//! RabbitMQ (AMQP 0-9-1): one topic exchange and one durable queue per benchmark
//! (`outbox_bench_<hex>`, bound with the benchmark topic as routing key), the relay's AMQP sink
//! routed to the exchange (publisher confirms, `mandatory`, persistent messages: the sink's
//! defaults), and an auto-ack consumer on a connection of its own as the independent reader.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use outbox_relay::sinks::amqp::{AmqpConfig, AmqpExchange, AmqpRoute};
use outbox_relay::sinks::SinkConfig;
use tokio::sync::mpsc;

use super::{Broker, Destination, TOPIC};

/// How many unacknowledged deliveries the consumer lets the broker push ahead.
const PREFETCH: u16 = 1000;

async fn open(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {}",
                outbox_relay::redact_url(url)
            )
        })?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

pub struct AmqpBroker {
    url: String,
}

impl AmqpBroker {
    /// Checks that the broker answers (one connection, closed at once).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (conn, _) = tokio::time::timeout(std::time::Duration::from_secs(5), open(url))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "RabbitMQ at {} did not answer within 5 s",
                    outbox_relay::redact_url(url)
                )
            })??;
        let _ = conn.close(200, "probe".into()).await;
        Ok(Self {
            url: url.to_string(),
        })
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    fn version(&self) -> String {
        // lapin does not expose the server properties of the handshake.
        "RabbitMQ (AMQP 0-9-1)".into()
    }

    async fn prepare(&self, run: &str) -> anyhow::Result<Box<dyn Destination>> {
        let name = format!("outbox_bench_{run}");
        let (conn, channel) = open(&self.url).await?;
        // Declared as the relay declares it (durable topic exchange), so that both agree.
        let exchange = AmqpExchange {
            name: name.clone(),
            ..AmqpExchange::default()
        };
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: exchange.durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot declare the exchange {name}"))?;
        let dest = AmqpDestination {
            url: self.url.clone(),
            name: name.clone(),
            exchange,
            conn,
            channel,
            consumer_conn: Mutex::new(None),
        };
        let declared = async {
            dest.channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            dest.channel
                .queue_bind(
                    name.as_str().into(),
                    name.as_str().into(),
                    TOPIC.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await;
        if let Err(e) = declared {
            dest.cleanup().await;
            return Err(anyhow::Error::new(e).context(format!("cannot declare the queue {name}")));
        }
        Ok(Box::new(dest))
    }
}

struct AmqpDestination {
    url: String,
    /// The exchange and the queue share this name.
    name: String,
    exchange: AmqpExchange,
    conn: Connection,
    channel: Channel,
    consumer_conn: Mutex<Option<Connection>>,
}

#[async_trait]
impl Destination for AmqpDestination {
    fn sink_config(&self) -> SinkConfig {
        SinkConfig::Amqp(AmqpConfig {
            url: self.url.clone(),
            exchanges: vec![self.exchange.clone()],
            routes: vec![AmqpRoute {
                topics: vec![TOPIC.into()],
                exchange: self.name.clone(),
                routing_key: "{topic}".into(),
            }],
            ..AmqpConfig::default()
        })
    }

    async fn consume(&self, tx: mpsc::UnboundedSender<(String, Instant)>) -> anyhow::Result<()> {
        let (conn, channel) = open(&self.url).await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.name.as_str().into(),
                format!("{}_reader", self.name).as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot consume the queue {}", self.name))?;
        if let Ok(mut slot) = self.consumer_conn.lock() {
            *slot = Some(conn);
        }
        tokio::spawn(async move {
            // Ends when the queue is deleted or the connection closed (cleanup).
            while let Some(next) = consumer.next().await {
                let at = Instant::now();
                let Ok(d) = next else { break };
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                if tx.send((id, at)).is_err() {
                    break;
                }
            }
        });
        Ok(())
    }

    /// Messages ready in the queue (a running consumer takes them out).
    async fn stored(&self) -> anyhow::Result<u64> {
        let q = self
            .channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count() as u64)
    }

    async fn cleanup(&self) {
        let consumer_conn = self.consumer_conn.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = consumer_conn {
            let _ = c.close(200, "bench done".into()).await;
        }
        if let Err(e) = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            eprintln!(
                "warning: could not delete RabbitMQ queue {}: {e}",
                self.name
            );
        }
        if let Err(e) = self
            .channel
            .exchange_delete(self.name.as_str().into(), ExchangeDeleteOptions::default())
            .await
        {
            eprintln!(
                "warning: could not delete RabbitMQ exchange {}: {e}",
                self.name
            );
        }
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}
