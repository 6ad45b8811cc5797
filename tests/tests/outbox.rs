//! The transactional outbox against real PostgreSQL and Kafka.
//!
//! - An outbox route (Kafka in, the `chaos` guest counting an effect per order, outputs as
//!   outbox rows) and a relay (outbox to Kafka) in one `lockgate run`, SIGKILLed and restarted
//!   mid-stream: every order ends as exactly one outbox row and one effect, and the relay
//!   publishes every row (a repeat downstream carries the row's `lockgate-id`).
//! - Two relays on 50,000 rows written by plain SQL: every row published once, in order per
//!   aggregate, and the cleanup deletes published rows only.
//!
//! Needs Kafka and PostgreSQL on 127.0.0.1 (`scripts/brokers.sh start`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use lockgate_tests::kafka::{Tail, bootstrap, create_topics, id_of, produce, runtime, unique};
use lockgate_tests::pg::{self, SyncPg};
use lockgate_tests::{Proc, crash_mix, guest, lockgate, run_logs, run_stat, show, start_run};

const DEADLINE: Duration = Duration::from_secs(600);

fn kafka_broker() -> String {
    format!(
        "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\nconsumer_properties = {{ \"session.timeout.ms\" = 6000, \"max.poll.interval.ms\" = 10000 }}\n",
        bootstrap()
    )
}

fn pg_store(schema: &str) -> String {
    format!(
        "[stores.pg]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\npool_size = 8\n",
        pg::URL
    )
}

/// Polls `progress` until it reaches `target`, failing with the logs of runs `1..=runs` if a
/// process in `procs` exits or the deadline passes.
fn wait_until(
    dir: &Path,
    procs: &mut [&mut Proc],
    runs: u32,
    target: u64,
    mut progress: impl FnMut() -> u64,
) {
    let started = Instant::now();
    loop {
        let done = progress();
        if done >= target {
            return;
        }
        let logs = || {
            (1..=runs)
                .map(|r| run_logs(dir, r))
                .collect::<Vec<_>>()
                .join("\n")
        };
        for p in procs.iter_mut() {
            if let Some(status) = p.try_wait().unwrap() {
                panic!("a run exited ({status}) at {done}/{target}\n{}", logs());
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {done} of {target} after {DEADLINE:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const ORDERS: u64 = 20_000;
/// Outbox rows written when the runtime is SIGKILLed and restarted.
const KILLS: [u64; 4] = [3_000, 7_000, 11_000, 15_000];

#[test]
fn an_outbox_route_killed_mid_stream_loses_and_repeats_nothing() {
    let rt = runtime();
    let base = unique("outbox");
    let (input, out, dlq) = (
        format!("{base}.in"),
        format!("{base}.out"),
        format!("{base}.dlq"),
    );
    create_topics(&rt, &[(&input, 6), (&out, 3), (&dlq, 1)]);
    let poison = |i: u64| i % 100 == 42;
    let orders = lockgate_tests::orders(ORDERS, 97, crash_mix);
    produce(&rt, &input, &orders);
    let schema = pg::unique_schema("lgoutbox");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
shutdown_grace_ms = 5000

{kafka}
{store}
[handlers.chaos]
module = "{module}"
config = {{ target = "{out}", count_effects = "true" }}

[routes.orders]
handler = "chaos"
source = {{ broker = "kafka", topic = "{input}", group = "{base}.group" }}
state = "pg"
outputs = {{ topics = ["{out}"], mode = "outbox" }}
dlq = {{ topic = "{dlq}" }}
concurrency = 8
ordering = "key"
max_batch = 4
retry = {{ max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }}
idempotency = {{ key = "json:/id", lease_ms = 3000 }}

[routes.relay]
source = {{ outbox = "pg", lease_ms = 3000, poll_ms = 200 }}
outputs = {{ broker = "kafka" }}
ordering = "key"
concurrency = 4
"#,
            kafka = kafka_broker(),
            store = pg_store(&schema),
            module = guest("chaos").display(),
        ),
    )
    .unwrap();

    let pg = SyncPg::connect();
    let rows = |pg: &SyncPg| {
        // The schema appears with the first run's migration.
        if pg.count(&format!(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}' AND table_name = 'outbox'"
        )) == 0
        {
            return 0;
        }
        pg.count(&format!("SELECT count(*) FROM {schema}.outbox"))
    };
    let mut run = 1;
    let mut proc = start_run(dir.path(), &config, run, None, "lockgate=info,warn");
    for at in KILLS {
        wait_until(dir.path(), &mut [&mut proc], run, at, || rows(&pg));
        proc.kill().unwrap();
        proc.wait().unwrap();
        run += 1;
        proc = start_run(dir.path(), &config, run, None, "lockgate=info,warn");
    }
    let want: BTreeSet<u64> = (0..ORDERS).filter(|i| !poison(*i)).collect();
    let dead_want: BTreeSet<u64> = (0..ORDERS).filter(|i| poison(*i)).collect();
    let mut tail = Tail::new(&[(&out, 3), (&dlq, 1)]);
    wait_until(dir.path(), &mut [&mut proc], run, want.len() as u64, || {
        tail.drain(Duration::from_millis(200));
        tail.records(&out)
            .iter()
            .map(|g| id_of(&g.payload))
            .collect::<BTreeSet<_>>()
            .len() as u64
    });
    wait_until(
        dir.path(),
        &mut [&mut proc],
        run,
        dead_want.len() as u64,
        || {
            tail.drain(Duration::from_millis(200));
            tail.records(&dlq)
                .iter()
                .map(|g| id_of(&g.payload))
                .collect::<BTreeSet<_>>()
                .len() as u64
        },
    );
    lockgate_tests::stop_run(&mut proc, dir.path(), run);
    tail.drain(Duration::from_secs(1));

    // Exactly one outbox row per handled order, each with the order's deterministic id.
    let ids: Vec<String> = pg
        .query(&format!("SELECT lockgate_id FROM {schema}.outbox"), &[])
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: BTreeSet<String> = want.iter().map(|i| format!("orders:key:{i}:0")).collect();
    assert_eq!(ids.len(), want.len(), "outbox rows");
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL"
        )),
        0,
        "unpublished outbox rows after the relay drained"
    );
    // Exactly one effect per handled order, none for poison ones.
    let mut effects: BTreeMap<u64, String> = BTreeMap::new();
    for r in pg.query(
        &format!("SELECT key, value FROM {schema}.kv WHERE namespace = 'chaos'"),
        &[],
    ) {
        let key: String = r.get(0);
        let id = key.strip_prefix("effects/").unwrap().parse().unwrap();
        effects.insert(id, String::from_utf8(r.get(1)).unwrap());
    }
    assert_eq!(effects.keys().copied().collect::<BTreeSet<_>>(), want);
    let repeated: Vec<_> = effects.iter().filter(|(_, v)| *v != "1").collect();
    assert!(repeated.is_empty(), "effects that ran twice: {repeated:?}");

    // The relay published every row; a repeat carries the same id.
    let mut published: BTreeMap<u64, usize> = BTreeMap::new();
    for g in tail.records(&out) {
        let id = id_of(&g.payload);
        assert_eq!(
            g.headers.get("lockgate-id").map(String::as_str),
            Some(format!("orders:key:{id}:0").as_str())
        );
        *published.entry(id).or_default() += 1;
    }
    assert_eq!(published.keys().copied().collect::<BTreeSet<_>>(), want);
    let dead: BTreeSet<u64> = tail
        .records(&dlq)
        .iter()
        .map(|g| id_of(&g.payload))
        .collect();
    assert_eq!(dead, dead_want);
    let repeats: usize = published.values().map(|n| n - 1).sum();
    eprintln!(
        "outbox crash test: {} rows, {} effects, {} SIGKILLs, {repeats} rows published again (a kill between a publish and its mark)",
        ids.len(),
        effects.len(),
        KILLS.len()
    );
    pg.drop_schema(&schema);
}

const ROWS: u64 = 50_000;
const AGGREGATES: u64 = 100;

/// Rows `from..to` of the plain-SQL writer: row `n` is event `n / 100` of aggregate `n % 100`.
fn write_rows(pg: &SyncPg, schema: &str, topic: &str, from: u64, to: u64) {
    for start in (from..to).step_by(1_000) {
        let end = (start + 1_000).min(to) - 1;
        pg.exec(&format!(
            "BEGIN;
             INSERT INTO {schema}.outbox (topic, key, header_names, header_values, payload)
             SELECT '{topic}', convert_to('agg-' || (n % {AGGREGATES}), 'UTF8'),
                    ARRAY['writer'], ARRAY[convert_to('sql', 'UTF8')],
                    convert_to(json_build_object('id', n, 'agg', n % {AGGREGATES},
                                                 'seq', n / {AGGREGATES})::text, 'UTF8')
             FROM generate_series({start}, {end}) AS n ORDER BY n;
             COMMIT;"
        ));
    }
}

#[test]
fn two_relays_publish_every_row_once_in_order_per_aggregate_and_clean_up_only_published_rows() {
    let rt = runtime();
    let out = unique("relay.out");
    create_topics(&rt, &[(&out, 3)]);
    let schema = pg::unique_schema("lgrelay");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n{kafka}\n{store}\n[routes.relay]\nsource = {{ outbox = \"pg\", batch = 200, poll_ms = 200, retention_ms = 2000, cleanup_every_ms = 500 }}\noutputs = {{ broker = \"kafka\" }}\nordering = \"key\"\nconcurrency = 8\n",
            kafka = kafka_broker(),
            store = pg_store(&schema),
        ),
    )
    .unwrap();
    let migrate = lockgate(dir.path(), &["migrate", config.to_str().unwrap()]);
    assert!(migrate.status.success(), "{}", show(&migrate));
    let pg = SyncPg::connect();
    // A row another relay holds for an hour, and a later row of its key: neither may be
    // published (order per key), and the cleanup must leave both alone.
    pg.exec(&format!(
        "INSERT INTO {schema}.outbox (topic, key, payload, created_at, claimed_by, claimed_until)
         VALUES ('{out}', 'held', '{{\"id\": 900000}}', now() - interval '1 day', 'elsewhere',
                 now() + interval '1 hour');
         INSERT INTO {schema}.outbox (topic, key, payload, created_at)
         VALUES ('{out}', 'held', '{{\"id\": 900001}}', now() - interval '1 day');"
    ));
    write_rows(&pg, &schema, &out, 0, ROWS / 2);
    let state = |n: &str| dir.path().join(n);
    let mut a = start_run(
        dir.path(),
        &config,
        1,
        Some(&state("a")),
        "lockgate=info,warn",
    );
    let mut b = start_run(
        dir.path(),
        &config,
        2,
        Some(&state("b")),
        "lockgate=info,warn",
    );
    // The rest arrives while both relay.
    write_rows(&pg, &schema, &out, ROWS / 2, ROWS);

    let mut tail = Tail::new(&[(&out, 3)]);
    wait_until(dir.path(), &mut [&mut a, &mut b], 2, ROWS, || {
        tail.drain(Duration::from_millis(200));
        tail.ids().len() as u64
    });
    // Published rows go once they are older than the retention; the held ones stay.
    wait_until(dir.path(), &mut [&mut a, &mut b], 2, 1, || {
        u64::from(
            pg.count(&format!(
                "SELECT count(*) FROM {schema}.outbox WHERE key <> 'held'::bytea"
            )) == 0,
        )
    });
    tail.drain(Duration::from_secs(1));
    lockgate_tests::stop_run(&mut a, dir.path(), 1);
    lockgate_tests::stop_run(&mut b, dir.path(), 2);

    let got = tail.records(&out);
    assert_eq!(
        got.len() as u64,
        ROWS,
        "records published (a repeat is a bug here)"
    );
    let ids: BTreeSet<u64> = got.iter().map(|g| id_of(&g.payload)).collect();
    assert_eq!(ids, (0..ROWS).collect::<BTreeSet<_>>());
    // Order per aggregate: its events arrive by seq (one key, one partition, in offset order).
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for g in &got {
        let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        let prev = last.insert(g.key.clone(), seq).unwrap_or(-1);
        assert_eq!(seq, prev + 1, "aggregate {} out of order", g.key);
        assert_eq!(g.headers.get("writer").map(String::as_str), Some("sql"));
        assert!(
            g.headers
                .get("lockgate-id")
                .is_some_and(|id| id.starts_with(&format!("outbox:{schema}:"))),
            "{:?}",
            g.headers
        );
    }
    assert_eq!(last.len() as u64, AGGREGATES);
    let left: Vec<(i64, Option<String>)> = pg
        .query(
            &format!("SELECT (convert_from(payload, 'UTF8')::json->>'id')::bigint, claimed_by FROM {schema}.outbox ORDER BY id"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        vec![(900_000, Some("elsewhere".to_owned())), (900_001, None)]
    );
    let (ra, rb) = (
        run_stat(dir.path(), 1, "outputs"),
        run_stat(dir.path(), 2, "outputs"),
    );
    eprintln!("relay test: relay 1 published {ra} rows, relay 2 {rb}");
    assert_eq!(ra + rb, ROWS);
    assert!(
        ra > 0 && rb > 0,
        "both relays should take part: {ra} and {rb}"
    );
    pg.drop_schema(&schema);
}

/// A relay with a handler: each row is the handler's message, its outputs are published
/// instead of the row, a rejected row is dead-lettered into the store's table, and a replay
/// writes it back into the outbox, where the fixed handler relays it.
#[test]
fn a_relay_with_a_handler_transforms_dead_letters_and_replays_into_the_outbox() {
    use lockgate::broker::local::LocalBroker;
    use lockgate_tests::stop_run;
    let dir = tempfile::tempdir().unwrap();
    let schema = pg::unique_schema("lgrelayh");
    let write = |poison_ok: bool| {
        let config = dir.path().join("runtime.toml");
        std::fs::write(
            &config,
            format!(
                "version = 1\n[runtime]\nstate_dir = \"state\"\n\n{store}\n[handlers.chaos]\nmodule = \"{module}\"\nconfig = {{ target = \"relayed\", poison_ok = \"{poison_ok}\" }}\n\n[routes.relay]\nhandler = \"chaos\"\nsource = {{ outbox = \"pg\", poll_ms = 100 }}\noutputs = {{ broker = \"local\", topics = [\"relayed\"] }}\n",
                store = pg_store(&schema),
                module = guest("chaos").display(),
            ),
        )
        .unwrap();
        config
    };
    let config = write(false);
    let migrate = lockgate(dir.path(), &["migrate", config.to_str().unwrap()]);
    assert!(migrate.status.success(), "{}", show(&migrate));
    let pg = SyncPg::connect();
    pg.exec(&format!(
        "INSERT INTO {schema}.outbox (topic, key, payload)
         SELECT 'in', convert_to('k' || n, 'UTF8'),
                convert_to(CASE WHEN n IN (7, 13) THEN json_build_object('id', n, 'poison', true)
                                ELSE json_build_object('id', n) END::text, 'UTF8')
         FROM generate_series(0, 19) AS n ORDER BY n"
    ));
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let dead = |pg: &SyncPg| pg.count(&format!("SELECT count(*) FROM {schema}.dead_letters"));
    let relayed = || broker.end_offset("relayed").unwrap_or(0);

    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    wait_until(dir.path(), &mut [&mut run], 1, 20, || relayed() + dead(&pg));
    stop_run(&mut run, dir.path(), 1);
    assert_eq!((relayed(), dead(&pg)), (18, 2));
    let first = &broker.read("relayed", 0, 1).unwrap()[0];
    let row_id: i64 = pg.query(&format!("SELECT min(id) FROM {schema}.outbox"), &[])[0].get(0);
    assert_eq!(
        first.header("lockgate-id"),
        Some(format!("relay:pos:in/-/{row_id}:0").as_bytes())
    );
    assert_eq!(first.key.as_deref(), Some(&b"k0"[..]));
    // Rejected rows are finished too: every row is marked.
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL"
        )),
        0
    );
    let sources: Vec<String> = pg
        .query(
            &format!(
                "SELECT source FROM {schema}.dead_letters WHERE dlq = 'outbox.dlq' ORDER BY id"
            ),
            &[],
        )
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        sources,
        vec![
            format!("in/-/{}", row_id + 7),
            format!("in/-/{}", row_id + 13)
        ]
    );

    // Fixed handler; the replay writes the two rows back into the outbox.
    let config = write(true);
    let mut run = start_run(dir.path(), &config, 2, None, "lockgate=info,warn");
    let out = lockgate(
        dir.path(),
        &["dlq", "replay", "--config", config.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains("replayed 2 dead letters"),
        "{}",
        show(&out)
    );
    assert!(
        show(&out).contains("results: 2 handled, 0 skipped"),
        "{}",
        show(&out)
    );
    wait_until(dir.path(), &mut [&mut run], 2, 20, relayed);
    stop_run(&mut run, dir.path(), 2);
    assert_eq!(relayed(), 20);
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM {schema}.outbox WHERE lockgate_id LIKE 'relay:replay:outbox.dlq/-/%' AND published_at IS NOT NULL"
        )),
        2
    );
    let ids: BTreeSet<u64> = broker
        .read("relayed", 0, 100)
        .unwrap()
        .iter()
        .map(|r| id_of(&String::from_utf8_lossy(&r.payload)))
        .collect();
    assert_eq!(ids, (0..20).collect());
    pg.drop_schema(&schema);
}

/// The idempotent processor (guest-examples/orders-sql): an order row by the handler's SQL, the
/// message's key and the outbox row of its event commit in one transaction. 400 orders, 40 of
/// them sent again as new messages and 10 the table refuses: one row and one outbox row per
/// accepted order, none for a refused one (rejected with the server's reason), none twice.
#[test]
fn the_sql_processor_commits_its_row_its_key_and_its_outbox_row_together() {
    let pg = SyncPg::connect();
    let schema = pg::unique_schema("lgorders");
    pg.exec(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.orders (order_id text PRIMARY KEY,
         customer text NOT NULL, total numeric(12,2) NOT NULL CHECK (total > 0))"
    ));
    const ORDERS: u64 = 400;
    let order = |i: u64| {
        let total = if i % 40 == 7 {
            "-1.00".to_owned() // breaks the CHECK: rejected
        } else {
            format!("{}.{:02}", i % 90 + 1, i % 100)
        };
        let payload = serde_json::json!({"order_id": format!("o-{i}"), "customer": format!("c-{}", i % 13), "total": total});
        (
            format!("o-{i}").into_bytes(),
            payload.to_string().into_bytes(),
        )
    };
    let mut messages: Vec<_> = (0..ORDERS).map(order).collect();
    // A client submitting again: the same orders as new messages, after the first ones.
    messages.extend((0..ORDERS).filter(|i| i % 10 == 3).map(order));
    let refused = (0..ORDERS).filter(|i| i % 40 == 7).count() as u64;
    let table = format!("{schema}.orders");
    let run = lockgate_tests::sqlroute::SqlRoute {
        module: &guest("orders-sql"),
        config: &[("table", &table), ("events", "out")],
        schema: &schema,
        key: "json:/order_id",
        concurrency: 8,
        timeout_ms: 10_000,
        role: None,
    }
    .run_outbox(messages);

    assert_eq!(run.dead, refused, "{:?}", run.dead_reasons);
    assert!(
        run.dead_reasons
            .iter()
            .all(|r| r.contains("23514") && r.contains("orders_total_check")),
        "{:?}",
        run.dead_reasons
    );
    let accepted: BTreeSet<String> = (0..ORDERS)
        .filter(|i| i % 40 != 7)
        .map(|i| format!("o-{i}"))
        .collect();
    let rows: Vec<String> = pg
        .query(&format!("SELECT order_id FROM {table}"), &[])
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows.len(), accepted.len(), "one row per accepted order");
    assert_eq!(rows.into_iter().collect::<BTreeSet<_>>(), accepted);
    let events: Vec<(String, serde_json::Value)> = pg
        .query(
            &format!("SELECT topic, convert_from(payload, 'UTF8') FROM {schema}.outbox"),
            &[],
        )
        .iter()
        .map(|r| {
            let payload: String = r.get(1);
            (r.get(0), serde_json::from_str(&payload).unwrap())
        })
        .collect();
    assert_eq!(
        events.len(),
        accepted.len(),
        "one outbox row per accepted order"
    );
    let event_orders: BTreeSet<String> = events
        .iter()
        .map(|(topic, e)| {
            assert_eq!(
                (topic.as_str(), &e["event"]),
                ("out", &serde_json::json!("order-accepted"))
            );
            e["order_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(event_orders, accepted);
    // The totals in the table are the orders' own, to the cent.
    let sum: String = pg.query(&format!("SELECT sum(total)::text FROM {table}"), &[])[0].get(0);
    let want: u64 = (0..ORDERS)
        .filter(|i| i % 40 != 7)
        .map(|i| (i % 90 + 1) * 100 + i % 100)
        .sum();
    assert_eq!(sum, format!("{}.{:02}", want / 100, want % 100));
    // Each key was claimed inside its message's transaction and written as done there: no
    // row of lockgate's idempotency table was ever updated (a claim committed on its own and
    // marked at the commit updates every accepted order's row). The server's table counters
    // come from its backends once they are idle: wait until the committed rows show.
    let keys = ORDERS;
    let stats = format!(
        "SELECT n_live_tup, n_tup_upd FROM pg_stat_user_tables
         WHERE schemaname = '{schema}' AND relname = 'idempotency'"
    );
    let started = std::time::Instant::now();
    let (live, updated) = loop {
        let row = &pg.query(&stats, &[])[0];
        let (live, updated): (i64, i64) = (row.get(0), row.get(1));
        if live as u64 >= keys || started.elapsed() > std::time::Duration::from_secs(30) {
            break (live as u64, updated);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(live, keys, "one key per order (accepted or dead-lettered)");
    assert_eq!(updated, 0, "a key's row was updated after its claim");
    pg.drop_schema(&schema);
}
