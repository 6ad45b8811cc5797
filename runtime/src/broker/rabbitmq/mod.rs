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
//!
//! Files: `connect.rs` (opening a connection, classifying the server's refusals, bounding every
//! request), `record.rs` (an AMQP message as a [`Record`](crate::message::Record)), `source.rs`
//! and `ack.rs` (the consumer and its acknowledgements), `retry_queues.rs` (`retry.mode =
//! "broker"`: the delay tiers and the queues a retry waits in), `sink.rs` (the publisher),
//! `scan.rs` (reading a DLQ queue for `lockgate dlq`), `probe.rs` (`lockgate check --connect`),
//! `connector.rs` (all of them for one broker, as the runtime opens them).

mod ack;
mod connect;
mod connector;
mod probe;
mod record;
mod retry_queues;
mod scan;
mod sink;
mod source;

pub use connect::{classify, connect};
pub use connector::RabbitConnector;
pub use probe::{probe_connect, probe_source};
pub use retry_queues::retry_tier;
pub use scan::RabbitScan;
pub use sink::RabbitSink;
pub use source::RabbitSource;

/// Header that carries a message key through AMQP (which has none).
pub const KEY_HEADER: &str = "lockgate-key";
/// Header of a message put back through a retry queue: the attempts already made.
pub const ATTEMPTS_HEADER: &str = "lockgate-attempts";
