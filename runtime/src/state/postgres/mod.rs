//! PostgreSQL as a shared state store: guest kv and idempotency claims for routes that run on
//! several processes.
//!
//! A deadpool pool of tokio-postgres connections; every operation is one statement (a batch of
//! claims or completions included: the keys as one JSON value or an array), so a remote store
//! costs one round trip per batch rather than per message. Lease and TTL arithmetic uses the
//! *server's* clock (`clock_timestamp()`), so processes with skewed clocks still agree on when
//! a lease ran out.
//!
//! The schema (default `lockgate`) is created and versioned by the runtime on first use, or ahead
//! of time by `lockgate migrate`; concurrent starters serialise on an advisory lock.

mod sql;

use std::time::Duration;

pub use sql::{SqlFailure, SqlStatementError, SqlTxn, TxnClaim};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::{
    Claim, ClaimRequest, Commit, Completion, IdempotencyStore, KvStore, KvWrite, StateError,
};

use crate::config::postgres_schema_name_ok;
use crate::message::now_ms;
use crate::message::{LOCKGATE_ID_HEADER, OutRecord};
use futures_util::future::BoxFuture;

/// Milliseconds since the epoch on the server's clock.
const NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// How long the claim inside a handler's transaction waits for another transaction that holds
/// the key's row (that message is being handled elsewhere) before it answers busy, so the route
/// can publish what it finished meanwhile and ask again.
const CLAIM_LOCK_TIMEOUT_MS: u64 = 250;

/// How long expired rows are left before the cleanup deletes them.
const CLEANUP_GRACE_MS: i64 = 60_000;
/// Rows one cleanup statement deletes at most (short transactions, no long locks).
const CLEANUP_BATCH: i64 = 5_000;
/// Time between cleanups.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// How long one cleanup goes on deleting full batches from a table before it leaves the rest
/// for the next: a quarter of the interval, so that it keeps up with routes that expire far
/// more than a batch a minute without holding the store's connections the whole time.
const CLEANUP_BUDGET: Duration = Duration::from_secs(15);

/// Schema migrations, in order; version `i + 1` is `MIGRATIONS[i]`. Never edit one that shipped:
/// add another.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "kv and idempotency tables",
        "CREATE TABLE {s}.kv (
        namespace text NOT NULL,
        key text NOT NULL,
        value bytea NOT NULL,
        expires_at_ms bigint,
        PRIMARY KEY (namespace, key)
    );
    CREATE INDEX kv_expiry ON {s}.kv (expires_at_ms) WHERE expires_at_ms IS NOT NULL;
    CREATE TABLE {s}.idempotency (
        scope text NOT NULL,
        key text NOT NULL,
        state text NOT NULL CHECK (state IN ('c', 'a', 'd')),
        owner text,
        until_ms bigint NOT NULL,
        outputs bytea,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX idempotency_until ON {s}.idempotency (until_ms);",
    ),
    (
        "dead_letters table",
        // The envelope is kept whole (headers as two parallel arrays, in order) so a dead letter
        // reads back exactly as it was written; the columns beside it are what `lockgate dlq`
        // and SQL users filter on.
        "CREATE TABLE {s}.dead_letters (
        id bigserial PRIMARY KEY,
        dlq text NOT NULL,
        lockgate_id text NOT NULL,
        route text NOT NULL,
        error_kind text NOT NULL,
        reason text NOT NULL,
        attempts integer NOT NULL,
        source text NOT NULL,
        failed_at timestamptz NOT NULL,
        key bytea,
        header_names text[] NOT NULL,
        header_values bytea[] NOT NULL,
        payload bytea NOT NULL,
        replayed_at timestamptz,
        replayed_to text,
        UNIQUE (dlq, lockgate_id)
    );
    CREATE INDEX dead_letters_route ON {s}.dead_letters (route, error_kind, failed_at);
    CREATE INDEX dead_letters_time ON {s}.dead_letters (failed_at);",
    ),
    (
        "outbox table",
        // Written by outbox routes (in the transaction of their kv writes and idempotency key)
        // and by any service that wants its rows relayed; read by outbox relays. A statement
        // trigger wakes relays (LISTEN "<schema>.outbox"), whoever inserted. The partial
        // indexes keep the relay's reads proportional to the backlog, not to the table.
        "CREATE TABLE {s}.outbox (
        id bigserial PRIMARY KEY,
        topic text NOT NULL,
        key bytea,
        header_names text[] NOT NULL DEFAULT '{}',
        header_values bytea[] NOT NULL DEFAULT '{}',
        payload bytea NOT NULL,
        lockgate_id text UNIQUE,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        published_at timestamptz,
        claimed_by text,
        claimed_until timestamptz,
        CHECK (cardinality(header_names) = cardinality(header_values))
    );
    CREATE INDEX outbox_unpublished ON {s}.outbox (id) WHERE published_at IS NULL;
    CREATE INDEX outbox_unpublished_key ON {s}.outbox (key, id) WHERE published_at IS NULL;
    CREATE INDEX outbox_published ON {s}.outbox (published_at) WHERE published_at IS NOT NULL;
    CREATE FUNCTION {s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{s}.outbox', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_notify();",
    ),
    (
        "dead-lettered keys and replay results",
        // 'x': the key's message was dead-lettered (a replayed copy may claim it again). The
        // replay_* columns say what became of a dead letter's replayed copy.
        "ALTER TABLE {s}.idempotency DROP CONSTRAINT idempotency_state_check;
    ALTER TABLE {s}.idempotency ADD CONSTRAINT idempotency_state_check
        CHECK (state IN ('c', 'a', 'd', 'x'));
    ALTER TABLE {s}.dead_letters ADD COLUMN replay_result text,
        ADD COLUMN replay_route text,
        ADD COLUMN replay_detail text,
        ADD COLUMN replay_result_at timestamptz;",
    ),
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Statements, with the schema name filled in once.
#[derive(Debug)]
struct Sql {
    get: String,
    set_many: String,
    delete: String,
    insert_if_absent: String,
    update_if: String,
    delete_if: String,
    visible: String,
    delete_blind: String,
    lock_claim: String,
    mark_applied: String,
    mark_applied_if_held: String,
    mark_done_if_held: String,
    claim_state: String,
    insert_outbox: String,
    claim: String,
    claim_in_txn: String,
    claim_held: String,
    unclaim_done: String,
    complete: String,
    release: String,
    cleanup_kv: String,
    cleanup_idempotency: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        let visible = "(expires_at_ms IS NULL OR expires_at_ms > $3)";
        // The end of both marks of a handler's commit (see `mark_applied_if_held`).
        let held_or_fail = "SELECT 1 / (SELECT count(*)::int FROM m),
                        set_config('statement_timeout', '0', true)";
        Self {
            get: format!(
                "SELECT value FROM {s}.kv WHERE namespace = $1 AND key = $2 AND {visible}"
            ),
            set_many: format!(
                "INSERT INTO {s}.kv (namespace, key, value, expires_at_ms)
                 SELECT $1, k, v, $4 FROM unnest($2::text[], $3::bytea[]) AS e(k, v)
                 ON CONFLICT (namespace, key) DO UPDATE
                 SET value = excluded.value, expires_at_ms = excluded.expires_at_ms"
            ),
            delete: format!(
                "WITH d AS (DELETE FROM {s}.kv WHERE namespace = $1 AND key = $2
                            RETURNING expires_at_ms)
                 SELECT count(*) FROM d WHERE {visible}"
            ),
            insert_if_absent: format!(
                "INSERT INTO {s}.kv AS kv (namespace, key, value, expires_at_ms)
                 VALUES ($1, $2, $4, $5)
                 ON CONFLICT (namespace, key) DO UPDATE
                 SET value = excluded.value, expires_at_ms = excluded.expires_at_ms
                 WHERE kv.expires_at_ms IS NOT NULL AND kv.expires_at_ms <= $3"
            ),
            update_if: format!(
                "UPDATE {s}.kv SET value = $5, expires_at_ms = $6
                 WHERE namespace = $1 AND key = $2 AND value = $4 AND {visible}"
            ),
            delete_if: format!(
                "DELETE FROM {s}.kv WHERE namespace = $1 AND key = $2 AND value = $4 AND {visible}"
            ),
            visible: format!(
                "SELECT count(*) FROM {s}.kv WHERE namespace = $1 AND key = $2 AND {visible}"
            ),
            delete_blind: format!("DELETE FROM {s}.kv WHERE namespace = $1 AND key = $2"),
            lock_claim: format!(
                "SELECT state, owner FROM {s}.idempotency WHERE scope = $1 AND key = $2 FOR UPDATE"
            ),
            // A row whose lockgate_id is already there was written by an earlier commit of
            // the same message (its key expired and it came back): it is not written twice.
            insert_outbox: format!(
                "INSERT INTO {s}.outbox (topic, key, header_names, header_values, payload, lockgate_id)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (lockgate_id) DO NOTHING"
            ),
            mark_applied: format!(
                "UPDATE {s}.idempotency SET state = 'a', outputs = $3, until_ms = {NOW} + $4
                 WHERE scope = $1 AND key = $2"
            ),
            // The check and the mark of a handler's commit in one statement (sql.rs): when
            // `$5` no longer holds the claim nothing is updated and the statement fails
            // (division by zero, SQLSTATE 22012), which aborts the transaction, so the
            // COMMIT sent behind it in the same round trip rolls back. It also lifts the
            // handler's statement timeout for the rest of the commit (its outbox rows and
            // COMMIT), which saves a statement and a round trip of the server's.
            mark_applied_if_held: format!(
                "WITH m AS (UPDATE {s}.idempotency SET state = 'a', outputs = $3, until_ms = {NOW} + $4
                 WHERE scope = $1 AND key = $2 AND state = 'c' AND owner = $5 RETURNING 1)
                 {held_or_fail}"
            ),
            // The owner stays on the record: a commit whose answer was lost finds its own.
            mark_done_if_held: format!(
                "WITH m AS (UPDATE {s}.idempotency SET state = 'd', outputs = NULL, until_ms = {NOW} + $3
                 WHERE scope = $1 AND key = $2 AND state = 'c' AND owner = $4 RETURNING 1)
                 {held_or_fail}"
            ),
            claim_state: format!(
                "SELECT state, owner FROM {s}.idempotency WHERE scope = $1 AND key = $2"
            ),
            // Answers per request, in order: 'c' claimed, 'a' claimed with committed outputs,
            // 'd' done, 'x' dead-lettered (claimed instead when the request is a replay), 'b'
            // busy for n more ms. The final SELECT sees the table as it was
            // before the INSERT (one snapshot), which is why "claimed" comes from the INSERT's
            // RETURNING; a row another transaction inserted meanwhile is invisible here and
            // answers "busy 1 ms", asked again. An expired applied record stays applied: its
            // effects are committed, only its outputs wait for a publisher.
            //
            // The final lookup is a LATERAL ... LIMIT 1 so the only plan is one index probe per
            // key. As a plain join, the cached generic plan of a statement prepared while the
            // table was new and empty read every row of the scope and hashed them: each claim
            // got slower as the table grew, until autovacuum's ANALYZE (a minute or more
            // later) made PostgreSQL plan it again. That is exactly a new route working off a
            // backlog (BENCHMARKS.md, the SQL commit section).
            //
            // The batch comes as one JSON array ($2, `[{"key", "owner", "replay"}]`) rather than
            // arrays, so that PostgreSQL settles on that generic plan. It plans a prepared
            // statement afresh at each call while a plan for the call's values looks cheaper
            // than the generic one; from arrays it knows each call's batch size (3 keys, say,
            // against the 10 it assumes without values), so that was every call, and planning
            // this statement took more of the server's time than running it. The size of a
            // JSON value is hidden from the planner at every call alike.
            claim: format!(
                "WITH r AS (
                    SELECT key, owner, replay, ord
                    FROM ROWS FROM (jsonb_to_recordset($2::text::jsonb)
                            AS (key text, owner text, replay bool))
                        WITH ORDINALITY AS r(key, owner, replay, ord)
                 ), first AS (
                    SELECT DISTINCT ON (key) key, owner, replay FROM r ORDER BY key, ord
                 ), t AS (SELECT {NOW} AS now),
                 up AS (
                    INSERT INTO {s}.idempotency AS i (scope, key, state, owner, until_ms)
                    SELECT $1, first.key, 'c', first.owner, t.now + $3 FROM first, t
                    ON CONFLICT (scope, key) DO UPDATE
                    SET state = CASE WHEN i.state = 'a' THEN 'a' ELSE 'c' END,
                        owner = excluded.owner, until_ms = excluded.until_ms
                    WHERE i.until_ms <= excluded.until_ms - $3
                       OR (i.state IN ('c', 'a') AND i.owner = excluded.owner)
                       OR (i.state = 'x' AND EXISTS (
                            SELECT 1 FROM first f WHERE f.key = excluded.key AND f.replay))
                    RETURNING i.key, i.owner, i.state, i.outputs
                 )
                 SELECT CASE
                        WHEN up.key IS NOT NULL AND up.owner = r.owner THEN up.state
                        WHEN i.state IN ('d', 'x') THEN i.state
                        ELSE 'b'
                    END,
                    greatest(i.until_ms - t.now, 1::bigint),
                    up.outputs
                 FROM r CROSS JOIN t
                 LEFT JOIN up ON up.key = r.key
                 LEFT JOIN LATERAL (
                    SELECT state, until_ms FROM {s}.idempotency
                    WHERE scope = $1 AND key = r.key LIMIT 1
                 ) i ON true
                 ORDER BY r.ord"
            ),
            // The claim of one key inside a handler's transaction (`sql.rs`, `begin_claimed`):
            // params scope, key, owner, replay, lease (ms), ttl (ms), the handler's statement
            // timeout (ms, text) and role (text or NULL). A key it may take is written as done
            // by `owner` for the ttl at once (an applied one stays applied, for the lease):
            // the transaction either commits with the handler's statements, which makes that
            // true, or rolls back and leaves no trace. So nothing is claimed between attempts
            // and no mark updates the row at the commit, which saves the claim's own commit
            // and an update of the row per message (BENCHMARKS.md, the SQL commit section).
            // It returns 'c' (ours) or 'a' with the outputs to publish, and no row when the
            // key is not its to take: `claim_held` then says why.
            //
            // While another transaction holds the key's row (that message is being handled
            // elsewhere), the INSERT waits for it, but only [`CLAIM_LOCK_TIMEOUT_MS`]: the
            // subquery sets that lock timeout (keeping the transaction's own in
            // `lockgate.lock_timeout`) before the INSERT has its row, and RETURNING puts it
            // back and sets the handler's statement timeout and role for the statements that
            // follow. Settings made inside the statement spare a handler's transaction three
            // statements of their own, and a plain INSERT ... RETURNING costs the server less
            // than CTEs around it (BENCHMARKS.md).
            claim_in_txn: format!(
                "INSERT INTO {s}.idempotency AS i (scope, key, state, owner, until_ms)
                 SELECT $1, $2, 'd', $3, s.now + $6
                 FROM (SELECT {NOW} AS now, set_config('lock_timeout',
                        CASE WHEN set_config('lockgate.lock_timeout',
                                             current_setting('lock_timeout'), true) IS NOT NULL
                             THEN '{CLAIM_LOCK_TIMEOUT_MS}ms' END, true)) s
                 ON CONFLICT (scope, key) DO UPDATE
                 SET state = CASE WHEN i.state = 'a' THEN 'a' ELSE 'd' END,
                     owner = excluded.owner,
                     until_ms = CASE WHEN i.state = 'a' THEN excluded.until_ms - $6 + $5
                                     ELSE excluded.until_ms END
                 WHERE i.until_ms <= excluded.until_ms - $6
                    OR (i.state IN ('c', 'a') AND i.owner = excluded.owner)
                    OR (i.state = 'x' AND $4)
                 RETURNING CASE WHEN i.state = 'a' THEN 'a' ELSE 'c' END,
                    NULL::bigint,
                    i.outputs,
                    set_config('lock_timeout', current_setting('lockgate.lock_timeout'), true),
                    set_config('statement_timeout', $7::text, true),
                    CASE WHEN $8::text IS NOT NULL THEN set_config('role', $8::text, true) END"
            ),
            // Why `claim_in_txn` did not take a key: 'd' done, 'x' dead-lettered, or 'b' held
            // for n more ms (no row: its holder rolled back meanwhile, ask again). A statement
            // of its own sees what was committed after the claim's snapshot.
            claim_held: format!(
                "SELECT CASE WHEN state IN ('d', 'x') THEN state ELSE 'b' END,
                    greatest(until_ms - {NOW}, 1::bigint), NULL::bytea
                 FROM {s}.idempotency WHERE scope = $1 AND key = $2"
            ),
            // Takes back a key `claim_in_txn` wrote outside a transaction (its `BEGIN` failed).
            unclaim_done: format!(
                "DELETE FROM {s}.idempotency
                 WHERE scope = $1 AND key = $2 AND owner = $3 AND state = 'd'"
            ),
            complete: format!(
                "INSERT INTO {s}.idempotency (scope, key, state, owner, until_ms)
                 SELECT $1, k, $4, NULL, {NOW} + $3 FROM unnest($2::text[]) AS k
                 ON CONFLICT (scope, key) DO UPDATE
                 SET state = excluded.state, owner = NULL, until_ms = excluded.until_ms,
                     outputs = NULL"
            ),
            // `key = ANY($2)` bounds the rows read to the batch's keys whatever the plan (see
            // the note on `claim`); the pair test then keeps the ones each owner holds.
            release: format!(
                "DELETE FROM {s}.idempotency
                 WHERE scope = $1 AND key = ANY($2) AND state = 'c'
                   AND (key, owner) IN (SELECT * FROM unnest($2::text[], $3::text[]))"
            ),
            cleanup_kv: format!(
                "DELETE FROM {s}.kv WHERE ctid IN (
                    SELECT ctid FROM {s}.kv WHERE expires_at_ms < {NOW} - $1 LIMIT $2)"
            ),
            cleanup_idempotency: format!(
                "DELETE FROM {s}.idempotency WHERE ctid IN (
                    SELECT ctid FROM {s}.idempotency
                    WHERE until_ms < {NOW} - $1 AND state <> 'a' LIMIT $2)"
            ),
        }
    }
}

/// A PostgreSQL database as the state store.
#[derive(Clone)]
pub struct PostgresStore {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Connections of handlers' SQL transactions (`sql.rs`).
    sql_pool: Pool,
    /// For connections outside the pool (the outbox relay's LISTEN).
    pg_config: tokio_postgres::Config,
    schema: String,
    sql: Sql,
    /// host:port/db, for error messages (never the password).
    addr: String,
    migrated: tokio::sync::OnceCell<()>,
    runtime: tokio::runtime::Handle,
    cleanup: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self
            .cleanup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("addr", &self.inner.addr)
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl PostgresStore {
    /// A store in `schema` of the database at `url` (`postgres://user[:password]@host:port/db`
    /// or a `key=value` connection string), with at most `pool_size` connections. Connects
    /// lazily: an unreachable server shows as [`StateError::Unavailable`] on use. Must be called
    /// inside a tokio runtime, which the synchronous [`KvStore`] methods block on.
    pub fn new(url: &str, schema: &str, pool_size: usize) -> Result<Self, StateError> {
        if !postgres_schema_name_ok(schema) {
            return Err(StateError::Config(format!(
                "\"{schema}\" is not a usable schema name: lowercase letters, digits and _, \
                 starting with a letter or _, at most 63 characters"
            )));
        }
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StateError::Config(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(2));
        }
        let addr = describe(&config);
        let pg_config = config.clone();
        let pool_of = |config: tokio_postgres::Config| {
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(pool_size.max(1))
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(10)))
                .create_timeout(Some(Duration::from_secs(5)))
                .recycle_timeout(Some(Duration::from_secs(5)))
                .build()
                .map_err(|e| StateError::Config(format!("postgres at {addr}: {e}")))
        };
        let pool = pool_of(config.clone())?;
        // Handlers' transactions hold a connection for a whole call: a pool of their own, so
        // that they never starve the claims and commits of the routes.
        let sql_pool = pool_of(config)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StateError::Config("the PostgreSQL store must be created inside a tokio runtime".into())
        })?;
        let store = Self {
            inner: std::sync::Arc::new(Inner {
                pool,
                sql_pool,
                pg_config,
                schema: schema.to_owned(),
                sql: Sql::new(schema),
                addr,
                migrated: tokio::sync::OnceCell::new(),
                runtime,
                cleanup: std::sync::Mutex::new(None),
            }),
        };
        let weak = std::sync::Arc::downgrade(&store.inner);
        let task = store.inner.runtime.spawn(async move {
            let mut tick = tokio::time::interval(CLEANUP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let store = PostgresStore { inner };
                if let Err(e) = store.cleanup().await {
                    tracing::warn!(error = %e, "Cleaning up expired state rows failed; trying again later");
                }
            }
        });
        *store
            .inner
            .cleanup
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        Ok(store)
    }

    /// Whether `other` is this store (a clone of it), not another one on the same database.
    pub fn same_as(&self, other: &PostgresStore) -> bool {
        std::sync::Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The schema this store's tables live in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The statements that look up idempotency keys (a batch, or one in a handler's
    /// transaction), each with a name and the parameter types to prepare it with, for the test
    /// that checks how PostgreSQL plans them on a new, empty table
    /// (`tests/tests/state_stores.rs`). Not an API.
    #[doc(hidden)]
    pub fn key_batch_statements(&self) -> [(&'static str, &str, &'static str); 4] {
        let sql = &self.inner.sql;
        [
            ("claim", &sql.claim, "text, text, bigint"),
            ("release", &sql.release, "text, text[], text[]"),
            (
                "claim_in_txn",
                &sql.claim_in_txn,
                "text, text, text, bool, bigint, bigint, text, text",
            ),
            ("claim_held", &sql.claim_held, "text, text"),
        ]
    }

    /// The connection settings, for a connection of its own.
    pub(crate) fn pg_config(&self) -> &tokio_postgres::Config {
        &self.inner.pg_config
    }

    pub(crate) fn err(&self, what: &str, e: impl std::fmt::Display + 'static) -> StateError {
        // A server's error says its SQLSTATE too: what an operator looks up.
        let reason = match (&e as &dyn std::any::Any).downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => match pg.code() {
                Some(code) => format!("{} ({})", error_reason(pg), code.code()),
                None => error_reason(pg),
            },
            None => e.to_string(),
        };
        StateError::Unavailable(format!(
            "postgres at {} ({what}): {reason}",
            self.inner.addr
        ))
    }

    /// Creates or upgrades the schema to [`SCHEMA_VERSION`]; returns the version found before.
    /// Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<usize, StateError> {
        let mut client = self
            .inner
            .pool
            .get()
            .await
            .map_err(|e| self.err("connect", e))?;
        let s = &self.inner.schema;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.err("migrate", e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('lockgate-migrate:' || $1))",
            &[s],
        )
        .await
        .map_err(|e| self.err("migrate", e))?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(|e| self.err("migrate", e))?;
        let row = tx
            .query_one(
                &format!("SELECT coalesce(max(version), 0) FROM {s}.schema_migrations"),
                &[],
            )
            .await
            .map_err(|e| self.err("migrate", e))?;
        let found = usize::try_from(row.get::<_, i32>(0)).unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StateError::Config(format!(
                "postgres at {}: schema {s} is at version {found}, newer than this lockgate \
                 knows ({SCHEMA_VERSION}); upgrade lockgate",
                self.inner.addr
            )));
        }
        for (i, (description, sql)) in MIGRATIONS.iter().enumerate().skip(found) {
            tx.batch_execute(&sql.replace("{s}", s))
                .await
                .map_err(|e| self.err("migrate", e))?;
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute(
                &format!(
                    "INSERT INTO {s}.schema_migrations (version, description) VALUES ($1, $2)"
                ),
                &[&version, description],
            )
            .await
            .map_err(|e| self.err("migrate", e))?;
        }
        tx.commit().await.map_err(|e| self.err("migrate", e))?;
        Ok(found)
    }

    /// A pooled connection to a migrated schema.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StateError> {
        self.migrated().await?;
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| self.err("connect", e))
    }

    /// A store used only for handlers' transactions that never commit with a message's key
    /// (`lockgate test --database`): lockgate's own tables are never created in the database,
    /// and its transactions end with [`SqlTxn::commit_alone`] or roll back. Every other use
    /// fails, the tables being absent. Must be called inside a tokio runtime.
    pub fn for_handler_sql_only(url: &str, pool_size: usize) -> Result<Self, StateError> {
        // The schema is never created or used: any valid name.
        let store = Self::new(url, "lockgate", pool_size)?;
        // Marked migrated: `begin_sql` then creates nothing.
        let _ = store.inner.migrated.set(());
        Ok(store)
    }

    /// Creates or upgrades the schema once per store (see [`Self::migrate`]).
    pub(crate) async fn migrated(&self) -> Result<(), StateError> {
        self.inner
            .migrated
            .get_or_try_init(|| async { self.migrate().await.map(drop) })
            .await
            .map(drop)
    }

    /// Runs `sql` with `params` and returns the rows.
    pub(crate) async fn query(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StateError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(what, e))?;
        client
            .query(&stmt, params)
            .await
            .map_err(|e| self.err(what, e))
    }

    /// Runs `sql` with `params`; the rows it changed.
    pub(crate) async fn execute(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StateError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| self.err(what, e))?;
        client
            .execute(&stmt, params)
            .await
            .map_err(|e| self.err(what, e))
    }

    /// Runs `sql` with `params` (each with its type) as a statement planned for this call
    /// alone; the rows it changed. One round trip, like a prepared statement, but no cached
    /// plan: for statements whose right plan depends on how big a table has grown since it
    /// was new, such as an `id = ANY($1)` update of the outbox (a generic plan made on an empty
    /// outbox reads every unpublished row's index entry, 30 ms a call behind a backlog of
    /// 100,000 rows, until autovacuum analyzes the table).
    pub(crate) async fn execute_planned(
        &self,
        what: &str,
        sql: &str,
        params: &[(
            &(dyn tokio_postgres::types::ToSql + Sync),
            tokio_postgres::types::Type,
        )],
    ) -> Result<u64, StateError> {
        let client = self.client().await?;
        client
            .execute_typed(sql, params)
            .await
            .map_err(|e| self.err(what, e))
    }

    /// Deletes rows that expired more than a minute ago, in batches (one short transaction
    /// each), per table until a batch comes back short or [`CLEANUP_BUDGET`] has passed; returns
    /// how many it deleted.
    pub async fn cleanup(&self) -> Result<u64, StateError> {
        let sql = &self.inner.sql;
        let mut deleted = 0;
        for q in [&sql.cleanup_kv, &sql.cleanup_idempotency] {
            let started = std::time::Instant::now();
            loop {
                let batch = self
                    .execute("cleanup", q, &[&CLEANUP_GRACE_MS, &CLEANUP_BATCH])
                    .await?;
                deleted += batch;
                if batch < CLEANUP_BATCH.unsigned_abs() || started.elapsed() >= CLEANUP_BUDGET {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    /// Blocks on `f` for a guest's kv call, no longer than the call's deadline.
    fn block<T>(&self, f: impl Future<Output = Result<T, StateError>>) -> Result<T, StateError> {
        self.inner
            .runtime
            .block_on(crate::deadline::bound_current(f))
            .map_err(|_| StateError::DeadlineExceeded)?
    }
}

/// `host:port/db` of a connection config.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("");
    format!("{host}:{port}/{db}")
}

impl KvStore for PostgresStore {
    fn get(&self, namespace: &str, key: &str, now_ms: u64) -> Result<Option<Vec<u8>>, StateError> {
        self.block(async {
            let rows = self
                .query(
                    "kv get",
                    &self.inner.sql.get,
                    &[&namespace, &key, &ms(now_ms)],
                )
                .await?;
            Ok(rows.first().map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    fn set(
        &self,
        namespace: &str,
        key: &str,
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        self.set_many(
            namespace,
            &[(key.to_owned(), value.to_vec())],
            expires_at_ms,
        )
    }

    fn set_many(
        &self,
        namespace: &str,
        entries: &[(String, Vec<u8>)],
        expires_at_ms: Option<u64>,
    ) -> Result<(), StateError> {
        // One statement cannot upsert a row twice: the last write of a key wins, as it would
        // one set at a time.
        let mut last: std::collections::HashMap<&str, &[u8]> = std::collections::HashMap::new();
        for (k, v) in entries {
            last.insert(k.as_str(), v.as_slice());
        }
        let (keys, values): (Vec<&str>, Vec<&[u8]>) = last.into_iter().unzip();
        let expires = expires_at_ms.map(ms);
        self.block(async {
            self.execute(
                "kv set",
                &self.inner.sql.set_many,
                &[&namespace, &keys, &values, &expires],
            )
            .await
            .map(drop)
        })
    }

    fn delete(&self, namespace: &str, key: &str, now_ms: u64) -> Result<bool, StateError> {
        self.block(async {
            let rows = self
                .query(
                    "kv delete",
                    &self.inner.sql.delete,
                    &[&namespace, &key, &ms(now_ms)],
                )
                .await?;
            Ok(rows.first().is_some_and(|r| r.get::<_, i64>(0) > 0))
        })
    }

    fn compare_and_swap(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        expires_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<bool, StateError> {
        let sql = &self.inner.sql;
        let now = ms(now_ms);
        let expires = expires_at_ms.map(ms);
        self.block(async {
            Ok(match (expected, new) {
                (None, Some(new)) => {
                    self.execute(
                        "kv compare-and-swap",
                        &sql.insert_if_absent,
                        &[&namespace, &key, &now, &new, &expires],
                    )
                    .await?
                        == 1
                }
                (Some(old), Some(new)) => {
                    self.execute(
                        "kv compare-and-swap",
                        &sql.update_if,
                        &[&namespace, &key, &now, &old, &new, &expires],
                    )
                    .await?
                        == 1
                }
                (Some(old), None) => {
                    self.execute(
                        "kv compare-and-swap",
                        &sql.delete_if,
                        &[&namespace, &key, &now, &old],
                    )
                    .await?
                        == 1
                }
                (None, None) => {
                    let rows = self
                        .query(
                            "kv compare-and-swap",
                            &sql.visible,
                            &[&namespace, &key, &now],
                        )
                        .await?;
                    rows.first().is_none_or(|r| r.get::<_, i64>(0) == 0)
                }
            })
        })
    }
}

impl IdempotencyStore for PostgresStore {
    fn as_postgres(&self) -> Option<&PostgresStore> {
        Some(self)
    }

    fn claim(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Vec<Claim>, StateError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(Vec::new());
            }
            /// One request as the claim statement reads it (`jsonb_to_recordset`).
            #[derive(serde::Serialize)]
            struct Entry<'a> {
                key: &'a str,
                owner: &'a str,
                replay: bool,
            }
            let entries: Vec<Entry<'_>> = requests
                .iter()
                .map(|r| Entry {
                    key: &r.key,
                    owner: &r.owner,
                    replay: r.replay,
                })
                .collect();
            let what = "claim idempotency keys";
            let batch = serde_json::to_string(&entries).map_err(|e| self.err(what, e))?;
            let rows = self
                .query(
                    what,
                    &self.inner.sql.claim,
                    &[&scope, &batch, &millis(lease)],
                )
                .await?;
            if rows.len() != requests.len() {
                return Err(self.err(
                    what,
                    format!("{} answers for {} keys", rows.len(), requests.len()),
                ));
            }
            Ok(rows.iter().map(claim_answer).collect())
        })
    }

    fn complete(
        &self,
        scope: String,
        mut keys: Vec<String>,
        ttl: Duration,
        how: Completion,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            keys.sort_unstable();
            keys.dedup();
            if keys.is_empty() {
                return Ok(());
            }
            let state = match how {
                Completion::Done => "d",
                Completion::DeadLettered => "x",
            };
            self.execute(
                "record idempotency keys",
                &self.inner.sql.complete,
                &[&scope, &keys, &millis(ttl), &state],
            )
            .await
            .map(drop)
        })
    }

    fn commit(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<KvWrite>,
        outputs: Vec<u8>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(self.commit_tx(scope, claim, writes, outputs, Vec::new(), lease))
    }

    fn commit_outbox(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<KvWrite>,
        rows: Vec<OutRecord>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Commit, StateError>> {
        Box::pin(self.commit_tx(
            scope,
            claim,
            writes,
            crate::state::kept_outputs::encode_outputs(&[]),
            rows,
            lease,
        ))
    }

    fn release(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
    ) -> BoxFuture<'_, Result<(), StateError>> {
        Box::pin(async move {
            if requests.is_empty() {
                return Ok(());
            }
            let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
            let owners: Vec<&str> = requests.iter().map(|r| r.owner.as_str()).collect();
            self.execute(
                "release idempotency keys",
                &self.inner.sql.release,
                &[&scope, &keys, &owners],
            )
            .await
            .map(drop)
        })
    }
}

/// What a tokio-postgres error says, with what its `Display` leaves out: the server's own
/// message for an error the server sent (`Display` says "db error" alone), or the cause of a
/// connection's error.
pub(crate) fn error_reason(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => db.message().to_owned(),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// A row of the claim statements (`claim`, `claim_in_txn`) as the answer it is.
fn claim_answer(r: &tokio_postgres::Row) -> Claim {
    match r.get::<_, &str>(0) {
        "c" => Claim::Claimed,
        "a" => Claim::Applied(r.get::<_, Option<Vec<u8>>>(2).unwrap_or_default()),
        "d" => Claim::Done,
        "x" => Claim::DeadLettered,
        _ => Claim::Busy(Duration::from_millis(
            r.get::<_, Option<i64>>(1).unwrap_or(1).unsigned_abs(),
        )),
    }
}

impl PostgresStore {
    /// Checks the claim, applies `writes`, inserts the outbox `rows` and marks the key applied
    /// with `outputs`, in one transaction.
    async fn commit_tx(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<KvWrite>,
        outputs: Vec<u8>,
        rows: Vec<OutRecord>,
        lease: Duration,
    ) -> Result<Commit, StateError> {
        let what = "commit effects";
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(what, e))?;
        let applied = self
            .apply_commit(&tx, &scope, &claim, &writes, &outputs, &rows, lease, false)
            .await?;
        if applied == Applied::Now {
            tx.commit().await.map_err(|e| self.err(what, e))?;
        }
        // Anything else: dropping the transaction rolls it back.
        Ok(applied.into())
    }

    /// The steps of a commit, inside the transaction `tx` (lockgate's or a handler's): checks
    /// the claim, applies `writes`, inserts the outbox `rows` and marks the key applied. The
    /// caller commits only on [`Applied::Now`]; on anything else it rolls `tx` back, because
    /// a handler's transaction holds statements that must not land twice (see [`Applied`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn apply_commit<C: deadpool_postgres::GenericClient>(
        &self,
        tx: &C,
        scope: &str,
        claim: &ClaimRequest,
        writes: &[KvWrite],
        outputs: &[u8],
        rows: &[OutRecord],
        lease: Duration,
        claimed_in_tx: bool,
    ) -> Result<Applied, StateError> {
        let what = "commit effects";
        let sql = &self.inner.sql;
        let e = |e| self.err(what, e);
        // A key claimed inside `tx` is held by it (its row is locked until the end): nothing to
        // check.
        if !claimed_in_tx {
            let stmt = tx.prepare_cached(&sql.lock_claim).await.map_err(e)?;
            let row = tx
                .query_opt(&stmt, &[&scope, &claim.key])
                .await
                .map_err(e)?;
            match row
                .as_ref()
                .map(|r| (r.get::<_, &str>(0), r.get::<_, Option<&str>>(1)))
            {
                Some(("c", Some(owner))) if owner == claim.owner => {}
                // A retry of a commit whose answer was lost.
                Some(("a", Some(owner))) if owner == claim.owner => return Ok(Applied::Before),
                _ => return Ok(Applied::Not(Commit::LostClaim)),
            }
        }
        let now = ms(now_ms());
        for w in writes {
            let (ns, key) = (w.namespace.as_str(), w.key.as_str());
            let expires = w.expires_at_ms.map(ms);
            let q: &str = match (&w.expected, &w.value) {
                (None, Some(_)) => &sql.set_many,
                (None, None) => &sql.delete_blind,
                (Some(None), Some(_)) => &sql.insert_if_absent,
                (Some(None), None) => &sql.visible,
                (Some(Some(_)), Some(_)) => &sql.update_if,
                (Some(Some(_)), None) => &sql.delete_if,
            };
            let stmt = tx.prepare_cached(q).await.map_err(e)?;
            let ok = match (&w.expected, &w.value) {
                (None, Some(v)) => {
                    tx.execute(&stmt, &[&ns, &vec![key], &vec![v.as_slice()], &expires])
                        .await
                        .map_err(e)?;
                    true
                }
                (None, None) => {
                    tx.execute(&stmt, &[&ns, &key]).await.map_err(e)?;
                    true
                }
                (Some(None), Some(v)) => {
                    tx.execute(&stmt, &[&ns, &key, &now, &v.as_slice(), &expires])
                        .await
                        .map_err(e)?
                        == 1
                }
                (Some(None), None) => {
                    let row = tx.query_one(&stmt, &[&ns, &key, &now]).await.map_err(e)?;
                    row.get::<_, i64>(0) == 0
                }
                (Some(Some(old)), Some(v)) => {
                    tx.execute(
                        &stmt,
                        &[&ns, &key, &now, &old.as_slice(), &v.as_slice(), &expires],
                    )
                    .await
                    .map_err(e)?
                        == 1
                }
                (Some(Some(old)), None) => {
                    tx.execute(&stmt, &[&ns, &key, &now, &old.as_slice()])
                        .await
                        .map_err(e)?
                        == 1
                }
            };
            if !ok {
                return Ok(Applied::Not(Commit::Conflict(w.key.clone())));
            }
        }
        self.insert_outbox(tx, rows, what).await?;
        let stmt = tx.prepare_cached(&sql.mark_applied).await.map_err(e)?;
        tx.execute(&stmt, &[&scope, &claim.key, &outputs, &millis(lease)])
            .await
            .map_err(e)?;
        Ok(Applied::Now)
    }
}

/// What [`PostgresStore::apply_commit`] did in its transaction.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The effects are in the transaction and the key is marked applied: commit it.
    Now,
    /// This owner's key was already applied, by an earlier commit whose answer was lost. The
    /// transaction must roll back: committing it would land a handler's statements twice.
    Before,
    /// Nothing applied (the claim was lost or a key the handler read changed): roll back.
    Not(Commit),
}

impl From<Applied> for Commit {
    fn from(a: Applied) -> Commit {
        match a {
            Applied::Now | Applied::Before => Commit::Committed,
            Applied::Not(c) => c,
        }
    }
}

impl PostgresStore {
    /// Inserts `rows` into the outbox table within `tx` (a row whose `lockgate-id` is already
    /// there is skipped).
    pub(crate) async fn insert_outbox<C: deadpool_postgres::GenericClient>(
        &self,
        tx: &C,
        rows: &[OutRecord],
        what: &str,
    ) -> Result<(), StateError> {
        if rows.is_empty() {
            return Ok(());
        }
        let e = |e| self.err(what, e);
        let stmt = tx
            .prepare_cached(&self.inner.sql.insert_outbox)
            .await
            .map_err(e)?;
        for r in rows {
            let (names, values) = outbox_headers(r);
            let id = lockgate_id(r);
            tx.execute(&stmt, &[&r.topic, &r.key, &names, &values, &r.payload, &id])
                .await
                .map_err(e)?;
        }
        Ok(())
    }
}

/// The header names, header values and `lockgate-id` `insert_outbox` takes for `r`.
pub(crate) fn outbox_params(r: &OutRecord) -> (Vec<&str>, Vec<&[u8]>, Option<String>) {
    let (names, values) = outbox_headers(r);
    (names, values, lockgate_id(r))
}

/// A record's headers as the outbox stores them: two parallel arrays, without the
/// `lockgate-id` (it has its own column).
fn outbox_headers(r: &OutRecord) -> (Vec<&str>, Vec<&[u8]>) {
    r.headers
        .iter()
        .filter(|(n, _)| n != LOCKGATE_ID_HEADER)
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .unzip()
}

/// A record's `lockgate-id`, if it has one.
fn lockgate_id(r: &OutRecord) -> Option<String> {
    r.headers
        .iter()
        .find(|(n, _)| n == LOCKGATE_ID_HEADER)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}
