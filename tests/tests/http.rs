//! Outbound HTTP from handlers (docs/handlers/http.md): the grant lets through what it names and
//! nothing else, TLS trusts a private CA only when told to, every wait ends at the call's deadline,
//! limits hold, and each request carries a stable idempotency key and the message's trace.
//!
//! The dependency is a real HTTP server on 127.0.0.1 started by each test; it records every
//! request and counts every connection, so "denied" means nothing reached it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use lockgate::config::Isolation;
use lockgate::config::http::{AllowedHost, HttpGrant};
use lockgate::engine::outbound::{HttpOutcome, Outbound};
use lockgate::engine::{HandlerLimits, InboundMessage, InstancePool, Outcome};
use lockgate_tests::{guest_pool, handler_env};
use serde_json::{Value, json};

/// One test at a time: the deadline and concurrency bounds are asserted with a 50 ms margin,
/// which a route moving 2,000 orders in the same process would eat on 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
    at: Instant,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    /// `/customers/...` answers 503 until then (an outage of the dependency).
    down_until: Arc<Mutex<Option<Instant>>>,
    _rt: tokio::runtime::Runtime,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    down_until: Arc<Mutex<Option<Instant>>>,
    port: u16,
) -> hyper::Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let before = {
        let mut seen = seen.lock().expect("seen");
        let before = seen
            .iter()
            .filter(|s| s.path == parts.uri.to_string())
            .count();
        seen.push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
        });
        before
    };
    let down = down_until
        .lock()
        .expect("down")
        .is_some_and(|until| Instant::now() < until);
    let mut builder = hyper::Response::builder();
    let body = match path.as_str() {
        "/customers/held" if before == 0 => {
            // The first attempt never gets an answer: the test kills the process meanwhile.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            full("")
        }
        "/customers/throttled" if before == 0 => {
            builder = builder.status(429).header("retry-after", "2");
            full("slow down")
        }
        p if p.starts_with("/customers/") && down => {
            builder = builder.status(503);
            full("down")
        }
        p if p.starts_with("/customers/") => {
            builder = builder.header("content-type", "application/json");
            full(json!({"id": &p[11..], "name": format!("customer {}", &p[11..])}).to_string())
        }
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            full("")
        }
        "/drip" => {
            let stream = futures_util::stream::unfold(0u32, |n| async move {
                if n > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                (n < 30).then(|| {
                    (
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"x"))),
                        n + 1,
                    )
                })
            });
            StreamBody::new(stream).boxed()
        }
        "/stall" => {
            // Declares ten bytes, sends one, then nothing.
            builder = builder.header("content-length", "10");
            let stream = futures_util::stream::unfold(0u32, |n| async move {
                if n > 0 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"x"))),
                    n + 1,
                ))
            });
            StreamBody::new(stream).boxed()
        }
        "/big" => full(vec![b'b'; 10 * 1024 * 1024]),
        "/redirect-out" => {
            builder = builder
                .status(302)
                .header("location", format!("http://localhost:{port}/elsewhere"));
            full("")
        }
        "/redirect-in" => {
            builder = builder.status(302).header("location", "/landed");
            full("")
        }
        p if p.starts_with("/status/") => {
            builder = builder.status(p[8..].parse::<u16>().unwrap_or(500));
            full("status")
        }
        _ => {
            builder = builder.header("content-type", "application/json");
            full(json!({"path": path, "body": String::from_utf8_lossy(&body)}).to_string())
        }
    };
    builder.body(body).expect("response")
}

/// Starts the server, over TLS when `tls` is given.
fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let down_until = Arc::new(Mutex::new(None));
    let open = Arc::new(AtomicUsize::new(0));
    let (s, c, d, o) = (
        seen.clone(),
        connections.clone(),
        down_until.clone(),
        open.clone(),
    );
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let (seen, down, tls, open) = (s.clone(), d.clone(), tls.clone(), o.clone());
            tokio::spawn(async move {
                // Counted down however the connection ends (a client that goes away included).
                struct Close(Arc<AtomicUsize>);
                impl Drop for Close {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _close = Close(open);
                let service = hyper::service::service_fn(move |req| {
                    let (seen, down) = (seen.clone(), down.clone());
                    async move { Ok::<_, Infallible>(respond(req, seen, down, addr.port()).await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .await;
                    }
                    Some(cfg) => {
                        if let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    Server {
        addr,
        seen,
        connections,
        open,
        down_until,
        _rt: rt,
    }
}

fn grant(hosts: &[&str]) -> HttpGrant {
    HttpGrant {
        allowed_hosts: hosts
            .iter()
            .map(|h| AllowedHost::parse(h).expect("entry"))
            .collect(),
        timeout_ms: 5_000,
        max_request_bytes: 64 * 1024,
        max_response_bytes: 1024 * 1024,
        max_concurrent: 4,
        ca_file: None,
        idempotency_header: Some("Idempotency-Key".into()),
    }
}

fn probe(grant: Option<HttpGrant>, timeout: Duration) -> (InstancePool, Option<Arc<Outbound>>) {
    let mut env = handler_env(
        "probe",
        &[("target", "out")],
        HandlerLimits {
            timeout,
            ..HandlerLimits::default()
        },
    );
    let outbound = grant.map(|g| Arc::new(Outbound::new(g).expect("client")));
    env.http = outbound.clone();
    (
        guest_pool("http-probe", false, Isolation::Reuse, env),
        outbound,
    )
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn msg(id: &str, spec: Value) -> InboundMessage {
    InboundMessage {
        id: id.to_owned(),
        topic: "in".into(),
        headers: vec![("traceparent".into(), TRACEPARENT.as_bytes().to_vec())],
        payload: spec.to_string().into_bytes(),
        attempt: 1,
        ..InboundMessage::default()
    }
}

/// The published result of an ok call.
fn result(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Ok { outputs } => {
            serde_json::from_slice(&outputs[0].payload).expect("probe output is JSON")
        }
        other => panic!("expected ok, got {other:?}"),
    }
}

fn error_of(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn an_allowed_host_gets_the_request_with_a_stable_key_and_the_trace() {
    let _serial = serial();
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let (pool, outbound) = probe(Some(grant(&[&base])), Duration::from_secs(10));

    let get = msg(
        "orders/0/7",
        json!({"url": format!("{base}/people/7?x=1"), "headers": {"x-trace-me": "yes"}}),
    );
    let v = result(&pool.invoke(&get).outcome);
    assert_eq!(v["status"], 200, "{v}");
    assert!(
        v["body"].as_str().unwrap_or_default().contains("/people/7"),
        "{v}"
    );
    let post = msg(
        "orders/0/8",
        json!({"method": "POST", "url": format!("{base}/orders"), "headers": {"content-type": "application/json"}, "body": "{\"n\":1}"}),
    );
    assert_eq!(result(&pool.invoke(&post).outcome)["status"], 200);

    // The same message again (a retry, a redelivery, another process) sends the same key; a
    // second request in one call gets a key of its own.
    let mut retried = get.clone();
    retried.attempt = 2;
    assert_eq!(result(&pool.invoke(&retried).outcome)["status"], 200);
    let twice = msg(
        "orders/0/9",
        json!({"url": format!("{base}/twice"), "repeat": 2}),
    );
    result(&pool.invoke(&twice).outcome);

    let seen = server.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 5, "{seen:#?}");
    let (g, p) = (&seen[0], &seen[1]);
    assert_eq!(
        (g.method.as_str(), g.path.as_str()),
        ("GET", "/people/7?x=1")
    );
    assert_eq!(g.headers["x-trace-me"], "yes");
    assert_eq!(
        (p.method.as_str(), p.path.as_str(), p.body.as_str()),
        ("POST", "/orders", "{\"n\":1}")
    );
    assert_eq!(p.headers["content-type"], "application/json");
    let key = |s: &Seen| {
        s.headers
            .get("idempotency-key")
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(key(g).len(), 32, "{g:?}");
    assert_ne!(key(g), key(p), "two messages, two keys");
    assert_eq!(
        key(&seen[2]),
        key(g),
        "a retry sends the first attempt's key"
    );
    assert_ne!(
        key(&seen[3]),
        key(&seen[4]),
        "each request of a call has its own key"
    );
    for s in &seen {
        let tp = &s.headers["traceparent"];
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"),
            "{tp}"
        );
        assert_ne!(tp, TRACEPARENT, "the request is a span of its own");
    }
    let counts = outbound.expect("grant").stats().counts();
    assert_eq!(
        counts,
        vec![("127.0.0.1".to_owned(), HttpOutcome::Success, 5)]
    );
}

#[test]
fn denied_hosts_internal_addresses_and_redirects_out_never_connect() {
    let _serial = serial();
    let server = serve(None);
    let port = server.addr.port();
    let base = format!("http://127.0.0.1:{port}");

    // Not in the grant at all, and no grant at all.
    let (pool, outbound) = probe(Some(grant(&[&base])), Duration::from_secs(10));
    let v = result(
        &pool
            .invoke(&msg(
                "a",
                json!({"url": format!("http://localhost:{port}/x")}),
            ))
            .outcome,
    );
    assert!(error_of(&v).starts_with("denied:"), "{v}");
    let (ungranted, _) = probe(None, Duration::from_secs(10));
    let inv = ungranted.invoke(&msg("b", json!({"url": format!("{base}/x")})));
    assert!(error_of(&result(&inv.outcome)).starts_with("denied:"));
    assert!(
        inv.logs
            .iter()
            .any(|l| l.message.contains("has no [handlers.<name>.http] grant")),
        "{:?}",
        inv.logs
    );
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);

    // A wildcard reaches a name that resolves to loopback: refused after DNS.
    let (wild, _) = probe(
        Some(grant(&[&format!("http://*:{port}")])),
        Duration::from_secs(10),
    );
    let v = result(
        &wild
            .invoke(&msg(
                "c",
                json!({"url": format!("http://localhost:{port}/x")}),
            ))
            .outcome,
    );
    assert!(error_of(&v).contains("internal address"), "{v}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 0);

    // A redirect is followed by the SDK, through the grant again: the hop out is denied. The
    // host itself never follows one.
    let v = result(
        &pool
            .invoke(&msg("d", json!({"url": format!("{base}/redirect-out")})))
            .outcome,
    );
    assert!(error_of(&v).starts_with("denied:"), "{v}");
    let v = result(
        &pool
            .invoke(&msg("e", json!({"url": format!("{base}/redirect-in")})))
            .outcome,
    );
    assert_eq!(v["status"], 200, "{v}");
    assert!(v["body"].as_str().unwrap_or_default().contains("/landed"));
    let v = result(
        &pool
            .invoke(&msg(
                "f",
                json!({"url": format!("{base}/redirect-in"), "redirects": false}),
            ))
            .outcome,
    );
    assert_eq!(v["status"], 302, "{v}");
    let paths: Vec<String> = server
        .seen
        .lock()
        .expect("seen")
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(
        paths,
        ["/redirect-out", "/redirect-in", "/landed", "/redirect-in"]
    );
    let denied: u64 = outbound
        .expect("grant")
        .stats()
        .counts()
        .iter()
        .filter(|(_, o, _)| *o == HttpOutcome::Denied)
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(denied, 2, "the two denials are counted");
}

#[test]
fn tls_trusts_a_private_ca_only_from_ca_file() {
    let _serial = serial();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
    let server = serve(Some(Arc::new(server_cfg)));
    let url = format!("https://localhost:{}/secure", server.addr.port());
    let entry = format!("https://localhost:{}", server.addr.port());

    let (untrusting, _) = probe(Some(grant(&[&entry])), Duration::from_secs(10));
    let v = result(&untrusting.invoke(&msg("a", json!({"url": url}))).outcome);
    assert!(error_of(&v).contains("TlsCertificateError"), "{v}");

    let dir = tempfile::tempdir().expect("dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("ca file");
    let mut trusting = grant(&[&entry]);
    trusting.ca_file = Some(ca_file);
    let (pool, _) = probe(Some(trusting), Duration::from_secs(10));
    let v = result(&pool.invoke(&msg("b", json!({"url": url}))).outcome);
    assert_eq!(v["status"], 200, "{v}");
}

#[test]
fn a_request_that_does_not_answer_ends_at_the_calls_deadline() {
    let _serial = serial();
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let timeout = Duration::from_millis(300);
    let (pool, _) = probe(Some(grant(&[&base])), timeout);
    for path in ["/hang", "/drip"] {
        let start = Instant::now();
        let inv = pool.invoke(&msg(path, json!({"url": format!("{base}{path}")})));
        let took = start.elapsed();
        assert!(
            matches!(inv.outcome, Outcome::TimedOut { .. }),
            "{path}: {:?}",
            inv.outcome
        );
        assert!(
            took < timeout + Duration::from_millis(50),
            "{path}: ended after {took:?}"
        );
        // The next message on the same pool is handled normally.
        let v = result(
            &pool
                .invoke(&msg("next", json!({"url": format!("{base}/ok")})))
                .outcome,
        );
        assert_eq!(v["status"], 200, "after {path}: {v}");
    }
}

/// A small body of declared length is read with the response's head (one hand-off less per
/// request), so a body that stalls half-way fails the request at the grant's `timeout_ms`, well
/// before the call's deadline, and frees its `max_concurrent` slot for the next request.
#[test]
fn a_small_body_that_stalls_fails_the_request_at_its_timeout() {
    let _serial = serial();
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let mut g = grant(&[&base]);
    g.timeout_ms = 300;
    g.max_concurrent = 1;
    let (pool, _) = probe(Some(g), Duration::from_secs(10));
    let start = Instant::now();
    let v = result(
        &pool
            .invoke(&msg("stall", json!({"url": format!("{base}/stall")})))
            .outcome,
    );
    let took = start.elapsed();
    assert!(error_of(&v).starts_with("timeout:"), "{v}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(800),
        "the stalled request ended after {took:?}"
    );
    // The one slot is free again: the next request goes through at once.
    let v = result(
        &pool
            .invoke(&msg("next", json!({"url": format!("{base}/ok")})))
            .outcome,
    );
    assert_eq!(v["status"], 200, "{v}");
}

/// Waits up to 5 s for `what` to hold, polling (the server's connection count has no event).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_guest_flooding_requests_is_held_to_max_concurrent_and_leaves_nothing_open() {
    let _serial = serial();
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let mut g = grant(&[&base]);
    g.max_concurrent = 2;
    let timeout = Duration::from_millis(500);
    let (pool, _) = probe(Some(g), timeout);
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or_default()
    };
    // Warm: the first call starts wasmtime-wasi's and hyper's threads.
    result(
        &pool
            .invoke(&msg("warm", json!({"url": format!("{base}/ok")})))
            .outcome,
    );
    eventually("the warm-up connection to settle", || {
        server.open.load(Ordering::SeqCst) <= 1
    });
    let baseline = threads();
    let start = Instant::now();
    let inv = pool.invoke(&msg(
        "flood",
        json!({"url": format!("{base}/hang"), "open": 20}),
    ));
    assert!(
        matches!(inv.outcome, Outcome::TimedOut { .. }),
        "{:?}",
        inv.outcome
    );
    assert!(
        start.elapsed() < timeout + Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );
    let hangs = || {
        server
            .seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| s.path == "/hang")
            .count()
    };
    assert_eq!(
        hangs(),
        2,
        "only max_concurrent requests reached the server"
    );
    eventually("the hanging connections to close", || {
        server.open.load(Ordering::SeqCst) <= 1
    });
    assert!(
        threads() <= baseline + 1,
        "threads: {} after, {baseline} before",
        threads()
    );
    assert_eq!(
        hangs(),
        2,
        "the waiting requests were dropped, not sent later"
    );
    let v = result(
        &pool
            .invoke(&msg("after", json!({"url": format!("{base}/ok")})))
            .outcome,
    );
    assert_eq!(v["status"], 200, "{v}");
}

#[test]
fn bodies_over_the_grants_limits_fail_in_the_guest() {
    let _serial = serial();
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let (pool, _) = probe(Some(grant(&[&base])), Duration::from_secs(10));
    let v = result(
        &pool
            .invoke(&msg("big", json!({"url": format!("{base}/big")})))
            .outcome,
    );
    assert!(error_of(&v).starts_with("too_large:"), "{v}");
    let v = result(
        &pool
            .invoke(&msg(
                "up",
                json!({"method": "POST", "url": format!("{base}/up"), "body_bytes": 100_000}),
            ))
            .outcome,
    );
    assert!(error_of(&v).starts_with("too_large:"), "{v}");
    let v = result(
        &pool
            .invoke(&msg("ok", json!({"url": format!("{base}/status/503")})))
            .outcome,
    );
    assert_eq!(v["status"], 503, "{v}");
}

/// `lockgate test` with the shared enrich fixture: stubs answer the requests, expectations
/// check the requests made, and a request without a stub fails its message naming the URL.
#[test]
fn the_enrich_example_passes_the_shared_fixture_on_stubs() {
    let _serial = serial();
    let root = lockgate_tests::workspace_root();
    let wasm = lockgate_tests::guest("enrich");
    let out = lockgate_tests::lockgate(
        &root,
        &[
            "test",
            wasm.to_str().expect("utf-8 path"),
            "--input",
            "tests/fixtures/enrich/input.jsonl",
            "--expect",
            "tests/fixtures/enrich/expected.jsonl",
            "-c",
            "customers_url=https://customers.example.com",
        ],
    );
    let text = lockgate_tests::show(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("expectations: all 5 message(s) match"),
        "{text}"
    );
    assert!(
        text.contains("http GET https://customers.example.com/customers/c-7 -> 200 (stub)"),
        "{text}"
    );
}

/// `--allow-http` lets a request without a stub reach a host it names, and only that host.
#[test]
fn lockgate_test_reaches_the_network_only_through_allow_http() {
    let _serial = serial();
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let dir = tempfile::tempdir().expect("dir");
    let input = dir.path().join("input.jsonl");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            json!({"payload_json": {"url": format!("{base}/live")}}),
            json!({"payload_json": {"url": "http://localhost:1/elsewhere"}}),
        ),
    )
    .expect("input");
    let wasm = lockgate_tests::guest("http-probe");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "test",
            wasm.to_str().expect("utf-8 path"),
            "--input",
            input.to_str().expect("utf-8 path"),
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = lockgate_tests::lockgate(dir.path(), &args);
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON result"))
            .collect();
        (lockgate_tests::show(&out), lines)
    };
    let (text, without) = run(&[]);
    assert_eq!(without.len(), 2, "{text}");
    assert_eq!(without[0]["outcome"], "reject", "{text}");
    assert!(
        without[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("has no stub"),
        "{text}"
    );
    assert!(server.seen.lock().expect("seen").is_empty());

    let (text, with) = run(&["--allow-http", &base]);
    assert_eq!(with[0]["outcome"], "ok", "{text}");
    assert_eq!(with[0]["http"][0]["sent"], true, "{text}");
    assert_eq!(with[1]["outcome"], "reject", "{text}");
    let seen = server.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/live");
}

/// A dependency outage through a running route on the embedded broker: the handler retries,
/// the breaker opens and pauses the source, nothing is dead-lettered; when the dependency is
/// back every order is enriched exactly once, each with the same `Idempotency-Key` on every
/// attempt; a 429 with `Retry-After: 2` holds its message back at least 2 s; and 2,000 messages
/// go over no more connections than requests ever open at once.
#[test]
fn an_outage_opens_the_breaker_and_every_order_is_enriched_once_after_it() {
    let _serial = serial();
    // The server's runtime is its own: made and dropped outside the test's.
    let server = serve(None);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(outage(&server));
}

async fn outage(server: &Server) {
    use lockgate::broker::local::LocalBroker;
    use lockgate::message::OutRecord;

    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"
watch = "off"

[handlers.enrich]
module = "{module}"
config = {{ customers_url = "{base}" }}

[handlers.enrich.http]
allowed_hosts = ["{base}"]
max_concurrent = 4

[routes.orders]
handler = "enrich"
source = {{ topic = "orders" }}
outputs = ["orders.enriched"]
concurrency = 4
ordering = "key"
retry = {{ max_attempts = 1000, initial_backoff_ms = 20, max_backoff_ms = 3000, jitter = "none" }}
circuit_breaker = {{ consecutive_failures = 5, open_ms = 500 }}
"#,
            module = lockgate_tests::guest("enrich").display(),
        ),
    )
    .expect("config");
    // The customer service is down for 5 s from when the orders arrive.
    let rt = lockgate_tests::inproc::start(&config).await;
    let admin = rt.admin();
    let broker = LocalBroker::open(&dir.path().join("state/local")).expect("broker");
    let append = |ids: std::ops::Range<u32>| {
        let records: Vec<OutRecord> = ids
            .map(|i| OutRecord {
                topic: "orders".into(),
                key: Some(format!("o-{i}").into_bytes()),
                headers: Vec::new(),
                payload: json!({"id": format!("o-{i}"), "customer_id": format!("c-{i}")})
                    .to_string()
                    .into_bytes(),
            })
            .collect();
        broker.append(&records).expect("append");
    };
    let down_from = Instant::now();
    *server.down_until.lock().expect("down") = Some(down_from + Duration::from_secs(5));
    append(0..50);
    lockgate_tests::inproc::until("the breaker to open", Duration::from_secs(30), 1, || {
        let (_, page) = lockgate_tests::admin::get(&admin, "/metrics");
        lockgate_tests::admin::sum(&page, "lockgate_breaker_trips_total", "orders") as u64
    })
    .await;
    let enriched = || broker.end_offset("orders.enriched").expect("offset");
    lockgate_tests::inproc::until(
        "every order enriched",
        Duration::from_secs(60),
        50,
        enriched,
    )
    .await;
    assert!(down_from.elapsed() >= Duration::from_secs(5));
    assert_eq!(
        broker.end_offset("orders.dlq").unwrap_or(0),
        0,
        "nothing dead-lettered"
    );
    let (_, page) = lockgate_tests::admin::get(&admin, "/metrics");
    assert!(
        page.contains(r#"outcome="5xx""#) && page.contains("lockgate_http_requests_total"),
        "{page}"
    );

    // Each order once, and each order's requests all carried one key.
    let records = broker.read("orders.enriched", 0, 1000).expect("read");
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.payload).expect("json");
            assert_eq!(
                v["customer"]["name"],
                format!("customer {}", v["customer_id"].as_str().unwrap_or_default())
            );
            v["id"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "each order once");
    let seen = server.seen.lock().expect("seen").clone();
    let mut keys: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for s in &seen {
        keys.entry(s.path.clone()).or_default().insert(
            s.headers
                .get("idempotency-key")
                .cloned()
                .unwrap_or_default(),
        );
    }
    assert_eq!(keys.len(), 50);
    assert!(seen.len() > 50, "the outage made the handler retry");
    for (path, k) in &keys {
        assert_eq!(k.len(), 1, "{path}: one key over every attempt: {k:?}");
    }

    // A 429 with Retry-After: 2 holds its message back at least 2 s.
    let before = enriched();
    let records: Vec<OutRecord> = vec![OutRecord {
        topic: "orders".into(),
        key: None,
        headers: Vec::new(),
        payload: json!({"id": "o-t", "customer_id": "throttled"})
            .to_string()
            .into_bytes(),
    }];
    broker.append(&records).expect("append");
    lockgate_tests::inproc::until(
        "the throttled order",
        Duration::from_secs(30),
        before + 1,
        enriched,
    )
    .await;
    let throttled: Vec<Instant> = server
        .seen
        .lock()
        .expect("seen")
        .iter()
        .filter(|s| s.path == "/customers/throttled")
        .map(|s| s.at)
        .collect();
    assert_eq!(throttled.len(), 2, "a 429, then the retry");
    let gap = throttled[1] - throttled[0];
    assert!(
        gap >= Duration::from_secs(2),
        "retried after {gap:?}, before Retry-After"
    );

    // Pooling: 2,000 more orders reuse the handler's connections.
    let connections = server.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 4,
        "{connections} connections for at most 4 open requests"
    );
    append(1000..3000);
    lockgate_tests::inproc::until(
        "2,000 more orders",
        Duration::from_secs(120),
        before + 2001,
        enriched,
    )
    .await;
    let connections = server.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 4,
        "{connections} connections for at most 4 open requests"
    );
    rt.runtime.stop().await;
}

/// A message redelivered after a SIGKILL in the middle of its request sends the same
/// `Idempotency-Key` from the new process.
#[test]
fn a_redelivery_after_sigkill_sends_the_same_idempotency_key() {
    let _serial = serial();
    use lockgate::broker::local::LocalBroker;
    use lockgate::message::OutRecord;

    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
watch = "off"

[handlers.enrich]
module = "{module}"
timeout_ms = 60000
config = {{ customers_url = "{base}" }}

[handlers.enrich.http]
allowed_hosts = ["{base}"]
timeout_ms = 60000

[routes.orders]
handler = "enrich"
source = {{ topic = "orders" }}
outputs = ["orders.enriched"]
"#,
            module = lockgate_tests::guest("enrich").display(),
        ),
    )
    .expect("config");
    {
        let broker = LocalBroker::open(&dir.path().join("state/local")).expect("broker");
        broker
            .append(&[OutRecord {
                topic: "orders".into(),
                key: None,
                headers: Vec::new(),
                payload: br#"{"id":"o-k","customer_id":"held"}"#.to_vec(),
            }])
            .expect("append");
    }
    let held = || {
        server
            .seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| s.path == "/customers/held")
            .map(|s| {
                s.headers
                    .get("idempotency-key")
                    .cloned()
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
    };
    let mut first = lockgate_tests::start_run(dir.path(), &config, 1, None, "warn");
    lockgate_tests::wait_for_progress(
        &mut first,
        dir.path(),
        1,
        1,
        Duration::from_secs(60),
        Duration::from_millis(20),
        || held().len() as u64,
    );
    lockgate_tests::signal(&first, "KILL");
    let _ = first.wait();
    let mut second = lockgate_tests::start_run(dir.path(), &config, 2, None, "warn");
    lockgate_tests::wait_for_progress(
        &mut second,
        dir.path(),
        2,
        2,
        Duration::from_secs(60),
        Duration::from_millis(20),
        || held().len() as u64,
    );
    lockgate_tests::stop_run(&mut second, dir.path(), 2);
    let keys = held();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0].len(), 32, "{keys:?}");
    assert_eq!(
        keys[0], keys[1],
        "the redelivery sends the first attempt's key"
    );
}
