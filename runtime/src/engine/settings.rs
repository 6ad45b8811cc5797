//! The engine's settings and a handler's limits, as the config gives them. The config is plain
//! data at a lower layer; turning it into what the engine runs with is the engine's business.

use crate::config::{Config, DEFAULT_MAX_MEMORY_MB, HandlerConfig};

use super::{EngineSettings, HandlerLimits};

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
