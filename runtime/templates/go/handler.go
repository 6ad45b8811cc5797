// Package handler enriches orders. Each message on `orders` is a JSON order such as
// {"id": "o-1", "sku": "tea", "qty": 3, "unit_price": 4.5}; the handler prices it, adds
// `unit_price`, `total` and `tier` to it and publishes it to config `output`, keyed by the order
// id. An order without `unit_price` is priced from kv `price/<sku>` (a number stored as text).
package handler

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"time"

	"lockgate"
)

// Handle enriches one order. Bad input is rejected (dead-lettered at once, never retried): in
// Go a plain error would be retried, so every refusal here is a lockgate.Reject.
func Handle(msg lockgate.Message) error {
	payload := msg.Payload()
	if !json.Valid(payload) {
		return lockgate.Reject("payload is not valid JSON")
	}
	// A map keeps the fields this handler does not know, so they reach the output unchanged.
	// UseNumber keeps numbers as written: a float64 would round a large integer in such a field.
	var order map[string]any
	decoder := json.NewDecoder(bytes.NewReader(payload))
	decoder.UseNumber()
	if err := decoder.Decode(&order); err != nil || order == nil {
		return lockgate.Reject("payload must be a JSON object")
	}
	id, ok := order["id"].(string)
	if !ok {
		return lockgate.Reject("id must be a string")
	}
	sku, ok := order["sku"].(string)
	if !ok {
		return lockgate.Reject("sku must be a string")
	}
	qtyNumber, _ := order["qty"].(json.Number)
	qty, err := strconv.ParseUint(qtyNumber.String(), 10, 64)
	if err != nil || qty == 0 {
		return lockgate.Reject("qty must be a positive integer")
	}
	var unitPrice float64
	if order["unit_price"] == nil { // absent or null
		if unitPrice, err = priceFromKV(sku); err != nil {
			return err
		}
		order["unit_price"] = unitPrice
	} else {
		priceNumber, _ := order["unit_price"].(json.Number)
		if unitPrice, err = priceNumber.Float64(); err != nil || unitPrice < 0 {
			return lockgate.Reject("unit_price must be a number >= 0")
		}
	}

	largeTotal, err := configNumber("large_total", 100)
	if err != nil {
		return err
	}
	total := float64(qty) * unitPrice
	tier := "small"
	if total >= largeTotal {
		tier = "large"
	}
	order["total"] = total
	order["tier"] = tier
	out, err := json.Marshal(order)
	if err != nil {
		return lockgate.Rejectf("cannot encode the enriched order: %v", err)
	}

	output, ok := lockgate.Config("output")
	if !ok {
		output = "orders.enriched"
	}
	// Keyed by the order id: on Kafka, every update of one order lands on one partition, in order.
	if err := lockgate.Publish(output, out, []byte(id)); err != nil {
		return err
	}
	lockgate.Infof("Order %s: %d x %s at %v = %v (%s)", id, qty, sku, unitPrice, total, tier)
	return nil
}

// parseNumber reads a finite decimal number from text (ParseFloat alone accepts "NaN" and "Inf",
// which encoding/json cannot write).
func parseNumber(text string) (float64, bool) {
	value, err := strconv.ParseFloat(strings.TrimSpace(text), 64)
	return value, err == nil && !math.IsNaN(value) && !math.IsInf(value, 0)
}

// priceFromKV returns the price of sku that a price feed stored in kv, as decimal text.
func priceFromKV(sku string) (float64, error) {
	slot := "price/" + sku
	stored, found, err := lockgate.KVGet(slot)
	if err != nil {
		return 0, err
	}
	if !found {
		// The feed may not have reached this sku yet: ask to be called again in a second rather
		// than dead-letter a good order. After the route's max_attempts it is dead-lettered.
		return 0, lockgate.RetryAfter("no price for sku "+sku+" yet", time.Second)
	}
	price, ok := parseNumber(string(stored))
	if !ok || price < 0 {
		return 0, lockgate.Rejectf("%s holds %q, not a price", slot, stored)
	}
	return price, nil
}

// configNumber returns the handler config value key as a number, or fallback when it is unset.
func configNumber(key string, fallback float64) (float64, error) {
	text, ok := lockgate.Config(key)
	if !ok {
		return fallback, nil
	}
	value, ok := parseNumber(text)
	if !ok {
		return 0, lockgate.Rejectf("config %s must be a number, not %q", key, text)
	}
	return value, nil
}
