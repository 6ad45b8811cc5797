//! Publishes the upper-cased UTF-8 payload to the topic in config `target`, keeping key and headers.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config};

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let target =
        config::get("target").ok_or_else(|| Error::reject("config key `target` is not set"))?;
    let upper = msg.payload_str()?.to_uppercase();
    Outgoing::new(target)
        .maybe_key(msg.key())
        .headers(msg.headers().iter().cloned())
        .payload(upper)
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
            .config("target", "shout")
            .allow_outputs(["shout"])
    }

    #[test]
    fn publishes_upper_case_with_key_and_headers() {
        let mut host = host();
        let msg = Message::new("héllo wörld")
            .with_key("k1")
            .with_header("trace", "t1")
            .with_header("trace", "t2");
        host.call(handle, msg).unwrap();

        let published = host.published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].topic, "shout");
        assert_eq!(published[0].payload_str(), Some("HÉLLO WÖRLD"));
        assert_eq!(published[0].key_str(), Some("k1"));
        let headers: Vec<_> = published[0]
            .headers
            .iter()
            .map(|h| (h.name(), h.value()))
            .collect();
        assert_eq!(headers, [("trace", &b"t1"[..]), ("trace", &b"t2"[..])]);
    }

    #[test]
    fn message_without_key_is_published_without_key() {
        let mut host = host();
        host.call(handle, Message::new("a")).unwrap();
        assert_eq!(host.published()[0].key, None);
    }

    #[test]
    fn non_utf8_payload_is_rejected_and_nothing_published() {
        let mut host = host();
        let err = host
            .call(handle, Message::new(vec![b'o', b'k', 0xff]))
            .unwrap_err();
        assert!(err.is_reject());
        assert!(err.reason().contains("UTF-8"), "{err}");
        assert!(host.published().is_empty());
    }

    #[test]
    fn missing_target_config_is_rejected() {
        let mut host = TestHost::new();
        let err = host.call(handle, Message::new("a")).unwrap_err();
        assert_eq!(err, Error::reject("config key `target` is not set"));
        assert!(host.published().is_empty());
    }
}
