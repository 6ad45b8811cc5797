//! Idempotency keys: where a message's key comes from, and the persistent record of keys that are
//! done.
//!
//! A key is recorded only after the message is *done* (outputs acknowledged, or dead-lettered),
//! so a crash before that point redelivers and reruns the message; a crash after it skips the
//! rerun. The one window left — a crash after the outputs were acknowledged and before the key
//! was recorded — is closed by sinks that deduplicate by `lockgate-id` (the local broker and
//! JetStream do), because outputs derive their id from the idempotency key.
//!
//! A dead-lettered message is recorded as such ([`Completion::DeadLettered`]), not as done: its
//! redeliveries are skipped, but a replayed copy of its dead letter claims the key again and
//! runs the fixed handler (see [`crate::state`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use sha2::{Digest, Sha256};

use crate::config::IdempotencyKey;
use crate::message::{OutRecord, Record};
use crate::state::{
    Claim, ClaimRequest, Commit, Completion, IdempotencyStore, KvWrite, PostgresStore, SqlTxn,
    StateError, TxnClaim,
};

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

/// Most claims sent to the store in one call.
const MAX_CLAIM_BATCH: usize = 256;

type ClaimReply = oneshot::Sender<Result<Claim, StateError>>;

/// The idempotency keys of one route in an [`IdempotencyStore`] (scope `idempotency/<route>`,
/// which cannot collide with a handler's kv namespace because handler names contain no `/`).
///
/// Claims from all lanes go through one queue: whatever is waiting when the store answers the
/// previous call goes out as the next call, so the messages in flight share round trips.
#[derive(Clone)]
pub struct DoneKeys {
    store: Arc<dyn IdempotencyStore>,
    scope: String,
    ttl: Duration,
    lease: Duration,
    claims: mpsc::UnboundedSender<(ClaimRequest, ClaimReply)>,
}

impl std::fmt::Debug for DoneKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoneKeys")
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl DoneKeys {
    /// Keys of `route`: claimed for `lease`, remembered as done for `ttl`. Must be called inside
    /// a tokio runtime (it starts the claim batcher, which ends when the last clone is dropped).
    pub fn new(
        store: Arc<dyn IdempotencyStore>,
        route: &str,
        ttl: Duration,
        lease: Duration,
    ) -> Self {
        let scope = format!("idempotency/{route}");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batch_claims(store.clone(), scope.clone(), lease, rx));
        Self {
            store,
            scope,
            ttl,
            lease,
            claims: tx,
        }
    }

    /// How long a claim holds.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Claims `key` for `owner` (asking again with the same owner renews the lease); a
    /// `replay` (a replayed dead letter) may claim a key whose message was dead-lettered.
    pub async fn claim(&self, key: &str, owner: &str, replay: bool) -> Result<Claim, StateError> {
        let (tx, rx) = oneshot::channel();
        let request = ClaimRequest {
            replay,
            ..ClaimRequest::new(key, owner)
        };
        self.claims
            .send((request, tx))
            .map_err(|_| StateError::Unavailable("the claim batcher stopped".into()))?;
        rx.await
            .map_err(|_| StateError::Unavailable("the claim batcher stopped".into()))?
    }

    /// Whether the keys live in `store`: then a handler whose `sql` runs on it claims each
    /// message's key inside its own transaction ([`Self::claim_in_txn`]).
    pub fn kept_in(&self, store: &PostgresStore) -> bool {
        self.store.as_postgres().is_some_and(|p| p.same_as(store))
    }

    /// Claims `key` for `owner` inside a new transaction of a handler's `sql` on `store` (the
    /// store of these keys, see [`Self::kept_in`]), whose statements then run as `role`, for
    /// at most `statement_timeout` each. See [`PostgresStore::begin_claimed`]; a `replay` may
    /// claim a dead-lettered key.
    pub async fn claim_in_txn(
        &self,
        store: &PostgresStore,
        key: &str,
        owner: &str,
        replay: bool,
        role: Option<&str>,
        statement_timeout: Duration,
    ) -> Result<TxnClaim, StateError> {
        let request = ClaimRequest {
            replay,
            ..ClaimRequest::new(key, owner)
        };
        store
            .begin_claimed(
                &self.scope,
                &request,
                self.lease,
                self.ttl,
                role,
                statement_timeout,
            )
            .await
    }

    /// Commits a handler's kv `writes` with `key` (held by `owner`), keeping `outputs` (see
    /// [`encode_outputs`](crate::state::kept_outputs::encode_outputs)) until the key completes.
    pub async fn commit(
        &self,
        key: &str,
        owner: &str,
        writes: Vec<KvWrite>,
        outputs: Vec<u8>,
    ) -> Result<Commit, StateError> {
        let claim = ClaimRequest::new(key, owner);
        self.store
            .commit(self.scope.clone(), claim, writes, outputs, self.lease)
            .await
    }

    /// Commits a handler's kv `writes` and its outputs as outbox `rows` with `key` (held by
    /// `owner`), in one transaction of the store.
    pub async fn commit_outbox(
        &self,
        key: &str,
        owner: &str,
        writes: Vec<KvWrite>,
        rows: Vec<OutRecord>,
    ) -> Result<Commit, StateError> {
        let claim = ClaimRequest::new(key, owner);
        self.store
            .commit_outbox(self.scope.clone(), claim, writes, rows, self.lease)
            .await
    }

    /// Commits a handler's SQL transaction `txn` with `key` (held by `owner`), its kv
    /// `writes`, and either the kept `outputs` or, in outbox mode, the outbox `rows`. With
    /// `finished` (nothing is left to publish after it) the key may be recorded as done at once
    /// ([`Commit::Done`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_sql(
        &self,
        txn: SqlTxn,
        key: &str,
        owner: &str,
        writes: Vec<KvWrite>,
        outputs: Vec<u8>,
        rows: Vec<OutRecord>,
        finished: bool,
    ) -> Result<Commit, StateError> {
        let claim = ClaimRequest::new(key, owner);
        let done_ttl = finished.then_some(self.ttl);
        txn.commit(
            &self.scope,
            &claim,
            &writes,
            &outputs,
            &rows,
            self.lease,
            done_ttl,
        )
        .await
    }

    /// Records how the messages of `keys` ended, until now + ttl, in one call.
    pub async fn complete(&self, keys: Vec<String>, how: Completion) -> Result<(), StateError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.store
            .complete(self.scope.clone(), keys, self.ttl, how)
            .await
    }

    /// Gives up claims (best effort: an unreleased claim only delays the next claimant until
    /// its lease runs out).
    pub async fn release(&self, claims: Vec<ClaimRequest>) {
        if claims.is_empty() {
            return;
        }
        let release = self.store.release(self.scope.clone(), claims);
        match tokio::time::timeout(Duration::from_secs(2), release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(scope = %self.scope, error = %e, "Releasing claims failed; they run out with their lease");
            }
            Err(_) => {
                tracing::debug!(scope = %self.scope, "Releasing claims timed out; they run out with their lease");
            }
        }
    }
}

async fn batch_claims(
    store: Arc<dyn IdempotencyStore>,
    scope: String,
    lease: Duration,
    mut rx: mpsc::UnboundedReceiver<(ClaimRequest, ClaimReply)>,
) {
    let mut batch = Vec::with_capacity(MAX_CLAIM_BATCH);
    while rx.recv_many(&mut batch, MAX_CLAIM_BATCH).await > 0 {
        let (requests, replies): (Vec<ClaimRequest>, Vec<ClaimReply>) = batch.drain(..).unzip();
        match store.claim(scope.clone(), requests, lease).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::{EmbeddedStore, IdempotencyStore, LocalClaims, MemoryStore};

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
        let lease = Duration::from_secs(30);
        let keys_of = |store: Arc<dyn crate::state::KvStore>, route: &str| {
            DoneKeys::new(
                Arc::new(LocalClaims::new(store)),
                route,
                Duration::from_secs(60),
                lease,
            )
        };
        {
            // The store itself, not DoneKeys: its batcher task would keep the file open until
            // it is next polled.
            let claims = LocalClaims::new(Arc::new(EmbeddedStore::open(&path).unwrap()));
            let scope = "idempotency/orders".to_owned();
            let req = |owner: &str| vec![ClaimRequest::new("k1", owner)];
            assert_eq!(
                claims.claim(scope.clone(), req("a"), lease).await.unwrap(),
                vec![Claim::Claimed]
            );
            claims
                .complete(
                    scope.clone(),
                    vec!["k1".into()],
                    Duration::from_secs(60),
                    Completion::Done,
                )
                .await
                .unwrap();
            assert_eq!(
                claims.claim(scope, req("b"), lease).await.unwrap(),
                vec![Claim::Done]
            );
        }
        let store: Arc<dyn crate::state::KvStore> = Arc::new(EmbeddedStore::open(&path).unwrap());
        let keys = keys_of(store.clone(), "orders");
        assert_eq!(
            keys.claim("k1", "c", false).await.unwrap(),
            Claim::Done,
            "forgotten after reopen"
        );
        // Routes do not see each other's keys.
        let other = keys_of(store, "payments");
        assert_eq!(other.claim("k1", "c", false).await.unwrap(), Claim::Claimed);
    }

    #[tokio::test]
    async fn concurrent_claims_share_calls_and_exclude_each_other() {
        let keys = DoneKeys::new(
            Arc::new(LocalClaims::new(Arc::new(MemoryStore::new()))),
            "r",
            Duration::from_secs(60),
            Duration::from_secs(30),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let keys = keys.clone();
            tasks.spawn(async move {
                keys.claim(&format!("k{}", i % 10), &crate::message::new_owner(), false)
                    .await
            });
        }
        let mut claimed = 0;
        let mut busy = 0;
        while let Some(r) = tasks.join_next().await {
            match r.unwrap().unwrap() {
                Claim::Claimed => claimed += 1,
                Claim::Busy(_) => busy += 1,
                other => panic!("nothing is done: {other:?}"),
            }
        }
        assert_eq!((claimed, busy), (10, 40), "one owner per key");
    }
}
