//! A handler's transaction on the PostgreSQL store: the statements of its `sql` interface run
//! in it, and it commits together with the message's idempotency key, kv writes and outbox rows
//! (docs/handlers/sql.md).
//!
//! The transaction lives on a connection of the store's SQL pool to the message's commit or
//! rollback, from the claim of the message's key, which a route whose keys live in this store
//! takes inside it ([`PostgresStore::begin_claimed`]), or else from the call's first statement
//! ([`PostgresStore::begin_sql`]). Whatever drops it without committing rolls it back, so a
//! retry, reject, trap, timeout or a lost claim leaves nothing of the attempt behind (the claim
//! taken in it included); a crash closes the connection, which rolls it back on the server.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use super::{Applied, PostgresStore, millis, outbox_params};
use crate::deadline::Deadline;
use crate::message::OutRecord;
use crate::state::{Claim, ClaimRequest, Commit, KvWrite, StateError};

/// Why a handler's transaction can only roll back: a statement of it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlFailure {
    /// The SQLSTATE, when the server refused a statement.
    pub code: Option<String>,
    /// What happened.
    pub reason: String,
}

impl SqlFailure {
    /// A serialization failure or a deadlock: running the message again may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self.code.as_deref(), Some("40001" | "40P01"))
    }
}

/// How one statement failed.
#[derive(Debug, thiserror::Error)]
pub enum SqlStatementError {
    /// The server refused it; the transaction is aborted.
    #[error("{}", .0.message())]
    Db(Box<tokio_postgres::error::DbError>),
    /// The database could not be reached or the connection broke.
    #[error("{0}")]
    Unavailable(String),
    /// The call's deadline passed first; the statement was cancelled.
    #[error("the call's deadline passed while the statement ran")]
    DeadlineExceeded,
}

/// A handler's open transaction (see the module doc).
pub struct SqlTxn {
    store: PostgresStore,
    client: Option<deadpool_postgres::Object>,
    /// `BEGIN` and the transaction's settings, until they are sent: pipelined with the first
    /// statement that runs, or with the commit if none ran. `None` once the transaction is
    /// open on the server (a transaction begun with its claim is open from the start).
    begin: Option<String>,
    /// The handler's `sql_role`: its statements run as it, and the commit goes back to
    /// lockgate's own role before it writes lockgate's tables.
    role: Option<String>,
    /// The message's key was claimed inside this transaction ([`PostgresStore::begin_claimed`]):
    /// its row is written already and locked by it, so the commit has nothing to check or mark
    /// unless outputs are kept with it.
    claimed: bool,
    failed: Option<SqlFailure>,
}

/// What claiming a message's key inside a new handler's transaction came to.
#[derive(Debug)]
pub enum TxnClaim {
    /// The key is the transaction's: run the handler in it.
    Claimed(Box<SqlTxn>),
    /// Anything else, as the batched claim answers it (never [`Claim::Claimed`]); no
    /// transaction is left open.
    Settled(Claim),
}

impl std::fmt::Debug for SqlTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlTxn")
            .field("store", &self.store)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PostgresStore {
    /// Opens a handler's transaction: statements time out after `statement_timeout` (the call's
    /// remaining time) and, with `role`, run as that role. Gives up at `deadline`.
    ///
    /// This takes a connection; `BEGIN` and the settings go with the first statement, in the
    /// same round trip (a failed setting then fails that statement: the transaction has begun,
    /// so nothing runs outside it).
    pub async fn begin_sql(
        &self,
        role: Option<&str>,
        statement_timeout: Duration,
        deadline: Deadline,
    ) -> Result<SqlTxn, StateError> {
        let connect = async {
            // The commit writes lockgate's tables: they must exist.
            self.migrated().await?;
            self.inner
                .sql_pool
                .get()
                .await
                .map_err(|e| self.err("connect for a handler's transaction", e))
        };
        let client = deadline
            .bound(connect)
            .await
            .map_err(|_| StateError::DeadlineExceeded)??;
        let mut begin = format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            millis(statement_timeout)
        );
        if let Some(role) = role {
            begin.push_str(&format!("; SET LOCAL ROLE {}", quote_ident(role)));
        }
        Ok(SqlTxn {
            store: self.clone(),
            client: Some(client),
            begin: Some(begin),
            role: role.map(str::to_owned),
            claimed: false,
            failed: None,
        })
    }

    /// Opens a handler's transaction by claiming the message's key in it, in one round trip
    /// when it takes the key: `BEGIN`, then the claim (`claim_in_txn` in `mod.rs`), which
    /// writes the key as done by `claim.owner` for `ttl` when it may take it (when it may not,
    /// a second statement, `claim_held`, says why). Committing the transaction makes that
    /// true; any other end leaves no claim behind. Any other answer (the key is done,
    /// dead-lettered, applied with outputs to publish, or held elsewhere) leaves no
    /// transaction open; an applied key is taken over (committed) first, as the batched claim
    /// does. A holder that keeps the key's row locked past a lock timeout of 250 ms answers
    /// busy. The handler's statements then run as `role`, each for at most
    /// `statement_timeout` (the call's whole time: the call's deadline cancels a statement
    /// sooner when less is left).
    pub async fn begin_claimed(
        &self,
        scope: &str,
        claim: &ClaimRequest,
        lease: Duration,
        ttl: Duration,
        role: Option<&str>,
        statement_timeout: Duration,
    ) -> Result<TxnClaim, StateError> {
        let what = "claim an idempotency key in a handler's transaction";
        self.migrated().await?;
        let client = self
            .inner
            .sql_pool
            .get()
            .await
            .map_err(|e| self.err(what, e))?;
        let stmt = client
            .prepare_cached(&self.inner.sql.claim_in_txn)
            .await
            .map_err(|e| self.err(what, e))?;
        let (lease_ms, ttl_ms) = (millis(lease), millis(ttl));
        let timeout_ms = millis(statement_timeout).to_string();
        let params: [&(dyn ToSql + Sync); 8] = [
            &scope,
            &claim.key,
            &claim.owner,
            &claim.replay,
            &lease_ms,
            &ttl_ms,
            &timeout_ms,
            &role,
        ];
        let (began, row) = futures_util::join!(
            client.batch_execute("BEGIN"),
            client.query_opt(&stmt, &params)
        );
        let mut txn = SqlTxn {
            store: self.clone(),
            client: Some(client),
            begin: None,
            role: role.map(str::to_owned),
            claimed: true,
            failed: None,
        };
        if let Err(e) = began {
            // Whatever state the connection is in, it does not go back to the pool.
            if let Some(c) = txn.client.take() {
                drop(deadpool_postgres::Object::take(c));
            }
            // A claim that ran anyway ran outside a transaction: it committed the key as done
            // with none of the handler's effects. Taken back, or the message would be lost
            // (asking again, its owner would find it done).
            if row
                .as_ref()
                .is_ok_and(|r| r.as_ref().map(super::claim_answer) == Some(Claim::Claimed))
            {
                self.execute(
                    what,
                    &self.inner.sql.unclaim_done,
                    &[&scope, &claim.key, &claim.owner],
                )
                .await?;
            }
            return Err(self.err(what, e));
        }
        // Dropping `txn` from here on rolls it back.
        let row = match row {
            Ok(r) => r,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                return Ok(TxnClaim::Settled(Claim::Busy(Duration::from_millis(1))));
            }
            Err(e) => return Err(self.err(what, e)),
        };
        let Some(row) = row else {
            // Not ours to take: why, as committed now (the transaction rolls back).
            let client = txn.client()?;
            let held = client
                .prepare_cached(&self.inner.sql.claim_held)
                .await
                .map_err(|e| self.err(what, e))?;
            let row = client
                .query_opt(&held, &[&scope, &claim.key])
                .await
                .map_err(|e| self.err(what, e))?;
            return Ok(TxnClaim::Settled(match row {
                Some(r) => super::claim_answer(&r),
                None => Claim::Busy(Duration::from_millis(1)),
            }));
        };
        match super::claim_answer(&row) {
            Claim::Claimed => Ok(TxnClaim::Claimed(Box::new(txn))),
            applied @ Claim::Applied(_) => {
                let client = txn.client()?;
                client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|e| self.err(what, e))?;
                txn.client.take();
                Ok(TxnClaim::Settled(applied))
            }
            other => Ok(TxnClaim::Settled(other)),
        }
    }
}

impl SqlTxn {
    fn client(&self) -> Result<&deadpool_postgres::Object, StateError> {
        self.client
            .as_ref()
            .ok_or_else(|| StateError::Unavailable("the transaction has ended".into()))
    }

    /// Whether the handler's statements ran as its `sql_role`.
    fn as_role(&self) -> bool {
        self.role.is_some() && self.begin.is_none()
    }

    /// Why the transaction can only roll back, if a statement failed.
    pub fn failed(&self) -> Option<&SqlFailure> {
        self.failed.as_ref()
    }

    /// Prepares `statement` (cached per connection); its parameter types are the server's.
    pub async fn prepare(
        &mut self,
        statement: &str,
        deadline: Deadline,
    ) -> Result<Statement, SqlStatementError> {
        let result = match &self.client {
            None => Err(ended()),
            Some(client) => {
                bounded(deadline, async {
                    client
                        .prepare_cached(statement)
                        .await
                        .map_err(|e| statement_error(&e))
                })
                .await
            }
        };
        self.settle(result)
    }

    /// Runs a prepared statement and hands each row to `row` until it answers `false`.
    pub async fn query(
        &mut self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
        deadline: Deadline,
        mut row: impl FnMut(Row) -> bool + Send,
    ) -> Result<(), SqlStatementError> {
        use futures_util::TryStreamExt;
        let begin = self.begin.take();
        let Some(client) = &self.client else {
            return self.settle(Err(ended()));
        };
        let run = async {
            let rows = client.query_raw(statement, params.iter().copied()).await?;
            futures_util::pin_mut!(rows);
            while let Some(r) = rows.try_next().await? {
                if !row(r) {
                    // The rest of the rows are read and discarded by the connection.
                    break;
                }
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        let run = async { run.await.map_err(|e| statement_error(&e)) };
        let result = bounded(deadline, after(client, begin.as_deref(), run)).await;
        self.settle(result)
    }

    /// Runs a prepared statement and answers the number of rows it affected.
    pub async fn execute(
        &mut self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
        deadline: Deadline,
    ) -> Result<u64, SqlStatementError> {
        let begin = self.begin.take();
        let result = match &self.client {
            None => Err(ended()),
            Some(client) => {
                let run = async {
                    client
                        .execute(statement, params)
                        .await
                        .map_err(|e| statement_error(&e))
                };
                bounded(deadline, after(client, begin.as_deref(), run)).await
            }
        };
        self.settle(result)
    }

    /// Notes how a statement ended: a failure makes the transaction one that can only roll
    /// back; running out of time also cancels the statement on the server.
    fn settle<T>(&mut self, result: Result<T, SqlStatementError>) -> Result<T, SqlStatementError> {
        if let Err(e) = &result {
            let code = match e {
                SqlStatementError::Db(db) => Some(db.code().code().to_owned()),
                _ => None,
            };
            self.failed.get_or_insert(SqlFailure {
                code,
                reason: e.to_string(),
            });
            if matches!(e, SqlStatementError::DeadlineExceeded)
                && let Some(client) = &self.client
            {
                let cancel = client.cancel_token();
                self.store.inner.runtime.spawn(async move {
                    let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
                });
            }
        }
        result
    }

    /// Commits the transaction with the message's key: back to lockgate's own role, the kv
    /// writes and outbox rows, the key marked applied if this owner still holds its claim, then
    /// `COMMIT`. Anything else rolls it back, including a claim this owner already applied (the
    /// answer [`Commit::Committed`], with nothing committed twice).
    ///
    /// Without kv writes (none of them can conflict) it is one round trip: every statement and
    /// the `COMMIT` are pipelined, and a claim no longer held makes the marking statement fail,
    /// which aborts the transaction so that the `COMMIT` rolls back. With kv writes it is
    /// [`PostgresStore::apply_commit`], a statement at a time.
    ///
    /// With `done_ttl` (the message has nothing left to publish: no outputs, or outbox rows that
    /// commit here) and no kv writes, the key is recorded as done for that long instead of
    /// applied ([`Commit::Done`]): the batch then has no key of it to record, which saves a
    /// commit per message.
    ///
    /// An error means the outcome is unknown (the connection broke around `COMMIT`): the caller
    /// claims the key again, which finds it applied (or done) if it was.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit(
        self,
        scope: &str,
        claim: &ClaimRequest,
        writes: &[KvWrite],
        outputs: &[u8],
        rows: &[OutRecord],
        lease: Duration,
        done_ttl: Option<Duration>,
    ) -> Result<Commit, StateError> {
        if writes.is_empty() {
            self.commit_pipelined(scope, claim, outputs, rows, lease, done_ttl)
                .await
        } else {
            self.commit_checked(scope, claim, writes, outputs, rows, lease)
                .await
        }
    }

    async fn commit_pipelined(
        mut self,
        scope: &str,
        claim: &ClaimRequest,
        outputs: &[u8],
        rows: &[OutRecord],
        lease: Duration,
        done_ttl: Option<Duration>,
    ) -> Result<Commit, StateError> {
        let what = "commit a handler's transaction";
        let store = self.store.clone();
        let sql = &store.inner.sql;
        let e = |e| store.err(what, e);
        let client = self.client()?;
        // A key claimed in this transaction is written as done already; with outputs to keep
        // it is marked applied, as the row is ours. Otherwise the mark checks the claim.
        let mark = match (self.claimed, done_ttl) {
            (true, Some(_)) => None,
            (true, None) => Some(&sql.mark_applied),
            (false, Some(_)) => Some(&sql.mark_done_if_held),
            (false, None) => Some(&sql.mark_applied_if_held),
        };
        // Prepared once per connection; after that no round trip.
        let mark = match mark {
            Some(m) => Some(client.prepare_cached(m).await.map_err(e)?),
            None => None,
        };
        let insert = match rows.is_empty() {
            true => None,
            false => Some(client.prepare_cached(&sql.insert_outbox).await.map_err(e)?),
        };
        let params: Vec<_> = rows.iter().map(|r| (r, outbox_params(r))).collect();
        let row_params: Vec<[&(dyn ToSql + Sync); 6]> = params
            .iter()
            .map(|(r, (names, values, id))| {
                [
                    &r.topic as &(dyn ToSql + Sync),
                    &r.key,
                    names,
                    values,
                    &r.payload,
                    id,
                ]
            })
            .collect();
        let lease_ms = millis(lease);
        let done_ms = done_ttl.map(millis);
        let applied_params: [&(dyn ToSql + Sync); 5] =
            [&scope, &claim.key, &outputs, &lease_ms, &claim.owner];
        let done_params: [&(dyn ToSql + Sync); 4] = [&scope, &claim.key, &done_ms, &claim.owner];
        let mark_params: &[&(dyn ToSql + Sync)] = match (self.claimed, done_ttl) {
            (true, _) => &applied_params[..4],
            (false, Some(_)) => &done_params,
            (false, None) => &applied_params,
        };
        // What goes before the mark: nothing ran yet, so only the BEGIN (the handler's
        // settings are moot); or back to lockgate's role; or nothing at all. The marks that
        // check the claim lift the statement timeout themselves. In a transaction begun with
        // the claim either `COMMIT` follows alone, or lockgate's own writes, which go back to
        // its role and lift the statement timeout first.
        let tail = mark.is_some() || !rows.is_empty();
        let reset = match (&self.begin, self.claimed) {
            (Some(_), _) => Some("BEGIN"),
            (None, false) => self.as_role().then_some("RESET ROLE"),
            (None, true) => tail.then_some("RESET ROLE; SET LOCAL statement_timeout = 0"),
        };
        // Each request is sent when its future is first polled, and join! polls them in this
        // order: one round trip, in order.
        let reset = async {
            match reset {
                Some(reset) => client.batch_execute(reset).await,
                None => Ok(()),
            }
        };
        let marked = async {
            match &mark {
                Some(mark) => client.query(mark, mark_params).await.map(drop),
                None => Ok(()),
            }
        };
        let inserts = futures_util::future::join_all(
            row_params
                .iter()
                .filter_map(|p| Some(client.execute(insert.as_ref()?, p))),
        );
        let commit = client.batch_execute("COMMIT");
        let (reset, marked, inserts, commit) = futures_util::join!(reset, marked, inserts, commit);
        if let Err(err) = commit {
            // The connection may be in any state: it never goes back to the pool.
            if let Some(c) = self.client.take() {
                drop(deadpool_postgres::Object::take(c));
            }
            return Err(store.err(what, err));
        }
        // The transaction has ended, committed or (a statement failed) rolled back: the
        // connection goes back to the pool as it is.
        drop(self.client.take());
        let failed = reset
            .err()
            .or_else(|| marked.err())
            .or_else(|| inserts.into_iter().find_map(Result::err));
        let Some(failed) = failed else {
            return Ok(match done_ttl {
                Some(_) => Commit::Done,
                None => Commit::Committed,
            });
        };
        let code = failed.as_db_error().map(|d| d.code().code());
        if self.claimed || code != Some("22012") {
            return Err(store.err(what, failed));
        }
        // Not held: applied by this owner before (its answer was lost), or lost to another.
        let row = store
            .inner
            .pool
            .get()
            .await
            .map_err(|e| store.err(what, e))?
            .query_opt(&sql.claim_state, &[&scope, &claim.key])
            .await
            .map_err(e)?;
        Ok(
            match row
                .as_ref()
                .map(|r| (r.get::<_, &str>(0), r.get::<_, Option<&str>>(1)))
            {
                Some(("a", Some(owner))) if owner == claim.owner => Commit::Committed,
                Some(("d", Some(owner))) if owner == claim.owner => Commit::Done,
                _ => Commit::LostClaim,
            },
        )
    }

    /// The commit with kv writes, a statement at a time (see [`Self::commit`]).
    #[allow(clippy::too_many_arguments)]
    async fn commit_checked(
        mut self,
        scope: &str,
        claim: &ClaimRequest,
        writes: &[KvWrite],
        outputs: &[u8],
        rows: &[OutRecord],
        lease: Duration,
    ) -> Result<Commit, StateError> {
        let what = "commit a handler's transaction";
        let store = self.store.clone();
        let client = self.client()?;
        client
            .batch_execute(&begun(
                self.begin.as_deref(),
                "RESET ROLE; SET LOCAL statement_timeout = 0",
            ))
            .await
            .map_err(|e| store.err(what, e))?;
        let applied = store
            .apply_commit(
                client,
                scope,
                claim,
                writes,
                outputs,
                rows,
                lease,
                self.claimed,
            )
            .await?;
        if applied != Applied::Now {
            // Dropping `self` rolls the handler's statements back: an earlier commit of this
            // claim already landed them (Before), or nothing may land (Not).
            return Ok(applied.into());
        }
        match client.batch_execute("COMMIT").await {
            Ok(()) => {
                // Committed: nothing left to roll back.
                self.client.take();
                Ok(Commit::Committed)
            }
            Err(e) => {
                // The connection may be in any state: it never goes back to the pool.
                if let Some(c) = self.client.take() {
                    drop(deadpool_postgres::Object::take(c));
                }
                Err(store.err(what, e))
            }
        }
    }
}

impl SqlTxn {
    /// Commits the handler's statements alone, with no message key and nothing of lockgate's
    /// (`lockgate test --database --commit`, on a store from
    /// [`PostgresStore::for_handler_sql_only`]). A transaction whose statement failed rolls
    /// back instead and says why.
    pub fn commit_alone(mut self) -> Result<(), StateError> {
        if let Some(failed) = &self.failed {
            return Err(StateError::Unavailable(format!(
                "not committed: a statement failed ({})",
                failed.reason
            )));
        }
        let store = self.store.clone();
        let what = "commit a handler's transaction";
        let client = self.client()?;
        let commit = begun(self.begin.as_deref(), "COMMIT");
        let result = store.block(async {
            client
                .batch_execute(&commit)
                .await
                .map_err(|e| store.err(what, e))
        });
        match result {
            Ok(()) => {
                self.client.take();
                Ok(())
            }
            Err(e) => {
                if let Some(c) = self.client.take() {
                    drop(deadpool_postgres::Object::take(c));
                }
                Err(e)
            }
        }
    }
}

impl Drop for SqlTxn {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if self.begin.is_some() {
            // Nothing was sent: no transaction to roll back, the connection goes back as it is.
            return;
        }
        // Rolled back before the connection returns to the pool; a connection that cannot roll
        // back is closed instead (the server then rolls back).
        self.store.inner.runtime.spawn(async move {
            if client.batch_execute("ROLLBACK").await.is_err() {
                drop(deadpool_postgres::Object::take(client));
            }
        });
    }
}

/// Runs `statement` on `client`, after `begin` when the transaction's `BEGIN` has not been
/// sent yet: both go in one round trip (tokio-postgres sends each request when its future is
/// first polled, and `join!` polls them in order), and a failed `BEGIN` fails the statement.
async fn after<T>(
    client: &deadpool_postgres::Object,
    begin: Option<&str>,
    statement: impl Future<Output = Result<T, SqlStatementError>>,
) -> Result<T, SqlStatementError> {
    let Some(begin) = begin else {
        return statement.await;
    };
    let (began, result) = futures_util::join!(client.batch_execute(begin), statement);
    began.map_err(|e| statement_error(&e))?;
    result
}

/// `statements`, after `begin` when that has not been sent yet.
fn begun(begin: Option<&str>, statements: &str) -> String {
    match begin {
        Some(begin) => format!("{begin}; {statements}"),
        None => statements.to_owned(),
    }
}

/// `statement` until `deadline`: past it, [`SqlStatementError::DeadlineExceeded`].
async fn bounded<T>(
    deadline: Deadline,
    statement: impl Future<Output = Result<T, SqlStatementError>>,
) -> Result<T, SqlStatementError> {
    deadline
        .bound(statement)
        .await
        .unwrap_or(Err(SqlStatementError::DeadlineExceeded))
}

fn ended() -> SqlStatementError {
    SqlStatementError::Unavailable("the transaction has ended".into())
}

fn statement_error(e: &tokio_postgres::Error) -> SqlStatementError {
    match e.as_db_error() {
        Some(db) => SqlStatementError::Db(Box::new(db.clone())),
        None => SqlStatementError::Unavailable(e.to_string()),
    }
}
