//! Idempotency for process-local stores (embedded, memory): claims in this process, done records
//! in the kv store.
//!
//! Nothing else can open the same embedded store, so a claim never has to outlive the process: a
//! crash forgets it, and the redelivered message is claimed afresh after the restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{
    Claim, ClaimRequest, Commit, Completion, IdempotencyStore, KvStore, KvWrite, StateError,
};

use crate::message::now_ms;
use futures_util::future::BoxFuture;

/// Value of a done record.
const DONE: &[u8] = b"1";
/// Value of a dead-lettered record.
const DEAD_LETTERED: &[u8] = b"x";
/// First byte of an applied record; the committed outputs follow.
const APPLIED: u8 = b'a';

/// Claims held in memory, done records in a [`KvStore`].
pub struct LocalClaims {
    kv: Arc<dyn KvStore>,
    held: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl std::fmt::Debug for LocalClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClaims").finish_non_exhaustive()
    }
}

impl LocalClaims {
    /// Claims whose done records live in `kv`.
    pub fn new(kv: Arc<dyn KvStore>) -> Self {
        Self {
            kv,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (String, Instant)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StateError::Unavailable(format!("state store task failed: {e}")))?
}

impl IdempotencyStore for LocalClaims {
    fn claim(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claim>, StateError>> {
        Box::pin(async move {
            let now = Instant::now();
            // Take the claims first, so two lanes asking at once cannot both win.
            let mut answers: Vec<Option<Claim>> = {
                let mut held = self.held();
                requests
                    .iter()
                    .map(|r| {
                        let id = (scope.clone(), r.key.clone());
                        match held.get(&id) {
                            Some((owner, until)) if owner != &r.owner && *until > now => {
                                Some(Claim::Busy(*until - now))
                            }
                            _ => {
                                held.insert(id, (r.owner.clone(), now + lease));
                                None
                            }
                        }
                    })
                    .collect()
            };
            let kv = self.kv.clone();
            let (ns, keys) = (scope.clone(), requests.clone());
            let records: Vec<Option<Vec<u8>>> = blocking(move || {
                let now = now_ms();
                keys.iter().map(|r| kv.get(&ns, &r.key, now)).collect()
            })
            .await?;
            let mut held = self.held();
            for ((answer, r), record) in answers.iter_mut().zip(&requests).zip(records) {
                if answer.is_none() {
                    *answer = Some(match record {
                        None => Claim::Claimed,
                        // Applied: the claim is ours, to publish what was committed.
                        Some(mut v) if v.first() == Some(&APPLIED) => {
                            v.remove(0);
                            Claim::Applied(v)
                        }
                        // A replay runs it again; the record stays until its end is recorded.
                        Some(v) if v == DEAD_LETTERED && r.replay => Claim::Claimed,
                        Some(v) if v == DEAD_LETTERED => {
                            held.remove(&(scope.clone(), r.key.clone()));
                            Claim::DeadLettered
                        }
                        Some(_) => {
                            held.remove(&(scope.clone(), r.key.clone()));
                            Claim::Done
                        }
                    });
                }
            }
            Ok(answers.into_iter().flatten().collect())
        })
    }

    fn complete(
        &self,
        scope: String,
        keys: Vec<String>,
        ttl: Duration,
        how: Completion,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            let kv = self.kv.clone();
            let value = match how {
                Completion::Done => DONE,
                Completion::DeadLettered => DEAD_LETTERED,
            };
            let (ns, entries): (String, Vec<(String, Vec<u8>)>) = (
                scope.clone(),
                keys.iter().map(|k| (k.clone(), value.to_vec())).collect(),
            );
            blocking(move || {
                let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                kv.set_many(&ns, &entries, Some(now_ms().saturating_add(ttl)))
            })
            .await?;
            let mut held = self.held();
            for k in keys {
                held.remove(&(scope.clone(), k));
            }
            Ok(())
        })
    }

    fn release(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        let mut held = self.held();
        for r in requests {
            let id = (scope.clone(), r.key);
            if held.get(&id).is_some_and(|(owner, _)| *owner == r.owner) {
                held.remove(&id);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn commit(
        &self,
        scope: String,
        claim: ClaimRequest,
        mut writes: Vec<KvWrite>,
        outputs: Vec<u8>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(async move {
            let id = (scope.clone(), claim.key.clone());
            {
                let mut held = self.held();
                match held.get_mut(&id) {
                    Some((owner, until)) if *owner == claim.owner => {
                        *until = Instant::now() + lease;
                    }
                    _ => return Ok(Commit::LostClaim),
                }
            }
            // A retry of a commit that went through (only this owner can have written it).
            let mut record = Vec::with_capacity(1 + outputs.len());
            record.push(APPLIED);
            record.extend_from_slice(&outputs);
            let (ns, key) = (scope.clone(), claim.key.clone());
            writes.push(KvWrite {
                namespace: scope,
                key: claim.key,
                value: Some(record),
                expires_at_ms: None,
                expected: None,
            });
            let kv = self.kv.clone();
            let failed = blocking(move || {
                // A retry of a commit that went through (only this owner can have written it).
                let already = kv.get(&ns, &key, now_ms())?;
                if already.is_some_and(|v| v.first() == Some(&APPLIED)) {
                    return Ok(None);
                }
                kv.apply_atomically(&writes, now_ms())
            })
            .await?;
            Ok(match failed {
                None => Commit::Committed,
                Some(key) => Commit::Conflict(key),
            })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    #[tokio::test(flavor = "multi_thread")]
    async fn claims_follow_the_shared_rules() {
        let kv: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let store = LocalClaims::new(kv.clone());
        crate::state::conformance::claims::run(&store, kv).await;
    }
}
