//! The envelope's code: building a dead letter ([`envelope`]) and reading it back
//! ([`DeadLetter`]), the copy a replay publishes ([`replay_record`]), replay markers and replay
//! results. The format itself is described in the module doc of [`crate::dlq`].

use crate::message::{LOCKGATE_ID_HEADER, OutRecord, Record};
use crate::policy::backoff::GiveUpReason;

/// Prefix of every envelope header.
pub const DLQ_HEADER_PREFIX: &str = "lockgate-dlq-";
/// Where a message's own `lockgate-id` is kept in its dead letter.
pub const ORIGINAL_ID_HEADER: &str = "lockgate-dlq-original-id";
/// Header of a replay marker (its value is the replay's destination summary).
pub const MARKER_HEADER: &str = "lockgate-dlq-replayed";
/// Header of a replayed copy: the position of the dead letter it came from.
pub const REPLAYED_FROM_HEADER: &str = "lockgate-replayed-from";
/// Header of a replayed copy: the message's own `lockgate-id` before it was dead-lettered.
pub const REPLAY_ORIGINAL_ID_HEADER: &str = "lockgate-original-id";
/// Header of a replay result (its value is the [`ReplayOutcome`]).
pub const RESULT_HEADER: &str = "lockgate-dlq-replay-result";

/// What became of a replayed copy of a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReplayOutcome {
    /// Not handled: its idempotency key had already succeeded (a copy of a message that was
    /// handled since, or a second copy of this replay).
    Skipped,
    /// It failed again and was dead-lettered again (as a new dead letter).
    DeadLettered,
    /// The handler succeeded and its outputs were published.
    Handled,
}

impl ReplayOutcome {
    /// The name in the header and in `lockgate dlq list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skipped => "skipped",
            Self::DeadLettered => "dead_lettered",
            Self::Handled => "handled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "skipped" => Self::Skipped,
            "dead_lettered" => Self::DeadLettered,
            "handled" => Self::Handled,
            _ => return None,
        })
    }
}

/// A replay result: what became of the replayed copy of the dead letter at `position`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayResult {
    /// The dead letter's position in its DLQ (the copy's `lockgate-replayed-from`).
    pub position: String,
    /// What happened.
    pub outcome: ReplayOutcome,
    /// The route that took the copy.
    pub route: String,
    /// Why it was skipped or dead-lettered again; outputs published when handled.
    pub detail: String,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

impl ReplayResult {
    /// Whether `self` should replace `earlier` as the letter's result: a copy delivered twice
    /// is handled once and skipped once, and the handling is what happened to the letter.
    pub fn supersedes(&self, earlier: &ReplayResult) -> bool {
        !(earlier.outcome == ReplayOutcome::Handled && self.outcome == ReplayOutcome::Skipped)
    }
}

/// The replay result record for `result`, to append to `dlq_topic`.
pub fn result_record(dlq_topic: &str, result: &ReplayResult) -> OutRecord {
    let payload = serde_json::json!({
        "position": result.position,
        "route": result.route,
        "detail": result.detail,
        "at_ms": result.at_ms,
    });
    OutRecord {
        topic: dlq_topic.to_owned(),
        key: None,
        headers: vec![(
            RESULT_HEADER.to_owned(),
            result.outcome.as_str().as_bytes().to_vec(),
        )],
        payload: payload.to_string().into_bytes(),
    }
}

/// The replay result `record` holds; `None` when it is not one.
pub fn parse_result(record: &Record) -> Option<ReplayResult> {
    let outcome = ReplayOutcome::parse(std::str::from_utf8(record.header(RESULT_HEADER)?).ok()?)?;
    let value: serde_json::Value = serde_json::from_slice(&record.payload).ok()?;
    let text = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Some(ReplayResult {
        position: text("position")?,
        outcome,
        route: text("route").unwrap_or_default(),
        detail: text("detail").unwrap_or_default(),
        at_ms: value
            .get("at_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
    })
}

/// What went wrong, for the envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Route name.
    pub route: String,
    /// Handler name.
    pub handler: String,
    /// Module hash of the version that ran the last attempt.
    pub module_hash: String,
    /// Message id the handler saw.
    pub message_id: String,
    /// Outcome kind of the last attempt (`reject`, `retry`, `trapped`, ...).
    pub error_kind: String,
    /// Reason of the last attempt.
    pub reason: String,
    /// Why it was not retried further.
    pub gave_up: GiveUpReason,
    /// Attempts made.
    pub attempts: u32,
    /// First failure, ms since the Unix epoch.
    pub first_failure_ms: u64,
    /// Last failure, ms since the Unix epoch.
    pub last_failure_ms: u64,
}

/// The machine name of a give-up reason.
pub fn gave_up_name(reason: GiveUpReason) -> &'static str {
    match reason {
        GiveUpReason::Rejected => "rejected",
        GiveUpReason::NotRetryable => "not_retryable",
        GiveUpReason::AttemptsExhausted => "attempts_exhausted",
    }
}

/// Builds the dead letter of `record` for `topic`.
pub fn envelope(record: &Record, failure: &Failure, topic: &str) -> OutRecord {
    let mut headers: Vec<(String, Vec<u8>)> = record
        .headers
        .iter()
        .map(|(n, v)| {
            if n == LOCKGATE_ID_HEADER {
                (ORIGINAL_ID_HEADER.to_owned(), v.clone())
            } else {
                (n.clone(), v.clone())
            }
        })
        .collect();
    let mut put = |name: &str, value: String| {
        headers.push((format!("{DLQ_HEADER_PREFIX}{name}"), value.into_bytes()));
    };
    put("route", failure.route.clone());
    put("handler", failure.handler.clone());
    put("module-hash", failure.module_hash.clone());
    put("topic", record.topic.clone());
    if let Some(p) = record.partition {
        put("partition", p.to_string());
    }
    if let Some(o) = record.offset {
        put("offset", o.to_string());
    }
    put("message-id", failure.message_id.clone());
    if let Some(t) = record.timestamp_ms {
        put("timestamp-ms", t.to_string());
    }
    put("error-kind", failure.error_kind.clone());
    put("reason", failure.reason.clone());
    put("gave-up", gave_up_name(failure.gave_up).to_owned());
    put("attempts", failure.attempts.to_string());
    put("first-failure-ms", failure.first_failure_ms.to_string());
    put("last-failure-ms", failure.last_failure_ms.to_string());
    // A position names one message; without one (core NATS, RabbitMQ queues) the message's
    // own id does, and failing that a fresh one: the same id on every dead letter of such a
    // source would make a deduplicating DLQ keep only the first.
    let basis = match (record.offset, record.header(LOCKGATE_ID_HEADER)) {
        (Some(_), _) => record.position(),
        (None, Some(id)) => format!("id:{}", String::from_utf8_lossy(id)),
        (None, None) => format!("msg:{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
    };
    headers.push((
        LOCKGATE_ID_HEADER.to_owned(),
        format!("{}:dlq:{basis}", failure.route).into_bytes(),
    ));
    OutRecord {
        topic: topic.to_owned(),
        key: record.key.clone(),
        headers,
        payload: record.payload.clone(),
    }
}

/// Reads an envelope header as text.
pub fn header<'a>(record: &'a Record, name: &str) -> Option<&'a str> {
    let full = format!("{DLQ_HEADER_PREFIX}{name}");
    record
        .headers
        .iter()
        .find(|(n, _)| *n == full)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// A dead letter read back from a DLQ: the envelope's metadata and the original message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Where it sits in the DLQ (`topic/partition/offset`): its identity, which markers and
    /// replay results name.
    pub position: String,
    /// How `lockgate dlq` prints the position (see [`crate::dlq::Shortener`]); the position
    /// itself until the whole DLQ was read.
    pub shown: String,
    /// Route that gave up on it.
    pub route: String,
    /// Handler that ran it.
    pub handler: String,
    /// Module hash of the version that ran the last attempt.
    pub module_hash: String,
    /// Topic or subject it came from.
    pub topic: String,
    /// Position it had there (`topic/partition/offset`).
    pub source_position: String,
    /// Message id the handler saw.
    pub message_id: String,
    /// Outcome kind of the last attempt.
    pub error_kind: String,
    /// Reason of the last attempt.
    pub reason: String,
    /// Why it was not retried further.
    pub gave_up: String,
    /// Attempts made.
    pub attempts: u32,
    /// First failure, ms since the Unix epoch.
    pub first_failure_ms: u64,
    /// Last failure (when it was dead-lettered), ms since the Unix epoch.
    pub last_failure_ms: u64,
    /// The dead letter as read (original key, payload and headers plus the envelope).
    pub record: Record,
}

impl DeadLetter {
    /// Reads the envelope of `record`; `None` for a record that is not a dead letter (a replay
    /// marker, or something else published to the topic).
    pub fn parse(record: Record) -> Option<Self> {
        let text = |name: &str| header(&record, name).map(str::to_owned);
        let number = |name: &str| header(&record, name).and_then(|v| v.parse::<u64>().ok());
        let route = text("route")?;
        let topic = text("topic")?;
        let source_position = format!(
            "{topic}/{}/{}",
            header(&record, "partition").unwrap_or("-"),
            header(&record, "offset").unwrap_or("-")
        );
        let position = record.position();
        Some(Self {
            shown: position.clone(),
            position,
            handler: text("handler").unwrap_or_default(),
            module_hash: text("module-hash").unwrap_or_default(),
            message_id: text("message-id").unwrap_or_default(),
            error_kind: text("error-kind").unwrap_or_default(),
            reason: text("reason").unwrap_or_default(),
            gave_up: text("gave-up").unwrap_or_default(),
            attempts: number("attempts")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            first_failure_ms: number("first-failure-ms").unwrap_or(0),
            last_failure_ms: number("last-failure-ms").unwrap_or(0),
            route,
            topic,
            source_position,
            record,
        })
    }
}

impl DeadLetter {
    /// The message as it was before it was dead-lettered: its topic, partition, offset and
    /// timestamp from the envelope, its key, payload and headers without the envelope's (its
    /// own `lockgate-id` restored). `lockgate dlq export --fixtures` writes it as a fixture.
    pub fn original(&self) -> Record {
        let number = |name: &str| header(&self.record, name).and_then(|v| v.parse::<u64>().ok());
        let headers = self
            .record
            .headers
            .iter()
            .filter_map(|(n, v)| {
                if n == ORIGINAL_ID_HEADER {
                    Some((LOCKGATE_ID_HEADER.to_owned(), v.clone()))
                } else if n.starts_with(DLQ_HEADER_PREFIX) || n == LOCKGATE_ID_HEADER {
                    None
                } else {
                    Some((n.clone(), v.clone()))
                }
            })
            .collect();
        Record {
            topic: self.topic.clone(),
            partition: number("partition").and_then(|p| u32::try_from(p).ok()),
            offset: number("offset"),
            key: self.record.key.clone(),
            headers,
            payload: self.record.payload.clone(),
            timestamp_ms: number("timestamp-ms"),
            reply_to: None,
            delivery: None,
        }
    }
}

/// The copy of `dead` to publish when replaying it to `to`: the original key, payload and
/// headers (without the envelope), marked as a replay.
pub fn replay_record(dead: &DeadLetter, to: &str) -> OutRecord {
    let original = dead.original();
    // The original's own id moves to REPLAY_ORIGINAL_ID_HEADER: the copy gets an id of its own.
    let mut headers: Vec<(String, Vec<u8>)> = original
        .headers
        .iter()
        .filter(|(n, _)| {
            n != LOCKGATE_ID_HEADER && n != REPLAYED_FROM_HEADER && n != REPLAY_ORIGINAL_ID_HEADER
        })
        .cloned()
        .collect();
    if let Some(id) = original.header(LOCKGATE_ID_HEADER) {
        headers.push((REPLAY_ORIGINAL_ID_HEADER.to_owned(), id.to_vec()));
    }
    headers.push((
        REPLAYED_FROM_HEADER.to_owned(),
        dead.position.clone().into_bytes(),
    ));
    headers.push((
        LOCKGATE_ID_HEADER.to_owned(),
        format!("{}:replay:{}", dead.route, dead.position).into_bytes(),
    ));
    OutRecord {
        topic: to.to_owned(),
        key: original.key,
        headers,
        payload: original.payload,
    }
}

/// The replay marker appended to `dlq_topic` once the copies of `positions` were acknowledged.
pub fn marker(dlq_topic: &str, positions: &[String], to: &str, at_ms: u64) -> OutRecord {
    let payload = serde_json::json!({ "replayed": positions, "to": to, "at_ms": at_ms });
    OutRecord {
        topic: dlq_topic.to_owned(),
        key: None,
        headers: vec![(MARKER_HEADER.to_owned(), to.as_bytes().to_vec())],
        payload: payload.to_string().into_bytes(),
    }
}

/// The positions a replay marker names; `None` when `record` is not a marker.
pub fn marker_positions(record: &Record) -> Option<Vec<String>> {
    record.header(MARKER_HEADER)?;
    let value: serde_json::Value = serde_json::from_slice(&record.payload).ok()?;
    Some(
        value
            .get("replayed")?
            .as_array()?
            .iter()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn envelope_keeps_the_original_and_adds_metadata() {
        let record = Record {
            topic: "orders".into(),
            partition: Some(0),
            offset: Some(41),
            key: Some(b"k1".to_vec()),
            headers: vec![
                ("trace".into(), b"abc".to_vec()),
                (LOCKGATE_ID_HEADER.into(), b"up:1".to_vec()),
            ],
            payload: vec![0, 159, 255],
            timestamp_ms: Some(1_700_000_000_000),
            reply_to: None,
            delivery: None,
        };
        let failure = Failure {
            route: "r".into(),
            handler: "h".into(),
            module_hash: "ab12".into(),
            message_id: "orders/0/41".into(),
            error_kind: "reject".into(),
            reason: "bad JSON".into(),
            gave_up: GiveUpReason::Rejected,
            attempts: 1,
            first_failure_ms: 5,
            last_failure_ms: 6,
        };
        let out = envelope(&record, &failure, "orders.dlq");
        assert_eq!(out.topic, "orders.dlq");
        assert_eq!(out.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(out.payload, vec![0, 159, 255]);
        assert_eq!(out.headers[0], ("trace".into(), b"abc".to_vec()));
        assert_eq!(
            out.headers[1],
            (ORIGINAL_ID_HEADER.into(), b"up:1".to_vec())
        );
        let as_record = Record {
            headers: out.headers.clone(),
            ..Record::default()
        };
        assert_eq!(header(&as_record, "offset"), Some("41"));
        assert_eq!(header(&as_record, "gave-up"), Some("rejected"));
        assert_eq!(header(&as_record, "reason"), Some("bad JSON"));
        assert_eq!(header(&as_record, "module-hash"), Some("ab12"));
        assert_eq!(
            as_record.header(LOCKGATE_ID_HEADER),
            Some(&b"r:dlq:orders/0/41"[..])
        );
        assert_eq!(
            out.headers
                .iter()
                .filter(|(n, _)| n == LOCKGATE_ID_HEADER)
                .count(),
            1
        );
        // Read back, the dead letter gives the message it was made of.
        let dead = DeadLetter::parse(Record {
            topic: "orders.dlq".into(),
            partition: Some(0),
            offset: Some(3),
            key: out.key.clone(),
            headers: out.headers.clone(),
            payload: out.payload.clone(),
            timestamp_ms: Some(9),
            reply_to: None,
            delivery: None,
        })
        .unwrap();
        assert_eq!(dead.original(), record);
    }

    #[test]
    fn replay_results_round_trip_and_a_handling_is_not_undone_by_a_skip() {
        let handled = ReplayResult {
            position: "orders.dlq/0/3".into(),
            outcome: ReplayOutcome::Handled,
            route: "orders".into(),
            detail: "2 outputs".into(),
            at_ms: 7,
        };
        let out = result_record("orders.dlq", &handled);
        assert_eq!(out.topic, "orders.dlq");
        let record = Record {
            headers: out.headers.clone(),
            payload: out.payload.clone(),
            ..Record::default()
        };
        assert_eq!(parse_result(&record), Some(handled.clone()));
        // Neither a dead letter nor a marker.
        assert!(DeadLetter::parse(record.clone()).is_none());
        assert!(marker_positions(&record).is_none());
        let skipped = ReplayResult {
            outcome: ReplayOutcome::Skipped,
            ..handled.clone()
        };
        let failed = ReplayResult {
            outcome: ReplayOutcome::DeadLettered,
            ..handled.clone()
        };
        assert!(!skipped.supersedes(&handled));
        assert!(handled.supersedes(&skipped));
        assert!(failed.supersedes(&handled));
        assert!(handled.supersedes(&failed));
        let unknown = Record {
            headers: vec![(RESULT_HEADER.into(), b"exploded".to_vec())],
            payload: out.payload,
            ..Record::default()
        };
        assert_eq!(parse_result(&unknown), None);
    }

    #[test]
    fn a_dead_letter_parses_and_replays_as_the_original_marked() {
        let record = Record {
            topic: "orders".into(),
            partition: Some(2),
            offset: Some(7),
            key: Some(b"k".to_vec()),
            headers: vec![
                ("trace".into(), b"abc".to_vec()),
                (LOCKGATE_ID_HEADER.into(), b"up:1".to_vec()),
            ],
            payload: b"{}".to_vec(),
            timestamp_ms: None,
            reply_to: None,
            delivery: None,
        };
        let failure = Failure {
            route: "r".into(),
            handler: "h".into(),
            module_hash: "ab".into(),
            message_id: "orders/2/7".into(),
            error_kind: "retry".into(),
            reason: "down".into(),
            gave_up: GiveUpReason::AttemptsExhausted,
            attempts: 5,
            first_failure_ms: 10,
            last_failure_ms: 20,
        };
        let out = envelope(&record, &failure, "orders.dlq");
        let as_read = Record {
            topic: out.topic,
            partition: Some(0),
            offset: Some(3),
            key: out.key,
            headers: out.headers,
            payload: out.payload,
            ..Record::default()
        };
        let dead = DeadLetter::parse(as_read).unwrap();
        assert_eq!(dead.position, "orders.dlq/0/3");
        assert_eq!(dead.source_position, "orders/2/7");
        assert_eq!(
            (dead.route.as_str(), dead.error_kind.as_str(), dead.attempts),
            ("r", "retry", 5)
        );
        assert_eq!((dead.first_failure_ms, dead.last_failure_ms), (10, 20));
        assert_eq!(dead.gave_up, "attempts_exhausted");

        let copy = replay_record(&dead, "orders");
        assert_eq!(copy.topic, "orders");
        assert_eq!(copy.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(copy.payload, b"{}");
        let names: Vec<&str> = copy.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "trace",
                REPLAY_ORIGINAL_ID_HEADER,
                REPLAYED_FROM_HEADER,
                LOCKGATE_ID_HEADER
            ]
        );
        let copy_record = Record {
            headers: copy.headers,
            ..Record::default()
        };
        assert_eq!(
            copy_record.header(LOCKGATE_ID_HEADER),
            Some(&b"r:replay:orders.dlq/0/3"[..])
        );
        assert_eq!(
            copy_record.header(REPLAYED_FROM_HEADER),
            Some(&b"orders.dlq/0/3"[..])
        );
        assert_eq!(
            copy_record.header(REPLAY_ORIGINAL_ID_HEADER),
            Some(&b"up:1"[..])
        );
    }

    #[test]
    fn markers_round_trip_and_are_not_dead_letters() {
        let positions = vec!["d/0/1".to_owned(), "d/1/4".to_owned()];
        let m = marker("d", &positions, "orders", 99);
        let as_read = Record {
            topic: m.topic,
            headers: m.headers,
            payload: m.payload,
            ..Record::default()
        };
        assert_eq!(marker_positions(&as_read), Some(positions));
        assert_eq!(DeadLetter::parse(as_read), None);
        assert_eq!(marker_positions(&Record::default()), None);
    }
}
