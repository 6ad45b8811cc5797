//! `lockgate run` against a real Kafka-protocol broker (tansu, started by
//! `scripts/brokers.sh start`; `LOCKGATE_KAFKA_BOOTSTRAP` overrides 127.0.0.1:9092).
//!
//! Every test makes its own topics and consumer group, so tests never see each other's data.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lockgate_tests::Proc;
use std::time::{Duration, Instant};

use lockgate_tests::admin::{self, admin_addr};
use lockgate_tests::kafka::{
    Tail, bootstrap, committed, create_topics, create_topics_at, id_of, produce, runtime, unique,
};
use lockgate_tests::{guest, orders, run_logs, start_run, wait_for_progress};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Generous bound for a debug build on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(600);

struct Names {
    input: String,
    out: String,
    dlq: String,
    group: String,
}

fn names(test: &str) -> Names {
    let base = unique(test);
    Names {
        input: format!("{base}.in"),
        out: format!("{base}.out"),
        dlq: format!("{base}.dlq"),
        group: format!("{base}.group"),
    }
}

fn write_config(dir: &Path, n: &Names, route_extra: &str) -> PathBuf {
    write_config_with(dir, n, "", route_extra)
}

/// `handler_config` adds entries to the handler's config table (`, key = value`).
fn write_config_with(dir: &Path, n: &Names, handler_config: &str, route_extra: &str) -> PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"
shutdown_grace_ms = 5000
admin = "127.0.0.1:0"

[brokers.kafka]
kind = "kafka"
bootstrap_servers = "{bootstrap}"
consumer_properties = {{ "session.timeout.ms" = 6000, "max.poll.interval.ms" = 10000 }}

[handlers.chaos]
module = "{module}"
config = {{ target = "{out}"{handler_config} }}

[routes.orders]
handler = "chaos"
source = {{ broker = "kafka", topic = "{input}", group = "{group}" }}
outputs = ["{out}"]
dlq = {{ topic = "{dlq}" }}
{route_extra}
"#,
            bootstrap = bootstrap(),
            module = guest("chaos").display(),
            out = n.out,
            input = n.input,
            group = n.group,
            dlq = n.dlq,
        ),
    )
    .unwrap();
    config
}

fn start(dir: &Path, config: &Path, run: u32) -> Proc {
    start_in(dir, config, run, None)
}

/// Starts `lockgate run`, optionally with its own state directory (a second process).
fn start_in(dir: &Path, config: &Path, run: u32, state_dir: Option<&Path>) -> Proc {
    start_run(dir, config, run, state_dir, "lockgate=info,warn")
}

fn logs(dir: &Path, run: u32) -> String {
    run_logs(dir, run)
}

/// Waits until `target` distinct messages were handled (output or dead-lettered), reading the
/// topics (the runtime is another process: the topics are where its progress shows).
fn wait_for(tail: &mut Tail, target: usize, child: &mut Proc, dir: &Path, run: u32) {
    // drain() itself waits 200 ms for quiet, so no extra pause between checks.
    wait_for_progress(
        child,
        dir,
        run,
        target as u64,
        DEADLINE,
        Duration::ZERO,
        || {
            tail.drain(Duration::from_millis(200));
            tail.ids().len() as u64
        },
    );
}

fn out_and_dlq(n: &Names) -> Tail {
    Tail::new(&[(&n.out, 3), (&n.dlq, 1)])
}

fn stop(child: &mut Proc, dir: &Path, run: u32) {
    lockgate_tests::stop_run(child, dir, run);
}

/// Compares id sets, naming at most 20 missing and 20 unexpected ids.
fn assert_same(what: &str, got: &BTreeSet<u64>, want: &BTreeSet<u64>) {
    let missing: Vec<_> = want.difference(got).take(20).collect();
    let extra: Vec<_> = got.difference(want).take(20).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} missing (first: {missing:?}), {} unexpected (first: {extra:?})",
        want.difference(got).count(),
        got.difference(want).count()
    );
}

#[test]
fn happy_path_handles_every_message_once_in_order_per_key() {
    const N: u64 = 20_000;
    let rt = runtime();
    let n = names("happy");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    produce(&rt, &n.input, &orders(N, 97, |_| ""));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &n, "concurrency = 3\n");
    let mut child = start(dir.path(), &config, 1);
    let mut tail = out_and_dlq(&n);
    wait_for(&mut tail, N as usize, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);
    tail.drain(Duration::from_secs(2));

    let out = tail.records(&n.out);
    assert_eq!(out.len() as u64, N, "outputs");
    let ids: BTreeSet<u64> = out.iter().map(|g| id_of(&g.payload)).collect();
    assert_same("outputs", &ids, &(0..N).collect());
    assert!(tail.records(&n.dlq).is_empty());
    // Order: per key (each key lives in one input partition), ids only grow.
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut key_partition: BTreeMap<&str, i32> = BTreeMap::new();
    for g in &out {
        let id = id_of(&g.payload);
        if let Some(prev) = last.insert(&g.key, id) {
            assert!(prev < id, "key {} out of order: {prev} then {id}", g.key);
        }
        let p = *key_partition.entry(&g.key).or_insert(g.partition);
        assert_eq!(p, g.partition, "key {} spread over partitions", g.key);
        assert!(g.headers.contains_key("lockgate-id"));
    }
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_repeats_only_what_was_in_flight() {
    const N: u64 = 10_000;
    let poison = |i: u64| i % 100 == 42;
    let rt = runtime();
    let n = names("crash");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    produce(&rt, &n.input, &orders(N, 61, lockgate_tests::crash_mix));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &n,
        "concurrency = 6\nordering = \"key\"\nmax_batch = 4\nretry = { max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }\nidempotency = { key = \"json:/id\" }\n",
    );
    // Kill at two points, then let a third run finish.
    let mut tail = out_and_dlq(&n);
    let mut run = 0;
    for at in [2_000, 6_000] {
        run += 1;
        let mut child = start(dir.path(), &config, run);
        wait_for(&mut tail, at, &mut child, dir.path(), run);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    run += 1;
    let mut child = start(dir.path(), &config, run);
    wait_for(&mut tail, N as usize, &mut child, dir.path(), run);
    stop(&mut child, dir.path(), run);
    tail.drain(Duration::from_secs(2));

    let out = tail.records(&n.out);
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for g in &out {
        *seen.entry(id_of(&g.payload)).or_default() += 1;
    }
    // A Kafka sink cannot drop a duplicate (no transactions), so the one window idempotency
    // leaves open stays: a kill after an output was acknowledged and before its key was
    // recorded. Only messages in that window at a kill may repeat: at most one batch
    // (max_batch = 4) per worker (6) per kill, and only once. (Without idempotency everything
    // since the last commit repeats.)
    let dup: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        dup.iter().all(|(_, c)| **c == 2),
        "outputs repeated more than once: {dup:?}"
    );
    assert!(
        dup.len() <= 2 * 6 * 4,
        "more duplicates than batches in flight at 2 kills: {dup:?}"
    );
    let want: BTreeSet<u64> = (0..N).filter(|i| !poison(*i)).collect();
    assert_same("outputs", &seen.keys().copied().collect(), &want);
    let dead = tail.records(&n.dlq);
    let dead_ids: BTreeSet<u64> = dead.iter().map(|g| id_of(&g.payload)).collect();
    assert_same(
        "dead letters",
        &dead_ids,
        &(0..N).filter(|i| poison(*i)).collect(),
    );
    for d in &dead {
        assert_eq!(d.headers["lockgate-dlq-gave-up"], "rejected");
        assert_eq!(d.headers["lockgate-dlq-topic"], n.input);
        assert!(d.headers.contains_key("lockgate-dlq-partition"));
        assert!(d.headers.contains_key("lockgate-dlq-offset"));
    }
}

#[test]
fn a_poison_message_is_dead_lettered_after_max_attempts_and_other_partitions_flow() {
    const N: u64 = 10_000;
    let rt = runtime();
    let n = names("poison");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    // One message that always asks for a retry.
    produce(
        &rt,
        &n.input,
        &orders(N, 89, |i| if i == 500 { r#","fail":1000"# } else { "" }),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &n,
        "concurrency = 3\nretry = { max_attempts = 3, initial_backoff_ms = 200, max_backoff_ms = 400, jitter = \"none\" }\n",
    );
    let mut child = start(dir.path(), &config, 1);
    let mut tail = out_and_dlq(&n);
    wait_for(&mut tail, N as usize, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);
    tail.drain(Duration::from_secs(2));

    assert_eq!(tail.records(&n.out).len() as u64, N - 1);
    let dead = tail.records(&n.dlq);
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(id_of(&d.payload), 500);
    assert_eq!(d.key, format!("k{}", 500 % 89));
    for (name, want) in [
        ("lockgate-dlq-route", "orders"),
        ("lockgate-dlq-handler", "chaos"),
        ("lockgate-dlq-error-kind", "retry"),
        ("lockgate-dlq-gave-up", "attempts_exhausted"),
        ("lockgate-dlq-attempts", "3"),
    ] {
        assert_eq!(d.headers[name], want, "{name}");
    }
    assert!(d.headers["lockgate-dlq-reason"].contains("order 500"));
    let first: u64 = d.headers["lockgate-dlq-first-failure-ms"].parse().unwrap();
    let last: u64 = d.headers["lockgate-dlq-last-failure-ms"].parse().unwrap();
    assert!(
        last - first >= 400,
        "two backoffs of 200 ms: {first}..{last}"
    );
}

fn succeeded(dir: &Path, run: u32) -> u64 {
    lockgate_tests::run_stat(dir, run, "succeeded")
}

#[test]
fn a_second_runtime_joins_and_the_first_leaves_without_losing_anything() {
    const N: u64 = 6_000;
    let rt = runtime();
    let n = names("rebalance");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    produce(&rt, &n.input, &orders(N, 53, |_| ""));
    let dir = tempfile::tempdir().unwrap();
    // A rate limit keeps the stream going long enough for the second process to join.
    let config = write_config_with(
        dir.path(),
        &n,
        "",
        "concurrency = 3\nrate_limit = { per_second = 250, burst = 50 }\n",
    );
    let mut tail = out_and_dlq(&n);
    let mut first = start(dir.path(), &config, 1);
    wait_for(&mut tail, 1_000, &mut first, dir.path(), 1);
    let mut second = start_in(dir.path(), &config, 2, Some(&dir.path().join("state2")));
    // The group rebalances: the second process gets partitions while the first still runs.
    let started = Instant::now();
    while !logs(dir.path(), 2).contains("Partitions assigned") {
        assert!(
            second.try_wait().unwrap().is_none(),
            "{}",
            logs(dir.path(), 2)
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the second process got no partitions\n{}\n{}",
            logs(dir.path(), 1),
            logs(dir.path(), 2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tail.drain(Duration::from_millis(200));
    assert!(
        (tail.ids().len() as u64) < N,
        "the first process finished before the second joined"
    );
    stop(&mut first, dir.path(), 1);
    wait_for(&mut tail, N as usize, &mut second, dir.path(), 2);
    stop(&mut second, dir.path(), 2);
    tail.drain(Duration::from_secs(2));

    assert!(tail.records(&n.dlq).is_empty());
    let (a, b) = (succeeded(dir.path(), 1), succeeded(dir.path(), 2));
    assert!(a > 0 && b > 0, "work not split: first {a}, second {b}");
    // Without shared idempotency state, messages in flight on a revoked partition may run twice;
    // everything else runs once.
    assert!(a + b < N + 500, "far more work than messages: {a} + {b}");
    for run in [1, 2] {
        let log = logs(dir.path(), run);
        assert!(
            !log.contains("failed"),
            "run {run} reported a failure:\n{log}"
        );
    }
}

#[test]
fn an_open_breaker_pauses_consumption_and_dead_letters_nothing() {
    const N: u64 = 2_000;
    let rt = runtime();
    let n = names("breaker");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    produce(&rt, &n.input, &orders(N, 31, |_| ""));
    let dir = tempfile::tempdir().unwrap();
    // The dependency is down for the first 30 s.
    let down_until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 30_000;
    let config = write_config_with(
        dir.path(),
        &n,
        &format!(", down_until_ms = \"{down_until}\""),
        "concurrency = 3\nretry = { max_attempts = 1000, initial_backoff_ms = 50, max_backoff_ms = 200 }\ncircuit_breaker = { consecutive_failures = 5, open_ms = 1000, half_open_max = 1 }\n",
    );
    let mut child = start(dir.path(), &config, 1);
    let started = Instant::now();
    while !logs(dir.path(), 1).contains("pausing the source") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited\n{}",
            logs(dir.path(), 1)
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the breaker did not pause the source\n{}",
            logs(dir.path(), 1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // While it is down the consumer's lag shows the waiting messages (refreshed every 5 s).
    let addr = admin_addr(&mut child, dir.path(), 1);
    let started = Instant::now();
    let lag = loop {
        let page = admin::get(&addr, "/metrics").1;
        let lag = admin::sum(&page, "lockgate_consumer_lag_messages", "orders");
        if lag > 0.0 {
            break lag;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no lag reported while paused\n{page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(lag <= N as f64, "lag {lag} of {N} messages");
    // Nothing is output, nothing is dead-lettered.
    let mut tail = out_and_dlq(&n);
    tail.drain(Duration::from_millis(500));
    assert!(
        tail.ids().is_empty(),
        "handled while the dependency was down"
    );
    // After the outage the probes succeed and everything drains.
    wait_for(&mut tail, N as usize, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);
    tail.drain(Duration::from_secs(2));
    assert!(
        tail.records(&n.dlq).is_empty(),
        "the breaker sent messages to the DLQ"
    );
    let ids: BTreeSet<u64> = tail
        .records(&n.out)
        .iter()
        .map(|g| id_of(&g.payload))
        .collect();
    assert_same("outputs", &ids, &(0..N).collect());
    assert!(logs(dir.path(), 1).contains("resuming the source"));
}

/// The tansu binary `scripts/brokers.sh` installed.
fn tansu_binary() -> PathBuf {
    let dir = std::env::var_os("LOCKGATE_BROKERS_DIR").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/lockgate/brokers"),
        PathBuf::from,
    );
    let bin = dir.join("tansu");
    assert!(
        bin.is_file(),
        "{} missing: run scripts/brokers.sh start kafka",
        bin.display()
    );
    bin
}

#[test]
fn an_unreachable_dlq_holds_the_offset_until_it_is_back() {
    const N: u64 = 300;
    const POISON: u64 = 100;
    let rt = runtime();
    let n = names("dlqdown");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3)]);
    produce(
        &rt,
        &n.input,
        &orders(N, 7, |i| if i == POISON { r#","poison":true"# } else { "" }),
    );
    // Where each message landed, to know what the stalled partition holds back.
    let mut input = Tail::new(&[(&n.input, 3)]);
    input.drain(Duration::from_secs(2));
    let inputs = input.records(&n.input);
    assert_eq!(inputs.len() as u64, N);
    let poison_partition = inputs
        .iter()
        .find(|g| id_of(&g.payload) == POISON)
        .unwrap()
        .partition;
    let in_poison_partition: Vec<u64> = inputs
        .iter()
        .filter(|g| g.partition == poison_partition)
        .map(|g| id_of(&g.payload))
        .collect();
    let poison_offset = in_poison_partition
        .iter()
        .position(|i| *i == POISON)
        .unwrap() as i64;
    let held_back = in_poison_partition.len() - poison_offset as usize;

    // The DLQ lives on a second broker whose port is closed for now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &n, "concurrency = 3\n");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("dlq = {{ topic = \"{}\" }}", n.dlq),
        &format!("dlq = {{ broker = \"dead\", topic = \"{}\" }}", n.dlq),
    ) + &format!(
        "\n[brokers.dead]\nkind = \"kafka\"\nbootstrap_servers = \"{dead}\"\nproducer_properties = {{ \"message.timeout.ms\" = 3000, \"reconnect.backoff.max.ms\" = 500 }}\n"
    );
    std::fs::write(&config, text).unwrap();
    let mut child = start(dir.path(), &config, 1);
    let mut out = Tail::new(&[(&n.out, 3)]);
    wait_for(&mut out, N as usize - held_back, &mut child, dir.path(), 1);
    // Give it time to (wrongly) move on, then check nothing past the poison was done or committed.
    std::thread::sleep(Duration::from_secs(3));
    out.drain(Duration::from_millis(500));
    assert_eq!(
        out.ids().len(),
        N as usize - held_back,
        "handled past the failed DLQ write"
    );
    let stalled = committed(&n.group, &n.input, 3)[poison_partition as usize];
    assert!(
        stalled <= poison_offset,
        "committed {stalled} past the poison message at {poison_offset}"
    );

    // The DLQ broker comes up: the write goes through and everything drains.
    let _broker = Command::new(tansu_binary())
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://{dead}"),
            "--advertised-listener-url",
            &format!("tcp://{dead}"),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Proc)
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(&dead).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "second broker did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    create_topics_at(&rt, &dead, &[(&n.dlq, 1)]);
    wait_for(&mut out, N as usize - 1, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);
    // If the retrying DLQ producer reached the new broker before create_topics_at, tansu
    // auto-created the topic with its own partition count: read every partition it has.
    let partitions = {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &dead)
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(&n.dlq), Duration::from_secs(10))
            .unwrap();
        md.topics()
            .first()
            .map_or(1, |t| t.partitions().len().max(1) as i32)
    };
    // tansu may also show a record to readers only some time after acknowledging it (its high
    // watermark lags): read until it appears.
    let mut dlq = Tail::at(&dead, &[(&n.dlq, partitions)]);
    let started = Instant::now();
    while dlq.records(&n.dlq).is_empty() && started.elapsed() < Duration::from_secs(30) {
        dlq.drain(Duration::from_millis(500));
    }
    dlq.drain(Duration::from_secs(1));
    let dead_letters = dlq.records(&n.dlq);
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(id_of(&dead_letters[0].payload), POISON);
    assert_eq!(dead_letters[0].headers["lockgate-dlq-gave-up"], "rejected");
    let ends: Vec<i64> = (0..3)
        .map(|p| inputs.iter().filter(|g| g.partition == p).count() as i64)
        .collect();
    assert_eq!(committed(&n.group, &n.input, 3), ends);
}

use lockgate_tests::dlq_cmd;

/// The route deduplicates by a payload key in Redis: a dead-lettered order's key must not make
/// its replay a duplicate, and a true duplicate must still be skipped.
#[test]
fn dead_letters_are_replayed_once_after_the_handler_is_fixed() {
    let rt = runtime();
    let n = names("replay");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    // 30 orders; 20..29 are poison for the first handler version.
    produce(
        &rt,
        &n.input,
        &orders(30, 7, |i| if i >= 20 { r#","poison":true"# } else { "" }),
    );
    let dir = tempfile::tempdir().unwrap();
    let keys_in_redis = format!(
        "state = \"shared\"\nidempotency = {{ key = \"json:/id\" }}\n\n[stores.shared]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{}\"\n",
        n.group
    );
    let config = write_config(dir.path(), &n, &keys_in_redis);
    let mut child = start(dir.path(), &config, 1);
    let mut tail = out_and_dlq(&n);
    wait_for(&mut tail, 30, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);

    let listed = dlq_cmd(dir.path(), &["list", "--json", "--route", "orders"]);
    let rows: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 10, "{listed}");
    assert!(rows.iter().all(|r| r["status"] == "pending"
        && r["error_kind"] == "reject"
        && r["dlq"] == format!("kafka:{}", n.dlq)));
    let position = rows[0]["position"].as_str().unwrap();
    let shown = dlq_cmd(dir.path(), &["show", position]);
    assert!(shown.contains("is poison"), "{shown}");

    // The fixed version, then the replay; a second replay finds nothing left.
    let config = write_config_with(dir.path(), &n, r#", poison_ok = "true""#, &keys_in_redis);
    let mut child = start(dir.path(), &config, 2);
    let said = dlq_cmd(dir.path(), &["replay", "--route", "orders"]);
    assert!(said.contains("replayed 10 dead letters"), "{said}");
    assert!(
        said.contains("results: 10 handled, 0 skipped (already handled), 0 dead-lettered again"),
        "{said}"
    );
    let said = dlq_cmd(dir.path(), &["replay", "--route", "orders"]);
    assert!(
        said.contains(
            "nothing to replay: no pending dead letter matches (10 matching already replayed)"
        ),
        "{said}"
    );
    let mut outputs = Tail::new(&[(&n.out, 3)]);
    wait_for(&mut outputs, 30, &mut child, dir.path(), 2);
    // True duplicates of an order that succeeded at first and of one that succeeded on replay
    // are still skipped.
    produce(
        &rt,
        &n.input,
        &[
            ("k3".to_owned(), r#"{"id":3}"#.to_owned()),
            ("k25".to_owned(), r#"{"id":25,"poison":true}"#.to_owned()),
        ],
    );
    let addr = lockgate_tests::admin::admin_addr(&mut child, dir.path(), 2);
    lockgate_tests::wait_for_progress(
        &mut child,
        dir.path(),
        2,
        2,
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let page = lockgate_tests::admin::get(&addr, "/metrics").1;
            lockgate_tests::admin::value(
                &page,
                "lockgate_messages_duplicates_skipped_total",
                "orders",
            )
            .unwrap_or(0.0) as u64
        },
    );
    stop(&mut child, dir.path(), 2);
    outputs.drain(Duration::from_secs(1));
    let out = outputs.records(&n.out);
    assert_eq!(
        out.len(),
        30,
        "each replayed order handled once, duplicates skipped"
    );
    assert_same("outputs", &outputs.ids(), &(0..30).collect());
    let listed = dlq_cmd(dir.path(), &["list", "--json"]);
    assert_eq!(
        listed.matches(r#""status":"replayed""#).count(),
        10,
        "{listed}"
    );
    assert_eq!(
        listed.matches(r#""result":"handled""#).count(),
        10,
        "{listed}"
    );
}

#[test]
fn a_hundred_module_reloads_while_kafka_messages_flow_lose_nothing() {
    const N: u64 = 50_000;
    const RELOADS: usize = 100;
    let rt = runtime();
    let n = names("reload");
    create_topics(&rt, &[(&n.input, 3), (&n.out, 3), (&n.dlq, 1)]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &n, "concurrency = 3\n");
    // The handler's module is a file of the test's, rewritten below.
    let module = dir.path().join("handler.wasm");
    std::fs::copy(guest("chaos"), &module).unwrap();
    lockgate_tests::edit_config(
        &config,
        &guest("chaos").display().to_string(),
        "handler.wasm",
    );
    let mut child = start(dir.path(), &config, 1);
    let addr = admin_addr(&mut child, dir.path(), 1);
    let succeeded = || {
        admin::value(
            &admin::get(&addr, "/metrics").1,
            "lockgate_messages_succeeded_total",
            "orders",
        )
        .unwrap_or(0.0) as u64
    };
    let chunk = N / RELOADS as u64;
    let mut next = 0u64;
    let all = orders(N, 97, |_| "");
    let mut pid_child = child;
    let rss = lockgate_tests::reload::churn(
        &mut pid_child,
        dir.path(),
        1,
        &addr,
        &module,
        RELOADS,
        |i| {
            let handled = i as u64 * chunk;
            let until = |target: u64| {
                let started = Instant::now();
                while succeeded() < target {
                    assert!(started.elapsed() < DEADLINE, "chunk {i} not handled");
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            until(handled);
            produce(&rt, &n.input, &all[next as usize..(next + chunk) as usize]);
            next += chunk;
            until(handled + chunk / 10);
        },
    );
    let mut child = pid_child;
    // Succeeded counts a message once its outputs are acknowledged.
    wait_for_progress(
        &mut child,
        dir.path(),
        1,
        N,
        DEADLINE,
        Duration::from_millis(50),
        succeeded,
    );
    stop(&mut child, dir.path(), 1);
    let mut tail = Tail::new(&[(&n.out, 3), (&n.dlq, 1)]);
    tail.drain(Duration::from_secs(2));

    let out = tail.records(&n.out);
    let mut versions = BTreeMap::<char, u64>::new();
    let mut ids = BTreeMap::<u64, u32>::new();
    for g in &out {
        let (v, id) = lockgate_tests::reload::version_of(g.payload.as_bytes());
        *versions.entry(v).or_default() += 1;
        *ids.entry(id).or_default() += 1;
    }
    assert_eq!(ids.len() as u64, N, "nothing lost");
    assert!(ids.values().all(|c| *c == 1), "each handled once");
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(tail.records(&n.dlq).is_empty(), "garbage never ran");
    let (early, last) = (rss[19], rss[RELOADS - 1]);
    assert!(
        last < early + 48 * 1024,
        "RSS grew from {early} KiB to {last} KiB over 80 reloads"
    );
}
