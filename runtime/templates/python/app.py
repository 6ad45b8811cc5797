"""Enriches orders.

Each message on `orders` is a JSON order such as
`{"id": "o-1", "sku": "tea", "qty": 3, "unit_price": 4.5}`; the handler prices it, adds
`unit_price`, `total` and `tier` to it and publishes it to config `output`, keyed by the order
id. An order without `unit_price` is priced from kv `price/<sku>` (a number stored as text).
"""

import json
import math

from lockgate_sdk import Reject, Retry, config, handler, kv, log, publish


@handler
def handle(msg):
    # A dict keeps the fields this handler does not know, so they reach the output unchanged.
    # Invalid JSON raises Reject: retrying a broken message cannot fix it.
    order = msg.json()
    if not isinstance(order, dict):
        raise Reject("payload must be a JSON object")
    order_id = text_field(order, "id")
    sku = text_field(order, "sku")
    qty = order.get("qty")
    # bool is a subclass of int in Python: `"qty": true` is not a quantity.
    if not isinstance(qty, int) or isinstance(qty, bool) or qty <= 0:
        raise Reject("qty must be a positive integer")
    unit_price = order.get("unit_price")
    if unit_price is None:
        unit_price = order["unit_price"] = price_from_kv(sku)
    elif not is_price(unit_price):
        raise Reject("unit_price must be a number >= 0")

    total = qty * unit_price
    tier = "large" if total >= large_total() else "small"
    order["total"] = total
    order["tier"] = tier

    # Keyed by the order id: on Kafka, every update of one order lands on one partition, in order.
    payload = json.dumps(order, separators=(",", ":"))  # compact, as other languages write JSON
    publish(config.get("output", "orders.enriched"), payload, key=order_id)
    log.info(f"Order {order_id}: {qty} x {sku} at {unit_price} = {total} ({tier})")


def text_field(order, name):
    """The string field `name` of the order, or a rejection naming it."""
    value = order.get(name)
    if not isinstance(value, str):
        raise Reject(f"{name} must be a string")
    return value


def is_price(value):
    # Python's json reads NaN and Infinity, which no other JSON reader accepts: refuse them.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def price_from_kv(sku):
    """The price of `sku` that a price feed stored in kv, as decimal text."""
    slot = f"price/{sku}"
    stored = kv.get(slot)  # bytes, or None
    if stored is None:
        # The feed may not have reached this sku yet: ask to be called again in a second rather
        # than dead-letter a good order. After the route's max_attempts it is dead-lettered.
        raise Retry(f"no price for sku {sku} yet", after_ms=1000)
    try:
        price = float(stored)
    except ValueError:
        price = None
    if not is_price(price):
        raise Reject(f"{slot} holds {stored.decode(errors='replace')!r}, not a price")
    return price


def large_total():
    """Config `large_total` (default 100): the total from which an order is "large"."""
    text = config.get("large_total", "100")
    try:
        return float(text)
    except ValueError:
        raise Reject(f"config large_total must be a number, not {text!r}") from None
