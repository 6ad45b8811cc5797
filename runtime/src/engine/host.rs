//! Host side of the handler world: the state each store carries and the import implementations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{config, emit, kv, log, types};
use super::outbound::{HttpHooks, Outbound};
use super::stdio::CaptureBuffer;
use super::{LogLevel, LogRecord, LogSource, OutgoingMessage};
use crate::deadline::{Deadline, DeadlineExceeded};
use crate::state::{self, KvStore};

/// Longest kv key a guest may use, in bytes. Keys are namespaced and indexed; a megabyte key is a
/// bug, not data.
pub const MAX_KV_KEY_BYTES: usize = 1024;
/// Largest kv value a guest may store (1 MiB): kv is for state, not blobs.
pub const MAX_KV_VALUE_BYTES: usize = 1024 * 1024;
/// Longest single log record kept (4 KiB); longer messages are truncated with a marker.
pub const MAX_LOG_RECORD_BYTES: usize = 4 * 1024;

/// Limits a handler runs under, from its runtime.toml table.
#[derive(Clone, Debug)]
pub struct HandlerLimits {
    /// Wall-clock deadline of one call of `handle`.
    pub timeout: std::time::Duration,
    /// Cap on the sum of all linear memories of one instance, in bytes.
    pub max_memory_bytes: u64,
    /// Largest output (payload + key + headers) in bytes.
    pub max_output_bytes: u64,
    /// Most outputs one invocation may buffer.
    pub max_outputs: u32,
    /// Most log records (guest logs plus stdout/stderr lines) kept per invocation.
    pub max_log_records: u32,
}

impl Default for HandlerLimits {
    fn default() -> Self {
        Self {
            timeout: std::time::Duration::from_millis(crate::config::DEFAULT_TIMEOUT_MS),
            max_memory_bytes: crate::config::DEFAULT_MAX_MEMORY_MB * 1024 * 1024,
            max_output_bytes: crate::config::DEFAULT_MAX_OUTPUT_BYTES,
            max_outputs: crate::config::DEFAULT_MAX_OUTPUTS,
            max_log_records: crate::config::DEFAULT_MAX_LOG_RECORDS,
        }
    }
}

/// What every instance of one handler version shares: identity, config, grants and limits.
pub struct HandlerEnv {
    /// The handler's name (its kv namespace and log attribution).
    pub name: String,
    /// The handler's `config` table, as strings.
    pub config: BTreeMap<String, String>,
    /// Topics the handler may publish to; `None` allows any (used by `lockgate test`).
    pub outputs: Option<BTreeSet<String>>,
    /// Limits applied to every call.
    pub limits: HandlerLimits,
    /// Where `kv` reads and writes.
    pub kv: Arc<dyn KvStore>,
    /// The outbound HTTP the handler is granted; `None` denies every request.
    pub http: Option<Arc<Outbound>>,
    /// The database the handler's statements run on (`sql`); `None` refuses every statement.
    pub sql: Option<super::SqlGrant>,
    /// Environment variables and read-only directories each instance's WASI gets
    /// (docs/guarantees.md#g9); empty: none.
    pub wasi: crate::config::WasiGrants,
}

impl std::fmt::Debug for HandlerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerEnv")
            .field("name", &self.name)
            .field("outputs", &self.outputs)
            .field("limits", &self.limits)
            .field("wasi", &self.wasi)
            .finish_non_exhaustive()
    }
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
        http: None,
        sql: None,
        wasi: crate::config::WasiGrants::default(),
    }
}

/// What one invocation accumulates; reset before each call.
#[derive(Default)]
pub(crate) struct CallState {
    /// When the call (or the instantiation) must be over: every host wait made on its behalf
    /// ends then. `None` between calls, when no guest code runs.
    pub deadline: Option<Deadline>,
    pub outputs: Vec<OutgoingMessage>,
    pub logs: Vec<LogRecord>,
    pub dropped_logs: u64,
    /// The first publish the host refused; it fails the invocation even if `handle` returns ok.
    pub refused_output: Option<String>,
    /// Publishes the host refused in this call.
    pub refused_outputs: u32,
    /// The message's reply subject: publishing to it is always allowed (request-reply).
    pub reply_to: Option<String>,
    /// Set when the call's kv writes are staged (to be committed with the message's
    /// idempotency key) instead of applied at once.
    pub kv_txn: Option<KvTxn>,
    /// The call's SQL transaction, from its first statement (`engine/sql`).
    pub sql: Option<crate::state::SqlTxn>,
}

/// Most bytes of kv values one invocation may stage (16 MiB).
pub const MAX_STAGED_KV_BYTES: usize = 16 * 1024 * 1024;

/// A staged write: a value with its expiry, or `None` for a delete.
type Staged = Option<(Vec<u8>, Option<u64>)>;

/// The kv writes of one invocation, held back until its message commits. Reads see the
/// invocation's own writes; the first value read from the store for a key is remembered, so a
/// write to a key the handler read applies only if the key has not changed since.
#[derive(Debug, Default)]
pub(crate) struct KvTxn {
    /// Staged: a value with its expiry, or `None` for a delete.
    writes: BTreeMap<String, Staged>,
    /// The visible value first read from the store.
    seen: BTreeMap<String, Option<Vec<u8>>>,
    bytes: usize,
}

impl KvTxn {
    /// The writes, for the commit.
    pub(crate) fn into_writes(self, namespace: &str) -> Vec<state::KvWrite> {
        let mut seen = self.seen;
        self.writes
            .into_iter()
            .map(|(key, w)| {
                let expected = seen.remove(&key);
                let (value, expires_at_ms) = match w {
                    Some((v, e)) => (Some(v), e),
                    None => (None, None),
                };
                state::KvWrite {
                    namespace: namespace.to_owned(),
                    key,
                    value,
                    expires_at_ms,
                    expected,
                }
            })
            .collect()
    }
}

impl CallState {
    /// The deadline every host wait of the running call is bounded by. Outside a call there is
    /// none to wait for, so a wait there ends at once rather than never.
    pub(crate) fn deadline(&self) -> Deadline {
        self.deadline.unwrap_or_else(Deadline::passed)
    }

    pub(crate) fn push_log(&mut self, max: u32, level: LogLevel, source: LogSource, text: &str) {
        if self.logs.len() >= max as usize {
            self.dropped_logs += 1;
            return;
        }
        let message = if text.len() > MAX_LOG_RECORD_BYTES {
            let mut cut = MAX_LOG_RECORD_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}… [truncated {} bytes]", &text[..cut], text.len() - cut)
        } else {
            text.to_owned()
        };
        self.logs.push(LogRecord {
            level,
            source,
            message,
        });
    }
}

/// Enforces the per-instance memory cap across all of the instance's linear memories.
#[derive(Default)]
pub(crate) struct MemoryLimiter {
    pub cap: u64,
    pub allocated: u64,
    /// Set when a growth was refused, so a trap that follows is reported as out-of-memory.
    pub hit: bool,
}

/// Table growth beyond this many elements is refused; real guests stay far below it.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let extra = desired.saturating_sub(current) as u64;
        if self.allocated.saturating_add(extra) > self.cap {
            self.hit = true;
            // Refuse rather than trap: a guest may handle a failed allocation gracefully.
            return Ok(false);
        }
        self.allocated += extra;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The data of one wasmtime `Store`: one instance of one handler version.
pub(crate) struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub env: Arc<HandlerEnv>,
    pub memory: MemoryLimiter,
    pub call: CallState,
    pub stdout: CaptureBuffer,
    pub stderr: CaptureBuffer,
    /// `wasi:http`'s own state (header size limits).
    pub http_ctx: wasmtime_wasi_http::WasiHttpCtx,
    /// lockgate's sender of `wasi:http` requests, and the running call's requests.
    pub http: HttpHooks,
}

impl wasmtime_wasi_http::WasiHttpView for HostState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        // One resource table for WASI and wasi:http: a response body is a WASI stream.
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

fn output_size(m: &types::Outgoing) -> u64 {
    let headers: usize = m.headers.iter().map(|h| h.name.len() + h.value.len()).sum();
    (m.payload.len() + m.key.as_ref().map_or(0, Vec::len) + headers) as u64
}

impl emit::Host for HostState {
    fn publish(&mut self, message: types::Outgoing) -> Result<(), emit::PublishError> {
        let limits = &self.env.limits;
        let refusal = if self
            .env
            .outputs
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(&message.topic))
            && self.call.reply_to.as_deref() != Some(message.topic.as_str())
        {
            Some((
                format!(
                    "publish to topic `{}` is not allowed (not in the route's outputs)",
                    message.topic
                ),
                emit::PublishError::NotAllowed(message.topic.clone()),
            ))
        } else if output_size(&message) > limits.max_output_bytes {
            Some((
                format!(
                    "output to `{}` is {} bytes, over the limit of {} bytes (max_output_bytes)",
                    message.topic,
                    output_size(&message),
                    limits.max_output_bytes
                ),
                emit::PublishError::TooLarge(limits.max_output_bytes),
            ))
        } else if self.call.outputs.len() >= limits.max_outputs as usize {
            Some((
                format!(
                    "more than {} outputs in one invocation (max_outputs)",
                    limits.max_outputs
                ),
                emit::PublishError::TooMany(limits.max_outputs),
            ))
        } else {
            None
        };
        if let Some((reason, error)) = refusal {
            self.call.refused_output.get_or_insert(reason);
            self.call.refused_outputs = self.call.refused_outputs.saturating_add(1);
            return Err(error);
        }
        self.call.outputs.push(OutgoingMessage {
            topic: message.topic,
            key: message.key,
            headers: message
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
            payload: message.payload,
        });
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), kv::KvError> {
    if key.is_empty() {
        return Err(kv::KvError::InvalidKey("key is empty".into()));
    }
    // PostgreSQL text cannot hold NUL; refusing it everywhere keeps handlers portable.
    if key.contains('\0') {
        return Err(kv::KvError::InvalidKey(
            "key contains a NUL character".into(),
        ));
    }
    if key.len() > MAX_KV_KEY_BYTES {
        return Err(kv::KvError::InvalidKey(format!(
            "key is {} bytes, over the limit of {MAX_KV_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), kv::KvError> {
    if value.len() > MAX_KV_VALUE_BYTES {
        return Err(kv::KvError::TooLarge(MAX_KV_VALUE_BYTES as u64));
    }
    Ok(())
}

fn expiry(now: u64, ttl_ms: Option<u64>) -> Option<u64> {
    ttl_ms.map(|ttl| now.saturating_add(ttl.max(1)))
}

/// Why a kv import failed: an error the guest gets to handle, or the call's deadline, which ends
/// the call (a trap, reported as `timed_out`).
#[derive(Debug)]
pub(crate) enum KvFailure {
    /// Returned to the guest.
    Guest(kv::KvError),
    /// The store did not answer before the call's deadline.
    Deadline(DeadlineExceeded),
}

impl From<kv::KvError> for KvFailure {
    fn from(e: kv::KvError) -> Self {
        Self::Guest(e)
    }
}

impl From<state::StateError> for KvFailure {
    fn from(e: state::StateError) -> Self {
        match e {
            state::StateError::DeadlineExceeded => Self::Deadline(DeadlineExceeded),
            other => Self::Guest(kv::KvError::Unavailable(other.to_string())),
        }
    }
}

/// Runs one store operation under the call's deadline, on a blocking thread when the store
/// waits on disk or a network ([`KvStore::blocks`]): the network stores bound their waits by
/// the deadline (see [`crate::deadline::bound_current`]). Past the deadline none starts: the
/// call is over.
async fn bounded<T: Send + 'static>(
    deadline: Deadline,
    kv: Arc<dyn KvStore>,
    op: impl FnOnce(&dyn KvStore) -> Result<T, state::StateError> + Send + 'static,
) -> Result<T, KvFailure> {
    if deadline.has_passed() {
        return Err(KvFailure::Deadline(DeadlineExceeded));
    }
    if !kv.blocks() {
        return Ok(op(kv.as_ref())?);
    }
    let task = tokio::task::spawn_blocking(move || deadline.scope(|| op(kv.as_ref())));
    match deadline.bound(task).await {
        Err(e) => Err(KvFailure::Deadline(e)),
        Ok(Err(e)) => Err(KvFailure::Guest(kv::KvError::Unavailable(format!(
            "the store call failed: {e}"
        )))),
        Ok(Ok(answer)) => Ok(answer?),
    }
}

impl HostState {
    /// Runs `op` on the handler's kv store, in the handler's namespace, under the call's
    /// deadline ([`bounded`]).
    fn on_store<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn KvStore, &str) -> Result<T, state::StateError> + Send + 'static,
    ) -> impl Future<Output = Result<T, KvFailure>> + Send + 'static {
        let name = self.env.name.clone();
        bounded(self.call.deadline(), self.env.kv.clone(), move |kv| {
            op(kv, &name)
        })
    }

    /// The visible value of `key` for a staged call: its own write, else the store's (which is
    /// remembered as what the call saw).
    async fn staged_get(&mut self, key: &str, now: u64) -> Result<Option<Vec<u8>>, KvFailure> {
        let Some(txn) = &self.call.kv_txn else {
            return Ok(None);
        };
        if let Some(w) = txn.writes.get(key) {
            return Ok(match w {
                Some((v, e)) if e.is_none_or(|e| e > now) => Some(v.clone()),
                _ => None,
            });
        }
        if let Some(v) = txn.seen.get(key) {
            return Ok(v.clone());
        }
        let owned = key.to_owned();
        let v = self.on_store(move |kv, ns| kv.get(ns, &owned, now)).await?;
        if let Some(txn) = &mut self.call.kv_txn {
            txn.seen.insert(key.to_owned(), v.clone());
        }
        Ok(v)
    }

    fn stage(&mut self, key: String, w: Staged) -> Result<(), KvFailure> {
        let Some(txn) = &mut self.call.kv_txn else {
            return Ok(());
        };
        let size = key.len() + w.as_ref().map_or(0, |(v, _)| v.len());
        if txn.bytes + size > MAX_STAGED_KV_BYTES {
            return Err(kv::KvError::TooLarge(MAX_STAGED_KV_BYTES as u64).into());
        }
        txn.bytes += size;
        txn.writes.insert(key, w);
        Ok(())
    }
}

impl kv::Host for HostState {
    fn convert_kv_error(&mut self, err: KvFailure) -> wasmtime::Result<kv::KvError> {
        match err {
            KvFailure::Guest(e) => Ok(e),
            KvFailure::Deadline(e) => Err(e.into()),
        }
    }

    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, KvFailure> {
        check_key(&key)?;
        let now = crate::message::now_ms();
        if self.call.kv_txn.is_some() {
            return self.staged_get(&key, now).await;
        }
        self.on_store(move |kv, ns| kv.get(ns, &key, now)).await
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), KvFailure> {
        check_key(&key)?;
        check_value(&value)?;
        let exp = expiry(crate::message::now_ms(), ttl_ms);
        if self.call.kv_txn.is_some() {
            return self.stage(key, Some((value, exp)));
        }
        self.on_store(move |kv, ns| kv.set(ns, &key, &value, exp))
            .await
    }

    async fn delete(&mut self, key: String) -> Result<bool, KvFailure> {
        check_key(&key)?;
        let now = crate::message::now_ms();
        if self.call.kv_txn.is_some() {
            let was = self.staged_get(&key, now).await?.is_some();
            self.stage(key, None)?;
            return Ok(was);
        }
        self.on_store(move |kv, ns| kv.delete(ns, &key, now)).await
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvFailure> {
        check_key(&key)?;
        if let Some(v) = &new {
            check_value(v)?;
        }
        let now = crate::message::now_ms();
        if self.call.kv_txn.is_some() {
            if self.staged_get(&key, now).await? != expected {
                return Ok(false);
            }
            self.stage(key, new.map(|v| (v, expiry(now, ttl_ms))))?;
            return Ok(true);
        }
        self.on_store(move |kv, ns| {
            kv.compare_and_swap(
                ns,
                &key,
                expected.as_deref(),
                new.as_deref(),
                expiry(now, ttl_ms),
                now,
            )
        })
        .await
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        let max = self.env.limits.max_log_records;
        self.call.push_log(max, level, LogSource::Guest, &message);
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.env.config.get(&key).cloned()
    }
}
