//! `lockgate check` on every config in `tests/ui/check/`: each `X.toml` is paired with the exact
//! stderr in `X.err` (or, for valid configs, the output in `X.out`: warnings on stderr, then
//! stdout). And docs/reference/runtime-toml.md against what `lockgate config reference` prints.
//! Run with `BLESS=1` to rewrite the expected files after an intentional change, then review the
//! diff.

use std::path::Path;
use std::process::{Command, Output};

use lockgate_tests::{guest, lockgate, lockgate_bin, show, workspace_root};

/// `lockgate check NAME` in `dir`, with the environment the cases' secrets name: one variable
/// set, one set but empty, one unset.
fn check(dir: &Path, name: &str) -> Output {
    Command::new(lockgate_bin())
        .current_dir(dir)
        .args(["check", name])
        .env("LOCKGATE_LOG", "error")
        .env("LOCKGATE_UI_SECRET", "s3cret")
        .env("LOCKGATE_UI_EMPTY", "")
        .env_remove("LOCKGATE_UI_UNSET")
        .output()
        .expect("cannot run lockgate")
}

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
    std::fs::copy(guest("http-probe"), dir.path().join("http_probe.wasm")).expect("copy guest");
    std::fs::copy(guest("sql-probe"), dir.path().join("sql_probe.wasm")).expect("copy guest");
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
        let out = check(dir.path(), &name);
        let (expected_file, actual, want_code) = if ui.join(format!("{stem}.out")).exists() {
            (
                format!("{stem}.out"),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                ),
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

#[test]
fn the_runtime_toml_reference_is_what_lockgate_config_reference_prints() {
    let out = lockgate(Path::new("."), &["config", "reference"]);
    assert!(out.status.success(), "{}", show(&out));
    let rendered = String::from_utf8(out.stdout).expect("UTF-8");
    let path = workspace_root().join("docs/reference/runtime-toml.md");
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &rendered).expect("bless");
        return;
    }
    let committed = std::fs::read_to_string(&path).expect("docs/reference/runtime-toml.md");
    if committed != rendered {
        let line = committed
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(rendered.lines().count()));
        panic!(
            "docs/reference/runtime-toml.md differs from `lockgate config reference` from line {}:\n  committed: {:?}\n  rendered:  {:?}\nRun `BLESS=1 cargo test -p lockgate-tests --test check` and review the diff.",
            line + 1,
            committed.lines().nth(line).unwrap_or("(end of file)"),
            rendered.lines().nth(line).unwrap_or("(end of output)"),
        );
    }
}

#[test]
fn lockgate_run_logs_the_deprecation_warnings_too() {
    // deprecated.toml has no routes: `lockgate run` stops at once (exit 2), after loading it.
    let dir = scratch();
    let out = Command::new(lockgate_bin())
        .current_dir(dir.path())
        .args(["run", "deprecated.toml"])
        .env("LOCKGATE_LOG", "warn")
        .env("LOCKGATE_UI_SECRET", "s3cret")
        .output()
        .expect("cannot run lockgate");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "Config warning: deprecated.toml: brokers.rabbit.url_file: deprecated: write url = { file = \"amqp-url.secret\" } instead"
        ),
        "{stderr}"
    );
}
