//! `lockgate run` against a real nats-server (JetStream and core NATS) (started by `scripts/brokers.sh
//! start nats`; `LOCKGATE_NATS_URL` overrides nats://127.0.0.1:4222).
//!
//! Every test makes its own streams, subjects and consumer, so tests never see each other's data.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;

use lockgate_tests::admin;
use lockgate_tests::kafka::unique;
use lockgate_tests::nats::{Got, Nats, url};
use lockgate_tests::{
    Proc, guest, run_logs, run_stat, start_run, start_run_with_env, wait_for_progress,
};

/// Generous bound for a debug build on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(600);

/// Subjects and streams of one test: `<base>.in|out|dlq` in streams `<base>-in|out|dlq`.
struct Names {
    base: String,
    durable: String,
}

impl Names {
    fn new(test: &str) -> Self {
        let base = unique(test);
        Self {
            durable: format!("{base}-worker"),
            base,
        }
    }
    fn subject(&self, what: &str) -> String {
        format!("{}.{what}", self.base)
    }
    fn stream(&self, what: &str) -> String {
        format!("{}-{what}", self.base)
    }
    /// Creates the three streams.
    fn create(&self, nats: &Nats) {
        for what in ["in", "out", "dlq"] {
            nats.create_stream(&self.stream(what), &[&self.subject(what)]);
        }
    }
}

fn write_config(
    dir: &Path,
    n: &Names,
    server: &str,
    source_extra: &str,
    route_extra: &str,
) -> PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"
shutdown_grace_ms = 5000

[brokers.nats]
kind = "nats"
servers = ["{server}"]

[handlers.chaos]
module = "{module}"
timeout_ms = 10000
config = {{ target = "{out}" }}

[routes.orders]
handler = "chaos"
source = {{ broker = "nats", topic = "{input}", group = "{durable}", stream = "{stream}"{source_extra} }}
outputs = ["{out}"]
dlq = {{ topic = "{dlq}" }}
{route_extra}
"#,
            module = guest("chaos").display(),
            out = n.subject("out"),
            input = n.subject("in"),
            durable = n.durable,
            stream = n.stream("in"),
            dlq = n.subject("dlq"),
        ),
    )
    .unwrap();
    config
}

fn start(dir: &Path, config: &Path, run: u32) -> Proc {
    start_run(dir, config, run, None, "lockgate=info,warn")
}

/// Waits until out + dlq streams hold `target` messages.
fn wait_for(nats: &Nats, n: &Names, target: u64, child: &mut Proc, dir: &Path, run: u32) {
    wait_for_progress(
        child,
        dir,
        run,
        target,
        DEADLINE,
        Duration::from_millis(100),
        || nats.count(&n.stream("out")) + nats.count(&n.stream("dlq")),
    );
}

fn stop(child: &mut Proc, dir: &Path, run: u32) {
    lockgate_tests::stop_run(child, dir, run);
}

fn id_of(payload: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    v["id"].as_u64().unwrap()
}

/// [`lockgate_tests::orders`] on `subject`.
fn orders(
    subject: &str,
    n: u64,
    keys: u64,
    extra: impl Fn(u64) -> &'static str,
) -> Vec<(String, Option<String>, String)> {
    lockgate_tests::orders(n, keys, extra)
        .into_iter()
        .map(|(key, payload)| (subject.to_owned(), Some(key), payload))
        .collect()
}

fn counts(got: &[Got]) -> BTreeMap<u64, u32> {
    let mut seen = BTreeMap::new();
    for g in got {
        *seen.entry(id_of(&g.payload)).or_default() += 1;
    }
    seen
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
    let nats = Nats::connect();
    let n = Names::new("js-happy");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), N, 61, |_| ""));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        "",
        "concurrency = 4\nordering = \"key\"\n",
    );
    let mut child = start(dir.path(), &config, 1);
    wait_for(&nats, &n, N, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);

    let out = nats.read(&n.stream("out"));
    assert_eq!(out.len() as u64, N, "outputs");
    let seen = counts(&out);
    assert!(seen.values().all(|c| *c == 1), "an output repeated");
    assert_same(
        "outputs",
        &seen.keys().copied().collect(),
        &(0..N).collect(),
    );
    assert_eq!(nats.count(&n.stream("dlq")), 0);
    // Order per key: ids only grow within a key, and keys travel in `lockgate-key`.
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for g in &out {
        let id = id_of(&g.payload);
        let key = g.headers["lockgate-key"].clone();
        assert_eq!(key, format!("k{}", id % 61));
        if let Some(prev) = last.insert(key.clone(), id) {
            assert!(prev < id, "key {key} out of order: {prev} then {id}");
        }
        assert!(g.headers.contains_key("Nats-Msg-Id"));
    }
    let (unacked, redelivered, pending) = nats.consumer_state(&n.stream("in"), &n.durable);
    assert_eq!((unacked, redelivered, pending), (0, 0, 0));
}

#[test]
fn sigkill_mid_stream_loses_nothing_and_duplicates_no_output() {
    const N: u64 = 10_000;
    let poison = |i: u64| i % 100 == 42;
    let nats = Nats::connect();
    let n = Names::new("js-crash");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), N, 61, lockgate_tests::crash_mix));
    let dir = tempfile::tempdir().unwrap();
    // A short ack_wait so what the killed processes held comes back quickly.
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        ", ack_wait_ms = 2000",
        "concurrency = 6\nordering = \"key\"\nretry = { max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }\nidempotency = { key = \"json:/id\" }\n",
    );
    let mut run = 0;
    for at in [2_000, 6_000] {
        run += 1;
        let mut child = start(dir.path(), &config, run);
        wait_for(&nats, &n, at, &mut child, dir.path(), run);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    run += 1;
    let mut child = start(dir.path(), &config, run);
    wait_for(&nats, &n, N, &mut child, dir.path(), run);
    // Redeliveries of what the kills left unacknowledged may still be running: wait until the
    // consumer has nothing unacknowledged, then stop.
    let started = std::time::Instant::now();
    while nats.consumer_state(&n.stream("in"), &n.durable).0 > 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "{}",
            run_logs(dir.path(), run)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(&mut child, dir.path(), run);

    // JetStream drops a repeated `Nats-Msg-Id`, so with idempotency nothing repeats at all.
    let out = nats.read(&n.stream("out"));
    let seen = counts(&out);
    let dup: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dup.is_empty(), "duplicated outputs: {dup:?}");
    let want: BTreeSet<u64> = (0..N).filter(|i| !poison(*i)).collect();
    assert_same("outputs", &seen.keys().copied().collect(), &want);
    let dead = nats.read(&n.stream("dlq"));
    let dead_ids: BTreeSet<u64> = dead.iter().map(|g| id_of(&g.payload)).collect();
    assert_same(
        "dead letters",
        &dead_ids,
        &(0..N).filter(|i| poison(*i)).collect(),
    );
    assert_eq!(dead.len(), dead_ids.len(), "a dead letter repeated");
}

#[test]
fn a_poison_message_is_dead_lettered_once_termed_and_not_redelivered() {
    let nats = Nats::connect();
    let n = Names::new("js-poison");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), 200, 7, |i| {
        if i == 50 {
            r#","poison":true"#
        } else if i == 60 {
            r#","fail":9"#
        } else {
            ""
        }
    }));
    let dir = tempfile::tempdir().unwrap();
    // max_deliver 2 with in-process retries: attempts happen within one delivery, so the broker's
    // limit is never what ends a message; the pipeline dead-letters and terms it.
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        ", ack_wait_ms = 1000, max_deliver = 2",
        "retry = { max_attempts = 3, initial_backoff_ms = 700, max_backoff_ms = 700, jitter = \"none\" }\n",
    );
    // The server announces every `term` on an advisory subject.
    let mut terminated = nats
        .block_on(nats.client.subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{}.{}",
            n.stream("in"),
            n.durable
        )))
        .unwrap();
    let mut child = start(dir.path(), &config, 1);
    wait_for(&nats, &n, 200, &mut child, dir.path(), 1);
    // Two more ack_wait periods: a message that was not termed would come back in that time.
    std::thread::sleep(Duration::from_millis(2_500));
    stop(&mut child, dir.path(), 1);

    let dead = nats.read(&n.stream("dlq"));
    let ids: Vec<u64> = dead.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, vec![50, 60], "each dead-lettered once");
    let d = &dead[1];
    assert_eq!(d.headers["lockgate-dlq-attempts"], "3");
    assert_eq!(d.headers["lockgate-dlq-gave-up"], "attempts_exhausted");
    assert_eq!(dead[0].headers["lockgate-dlq-error-kind"], "reject");
    assert_eq!(nats.count(&n.stream("out")), 198);
    let terms = nats.block_on(async {
        let mut n = 0;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(500), terminated.next()).await
        {
            n += 1;
        }
        n
    });
    assert_eq!(terms, 2, "both dead letters were termed");
    assert_eq!(
        run_stat(dir.path(), 1, "received"),
        200,
        "redelivered while retrying"
    );
    let (unacked, redelivered, pending) = nats.consumer_state(&n.stream("in"), &n.durable);
    assert_eq!(
        (unacked, redelivered, pending),
        (0, 0, 0),
        "the retries (1.4 s) outlived ack_wait (1 s) only thanks to in_progress"
    );
}

#[test]
fn a_handler_running_three_ack_waits_is_not_redelivered() {
    let nats = Nats::connect();
    let n = Names::new("js-long");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), 3, 3, |i| {
        if i == 1 { r#","busy_ms":3000"# } else { "" }
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        ", ack_wait_ms = 1000",
        "concurrency = 3\nordering = \"key\"\n",
    );
    let mut child = start(dir.path(), &config, 1);
    wait_for(&nats, &n, 3, &mut child, dir.path(), 1);
    std::thread::sleep(Duration::from_millis(1_500));
    stop(&mut child, dir.path(), 1);

    let out = nats.read(&n.stream("out"));
    let ids: BTreeSet<u64> = out.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(ids, BTreeSet::from([0, 1, 2]));
    // The output stream would drop a repeated output (same Nats-Msg-Id): count deliveries.
    assert_eq!(
        run_stat(dir.path(), 1, "received"),
        3,
        "redelivered while running"
    );
    assert_eq!(run_stat(dir.path(), 1, "succeeded"), 3);
    let (unacked, redelivered, _) = nats.consumer_state(&n.stream("in"), &n.durable);
    assert_eq!(
        (unacked, redelivered),
        (0, 0),
        "{}",
        run_logs(dir.path(), 1)
    );
}

/// A nats-server of the test's own (port, store), so it can be restarted without disturbing
/// the shared one.
struct OwnServer {
    port: u16,
    store: PathBuf,
    extra: Vec<String>,
    proc: Option<Proc>,
}

impl OwnServer {
    fn start(store: &Path) -> Self {
        Self::start_with(store, &[])
    }

    /// With extra nats-server arguments (e.g. `--auth TOKEN`).
    fn start_with(store: &Path, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            port,
            store: store.to_owned(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            proc: None,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Proc)
            .expect("nats-server (scripts/brokers.sh installs it)");
        self.proc = Some(child);
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &p.id().to_string()])
                .status();
            p.wait().unwrap();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn a_server_restart_mid_stream_loses_nothing() {
    const N: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let mut server = OwnServer::start(&dir.path().join("nats"));
    let n = Names::new("js-restart");
    {
        let nats = Nats::connect_to(&server.url());
        n.create(&nats);
        nats.publish(&orders(&n.subject("in"), N, 13, |_| ""));
    }
    let config = write_config(
        dir.path(),
        &n,
        &server.url(),
        ", ack_wait_ms = 2000",
        "concurrency = 2\nordering = \"key\"\nrate_limit = { per_second = 1000 }\nidempotency = { key = \"json:/id\" }\n",
    );
    let mut child = start(dir.path(), &config, 1);
    {
        let nats = Nats::connect_to(&server.url());
        wait_for(&nats, &n, 1_000, &mut child, dir.path(), 1);
    }
    server.stop();
    // The runtime must ride out the outage.
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "{}",
        run_logs(dir.path(), 1)
    );
    server.launch();
    let nats = Nats::connect_to(&server.url());
    wait_for(&nats, &n, N, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);

    let out = nats.read(&n.stream("out"));
    let seen = counts(&out);
    assert_same(
        "outputs",
        &seen.keys().copied().collect(),
        &(0..N).collect(),
    );
    let dup: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dup.is_empty(), "duplicated outputs: {dup:?}");
    let logs = run_logs(dir.path(), 1);
    assert!(logs.contains("NATS disconnected"), "{logs}");
}

/// Starts a core NATS route (no `stream`) with its out and dlq streams; returns once its
/// subscription is live.
fn start_core(nats: &Nats, n: &Names, dir: &Path) -> Proc {
    for what in ["out", "dlq"] {
        nats.create_stream(&n.stream(what), &[&n.subject(what)]);
    }
    let config = write_config(dir, n, &url(), "", "");
    lockgate_tests::edit_config(&config, &format!(", stream = \"{}\"", n.stream("in")), "");
    let mut child = start(dir, &config, 1);
    let started = std::time::Instant::now();
    while !run_logs(dir, 1).contains("Subscribed") {
        assert!(child.try_wait().unwrap().is_none(), "{}", run_logs(dir, 1));
        assert!(started.elapsed() < DEADLINE, "{}", run_logs(dir, 1));
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn a_core_nats_route_handles_what_arrives_and_warns_it_is_at_most_once() {
    let nats = Nats::connect();
    let n = Names::new("core");
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_core(&nats, &n, dir.path());
    nats.block_on(async {
        for i in 0..100 {
            let payload = if i == 7 || i == 57 {
                format!(r#"{{"id":{i},"poison":true}}"#)
            } else {
                format!(r#"{{"id":{i}}}"#)
            };
            nats.client
                .publish(n.subject("in"), payload.into())
                .await
                .unwrap();
        }
        nats.client.flush().await.unwrap();
    });
    wait_for(&nats, &n, 100, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);

    let out = nats.read(&n.stream("out"));
    let ids: BTreeSet<u64> = out.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, (0..100).filter(|i| *i != 7 && *i != 57).collect());
    let dead = nats.read(&n.stream("dlq"));
    assert_eq!(dead.len(), 2);
    assert_eq!(id_of(&dead[0].payload), 7);
    // Published without an id: each is told apart by its delivery's number.
    let delivery = |g: &lockgate_tests::nats::Got| {
        let id = &g.headers["lockgate-dlq-message-id"];
        let n = id.strip_prefix(&format!("{}/delivery-", n.subject("in")));
        n.and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{id}"))
    };
    assert_ne!(delivery(&dead[0]), delivery(&dead[1]));
    let logs = run_logs(dir.path(), 1);
    assert!(logs.contains("delivery is at most once"), "{logs}");
}

#[test]
fn broker_mode_redelivers_after_the_backoff_and_counts_attempts_from_deliveries() {
    let nats = Nats::connect();
    let n = Names::new("js-nak");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), 3, 3, |i| match i {
        0 => r#","fail":3"#,
        1 => r#","fail":9"#,
        _ => "",
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        ", ack_wait_ms = 10000, max_deliver = 10",
        "concurrency = 3\nordering = \"key\"\nretry = { mode = \"broker\", max_attempts = 4, initial_backoff_ms = 300, max_backoff_ms = 5000, multiplier = 2.0, jitter = \"none\" }\n",
    );
    let mut child = start_run(dir.path(), &config, 1, None, "lockgate=debug,warn");
    wait_for(&nats, &n, 3, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);

    let out = nats.read(&n.stream("out"));
    let ids: BTreeSet<u64> = out.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, BTreeSet::from([0, 2]));
    let dead = nats.read(&n.stream("dlq"));
    assert_eq!(dead.len(), 1);
    assert_eq!(id_of(&dead[0].payload), 1);
    assert_eq!(dead[0].headers["lockgate-dlq-attempts"], "4");
    // Every attempt was its own delivery: 4 + 4 + 1.
    assert_eq!(run_stat(dir.path(), 1, "received"), 9);
    assert_eq!(run_stat(dir.path(), 1, "retried"), 6);

    // The failed attempts of message 0 (stream sequence 1), as logged: attempt numbers come
    // from the delivery count, and the gaps follow the backoff (300 ms, then 600 ms).
    let logs = run_logs(dir.path(), 1);
    let failures = lockgate_tests::redeliveries(&logs, |l| l.contains("/-/1 "));
    let attempts: Vec<u32> = failures.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, vec![1, 2, 3], "{logs}");
    lockgate_tests::assert_gaps(&failures, &[0.3, 0.6], 0.9, &logs);
}

#[test]
fn requests_get_the_handlers_answer_or_an_error_answer() {
    let nats = Nats::connect();
    let n = Names::new("req");
    let dir = tempfile::tempdir().unwrap();
    let mut child = start_core(&nats, &n, dir.path());
    let path = dir.path().to_owned();
    let (ok, failed) = nats.block_on(async {
        let ask = |payload: &'static str| {
            let path = path.clone();
            let client = nats.client.clone();
            let subject = n.subject("in");
            async move {
                tokio::time::timeout(
                    Duration::from_secs(20),
                    client.request(subject, payload.into()),
                )
                .await
                .expect("no answer before the timeout")
                .unwrap_or_else(|e| panic!("{e}\n{}", run_logs(&path, 1)))
            }
        };
        (
            ask(r#"{"id":1}"#).await,
            ask(r#"{"id":2,"poison":true}"#).await,
        )
    });
    stop(&mut child, dir.path(), 1);

    assert_eq!(&ok.payload[..], br#"{"ok":1}"#);
    assert!(
        ok.headers
            .as_ref()
            .and_then(|h| h.get("lockgate-error"))
            .is_none()
    );
    let h = failed.headers.as_ref().expect("error answer has headers");
    assert_eq!(h.get("lockgate-error").unwrap().as_str(), "reject");
    assert!(
        h.get("lockgate-error-reason")
            .unwrap()
            .as_str()
            .contains("order 2 is poison")
    );
    assert!(failed.payload.is_empty());
    // The answer does not replace the usual effects: an output and a dead letter.
    assert_eq!(nats.count(&n.stream("out")), 1);
    assert_eq!(nats.count(&n.stream("dlq")), 1);
}

#[test]
fn a_token_protected_server_is_used_with_its_token_and_a_wrong_one_shows_failing() {
    const TOKEN: &str = "s3cret-token";
    let dir = tempfile::tempdir().unwrap();
    let server = OwnServer::start_with(&dir.path().join("nats"), &["--auth", TOKEN]);
    let url = server.url();
    let nats = Nats::connect_with_token(&url, TOKEN);
    let n = Names::new("js-token");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), 50, 5, |_| ""));
    let config = write_config(dir.path(), &n, &url, "", "");
    // The secret comes from the environment, never from the file.
    lockgate_tests::edit_config(
        &config,
        "kind = \"nats\"\n",
        "kind = \"nats\"\ntoken = { env = \"TEST_NATS_TOKEN\" }\n",
    );
    let run = |run: u32, token: Option<&str>| {
        let env: Vec<(&str, &str)> = token.map(|t| ("TEST_NATS_TOKEN", t)).into_iter().collect();
        start_run_with_env(dir.path(), &config, run, None, "lockgate=info,warn", &env)
    };
    let mut child = run(1, Some(TOKEN));
    wait_for(&nats, &n, 50, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);
    assert_eq!(nats.count(&n.stream("out")), 50);

    // A wrong token is not retried in silence: the route shows failing with the reason (and
    // keeps trying, slowly, until the server's accounts or the token change).
    lockgate_tests::edit_config(
        &config,
        "[runtime]\n",
        "[runtime]\nadmin = \"127.0.0.1:0\"\n",
    );
    let mut child = run(2, Some("wrong"));
    let addr = admin::admin_addr(&mut child, dir.path(), 2);
    let (code, ready) = admin::wait_readyz(&mut child, dir.path(), 2, &addr, DEADLINE, |_, j| {
        j["routes"][0]["state"] == "failing"
    });
    assert_eq!(code, 503, "{ready}");
    let route = &ready["routes"][0];
    assert!(
        route["reason"]
            .as_str()
            .unwrap()
            .contains("the server refused the credentials"),
        "{ready}"
    );
    assert!(route["fix"].as_str().unwrap().contains("token"), "{ready}");
    stop(&mut child, dir.path(), 2);
    // No token at all is a config problem: the start fails.
    let status = run(3, None).wait().unwrap();
    let logs = run_logs(dir.path(), 3);
    assert_eq!(status.code(), Some(2), "{logs}");
    assert!(
        logs.contains("brokers.nats.token: environment variable TEST_NATS_TOKEN is not set"),
        "{logs}"
    );
}

#[test]
fn jetstream_pending_is_exported_as_consumer_lag() {
    let nats = Nats::connect();
    let n = Names::new("js-lag");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), 300, 7, |_| ""));
    let dir = tempfile::tempdir().unwrap();
    // max_ack_pending keeps most messages undelivered (pending) while the rate limit drains.
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        ", max_ack_pending = 20",
        "rate_limit = { per_second = 100, burst = 10 }\n",
    );
    lockgate_tests::edit_config(
        &config,
        "[runtime]\n",
        "[runtime]\nadmin = \"127.0.0.1:0\"\n",
    );
    let mut child = start(dir.path(), &config, 1);
    let addr = admin::admin_addr(&mut child, dir.path(), 1);
    let lag = || {
        let page = admin::get(&addr, "/metrics").1;
        page.contains("lockgate_consumer_lag_messages{")
            .then(|| admin::sum(&page, "lockgate_consumer_lag_messages", "orders"))
    };
    let started = std::time::Instant::now();
    let first = loop {
        if let Some(l) = lag() {
            break l;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            run_logs(dir.path(), 1)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(first > 0.0 && first <= 300.0, "pending {first}");
    wait_for(&nats, &n, 300, &mut child, dir.path(), 1);
    // The next refresh (every 5 s) sees nothing pending.
    let started = std::time::Instant::now();
    while lag() != Some(0.0) {
        assert!(started.elapsed() < Duration::from_secs(30), "{:?}", lag());
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(&mut child, dir.path(), 1);
}

use lockgate_tests::dlq_cmd;

/// The route deduplicates by a payload key: a dead-lettered order's key must not make its
/// replay a duplicate, and a true duplicate must still be skipped.
#[test]
fn jetstream_dead_letters_are_replayed_once_after_the_handler_is_fixed() {
    let nats = Nats::connect();
    let n = Names::new("js-replay");
    n.create(&nats);
    nats.publish(&orders(&n.subject("in"), 30, 7, |i| {
        if i >= 20 { r#","poison":true"# } else { "" }
    }));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &n,
        &url(),
        "",
        "idempotency = { key = \"json:/id\" }",
    );
    let mut child = start(dir.path(), &config, 1);
    wait_for(&nats, &n, 30, &mut child, dir.path(), 1);
    stop(&mut child, dir.path(), 1);

    let listed = dlq_cmd(dir.path(), &["list", "--json", "--error-kind", "reject"]);
    let rows: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 10, "{listed}");
    assert!(rows.iter().all(|r| r["status"] == "pending"));
    let shown = dlq_cmd(dir.path(), &["show", rows[3]["position"].as_str().unwrap()]);
    assert!(shown.contains("is poison"), "{shown}");
    assert!(shown.contains("key            k"), "{shown}");

    // Deploy the fixed version, replay, replay again.
    lockgate_tests::edit_config(
        &config,
        &format!(r#"config = {{ target = "{}" }}"#, n.subject("out")),
        &format!(
            r#"config = {{ target = "{}", poison_ok = "true" }}"#,
            n.subject("out")
        ),
    );
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("poison_ok")
    );
    let mut child = start(dir.path(), &config, 2);
    let said = dlq_cmd(dir.path(), &["replay", "--batch", "3"]);
    assert!(said.contains("replayed 10 dead letters"), "{said}");
    assert!(
        said.contains("results: 10 handled, 0 skipped (already handled), 0 dead-lettered again"),
        "{said}"
    );
    let said = dlq_cmd(dir.path(), &["replay"]);
    assert!(said.contains("nothing to replay"), "{said}");
    wait_for_progress(
        &mut child,
        dir.path(),
        2,
        30,
        DEADLINE,
        Duration::from_millis(100),
        || nats.count(&n.stream("out")),
    );
    // True duplicates of an order handled at first and of one handled on replay: skipped.
    nats.publish(&[
        (n.subject("in"), Some("k3".into()), r#"{"id":3}"#.into()),
        (
            n.subject("in"),
            Some("k4".into()),
            r#"{"id":25,"poison":true}"#.into(),
        ),
    ]);
    wait_for_progress(
        &mut child,
        dir.path(),
        2,
        1,
        DEADLINE,
        Duration::from_millis(50),
        || {
            let (unacked, _, undelivered) = nats.consumer_state(&n.stream("in"), &n.durable);
            u64::from(unacked == 0 && undelivered == 0)
        },
    );
    stop(&mut child, dir.path(), 2);
    assert_eq!(lockgate_tests::run_stat(dir.path(), 2, "duplicates"), 2);
    let seen = counts(&nats.read(&n.stream("out")));
    assert_same(
        "outputs",
        &seen.keys().copied().collect(),
        &(0..30).collect(),
    );
    assert!(seen.values().all(|c| *c == 1), "{seen:?}");
    assert_eq!(
        nats.count(&n.stream("in")),
        42,
        "ten copies and two duplicates on the source"
    );
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
