/* A test instrument for the SDK's HTTP helper (tests/tests/guests_c.rs): each message is a JSON
 * request description, {"method": "POST", "url": "...", "auth": "secret", "body_bytes": 10000,
 * "redirects": false}, sent with the headers `x-keep: 1`, `authorization: <auth>` when given, and
 * `content-type: text/plain` with a body of body_bytes bytes (`a` to `z`, repeating). It
 * publishes what came back to `probe.out`: the status and the error kind (or "") in headers
 * `status` and `error`, the response body as the payload. */
#include "lockgate.h"

static const char *const KINDS[] = {"", "denied", "timeout", "connection", "too_large", "invalid"};

static lockgate_result handle(const lockgate_message *msg) {
    lockgate_bytes spec = lockgate_payload(msg), raw;
    lockgate_http_request_t req = {0};
    lockgate_http_header_t headers[3] = {{"x-keep", "1"}};
    size_t n = 1;
    if (lockgate_json_string_field(spec.ptr, spec.len, "url", &req.url) != LOCKGATE_JSON_OK)
        return lockgate_reject("no url");
    if (lockgate_json_string_field(spec.ptr, spec.len, "method", &req.method) != LOCKGATE_JSON_OK) req.method = NULL;
    const char *auth;
    if (lockgate_json_string_field(spec.ptr, spec.len, "auth", &auth) == LOCKGATE_JSON_OK)
        headers[n++] = (lockgate_http_header_t){"authorization", auth};
    if (lockgate_json_field(spec.ptr, spec.len, "body_bytes", &raw) == LOCKGATE_JSON_OK) {
        size_t len = (size_t)strtoull(lockgate_strndup(raw.ptr, raw.len), NULL, 10);
        uint8_t *body = (uint8_t *)lockgate_alloc(len ? len : 1);
        for (size_t i = 0; i < len; i++) body[i] = (uint8_t)('a' + i % 26);
        req.body = body;
        req.body_len = len;
        headers[n++] = (lockgate_http_header_t){"content-type", "text/plain"};
    }
    if (lockgate_json_field(spec.ptr, spec.len, "redirects", &raw) == LOCKGATE_JSON_OK)
        req.no_redirects = raw.len == 5 && memcmp(raw.ptr, "false", 5) == 0;
    req.headers = headers;
    req.header_count = n;
    lockgate_http_response_t resp;
    lockgate_result r = lockgate_http_request(&req, &resp);
    lockgate_handler_emit_outgoing_t out = {0};
    lockgate_handler_types_header_t h[2];
    const char *status = lockgate_format("%u", (unsigned)resp.status), *kind = KINDS[resp.error];
    h[0] = (lockgate_handler_types_header_t){lockgate__str("status"), {(uint8_t *)status, strlen(status)}};
    h[1] = (lockgate_handler_types_header_t){lockgate__str("error"), {(uint8_t *)kind, strlen(kind)}};
    const char *payload = lockgate_is_ok(r) ? (const char *)resp.body : r.reason;
    size_t payload_len = lockgate_is_ok(r) ? resp.body_len : strlen(r.reason);
    out.topic = lockgate__str("probe.out");
    out.headers = (lockgate_handler_types_list_header_t){h, 2};
    out.payload = (handler_list_u8_t){(uint8_t *)payload, payload_len};
    lockgate_handler_emit_publish_error_t err;
    if (!lockgate_handler_emit_publish(&out, &err)) {
        lockgate_handler_emit_publish_error_free(&err);
        return lockgate_reject("publish refused");
    }
    return LOCKGATE_OK;
}

LOCKGATE_HANDLER(handle)
