//! [`InstancePool`]: hands out instances of one handler by its isolation (reused, or one per
//! message), keeping idle ones warm and counting the live ones.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::Isolation;

use super::{Handler, InboundMessage, Instance, Invocation, Outcome, Staging};

/// Hands out instances of one handler according to its [`Isolation`], keeping idle ones warm.
pub struct InstancePool {
    handler: Handler,
    isolation: Isolation,
    max_messages_per_instance: u64,
    idle: Mutex<Vec<Instance>>,
    counters: Arc<PoolCounters>,
}

/// Live numbers of an [`InstancePool`], for the admin endpoint.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Instances alive now: idle in the pool or running a message.
    pub live: std::sync::atomic::AtomicU64,
    /// Instances created since start.
    pub created: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for InstancePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePool")
            .field("handler", &self.handler.name())
            .field("isolation", &self.isolation)
            .finish_non_exhaustive()
    }
}

impl InstancePool {
    /// A pool for `handler`.
    pub fn new(handler: Handler, isolation: Isolation, max_messages_per_instance: u64) -> Self {
        Self {
            handler,
            isolation,
            max_messages_per_instance: max_messages_per_instance.max(1),
            idle: Mutex::new(Vec::new()),
            counters: Arc::default(),
        }
    }

    /// The pool's live counters (shared: they stay current).
    pub fn counters(&self) -> Arc<PoolCounters> {
        self.counters.clone()
    }

    /// The pool's handler.
    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    /// Runs one message on an instance from the pool. An instantiation failure becomes a
    /// `Trapped` outcome: from the message's point of view the handler failed, retryably.
    pub fn invoke(&self, message: &InboundMessage) -> Invocation {
        self.invoke_with(message, false)
    }

    /// Like [`Self::invoke`], staging kv writes when `stage_kv` (see [`Instance::invoke_with`]).
    pub fn invoke_with(&self, message: &InboundMessage, stage_kv: bool) -> Invocation {
        self.invoke_owned(message.clone(), stage_kv)
    }

    /// Like [`Self::invoke_with`] on a message the caller gives up (no copy before the call).
    /// Blocks this thread (see `blocking.rs`); await [`Self::invoke_async`] on a runtime
    /// thread.
    pub fn invoke_owned(&self, message: InboundMessage, stage_kv: bool) -> Invocation {
        let staging = Staging::staged_if(stage_kv);
        super::blocking::block_on(self.invoke_async(message, staging)).unwrap_or_else(|e| {
            Invocation::without_guest(Outcome::Trapped {
                reason: format!("cannot start a runtime to call the handler on: {e}"),
            })
        })
    }

    /// Runs one message on an instance from the pool, its writes held back as `staging` says
    /// (see [`Instance::invoke_async`]). An instantiation failure becomes a `Trapped` outcome: from
    /// the message's point of view the handler failed, retryably.
    pub async fn invoke_async(&self, message: InboundMessage, staging: Staging) -> Invocation {
        let reused = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut instance = match reused {
            Some(i) => i,
            None => match self.handler.instantiate_async().await {
                Ok(i) => {
                    self.counters.created.fetch_add(1, AtomicOrdering::Relaxed);
                    self.counters.live.fetch_add(1, AtomicOrdering::Relaxed);
                    i
                }
                Err(e) => {
                    return Invocation::without_guest(Outcome::Trapped {
                        reason: e.to_string(),
                    });
                }
            },
        };
        let leased = Leased(&self.counters);
        let invocation = instance.invoke_async(message, staging).await;
        let keep = self.isolation == Isolation::Reuse
            && !instance.is_poisoned()
            && instance.calls() < self.max_messages_per_instance;
        if keep {
            std::mem::forget(leased);
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(instance);
        }
        invocation
    }

    /// Number of idle instances kept warm.
    pub fn idle_instances(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// An instance out of the pool for one call. Unless it goes back to the pool (it is not to be
/// reused, or its call's future was dropped half-way), the instance is gone when this drops:
/// the live count says so.
struct Leased<'a>(&'a PoolCounters);

impl Drop for Leased<'_> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, AtomicOrdering::Relaxed);
    }
}
