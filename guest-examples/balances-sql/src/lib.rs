//! The projection of the event-sourcing example on PostgreSQL: the account events that
//! `account-sql` publishes become a balance per account in the `account_balances` table (config
//! `table`, default `account_balances`) of the handler's database:
//!
//! ```sql
//! CREATE TABLE account_balances (
//!     account text   PRIMARY KEY,
//!     balance bigint NOT NULL,
//!     version bigint NOT NULL  -- the newest event applied
//! );
//! ```
//!
//! Each event adds its amount with `balance = balance + $2`: a delta, not idempotent by itself,
//! and applied once per event because it runs in the event message's transaction, committed
//! with the route's idempotency key on the same store (`idempotency = { key = "json:/command"
//! }`: a command appends at most one event). Deltas commute, so the events of an account may
//! arrive in any order (each command lane publishes on its own); a redelivery changes nothing,
//! and a rebuild from offset 0 into an empty table ends in the same balances, which equal a
//! replay of the `events` table.

use lockgate_sdk::{Error, Message, config, sql};
use serde::Deserialize;

#[derive(Deserialize)]
struct Event {
    account: String,
    version: i64,
    kind: String,
    amount: i64,
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let e: Event = msg.json()?;
    let delta = match e.kind.as_str() {
        "opened" => 0,
        "deposited" => e.amount,
        "withdrawn" => -e.amount,
        other => return Err(Error::reject(format!("unknown event kind {other:?}"))),
    };
    let table = config::get("table").unwrap_or_else(|| "account_balances".to_owned());
    sql::execute(
        &format!(
            "INSERT INTO {table} AS b (account, balance, version) VALUES ($1, $2, $3)
             ON CONFLICT (account) DO UPDATE
             SET balance = b.balance + $2, version = greatest(b.version, $3)"
        ),
        &[e.account.into(), delta.into(), e.version.into()],
    )?;
    Ok(())
}
