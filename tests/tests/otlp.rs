//! OpenTelemetry export (`[telemetry.otlp]`, docs/operate/observability.md#opentelemetry)
//! against an OTLP/HTTP receiver in the test, which decodes what `lockgate run` sends with the
//! opentelemetry-proto types: a message with a `traceparent` that is retried once and then
//! succeeds is one trace, in the sender's trace, with the message span (its parent the sender's
//! span, the messaging attributes), an attempt span per attempt and a handler span per call
//! (with what the guest logged as span events), and the metrics exports carry what `/metrics`
//! shows; a handler's HTTP request and SQL statement are client spans inside its call, and the
//! export at the stop has the final counts; with no collector listening, delivery goes on and
//! the spans and metrics exports that could not be sent are counted on `/metrics`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use lockgate_tests::admin::{admin_addr, get};
use lockgate_tests::{guest, http_server, lockgate, run_logs, show, start_run, stop_run};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// What the receiver got: each request's `authorization` header, resource attributes, spans
/// and metrics exports (in order).
#[derive(Default)]
struct Received {
    authorization: Vec<String>,
    resources: Vec<Vec<KeyValue>>,
    spans: Vec<Span>,
    metrics: Vec<Vec<Metric>>,
}

/// An OTLP/HTTP receiver on a free port of 127.0.0.1, on a runtime of its own.
fn receiver() -> (SocketAddr, Arc<Mutex<Received>>, tokio::runtime::Runtime) {
    let rt = http_server::runtime();
    let got = Arc::new(Mutex::new(Received::default()));
    let sink = got.clone();
    let addr = http_server::serve(&rt, |_| {
        move |req: hyper::Request<hyper::body::Incoming>| {
            let sink = sink.clone();
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let path = req.uri().path().to_owned();
                let Ok(body) = req.into_body().collect().await else {
                    return http_server::respond(400, "");
                };
                let body = body.to_bytes();
                let mut got = sink.lock().unwrap();
                match path.as_str() {
                    "/v1/traces" => {
                        let request = ExportTraceServiceRequest::decode(body).unwrap();
                        got.authorization.push(auth);
                        for rs in request.resource_spans {
                            got.resources
                                .push(rs.resource.map(|r| r.attributes).unwrap_or_default());
                            for ss in rs.scope_spans {
                                got.spans.extend(ss.spans);
                            }
                        }
                    }
                    "/v1/metrics" => {
                        let request = ExportMetricsServiceRequest::decode(body).unwrap();
                        got.authorization.push(auth);
                        let mut metrics = Vec::new();
                        for rm in request.resource_metrics {
                            got.resources
                                .push(rm.resource.map(|r| r.attributes).unwrap_or_default());
                            for sm in rm.scope_metrics {
                                metrics.extend(sm.metrics);
                            }
                        }
                        got.metrics.push(metrics);
                    }
                    _ => return http_server::respond(404, ""),
                }
                http_server::respond(200, "")
            }
        }
    });
    (addr, got, rt)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn text(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        other => panic!("{key}: {other:?} in {attrs:?}"),
    }
}

fn int(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(i)) => *i,
        other => panic!("{key}: {other:?} in {attrs:?}"),
    }
}

/// The value of the counter or gauge `name` for `route` in one metrics export.
fn number(metrics: &[Metric], name: &str, route: &str) -> Option<i64> {
    let m = metrics.iter().find(|m| m.name == name)?;
    let points = match m.data.as_ref()? {
        metric::Data::Sum(s) => {
            assert!(s.is_monotonic && s.aggregation_temporality == 2, "{m:?}");
            &s.data_points
        }
        metric::Data::Gauge(g) => &g.data_points,
        other => panic!("{name}: {other:?}"),
    };
    let p = points
        .iter()
        .find(|p| text(&p.attributes, "route") == route)?;
    assert!(p.start_time_unix_nano <= p.time_unix_nano, "{p:?}");
    match p.value {
        Some(number_data_point::Value::AsInt(n)) => Some(n),
        other => panic!("{name}: {other:?}"),
    }
}

fn write_config(dir: &std::path::Path, endpoint: &str, extra: &str) -> std::path::PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"

[telemetry.otlp]
endpoint = "{endpoint}"
headers = {{ authorization = "Bearer t0ken" }}
resource = {{ "deployment.environment" = "test" }}
{extra}
[handlers.flaky]
module = "{module}"
config = {{ target = "out", fail_attempts = "1" }}

[routes.orders]
handler = "flaky"
source = {{ topic = "in" }}
outputs = ["out"]
retry = {{ max_attempts = 3, initial_backoff_ms = 10, jitter = "none" }}
"#,
            module = guest("flaky").display()
        ),
    )
    .unwrap();
    config
}

/// Polls `done` every 20 ms until it holds, failing with the run's logs after a minute.
fn wait(dir: &std::path::Path, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}\n{}",
            run_logs(dir, 1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_retried_message_is_one_trace_in_its_senders_trace() {
    let (addr, got, _rt) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("http://{addr}"),
        "metrics_interval_ms = 200\n",
    );
    let tp = format!("traceparent=00-{TRACE}-{PARENT}-01");
    let out = lockgate(
        dir.path(),
        &["send", "in", "hello", "-H", &tp, "--config", "runtime.toml"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let admin = admin_addr(&mut run, dir.path(), 1);
    let message_span = |got: &Received| {
        got.spans
            .iter()
            .find(|s| s.name == "process in" && hex(&s.trace_id) == TRACE)
            .cloned()
    };
    // The message span ends last: its children were sent with it or before.
    wait(dir.path(), "no message span exported", || {
        message_span(&got.lock().unwrap()).is_some()
    });
    // The metrics: a periodic export with the message counted, the same numbers as /metrics.
    let last_succeeded = |got: &Received| {
        got.metrics
            .last()
            .and_then(|m| number(m, "lockgate_messages_succeeded", "orders"))
    };
    wait(dir.path(), "no metrics export counted the message", || {
        last_succeeded(&got.lock().unwrap()) == Some(1)
    });
    let (_, page) = get(&admin, "/metrics");
    for name in ["lockgate_messages_succeeded", "lockgate_attempts_retried"] {
        let prometheus = page
            .lines()
            .find(|l| l.starts_with(&format!("{name}_total{{")) && l.contains("route=\"orders\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        let exported = number(got.lock().unwrap().metrics.last().unwrap(), name, "orders");
        assert_eq!(prometheus, exported.map(|n| n as f64), "{name}: {page}");
    }
    let exports_before_stop = got.lock().unwrap().metrics.len();
    stop_run(&mut run, dir.path(), 1);

    let got = got.lock().unwrap();
    let message = message_span(&got).unwrap();
    let trace: Vec<&Span> = got
        .spans
        .iter()
        .filter(|s| hex(&s.trace_id) == TRACE)
        .collect();
    // The message span continues the sender's span, a remote parent.
    assert_eq!(hex(&message.parent_span_id), PARENT);
    assert_eq!(
        message.flags & 0x300,
        0x300,
        "the parent is remote: {:#x}",
        message.flags
    );
    assert_eq!(message.kind, 5, "SPAN_KIND_CONSUMER");
    let a = &message.attributes;
    assert_eq!(text(a, "messaging.system"), "lockgate");
    assert_eq!(text(a, "messaging.destination.name"), "in");
    assert_eq!(text(a, "messaging.destination.partition.id"), "0");
    assert_eq!(text(a, "messaging.operation.type"), "process");
    assert_eq!(text(a, "messaging.consumer.group.name"), "lockgate");
    assert_eq!(text(a, "messaging.message.id"), "in/0/0");
    assert_eq!(int(a, "lockgate.offset"), 0);
    assert_eq!(text(a, "lockgate.route"), "orders");
    assert_eq!(text(a, "lockgate.handler"), "flaky");
    assert_eq!(text(a, "lockgate.handler.version").len(), 64);
    assert_eq!(text(a, "lockgate.outcome"), "ok");

    // An attempt span per attempt, children of the message span; the first one failed.
    let mut attempts: Vec<&&Span> = trace.iter().filter(|s| s.name == "attempt").collect();
    attempts.sort_by_key(|s| int(&s.attributes, "lockgate.attempt"));
    assert_eq!(attempts.len(), 2, "{trace:#?}");
    for (i, s) in attempts.iter().enumerate() {
        assert_eq!(s.parent_span_id, message.span_id, "attempt {}", i + 1);
        assert_eq!(int(&s.attributes, "lockgate.attempt"), i as i64 + 1);
    }
    assert_eq!(text(&attempts[0].attributes, "lockgate.outcome"), "retry");
    assert_eq!(
        attempts[0].status.as_ref().map(|s| s.code),
        Some(2),
        "error"
    );
    assert_eq!(text(&attempts[1].attributes, "lockgate.outcome"), "ok");

    // A handler span per call, each inside its attempt, with what the guest logged.
    let handlers: Vec<&&Span> = trace.iter().filter(|s| s.name == "handler flaky").collect();
    assert_eq!(handlers.len(), 2, "{trace:#?}");
    for h in &handlers {
        assert!(
            attempts.iter().any(|a| a.span_id == h.parent_span_id),
            "a handler span outside the attempts: {h:?}"
        );
        assert!(
            h.events
                .iter()
                .any(|e| e.name.contains("attempt") && e.name.contains("failing while <= 1")),
            "the guest's log line as an event: {:?}",
            h.events
        );
    }
    assert!(
        trace
            .iter()
            .all(|s| s.start_time_unix_nano <= s.end_time_unix_nano)
    );
    assert_eq!(trace.len(), 5, "{trace:#?}");

    // The last export went out after the route drained, with the final counts.
    assert!(
        got.metrics.len() > exports_before_stop,
        "no export at the stop"
    );
    let last = got.metrics.last().unwrap();
    assert_eq!(
        number(last, "lockgate_messages_succeeded", "orders"),
        Some(1)
    );
    assert_eq!(number(last, "lockgate_attempts_retried", "orders"), Some(1));
    assert!(number(last, "lockgate_route_state", "orders").is_some());
    let duration = last
        .iter()
        .find(|m| m.name == "lockgate_handler_duration_seconds")
        .unwrap();
    assert_eq!(duration.unit, "s");
    let Some(metric::Data::Histogram(h)) = &duration.data else {
        panic!("{duration:?}");
    };
    let p = &h.data_points[0];
    assert_eq!(text(&p.attributes, "route"), "orders");
    assert_eq!(p.count, 2, "two calls");
    assert_eq!(p.bucket_counts.iter().sum::<u64>(), 2);
    assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
    assert_eq!(h.aggregation_temporality, 2, "cumulative");

    // The resource, and the configured header on every request.
    let resource = &got.resources[0];
    assert_eq!(text(resource, "service.name"), "lockgate");
    assert_eq!(text(resource, "deployment.environment"), "test");
    assert!(
        got.authorization.iter().all(|a| a == "Bearer t0ken"),
        "{:?}",
        got.authorization
    );
}

#[test]
fn without_a_collector_delivery_goes_on_and_the_lost_spans_are_counted() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("http://{closed}"),
        "max_queue_spans = 4\nexport_timeout_ms = 1000\nmetrics_interval_ms = 100\n",
    );
    for i in 0..20 {
        let out = lockgate(
            dir.path(),
            &["send", "in", &format!("m{i}"), "--config", "runtime.toml"],
        );
        assert!(out.status.success(), "{}", show(&out));
    }
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let admin = admin_addr(&mut run, dir.path(), 1);
    let counter = |name: &str| -> f64 {
        let (_, page) = get(&admin, "/metrics");
        page.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let delivered = |dir: &std::path::Path| {
        let out = lockgate(dir, &["tail", "out", "--json", "--config", "runtime.toml"]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    wait(dir.path(), "not every message delivered", || {
        delivered(dir.path()) == 20
    });
    // 20 messages, each 5 spans: none accepted, every one of them counted as lost.
    wait(dir.path(), "the lost spans are not counted", || {
        counter("lockgate_otlp_spans_dropped_total") >= 100.0
    });
    assert_eq!(counter("lockgate_otlp_spans_exported_total"), 0.0);
    wait(
        dir.path(),
        "the failed metrics exports are not counted",
        || counter("lockgate_otlp_metric_exports_failed_total") >= 1.0,
    );
    stop_run(&mut run, dir.path(), 1);
    let logs = run_logs(dir.path(), 1);
    assert!(logs.contains("Cannot export spans over OTLP"), "{logs}");
    assert!(logs.contains("Cannot export metrics over OTLP"), "{logs}");
}

/// A customer service on 127.0.0.1 (what the `enrich` handler calls): answers a small JSON
/// document and keeps each request's `traceparent`.
fn customers(rt: &tokio::runtime::Runtime) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let addr = http_server::serve(rt, |_| {
        move |req: hyper::Request<hyper::body::Incoming>| {
            let tp = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            sink.lock().unwrap().push(tp);
            async { http_server::respond(200, &br#"{"tier":"gold"}"#[..]) }
        }
    });
    (addr, seen)
}

/// A handler's outbound request and a handler's SQL statement are client spans inside its
/// handler span, by the HTTP and database conventions: the request's span is the parent the
/// server was given in `traceparent`, and the statement's text carries no literal.
#[test]
fn http_requests_and_sql_statements_are_spans_of_the_handler_call() {
    let (addr, got, rt) = receiver();
    let (service, seen) = customers(&rt);
    let pg = lockgate_tests::pg::SyncPg::connect();
    let schema = lockgate_tests::pg::unique_schema("lgotlp");
    pg.exec(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.account_balances (account text PRIMARY KEY, balance bigint NOT NULL, deposits bigint NOT NULL)"
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"

[telemetry.otlp]
endpoint = "http://{addr}"
# No periodic export within the test: the one at the stop is all there is.
metrics_interval_ms = 600000

[stores.pg]
kind = "postgres"
url = "{url}"
schema = "{schema}"

[handlers.enrich]
module = "{enrich}"
config = {{ customers_url = "http://{service}" }}

[handlers.enrich.http]
allowed_hosts = ["http://{service}"]

[handlers.ledger]
module = "{ledger}"
config = {{ table = "{schema}.account_balances" }}
sql = "pg"

[routes.orders]
handler = "enrich"
source = {{ topic = "orders" }}
outputs = ["orders.enriched"]

[routes.deposits]
handler = "ledger"
source = {{ topic = "deposits" }}
state = "pg"
idempotency = {{ key = "json:/deposit_id" }}
"#,
            url = lockgate_tests::pg::URL,
            enrich = guest("enrich").display(),
            ledger = guest("ledger").display(),
        ),
    )
    .unwrap();
    let tp = format!("traceparent=00-{TRACE}-{PARENT}-01");
    for (topic, payload) in [
        ("orders", r#"{"id":"o-1","customer_id":"c-7"}"#),
        (
            "deposits",
            r#"{"deposit_id":"d-1","account":"acc-1","amount":4242}"#,
        ),
    ] {
        let out = lockgate(
            dir.path(),
            &[
                "send",
                topic,
                payload,
                "-H",
                &tp,
                "--config",
                "runtime.toml",
            ],
        );
        assert!(out.status.success(), "{}", show(&out));
    }
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
    let spans = |got: &Received, name: &str| -> Vec<Span> {
        got.spans
            .iter()
            .filter(|s| s.name == name && hex(&s.trace_id) == TRACE)
            .cloned()
            .collect()
    };
    wait(dir.path(), "both message spans exported", || {
        let got = got.lock().unwrap();
        spans(&got, "process orders").len() == 1 && spans(&got, "process deposits").len() == 1
    });
    stop_run(&mut run, dir.path(), 1);
    let got = got.lock().unwrap();

    // The request: a client span, child of the enrich handler's span, the parent the server saw.
    let handler = &spans(&got, "handler enrich")[0];
    let get_spans = spans(&got, "GET");
    assert_eq!(get_spans.len(), 1, "{:#?}", got.spans);
    let request = &get_spans[0];
    assert_eq!(request.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(request.parent_span_id, handler.span_id);
    let a = &request.attributes;
    assert_eq!(text(a, "http.request.method"), "GET");
    assert_eq!(int(a, "http.response.status_code"), 200);
    assert_eq!(text(a, "server.address"), "127.0.0.1");
    assert_eq!(int(a, "server.port"), i64::from(service.port()));
    assert_eq!(
        text(a, "url.full"),
        format!("http://127.0.0.1:{}/customers/c-7", service.port())
    );
    let sent = seen.lock().unwrap().clone();
    assert_eq!(
        sent,
        vec![format!("00-{TRACE}-{}-01", hex(&request.span_id))],
        "the server's parent is the request's span"
    );

    // The statement: a client span, child of the ledger handler's span, without its literals.
    let handler = &spans(&got, "handler ledger")[0];
    let inserts = spans(&got, "INSERT");
    assert_eq!(inserts.len(), 1, "{:#?}", got.spans);
    let statement = &inserts[0];
    assert_eq!(statement.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(statement.parent_span_id, handler.span_id);
    let a = &statement.attributes;
    assert_eq!(text(a, "db.system.name"), "postgresql");
    assert_eq!(text(a, "db.operation.name"), "INSERT");
    assert_eq!(int(a, "db.response.returned_rows"), 1);
    let query = text(a, "db.query.text");
    assert!(
        query.starts_with("INSERT INTO") && query.contains("VALUES ($1, $2, ?)"),
        "{query}"
    );
    assert!(!query.contains("4242") && !query.contains('\n'), "{query}");

    // One metrics export, at the stop, after both routes drained: their final counts, and the
    // handler's requests by host and outcome.
    assert_eq!(got.metrics.len(), 1, "one export, at the stop");
    let last = &got.metrics[0];
    for route in ["orders", "deposits"] {
        assert_eq!(
            number(last, "lockgate_messages_succeeded", route),
            Some(1),
            "{route}"
        );
    }
    let requests = last
        .iter()
        .find(|m| m.name == "lockgate_http_requests")
        .unwrap();
    let Some(metric::Data::Sum(sum)) = &requests.data else {
        panic!("{requests:?}");
    };
    let p = &sum.data_points[0];
    assert_eq!(text(&p.attributes, "host"), "127.0.0.1");
    assert_eq!(text(&p.attributes, "outcome"), "2xx");
    assert_eq!(p.value, Some(number_data_point::Value::AsInt(1)));
    pg.drop_schema(&schema);
}
