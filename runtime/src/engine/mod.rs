//! The WebAssembly engine: one wasmtime [`Engine`](wasmtime::Engine) per process, compilation with
//! an on-disk cache, the sandboxed host, instance pooling, and typed invocation outcomes.
//!
//! Guest calls are synchronous and must run on a thread that is not a tokio worker (a plain
//! thread or `spawn_blocking`): wasmtime-wasi's synchronous bindings block on futures internally.
//!
//! Every call (and every instantiation) has a [`Deadline`], kept in
//! the store's call state, and it ends the call wherever the guest is:
//! - running wasm: epoch interruption (the ticker below) makes it check the deadline every
//!   [`EPOCH_TICK`], and trap once it has passed;
//! - waiting in the host: every blocking WASI function (`wasi:io/poll` and the blocking
//!   `wasi:io/streams` functions, through which every sleep, stdin read, socket wait and, later,
//!   outbound HTTP wait goes) is replaced by one bounded by the deadline (`wasi_io`), and kv calls
//!   run under [`Deadline::scope`], which the network stores
//!   bound their waits by.
//!
//! Either way the call's outcome is [`Outcome::TimedOut`] and the instance is discarded.

mod bindings;
mod cache;
mod host;
mod settings;
mod stdio;
mod wasi_io;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;

use crate::config::Isolation;
use crate::deadline::{Deadline, DeadlineExceeded};

pub use cache::{CacheLimits, CachePin, CompileCache};
pub use host::{HandlerEnv, HandlerLimits, MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES};

use bindings::types;
use host::{CallState, HostState, MemoryLimiter};
use stdio::CaptureBuffer;

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
/// Wasm stack available to a guest (the rest of the 8 MiB thread stack is the host's).
pub const MAX_WASM_STACK: usize = 1024 * 1024;

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

/// Engine-wide settings, from the `[engine]` table of runtime.toml.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Use the pooling instance allocator (fast instantiation; reserves virtual memory up front).
    pub pooling: bool,
    /// Most instances alive at once across all handlers (pool size).
    pub max_instances: u32,
    /// Largest linear memory any handler may configure, in bytes (pool slot size).
    pub max_memory_bytes: u64,
    /// Directory for compiled artefacts; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// With pooling: bytes at the bottom of each linear memory whose dirty pages are reset in
    /// place (found with Linux's `PAGEMAP_SCAN`, kernel 6.7+) when a slot is reused, instead of
    /// being discarded and faulted in again by the next instance. 0 turns it off.
    pub keep_resident_bytes: usize,
}

/// Default of [`EngineSettings::keep_resident_bytes`]: covers a Rust guest's 1 MiB stack (at
/// the bottom of its memory), its data and the start of its heap. Chosen from the `suite`
/// bench (BENCHMARKS.md): a fresh instance of the Rust guest costs less than half as much.
pub const DEFAULT_KEEP_RESIDENT_BYTES: usize = 2 << 20;

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            pooling: true,
            max_instances: crate::config::DEFAULT_MAX_INSTANCES,
            max_memory_bytes: crate::config::MAX_MEMORY_MB_LIMIT * 1024 * 1024,
            cache_dir: None,
            keep_resident_bytes: DEFAULT_KEEP_RESIDENT_BYTES,
        }
    }
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
        if settings.pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::new();
            let n = settings.max_instances;
            pool.total_component_instances(n);
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
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(EngineError::Setup)?;
        // Last of the WASI interfaces: replaces the blocking waits with ones bounded by the
        // call's deadline.
        wasi_io::shadow(&mut linker).map_err(EngineError::Setup)?;
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

/// One loaded handler version: compiled code, its pre-linked instance template and environment.
/// Cheap to clone; instances made from it share the compiled code.
#[derive(Clone)]
pub struct Handler {
    inner: Arc<HandlerInner>,
}

struct HandlerInner {
    engine: Engine,
    pre: bindings::HandlerPre<HostState>,
    env: Arc<HandlerEnv>,
    path: PathBuf,
    module_hash: String,
    from_cache: bool,
    /// Keeps the compiled artefact on disk while this version is loaded.
    _cache_pin: Option<CachePin>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("name", &self.inner.env.name)
            .field("path", &self.inner.path)
            .field("module_hash", &self.inner.module_hash)
            .finish_non_exhaustive()
    }
}

impl Handler {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.inner.env.name
    }

    /// SHA-256 of the component bytes, hex: identifies the version that handled a message.
    pub fn module_hash(&self) -> &str {
        &self.inner.module_hash
    }

    /// Whether the compiled code came from the on-disk cache.
    pub fn loaded_from_cache(&self) -> bool {
        self.inner.from_cache
    }

    /// The handler's environment (config, limits, grants).
    pub fn env(&self) -> &HandlerEnv {
        &self.inner.env
    }

    /// Creates a fresh instance.
    pub fn instantiate(&self) -> Result<Instance, EngineError> {
        let env = self.inner.env.clone();
        let stdout = CaptureBuffer::new(MAX_STDIO_BYTES);
        let stderr = CaptureBuffer::new(MAX_STDIO_BYTES);
        // No preopened directories, no env, no args, no network: WasiCtxBuilder's defaults plus
        // explicit socket denial. Clocks and randomness stay available.
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            memory: MemoryLimiter {
                cap: env.limits.max_memory_bytes,
                ..MemoryLimiter::default()
            },
            env,
            call: CallState::default(),
            stdout,
            stderr,
        };
        let mut store = Store::new(&self.inner.engine.inner.engine, state);
        store.limiter(|s| &mut s.memory);
        // Every tick, a guest running wasm checks the clock against its call's deadline.
        store.epoch_deadline_callback(|store| {
            if store.data().call.deadline().has_passed() {
                Err(DeadlineExceeded.into())
            } else {
                Ok(wasmtime::UpdateDeadline::Continue(1))
            }
        });
        let deadline = self.inner.env.limits.timeout.max(MIN_INSTANTIATE_TIMEOUT);
        store.data_mut().call.deadline = Some(Deadline::after(deadline));
        store.set_epoch_deadline(1);
        let bindings = self.inner.pre.instantiate(&mut store).map_err(|e| {
            let message = if store.data().memory.hit {
                format!(
                    "memory limit of {} MiB reached while instantiating",
                    self.inner.env.limits.max_memory_bytes / (1024 * 1024)
                )
            } else if past_deadline(&e) {
                format!("instantiation exceeded its deadline of {deadline:?}")
            } else {
                format!("{e:#}")
            };
            EngineError::Instantiate {
                path: self.inner.path.clone(),
                message,
            }
        })?;
        Ok(Instance {
            handler: self.clone(),
            store,
            bindings,
            calls: 0,
            poisoned: false,
        })
    }

    /// Instantiates once and drops the instance: proves the component links and its start
    /// functions succeed (used by `lockgate check` and before a hot swap).
    pub fn check_instantiate(&self) -> Result<(), EngineError> {
        self.instantiate().map(drop)
    }
}

/// One live instance of a handler. Reusable across messages until it traps.
pub struct Instance {
    handler: Handler,
    store: Store<HostState>,
    bindings: bindings::Handler,
    calls: u64,
    poisoned: bool,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("handler", &self.handler.name())
            .field("calls", &self.calls)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// Calls `handle` with `message` under the handler's deadline and memory cap.
    ///
    /// Never panics on guest behaviour: every failure is an [`Outcome`]. After a trap, timeout or
    /// memory exhaustion the instance is poisoned and must not be reused.
    pub fn invoke(&mut self, message: &InboundMessage) -> Invocation {
        self.invoke_with(message, false)
    }

    /// Like [`Self::invoke`]; with `stage_kv` the call's kv writes are held back and returned in
    /// [`Invocation::kv_writes`] (for an ok outcome) instead of applied.
    pub fn invoke_with(&mut self, message: &InboundMessage, stage_kv: bool) -> Invocation {
        self.invoke_owned(message.clone(), stage_kv)
    }

    /// Like [`Self::invoke_with`] on a message the caller gives up (its bytes move into the
    /// call instead of being copied first).
    pub fn invoke_owned(&mut self, message: InboundMessage, stage_kv: bool) -> Invocation {
        let start = Instant::now();
        if self.poisoned {
            return Invocation {
                outcome: Outcome::Trapped {
                    reason: "instance was poisoned by an earlier trap".into(),
                },
                logs: Vec::new(),
                dropped_logs: 0,
                refused_outputs: 0,
                elapsed: Duration::ZERO,
                kv_writes: None,
            };
        }
        self.calls += 1;
        let limits = self.handler.inner.env.limits.clone();
        {
            let data = self.store.data_mut();
            data.call = CallState {
                deadline: Some(Deadline::after_from(start, limits.timeout)),
                reply_to: message.reply_to.clone(),
                kv_txn: stage_kv.then(host::KvTxn::default),
                ..CallState::default()
            };
            data.memory.hit = false;
        }
        // The next tick checks the deadline (see `Handler::instantiate`).
        self.store.set_epoch_deadline(1);
        let wit_message = message.into_wit();
        let result = self.bindings.call_handle(&mut self.store, &wit_message);
        let elapsed = start.elapsed();

        let data = self.store.data_mut();
        let mut call = std::mem::take(&mut data.call);
        for (buffer, source, level) in [
            (&data.stdout, LogSource::Stdout, LogLevel::Info),
            (&data.stderr, LogSource::Stderr, LogLevel::Warn),
        ] {
            let (bytes, dropped) = buffer.take();
            for line in String::from_utf8_lossy(&bytes).lines() {
                call.push_log(limits.max_log_records, level, source, line);
            }
            if dropped > 0 {
                call.push_log(
                    limits.max_log_records,
                    LogLevel::Warn,
                    source,
                    &format!("[{dropped} bytes of output dropped: over {MAX_STDIO_BYTES} bytes]"),
                );
            }
        }

        let outcome = match result {
            Ok(Ok(())) => match call.refused_output.take() {
                Some(reason) => Outcome::Rejected { reason },
                None => Outcome::Ok {
                    outputs: std::mem::take(&mut call.outputs),
                },
            },
            Ok(Err(types::HandlerError::Retry(r))) => Outcome::Retry {
                reason: r.reason,
                after: r.after_ms.map(Duration::from_millis),
            },
            Ok(Err(types::HandlerError::Reject(reason))) => Outcome::Rejected { reason },
            Err(e) => {
                self.poisoned = true;
                let trap = e.downcast_ref::<Trap>().copied();
                if data.memory.hit {
                    Outcome::OutOfMemory {
                        limit_bytes: limits.max_memory_bytes,
                    }
                } else if past_deadline(&e) {
                    Outcome::TimedOut {
                        timeout: limits.timeout,
                    }
                } else if trap == Some(Trap::StackOverflow) {
                    Outcome::Trapped {
                        reason: "stack overflow (call stack exhausted)".into(),
                    }
                } else {
                    Outcome::Trapped {
                        reason: trap_reason(&e),
                    }
                }
            }
        };
        let kv_writes = match (&outcome, call.kv_txn.take()) {
            (Outcome::Ok { .. }, Some(txn)) => Some(txn.into_writes(&self.handler.inner.env.name)),
            (_, Some(_)) => Some(Vec::new()),
            (_, None) => None,
        };
        Invocation {
            outcome,
            logs: call.logs,
            dropped_logs: call.dropped_logs,
            refused_outputs: call.refused_outputs,
            elapsed,
            kv_writes,
        }
    }

    /// Whether the instance trapped and must be discarded.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Number of calls made on this instance.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// The handler this instance belongs to.
    pub fn handler(&self) -> &Handler {
        &self.handler
    }
}

/// Whether `e` ended a call at its deadline: an epoch interrupt while the guest ran wasm, or a
/// host wait cut short while it waited (see [`crate::deadline`]).
fn past_deadline(e: &wasmtime::Error) -> bool {
    matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) || e.is::<DeadlineExceeded>()
}

/// One line for an outcome: the trap's own text, plus the innermost guest function that has a
/// name. The full backtrace belongs in debug logs, not in outcomes and DLQ records.
fn trap_reason(e: &wasmtime::Error) -> String {
    let Some(trap) = e.downcast_ref::<Trap>() else {
        return format!("{e:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
    };
    let frame = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().find_map(|f| f.func_name()))
        .map(|name| format!(" in `{name}`"))
        .unwrap_or_default();
    format!("{trap}{frame}")
}

/// Hands out instances of one handler according to its [`Isolation`], keeping idle ones warm.
pub struct InstancePool {
    handler: Handler,
    isolation: Isolation,
    max_messages_per_instance: u64,
    idle: Mutex<Vec<Instance>>,
    counters: Arc<PoolCounters>,
}

/// Live numbers of an [`InstancePool`], for the admin endpoint.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Instances alive now: idle in the pool or running a message.
    pub live: std::sync::atomic::AtomicU64,
    /// Instances created since start.
    pub created: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for InstancePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePool")
            .field("handler", &self.handler.name())
            .field("isolation", &self.isolation)
            .finish_non_exhaustive()
    }
}

impl InstancePool {
    /// A pool for `handler`.
    pub fn new(handler: Handler, isolation: Isolation, max_messages_per_instance: u64) -> Self {
        Self {
            handler,
            isolation,
            max_messages_per_instance: max_messages_per_instance.max(1),
            idle: Mutex::new(Vec::new()),
            counters: Arc::default(),
        }
    }

    /// The pool's live counters (shared: they stay current).
    pub fn counters(&self) -> Arc<PoolCounters> {
        self.counters.clone()
    }

    /// The pool's handler.
    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    /// Runs one message on an instance from the pool. An instantiation failure becomes a
    /// `Trapped` outcome: from the message's point of view the handler failed, retryably.
    pub fn invoke(&self, message: &InboundMessage) -> Invocation {
        self.invoke_with(message, false)
    }

    /// Like [`Self::invoke`], staging kv writes when `stage_kv` (see [`Instance::invoke_with`]).
    pub fn invoke_with(&self, message: &InboundMessage, stage_kv: bool) -> Invocation {
        self.invoke_owned(message.clone(), stage_kv)
    }

    /// Like [`Self::invoke_with`] on a message the caller gives up (no copy before the call).
    pub fn invoke_owned(&self, message: InboundMessage, stage_kv: bool) -> Invocation {
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut instance = match reused {
            Some(i) => i,
            None => match self.handler.instantiate() {
                Ok(i) => {
                    self.counters.created.fetch_add(1, AtomicOrdering::Relaxed);
                    self.counters.live.fetch_add(1, AtomicOrdering::Relaxed);
                    i
                }
                Err(e) => {
                    return Invocation {
                        outcome: Outcome::Trapped {
                            reason: e.to_string(),
                        },
                        logs: Vec::new(),
                        dropped_logs: 0,
                        refused_outputs: 0,
                        elapsed: Duration::ZERO,
                        kv_writes: None,
                    };
                }
            },
        };
        let invocation = instance.invoke_owned(message, stage_kv);
        let keep = self.isolation == Isolation::Reuse
            && !instance.is_poisoned()
            && instance.calls() < self.max_messages_per_instance;
        if keep {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(instance);
        } else {
            self.counters.live.fetch_sub(1, AtomicOrdering::Relaxed);
        }
        invocation
    }

    /// Number of idle instances kept warm.
    pub fn idle_instances(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A message as the host hands it to a handler (the WIT `message`, in host types).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundMessage {
    /// Route-unique, redelivery-stable id.
    pub id: String,
    /// Topic, subject or queue.
    pub topic: String,
    /// Partition, when the broker has them.
    pub partition: Option<u32>,
    /// Offset or stream sequence.
    pub offset: Option<u64>,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub payload: Vec<u8>,
    /// Broker timestamp, ms since the Unix epoch.
    pub timestamp_ms: Option<u64>,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Reply destination.
    pub reply_to: Option<String>,
}

impl InboundMessage {
    fn into_wit(self) -> types::Message {
        types::Message {
            id: self.id,
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| types::Header { name, value })
                .collect(),
            payload: self.payload,
            timestamp_ms: self.timestamp_ms,
            attempt: self.attempt.max(1),
            reply_to: self.reply_to,
        }
    }
}

/// A message a handler published (buffered until the invocation succeeds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Destination topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub payload: Vec<u8>,
}

/// Severity of a log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the handler survived.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    /// Lower-case name, as printed and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where a log record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// The `log` import.
    Guest,
    /// A line the guest wrote to stdout.
    Stdout,
    /// A line the guest wrote to stderr.
    Stderr,
}

impl LogSource {
    /// Lower-case name, as printed and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Guest => "log",
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
        }
    }
}

/// One log record from an invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// Origin.
    pub source: LogSource,
    /// Text (truncated past the host's per-record bound).
    pub message: String,
}

/// What became of one call of `handle`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded; these outputs are to be published.
    Ok {
        /// Outputs in publish order.
        outputs: Vec<OutgoingMessage>,
    },
    /// The handler asked to be retried.
    Retry {
        /// Why.
        reason: String,
        /// The earliest delay the handler asked for.
        after: Option<Duration>,
    },
    /// The handler rejected the message (or published something the host refused).
    Rejected {
        /// Why.
        reason: String,
    },
    /// The guest trapped (panic, unreachable, stack overflow, failed instantiation).
    Trapped {
        /// The trap, in one line.
        reason: String,
    },
    /// The call exceeded its deadline and was interrupted, running wasm or waiting in the host.
    TimedOut {
        /// The deadline that fired.
        timeout: Duration,
    },
    /// The guest ran into its memory cap and trapped.
    OutOfMemory {
        /// The cap, in bytes.
        limit_bytes: u64,
    },
}

impl Outcome {
    /// Short machine-readable kind: `ok`, `retry`, `reject`, `trapped`, `timed_out`,
    /// `out_of_memory`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Retry { .. } => "retry",
            Outcome::Rejected { .. } => "reject",
            Outcome::Trapped { .. } => "trapped",
            Outcome::TimedOut { .. } => "timed_out",
            Outcome::OutOfMemory { .. } => "out_of_memory",
        }
    }

    /// Human-readable reason, if the outcome is a failure.
    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Ok { .. } => None,
            Outcome::Retry { reason, .. }
            | Outcome::Rejected { reason }
            | Outcome::Trapped { reason } => Some(reason.clone()),
            Outcome::TimedOut { timeout } => Some(format!(
                "handler exceeded its deadline of {} ms",
                timeout.as_millis()
            )),
            Outcome::OutOfMemory { limit_bytes } => Some(format!(
                "handler exceeded its memory limit of {} MiB",
                limit_bytes / (1024 * 1024)
            )),
        }
    }
}

/// The result of one invocation: outcome, logs and timing.
#[derive(Clone, Debug)]
pub struct Invocation {
    /// What happened.
    pub outcome: Outcome,
    /// Log records (guest logs, stdout and stderr lines), bounded.
    pub logs: Vec<LogRecord>,
    /// Records dropped because the bound was reached.
    pub dropped_logs: u64,
    /// Publishes the host refused (a topic not in the route's outputs, too large, too many):
    /// the first one's reason fails the call.
    pub refused_outputs: u32,
    /// Wall-clock time of the call.
    pub elapsed: Duration,
    /// The kv writes the call staged, when it ran with staging (empty unless it succeeded);
    /// `None` when its writes went straight to the store.
    pub kv_writes: Option<Vec<crate::state::KvWrite>>,
}

/// Convenience for building a [`HandlerEnv`] with default limits and no outputs restriction.
pub fn test_env(
    name: &str,
    config: BTreeMap<String, String>,
    kv: Arc<dyn crate::state::KvStore>,
) -> HandlerEnv {
    HandlerEnv {
        name: name.to_owned(),
        config,
        outputs: None,
        limits: HandlerLimits::default(),
        kv,
    }
}
