//! A guest can never crash or hang the host, and gets no ambient authority: each adversarial
//! behaviour yields its typed outcome within its deadline, forbidden access fails inside the
//! guest, and the same pool keeps serving afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lockgate::engine::{
    Engine, EngineSettings, HandlerLimits, InboundMessage, InstancePool, Invocation, LogSource,
    Outcome,
};

use lockgate::config::Isolation;
use lockgate_tests::{guest, guest_pool, handler_env};

const TIMEOUT: Duration = Duration::from_millis(200);
const MEMORY_MB: u64 = 32;

fn pool(pooling: bool, isolation: Isolation) -> InstancePool {
    pool_with_timeout(pooling, isolation, TIMEOUT)
}

/// For guests that do real work before the limit under test hits (building a 10 MiB payload
/// takes longer than `TIMEOUT` on a loaded machine).
fn pool_with_timeout(pooling: bool, isolation: Isolation, timeout: Duration) -> InstancePool {
    let limits = HandlerLimits {
        timeout,
        max_memory_bytes: MEMORY_MB * 1024 * 1024,
        ..HandlerLimits::default()
    };
    guest_pool(
        "adversarial",
        pooling,
        isolation,
        handler_env("adversarial", &[], limits),
    )
}

fn msg(payload: &str) -> InboundMessage {
    InboundMessage {
        id: format!("t/{payload}"),
        topic: "in".into(),
        payload: payload.as_bytes().to_vec(),
        attempt: 1,
        ..InboundMessage::default()
    }
}

/// The single published payload of an ok outcome, as text.
fn published(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok { outputs } => {
            assert_eq!(outputs.len(), 1, "{outcome:?}");
            String::from_utf8_lossy(&outputs[0].payload).into_owned()
        }
        other => panic!("expected ok, got {other:?}"),
    }
}

fn assert_still_serving(pool: &InstancePool) {
    let inv = pool.invoke(&msg("still alive"));
    assert_eq!(published(&inv.outcome), "still alive");
}

#[test]
fn infinite_loop_times_out_within_deadline_and_host_keeps_serving() {
    for pooling in [true, false] {
        let pool = pool(pooling, Isolation::Reuse);
        assert_still_serving(&pool);
        let start = Instant::now();
        let inv = pool.invoke(&msg("loop"));
        let took = start.elapsed();
        assert_eq!(inv.outcome, Outcome::TimedOut { timeout: TIMEOUT });
        assert!(took >= TIMEOUT, "fired early: {took:?}");
        assert!(
            took <= TIMEOUT + Duration::from_millis(50),
            "deadline fired late: {took:?} (pooling={pooling})"
        );
        assert_still_serving(&pool);
    }
}

#[test]
fn memory_bomb_is_out_of_memory() {
    let pool = pool(true, Isolation::Reuse);
    let inv = pool.invoke(&msg("oom"));
    assert_eq!(
        inv.outcome,
        Outcome::OutOfMemory {
            limit_bytes: MEMORY_MB * 1024 * 1024
        }
    );
    assert_still_serving(&pool);
}

#[test]
fn deep_recursion_is_a_trap_not_an_abort() {
    let pool = pool(true, Isolation::Reuse);
    let inv = pool.invoke(&msg("recurse"));
    match &inv.outcome {
        Outcome::Trapped { reason } => assert!(reason.contains("stack overflow"), "{reason}"),
        other => panic!("expected a stack-overflow trap, got {other:?}"),
    }
    assert_still_serving(&pool);
}

#[test]
fn file_system_is_denied_inside_the_guest() {
    let pool = pool(true, Isolation::Reuse);
    let text = published(&pool.invoke(&msg("read-file")).outcome);
    assert!(text.starts_with("denied: "), "guest read a file: {text}");
}

#[test]
fn sockets_are_denied_inside_the_guest() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let pool = pool(true, Isolation::Reuse);
    let text = published(&pool.invoke(&msg(&format!("socket {addr}"))).outcome);
    assert!(
        text.starts_with("denied: "),
        "guest opened a socket: {text}"
    );
    assert!(
        listener.accept().is_err(),
        "the listener saw a connection from the guest"
    );
}

#[test]
fn environment_is_empty_inside_the_guest() {
    // SAFETY: set before any guest runs in this test process; nothing else reads it concurrently.
    unsafe { std::env::set_var("LOCKGATE_SECRET", "hunter2") };
    let pool = pool(true, Isolation::Reuse);
    let text = published(&pool.invoke(&msg("env")).outcome);
    assert!(text.contains("env: 0 vars"), "{text}");
    assert!(text.contains("secret: none"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn oversized_publish_fails_the_invocation_even_if_the_guest_returns_ok() {
    let pool = pool_with_timeout(true, Isolation::Reuse, Duration::from_secs(10));
    let inv = pool.invoke(&msg("publish-big"));
    match &inv.outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("max_output_bytes"), "{reason}");
            assert!(reason.contains("10485760"), "{reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_still_serving(&pool);
}

#[test]
fn stdout_and_stderr_become_log_records() {
    let pool = pool(true, Isolation::Reuse);
    let inv = pool.invoke(&msg("stdout"));
    assert!(
        matches!(inv.outcome, Outcome::Ok { .. }),
        "{:?}",
        inv.outcome
    );
    let lines: Vec<_> = inv
        .logs
        .iter()
        .map(|l| (l.source, l.message.as_str()))
        .collect();
    assert!(
        lines.contains(&(LogSource::Stdout, "hello from stdout")),
        "{lines:?}"
    );
    assert!(
        lines.contains(&(LogSource::Stderr, "hello from stderr")),
        "{lines:?}"
    );
}

#[test]
fn reuse_keeps_one_instance_and_per_message_keeps_none() {
    let reuse = pool(true, Isolation::Reuse);
    assert_still_serving(&reuse);
    assert_still_serving(&reuse);
    assert_eq!(reuse.idle_instances(), 1);
    // A trap discards the instance instead of returning it to the pool.
    let _ = reuse.invoke(&msg("recurse"));
    assert_eq!(reuse.idle_instances(), 0);

    let fresh = pool(true, Isolation::PerMessage);
    assert_still_serving(&fresh);
    assert_eq!(fresh.idle_instances(), 0);
}

#[test]
fn a_fresh_instance_never_sees_an_earlier_instances_memory() {
    // The pooling allocator resets a reused slot in place (keep-resident pages found dirty
    // through PAGEMAP_SCAN): what one instance wrote must not show up in the next one.
    for (pooling, keep_resident) in [(true, None), (true, Some(0)), (false, None)] {
        let engine = Engine::new(&EngineSettings {
            pooling,
            max_instances: 4,
            keep_resident_bytes: keep_resident
                .unwrap_or(lockgate::engine::DEFAULT_KEEP_RESIDENT_BYTES),
            ..EngineSettings::default()
        })
        .expect("engine");
        let load = || {
            engine
                .load_handler(
                    &guest("adversarial"),
                    handler_env("adversarial", &[], HandlerLimits::default()),
                )
                .expect("guest loads")
        };
        let fresh = InstancePool::new(load(), Isolation::PerMessage, u64::MAX);
        for _ in 0..5 {
            let inv = fresh.invoke(&msg("remember"));
            assert_eq!(
                published(&inv.outcome),
                "calls 1, heap blocks 1",
                "pooling {pooling}, keep-resident {keep_resident:?}"
            );
        }
        let reused = InstancePool::new(load(), Isolation::Reuse, u64::MAX);
        for n in 1..=3 {
            let inv = reused.invoke(&msg("remember"));
            assert_eq!(
                published(&inv.outcome),
                format!("calls {n}, heap blocks {n}"),
                "a reused instance keeps its memory"
            );
        }
    }
}

#[test]
fn compiled_components_are_cached_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = EngineSettings {
        cache_dir: Some(dir.path().join("cache")),
        ..EngineSettings::default()
    };
    let env = || handler_env("up", &[], HandlerLimits::default());
    let first = Engine::new(&settings)
        .expect("engine")
        .load_handler(&guest("uppercase"), env())
        .expect("load");
    assert!(!first.loaded_from_cache());
    // A new engine (as after a restart) finds the artefact instead of recompiling.
    let second = Engine::new(&settings)
        .expect("engine")
        .load_handler(&guest("uppercase"), env())
        .expect("load");
    assert!(second.loaded_from_cache());
    assert_eq!(first.module_hash(), second.module_hash());
    second
        .check_instantiate()
        .expect("cached code instantiates");
}

/// How late past its deadline a call blocked in the host may end.
const MARGIN: Duration = Duration::from_millis(50);

/// Runs `command` once on `pool` and checks that it ended as `timed_out` at its deadline, with
/// its instance discarded, and that the pool serves the next message.
fn times_out_at_the_deadline(pool: &Arc<InstancePool>, command: &str) {
    times_out_at_the_deadline_by(pool, command, &|pool, m| pool.invoke(&m));
}

/// [`times_out_at_the_deadline`] with the calls made by `invoke`.
fn times_out_at_the_deadline_by(
    pool: &Arc<InstancePool>,
    command: &str,
    invoke: &dyn Fn(&Arc<InstancePool>, InboundMessage) -> Invocation,
) {
    let still_serving = || {
        let inv = invoke(pool, msg("still alive"));
        assert_eq!(published(&inv.outcome), "still alive");
    };
    still_serving();
    assert_eq!(pool.idle_instances(), 1, "{command}: a warm instance");
    let start = Instant::now();
    let inv = invoke(pool, msg(command));
    let took = start.elapsed();
    assert_eq!(
        inv.outcome,
        Outcome::TimedOut { timeout: TIMEOUT },
        "{command} after {took:?}"
    );
    assert!(took >= TIMEOUT, "{command}: fired early, after {took:?}");
    assert!(
        took <= TIMEOUT + MARGIN,
        "{command}: ended {took:?} after the call began (deadline {TIMEOUT:?})"
    );
    assert_eq!(
        pool.idle_instances(),
        0,
        "{command}: the instance that timed out was kept"
    );
    still_serving();
}

/// Calls `pool` the way the pipeline does: the asynchronous call, awaited in a task on a
/// worker of `runtime`.
fn on_a_worker(
    runtime: &tokio::runtime::Runtime,
) -> impl Fn(&Arc<InstancePool>, InboundMessage) -> Invocation + '_ {
    move |pool, m| {
        let pool = pool.clone();
        runtime
            .block_on(runtime.spawn(async move {
                pool.invoke_async(m, lockgate::engine::Staging::Direct)
                    .await
            }))
            .expect("no panic")
    }
}

/// A guest blocked in the host (sleeping, reading stdin, waiting on a clock pollable) runs no
/// wasm, so the epoch cannot stop it: each of these waits must still end at the call's deadline.
#[test]
fn host_waits_end_at_the_deadline() {
    let pool = Arc::new(pool(true, Isolation::Reuse));
    for command in ["sleep", "stdin", "clock-poll", "clock-block"] {
        times_out_at_the_deadline(&pool, command);
    }
}

/// The same from where the pipeline calls guests: awaited on a runtime's worker thread, where
/// a wait that does not end would hold that worker.
#[test]
fn host_waits_end_at_the_deadline_awaited_on_a_runtime_worker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = Arc::new(pool(true, Isolation::Reuse));
    for command in ["sleep", "stdin", "clock-poll", "clock-block"] {
        times_out_at_the_deadline_by(&pool, command, &on_a_worker(&runtime));
    }
}

/// A guest that computes without end on a runtime's only worker thread leaves it to the other
/// tasks at every epoch tick: a timer task beside it keeps firing on time until the guest's
/// deadline ends it.
#[test]
fn a_computing_guest_does_not_starve_the_tasks_beside_it() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let timeout = Duration::from_secs(1);
    let pool = pool_with_timeout(true, Isolation::Reuse, timeout);
    let (outcome, ticks, worst) = runtime.block_on(async move {
        let running = Arc::new(AtomicBool::new(true));
        let (ticking, ticked) = tokio::sync::oneshot::channel();
        let timer = tokio::spawn({
            let running = running.clone();
            async move {
                let (mut ticking, mut ticks, mut worst) = (Some(ticking), 0u32, Duration::ZERO);
                while running.load(Ordering::SeqCst) {
                    let before = Instant::now();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    worst = worst.max(before.elapsed());
                    ticks += 1;
                    if let Some(t) = ticking.take() {
                        let _ = t.send(());
                    }
                }
                (ticks, worst)
            }
        });
        // The guest starts once the timer runs, and the timer runs until the guest is done.
        ticked.await.expect("the timer ticks");
        let call = tokio::spawn(async move {
            pool.invoke_async(msg("loop"), lockgate::engine::Staging::Direct)
                .await
        });
        let outcome = call.await.expect("call task").outcome;
        running.store(false, Ordering::SeqCst);
        let (ticks, worst) = timer.await.expect("timer task");
        (outcome, ticks, worst)
    });
    assert_eq!(outcome, Outcome::TimedOut { timeout });
    // Without the yields the timer would not fire at all until the guest's deadline (1 s).
    assert!(
        worst < Duration::from_millis(100) && ticks >= 20,
        "a 1 ms sleep beside the guest took up to {worst:?} ({ticks} sleeps in 1 s)"
    );
}

/// A kv call to a store that accepts the connection and never answers (a TCP listener that
/// nobody reads: the kernel completes the handshake) ends at the call's deadline too, instead of
/// after the store's own connection and response timeouts (seconds).
#[test]
fn kv_call_to_a_silent_store_ends_at_the_deadline() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}", silent.local_addr().expect("addr"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let store = {
        let _enter = runtime.enter();
        lockgate::state::RedisStore::new(&url, "sandbox").expect("store")
    };
    let limits = HandlerLimits {
        timeout: TIMEOUT,
        ..HandlerLimits::default()
    };
    let mut env = handler_env("adversarial", &[], limits);
    env.kv = Arc::new(store);
    let pool = Arc::new(guest_pool("adversarial", true, Isolation::Reuse, env));
    // Blocking (`lockgate test`), and awaited on a worker (the pipeline).
    times_out_at_the_deadline(&pool, "kv-get");
    times_out_at_the_deadline_by(&pool, "kv-get", &on_a_worker(&runtime));
    drop(silent);
}
