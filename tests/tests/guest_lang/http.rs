//! Outbound HTTP through the SDK helper of another language, against a real HTTP server on
//! 127.0.0.1 through the engine with a grant (docs/handlers/http.md):
//!
//! - the `enrich` example (guest-examples/<lang>/enrich, built by `lockgate build`) next to the
//!   Rust example (guest-examples/enrich) on the same messages: the same output, and the same
//!   retry and reject decisions;
//! - the `http-probe` instrument (guest-examples/<lang>/http-probe): request bodies, redirects
//!   (303 to GET, credentials dropped across origins, not following), error kinds.
//!
//! A private copy of the small hyper server of tests/tests/http.rs, with the answers of a
//! customer service and a few redirects.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use lockgate::config::Isolation;
use lockgate::config::http::{AllowedHost, HttpGrant};
use lockgate::engine::outbound::Outbound;
use lockgate::engine::{
    Engine, EngineSettings, HandlerLimits, InboundMessage, InstancePool, Outcome,
};
use lockgate_tests::{guest, handler_env};
use serde_json::{Value, json};

/// What the server saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// The customer service: `/customers/c-7` is a customer, `/customers/moved` redirects to it,
/// `/customers/down` answers 503 with `Retry-After: 2`, `/customers/slow-down` 429 without one.
/// For the probe: `/echo` and `/landed` answer 200, `/see-other` is a 303 to `/landed`,
/// `/moved-cross` a 302 to `/landed` on `localhost` (another origin). Anything else is a 404.
pub struct Server {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

/// The customer `c-7`, with values a careless encoder would change (a float, a nested object, a
/// unicode escape, a big integer).
pub const CUSTOMER: &str = r#"{"name":"Ada \u00e9","tier":2,"score":0.5,"address":{"city":"Gent","zip":"9000"},"tags":["vip",null,true],"id":12345678901234}"#;

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    port: u16,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    seen.lock().expect("seen").push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body,
    });
    let b = hyper::Response::builder();
    let cross = format!("http://localhost:{port}/landed");
    let (b, body) = match parts.uri.path() {
        "/customers/c-7" => (b.header("content-type", "application/json"), CUSTOMER),
        "/customers/moved" => (b.status(302).header("location", "/customers/c-7"), ""),
        "/customers/down" => (b.status(503).header("retry-after", "2"), "maintenance"),
        "/customers/slow-down" => (b.status(429), "too many"),
        "/echo" => (b, "echoed"),
        "/landed" => (b, "landed"),
        "/see-other" => (b.status(303).header("location", "/landed"), ""),
        "/moved-cross" => (b.status(302).header("location", cross), ""),
        _ => (b.status(404), "no such customer"),
    };
    b.body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("response")
}

/// Starts the server on 127.0.0.1:0.
pub fn serve() -> Server {
    let rt = lockgate_tests::http_server::runtime();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = lockgate_tests::http_server::serve(&rt, |addr| {
        move |req| respond(req, s.clone(), addr.port())
    });
    Server {
        addr,
        seen,
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

/// The component at `wasm` with `config`, allowed to reach `allowed`.
fn pool(wasm: &Path, config: &[(&str, &str)], allowed: &[&str]) -> InstancePool {
    let mut env = handler_env(
        "enrich",
        config,
        HandlerLimits {
            timeout: Duration::from_secs(10),
            ..HandlerLimits::default()
        },
    );
    env.http = Some(Arc::new(Outbound::new(grant(allowed)).expect("client")));
    let engine = Engine::new(&EngineSettings::default()).expect("engine");
    let handler = engine.load_handler(wasm, env).expect("component loads");
    InstancePool::new(handler, Isolation::Reuse, u64::MAX)
}

fn order(id: &str, customer_id: &str) -> InboundMessage {
    InboundMessage {
        id: id.to_owned(),
        topic: "orders".into(),
        key: Some(b"k-1".to_vec()),
        payload: json!({"id": id, "customer_id": customer_id, "total": 12.5, "lines": [{"sku": "a", "n": 2}]})
            .to_string()
            .into_bytes(),
        attempt: 1,
        ..InboundMessage::default()
    }
}

/// (topic, key, payload as JSON) of the one output of an ok call.
fn output(outcome: &Outcome) -> (String, Option<Vec<u8>>, Value) {
    match outcome {
        Outcome::Ok { outputs } => {
            assert_eq!(outputs.len(), 1, "{outputs:?}");
            let o = &outputs[0];
            let v = serde_json::from_slice(&o.payload).unwrap_or_else(|e| {
                panic!(
                    "output is not JSON ({e}): {}",
                    String::from_utf8_lossy(&o.payload)
                )
            });
            (o.topic.clone(), o.key.clone(), v)
        }
        other => panic!("expected ok, got {other:?}"),
    }
}

/// The WASI interfaces the component at `wasm` imports (`wasi:io/streams@0.2.12`).
fn wasi_imports(wasm: &Path) -> Vec<String> {
    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::from_file(&engine, wasm).expect("component");
    component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| name.starts_with("wasi:"))
        .collect()
}

/// Builds `guest-examples/<lang>/enrich` and checks it against the server and the Rust example.
pub fn enrich_behaves_like_the_rust_example(lang: &str) {
    let wasm = super::guest_lang::build(lang, "enrich");
    // One minor per WASI package (the host's), and wasi:http only where the SDK's helper is used.
    let imports = wasi_imports(&wasm);
    assert!(
        imports
            .iter()
            .any(|i| i == "wasi:http/outgoing-handler@0.2.12"),
        "{imports:?}"
    );
    assert!(
        imports.iter().all(|i| i.ends_with("@0.2.12")),
        "{imports:?}"
    );
    let router = wasi_imports(&super::guest_lang::build(lang, "router"));
    assert!(
        !router.iter().any(|i| i.starts_with("wasi:http/")),
        "the router does not use HTTP: {router:?}"
    );
    let server = serve();
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let config = [("customers_url", base.as_str())];
    let ours = pool(&wasm, &config, &[&base]);
    let rust = pool(&guest("enrich"), &config, &[&base]);

    // 200: the order goes out with its customer, on the default topic, with its key; exactly
    // what the Rust example publishes.
    let (topic, key, v) = output(&ours.invoke(&order("o-1", "c-7")).outcome);
    assert_eq!(topic, "orders.enriched");
    assert_eq!(key.as_deref(), Some(&b"k-1"[..]));
    let customer: Value = serde_json::from_str(CUSTOMER).expect("customer");
    assert_eq!(v["customer"], customer, "{v}");
    assert_eq!(v["total"], 12.5, "{v}");
    let (rust_topic, rust_key, rust_v) = output(&rust.invoke(&order("o-1", "c-7")).outcome);
    assert_eq!((topic, key, &v), (rust_topic, rust_key, &rust_v));

    // `target` names the topic.
    let targeted = pool(
        &wasm,
        &[
            ("customers_url", &format!("{base}/")),
            ("target", "enriched"),
        ],
        &[&base],
    );
    let (topic, _, tv) = output(&targeted.invoke(&order("o-2", "c-7")).outcome);
    assert_eq!(topic, "enriched");
    assert_eq!(tv["customer"], customer);

    // A redirect is followed (through the grant again) to the customer.
    let (_, _, mv) = output(&ours.invoke(&order("o-8", "moved")).outcome);
    assert_eq!(mv["customer"], customer, "{mv}");

    // An outage retries, not before the server's Retry-After; a 429 retries too.
    match ours.invoke(&order("o-3", "down")).outcome {
        Outcome::Retry { reason, after } => {
            assert!(
                after.is_some_and(|a| a >= Duration::from_secs(2)),
                "{after:?}"
            );
            assert!(reason.contains("503"), "{reason}");
        }
        other => panic!("503: expected retry, got {other:?}"),
    }
    assert!(
        matches!(
            ours.invoke(&order("o-4", "slow-down")).outcome,
            Outcome::Retry { .. }
        ),
        "429 retries"
    );
    // A missing customer rejects.
    match ours.invoke(&order("o-5", "nobody")).outcome {
        Outcome::Rejected { reason } => assert!(reason.contains("404"), "{reason}"),
        other => panic!("404: expected rejected, got {other:?}"),
    }

    // The server saw every GET (two for the redirect), each with the host's idempotency key (a
    // different one per message) and the handler's accept header.
    let seen = server.seen.lock().expect("seen").clone();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/customers/c-7",
            "/customers/c-7",
            "/customers/c-7",
            "/customers/moved",
            "/customers/c-7",
            "/customers/down",
            "/customers/slow-down",
            "/customers/nobody"
        ]
    );
    for s in &seen {
        assert_eq!(s.method, "GET");
        let key = s.headers.get("idempotency-key").map_or("", String::as_str);
        assert!(
            key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()),
            "{s:?}"
        );
        assert_eq!(
            s.headers.get("accept").map(String::as_str),
            Some("application/json")
        );
    }
    assert_ne!(
        seen[0].headers["idempotency-key"],
        seen[5].headers["idempotency-key"]
    );
    let count = seen.len();

    // A service outside the grant: rejected with the denial, and nothing reaches the server.
    let outside = format!("http://localhost:{}", server.addr.port());
    let denied = pool(&wasm, &[("customers_url", outside.as_str())], &[&base]);
    match denied.invoke(&order("o-6", "c-7")).outcome {
        Outcome::Rejected { reason } => assert!(
            reason.contains("denied") && reason.contains("allowed_hosts"),
            "{reason}"
        ),
        other => panic!("outside the grant: expected rejected, got {other:?}"),
    }
    assert_eq!(server.seen.lock().expect("seen").len(), count);

    // A service that is down (nothing listens on the port): a connection failure retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_url = format!(
        "http://127.0.0.1:{}",
        closed.local_addr().expect("addr").port()
    );
    drop(closed);
    let down = pool(
        &wasm,
        &[("customers_url", closed_url.as_str())],
        &[&closed_url],
    );
    match down.invoke(&order("o-7", "c-7")).outcome {
        Outcome::Retry { reason, .. } => assert!(reason.contains("connection"), "{reason}"),
        other => panic!("connection refused: expected retry, got {other:?}"),
    }
}

/// (status, error kind, payload) the probe published for `spec`.
fn probe(pool: &InstancePool, id: &str, spec: Value) -> (String, String, String) {
    let msg = InboundMessage {
        id: id.to_owned(),
        topic: "probe".into(),
        payload: spec.to_string().into_bytes(),
        attempt: 1,
        ..InboundMessage::default()
    };
    match pool.invoke(&msg).outcome {
        Outcome::Ok { outputs } => {
            let header = |name: &str| {
                outputs[0]
                    .headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            (
                header("status"),
                header("error"),
                String::from_utf8_lossy(&outputs[0].payload).into_owned(),
            )
        }
        other => panic!("{spec}: expected ok, got {other:?}"),
    }
}

/// Builds `guest-examples/<lang>/http-probe` and checks what its requests look like on the wire.
pub fn probe_sends_bodies_and_follows_redirects_like_the_rust_helper(lang: &str) {
    let wasm = super::guest_lang::build(lang, "http-probe");
    let server = serve();
    let port = server.addr.port();
    let base = format!("http://127.0.0.1:{port}");
    let other = format!("http://localhost:{port}");
    let pool = pool(&wasm, &[], &[&base, &other]);
    let seen = |from: usize| server.seen.lock().expect("seen")[from..].to_vec();
    let pattern: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();

    // A body over several 4 KiB writes arrives whole, with its length and the handler's headers.
    let got = probe(
        &pool,
        "post",
        json!({"method": "POST", "url": format!("{base}/echo"), "auth": "secret", "body_bytes": 10_000}),
    );
    assert_eq!(got, ("200".into(), String::new(), "echoed".into()));
    let s = &seen(0)[0];
    assert_eq!((s.method.as_str(), s.path.as_str()), ("POST", "/echo"));
    assert!(
        s.body == pattern,
        "the body arrived as {} bytes",
        s.body.len()
    );
    assert_eq!(s.headers["content-length"], "10000");
    assert_eq!(s.headers["content-type"], "text/plain");
    assert_eq!(s.headers["authorization"], "secret");
    assert_eq!(s.headers["x-keep"], "1");

    // A POST answered 303 becomes a GET without body or content-type; same origin keeps the
    // credentials.
    let got = probe(
        &pool,
        "see-other",
        json!({"method": "POST", "url": format!("{base}/see-other"), "auth": "secret", "body_bytes": 100}),
    );
    assert_eq!(got, ("200".into(), String::new(), "landed".into()));
    let hops = seen(1);
    assert_eq!(hops.len(), 2, "{hops:#?}");
    assert_eq!((hops[0].method.as_str(), hops[0].body.len()), ("POST", 100));
    assert_eq!(
        (hops[1].method.as_str(), hops[1].path.as_str()),
        ("GET", "/landed")
    );
    assert!(hops[1].body.is_empty());
    assert!(!hops[1].headers.contains_key("content-type"), "{hops:#?}");
    assert_eq!(hops[1].headers["authorization"], "secret");

    // A redirect to another origin drops Authorization and keeps the rest.
    let got = probe(
        &pool,
        "cross",
        json!({"url": format!("{base}/moved-cross"), "auth": "secret"}),
    );
    assert_eq!(got.0, "200");
    let hops = seen(3);
    assert_eq!(hops.len(), 2, "{hops:#?}");
    assert_eq!(hops[0].headers["authorization"], "secret");
    assert_eq!(hops[1].headers["host"], format!("localhost:{port}"));
    assert!(!hops[1].headers.contains_key("authorization"), "{hops:#?}");
    assert_eq!(hops[1].headers["x-keep"], "1");

    // Not following returns the 3xx itself.
    let got = probe(
        &pool,
        "no-follow",
        json!({"url": format!("{base}/customers/moved"), "redirects": false}),
    );
    assert_eq!(got.0, "302");
    assert_eq!(seen(5).len(), 1);

    // A host outside the grant is a denial, and nothing reaches the server.
    let got = probe(
        &pool,
        "outside",
        json!({"url": format!("http://127.0.0.2:{port}/echo")}),
    );
    assert_eq!((got.0.as_str(), got.1.as_str()), ("0", "denied"), "{got:?}");
    assert!(got.2.contains("allowed_hosts"), "{got:?}");
    assert_eq!(seen(6).len(), 0);
}
