//! lockgate runs WebAssembly message handlers against real brokers and wraps every call in the
//! delivery machinery teams otherwise rewrite per service: retries, circuit breakers, dead-letter
//! routing, idempotency and ordered, at-least-once acknowledgement.
//!
//! This crate is both the `lockgate` binary and its library. The modules form layers, each
//! importing only those below it (docs/architecture.md#layers), from the bottom:
//! - [`message`], [`policy`], [`health`], [`deadline`], [`metrics`]: records and header names,
//!   the pure policies (backoff, breaker, rate limit), connection health, the deadline of a guest
//!   call, the metric model `/metrics` and the OTLP export both render;
//! - [`config`]: `runtime.toml` as plain data, with validation that reports every problem;
//!   [`dlq`]: the dead-letter envelope;
//! - [`state`]: guest `kv` and idempotency claims on the embedded, Redis and PostgreSQL stores;
//! - [`broker`]: the `Source`/`Sink` traits and the broker adapters; [`engine`]: the sandboxed
//!   wasmtime host, compiled-artefact cache and instance pool;
//! - [`pipeline`]: a route: lanes, idempotency, retries, breaker, dead letters, acks;
//!   [`fixture`]: the JSON Lines format of `lockgate test`;
//! - [`telemetry`]: metrics and the admin endpoint;
//! - [`app`]: the runtime as a library: build from a config, start, reload, observe, stop.

#![deny(unsafe_code)]

pub mod app;
pub mod broker;
pub mod config;
pub mod deadline;
pub mod dlq;
pub mod engine;
pub mod fixture;
pub mod health;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod project;
pub mod state;
pub mod telemetry;
