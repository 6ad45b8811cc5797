//! Commands whose output a reader stops reading (`| head`) end normally: exit 0, no panic, no
//! "bad config". Each command here prints well over a pipe's 64 KiB buffer, so it is still
//! writing when the reader goes.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use lockgate::broker::local::LocalBroker;
use lockgate::dlq::{Failure, envelope};
use lockgate::message::Record;
use lockgate::policy::backoff::GiveUpReason;
use lockgate_tests::{guest, lockgate_bin};

/// Runs `lockgate ARGS` in `dir`, reads the first line of its stdout and closes the pipe:
/// (that line, exit code, stderr).
fn first_line_then_close(dir: &Path, args: &[&str]) -> (String, Option<i32>, String) {
    let mut child = Command::new(lockgate_bin())
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        // Dropping the reader closes our end of the pipe.
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    (line, status.code(), stderr)
}

#[test]
fn lockgate_test_json_into_a_closed_pipe_ends_with_success() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    let line = r#"{"payload": "hello, a line long enough to fill the pipe quickly", "key": "k1"}"#;
    std::fs::write(&input, format!("{line}\n").repeat(2_000)).unwrap();
    let wasm = guest("uppercase");
    let (first, code, stderr) = first_line_then_close(
        dir.path(),
        &[
            "test",
            wasm.to_str().unwrap(),
            "--input",
            "input.jsonl",
            "--config",
            "target=out",
            "--json",
        ],
    );
    assert!(first.starts_with(r#"{"elapsed_ms""#), "{first}");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn dlq_list_into_a_closed_pipe_ends_with_success() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        format!(
            "[runtime]\nstate_dir = \"state\"\n\n[handlers.h]\nmodule = \"{}\"\n\n[routes.orders]\nhandler = \"h\"\nsource = {{ topic = \"orders\" }}\n",
            guest("uppercase").display()
        ),
    )
    .unwrap();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let letters: Vec<_> = (0..2_000u64)
        .map(|i| {
            let record = Record {
                topic: "orders".into(),
                partition: Some(0),
                offset: Some(i),
                payload: format!(r#"{{"id":{i}}}"#).into_bytes(),
                ..Record::default()
            };
            let failure = Failure {
                route: "orders".into(),
                handler: "h".into(),
                module_hash: "ab".into(),
                message_id: record.position(),
                error_kind: "reject".into(),
                reason: "a reason long enough to make every row of the list wide".into(),
                gave_up: GiveUpReason::Rejected,
                attempts: 1,
                first_failure_ms: 1,
                last_failure_ms: 2,
            };
            envelope(&record, &failure, "orders.dlq")
        })
        .collect();
    broker.append(&letters).unwrap();
    for json in [false, true] {
        let mut args = vec!["dlq", "list"];
        if json {
            args.push("--json");
        }
        let (first, code, stderr) = first_line_then_close(dir.path(), &args);
        assert!(
            first.starts_with(if json { "{" } else { "POSITION" }),
            "{first}"
        );
        assert_eq!(code, Some(0), "json={json}: {stderr}");
        assert!(stderr.is_empty(), "json={json}: {stderr}");
    }
}
