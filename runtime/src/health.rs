//! Health of what a route depends on: its source's connection to the broker and the state
//! stores it writes to.
//!
//! Each adapter classifies its own errors, because only it knows what a refused login, a queue
//! declared with other arguments or a missing stream looks like in its protocol, into a
//! [`Failure`] of one of two kinds:
//! - [`FailureKind::Transient`]: the broker is down or unreachable, a request timed out. Retried
//!   quickly, with a jittered exponential [`Backoff`] (100 ms doubling to 5 s).
//! - [`FailureKind::Misconfigured`]: retrying unchanged fails the same way (authentication
//!   refused, access refused, a queue or stream declared differently, a topic or stream that
//!   does not exist). It carries a `fix` for the operator and is retried slowly
//!   ([`MISCONFIGURED_RETRY`], jittered), so fixing the broker or its settings brings the route
//!   up without a restart.
//!
//! The adapter publishes its [`Health`] through a [`HealthReporter`]; the route reads one state
//! from its dependencies' [`HealthWatch`]es (`/readyz`, `lockgate status`, the
//! `lockgate_route_state` gauge) and logs each change once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// First wait after a transient failure; doubles up to [`MAX_TRANSIENT_RETRY`].
pub const INITIAL_RETRY: Duration = Duration::from_millis(100);
/// Longest wait between attempts while a failure is transient.
pub const MAX_TRANSIENT_RETRY: Duration = Duration::from_secs(5);
/// Wait between attempts while a failure is a misconfiguration (jittered by ±20%).
pub const MISCONFIGURED_RETRY: Duration = Duration::from_secs(10);

/// How a failure is expected to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Down, unreachable, overloaded or timed out: it may work on the next attempt.
    Transient,
    /// Refused for a reason only a change of the config or of the broker fixes.
    Misconfigured,
}

impl FailureKind {
    /// Lower-case name (`transient`, `misconfigured`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Misconfigured => "misconfigured",
        }
    }
}

/// A classified failure to connect, authenticate, declare or consume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Transient or a misconfiguration.
    pub kind: FailureKind,
    /// What failed and what the other side said (never a password).
    pub error: String,
    /// What to change, when the adapter knows.
    pub fix: Option<String>,
}

impl Failure {
    /// A failure that may go away by itself.
    pub fn transient(error: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Transient,
            error: error.into(),
            fix: None,
        }
    }

    /// A failure that needs a change of the config or the broker, and what to change.
    pub fn misconfigured(error: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Misconfigured,
            error: error.into(),
            fix: Some(fix.into()),
        }
    }

    /// Whether only a change (of the config or of the broker) fixes it.
    pub fn is_misconfigured(&self) -> bool {
        self.kind == FailureKind::Misconfigured
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// What a dependency is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not connected yet, and nothing failed yet.
    Connecting,
    /// Connected and working: a source consumes, a store answers.
    Ready,
    /// The last attempt failed; the next one comes after `retry_in`.
    Failing {
        /// Why.
        failure: Failure,
        /// Failed attempts in a row.
        attempts: u32,
        /// Wait before the next attempt.
        retry_in: Duration,
    },
}

impl Health {
    /// Lower-case name (`connecting`, `ready`, `failing`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Ready => "ready",
            Self::Failing { .. } => "failing",
        }
    }

    /// The failure, while failing.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Self::Failing { failure, .. } => Some(failure),
            _ => None,
        }
    }
}

/// The reading side of a dependency's health.
pub type HealthWatch = watch::Receiver<Health>;

/// A watch that is [`Health::Ready`] for good: for sources with nothing to connect to (the
/// embedded broker, in-memory test sources).
pub fn always_ready() -> HealthWatch {
    // The sender goes at once; a receiver keeps the last value and sees no more changes.
    watch::channel(Health::Ready).1
}

/// The publishing side of a dependency's health; cheap to clone (background tasks of one
/// source share it).
#[derive(Clone, Debug)]
pub struct HealthReporter {
    tx: Arc<watch::Sender<Health>>,
    attempts: Arc<AtomicU32>,
}

impl Default for HealthReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthReporter {
    /// A reporter starting at [`Health::Connecting`].
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(Health::Connecting).0),
            attempts: Arc::new(AtomicU32::new(0)),
        }
    }

    /// A new reader of this health.
    pub fn watch(&self) -> HealthWatch {
        self.tx.subscribe()
    }

    /// The current health.
    pub fn get(&self) -> Health {
        self.tx.borrow().clone()
    }

    /// Connected and working (readers hear of it only if it was not already so).
    pub fn ready(&self) {
        self.attempts.store(0, Ordering::Relaxed);
        self.tx.send_if_modified(|h| {
            let changed = *h != Health::Ready;
            *h = Health::Ready;
            changed
        });
    }

    /// (Re)connecting after a deliberate disconnect, with nothing failed.
    pub fn connecting(&self) {
        self.tx.send_if_modified(|h| {
            let changed = *h != Health::Connecting;
            *h = Health::Connecting;
            changed
        });
    }

    /// The attempt failed; the next one comes after `retry_in`. Every call notifies readers
    /// (the attempt count grows), which decide what is worth a log line.
    pub fn failing(&self, failure: Failure, retry_in: Duration) {
        let attempts = self
            .attempts
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        self.tx.send_replace(Health::Failing {
            failure,
            attempts,
            retry_in,
        });
    }

    /// Reports `failure`, then sleeps for the next wait of `backoff`.
    pub async fn retry_after(&self, backoff: &mut Backoff, failure: Failure) {
        let wait = backoff.next(failure.kind);
        self.failing(failure, wait);
        tokio::time::sleep(wait).await;
    }
}

/// Waits between attempts: a jittered exponential backoff for transient failures, a slow,
/// jittered pace for misconfigurations.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    current: Duration,
}

impl Backoff {
    /// A backoff whose next transient wait is about [`INITIAL_RETRY`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The wait before the next attempt after a failure of `kind`.
    ///
    /// Transient: the step doubles from [`INITIAL_RETRY`] to [`MAX_TRANSIENT_RETRY`] and the wait
    /// is drawn from the upper half of it ("equal jitter"), so many clients that failed together
    /// spread out and none retries in a hot loop. Misconfigured: [`MISCONFIGURED_RETRY`] ±20%.
    pub fn next(&mut self, kind: FailureKind) -> Duration {
        match kind {
            FailureKind::Transient => {
                self.current = (self.current * 2).clamp(INITIAL_RETRY, MAX_TRANSIENT_RETRY);
                equal_jitter(self.current)
            }
            FailureKind::Misconfigured => {
                // A transient failure after it continues at the cap, not from scratch.
                self.current = MAX_TRANSIENT_RETRY;
                misconfigured_wait()
            }
        }
    }

    /// After a success: the next failure starts from [`INITIAL_RETRY`] again.
    pub fn reset(&mut self) {
        self.current = Duration::ZERO;
    }
}

/// A wait drawn from the upper half of `step`.
fn equal_jitter(step: Duration) -> Duration {
    let half = step / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The wait before transient attempt `attempt` (1 = the first retry) where no [`Backoff`] can
/// be kept (a client library's reconnect callback): the same schedule and jitter.
pub fn transient_wait(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    equal_jitter(
        INITIAL_RETRY
            .saturating_mul(1 << doublings)
            .min(MAX_TRANSIENT_RETRY),
    )
}

/// The wait before the next attempt after a misconfiguration: [`MISCONFIGURED_RETRY`] ±20%.
pub fn misconfigured_wait() -> Duration {
    MISCONFIGURED_RETRY.mul_f64(0.8 + 0.4 * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_waits_double_to_the_cap_with_equal_jitter() {
        for _ in 0..200 {
            let mut b = Backoff::new();
            let mut step = INITIAL_RETRY;
            for _ in 0..12 {
                let wait = b.next(FailureKind::Transient);
                assert!(
                    wait >= step / 2 && wait <= step,
                    "{wait:?} for step {step:?}"
                );
                step = (step * 2).min(MAX_TRANSIENT_RETRY);
            }
            b.reset();
            assert!(b.next(FailureKind::Transient) <= INITIAL_RETRY);
        }
    }

    #[test]
    fn transient_waits_by_attempt_follow_the_same_schedule() {
        for _ in 0..100 {
            let first = transient_wait(1);
            assert!(
                first >= INITIAL_RETRY / 2 && first <= INITIAL_RETRY,
                "{first:?}"
            );
            let third = transient_wait(3);
            assert!(
                third >= INITIAL_RETRY * 2 && third <= INITIAL_RETRY * 4,
                "{third:?}"
            );
            let late = transient_wait(40);
            assert!(
                late >= MAX_TRANSIENT_RETRY / 2 && late <= MAX_TRANSIENT_RETRY,
                "{late:?}"
            );
        }
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let mut b = Backoff::new();
        for _ in 0..6 {
            b.next(FailureKind::Transient);
        }
        let waits: std::collections::HashSet<Duration> = (0..50)
            .map(|_| b.clone().next(FailureKind::Transient))
            .collect();
        assert!(waits.len() > 40, "waits barely vary: {waits:?}");
    }

    #[test]
    fn misconfigurations_are_retried_slowly_and_transients_after_them_resume_at_the_cap() {
        let mut b = Backoff::new();
        for _ in 0..200 {
            let wait = b.next(FailureKind::Misconfigured);
            assert!(
                wait >= MISCONFIGURED_RETRY.mul_f64(0.8)
                    && wait <= MISCONFIGURED_RETRY.mul_f64(1.2),
                "{wait:?}"
            );
        }
        let after = b.next(FailureKind::Transient);
        assert!(after >= MAX_TRANSIENT_RETRY / 2, "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reporter_counts_attempts_and_sleeps_the_backoff() {
        let reporter = HealthReporter::new();
        let mut watch = reporter.watch();
        assert_eq!(*watch.borrow_and_update(), Health::Connecting);
        let mut backoff = Backoff::new();
        let started = tokio::time::Instant::now();
        reporter
            .retry_after(&mut backoff, Failure::misconfigured("refused", "fix it"))
            .await;
        let slept = started.elapsed();
        assert!(
            slept >= MISCONFIGURED_RETRY.mul_f64(0.8) && slept <= MISCONFIGURED_RETRY.mul_f64(1.2),
            "{slept:?}"
        );
        assert!(watch.has_changed().unwrap_or(false));
        reporter.failing(Failure::transient("down"), Duration::from_millis(100));
        let Health::Failing {
            failure, attempts, ..
        } = reporter.get()
        else {
            panic!("not failing: {:?}", reporter.get());
        };
        assert_eq!((failure.kind, attempts), (FailureKind::Transient, 2));
        reporter.ready();
        assert_eq!(*watch.borrow_and_update(), Health::Ready);
        // Ready again changes nothing: readers are not woken for it.
        reporter.ready();
        assert!(!watch.has_changed().unwrap_or(true));
        reporter.failing(Failure::transient("down"), Duration::from_millis(100));
        assert!(matches!(
            reporter.get(),
            Health::Failing { attempts: 1, .. }
        ));
    }

    #[test]
    fn always_ready_stays_ready() {
        let w = always_ready();
        assert_eq!(*w.borrow(), Health::Ready);
    }
}
