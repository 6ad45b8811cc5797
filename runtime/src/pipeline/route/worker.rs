//! A worker: takes a lane's batch at a time, and each of its messages, in order, through its
//! steps (`handle`: claim, attempts, and one end: finished or abandoned). The head of a batch
//! may have its first attempts run ahead, before its steps.

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::Instrument;

use crate::engine::{InboundMessage, Invocation, Outcome, Staging};
use crate::pipeline::invoker::Invoker;
use crate::pipeline::lanes::Lanes;
use crate::pipeline::trace;

use super::attempt::{Attempt, Next};
use super::breaker::breaker_closed;
use super::dispatch::{Item, LaneKey};
use super::in_flight::{End, InFlight};
use super::pending::Pending;
use super::{MAX_BATCH_AGE, Shared, Stopped, inbound};

/// Takes the batches of `lanes` until they close.
pub(super) async fn work(shared: Arc<Shared>, lanes: Arc<Lanes<LaneKey, Item>>) {
    let max_batch = shared.config.max_batch.max(1) as usize;
    while let Some((lane, items)) = lanes.take_batch(max_batch).await {
        shared.handle_batch(items).await;
        lanes.done(&lane);
    }
}

impl Shared {
    /// Takes a lane's batch to its end, in order: every message is acked (done or
    /// dead-lettered) or abandoned. Successful messages wait in `Pending` until the batch's
    /// outputs are published; anything that may wait (a retry, the breaker, a dead letter)
    /// publishes what is pending first, so a slow message never holds back finished ones.
    async fn handle_batch(&self, items: Vec<Item>) {
        let mut pending = Pending::default();
        let (ahead_invoker, mut ahead) = match self.ahead_of(&items) {
            Some(messages) => self.run_ahead(messages).await,
            None => (None, VecDeque::new()),
        };
        for item in items {
            // Slow handlers must not hold finished messages back for a whole batch. (A flush
            // fails only when the route stops, and then the rest of the batch is abandoned.)
            if self.shutdown.is_set()
                || (pending.is_due() && self.flush(&mut pending).await.is_err())
            {
                item.abandon(&self.stats);
                continue;
            }
            // Every log line about this message carries its route, position, handler version
            // and trace id; `attempt` and `outcome` are filled in as it goes.
            // The version current now runs this message, all its attempts (a first attempt run
            // ahead ran on the version current then).
            let first = ahead.pop_front();
            let invoker = match (&first, &ahead_invoker) {
                (Some(_), Some(i)) => i.clone(),
                _ => self.invoker.current(),
            };
            let record = &item.delivery.record;
            // `system`, `group`, `handler` and `traceparent` are for the OTLP export
            // (telemetry::otlp), which makes this span the message's trace span.
            // Read by the OTLP layer when the span opens (empty: no trace context).
            let traceparent = record
                .header(trace::TRACEPARENT)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default();
            let span = tracing::info_span!(
                "message",
                route = %self.route,
                message = %record.id(),
                topic = %record.topic,
                partition = record.partition,
                offset = record.offset,
                handler_version = %invoker.module_hash(),
                outcome = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                system = self.messaging_system,
                group = tracing::field::Empty,
                handler = %invoker.handler_name(),
                traceparent,
            );
            if let Some(b) = self.config.source.as_broker() {
                span.record("group", b.group.as_str());
            }
            if let Some(t) = trace::trace_id(record) {
                span.record("trace_id", t);
            }
            self.handle(item, &invoker, first, &mut pending)
                .instrument(span)
                .await;
        }
        // A failed flush gave its messages up (unacknowledged, claims released) already.
        let _ = self.flush(&mut pending).await;
    }

    /// Takes one delivery to its end: finished (acked, or queued in `pending` to be acked with
    /// its batch) or abandoned. `first` is its first attempt when [`Self::run_ahead`] ran it.
    async fn handle(
        &self,
        item: Item,
        invoker: &Arc<dyn Invoker>,
        first: Option<Invocation>,
        pending: &mut Pending,
    ) {
        let mut msg = InFlight::new(item);
        match self.steps(&mut msg, invoker, first, pending).await {
            Ok(end) => msg.finish(self, pending, end).await,
            Err(Stopped) => msg.abandon(self).await,
        }
    }

    /// The steps of one message, up to its end: claim its key, then attempts until one
    /// succeeds or the retry policy sends it back to the broker or to the dead letters.
    async fn steps(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        mut first: Option<Invocation>,
        pending: &mut Pending,
    ) -> Result<End, Stopped> {
        if !msg.is_current() {
            // Its partition went to another process while it was queued here.
            return Ok(End::Revoked);
        }
        if let Some(end) = self.claim(msg, invoker, pending).await? {
            return Ok(end);
        }
        if invoker.passthrough() {
            return Ok(End::PassedThrough);
        }
        let dedup_base = self.dedup_base(msg);
        loop {
            let failed = match self
                .attempt(msg, invoker, first.take(), &dedup_base, pending)
                .await?
            {
                Attempt::Succeeded { records, outputs } => {
                    return Ok(End::Handled { records, outputs });
                }
                Attempt::Settled(end) => return Ok(end),
                Attempt::Failed(failed) => failed,
            };
            match self.after_failure(msg, invoker, failed, pending).await? {
                Next::Retry => {}
                Next::End(end) => return Ok(end),
                Next::GiveUp {
                    failed,
                    reason,
                    at_ms,
                } => return self.dead_letter(msg, invoker, failed, reason, at_ms).await,
            }
        }
    }

    /// Runs the first attempts of the head of a batch and returns them, in order, with the
    /// handler version that ran them. For an invoker that blocks ([`Invoker::blocks`]: native
    /// ones in tests and benches) they run in one blocking section: a hand-off to a blocking
    /// thread and back per call costs more than a small handler's call (the `suite` bench
    /// measured ~20 µs of hand-off against ~1.3 µs of call). Only where nothing has to happen
    /// between two calls: no idempotency claim to take first and a closed breaker. It stops at
    /// the first call that does not succeed (the messages after it wait for its retries, in
    /// order), when the breaker leaves closed, at shutdown and after [`MAX_BATCH_AGE`] (so
    /// finished messages are not held back).
    async fn run_ahead(
        &self,
        messages: Vec<InboundMessage>,
    ) -> (Option<Arc<dyn Invoker>>, VecDeque<Invocation>) {
        let invoker = self.invoker.current();
        let (shutdown, stats) = (self.shutdown.clone(), self.stats.clone());
        // Real time, also under a paused test clock: this bounds real work.
        let start = std::time::Instant::now();
        let go_on =
            move || !shutdown.is_set() && breaker_closed(&stats) && start.elapsed() < MAX_BATCH_AGE;
        let mut done = VecDeque::with_capacity(messages.len());
        if invoker.blocks() {
            let blocking = invoker.clone();
            let run = move || {
                for m in messages {
                    if !go_on() {
                        break;
                    }
                    let invocation = blocking.invoke_owned(m, false);
                    let ok = matches!(invocation.outcome, Outcome::Ok { .. });
                    done.push_back(invocation);
                    if !ok {
                        break;
                    }
                }
                done
            };
            // A failed section (a panic in the invoker) leaves every message to the normal path.
            let done = tokio::task::spawn_blocking(run).await.unwrap_or_default();
            return (Some(invoker), done);
        }
        for m in messages {
            if !go_on() {
                break;
            }
            let invocation = crate::pipeline::invoker::call(&invoker, m, Staging::Direct).await;
            let ok = matches!(invocation.outcome, Outcome::Ok { .. });
            done.push_back(invocation);
            if !ok {
                break;
            }
        }
        (Some(invoker), done)
    }

    /// The messages [`Self::run_ahead`] may run for this batch, if it may run at all.
    fn ahead_of(&self, items: &[Item]) -> Option<Vec<InboundMessage>> {
        // A passthrough has no call to run ahead: `handle` publishes its messages as they are.
        if items.len() < 2
            || self.done_keys.is_some()
            || !breaker_closed(&self.stats)
            || self.invoker.current().passthrough()
        {
            return None;
        }
        let messages = items
            .iter()
            .take_while(|i| i.delivery.ack.is_current())
            .map(|i| {
                inbound(
                    &i.delivery.record,
                    i.delivery.previous_attempts.saturating_add(1),
                )
            })
            .collect();
        Some(messages)
    }
}
