//! The Python guests (`guest-examples/python/`, SDK in `sdk/python/`): built by
//! `lockgate build` (which installs componentize-py on first use and rebuilds only what
//! changed), then run through `lockgate test --expect`. The router must pass the same fixture
//! as the Rust router; the hostile guest must find files, sockets and env vars denied. A missing
//! toolchain fails these tests: they never skip.

use std::path::PathBuf;
use std::process::Command;

mod guest_lang;

use lockgate_tests::{lockgate, show, workspace_root};

/// Path of Python guest `name`, built with `lockgate build`.
fn python_guest(name: &str) -> PathBuf {
    guest_lang::build("python", name)
}

fn run_fixture(wasm: &std::path::Path, fixture: &str, extra: &[&str]) -> std::process::Output {
    let input = format!("tests/fixtures/{fixture}/input.jsonl");
    let expect = format!("tests/fixtures/{fixture}/expected.jsonl");
    let mut args = vec![
        "test",
        wasm.to_str().expect("utf-8 path"),
        "--input",
        &input,
        "--expect",
        &expect,
    ];
    args.extend_from_slice(extra);
    lockgate(&workspace_root(), &args)
}

#[test]
fn python_router_matches_the_shared_router_fixture() {
    let out = run_fixture(
        &python_guest("router"),
        "router",
        &[
            "-c",
            "route.order=orders",
            "-c",
            "route.refund=refunds",
            "-c",
            "default=misc",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("5 message(s): 3 ok, 2 reject"), "{stdout}");
    assert!(stdout.contains("all 5 message(s) match"), "{stdout}");
}

#[test]
fn python_router_keeps_the_key_and_explains_rejections() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("in.jsonl"),
        concat!(
            "{\"payload\": \"{\\\"kind\\\": \\\"order\\\"}\", \"key\": \"alice\"}\n",
            "{\"payload\": \"[1, 2]\"}\n",
            "{\"payload\": \"{\\\"kind\\\": 7}\"}\n",
            "{\"payload\": \"{\\\"kind\\\": \\\"other\\\"}\"}\n",
        ),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("expected.jsonl"),
        concat!(
            "{\"outcome\": \"ok\", \"published\": [{\"topic\": \"orders\", \"key\": \"alice\", \"payload\": \"{\\\"kind\\\": \\\"order\\\"}\"}]}\n",
            "{\"outcome\": \"reject\", \"reason\": \"missing `kind` field\"}\n",
            "{\"outcome\": \"reject\", \"reason\": \"`kind` must be a string, got int\"}\n",
            "{\"outcome\": \"reject\", \"reason\": \"no route for kind `other` and no `default`\"}\n",
        ),
    )
    .expect("write");
    let wasm = python_guest("router");
    let out = lockgate(
        dir.path(),
        &[
            "test",
            wasm.to_str().expect("utf-8 path"),
            "-i",
            "in.jsonl",
            "-e",
            "expected.jsonl",
            "-c",
            "route.order=orders",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn python_guest_gets_no_file_socket_or_env() {
    let out = run_fixture(&python_guest("hostile"), "python-sandbox", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("5 message(s): 4 ok, 1 trapped"), "{stdout}");
    assert!(stdout.contains("all 5 message(s) match"), "{stdout}");
    // An exception the SDK does not map traps the call, with the traceback in the call's logs.
    assert!(
        stdout.contains("stderr warn: RuntimeError: a bug in the handler"),
        "{stdout}"
    );
    assert!(!stdout.contains("ALLOWED"), "{stdout}");
    assert!(!stdout.contains("root:"), "file content leaked: {stdout}");
}

/// The Python SDK's own rules, checked in plain CPython against stand-ins for the generated
/// bindings (what they record is what the host would get): an int is stored as its digits,
/// other non-byte values are refused, and `@handler` refuses an `async def` when the module is
/// imported (which is when componentize-py builds, so the build fails and names it).
#[test]
fn the_python_sdk_stores_numbers_as_digits_and_refuses_async_handlers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = [
        (
            "componentize_py_types.py",
            "class Err(Exception):\n    def __init__(self, value):\n        self.value = value\n",
        ),
        ("wit_world/__init__.py", "class WitWorld:\n    pass\n"),
        ("wit_world/imports/__init__.py", ""),
        ("wit_world/imports/emit.py", ""),
        ("wit_world/imports/types.py", ""),
        ("wit_world/imports/config.py", ""),
        (
            "wit_world/imports/log.py",
            "import enum\n\nclass Level(enum.Enum):\n    TRACE = 0\n    DEBUG = 1\n    INFO = 2\n    WARN = 3\n    ERROR = 4\n",
        ),
        (
            "wit_world/imports/kv.py",
            "calls = []\n\ndef set(key, value, ttl):\n    calls.append((key, value, ttl))\n",
        ),
        (
            "probe.py",
            r#"from lockgate_sdk import handler, kv
from wit_world.imports import kv as stub

kv.set("n", 2)
kv.set("s", "2")
assert stub.calls == [("n", b"2", None), ("s", b"2", None)], stub.calls
for bad in (2.5, True, {"a": 1}):
    try:
        kv.set("x", bad)
    except TypeError as e:
        assert "value must be bytes, str or int" in str(e), e
    else:
        raise AssertionError(f"{bad!r} was accepted")
try:
    @handler
    async def handle(msg):
        pass
except TypeError as e:
    assert "async def" in str(e), e
else:
    raise AssertionError("an async def handler was accepted")
print("sdk ok")
"#,
        ),
    ];
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
    }
    let sdk = workspace_root().join("sdk/python");
    let out = Command::new("python3")
        .arg("probe.py")
        .current_dir(dir.path())
        .env(
            "PYTHONPATH",
            format!("{}:{}", dir.path().display(), sdk.display()),
        )
        .output()
        .expect("cannot run python3");
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sdk ok"),
        "{}",
        show(&out)
    );
}

#[path = "guest_lang/sql_probe.rs"]
mod sql_probe;

/// The Python SQL helper sends and reads every value kind, and reports every error, as the
/// Rust SDK does (guest-examples/python/sql-probe against guest-examples/sql-probe).
#[test]
fn python_sql_helper_matches_the_rust_sdk_on_postgres() {
    sql_probe::probe_matches_the_rust_probe(&python_guest("sql-probe"));
}

#[path = "guest_lang/sql.rs"]
mod sql;

#[test]
fn python_ledger_matches_the_rust_example() {
    sql::ledger_matches_the_rust_example("python");
}
