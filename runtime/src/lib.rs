//! lockgate runs WebAssembly message handlers against real brokers and wraps every call in the
//! delivery machinery teams otherwise rewrite per service: retries, circuit breakers, dead-letter
//! routing, idempotency and ordered, at-least-once acknowledgement.
//!
//! This crate is both the `lockgate` binary and its library. Modules:
//! - [`broker`]: the `Source`/`Sink` traits and the broker adapters;
//! - [`config`]: `runtime.toml` schema and validation;
//! - [`deadline`]: the deadline of a guest call, which bounds every host wait of that call;
//! - [`engine`]: the sandboxed wasmtime host, compiled-artefact cache and instance pool;
//! - [`state`]: persistent key-value state (guest `kv`);
//! - [`fixture`]: the JSON Lines format `lockgate test` reads and writes;
//! - [`health`]: whether a route's source and stores are connected, and why not;
//! - [`pipeline`]: delivery policies (retry with backoff, circuit breaker, rate limit, ack
//!   watermark).

#![deny(unsafe_code)]

pub mod broker;
pub mod config;
pub mod deadline;
pub mod dlq;
pub mod engine;
pub mod fixture;
pub mod health;
pub mod message;
pub mod pipeline;
pub mod policy;
pub mod state;
pub mod telemetry;
