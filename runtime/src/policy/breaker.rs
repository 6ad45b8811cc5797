//! Per-route circuit breaker.
//!
//! Unlike generic breaker crates, an open breaker here does not fail calls: the route stops
//! pulling from its source and the messages wait in the broker (docs/guarantees.md#g6). This
//! module is only the state machine; the pipeline asks [`CircuitBreaker::admit`] before taking a
//! message and pauses its source on [`Admission::Wait`].
//!
//! What counts: retryable failures (handler `retry`, traps, timeouts) are failures; successes are
//! successes; rejections are neither, because a poison message says nothing about the dependency.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// A route's `circuit_breaker` table.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Trip after this many failures in a row.
    pub consecutive_failures: Option<u32>,
    /// Trip when failures / calls within `window` reach this ratio (0 < ratio ≤ 1)...
    pub failure_ratio: Option<f64>,
    /// ...over this sliding window...
    pub window: Duration,
    /// ...once at least this many calls fell in the window.
    pub min_calls: u32,
    /// How long the breaker stays open before letting probes through.
    pub open_duration: Duration,
    /// Probes admitted while half-open; all must succeed to close the breaker.
    pub half_open_max: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: Some(5),
            failure_ratio: None,
            window: Duration::from_secs(30),
            min_calls: 20,
            open_duration: Duration::from_secs(10),
            half_open_max: 1,
        }
    }
}

/// The breaker's state, for status output and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Messages flow.
    Closed,
    /// The route is paused until the instant given.
    Open {
        /// When probes may start.
        until: Instant,
    },
    /// A bounded number of probe messages are let through.
    HalfOpen {
        /// Probes admitted so far.
        admitted: u32,
        /// Probes that succeeded so far.
        succeeded: u32,
    },
}

/// The answer to "may the route take another message now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Yes.
    Allow,
    /// Yes, as a half-open probe: report its result with `on_success` / `on_failure`.
    Probe,
    /// No: pause the source. `Some(t)`: ask again at `t`. `None`: ask again once an outstanding
    /// probe has reported.
    Wait(Option<Instant>),
}

/// The state machine. Time comes from tokio's clock so tests can pause and advance it.
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive: u32,
    /// (when, failed) of calls inside the ratio window.
    recent: VecDeque<(Instant, bool)>,
    trips: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            consecutive: 0,
            recent: VecDeque::new(),
            trips: 0,
        }
    }

    /// The current state (an open breaker whose time is up reports `Open` until the next
    /// `admit`).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How often the breaker has opened.
    pub fn trips(&self) -> u64 {
        self.trips
    }

    /// Whether the route may take a message at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Allow,
            BreakerState::Open { until } if now < until => Admission::Wait(Some(until)),
            BreakerState::Open { .. } => {
                self.state = BreakerState::HalfOpen {
                    admitted: 1,
                    succeeded: 0,
                };
                Admission::Probe
            }
            BreakerState::HalfOpen {
                admitted,
                succeeded,
            } if admitted < self.config.half_open_max.max(1) => {
                self.state = BreakerState::HalfOpen {
                    admitted: admitted + 1,
                    succeeded,
                };
                Admission::Probe
            }
            BreakerState::HalfOpen { .. } => Admission::Wait(None),
        }
    }

    /// What [`Self::admit`] would answer at `now`, without taking a probe slot. The source side
    /// of a route uses it to decide whether to pull (or pause); the attempt itself calls `admit`.
    pub fn peek(&self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Allow,
            BreakerState::Open { until } if now < until => Admission::Wait(Some(until)),
            BreakerState::Open { .. } => Admission::Probe,
            BreakerState::HalfOpen { admitted, .. }
                if admitted < self.config.half_open_max.max(1) =>
            {
                Admission::Probe
            }
            BreakerState::HalfOpen { .. } => Admission::Wait(None),
        }
    }

    /// Records a successful call.
    pub fn on_success(&mut self, now: Instant) {
        self.consecutive = 0;
        match self.state {
            BreakerState::HalfOpen {
                admitted,
                succeeded,
            } => {
                let succeeded = succeeded + 1;
                if succeeded >= self.config.half_open_max.max(1) {
                    self.close();
                } else {
                    self.state = BreakerState::HalfOpen {
                        admitted,
                        succeeded,
                    };
                }
            }
            BreakerState::Closed => self.record(now, false),
            // A call admitted before the breaker opened finished late: it proves nothing new.
            BreakerState::Open { .. } => {}
        }
    }

    /// Records a failed (retryable) call.
    pub fn on_failure(&mut self, now: Instant) {
        match self.state {
            BreakerState::HalfOpen { .. } => self.open(now),
            BreakerState::Open { .. } => {}
            BreakerState::Closed => {
                self.consecutive += 1;
                self.record(now, true);
                if self.should_trip() {
                    self.open(now);
                }
            }
        }
    }

    fn record(&mut self, now: Instant, failed: bool) {
        if self.config.failure_ratio.is_none() {
            return;
        }
        self.recent.push_back((now, failed));
        while let Some((t, _)) = self.recent.front() {
            if now.duration_since(*t) > self.config.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    fn should_trip(&self) -> bool {
        if let Some(n) = self.config.consecutive_failures
            && self.consecutive >= n.max(1)
        {
            return true;
        }
        if let Some(ratio) = self.config.failure_ratio {
            let calls = self.recent.len();
            if calls >= self.config.min_calls.max(1) as usize {
                let failures = self.recent.iter().filter(|(_, f)| *f).count();
                return failures as f64 / calls as f64 >= ratio;
            }
        }
        false
    }

    fn open(&mut self, now: Instant) {
        self.trips += 1;
        self.state = BreakerState::Open {
            until: now + self.config.open_duration,
        };
        self.consecutive = 0;
        self.recent.clear();
    }

    fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.consecutive = 0;
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn breaker(consecutive: Option<u32>, ratio: Option<f64>, probes: u32) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            consecutive_failures: consecutive,
            failure_ratio: ratio,
            window: Duration::from_secs(10),
            min_calls: 10,
            open_duration: Duration::from_secs(5),
            half_open_max: probes,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn trips_after_consecutive_failures_and_a_success_resets_the_count() {
        let mut b = breaker(Some(3), None, 1);
        let now = Instant::now();
        b.on_failure(now);
        b.on_failure(now);
        b.on_success(now);
        b.on_failure(now);
        b.on_failure(now);
        assert_eq!(
            b.admit(now),
            Admission::Allow,
            "the success reset the streak"
        );
        b.on_failure(now);
        assert_eq!(
            b.admit(now),
            Admission::Wait(Some(now + Duration::from_secs(5)))
        );
        assert_eq!(b.trips(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn open_waits_then_half_opens_with_bounded_probes() {
        let mut b = breaker(Some(1), None, 2);
        b.on_failure(Instant::now());
        advance(Duration::from_millis(4_999)).await;
        assert!(matches!(b.admit(Instant::now()), Admission::Wait(Some(_))));
        advance(Duration::from_millis(1)).await;
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
        assert_eq!(
            b.admit(Instant::now()),
            Admission::Wait(None),
            "only half_open_max probes"
        );
        b.on_success(Instant::now());
        assert_eq!(
            b.admit(Instant::now()),
            Admission::Wait(None),
            "one probe still out"
        );
        b.on_success(Instant::now());
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(Instant::now()), Admission::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_a_full_period() {
        let mut b = breaker(Some(1), None, 1);
        b.on_failure(Instant::now());
        advance(Duration::from_secs(5)).await;
        assert_eq!(b.admit(Instant::now()), Admission::Probe);
        advance(Duration::from_secs(1)).await;
        let failed_at = Instant::now();
        b.on_failure(failed_at);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: failed_at + Duration::from_secs(5)
            }
        );
        assert_eq!(b.trips(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn trips_on_failure_ratio_only_with_enough_calls_in_the_window() {
        let mut b = breaker(None, Some(0.5), 1);
        for _ in 0..4 {
            b.on_failure(Instant::now());
        }
        assert_eq!(b.admit(Instant::now()), Admission::Allow, "below min_calls");
        for _ in 0..5 {
            b.on_success(Instant::now());
        }
        assert_eq!(b.admit(Instant::now()), Admission::Allow, "4/9 failed");
        b.on_failure(Instant::now());
        assert!(
            matches!(b.admit(Instant::now()), Admission::Wait(_)),
            "5/10 failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn old_calls_leave_the_ratio_window() {
        let mut b = breaker(None, Some(0.5), 1);
        for _ in 0..9 {
            b.on_failure(Instant::now());
        }
        advance(Duration::from_secs(11)).await;
        // The nine old failures have aged out: one new failure is 1 of 1 call, under min_calls.
        b.on_failure(Instant::now());
        assert_eq!(b.admit(Instant::now()), Admission::Allow);
    }

    #[tokio::test(start_paused = true)]
    async fn late_results_while_open_change_nothing() {
        let mut b = breaker(Some(1), None, 1);
        b.on_failure(Instant::now());
        let state = b.state();
        b.on_success(Instant::now());
        b.on_failure(Instant::now());
        assert_eq!(b.state(), state);
        assert_eq!(b.trips(), 1);
    }
}
