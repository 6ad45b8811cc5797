//! What runs a route's handler: the [`Invoker`] trait, its real implementation over an engine
//! [`InstancePool`], the [`Passthrough`] of a relay without a handler, and the [`HandlerSlot`]
//! that hot reload swaps a new version into.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use crate::engine::{InboundMessage, InstancePool, Invocation, Outcome, SqlGrant, Staging};

/// Runs a handler on one message. [`InstancePool`] is the real one; tests and benchmarks plug in
/// native closures.
///
/// The pipeline calls [`Self::call`]. A native invoker implements the synchronous methods, which
/// may block, and `call` runs them on a blocking thread; [`InstancePool`] answers `call` with
/// the guest's asynchronous call, on the caller's task.
pub trait Invoker: Send + Sync + 'static {
    /// Handles one message (synchronously: may block).
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
    /// [`Self::invoke_owned`] as a future: the pipeline's call, its writes held back as
    /// `staging` says. The default runs it on a blocking thread, in the caller's span (a
    /// native invoker runs no SQL: a transaction in `staging` rolls back).
    fn call(
        self: Arc<Self>,
        message: InboundMessage,
        staging: Staging,
    ) -> BoxFuture<'static, Invocation> {
        let staged = staging.is_staged();
        drop(staging);
        let span = tracing::Span::current();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| self.invoke_owned(message, staged))
            })
            .await
            .unwrap_or_else(|e| {
                Invocation::without_guest(Outcome::Trapped {
                    reason: format!("handler task failed: {e}"),
                })
            })
        })
    }
    /// Whether [`Self::call`] is the default one (the synchronous methods, which may block, on
    /// a blocking thread): the pipeline then runs several calls in one blocking section where
    /// it can.
    fn blocks(&self) -> bool {
        true
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
    /// The handler's `sql` grant, when it has one, with the handler's call timeout (the
    /// longest a statement of a call may run).
    fn sql_grant(&self) -> Option<(&SqlGrant, Duration)> {
        None
    }
}

/// Calls `invoker` on `message`, in the current span (what the guest does, HTTP requests and
/// SQL statements, opens spans inside it). A panic in the call (a bug of the host, or of a
/// native invoker) fails this message as a trap instead of the route's task.
pub(crate) async fn call(
    invoker: &Arc<dyn Invoker>,
    message: InboundMessage,
    staging: Staging,
) -> Invocation {
    let call = invoker.clone().call(message, staging);
    AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Invocation::without_guest(Outcome::Trapped {
                reason: format!("handler task failed: panicked: {what}"),
            })
        })
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

    fn call(
        self: Arc<Self>,
        message: InboundMessage,
        staging: Staging,
    ) -> BoxFuture<'static, Invocation> {
        Box::pin(async move { self.invoke_async(message, staging).await })
    }

    fn sql_grant(&self) -> Option<(&SqlGrant, Duration)> {
        let env = self.handler().env();
        Some((env.sql.as_ref()?, env.limits.timeout))
    }

    fn blocks(&self) -> bool {
        false
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
