//! The message handed to a handler.

use serde::de::DeserializeOwned;

use crate::Error;

/// One message header. A name may repeat within a message; values are bytes because Kafka
/// headers are bytes (NATS and RabbitMQ headers arrive as their UTF-8 encoding).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    pub(crate) name: String,
    pub(crate) value: Vec<u8>,
}

impl Header {
    /// Creates a header.
    pub fn new(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }

    /// The header name (compared case-sensitively, as on Kafka).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw header value.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The header value as UTF-8, or `None` if it is not valid UTF-8.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

/// A message delivered to the handler by the broker.
///
/// In a component the host builds it; in native tests build one with [`Message::new`] and the
/// `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    id: String,
    topic: String,
    partition: Option<u32>,
    offset: Option<u64>,
    key: Option<Vec<u8>>,
    headers: Vec<Header>,
    payload: Vec<u8>,
    timestamp_ms: Option<u64>,
    attempt: u32,
    reply_to: Option<String>,
}

impl Message {
    /// Creates a first-attempt message on topic `test` (id `test/0/0`) carrying `payload`, with no
    /// key, headers, partition, offset, timestamp or reply-to. Meant for tests.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id: "test/0/0".to_owned(),
            topic: "test".to_owned(),
            partition: None,
            offset: None,
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
            timestamp_ms: None,
            attempt: 1,
            reply_to: None,
        }
    }

    /// Replaces the message id.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Replaces the topic (the id is left as it is).
    #[must_use]
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Sets the partition.
    #[must_use]
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Sets the offset.
    #[must_use]
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header (names may repeat).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header::new(name, value));
        self
    }

    /// Replaces the payload.
    #[must_use]
    pub fn with_payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Sets the broker timestamp, in milliseconds since the Unix epoch.
    #[must_use]
    pub fn with_timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Sets the attempt number (1 for the first delivery).
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Sets the reply-to topic.
    #[must_use]
    pub fn with_reply_to(mut self, reply_to: impl Into<String>) -> Self {
        self.reply_to = Some(reply_to.into());
        self
    }

    /// Identifier unique within the route and stable across redeliveries, e.g. `orders/2/1041`.
    /// Use it as an idempotency key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The topic (Kafka, local), subject (NATS) or queue (RabbitMQ) the message came from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition, when the broker has partitions.
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }

    /// The offset (Kafka, local) or stream sequence (JetStream), when the broker has one.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The raw key, when present.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The key as UTF-8; `None` when there is no key or it is not valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|key| std::str::from_utf8(key).ok())
    }

    /// All headers, in broker order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The first header named `name`, as UTF-8; `None` when absent or not valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_bytes(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The raw value of the first header named `name`.
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|header| header.name == name)
            .map(Header::value)
    }

    /// The message body.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Takes the body out of the message, avoiding a copy when forwarding it.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// The body as UTF-8.
    ///
    /// # Errors
    /// A [reject](Error::reject) when the body is not valid UTF-8: redelivering the same bytes
    /// cannot make them valid.
    pub fn payload_str(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.payload)
            .map_err(|err| Error::reject(format!("payload is not valid UTF-8: {err}")))
    }

    /// Parses the body as JSON into `T`.
    ///
    /// # Errors
    /// A [reject](Error::reject) carrying serde's message when the body is not valid JSON
    /// (`payload is not valid JSON: …`) or does not match `T` (`payload does not match the
    /// expected JSON: …`): such a message is poison and must not be retried.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|err| {
            // Telling syntax from shape saves the reader of a dead-letter record a guess.
            let what = if err.is_data() {
                "payload does not match the expected JSON"
            } else {
                "payload is not valid JSON"
            };
            Error::reject(format!("{what}: {err}"))
        })
    }

    /// The broker's timestamp in milliseconds since the Unix epoch, when known.
    pub fn timestamp_ms(&self) -> Option<u64> {
        self.timestamp_ms
    }

    /// 1 for the first attempt, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Where a reply should go (NATS request-reply, RabbitMQ `reply_to`), when present.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }
}

impl From<crate::__private::WitMessage> for Message {
    fn from(message: crate::__private::WitMessage) -> Self {
        Self {
            id: message.id,
            topic: message.topic,
            partition: message.partition,
            offset: message.offset,
            key: message.key,
            headers: message
                .headers
                .into_iter()
                .map(|header| Header {
                    name: header.name,
                    value: header.value,
                })
                .collect(),
            payload: message.payload,
            timestamp_ms: message.timestamp_ms,
            attempt: message.attempt,
            reply_to: message.reply_to,
        }
    }
}
