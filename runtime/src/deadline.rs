//! The deadline of a guest call, and the one way host code waits under it.
//!
//! Epoch interruption stops a guest that runs past its deadline, but only while it runs wasm: a
//! guest blocked in a host function (a sleep, a read of a stream, a kv call to a slow store)
//! is not running wasm, so no epoch can reach it. The engine therefore bounds every call's
//! future as a whole with [`Deadline::bound`], which drops it (and the host wait inside) when
//! the call's time is up; the host functions that wait on a blocking thread (the synchronous
//! state stores) bound their waits with [`bound_current`] under [`Deadline::scope`]. Either way
//! the wait ends with [`DeadlineExceeded`]; the engine reports the call as `timed_out` and
//! discards the instance.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::task::Poll;
use std::time::{Duration, Instant};

/// The moment a guest call (or an instantiation) must be over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

/// A host wait was cut short because its call's deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the call's deadline passed while the host was waiting on its behalf")]
pub struct DeadlineExceeded;

thread_local! {
    /// The deadline of the guest call this thread is running, while it is inside
    /// [`Deadline::scope`].
    static CURRENT: Cell<Option<Deadline>> = const { Cell::new(None) };
}

impl Deadline {
    /// The deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// The deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self::after_from(Instant::now(), timeout)
    }

    /// The deadline `timeout` after `start` (far in the future if that overflows the clock: a
    /// `timeout_ms` of years is allowed).
    pub fn after_from(start: Instant, timeout: Duration) -> Self {
        Self(
            start
                .checked_add(timeout)
                // About 34 years: later than any call lives.
                .or_else(|| start.checked_add(Duration::from_secs(1 << 30)))
                .unwrap_or(start),
        )
    }

    /// A deadline that has already passed: every wait under it ends at once.
    pub fn passed() -> Self {
        Self(Instant::now())
    }

    /// The time left at `now`, `None` once the deadline has passed.
    pub fn remaining(self, now: Instant) -> Option<Duration> {
        self.0.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Whether the deadline has passed.
    pub fn has_passed(self) -> bool {
        Instant::now() >= self.0
    }

    /// Runs `wait` to completion, or gives up at the deadline; once the deadline has passed it
    /// does not start `wait` at all (the call is over, and a guest looping on waits that return
    /// at once must not outlive it). A `wait` that is ready at once (most are: a write to the
    /// captured stdout) costs a clock read and nothing else; one that is not needs a tokio
    /// runtime with its timer enabled (every runtime lockgate builds, and wasmtime-wasi's own).
    pub async fn bound<F: Future>(self, wait: F) -> Result<F::Output, DeadlineExceeded> {
        if self.has_passed() {
            return Err(DeadlineExceeded);
        }
        let mut wait = std::pin::pin!(wait);
        if let Poll::Ready(out) = poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await {
            return Ok(out);
        }
        tokio::time::timeout_at(tokio::time::Instant::from_std(self.0), wait)
            .await
            .map_err(|_| DeadlineExceeded)
    }

    /// Runs `f` with this deadline as the thread's current one, so synchronous code below it
    /// that blocks on a future (the Redis and PostgreSQL stores) can bound the wait with
    /// [`bound_current`] without a deadline in every signature. The previous one is restored
    /// afterwards, also when `f` panics.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Deadline>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(self))));
        f()
    }

    /// The deadline of the [`Self::scope`] this thread is in, if any.
    pub fn current() -> Option<Self> {
        CURRENT.with(Cell::get)
    }
}

/// Runs `wait` under the deadline current on this thread when it is called
/// ([`Deadline::scope`]), or unbounded outside any scope (the pipeline's own store calls, which
/// have their own timeouts).
pub fn bound_current<F: Future>(
    wait: F,
) -> impl Future<Output = Result<F::Output, DeadlineExceeded>> {
    let deadline = Deadline::current();
    async move {
        match deadline {
            Some(deadline) => deadline.bound(wait).await,
            None => Ok(wait.await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_sets_and_restores_the_current_deadline() {
        assert_eq!(Deadline::current(), None);
        let outer = Deadline::after(Duration::from_secs(10));
        let inner = Deadline::after(Duration::from_secs(1));
        outer.scope(|| {
            assert_eq!(Deadline::current(), Some(outer));
            inner.scope(|| assert_eq!(Deadline::current(), Some(inner)));
            assert_eq!(Deadline::current(), Some(outer));
            let panicked = std::panic::catch_unwind(|| inner.scope(|| panic!("guest bug")));
            assert!(panicked.is_err());
            assert_eq!(Deadline::current(), Some(outer), "restored after a panic");
        });
        assert_eq!(Deadline::current(), None);
    }

    #[test]
    fn a_timeout_past_the_clock_is_a_far_deadline_not_a_panic() {
        let far = Deadline::after(Duration::MAX);
        assert!(!far.has_passed());
        assert!(far > Deadline::after(Duration::from_secs(3600 * 24 * 365)));
        assert!(Deadline::passed().has_passed());
    }

    #[tokio::test(start_paused = true)]
    async fn bound_ends_a_wait_at_the_deadline_and_starts_none_after_it() {
        let deadline =
            Deadline::at(tokio::time::Instant::now().into_std() + Duration::from_secs(2));
        let start = tokio::time::Instant::now();
        let never = deadline.bound(std::future::pending::<()>()).await;
        assert_eq!(never, Err(DeadlineExceeded));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Past the deadline (on the real clock, as the engine's), not even ready work starts:
        // the call is over.
        assert_eq!(
            Deadline::passed().bound(async { 7 }).await,
            Err(DeadlineExceeded)
        );
        // Before it, ready work passes; outside any scope, nothing is bounded.
        assert_eq!(deadline.bound(async { 7 }).await, Ok(7));
        assert_eq!(bound_current(async { 8 }).await, Ok(8));
    }
}
