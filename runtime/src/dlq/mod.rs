//! The dead-letter envelope: one format on every broker, so one replay tool serves all.
//!
//! A dead letter is the original message, unchanged — same key, same payload bytes, same headers
//! in the same order — plus `lockgate-dlq-*` headers describing the failure. Replaying it
//! ([`replay_record`]) drops the `lockgate-dlq-*` headers, marks the copy with
//! `lockgate-replayed-from` and a replay id, and publishes it to `lockgate-dlq-topic`.
//!
//! The replay tool remembers what it replayed in the DLQ itself: after the copies of a batch are
//! acknowledged it appends one *replay marker* ([`marker`]): a record with the header
//! `lockgate-dlq-replayed` and a JSON payload naming the replayed positions. Any later `list` or
//! `replay` reads the markers and treats those dead letters as replayed, whoever ran it and
//! wherever.
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
//! | `lockgate-id` | `<route>:dlq:<topic>/<partition>/<offset>` (without a position: `<route>:dlq:id:<the message's lockgate-id>`, else a fresh `msg:` id): dedups a repeated DLQ write |
//!
//! A replayed copy carries `lockgate-replayed-from` (the dead letter's position in its DLQ),
//! `lockgate-original-id` (the message's own `lockgate-id`, if it had one) and
//! `lockgate-id = <route>:replay:<dlq position>`: a sink that deduplicates (the embedded broker,
//! JetStream within its window) drops a second copy of the same dead letter.
//!
//! The route that takes a replayed copy to its end says what became of it in the DLQ of the
//! route: a *replay result* ([`result_record`]), a record with the header
//! `lockgate-dlq-replay-result` (`handled`, `skipped` or `dead_lettered`) and a JSON payload
//! naming the dead letter's position, the route and, for the last two, why. `lockgate dlq list`
//! shows it as the letter's status and `lockgate dlq replay` waits for them.
//!
//! A position is a dead letter's identity in its DLQ; where the broker has no offsets
//! (RabbitMQ) it is a digest, printed short and read back by any unique prefix
//! (`position.rs`).
//!
//! The code: `envelope.rs` writes and reads these records; `replay.rs` is the algorithm of
//! `lockgate dlq replay` (plan, publish and mark in batches, wait for results) over a
//! [`ReplayIo`] that reads and writes the brokers, which the binary implements.

mod envelope;
mod position;
mod replay;

pub use envelope::{
    DLQ_HEADER_PREFIX, DeadLetter, Failure, MARKER_HEADER, ORIGINAL_ID_HEADER,
    REPLAY_ORIGINAL_ID_HEADER, REPLAYED_FROM_HEADER, RESULT_HEADER, ReplayOutcome, ReplayResult,
    envelope, gave_up_name, header, marker, marker_positions, parse_result, replay_record,
    result_record,
};
pub use position::{
    MIN_TYPED_DIGITS, Numbering, PositionArg, PositionError, SHORT_DIGITS, Shortener,
};
pub use replay::{
    Contents, DlqRef, IoError, Plan, Planned, ReplayError, ReplayEvent, ReplayIo, Replayed,
    Settings, await_results, find, plan, read, replay,
};
