//! Shared by the tests of guests written in other languages: build a language's example with
//! `lockgate build`, then run a shared fixture through `lockgate test`. Each test binary uses a part.

#![allow(dead_code)]

use lockgate_tests::{lockgate, lockgate_bin, show, workspace_root};
use std::path::PathBuf;
use std::process::Command;

/// Builds `guest-examples/<lang>/<name>` with `lockgate build` into the guest cache
/// (`~/.cache/lockgate/guests/<lang>/<name>.wasm`, where the build scripts put it too) and
/// returns the component's path.
pub fn build(lang: &str, name: &str) -> PathBuf {
    build_with(lang, name, "qjs")
}

/// [`build`] with a JavaScript engine (`qjs` or `starlingmonkey`; ignored by other languages).
pub fn build_with(lang: &str, name: &str, js_backend: &str) -> PathBuf {
    let root = workspace_root();
    let folder = if js_backend == "qjs" {
        lang.to_owned()
    } else {
        format!("{lang}-{js_backend}")
    };
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let out_root = std::env::var_os("LOCKGATE_GUEST_OUT")
        .map_or_else(|| home.join(".cache/lockgate/guests"), PathBuf::from);
    let wasm = out_root.join(folder).join(format!("{name}.wasm"));
    let dir = root.join("guest-examples").join(lang).join(name);
    let out = Command::new(lockgate_bin())
        .arg("build")
        .arg(&dir)
        .arg("-o")
        .arg(&wasm)
        .args(["--js-backend", js_backend])
        .output()
        .unwrap_or_else(|e| panic!("cannot run lockgate build: {e}"));
    assert!(
        out.status.success(),
        "lockgate build {} failed\n{}",
        dir.display(),
        show(&out)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.trim(), wasm.display().to_string(), "{}", show(&out));
    assert!(wasm.is_file(), "{} is not a file", wasm.display());
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

/// Builds `lang`'s enrich example and checks it against tests/fixtures/enrich, its customer
/// service answered by the fixture's HTTP stubs. JavaScript builds on StarlingMonkey: the
/// QuickJS toolchain cannot build a component that imports wasi:http (docs/handlers/http.md).
pub fn enrich_matches_fixture(lang: &str) {
    let backend = if lang == "js" {
        "starlingmonkey"
    } else {
        "qjs"
    };
    let wasm = build_with(lang, "enrich", backend);
    let out = lockgate(
        &workspace_root(),
        &[
            "test",
            wasm.to_str().expect("utf-8 path"),
            "--input",
            "tests/fixtures/enrich/input.jsonl",
            "--expect",
            "tests/fixtures/enrich/expected.jsonl",
            "-c",
            "customers_url=https://customers.example.com",
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
