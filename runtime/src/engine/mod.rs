//! The WebAssembly engine: one wasmtime [`Engine`](wasmtime::Engine) per process, compilation with
//! an on-disk cache, the sandboxed host, instance pooling, and typed invocation outcomes.
//!
//! Guests are called asynchronously: a call is a future ([`Instance::invoke_async`],
//! [`InstancePool::invoke_async`]) that the pipeline awaits on the route's own task, so a guest's
//! host waits (an HTTP response, a statement, a sleep) and what they wait for (the connection's
//! task) run on the same runtime threads, without a hand-off to another thread and back per wait
//! (BENCHMARKS.md, "Outbound HTTP from a handler"). A guest that computes yields to the runtime
//! at every [`EPOCH_TICK`], so it holds a runtime thread for at most one tick at a time. The
//! synchronous forms ([`Instance::invoke`], [`InstancePool::invoke`],
//! [`Handler::instantiate`]) block on a runtime of the engine's own (`blocking.rs`), for callers
//! outside any runtime: the CLI's `test` and `check`, tests and benches.
//!
//! Every call (and every instantiation) has a [`Deadline`], kept in
//! the store's call state, and it ends the call wherever the guest is:
//! - running wasm: epoch interruption (the ticker below) makes it check the deadline every
//!   [`EPOCH_TICK`], and trap once it has passed;
//! - waiting in the host: the call's future is bounded by the deadline as a whole
//!   ([`Deadline::bound`]); when it passes, the future is dropped, which unwinds the guest's
//!   stack, and what the wait was for is dropped with it (a kv call on a blocking thread runs
//!   under [`Deadline::scope`], which the network stores bound their own waits by).
//!
//! Either way the call's outcome is [`Outcome::TimedOut`] and the instance is discarded.
//!
//! This file holds the [`Engine`]: wasmtime's configuration, the linker, the epoch ticker and
//! loading a component (read, check, compile or load from `cache.rs`, check the world). The
//! rest, one concern a file: `settings.rs` (what the config asks for), `handler.rs` (a loaded
//! version and how an instance of it is made), `instance.rs` (one call), `pool.rs` (instance
//! reuse), `invocation.rs` (the data of a call in host types), `host.rs` (the WIT imports),
//! `blocking.rs` (the synchronous forms), `stdio.rs` (captured output).

mod bindings;
mod blocking;
mod cache;
mod handler;
mod host;
mod instance;
mod invocation;
pub mod outbound;
mod pool;
mod settings;
mod sql;
mod stdio;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};

pub use cache::{CacheLimits, CachePin, CompileCache};
pub use handler::Handler;
pub use host::{HandlerEnv, HandlerLimits, MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES, test_env};
pub use instance::Instance;
pub use invocation::{
    InboundMessage, Invocation, LogLevel, LogRecord, LogSource, Outcome, OutgoingMessage, Staging,
};
pub use pool::{InstancePool, PoolCounters};
pub use settings::{DEFAULT_KEEP_RESIDENT_BYTES, EngineSettings};
pub use sql::SqlGrant;

use handler::HandlerInner;
use host::HostState;

/// Interval of the epoch ticker. At every tick a guest running wasm compares the clock with its
/// call's deadline, so a timeout fires at most one tick (plus the ticker thread's scheduling
/// delay) late. Counting ticks instead would add up every late wake-up of the ticker over the
/// whole timeout: on a loaded machine a 200 ms deadline fired after 300 ms and more.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Bytes of stdout (and, separately, stderr) kept per invocation; the rest is counted and dropped.
pub const MAX_STDIO_BYTES: usize = 64 * 1024;
/// Deadline for instantiation (start functions, language runtimes booting), at least this long
/// whatever the handler's `timeout_ms`: a Python or JS runtime takes milliseconds to start, and a
/// call deadline tuned for a 1 ms handler must not refuse it.
pub const MIN_INSTANTIATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Wasm stack available to a guest.
pub const MAX_WASM_STACK: usize = 1024 * 1024;
/// Stack of a call (a guest runs on a stack of its own, not its thread's): the guest's
/// [`MAX_WASM_STACK`] plus what the host functions it calls need below it.
pub const CALL_STACK: usize = MAX_WASM_STACK + 1024 * 1024;

/// Errors from loading or instantiating a handler.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The wasmtime engine could not be created with the requested settings.
    #[error("cannot create the WebAssembly engine: {0:#}")]
    Setup(wasmtime::Error),
    /// The module file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not WebAssembly at all.
    #[error("{path} is not a WebAssembly file (it does not start with the `\\0asm` magic bytes)")]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// The file is a core module, not a component.
    #[error(
        "{path} is a core WebAssembly module, not a component; build it for wasm32-wasip2 or wrap it with `wasm-tools component new`"
    )]
    NotAComponent {
        /// The file.
        path: PathBuf,
    },
    /// The component failed to validate or compile.
    #[error("{path} failed to compile: {message}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// wasmtime's explanation.
        message: String,
    },
    /// The component does not implement the `lockgate:handler` world.
    #[error("{path} does not implement the lockgate:handler world: {problems}", problems = problems.join("; "))]
    WorldMismatch {
        /// The file.
        path: PathBuf,
        /// Every problem found, each naming the export or import at fault.
        problems: Vec<String>,
    },
    /// Instantiation failed (a trap in a start function, a resource limit).
    #[error("{path} failed to instantiate: {message}")]
    Instantiate {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The process's WebAssembly engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    cache: Option<CompileCache>,
}

impl Engine {
    /// The wasmtime engine underneath, for the stores of instances.
    fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.engine
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cache", &self.inner.cache)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Creates the engine, its linker (WASI with no ambient authority plus the lockgate imports)
    /// and the epoch ticker thread, which stops when the last clone of the engine is dropped.
    pub fn new(settings: &EngineSettings) -> Result<Self, EngineError> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        config.async_stack_size(CALL_STACK);
        if settings.pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::new();
            let n = settings.max_instances;
            pool.total_component_instances(n);
            // A call's stack comes from the pool too: one per instance that can run.
            pool.total_stacks(n);
            // Components built from Python or JS hold a dozen core instances, memories and tables.
            pool.total_core_instances(n.saturating_mul(16));
            pool.total_memories(n.saturating_mul(4));
            pool.total_tables(n.saturating_mul(8));
            pool.max_memories_per_module(2);
            pool.max_tables_per_module(4);
            pool.table_elements(100_000);
            pool.max_core_instance_size(8 << 20);
            pool.max_component_instance_size(8 << 20);
            pool.max_memory_size(usize::try_from(settings.max_memory_bytes).unwrap_or(usize::MAX));
            if settings.keep_resident_bytes > 0 {
                // Only pages an instance dirtied are reset (where the kernel has PAGEMAP_SCAN;
                // elsewhere the whole region is memset, so the default stays a few MiB).
                pool.linear_memory_keep_resident(settings.keep_resident_bytes);
                pool.table_keep_resident(settings.keep_resident_bytes.min(64 << 10));
                pool.pagemap_scan(wasmtime::Enabled::Auto);
            }
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = wasmtime::Engine::new(&config).map_err(EngineError::Setup)?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(EngineError::Setup)?;
        // Only wasi:http's own interfaces (wasi:io and clocks are linked above): every handler
        // may import it; its grant decides what a request reaches (`outbound`).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(EngineError::Setup)?;
        bindings::Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(EngineError::Setup)?;

        let cache = settings
            .cache_dir
            .clone()
            .map(|dir| CompileCache::new(dir, &engine));
        let inner = Arc::new(EngineInner {
            engine,
            linker,
            cache,
        });
        // Without the ticker no deadline would ever fire: refuse to run guests rather than risk
        // hanging on one.
        spawn_epoch_ticker(Arc::downgrade(&inner)).map_err(|e| {
            EngineError::Setup(wasmtime::Error::msg(format!(
                "cannot start the epoch ticker thread: {e}"
            )))
        })?;
        Ok(Self { inner })
    }

    /// Reads, compiles (or loads from the cache) and links a handler component, checking that it
    /// implements the handler world. Does not instantiate it; see [`Handler::check_instantiate`].
    pub fn load_handler(&self, path: &Path, env: HandlerEnv) -> Result<Handler, EngineError> {
        let bytes = std::fs::read(path).map_err(|source| EngineError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.load_handler_bytes(path, &bytes, env)
    }

    /// Like [`Self::load_handler`] with the component bytes already in memory; `path` only names
    /// it in errors.
    pub fn load_handler_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        env: HandlerEnv,
    ) -> Result<Handler, EngineError> {
        check_magic(path, bytes)?;
        let hash = hex::encode(Sha256::digest(bytes));
        self.load_handler_hashed(path, bytes, hash, env)
    }

    /// Like [`Self::load_handler_bytes`] when the caller already has the bytes' SHA-256 (hex):
    /// a hot reload hashes a module once to see whether it changed, and a large component
    /// (18 MB for Python) costs tens of milliseconds per hash.
    pub fn load_handler_hashed(
        &self,
        path: &Path,
        bytes: &[u8],
        hash: String,
        env: HandlerEnv,
    ) -> Result<Handler, EngineError> {
        check_magic(path, bytes)?;
        let engine = &self.inner.engine;
        // Pinned before it is stored, so the eviction that follows the store keeps it.
        let cache_pin = self.inner.cache.as_ref().map(|c| c.pin(&hash));
        let cached = self
            .inner
            .cache
            .as_ref()
            .and_then(|c| c.load(engine, &hash));
        let from_cache = cached.is_some();
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(engine, bytes).map_err(|e| EngineError::Compile {
                    path: path.to_owned(),
                    message: format!("{e:#}"),
                })?;
                if let Some(cache) = &self.inner.cache {
                    cache.store(&hash, &c);
                }
                c
            }
        };
        let problems = world_problems(engine, &component);
        if !problems.is_empty() {
            return Err(EngineError::WorldMismatch {
                path: path.to_owned(),
                problems,
            });
        }
        let imports = |prefix: &str| {
            component
                .component_type()
                .imports(engine)
                .any(|(name, _)| name.starts_with(prefix))
        };
        let imports_http = imports("wasi:http/outgoing-handler@");
        let imports_sql = imports("lockgate:handler/sql@");
        let instance_pre = self.inner.linker.instantiate_pre(&component).map_err(|e| {
            EngineError::WorldMismatch {
                path: path.to_owned(),
                problems: vec![format!("{e:#}")],
            }
        })?;
        let pre =
            bindings::HandlerPre::new(instance_pre).map_err(|e| EngineError::WorldMismatch {
                path: path.to_owned(),
                problems: vec![format!("{e:#}")],
            })?;
        Ok(Handler {
            inner: Arc::new(HandlerInner {
                engine: self.clone(),
                pre,
                env: Arc::new(env),
                path: path.to_owned(),
                module_hash: hash,
                from_cache,
                imports_http,
                imports_sql,
                _cache_pin: cache_pin,
            }),
        })
    }

    /// The compiled-artefact cache, if enabled.
    pub fn cache(&self) -> Option<&CompileCache> {
        self.inner.cache.as_ref()
    }
}

fn spawn_epoch_ticker(engine: Weak<EngineInner>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("lockgate-epoch".into())
        .spawn(move || {
            while let Some(inner) = engine.upgrade() {
                inner.engine.increment_epoch();
                drop(inner);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .map(drop)
}

fn check_magic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(EngineError::NotWasm {
            path: path.to_owned(),
        });
    }
    // Core modules have version 1 (layer 0); components have a different version and layer 1.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(EngineError::NotAComponent {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Names every way `component` differs from the handler world that we can see from its type:
/// a missing or non-function `handle` export, and imports lockgate does not provide.
fn world_problems(engine: &wasmtime::Engine, component: &Component) -> Vec<String> {
    use wasmtime::component::types::ComponentItem;
    let ty = component.component_type();
    let mut problems = Vec::new();
    match ty.get_export(engine, "handle") {
        None => {
            let exports: Vec<_> = ty
                .exports(engine)
                .map(|(name, _)| name.to_owned())
                .collect();
            problems.push(if exports.is_empty() {
                "missing export `handle` (the component exports nothing)".to_owned()
            } else {
                format!(
                    "missing export `handle` (it exports: {})",
                    exports.join(", ")
                )
            });
        }
        Some(e) if matches!(e.ty, ComponentItem::ComponentFunc(_)) => {}
        Some(_) => problems.push("export `handle` is not a function".to_owned()),
    }
    for (name, _) in ty.imports(engine) {
        let provided = name.starts_with("wasi:") || name.starts_with("lockgate:handler/");
        if !provided {
            problems.push(format!("imports `{name}`, which lockgate does not provide"));
        }
    }
    problems
}
