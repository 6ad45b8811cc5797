/* Native self-test of lockgate.h's JSON scanner and formatter (no wasm, no host): compiled and
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
    if (failures) {
        fprintf(stderr, "lockgate.h self-test: %d failure(s)\n", failures);
        return 1;
    }
    return 0;
}
