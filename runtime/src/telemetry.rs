//! Telemetry: the admin endpoint of `lockgate run` ([`serve`]):
//!
//! - `GET /metrics`: Prometheus / OpenMetrics text, read live from the routes;
//! - `GET /healthz`: `200 ok` while the process runs;
//! - `GET /readyz`: `200` when every route is running or paused by its breaker, else `503`, with
//!   a JSON body naming each route's state;
//! - `GET /status`: JSON with each route's state, breaker, in-flight, counters and lag (what
//!   `lockgate status` reads);
//! - `POST /reload`: reloads the config and modules (what `lockgate reload` sends); it needs the
//!   bearer token of `[runtime] admin_token` when one is set, and is refused beyond loopback
//!   without one;
//! - `GET /ui`: the web console, and the JSON it polls under `/ui/api/` (`telemetry/console.rs`);
//!   replaying dead letters from it needs the same token as `POST /reload`.
//!
//! The operator's view of all of them is docs/operate/observability.md.
//!
//! A route is ready when it is connected and consuming (or paused by its breaker): a route
//! whose source (or a store it needs) has not connected yet is `connecting`, one whose source
//! or store fails is `failing`, and `/readyz` and `/status` say why (`reason`, `fix`).
//!
//! Metrics are read from each route's live [`RouteStats`] at scrape time (a
//! `prometheus-client` collector), so the pipeline keeps counting with plain atomics and nothing
//! is counted twice. Every series carries `route`, `handler` and `handler_version` (the first
//! 12 hex digits of the module's hash).
//!
//! Its client, for `lockgate status`, `lockgate reload` and the tests, is in `telemetry/client.rs`.

mod client;
mod console;
pub mod otlp;
pub mod otlp_metrics;

pub use client::{AdminClientError, http_request, http_request_async};
pub use console::{AccessIo, DeadLetterAccess};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::broker::LagGauge;
use crate::health::Health;
use crate::metrics::{Family, Kind, Value};
use crate::pipeline::HandlerSlot;
use crate::pipeline::RouteState;
use crate::pipeline::RouteStats;

/// One route as the admin endpoint sees it.
#[derive(Clone, Debug)]
pub struct RouteEntry {
    /// Route name.
    pub route: String,
    /// Handler name.
    pub handler: String,
    /// The handler version it runs (read at each scrape: hot reload swaps it).
    pub slot: HandlerSlot,
    /// Live counters.
    pub stats: Arc<RouteStats>,
    /// The source's backlog, when it reports one.
    pub lag: Option<LagGauge>,
}

impl RouteEntry {
    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![
            ("route", self.route.clone()),
            ("handler", self.handler.clone()),
            (
                "handler_version",
                self.slot.current().module_hash().chars().take(12).collect(),
            ),
        ]
    }
}

/// The routes of a running instance (shared with the HTTP handlers), and its reload counts.
#[derive(Clone, Debug, Default)]
pub struct AdminRoutes {
    routes: Arc<Mutex<Vec<RouteEntry>>>,
    reloads: Arc<ReloadCounters>,
    history: Arc<Mutex<VecDeque<ReloadRecord>>>,
}

/// Reloads the console lists (the latest ones; older ones are forgotten).
const RELOAD_HISTORY: usize = 20;

/// One reload, as the console lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReloadRecord {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Whether the new state is serving (false: refused, the old state kept serving).
    pub applied: bool,
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// Why it was refused.
    pub error: Option<String>,
}

/// How many reloads were applied and refused since start.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    /// Reloads that changed something (a module swapped, routes added, changed or removed).
    pub applied: std::sync::atomic::AtomicU64,
    /// Reloads refused (invalid config, a module that does not load); the old state kept serving.
    pub refused: std::sync::atomic::AtomicU64,
}

impl AdminRoutes {
    /// Adds a route (replacing one of the same name).
    pub fn add(&self, entry: RouteEntry) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.retain(|r| r.route != entry.route);
        routes.push(entry);
    }

    /// Removes a route.
    pub fn remove(&self, route: &str) {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r| r.route != route);
    }

    /// The reload counters.
    pub fn reloads(&self) -> &ReloadCounters {
        &self.reloads
    }

    /// Remembers a reload for the console (the latest [`RELOAD_HISTORY`]).
    pub fn record_reload(&self, record: ReloadRecord) {
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        if history.len() >= RELOAD_HISTORY {
            history.pop_front();
        }
        history.push_back(record);
    }

    /// The latest reloads, newest first.
    pub fn reload_history(&self) -> Vec<ReloadRecord> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// The routes registered now.
    pub fn all(&self) -> Vec<RouteEntry> {
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What a reload did, as `POST /reload` answers it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ReloadOutcome {
    /// Whether the new state is serving (false: refused, the old state keeps serving).
    pub applied: bool,
    /// What changed, one line each (empty when nothing differed).
    pub changes: Vec<String>,
    /// Why it was refused.
    pub error: Option<String>,
}

/// A reload asked for over the admin endpoint; the runtime answers on `reply`.
#[derive(Debug)]
pub struct ReloadRequest {
    /// Where the outcome goes.
    pub reply: tokio::sync::oneshot::Sender<ReloadOutcome>,
}

/// What the admin endpoint may change in the running process.
#[derive(Clone, Debug)]
pub struct AdminControl {
    /// Reload requests go here.
    pub reload: tokio::sync::mpsc::UnboundedSender<ReloadRequest>,
    /// The token `POST /reload` must present, if one is configured.
    pub token: Option<String>,
    /// Whether the endpoint listens on a loopback address only (then no token is required).
    pub loopback: bool,
    /// The config's DLQs, which the console lists, shows and replays (with the token).
    pub dead_letters: Option<Arc<dyn DeadLetterAccess>>,
}

type Read = fn(&RouteStats) -> u64;

/// Counters: (name without `_total`, help, reader).
const COUNTERS: &[(&str, &str, Read)] = &[
    (
        "lockgate_messages_received",
        "Deliveries taken from the source.",
        |s| load(&s.received),
    ),
    (
        "lockgate_messages_succeeded",
        "Messages whose handler succeeded and whose outputs were acknowledged.",
        |s| load(&s.succeeded),
    ),
    (
        "lockgate_attempts_retried",
        "Failed attempts that were retried.",
        |s| load(&s.retried),
    ),
    (
        "lockgate_messages_rejected",
        "Messages the handler rejected.",
        |s| load(&s.rejected),
    ),
    (
        "lockgate_messages_dead_lettered",
        "Messages written to the dead-letter destination.",
        |s| load(&s.dead_lettered),
    ),
    (
        "lockgate_messages_duplicates_skipped",
        "Redelivered messages skipped because their idempotency key was done (or their message was dead-lettered and they are not a replay).",
        |s| load(&s.duplicates),
    ),
    (
        "lockgate_outputs_refused",
        "Publishes the host refused during calls (a topic not in the route's outputs, too large, too many); each fails its call.",
        |s| load(&s.refused_outputs),
    ),
    (
        "lockgate_replays_finished",
        "Replayed dead letters taken to their end (handled, skipped or dead-lettered again).",
        |s| load(&s.replays),
    ),
    (
        "lockgate_idempotency_claim_waits",
        "Messages that waited because their idempotency key was being handled by another lane or process.",
        |s| load(&s.claim_waits),
    ),
    (
        "lockgate_messages_recovered",
        "Messages whose effects an earlier holder committed before crashing: their kept outputs were published without running the handler again.",
        |s| load(&s.recovered),
    ),
    (
        "lockgate_outputs_published",
        "Outputs published and acknowledged.",
        |s| load(&s.outputs),
    ),
    (
        "lockgate_rate_limited_waits",
        "Times the rate limit made the route wait.",
        |s| load(&s.rate_limited),
    ),
    (
        "lockgate_messages_abandoned",
        "Messages left unacknowledged at shutdown (redelivered later).",
        |s| load(&s.abandoned),
    ),
    (
        "lockgate_messages_revoked",
        "Queued messages skipped because their partition was revoked (the new owner has them).",
        |s| load(&s.revoked),
    ),
    (
        "lockgate_infra_retries",
        "Failed publish, dead-letter or state-store calls that were retried.",
        |s| load(&s.infra_retries),
    ),
    (
        "lockgate_breaker_trips",
        "Times the circuit breaker opened.",
        |s| load(&s.breaker_trips),
    ),
];

/// Gauges: (name, help, reader).
const GAUGES: &[(&str, &str, Read)] = &[
    (
        "lockgate_messages_in_flight",
        "Messages held: queued in lanes, running, waiting for a retry or their batch.",
        |s| load(&s.in_flight),
    ),
    (
        "lockgate_breaker_state",
        "Circuit breaker: 0 closed, 1 open, 2 half-open.",
        |s| load(&s.breaker_state),
    ),
    (
        "lockgate_route_state",
        "Route: 0 starting, 1 running, 2 paused by the breaker, 3 stopped, 4 connecting (its source or a store it needs not connected yet), 5 failing (its source or a store fails; see /readyz).",
        |s| s.state() as u64,
    ),
];

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(std::sync::atomic::Ordering::Relaxed)
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl AdminRoutes {
    /// Every metric now: what `/metrics` renders and the OTLP export sends (one snapshot, so
    /// the two agree).
    pub fn families(&self) -> Vec<Family> {
        let routes = self.all();
        let mut out = Vec::new();
        for (name, help, read) in COUNTERS {
            let mut f = Family::new(name, help, Kind::Counter);
            for r in &routes {
                f.push(r.labels(), Value::Counter(read(&r.stats)), r.stats.since);
            }
            out.push(f);
        }
        for (name, help, read) in GAUGES {
            let mut f = Family::new(name, help, Kind::Gauge);
            for r in &routes {
                f.push(
                    r.labels(),
                    Value::Gauge(gauge_value(read(&r.stats))),
                    r.stats.since,
                );
            }
            out.push(f);
        }
        let mut live = Family::new(
            "lockgate_instances",
            "Handler instances alive: idle in the pool or running a message.",
            Kind::Gauge,
        );
        let mut created = Family::new(
            "lockgate_instances_created",
            "Handler instances created (one per message with isolation = \"per-message\").",
            Kind::Counter,
        );
        for r in &routes {
            if let Some(p) = r.slot.current().pool_counters() {
                let value = Value::Gauge(gauge_value(load(&p.live)));
                live.push(r.labels(), value, r.stats.since);
                let value = Value::Counter(load(&p.created));
                created.push(r.labels(), value, r.stats.since);
            }
        }
        out.push(live);
        out.push(created);
        let mut f = Family::new(
            "lockgate_handler_duration_seconds",
            "Duration of handler calls (every attempt).",
            Kind::Histogram,
        );
        for r in &routes {
            let value = Value::Histogram(r.stats.handler_seconds.snapshot());
            f.push(r.labels(), value, r.stats.since);
        }
        out.push(f);
        let mut f = Family::new(
            "lockgate_reloads",
            "Reloads of modules or runtime.toml: applied (something changed) or refused (the old state kept serving).",
            Kind::Counter,
        );
        for (result, n) in [
            ("applied", load(&self.reloads.applied)),
            ("refused", load(&self.reloads.refused)),
        ] {
            f.push(
                vec![("result", result.to_owned())],
                Value::Counter(n),
                crate::metrics::process_start(),
            );
        }
        out.push(f);
        let mut f = Family::new(
            "lockgate_otlp_spans_exported",
            "Spans the OTLP collector accepted (`[telemetry.otlp]`).",
            Kind::Counter,
        );
        f.push(
            Vec::new(),
            Value::Counter(otlp::exported_spans()),
            crate::metrics::process_start(),
        );
        out.push(f);
        let mut f = Family::new(
            "lockgate_otlp_spans_dropped",
            "Spans not exported: the queue (`max_queue_spans`) was full, or the collector could not take them. Delivery never waits for the export.",
            Kind::Counter,
        );
        f.push(
            Vec::new(),
            Value::Counter(otlp::dropped_spans()),
            crate::metrics::process_start(),
        );
        out.push(f);
        let mut f = Family::new(
            "lockgate_otlp_metric_exports_failed",
            "Metrics exports over OTLP the collector did not take (unreachable, timed out or refused); the first and every 100th are logged.",
            Kind::Counter,
        );
        f.push(
            Vec::new(),
            Value::Counter(otlp_metrics::failed_exports()),
            crate::metrics::process_start(),
        );
        out.push(f);
        // Each route's handler version has its own client (and counters): a reload starts them
        // again, which `rate()` and `increase()` take as a counter reset.
        let http: Vec<_> = routes
            .iter()
            .filter_map(|r| Some((r, r.slot.current().http_stats()?)))
            .collect();
        let mut requests = Family::new(
            "lockgate_http_requests",
            "Outbound HTTP requests of handlers by host and how they ended: 2xx (also 1xx and 3xx), 4xx, 5xx, timeout, refused (no connection), denied (not allowed by the grant or a limit).",
            Kind::Counter,
        );
        let mut seconds = Family::new(
            "lockgate_http_request_seconds",
            "Time from sending an outbound HTTP request to its response headers.",
            Kind::Histogram,
        );
        for (r, stats) in &http {
            for (host, outcome, n) in stats.counts() {
                let labels = vec![
                    ("route", r.route.clone()),
                    ("handler", r.handler.clone()),
                    ("host", host),
                    ("outcome", outcome.as_str().to_owned()),
                ];
                requests.push(labels, Value::Counter(n), stats.since());
            }
            for (host, histogram) in stats.durations() {
                let labels = vec![
                    ("route", r.route.clone()),
                    ("handler", r.handler.clone()),
                    ("host", host),
                ];
                seconds.push(labels, Value::Histogram(histogram), stats.since());
            }
        }
        out.push(requests);
        out.push(seconds);
        let mut f = Family::new(
            "lockgate_consumer_lag_messages",
            "Messages not yet committed per partition (Kafka: high watermark - committed; JetStream: consumer pending), refreshed every 5 s.",
            Kind::Gauge,
        );
        for r in &routes {
            for lag in r.lag.iter().flat_map(LagGauge::get) {
                let labels = vec![
                    ("route", r.route.clone()),
                    ("topic", lag.topic.clone()),
                    (
                        "partition",
                        lag.partition.map_or_else(String::new, |p| p.to_string()),
                    ),
                ];
                f.push(
                    labels,
                    Value::Gauge(gauge_value(lag.messages)),
                    r.stats.since,
                );
            }
        }
        out.push(f);
        out
    }
}

/// The Prometheus side of [`AdminRoutes::families`].
impl prometheus_client::collector::Collector for AdminRoutes {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in self.families() {
            let kind = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, kind)?;
            for sample in &family.samples {
                let mut series = metric.encode_family(&sample.labels)?;
                match &sample.value {
                    Value::Counter(n) => ConstCounter::new(*n).encode(series)?,
                    Value::Gauge(v) => ConstGauge::new(*v).encode(series)?,
                    Value::Histogram(h) => {
                        let buckets: Vec<(f64, u64)> = h
                            .bounds
                            .iter()
                            .copied()
                            .chain(std::iter::once(f64::INFINITY))
                            .zip(h.counts.iter().copied())
                            .collect();
                        series.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            h.sum, h.count, &buckets, None,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

struct AdminState {
    registry: Registry,
    routes: AdminRoutes,
    control: Option<AdminControl>,
    /// Held by the console's replay: one at a time.
    replaying: tokio::sync::Mutex<()>,
}

/// Serves the admin endpoint on `listener` until `shutdown` resolves. With `control`,
/// `POST /reload` reloads the running process.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: AdminRoutes,
    control: Option<AdminControl>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(routes.clone()));
    let state = Arc::new(AdminState {
        registry,
        routes,
        control,
        replaying: tokio::sync::Mutex::new(()),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .route("/reload", axum::routing::post(reload))
        .merge(console::router())
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A one-shot `GET path` on an admin endpoint at `addr` (`host:port`): (status code, body).
/// For `lockgate status` and tests; see [`http_request`].
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), AdminClientError> {
    http_request(addr, "GET", path, None)
}

/// Binds the admin address (`host:port`).
pub async fn bind(addr: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

async fn reload(
    State(state): State<Arc<AdminState>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    let refuse = |code: StatusCode, error: String| {
        let body = ReloadOutcome {
            applied: false,
            changes: Vec::new(),
            error: Some(error),
        };
        (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&body).unwrap_or_default(),
        )
    };
    let Some(control) = &state.control else {
        return refuse(
            StatusCode::NOT_FOUND,
            "this process does not reload".to_owned(),
        );
    };
    if let Err((code, message)) = authorize(control, &headers, "POST /reload") {
        return refuse(code, message);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if control.reload.send(ReloadRequest { reply: tx }).is_err() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the runtime is stopping".to_owned(),
        );
    }
    match rx.await {
        Ok(outcome) => (
            if outcome.applied {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            },
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&outcome).unwrap_or_default(),
        ),
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the runtime is stopping".to_owned(),
        ),
    }
}

/// Whether a request that changes the running process (`what`) may: with `[runtime]
/// admin_token` set it must carry `Authorization: Bearer <token>` (else 401); without one it is
/// allowed on a loopback listener only (else 403). docs/guarantees.md#g7.
fn authorize(
    control: &AdminControl,
    headers: &axum::http::HeaderMap,
    what: &str,
) -> Result<(), (StatusCode, String)> {
    match &control.token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given == Some(token.as_str()) {
                Ok(())
            } else {
                Err((
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "{what} needs `Authorization: Bearer <token>` with the token of [runtime] admin_token"
                    ),
                ))
            }
        }
        None if !control.loopback => Err((
            StatusCode::FORBIDDEN,
            format!(
                "the admin endpoint listens beyond loopback: set [runtime] admin_token to allow {what}"
            ),
        )),
        None => Ok(()),
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

/// Every route's state and counters as JSON, for `lockgate status`.
async fn status(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let routes: Vec<serde_json::Value> = state
        .routes
        .all()
        .iter()
        .map(|r| {
            let lag: Option<u64> = r
                .lag
                .as_ref()
                .map(|g| g.get().iter().map(|l| l.messages).sum());
            let mut route = route_json(r);
            route.insert(
                "attempts".into(),
                serde_json::json!(reason(&r.stats).attempts),
            );
            route.insert("lag".into(), serde_json::json!(lag));
            serde_json::Value::Object(route)
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{}\n", serde_json::json!({ "routes": routes })),
    )
}

/// A route's state and counters as `/status` and the console's status show them; each adds
/// its own fields (lag as a total or per partition, ...).
fn route_json(r: &RouteEntry) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let s = &r.stats;
    let why = reason(s);
    let version: String = r.slot.current().module_hash().chars().take(12).collect();
    [
        ("route", json!(r.route)),
        ("handler", json!(r.handler)),
        ("handler_version", json!(version)),
        ("state", json!(s.state().as_str())),
        ("reason", json!(why.reason)),
        ("fix", json!(why.fix)),
        ("breaker", json!(breaker_name(load(&s.breaker_state)))),
        ("in_flight", json!(load(&s.in_flight))),
        ("received", json!(load(&s.received))),
        ("succeeded", json!(load(&s.succeeded))),
        ("retried", json!(load(&s.retried))),
        ("rejected", json!(load(&s.rejected))),
        ("dead_lettered", json!(load(&s.dead_lettered))),
        ("duplicates", json!(load(&s.duplicates))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn breaker_name(code: u64) -> &'static str {
    match code {
        0 => "closed",
        1 => "open",
        _ => "half_open",
    }
}

/// Why a route is not ready, when a dependency is the reason.
#[derive(Default)]
struct Why {
    /// `"<part>: <error>"`, or `"<part>: connecting"`.
    reason: Option<String>,
    /// What to change, when known.
    fix: Option<String>,
    /// Failed attempts in a row.
    attempts: Option<u32>,
}

fn reason(stats: &crate::pipeline::RouteStats) -> Why {
    match stats.blocker() {
        Some((
            part,
            Health::Failing {
                failure, attempts, ..
            },
        )) => Why {
            reason: Some(format!("{part}: {}", failure.error)),
            fix: failure.fix,
            attempts: Some(attempts),
        },
        Some((part, h)) => Why {
            reason: Some(format!("{part}: {}", h.as_str())),
            ..Why::default()
        },
        None => Why::default(),
    }
}

/// 200 when every route is running (or paused by its breaker, which is it doing its job), 503
/// while one is starting, connecting or failing, or after one stopped; the body names each
/// route's state, and for one that is not ready, why (`reason`) and what to change (`fix`).
async fn ready(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let routes = state.routes.all();
    let states: Vec<RouteState> = routes.iter().map(|r| r.stats.state()).collect();
    let ready = !routes.is_empty() && states.iter().all(|s| s.is_ready());
    let body = serde_json::json!({
        "ready": ready,
        "routes": routes.iter().zip(&states).map(|(r, s)| {
            let why = if s.is_ready() { Why::default() } else { reason(&r.stats) };
            serde_json::json!({
                "route": r.route,
                "state": s.as_str(),
                "reason": why.reason,
                "fix": why.fix,
                "attempts": why.attempts,
                "breaker": breaker_name(load(&r.stats.breaker_state)),
                "in_flight": load(&r.stats.in_flight),
            })
        }).collect::<Vec<_>>(),
    });
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use prometheus_client::registry::Registry;

    use super::AdminRoutes;

    /// docs/reference/metrics.md: every metric `/metrics` serves, as its descriptors say.
    fn render() -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(AdminRoutes::default()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rows = Vec::new();
        let mut help = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                help.insert(name.to_owned(), text.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                let shown = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                let meaning = help.get(name).cloned().unwrap_or_default();
                rows.push(format!(
                    "| `{shown}` | {kind} | {} |",
                    meaning.replace('|', "\\|")
                ));
            }
        }
        format!(
            "# Metrics reference\n\n\
             <!-- Generated from the metric descriptors by a test in runtime/src/telemetry.rs; it fails when this file differs. -->\n\n\
             Every metric `GET /metrics` serves on the admin address ([observability](../operate/observability.md)),\n\
             with the help text it carries. Per-route series have the labels `route`, `handler` and\n\
             `handler_version` (the first 12 hex digits of the module's SHA-256);\n\
             `lockgate_reloads_total` has `result` (`applied`, `refused`) instead, and\n\
             `lockgate_consumer_lag_messages` has `route`, `topic` and `partition`.\n\n\
             | metric | type | meaning |\n|---|---|---|\n{}\n",
            rows.join("\n")
        )
    }

    #[test]
    fn the_committed_metrics_reference_is_the_rendered_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/metrics.md");
        let rendered = render();
        assert!(rendered.contains("| `lockgate_messages_received_total` | counter |"));
        assert!(rendered.contains("| `lockgate_handler_duration_seconds` | histogram |"));
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap_or_else(|e| panic!("{e}"));
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "docs/reference/metrics.md is not what /metrics serves; run `BLESS=1 cargo test -p lockgate --lib the_committed_metrics_reference` and commit it"
        );
    }
}
