//! OpenTelemetry export (`[telemetry.otlp]`, docs/operate/observability.md#opentelemetry)
//! against an OTLP/HTTP receiver in the test, which decodes what `lockgate run` sends with the
//! opentelemetry-proto types: a message with a `traceparent` that is retried once and then
//! succeeds is one trace, in the sender's trace, with the message span (its parent the sender's
//! span, the messaging attributes), an attempt span per attempt and a handler span per call
//! (with what the guest logged as span events); and with no collector listening, delivery goes
//! on and the spans that could not be sent are counted on `/metrics`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use lockgate_tests::admin::{admin_addr, get};
use lockgate_tests::{guest, lockgate, run_logs, show, start_run, stop_run};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// What the receiver got: each request's `authorization` header, resource attributes and spans.
#[derive(Default)]
struct Received {
    authorization: Vec<String>,
    resources: Vec<Vec<KeyValue>>,
    spans: Vec<Span>,
}

/// An OTLP/HTTP receiver on a free port of 127.0.0.1, on a runtime of its own.
fn receiver() -> (SocketAddr, Arc<Mutex<Received>>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let got = Arc::new(Mutex::new(Received::default()));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = got.clone();
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
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
                            let body = req.into_body().collect().await?.to_bytes();
                            let status = if path == "/v1/traces" {
                                let request = ExportTraceServiceRequest::decode(body).unwrap();
                                let mut got = sink.lock().unwrap();
                                got.authorization.push(auth);
                                for rs in request.resource_spans {
                                    got.resources.push(
                                        rs.resource.map(|r| r.attributes).unwrap_or_default(),
                                    );
                                    for ss in rs.scope_spans {
                                        got.spans.extend(ss.spans);
                                    }
                                }
                                200
                            } else {
                                404
                            };
                            let response = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                                .unwrap();
                            Ok::<_, hyper::Error>(response)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
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
    let config = write_config(dir.path(), &format!("http://{addr}"), "");
    let tp = format!("traceparent=00-{TRACE}-{PARENT}-01");
    let out = lockgate(
        dir.path(),
        &["send", "in", "hello", "-H", &tp, "--config", "runtime.toml"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let mut run = start_run(dir.path(), &config, 1, None, "lockgate=info,warn");
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
        "max_queue_spans = 4\nexport_timeout_ms = 1000\n",
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
    stop_run(&mut run, dir.path(), 1);
    assert!(
        run_logs(dir.path(), 1).contains("Cannot export spans over OTLP"),
        "{}",
        run_logs(dir.path(), 1)
    );
}
