//! What a runtime tells its owner: typed events (a route started, stopped, a reload applied or
//! refused) and the one-line texts the command line prints for them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{IdempotencyKey, Ordering, RouteConfig};
use crate::pipeline::RouteReport;
use crate::policy::backoff::Jitter;

use super::error::ReloadError;

/// Something that happened in a [`super::Runtime`], in order.
#[derive(Debug)]
pub enum Event {
    /// The admin endpoint listens (`/metrics`, `/healthz`, `/readyz`, `/status`, `/reload`).
    AdminListening {
        /// The address it is bound to (a port 0 in the config is resolved here).
        addr: SocketAddr,
    },
    /// Every route of the config started (they may still be connecting: readiness says when
    /// each consumes).
    Started {
        /// How many.
        routes: usize,
        /// How long a stopping route may finish its in-flight messages.
        grace: std::time::Duration,
    },
    /// A route started (at start, or added or restarted by a reload).
    RouteStarted {
        /// The route.
        route: String,
        /// Its one-line summary: source, handler version, outputs, lanes and policies.
        summary: String,
    },
    /// A route stopped: drained and committed, or ended by itself.
    RouteStopped {
        /// Its counters and, if its source failed, why.
        report: Arc<RouteReport>,
        /// What stopped it.
        cause: StopCause,
    },
    /// A reload changed something.
    Reloaded {
        /// What changed, one item per route or setting.
        changes: Vec<RouteChange>,
    },
    /// A reload was refused; what ran before keeps running.
    ReloadRefused {
        /// Why.
        error: Arc<ReloadError>,
    },
}

/// Why a route stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// A reload removed or restarted it.
    Reload,
    /// The runtime was stopped.
    Shutdown,
    /// Its source failed for good (the runtime stops with it).
    SourceFailed,
}

/// Why a reload restarts a route instead of swapping its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// Its own table changed.
    Settings,
    /// A broker (or the store of a dead-letter table) it uses changed.
    Broker,
    /// Its state store's table changed.
    StateStore,
}

/// One thing a reload changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// A new route started with this module version (empty: a relay without a handler).
    Added {
        /// The route.
        route: String,
        /// Its module's content hash.
        module_hash: String,
    },
    /// A route was drained and stopped.
    Removed {
        /// The route.
        route: String,
    },
    /// A route was drained and started again with its new settings.
    Restarted {
        /// The route.
        route: String,
        /// Why it could not just swap its handler.
        why: RestartReason,
    },
    /// A route's handler version was swapped without stopping it.
    Swapped {
        /// The route.
        route: String,
        /// The handler.
        handler: String,
        /// The module hash that served before.
        from: String,
        /// The module hash that serves now.
        to: String,
    },
    /// The embedded broker's `[local]` settings apply from now on.
    LocalSettings,
    /// `[runtime]` or `[engine]` changed: they apply only at the next start.
    NeedsRestart,
}

impl fmt::Display for RouteChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Added { route, module_hash } => {
                write!(f, "route {route}: added ({})", short(module_hash))
            }
            Self::Removed { route } => write!(f, "route {route}: removed (drained and stopped)"),
            Self::Restarted { route, why } => {
                let why = match why {
                    RestartReason::Settings => "its settings changed",
                    RestartReason::Broker => "its broker changed",
                    RestartReason::StateStore => "its state store changed",
                };
                write!(f, "route {route}: restart: {why}")
            }
            Self::Swapped {
                route,
                handler,
                from,
                to,
            } => write!(
                f,
                "route {route}: handler {handler} {} -> {}",
                short(from),
                short(to)
            ),
            Self::LocalSettings => f.write_str("[local] settings of the embedded broker applied"),
            Self::NeedsRestart => {
                f.write_str("[runtime] and [engine] changes are not applied until a restart")
            }
        }
    }
}

/// A report's non-zero counters, `name=value` separated by spaces, or `no messages` when the
/// route took none.
pub fn counts(report: &RouteReport) -> String {
    let counts: Vec<String> = report
        .stats
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if counts.is_empty() {
        "no messages".to_owned()
    } else {
        counts.join(" ")
    }
}

/// The one line a route logs at start: where from, what runs, where to, and its policies.
pub fn summary(route: &RouteConfig, module_hash: &str, source: &str) -> String {
    let r = &route.retry;
    let jitter = match r.jitter {
        Jitter::None => "no jitter".to_owned(),
        Jitter::Full => "full jitter".to_owned(),
        Jitter::Proportional(f) => format!("±{:.0}% jitter", f * 100.0),
    };
    let mut parts = vec![
        match &route.handler {
            Some(h) => format!("{source} -> handler {h} ({})", short(module_hash)),
            None => format!("{source} -> published as written"),
        },
        match (route.outputs_mode, route.outputs.is_empty()) {
            (crate::config::OutputsMode::Outbox, _) => {
                format!("outputs {} into the outbox", route.outputs.join(","))
            }
            (_, true) if route.relays_outbox() => {
                format!("outputs to their rows' topics on {}", route.outputs_broker)
            }
            (_, true) => "outputs none".to_owned(),
            (_, false) => format!("outputs {}", route.outputs.join(",")),
        },
        format!(
            "{} lane{} by {}",
            route.concurrency,
            if route.concurrency == 1 { "" } else { "s" },
            match route.ordering {
                Ordering::Partition => "partition",
                Ordering::Key => "key",
            }
        ),
        format!(
            "retry {} attempts {}..{} ms x{} {jitter}",
            r.max_attempts,
            r.initial_backoff.as_millis(),
            r.max_backoff.as_millis(),
            r.multiplier
        ),
    ];
    if let Some(b) = &route.circuit_breaker {
        let mut trip = Vec::new();
        if let Some(n) = b.consecutive_failures {
            trip.push(format!("{n} failures in a row"));
        }
        if let Some(f) = b.failure_ratio {
            trip.push(format!(
                "{:.0}% of >= {} calls in {} ms",
                f * 100.0,
                b.min_calls,
                b.window.as_millis()
            ));
        }
        parts.push(format!(
            "breaker on {} (open {} ms, {} probe{})",
            trip.join(" or "),
            b.open_duration.as_millis(),
            b.half_open_max,
            if b.half_open_max == 1 { "" } else { "s" }
        ));
    }
    parts.push(format!("dlq {}", route.dlq));
    if let Some(i) = &route.idempotency {
        let key = match &i.key {
            IdempotencyKey::Header(h) => format!("header:{h}"),
            IdempotencyKey::MessageKey => "key".to_owned(),
            IdempotencyKey::JsonPointer(p) => format!("json:{p}"),
            IdempotencyKey::Position => "position".to_owned(),
        };
        parts.push(format!("idempotency {key} for {} s", i.ttl.as_secs()));
    }
    if let Some(l) = &route.rate_limit {
        parts.push(format!("rate {}/s burst {}", l.per_second, l.burst));
    }
    format!("route {}: {}", route.name, parts.join("; "))
}

/// The first 12 hex digits of a module hash, as logs and summaries show it.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
