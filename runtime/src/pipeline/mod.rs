//! The per-route delivery pipeline: the policies of [`crate::policy`] applied around every
//! handler call, idempotency claims, lanes, acknowledgement.

pub mod idempotency;
pub mod lanes;
pub mod readiness;
pub mod route;
pub mod trace;

pub use route::{
    HandlerSlot, Invoker, Route, RouteReport, RouteSinks, RouteStats, Shutdown, ShutdownTrigger,
};
