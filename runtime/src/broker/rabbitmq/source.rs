//! The RabbitMQ consumer ([`RabbitSource`]): declares and binds its queue, consumes with manual
//! acks and `prefetch`, reconnects with backoff, pauses by cancelling its consumer (with a
//! watchdog against the broker's `consumer_timeout`), and reports its health.

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, Consumer};

use crate::broker::{AckHandle, BrokerError, Delivery, Source};
use crate::config::{QueueType, RabbitConfig, RabbitSource as SourceConfig};
use crate::health::{Backoff, HealthReporter, HealthWatch};

use super::ack::{RabbitAck, give_back};
use super::connect::{answered, classify, connect, unavailable};
use super::record::record;
use super::retry_queues::Retry;

/// A source's connection, its channel and (unless paused) its consumer.
struct Open {
    conn: Connection,
    channel: Channel,
    consumer: Option<Consumer>,
    /// With `retry.mode = "broker"`: a channel with publisher confirms for the retry copies.
    retries: Option<Channel>,
}

/// Consumes one queue.
pub struct RabbitSource {
    broker: String,
    cfg: RabbitConfig,
    queue: String,
    settings: SourceConfig,
    /// The consumer tag of the current `basic.consume` (a fresh one each time: RabbitMQ 3.10
    /// crashes the channel when a quorum queue delivers to a tag cancelled and reused).
    tag: String,
    consumes: u64,
    open: Option<Open>,
    backoff: Backoff,
    health: HealthReporter,
    /// While paused: closes the channel before the broker's `consumer_timeout` would.
    watchdog: Option<tokio::task::JoinHandle<()>>,
    /// `retry.mode = "broker"`: failed deliveries wait in retry queues.
    broker_retries: bool,
}

impl std::fmt::Debug for RabbitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSource")
            .field("broker", &self.broker)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl RabbitSource {
    /// A consumer of `queue` on broker `broker`; connects on first use.
    pub fn new(broker: &str, cfg: &RabbitConfig, queue: &str, settings: &SourceConfig) -> Self {
        Self {
            broker: broker.to_owned(),
            cfg: cfg.clone(),
            queue: queue.to_owned(),
            settings: settings.clone(),
            tag: String::new(),
            consumes: 0,
            open: None,
            backoff: Backoff::new(),
            health: HealthReporter::new(),
            watchdog: None,
            broker_retries: false,
        }
    }

    /// Failed deliveries are retried through retry queues (`retry.mode = "broker"`).
    pub fn with_broker_retries(mut self) -> Self {
        self.broker_retries = true;
        self
    }

    async fn consume(&mut self, ch: &Channel) -> Result<Consumer, BrokerError> {
        self.consumes += 1;
        self.tag = format!("lockgate-{}-{}", crate::message::new_owner(), self.consumes);
        ch.basic_consume(
            self.queue.as_str().into(),
            self.tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|x| classify(&self.broker, &format!("consume queue {}", self.queue), &x))
    }

    async fn open(&mut self) -> Result<Open, BrokerError> {
        let conn = connect(&self.broker, &self.cfg).await?;
        let e = |what: &str, e: lapin::Error| classify(&self.broker, what, &e);
        let ch = conn
            .create_channel()
            .await
            .map_err(|x| e("open a channel", x))?;
        ch.basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(|x| e("basic.qos", x))?;
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            queue_arguments(&self.settings),
        )
        .await
        .map_err(|x| e(&format!("declare queue {}", self.queue), x))?;
        if let Some(exchange) = &self.settings.exchange {
            ch.queue_bind(
                self.queue.as_str().into(),
                exchange.as_str().into(),
                self.settings.binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|x| e(&format!("bind queue {} to {exchange}", self.queue), x))?;
        }
        let retries = if self.broker_retries {
            let r = conn
                .create_channel()
                .await
                .map_err(|x| e("open a channel", x))?;
            r.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|x| e("confirm.select", x))?;
            Some(r)
        } else {
            None
        };
        let consumer = self.consume(&ch).await?;
        Ok(Open {
            conn,
            channel: ch,
            consumer: Some(consumer),
            retries,
        })
    }

    /// Reports `error` (the route logs it) and waits before the next attempt: briefly, with
    /// jitter, for a broker that is away; slowly for a refusal only a change fixes.
    async fn wait(&mut self, error: &BrokerError) {
        tracing::debug!(broker = %self.broker, queue = %self.queue, error = %error, "RabbitMQ consumer down; reconnecting");
        self.health
            .retry_after(&mut self.backoff, error.failure())
            .await;
    }
}

/// The arguments the source declares its queue with.
pub(super) fn queue_arguments(settings: &SourceConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if settings.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    if settings.single_active_consumer {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

impl Source for RabbitSource {
    fn describe(&self) -> String {
        format!("rabbitmq {} queue {}", self.broker, self.queue)
    }

    fn health(&self) -> HealthWatch {
        self.health.watch()
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            loop {
                if self.open.is_none() {
                    let (limit, broker) = (self.cfg.request_timeout, self.broker.clone());
                    let what = format!("consume queue {}", self.queue);
                    match answered(limit, &broker, &what, self.open()).await {
                        Ok(open) => {
                            self.backoff.reset();
                            self.health.ready();
                            self.open = Some(open);
                        }
                        Err(e) => {
                            self.wait(&e).await;
                            continue;
                        }
                    }
                }
                let Some(open) = self.open.as_mut() else {
                    continue;
                };
                let retries = open.retries.clone();
                let Some(consumer) = open.consumer.as_mut() else {
                    // Paused and resumed on a closed channel: open anew.
                    self.open = None;
                    continue;
                };
                let error = match consumer.next().await {
                    Some(Ok(d)) => {
                        let (mut record, previous_attempts) = record(&self.queue, &d);
                        // A queue has no offsets: a message without a `message_id` is told
                        // apart by this delivery's number.
                        record.delivery = Some(crate::message::next_delivery());
                        let retry = retries.map(|channel| {
                            Box::new(Retry {
                                channel,
                                queue: self.queue.clone(),
                                properties: d.properties.clone(),
                                data: d.data.clone(),
                                attempts: previous_attempts + 1,
                            })
                        });
                        return Ok(Delivery {
                            record,
                            ack: AckHandle::new(RabbitAck {
                                acker: Some(d.acker),
                                limit: self.cfg.request_timeout,
                                retry,
                            }),
                            previous_attempts,
                        });
                    }
                    Some(Err(e)) => classify(&self.broker, "consume", &e),
                    None => {
                        unavailable(&self.broker, "consume", "the broker cancelled the consumer")
                    }
                };
                self.open = None;
                self.wait(&error).await;
            }
        })
    }

    /// Cancels the consumer and gives back what it had received but not handed out, so the
    /// broker holds the messages while the breaker is open. Deliveries the route already holds
    /// stay on the channel; if the pause lasts half the broker's `consumer_timeout`, the channel
    /// is closed (the broker requeues them, and the route skips them as no longer current)
    /// before the broker would close it for the timeout.
    fn pause(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let Some(open) = self.open.as_mut() else {
                return Ok(());
            };
            let limit = self.cfg.request_timeout;
            if let Some(mut consumer) = open.consumer.take() {
                let cancel = open
                    .channel
                    .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
                if !matches!(tokio::time::timeout(limit, cancel).await, Ok(Ok(()))) {
                    // Dropping the connection ends the consumer and requeues what it held.
                    self.open = None;
                    return Ok(());
                }
                while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
                    give_back(&d.acker, limit).await;
                }
            }
            let channel = open.channel.clone();
            let after = self.cfg.consumer_timeout / 2;
            let (broker, queue) = (self.broker.clone(), self.queue.clone());
            self.watchdog = Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                tracing::info!(broker = %broker, queue = %queue, paused_ms = after.as_millis() as u64, "Paused for half of consumer_timeout: closing the channel so the broker requeues what the route holds");
                let _ = channel
                    .close(200, "paused by lockgate's circuit breaker".into())
                    .await;
            }));
            Ok(())
        })
    }

    fn resume(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            if let Some(w) = self.watchdog.take() {
                w.abort();
            }
            let Some(open) = self.open.take() else {
                return Ok(());
            };
            if open.consumer.is_some() {
                self.open = Some(open);
            } else if open.channel.status().connected() {
                // On failure `next` opens a new connection.
                let limit = self.cfg.request_timeout;
                if let Ok(Ok(c)) = tokio::time::timeout(limit, self.consume(&open.channel)).await {
                    self.open = Some(Open {
                        consumer: Some(c),
                        ..open
                    });
                }
            }
            Ok(())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            if let Some(w) = self.watchdog.take() {
                w.abort();
            }
            // Closing the connection requeues whatever it still holds (and so does dropping
            // it, if the server does not answer the close).
            if let Some(open) = self.open.take() {
                let close = open.conn.close(200, "lockgate stopping".into());
                let _ = tokio::time::timeout(self.cfg.request_timeout, close).await;
            }
            Ok(())
        })
    }
}

impl Drop for RabbitSource {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
    }
}
