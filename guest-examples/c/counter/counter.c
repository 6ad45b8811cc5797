/* Keeps a number per message key in kv (`count/<key>`, stored as decimal text): adds the payload
 * (an integer; empty adds 1) and publishes the sum to config `target`, keyed like the message.
 * The same handler exists in every SDK language; tests/fixtures/counter checks that they all
 * store, read and add the same way. */
#include "lockgate.h"

/* Parses all of `text` (surrounding spaces allowed) as a decimal integer. */
static bool parse_integer(const char *text, long long *out) {
    while (*text == ' ' || *text == '\t' || *text == '\n' || *text == '\r') text++;
    if (*text == '\0') return false;
    char *end;
    long long n = strtoll(text, &end, 10);
    if (end == text) return false;
    while (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r') end++;
    if (*end != '\0') return false;
    *out = n;
    return true;
}

static bool blank(const char *text) {
    for (; *text; text++) {
        if (*text != ' ' && *text != '\t' && *text != '\n' && *text != '\r') return false;
    }
    return true;
}

static lockgate_result handle(const lockgate_message *msg) {
    lockgate_bytes key;
    if (!lockgate_key(msg, &key)) return lockgate_reject("no key: the count is kept per message key");
    const char *key_str = lockgate_strndup(key.ptr, key.len);
    const char *text = lockgate_payload_str(msg);
    long long add = 1;
    if (!blank(text) && !parse_integer(text, &add)) {
        return lockgate_rejectf("payload \"%s\" is not an integer", text);
    }
    const char *slot = lockgate_format("count/%s", key_str);
    lockgate_bytes stored = {0};
    bool found = false;
    LOCKGATE_TRY(lockgate_kv_get(slot, &stored, &found));
    long long current = 0;
    if (found && !parse_integer((const char *)stored.ptr, &current)) {
        return lockgate_rejectf("%s holds \"%s\", not a number", slot, (const char *)stored.ptr);
    }
    const char *sum = lockgate_format("%lld", current + add);
    LOCKGATE_TRY(lockgate_kv_set(slot, sum, strlen(sum), 0));
    const char *target = lockgate_config("target");
    if (!target) return lockgate_reject("config `target` is not set");
    return lockgate_publish(target, sum, strlen(sum), &key);
}

LOCKGATE_HANDLER(handle)
