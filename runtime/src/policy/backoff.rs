//! Retry policy: which failures are retried, how many times, and how long to wait between
//! attempts (exponential backoff with jitter).
//!
//! Pure decision logic, no clock and no I/O: the pipeline asks [`RetryPolicy::decide`] after each
//! failed attempt and sleeps for the answer. Randomness comes in as a number in `[0, 1)` so the
//! jitter bounds are testable exactly.

use std::time::Duration;

/// How the computed backoff is randomised, so that many consumers failing together do not retry
/// in lockstep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// No randomisation: exactly the exponential backoff.
    None,
    /// "Full jitter": uniformly random in `[0, backoff]`. Best at spreading load; some retries come
    /// almost at once.
    Full,
    /// Proportional: uniformly random in `[backoff × (1 - f), backoff]` for a fraction `f` in
    /// `(0, 1]`. Keeps a floor under every delay.
    Proportional(f64),
}

/// The kind of failure an attempt ended with, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The handler returned `retry`.
    Retry,
    /// The handler returned `reject`: never retried.
    Reject,
    /// The guest trapped (including out-of-memory).
    Trap,
    /// The call exceeded its deadline.
    Timeout,
}

/// Where the wait between attempts happens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetryMode {
    /// `"process"` (the default): lockgate holds the message and retries it after the backoff.
    #[default]
    InProcess,
    /// `"broker"` (JetStream only): lockgate gives the message back with the backoff as the
    /// redelivery delay (`nak`); the attempt number comes from the delivery count.
    Broker,
}

/// A route's `retry` table.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included (1 = never retry).
    pub max_attempts: u32,
    /// Backoff before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any backoff, including a handler's `retry-after`.
    pub max_backoff: Duration,
    /// Growth factor per attempt (≥ 1).
    pub multiplier: f64,
    /// Randomisation of each delay.
    pub jitter: Jitter,
    /// Whether traps (and out-of-memory) are retried. Default true: a trap may come from a
    /// transient condition, and after `max_attempts` the message is dead-lettered anyway.
    pub retry_traps: bool,
    /// Whether timeouts are retried. Default true.
    pub retry_timeouts: bool,
    /// Where the wait between attempts happens.
    pub mode: RetryMode,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: Jitter::Full,
            retry_traps: true,
            retry_timeouts: true,
            mode: RetryMode::InProcess,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then make attempt number `attempt`.
    RetryAfter {
        /// The delay before the next attempt.
        delay: Duration,
        /// The 1-based number of the next attempt.
        attempt: u32,
    },
    /// Do not retry: dead-letter the message.
    GiveUp {
        /// Why not.
        reason: GiveUpReason,
    },
}

/// Why a failed message is not retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The handler rejected it.
    Rejected,
    /// The failure kind is configured as not retryable.
    NotRetryable,
    /// `max_attempts` were made.
    AttemptsExhausted,
}

impl RetryPolicy {
    /// The exponential backoff before attempt `next_attempt` (≥ 2), before jitter, capped at
    /// `max_backoff`.
    pub fn base_backoff(&self, next_attempt: u32) -> Duration {
        let exponent = next_attempt.saturating_sub(2);
        let factor = self
            .multiplier
            .max(1.0)
            .powi(i32::try_from(exponent).unwrap_or(i32::MAX));
        let secs = self.initial_backoff.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_backoff.as_secs_f64() {
            self.max_backoff
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// Applies the jitter to `backoff`; `random` is uniform in `[0, 1)`.
    pub fn jittered(&self, backoff: Duration, random: f64) -> Duration {
        let r = random.clamp(0.0, 1.0);
        match self.jitter {
            Jitter::None => backoff,
            Jitter::Full => backoff.mul_f64(r),
            Jitter::Proportional(f) => {
                let f = f.clamp(0.0, 1.0);
                backoff.mul_f64(1.0 - f + f * r)
            }
        }
    }

    /// Decides what follows a failed attempt number `attempt` (1-based). A handler's
    /// `retry_after` is honoured as a floor and capped at `max_backoff`.
    pub fn decide(
        &self,
        attempt: u32,
        kind: FailureKind,
        retry_after: Option<Duration>,
        random: f64,
    ) -> Decision {
        let retryable = match kind {
            FailureKind::Reject => {
                return Decision::GiveUp {
                    reason: GiveUpReason::Rejected,
                };
            }
            FailureKind::Retry => true,
            FailureKind::Trap => self.retry_traps,
            FailureKind::Timeout => self.retry_timeouts,
        };
        if !retryable {
            return Decision::GiveUp {
                reason: GiveUpReason::NotRetryable,
            };
        }
        if attempt >= self.max_attempts {
            return Decision::GiveUp {
                reason: GiveUpReason::AttemptsExhausted,
            };
        }
        let next = attempt + 1;
        let jittered = self.jittered(self.base_backoff(next), random);
        let delay = match retry_after {
            Some(after) => jittered.max(after).min(self.max_backoff),
            None => jittered,
        };
        Decision::RetryAfter {
            delay,
            attempt: next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
            multiplier: 2.0,
            jitter,
            ..RetryPolicy::default()
        }
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::RetryAfter { delay, .. } => delay,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn backoff_grows_exponentially_and_caps() {
        let p = policy(Jitter::None);
        let seq: Vec<u128> = (1..6)
            .map(|a| delay(p.decide(a, FailureKind::Retry, None, 0.5)).as_millis())
            .collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1_000]);
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy(Jitter::None);
        assert_eq!(
            p.decide(5, FailureKind::Retry, None, 0.0),
            Decision::RetryAfter {
                delay: Duration::from_millis(1_000),
                attempt: 6
            }
        );
        assert_eq!(
            p.decide(6, FailureKind::Retry, None, 0.0),
            Decision::GiveUp {
                reason: GiveUpReason::AttemptsExhausted
            }
        );
    }

    #[test]
    fn full_jitter_stays_within_zero_and_backoff() {
        let p = policy(Jitter::Full);
        for i in 0..100 {
            let r = f64::from(i) / 100.0;
            let d = delay(p.decide(3, FailureKind::Retry, None, r));
            assert!(d <= Duration::from_millis(400), "{d:?}");
        }
        assert_eq!(
            delay(p.decide(3, FailureKind::Retry, None, 0.0)),
            Duration::ZERO
        );
        assert_eq!(
            delay(p.decide(3, FailureKind::Retry, None, 0.5)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn proportional_jitter_keeps_a_floor() {
        let p = policy(Jitter::Proportional(0.25));
        let low = delay(p.decide(3, FailureKind::Retry, None, 0.0));
        let high = delay(p.decide(3, FailureKind::Retry, None, 0.999_999));
        assert_eq!(low, Duration::from_millis(300));
        assert!(high > Duration::from_millis(399) && high <= Duration::from_millis(400));
    }

    #[test]
    fn retry_after_is_a_floor_capped_at_max_backoff() {
        let p = policy(Jitter::None);
        let d = delay(p.decide(1, FailureKind::Retry, Some(Duration::from_millis(700)), 0.0));
        assert_eq!(d, Duration::from_millis(700), "honoured above the backoff");
        let d = delay(p.decide(1, FailureKind::Retry, Some(Duration::from_millis(5)), 0.0));
        assert_eq!(d, Duration::from_millis(100), "never below the backoff");
        let d = delay(p.decide(1, FailureKind::Retry, Some(Duration::from_secs(3_600)), 0.0));
        assert_eq!(d, Duration::from_millis(1_000), "capped at max_backoff");
    }

    #[test]
    fn rejects_never_retry_and_traps_follow_the_policy() {
        let mut p = policy(Jitter::None);
        assert_eq!(
            p.decide(1, FailureKind::Reject, None, 0.0),
            Decision::GiveUp {
                reason: GiveUpReason::Rejected
            }
        );
        assert!(matches!(
            p.decide(1, FailureKind::Trap, None, 0.0),
            Decision::RetryAfter { .. }
        ));
        p.retry_traps = false;
        p.retry_timeouts = false;
        for kind in [FailureKind::Trap, FailureKind::Timeout] {
            assert_eq!(
                p.decide(1, kind, None, 0.0),
                Decision::GiveUp {
                    reason: GiveUpReason::NotRetryable
                }
            );
        }
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy(Jitter::None);
        assert_eq!(p.base_backoff(u32::MAX), Duration::from_millis(1_000));
    }
}
