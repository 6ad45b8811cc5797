//! What idempotency costs per message on each state store, and what a route keeps of its
//! throughput on a shared store. Two parts, one run:
//!
//! 1. Store calls per message: claim + record done, one message at a time and 64 per call (what
//!    the claim batcher and a lane's batch do), and claim + commit one kv write + record done.
//! 2. A route on the in-memory broker with 8 lanes running the `chaos` guest, which increments a
//!    kv counter per message (so each message claims, commits its write and completes), on the
//!    embedded store, Redis and PostgreSQL; the ratio to the embedded store is the number the
//!    scale-out issue asks about (target: at least 2/3).
//!
//! Needs Redis and PostgreSQL on 127.0.0.1 (`scripts/brokers.sh start redis postgres`).
//! Run: `cargo bench -p lockgate-tests --bench idempotency`. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::broker::memory::MemoryBroker;
use lockgate::config::Config;
use lockgate::config::Isolation;
use lockgate::engine::{Engine, EngineSettings, HandlerEnv, HandlerLimits, InstancePool};
use lockgate::message::OutRecord;
use lockgate::pipeline::idempotency::DoneKeys;
use lockgate::pipeline::{Route, RouteSinks, Shutdown};
use lockgate::state::{
    ClaimRequest, Completion, EmbeddedStore, IdempotencyStore, KvStore, KvWrite, PostgresStore,
    RedisStore, StateStore,
};

const REDIS: &str = "redis://127.0.0.1:6379";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

fn stores(dir: &Path) -> Vec<StateStore> {
    let embedded: Arc<dyn KvStore> =
        Arc::new(EmbeddedStore::open(&dir.join("bench.redb")).unwrap());
    vec![
        StateStore::local("embedded", embedded),
        StateStore::shared(
            "redis",
            Arc::new(RedisStore::new(REDIS, &unique("lgbench")).unwrap()),
        ),
        StateStore::shared(
            "postgres",
            Arc::new(PostgresStore::new(POSTGRES, &unique("lgbench"), 16).unwrap()),
        ),
    ]
}

fn req(key: String) -> ClaimRequest {
    ClaimRequest::new(key, "bench")
}

/// Microseconds per message of claim + complete, `batch` messages per call.
async fn claim_and_complete(
    store: &dyn IdempotencyStore,
    scope: &str,
    n: usize,
    batch: usize,
) -> f64 {
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let start = Instant::now();
    for chunk in keys.chunks(batch) {
        store
            .claim(
                scope.into(),
                chunk.iter().cloned().map(req).collect(),
                LEASE,
            )
            .await
            .unwrap();
        store
            .complete(scope.into(), chunk.to_vec(), TTL, Completion::Done)
            .await
            .unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Microseconds per message of claim + commit (one kv write) + complete, one at a time.
async fn with_commit(store: &dyn IdempotencyStore, scope: &str, n: usize) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        let key = format!("c{i}");
        store
            .claim(scope.into(), vec![req(key.clone())], LEASE)
            .await
            .unwrap();
        let write = KvWrite {
            namespace: "bench".into(),
            key: format!("effects/{i}"),
            value: Some(b"1".to_vec()),
            expires_at_ms: None,
            expected: Some(None),
        };
        store
            .commit(
                scope.into(),
                req(key.clone()),
                vec![write],
                b"out".to_vec(),
                LEASE,
            )
            .await
            .unwrap();
        store
            .complete(scope.into(), vec![key], TTL, Completion::Done)
            .await
            .unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Messages per second of a route with 8 lanes on `store` (`None`: no idempotency at all).
async fn route_throughput(engine: &Engine, store: Option<&StateStore>, n: u64) -> f64 {
    let idempotency = if store.is_some() {
        "idempotency = { key = \"json:/id\" }\n"
    } else {
        ""
    };
    let text = format!(
        "[handlers.chaos]\nmodule = \"chaos.wasm\"\n\n[routes.orders]\nhandler = \"chaos\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\nconcurrency = 8\nordering = \"key\"\n{idempotency}"
    );
    let config = Config::parse(Path::new("bench.toml"), &text)
        .unwrap()
        .routes["orders"]
        .clone();
    let kv: Arc<dyn KvStore> = match store {
        Some(s) => s.kv.clone(),
        None => Arc::new(lockgate::state::MemoryStore::new()),
    };
    let env = HandlerEnv {
        name: "chaos".into(),
        config: [("target", "out"), ("count_effects", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        outputs: None,
        limits: HandlerLimits::default(),
        kv,
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
        (0..n).map(|i| OutRecord {
            topic: "in".into(),
            key: Some(format!("k{}", i % 64).into_bytes()),
            headers: vec![],
            payload: format!(r#"{{"id":{i}}}"#).into_bytes(),
        }),
    );
    let sink: Arc<dyn lockgate::broker::Sink> = Arc::new(broker.sink());
    let done_keys = store.map(|s| DoneKeys::new(s.idempotency.clone(), &unique("r"), TTL, LEASE));
    let route = Route::new(
        config,
        Arc::new(pool),
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
    broker.wait_acked(n).await;
    let took = start.elapsed();
    trigger.trigger();
    task.await.unwrap();
    n as f64 / took.as_secs_f64()
}

async fn drop_pg_schemas() {
    let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'lgbench_%'",
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let name: String = r.get(0);
        client
            .batch_execute(&format!("DROP SCHEMA {name} CASCADE"))
            .await
            .unwrap();
    }
}

fn drop_redis_keys() {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("lgbench_*").query(&mut c).unwrap();
    for chunk in keys.chunks(5_000) {
        redis::cmd("DEL").arg(chunk).query::<()>(&mut c).unwrap();
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let stores = stores(dir.path());
        println!("Store calls per message (µs)");
        println!(
            "{:<10} {:>16} {:>16} {:>22}",
            "store", "one at a time", "64 per call", "with a kv commit"
        );
        for s in &stores {
            let one = claim_and_complete(s.idempotency.as_ref(), "idempotency/one", 1_000, 1).await;
            let batched =
                claim_and_complete(s.idempotency.as_ref(), "idempotency/batch", 6_400, 64).await;
            let commit = with_commit(s.idempotency.as_ref(), "idempotency/commit", 1_000).await;
            println!("{:<10} {one:>16.1} {batched:>16.1} {commit:>22.1}", s.name);
        }

        let engine = Engine::new(&EngineSettings::default()).unwrap();
        const N: u64 = 20_000;
        // Warm up the compiled module and the allocator.
        route_throughput(&engine, None, 2_000).await;
        println!();
        println!("Route, 8 lanes, chaos guest counting each message's effect in kv ({N} messages)");
        let base = route_throughput(&engine, None, N).await;
        println!("{:<28} {:>10.0} msg/s", "no idempotency", base);
        let mut embedded = 0.0;
        for s in &stores {
            let rate = route_throughput(&engine, Some(s), N).await;
            if s.name == "embedded" {
                embedded = rate;
            }
            println!(
                "{:<28} {rate:>10.0} msg/s   {:.2} x embedded",
                format!("idempotency on {}", s.name),
                rate / embedded
            );
        }
        drop(stores);
        drop_pg_schemas().await;
    });
    drop_redis_keys();
}
