//! The container image and the Kubernetes manifests (docs/operate/production.md).
//!
//! The image is built by `scripts/build-image.sh` (buildah, FROM scratch) from this build's
//! `lockgate` binary (the release build the docs measure takes minutes; the image's layout,
//! libraries and user are the same), mounted with `buildah mount`, and run with `chroot` as its
//! non-root user: `lockgate --version`, `lockgate check` on the demo config and on the
//! manifests' ConfigMap (with the Secrets the Deployment provides), and `lockgate run` with the
//! image's own command until a message is handled. The manifests are read into the official
//! Kubernetes client's models by `deploy/kubernetes/validate.sh`.
//!
//! Needs root (buildah mount, chroot), buildah and python3 with venv; `.ci/run` installs them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lockgate_tests::{Proc, admin, guest, lockgate_bin, show, workspace_root};

/// The image's user (`scripts/build-image.sh` writes it into /etc/passwd).
const UID: u32 = 10001;

/// Where buildah keeps images: the build script's default, or `LOCKGATE_CONTAINERS`.
fn containers_dir() -> PathBuf {
    std::env::var_os("LOCKGATE_CONTAINERS").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/lockgate/containers")
        },
        PathBuf::from,
    )
}

/// `buildah ARGS` on the build script's storage.
fn buildah(args: &[&str]) -> Output {
    let storage = containers_dir();
    Command::new("buildah")
        .arg("--root")
        .arg(storage.join("storage"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .output()
        .expect("cannot run buildah: apt-get install buildah (.ci/run installs it)")
}

/// `buildah ARGS`, asserted to succeed; its stdout, trimmed.
fn buildah_ok(args: &[&str]) -> String {
    let out = buildah(args);
    assert!(out.status.success(), "buildah {args:?}\n{}", show(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An image built for one test and its working container, removed when dropped (vfs keeps a
/// full copy of each).
struct Image {
    tag: String,
    container: Option<String>,
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some(c) = self.container.take() {
            let _ = buildah(&["umount", &c]);
            let _ = buildah(&["rm", &c]);
        }
        let _ = buildah(&["rmi", "--force", &self.tag]);
    }
}

/// `deploy/kubernetes/validate.sh ARGS`; one at a time, since the first installs the venv.
fn validate_manifests(args: &[&str]) -> Output {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Command::new(workspace_root().join("deploy/kubernetes/validate.sh"))
        .args(args)
        .output()
        .expect("cannot run deploy/kubernetes/validate.sh")
}

/// `chroot --userspec=10001:10001 ROOT ARGS` with only `env`: the image's binary as its user.
fn in_image(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    // Found on this PATH, since the child's environment is cleared.
    let chroot = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("chroot"))
        .find(|p| p.is_file())
        .expect("chroot not found (coreutils)");
    let mut cmd = Command::new(chroot);
    cmd.arg(format!("--userspec={UID}:{UID}"))
        .arg(root)
        .args(args)
        .current_dir("/")
        .env_clear()
        .envs(env.iter().copied())
        .env("LOCKGATE_LOG", "warn");
    cmd
}

fn run_in_image(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    in_image(root, args, env)
        .output()
        .expect("cannot run chroot")
}

/// Every regular file of `dir`, relative to it.
fn files(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let t = e.file_type().expect("file type");
        if t.is_dir() {
            files(&e.path(), base, out);
        } else {
            out.push(e.path().strip_prefix(base).expect("inside").to_owned());
        }
    }
}

#[test]
fn image_runs_the_demo_and_the_manifests_config_as_its_non_root_user() {
    let started = Instant::now();
    assert_eq!(
        Command::new("id").arg("-u").output().expect("id").stdout,
        b"0\n",
        "this test needs root: buildah mount and chroot"
    );
    let tag = format!(
        "localhost/lockgate-test:{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis()
    );
    let mut image = Image {
        tag: tag.clone(),
        container: None,
    };
    let bin = lockgate_bin();
    let built = Command::new(workspace_root().join("scripts/build-image.sh"))
        .arg("--binary")
        .arg(&bin)
        .args(["--tag", &tag])
        .env("LOCKGATE_CONTAINERS", containers_dir())
        .output()
        .expect("cannot run scripts/build-image.sh");
    assert!(built.status.success(), "{}", show(&built));
    let printed = String::from_utf8_lossy(&built.stdout);
    assert!(printed.starts_with(&format!("{tag} ")), "{printed}");

    // The image's configuration: its user, command, port and volume.
    let inspect: serde_json::Value =
        serde_json::from_str(&buildah_ok(&["inspect", "--type", "image", &tag])).expect("json");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], format!("{UID}:{UID}"), "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/lockgate"])
    );
    assert!(config["ExposedPorts"].get("9464/tcp").is_some(), "{config}");
    assert!(
        config["Volumes"].get("/var/lib/lockgate").is_some(),
        "{config}"
    );
    let cmd: Vec<String> = serde_json::from_value(config["Cmd"].clone()).expect("Cmd");

    let container = buildah_ok(&["from", "--pull-never", &tag]);
    image.container = Some(container.clone());
    let root = PathBuf::from(buildah_ok(&["mount", &container]));

    // Nothing but the binary, the libraries it links, the users and the CA certificates: no
    // shell, compiler, package manager or coreutils.
    let mut all = Vec::new();
    files(&root, &root, &mut all);
    for f in &all {
        let s = f.to_string_lossy();
        let expected = matches!(
            &*s,
            "usr/local/bin/lockgate"
                | "etc/passwd"
                | "etc/group"
                | "etc/ssl/certs/ca-certificates.crt"
        ) || ((s.starts_with("lib/") || s.starts_with("lib64/"))
            && s.contains(".so"));
        assert!(expected, "unexpected file /{s} in the image: {all:?}");
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            ![
                "sh", "bash", "dash", "busybox", "cc", "gcc", "ld", "cargo", "rustc", "apt",
                "dpkg", "cp"
            ]
            .contains(&name),
            "/{s} is in the image"
        );
    }
    assert!(
        all.iter().any(|f| f.ends_with("libc.so.6")),
        "no libc: {all:?}"
    );
    let state = root.join("var/lib/lockgate");
    assert_eq!(std::fs::metadata(&state).expect("state dir").uid(), UID);
    assert_eq!(
        std::fs::metadata(root.join("var/lib"))
            .expect("var/lib")
            .uid(),
        0
    );

    let version = run_in_image(&root, &["/usr/local/bin/lockgate", "--version"], &[]);
    assert!(version.status.success(), "{}", show(&version));
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("lockgate "),
        "{}",
        show(&version)
    );

    // The manifests' ConfigMap, as the pod sees it: its modules under /modules, the
    // environment and the secret files the Deployment gives it. `lockgate check` reads every
    // secret, so a reference the Deployment does not satisfy fails here.
    let fixture = validate_manifests(&["--fixture"]);
    assert!(fixture.status.success(), "{}", show(&fixture));
    let fixture: serde_json::Value = serde_json::from_slice(&fixture.stdout).expect("fixture");
    let args: Vec<String> = serde_json::from_value(fixture["args"].clone()).expect("args");
    assert_eq!(
        args, cmd,
        "the Deployment's args are not the image's command"
    );
    let config_path = fixture["config_path"].as_str().expect("config_path");
    assert_eq!(config_path, "/etc/lockgate/runtime.toml");
    let inside = |p: &str| root.join(p.trim_start_matches('/'));
    std::fs::write(
        inside(config_path),
        fixture["runtime_toml"].as_str().expect("runtime_toml"),
    )
    .expect("write config");
    for name in ["router", "uppercase", "chaos"] {
        std::fs::copy(guest(name), root.join(format!("modules/{name}.wasm"))).expect("module");
    }
    for f in fixture["secret_files"].as_array().expect("secret_files") {
        let path = inside(f.as_str().expect("path"));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("secret dir");
        std::fs::write(&path, "not-a-real-secret\n").expect("secret file");
    }
    let env: Vec<(String, String)> = fixture["env"]
        .as_object()
        .expect("env")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let check = run_in_image(
        &root,
        &["/usr/local/bin/lockgate", "check", config_path],
        &env,
    );
    assert!(check.status.success(), "{}", show(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("ok (1 handler, 1 route)"),
        "{}",
        show(&check)
    );
    // Without the Secret's variables the same check fails: the check above did read them.
    let unset: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "LOCKGATE_REDIS_URL")
        .collect();
    let refused = run_in_image(
        &root,
        &["/usr/local/bin/lockgate", "check", config_path],
        &unset,
    );
    assert!(!refused.status.success(), "{}", show(&refused));

    // The demo config (README), mounted the same way: modules under /modules, the state on the
    // image's volume.
    let demo =
        std::fs::read_to_string(workspace_root().join("runtime.toml")).expect("runtime.toml");
    for from in [
        "guest-examples/target/wasm32-wasip2/release/",
        "state_dir = \".lockgate\"",
    ] {
        assert!(demo.contains(from), "runtime.toml has no {from:?}");
    }
    let demo = demo
        .replace("guest-examples/target/wasm32-wasip2/release/", "/modules/")
        .replace(
            "state_dir = \".lockgate\"",
            "state_dir = \"/var/lib/lockgate\"",
        );
    std::fs::write(inside(config_path), demo).expect("write demo config");
    let check = run_in_image(
        &root,
        &["/usr/local/bin/lockgate", "check", config_path],
        &[],
    );
    assert!(check.status.success(), "{}", show(&check));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("ok (3 handlers, 3 routes)"),
        "{}",
        show(&check)
    );
    // The compiled cache went to the volume, written by the image's user (a warning would say
    // it could not).
    assert!(
        !String::from_utf8_lossy(&check.stderr).contains("WARN"),
        "{}",
        show(&check)
    );
    let cached: Vec<_> = std::fs::read_dir(state.join("cache"))
        .expect("cache dir on the volume")
        .flatten()
        .collect();
    assert_eq!(cached.len(), 3, "{cached:?}");
    for c in &cached {
        assert_eq!(c.metadata().expect("metadata").uid(), UID);
    }

    // The image's own command (with the admin endpoint on a free loopback port, as other tests
    // run beside this one) handles a message and stops cleanly on SIGTERM.
    let send = run_in_image(
        &root,
        &[
            "/usr/local/bin/lockgate",
            "send",
            "words",
            "hello from the image",
            config_path,
            "--state-dir",
            "/var/lib/lockgate",
        ],
        &[],
    );
    assert!(send.status.success(), "{}", show(&send));
    let admin_at = cmd
        .iter()
        .position(|a| a == "--admin")
        .expect("the command sets --admin");
    let mut run_args = vec!["/usr/local/bin/lockgate".to_owned()];
    run_args.extend(cmd.iter().cloned());
    run_args[admin_at + 2] = "127.0.0.1:0".to_owned();
    let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
    let logs = tempfile::tempdir().expect("tempdir");
    let log = |n: &str| std::fs::File::create(logs.path().join(n)).expect("log file");
    let mut run = Proc(
        in_image(&root, &run_args, &[])
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"))
            .spawn()
            .expect("cannot start lockgate run"),
    );
    let read_logs = || {
        let r = |n: &str| std::fs::read_to_string(logs.path().join(n)).unwrap_or_default();
        format!("{}{}", r("stdout"), r("stderr"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let text = read_logs();
        if let Some(a) = text
            .split("admin endpoint on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
        {
            break a.to_owned();
        }
        assert!(run.try_wait().expect("status").is_none(), "exited\n{text}");
        assert!(Instant::now() < deadline, "no admin endpoint\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(admin::get(&addr, "/healthz").0, 200);
    loop {
        let (ready, _) = admin::get(&addr, "/readyz");
        let page = admin::get(&addr, "/metrics").1;
        if ready == 200
            && admin::value(&page, "lockgate_messages_succeeded_total", "shout") == Some(1.0)
        {
            break;
        }
        assert!(
            run.try_wait().expect("status").is_none(),
            "exited\n{}",
            read_logs()
        );
        assert!(
            Instant::now() < deadline,
            "not handled\n{page}\n{}",
            read_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lockgate_tests::signal(&run, "TERM");
    let status = run.wait().expect("status");
    assert!(status.success(), "{status}\n{}", read_logs());
    let tail = run_in_image(
        &root,
        &[
            "/usr/local/bin/lockgate",
            "tail",
            "shouted",
            config_path,
            "--state-dir",
            "/var/lib/lockgate",
        ],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&tail.stdout).contains("HELLO FROM THE IMAGE"),
        "{}",
        show(&tail)
    );
    drop(image);
    assert!(
        !buildah(&["images", "--quiet", &tag]).status.success()
            || buildah_ok(&["images", "--quiet", &tag]).is_empty(),
        "the test image was not removed"
    );
    eprintln!("image test took {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn kubernetes_manifests_are_valid_objects() {
    let out = validate_manifests(&[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(": ok"),
        "{}",
        show(&out)
    );
}
