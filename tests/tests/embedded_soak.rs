//! Soak test of the embedded broker: 3,000,000 messages through one route (`echo` guest) while
//! `lockgate run` keeps going. Its memory must level off (the duplicate window is bounded),
//! retention must keep both topics under `max_bytes`, a fresh `lockgate send` must append to
//! the long topic without reading its history, and duplicates inside the window must still be
//! dropped. Nothing may be lost on the way.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use lockgate::broker::local::LocalBroker;
use lockgate::message::{LOCKGATE_ID_HEADER, OutRecord};
use lockgate_tests::{guest, lockgate, run_logs, show, start_run, stop_run};

const TOTAL: u64 = 3_000_000;
/// Appended per call; the test is the producer (another process than the route's).
const BATCH: u64 = 10_000;
/// The producer stays at most this far ahead of the group's committed position.
const MAX_LAG: u64 = 200_000;
const SEGMENT_BYTES: u64 = 4 << 20;
const MAX_BYTES: u64 = 32 << 20;
/// Generous bound for a debug build on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(1800);

fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
state_dir = "state"

[local]
segment_bytes = {SEGMENT_BYTES}
max_bytes = {MAX_BYTES}

[handlers.echo]
module = "{}"
config = {{ target = "out" }}

[routes.soak]
handler = "echo"
source = {{ topic = "in", group = "soak" }}
outputs = ["out"]
"#,
            guest("echo").display()
        ),
    )
    .unwrap();
    config
}

fn message(i: u64) -> OutRecord {
    OutRecord {
        topic: "in".into(),
        key: None,
        headers: vec![(LOCKGATE_ID_HEADER.into(), format!("soak-{i}").into_bytes())],
        payload: format!("message {i}").into_bytes(),
    }
}

/// Resident memory of process `pid`, from /proc, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Wall time of `lockgate send ARGS -c CONFIG` (asserted to succeed) and what it printed.
fn send(dir: &Path, args: &[&str]) -> (Duration, String) {
    let mut all = vec!["send"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-c", "runtime.toml"]);
    let started = Instant::now();
    let out = lockgate(dir, &all);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", show(&out));
    (took, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn three_million_messages_keep_memory_disk_and_first_append_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let state = dir.path().join("state/local");
    // The appender decides when a segment is full: the producer uses the config's [local].
    let settings = lockgate::config::Config::load(&config).unwrap().local;
    let producer = LocalBroker::open(&state)
        .unwrap()
        .with_settings(settings.clone());
    // Another appender, as a second process would be: it shares no memory with `producer`.
    let other = LocalBroker::open(&state).unwrap().with_settings(settings);
    let started = Instant::now();
    let mut child = start_run(dir.path(), &config, 1, None, "warn");
    let pid = child.id();

    let mut produced = 0;
    let mut rss_at_1m = None;
    let mut largest = (0, 0);
    let mut polls = 0u64;
    loop {
        let committed = producer.committed("in", "soak").unwrap();
        if rss_at_1m.is_none() && committed >= 1_000_000 {
            rss_at_1m = Some((rss(pid), started.elapsed()));
        }
        if committed >= TOTAL {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "lockgate run exited ({status}) at {committed}\n{}",
                run_logs(dir.path(), 1)
            );
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {committed} of {TOTAL} consumed after {DEADLINE:?}\n{}",
            run_logs(dir.path(), 1)
        );
        if produced < TOTAL && produced - committed < MAX_LAG {
            let batch: Vec<OutRecord> = (produced..produced + BATCH).map(message).collect();
            let offsets = producer.append(&batch).unwrap();
            assert_eq!(offsets.first().copied().flatten(), Some(produced));
            if produced > 0 {
                // The previous batch's tail again, from the other appender: all in the window.
                let again: Vec<OutRecord> = (produced - 100..produced).map(message).collect();
                assert!(other.append(&again).unwrap().iter().all(Option::is_none));
            }
            produced += BATCH;
        } else {
            // The route is another process: its progress only shows in its group file.
            std::thread::sleep(Duration::from_millis(20));
        }
        polls += 1;
        if polls.is_multiple_of(25) {
            largest.0 = largest.0.max(producer.size_bytes("in").unwrap());
            largest.1 = largest.1.max(producer.size_bytes("out").unwrap());
        }
    }
    let consumed_in = started.elapsed();
    let rss_at_3m = rss(pid);
    let (rss_at_1m, at_1m) = rss_at_1m.unwrap();
    eprintln!(
        "soak: 1M consumed after {at_1m:?} (RSS {} MB), 3M after {consumed_in:?} (RSS {} MB); largest in {} MB, out {} MB",
        rss_at_1m >> 20,
        rss_at_3m >> 20,
        largest.0 >> 20,
        largest.1 >> 20
    );
    assert!(
        rss_at_3m.abs_diff(rss_at_1m) < 20 << 20,
        "RSS of lockgate run went from {} MB at 1M to {} MB at 3M",
        rss_at_1m >> 20,
        rss_at_3m >> 20
    );

    // Every message went through, once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while producer.end_offset("out").unwrap() < TOTAL {
        assert!(Instant::now() < deadline, "outputs missing");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(producer.end_offset("out").unwrap(), TOTAL);
    assert_eq!(producer.end_offset("in").unwrap(), TOTAL);

    // Retention: the outputs (appended by the run) never grew past a segment over the limit;
    // the input (appended here, consumed there) at most by what the group had not committed.
    assert!(
        largest.1 <= MAX_BYTES + SEGMENT_BYTES,
        "out reached {} bytes",
        largest.1
    );
    let lag_bytes = (MAX_LAG + 2 * BATCH) * 80;
    assert!(
        largest.0 <= MAX_BYTES + SEGMENT_BYTES + lag_bytes,
        "in reached {} bytes",
        largest.0
    );
    // Once the run's retention pass (every second) saw the final commit, both are under it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.size_bytes("in").unwrap() > MAX_BYTES
        || producer.size_bytes("out").unwrap() > MAX_BYTES
    {
        assert!(
            Instant::now() < deadline,
            "retention left in {} bytes, out {} bytes\n{}",
            producer.size_bytes("in").unwrap(),
            producer.size_bytes("out").unwrap(),
            run_logs(dir.path(), 1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Frames take more than 50 bytes: what remains is under MAX_BYTES / 50 records.
    assert!(producer.start_offset("in").unwrap() > TOTAL.saturating_sub(MAX_BYTES / 50));
    assert!(producer.start_offset("out").unwrap() > TOTAL.saturating_sub(MAX_BYTES / 50));

    // A fresh `lockgate send` appends to the 3M-message topic about as fast as to a new one:
    // it reads the dedup file, not the log. Best of three each, so a busy machine does not
    // decide; process start (the same for both) is what the new topic measures.
    let mut long = Duration::MAX;
    let mut short = Duration::MAX;
    for k in 0..3u64 {
        let id = format!("lockgate-id=fresh-{k}");
        let (took, out) = send(dir.path(), &["in", "late", "-H", &id]);
        assert!(
            out.contains(&format!("appended 1 message at offset {}", TOTAL + k)),
            "{out}"
        );
        long = long.min(took);
        let (took, _) = send(dir.path(), &[&format!("new-{k}"), "first"]);
        short = short.min(took);
    }
    eprintln!(
        "soak: first append of a fresh `lockgate send`: {long:?} to `in`, {short:?} to a new topic"
    );
    assert!(
        long.saturating_sub(short) < Duration::from_millis(100),
        "a fresh send to the long topic took {long:?}, to a new one {short:?}"
    );
    // Duplicates inside the window are still dropped, for a fresh process too.
    let (_, out) = send(dir.path(), &["in", "again", "-H", "lockgate-id=fresh-1"]);
    assert!(out.contains("nothing appended"), "{out}");
    let last = format!("lockgate-id=soak-{}", TOTAL - 1);
    let (_, out) = send(dir.path(), &["in", "again", "-H", &last]);
    assert!(out.contains("nothing appended"), "{out}");

    stop_run(&mut child, dir.path(), 1);
    eprintln!("soak: whole test {:?}", started.elapsed());
}
