//! The RabbitMQ publisher ([`RabbitSink`]): persistent, `mandatory` publishes to the broker's
//! exchange with publisher confirms, declaring destination queues on the default exchange, and
//! the variant that answers requests on their reply-to queue.

use std::collections::HashSet;

use futures_util::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::broker::{BrokerError, Sink};
use crate::config::RabbitConfig;
use crate::message::{CORRELATION_HEADER, LOCKGATE_ID_HEADER, OutRecord};

use super::KEY_HEADER;
use super::connect::{answered, classify, connect, unavailable};

/// AMQP delivery mode of a message the broker writes to disk.
const PERSISTENT: u8 = 2;

/// The open publishing channel of a [`RabbitSink`] and the queues it declared.
struct Publisher {
    conn: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

/// Publishes to one broker's `exchange` with publisher confirms.
pub struct RabbitSink {
    broker: String,
    cfg: RabbitConfig,
    open: tokio::sync::Mutex<Option<Publisher>>,
    /// Answers to requests: to the default exchange (a reply-to names a queue), never
    /// declaring it (it belongs to the requester).
    replies: bool,
}

impl std::fmt::Debug for RabbitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSink")
            .field("broker", &self.broker)
            .field("exchange", &self.cfg.exchange)
            .finish_non_exhaustive()
    }
}

impl RabbitSink {
    /// A publisher to broker `broker`; connects on first use.
    pub fn new(broker: &str, cfg: &RabbitConfig) -> Self {
        Self {
            broker: broker.to_owned(),
            cfg: cfg.clone(),
            open: tokio::sync::Mutex::new(None),
            replies: false,
        }
    }

    /// A publisher of answers to requests on broker `broker`: each goes to the queue its
    /// topic (the request's `reply_to`) names, through the default exchange, with the
    /// request's `correlation_id`.
    pub fn replies(broker: &str, cfg: &RabbitConfig) -> Self {
        Self {
            replies: true,
            ..Self::new(broker, cfg)
        }
    }

    async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let conn = connect(&self.broker, &self.cfg).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| unavailable(&self.broker, "open a channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| unavailable(&self.broker, "confirm.select", e))?;
        Ok(Publisher {
            conn,
            channel,
            declared: HashSet::new(),
        })
    }

    /// Declares queue `name` (durable, quorum) unless it exists. A passive declare on a
    /// channel of its own asks first, because a failed declare closes its channel.
    async fn declare(&self, p: &mut Publisher, name: &str) -> Result<(), BrokerError> {
        let probe = p
            .conn
            .create_channel()
            .await
            .map_err(|e| unavailable(&self.broker, "open a channel", e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let exists = probe
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
            .is_ok();
        if probe.status().connected() {
            let _ = probe.close(200, "done".into()).await;
        }
        if !exists {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            p.channel
                .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
                .await
                .map_err(|e| classify(&self.broker, &format!("declare queue {name}"), &e))?;
        }
        p.declared.insert(name.to_owned());
        Ok(())
    }

    async fn send(&self, p: &mut Publisher, records: &[OutRecord]) -> Result<(), BrokerError> {
        let exchange = if self.replies {
            ""
        } else {
            self.cfg.exchange.as_str()
        };
        if exchange.is_empty() && !self.replies {
            for r in records {
                if !p.declared.contains(&r.topic) {
                    self.declare(p, &r.topic).await?;
                }
            }
        }
        let mut confirms = Vec::with_capacity(records.len());
        for r in records {
            let mut table = FieldTable::default();
            let mut message_id = None;
            let mut correlation = None;
            for (name, value) in &r.headers {
                if name == LOCKGATE_ID_HEADER {
                    message_id = Some(String::from_utf8_lossy(value).into_owned());
                }
                if name == CORRELATION_HEADER {
                    correlation = Some(String::from_utf8_lossy(value).into_owned());
                    continue;
                }
                table.insert(
                    name.as_str().into(),
                    AMQPValue::LongString(LongString::from(value.clone())),
                );
            }
            if let Some(k) = &r.key {
                table.insert(
                    KEY_HEADER.into(),
                    AMQPValue::LongString(LongString::from(k.clone())),
                );
            }
            let mut props = BasicProperties::default()
                .with_delivery_mode(PERSISTENT)
                .with_headers(table);
            if let Some(id) = message_id {
                props = props.with_message_id(ShortString::from(id));
            }
            if let Some(c) = correlation {
                props = props.with_correlation_id(ShortString::from(c));
            }
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let confirm = p
                .channel
                .basic_publish(
                    exchange.into(),
                    r.topic.as_str().into(),
                    options,
                    &r.payload,
                    props,
                )
                .await
                .map_err(|e| unavailable(&self.broker, "publish", e))?;
            confirms.push((confirm, &r.topic));
        }
        for (confirm, topic) in confirms {
            match confirm
                .await
                .map_err(|e| unavailable(&self.broker, "publisher confirm", e))?
            {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                    return Err(BrokerError::Invalid(format!(
                        "rabbitmq {}: unroutable: exchange \"{exchange}\" has no queue bound for routing key \"{topic}\" ({} {})",
                        self.broker, returned.reply_code, returned.reply_text
                    )));
                }
                Confirmation::Nack(None) => {
                    return Err(unavailable(
                        &self.broker,
                        "publish",
                        format!("the broker refused the message for routing key \"{topic}\""),
                    ));
                }
                Confirmation::NotRequested => {}
            }
        }
        Ok(())
    }
}

impl Sink for RabbitSink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let limit = self.cfg.request_timeout;
            let mut open = self.open.lock().await;
            if open
                .as_ref()
                .is_none_or(|p| !p.channel.status().connected())
            {
                *open = Some(answered(limit, &self.broker, "connect", self.publisher()).await?);
            }
            let Some(p) = open.as_mut() else {
                return Err(unavailable(&self.broker, "publish", "no channel"));
            };
            let result = answered(limit, &self.broker, "publish", self.send(p, &records)).await;
            if matches!(result, Err(BrokerError::Unavailable(_))) {
                // Start over on a fresh connection next time.
                *open = None;
            }
            result
        })
    }
}
