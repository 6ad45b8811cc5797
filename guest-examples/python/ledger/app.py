"""A SQL projection, the Python twin of the Rust `ledger` example (guest-examples/ledger): each
deposit (``{"deposit_id": "...", "account": "a7", "amount": 42}``) adds its amount to its
account's row of the ``account_balances`` table (config ``table``, default ``account_balances``)
and counts it::

    CREATE TABLE account_balances (
        account text PRIMARY KEY,
        balance bigint NOT NULL,
        deposits bigint NOT NULL
    );

The statement is a plain ``balance = balance + $2``: not idempotent by itself. It is applied once
per message because it runs in the message's transaction, which lockgate commits with the
message's idempotency key (the route's ``idempotency = { key = "json:/deposit_id" }`` on the same
PostgreSQL store); a retry, a crash or a redelivery never applies it twice
(docs/handlers/sql.md). A deposit without an account or with a zero amount is rejected; a
failed statement raises :class:`lockgate_sdk.sql.SqlError`, which retries or rejects the message.
"""

from lockgate_sdk import Reject, config, handler, sql


@handler
def handle(msg):
    d = msg.json()
    if not isinstance(d, dict):
        raise Reject("a deposit is a JSON object")
    account, amount = d.get("account"), d.get("amount")
    if not isinstance(account, str) or not account or not isinstance(amount, int) or amount == 0:
        raise Reject("a deposit needs an account and a non-zero amount")
    table = config.get("table") or "account_balances"
    sql.execute(
        f"INSERT INTO {table} AS b (account, balance, deposits) VALUES ($1, $2, 1) "
        "ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2, deposits = b.deposits + 1",
        [account, amount],
    )
