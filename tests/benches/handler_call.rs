//! Per-call cost of the `uppercase` guest: reused instance, fresh instance (pooling allocator on
//! and off), next to a native Rust closure doing the same work (upper-case 100 bytes, look up the
//! target topic, buffer one output).
//!
//! Run: `cargo bench -p lockgate-tests --bench handler_call`. The machine is noisy, so arms are
//! interleaved over several rounds and the table shows the median with the min-max spread; compare
//! ratios within one run, not absolute numbers across runs. Not a test: nothing is asserted.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use lockgate::engine::{HandlerLimits, InboundMessage, InstancePool, Outcome, OutgoingMessage};

use lockgate::config::Isolation;
use lockgate_tests::{guest_pool, handler_env};

const ROUNDS: usize = 7;

/// A benchmark arm: its name, calls per round, and the call.
type Arm<'a> = (&'static str, u32, Box<dyn Fn() + 'a>);

fn pool(pooling: bool, isolation: Isolation) -> InstancePool {
    let env = handler_env(
        "uppercase",
        &[("target", "shouted")],
        HandlerLimits::default(),
    );
    guest_pool("uppercase", pooling, isolation, env)
}

/// Nanoseconds per call of `f`, over `iters` calls.
fn measure(iters: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn main() {
    let message = InboundMessage {
        id: "bench/1".into(),
        topic: "in".into(),
        payload:
            b"the quick brown fox jumps over the lazy dog, 0123456789 -- lockgate bench payload!!"
                .repeat(2)[..100]
                .to_vec(),
        attempt: 1,
        ..InboundMessage::default()
    };
    let config = BTreeMap::from([("target".to_owned(), "shouted".to_owned())]);
    let native = |m: &InboundMessage| -> Vec<OutgoingMessage> {
        let text = std::str::from_utf8(&m.payload).expect("utf-8");
        let topic = config.get("target").expect("target").clone();
        vec![OutgoingMessage {
            topic,
            key: m.key.clone(),
            headers: m.headers.clone(),
            payload: text.to_uppercase().into_bytes(),
        }]
    };

    let reused = pool(true, Isolation::Reuse);
    let fresh_pooling = pool(true, Isolation::PerMessage);
    let fresh_ondemand = pool(false, Isolation::PerMessage);
    // Sanity: the guest does the same work as the closure.
    match reused.invoke(&message).outcome {
        Outcome::Ok { outputs } => assert_eq!(outputs, native(&message)),
        other => panic!("uppercase guest failed: {other:?}"),
    }

    let arms: [Arm<'_>; 4] = [
        (
            "native closure",
            200_000,
            Box::new(|| drop(black_box(native(black_box(&message))))),
        ),
        (
            "guest, reused instance",
            50_000,
            Box::new(|| drop(black_box(reused.invoke(black_box(&message))))),
        ),
        (
            "guest, fresh instance (pooling)",
            5_000,
            Box::new(|| drop(black_box(fresh_pooling.invoke(black_box(&message))))),
        ),
        (
            "guest, fresh instance (on-demand)",
            2_000,
            Box::new(|| drop(black_box(fresh_ondemand.invoke(black_box(&message))))),
        ),
    ];
    // Warm up caches, pool slots and branch predictors.
    for (_, iters, f) in &arms {
        measure(iters / 10, f);
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); arms.len()];
    for _ in 0..ROUNDS {
        for (i, (_, iters, f)) in arms.iter().enumerate() {
            samples[i].push(measure(*iters, f));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let native_median = median(&mut samples[0].clone());
    println!("uppercase, 100-byte payload, {ROUNDS} interleaved rounds (median, min-max)");
    println!(
        "{:<36} {:>12} {:>22} {:>10}",
        "arm", "per call", "spread", "x native"
    );
    for (i, (name, _, _)) in arms.iter().enumerate() {
        let m = median(&mut samples[i]);
        let (lo, hi) = (samples[i][0], samples[i][samples[i].len() - 1]);
        println!(
            "{name:<36} {:>9.2} µs {:>9.2} - {:>7.2} µs {:>9.1}x",
            m / 1e3,
            lo / 1e3,
            hi / 1e3,
            m / native_median
        );
    }
}
