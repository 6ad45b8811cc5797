//! What a handler is granted (docs/guarantees.md#g9), end to end through `lockgate run` on the
//! embedded broker: `config` secrets from an environment variable and a file, a host variable
//! named in `env` and a directory in `files` reach the guest; a handler without grants sees no
//! variable and no directory; nothing else of the host is reachable; a reload reads the secrets
//! again; and no secret value ever appears in a log line or in the output of `lockgate check` and
//! `lockgate status`.

use std::path::Path;
use std::time::Duration;

use lockgate::broker::local::LocalBroker;
use lockgate::message::OutRecord;
use lockgate_tests::admin::{admin_addr, reloads};
use lockgate_tests::{Proc, guest, run_logs, show, start_run_with_env, wait_for_progress};

const DEADLINE: Duration = Duration::from_secs(120);

fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"
admin = "127.0.0.1:0"
watch = "off"

[handlers.granted]
module = "{module}"
config = {{ region = "eu", api_key = {{ env = "LOCKGATE_GRANTS_API_KEY" }}, pem = {{ file = "secrets/pay.pem" }} }}
env = ["LOCKGATE_GRANTS_PASSED"]
files = [{{ host = "data", guest = "/data" }}]

[handlers.bare]
module = "{module}"

[routes.granted]
handler = "granted"
source = {{ topic = "granted", group = "grants" }}
outputs = ["out"]
concurrency = 1
retry = {{ max_attempts = 1 }}

[routes.bare]
handler = "bare"
source = {{ topic = "bare", group = "grants" }}
outputs = ["out"]
concurrency = 1
retry = {{ max_attempts = 1 }}
"#,
            module = guest("adversarial").display()
        ),
    )
    .expect("config");
    config
}

/// Sends each command to `topic` and waits for its answer on `out` (the routes run one message
/// at a time, and each command publishes one answer, its refusal included); the answers.
fn ask(
    broker: &LocalBroker,
    child: &mut Proc,
    dir: &Path,
    topic: &str,
    commands: &[&str],
) -> Vec<String> {
    let from = broker.end_offset("out").expect("end offset");
    let records: Vec<OutRecord> = commands
        .iter()
        .map(|c| OutRecord {
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: c.as_bytes().to_vec(),
        })
        .collect();
    broker.append(&records).expect("append");
    let target = from + commands.len() as u64;
    wait_for_progress(
        child,
        dir,
        1,
        target,
        DEADLINE,
        Duration::from_millis(10),
        || broker.end_offset("out").expect("end offset"),
    );
    broker
        .read("out", from, commands.len())
        .expect("read")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

fn assert_hidden(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        for line in text.lines() {
            assert!(!line.contains(s), "{what} shows secret {s:?}: {line}");
        }
    }
}

#[test]
fn grants_reach_the_guest_and_secret_values_are_never_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    std::fs::create_dir(dir.path().join("secrets")).expect("mkdir");
    std::fs::create_dir(dir.path().join("data")).expect("mkdir");
    // Values unlikely to appear by chance in a log line.
    let env_secret = "env-s3cret-7f1c9a";
    let file_secret = "file-s3cret-2b8e4d";
    let rotated = "file-s3cret-rotated-91d0";
    std::fs::write(
        dir.path().join("secrets/pay.pem"),
        format!("{file_secret}\n"),
    )
    .expect("write");
    std::fs::write(dir.path().join("data/hello.txt"), "hello from the host").expect("write");
    // A link out of the granted directory leads nowhere.
    std::os::unix::fs::symlink("../secrets/pay.pem", dir.path().join("data/link")).expect("ln");
    let env = [
        ("LOCKGATE_GRANTS_API_KEY", env_secret),
        ("LOCKGATE_GRANTS_PASSED", "passed-value"),
        ("LOCKGATE_GRANTS_HIDDEN", "not-granted"),
    ];
    let secrets = [env_secret, file_secret, rotated];

    // `lockgate check` reads the same values, and shows none of them.
    let check = std::process::Command::new(lockgate_tests::lockgate_bin())
        .current_dir(dir.path())
        .args(["check", "runtime.toml"])
        .envs(env)
        .output()
        .expect("lockgate check");
    assert!(check.status.success(), "{}", show(&check));
    assert_hidden("lockgate check", &show(&check), &secrets);

    let broker = LocalBroker::open(&dir.path().join("state/local")).expect("broker");
    let mut child = start_run_with_env(dir.path(), &config, 1, None, "lockgate=trace,info", &env);
    let addr = admin_addr(&mut child, dir.path(), 1);

    let answers = ask(
        &broker,
        &mut child,
        dir.path(),
        "granted",
        &[
            "config region",
            "config api_key",
            "config pem",
            "getenv LOCKGATE_GRANTS_PASSED",
            "getenv LOCKGATE_GRANTS_HIDDEN",
            "getenv LOCKGATE_GRANTS_API_KEY",
            "env",
            "read /data/hello.txt",
            "write /data/new.txt",
            "read /data/../secrets/pay.pem",
            "read /etc/passwd",
            "read /data/link",
        ],
    );
    assert_eq!(answers[0], "config region: eu");
    assert_eq!(answers[1], format!("config api_key: {env_secret}"));
    // A file's trailing newline is dropped, as for every secret.
    assert_eq!(answers[2], format!("config pem: {file_secret}"));
    assert_eq!(answers[3], "getenv LOCKGATE_GRANTS_PASSED: passed-value");
    assert_eq!(answers[4], "getenv LOCKGATE_GRANTS_HIDDEN: none");
    assert_eq!(answers[5], "getenv LOCKGATE_GRANTS_API_KEY: none");
    assert_eq!(
        answers[6],
        "env: 1 vars (LOCKGATE_GRANTS_PASSED); secret: none"
    );
    assert_eq!(answers[7], "read: hello from the host");
    assert!(answers[8].starts_with("denied: "), "{}", answers[8]);
    assert!(answers[9].starts_with("denied: "), "{}", answers[9]);
    assert!(answers[10].starts_with("denied: "), "{}", answers[10]);
    assert!(answers[11].starts_with("denied: "), "{}", answers[11]);
    assert!(!dir.path().join("data/new.txt").exists());

    // Deny by default: the same module without grants.
    let bare = ask(
        &broker,
        &mut child,
        dir.path(),
        "bare",
        &[
            "env",
            "read /data/hello.txt",
            "config api_key",
            "getenv LOCKGATE_GRANTS_PASSED",
        ],
    );
    assert_eq!(bare[0], "env: 0 vars; secret: none");
    assert!(bare[1].starts_with("denied: "), "{}", bare[1]);
    assert_eq!(bare[2], "config api_key: none");
    assert_eq!(bare[3], "getenv LOCKGATE_GRANTS_PASSED: none");

    // `lockgate status` shows none of them either.
    let status = lockgate_tests::lockgate(
        dir.path(),
        &["status", "--admin", &addr, "--interval-ms", "100"],
    );
    assert!(status.status.success(), "{}", show(&status));
    assert_hidden("lockgate status", &show(&status), &secrets);

    // A reload reads the secrets again: a rotated file reaches the guest without a restart.
    std::fs::write(dir.path().join("secrets/pay.pem"), rotated).expect("write");
    lockgate_tests::signal(&child, "HUP");
    wait_for_progress(
        &mut child,
        dir.path(),
        1,
        1,
        DEADLINE,
        Duration::from_millis(20),
        || reloads(&addr).0,
    );
    let answers = ask(&broker, &mut child, dir.path(), "granted", &["config pem"]);
    assert_eq!(answers, [format!("config pem: {rotated}")]);

    // A granted directory that is gone refuses the reload, naming the field; the version
    // running keeps serving.
    std::fs::remove_dir_all(dir.path().join("data")).expect("rm");
    lockgate_tests::signal(&child, "HUP");
    wait_for_progress(
        &mut child,
        dir.path(),
        1,
        1,
        DEADLINE,
        Duration::from_millis(20),
        || reloads(&addr).1,
    );
    let logs = run_logs(dir.path(), 1);
    assert!(
        logs.contains("runtime.toml: handlers.granted.files[0].host: directory ")
            && logs.contains("data: No such file or directory"),
        "{logs}"
    );
    let answers = ask(
        &broker,
        &mut child,
        dir.path(),
        "granted",
        &["config region"],
    );
    assert_eq!(answers, ["config region: eu"]);

    lockgate_tests::stop_run(&mut child, dir.path(), 1);
    let logs = run_logs(dir.path(), 1);
    // The run logged at trace level, so this covers every line lockgate writes.
    assert!(logs.lines().count() > 5, "{logs}");
    assert_hidden("lockgate run", &logs, &secrets);
}
