//! Three `lockgate run` processes share one Kafka consumer group (or one JetStream durable
//! consumer) and one state store (Redis, PostgreSQL, or each its own embedded store), while
//! processes are SIGKILLed and restarted mid-stream. With a shared store nothing is lost and no handler effect runs twice; with
//! embedded stores nothing is lost either, but an effect can run once per process that saw the
//! message (the number is printed, and quoted in docs/operate/state-stores.md).
//!
//! Needs Kafka, NATS, Redis and PostgreSQL on 127.0.0.1 (`scripts/brokers.sh start`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lockgate::state::{EmbeddedStore, KvStore};
use lockgate_tests::kafka::{Tail, bootstrap, create_topics, id_of, produce, runtime, unique};
use lockgate_tests::nats::Nats;
use lockgate_tests::pg::{self, SyncPg};
use lockgate_tests::{Proc, crash_mix, guest, run_logs, start_run};

const N: u64 = 30_000;
const PROCESSES: usize = 3;
/// Progress points at which one process (in turn) is SIGKILLed and restarted.
const KILLS: [usize; 4] = [5_000, 11_000, 17_000, 23_000];
const DEADLINE: Duration = Duration::from_secs(900);
const REDIS: &str = "redis://127.0.0.1:6379";

#[derive(Clone, Debug)]
enum Store {
    Redis {
        prefix: String,
    },
    Postgres {
        schema: String,
    },
    /// Each process its own embedded store.
    Embedded,
}

impl Store {
    fn toml(&self) -> String {
        match self {
            Self::Redis { prefix } => format!(
                "[stores.shared]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{prefix}\"\n"
            ),
            Self::Postgres { schema } => format!(
                "[stores.shared]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\npool_size = 8\n",
                pg::URL
            ),
            Self::Embedded => String::new(),
        }
    }

    /// How many times each order's effect ran, from the store(s) after the runs.
    fn effects(&self, dir: &Path) -> BTreeMap<u64, u64> {
        let parse = |v: &[u8]| -> u64 { String::from_utf8_lossy(v).parse().unwrap() };
        let mut counts = BTreeMap::new();
        match self {
            Self::Redis { prefix } => {
                let client = redis::Client::open(REDIS).unwrap();
                let mut c = client.get_connection().unwrap();
                let ids: Vec<u64> = (0..N).collect();
                for chunk in ids.chunks(2_000) {
                    let mut pipe = redis::pipe();
                    for id in chunk {
                        pipe.hget(format!("{prefix}:kv:5:chaos:effects/{id}"), "v");
                    }
                    let values: Vec<Option<Vec<u8>>> = pipe.query(&mut c).unwrap();
                    for (id, v) in chunk.iter().zip(values) {
                        if let Some(v) = v {
                            counts.insert(*id, parse(&v));
                        }
                    }
                }
            }
            Self::Postgres { schema } => {
                let client = SyncPg::connect();
                for row in client.query(
                    &format!("SELECT key, value FROM {schema}.kv WHERE namespace = 'chaos'"),
                    &[],
                ) {
                    let key: String = row.get(0);
                    let id = key.strip_prefix("effects/").unwrap().parse().unwrap();
                    counts.insert(id, parse(&row.get::<_, Vec<u8>>(1)));
                }
            }
            Self::Embedded => {
                // One store per process: an effect that ran in two processes counts twice.
                for slot in 0..PROCESSES {
                    let store =
                        EmbeddedStore::open(&dir.join(format!("s{slot}/state.redb"))).unwrap();
                    for id in 0..N {
                        if let Some(v) = store.get("chaos", &format!("effects/{id}"), 0).unwrap() {
                            *counts.entry(id).or_default() += parse(&v);
                        }
                    }
                }
            }
        }
        counts
    }

    fn clean_up(&self) {
        match self {
            Self::Redis { prefix } => {
                let client = redis::Client::open(REDIS).unwrap();
                let mut c = client.get_connection().unwrap();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{prefix}:*"))
                    .query(&mut c)
                    .unwrap();
                for chunk in keys.chunks(5_000) {
                    redis::cmd("DEL").arg(chunk).query::<()>(&mut c).unwrap();
                }
            }
            Self::Postgres { schema } => {
                SyncPg::connect().drop_schema(schema);
            }
            Self::Embedded => {}
        }
    }
}

/// Where the orders come from and the outputs go, with a reader of what arrived.
enum Bus {
    Kafka {
        input: String,
        out: String,
        dlq: String,
        group: String,
        tail: Tail,
    },
    JetStream {
        base: String,
        nats: Box<Nats>,
    },
}

impl Bus {
    /// Creates the topics (streams) and puts the orders on the input.
    fn kafka(orders: &[(String, String)]) -> Self {
        let rt = runtime();
        let base = unique("scale");
        let (input, out, dlq) = (
            format!("{base}.in"),
            format!("{base}.out"),
            format!("{base}.dlq"),
        );
        create_topics(&rt, &[(&input, 6), (&out, 3), (&dlq, 1)]);
        produce(&rt, &input, orders);
        let tail = Tail::new(&[(&out, 3), (&dlq, 1)]);
        Self::Kafka {
            group: format!("{base}.group"),
            input,
            out,
            dlq,
            tail,
        }
    }

    fn jetstream(orders: &[(String, String)]) -> Self {
        let nats = Nats::connect();
        let base = unique("scale");
        for what in ["in", "out", "dlq"] {
            nats.create_stream(&format!("{base}-{what}"), &[&format!("{base}.{what}")]);
        }
        let messages: Vec<(String, Option<String>, String)> = orders
            .iter()
            .map(|(k, p)| (format!("{base}.in"), Some(k.clone()), p.clone()))
            .collect();
        nats.publish(&messages);
        Self::JetStream {
            base,
            nats: Box::new(nats),
        }
    }

    fn toml(&self) -> String {
        match self {
            Self::Kafka {
                input,
                out,
                dlq,
                group,
                ..
            } => format!(
                r#"[brokers.kafka]
kind = "kafka"
bootstrap_servers = "{bootstrap}"
consumer_properties = {{ "session.timeout.ms" = 6000, "max.poll.interval.ms" = 10000 }}

[handlers.chaos]
module = "{module}"
config = {{ target = "{out}", count_effects = "true" }}

[routes.orders]
source = {{ broker = "kafka", topic = "{input}", group = "{group}" }}
outputs = ["{out}"]
dlq = {{ topic = "{dlq}" }}
"#,
                bootstrap = bootstrap(),
                module = guest("chaos").display(),
            ),
            Self::JetStream { base, .. } => format!(
                r#"[brokers.nats]
kind = "nats"
servers = ["{server}"]

[handlers.chaos]
module = "{module}"
config = {{ target = "{base}.out", count_effects = "true" }}

[routes.orders]
source = {{ broker = "nats", stream = "{base}-in", topic = "{base}.in", group = "{base}-worker", ack_wait_ms = 5000 }}
outputs = ["{base}.out"]
dlq = {{ topic = "{base}.dlq" }}
"#,
                server = lockgate_tests::nats::url(),
                module = guest("chaos").display(),
            ),
        }
    }

    /// Distinct orders that reached the output or dead-letter topic so far.
    fn progress(&mut self) -> usize {
        match self {
            Self::Kafka { tail, .. } => {
                tail.drain(Duration::from_millis(200));
                tail.ids().len()
            }
            // The output stream drops repeats by Nats-Msg-Id: a count is a count of orders.
            Self::JetStream { base, nats } => {
                std::thread::sleep(Duration::from_millis(100));
                (nats.count(&format!("{base}-out")) + nats.count(&format!("{base}-dlq"))) as usize
            }
        }
    }

    /// Every output (order id, `lockgate-id` header) and the dead-lettered order ids.
    fn results(&mut self) -> (Vec<(u64, Option<String>)>, BTreeSet<u64>) {
        match self {
            Self::Kafka { out, dlq, tail, .. } => {
                tail.drain(Duration::from_secs(2));
                let outputs = tail
                    .records(out)
                    .iter()
                    .map(|g| (id_of(&g.payload), g.headers.get("lockgate-id").cloned()))
                    .collect();
                let dead = tail
                    .records(dlq)
                    .iter()
                    .map(|g| id_of(&g.payload))
                    .collect();
                (outputs, dead)
            }
            Self::JetStream { base, nats } => {
                let outputs = nats
                    .read(&format!("{base}-out"))
                    .iter()
                    .map(|g| (id_of(&g.payload), g.headers.get("lockgate-id").cloned()))
                    .collect();
                let dead = nats
                    .read(&format!("{base}-dlq"))
                    .iter()
                    .map(|g| id_of(&g.payload))
                    .collect();
                (outputs, dead)
            }
        }
    }

    fn is_kafka(&self) -> bool {
        matches!(self, Self::Kafka { .. })
    }
}

fn write_config(dir: &Path, bus: &Bus, store: &Store) -> PathBuf {
    let state = match store {
        Store::Embedded => "",
        _ => "state = \"shared\"\n",
    };
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"version = 1
[runtime]
shutdown_grace_ms = 5000
{state}
{stores}
{bus}handler = "chaos"
concurrency = 8
ordering = "key"
max_batch = 4
retry = {{ max_attempts = 4, initial_backoff_ms = 5, max_backoff_ms = 50 }}
idempotency = {{ key = "json:/id", lease_ms = 3000 }}
"#,
            stores = store.toml(),
            bus = bus.toml(),
        ),
    )
    .unwrap();
    config
}

/// The processes, one per slot, each slot with its own state directory; a restarted slot gets
/// a new run number (its logs are `run<N>.*`).
struct Fleet {
    dir: PathBuf,
    config: PathBuf,
    procs: Vec<(u32, Proc)>,
    next_run: u32,
}

impl Fleet {
    fn start(dir: &Path, config: &Path) -> Self {
        let mut f = Self {
            dir: dir.to_owned(),
            config: config.to_owned(),
            procs: Vec::new(),
            next_run: 1,
        };
        for slot in 0..PROCESSES {
            let p = f.spawn(slot);
            f.procs.push(p);
        }
        f
    }

    fn spawn(&mut self, slot: usize) -> (u32, Proc) {
        let run = self.next_run;
        self.next_run += 1;
        let state = self.dir.join(format!("s{slot}"));
        let child = start_run(
            &self.dir,
            &self.config,
            run,
            Some(&state),
            "lockgate=info,warn",
        );
        (run, child)
    }

    fn kill_and_restart(&mut self, slot: usize) {
        let (_, child) = &mut self.procs[slot];
        child.kill().unwrap();
        child.wait().unwrap();
        let p = self.spawn(slot);
        self.procs[slot] = p;
    }

    /// Fails with every live run's logs if a process exited.
    fn assert_alive(&mut self) {
        for i in 0..self.procs.len() {
            let (run, child) = &mut self.procs[i];
            if let Some(status) = child.try_wait().unwrap() {
                let run = *run;
                panic!("run {run} exited ({status})\n{}", run_logs(&self.dir, run));
            }
        }
    }

    fn logs(&self) -> String {
        (1..self.next_run)
            .map(|r| run_logs(&self.dir, r))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn stop(mut self) {
        for (run, child) in &mut self.procs {
            lockgate_tests::stop_run(child, &self.dir, *run);
        }
        self.procs.clear();
    }
}

/// Waits until `target` distinct orders reached the output or dead-letter topic.
fn wait_for(bus: &mut Bus, fleet: &mut Fleet, target: usize) {
    let started = Instant::now();
    loop {
        let done = bus.progress();
        if done >= target {
            return;
        }
        fleet.assert_alive();
        assert!(
            started.elapsed() < DEADLINE,
            "only {done} of {target} orders after {DEADLINE:?}\n{}",
            fleet.logs()
        );
    }
}

/// What a scenario measured.
struct Measured {
    /// Orders whose effect ran more than once.
    repeated_effects: usize,
    /// Outputs beyond one per order (same `lockgate-id`: a deduplicating consumer drops them).
    repeated_outputs: usize,
}

/// One scenario at a time: each runs three runtimes, and five at once would measure the
/// machine rather than lockgate.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scenario(kafka: bool, store: &Store) -> Measured {
    let _one_at_a_time = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let poison = |i: u64| i % 100 == 42;
    let orders = lockgate_tests::orders(N, 97, crash_mix);
    let mut bus = if kafka {
        Bus::kafka(&orders)
    } else {
        Bus::jetstream(&orders)
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &bus, store);
    let mut fleet = Fleet::start(dir.path(), &config);
    for (k, at) in KILLS.iter().enumerate() {
        wait_for(&mut bus, &mut fleet, *at);
        fleet.kill_and_restart(k % PROCESSES);
    }
    wait_for(&mut bus, &mut fleet, N as usize);
    let logs = fleet.logs();
    fleet.stop();

    // Nothing lost: every order is an output or (poison) a dead letter.
    let (out, dead) = bus.results();
    let mut outputs: BTreeMap<u64, usize> = BTreeMap::new();
    for (id, lockgate_id) in &out {
        *outputs.entry(*id).or_default() += 1;
        // Repeats carry the same deterministic id, so a consumer can drop them.
        assert_eq!(
            lockgate_id.as_deref(),
            Some(format!("orders:key:{id}:0").as_str())
        );
    }
    let want: BTreeSet<u64> = (0..N).filter(|i| !poison(*i)).collect();
    let got: BTreeSet<u64> = outputs.keys().copied().collect();
    assert_eq!(
        got.difference(&want).count() + want.difference(&got).count(),
        0,
        "outputs: missing {:?}, unexpected {:?}",
        want.difference(&got).take(20).collect::<Vec<_>>(),
        got.difference(&want).take(20).collect::<Vec<_>>()
    );
    assert_eq!(dead, (0..N).filter(|i| poison(*i)).collect());

    let effects = store.effects(dir.path());
    let missing: Vec<u64> = want
        .iter()
        .filter(|id| !effects.contains_key(id))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} orders without their effect (first {:?})",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        effects.keys().all(|id| !poison(*id)),
        "a rejected order left an effect"
    );
    // Every process took part (Kafka says so in its log; JetStream has no assignment).
    if bus.is_kafka() {
        for run in 1..=PROCESSES as u32 {
            assert!(
                run_logs(dir.path(), run).contains("Partitions assigned"),
                "run {run} never got partitions\n{logs}"
            );
        }
    }
    store.clean_up();
    Measured {
        repeated_effects: effects.values().filter(|c| **c > 1).count(),
        repeated_outputs: outputs.values().map(|c| c - 1).sum(),
    }
}

fn redis() -> Store {
    Store::Redis {
        prefix: unique("lgscale"),
    }
}

fn postgres() -> Store {
    Store::Postgres {
        schema: unique("lgscale").replace('-', "_"),
    }
}

fn report(what: &str, m: &Measured) {
    eprintln!(
        "{what}: {} orders with a repeated effect, {} repeated outputs",
        m.repeated_effects, m.repeated_outputs
    );
}

#[test]
fn kafka_group_of_three_on_redis_loses_nothing_and_runs_each_effect_once() {
    let m = scenario(true, &redis());
    report("kafka, redis", &m);
    assert_eq!(m.repeated_effects, 0, "an effect ran twice");
}

#[test]
fn kafka_group_of_three_on_postgres_loses_nothing_and_runs_each_effect_once() {
    let m = scenario(true, &postgres());
    report("kafka, postgres", &m);
    assert_eq!(m.repeated_effects, 0, "an effect ran twice");
}

#[test]
fn jetstream_consumer_of_three_on_redis_loses_nothing_and_runs_each_effect_once() {
    let m = scenario(false, &redis());
    report("jetstream, redis", &m);
    assert_eq!(m.repeated_effects, 0, "an effect ran twice");
}

#[test]
fn jetstream_consumer_of_three_on_postgres_loses_nothing_and_runs_each_effect_once() {
    let m = scenario(false, &postgres());
    report("jetstream, postgres", &m);
    assert_eq!(m.repeated_effects, 0, "an effect ran twice");
}

/// The reason to pick a shared store: the same run on per-process embedded stores loses
/// nothing, but a message that moves to another process (a kill, a rebalance) can run its
/// effect again there. The count depends on timing, so it is printed, not asserted.
#[test]
fn kafka_group_of_three_on_embedded_stores_loses_nothing() {
    let m = scenario(true, &Store::Embedded);
    report("kafka, embedded", &m);
}
