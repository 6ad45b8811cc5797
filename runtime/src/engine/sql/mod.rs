//! The host side of the `sql` interface (docs/handlers/sql.md): a handler's statements run on
//! the PostgreSQL store its grant names, in one transaction per call that the pipeline commits
//! with the message's idempotency key (`state::postgres::SqlTxn`).
//!
//! Here: the grant, the guard against transaction and session control (`guard.rs`), values to
//! and from PostgreSQL (`codec.rs`), the result limits, and the deadline: a statement that is
//! still running when the call's time is up is cancelled and the call ends as `timed_out`.

mod codec;
mod guard;

use std::time::Instant;

use tokio_postgres::types::ToSql;

use super::bindings::sql::{self, Column, DbError, RowSet, SqlError, Value};
use super::host::HostState;
use crate::deadline::DeadlineExceeded;
use crate::state::{PostgresStore, SqlStatementError};

/// A handler's `sql` grant: the store its statements run on, the role they run as, and the
/// limits on what a query returns.
#[derive(Clone, Debug)]
pub struct SqlGrant {
    /// The `[stores.<name>]` the grant names.
    pub store_name: String,
    /// That store.
    pub store: PostgresStore,
    /// `sql_role`: statements run under it (`SET LOCAL ROLE`).
    pub role: Option<String>,
    /// `sql_max_rows`.
    pub max_rows: u64,
    /// `sql_max_result_bytes`.
    pub max_result_bytes: u64,
}

/// What a statement gives back.
enum Answer {
    Rows(RowSet),
    Affected(u64),
}

fn db_error(e: SqlStatementError) -> Result<SqlError, DeadlineExceeded> {
    match e {
        SqlStatementError::Db(db) => Ok(SqlError::Failed(DbError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            constraint: db.constraint().map(str::to_owned),
        })),
        SqlStatementError::Unavailable(s) => Ok(SqlError::Unavailable(s)),
        SqlStatementError::DeadlineExceeded => Err(DeadlineExceeded),
    }
}

impl HostState {
    /// Runs one statement of the call: `Err` is a trap (the call's deadline passed).
    fn statement(
        &mut self,
        statement: &str,
        params: &[Value],
        rows: bool,
    ) -> Result<Result<Answer, SqlError>, DeadlineExceeded> {
        let Some(grant) = self.env.sql.clone() else {
            return Ok(Err(SqlError::Refused(format!(
                "handler \"{}\" has no sql grant: add sql = \"<store>\" to [handlers.{}] in runtime.toml",
                self.env.name, self.env.name
            ))));
        };
        if let Some(reason) = guard::refused(statement) {
            return Ok(Err(SqlError::Refused(reason)));
        }
        let deadline = self.call.deadline();
        let Some(remaining) = deadline.remaining(Instant::now()) else {
            return Err(DeadlineExceeded);
        };
        if self.call.sql.is_none() {
            let begun = deadline.scope(|| grant.store.begin_sql(grant.role.as_deref(), remaining));
            match begun {
                Ok(txn) => self.call.sql = Some(txn),
                Err(crate::state::StateError::DeadlineExceeded) => return Err(DeadlineExceeded),
                Err(e) => return Ok(Err(SqlError::Unavailable(e.to_string()))),
            }
        }
        let Some(txn) = self.call.sql.as_mut() else {
            return Ok(Err(SqlError::Unavailable("no transaction".into())));
        };
        if let Some(failed) = txn.failed() {
            return Ok(Err(SqlError::Aborted(format!(
                "an earlier statement of this call failed ({}); its transaction can only roll back",
                failed.reason
            ))));
        }
        let prepared = match deadline.scope(|| txn.prepare(statement)) {
            Ok(p) => p,
            Err(e) => return db_error(e).map(Err),
        };
        let wanted = prepared.params();
        if wanted.len() != params.len() {
            return Ok(Err(SqlError::BadParameter(format!(
                "the statement takes {} parameter(s), {} given",
                wanted.len(),
                params.len()
            ))));
        }
        // Every parameter converted before anything is sent, so a bad one is named.
        let mut scratch = bytes::BytesMut::new();
        for (i, (value, ty)) in params.iter().zip(wanted).enumerate() {
            scratch.clear();
            if let Err(reason) = codec::encode(value, ty, &mut scratch) {
                return Ok(Err(SqlError::BadParameter(format!("${}: {reason}", i + 1))));
            }
        }
        let encoded: Vec<codec::Param<'_>> = params.iter().map(codec::Param).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            encoded.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        if !rows {
            return match deadline.scope(|| txn.execute(&prepared, &refs)) {
                Ok(n) => Ok(Ok(Answer::Affected(n))),
                Err(e) => db_error(e).map(Err),
            };
        }
        let columns: Vec<Column> = prepared
            .columns()
            .iter()
            .map(|c| Column {
                name: c.name().to_owned(),
                type_name: c.type_().name().to_owned(),
            })
            .collect();
        let types: Vec<_> = prepared
            .columns()
            .iter()
            .map(|c| c.type_().clone())
            .collect();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut stop: Option<SqlError> = None;
        let ran = deadline.scope(|| {
            txn.query(&prepared, &refs, |row| {
                if out.len() as u64 >= grant.max_rows {
                    stop = Some(SqlError::TooLarge(format!(
                        "the query returned more than sql_max_rows = {} rows",
                        grant.max_rows
                    )));
                    return false;
                }
                let mut values = Vec::with_capacity(types.len());
                for (i, ty) in types.iter().enumerate() {
                    let raw = match row.try_get::<_, codec::Raw<'_>>(i) {
                        Ok(r) => r.0,
                        Err(e) => {
                            stop = Some(SqlError::Unavailable(e.to_string()));
                            return false;
                        }
                    };
                    bytes += raw.map_or(0, |r| r.len() as u64);
                    if bytes > grant.max_result_bytes {
                        stop = Some(SqlError::TooLarge(format!(
                            "the query returned more than sql_max_result_bytes = {} bytes",
                            grant.max_result_bytes
                        )));
                        return false;
                    }
                    match codec::decode(ty, raw, &columns[i].name) {
                        Ok(v) => values.push(v),
                        Err(reason) => {
                            stop = Some(SqlError::Refused(reason));
                            return false;
                        }
                    }
                }
                out.push(values);
                true
            })
        });
        if let Err(e) = ran {
            return db_error(e).map(Err);
        }
        if let Some(e) = stop {
            return Ok(Err(e));
        }
        Ok(Ok(Answer::Rows(RowSet { columns, rows: out })))
    }
}

impl sql::Host for HostState {
    fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, SqlError>> {
        Ok(match self.statement(&statement, &params, true)? {
            Ok(Answer::Rows(r)) => Ok(r),
            Ok(Answer::Affected(_)) => Ok(RowSet {
                columns: Vec::new(),
                rows: Vec::new(),
            }),
            Err(e) => Err(e),
        })
    }

    fn execute(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, SqlError>> {
        Ok(match self.statement(&statement, &params, false)? {
            Ok(Answer::Affected(n)) => Ok(n),
            Ok(Answer::Rows(r)) => Ok(r.rows.len() as u64),
            Err(e) => Err(e),
        })
    }
}
