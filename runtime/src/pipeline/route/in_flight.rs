//! A message between its delivery and its end ([`InFlight`]). It holds everything that must be
//! given back: its ack, its place in the in-flight bound ([`Held`]) and its idempotency claim
//! ([`HeldClaim`]). It ends in one of two ways only: [`InFlight::finish`] with an [`End`]
//! (counted, acked or queued to be acked with its batch) or [`InFlight::abandon`] (counted,
//! claim released, left unacknowledged so the broker delivers it again). The worker calls one
//! of them for every message it takes, so no early exit can forget a release.

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::broker::{AckHandle, AckKind};
use crate::dlq::{self, ReplayOutcome};
use crate::message::{OutRecord, Record};
use crate::pipeline::stats::RouteStats;
use crate::state::ClaimRequest;

use super::dispatch::Item;
use super::pending::{Pending, PendingMessage};
use super::{Shared, outcome};

/// A message's place in the in-flight bound, counted in `RouteStats::in_flight` until dropped.
pub(super) struct Held {
    _permit: OwnedSemaphorePermit,
    stats: Arc<RouteStats>,
}

impl Held {
    /// Counts `permit` as held.
    pub(super) fn new(permit: OwnedSemaphorePermit, stats: Arc<RouteStats>) -> Self {
        stats.in_flight.fetch_add(1, AtomicOrdering::Relaxed);
        Self {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

/// An idempotency claim a message holds: its key, and the owner id it was claimed as.
#[derive(Clone, Debug)]
pub(super) struct HeldClaim {
    pub(super) key: String,
    pub(super) owner: String,
}

impl HeldClaim {
    /// The claim as the store names it.
    pub(super) fn request(&self) -> ClaimRequest {
        ClaimRequest::new(self.key.clone(), self.owner.clone())
    }
}

/// A message being taken through its steps.
pub(super) struct InFlight {
    /// The message.
    pub(super) record: Record,
    ack: AckHandle,
    permit: Held,
    /// The claim on its idempotency key, once it has one (the route has idempotency and the
    /// message a key).
    pub(super) claim: Option<HeldClaim>,
    /// The handler's transaction the claim was taken in, for the next attempt (a key claimed
    /// in the handler's transaction: `claims.rs`). Dropping it rolls the claim back.
    pub(super) txn: Option<Box<crate::state::SqlTxn>>,
    /// The attempt that runs next (or ran last), counting those of earlier deliveries.
    pub(super) attempt: u32,
    /// When its first attempt here failed (wall clock, ms), for the dead letter.
    pub(super) first_failure_ms: Option<u64>,
    /// The DLQ position this message is a replayed copy of, if it is one.
    pub(super) replay_of: Option<String>,
}

/// How a message ended (other than abandoned).
pub(super) enum End {
    /// Its partition went to another process while it was queued: the new owner has it.
    Revoked,
    /// The handler succeeded: `outputs` outputs, of which `records` are published with the
    /// batch (none in outbox mode, where they were committed as rows). Acked after that.
    Handled {
        records: Vec<OutRecord>,
        outputs: u64,
    },
    /// Published as it is (a relay without a handler), with the batch.
    PassedThrough,
    /// An earlier holder of its key committed its effects and crashed before publishing: the
    /// outputs it kept are published with the batch, the handler does not run again.
    Recovered(Vec<OutRecord>),
    /// Its key is done (or its message was dead-lettered and this is no replay): acked with the
    /// batch, nothing published.
    Duplicate,
    /// A failed attempt that the broker delivers again after the delay (`retry.mode =
    /// "broker"`), maybe to another process.
    Redeliver(Duration),
    /// Its dead letter is written and its key recorded as dead-lettered; `detail` is the
    /// failure, for the result of a replay.
    DeadLettered { detail: String },
}

impl InFlight {
    /// The message of `item`, on its next attempt.
    pub(super) fn new(item: Item) -> Self {
        let Item { delivery, permit } = item;
        let replay_of = delivery
            .record
            .header(dlq::REPLAYED_FROM_HEADER)
            .map(|p| String::from_utf8_lossy(p).into_owned());
        Self {
            record: delivery.record,
            ack: delivery.ack,
            permit,
            claim: None,
            txn: None,
            attempt: delivery.previous_attempts.saturating_add(1),
            first_failure_ms: None,
            replay_of,
        }
    }

    /// Whether it is still this process's to handle (its partition was not revoked).
    pub(super) fn is_current(&self) -> bool {
        self.ack.is_current()
    }

    /// The route stopped before the message's end: counts it, releases its claim so the next
    /// claimant need not wait out the lease, and drops its ack unacknowledged, so the broker
    /// delivers it again.
    pub(super) async fn abandon(self, shared: &Shared) {
        RouteStats::bump(&shared.stats.abandoned);
        if let Some(claim) = &self.claim {
            shared.release(claim).await;
        }
    }

    /// Takes the message to `end`: counts it, and acks it or queues it in `pending` to be acked
    /// once its batch is published.
    pub(super) async fn finish(mut self, shared: &Shared, pending: &mut Pending, end: End) {
        let stats = &shared.stats;
        match end {
            End::Revoked => {
                tracing::debug!(route = %shared.route, position = %self.record.position(), "Skipping a message of a revoked partition");
                RouteStats::bump(&stats.revoked);
                outcome("revoked");
            }
            End::Handled { records, outputs } => {
                let attempt = self.attempt;
                let (message, record) = self.into_pending(outputs, false);
                pending.push(message, records, Some(&record));
                outcome("ok");
                tracing::debug!(attempt, "Message handled");
            }
            End::PassedThrough => {
                let (message, record) = self.into_pending(1, false);
                let out = OutRecord {
                    topic: record.topic,
                    key: record.key,
                    headers: record.headers,
                    payload: record.payload,
                };
                pending.push(message, vec![out], None);
                outcome("ok");
            }
            End::Recovered(records) => {
                RouteStats::bump(&stats.recovered);
                outcome("recovered");
                let (message, record) = self.into_pending(records.len() as u64, false);
                pending.push(message, records, Some(&record));
            }
            End::Duplicate => {
                RouteStats::bump(&stats.duplicates);
                outcome("duplicate");
                // Its key is someone else's (done or dead-lettered): nothing to record or
                // release.
                self.claim = None;
                let (message, _) = self.into_pending(0, true);
                pending.push(message, Vec::new(), None);
            }
            End::Redeliver(delay) => {
                // The redelivery may go to another process: it must not wait for our lease.
                if let Some(claim) = &self.claim {
                    shared.release(claim).await;
                }
                if let Err(e) = self.ack.redeliver(delay).await {
                    // Unacknowledged, it still comes back after ack_wait.
                    tracing::warn!(route = %shared.route, error = %e, "Asking for a redelivery failed; the message returns after ack_wait");
                }
            }
            End::DeadLettered { detail } => {
                shared.acknowledge(self.ack, AckKind::DeadLettered).await;
                if let Some(position) = self.replay_of {
                    shared.report_replays(vec![shared.replay_result(
                        position,
                        ReplayOutcome::DeadLettered,
                        detail,
                    )]);
                }
            }
        }
    }

    /// The message as it waits in `pending` for its batch, and its record.
    fn into_pending(self, outputs: u64, duplicate: bool) -> (PendingMessage, Record) {
        let message = PendingMessage {
            ack: self.ack,
            claim: self.claim,
            outputs,
            duplicate,
            replay_of: self.replay_of,
            _permit: self.permit,
        };
        (message, self.record)
    }
}
