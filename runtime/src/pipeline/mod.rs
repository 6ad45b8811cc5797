//! The per-route delivery pipeline: the policies of [`crate::policy`] applied around every
//! handler call, idempotency claims, lanes, acknowledgement.

pub mod idempotency;
pub mod invoker;
pub mod lanes;
pub mod readiness;
pub mod route;
pub mod shutdown;
pub mod stats;
pub mod trace;

pub use invoker::{HandlerSlot, Invoker, Passthrough};
pub use route::{Route, RouteReport, RouteSinks};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use stats::{RouteState, RouteStats};
