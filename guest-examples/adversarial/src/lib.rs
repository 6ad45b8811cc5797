//! Misbehaves as its payload commands (`loop`, `oom`, `recurse`, `recurse-memory`, `read-file`, `socket <addr>`,
//! `env`, `publish-big`, `stdout`, `remember`, `sleep`, `stdin`, `clock-poll`, `clock-block`, `kv-get`;
//! anything else is echoed to `out`), to test the host sandbox. It also reports what it was
//! granted: `config <key>`, `getenv <name>`, `read <path>` and `write <path>`.

use std::hint::black_box;
use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lockgate_sdk::{Error, Message, emit};

/// The WASI 0.2.0 interfaces the clock probes call directly, exactly as WASI defines them (the
/// toolchain's own imports of the same interfaces merge with these).
mod raw {
    #![allow(missing_docs)]

    wit_bindgen::generate!({
        inline: r#"
            package lockgate:adversarial;

            world probes {
                import wasi:clocks/monotonic-clock@0.2.0;
            }

            package wasi:io@0.2.0 {
                interface poll {
                    resource pollable {
                        ready: func() -> bool;
                        block: func();
                    }
                    poll: func(in: list<borrow<pollable>>) -> list<u32>;
                }
            }

            package wasi:clocks@0.2.0 {
                interface monotonic-clock {
                    use wasi:io/poll@0.2.0.{pollable};
                    type instant = u64;
                    type duration = u64;
                    now: func() -> instant;
                    resolution: func() -> duration;
                    subscribe-instant: func(when: instant) -> pollable;
                    subscribe-duration: func(when: duration) -> pollable;
                }
            }
        "#,
        generate_all,
    });
}

use raw::wasi::clocks::monotonic_clock;

/// How long the waiting probes wait: far past any deadline a test sets.
const LONG_WAIT: Duration = Duration::from_secs(10);

#[lockgate_sdk::handler]
fn handle(msg: Message) -> Result<(), Error> {
    let text = std::str::from_utf8(msg.payload())
        .unwrap_or_default()
        .trim();
    let (command, arg) = text.split_once(' ').unwrap_or((text, ""));
    match command {
        "loop" => spin(),
        "oom" => exhaust_memory(),
        "recurse" => {
            black_box(recurse_wasm_stack(black_box(u64::MAX)));
            Ok(())
        }
        "recurse-memory" => {
            recurse(0);
            Ok(())
        }
        "read-file" => report(
            std::fs::read_to_string("/etc/passwd")
                .map(|text| format!("LEAK: {}", text.chars().take(40).collect::<String>())),
        ),
        "socket" => {
            report(std::net::TcpStream::connect(arg.trim()).map(|_| "LEAK: connected".into()))
        }
        "env" => {
            let names: Vec<String> = std::env::vars_os()
                .map(|(name, _)| name.to_string_lossy().into_owned())
                .collect();
            let listed = if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            };
            let secret = std::env::var("LOCKGATE_SECRET").unwrap_or_else(|_| "none".into());
            Ok(emit::publish(
                "out",
                format!("env: {} vars{listed}; secret: {secret}", names.len()),
            )?)
        }
        "config" => {
            let value = lockgate_sdk::config::get(arg).unwrap_or_else(|| "none".into());
            Ok(emit::publish("out", format!("config {arg}: {value}"))?)
        }
        "getenv" => {
            let value = std::env::var(arg).unwrap_or_else(|_| "none".into());
            Ok(emit::publish("out", format!("getenv {arg}: {value}"))?)
        }
        "read" => report(std::fs::read_to_string(arg).map(|text| format!("read: {text}"))),
        "write" => {
            report(std::fs::write(arg, "written by the guest").map(|()| "LEAK: wrote".into()))
        }
        "publish-big" => {
            // Swallowing the refusal is the point: the host must fail the invocation anyway.
            if let Err(err) = emit::publish("out", vec![b'x'; 10 * 1024 * 1024]) {
                lockgate_sdk::warn!("publish-big refused: {err}");
            }
            Ok(())
        }
        "remember" => {
            // State that outlives a call: a static (data section) and heap blocks (heap pages).
            // A reused instance counts up; a fresh one must start from its initial memory.
            static CALLS: AtomicU32 = AtomicU32::new(0);
            static HEAP: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
            let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
            let mut heap = HEAP
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            heap.push(vec![0xa5; 64 * 1024]);
            let marked = heap.iter().filter(|b| b.iter().all(|x| *x == 0xa5)).count();
            Ok(emit::publish(
                "out",
                format!("calls {calls}, heap blocks {marked}"),
            )?)
        }
        "stdout" => {
            println!("hello from stdout");
            eprintln!("hello from stderr");
            Ok(())
        }
        // Waits in the host, where no epoch interrupt reaches it: the host must bound each wait.
        "sleep" => {
            std::thread::sleep(LONG_WAIT);
            Ok(emit::publish("out", "woke up")?)
        }
        "stdin" => {
            let text = read_stdin_until_data();
            Ok(emit::publish("out", format!("stdin: {text}"))?)
        }
        "clock-poll" => {
            let timer = monotonic_clock::subscribe_duration(nanos(LONG_WAIT));
            let ready = raw::wasi::io::poll::poll(&[&timer]);
            Ok(emit::publish("out", format!("clock ready: {ready:?}"))?)
        }
        "clock-block" => {
            monotonic_clock::subscribe_duration(nanos(LONG_WAIT)).block();
            Ok(emit::publish("out", "clock ready")?)
        }
        "kv-get" => {
            let found = lockgate_sdk::kv::get("probe");
            Ok(emit::publish("out", format!("kv: {found:?}"))?)
        }
        _ => Ok(emit::publish("out", msg.payload())?),
    }
}

/// Reads stdin until it yields data, retrying on end-of-file and errors: a guest that insists on
/// input the host never gives.
fn read_stdin_until_data() -> String {
    let mut buf = [0_u8; 256];
    loop {
        if let Ok(n @ 1..) = std::io::stdin().read(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Publishes what a sandbox probe found: `denied: <error>` or the leak.
fn report(outcome: std::io::Result<String>) -> Result<(), Error> {
    let text = outcome.unwrap_or_else(|err| format!("denied: {err}"));
    Ok(emit::publish("out", text)?)
}

/// Never returns; `black_box` keeps the optimiser from deleting the side-effect-free loop.
fn spin() -> ! {
    let mut counter = 0_u64;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB blocks until allocation fails (which aborts, i.e. traps).
fn exhaust_memory() -> ! {
    let mut blocks = Vec::new();
    loop {
        let mut block = vec![0_u8; 1 << 20];
        // Touch every page so the memory is really committed, not just reserved.
        block.iter_mut().step_by(4096).for_each(|byte| *byte = 1);
        blocks.push(black_box(block));
    }
}

/// Recursion whose frames live only on the wasm call stack (no locals spilled to linear memory),
/// so it exhausts the engine's stack: a `StackOverflow` trap.
#[inline(never)]
fn recurse_wasm_stack(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let below = recurse_wasm_stack(n - 1);
    // Not associative, so the compiler cannot turn this into a loop with an accumulator.
    below ^ (below >> 3) ^ n
}

/// Recursion with a large frame in linear memory: exhausts the guest's shadow stack, which
/// shows up as an out-of-bounds memory access trap.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    // An exit the compiler cannot prove unreachable, so this is not flagged as infinite.
    if black_box(depth) == u64::MAX {
        return depth;
    }
    let frame = black_box([depth; 64]);
    let below = recurse(black_box(depth + 1));
    frame[(below % 64) as usize].wrapping_add(below)
}

#[cfg(all(test, not(target_arch = "wasm32")))] // TestHost is native-only
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use lockgate_sdk::log::Level;
    use lockgate_sdk::testing::{Published, TestHost};

    fn run(host: &mut TestHost, payload: &str) -> Result<Vec<Published>, Error> {
        host.call(handle, Message::new(payload))?;
        Ok(host.take_published())
    }

    fn only_text(published: &[Published]) -> &str {
        assert_eq!(published.len(), 1, "{published:?}");
        assert_eq!(published[0].topic, "out");
        published[0].payload_str().unwrap()
    }

    #[test]
    fn echo_and_unknown_commands_publish_the_payload() {
        let mut host = TestHost::new();
        assert_eq!(only_text(&run(&mut host, "echo").unwrap()), "echo");
        assert_eq!(
            only_text(&run(&mut host, "hello there").unwrap()),
            "hello there"
        );
        host.call(handle, Message::new(vec![0xff, 0x00])).unwrap();
        assert_eq!(host.published()[0].payload, vec![0xff, 0x00]);
    }

    #[test]
    fn read_file_reports_denial_or_leak() {
        // Natively the file may well be readable; the sandbox test runs the component.
        let mut host = TestHost::new();
        let text = only_text(&run(&mut host, "read-file").unwrap()).to_owned();
        if let Some(leak) = text.strip_prefix("LEAK: ") {
            let expected: String = std::fs::read_to_string("/etc/passwd")
                .unwrap()
                .chars()
                .take(40)
                .collect();
            assert_eq!(leak, expected);
        } else {
            assert!(text.starts_with("denied: "), "{text}");
        }
    }

    #[test]
    fn socket_reports_connection_or_denial() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let mut host = TestHost::new();
        let connected = run(&mut host, &format!("socket {address}")).unwrap();
        assert_eq!(only_text(&connected), "LEAK: connected");
        let denied = run(&mut host, "socket not-an-address").unwrap();
        assert!(only_text(&denied).starts_with("denied: "));
    }

    #[test]
    fn env_reports_count_and_secret() {
        let mut host = TestHost::new();
        let text = only_text(&run(&mut host, "env").unwrap()).to_owned();
        let count = std::env::vars_os().count();
        assert!(text.starts_with(&format!("env: {count} vars")), "{text}");
        let secret = std::env::var("LOCKGATE_SECRET").unwrap_or_else(|_| "none".into());
        assert!(text.ends_with(&format!("; secret: {secret}")), "{text}");
    }

    #[test]
    fn config_getenv_read_and_write_report_what_they_find() {
        let mut host = TestHost::new().config("api_key", "k3y");
        assert_eq!(
            only_text(&run(&mut host, "config api_key").unwrap()),
            "config api_key: k3y"
        );
        assert_eq!(
            only_text(&run(&mut host, "config other").unwrap()),
            "config other: none"
        );
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            only_text(&run(&mut host, "getenv PATH").unwrap()),
            format!("getenv PATH: {path}")
        );
        let dir = std::env::temp_dir().join(format!("adversarial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.txt");
        let file = file.to_str().unwrap();
        assert_eq!(
            only_text(&run(&mut host, &format!("write {file}")).unwrap()),
            "LEAK: wrote"
        );
        assert_eq!(
            only_text(&run(&mut host, &format!("read {file}")).unwrap()),
            "read: written by the guest"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = run(&mut host, &format!("read {file}")).unwrap();
        assert!(only_text(&missing).starts_with("denied: "));
    }

    #[test]
    fn publish_big_swallows_the_refusal_but_the_host_still_fails() {
        let mut host = TestHost::new().max_output_bytes(1024 * 1024);
        let err = host.call(handle, Message::new("publish-big")).unwrap_err();
        assert!(err.is_reject());
        assert!(host.published().is_empty());
        assert_eq!(host.logs()[0].level, Level::Warn);

        let mut host = TestHost::new();
        host.call(handle, Message::new("publish-big")).unwrap();
        assert_eq!(host.published()[0].payload.len(), 10 * 1024 * 1024);
    }

    #[test]
    fn stdout_succeeds_without_publishing() {
        let mut host = TestHost::new();
        assert!(run(&mut host, "stdout").unwrap().is_empty());
    }
}
