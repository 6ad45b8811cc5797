//! Handlers' SQL (docs/handlers/sql.md) against the test PostgreSQL: statements run in one
//! transaction per message that commits with the message's idempotency key, so a failed
//! attempt (retry, trap, timeout) leaves nothing behind and every message applies once; the
//! host refuses transaction and session control, bounds results and statements, and runs
//! statements under `sql_role`.

use std::time::{Duration, Instant};

use lockgate::config::Isolation;
use lockgate::engine::{HandlerLimits, InboundMessage, InstancePool, Invocation, Outcome};
use lockgate::state::{Claim, ClaimRequest, Commit, IdempotencyStore};
use lockgate_tests::pg::{self, SyncPg, TestStore};
use lockgate_tests::sqlroute::{RouteRun, SqlRoute};
use lockgate_tests::{guest_pool, handler_env};
use serde_json::{Value, json};

fn db(prefix: &str) -> TestStore {
    TestStore::new(prefix)
}

fn probe(db: &TestStore, role: Option<&str>, max_rows: u64, timeout: Duration) -> InstancePool {
    let mut env = handler_env(
        "sql-probe",
        &[("target", "out")],
        HandlerLimits {
            timeout,
            ..HandlerLimits::default()
        },
    );
    env.sql = Some(db.grant(role, max_rows));
    guest_pool("sql-probe", false, Isolation::Reuse, env)
}

fn msg(id: &str, spec: Value) -> InboundMessage {
    InboundMessage {
        id: id.to_owned(),
        topic: "in".into(),
        payload: spec.to_string().into_bytes(),
        attempt: 1,
        ..InboundMessage::default()
    }
}

/// The probe's results of an ok call.
fn results(inv: &Invocation) -> Vec<Value> {
    match &inv.outcome {
        Outcome::Ok { outputs } => {
            let v: Value = serde_json::from_slice(&outputs[0].payload).expect("JSON");
            v["results"].as_array().cloned().unwrap_or_default()
        }
        other => panic!("expected ok, got {other:?}"),
    }
}

fn error_of(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn values_round_trip_and_the_transaction_stays_open_until_the_message_commits() {
    let db = db("lgsqlvals");
    let pg = SyncPg::connect();
    let s = &db.schema;
    pg.exec(&format!(
        "CREATE SCHEMA {s}; CREATE TABLE {s}.items (id text PRIMARY KEY, n bigint, small int,
         price numeric(12,2), tags text[], ids bigint[], doc jsonb, at timestamptz, born date,
         u uuid, ok boolean, ratio float8)"
    ));
    let pool = probe(&db, None, 100, Duration::from_secs(10));
    let inv = pool.invoke_with(
        &msg(
            "m1",
            json!({"statements": [
                {"sql": format!("INSERT INTO {s}.items VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
                 "params": ["a", 1_i64 << 40, 7, {"numeric": "12.50"}, {"text_array": ["x", null]},
                            {"int64_array": [1, null, 3]}, {"json": {"k": [1, 2]}},
                            {"timestamptz": 1_700_000_000_123_456_i64}, {"date": 19_000},
                            {"uuid": "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"}, true, 0.25]},
                {"sql": format!("SELECT * FROM {s}.items"), "query": true},
                {"sql": format!("UPDATE {s}.items SET n = n + $1"), "params": [1]},
            ]}),
        ),
        true,
    );
    let r = results(&inv);
    assert_eq!(r[0], json!({"affected": 1}), "{r:?}");
    assert_eq!(
        r[1]["columns"],
        json!([
            "id", "n", "small", "price", "tags", "ids", "doc", "at", "born", "u", "ok", "ratio"
        ])
    );
    assert_eq!(
        r[1]["rows"][0],
        json!([
            "a",
            1_i64 << 40,
            7,
            {"numeric": "12.50"},
            {"text_array": ["x", null]},
            {"int64_array": [1, null, 3]},
            {"json": {"k": [1, 2]}},
            {"timestamptz": 1_700_000_000_123_456_i64},
            {"date": 19_000},
            {"uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
            true,
            0.25
        ]),
        "{r:?}"
    );
    assert_eq!(r[2], json!({"affected": 1}), "{r:?}");
    // Not committed: the call's transaction is in the invocation, invisible to others.
    assert!(inv.sql.is_some());
    assert_eq!(pg.count(&format!("SELECT count(*) FROM {s}.items")), 0);
    // Dropped without a commit (the message failed): rolled back, and the connection is
    // usable by the next call.
    drop(inv);
    let inv = pool.invoke_with(
        &msg(
            "m2",
            json!({"statements": [{"sql": format!("SELECT count(*) AS n FROM {s}.items"), "query": true}]}),
        ),
        true,
    );
    assert_eq!(results(&inv)[0]["rows"][0][0], 0);
    drop(inv);
    pg.drop_schema(s);
}

#[test]
fn transaction_and_session_control_and_bad_input_are_refused_with_the_reason() {
    let db = db("lgsqlguard");
    let pg = SyncPg::connect();
    let s = &db.schema;
    pg.exec(&format!(
        "CREATE SCHEMA {s}; CREATE TABLE {s}.t (id int PRIMARY KEY)"
    ));
    let pool = probe(&db, None, 10, Duration::from_secs(10));
    let refused = [
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT a",
        "SET statement_timeout = 0",
        "RESET ROLE",
        "LISTEN x",
        "COPY t TO STDOUT",
        "DO $$ BEGIN COMMIT; END $$",
        "SELECT set_config('role', 'postgres', true)",
    ];
    let mut statements: Vec<Value> = refused.iter().map(|s| json!({"sql": s})).collect();
    statements.push(json!({"sql": format!("SELECT generate_series(1, 50) AS n"), "query": true}));
    statements.push(json!({"sql": format!("INSERT INTO {s}.t VALUES ($1)"), "params": ["nine"]}));
    statements.push(json!({"sql": format!("INSERT INTO {s}.t VALUES ($1)"), "params": [1, 2]}));
    statements.push(json!({"sql": format!("INSERT INTO {s}.t VALUES ($1)"), "params": [1]}));
    let inv = pool.invoke_with(&msg("g", json!({ "statements": statements })), true);
    let r = results(&inv);
    for (i, s) in refused.iter().enumerate() {
        assert!(error_of(&r[i]).starts_with("refused:"), "{s}: {}", r[i]);
    }
    let n = refused.len();
    assert!(
        error_of(&r[n]).starts_with("too_large:") && error_of(&r[n]).contains("sql_max_rows = 10"),
        "{}",
        r[n]
    );
    assert!(
        error_of(&r[n + 1]).starts_with("bad_parameter: ") && error_of(&r[n + 1]).contains("$1"),
        "{}",
        r[n + 1]
    );
    assert!(
        error_of(&r[n + 2]).contains("takes 1 parameter"),
        "{}",
        r[n + 2]
    );
    // None of that touched the transaction: the insert still works.
    assert_eq!(r[n + 3], json!({"affected": 1}), "{r:?}");
    drop(inv);

    // A statement the server refuses aborts the transaction: the rest of the call fails with
    // `aborted`, and an ok result cannot commit (a unique violation: rejected).
    pg.exec(&format!("INSERT INTO {s}.t VALUES (5)"));
    let inv = pool.invoke_with(
        &msg(
            "dup",
            json!({"statements": [
                {"sql": format!("INSERT INTO {s}.t VALUES (5)")},
                {"sql": "SELECT 1", "query": true},
            ]}),
        ),
        true,
    );
    let Outcome::Rejected { reason } = &inv.outcome else {
        panic!("{:?}", inv.outcome);
    };
    assert!(
        reason.contains("23505") || reason.contains("duplicate key"),
        "{reason}"
    );
    assert!(inv.sql.is_none(), "a failed transaction is not handed on");
    drop(inv);
    pg.drop_schema(s);
}

#[test]
fn a_statement_past_the_calls_deadline_is_cancelled_and_the_call_times_out() {
    let db = db("lgsqldeadline");
    let pg = SyncPg::connect();
    pg.exec(&format!("CREATE SCHEMA {}", db.schema));
    let pool = probe(&db, None, 10, Duration::from_millis(300));
    let start = Instant::now();
    let inv = pool.invoke_with(
        &msg(
            "slow",
            json!({"statements": [{"sql": "SELECT pg_sleep(30)", "query": true}]}),
        ),
        true,
    );
    let took = start.elapsed();
    assert!(
        matches!(inv.outcome, Outcome::TimedOut { .. }),
        "{:?}",
        inv.outcome
    );
    assert!(
        took < Duration::from_millis(300 + 200),
        "ended after {took:?}"
    );
    drop(inv);
    // The server stops the statement (cancelled, or its statement_timeout): no pg_sleep left.
    let until = Instant::now() + Duration::from_secs(5);
    while pg.count("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'") > 0 {
        assert!(Instant::now() < until, "the statement still runs on the server");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next message on the same handler runs normally.
    let inv = pool.invoke_with(
        &msg(
            "next",
            json!({"statements": [{"sql": "SELECT 1 AS one", "query": true}]}),
        ),
        true,
    );
    assert_eq!(results(&inv)[0]["rows"][0][0], 1);
    drop(inv);
    pg.drop_schema(&db.schema);
}

#[test]
fn statements_under_sql_role_cannot_reach_lockgates_tables() {
    let db = db("lgsqlrole");
    let pg = SyncPg::connect();
    let s = &db.schema;
    let role = format!("{s}_writer");
    pg.exec(&format!(
        "CREATE SCHEMA {s}; CREATE TABLE {s}.balances (id text PRIMARY KEY, balance bigint);
         CREATE ROLE {role} NOLOGIN; GRANT USAGE ON SCHEMA {s} TO {role};
         GRANT SELECT, INSERT, UPDATE ON {s}.balances TO {role};"
    ));
    let pool = probe(&db, Some(&role), 10, Duration::from_secs(10));
    // lockgate's own tables live in the same schema (the store's): created by the first call.
    let inv = pool.invoke_with(
        &msg(
            "r",
            json!({"statements": [
                {"sql": format!("INSERT INTO {s}.balances VALUES ('a', 1)")},
                {"sql": "SELECT current_user AS u", "query": true},
            ]}),
        ),
        true,
    );
    let r = results(&inv);
    assert_eq!(r[0], json!({"affected": 1}), "{r:?}");
    assert_eq!(r[1]["rows"][0][0], json!(role), "{r:?}");
    // The message commits with its key: the commit goes back to lockgate's own role to mark
    // the key in lockgate's table, which the handler's role may not touch.
    let mut inv = inv;
    let txn = inv.sql.take().expect("the call's transaction");
    let (scope, claim) = ("idempotency/r", ClaimRequest::new("r", "owner"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let lease = Duration::from_secs(30);
        let claimed = db
            .store
            .claim(scope.into(), vec![claim.clone()], lease)
            .await
            .unwrap();
        assert_eq!(claimed, vec![Claim::Claimed]);
        let committed = txn
            .commit(scope, &claim, &[], &[], &[], lease, Some(lease))
            .await
            .unwrap();
        assert_eq!(committed, Commit::Done);
    });
    assert_eq!(
        pg.count(&format!("SELECT count(*) FROM {s}.balances WHERE id = 'a'")),
        1
    );
    drop(inv);
    for statement in [
        format!("SELECT * FROM {s}.idempotency"),
        format!("DELETE FROM {s}.kv"),
        format!("UPDATE {s}.idempotency SET state = 'd'"),
    ] {
        let inv = pool.invoke_with(
            &msg(
                "x",
                json!({"statements": [{"sql": statement, "query": true}]}),
            ),
            true,
        );
        // The statement fails (insufficient privilege), so the ok call is rejected.
        let Outcome::Rejected { reason } = &inv.outcome else {
            panic!("{statement}: {:?}", inv.outcome);
        };
        assert!(
            reason.contains("42501") || reason.contains("permission denied"),
            "{statement}: {reason}"
        );
    }
    pg.drop_schema(s);
    pg.exec(&format!("DROP ROLE {role}"));
}

/// Runs the `sql-probe` handler on a route of the embedded broker with `sql = "pg"` (the store
/// on `schema`) and keys from `json:/id`, feeds it `messages` (`(id, probe spec)`, keyed by the
/// id), and stops it once every message is acknowledged.
fn probe_route(
    schema: &str,
    concurrency: u32,
    timeout_ms: u64,
    messages: Vec<(String, Value)>,
) -> RouteRun {
    probe_route_as(schema, None, concurrency, timeout_ms, messages)
}

/// [`probe_route`] with the handler's `sql_role`.
fn probe_route_as(
    schema: &str,
    role: Option<&str>,
    concurrency: u32,
    timeout_ms: u64,
    messages: Vec<(String, Value)>,
) -> RouteRun {
    let messages = messages
        .into_iter()
        .map(|(id, mut spec)| {
            spec["id"] = json!(id);
            (id.into_bytes(), spec.to_string().into_bytes())
        })
        .collect();
    SqlRoute {
        module: &lockgate_tests::guest("sql-probe"),
        config: &[("target", "out")],
        schema,
        key: "json:/id",
        concurrency,
        timeout_ms,
        role,
    }
    .run(messages)
}

/// On a running route the handler's statements run under its `sql_role` (set by the claim that
/// opens its transaction), and the commit goes back to lockgate's own role to mark the keys of
/// messages with outputs to publish in lockgate's table, which the handler's role cannot touch.
#[test]
fn a_routes_statements_run_under_sql_role_and_its_keys_commit_as_lockgate() {
    let pg = SyncPg::connect();
    let schema = pg::unique_schema("lgsqlrouterole");
    let role = format!("{schema}_w");
    pg.exec(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.who (id text, u text);
         CREATE ROLE {role} NOLOGIN; GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT INSERT ON {schema}.who TO {role};"
    ));
    let insert = json!({"sql": format!("INSERT INTO {schema}.who VALUES ($1, current_user)")});
    let messages = (0..10)
        .map(|i| {
            let id = format!("m{i}");
            let mut insert = insert.clone();
            insert["params"] = json!([id]);
            (id, json!({"statements": [insert], "then": "ok"}))
        })
        .collect();
    let run = probe_route_as(&schema, Some(&role), 2, 10_000, messages);
    assert_eq!((run.outputs, run.dead), (10, 0), "{:?}", run.dead_reasons);
    let users: Vec<String> = pg
        .query(&format!("SELECT DISTINCT u FROM {schema}.who"), &[])
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users, vec![role.clone()], "the statements' role");
    assert_eq!(pg.count(&format!("SELECT count(*) FROM {schema}.who")), 10);
    assert_eq!(
        pg.count(&format!(
            "SELECT count(*) FROM {schema}.idempotency WHERE state = 'd'"
        )),
        10,
        "every key recorded"
    );
    pg.drop_schema(&schema);
    pg.exec(&format!("DROP ROLE {role}"));
}

/// Through a running route on the embedded broker: a handler that writes and then retries,
/// traps or runs out of time leaves nothing of those attempts, and each message's write is
/// there once after its successful attempt, committed with its idempotency key.
#[test]
fn failed_attempts_leave_nothing_and_each_message_applies_once() {
    let pg = SyncPg::connect();
    let schema = pg::unique_schema("lgsqlroute");
    pg.exec(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.applied (id text, at timestamptz DEFAULT now())"
    ));
    let mut messages: Vec<(String, Value)> = ["ok", "retry", "trap", "hang"]
        .iter()
        .cycle()
        .take(40)
        .enumerate()
        .map(|(i, first)| {
            let id = format!("m{i}");
            let insert = json!({"sql": format!("INSERT INTO {schema}.applied (id) VALUES ($1)"), "params": [id]});
            (
                id,
                json!({"statements": [insert], "then_first": first, "then": "ok"}),
            )
        })
        .collect();
    // The same message again, later: its key is applied, so it does not run again.
    messages.push(messages[1].clone());
    let run = probe_route(&schema, 4, 500, messages);
    assert_eq!(run.outputs, 40, "the duplicate published nothing new");
    assert_eq!(run.dead, 0, "nothing dead-lettered");
    assert!(run.retried >= 30, "the failed first attempts were retried");
    let rows = pg.query(
        &format!("SELECT id, count(*) FROM {schema}.applied GROUP BY id ORDER BY id"),
        &[],
    );
    assert_eq!(rows.len(), 40, "every message applied");
    for row in &rows {
        let (id, n): (String, i64) = (row.get(0), row.get(1));
        assert_eq!(n, 1, "{id} applied {n} times");
    }
    let keys = pg.count(&format!(
        "SELECT count(*) FROM {schema}.idempotency WHERE state IN ('a', 'd')"
    ));
    assert_eq!(keys, 40);
    pg.drop_schema(&schema);
}

const DEPOSITS: u64 = 20_000;
const ACCOUNTS: u64 = 200;
/// Deposits applied when a runtime is SIGKILLed and restarted.
const KILLS: [u64; 4] = [3_000, 7_000, 11_000, 15_000];

/// Deposit `i` of the crash tests: (account, amount).
fn deposit(i: u64) -> (String, i64) {
    (format!("a{}", i % ACCOUNTS), ((i * 7919) % 1000 + 1) as i64)
}

/// Deposit `i`'s message: (key, payload), keyed by its account.
fn deposit_message(i: u64) -> (String, String) {
    let (account, amount) = deposit(i);
    let payload = json!({"deposit_id": format!("d{i}"), "account": account, "amount": amount});
    (account, payload.to_string())
}

/// The `ledger` projection of the crash tests: its table on a fresh schema, the runtime.toml of
/// a `deposits` route into it (on the broker `brokers` declares, from `source`) with its
/// idempotency keys in the same PostgreSQL store, and the check of what the deposits came to.
struct Ledger {
    pg: SyncPg,
    schema: String,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Ledger {
    fn new(brokers: &str, source: &str) -> Self {
        let pg = SyncPg::connect();
        let schema = pg::unique_schema("lgledger");
        pg.exec(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.account_balances (account text PRIMARY KEY, balance bigint NOT NULL, deposits bigint NOT NULL)"
        ));
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("runtime.toml");
        std::fs::write(
            &config,
            format!(
                r#"[runtime]
shutdown_grace_ms = 5000

{brokers}
[stores.pg]
kind = "postgres"
url = "{url}"
schema = "{schema}"
pool_size = 8

[handlers.ledger]
module = "{module}"
config = {{ table = "{schema}.account_balances" }}
sql = "pg"

[routes.deposits]
handler = "ledger"
source = {source}
state = "pg"
concurrency = 8
ordering = "key"
max_batch = 4
retry = {{ max_attempts = 10, initial_backoff_ms = 5, max_backoff_ms = 100 }}
idempotency = {{ key = "json:/deposit_id", lease_ms = 3000 }}
"#,
                url = pg::URL,
                module = lockgate_tests::guest("ledger").display(),
            ),
        )
        .expect("config");
        Self {
            pg,
            schema,
            dir,
            config,
        }
    }

    /// Deposits applied so far.
    fn applied(&self) -> u64 {
        self.pg.count(&format!(
            "SELECT coalesce(sum(deposits), 0)::bigint FROM {}.account_balances",
            self.schema
        ))
    }

    /// Asserts that every account's balance is the sum of deposits `0..DEPOSITS` and its count
    /// their number: none applied twice, none lost. Drops the schema.
    fn assert_every_balance_exact(self) {
        let mut want = std::collections::BTreeMap::<String, (i64, i64)>::new();
        for i in 0..DEPOSITS {
            let (account, amount) = deposit(i);
            let e = want.entry(account).or_default();
            e.0 += amount;
            e.1 += 1;
        }
        let got: std::collections::BTreeMap<String, (i64, i64)> = self
            .pg
            .query(
                &format!(
                    "SELECT account, balance, deposits FROM {}.account_balances",
                    self.schema
                ),
                &[],
            )
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        assert_eq!(got.len() as u64, ACCOUNTS);
        let wrong: Vec<_> = want
            .iter()
            .filter(|(a, w)| got.get(*a) != Some(*w))
            .map(|(a, w)| format!("{a}: want {w:?}, got {:?}", got.get(a)))
            .collect();
        assert!(wrong.is_empty(), "accounts off: {wrong:#?}");
        self.pg.drop_schema(&self.schema);
    }
}

/// `lockgate run` processes on a [`Ledger`]'s config, one per slot, each slot with its own
/// state directory; a restarted slot gets a new run number (its logs are `run<N>.*`).
struct Runs<'a> {
    ledger: &'a Ledger,
    procs: Vec<(u32, lockgate_tests::Proc)>,
    next_run: u32,
}

impl<'a> Runs<'a> {
    fn start(ledger: &'a Ledger, processes: usize) -> Self {
        let mut runs = Self {
            ledger,
            procs: Vec::new(),
            next_run: 1,
        };
        for slot in 0..processes {
            let p = runs.spawn(slot);
            runs.procs.push(p);
        }
        runs
    }

    fn spawn(&mut self, slot: usize) -> (u32, lockgate_tests::Proc) {
        let run = self.next_run;
        self.next_run += 1;
        let dir = self.ledger.dir.path();
        let state = dir.join(format!("s{slot}"));
        let child = lockgate_tests::start_run(
            dir,
            &self.ledger.config,
            run,
            Some(&state),
            "lockgate=info,warn",
        );
        (run, child)
    }

    /// SIGKILLs the process of `slot` and starts another in its place.
    fn kill_and_restart(&mut self, slot: usize) {
        let child = &mut self.procs[slot].1;
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        self.procs[slot] = self.spawn(slot);
    }

    /// Polls until `done()` holds (at most ten minutes), failing with the logs if a process
    /// exits first.
    fn wait_until(&mut self, what: &str, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            for (run, child) in &mut self.procs {
                if let Some(status) = child.try_wait().expect("wait") {
                    panic!(
                        "run {run} exited ({status}) before {what}\n{}",
                        lockgate_tests::run_logs(self.ledger.dir.path(), *run)
                    );
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "not {what} after 600 s ({} deposits applied)\n{}",
                self.ledger.applied(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until `target` deposits are applied.
    fn wait_for_deposits(&mut self, target: u64) {
        let ledger = self.ledger;
        self.wait_until(&format!("{target} deposits"), || ledger.applied() >= target);
    }

    fn logs(&self) -> String {
        (1..self.next_run)
            .map(|r| lockgate_tests::run_logs(self.ledger.dir.path(), r))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops every process with SIGTERM, asserting each exits cleanly; what each received and
    /// succeeded by its summary.
    fn stop(mut self) -> Vec<(u64, u64)> {
        let dir = self.ledger.dir.path();
        self.procs
            .iter_mut()
            .map(|(run, child)| {
                lockgate_tests::stop_run(child, dir, *run);
                let stat = |name| lockgate_tests::run_stat(dir, *run, name);
                (stat("received"), stat("succeeded"))
            })
            .collect()
    }
}

/// The `ledger` projection on a Kafka route, its `lockgate run` SIGKILLed four times mid-stream
/// and restarted: every account's balance is the sum of its deposits, and every deposit is
/// counted once: none applied twice, none lost.
#[test]
fn a_kafka_projection_killed_mid_stream_applies_every_deposit_once() {
    use lockgate_tests::kafka::{bootstrap, create_topics, produce, runtime, unique};

    let rt = runtime();
    let base = unique("ledger");
    let input = format!("{base}.deposits");
    create_topics(&rt, &[(&input, 6)]);
    let messages: Vec<(String, String)> = (0..DEPOSITS).map(deposit_message).collect();
    produce(&rt, &input, &messages);
    let ledger = Ledger::new(
        &format!(
            r#"[brokers.kafka]
kind = "kafka"
bootstrap_servers = "{bootstrap}"
consumer_properties = {{ "session.timeout.ms" = 6000, "max.poll.interval.ms" = 10000 }}
"#,
            bootstrap = bootstrap()
        ),
        &format!(r#"{{ broker = "kafka", topic = "{input}", group = "{base}.group" }}"#),
    );
    let mut runs = Runs::start(&ledger, 1);
    for at in KILLS {
        runs.wait_for_deposits(at);
        runs.kill_and_restart(0);
    }
    runs.wait_for_deposits(DEPOSITS);
    runs.stop();
    ledger.assert_every_balance_exact();
    eprintln!(
        "ledger crash test: {DEPOSITS} deposits on {ACCOUNTS} accounts, {} SIGKILLs, every balance exact",
        KILLS.len()
    );
}

/// Deposits published a second time, as a message of their own: (deposit, published again
/// right after this deposit). Some right behind themselves (likely on another process at the
/// same time), some thousands later (after a kill).
const REPEATS: [(u64, u64); 6] = [
    (5, 5),
    (2_500, 6_000),
    (6_990, 7_010),
    (10_001, 16_000),
    (14_500, 14_501),
    (DEPOSITS - 1, DEPOSITS - 1),
];

/// The `ledger` projection on a JetStream durable consumer shared by three `lockgate run`
/// processes at once, which are SIGKILLed in turn mid-stream and restarted while the others go
/// on; a few deposits come twice as separate messages. Every account's balance is the sum of its
/// deposits and every deposit is counted once: none applied twice, none lost.
#[test]
fn a_jetstream_projection_on_three_processes_killed_mid_stream_applies_every_deposit_once() {
    use lockgate_tests::nats::Nats;

    const PROCESSES: usize = 3;
    let nats = Nats::connect();
    let base = lockgate_tests::kafka::unique("ledger");
    let (stream, subject, durable) = (
        format!("{base}-deposits"),
        format!("{base}.deposits"),
        format!("{base}-ledger"),
    );
    nats.create_stream(&stream, &[&subject]);
    let mut order = Vec::new();
    for i in 0..DEPOSITS {
        order.push(i);
        order.extend(REPEATS.iter().filter(|r| r.1 == i).map(|r| r.0));
    }
    let messages: Vec<(String, Option<String>, String)> = order
        .into_iter()
        .map(|i| {
            let (account, payload) = deposit_message(i);
            (subject.clone(), Some(account), payload)
        })
        .collect();
    let published = messages.len();
    nats.publish(&messages);
    // A short ack_wait: what a killed process held comes back to the others within 2 s.
    let ledger = Ledger::new(
        &format!(
            "[brokers.nats]\nkind = \"nats\"\nservers = [\"{}\"]\n",
            lockgate_tests::nats::url()
        ),
        &format!(
            r#"{{ broker = "nats", stream = "{stream}", topic = "{subject}", group = "{durable}", ack_wait_ms = 2000 }}"#
        ),
    );
    let mut runs = Runs::start(&ledger, PROCESSES);
    for (k, at) in KILLS.into_iter().enumerate() {
        runs.wait_for_deposits(at);
        runs.kill_and_restart(k % PROCESSES);
    }
    // Every deposit applied and every message (the repeats too) acknowledged.
    runs.wait_until("every message acknowledged", || {
        let (unacked, _, undelivered) = nats.consumer_state(&stream, &durable);
        unacked == 0 && undelivered == 0 && ledger.applied() >= DEPOSITS
    });
    let last = runs.stop();
    ledger.assert_every_balance_exact();
    // The processes shared the stream: each of the last three took messages.
    assert!(
        last.iter().all(|(received, _)| *received > 0),
        "a process received nothing: {last:?}"
    );
    eprintln!(
        "ledger crash test on JetStream: {PROCESSES} processes, {published} messages ({} repeated deposits), {DEPOSITS} deposits on {ACCOUNTS} accounts, {} SIGKILLs, every balance exact (the last three processes succeeded {:?})",
        REPEATS.len(),
        KILLS.len(),
        last.iter().map(|(_, s)| s).collect::<Vec<_>>()
    );
}

/// Two messages on two lanes that update the same two rows in opposite orders deadlock; the
/// server aborts one (40P01), which runs again by itself: both apply once, nothing is
/// dead-lettered.
#[test]
fn a_deadlock_between_two_lanes_resolves_by_retry_and_both_apply_once() {
    let pg = SyncPg::connect();
    let schema = pg::unique_schema("lgsqldeadlock");
    pg.exec(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.rows (id text PRIMARY KEY, n bigint NOT NULL);
         INSERT INTO {schema}.rows VALUES ('a', 0), ('b', 0);
         CREATE TABLE {schema}.applied (id text)"
    ));
    let update = |row: &str| json!({"sql": format!("UPDATE {schema}.rows SET n = n + 1 WHERE id = $1"), "params": [row]});
    // Each takes its first row, waits for the other to take its own, then asks for it.
    let messages = [("m1", "a", "b"), ("m2", "b", "a")]
        .iter()
        .map(|(id, first, second)| {
            (
                (*id).to_owned(),
                json!({"statements": [
                    update(first),
                    {"sql": "SELECT pg_sleep(0.5)", "query": true},
                    update(second),
                    {"sql": format!("INSERT INTO {schema}.applied VALUES ($1)"), "params": [id]},
                ], "then": "ok"}),
            )
        })
        .collect();
    let run = probe_route(&schema, 2, 10_000, messages);
    // The deadlock happened (one message was retried), or the test proved nothing.
    assert!(
        run.retried >= 1,
        "no retry: the two messages did not deadlock"
    );
    assert_eq!(run.outputs, 2, "both messages succeeded");
    assert_eq!(run.dead, 0, "nothing dead-lettered");
    let n = |id: &str| -> i64 {
        pg.query(
            &format!("SELECT n FROM {schema}.rows WHERE id = $1"),
            &[&id],
        )[0]
        .get(0)
    };
    assert_eq!(
        (n("a"), n("b")),
        (2, 2),
        "each message's updates applied once"
    );
    assert_eq!(
        pg.count(&format!("SELECT count(*) FROM {schema}.applied")),
        2
    );
    pg.drop_schema(&schema);
}

#[path = "guest_lang/mod.rs"]
mod guest_lang;
#[path = "guest_lang/sql.rs"]
mod lang_sql;

/// `lockgate test --database`: the Rust ledger passes tests/fixtures/ledger (rows checked in
/// each message's transaction, then rolled back); with `--commit` the successful messages'
/// rows stay; without `--database` an expectation with `"sql"` fails and says what is missing.
#[test]
fn lockgate_test_runs_fixtures_against_a_database_and_commits_only_when_asked() {
    let wasm = lockgate_tests::guest("ledger");
    lang_sql::ledger_passes_the_fixture(&wasm);

    let root = lockgate_tests::workspace_root();
    let pg = SyncPg::connect();
    let schema = pg::unique_schema("lgtestcommit");
    let setup =
        std::fs::read_to_string(root.join("tests/fixtures/ledger/schema.sql")).expect("schema.sql");
    pg.exec(&format!(
        "CREATE SCHEMA {schema}; SET search_path = {schema}; {setup}; RESET search_path"
    ));
    let url = format!("{}?options=-csearch_path%3D{schema}", pg::URL);
    let wasm = wasm.to_str().expect("utf-8 path");
    let input = "tests/fixtures/ledger/input.jsonl";
    let out = lockgate_tests::lockgate(
        &root,
        &[
            "test",
            wasm,
            "--input",
            input,
            "--database",
            &url,
            "--commit",
        ],
    );
    assert!(out.status.success(), "{}", lockgate_tests::show(&out));
    let rows: Vec<(String, i64, i64)> = pg
        .query(
            &format!("SELECT account, balance, deposits FROM {schema}.account_balances ORDER BY 1"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [("a".to_owned(), 5, 1), ("b".to_owned(), 70, 4)],
        "the two deposits that succeeded committed, the rejected ones did not"
    );

    let out = lockgate_tests::lockgate(
        &root,
        &[
            "test",
            wasm,
            "--input",
            input,
            "--expect",
            "tests/fixtures/ledger/expected.jsonl",
        ],
    );
    let text = lockgate_tests::show(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("run with --database"), "{text}");
    assert!(
        text.contains("refused"),
        "without a grant statements are refused: {text}"
    );
    pg.drop_schema(&schema);
}
