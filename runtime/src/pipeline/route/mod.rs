//! One route at work: pull from the source, spread over ordered lanes, run the handler with
//! retries under the breaker, publish outputs or dead-letter, record the idempotency key, ack.
//!
//! ```text
//! dispatcher: breaker allows? ─ in-flight permit ─ rate limit ─ source.next() ─► lanes
//! worker ×N:  lanes.take_batch() ─ per message: claim ─ attempt loop (admit, invoke, commit,
//!             classify; retry or redeliver) ─ end
//!             ─ ok: publish outputs (awaited) ─ mark key done ─ ack
//!             ─ give up: DLQ write (awaited) ─ mark key dead-lettered ─ ack(dead-lettered)
//! ```
//! A replayed dead letter (`lockgate-replayed-from`) may claim a dead-lettered key again, and
//! once it is finished the route appends a replay result to its DLQ
//! (see [`crate::dlq`]).
//! Nothing is acknowledged before it is done; everything not done at shutdown is left
//! unacknowledged and comes back from the broker.
//!
//! This module owns the route's public face ([`Route`], [`RouteSinks`], [`RouteReport`]), its
//! life (`run`: start the workers, dispatch, stop within the grace) and the state its tasks
//! share. The steps live next to it: `dispatch` (source to lanes), `worker` (a lane's batch and
//! the steps of one message), `in_flight` (the message and its two ways to end), `claims`,
//! `attempt`, `dead_letter` and `pending` (finished messages waiting for their batch's publish).

mod attempt;
mod breaker;
mod claims;
mod dead_letter;
mod dispatch;
mod in_flight;
mod pending;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::broker::{BrokerError, Sink, Source};
use crate::config::{OutputsMode, RouteConfig};
use crate::engine::InboundMessage;
use crate::health::{Backoff, FailureKind as HealthFailure};
use crate::message::Record;
use crate::pipeline::idempotency::DoneKeys;
use crate::pipeline::invoker::{HandlerSlot, Invoker};
use crate::pipeline::lanes::Lanes;
use crate::pipeline::readiness;
use crate::pipeline::shutdown::Shutdown;
use crate::pipeline::stats::{RouteState, RouteStats};
use crate::policy::breaker::CircuitBreaker;
use crate::policy::rate_limit::RateLimit;

use breaker::Breaker;
use dispatch::{Item, LaneKey, dispatch};

/// Messages a route holds at once (queued in lanes or being handled). Bounds memory and how much
/// a crash makes the broker redeliver.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1_000;
/// A lane publishes and acks its finished messages once the oldest of them has waited this
/// long, even if its batch (`max_batch`) is not through yet.
pub const MAX_BATCH_AGE: Duration = Duration::from_millis(100);

/// Header of the answer a requester gets when its request failed for good (`reject`, `retry`,
/// `trap`, `timeout`); `lockgate-error-reason` carries the reason.
pub const ERROR_HEADER: &str = "lockgate-error";

/// Where a route's outputs and dead letters go.
#[derive(Clone)]
pub struct RouteSinks {
    /// Outputs (on the source's broker).
    pub outputs: Arc<dyn Sink>,
    /// The dead-letter destination.
    pub dlq: Arc<dyn Sink>,
    /// Answers to requests (outputs to a message's reply subject, and the error answer when a
    /// request fails for good), for sources whose messages have one (core NATS). Without it
    /// such outputs go to `outputs`.
    pub replies: Option<Arc<dyn Sink>>,
}

/// What a route needs to run.
pub struct Route {
    config: RouteConfig,
    invoker: HandlerSlot,
    sinks: RouteSinks,
    done_keys: Option<DoneKeys>,
    stats: Arc<RouteStats>,
    max_in_flight: usize,
    shutdown_grace: Duration,
    /// What the source is, by OpenTelemetry's `messaging.system` names (`kafka`, `nats`, ...).
    messaging_system: &'static str,
}

/// How a route ended.
#[derive(Debug)]
pub struct RouteReport {
    /// The route's name.
    pub route: String,
    /// Final counters.
    pub stats: Vec<(&'static str, u64)>,
    /// The source error that ended the route, if it was not a shutdown.
    pub error: Option<BrokerError>,
}

impl Route {
    /// A route running `invoker` with `sinks`; `done_keys` is required when the route has an
    /// `idempotency` table (it is ignored otherwise).
    pub fn new(
        config: RouteConfig,
        invoker: Arc<dyn Invoker>,
        sinks: RouteSinks,
        done_keys: Option<DoneKeys>,
    ) -> Self {
        let done_keys = if config.idempotency.is_some() {
            done_keys
        } else {
            None
        };
        Self {
            config,
            invoker: HandlerSlot::new(invoker),
            sinks,
            done_keys,
            stats: Arc::new(RouteStats::default()),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            shutdown_grace: Duration::from_secs(10),
            messaging_system: "lockgate",
        }
    }

    /// Names the source's kind in each message's trace (`messaging.system`: `kafka`, `nats`,
    /// `rabbitmq`; `lockgate` for the embedded broker, the default).
    pub fn messaging_system(mut self, system: &'static str) -> Self {
        self.messaging_system = system;
        self
    }

    /// Changes the in-flight bound (default [`DEFAULT_MAX_IN_FLIGHT`]).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Time in-flight work gets to finish after the stop signal (default 10 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// The slot of the route's handler: swap a new version in while it runs.
    pub fn handler_slot(&self) -> HandlerSlot {
        self.invoker.clone()
    }

    /// The route's counters, live.
    pub fn stats(&self) -> Arc<RouteStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` fires (or the source fails), then lets in-flight work finish within
    /// the grace period, abandons the rest and commits what is done.
    pub async fn run(self, mut source: Box<dyn Source>, shutdown: Shutdown) -> RouteReport {
        let route = self.config.name.clone();
        let concurrency = self.config.concurrency.max(1) as usize;
        let rate_limit = self.config.rate_limit.map(RateLimit::new);
        let breaker = self
            .config
            .circuit_breaker
            .clone()
            .map(|c| Breaker::new(CircuitBreaker::new(c), self.stats.clone()));
        // Workers stop on their own signal, fired after the dispatcher stopped, so an error from
        // the source also drains the workers.
        let (worker_trigger, worker_shutdown) = Shutdown::new();
        let shared = Arc::new(Shared {
            route: route.clone(),
            config: self.config,
            invoker: self.invoker,
            sinks: self.sinks,
            done_keys: self.done_keys,
            stats: self.stats.clone(),
            breaker,
            shutdown: worker_shutdown,
            reporting: Arc::default(),
            messaging_system: self.messaging_system,
        });
        let lanes: Arc<Lanes<LaneKey, Item>> = Arc::new(Lanes::new());
        let in_flight = Arc::new(Semaphore::new(self.max_in_flight));
        // Readiness: the source's health (and any store's the caller added) make the route's
        // state; each change is logged once, with the route's name.
        self.stats.depend_first_on("source", source.health());
        let health_logs: Vec<_> = self
            .stats
            .dependencies()
            .into_iter()
            .map(|d| tokio::spawn(readiness::log_changes(route.clone(), d)))
            .collect();

        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            workers.spawn(worker::work(shared.clone(), lanes.clone()));
        }

        self.stats.set_state(RouteState::Running);
        let error = dispatch(
            &shared,
            source.as_mut(),
            &lanes,
            &in_flight,
            rate_limit.as_ref(),
            &shutdown,
        )
        .await;

        // Stop: nothing new starts, queued work is abandoned, running work gets the grace.
        worker_trigger.trigger();
        for item in lanes.close() {
            item.abandon(&shared.stats);
        }
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                route = %route,
                grace_ms = self.shutdown_grace.as_millis() as u64,
                "In-flight messages did not finish within the shutdown grace; they stay unacknowledged and will be redelivered"
            );
            workers.abort_all();
        }
        if let Err(e) = source.commit().await {
            tracing::error!(route = %route, error = %e, "Committing positions at shutdown failed; done messages will be redelivered");
        }
        self.stats.set_state(RouteState::Stopped);
        for t in health_logs {
            t.abort();
        }
        RouteReport {
            route,
            stats: self.stats.snapshot(),
            error,
        }
    }
}

/// State the worker tasks share.
struct Shared {
    route: String,
    config: RouteConfig,
    invoker: HandlerSlot,
    sinks: RouteSinks,
    done_keys: Option<DoneKeys>,
    stats: Arc<RouteStats>,
    breaker: Option<Breaker>,
    shutdown: Shutdown,
    /// Held while replay results are published, so they go out one at a time.
    reporting: Arc<tokio::sync::Mutex<()>>,
    /// `messaging.system` of the traces (see [`Route::messaging_system`]).
    messaging_system: &'static str,
}

/// The route stopped before a step could finish: the message it was taking is abandoned (left
/// unacknowledged, its claim released) and comes back from the broker. Only the stop signal
/// ends a step this way (infrastructure calls are retried until then), so a worker that meets
/// it abandons the rest of its batch too.
#[derive(Debug)]
struct Stopped;

impl Shared {
    /// Whether outputs commit as outbox rows with the idempotency key instead of being
    /// published (`outputs.mode = "outbox"`).
    fn outbox(&self) -> bool {
        self.config.outputs_mode == OutputsMode::Outbox
    }

    /// Where answers to requests go.
    fn reply_sink(&self) -> &Arc<dyn Sink> {
        self.sinks.replies.as_ref().unwrap_or(&self.sinks.outputs)
    }

    /// Retries `op` until it succeeds or the route stops. Used for everything that must happen
    /// before an ack (a publish, a DLQ write, a state-store call): giving up would lose data.
    /// The waits are the jittered backoff of [`crate::health::Backoff`] (about 100 ms doubling
    /// to 5 s), so the processes of a deployment that met the same outage do not all retry at
    /// the same instant when it ends.
    async fn retry_infra<T, E, F, Fut>(&self, what: &str, op: F) -> Result<T, Stopped>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut backoff = Backoff::new();
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    RouteStats::bump(&self.stats.infra_retries);
                    let wait = backoff.next(HealthFailure::Transient);
                    tracing::error!(route = %self.route, error = %e, retry_in_ms = wait.as_millis() as u64, "Cannot {what}; the message stays unacknowledged and the call is retried");
                    if !self.shutdown.sleep(wait).await {
                        return Err(Stopped);
                    }
                }
            }
        }
    }
}

/// Records how the current message's span ended (`ok`, `duplicate`, `dead_lettered`, ...).
fn outcome(what: &'static str) {
    tracing::Span::current().record("outcome", what);
}

/// `record` as the handler would see it on attempt `attempt` (exposed for tests and tools).
pub fn inbound(record: &Record, attempt: u32) -> InboundMessage {
    InboundMessage {
        id: record.id(),
        topic: record.topic.clone(),
        partition: record.partition,
        offset: record.offset,
        key: record.key.clone(),
        headers: record.headers.clone(),
        payload: record.payload.clone(),
        timestamp_ms: record.timestamp_ms,
        attempt,
        reply_to: record.reply_to.clone(),
    }
}

#[cfg(test)]
mod tests;
