//! A hundred module reloads under load, in process through `lockgate::app::Runtime`: no message
//! lost, each handled by exactly one version, garbage never served, memory flat. Alone in its
//! file so the memory it measures is its own.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use lockgate::app::Event;
use lockgate::broker::local::LocalBroker;
use lockgate::message::OutRecord;
use lockgate_tests::admin::{get, rss_kib, value};
use lockgate_tests::guest;
use lockgate_tests::inproc;
use lockgate_tests::reload::version_of;

const DEADLINE: Duration = Duration::from_secs(300);

fn orders(from: u64, n: u64) -> Vec<OutRecord> {
    (from..from + n)
        .map(|i| OutRecord {
            topic: "in".into(),
            key: Some(format!("k{}", i % 16).into_bytes()),
            headers: Vec::new(),
            payload: format!(r#"{{"id":{i}}}"#).into_bytes(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_module_reloads_under_load_lose_nothing_and_never_serve_garbage() {
    const N: u64 = 50_000;
    const RELOADS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("handler.wasm");
    std::fs::copy(guest("chaos"), &module).unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"

[handlers.h]
module = "handler.wasm"
config = { target = "out" }

[routes.orders]
handler = "h"
source = { topic = "in" }
outputs = ["out"]
concurrency = 4
ordering = "key"
"#,
    )
    .unwrap();
    let mut rt = inproc::start(&config).await;
    let addr = rt.admin();
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let out = || broker.end_offset("out").unwrap();
    let chunk = N / RELOADS as u64;
    // Module versions in a fixed cycle: B (`uppercase`), garbage, A (`chaos`), ..., so every
    // write changes what the file holds. Garbage alternates between a truncated component and
    // text.
    let a = std::fs::read(guest("chaos")).unwrap();
    let b = std::fs::read(guest("uppercase")).unwrap();
    let (mut applied, mut refused) = (0, 0);
    let mut rss = Vec::with_capacity(RELOADS);
    for i in 0..RELOADS {
        // Each reload lands in the middle of a chunk: the previous chunk is handled, the next
        // one appended, and the module written once a tenth of it is handled.
        let handled = i as u64 * chunk;
        inproc::until("the previous chunk", DEADLINE, handled, out).await;
        broker.append(&orders(handled, chunk)).unwrap();
        inproc::until("a tenth of this chunk", DEADLINE, handled + chunk / 10, out).await;
        let bytes: Vec<u8> = match i % 3 {
            0 => b.clone(),
            1 if (i / 3) % 2 == 0 => a[..a.len() / 2].to_vec(),
            1 => b"this is not a component".to_vec(),
            _ => a.clone(),
        };
        std::fs::write(&module, &bytes).unwrap();
        match rt
            .wait_event(&format!("reload {i}"), DEADLINE, |e| {
                matches!(e, Event::Reloaded { .. } | Event::ReloadRefused { .. })
            })
            .await
        {
            Event::Reloaded { .. } => applied += 1,
            _ => refused += 1,
        }
        rss.push(rss_kib(std::process::id()));
    }
    let garbage_writes = (RELOADS + 1) / 3;
    assert_eq!(
        (applied, refused),
        (RELOADS - garbage_writes, garbage_writes),
        "every valid write applied, every garbage write refused"
    );
    inproc::until("every message", DEADLINE, N, out).await;
    let page = get(&addr, "/metrics").1;
    assert!(!rt.runtime.stop().await.failed());

    let mut seen = BTreeMap::<u64, u32>::new();
    let mut by_version = BTreeMap::<char, u64>::new();
    for r in broker.read("out", 0, N as usize + 100).unwrap() {
        let (version, id) = version_of(&r.payload);
        *seen.entry(id).or_default() += 1;
        *by_version.entry(version).or_default() += 1;
    }
    assert_eq!(seen.len() as u64, N, "nothing lost");
    assert!(seen.values().all(|n| *n == 1), "each handled once");
    assert_eq!(by_version.len(), 2, "both versions served: {by_version:?}");
    for name in [
        "lockgate_messages_dead_lettered_total",
        "lockgate_attempts_retried_total",
    ] {
        assert_eq!(
            value(&page, name, "orders"),
            Some(0.0),
            "garbage never ran: {name}\n{page}"
        );
    }
    assert_eq!(broker.end_offset("in.dlq").unwrap(), 0);
    // Memory flat: after the first 20 reloads (both versions compiled, caches warm), 80 more
    // add no more than a generous 48 MiB (a leak of one component per reload would exceed it).
    let (early, last) = (rss[19], rss[RELOADS - 1]);
    assert!(
        last < early + 48 * 1024,
        "RSS grew from {early} KiB to {last} KiB over 80 reloads: {rss:?}"
    );
    println!(
        "RSS after reload 20: {early} KiB, after {RELOADS}: {last} KiB; by version {by_version:?}"
    );
}
