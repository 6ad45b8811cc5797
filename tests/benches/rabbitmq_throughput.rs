//! Throughput of `lockgate run` (the `uppercase` guest, a RabbitMQ queue in and out, every
//! output confirmed before its delivery is acked) next to a raw lapin consumer that drains the
//! same kind of queue (manual acks, same prefetch).
//!
//! Run (needs the test broker and a release build of lockgate):
//! ```sh
//! scripts/brokers.sh start rabbitmq
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench rabbitmq_throughput
//! ```
//! Rounds alternate the arms on fresh queues; each is timed from its start to its last message
//! (lockgate: until the output queue holds them all). Compare the ratio, not absolute numbers.
//! Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use lockgate_tests::kafka::{runtime, unique};
use lockgate_tests::rabbit::{Rabbit, url};
use lockgate_tests::{Proc, guest};

const N: usize = 20_000;
const ROUNDS: usize = 3;
const PREFETCH: u16 = 1_000;

/// Messages per second a raw consumer drains `queue` at, acking each.
fn raw_drain(queue: &str) -> f64 {
    let rt = runtime();
    rt.block_on(async {
        let started = Instant::now();
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut n = 0;
        while n < N {
            let d = consumer.next().await.unwrap().unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
            n += 1;
        }
        N as f64 / started.elapsed().as_secs_f64()
    })
}

/// Messages per second `lockgate run` moves from `queue` to `out`.
fn lockgate_drain(rabbit: &Rabbit, queue: &str, out: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "[brokers.rabbit]\nkind = \"rabbitmq\"\nurl = \"{}\"\n\n[handlers.up]\nmodule = \"{}\"\nconfig = {{ target = \"{out}\" }}\n\n[routes.bench]\nhandler = \"up\"\nsource = {{ broker = \"rabbit\", topic = \"{queue}\", prefetch = {PREFETCH} }}\noutputs = [\"{out}\"]\n{}\n",
            url(),
            guest("uppercase").display(),
            std::env::var("LOCKGATE_BENCH_ROUTE").unwrap_or_default()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let _child = Command::new(lockgate_tests::lockgate_release_bin())
        .arg("run")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("LOCKGATE_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .map(Proc)
        .unwrap();
    while (rabbit.ready(out) as usize) < N {
        std::thread::sleep(Duration::from_millis(5));
    }
    N as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let rabbit = Rabbit::connect();
    let payload = "x".repeat(100);
    let messages: Vec<(Option<String>, String)> = (0..N).map(|_| (None, payload.clone())).collect();
    let (mut raw, mut lg) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (a, b, out) = (unique("bench-raw"), unique("bench-in"), unique("bench-out"));
        for q in [&a, &b, &out] {
            rabbit.declare(q);
        }
        rabbit.publish(&a, &messages);
        rabbit.publish(&b, &messages);
        if round % 2 == 0 {
            raw.push(raw_drain(&a));
            lg.push(lockgate_drain(&rabbit, &b, &out));
        } else {
            lg.push(lockgate_drain(&rabbit, &b, &out));
            raw.push(raw_drain(&a));
        }
        for q in [&a, &b, &out] {
            rabbit.delete(q);
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
    println!("{N} messages x {ROUNDS} rounds, quorum queues, 100 B payloads, prefetch {PREFETCH}");
    println!("| arm | msgs/s (median) | min..max |");
    println!("|---|---|---|");
    println!("| raw lapin consumer (ack each, drain only) | {r:.0} | {rlo:.0}..{rhi:.0} |");
    println!("| lockgate run, uppercase guest, outputs confirmed | {l:.0} | {llo:.0}..{lhi:.0} |");
    println!("| ratio lockgate / raw | {q:.2} | {qlo:.2}..{qhi:.2} |");
}
