//! Keeps a number per message key in kv (`count/<key>`, stored as decimal text): adds the
//! payload (an integer; empty adds 1) and publishes the sum to config `target`, keyed like the
//! message. The same handler exists in every SDK language; `tests/fixtures/counter` checks that
//! they all store, read and add the same way.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config, kv};

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let key = msg
        .key_str()
        .ok_or_else(|| Error::reject("no key: the count is kept per message key"))?;
    let text = msg.payload_str()?.trim();
    let add: i64 = if text.is_empty() {
        1
    } else {
        text.parse()
            .map_err(|_| Error::reject(format!("payload {text:?} is not an integer")))?
    };
    let slot = format!("count/{key}");
    let current: i64 = match kv::get(&slot)? {
        None => 0,
        Some(v) => String::from_utf8_lossy(&v)
            .parse()
            .map_err(|_| Error::reject(format!("{slot} holds {v:?}, not a number")))?,
    };
    let sum = current + add;
    kv::set(&slot, sum.to_string())?;
    let target =
        config::get("target").ok_or_else(|| Error::reject("config `target` is not set"))?;
    Outgoing::new(target)
        .key(key)
        .payload(sum.to_string())
        .publish()?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    #[test]
    fn adds_per_key_and_keeps_the_sum_as_text() {
        let mut host = TestHost::new().config("target", "counts");
        host.call(handle, Message::new("41").with_key("a")).unwrap();
        host.call(handle, Message::new("").with_key("a")).unwrap();
        let published = host.take_published();
        assert_eq!(published[1].payload_str(), Some("42"));
        assert_eq!(host.kv_get("count/a").as_deref(), Some(&b"42"[..]));
        assert!(host.call(handle, Message::new("x").with_key("a")).is_err());
    }
}
