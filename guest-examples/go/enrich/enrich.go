// Package handler enriches an order with its customer, looked up over HTTP: the Go twin of
// guest-examples/enrich (Rust).
//
// An order `{"id": "o-1", "customer_id": "c-7", ...}` becomes `{..., "customer": {...}}` on the
// `target` topic (config, default `orders.enriched`). The customer service is `customers_url`
// (config) + `/customers/<id>`. A 5xx, a 429 or a connection failure retries (so an outage opens
// the route's breaker instead of dead-lettering orders); a 404 rejects (no such customer: the
// order goes to the dead-letter destination).
//
// The handler's grant must allow the service:
//
//	[handlers.enrich.http]
//	allowed_hosts = ["https://customers.example.com"]
package handler

import (
	"encoding/json"
	"strings"

	"lockgate"
)

// Handle enriches one order.
func Handle(msg lockgate.Message) error {
	base, ok := lockgate.Config("customers_url")
	if !ok {
		return lockgate.Reject("config key `customers_url` is not set")
	}
	target, ok := lockgate.Config("target")
	if !ok {
		target = "orders.enriched"
	}
	// Raw values: every field of the order and the customer goes out exactly as it came in.
	var order map[string]json.RawMessage
	if err := json.Unmarshal(msg.Payload(), &order); err != nil || order == nil {
		return lockgate.Reject("order is not JSON")
	}
	var customerID string
	if err := json.Unmarshal(order["customer_id"], &customerID); err != nil {
		return lockgate.Reject("order has no customer_id")
	}
	resp, err := lockgate.HTTPGet(strings.TrimRight(base, "/")+"/customers/"+customerID).
		WithHeader("accept", "application/json").
		Send() // a timeout or connection failure: retry; a denial: reject
	if err != nil {
		return err
	}
	if err := resp.ErrorForStatus(); err != nil { // 5xx, 429, 408: retry; other 4xx: reject
		return err
	}
	var customer json.RawMessage
	if err := resp.JSON(&customer); err != nil {
		return err
	}
	order["customer"] = customer
	out, err := json.Marshal(order)
	if err != nil {
		return lockgate.Reject("cannot encode the enriched order: " + err.Error())
	}
	return lockgate.Publish(target, out, msg.Key())
}
