//! One live instance of a handler ([`Instance`]) and one call of its `handle`: the deadline and
//! memory cap around it, the logs it produced, and the [`Outcome`] every way it can end in.

use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use crate::deadline::{Deadline, DeadlineExceeded};

use super::bindings::{self, types};
use super::host::{self, CallState, HostState};
use super::outbound::CallContext;
use super::{
    Handler, InboundMessage, Invocation, LogLevel, LogSource, MAX_STDIO_BYTES, Outcome, Staging,
};

/// One live instance of a handler. Reusable across messages until it traps.
pub struct Instance {
    handler: Handler,
    store: Store<HostState>,
    bindings: bindings::Handler,
    calls: u64,
    poisoned: bool,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("handler", &self.handler.name())
            .field("calls", &self.calls)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// A fresh instance, before its first call.
    pub(super) fn new(
        handler: Handler,
        store: Store<HostState>,
        bindings: bindings::Handler,
    ) -> Self {
        Self {
            handler,
            store,
            bindings,
            calls: 0,
            poisoned: false,
        }
    }

    /// Calls `handle` with `message` under the handler's deadline and memory cap.
    ///
    /// Never panics on guest behaviour: every failure is an [`Outcome`]. After a trap, timeout or
    /// memory exhaustion the instance is poisoned and must not be reused.
    pub fn invoke(&mut self, message: &InboundMessage) -> Invocation {
        self.invoke_with(message, false)
    }

    /// Like [`Self::invoke`]; with `stage_kv` the call's kv writes are held back and returned in
    /// [`Invocation::kv_writes`] (for an ok outcome) instead of applied.
    pub fn invoke_with(&mut self, message: &InboundMessage, stage_kv: bool) -> Invocation {
        self.invoke_owned(message.clone(), stage_kv)
    }

    /// Like [`Self::invoke_with`] on a message the caller gives up (its bytes move into the
    /// call instead of being copied first). Blocks this thread (see `blocking.rs`); await
    /// [`Self::invoke_async`] on a runtime thread.
    pub fn invoke_owned(&mut self, message: InboundMessage, stage_kv: bool) -> Invocation {
        let staging = Staging::staged_if(stage_kv);
        super::blocking::block_on(self.invoke_async(message, staging)).unwrap_or_else(|e| {
            Invocation::without_guest(Outcome::Trapped {
                reason: format!("cannot start a runtime to call the handler on: {e}"),
            })
        })
    }

    /// Calls `handle` with `message` under the handler's deadline and memory cap; with a
    /// `staging` other than [`Staging::Direct`] the call's kv writes are held back and
    /// returned in [`Invocation::kv_writes`] (for an ok outcome) instead of applied, and its
    /// statements run in the transaction `staging` brings, if it brings one.
    ///
    /// Never panics on guest behaviour: every failure is an [`Outcome`]. After a trap, timeout or
    /// memory exhaustion the instance is poisoned and must not be reused. Dropping the future
    /// before it ends leaves the instance poisoned too.
    pub async fn invoke_async(&mut self, message: InboundMessage, staging: Staging) -> Invocation {
        let start = Instant::now();
        if self.poisoned {
            return Invocation::without_guest(Outcome::Trapped {
                reason: "instance was poisoned by an earlier trap".into(),
            });
        }
        self.calls += 1;
        let limits = self.handler.inner.env.limits.clone();
        let deadline = Deadline::after_from(start, limits.timeout);
        {
            let data = self.store.data_mut();
            data.call = CallState {
                deadline: Some(deadline),
                reply_to: message.reply_to.clone(),
                kv_txn: staging.is_staged().then(host::KvTxn::default),
                sql: match staging {
                    Staging::Claimed(txn) => Some(*txn),
                    Staging::Direct | Staging::Staged => None,
                },
                ..CallState::default()
            };
            data.memory.hit = false;
            data.http.begin(CallContext {
                deadline,
                key_base: format!("{}\n{}", self.handler.inner.env.name, message.id),
                trace: message
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(crate::message::TRACEPARENT))
                    .and_then(|(_, v)| crate::message::parse_traceparent(v))
                    .map(|(t, f)| (t.to_owned(), f.to_owned())),
            });
        }
        // The next tick checks the deadline (see `Handler::instantiate_async`).
        self.store.set_epoch_deadline(1);
        let wit_message = message.into_wit();
        // Poisoned until the call ends: a future dropped half-way leaves the guest's state
        // undefined.
        self.poisoned = true;
        // A guest waiting in the host past its deadline: the call's future is dropped there,
        // which unwinds the guest's stack and drops what it waited for.
        let result = match deadline
            .bound(self.bindings.call_handle(&mut self.store, &wit_message))
            .await
        {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        };
        self.poisoned = false;
        let elapsed = start.elapsed();

        let data = self.store.data_mut();
        data.http.end();
        let http = std::mem::take(&mut data.http.records);
        let unmatched = data.http.unmatched.take();
        let mut call = std::mem::take(&mut data.call);
        for denial in std::mem::take(&mut data.http.denials) {
            call.push_log(
                limits.max_log_records,
                LogLevel::Warn,
                LogSource::Host,
                &denial,
            );
        }
        for (buffer, source, level) in [
            (&data.stdout, LogSource::Stdout, LogLevel::Info),
            (&data.stderr, LogSource::Stderr, LogLevel::Warn),
        ] {
            let (bytes, dropped) = buffer.take();
            for line in String::from_utf8_lossy(&bytes).lines() {
                call.push_log(limits.max_log_records, level, source, line);
            }
            if dropped > 0 {
                call.push_log(
                    limits.max_log_records,
                    LogLevel::Warn,
                    source,
                    &format!("[{dropped} bytes of output dropped: over {MAX_STDIO_BYTES} bytes]"),
                );
            }
        }

        let outcome = match result {
            Ok(Ok(())) => match call.refused_output.take() {
                Some(reason) => Outcome::Rejected { reason },
                None => Outcome::Ok {
                    outputs: std::mem::take(&mut call.outputs),
                },
            },
            Ok(Err(types::HandlerError::Retry(r))) => Outcome::Retry {
                reason: r.reason,
                after: r.after_ms.map(Duration::from_millis),
            },
            Ok(Err(types::HandlerError::Reject(reason))) => Outcome::Rejected { reason },
            Err(e) => {
                self.poisoned = true;
                let trap = e.downcast_ref::<Trap>().copied();
                if data.memory.hit {
                    Outcome::OutOfMemory {
                        limit_bytes: limits.max_memory_bytes,
                    }
                } else if past_deadline(&e) {
                    Outcome::TimedOut {
                        timeout: limits.timeout,
                    }
                } else if trap == Some(Trap::StackOverflow) {
                    Outcome::Trapped {
                        reason: "stack overflow (call stack exhausted)".into(),
                    }
                } else {
                    Outcome::Trapped {
                        reason: trap_reason(&e),
                    }
                }
            }
        };
        // `lockgate test`: a request the fixture has no stub for fails the message, whatever
        // the handler made of the denial.
        let outcome = match (unmatched, outcome) {
            (
                Some(reason),
                Outcome::Ok { .. } | Outcome::Retry { .. } | Outcome::Rejected { .. },
            ) => Outcome::Rejected { reason },
            (_, outcome) => outcome,
        };
        // A statement failed: the transaction can only roll back, so the message cannot
        // succeed. A serialization failure or a deadlock is worth another attempt.
        let sql = call.sql.take();
        let outcome = match (outcome, sql.as_ref().and_then(|t| t.failed())) {
            (Outcome::Ok { .. }, Some(failed)) if failed.is_transient() => Outcome::Retry {
                reason: format!(
                    "a statement failed ({}); the message runs again",
                    failed.reason
                ),
                after: None,
            },
            (Outcome::Ok { .. }, Some(failed)) => Outcome::Rejected {
                reason: format!(
                    "a statement failed ({}) but the handler returned ok: its transaction cannot commit",
                    failed.reason
                ),
            },
            (outcome, _) => outcome,
        };
        let sql = sql.filter(|_| matches!(outcome, Outcome::Ok { .. }));
        let kv_writes = match (&outcome, call.kv_txn.take()) {
            (Outcome::Ok { .. }, Some(txn)) => Some(txn.into_writes(&self.handler.inner.env.name)),
            (_, Some(_)) => Some(Vec::new()),
            (_, None) => None,
        };
        Invocation {
            outcome,
            logs: call.logs,
            dropped_logs: call.dropped_logs,
            refused_outputs: call.refused_outputs,
            elapsed,
            kv_writes,
            http,
            sql,
        }
    }

    /// Whether the instance trapped and must be discarded.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Number of calls made on this instance.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// The handler this instance belongs to.
    pub fn handler(&self) -> &Handler {
        &self.handler
    }
}

/// Whether `e` ended a call at its deadline: an epoch interrupt while the guest ran wasm, or a
/// host wait cut short while it waited (see [`crate::deadline`]).
pub(super) fn past_deadline(e: &wasmtime::Error) -> bool {
    matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) || e.is::<DeadlineExceeded>()
}

/// One line for an outcome: the trap's own text, plus the innermost guest function that has a
/// name. The full backtrace belongs in debug logs, not in outcomes and DLQ records.
fn trap_reason(e: &wasmtime::Error) -> String {
    let Some(trap) = e.downcast_ref::<Trap>() else {
        return format!("{e:#}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
    };
    let frame = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().find_map(|f| f.func_name()))
        .map(|name| format!(" in `{name}`"))
        .unwrap_or_default();
    format!("{trap}{frame}")
}
