//! A handler's SQL committed with its message's idempotency key, against the hand-written
//! consumer doing the same job with tokio-postgres, measured in one run (issue 26).
//!
//! - Arm A, lockgate: the `ledger` guest (one `INSERT ... ON CONFLICT DO UPDATE SET balance =
//!   b.balance + $2` per deposit) on a route of the embedded broker, in process, `sql = "pg"`,
//!   `state = "pg"`, `idempotency = { key = "json:/deposit_id" }`, 8 lanes ordered by key.
//! - Arm B, hand-written: 8 tokio-postgres connections, one worker each, reading the same kind
//!   of topic of the embedded broker through the same source (so the broker's read and
//!   offset-commit cost is in both), each message sent to the worker of its key (ordered by key
//!   like the lanes), which runs `BEGIN`; claims the deposit id (`INSERT INTO processed ... ON
//!   CONFLICT DO NOTHING`, skipped if it was there); the same upsert; `COMMIT`; then acks.
//! - Arm C, replay (a breakdown): arm B sending lockgate's statement sequence instead (see
//!   [`Steps::LockgateLike`]), which tells what lockgate's statements cost from what the rest
//!   of lockgate (thread hand-offs, the guest, the pipeline) costs.
//!
//! Each round warms its arm up with 200 deposits (connections, prepared statements, the
//! compiled guest), then appends the measured deposits and times from the append to the
//! group's committed offset reaching the end: messages per second from first to last ack. The
//! embedded broker commits a group's offset at most every 100 ms, so the end is seen up to
//! 100 ms late: [`DEPOSITS`] is large enough that this stays a few percent of the faster arm's
//! time (with 5,000 it was a quarter of it, and every rate came out near 5,000/k s; with
//! 20,000 the rates still came in steps of 100 ms, which moved a round's ratio by up to 0.07).
//! Rounds rotate which arm goes first; the table shows medians over the rounds and the
//! median of the per-round ratios.
//!
//! Needs PostgreSQL on 127.0.0.1 (`scripts/brokers.sh start postgres`).
//! Run: `cargo bench -p lockgate-tests --bench sql_commit`. `SQL_COMMIT_ONLY=lockgate` (or
//! `=native`, `=replay`) runs one arm alone, for `perf`. Not a test: nothing is asserted but the balances.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use lockgate::broker::local::LocalBroker;
use lockgate::broker::{AckKind, Delivery, Source};
use lockgate::config::DEFAULT_GROUP;
use lockgate::message::OutRecord;
use lockgate_tests::{median_spread, pg};
use tokio::sync::mpsc;

const ROUNDS: usize = 5;
const DEPOSITS: u64 = 50_000;
const WARMUP: u64 = 200;
const ACCOUNTS: u64 = 500;
const LANES: usize = 8;

/// Deposits `from..to` as records of topic `in`, keyed by account.
fn deposits(from: u64, to: u64) -> Vec<OutRecord> {
    (from..to)
        .map(|i| {
            let account = format!("a{}", i % ACCOUNTS);
            OutRecord {
                topic: "in".into(),
                key: Some(account.clone().into_bytes()),
                headers: Vec::new(),
                payload: serde_json::json!({
                    "deposit_id": format!("d{i}"),
                    "account": account,
                    "amount": (i * 7919) % 1000 + 1,
                })
                .to_string()
                .into_bytes(),
            }
        })
        .collect()
}

async fn client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(pg::URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// A fresh schema with the ledger's table (and the hand-written consumer's claim table).
async fn create_schema(schema: &str) {
    client()
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.account_balances (account text PRIMARY KEY, balance bigint NOT NULL, deposits bigint NOT NULL);
             CREATE TABLE {schema}.processed (id text PRIMARY KEY);
             CREATE TABLE {schema}.keys (key text PRIMARY KEY, state text NOT NULL, owner text, until_ms bigint NOT NULL, outputs bytea);
             CREATE INDEX ON {schema}.keys (until_ms)"
        ))
        .await
        .unwrap();
}

/// Checks every deposit applied exactly once, and drops the schema.
async fn check_and_drop(schema: &str) {
    let c = client().await;
    let row = c
        .query_one(
            &format!(
                "SELECT coalesce(sum(deposits), 0)::bigint, coalesce(sum(balance), 0)::bigint FROM {schema}.account_balances"
            ),
            &[],
        )
        .await
        .unwrap();
    let want: i64 = (0..WARMUP + DEPOSITS)
        .map(|i| ((i * 7919) % 1000 + 1) as i64)
        .sum();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        ((WARMUP + DEPOSITS) as i64, want),
        "{schema}: every deposit applied once"
    );
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Polls the group's committed offset of `in` every 5 ms until it reaches `target`.
async fn committed(broker: &LocalBroker, group: &str, target: u64) {
    let started = Instant::now();
    while broker.committed("in", group).unwrap() < target {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{} of {target} committed after 300 s",
            broker.committed("in", group).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Appends the warm-up deposits, waits for them, then times the measured ones.
async fn measure(broker: &LocalBroker, group: &str) -> f64 {
    broker.append(&deposits(0, WARMUP)).unwrap();
    committed(broker, group, WARMUP).await;
    let records = deposits(WARMUP, WARMUP + DEPOSITS);
    let start = Instant::now();
    broker.append(&records).unwrap();
    committed(broker, group, WARMUP + DEPOSITS).await;
    DEPOSITS as f64 / start.elapsed().as_secs_f64()
}

/// Deposits per second through a lockgate route running the `ledger` guest.
async fn lockgate_round() -> f64 {
    let schema = pg::unique_schema("lgsqlbench");
    create_schema(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
watch = "off"

[stores.pg]
kind = "postgres"
url = "{url}"
schema = "{schema}"
pool_size = {LANES}

[handlers.ledger]
module = "{module}"
config = {{ table = "{schema}.account_balances" }}
sql = "pg"

[routes.deposits]
handler = "ledger"
source = {{ topic = "in" }}
state = "pg"
concurrency = {LANES}
ordering = "key"
idempotency = {{ key = "json:/deposit_id" }}
"#,
            url = pg::URL,
            module = lockgate_tests::guest("ledger").display(),
        ),
    )
    .unwrap();
    let runtime = lockgate_tests::inproc::start(&config).await;
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    let rate = measure(&broker, DEFAULT_GROUP).await;
    runtime.runtime.stop().await;
    check_and_drop(&schema).await;
    rate
}

/// What the hand-written consumer sends per message.
#[derive(Clone, Copy, PartialEq)]
enum Steps {
    /// `BEGIN`, claim the id, the upsert, `COMMIT`: 4 round trips, one commit.
    Plain,
    /// lockgate's statements, replayed by hand (to tell its round trips from its hand-offs):
    /// `BEGIN` and the claim of the key inside the transaction (written as done, with the
    /// lock timeout and the handler's statement timeout set in the statement, like
    /// `claim_in_txn` in `runtime/src/state/postgres/mod.rs`) in one round trip, the upsert,
    /// `COMMIT`: 3 round trips, one commit.
    LockgateLike,
}

/// One worker of the hand-written consumer: its own connection, its keys' messages in order.
async fn worker(schema: String, steps: Steps, mut rx: mpsc::Receiver<Delivery>) {
    let mut c = client().await;
    let claim = c
        .prepare(&format!(
            "INSERT INTO {schema}.processed (id) VALUES ($1) ON CONFLICT DO NOTHING"
        ))
        .await
        .unwrap();
    let upsert = c
        .prepare(&format!(
            "INSERT INTO {schema}.account_balances AS b (account, balance, deposits) VALUES ($1, $2, 1)
             ON CONFLICT (account) DO UPDATE SET balance = b.balance + $2, deposits = b.deposits + 1"
        ))
        .await
        .unwrap();
    let claim_in_txn = c
        .prepare(&format!(
            "WITH t AS (SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS now,
                    set_config('lock_timeout', '250ms', true)),
             up AS (INSERT INTO {schema}.keys AS k (key, state, owner, until_ms)
                    SELECT $1, 'd', $2, t.now + 86400000 FROM t
                    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner
                    WHERE k.until_ms <= excluded.until_ms - 86400000
                    RETURNING k.state)
             SELECT up.state, set_config('lock_timeout', '0', true),
                    set_config('statement_timeout', '30000', true)
             FROM t JOIN up ON true"
        ))
        .await
        .unwrap();
    let mut batch = Vec::new();
    while let Some(d) = rx.recv().await {
        batch.push(d);
        while batch.len() < 64
            && let Ok(d) = rx.try_recv()
        {
            batch.push(d);
        }
        for d in &mut batch {
            let deposit: serde_json::Value = serde_json::from_slice(&d.record.payload).unwrap();
            let (id, account, amount) = (
                deposit["deposit_id"].as_str().unwrap(),
                deposit["account"].as_str().unwrap(),
                deposit["amount"].as_i64().unwrap(),
            );
            match steps {
                Steps::Plain => {
                    let tx = c.transaction().await.unwrap();
                    if tx.execute(&claim, &[&id]).await.unwrap() == 1 {
                        tx.execute(&upsert, &[&account, &amount]).await.unwrap();
                        tx.commit().await.unwrap();
                    }
                    // A claimed id rolls back (drop) and is acknowledged: it was applied before.
                }
                Steps::LockgateLike => {
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &"owner"];
                    let (began, claimed) = futures_util::join!(
                        c.batch_execute("BEGIN"),
                        c.query_opt(&claim_in_txn, &params)
                    );
                    began.unwrap();
                    if claimed.unwrap().is_none() {
                        c.batch_execute("ROLLBACK").await.unwrap();
                        continue;
                    }
                    c.execute(&upsert, &[&account, &amount]).await.unwrap();
                    c.batch_execute("COMMIT").await.unwrap();
                }
            }
        }
        for d in batch.drain(..) {
            d.ack.ack(AckKind::Done).await.unwrap();
        }
    }
}

/// Deposits per second through the hand-written consumer.
async fn native_round(steps: Steps) -> f64 {
    let schema = pg::unique_schema("lgsqlbench");
    create_schema(&schema).await;
    let dir = tempfile::tempdir().unwrap();
    let broker = LocalBroker::open(&dir.path().join("local")).unwrap();
    let group = "native";
    let mut source = LocalBroker::open(&dir.path().join("local"))
        .unwrap()
        .source("in", group)
        .unwrap();
    let (mut lanes, mut workers) = (Vec::new(), Vec::new());
    for _ in 0..LANES {
        let (tx, rx) = mpsc::channel(64);
        lanes.push(tx);
        workers.push(tokio::spawn(worker(schema.clone(), steps, rx)));
    }
    let dispatch = tokio::spawn(async move {
        loop {
            let d = source.next().await.unwrap();
            let lane = d.record.key.as_deref().map_or(0, |k| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                h.finish() as usize % LANES
            });
            if lanes[lane].send(d).await.is_err() {
                break;
            }
        }
    });
    let rate = measure(&broker, group).await;
    dispatch.abort();
    let _ = dispatch.await;
    for w in workers {
        w.await.unwrap();
    }
    check_and_drop(&schema).await;
    rate
}

/// The arms, in the order of the table.
const ARMS: [&str; 3] = ["lockgate", "native", "replay"];

async fn round_of(arm: &str) -> f64 {
    match arm {
        "lockgate" => lockgate_round().await,
        "native" => native_round(Steps::Plain).await,
        _ => native_round(Steps::LockgateLike).await,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let only = std::env::var("SQL_COMMIT_ONLY").ok();
    let mut rates: [Vec<f64>; 3] = Default::default();
    rt.block_on(async {
        for round in 0..ROUNDS {
            // Each arm goes first, second and last in turn.
            for k in 0..ARMS.len() {
                let a = (round + k) % ARMS.len();
                if only.as_deref().is_none_or(|o| o == ARMS[a]) {
                    rates[a].push(round_of(ARMS[a]).await);
                }
            }
            eprintln!(
                "round {round}: {}",
                ARMS.iter()
                    .zip(&rates)
                    .map(|(a, r)| format!("{a} {:.0} msgs/s", r.last().copied().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    });
    if only.is_some() {
        return;
    }
    let [lg, native, replay] = &rates;
    let ratio = |of: &[f64], to: &[f64]| {
        let r: Vec<f64> = of.iter().zip(to).map(|(a, b)| a / b).collect();
        median_spread(&r)
    };
    println!(
        "{DEPOSITS} deposits on {ACCOUNTS} accounts x {ROUNDS} rounds, {LANES} lanes / workers, embedded broker"
    );
    println!("| arm | msgs/s (median) | min-max | µs per message |");
    println!("|---|---|---|---|");
    for (name, v) in [
        (
            "lockgate: `ledger` guest, sql + idempotency on PostgreSQL",
            lg,
        ),
        (
            "hand-written tokio-postgres: BEGIN, claim id, upsert, COMMIT",
            native,
        ),
        ("hand-written, replaying lockgate's statements", replay),
    ] {
        let (m, lo, hi) = median_spread(v);
        println!("| {name} | {m:.0} | {lo:.0}-{hi:.0} | {:.0} |", 1e6 / m);
    }
    let (q, qlo, qhi) = ratio(lg, native);
    println!(
        "| **ratio lockgate / hand-written** | **{q:.2}** | {qlo:.2}-{qhi:.2} | (target ≥ 0.7) |"
    );
    let (q, qlo, qhi) = ratio(replay, native);
    println!("| ratio replay / hand-written (statements alone) | {q:.2} | {qlo:.2}-{qhi:.2} | |");
    let (q, qlo, qhi) = ratio(lg, replay);
    println!(
        "| ratio lockgate / replay (everything but statements) | {q:.2} | {qlo:.2}-{qhi:.2} | |"
    );
}
