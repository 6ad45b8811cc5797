//! The per-route delivery pipeline: policies around every handler call.
//!
//! Policies are plain structs with pure decision logic, unit-tested with tokio's paused clock;
//! broker adapters stay thin around them.

pub mod ack;
pub mod backoff;
pub mod breaker;
pub mod dlq;
pub mod idempotency;
pub mod lanes;
pub mod rate_limit;
pub mod readiness;
pub mod route;
pub mod trace;

pub use route::{
    HandlerSlot, Invoker, Route, RouteReport, RouteSinks, RouteStats, Shutdown, ShutdownTrigger,
};
