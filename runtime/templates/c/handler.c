/* Enriches orders. Each message on `orders` is a JSON order such as
 * {"id": "o-1", "sku": "tea", "qty": 3, "unit_price": 4.5}; the handler prices it, adds
 * `unit_price`, `total` and `tier` to it and publishes it to config `output`, keyed by the order
 * id. An order without `unit_price` is priced from kv `price/<sku>` (a number stored as text).
 *
 * Everything lockgate.h returns (strings, copies, formatted text) is freed when the handler
 * returns: no free() here. */
#include <limits.h>

#include "lockgate.h"

/* Reads all of `text` (spaces around it allowed) as a finite decimal number. */
static bool parse_number(const char *text, double *out) {
    char *end;
    double value = strtod(text, &end);
    if (end == text || value != value || value > 1e308 || value < -1e308) return false;
    while (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r') end++;
    *out = value;
    return *end == '\0';
}

/* qty as written in the JSON must be digits only: 3.0, -1, 1e2 and "3" are not quantities. */
static bool parse_quantity(lockgate_bytes raw, unsigned long long *out) {
    unsigned long long n = 0;
    for (size_t i = 0; i < raw.len; i++) {
        if (raw.ptr[i] < '0' || raw.ptr[i] > '9') return false;
        unsigned digit = raw.ptr[i] - '0';
        if (n > (ULLONG_MAX - digit) / 10) return false; /* beyond 64 bits */
        n = n * 10 + digit;
    }
    *out = n;
    return n > 0;
}

/* A number as JSON, as other languages print it (13.5, not 13.500000): lockgate_format has no
 * %g, so print 6 decimals and drop the trailing zeros. NULL from 1e18 on (lockgate_format
 * prints numbers up to 1.8e19 only). */
static const char *json_number(double value) {
    if (value >= 1e18) return NULL;
    char *text = lockgate_format("%.6f", value);
    char *end = text + strlen(text);
    while (end[-1] == '0') end--;
    if (end[-1] == '.') end--;
    *end = '\0';
    return text;
}

/* The price of `sku` that a price feed stored in kv, as decimal text. */
static lockgate_result price_from_kv(const char *sku, double *price) {
    const char *slot = lockgate_format("price/%s", sku);
    lockgate_bytes stored;
    bool found = false;
    LOCKGATE_TRY(lockgate_kv_get(slot, &stored, &found));
    if (!found) {
        /* The feed may not have reached this sku yet: ask to be called again in a second rather
         * than dead-letter a good order. After the route's max_attempts it is dead-lettered. */
        return lockgate_retry_after(lockgate_format("no price for sku %s yet", sku), 1000);
    }
    /* kv values come back NUL-terminated, so a text value is a C string. */
    if (!parse_number((const char *)stored.ptr, price) || *price < 0) {
        return lockgate_rejectf("%s holds \"%s\", not a price", slot, (const char *)stored.ptr);
    }
    return LOCKGATE_OK;
}

static lockgate_result handle(const lockgate_message *msg) {
    /* Bad input is rejected (dead-lettered at once): retrying a broken message cannot fix it.
     * Each lookup validates the whole payload, so the first one also catches invalid JSON. */
    lockgate_bytes payload = lockgate_payload(msg), raw;
    const char *id, *sku;
    switch (lockgate_json_string_field(payload.ptr, payload.len, "id", &id)) {
    case LOCKGATE_JSON_OK: break;
    case LOCKGATE_JSON_INVALID: return lockgate_reject("payload is not valid JSON");
    case LOCKGATE_JSON_NOT_OBJECT: return lockgate_reject("payload must be a JSON object");
    case LOCKGATE_JSON_MISSING:
    case LOCKGATE_JSON_NOT_STRING: return lockgate_reject("id must be a string");
    }
    if (lockgate_json_string_field(payload.ptr, payload.len, "sku", &sku) != LOCKGATE_JSON_OK) {
        return lockgate_reject("sku must be a string");
    }
    unsigned long long qty;
    if (lockgate_json_field(payload.ptr, payload.len, "qty", &raw) != LOCKGATE_JSON_OK
        || !parse_quantity(raw, &qty)) {
        return lockgate_reject("qty must be a positive integer");
    }
    double unit_price;
    const char *added_price = ""; /* the unit_price field to add, when kv priced the order */
    bool priced = lockgate_json_field(payload.ptr, payload.len, "unit_price", &raw) == LOCKGATE_JSON_OK
                  && !(raw.len == 4 && memcmp(raw.ptr, "null", 4) == 0);
    if (priced) {
        if (!parse_number(lockgate_strndup(raw.ptr, raw.len), &unit_price) || unit_price < 0) {
            return lockgate_reject("unit_price must be a number >= 0");
        }
    } else {
        LOCKGATE_TRY(price_from_kv(sku, &unit_price));
        added_price = lockgate_format(",\"unit_price\":%s", json_number(unit_price));
    }

    double large_total = 100;
    const char *text = lockgate_config("large_total");
    if (text && !parse_number(text, &large_total)) {
        return lockgate_rejectf("config large_total must be a number, not \"%s\"", text);
    }
    double total = (double)qty * unit_price;
    const char *tier = total >= large_total ? "large" : "small";
    const char *total_text = json_number(total);
    if (!total_text) return lockgate_reject("total is too large");

    /* The output is the input object as written, every field kept, with ours added before its
     * closing brace (it has at least `id`, hence the comma). A field the input already has,
     * such as `total` or a null `unit_price`, then appears twice; JSON readers take the last
     * one, ours. */
    const char *input = lockgate_payload_str(msg);
    size_t close = strlen(input) - 1;
    while (input[close] != '}') close--; /* past trailing whitespace */
    const char *enriched = lockgate_format("%.*s%s,\"total\":%s,\"tier\":\"%s\"}", (int)close, input,
                                           added_price, total_text, tier);

    const char *output = lockgate_config("output");
    if (!output) output = "orders.enriched";
    /* Keyed by the order id: on Kafka, every update of one order lands on one partition, in order. */
    lockgate_bytes key = {(const uint8_t *)id, strlen(id)};
    LOCKGATE_TRY(lockgate_publish(output, enriched, strlen(enriched), &key));
    lockgate_logf(LOCKGATE_INFO, "Order %s: %llu x %s at %s = %s (%s)", id, qty, sku,
                  json_number(unit_price), total_text, tier);
    return LOCKGATE_OK;
}

LOCKGATE_HANDLER(handle)
