//! The test Prometheus that `scripts/brokers.sh start prometheus` runs: its HTTP API, and the
//! target and rule files a test puts in its `file_sd_configs` and `rule_files` directories.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test polls Prometheus for something it waits on (scrapes, rule evaluations).
pub const DEADLINE: Duration = Duration::from_secs(90);

/// The address of the test Prometheus (`127.0.0.1:$LOCKGATE_PROMETHEUS_PORT`, default 9099);
/// panics with the command that starts it when nothing answers there.
pub fn addr() -> String {
    let port = std::env::var("LOCKGATE_PROMETHEUS_PORT").unwrap_or_else(|_| "9099".into());
    let addr = format!("127.0.0.1:{port}");
    let ready = lockgate::telemetry::http_get(&addr, "/-/ready");
    assert!(
        matches!(ready, Ok((200, _))),
        "no Prometheus ready at {addr} ({ready:?}): start it with `scripts/brokers.sh start prometheus`"
    );
    addr
}

/// The Prometheus directory of `scripts/brokers.sh` (`$LOCKGATE_BROKERS_DIR/prometheus`), with
/// `targets/` and `rules/`; panics unless the Prometheus at `addr` reads its targets from there
/// (a Prometheus of someone else's on the port would never scrape what a test registers).
pub fn dir(addr: &str) -> PathBuf {
    let brokers = std::env::var_os("LOCKGATE_BROKERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/lockgate/brokers")
        });
    let dir = brokers.join("prometheus");
    let config = api(addr, "/api/v1/status/config")
        .map(|data| data["yaml"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|e| panic!("Prometheus at {addr}: {e}"));
    let targets = dir.join("targets/*.json");
    assert!(
        config.contains(&*targets.to_string_lossy()),
        "the Prometheus at {addr} does not read its targets from {} (not the one \
         scripts/brokers.sh starts? set LOCKGATE_PROMETHEUS_PORT and LOCKGATE_BROKERS_DIR):\n{config}",
        targets.display()
    );
    dir
}

/// Percent-encodes `s` for a URL query string.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on Prometheus's API: its `data`, or the error it answered (`errorType: error`).
pub fn api(addr: &str, path: &str) -> Result<Value, String> {
    let (code, body) = lockgate::telemetry::http_get(addr, path)
        .unwrap_or_else(|e| panic!("Prometheus at {addr}: {e}"));
    let json: Value =
        serde_json::from_str(&body).map_err(|e| format!("HTTP {code}, not JSON ({e}): {body}"))?;
    if json["status"] == "success" {
        Ok(json["data"].clone())
    } else {
        Err(format!(
            "HTTP {code}: {}: {}",
            json["errorType"].as_str().unwrap_or("?"),
            json["error"].as_str().unwrap_or(&body)
        ))
    }
}

/// Evaluates `expr` now (`/api/v1/query`): the series of its instant vector (a scalar or string
/// result is one series without labels), or Prometheus's error (a parse error, for one).
pub fn query(addr: &str, expr: &str) -> Result<Vec<Value>, String> {
    let data = api(addr, &format!("/api/v1/query?query={}", encode(expr)))?;
    match data["resultType"].as_str() {
        Some("vector" | "matrix") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
        _ => Ok(vec![
            serde_json::json!({"metric": {}, "value": data["result"]}),
        ]),
    }
}

/// The label sets of the series `selector` matches (`/api/v1/series`).
pub fn series(addr: &str, selector: &str) -> Result<Vec<Value>, String> {
    let data = api(
        addr,
        &format!("/api/v1/series?match[]={}", encode(selector)),
    )?;
    Ok(data.as_array().cloned().unwrap_or_default())
}

/// Reloads Prometheus's config and rule files (`POST /-/reload`); panics with its error when
/// it refuses them.
pub fn reload(addr: &str) {
    let (code, body) = lockgate::telemetry::http_request(addr, "POST", "/-/reload", None)
        .unwrap_or_else(|e| panic!("Prometheus at {addr}: {e}"));
    assert_eq!(code, 200, "POST /-/reload: {body}");
}

/// Polls `check` every 250 ms until it returns `Ok`, failing with the last thing it said
/// (`Err`) after `deadline`.
pub fn wait<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => assert!(
                started.elapsed() < deadline,
                "{what}: not after {deadline:?}: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Writes `text` to `path` by renaming a temporary file into place, so Prometheus, watching the
/// directory, never reads half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A scrape target registered in `targets/<job>.json`, removed again when dropped.
#[derive(Debug)]
pub struct Target {
    path: PathBuf,
}

impl Target {
    /// Registers `host:port` as a target with job label `job` (unique per test, so queries for
    /// it see only this test's series).
    pub fn register(dir: &Path, job: &str, target: &str) -> Self {
        let path = dir.join("targets").join(format!("{job}.json"));
        let group = serde_json::json!([{"targets": [target], "labels": {"job": job}}]);
        write_atomically(&path, &group.to_string());
        Self { path }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Rule files copied into `rules/` and loaded; when dropped they are removed and Prometheus
/// reloaded, so no test leaves rules behind for the next.
#[derive(Debug)]
pub struct Rules {
    addr: String,
    paths: Vec<PathBuf>,
}

impl Rules {
    /// Writes each `(name, yaml)` as `rules/<name>.yml` and reloads Prometheus.
    pub fn load(addr: &str, dir: &Path, files: &[(&str, &str)]) -> Self {
        let paths = files
            .iter()
            .map(|(name, text)| {
                let path = dir.join("rules").join(format!("{name}.yml"));
                write_atomically(&path, text);
                path
            })
            .collect();
        let rules = Self {
            addr: addr.to_owned(),
            paths,
        };
        reload(addr);
        rules
    }

    /// The path file `i` was written to (the `file` of its groups in `/api/v1/rules`).
    pub fn path(&self, i: usize) -> &Path {
        &self.paths[i]
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
        let _ = lockgate::telemetry::http_request(&self.addr, "POST", "/-/reload", None);
    }
}

/// The rule groups Prometheus loaded from `file` (`/api/v1/rules`), with their rules' state and
/// active alerts.
pub fn groups_of(addr: &str, file: &Path) -> Vec<Value> {
    let data = api(addr, "/api/v1/rules").unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
    data["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|g| g["file"].as_str() == Some(&*file.to_string_lossy()))
        .collect()
}
