//! What runs a route's handler: the [`Invoker`] trait, its real implementation over an engine
//! [`InstancePool`], the [`Passthrough`] of a relay without a handler, and the [`HandlerSlot`]
//! that hot reload swaps a new version into.

use std::sync::Arc;

use crate::engine::{InboundMessage, InstancePool, Invocation, Outcome};

/// Runs a handler on one message. [`InstancePool`] is the real one; tests and benchmarks plug in
/// native closures.
pub trait Invoker: Send + Sync + 'static {
    /// Handles one message (synchronously: called on a blocking thread).
    fn invoke(&self, message: &InboundMessage) -> Invocation;
    /// Handles one message with its kv writes staged and returned in
    /// [`Invocation::kv_writes`] rather than applied (for a message whose idempotency key is
    /// claimed: they commit with it). Invokers without kv just invoke.
    fn invoke_staged(&self, message: &InboundMessage) -> Invocation {
        self.invoke(message)
    }
    /// [`Self::invoke`] or, with `staged`, [`Self::invoke_staged`], on a message the caller
    /// gives up: an invoker that copies the message into the guest anyway can skip a copy.
    fn invoke_owned(&self, message: InboundMessage, staged: bool) -> Invocation {
        if staged {
            self.invoke_staged(&message)
        } else {
            self.invoke(&message)
        }
    }
    /// The handler's name.
    fn handler_name(&self) -> String;
    /// The version that runs (module hash).
    fn module_hash(&self) -> String;
    /// Live numbers of its instance pool, when it has one.
    fn pool_counters(&self) -> Option<Arc<crate::engine::PoolCounters>> {
        None
    }
    /// Whether this is [`Passthrough`]: messages are published as they are, without a call.
    fn passthrough(&self) -> bool {
        false
    }
    /// Counters of the handler's outbound HTTP requests, when it has a grant.
    fn http_stats(&self) -> Option<Arc<crate::engine::outbound::HttpStats>> {
        None
    }
}

/// The "handler" of an outbox relay without one: every row is published as it is, keeping its
/// topic, key, headers and `lockgate-id`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Passthrough;

impl Invoker for Passthrough {
    fn invoke(&self, message: &InboundMessage) -> Invocation {
        Invocation::without_guest(Outcome::Ok {
            outputs: vec![crate::engine::OutgoingMessage {
                topic: message.topic.clone(),
                key: message.key.clone(),
                headers: message.headers.clone(),
                payload: message.payload.clone(),
            }],
        })
    }
    fn handler_name(&self) -> String {
        "-".to_owned()
    }
    fn module_hash(&self) -> String {
        String::new()
    }
    fn passthrough(&self) -> bool {
        true
    }
}

impl Invoker for InstancePool {
    fn invoke(&self, message: &InboundMessage) -> Invocation {
        InstancePool::invoke(self, message)
    }

    fn http_stats(&self) -> Option<Arc<crate::engine::outbound::HttpStats>> {
        Some(self.handler().env().http.as_ref()?.stats().clone())
    }

    fn invoke_staged(&self, message: &InboundMessage) -> Invocation {
        InstancePool::invoke_with(self, message, true)
    }

    fn invoke_owned(&self, message: InboundMessage, staged: bool) -> Invocation {
        InstancePool::invoke_owned(self, message, staged)
    }

    fn handler_name(&self) -> String {
        self.handler().name().to_owned()
    }

    fn module_hash(&self) -> String {
        self.handler().module_hash().to_owned()
    }

    fn pool_counters(&self) -> Option<Arc<crate::engine::PoolCounters>> {
        Some(self.counters())
    }
}

/// The handler version a route runs, swapped by hot reload. A message pins the version current
/// when it starts and keeps it for all its attempts; the next message gets the new one. The old
/// version is dropped when its last message finishes.
#[derive(Clone)]
pub struct HandlerSlot(Arc<arc_swap::ArcSwap<Arc<dyn Invoker>>>);

impl HandlerSlot {
    /// A slot holding `invoker`.
    pub fn new(invoker: Arc<dyn Invoker>) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(invoker)))
    }

    /// The version new messages get.
    pub fn current(&self) -> Arc<dyn Invoker> {
        Arc::clone(&self.0.load())
    }

    /// Makes `invoker` the version new messages get.
    pub fn swap(&self, invoker: Arc<dyn Invoker>) {
        self.0.store(Arc::new(invoker));
    }
}

impl std::fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HandlerSlot")
            .field(&self.current().module_hash())
            .finish()
    }
}
