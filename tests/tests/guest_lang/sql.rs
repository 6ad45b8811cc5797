//! SQL through another language's raw `lockgate:handler/sql` bindings (docs/handlers/sql.md):
//! the `ledger` example of the language (guest-examples/<lang>/ledger, built by `lockgate build`)
//! and the Rust one (guest-examples/ledger) each run on a route of the embedded broker, with
//! `sql = "pg"` on a fresh schema and their idempotency keys in the same store, over the same
//! deposits. Both must leave the same balances, the ones the deposits add up to: every deposit
//! applied once, a repeated deposit_id not again, and the deposit without an account
//! dead-lettered with the same reason.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use lockgate_tests::pg::{self, SyncPg};
use lockgate_tests::sqlroute::{RouteRun, SqlRoute};
use serde_json::json;

const ACCOUNTS: u64 = 10;
const DEPOSITS: u64 = 300;
/// Every this many deposits, the same deposit (same deposit_id) comes again later.
const REPEAT_EVERY: u64 = 20;
/// The reason both examples reject a deposit without an account with.
const NO_ACCOUNT: &str = "a deposit needs an account and a non-zero amount";

/// Balance and number of deposits per account.
type Balances = BTreeMap<String, (i64, i64)>;
/// Messages for the route: `(key, payload)`.
type Messages = Vec<(Vec<u8>, Vec<u8>)>;

/// The deposits, keyed by account (so a repeat waits in its account's lane for the first to
/// commit), and the balances they should come to. Amounts are positive and negative, and one is
/// past 32 bits, so that a binding that narrowed the parameter would show.
fn deposits() -> (Messages, Balances) {
    let mut want = Balances::new();
    let mut messages = Vec::new();
    let mut repeats = Vec::new();
    for i in 0..DEPOSITS {
        let account = format!("a{}", i % ACCOUNTS);
        let mut amount = i64::try_from((i * 7919) % 1000 + 1).expect("small");
        if i % 7 == 3 {
            amount = -amount;
        }
        if i == 42 {
            amount = 1 << 40;
        }
        let payload = json!({"deposit_id": format!("d{i}"), "account": account, "amount": amount})
            .to_string();
        let message = (account.clone().into_bytes(), payload.into_bytes());
        if i % REPEAT_EVERY == 5 {
            repeats.push(message.clone());
        }
        messages.push(message);
        let e = want.entry(account).or_default();
        e.0 += amount;
        e.1 += 1;
    }
    // The repeats after all the others, and the deposit without an account among them.
    messages.extend(repeats);
    messages.insert(
        150,
        (
            b"nobody".to_vec(),
            json!({"deposit_id": "d-empty", "account": "", "amount": 5})
                .to_string()
                .into_bytes(),
        ),
    );
    (messages, want)
}

/// Runs the ledger `module` on its own schema, with its `account_balances` table, over
/// `messages`, its config `table` naming `table` in that schema; what the run came to and the
/// table it left.
fn run_ledger(
    module: &Path,
    prefix: &str,
    table: &str,
    messages: Messages,
) -> (RouteRun, Balances) {
    let pg = SyncPg::connect();
    let schema = pg::unique_schema(prefix);
    pg.exec(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.account_balances (account text PRIMARY KEY, balance bigint NOT NULL, deposits bigint NOT NULL)"
    ));
    let run = SqlRoute {
        module,
        config: &[("table", &format!("{schema}.{table}"))],
        schema: &schema,
        key: "json:/deposit_id",
        concurrency: 4,
        timeout_ms: 10_000,
        role: None,
    }
    .run(messages);
    let balances = pg
        .query(
            &format!("SELECT account, balance, deposits FROM {schema}.account_balances"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    pg.drop_schema(&schema);
    (run, balances)
}

/// Builds `lang`'s ledger and runs it and the Rust ledger over the same deposits: the same
/// balances, the expected ones, and the same single dead letter. Then both on a table that does
/// not exist: the statement's error (42P01) rejects every deposit, with the same reason.
pub fn ledger_matches_the_rust_example(lang: &str) {
    let wasm = super::guest_lang::build(lang, "ledger");
    ledger_passes_the_fixture(&wasm);
    let rust_wasm = lockgate_tests::guest("ledger");
    let (messages, want) = deposits();
    let total = messages.len();
    let table = "account_balances";
    let (rust_run, rust) = run_ledger(&rust_wasm, "lgledgerrs", table, messages.clone());
    let (run, got) = run_ledger(&wasm, &format!("lgledger{lang}"), table, messages);
    assert_eq!(
        rust, want,
        "the Rust ledger's balances are the deposits' sums"
    );
    let wrong: Vec<String> = want
        .iter()
        .filter(|(a, w)| got.get(*a) != Some(*w))
        .map(|(a, w)| format!("{a}: want {w:?}, got {:?}", got.get(a)))
        .collect();
    assert!(
        wrong.is_empty() && got.len() == want.len(),
        "{lang} ledger: accounts off ({total} messages): {wrong:#?}\ngot {got:?}"
    );
    assert_eq!(got, rust, "{lang} and Rust leave the same table");
    for (who, r) in [("Rust", &rust_run), (lang, &run)] {
        assert_eq!(
            r.dead, 1,
            "{who}: only the deposit without an account is dead-lettered"
        );
        assert_eq!(
            r.dead_reasons,
            [NO_ACCOUNT],
            "{who}: the dead letter's reason"
        );
        assert_eq!(r.outputs, 0, "{who}: the ledger publishes nothing");
    }

    let failing: Vec<_> = deposits().0.into_iter().take(3).collect();
    let (rust_run, _) = run_ledger(&rust_wasm, "lgledgerrs", "missing", failing.clone());
    let (run, _) = run_ledger(&wasm, &format!("lgledger{lang}"), "missing", failing);
    assert_eq!((rust_run.dead, run.dead), (3, 3), "every deposit rejected");
    assert_eq!(run.retried, 0, "{lang}: an undefined table is not retried");
    // The schema's name differs between the runs: compare the reasons without it.
    let reasons = |r: &RouteRun| -> Vec<String> {
        r.dead_reasons
            .iter()
            .map(|reason| {
                reason
                    .split('"')
                    .filter(|p| !p.starts_with("lgledger"))
                    .collect()
            })
            .collect()
    };
    assert!(
        rust_run.dead_reasons[0].starts_with("SQL statement failed (42P01): relation"),
        "{:?}",
        rust_run.dead_reasons
    );
    assert_eq!(
        reasons(&run),
        reasons(&rust_run),
        "{lang}: the same reasons as Rust"
    );
}

/// Runs tests/fixtures/ledger through `lockgate test --database` on a fresh schema holding
/// the fixture's schema.sql, each message rolled back: every expectation (rows included)
/// matches, and the table is as schema.sql left it.
pub fn ledger_passes_the_fixture(wasm: &Path) {
    let pg = SyncPg::connect();
    let schema = pg::unique_schema("lgledgerfx");
    let root = lockgate_tests::workspace_root();
    let setup =
        std::fs::read_to_string(root.join("tests/fixtures/ledger/schema.sql")).expect("schema.sql");
    pg.exec(&format!(
        "CREATE SCHEMA {schema}; SET search_path = {schema}; {setup}; RESET search_path"
    ));
    let url = format!("{}?options=-csearch_path%3D{schema}", pg::URL);
    let out = lockgate_tests::lockgate(
        &root,
        &[
            "test",
            wasm.to_str().expect("utf-8 path"),
            "--input",
            "tests/fixtures/ledger/input.jsonl",
            "--expect",
            "tests/fixtures/ledger/expected.jsonl",
            "--database",
            &url,
        ],
    );
    assert!(
        out.status.success(),
        "{}: {}",
        wasm.display(),
        lockgate_tests::show(&out)
    );
    let rows = pg.count(&format!(
        "SELECT count(*) FROM {schema}.account_balances WHERE (account, balance, deposits) = ('b', 100, 3)"
    ));
    let all = pg.count(&format!("SELECT count(*) FROM {schema}.account_balances"));
    assert_eq!(
        (rows, all),
        (1, 1),
        "{}: every message rolled back",
        wasm.display()
    );
    pg.drop_schema(&schema);
}
