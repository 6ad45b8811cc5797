//! Helpers for tests against the test PostgreSQL (`scripts/brokers.sh start postgres`).

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

/// The test server's database, as the `postgres` superuser.
pub const URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A schema name no earlier run used, so each test starts from an empty schema.
pub fn unique_schema(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// A blocking client (test bodies are synchronous): tokio-postgres on a private runtime.
pub struct SyncPg {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl SyncPg {
    /// Connects to [`URL`].
    pub fn connect() -> Self {
        let rt = crate::kafka::runtime();
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls)
                .await
                .expect("postgres on 127.0.0.1:5432 (scripts/brokers.sh start postgres)");
            tokio::spawn(conn);
            client
        });
        Self { rt, client }
    }

    /// The rows of `sql` with `params`.
    pub fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<tokio_postgres::Row> {
        self.rt
            .block_on(self.client.query(sql, params))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The single `bigint` a `SELECT count(*) ...` returns.
    pub fn count(&self, sql: &str) -> u64 {
        let n: i64 = self.query(sql, &[])[0].get(0);
        u64::try_from(n).unwrap()
    }

    /// Runs `sql` (several statements allowed).
    pub fn exec(&self, sql: &str) {
        self.rt
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Drops `schema` and everything in it (tests leave nothing behind).
    pub fn drop_schema(&self, schema: &str) {
        self.exec(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    }
}

/// A lockgate PostgreSQL store on a fresh schema, with the runtime its blocking calls run on
/// (as in `lockgate run`): what a handler's `sql` grant names.
pub struct TestStore {
    /// The store's schema (not created until first used).
    pub schema: String,
    /// The store.
    pub store: lockgate::state::PostgresStore,
    _rt: tokio::runtime::Runtime,
}

impl TestStore {
    /// A store on a new schema named after `prefix`.
    pub fn new(prefix: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let schema = unique_schema(prefix);
        let store = {
            let _enter = rt.enter();
            lockgate::state::PostgresStore::new(URL, &schema, 4).unwrap()
        };
        Self {
            schema,
            store,
            _rt: rt,
        }
    }

    /// A grant of this store to a handler, with `max_rows` and a 1 MiB result limit.
    pub fn grant(&self, role: Option<&str>, max_rows: u64) -> lockgate::engine::SqlGrant {
        lockgate::engine::SqlGrant {
            store_name: "pg".into(),
            store: self.store.clone(),
            role: role.map(str::to_owned),
            max_rows,
            max_result_bytes: 1 << 20,
        }
    }
}
