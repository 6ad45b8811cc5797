//! Driving hot reloads of a running `lockgate run` (see [`crate::start_run`]).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::admin::{reloads, rss_kib};
use crate::{Proc, guest, run_logs};

/// Writes module versions to `module` in a fixed cycle — B (`uppercase`), garbage, A
/// (`chaos`), ... — `n` times, so every write changes what the file holds. Garbage alternates
/// between a truncated component and text. Before each write `feed(i)` runs (to append
/// messages); after it the test waits until the process has counted the reload (applied, or
/// refused for garbage). Returns the process's RSS in KiB after each write.
#[allow(clippy::too_many_arguments)]
pub fn churn(
    child: &mut Proc,
    dir: &Path,
    run: u32,
    addr: &str,
    module: &Path,
    n: usize,
    mut feed: impl FnMut(usize),
) -> Vec<u64> {
    let a = std::fs::read(guest("chaos")).expect("chaos guest");
    let b = std::fs::read(guest("uppercase")).expect("uppercase guest");
    let (applied0, refused0) = reloads(addr);
    let mut rss = Vec::with_capacity(n);
    let mut garbage = 0;
    for i in 0..n {
        feed(i);
        let bytes: Vec<u8> = match i % 3 {
            0 => b.clone(),
            1 => {
                garbage += 1;
                if garbage % 2 == 1 {
                    a[..a.len() / 2].to_vec()
                } else {
                    b"this is not a component".to_vec()
                }
            }
            _ => a.clone(),
        };
        std::fs::write(module, &bytes).expect("write module");
        let started = Instant::now();
        loop {
            let (applied, refused) = reloads(addr);
            if applied + refused - applied0 - refused0 > i as u64 {
                break;
            }
            if let Some(status) = child.try_wait().expect("child status") {
                panic!("lockgate run exited ({status})\n{}", run_logs(dir, run));
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "reload {i} was not counted\n{}",
                run_logs(dir, run)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        rss.push(rss_kib(child.id()));
    }
    let (applied, refused) = reloads(addr);
    let refused_writes = (n + 1) / 3;
    assert_eq!(
        (applied - applied0, refused - refused0),
        ((n - refused_writes) as u64, refused_writes as u64),
        "every valid write applied, every garbage write refused"
    );
    rss
}

/// Which module version produced an output of the `churn` cycle: `'A'` (`chaos`, payload
/// unchanged: `{"id":N}`) or `'B'` (`uppercase`: `{"ID":N}`); the id.
pub fn version_of(payload: &[u8]) -> (char, u64) {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON output");
    match (v.get("id"), v.get("ID")) {
        (Some(id), None) => ('A', id.as_u64().expect("id")),
        (None, Some(id)) => ('B', id.as_u64().expect("ID")),
        _ => panic!("output of no known version: {v}"),
    }
}
