//! Routes a JSON message by its `kind` field to config `route.<kind>`, else to config `default`.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config};
use serde::Deserialize;

/// Only the routing field; every other field is ignored and forwarded untouched.
#[derive(Deserialize)]
struct Envelope {
    kind: Option<String>,
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let envelope: Envelope = msg.json()?;
    let kind = envelope
        .kind
        .ok_or_else(|| Error::reject("missing `kind` field"))?;
    let topic = config::get(&format!("route.{kind}"))
        .or_else(|| config::get("default"))
        .ok_or_else(|| Error::reject(format!("no route for kind `{kind}` and no `default`")))?;
    lockgate_sdk::debug!("routing {} (kind `{kind}`) to {topic}", msg.id());
    Outgoing::new(topic)
        .maybe_key(msg.key())
        .payload(msg.payload())
        .publish()?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    fn host() -> TestHost {
        TestHost::new()
            .config("route.order", "orders")
            .config("route.refund", "refunds")
            .config("default", "misc")
    }

    fn route(host: &mut TestHost, payload: &str) -> Result<String, Error> {
        host.call(handle, Message::new(payload).with_key("k"))?;
        let published = host.take_published();
        assert_eq!(published.len(), 1);
        assert_eq!(
            published[0].payload_str(),
            Some(payload),
            "payload unchanged"
        );
        assert_eq!(published[0].key_str(), Some("k"));
        Ok(published[0].topic.clone())
    }

    #[test]
    fn routes_by_kind_then_default() {
        let mut host = host();
        assert_eq!(
            route(&mut host, r#"{"kind":"order","id":1}"#).unwrap(),
            "orders"
        );
        assert_eq!(route(&mut host, r#"{"kind":"refund"}"#).unwrap(), "refunds");
        assert_eq!(route(&mut host, r#"{"kind":"other"}"#).unwrap(), "misc");
    }

    #[test]
    fn unknown_kind_without_default_is_rejected() {
        let mut host = TestHost::new().config("route.order", "orders");
        let err = host
            .call(handle, Message::new(r#"{"kind":"other"}"#))
            .unwrap_err();
        assert!(err.is_reject());
        assert!(err.reason().contains("`other`"), "{err}");
        assert!(host.published().is_empty());
    }

    #[test]
    fn invalid_json_is_rejected_with_the_serde_error() {
        let mut host = host();
        let err = host.call(handle, Message::new("{oops")).unwrap_err();
        assert!(err.is_reject());
        assert_eq!(
            err.reason(),
            "payload is not valid JSON: key must be a string at line 1 column 2"
        );
        assert!(host.published().is_empty());
    }

    #[test]
    fn missing_or_mistyped_kind_is_rejected() {
        let mut host = host();
        let err = host.call(handle, Message::new(r#"{"id":1}"#)).unwrap_err();
        assert_eq!(err, Error::reject("missing `kind` field"));
        let err = host
            .call(handle, Message::new(r#"{"kind":7}"#))
            .unwrap_err();
        assert!(err.is_reject());
        assert!(err.reason().contains("invalid type"), "{err}");
        assert!(host.published().is_empty());
    }
}
