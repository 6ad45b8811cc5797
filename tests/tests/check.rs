//! `lockgate check` on every config in `tests/ui/check/`: each `X.toml` is paired with the exact
//! stderr in `X.err` (or stdout in `X.out` for valid configs). Run with `BLESS=1` to rewrite the
//! expected files after an intentional change, then review the diff.

use std::path::Path;

use lockgate_tests::{guest, lockgate, show, workspace_root};

/// Lays out the case files plus the modules they reference in a scratch directory, so error
/// messages carry short, stable relative paths.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let ui = workspace_root().join("tests/ui/check");
    for e in std::fs::read_dir(&ui).expect("ui dir").flatten() {
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy case");
    }
    std::fs::copy(guest("uppercase"), dir.path().join("uppercase.wasm")).expect("copy guest");
    std::fs::copy(guest("wrong-world"), dir.path().join("wrong_world.wasm")).expect("copy guest");
    // The smallest valid core module: magic + version 1.
    std::fs::write(dir.path().join("core-module.wasm"), b"\0asm\x01\0\0\0").expect("write");
    std::fs::write(
        dir.path().join("garbage.wasm"),
        b"#!/bin/sh\necho not wasm\n",
    )
    .expect("write");
    dir
}

#[test]
fn check_reports_exactly_the_expected_errors() {
    let dir = scratch();
    let ui = workspace_root().join("tests/ui/check");
    let bless = std::env::var_os("BLESS").is_some();
    let mut cases = 0;
    let mut failures = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&ui)
        .expect("ui dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    for name in names {
        cases += 1;
        let stem = name.trim_end_matches(".toml");
        let out = lockgate(dir.path(), &["check", &name]);
        let (expected_file, actual, want_code) = if ui.join(format!("{stem}.out")).exists() {
            (
                format!("{stem}.out"),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                0,
            )
        } else {
            (
                format!("{stem}.err"),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                1,
            )
        };
        let expected_path = ui.join(&expected_file);
        if bless {
            std::fs::write(&expected_path, &actual).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("missing {}; run with BLESS=1", expected_path.display()));
        if actual != expected || out.status.code() != Some(want_code) {
            failures.push(format!(
                "{name}: expected exit {want_code} and {expected_file}:\n{expected}\n{}",
                show(&out)
            ));
        }
    }
    assert!(cases >= 6, "found only {cases} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn check_of_a_missing_file_is_a_usage_error() {
    let out = lockgate(Path::new("."), &["check", "no/such/runtime.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no/such/runtime.toml: cannot read the file")
    );
}
