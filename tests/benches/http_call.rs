//! Outbound HTTP from a handler against the same work done natively, measured in one run.
//!
//! 1. Per request: the `enrich` guest on a reused instance (a call that parses the order, GETs
//!    its customer from a local server, and publishes the enriched order) vs a native hyper
//!    client doing the same GET, JSON work and output. Ratio: guest / native time per request
//!    (target ≤ 1.5×).
//! 2. A route: `enrich` on the embedded broker (4 lanes) vs a native Rust program doing the same
//!    job (read the topic, 4 requests at a time, append the enriched orders). Ratio: route /
//!    native throughput (target ≥ 0.6). Both arms first handle [`WARM_UP`] orders (the route's
//!    start, which compiles the guest, and the first connections are not throughput), then are
//!    timed from appending [`ORDERS`] orders to the last one enriched.
//!
//! Run: `cargo bench -p lockgate-tests --bench http_call`. Arms are interleaved over rounds;
//! the table shows the median with the min-max spread. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use lockgate::broker::local::LocalBroker;
use lockgate::config::Isolation;
use lockgate::config::http::{AllowedHost, HttpGrant};
use lockgate::engine::outbound::Outbound;
use lockgate::engine::{HandlerLimits, InboundMessage, Outcome};
use lockgate::message::OutRecord;
use lockgate_tests::{guest, guest_pool, handler_env, median_spread};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const CALLS: u32 = 2_000;
const ORDERS: u32 = 10_000;
/// Orders each throughput arm handles before it is timed.
const WARM_UP: u32 = 200;

/// A customer service on 127.0.0.1: `/customers/<id>` answers a small JSON document.
fn serve(rt: &tokio::runtime::Runtime) -> SocketAddr {
    lockgate_tests::http_server::serve(rt, |_| {
        |req: hyper::Request<hyper::body::Incoming>| async move {
            let id = req
                .uri()
                .path()
                .trim_start_matches("/customers/")
                .to_owned();
            let body = json!({"id": id, "name": format!("customer {id}"), "tier": "gold"});
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        }
    })
}

type Native = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// What the guest does for one order, natively.
async fn enrich_native(client: &Native, base: &str, payload: &[u8]) -> Vec<u8> {
    let mut order: Value = serde_json::from_slice(payload).unwrap();
    let id = order["customer_id"].as_str().unwrap().to_owned();
    let uri: hyper::Uri = format!("{base}/customers/{id}").parse().unwrap();
    let response = client
        .request(
            hyper::Request::get(uri)
                .header("accept", "application/json")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(response.status().is_success());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    order["customer"] = serde_json::from_slice(&body).unwrap();
    order.to_string().into_bytes()
}

fn order(i: u32) -> Vec<u8> {
    json!({"id": format!("o-{i}"), "customer_id": format!("c-{i}"), "total": 12.5})
        .to_string()
        .into_bytes()
}

fn main() {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = serve(&server_rt);
    let base = format!("http://127.0.0.1:{}", addr.port());
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let native: Native =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let grant = HttpGrant {
        allowed_hosts: vec![AllowedHost::parse(&base).unwrap()],
        timeout_ms: 5_000,
        max_request_bytes: 1 << 20,
        max_response_bytes: 1 << 20,
        max_concurrent: 16,
        ca_file: None,
        idempotency_header: Some("Idempotency-Key".into()),
    };
    let mut env = handler_env(
        "enrich",
        &[("customers_url", &base)],
        HandlerLimits::default(),
    );
    env.http = Some(Arc::new(Outbound::new(grant).unwrap()));
    let pool = guest_pool("enrich", true, Isolation::Reuse, env);
    let message = |i: u32| InboundMessage {
        id: format!("orders/0/{i}"),
        topic: "orders".into(),
        payload: order(i),
        attempt: 1,
        ..InboundMessage::default()
    };

    // 1. Per request. `HTTP_CALL_ONLY=guest` (or `native`) runs that arm alone and stops, to
    // profile one side (`perf stat`, `perf record`); `=route` runs only the route's rounds.
    let only = std::env::var("HTTP_CALL_ONLY").ok();
    if only.as_deref() == Some("route") {
        for round in 0..3 {
            println!("route: {:.0} orders/s", route_round(&base, round));
        }
        return;
    }
    let (mut guest_ns, mut native_ns) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        // As the pipeline calls it, and as the native arm runs: awaited on the client runtime.
        let start = Instant::now();
        client_rt.block_on(async {
            for i in 0..CALLS {
                if only.as_deref() == Some("native") {
                    break;
                }
                let inv = pool
                    .invoke_async(message(i), lockgate::engine::Staging::Direct)
                    .await;
                assert!(
                    matches!(inv.outcome, Outcome::Ok { .. }),
                    "{:?}",
                    inv.outcome
                );
            }
        });
        guest_ns.push(start.elapsed().as_nanos() as f64 / f64::from(CALLS));
        if only.as_deref() == Some("guest") {
            continue;
        }
        let start = Instant::now();
        client_rt.block_on(async {
            for i in 0..CALLS {
                std::hint::black_box(enrich_native(&native, &base, &order(i)).await);
            }
        });
        native_ns.push(start.elapsed().as_nanos() as f64 / f64::from(CALLS));
    }
    if only.is_some() {
        println!("guest ns/request: {guest_ns:?}\nnative ns/request: {native_ns:?}");
        return;
    }
    let (g, gmin, gmax) = median_spread(&guest_ns);
    let (n, nmin, nmax) = median_spread(&native_ns);
    println!("| arm | µs per request (median, min-max over {ROUNDS} rounds) |");
    println!("|---|---|");
    println!(
        "| guest (`enrich`, reused instance) | {:.1} ({:.1}-{:.1}) |",
        g / 1e3,
        gmin / 1e3,
        gmax / 1e3
    );
    println!(
        "| native hyper client, same work | {:.1} ({:.1}-{:.1}) |",
        n / 1e3,
        nmin / 1e3,
        nmax / 1e3
    );
    println!(
        "| **ratio guest / native** | **{:.2}×** (target ≤ 1.5×) |",
        g / n
    );

    // 2. A route against a native consumer, on the embedded broker.
    let (mut route_rate, mut native_rate) = (Vec::new(), Vec::new());
    for round in 0..3 {
        route_rate.push(route_round(&base, round));
        native_rate.push(native_round(&client_rt, &native, &base, round));
    }
    let (r, rmin, rmax) = median_spread(&route_rate);
    let (n, nmin, nmax) = median_spread(&native_rate);
    println!();
    println!("| arm | orders/s (median, min-max over 3 rounds of {ORDERS}) |");
    println!("|---|---|");
    println!("| route: `enrich` on the embedded broker, 4 lanes | {r:.0} ({rmin:.0}-{rmax:.0}) |");
    println!("| native: read, 4 requests at a time, append | {n:.0} ({nmin:.0}-{nmax:.0}) |");
    println!(
        "| **ratio route / native** | **{:.2}** (target ≥ 0.6) |",
        r / n
    );
}

/// Appends orders `from..to` to `orders`.
fn append_orders(broker: &LocalBroker, from: u32, to: u32) {
    let records: Vec<OutRecord> = (from..to)
        .map(|i| OutRecord {
            topic: "orders".into(),
            key: Some(format!("o-{i}").into_bytes()),
            headers: Vec::new(),
            payload: order(i),
        })
        .collect();
    broker.append(&records).unwrap();
}

/// Orders per second through a `lockgate` route.
fn route_round(base: &str, round: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
watch = "off"

[handlers.enrich]
module = "{module}"
config = {{ customers_url = "{base}" }}

[handlers.enrich.http]
allowed_hosts = ["{base}"]

[routes.orders]
handler = "enrich"
source = {{ topic = "orders" }}
outputs = ["orders.enriched"]
concurrency = 4
ordering = "key"
"#,
            module = guest("enrich").display(),
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
        append_orders(&broker, 0, WARM_UP);
        let inproc = lockgate_tests::inproc::start(&config).await;
        let enriched = || broker.end_offset("orders.enriched").unwrap();
        let limit = Duration::from_secs(300);
        lockgate_tests::inproc::until(&format!("warm-up {round}"), limit, WARM_UP.into(), enriched)
            .await;
        let start = Instant::now();
        append_orders(&broker, WARM_UP, WARM_UP + ORDERS);
        let total = u64::from(WARM_UP + ORDERS);
        lockgate_tests::inproc::until(&format!("round {round}"), limit, total, enriched).await;
        let rate = f64::from(ORDERS) / start.elapsed().as_secs_f64();
        inproc.runtime.stop().await;
        rate
    })
}

/// Orders per second of a native program doing the route's job.
fn native_round(rt: &tokio::runtime::Runtime, client: &Native, base: &str, _round: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(LocalBroker::open(&dir.path().join("local")).unwrap());
    // Handles the orders from offset `from` up to `to`; answers the next offset.
    let run = |to: u32, mut from: u64| {
        rt.block_on(async {
            while from < u64::from(to) {
                let batch = broker.read("orders", from, 64).unwrap();
                let Some(last) = batch.last().and_then(|r| r.offset) else {
                    tokio::task::yield_now().await;
                    continue;
                };
                from = last + 1;
                // 4 at a time, like the route's 4 lanes.
                for chunk in batch.chunks(4) {
                    let outputs = futures_util::future::join_all(
                        chunk
                            .iter()
                            .map(|r| enrich_native(client, base, &r.payload)),
                    )
                    .await;
                    let records: Vec<OutRecord> = chunk
                        .iter()
                        .zip(outputs)
                        .map(|(r, payload)| OutRecord {
                            topic: "orders.enriched".into(),
                            key: r.key.clone(),
                            headers: Vec::new(),
                            payload,
                        })
                        .collect();
                    broker.append(&records).unwrap();
                }
            }
            from
        })
    };
    append_orders(&broker, 0, WARM_UP);
    let next = run(WARM_UP, 0);
    let start = Instant::now();
    append_orders(&broker, WARM_UP, WARM_UP + ORDERS);
    run(WARM_UP + ORDERS, next);
    f64::from(ORDERS) / start.elapsed().as_secs_f64()
}
