//! Brokers: where messages come from ([`Source`]) and where outputs and dead letters go
//! ([`Sink`]).
//!
//! The traits are deliberately small so one broker fits in its folder: a source hands out
//! [`Delivery`]s, each carrying an [`AckHandle`] that the pipeline resolves exactly once when the
//! message is *done* (docs/guarantees.md#g1); a sink publishes a batch and returns only once the
//! broker acknowledged every record. Ordering, retries, breakers and idempotency live in
//! [`crate::pipeline`], never in a broker adapter.
//!
//! Each broker kind also implements [`Connector`], which opens all of the above for a route or a
//! command; `crate::app::clients` picks the connector by the broker's kind.
//!
//! Backends: [`kafka`], [`nats`] (core and JetStream), [`rabbitmq`], [`local`] (the embedded,
//! file-backed broker), the PostgreSQL tables that stand where a broker would
//! ([`pg_outbox`] as a source, [`pg_dead_letters`] as a DLQ), and [`memory`] (in-process, for
//! unit tests and benchmarks of the pipeline).

pub mod connector;
pub mod kafka;
pub mod local;
pub mod memory;
pub mod nats;
pub mod offsets;
pub mod pg_dead_letters;
pub mod pg_outbox;
pub mod rabbitmq;

use futures_util::future::BoxFuture;

pub use connector::{Connector, Probe, SourceProbe};

use crate::health::{Failure, FailureKind, HealthWatch};
use crate::message::{OutRecord, Record};

/// Errors from a broker adapter.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker (or its files) cannot be reached or written now; trying again later may work.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The request is wrong and retrying will not help (bad topic name, record too large).
    #[error("{0}")]
    Invalid(String),
    /// The source was closed (shutdown): no more deliveries.
    #[error("source closed")]
    Closed,
    /// The broker refused something only a change fixes: credentials, access rights, a queue
    /// or stream declared differently, a topic or stream that does not exist. Retrying unchanged
    /// fails the same way.
    #[error("{error}; fix: {fix}")]
    Misconfigured {
        /// What failed and what the broker said.
        error: String,
        /// What to change.
        fix: String,
    },
}

impl BrokerError {
    /// The failure as a route's health reports it: [`BrokerError::Misconfigured`] and
    /// [`BrokerError::Invalid`] are misconfigurations, the rest transient.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Misconfigured { error, fix } => {
                Failure::misconfigured(error.clone(), fix.clone())
            }
            Self::Invalid(e) => Failure {
                kind: FailureKind::Misconfigured,
                error: e.clone(),
                fix: None,
            },
            Self::Unavailable(e) => Failure::transient(e.clone()),
            Self::Closed => Failure::transient("source closed"),
        }
    }
}

impl From<Failure> for BrokerError {
    fn from(f: Failure) -> Self {
        match (f.kind, f.fix) {
            (FailureKind::Misconfigured, Some(fix)) => Self::Misconfigured {
                error: f.error,
                fix,
            },
            (FailureKind::Misconfigured, None) => Self::Invalid(f.error),
            (FailureKind::Transient, _) => Self::Unavailable(f.error),
        }
    }
}

/// How a message was finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckKind {
    /// The handler succeeded and its outputs were acknowledged, or it was a duplicate.
    Done,
    /// The message was written to the dead-letter destination (brokers that distinguish this,
    /// like JetStream's `term`, use it; others treat it like `Done`).
    DeadLettered,
}

/// Resolves one delivery. Implemented by each broker.
pub trait Ack: Send + 'static {
    /// Tells the broker the message is finished. For brokers that commit positions
    /// (local, Kafka) this marks the offset done; the position advances over the contiguous
    /// prefix of done messages and is committed in the background.
    fn ack(self: Box<Self>, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Whether this process still owns the message. False once its partition was revoked
    /// (Kafka rebalance): the new owner gets it again, so handling it here would only repeat
    /// its outputs.
    fn is_current(&self) -> bool {
        true
    }

    /// Gives the message back for redelivery after `delay` (JetStream's `nak`). Brokers that
    /// cannot do that leave it unacknowledged, as if dropped.
    fn redeliver(
        self: Box<Self>,
        delay: std::time::Duration,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let _ = delay;
        Box::pin(async { Ok(()) })
    }
}

/// The pipeline's handle on one delivery. Dropping it without [`AckHandle::ack`] leaves the
/// message unacknowledged: the broker redelivers it (after a restart, a rebalance or its ack
/// timeout), which is what an abandoned message must do.
pub struct AckHandle(Box<dyn Ack>);

impl AckHandle {
    /// Wraps a broker's acknowledger.
    pub fn new(ack: impl Ack) -> Self {
        Self(Box::new(ack))
    }

    /// Finishes the delivery.
    pub async fn ack(self, kind: AckKind) -> Result<(), BrokerError> {
        self.0.ack(kind).await
    }

    /// See [`Ack::is_current`].
    pub fn is_current(&self) -> bool {
        self.0.is_current()
    }

    /// Asks the broker to deliver the message again after `delay` (see [`Ack::redeliver`]).
    pub async fn redeliver(self, delay: std::time::Duration) -> Result<(), BrokerError> {
        self.0.redeliver(delay).await
    }
}

impl std::fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckHandle")
    }
}

/// One message from a source and the handle that finishes it.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub record: Record,
    /// Resolve once the message is done; drop to leave it for redelivery.
    pub ack: AckHandle,
    /// Attempts already made by earlier deliveries, when the broker counts them (JetStream's
    /// delivery count, RabbitMQ's `x-delivery-count`); 0 when unknown.
    pub previous_attempts: u32,
}

/// The backlog of one partition (or stream) of a source: messages not yet committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lag {
    /// Topic or subject.
    pub topic: String,
    /// Partition, when the broker has them.
    pub partition: Option<i32>,
    /// Messages behind.
    pub messages: u64,
}

/// A source's backlog, refreshed by the source in the background (reading it costs nothing).
#[derive(Clone, Debug, Default)]
pub struct LagGauge(std::sync::Arc<std::sync::Mutex<Vec<Lag>>>);

impl LagGauge {
    /// Replaces the readings.
    pub fn set(&self, lag: Vec<Lag>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = lag;
    }

    /// The latest readings.
    pub fn get(&self) -> Vec<Lag> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// How often sources refresh their [`LagGauge`].
pub const LAG_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a route's messages come from.
///
/// The pipeline pulls: it calls [`Source::next`] only when it has room (in-flight bound, rate
/// limit, breaker), so a source never needs its own buffering policy. [`Source::pause`] is called
/// when the route stops pulling for a while (breaker open) so brokers that must keep polling
/// (Kafka's `max.poll.interval.ms`) can pause their partitions instead.
pub trait Source: Send + 'static {
    /// A one-line description for logs (`local topic orders, group lockgate`).
    fn describe(&self) -> String;

    /// The source's backlog, when the broker can tell (Kafka lag, JetStream pending).
    fn lag(&self) -> Option<LagGauge> {
        None
    }

    /// Whether the source is connected and consuming, and why not: what makes its route ready
    /// (`/readyz`). Sources with nothing to connect to are ready for good (the default).
    fn health(&self) -> HealthWatch {
        crate::health::always_ready()
    }

    /// The next delivery, waiting until one arrives. [`BrokerError::Closed`] ends the stream.
    ///
    /// A broker that is unreachable or refuses the source is retried *inside* `next` (with
    /// [`crate::health::Backoff`]) and reported through [`Source::health`]; an error returned
    /// here ends the route.
    ///
    /// Must be cancel-safe: the pipeline drops a pending `next` when the breaker opens or the
    /// route stops, and no message may be lost or skipped by that.
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>>;

    /// The route will not pull for a while.
    fn pause(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// The route pulls again.
    fn resume(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    /// Commits every position that is done (called at shutdown, after in-flight work finished
    /// or was abandoned). Acks issued before this call are included.
    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>>;
}

/// Reads a topic from its beginning up to the end it had when the scan was opened: what the
/// dead-letter tools (`lockgate dlq`) use to list and replay a DLQ without joining a consumer
/// group or committing anything. Records appended after the scan opened are not returned.
pub trait Scan: Send {
    /// The next records (in order within each partition), or `None` once the end is reached.
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>>;

    /// What its records' offsets are: the broker's own, unless it says otherwise.
    fn numbering(&self) -> crate::dlq::Numbering {
        crate::dlq::Numbering::Offsets
    }
}

/// Where outputs and dead letters go.
pub trait Sink: Send + Sync + 'static {
    /// Publishes `records` and returns once the broker acknowledged all of them. A sink that can
    /// deduplicate drops a record whose [`LOCKGATE_ID_HEADER`] it already holds.
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>>;
}
