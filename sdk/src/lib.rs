//! Write [lockgate](https://example.invalid/lockgate) message handlers in Rust.
//!
//! A handler is a WebAssembly component (`wasm32-wasip2`) that lockgate calls once per broker
//! message. Mark one function with [`#[handler]`](handler); its result tells the host to
//! acknowledge the message (`Ok`), try it again ([`Error::retry`]) or dead-letter it
//! ([`Error::reject`]). Outputs go through [`emit`], state through [`kv`], settings through
//! [`config`], calls to other services through [`http`] and diagnostics through [`log`]. A handler crate needs only this crate as a
//! dependency and `crate-type = ["cdylib"]`; build it with
//! `cargo build --release --target wasm32-wasip2`.
//!
//! ```
//! use lockgate_sdk::{Error, Message, ResultExt, config, emit};
//!
//! /// Forwards each order to the configured topic, upper-cased.
//! #[lockgate_sdk::handler]
//! fn handle(msg: Message) -> Result<(), Error> {
//!     let target = config::get("target")
//!         .ok_or_else(|| Error::reject("config key `target` is not set"))?;
//!     let text = msg.payload_str()?;
//!     let count: u32 = msg.header("count").unwrap_or("1").parse().or_reject("header `count`")?;
//!     lockgate_sdk::info!("forwarding {} bytes x{count} to {target}", text.len());
//!     emit::Outgoing::new(target).maybe_key(msg.key()).payload(text.to_uppercase()).publish()?;
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! With the `testing` feature (as a dev-dependency), the same handler runs natively under
//! `testing::TestHost` in `cargo test`.

// The bindings' export macro and runtime path are spelled `::lockgate_sdk::…` so that they
// resolve in the user's crate; this alias makes the same paths resolve inside this crate.
extern crate self as lockgate_sdk;

pub mod config;
pub mod emit;
mod error;
mod host;
pub mod http;
pub mod kv;
pub mod log;
mod message;
pub mod sql;
#[cfg(all(feature = "testing", not(target_arch = "wasm32")))]
pub mod testing;

pub use error::{Error, ErrorKind, ResultExt};
pub use lockgate_sdk_macro::handler;
pub use message::{Header, Message};

/// Support for the code `#[handler]` generates. Not a public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    /// The WIT bindings, generated once here so that handler crates need no `wit-bindgen`
    /// dependency of their own.
    #[allow(missing_docs, clippy::all, clippy::unwrap_used, unsafe_op_in_unsafe_fn)]
    pub mod bindings {
        wit_bindgen::generate!({
            // Every interface: a handler imports only what it calls (one that never calls `http`
            // or `sql` imports neither).
            world: "handler-all",
            path: "../wit",
            generate_all,
            pub_export_macro: true,
            export_macro_name: "__lockgate_export_handler",
            default_bindings_module: "::lockgate_sdk::__private::bindings",
            runtime_path: "::lockgate_sdk::__private::wit_bindgen::rt",
        });
    }

    pub use bindings::Guest;

    /// The message record as the bindings define it.
    pub type WitMessage = bindings::lockgate::handler::types::Message;
    /// The error variant as the bindings define it.
    pub type WitHandlerError = bindings::lockgate::handler::types::HandlerError;

    /// Converts between the bindings and the SDK types around one call of the user's handler.
    pub fn run_handler<F>(message: WitMessage, handler: F) -> Result<(), WitHandlerError>
    where
        F: FnOnce(crate::Message) -> Result<(), crate::Error>,
    {
        use bindings::lockgate::handler::types::RetryError;

        handler(message.into()).map_err(|err| match err.kind() {
            crate::ErrorKind::Retry => WitHandlerError::Retry(RetryError {
                after_ms: err.retry_delay().map(crate::error::millis_ceil),
                reason: err.reason().to_owned(),
            }),
            crate::ErrorKind::Reject => WitHandlerError::Reject(err.reason().to_owned()),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use bindings::lockgate::handler::types::{Header, RetryError};
        use std::time::Duration;

        fn wit_message() -> WitMessage {
            WitMessage {
                id: "orders/2/1041".to_owned(),
                topic: "orders".to_owned(),
                partition: Some(2),
                offset: Some(1041),
                key: Some(b"k".to_vec()),
                headers: vec![Header {
                    name: "h".to_owned(),
                    value: b"v".to_vec(),
                }],
                payload: b"body".to_vec(),
                timestamp_ms: Some(1_700_000_000_000),
                attempt: 3,
                reply_to: Some("inbox".to_owned()),
            }
        }

        #[test]
        fn message_fields_reach_the_handler() {
            let result = run_handler(wit_message(), |msg| {
                assert_eq!(msg.id(), "orders/2/1041");
                assert_eq!(msg.topic(), "orders");
                assert_eq!(msg.partition(), Some(2));
                assert_eq!(msg.offset(), Some(1041));
                assert_eq!(msg.key(), Some(&b"k"[..]));
                assert_eq!(msg.header("h"), Some("v"));
                assert_eq!(msg.payload(), b"body");
                assert_eq!(msg.timestamp_ms(), Some(1_700_000_000_000));
                assert_eq!(msg.attempt(), 3);
                assert_eq!(msg.reply_to(), Some("inbox"));
                Ok(())
            });
            assert!(result.is_ok());
        }

        #[test]
        fn errors_map_to_the_wit_variant() {
            let reject = run_handler(wit_message(), |_| Err(crate::Error::reject("bad")));
            assert!(matches!(reject, Err(WitHandlerError::Reject(reason)) if reason == "bad"));

            let retry = run_handler(wit_message(), |_| Err(crate::Error::retry("later")));
            assert!(matches!(
                retry,
                Err(WitHandlerError::Retry(RetryError { reason, after_ms: None })) if reason == "later"
            ));

            let after = run_handler(wit_message(), |_| {
                Err(crate::Error::retry_after(
                    "slow",
                    Duration::from_micros(2_500),
                ))
            });
            assert!(matches!(
                after,
                Err(WitHandlerError::Retry(RetryError {
                    after_ms: Some(3),
                    ..
                }))
            ));
        }
    }
}
