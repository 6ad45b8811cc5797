//! kv behaves the same in every SDK: the counter handler of each language
//! (`guest-examples/*/counter`) stores a number per key as decimal text, reads it back and adds
//! to it. Each passes the shared fixture `tests/fixtures/counter` alone; then all five run in
//! turn on one kv file, each continuing the counts the language before it stored, which fails
//! if any of them stores or reads a number differently (Python's `kv.set(k, 2)` once stored two
//! zero bytes). A missing toolchain fails this test: it never skips.

#![allow(clippy::unwrap_used)]

mod guest_lang;

use std::path::{Path, PathBuf};

use lockgate_tests::{guest, lockgate, show, workspace_root};

/// Every SDK language, in the order of the shared-store run.
const LANGUAGES: [&str; 5] = ["rust", "python", "js", "go", "c"];

fn counter(lang: &str) -> PathBuf {
    if lang == "rust" {
        guest("counter")
    } else {
        guest_lang::build(lang, "counter")
    }
}

/// `lockgate test` of `wasm` on the counter fixture against `expect`, with `extra` arguments.
fn run(wasm: &Path, expect: &Path, extra: &[&str]) -> std::process::Output {
    let root = workspace_root();
    let fixture = root.join("tests/fixtures/counter/input.jsonl");
    let mut args = vec![
        "test",
        wasm.to_str().unwrap(),
        "--input",
        fixture.to_str().unwrap(),
        "--expect",
        expect.to_str().unwrap(),
        "-c",
        "target=counts",
    ];
    args.extend_from_slice(extra);
    lockgate(&root, &args)
}

/// The expectations of the `round`-th run (0-based) on a kv that earlier runs filled: each run
/// adds 40 to `a` and 1 to `b`.
fn round_expectations(round: i64) -> String {
    let ok = |key: &str, n: i64| {
        format!(
            "{{\"outcome\": \"ok\", \"published\": [{{\"topic\": \"counts\", \"key\": \"{key}\", \"payload\": \"{n}\"}}]}}\n"
        )
    };
    let a = 40 * round;
    [
        ok("a", a + 1),
        ok("a", a + 42),
        ok("b", round + 1),
        ok("a", a + 40),
        "{\"outcome\": \"reject\", \"reason_contains\": \"no key\"}\n".to_owned(),
        "{\"outcome\": \"reject\", \"reason_contains\": \"is not an integer\"}\n".to_owned(),
    ]
    .concat()
}

#[test]
fn every_sdk_stores_reads_and_adds_a_number_the_same_way() {
    let built: Vec<(&str, PathBuf)> = LANGUAGES.iter().map(|l| (*l, counter(l))).collect();
    let expected = workspace_root().join("tests/fixtures/counter/expected.jsonl");
    for (lang, wasm) in &built {
        let out = run(wasm, &expected, &[]);
        assert_eq!(out.status.code(), Some(0), "{lang}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("expectations: all 6 message(s) match"),
            "{lang}: {}",
            show(&out)
        );
    }

    // One kv file, the languages in turn: each reads what the one before wrote.
    let dir = tempfile::tempdir().unwrap();
    let kv = dir.path().join("kv.redb");
    for (round, (lang, wasm)) in built.iter().enumerate() {
        let expect = dir.path().join(format!("round-{round}.jsonl"));
        std::fs::write(&expect, round_expectations(round as i64)).unwrap();
        let out = run(
            wasm,
            &expect,
            &["--kv", kv.to_str().unwrap(), "--name", "counter"],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{lang}, continuing after {:?}: {}",
            &LANGUAGES[..round],
            show(&out)
        );
    }
}
