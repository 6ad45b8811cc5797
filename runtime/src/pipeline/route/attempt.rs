//! One attempt at a message: admit it (the breaker), invoke the handler, commit its kv writes
//! (and, in outbox mode, its outputs) with the idempotency key, classify the outcome (which
//! feeds the breaker). After a failure: the retry policy's answer, which is another attempt
//! after a backoff here, a redelivery by the broker, or giving up (see `dead_letter`).

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use crate::engine::{Invocation, Outcome, Staging};
use crate::message::{OutRecord, now_ms};
use crate::pipeline::invoker::Invoker;
use crate::pipeline::stats::RouteStats;
use crate::policy::backoff::{Decision, FailureKind, GiveUpReason, RetryMode};
use crate::policy::breaker::Admission;
use crate::state::Commit;
use crate::state::kept_outputs::encode_outputs;

use super::in_flight::{End, InFlight};
use super::pending::{Pending, output_records};
use super::{Shared, Stopped, inbound, outcome};

/// What one attempt came to.
pub(super) enum Attempt {
    /// The handler succeeded: `records` to publish (none in outbox mode, where its `outputs`
    /// were committed as rows).
    Succeeded {
        records: Vec<OutRecord>,
        outputs: u64,
    },
    /// It failed: the retry policy decides what comes next.
    Failed(Failed),
    /// Its claim ran out before its writes could commit, and claiming again settled it.
    Settled(End),
}

/// A failed attempt.
pub(super) struct Failed {
    /// How the retry policy and the breaker count it.
    pub(super) kind: FailureKind,
    /// The outcome's name (`retry`, `reject`, `trap`, ...), for the dead letter.
    pub(super) error: &'static str,
    pub(super) reason: String,
    /// How long the handler asked to wait (`retry` with `after`).
    after: Option<Duration>,
    /// The host refused an output of the call (its reason is the failure's): a configuration
    /// that refuses what the handler publishes dead-letters all its traffic.
    pub(super) refused: bool,
}

/// What comes after a failed attempt.
pub(super) enum Next {
    /// Another attempt (the backoff is over, the claim renewed).
    Retry,
    /// The message's end: the broker redelivers it, or renewing its claim settled it.
    End(End),
    /// No more attempts: dead-letter it. `at_ms` is when its last failure was noted.
    GiveUp {
        failed: Failed,
        reason: GiveUpReason,
        at_ms: u64,
    },
}

impl Shared {
    /// The base of the `lockgate-id`s of the message's outputs: its key, else its position.
    pub(super) fn dedup_base(&self, msg: &InFlight) -> String {
        match &msg.claim {
            Some(c) => format!("{}:key:{}", self.route, c.key),
            None if msg.record.offset.is_some() => {
                format!("{}:pos:{}", self.route, msg.record.position())
            }
            // No position (core NATS): a fresh id, or a sink that drops repeated ids would drop
            // every output after the first.
            None => format!(
                "{}:msg:{:016x}{:016x}",
                self.route,
                fastrand::u64(..),
                fastrand::u64(..)
            ),
        }
    }

    /// Runs attempt `msg.attempt`; `ran_ahead` is its result when `run_ahead` ran it already.
    pub(super) async fn attempt(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        ran_ahead: Option<Invocation>,
        dedup_base: &str,
        pending: &mut Pending,
    ) -> Result<Attempt, Stopped> {
        // An attempt run ahead was admitted when it ran (the breaker was closed).
        if ran_ahead.is_none() {
            self.admit(pending).await?;
        }
        // A span per attempt, inside the message's: recording the attempt on the message span
        // instead would print every attempt so far on each line (`attempt=1 attempt=2`).
        let span = tracing::info_span!(
            "attempt",
            attempt = msg.attempt,
            outcome = tracing::field::Empty
        );
        let attempt_span = span.clone();
        async {
            tracing::trace!(route = %self.route, message = %msg.record.id(), attempt = msg.attempt, "Invoking the handler");
            // The handler call, with what the guest logged, as a span of its own (a child of
            // the attempt in an exported trace).
            let call = tracing::info_span!(
                "handler",
                handler = %invoker.handler_name(),
                outcome = tracing::field::Empty
            );
            // With the key claimed, the call's writes come back, to commit together with the
            // key (in the transaction the key was claimed in, if it was).
            let staging = match (msg.txn.take(), msg.claim.is_some()) {
                (Some(txn), _) => Staging::Claimed(txn),
                (None, staged) => Staging::staged_if(staged),
            };
            let pending_call = match ran_ahead {
                Some(done) => Ok(done),
                None => Err((inbound(&msg.record, msg.attempt), staging)),
            };
            let mut invocation = async {
                match pending_call {
                    Ok(done) => done,
                    Err((message, staging)) => {
                        crate::pipeline::invoker::call(invoker, message, staging).await
                    }
                }
            }
            .instrument(call.clone())
            .await;
            call.in_scope(|| self.observe(&invocation));
            call.record("outcome", invocation.outcome.kind());
            // Closed here, before the commit: the span is the call.
            drop(call);
            attempt_span.record("outcome", invocation.outcome.kind());
            if let Some(end) = self
                .commit(msg, invoker, &mut invocation, dedup_base, pending)
                .await?
            {
                return Ok(Attempt::Settled(end));
            }
            Ok(self.classify(msg, invocation, dedup_base))
        }
        .instrument(span)
        .await
    }

    /// After a failed attempt: publishes what the batch finished before it (this message may
    /// now wait), notes the failure and asks the retry policy what comes next. A retry here
    /// backs off and renews the claim first.
    pub(super) async fn after_failure(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        failed: Failed,
        pending: &mut Pending,
    ) -> Result<Next, Stopped> {
        // Earlier messages of the batch are finished: publish and ack them before this one
        // waits for a retry or a dead-letter write.
        self.flush(pending).await?;
        let now = now_ms();
        msg.first_failure_ms.get_or_insert(now);
        let decision =
            self.config
                .retry
                .decide(msg.attempt, failed.kind, failed.after, fastrand::f64());
        match decision {
            Decision::RetryAfter { delay, .. } if self.config.retry.mode == RetryMode::Broker => {
                RouteStats::bump(&self.stats.retried);
                outcome("redelivery");
                tracing::debug!(route = %self.route, message = %msg.record.id(), attempt = msg.attempt, delay_ms = delay.as_millis() as u64, "Attempt failed; the broker redelivers it");
                Ok(Next::End(End::Redeliver(delay)))
            }
            Decision::RetryAfter {
                delay,
                attempt: next,
            } => {
                RouteStats::bump(&self.stats.retried);
                tracing::debug!(route = %self.route, message = %msg.record.id(), attempt = msg.attempt, delay_ms = delay.as_millis() as u64, "Attempt failed; retrying");
                if !self.shutdown.sleep(delay).await {
                    return Err(Stopped);
                }
                // Renew the claim for the next attempt; if the lease lapsed meanwhile and
                // another holder finished the message, it is done.
                if let Some(end) = self.reclaim(msg, invoker, pending).await? {
                    return Ok(Next::End(end));
                }
                msg.attempt = next;
                Ok(Next::Retry)
            }
            Decision::GiveUp { reason } => Ok(Next::GiveUp {
                failed,
                reason,
                at_ms: now,
            }),
        }
    }

    /// Waits until the breaker (if any) admits an attempt. What is pending is published first
    /// when it will have to wait.
    async fn admit(&self, pending: &mut Pending) -> Result<(), Stopped> {
        let Some(b) = &self.breaker else {
            return Ok(());
        };
        if matches!(b.peek(), Admission::Wait(_)) {
            self.flush(pending).await?;
        }
        if b.wait_until(&self.shutdown, |b| b.with(|cb| cb.admit(Instant::now())))
            .await
        {
            Ok(())
        } else {
            Err(Stopped)
        }
    }

    /// Counts the call and logs what the guest logged.
    fn observe(&self, invocation: &Invocation) {
        self.stats
            .handler_seconds
            .observe(invocation.elapsed.as_secs_f64());
        if invocation.refused_outputs > 0 {
            self.stats.refused_outputs.fetch_add(
                u64::from(invocation.refused_outputs),
                AtomicOrdering::Relaxed,
            );
        }
        for log in &invocation.logs {
            // The message's id is on its span; `guest` marks the line for the OTLP export,
            // which makes it an event of the handler's span.
            tracing::debug!(route = %self.route, guest = true, guest_level = log.level.as_str(), "guest: {}", log.message);
        }
    }

    /// A success with kv writes commits them with the key before anything is published: a crash
    /// before the commit reruns the handler (nothing was applied), a crash after it finds the
    /// key applied and publishes the kept outputs instead. In outbox mode the outputs are part
    /// of that commit, as outbox rows, and nothing is published. A commit that loses turns the
    /// success into a retry.
    async fn commit(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        invocation: &mut Invocation,
        dedup_base: &str,
        pending: &mut Pending,
    ) -> Result<Option<End>, Stopped> {
        let outbox = self.outbox();
        let Outcome::Ok { outputs } = &invocation.outcome else {
            return Ok(None);
        };
        let (Some(keys), Some(claim)) = (&self.done_keys, &msg.claim) else {
            if invocation.sql.take().is_some() {
                // `check` refuses such a route; a message without a key (no header, no
                // position) still cannot commit its statements once-only.
                invocation.outcome = Outcome::Rejected {
                    reason: "the handler ran SQL, but the message has no idempotency key to commit its transaction with".into(),
                };
                return Ok(None);
            }
            if outbox {
                invocation.outcome = Outcome::Rejected {
                    reason: "outputs.mode = \"outbox\": the message has no idempotency key (and no position to use instead), so its outputs cannot commit with one".into(),
                };
            }
            return Ok(None);
        };
        if !outbox
            && invocation.sql.is_none()
            && invocation.kv_writes.as_ref().is_none_or(Vec::is_empty)
        {
            return Ok(None);
        }
        let records = output_records(&msg.record, outputs.clone(), dedup_base);
        let writes = invocation.kv_writes.take().unwrap_or_default();
        let (key, owner) = (claim.key.as_str(), claim.owner.as_str());
        let commit = if let Some(txn) = invocation.sql.take() {
            // The handler's transaction commits with the key. It cannot be retried as a whole
            // (it is the transaction): when its outcome is unknown, the message runs again,
            // and claiming its key again finds it applied if it was.
            let (kept, rows) = if outbox {
                (encode_outputs(&[]), records.clone())
            } else {
                (encode_outputs(&records), Vec::new())
            };
            let finished = outbox || records.is_empty();
            match keys
                .commit_sql(txn, key, owner, writes, kept, rows, finished)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(route = %self.route, message = %msg.record.id(), error = %e, "Committing the handler's transaction failed; running the message again");
                    invocation.outcome = Outcome::Retry {
                        reason: format!("committing the handler's transaction failed: {e}"),
                        after: None,
                    };
                    return Ok(None);
                }
            }
        } else if outbox {
            self.retry_infra("commit the handler's kv writes and outbox rows", || {
                keys.commit_outbox(key, owner, writes.clone(), records.clone())
            })
            .await?
        } else {
            let kept = encode_outputs(&records);
            self.retry_infra("commit the handler's kv writes", || {
                keys.commit(key, owner, writes.clone(), kept.clone())
            })
            .await?
        };
        match commit {
            Commit::Committed => {}
            // Its key is recorded already: nothing for the batch to record (or release).
            Commit::Done => msg.claim = None,
            Commit::Conflict(k) => {
                invocation.outcome = Outcome::Retry {
                    reason: format!(
                        "kv key \"{k}\" changed after the handler read it; its writes were discarded"
                    ),
                    after: None,
                };
            }
            Commit::LostClaim => {
                tracing::warn!(route = %self.route, message = %msg.record.id(), key = %key, "The idempotency claim ran out before the handler's writes could commit (is idempotency.lease_ms shorter than a handling?); the writes were discarded");
                if let Some(end) = self.reclaim(msg, invoker, pending).await? {
                    return Ok(Some(end));
                }
                invocation.outcome = Outcome::Retry {
                    reason: "lost the idempotency claim before committing".into(),
                    after: None,
                };
            }
        }
        Ok(None)
    }

    /// Sorts the outcome into a success (with its outputs as published) or a failure, and
    /// tells the breaker: rejections say nothing about the dependency, so they are neither.
    fn classify(&self, msg: &InFlight, invocation: Invocation, dedup_base: &str) -> Attempt {
        let kind = match &invocation.outcome {
            Outcome::Ok { .. } => None,
            Outcome::Retry { .. } => Some(FailureKind::Retry),
            Outcome::Rejected { .. } => Some(FailureKind::Reject),
            Outcome::Trapped { .. } | Outcome::OutOfMemory { .. } => Some(FailureKind::Trap),
            Outcome::TimedOut { .. } => Some(FailureKind::Timeout),
        };
        if let Some(b) = &self.breaker {
            match kind {
                None => b.with(|cb| cb.on_success(Instant::now())),
                Some(FailureKind::Reject) => {}
                Some(_) => b.with(|cb| cb.on_failure(Instant::now())),
            }
        }
        let Some(kind) = kind else {
            let Outcome::Ok { outputs } = invocation.outcome else {
                unreachable!("only a success has no failure kind");
            };
            let mut records = output_records(&msg.record, outputs, dedup_base);
            let outputs = records.len() as u64;
            if self.outbox() {
                // Committed as outbox rows: the relay publishes them.
                records.clear();
            }
            return Attempt::Succeeded { records, outputs };
        };
        let (reason, after) = match &invocation.outcome {
            Outcome::Retry { reason, after } => (reason.clone(), *after),
            other => (other.reason().unwrap_or_default(), None),
        };
        Attempt::Failed(Failed {
            kind,
            error: invocation.outcome.kind(),
            reason,
            after,
            refused: invocation.refused_outputs > 0,
        })
    }
}
