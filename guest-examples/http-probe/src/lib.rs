//! Test instrument for outbound HTTP: each message is a JSON request description
//! (`{"method": "GET", "url": "...", "headers": {...}, "body": "...", "timeout_ms": 100,
//! "redirects": false, "repeat": 1, "open": 10}`), and the handler publishes what came back
//! to the configured `target` topic: `{"status", "headers", "body"}` or `{"error"}` (the
//! SDK's error, its kind first: `denied: ...`, `timeout: ...`). `repeat` sends the request that
//! many times in one call (the idempotency index). `open: n`
//! opens `n` requests at once through the raw bindings and waits for the last one.

use lockgate_sdk::http::{self, HttpError, Method};
use lockgate_sdk::{Error, Message, ResultExt, config, emit};
use serde_json::{Value, json};

fn describe(e: &HttpError) -> String {
    match e {
        HttpError::Denied(s) => format!("denied: {s}"),
        HttpError::Timeout(s) => format!("timeout: {s}"),
        HttpError::Connection(s) => format!("connection: {s}"),
        HttpError::TooLarge(s) => format!("too_large: {s}"),
        HttpError::Invalid(s) => format!("invalid: {s}"),
    }
}

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let target = config::get("target").unwrap_or_else(|| "http-results".to_owned());
    let spec: Value = serde_json::from_slice(msg.payload()).or_reject("payload is not JSON")?;
    let method = match spec["method"].as_str().unwrap_or("GET") {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => Method::Other(other.to_owned()),
    };
    let url = spec["url"].as_str().unwrap_or_default();
    let mut request = http::Request::new(method, url);
    if let Some(headers) = spec["headers"].as_object() {
        for (name, value) in headers {
            request = request.header(name, value.as_str().unwrap_or_default());
        }
    }
    if let Some(body) = spec["body"].as_str() {
        request = request.body(body);
    }
    if let Some(size) = spec["body_bytes"].as_u64() {
        request = request.body(vec![b'x'; size as usize]);
    }
    if let Some(ms) = spec["timeout_ms"].as_u64() {
        request = request.timeout(std::time::Duration::from_millis(ms));
    }
    if spec["redirects"] == json!(false) {
        request = request.follow_redirects(false);
    }
    if let Some(n) = spec["open"].as_u64() {
        return open_and_wait(url, n);
    }
    let repeat = spec["repeat"].as_u64().unwrap_or(1);
    let mut results = Vec::new();
    for _ in 0..repeat {
        let result = match request.clone().send() {
            Ok(r) => json!({
                "status": r.status(),
                "headers": r.headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
                "body": r.text(),
            }),
            Err(e) => json!({ "error": describe(&e) }),
        };
        results.push(result);
    }
    if spec["fail"] == json!("retry") {
        return Err(Error::retry("asked to retry"));
    }
    let payload = if repeat == 1 {
        results.remove(0)
    } else {
        Value::Array(results)
    };
    emit::Outgoing::new(target)
        .payload(payload.to_string())
        .publish()?;
    Ok(())
}

/// Opens `n` requests to `url` at once through the raw bindings, then waits for the last: a
/// guest that floods the host with requests (held to the grant's `max_concurrent`).
fn open_and_wait(url: &str, n: u64) -> Result<(), Error> {
    use lockgate_sdk::__private::bindings::wasi::http::{outgoing_handler, types};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Error::reject("open: an http:// URL"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut futures = Vec::new();
    for _ in 0..n {
        let request = types::OutgoingRequest::new(types::Fields::new());
        let _ = request.set_scheme(Some(&types::Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
        match outgoing_handler::handle(request, None) {
            Ok(f) => futures.push(f),
            Err(e) => return Err(Error::reject(format!("open: {e:?}"))),
        }
    }
    if let Some(last) = futures.last() {
        last.subscribe().block();
    }
    Ok(())
}
