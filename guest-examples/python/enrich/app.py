"""Enriches an order with its customer, looked up over HTTP (the Python twin of
guest-examples/enrich).

An order ``{"id": "o-1", "customer_id": "c-7", ...}`` becomes ``{..., "customer": {...}}`` on the
``target`` topic (config, default ``orders.enriched``), with the message's key. The customer
service is ``customers_url`` (config) + ``/customers/<id>``. A 5xx, a 429 or a connection failure
retries (so an outage opens the route's breaker instead of dead-lettering orders); a 404 rejects
(no such customer: the order goes to the dead-letter destination).

The handler's grant must allow the service::

    [handlers.enrich.http]
    allowed_hosts = ["https://customers.example.com"]
"""

import json

from lockgate_sdk import Reject, config, handler, http, publish


@handler
def handle(msg):
    base = config.get("customers_url")
    if base is None:
        raise Reject("config key `customers_url` is not set")
    target = config.get("target", "orders.enriched")
    order = msg.json()  # not JSON: rejected
    customer_id = order.get("customer_id") if isinstance(order, dict) else None
    if not isinstance(customer_id, str):
        raise Reject("order has no customer_id")
    customer = (
        http.get(f"{base.rstrip('/')}/customers/{customer_id}", headers={"accept": "application/json"})
        .error_for_status()
        .json()
    )
    order["customer"] = customer
    publish(target, json.dumps(order, separators=(",", ":")), key=msg.key)
