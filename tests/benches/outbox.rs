//! The transactional outbox, measured in one run:
//!
//! 1. Relay throughput: 50,000 rows written by SQL, relayed to Kafka by lockgate's outbox relay
//!    (a route with the `postgres_outbox` source and no handler, in process) next to the classic
//!    hand-written relay loop: `BEGIN; SELECT ... FOR UPDATE SKIP LOCKED LIMIT 256`, publish
//!    the batch with rdkafka and await every ack, `UPDATE ... SET published_at`, `COMMIT`.
//!    Both are timed from start to the last row marked published; rounds alternate the arms.
//! 2. What outbox mode costs per message: a route of the `chaos` guest (one kv write per
//!    message) with idempotency on PostgreSQL, publishing its outputs to the in-memory broker
//!    (`mode = "publish"`) or writing them to the outbox (`mode = "outbox"`).
//!
//! Needs Kafka and PostgreSQL on 127.0.0.1 (`scripts/brokers.sh start kafka postgres`).
//! Run: `cargo bench -p lockgate-tests --bench outbox`. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::broker::Sink;
use lockgate::broker::kafka::KafkaSink;
use lockgate::broker::memory::MemoryBroker;
use lockgate::broker::pg_outbox::OutboxRelay;
use lockgate::config::Isolation;
use lockgate::config::{BrokerKind, Config, SourceSpec};
use lockgate::engine::{Engine, EngineSettings, HandlerEnv, HandlerLimits, InstancePool};
use lockgate::message::OutRecord;
use lockgate::pipeline::Passthrough;
use lockgate::pipeline::idempotency::DoneKeys;
use lockgate::pipeline::{Route, RouteSinks, Shutdown};
use lockgate::state::{KvStore, PostgresStore};
use lockgate_tests::kafka::{bootstrap, create_topics, runtime, unique};
use lockgate_tests::pg;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const ROWS: u64 = 50_000;
const ROUNDS: usize = 3;
const MESSAGES: u64 = 5_000;

async fn client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(pg::URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn config(schema: &str, extra: &str) -> Config {
    let text = format!(
        "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"{}\"\n\n[stores.pg]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\n\n{extra}",
        bootstrap(),
        pg::URL
    );
    Config::parse(Path::new("bench.toml"), &text).unwrap()
}

/// A fresh schema holding `ROWS` unpublished rows for `topic`, 100 aggregates, 100 B payloads.
async fn fill(schema: &str, topic: &str) {
    let store = PostgresStore::new(pg::URL, schema, 2).unwrap();
    store.migrate().await.unwrap();
    client()
        .await
        .batch_execute(&format!(
            "INSERT INTO {schema}.outbox (topic, key, payload)
             SELECT '{topic}', convert_to('agg-' || (n % 100), 'UTF8'), convert_to(repeat('x', 100), 'UTF8')
             FROM generate_series(1, {ROWS}) AS n ORDER BY n"
        ))
        .await
        .unwrap();
}

async fn unpublished(c: &tokio_postgres::Client, schema: &str) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {schema}.outbox WHERE published_at IS NULL"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Rows per second lockgate's relay (8 lanes by key) moves from the table to Kafka.
async fn lockgate_relay(schema: &str, topic: &str) -> f64 {
    fill(schema, topic).await;
    let config = config(
        schema,
        "[routes.relay]\nsource = { outbox = \"pg\" }\noutputs = { broker = \"kafka\" }\nordering = \"key\"\nconcurrency = 8\n",
    );
    let route = config.routes["relay"].clone();
    let BrokerKind::Kafka(kafka) = &config.brokers["kafka"].kind else {
        unreachable!()
    };
    let sink: Arc<dyn Sink> = Arc::new(KafkaSink::new("kafka", kafka).unwrap());
    let store = PostgresStore::new(pg::URL, schema, 4).unwrap();
    let c = client().await;
    let start = Instant::now();
    let SourceSpec::Outbox(settings) = route.source.clone() else {
        unreachable!("the relay route reads an outbox")
    };
    let source = OutboxRelay::new(store, settings);
    let r = Route::new(
        route,
        Arc::new(Passthrough),
        RouteSinks {
            outputs: sink.clone(),
            dlq: sink,
            replies: None,
        },
        None,
    );
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(r.run(Box::new(source), shutdown));
    while unpublished(&c, schema).await > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = start.elapsed();
    trigger.trigger();
    task.await.unwrap();
    ROWS as f64 / took.as_secs_f64()
}

/// Rows per second of the hand-written relay loop.
async fn plain_loop(schema: &str, topic: &str) -> f64 {
    fill(schema, topic).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut c = client().await;
    let select = format!(
        "SELECT id, topic, key, payload FROM {schema}.outbox WHERE published_at IS NULL
         ORDER BY id LIMIT 256 FOR UPDATE SKIP LOCKED"
    );
    let mark = format!("UPDATE {schema}.outbox SET published_at = now() WHERE id = ANY($1)");
    let start = Instant::now();
    loop {
        let tx = c.transaction().await.unwrap();
        let rows = tx.query(&select, &[]).await.unwrap();
        if rows.is_empty() {
            break;
        }
        let sends: Vec<_> = rows
            .iter()
            .map(|r| {
                let topic: String = r.get(1);
                let key: Option<Vec<u8>> = r.get(2);
                let payload: Vec<u8> = r.get(3);
                let producer = producer.clone();
                async move {
                    let mut rec = FutureRecord::to(&topic).payload(&payload);
                    if let Some(k) = &key {
                        rec = rec.key(k);
                    }
                    producer
                        .send(rec, Duration::from_secs(30))
                        .await
                        .map_err(|(e, _)| e)
                        .unwrap();
                }
            })
            .collect();
        futures_util::future::join_all(sends).await;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        tx.execute(&mark, &[&ids]).await.unwrap();
        tx.commit().await.unwrap();
    }
    ROWS as f64 / start.elapsed().as_secs_f64()
}

/// Messages per second of the `chaos` route with idempotency on PostgreSQL, in `mode`.
async fn route_rate(engine: &Engine, mode: &str) -> f64 {
    let schema = unique("lgbench").replace('-', "_");
    let config = config(
        &schema,
        &format!(
            "[handlers.chaos]\nmodule = \"chaos.wasm\"\n\n[routes.orders]\nhandler = \"chaos\"\nsource = {{ topic = \"in\" }}\nstate = \"pg\"\noutputs = {{ topics = [\"out\"], mode = \"{mode}\" }}\nconcurrency = 8\nordering = \"key\"\nidempotency = {{ key = \"json:/id\" }}\n"
        ),
    );
    let route = config.routes["orders"].clone();
    let store = Arc::new(PostgresStore::new(pg::URL, &schema, 16).unwrap());
    store.migrate().await.unwrap();
    let env = HandlerEnv {
        name: "chaos".into(),
        config: [("target", "out"), ("count_effects", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        outputs: None,
        limits: HandlerLimits::default(),
        kv: store.clone() as Arc<dyn KvStore>,
        http: None,
        sql: None,
        wasi: lockgate::config::WasiGrants::default(),
    };
    let handler = engine
        .load_handler(&lockgate_tests::guest("chaos"), env)
        .unwrap();
    let pool = InstancePool::new(handler, Isolation::Reuse, 10_000);
    let broker = MemoryBroker::new();
    broker.produce(
        "in",
        (0..MESSAGES).map(|i| OutRecord {
            topic: "in".into(),
            key: Some(format!("k{}", i % 64).into_bytes()),
            headers: vec![],
            payload: format!(r#"{{"id":{i}}}"#).into_bytes(),
        }),
    );
    let sink: Arc<dyn Sink> = Arc::new(broker.sink());
    let done_keys = DoneKeys::new(
        store.clone(),
        "orders",
        Duration::from_secs(3600),
        Duration::from_secs(30),
    );
    let r = Route::new(
        route,
        Arc::new(pool),
        RouteSinks {
            outputs: sink.clone(),
            dlq: sink,
            replies: None,
        },
        Some(done_keys),
    );
    let (trigger, shutdown) = Shutdown::new();
    let start = Instant::now();
    let task = tokio::spawn(r.run(Box::new(broker.source("in", "g")), shutdown));
    broker.wait_acked(MESSAGES).await;
    let took = start.elapsed();
    trigger.trigger();
    task.await.unwrap();
    drop_schema(&schema).await;
    MESSAGES as f64 / took.as_secs_f64()
}

async fn drop_schema(schema: &str) {
    client()
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
}

fn main() {
    let rt = runtime();
    let topics: Vec<String> = (0..ROUNDS).map(|_| unique("outbox-bench")).collect();
    for t in &topics {
        create_topics(&rt, &[(t, 3)]);
    }
    rt.block_on(async {
        let (mut lg, mut plain) = (Vec::new(), Vec::new());
        for (round, topic) in topics.iter().enumerate() {
            let (a, b) = (
                unique("lgbench").replace('-', "_"),
                unique("lgbench").replace('-', "_"),
            );
            if round % 2 == 0 {
                lg.push(lockgate_relay(&a, topic).await);
                plain.push(plain_loop(&b, topic).await);
            } else {
                plain.push(plain_loop(&b, topic).await);
                lg.push(lockgate_relay(&a, topic).await);
            }
            drop_schema(&a).await;
            drop_schema(&b).await;
            eprintln!(
                "round {round}: lockgate relay {:.0} rows/s, plain loop {:.0} rows/s",
                lg[round], plain[round]
            );
        }
        let ratios: Vec<f64> = lg.iter().zip(&plain).map(|(l, p)| l / p).collect();
        let (l, llo, lhi) = lockgate_tests::median_spread(&lg);
        let (p, plo, phi) = lockgate_tests::median_spread(&plain);
        let (q, qlo, qhi) = lockgate_tests::median_spread(&ratios);
        println!("Relay: {ROWS} rows x {ROUNDS} rounds to Kafka (3 partitions), 100 B payloads");
        println!("| arm | rows/s (median) | min..max |");
        println!("|---|---|---|");
        println!("| lockgate outbox relay, 8 lanes by key | {l:.0} | {llo:.0}..{lhi:.0} |");
        println!("| plain SQL loop (select 256, publish, update, commit) | {p:.0} | {plo:.0}..{phi:.0} |");
        println!("| ratio lockgate / plain | {q:.2} | {qlo:.2}..{qhi:.2} |");

        let engine = Engine::new(&EngineSettings::default()).unwrap();
        let (mut publish, mut outbox) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                publish.push(route_rate(&engine, "publish").await);
                outbox.push(route_rate(&engine, "outbox").await);
            } else {
                outbox.push(route_rate(&engine, "outbox").await);
                publish.push(route_rate(&engine, "publish").await);
            }
        }
        let (pu, _, _) = lockgate_tests::median_spread(&publish);
        let (ob, _, _) = lockgate_tests::median_spread(&outbox);
        println!();
        println!(
            "Outbox mode: {MESSAGES} messages x {ROUNDS} rounds, chaos guest (one kv write each), 8 lanes, idempotency on PostgreSQL"
        );
        println!("| outputs | msgs/s (median) | µs per message |");
        println!("|---|---|---|");
        println!("| published (memory broker) | {pu:.0} | {:.0} |", 1e6 / pu);
        println!("| outbox rows | {ob:.0} | {:.0} |", 1e6 / ob);
        println!(
            "| outbox cost per message | | {:+.0} µs ({:.2}x) |",
            1e6 / ob - 1e6 / pu,
            pu / ob
        );
    });
}
