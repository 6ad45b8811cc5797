//! The web console of the admin endpoint: `GET /ui` (one page, its script and its style,
//! compiled into the binary) and the JSON it polls under `/ui/api/`:
//!
//! - `GET /ui/api/status`: every route (state, breaker, in-flight, counters, lag per
//!   partition, handler version) and the reloads (counts and the latest ones);
//! - `GET /ui/api/dead-letters?route=&error_kind=&reason=&status=&limit=`: the dead letters of
//!   the config's DLQs, newest first, as `lockgate dlq list --json` describes them;
//! - `GET /ui/api/dead-letters/<position>`: one dead letter with its key, headers and payload
//!   (`lockgate dlq show --json`); message contents, so it needs the admin token as a replay
//!   does;
//! - `POST /ui/api/replay` (`{"positions": [...], "to": null}`): replays those dead letters as
//!   `lockgate dlq replay --position ... --wait 0` does. It needs the admin token exactly as
//!   `POST /reload` does (docs/guarantees.md#g7).
//!
//! The page is read-only until the operator types the token; it makes no request beyond the
//! admin endpoint (its `Content-Security-Policy` forbids it). The DLQs are read and written
//! through a [`DeadLetterAccess`] the runtime passes in: the same brokers and the same replay
//! algorithm ([`crate::dlq`]) as `lockgate dlq`. The operator's view is
//! docs/operate/observability.md ("Web console").

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};

use super::{AdminState, load, route_json};
use crate::broker::{Scan, Sink};
use crate::dlq::{
    Contents, DeadLetter, DlqRef, IoError, Numbering, PositionError, ReplayIo, ReplayOutcome,
    Settings,
};
use crate::message::{OutRecord, Record};

/// The page, its script and its style: small, hand-written, no build step and nothing fetched
/// from elsewhere.
const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Only this origin's script, style and JSON; no frames, no forms posted elsewhere.
const CSP: &str = "default-src 'self'; img-src 'self' data:; connect-src 'self'; \
                   frame-ancestors 'none'; form-action 'none'; base-uri 'none'";

/// Dead letters a list answers at most, whatever `limit` asks.
const MAX_LIST: usize = 1000;

/// Dead letters a replay publishes per batch (as `lockgate dlq replay`'s default).
const REPLAY_BATCH: usize = 100;

/// The DLQs of the running config, as the console reads and replays them: the runtime's broker
/// clients ([`crate::dlq::ReplayIo`] without generics, so that the admin endpoint can hold it).
pub trait DeadLetterAccess: Send + Sync + std::fmt::Debug + 'static {
    /// The DLQs of `route`, or every distinct DLQ of the config; `Err` names an unknown route.
    fn dlqs(&self, route: Option<&str>) -> Result<Vec<DlqRef>, String>;
    /// Opens a read of `dlq` from its head.
    fn scan<'a>(&'a self, dlq: &'a DlqRef) -> BoxFuture<'a, Result<Box<dyn Scan>, IoError>>;
    /// Where replay markers of `dlq` are appended.
    fn marker_sink<'a>(&'a self, dlq: &'a DlqRef) -> BoxFuture<'a, Result<Arc<dyn Sink>, IoError>>;
    /// The producer feeding `route`'s source (where replayed copies go).
    fn feeder<'a>(&'a self, route: &'a str) -> BoxFuture<'a, Result<Arc<dyn Sink>, IoError>>;
    /// The broker `route` consumes from, if the config has the route.
    fn source_broker(&self, route: &str) -> Option<String>;
}

/// [`DeadLetterAccess`] as the replay algorithm takes it: the console's and `lockgate dlq`'s
/// way to the DLQs.
pub struct AccessIo<'a>(pub &'a dyn DeadLetterAccess);

impl ReplayIo for AccessIo<'_> {
    type Scan = Box<dyn Scan>;
    type Sink = Arc<dyn Sink>;

    async fn scan(&mut self, dlq: &DlqRef) -> Result<Box<dyn Scan>, IoError> {
        self.0.scan(dlq).await
    }

    fn numbering(&self, scan: &Box<dyn Scan>) -> Numbering {
        scan.numbering()
    }

    async fn next_batch(
        &mut self,
        scan: &mut Box<dyn Scan>,
    ) -> Result<Option<Vec<Record>>, IoError> {
        Ok(scan.next_batch().await?)
    }

    async fn marker_sink(&mut self, dlq: &DlqRef) -> Result<Arc<dyn Sink>, IoError> {
        self.0.marker_sink(dlq).await
    }

    async fn feeder(&mut self, route: &str) -> Result<Arc<dyn Sink>, IoError> {
        self.0.feeder(route).await
    }

    async fn publish(
        &mut self,
        sink: &Arc<dyn Sink>,
        records: Vec<OutRecord>,
    ) -> Result<(), IoError> {
        Ok(sink.publish(records).await?)
    }

    fn source_broker(&self, route: &str) -> Option<String> {
        self.0.source_broker(route)
    }
}

/// The console's routes, merged into the admin router.
pub(super) fn router() -> axum::Router<Arc<AdminState>> {
    axum::Router::new()
        .route(
            "/ui",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { page("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { page("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/ui/api/status", get(status))
        .route("/ui/api/dead-letters", get(list))
        .route("/ui/api/dead-letters/{*position}", get(show))
        .route("/ui/api/replay", post(replay))
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `value` as a JSON answer with `code` (axum's `json` feature is not compiled in).
fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("{value}\n"),
    )
        .into_response()
}

/// A JSON error body `{"error": ...}` with `code`.
fn error(code: StatusCode, message: impl Into<String>) -> Response {
    json_response(code, &json!({ "error": message.into() }))
}

/// `%XX` and `+` decoded (a query string's value); a malformed escape stays as it is.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Routes, reloads and whether replay can be allowed, for the page's poll.
async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let routes: Vec<Value> = state
        .routes
        .all()
        .iter()
        .map(|r| {
            let s = &r.stats;
            let lag: Vec<Value> = r
                .lag
                .iter()
                .flat_map(crate::broker::LagGauge::get)
                .map(
                    |l| json!({"topic": l.topic, "partition": l.partition, "messages": l.messages}),
                )
                .collect();
            let mut route = route_json(r);
            route.extend([
                (
                    "module_hash".to_owned(),
                    json!(r.slot.current().module_hash()),
                ),
                ("breaker_trips".to_owned(), json!(load(&s.breaker_trips))),
                ("outputs".to_owned(), json!(load(&s.outputs))),
                ("replays".to_owned(), json!(load(&s.replays))),
                ("lag".to_owned(), json!(lag)),
            ]);
            Value::Object(route)
        })
        .collect();
    let control = state.control.as_ref();
    json_response(
        StatusCode::OK,
        &json!({
            "now_ms": crate::message::now_ms(),
            "routes": routes,
            "reloads": {
                "applied": load(&state.routes.reloads().applied),
                "refused": load(&state.routes.reloads().refused),
                "history": state.routes.reload_history(),
            },
            "dead_letters": control.is_some_and(|c| c.dead_letters.is_some()),
            "token_required": control.is_some_and(|c| c.token.is_some() || !c.loopback),
        }),
    )
}

/// The dead-letter capability, if the runtime gave one.
fn access(state: &AdminState) -> Option<&dyn DeadLetterAccess> {
    state
        .control
        .as_ref()
        .and_then(|c| c.dead_letters.as_deref())
}

/// The answer when there is no dead-letter capability.
fn no_access() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this process does not read dead letters",
    )
}

/// The filters of `GET /ui/api/dead-letters`.
#[derive(Debug, Default)]
struct ListQuery {
    route: Option<String>,
    error_kind: Option<String>,
    /// A piece of the reason, any case.
    reason: Option<String>,
    /// `pending`, `replayed`, `handled`, `skipped` or `failed`.
    status: Option<String>,
    limit: Option<usize>,
}

impl ListQuery {
    /// Reads `route=...&error_kind=...`; unknown names are ignored, a bad `limit` is an error.
    fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match name {
                "route" => q.route = Some(value),
                "error_kind" => q.error_kind = Some(value),
                "reason" => q.reason = Some(value),
                "status" => q.status = Some(value),
                "limit" => {
                    q.limit =
                        Some(value.parse().map_err(|_| {
                            format!("limit={value:?} is not a number of dead letters")
                        })?);
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// `pending`, `replayed` (no result yet) or the replayed copy's result, as `lockgate dlq list`
/// names them.
fn letter_status(c: &Contents, d: &DeadLetter) -> &'static str {
    match c.results.get(&d.position).map(|r| r.outcome) {
        Some(ReplayOutcome::Handled) => "handled",
        Some(ReplayOutcome::Skipped) => "skipped",
        Some(ReplayOutcome::DeadLettered) => "failed",
        None if c.replayed.contains(&d.position) => "replayed",
        None => "pending",
    }
}

/// A dead letter's envelope as JSON (the fields of `lockgate dlq list --json`).
fn metadata(dlq: &DlqRef, d: &DeadLetter, c: &Contents) -> Value {
    let result = c.results.get(&d.position);
    json!({
        "dlq": dlq.to_string(),
        "position": c.numbering.full(&d.position),
        "shown": d.shown,
        "status": letter_status(c, d),
        "result_detail": result.map(|r| r.detail.clone()),
        "result_route": result.map(|r| r.route.clone()),
        "route": d.route,
        "handler": d.handler,
        "module_hash": d.module_hash,
        "source": d.source_position,
        "message_id": d.message_id,
        "error_kind": d.error_kind,
        "reason": d.reason,
        "gave_up": d.gave_up,
        "attempts": d.attempts,
        "first_failure_ms": d.first_failure_ms,
        "last_failure_ms": d.last_failure_ms,
    })
}

async fn list(State(state): State<Arc<AdminState>>, uri: axum::http::Uri) -> Response {
    let Some(access) = access(&state) else {
        return no_access();
    };
    let q = match ListQuery::parse(uri.query()) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let route = q.route.as_deref().filter(|r| !r.is_empty());
    let dlqs = match access.dlqs(route) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let kind = q.error_kind.as_deref().filter(|k| !k.is_empty());
    let needle = q
        .reason
        .as_deref()
        .filter(|r| !r.is_empty())
        .map(str::to_lowercase);
    let wanted_status = q.status.as_deref().filter(|s| !s.is_empty());
    let filter = |d: &DeadLetter| {
        route.is_none_or(|r| r == d.route)
            && kind.is_none_or(|k| k == d.error_kind)
            && needle
                .as_deref()
                .is_none_or(|n| d.reason.to_lowercase().contains(n))
    };
    let mut rows: Vec<(u64, Value)> = Vec::new();
    let mut errors = Vec::new();
    for dlq in &dlqs {
        match crate::dlq::read(&mut AccessIo(access), dlq, filter, |_| false).await {
            Ok(c) => rows.extend(
                c.dead
                    .iter()
                    .filter(|d| wanted_status.is_none_or(|s| s == letter_status(&c, d)))
                    .map(|d| (d.last_failure_ms, metadata(dlq, d, &c))),
            ),
            Err(e) => errors.push(e.to_string()),
        }
    }
    rows.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let total = rows.len();
    let limit = q.limit.unwrap_or(200).min(MAX_LIST);
    let letters: Vec<Value> = rows.into_iter().take(limit).map(|(_, v)| v).collect();
    json_response(
        StatusCode::OK,
        &json!({ "dead_letters": letters, "total": total, "errors": errors }),
    )
}

/// The dead letter at `typed` among `dlqs` (any form `lockgate dlq show` takes), with its
/// DLQ's contents about it.
async fn locate(
    access: &dyn DeadLetterAccess,
    dlqs: &[DlqRef],
    typed: &str,
) -> Result<(DlqRef, DeadLetter, Contents), Response> {
    let candidates = dlqs.iter().filter(|d| {
        typed
            .strip_prefix(&d.topic)
            .is_some_and(|rest| rest.starts_with('/'))
    });
    for dlq in candidates {
        match crate::dlq::find(&mut AccessIo(access), dlq, typed).await {
            Ok(Ok((d, c))) => return Ok((dlq.clone(), d, c)),
            Ok(Err(PositionError::Unknown { .. })) => {}
            Ok(Err(e)) => return Err(error(StatusCode::BAD_REQUEST, format!("{e} (in {dlq})"))),
            Err(e) => return Err(error(StatusCode::BAD_GATEWAY, e.to_string())),
        }
    }
    Err(error(
        StatusCode::NOT_FOUND,
        format!("no dead letter at {typed}"),
    ))
}

/// Text when UTF-8, else base64 under `<name>_base64`.
fn bytes_json(v: &mut Value, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => v[name] = json!(s),
        Err(_) => {
            v[format!("{name}_base64")] =
                json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
}

async fn show(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(position): Path<String>,
) -> Response {
    // A letter's payload, key and headers are message contents, more than the failure reasons
    // the read-only paths show (docs/guarantees.md#g7): the token guards them.
    let Some(control) = &state.control else {
        return error(
            StatusCode::NOT_FOUND,
            "this process does not read dead letters",
        );
    };
    if let Err((code, message)) = super::authorize(control, &headers, "reading a dead letter") {
        return error(code, message);
    }
    let Some(access) = access(&state) else {
        return no_access();
    };
    let dlqs = match access.dlqs(None) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let (dlq, d, c) = match locate(access, &dlqs, &position).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let mut v = metadata(&dlq, &d, &c);
    v["headers"] = d
        .record
        .headers
        .iter()
        .filter(|(n, _)| !n.starts_with(crate::dlq::DLQ_HEADER_PREFIX))
        .filter(|(n, _)| n != crate::message::LOCKGATE_ID_HEADER)
        .map(|(n, v)| json!([n, String::from_utf8_lossy(v)]))
        .collect();
    if let Some(k) = &d.record.key {
        bytes_json(&mut v, "key", k);
    }
    bytes_json(&mut v, "payload", &d.record.payload);
    json_response(StatusCode::OK, &v)
}

/// The body of `POST /ui/api/replay`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// The dead letters, as the list names them (`position` or `shown`).
    positions: Vec<String>,
    /// Publish to this topic instead of the original one (`lockgate dlq replay --to`).
    #[serde(default)]
    to: Option<String>,
}

async fn replay(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(control) = &state.control else {
        return error(StatusCode::NOT_FOUND, "this process does not replay");
    };
    if let Err((code, message)) = super::authorize(control, &headers, "POST /ui/api/replay") {
        return error(code, message);
    }
    let Some(access) = access(&state) else {
        return no_access();
    };
    let body: ReplayBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    r#"the body must be JSON {{"positions": ["<position>", ...], "to": null}}: {e}"#
                ),
            );
        }
    };
    if body.positions.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no dead letter selected");
    }
    // One replay at a time: two at once could both publish a letter before either marks it.
    let _one = state.replaying.lock().await;
    let dlqs = match access.dlqs(None) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mut wanted: HashSet<(DlqRef, String)> = HashSet::new();
    for typed in &body.positions {
        match locate(access, &dlqs, typed).await {
            Ok((dlq, d, _)) => {
                wanted.insert((dlq, d.position));
            }
            Err(r) => return r,
        }
    }
    let dlqs: Vec<DlqRef> = dlqs
        .into_iter()
        .filter(|dlq| wanted.iter().any(|(w, _)| w == dlq))
        .collect();
    let positions: HashSet<&str> = wanted.iter().map(|(_, p)| p.as_str()).collect();
    let never = AtomicBool::new(false);
    let mut io = AccessIo(access);
    let plan = match crate::dlq::plan(
        &mut io,
        &dlqs,
        |d| positions.contains(d.position.as_str()),
        body.to.as_deref(),
        &never,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    if let Some((route, _)) = plan.unknown_routes.iter().next() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "route {route:?} is not in the config: cannot tell which broker to replay to (add the route back)"
            ),
        );
    }
    let already = plan.already;
    let mut not_found = 0;
    let settings = Settings {
        batch: REPLAY_BATCH,
        rate: None,
    };
    let done = crate::dlq::replay(&mut io, plan, settings, &never, |event| {
        if let crate::dlq::ReplayEvent::NotFound { n, .. } = event {
            not_found += n;
        }
    })
    .await;
    match done {
        Ok(done) => {
            tracing::info!(
                replayed = done.replayed,
                already,
                "Replayed dead letters from the web console"
            );
            json_response(
                StatusCode::OK,
                &json!({
                    "replayed": done.replayed,
                    "already": already,
                    "not_found": not_found,
                    "positions": done.published.iter().flat_map(|(_, p)| p.iter()).collect::<Vec<_>>(),
                }),
            )
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}
