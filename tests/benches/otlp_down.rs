//! Delivery throughput of `lockgate run` with OpenTelemetry export and the collector down
//! (issue 27: "with the OTLP receiver down, delivery throughput is unchanged"), in one run.
//!
//! Each round pre-loads the same messages into the embedded broker's topic `in` (with the
//! library's `LocalBroker`, before the run starts) and starts `lockgate run` with one route: the
//! `echo` guest (copies each message to `out`), default policies (one lane). Four arms,
//! interleaved over the rounds (each round starts with the next arm, so none is always first):
//!
//! 1. no `[telemetry.otlp]` (the baseline);
//! 2. `[telemetry.otlp]` with its `endpoint` on a port of 127.0.0.1 where nothing listens (the
//!    receiver down), default queue settings;
//! 3. `[telemetry.otlp]` with a receiver in this bench that answers 200 to every POST (it does
//!    not decode them);
//! 4. as 2 with `sampling_ratio = 0`: the layer still follows every message's spans but none is
//!    sampled, so nothing is queued or encoded; what separates the layer's own cost from the
//!    export's.
//!
//! Throughput is the messages delivered to `out` per second (`lockgate_outputs_published_total`
//! on the admin endpoint's `/metrics`, polled every 5 ms), from the first poll that shows a
//! delivered message to the poll that shows all of them: start-up (process start, compiling the
//! guest, the exporter's set-up) is left out, the same for every arm, so the rate is that of
//! delivery alone. At the end of delivery the bench reads `lockgate_otlp_spans_dropped_total` and
//! `lockgate_otlp_spans_exported_total` (three spans per message: message, attempt, handler)
//! and then times the exit after SIGTERM (lockgate waits up to 5 s for the span queue to empty).
//!
//! Run (a release build of lockgate):
//! ```sh
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench otlp_down
//! ```
//! `LOCKGATE_BIN` overrides the binary, `LOCKGATE_BENCH_MESSAGES` the messages per round. The
//! table shows the median with the min-max spread; the ratios are of the medians, with the
//! spread of the ratios of the same round. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use lockgate::broker::local::LocalBroker;
use lockgate::message::OutRecord;
use lockgate_tests::admin::{admin_addr, get, value};
use lockgate_tests::{Proc, guest, http_server, median_spread, run_logs, stop_run};

const ROUNDS: usize = 5;
/// Messages per round, unless `LOCKGATE_BENCH_MESSAGES` says otherwise.
const MESSAGES: u64 = 200_000;
/// Records per `LocalBroker::append` while pre-loading.
const CHUNK: u64 = 10_000;
const POLL: Duration = Duration::from_millis(5);
const ROUTE: &str = "bench";

#[derive(Clone, Copy)]
enum Arm {
    Off,
    Down,
    Live,
    Unsampled,
}

impl Arm {
    const ALL: [Arm; 4] = [Arm::Off, Arm::Down, Arm::Live, Arm::Unsampled];

    fn name(self) -> &'static str {
        match self {
            Arm::Off => "no `[telemetry.otlp]`",
            Arm::Down => "`[telemetry.otlp]`, receiver down (nothing listens)",
            Arm::Live => "`[telemetry.otlp]`, receiver up (answers 200)",
            Arm::Unsampled => "`[telemetry.otlp]`, receiver down, `sampling_ratio = 0`",
        }
    }
}

/// One round of one arm.
struct Sample {
    rate: f64,
    dropped: f64,
    exported: f64,
    exit_ms: f64,
}

/// An OTLP/HTTP receiver on a free port of 127.0.0.1 that reads each request and answers 200
/// with an empty body (an empty `ExportTraceServiceResponse`), on a runtime of its own.
fn receiver(rt: &tokio::runtime::Runtime) -> SocketAddr {
    http_server::serve(rt, |_| {
        |req: hyper::Request<hyper::body::Incoming>| async move {
            // Read the whole body, as a collector would, before answering.
            let _ = req.into_body().collect().await;
            http_server::respond(200, Bytes::new())
        }
    })
}

/// A port of 127.0.0.1 nothing listens on (bound, read, closed).
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write_config(dir: &Path, arm: Arm, down: SocketAddr, live: SocketAddr) -> PathBuf {
    let otlp = match arm {
        Arm::Off => String::new(),
        Arm::Down => format!("[telemetry.otlp]\nendpoint = \"http://{down}\"\n\n"),
        Arm::Live => format!("[telemetry.otlp]\nendpoint = \"http://{live}\"\n\n"),
        Arm::Unsampled => {
            format!("[telemetry.otlp]\nendpoint = \"http://{down}\"\nsampling_ratio = 0.0\n\n")
        }
    };
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"
watch = "off"

{otlp}[handlers.echo]
module = "{module}"
config = {{ target = "out" }}

[routes.{ROUTE}]
handler = "echo"
source = {{ topic = "in" }}
outputs = ["out"]
"#,
            module = guest("echo").display()
        ),
    )
    .unwrap();
    config
}

/// Appends `n` orders to the topic `in` of the embedded broker under `dir/state`.
fn preload(dir: &Path, n: u64) {
    let broker = LocalBroker::open(&dir.join("state/local")).unwrap();
    for c in 0..n.div_ceil(CHUNK) {
        let records: Vec<OutRecord> = (c * CHUNK..((c + 1) * CHUNK).min(n))
            .map(|i| OutRecord {
                topic: "in".into(),
                key: Some(format!("k{}", i % 64).into_bytes()),
                headers: Vec::new(),
                payload: format!(r#"{{"id":{i},"item":"sku-{}","qty":1}}"#, i % 1000).into_bytes(),
            })
            .collect();
        broker.append(&records).unwrap();
    }
}

/// Starts `lockgate run CONFIG` as run 1 of `dir` (stdout and stderr in `dir/run1.*`, as
/// `lockgate_tests::start_run` does) with the bench's binary.
fn start(dir: &Path, config: &Path) -> Proc {
    let log = |name: &str| std::fs::File::create(dir.join(format!("run1.{name}"))).unwrap();
    Command::new(lockgate_tests::lockgate_release_bin())
        .arg("run")
        .arg(config)
        .env("LOCKGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .map(Proc)
        .unwrap()
}

/// Unlabelled counter `name` on a metrics page (0 when absent).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn round(arm: Arm, n: u64, down: SocketAddr, live: SocketAddr) -> Sample {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = write_config(dir, arm, down, live);
    preload(dir, n);
    let mut child = start(dir, &config);
    let admin = admin_addr(&mut child, dir, 1);
    let published = || {
        value(
            &get(&admin, "/metrics").1,
            "lockgate_outputs_published_total",
            ROUTE,
        )
        .unwrap_or(0.0) as u64
    };
    let started = Instant::now();
    let mut first = None;
    let rate = loop {
        let done = published();
        let now = Instant::now();
        if done >= n {
            let (t0, p0) = first.unwrap_or((started, 0));
            break (n - p0) as f64 / now.duration_since(t0).as_secs_f64();
        }
        if done > 0 && first.is_none() {
            first = Some((now, done));
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "lockgate run exited ({status}) at {done}/{n}\n{}",
                run_logs(dir, 1)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{done}/{n} delivered after 300 s\n{}",
            run_logs(dir, 1)
        );
        std::thread::sleep(POLL);
    };
    let page = get(&admin, "/metrics").1;
    let dropped = counter(&page, "lockgate_otlp_spans_dropped_total");
    let exported = counter(&page, "lockgate_otlp_spans_exported_total");
    let stopping = Instant::now();
    stop_run(&mut child, dir, 1);
    Sample {
        rate,
        dropped,
        exported,
        exit_ms: stopping.elapsed().as_secs_f64() * 1e3,
    }
}

fn main() {
    let n: u64 = std::env::var("LOCKGATE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MESSAGES);
    let receiver_rt = http_server::runtime();
    let live = receiver(&receiver_rt);
    let down = closed_port();
    println!(
        "otlp_down: {n} messages per round through `echo` (embedded broker, one lane), {}; receiver down on {down}, up on {live}",
        lockgate_tests::lockgate_release_bin().display()
    );

    // A warm-up round (not counted): the binary and the guest into the page cache.
    round(Arm::Off, n.min(20_000), down, live);
    let mut samples: Vec<Vec<Sample>> = Arm::ALL.iter().map(|_| Vec::new()).collect();
    for r in 0..ROUNDS {
        for k in 0..Arm::ALL.len() {
            let i = (r + k) % Arm::ALL.len();
            samples[i].push(round(Arm::ALL[i], n, down, live));
        }
    }

    let field =
        |i: usize, f: fn(&Sample) -> f64| -> Vec<f64> { samples[i].iter().map(f).collect() };
    let (base, _, _) = median_spread(&field(0, |s| s.rate));
    println!();
    println!(
        "| arm | msg/s (median, min-max over {ROUNDS} rounds of {n}) | × no OTLP | spans dropped (median) | spans exported (median) | exit after SIGTERM, ms (median) |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, arm) in Arm::ALL.iter().enumerate() {
        let (rate, lo, hi) = median_spread(&field(i, |s| s.rate));
        let (dropped, _, _) = median_spread(&field(i, |s| s.dropped));
        let (exported, _, _) = median_spread(&field(i, |s| s.exported));
        let (exit, _, _) = median_spread(&field(i, |s| s.exit_ms));
        println!(
            "| {} | {rate:.0} ({lo:.0}-{hi:.0}) | {:.2} | {dropped:.0} | {exported:.0} | {exit:.0} |",
            arm.name(),
            rate / base
        );
    }
    println!();
    println!("| ratio | of medians (min-max of the same round's ratios) |");
    println!("|---|---|");
    // The issue's target is the first row: delivery unchanged with the receiver down.
    for (i, j, what, target) in [
        (
            1,
            0,
            "receiver down / no OTLP",
            " (target ≈ 1.0: unchanged)",
        ),
        (2, 0, "receiver up / no OTLP", ""),
        (1, 2, "receiver down / receiver up", ""),
        (3, 0, "receiver down, nothing sampled / no OTLP", ""),
    ] {
        let (a, _, _) = median_spread(&field(i, |s| s.rate));
        let (b, _, _) = median_spread(&field(j, |s| s.rate));
        let per_round: Vec<f64> = samples[i]
            .iter()
            .zip(&samples[j])
            .map(|(a, b)| a.rate / b.rate)
            .collect();
        let (_, lo, hi) = median_spread(&per_round);
        println!(
            "| **{what}** | **{:.2}** ({lo:.2}-{hi:.2}){target} |",
            a / b
        );
    }
    let dropped = field(1, |s| s.dropped);
    println!(
        "\nreceiver down: lockgate_otlp_spans_dropped_total at the end of delivery, per round: {dropped:?} ({} spans finished per round)",
        3 * n
    );
}
