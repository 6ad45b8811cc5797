//! The route's circuit breaker as its tasks share it: the state machine of
//! [`crate::policy::breaker`] behind a lock, published to [`RouteStats`], with a wakeup for the
//! dispatcher and the attempts that wait on it.

use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::pipeline::shutdown::Shutdown;
use crate::pipeline::stats::RouteStats;
use crate::policy::breaker::{Admission, BreakerState, CircuitBreaker};

/// The breaker plus a wakeup for everything waiting on it.
pub(super) struct Breaker {
    stats: Arc<RouteStats>,
    state: std::sync::Mutex<CircuitBreaker>,
    changed: Notify,
}

impl Breaker {
    /// `breaker`, publishing its state and trips to `stats`.
    pub(super) fn new(breaker: CircuitBreaker, stats: Arc<RouteStats>) -> Self {
        Self {
            stats,
            state: std::sync::Mutex::new(breaker),
            changed: Notify::new(),
        }
    }

    /// Runs `f` on the state machine; a transition is published and wakes the waiters.
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut CircuitBreaker) -> R) -> R {
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

    /// What an admission would answer now, without taking a probe slot.
    pub(super) fn peek(&self) -> Admission {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .peek(Instant::now())
    }

    /// Waits until the breaker stops admitting.
    pub(super) async fn wait_for_open(&self) {
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
    pub(super) async fn wait_until(
        &self,
        shutdown: &Shutdown,
        ask: impl Fn(&Self) -> Admission,
    ) -> bool {
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

/// Whether the route's breaker (if any) is closed, from the state the breaker publishes.
pub(super) fn breaker_closed(stats: &RouteStats) -> bool {
    stats.breaker_state.load(AtomicOrdering::Relaxed) == 0
}
