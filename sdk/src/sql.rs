//! Statements on the PostgreSQL database the handler is granted (`sql = "<store>"` in its
//! runtime.toml table), in the message's own transaction (docs/handlers/sql.md).
//!
//! The first statement of a call opens a transaction; the others run in it. It commits only
//! when the message is done, together with its idempotency key, its kv writes and its outbox
//! rows; a retry, a rejection, a trap, a timeout or a crash rolls it back. So a handler writes
//! its tables as if each message ran exactly once:
//!
//! ```no_run
//! use lockgate_sdk::{Error, Message, sql};
//!
//! fn deposit(msg: Message) -> Result<(), Error> {
//!     let d: serde_json::Value = msg.json()?;
//!     let account = d["account"].as_str().unwrap_or_default();
//!     let amount = d["amount"].as_i64().unwrap_or_default();
//!     sql::execute(
//!         "INSERT INTO account_balances (account, balance) VALUES ($1, $2)
//!          ON CONFLICT (account) DO UPDATE SET balance = account_balances.balance + $2",
//!         &[account.into(), amount.into()],
//!     )?;
//!     Ok(())
//! }
//! ```
//!
//! Transaction and session control (`BEGIN`, `COMMIT`, `SET`, ...) is refused: the host owns
//! the transaction. A statement that fails aborts it: later statements fail with
//! [`SqlError::Aborted`], and the message cannot succeed (a serialization failure or a deadlock
//! runs it again by itself). The `?` operator maps each error to a retry or a rejection (see
//! [`SqlError`]).
//!
//! In native tests ([`crate::testing::TestHost`]) there is no database: every statement fails
//! with [`SqlError::Unavailable`]. Test SQL handlers against a real database with
//! `lockgate test` or a route.

use std::fmt;

/// A parameter or a column value. Dates and times are numbers: [`Value::Date`] is days since
/// 1970-01-01, [`Value::Time`] microseconds since midnight, [`Value::Timestamp`] and
/// [`Value::Timestamptz`] microseconds since 1970-01-01T00:00:00 (UTC for the latter).
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Value {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// A json or jsonb document, as text.
    Json(String),
    /// A UUID in its hyphenated text.
    Uuid(String),
    /// A numeric in its decimal text (`"12.50"`).
    Numeric(String),
    Date(i32),
    Time(i64),
    Timestamp(i64),
    Timestamptz(i64),
    BoolArray(Vec<Option<bool>>),
    I16Array(Vec<Option<i16>>),
    I32Array(Vec<Option<i32>>),
    I64Array(Vec<Option<i64>>),
    F32Array(Vec<Option<f32>>),
    F64Array(Vec<Option<f64>>),
    TextArray(Vec<Option<String>>),
    BytesArray(Vec<Option<Vec<u8>>>),
    UuidArray(Vec<Option<String>>),
    NumericArray(Vec<Option<String>>),
    JsonArray(Vec<Option<String>>),
    DateArray(Vec<Option<i32>>),
    TimestamptzArray(Vec<Option<i64>>),
}

macro_rules! from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x.into())
            }
        }
    )*};
}

from! {
    bool => Bool, i16 => I16, i32 => I32, i64 => I64, f32 => F32, f64 => F64,
    String => Text, &str => Text, Vec<u8> => Bytes, &[u8] => Bytes,
    Vec<Option<i64>> => I64Array, Vec<Option<String>> => TextArray,
}

impl From<u32> for Value {
    fn from(x: u32) -> Self {
        Value::I64(i64::from(x))
    }
}

impl From<serde_json::Value> for Value {
    fn from(x: serde_json::Value) -> Self {
        Value::Json(x.to_string())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(x: Option<T>) -> Self {
        x.map_or(Value::Null, Into::into)
    }
}

/// What the server said about a statement it refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbError {
    /// The SQLSTATE: `23505` a unique violation, `40001` a serialization failure, ...
    pub code: String,
    /// The server's message.
    pub message: String,
    /// Its detail, if any.
    pub detail: Option<String>,
    /// The violated constraint, if any.
    pub constraint: Option<String>,
}

/// Why a statement failed, or a column could not be read as the asked type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SqlError {
    /// The server refused the statement; the transaction is aborted. `?` retries the message
    /// for a transient class (40 transaction rollback, 08 connection, 53 resources, 57
    /// operator intervention) and rejects it otherwise.
    Failed(DbError),
    /// The database cannot be reached or did not answer; `?` retries the message.
    Unavailable(String),
    /// The host refused the statement (transaction control, several statements, no grant);
    /// `?` rejects the message.
    Refused(String),
    /// The result is over `sql_max_rows` or `sql_max_result_bytes`; `?` rejects the message.
    TooLarge(String),
    /// An earlier statement of the call failed; `?` rejects the message.
    Aborted(String),
    /// A parameter cannot be converted to the type the statement needs; `?` rejects.
    BadParameter(String),
    /// A column is NULL or not of the type [`Row::get`] was asked for; `?` rejects.
    Column(String),
}

impl SqlError {
    /// The SQLSTATE, when the server refused the statement.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Failed(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether the statement broke a unique constraint (SQLSTATE 23505).
    pub fn is_unique_violation(&self) -> bool {
        self.code() == Some("23505")
    }

    fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Failed(e) => ["40", "08", "53", "57"]
                .iter()
                .any(|class| e.code.starts_with(class)),
            _ => false,
        }
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(e) => {
                write!(f, "SQL statement failed ({}): {}", e.code, e.message)?;
                if let Some(d) = &e.detail {
                    write!(f, " ({d})")?;
                }
                Ok(())
            }
            Self::Unavailable(s) => write!(f, "database unavailable: {s}"),
            Self::Refused(s) => write!(f, "SQL statement refused: {s}"),
            Self::TooLarge(s) => write!(f, "SQL result too large: {s}"),
            Self::Aborted(s) => write!(f, "SQL transaction aborted: {s}"),
            Self::BadParameter(s) => write!(f, "bad SQL parameter: {s}"),
            Self::Column(s) => write!(f, "SQL column: {s}"),
        }
    }
}

impl std::error::Error for SqlError {}

impl From<SqlError> for crate::Error {
    fn from(err: SqlError) -> Self {
        if err.is_transient() {
            crate::Error::retry(err.to_string())
        } else {
            crate::Error::reject(err.to_string())
        }
    }
}

/// The rows of a query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// The rows, each with one value per column.
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    /// The rows, each readable by column name.
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    /// The first row, if any.
    pub fn first(&self) -> Option<Row<'_>> {
        self.iter().next()
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// One row of [`Rows`].
#[derive(Clone, Copy, Debug)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl<'a> Row<'a> {
    /// The value of `column`.
    pub fn value(&self, column: &str) -> Option<&'a Value> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.values.get(i)
    }

    /// The value of `column` as a `T` (`Option<T>` for a nullable column).
    ///
    /// # Errors
    /// [`SqlError::Column`] when the column is missing, NULL (for a non-`Option` `T`) or of
    /// another type.
    pub fn get<T: FromValue>(&self, column: &str) -> Result<T, SqlError> {
        let v = self
            .value(column)
            .ok_or_else(|| SqlError::Column(format!("no column \"{column}\"")))?;
        T::from_value(v)
            .ok_or_else(|| SqlError::Column(format!("\"{column}\" is {v:?}, not the type asked")))
    }
}

/// A Rust type a column can be read as.
pub trait FromValue: Sized {
    /// `None` when `v` is not of this type.
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::I16(x) => Some(i64::from(*x)),
            Value::I32(x) => Some(i64::from(*x)),
            Value::I64(x) => Some(*x),
            _ => None,
        }
    }
}

impl FromValue for i32 {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|x| i32::try_from(x).ok())
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::F32(x) => Some(f64::from(*x)),
            Value::F64(x) => Some(*x),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) | Value::Json(s) | Value::Uuid(s) | Value::Numeric(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Bytes(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl FromValue for Value {
    fn from_value(v: &Value) -> Option<Self> {
        Some(v.clone())
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// Runs a statement that returns rows (`SELECT`, `... RETURNING`) in the message's
/// transaction. Parameters are `$1`, `$2`, ... in order.
///
/// # Errors
/// See [`SqlError`].
pub fn query(statement: &str, params: &[Value]) -> Result<Rows, SqlError> {
    crate::host::sql_query(statement, params)
}

/// Runs a statement in the message's transaction and returns the number of rows it affected.
///
/// # Errors
/// See [`SqlError`].
pub fn execute(statement: &str, params: &[Value]) -> Result<u64, SqlError> {
    crate::host::sql_execute(statement, params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_retry_or_reject_by_their_class() {
        let failed = |code: &str| {
            SqlError::Failed(DbError {
                code: code.into(),
                message: "m".into(),
                detail: None,
                constraint: None,
            })
        };
        for (err, retry) in [
            (failed("40001"), true),
            (failed("40P01"), true),
            (failed("08006"), true),
            (failed("23505"), false),
            (failed("42601"), false),
            (SqlError::Unavailable("down".into()), true),
            (SqlError::Refused("BEGIN".into()), false),
            (SqlError::Aborted("earlier".into()), false),
        ] {
            let e: crate::Error = err.clone().into();
            assert_eq!(e.kind() == crate::ErrorKind::Retry, retry, "{err}");
        }
        assert!(failed("23505").is_unique_violation());
    }

    #[test]
    fn rows_read_by_column_name_and_type() {
        let rows = Rows {
            columns: vec!["id".into(), "balance".into(), "note".into()],
            rows: vec![vec![Value::Text("a".into()), Value::I64(7), Value::Null]],
        };
        let row = rows.first().expect("row");
        assert_eq!(row.get::<String>("id"), Ok("a".into()));
        assert_eq!(row.get::<i64>("balance"), Ok(7));
        assert_eq!(row.get::<Option<String>>("note"), Ok(None));
        assert!(row.get::<String>("note").is_err());
        assert!(row.get::<i64>("missing").is_err());
    }
}
