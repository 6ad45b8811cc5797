//! Hot-reload swap latency: from `write()` of a new module version returning to the running
//! route serving that version (its `/status` shows the new module hash; the next message runs
//! on it). Alternates two versions of a handler, with the compiled-artefact cache (both versions
//! compiled once before) and without it (`[engine] cache = false`: every swap compiles).
//!
//! Run (a release build of lockgate):
//! ```sh
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench reload_latency
//! ```
//! Rows: the Rust guests `chaos` <-> `uppercase`; and, when `scripts/build-guest-python.sh` has
//! built them, the Python guests `router` <-> `hostile` (`LOCKGATE_GUEST_OUT`, default
//! `~/.cache/lockgate/guests`). `LOCKGATE_BIN` overrides the binary. Not a test: nothing is
//! asserted. The time includes the file event, reading and hashing the module, loading it (from
//! the cache or compiling), one check instantiation, the swap, and the polling of `/status`
//! (about 0.2 ms per request).

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockgate_tests::{Proc, guest};
use sha2::Digest as _;

const SWAPS: usize = 40;

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))[..12].to_owned()
}

/// Swap latencies for `swaps` alternations between `a` and `b`.
fn measure(a: &Path, b: &Path, cache: bool, swaps: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("handler.wasm");
    let versions = [std::fs::read(a).unwrap(), std::fs::read(b).unwrap()];
    std::fs::write(&module, &versions[0]).unwrap();
    std::fs::write(
        dir.path().join("runtime.toml"),
        format!(
            "[runtime]\nstate_dir = \"state\"\nadmin = \"127.0.0.1:0\"\n[engine]\ncache = {cache}\n[handlers.h]\nmodule = \"handler.wasm\"\nconfig = {{ target = \"out\", default = \"out\" }}\n[routes.r]\nhandler = \"h\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\n"
        ),
    )
    .unwrap();
    let stdout = dir.path().join("stdout");
    let mut child = Proc(
        Command::new(lockgate_tests::lockgate_release_bin())
            .current_dir(dir.path())
            .arg("run")
            .env("LOCKGATE_LOG", "warn")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = loop {
        let text = std::fs::read_to_string(&stdout).unwrap_or_default();
        if let Some(a) = text
            .split("admin endpoint on http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            && text.contains("started")
        {
            break a.to_owned();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "lockgate exited: {text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let serving = |hash: &str| {
        lockgate::telemetry::http_get(&addr, "/status")
            .map(|(_, body)| body.contains(hash))
            .unwrap_or(false)
    };
    // Two warm-up swaps: with the cache on, both versions are compiled and cached after them.
    let mut out = Vec::new();
    for i in 0..swaps + 2 {
        let next = &versions[(i + 1) % 2];
        let want = short_hash(next);
        let started = Instant::now();
        std::fs::write(&module, next).unwrap();
        while !serving(&want) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "swap {i} never happened"
            );
        }
        if i >= 2 {
            out.push(started.elapsed());
        }
    }
    drop(child);
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, cache: bool, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {} |",
        if cache { "cached" } else { "compiled" },
        ms(p(0.5)),
        ms(p(0.99)),
        ms(v[v.len() - 1]),
        v.len()
    );
}

fn main() {
    let python = std::env::var_os("LOCKGATE_GUEST_OUT")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lockgate/guests"))
        })
        .map(|d| d.join("python"));
    let mut pairs: Vec<(&str, PathBuf, PathBuf, usize)> = vec![(
        "Rust (chaos <-> uppercase)",
        guest("chaos"),
        guest("uppercase"),
        SWAPS,
    )];
    if let Some(py) = python
        && py.join("router.wasm").is_file()
        && py.join("hostile.wasm").is_file()
    {
        pairs.push((
            "Python (router <-> hostile)",
            py.join("router.wasm"),
            py.join("hostile.wasm"),
            SWAPS / 4,
        ));
    } else {
        eprintln!("(no Python guests built: scripts/build-guest-python.sh adds that row)");
    }
    println!("| guest | cache | p50 ms | p99 ms | max ms | swaps |");
    println!("|---|---|---|---|---|---|");
    for (name, a, b, swaps) in pairs {
        for cache in [true, false] {
            row(name, cache, measure(&a, &b, cache, swaps));
        }
    }
}
