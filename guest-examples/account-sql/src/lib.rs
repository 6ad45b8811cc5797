//! The aggregate of the event-sourcing example on PostgreSQL: a bank account whose events live
//! in an `events` table of the handler's database (`sql = "<store>"`, docs/handlers/sql.md):
//!
//! ```sql
//! CREATE TABLE events (
//!     aggregate_id text   NOT NULL,
//!     version      bigint NOT NULL,
//!     kind         text   NOT NULL,  -- opened, deposited, withdrawn
//!     amount       bigint NOT NULL,
//!     balance      bigint NOT NULL,  -- the balance after the event
//!     command      text   NOT NULL,  -- the id of the command's message
//!     PRIMARY KEY (aggregate_id, version)
//! );
//! ```
//!
//! Commands are JSON (`{"cmd": "open" | "deposit" | "withdraw", "account": "a1", "amount":
//! 50}`). Each loads the account's last event (its version and balance), decides, and appends
//! the next version. The primary key is the optimistic concurrency check: two commands on one
//! account that loaded the same version both try to insert the next one, the second waits for
//! the first's transaction and then breaks the key (SQLSTATE 23505), and this handler answers
//! that with a retry, which runs the command again on the new state. An accepted command's event
//! is also published to config `events` (key: the account) for projections such as
//! `balances-sql`. Invalid commands (an overdraft, an unknown account, a second open) are
//! rejected with the reason and append nothing.
//!
//! Everything a command does (its event row, and with the route's idempotency key on the same
//! store, the key) commits in the message's transaction or not at all: a crash or a retry never
//! leaves half a command, and a redelivered command is not run again.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config, sql};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Command {
    cmd: String,
    account: String,
    #[serde(default)]
    amount: i64,
}

/// One event of an account's stream, as published (the same shape as the kv `account`
/// example's, so one projection test fits both).
#[derive(Debug, Serialize)]
struct Event<'a> {
    account: &'a str,
    version: i64,
    kind: &'a str,
    amount: i64,
    balance: i64,
    command: &'a str,
}

/// What to append for command `c` on an account at `version` with `balance`, or why not.
fn decide(c: &Command, version: i64, balance: i64) -> Result<(&'static str, i64), Error> {
    let a = &c.account;
    match c.cmd.as_str() {
        "open" if version > 0 => Err(Error::reject(format!("account {a} already exists"))),
        "open" => Ok(("opened", 0)),
        "deposit" | "withdraw" if version == 0 => {
            Err(Error::reject(format!("unknown account {a}")))
        }
        "deposit" | "withdraw" if c.amount <= 0 => Err(Error::reject(format!(
            "amount must be positive, got {}",
            c.amount
        ))),
        "deposit" => balance
            .checked_add(c.amount)
            .map(|b| ("deposited", b))
            .ok_or_else(|| Error::reject("balance would overflow")),
        "withdraw" if c.amount > balance => Err(Error::reject(format!(
            "overdraft: account {a} has {balance}, cannot withdraw {}",
            c.amount
        ))),
        "withdraw" => Ok(("withdrawn", balance - c.amount)),
        other => Err(Error::reject(format!(
            "unknown command {other:?} (open, deposit, withdraw)"
        ))),
    }
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let c: Command = msg.json()?;
    if c.account.is_empty() {
        return Err(Error::reject("a command needs an account"));
    }
    let last = sql::query(
        "SELECT version, balance FROM events WHERE aggregate_id = $1 ORDER BY version DESC LIMIT 1",
        &[c.account.as_str().into()],
    )?;
    let (version, balance) = match last.first() {
        Some(row) => (row.get::<i64>("version")?, row.get::<i64>("balance")?),
        None => (0, 0),
    };
    let (kind, balance) = decide(&c, version, balance)?;
    let event = Event {
        account: &c.account,
        version: version + 1,
        kind,
        amount: if kind == "opened" { 0 } else { c.amount },
        balance,
        command: msg.id(),
    };
    let appended = sql::execute(
        "INSERT INTO events (aggregate_id, version, kind, amount, balance, command)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            event.account.into(),
            event.version.into(),
            event.kind.into(),
            event.amount.into(),
            event.balance.into(),
            event.command.into(),
        ],
    );
    match appended {
        // Another command appended this version first: decide again on the new state.
        Err(e) if e.is_unique_violation() => {
            return Err(Error::retry(format!(
                "account {} moved past version {version} while this command ran",
                c.account
            )));
        }
        other => other?,
    };
    let topic = config::get("events").ok_or_else(|| Error::reject("config `events` is not set"))?;
    let bytes = serde_json::to_vec(&event).map_err(|e| Error::reject(e.to_string()))?;
    Outgoing::new(topic)
        .key(c.account.as_bytes())
        .payload(bytes)
        .publish()?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn cmd(cmd: &str, amount: i64) -> Command {
        Command {
            cmd: cmd.into(),
            account: "a".into(),
            amount,
        }
    }

    #[test]
    fn decisions_follow_the_account_state() {
        assert_eq!(decide(&cmd("open", 0), 0, 0).unwrap(), ("opened", 0));
        assert!(decide(&cmd("open", 0), 1, 0).is_err());
        assert!(decide(&cmd("deposit", 5), 0, 0).is_err());
        assert_eq!(
            decide(&cmd("deposit", 5), 3, 10).unwrap(),
            ("deposited", 15)
        );
        assert_eq!(
            decide(&cmd("withdraw", 10), 3, 10).unwrap(),
            ("withdrawn", 0)
        );
        let e = decide(&cmd("withdraw", 11), 3, 10).unwrap_err();
        assert!(e.to_string().contains("overdraft"), "{e}");
        assert!(decide(&cmd("deposit", 0), 3, 10).is_err());
    }
}
