//! Handler projects outside lockgate's checkout (docs/handlers/projects.md): for each language,
//! `lockgate new`, `lockgate build`, `lockgate test` against the generated fixtures, `lockgate
//! run` on the embedded broker with the generated config; then an edit of the handler, which
//! `lockgate build` rebuilds and the running `lockgate run` reloads. And the docs' quick start,
//! run as written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lockgate_tests::admin::{admin_addr, reloads};
use lockgate_tests::{Proc, lockgate_bin, run_logs, show, signal, spawn_lockgate, workspace_root};

/// A cargo target directory shared by the Rust projects of these tests and kept between runs
/// (beside the one the tests were built in), so their dependencies compile once.
fn rust_target() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .join("lockgate-projects")
}

/// `lockgate ARGS` in `dir`.
fn lockgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(lockgate_bin())
        .current_dir(dir)
        .args(args)
        .env("CARGO_TARGET_DIR", rust_target())
        .env("LOCKGATE_LOG", "warn")
        .output()
        .expect("run lockgate")
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", show(&out));
    out
}

/// The messages of embedded-broker topic `topic` of the project in `dir`, as JSON.
fn tail(dir: &Path, topic: &str) -> Vec<serde_json::Value> {
    let out = ok(lockgate(dir, &["tail", topic, "--json"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("tail --json line"))
        .collect()
}

/// The payloads of `tail`, parsed as JSON.
fn payloads(dir: &Path, topic: &str) -> Vec<serde_json::Value> {
    tail(dir, topic)
        .iter()
        .map(|m| {
            let text = m["payload"].as_str().expect("a text payload");
            serde_json::from_str(text).expect("a JSON payload")
        })
        .collect()
}

/// The handler source of each language, where the edit goes.
fn handler_file(language: &str) -> &'static str {
    match language {
        "rust" => "src/lib.rs",
        "python" => "app.py",
        "javascript" => "handler.js",
        "go" => "handler.go",
        "c" => "handler.c",
        other => panic!("no language {other}"),
    }
}

fn new_build_test_run_edit(language: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = workspace_root();
    assert!(
        !tmp.path().starts_with(&root),
        "the project must be outside the checkout"
    );
    ok(lockgate(tmp.path(), &["new", language, "enrich"]));
    let dir = tmp.path().join("enrich");

    // Nothing in the project points back into lockgate's checkout.
    for entry in walk(&dir) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        assert!(
            !text.contains(&*root.to_string_lossy()),
            "{} refers to the checkout",
            entry.display()
        );
    }

    let built = ok(lockgate(&dir, &["build"]));
    let wasm = dir.join("target/enrich.wasm");
    assert_eq!(
        String::from_utf8_lossy(&built.stdout).trim(),
        wasm.display().to_string(),
        "{}",
        show(&built)
    );
    let tested = ok(lockgate(
        &dir,
        &[
            "test",
            "target/enrich.wasm",
            "--input",
            "fixtures/input.jsonl",
            "--expect",
            "fixtures/expected.jsonl",
        ],
    ));
    assert!(
        String::from_utf8_lossy(&tested.stdout).contains("all 6 message(s) match"),
        "{}",
        show(&tested)
    );

    // The generated config, on the embedded broker, as generated.
    ok(lockgate(
        &dir,
        &["send", "orders", "--file", "fixtures/input.jsonl"],
    ));
    // The run's logs go beside the project, not into it: they are no input of a build.
    let logs = tmp.path();
    let config = dir.join("runtime.toml");
    let config = config.to_str().expect("utf-8 path");
    let mut child = spawn_lockgate(logs, "run1", &["run", config, "--admin", "127.0.0.1:0"]);
    let addr = admin_addr(&mut child, logs, 1);
    let first = wait_for_in(&mut child, logs, &dir, "orders.enriched", 2);
    assert_eq!(first[0]["id"], "o-1");
    assert_eq!(first[0]["tier"], "small");
    assert_eq!(first[1]["tier"], "large");

    // Edit the handler: build rebuilds, run reloads, new orders get the new behaviour.
    let source = dir.join(handler_file(language));
    let text = std::fs::read_to_string(&source).expect("read handler");
    assert!(text.contains("\"large\""), "{}", source.display());
    std::fs::write(&source, text.replace("\"large\"", "\"bulk\"")).expect("edit handler");
    let (applied, _) = reloads(&addr);
    let rebuilt = ok(lockgate(&dir, &["build"]));
    assert!(
        String::from_utf8_lossy(&rebuilt.stderr).contains("lockgate build: built"),
        "{}",
        show(&rebuilt)
    );
    let started = Instant::now();
    while reloads(&addr).0 <= applied {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the rebuilt handler was not reloaded\n{}",
            run_logs(logs, 1)
        );
        assert!(
            child.try_wait().expect("status").is_none(),
            "{}",
            run_logs(logs, 1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(lockgate(
        &dir,
        &[
            "send",
            "orders",
            r#"{"id":"o-9","sku":"tea","qty":30,"unit_price":4.5}"#,
        ],
    ));
    let after = wait_for_in(&mut child, logs, &dir, "orders.enriched", 3);
    assert_eq!(after[2]["id"], "o-9");
    assert_eq!(after[2]["tier"], "bulk", "{}", run_logs(logs, 1));

    // An unchanged rebuild is a no-op, whatever else lands in the folder.
    std::fs::write(dir.join("NOTES.md"), "not a source").expect("write notes");
    let again = ok(lockgate(&dir, &["build"]));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("up to date"),
        "{}",
        show(&again)
    );
    signal(&child, "TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}\n{}", run_logs(logs, 1));
}

/// Every file below `dir` except build output.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                if e.file_name() != "target" {
                    stack.push(p);
                }
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_rust_project_is_created_built_tested_run_and_reloaded_outside_the_checkout() {
    new_build_test_run_edit("rust");
}

#[test]
fn a_python_project_is_created_built_tested_run_and_reloaded_outside_the_checkout() {
    new_build_test_run_edit("python");
}

#[test]
fn a_javascript_project_is_created_built_tested_run_and_reloaded_outside_the_checkout() {
    new_build_test_run_edit("javascript");
}

#[test]
fn a_go_project_is_created_built_tested_run_and_reloaded_outside_the_checkout() {
    new_build_test_run_edit("go");
}

#[test]
fn a_c_project_is_created_built_tested_run_and_reloaded_outside_the_checkout() {
    new_build_test_run_edit("c");
}

/// The shell commands of the first ```sh block under `heading` in `doc`, comments removed.
fn commands_under(doc: &str, heading: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join(doc)).expect("read doc");
    let section = text
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("{doc} has no `{heading}`"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .unwrap_or_else(|| panic!("{doc}: no sh block under {heading}"));
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_quick_start_runs_as_written() {
    let commands = commands_under("docs/handlers/projects.md", "## Quick start");
    assert_eq!(
        commands.len(),
        5,
        "the quick start is five commands: {commands:?}"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin_dir = lockgate_bin().parent().expect("bin dir").to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The last command runs until stopped: exec it, so the signal reaches lockgate run.
    let mut script = commands.join("\n");
    let last = commands.last().expect("a command").clone();
    let tail_at = script.rfind(&last).expect("last command");
    script.replace_range(
        tail_at..,
        &last.replace(
            "&& lockgate run",
            "&& exec lockgate run --admin 127.0.0.1:0",
        ),
    );
    let log =
        |ext: &str| std::fs::File::create(tmp.path().join(format!("run1.{ext}"))).expect("log");
    let child = Command::new("bash")
        .args(["-euc", &script])
        .current_dir(tmp.path())
        .env("PATH", &path)
        .env("LOCKGATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .expect("run the quick start");
    let mut child = Proc(child);
    let dir = tmp.path().join("enrich");
    // The run logs are the quick start's own output, under tmp/run1.*.
    let started = Instant::now();
    while !dir.join(".lockgate").is_dir() {
        assert!(
            child.try_wait().expect("status").is_none(),
            "{}",
            run_logs(tmp.path(), 1)
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{}",
            run_logs(tmp.path(), 1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let enriched = wait_for_in(&mut child, tmp.path(), &dir, "orders.enriched", 2);
    assert_eq!(enriched[1]["total"], 112.5);
    let logs = run_logs(tmp.path(), 1);
    assert!(logs.contains("all 6 message(s) match"), "{logs}");
    signal(&child, "TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}\n{}", run_logs(tmp.path(), 1));
}

/// Waits until embedded-broker `topic` of the project in `dir` holds `n` messages while the run
/// (logs in `logs_dir`) works; fails with its logs otherwise.
fn wait_for_in(
    child: &mut Proc,
    logs_dir: &Path,
    dir: &Path,
    topic: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    let started = Instant::now();
    loop {
        let got = payloads(dir, topic);
        if got.len() >= n {
            return got;
        }
        if let Some(status) = child.try_wait().expect("child status") {
            panic!(
                "the quick start exited ({status})\n{}",
                run_logs(logs_dir, 1)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{topic} holds {} of {n}\n{}",
            got.len(),
            run_logs(logs_dir, 1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The TOML block the quick start gives for "one more step" to a real broker.
fn kafka_step() -> (Vec<String>, String) {
    let text = std::fs::read_to_string(workspace_root().join("docs/handlers/projects.md"))
        .expect("read doc");
    let block = text
        .split("\n## Quick start\n")
        .nth(1)
        .and_then(|s| s.split("```toml\n").nth(1))
        .and_then(|b| b.split("\n```").next())
        .expect("a toml block in the quick start");
    let brokers: Vec<String> = block
        .lines()
        .skip_while(|l| !l.starts_with("[brokers."))
        .take_while(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let source = block
        .lines()
        .find(|l| l.starts_with("source = "))
        .expect("a source line")
        .to_owned();
    assert!(!brokers.is_empty(), "no [brokers.*] table in {block}");
    (brokers, source)
}

#[test]
fn the_quick_starts_one_more_step_moves_the_project_to_kafka() {
    use lockgate_tests::kafka;
    let tmp = tempfile::tempdir().expect("tempdir");
    ok(lockgate(tmp.path(), &["new", "c", "enrich"]));
    let dir = tmp.path().join("enrich");
    ok(lockgate(&dir, &["build"]));

    // The step, as the docs write it; only the topic names are made unique (the broker is
    // shared) and the address is the test broker's.
    let (brokers, source) = kafka_step();
    let topic = kafka::unique("orders");
    let config = dir.join("runtime.toml");
    let generated = std::fs::read_to_string(&config).expect("read runtime.toml");
    let mut edited: Vec<String> = generated
        .lines()
        .map(|l| {
            if l.starts_with("source = ") {
                source.clone()
            } else {
                l.to_owned()
            }
        })
        .map(|l| l.replace("\"orders", &format!("\"{topic}")))
        .collect();
    assert!(
        edited
            .iter()
            .any(|l| l == &source.replace("\"orders", &format!("\"{topic}")))
    );
    edited.push(String::new());
    edited.extend(
        brokers
            .iter()
            .map(|l| l.replace("127.0.0.1:9092", &kafka::bootstrap())),
    );
    std::fs::write(&config, edited.join("\n") + "\n").expect("write runtime.toml");

    let rt = kafka::runtime();
    let enriched = format!("{topic}.enriched");
    let dlq = format!("{topic}.dlq");
    kafka::create_topics(&rt, &[(&topic, 1), (&enriched, 1), (&dlq, 1)]);
    let input = std::fs::read_to_string(dir.join("fixtures/input.jsonl")).expect("fixtures");
    let messages: Vec<(String, String)> = input
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("fixture line");
            let payload = match (&v["payload_json"], &v["payload"]) {
                (serde_json::Value::Null, p) => p.as_str().expect("payload").to_owned(),
                (j, _) => j.to_string(),
            };
            ("k".to_owned(), payload)
        })
        .collect();
    kafka::produce(&rt, &topic, &messages);

    let config = config.to_str().expect("utf-8 path");
    let mut child = spawn_lockgate(tmp.path(), "run1", &["run", config]);
    let logs = tmp.path();
    let mut tail = kafka::Tail::new(&[(&enriched, 1)]);
    let started = Instant::now();
    while tail.records(&enriched).len() < 2 {
        tail.drain(Duration::from_millis(500));
        assert!(
            child.try_wait().expect("status").is_none(),
            "{}",
            run_logs(logs, 1)
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} enriched orders on Kafka\n{}",
            tail.records(&enriched).len(),
            run_logs(logs, 1)
        );
    }
    let got = tail.records(&enriched);
    let tiers: Vec<serde_json::Value> = got
        .iter()
        .map(|g| {
            serde_json::from_str::<serde_json::Value>(&g.payload).expect("JSON")["tier"].clone()
        })
        .collect();
    assert_eq!(tiers, ["small", "large"], "{}", run_logs(logs, 1));
    assert_eq!(got[0].key, "o-1");
    signal(&child, "TERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}\n{}", run_logs(logs, 1));
}
