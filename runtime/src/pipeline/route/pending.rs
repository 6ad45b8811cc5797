//! Messages of one lane that are finished but not yet acknowledged ([`Pending`]), with the
//! outputs they wait for. Publishing them as one batch costs one broker round trip instead of
//! one per message; then their keys are recorded in one store call, then they are acked. A
//! route that stops before that gives them up: unacknowledged, claims released.

use std::sync::atomic::Ordering as AtomicOrdering;

use tokio::time::Instant;

use crate::broker::{AckHandle, AckKind};
use crate::dlq::{self, ReplayOutcome, ReplayResult};
use crate::message::{CORRELATION_HEADER, LOCKGATE_ID_HEADER, OutRecord, Record, now_ms};
use crate::pipeline::stats::RouteStats;
use crate::pipeline::trace;
use crate::state::Completion;

use super::in_flight::{Held, HeldClaim};
use super::{MAX_BATCH_AGE, Shared, Stopped};

/// Finished messages of a lane and the outputs they wait for.
#[derive(Default)]
pub(super) struct Pending {
    records: Vec<OutRecord>,
    replies: Vec<OutRecord>,
    messages: Vec<PendingMessage>,
    /// When the oldest pending message finished.
    since: Option<Instant>,
}

impl Pending {
    /// Queues `message` with its outputs; those to the request's reply destination are answers
    /// and carry its correlation id.
    pub(super) fn push(
        &mut self,
        message: PendingMessage,
        records: Vec<OutRecord>,
        request: Option<&Record>,
    ) {
        self.since.get_or_insert_with(Instant::now);
        self.messages.push(message);
        let reply_to = request.and_then(|r| r.reply_to.as_deref());
        for mut r in records {
            if reply_to == Some(r.topic.as_str()) {
                if let Some(c) = request.and_then(|q| q.header(CORRELATION_HEADER))
                    && !r.headers.iter().any(|(n, _)| n == CORRELATION_HEADER)
                {
                    r.headers.push((CORRELATION_HEADER.to_owned(), c.to_vec()));
                }
                self.replies.push(r);
            } else {
                self.records.push(r);
            }
        }
    }

    /// Whether the oldest pending message has waited [`MAX_BATCH_AGE`].
    pub(super) fn is_due(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= MAX_BATCH_AGE)
    }

    /// Whether a pending message holds `key` (its key is recorded only when the batch is).
    pub(super) fn holds(&self, key: &str) -> bool {
        self.messages
            .iter()
            .any(|m| m.claim.as_ref().is_some_and(|c| c.key == key))
    }
}

/// A finished message waiting for its batch's outputs to be published.
pub(super) struct PendingMessage {
    pub(super) ack: AckHandle,
    /// Its claim, recorded as done once the batch is published (none for a duplicate).
    pub(super) claim: Option<HeldClaim>,
    pub(super) outputs: u64,
    /// Already counted as a duplicate: nothing to publish or record.
    pub(super) duplicate: bool,
    /// The DLQ position this message is a replayed copy of: its result is reported once it is
    /// acknowledged.
    pub(super) replay_of: Option<String>,
    pub(super) _permit: Held,
}

/// The outputs of a successful call as published: each with its deterministic `lockgate-id`
/// and the trace context.
pub(super) fn output_records(
    record: &Record,
    outputs: Vec<crate::engine::OutgoingMessage>,
    dedup_base: &str,
) -> Vec<OutRecord> {
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let mut headers = o.headers;
            headers.retain(|(n, _)| n != LOCKGATE_ID_HEADER);
            let id = format!("{dedup_base}:{i}");
            trace::propagate(record, &mut headers, &id);
            headers.push((LOCKGATE_ID_HEADER.to_owned(), id.into_bytes()));
            OutRecord {
                topic: o.topic,
                key: o.key,
                headers,
                payload: o.payload,
            }
        })
        .collect()
}

impl Shared {
    /// Publishes the pending outputs, records idempotency keys and acks the pending messages.
    /// `Stopped` (everything pending given up) if the route stopped before that could happen.
    pub(super) async fn flush(&self, pending: &mut Pending) -> Result<(), Stopped> {
        if pending.messages.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut pending.records);
        let replies = std::mem::take(&mut pending.replies);
        let messages = std::mem::take(&mut pending.messages);
        pending.since = None;
        tracing::trace!(route = %self.route, messages = messages.len(), outputs = records.len(), answers = replies.len(), "Publishing a batch");
        for (what, sink, batch) in [
            ("publish outputs", &self.sinks.outputs, records),
            ("answer requests", self.reply_sink(), replies),
        ] {
            if batch.is_empty() {
                continue;
            }
            if self
                .retry_infra(what, || sink.publish(batch.clone()))
                .await
                .is_err()
            {
                self.give_up(messages).await;
                return Err(Stopped);
            }
        }
        // Every key of the batch in one store call, before any message is acknowledged.
        if let Some(keys) = &self.done_keys {
            let done: Vec<String> = messages
                .iter()
                .filter(|m| !m.duplicate)
                .filter_map(|m| Some(m.claim.as_ref()?.key.clone()))
                .collect();
            if !done.is_empty()
                && self
                    .retry_infra("record the idempotency keys", || {
                        keys.complete(done.clone(), Completion::Done)
                    })
                    .await
                    .is_err()
            {
                self.give_up(messages).await;
                return Err(Stopped);
            }
        }
        let mut results = Vec::new();
        for m in messages {
            if !m.duplicate {
                self.stats
                    .outputs
                    .fetch_add(m.outputs, AtomicOrdering::Relaxed);
                RouteStats::bump(&self.stats.succeeded);
            }
            self.acknowledge(m.ack, AckKind::Done).await;
            if let Some(position) = m.replay_of {
                results.push(if m.duplicate {
                    self.replay_result(
                        position,
                        ReplayOutcome::Skipped,
                        "its idempotency key was already handled successfully".into(),
                    )
                } else {
                    self.replay_result(
                        position,
                        ReplayOutcome::Handled,
                        format!(
                            "{} output{}",
                            m.outputs,
                            if m.outputs == 1 { "" } else { "s" }
                        ),
                    )
                });
            }
        }
        self.report_replays(results);
        Ok(())
    }

    /// The route stopped before `messages` could be finished: they stay unacknowledged (and
    /// come back), and their claims are released so the next claimant need not wait out the
    /// lease.
    async fn give_up(&self, messages: Vec<PendingMessage>) {
        self.stats
            .abandoned
            .fetch_add(messages.len() as u64, AtomicOrdering::Relaxed);
        if let Some(keys) = &self.done_keys {
            let claims = messages
                .iter()
                .filter_map(|m| Some(m.claim.as_ref()?.request()))
                .collect();
            drop(messages);
            keys.release(claims).await;
        }
    }

    /// Acknowledges a finished message.
    pub(super) async fn acknowledge(&self, ack: AckHandle, kind: AckKind) {
        if let Err(e) = ack.ack(kind).await {
            // The message stays unacknowledged and comes back; with idempotency on it is then
            // skipped as a duplicate.
            tracing::warn!(route = %self.route, error = %e, "Acknowledging a message failed; it will be redelivered");
        }
    }

    /// The result of the replayed dead letter at `position`.
    pub(super) fn replay_result(
        &self,
        position: String,
        outcome: ReplayOutcome,
        detail: String,
    ) -> ReplayResult {
        ReplayResult {
            position,
            outcome,
            route: self.route.clone(),
            detail,
            at_ms: now_ms(),
        }
    }

    /// Appends the results of finished replayed copies to the route's DLQ, in the background:
    /// they only inform `lockgate dlq`, so a DLQ that cannot take them must not hold the lane.
    pub(super) fn report_replays(&self, results: Vec<ReplayResult>) {
        if results.is_empty() {
            return;
        }
        self.stats
            .replays
            .fetch_add(results.len() as u64, AtomicOrdering::Relaxed);
        for r in &results {
            tracing::info!(route = %self.route, dead_letter = %r.position, result = r.outcome.as_str(), detail = %r.detail, "Replayed dead letter finished");
        }
        let records: Vec<OutRecord> = results
            .iter()
            .map(|r| dlq::result_record(self.config.dlq.topic(), r))
            .collect();
        let (sink, route) = (self.sinks.dlq.clone(), self.route.clone());
        let reporting = self.reporting.clone();
        tokio::spawn(async move {
            // One record at a time: a reader that stops at a Kafka partition's high watermark
            // must see each (tansu, the Kafka-protocol test broker, counts only the first record
            // of the newest batch in it until the next write), and replays are rare.
            let _one_at_a_time = reporting.lock().await;
            for record in records {
                if let Err(e) = sink.publish(vec![record]).await {
                    tracing::warn!(route = %route, error = %e, "Cannot record the result of a replayed dead letter in the DLQ; `lockgate dlq list` shows it as replayed without a result");
                }
            }
        });
    }
}
