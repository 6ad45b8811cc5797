//! Shared by the tests of guests written in other languages: build a language's example with its
//! script, then run a shared fixture through `lockgate test`. Each test binary uses a part.

#![allow(dead_code)]

use lockgate_tests::{lockgate, show, workspace_root};
use std::path::PathBuf;
use std::process::Command;

/// Runs `scripts/build-guest-<lang>.sh <name>` and returns the .wasm path it printed.
pub fn build(lang: &str, name: &str) -> PathBuf {
    let root = workspace_root();
    let script = root.join(format!("scripts/build-guest-{lang}.sh"));
    let out = Command::new("bash")
        .arg(&script)
        .arg(name)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed\n{}",
        script.display(),
        show(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let wasm = PathBuf::from(
        stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("{} printed no path\n{}", script.display(), show(&out))),
    );
    assert!(
        wasm.is_file(),
        "{} is not a file\n{}",
        wasm.display(),
        show(&out)
    );
    wasm
}

/// Builds `lang`'s router and checks it against tests/fixtures/router with the flags the Rust
/// router's test uses.
pub fn router_matches_fixture(lang: &str) {
    let wasm = build(lang, "router");
    let out = lockgate(
        &workspace_root(),
        &[
            "test",
            wasm.to_str().expect("utf-8 path"),
            "--input",
            "tests/fixtures/router/input.jsonl",
            "--expect",
            "tests/fixtures/router/expected.jsonl",
            "-c",
            "route.order=orders",
            "-c",
            "route.refund=refunds",
            "-c",
            "default=misc",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("expectations: all 5 message(s) match"),
        "{}",
        show(&out)
    );
}
