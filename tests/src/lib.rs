//! Helpers shared by the integration tests: where the built guests and the `lockgate` binary
//! are, and how to run the binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a guest example's component, built by this crate's build script.
///
/// `name` is the crate name (`uppercase`, `router`, `flaky`, `adversarial`, ...).
pub fn guest(name: &str) -> PathBuf {
    let p =
        PathBuf::from(env!("LOCKGATE_GUESTS_DIR")).join(format!("{}.wasm", name.replace('-', "_")));
    assert!(p.is_file(), "guest component {} was not built", p.display());
    p
}

/// The workspace root (for fixtures under `tests/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// Path of the `lockgate` binary of this build.
///
/// Test executables live in `<target>/<profile>/deps/`; the binary is built next to `deps/` by
/// `cargo test --workspace` (the README's test command).
pub fn lockgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary is in <target>/<profile>/deps");
    let bin = profile_dir.join("lockgate");
    assert!(
        bin.is_file(),
        "{} not found: run the tests with `cargo test --workspace` so the binary is built",
        bin.display()
    );
    bin
}

/// Runs `lockgate` with `args` in `dir` and returns its output.
pub fn lockgate(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(lockgate_bin())
        .current_dir(dir)
        .args(args)
        .env("LOCKGATE_LOG", "error")
        .output()
        .expect("cannot run lockgate")
}

/// Stdout and stderr of `out` as text, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
