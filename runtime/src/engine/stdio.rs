//! Capture of a guest's stdout and stderr.
//!
//! Guests built by standard toolchains print (Python's `print`, Rust's `println!`). Inheriting the
//! host's stdio would let a guest write anywhere, so both streams go into a bounded in-memory
//! buffer that the engine turns into log records after each invocation.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// A bounded, shareable byte buffer used as a guest's stdout or stderr.
///
/// Writes past the bound are accepted and counted, not stored: failing a guest's `print` would
/// turn a chatty handler into a failing one, which is worse than losing the excess text.
#[derive(Clone, Debug)]
pub struct CaptureBuffer {
    inner: Arc<Mutex<Captured>>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: u64,
}

impl CaptureBuffer {
    /// Creates a buffer that keeps at most `capacity` bytes between two calls of [`Self::take`].
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Captured::default())),
            capacity,
        }
    }

    fn push(&self, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.capacity.saturating_sub(inner.bytes.len());
        let kept = room.min(data.len());
        inner.bytes.extend_from_slice(&data[..kept]);
        inner.dropped += (data.len() - kept) as u64;
    }

    /// Returns what was written since the last call, and how many bytes were dropped.
    pub fn take(&self) -> (Vec<u8>, u64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = std::mem::take(&mut inner.bytes);
        let dropped = std::mem::take(&mut inner.dropped);
        (bytes, dropped)
    }
}

impl IsTerminal for CaptureBuffer {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CaptureBuffer {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CaptureBuffer {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: excess is dropped in `push`, never refused.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CaptureBuffer {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CaptureBuffer {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_capacity_and_counts_the_rest() {
        let buf = CaptureBuffer::new(4);
        buf.push(b"abc");
        buf.push(b"def");
        assert_eq!(buf.take(), (b"abcd".to_vec(), 2));
        assert_eq!(buf.take(), (Vec::new(), 0), "take drains");
    }
}
