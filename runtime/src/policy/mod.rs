//! Delivery policies as plain data and pure decisions: retry with backoff, the circuit breaker
//! and the rate limit. They know no broker, store or route (the pipeline applies them), so they
//! are unit-tested on tokio's paused clock and sit on the ground floor with the message
//! vocabulary: `config` holds their settings as it reads them.

pub mod backoff;
pub mod breaker;
pub mod rate_limit;
