//! Whether a shared state store answers, and why not: the health of every route that needs the
//! store (`/readyz`), and what `lockgate check --connect` reports.
//!
//! A [`StoreMonitor`] keeps one connection of its own to the store and asks it a trivial
//! question every [`CHECK_EVERY`] (PostgreSQL `SELECT 1`, Redis `PING`), so a store that goes
//! away shows in the routes' readiness even while no message needs it. Refused logins, a
//! database or role that does not exist, or a schema the user may not create are
//! misconfigurations ([`FailureKind::Misconfigured`](crate::health::FailureKind)), retried
//! slowly; a server that cannot be reached is transient.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;

use crate::config::StoreKind;
use crate::health::{Backoff, Failure, HealthReporter, HealthWatch};

/// How often a healthy store is asked whether it still answers.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Longest wait for a connection or an answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL error of `what` at `addr` (`host:port/db`), classified, with the server's own
/// message (tokio-postgres' `Display` only says "db error").
pub fn postgres_failure(addr: &str, what: &str, e: &tokio_postgres::Error) -> Failure {
    let error = format!(
        "postgres at {addr}: {what}: {}",
        super::postgres::error_reason(e)
    );
    let Some(db) = e.as_db_error() else {
        return Failure::transient(error);
    };
    let code = db.code();
    if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        Failure::misconfigured(
            error,
            "check the user name and password in the store's URL, and the server's pg_hba.conf",
        )
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        Failure::misconfigured(
            error,
            "create the database, or correct the database name in the store's URL",
        )
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        Failure::misconfigured(
            error,
            "grant the URL's user the rights the store needs (CREATE on the database for its schema, or run `lockgate migrate` as a user who has them)",
        )
    } else {
        Failure::transient(error)
    }
}

/// A Redis error of `what` at `addr`, classified.
pub fn redis_failure(addr: &str, what: &str, e: &redis::RedisError) -> Failure {
    let error = format!("redis at {addr}: {what}: {e}");
    let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
    if refused {
        Failure::misconfigured(
            error,
            "check the password (and user) in the store's URL (redis://user:password@host:port/db) against the server's requirepass or ACL users",
        )
    } else if e.kind() == redis::ErrorKind::InvalidClientConfig {
        Failure::misconfigured(error, "correct the store's URL")
    } else {
        Failure::transient(error)
    }
}

/// `host:port/db` of a PostgreSQL URL, for messages (never the password).
fn postgres_addr(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map_or_else(String::new, |h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        });
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("postgres")
    )
}

fn postgres_config(url: &str) -> Result<tokio_postgres::Config, Failure> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        Failure::misconfigured(
            format!("not a PostgreSQL URL: {e}"),
            "correct the store's URL",
        )
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(TIMEOUT);
    }
    Ok(config)
}

/// An open PostgreSQL connection for probing (its driver runs until the client is dropped).
async fn postgres_connect(
    config: &tokio_postgres::Config,
    addr: &str,
) -> Result<tokio_postgres::Client, Failure> {
    let (client, connection) = tokio::time::timeout(TIMEOUT, config.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| {
            Failure::transient(format!(
                "postgres at {addr}: connect: no answer within {} s",
                TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| postgres_failure(addr, "connect", &e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Whether `schema` is usable: at lockgate's version, or creatable by this user. Returns what
/// `lockgate run` (or `lockgate migrate`) would do to it.
async fn postgres_schema(
    client: &tokio_postgres::Client,
    addr: &str,
    schema: &str,
) -> Result<Vec<String>, Failure> {
    let q = |e: tokio_postgres::Error| postgres_failure(addr, "check the schema", &e);
    let exists = client
        .query_opt(
            "SELECT 1 FROM information_schema.schemata WHERE schema_name = $1",
            &[&schema],
        )
        .await
        .map_err(q)?
        .is_some();
    if !exists {
        let may_create: bool = client
            .query_one(
                "SELECT has_database_privilege(current_user, current_database(), 'CREATE')",
                &[],
            )
            .await
            .map_err(q)?
            .get(0);
        if !may_create {
            return Err(Failure::misconfigured(
                format!(
                    "postgres at {addr}: schema {schema} does not exist and the URL's user may not create it"
                ),
                "run `lockgate migrate` as a user who may (or GRANT CREATE ON DATABASE to this user), or correct the store's schema",
            ));
        }
        return Ok(vec![format!(
            "schema {schema} does not exist yet: `lockgate run` (or `lockgate migrate`) creates it"
        )]);
    }
    let table = format!("{schema}.schema_migrations");
    let version: Option<i32> = match client
        .query_one(&format!("SELECT max(version) FROM {table}"), &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(q(e)),
    };
    let current = i32::try_from(super::POSTGRES_SCHEMA_VERSION).unwrap_or(i32::MAX);
    Ok(match version {
        Some(v) if v > current => {
            return Err(Failure::misconfigured(
                format!(
                    "postgres at {addr}: schema {schema} is at version {v}, newer than this lockgate knows ({current})"
                ),
                "upgrade lockgate",
            ));
        }
        Some(v) if v == current => Vec::new(),
        v => vec![format!(
            "schema {schema} is at version {} of {current}: `lockgate run` (or `lockgate migrate`) upgrades it",
            v.unwrap_or(0)
        )],
    })
}

/// Why a statement on the store with connection settings `config` failed with `error`: a
/// connection of its own tells a refused login or a missing schema (misconfigurations, with what
/// to change) from a server that is away; if it connects and the schema is usable, `error` is
/// taken as transient.
pub(crate) async fn classify_postgres(
    config: &tokio_postgres::Config,
    schema: &str,
    error: String,
) -> Failure {
    let addr = postgres_addr(config);
    let checked = async {
        let client = postgres_connect(config, &addr).await?;
        postgres_schema(&client, &addr, schema).await
    }
    .await;
    match checked {
        Ok(_) => Failure::transient(error),
        Err(f) => f,
    }
}

/// Connects to the PostgreSQL store at `url`, logs in and checks `schema` (for `lockgate check
/// --connect`); what `lockgate run` would create or upgrade.
pub async fn probe_postgres(url: &str, schema: &str) -> Result<Vec<String>, Failure> {
    let config = postgres_config(url)?;
    let addr = postgres_addr(&config);
    let client = postgres_connect(&config, &addr).await?;
    postgres_schema(&client, &addr, schema).await
}

fn redis_client(url: &str) -> Result<(redis::Client, String), Failure> {
    let client = redis::Client::open(url).map_err(|e| {
        Failure::misconfigured(format!("not a Redis URL: {e}"), "correct the store's URL")
    })?;
    let addr = client.get_connection_info().addr().to_string();
    Ok((client, addr))
}

async fn redis_connect(
    client: &redis::Client,
    addr: &str,
) -> Result<redis::aio::MultiplexedConnection, Failure> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| redis_failure(addr, "connect", &e))
}

async fn redis_ping(
    conn: &mut redis::aio::MultiplexedConnection,
    addr: &str,
) -> Result<(), Failure> {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .map(drop)
        .map_err(|e| redis_failure(addr, "PING", &e))
}

/// Connects to the Redis store at `url`, logs in and asks PING (for `lockgate check
/// --connect`).
pub async fn probe_redis(url: &str) -> Result<(), Failure> {
    let (client, addr) = redis_client(url)?;
    let mut conn = redis_connect(&client, &addr).await?;
    redis_ping(&mut conn, &addr).await
}

/// Watches one shared store's health in the background until dropped.
#[derive(Debug)]
pub struct StoreMonitor {
    health: HealthReporter,
    task: JoinHandle<()>,
}

impl Drop for StoreMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StoreMonitor {
    /// Starts watching the store of `kind` at `url` (inside a tokio runtime).
    pub fn spawn(url: &str, kind: &StoreKind) -> Self {
        let health = HealthReporter::new();
        let task = match kind {
            StoreKind::Postgres { schema, .. } => tokio::spawn(watch_postgres(
                url.to_owned(),
                schema.clone(),
                health.clone(),
            )),
            StoreKind::Redis { .. } => tokio::spawn(watch_redis(url.to_owned(), health.clone())),
        };
        Self { health, task }
    }

    /// The store's health.
    pub fn health(&self) -> HealthWatch {
        self.health.watch()
    }
}

async fn watch_postgres(url: String, schema: String, health: HealthReporter) {
    match postgres_config(&url) {
        Ok(config) => {
            let addr = postgres_addr(&config);
            watch(
                &health,
                &PostgresProbe {
                    config,
                    addr,
                    schema,
                },
            )
            .await;
        }
        Err(f) => report_forever(&health, f).await,
    }
}

async fn watch_redis(url: String, health: HealthReporter) {
    match redis_client(&url) {
        Ok((client, addr)) => watch(&health, &RedisProbe { client, addr }).await,
        Err(f) => report_forever(&health, f).await,
    }
}

/// A failure that cannot get better (a URL that does not parse): reported, slowly, for good.
async fn report_forever(health: &HealthReporter, failure: Failure) {
    let mut backoff = Backoff::new();
    loop {
        health.retry_after(&mut backoff, failure.clone()).await;
    }
}

/// How [`watch`] connects to a store and checks the connection.
trait Probe {
    type Conn;
    async fn connect(&self) -> Result<Self::Conn, Failure>;
    async fn check(&self, conn: &mut Self::Conn) -> Result<(), Failure>;
}

struct PostgresProbe {
    config: tokio_postgres::Config,
    addr: String,
    schema: String,
}

impl Probe for PostgresProbe {
    type Conn = tokio_postgres::Client;

    async fn connect(&self) -> Result<Self::Conn, Failure> {
        let client = postgres_connect(&self.config, &self.addr).await?;
        postgres_schema(&client, &self.addr, &self.schema).await?;
        Ok(client)
    }

    async fn check(&self, client: &mut Self::Conn) -> Result<(), Failure> {
        match tokio::time::timeout(TIMEOUT, client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(postgres_failure(&self.addr, "SELECT 1", &e)),
            Err(_) => Err(Failure::transient(format!(
                "postgres at {}: no answer within {} s",
                self.addr,
                TIMEOUT.as_secs()
            ))),
        }
    }
}

struct RedisProbe {
    client: redis::Client,
    addr: String,
}

impl Probe for RedisProbe {
    type Conn = redis::aio::MultiplexedConnection;

    async fn connect(&self) -> Result<Self::Conn, Failure> {
        let mut conn = redis_connect(&self.client, &self.addr).await?;
        redis_ping(&mut conn, &self.addr).await?;
        Ok(conn)
    }

    async fn check(&self, conn: &mut Self::Conn) -> Result<(), Failure> {
        redis_ping(conn, &self.addr).await
    }
}

/// Connects, then checks the connection every [`CHECK_EVERY`]; reports ready while it answers
/// and, on a failure, retries the whole connect on the backoff the failure's kind calls for.
async fn watch<P: Probe>(health: &HealthReporter, probe: &P) {
    let mut backoff = Backoff::new();
    loop {
        let mut conn = match probe.connect().await {
            Ok(c) => c,
            Err(f) => {
                health.retry_after(&mut backoff, f).await;
                continue;
            }
        };
        backoff.reset();
        health.ready();
        let failure = loop {
            tokio::time::sleep(CHECK_EVERY).await;
            match probe.check(&mut conn).await {
                Ok(()) => health.ready(),
                Err(f) => break f,
            }
        };
        health.retry_after(&mut backoff, failure).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::FailureKind;

    #[test]
    fn redis_refusals_are_misconfigurations_and_the_rest_transient() {
        let refused = redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        let f = redis_failure("h:6379", "connect", &refused);
        assert_eq!(f.kind, FailureKind::Misconfigured);
        assert!(f.fix.as_deref().is_some_and(|x| x.contains("password")));
        let down =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            redis_failure("h:6379", "connect", &down).kind,
            FailureKind::Transient
        );
    }

    #[test]
    fn store_urls_are_described_without_their_password() {
        let config = postgres_config("postgres://app:secret@db.internal:6543/orders").unwrap();
        assert_eq!(postgres_addr(&config), "db.internal:6543/orders");
        assert!(postgres_config("not a url").unwrap_err().is_misconfigured());
    }
}
