//! A SQL projection: each deposit (`{"deposit_id": "...", "account": "a7", "amount": 42}`) adds
//! its amount to its account's row of the `account_balances` table (config `table`, default
//! `account_balances`) and counts it:
//!
//! ```sql
//! CREATE TABLE account_balances (
//!     account text PRIMARY KEY,
//!     balance bigint NOT NULL,
//!     deposits bigint NOT NULL
//! );
//! ```
//!
//! The statement is a plain `balance = balance + $2`: not idempotent by itself. It is applied
//! once per message because it runs in the message's transaction, which lockgate commits with
//! the message's idempotency key (the route's `idempotency = { key = "json:/deposit_id" }` on the
//! same PostgreSQL store); a retry, a crash or a redelivery never applies it twice
//! (docs/handlers/sql.md). A deposit without an account or with a zero amount is rejected.

use lockgate_sdk::{Error, Message, config, sql};
use serde::Deserialize;

#[derive(Deserialize)]
struct Deposit {
    account: String,
    amount: i64,
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let d: Deposit = msg.json()?;
    if d.account.is_empty() || d.amount == 0 {
        return Err(Error::reject(
            "a deposit needs an account and a non-zero amount",
        ));
    }
    let table = config::get("table").unwrap_or_else(|| "account_balances".to_owned());
    sql::execute(
        &format!(
            "INSERT INTO {table} AS b (account, balance, deposits) VALUES ($1, $2, 1)
             ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2, deposits = b.deposits + 1"
        ),
        &[d.account.into(), d.amount.into()],
    )?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_deposit_without_an_account_is_rejected_before_any_statement() {
        let mut host = TestHost::new();
        let err = host
            .call(
                handle,
                Message::new(br#"{"account": "", "amount": 5}"#.to_vec()),
            )
            .unwrap_err();
        assert_eq!(err.kind(), lockgate_sdk::ErrorKind::Reject);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_test_host_has_no_database_so_a_deposit_retries() {
        let mut host = TestHost::new();
        let err = host
            .call(
                handle,
                Message::new(br#"{"account": "a", "amount": 5}"#.to_vec()),
            )
            .unwrap_err();
        assert_eq!(err.kind(), lockgate_sdk::ErrorKind::Retry);
    }
}
