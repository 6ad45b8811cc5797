/* Enriches an order with its customer, looked up over HTTP: the C twin of guest-examples/enrich
 * (Rust).
 *
 * An order {"id": "o-1", "customer_id": "c-7", ...} becomes {..., "customer": {...}} on the
 * `target` topic (config, default `orders.enriched`). The customer service is `customers_url`
 * (config) + `/customers/<id>`. A 5xx, a 429 or a connection failure retries (so an outage opens
 * the route's breaker instead of dead-lettering orders); a 404 rejects (no such customer: the
 * order goes to the dead-letter destination).
 *
 * The handler's grant must allow the service:
 *
 *     [handlers.enrich.http]
 *     allowed_hosts = ["https://customers.example.com"]
 */
#include "lockgate.h"

static lockgate_result handle(const lockgate_message *msg) {
    const char *base = lockgate_config("customers_url");
    if (!base) return lockgate_reject("config key `customers_url` is not set");
    const char *target = lockgate_config("target");
    if (!target) target = "orders.enriched";
    lockgate_bytes order = lockgate_payload(msg);
    const char *customer_id;
    switch (lockgate_json_string_field(order.ptr, order.len, "customer_id", &customer_id)) {
    case LOCKGATE_JSON_OK: break;
    case LOCKGATE_JSON_INVALID: return lockgate_reject("order is not JSON");
    default: return lockgate_reject("order has no customer_id");
    }
    size_t base_len = strlen(base);
    while (base_len && base[base_len - 1] == '/') base_len--;

    lockgate_http_response_t resp;
    /* A timeout or connection failure: retry; a denial: reject. */
    LOCKGATE_TRY(lockgate_http_get(lockgate_format("%.*s/customers/%s", (int)base_len, base, customer_id),
                                   "accept", "application/json", &resp));
    /* 5xx, 429, 408: retry (Retry-After is the floor); other 4xx: reject. */
    LOCKGATE_TRY(lockgate_http_error_for_status(&resp));
    if (!lockgate_json_valid(resp.body, resp.body_len))
        return lockgate_rejectf("HTTP %u: the response is not the expected JSON", (unsigned)resp.status);

    /* The order (a valid object with at least customer_id in it) with "customer" added before
     * its closing brace: every field goes out as it came in (a "customer" the order already had
     * is overridden, as a JSON reader takes the last of duplicate names). */
    size_t close = order.len;
    while (order.ptr[close - 1] != '}') close--;
    close--; /* the index of the closing brace */
    const char *enriched = lockgate_format("%.*s,\"customer\":%.*s}", (int)close, (const char *)order.ptr,
                                           (int)resp.body_len, (const char *)resp.body);
    lockgate_bytes key;
    return lockgate_publish(target, enriched, strlen(enriched), lockgate_key(msg, &key) ? &key : NULL);
}

LOCKGATE_HANDLER(handle)
