//! The give-up path of a message: its dead letter (the envelope of [`crate::dlq`]) written to the
//! route's DLQ, an error answer to a request so its requester does not wait for its timeout, and
//! its idempotency key recorded as dead-lettered. The message is then acked as dead-lettered
//! ([`End::DeadLettered`]).

use std::sync::Arc;

use crate::dlq::{self, Failure};
use crate::message::{CORRELATION_HEADER, OutRecord, Record};
use crate::pipeline::invoker::Invoker;
use crate::pipeline::stats::RouteStats;
use crate::policy::backoff::{FailureKind, GiveUpReason};

use super::attempt::Failed;
use super::in_flight::{End, InFlight};
use super::{ERROR_HEADER, Shared, Stopped, outcome};

impl Shared {
    /// Dead-letters `msg` after its last attempt `failed` (noted at `at_ms`): the letter
    /// written, the requester answered, the key recorded. (`&mut` only because a message is
    /// `Send` but not `Sync`: its ack is not.)
    pub(super) async fn dead_letter(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        failed: Failed,
        gave_up: GiveUpReason,
        at_ms: u64,
    ) -> Result<End, Stopped> {
        if failed.kind == FailureKind::Reject {
            RouteStats::bump(&self.stats.rejected);
        }
        outcome("dead_lettered");
        let message_id = msg.record.id();
        if failed.refused {
            // Not the message's fault: the route refuses what its handler publishes, and will
            // dead-letter every message that does the same.
            tracing::warn!(route = %self.route, message = %message_id, attempts = msg.attempt, reason = %failed.reason, "Dead-lettering message: the host refused one of its outputs. If the handler is right, add the topic to routes.{}.outputs (or raise the limit) and reload; then `lockgate dlq replay --route {}` runs the dead letters again", self.route, self.route);
        } else {
            tracing::info!(route = %self.route, message = %message_id, attempts = msg.attempt, kind = failed.error, reason = %failed.reason, "Dead-lettering message");
        }
        let letter = dlq::envelope(
            &msg.record,
            &Failure {
                route: self.route.clone(),
                handler: invoker.handler_name(),
                module_hash: invoker.module_hash(),
                message_id,
                error_kind: failed.error.to_owned(),
                reason: failed.reason.clone(),
                gave_up,
                attempts: msg.attempt,
                first_failure_ms: msg.first_failure_ms.unwrap_or(at_ms),
                last_failure_ms: at_ms,
            },
            self.config.dlq.topic(),
        );
        let sink = &self.sinks.dlq;
        self.retry_infra("write to the dead-letter topic", || {
            sink.publish(vec![letter.clone()])
        })
        .await?;
        RouteStats::bump(&self.stats.dead_lettered);
        if let Some(reply_to) = &msg.record.reply_to {
            self.answer_failed(&msg.record, reply_to, &failed).await;
        }
        self.mark_dead_lettered(msg.claim.as_ref()).await?;
        Ok(End::DeadLettered {
            detail: format!("{}: {}", failed.error, failed.reason),
        })
    }

    /// Answers a request that failed for good now, so the requester does not wait for its
    /// timeout.
    async fn answer_failed(&self, request: &Record, reply_to: &str, failed: &Failed) {
        let mut headers = vec![
            (ERROR_HEADER.to_owned(), failed.error.as_bytes().to_vec()),
            (
                format!("{ERROR_HEADER}-reason"),
                failed.reason.clone().into_bytes(),
            ),
        ];
        if let Some(c) = request.header(CORRELATION_HEADER) {
            headers.push((CORRELATION_HEADER.to_owned(), c.to_vec()));
        }
        let answer = OutRecord {
            topic: reply_to.to_owned(),
            key: None,
            headers,
            payload: Vec::new(),
        };
        if let Err(e) = self.reply_sink().publish(vec![answer]).await {
            tracing::warn!(route = %self.route, error = %e, "Cannot answer the failed request; the requester will time out");
        }
    }
}
