//! Builds the guest examples for wasm32-wasip2 so integration tests always run current guests,
//! and tells the tests where they are (`LOCKGATE_GUESTS_DIR`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_owned();
    let guests = root.join("guest-examples");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one guest build per target dir.
    let target_root = out_dir.ancestors().nth(4).unwrap_or(&out_dir).to_owned();
    let guest_target = target_root.join("lockgate-guests");

    rerun_if_changed(&root.join("wit"));
    rerun_if_changed(&root.join("sdk"));
    rerun_if_changed(&guests.join("Cargo.toml"));
    rerun_if_changed(&guests.join("Cargo.lock"));
    if let Ok(entries) = std::fs::read_dir(&guests) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                rerun_if_changed(&p);
            }
        }
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&guest_target);
    // Variables cargo sets for *this* build script would leak host flags, wrappers (clippy) and
    // target overrides into the nested guest build.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the guest examples");
    if !status.success() {
        panic!(
            "building guest-examples for wasm32-wasip2 failed (see above). If the target is missing, run `rustup target add wasm32-wasip2` or `scripts/build-guests.sh`."
        );
    }
    println!(
        "cargo:rustc-env=LOCKGATE_GUESTS_DIR={}",
        guest_target.join("wasm32-wasip2").join("release").display()
    );
}

/// Registers `p` and, for a directory, every file below it (except `target/`): cargo's own
/// directory check was seen to miss an edited guest source, leaving a stale guest.
fn rerun_if_changed(p: &Path) {
    println!("cargo:rerun-if-changed={}", p.display());
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            let path = e.path();
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            if path.is_dir() {
                rerun_if_changed(&path);
            } else {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
