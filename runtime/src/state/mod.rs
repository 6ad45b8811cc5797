//! Persistent state behind two traits: guest key-value data ([`KvStore`]) and idempotency keys
//! ([`IdempotencyStore`]).
//!
//! Backends: [`MemoryStore`] for `lockgate test` and unit tests, [`EmbeddedStore`] (redb, one file
//! in the state directory) as the default for `lockgate run`, and the shared stores
//! [`RedisStore`] and [`PostgresStore`] for routes that run on several processes.
//!
//! Semantics every backend keeps: keys live in a namespace (the handler's name); an entry with an
//! expiry is invisible from that instant on; compare-and-swap compares against the *visible* value,
//! so an expired entry compares equal to "absent".
//!
//! Idempotency is a claim, not a lookup: before a handler runs for a key, the route claims the key
//! with a lease; a second claimant (another lane, another process) meets the live claim and waits
//! instead of running the handler concurrently. When the message is done the key becomes *done*
//! for the route's TTL; a crashed claimant's lease runs out and the key can be claimed again.
//!
//! A message that was dead-lettered leaves its key *dead-lettered*, not done: a redelivery of
//! it is still skipped, but a replayed copy (`lockgate dlq replay`, a [`ClaimRequest::replay`])
//! may claim the key again and run the fixed handler. Its success makes the key done, so the
//! key is re-opened once per failure, never for a message that succeeded.

#[doc(hidden)]
pub mod conformance;
mod embedded;
pub mod kept_outputs;
mod local;
mod memory;
mod postgres;
pub mod probe;
mod redis;

pub use embedded::EmbeddedStore;
pub use local::LocalClaims;
pub use memory::MemoryStore;
pub use postgres::{
    PostgresStore, SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION, SqlFailure, SqlStatementError,
    SqlTxn, TxnClaim,
};
pub use redis::RedisStore;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::message::OutRecord;

/// Errors from a state backend.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StateError {
    /// The backend failed (I/O, corruption, unreachable). Retrying later may succeed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store's settings are wrong (a URL that does not parse, a bad schema name).
    #[error("{0}")]
    Config(String),
    /// The guest call this operation ran for reached its deadline before the store answered
    /// (see [`crate::deadline`]); the operation may or may not have taken effect.
    #[error("state store did not answer before the call's deadline")]
    DeadlineExceeded,
}

/// What a claim on an idempotency key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the key until its lease ends: run the handler.
    Claimed,
    /// The caller holds the key, whose handler already ran and whose kv effects are committed
    /// (a holder crashed before publishing): publish these outputs (as encoded by the
    /// committer) and complete the key; do not run the handler again.
    Applied(Vec<u8>),
    /// The key is recorded as done: the message is a duplicate.
    Done,
    /// The key's message was dead-lettered and this request is not a replay: a redelivery of a
    /// dead letter, skipped like a duplicate.
    DeadLettered,
    /// Someone else holds a live claim; ask again after at most this long.
    Busy(Duration),
}

/// One key to claim, for one holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The idempotency key.
    pub key: String,
    /// Who claims it: unique per message handling, so two lanes of one process exclude each
    /// other as two processes do.
    pub owner: String,
    /// The message is a replayed dead letter: a key recorded as dead-lettered may be claimed
    /// again. Read by [`IdempotencyStore::claim`] only.
    pub replay: bool,
}

impl ClaimRequest {
    /// A request for `key` by `owner` that is not a replay.
    pub fn new(key: impl Into<String>, owner: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            owner: owner.into(),
            replay: false,
        }
    }
}

/// How a message whose key is recorded ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Handled: its effects happened. Every later message with the key is a duplicate.
    Done,
    /// Dead-lettered: a redelivery is skipped, a replayed copy may run again.
    DeadLettered,
}

/// One kv write an invocation staged, applied when its message commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvWrite {
    /// The handler's namespace.
    pub namespace: String,
    /// The key.
    pub key: String,
    /// The new value; `None` deletes.
    pub value: Option<Vec<u8>>,
    /// Expiry of the new value, ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// The visible value the handler read before writing (`Some(None)`: it saw no entry); the
    /// write applies only if that is still the visible value. `None` for a blind write.
    pub expected: Option<Option<Vec<u8>>>,
}

/// How committing a message's effects went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Effects applied and the key marked applied, atomically (or it already was, by this
    /// owner).
    Committed,
    /// Effects applied and the key recorded as done, atomically: nothing was left to publish,
    /// so the commit recorded it at once (`SqlTxn::commit` with a done TTL).
    Done,
    /// A key the handler read changed before the commit: nothing was applied; run the handler
    /// again.
    Conflict(String),
    /// The caller no longer holds the claim (its lease ran out and another holder took it):
    /// nothing was applied.
    LostClaim,
}

/// The idempotency keys of routes: claims with a lease, then done records with a TTL.
///
/// Every method takes many keys, so a backend can serve the messages in flight in one round trip.
/// A `scope` is one route's key space (`idempotency/<route>`).
pub trait IdempotencyStore: Send + Sync + 'static {
    /// The PostgreSQL store this is, if it is one: a handler whose `sql` runs on the same
    /// store claims its message's key inside its own transaction
    /// ([`PostgresStore::begin_claimed`]).
    fn as_postgres(&self) -> Option<&PostgresStore> {
        None
    }

    /// Claims each key for `lease` unless it is done, dead-lettered (and the request is not a
    /// replay) or held live by another owner. Answers in request order. A key requested twice
    /// in one call is claimed at most once.
    fn claim(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claim>, StateError>>;

    /// Records how the messages of `keys` ended, for `ttl` (whoever holds them: the effect, or
    /// the dead letter, happened).
    fn complete(
        &self,
        scope: String,
        keys: Vec<String>,
        ttl: Duration,
        how: Completion,
    ) -> BoxFuture<'_, Result<(), StateError>>;

    /// Drops claims that are still held by their owner and not done or applied (a message
    /// abandoned at shutdown), so the next claimant need not wait for the lease.
    fn release(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
    ) -> BoxFuture<'_, Result<(), StateError>>;

    /// Atomically: checks that `owner` holds `key`, checks every write's expectation, applies
    /// the writes and marks the key *applied* with `outputs` (kept until [`Self::complete`]),
    /// its lease renewed. All or nothing.
    fn commit(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<KvWrite>,
        outputs: Vec<u8>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Commit, StateError>>;

    /// Like [`Self::commit`], but the outputs become `rows` of the store's outbox table in the
    /// same transaction (each keeping its `lockgate-id`, a row already holding that id is not
    /// written again), and the key is marked applied with no outputs to publish. Only stores
    /// with an outbox table (PostgreSQL) can.
    fn commit_outbox(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<KvWrite>,
        rows: Vec<OutRecord>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Commit, StateError>> {
        let _ = (scope, claim, writes, rows, lease);
        Box::pin(async {
            Err(StateError::Config(
                "this state store has no outbox table (outputs.mode = \"outbox\" needs PostgreSQL)"
                    .into(),
            ))
        })
    }
}

/// A configured state store: guest kv and idempotency keys, from one backend.
#[derive(Clone)]
pub struct StateStore {
    /// `embedded`, or the `[stores.<name>]` table it came from.
    pub name: String,
    /// Guest kv.
    pub kv: Arc<dyn KvStore>,
    /// Idempotency keys.
    pub idempotency: Arc<dyn IdempotencyStore>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl StateStore {
    /// A shared store (Redis, PostgreSQL): one backend serves both kv and idempotency.
    pub fn shared<T: KvStore + IdempotencyStore>(name: &str, store: Arc<T>) -> Self {
        Self {
            name: name.to_owned(),
            kv: store.clone(),
            idempotency: store,
        }
    }

    /// A process-local store (embedded or memory): claims live in this process, done records in
    /// `kv`.
    pub fn local(name: &str, kv: Arc<dyn KvStore>) -> Self {
        Self {
            name: name.to_owned(),
            idempotency: Arc::new(LocalClaims::new(kv.clone())),
            kv,
        }
    }
}

/// A key-value store shared by every handler of a process, namespaced per handler.
///
/// Methods are synchronous, and block on disk or network I/O unless [`Self::blocks`] says they
/// never do: a guest's call, which runs on a runtime thread, moves them to a blocking thread
/// (`engine/host.rs`); network backends bridge to async internally.
pub trait KvStore: Send + Sync + 'static {
    /// Whether a call may wait on disk or a network. One that never does (memory) is made
    /// where it is asked, without a hand-off to a blocking thread.
    fn blocks(&self) -> bool {
        true
    }

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

    /// Applies `writes`, each checked against its expectation at `now_ms`, in one atomic step;
    /// returns the key of the first failed expectation, having applied nothing. Process-local backends implement it; the shared ones commit
    /// through [`IdempotencyStore::commit`] instead.
    fn apply_atomically(
        &self,
        writes: &[KvWrite],
        now_ms: u64,
    ) -> Result<Option<String>, StateError> {
        let _ = (writes, now_ms);
        Err(StateError::Unavailable(
            "this store cannot apply writes atomically".into(),
        ))
    }

    /// Stores every `(key, value)` with one expiry; backends that can do it in one write
    /// transaction (one fsync) override this.
    fn set_many(
        &self,
        namespace: &str,
        entries: &[(String, Vec<u8>)],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        for (k, v) in entries {
            self.set(namespace, k, v, expires_at_ms)?;
        }
        Ok(())
    }
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
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::deadline::Deadline;

    /// A guest's kv call to a network store that accepts the connection and never answers (a
    /// listener nobody reads: the kernel completes the handshake) ends at the call's deadline,
    /// not after the store's own connection and response timeouts (seconds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn network_store_calls_end_at_the_current_deadline() {
        const TIMEOUT: Duration = Duration::from_millis(200);
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        let stores: [(&str, Arc<dyn KvStore>); 2] = [
            (
                "redis",
                Arc::new(RedisStore::new(&format!("redis://{addr}"), "t").expect("redis")),
            ),
            (
                "postgres",
                Arc::new(
                    PostgresStore::new(&format!("postgres://u@{addr}/db"), "t", 1)
                        .expect("postgres"),
                ),
            ),
        ];
        for (name, store) in stores {
            let (result, took) = tokio::task::spawn_blocking(move || {
                let start = Instant::now();
                let result = Deadline::at(start + TIMEOUT)
                    .scope(|| store.get("h", "k", crate::message::now_ms()));
                (result, start.elapsed())
            })
            .await
            .expect("no panic");
            assert!(
                matches!(result, Err(StateError::DeadlineExceeded)),
                "{name}: {result:?} after {took:?}"
            );
            assert!(took >= TIMEOUT, "{name}: gave up early, after {took:?}");
            assert!(
                took <= TIMEOUT + Duration::from_millis(50),
                "{name}: ended {took:?} after the call began"
            );
        }
        drop(silent);
    }
}
