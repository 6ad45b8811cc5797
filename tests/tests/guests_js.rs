//! The JavaScript guests (`guest-examples/js/`, SDK in `sdk/js/`): built by
//! `lockgate build` (which installs the pinned jco toolchain on first use and rebuilds only what
//! changed) with the default QuickJS backend, and the router once more with
//! StarlingMonkey, then run through `lockgate test --expect`. The router must pass the same
//! fixture as the Rust router; the hostile guest must find no file, socket, fetch or environment
//! access. A missing toolchain fails these tests: they never skip.

use std::path::PathBuf;

mod guest_lang;

use lockgate_tests::{lockgate, show, workspace_root};

/// Path of JS guest `name` built with `backend` (`qjs` or `starlingmonkey`).
fn js_guest(backend: &str, name: &str) -> PathBuf {
    guest_lang::build_with("js", name, backend)
}

fn run_fixture(wasm: &std::path::Path, fixture: &str, extra: &[&str]) -> std::process::Output {
    let input = format!("tests/fixtures/{fixture}/input.jsonl");
    let expect = format!("tests/fixtures/{fixture}/expected.jsonl");
    let mut args = vec![
        "test",
        wasm.to_str().expect("utf-8 path"),
        "--input",
        &input,
        "--expect",
        &expect,
    ];
    args.extend_from_slice(extra);
    lockgate(&workspace_root(), &args)
}

const ROUTES: [&str; 6] = [
    "-c",
    "route.order=orders",
    "-c",
    "route.refund=refunds",
    "-c",
    "default=misc",
];

fn assert_router_passes(wasm: &std::path::Path) {
    let out = run_fixture(wasm, "router", &ROUTES);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("5 message(s): 3 ok, 2 reject"), "{stdout}");
    assert!(stdout.contains("all 5 message(s) match"), "{stdout}");
}

#[test]
fn js_router_matches_the_shared_router_fixture() {
    assert_router_passes(&js_guest("qjs", "router"));
}

#[test]
fn js_router_built_with_starlingmonkey_matches_it_too() {
    assert_router_passes(&js_guest("starlingmonkey", "router"));
}

#[test]
fn js_router_keeps_the_key_and_explains_rejections() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("in.jsonl"),
        concat!(
            "{\"payload\": \"{\\\"kind\\\": \\\"order\\\"}\", \"key\": \"alice\"}\n",
            "{\"payload\": \"[1, 2]\"}\n",
            "{\"payload\": \"{\\\"kind\\\": 7}\"}\n",
            "{\"payload\": \"{\\\"kind\\\": \\\"other\\\"}\"}\n",
            "{\"payload_base64\": \"/w==\"}\n",
        ),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("expected.jsonl"),
        concat!(
            "{\"outcome\": \"ok\", \"published\": [{\"topic\": \"orders\", \"key\": \"alice\", \"payload\": \"{\\\"kind\\\": \\\"order\\\"}\"}]}\n",
            "{\"outcome\": \"reject\", \"reason\": \"missing `kind` field\"}\n",
            "{\"outcome\": \"reject\", \"reason\": \"`kind` must be a string, got number\"}\n",
            "{\"outcome\": \"reject\", \"reason\": \"no route for kind `other` and no `default`\"}\n",
            "{\"outcome\": \"reject\", \"reason\": \"payload is not UTF-8: invalid UTF-8 at byte 0\"}\n",
        ),
    )
    .expect("write");
    let wasm = js_guest("qjs", "router");
    let out = lockgate(
        dir.path(),
        &[
            "test",
            wasm.to_str().expect("utf-8 path"),
            "-i",
            "in.jsonl",
            "-e",
            "expected.jsonl",
            "-c",
            "route.order=orders",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn js_guest_gets_no_file_socket_fetch_or_env() {
    let out = run_fixture(&js_guest("qjs", "hostile"), "js-sandbox", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("7 message(s): 5 ok, 2 trapped"), "{stdout}");
    assert!(stdout.contains("all 7 message(s) match"), "{stdout}");
    assert!(!stdout.contains("ALLOWED"), "{stdout}");
    // An exception the SDK does not map traps the call; the SDK logs it first.
    assert!(
        stdout.contains("log error: handler threw: Error: a bug in the handler"),
        "{stdout}"
    );
    // An async handler traps too, saying why, instead of acknowledging work that never ran.
    assert!(
        stdout.contains("log error: handler threw: TypeError: the handler returned a promise"),
        "{stdout}"
    );
}

#[path = "guest_lang/sql_probe.rs"]
mod sql_probe;

/// The JavaScript SQL helper sends and reads every value kind, and reports every error, as the
/// Rust SDK does (guest-examples/js/sql-probe against guest-examples/sql-probe), on both engines.
#[test]
fn js_sql_helper_matches_the_rust_sdk_on_postgres_on_both_engines() {
    sql_probe::probe_matches_the_rust_probe(&js_guest("qjs", "sql-probe"));
    sql_probe::probe_matches_the_rust_probe(&js_guest("starlingmonkey", "sql-probe"));
}

#[path = "guest_lang/sql.rs"]
mod sql;

#[test]
fn js_ledger_matches_the_rust_example() {
    sql::ledger_matches_the_rust_example("js");
}
