// Enriches orders. Each message on `orders` is a JSON order such as
// {"id": "o-1", "sku": "tea", "qty": 3, "unit_price": 4.5}; the handler prices it, adds
// `unit_price`, `total` and `tier` to it and publishes it to config `output`, keyed by the order
// id. An order without `unit_price` is priced from kv `price/<sku>` (a number stored as text).

import { handler, publish, config, kv, log, Reject, Retry } from "lockgate-sdk";

export const handle = handler((msg) => {
  // A plain object keeps the fields this handler does not know, so they reach the output
  // unchanged. Invalid JSON throws Reject: retrying a broken message cannot fix it.
  const order = msg.json();
  if (order === null || typeof order !== "object" || Array.isArray(order)) {
    throw new Reject("payload must be a JSON object");
  }
  if (typeof order.id !== "string") throw new Reject("id must be a string");
  if (typeof order.sku !== "string") throw new Reject("sku must be a string");
  // JavaScript has one number type: 3.0 in the JSON is 3 here, and passes as an integer.
  if (!Number.isSafeInteger(order.qty) || order.qty <= 0) {
    throw new Reject("qty must be a positive integer");
  }
  if (order.unit_price === undefined || order.unit_price === null) {
    order.unit_price = priceFromKv(order.sku);
  } else if (!Number.isFinite(order.unit_price) || order.unit_price < 0) {
    throw new Reject("unit_price must be a number >= 0");
  }

  order.total = order.qty * order.unit_price;
  order.tier = order.total >= largeTotal() ? "large" : "small";

  // Keyed by the order id: on Kafka, every update of one order lands on one partition, in order.
  publish(config.get("output", "orders.enriched"), JSON.stringify(order), { key: order.id });
  log.info(`Order ${order.id}: ${order.qty} x ${order.sku} at ${order.unit_price} = ${order.total} (${order.tier})`);
});

// A decimal number in text; NaN for anything else (Number("") would be 0).
function parseNumber(text) {
  return text.trim() === "" ? NaN : Number(text);
}

// The price of `sku` that a price feed stored in kv, as decimal text.
function priceFromKv(sku) {
  const slot = `price/${sku}`;
  const stored = kv.getText(slot); // a string, or undefined
  if (stored === undefined) {
    // The feed may not have reached this sku yet: ask to be called again in a second rather
    // than dead-letter a good order. After the route's max_attempts it is dead-lettered.
    throw new Retry(`no price for sku ${sku} yet`, 1000);
  }
  const price = parseNumber(stored);
  if (!Number.isFinite(price) || price < 0) throw new Reject(`${slot} holds "${stored}", not a price`);
  return price;
}

// Config `large_total` (default 100): the total from which an order is "large".
function largeTotal() {
  const text = config.get("large_total", "100");
  const value = parseNumber(text);
  if (Number.isNaN(value)) throw new Reject(`config large_total must be a number, not "${text}"`);
  return value;
}
