//! The synchronous forms of the engine's calls ([`super::Instance::invoke`],
//! [`super::Handler::instantiate`], ...): they block on [`GUEST_IO`], for callers outside any
//! runtime (the CLI's `test` and `check`, a hot reload's check on a blocking thread, tests and
//! benches). The pipeline awaits the asynchronous forms instead, on its own runtime.

use std::future::Future;

/// The runtime the synchronous forms block on: what a call waits for (outbound requests and
/// their connections, timers of sleeps, the deadline's own timer) runs on it.
///
/// It has one worker thread, on purpose. The caller's thread polls the call (`block_on` of a
/// multi-thread runtime runs the future on the calling thread); what it waits for runs as tasks
/// on the worker. With one worker a request is one hand-off to it and one back, and the
/// request's connection task runs on the same worker as the request; with a worker per core,
/// tokio also wakes idle workers to steal the newly runnable tasks, which on a small machine
/// costs more than the request (BENCHMARKS.md, "Outbound HTTP from a handler").
static GUEST_IO: std::sync::LazyLock<Option<tokio::runtime::Runtime>> =
    std::sync::LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lockgate-guest-io")
            .enable_all()
            .build()
            .inspect_err(
                |e| tracing::warn!(error = %e, "no guest I/O runtime: each call starts its own"),
            )
            .ok()
    });

/// Runs `call` to completion on [`GUEST_IO`], blocking this thread; `Err` when no runtime
/// could be started for it (no thread left).
///
/// # Panics
///
/// When called on a thread that is running asynchronous tasks (a tokio worker): await the
/// asynchronous form there. Every synchronous caller in lockgate is a plain thread or a
/// `spawn_blocking` one.
pub(crate) fn block_on<F: Future>(call: F) -> std::io::Result<F::Output> {
    match GUEST_IO.as_ref() {
        Some(rt) => Ok(rt.block_on(call)),
        // No thread could be started for it: a runtime on this thread alone, for this call.
        None => Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(call)),
    }
}
