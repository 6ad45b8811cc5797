//! Route behaviour on the in-memory broker with native handlers and tokio's paused clock.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::config::Config;
use crate::dlq;
use crate::engine::{Invocation, Outcome, OutgoingMessage};
use crate::message::{LOCKGATE_ID_HEADER, OutRecord};
use crate::pipeline::shutdown::ShutdownTrigger;
use crate::state::{Claim, ClaimRequest, Commit, LocalClaims, MemoryStore};

/// A handler written as a Rust closure.
struct FnInvoker<F>(F);

impl<F> Invoker for FnInvoker<F>
where
    F: Fn(&InboundMessage) -> Outcome + Send + Sync + 'static,
{
    fn invoke(&self, message: &InboundMessage) -> Invocation {
        Invocation::without_guest((self.0)(message))
    }

    fn handler_name(&self) -> String {
        "h".into()
    }

    fn module_hash(&self) -> String {
        "cafe".into()
    }
}

fn ok_to(topic: &str, payload: Vec<u8>) -> Outcome {
    Outcome::Ok {
        outputs: vec![OutgoingMessage {
            topic: topic.into(),
            payload,
            ..OutgoingMessage::default()
        }],
    }
}

fn retry(reason: &str) -> Outcome {
    Outcome::Retry {
        reason: reason.into(),
        after: None,
    }
}

fn route_config(extra: &str) -> RouteConfig {
    let text = format!(
        "[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = {{ topic = \"in\" }}\noutputs = [\"out\"]\n{extra}"
    );
    Config::parse(Path::new("rt.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .routes["r"]
        .clone()
}

fn msg(payload: &str, key: Option<&str>, headers: &[(&str, &str)]) -> OutRecord {
    OutRecord {
        topic: "in".into(),
        key: key.map(|k| k.as_bytes().to_vec()),
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect(),
        payload: payload.as_bytes().to_vec(),
    }
}

struct Running {
    trigger: ShutdownTrigger,
    task: JoinHandle<RouteReport>,
    stats: Arc<RouteStats>,
}

fn memory_keys() -> DoneKeys {
    DoneKeys::new(
        Arc::new(LocalClaims::new(Arc::new(MemoryStore::new()))),
        "r",
        Duration::from_secs(3600),
        Duration::from_secs(30),
    )
}

impl Running {
    async fn stop(self) -> RouteReport {
        self.trigger.trigger();
        self.task.await.unwrap()
    }
}

fn start(
    broker: &MemoryBroker,
    config: RouteConfig,
    invoker: impl Invoker,
    done_keys: Option<DoneKeys>,
) -> Running {
    start_bounded(broker, config, invoker, done_keys, DEFAULT_MAX_IN_FLIGHT)
}

fn start_bounded(
    broker: &MemoryBroker,
    config: RouteConfig,
    invoker: impl Invoker,
    done_keys: Option<DoneKeys>,
    max_in_flight: usize,
) -> Running {
    let sink: Arc<dyn Sink> = Arc::new(broker.sink());
    let route = Route::new(
        config,
        Arc::new(invoker),
        RouteSinks {
            outputs: sink.clone(),
            dlq: sink,
            replies: None,
        },
        done_keys,
    )
    .shutdown_grace(Duration::from_secs(1))
    .max_in_flight(max_in_flight);
    let (trigger, shutdown) = Shutdown::new();
    let source = Box::new(broker.source("in", "g"));
    let stats = route.stats();
    let task = tokio::spawn(route.run(source, shutdown));
    Running {
        trigger,
        task,
        stats,
    }
}

fn payloads(broker: &MemoryBroker, topic: &str) -> Vec<String> {
    broker
        .records(topic)
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

fn stat(stats: &[(&'static str, u64)], name: &str) -> u64 {
    stats
        .iter()
        .copied()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_publish_nothing_and_the_success_publishes_once() {
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("m", None, &[])]);
    let cfg =
        route_config("retry = { max_attempts = 5, initial_backoff_ms = 10, jitter = \"none\" }\n");
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| {
            if m.attempt < 3 {
                retry("not yet")
            } else {
                ok_to("out", format!("attempt-{}", m.attempt).into_bytes())
            }
        }),
        None,
    );
    broker.wait_acked(1).await;
    assert_eq!(payloads(&broker, "out"), vec!["attempt-3"]);
    assert!(broker.records("in.dlq").is_empty());
    let out = &broker.records("out")[0];
    assert_eq!(out.header(LOCKGATE_ID_HEADER), Some(&b"r:pos:in/0/0:0"[..]));
    let report = running.stop().await;
    assert_eq!(stat(&report.stats, "retried"), 2);
    assert_eq!(broker.committed("in", "g"), 1);
}

#[tokio::test(start_paused = true)]
async fn backoff_follows_the_policy_and_retry_after_is_capped() {
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("m", None, &[])]);
    let cfg = route_config(
        "retry = { max_attempts = 4, initial_backoff_ms = 100, max_backoff_ms = 300, jitter = \"none\" }\n",
    );
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = calls.clone();
    let running = start(
        &broker,
        cfg,
        FnInvoker(move |m: &InboundMessage| {
            seen.lock().unwrap().push(Instant::now());
            if m.attempt == 2 {
                // Asks for an hour: honoured only up to max_backoff_ms.
                Outcome::Retry {
                    reason: "later".into(),
                    after: Some(Duration::from_secs(3600)),
                }
            } else {
                retry("no")
            }
        }),
        None,
    );
    broker.wait_acked(1).await;
    let calls = calls.lock().unwrap().clone();
    let gaps: Vec<u128> = calls
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(
        gaps,
        vec![100, 300, 300],
        "100, then retry-after capped, then 100×2² capped"
    );
    let dead = broker.records("in.dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(dlq::header(&dead[0], "gave-up"), Some("attempts_exhausted"));
    assert_eq!(dlq::header(&dead[0], "attempts"), Some("4"));
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn poison_goes_to_the_dlq_with_metadata_and_is_acked_after_the_write() {
    let broker = MemoryBroker::new();
    broker.produce(
        "in",
        [
            msg("good", Some("k"), &[]),
            msg("poison", Some("k"), &[("trace", "t1")]),
        ],
    );
    let running = start(
        &broker,
        route_config(""),
        FnInvoker(|m: &InboundMessage| {
            if m.payload == b"poison" {
                Outcome::Rejected {
                    reason: "cannot parse".into(),
                }
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        None,
    );
    broker.wait_acked(2).await;
    let dead = broker.records("in.dlq");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.payload, b"poison");
    assert_eq!(d.key.as_deref(), Some(&b"k"[..]));
    assert_eq!(d.header("trace"), Some(&b"t1"[..]));
    for (name, want) in [
        ("route", "r"),
        ("handler", "h"),
        ("module-hash", "cafe"),
        ("topic", "in"),
        ("partition", "0"),
        ("offset", "1"),
        ("error-kind", "reject"),
        ("reason", "cannot parse"),
        ("gave-up", "rejected"),
        ("attempts", "1"),
    ] {
        assert_eq!(dlq::header(d, name), Some(want), "header {name}");
    }
    assert!(dlq::header(d, "first-failure-ms").is_some());
    assert_eq!(broker.stats().acked_dead.load(AtomicOrdering::SeqCst), 1);
    assert_eq!(payloads(&broker, "out"), vec!["good"]);
    let report = running.stop().await;
    let s = &report.stats;
    assert_eq!(stat(s, "rejected"), 1);
    assert_eq!(stat(s, "dead_lettered"), 1);
    assert_eq!(broker.committed("in", "g"), 2);
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_dlq_holds_the_ack_until_the_write_succeeds() {
    let broker = MemoryBroker::new();
    broker.set_failing("in.dlq", true);
    broker.produce("in", [msg("poison", None, &[])]);
    let running = start(
        &broker,
        route_config(""),
        FnInvoker(|_: &InboundMessage| Outcome::Rejected {
            reason: "no".into(),
        }),
        None,
    );
    // Drive the paused clock through several infra retries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(broker.stats().failed_publishes.load(AtomicOrdering::SeqCst) >= 3);
    assert_eq!(broker.acked(), 0, "acked past an unwritten dead letter");
    broker.set_failing("in.dlq", false);
    broker.wait_acked(1).await;
    assert_eq!(broker.records("in.dlq").len(), 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_pauses_the_source_and_dead_letters_nothing() {
    let broker = MemoryBroker::new();
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    broker.produce("in", keys.iter().map(|k| msg(k, Some(k), &[])));
    let healthy = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (h, c) = (healthy.clone(), calls.clone());
    let cfg = route_config(
        "concurrency = 4\nordering = \"key\"\nretry = { max_attempts = 1000, initial_backoff_ms = 10, max_backoff_ms = 10, jitter = \"none\" }\ncircuit_breaker = { consecutive_failures = 3, open_ms = 1000, half_open_max = 2 }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(move |m: &InboundMessage| {
            c.fetch_add(1, AtomicOrdering::SeqCst);
            if h.load(AtomicOrdering::SeqCst) {
                ok_to("out", m.payload.clone())
            } else {
                retry("dependency down")
            }
        }),
        None,
    );
    // Let the failures trip the breaker.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        broker.is_paused(),
        "source not paused while the breaker is open"
    );
    let at_open = calls.load(AtomicOrdering::SeqCst);
    // Three failures trip it; a fourth lane may have been admitted before the third reported.
    assert!(
        (3..=4).contains(&at_open),
        "calls before tripping: {at_open}"
    );
    // Open: nothing runs, nothing is dead-lettered, nothing acked.
    tokio::time::sleep(Duration::from_millis(850)).await;
    assert_eq!(calls.load(AtomicOrdering::SeqCst), at_open);
    // Half-open: at most half_open_max probes, which fail and reopen the breaker.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // (A probe that fails before the second is admitted reopens the breaker at once.)
    let probes = calls.load(AtomicOrdering::SeqCst) - at_open;
    assert!((1..=2).contains(&probes), "probes: {probes}");
    assert!(broker.records("in.dlq").is_empty());
    assert_eq!(broker.acked(), 0);
    // The dependency recovers: the next probes succeed, the breaker closes, all drain.
    healthy.store(true, AtomicOrdering::SeqCst);
    broker.wait_acked(20).await;
    assert!(broker.records("in.dlq").is_empty());
    let mut out = payloads(&broker, "out");
    out.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(out, want);
    assert!(broker.stats().pauses.load(AtomicOrdering::SeqCst) >= 1);
    assert!(broker.stats().resumes.load(AtomicOrdering::SeqCst) >= 1);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_breaker_pauses_the_source_even_when_the_in_flight_bound_is_full() {
    let broker = MemoryBroker::new();
    broker.produce("in", (0..50).map(|i| msg(&i.to_string(), None, &[])));
    let cfg = route_config(
        "retry = { max_attempts = 1000, initial_backoff_ms = 10, max_backoff_ms = 10, jitter = \"none\" }\ncircuit_breaker = { consecutive_failures = 3, open_ms = 60000 }\n",
    );
    let running = start_bounded(
        &broker,
        cfg,
        FnInvoker(|_: &InboundMessage| retry("down")),
        None,
        5,
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(broker.is_paused(), "a full route did not pause its source");
    assert!(broker.records("in.dlq").is_empty());
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_retrying_key_holds_back_only_its_own_lane() {
    let broker = MemoryBroker::new();
    broker.produce(
        "in",
        [
            msg("a1", Some("a"), &[]),
            msg("a2", Some("a"), &[]),
            msg("b1", Some("b"), &[]),
            msg("b2", Some("b"), &[]),
            msg("c1", Some("c"), &[]),
            msg("b3", Some("b"), &[]),
        ],
    );
    let cfg = route_config(
        "concurrency = 2\nordering = \"key\"\nretry = { max_attempts = 4, initial_backoff_ms = 1000, max_backoff_ms = 1000, jitter = \"none\" }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| {
            if m.payload == b"a1" && m.attempt < 4 {
                retry("slow dependency")
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        None,
    );
    broker.wait_acked(6).await;
    let out = payloads(&broker, "out");
    assert_eq!(out[4..], ["a1", "a2"], "a2 waits for a1: {out:?}");
    let b: Vec<&String> = out[..4].iter().filter(|p| p.starts_with('b')).collect();
    assert_eq!(
        b,
        ["b1", "b2", "b3"],
        "other keys finish, in order, while a1 retries: {out:?}"
    );
    assert!(out[..4].contains(&"c1".to_owned()), "{out:?}");
    // The committed position is the contiguous prefix: nothing could be committed past a1
    // until it was done.
    running.stop().await;
    assert_eq!(broker.committed("in", "g"), 6);
}

#[tokio::test(start_paused = true)]
async fn partition_ordering_keeps_everything_in_sequence() {
    let broker = MemoryBroker::new();
    let input: Vec<String> = (0..50).map(|i| format!("m{i:02}")).collect();
    broker.produce(
        "in",
        input
            .iter()
            .enumerate()
            .map(|(i, p)| msg(p, Some(&format!("k{}", i % 7)), &[])),
    );
    let cfg = route_config(
        "concurrency = 8\nretry = { max_attempts = 3, initial_backoff_ms = 5, jitter = \"none\" }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| {
            if m.payload.ends_with(b"3") && m.attempt == 1 {
                retry("once")
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        None,
    );
    broker.wait_acked(50).await;
    assert_eq!(payloads(&broker, "out"), input);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn idempotency_skips_completed_keys_across_restarts() {
    let broker = MemoryBroker::new();
    let store = Arc::new(LocalClaims::new(Arc::new(MemoryStore::new())));
    let keys = || {
        DoneKeys::new(
            store.clone(),
            "r",
            Duration::from_secs(3600),
            Duration::from_secs(30),
        )
    };
    let calls = Arc::new(AtomicU32::new(0));
    let invoker = |calls: Arc<AtomicU32>| {
        FnInvoker(move |m: &InboundMessage| {
            calls.fetch_add(1, AtomicOrdering::SeqCst);
            ok_to("out", m.payload.clone())
        })
    };
    let cfg = route_config("idempotency = { key = \"header:id\" }\n");
    broker.produce(
        "in",
        [
            msg("first-x", None, &[("id", "x")]),
            msg("y", None, &[("id", "y")]),
            msg("again-x", None, &[("id", "x")]),
            msg("no-key", None, &[]),
        ],
    );
    let running = start(&broker, cfg.clone(), invoker(calls.clone()), Some(keys()));
    broker.wait_acked(4).await;
    let report = running.stop().await;
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 3, "the duplicate ran");
    assert_eq!(payloads(&broker, "out"), vec!["first-x", "y", "no-key"]);
    assert_eq!(stat(&report.stats, "duplicates"), 1);
    let out = broker.records("out");
    assert_eq!(out[0].header(LOCKGATE_ID_HEADER), Some(&b"r:key:x:0"[..]));

    // A restarted route (same store) still knows x and y.
    broker.produce("in", [msg("x-after-restart", None, &[("id", "x")])]);
    let running = start(&broker, cfg, invoker(calls.clone()), Some(keys()));
    broker.wait_acked(5).await;
    running.stop().await;
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 3);
    assert_eq!(broker.records("out").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_holds_under_a_burst() {
    let broker = MemoryBroker::new();
    broker.produce("in", (0..25).map(|i| msg(&i.to_string(), None, &[])));
    let cfg = route_config("rate_limit = { per_second = 10, burst = 5 }\n");
    let started = Instant::now();
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| ok_to("out", m.payload.clone())),
        None,
    );
    broker.wait_acked(5).await;
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "the burst passes at once"
    );
    broker.wait_acked(25).await;
    let took = started.elapsed();
    // 20 messages beyond the burst at 10/s.
    assert!(
        took >= Duration::from_millis(1_990) && took <= Duration::from_millis(2_100),
        "{took:?}"
    );
    let report = running.stop().await;
    assert!(stat(&report.stats, "rate_limited") >= 20);
}

#[tokio::test(start_paused = true)]
async fn shutdown_mid_retry_leaves_the_message_unacknowledged() {
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("ok", None, &[]), msg("stuck", None, &[])]);
    let cfg = route_config(
        "retry = { max_attempts = 10, initial_backoff_ms = 60000, max_backoff_ms = 60000, jitter = \"none\" }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| {
            if m.payload == b"stuck" {
                retry("down")
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        None,
    );
    broker.wait_acked(1).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = Instant::now();
    let report = running.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shutdown waited for the backoff"
    );
    assert_eq!(broker.acked(), 1);
    assert_eq!(stat(&report.stats, "abandoned"), 1);
    assert!(broker.records("in.dlq").is_empty());
    assert_eq!(
        broker.committed("in", "g"),
        1,
        "committed past an unfinished message"
    );
}

/// Makes publishes to `out` fail until the first one was refused, so the route's first message
/// backs off while everything after it queues up in its lane.
async fn hold_first_publish(broker: &MemoryBroker) {
    while broker.stats().failed_publishes.load(AtomicOrdering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    broker.set_failing("out", false);
}

#[tokio::test(start_paused = true)]
async fn a_lane_publishes_its_queued_messages_as_one_batch() {
    for (max_batch, most_publishes) in [(32, 2), (1, 10)] {
        let broker = MemoryBroker::new();
        let input: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        broker.produce("in", input.iter().map(|p| msg(p, None, &[])));
        broker.set_failing("out", true);
        let running = start(
            &broker,
            route_config(&format!("max_batch = {max_batch}\n")),
            FnInvoker(|m: &InboundMessage| ok_to("out", m.payload.clone())),
            None,
        );
        hold_first_publish(&broker).await;
        broker.wait_acked(10).await;
        let report = running.stop().await;
        assert_eq!(payloads(&broker, "out"), input, "max_batch {max_batch}");
        assert_eq!(stat(&report.stats, "succeeded"), 10);
        assert_eq!(stat(&report.stats, "outputs"), 10);
        let publishes = broker.stats().publishes.load(AtomicOrdering::SeqCst);
        if max_batch == 1 {
            assert_eq!(publishes, most_publishes, "one publish per message");
        } else {
            assert!(
                publishes <= most_publishes,
                "{publishes} publishes for 10 messages with max_batch {max_batch}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_retrying_message_does_not_hold_back_the_finished_ones_of_its_batch() {
    let broker = MemoryBroker::new();
    broker.produce("in", ["first", "a", "b", "c"].map(|p| msg(p, None, &[])));
    broker.set_failing("out", true);
    let cfg = route_config(
        "retry = { max_attempts = 3, initial_backoff_ms = 10000, jitter = \"none\" }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| {
            if m.payload == b"b" && m.attempt == 1 {
                retry("once")
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        None,
    );
    hold_first_publish(&broker).await;
    let t0 = Instant::now();
    // "a" shares a batch with "b"; it is published and acked before b's 10 s backoff ends.
    broker.wait_acked(2).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(payloads(&broker, "out"), vec!["first", "a"]);
    broker.wait_acked(4).await;
    assert!(t0.elapsed() >= Duration::from_secs(10));
    assert_eq!(payloads(&broker, "out"), vec!["first", "a", "b", "c"]);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_repeated_key_inside_one_batch_is_still_deduplicated() {
    let broker = MemoryBroker::new();
    let keys = memory_keys();
    broker.produce(
        "in",
        [("first", "f"), ("x1", "x"), ("y", "y"), ("x2", "x")]
            .map(|(p, id)| msg(p, None, &[("id", id)])),
    );
    broker.set_failing("out", true);
    let running = start(
        &broker,
        route_config("idempotency = { key = \"header:id\" }\n"),
        FnInvoker(|m: &InboundMessage| ok_to("out", m.payload.clone())),
        Some(keys),
    );
    hold_first_publish(&broker).await;
    broker.wait_acked(4).await;
    let report = running.stop().await;
    assert_eq!(payloads(&broker, "out"), vec!["first", "x1", "y"]);
    assert_eq!(stat(&report.stats, "duplicates"), 1);
    assert_eq!(broker.committed("in", "g"), 4);
}

// Real time: the handler blocks its thread, which a paused clock cannot see.
#[tokio::test]
async fn slow_handlers_flush_their_batch_after_max_batch_age() {
    let broker = MemoryBroker::new();
    broker.produce("in", (0..8).map(|i| msg(&format!("m{i}"), None, &[])));
    broker.set_failing("out", true);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let running = start(
        &broker,
        route_config(""),
        FnInvoker(move |m: &InboundMessage| {
            counted.fetch_add(1, AtomicOrdering::SeqCst);
            if m.payload != b"m0" {
                std::thread::sleep(MAX_BATCH_AGE / 2);
            }
            ok_to("out", m.payload.clone())
        }),
        None,
    );
    // m0 backs off on the failing sink while m1..m7 queue up: one batch of seven 50 ms calls.
    hold_first_publish(&broker).await;
    broker.wait_acked(2).await;
    let at_first_flush = calls.load(AtomicOrdering::SeqCst);
    assert!(
        at_first_flush < 8,
        "the batch's first message was acked only after all {at_first_flush} calls"
    );
    broker.wait_acked(8).await;
    running.stop().await;
    assert_eq!(payloads(&broker, "out").len(), 8);
}

// Real time: the first handler call blocks its thread until the test lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_claimed_by_another_lane_waits_and_then_is_a_duplicate() {
    let broker = MemoryBroker::new();
    // Different message keys (two lanes), one idempotency key.
    broker.produce(
        "in",
        [
            msg("first", Some("a"), &[("id", "x")]),
            msg("second", Some("b"), &[("id", "x")]),
        ],
    );
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let running = start(
        &broker,
        route_config(
            "concurrency = 2\nordering = \"key\"\nidempotency = { key = \"header:id\" }\n",
        ),
        FnInvoker(move |m: &InboundMessage| {
            counted.fetch_add(1, AtomicOrdering::SeqCst);
            // Every call waits for the test; a second call would wait forever (and time out).
            let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
            ok_to("out", m.payload.clone())
        }),
        Some(memory_keys()),
    );
    // Whichever message claimed x first is blocked in the handler; the other must wait for
    // the claim rather than run.
    let t0 = std::time::Instant::now();
    while running.stats.claim_waits.load(AtomicOrdering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "nobody waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 1, "ran while claimed");
    release.send(()).unwrap();
    broker.wait_acked(2).await;
    let report = running.stop().await;
    assert_eq!(calls.load(AtomicOrdering::SeqCst), 1, "the duplicate ran");
    assert_eq!(stat(&report.stats, "duplicates"), 1);
    assert_eq!(broker.records("out").len(), 1);
}

/// Claims in memory; recording keys as done fails while `failing` is set, claiming while
/// `claims_failing` is.
struct FlakyDone {
    inner: LocalClaims,
    failing: AtomicBool,
    claims_failing: AtomicBool,
}

impl FlakyDone {
    fn new(failing: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: LocalClaims::new(Arc::new(MemoryStore::new())),
            failing: AtomicBool::new(failing),
            claims_failing: AtomicBool::new(false),
        })
    }

    fn keys(self: &Arc<Self>) -> DoneKeys {
        DoneKeys::new(
            self.clone(),
            "r",
            Duration::from_secs(3600),
            Duration::from_secs(30),
        )
    }
}

impl crate::state::IdempotencyStore for FlakyDone {
    fn claim(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
        lease: Duration,
    ) -> futures_util::future::BoxFuture<'_, Result<Vec<Claim>, crate::state::StateError>> {
        if self.claims_failing.load(AtomicOrdering::SeqCst) {
            return Box::pin(async { Err(crate::state::StateError::Unavailable("down".into())) });
        }
        self.inner.claim(scope, requests, lease)
    }

    fn complete(
        &self,
        scope: String,
        keys: Vec<String>,
        ttl: Duration,
        how: crate::state::Completion,
    ) -> futures_util::future::BoxFuture<'_, Result<(), crate::state::StateError>> {
        if self.failing.load(AtomicOrdering::SeqCst) {
            return Box::pin(async { Err(crate::state::StateError::Unavailable("down".into())) });
        }
        self.inner.complete(scope, keys, ttl, how)
    }

    fn release(
        &self,
        scope: String,
        requests: Vec<ClaimRequest>,
    ) -> futures_util::future::BoxFuture<'_, Result<(), crate::state::StateError>> {
        self.inner.release(scope, requests)
    }

    fn commit(
        &self,
        scope: String,
        claim: ClaimRequest,
        writes: Vec<crate::state::KvWrite>,
        outputs: Vec<u8>,
        lease: Duration,
    ) -> futures_util::future::BoxFuture<'_, Result<Commit, crate::state::StateError>> {
        self.inner.commit(scope, claim, writes, outputs, lease)
    }
}

#[tokio::test(start_paused = true)]
async fn no_message_is_acked_before_its_key_is_recorded() {
    let broker = MemoryBroker::new();
    broker.produce(
        "in",
        (0..10).map(|i| msg(&format!("m{i}"), None, &[("id", &i.to_string())])),
    );
    let store = FlakyDone::new(true);
    let keys = store.keys();
    let running = start(
        &broker,
        route_config("idempotency = { key = \"header:id\" }\n"),
        FnInvoker(|m: &InboundMessage| ok_to("out", m.payload.clone())),
        Some(keys.clone()),
    );
    // Outputs go out, but the keys cannot be recorded: nothing may be acked.
    let t0 = Instant::now();
    while running.stats.infra_retries.load(AtomicOrdering::SeqCst) < 3 && broker.acked() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no retry of the key"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!broker.records("out").is_empty(), "nothing was handled");
    assert_eq!(broker.acked(), 0, "acked without its key recorded");
    store.failing.store(false, AtomicOrdering::SeqCst);
    broker.wait_acked(10).await;
    let report = running.stop().await;
    assert_eq!(stat(&report.stats, "succeeded"), 10);
    for i in 0..10 {
        assert_eq!(
            keys.claim(&i.to_string(), "later", false).await.unwrap(),
            Claim::Done,
            "key {i}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_batch_run_ahead_stops_at_a_failure_so_later_messages_wait_for_its_retry() {
    let broker = MemoryBroker::new();
    broker.produce(
        "in",
        ["first", "a", "b", "c", "d"].map(|p| msg(p, None, &[])),
    );
    broker.set_failing("out", true);
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = calls.clone();
    let cfg =
        route_config("retry = { max_attempts = 3, initial_backoff_ms = 100, jitter = \"none\" }\n");
    let running = start(
        &broker,
        cfg,
        FnInvoker(move |m: &InboundMessage| {
            let p = String::from_utf8_lossy(&m.payload).into_owned();
            seen.lock().unwrap().push(format!("{p}#{}", m.attempt));
            if p == "b" && m.attempt == 1 {
                retry("once")
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        None,
    );
    // "first" holds the lane while a..d queue up behind it: they come as one batch.
    hold_first_publish(&broker).await;
    broker.wait_acked(5).await;
    running.stop().await;
    assert_eq!(
        *calls.lock().unwrap(),
        ["first#1", "a#1", "b#1", "b#2", "c#1", "d#1"],
        "c and d must not run before b succeeded"
    );
    assert_eq!(payloads(&broker, "out"), ["first", "a", "b", "c", "d"]);
}

/// Whether another owner can claim `key` right now (and then holds it): false while someone
/// else's claim on it is live.
async fn claimable_now(keys: &DoneKeys, key: &str) -> bool {
    match keys.claim(key, "another-process", false).await.unwrap() {
        Claim::Claimed => true,
        Claim::Busy(_) => false,
        other => panic!("key {key}: {other:?}"),
    }
}

/// Advances the paused clock in small steps until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_abandoned_before_its_retry_releases_its_claim() {
    let broker = MemoryBroker::new();
    let keys = memory_keys();
    broker.produce(
        "in",
        [
            msg("p1", None, &[("id", "p1")]),
            msg("p2", None, &[("id", "p2")]),
        ],
    );
    let failing = broker.clone();
    let cfg = route_config(
        "idempotency = { key = \"header:id\" }\nretry = { max_attempts = 5, initial_backoff_ms = 10, jitter = \"none\" }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(move |m: &InboundMessage| {
            if m.payload == b"p2" {
                // p1 waits in the batch for its publish: before p2 backs off it publishes p1,
                // and that publish fails until the route stops.
                failing.set_failing("out", true);
                retry("down")
            } else {
                ok_to("out", m.payload.clone())
            }
        }),
        Some(keys.clone()),
    );
    until("the publish before the retry failed", || {
        broker.stats().failed_publishes.load(AtomicOrdering::SeqCst) >= 1
    })
    .await;
    assert!(
        !claimable_now(&keys, "p2").await,
        "p2 runs without its claim"
    );
    let report = running.stop().await;
    assert!(broker.records("out").is_empty(), "p1 was not pending");
    assert_eq!(broker.acked(), 0);
    assert_eq!(stat(&report.stats, "abandoned"), 2);
    // Both come back from the broker; whoever gets them must not wait out the lease.
    assert!(claimable_now(&keys, "p1").await, "p1's claim was kept");
    assert!(claimable_now(&keys, "p2").await, "p2's claim was kept");
}

#[tokio::test(start_paused = true)]
async fn a_message_abandoned_while_the_breaker_is_open_releases_its_claim() {
    let broker = MemoryBroker::new();
    broker.set_failing("out", true);
    let keys = memory_keys();
    // Lane p: p1 succeeds and waits in the batch, p2 then finds the breaker open. Lane f: f
    // opens the breaker while p1 runs.
    broker.produce(
        "in",
        [
            msg("p1", Some("p"), &[("id", "p1")]),
            msg("p2", Some("p"), &[("id", "p2")]),
            msg("f", Some("f"), &[("id", "f")]),
        ],
    );
    let stats: Arc<std::sync::OnceLock<Arc<RouteStats>>> = Arc::default();
    let (p1_started, p1_runs) = std::sync::mpsc::channel::<()>();
    let p1_runs = Mutex::new(p1_runs);
    let tripped = stats.clone();
    let cfg = route_config(
        "concurrency = 2\nordering = \"key\"\nidempotency = { key = \"header:id\" }\nretry = { max_attempts = 5, initial_backoff_ms = 10, jitter = \"none\" }\ncircuit_breaker = { consecutive_failures = 1, open_ms = 60000 }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(move |m: &InboundMessage| match &m.payload[..] {
            b"p1" => {
                // Admitted while the breaker was closed; finishes once f opened it.
                p1_started.send(()).unwrap();
                let t0 = std::time::Instant::now();
                while tripped
                    .get()
                    .is_none_or(|s| s.breaker_trips.load(AtomicOrdering::SeqCst) == 0)
                {
                    assert!(t0.elapsed() < Duration::from_secs(10), "f never failed");
                    std::thread::sleep(Duration::from_millis(1));
                }
                ok_to("out", m.payload.clone())
            }
            b"f" => {
                let _ = p1_runs
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10));
                retry("down")
            }
            _ => ok_to("out", m.payload.clone()),
        }),
        Some(keys.clone()),
    );
    stats.set(running.stats.clone()).unwrap();
    until("p2 published p1 before waiting for the breaker", || {
        broker.stats().failed_publishes.load(AtomicOrdering::SeqCst) >= 1
    })
    .await;
    assert!(
        !claimable_now(&keys, "p2").await,
        "p2 waits without its claim"
    );
    let report = running.stop().await;
    assert!(broker.records("out").is_empty(), "p1 was not pending");
    assert_eq!(broker.acked(), 0);
    assert_eq!(stat(&report.stats, "abandoned"), 3);
    for key in ["p1", "p2", "f"] {
        assert!(claimable_now(&keys, key).await, "{key}'s claim was kept");
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_abandoned_before_its_dead_letter_is_recorded_releases_its_claim() {
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("poison", None, &[("id", "x")])]);
    // Recording the key as dead-lettered fails until the route stops.
    let store = FlakyDone::new(true);
    let keys = store.keys();
    let running = start(
        &broker,
        route_config("idempotency = { key = \"header:id\" }\n"),
        FnInvoker(|_: &InboundMessage| Outcome::Rejected {
            reason: "no".into(),
        }),
        Some(keys.clone()),
    );
    until("the key's record failed after the dead letter", || {
        broker.records("in.dlq").len() == 1
            && running.stats.infra_retries.load(AtomicOrdering::SeqCst) >= 1
    })
    .await;
    assert!(
        !claimable_now(&keys, "x").await,
        "dead-lettered without its claim"
    );
    let report = running.stop().await;
    assert_eq!(broker.acked(), 0, "acked before its key was recorded");
    assert_eq!(stat(&report.stats, "abandoned"), 1);
    assert!(claimable_now(&keys, "x").await, "the claim was kept");
}

#[tokio::test(start_paused = true)]
async fn a_message_abandoned_while_renewing_its_claim_releases_it() {
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("m", None, &[("id", "x")])]);
    let store = FlakyDone::new(false);
    let keys = store.keys();
    let down = store.clone();
    let cfg = route_config(
        "idempotency = { key = \"header:id\" }\nretry = { max_attempts = 5, initial_backoff_ms = 10, jitter = \"none\" }\n",
    );
    let running = start(
        &broker,
        cfg,
        FnInvoker(move |_: &InboundMessage| {
            // The store goes down after the first claim: renewing it before the retry fails
            // until the route stops.
            down.claims_failing.store(true, AtomicOrdering::SeqCst);
            retry("down")
        }),
        Some(keys.clone()),
    );
    until("renewing the claim failed", || {
        running.stats.infra_retries.load(AtomicOrdering::SeqCst) >= 1
    })
    .await;
    let report = running.stop().await;
    assert_eq!(stat(&report.stats, "retried"), 1);
    assert_eq!(stat(&report.stats, "abandoned"), 1);
    store.claims_failing.store(false, AtomicOrdering::SeqCst);
    assert!(claimable_now(&keys, "x").await, "the claim was kept");
}

/// A sink that refuses every publish and notes when each was tried.
#[derive(Default)]
struct Refusing(Mutex<Vec<Instant>>);

impl Sink for Refusing {
    fn publish(
        &self,
        _: Vec<OutRecord>,
    ) -> futures_util::future::BoxFuture<'_, Result<(), crate::broker::BrokerError>> {
        self.0.lock().unwrap().push(Instant::now());
        Box::pin(async { Err(crate::broker::BrokerError::Unavailable("down".into())) })
    }
}

#[tokio::test(start_paused = true)]
async fn failed_infrastructure_calls_are_retried_with_jittered_backoff() {
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("poison", None, &[])]);
    let dlq = Arc::new(Refusing::default());
    let route = Route::new(
        route_config(""),
        Arc::new(FnInvoker(|_: &InboundMessage| Outcome::Rejected {
            reason: "no".into(),
        })),
        RouteSinks {
            outputs: Arc::new(broker.sink()),
            dlq: dlq.clone(),
            replies: None,
        },
        None,
    )
    .shutdown_grace(Duration::from_secs(1));
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(route.run(Box::new(broker.source("in", "g")), shutdown));
    until("eight tries of the dead letter", || {
        dlq.0.lock().unwrap().len() >= 8
    })
    .await;
    trigger.trigger();
    task.await.unwrap();
    let tries = dlq.0.lock().unwrap().clone();
    // The step doubles from 100 ms to 5 s; each wait is drawn from its upper half, so
    // processes that met the same outage do not retry in lockstep when it ends.
    let mut step = Duration::from_millis(100);
    let mut below_step = 0;
    for gap in tries.windows(2).map(|w| w[1] - w[0]) {
        // (+1 ms: the paused clock's timers fire on whole milliseconds.)
        assert!(
            gap >= step / 2 && gap <= step + Duration::from_millis(1),
            "waited {gap:?} for a step of {step:?}"
        );
        if gap + Duration::from_millis(1) < step {
            below_step += 1;
        }
        step = (step * 2).min(Duration::from_secs(5));
    }
    assert!(below_step > 0, "every wait was the full step: no jitter");
    assert_eq!(broker.acked(), 0);
}

/// Log lines of this thread, as the text format writes them.
#[derive(Clone, Default)]
struct LogLines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs in a process of its own (this test binary again, filtered to it): a subscriber set
/// for one thread competes with the other tests, running in parallel, for tracing's global
/// callsite interest cache, and a callsite first hit by another test while this one registers
/// its subscriber can stay disabled (it did, about once in ten runs).
#[test]
fn each_attempt_logs_its_own_number_once() {
    const ALONE: &str = "LOCKGATE_TEST_ALONE";
    if std::env::var_os(ALONE).is_some() {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(attempts_log_their_own_number());
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "pipeline::route::tests::each_attempt_logs_its_own_number_once",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(ALONE, "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the test did not run in its own process"
    );
}

async fn attempts_log_their_own_number() {
    let logs = LogLines::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    // The route runs on this thread (a current-thread runtime), so it logs here.
    let _guard = tracing::subscriber::set_default(subscriber);
    let broker = MemoryBroker::new();
    broker.produce("in", [msg("m", None, &[])]);
    let cfg =
        route_config("retry = { max_attempts = 5, initial_backoff_ms = 10, jitter = \"none\" }\n");
    let running = start(
        &broker,
        cfg,
        FnInvoker(|m: &InboundMessage| {
            if m.attempt < 3 {
                retry("not yet")
            } else {
                ok_to("out", b"done".to_vec())
            }
        }),
        None,
    );
    broker.wait_acked(1).await;
    running.stop().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // Every line names one attempt number, however often it repeats it (span and event).
    let attempts = |line: &str| -> Vec<u32> {
        line.split("attempt=")
            .skip(1)
            .map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().unwrap()
            })
            .collect()
    };
    let invoking: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Invoking the handler"))
        .collect();
    assert_eq!(invoking.len(), 3, "{text}");
    for (i, line) in invoking.iter().enumerate() {
        let n = i as u32 + 1;
        assert!(line.contains(&format!("attempt{{attempt={n}}}")), "{line}");
        assert!(line.contains("message{route=r in/0/0"), "{line}");
        assert_eq!(attempts(line), vec![n, n], "{line}");
    }
    let retrying: Vec<&str> = text.lines().filter(|l| l.contains("retrying")).collect();
    assert_eq!(retrying.len(), 2, "{text}");
    for (i, line) in retrying.iter().enumerate() {
        assert_eq!(attempts(line), vec![i as u32 + 1], "{line}");
    }
}
