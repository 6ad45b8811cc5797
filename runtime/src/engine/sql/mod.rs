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
use tracing::Instrument;

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
    async fn statement(
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
            let begun = grant
                .store
                .begin_sql(grant.role.as_deref(), remaining, deadline)
                .await;
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
        let prepared = match txn.prepare(statement, deadline).await {
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
            return match txn.execute(&prepared, &refs, deadline).await {
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
        let ran = txn
            .query(&prepared, &refs, deadline, |row| {
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
            .await;
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
    async fn query(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, SqlError>> {
        let span = statement_span(&statement);
        let answer = self
            .statement(&statement, &params, true)
            .instrument(span.clone())
            .await;
        record(&span, &answer);
        Ok(match answer? {
            Ok(Answer::Rows(r)) => Ok(r),
            Ok(Answer::Affected(_)) => Ok(RowSet {
                columns: Vec::new(),
                rows: Vec::new(),
            }),
            Err(e) => Err(e),
        })
    }

    async fn execute(
        &mut self,
        statement: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, SqlError>> {
        let span = statement_span(&statement);
        let answer = self
            .statement(&statement, &params, false)
            .instrument(span.clone())
            .await;
        record(&span, &answer);
        Ok(match answer? {
            Ok(Answer::Affected(n)) => Ok(n),
            Ok(Answer::Rows(r)) => Ok(r.rows.len() as u64),
            Err(e) => Err(e),
        })
    }
}

/// The longest statement text a span carries.
const MAX_SPAN_TEXT: usize = 1024;

/// A span per statement, inside the handler call's (an OTLP client span, `telemetry/otlp.rs`):
/// the operation and the text without its literals, which may hold personal data
/// ([`sanitized`]).
fn statement_span(statement: &str) -> tracing::Span {
    let span = tracing::debug_span!(
        "sql_statement",
        operation = tracing::field::Empty,
        statement = tracing::field::Empty,
        outcome = tracing::field::Empty,
        code = tracing::field::Empty,
        rows = tracing::field::Empty,
    );
    // Nothing to compute when no layer wants the span (no OTLP export, no debug logs).
    if !span.is_disabled() {
        let text = sanitized(statement);
        let operation = text
            .split(|c: char| !c.is_ascii_alphabetic())
            .find(|w| !w.is_empty())
            .unwrap_or_default()
            .to_ascii_uppercase();
        span.record("operation", operation.as_str());
        span.record("statement", text.as_str());
    }
    span
}

/// Records how a statement ended on its span: `ok` with the rows, or the error's kind and
/// SQLSTATE.
fn record(span: &tracing::Span, answer: &Result<Result<Answer, SqlError>, DeadlineExceeded>) {
    if span.is_disabled() {
        return;
    }
    match answer {
        Err(DeadlineExceeded) => {
            span.record("outcome", "timed_out");
        }
        Ok(Ok(a)) => {
            span.record("outcome", "ok");
            let rows = match a {
                Answer::Rows(r) => r.rows.len() as u64,
                Answer::Affected(n) => *n,
            };
            span.record("rows", rows);
        }
        Ok(Err(e)) => {
            let kind = match e {
                SqlError::Failed(db) => {
                    span.record("code", db.code.as_str());
                    "failed"
                }
                SqlError::Refused(_) => "refused",
                SqlError::BadParameter(_) => "bad_parameter",
                SqlError::TooLarge(_) => "too_large",
                SqlError::Aborted(_) => "aborted",
                SqlError::Unavailable(_) => "unavailable",
            };
            span.record("outcome", kind);
        }
    }
}

/// `statement` with every literal (strings, dollar-quoted strings, numbers) replaced by `?`,
/// comments dropped and whitespace collapsed, at most [`MAX_SPAN_TEXT`] bytes: what a trace
/// may carry of it (`$1` parameters stay: their values are never in the text).
fn sanitized(statement: &str) -> String {
    let b = statement.as_bytes();
    let mut out = String::with_capacity(statement.len().min(MAX_SPAN_TEXT));
    let mut i = 0;
    let push_space = |out: &mut String| {
        if !out.is_empty() && !out.ends_with(' ') {
            out.push(' ');
        }
    };
    while i < b.len() && out.len() < MAX_SPAN_TEXT {
        let c = b[i];
        let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                push_space(&mut out);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += guard::block_comment_len(&b[i..]);
                push_space(&mut out);
            }
            b'\'' => {
                // E'...' strings take backslash escapes; '' is a quote inside any string.
                let escapes = out.ends_with('E') || out.ends_with('e');
                if escapes {
                    out.pop();
                }
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                    } else if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                        } else {
                            i += 1;
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push('?');
            }
            b'$' if !prev_ident && b.get(i + 1).is_some_and(|c| !c.is_ascii_digit()) => {
                // A dollar-quoted string: $tag$ ... $tag$.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| *c == b'$')
                    .map(|p| i + 1 + p)
                    .filter(|&e| {
                        b[i + 1..e]
                            .iter()
                            .all(|c| c.is_ascii_alphanumeric() || *c == b'_')
                    });
                match tag_end {
                    Some(e) => {
                        let tag = &statement[i..=e];
                        match statement[e + 1..].find(tag) {
                            Some(p) => i = e + 1 + p + tag.len(),
                            None => i = b.len(),
                        }
                        out.push('?');
                    }
                    None => {
                        out.push('$');
                        i += 1;
                    }
                }
            }
            b'$' => {
                // A parameter: `$` and its digits as they are.
                out.push('$');
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    out.push(char::from(b[i]));
                    i += 1;
                }
            }
            b'0'..=b'9' if !prev_ident => {
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'.'
                        || ((b[i] == b'+' || b[i] == b'-') && matches!(b[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                out.push('?');
            }
            c if c.is_ascii_whitespace() => {
                push_space(&mut out);
                i += 1;
            }
            _ => {
                // Copy the whole character (identifiers may be UTF-8).
                let len = statement[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&statement[i..i + len]);
                i += len;
            }
        }
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out
}

#[cfg(test)]
mod tests {
    use super::sanitized;

    #[test]
    fn literals_and_comments_leave_the_text_parameters_stay() {
        assert_eq!(
            sanitized(
                "INSERT INTO t AS b (account, balance, n) VALUES ($1, $2, 1)\n   ON CONFLICT (account) DO UPDATE SET n = b.n + 1 -- a note"
            ),
            "INSERT INTO t AS b (account, balance, n) VALUES ($1, $2, ?) ON CONFLICT (account) DO UPDATE SET n = b.n + ?"
        );
        assert_eq!(
            sanitized("SELECT 'it''s secret', E'a\\'b', x1, 3.5e-3 /* c /* nested */ */ FROM t2"),
            "SELECT ?, ?, x1, ? FROM t2"
        );
        assert_eq!(
            sanitized("SELECT $body$ card 4111 $body$, $$x$$ WHERE a = $10"),
            "SELECT ?, ? WHERE a = $10"
        );
        assert_eq!(sanitized("select 'unterminated"), "select ?");
        assert_eq!(sanitized("über_tabelle"), "über_tabelle");
        assert!(sanitized(&"x ".repeat(5000)).len() <= super::MAX_SPAN_TEXT + 4);
    }
}
