//! Per-handler key-value state.
//!
//! Each handler has its own namespace and values persist across restarts. When a write takes
//! effect depends on the route (the `kv` interface of `wit/handler.wit`, and
//! docs/handlers/contract.md):
//!
//! - On a route with an idempotency key, a message's writes are held back during the call and
//!   committed together with its key when the message succeeds. Reads see the call's own writes;
//!   a write to a key the call read applies only if nobody changed that key meanwhile (else the
//!   message runs again), so read-modify-write needs no [`compare_and_swap`]. A failed attempt
//!   leaves no trace, and a redelivered message never applies its writes twice.
//! - Elsewhere (no idempotency key, and in `lockgate test` and the native `TestHost`) writes take
//!   effect immediately: they are *not* undone when the invocation fails, so make them idempotent
//!   (for example keyed by [`crate::Message::id`]) or guard them with [`compare_and_swap`].

use std::fmt;
use std::time::Duration;

use crate::error::millis_ceil;

/// Why a kv operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvError {
    /// The store cannot be reached or failed; retrying later may succeed.
    Unavailable(String),
    /// The key is empty, contains a NUL character or is longer than the host limit (1024 bytes).
    /// Carries the reason.
    InvalidKey(String),
    /// The value exceeds the host limit (1 MiB), or, on a route with an idempotency key, the
    /// call's staged writes exceed theirs (16 MiB). Carries the limit in bytes.
    TooLarge(u64),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(reason) => write!(f, "kv store unavailable: {reason}"),
            Self::InvalidKey(reason) => write!(f, "invalid kv key: {reason}"),
            Self::TooLarge(limit) => write!(f, "kv value exceeds the limit of {limit} bytes"),
        }
    }
}

impl std::error::Error for KvError {}

impl From<KvError> for crate::Error {
    /// An unavailable store is transient (retry); a bad key or an oversized value will fail the
    /// same way every time (reject).
    fn from(err: KvError) -> Self {
        match err {
            KvError::Unavailable(_) => crate::Error::retry(err.to_string()),
            KvError::InvalidKey(_) | KvError::TooLarge(_) => crate::Error::reject(err.to_string()),
        }
    }
}

/// Returns the value stored under `key`, or `None` if absent or expired.
///
/// # Errors
/// See [`KvError`].
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    crate::host::kv_get(key)
}

/// Stores `value` under `key` with no expiry.
///
/// # Errors
/// See [`KvError`].
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), KvError> {
    crate::host::kv_set(key, value.as_ref(), None)
}

/// Stores `value` under `key`, expiring after `ttl` (rounded up to whole milliseconds; the host
/// treats a zero `ttl` as 1 ms, so use [`set`] for an entry that never expires).
///
/// # Errors
/// See [`KvError`].
pub fn set_with_ttl(key: &str, value: impl AsRef<[u8]>, ttl: Duration) -> Result<(), KvError> {
    crate::host::kv_set(key, value.as_ref(), Some(millis_ceil(ttl)))
}

/// Removes `key`. Returns true if an entry was present.
///
/// # Errors
/// See [`KvError`].
pub fn delete(key: &str) -> Result<bool, KvError> {
    crate::host::kv_delete(key)
}

/// Atomically replaces the value under `key` with `new` (or removes it when `new` is `None`) if
/// the current value equals `expected` (`None` meaning absent or expired). `ttl` applies to the
/// new value (rounded up to whole milliseconds). Returns true if the swap happened, false if the
/// current value differed.
///
/// # Errors
/// See [`KvError`].
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    new: Option<&[u8]>,
    ttl: Option<Duration>,
) -> Result<bool, KvError> {
    crate::host::kv_compare_and_swap(key, expected, new, ttl.map(millis_ceil))
}
