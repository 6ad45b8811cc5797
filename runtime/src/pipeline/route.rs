//! One route at work: pull from the source, spread over ordered lanes, run the handler with
//! retries under the breaker, publish outputs or dead-letter, record the idempotency key, ack.
//!
//! ```text
//! dispatcher: breaker allows? ─ in-flight permit ─ rate limit ─ source.next() ─► lanes
//! worker ×N:  lanes.take() ─ duplicate? ─ attempt loop (admit, invoke, decide, back off)
//!             ─ ok: publish outputs (awaited) ─ mark key done ─ ack
//!             ─ give up: DLQ write (awaited) ─ mark key dead-lettered ─ ack(dead-lettered)
//! ```
//! A replayed dead letter (`lockgate-replayed-from`) may claim a dead-lettered key again, and
//! once it is finished the route appends a replay result to its DLQ
//! (see [`crate::dlq`]).
//! Nothing is acknowledged before it is done; everything not done at shutdown is left
//! unacknowledged and comes back from the broker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::broker::{AckHandle, AckKind, BrokerError, Delivery, Sink, Source};

use crate::config::{Ordering, OutputsMode, RouteConfig};
use crate::dlq::{self, Failure, ReplayOutcome, ReplayResult};
use crate::engine::{InboundMessage, Invocation, Outcome};
use crate::message::new_owner;
use crate::message::now_ms;
use crate::message::{CORRELATION_HEADER, LOCKGATE_ID_HEADER, OutRecord, Record};
use crate::pipeline::idempotency::{DoneKeys, key_of};
use crate::pipeline::invoker::{HandlerSlot, Invoker};
use crate::pipeline::lanes::Lanes;
use crate::pipeline::readiness;
use crate::pipeline::shutdown::Shutdown;
use crate::pipeline::stats::{RouteState, RouteStats};
use crate::pipeline::trace;
use crate::policy::backoff::{Decision, FailureKind, RetryMode};
use crate::policy::breaker::{Admission, BreakerState, CircuitBreaker};
use crate::policy::rate_limit::RateLimit;
use crate::state::kept_outputs::{decode_outputs, encode_outputs};
use crate::state::{Claim, ClaimRequest, Commit, Completion};
use tracing::Instrument;

/// Messages a route holds at once (queued in lanes or being handled). Bounds memory and how much
/// a crash makes the broker redeliver.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1_000;
/// First wait before retrying a failed publish, DLQ write or state-store call; doubles up to
/// [`MAX_INFRA_BACKOFF`]. These are retried until they succeed or the route stops: giving up
/// would mean acking something that is not done.
pub const INITIAL_INFRA_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between retries of a failed publish, DLQ write or state-store call.
pub const MAX_INFRA_BACKOFF: Duration = Duration::from_secs(5);
/// A lane publishes and acks its finished messages once the oldest of them has waited this
/// long, even if its batch (`max_batch`) is not through yet.
pub const MAX_BATCH_AGE: Duration = Duration::from_millis(100);
/// Longest wait before asking again for an idempotency key someone else holds: the holder may
/// finish long before its lease ends.
const MAX_CLAIM_POLL: Duration = Duration::from_millis(250);

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

/// Header of the answer a requester gets when its request failed for good (`reject`, `retry`,
/// `trap`, `timeout`); `lockgate-error-reason` carries the reason.
pub const ERROR_HEADER: &str = "lockgate-error";

/// What a route needs to run.
pub struct Route {
    config: RouteConfig,
    invoker: HandlerSlot,
    sinks: RouteSinks,
    done_keys: Option<DoneKeys>,
    stats: Arc<RouteStats>,
    max_in_flight: usize,
    shutdown_grace: Duration,
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

struct Item {
    delivery: Delivery,
    _permit: Held,
}

/// A message's place in the in-flight bound, counted in `RouteStats::in_flight` until dropped.
struct Held {
    _permit: OwnedSemaphorePermit,
    stats: Arc<RouteStats>,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit, stats: Arc<RouteStats>) -> Self {
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LaneKey {
    partition: Option<u32>,
    key: Option<Vec<u8>>,
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
}

/// The breaker plus a wakeup for everything waiting on it.
struct Breaker {
    stats: Arc<RouteStats>,
    state: std::sync::Mutex<CircuitBreaker>,
    changed: Notify,
}

impl Breaker {
    fn with<R>(&self, f: impl FnOnce(&mut CircuitBreaker) -> R) -> R {
        let mut b = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = (b.state(), b.trips());
        let r = f(&mut b);
        let changed = (b.state(), b.trips()) != before;
        if changed {
            let code = match b.state() {
                BreakerState::Closed => 0,
                BreakerState::Open { .. } => 1,
                BreakerState::HalfOpen { .. } => 2,
            };
            self.stats
                .breaker_state
                .store(code, AtomicOrdering::Relaxed);
            self.stats
                .breaker_trips
                .store(b.trips(), AtomicOrdering::Relaxed);
        }
        drop(b);
        // Only real transitions wake waiters: a waiter's own `admit` that answers Wait must not
        // wake itself.
        if changed {
            self.changed.notify_waiters();
        }
        r
    }

    fn peek(&self) -> Admission {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peek(Instant::now())
    }

    /// Waits until the breaker stops admitting.
    async fn wait_for_open(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if matches!(self.peek(), Admission::Wait(_)) {
                return;
            }
            changed.await;
        }
    }

    /// Waits until `ask` allows; false if `shutdown` fired first.
    async fn wait_until(&self, shutdown: &Shutdown, ask: impl Fn(&Self) -> Admission) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match ask(self) {
                Admission::Allow | Admission::Probe => return true,
                Admission::Wait(until) => {
                    let timer = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        () = timer => {}
                        () = &mut changed => {}
                        () = shutdown.wait() => return false,
                    }
                }
            }
        }
    }
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
        }
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
        let breaker = self.config.circuit_breaker.clone().map(|c| Breaker {
            stats: self.stats.clone(),
            state: std::sync::Mutex::new(CircuitBreaker::new(c)),
            changed: Notify::new(),
        });
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

        let max_batch = shared.config.max_batch.max(1) as usize;
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let shared = shared.clone();
            let lanes = lanes.clone();
            workers.spawn(async move {
                while let Some((lane, items)) = lanes.take_batch(max_batch).await {
                    shared.handle_batch(items).await;
                    lanes.done(&lane);
                }
            });
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
            abandon(&shared.stats, item);
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

fn abandon(stats: &RouteStats, item: Item) {
    RouteStats::bump(&stats.abandoned);
    drop(item);
}

/// Pulls from the source until shutdown or a source error (returned).
async fn dispatch(
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
            _permit: Held::new(permit, shared.stats.clone()),
        };
        if let Err(item) = lanes.push(lane, item) {
            abandon(&shared.stats, item);
            return None;
        }
    }
}

/// Messages of one lane that are handled but not yet acknowledged, with the outputs they wait
/// for. Publishing them as one batch costs one broker round trip instead of one per message.
#[derive(Default)]
struct Pending {
    records: Vec<OutRecord>,
    replies: Vec<OutRecord>,
    messages: Vec<PendingMessage>,
    /// When the oldest pending message finished.
    since: Option<Instant>,
}

impl Pending {
    /// Queues `message` with its outputs; those to the request's reply destination are answers
    /// and carry its correlation id.
    fn push(&mut self, message: PendingMessage, records: Vec<OutRecord>, request: Option<&Record>) {
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
}

struct PendingMessage {
    ack: AckHandle,
    idem_key: Option<String>,
    /// Who holds the claim on `idem_key`.
    owner: Option<String>,
    outputs: u64,
    /// Already counted as a duplicate: nothing to publish or record.
    duplicate: bool,
    /// The DLQ position this message is a replayed copy of: its result is reported once it is
    /// acknowledged.
    replay_of: Option<String>,
    _permit: Held,
}

/// The outputs of a successful call as published: each with its deterministic `lockgate-id`
/// and the trace context.
fn output_records(
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

/// What (re)claiming a message's key left to do.
enum Reclaimed {
    /// The key is ours: run the message (its ack and permit come back).
    Held(AckHandle, Held),
    /// Settled: acked as a duplicate or queued with an earlier holder's outputs.
    Finished,
    /// The route stopped first; the message stays unacknowledged.
    Stopped,
}

/// Acknowledges a message whose idempotency key is done, with the batch.
fn duplicate(
    stats: &RouteStats,
    pending: &mut Pending,
    ack: AckHandle,
    permit: Held,
    replay_of: Option<String>,
) {
    RouteStats::bump(&stats.duplicates);
    outcome("duplicate");
    pending.push(
        PendingMessage {
            ack,
            idem_key: None,
            owner: None,
            outputs: 0,
            duplicate: true,
            replay_of,
            _permit: permit,
        },
        Vec::new(),
        None,
    );
}

/// The DLQ position `record` is a replayed copy of, if it is one.
fn replay_of(record: &Record) -> Option<String> {
    record
        .header(dlq::REPLAYED_FROM_HEADER)
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// A failed attempt, kept for the dead letter.
struct LastFailure {
    kind: &'static str,
    reason: String,
    first_ms: u64,
    last_ms: u64,
    /// The host refused an output of the call (its reason is the failure's): a configuration
    /// that refuses what the handler publishes dead-letters all its traffic.
    refused: bool,
}

/// Whether the route's breaker (if any) is closed, from the state the breaker publishes.
fn breaker_closed(stats: &RouteStats) -> bool {
    stats.breaker_state.load(AtomicOrdering::Relaxed) == 0
}

/// Records how the current message's span ended (`ok`, `duplicate`, `dead_lettered`, ...).
fn outcome(what: &'static str) {
    tracing::Span::current().record("outcome", what);
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
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            if self.shutdown.is_set() {
                abandon(&self.stats, item);
                continue;
            }
            // Slow handlers must not hold finished messages back for a whole batch.
            if pending.since.is_some_and(|t| t.elapsed() >= MAX_BATCH_AGE)
                && !self.flush(&mut pending).await
            {
                abandon(&self.stats, item);
                items.for_each(|item| abandon(&self.stats, item));
                break;
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
            let span = tracing::info_span!(
                "message",
                route = %self.route,
                message = %record.position(),
                topic = %record.topic,
                partition = record.partition,
                offset = record.offset,
                handler_version = %invoker.module_hash(),
                attempt = tracing::field::Empty,
                outcome = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            if let Some(t) = trace::trace_id(&item.delivery.record) {
                span.record("trace_id", t);
            }
            if !self
                .handle(item, &invoker, first, &mut pending)
                .instrument(span)
                .await
            {
                // The route is stopping and what was pending could not be published.
                items.for_each(|item| abandon(&self.stats, item));
                break;
            }
        }
        self.flush(&mut pending).await;
    }

    /// Runs the first attempts of the head of a batch in one blocking section and returns them,
    /// in order, with the handler version that ran them. A blocking section per call (a hand-off
    /// to a blocking thread and back) costs more than a small handler's call: the `suite` bench
    /// measured ~20 µs of hand-off against ~1.3 µs of call. Only where nothing has to happen
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
        let run = {
            let invoker = invoker.clone();
            move || {
                // Real time, also under a paused test clock: this bounds real work.
                let start = std::time::Instant::now();
                let mut done = VecDeque::with_capacity(messages.len());
                for m in messages {
                    if shutdown.is_set()
                        || !breaker_closed(&stats)
                        || start.elapsed() >= MAX_BATCH_AGE
                    {
                        break;
                    }
                    let invocation = invoker.invoke_owned(m, false);
                    let ok = matches!(invocation.outcome, Outcome::Ok { .. });
                    done.push_back(invocation);
                    if !ok {
                        break;
                    }
                }
                done
            }
        };
        // A failed section (a panic in the invoker) leaves every message to the normal path.
        let done = tokio::task::spawn_blocking(run).await.unwrap_or_default();
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

    /// Publishes the pending outputs, records idempotency keys and acks the pending messages.
    /// False (everything pending abandoned) if the route stopped before that could happen.
    async fn flush(&self, pending: &mut Pending) -> bool {
        if pending.messages.is_empty() {
            return true;
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
                .is_none()
            {
                self.give_up(messages).await;
                return false;
            }
        }
        // Every key of the batch in one store call, before any message is acknowledged.
        if let Some(keys) = &self.done_keys {
            let done: Vec<String> = messages
                .iter()
                .filter(|m| !m.duplicate)
                .filter_map(|m| m.idem_key.clone())
                .collect();
            if !done.is_empty()
                && self
                    .retry_infra("record the idempotency keys", || {
                        keys.complete(done.clone(), Completion::Done)
                    })
                    .await
                    .is_none()
            {
                self.give_up(messages).await;
                return false;
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
            self.finish(m.ack, AckKind::Done).await;
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
        true
    }

    fn replay_result(
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
    fn report_replays(&self, results: Vec<ReplayResult>) {
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
            .map(|r| dlq::result_record(&self.config.dlq.topic, r))
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
                .filter_map(|m| Some(ClaimRequest::new(m.idem_key.clone()?, m.owner.clone()?)))
                .collect();
            drop(messages);
            keys.release(claims).await;
        }
    }

    /// Releases the claim `owner` holds on `key`, if any (the message is abandoned or goes back
    /// to the broker).
    async fn release(&self, key: Option<&String>, owner: Option<&String>) {
        if let (Some(keys), Some(key), Some(owner)) = (&self.done_keys, key, owner) {
            keys.release(vec![ClaimRequest::new(key.clone(), owner.clone())])
                .await;
        }
    }

    /// Claims `key` for `owner`, waiting while someone else holds it: `Claimed`, `Applied`,
    /// `Done` or `DeadLettered`, or `None` when the route stopped first. Pending messages are published before any wait.
    async fn acquire(
        &self,
        keys: &DoneKeys,
        key: &str,
        owner: &str,
        replay: bool,
        pending: &mut Pending,
    ) -> Option<Claim> {
        let mut waited = false;
        loop {
            let claim = self
                .retry_infra("claim the idempotency key", || {
                    keys.claim(key, owner, replay)
                })
                .await?;
            let Claim::Busy(left) = claim else {
                return Some(claim);
            };
            if !waited {
                waited = true;
                RouteStats::bump(&self.stats.claim_waits);
                tracing::debug!(route = %self.route, key, lease_left_ms = left.as_millis() as u64, "Idempotency key is being handled elsewhere; waiting for it");
            }
            if !self.flush(pending).await {
                return None;
            }
            if !self.shutdown.sleep(left.min(MAX_CLAIM_POLL)).await {
                return None;
            }
        }
    }

    /// Takes one delivery to its end (acked, dead-lettered or abandoned) or, when it succeeds,
    /// into `pending`. False if the route stopped while `pending` could not be flushed.
    /// `first` is the message's first attempt when [`Self::run_ahead`] already ran it.
    async fn handle(
        &self,
        item: Item,
        invoker: &Arc<dyn Invoker>,
        mut first: Option<Invocation>,
        pending: &mut Pending,
    ) -> bool {
        let Item {
            delivery:
                Delivery {
                    record,
                    mut ack,
                    previous_attempts,
                },
            _permit: mut permit,
        } = item;
        if !ack.is_current() {
            // Its partition went to another process while it was queued here.
            tracing::debug!(route = %self.route, position = %record.position(), "Skipping a message of a revoked partition");
            RouteStats::bump(&self.stats.revoked);
            outcome("revoked");
            return true;
        }
        let outbox = self.config.outputs_mode == OutputsMode::Outbox;
        let replayed = replay_of(&record);
        let idem_key = match (&self.config.idempotency, &self.done_keys) {
            (Some(cfg), Some(_)) => {
                // Outbox rows commit with a key: a message without one uses its position.
                let k = key_of(&cfg.key, &record).or_else(|| {
                    (outbox && record.offset.is_some())
                        .then(|| format!("position:{}", record.position()))
                });
                if k.is_none() {
                    tracing::debug!(route = %self.route, position = %record.position(), "Message has no idempotency key; handled without deduplication");
                }
                k
            }
            _ => None,
        };
        let mut owner: Option<String> = None;
        if let (Some(key), Some(keys)) = (&idem_key, &self.done_keys) {
            // A repeat of a key still pending in this batch: its key must be recorded before it
            // can be recognised.
            if pending
                .messages
                .iter()
                .any(|m| m.idem_key.as_deref() == Some(key.as_str()))
                && !self.flush(pending).await
            {
                RouteStats::bump(&self.stats.abandoned);
                return false;
            }
            let me = new_owner();
            match self
                .reclaim(keys, key, &me, pending, ack, permit, &record)
                .await
            {
                Reclaimed::Stopped => return self.flush(pending).await,
                Reclaimed::Finished => return true,
                Reclaimed::Held(a, p) => {
                    (ack, permit) = (a, p);
                    owner = Some(me);
                }
            }
        }
        if invoker.passthrough() {
            let out = OutRecord {
                topic: record.topic,
                key: record.key,
                headers: record.headers,
                payload: record.payload,
            };
            pending.push(
                PendingMessage {
                    ack,
                    idem_key,
                    owner,
                    outputs: 1,
                    duplicate: false,
                    replay_of: replayed,
                    _permit: permit,
                },
                vec![out],
                None,
            );
            outcome("ok");
            return true;
        }
        // With a claimed key, the handler's kv writes commit together with the key.
        let staged = owner.is_some();

        let message_id = record.position();
        let dedup_base = match &idem_key {
            Some(k) => format!("{}:key:{k}", self.route),
            None if record.offset.is_some() => format!("{}:pos:{message_id}", self.route),
            // No position (core NATS): a fresh id, or a sink that drops repeated ids would drop
            // every output after the first.
            None => format!(
                "{}:msg:{:016x}{:016x}",
                self.route,
                fastrand::u64(..),
                fastrand::u64(..)
            ),
        };
        let mut attempt = previous_attempts.saturating_add(1);
        let mut failure: Option<LastFailure> = None;
        loop {
            // An attempt run ahead was admitted when it ran (the breaker was closed).
            let ran_ahead = first.take();
            if let Some(b) = self.breaker.as_ref().filter(|_| ran_ahead.is_none()) {
                if matches!(b.peek(), Admission::Wait(_)) && !self.flush(pending).await {
                    RouteStats::bump(&self.stats.abandoned);
                    self.release(idem_key.as_ref(), owner.as_ref()).await;
                    return false;
                }
                if !b
                    .wait_until(&self.shutdown, |b| b.with(|cb| cb.admit(Instant::now())))
                    .await
                {
                    RouteStats::bump(&self.stats.abandoned);
                    self.release(idem_key.as_ref(), owner.as_ref()).await;
                    return self.flush(pending).await;
                }
            }
            tracing::Span::current().record("attempt", attempt);
            tracing::trace!(route = %self.route, message = %message_id, attempt, "Invoking the handler");
            let module_hash = invoker.module_hash();
            let mut invocation = if let Some(done) = ran_ahead {
                done
            } else {
                let inbound = inbound(&record, attempt);
                let invoker = invoker.clone();
                let call = move || invoker.invoke_owned(inbound, staged);
                match tokio::task::spawn_blocking(call).await {
                    Ok(inv) => inv,
                    Err(e) => Invocation {
                        outcome: Outcome::Trapped {
                            reason: format!("handler task failed: {e}"),
                        },
                        logs: Vec::new(),
                        dropped_logs: 0,
                        refused_outputs: 0,
                        elapsed: Duration::ZERO,
                        kv_writes: None,
                    },
                }
            };
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
                tracing::debug!(route = %self.route, message = %message_id, level = log.level.as_str(), "guest: {}", log.message);
            }
            if outbox && owner.is_none() && matches!(invocation.outcome, Outcome::Ok { .. }) {
                invocation.outcome = Outcome::Rejected {
                    reason: "outputs.mode = \"outbox\": the message has no idempotency key (and no position to use instead), so its outputs cannot commit with one".into(),
                };
            }
            // A success with kv writes commits them with the key before anything is published:
            // a crash before the commit reruns the handler (nothing was applied), a crash after
            // it finds the key applied and publishes the kept outputs instead. In outbox mode
            // the outputs are part of that commit, as outbox rows, and nothing is published.
            if let (Some(keys), Some(key), Some(me)) =
                (&self.done_keys, idem_key.as_ref(), owner.as_ref())
                && let Outcome::Ok { outputs } = &invocation.outcome
                && (outbox || invocation.kv_writes.as_ref().is_some_and(|w| !w.is_empty()))
            {
                let writes = invocation.kv_writes.take().unwrap_or_default();
                let records = output_records(&record, outputs.clone(), &dedup_base);
                let commit = if outbox {
                    self.retry_infra("commit the handler's kv writes and outbox rows", || {
                        keys.commit_outbox(key, me, writes.clone(), records.clone())
                    })
                    .await
                } else {
                    let kept = encode_outputs(&records);
                    self.retry_infra("commit the handler's kv writes", || {
                        keys.commit(key, me, writes.clone(), kept.clone())
                    })
                    .await
                };
                match commit {
                    None => {
                        RouteStats::bump(&self.stats.abandoned);
                        self.release(idem_key.as_ref(), owner.as_ref()).await;
                        return self.flush(pending).await;
                    }
                    Some(Commit::Committed) => {}
                    Some(Commit::Conflict(k)) => {
                        invocation.outcome = Outcome::Retry {
                            reason: format!(
                                "kv key \"{k}\" changed after the handler read it; its writes were discarded"
                            ),
                            after: None,
                        };
                    }
                    Some(Commit::LostClaim) => {
                        tracing::warn!(route = %self.route, message = %message_id, key = %key, "The idempotency claim ran out before the handler's writes could commit (is idempotency.lease_ms shorter than a handling?); the writes were discarded");
                        match self
                            .reclaim(keys, key, me, pending, ack, permit, &record)
                            .await
                        {
                            Reclaimed::Stopped | Reclaimed::Finished => return true,
                            Reclaimed::Held(a, p) => {
                                (ack, permit) = (a, p);
                                invocation.outcome = Outcome::Retry {
                                    reason: "lost the idempotency claim before committing".into(),
                                    after: None,
                                };
                            }
                        }
                    }
                }
            }
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
                    unreachable!("kind is None only for Ok");
                };
                let mut records = output_records(&record, outputs, &dedup_base);
                let count = records.len() as u64;
                if outbox {
                    // Committed as outbox rows: the relay publishes them.
                    records.clear();
                }
                pending.push(
                    PendingMessage {
                        ack,
                        idem_key,
                        owner,
                        outputs: count,
                        duplicate: false,
                        replay_of: replayed,
                        _permit: permit,
                    },
                    records,
                    Some(&record),
                );
                outcome("ok");
                tracing::debug!(attempt, "Message handled");
                return true;
            };

            // Earlier messages of the batch are finished: publish and ack them before this one
            // waits for a retry or a dead-letter write.
            if !self.flush(pending).await {
                RouteStats::bump(&self.stats.abandoned);
                self.release(idem_key.as_ref(), owner.as_ref()).await;
                return false;
            }

            let now = now_ms();
            let (reason, after) = match &invocation.outcome {
                Outcome::Retry { reason, after } => (reason.clone(), *after),
                other => (other.reason().unwrap_or_default(), None),
            };
            let first_ms = failure.as_ref().map_or(now, |f| f.first_ms);
            failure = Some(LastFailure {
                kind: invocation.outcome.kind(),
                reason,
                first_ms,
                last_ms: now,
                refused: invocation.refused_outputs > 0,
            });
            match self
                .config
                .retry
                .decide(attempt, kind, after, fastrand::f64())
            {
                Decision::RetryAfter { delay, .. }
                    if self.config.retry.mode == RetryMode::Broker =>
                {
                    RouteStats::bump(&self.stats.retried);
                    outcome("redelivery");
                    tracing::debug!(route = %self.route, message = %message_id, attempt, delay_ms = delay.as_millis() as u64, "Attempt failed; the broker redelivers it");
                    // The redelivery may go to another process: it must not wait for our lease.
                    self.release(idem_key.as_ref(), owner.as_ref()).await;
                    if let Err(e) = ack.redeliver(delay).await {
                        // Unacknowledged, it still comes back after ack_wait.
                        tracing::warn!(route = %self.route, error = %e, "Asking for a redelivery failed; the message returns after ack_wait");
                    }
                    return true;
                }
                Decision::RetryAfter {
                    delay,
                    attempt: next,
                } => {
                    RouteStats::bump(&self.stats.retried);
                    tracing::debug!(route = %self.route, message = %message_id, attempt, delay_ms = delay.as_millis() as u64, "Attempt failed; retrying");
                    if !self.shutdown.sleep(delay).await {
                        RouteStats::bump(&self.stats.abandoned);
                        self.release(idem_key.as_ref(), owner.as_ref()).await;
                        return true;
                    }
                    // Renew the claim for the next attempt; if the lease lapsed meanwhile and
                    // another holder finished the message, it is done.
                    if let (Some(keys), Some(key), Some(me)) =
                        (&self.done_keys, idem_key.as_ref(), owner.as_ref())
                    {
                        match self
                            .reclaim(keys, key, me, pending, ack, permit, &record)
                            .await
                        {
                            Reclaimed::Stopped | Reclaimed::Finished => return true,
                            Reclaimed::Held(a, p) => (ack, permit) = (a, p),
                        }
                    }
                    attempt = next;
                }
                Decision::GiveUp { reason: gave_up } => {
                    let Some(f) = failure.take() else {
                        unreachable!("a failure was just recorded");
                    };
                    if kind == FailureKind::Reject {
                        RouteStats::bump(&self.stats.rejected);
                    }
                    outcome("dead_lettered");
                    if f.refused {
                        // Not the message's fault: the route refuses what its handler publishes,
                        // and will dead-letter every message that does the same.
                        tracing::warn!(route = %self.route, message = %message_id, attempts = attempt, reason = %f.reason, "Dead-lettering message: the host refused one of its outputs. If the handler is right, add the topic to routes.{}.outputs (or raise the limit) and reload; then `lockgate dlq replay --route {}` runs the dead letters again", self.route, self.route);
                    } else {
                        tracing::info!(route = %self.route, message = %message_id, attempts = attempt, kind = f.kind, reason = %f.reason, "Dead-lettering message");
                    }
                    let (letter_kind, letter_reason) = (f.kind, f.reason.clone());
                    let letter = dlq::envelope(
                        &record,
                        &Failure {
                            route: self.route.clone(),
                            handler: invoker.handler_name(),
                            module_hash,
                            message_id: message_id.clone(),
                            error_kind: f.kind.to_owned(),
                            reason: f.reason,
                            gave_up,
                            attempts: attempt,
                            first_failure_ms: f.first_ms,
                            last_failure_ms: f.last_ms,
                        },
                        &self.config.dlq.topic,
                    );
                    let sink = self.sinks.dlq.clone();
                    if self
                        .retry_infra("write to the dead-letter topic", || {
                            sink.publish(vec![letter.clone()])
                        })
                        .await
                        .is_none()
                    {
                        RouteStats::bump(&self.stats.abandoned);
                        self.release(idem_key.as_ref(), owner.as_ref()).await;
                        return true;
                    }
                    RouteStats::bump(&self.stats.dead_lettered);
                    if let Some(reply_to) = &record.reply_to {
                        // Answer now, so the requester does not wait for its timeout.
                        let mut headers = vec![
                            (ERROR_HEADER.to_owned(), letter_kind.as_bytes().to_vec()),
                            (
                                format!("{ERROR_HEADER}-reason"),
                                letter_reason.clone().into_bytes(),
                            ),
                        ];
                        if let Some(c) = record.header(CORRELATION_HEADER) {
                            headers.push((CORRELATION_HEADER.to_owned(), c.to_vec()));
                        }
                        let answer = OutRecord {
                            topic: reply_to.clone(),
                            key: None,
                            headers,
                            payload: Vec::new(),
                        };
                        if let Err(e) = self.reply_sink().publish(vec![answer]).await {
                            tracing::warn!(route = %self.route, error = %e, "Cannot answer the failed request; the requester will time out");
                        }
                    }
                    if self.mark_dead_lettered(idem_key.as_deref()).await {
                        self.finish(ack, AckKind::DeadLettered).await;
                        if let Some(position) = replayed {
                            let detail = format!("{letter_kind}: {letter_reason}");
                            self.report_replays(vec![self.replay_result(
                                position,
                                ReplayOutcome::DeadLettered,
                                detail,
                            )]);
                        }
                    } else {
                        RouteStats::bump(&self.stats.abandoned);
                    }
                    drop(permit);
                    return true;
                }
            }
        }
    }

    /// (Re)claims `key` for `owner` and settles the message when the claim says it is no longer
    /// ours to run: a duplicate is acked with the batch, committed outputs of an earlier holder
    /// are queued for publishing. `Held` hands the ack and permit back.
    #[allow(clippy::too_many_arguments)]
    async fn reclaim(
        &self,
        keys: &DoneKeys,
        key: &str,
        owner: &str,
        pending: &mut Pending,
        ack: AckHandle,
        permit: Held,
        record: &Record,
    ) -> Reclaimed {
        let replay = replay_of(record).is_some();
        match self.acquire(keys, key, owner, replay, pending).await {
            None => {
                RouteStats::bump(&self.stats.abandoned);
                Reclaimed::Stopped
            }
            Some(Claim::Claimed) => Reclaimed::Held(ack, permit),
            Some(Claim::Applied(outputs)) => {
                self.push_applied(
                    pending,
                    ack,
                    permit,
                    key,
                    owner.to_owned(),
                    &outputs,
                    record,
                );
                Reclaimed::Finished
            }
            // `acquire` waits out `Busy`, so this is `Done`.
            Some(Claim::DeadLettered) => {
                tracing::debug!(route = %self.route, key, "The message of this idempotency key was dead-lettered; skipping its redelivery (`lockgate dlq replay` runs it again)");
                duplicate(&self.stats, pending, ack, permit, None);
                Reclaimed::Finished
            }
            Some(Claim::Done | Claim::Busy(_)) => {
                duplicate(&self.stats, pending, ack, permit, replay_of(record));
                Reclaimed::Finished
            }
        }
    }

    /// Takes a message whose key an earlier holder committed (and then crashed before
    /// publishing) into `pending` with the outputs it kept: the handler does not run again.
    #[allow(clippy::too_many_arguments)]
    fn push_applied(
        &self,
        pending: &mut Pending,
        ack: AckHandle,
        permit: Held,
        key: &str,
        owner: String,
        kept: &[u8],
        record: &Record,
    ) {
        let records = match decode_outputs(kept) {
            Ok(r) => r,
            Err(e) => {
                // Its effects are committed, so running it again would apply them twice.
                tracing::error!(route = %self.route, key, error = %e, "The outputs kept with a committed idempotency key cannot be read; the message completes without them");
                Vec::new()
            }
        };
        RouteStats::bump(&self.stats.recovered);
        outcome("recovered");
        tracing::info!(route = %self.route, key, outputs = records.len(), "Publishing the outputs an earlier holder committed; the handler does not run again");
        pending.push(
            PendingMessage {
                ack,
                idem_key: Some(key.to_owned()),
                owner: Some(owner),
                outputs: records.len() as u64,
                duplicate: false,
                replay_of: replay_of(record),
                _permit: permit,
            },
            records,
            Some(record),
        );
    }

    /// Where answers to requests go.
    fn reply_sink(&self) -> &Arc<dyn Sink> {
        self.sinks.replies.as_ref().unwrap_or(&self.sinks.outputs)
    }

    /// Records the key of a dead-lettered message: its redeliveries are skipped, a replay of its
    /// dead letter runs it again.
    async fn mark_dead_lettered(&self, key: Option<&str>) -> bool {
        match (key, &self.done_keys) {
            (Some(key), Some(keys)) => self
                .retry_infra("record the idempotency key", || {
                    keys.complete(vec![key.to_owned()], Completion::DeadLettered)
                })
                .await
                .is_some(),
            _ => true,
        }
    }

    async fn finish(&self, ack: AckHandle, kind: AckKind) {
        if let Err(e) = ack.ack(kind).await {
            // The message stays unacknowledged and comes back; with idempotency on it is then
            // skipped as a duplicate.
            tracing::warn!(route = %self.route, error = %e, "Acknowledging a message failed; it will be redelivered");
        }
    }

    /// Retries `op` with capped exponential backoff until it succeeds (Some) or the route stops
    /// (None). Used for everything that must happen before an ack: giving up would lose data.
    async fn retry_infra<T, E, F, Fut>(&self, what: &str, op: F) -> Option<T>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut backoff = INITIAL_INFRA_BACKOFF;
        loop {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    RouteStats::bump(&self.stats.infra_retries);
                    tracing::error!(route = %self.route, error = %e, retry_in_ms = backoff.as_millis() as u64, "Cannot {what}; the message stays unacknowledged and the call is retried");
                    if !self.shutdown.sleep(backoff).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(MAX_INFRA_BACKOFF);
                }
            }
        }
    }
}

/// `record` as the handler would see it on attempt `attempt` (exposed for tests and tools).
pub fn inbound(record: &Record, attempt: u32) -> InboundMessage {
    InboundMessage {
        id: record.position(),
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
#[path = "route_tests.rs"]
mod tests;
