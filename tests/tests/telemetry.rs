//! The admin endpoint of `lockgate run` during an end-to-end run on the embedded broker: the
//! counters `/metrics` reports equal what the messages were built to do.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lockgate_tests::admin::{admin_addr, get};
use lockgate_tests::{guest, lockgate, run_logs, show, start_run, stop_run, wait_for_progress};

/// A config with one route `orders`: the chaos guest from local topic `in` to `out`, plus
/// `runtime_extra` lines in `[runtime]` and `route_extra` lines in the route.
fn write_config(
    dir: &std::path::Path,
    runtime_extra: &str,
    route_extra: &str,
) -> std::path::PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nstate_dir = \"state\"\n{runtime_extra}\n[handlers.chaos]\nmodule = \"{}\"\nconfig = {{ target = \"out\" }}\n\n[routes.orders]\nhandler = \"chaos\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\n{route_extra}",
            guest("chaos").display()
        ),
    )
    .unwrap();
    config
}

/// The value of the series `name{...route="orders"...}` in a metrics page.
fn value(page: &str, name: &str) -> f64 {
    lockgate_tests::admin::value(page, name, "orders")
        .unwrap_or_else(|| panic!("no {name} for route orders in\n{page}"))
}

#[test]
fn metrics_count_what_the_messages_were_built_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "admin = \"127.0.0.1:0\"\n",
        "retry = { max_attempts = 3, initial_backoff_ms = 10, jitter = \"none\" }\n",
    );
    // 20 good, 3 that fail once, 2 poison: 25 received, 23 succeeded, 3 retried, 2 rejected and
    // dead-lettered, 28 handler calls.
    let mut lines = Vec::new();
    for i in 0..25 {
        let extra = match i {
            20..=22 => r#","fail":1"#,
            23 | 24 => r#","poison":true"#,
            _ => "",
        };
        lines.push(serde_json::json!({"payload": format!(r#"{{"id":{i}{extra}}}"#)}).to_string());
    }
    std::fs::write(dir.path().join("in.jsonl"), lines.join("\n")).unwrap();
    let out = lockgate(
        dir.path(),
        &[
            "send",
            "in",
            "--file",
            "in.jsonl",
            "--config",
            "runtime.toml",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));

    let mut child = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let addr = admin_addr(&mut child, dir.path(), 1);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    wait_for_progress(
        &mut child,
        dir.path(),
        1,
        25,
        Duration::from_secs(120),
        Duration::from_millis(50),
        || {
            let page = get(&addr, "/metrics").1;
            if !page.contains("lockgate_messages_succeeded_total{") {
                return 0;
            }
            (value(&page, "lockgate_messages_succeeded_total")
                + value(&page, "lockgate_messages_dead_lettered_total")) as u64
        },
    );
    let (status, page) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    for (name, want) in [
        ("lockgate_messages_received_total", 25.0),
        ("lockgate_messages_succeeded_total", 23.0),
        ("lockgate_attempts_retried_total", 3.0),
        ("lockgate_messages_rejected_total", 2.0),
        ("lockgate_messages_dead_lettered_total", 2.0),
        ("lockgate_outputs_published_total", 23.0),
        ("lockgate_messages_duplicates_skipped_total", 0.0),
        ("lockgate_handler_duration_seconds_count", 28.0),
        ("lockgate_messages_in_flight", 0.0),
        ("lockgate_breaker_state", 0.0),
        ("lockgate_route_state", 1.0),
    ] {
        assert_eq!(value(&page, name), want, "{name}\n{page}");
    }
    // Reused instances that never trapped: every one created is still alive.
    let created = value(&page, "lockgate_instances_created_total");
    assert!(created >= 1.0, "{page}");
    assert_eq!(value(&page, "lockgate_instances"), created, "{page}");
    assert!(page.contains("handler=\"chaos\""), "{page}");
    assert!(page.contains("handler_version=\""), "{page}");
    let (status, body) = get(&addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["routes"][0]["route"], "orders");
    assert_eq!(ready["routes"][0]["state"], "running");
    assert_eq!(ready["routes"][0]["breaker"], "closed");

    // `lockgate status` shows the same numbers as a table (and the JSON with --json).
    let out = lockgate(
        dir.path(),
        &["status", "--admin", &addr, "--interval-ms", "100"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header[..4],
        ["ROUTE", "STATE", "BREAKER", "IN-FLIGHT"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        [
            "orders", "running", "closed", "0", "25", "23", "3", "2", "-", "0.0"
        ],
        "{table}"
    );
    let out = lockgate(
        dir.path(),
        &["status", "--json", "runtime.toml", "--admin", &addr],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["routes"][0]["dead_lettered"], 2);
    // A host name works as well as an IP (localhost may resolve to ::1 first: every address is
    // tried), and so does a URL.
    let port = addr.rsplit_once(':').unwrap().1;
    for by_name in [
        format!("localhost:{port}"),
        format!("http://localhost:{port}/"),
    ] {
        let out = lockgate(dir.path(), &["status", "--json", "--admin", &by_name]);
        assert!(out.status.success(), "{by_name}: {}", show(&out));
        let by_name: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(by_name["routes"][0]["dead_lettered"], 2);
    }
    let out = lockgate(
        dir.path(),
        &[
            "reload",
            "runtime.toml",
            "--admin",
            &format!("localhost:{port}"),
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "reloaded: nothing changed\n"
    );
    // Errors name the address.
    for (bad, says) in [
        ("127.0.0.1:1", "cannot connect to 127.0.0.1:1: "),
        (
            "no-such-host.invalid:9090",
            "cannot resolve no-such-host.invalid:9090: ",
        ),
        (
            "localhost",
            "localhost is not an admin address: expected host:port",
        ),
    ] {
        let out = lockgate(dir.path(), &["status", "--admin", bad]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot read http://{bad}/status")) && stderr.contains(says),
            "{bad}: {stderr}"
        );
    }

    stop_run(&mut child, dir.path(), 1);
}

#[test]
fn a_bad_admin_address_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        "[runtime]\nadmin = \"localhost\"\n",
    )
    .unwrap();
    let out = lockgate(dir.path(), &["check", "runtime.toml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "runtime.admin: \"localhost\" is not an address: expected ip:port, e.g. \"127.0.0.1:9464\""
        ),
        "{}",
        show(&out)
    );
}

#[test]
fn outputs_and_dead_letters_carry_the_inputs_trace_id() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", "retry = { max_attempts = 1 }\n");
    for (payload, span) in [
        (r#"{"id":1}"#, "00f067aa0ba902b7"),
        (r#"{"id":2,"poison":true}"#, "00f067aa0ba902b8"),
    ] {
        let tp = format!("traceparent=00-{TRACE}-{span}-01");
        let out = lockgate(
            dir.path(),
            &["send", "in", payload, "-H", &tp, "--config", "runtime.toml"],
        );
        assert!(out.status.success(), "{}", show(&out));
    }
    let mut child = lockgate_tests::start_run_with_env(
        dir.path(),
        &config,
        1,
        None,
        "lockgate=debug,warn",
        &[("LOCKGATE_LOG_FORMAT", "json")],
    );
    let tail = |topic: &str| -> Vec<serde_json::Value> {
        let out = lockgate(
            dir.path(),
            &["tail", topic, "--json", "--config", "runtime.toml"],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_for_progress(
        &mut child,
        dir.path(),
        1,
        2,
        Duration::from_secs(120),
        Duration::from_millis(50),
        || (tail("out").len() + tail("in.dlq").len()) as u64,
    );
    stop_run(&mut child, dir.path(), 1);

    let out = tail("out");
    let tp = out[0]["headers"]["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], TRACE, "{tp}");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the output is a new span: {tp}"
    );
    let dead = tail("in.dlq");
    assert_eq!(
        dead[0]["headers"]["traceparent"],
        format!("00-{TRACE}-00f067aa0ba902b8-01")
    );
    // JSON logs: the message's lines carry its trace id, position, handler version and
    // outcome, and the line that ends it its attempt.
    let logs = run_logs(dir.path(), 1);
    let traced: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["span"]["trace_id"] == TRACE)
        .collect();
    assert!(
        !traced.is_empty(),
        "no JSON log line with the trace id\n{logs}"
    );
    let outcomes: Vec<&serde_json::Value> = traced
        .iter()
        .filter(|v| v["span"]["outcome"].is_string())
        .collect();
    let of = |want: &str| outcomes.iter().find(|v| v["span"]["outcome"] == want);
    let ok = of("ok").unwrap_or_else(|| panic!("no line with outcome ok\n{logs}"));
    assert_eq!(ok["span"]["topic"], "in", "{ok}");
    assert_eq!(ok["span"]["partition"], 0, "{ok}");
    // The attempt is the event's own field here: the `message` span covers every attempt,
    // and each handler call has an `attempt` span inside it.
    assert_eq!(ok["fields"]["attempt"], 1, "{ok}");
    assert_eq!(ok["span"]["route"], "orders", "{ok}");
    assert_eq!(
        ok["span"]["handler_version"].as_str().map(str::len),
        Some(64),
        "{ok}"
    );
    let dead = of("dead_lettered").unwrap_or_else(|| panic!("no dead_lettered line\n{logs}"));
    assert_eq!(dead["span"]["offset"], 1, "{dead}");
}
