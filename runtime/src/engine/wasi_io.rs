//! `wasi:io/poll` and `wasi:io/streams` with every blocking function bounded by the call's
//! deadline.
//!
//! Every WASI p2 wait of a guest ends in one of these functions: a sleep (`std::thread::sleep`,
//! Python's `time.sleep`) blocks on a monotonic-clock pollable, a read of stdin or a socket is
//! `blocking-read` or a poll of the stream's pollable, and so are the waits of outbound HTTP
//! (wasmtime-wasi-http's future responses and bodies are pollables and streams of the same
//! interfaces). wasmtime-wasi's synchronous bindings run them with `in_tokio`, which blocks the
//! thread until the future is ready; epoch interruption cannot reach a guest parked there. So
//! after the rest of WASI is linked, [`shadow`] replaces these two interfaces with the
//! implementations below: the non-blocking functions delegate to wasmtime-wasi's, and the
//! blocking ones run wasmtime-wasi's async implementation under [`Deadline::bound`]. When the
//! deadline passes, the function traps with [`DeadlineExceeded`]; the engine reports the call as
//! `timed_out` and discards the instance (the wait was abandoned half-way, so the stream's state
//! is not to be trusted any more).
//!
//! A wait that starts after the deadline traps at once, so a guest looping on waits that return
//! immediately (reading a closed stdin) ends at its deadline even when the epoch ticker is late.
//! The wrapping costs one clock read per blocking call that is ready at once (a guest's `print`
//! is a `blocking-write-and-flush` to the captured stdout); only a wait that is not sets a timer.

use std::future::Future;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::io::{poll as async_poll, streams as async_streams};
use wasmtime_wasi::p2::bindings::sync::io::poll::{self, Pollable};
use wasmtime_wasi::p2::bindings::sync::io::streams::{self, InputStream, OutputStream};
use wasmtime_wasi::p2::{StreamError, StreamResult};
use wasmtime_wasi::runtime::in_tokio;

use super::host::HostState;
use crate::deadline::{Deadline, DeadlineExceeded};

/// The runtime of every guest's host waits and of what they wait for (outbound requests and
/// their connections, timers of sleeps, the deadline's own timer), entered around each call and
/// instantiation with [`enter`].
///
/// It has one worker thread, on purpose. A guest blocks its own thread while it waits; what it
/// waits for runs as tasks on this runtime. With one worker, a request is one hand-off to that
/// worker and one back, and the request's connection task runs on the same worker as the
/// request; on a runtime with a worker per core, tokio also wakes idle workers to steal the
/// newly runnable tasks, which on a small machine cost more than the request (measured in
/// BENCHMARKS.md, "Outbound HTTP from a handler"). The work on it is I/O, not computation: the
/// guests' own computation runs on their own threads.
static GUEST_IO: std::sync::LazyLock<Option<tokio::runtime::Runtime>> =
    std::sync::LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lockgate-guest-io")
            .enable_all()
            .build()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no guest I/O runtime: guest waits use the caller's")
            })
            .ok()
    });

/// Makes the guest I/O runtime the current one until the guard is dropped: wasmtime-wasi's
/// synchronous bindings block on it and spawn on it. `None` when it could not be started
/// (no thread left): waits then run on the caller's runtime or wasmtime-wasi's, as before.
pub(crate) fn enter() -> Option<tokio::runtime::EnterGuard<'static>> {
    GUEST_IO.as_ref().map(tokio::runtime::Runtime::enter)
}

/// Replaces wasmtime-wasi's `wasi:io/poll` and `wasi:io/streams` in `linker` with the bounded
/// ones. Call it after every other `add_to_linker` that brings these interfaces (wasmtime-wasi's,
/// and wasmtime-wasi-http's when it is linked), or the later one wins again.
///
/// The names are the same as wasmtime-wasi's (`wasi:io/poll@0.2.12`, ...), so a guest that
/// imports any older 0.2.x version resolves to these through the linker's semver matching,
/// exactly as it resolved to the originals.
pub(crate) fn shadow(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let added = poll::add_to_linker::<HostState, BoundedIo>(linker, bounded_view)
        .and_then(|()| streams::add_to_linker::<HostState, BoundedIo>(linker, bounded_view));
    // Anything linked later must not replace a name by accident.
    linker.allow_shadowing(false);
    added
}

fn bounded_view(state: &mut HostState) -> BoundedTable<'_> {
    BoundedTable {
        deadline: state.call.deadline(),
        table: &mut state.table,
    }
}

/// The `HasData` marker for [`BoundedTable`].
struct BoundedIo;

impl HasData for BoundedIo {
    type Data<'a> = BoundedTable<'a>;
}

/// The instance's resource table, with the deadline of the call running now.
struct BoundedTable<'a> {
    table: &'a mut ResourceTable,
    deadline: Deadline,
}

/// Blocks on `wait` the way wasmtime-wasi's synchronous bindings do, but no longer than until
/// `deadline`.
fn block<F: Future>(deadline: Deadline, wait: F) -> Result<F::Output, DeadlineExceeded> {
    in_tokio(deadline.bound(wait))
}

/// [`block`] for a function whose error can carry a trap.
fn block_wasm<T>(
    deadline: Deadline,
    wait: impl Future<Output = wasmtime::Result<T>>,
) -> wasmtime::Result<T> {
    block(deadline, wait)?
}

/// [`block`] for a stream function: running out of time is a trap, not a stream error the guest
/// could handle and carry on after.
fn block_stream<T>(
    deadline: Deadline,
    wait: impl Future<Output = StreamResult<T>>,
) -> StreamResult<T> {
    block(deadline, wait).map_err(|e| StreamError::Trap(e.into()))?
}

impl poll::Host for BoundedTable<'_> {
    fn poll(&mut self, pollables: Vec<Resource<Pollable>>) -> wasmtime::Result<Vec<u32>> {
        block_wasm(
            self.deadline,
            async_poll::Host::poll(&mut *self.table, pollables),
        )
    }
}

impl poll::HostPollable for BoundedTable<'_> {
    fn ready(&mut self, pollable: Resource<Pollable>) -> wasmtime::Result<bool> {
        poll::HostPollable::ready(&mut *self.table, pollable)
    }

    fn block(&mut self, pollable: Resource<Pollable>) -> wasmtime::Result<()> {
        block_wasm(
            self.deadline,
            async_poll::HostPollable::block(&mut *self.table, pollable),
        )
    }

    fn drop(&mut self, pollable: Resource<Pollable>) -> wasmtime::Result<()> {
        poll::HostPollable::drop(&mut *self.table, pollable)
    }
}

impl streams::Host for BoundedTable<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(&mut *self.table, err)
    }
}

impl streams::HostInputStream for BoundedTable<'_> {
    fn drop(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<()> {
        // Dropping a stream waits for its background task to stop.
        block_wasm(
            self.deadline,
            async_streams::HostInputStream::drop(&mut *self.table, stream),
        )
    }

    fn read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(&mut *self.table, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        block_stream(
            self.deadline,
            async_streams::HostInputStream::blocking_read(&mut *self.table, stream, len),
        )
    }

    fn skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(&mut *self.table, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        block_stream(
            self.deadline,
            async_streams::HostInputStream::blocking_skip(&mut *self.table, stream, len),
        )
    }

    fn subscribe(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<Resource<Pollable>> {
        streams::HostInputStream::subscribe(&mut *self.table, stream)
    }
}

impl streams::HostOutputStream for BoundedTable<'_> {
    fn drop(&mut self, stream: Resource<OutputStream>) -> wasmtime::Result<()> {
        block_wasm(
            self.deadline,
            async_streams::HostOutputStream::drop(&mut *self.table, stream),
        )
    }

    fn check_write(&mut self, stream: Resource<OutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(&mut *self.table, stream)
    }

    fn write(&mut self, stream: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(&mut *self.table, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        block_stream(
            self.deadline,
            async_streams::HostOutputStream::blocking_write_and_flush(
                &mut *self.table,
                stream,
                bytes,
            ),
        )
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        block_stream(
            self.deadline,
            async_streams::HostOutputStream::blocking_write_zeroes_and_flush(
                &mut *self.table,
                stream,
                len,
            ),
        )
    }

    fn subscribe(
        &mut self,
        stream: Resource<OutputStream>,
    ) -> wasmtime::Result<Resource<Pollable>> {
        streams::HostOutputStream::subscribe(&mut *self.table, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(&mut *self.table, stream, len)
    }

    fn flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(&mut *self.table, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        block_stream(
            self.deadline,
            async_streams::HostOutputStream::blocking_flush(&mut *self.table, stream),
        )
    }

    fn splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(&mut *self.table, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        block_stream(
            self.deadline,
            async_streams::HostOutputStream::blocking_splice(&mut *self.table, dst, src, len),
        )
    }
}
