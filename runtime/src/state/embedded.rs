//! The default persistent [`KvStore`]: one redb file in the state directory.
//!
//! Why redb: a single file with ACID write transactions and no background compaction threads,
//! pure Rust (no C toolchain), and serialised writers, which makes compare-and-swap a plain
//! read-then-write inside one transaction. Our writes are small and each must be durable before
//! the guest call returns, which is exactly redb's default `Durability::Immediate` commit.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{KvStore, KvWrite, StateError, decode_entry, encode_entry};

/// Key: namespace, a zero byte, then the key (handler names cannot contain zero bytes).
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// A redb-backed store; survives restarts.
pub struct EmbeddedStore {
    db: Database,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(e.to_string())
}

fn full_key(namespace: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + 1 + key.len());
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| unavailable(format!("cannot create {}: {e}", parent.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        // Create the table up front so read transactions never see it missing.
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(KV).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Self { db })
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, &[u8], &[u8]>) -> Result<R, redb::StorageError>,
    ) -> Result<R, StateError> {
        let tx = self.db.begin_write().map_err(unavailable)?;
        let result = {
            let mut table = tx.open_table(KV).map_err(unavailable)?;
            f(&mut table).map_err(unavailable)?
        };
        tx.commit().map_err(unavailable)?;
        Ok(result)
    }
}

impl KvStore for EmbeddedStore {
    fn get(&self, namespace: &str, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>, StateError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let table = tx.open_table(KV).map_err(unavailable)?;
        let raw = table
            .get(full_key(namespace, key).as_slice())
            .map_err(unavailable)?;
        Ok(raw.and_then(|v| decode_entry(v.value(), now_ms).map(<[u8]>::to_vec)))
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        let k = full_key(namespace, key);
        let v = encode_entry(value, expires_at_ms);
        self.write(|t| t.insert(k.as_slice(), v.as_slice()).map(drop))
    }

    fn set_many(
        &self,
        namespace: &str,
        entries: &[(String, Vec<u8>)],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        // One transaction, one fsync, for every key of a batch.
        self.write(|t| {
            for (k, v) in entries {
                let k = full_key(namespace, k);
                t.insert(k.as_slice(), encode_entry(v, expires_at_ms).as_slice())?;
            }
            Ok(())
        })
    }

    fn apply_atomically(
        &self,
        writes: &[KvWrite],
        now_ms: u64,
    ) -> Result<Option<String>, StateError> {
        // One write transaction: redb serialises writers, so the checks and the writes are one
        // atomic step, and one fsync makes them durable together.
        self.write(|t| {
            for w in writes {
                if let Some(expected) = &w.expected {
                    let k = full_key(&w.namespace, &w.key);
                    let current = t.get(k.as_slice())?;
                    let visible = current
                        .as_ref()
                        .and_then(|v| decode_entry(v.value(), now_ms).map(<[u8]>::to_vec));
                    if visible != *expected {
                        return Ok(Some(w.key.clone()));
                    }
                }
            }
            for w in writes {
                let k = full_key(&w.namespace, &w.key);
                match &w.value {
                    Some(v) => {
                        t.insert(k.as_slice(), encode_entry(v, w.expires_at_ms).as_slice())?;
                    }
                    None => {
                        t.remove(k.as_slice())?;
                    }
                }
            }
            Ok(None)
        })
    }

    fn delete(&self, namespace: &str, key: &str, now_ms: u64) -> Result<bool, StateError> {
        let k = full_key(namespace, key);
        self.write(|t| {
            let old = t.remove(k.as_slice())?;
            Ok(old.is_some_and(|v| decode_entry(v.value(), now_ms).is_some()))
        })
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
        let k = full_key(namespace, key);
        // redb admits one write transaction at a time, so this read-compare-write is atomic.
        self.write(|t| {
            let matches = {
                let current = t.get(k.as_slice())?;
                current
                    .as_ref()
                    .and_then(|v| decode_entry(v.value(), now_ms))
                    == expected
            };
            if !matches {
                return Ok(false);
            }
            match new {
                Some(value) => {
                    t.insert(k.as_slice(), encode_entry(value, expires_at_ms).as_slice())?;
                }
                None => {
                    t.remove(k.as_slice())?;
                }
            }
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        crate::state::conformance::kv::run(&store);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn claims_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn KvStore> =
            std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        crate::state::conformance::claims::run(
            &crate::state::LocalClaims::new(store.clone()),
            store,
        )
        .await;
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store.set("h", "k", b"kept", None).unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            store.get("h", "k", 0).unwrap().as_deref(),
            Some(&b"kept"[..])
        );
    }
}
