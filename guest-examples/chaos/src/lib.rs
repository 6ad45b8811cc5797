//! A handler whose failures are chosen by the message, for the delivery demo and the end-to-end
//! crash tests: `{"id": 7}` is forwarded to config `target`; `{"id": 7, "fail": 2}` asks to be
//! retried on attempts 1 and 2 and succeeds on attempt 3; `{"id": 7, "poison": true}` (and
//! anything that is not such JSON) is rejected, so it ends up in the dead-letter topic;
//! `{"id": 7, "busy_ms": 3000}` keeps the handler busy for 3 s first (a long handler). A message
//! with a reply subject (a NATS request) is also answered there with `{"ok": 7}`.
//!
//! Config `down_until_ms` (ms since the Unix epoch) simulates a dependency outage: until then every
//! message asks to be retried, which is what trips a route's circuit breaker. Config
//! `poison_ok = "true"` is the fixed version: poison orders are forwarded like good ones (the DLQ
//! replay tests deploy it before replaying). Config `count_effects = "true"` gives every handled
//! order a side effect to count: kv `effects/<id>` is incremented (read, add one, write), so the
//! scale-out tests can tell an effect that ran twice from one that ran once.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config, kv};
use serde::Deserialize;

#[derive(Deserialize)]
struct Order {
    id: u64,
    #[serde(default)]
    poison: bool,
    #[serde(default)]
    fail: u32,
    #[serde(default)]
    busy_ms: u64,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    if let Some(until) = config::get("down_until_ms") {
        let until: u128 = until
            .parse()
            .map_err(|_| Error::reject("config key `down_until_ms` is not a number"))?;
        if now_ms() < until {
            return Err(Error::retry("dependency down"));
        }
    }
    let order: Order = msg.json()?;
    if order.busy_ms > 0 {
        // Busy on purpose: a guest has no sleep, and a long computation is what this stands for.
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(order.busy_ms) {
            std::hint::spin_loop();
        }
    }
    if order.poison && config::get("poison_ok").as_deref() != Some("true") {
        return Err(Error::reject(format!("order {} is poison", order.id)));
    }
    if msg.attempt() <= order.fail {
        return Err(Error::retry(format!(
            "order {}: dependency unavailable (attempt {} of {} planned failures)",
            order.id,
            msg.attempt(),
            order.fail
        )));
    }
    if config::get("count_effects").as_deref() == Some("true") {
        let key = format!("effects/{}", order.id);
        let seen: u64 = kv::get(&key)?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        kv::set(&key, (seen + 1).to_string())?;
    }
    let target =
        config::get("target").ok_or_else(|| Error::reject("config key `target` is not set"))?;
    Outgoing::new(target)
        .maybe_key(msg.key())
        .payload(msg.payload())
        .publish()?;
    if let Some(reply_to) = msg.reply_to() {
        Outgoing::new(reply_to)
            .payload(format!(r#"{{"ok":{}}}"#, order.id))
            .publish()?;
    }
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    fn host() -> TestHost {
        TestHost::new().config("target", "out")
    }

    #[test]
    fn forwards_good_orders_unchanged() {
        let mut host = host();
        host.call(handle, Message::new(r#"{"id":1}"#).with_key("k"))
            .unwrap();
        let published = host.take_published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].topic, "out");
        assert_eq!(published[0].payload_str(), Some(r#"{"id":1}"#));
        assert_eq!(published[0].key_str(), Some("k"));
    }

    #[test]
    fn flaky_orders_retry_the_planned_number_of_times() {
        let mut host = host();
        let flaky = r#"{"id":2,"fail":2}"#;
        for attempt in 1..=2 {
            let err = host
                .call(handle, Message::new(flaky).with_attempt(attempt))
                .unwrap_err();
            assert!(err.is_retry(), "{err:?}");
            assert!(host.take_published().is_empty());
        }
        host.call(handle, Message::new(flaky).with_attempt(3))
            .unwrap();
        assert_eq!(host.take_published().len(), 1);
    }

    #[test]
    fn an_outage_retries_everything_until_it_ends() {
        let mut down = host().config("down_until_ms", "99999999999999");
        let err = down.call(handle, Message::new(r#"{"id":1}"#)).unwrap_err();
        assert_eq!(err, Error::retry("dependency down"));
        let mut up = host().config("down_until_ms", "1");
        up.call(handle, Message::new(r#"{"id":1}"#)).unwrap();
        assert_eq!(up.take_published().len(), 1);
    }

    #[test]
    fn the_fixed_version_forwards_poison() {
        let mut fixed = host().config("poison_ok", "true");
        fixed
            .call(handle, Message::new(r#"{"id":3,"poison":true}"#))
            .unwrap();
        assert_eq!(fixed.take_published().len(), 1);
    }

    #[test]
    fn poison_and_garbage_are_rejected() {
        let mut host = host();
        let err = host
            .call(handle, Message::new(r#"{"id":3,"poison":true}"#))
            .unwrap_err();
        assert_eq!(err, Error::reject("order 3 is poison"));
        assert!(
            host.call(handle, Message::new("not json"))
                .unwrap_err()
                .is_reject()
        );
        assert!(host.take_published().is_empty());
    }

    #[test]
    fn effects_are_counted_per_order_when_asked() {
        let mut host = host().config("count_effects", "true");
        for _ in 0..2 {
            host.call(handle, Message::new(r#"{"id":9}"#)).unwrap();
        }
        host.call(handle, Message::new(r#"{"id":8}"#)).unwrap();
        assert_eq!(host.kv_get("effects/9").as_deref(), Some(&b"2"[..]));
        assert_eq!(host.kv_get("effects/8").as_deref(), Some(&b"1"[..]));
        let mut plain = super::tests::host();
        plain.call(handle, Message::new(r#"{"id":9}"#)).unwrap();
        assert_eq!(plain.kv_get("effects/9"), None);
    }

    #[test]
    fn busy_orders_take_at_least_their_time() {
        let mut host = host();
        let started = std::time::Instant::now();
        host.call(handle, Message::new(r#"{"id":4,"busy_ms":50}"#))
            .unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(host.take_published().len(), 1);
    }

    #[test]
    fn requests_are_answered_on_their_reply_subject() {
        let mut host = host();
        host.call(
            handle,
            Message::new(r#"{"id":5}"#).with_reply_to("_INBOX.abc"),
        )
        .unwrap();
        let published = host.take_published();
        assert_eq!(published.len(), 2);
        assert_eq!(published[1].topic, "_INBOX.abc");
        assert_eq!(published[1].payload_str(), Some(r#"{"ok":5}"#));
    }
}
