//! The event-sourcing example end to end, on kv (guest-examples/account and balances, on the
//! embedded store and on PostgreSQL) and on SQL (guest-examples/account-sql and balances-sql:
//! an `events` table whose unique (aggregate_id, version) is the concurrency check, and an
//! `account_balances` table kept with `balance = balance + $1`): 1,000 deposits and withdrawals
//! on four accounts, run concurrently (8 lanes keyed by command, so commands on one account race
//! and optimistic concurrency retries the losers), end in versions contiguous per account and
//! balances that a sequential fold of the event log reproduces; overdrafts are rejected to the
//! DLQ; and a projection rebuilt from offset 0 into an empty view holds the same balances as the
//! live one. On SQL the events table is the published event log, and both projection tables
//! equal a replay of it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use lockgate::broker::local::LocalBroker;
use lockgate::message::OutRecord;
use lockgate::state::{EmbeddedStore, KvStore};
use lockgate_tests::pg::{self, SyncPg};
use lockgate_tests::{guest, run_stat, start_run, stop_run, wait_for_progress};

const DEADLINE: Duration = Duration::from_secs(180);
const ACCOUNTS: u64 = 4;
const COMMANDS: u64 = 1_000;

#[derive(Clone, Copy)]
enum Store<'a> {
    /// The kv handlers on the embedded store.
    Embedded,
    /// The kv handlers on a PostgreSQL store in this schema.
    Postgres(&'a str),
    /// The SQL handlers, their tables and lockgate's in this schema.
    Sql(&'a str),
}

fn write_config(dir: &Path, store: Store<'_>, rebuild: bool) -> std::path::PathBuf {
    let store_table = |schema: &str, url: &str| {
        format!("[stores.pg]\nkind = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\n\n")
    };
    let (state, stores) = match store {
        Store::Embedded => ("embedded".to_owned(), String::new()),
        Store::Postgres(schema) => ("pg".to_owned(), store_table(schema, pg::URL)),
        // The handlers name their tables without a schema: the connections' search_path finds
        // them (lockgate's own statements name its schema).
        Store::Sql(schema) => (
            "pg".to_owned(),
            store_table(
                schema,
                &format!("{}?options=-csearch_path%3D{schema}", pg::URL),
            ),
        ),
    };
    let (account, balances, grant, event_key, rebuild_config) = match store {
        Store::Sql(_) => (
            guest("account-sql"),
            guest("balances-sql"),
            "sql = \"pg\"\n",
            "idempotency = { key = \"json:/command\" }\n",
            "config = { table = \"rebuild_balances\" }\n",
        ),
        _ => (guest("account"), guest("balances"), "", "", ""),
    };
    let rebuild_route = if rebuild {
        format!(
            "[routes.rebuild]\nhandler = \"rebuild\"\nsource = {{ topic = \"events\", group = \"rebuild\" }}\nordering = \"key\"\nconcurrency = 4\nretry = {{ max_attempts = 100, initial_backoff_ms = 1, max_backoff_ms = 50 }}\n{event_key}"
        )
    } else {
        String::new()
    };
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
state = "{state}"

{stores}[handlers.account]
module = "{account}"
config = {{ events = "events", snapshot_every = "10" }}
{grant}
[handlers.balances]
module = "{balances}"
{grant}
# The same projection under another name: its own, empty, view.
[handlers.rebuild]
module = "{balances}"
{grant}{rebuild_config}

[routes.accounts]
handler = "account"
source = {{ topic = "commands" }}
outputs = ["events"]
concurrency = 8
ordering = "key"
idempotency = {{ key = "key" }}
retry = {{ max_attempts = 100, initial_backoff_ms = 1, max_backoff_ms = 20 }}

[routes.balances]
handler = "balances"
source = {{ topic = "events" }}
ordering = "key"
concurrency = 4
retry = {{ max_attempts = 100, initial_backoff_ms = 1, max_backoff_ms = 50 }}
{event_key}
{rebuild_route}"#,
            account = account.display(),
            balances = balances.display(),
        ),
    )
    .unwrap();
    config
}

fn command(id: &str, cmd: &str, account: u64, amount: i64) -> OutRecord {
    OutRecord {
        topic: "commands".into(),
        key: Some(id.as_bytes().to_vec()),
        headers: Vec::new(),
        payload: format!(r#"{{"cmd":"{cmd}","account":"a{account}","amount":{amount}}}"#)
            .into_bytes(),
    }
}

/// Commands from a fixed seed: two deposits of 1..100 for each withdrawal of 1..200, so some
/// withdrawals overdraw.
fn commands() -> Vec<OutRecord> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..COMMANDS)
        .map(|i| {
            let account = next() % ACCOUNTS;
            let (cmd, amount) = if next() % 3 == 0 {
                ("withdraw", (next() % 200 + 1) as i64)
            } else {
                ("deposit", (next() % 100 + 1) as i64)
            };
            command(&format!("c{i}"), cmd, account, amount)
        })
        .collect()
}

fn json(r: &lockgate::message::Record) -> serde_json::Value {
    serde_json::from_slice(&r.payload).unwrap()
}

/// The balance of each account in the view of handler `namespace`.
fn view(dir: &Path, store: Store<'_>, namespace: &str) -> BTreeMap<String, (u64, i64)> {
    let read = |get: &dyn Fn(&str) -> Option<Vec<u8>>| {
        (0..ACCOUNTS)
            .filter_map(|a| {
                let v: serde_json::Value =
                    serde_json::from_slice(&get(&format!("balance/a{a}"))?).unwrap();
                Some((
                    format!("a{a}"),
                    (
                        v["version"].as_u64().unwrap(),
                        v["balance"].as_i64().unwrap(),
                    ),
                ))
            })
            .collect()
    };
    match store {
        Store::Sql(schema) => {
            let table = if namespace == "rebuild" {
                "rebuild_balances"
            } else {
                "account_balances"
            };
            SyncPg::connect()
                .query(
                    &format!("SELECT account, version, balance FROM {schema}.{table}"),
                    &[],
                )
                .iter()
                .map(|r| {
                    let version: i64 = r.get(1);
                    (r.get(0), (version as u64, r.get(2)))
                })
                .collect()
        }
        Store::Embedded => {
            let kv = EmbeddedStore::open(&dir.join("state/state.redb")).unwrap();
            read(&|k| kv.get(namespace, k, 0).unwrap())
        }
        Store::Postgres(schema) => {
            let client = SyncPg::connect();
            read(&|k| {
                client
                    .query(
                        &format!("SELECT value FROM {schema}.kv WHERE namespace = $1 AND key = $2"),
                        &[&namespace, &k],
                    )
                    .first()
                    .map(|r| r.get(0))
            })
        }
    }
}

fn run_example(store: Store<'_>) {
    if let Store::Sql(schema) = store {
        SyncPg::connect().exec(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.events (aggregate_id text NOT NULL, version bigint NOT NULL,
                 kind text NOT NULL, amount bigint NOT NULL, balance bigint NOT NULL,
                 command text NOT NULL, PRIMARY KEY (aggregate_id, version));
             CREATE TABLE {schema}.account_balances (account text PRIMARY KEY,
                 balance bigint NOT NULL, version bigint NOT NULL);
             CREATE TABLE {schema}.rebuild_balances (LIKE {schema}.account_balances INCLUDING ALL)"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let opens: Vec<OutRecord> = (0..ACCOUNTS)
        .map(|a| command(&format!("open-a{a}"), "open", a, 0))
        .collect();
    broker.append(&opens).unwrap();

    // Run 1: the accounts open, then 1,000 commands race.
    let config = write_config(dir.path(), store, false);
    let mut run = start_run(dir.path(), &config, 1, None, "warn");
    let dead = |b: &LocalBroker| b.end_offset("commands.dlq").unwrap_or(0);
    wait_for_progress(
        &mut run,
        dir.path(),
        1,
        ACCOUNTS,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("events").unwrap_or(0),
    );
    let input = commands();
    broker.append(&input).unwrap();
    let all = ACCOUNTS + COMMANDS;
    wait_for_progress(
        &mut run,
        dir.path(),
        1,
        all,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("events").unwrap_or(0) + dead(&broker),
    );
    let events_end = broker.end_offset("events").unwrap();
    wait_for_progress(
        &mut run,
        dir.path(),
        1,
        events_end,
        DEADLINE,
        Duration::from_millis(20),
        || broker.committed("events", "lockgate").unwrap_or(0),
    );
    stop_run(&mut run, dir.path(), 1);
    // The first `retried=` of the summary is the accounts route's (it is listed first).
    assert!(
        run_stat(dir.path(), 1, "retried") > 0,
        "commands on one account never raced: the test would not exercise the concurrency check"
    );

    // The event log: per account, versions 1..n without gaps or repeats, each balance the
    // previous one plus the deposit or minus the withdrawal, never below zero.
    let events = broker.read("events", 0, 10_000).unwrap();
    assert_eq!(events.len() as u64, events_end);
    let mut per_account: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for e in &events {
        let v = json(e);
        assert_eq!(
            e.key.as_deref(),
            Some(v["account"].as_str().unwrap().as_bytes())
        );
        per_account
            .entry(v["account"].as_str().unwrap().to_owned())
            .or_default()
            .push(v);
    }
    let mut folded: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    let mut commands_seen = HashSet::new();
    for (account, mut evs) in per_account {
        evs.sort_by_key(|v| v["version"].as_u64().unwrap());
        let mut balance = 0i64;
        for (i, v) in evs.iter().enumerate() {
            assert_eq!(
                v["version"].as_u64().unwrap(),
                i as u64 + 1,
                "{account}: {evs:?}"
            );
            let amount = v["amount"].as_i64().unwrap();
            balance += match v["kind"].as_str().unwrap() {
                "opened" => 0,
                "deposited" => amount,
                "withdrawn" => -amount,
                other => panic!("unknown event {other}"),
            };
            assert_eq!(
                v["balance"].as_i64().unwrap(),
                balance,
                "{account} v{}",
                i + 1
            );
            assert!(balance >= 0, "{account} overdrawn at v{}", i + 1);
            assert!(
                commands_seen.insert(v["command"].as_str().unwrap().to_owned()),
                "a command appended twice: {v}"
            );
        }
        folded.insert(account, (evs.len() as u64, balance));
    }

    // On SQL the events table is that log, row for row, and its replay is the fold.
    if let Store::Sql(schema) = store {
        let mut published: Vec<(String, i64, String, i64, i64, String)> = events
            .iter()
            .map(|e| {
                let v = json(e);
                let text = |k: &str| v[k].as_str().unwrap().to_owned();
                let int = |k: &str| v[k].as_i64().unwrap();
                (
                    text("account"),
                    int("version"),
                    text("kind"),
                    int("amount"),
                    int("balance"),
                    text("command"),
                )
            })
            .collect();
        published.sort();
        let table: Vec<(String, i64, String, i64, i64, String)> = SyncPg::connect()
            .query(
                &format!(
                    "SELECT aggregate_id, version, kind, amount, balance, command FROM {schema}.events ORDER BY 1, 2"
                ),
                &[],
            )
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect();
        assert_eq!(
            table, published,
            "the events table is the published event log"
        );
        let replay: BTreeMap<String, (u64, i64)> = SyncPg::connect()
            .query(
                &format!(
                    "SELECT aggregate_id, max(version), sum(CASE kind WHEN 'deposited' THEN amount
                     WHEN 'withdrawn' THEN -amount ELSE 0 END)::bigint
                     FROM {schema}.events GROUP BY 1"
                ),
                &[],
            )
            .iter()
            .map(|r| {
                let version: i64 = r.get(1);
                (r.get(0), (version as u64, r.get(2)))
            })
            .collect();
        assert_eq!(replay, folded, "a replay of the events table");
    }

    // Every command is an event or a rejection, and only withdrawals that overdrew are rejected.
    let rejected = broker.read("commands.dlq", 0, 10_000).unwrap();
    assert_eq!(events_end + rejected.len() as u64, all);
    assert!(
        !rejected.is_empty(),
        "the seed makes some withdrawals overdraw"
    );
    for r in &rejected {
        let reason = String::from_utf8_lossy(r.header("lockgate-dlq-reason").unwrap());
        assert!(reason.starts_with("overdraft: account a"), "{reason}");
        assert_eq!(json(r)["cmd"], "withdraw");
    }
    // The sequential model: the accepted commands' amounts, summed per account, give the
    // balances the events end with.
    // A command's id is its position, `commands/<partition>/<offset>`.
    let accepted: HashSet<u64> = commands_seen
        .iter()
        .map(|id| id.rsplit('/').next().unwrap().parse().unwrap())
        .collect();
    let mut model: BTreeMap<String, i64> = BTreeMap::new();
    for (i, c) in input.iter().enumerate() {
        if !accepted.contains(&(ACCOUNTS + i as u64)) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&c.payload).unwrap();
        let amount = v["amount"].as_i64().unwrap();
        *model
            .entry(v["account"].as_str().unwrap().to_owned())
            .or_default() += if v["cmd"] == "deposit" {
            amount
        } else {
            -amount
        };
    }
    for (account, (_, balance)) in &folded {
        assert_eq!(
            model.get(account).copied().unwrap_or(0),
            *balance,
            "{account}"
        );
    }

    // The live projection, then a rebuild from offset 0 into an empty view: the same balances.
    assert_eq!(view(dir.path(), store, "balances"), folded);
    assert!(view(dir.path(), store, "rebuild").is_empty());
    let config = write_config(dir.path(), store, true);
    let mut run = start_run(dir.path(), &config, 2, None, "warn");
    wait_for_progress(
        &mut run,
        dir.path(),
        2,
        events_end,
        DEADLINE,
        Duration::from_millis(20),
        || broker.committed("events", "rebuild").unwrap_or(0),
    );
    stop_run(&mut run, dir.path(), 2);
    assert_eq!(view(dir.path(), store, "rebuild"), folded);
    assert_eq!(view(dir.path(), store, "balances"), folded);
}

#[test]
fn concurrent_commands_on_the_embedded_store_match_the_sequential_model() {
    run_example(Store::Embedded);
}

#[test]
fn concurrent_commands_on_postgres_match_the_sequential_model() {
    let schema = pg::unique_schema("lges");
    run_example(Store::Postgres(&schema));
    SyncPg::connect().drop_schema(&schema);
}

#[test]
fn concurrent_commands_on_sql_tables_match_the_sequential_model() {
    let schema = pg::unique_schema("lgessql");
    run_example(Store::Sql(&schema));
    SyncPg::connect().drop_schema(&schema);
}
