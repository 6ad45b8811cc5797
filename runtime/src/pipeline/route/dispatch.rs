//! The dispatcher: pulls from the source while the breaker, the in-flight bound and the rate
//! limit allow, and queues each delivery in its ordered lane ([`LaneKey`]). It pauses the source
//! while the breaker is open, so messages wait in the broker rather than in memory.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::broker::{BrokerError, Delivery, Source};
use crate::config::Ordering;
use crate::pipeline::lanes::Lanes;
use crate::pipeline::shutdown::Shutdown;
use crate::pipeline::stats::{RouteState, RouteStats};
use crate::policy::breaker::Admission;
use crate::policy::rate_limit::RateLimit;

use super::Shared;
use super::breaker::Breaker;
use super::in_flight::Held;

/// A delivery queued in its lane, with its place in the in-flight bound.
pub(super) struct Item {
    pub(super) delivery: Delivery,
    pub(super) permit: Held,
}

impl Item {
    /// Leaves a delivery that never started unacknowledged (it comes back from the broker).
    pub(super) fn abandon(self, stats: &RouteStats) {
        RouteStats::bump(&stats.abandoned);
        drop(self);
    }
}

/// The lane a delivery is queued in: its partition, and its key with `ordering = "key"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct LaneKey {
    partition: Option<u32>,
    key: Option<Vec<u8>>,
}

/// Pulls from the source until shutdown or a source error (returned).
pub(super) async fn dispatch(
    shared: &Shared,
    source: &mut dyn Source,
    lanes: &Lanes<LaneKey, Item>,
    in_flight: &Arc<Semaphore>,
    rate_limit: Option<&RateLimit>,
    shutdown: &Shutdown,
) -> Option<BrokerError> {
    let mut paused = false;
    // Permits taken ahead, handed out one per message. When the bound is full the dispatcher
    // waits for a handful to free up rather than for each one: a wake-up per finished message
    // (a futex call when its thread parked) cost more than the rest of the dispatch.
    let refill = (in_flight.available_permits() / 16).clamp(1, 64);
    let mut spare: Option<OwnedSemaphorePermit> = None;
    loop {
        if shutdown.is_set() {
            return None;
        }
        if let Some(b) = &shared.breaker
            && matches!(b.peek(), Admission::Wait(_))
        {
            if !paused {
                tracing::warn!(route = %shared.route, "Circuit breaker open: pausing the source; messages wait in the broker");
                if let Err(e) = source.pause().await {
                    return Some(e);
                }
                paused = true;
                shared.stats.set_state(RouteState::Paused);
            }
            if !b.wait_until(shutdown, Breaker::peek).await {
                return None;
            }
        }
        if paused {
            tracing::info!(route = %shared.route, "Circuit breaker half-open: resuming the source");
            if let Err(e) = source.resume().await {
                return Some(e);
            }
            paused = false;
            shared.stats.set_state(RouteState::Running);
        }
        // Waiting for room or for the next message gives way to the breaker opening, so a route
        // that is full or idle still pauses its source (`next` is cancel-safe).
        let breaker_opened = || async {
            match &shared.breaker {
                Some(b) => b.wait_for_open().await,
                None => std::future::pending().await,
            }
        };
        let permit = match spare.take() {
            Some(mut s) if s.num_permits() > 1 => match s.split(1) {
                Some(one) => {
                    spare = Some(s);
                    one
                }
                None => s,
            },
            Some(one) => one,
            None => {
                let free = in_flight.available_permits();
                let want = if free > 0 { free.min(refill) } else { refill };
                tokio::select! {
                    p = in_flight.clone().acquire_many_owned(want as u32) => match p {
                        Ok(p) => {
                            spare = Some(p);
                            continue;
                        }
                        Err(_) => return None,
                    },
                    () = breaker_opened() => continue,
                    () = shutdown.wait() => return None,
                }
            }
        };
        if let Some(limit) = rate_limit
            && let Err(wait) = limit.try_acquire()
        {
            RouteStats::bump(&shared.stats.rate_limited);
            if !shutdown.sleep(wait).await {
                return None;
            }
            tokio::select! {
                () = limit.acquire() => {}
                () = shutdown.wait() => return None,
            }
        }
        let delivery = tokio::select! {
            d = source.next() => match d {
                Ok(d) => d,
                Err(BrokerError::Closed) => return None,
                Err(e) => return Some(e),
            },
            () = breaker_opened() => {
                drop(permit);
                continue;
            }
            () = shutdown.wait() => return None,
        };
        RouteStats::bump(&shared.stats.received);
        tracing::trace!(route = %shared.route, position = %delivery.record.position(), reply_to = ?delivery.record.reply_to, "Delivery taken");
        let lane = LaneKey {
            partition: delivery.record.partition,
            // Messages without a key are ordered per topic (per subject on NATS, where one
            // route may read many).
            key: match shared.config.ordering {
                Ordering::Partition => None,
                Ordering::Key => Some(
                    delivery
                        .record
                        .key
                        .clone()
                        .unwrap_or_else(|| delivery.record.topic.as_bytes().to_vec()),
                ),
            },
        };
        let item = Item {
            delivery,
            permit: Held::new(permit, shared.stats.clone()),
        };
        if let Err(item) = lanes.push(lane, item) {
            item.abandon(&shared.stats);
            return None;
        }
    }
}
