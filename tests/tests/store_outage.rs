//! A shared state store that goes away mid-stream pauses the route instead of losing or
//! double-running anything: progress and committed offsets stop while it is gone, and
//! everything drains, each effect once, when it is back. The outage is a TCP proxy between
//! `lockgate run` and the real Redis / PostgreSQL that shuts its connections and closes its
//! port.
//!
//! Needs Kafka, Redis and PostgreSQL on 127.0.0.1 (`scripts/brokers.sh start`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use lockgate_tests::kafka::{
    Tail, bootstrap, committed, create_topics, id_of, produce, runtime, unique,
};
use lockgate_tests::proxy::Proxy;
use lockgate_tests::{Proc, guest, run_logs, start_run};

const N: u64 = 4_000;
const DEADLINE: Duration = Duration::from_secs(300);

fn wait_until(what: &str, child: &mut Proc, dir: &Path, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "lockgate exited ({status}) waiting for {what}\n{}",
                run_logs(dir, 1)
            );
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {what}\n{}",
            run_logs(dir, 1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines of run 1's log that report a failed store call being retried.
fn store_retries(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("run1.stderr"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("state store unavailable") && l.contains("retried"))
        .count()
}

/// Runs the outage scenario with the store table `store_toml` (whose URL points at the proxy's
/// port). `not_done(ids)` reads the store directly (not through the proxy) and returns the ids
/// whose idempotency key is not recorded as done; `effects()` returns each order's effect count
/// and cleans up.
fn outage(
    proxy: &mut Proxy,
    store_toml: &str,
    not_done: impl Fn(&[u64]) -> Vec<u64>,
    effects: impl Fn() -> BTreeMap<u64, u64>,
) {
    let rt = runtime();
    let base = unique("outage");
    let (input, out, dlq, group) = (
        format!("{base}.in"),
        format!("{base}.out"),
        format!("{base}.dlq"),
        format!("{base}.group"),
    );
    create_topics(&rt, &[(&input, 3), (&out, 3), (&dlq, 1)]);
    let orders: Vec<(String, String)> = (0..N)
        .map(|i| (format!("k{}", i % 31), format!(r#"{{"id":{i}}}"#)))
        .collect();
    produce(&rt, &input, &orders);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
shutdown_grace_ms = 5000
state = "shared"

{store_toml}

[brokers.kafka]
kind = "kafka"
bootstrap_servers = "{bootstrap}"

[handlers.chaos]
module = "{module}"
config = {{ target = "{out}", count_effects = "true" }}

[routes.orders]
handler = "chaos"
source = {{ broker = "kafka", topic = "{input}", group = "{group}" }}
outputs = ["{out}"]
dlq = {{ topic = "{dlq}" }}
concurrency = 4
ordering = "key"
max_batch = 4
# Slow enough that the outage falls mid-stream.
rate_limit = {{ per_second = 400, burst = 50 }}
idempotency = {{ key = "json:/id", lease_ms = 3000 }}
"#,
            bootstrap = bootstrap(),
            module = guest("chaos").display(),
        ),
    )
    .unwrap();
    // Where each order sits in the input, to check what the committed offsets cover.
    let mut input_tail = Tail::new(&[(&input, 3)]);
    while input_tail.got.len() < N as usize {
        input_tail.drain(Duration::from_millis(200));
    }
    let mut tail = Tail::new(&[(&out, 3), (&dlq, 1)]);
    let mut child = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let d = dir.path();
    wait_until("the first 800 orders", &mut child, d, || {
        tail.drain(Duration::from_millis(100));
        tail.ids().len() >= 800
    });

    proxy.cut();
    // The route notices (a failed store call is logged and retried) ...
    wait_until("a store error", &mut child, d, || store_retries(d) >= 1);
    // ... and stalls: across several more failed retries, no output appears and no offset is
    // committed. Messages acked just before the cut still get their offsets committed by the
    // next auto-commit (every second), and ones that committed their effects just before it
    // may still publish: wait until outputs and offsets hold still across a stretch of failed
    // retries, then watch them through another.
    let settled = |child: &mut Proc, tail: &mut Tail| {
        let seen = store_retries(d);
        wait_until("more store retries", child, d, || {
            store_retries(d) >= seen + 8
        });
        tail.drain(Duration::from_millis(300));
        (tail.got.len(), committed(&group, &input, 3))
    };
    let mut before = settled(&mut child, &mut tail);
    loop {
        let now = settled(&mut child, &mut tail);
        if now == before {
            break;
        }
        before = now;
    }
    let after = settled(&mut child, &mut tail);
    assert_eq!(
        after.0, before.0,
        "outputs published while the store was down"
    );
    assert_eq!(
        after.1, before.1,
        "offsets committed while the store was down"
    );
    // Nothing was acked without its key: every order below a committed offset is done in the
    // store.
    let covered: Vec<u64> = input_tail
        .got
        .iter()
        .filter(|(_, g)| g.offset < after.1[g.partition as usize])
        .map(|(_, g)| id_of(&g.payload))
        .collect();
    assert!(
        !covered.is_empty(),
        "nothing was committed before the outage"
    );
    let missing = not_done(&covered);
    assert!(
        missing.is_empty(),
        "{} orders acked without their key recorded (first {:?})",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        tail.ids().len() < N as usize,
        "everything was done before the outage"
    );

    proxy.restore();
    wait_until("every order", &mut child, d, || {
        tail.drain(Duration::from_millis(100));
        tail.ids().len() >= N as usize
    });
    lockgate_tests::stop_run(&mut child, d, 1);
    tail.drain(Duration::from_secs(1));

    let all: BTreeSet<u64> = (0..N).collect();
    let got: BTreeSet<u64> = tail
        .records(&out)
        .iter()
        .map(|g| id_of(&g.payload))
        .collect();
    assert_eq!(got, all, "lost orders");
    let effects = effects();
    let wrong: Vec<(u64, u64)> = (0..N)
        .map(|id| (id, effects.get(&id).copied().unwrap_or(0)))
        .filter(|(_, c)| *c != 1)
        .take(20)
        .collect();
    assert!(wrong.is_empty(), "effects not run exactly once: {wrong:?}");
}

#[test]
fn a_redis_outage_pauses_the_route_and_it_drains_after() {
    let mut proxy = Proxy::start("127.0.0.1:6379");
    let prefix = unique("lgoutage");
    let store = format!(
        "[stores.shared]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\nprefix = \"{prefix}\"",
        proxy.port()
    );
    let read = || {
        let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut c = client.get_connection().unwrap();
        let mut pipe = redis::pipe();
        for id in 0..N {
            pipe.hget(format!("{prefix}:kv:5:chaos:effects/{id}"), "v");
        }
        let values: Vec<Option<String>> = pipe.query(&mut c).unwrap();
        let counts = (0..N)
            .zip(values)
            .filter_map(|(id, v)| Some((id, v?.parse().unwrap())))
            .collect();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut c)
            .unwrap();
        for chunk in keys.chunks(5_000) {
            redis::cmd("DEL").arg(chunk).query::<()>(&mut c).unwrap();
        }
        counts
    };
    let not_done = |ids: &[u64]| {
        let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut c = client.get_connection().unwrap();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.get(format!("{prefix}:idem:18:idempotency/orders:{id}"));
        }
        let values: Vec<Option<String>> = pipe.query(&mut c).unwrap();
        ids.iter()
            .zip(values)
            .filter(|(_, v)| v.as_deref() != Some("d"))
            .map(|(id, _)| *id)
            .collect()
    };
    outage(&mut proxy, &store, not_done, read);
}

#[test]
fn a_postgres_outage_pauses_the_route_and_it_drains_after() {
    let mut proxy = Proxy::start("127.0.0.1:5432");
    let schema = unique("lgoutage").replace('-', "_");
    let store = format!(
        "[stores.shared]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:{}/postgres\"\nschema = \"{schema}\"\npool_size = 4",
        proxy.port()
    );
    let read = || {
        let rt = runtime();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(
                "postgres://postgres@127.0.0.1:5432/postgres",
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let rows = client
                .query(
                    &format!("SELECT key, value FROM {schema}.kv WHERE namespace = 'chaos'"),
                    &[],
                )
                .await
                .unwrap();
            client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
            rows.iter()
                .map(|r| {
                    let key: String = r.get(0);
                    let value: Vec<u8> = r.get(1);
                    (
                        key.strip_prefix("effects/").unwrap().parse().unwrap(),
                        String::from_utf8(value).unwrap().parse().unwrap(),
                    )
                })
                .collect()
        })
    };
    let not_done = |ids: &[u64]| {
        let rt = runtime();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(
                "postgres://postgres@127.0.0.1:5432/postgres",
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let keys: Vec<String> = ids.iter().map(u64::to_string).collect();
            let done: BTreeSet<u64> = client
                .query(
                    &format!(
                        "SELECT key FROM {schema}.idempotency
                         WHERE scope = 'idempotency/orders' AND state = 'd' AND key = ANY($1)"
                    ),
                    &[&keys],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0).parse().unwrap())
                .collect();
            ids.iter()
                .filter(|id| !done.contains(id))
                .copied()
                .collect()
        })
    };
    outage(&mut proxy, &store, not_done, read);
}
