//! End to end on the embedded broker: `lockgate run` as a child process, 10,000 messages with
//! poison and flaky ones, a SIGKILL mid-stream and a restart. Nothing may be missing, poison
//! messages must all be dead-lettered with their metadata, and (idempotency on) no output may be
//! duplicated. A handler that sleeps past its deadline does not hold its lane.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use lockgate_tests::Proc;
use std::time::{Duration, Instant};

use lockgate::broker::local::LocalBroker;
use lockgate::dlq;
use lockgate::message::{OutRecord, Record};
use lockgate_tests::{guest, lockgate, run_logs, show, start_run, wait_for_progress};

const TOTAL: u64 = 10_000;
/// Generous bound for a debug build on a loaded 2-core machine; the run takes far less.
const DEADLINE: Duration = Duration::from_secs(600);

fn is_poison(i: u64) -> bool {
    i % 100 == 7
}

fn is_flaky(i: u64) -> bool {
    i % 20 == 3
}

fn message(i: u64) -> OutRecord {
    let payload = if is_poison(i) {
        format!(r#"{{"id":{i},"poison":true}}"#)
    } else if is_flaky(i) {
        format!(r#"{{"id":{i},"fail":2}}"#)
    } else {
        format!(r#"{{"id":{i}}}"#)
    };
    OutRecord {
        topic: "orders".into(),
        key: Some(format!("customer-{}", i % 64).into_bytes()),
        headers: vec![("trace".into(), format!("t{i}").into_bytes())],
        payload: payload.into_bytes(),
    }
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"
shutdown_grace_ms = 5000

[handlers.chaos]
module = "{}"
config = {{ target = "out" }}

[routes.orders]
handler = "chaos"
source = {{ topic = "orders", group = "e2e" }}
outputs = ["out"]
concurrency = 4
ordering = "key"
retry = {{ max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }}
idempotency = {{ key = "json:/id" }}
"#,
            guest("chaos").display()
        ),
    )
    .unwrap();
    config
}

fn start(dir: &Path, config: &Path, run: u32) -> Proc {
    start_run(dir, config, run, None, "warn")
}

fn logs(dir: &Path, run: u32) -> String {
    run_logs(dir, run)
}

/// Waits until output + dead letters reach `n`.
fn wait_for(broker: &LocalBroker, child: &mut Proc, n: u64, dir: &Path, run: u32) {
    wait_for_progress(
        child,
        dir,
        run,
        n,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("out").unwrap() + broker.end_offset("orders.dlq").unwrap(),
    );
}

fn id_of(r: &Record) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    v["id"].as_u64().unwrap()
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();

    // Half the stream before the start, half while the first process runs.
    let first: Vec<OutRecord> = (0..TOTAL / 2).map(message).collect();
    broker.append(&first).unwrap();
    let mut child = start(dir.path(), &config, 1);
    wait_for(&broker, &mut child, 1_000, dir.path(), 1);
    let second: Vec<OutRecord> = (TOTAL / 2..TOTAL).map(message).collect();
    broker.append(&second).unwrap();
    wait_for(&broker, &mut child, TOTAL / 2, dir.path(), 1);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = broker.end_offset("out").unwrap() + broker.end_offset("orders.dlq").unwrap();
    assert!(at_kill < TOTAL, "the kill came too late to test anything");

    let mut child = start(dir.path(), &config, 2);
    wait_for(&broker, &mut child, TOTAL, dir.path(), 2);
    // A graceful stop commits the final position.
    lockgate_tests::stop_run(&mut child, dir.path(), 2);

    let outputs = broker.read("out", 0, usize::MAX).unwrap();
    let dead = broker.read("orders.dlq", 0, usize::MAX).unwrap();

    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for r in &outputs {
        *seen.entry(id_of(r)).or_default() += 1;
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(duplicated.is_empty(), "duplicated outputs: {duplicated:?}");
    let want_out: BTreeSet<u64> = (0..TOTAL).filter(|i| !is_poison(*i)).collect();
    let got_out: BTreeSet<u64> = seen.keys().copied().collect();
    let missing: Vec<_> = want_out.difference(&got_out).take(10).collect();
    assert!(
        missing.is_empty(),
        "missing from the output: {missing:?}..."
    );
    assert_eq!(
        got_out, want_out,
        "outputs that should have been dead-lettered"
    );

    let want_dead: BTreeSet<u64> = (0..TOTAL).filter(|i| is_poison(*i)).collect();
    let got_dead: Vec<u64> = dead.iter().map(id_of).collect();
    assert_eq!(got_dead.len(), want_dead.len(), "duplicated dead letters");
    assert_eq!(got_dead.iter().copied().collect::<BTreeSet<_>>(), want_dead);
    for d in &dead {
        let i = id_of(d);
        let offset = i.to_string();
        let trace = format!("t{i}");
        let key = format!("customer-{}", i % 64);
        assert_eq!(d.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(
            d.header("trace"),
            Some(trace.as_bytes()),
            "original headers kept"
        );
        for (name, want) in [
            ("route", "orders"),
            ("handler", "chaos"),
            ("topic", "orders"),
            ("partition", "0"),
            ("offset", offset.as_str()),
            ("error-kind", "reject"),
            ("gave-up", "rejected"),
            ("attempts", "1"),
        ] {
            assert_eq!(
                dlq::header(d, name),
                Some(want),
                "{name} of dead letter {i}"
            );
        }
        assert_eq!(
            dlq::header(d, "reason"),
            Some(format!("order {i} is poison").as_str())
        );
        assert_eq!(dlq::header(d, "module-hash").map(str::len), Some(64));
    }
    // The graceful stop reported and committed a position that covers every message.
    let stdout = logs(dir.path(), 2);
    assert!(stdout.contains("route orders: stopped"), "{stdout}");
    assert_eq!(broker.committed("orders", "e2e").unwrap(), TOTAL);
}

#[test]
fn run_refuses_a_bad_config_with_the_file_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rt.toml"),
        "[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"in\" }\nretry = { initial_backoff_ms = 500, max_backoff_ms = 100 }\n",
    )
    .unwrap();
    let out = lockgate(dir.path(), &["run", "rt.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "rt.toml: routes.r.retry.max_backoff_ms: 100 is less than initial_backoff_ms (500)"
        ),
        "{}",
        show(&out)
    );
    assert!(!dir.path().join(".lockgate").exists(), "started anyway");
}

#[test]
fn send_then_tail_round_trips_keys_headers_and_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("st");
    let state = state.to_str().unwrap();
    let out = lockgate(
        dir.path(),
        &[
            "send",
            "t",
            "hello",
            "--key",
            "k1",
            "-H",
            "a=b",
            "--state-dir",
            state,
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    std::fs::write(
        dir.path().join("m.jsonl"),
        "{\"payload_json\": {\"id\": 2}, \"key\": \"k2\"}\n{\"payload_base64\": \"AJ//\"}\n",
    )
    .unwrap();
    let out = lockgate(
        dir.path(),
        &["send", "t", "--file", "m.jsonl", "--state-dir", state],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("appended 2 messages at offsets 1..=2"));
    let out = lockgate(dir.path(), &["tail", "t", "--json", "--state-dir", state]);
    assert!(out.status.success(), "{}", show(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["payload"], "hello");
    assert_eq!(lines[0]["key"], "k1");
    assert_eq!(lines[0]["headers"]["a"], "b");
    assert_eq!(lines[1]["payload"], "{\"id\":2}");
    assert_eq!(lines[1]["offset"], 1);
    assert_eq!(lines[2]["payload_base64"], "AJ//");
    let out = lockgate(
        dir.path(),
        &["send", "bad/topic", "x", "--state-dir", state],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad/topic"),
        "{}",
        show(&out)
    );
}

#[test]
fn a_route_that_took_nothing_says_so_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut child = start(dir.path(), &config, 1);
    // Started once it printed its summary line.
    let started = std::time::Instant::now();
    while !logs(dir.path(), 1).contains("1 route started") {
        assert!(started.elapsed() < DEADLINE, "{}", logs(dir.path(), 1));
        std::thread::sleep(Duration::from_millis(20));
    }
    lockgate_tests::stop_run(&mut child, dir.path(), 1);
    let said = logs(dir.path(), 1);
    assert!(
        said.contains("route orders: stopped (no messages)"),
        "{said}"
    );
}

/// End to end: `lockgate run` on the embedded broker, one lane, a handler that sleeps far past
/// its `timeout_ms` followed by a normal message. The sleeper is dead-lettered as timed out, and
/// the message behind it does not wait for the sleep.
#[test]
fn a_sleeping_handler_does_not_hold_its_lane() {
    /// The handler's `timeout_ms`.
    const TIMEOUT: Duration = Duration::from_millis(200);
    /// How long the adversarial guest's `sleep` sleeps.
    const LONG_WAIT: Duration = Duration::from_secs(10);

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"

[handlers.adversarial]
module = "{}"
timeout_ms = {}

[routes.probe]
handler = "adversarial"
source = {{ topic = "probe", group = "sandbox" }}
outputs = ["out"]
concurrency = 1
retry = {{ max_attempts = 1 }}
"#,
            guest("adversarial").display(),
            TIMEOUT.as_millis()
        ),
    )
    .expect("config");
    let broker = LocalBroker::open(&dir.path().join("state/local")).expect("broker");
    let record = |payload: &str| OutRecord {
        topic: "probe".into(),
        key: None,
        headers: Vec::new(),
        payload: payload.as_bytes().to_vec(),
    };
    let mut child = start_run(dir.path(), &config, 1, None, "warn");
    let count = |topic: &str| broker.end_offset(topic).expect("end offset");
    let wait = |child: &mut Proc, target: u64, within: Duration| {
        wait_for_progress(
            child,
            dir.path(),
            1,
            target,
            within,
            Duration::from_millis(10),
            || count("out") + count("probe.dlq"),
        );
    };
    // The route is up (component compiled, instance warm) once the first message is through.
    broker.append(&[record("warm-up")]).expect("append");
    wait(&mut child, 1, Duration::from_secs(120));

    let start = Instant::now();
    broker
        .append(&[record("sleep"), record("after the sleeper")])
        .expect("append");
    // Without a bound on the sleep, the second message would wait the whole `LONG_WAIT`.
    wait(&mut child, 3, LONG_WAIT / 2);
    let took = start.elapsed();
    lockgate_tests::stop_run(&mut child, dir.path(), 1);

    let outputs: Vec<String> = broker
        .read("out", 0, usize::MAX)
        .expect("read")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    assert_eq!(outputs, ["warm-up", "after the sleeper"], "took {took:?}");
    let dead = broker.read("probe.dlq", 0, usize::MAX).expect("read");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"sleep");
    assert_eq!(dlq::header(&dead[0], "error-kind"), Some("timed_out"));
    assert!(
        took >= TIMEOUT,
        "the sleeper cannot have been handled in {took:?}"
    );
}
