//! Every example guest's outcomes through `lockgate test --expect`, plus the command's failure
//! modes: a mismatch exits 1 with a readable diff, a bad fixture exits 2 naming the line.

use lockgate_tests::{guest, lockgate, show, workspace_root};

fn run_fixture(name: &str, extra: &[&str]) -> std::process::Output {
    let root = workspace_root();
    let component = guest(name);
    let input = format!("tests/fixtures/{name}/input.jsonl");
    let expect = format!("tests/fixtures/{name}/expected.jsonl");
    let mut args = vec![
        "test",
        component.to_str().expect("utf-8 path"),
        "--input",
        &input,
        "--expect",
        &expect,
    ];
    args.extend_from_slice(extra);
    lockgate(&root, &args)
}

#[test]
fn uppercase_matches_its_fixture() {
    let out = run_fixture("uppercase", &["--config", "target=shouted"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all 3 message(s) match"));
}

#[test]
fn router_matches_its_fixture() {
    let out = run_fixture(
        "router",
        &[
            "-c",
            "route.order=orders",
            "-c",
            "route.refund=refunds",
            "-c",
            "default=misc",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn flaky_matches_its_fixture() {
    let out = run_fixture("flaky", &["-c", "target=done", "-c", "fail_attempts=2"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn adversarial_matches_its_fixture() {
    // A deadline the loops hit while building a 10 MiB output (`publish-big`) stays well inside
    // it on a loaded machine; the demo runs the same fixture with 200 ms.
    let out = run_fixture(
        "adversarial",
        &["--timeout-ms", "1000", "--max-memory-mb", "32"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn per_message_isolation_gives_the_same_results() {
    let out = run_fixture(
        "uppercase",
        &["--config", "target=shouted", "--per-message"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn mismatch_exits_1_with_a_diff_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let expect = dir.path().join("expected.jsonl");
    std::fs::write(&input, "{\"payload\": \"abc\"}\n{\"payload\": \"x\"}\n").expect("write");
    std::fs::write(
        &expect,
        "{\"outcome\": \"ok\", \"published\": [{\"payload\": \"abc\"}]}\n{\"outcome\": \"ok\"}\n",
    )
    .expect("write");
    let component = guest("uppercase");
    let out = lockgate(
        dir.path(),
        &[
            "test",
            component.to_str().expect("utf-8"),
            "-i",
            "in.jsonl",
            "-e",
            "expected.jsonl",
            "-c",
            "target=t",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("message 1 (in.jsonl line 1) does not match expected.jsonl line 1:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("published[0].payload: expected \"abc\", got \"ABC\""),
        "{stderr}"
    );
    assert!(!stderr.contains("message 2"), "message 2 matched: {stderr}");
}

#[test]
fn json_output_is_one_object_per_message() {
    let root = workspace_root();
    let component = guest("uppercase");
    let out = lockgate(
        &root,
        &[
            "test",
            component.to_str().expect("utf-8"),
            "--input",
            "tests/fixtures/uppercase/input.jsonl",
            "--json",
            "-c",
            "target=x",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[0]["published"][0]["payload"], "HELLO");
    assert_eq!(lines[2]["outcome"], "reject");
}

#[test]
fn bad_fixture_lines_exit_2_naming_each_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("in.jsonl"),
        "{\"payload\": \"ok\"}\n{\"paylaod\": \"typo\"}\n{\"attempt\": 0}\n",
    )
    .expect("write");
    let component = guest("uppercase");
    let out = lockgate(
        dir.path(),
        &["test", component.to_str().expect("utf-8"), "-i", "in.jsonl"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in.jsonl: line 2: unknown field `paylaod`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("in.jsonl: line 3: `attempt` starts at 1"),
        "{stderr}"
    );
}

#[test]
fn a_core_module_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("core.wasm"), b"\0asm\x01\0\0\0").expect("write");
    std::fs::write(dir.path().join("in.jsonl"), "{}\n").expect("write");
    let out = lockgate(dir.path(), &["test", "core.wasm", "-i", "in.jsonl"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("core.wasm is a core WebAssembly module, not a component"),
        "{}",
        show(&out)
    );
}
