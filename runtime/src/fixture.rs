//! The JSON Lines formats of `lockgate test`.
//!
//! **Input**: one message per line. Every field is optional:
//! ```json
//! {"payload": "hello", "key": "k1", "headers": {"h": "v"}, "attempt": 1, "topic": "in"}
//! {"payload_base64": "AAEC"}
//! {"payload_json": {"kind": "order", "id": 7}}
//! {"payload_json": {"customer_id": "c-7"}, "http": [{"method": "GET", "url": "https://customers.example.com/customers/c-7", "status": 200, "headers": {"content-type": "application/json"}, "body": {"name": "Ada"}}]}
//! ```
//! `http` stubs the message's outbound requests: a request whose method (default `GET`) and URL
//! match gets that response (`status` default 200; a `body` that is not a string is sent as
//! JSON); one without a stub fails the message, naming its URL, unless `lockgate test
//! --allow-http` lets its host be reached.
//! **Output** (`--json`): one result per message, in input order:
//! ```json
//! {"message": 1, "outcome": "ok", "published": [{"topic": "out", "payload": "HELLO"}], "logs": []}
//! ```
//! A call that made HTTP requests also has `"http": [{"method": "GET", "url": "...", "status":
//! 200}]` (`status` for a stubbed answer, `"sent": true` for one that reached the network,
//! `"denied"` with the reason for one that was refused), which expectations can check.
//! **Expectations** (`--expect`): one line per message in the output shape, compared as a
//! *subset*: only the fields written are checked (a `headers` table is checked for the headers
//! it names), arrays must match element by element, a field `X_contains` checks that the actual
//! `X` contains the given text (handy for trap reasons), and `payload_json` compares a payload as
//! JSON, by the same subset rule, whatever its spacing and key order.
//!
//! [`input_json`] writes a message in the input format, so recorded traffic (`lockgate tail
//! --fixtures`, `lockgate dlq export --fixtures`) becomes a fixture.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::engine::outbound::{HttpAnswer, HttpStub};
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
    headers_base64: Option<BTreeMap<String, String>>,
    payload: Option<String>,
    payload_base64: Option<String>,
    payload_json: Option<Value>,
    timestamp_ms: Option<u64>,
    attempt: Option<u32>,
    reply_to: Option<String>,
    http: Option<Vec<StubLine>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StubLine {
    method: Option<String>,
    url: String,
    status: Option<u16>,
    headers: Option<BTreeMap<String, String>>,
    body: Option<Value>,
}

/// One message of a fixture file, with the HTTP stubs its call sees.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// 1-based line in the file.
    pub line: usize,
    /// The message.
    pub message: InboundMessage,
    /// Canned responses to its outbound requests.
    pub http: Vec<HttpStub>,
}

/// Parses a fixture file into messages (without their HTTP stubs; see [`parse_fixtures`]). Blank lines and lines starting with `#` or `//` are
/// skipped; every bad line is reported, not just the first.
pub fn parse_inputs(text: &str) -> Result<Vec<(usize, InboundMessage)>, Vec<FixtureError>> {
    Ok(parse_fixtures(text)?
        .into_iter()
        .map(|f| (f.line, f.message))
        .collect())
}

/// Parses a fixture file into messages and their HTTP stubs. Blank lines and lines starting
/// with `#` or `//` are skipped; every bad line is reported, not just the first.
pub fn parse_fixtures(text: &str) -> Result<Vec<Fixture>, Vec<FixtureError>> {
    let mut messages = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        match parse_input_line(trimmed, messages.len() + 1) {
            Ok((message, http)) => messages.push(Fixture {
                line,
                message,
                http,
            }),
            Err(message) => errors.push(FixtureError { line, message }),
        }
    }
    if errors.is_empty() {
        Ok(messages)
    } else {
        Err(errors)
    }
}

fn parse_stub(i: usize, s: StubLine) -> Result<HttpStub, String> {
    let at = |why: String| format!("`http[{i}]`: {why}");
    let url = http::Uri::try_from(s.url.as_str())
        .ok()
        .filter(|u| u.scheme().is_some() && u.host().is_some())
        .ok_or_else(|| {
            at(format!(
                "\"{}\" is not an absolute http:// or https:// URL",
                s.url
            ))
        })?;
    let status = s.status.unwrap_or(200);
    if !(100..=999).contains(&status) {
        return Err(at(format!("status {status} is not an HTTP status")));
    }
    let body = match s.body {
        None => Vec::new(),
        Some(Value::String(text)) => text.into_bytes(),
        Some(json) => serde_json::to_vec(&json).map_err(|e| at(e.to_string()))?,
    };
    Ok(HttpStub {
        method: s
            .method
            .unwrap_or_else(|| "GET".to_owned())
            .to_ascii_uppercase(),
        url: url.to_string(),
        status,
        headers: s.headers.unwrap_or_default().into_iter().collect(),
        body,
    })
}

fn parse_input_line(text: &str, index: usize) -> Result<(InboundMessage, Vec<HttpStub>), String> {
    let l: InputLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let stubs = l
        .http
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, s)| parse_stub(i, s))
        .collect::<Result<Vec<_>, _>>()?;
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
    let mut headers: Vec<(String, Vec<u8>)> = l
        .headers
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in l.headers_base64.unwrap_or_default() {
        let bytes = B64
            .decode(v.as_bytes())
            .map_err(|e| format!("`headers_base64.{k}` is not valid base64: {e}"))?;
        headers.push((k, bytes));
    }
    let topic = l.topic.unwrap_or_else(|| "test".to_owned());
    let message = InboundMessage {
        id: l.id.unwrap_or_else(|| format!("{topic}/{index}")),
        topic,
        partition: l.partition,
        offset: l.offset,
        key,
        headers,
        payload,
        timestamp_ms: l.timestamp_ms,
        attempt: l.attempt.unwrap_or(1),
        reply_to: l.reply_to,
    };
    Ok((message, stubs))
}

/// `m` as one line of the input format, read back by [`parse_inputs`] as the same message
/// (headers sorted by name). The payload is written as `payload_json` when it is JSON in its
/// compact form (so it can be edited as JSON and still reads back byte for byte), else as text
/// or base64; a header or key that is not UTF-8 goes in the `_base64` field.
pub fn input_json(m: &InboundMessage) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(m.id));
    obj.insert("topic".into(), json!(m.topic));
    if let Some(p) = m.partition {
        obj.insert("partition".into(), json!(p));
    }
    if let Some(o) = m.offset {
        obj.insert("offset".into(), json!(o));
    }
    if let Some(t) = m.timestamp_ms {
        obj.insert("timestamp_ms".into(), json!(t));
    }
    if let Some(k) = &m.key {
        put_bytes(&mut obj, "key", k);
    }
    let mut text = Map::new();
    let mut binary = Map::new();
    for (name, value) in &m.headers {
        match std::str::from_utf8(value) {
            Ok(v) => text.insert(name.clone(), json!(v)),
            Err(_) => binary.insert(name.clone(), json!(B64.encode(value))),
        };
    }
    if !text.is_empty() {
        obj.insert("headers".into(), Value::Object(text));
    }
    if !binary.is_empty() {
        obj.insert("headers_base64".into(), Value::Object(binary));
    }
    match serde_json::from_slice::<Value>(&m.payload) {
        Ok(v) if serde_json::to_vec(&v).is_ok_and(|compact| compact == m.payload) => {
            obj.insert("payload_json".into(), v);
        }
        _ => put_bytes(&mut obj, "payload", &m.payload),
    }
    if m.attempt != 1 {
        obj.insert("attempt".into(), json!(m.attempt));
    }
    if let Some(r) = &m.reply_to {
        obj.insert("reply_to".into(), json!(r));
    }
    Value::Object(obj)
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
    if !inv.http.is_empty() {
        let requests = inv
            .http
            .iter()
            .map(|r| {
                let mut o = Map::new();
                o.insert("method".into(), json!(r.method));
                o.insert("url".into(), json!(r.url));
                match &r.answer {
                    HttpAnswer::Stub(status) => o.insert("status".into(), json!(status)),
                    HttpAnswer::Sent => o.insert("sent".into(), json!(true)),
                    HttpAnswer::Denied(reason) => o.insert("denied".into(), json!(reason)),
                };
                Value::Object(o)
            })
            .collect();
        obj.insert("http".into(), Value::Array(requests));
    }
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

/// The queries of an expectation's `"sql"` list (`[{"query": "SELECT ...", "rows": [...]}]`),
/// which `lockgate test --database` runs in the message's transaction after the handler.
pub fn sql_queries(expectation: &Value) -> Vec<String> {
    expectation["sql"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["query"].as_str().map(str::to_owned))
        .collect()
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
                if k == "payload_json" {
                    let p = join(path, k);
                    match a.get("payload").and_then(Value::as_str) {
                        Some(text) => match serde_json::from_str::<Value>(text) {
                            Ok(actual) => diff_at(&p, ev, &actual, out),
                            Err(e) => out.push(format!(
                                "{p}: the payload is not JSON ({e}): {}",
                                Value::String(text.to_owned())
                            )),
                        },
                        None => out.push(format!("{p}: the payload is missing or not text")),
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
        // 120 and 120.0 are the same number: JSON does not tell integers from floats, and
        // languages print whole floats differently (Rust and Python `120.0`, JavaScript `120`).
        (Value::Number(e), Value::Number(a)) if same_number(e, a) => {}
        (e, a) => out.push(format!("{path}: expected {e}, got {a}")),
    }
}

/// Whether two JSON numbers have the same value: exactly for two integers, else as f64.
fn same_number(e: &serde_json::Number, a: &serde_json::Number) -> bool {
    match (e.as_i128(), a.as_i128()) {
        (Some(x), Some(y)) => x == y,
        _ => e.as_f64().zip(a.as_f64()).is_some_and(|(x, y)| x == y),
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
    fn payload_json_compares_values_not_spelling_and_headers_compare_as_a_subset() {
        let actual = json!({"published": [{
            "topic": "o",
            "headers": {"trace": "t1", "kind": "order"},
            "payload": "{\"id\":7,  \"tags\":[\"a\"],\"total\":1.5}"
        }]});
        let expect = |e: Value| diff(&json!({ "published": [e] }), &actual);
        assert!(expect(json!({"payload_json": {"total": 1.5, "id": 7}})).is_empty());
        assert!(
            expect(json!({"payload_json": {"id": 7.0}})).is_empty(),
            "7.0 and 7 are one number"
        );
        assert_eq!(
            expect(json!({"payload_json": {"total": 1.25}})),
            vec!["published[0].payload_json.total: expected 1.25, got 1.5"]
        );
        assert!(
            expect(json!({"payload_json": {"tags": ["a"]}, "headers": {"kind": "order"}}))
                .is_empty()
        );
        assert_eq!(
            expect(json!({"payload_json": {"id": 8}, "headers": {"trace": "t2"}})),
            vec![
                "published[0].headers.trace: expected \"t2\", got \"t1\"",
                "published[0].payload_json.id: expected 8, got 7",
            ]
        );
        let not_json = json!({"published": [{"topic": "o", "payload": "HELLO"}]});
        let d = diff(
            &json!({"published": [{"payload_json": {"a": 1}}]}),
            &not_json,
        );
        assert_eq!(d.len(), 1);
        assert!(
            d[0].starts_with("published[0].payload_json: the payload is not JSON"),
            "{d:?}"
        );
        let binary = json!({"published": [{"topic": "o", "payload_base64": "/w=="}]});
        assert_eq!(
            diff(&json!({"published": [{"payload_json": 1}]}), &binary),
            vec!["published[0].payload_json: the payload is missing or not text"]
        );
    }

    #[test]
    fn input_json_reads_back_as_the_same_message() {
        let messages = [
            InboundMessage {
                id: "orders:pos:orders/2/17".into(),
                topic: "orders".into(),
                partition: Some(2),
                offset: Some(17),
                key: Some(b"user-1".to_vec()),
                headers: vec![
                    ("bin".into(), vec![0xff, 0x00]),
                    ("trace".into(), b"abc".to_vec()),
                ],
                payload: br#"{"id":7,"kind":"order"}"#.to_vec(),
                timestamp_ms: Some(1_765_000_000_000),
                attempt: 3,
                reply_to: Some("_INBOX.1".into()),
            },
            InboundMessage {
                id: "q/1".into(),
                topic: "q".into(),
                partition: None,
                offset: None,
                key: Some(vec![0xfe]),
                headers: Vec::new(),
                // JSON, but not in its compact form: kept as text so the bytes survive.
                payload: b"{ \"id\": 7 }".to_vec(),
                timestamp_ms: None,
                attempt: 1,
                reply_to: None,
            },
            InboundMessage {
                id: "q/2".into(),
                topic: "q".into(),
                partition: None,
                offset: None,
                key: None,
                headers: Vec::new(),
                payload: vec![0, 159, 146, 150],
                timestamp_ms: None,
                attempt: 1,
                reply_to: None,
            },
        ];
        let lines: Vec<String> = messages.iter().map(|m| input_json(m).to_string()).collect();
        assert!(
            lines[0].contains(r#""payload_json":{"id":7,"kind":"order"}"#),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(r#""payload":"{ \"id\": 7 }""#),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains(r#""payload_base64":"AJ+Slg==""#),
            "{}",
            lines[2]
        );
        let read = parse_inputs(&lines.join("\n")).unwrap();
        assert_eq!(read.len(), 3);
        for ((_, got), want) in read.iter().zip(&messages) {
            let mut want = want.clone();
            want.headers.sort();
            let mut got = got.clone();
            got.headers.sort();
            assert_eq!(got, want);
        }
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
            http: vec![],
            sql: None,
        };
        let v = result_json(2, &inv);
        assert_eq!(v["message"], 2);
        assert_eq!(v["published"][0]["key_base64"], "/w==");
        assert_eq!(v["published"][0]["payload"], "ok");
        assert_eq!(v["elapsed_ms"], 1.5);
    }
}
