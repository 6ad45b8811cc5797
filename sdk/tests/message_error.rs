//! Message accessors, Error constructors and the conversions into Error.
// A failed unwrap is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lockgate_sdk::emit::PublishError;
use lockgate_sdk::kv::KvError;
use lockgate_sdk::{Error, ErrorKind, Header, Message, ResultExt};

#[test]
fn new_message_has_test_defaults() {
    let msg = Message::new("hello");
    assert_eq!(msg.id(), "test/0/0");
    assert_eq!(msg.topic(), "test");
    assert_eq!(msg.partition(), None);
    assert_eq!(msg.offset(), None);
    assert_eq!(msg.key(), None);
    assert_eq!(msg.key_str(), None);
    assert!(msg.headers().is_empty());
    assert_eq!(msg.payload(), b"hello");
    assert_eq!(msg.timestamp_ms(), None);
    assert_eq!(msg.attempt(), 1);
    assert_eq!(msg.reply_to(), None);
}

#[test]
fn builder_sets_every_field() {
    let msg = Message::new(vec![1, 2])
        .with_id("orders/2/1041")
        .with_topic("orders")
        .with_partition(2)
        .with_offset(1041)
        .with_key("customer-7")
        .with_header("trace", "abc")
        .with_timestamp_ms(42)
        .with_attempt(3)
        .with_reply_to("inbox.1")
        .with_payload("body");
    assert_eq!(msg.id(), "orders/2/1041");
    assert_eq!(msg.topic(), "orders");
    assert_eq!(msg.partition(), Some(2));
    assert_eq!(msg.offset(), Some(1041));
    assert_eq!(msg.key(), Some(&b"customer-7"[..]));
    assert_eq!(msg.key_str(), Some("customer-7"));
    assert_eq!(msg.headers(), &[Header::new("trace", "abc")]);
    assert_eq!(msg.timestamp_ms(), Some(42));
    assert_eq!(msg.attempt(), 3);
    assert_eq!(msg.reply_to(), Some("inbox.1"));
    assert_eq!(msg.payload(), b"body");
    assert_eq!(msg.into_payload(), b"body".to_vec());
}

#[test]
fn key_str_is_none_for_non_utf8_key() {
    let msg = Message::new("").with_key(vec![0xff, 0xfe]);
    assert_eq!(msg.key(), Some(&[0xff, 0xfe][..]));
    assert_eq!(msg.key_str(), None);
}

#[test]
fn header_returns_the_first_of_repeated_names() {
    let msg = Message::new("")
        .with_header("a", "first")
        .with_header("A", "other case")
        .with_header("a", "second")
        .with_header("bin", vec![0xff]);
    assert_eq!(msg.header("a"), Some("first"));
    assert_eq!(msg.header("A"), Some("other case"));
    assert_eq!(msg.header("missing"), None);
    assert_eq!(msg.header("bin"), None, "non-UTF-8 value has no str form");
    assert_eq!(msg.header_bytes("bin"), Some(&[0xff][..]));
    assert_eq!(msg.headers().len(), 4);
    assert_eq!(msg.headers()[3].value_str(), None);
    assert_eq!(msg.headers()[0].name(), "a");
    assert_eq!(msg.headers()[0].value(), b"first");
}

#[test]
fn payload_str_rejects_invalid_utf8() {
    assert_eq!(Message::new("héllo").payload_str(), Ok("héllo"));
    let err = Message::new(vec![b'a', 0xc3]).payload_str().unwrap_err();
    assert!(err.is_reject());
    assert!(
        err.reason().starts_with("payload is not valid UTF-8"),
        "{err}"
    );
}

#[derive(Debug, PartialEq, serde::Deserialize)]
struct Order {
    kind: String,
    qty: u32,
}

#[test]
fn json_parses_or_rejects_with_serde_message() {
    let order: Order = Message::new(r#"{"kind":"order","qty":2}"#).json().unwrap();
    assert_eq!(
        order,
        Order {
            kind: "order".into(),
            qty: 2
        }
    );

    let err = Message::new("{not json").json::<Order>().unwrap_err();
    assert!(err.is_reject());
    assert_eq!(
        err.reason(),
        "payload is not valid JSON: key must be a string at line 1 column 2"
    );

    let err = Message::new(r#"{"kind":"order"}"#)
        .json::<Order>()
        .unwrap_err();
    assert!(err.is_reject());
    assert!(
        err.reason()
            .starts_with("payload does not match the expected JSON: missing field `qty`"),
        "{err}"
    );

    let err = Message::new("").json::<Order>().unwrap_err();
    assert!(
        err.reason().starts_with("payload is not valid JSON: EOF"),
        "{err}"
    );
}

#[test]
fn error_constructors_and_display() {
    let retry = Error::retry("db down");
    assert_eq!(retry.kind(), ErrorKind::Retry);
    assert!(retry.is_retry() && !retry.is_reject());
    assert_eq!(retry.reason(), "db down");
    assert_eq!(retry.retry_delay(), None);
    assert_eq!(retry.to_string(), "retry: db down");

    let later = Error::retry_after("busy", Duration::from_millis(10));
    assert!(later.is_retry());
    assert_eq!(later.retry_delay(), Some(Duration::from_millis(10)));
    assert_eq!(later.to_string(), "retry after 10ms: busy");

    let reject = Error::reject("malformed");
    assert_eq!(reject.kind(), ErrorKind::Reject);
    assert!(reject.is_reject() && !reject.is_retry());
    assert_eq!(reject.retry_delay(), None);
    assert_eq!(reject.to_string(), "reject: malformed");

    let boxed: Box<dyn std::error::Error> = Box::new(reject);
    assert_eq!(boxed.to_string(), "reject: malformed");
}

#[test]
fn result_ext_adds_context() {
    let err = "x".parse::<u8>().or_retry("parsing count").unwrap_err();
    assert!(err.is_retry());
    assert_eq!(err.reason(), "parsing count: invalid digit found in string");

    let err = Err::<(), _>("boom").or_reject("calling api").unwrap_err();
    assert!(err.is_reject());
    assert_eq!(err.reason(), "calling api: boom");

    assert_eq!(Ok::<_, String>(5).or_reject("unused"), Ok(5));
}

#[test]
fn publish_error_converts_to_reject() {
    let err: Error = PublishError::NotAllowed("secret".into()).into();
    assert!(err.is_reject());
    assert_eq!(
        err.reason(),
        "publish failed: topic `secret` is not in the route's outputs"
    );
    assert!(Error::from(PublishError::TooLarge(10)).is_reject());
    assert!(Error::from(PublishError::TooMany(3)).is_reject());
}

#[test]
fn kv_error_maps_unavailable_to_retry_and_others_to_reject() {
    let err: Error = KvError::Unavailable("disk".into()).into();
    assert!(err.is_retry());
    assert_eq!(err.reason(), "kv store unavailable: disk");
    assert!(Error::from(KvError::InvalidKey("empty".into())).is_reject());
    assert!(Error::from(KvError::TooLarge(1024)).is_reject());
}
