//! Enriches orders. Each message on `orders` is a JSON order such as
//! `{"id": "o-1", "sku": "tea", "qty": 3, "unit_price": 4.5}`; the handler prices it, adds
//! `unit_price`, `total` and `tier` to it and publishes it to config `output`, keyed by the order
//! id. An order without `unit_price` is priced from kv `price/<sku>` (a number stored as text).

use std::time::Duration;

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config, kv};
use serde_json::{Map, Value};

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    // A map rather than a struct keeps the fields this handler does not know, so they reach the
    // output unchanged. Invalid JSON is rejected: retrying a broken message cannot fix it.
    let mut order: Map<String, Value> = msg.json()?;
    let id = text_field(&order, "id")?;
    let sku = text_field(&order, "sku")?;
    let qty = order
        .get("qty")
        .and_then(Value::as_u64)
        .filter(|&qty| qty > 0)
        .ok_or_else(|| Error::reject("qty must be a positive integer"))?;
    let unit_price = match order.get("unit_price") {
        Some(price) if !price.is_null() => price
            .as_f64()
            .filter(|&price| price >= 0.0)
            .ok_or_else(|| Error::reject("unit_price must be a number >= 0"))?,
        _ => {
            let price = price_from_kv(&sku)?;
            order.insert("unit_price".into(), price.into());
            price
        }
    };

    let total = qty as f64 * unit_price;
    let tier = if total >= large_total()? {
        "large"
    } else {
        "small"
    };
    order.insert("total".into(), total.into());
    order.insert("tier".into(), tier.into());

    // Keyed by the order id: on Kafka, every update of one order lands on one partition, in order.
    let output = config::get("output").unwrap_or_else(|| "orders.enriched".into());
    Outgoing::new(output)
        .key(id.as_str())
        .payload(Value::Object(order).to_string())
        .publish()?;
    lockgate_sdk::info!("Order {id}: {qty} x {sku} at {unit_price} = {total} ({tier})");
    Ok(())
}

/// The string field `name` of the order, or a rejection naming it.
fn text_field(order: &Map<String, Value>, name: &str) -> Result<String, Error> {
    match order.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        _ => Err(Error::reject(format!("{name} must be a string"))),
    }
}

/// The price of `sku` that a price feed stored in kv, as decimal text.
fn price_from_kv(sku: &str) -> Result<f64, Error> {
    let slot = format!("price/{sku}");
    let Some(stored) = kv::get(&slot)? else {
        // The feed may not have reached this sku yet: ask to be called again in a second rather
        // than dead-letter a good order. After the route's max_attempts it is dead-lettered.
        return Err(Error::retry_after(
            format!("no price for sku {sku} yet"),
            Duration::from_secs(1),
        ));
    };
    let text = String::from_utf8_lossy(&stored);
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|price| price.is_finite() && *price >= 0.0)
        .ok_or_else(|| Error::reject(format!("{slot} holds {text:?}, not a price")))
}

/// Config `large_total` (default 100): the total from which an order is "large".
fn large_total() -> Result<f64, Error> {
    let Some(text) = config::get("large_total") else {
        return Ok(100.0);
    };
    text.trim()
        .parse()
        .map_err(|_| Error::reject(format!("config large_total must be a number, not {text:?}")))
}

// `cargo test` runs these natively, without wasm: the SDK's TestHost stands in for lockgate.
#[cfg(all(test, not(target_arch = "wasm32")))]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    fn enriched(host: &mut TestHost, order: Value) -> Value {
        host.call(handle, Message::new(order.to_string())).unwrap();
        let published = host.take_published();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].topic, "orders.enriched");
        serde_json::from_slice(&published[0].payload).unwrap()
    }

    #[test]
    fn prices_an_order_and_keeps_its_other_fields() {
        let mut host = TestHost::new();
        let out = enriched(
            &mut host,
            serde_json::json!({"id": "o-1", "sku": "tea", "qty": 3, "unit_price": 4.5, "note": "x"}),
        );
        assert_eq!(out["total"], 13.5);
        assert_eq!(out["tier"], "small");
        assert_eq!(out["note"], "x");
    }

    #[test]
    fn reads_a_missing_price_from_kv_and_retries_without_one() {
        let mut host = TestHost::new().config("large_total", "10");
        let order = serde_json::json!({"id": "o-2", "sku": "cake", "qty": 2});
        let err = host
            .call(handle, Message::new(order.to_string()))
            .unwrap_err();
        assert_eq!(err.retry_delay(), Some(Duration::from_secs(1)));
        host.kv_set("price/cake", b"6.25", None);
        let out = enriched(&mut host, order);
        assert_eq!(out["unit_price"], 6.25);
        assert_eq!(out["total"], 12.5);
        assert_eq!(out["tier"], "large");
    }

    #[test]
    fn rejects_what_can_never_succeed() {
        let mut host = TestHost::new();
        for (payload, reason) in [
            ("{\"id\": ", "not valid JSON"),
            (r#"{"id": "o", "sku": "tea", "qty": 0}"#, "qty must be"),
            (r#"{"id": "o", "qty": 1}"#, "sku must be"),
            (
                r#"{"id": "o", "sku": "t", "qty": 1, "unit_price": -1}"#,
                "unit_price must be",
            ),
        ] {
            let err = host.call(handle, Message::new(payload)).unwrap_err();
            assert!(err.is_reject() && err.reason().contains(reason), "{err}");
        }
        assert!(host.published().is_empty());
    }
}
