//! The HTTP helpers of the Python and JavaScript SDKs (docs/handlers/http.md), through their
//! `enrich` examples (`guest-examples/python/enrich`, `guest-examples/js/enrich`), built by
//! `lockgate build` and run by the engine against a real HTTP server on 127.0.0.1 started by the
//! test: a customer found is added to the order, an outage (503 with `Retry-After`) retries no
//! sooner than the server asked, a missing customer (404) rejects, a redirect is followed and a
//! redirect out of the grant is denied, and every request carries the host's idempotency key.
//! The JavaScript helper runs on StarlingMonkey: the QuickJS toolchain cannot build a component
//! that imports wasi:http, which `a_quickjs_handler_that_uses_http_is_refused_with_the_reason`
//! pins down.

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
use lockgate_tests::{handler_env, lockgate_bin, show, workspace_root};
use serde_json::{Value, json};

mod guest_lang;

/// The path and headers of one request the customer service saw.
type Seen = (String, BTreeMap<String, String>);

/// The customer service: `/customers/<id>` by id (`c-ok` found, `c-down` 503 with
/// `Retry-After: 2`, `c-missing` 404, `c-moved` a redirect to `c-ok`, `c-away` a redirect to
/// `localhost`, which the grant does not name); it records the headers of every request.
struct Customers {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

fn respond(path: &str, port: u16) -> hyper::Response<Full<Bytes>> {
    let b = hyper::Response::builder();
    let (b, body) = match path {
        "/customers/c-ok" => (
            b.header("content-type", "application/json"),
            json!({"id": "c-ok", "name": "Ada"}).to_string(),
        ),
        "/customers/c-down" => (b.status(503).header("retry-after", "2"), "down".into()),
        "/customers/c-moved" => (
            b.status(302).header("location", "/customers/c-ok"),
            String::new(),
        ),
        "/customers/c-away" => (
            b.status(302).header(
                "location",
                format!("http://localhost:{port}/customers/c-ok"),
            ),
            String::new(),
        ),
        _ => (b.status(404), "no such customer".into()),
    };
    b.body(Full::new(Bytes::from(body))).expect("response")
}

fn customers() -> Customers {
    let rt = lockgate_tests::http_server::runtime();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = lockgate_tests::http_server::serve(&rt, |addr| {
        move |req: hyper::Request<hyper::body::Incoming>| {
            let seen = s.clone();
            async move {
                let (parts, body) = req.into_parts();
                let _ = body.collect().await;
                let headers = parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                seen.lock()
                    .expect("seen")
                    .push((parts.uri.path().to_owned(), headers));
                respond(parts.uri.path(), addr.port())
            }
        }
    });
    Customers {
        addr,
        seen,
        _rt: rt,
    }
}

/// `wasm` as handler `enrich` with `customers_url = base` and a grant for `base` only.
fn enrich(wasm: &Path, base: &str) -> InstancePool {
    let mut env = handler_env(
        "enrich",
        &[("customers_url", base)],
        HandlerLimits {
            timeout: Duration::from_secs(20),
            ..HandlerLimits::default()
        },
    );
    env.http = Some(Arc::new(
        Outbound::new(HttpGrant {
            allowed_hosts: vec![AllowedHost::parse(base).expect("entry")],
            timeout_ms: 5_000,
            max_request_bytes: 64 * 1024,
            max_response_bytes: 1024 * 1024,
            max_concurrent: 4,
            ca_file: None,
            idempotency_header: Some("Idempotency-Key".into()),
        })
        .expect("client"),
    ));
    let engine = Engine::new(&EngineSettings::default()).expect("engine");
    let handler = engine.load_handler(wasm, env).expect("the component loads");
    InstancePool::new(handler, Isolation::Reuse, u64::MAX)
}

fn order(customer: &str) -> InboundMessage {
    InboundMessage {
        id: format!("orders/0/{customer}"),
        topic: "orders".into(),
        key: Some(b"k-1".to_vec()),
        payload: json!({"id": "o-1", "customer_id": customer})
            .to_string()
            .into_bytes(),
        attempt: 1,
        ..InboundMessage::default()
    }
}

/// Runs every case through the enrich handler at `wasm`.
fn enriches_orders(wasm: &Path) {
    let server = customers();
    let base = format!("http://127.0.0.1:{}", server.addr.port());
    let pool = enrich(wasm, &base);

    // Found: the order gets its customer, on the default target, with its key.
    for customer in ["c-ok", "c-moved"] {
        match pool.invoke(&order(customer)).outcome {
            Outcome::Ok { outputs } => {
                assert_eq!(outputs.len(), 1);
                assert_eq!(outputs[0].topic, "orders.enriched");
                assert_eq!(outputs[0].key.as_deref(), Some(&b"k-1"[..]));
                let got: Value = serde_json::from_slice(&outputs[0].payload).expect("JSON");
                assert_eq!(
                    got,
                    json!({"id": "o-1", "customer_id": customer, "customer": {"id": "c-ok", "name": "Ada"}}),
                    "{customer}"
                );
            }
            other => panic!("{customer}: expected ok, got {other:?}"),
        }
    }
    let seen = server.seen.lock().expect("seen").clone();
    let paths: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/customers/c-ok", "/customers/c-moved", "/customers/c-ok"],
        "the redirect is followed"
    );
    for (path, headers) in &seen {
        let key = headers.get("idempotency-key").map(String::as_str);
        assert!(
            key.is_some_and(|k| k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit())),
            "{path}: {headers:?}"
        );
        assert_eq!(
            headers.get("accept").map(String::as_str),
            Some("application/json")
        );
    }

    // An outage retries, no sooner than the server asked.
    match pool.invoke(&order("c-down")).outcome {
        Outcome::Retry { reason, after } => {
            assert!(reason.contains("HTTP 503"), "{reason}");
            assert!(
                after.is_some_and(|a| a >= Duration::from_secs(2)),
                "{after:?}"
            );
        }
        other => panic!("c-down: expected retry, got {other:?}"),
    }
    // No such customer: rejected, nothing published.
    match pool.invoke(&order("c-missing")).outcome {
        Outcome::Rejected { reason } => assert!(reason.contains("HTTP 404"), "{reason}"),
        other => panic!("c-missing: expected reject, got {other:?}"),
    }
    // A redirect to a host outside the grant is denied, and never reaches it.
    let before = server.seen.lock().expect("seen").len();
    match pool.invoke(&order("c-away")).outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("denied"), "{reason}");
            assert!(reason.contains("localhost"), "{reason}");
        }
        other => panic!("c-away: expected reject, got {other:?}"),
    }
    assert_eq!(
        server.seen.lock().expect("seen").len(),
        before + 1,
        "only the first hop reached the server"
    );
}

#[test]
fn python_enrich_adds_the_customer_retries_an_outage_and_rejects_a_missing_one() {
    enriches_orders(&guest_lang::build("python", "enrich"));
}

#[test]
fn js_enrich_adds_the_customer_retries_an_outage_and_rejects_a_missing_one() {
    enriches_orders(&guest_lang::build_with("js", "enrich", "starlingmonkey"));
}

#[test]
fn python_enrich_passes_the_shared_fixture_on_stubs() {
    guest_lang::enrich_matches_fixture("python");
}

#[test]
fn js_enrich_passes_the_shared_fixture_on_stubs() {
    guest_lang::enrich_matches_fixture("js");
}

#[test]
fn a_quickjs_handler_that_uses_http_is_refused_with_the_reason() {
    let dir = workspace_root().join("guest-examples/js/enrich");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(lockgate_bin())
        .arg("build")
        .arg(&dir)
        .arg("-o")
        .arg(out_dir.path().join("enrich.wasm"))
        .args(["--js-backend", "qjs"])
        .output()
        .expect("lockgate build runs");
    assert!(!out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--js-backend starlingmonkey"),
        "{}",
        show(&out)
    );
}
