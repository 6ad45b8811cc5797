//! `[routes.<name>] source`: a broker source with the settings of its broker's kind, or an
//! outbox relay.

use std::time::Duration;

use super::dlq::DLQ_STORE_PREFIX;
use super::{DEFAULT_GROUP, MAX_BATCH_LIMIT, StoreNames, check_broker, not_postgres};
use crate::config::reader::Reader;
use crate::config::schema;

/// The name of the embedded broker: a route names it without defining it.
pub const LOCAL_BROKER: &str = "local";

/// A broker a route reads from or writes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BrokerRef {
    /// The embedded broker (`"local"`), whose files are in the state directory.
    Local,
    /// A `[brokers.<name>]` table.
    Named(String),
}

impl BrokerRef {
    /// The reference a broker name in the config makes.
    pub fn from_name(name: &str) -> Self {
        if name == LOCAL_BROKER {
            Self::Local
        } else {
            Self::Named(name.to_owned())
        }
    }

    /// The name as the config spells it.
    pub fn name(&self) -> &str {
        match self {
            Self::Local => LOCAL_BROKER,
            Self::Named(name) => name,
        }
    }
}

impl std::fmt::Display for BrokerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a route's messages come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A topic, subject or queue of a broker.
    Broker(BrokerSource),
    /// A PostgreSQL store's `outbox` table: the route relays its rows.
    Outbox(OutboxSource),
}

impl SourceSpec {
    /// The broker source, unless this is an outbox relay.
    pub fn as_broker(&self) -> Option<&BrokerSource> {
        match self {
            Self::Broker(b) => Some(b),
            Self::Outbox(_) => None,
        }
    }

    /// The topic (subject, queue) read; for an outbox relay, [`OUTBOX_TABLE`].
    pub fn topic(&self) -> &str {
        match self {
            Self::Broker(b) => &b.topic,
            Self::Outbox(_) => OUTBOX_TABLE,
        }
    }

    /// Where the source reads, as the DLQ tools print it: a broker name or `store:<name>`.
    pub fn place(&self) -> String {
        match self {
            Self::Broker(b) => b.broker.name().to_owned(),
            Self::Outbox(o) => format!("{DLQ_STORE_PREFIX}{}", o.store),
        }
    }

    /// Whether this source is on broker `name`.
    pub fn is_on_broker(&self, name: &str) -> bool {
        self.as_broker().is_some_and(|b| b.broker.name() == name)
    }
}

/// A source on a broker: `source = { broker, topic, group, ... }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerSource {
    /// The broker.
    pub broker: BrokerRef,
    /// Topic, subject (NATS, wildcards allowed) or queue (RabbitMQ).
    pub topic: String,
    /// Consumer group (Kafka and the embedded broker), queue group (core NATS) or durable
    /// consumer name (JetStream).
    pub group: String,
    /// The settings only one broker kind has.
    pub options: SourceOptions,
}

/// The source settings of one broker kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceOptions {
    /// None: the embedded broker, Kafka, or core NATS (a NATS source without `stream`).
    Plain,
    /// A JetStream durable pull consumer (a NATS source with `stream`).
    JetStream(JetStreamSource),
    /// A RabbitMQ queue consumer.
    RabbitMq(RabbitSource),
}

/// A JetStream source: a durable pull consumer on a stream (`source.stream` is set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JetStreamSource {
    /// `stream`: the stream the consumer reads (it must exist).
    pub stream: String,
    /// `ack_wait_ms`: how long the server waits for an ack before redelivering. lockgate sends
    /// `in_progress` every half of it while a message is held.
    pub ack_wait: Duration,
    /// `max_ack_pending`: most unacknowledged messages the server hands this consumer.
    pub max_ack_pending: u32,
    /// `max_deliver`: deliveries before the server gives up on a message; `None` = unlimited.
    pub max_deliver: Option<u32>,
}

/// A route that relays a PostgreSQL store's `outbox` table: `source = { outbox = "<store>" }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxSource {
    /// `outbox`: the `[stores.<name>]` (kind `postgres`) whose table is relayed.
    pub store: String,
    /// `batch`: most rows leased by one query.
    pub batch: u32,
    /// `lease_ms`: how long leased rows stay this relay's before another may take them (renewed
    /// while they are held).
    pub lease: Duration,
    /// `poll_ms`: how often the table is read when no notification arrives.
    pub poll: Duration,
    /// `retention_ms`: how long published rows are kept before the cleanup deletes them.
    pub retention: Duration,
    /// `cleanup_every_ms`: time between cleanups.
    pub cleanup_every: Duration,
}

/// Default `batch` of an outbox source.
pub const DEFAULT_OUTBOX_BATCH: u32 = 256;
/// Default `lease_ms` of an outbox source.
pub const DEFAULT_OUTBOX_LEASE_MS: u64 = 30_000;
/// Default `poll_ms` of an outbox source: the fallback when a notification is lost.
pub const DEFAULT_OUTBOX_POLL_MS: u64 = 1_000;
/// Default `retention_ms` of an outbox source (one day).
pub const DEFAULT_OUTBOX_RETENTION_MS: u64 = 24 * 3600 * 1000;
/// Default `cleanup_every_ms` of an outbox source.
pub const DEFAULT_OUTBOX_CLEANUP_EVERY_MS: u64 = 60_000;
/// The `topic` of an outbox source's endpoint (the table it reads).
pub const OUTBOX_TABLE: &str = "outbox";

/// The kind of queue a RabbitMQ source declares (`queue_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// A quorum queue (the default): replicated, and it counts deliveries
    /// (`x-delivery-count`), which lockgate takes as the attempts already made.
    #[default]
    Quorum,
    /// A classic queue.
    Classic,
}

/// A RabbitMQ source: the queue is `source.topic`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RabbitSource {
    /// `queue_type`: declared when the queue does not exist (an existing queue must match).
    pub queue_type: QueueType,
    /// `prefetch`: most unacknowledged deliveries the broker hands this consumer (`basic.qos`).
    pub prefetch: u16,
    /// `exchange`: bind the queue to this exchange (which must exist).
    pub exchange: Option<String>,
    /// `binding_key`: the binding's routing key (default `#`, everything on a topic exchange).
    pub binding_key: String,
    /// `single_active_consumer`: with several processes on one queue, only one consumes at a
    /// time (the others take over when it goes), so the queue's order holds across processes.
    pub single_active_consumer: bool,
}

/// Default `prefetch` of a RabbitMQ source.
pub const DEFAULT_PREFETCH: u16 = 1_000;

impl Default for RabbitSource {
    fn default() -> Self {
        Self {
            queue_type: QueueType::default(),
            prefetch: DEFAULT_PREFETCH,
            exchange: None,
            binding_key: "#".to_owned(),
            single_active_consumer: false,
        }
    }
}

/// Default `ack_wait_ms` of a JetStream source.
pub const DEFAULT_ACK_WAIT_MS: u64 = 30_000;
/// Default `max_ack_pending` of a JetStream source (the route's in-flight bound).
pub const DEFAULT_MAX_ACK_PENDING: u32 = 1_000;

/// `source`: a broker source (with the settings of its broker's kind) or an outbox relay
/// (`None` after a problem).
pub(super) fn parse_source(
    r: &mut Reader<'_>,
    brokers: &[&str],
    nats_brokers: &[&str],
    rabbit_brokers: &[&str],
    store_names: &StoreNames<'_>,
) -> Option<SourceSpec> {
    let t = match r.table("source") {
        None => {
            if !r.has("source") {
                r.problem(
                    "source",
                    "missing: e.g. source = { broker = \"local\", topic = \"orders\" }".into(),
                );
            }
            return None;
        }
        Some(t) if t.contains_key("outbox") => {
            let mut s = r.child("source", t, &[&schema::SOURCE_OUTBOX]);
            return parse_outbox_source(&mut s, store_names.all, store_names.postgres)
                .map(SourceSpec::Outbox);
        }
        Some(t) => t,
    };
    let mut s = r.child(
        "source",
        t,
        &[
            &schema::SOURCE,
            &schema::SOURCE_JETSTREAM,
            &schema::SOURCE_RABBITMQ,
        ],
    );
    let broker = s
        .string("broker")
        .unwrap_or_else(|| LOCAL_BROKER.to_owned());
    let broker_ok = check_broker(&mut s, "broker", &broker, brokers);
    if !s.has("topic") {
        s.problem("topic", "missing".into());
    }
    let topic = s.non_empty("topic");
    let group = match s.string("group") {
        Some(g) if g.is_empty() => {
            s.problem("group", "must not be empty".into());
            None
        }
        Some(g) => Some(g),
        None => Some(DEFAULT_GROUP.to_owned()),
    };
    // A field of another kind's source is named as such, not as an unknown field.
    let foreign = |s: &mut Reader<'_>, t: &schema::Table, kind: &str| {
        if let Some(f) = t.fields.iter().map(|f| f.key).find(|k| s.has(k)) {
            s.problem(
                f,
                format!(
                    "only a source on a `kind = \"{kind}\"` broker has this (`{broker}` is not one)"
                ),
            );
        }
    };
    let options = if nats_brokers.contains(&broker.as_str()) {
        let js = parse_jetstream(&mut s);
        foreign(&mut s, &schema::SOURCE_RABBITMQ, "rabbitmq");
        js.map_or(SourceOptions::Plain, SourceOptions::JetStream)
    } else if rabbit_brokers.contains(&broker.as_str()) {
        foreign(&mut s, &schema::SOURCE_JETSTREAM, "nats");
        SourceOptions::RabbitMq(parse_rabbit_source(&mut s))
    } else {
        foreign(&mut s, &schema::SOURCE_JETSTREAM, "nats");
        foreign(&mut s, &schema::SOURCE_RABBITMQ, "rabbitmq");
        SourceOptions::Plain
    };
    s.finish();
    match (broker_ok, topic, group) {
        (true, Some(topic), Some(group)) => Some(SourceSpec::Broker(BrokerSource {
            broker: BrokerRef::from_name(&broker),
            topic,
            group,
            options,
        })),
        _ => None,
    }
}

/// The RabbitMQ fields of a source.
pub(super) fn parse_rabbit_source(s: &mut Reader<'_>) -> RabbitSource {
    let queue_type = s
        .choice(
            "queue_type",
            &[
                ("quorum", QueueType::Quorum),
                ("classic", QueueType::Classic),
            ],
        )
        .unwrap_or_default();
    let prefetch = match s.positive_u32("prefetch") {
        Some(p) => u16::try_from(p).unwrap_or_else(|_| {
            s.problem(
                "prefetch",
                format!("{p} is over RabbitMQ's limit of {}", u16::MAX),
            );
            DEFAULT_PREFETCH
        }),
        None => DEFAULT_PREFETCH,
    };
    let exchange = s.non_empty("exchange");
    let binding_key = s.string("binding_key");
    if binding_key.is_some() && exchange.is_none() {
        s.problem(
            "binding_key",
            "needs `exchange`: the binding is from that exchange to the queue".into(),
        );
    }
    let single_active_consumer = s.bool("single_active_consumer").unwrap_or(false);
    RabbitSource {
        queue_type,
        prefetch,
        exchange,
        binding_key: binding_key.unwrap_or_else(|| "#".to_owned()),
        single_active_consumer,
    }
}

/// `source = { outbox = "<store>", ... }`.
pub(super) fn parse_outbox_source(
    s: &mut Reader<'_>,
    stores: &[&str],
    pg_stores: &[&str],
) -> Option<OutboxSource> {
    let store = s.non_empty("outbox");
    if let Some(why) = store.as_deref().and_then(|store| {
        not_postgres(
            store,
            stores,
            pg_stores,
            "only kind = \"postgres\" has an outbox table",
        )
    }) {
        s.problem("outbox", why);
    }
    for f in ["broker", "topic", "group", "stream"] {
        if s.has(f) {
            s.problem(
                f,
                "an outbox source reads a table, not a broker: it has `outbox` (the store) instead"
                    .into(),
            );
        }
    }
    let batch = s.positive_u32("batch").unwrap_or(DEFAULT_OUTBOX_BATCH);
    if batch > MAX_BATCH_LIMIT {
        s.problem(
            "batch",
            format!("{batch} is over the limit of {MAX_BATCH_LIMIT}"),
        );
    }
    let ms = |s: &mut Reader<'_>, key: &str, default: u64| {
        Duration::from_millis(s.positive(key).unwrap_or(default))
    };
    let lease = ms(s, "lease_ms", DEFAULT_OUTBOX_LEASE_MS);
    let poll = ms(s, "poll_ms", DEFAULT_OUTBOX_POLL_MS);
    let retention = ms(s, "retention_ms", DEFAULT_OUTBOX_RETENTION_MS);
    let cleanup_every = ms(s, "cleanup_every_ms", DEFAULT_OUTBOX_CLEANUP_EVERY_MS);
    s.finish();
    Some(OutboxSource {
        store: store?,
        batch,
        lease,
        poll,
        retention,
        cleanup_every,
    })
}

pub(super) fn is_wildcard(subject: &str) -> bool {
    subject.split('.').any(|t| t == "*" || t == ">")
}

/// Whether NATS subject `filter` (with `*` and `>` wildcards) matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The JetStream fields of a NATS source; `None` (core NATS) when `stream` is absent.
pub(super) fn parse_jetstream(s: &mut Reader<'_>) -> Option<JetStreamSource> {
    let stream = s.non_empty("stream");
    let ack_wait = s.positive("ack_wait_ms").unwrap_or(DEFAULT_ACK_WAIT_MS);
    let max_ack_pending = s
        .positive_u32("max_ack_pending")
        .unwrap_or(DEFAULT_MAX_ACK_PENDING);
    let max_deliver = s.positive_u32("max_deliver");
    let Some(stream) = stream else {
        if let Some(f) = ["ack_wait_ms", "max_ack_pending", "max_deliver"]
            .iter()
            .find(|f| s.has(f))
        {
            s.problem(f, "needs `stream`: only JetStream sources have it".into());
        }
        return None;
    };
    Some(JetStreamSource {
        stream,
        ack_wait: Duration::from_millis(ack_wait),
        max_ack_pending,
        max_deliver,
    })
}
