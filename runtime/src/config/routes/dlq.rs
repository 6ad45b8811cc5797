//! `[routes.<name>.dlq]`: where a route's dead letters go.

use super::source::{BrokerRef, LOCAL_BROKER, SourceSpec, is_wildcard, subject_matches};
use super::{StoreNames, check_broker, not_postgres};
use crate::config::reader::Reader;
use crate::config::schema;

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

/// `dlq`: a topic on a broker or a store's dead-letter table; without the table,
/// `<source topic>.dlq` where the source is (`None` after a problem).
pub(super) fn parse_dlq(
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
