//! W3C trace context: an output continues the trace of the message that caused it.
//!
//! A message with a valid `traceparent` header gives each of its outputs a `traceparent` with the
//! same trace id and flags and a span id of its own, derived from the output's `lockgate-id`, so
//! a retried or redelivered output carries the same span id as the first try. `tracestate` is
//! copied. A handler that sets `traceparent` itself wins. Dead letters keep the original headers,
//! and with them the original `traceparent`.

use sha2::{Digest, Sha256};

use crate::message::Record;

pub use crate::message::{TRACEPARENT, TRACESTATE, parse_traceparent as parse};

/// Trace id of `record`, if it carries a valid `traceparent`.
pub fn trace_id(record: &Record) -> Option<&str> {
    record.header(TRACEPARENT).and_then(parse).map(|(t, _)| t)
}

/// Adds `traceparent` (and `tracestate`) to an output of `record` whose `lockgate-id` is `id`,
/// unless the handler set its own.
pub fn propagate(record: &Record, headers: &mut Vec<(String, Vec<u8>)>, id: &str) {
    let Some((trace_id, flags)) = record.header(TRACEPARENT).and_then(parse) else {
        return;
    };
    if headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(TRACEPARENT))
    {
        return;
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut span = hex::encode(&digest[..8]);
    if span.bytes().all(|b| b == b'0') {
        // All-zero span ids are invalid; a hash of zeros is astronomically unlikely but cheap
        // to rule out.
        span = "0000000000000001".to_owned();
    }
    headers.push((
        TRACEPARENT.to_owned(),
        format!("00-{trace_id}-{span}-{flags}").into_bytes(),
    ));
    if let Some(state) = record.header(TRACESTATE) {
        headers.push((TRACESTATE.to_owned(), state.to_vec()));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn record(tp: &str) -> Record {
        Record {
            topic: "t".into(),
            headers: vec![
                (TRACEPARENT.into(), tp.as_bytes().to_vec()),
                (TRACESTATE.into(), b"vendor=1".to_vec()),
            ],
            ..Record::default()
        }
    }

    #[test]
    fn outputs_continue_the_trace_with_a_stable_span_of_their_own() {
        let r = record(TP);
        let mut a = Vec::new();
        propagate(&r, &mut a, "route:pos:t/0/1:0");
        let tp = String::from_utf8(a[0].1.clone()).unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(tp.ends_with("-01"));
        assert_ne!(tp, TP, "an output gets its own span id");
        assert_eq!(a[1], (TRACESTATE.to_owned(), b"vendor=1".to_vec()));
        let mut again = Vec::new();
        propagate(&r, &mut again, "route:pos:t/0/1:0");
        assert_eq!(again, a, "the same output id gives the same span id");
        let mut other = Vec::new();
        propagate(&r, &mut other, "route:pos:t/0/1:1");
        assert_ne!(other[0], a[0]);
        assert_eq!(trace_id(&r), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn invalid_or_handler_set_traceparents_are_left_alone() {
        for bad in [
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let mut h = Vec::new();
            propagate(&record(bad), &mut h, "x");
            assert!(h.is_empty(), "{bad}");
        }
        let mut own = vec![("TraceParent".to_owned(), b"mine".to_vec())];
        propagate(&record(TP), &mut own, "x");
        assert_eq!(own.len(), 1);
    }
}
