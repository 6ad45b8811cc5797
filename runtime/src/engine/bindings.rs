//! The only host-side `bindgen!` of the handler world.
//!
//! Everything the host knows about the WIT contract comes from here, so a new WIT version means a
//! second module beside this one rather than edits scattered across the engine.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    world: "handler",
    path: "../wit",
    // A kv call can outlast its call's deadline (a store that does not answer): that ends the
    // call as a trap, which only a trappable import can raise.
    imports: { "lockgate:handler/kv": trappable },
    trappable_error_type: { "lockgate:handler/kv.kv-error" => super::host::KvFailure },
});

pub use self::lockgate::handler::{config, emit, kv, log, types};
