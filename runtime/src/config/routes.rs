//! `[routes.<name>]`: where messages come from, which handler runs them, and the delivery
//! policies around each call.
//!
//! Example:
//! ```toml
//! [routes.orders]
//! handler = "router"
//! source = { broker = "local", topic = "orders", group = "lockgate" }
//! outputs = ["orders.valid", "orders.misc"]
//! concurrency = 4
//! ordering = "key"
//! retry = { max_attempts = 5, initial_backoff_ms = 100, max_backoff_ms = 10000 }
//! circuit_breaker = { consecutive_failures = 5, open_ms = 10000 }
//! dlq = { topic = "orders.dlq" }
//! idempotency = { key = "header:idempotency-key", ttl_ms = 86400000 }
//! rate_limit = { per_second = 500, burst = 50 }
//! ```

use std::time::Duration;

use super::reader::Reader;
use super::schema;
use crate::policy::backoff::{Jitter, RetryMode, RetryPolicy};
use crate::policy::breaker::BreakerConfig;
use crate::policy::rate_limit::RateLimitConfig;

/// Brokers every config can name without defining them. `local` is the embedded broker.
pub const BUILTIN_BROKERS: &[&str] = &[LOCAL_BROKER];
/// Consumer group used when a route's source names none.
pub const DEFAULT_GROUP: &str = "lockgate";
/// How long a completed idempotency key is remembered by default (7 days): longer than any
/// broker's redelivery horizon in common setups.
pub const DEFAULT_IDEMPOTENCY_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// How long a claim on an idempotency key holds by default (30 s): after a crash, the keys the
/// crashed process held wait this long before another process may run them.
pub const DEFAULT_IDEMPOTENCY_LEASE_MS: u64 = 30_000;
/// The built-in state store: redb in the state directory.
pub const EMBEDDED_STORE: &str = "embedded";
/// Most lanes a route may run.
pub const MAX_CONCURRENCY: u32 = 1024;
/// Messages of one lane handled before their outputs are published together, by default.
pub const DEFAULT_MAX_BATCH: u32 = 256;
/// Largest `max_batch` accepted.
pub const MAX_BATCH_LIMIT: u32 = 10_000;

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

/// Where a route's dead letters go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DlqTarget {
    /// A topic on a broker (`dlq = { broker, topic }`).
    Broker {
        /// The broker.
        broker: BrokerRef,
        /// The topic, subject or queue.
        topic: String,
    },
    /// A PostgreSQL store's `dead_letters` table (`dlq = { store, topic }`).
    Table {
        /// The `[stores.<name>]` (kind `postgres`).
        store: String,
        /// The DLQ's name in the table's `dlq` column.
        topic: String,
    },
}

/// How [`DlqTarget`]'s `Display` names a dead-letter table's place (`store:pg:orders.dlq`), so
/// it cannot be mistaken for a broker (broker names cannot contain a colon).
pub const DLQ_STORE_PREFIX: &str = "store:";

impl DlqTarget {
    /// The topic, or the DLQ's name in a dead-letter table.
    pub fn topic(&self) -> &str {
        match self {
            Self::Broker { topic, .. } | Self::Table { topic, .. } => topic,
        }
    }

    /// The store whose dead-letter table this DLQ is, if it is one.
    pub fn store(&self) -> Option<&str> {
        match self {
            Self::Table { store, .. } => Some(store),
            Self::Broker { .. } => None,
        }
    }

    /// Where the DLQ lives, as `lockgate dlq` prints it: a broker name or `store:<name>`.
    pub fn place(&self) -> String {
        match self {
            Self::Broker { broker, .. } => broker.name().to_owned(),
            Self::Table { store, .. } => format!("{DLQ_STORE_PREFIX}{store}"),
        }
    }
}

impl std::fmt::Display for DlqTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.place(), self.topic())
    }
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

/// How a route's outputs leave it (`outputs.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputsMode {
    /// Published to the outputs broker and acknowledged there before the source is acked (the
    /// default).
    #[default]
    Publish,
    /// Written as rows of the PostgreSQL state store's `outbox` table, in the one transaction
    /// that also commits the handler's kv writes and the message's idempotency key; a route with
    /// an outbox source publishes them.
    Outbox,
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

/// How messages of one source are spread over lanes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ordering {
    /// In order per partition (the default): one lane per partition at a time.
    #[default]
    Partition,
    /// In order per message key: different keys of one partition run in parallel.
    Key,
}

/// Where an idempotency key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdempotencyKey {
    /// A header (`"header:<name>"`).
    Header(String),
    /// The message key (`"key"`).
    MessageKey,
    /// A JSON pointer into the payload (`"json:/order/id"`).
    JsonPointer(String),
    /// The broker position: topic, partition and offset (`"position"`).
    Position,
}

/// A route's `idempotency` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// Where the key comes from.
    pub key: IdempotencyKey,
    /// How long a completed key is remembered.
    pub ttl: Duration,
    /// How long a claim holds before another process may take the key over.
    pub lease: Duration,
}

/// One validated route.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// The route's name (the table key).
    pub name: String,
    /// The `[handlers.<name>]` it runs; `None` only for an outbox relay, which then publishes
    /// each row as it is.
    pub handler: Option<String>,
    /// Where messages come from.
    pub source: SourceSpec,
    /// Topics the handler may publish to.
    pub outputs: Vec<String>,
    /// Where outputs go: published, or written to the state store's outbox table.
    pub outputs_mode: OutputsMode,
    /// The broker outputs are published to (`outputs.broker`; the source's broker by default).
    pub outputs_broker: BrokerRef,
    /// Number of lanes.
    pub concurrency: u32,
    /// What order is kept.
    pub ordering: Ordering,
    /// Up to this many queued messages of one lane are handled in a row, their outputs published
    /// in one batch and then acknowledged together.
    pub max_batch: u32,
    /// Retry policy (defaults apply when the table is absent).
    pub retry: RetryPolicy,
    /// Circuit breaker; none unless configured.
    pub circuit_breaker: Option<BreakerConfig>,
    /// Dead-letter destination; defaults to `<source topic>.dlq` on the source's broker (an
    /// outbox relay's: in its store's dead-letter table).
    pub dlq: DlqTarget,
    /// Idempotency; off unless configured.
    pub idempotency: Option<IdempotencyConfig>,
    /// Rate limit; none unless configured.
    pub rate_limit: Option<RateLimitConfig>,
    /// `state`: the store of this route's idempotency keys and its handler's kv; `None` takes
    /// `[runtime] state`.
    pub state: Option<String>,
}

impl RouteConfig {
    /// Whether this route relays a PostgreSQL outbox instead of reading a broker.
    pub fn relays_outbox(&self) -> bool {
        matches!(self.source, SourceSpec::Outbox(_))
    }

    /// Whether the route reads from, publishes to or dead-letters to broker `name`.
    pub fn uses_broker(&self, name: &str) -> bool {
        self.source.is_on_broker(name)
            || self.outputs_broker.name() == name
            || matches!(&self.dlq, DlqTarget::Broker { broker, .. } if broker.name() == name)
    }

    /// Whether the route reads store `name`'s outbox or dead-letters into its table (its state
    /// store aside).
    pub fn uses_store_tables(&self, name: &str) -> bool {
        matches!(&self.source, SourceSpec::Outbox(o) if o.store == name)
            || self.dlq.store() == Some(name)
    }
}

fn check_broker(r: &mut Reader<'_>, key: &str, broker: &str, declared: &[&str]) -> bool {
    if BUILTIN_BROKERS.contains(&broker) || declared.contains(&broker) {
        return true;
    }
    let known: Vec<&str> = BUILTIN_BROKERS
        .iter()
        .chain(declared.iter().filter(|d| !BUILTIN_BROKERS.contains(d)))
        .copied()
        .collect();
    r.problem(
        key,
        format!("unknown broker `{broker}` (known: {})", known.join(", ")),
    );
    false
}

/// The state stores a route can name: every declared one, the PostgreSQL ones, and the
/// `[runtime] state` default.
pub(super) struct StoreNames<'a> {
    pub all: &'a [&'a str],
    pub postgres: &'a [&'a str],
    pub default: &'a str,
}

/// Parses one route table; `handlers`, `brokers` and `stores` are the names declared in the
/// file.
pub(super) fn parse_route(
    name: &str,
    handlers: &[&str],
    brokers: &[&str],
    nats_brokers: &[&str],
    rabbit_brokers: &[&str],
    store_names: &StoreNames<'_>,
    r: &mut Reader<'_>,
) -> Option<RouteConfig> {
    let (stores, pg_stores) = (store_names.all, store_names.postgres);
    let before = r.problem_count();
    let state = r.string("state");
    if let Some(st) = &state {
        super::stores::check_store(r, "state", st, stores);
    }
    let relays = r
        .get("source")
        .and_then(toml::Value::as_table)
        .is_some_and(|t| t.contains_key("outbox"));

    let handler = match r.string("handler") {
        // A relay without a handler publishes its rows as they are.
        None if relays && !r.has("handler") => None,
        None if !r.has("handler") => {
            r.problem(
                "handler",
                "missing: the name of a [handlers.<name>] table".into(),
            );
            None
        }
        None => None,
        Some(h) if handlers.contains(&h.as_str()) => Some(h),
        Some(h) => {
            let known = if handlers.is_empty() {
                "none are defined".to_owned()
            } else {
                format!("defined: {}", handlers.join(", "))
            };
            r.problem("handler", format!("unknown handler `{h}` ({known})"));
            None
        }
    };

    let source = parse_source(r, brokers, nats_brokers, rabbit_brokers, store_names);

    let (outputs, outputs_mode, outputs_broker) = parse_outputs(r, brokers, source.as_ref());
    if outputs.iter().any(String::is_empty) {
        r.problem("outputs", "topics must not be empty".into());
    }

    let concurrency = r.positive_u32("concurrency").unwrap_or(1);
    if concurrency > MAX_CONCURRENCY {
        r.problem(
            "concurrency",
            format!("{concurrency} is over the limit of {MAX_CONCURRENCY}"),
        );
    }
    let ordering = r
        .choice(
            "ordering",
            &[("partition", Ordering::Partition), ("key", Ordering::Key)],
        )
        .unwrap_or_default();
    let max_batch = r.positive_u32("max_batch").unwrap_or(DEFAULT_MAX_BATCH);
    if max_batch > MAX_BATCH_LIMIT {
        r.problem(
            "max_batch",
            format!("{max_batch} is over the limit of {MAX_BATCH_LIMIT}"),
        );
    }

    let retry = match r.table("retry") {
        Some(t) => parse_retry(&mut r.child("retry", t, &[&schema::RETRY])),
        None => RetryPolicy::default(),
    };
    if retry.mode == RetryMode::Broker {
        match source.as_ref().map(|s| s.as_broker().map(|b| &b.options)) {
            None | Some(Some(SourceOptions::RabbitMq(_))) => {}
            Some(Some(SourceOptions::JetStream(js)))
                if js.max_deliver.is_some_and(|m| m < retry.max_attempts) =>
            {
                r.problem(
                    "source.max_deliver",
                    format!(
                        "{} is less than retry.max_attempts ({}): with retry.mode = \"broker\" the server would stop redelivering before the message is dead-lettered",
                        js.max_deliver.unwrap_or_default(),
                        retry.max_attempts
                    ),
                )
            }
            Some(Some(SourceOptions::JetStream(_))) => {}
            Some(_) => r.problem(
                "retry.mode",
                "\"broker\" needs a JetStream source (`source.stream`) or a RabbitMQ queue: only they redeliver with a delay".into(),
            ),
        }
    }
    let circuit_breaker = r
        .table("circuit_breaker")
        .map(|t| parse_breaker(&mut r.child("circuit_breaker", t, &[&schema::BREAKER])));

    let dlq = parse_dlq(r, brokers, nats_brokers, store_names, source.as_ref());

    let idempotency = r
        .table("idempotency")
        .and_then(|t| parse_idempotency(&mut r.child("idempotency", t, &[&schema::IDEMPOTENCY])));

    let rate_limit = r.table("rate_limit").and_then(|t| {
        let mut l = r.child("rate_limit", t, &[&schema::RATE_LIMIT]);
        let per_second = l.positive_u32("per_second");
        if !l.has("per_second") {
            l.problem("per_second", "missing".into());
        }
        let burst = l.positive_u32("burst");
        l.finish();
        per_second.map(|per_second| RateLimitConfig {
            per_second,
            burst: burst.unwrap_or(per_second),
        })
    });

    if outputs_mode == OutputsMode::Outbox {
        let store = state.as_deref().unwrap_or(store_names.default);
        if relays {
            r.problem(
                "outputs.mode",
                "\"outbox\" on a route that relays an outbox: its rows would be written back to an outbox; publish them instead".into(),
            );
        } else if !pg_stores.contains(&store) {
            r.problem(
                "outputs.mode",
                format!(
                    "\"outbox\" needs a PostgreSQL state store (the outbox rows commit in its transaction), but this route's store is `{store}`; set `state` to a [stores.<name>] table with kind = \"postgres\""
                ),
            );
        }
        if !relays && idempotency.is_none() {
            r.problem(
                "outputs.mode",
                "\"outbox\" needs idempotency = { key = \"...\" }: the outbox rows commit with the message's idempotency key, which is how a redelivery finds them".into(),
            );
        }
    }

    r.finish();
    if r.problem_count() != before {
        return None;
    }
    Some(RouteConfig {
        name: name.to_owned(),
        handler,
        source: source?,
        outputs,
        outputs_mode,
        outputs_broker: outputs_broker?,
        concurrency,
        ordering,
        max_batch,
        retry,
        circuit_breaker,
        dlq: dlq?,
        idempotency,
        rate_limit,
        state,
    })
}

/// `source`: a broker source (with the settings of its broker's kind) or an outbox relay
/// (`None` after a problem).
fn parse_source(
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

/// `dlq`: a topic on a broker or a store's dead-letter table; without the table,
/// `<source topic>.dlq` where the source is (`None` after a problem).
fn parse_dlq(
    r: &mut Reader<'_>,
    brokers: &[&str],
    nats_brokers: &[&str],
    store_names: &StoreNames<'_>,
    source: Option<&SourceSpec>,
) -> Option<DlqTarget> {
    let default_topic = || source.map(|s| format!("{}.dlq", s.topic()));
    let Some(t) = r.table("dlq") else {
        return match source? {
            SourceSpec::Broker(src) if is_wildcard(&src.topic) => {
                r.problem(
                    "dlq",
                    format!(
                        "missing: the source subject \"{}\" has wildcards, so there is no default \"<subject>.dlq\"; set dlq = {{ topic = \"...\" }}",
                        src.topic
                    ),
                );
                None
            }
            SourceSpec::Broker(src) => Some(DlqTarget::Broker {
                broker: src.broker.clone(),
                topic: default_topic()?,
            }),
            SourceSpec::Outbox(o) => Some(DlqTarget::Table {
                store: o.store.clone(),
                topic: default_topic()?,
            }),
        };
    };
    let mut d = r.child("dlq", t, &[&schema::DLQ]);
    // A relay's DLQ is its store's dead-letter table unless it names a broker.
    let relay_store = match source {
        Some(SourceSpec::Outbox(o)) if !d.has("broker") => Some(o.store.clone()),
        _ => None,
    };
    let target = if d.has("store") || relay_store.is_some() {
        let store = d.string("store").or(relay_store).unwrap_or_default();
        if d.has("broker") {
            d.problem(
                "broker",
                "a DLQ goes to a broker or to a store's dead_letters table: set `broker` or `store`, not both".into(),
            );
        }
        if let Some(why) = not_postgres(
            &store,
            store_names.all,
            store_names.postgres,
            "a dead-letter table needs kind = \"postgres\"",
        ) {
            d.problem("store", why);
        }
        let topic = match d.non_empty("topic") {
            Some(t) => Some(t),
            None if source.is_some_and(|s| !is_wildcard(s.topic())) => default_topic(),
            None if source.is_none() => None,
            None => {
                d.problem(
                    "topic",
                    "missing: the source has no single topic to name the DLQ after; set topic = \"...\" (the DLQ's name in the dead_letters table)".into(),
                );
                None
            }
        };
        topic.map(|topic| DlqTarget::Table { store, topic })
    } else {
        let broker = d
            .string("broker")
            .or_else(|| {
                source
                    .and_then(SourceSpec::as_broker)
                    .map(|s| s.broker.name().to_owned())
            })
            .unwrap_or_else(|| LOCAL_BROKER.to_owned());
        check_broker(&mut d, "broker", &broker, brokers);
        let topic = d.non_empty("topic");
        if let (Some(topic), Some(src)) = (&topic, source.and_then(SourceSpec::as_broker))
            && src.broker.name() == broker
            && (&src.topic == topic
                || (nats_brokers.contains(&broker.as_str()) && subject_matches(&src.topic, topic)))
        {
            let what = if &src.topic == topic {
                "is the route's own source topic".to_owned()
            } else {
                format!("matches the route's source subject \"{}\"", src.topic)
            };
            d.problem(
                "topic",
                format!("\"{topic}\" {what}: dead letters would be consumed again"),
            );
        }
        if !d.has("topic") {
            d.problem("topic", "missing".into());
        }
        topic.map(|topic| DlqTarget::Broker {
            broker: BrokerRef::from_name(&broker),
            topic,
        })
    };
    d.finish();
    target
}

/// `outputs`: an array of topics, or a table `{ topics, mode, broker }`. Returns the topics, the
/// mode and the broker (`None` after a problem).
fn parse_outputs(
    r: &mut Reader<'_>,
    brokers: &[&str],
    source: Option<&SourceSpec>,
) -> (Vec<String>, OutputsMode, Option<BrokerRef>) {
    let relay = matches!(source, Some(SourceSpec::Outbox(_)));
    // Without a source (a problem already), any broker does: the route is not built.
    let default_broker = match source {
        Some(SourceSpec::Broker(b)) => Some(b.broker.clone()),
        Some(SourceSpec::Outbox(_)) => None,
        None => Some(BrokerRef::Local),
    };
    let Some(t) = r.get("outputs").and_then(toml::Value::as_table) else {
        let topics = r.strings("outputs").unwrap_or_default();
        if relay {
            r.problem(
                "outputs",
                "missing: a relay publishes to a broker; set outputs = { broker = \"...\" }".into(),
            );
        }
        return (topics, OutputsMode::Publish, default_broker);
    };
    let mut o = r.child("outputs", t, &[&schema::OUTPUTS]);
    let topics = o.strings("topics").unwrap_or_default();
    let mode = o
        .choice(
            "mode",
            &[
                ("publish", OutputsMode::Publish),
                ("outbox", OutputsMode::Outbox),
            ],
        )
        .unwrap_or_default();
    let broker = match o.string("broker") {
        Some(b) if check_broker(&mut o, "broker", &b, brokers) => Some(BrokerRef::from_name(&b)),
        Some(_) => None,
        None if relay => {
            o.problem(
                "broker",
                "missing: the broker a relay publishes its rows to".into(),
            );
            None
        }
        None => default_broker,
    };
    o.finish();
    (topics, mode, broker)
}

/// The RabbitMQ fields of a source.
fn parse_rabbit_source(s: &mut Reader<'_>) -> RabbitSource {
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

/// Why `store` cannot serve where a PostgreSQL store is needed (`need` says for what), or
/// `None` if it is one.
fn not_postgres(store: &str, stores: &[&str], pg_stores: &[&str], need: &str) -> Option<String> {
    if pg_stores.contains(&store) {
        return None;
    }
    Some(if stores.contains(&store) {
        format!("state store `{store}` is not a PostgreSQL store: {need}")
    } else {
        format!(
            "unknown state store `{store}` (PostgreSQL stores defined: {}; add a [stores.{store}] table with kind = \"postgres\")",
            if pg_stores.is_empty() {
                "none".to_owned()
            } else {
                pg_stores.join(", ")
            }
        )
    })
}

/// `source = { outbox = "<store>", ... }`.
fn parse_outbox_source(
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

fn is_wildcard(subject: &str) -> bool {
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
fn parse_jetstream(s: &mut Reader<'_>) -> Option<JetStreamSource> {
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

fn parse_retry(r: &mut Reader<'_>) -> RetryPolicy {
    let d = RetryPolicy::default();
    let max_attempts = r.positive_u32("max_attempts").unwrap_or(d.max_attempts);
    let initial = r.positive("initial_backoff_ms");
    let max = r.positive("max_backoff_ms");
    let initial_backoff = initial.map_or(d.initial_backoff, Duration::from_millis);
    let max_backoff = max.map_or(d.max_backoff, Duration::from_millis);
    if max_backoff < initial_backoff {
        let what = |v: Option<u64>, dflt: Duration| match v {
            Some(v) => v.to_string(),
            None => format!("{} by default", dflt.as_millis()),
        };
        r.problem(
            "max_backoff_ms",
            format!(
                "{} is less than initial_backoff_ms ({})",
                what(max, d.max_backoff),
                what(initial, d.initial_backoff)
            ),
        );
    }
    let multiplier = match r.number("multiplier") {
        Some(m) if !(1.0..=1000.0).contains(&m) => {
            r.problem(
                "multiplier",
                format!("must be between 1 and 1000, found {m}"),
            );
            d.multiplier
        }
        Some(m) => m,
        None => d.multiplier,
    };
    let fraction = r.number("jitter_fraction");
    let jitter = r
        .choice(
            "jitter",
            &[
                ("full", Jitter::Full),
                (
                    "proportional",
                    Jitter::Proportional(fraction.unwrap_or(0.2)),
                ),
                ("none", Jitter::None),
            ],
        )
        .unwrap_or(Jitter::Full);
    if let Some(f) = fraction {
        if !matches!(jitter, Jitter::Proportional(_)) {
            r.problem(
                "jitter_fraction",
                "only applies with jitter = \"proportional\"".into(),
            );
        } else if !(f > 0.0 && f <= 1.0) {
            r.problem(
                "jitter_fraction",
                format!("must be greater than 0 and at most 1, found {f}"),
            );
        }
    }
    let retry_traps = r.bool("retry_traps").unwrap_or(d.retry_traps);
    let retry_timeouts = r.bool("retry_timeouts").unwrap_or(d.retry_timeouts);
    let mode = r
        .choice(
            "mode",
            &[
                ("process", RetryMode::InProcess),
                ("broker", RetryMode::Broker),
            ],
        )
        .unwrap_or_default();
    r.finish();
    RetryPolicy {
        max_attempts,
        initial_backoff,
        max_backoff,
        multiplier,
        jitter,
        retry_traps,
        retry_timeouts,
        mode,
    }
}

fn parse_breaker(r: &mut Reader<'_>) -> BreakerConfig {
    let d = BreakerConfig::default();
    let consecutive_failures = r.positive_u32("consecutive_failures");
    let failure_ratio = match r.number("failure_ratio") {
        Some(f) if !(f > 0.0 && f <= 1.0) => {
            r.problem(
                "failure_ratio",
                format!("must be greater than 0 and at most 1, found {f}"),
            );
            None
        }
        other => other,
    };
    if !r.has("consecutive_failures") && !r.has("failure_ratio") {
        r.problem(
            "",
            "set consecutive_failures, failure_ratio, or both: otherwise the breaker never trips"
                .into(),
        );
    }
    let window = r
        .positive("window_ms")
        .map_or(d.window, Duration::from_millis);
    let min_calls = r.positive_u32("min_calls").unwrap_or(d.min_calls);
    let open_duration = r
        .positive("open_ms")
        .map_or(d.open_duration, Duration::from_millis);
    let half_open_max = r.positive_u32("half_open_max").unwrap_or(d.half_open_max);
    r.finish();
    BreakerConfig {
        consecutive_failures,
        failure_ratio,
        window,
        min_calls,
        open_duration,
        half_open_max,
    }
}

fn parse_idempotency(r: &mut Reader<'_>) -> Option<IdempotencyConfig> {
    let raw = r.string("key");
    if !r.has("key") {
        r.problem(
            "key",
            "missing: \"header:<name>\", \"key\", \"json:<pointer>\" or \"position\"".into(),
        );
    }
    let key = raw.and_then(|k| {
        let parsed = match k.as_str() {
            "key" => Some(IdempotencyKey::MessageKey),
            "position" => Some(IdempotencyKey::Position),
            k => match k.split_once(':') {
                Some(("header", name)) if !name.is_empty() => {
                    Some(IdempotencyKey::Header(name.to_owned()))
                }
                Some(("json", ptr)) if ptr.starts_with('/') => {
                    Some(IdempotencyKey::JsonPointer(ptr.to_owned()))
                }
                _ => None,
            },
        };
        if parsed.is_none() {
            r.problem(
                "key",
                format!(
                    "unknown key source \"{k}\"; expected \"header:<name>\", \"key\", \"json:<pointer starting with />\" or \"position\""
                ),
            );
        }
        parsed
    });
    let ttl = r.positive("ttl_ms").unwrap_or(DEFAULT_IDEMPOTENCY_TTL_MS);
    let lease = r
        .positive("lease_ms")
        .unwrap_or(DEFAULT_IDEMPOTENCY_LEASE_MS);
    r.finish();
    key.map(|key| IdempotencyConfig {
        key,
        ttl: Duration::from_millis(ttl),
        lease: Duration::from_millis(lease),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::problems;
    use crate::config::{BrokerKind, Config};

    const HANDLER: &str = "[handlers.h]\nmodule = \"h.wasm\"\n\n";

    fn parse(route: &str) -> Result<RouteConfig, Vec<String>> {
        let text = format!("{HANDLER}[routes.r]\n{route}");
        match Config::parse(Path::new("rt.toml"), &text) {
            Ok(c) => Ok(c.routes["r"].clone()),
            Err(e) => Err(e.to_string().lines().map(str::to_owned).collect()),
        }
    }

    fn errors(route: &str) -> Vec<String> {
        parse(route).expect_err("expected problems")
    }

    #[test]
    fn nats_subject_filters_match_like_the_server() {
        assert!(subject_matches("orders.>", "orders.dlq"));
        assert!(subject_matches("orders.>", "orders.eu.dlq"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.*", "orders.dlq"));
        assert!(!subject_matches("orders.*", "orders.eu.dlq"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.dlq"));
        assert!(subject_matches("*.dlq", "orders.dlq"));
    }

    #[test]
    fn minimal_route_gets_defaults() {
        let r = parse("handler = \"h\"\nsource = { topic = \"orders\" }\n").unwrap();
        let src = r.source.as_broker().unwrap();
        assert_eq!(src.broker, BrokerRef::Local);
        assert_eq!(src.group, DEFAULT_GROUP);
        assert_eq!(src.options, SourceOptions::Plain);
        assert_eq!(
            r.dlq,
            DlqTarget::Broker {
                broker: BrokerRef::Local,
                topic: "orders.dlq".into()
            }
        );
        assert_eq!(r.dlq.to_string(), "local:orders.dlq");
        assert_eq!(r.retry, RetryPolicy::default());
        assert_eq!(r.concurrency, 1);
        assert_eq!(r.ordering, Ordering::Partition);
        assert_eq!(r.max_batch, DEFAULT_MAX_BATCH);
        assert!(r.circuit_breaker.is_none() && r.idempotency.is_none() && r.rate_limit.is_none());
    }

    #[test]
    fn full_route_parses() {
        let r = parse(
            "handler = \"h\"\nsource = { broker = \"local\", topic = \"in\", group = \"g\" }\noutputs = [\"out\"]\nconcurrency = 8\nordering = \"key\"\nmax_batch = 7\nretry = { max_attempts = 3, initial_backoff_ms = 10, max_backoff_ms = 1000, multiplier = 1.5, jitter = \"proportional\", jitter_fraction = 0.5, retry_traps = false }\ncircuit_breaker = { failure_ratio = 0.5, window_ms = 1000, min_calls = 4, open_ms = 200, half_open_max = 2 }\ndlq = { topic = \"dead\" }\nidempotency = { key = \"json:/order/id\", ttl_ms = 60000 }\nrate_limit = { per_second = 100 }\n",
        )
        .unwrap();
        assert_eq!(r.outputs, vec!["out"]);
        assert_eq!(r.ordering, Ordering::Key);
        assert_eq!(r.max_batch, 7);
        assert_eq!(r.retry.jitter, Jitter::Proportional(0.5));
        assert!(!r.retry.retry_traps);
        assert_eq!(r.circuit_breaker.unwrap().failure_ratio, Some(0.5));
        assert_eq!(r.dlq.topic(), "dead");
        assert_eq!(
            r.idempotency.unwrap().key,
            IdempotencyKey::JsonPointer("/order/id".into())
        );
        assert_eq!(
            r.rate_limit,
            Some(RateLimitConfig {
                per_second: 100,
                burst: 100
            })
        );
    }

    #[test]
    fn unknown_fields_in_every_table() {
        assert_eq!(
            errors(
                "handler = \"h\"\nsource = { topic = \"t\", topik = 1 }\nretry = { max_attempt = 3 }\nretries = 2\n"
            ),
            vec![
                "rt.toml: routes.r.source.topik: unknown field `topik`; did you mean `topic`?",
                "rt.toml: routes.r.retry.max_attempt: unknown field `max_attempt`; did you mean `max_attempts`?",
                "rt.toml: routes.r.retries: unknown field `retries` (expected one of: handler, source, outputs, concurrency, ordering, max_batch, retry, circuit_breaker, dlq, idempotency, rate_limit, state)",
            ]
        );
    }

    #[test]
    fn zero_and_negative_durations() {
        assert_eq!(
            errors(
                "handler = \"h\"\nsource = { topic = \"t\" }\nretry = { initial_backoff_ms = 0, max_backoff_ms = -5 }\ncircuit_breaker = { consecutive_failures = 3, open_ms = 0 }\nidempotency = { key = \"key\", ttl_ms = -1 }\n"
            ),
            vec![
                "rt.toml: routes.r.retry.initial_backoff_ms: must be greater than 0, found 0",
                "rt.toml: routes.r.retry.max_backoff_ms: must be greater than 0, found -5",
                "rt.toml: routes.r.circuit_breaker.open_ms: must be greater than 0, found 0",
                "rt.toml: routes.r.idempotency.ttl_ms: must be greater than 0, found -1",
            ]
        );
    }

    #[test]
    fn max_backoff_below_initial_names_both_fields() {
        assert_eq!(
            errors(
                "handler = \"h\"\nsource = { topic = \"t\" }\nretry = { initial_backoff_ms = 500, max_backoff_ms = 100 }\n"
            ),
            vec![
                "rt.toml: routes.r.retry.max_backoff_ms: 100 is less than initial_backoff_ms (500)"
            ]
        );
        assert_eq!(
            errors(
                "handler = \"h\"\nsource = { topic = \"t\" }\nretry = { max_backoff_ms = 50 }\n"
            ),
            vec![
                "rt.toml: routes.r.retry.max_backoff_ms: 50 is less than initial_backoff_ms (100 by default)"
            ]
        );
    }

    #[test]
    fn unknown_broker_and_handler() {
        assert_eq!(
            errors("handler = \"nope\"\nsource = { broker = \"kafka\", topic = \"t\" }\n"),
            vec![
                "rt.toml: routes.r.handler: unknown handler `nope` (defined: h)",
                "rt.toml: routes.r.source.broker: unknown broker `kafka` (known: local)",
            ]
        );
    }

    #[test]
    fn dlq_pointing_at_the_source_is_refused() {
        assert_eq!(
            errors(
                "handler = \"h\"\nsource = { topic = \"orders\" }\ndlq = { topic = \"orders\" }\n"
            ),
            vec![
                "rt.toml: routes.r.dlq.topic: \"orders\" is the route's own source topic: dead letters would be consumed again"
            ]
        );
    }

    #[test]
    fn bad_enums_and_ranges() {
        assert_eq!(
            errors(
                "handler = \"h\"\nsource = { topic = \"t\" }\nordering = \"global\"\nconcurrency = 5000\nmax_batch = 0\nretry = { jitter = \"some\", multiplier = 0.5 }\ncircuit_breaker = { failure_ratio = 1.5 }\nidempotency = { key = \"payload\" }\n"
            ),
            vec![
                "rt.toml: routes.r.concurrency: 5000 is over the limit of 1024",
                "rt.toml: routes.r.ordering: unknown value \"global\"; expected \"partition\" or \"key\"",
                "rt.toml: routes.r.max_batch: must be greater than 0, found 0",
                "rt.toml: routes.r.retry.multiplier: must be between 1 and 1000, found 0.5",
                "rt.toml: routes.r.retry.jitter: unknown value \"some\"; expected \"full\", \"proportional\" or \"none\"",
                "rt.toml: routes.r.circuit_breaker.failure_ratio: must be greater than 0 and at most 1, found 1.5",
                "rt.toml: routes.r.idempotency.key: unknown key source \"payload\"; expected \"header:<name>\", \"key\", \"json:<pointer starting with />\" or \"position\"",
            ]
        );
    }

    #[test]
    fn missing_required_parts() {
        assert_eq!(
            errors("circuit_breaker = { open_ms = 10 }\nrate_limit = { burst = 5 }\n"),
            vec![
                "rt.toml: routes.r.handler: missing: the name of a [handlers.<name>] table",
                "rt.toml: routes.r.source: missing: e.g. source = { broker = \"local\", topic = \"orders\" }",
                "rt.toml: routes.r.circuit_breaker: set consecutive_failures, failure_ratio, or both: otherwise the breaker never trips",
                "rt.toml: routes.r.rate_limit.per_second: missing",
            ]
        );
    }

    #[test]
    fn a_dlq_can_be_a_postgres_stores_dead_letter_table() {
        let stores = "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n\n[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n";
        let c = Config::parse(
            Path::new("rt.toml"),
            &format!(
                "{stores}[routes.a]\nhandler = \"h\"\nsource = {{ topic = \"orders\" }}\ndlq = {{ store = \"pg\" }}\n\n[routes.b]\nhandler = \"h\"\nsource = {{ topic = \"refunds\" }}\ndlq = {{ store = \"pg\", topic = \"all.dlq\" }}\n"
            ),
        )
        .unwrap();
        assert_eq!(
            c.routes["a"].dlq,
            DlqTarget::Table {
                store: "pg".into(),
                topic: "orders.dlq".into()
            }
        );
        assert_eq!(c.routes["a"].dlq.to_string(), "store:pg:orders.dlq");
        assert_eq!(c.routes["b"].dlq.topic(), "all.dlq");
        assert_eq!(
            problems(&format!(
                "{stores}[routes.a]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\ndlq = {{ store = \"r\" }}\n\n[routes.b]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\ndlq = {{ store = \"nope\" }}\n\n[routes.c]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\ndlq = {{ store = \"pg\", broker = \"local\" }}\n"
            )),
            [
                "rt.toml: routes.a.dlq.store: state store `r` is not a PostgreSQL store: a dead-letter table needs kind = \"postgres\"",
                "rt.toml: routes.b.dlq.store: unknown state store `nope` (PostgreSQL stores defined: pg; add a [stores.nope] table with kind = \"postgres\")",
                "rt.toml: routes.c.dlq.broker: a DLQ goes to a broker or to a store's dead_letters table: set `broker` or `store`, not both",
            ]
        );
    }

    #[test]
    fn outbox_routes_and_relays_parse() {
        let stores = "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n\n[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n";
        let c = Config::parse(
            Path::new("rt.toml"),
            &format!(
                "{stores}[routes.orders]\nhandler = \"h\"\nsource = {{ topic = \"orders\" }}\nstate = \"pg\"\noutputs = {{ topics = [\"events\"], mode = \"outbox\" }}\nidempotency = {{ key = \"key\" }}\n\n[routes.relay]\nsource = {{ outbox = \"pg\", batch = 100, poll_ms = 50, retention_ms = 1000 }}\noutputs = {{ broker = \"k\" }}\nordering = \"key\"\n\n[routes.enrich]\nhandler = \"h\"\nsource = {{ outbox = \"pg\" }}\noutputs = {{ broker = \"local\", topics = [\"x\"] }}\n"
            ),
        )
        .unwrap();
        let o = &c.routes["orders"];
        assert_eq!(o.outputs_mode, OutputsMode::Outbox);
        assert_eq!(o.outputs, vec!["events"]);
        assert_eq!(o.outputs_broker, BrokerRef::Local);
        let r = &c.routes["relay"];
        assert_eq!(r.handler, None);
        assert_eq!(r.outputs_broker, BrokerRef::Named("k".into()));
        assert_eq!(r.outputs_mode, OutputsMode::Publish);
        let SourceSpec::Outbox(ob) = &r.source else {
            panic!("not a relay: {:?}", r.source)
        };
        assert_eq!((ob.store.as_str(), ob.batch), ("pg", 100));
        assert_eq!(ob.poll, std::time::Duration::from_millis(50));
        assert_eq!(ob.retention, std::time::Duration::from_millis(1000));
        assert_eq!(
            ob.lease,
            std::time::Duration::from_millis(DEFAULT_OUTBOX_LEASE_MS)
        );
        // A relay's dead letters go to its store's table by default.
        assert_eq!(r.dlq.store(), Some("pg"));
        assert_eq!(r.dlq.topic(), "outbox.dlq");
        assert_eq!(c.routes["enrich"].handler.as_deref(), Some("h"));

        assert_eq!(
            problems(&format!(
                "{stores}[routes.a]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\noutputs = {{ mode = \"outbox\" }}\n\n[routes.b]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\nstate = \"r\"\nidempotency = {{ key = \"key\" }}\noutputs = {{ mode = \"outbx\" }}\n\n[routes.c]\nsource = {{ outbox = \"r\" }}\noutputs = [\"x\"]\n\n[routes.d]\nsource = {{ outbox = \"pg\", topic = \"t\" }}\noutputs = {{ mode = \"outbox\" }}\n\n[routes.e]\nsource = {{ topic = \"o\" }}\n"
            )),
            [
                "rt.toml: routes.a.outputs.mode: \"outbox\" needs a PostgreSQL state store (the outbox rows commit in its transaction), but this route's store is `embedded`; set `state` to a [stores.<name>] table with kind = \"postgres\"",
                "rt.toml: routes.a.outputs.mode: \"outbox\" needs idempotency = { key = \"...\" }: the outbox rows commit with the message's idempotency key, which is how a redelivery finds them",
                "rt.toml: routes.b.outputs.mode: unknown value \"outbx\"; expected \"publish\" or \"outbox\"",
                "rt.toml: routes.c.source.outbox: state store `r` is not a PostgreSQL store: only kind = \"postgres\" has an outbox table",
                "rt.toml: routes.c.outputs: missing: a relay publishes to a broker; set outputs = { broker = \"...\" }",
                "rt.toml: routes.d.source.topic: an outbox source reads a table, not a broker: it has `outbox` (the store) instead",
                "rt.toml: routes.d.outputs.broker: missing: the broker a relay publishes its rows to",
                "rt.toml: routes.d.outputs.mode: \"outbox\" on a route that relays an outbox: its rows would be written back to an outbox; publish them instead",
                "rt.toml: routes.e.handler: missing: the name of a [handlers.<name>] table",
            ]
        );
    }

    #[test]
    fn nats_brokers_and_jetstream_sources_parse() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[brokers.nats]\nkind = \"nats\"\nservers = \"nats://127.0.0.1:4222\"\ncredentials = { file = \"a.creds\" }\ntls = true\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.js]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.*\", group = \"w\", stream = \"ORDERS\", ack_wait_ms = 2000, max_deliver = 5 }\nretry = { mode = \"broker\" }\ndlq = { topic = \"dead.orders\" }\n\n[routes.core]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"ping\" }\n",
        )
        .unwrap();
        let BrokerKind::Nats(n) = &c.brokers["nats"].kind else {
            panic!("not nats");
        };
        assert_eq!(n.servers, vec!["nats://127.0.0.1:4222"]);
        assert!(matches!(
            n.auth,
            Some(crate::config::NatsAuth::Credentials(_))
        ));
        assert!(n.tls);
        let Some(SourceOptions::JetStream(js)) =
            c.routes["js"].source.as_broker().map(|b| &b.options)
        else {
            panic!("not JetStream: {:?}", c.routes["js"].source)
        };
        assert_eq!(js.stream, "ORDERS");
        assert_eq!(js.ack_wait, std::time::Duration::from_secs(2));
        assert_eq!(js.max_ack_pending, DEFAULT_MAX_ACK_PENDING);
        assert_eq!(js.max_deliver, Some(5));
        assert_eq!(
            c.routes["core"].source.as_broker().unwrap().options,
            SourceOptions::Plain
        );
        assert_eq!(c.routes["js"].retry.mode, RetryMode::Broker);
        assert_eq!(c.routes["core"].retry.mode, RetryMode::InProcess);
        assert_eq!(c.routes["core"].dlq.topic(), "ping.dlq");
    }

    #[test]
    fn jetstream_mistakes_are_named() {
        assert_eq!(
            problems(
                "[brokers.nats]\nkind = \"nats\"\nservers = [\"nats://127.0.0.1:4222\"]\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"x:1\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.>\", stream = \"O\" }\n\n[routes.b]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.>\", stream = \"O\" }\ndlq = { topic = \"orders.dlq\" }\n\n[routes.c]\nhandler = \"h\"\nsource = { broker = \"k\", topic = \"t\", stream = \"S\" }\n\n[routes.d]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"t\", ack_wait_ms = 0 }\n\n[routes.e]\nhandler = \"h\"\nsource = { topic = \"t\" }\nretry = { mode = \"broker\" }\n\n[routes.f]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"t\", stream = \"S\", max_deliver = 2 }\nretry = { mode = \"broker\", max_attempts = 3 }\n\n[routes.g]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"t\", stream = \"S\", max_deliver = 3 }\nretry = { mode = \"nak\", max_attempts = 3 }\n"
            ),
            vec![
                "rt.toml: routes.a.dlq: missing: the source subject \"orders.>\" has wildcards, so there is no default \"<subject>.dlq\"; set dlq = { topic = \"...\" }",
                "rt.toml: routes.b.dlq.topic: \"orders.dlq\" matches the route's source subject \"orders.>\": dead letters would be consumed again",
                "rt.toml: routes.c.source.stream: only a source on a `kind = \"nats\"` broker has this (`k` is not one)",
                "rt.toml: routes.d.source.ack_wait_ms: must be greater than 0, found 0",
                "rt.toml: routes.d.source.ack_wait_ms: needs `stream`: only JetStream sources have it",
                "rt.toml: routes.e.retry.mode: \"broker\" needs a JetStream source (`source.stream`) or a RabbitMQ queue: only they redeliver with a delay",
                "rt.toml: routes.f.source.max_deliver: 2 is less than retry.max_attempts (3): with retry.mode = \"broker\" the server would stop redelivering before the message is dead-lettered",
                "rt.toml: routes.g.retry.mode: unknown value \"nak\"; expected \"process\" or \"broker\"",
            ]
        );
    }
}
