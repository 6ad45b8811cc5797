//! The shared state stores against real servers (`scripts/brokers.sh start redis postgres`):
//! guest kv semantics and idempotency claims pass the same suites as the embedded store, the
//! PostgreSQL schema migrates once under concurrent starters, and an unreachable store answers
//! with an error instead of hanging.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockgate::deadline::Deadline;
use lockgate::state::{
    IdempotencyStore, KvStore, POSTGRES_SCHEMA_VERSION, PostgresStore, RedisStore, StateError,
    conformance,
};

const REDIS: &str = "redis://127.0.0.1:6379";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A name no earlier run used, so each test starts from an empty store.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Drops a test schema (tests leave nothing behind in the shared server).
async fn drop_schema(schema: &str) {
    let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
}

/// Deletes every key under `prefix`.
async fn drop_prefix(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
}

async fn kv_suite(store: Arc<dyn KvStore>) {
    // The kv trait is synchronous (guests call it from a blocking thread).
    tokio::task::spawn_blocking(move || conformance::kv::run(store.as_ref()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kv_follows_the_shared_rules() {
    let prefix = unique("lgtest");
    let store = RedisStore::new(REDIS, &prefix).unwrap();
    store
        .ping()
        .await
        .expect("redis on 127.0.0.1:6379 (scripts/brokers.sh start redis)");
    kv_suite(Arc::new(store)).await;
    drop_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_claims_follow_the_shared_rules() {
    let prefix = unique("lgtest");
    let store = Arc::new(RedisStore::new(REDIS, &prefix).unwrap());
    conformance::claims::run(store.as_ref(), store.clone()).await;
    drop_prefix(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kv_follows_the_shared_rules() {
    let schema = unique("lgtest");
    let store = PostgresStore::new(POSTGRES, &schema, 4).unwrap();
    kv_suite(Arc::new(store)).await;
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claims_follow_the_shared_rules() {
    let schema = unique("lgtest");
    let store = Arc::new(PostgresStore::new(POSTGRES, &schema, 4).unwrap());
    conformance::claims::run(store.as_ref(), store.clone()).await;
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_migrates_once_under_concurrent_starters() {
    let schema = unique("lgtest");
    let stores: Vec<PostgresStore> = (0..4)
        .map(|_| PostgresStore::new(POSTGRES, &schema, 2).unwrap())
        .collect();
    let found: Vec<usize> = futures_util::future::join_all(stores.iter().map(|s| s.migrate()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Exactly one starter found an empty schema; the others found it migrated.
    assert_eq!(found.iter().filter(|v| **v == 0).count(), 1, "{found:?}");
    assert!(
        found
            .iter()
            .all(|v| *v == 0 || *v == POSTGRES_SCHEMA_VERSION),
        "{found:?}"
    );
    assert_eq!(stores[0].migrate().await.unwrap(), POSTGRES_SCHEMA_VERSION);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_claims_in_one_call_on_both_stores() {
    // The batch path: 500 keys, half of them done, in one call each way.
    let schema = unique("lgtest");
    let prefix = unique("lgtest");
    let stores: Vec<Box<dyn IdempotencyStore>> = vec![
        Box::new(RedisStore::new(REDIS, &prefix).unwrap()),
        Box::new(PostgresStore::new(POSTGRES, &schema, 2).unwrap()),
    ];
    for store in &stores {
        let keys: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
        store
            .complete(
                "s".into(),
                keys.iter().step_by(2).cloned().collect(),
                Duration::from_secs(60),
                lockgate::state::Completion::Done,
            )
            .await
            .unwrap();
        let requests = keys
            .iter()
            .map(|k| lockgate::state::ClaimRequest::new(k.clone(), "o"))
            .collect();
        let answers = store
            .claim("s".into(), requests, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(answers.len(), 500);
        for (i, a) in answers.iter().enumerate() {
            let want = if i % 2 == 0 {
                lockgate::state::Claim::Done
            } else {
                lockgate::state::Claim::Claimed
            };
            assert_eq!(*a, want, "key k{i}");
        }
    }
    drop_schema(&schema).await;
    drop_prefix(&prefix).await;
}

/// A store on a new schema with its tables created (and never analyzed), and a connection of
/// the test's own to look at them.
async fn migrated_store() -> (String, PostgresStore, tokio_postgres::Client) {
    let schema = unique("lgtest");
    let store = PostgresStore::new(POSTGRES, &schema, 2).unwrap();
    store.migrate().await.unwrap();
    let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    (schema, store, client)
}

/// The scans of `plan` (EXPLAIN's JSON) on `table` or its indexes that are not bounded by a
/// condition on `key`, as "node type on relation/index (condition)".
fn unkeyed_scans(plan: &serde_json::Value, table: &str, out: &mut Vec<String>) {
    let on = |f: &str| plan.get(f).and_then(|v| v.as_str()).unwrap_or("");
    let (relation, index) = (on("Relation Name"), on("Index Name"));
    let node = on("Node Type");
    if node == "Seq Scan" && relation == table {
        out.push(format!("{node} on {relation}"));
    }
    if index.starts_with(table) && !on("Index Cond").contains("key") {
        out.push(format!("{node} on {index} ({})", on("Index Cond")));
    }
    for child in plan
        .get("Plans")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        unkeyed_scans(child, table, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_batches_read_only_their_keys_on_a_new_table() {
    // PostgreSQL plans a prepared statement once for any parameters (its generic plan) and
    // keeps that plan until the table is analyzed again. Planned on a new, empty table, a
    // plain join of the batch with `idempotency` read every row of the route's scope, so each
    // claim got slower as the table grew. The claims (batched, and one key in a handler's
    // transaction) and the release must probe key by key whatever the table's statistics say.
    let (schema, store, client) = migrated_store().await;
    client
        .batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    for (name, sql, types) in store.key_batch_statements() {
        let args = match name {
            "claim" => {
                r#"'s', '[{"key": "k1", "owner": "o", "replay": false}, {"key": "k2", "owner": "o", "replay": false}]', 30000"#
            }
            "claim_in_txn" => "'s', 'k1', 'o', false, 30000, 3600000, '5000', NULL",
            "claim_held" => "'s', 'k1'",
            _ => "'s', ARRAY['k1', 'k2'], ARRAY['o', 'o']",
        };
        client
            .batch_execute(&format!("PREPARE {name}({types}) AS {sql}"))
            .await
            .unwrap();
        let explained = client
            .simple_query(&format!("EXPLAIN (FORMAT JSON) EXECUTE {name}({args})"))
            .await
            .unwrap();
        let text = explained
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        let plan: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut unkeyed = Vec::new();
        unkeyed_scans(&plan[0]["Plan"], "idempotency", &mut unkeyed);
        assert!(
            unkeyed.is_empty(),
            "{name} reads idempotency rows beyond its keys: {unkeyed:?}\n{text}"
        );
    }
    // Left to choose, PostgreSQL must settle on the claim's generic plan rather than plan it
    // again at every call (which cost more than running it): after five calls planned for
    // their values, the generic plan must win.
    client.batch_execute("RESET plan_cache_mode").await.unwrap();
    let [(_, claim, types), ..] = store.key_batch_statements();
    client
        .batch_execute(&format!("PREPARE settles({types}) AS {claim}"))
        .await
        .unwrap();
    for call in 0..12 {
        let batch: Vec<_> = (0..1 + call % 4)
            .map(|k| serde_json::json!({"key": format!("s{call}-{k}"), "owner": "o", "replay": false}))
            .collect();
        client
            .batch_execute(&format!(
                "EXECUTE settles('s', '{}', 30000)",
                serde_json::Value::Array(batch)
            ))
            .await
            .unwrap();
    }
    let plans = client
        .query_one(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'settles'",
            &[],
        )
        .await
        .unwrap();
    let (generic, custom): (i64, i64) = (plans.get(0), plans.get(1));
    assert!(
        generic >= 6 && custom <= 6,
        "the claim was planned for each call's values {custom} times of 12 (generic plan {generic})"
    );
    drop(client);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_deletes_every_expired_row_not_one_batch() {
    // A route expires as many keys a minute as it handles; one cleanup used to delete at most
    // 5,000 rows a table, so a busy route's tables grew without end. 12,000 keys and 6,000 kv
    // rows expired two minutes ago: one cleanup deletes them all, and keeps what has not
    // expired and applied keys whose outputs still wait for a publisher.
    let (schema, store, client) = migrated_store().await;
    let past = "(extract(epoch from clock_timestamp()) * 1000)::bigint - 120000";
    let future = "(extract(epoch from clock_timestamp()) * 1000)::bigint + 600000";
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.idempotency (scope, key, state, owner, until_ms)
               SELECT 's', 'old' || g, 'd', NULL, {past} FROM generate_series(1, 12000) g;
             INSERT INTO {schema}.idempotency (scope, key, state, owner, until_ms, outputs)
               VALUES ('s', 'applied', 'a', 'o', {past}, '\\x00');
             INSERT INTO {schema}.idempotency (scope, key, state, owner, until_ms)
               SELECT 's', 'new' || g, 'd', NULL, {future} FROM generate_series(1, 10) g;
             INSERT INTO {schema}.kv (namespace, key, value, expires_at_ms)
               SELECT 'n', 'old' || g, '\\x00', {past} FROM generate_series(1, 6000) g;
             INSERT INTO {schema}.kv (namespace, key, value, expires_at_ms)
               VALUES ('n', 'forever', '\\x00', NULL), ('n', 'later', '\\x00', {future});"
        ))
        .await
        .unwrap();
    assert_eq!(store.cleanup().await.unwrap(), 18_000);
    let left = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.idempotency),
                        (SELECT count(*) FROM {schema}.idempotency WHERE state = 'a'),
                        (SELECT count(*) FROM {schema}.kv)"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            left.get::<_, i64>(0),
            left.get::<_, i64>(1),
            left.get::<_, i64>(2)
        ),
        (11, 1, 2)
    );
    drop(client);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_errors_promptly() {
    // Nothing listens on port 1.
    let redis = Arc::new(RedisStore::new("redis://127.0.0.1:1", "x").unwrap());
    let pg =
        Arc::new(PostgresStore::new("postgres://postgres@127.0.0.1:1/postgres", "x", 1).unwrap());
    for (name, store) in [
        ("redis", redis.clone() as Arc<dyn KvStore>),
        ("postgres", pg.clone() as Arc<dyn KvStore>),
    ] {
        let t0 = Instant::now();
        let r = tokio::task::spawn_blocking(move || store.get("h", "k", 0))
            .await
            .unwrap();
        assert!(
            matches!(r, Err(StateError::Unavailable(_))),
            "{name}: {r:?}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{name} took {:?}",
            t0.elapsed()
        );
    }
    let claim = redis
        .claim(
            "s".into(),
            vec![lockgate::state::ClaimRequest::new("k", "o")],
            Duration::from_secs(1),
        )
        .await;
    assert!(
        matches!(claim, Err(StateError::Unavailable(_))),
        "{claim:?}"
    );
}

#[test]
fn a_staged_call_holds_its_kv_writes_back_with_what_it_read() {
    use lockgate::config::Isolation;
    use lockgate::engine::{HandlerEnv, HandlerLimits, InboundMessage, Outcome};
    use lockgate::state::{KvWrite, MemoryStore};

    let store = Arc::new(MemoryStore::new());
    let env = HandlerEnv {
        name: "chaos".into(),
        config: [("target", "out"), ("count_effects", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        outputs: None,
        limits: HandlerLimits::default(),
        kv: store.clone(),
        http: None,
        sql: None,
        wasi: lockgate::config::WasiGrants::default(),
    };
    let pool = lockgate_tests::guest_pool("chaos", false, Isolation::Reuse, env);
    let msg = |payload: &str, attempt: u32| InboundMessage {
        id: "t/0/1".into(),
        topic: "in".into(),
        payload: payload.as_bytes().to_vec(),
        attempt,
        ..InboundMessage::default()
    };
    let effect = || {
        store
            .get("chaos", "effects/1", lockgate::message::now_ms())
            .unwrap()
    };

    let inv = pool.invoke_with(&msg(r#"{"id":1}"#, 1), true);
    assert!(
        matches!(inv.outcome, Outcome::Ok { .. }),
        "{:?}",
        inv.outcome
    );
    assert_eq!(
        inv.kv_writes,
        Some(vec![KvWrite {
            namespace: "chaos".into(),
            key: "effects/1".into(),
            value: Some(b"1".to_vec()),
            expires_at_ms: None,
            expected: Some(None),
        }])
    );
    assert_eq!(effect(), None, "a staged write reached the store");

    // Unstaged, the write applies at once; a staged call then reads it and expects it.
    let inv = pool.invoke(&msg(r#"{"id":1}"#, 1));
    assert_eq!(inv.kv_writes, None);
    assert_eq!(effect().as_deref(), Some(&b"1"[..]));
    let inv = pool.invoke_with(&msg(r#"{"id":1}"#, 1), true);
    let writes = inv.kv_writes.unwrap();
    assert_eq!(writes[0].value.as_deref(), Some(&b"2"[..]));
    assert_eq!(writes[0].expected, Some(Some(b"1".to_vec())));

    // A failed attempt stages nothing.
    let inv = pool.invoke_with(&msg(r#"{"id":1,"fail":1}"#, 1), true);
    assert!(
        matches!(inv.outcome, Outcome::Retry { .. }),
        "{:?}",
        inv.outcome
    );
    assert_eq!(inv.kv_writes, Some(vec![]));
    assert_eq!(effect().as_deref(), Some(&b"1"[..]));
}

#[test]
fn lockgate_migrate_creates_the_schema_once_and_names_a_store_it_cannot_reach() {
    let dir = tempfile::tempdir().unwrap();
    let schema = unique("lgtest");
    let config = dir.path().join("runtime.toml");
    let write = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "[stores.pg]\nkind = \"postgres\"\nurl = \"{POSTGRES}\"\nschema = \"{schema}\"\n\n[stores.cache]\nkind = \"redis\"\nurl = \"{REDIS}\"\n{extra}"
            ),
        )
        .unwrap();
    };
    write("");
    let out = lockgate_tests::lockgate(dir.path(), &["migrate", "runtime.toml"]);
    let text = lockgate_tests::show(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "stores.pg: schema {schema} migrated from version 0 to {POSTGRES_SCHEMA_VERSION}"
        )),
        "{text}"
    );
    assert!(
        text.contains("stores.cache: redis needs no schema"),
        "{text}"
    );
    let out = lockgate_tests::lockgate(dir.path(), &["migrate", "runtime.toml", "--store", "pg"]);
    let text = lockgate_tests::show(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("the newest; nothing to do"), "{text}");
    assert!(!text.contains("stores.cache"), "{text}");

    write(
        "\n[stores.gone]\nkind = \"postgres\"\nurl = \"postgres://postgres@127.0.0.1:1/postgres\"\n",
    );
    let out = lockgate_tests::lockgate(dir.path(), &["migrate", "runtime.toml"]);
    let text = lockgate_tests::show(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("stores.gone: state store unavailable: postgres at 127.0.0.1:1/postgres"),
        "{text}"
    );
    let out = lockgate_tests::lockgate(dir.path(), &["migrate", "runtime.toml", "--store", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        lockgate_tests::show(&out).contains("no [stores.nope] table (defined: pg, cache, gone)")
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(drop_schema(&schema));
}

/// A dead letter of `route` for the message at offset `offset` of `orders`.
fn letter(route: &str, offset: u64, kind: &str) -> lockgate::message::OutRecord {
    use lockgate::dlq::{Failure, envelope};
    use lockgate::policy::backoff::GiveUpReason;
    let record = lockgate::message::Record {
        topic: "orders".into(),
        partition: Some(0),
        offset: Some(offset),
        key: Some(format!("k{offset}").into_bytes()),
        headers: vec![
            ("trace".into(), b"t1".to_vec()),
            ("trace".into(), vec![0xff, 0x00]),
        ],
        payload: format!("order {offset}").into_bytes(),
        timestamp_ms: Some(1_700_000_000_000),
        reply_to: None,
        delivery: None,
    };
    let failure = Failure {
        route: route.into(),
        handler: "h".into(),
        module_hash: "cafe".into(),
        message_id: format!("orders/0/{offset}"),
        error_kind: kind.into(),
        reason: format!("bad order {offset}"),
        gave_up: GiveUpReason::Rejected,
        attempts: 3,
        first_failure_ms: 1_700_000_000_100,
        last_failure_ms: 1_700_000_000_200,
    };
    envelope(&record, &failure, "orders.dlq")
}

async fn read_table(
    table: &lockgate::broker::pg_dead_letters::DeadLetterTable,
    dlq: &str,
) -> (Vec<lockgate::dlq::DeadLetter>, Vec<String>) {
    use lockgate::broker::Scan;
    use lockgate::dlq::{DeadLetter, marker_positions};
    let mut scan = table.scan(dlq);
    let (mut dead, mut replayed) = (Vec::new(), Vec::new());
    while let Some(batch) = scan.next_batch().await.unwrap() {
        for r in batch {
            match marker_positions(&r) {
                Some(p) => replayed.extend(p),
                None => dead.push(DeadLetter::parse(r).unwrap()),
            }
        }
    }
    (dead, replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_table_keeps_the_whole_envelope_and_marks_replays() {
    use lockgate::broker::Sink;
    use lockgate::broker::pg_dead_letters::DeadLetterTable;
    use lockgate::dlq::marker;
    let schema = unique("lgdlq");
    let store = Arc::new(PostgresStore::new(POSTGRES, &schema, 2).unwrap());
    let table = DeadLetterTable::new(store.clone());
    let written = [
        letter("orders", 7, "reject"),
        letter("orders", 9, "trapped"),
    ];
    table.publish(written.to_vec()).await.unwrap();
    // A repeated write (the route retrying its DLQ write) is dropped by its lockgate-id.
    table.publish(vec![written[0].clone()]).await.unwrap();

    let (dead, replayed) = read_table(&table, "orders.dlq").await;
    assert!(replayed.is_empty());
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (d, w) in dead.iter().zip(&written) {
        assert_eq!(d.record.headers, w.headers, "headers whole and in order");
        assert_eq!(d.record.payload, w.payload);
        assert_eq!(d.record.key, w.key);
        assert_eq!(d.route, "orders");
        assert_eq!(d.attempts, 3);
        assert_eq!(d.last_failure_ms, 1_700_000_000_200);
        assert!(d.position.starts_with("orders.dlq/-/"), "{}", d.position);
    }
    assert_eq!(dead[1].error_kind, "trapped");
    assert_eq!(dead[1].source_position, "orders/0/9");
    assert!(
        read_table(&table, "refunds.dlq").await.0.is_empty(),
        "another DLQ's rows"
    );

    // The columns SQL users filter on.
    let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let rows = client
        .query(
            &format!(
                "SELECT route, error_kind, reason, attempts, source,
                        (extract(epoch from failed_at) * 1000)::bigint
                 FROM {schema}.dead_letters ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap();
    let cols: Vec<(String, String, String, i32, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    assert_eq!(
        cols[0],
        (
            "orders".into(),
            "reject".into(),
            "bad order 7".into(),
            3,
            "orders/0/7".into(),
            1_700_000_000_200
        )
    );

    // A replay marker sets replayed_at on the rows it names, and reads back as a marker.
    table
        .publish(vec![marker(
            "orders.dlq",
            std::slice::from_ref(&dead[0].position),
            "orders",
            1,
        )])
        .await
        .unwrap();
    let (dead_after, replayed) = read_table(&table, "orders.dlq").await;
    assert_eq!(dead_after.len(), 2);
    assert_eq!(replayed, vec![dead[0].position.clone()]);
    let marked: Vec<(Option<String>, bool)> = client
        .query(
            &format!(
                "SELECT replayed_to, replayed_at IS NOT NULL FROM {schema}.dead_letters ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(marked, vec![(Some("orders".into()), true), (None, false)]);

    // Only dead letters go in.
    let err = table
        .publish(vec![lockgate::message::OutRecord {
            topic: "orders.dlq".into(),
            payload: b"x".to_vec(),
            ..Default::default()
        }])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a dead letter"), "{err}");
    drop(client);
    let _ = task.await;
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_commit_writes_its_rows_with_its_effects_or_nothing() {
    use lockgate::message::OutRecord;
    use lockgate::state::{Claim, ClaimRequest, Commit, KvWrite, MemoryStore, StateStore};
    let schema = unique("lgoutbox");
    let store = PostgresStore::new(POSTGRES, &schema, 2).unwrap();
    let scope = "idempotency/orders".to_owned();
    let lease = Duration::from_secs(30);
    let req = |key: &str| ClaimRequest::new(key, "me");
    let write = |expected: Option<Option<Vec<u8>>>| KvWrite {
        namespace: "h".into(),
        key: "x".into(),
        value: Some(b"1".to_vec()),
        expires_at_ms: None,
        expected,
    };
    let row = |id: Option<&str>, payload: &str| OutRecord {
        topic: "events".into(),
        key: Some(b"acct-1".to_vec()),
        headers: [("a".to_owned(), b"b".to_vec())]
            .into_iter()
            .chain(id.map(|id| ("lockgate-id".to_owned(), id.as_bytes().to_vec())))
            .collect(),
        payload: payload.as_bytes().to_vec(),
    };
    let rows = || async {
        let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .query(
                &format!(
                    "SELECT lockgate_id, header_names, convert_from(payload, 'UTF8') FROM {schema}.outbox ORDER BY id"
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, Vec<String>>(1), r.get::<_, String>(2)))
            .collect::<Vec<_>>()
    };
    let claim = |key: &str| store.claim(scope.clone(), vec![req(key)], lease);

    assert_eq!(claim("k1").await.unwrap(), vec![Claim::Claimed]);
    let commit = store.commit_outbox(
        scope.clone(),
        req("k1"),
        vec![write(Some(None))],
        vec![row(Some("id-1"), "one"), row(None, "two")],
        lease,
    );
    assert_eq!(commit.await.unwrap(), Commit::Committed);
    let first = vec![
        (
            Some("id-1".to_owned()),
            vec!["a".to_owned()],
            "one".to_owned(),
        ),
        (None, vec!["a".to_owned()], "two".to_owned()),
    ];
    assert_eq!(rows().await, first);
    let kv = store.clone();
    let x = tokio::task::spawn_blocking(move || kv.get("h", "x", lockgate::message::now_ms()))
        .await
        .unwrap();
    assert_eq!(x.unwrap(), Some(b"1".to_vec()));
    // A retried commit (its answer was lost) writes nothing twice.
    let again = store.commit_outbox(
        scope.clone(),
        req("k1"),
        vec![write(Some(None))],
        vec![row(Some("id-1"), "one"), row(None, "two")],
        lease,
    );
    assert_eq!(again.await.unwrap(), Commit::Committed);
    assert_eq!(rows().await, first);
    // A failed expectation writes no row either.
    assert_eq!(claim("k2").await.unwrap(), vec![Claim::Claimed]);
    let conflict = store.commit_outbox(
        scope.clone(),
        req("k2"),
        vec![write(Some(None))],
        vec![row(Some("id-3"), "three")],
        lease,
    );
    assert_eq!(conflict.await.unwrap(), Commit::Conflict("x".into()));
    assert_eq!(rows().await, first);
    // The same message committed again under a new key (its old one expired) adds no row.
    assert_eq!(claim("k3").await.unwrap(), vec![Claim::Claimed]);
    let repeat = store.commit_outbox(
        scope.clone(),
        req("k3"),
        vec![],
        vec![row(Some("id-1"), "one")],
        lease,
    );
    assert_eq!(repeat.await.unwrap(), Commit::Committed);
    assert_eq!(rows().await, first);

    // A store without an outbox table says so instead of dropping the outputs.
    let local = StateStore::local("m", Arc::new(MemoryStore::new()));
    let refused = local
        .idempotency
        .commit_outbox(
            scope.clone(),
            req("k1"),
            vec![],
            vec![row(None, "x")],
            lease,
        )
        .await;
    assert!(
        matches!(&refused, Err(StateError::Config(m)) if m.contains("outbox")),
        "{refused:?}"
    );
    drop_schema(&schema).await;
}

/// A handler's transaction commits its statements with the message's key, once: committing the
/// same claim again (an earlier answer was lost) rolls the second transaction back instead of
/// landing its statements twice, and a commit without the claim lands nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_transaction_lands_its_statements_once() {
    use lockgate::state::{Claim, ClaimRequest, Commit};
    let schema = unique("lgsqltxn");
    let store = PostgresStore::new(POSTGRES, &schema, 2).unwrap();
    let scope = "idempotency/ledger".to_owned();
    let lease = Duration::from_secs(30);
    let (client, conn) = tokio_postgres::connect(POSTGRES, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let claimed = store
        .claim(scope.clone(), vec![ClaimRequest::new("k1", "me")], lease)
        .await
        .unwrap();
    assert_eq!(claimed, vec![Claim::Claimed]);
    let table = format!("{schema}.handler_rows");
    client
        .batch_execute(&format!("CREATE TABLE {table} (n int NOT NULL)"))
        .await
        .unwrap();
    // One handler attempt: an insert in a fresh transaction, then the commit with `owner`'s key
    // (`done`: recording the key as done at once, as a message with nothing to publish does).
    let attempt = |n: i32, key: &'static str, owner: &'static str, done: Option<Duration>| {
        let (store, table, scope) = (store.clone(), table.clone(), scope.clone());
        async move {
            let deadline = Deadline::after(Duration::from_secs(10));
            let mut txn = store
                .begin_sql(None, Duration::from_secs(10), deadline)
                .await
                .unwrap();
            let insert = txn
                .prepare(&format!("INSERT INTO {table} VALUES ($1)"), deadline)
                .await
                .unwrap();
            assert_eq!(txn.execute(&insert, &[&n], deadline).await.unwrap(), 1);
            let claim = ClaimRequest::new(key, owner);
            txn.commit(&scope, &claim, &[], b"", &[], lease, done)
                .await
                .unwrap()
        }
    };
    let rows = || async {
        client
            .query(&format!("SELECT n FROM {table} ORDER BY n"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };

    assert_eq!(attempt(1, "k1", "me", None).await, Commit::Committed);
    assert_eq!(rows().await, vec![1]);
    // The same claim committed again answers as before and changes nothing.
    assert_eq!(attempt(2, "k1", "me", None).await, Commit::Committed);
    assert_eq!(rows().await, vec![1]);
    // Another owner never held the claim: nothing of its attempt lands.
    assert_eq!(
        attempt(3, "k1", "someone-else", None).await,
        Commit::LostClaim
    );
    assert_eq!(rows().await, vec![1]);

    // Recorded as done by the commit itself: a claim of the key is answered done, and the
    // same claim committed again (an answer lost) answers done again and lands nothing.
    let ttl = Some(Duration::from_secs(60));
    let claimed = store
        .claim(scope.clone(), vec![ClaimRequest::new("k2", "me")], lease)
        .await
        .unwrap();
    assert_eq!(claimed, vec![Claim::Claimed]);
    assert_eq!(attempt(4, "k2", "me", ttl).await, Commit::Done);
    assert_eq!(rows().await, vec![1, 4]);
    assert_eq!(attempt(5, "k2", "me", ttl).await, Commit::Done);
    assert_eq!(
        attempt(6, "k2", "someone-else", ttl).await,
        Commit::LostClaim
    );
    assert_eq!(rows().await, vec![1, 4]);
    let again = store
        .claim(
            scope.clone(),
            vec![ClaimRequest::new("k2", "redelivery")],
            lease,
        )
        .await
        .unwrap();
    assert_eq!(again, vec![Claim::Done]);
    drop_schema(&schema).await;
}

/// A key claimed inside a handler's transaction (`PostgresStore::begin_claimed`, what a route
/// whose handler's `sql` is its state store does): the claim and the handler's statements are
/// one transaction, which commits the key as done with them or leaves no claim at all; while it
/// is open another claimant waits for the lock timeout and is told busy; the handler's
/// statement timeout and role are in force after the claim, and its lock timeout is the
/// server's again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_claimed_in_the_handlers_transaction_is_held_by_it_alone() {
    use lockgate::state::{Claim, ClaimRequest, Commit, Completion, SqlTxn, TxnClaim};
    let (schema, store, client) = migrated_store().await;
    let scope = "idempotency/ledger";
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(3600));
    let role = format!("{schema}_writer");
    client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.rows (n int NOT NULL);
             CREATE ROLE {role} NOLOGIN; GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT SELECT, INSERT ON {schema}.rows TO {role};"
        ))
        .await
        .unwrap();
    let claim = |key: &'static str, owner: &'static str, replay: bool, role: Option<String>| {
        let store = store.clone();
        async move {
            let request = ClaimRequest {
                replay,
                ..ClaimRequest::new(key, owner)
            };
            store
                .begin_claimed(
                    scope,
                    &request,
                    lease,
                    ttl,
                    role.as_deref(),
                    Duration::from_secs(7),
                )
                .await
                .unwrap()
        }
    };
    let claimed = |c: TxnClaim| match c {
        TxnClaim::Claimed(txn) => txn,
        TxnClaim::Settled(other) => panic!("not claimed: {other:?}"),
    };
    let settled = |c: TxnClaim| match c {
        TxnClaim::Settled(answer) => answer,
        TxnClaim::Claimed(_) => panic!("claimed"),
    };
    let deadline = Deadline::after(Duration::from_secs(10));
    // One statement of the handler in `txn`: its first row's values, as text.
    async fn one(txn: &mut SqlTxn, sql: &str, deadline: Deadline) -> Vec<String> {
        let stmt = txn.prepare(sql, deadline).await.unwrap();
        let mut out = Vec::new();
        txn.query(&stmt, &[], deadline, |row| {
            out = (0..row.len()).map(|i| row.get::<_, String>(i)).collect();
            false
        })
        .await
        .unwrap();
        out
    }
    let key_row = |key: &'static str| {
        let client = &client;
        let schema = &schema;
        async move {
            client
                .query_opt(
                    &format!(
                        "SELECT state, owner, xmin::text FROM {schema}.idempotency
                         WHERE scope = $1 AND key = $2"
                    ),
                    &[&scope, &key],
                )
                .await
                .unwrap()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, String>(2),
                    )
                })
        }
    };

    // A new key is the transaction's, with the handler's settings in force.
    let mut txn = claimed(claim("k1", "a", false, Some(role.clone())).await);
    assert_eq!(
        one(
            &mut txn,
            "SELECT current_user::text, current_setting('statement_timeout'), current_setting('lock_timeout')",
            deadline
        )
        .await,
        [role.as_str(), "7s", "0"]
    );
    let insert = txn
        .prepare(
            &format!("INSERT INTO {schema}.rows VALUES (1) RETURNING xmin::text"),
            deadline,
        )
        .await
        .unwrap();
    let mut row_xmin = String::new();
    txn.query(&insert, &[], deadline, |r| {
        row_xmin = r.get(0);
        true
    })
    .await
    .unwrap();
    // Nothing of it is visible outside, and another claimant is told busy after the lock
    // timeout (250 ms), not at once and not after the holder's end.
    assert_eq!(key_row("k1").await, None);
    let started = Instant::now();
    let busy = tokio::time::timeout(Duration::from_secs(5), claim("k1", "b", false, None))
        .await
        .expect("the claim waited for the holder past its lock timeout");
    assert!(matches!(settled(busy), Claim::Busy(_)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Committed as done with the handler's row, in one transaction, the row never updated
    // after (its version is the handler's transaction's); lockgate's own writes go back to
    // its role (the handler's may not touch lockgate's tables).
    let done = txn
        .commit(
            scope,
            &ClaimRequest::new("k1", "a"),
            &[],
            b"",
            &[],
            lease,
            Some(ttl),
        )
        .await
        .unwrap();
    assert_eq!(done, Commit::Done);
    assert_eq!(
        key_row("k1").await,
        Some(("d".to_owned(), Some("a".to_owned()), row_xmin))
    );
    // Done for everyone now, its own holder included (a commit whose answer was lost).
    assert_eq!(settled(claim("k1", "b", false, None).await), Claim::Done);
    assert_eq!(settled(claim("k1", "a", false, None).await), Claim::Done);

    // An attempt that ends otherwise leaves no claim behind: the next claimant has the key.
    let txn = claimed(claim("k2", "a", false, None).await);
    drop(txn);
    let txn = claimed(claim("k2", "b", false, None).await);
    // Outputs to publish: the key is applied with them, and under the handler's role the
    // commit marks it as lockgate.
    drop(txn);
    let mut txn = claimed(claim("k3", "a", false, Some(role.clone())).await);
    assert_eq!(
        one(&mut txn, "SELECT current_user::text", deadline).await,
        [role.as_str()]
    );
    let committed = txn
        .commit(
            scope,
            &ClaimRequest::new("k3", "a"),
            &[],
            b"outputs",
            &[],
            lease,
            None,
        )
        .await
        .unwrap();
    assert_eq!(committed, Commit::Committed);
    assert_eq!(key_row("k3").await.unwrap().0, "a");
    // Another claimant waits for the publisher's lease; the publisher itself (after a crash:
    // the same owner) takes the outputs to publish.
    assert!(matches!(
        settled(claim("k3", "b", false, None).await),
        Claim::Busy(_)
    ));
    assert_eq!(
        settled(claim("k3", "a", false, None).await),
        Claim::Applied(b"outputs".to_vec())
    );

    // A dead-lettered key: its redelivery is skipped, its replay claims it.
    store
        .complete(
            scope.to_owned(),
            vec!["k4".into()],
            ttl,
            Completion::DeadLettered,
        )
        .await
        .unwrap();
    assert_eq!(
        settled(claim("k4", "a", false, None).await),
        Claim::DeadLettered
    );
    drop(claimed(claim("k4", "a", true, None).await));

    // A role that does not exist fails the claim with the server's reason and code (the route
    // logs it and asks again) instead of running the handler as lockgate.
    let missing = store
        .begin_claimed(
            scope,
            &ClaimRequest::new("k5", "a"),
            lease,
            ttl,
            Some("lg_no_such_role"),
            Duration::from_secs(7),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("22023") && missing.contains("role \"lg_no_such_role\" does not exist"),
        "{missing}"
    );
    assert_eq!(key_row("k5").await, None, "nothing claimed");

    drop_schema(&schema).await;
    client
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}
