//! Persistent state behind one trait: guest key-value data (and, with the delivery pipeline,
//! idempotency keys).
//!
//! Backends: [`MemoryStore`] for `lockgate test` and unit tests, [`EmbeddedStore`] (redb, one file
//! in the state directory) as the default for `lockgate run`. Shared stores (Redis, PostgreSQL) add
//! a file each behind the same trait.
//!
//! Semantics every backend keeps: keys live in a namespace (the handler's name); an entry with an
//! expiry is invisible from that instant on; compare-and-swap compares against the *visible* value,
//! so an expired entry compares equal to "absent".

mod embedded;
mod memory;

pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;

use std::time::{SystemTime, UNIX_EPOCH};

/// Errors from a state backend.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The backend failed (I/O, corruption, unreachable). Retrying later may succeed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// A key-value store shared by every handler of a process, namespaced per handler.
///
/// Methods are synchronous because guests call them from inside a synchronous wasm call on a
/// blocking thread; network backends bridge to async internally.
pub trait KvStore: Send + Sync + 'static {
    /// Returns the value of `key` in `namespace` if present and not expired at `now_ms`.
    fn get(&self, namespace: &str, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>, StateError>;

    /// Stores `value`, expiring at `expires_at_ms` (milliseconds since the Unix epoch) if given.
    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError>;

    /// Removes `key`; returns whether a visible entry was present at `now_ms`.
    fn delete(&self, namespace: &str, key: &str, now_ms: u64) -> Result<bool, StateError>;

    /// Atomically replaces the visible value (`None` = absent) by `new` (`None` = delete) if it
    /// equals `expected`. Returns whether the swap happened.
    fn compare_and_swap(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<bool, StateError>;
}

/// Milliseconds since the Unix epoch, the clock every backend compares expiries against.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An entry as stored: value plus optional expiry, encoded as 8 bytes of big-endian expiry
/// (0 = never) followed by the value. Shared by backends that store opaque bytes.
pub(crate) fn encode_entry(value: &[u8], expires_at_ms: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&expires_at_ms.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Decodes an entry written by [`encode_entry`]; `None` if expired at `now_ms` or malformed.
pub(crate) fn decode_entry(raw: &[u8], now_ms: u64) -> Option<&[u8]> {
    let (head, value) = raw.split_first_chunk::<8>()?;
    let expires = u64::from_be_bytes(*head);
    if expires != 0 && expires <= now_ms {
        return None;
    }
    Some(value)
}

#[cfg(test)]
pub(crate) mod conformance {
    //! One suite every backend must pass.
    use super::KvStore;

    const T0: u64 = 1_000_000;

    /// Runs the shared semantics checks against `store`.
    pub fn run(store: &dyn KvStore) {
        // get / set / overwrite
        assert_eq!(store.get("h", "a", T0).unwrap(), None);
        store.set("h", "a", b"1", None).unwrap();
        assert_eq!(store.get("h", "a", T0).unwrap().as_deref(), Some(&b"1"[..]));
        store.set("h", "a", b"2", None).unwrap();
        assert_eq!(store.get("h", "a", T0).unwrap().as_deref(), Some(&b"2"[..]));

        // namespaces are isolated
        assert_eq!(store.get("other", "a", T0).unwrap(), None);

        // TTL: visible before expiry, gone at and after it
        store.set("h", "t", b"x", Some(T0 + 100)).unwrap();
        assert!(store.get("h", "t", T0 + 99).unwrap().is_some());
        assert_eq!(store.get("h", "t", T0 + 100).unwrap(), None);

        // delete reports presence; deleting an expired entry reports absence
        assert!(store.delete("h", "a", T0).unwrap());
        assert!(!store.delete("h", "a", T0).unwrap());
        assert!(!store.delete("h", "t", T0 + 200).unwrap());

        // CAS from absent, conflict, success, delete-by-CAS
        assert!(
            store
                .compare_and_swap("h", "c", None, Some(b"1"), None, T0)
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("h", "c", None, Some(b"9"), None, T0)
                .unwrap()
        );
        assert!(
            !store
                .compare_and_swap("h", "c", Some(b"0"), Some(b"9"), None, T0)
                .unwrap()
        );
        assert_eq!(store.get("h", "c", T0).unwrap().as_deref(), Some(&b"1"[..]));
        assert!(
            store
                .compare_and_swap("h", "c", Some(b"1"), Some(b"2"), None, T0)
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("h", "c", Some(b"2"), None, None, T0)
                .unwrap()
        );
        assert_eq!(store.get("h", "c", T0).unwrap(), None);

        // an expired entry compares equal to absent
        store.set("h", "e", b"old", Some(T0 + 10)).unwrap();
        assert!(
            !store
                .compare_and_swap("h", "e", None, Some(b"new"), None, T0)
                .unwrap()
        );
        assert!(
            store
                .compare_and_swap("h", "e", None, Some(b"new"), None, T0 + 10)
                .unwrap()
        );
        assert_eq!(
            store.get("h", "e", T0 + 20).unwrap().as_deref(),
            Some(&b"new"[..])
        );

        // CAS can set a TTL
        assert!(
            store
                .compare_and_swap("h", "ct", None, Some(b"v"), Some(T0 + 5), T0)
                .unwrap()
        );
        assert_eq!(store.get("h", "ct", T0 + 5).unwrap(), None);
    }
}
