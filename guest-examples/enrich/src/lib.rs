//! Enriches an order with its customer, looked up over HTTP.
//!
//! An order `{"id": "o-1", "customer_id": "c-7", ...}` becomes `{..., "customer": {...}}` on the
//! `target` topic (config, default `orders.enriched`). The customer service is
//! `customers_url` (config) + `/customers/<id>`. A 5xx, a 429 or a connection failure retries
//! (so an outage opens the route's breaker instead of dead-lettering orders); a 404 rejects
//! (no such customer: the order goes to the dead-letter destination).
//!
//! The handler's grant must allow the service:
//!
//! ```toml
//! [handlers.enrich.http]
//! allowed_hosts = ["https://customers.example.com"]
//! ```

use lockgate_sdk::{Error, Message, ResultExt, config, emit, http};
use serde_json::Value;

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let base = config::get("customers_url")
        .ok_or_else(|| Error::reject("config key `customers_url` is not set"))?;
    let target = config::get("target").unwrap_or_else(|| "orders.enriched".to_owned());
    let mut order: Value = serde_json::from_slice(msg.payload()).or_reject("order is not JSON")?;
    let customer_id = order["customer_id"]
        .as_str()
        .ok_or_else(|| Error::reject("order has no customer_id"))?
        .to_owned();
    let customer: Value = http::get(format!(
        "{}/customers/{customer_id}",
        base.trim_end_matches('/')
    ))
    .header("accept", "application/json")
    .send()?
    .error_for_status()?
    .json()?;
    order["customer"] = customer;
    emit::Outgoing::new(target)
        .maybe_key(msg.key())
        .payload(order.to_string())
        .publish()?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)]
mod tests {
    use lockgate_sdk::testing::TestHost;
    use lockgate_sdk::{ErrorKind, Message};

    const URL: &str = "http://customers.test/customers/c-7";

    fn order() -> Message {
        Message::new(r#"{"id":"o-1","customer_id":"c-7"}"#)
    }

    fn host() -> TestHost {
        TestHost::new().config("customers_url", "http://customers.test")
    }

    #[test]
    fn the_order_gets_its_customer() {
        let mut host = host().http_stub("GET", URL, 200, &[], r#"{"name":"Ada"}"#);
        host.run(|| super::handle(order())).unwrap();
        let out = host.published();
        assert_eq!(out[0].topic, "orders.enriched");
        assert!(
            out[0]
                .payload_str()
                .unwrap()
                .contains(r#""customer":{"name":"Ada"}"#)
        );
        assert_eq!(host.requests()[0].url(), URL);
    }

    #[test]
    fn an_outage_retries_and_a_missing_customer_rejects() {
        let mut down = host().http_stub("GET", URL, 503, &[("retry-after", "2")], "");
        let e = down.run(|| super::handle(order())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Retry);
        assert_eq!(e.retry_delay(), Some(std::time::Duration::from_secs(2)));
        let mut missing = host().http_stub("GET", URL, 404, &[], "no such customer");
        let e = missing.run(|| super::handle(order())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Reject);
        assert!(missing.published().is_empty());
    }
}
