//! The library's modules form layers (docs/architecture.md#layers): a module imports only modules
//! of a lower layer. This test reads every `crate::` path in `runtime/src` and fails on one that
//! runs sideways or upward, so the order written in the docs stays the order of the code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every top-level module of the library with its layer. Keep in step with the table in
/// docs/architecture.md; a module missing here fails the test.
const LAYERS: &[(&str, u8)] = &[
    ("message", 0),
    ("policy", 0),
    ("health", 0),
    ("deadline", 0),
    ("metrics", 0),
    ("config", 1),
    ("dlq", 1),
    ("project", 1),
    ("state", 2),
    ("broker", 3),
    ("engine", 3),
    ("fixture", 4),
    ("pipeline", 4),
    ("telemetry", 5),
    ("app", 6),
];

/// Files of the binary, not the library: their `crate::` is the binary's own.
const BINARY: &[&str] = &["main", "cli"];

/// One `crate::` path that does not point down.
#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// The top-level module a file under `src` belongs to (`broker/kafka.rs` -> `broker`).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.strip_suffix(".rs").unwrap_or(first).to_owned())
}

/// The modules named by `crate::<module>` on a line of code (comments excepted).
fn targets(line: &str) -> Vec<&str> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    // A trailing comment may mention a path; only the code before it counts.
    let code = code.split(" //").next().unwrap_or(code);
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `$crate::` in a macro is not a path of this crate.
            !code[..*i].ends_with('$')
        })
        .filter_map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (end > 0).then(|| &rest[..end])
        })
        .collect()
}

/// The violations in one file of module `from`, given the layer table.
fn check_file(
    layers: &BTreeMap<&str, u8>,
    file: &str,
    from: &str,
    text: &str,
) -> Result<Vec<Violation>, String> {
    let Some(&own) = layers.get(from) else {
        return Err(format!(
            "{file}: module `{from}` has no layer: add it to LAYERS in runtime/tests/layering.rs and to the table in docs/architecture.md"
        ));
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for to in targets(line) {
            if to == from {
                continue;
            }
            // Only modules of the crate have a layer; anything else after `crate::` (a macro
            // exported at the root, an item of lib.rs) is not an edge between layers.
            let Some(&theirs) = layers.get(to) else {
                continue;
            };
            if theirs >= own {
                out.push(Violation {
                    file: file.to_owned(),
                    line: n + 1,
                    from: from.to_owned(),
                    to: to.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_import_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut unplaced = Vec::new();
    let mut seen = 0;
    for path in files {
        let rel = path.strip_prefix(&src).expect("under src");
        let module = module_of(rel).expect("a file name");
        if module == "lib" || BINARY.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        match check_file(&layers, &rel.display().to_string(), &module, &text) {
            Ok(v) => violations.extend(v),
            Err(e) => unplaced.push(e),
        }
        seen += 1;
    }
    assert!(seen > 30, "only {seen} library files found under {src:?}");
    assert!(unplaced.is_empty(), "{}", unplaced.join("\n"));
    let listed: Vec<String> = violations
        .iter()
        .map(|v| {
            format!(
                "runtime/src/{}:{}: `{}` (layer {}) imports `{}` (layer {})",
                v.file,
                v.line,
                v.from,
                layers[v.from.as_str()],
                v.to,
                layers[v.to.as_str()]
            )
        })
        .collect();
    assert!(
        violations.is_empty(),
        "imports that do not point down (docs/architecture.md#layers):\n{}",
        listed.join("\n")
    );
}

/// The check itself: it must catch an upward and a sideways edge, and not be fooled by comments.
#[test]
fn the_check_sees_upward_and_sideways_edges() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let text = "\
use crate::message::Record;
use crate::pipeline::Route;
/// Unlike [`crate::pipeline::Route`], ...
// crate::telemetry is not imported here
let x = crate::engine::Engine::new(); // crate::telemetry
macro_rules! m { () => { $crate::pipeline::x() } }
";
    let found = check_file(&layers, "broker/x.rs", "broker", text).unwrap();
    assert_eq!(
        found,
        vec![
            Violation {
                file: "broker/x.rs".into(),
                line: 2,
                from: "broker".into(),
                to: "pipeline".into()
            },
            Violation {
                file: "broker/x.rs".into(),
                line: 5,
                from: "broker".into(),
                to: "engine".into()
            },
        ]
    );
    assert!(check_file(&layers, "newmodule.rs", "newmodule", "").is_err());
}

/// One registry picks a broker's connector by its kind (docs/architecture.md, "Adding a
/// broker"): outside `config` (which parses the kinds), only `app/clients.rs` may name a
/// `BrokerKind` variant, so a new kind is not a hunt through every file that opens a client.
#[test]
fn broker_kinds_are_matched_in_one_place() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut registry_arms = 0;
    let mut elsewhere = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        if rel.starts_with("config/") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            if !line.contains("BrokerKind::") || line.trim_start().starts_with("//") {
                continue;
            }
            if rel == "app/clients.rs" {
                registry_arms += 1;
            } else {
                elsewhere.push(format!("runtime/src/{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        registry_arms >= 3,
        "the registry in app/clients.rs has {registry_arms} arms"
    );
    assert!(
        elsewhere.is_empty(),
        "a broker kind is matched outside the registry (app/clients.rs::connector); give the connector a method instead:\n{}",
        elsewhere.join("\n")
    );
}
