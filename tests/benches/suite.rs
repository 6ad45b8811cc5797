//! The performance suite: one table of ratios measured in one run, arms interleaved over several
//! rounds (median and min-max), for the in-process costs of lockgate. The broker rows are the
//! `kafka_throughput` bench (it needs a broker and a release binary).
//!
//! 1. A call: the `uppercase` guest on a reused instance vs a native closure doing the same work,
//!    and a core-wasm no-op call (the floor of crossing into wasm at all).
//! 2. A fresh instance per message vs a reused one, pooling allocator on and off.
//! 3. The pipeline (in-memory broker, one lane): the guest vs a native closure, idempotency off
//!    and on; and the pipeline's own cost per message.
//! 4. Payload size: 100 B, 4 KiB, 64 KiB and 1 MiB through `uppercase` (in and out of the guest
//!    through the canonical ABI), as bandwidth.
//! 5. Concurrency: one lane vs two lanes on the 2-core machine.
//! 6. Memory: resident set per live (reused) instance, for 1, 100 and 1000 instances.
//!
//! Run: `cargo bench -p lockgate-tests --bench suite`. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::broker::memory::MemoryBroker;
use lockgate::config::Config;
use lockgate::config::Isolation;
use lockgate::engine::{
    Engine, EngineSettings, HandlerLimits, InboundMessage, InstancePool, Invocation, Outcome,
    OutgoingMessage,
};
use lockgate::message::OutRecord;
use lockgate::pipeline::idempotency::DoneKeys;
use lockgate::pipeline::{Invoker, Route, RouteSinks, Shutdown};
use lockgate::state::{LocalClaims, MemoryStore};
use lockgate_tests::{guest, handler_env};

const ROUNDS: usize = 5;

/// Nanoseconds per call.
fn per_call(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

/// Runs every arm `ROUNDS` times, interleaved, after a warm-up; returns the samples per arm.
/// A measured arm: a name and a closure returning one sample.
type Arm<'a> = (&'static str, Box<dyn FnMut() -> f64 + 'a>);

fn interleave(arms: &mut [Arm<'_>]) -> Vec<Vec<f64>> {
    for (_, f) in arms.iter_mut() {
        f();
    }
    let mut samples = vec![Vec::new(); arms.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in arms.iter_mut().enumerate() {
            samples[i].push(f());
        }
    }
    samples
}

fn row(what: &str, value: String, spread: String, ratio: String, target: &str) {
    println!("| {what} | {value} | {spread} | {ratio} | {target} |");
}

fn message(payload: Vec<u8>) -> InboundMessage {
    InboundMessage {
        id: "bench/1".into(),
        topic: "in".into(),
        payload,
        attempt: 1,
        ..InboundMessage::default()
    }
}

fn engine(pooling: bool, keep_resident_bytes: usize) -> Engine {
    Engine::new(&EngineSettings {
        pooling,
        max_instances: 2_000,
        keep_resident_bytes,
        ..EngineSettings::default()
    })
    .unwrap()
}

fn uppercase_pool(engine: &Engine, isolation: Isolation, limits: HandlerLimits) -> InstancePool {
    guest_pool(engine, "uppercase", isolation, limits)
}

/// `uppercase` does work per byte; `echo` only copies, so its rows are the crossing alone.
fn guest_pool(
    engine: &Engine,
    name: &str,
    isolation: Isolation,
    limits: HandlerLimits,
) -> InstancePool {
    let env = handler_env(name, &[("target", "out")], limits);
    let handler = engine.load_handler(&guest(name), env).unwrap();
    InstancePool::new(handler, isolation, u64::MAX)
}

fn native_uppercase(m: &InboundMessage) -> Vec<OutgoingMessage> {
    let text = std::str::from_utf8(&m.payload).unwrap();
    vec![OutgoingMessage {
        topic: "out".into(),
        key: m.key.clone(),
        headers: m.headers.clone(),
        payload: text.to_uppercase().into_bytes(),
    }]
}

/// The native closure as an invoker, for the pipeline arms.
struct Native;

impl Invoker for Native {
    fn invoke(&self, message: &InboundMessage) -> Invocation {
        let start = Instant::now();
        let outputs = native_uppercase(message);
        Invocation {
            outcome: Outcome::Ok { outputs },
            logs: Vec::new(),
            dropped_logs: 0,
            refused_outputs: 0,
            elapsed: start.elapsed(),
            kv_writes: None,
            http: Vec::new(),
            sql: None,
        }
    }

    fn handler_name(&self) -> String {
        "native".into()
    }

    fn module_hash(&self) -> String {
        "native".into()
    }
}

/// Messages per second through a route on the in-memory broker.
fn route_rate(
    rt: &tokio::runtime::Runtime,
    invoker: Arc<dyn Invoker>,
    n: u64,
    lanes: u32,
    idempotency: bool,
    payload_bytes: usize,
) -> f64 {
    let extra = if idempotency {
        "idempotency = { key = \"header:id\" }\n"
    } else {
        ""
    };
    let text = format!(
        "[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\nconcurrency = {lanes}\nordering = \"key\"\n{extra}"
    );
    let config = Config::parse(Path::new("bench.toml"), &text)
        .unwrap()
        .routes["r"]
        .clone();
    rt.block_on(async {
        let broker = MemoryBroker::new();
        broker.produce(
            "in",
            (0..n).map(|i| OutRecord {
                topic: "in".into(),
                key: Some(format!("k{}", i % 64).into_bytes()),
                headers: vec![("id".into(), i.to_string().into_bytes())],
                payload: b"the quick brown fox jumps over the lazy dog, 0123456789 -- lockgate bench payload!!"
                    .iter()
                    .copied()
                    .cycle()
                    .take(payload_bytes)
                    .collect(),
            }),
        );
        let sink: Arc<dyn lockgate::broker::Sink> = Arc::new(broker.sink());
        let done_keys = idempotency.then(|| {
            DoneKeys::new(
                Arc::new(LocalClaims::new(Arc::new(MemoryStore::new()))),
                "r",
                Duration::from_secs(3600),
                Duration::from_secs(30),
            )
        });
        let route = Route::new(
            config,
            invoker,
            RouteSinks {
                outputs: sink.clone(),
                dlq: sink,
                replies: None,
            },
            done_keys,
        );
        let (trigger, shutdown) = Shutdown::new();
        let start = Instant::now();
        let task = tokio::spawn(route.run(Box::new(broker.source("in", "g")), shutdown));
        // Polled, not awaited: `wait_acked` wakes this thread on every ack, and those wake-ups
        // (a futex each) would be billed to the pipeline. 1 ms of resolution on runs of 100+ ms.
        while broker.acked() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = start.elapsed();
        trigger.trigger();
        task.await.unwrap();
        n as f64 / took.as_secs_f64()
    })
}

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A core module exporting `noop: func()`, in binary form (no text-format parser needed).
const NOOP_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // types: () -> ()
    0x03, 0x02, 0x01, 0x00, // functions: one of type 0
    0x07, 0x08, 0x01, 0x04, b'n', b'o', b'o', b'p', 0x00, 0x00, // export "noop" = func 0
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code: empty body
];

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let small = message(
        b"the quick brown fox jumps over the lazy dog, 0123456789 -- lockgate bench payload!!"
            .repeat(2)[..100]
            .to_vec(),
    );
    let pooled = engine(true, lockgate::engine::DEFAULT_KEEP_RESIDENT_BYTES);
    let discarding = engine(true, 0);
    let on_demand = engine(false, 0);
    let reused = uppercase_pool(&pooled, Isolation::Reuse, HandlerLimits::default());
    let echo = guest_pool(&pooled, "echo", Isolation::Reuse, HandlerLimits::default());
    let fresh_echo = guest_pool(
        &pooled,
        "echo",
        Isolation::PerMessage,
        HandlerLimits::default(),
    );
    let fresh_pooled = uppercase_pool(&pooled, Isolation::PerMessage, HandlerLimits::default());
    let fresh_discarding =
        uppercase_pool(&discarding, Isolation::PerMessage, HandlerLimits::default());
    let fresh_on_demand =
        uppercase_pool(&on_demand, Isolation::PerMessage, HandlerLimits::default());
    match reused.invoke(&small).outcome {
        Outcome::Ok { outputs } => assert_eq!(outputs, native_uppercase(&small)),
        other => panic!("uppercase failed: {other:?}"),
    }

    // The floor: a call into a core-wasm no-op.
    let wt = wasmtime::Engine::default();
    let module = wasmtime::Module::new(&wt, NOOP_WASM).unwrap();
    let mut store = wasmtime::Store::new(&wt, ());
    let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
    let noop = instance
        .get_typed_func::<(), ()>(&mut store, "noop")
        .unwrap();

    println!("lockgate performance suite: {ROUNDS} interleaved rounds, median (min-max)\n");
    println!("| measure | value | spread | ratio | target |");
    println!("|---|---|---|---|---|");

    // 1 and 2: calls.
    let mut arms: Vec<Arm<'_>> = vec![
        (
            "native closure",
            Box::new(|| {
                per_call(200_000, || {
                    drop(black_box(native_uppercase(black_box(&small))))
                })
            }),
        ),
        (
            "core-wasm no-op call",
            Box::new(|| per_call(1_000_000, || noop.call(&mut store, ()).unwrap())),
        ),
        (
            "guest, reused instance",
            Box::new(|| per_call(50_000, || drop(black_box(reused.invoke(black_box(&small)))))),
        ),
        (
            "echo guest, reused instance",
            Box::new(|| per_call(50_000, || drop(black_box(echo.invoke(black_box(&small)))))),
        ),
        (
            "guest, fresh instance (pooling)",
            Box::new(|| per_call(5_000, || drop(black_box(fresh_pooled.invoke(&small))))),
        ),
        (
            "echo guest, fresh instance (pooling)",
            Box::new(|| per_call(5_000, || drop(black_box(fresh_echo.invoke(&small))))),
        ),
        (
            "guest, fresh instance (pooling, no keep-resident)",
            Box::new(|| per_call(5_000, || drop(black_box(fresh_discarding.invoke(&small))))),
        ),
        (
            "guest, fresh instance (on-demand)",
            Box::new(|| per_call(2_000, || drop(black_box(fresh_on_demand.invoke(&small))))),
        ),
    ];
    let s = interleave(&mut arms);
    drop(arms);
    let native = lockgate_tests::median_spread(&s[0]).0;
    let targets = ["", "", "≤ 1 µs", "", "≤ 10 µs", "", "", ""];
    for (i, name) in [
        "native closure",
        "core-wasm no-op call",
        "guest, reused instance",
        "echo guest, reused instance",
        "guest, fresh instance (pooling)",
        "echo guest, fresh instance (pooling)",
        "guest, fresh instance (pooling, no keep-resident)",
        "guest, fresh instance (on-demand)",
    ]
    .iter()
    .enumerate()
    {
        let (m, lo, hi) = lockgate_tests::median_spread(&s[i]);
        row(
            &format!("call: {name}"),
            format!("{:.2} µs", m / 1e3),
            format!("{:.2}-{:.2}", lo / 1e3, hi / 1e3),
            format!("{:.1}x native", m / native),
            targets[i],
        );
    }

    // 3: the pipeline, one lane.
    const N: u64 = 20_000;
    let guest_inv: Arc<dyn Invoker> = Arc::new(uppercase_pool(
        &pooled,
        Isolation::Reuse,
        HandlerLimits::default(),
    ));
    let native_inv: Arc<dyn Invoker> = Arc::new(Native);
    let mut arms: Vec<Arm<'_>> = vec![
        (
            "native",
            Box::new(|| route_rate(&rt, native_inv.clone(), N, 1, false, 100)),
        ),
        (
            "guest",
            Box::new(|| route_rate(&rt, guest_inv.clone(), N, 1, false, 100)),
        ),
        (
            "native, idempotency",
            Box::new(|| route_rate(&rt, native_inv.clone(), N, 1, true, 100)),
        ),
        (
            "guest, idempotency",
            Box::new(|| route_rate(&rt, guest_inv.clone(), N, 1, true, 100)),
        ),
    ];
    let s = interleave(&mut arms);
    drop(arms);
    let (native_rate, ..) = lockgate_tests::median_spread(&s[0]);
    for (i, name) in [
        "native",
        "guest",
        "native, idempotency",
        "guest, idempotency",
    ]
    .iter()
    .enumerate()
    {
        let (m, lo, hi) = lockgate_tests::median_spread(&s[i]);
        let base = if i < 2 {
            native_rate
        } else {
            lockgate_tests::median_spread(&s[2]).0
        };
        row(
            &format!("pipeline, 1 lane: {name}"),
            format!("{m:.0} msg/s"),
            format!("{lo:.0}-{hi:.0}"),
            format!("{:.2}x native", m / base),
            if i % 2 == 1 { "≥ 0.5x native" } else { "" },
        );
    }
    let pipeline_ns = 1e9 / native_rate - native;
    row(
        "pipeline cost per message (native arm minus its call)",
        format!("{:.2} µs", pipeline_ns / 1e3),
        String::new(),
        String::new(),
        "≤ 2 µs",
    );

    // 4: payload size.
    let big_limits = HandlerLimits {
        max_output_bytes: 4 * 1024 * 1024,
        ..HandlerLimits::default()
    };
    let sized = &uppercase_pool(&pooled, Isolation::Reuse, big_limits.clone());
    let sized_echo = &guest_pool(&pooled, "echo", Isolation::Reuse, big_limits);
    let messages: Vec<(usize, InboundMessage)> = [100usize, 4 << 10, 64 << 10, 1 << 20]
        .iter()
        .map(|&n| (n, message(vec![b'a'; n])))
        .collect();
    let mut arms: Vec<Arm<'_>> = Vec::new();
    let mut labels = Vec::new();
    for (pool, label) in [(sized, "uppercase"), (sized_echo, "echo")] {
        for (n, m) in &messages {
            let iters = (20_000_000 / (*n as u32 + 1_000)).clamp(50, 20_000);
            let f: Box<dyn FnMut() -> f64 + '_> =
                Box::new(move || per_call(iters, || drop(black_box(pool.invoke(m)))));
            arms.push(("payload", f));
            labels.push((label, *n));
        }
    }
    let s = interleave(&mut arms);
    drop(arms);
    for (i, (label, n)) in labels.iter().enumerate() {
        let (m, lo, hi) = lockgate_tests::median_spread(&s[i]);
        // In and out of the guest: the payload crosses the ABI twice.
        let gbps = 2.0 * *n as f64 / m;
        row(
            &format!("payload {} ({label})", human(*n)),
            format!("{:.1} µs/call", m / 1e3),
            format!("{:.1}-{:.1}", lo / 1e3, hi / 1e3),
            format!("{gbps:.2} GB/s"),
            if *n >= 64 << 10 { "≥ 2 GB/s" } else { "" },
        );
    }

    // 5: lanes.
    // With 100 B the call is a small part of a message's cost; with 64 KiB (about 100 µs of
    // upper-casing) the handler dominates, as it does for handlers that do real work.
    let mut arms: Vec<Arm<'_>> = Vec::new();
    let lane_guest: Arc<dyn Invoker> = Arc::new(uppercase_pool(
        &pooled,
        Isolation::Reuse,
        HandlerLimits {
            max_output_bytes: 1 << 20,
            ..HandlerLimits::default()
        },
    ));
    for (bytes, n) in [(100usize, N), (64 << 10, N / 10)] {
        for lanes in [1u32, 2] {
            let inv = lane_guest.clone();
            let rt = &rt;
            arms.push((
                "lanes",
                Box::new(move || route_rate(rt, inv.clone(), n, lanes, false, bytes)),
            ));
        }
    }
    let s = interleave(&mut arms);
    drop(arms);
    for (i, bytes) in [100usize, 64 << 10].iter().enumerate() {
        let (one, ..) = lockgate_tests::median_spread(&s[2 * i]);
        let (two, lo, hi) = lockgate_tests::median_spread(&s[2 * i + 1]);
        row(
            &format!(
                "guest route, {} payloads, 2 lanes vs 1 (2 cores)",
                human(*bytes)
            ),
            format!("{two:.0} vs {one:.0} msg/s"),
            format!("{lo:.0}-{hi:.0}"),
            format!("{:.2}x", two / one),
            "≥ 1.7x",
        );
    }

    // The engine alone: the same calls from one thread and from two (each its own instance).
    let big = message(vec![b'a'; 64 << 10]);
    let threads_arm = |threads: usize| {
        let (pool, big) = (&lane_guest, &big);
        move || {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..500 {
                            drop(black_box(pool.invoke(big)));
                        }
                    });
                }
            });
            (500 * threads) as f64 / start.elapsed().as_secs_f64()
        }
    };
    let mut arms: Vec<Arm<'_>> = vec![
        ("1 thread", Box::new(threads_arm(1))),
        ("2 threads", Box::new(threads_arm(2))),
    ];
    let s = interleave(&mut arms);
    drop(arms);
    let (one, ..) = lockgate_tests::median_spread(&s[0]);
    let (two, lo, hi) = lockgate_tests::median_spread(&s[1]);
    row(
        "guest calls alone (64 KiB), 2 threads vs 1 (2 cores)",
        format!("{two:.0} vs {one:.0} calls/s"),
        format!("{lo:.0}-{hi:.0}"),
        format!("{:.2}x", two / one),
        "",
    );

    // 6: memory per live instance.
    let handler = pooled
        .load_handler(
            &guest("uppercase"),
            handler_env("uppercase", &[("target", "out")], HandlerLimits::default()),
        )
        .unwrap();
    let mut live = Vec::new();
    let mut last = (0usize, rss());
    for n in [1usize, 100, 1000] {
        while live.len() < n {
            let mut i = handler.instantiate().unwrap();
            // A call touches the instance's memory as serving would.
            drop(black_box(i.invoke(&small)));
            live.push(i);
        }
        let now = rss();
        row(
            &format!("RSS per live instance, {n} live"),
            format!(
                "{:.0} KiB",
                (now.saturating_sub(last.1)) as f64 / 1024.0 / (n - last.0).max(1) as f64
            ),
            String::new(),
            String::new(),
            "≤ 256 KiB",
        );
        last = (n, now);
    }
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}
