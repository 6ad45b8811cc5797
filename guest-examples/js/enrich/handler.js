// Enriches an order with its customer, looked up over HTTP (the JavaScript twin of
// guest-examples/enrich).
//
// An order `{"id": "o-1", "customer_id": "c-7", ...}` becomes `{..., "customer": {...}}` on the
// `target` topic (config, default `orders.enriched`), with the message's key. The customer
// service is `customers_url` (config) + `/customers/<id>`. A 5xx, a 429 or a connection failure
// retries (so an outage opens the route's breaker instead of dead-lettering orders); a 404
// rejects (no such customer: the order goes to the dead-letter destination).
//
// The handler's grant must allow the service:
//
//   [handlers.enrich.http]
//   allowed_hosts = ["https://customers.example.com"]

import { handler, publish, config, Reject } from "lockgate-sdk";
import { http } from "lockgate-sdk/http";

export const handle = handler((msg) => {
  const base = config.get("customers_url");
  if (base === undefined) throw new Reject("config key `customers_url` is not set");
  const target = config.get("target", "orders.enriched");
  const order = msg.json(); // not JSON: rejected
  const customerId = order !== null && typeof order === "object" ? order.customer_id : undefined;
  if (typeof customerId !== "string") throw new Reject("order has no customer_id");
  order.customer = http
    .get(`${base.replace(/\/+$/, "")}/customers/${customerId}`, { headers: { accept: "application/json" } })
    .errorForStatus()
    .json();
  publish(target, JSON.stringify(order), { key: msg.key });
});
