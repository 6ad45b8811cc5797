//! The engine's settings ([`EngineSettings`]) and a handler's limits, as the config gives them.
//! The config is plain data at a lower layer; turning it into what the engine runs with is the
//! engine's business.

use std::path::PathBuf;

use crate::config::{Config, DEFAULT_MAX_MEMORY_MB, HandlerConfig};

use super::HandlerLimits;

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

impl From<&Config> for EngineSettings {
    /// The `[engine]` table, with pool slots large enough for the hungriest handler.
    fn from(config: &Config) -> Self {
        let max_memory_mb = config
            .handlers
            .values()
            .map(|h| h.max_memory_mb)
            .max()
            .unwrap_or(DEFAULT_MAX_MEMORY_MB)
            .max(DEFAULT_MAX_MEMORY_MB);
        Self {
            pooling: config.engine.pooling,
            max_instances: config.engine.max_instances,
            max_memory_bytes: max_memory_mb * 1024 * 1024,
            cache_dir: config.engine.cache.then(|| config.state_dir.join("cache")),
            ..Self::default()
        }
    }
}

impl From<&HandlerConfig> for HandlerLimits {
    /// The limits of a `[handlers.<name>]` table.
    fn from(handler: &HandlerConfig) -> Self {
        Self {
            timeout: std::time::Duration::from_millis(handler.timeout_ms),
            max_memory_bytes: handler.max_memory_mb * 1024 * 1024,
            max_output_bytes: handler.max_output_bytes,
            max_outputs: handler.max_outputs,
            max_log_records: handler.max_log_records,
        }
    }
}
