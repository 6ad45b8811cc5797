//! Idempotency keys: where a message's key comes from, and the persistent record of keys that are
//! done.
//!
//! A key is recorded only after the message is *done* (outputs acknowledged, or dead-lettered),
//! so a crash before that point redelivers and reruns the message; a crash after it skips the
//! rerun. The one window left — a crash after the outputs were acknowledged and before the key
//! was recorded — is closed by sinks that deduplicate by `lockgate-id` (the local broker and
//! JetStream do), because outputs derive their id from the idempotency key.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::broker::Record;
use crate::config::IdempotencyKey;
use crate::state::{KvStore, StateError, now_ms};

/// Keys longer than this are stored as their SHA-256 (hex), so a huge header cannot bloat the
/// store.
pub const MAX_STORED_KEY_BYTES: usize = 256;

/// Extracts the idempotency key of `record`; `None` when the message has none (the header is
/// absent, the payload is not JSON or lacks the pointer, the message has no key).
pub fn key_of(source: &IdempotencyKey, record: &Record) -> Option<String> {
    let raw = match source {
        IdempotencyKey::Header(name) => String::from_utf8_lossy(record.header(name)?).into_owned(),
        IdempotencyKey::MessageKey => String::from_utf8_lossy(record.key.as_deref()?).into_owned(),
        IdempotencyKey::JsonPointer(pointer) => {
            let value: serde_json::Value = serde_json::from_slice(&record.payload).ok()?;
            match value.pointer(pointer)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => return None,
                other => other.to_string(),
            }
        }
        // Without an offset (core NATS) a position names no single message.
        IdempotencyKey::Position => {
            record.offset?;
            record.position()
        }
    };
    if raw.is_empty() {
        return None;
    }
    if raw.len() > MAX_STORED_KEY_BYTES {
        return Some(format!(
            "sha256:{}",
            hex::encode(Sha256::digest(raw.as_bytes()))
        ));
    }
    Some(raw)
}

/// The done-keys of one route in a [`KvStore`] (namespace `idempotency/<route>`, which cannot
/// collide with a handler's kv namespace because handler names contain no `/`).
#[derive(Clone)]
pub struct DoneKeys {
    store: Arc<dyn KvStore>,
    namespace: String,
    ttl: Duration,
}

impl std::fmt::Debug for DoneKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoneKeys")
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl DoneKeys {
    /// Done-keys of `route`, remembered for `ttl`.
    pub fn new(store: Arc<dyn KvStore>, route: &str, ttl: Duration) -> Self {
        Self {
            store,
            namespace: format!("idempotency/{route}"),
            ttl,
        }
    }

    /// Whether `key` is recorded as done. Runs on a blocking thread (the store may fsync).
    pub async fn is_done(&self, key: &str) -> Result<bool, StateError> {
        let this = self.clone();
        let key = key.to_owned();
        blocking(move || {
            this.store
                .get(&this.namespace, &key, now_ms())
                .map(|v| v.is_some())
        })
        .await
    }

    /// Records `key` as done until now + ttl.
    pub async fn mark_done(&self, key: &str) -> Result<(), StateError> {
        let this = self.clone();
        let key = key.to_owned();
        blocking(move || {
            let ttl = u64::try_from(this.ttl.as_millis()).unwrap_or(u64::MAX);
            let expires = now_ms().saturating_add(ttl);
            this.store.set(&this.namespace, &key, b"1", Some(expires))
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Unavailable(format!("state store task failed: {e}")))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::{EmbeddedStore, MemoryStore};

    fn record() -> Record {
        Record {
            topic: "t".into(),
            partition: Some(2),
            offset: Some(9),
            key: Some(b"user-1".to_vec()),
            headers: vec![("idem".into(), b"abc".to_vec())],
            payload: br#"{"order":{"id":42,"ref":"x-1"},"none":null}"#.to_vec(),
            ..Record::default()
        }
    }

    #[test]
    fn keys_come_from_each_source() {
        let r = record();
        let k = |s: IdempotencyKey| key_of(&s, &r);
        assert_eq!(
            k(IdempotencyKey::Header("idem".into())).as_deref(),
            Some("abc")
        );
        assert_eq!(k(IdempotencyKey::Header("other".into())), None);
        assert_eq!(k(IdempotencyKey::MessageKey).as_deref(), Some("user-1"));
        assert_eq!(
            k(IdempotencyKey::JsonPointer("/order/id".into())).as_deref(),
            Some("42")
        );
        assert_eq!(
            k(IdempotencyKey::JsonPointer("/order/ref".into())).as_deref(),
            Some("x-1")
        );
        assert_eq!(k(IdempotencyKey::JsonPointer("/none".into())), None);
        assert_eq!(k(IdempotencyKey::JsonPointer("/missing".into())), None);
        assert_eq!(k(IdempotencyKey::Position).as_deref(), Some("t/2/9"));
        let unpositioned = Record {
            offset: None,
            ..record()
        };
        assert_eq!(key_of(&IdempotencyKey::Position, &unpositioned), None);
        let not_json = Record {
            payload: b"nope".to_vec(),
            ..record()
        };
        assert_eq!(
            key_of(&IdempotencyKey::JsonPointer("/order/id".into()), &not_json),
            None
        );
    }

    #[test]
    fn long_keys_are_hashed() {
        let r = Record {
            headers: vec![("idem".into(), vec![b'a'; 1000])],
            ..record()
        };
        let k = key_of(&IdempotencyKey::Header("idem".into()), &r).unwrap();
        assert!(k.starts_with("sha256:") && k.len() == 7 + 64, "{k}");
    }

    #[tokio::test]
    async fn done_keys_survive_a_restart_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&path).unwrap());
            let keys = DoneKeys::new(store, "orders", Duration::from_secs(60));
            assert!(!keys.is_done("k1").await.unwrap());
            keys.mark_done("k1").await.unwrap();
            assert!(keys.is_done("k1").await.unwrap());
        }
        let store: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let keys = DoneKeys::new(store.clone(), "orders", Duration::from_secs(60));
        assert!(keys.is_done("k1").await.unwrap(), "forgotten after reopen");
        // Routes do not see each other's keys.
        let other = DoneKeys::new(store, "payments", Duration::from_secs(60));
        assert!(!other.is_done("k1").await.unwrap());
    }

    #[tokio::test]
    async fn expired_keys_are_forgotten() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let keys = DoneKeys::new(store, "r", Duration::from_millis(1));
        keys.mark_done("k").await.unwrap();
        // The store compares against wall-clock ms; wait until the expiry has certainly passed.
        let deadline = now_ms() + 5;
        while now_ms() <= deadline {
            tokio::task::yield_now().await;
        }
        assert!(!keys.is_done("k").await.unwrap());
    }
}
