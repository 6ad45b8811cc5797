//! The projection of the event-sourcing example: account events (from the `account` handler)
//! become a balance per account in the handler's kv, `balance/<account>` =
//! `{"version": v, "balance": b}`. Every event carries the balance after it, so the view keeps
//! the newest version it has seen: an event at or below the stored version changes nothing, one
//! above it replaces the view. The view does not depend on the order events arrive in, which
//! matters: the commands of one account are handled on several lanes (they race, and optimistic
//! concurrency orders their versions), and each lane publishes its events on its own, so version
//! 7 may reach the events topic before version 6. A redelivery, or a rebuild from offset 0 into
//! an empty view, ends in the same balances.

use lockgate_sdk::{Error, Message, kv};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Event {
    account: String,
    version: u64,
    balance: i64,
}

/// What the view holds per account.
#[derive(Serialize, Deserialize)]
struct View {
    version: u64,
    balance: i64,
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let e: Event = msg.json()?;
    let key = format!("balance/{}", e.account);
    let applied = match kv::get(&key)? {
        Some(b) => {
            serde_json::from_slice::<View>(&b)
                .map_err(|err| Error::retry(format!("{key}: {err}")))?
                .version
        }
        None => 0,
    };
    if e.version <= applied {
        return Ok(());
    }
    let view = View {
        version: e.version,
        balance: e.balance,
    };
    let bytes = serde_json::to_vec(&view).map_err(|err| Error::reject(err.to_string()))?;
    kv::set(&key, bytes)?;
    Ok(())
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::testing::TestHost;

    fn event(account: &str, version: u64, balance: i64) -> Message {
        Message::new(format!(
            r#"{{"account":"{account}","version":{version},"kind":"deposited","amount":1,"balance":{balance}}}"#
        ))
    }

    #[test]
    fn events_move_the_view_once_and_in_order() {
        let mut h = TestHost::new();
        h.call(handle, event("a", 1, 0)).unwrap();
        h.call(handle, event("a", 2, 40)).unwrap();
        // A redelivered event changes nothing.
        h.call(handle, event("a", 1, 0)).unwrap();
        assert_eq!(
            h.kv_get("balance/a").unwrap(),
            br#"{"version":2,"balance":40}"#
        );
        // Out of order: the newest version wins, the older one arriving later changes nothing.
        h.call(handle, event("a", 4, 99)).unwrap();
        h.call(handle, event("a", 3, 70)).unwrap();
        assert_eq!(
            h.kv_get("balance/a").unwrap(),
            br#"{"version":4,"balance":99}"#
        );
    }
}
