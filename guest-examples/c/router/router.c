/* Routes a JSON message by its `kind` field to config `route.<kind>`, else to config `default`;
 * the payload and key are forwarded unchanged. Invalid JSON and a missing `kind` are rejected. */
#include "lockgate.h"

static lockgate_result handle(const lockgate_message *msg) {
    lockgate_bytes payload = lockgate_payload(msg), key;
    const char *kind;
    switch (lockgate_json_string_field(payload.ptr, payload.len, "kind", &kind)) {
    case LOCKGATE_JSON_OK: break;
    case LOCKGATE_JSON_INVALID: return lockgate_reject("payload is not valid JSON");
    case LOCKGATE_JSON_NOT_OBJECT: return lockgate_reject("payload is not a JSON object with a `kind`");
    case LOCKGATE_JSON_MISSING: return lockgate_reject("missing `kind` field");
    case LOCKGATE_JSON_NOT_STRING: return lockgate_reject("`kind` is not a string");
    }
    const char *topic = lockgate_config(lockgate_format("route.%s", kind));
    if (!topic) topic = lockgate_config("default");
    if (!topic) return lockgate_rejectf("no route for kind `%s` and no `default`", kind);
    lockgate_logf(LOCKGATE_DEBUG, "routing %s (kind `%s`) to %s", lockgate_id(msg), kind, topic);
    return lockgate_publish(topic, payload.ptr, payload.len, lockgate_key(msg, &key) ? &key : NULL);
}

LOCKGATE_HANDLER(handle)
