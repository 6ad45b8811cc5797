//! Cost of guest kv operations on the in-memory store and the embedded redb store (each write a
//! durable, fsynced transaction). Backs the choice of redb (docs/operate/state-stores.md)
//! with a measured figure.
//!
//! Run: `cargo bench -p lockgate-tests --bench kv_store`. Not a test: nothing is asserted.

use std::hint::black_box;
use std::time::Instant;

use lockgate::state::{EmbeddedStore, KvStore, MemoryStore};

fn per_op(iters: u32, mut f: impl FnMut(u32)) -> f64 {
    let start = Instant::now();
    for i in 0..iters {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = EmbeddedStore::open(&dir.path().join("bench.redb")).expect("open");
    let memory = MemoryStore::new();
    let stores: [(&str, &dyn KvStore, u32); 2] = [
        ("memory", &memory, 100_000),
        ("embedded (redb)", &embedded, 500),
    ];
    let value = vec![7u8; 100];
    println!("{:<18} {:>14} {:>14} {:>14}", "store", "set", "get", "cas");
    for (name, store, iters) in stores {
        let set = per_op(iters, |i| {
            store
                .set("bench", &format!("k{i}"), &value, None)
                .expect("set");
        });
        let get = per_op(iters, |i| {
            black_box(store.get("bench", &format!("k{i}"), 0).expect("get"));
        });
        let cas = per_op(iters, |i| {
            black_box(
                store
                    .compare_and_swap(
                        "bench",
                        &format!("k{i}"),
                        Some(&value),
                        Some(&value),
                        None,
                        0,
                    )
                    .expect("cas"),
            );
        });
        println!(
            "{name:<18} {:>11.2} µs {:>11.2} µs {:>11.2} µs",
            set / 1e3,
            get / 1e3,
            cas / 1e3
        );
    }
}
