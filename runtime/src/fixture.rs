//! The JSON Lines formats of `lockgate test`.
//!
//! **Input**: one message per line. Every field is optional:
//! ```json
//! {"payload": "hello", "key": "k1", "headers": {"h": "v"}, "attempt": 1, "topic": "in"}
//! {"payload_base64": "AAEC"}
//! {"payload_json": {"kind": "order", "id": 7}}
//! ```
//! **Output** (`--json`): one result per message, in input order:
//! ```json
//! {"message": 1, "outcome": "ok", "published": [{"topic": "out", "payload": "HELLO"}], "logs": []}
//! ```
//! **Expectations** (`--expect`): one line per message in the output shape, compared as a
//! *subset*: only the fields written are checked, arrays must match element by element, and a
//! field `X_contains` checks that the actual `X` contains the given text (handy for trap reasons).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::engine::{InboundMessage, Invocation, Outcome, OutgoingMessage};

/// A problem in a fixture or expectation file, with its 1-based line.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct FixtureError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    id: Option<String>,
    topic: Option<String>,
    partition: Option<u32>,
    offset: Option<u64>,
    key: Option<String>,
    key_base64: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    payload: Option<String>,
    payload_base64: Option<String>,
    payload_json: Option<Value>,
    timestamp_ms: Option<u64>,
    attempt: Option<u32>,
    reply_to: Option<String>,
}

/// Parses a fixture file into messages. Blank lines and lines starting with `#` or `//` are
/// skipped; every bad line is reported, not just the first.
pub fn parse_inputs(text: &str) -> Result<Vec<(usize, InboundMessage)>, Vec<FixtureError>> {
    let mut messages = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        match parse_input_line(trimmed, messages.len() + 1) {
            Ok(m) => messages.push((line, m)),
            Err(message) => errors.push(FixtureError { line, message }),
        }
    }
    if errors.is_empty() {
        Ok(messages)
    } else {
        Err(errors)
    }
}

fn parse_input_line(text: &str, index: usize) -> Result<InboundMessage, String> {
    let l: InputLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let payloads = [
        l.payload.is_some(),
        l.payload_base64.is_some(),
        l.payload_json.is_some(),
    ];
    if payloads.iter().filter(|p| **p).count() > 1 {
        return Err("give at most one of `payload`, `payload_base64`, `payload_json`".into());
    }
    if l.key.is_some() && l.key_base64.is_some() {
        return Err("give at most one of `key`, `key_base64`".into());
    }
    let payload = if let Some(p) = l.payload {
        p.into_bytes()
    } else if let Some(b) = l.payload_base64 {
        B64.decode(b.as_bytes())
            .map_err(|e| format!("`payload_base64` is not valid base64: {e}"))?
    } else if let Some(j) = l.payload_json {
        serde_json::to_vec(&j).map_err(|e| e.to_string())?
    } else {
        Vec::new()
    };
    let key = match (l.key, l.key_base64) {
        (Some(k), _) => Some(k.into_bytes()),
        (_, Some(b)) => Some(
            B64.decode(b.as_bytes())
                .map_err(|e| format!("`key_base64` is not valid base64: {e}"))?,
        ),
        _ => None,
    };
    if l.attempt == Some(0) {
        return Err("`attempt` starts at 1".into());
    }
    let topic = l.topic.unwrap_or_else(|| "test".to_owned());
    Ok(InboundMessage {
        id: l.id.unwrap_or_else(|| format!("{topic}/{index}")),
        topic,
        partition: l.partition,
        offset: l.offset,
        key,
        headers: l
            .headers
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
        payload,
        timestamp_ms: l.timestamp_ms,
        attempt: l.attempt.unwrap_or(1),
        reply_to: l.reply_to,
    })
}

/// Puts `bytes` into `obj` as `field` (UTF-8 text) or `field_base64`.
fn put_bytes(obj: &mut Map<String, Value>, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(field.to_owned(), Value::String(s.to_owned())),
        Err(_) => obj.insert(format!("{field}_base64"), Value::String(B64.encode(bytes))),
    };
}

fn output_json(o: &OutgoingMessage) -> Value {
    let mut obj = Map::new();
    obj.insert("topic".into(), Value::String(o.topic.clone()));
    if let Some(k) = &o.key {
        put_bytes(&mut obj, "key", k);
    }
    if !o.headers.is_empty() {
        let headers: Map<String, Value> = o
            .headers
            .iter()
            .map(|(k, v)| {
                let v = match std::str::from_utf8(v) {
                    Ok(s) => s.to_owned(),
                    Err(_) => format!("base64:{}", B64.encode(v)),
                };
                (k.clone(), Value::String(v))
            })
            .collect();
        obj.insert("headers".into(), Value::Object(headers));
    }
    put_bytes(&mut obj, "payload", &o.payload);
    Value::Object(obj)
}

/// The JSON result of message number `index` (1-based).
pub fn result_json(index: usize, inv: &Invocation) -> Value {
    let mut obj = Map::new();
    obj.insert("message".into(), json!(index));
    obj.insert("outcome".into(), json!(inv.outcome.kind()));
    if let Some(reason) = inv.outcome.reason() {
        obj.insert("reason".into(), json!(reason));
    }
    if let Outcome::Retry {
        after: Some(after), ..
    } = &inv.outcome
    {
        obj.insert(
            "retry_after_ms".into(),
            json!(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    let published = match &inv.outcome {
        Outcome::Ok { outputs } => outputs.iter().map(output_json).collect(),
        _ => Vec::new(),
    };
    obj.insert("published".into(), Value::Array(published));
    let logs: Vec<Value> = inv
        .logs
        .iter()
        .map(|l| json!({"level": l.level.as_str(), "source": l.source.as_str(), "message": l.message}))
        .collect();
    obj.insert("logs".into(), Value::Array(logs));
    if inv.dropped_logs > 0 {
        obj.insert("dropped_logs".into(), json!(inv.dropped_logs));
    }
    obj.insert(
        "elapsed_ms".into(),
        json!((inv.elapsed.as_secs_f64() * 1e6).round() / 1e3),
    );
    Value::Object(obj)
}

/// Parses an expectation file: one JSON object per non-blank, non-comment line.
pub fn parse_expectations(text: &str) -> Result<Vec<(usize, Value)>, Vec<FixtureError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        match serde_json::from_str::<Value>(trimmed) {
            Ok(v @ Value::Object(_)) => out.push((i + 1, v)),
            Ok(_) => errors.push(FixtureError {
                line: i + 1,
                message: "expected a JSON object".into(),
            }),
            Err(e) => errors.push(FixtureError {
                line: i + 1,
                message: e.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Compares `actual` against the subset pattern `expected`; returns one line per difference,
/// each naming the field path.
pub fn diff(expected: &Value, actual: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_at("", expected, actual, &mut out);
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn diff_at(path: &str, expected: &Value, actual: &Value, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, ev) in e {
                if let Some(base) = k.strip_suffix("_contains") {
                    let p = join(path, base);
                    match (ev.as_str(), a.get(base).and_then(Value::as_str)) {
                        (Some(needle), Some(hay)) if hay.contains(needle) => {}
                        (Some(needle), Some(hay)) => {
                            out.push(format!("{p}: expected to contain {needle:?}, got {hay:?}"))
                        }
                        (Some(_), None) => out.push(format!("{p}: missing")),
                        (None, _) => out.push(format!("{}: must be a string", join(path, k))),
                    }
                    continue;
                }
                let p = join(path, k);
                match a.get(k) {
                    Some(av) => diff_at(&p, ev, av, out),
                    None => out.push(format!("{p}: expected {ev}, but it is missing")),
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                out.push(format!(
                    "{path}: expected {} item(s), got {}: {}",
                    e.len(),
                    a.len(),
                    Value::Array(a.clone())
                ));
                return;
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                diff_at(&format!("{path}[{i}]"), ev, av, out);
            }
        }
        (e, a) if e == a => {}
        (e, a) => out.push(format!("{path}: expected {e}, got {a}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_all_payload_forms_and_reports_every_bad_line() {
        let msgs = parse_inputs(
            "{\"payload\": \"hi\", \"key\": \"k\", \"headers\": {\"a\": \"b\"}}\n\n# comment\n{\"payload_base64\": \"AAE=\", \"attempt\": 3}\n{\"payload_json\": {\"x\": 1}}\n",
        )
        .unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].0, 1);
        assert_eq!(msgs[0].1.payload, b"hi");
        assert_eq!(msgs[0].1.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(msgs[0].1.headers, vec![("a".to_owned(), b"b".to_vec())]);
        assert_eq!(msgs[0].1.id, "test/1");
        assert_eq!(msgs[1].1.payload, vec![0, 1]);
        assert_eq!(msgs[1].1.attempt, 3);
        assert_eq!(msgs[2].1.payload, br#"{"x":1}"#);

        let errs =
            parse_inputs("{\"paylod\": 1}\n{\"payload\": \"a\", \"payload_json\": 1}\nnot json\n")
                .unwrap_err();
        assert_eq!(errs.len(), 3);
        assert!(
            errs[0]
                .to_string()
                .starts_with("line 1: unknown field `paylod`"),
            "{}",
            errs[0]
        );
        assert!(errs[1].message.contains("at most one"));
        assert_eq!(errs[2].line, 3);
    }

    #[test]
    fn subset_diff_names_each_difference() {
        let actual = json!({"outcome": "ok", "reason": "boom at 0x1", "published": [{"topic": "o", "payload": "A"}], "logs": []});
        assert!(diff(&json!({"outcome": "ok"}), &actual).is_empty());
        assert!(diff(&json!({"reason_contains": "boom"}), &actual).is_empty());
        let d = diff(
            &json!({"outcome": "reject", "published": [{"payload": "B"}], "reason_contains": "zap"}),
            &actual,
        );
        assert_eq!(
            d,
            vec![
                "outcome: expected \"reject\", got \"ok\"",
                "published[0].payload: expected \"B\", got \"A\"",
                "reason: expected to contain \"zap\", got \"boom at 0x1\"",
            ]
        );
        let d = diff(&json!({"published": []}), &actual);
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("published: expected 0 item(s), got 1"));
    }

    #[test]
    fn result_json_renders_binary_as_base64() {
        let inv = Invocation {
            outcome: Outcome::Ok {
                outputs: vec![OutgoingMessage {
                    topic: "t".into(),
                    key: Some(vec![0xff]),
                    headers: vec![],
                    payload: b"ok".to_vec(),
                }],
            },
            logs: vec![],
            dropped_logs: 0,
            refused_outputs: 0,
            elapsed: Duration::from_micros(1500),
            kv_writes: None,
        };
        let v = result_json(2, &inv);
        assert_eq!(v["message"], 2);
        assert_eq!(v["published"][0]["key_base64"], "/w==");
        assert_eq!(v["published"][0]["payload"], "ok");
        assert_eq!(v["elapsed_ms"], 1.5);
    }
}
