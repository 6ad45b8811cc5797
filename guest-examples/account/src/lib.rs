//! The aggregate of the event-sourcing example: a bank account. Commands are JSON
//! (`{"cmd": "open" | "deposit" | "withdraw", "account": "a1", "amount": 50}`); each is checked
//! against the account's state, rebuilt from its events, and an accepted one appends one event
//! and emits it to config `events` (key: the account). Invalid commands (an overdraft, an
//! unknown account, a second open) are rejected with the reason.
//!
//! Events live in the handler's kv: `acct/<id>/version` (the last version), `acct/<id>/event/<n>`
//! (event `n`, JSON) and `acct/<id>/snapshot` (the state at a version, written every
//! `snapshot_every` events, default 10, so loading reads at most that many events). Appending
//! moves the version with compare-and-swap from the one loaded: a command that raced another
//! on the same account is retried, and sees the new state. Run the route with idempotency on:
//! then the event, the version and the snapshot commit together with the command's key, or not
//! at all.

use lockgate_sdk::emit::Outgoing;
use lockgate_sdk::{Error, Message, config, kv};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Command {
    cmd: String,
    account: String,
    #[serde(default)]
    amount: i64,
}

/// One event of an account's stream; `balance` is the balance after it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Event {
    account: String,
    version: u64,
    kind: String,
    amount: i64,
    balance: i64,
    /// The command's message id, to trace an event to what caused it.
    command: String,
}

/// An account at a version (0: not opened).
#[derive(Default, Serialize, Deserialize)]
struct State {
    version: u64,
    balance: i64,
}

fn key(account: &str, what: &str) -> String {
    format!("acct/{account}/{what}")
}

fn read<T: for<'de> Deserialize<'de>>(k: &str) -> Result<Option<T>, Error> {
    kv::get(k)?
        .map(|b| serde_json::from_slice(&b).map_err(|e| Error::retry(format!("{k}: {e}"))))
        .transpose()
}

/// The account's state: its snapshot, then the events after it.
fn load(account: &str) -> Result<State, Error> {
    let version: u64 = read(&key(account, "version"))?.unwrap_or(0);
    let mut state: State = read(&key(account, "snapshot"))?
        .filter(|s: &State| s.version <= version)
        .unwrap_or_default();
    for v in state.version + 1..=version {
        let event: Event = read(&key(account, &format!("event/{v}")))?
            .ok_or_else(|| Error::retry(format!("account {account}: event {v} is missing")))?;
        state = State {
            version: event.version,
            balance: event.balance,
        };
    }
    Ok(state)
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let c: Command = msg.json()?;
    if c.account.is_empty() || c.account.contains('/') {
        return Err(Error::reject(format!("bad account id {:?}", c.account)));
    }
    let state = load(&c.account)?;
    let a = &c.account;
    let (kind, balance) = match c.cmd.as_str() {
        "open" if state.version > 0 => {
            return Err(Error::reject(format!("account {a} already exists")));
        }
        "open" => ("opened", 0),
        "deposit" | "withdraw" if state.version == 0 => {
            return Err(Error::reject(format!("unknown account {a}")));
        }
        "deposit" | "withdraw" if c.amount <= 0 => {
            return Err(Error::reject(format!(
                "amount must be positive, got {}",
                c.amount
            )));
        }
        "deposit" => (
            "deposited",
            state
                .balance
                .checked_add(c.amount)
                .ok_or_else(|| Error::reject("balance would overflow"))?,
        ),
        "withdraw" if c.amount > state.balance => {
            return Err(Error::reject(format!(
                "overdraft: account {a} has {}, cannot withdraw {}",
                state.balance, c.amount
            )));
        }
        "withdraw" => ("withdrawn", state.balance - c.amount),
        other => {
            return Err(Error::reject(format!(
                "unknown command {other:?} (open, deposit, withdraw)"
            )));
        }
    };
    let event = Event {
        account: c.account.clone(),
        version: state.version + 1,
        kind: kind.into(),
        amount: if kind == "opened" { 0 } else { c.amount },
        balance,
        command: msg.id().into(),
    };
    // Optimistic concurrency: the version moves on only from the one this command loaded.
    let (old, new) = (state.version.to_string(), event.version.to_string());
    let expected = (state.version > 0).then_some(old.as_bytes());
    if !kv::compare_and_swap(&key(a, "version"), expected, Some(new.as_bytes()), None)? {
        return Err(Error::retry(format!(
            "account {a} moved past version {} while this command ran",
            state.version
        )));
    }
    let bytes = serde_json::to_vec(&event).map_err(|e| Error::reject(e.to_string()))?;
    kv::set(&key(a, &format!("event/{}", event.version)), &bytes)?;
    let every: u64 = config::get("snapshot_every")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    if event.version.is_multiple_of(every) {
        let snapshot = State {
            version: event.version,
            balance,
        };
        let s = serde_json::to_vec(&snapshot).map_err(|e| Error::reject(e.to_string()))?;
        kv::set(&key(a, "snapshot"), s)?;
    }
    let topic = config::get("events").ok_or_else(|| Error::reject("config `events` is not set"))?;
    Outgoing::new(topic)
        .key(a.as_bytes())
        .payload(bytes)
        .publish()?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    fn host() -> TestHost {
        TestHost::new()
            .config("events", "events")
            .config("snapshot_every", "3")
            .allow_outputs(["events"])
    }

    fn cmd(cmd: &str, account: &str, amount: i64) -> Message {
        Message::new(format!(
            r#"{{"cmd":"{cmd}","account":"{account}","amount":{amount}}}"#
        ))
    }

    fn events(host: &TestHost) -> Vec<Event> {
        host.published()
            .iter()
            .map(|p| serde_json::from_slice(&p.payload).unwrap())
            .collect()
    }

    #[test]
    fn commands_become_events_with_versions_and_balances() {
        let mut h = host();
        h.call(handle, cmd("open", "a", 0)).unwrap();
        h.call(handle, cmd("deposit", "a", 50)).unwrap();
        h.call(handle, cmd("withdraw", "a", 20)).unwrap();
        h.call(handle, cmd("deposit", "a", 5)).unwrap();
        let e = events(&h);
        let got: Vec<(u64, &str, i64)> = e
            .iter()
            .map(|e| (e.version, e.kind.as_str(), e.balance))
            .collect();
        assert_eq!(
            got,
            [
                (1, "opened", 0),
                (2, "deposited", 50),
                (3, "withdrawn", 30),
                (4, "deposited", 35)
            ]
        );
        assert_eq!(h.published()[0].key_str(), Some("a"));
        // The snapshot at version 3 plus event 4 give the same state as all four events.
        assert_eq!(
            h.kv_get("acct/a/snapshot").unwrap(),
            br#"{"version":3,"balance":30}"#
        );
        assert_eq!(h.kv_get("acct/a/version").unwrap(), b"4");
    }

    #[test]
    fn loading_uses_the_snapshot_and_the_events_after_it() {
        let mut h = host();
        h.call(handle, cmd("open", "s", 0)).unwrap();
        h.call(handle, cmd("deposit", "s", 10)).unwrap();
        h.call(handle, cmd("deposit", "s", 10)).unwrap();
        // Events before the snapshot (version 3) are no longer read: losing one changes nothing.
        h.kv_set("acct/s/event/2", "not json", None);
        h.call(handle, cmd("withdraw", "s", 5)).unwrap();
        assert_eq!(events(&h).last().unwrap().balance, 15);
        // An event after the snapshot that cannot be read is a retry, never a wrong balance.
        h.kv_set("acct/s/event/4", "not json", None);
        let err = h.call(handle, cmd("deposit", "s", 1)).unwrap_err();
        assert!(err.is_retry(), "{err:?}");
    }

    #[test]
    fn invalid_commands_are_rejected_with_the_reason() {
        let mut h = host();
        let reason = |h: &mut TestHost, m| h.call(handle, m).unwrap_err().reason().to_owned();
        assert_eq!(reason(&mut h, cmd("deposit", "x", 5)), "unknown account x");
        h.call(handle, cmd("open", "x", 0)).unwrap();
        assert_eq!(
            reason(&mut h, cmd("open", "x", 0)),
            "account x already exists"
        );
        h.call(handle, cmd("deposit", "x", 10)).unwrap();
        assert_eq!(
            reason(&mut h, cmd("withdraw", "x", 11)),
            "overdraft: account x has 10, cannot withdraw 11"
        );
        assert_eq!(
            reason(&mut h, cmd("withdraw", "x", 0)),
            "amount must be positive, got 0"
        );
        assert!(reason(&mut h, cmd("close", "x", 0)).contains("unknown command"));
        assert_eq!(events(&h).len(), 2, "rejections append nothing");
    }
}
