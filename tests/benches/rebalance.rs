//! What a deploy costs: three `lockgate run` processes share a Kafka group on a 6-partition
//! topic that a producer keeps feeding (one message per partition every 20 ms); one process is
//! restarted (SIGTERM, then started again, as a rolling deploy does) and we measure the time
//! from the stop until every partition has been consumed again, i.e. until each partition has
//! an output for a message produced after the stop. Four variants: with and without static
//! membership (`group.instance.id`), eager (`range`) vs `cooperative-sticky` assignment.
//!
//! Run (needs the test broker and a release build of lockgate):
//! ```sh
//! scripts/brokers.sh start kafka
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench rebalance
//! ```
//! Not a test: nothing is asserted. One round per variant; the machine is noisy.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockgate_tests::kafka::{Tail, bootstrap, create_topics, runtime, unique};
use lockgate_tests::{Proc, guest};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const PARTITIONS: i32 = 6;
const PROCESSES: usize = 3;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Feeds every partition of `topic` every 20 ms until dropped.
struct Feeder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Feeder {
    fn start(topic: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, topic) = (stop.clone(), topic.to_owned());
        let thread = std::thread::spawn(move || {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", bootstrap())
                .set("linger.ms", "1")
                .create()
                .unwrap();
            let mut i = 0u64;
            while !flag.load(Ordering::SeqCst) {
                for p in 0..PARTITIONS {
                    let payload = format!(r#"{{"id":{i},"p":{p},"t":{}}}"#, now_ms());
                    let _ = producer.send(
                        BaseRecord::<(), _>::to(&topic)
                            .partition(p)
                            .payload(&payload),
                    );
                    i += 1;
                }
                producer.poll(Duration::ZERO);
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = producer.flush(Duration::from_secs(5));
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_config(
    dir: &Path,
    slot: usize,
    input: &str,
    out: &str,
    group: &str,
    props: &str,
) -> PathBuf {
    let config = dir.join(format!("slot{slot}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state{slot}"
shutdown_grace_ms = 5000

[brokers.kafka]
kind = "kafka"
bootstrap_servers = "{bootstrap}"
consumer_properties = {{ "session.timeout.ms" = 10000{props} }}

[handlers.chaos]
module = "{module}"
config = {{ target = "{out}" }}

[routes.feed]
handler = "chaos"
source = {{ broker = "kafka", topic = "{input}", group = "{group}" }}
outputs = ["{out}"]
concurrency = 2
"#,
            bootstrap = bootstrap(),
            module = guest("chaos").display(),
        ),
    )
    .unwrap();
    config
}

fn spawn(config: &Path) -> Proc {
    Command::new(lockgate_tests::lockgate_release_bin())
        .arg("run")
        .arg(config)
        .env("LOCKGATE_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(Proc)
        .unwrap()
}

/// Reads outputs until, for every partition, one produced at or after `since_ms` arrived;
/// returns when that happened (or `None` after `limit`).
fn until_all_partitions_since(tail: &mut Tail, since_ms: u64, limit: Duration) -> Option<Instant> {
    let started = Instant::now();
    let mut fresh = [false; PARTITIONS as usize];
    while started.elapsed() < limit {
        let before = tail.got.len();
        tail.drain(Duration::from_millis(20));
        for (_, g) in &tail.got[before..] {
            let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
            if v["t"].as_u64().unwrap() >= since_ms {
                fresh[v["p"].as_u64().unwrap() as usize] = true;
            }
        }
        if fresh.iter().all(|f| *f) {
            return Some(Instant::now());
        }
    }
    None
}

/// Seconds from stopping one process until every partition flows again.
fn variant(static_membership: bool, strategy: &str) -> Option<f64> {
    let rt = runtime();
    let base = unique("rebal");
    let (input, out, group) = (
        format!("{base}.in"),
        format!("{base}.out"),
        format!("{base}.group"),
    );
    create_topics(&rt, &[(&input, PARTITIONS), (&out, 3)]);
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = (0..PROCESSES)
        .map(|slot| {
            let mut props = format!(r#", "partition.assignment.strategy" = "{strategy}""#);
            if static_membership {
                props.push_str(&format!(r#", "group.instance.id" = "{base}-{slot}""#));
            }
            write_config(dir.path(), slot, &input, &out, &group, &props)
        })
        .collect();
    let _feeder = Feeder::start(&input);
    let mut tail = Tail::new(&[(&out, 3)]);
    let mut procs: Vec<Proc> = configs.iter().map(|c| spawn(c)).collect();
    // Steady state: all partitions flowing with all three members in.
    std::thread::sleep(Duration::from_secs(12));
    until_all_partitions_since(&mut tail, now_ms(), Duration::from_secs(60))?;

    // The deploy of one process: stop it, start the new version.
    let stopped_at = Instant::now();
    let since = now_ms();
    lockgate_tests::signal(&procs[1], "TERM");
    procs[1].wait().unwrap();
    procs[1] = spawn(&configs[1]);
    let flowing = until_all_partitions_since(&mut tail, since, Duration::from_secs(90))?;
    let took = flowing.duration_since(stopped_at).as_secs_f64();
    for p in &procs {
        lockgate_tests::signal(p, "TERM");
    }
    for p in &mut procs {
        let _ = p.wait();
    }
    Some(took)
}

fn main() {
    println!(
        "Restart of 1 of 3 processes, 6 partitions: time until every partition is consumed again"
    );
    println!("| assignment | static membership | seconds |");
    println!("|---|---|---|");
    for strategy in ["range", "cooperative-sticky"] {
        for static_membership in [false, true] {
            let took = variant(static_membership, strategy);
            println!(
                "| {} | {} | {} |",
                if strategy == "range" {
                    "eager (range)"
                } else {
                    strategy
                },
                if static_membership { "yes" } else { "no" },
                took.map_or("did not recover in 90 s".to_owned(), |t| format!("{t:.1}"))
            );
        }
    }
}
