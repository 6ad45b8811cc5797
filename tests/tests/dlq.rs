//! `lockgate dlq list|show|replay` on the embedded broker: poison messages are dead-lettered,
//! listed and filtered, the handler is fixed, the dead letters are replayed (interrupted once,
//! killed once), every one succeeds exactly once although the route deduplicates by a payload
//! key, true duplicates are still skipped, each letter's result is reported, and a further
//! replay does nothing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lockgate::broker::local::LocalBroker;
use lockgate::message::Record;
use lockgate_tests::dlq::{list, order, wait_committed, write_config};
use lockgate_tests::{
    Proc, lockgate, logs_of, show, signal, spawn_lockgate, start_run, stop_run, wait_for_progress,
};

const DEADLINE: Duration = Duration::from_secs(120);

fn id_of(r: &Record) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    v["id"].as_u64().unwrap()
}

fn run_until(broker: &LocalBroker, child: &mut Proc, dir: &Path, run: u32, out: u64, dlq: u64) {
    wait_for_progress(
        child,
        dir,
        run,
        out + dlq,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("out").unwrap().min(out) + dead_letters(broker).min(dlq),
    );
}

/// Dead letters in `orders.dlq` (not counting replay markers).
fn dead_letters(broker: &LocalBroker) -> u64 {
    broker
        .read("orders.dlq", 0, 10_000)
        .unwrap()
        .iter()
        .filter(|r| r.header("lockgate-dlq-replayed").is_none())
        .count() as u64
}

fn count_status(rows: &[serde_json::Value], status: &str) -> usize {
    rows.iter().filter(|r| r["status"] == status).count()
}

#[test]
fn dead_letters_are_listed_fixed_replayed_once_and_an_interrupted_replay_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    broker
        .append(&(0..40).map(order).collect::<Vec<_>>())
        .unwrap();

    // Run 1, the broken handler: 25 outputs, 15 dead letters.
    let config = write_config(dir.path(), false, None);
    let mut run = start_run(dir.path(), &config, 1, None, "warn");
    run_until(&broker, &mut run, dir.path(), 1, 25, 15);
    stop_run(&mut run, dir.path(), 1);

    // List and filter.
    let all = list(dir.path(), &[]);
    assert_eq!(all.len(), 15, "{all:?}");
    assert_eq!(count_status(&all, "pending"), 15);
    let rejects = list(dir.path(), &["--error-kind", "reject"]);
    assert_eq!(rejects.len(), 10);
    assert!(rejects.iter().all(|r| r["gave_up"] == "rejected"
        && r["attempts"] == 1
        && r["route"] == "orders"
        && r["reason"].as_str().unwrap().ends_with("is poison")));
    let retries = list(dir.path(), &["--error-kind", "retry", "--route", "orders"]);
    assert_eq!(retries.len(), 5);
    assert!(
        retries
            .iter()
            .all(|r| r["gave_up"] == "attempts_exhausted" && r["attempts"] == 2)
    );
    assert_eq!(list(dir.path(), &["--since", "1h"]).len(), 15);
    assert_eq!(list(dir.path(), &["--until", "1h"]).len(), 0);
    let out = lockgate(dir.path(), &["dlq", "list", "--route", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(show(&out).contains("no route \"nope\" (routes: orders)"));
    let out = lockgate(dir.path(), &["dlq", "list", "--since", "yesterday-ish"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        show(&out).contains("neither an RFC 3339 time"),
        "{}",
        show(&out)
    );

    // The table and one dead letter whole.
    let out = lockgate(dir.path(), &["dlq", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with("POSITION"), "{table}");
    assert!(
        table.contains("15 dead letters (15 pending, 0 replayed) in local:orders.dlq"),
        "{table}"
    );
    let first = rejects[0]["position"].as_str().unwrap();
    assert_eq!(first, "orders.dlq/0/0");
    let out = lockgate(dir.path(), &["dlq", "show", first]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("error          reject: order 25 is poison (rejected after 1 attempt)"),
        "{text}"
    );
    assert!(text.contains("source         orders/0/25"), "{text}");
    assert!(text.contains("key            k25"), "{text}");
    assert!(text.contains("header         trace=t25"), "{text}");
    assert!(
        text.contains(r#"payload        {"id":25,"poison":true}"#),
        "{text}"
    );
    let out = lockgate(dir.path(), &["dlq", "show", "orders.dlq/0/999"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));

    // A production failure becomes a regression test: the poison orders, exported as a
    // fixture, fail the same way under `lockgate test`.
    let out = lockgate(
        dir.path(),
        &["dlq", "export", "--error-kind", "reject", "--fixtures"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let exported = String::from_utf8_lossy(&out.stdout).into_owned();
    let messages: Vec<serde_json::Value> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(messages.len(), 10, "{exported}");
    assert!(
        exported.starts_with("# local:orders.dlq orders.dlq/0/0: route orders, reject after 1 attempt(s): order 25 is poison\n"),
        "{exported}"
    );
    assert_eq!(messages[0]["topic"], "orders");
    assert_eq!(messages[0]["offset"], 25, "{exported}");
    assert_eq!(messages[0]["key"], "k25");
    assert_eq!(messages[0]["headers"], serde_json::json!({"trace": "t25"}));
    assert_eq!(
        messages[0]["payload_json"],
        serde_json::json!({"id": 25, "poison": true})
    );
    let fixture = dir.path().join("failures.jsonl");
    std::fs::write(&fixture, &exported).unwrap();
    let expect = dir.path().join("failures.expect.jsonl");
    std::fs::write(
        &expect,
        "{\"outcome\": \"reject\", \"reason_contains\": \"is poison\"}\n".repeat(10),
    )
    .unwrap();
    let guest = lockgate_tests::guest("chaos");
    let test_args = |fixture: &Path, expect: &Path| {
        vec![
            "test".to_owned(),
            guest.display().to_string(),
            "--input".into(),
            fixture.display().to_string(),
            "--expect".into(),
            expect.display().to_string(),
            "-c".into(),
            "target=out".into(),
        ]
    };
    let args = test_args(&fixture, &expect);
    let out = lockgate(
        dir.path(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", show(&out));
    let out = lockgate(dir.path(), &["dlq", "export", "--route", "orders"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--fixtures names the format: {}",
        show(&out)
    );

    // So does traffic read with `tail --fixtures`: the first good orders pass with their
    // output, written as JSON whatever the handler's spacing.
    let out = lockgate(dir.path(), &["tail", "orders", "-n", "2", "--fixtures"]);
    assert!(out.status.success(), "{}", show(&out));
    let tailed = dir.path().join("tailed.jsonl");
    std::fs::write(&tailed, &out.stdout).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "orders/0/0");
    assert_eq!(first["payload_json"], serde_json::json!({"id": 0}));
    let expect = dir.path().join("tailed.expect.jsonl");
    std::fs::write(
        &expect,
        "{\"outcome\": \"ok\", \"published\": [{\"topic\": \"out\", \"payload_json\": {\"id\": 0}}]}\n{\"outcome\": \"ok\", \"published\": [{\"payload_json\": {\"id\": 1}}]}\n",
    )
    .unwrap();
    let args = test_args(&tailed, &expect);
    let out = lockgate(
        dir.path(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", show(&out));

    // A dry run publishes nothing.
    let out = lockgate(
        dir.path(),
        &["dlq", "replay", "--error-kind", "reject", "--dry-run"],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains("dry run: 10 dead letters would be replayed"),
        "{}",
        show(&out)
    );
    assert_eq!(broker.end_offset("orders").unwrap(), 40);

    // Deploy the fixed handler, then replay the rejected ones, slowly, and interrupt.
    let config = write_config(dir.path(), true, None);
    let mut run = start_run(dir.path(), &config, 2, None, "warn");
    let mut replay = spawn_lockgate(
        dir.path(),
        "replay1",
        &[
            "dlq",
            "replay",
            "--error-kind",
            "reject",
            "--batch",
            "2",
            "--rate",
            "10",
        ],
    );
    wait_for_progress(
        &mut replay,
        dir.path(),
        0,
        44,
        DEADLINE,
        Duration::from_millis(10),
        || broker.end_offset("orders").unwrap(),
    );
    signal(&replay, "INT");
    let status = replay.wait().unwrap();
    let (stdout, stderr) = logs_of(dir.path(), "replay1");
    assert_eq!(status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    let first_part = broker.end_offset("orders").unwrap() - 40;
    assert!((4..10).contains(&first_part), "{first_part}\n{stderr}");
    assert_eq!(
        count_status(&list(dir.path(), &["--error-kind", "reject"]), "replayed") as u64,
        first_part,
        "every published batch is marked, nothing else"
    );

    // Resume: the rest, and only the rest; each handled by the running route.
    let out = lockgate(dir.path(), &["dlq", "replay", "--error-kind", "reject"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains(&format!("replayed {} dead letters", 10 - first_part)),
        "{}",
        show(&out)
    );
    assert!(
        show(&out).contains(&format!(
            "results: {} handled, 0 skipped (already handled), 0 dead-lettered again",
            10 - first_part
        )),
        "{}",
        show(&out)
    );
    assert_eq!(broker.end_offset("orders").unwrap(), 50);
    let out = lockgate(dir.path(), &["dlq", "replay", "--error-kind", "reject"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains(
            "nothing to replay: no pending dead letter matches (10 matching already replayed)"
        ),
        "{}",
        show(&out)
    );
    assert_eq!(broker.end_offset("orders").unwrap(), 50);

    // The copies: original key, payload and headers, marked, no envelope.
    let copies = broker.read("orders", 40, 100).unwrap();
    for c in &copies {
        let from = std::str::from_utf8(c.header("lockgate-replayed-from").unwrap()).unwrap();
        assert!(from.starts_with("orders.dlq/0/"), "{c:?}");
        assert_eq!(
            c.header("lockgate-id").unwrap(),
            format!("orders:replay:{from}").as_bytes()
        );
        let id = id_of(c);
        assert_eq!(c.key.as_deref(), Some(format!("k{id}").as_bytes()));
        assert_eq!(c.header("trace"), Some(format!("t{id}").as_bytes()));
        assert!(
            c.headers
                .iter()
                .all(|(n, _)| !n.starts_with("lockgate-dlq-"))
        );
    }

    // The fixed handler forwards every replayed poison order exactly once; true duplicates of
    // an order handled at first and of one handled on replay are skipped.
    run_until(&broker, &mut run, dir.path(), 2, 35, 15);
    broker.append(&[order(3), order(26)]).unwrap();
    wait_committed(&broker, &mut run, dir.path(), 2, 52);
    let mut seen = BTreeMap::<u64, u32>::new();
    for r in broker.read("out", 0, 1000).unwrap() {
        *seen.entry(id_of(&r)).or_default() += 1;
    }
    assert_eq!(seen.len(), 35, "{seen:?}");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert!((25..35).all(|i| seen.contains_key(&i)));

    stop_run(&mut run, dir.path(), 2);
    assert_eq!(lockgate_tests::run_stat(dir.path(), 2, "duplicates"), 2);
    let handled = list(dir.path(), &["--error-kind", "reject"]);
    assert!(
        handled
            .iter()
            .all(|r| r["result"] == "handled" && r["result_route"] == "orders"),
        "{handled:?}"
    );

    // A kill in the middle of a replay repeats nothing: the copies' ids dedup on this broker.
    // Replaying the still-failing ones dead-letters them again (new positions, pending).
    let mut replay = spawn_lockgate(
        dir.path(),
        "replay2",
        &[
            "dlq", "replay", "--route", "orders", "--batch", "1", "--rate", "4",
        ],
    );
    wait_for_progress(
        &mut replay,
        dir.path(),
        0,
        54,
        DEADLINE,
        Duration::from_millis(10),
        || broker.end_offset("orders").unwrap(),
    );
    signal(&replay, "KILL");
    let _ = replay.wait();
    // No route runs now: `--wait 0` publishes without waiting for results.
    let out = lockgate(
        dir.path(),
        &["dlq", "replay", "--route", "orders", "--wait", "0"],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(broker.end_offset("orders").unwrap(), 57, "each copy once");
    let waiting = list(dir.path(), &["--error-kind", "retry"]);
    assert!(
        waiting
            .iter()
            .all(|r| r["status"] == "replayed" && r["result"].is_null()),
        "{waiting:?}"
    );
    let mut run = start_run(dir.path(), &config, 3, None, "warn");
    run_until(&broker, &mut run, dir.path(), 3, 35, 20);
    // Each still-failing copy ran again (its dead-lettered key re-opened) and failed again.
    let started = std::time::Instant::now();
    let failed = loop {
        let rows = list(dir.path(), &["--error-kind", "retry"]);
        let failed: Vec<_> = rows
            .into_iter()
            .filter(|r| r["result"] == "failed")
            .collect();
        if failed.len() == 5 || started.elapsed() > DEADLINE {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop_run(&mut run, dir.path(), 3);
    assert_eq!(failed.len(), 5, "{failed:?}");
    assert!(
        failed.iter().all(|r| r["result_detail"]
            .as_str()
            .unwrap()
            .starts_with("retry: order 3")),
        "{failed:?}"
    );
    let all = list(dir.path(), &[]);
    assert_eq!(all.len(), 20);
    assert_eq!(count_status(&all, "replayed"), 15);
    let again: Vec<_> = all.iter().filter(|r| r["status"] == "pending").collect();
    assert_eq!(again.len(), 5);
    assert!(again.iter().all(|r| r["error_kind"] == "retry"));
    let table =
        String::from_utf8_lossy(&lockgate(dir.path(), &["dlq", "list"]).stdout).into_owned();
    assert!(
        table.contains("20 dead letters (5 pending, 15 replayed: 5 failed, 10 handled)"),
        "{table}"
    );
}

/// The new user's incident: a route whose `outputs` miss the topic its handler publishes to
/// dead-letters all its traffic. It says so at WARN with the fix and counts the refusals; after
/// the config is fixed (hot reload), a replay runs every letter once, with its output.
#[test]
fn a_route_refusing_its_handlers_outputs_warns_and_replays_after_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    broker
        .append(&(0..20).map(order).collect::<Vec<_>>())
        .unwrap();
    let config = write_config(dir.path(), false, None);
    lockgate_tests::edit_config(&config, "outputs = [\"out\"]", "outputs = [\"elsewhere\"]");
    lockgate_tests::edit_config(
        &config,
        "state_dir = \"state\"",
        "state_dir = \"state\"\nadmin = \"127.0.0.1:0\"",
    );
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    run_until(&broker, &mut run, dir.path(), 1, 0, 20);
    let addr = lockgate_tests::admin::admin_addr(&mut run, dir.path(), 1);
    let page = lockgate_tests::admin::get(&addr, "/metrics").1;
    assert_eq!(
        lockgate_tests::admin::value(&page, "lockgate_outputs_refused_total", "orders"),
        Some(20.0),
        "{page}"
    );
    let logs = lockgate_tests::run_logs(dir.path(), 1);
    let warned = logs
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("the host refused one of its outputs"))
        .filter(|l| l.contains("routes.orders.outputs") && l.contains("not in the route's outputs"))
        .count();
    assert_eq!(warned, 20, "{logs}");

    // The fix, picked up by hot reload; then the replay.
    lockgate_tests::edit_config(&config, "outputs = [\"elsewhere\"]", "outputs = [\"out\"]");
    let started = std::time::Instant::now();
    while lockgate_tests::admin::reloads(&addr).0 < 1 {
        assert!(
            started.elapsed() < DEADLINE,
            "{}",
            lockgate_tests::run_logs(dir.path(), 1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = lockgate(dir.path(), &["dlq", "replay"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out)
            .contains("results: 20 handled, 0 skipped (already handled), 0 dead-lettered again"),
        "{}",
        show(&out)
    );
    stop_run(&mut run, dir.path(), 1);
    let ids: BTreeMap<u64, usize> =
        broker
            .read("out", 0, 100)
            .unwrap()
            .iter()
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(id_of(r)).or_default() += 1;
                m
            });
    assert_eq!(ids, (0..20).map(|i| (i, 1)).collect());
}
