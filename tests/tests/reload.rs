//! Hot reload of `lockgate run` on the embedded broker: module swaps under load (no message
//! lost, each handled by exactly one version, garbage never served, memory flat) and config
//! reloads (add a route, change one's retry policy, remove one mid-stream, refuse an invalid
//! config).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockgate::broker::local::LocalBroker;
use lockgate::message::OutRecord;
use lockgate_tests::admin::{admin_addr, get, reloads, value};
use lockgate_tests::reload::{churn, version_of};
use lockgate_tests::{guest, lockgate, run_logs, show, start_run, stop_run, wait_for_progress};

const DEADLINE: Duration = Duration::from_secs(300);

fn orders(from: u64, n: u64) -> Vec<OutRecord> {
    (from..from + n)
        .map(|i| OutRecord {
            topic: "in".into(),
            key: Some(format!("k{}", i % 16).into_bytes()),
            headers: Vec::new(),
            payload: format!(r#"{{"id":{i}}}"#).into_bytes(),
        })
        .collect()
}

#[test]
fn a_hundred_module_reloads_under_load_lose_nothing_and_never_serve_garbage() {
    const N: u64 = 50_000;
    const RELOADS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("handler.wasm");
    std::fs::copy(guest("chaos"), &module).unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"

[handlers.h]
module = "handler.wasm"
config = { target = "out" }

[routes.orders]
handler = "h"
source = { topic = "in" }
outputs = ["out"]
concurrency = 4
ordering = "key"
"#,
    )
    .unwrap();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let addr = admin_addr(&mut run, dir.path(), 1);
    let chunk = N / RELOADS as u64;
    // Each reload lands in the middle of a chunk: the previous chunk is handled, the next one
    // appended, and the module written once a tenth of it is handled.
    let rss = churn(&mut run, dir.path(), 1, &addr, &module, RELOADS, |i| {
        let handled = i as u64 * chunk;
        let until = |n: u64| {
            let started = std::time::Instant::now();
            while broker.end_offset("out").unwrap() < n {
                assert!(started.elapsed() < DEADLINE, "chunk {i} not handled");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        until(handled);
        broker.append(&orders(handled, chunk)).unwrap();
        until(handled + chunk / 10);
    });
    wait_for_progress(
        &mut run,
        dir.path(),
        1,
        N,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("out").unwrap(),
    );
    let page = get(&addr, "/metrics").1;
    stop_run(&mut run, dir.path(), 1);

    let mut seen = BTreeMap::<u64, u32>::new();
    let mut by_version = BTreeMap::<char, u64>::new();
    for r in broker.read("out", 0, N as usize + 100).unwrap() {
        let (version, id) = version_of(&r.payload);
        *seen.entry(id).or_default() += 1;
        *by_version.entry(version).or_default() += 1;
    }
    assert_eq!(seen.len() as u64, N, "nothing lost");
    assert!(seen.values().all(|n| *n == 1), "each handled once");
    assert_eq!(by_version.len(), 2, "both versions served: {by_version:?}");
    for name in [
        "lockgate_messages_dead_lettered_total",
        "lockgate_attempts_retried_total",
    ] {
        assert_eq!(
            value(&page, name, "orders"),
            Some(0.0),
            "garbage never ran: {name}\n{page}"
        );
    }
    assert_eq!(broker.end_offset("in.dlq").unwrap(), 0);
    // Memory flat: after the first 20 reloads (both versions compiled, caches warm), 80 more
    // add no more than a generous 48 MiB (a leak of one component per reload would exceed it).
    let (early, last) = (rss[19], rss[RELOADS - 1]);
    assert!(
        last < early + 48 * 1024,
        "RSS grew from {early} KiB to {last} KiB over 80 reloads: {rss:?}"
    );
    println!(
        "RSS after reload 20: {early} KiB, after {RELOADS}: {last} KiB; by version {by_version:?}"
    );
}

/// Writes the config of the route tests: routes from `routes` (TOML), `admin` on.
fn write_config(path: &Path, routes: &str) {
    std::fs::write(
        path,
        format!(
            r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"
shutdown_grace_ms = 5000

[handlers.chaos]
module = "{}"
config = {{ target = "out" }}

[handlers.chaos2]
module = "{}"
config = {{ target = "out2" }}
{routes}"#,
            guest("chaos").display(),
            guest("chaos").display()
        ),
    )
    .unwrap();
}

fn append(broker: &LocalBroker, topic: &str, payloads: impl Iterator<Item = String>) {
    let records: Vec<OutRecord> = payloads
        .map(|p| OutRecord {
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: p.into_bytes(),
        })
        .collect();
    broker.append(&records).unwrap();
}

/// `lockgate reload --admin ADDR` in `dir`.
fn reload_cmd(dir: &Path, addr: &str) -> std::process::Output {
    lockgate(dir, &["reload", "runtime.toml", "--admin", addr])
}

#[test]
fn config_reloads_add_change_and_remove_routes_and_refuse_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("runtime.toml");
    let route_a = |attempts: u32| {
        format!(
            "\n[routes.a]\nhandler = \"chaos\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\nretry = {{ max_attempts = {attempts}, initial_backoff_ms = 5, jitter = \"none\" }}\n"
        )
    };
    let route_b = "\n[routes.b]\nhandler = \"chaos2\"\nsource = { topic = \"in2\" }\noutputs = [\"out2\"]\nrate_limit = { per_second = 100, burst = 1 }\n";
    // `watch = "off"`: these reloads happen only when asked, so each step is exact.
    let rewrite = |routes: &str| {
        write_config(&config, routes);
        std::fs::write(
            &config,
            std::fs::read_to_string(&config)
                .unwrap()
                .replace("[runtime]\n", "[runtime]\nwatch = \"off\"\n"),
        )
        .unwrap();
    };
    rewrite(&route_a(1));
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let addr = admin_addr(&mut run, dir.path(), 1);
    let wait_out = |run: &mut lockgate_tests::Proc, topic: &str, n: u64| {
        wait_for_progress(
            run,
            dir.path(),
            1,
            n,
            DEADLINE,
            Duration::from_millis(20),
            || broker.end_offset(topic).unwrap(),
        );
    };

    // Route a with max_attempts 1: a message that fails once is dead-lettered.
    append(
        &broker,
        "in",
        (0..5).map(|i| format!(r#"{{"id":{i},"fail":1}}"#)),
    );
    wait_for_progress(
        &mut run,
        dir.path(),
        1,
        5,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("in.dlq").unwrap(),
    );

    // Change a's retry policy: the same kind of message now succeeds on its second attempt.
    rewrite(&route_a(3));
    let out = reload_cmd(dir.path(), &addr);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains("route a: restart: its settings changed"),
        "{}",
        show(&out)
    );
    append(
        &broker,
        "in",
        (5..10).map(|i| format!(r#"{{"id":{i},"fail":1}}"#)),
    );
    wait_out(&mut run, "out", 5);
    assert_eq!(
        broker.end_offset("in.dlq").unwrap(),
        5,
        "none dead-lettered since"
    );

    // Add route b; it serves its own topic.
    rewrite(&format!("{}{route_b}", route_a(3)));
    let out = reload_cmd(dir.path(), &addr);
    assert!(show(&out).contains("route b: added"), "{}", show(&out));
    append(&broker, "in2", (0..300).map(|i| format!(r#"{{"id":{i}}}"#)));
    wait_out(&mut run, "out2", 20);

    // Remove b mid-stream (it is rate-limited to 100/s): it drains and commits what it did.
    rewrite(&route_a(3));
    let out = reload_cmd(dir.path(), &addr);
    assert!(
        show(&out).contains("route b: removed (drained and stopped)"),
        "{}",
        show(&out)
    );
    let done_when_removed = broker.end_offset("out2").unwrap();
    assert!(
        done_when_removed < 300,
        "removed mid-stream: {done_when_removed}"
    );
    assert_eq!(
        broker.committed("in2", "lockgate").unwrap(),
        done_when_removed,
        "everything b handled is committed, nothing more"
    );
    let (status, body) = get(&addr, "/status");
    assert_eq!(status, 200);
    assert!(!body.contains("\"b\""), "{body}");

    // An invalid config is refused whole; a keeps serving as before.
    let before = reloads(&addr);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("max_attempts = 3", "max_attempts = 3, max_attemps = 4")
            + route_b,
    )
    .unwrap();
    let out = reload_cmd(dir.path(), &addr);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        show(&out).contains("routes.a.retry.max_attemps: unknown field"),
        "{}",
        show(&out)
    );
    assert_eq!(reloads(&addr), (before.0, before.1 + 1));
    append(
        &broker,
        "in",
        (10..15).map(|i| format!(r#"{{"id":{i},"fail":1}}"#)),
    );
    wait_out(&mut run, "out", 10);
    assert_eq!(broker.end_offset("in.dlq").unwrap(), 5);
    assert_eq!(
        broker.end_offset("out2").unwrap(),
        done_when_removed,
        "b was not added"
    );

    // Adding b back goes on from its committed position: the rest, each once.
    rewrite(&format!("{}{route_b}", route_a(3)));
    let out = reload_cmd(dir.path(), &addr);
    assert!(out.status.success(), "{}", show(&out));
    wait_out(&mut run, "out2", 300);
    stop_run(&mut run, dir.path(), 1);
    let mut ids = BTreeMap::<u64, u32>::new();
    for r in broker.read("out2", 0, 1000).unwrap() {
        *ids.entry(version_of(&r.payload).1).or_default() += 1;
    }
    assert_eq!(ids.len(), 300);
    assert!(ids.values().all(|n| *n == 1), "{ids:?}");
}

/// Config of one route from `in` to `out` whose module is `handler.wasm` in `dir`.
fn module_config(dir: &Path, runtime_extra: &str) -> (PathBuf, PathBuf) {
    let module = dir.join("handler.wasm");
    std::fs::copy(guest("chaos"), &module).unwrap();
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nstate_dir = \"state\"\n{runtime_extra}\n[handlers.h]\nmodule = \"handler.wasm\"\nconfig = {{ target = \"out\" }}\n\n[routes.orders]\nhandler = \"h\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\n"
        ),
    )
    .unwrap();
    (config, module)
}

/// The route serves `module`: `/status` names its hash.
fn assert_serving(addr: &str, module: &Path) {
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(std::fs::read(module).unwrap()));
    let body = get(addr, "/status").1;
    assert!(body.contains(&hash[..12]), "not serving {hash}: {body}");
}

fn wait_reloads(run: &mut lockgate_tests::Proc, dir: &Path, addr: &str, want: (u64, u64)) {
    wait_for_progress(run, dir, 1, 1, DEADLINE, Duration::from_millis(20), || {
        u64::from(reloads(addr) == want)
    });
}

#[test]
fn polling_notices_a_module_change_and_reload_beyond_loopback_needs_a_token() {
    // Polling, admin on every interface, no token: POST /reload is refused, the file watcher
    // still reloads.
    let dir = tempfile::tempdir().unwrap();
    let (config, module) = module_config(dir.path(), "admin = \"0.0.0.0:0\"\nwatch = \"poll\"\n");
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let addr = admin_addr(&mut run, dir.path(), 1);
    let (code, body) = lockgate::telemetry::http_request(&addr, "POST", "/reload", None).unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin_token_env"), "{body}");
    std::fs::copy(guest("uppercase"), &module).unwrap();
    wait_reloads(&mut run, dir.path(), &addr, (1, 0));
    assert_serving(&addr, &guest("uppercase"));
    stop_run(&mut run, dir.path(), 1);

    // A token, no watching: only an authorised POST /reload or SIGHUP reloads.
    let dir = tempfile::tempdir().unwrap();
    let (config, module) = module_config(
        dir.path(),
        "admin = \"0.0.0.0:0\"\nwatch = \"off\"\nadmin_token_env = \"LG_TEST_TOKEN\"\n",
    );
    let mut run = lockgate_tests::start_run_with_env(
        dir.path(),
        &config,
        1,
        None,
        "lockgate=info,warn",
        &[("LG_TEST_TOKEN", "s3cret")],
    );
    let addr = admin_addr(&mut run, dir.path(), 1);
    for token in [None, Some("wrong")] {
        let (code, body) =
            lockgate::telemetry::http_request(&addr, "POST", "/reload", token).unwrap();
        assert_eq!(code, 401, "{body}");
    }
    std::fs::copy(guest("uppercase"), &module).unwrap();
    let (code, body) =
        lockgate::telemetry::http_request(&addr, "POST", "/reload", Some("s3cret")).unwrap();
    assert_eq!(code, 200, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["applied"], true);
    assert!(
        outcome["changes"][0]
            .as_str()
            .unwrap()
            .starts_with("route orders: handler h "),
        "{body}"
    );
    assert_eq!(reloads(&addr), (1, 0));
    std::fs::copy(guest("chaos"), &module).unwrap();
    lockgate_tests::signal(&run, "HUP");
    wait_reloads(&mut run, dir.path(), &addr, (2, 0));
    assert_serving(&addr, &guest("chaos"));
    stop_run(&mut run, dir.path(), 1);
}

/// `bytes` (a component) with a custom section naming `version`: a new module version (another
/// SHA-256, another compiled artefact) that behaves exactly like the original.
fn with_version(bytes: &[u8], version: usize) -> Vec<u8> {
    let name = b"lockgate-test-version";
    let data = version.to_string();
    let size = 1 + name.len() + data.len();
    assert!(size < 128, "one-byte LEB128 sizes");
    let mut out = bytes.to_vec();
    out.extend_from_slice(&[0, size as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.extend_from_slice(data.as_bytes());
    out
}

/// The compiled artefacts in the state directory's cache.
fn artefacts(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("state/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cwasm"))
        .collect()
}

#[test]
fn reloading_many_versions_keeps_the_compiled_cache_bounded_and_the_current_version_cached() {
    // Each reload compiles a new version into <state_dir>/cache. The cache keeps the versions in
    // use (the new one, and the old one until the swap) and the most recently used others.
    let kept = lockgate::engine::CacheLimits::default().max_unused_entries;
    let versions = kept + 8;
    let dir = tempfile::tempdir().unwrap();
    let (config, module) = module_config(dir.path(), "admin = \"127.0.0.1:0\"\n");
    let original = std::fs::read(&module).unwrap();
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let addr = admin_addr(&mut run, dir.path(), 1);
    for v in 1..=versions {
        std::fs::write(&module, with_version(&original, v)).unwrap();
        wait_reloads(&mut run, dir.path(), &addr, (v as u64, 0));
        assert!(
            artefacts(dir.path()).len() <= kept + 2,
            "after version {v}: {:?}",
            artefacts(dir.path())
        );
    }
    assert_serving(&addr, &module);
    stop_run(&mut run, dir.path(), 1);
    use sha2::Digest as _;
    let current = hex::encode(sha2::Sha256::digest(std::fs::read(&module).unwrap()));
    let left = artefacts(dir.path());
    assert!(
        left.iter().any(|n| n.starts_with(&current)),
        "the serving version was evicted: {left:?}"
    );

    // A restart loads the current version from the cache instead of compiling it.
    let mut run = start_run(dir.path(), &config, 2, None, "lockgate=debug,warn");
    let addr = admin_addr(&mut run, dir.path(), 2);
    wait_for_progress(
        &mut run,
        dir.path(),
        2,
        1,
        DEADLINE,
        Duration::from_millis(20),
        || u64::from(get(&addr, "/status").1.contains(&current[..12])),
    );
    stop_run(&mut run, dir.path(), 2);
    let logs = run_logs(dir.path(), 2);
    let prepared = logs
        .lines()
        .find(|l| l.contains("Handler prepared"))
        .unwrap_or_else(|| panic!("no handler prepared\n{logs}"));
    assert!(prepared.contains("from_cache=true"), "{prepared}");
}
