//! The bodies of an outbound request and its response, with lockgate's limits around them.
//!
//! A response body is held in a slot its call can empty: when the call ends, every body it
//! opened is dropped (closing the connection and freeing the handler's `max_concurrent` slot),
//! even if the guest kept the stream in a global to read in a later call.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use wasmtime_wasi_http::{Error, WasiBody};

/// A request body that fails once it has sent more than `limit` bytes.
pub(crate) struct CappedBody {
    pub inner: WasiBody,
    pub limit: u64,
    pub sent: u64,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent = this.sent.saturating_add(data.len() as u64);
                    if this.sent > this.limit {
                        return Poll::Ready(Some(Err(Error::HttpRequestBodySize(Some(
                            this.limit,
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a response body holds while it is open: the connection's body and the request's slot.
pub(crate) struct Live {
    pub body: Incoming,
    pub _permit: OwnedSemaphorePermit,
}

/// Shared between the body the guest reads and the call that opened it.
pub(crate) type Slot = Arc<Mutex<Option<Live>>>;

/// The bodies opened by one call, emptied when it ends.
#[derive(Default)]
pub(crate) struct OpenBodies(Vec<Weak<Mutex<Option<Live>>>>);

impl OpenBodies {
    pub fn track(&mut self, slot: &Slot) {
        self.0.retain(|w| w.strong_count() > 0);
        self.0.push(Arc::downgrade(slot));
    }

    /// Drops every body still open.
    pub fn close_all(&mut self) {
        for slot in self.0.drain(..).filter_map(|w| w.upgrade()) {
            let live = slot.lock().map(|mut s| s.take());
            drop(live);
        }
    }
}

/// A response body bounded by `max_response_bytes` and by the time between two reads.
pub(crate) struct GuardedBody {
    pub slot: Slot,
    pub limit: u64,
    pub read: u64,
    pub between: Option<Duration>,
    pub timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl GuardedBody {
    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Ok(mut s) = self.slot.lock() {
            s.take();
        }
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let polled = {
            let Ok(mut slot) = this.slot.lock() else {
                return Poll::Ready(Some(Err(Error::ConnectionTerminated)));
            };
            let Some(live) = slot.as_mut() else {
                // Closed by the end of its call, or finished.
                return Poll::Ready(Some(Err(Error::ConnectionTerminated)));
            };
            let polled = Pin::new(&mut live.body).poll_frame(cx);
            if matches!(polled, Poll::Ready(None)) {
                slot.take();
            }
            polled
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read = this.read.saturating_add(data.len() as u64);
                    if this.read > this.limit {
                        return this.fail(Error::HttpResponseBodySize(Some(this.limit)));
                    }
                }
                this.timer = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(super::hyper_error(&e)),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(between) = this.between else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(between)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(Error::ConnectionReadTimeout),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}
