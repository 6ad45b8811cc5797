//! Idempotency claims of a route's messages: which key a message has, claiming it (waiting while
//! another lane or process holds it), renewing the claim before another attempt, settling what
//! the store's answer says is no longer ours to run (a duplicate, or the outputs an earlier
//! holder committed), releasing a claim and recording a dead-lettered key. A route whose
//! handler's `sql` runs on the store of its keys claims inside the handler's transaction
//! instead (docs/handlers/sql.md), which the message then carries to its next attempt.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::SqlGrant;
use crate::message::{OutRecord, Record, new_owner};
use crate::pipeline::idempotency::{DoneKeys, key_of};
use crate::pipeline::invoker::Invoker;
use crate::pipeline::stats::RouteStats;
use crate::state::kept_outputs::decode_outputs;
use crate::state::{Claim, Completion, SqlTxn, TxnClaim};

use super::in_flight::{End, HeldClaim, InFlight};
use super::pending::Pending;
use super::{Shared, Stopped};

/// Longest wait before asking again for an idempotency key someone else holds: the holder may
/// finish long before its lease ends.
const MAX_CLAIM_POLL: Duration = Duration::from_millis(250);

impl Shared {
    /// Claims the message's idempotency key, if the route has idempotency and the message a key.
    /// `None`: it is ours to run (or has no key). `Some`: the claim settled it.
    pub(super) async fn claim(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        pending: &mut Pending,
    ) -> Result<Option<End>, Stopped> {
        let (Some(keys), Some(key)) = (&self.done_keys, self.key_of(&msg.record)) else {
            return Ok(None);
        };
        // A repeat of a key still pending in this batch: its key must be recorded before it
        // can be recognised.
        if pending.holds(&key) {
            self.flush(pending).await?;
        }
        let in_txn = in_txn(keys, invoker.as_ref());
        self.settle(keys, msg, key, new_owner(), in_txn, pending)
            .await
    }

    /// Renews the message's claim before another attempt (claimed in the handler's
    /// transaction, it is claimed again in a new one: the failed attempt's rolled back). If
    /// the lease lapsed meanwhile and another holder finished the message, it is settled.
    pub(super) async fn reclaim(
        &self,
        msg: &mut InFlight,
        invoker: &Arc<dyn Invoker>,
        pending: &mut Pending,
    ) -> Result<Option<End>, Stopped> {
        let (Some(keys), Some(claim)) = (&self.done_keys, &msg.claim) else {
            return Ok(None);
        };
        let HeldClaim { key, owner } = claim.clone();
        let in_txn = in_txn(keys, invoker.as_ref());
        self.settle(keys, msg, key, owner, in_txn, pending).await
    }

    /// Gives up the message's claim (it is abandoned or goes back to the broker).
    pub(super) async fn release(&self, claim: &HeldClaim) {
        if let Some(keys) = &self.done_keys {
            keys.release(vec![claim.request()]).await;
        }
    }

    /// Records the key of a dead-lettered message: its redeliveries are skipped, a replay of its
    /// dead letter runs it again.
    pub(super) async fn mark_dead_lettered(
        &self,
        claim: Option<&HeldClaim>,
    ) -> Result<(), Stopped> {
        let (Some(keys), Some(claim)) = (&self.done_keys, claim) else {
            return Ok(());
        };
        self.retry_infra("record the idempotency key", || {
            keys.complete(vec![claim.key.clone()], Completion::DeadLettered)
        })
        .await
    }

    /// The idempotency key of `record`, when the route has idempotency.
    fn key_of(&self, record: &Record) -> Option<String> {
        let (Some(cfg), Some(_)) = (&self.config.idempotency, &self.done_keys) else {
            return None;
        };
        // Outbox rows commit with a key: a message without one uses its position.
        let key = key_of(&cfg.key, record).or_else(|| {
            (self.outbox() && record.offset.is_some())
                .then(|| format!("position:{}", record.position()))
        });
        if key.is_none() {
            tracing::debug!(route = %self.route, position = %record.position(), "Message has no idempotency key; handled without deduplication");
        }
        key
    }

    /// Claims `key` for `owner` (in a transaction of the grant `in_txn`, when given) and takes the
    /// answer: the claim is the message's to run with, or the message is settled.
    async fn settle(
        &self,
        keys: &DoneKeys,
        msg: &mut InFlight,
        key: String,
        owner: String,
        in_txn: Option<(&SqlGrant, Duration)>,
        pending: &mut Pending,
    ) -> Result<Option<End>, Stopped> {
        let replay = msg.replay_of.is_some();
        let (claim, txn) = self
            .acquire(keys, &key, &owner, replay, in_txn, pending)
            .await?;
        match claim {
            Claim::Claimed => {
                msg.claim = Some(HeldClaim { key, owner });
                msg.txn = txn;
                Ok(None)
            }
            Claim::Applied(kept) => {
                let records = self.kept_outputs(&key, &kept);
                msg.claim = Some(HeldClaim { key, owner });
                Ok(Some(End::Recovered(records)))
            }
            Claim::DeadLettered => {
                tracing::debug!(route = %self.route, key, "The message of this idempotency key was dead-lettered; skipping its redelivery (`lockgate dlq replay` runs it again)");
                Ok(Some(End::Duplicate))
            }
            // `acquire` waits out `Busy`, so this is `Done`.
            Claim::Done | Claim::Busy(_) => Ok(Some(End::Duplicate)),
        }
    }

    /// Claims `key` for `owner`, waiting while someone else holds it: any answer but `Busy`,
    /// with the handler's transaction it was claimed in (`in_txn`: when claimed). Pending
    /// messages are published before any wait.
    async fn acquire(
        &self,
        keys: &DoneKeys,
        key: &str,
        owner: &str,
        replay: bool,
        in_txn: Option<(&SqlGrant, Duration)>,
        pending: &mut Pending,
    ) -> Result<(Claim, Option<Box<SqlTxn>>), Stopped> {
        let mut waited = false;
        loop {
            let (claim, txn) = match in_txn {
                None => {
                    let claim = self
                        .retry_infra("claim the idempotency key", || {
                            keys.claim(key, owner, replay)
                        })
                        .await?;
                    (claim, None)
                }
                Some((grant, timeout)) => {
                    let claimed = self
                        .retry_infra("claim the idempotency key", || {
                            keys.claim_in_txn(
                                &grant.store,
                                key,
                                owner,
                                replay,
                                grant.role.as_deref(),
                                timeout,
                            )
                        })
                        .await?;
                    match claimed {
                        TxnClaim::Claimed(txn) => (Claim::Claimed, Some(txn)),
                        TxnClaim::Settled(claim) => (claim, None),
                    }
                }
            };
            let Claim::Busy(left) = claim else {
                return Ok((claim, txn));
            };
            if !waited {
                waited = true;
                RouteStats::bump(&self.stats.claim_waits);
                tracing::debug!(route = %self.route, key, lease_left_ms = left.as_millis() as u64, "Idempotency key is being handled elsewhere; waiting for it");
            }
            self.flush(pending).await?;
            if !self.shutdown.sleep(left.min(MAX_CLAIM_POLL)).await {
                return Err(Stopped);
            }
        }
    }

    /// The outputs an earlier holder of `key` committed (and then crashed before publishing).
    fn kept_outputs(&self, key: &str, kept: &[u8]) -> Vec<OutRecord> {
        let records = match decode_outputs(kept) {
            Ok(r) => r,
            Err(e) => {
                // Its effects are committed, so running it again would apply them twice.
                tracing::error!(route = %self.route, key, error = %e, "The outputs kept with a committed idempotency key cannot be read; the message completes without them");
                Vec::new()
            }
        };
        tracing::info!(route = %self.route, key, outputs = records.len(), "Publishing the outputs an earlier holder committed; the handler does not run again");
        records
    }
}

/// The handler's `sql` grant, when its statements run on the store `keys` live in: then each
/// message's key is claimed inside the handler's transaction, which saves the claim a commit
/// of its own and the commit an update of the key's row (docs/handlers/sql.md).
fn in_txn<'a>(keys: &DoneKeys, invoker: &'a dyn Invoker) -> Option<(&'a SqlGrant, Duration)> {
    invoker.sql_grant().filter(|(g, _)| keys.kept_in(&g.store))
}
