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
pub use postgres::{PostgresStore, SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION};
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

/// One suite every backend must pass; public so the integration tests run it against real Redis
/// and PostgreSQL servers. Panics on the first broken rule.
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub mod conformance {
    use super::KvStore;

    const T0: u64 = 1_000_000;

    /// Runs the shared semantics checks against `store` (which must be empty). Call it from a
    /// blocking thread: network backends block on their runtime.
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

        // set_many writes every entry with the one expiry
        store
            .set_many(
                "m",
                &[("x".into(), b"1".to_vec()), ("y".into(), b"2".to_vec())],
                Some(T0 + 50),
            )
            .unwrap();
        assert_eq!(store.get("m", "y", T0).unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(store.get("m", "x", T0 + 50).unwrap(), None);

        // binary values and keys with separators survive unchanged
        let bin: Vec<u8> = (0..=255).collect();
        store.set("h:x", "y:z/é", &bin, None).unwrap();
        assert_eq!(store.get("h:x", "y:z/é", T0).unwrap(), Some(bin));
        assert_eq!(store.get("h", "x:y:z/é", T0).unwrap(), None);
    }
}

/// One suite every [`IdempotencyStore`] must pass (the integration tests run it against real
/// Redis and PostgreSQL). Panics on the first broken rule. The store must be empty.
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub mod claims_conformance {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Claim, ClaimRequest, Commit, Completion, IdempotencyStore, KvStore, KvWrite};

    use crate::message::now_ms;

    const LEASE: Duration = Duration::from_secs(30);

    fn req(key: &str, owner: &str) -> ClaimRequest {
        ClaimRequest::new(key, owner)
    }

    fn replay(key: &str, owner: &str) -> ClaimRequest {
        ClaimRequest {
            replay: true,
            ..ClaimRequest::new(key, owner)
        }
    }

    async fn claim_one(store: &dyn IdempotencyStore, scope: &str, r: ClaimRequest) -> Claim {
        let mut v = store.claim(scope.into(), vec![r], LEASE).await.unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    async fn claim(store: &dyn IdempotencyStore, scope: &str, key: &str, owner: &str) -> Claim {
        claim_one(store, scope, req(key, owner)).await
    }

    /// Polls until `key` can be claimed by a new owner; panics after 10 s. Returns how long it
    /// took.
    async fn until_claimable(store: &dyn IdempotencyStore, scope: &str, key: &str) -> Duration {
        let start = Instant::now();
        loop {
            match claim(store, scope, key, "poller").await {
                Claim::Claimed => return start.elapsed(),
                other => assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{key} still {other:?} after 10 s"
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn write(key: &str, value: Option<&[u8]>, expected: Option<Option<&[u8]>>) -> KvWrite {
        KvWrite {
            namespace: "h".into(),
            key: key.into(),
            value: value.map(<[u8]>::to_vec),
            expires_at_ms: None,
            expected: expected.map(|e| e.map(<[u8]>::to_vec)),
        }
    }

    async fn kv_get(kv: &Arc<dyn KvStore>, key: &str) -> Option<Vec<u8>> {
        let (kv, key) = (kv.clone(), key.to_owned());
        tokio::task::spawn_blocking(move || kv.get("h", &key, now_ms()).unwrap())
            .await
            .unwrap()
    }

    /// Runs the checks; `kv` is the same backend's kv side (namespace `h` must be empty).
    pub async fn run(store: &dyn IdempotencyStore, kv: Arc<dyn KvStore>) {
        let s = "idempotency/r";
        assert_eq!(claim(store, s, "k1", "o1").await, Claim::Claimed);
        match claim(store, s, "k1", "o2").await {
            Claim::Busy(d) => assert!(d <= LEASE && d > Duration::ZERO, "{d:?}"),
            other => panic!("a live claim must make others wait, got {other:?}"),
        }
        // The holder may ask again (a retry of its own request).
        assert_eq!(claim(store, s, "k1", "o1").await, Claim::Claimed);
        // Only the holder can release.
        store
            .release(s.into(), vec![req("k1", "o2")])
            .await
            .unwrap();
        assert!(matches!(claim(store, s, "k1", "o2").await, Claim::Busy(_)));
        store
            .release(s.into(), vec![req("k1", "o1")])
            .await
            .unwrap();
        assert_eq!(claim(store, s, "k1", "o2").await, Claim::Claimed);
        // Done is done for everyone, the holder included.
        store
            .complete(
                s.into(),
                vec!["k1".into()],
                Duration::from_secs(60),
                Completion::Done,
            )
            .await
            .unwrap();
        assert_eq!(claim(store, s, "k1", "o3").await, Claim::Done);
        assert_eq!(claim(store, s, "k1", "o2").await, Claim::Done);
        // Releasing a done key leaves it done.
        store
            .release(s.into(), vec![req("k1", "o2")])
            .await
            .unwrap();
        assert_eq!(claim(store, s, "k1", "o4").await, Claim::Done);
        // Scopes are separate.
        assert_eq!(
            claim(store, "idempotency/other", "k1", "o1").await,
            Claim::Claimed
        );

        // Many keys in one call, answers in order; a key asked twice is claimed once.
        let answers = store
            .claim(
                s.into(),
                vec![
                    req("b1", "x"),
                    req("k1", "x"),
                    req("b2", "x"),
                    req("b1", "y"),
                ],
                LEASE,
            )
            .await
            .unwrap();
        assert_eq!(answers.len(), 4);
        assert_eq!(answers[0], Claim::Claimed);
        assert_eq!(answers[1], Claim::Done);
        assert_eq!(answers[2], Claim::Claimed);
        assert!(matches!(answers[3], Claim::Busy(_)), "{:?}", answers[3]);
        store
            .complete(
                s.into(),
                vec!["b1".into(), "b2".into()],
                LEASE,
                Completion::Done,
            )
            .await
            .unwrap();
        assert_eq!(claim(store, s, "b2", "z").await, Claim::Done);

        // A crashed holder's lease runs out.
        let lease = Duration::from_millis(300);
        let got = store
            .claim(s.into(), vec![req("l1", "crashed")], lease)
            .await
            .unwrap();
        assert_eq!(got, vec![Claim::Claimed]);
        let waited = until_claimable(store, s, "l1").await;
        assert!(
            waited >= lease / 2,
            "claimable after {waited:?}, lease {lease:?}"
        );

        // Done records expire with their TTL.
        store
            .complete(
                s.into(),
                vec!["t1".into()],
                Duration::from_millis(300),
                Completion::Done,
            )
            .await
            .unwrap();
        assert_eq!(claim(store, s, "t1", "o").await, Claim::Done);
        until_claimable(store, s, "t1").await;

        dead_letters(store).await;
        commits(store, &kv).await;
    }

    /// A dead-lettered key: redeliveries are skipped, a replay may claim it again (once: its
    /// success makes the key done), a replay of a key that succeeded is a duplicate.
    async fn dead_letters(store: &dyn IdempotencyStore) {
        let s = "idempotency/d";
        let ttl = Duration::from_secs(60);
        assert_eq!(claim(store, s, "x1", "o1").await, Claim::Claimed);
        store
            .complete(s.into(), vec!["x1".into()], ttl, Completion::DeadLettered)
            .await
            .unwrap();
        assert_eq!(claim(store, s, "x1", "o2").await, Claim::DeadLettered);
        assert_eq!(
            claim_one(store, s, replay("x1", "r1")).await,
            Claim::Claimed
        );
        // While the replay holds it, everyone else waits (a second replay copy included).
        assert!(matches!(claim(store, s, "x1", "o3").await, Claim::Busy(_)));
        assert!(matches!(
            claim_one(store, s, replay("x1", "r2")).await,
            Claim::Busy(_)
        ));
        // The replay failed again: dead-lettered again, and a later replay may run it.
        store
            .complete(s.into(), vec!["x1".into()], ttl, Completion::DeadLettered)
            .await
            .unwrap();
        assert_eq!(claim(store, s, "x1", "o4").await, Claim::DeadLettered);
        assert_eq!(
            claim_one(store, s, replay("x1", "r3")).await,
            Claim::Claimed
        );
        // A released replay claim leaves the key claimable, by a replay or anyone.
        store
            .release(s.into(), vec![replay("x1", "r3")])
            .await
            .unwrap();
        assert_eq!(
            claim_one(store, s, replay("x1", "r4")).await,
            Claim::Claimed
        );
        store
            .complete(s.into(), vec!["x1".into()], ttl, Completion::Done)
            .await
            .unwrap();
        // Succeeded: done for redeliveries and replays alike.
        assert_eq!(claim(store, s, "x1", "o5").await, Claim::Done);
        assert_eq!(claim_one(store, s, replay("x1", "r5")).await, Claim::Done);
        // A replay of a key never seen is an ordinary claim; many keys mix in one call.
        let answers = store
            .claim(
                s.into(),
                vec![replay("x2", "m"), req("x1", "m"), replay("x3", "m")],
                LEASE,
            )
            .await
            .unwrap();
        assert_eq!(answers, vec![Claim::Claimed, Claim::Done, Claim::Claimed]);
        store
            .complete(
                s.into(),
                vec!["x2".into(), "x3".into()],
                ttl,
                Completion::DeadLettered,
            )
            .await
            .unwrap();
        let answers = store
            .claim(s.into(), vec![req("x2", "n"), replay("x3", "n")], LEASE)
            .await
            .unwrap();
        assert_eq!(answers, vec![Claim::DeadLettered, Claim::Claimed]);
    }

    async fn commits(store: &dyn IdempotencyStore, kv: &Arc<dyn KvStore>) {
        let s = "idempotency/c";
        let commit = |key: &str, owner: &str, writes: Vec<KvWrite>, out: &[u8], lease| {
            store.commit(s.into(), req(key, owner), writes, out.to_vec(), lease)
        };
        // Effects and the applied mark, together; a retried commit is harmless.
        assert_eq!(claim(store, s, "c1", "o1").await, Claim::Claimed);
        let w = vec![
            write("x", Some(b"1"), Some(None)),
            write("blind", Some(b"b"), None),
        ];
        assert_eq!(
            commit("c1", "o1", w.clone(), b"out1", LEASE).await.unwrap(),
            Commit::Committed
        );
        assert_eq!(kv_get(kv, "x").await.as_deref(), Some(&b"1"[..]));
        assert_eq!(kv_get(kv, "blind").await.as_deref(), Some(&b"b"[..]));
        assert_eq!(
            commit("c1", "o1", w, b"out1", LEASE).await.unwrap(),
            Commit::Committed
        );
        // Applied and leased: others wait, and cannot commit.
        assert!(matches!(claim(store, s, "c1", "o2").await, Claim::Busy(_)));
        assert_eq!(
            commit("c1", "o2", vec![], b"", LEASE).await.unwrap(),
            Commit::LostClaim
        );
        assert_eq!(
            commit("never-claimed", "o2", vec![], b"", LEASE)
                .await
                .unwrap(),
            Commit::LostClaim
        );
        store
            .complete(s.into(), vec!["c1".into()], LEASE, Completion::Done)
            .await
            .unwrap();
        assert_eq!(claim(store, s, "c1", "o2").await, Claim::Done);

        // A failed expectation applies nothing, not even the writes before it.
        assert_eq!(claim(store, s, "c2", "o1").await, Claim::Claimed);
        let w = vec![
            write("y", Some(b"1"), None),
            write("x", Some(b"2"), Some(Some(b"0"))),
        ];
        assert_eq!(
            commit("c2", "o1", w, b"", LEASE).await.unwrap(),
            Commit::Conflict("x".into())
        );
        assert_eq!(kv_get(kv, "y").await, None);
        assert_eq!(kv_get(kv, "x").await.as_deref(), Some(&b"1"[..]));
        // Expectations that hold: replace, delete, absent-and-stays-absent.
        let w = vec![
            write("x", Some(b"2"), Some(Some(b"1"))),
            write("blind", None, Some(Some(b"b"))),
            write("nothing", None, Some(None)),
        ];
        assert_eq!(
            commit("c2", "o1", w, b"", LEASE).await.unwrap(),
            Commit::Committed
        );
        assert_eq!(kv_get(kv, "x").await.as_deref(), Some(&b"2"[..]));
        assert_eq!(kv_get(kv, "blind").await, None);

        // A holder that crashed after committing: after its lease, the next claimant gets the
        // committed outputs instead of running the handler again.
        let lease = Duration::from_millis(300);
        let got = store
            .claim(s.into(), vec![req("c3", "crashed")], lease)
            .await
            .unwrap();
        assert_eq!(got, vec![Claim::Claimed]);
        assert_eq!(
            commit(
                "c3",
                "crashed",
                vec![write("z", Some(b"1"), None)],
                b"out\x003|:",
                lease
            )
            .await
            .unwrap(),
            Commit::Committed
        );
        assert!(matches!(
            claim(store, s, "c3", "next").await,
            Claim::Busy(_)
        ));
        let start = Instant::now();
        let outputs = loop {
            match claim(store, s, "c3", "next").await {
                Claim::Applied(out) => break out,
                Claim::Busy(_) => {}
                other => panic!("expected the committed outputs, got {other:?}"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "lease never ran out"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(outputs, b"out\x003|:");
        // The taker holds it now.
        assert!(matches!(
            claim(store, s, "c3", "third").await,
            Claim::Busy(_)
        ));
        assert_eq!(
            claim(store, s, "c3", "next").await,
            Claim::Applied(b"out\x003|:".to_vec())
        );
    }
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
