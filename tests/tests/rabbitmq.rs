//! RabbitMQ routes against the real rabbitmq-server (`scripts/brokers.sh start rabbitmq`):
//! a queue drained in order with poison messages dead-lettered once, a runtime SIGKILLed
//! mid-stream losing nothing, a server restarted or frozen mid-stream losing nothing, and an
//! unroutable output that is not acknowledged.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockgate::state::{EmbeddedStore, KvStore};
use lockgate_tests::kafka::{id_of, unique};
use lockgate_tests::rabbit::{Got, Rabbit, url};
use lockgate_tests::{Proc, crash_mix, guest, run_logs, stop_run};

const DEADLINE: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);

/// One test at a time: one restarts the broker and one changes its consumer_timeout, which
/// would disturb the others.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Queues {
    input: String,
    out: String,
    dlq: String,
}

impl Queues {
    fn new(rabbit: &Rabbit) -> Self {
        Self::declared(rabbit, false)
    }

    /// Like [`Self::new`], with the input queue's `x-single-active-consumer` as given (the
    /// route's must match it, or the server refuses the route's declare).
    fn declared(rabbit: &Rabbit, single_active_consumer: bool) -> Self {
        let base = unique("rmq");
        let q = Self {
            input: format!("{base}.in"),
            out: format!("{base}.out"),
            dlq: format!("{base}.dlq"),
        };
        // The route declares them too; the test reads the outputs from the start.
        rabbit.declare_with(&q.input, single_active_consumer);
        for name in [&q.out, &q.dlq] {
            rabbit.declare(name);
        }
        q
    }

    fn delete(&self, rabbit: &Rabbit) {
        for q in [&self.input, &self.out, &self.dlq] {
            rabbit.delete(q);
        }
    }
}

/// Writes `dir/runtime.toml` (route `orders`: the `chaos` guest from `q.input` to `q.out`)
/// and the URL file it names, so `lockgate dlq` in `dir` finds the broker too.
fn write_config(dir: &Path, q: &Queues, exchange: &str, route: &str) -> PathBuf {
    std::fs::write(dir.join("amqp-url"), url()).unwrap();
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
shutdown_grace_ms = 5000

[brokers.rabbit]
kind = "rabbitmq"
url = {{ file = "amqp-url" }}
exchange = "{exchange}"

[handlers.chaos]
module = "{module}"
config = {{ target = "{out}", count_effects = "true" }}

[routes.orders]
handler = "chaos"
source = {{ broker = "rabbit", topic = "{input}", prefetch = 500 }}
outputs = ["{out}"]
dlq = {{ topic = "{dlq}" }}
retry = {{ max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }}
{route}"#,
            module = guest("chaos").display(),
            input = q.input,
            out = q.out,
            dlq = q.dlq,
        ),
    )
    .unwrap();
    config
}

fn run(dir: &Path, config: &Path, n: u32) -> Proc {
    lockgate_tests::start_run_with_env(
        dir,
        config,
        n,
        Some(&dir.join("state")),
        "lockgate=info,warn",
        &[],
    )
}

/// Polls `progress` until it reaches `target` while run `run` works (see
/// [`lockgate_tests::wait_for_progress`]).
fn wait(proc: &mut Proc, dir: &Path, run: u32, target: u64, progress: impl FnMut() -> u64) {
    lockgate_tests::wait_for_progress(proc, dir, run, target, DEADLINE, POLL, progress);
}

/// Takes messages off `out` and `dlq` into `got` until `want` distinct ids arrived, while run
/// `run` works.
fn collect(
    rabbit: &Rabbit,
    q: &Queues,
    proc: &mut Proc,
    dir: &Path,
    run: u32,
    got: &mut (Vec<Got>, Vec<Got>),
    want: usize,
) {
    wait(proc, dir, run, want as u64, || {
        got.0.extend(rabbit.drain(&q.out));
        got.1.extend(rabbit.drain(&q.dlq));
        let ids: BTreeSet<u64> = got
            .0
            .iter()
            .chain(&got.1)
            .map(|g| id_of(&g.payload))
            .collect();
        ids.len() as u64
    });
}

#[test]
fn a_queue_drains_in_order_and_poison_is_dead_lettered_once() {
    let _serial = serial();
    const N: u64 = 20_000;
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let poison = |i: u64| i % 1000 == 500;
    let messages: Vec<(Option<String>, String)> = (0..N)
        .map(|i| {
            let extra = if poison(i) { r#","poison":true"# } else { "" };
            (
                Some(format!("k{}", i % 7)),
                format!(r#"{{"id":{i}{extra}}}"#),
            )
        })
        .collect();
    // Half the messages carry an AMQP message_id: it is how a queue's messages are told apart.
    rabbit.publish_with(&q.input, &messages, |i| {
        (i % 2 == 0).then(|| format!("order-{i}"))
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    let mut proc = run(dir.path(), &config, 1);
    let mut got = (Vec::new(), Vec::new());
    collect(&rabbit, &q, &mut proc, dir.path(), 1, &mut got, N as usize);
    stop_run(&mut proc, dir.path(), 1);
    got.0.extend(rabbit.drain(&q.out));
    got.1.extend(rabbit.drain(&q.dlq));
    let (out, dead) = got;

    // One lane on one queue: outputs in the queue's order, each once, with its key and id.
    let ids: Vec<u64> = out.iter().map(|g| id_of(&g.payload)).collect();
    let want: Vec<u64> = (0..N).filter(|i| !poison(*i)).collect();
    assert_eq!(ids, want, "outputs out of order, missing or repeated");
    for g in out.iter().take(100) {
        let id = id_of(&g.payload);
        assert_eq!(g.key.as_deref(), Some(format!("k{}", id % 7).as_str()));
        assert!(g.message_id.is_some());
        assert_eq!(g.message_id.as_ref(), g.headers.get("lockgate-id"));
    }
    // Poison: once each in the DLQ, with the envelope.
    let dead_ids: Vec<u64> = dead.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(dead_ids, (0..N).filter(|i| poison(*i)).collect::<Vec<_>>());
    let d = &dead[0];
    assert_eq!(
        d.headers.get("lockgate-dlq-error-kind").map(String::as_str),
        Some("reject")
    );
    assert_eq!(
        d.headers.get("lockgate-dlq-reason").map(String::as_str),
        Some("order 500 is poison")
    );
    // The id the handler saw is the message's own, not the queue's `<queue>/-/-`.
    assert_eq!(
        d.headers.get("lockgate-dlq-message-id"),
        Some(&format!("{}/order-500", q.input)),
        "{:?}",
        d.headers
    );
    assert_eq!(
        d.headers.get("lockgate-dlq-topic"),
        Some(&q.input),
        "{:?}",
        d.headers
    );
    assert_eq!(
        d.headers.get("lockgate-dlq-attempts").map(String::as_str),
        Some("1")
    );
    // Everything was acknowledged: nothing came back to the queue when the run closed.
    assert_eq!(rabbit.ready(&q.input), 0);
    q.delete(&rabbit);
}

#[test]
fn a_runtime_killed_mid_stream_loses_nothing_and_runs_each_effect_once() {
    let _serial = serial();
    const N: u64 = 10_000;
    const KILLS: [usize; 3] = [2_000, 5_000, 8_000];
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let poison = |i: u64| i % 100 == 42;
    let messages: Vec<(Option<String>, String)> = lockgate_tests::orders(N, 50, crash_mix)
        .into_iter()
        .map(|(k, v)| (Some(k), v))
        .collect();
    rabbit.publish(&q.input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &q,
        "",
        "concurrency = 8\nordering = \"key\"\nidempotency = { key = \"json:/id\", lease_ms = 3000 }\n",
    );
    let mut runs = 1;
    let mut proc = run(dir.path(), &config, runs);
    let mut got = (Vec::new(), Vec::new());
    for at in KILLS {
        collect(&rabbit, &q, &mut proc, dir.path(), runs, &mut got, at);
        proc.kill().unwrap();
        proc.wait().unwrap();
        runs += 1;
        proc = run(dir.path(), &config, runs);
    }
    collect(
        &rabbit,
        &q,
        &mut proc,
        dir.path(),
        runs,
        &mut got,
        N as usize,
    );
    stop_run(&mut proc, dir.path(), runs);
    got.0.extend(rabbit.drain(&q.out));
    got.1.extend(rabbit.drain(&q.dlq));
    let (out, dead) = got;

    let mut outputs: BTreeMap<u64, usize> = BTreeMap::new();
    let mut ids_of: BTreeMap<u64, BTreeSet<Option<String>>> = BTreeMap::new();
    for g in &out {
        let id = id_of(&g.payload);
        *outputs.entry(id).or_default() += 1;
        ids_of.entry(id).or_default().insert(g.message_id.clone());
    }
    let want: BTreeSet<u64> = (0..N).filter(|i| !poison(*i)).collect();
    assert_eq!(outputs.keys().copied().collect::<BTreeSet<_>>(), want);
    let dead_ids: BTreeSet<u64> = dead.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(dead_ids, (0..N).filter(|i| poison(*i)).collect());
    // A repeat is the same output published again (same message_id), never a second run.
    assert!(
        ids_of.values().all(|s| s.len() == 1),
        "an output with two different ids: the handler ran twice"
    );
    let store = EmbeddedStore::open(&dir.path().join("state/state.redb")).unwrap();
    let mut twice = 0;
    for id in &want {
        let v = store
            .get("chaos", &format!("effects/{id}"), 0)
            .unwrap()
            .unwrap_or_else(|| panic!("order {id} has no effect"));
        if v != b"1" {
            twice += 1;
        }
    }
    assert_eq!(twice, 0, "effects that ran twice");
    let repeats: usize = outputs.values().map(|n| n - 1).sum();
    eprintln!(
        "rabbitmq crash test: {} outputs, {} dead letters, {} SIGKILLs, {repeats} outputs published again (same message_id)",
        outputs.len(),
        dead_ids.len(),
        KILLS.len()
    );
    assert_eq!(rabbit.ready(&q.input), 0);
    q.delete(&rabbit);
}

#[test]
fn an_unroutable_output_is_not_acknowledged_and_names_exchange_and_routing_key() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    rabbit.publish(&q.input, &[(None, r#"{"id":1}"#.to_owned())]);
    let dir = tempfile::tempdir().unwrap();
    // amq.direct exists on every broker; nothing is bound to the output's routing key.
    let config = write_config(dir.path(), &q, "amq.direct", "");
    let mut proc = run(dir.path(), &config, 1);
    let needle = format!(
        "unroutable: exchange \"amq.direct\" has no queue bound for routing key \"{}\"",
        q.out
    );
    lockgate_tests::wait_for_progress(
        &mut proc,
        dir.path(),
        1,
        1,
        Duration::from_secs(60),
        POLL,
        || {
            let log = std::fs::read_to_string(dir.path().join("run1.stderr")).unwrap_or_default();
            u64::from(log.contains(&needle))
        },
    );
    stop_run(&mut proc, dir.path(), 1);
    // Not acknowledged: the message is back in its queue.
    assert_eq!(rabbit.ready(&q.input), 1);
    q.delete(&rabbit);
}

/// Runs `rabbitmqctl -n rabbit@localhost ARGS` and returns what it printed; fails the test if
/// it fails.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-n", "rabbit@localhost"])
        .args(args)
        .output()
        .expect("rabbitmqctl (scripts/brokers.sh installs it)");
    assert!(out.status.success(), "{}", lockgate_tests::show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets the server's `consumer_timeout` (ms) through `rabbitmqctl eval`; channels opened
/// afterwards get it.
fn set_consumer_timeout(ms: u64) {
    rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, consumer_timeout, {ms})."),
    ]);
}

/// Puts the server's default back even when the test fails.
struct RestoreTimeout;

impl Drop for RestoreTimeout {
    fn drop(&mut self) {
        set_consumer_timeout(1_800_000);
    }
}

#[test]
fn an_open_breaker_leaves_messages_in_the_queue_and_never_meets_consumer_timeout() {
    let _serial = serial();
    const N: u64 = 200;
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    set_consumer_timeout(3_000);
    let _restore = RestoreTimeout;
    let messages: Vec<(Option<String>, String)> = (0..N)
        .map(|i| (Some(format!("k{}", i % 5)), format!(r#"{{"id":{i}}}"#)))
        .collect();
    rabbit.publish(&q.input, &messages);
    let down_until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 8_000;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &q,
        "",
        "concurrency = 4\nordering = \"key\"\ncircuit_breaker = { consecutive_failures = 3, open_ms = 1500 }\n",
    );
    // The dependency is down for 8 s; no attempt limit is reached meanwhile; the source
    // lets go of its deliveries after 1 s paused (half of the 2 s it is told), which one open
    // period of 1.5 s always reaches (whether a half-open probe resumes the source in between
    // depends on which of the dispatcher and a lane's held retry sees the half-open first).
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "count_effects = \"true\"",
            &format!("down_until_ms = \"{down_until}\""),
        )
        .replace(
            "max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50",
            "max_attempts = 1000, initial_backoff_ms = 5, max_backoff_ms = 50",
        )
        .replace(
            "url = { file = \"amqp-url\" }",
            "url = { file = \"amqp-url\" }\nconsumer_timeout_ms = 2000",
        );
    std::fs::write(&config, text).unwrap();
    let mut proc = run(dir.path(), &config, 1);
    let log = || std::fs::read_to_string(dir.path().join("run1.stderr")).unwrap_or_default();
    // While it is down (8 s): the breaker opens, the source lets go, the messages wait in the
    // queue (at least half of them at some point).
    let mut most_ready = 0;
    lockgate_tests::wait_for_progress(
        &mut proc,
        dir.path(),
        1,
        1,
        Duration::from_secs(8),
        POLL,
        || {
            most_ready = most_ready.max(rabbit.ready(&q.input));
            let log = log();
            u64::from(
                log.contains("Circuit breaker open")
                    && log.contains("Paused for half of consumer_timeout")
                    && most_ready >= N as u32 / 2,
            )
        },
    );
    assert_eq!(
        rabbit.ready(&q.dlq),
        0,
        "nothing is dead-lettered for the breaker"
    );
    // After the outage everything drains.
    let mut got = (Vec::new(), Vec::new());
    collect(&rabbit, &q, &mut proc, dir.path(), 1, &mut got, N as usize);
    stop_run(&mut proc, dir.path(), 1);
    assert!(got.1.is_empty(), "dead letters: {:?}", got.1);
    let ids: BTreeSet<u64> = got.0.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, (0..N).collect());
    let logs = run_logs(dir.path(), 1);
    assert!(
        !logs.contains("PRECONDITION_FAILED") && !logs.contains("timed out"),
        "the server closed a channel for consumer_timeout\n{logs}"
    );
    q.delete(&rabbit);
}

fn brokers(command: &str) {
    let script = lockgate_tests::workspace_root().join("scripts/brokers.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .args([command, "rabbitmq"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "brokers.sh {command} rabbitmq: {}",
        lockgate_tests::show(&out)
    );
}

/// Runs 5,000 keyed messages through a route (four lanes by key, idempotency on, `broker`
/// added to its broker table), calls `disturb` once `at` outputs arrived, and asserts that all
/// of them still arrive and nothing is dead-lettered. Returns the run's logs.
fn survives(
    label: &str,
    broker: &str,
    at: usize,
    disturb: impl FnOnce(&mut Proc, &Path),
) -> String {
    const N: u64 = 5_000;
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let messages: Vec<(Option<String>, String)> = (0..N)
        .map(|i| (Some(format!("k{}", i % 20)), format!(r#"{{"id":{i}}}"#)))
        .collect();
    rabbit.publish(&q.input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &q,
        "",
        "concurrency = 4\nordering = \"key\"\nidempotency = { key = \"json:/id\" }\n",
    );
    lockgate_tests::edit_config(
        &config,
        "exchange = \"\"\n",
        &format!("exchange = \"\"\n{broker}"),
    );
    let mut proc = run(dir.path(), &config, 1);
    let mut got = (Vec::new(), Vec::new());
    collect(&rabbit, &q, &mut proc, dir.path(), 1, &mut got, at);
    // The test's own connection may not survive what follows.
    drop(rabbit);
    disturb(&mut proc, dir.path());
    let rabbit = Rabbit::connect();
    collect(&rabbit, &q, &mut proc, dir.path(), 1, &mut got, N as usize);
    stop_run(&mut proc, dir.path(), 1);
    got.0.extend(rabbit.drain(&q.out));
    let ids: BTreeSet<u64> = got.0.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, (0..N).collect());
    assert!(got.1.is_empty(), "dead letters: {}", got.1.len());
    eprintln!(
        "rabbitmq {label}: {} outputs for {N} messages ({} repeated)",
        got.0.len(),
        got.0.len() - ids.len()
    );
    assert_eq!(rabbit.ready(&q.input), 0);
    q.delete(&rabbit);
    run_logs(dir.path(), 1)
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing() {
    let _serial = serial();
    let logs = survives("restart", "", 1_500, |_, _| {
        brokers("stop");
        brokers("start");
    });
    // Reported once as the route's source being unavailable, then back.
    assert!(logs.contains("Unavailable; retrying"), "{logs}");
    assert!(logs.contains("Ready again"), "{logs}");
}

/// The server's Erlang VM, stopped with SIGSTOP until dropped: its sockets stay open and
/// nothing answers, as with a hung server or a partition that drops no connection.
struct Frozen(String);

impl Frozen {
    /// The server VM's OS pid (asked for before the test needs it: `rabbitmqctl` takes a
    /// second or two, in which the route would run on).
    fn server_pid() -> String {
        let pid = rabbitmqctl(&["eval", "os:getpid()."])
            .trim()
            .trim_matches('"')
            .to_owned();
        assert!(pid.parse::<u32>().is_ok(), "server pid: {pid:?}");
        pid
    }

    fn stop(pid: &str) -> Self {
        Self::signal(pid, "STOP");
        Self(pid.to_owned())
    }

    fn signal(pid: &str, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        Self::signal(&self.0, "CONT");
    }
}

#[test]
fn a_server_that_stops_answering_is_given_up_on_and_nothing_is_lost() {
    let _serial = serial();
    let pid = Frozen::server_pid();
    survives("frozen", "request_timeout_ms = 1000\n", 300, |proc, dir| {
        let _frozen = Frozen::stop(&pid);
        // Requests in flight (a publish waiting for its confirm, the reconnect after it) get
        // no answer: the route must say so and give up on them instead of waiting forever.
        let said = "no answer within 1000 ms";
        let within = Duration::from_secs(60);
        lockgate_tests::wait_for_progress(proc, dir, 1, 1, within, POLL, || {
            u64::from(run_logs(dir, 1).contains(said))
        });
    });
}

/// Whether each consumer of `queue` is the active one (`rabbitmqctl list_consumers`).
fn consumers_active(queue: &str) -> Vec<bool> {
    rabbitmqctl(&[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "active",
    ])
    .lines()
    .filter_map(|l| l.split_once('\t'))
    .filter(|(name, _)| *name == queue)
    .map(|(_, active)| active.trim() == "true")
    .collect()
}

#[test]
fn a_single_active_consumer_queue_is_drained_by_one_process_at_a_time_in_order() {
    let _serial = serial();
    const N: u64 = 3_000;
    let rabbit = Rabbit::connect();
    let q = Queues::declared(&rabbit, true);
    let messages: Vec<(Option<String>, String)> =
        (0..N).map(|i| (None, format!(r#"{{"id":{i}}}"#))).collect();
    rabbit.publish(&q.input, &messages);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut procs = Vec::new();
    for dir in [&a, &b] {
        let config = write_config(dir.path(), &q, "", "rate_limit = { per_second = 300 }\n");
        lockgate_tests::edit_config(
            &config,
            "prefetch = 500 }",
            "prefetch = 50, single_active_consumer = true }",
        );
        let mut proc = run(dir.path(), &config, 1);
        let want = procs.len() as u64 + 1;
        wait(&mut proc, dir.path(), 1, want, || {
            consumers_active(&q.input).len() as u64
        });
        procs.push(proc);
    }
    // Both processes consume the queue; the server delivers to one of them only.
    let active = consumers_active(&q.input);
    assert_eq!(active.iter().filter(|a| **a).count(), 1, "{active:?}");
    let mut got = (Vec::new(), Vec::new());
    let mut second = procs.pop().unwrap();
    let mut first = procs.pop().unwrap();
    collect(&rabbit, &q, &mut first, a.path(), 1, &mut got, 1_000);
    lockgate_tests::signal(&first, "KILL");
    first.wait().unwrap();
    // What the killed process held goes back to the queue, and the other takes over.
    collect(&rabbit, &q, &mut second, b.path(), 1, &mut got, N as usize);
    stop_run(&mut second, b.path(), 1);
    got.0.extend(rabbit.drain(&q.out));
    assert!(got.1.is_empty(), "dead letters: {}", got.1.len());
    let mut seen = BTreeSet::new();
    let order: Vec<u64> = got
        .0
        .iter()
        .map(|g| id_of(&g.payload))
        .filter(|id| seen.insert(*id))
        .collect();
    // One process at a time, in queue order: the outputs (each id at its first appearance)
    // are the queue's order, across the handover too.
    assert_eq!(order, (0..N).collect::<Vec<_>>());
    eprintln!(
        "rabbitmq single active consumer: {} outputs for {N} messages ({} repeated after the kill)",
        got.0.len(),
        got.0.len() - order.len()
    );
    assert_eq!(rabbit.ready(&q.input), 0);
    q.delete(&rabbit);
}

/// Whether the server's client connections use TLS, from `rabbitmqctl list_connections`.
fn connections_tls() -> Vec<bool> {
    rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "ssl"])
        .lines()
        .map(|l| l.trim() == "true")
        .collect()
}

#[test]
fn a_route_over_amqps_trusts_its_ca_file_and_refuses_an_unknown_certificate() {
    let _serial = serial();
    const N: u64 = 200;
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let messages: Vec<(Option<String>, String)> =
        (0..N).map(|i| (None, format!(r#"{{"id":{i}}}"#))).collect();
    rabbit.publish(&q.input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    std::fs::write(
        dir.path().join("amqp-url"),
        lockgate_tests::rabbit::tls_url(),
    )
    .unwrap();
    let ca = lockgate_tests::rabbit::tls_ca();
    assert!(
        ca.exists(),
        "{} (scripts/brokers.sh start rabbitmq makes it)",
        ca.display()
    );
    // Without the CA the server's certificate is unknown: no connection, nothing consumed.
    let mut proc = run(dir.path(), &config, 1);
    wait(&mut proc, dir.path(), 1, 1, || {
        u64::from(run_logs(dir.path(), 1).contains("UnknownIssuer"))
    });
    stop_run(&mut proc, dir.path(), 1);
    assert_eq!(rabbit.ready(&q.input), N as u32);
    // With it, the route consumes and publishes over TLS.
    lockgate_tests::edit_config(
        &config,
        "url = { file = \"amqp-url\" }\n",
        &format!(
            "url = {{ file = \"amqp-url\" }}\nca_file = \"{}\"\n",
            ca.display()
        ),
    );
    let mut proc = run(dir.path(), &config, 2);
    let mut got = (Vec::new(), Vec::new());
    collect(&rabbit, &q, &mut proc, dir.path(), 2, &mut got, N as usize);
    // The test's own connection is plain; the route's two (consumer, publisher) are TLS.
    let tls = connections_tls();
    assert_eq!(tls.iter().filter(|t| **t).count(), 2, "{tls:?}");
    stop_run(&mut proc, dir.path(), 2);
    let ids: BTreeSet<u64> = got.0.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, (0..N).collect());
    assert!(got.1.is_empty(), "dead letters: {}", got.1.len());
    q.delete(&rabbit);
}

#[test]
fn broker_mode_waits_in_retry_queues_for_the_backoff_and_counts_attempts() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    rabbit.publish(&q.input, &[(None, r#"{"id":0,"fail":3}"#.to_owned())]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    lockgate_tests::edit_config(
        &config,
        "retry = { max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }",
        "retry = { mode = \"broker\", max_attempts = 5, initial_backoff_ms = 300, max_backoff_ms = 5000, multiplier = 2.0, jitter = \"none\" }",
    );
    let mut proc = lockgate_tests::start_run_with_env(
        dir.path(),
        &config,
        1,
        Some(&dir.path().join("state")),
        "lockgate=debug,warn",
        &[],
    );
    let mut got = (Vec::new(), Vec::new());
    collect(&rabbit, &q, &mut proc, dir.path(), 1, &mut got, 1);
    stop_run(&mut proc, dir.path(), 1);
    assert_eq!(got.0.len(), 1);
    // Every attempt was a delivery of its own: three through retry queues, then success.
    assert_eq!(lockgate_tests::run_stat(dir.path(), 1, "received"), 4);
    let logs = run_logs(dir.path(), 1);
    let failures = lockgate_tests::redeliveries(&logs, |_| true);
    let attempts: Vec<u32> = failures.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, vec![1, 2, 3], "{logs}");
    // Gaps follow the backoff (300 ms, then 600 ms), rounded to a delay tier (within 13%).
    lockgate_tests::assert_gaps(&failures, &[0.3, 0.6], 0.85, &logs);
    for tier in ["316", "631"] {
        rabbit.delete(&format!("{}.retry.{tier}", q.input));
    }
    q.delete(&rabbit);
}

#[test]
fn requests_are_answered_with_their_correlation_id_and_failures_with_an_error() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let reply = rabbit.reply_queue();
    rabbit.request(&q.input, r#"{"id":7}"#, &reply, "c-7");
    rabbit.request(&q.input, r#"{"id":8,"poison":true}"#, &reply, "c-8");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    let mut proc = run(dir.path(), &config, 1);
    let mut answers: Vec<Got> = Vec::new();
    wait(&mut proc, dir.path(), 1, 2, || {
        answers.extend(rabbit.drain(&reply));
        answers.len() as u64
    });
    stop_run(&mut proc, dir.path(), 1);
    let by_id: BTreeMap<String, &Got> = answers
        .iter()
        .map(|g| (g.correlation_id.clone().unwrap_or_default(), g))
        .collect();
    assert_eq!(by_id["c-7"].payload, r#"{"ok":7}"#, "{answers:?}");
    let failed = by_id["c-8"];
    assert_eq!(failed.payload, "");
    assert_eq!(
        failed.headers.get("lockgate-error").map(String::as_str),
        Some("reject")
    );
    assert_eq!(
        failed
            .headers
            .get("lockgate-error-reason")
            .map(String::as_str),
        Some("order 8 is poison")
    );
    // The request's output went out as usual, and the poison one was dead-lettered.
    assert_eq!(rabbit.drain(&q.out).len(), 1);
    assert_eq!(rabbit.drain(&q.dlq).len(), 1);
    q.delete(&rabbit);
}

/// The route deduplicates by a payload key: a dead-lettered order's key must not make its
/// replay a duplicate, and a true duplicate must still be skipped.
#[test]
fn dead_letters_are_listed_and_replayed_from_a_rabbitmq_dlq_once() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let messages: Vec<(Option<String>, String)> = (0..30)
        .map(|i| {
            let extra = if i % 10 == 3 { r#","poison":true"# } else { "" };
            (Some(format!("k{i}")), format!(r#"{{"id":{i}{extra}}}"#))
        })
        .collect();
    rabbit.publish(&q.input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "idempotency = { key = \"json:/id\" }\n");
    lockgate_tests::edit_config(
        &config,
        "shutdown_grace_ms = 5000",
        "shutdown_grace_ms = 5000\nadmin = \"127.0.0.1:0\"",
    );
    let mut proc = run(dir.path(), &config, 1);
    let mut out = Vec::new();
    wait(&mut proc, dir.path(), 1, 30, || {
        out.extend(rabbit.drain(&q.out));
        out.len().min(27) as u64 + u64::from(rabbit.ready(&q.dlq).min(3))
    });
    stop_run(&mut proc, dir.path(), 1);

    // Listing reads the DLQ without consuming it: twice, same letters, same positions.
    let first = lockgate_tests::dlq::list(dir.path(), &[]);
    let again = lockgate_tests::dlq::list(dir.path(), &[]);
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first, again);
    assert!(first.iter().all(|r| r["status"] == "pending"));
    assert_eq!(rabbit.ready(&q.dlq), 3);
    let position = first[0]["position"].as_str().unwrap().to_owned();
    let shown = lockgate_tests::dlq_cmd(dir.path(), &["show", &position]);
    assert!(shown.contains("is poison"), "{shown}");

    // The fixed handler; replay: each letter once, then nothing left to replay.
    lockgate_tests::edit_config(&config, "count_effects = \"true\"", "poison_ok = \"true\"");
    let mut proc = run(dir.path(), &config, 2);
    let replay = lockgate_tests::dlq_cmd(dir.path(), &["replay"]);
    assert!(replay.contains("replayed 3 dead letters"), "{replay}");
    assert!(
        replay.contains("results: 3 handled, 0 skipped (already handled), 0 dead-lettered again"),
        "{replay}"
    );
    wait(&mut proc, dir.path(), 2, 30, || {
        out.extend(rabbit.drain(&q.out));
        out.len() as u64
    });
    // True duplicates of an order handled at first and of one handled on replay: skipped.
    rabbit.publish(
        &q.input,
        &[
            (Some("k0".into()), r#"{"id":0}"#.into()),
            (Some("k13".into()), r#"{"id":13,"poison":true}"#.into()),
        ],
    );
    let addr = lockgate_tests::admin::admin_addr(&mut proc, dir.path(), 2);
    wait(&mut proc, dir.path(), 2, 2, || {
        let page = lockgate_tests::admin::get(&addr, "/metrics").1;
        lockgate_tests::admin::value(
            &page,
            "lockgate_messages_duplicates_skipped_total",
            "orders",
        )
        .unwrap_or(0.0) as u64
    });
    stop_run(&mut proc, dir.path(), 2);
    out.extend(rabbit.drain(&q.out));
    assert_eq!(out.len(), 30, "duplicates publish nothing");
    let ids: BTreeSet<u64> = out.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, (0..30).collect());
    let after = lockgate_tests::dlq::list(dir.path(), &[]);
    assert_eq!(
        after.iter().filter(|r| r["status"] == "replayed").count(),
        3,
        "{after:?}"
    );
    assert_eq!(
        after.iter().filter(|r| r["result"] == "handled").count(),
        3,
        "{after:?}"
    );
    let again = lockgate_tests::dlq_cmd(dir.path(), &["replay"]);
    assert!(again.contains("nothing to replay"), "{again}");
    assert_eq!(rabbit.drain(&q.out).len(), 0);
    q.delete(&rabbit);
}

#[test]
fn broker_mode_retries_through_the_same_delay_tier_more_than_once() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    rabbit.publish(&q.input, &[(None, r#"{"id":0,"fail":3}"#.to_owned())]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    // Every backoff is 300 ms: all three retries wait in the one queue of that tier.
    lockgate_tests::edit_config(
        &config,
        "retry = { max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }",
        "retry = { mode = \"broker\", max_attempts = 5, initial_backoff_ms = 300, max_backoff_ms = 300, jitter = \"none\" }",
    );
    let mut proc = run(dir.path(), &config, 1);
    let mut out = Vec::new();
    lockgate_tests::wait_for_progress(
        &mut proc,
        dir.path(),
        1,
        1,
        Duration::from_secs(30),
        POLL,
        || {
            out.extend(rabbit.drain(&q.out));
            out.len() as u64
        },
    );
    stop_run(&mut proc, dir.path(), 1);
    assert_eq!(lockgate_tests::run_stat(dir.path(), 1, "received"), 4);
    assert_eq!(lockgate_tests::run_stat(dir.path(), 1, "retried"), 3);
    rabbit.delete(&format!("{}.retry.316", q.input));
    q.delete(&rabbit);
}

/// The position an earlier lockgate gave a RabbitMQ dead letter whose `lockgate-id` is `id`
/// (the first 63 bits of its SHA-256), which replay markers already written name: it must not
/// change.
fn digest_position(id: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(id.as_bytes());
    u64::from_be_bytes(d[..8].try_into().unwrap()) >> 1
}

/// Writes one dead letter of route `orders` per `(original lockgate-id, payload)` of queue
/// `input` to the route's DLQ, through the route's own DLQ sink.
fn dead_letter(dir: &Path, config: &Path, input: &str, letters: &[(String, String)]) {
    use lockgate::dlq::{Failure, envelope};
    let config = lockgate::config::Config::load(config).unwrap();
    let local = lockgate::broker::local::LocalBroker::open(&dir.join("local")).unwrap();
    let target = config.routes["orders"].dlq.clone();
    let records: Vec<_> = letters
        .iter()
        .map(|(id, payload)| {
            let original = lockgate::message::Record {
                topic: input.into(),
                headers: vec![("lockgate-id".into(), id.clone().into_bytes())],
                payload: payload.clone().into_bytes(),
                ..Default::default()
            };
            let failure = Failure {
                route: "orders".into(),
                handler: "chaos".into(),
                module_hash: "00".into(),
                message_id: format!("orders.in/{id}"),
                error_kind: "reject".into(),
                reason: format!("{payload} is poison"),
                gave_up: lockgate::policy::backoff::GiveUpReason::Rejected,
                attempts: 1,
                first_failure_ms: 1,
                last_failure_ms: 1,
            };
            envelope(&original, &failure, target.topic())
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut clients = lockgate::app::clients::Clients::default();
        let sink = clients.dlq_sink(&config, &local, &target).await.unwrap();
        sink.publish(records).await.unwrap();
    });
}

/// `lockgate dlq list` prints a RabbitMQ letter's position as a short hex prefix (unique in the
/// queue, at least 8 digits), which `show` and `replay --position` take back, as they take any
/// unique prefix of 4 digits and the 19-digit form of earlier versions; an ambiguous prefix
/// names its candidates.
#[test]
fn short_rabbitmq_dlq_positions_are_printed_and_taken_back_by_show_and_replay() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    // 40 letters, two of which share their first 4 hex digits.
    let prefix4 = |id: &str| {
        format!("{:016x}", digest_position(&format!("orders:dlq:id:{id}")))[..4].to_owned()
    };
    let mut seen = BTreeMap::new();
    let mut twins = None;
    for k in 0.. {
        let id = format!("m{k}");
        if let Some(first) = seen.insert(prefix4(&id), id.clone()) {
            twins = Some((first, id));
            break;
        }
    }
    let (twin_a, twin_b) = twins.unwrap();
    let mut ids: Vec<String> = (0..38).map(|i| format!("x{i}")).collect();
    ids.extend([twin_a.clone(), twin_b.clone()]);
    let letters: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), format!(r#"{{"id":"{id}"}}"#)))
        .collect();
    dead_letter(dir.path(), &config, &q.input, &letters);

    // The table: one short position per letter.
    let table = lockgate_tests::dlq_cmd(dir.path(), &["list"]);
    let short: Vec<String> = table
        .lines()
        .filter(|l| l.starts_with(&format!("{}/", q.dlq)))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(short.len(), 40, "{table}");
    // `--json` prints all 16 digits: the digest earlier versions used, in hex. (A scan gives
    // the letters back, and a quorum queue requeues them at its tail: the order changes from
    // one read to the next.)
    let json = lockgate_tests::dlq::list(dir.path(), &[]);
    let full: BTreeMap<String, String> = json
        .iter()
        .map(|row| {
            let id = row["message_id"]
                .as_str()
                .unwrap()
                .strip_prefix("orders.in/")
                .unwrap();
            (id.to_owned(), row["position"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(full.len(), 40);
    for (id, full) in &full {
        let digest = digest_position(&format!("orders:dlq:id:{id}"));
        assert_eq!(*full, format!("{}/{digest:016x}", q.dlq));
    }
    // Each printed position begins exactly one letter's, with 8 to 15 digits.
    let printed = |id: &str| -> String {
        let begun: Vec<&String> = short
            .iter()
            .filter(|s| full[id].starts_with(s.as_str()))
            .collect();
        assert_eq!(begun.len(), 1, "{id}: {begun:?}");
        begun[0].clone()
    };
    for id in full.keys() {
        let digits = printed(id).len() - q.dlq.len() - 1;
        assert!((8..16).contains(&digits), "{}", printed(id));
    }

    // `show` takes the printed position, a 4-digit prefix and the old decimal form.
    let x4 = printed("x4");
    let shown = lockgate_tests::dlq_cmd(dir.path(), &["show", &x4]);
    assert!(shown.contains(r#"payload        {"id":"x4"}"#), "{shown}");
    assert!(
        shown.contains(&format!("position       {x4} (in full ")),
        "{shown}"
    );
    let four = |p: &str| p[..q.dlq.len() + 5].to_owned();
    let (unique_id, unique4) = full
        .iter()
        .map(|(id, p)| (id, four(p)))
        .find(|(_, p4)| full.values().filter(|o| o.starts_with(p4.as_str())).count() == 1)
        .unwrap();
    let shown = lockgate_tests::dlq_cmd(dir.path(), &["show", &unique4]);
    assert!(shown.contains(&format!(r#""id":"{unique_id}""#)), "{shown}");
    let old = format!("{}/-/{}", q.dlq, digest_position("orders:dlq:id:x4"));
    assert!(lockgate_tests::dlq_cmd(dir.path(), &["show", &old]).contains(r#"{"id":"x4"}"#));

    // Ambiguous, unknown and too short: said, with nothing shown.
    let twin4 = format!("{}/{}", q.dlq, prefix4(&twin_a));
    let out = lockgate_tests::lockgate(dir.path(), &["dlq", "show", &twin4]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{twin4} is ambiguous: it begins 2 positions ({}, {})",
            std::cmp::min(printed(&twin_a), printed(&twin_b)),
            std::cmp::max(printed(&twin_a), printed(&twin_b))
        )),
        "{err}"
    );
    let absent = (0..0x10000)
        .map(|n| format!("{}/{n:04x}", q.dlq))
        .find(|p| !short.iter().any(|s| s.starts_with(p.as_str())))
        .unwrap();
    let out = lockgate_tests::lockgate(dir.path(), &["dlq", "show", &absent]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no dead letter at {absent}")));
    let out = lockgate_tests::lockgate(dir.path(), &["dlq", "show", &x4[..q.dlq.len() + 4]]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("too short"));

    // Replaying the printed position publishes that letter alone, marked by its full identity.
    let replay = lockgate_tests::dlq_cmd(dir.path(), &["replay", "--position", &x4, "--wait", "0"]);
    assert!(replay.contains("replayed 1 dead letter "), "{replay}");
    let copies = rabbit.drain(&q.input);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(copies[0].payload, r#"{"id":"x4"}"#);
    assert_eq!(copies[0].headers["lockgate-replayed-from"], old);
    let after = lockgate_tests::dlq::list(dir.path(), &[]);
    let replayed: Vec<&str> = after
        .iter()
        .filter(|r| r["status"] == "replayed")
        .map(|r| r["position"].as_str().unwrap())
        .collect();
    assert_eq!(replayed, [full["x4"].as_str()]);
    let again = lockgate_tests::dlq_cmd(dir.path(), &["replay", "--position", &old, "--wait", "0"]);
    assert!(again.contains("nothing to replay"), "{again}");
    assert_eq!(rabbit.drain(&q.input).len(), 0);
    q.delete(&rabbit);
}

/// Messages published without a `message_id` are told apart by their delivery's number, in the
/// logs and in their dead letters (which used to name them all `<queue>/-/-`).
#[test]
fn messages_without_an_id_get_distinct_delivery_ids_in_logs_and_dead_letters() {
    let _serial = serial();
    let rabbit = Rabbit::connect();
    let q = Queues::new(&rabbit);
    let messages: Vec<(Option<String>, String)> = (0..4)
        .map(|i| {
            let extra = if i % 2 == 1 { r#","poison":true"# } else { "" };
            (None, format!(r#"{{"id":{i}{extra}}}"#))
        })
        .collect();
    rabbit.publish(&q.input, &messages);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &q, "", "");
    let mut proc = run(dir.path(), &config, 1);
    wait(&mut proc, dir.path(), 1, 2, || {
        u64::from(rabbit.ready(&q.dlq))
    });
    stop_run(&mut proc, dir.path(), 1);
    let logs = run_logs(dir.path(), 1);

    let letters = lockgate_tests::dlq::list(dir.path(), &[]);
    let ids: BTreeSet<String> = letters
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{letters:?}");
    for id in &ids {
        let n = id
            .strip_prefix(&format!("{}/delivery-", q.input))
            .unwrap_or_else(|| panic!("{id}"));
        assert!(n.parse::<u64>().is_ok(), "{id}");
        let said = logs
            .lines()
            .any(|l| l.contains("Dead-lettering message") && l.contains(id.as_str()));
        assert!(said, "no log line names {id}:\n{logs}");
    }
    q.delete(&rabbit);
}
