//! The only host-side `bindgen!` of the handler world.
//!
//! Everything the host knows about the WIT contract comes from here, so a new WIT version means a
//! second module beside this one rather than edits scattered across the engine.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    // `handler` plus `sql`: every import the host implements itself (wasi:http is linked from
    // wasmtime-wasi-http). A component built against any of the worlds instantiates with it.
    world: "handler-sql",
    path: "../wit",
    // Guests are called asynchronously (engine/mod.rs): kv and sql wait on stores, so they are
    // async host functions, and `handle` is an async export. A kv call or a statement can
    // outlast its call's deadline (a store that does not answer): that ends the call as a trap,
    // which only a trappable import can raise. The rest (publish, log, config) never waits.
    imports: {
        "lockgate:handler/kv": async | trappable,
        "lockgate:handler/sql": async | trappable,
    },
    exports: { default: async },
    trappable_error_type: { "lockgate:handler/kv.kv-error" => super::host::KvFailure },
    additional_derives: [PartialEq],
});

pub use self::lockgate::handler::{config, emit, kv, log, sql, types};

/// The host's name of the generated world: every handler world instantiates through it.
pub use self::HandlerSql as Handler;
/// See [`Handler`].
pub use self::HandlerSqlPre as HandlerPre;
