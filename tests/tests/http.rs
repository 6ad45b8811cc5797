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

/// What the server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: String,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    port: u16,
) -> hyper::Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    seen.lock().expect("seen").push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    let mut builder = hyper::Response::builder();
    let body = match path.as_str() {
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
    let (s, c) = (seen.clone(), connections.clone());
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (seen, tls) = (s.clone(), tls.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(respond(req, seen, addr.port()).await) }
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
    let server = serve(None);
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let (pool, outbound) = probe(Some(grant(&[&base])), Duration::from_secs(10));

    let get = msg(
        "orders/0/7",
        json!({"url": format!("{base}/customers/7?x=1"), "headers": {"x-trace-me": "yes"}}),
    );
    let v = result(&pool.invoke(&get).outcome);
    assert_eq!(v["status"], 200, "{v}");
    assert!(
        v["body"]
            .as_str()
            .unwrap_or_default()
            .contains("/customers/7"),
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
        ("GET", "/customers/7?x=1")
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

#[test]
fn bodies_over_the_grants_limits_fail_in_the_guest() {
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
