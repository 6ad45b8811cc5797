/* Native self-test of lockgate.h's JSON scanner, formatter and HTTP helpers (no wasm, no host): compiled and
 * run by scripts/build-guest-c.sh before it builds any guest. Exits non-zero on a failure. */
#include <stdio.h>

#include "lockgate.h"

static int failures;

static void check(const char *json, lockgate_json_status want, const char *want_value) {
    const char *value = NULL;
    lockgate_json_status got =
        lockgate_json_string_field((const uint8_t *)json, strlen(json), "kind", &value);
    int ok = got == want && (want != LOCKGATE_JSON_OK || strcmp(value, want_value) == 0);
    if (!ok) {
        fprintf(stderr, "FAIL %s: status %d (want %d), value %s\n", json, got, want,
                value ? value : "(none)");
        failures++;
    }
    lockgate__free_all();
}

/* lockgate_json_field: `want_raw` is the value as written, for LOCKGATE_JSON_OK. */
static void check_field(const char *json, const char *field, lockgate_json_status want, const char *want_raw) {
    lockgate_bytes value = {NULL, 0};
    lockgate_json_status got = lockgate_json_field((const uint8_t *)json, strlen(json), field, &value);
    int ok = got == want && (want != LOCKGATE_JSON_OK
                             || (value.len == strlen(want_raw) && memcmp(value.ptr, want_raw, value.len) == 0));
    if (!ok) {
        fprintf(stderr, "FAIL %s [%s]: status %d (want %d), value %.*s\n", json, field, got, want,
                (int)value.len, value.ptr ? (const char *)value.ptr : "");
        failures++;
    }
    lockgate__free_all();
}

static void check_format(const char *got, const char *want) {
    if (strcmp(got, want) != 0) {
        fprintf(stderr, "FAIL format: got \"%s\", want \"%s\"\n", got, want);
        failures++;
    }
    lockgate__free_all();
}

static void check_str(const char *what, const char *got, const char *want) {
    if (!got || strcmp(got, want) != 0) {
        fprintf(stderr, "FAIL %s: got \"%s\", want \"%s\"\n", what, got ? got : "(null)", want);
        failures++;
    }
}

/* The HTTP helper's pure parts: URLs, redirects' targets, and statuses to outcomes. */
static void check_http(void) {
    bool https = false;
    const char *authority = NULL, *path = NULL;
    if (!lockgate__http_split("HTTPS://api.example.com:8443/v1/x?q=1#frag", &https, &authority, &path) || !https) {
        fprintf(stderr, "FAIL http split: https URL\n");
        failures++;
    }
    check_str("authority", authority, "api.example.com:8443");
    check_str("path", path, "/v1/x?q=1");
    if (!lockgate__http_split("http://h", &https, &authority, &path) || https) failures++;
    check_str("empty path", path, "/");
    if (lockgate__http_split("ftp://h/", &https, &authority, &path) || lockgate__http_split("/relative", &https, &authority, &path)
        || lockgate__http_split("http:///x", &https, &authority, &path)) {
        fprintf(stderr, "FAIL http split: accepted a bad URL\n");
        failures++;
    }
    check_str("resolve /d", lockgate__http_resolve("http://a/b/c", "/d"), "http://a/d");
    check_str("resolve d", lockgate__http_resolve("http://a/b/c?x=/y", "d"), "http://a/b/d");
    check_str("resolve bare host", lockgate__http_resolve("http://a", "d"), "http://a/d");
    check_str("resolve absolute", lockgate__http_resolve("http://a/b", "https://z/"), "https://z/");
    check_str("resolve //", lockgate__http_resolve("https://a/b", "//z/y"), "https://z/y");
    check_str("origin", lockgate__http_origin("HTTP://A:80/x?y"), "http://A:80");

    lockgate_http_header_t headers[] = {{"content-type", "text/plain"}, {"retry-after", " 2 "}};
    lockgate_http_response_t resp = {0};
    resp.body = (const uint8_t *)" nope\n";
    resp.body_len = 6;
    resp.status = 200;
    if (!lockgate_is_ok(lockgate_http_error_for_status(&resp))) failures++;
    resp.status = 302;
    if (!lockgate_is_ok(lockgate_http_error_for_status(&resp))) failures++;
    resp.status = 503;
    lockgate_result r = lockgate_http_error_for_status(&resp);
    if (r.kind != LOCKGATE_RESULT_RETRY || r.has_after) failures++;
    resp.headers = headers;
    resp.header_count = 2;
    check_str("header lookup", lockgate_http_response_header(&resp, "Retry-After"), " 2 ");
    resp.status = 429;
    r = lockgate_http_error_for_status(&resp);
    if (r.kind != LOCKGATE_RESULT_RETRY || !r.has_after || r.after_ms != 2000) {
        fprintf(stderr, "FAIL 429 with Retry-After: kind %d, after %d/%llu\n", r.kind, r.has_after,
                (unsigned long long)r.after_ms);
        failures++;
    }
    resp.status = 404;
    r = lockgate_http_error_for_status(&resp);
    if (r.kind != LOCKGATE_RESULT_REJECT) failures++;
    check_str("404 reason", r.reason, "HTTP 404: nope");
    lockgate__free_all();
}

int main(void) {
    check_format(lockgate_format("route.%s", "order"), "route.order");
    check_format(lockgate_format("%d|%i|%u|%x|%c|%%", -42, 7, 42u, 255u, 'z'), "-42|7|42|ff|z|%");
    check_format(lockgate_format("%lld %llu %zu %ld", -9223372036854775807LL - 1, 18446744073709551615ULL,
                                 (size_t)12, -1L),
                 "-9223372036854775808 18446744073709551615 12 -1");
    check_format(lockgate_format("[%.*s]", 3, "abcdef"), "[abc]");
    check_format(lockgate_format("[%s]", ""), "[]");
    check_format(lockgate_format("%d", 0), "0");
    check_format(lockgate_format("no directives"), "no directives");
    check_format(lockgate_format("%5d|%-3s|%08.3f|%.2f|%f", 7, "ab", 3.14159, -2.005, 0.5), "7|ab|3.142|-2.00|0.500000");
    check_format(lockgate_format("%.0f %.1f %hhu %hd %X", 2.5, 9.96, 300, 70000, 0xabcu), "3 10.0 44 4464 ABC");
    check("{\"kind\":\"order\",\"id\":1}", LOCKGATE_JSON_OK, "order");
    check(" { \"id\" : [1, 2.5e-3, {\"kind\": 3}], \"kind\" : \"refund\" } ", LOCKGATE_JSON_OK, "refund");
    check("{\"kind\":\"a\\\"b\\\\c\\u00e9\\ud83d\\ude00\"}", LOCKGATE_JSON_OK, "a\"b\\c\xc3\xa9\xf0\x9f\x98\x80");
    check("{\"kind\":\"\xc3\xa9t\xc3\xa9\"}", LOCKGATE_JSON_OK, "\xc3\xa9t\xc3\xa9");
    check("{\"kind\":\"first\",\"kind\":\"second\"}", LOCKGATE_JSON_OK, "first");
    check("{\"id\":4}", LOCKGATE_JSON_MISSING, NULL);
    check("{}", LOCKGATE_JSON_MISSING, NULL);
    check("{\"nested\":{\"kind\":\"x\"}}", LOCKGATE_JSON_MISSING, NULL);
    check("{\"kind\":7}", LOCKGATE_JSON_NOT_STRING, NULL);
    check("{\"kind\":null}", LOCKGATE_JSON_NOT_STRING, NULL);
    check("[\"kind\"]", LOCKGATE_JSON_NOT_OBJECT, NULL);
    check("\"kind\"", LOCKGATE_JSON_NOT_OBJECT, NULL);
    check("42", LOCKGATE_JSON_NOT_OBJECT, NULL);
    const char *invalid[] = {
        "", " ", "{not json", "{", "}", "{\"kind\":\"order\"", "{\"kind\" \"order\"}",
        "{\"kind\":\"order\",}", "{\"kind\":'order'}", "{kind:\"order\"}", "[1,]", "[01]", "[1.]",
        "[-]", "[1e]", "[.5]", "[tru]", "[nul]", "{\"kind\":\"a\"} x", "{\"kind\":\"a\nb\"}",
        "{\"kind\":\"\\x\"}", "{\"kind\":\"\\u12\"}", "{\"kind\":\"\\ud800\"}", "{\"kind\":\"\\udc00\"}",
        "{\"kind\":\"\xff\"}", "{\"kind\":\"\xc0\xaf\"}", "{\"kind\":\"\xed\xa0\x80\"}", "{\"kind\":\"\xc3\"}",
    };
    for (size_t i = 0; i < sizeof invalid / sizeof *invalid; i++) {
        check(invalid[i], LOCKGATE_JSON_INVALID, NULL);
        check_field(invalid[i], "kind", LOCKGATE_JSON_INVALID, NULL);
    }
    const char *order = " {\"id\": \"o-1\", \"qty\": 3, \"price\" : -4.5e+1 , \"tags\": [\"a\", {\"qty\": 9}],"
                        " \"note\": \"a \\\"b\\\"\", \"gift\": null, \"ok\":true,\"qty\":4} ";
    check_field(order, "qty", LOCKGATE_JSON_OK, "3");
    check_field(order, "price", LOCKGATE_JSON_OK, "-4.5e+1");
    check_field(order, "id", LOCKGATE_JSON_OK, "\"o-1\"");
    check_field(order, "tags", LOCKGATE_JSON_OK, "[\"a\", {\"qty\": 9}]");
    check_field(order, "note", LOCKGATE_JSON_OK, "\"a \\\"b\\\"\"");
    check_field(order, "gift", LOCKGATE_JSON_OK, "null");
    check_field(order, "ok", LOCKGATE_JSON_OK, "true");
    check_field(order, "sku", LOCKGATE_JSON_MISSING, NULL);
    check_field("{\"a\":{\"sku\":1}}", "sku", LOCKGATE_JSON_MISSING, NULL);
    check_field("[{\"qty\":1}]", "qty", LOCKGATE_JSON_NOT_OBJECT, NULL);
    check_field("7", "qty", LOCKGATE_JSON_NOT_OBJECT, NULL);
    /* Nesting: the limit holds, and just under it is fine. */
    char deep[2 * LOCKGATE_JSON_MAX_DEPTH + 16];
    size_t n = 0;
    deep[n++] = '{'; memcpy(deep + n, "\"a\":", 4); n += 4;
    for (int i = 1; i < LOCKGATE_JSON_MAX_DEPTH; i++) deep[n++] = '[';
    for (int i = 1; i < LOCKGATE_JSON_MAX_DEPTH; i++) deep[n++] = ']';
    deep[n++] = '}'; deep[n] = '\0';
    check(deep, LOCKGATE_JSON_MISSING, NULL);
    n = 0;
    for (int i = 0; i <= LOCKGATE_JSON_MAX_DEPTH; i++) deep[n++] = '[';
    for (int i = 0; i <= LOCKGATE_JSON_MAX_DEPTH; i++) deep[n++] = ']';
    deep[n] = '\0';
    check(deep, LOCKGATE_JSON_INVALID, NULL);
    check_http();
    if (failures) {
        fprintf(stderr, "lockgate.h self-test: %d failure(s)\n", failures);
        return 1;
    }
    return 0;
}
