//! What a handler returns when it does not succeed.

use std::fmt;
use std::time::Duration;

/// What the host should do with a message the handler did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A transient failure: the host tries the message again later.
    Retry,
    /// The message can never succeed: the host sends it to the dead-letter destination.
    Reject,
}

/// The error a handler returns: either *retry* (transient) or *reject* (poison message).
///
/// Build one with [`Error::retry`], [`Error::retry_after`] or [`Error::reject`], or convert any
/// `Result` with [`ResultExt`]. [`crate::emit::PublishError`] and [`crate::kv::KvError`] convert
/// into it, so `?` works on them inside a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    reason: String,
    retry_after: Option<Duration>,
}

impl Error {
    /// A transient failure (a dependency is down, a lock is taken): the host retries the message
    /// after its own backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Retry,
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// Like [`Error::retry`], but asks the host to wait at least `after` before the next attempt.
    /// The host still waits at least its own backoff and at most the route's `max_backoff_ms`.
    pub fn retry_after(reason: impl Into<String>, after: Duration) -> Self {
        Self {
            kind: ErrorKind::Retry,
            reason: reason.into(),
            retry_after: Some(after),
        }
    }

    /// The message can never succeed (malformed, invalid): the host does not retry it and sends
    /// it to the dead-letter destination with `reason`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Reject,
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// Whether this is a retry or a reject.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True for [`Error::retry`] and [`Error::retry_after`].
    pub fn is_retry(&self) -> bool {
        self.kind == ErrorKind::Retry
    }

    /// True for [`Error::reject`].
    pub fn is_reject(&self) -> bool {
        self.kind == ErrorKind::Reject
    }

    /// The human-readable reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The delay requested by [`Error::retry_after`]; `None` otherwise.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.retry_after) {
            (ErrorKind::Retry, None) => write!(f, "retry: {}", self.reason),
            (ErrorKind::Retry, Some(after)) => {
                write!(f, "retry after {after:?}: {}", self.reason)
            }
            (ErrorKind::Reject, _) => write!(f, "reject: {}", self.reason),
        }
    }
}

impl std::error::Error for Error {}

/// Turns any `Result<T, E: Display>` into a `Result<T, Error>` with a context prefix, so `?`
/// works on third-party errors inside a handler.
///
/// ```
/// use lockgate_sdk::{Error, ResultExt};
///
/// fn parse(text: &str) -> Result<u32, Error> {
///     let n = text.parse::<u32>().or_reject("count")?;
///     Ok(n)
/// }
/// let err = parse("x").unwrap_err();
/// assert!(err.is_reject());
/// assert_eq!(err.reason(), "count: invalid digit found in string");
/// ```
pub trait ResultExt<T> {
    /// Maps the error to [`Error::retry`] with reason `"{context}: {error}"`.
    ///
    /// # Errors
    /// The mapped error, when `self` is `Err`.
    fn or_retry(self, context: impl fmt::Display) -> Result<T, Error>;

    /// Maps the error to [`Error::reject`] with reason `"{context}: {error}"`.
    ///
    /// # Errors
    /// The mapped error, when `self` is `Err`.
    fn or_reject(self, context: impl fmt::Display) -> Result<T, Error>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn or_retry(self, context: impl fmt::Display) -> Result<T, Error> {
        self.map_err(|err| Error::retry(format!("{context}: {err}")))
    }

    fn or_reject(self, context: impl fmt::Display) -> Result<T, Error> {
        self.map_err(|err| Error::reject(format!("{context}: {err}")))
    }
}

/// Milliseconds for the wire, rounded up so that a non-zero duration never becomes 0 (which a
/// host could read as "no delay" or "already expired"), and saturating instead of wrapping.
pub(crate) fn millis_ceil(duration: Duration) -> u64 {
    let whole = duration.as_millis();
    let millis = if duration.subsec_nanos().is_multiple_of(1_000_000) {
        whole
    } else {
        whole.saturating_add(1)
    };
    u64::try_from(millis).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_up_and_saturate() {
        assert_eq!(millis_ceil(Duration::ZERO), 0);
        assert_eq!(millis_ceil(Duration::from_micros(1)), 1);
        assert_eq!(millis_ceil(Duration::from_millis(10)), 10);
        assert_eq!(millis_ceil(Duration::from_micros(10_001)), 11);
        assert_eq!(millis_ceil(Duration::MAX), u64::MAX);
    }
}
