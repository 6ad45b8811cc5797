//! Publishes the payload unchanged, with its key and headers, to the topic in config `target`.
//! The benches use it as the copy-only handler: what it costs is the crossing, not its work.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config};

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let target =
        config::get("target").ok_or_else(|| Error::reject("config key `target` is not set"))?;
    let out = Outgoing::new(target)
        .maybe_key(msg.key())
        .headers(msg.headers().iter().cloned());
    out.payload(msg.into_payload()).publish()?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    #[test]
    fn publishes_the_same_bytes_with_key_and_headers() {
        let mut host = TestHost::new()
            .config("target", "copy")
            .allow_outputs(["copy"]);
        let payload = vec![0u8, 0xff, b'a', 0x80];
        let msg = Message::new(payload.clone())
            .with_key("k1")
            .with_header("h", "v");
        host.call(handle, msg).unwrap();
        let published = host.published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].topic, "copy");
        assert_eq!(published[0].payload, payload);
        assert_eq!(published[0].key_str(), Some("k1"));
        assert_eq!(published[0].headers.len(), 1);
    }

    #[test]
    fn missing_target_config_is_rejected() {
        let mut host = TestHost::new();
        let err = host.call(handle, Message::new("a")).unwrap_err();
        assert_eq!(err, Error::reject("config key `target` is not set"));
    }
}
