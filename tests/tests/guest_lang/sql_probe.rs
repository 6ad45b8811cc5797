//! The SQL helpers of the Python and JavaScript SDKs against the Rust SDK's: each language's
//! `sql-probe` (the protocol of guest-examples/sql-probe) runs the same statements on the test
//! PostgreSQL, and every result (values sent and read back, each error's kind, text and
//! SQLSTATE) must equal the Rust probe's.

use std::path::Path;
use std::time::Duration;

use lockgate::config::Isolation;
use lockgate::engine::{HandlerLimits, InboundMessage};
use lockgate_tests::pg::{SyncPg, TestStore};
use lockgate_tests::{guest, handler_env, module_pool};
use serde_json::{Value, json};

/// The statements every probe runs, one message each; each message's transaction is rolled
/// back afterwards, so every probe starts from the same tables.
fn specs(s: &str) -> Vec<Value> {
    vec![
        // Every value kind the probes render, sent and read back. A timestamp in whole
        // milliseconds: JavaScript's Date has no microseconds.
        json!({"statements": [
            {"sql": format!("INSERT INTO {s}.items VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
             "params": ["a", 1_i64 << 40, 7, {"numeric": "12.50"}, {"text_array": ["x", null]},
                        {"int64_array": [1, null, 3]}, {"json": {"k": [1, 2], "s": "é"}},
                        {"timestamptz": 1_700_000_000_123_000_i64}, {"date": 19_000},
                        {"uuid": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}, true, 0.25]},
            {"sql": format!("SELECT * FROM {s}.items"), "query": true},
            {"sql": format!("UPDATE {s}.items SET n = n + $1 WHERE id = $2"), "params": [1, "a"]},
            {"sql": format!("SELECT n, small FROM {s}.items WHERE id = $1"), "params": ["a"], "query": true},
        ]}),
        // NULLs in every column, bytea, an empty result with its columns.
        json!({"statements": [
            {"sql": format!("INSERT INTO {s}.items (id) VALUES ($1)"), "params": ["b"]},
            {"sql": format!("SELECT * FROM {s}.items"), "query": true},
            {"sql": "SELECT '\\x01ff'::bytea AS b, NULL::int AS nothing", "query": true},
            {"sql": format!("SELECT id FROM {s}.items WHERE false"), "query": true},
        ]}),
        // What the host refuses, a parameter it cannot convert, a result over max_rows; none
        // of them touches the transaction, so the insert after them works.
        json!({"statements": [
            {"sql": "BEGIN"},
            {"sql": "SET statement_timeout = 0"},
            {"sql": "SELECT $1::int8 AS n", "params": ["nine"], "query": true},
            {"sql": "SELECT generate_series(1, 50) AS n", "query": true},
            {"sql": format!("INSERT INTO {s}.items (id) VALUES ($1)"), "params": ["c"]},
        ]}),
        // A unique violation (SQLSTATE, detail, constraint) aborts the transaction.
        json!({"statements": [
            {"sql": format!("INSERT INTO {s}.items (id) VALUES ('dup'), ('dup')")},
            {"sql": "SELECT 1 AS one", "query": true},
        ]}),
        // A syntax error.
        json!({"statements": [{"sql": "SELEC 1", "query": true}]}),
    ]
}

/// The results of every spec on the probe at `module`.
fn run(module: &Path, db: &TestStore) -> Vec<Value> {
    let mut env = handler_env(
        "sql-probe",
        &[("target", "out")],
        HandlerLimits {
            timeout: Duration::from_secs(20),
            ..HandlerLimits::default()
        },
    );
    env.sql = Some(db.grant(None, 10));
    let pool = module_pool(module, false, Isolation::Reuse, env);
    specs(&db.schema)
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let msg = InboundMessage {
                id: format!("m{i}"),
                topic: "in".into(),
                payload: spec.to_string().into_bytes(),
                attempt: 1,
                ..InboundMessage::default()
            };
            // Dropped at the end of the closure: the message's transaction rolls back. A
            // statement the server refused fails the call, so the results are read from the
            // probe's log.
            let inv = pool.invoke_with(&msg, true);
            let logged = inv
                .logs
                .iter()
                .find_map(|l| l.message.strip_prefix("results "))
                .unwrap_or_else(|| panic!("{}: spec {i}: no results: {inv:?}", module.display()));
            let v: Value = serde_json::from_str(logged).expect("JSON");
            v["results"].clone()
        })
        .collect()
}

/// Runs the specs on the Rust probe and on `wasm` (a `sql-probe` built for another language)
/// and compares every result.
pub fn probe_matches_the_rust_probe(wasm: &Path) {
    let db = TestStore::new("lgsqllang");
    let pg = SyncPg::connect();
    let s = &db.schema;
    pg.exec(&format!(
        "CREATE SCHEMA {s}; CREATE TABLE {s}.items (id text PRIMARY KEY, n bigint, small int,
         price numeric(12,2), tags text[], ids bigint[], doc jsonb, at timestamptz, born date,
         u uuid, ok boolean, ratio float8)"
    ));
    let rust = run(&guest("sql-probe"), &db);
    let other = run(wasm, &db);
    // The Rust probe's own results, so that equal results mean right ones.
    assert_eq!(rust[0][0], json!({"affected": 1}), "{}", rust[0]);
    assert_eq!(rust[0][1]["rows"][0][3], json!({"numeric": "12.50"}));
    assert_eq!(rust[0][3]["rows"][0][0], json!((1_i64 << 40) + 1));
    assert_eq!(rust[2][4], json!({"affected": 1}), "{}", rust[2]);
    assert_eq!(rust[3][0]["code"], "23505", "{}", rust[3]);
    assert_eq!(rust[4][0]["code"], "42601", "{}", rust[4]);
    for (i, (r, o)) in rust.iter().zip(&other).enumerate() {
        let (r, o) = (
            r.as_array().expect("results"),
            o.as_array().expect("results"),
        );
        assert_eq!(o.len(), r.len(), "spec {i}: {o:?}");
        for (j, (r, o)) in r.iter().zip(o).enumerate() {
            assert_eq!(o, r, "{}: spec {i}, statement {j}", wasm.display());
        }
    }
    assert_eq!(
        pg.count(&format!("SELECT count(*) FROM {s}.items")),
        0,
        "every message's transaction rolled back"
    );
    pg.drop_schema(s);
}
