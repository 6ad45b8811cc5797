//! Publishing messages.
//!
//! Outputs are buffered by the host during one call of the handler and released only if that
//! call returns `Ok`: a failed or retried attempt publishes nothing. A refused output also fails
//! the invocation, so returning the [`PublishError`] with `?` (it converts into a reject) is
//! usually right.

use std::fmt;

use crate::Header;

/// Why the host refused an output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PublishError {
    /// The topic is not in the route's `outputs` allow-list. Carries the topic.
    NotAllowed(String),
    /// The payload, key and headers together exceed the per-output limit. Carries the limit in
    /// bytes.
    TooLarge(u64),
    /// The invocation already buffered the maximum number of outputs. Carries the limit.
    TooMany(u32),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAllowed(topic) => {
                write!(f, "topic `{topic}` is not in the route's outputs")
            }
            Self::TooLarge(limit) => {
                write!(f, "output exceeds the per-output limit of {limit} bytes")
            }
            Self::TooMany(limit) => {
                write!(
                    f,
                    "invocation already buffered the maximum of {limit} outputs"
                )
            }
        }
    }
}

impl std::error::Error for PublishError {}

impl From<PublishError> for crate::Error {
    /// A refused output is a reject: the host fails the invocation anyway, and retrying the same
    /// message would be refused the same way.
    fn from(err: PublishError) -> Self {
        crate::Error::reject(format!("publish failed: {err}"))
    }
}

/// Buffers `payload` for publication to `topic` (no key, no headers).
///
/// # Errors
/// The host's refusal; see [`PublishError`].
pub fn publish(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Result<(), PublishError> {
    Outgoing::new(topic).payload(payload).publish()
}

/// A message to publish, built step by step:
///
/// ```no_run
/// # fn f() -> Result<(), lockgate_sdk::Error> {
/// lockgate_sdk::emit::Outgoing::new("orders.accepted")
///     .key("customer-7")
///     .header("content-type", "application/json")
///     .payload(r#"{"ok":true}"#)
///     .publish()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "an Outgoing does nothing until `.publish()` is called"]
pub struct Outgoing {
    topic: String,
    key: Option<Vec<u8>>,
    headers: Vec<Header>,
    payload: Vec<u8>,
}

impl Outgoing {
    /// Starts a message to `topic` with no key, no headers and an empty payload.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Sets the key (on Kafka it chooses the partition).
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the key when `key` is `Some`, clears it otherwise; handy to keep an incoming key:
    /// `.maybe_key(msg.key())`.
    pub fn maybe_key(mut self, key: Option<impl Into<Vec<u8>>>) -> Self {
        self.key = key.map(Into::into);
        self
    }

    /// Appends a header (names may repeat).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Appends headers, e.g. `.headers(msg.headers().iter().cloned())` to copy them all.
    pub fn headers(mut self, headers: impl IntoIterator<Item = Header>) -> Self {
        self.headers.extend(headers);
        self
    }

    /// Sets the body.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Buffers the message for publication after the handler returns `Ok`.
    ///
    /// # Errors
    /// The host's refusal; see [`PublishError`].
    pub fn publish(self) -> Result<(), PublishError> {
        crate::host::publish(self)
    }

    pub(crate) fn into_parts(self) -> (String, Option<Vec<u8>>, Vec<Header>, Vec<u8>) {
        (self.topic, self.key, self.headers, self.payload)
    }
}
