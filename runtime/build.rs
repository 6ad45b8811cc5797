//! Embeds the guest SDKs, the WIT and the `lockgate new` templates in the binary, so `lockgate
//! new` and `lockgate build` work on a handler project anywhere, without lockgate's checkout
//! (docs/handlers/projects.md).
//!
//! Writes `$OUT_DIR/embedded.rs` with two lists of `(path, bytes)`: `SDK_FILES`, laid out as a
//! project's `lockgate-sdk/` folder, and `TEMPLATE_FILES`, as `runtime/templates/` holds them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("runtime/ is in the workspace")
        .to_owned();
    // (source in the checkout, place under lockgate-sdk/)
    let sdk_parts = [
        ("wit", "wit"),
        ("sdk/src", "rust/src"),
        ("sdk/macro/src", "rust-macro/src"),
        ("sdk/python/lockgate_sdk", "python/lockgate_sdk"),
        ("sdk/js", "js"),
        ("sdk/go", "go"),
        ("sdk/c", "c"),
    ];
    let mut out = String::new();
    out.push_str("/// The SDK files, by their path under a project's `lockgate-sdk/` folder.\n");
    out.push_str("pub static SDK_FILES: &[(&str, &[u8])] = &[\n");
    for (src, dst) in sdk_parts {
        for (rel, abs) in files(&root.join(src)) {
            writeln!(
                out,
                "    ({:?}, include_bytes!({:?})),",
                format!("{dst}/{rel}"),
                abs
            )
            .expect("write to a String");
        }
    }
    out.push_str("];\n");
    out.push_str("/// The `lockgate new` templates, by their path under `runtime/templates/`.\n");
    out.push_str("pub static TEMPLATE_FILES: &[(&str, &[u8])] = &[\n");
    for (rel, abs) in files(&manifest.join("templates")) {
        writeln!(out, "    ({rel:?}, include_bytes!({abs:?})),").expect("write to a String");
    }
    out.push_str("];\n");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    std::fs::write(out_dir.join("embedded.rs"), out).expect("write embedded.rs");
}

/// Every file below `dir` as (path relative to `dir` with `/`, absolute path), sorted, skipping
/// caches a local build leaves behind. Registers each directory and file with cargo.
fn files(dir: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    found.sort();
    found
}

fn walk(base: &Path, dir: &Path, found: &mut Vec<(String, String)>) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "__pycache__" || name == "node_modules" || name.ends_with(".pyc") {
            continue;
        }
        if path.is_dir() {
            walk(base, &path, found);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
            let rel = path
                .strip_prefix(base)
                .expect("below base")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            found.push((rel, path.display().to_string()));
        }
    }
}
