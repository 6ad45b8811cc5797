//! Helpers shared by the integration tests: where the built guests and the `lockgate` binary
//! are, and how to run the binary.

pub mod admin;
pub mod dlq;
pub mod http_server;
pub mod inproc;
pub mod kafka;
pub mod nats;
pub mod pg;
pub mod prometheus;
pub mod proxy;
pub mod rabbit;
pub mod reload;
pub mod sqlroute;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a guest example's component, built by this crate's build script.
///
/// `name` is the crate name (`uppercase`, `router`, `flaky`, `adversarial`, ...).
pub fn guest(name: &str) -> PathBuf {
    let p =
        PathBuf::from(env!("LOCKGATE_GUESTS_DIR")).join(format!("{}.wasm", name.replace('-', "_")));
    assert!(p.is_file(), "guest component {} was not built", p.display());
    p
}

/// The workspace root (for fixtures under `tests/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// Path of the `lockgate` binary of this build.
///
/// Test executables live in `<target>/<profile>/deps/`; the binary is built next to `deps/` by
/// `cargo test --workspace` (the README's test command).
pub fn lockgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary is in <target>/<profile>/deps");
    let bin = profile_dir.join("lockgate");
    assert!(
        bin.is_file(),
        "{} not found: run the tests with `cargo test --workspace` (or `cargo build -p lockgate` first) so the binary is built",
        bin.display()
    );
    bin
}

/// Path of the release `lockgate` binary for the benches: `LOCKGATE_BIN`, or `release/lockgate`
/// beside the bench executable's target directory.
pub fn lockgate_release_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/release/deps/<bench>-* -> <target>/release/lockgate
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("bench binary is in <target>/release/deps")
        .join("lockgate");
    assert!(
        bin.is_file(),
        "{} missing: cargo build --release -p lockgate --bin lockgate",
        bin.display()
    );
    bin
}

/// Runs `lockgate` with `args` in `dir` and returns its output.
pub fn lockgate(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(lockgate_bin())
        .current_dir(dir)
        .args(args)
        .env("LOCKGATE_LOG", "error")
        .output()
        .expect("cannot run lockgate")
}

/// `lockgate dlq ARGS` in `dir`, asserted to succeed; its stdout.
pub fn dlq_cmd(dir: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    let out = lockgate(dir, &all);
    assert!(out.status.success(), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A benchmark's samples as (median, lowest, highest): benches report the median of a few
/// rounds with their spread (the machine is noisy).
pub fn median_spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Replaces `from` with `to` in the file at `path` (a test's runtime.toml), failing the test
/// if `from` is not there: an edit that silently matched nothing would test the wrong setup.
pub fn edit_config(path: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("config file");
    assert!(
        text.contains(from),
        "{} has no {from:?}:\n{text}",
        path.display()
    );
    std::fs::write(path, text.replace(from, to)).expect("config file");
}

/// Stdout and stderr of `out` as text, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A handler environment for tests and benches: in-memory kv, every output allowed.
pub fn handler_env(
    name: &str,
    config: &[(&str, &str)],
    limits: lockgate::engine::HandlerLimits,
) -> lockgate::engine::HandlerEnv {
    lockgate::engine::HandlerEnv {
        name: name.to_owned(),
        config: config
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        outputs: None,
        limits,
        kv: std::sync::Arc::new(lockgate::state::MemoryStore::new()),
        http: None,
        sql: None,
        wasi: lockgate::config::WasiGrants::default(),
    }
}

/// Loads guest example `guest_name` on a new engine with the given allocator and wraps it in an
/// instance pool.
pub fn guest_pool(
    guest_name: &str,
    pooling: bool,
    isolation: lockgate::config::Isolation,
    env: lockgate::engine::HandlerEnv,
) -> lockgate::engine::InstancePool {
    module_pool(&guest(guest_name), pooling, isolation, env)
}

/// [`guest_pool`] for the component at `module` (a guest built by `lockgate build`).
pub fn module_pool(
    module: &std::path::Path,
    pooling: bool,
    isolation: lockgate::config::Isolation,
    env: lockgate::engine::HandlerEnv,
) -> lockgate::engine::InstancePool {
    let engine = lockgate::engine::Engine::new(&lockgate::engine::EngineSettings {
        pooling,
        max_instances: 64,
        ..lockgate::engine::EngineSettings::default()
    })
    .expect("engine");
    let handler = engine.load_handler(module, env).expect("guest loads");
    lockgate::engine::InstancePool::new(handler, isolation, u64::MAX)
}

/// A child process that is killed when dropped, so a failing test leaves no `lockgate run`
/// behind (a panic unwinds through it).
#[derive(Debug)]
pub struct Proc(pub std::process::Child);

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `lockgate run CONFIG` with stdout and stderr in `dir/run<N>.stdout|stderr` (so a
/// test can show them when it fails), optionally with `--state-dir`, logging at `log_filter`.
pub fn start_run(
    dir: &std::path::Path,
    config: &std::path::Path,
    run: u32,
    state_dir: Option<&std::path::Path>,
    log_filter: &str,
) -> Proc {
    start_run_with_env(dir, config, run, state_dir, log_filter, &[])
}

/// [`start_run`] with extra environment variables for the child.
pub fn start_run_with_env(
    dir: &std::path::Path,
    config: &std::path::Path,
    run: u32,
    state_dir: Option<&std::path::Path>,
    log_filter: &str,
    env: &[(&str, &str)],
) -> Proc {
    let log =
        |name: &str| std::fs::File::create(dir.join(format!("run{run}.{name}"))).expect("log file");
    let mut cmd = Command::new(lockgate_bin());
    cmd.arg("run").arg(config);
    if let Some(d) = state_dir {
        cmd.arg("--state-dir").arg(d);
    }
    cmd.envs(env.iter().copied());
    cmd.env("LOCKGATE_LOG", log_filter)
        .stdin(std::process::Stdio::null())
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .map(Proc)
        .expect("cannot start lockgate run")
}

/// Starts `lockgate ARGS` in `dir` with stdout and stderr in `dir/<name>.stdout|stderr`, for
/// commands a test interrupts (read them back with [`logs_of`]).
pub fn spawn_lockgate(dir: &std::path::Path, name: &str, args: &[&str]) -> Proc {
    let log =
        |ext: &str| std::fs::File::create(dir.join(format!("{name}.{ext}"))).expect("log file");
    Command::new(lockgate_bin())
        .current_dir(dir)
        .args(args)
        .env("LOCKGATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .map(Proc)
        .expect("cannot start lockgate")
}

/// What [`spawn_lockgate`]'s process `name` printed: (stdout, stderr).
pub fn logs_of(dir: &std::path::Path, name: &str) -> (String, String) {
    let read =
        |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}"))).unwrap_or_default();
    (read("stdout"), read("stderr"))
}

/// Sends `signal` (`INT`, `TERM`, `KILL`) to `child`.
pub fn signal(child: &Proc, signal: &str) {
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("cannot run kill");
    assert!(sent.success(), "kill -{signal} {pid} failed");
}

/// Stops run `run` (see [`start_run`]) with SIGTERM and asserts it exited cleanly.
pub fn stop_run(child: &mut Proc, dir: &std::path::Path, run: u32) {
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("cannot run kill");
    assert!(sent.success(), "kill -TERM {pid} failed");
    let status = child.wait().expect("child status");
    assert!(status.success(), "{status}\n{}", run_logs(dir, run));
}

/// `n` orders `{"id":i...}` keyed `k<i % keys>`, with `extra(i)` added to each payload (for
/// example [`crash_mix`]).
pub fn orders(n: u64, keys: u64, extra: impl Fn(u64) -> &'static str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("k{}", i % keys),
                format!(r#"{{"id":{i}{}}}"#, extra(i)),
            )
        })
        .collect()
}

/// Payload extras of the crash tests: every 100th message (42, 142, ...) is poison, every 20th
/// (3, 23, ...) fails twice before it succeeds.
pub fn crash_mix(i: u64) -> &'static str {
    if i % 100 == 42 {
        r#","poison":true"#
    } else if i % 20 == 3 {
        r#","fail":2"#
    } else {
        ""
    }
}

/// What run `run` (see [`start_run`]) printed so far, for assertion messages.
pub fn run_logs(dir: &std::path::Path, run: u32) -> String {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(format!("run{run}.{name}"))).unwrap_or_default()
    };
    format!(
        "--- run {run} stdout\n{}\n--- run {run} stderr\n{}",
        read("stdout"),
        read("stderr")
    )
}

/// Counter `name` (`received`, `succeeded`, ...) from the summary run `run` printed at its
/// end; 0 when it printed none.
pub fn run_stat(dir: &std::path::Path, run: u32, name: &str) -> u64 {
    let stdout = std::fs::read_to_string(dir.join(format!("run{run}.stdout"))).unwrap_or_default();
    let prefix = format!("{name}=");
    stdout
        .split(|c: char| c.is_whitespace() || c == '(')
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim_end_matches(')').parse().ok())
        .unwrap_or(0)
}

/// Waits until `progress()` reaches `target` while run `run` (see [`start_run`]) works, calling
/// it again after `pause`. Fails, with the run's output, if the run exits first or `deadline`
/// passes. The runtime is another process: its progress only shows in what it wrote.
pub fn wait_for_progress(
    child: &mut Proc,
    dir: &std::path::Path,
    run: u32,
    target: u64,
    deadline: std::time::Duration,
    pause: std::time::Duration,
    mut progress: impl FnMut() -> u64,
) {
    let started = std::time::Instant::now();
    loop {
        let done = progress();
        if done >= target {
            return;
        }
        if let Some(status) = child.try_wait().expect("child status") {
            panic!(
                "lockgate run exited early ({status}) at {done}/{target}\n{}",
                run_logs(dir, run)
            );
        }
        assert!(
            started.elapsed() < deadline,
            "no progress to {target} within {deadline:?} (at {done})\n{}",
            run_logs(dir, run)
        );
        std::thread::sleep(pause);
    }
}

/// Seconds since midnight of a log line's leading RFC 3339 timestamp.
pub fn log_time(line: &str) -> f64 {
    let time = line
        .split('T')
        .nth(1)
        .and_then(|t| t.split('Z').next())
        .unwrap_or_else(|| panic!("no timestamp in {line}"));
    time.split(':')
        .map(|p| {
            p.parse::<f64>()
                .unwrap_or_else(|e| panic!("timestamp of {line}: {e}"))
        })
        .zip([3600.0, 60.0, 1.0])
        .map(|(v, unit)| v * unit)
        .sum()
}

/// The failed attempts a run logged as "the broker redelivers it" (debug level), of the lines
/// `keep` accepts: (attempt number, seconds since midnight).
pub fn redeliveries(logs: &str, keep: impl Fn(&str) -> bool) -> Vec<(u32, f64)> {
    logs.lines()
        .filter(|l| l.contains("the broker redelivers it") && keep(l))
        .map(|l| {
            let attempt = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("attempt="))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no attempt in {l}"));
            (attempt, log_time(l))
        })
        .collect()
}

/// Asserts that redeliveries `i` came `want[i - 1]` seconds after the one before, at least
/// `low` of it and at most 1.5 s late (a loaded machine).
pub fn assert_gaps(failures: &[(u32, f64)], want: &[f64], low: f64, logs: &str) {
    for (i, want) in want.iter().enumerate() {
        let gap = failures[i + 1].1 - failures[i].1;
        assert!(
            gap >= want * low && gap <= want + 1.5,
            "gap before attempt {} was {gap:.3} s, backoff {want} s\n{logs}",
            i + 2
        );
    }
}
