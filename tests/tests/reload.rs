//! Hot reload on the embedded broker, driven in process through `lockgate::app::Runtime`: config
//! reloads (add a route, change one's retry policy, remove one mid-stream, refuse an invalid
//! config) and a module change noticed by polling; and, out of process, what only the command
//! line does: SIGHUP and the admin token of `lockgate run`. Module swaps under load are in
//! `reload_churn.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockgate::app::{Event, ReloadError, RestartReason, RouteChange, StopCause};
use lockgate::broker::local::LocalBroker;
use lockgate::message::OutRecord;
use lockgate_tests::admin::{admin_addr, get, reloads};
use lockgate_tests::inproc::{self, InProc};
use lockgate_tests::reload::version_of;
use lockgate_tests::{guest, run_logs, start_run, stop_run, wait_for_progress};

const DEADLINE: Duration = Duration::from_secs(300);

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

fn sha256(path: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The events until (and with) the reload's own [`Event::Reloaded`] or
/// [`Event::ReloadRefused`], which the runtime sends after the routes it stopped and started.
async fn reload_events(rt: &mut InProc) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let e = rt
            .wait_event("the reload's events", DEADLINE, |_| true)
            .await;
        let last = matches!(e, Event::Reloaded { .. } | Event::ReloadRefused { .. });
        seen.push(e);
        if last {
            return seen;
        }
    }
}

/// The routes a reload stopped, with counter `stat` of each one's final report.
fn stopped_by_reload(events: &[Event], stat: &str) -> Vec<(String, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RouteStopped {
                report,
                cause: StopCause::Reload,
            } => {
                let value = report
                    .stats
                    .iter()
                    .find(|(k, _)| *k == stat)
                    .map_or(0, |(_, v)| *v);
                Some((report.route.clone(), value))
            }
            _ => None,
        })
        .collect()
}

fn started(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RouteStarted { route, .. } => Some(route.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reloads_add_change_and_remove_routes_and_refuse_a_bad_config() {
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
    let mut rt = inproc::start(&config).await;
    // The start is a reload from nothing: route a starts, with its policies in its summary.
    match rt
        .wait_event("route a's start", DEADLINE, |e| {
            matches!(e, Event::RouteStarted { .. })
        })
        .await
    {
        Event::RouteStarted { route, summary } => {
            assert_eq!(route, "a");
            assert!(summary.contains("retry 1 attempts"), "{summary}");
        }
        e => unreachable!("{e:?}"),
    }
    assert_eq!(rt.runtime.started_routes(), 1);
    let addr = rt.admin();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let offset = |topic: &str| broker.end_offset(topic).unwrap();

    // Route a with max_attempts 1: a message that fails once is dead-lettered.
    append(
        &broker,
        "in",
        (0..5).map(|i| format!(r#"{{"id":{i},"fail":1}}"#)),
    );
    inproc::until("dead letters of a", DEADLINE, 5, || offset("in.dlq")).await;

    // Change a's retry policy: the same kind of message now succeeds on its second attempt.
    rewrite(&route_a(3));
    let changes = rt.runtime.reload().await.unwrap();
    assert_eq!(
        changes,
        vec![RouteChange::Restarted {
            route: "a".into(),
            why: RestartReason::Settings
        }]
    );
    assert_eq!(
        changes[0].to_string(),
        "route a: restart: its settings changed"
    );
    let events = reload_events(&mut rt).await;
    assert_eq!(
        stopped_by_reload(&events, "dead_lettered"),
        vec![("a".to_owned(), 5)]
    );
    assert_eq!(started(&events), vec!["a"]);
    append(
        &broker,
        "in",
        (5..10).map(|i| format!(r#"{{"id":{i},"fail":1}}"#)),
    );
    inproc::until("outputs of a", DEADLINE, 5, || offset("out")).await;
    assert_eq!(offset("in.dlq"), 5, "none dead-lettered since");

    // Add route b; it serves its own topic.
    rewrite(&format!("{}{route_b}", route_a(3)));
    let changes = rt.runtime.reload().await.unwrap();
    assert_eq!(
        changes,
        vec![RouteChange::Added {
            route: "b".into(),
            module_hash: sha256(&guest("chaos"))
        }]
    );
    assert_eq!(started(&reload_events(&mut rt).await), vec!["b"]);
    append(&broker, "in2", (0..300).map(|i| format!(r#"{{"id":{i}}}"#)));
    inproc::until("outputs of b", DEADLINE, 20, || offset("out2")).await;

    // Remove b mid-stream (it is rate-limited to 100/s): it drains and commits what it did.
    rewrite(&route_a(3));
    let changes = rt.runtime.reload().await.unwrap();
    assert_eq!(changes, vec![RouteChange::Removed { route: "b".into() }]);
    let stopped = stopped_by_reload(&reload_events(&mut rt).await, "outputs");
    let done_when_removed = offset("out2");
    assert!(
        done_when_removed < 300,
        "removed mid-stream: {done_when_removed}"
    );
    assert_eq!(stopped, vec![("b".to_owned(), done_when_removed)]);
    assert_eq!(
        broker.committed("in2", "lockgate").unwrap(),
        done_when_removed,
        "everything b handled is committed, nothing more"
    );
    let running: Vec<String> = rt.runtime.routes().into_iter().map(|r| r.route).collect();
    assert_eq!(running, vec!["a"]);
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
    let refused = rt.runtime.reload().await.unwrap_err();
    assert!(matches!(*refused, ReloadError::Config(_)), "{refused:?}");
    assert!(
        refused
            .to_string()
            .contains("routes.a.retry.max_attemps: unknown field"),
        "{refused}"
    );
    let events = reload_events(&mut rt).await;
    assert!(
        matches!(events.as_slice(), [Event::ReloadRefused { .. }]),
        "nothing stopped or started: {events:?}"
    );
    assert_eq!(reloads(&addr), (before.0, before.1 + 1));
    append(
        &broker,
        "in",
        (10..15).map(|i| format!(r#"{{"id":{i},"fail":1}}"#)),
    );
    inproc::until("outputs of a", DEADLINE, 10, || offset("out")).await;
    assert_eq!(offset("in.dlq"), 5);
    assert_eq!(offset("out2"), done_when_removed, "b was not added");

    // Adding b back goes on from its committed position: the rest, each once.
    rewrite(&format!("{}{route_b}", route_a(3)));
    rt.runtime.reload().await.unwrap();
    inproc::until("outputs of b", DEADLINE, 300, || offset("out2")).await;
    let end = rt.runtime.stop().await;
    assert!(!end.failed());
    let ended: Vec<&str> = end.reports.iter().map(|r| r.route.as_str()).collect();
    assert_eq!(ended, vec!["a", "b", "a", "b"], "the reload-stopped first");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_notices_a_module_change_and_post_reload_beyond_loopback_needs_a_token() {
    // Polling, admin on every interface, no token: POST /reload is refused, the file watcher
    // still reloads.
    let dir = tempfile::tempdir().unwrap();
    let (config, module) = module_config(dir.path(), "admin = \"0.0.0.0:0\"\nwatch = \"poll\"\n");
    let mut rt = inproc::start(&config).await;
    let addr = rt.admin();
    let (code, body) = lockgate::telemetry::http_request(&addr, "POST", "/reload", None).unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin_token"), "{body}");
    std::fs::copy(guest("uppercase"), &module).unwrap();
    let changes = match rt
        .wait_event("a reload by the poller", DEADLINE, |e| {
            matches!(e, Event::Reloaded { .. } | Event::ReloadRefused { .. })
        })
        .await
    {
        Event::Reloaded { changes } => changes,
        e => panic!("{e:?}"),
    };
    assert_eq!(
        changes,
        vec![RouteChange::Swapped {
            route: "orders".into(),
            handler: "h".into(),
            from: sha256(&guest("chaos")),
            to: sha256(&guest("uppercase")),
        }]
    );
    let serving: Vec<String> = rt
        .runtime
        .routes()
        .iter()
        .map(|r| r.slot.current().module_hash())
        .collect();
    assert_eq!(serving, vec![sha256(&guest("uppercase"))]);
    assert_serving(&addr, &guest("uppercase"));
    assert_eq!(reloads(&addr), (1, 0));
    // Stopped through a control handle, its end is awaited with `finished`; a later `stop`
    // finds it ended and returns an empty end instead of awaiting the finished task again.
    rt.runtime.control().stop();
    let end = rt.runtime.finished().await;
    assert!(!end.failed());
    assert_eq!(end.reports.len(), 1, "{end:?}");
    assert!(rt.runtime.stop().await.reports.is_empty());
}

fn wait_reloads(run: &mut lockgate_tests::Proc, dir: &Path, addr: &str, want: (u64, u64)) {
    wait_for_progress(run, dir, 1, 1, DEADLINE, Duration::from_millis(20), || {
        u64::from(reloads(addr) == want)
    });
}

/// What `lockgate run` adds to the library: the token from the environment and SIGHUP.
#[test]
fn lockgate_run_reloads_on_sighup_and_an_authorised_post_reload() {
    // A token, no watching: only an authorised POST /reload or SIGHUP reloads.
    let dir = tempfile::tempdir().unwrap();
    let (config, module) = module_config(
        dir.path(),
        "admin = \"0.0.0.0:0\"\nwatch = \"off\"\nadmin_token = { env = \"LG_TEST_TOKEN\" }\n",
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
