//! Readiness against the real brokers and stores (`scripts/brokers.sh start all`): a route whose
//! source or state store cannot work shows `failing` with the reason on `/readyz` (503) and in
//! `lockgate status`; a misconfiguration is logged once at ERROR with what to change however
//! often it is retried, a transient failure at WARN; fixing the broker (a user created, a
//! classic queue deleted, a stream or topic created, a role granted) brings the route up
//! without a restart; `lockgate check --connect` reports each problem with exit code 1 and a
//! good config with 0. The shared servers are never stopped: a wrong port is a closed one, a
//! wrong password a user that does not exist yet.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use lockgate_tests::admin::{admin_addr, wait_readyz};
use lockgate_tests::kafka::{Tail, bootstrap, create_topics, produce, runtime, unique};
use lockgate_tests::nats::Nats;
use lockgate_tests::rabbit::Rabbit;
use lockgate_tests::{Proc, guest, lockgate, run_logs, show, start_run, stop_run};

/// Bound for anything to show (a slow retry of a misconfiguration comes every 8-12 s).
const DEADLINE: Duration = Duration::from_secs(90);

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `dir/runtime.toml`: an admin endpoint, the `brokers` (and stores) tables, and route
/// `orders` (the `uppercase` guest publishing to `out`) with the `route` lines.
fn write_config(dir: &Path, tables: &str, out: &str, route: &str) -> PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"
shutdown_grace_ms = 2000
admin = "127.0.0.1:0"

{tables}

[handlers.up]
module = "{module}"
config = {{ target = "{out}" }}

[routes.orders]
handler = "up"
{route}
"#,
            module = guest("uppercase").display(),
        ),
    )
    .unwrap();
    config
}

/// `lockgate run` of `dir/runtime.toml` logging at the usual level (lapin's lines included,
/// were they not quieted); its admin address.
fn start(dir: &Path) -> (Proc, String) {
    let mut child = start_run(
        dir,
        &dir.join("runtime.toml"),
        1,
        None,
        "lockgate=info,warn",
    );
    let addr = admin_addr(&mut child, dir, 1);
    (child, addr)
}

/// Waits until route `orders` fails with a reason containing `reason` after at least
/// `attempts` attempts; its `/readyz` entry.
fn wait_failing(
    child: &mut Proc,
    dir: &Path,
    addr: &str,
    reason: &str,
    attempts: u64,
) -> serde_json::Value {
    let (code, json) = wait_readyz(child, dir, 1, addr, DEADLINE, |_, j| {
        let r = &j["routes"][0];
        r["state"] == "failing"
            && r["reason"].as_str().is_some_and(|s| s.contains(reason))
            && r["attempts"].as_u64() >= Some(attempts)
    });
    assert_eq!(code, 503, "{json}");
    assert_eq!(json["ready"], false, "{json}");
    assert_eq!(json["routes"][0]["route"], "orders", "{json}");
    json["routes"][0].clone()
}

/// Waits until `/readyz` answers 200.
fn wait_ready(child: &mut Proc, dir: &Path, addr: &str) {
    let (_, json) = wait_readyz(child, dir, 1, addr, DEADLINE, |code, _| code == 200);
    assert_eq!(json["routes"][0]["state"], "running", "{json}");
}

/// `lockgate status` shows route `orders` as `state`, with `reason` and, if given, the fix
/// under the table.
fn assert_status(dir: &Path, addr: &str, state: &str, reason: &str, fix: Option<&str>) {
    let out = lockgate(dir, &["status", "--admin", addr, "--interval-ms", "100"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..2], ["orders", state], "{text}");
    let why = format!("route orders {state}: ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&why))
        .unwrap_or_else(|| panic!("no reason line in\n{text}"));
    assert!(line.contains(reason), "{text}");
    match fix {
        Some(f) => assert!(
            text.lines()
                .any(|l| l.starts_with("  fix: ") && l.contains(f)),
            "{text}"
        ),
        None => assert!(!text.contains("  fix: "), "{text}"),
    }
}

/// Lines of run 1's log at `level` (`ERROR`, `WARN`) containing `needle`.
fn log_lines(dir: &Path, level: &str, needle: &str) -> usize {
    std::fs::read_to_string(dir.join("run1.stderr"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!(" {level} ")) && l.contains(needle))
        .count()
}

/// `lockgate check --connect` of `dir/runtime.toml`.
fn check_connect(dir: &Path) -> Output {
    lockgate(dir, &["check", "--connect", "runtime.toml"])
}

/// Asserts `lockgate check --connect` found problems (exit 1) and printed `line` among them.
fn assert_check_fails(dir: &Path, line: &str) {
    let out = check_connect(dir);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("runtime.toml: ") && l.contains(line)),
        "no `{line}` in\n{}",
        show(&out)
    );
}

/// Asserts `lockgate check --connect` is happy (exit 0); its stdout.
fn assert_check_passes(dir: &Path) -> String {
    let out = check_connect(dir);
    assert!(out.status.success(), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `rabbitmqctl -n rabbit@localhost ARGS`; fails the test if it fails.
fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-n", "rabbit@localhost"])
        .args(args)
        .output()
        .expect("rabbitmqctl (scripts/brokers.sh installs it)");
    assert!(out.status.success(), "{}", show(&out));
}

/// Deletes a RabbitMQ user the test created, whatever happens to the test.
struct RabbitUser(String);

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-n", "rabbit@localhost", "delete_user", &self.0])
            .output();
    }
}

fn rabbit_broker(dir: &Path, url: &str) -> String {
    // In a file, as a password should be.
    std::fs::write(dir.join("amqp-url"), url).unwrap();
    "[brokers.rabbit]\nkind = \"rabbitmq\"\nurl = { file = \"amqp-url\" }\n".to_owned()
}

#[test]
fn a_wrong_rabbitmq_password_fails_the_route_until_the_user_exists() {
    let dir = tempfile::tempdir().unwrap();
    let user = RabbitUser(unique("lg-ready"));
    let q = unique("ready-login");
    let tables = rabbit_broker(
        dir.path(),
        &format!("amqp://{}:s3cret@127.0.0.1:5672/%2f", user.0),
    );
    write_config(
        dir.path(),
        &tables,
        &format!("{q}.out"),
        &format!(
            "source = {{ broker = \"rabbit\", topic = \"{q}.in\" }}\noutputs = [\"{q}.out\"]\n"
        ),
    );
    assert_check_fails(
        dir.path(),
        "brokers.rabbit: rabbitmq rabbit: connect: ACCESS_REFUSED - Login was refused",
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(&mut child, dir.path(), &addr, "Login was refused", 2);
    assert!(
        route["fix"]
            .as_str()
            .unwrap()
            .contains("check the user name and password in the URL of brokers.rabbit"),
        "{route}"
    );
    assert_status(
        dir.path(),
        &addr,
        "failing",
        "source: rabbitmq rabbit: connect: ACCESS_REFUSED",
        Some("user name and password"),
    );
    // Two attempts or more, one line, with the fix; nothing from lapin.
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 1, "{logs}");
    assert_eq!(
        log_lines(
            dir.path(),
            "ERROR",
            "fix=\"check the user name and password"
        ),
        1,
        "{logs}"
    );
    assert!(!logs.contains("lapin"), "{logs}");

    // The operator creates the user the URL names: the route comes up by itself.
    rabbitmqctl(&["add_user", &user.0, "s3cret"]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    wait_ready(&mut child, dir.path(), &addr);
    assert!(run_logs(dir.path(), 1).contains("Ready again"));
    assert!(assert_check_passes(dir.path()).contains("ok ("));
    stop_run(&mut child, dir.path(), 1);
    let rabbit = Rabbit::connect();
    rabbit.delete(&format!("{q}.in"));
}

#[test]
fn a_closed_rabbitmq_port_is_transient_warned_and_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let q = unique("ready-port");
    let tables = rabbit_broker(
        dir.path(),
        &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
    );
    write_config(
        dir.path(),
        &tables,
        &format!("{q}.out"),
        &format!(
            "source = {{ broker = \"rabbit\", topic = \"{q}.in\" }}\noutputs = [\"{q}.out\"]\n"
        ),
    );
    assert_check_fails(
        dir.path(),
        "brokers.rabbit: rabbitmq rabbit: connect: IO error: Connection refused",
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(&mut child, dir.path(), &addr, "Connection refused", 3);
    assert!(route["fix"].is_null(), "{route}");
    assert_status(dir.path(), &addr, "failing", "Connection refused", None);
    // Transient: a warning when it starts, no error, whatever the attempts.
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 0, "{logs}");
    assert_eq!(
        log_lines(dir.path(), "WARN", "Unavailable; retrying"),
        1,
        "{logs}"
    );
    stop_run(&mut child, dir.path(), 1);
}

#[test]
fn a_classic_queue_where_the_route_declares_quorum_fails_until_it_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let rabbit = Rabbit::connect();
    let q = unique("ready-classic");
    let (input, out) = (format!("{q}.in"), format!("{q}.out"));
    rabbit.declare_classic(&input);
    rabbit.declare(&out);
    let tables = rabbit_broker(dir.path(), &lockgate_tests::rabbit::url());
    write_config(
        dir.path(),
        &tables,
        &out,
        &format!(
            "source = {{ broker = \"rabbit\", topic = \"{input}\" }}\noutputs = [\"{out}\"]\n"
        ),
    );
    assert_check_fails(
        dir.path(),
        &format!(
            "routes.orders.source: rabbitmq rabbit: declare queue {input}: PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"
        ),
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(
        &mut child,
        dir.path(),
        &addr,
        "inequivalent arg 'x-queue-type'",
        2,
    );
    assert!(
        route["fix"].as_str().unwrap().contains("source.queue_type"),
        "{route}"
    );
    assert_status(
        dir.path(),
        &addr,
        "failing",
        "PRECONDITION_FAILED",
        Some("delete the queue"),
    );
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 1, "{logs}");
    assert_eq!(log_lines(dir.path(), "ERROR", "x-queue-type"), 1, "{logs}");
    assert!(!logs.contains("lapin"), "{logs}");

    // The operator deletes the classic queue: the route declares its quorum queue and consumes.
    rabbit.delete(&input);
    wait_ready(&mut child, dir.path(), &addr);
    rabbit.publish(&input, &[(Some("k".into()), "hello".into())]);
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(started.elapsed() < DEADLINE, "{}", run_logs(dir.path(), 1));
        std::thread::sleep(Duration::from_millis(50));
        got = rabbit.drain(&out);
    }
    assert_eq!(got[0].payload, "HELLO");
    assert_check_passes(dir.path());
    stop_run(&mut child, dir.path(), 1);
    rabbit.delete(&input);
    rabbit.delete(&out);
}

#[test]
fn a_healthy_rabbitmq_start_is_ready_and_logs_nothing_from_lapin() {
    let dir = tempfile::tempdir().unwrap();
    let rabbit = Rabbit::connect();
    let q = unique("ready-healthy");
    let (input, out) = (format!("{q}.in"), format!("{q}.out"));
    let tables = rabbit_broker(dir.path(), &lockgate_tests::rabbit::url());
    write_config(
        dir.path(),
        &tables,
        &out,
        &format!(
            "source = {{ broker = \"rabbit\", topic = \"{input}\" }}\noutputs = [\"{out}\"]\n"
        ),
    );
    // Neither queue exists: check says what `run` will declare, and is happy.
    let notes = assert_check_passes(dir.path());
    assert!(
        notes.contains(&format!(
            "runtime.toml: routes.orders.source: queue {input} does not exist yet: `lockgate run` declares it (durable, quorum)"
        )),
        "{notes}"
    );

    let (mut child, addr) = start(dir.path());
    wait_ready(&mut child, dir.path(), &addr);
    // The output queue does not exist either: the sink asks (a passive declare the server
    // answers NOT_FOUND, which lapin logs at ERROR) and declares it.
    rabbit.publish(&input, &[(Some("k".into()), "hi".into())]);
    // (Asking the test's channel about a queue that does not exist yet would close it.)
    lockgate_tests::wait_for_progress(
        &mut child,
        dir.path(),
        1,
        1,
        DEADLINE,
        Duration::from_millis(50),
        || {
            let page = lockgate_tests::admin::get(&addr, "/metrics").1;
            lockgate_tests::admin::value(&page, "lockgate_outputs_published_total", "orders")
                .unwrap_or(0.0) as u64
        },
    );
    assert_eq!(rabbit.ready(&out), 1);
    stop_run(&mut child, dir.path(), 1);
    let logs = run_logs(dir.path(), 1);
    assert!(logs.contains("Ready"), "{logs}");
    assert!(!logs.contains("lapin"), "{logs}");
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 0, "{logs}");
    assert_eq!(log_lines(dir.path(), "WARN", ""), 0, "{logs}");
    rabbit.delete(&input);
    rabbit.delete(&out);
}

fn nats_broker(server: &str) -> String {
    format!("[brokers.nats]\nkind = \"nats\"\nservers = [\"{server}\"]\n")
}

#[test]
fn a_missing_jetstream_stream_fails_the_route_until_it_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::connect();
    let base = unique("ready-js");
    let (stream, subject, out) = (
        format!("{base}-in"),
        format!("{base}.in"),
        format!("{base}.out"),
    );
    nats.create_stream(&format!("{base}-out"), &[&out]);
    write_config(
        dir.path(),
        &nats_broker(&lockgate_tests::nats::url()),
        &out,
        &format!(
            "source = {{ broker = \"nats\", stream = \"{stream}\", topic = \"{subject}\", group = \"{base}-w\" }}\noutputs = [\"{out}\"]\n"
        ),
    );
    assert_check_fails(
        dir.path(),
        &format!(
            "routes.orders.source.stream: nats: JetStream stream {stream} does not exist; fix: create the stream"
        ),
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(&mut child, dir.path(), &addr, "does not exist", 2);
    assert!(
        route["fix"]
            .as_str()
            .unwrap()
            .contains("lockgate does not create streams"),
        "{route}"
    );
    assert_status(
        dir.path(),
        &addr,
        "failing",
        &format!("JetStream stream {stream} does not exist"),
        Some("create the stream"),
    );
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 1, "{logs}");

    nats.create_stream(&stream, &[&subject]);
    wait_ready(&mut child, dir.path(), &addr);
    nats.publish(&[(subject.clone(), Some("k".into()), "hi".into())]);
    let started = std::time::Instant::now();
    while nats.count(&format!("{base}-out")) == 0 {
        assert!(started.elapsed() < DEADLINE, "{}", run_logs(dir.path(), 1));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_check_passes(dir.path());
    stop_run(&mut child, dir.path(), 1);
}

#[test]
fn a_closed_nats_port_is_transient_and_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let base = unique("ready-nats-port");
    write_config(
        dir.path(),
        &nats_broker(&format!("nats://127.0.0.1:{port}")),
        &format!("{base}.out"),
        &format!(
            "source = {{ broker = \"nats\", stream = \"{base}\", topic = \"{base}.in\", group = \"w\" }}\noutputs = [\"{base}.out\"]\n"
        ),
    );
    assert_check_fails(
        dir.path(),
        "brokers.nats: nats nats: cannot connect: IO error: Connection refused",
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(&mut child, dir.path(), &addr, "Connection refused", 2);
    assert!(route["fix"].is_null(), "{route}");
    assert_status(dir.path(), &addr, "failing", "cannot connect", None);
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 0, "{logs}");
    assert!(
        log_lines(dir.path(), "WARN", "Unavailable; retrying") >= 1,
        "{logs}"
    );
    stop_run(&mut child, dir.path(), 1);
}

fn kafka_broker(bootstrap: &str) -> String {
    format!(
        "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\nconsumer_properties = {{ \"session.timeout.ms\" = \"6000\" }}\n"
    )
}

#[test]
fn an_unknown_kafka_topic_fails_the_route_until_it_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (topic, out) = (unique("ready-kafka-in"), unique("ready-kafka-out"));
    create_topics(&rt, &[(&out, 1)]);
    write_config(
        dir.path(),
        &kafka_broker(&bootstrap()),
        &out,
        &format!(
            "source = {{ broker = \"kafka\", topic = \"{topic}\", group = \"{topic}-g\" }}\noutputs = [\"{out}\"]\n"
        ),
    );
    // tansu answers UNKNOWN_TOPIC_OR_PART for a topic it does not have (it creates topics on
    // produce only, never on a consumer's metadata request).
    assert_check_fails(
        dir.path(),
        &format!(
            "routes.orders.source.topic: kafka {}: topic {topic} does not exist; fix: create the topic",
            bootstrap()
        ),
    );

    let (mut child, addr) = start(dir.path());
    wait_failing(&mut child, dir.path(), &addr, "does not exist", 2);
    assert_status(
        dir.path(),
        &addr,
        "failing",
        &format!("topic {topic} does not exist"),
        Some("lockgate does not create topics"),
    );
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 1, "{logs}");
    assert!(!logs.contains("librdkafka"), "{logs}");

    // Created: the source's next topic check makes librdkafka see it (on its own it would look
    // again only after topic.metadata.refresh.interval.ms, 5 minutes), and the group assigns it.
    create_topics(&rt, &[(&topic, 2)]);
    wait_ready(&mut child, dir.path(), &addr);
    produce(&rt, &topic, &[("k".into(), "hi".into())]);
    let mut tail = Tail::new(&[(&out, 1)]);
    let started = std::time::Instant::now();
    while tail.records(&out).is_empty() {
        assert!(started.elapsed() < DEADLINE, "{}", run_logs(dir.path(), 1));
        tail.drain(Duration::from_millis(200));
    }
    assert_eq!(tail.records(&out)[0].payload, "HI");
    assert_check_passes(dir.path());
    stop_run(&mut child, dir.path(), 1);
}

#[test]
fn a_closed_kafka_port_is_transient_and_reported_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let topic = unique("ready-kafka-port");
    write_config(
        dir.path(),
        &kafka_broker(&format!("127.0.0.1:{port}")),
        "out",
        &format!("source = {{ broker = \"kafka\", topic = \"{topic}\" }}\noutputs = [\"out\"]\n"),
    );
    assert_check_fails(
        dir.path(),
        &format!("brokers.kafka: kafka 127.0.0.1:{port}: metadata: "),
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(&mut child, dir.path(), &addr, "BrokerTransportFailure", 2);
    assert!(route["fix"].is_null(), "{route}");
    assert_status(dir.path(), &addr, "failing", "BrokerTransportFailure", None);
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 0, "{logs}");
    assert!(!logs.contains("librdkafka"), "{logs}");
    stop_run(&mut child, dir.path(), 1);
}

#[test]
fn kafka_credentials_the_broker_refuses_fail_the_route_once_at_error() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("ready-kafka-sasl");
    // tansu speaks no SASL: a client configured for it fails to authenticate, as with a wrong
    // password on a broker that does. The password is a secret in a file, as it should be.
    std::fs::write(dir.path().join("kafka-password"), "wrong\n").unwrap();
    let broker = format!(
        "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\nproperties = {{ \"security.protocol\" = \"SASL_PLAINTEXT\", \"sasl.mechanisms\" = \"PLAIN\", \"sasl.username\" = \"lockgate\", \"sasl.password\" = {{ file = \"kafka-password\" }} }}\n",
        bootstrap()
    );
    write_config(
        dir.path(),
        &broker,
        "out",
        &format!("source = {{ broker = \"kafka\", topic = \"{topic}\" }}\noutputs = [\"out\"]\n"),
    );
    assert_check_fails(
        dir.path(),
        "Authentication (Local: Authentication failure); fix: check security.protocol, sasl.mechanisms, sasl.username and sasl.password",
    );

    let (mut child, addr) = start(dir.path());
    wait_failing(&mut child, dir.path(), &addr, "Authentication failure", 2);
    assert_status(
        dir.path(),
        &addr,
        "failing",
        "Authentication failure",
        Some("sasl.password"),
    );
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 1, "{logs}");
    assert!(!logs.contains("librdkafka"), "{logs}");
    stop_run(&mut child, dir.path(), 1);
}

/// A route on the embedded broker that keeps its idempotency keys in store `store` (given by
/// `table`).
fn store_route(dir: &Path, table: &str) {
    write_config(
        dir,
        table,
        "out",
        "source = { broker = \"local\", topic = \"in\" }\noutputs = [\"out\"]\nstate = \"shared\"\nidempotency = { key = \"key\" }\n",
    );
}

#[test]
fn an_unreachable_redis_store_fails_the_routes_that_need_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    // `locked` is the real server with a password it does not know: only check tries it.
    store_route(
        dir.path(),
        &format!(
            "[stores.shared]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\n\n[stores.locked]\nkind = \"redis\"\nurl = \"redis://:wrong@127.0.0.1:6379\"\n"
        ),
    );
    assert_check_fails(
        dir.path(),
        &format!("stores.shared: redis at 127.0.0.1:{port}: connect: "),
    );
    assert_check_fails(
        dir.path(),
        "stores.locked: redis at 127.0.0.1:6379: connect: Password authentication failed",
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(
        &mut child,
        dir.path(),
        &addr,
        "state store shared: redis at",
        2,
    );
    assert!(
        route["reason"].as_str().unwrap().contains("refused"),
        "{route}"
    );
    assert_status(dir.path(), &addr, "failing", "state store shared", None);
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 0, "{logs}");
    stop_run(&mut child, dir.path(), 1);
}

/// Drops a PostgreSQL role the test created, whatever happens to the test.
struct PgRole(String);

impl Drop for PgRole {
    fn drop(&mut self) {
        let pg = lockgate_tests::pg::SyncPg::connect();
        let r = &self.0;
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pg.exec(&format!(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{r}') THEN \
                 REVOKE CREATE ON DATABASE postgres FROM {r}; DROP ROLE {r}; END IF; END $$"
            ));
        }));
    }
}

#[test]
fn a_postgres_store_whose_role_cannot_work_fails_its_route_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let role = PgRole(lockgate_tests::pg::unique_schema("lg_ready"));
    let r = role.0.clone();
    let port = closed_port();
    store_route(
        dir.path(),
        &format!(
            "[stores.shared]\nkind = \"postgres\"\nurl = \"postgres://{r}:pw@127.0.0.1:5432/postgres\"\nschema = \"{r}\"\n"
        ),
    );
    // A second store nobody uses, at a closed port: `check --connect` tries it too.
    let config = dir.path().join("runtime.toml");
    let gone = format!(
        "[stores.gone]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{port}/postgres\"\n\n"
    );
    lockgate_tests::edit_config(&config, "[handlers.up]", &format!("{gone}[handlers.up]"));
    assert_check_fails(
        dir.path(),
        &format!(
            "stores.gone: postgres at 127.0.0.1:{port}/postgres: connect: error connecting to server"
        ),
    );
    assert_check_fails(
        dir.path(),
        &format!(
            "stores.shared: postgres at 127.0.0.1:5432/postgres: connect: role \"{r}\" does not exist; fix: check the user name and password"
        ),
    );

    let (mut child, addr) = start(dir.path());
    let route = wait_failing(&mut child, dir.path(), &addr, "does not exist", 2);
    assert!(
        route["fix"]
            .as_str()
            .unwrap()
            .contains("user name and password"),
        "{route}"
    );
    assert_status(
        dir.path(),
        &addr,
        "failing",
        "state store shared: postgres",
        Some("pg_hba.conf"),
    );

    // The role appears, but may not create the store's schema: another misconfiguration.
    let pg = lockgate_tests::pg::SyncPg::connect();
    pg.exec(&format!("CREATE ROLE {r} LOGIN PASSWORD 'pw'"));
    wait_failing(&mut child, dir.path(), &addr, "may not create it", 1);
    assert_check_fails(
        dir.path(),
        &format!(
            "stores.shared: postgres at 127.0.0.1:5432/postgres: schema {r} does not exist and the URL's user may not create it"
        ),
    );
    pg.exec(&format!("GRANT CREATE ON DATABASE postgres TO {r}"));
    wait_ready(&mut child, dir.path(), &addr);
    stop_run(&mut child, dir.path(), 1);
    // (Edited only now: the running process would reload it.)
    lockgate_tests::edit_config(&config, &gone, "");
    let notes = assert_check_passes(dir.path());
    assert!(
        notes.contains(&format!("schema {r} does not exist yet")),
        "{notes}"
    );
    // One line per misconfiguration, however often each was retried.
    let logs = run_logs(dir.path(), 1);
    assert_eq!(log_lines(dir.path(), "ERROR", ""), 2, "{logs}");
    assert_eq!(
        log_lines(dir.path(), "ERROR", "does not exist"),
        2,
        "{logs}"
    );
}
