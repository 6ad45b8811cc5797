//! A loaded handler version ([`Handler`]): its compiled, pre-linked code and environment, and
//! how a fresh, sandboxed instance of it is made (WASI without ambient authority, the memory
//! cap, the instantiation deadline).

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::deadline::{Deadline, DeadlineExceeded};

use super::host::{CallState, HostState, MemoryLimiter};
use super::instance::past_deadline;
use super::outbound::HttpHooks;
use super::stdio::CaptureBuffer;
use super::{
    CachePin, Engine, EngineError, HandlerEnv, Instance, MAX_STDIO_BYTES, MIN_INSTANTIATE_TIMEOUT,
    bindings,
};

/// One loaded handler version: compiled code, its pre-linked instance template and environment.
/// Cheap to clone; instances made from it share the compiled code.
#[derive(Clone)]
pub struct Handler {
    pub(super) inner: Arc<HandlerInner>,
}

/// What [`super::Engine`] assembles when it loads a handler.
pub(super) struct HandlerInner {
    pub(super) engine: Engine,
    pub(super) pre: bindings::HandlerPre<HostState>,
    pub(super) env: Arc<HandlerEnv>,
    pub(super) path: PathBuf,
    pub(super) module_hash: String,
    pub(super) from_cache: bool,
    /// Whether the component imports `wasi:http/outgoing-handler` (it may make requests).
    pub(super) imports_http: bool,
    /// The component imports `lockgate:handler/sql`.
    pub(super) imports_sql: bool,
    /// Keeps the compiled artefact on disk while this version is loaded.
    pub(super) _cache_pin: Option<CachePin>,
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

    /// Whether the component imports `wasi:http/outgoing-handler`: it may make requests, which
    /// its handler's grant (`[handlers.<name>.http]`) must allow.
    pub fn imports_http(&self) -> bool {
        self.inner.imports_http
    }

    /// Whether the component imports `lockgate:handler/sql`: it may run statements, which need
    /// its handler's `sql` grant.
    pub fn imports_sql(&self) -> bool {
        self.inner.imports_sql
    }

    /// Whether the compiled code came from the on-disk cache.
    pub fn loaded_from_cache(&self) -> bool {
        self.inner.from_cache
    }

    /// The handler's environment (config, limits, grants).
    pub fn env(&self) -> &HandlerEnv {
        &self.inner.env
    }

    /// Creates a fresh instance, blocking this thread (see `blocking.rs`; await
    /// [`Self::instantiate_async`] on a runtime thread).
    pub fn instantiate(&self) -> Result<Instance, EngineError> {
        super::blocking::block_on(self.instantiate_async()).unwrap_or_else(|e| {
            Err(EngineError::Instantiate {
                path: self.inner.path.clone(),
                message: format!("cannot start a runtime to instantiate on: {e}"),
            })
        })
    }

    /// Creates a fresh instance.
    pub async fn instantiate_async(&self) -> Result<Instance, EngineError> {
        let env = self.inner.env.clone();
        let stdout = CaptureBuffer::new(MAX_STDIO_BYTES);
        let stderr = CaptureBuffer::new(MAX_STDIO_BYTES);
        // No preopened directories, no env, no args, no network: WasiCtxBuilder's defaults plus
        // explicit socket denial, and only what the handler's table grants (docs/guarantees.md#g9).
        // Clocks and randomness stay available.
        let mut builder = WasiCtxBuilder::new();
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        self.grant(&mut builder)?;
        let wasi = builder.build();
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
            http_ctx: wasmtime_wasi_http::WasiHttpCtx::new(),
            http: HttpHooks::new(self.inner.env.http.clone()),
        };
        let mut store = Store::new(self.inner.engine.wasmtime(), state);
        store.limiter(|s| &mut s.memory);
        // Every tick, a guest running wasm checks the clock against its call's deadline, and
        // otherwise lets the runtime thread run other tasks: a guest that computes holds it for
        // one tick at a time.
        store.epoch_deadline_callback(|store| {
            if store.data().call.deadline().has_passed() {
                Err(DeadlineExceeded.into())
            } else {
                Ok(wasmtime::UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        let timeout = self.inner.env.limits.timeout.max(MIN_INSTANTIATE_TIMEOUT);
        let deadline = Deadline::after(timeout);
        store.data_mut().call.deadline = Some(deadline);
        store.set_epoch_deadline(1);
        // A start function waiting in the host past the deadline: the future is dropped.
        let instantiated = match deadline
            .bound(self.inner.pre.instantiate_async(&mut store))
            .await
        {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        };
        let bindings = instantiated.map_err(|e| {
            let message = if store.data().memory.hit {
                format!(
                    "memory limit of {} MiB reached while instantiating",
                    self.inner.env.limits.max_memory_bytes / (1024 * 1024)
                )
            } else if past_deadline(&e) {
                format!("instantiation exceeded its deadline of {timeout:?}")
            } else {
                format!("{e:#}")
            };
            EngineError::Instantiate {
                path: self.inner.path.clone(),
                message,
            }
        })?;
        Ok(Instance::new(self.clone(), store, bindings))
    }

    /// Adds the handler's granted environment variables and read-only directories to `builder`.
    /// A directory is opened anew for each instance; one that has gone since the handler was
    /// loaded fails the instantiation, naming it.
    fn grant(&self, builder: &mut WasiCtxBuilder) -> Result<(), EngineError> {
        let grants = &self.inner.env.wasi;
        builder.envs(&grants.env[..]);
        for dir in &grants.dirs {
            builder
                .preopened_dir(&dir.host, &dir.guest, FsPerms::ReadOnly)
                .map_err(|e| EngineError::Instantiate {
                    path: self.inner.path.clone(),
                    message: format!(
                        "cannot open directory {} for the guest's {}: {e:#}",
                        dir.host.display(),
                        dir.guest
                    ),
                })?;
        }
        Ok(())
    }

    /// Instantiates once and drops the instance: proves the component links and its start
    /// functions succeed (used by `lockgate check` and before a hot swap).
    pub fn check_instantiate(&self) -> Result<(), EngineError> {
        self.instantiate().map(drop)
    }
}
