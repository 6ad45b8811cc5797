//! Throughput of `lockgate run` (the `uppercase` guest, Kafka in and out, every output awaited
//! before its message is done) next to a raw rdkafka consumer that only drains the same topic.
//!
//! Run (needs the test broker and a release build of lockgate):
//! ```sh
//! scripts/brokers.sh start kafka
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench kafka_throughput
//! ```
//! `LOCKGATE_BIN` overrides the binary (default: `release/lockgate` beside this bench's target);
//! `LOCKGATE_BENCH_ROUTE` adds lines to the route table (e.g. `max_batch = 256`).
//! Rounds alternate the two arms on fresh topics; each arm is timed from its start (so both
//! include a consumer-group join, about 3 s on tansu) to its last message. The table shows the median rate and the min-max spread;
//! compare the ratio, not absolute numbers. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use lockgate_tests::kafka::{bootstrap, create_topics, produce, runtime, unique};
use lockgate_tests::{Proc, guest};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};

const N: usize = 20_000;
const ROUNDS: usize = 3;

/// Messages per second a group consumer drains `topic` at, from subscribing (group join
/// included) to its last message.
fn raw_drain(topic: &str) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("raw"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    let started = Instant::now();
    consumer.subscribe(&[topic]).unwrap();
    let mut n = 0;
    while n < N {
        if let Some(m) = consumer.poll(Duration::from_millis(500)) {
            m.unwrap();
            n += 1;
        }
    }
    N as f64 / started.elapsed().as_secs_f64()
}

/// Messages per second `lockgate run` handles `topic` at: from its start (group join included)
/// to the broker timestamp of its last output.
fn lockgate_drain(topic: &str, out: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\nconsumer_properties = {{ \"session.timeout.ms\" = 6000 }}\n\n[handlers.up]\nmodule = \"{}\"\nconfig = {{ target = \"{out}\" }}\n\n[routes.bench]\nhandler = \"up\"\nsource = {{ broker = \"kafka\", topic = \"{topic}\", group = \"{}\" }}\noutputs = [\"{out}\"]\nconcurrency = 3\n{}\n",
            bootstrap(),
            guest("uppercase").display(),
            unique("bench"),
            std::env::var("LOCKGATE_BENCH_ROUTE").unwrap_or_default()
        ),
    )
    .unwrap();
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let _child = Command::new(lockgate_tests::lockgate_release_bin())
        .arg("run")
        .arg(&config)
        .env(
            "LOCKGATE_LOG",
            std::env::var("LOCKGATE_BENCH_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(Proc)
        .unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[out]).unwrap();
    let mut hi = i64::MIN;
    let mut n = 0;
    while n < N {
        if let Some(m) = consumer.poll(Duration::from_millis(500)) {
            let m = m.unwrap();
            if let Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) = m.timestamp() {
                hi = hi.max(t);
            }
            n += 1;
        }
    }
    N as f64 / ((hi - started_ms).max(1) as f64 / 1000.0)
}

fn main() {
    let rt = runtime();
    let payload = "x".repeat(100);
    let messages: Vec<(String, String)> = (0..N)
        .map(|i| (format!("k{}", i % 64), payload.clone()))
        .collect();
    let (mut raw, mut lg) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let topic = unique("bench-in");
        let out = unique("bench-out");
        create_topics(&rt, &[(&topic, 3), (&out, 3)]);
        produce(&rt, &topic, &messages);
        // Alternate which arm goes first.
        if round % 2 == 0 {
            raw.push(raw_drain(&topic));
            lg.push(lockgate_drain(&topic, &out));
        } else {
            lg.push(lockgate_drain(&topic, &out));
            raw.push(raw_drain(&topic));
        }
        eprintln!(
            "round {round}: raw {:.0}/s, lockgate {:.0}/s",
            raw[round], lg[round]
        );
    }
    let ratios: Vec<f64> = lg.iter().zip(&raw).map(|(l, r)| l / r).collect();
    let (r, rlo, rhi) = lockgate_tests::median_spread(&raw);
    let (l, llo, lhi) = lockgate_tests::median_spread(&lg);
    let (q, qlo, qhi) = lockgate_tests::median_spread(&ratios);
    println!("{N} messages x {ROUNDS} rounds, 3 partitions, 100 B payloads");
    println!("| arm | msgs/s (median) | min..max |");
    println!("|---|---|---|");
    println!("| raw rdkafka consumer (drain only) | {r:.0} | {rlo:.0}..{rhi:.0} |");
    println!("| lockgate run, uppercase guest, outputs awaited | {l:.0} | {llo:.0}..{lhi:.0} |");
    println!("| ratio lockgate / raw | {q:.2} | {qlo:.2}..{qhi:.2} |");
}
