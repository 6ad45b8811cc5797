//! `#[handler]` keeps the function callable and wires it to the export.
#![cfg(feature = "testing")]
// A failed unwrap is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use lockgate_sdk::testing::TestHost;
use lockgate_sdk::{Error, Message, emit};

/// Any name works; the attribute only needs the signature.
#[lockgate_sdk::handler]
fn on_message(msg: Message) -> Result<(), Error> {
    if msg.attempt() > 1 {
        return Err(Error::reject("only one attempt"));
    }
    emit::publish("out", msg.payload())?;
    Ok(())
}

#[test]
fn annotated_function_is_still_a_plain_function() {
    let mut host = TestHost::new();
    host.call(on_message, Message::new("a")).unwrap();
    assert_eq!(host.published()[0].payload, b"a");
    let err = host
        .call(on_message, Message::new("b").with_attempt(2))
        .unwrap_err();
    assert!(err.is_reject());
    assert_eq!(host.published().len(), 1);
}
