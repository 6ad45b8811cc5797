//! What a route depends on (its source, the state stores it writes to) and the log lines their
//! health changes get.
//!
//! The route's state (`RouteState`) is read from these dependencies: `failing` while one fails,
//! `connecting` while one has not connected yet. Each change is logged once per route: a
//! misconfiguration at `error` with what to change (once, not per attempt, and once for one fix
//! however the broker words it: it is retried slowly and the log would otherwise fill with the
//! same line), a transient failure at `warn` when it starts or changes and then at most once a
//! minute while it lasts, and the way back at `info`.

use std::time::Duration;

use tokio::time::Instant;

use crate::health::{Failure, FailureKind, Health, HealthWatch};

/// How often a transient failure that goes on is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// One thing a route needs to work, and its health.
#[derive(Clone, Debug)]
pub struct Dependency {
    /// What it is, for people: `source`, `state store pg`.
    pub name: String,
    /// Its health.
    pub health: HealthWatch,
}

/// A log line a health change is worth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// A misconfiguration began (or changed): once, at `error`, with the fix.
    Misconfigured(Failure),
    /// A transient failure began (or changed): at `warn`.
    Unavailable(Failure),
    /// The same transient failure, a minute after the last line about it.
    StillUnavailable(Failure, u32),
    /// Working for the first time.
    Ready,
    /// Working again after `attempts` failed attempts.
    ReadyAgain(u32),
}

/// Decides which health changes are worth a line (see the module docs).
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// The failure last logged, while failing.
    failing: Option<Failure>,
    last_line: Option<Instant>,
    attempts: u32,
    ever_ready: bool,
}

impl ChangeLog {
    /// The line `health`, seen at `now`, is worth, if any.
    pub fn on(&mut self, health: &Health, now: Instant) -> Option<Line> {
        match health {
            Health::Connecting => None,
            Health::Ready => {
                let line = match (self.failing.take(), self.ever_ready) {
                    (Some(_), _) => Some(Line::ReadyAgain(self.attempts)),
                    (None, false) => Some(Line::Ready),
                    (None, true) => None,
                };
                self.ever_ready = true;
                self.attempts = 0;
                line
            }
            Health::Failing {
                failure, attempts, ..
            } => {
                self.attempts = *attempts;
                // One misconfiguration can arrive in two wordings (librdkafka reports a refused
                // login as a client error and again as a consume error, in either order): the
                // same fix is the same news, so it is not logged at error a second time.
                let same = self.failing.as_ref().is_some_and(|f| {
                    f.kind == failure.kind
                        && (f.error == failure.error
                            || (failure.kind == FailureKind::Misconfigured
                                && failure.fix.is_some()
                                && f.fix == failure.fix))
                });
                if !same {
                    self.failing = Some(failure.clone());
                    self.last_line = Some(now);
                    return Some(match failure.kind {
                        FailureKind::Misconfigured => Line::Misconfigured(failure.clone()),
                        FailureKind::Transient => Line::Unavailable(failure.clone()),
                    });
                }
                let due = self
                    .last_line
                    .is_none_or(|t| now.duration_since(t) >= REPEAT_EVERY);
                if failure.kind == FailureKind::Transient && due {
                    self.last_line = Some(now);
                    return Some(Line::StillUnavailable(failure.clone(), *attempts));
                }
                None
            }
        }
    }
}

/// Logs the health changes of `dep` for route `route` (see the module docs) until the
/// dependency goes away.
pub async fn log_changes(route: String, mut dep: Dependency) {
    let mut log = ChangeLog::default();
    loop {
        let health = dep.health.borrow_and_update().clone();
        if let Some(line) = log.on(&health, Instant::now()) {
            emit(&route, &dep.name, &health, line);
        } else {
            tracing::debug!(route = %route, part = %dep.name, health = ?health, "Health");
        }
        if dep.health.changed().await.is_err() {
            return;
        }
    }
}

fn emit(route: &str, part: &str, health: &Health, line: Line) {
    let retry_in_ms = match health {
        Health::Failing { retry_in, .. } => u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
        _ => 0,
    };
    match line {
        Line::Misconfigured(f) => tracing::error!(
            route,
            part,
            error = %f.error,
            fix = f.fix.as_deref().unwrap_or("see the error"),
            retry_in_ms,
            "Cannot consume until this is fixed; retrying every 10 s or so"
        ),
        Line::Unavailable(f) => tracing::warn!(
            route,
            part,
            error = %f.error,
            retry_in_ms,
            "Unavailable; retrying"
        ),
        Line::StillUnavailable(f, attempts) => tracing::warn!(
            route,
            part,
            error = %f.error,
            attempts,
            retry_in_ms,
            "Still unavailable; retrying"
        ),
        Line::Ready => tracing::info!(route, part, "Ready"),
        Line::ReadyAgain(attempts) => {
            tracing::info!(route, part, failed_attempts = attempts, "Ready again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(f: &Failure, attempts: u32) -> Health {
        Health::Failing {
            failure: f.clone(),
            attempts,
            retry_in: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_misconfiguration_is_logged_once_however_often_it_is_retried() {
        let mut log = ChangeLog::default();
        let f = Failure::misconfigured("login refused", "check the password");
        assert_eq!(
            log.on(&failing(&f, 1), Instant::now()),
            Some(Line::Misconfigured(f.clone()))
        );
        for n in 2..100 {
            tokio::time::advance(Duration::from_secs(10)).await;
            assert_eq!(log.on(&failing(&f, n), Instant::now()), None, "attempt {n}");
        }
        // The same problem in other words, with the same fix, is not.
        let reworded = Failure::misconfigured("consume: login refused", "check the password");
        assert_eq!(log.on(&failing(&reworded, 99), Instant::now()), None);
        // Another reason is news.
        let g = Failure::misconfigured("queue declared differently", "delete it");
        assert_eq!(
            log.on(&failing(&g, 100), Instant::now()),
            Some(Line::Misconfigured(g))
        );
        assert_eq!(
            log.on(&Health::Ready, Instant::now()),
            Some(Line::ReadyAgain(100))
        );
        assert_eq!(log.on(&Health::Ready, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_logged_when_it_starts_and_then_once_a_minute() {
        let mut log = ChangeLog::default();
        assert_eq!(log.on(&Health::Connecting, Instant::now()), None);
        let f = Failure::transient("connection refused");
        assert_eq!(
            log.on(&failing(&f, 1), Instant::now()),
            Some(Line::Unavailable(f.clone()))
        );
        let mut lines = 0;
        // Five minutes of attempts every 5 s.
        for n in 2..=61 {
            tokio::time::advance(Duration::from_secs(5)).await;
            match log.on(&failing(&f, n), Instant::now()) {
                Some(Line::StillUnavailable(_, attempts)) => {
                    assert_eq!(attempts, n);
                    lines += 1;
                }
                None => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(lines, 5);
        assert_eq!(
            log.on(&Health::Ready, Instant::now()),
            Some(Line::ReadyAgain(61))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_ready_is_logged_and_connecting_is_not() {
        let mut log = ChangeLog::default();
        assert_eq!(log.on(&Health::Connecting, Instant::now()), None);
        assert_eq!(log.on(&Health::Ready, Instant::now()), Some(Line::Ready));
        assert_eq!(log.on(&Health::Connecting, Instant::now()), None);
        assert_eq!(log.on(&Health::Ready, Instant::now()), None);
    }
}
