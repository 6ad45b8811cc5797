//! Throughput of `lockgate run` (the `uppercase` guest, JetStream in and out, every output's
//! PubAck awaited before its message is acked) next to a raw async-nats JetStream pull consumer
//! that drains the same stream and acks each message (the least an at-least-once consumer does).
//!
//! Run (needs the test server and a release build of lockgate):
//! ```sh
//! scripts/brokers.sh start nats
//! cargo build --release -p lockgate --bin lockgate
//! cargo bench -p lockgate-tests --bench nats_throughput
//! ```
//! `LOCKGATE_BIN` overrides the binary; `LOCKGATE_BENCH_ROUTE` adds lines to the route table.
//! Rounds alternate the two arms on fresh streams; each arm is timed from its start (process
//! start and consumer creation included) to its last message. The table shows the median rate
//! and the min-max spread; compare the ratio, not absolute numbers. Not a test: nothing is
//! asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use lockgate_tests::kafka::unique;
use lockgate_tests::nats::{Nats, url};
use lockgate_tests::{Proc, guest};

const N: usize = 20_000;
const ROUNDS: usize = 3;

/// A new durable pull consumer of `stream` with explicit acks, as its message stream.
async fn pull(nats: &Nats, stream: &str) -> consumer::pull::Stream {
    jetstream::new(nats.client.clone())
        .get_stream(stream)
        .await
        .unwrap()
        .create_consumer(consumer::pull::Config {
            durable_name: Some(unique("raw").replace('-', "_")),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap()
}

/// Messages per second a durable pull consumer drains `stream` at, acking each.
fn raw_drain(nats: &Nats, stream: &str) -> f64 {
    nats.block_on(async {
        let started = Instant::now();
        let mut messages = pull(nats, stream).await;
        let mut n = 0;
        while n < N {
            let m = messages.next().await.unwrap().unwrap();
            m.ack().await.unwrap();
            n += 1;
        }
        N as f64 / started.elapsed().as_secs_f64()
    })
}

/// Messages per second a raw async-nats program does lockgate's job at: consume, upper-case,
/// publish each output to JetStream, await the PubAcks of a batch of 200, then ack the batch.
fn raw_pipeline(nats: &Nats, stream: &str, out: &str) -> f64 {
    nats.block_on(async {
        let started = Instant::now();
        let js = jetstream::new(nats.client.clone());
        let mut messages = pull(nats, stream).await;
        for _ in 0..N / 200 {
            let mut batch = Vec::with_capacity(200);
            let mut acks = Vec::with_capacity(200);
            for _ in 0..200 {
                let m = messages.next().await.unwrap().unwrap();
                let upper = String::from_utf8_lossy(&m.payload).to_uppercase();
                acks.push(js.publish(out.to_owned(), upper.into()).await.unwrap());
                batch.push(m);
            }
            for a in acks {
                a.await.unwrap();
            }
            for m in batch {
                m.ack().await.unwrap();
            }
        }
        N as f64 / started.elapsed().as_secs_f64()
    })
}

/// Messages per second `lockgate run` handles `subject` at: from its start until the output
/// stream holds every output.
fn lockgate_drain(nats: &Nats, stream: &str, subject: &str, out_stream: &str, out: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "[brokers.nats]\nkind = \"nats\"\nservers = [\"{}\"]\n\n[handlers.up]\nmodule = \"{}\"\nconfig = {{ target = \"{out}\" }}\n\n[routes.bench]\nhandler = \"up\"\nsource = {{ broker = \"nats\", topic = \"{subject}\", group = \"{}\", stream = \"{stream}\" }}\noutputs = [\"{out}\"]\nconcurrency = 2\n{}\n",
            url(),
            guest("uppercase").display(),
            unique("bench").replace('-', "_"),
            std::env::var("LOCKGATE_BENCH_ROUTE").unwrap_or_default()
        ),
    )
    .unwrap();
    let started = Instant::now();
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
    // Polling the stream's count every 5 ms bounds the timing error to 5 ms per round. The
    // clock starts at the first output: process start and compiling the guest (a few hundred
    // ms without the compile cache) are not throughput.
    let mut first = None;
    loop {
        let n = nats.count(out_stream);
        if n > 0 && first.is_none() {
            first = Some((Instant::now(), n));
        }
        if n >= N as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (t0, n0) = first.unwrap_or((started, 0));
    eprintln!(
        "lockgate: first output after {:.0} ms",
        (t0 - started).as_secs_f64() * 1e3
    );
    (N as u64 - n0) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let nats = Nats::connect();
    let payload = "x".repeat(100);
    let (mut raw, mut rawp, mut lg) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let tag = unique("b").replace('-', "_");
        let (stream, subject) = (format!("BIN_{tag}"), format!("bin.{tag}"));
        let (out_stream, out) = (format!("BOUT_{tag}"), format!("bout.{tag}"));
        nats.create_stream(&stream, &[&subject]);
        nats.create_stream(&out_stream, &[&out]);
        let raw_out = format!("rout.{tag}");
        nats.create_stream(&format!("ROUT_{tag}"), &[&raw_out]);
        let messages: Vec<(String, Option<String>, String)> = (0..N)
            .map(|i| {
                (
                    subject.clone(),
                    Some(format!("k{}", i % 64)),
                    payload.clone(),
                )
            })
            .collect();
        nats.publish(&messages);
        // Alternate which arm goes first.
        if round % 2 == 0 {
            raw.push(raw_drain(&nats, &stream));
            rawp.push(raw_pipeline(&nats, &stream, &raw_out));
            lg.push(lockgate_drain(&nats, &stream, &subject, &out_stream, &out));
        } else {
            lg.push(lockgate_drain(&nats, &stream, &subject, &out_stream, &out));
            rawp.push(raw_pipeline(&nats, &stream, &raw_out));
            raw.push(raw_drain(&nats, &stream));
        }
        eprintln!(
            "round {round}: raw drain {:.0}/s, raw pipeline {:.0}/s, lockgate {:.0}/s",
            raw[round], rawp[round], lg[round]
        );
    }
    let ratios: Vec<f64> = lg.iter().zip(&raw).map(|(l, r)| l / r).collect();
    let ratios_p: Vec<f64> = lg.iter().zip(&rawp).map(|(l, r)| l / r).collect();
    let (r, rlo, rhi) = lockgate_tests::median_spread(&raw);
    let (p, plo, phi) = lockgate_tests::median_spread(&rawp);
    let (l, llo, lhi) = lockgate_tests::median_spread(&lg);
    let (q, qlo, qhi) = lockgate_tests::median_spread(&ratios);
    let (qp, qplo, qphi) = lockgate_tests::median_spread(&ratios_p);
    println!("{N} messages x {ROUNDS} rounds, JetStream file streams, 100 B payloads, 64 keys");
    println!("| arm | msgs/s (median) | min..max |");
    println!("|---|---|---|");
    println!(
        "| raw async-nats pull consumer, explicit ack per message | {r:.0} | {rlo:.0}..{rhi:.0} |"
    );
    println!(
        "| raw async-nats doing the same job (upper-case, publish, PubAcks awaited per 200, ack) | {p:.0} | {plo:.0}..{phi:.0} |"
    );
    println!("| lockgate run, uppercase guest, outputs awaited | {l:.0} | {llo:.0}..{lhi:.0} |");
    println!("| ratio lockgate / raw drain | {q:.2} | {qlo:.2}..{qhi:.2} |");
    println!("| ratio lockgate / raw doing the same job | {qp:.2} | {qplo:.2}..{qphi:.2} |");
}
