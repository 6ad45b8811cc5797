//! Test instrument for the `sql` interface: each message is a JSON description of statements
//! and of how the call ends:
//!
//! ```json
//! {"statements": [{"sql": "UPDATE t SET n = n + $1 WHERE id = $2", "params": [1, "a"]},
//!                 {"sql": "SELECT n FROM t", "query": true}],
//!  "then": "ok"}
//! ```
//!
//! A parameter is a JSON number (an integer becomes int64, others float64), string, boolean or
//! null, or one of `{"numeric": "1.50"}`, `{"uuid": "..."}`, `{"json": ...}`,
//! `{"date": days}`, `{"timestamptz": micros}`, `{"int64_array": [...]}`,
//! `{"text_array": [...]}`. `then` is `ok` (publish the results to the configured `target`
//! topic and succeed), `retry`, `reject`, `trap` or `hang` (spin until the deadline);
//! `then_first` applies to the first attempt only, `then` to the others. Each result is
//! `{"affected": n}`, `{"columns": [...], "rows": [[...]]}` or `{"error": "<kind>: ...",
//! "code": "<SQLSTATE>"}`; a failed statement does not stop the ones after it. The results are
//! also logged at info (`results <json>`), so they can be read when the call does not succeed.

use lockgate_sdk::sql::{self, SqlError, Value};
use lockgate_sdk::{Error, Message, ResultExt, config, emit, log};
use serde_json::{Value as Json, json};

fn param(j: &Json) -> Value {
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => n
            .as_i64()
            .map_or_else(|| Value::F64(n.as_f64().unwrap_or_default()), Value::I64),
        Json::String(s) => Value::Text(s.clone()),
        Json::Object(o) => {
            let s = |v: &Json| v.as_str().unwrap_or_default().to_owned();
            if let Some(v) = o.get("numeric") {
                Value::Numeric(s(v))
            } else if let Some(v) = o.get("uuid") {
                Value::Uuid(s(v))
            } else if let Some(v) = o.get("json") {
                Value::Json(v.to_string())
            } else if let Some(v) = o.get("date") {
                Value::Date(v.as_i64().unwrap_or_default() as i32)
            } else if let Some(v) = o.get("timestamptz") {
                Value::Timestamptz(v.as_i64().unwrap_or_default())
            } else if let Some(v) = o.get("int64_array") {
                Value::I64Array(
                    v.as_array()
                        .map(|a| a.iter().map(Json::as_i64).collect())
                        .unwrap_or_default(),
                )
            } else if let Some(v) = o.get("text_array") {
                Value::TextArray(
                    v.as_array()
                        .map(|a| a.iter().map(|x| x.as_str().map(str::to_owned)).collect())
                        .unwrap_or_default(),
                )
            } else {
                Value::Json(j.to_string())
            }
        }
        Json::Array(_) => Value::Json(j.to_string()),
    }
}

fn render(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::I16(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Text(s) => json!(s),
        Value::Bytes(b) => json!({ "bytes": b }),
        Value::Json(s) => json!({ "json": serde_json::from_str::<Json>(s).unwrap_or(Json::Null) }),
        Value::Uuid(s) => json!({ "uuid": s }),
        Value::Numeric(s) => json!({ "numeric": s }),
        Value::Date(d) => json!({ "date": d }),
        Value::Time(t) => json!({ "time": t }),
        Value::Timestamp(t) => json!({ "timestamp": t }),
        Value::Timestamptz(t) => json!({ "timestamptz": t }),
        Value::I64Array(a) => json!({ "int64_array": a }),
        Value::TextArray(a) => json!({ "text_array": a }),
        other => json!({ "other": format!("{other:?}") }),
    }
}

fn describe(e: &SqlError) -> Json {
    let kind = match e {
        SqlError::Failed(_) => "failed",
        SqlError::Unavailable(_) => "unavailable",
        SqlError::Refused(_) => "refused",
        SqlError::TooLarge(_) => "too_large",
        SqlError::Aborted(_) => "aborted",
        SqlError::BadParameter(_) => "bad_parameter",
        SqlError::Column(_) => "column",
    };
    json!({ "error": format!("{kind}: {e}"), "code": e.code() })
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let target = config::get("target").unwrap_or_else(|| "sql-results".to_owned());
    let spec: Json = serde_json::from_slice(msg.payload()).or_reject("payload is not JSON")?;
    let mut results = Vec::new();
    for s in spec["statements"].as_array().into_iter().flatten() {
        let statement = s["sql"].as_str().unwrap_or_default();
        let params: Vec<Value> = s["params"]
            .as_array()
            .map(|a| a.iter().map(param).collect())
            .unwrap_or_default();
        let result = if s["query"] == json!(true) {
            sql::query(statement, &params).map(|rows| {
                json!({
                    "columns": rows.columns,
                    "rows": rows.rows.iter().map(|r| r.iter().map(render).collect::<Vec<_>>()).collect::<Vec<_>>(),
                })
            })
        } else {
            sql::execute(statement, &params).map(|n| json!({ "affected": n }))
        };
        results.push(result.unwrap_or_else(|e| describe(&e)));
    }
    let results = json!({ "id": msg.id(), "results": results }).to_string();
    log::info(format!("results {results}"));
    let then = match spec["then_first"].as_str() {
        Some(first) if msg.attempt() <= 1 => first,
        _ => spec["then"].as_str().unwrap_or("ok"),
    };
    match then {
        "retry" => return Err(Error::retry("asked to retry")),
        "reject" => return Err(Error::reject("asked to reject")),
        "trap" => panic!("asked to trap"),
        "hang" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        _ => {}
    }
    emit::Outgoing::new(target).payload(results).publish()?;
    Ok(())
}
