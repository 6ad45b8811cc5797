//! In-memory [`KvStore`], used by `lockgate test` so guest tests leave nothing behind.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::{KvStore, KvWrite, StateError, decode_entry, encode_entry};

/// A process-local store; contents vanish with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<(String, String), Vec<u8>>>,
}

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl KvStore for MemoryStore {
    fn blocks(&self) -> bool {
        false
    }

    fn get(&self, namespace: &str, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>, StateError> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(entries
            .get(&(namespace.to_owned(), key.to_owned()))
            .and_then(|raw| decode_entry(raw, now_ms))
            .map(<[u8]>::to_vec))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.insert(
            (namespace.to_owned(), key.to_owned()),
            encode_entry(value, expires_at_ms),
        );
        Ok(())
    }

    fn delete(&self, namespace: &str, key: &str, now_ms: u64) -> Result<bool, StateError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(entries
            .remove(&(namespace.to_owned(), key.to_owned()))
            .is_some_and(|raw| decode_entry(&raw, now_ms).is_some()))
    }

    fn apply_atomically(
        &self,
        writes: &[KvWrite],
        now_ms: u64,
    ) -> Result<Option<String>, StateError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for w in writes {
            if let Some(expected) = &w.expected {
                let id = (w.namespace.clone(), w.key.clone());
                let current = entries.get(&id).and_then(|raw| decode_entry(raw, now_ms));
                if current != expected.as_deref() {
                    return Ok(Some(w.key.clone()));
                }
            }
        }
        for w in writes {
            let id = (w.namespace.clone(), w.key.clone());
            match &w.value {
                Some(v) => entries.insert(id, encode_entry(v, w.expires_at_ms)),
                None => entries.remove(&id),
            };
        }
        Ok(None)
    }

    fn compare_and_swap(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<bool, StateError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let id = (namespace.to_owned(), key.to_owned());
        let current = entries.get(&id).and_then(|raw| decode_entry(raw, now_ms));
        if current != expected {
            return Ok(false);
        }
        match new {
            Some(value) => entries.insert(id, encode_entry(value, expires_at_ms)),
            None => entries.remove(&id),
        };
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        crate::state::conformance::kv::run(&super::MemoryStore::new());
    }
}
