//! RabbitMQ (AMQP 0.9.1, lapin): a queue consumer with manual acks, and a publisher with
//! confirms.
//!
//! - **Source.** Declares the route's queue (`source.topic`; durable, quorum by default, optionally
//!   single-active-consumer) and binds it to `source.exchange` if one is given, then consumes with
//!   manual acks and `basic.qos` = `prefetch`, the most deliveries the broker lets this consumer
//!   hold. A delivery is acked when it is done (docs/guarantees.md#g1) or after its dead letter was
//!   written; one the pipeline gives up (shutdown) is nacked with requeue, so it goes back to the
//!   queue at once. The quorum queue's `x-delivery-count` gives the attempts already made. A
//!   dropped connection (a broker restart) is reopened with a jittered, capped backoff; what the
//!   old channel held is requeued by the broker. The source is ready ([`Source::health`]) once it
//!   consumes; refusals only a change fixes (login or access refused, a vhost that does not exist,
//!   the queue declared with other arguments, a missing exchange) are
//!   [`BrokerError::Misconfigured`] with what to change, and retried slowly.
//! - **Sink.** Publishes to the broker's `exchange` with the record's topic as routing key,
//!   persistent, `mandatory` (an unroutable record is an error naming exchange and routing key,
//!   not a silent drop), and awaits the publisher confirm of every record. The `lockgate-id`
//!   header is also the AMQP `message_id`. On the default exchange (`""`, routing straight to
//!   the queue named by the topic) the sink declares each destination queue once (durable,
//!   quorum) unless it exists.
//! - **Keys.** AMQP has no message key: a key travels in the `lockgate-key` header.
//! - **Positions.** A queue has no offsets: records have no position (like core NATS), so
//!   `idempotency.key = "position"` does not apply; use a header, the key or the payload.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};

use super::{Ack, AckHandle, AckKind, BrokerError, Delivery, Scan, Sink, Source};

use futures_util::future::BoxFuture;

use crate::config::{QueueType, RabbitConfig, RabbitSource as SourceConfig};
use crate::health::{Backoff, HealthReporter, HealthWatch};
use crate::message::{CORRELATION_HEADER, LOCKGATE_ID_HEADER, OutRecord, Record};

/// Header that carries a message key through AMQP (which has none).
pub const KEY_HEADER: &str = "lockgate-key";
/// Header of a message put back through a retry queue: the attempts already made.
pub const ATTEMPTS_HEADER: &str = "lockgate-attempts";
/// Retry queues are deleted after going unused this long beyond their delay.
const RETRY_QUEUE_IDLE: Duration = Duration::from_secs(600);

/// The delay tier a backoff is rounded to: ten per decade (each about 26% above the last), so
/// a route's jittered backoffs share a handful of retry queues and the delay is off by at most
/// about 13%.
pub fn retry_tier(delay: Duration) -> Duration {
    let ms = delay.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        return Duration::from_millis(1);
    }
    let step = (ms.log10() * 10.0).round();
    Duration::from_millis(10f64.powf(step / 10.0).round() as u64)
}

/// The queue a retry waits in: `<queue>.retry.<ms>`, whose message TTL dead-letters it back
/// into `<queue>` through the default exchange.
fn retry_queue(queue: &str, tier: Duration) -> String {
    format!("{queue}.retry.{}", tier.as_millis())
}
/// AMQP delivery mode of a message the broker writes to disk.
const PERSISTENT: u8 = 2;

fn unavailable(broker: &str, what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("rabbitmq {broker}: {what}: {e}"))
}

/// The error of request `what` on broker `broker`, classified: a refusal only a change fixes
/// is [`BrokerError::Misconfigured`] with what to change; anything else (a broker that is down,
/// a dropped connection, a queue locked by another connection) is
/// [`BrokerError::Unavailable`].
pub fn classify(broker: &str, what: &str, e: &lapin::Error) -> BrokerError {
    // The server's own words ("ACCESS_REFUSED - Login was refused ...") say it best.
    let error = match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("rabbitmq {broker}: {what}: {}", amqp.get_message())
        }
        _ => format!("rabbitmq {broker}: {what}: {e}"),
    };
    let misconfigured = |fix: String| BrokerError::Misconfigured {
        error: error.clone(),
        fix,
    };
    let amqp = match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp,
        lapin::ErrorKind::IOError(io) if io.to_string().contains("invalid peer certificate") => {
            return misconfigured(format!(
                "trust the server's certificate: set brokers.{broker}.ca_file to the CA certificate that signed it"
            ));
        }
        _ => return BrokerError::Unavailable(error),
    };
    let text = amqp.get_message().as_str();
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) if text.contains("Login was refused") => {
            misconfigured(format!(
                "check the user name and password in the URL of brokers.{broker}, or create that user on the server"
            ))
        }
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => misconfigured(
            "give the URL's user permissions on it (rabbitmqctl set_permissions -p <vhost> <user> <configure> <write> <read>), or use a user that has them".into(),
        ),
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => misconfigured(format!(
            "check the vhost in the URL of brokers.{broker}: it must exist and its user must have access to it (rabbitmqctl add_vhost / set_permissions)"
        )),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            if text.contains("'x-queue-type'") =>
        {
            misconfigured(
                "the queue exists with another type: set the route's source.queue_type to the queue's type (\"classic\" or \"quorum\"), or delete the queue (rabbitmqctl delete_queue <queue>) so lockgate declares it".into(),
            )
        }
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => misconfigured(
            "the queue exists with other arguments than the route declares (see the reason): make the route's source settings match the queue, or delete the queue so lockgate declares it".into(),
        ),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) if text.contains("no exchange") => {
            misconfigured(
                "declare the exchange on the server, or correct the route's source.exchange"
                    .into(),
            )
        }
        _ => BrokerError::Unavailable(error),
    }
}

/// Waits at most `limit` for `request`, an exchange with broker `broker`. lapin can leave a
/// request unanswered forever when the server goes away in the middle of it
/// (amqp-rs/lapin#409); one that never ends would hold its message and lane, or every
/// publisher of the route, for good. Past the limit it is an unavailable broker like any
/// other: the caller drops the connection and retries.
async fn answered<T>(
    limit: Duration,
    broker: &str,
    what: &str,
    request: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit, request).await {
        Ok(r) => r,
        Err(_) => Err(unavailable(
            broker,
            what,
            format!("no answer within {} ms", limit.as_millis()),
        )),
    }
}

/// Opens a connection to broker `name`. The error never contains the URL (it may hold a
/// password).
pub async fn connect(name: &str, cfg: &RabbitConfig) -> Result<Connection, BrokerError> {
    let url = cfg.url().map_err(|e| BrokerError::Invalid(e.to_string()))?;
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            BrokerError::Invalid(format!(
                "brokers.{name}.ca_file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        tls.cert_chain = Some(pem);
    }
    let builder = lapin::DefaultConnectionBuilder::new()
        .map_err(|e| classify(name, "connect", &e))?
        .with_uri_str(url)
        .with_properties(ConnectionProperties::default())
        .with_tls_config(tls);
    answered(cfg.request_timeout, name, "connect", async {
        builder
            .connect()
            .await
            .map_err(|e| classify(name, "connect", &e))
    })
    .await
}

/// A header value as bytes: strings as they are, numbers and booleans as text; other types
/// (tables, arrays) are not carried.
fn value_bytes(v: &AMQPValue) -> Option<Vec<u8>> {
    Some(match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
        AMQPValue::Timestamp(n) => n.to_string().into_bytes(),
        _ => return None,
    })
}

fn value_u32(v: &AMQPValue) -> Option<u32> {
    match v {
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// A delivery as the pipeline sees it, and the attempts already made.
fn record(queue: &str, d: &lapin::message::Delivery) -> (Record, u32) {
    let props = &d.properties;
    let mut headers = Vec::new();
    let mut key = None;
    let mut delivered_before = None;
    let mut retried = 0;
    if let Some(table) = props.headers() {
        for (name, value) in table {
            match name.as_str() {
                "x-delivery-count" => delivered_before = value_u32(value),
                ATTEMPTS_HEADER => {
                    retried = value_bytes(value)
                        .and_then(|v| String::from_utf8(v).ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                }
                // The broker's record of the retry queues it passed through.
                "x-death"
                | "x-first-death-exchange"
                | "x-first-death-queue"
                | "x-first-death-reason" => {}
                KEY_HEADER => key = value_bytes(value),
                n => {
                    if let Some(v) = value_bytes(value) {
                        headers.push((n.to_owned(), v));
                    }
                }
            }
        }
    }
    if let Some(id) = props.message_id()
        && !headers.iter().any(|(n, _)| n == LOCKGATE_ID_HEADER)
    {
        headers.push((
            LOCKGATE_ID_HEADER.to_owned(),
            id.as_str().as_bytes().to_vec(),
        ));
    }
    // The request's correlation id: the pipeline copies it onto the answers.
    if let Some(c) = props.correlation_id()
        && !headers.iter().any(|(n, _)| n == CORRELATION_HEADER)
    {
        headers.push((
            CORRELATION_HEADER.to_owned(),
            c.as_str().as_bytes().to_vec(),
        ));
    }
    // Classic queues only say "redelivered", not how often. A copy put back through a retry
    // queue is a new message: its header counts the attempts before it.
    let previous = retried + delivered_before.unwrap_or(u32::from(d.redelivered));
    let record = Record {
        topic: queue.to_owned(),
        partition: None,
        offset: None,
        key,
        headers,
        payload: d.data.clone(),
        timestamp_ms: props.timestamp().map(|s| s.saturating_mul(1000)),
        reply_to: props.reply_to().as_ref().map(|r| r.as_str().to_owned()),
    };
    (record, previous)
}

/// Acks a delivery; an ack its closed channel could not carry is an error (the broker has
/// requeued the message already), not a silent success, and so is one unanswered within
/// `limit` (the message may come again; with idempotency on it is then a duplicate).
async fn ack_now(acker: &lapin::Acker, limit: Duration) -> Result<(), BrokerError> {
    match tokio::time::timeout(limit, acker.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(BrokerError::Unavailable(
            "rabbitmq: ack: the delivery's channel is closed; the broker delivers it again".into(),
        )),
        Ok(Err(e)) => Err(BrokerError::Unavailable(format!("rabbitmq: ack: {e}"))),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "rabbitmq: ack: no answer within {} ms; the broker may deliver it again",
            limit.as_millis()
        ))),
    }
}

/// Gives a delivery back to its queue (nack with requeue), waiting at most `limit`. Failing
/// is harmless: the broker requeues whatever a closed channel held.
async fn give_back(acker: &lapin::Acker, limit: Duration) {
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    match tokio::time::timeout(limit, acker.nack(requeue)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Giving a delivery back failed; the broker requeues it when the channel closes");
        }
        Err(_) => {
            tracing::debug!(
                "Giving a delivery back got no answer; the broker requeues it when the channel closes"
            );
        }
    }
}

/// Acks one delivery. Dropped without an ack (the route gave the message up), it nacks with
/// requeue, so the message goes back to the queue now rather than when the channel closes.
struct RabbitAck {
    acker: Option<lapin::Acker>,
    /// The broker's `request_timeout`.
    limit: Duration,
    /// With `retry.mode = "broker"`: what a redelivery needs.
    retry: Option<Box<Retry>>,
}

/// A delivery's copy for a retry queue, and where to publish it.
struct Retry {
    channel: Channel,
    queue: String,
    properties: BasicProperties,
    data: Vec<u8>,
    /// Attempts made, the failed one included.
    attempts: u32,
}

impl Retry {
    /// Puts the copy in the retry queue of `delay`'s tier (declared on first use) and waits
    /// for the broker's confirm.
    async fn publish(self, delay: Duration) -> Result<(), BrokerError> {
        let tier = retry_tier(delay);
        let name = retry_queue(&self.queue, tier);
        let err = |what: &str, e: lapin::Error| {
            BrokerError::Unavailable(format!("rabbitmq: {what} {name}: {e}"))
        };
        let mut args = FieldTable::default();
        let ms = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
        let idle = i64::try_from((tier + RETRY_QUEUE_IDLE).as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(idle));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.queue.as_str())),
        );
        self.channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| err("declare retry queue", e))?;
        // The broker's x-death record rides along (the source does not show it to the
        // handler); it names only retry queues, so RabbitMQ's cycle check (a message reaching
        // the same queue twice without a rejection) never drops the copy.
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.attempts.to_string())),
        );
        let properties = self.properties.with_headers(headers);
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &self.data,
                properties,
            )
            .await
            .map_err(|e| err("publish to", e))?
            .await
            .map_err(|e| err("confirm from", e))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            _ => Err(BrokerError::Unavailable(format!(
                "rabbitmq: the broker did not take the retry copy into {name}"
            ))),
        }
    }
}

impl Ack for RabbitAck {
    fn ack(mut self: Box<Self>, _kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        let acker = self.acker.take();
        let limit = self.limit;
        Box::pin(async move {
            let Some(acker) = acker else { return Ok(()) };
            // A dead letter was written, so a dead-lettered delivery is acked too.
            ack_now(&acker, limit).await
        })
    }

    /// Puts a copy in the retry queue of `delay`'s tier, whose TTL dead-letters it back into the
    /// source queue, then acks this delivery. If the copy cannot be published the delivery is
    /// given back at once (nack with requeue) instead.
    fn redeliver(
        mut self: Box<Self>,
        delay: Duration,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let retry = self.retry.take();
        let acker = self.acker.take();
        let limit = self.limit;
        Box::pin(async move {
            let (Some(retry), Some(acker)) = (retry, acker) else {
                return Err(BrokerError::Invalid(
                    "rabbitmq: this source was not opened for retry.mode = \"broker\"".into(),
                ));
            };
            let published = match tokio::time::timeout(limit, retry.publish(delay)).await {
                Ok(r) => r,
                Err(_) => Err(BrokerError::Unavailable(format!(
                    "rabbitmq: retry copy: no answer within {} ms",
                    limit.as_millis()
                ))),
            };
            if let Err(e) = published {
                give_back(&acker, limit).await;
                return Err(e);
            }
            ack_now(&acker, limit).await
        })
    }

    /// False once the delivery's channel closed (a reconnect, or the source let go of it while
    /// the breaker was open): the broker has requeued it, so handling it here would only repeat
    /// it.
    fn is_current(&self) -> bool {
        self.acker.as_ref().is_some_and(lapin::Acker::usable)
    }
}

impl Drop for RabbitAck {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let limit = self.limit;
            rt.spawn(async move { give_back(&acker, limit).await });
        }
    }
}

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
fn queue_arguments(settings: &SourceConfig) -> FieldTable {
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
                        let (record, previous_attempts) = record(&self.queue, &d);
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

/// Longest a `lockgate check --connect` probe waits for the server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `e` is the server's NOT_FOUND (a passive declare of something that does not exist).
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if *a.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Connects to broker `broker` and logs in (for `lockgate check --connect`).
pub async fn probe_connect(broker: &str, cfg: &RabbitConfig) -> Result<(), BrokerError> {
    let limit = cfg.request_timeout.min(PROBE_TIMEOUT);
    answered(limit, broker, "connect", async {
        let conn = connect(broker, cfg).await?;
        let _ = conn.close(200, "check done".into()).await;
        Ok(())
    })
    .await
}

/// What `lockgate check --connect` finds for a source on queue `queue`, changing nothing: the
/// login, whether the queue exists with the arguments the route declares (an existing queue is
/// declared again with them, which changes nothing when they match and fails with
/// PRECONDITION_FAILED when they differ) and whether the exchange to bind to exists. Returns
/// what `lockgate run` would create.
pub async fn probe_source(
    broker: &str,
    cfg: &RabbitConfig,
    queue: &str,
    settings: &SourceConfig,
) -> Result<Vec<String>, BrokerError> {
    let limit = cfg.request_timeout.min(PROBE_TIMEOUT);
    answered(limit, broker, &format!("check queue {queue}"), async {
        let conn = connect(broker, cfg).await?;
        let result = probe_queue(&conn, broker, queue, settings).await;
        let _ = conn.close(200, "check done".into()).await;
        result
    })
    .await
}

async fn probe_queue(
    conn: &Connection,
    broker: &str,
    queue: &str,
    settings: &SourceConfig,
) -> Result<Vec<String>, BrokerError> {
    // A refused declare closes its channel: one channel per question.
    let channel = || async {
        conn.create_channel()
            .await
            .map_err(|e| classify(broker, "open a channel", &e))
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut notes = Vec::new();
    let declare = format!("declare queue {queue}");
    match channel()
        .await?
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            channel()
                .await?
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::durable(),
                    queue_arguments(settings),
                )
                .await
                .map_err(|e| classify(broker, &declare, &e))?;
        }
        Err(e) if is_not_found(&e) => notes.push(format!(
            "queue {queue} does not exist yet: `lockgate run` declares it (durable, {})",
            match settings.queue_type {
                QueueType::Quorum => "quorum",
                QueueType::Classic => "classic",
            }
        )),
        Err(e) => return Err(classify(broker, &declare, &e)),
    }
    if let Some(exchange) = &settings.exchange {
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..lapin::options::ExchangeDeclareOptions::default()
        };
        channel()
            .await?
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(broker, &format!("declare exchange {exchange}"), &e))?;
        notes.push(format!(
            "`lockgate run` binds queue {queue} to exchange {exchange} with key \"{}\"",
            settings.binding_key
        ));
    }
    Ok(notes)
}

/// Records read per [`Scan::next_batch`].
const SCAN_BATCH: usize = 500;

/// Reads a queue (a DLQ) from its head without consuming it: each message is taken with
/// `basic.get` and left unacknowledged, and closing the scan gives all of them back. Only the
/// messages the queue held when the scan opened are read. Queues have no offsets, so a
/// record's position is `<queue>/-/<n>` with `n` derived from its `lockgate-id` (or, lacking
/// one, its `message_id` or payload): the same letter has the same position in every scan,
/// which is what replay markers name.
pub struct RabbitScan {
    conn: Connection,
    channel: Channel,
    /// The broker's `request_timeout`.
    limit: Duration,
    queue: String,
    broker: String,
    /// Messages the queue held at open.
    initial: u32,
    remaining: u32,
    /// Delivery tag of the last message taken.
    last_tag: Option<u64>,
}

impl RabbitScan {
    /// Opens a scan of `queue` on broker `broker`.
    pub async fn open(broker: &str, cfg: &RabbitConfig, queue: &str) -> Result<Self, BrokerError> {
        let what = format!("read {queue}");
        answered(
            cfg.request_timeout,
            broker,
            &what,
            Self::open_now(broker, cfg, queue),
        )
        .await
    }

    async fn open_now(broker: &str, cfg: &RabbitConfig, queue: &str) -> Result<Self, BrokerError> {
        let conn = connect(broker, cfg).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| unavailable(broker, "open a channel", e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let remaining = match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            // No queue, no dead letters.
            Err(_) => 0,
        };
        let channel = if channel.status().connected() {
            channel
        } else {
            conn.create_channel()
                .await
                .map_err(|e| unavailable(broker, "open a channel", e))?
        };
        Ok(Self {
            conn,
            channel,
            limit: cfg.request_timeout,
            queue: queue.to_owned(),
            broker: broker.to_owned(),
            initial: remaining,
            remaining,
            last_tag: None,
        })
    }

    /// Gives every message taken back and waits (up to 10 s, or half the broker's
    /// `request_timeout`) until the queue holds at least
    /// what it held at open: a quorum queue requeues asynchronously, and the next scan (a
    /// replay reads the DLQ twice) must see every letter again.
    async fn give_back(&mut self) -> Result<(), BrokerError> {
        let Some(tag) = self.last_tag.take() else {
            let _ = self.conn.close(200, "scan done".into()).await;
            return Ok(());
        };
        let all = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        self.channel
            .basic_nack(tag, all)
            .await
            .map_err(|e| unavailable(&self.broker, &format!("give back {}", self.queue), e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        // Within the request's own limit, which covers this whole call.
        let deadline = tokio::time::Instant::now() + (self.limit / 2).min(Duration::from_secs(10));
        loop {
            let ready = self
                .channel
                .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                .await
                .map(|q| q.message_count())
                .unwrap_or(0);
            if ready >= self.initial || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.conn.close(200, "scan done".into()).await;
        Ok(())
    }
}

/// A stable number for a scanned message: the first 8 bytes of the SHA-256 of its
/// `lockgate-id` (dead letters always have one), else of its payload.
fn scan_offset(record: &Record) -> u64 {
    use sha2::{Digest, Sha256};
    let basis = record
        .header(LOCKGATE_ID_HEADER)
        .unwrap_or(record.payload.as_slice());
    let digest = Sha256::digest(basis);
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // Positive in an i64 too (positions are printed and parsed).
    u64::from_be_bytes(head) >> 1
}

impl Scan for RabbitScan {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>> {
        let (limit, broker) = (self.limit, self.broker.clone());
        let what = format!("read {}", self.queue);
        Box::pin(async move { answered(limit, &broker, &what, self.next_batch_now()).await })
    }
}

impl RabbitScan {
    async fn next_batch_now(&mut self) -> Result<Option<Vec<Record>>, BrokerError> {
        if self.remaining == 0 {
            self.give_back().await?;
            return Ok(None);
        }
        let mut out = Vec::new();
        while out.len() < SCAN_BATCH && self.remaining > 0 {
            let got = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| unavailable(&self.broker, &format!("read {}", self.queue), e))?;
            let Some(m) = got else {
                self.remaining = 0;
                break;
            };
            self.remaining -= 1;
            self.last_tag = Some(m.delivery.delivery_tag);
            let (mut record, _) = record(&self.queue, &m.delivery);
            record.offset = Some(scan_offset(&record));
            out.push(record);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_to_tiers_within_thirteen_percent() {
        assert_eq!(retry_tier(Duration::from_millis(300)).as_millis(), 316);
        assert_eq!(retry_tier(Duration::from_millis(600)).as_millis(), 631);
        assert_eq!(retry_tier(Duration::from_millis(1000)).as_millis(), 1000);
        assert_eq!(retry_tier(Duration::ZERO).as_millis(), 1);
        let mut last = Duration::ZERO;
        for ms in (1..200_000).step_by(7) {
            let d = Duration::from_millis(ms);
            let t = retry_tier(d);
            let off = (t.as_secs_f64() - d.as_secs_f64()).abs() / d.as_secs_f64();
            assert!(off <= 0.13 || ms < 10, "{ms} ms -> {t:?}");
            assert!(t >= last, "tiers must not decrease");
            last = t;
        }
        // Ten per decade: every delay from 100 ms to 30 s shares 26 queues.
        let tiers: HashSet<Duration> = (100..30_000)
            .map(|ms| retry_tier(Duration::from_millis(ms)))
            .collect();
        assert_eq!(tiers.len(), 26);
    }

    fn amqp(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(kind, text.into())).into()
    }

    fn fix_of(e: &BrokerError) -> &str {
        match e {
            BrokerError::Misconfigured { fix, .. } => fix,
            other => panic!("not a misconfiguration: {other:?}"),
        }
    }

    #[test]
    fn refusals_only_a_change_fixes_are_misconfigurations_with_the_fix() {
        let login = classify(
            "rabbit",
            "connect",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN.",
            ),
        );
        assert!(fix_of(&login).contains("user name and password in the URL of brokers.rabbit"));
        // The server's words, not lapin's wrapping.
        assert_eq!(
            login.failure().error,
            "rabbitmq rabbit: connect: ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN."
        );
        let permissions = classify(
            "rabbit",
            "declare queue q",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'",
            ),
        );
        assert!(fix_of(&permissions).contains("set_permissions"));
        let vhost = classify(
            "rabbit",
            "connect",
            &amqp(
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
                "NOT_ALLOWED - vhost nope not found",
            ),
        );
        assert!(fix_of(&vhost).contains("vhost"));
        let classic = classify(
            "rabbit",
            "declare queue q",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none",
            ),
        );
        assert!(fix_of(&classic).contains("source.queue_type"));
        let durable = classify(
            "rabbit",
            "declare queue q",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q'",
            ),
        );
        assert!(fix_of(&durable).contains("other arguments"));
        let exchange = classify(
            "rabbit",
            "bind queue q to events",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'events' in vhost '/'",
            ),
        );
        assert!(fix_of(&exchange).contains("declare the exchange"));
    }

    #[test]
    fn what_goes_away_by_itself_is_transient() {
        for e in [
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            amqp(
                AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED),
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'q'",
            ),
            // A queue deleted under the consumer is declared again on the next attempt.
            amqp(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no queue 'q' in vhost '/'",
            ),
            amqp(
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
                "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
            ),
        ] {
            let c = classify("rabbit", "consume", &e);
            assert!(matches!(c, BrokerError::Unavailable(_)), "{e}: {c:?}");
            assert_eq!(c.failure().kind, crate::health::FailureKind::Transient);
        }
    }

    #[test]
    fn retry_queues_are_named_after_their_source_and_tier() {
        assert_eq!(
            retry_queue("orders", Duration::from_millis(316)),
            "orders.retry.316"
        );
    }
}
