//! The vocabulary every layer shares: a message as a broker delivers it ([`Record`]) and as the
//! pipeline publishes it ([`OutRecord`]), the header names lockgate gives meaning to, the ids it
//! makes, and the clock expiries are compared against. Nothing here knows a broker, a store or a
//! route: it is the ground floor (see `docs/architecture.md`).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Header every output and dead letter carries: a deterministic id (route, source position or
/// idempotency key, output index) that lets a sink drop a duplicate written by a retry or a
/// redelivery (docs/guarantees.md#g2).
pub const LOCKGATE_ID_HEADER: &str = "lockgate-id";

/// Header with a request's correlation id (RabbitMQ's `correlation_id` property): the pipeline
/// copies it onto the answers to the request, and a sink that has such a property sets it.
pub const CORRELATION_HEADER: &str = "correlation-id";

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// `(trace id, flags)` of a valid version-00 `traceparent` value (W3C trace context: outputs and
/// outbound HTTP requests continue the trace of the message that caused them).
pub fn parse_traceparent(value: &[u8]) -> Option<(&str, &str)> {
    let s = std::str::from_utf8(value).ok()?;
    let mut parts = s.trim().split('-');
    let (version, trace_id, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, len: usize| {
        p.len() == len
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some((trace_id, flags))
}

/// A message as a broker delivered it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Topic, subject or queue.
    pub topic: String,
    /// Partition, when the broker has them.
    pub partition: Option<u32>,
    /// Offset or stream sequence, when the broker has them.
    pub offset: Option<u64>,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub payload: Vec<u8>,
    /// Broker timestamp, ms since the Unix epoch.
    pub timestamp_ms: Option<u64>,
    /// Reply destination (request-reply brokers).
    pub reply_to: Option<String>,
    /// This process's number for this delivery ([`next_delivery`]), set by the sources whose
    /// messages can come with neither an offset nor an id (RabbitMQ, core NATS), so that
    /// [`Record::id`] still tells such messages apart in logs and dead letters. A redelivery
    /// gets a new number: nothing that must recognise a message again (idempotency keys,
    /// positions, replays) reads it.
    pub delivery: Option<u64>,
}

impl Record {
    /// The first header called `name` (case-sensitive), if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The message's identity, as its handler and the logs see it: its position where the broker
    /// has offsets; otherwise `topic/<id>` with the id its publisher gave it (a `lockgate-id`
    /// header, which RabbitMQ's `message_id` becomes), so two messages of one queue are told
    /// apart. A message with neither is `topic/delivery-<n>` with this delivery's number
    /// ([`Record::delivery`]): distinct in the logs and the dead letters, but it **changes on
    /// every redelivery** and in every process, so publish messages with an id. Without even a
    /// delivery number it is only `topic/-/-`.
    pub fn id(&self) -> String {
        match (self.offset, self.header(LOCKGATE_ID_HEADER), self.delivery) {
            (None, Some(id), _) => format!("{}/{}", self.topic, String::from_utf8_lossy(id)),
            (None, None, Some(n)) => format!("{}/delivery-{n}", self.topic),
            _ => self.position(),
        }
    }

    /// `topic/partition/offset`: unique within a route and stable across redeliveries where the
    /// broker has offsets (`topic/-/-` where it has none).
    pub fn position(&self) -> String {
        let part = self
            .partition
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        let off = self
            .offset
            .map_or_else(|| "-".to_owned(), |o| o.to_string());
        format!("{}/{part}/{off}", self.topic)
    }
}

/// A record to publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutRecord {
    /// Destination topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Headers in order (including [`LOCKGATE_ID_HEADER`] when the pipeline set one).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub payload: Vec<u8>,
}

/// Milliseconds since the Unix epoch, the clock every backend compares expiries against.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The next delivery number of this process (from 1): see [`Record::delivery`].
pub fn next_delivery() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A unique claim owner: this process (random, so a restarted process is someone else) and a
/// counter.
pub fn new_owner() -> String {
    static PROCESS: LazyLock<String> =
        LazyLock::new(|| format!("{:x}.{:012x}", std::process::id(), fastrand::u64(..) >> 16));
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}.{}", *PROCESS, NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_without_offsets_is_known_by_its_own_id() {
        let kafka = Record {
            topic: "orders".into(),
            partition: Some(2),
            offset: Some(1041),
            headers: vec![(LOCKGATE_ID_HEADER.into(), b"up:7".to_vec())],
            ..Record::default()
        };
        assert_eq!(
            kafka.id(),
            "orders/2/1041",
            "a position wins: it is the broker's own"
        );
        let queue = |id: Option<&str>| Record {
            topic: "jobs".into(),
            headers: id
                .map(|i| vec![(LOCKGATE_ID_HEADER.to_owned(), i.as_bytes().to_vec())])
                .unwrap_or_default(),
            ..Record::default()
        };
        assert_eq!(queue(Some("b7f3")).id(), "jobs/b7f3");
        assert_ne!(queue(Some("b7f3")).id(), queue(Some("c001")).id());
        assert_eq!(queue(None).id(), "jobs/-/-");
        assert_eq!(queue(Some("b7f3")).position(), "jobs/-/-");
        // Without an id, a delivery number tells deliveries apart; a publisher's id wins.
        let delivered = |id: Option<&str>| Record {
            delivery: Some(next_delivery()),
            ..queue(id)
        };
        let (a, b) = (delivered(None), delivered(None));
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), format!("jobs/delivery-{}", a.delivery.unwrap()));
        assert_eq!(a.position(), "jobs/-/-", "positions never see it");
        assert_eq!(delivered(Some("b7f3")).id(), "jobs/b7f3");
        assert_eq!(
            Record {
                delivery: Some(9),
                ..kafka
            }
            .id(),
            "orders/2/1041"
        );
    }

    #[test]
    fn owners_are_unique() {
        let a = new_owner();
        assert_ne!(a, new_owner());
    }
}
