//! Read-only configuration from the handler's `config` table in `runtime.toml`.

/// Returns the value configured under `key`, or `None`.
pub fn get(key: &str) -> Option<String> {
    crate::host::config_get(key)
}
