//! A route's counters, gauges and life state ([`RouteStats`], [`RouteState`]), read by
//! `lockgate run`'s summary, `/metrics` and `/readyz`.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use crate::health::{Health, HealthWatch};
use crate::pipeline::readiness::Dependency;

/// Buckets of the handler-duration histogram, in seconds (100 µs .. ~26 s).
fn duration_buckets() -> Vec<f64> {
    crate::metrics::exponential_buckets(0.0001, 4.0, 10)
}

/// What a route is doing, for `/readyz` and the `lockgate_route_state` gauge (whose values are
/// the discriminants: new states get new numbers, existing ones never change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RouteState {
    /// Created, not running yet.
    Starting = 0,
    /// Connected and consuming.
    Running = 1,
    /// Source paused: the circuit breaker is open.
    Paused = 2,
    /// Ended (shutdown or a source error).
    Stopped = 3,
    /// Running, but its source (or a store it needs) has not connected yet.
    Connecting = 4,
    /// Running, but its source (or a store it needs) fails; it keeps trying (see
    /// [`RouteStats::blocker`] for why).
    Failing = 5,
}

impl RouteState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Connecting => "connecting",
            Self::Failing => "failing",
        }
    }

    /// Whether a route in this state is ready (`/readyz`): consuming, or paused by its breaker
    /// (which is it doing its job).
    pub fn is_ready(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// Counters and gauges of one route, read by `lockgate run`'s summary and `/metrics`.
#[derive(Debug)]
pub struct RouteStats {
    /// Deliveries taken from the source.
    pub received: AtomicU64,
    /// Messages whose handler succeeded and whose outputs were acknowledged.
    pub succeeded: AtomicU64,
    /// Failed attempts that were retried.
    pub retried: AtomicU64,
    /// Messages the handler rejected.
    pub rejected: AtomicU64,
    /// Messages written to the dead-letter destination.
    pub dead_lettered: AtomicU64,
    /// Redelivered messages skipped because their idempotency key was done (or their message
    /// was dead-lettered and they are not a replay).
    pub duplicates: AtomicU64,
    /// Publishes the host refused during calls (a topic not in `outputs`, too large, too many):
    /// each fails its call, and a route whose handler keeps doing it dead-letters its traffic.
    pub refused_outputs: AtomicU64,
    /// Replayed dead letters this route took to their end (handled, skipped or dead-lettered
    /// again).
    pub replays: AtomicU64,
    /// Outputs published.
    pub outputs: AtomicU64,
    /// Times the rate limit made the route wait.
    pub rate_limited: AtomicU64,
    /// Messages left unacknowledged at shutdown (they will be redelivered).
    pub abandoned: AtomicU64,
    /// Queued messages skipped because their partition was revoked (the new owner has them).
    pub revoked: AtomicU64,
    /// Failed publish / DLQ / state-store calls that were retried.
    pub infra_retries: AtomicU64,
    /// Messages that waited because their idempotency key was claimed by another lane or
    /// process.
    pub claim_waits: AtomicU64,
    /// Messages whose effects an earlier holder had committed before crashing: their kept
    /// outputs were published without running the handler again.
    pub recovered: AtomicU64,
    /// Messages held (queued in lanes, running, waiting for a retry or for their batch).
    pub in_flight: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_trips: AtomicU64,
    /// The breaker's state: 0 closed, 1 open, 2 half-open (probing).
    pub breaker_state: AtomicU64,
    /// Where the route is in its life: starting, running, paused, stopped.
    state: std::sync::atomic::AtomicU8,
    /// What it needs to work (its source, its stores); they make a running route connecting
    /// or failing.
    dependencies: std::sync::Mutex<Vec<Dependency>>,
    /// Handler call durations, seconds.
    pub handler_seconds: crate::metrics::Histogram,
    /// When these counters started (a reload of the route starts new ones).
    pub since: std::time::SystemTime,
}

impl Default for RouteStats {
    fn default() -> Self {
        Self {
            received: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            refused_outputs: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            outputs: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            infra_retries: AtomicU64::new(0),
            claim_waits: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            breaker_trips: AtomicU64::new(0),
            breaker_state: AtomicU64::new(0),
            state: std::sync::atomic::AtomicU8::new(RouteState::Starting as u8),
            dependencies: std::sync::Mutex::new(Vec::new()),
            handler_seconds: crate::metrics::Histogram::new(duration_buckets()),
            since: std::time::SystemTime::now(),
        }
    }
}

impl RouteStats {
    /// The route's current state: its place in its life and, while it runs, its dependencies'
    /// health (one failing makes it `Failing`, one not connected yet `Connecting`).
    pub fn state(&self) -> RouteState {
        let life = match self.state.load(AtomicOrdering::Relaxed) {
            0 => RouteState::Starting,
            1 => RouteState::Running,
            2 => RouteState::Paused,
            _ => RouteState::Stopped,
        };
        if !life.is_ready() {
            return life;
        }
        match self.blocker() {
            Some((_, Health::Failing { .. })) => RouteState::Failing,
            Some(_) => RouteState::Connecting,
            None => life,
        }
    }

    /// Makes the route's state depend on `health`: its source's, or a store's it needs.
    pub fn depend_on(&self, name: impl Into<String>, health: HealthWatch) {
        self.dependencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Dependency {
                name: name.into(),
                health,
            });
    }

    /// Like [`Self::depend_on`], first in line (the source: the reason a route gives is about
    /// its source when both it and a store fail).
    pub(super) fn depend_first_on(&self, name: impl Into<String>, health: HealthWatch) {
        self.dependencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                0,
                Dependency {
                    name: name.into(),
                    health,
                },
            );
    }

    /// What the route depends on.
    pub fn dependencies(&self) -> Vec<Dependency> {
        self.dependencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Why the route is not ready, if a dependency is the reason: the first failing one (else
    /// the first not connected yet), by name, with its health.
    pub fn blocker(&self) -> Option<(String, Health)> {
        let deps = self
            .dependencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut connecting = None;
        for d in deps.iter() {
            let h = d.health.borrow();
            match &*h {
                Health::Ready => {}
                Health::Failing { .. } => return Some((d.name.clone(), h.clone())),
                Health::Connecting => {
                    connecting.get_or_insert_with(|| (d.name.clone(), h.clone()));
                }
            }
        }
        connecting
    }

    /// Moves the route to `state` in its life (the route sets it; dependencies refine it).
    pub(super) fn set_state(&self, state: RouteState) {
        self.state.store(state as u8, AtomicOrdering::Relaxed);
    }

    /// Adds one to `counter`.
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, AtomicOrdering::Relaxed);
    }

    /// A snapshot as (name, value) pairs, for summaries.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        vec![
            ("received", g(&self.received)),
            ("succeeded", g(&self.succeeded)),
            ("retried", g(&self.retried)),
            ("rejected", g(&self.rejected)),
            ("dead_lettered", g(&self.dead_lettered)),
            ("duplicates", g(&self.duplicates)),
            ("refused_outputs", g(&self.refused_outputs)),
            ("replays", g(&self.replays)),
            ("outputs", g(&self.outputs)),
            ("rate_limited", g(&self.rate_limited)),
            ("abandoned", g(&self.abandoned)),
            ("revoked", g(&self.revoked)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_running_route_is_as_ready_as_what_it_depends_on() {
        use crate::health::{Failure, HealthReporter};
        let stats = RouteStats::default();
        let (source, store) = (HealthReporter::new(), HealthReporter::new());
        stats.depend_on("state store pg", store.watch());
        stats.depend_first_on("source", source.watch());
        // Its place in its life comes first.
        assert_eq!(stats.state(), RouteState::Starting);
        stats.set_state(RouteState::Running);
        assert_eq!(stats.state(), RouteState::Connecting);
        assert_eq!(stats.blocker().map(|b| b.0).as_deref(), Some("source"));
        source.ready();
        assert_eq!(stats.state(), RouteState::Connecting);
        assert_eq!(
            stats.blocker().map(|b| b.0).as_deref(),
            Some("state store pg")
        );
        store.failing(
            Failure::misconfigured("role app does not exist", "create it"),
            Duration::from_secs(10),
        );
        assert_eq!(stats.state(), RouteState::Failing);
        // The source's reason comes first when both fail.
        source.failing(Failure::transient("down"), Duration::from_secs(1));
        assert_eq!(stats.blocker().map(|b| b.0).as_deref(), Some("source"));
        source.ready();
        store.ready();
        assert_eq!(stats.state(), RouteState::Running);
        assert!(stats.blocker().is_none());
        stats.set_state(RouteState::Paused);
        assert!(stats.state().is_ready());
        source.failing(Failure::transient("down"), Duration::from_secs(1));
        assert_eq!(stats.state(), RouteState::Failing);
        stats.set_state(RouteState::Stopped);
        assert_eq!(stats.state(), RouteState::Stopped);
        // The gauge's values: the old ones never change.
        assert_eq!(
            [
                RouteState::Starting,
                RouteState::Running,
                RouteState::Paused,
                RouteState::Stopped,
                RouteState::Connecting,
                RouteState::Failing
            ]
            .map(|s| s as u8),
            [0, 1, 2, 3, 4, 5]
        );
    }
}
