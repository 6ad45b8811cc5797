//! The only host-side `bindgen!` of the handler world.
//!
//! Everything the host knows about the WIT contract comes from here, so a new WIT version means a
//! second module beside this one rather than edits scattered across the engine.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    world: "handler",
    path: "../wit",
});

pub use self::lockgate::handler::{config, emit, kv, log, types};
