//! The dead-letter envelope: one format on every broker, so one replay tool serves all.
//!
//! A dead letter is the original message, unchanged — same key, same payload bytes, same headers
//! in the same order — plus `lockgate-dlq-*` headers describing the failure. Replaying it means
//! dropping the `lockgate-dlq-*` headers (restoring `lockgate-dlq-original-id` as `lockgate-id`)
//! and publishing to `lockgate-dlq-topic`.
//!
//! | header | value |
//! |---|---|
//! | `lockgate-dlq-route` | route name |
//! | `lockgate-dlq-handler` | handler name |
//! | `lockgate-dlq-module-hash` | SHA-256 of the component that ran last |
//! | `lockgate-dlq-topic` | original topic |
//! | `lockgate-dlq-partition` | original partition (absent when the broker has none) |
//! | `lockgate-dlq-offset` | original offset or sequence (absent when unknown) |
//! | `lockgate-dlq-message-id` | the message id the handler saw |
//! | `lockgate-dlq-timestamp-ms` | original broker timestamp (absent when unknown) |
//! | `lockgate-dlq-error-kind` | `reject`, `retry`, `trapped`, `timed_out` or `out_of_memory` |
//! | `lockgate-dlq-reason` | the last failure's reason |
//! | `lockgate-dlq-gave-up` | `rejected`, `not_retryable` or `attempts_exhausted` |
//! | `lockgate-dlq-attempts` | attempts made |
//! | `lockgate-dlq-first-failure-ms`, `lockgate-dlq-last-failure-ms` | ms since the Unix epoch |
//! | `lockgate-dlq-original-id` | the message's own `lockgate-id`, if it had one |
//! | `lockgate-id` | `<route>:dlq:<topic>/<partition>/<offset>`: dedups a repeated DLQ write |

use crate::broker::{LOCKGATE_ID_HEADER, OutRecord, Record};
use crate::pipeline::backoff::GiveUpReason;

/// Prefix of every envelope header.
pub const DLQ_HEADER_PREFIX: &str = "lockgate-dlq-";
/// Where a message's own `lockgate-id` is kept in its dead letter.
pub const ORIGINAL_ID_HEADER: &str = "lockgate-dlq-original-id";

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
    headers.push((
        LOCKGATE_ID_HEADER.to_owned(),
        format!("{}:dlq:{}", failure.route, record.position()).into_bytes(),
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
    }
}
