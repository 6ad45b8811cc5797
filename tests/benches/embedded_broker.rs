//! The embedded broker over a long run: 3,000,000 messages through one route (`echo` guest),
//! fed by `lockgate send --file` in calls of 10,000 while `lockgate run` consumes. Prints the
//! RSS of `lockgate run` after 1M and after all messages, the first append of a fresh
//! `lockgate send` (one message with a `lockgate-id`) to the long topic next to one to a new
//! topic, after 1M and after all messages, the producer's and the route's rates, and the disk
//! the two topics take.
//!
//! Run (a release build of lockgate):
//! ```sh
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench embedded_broker
//! ```
//! `LOCKGATE_BIN` overrides the binary, `LOCKGATE_BENCH_MESSAGES` the count. For a lockgate from
//! before segments (which refuses the `[local]` table), `LOCKGATE_BENCH_NO_LOCAL=1` leaves it
//! out. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockgate_tests::{Proc, guest, median_spread};

/// Messages per `lockgate send --file`.
const CHUNK: u64 = 10_000;
/// The producer stays at most this far ahead of the route's committed position.
const MAX_LAG: u64 = 200_000;
const SEGMENT_BYTES: u64 = 16 << 20;
const MAX_BYTES: u64 = 128 << 20;

fn bin() -> PathBuf {
    lockgate_tests::lockgate_release_bin()
}

/// Resident memory of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

fn committed(dir: &Path) -> u64 {
    std::fs::read(dir.join("state/local/topics/in/groups/bench"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["offset"].as_u64())
        .unwrap_or(0)
}

/// Bytes of a topic's log files (segments, or the single file of a lockgate before them).
fn topic_bytes(dir: &Path, topic: &str) -> u64 {
    let t = dir.join("state/local/topics").join(topic);
    let mut files: Vec<PathBuf> = std::fs::read_dir(t.join("segments"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.push(t.join("log"));
    files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Wall time of `lockgate send ARGS` in `dir`.
fn send(dir: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let out = Command::new(bin())
        .current_dir(dir)
        .arg("send")
        .args(args)
        .env("LOCKGATE_LOG", "error")
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{out:?}");
    took
}

/// Median (min..max) of five fresh sends of one message with a new `lockgate-id` to `in`, and
/// the same to new topics; milliseconds.
fn first_appends(dir: &Path, round: &str) -> ((f64, f64, f64), (f64, f64, f64)) {
    let mut long = Vec::new();
    let mut new = Vec::new();
    for k in 0..5 {
        let id = format!("lockgate-id=probe-{round}-{k}");
        long.push(send(dir, &["in", "probe", "-H", &id]).as_secs_f64() * 1e3);
        let topic = format!("new-{round}-{k}");
        new.push(send(dir, &[&topic, "probe", "-H", &id]).as_secs_f64() * 1e3);
    }
    (median_spread(&long), median_spread(&new))
}

fn main() {
    let total: u64 = std::env::var("LOCKGATE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000);
    let local = std::env::var_os("LOCKGATE_BENCH_NO_LOCAL").is_none();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut config = "version = 1\n[runtime]\nstate_dir = \"state\"\n".to_owned();
    if local {
        write!(
            config,
            "[local]\nsegment_bytes = {SEGMENT_BYTES}\nmax_bytes = {MAX_BYTES}\n"
        )
        .unwrap();
    }
    write!(
        config,
        "[handlers.echo]\nmodule = \"{}\"\nconfig = {{ target = \"out\" }}\n[routes.bench]\nhandler = \"echo\"\nsource = {{ topic = \"in\", group = \"bench\" }}\noutputs = [\"out\"]\n",
        guest("echo").display()
    )
    .unwrap();
    std::fs::write(dir.join("runtime.toml"), config).unwrap();
    let chunks = total.div_ceil(CHUNK);
    for c in 0..chunks {
        let mut text = String::new();
        for i in c * CHUNK..((c + 1) * CHUNK).min(total) {
            writeln!(
                text,
                r#"{{"payload": "message {i}", "headers": {{"lockgate-id": "bench-{i}"}}}}"#
            )
            .unwrap();
        }
        std::fs::write(dir.join(format!("chunk-{c}.jsonl")), text).unwrap();
    }
    println!(
        "embedded broker: {total} messages through `echo`, {} ({})",
        bin().display(),
        if local {
            format!(
                "segments of {} MiB, max_bytes {} MiB",
                SEGMENT_BYTES >> 20,
                MAX_BYTES >> 20
            )
        } else {
            "no [local] table".to_owned()
        }
    );

    let started = Instant::now();
    let mut child = Proc(
        Command::new(bin())
            .current_dir(dir)
            .args(["run", "runtime.toml"])
            .env("LOCKGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("run.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.id();
    let mut produced = 0;
    let mut send_time = Duration::ZERO;
    let mut sends = Vec::new();
    let mut at_1m = None;
    let mut largest = 0;
    loop {
        let done = committed(dir);
        if at_1m.is_none() && done >= total.min(1_000_000) {
            let rss = rss_mib(pid);
            let appends = first_appends(dir, "1m");
            at_1m = Some((rss, started.elapsed(), appends));
        }
        if done >= total {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "lockgate run exited");
        if produced < total && produced - done.min(produced) < MAX_LAG {
            let file = format!("chunk-{}.jsonl", produced / CHUNK);
            let took = send(dir, &["in", "--file", &file, "-c", "runtime.toml"]);
            send_time += took;
            sends.push(took.as_secs_f64() * 1e3);
            produced = (produced + CHUNK).min(total);
            largest = largest.max(topic_bytes(dir, "in") + topic_bytes(dir, "out"));
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let elapsed = started.elapsed();
    let rss_end = rss_mib(pid);
    let appends_end = first_appends(dir, "end");
    let (rss_1m, t_1m, appends_1m) = at_1m.unwrap();
    let (send_med, send_min, send_max) = median_spread(&sends);
    println!("| figure | after 1M | after {}M |", total as f64 / 1e6);
    println!("|---|---|---|");
    println!("| RSS of lockgate run | {rss_1m:.0} MiB | {rss_end:.0} MiB |");
    for (name, a, b) in [
        (
            "fresh send of 1 message to `in`, ms",
            appends_1m.0,
            appends_end.0,
        ),
        (
            "fresh send of 1 message to a new topic, ms",
            appends_1m.1,
            appends_end.1,
        ),
    ] {
        println!(
            "| {name} | {:.1} ({:.1}..{:.1}) | {:.1} ({:.1}..{:.1}) |",
            a.0, a.1, a.2, b.0, b.1, b.2
        );
    }
    println!(
        "| route throughput, msg/s | {:.0} | {:.0} |",
        total.min(1_000_000) as f64 / t_1m.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "producer: `lockgate send --file` of {CHUNK}: median {send_med:.0} ms ({send_min:.0}..{send_max:.0}), {:.0} msg/s while sending",
        total as f64 / send_time.as_secs_f64()
    );
    println!(
        "disk: in {} MiB, out {} MiB at the end; both topics together at most {} MiB during the run",
        topic_bytes(dir, "in") >> 20,
        topic_bytes(dir, "out") >> 20,
        largest >> 20
    );
    lockgate_tests::signal(&child, "TERM");
    let _ = child.wait();
}
