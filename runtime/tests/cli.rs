//! The `lockgate` command's own surface: help text documents what users need, and bad usage
//! fails with exit code 2. (Also makes `cargo test --workspace` build the binary that the
//! integration-test crate drives.)

use std::process::{Command, Output};

fn lockgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockgate"))
        .args(args)
        .output()
        .expect("run lockgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn help_lists_the_commands() {
    let out = lockgate(&["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in ["test", "check", "WebAssembly"] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn test_help_documents_fixtures_expectations_and_exit_codes() {
    let out = lockgate(&["test", "--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for needle in [
        "payload_base64",
        "payload_json",
        "reason_contains",
        "--expect",
        "--config",
        "--timeout-ms",
        "Exit codes",
    ] {
        assert!(
            text.contains(needle),
            "test --help lacks {needle:?}:\n{text}"
        );
    }
}

#[test]
fn bad_usage_exits_2() {
    let out = lockgate(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = lockgate(&[
        "test", "x.wasm", "--input", "in.jsonl", "--config", "novalue",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected KEY=VALUE"));
}

#[test]
fn unreadable_input_names_the_file() {
    let out = lockgate(&["test", "missing.wasm", "--input", "no-such-input.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read no-such-input.jsonl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
