//! Reading the admin endpoint of a `lockgate run` child (see [`crate::start_run`]).

use std::path::Path;
use std::time::Duration;

use crate::{Proc, run_logs};

/// `GET path` on `addr` (`ip:port`): (status code, body). Panics when the endpoint does not
/// answer.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    lockgate::telemetry::http_get(addr, path).expect("admin endpoint answers")
}

/// The value of the first series `name{...}` of `route` in a metrics page.
pub fn value(page: &str, name: &str, route: &str) -> Option<f64> {
    let label = format!("route=\"{route}\"");
    page.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// The sum of every series `name{...}` of `route` (e.g. lag over partitions).
pub fn sum(page: &str, name: &str, route: &str) -> f64 {
    let label = format!("route=\"{route}\"");
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The admin address run `run` printed at start (`[runtime] admin` or `--admin`).
pub fn admin_addr(child: &mut Proc, dir: &Path, run: u32) -> String {
    let started = std::time::Instant::now();
    loop {
        let logs = run_logs(dir, run);
        if let Some(addr) = logs
            .split("admin endpoint on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        {
            return addr.to_owned();
        }
        assert!(
            child.try_wait().expect("child status").is_none(),
            "exited\n{logs}"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "{logs}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reloads the process behind `addr` counted so far: (applied, refused).
pub fn reloads(addr: &str) -> (u64, u64) {
    let page = get(addr, "/metrics").1;
    let read = |result: &str| {
        page.lines()
            .find(|l| l.starts_with(&format!("lockgate_reloads_total{{result=\"{result}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    (read("applied"), read("refused"))
}

/// Resident memory of process `pid` in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS line")
}

/// `/readyz` of `addr` as (status code, JSON body).
pub fn readyz(addr: &str) -> (u16, serde_json::Value) {
    let (code, body) = get(addr, "/readyz");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/readyz: {e}: {body}"));
    (code, json)
}

/// Polls `/readyz` of run `run` (see [`crate::start_run`]) until `done` accepts its answer, and
/// returns it; fails, with the run's output, when the run exits or `deadline` passes first.
pub fn wait_readyz(
    child: &mut Proc,
    dir: &Path,
    run: u32,
    addr: &str,
    deadline: Duration,
    mut done: impl FnMut(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let started = std::time::Instant::now();
    loop {
        let (code, json) = readyz(addr);
        if done(code, &json) {
            return (code, json);
        }
        assert!(
            child.try_wait().expect("child status").is_none(),
            "exited; last /readyz {code} {json}\n{}",
            run_logs(dir, run)
        );
        assert!(
            started.elapsed() < deadline,
            "/readyz still {code} {json} after {deadline:?}\n{}",
            run_logs(dir, run)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
