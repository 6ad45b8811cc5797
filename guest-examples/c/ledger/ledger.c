/* A SQL projection, the C twin of guest-examples/ledger (Rust): each deposit
 * (`{"deposit_id": "...", "account": "a7", "amount": 42}`) adds its amount to its account's row of
 * the `account_balances` table (config `table`, default `account_balances`) and counts it:
 *
 *     CREATE TABLE account_balances (
 *         account text PRIMARY KEY,
 *         balance bigint NOT NULL,
 *         deposits bigint NOT NULL
 *     );
 *
 * The statement is a plain `balance = balance + $2`: not idempotent by itself. It is applied once
 * per message because it runs in the message's transaction, which lockgate commits with the
 * message's idempotency key (the route's `idempotency = { key = "json:/deposit_id" }` on the same
 * PostgreSQL store); a retry, a crash or a redelivery never applies it twice
 * (docs/handlers/sql.md). A deposit without an account or with a zero amount is rejected.
 *
 * It calls the generated lockgate_handler_sql_execute directly, and lockgate_sql_error turns a
 * failed statement into a retry (database unreachable, serialization failure, deadlock, ...) or a
 * rejection (anything else), with the SQLSTATE in the reason. */
#include <errno.h>

#include "lockgate.h"

/* Parses all of `text` as a decimal integer that fits in 64 bits (a JSON integer, as the Rust
 * example's i64 accepts it: no fraction, no exponent). */
static bool parse_i64(const char *text, int64_t *out) {
    if (*text != '-' && (*text < '0' || *text > '9')) return false;
    char *end;
    errno = 0;
    long long n = strtoll(text, &end, 10);
    if (errno == ERANGE || *end != '\0') return false;
    *out = n;
    return true;
}

static lockgate_result handle(const lockgate_message *msg) {
    lockgate_bytes payload = lockgate_payload(msg);
    const char *account = NULL;
    lockgate_bytes raw_amount;
    int64_t amount = 0;
    lockgate_json_status status = lockgate_json_string_field(payload.ptr, payload.len, "account", &account);
    if (status == LOCKGATE_JSON_INVALID || status == LOCKGATE_JSON_NOT_OBJECT)
        return lockgate_reject("payload is not valid JSON: a deposit is an object");
    if (status != LOCKGATE_JSON_OK)
        return lockgate_reject("payload does not match a deposit: `account` is not a string");
    if (lockgate_json_field(payload.ptr, payload.len, "amount", &raw_amount) != LOCKGATE_JSON_OK ||
        !parse_i64(lockgate_strndup(raw_amount.ptr, raw_amount.len), &amount))
        return lockgate_reject("payload does not match a deposit: `amount` is not a 64-bit integer");
    if (*account == '\0' || amount == 0) return lockgate_reject("a deposit needs an account and a non-zero amount");

    const char *table = lockgate_config("table");
    if (!table) table = "account_balances";
    const char *statement = lockgate_format(
        "INSERT INTO %s AS b (account, balance, deposits) VALUES ($1, $2, 1)\n"
        "ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2, deposits = b.deposits + 1",
        table);
    handler_string_t sql = {(uint8_t *)statement, strlen(statement)};
    lockgate_handler_sql_value_t values[] = {
        {.tag = LOCKGATE_HANDLER_SQL_VALUE_TEXT, .val.text = {(uint8_t *)account, strlen(account)}},
        {.tag = LOCKGATE_HANDLER_SQL_VALUE_INT64, .val.int64 = amount},
    };
    lockgate_handler_sql_list_value_t params = {values, sizeof values / sizeof *values};
    uint64_t affected;
    lockgate_handler_sql_sql_error_t err;
    if (!lockgate_handler_sql_execute(&sql, &params, &affected, &err)) return lockgate_sql_error(&err);
    return LOCKGATE_OK;
}

LOCKGATE_HANDLER(handle)
