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

mod dlq;
mod source;

pub use dlq::{DLQ_STORE_PREFIX, DlqTarget};
pub use source::{
    BrokerRef, BrokerSource, DEFAULT_ACK_WAIT_MS, DEFAULT_MAX_ACK_PENDING, DEFAULT_OUTBOX_BATCH,
    DEFAULT_OUTBOX_CLEANUP_EVERY_MS, DEFAULT_OUTBOX_LEASE_MS, DEFAULT_OUTBOX_POLL_MS,
    DEFAULT_OUTBOX_RETENTION_MS, DEFAULT_PREFETCH, JetStreamSource, LOCAL_BROKER, OUTBOX_TABLE,
    OutboxSource, QueueType, RabbitSource, SourceOptions, SourceSpec,
};

use super::reader::Reader;
use super::schema;
use crate::policy::backoff::{Jitter, RetryMode, RetryPolicy};
use crate::policy::breaker::BreakerConfig;
use crate::policy::rate_limit::RateLimitConfig;
use dlq::parse_dlq;
use source::parse_source;

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
mod tests;
