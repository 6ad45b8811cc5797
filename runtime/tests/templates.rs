//! The handler project templates of `lockgate new` (runtime/templates/README.md), checked without
//! the guest toolchains: every language has the files a project needs, `{{name}}` and `{{component}}`
//! are the only placeholders, the fixtures and runtime.toml are the same in every language and are valid, and
//! the vendored Rust SDK manifests match the workspace they were written out from. (That each
//! handler builds and passes its fixtures needs the toolchains; see the templates' README.)

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use lockgate::config::Config;

const LANGUAGES: &[(&str, &[&str])] = &[
    ("rust", &["Cargo.toml", "src/lib.rs"]),
    ("python", &["app.py"]),
    ("javascript", &["handler.js"]),
    ("go", &["handler.go"]),
    ("c", &["handler.c"]),
];

/// Files every project has, whatever its language.
const COMMON: &[&str] = &[
    "README.md",
    "runtime.toml",
    ".gitignore",
    "fixtures/input.jsonl",
    "fixtures/expected.jsonl",
];

fn templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).expect("under dir").to_owned());
            }
        }
    }
    out.sort();
    out
}

/// Every `{{...}}` in `text` that is not `{{name}}` (the handler's name) or `{{component}}`
/// (the project directory's name, which `lockgate build` names the component after).
fn other_placeholders(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start..];
        let end = after.find("}}").map_or(after.len(), |e| e + 2);
        if !["{{name}}", "{{component}}"].contains(&&after[..end]) {
            out.push(after[..end.min(40)].to_owned());
        }
        rest = &after[end.min(after.len())..];
    }
    out
}

#[test]
fn every_language_has_the_project_files_and_only_the_two_placeholders() {
    for (language, sources) in LANGUAGES {
        let dir = templates().join(language);
        for file in COMMON.iter().chain(sources.iter()) {
            assert!(dir.join(file).is_file(), "{language}: {file} is missing");
        }
        for file in files(&dir) {
            let text = read(&dir.join(&file));
            let others = other_placeholders(&text);
            assert!(
                others.is_empty(),
                "{language}/{}: placeholders other than {{{{name}}}} and {{{{component}}}}: {others:?}",
                file.display()
            );
        }
        let readme = read(&dir.join("README.md"));
        for needle in [
            "lockgate build",
            "lockgate test",
            "lockgate run",
            "lockgate send",
            "lockgate tail",
            "docs/operate/brokers/",
        ] {
            assert!(
                readme.contains(needle),
                "{language}/README.md lacks {needle:?}"
            );
        }
        assert!(
            !readme.contains("](."),
            "{language}/README.md has a relative link; a project lives outside the checkout"
        );
    }
}

#[test]
fn fixtures_and_runtime_toml_are_the_same_in_every_language_and_valid() {
    let reference = templates().join(LANGUAGES[0].0);
    for (language, _) in &LANGUAGES[1..] {
        for file in [
            "runtime.toml",
            "fixtures/input.jsonl",
            "fixtures/expected.jsonl",
        ] {
            assert_eq!(
                read(&templates().join(language).join(file)),
                read(&reference.join(file)),
                "{language}/{file} differs from {}/{file}",
                LANGUAGES[0].0
            );
        }
    }

    let inputs = lockgate::fixture::parse_inputs(&read(&reference.join("fixtures/input.jsonl")))
        .unwrap_or_else(|e| panic!("fixtures/input.jsonl: {e:?}"));
    let expected =
        lockgate::fixture::parse_expectations(&read(&reference.join("fixtures/expected.jsonl")))
            .unwrap_or_else(|e| panic!("fixtures/expected.jsonl: {e:?}"));
    assert_eq!(inputs.len(), expected.len(), "one expectation per message");
    let outcomes: Vec<_> = expected.iter().map(|(_, e)| e["outcome"].clone()).collect();
    for outcome in ["ok", "retry", "reject"] {
        assert!(
            outcomes.iter().any(|o| o == outcome),
            "the fixtures show no `{outcome}`"
        );
    }

    // The name may hold a dash, which TOML keys accept bare.
    let dir = Path::new("/projects/order-enricher");
    let text = read(&reference.join("runtime.toml"))
        .replace("{{name}}", "order-enricher")
        .replace("{{component}}", "orders");
    let config = Config::parse(&dir.join("runtime.toml"), &text)
        .unwrap_or_else(|e| panic!("runtime.toml does not validate: {e}"));
    assert_eq!(config.state_dir, dir.join(".lockgate"));
    let handler = &config.handlers["order-enricher"];
    assert_eq!(handler.module, dir.join("target/orders.wasm"));
    assert_eq!(handler.config["output"].to_string(), "orders.enriched");
    assert_eq!(handler.config["large_total"].to_string(), "100");
    let route = &config.routes["order-enricher"];
    assert_eq!(route.handler.as_deref(), Some("order-enricher"));
    assert_eq!(route.outputs, ["orders.enriched"]);
}

#[test]
fn the_rust_template_is_a_standalone_cdylib_on_the_vendored_sdk() {
    let text = read(&templates().join("rust/Cargo.toml")).replace("{{name}}", "order-enricher");
    let manifest: toml::Table = toml::from_str(&text).expect("rust/Cargo.toml is TOML");
    assert_eq!(manifest["package"]["name"].as_str(), Some("order-enricher"));
    assert!(
        manifest["workspace"]
            .as_table()
            .is_some_and(toml::Table::is_empty),
        "an empty [workspace] keeps a parent workspace from claiming the project"
    );
    assert_eq!(
        manifest["lib"]["crate-type"].as_array().map(Vec::as_slice),
        Some(&[toml::Value::from("cdylib")][..])
    );
    assert_eq!(
        manifest["dependencies"]["lockgate-sdk"]["path"].as_str(),
        Some("lockgate-sdk/rust")
    );
    let dev = &manifest["dev-dependencies"]["lockgate-sdk"];
    assert_eq!(dev["path"].as_str(), Some("lockgate-sdk/rust"));
    assert_eq!(dev["features"].as_array().map(Vec::len), Some(1));
    assert_eq!(dev["features"][0].as_str(), Some("testing"));

    // The same small-component profile as the example guests.
    let guests: toml::Table = toml::from_str(&read(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples/Cargo.toml"),
    ))
    .expect("guest-examples/Cargo.toml is TOML");
    assert_eq!(
        manifest["profile"]["release"], guests["profile"]["release"],
        "rust/Cargo.toml's release profile differs from guest-examples/Cargo.toml's"
    );
}

/// `dependencies` of a manifest, with `{ workspace = true }` replaced by the root workspace's
/// entry, as `name -> value`.
fn dependencies(manifest: &toml::Table, workspace: &toml::Table) -> BTreeMap<String, toml::Value> {
    let shared = &workspace["workspace"]["dependencies"];
    manifest["dependencies"]
        .as_table()
        .expect("[dependencies]")
        .iter()
        .map(|(name, spec)| {
            let spec = if spec.get("workspace").and_then(toml::Value::as_bool) == Some(true) {
                shared[name.as_str()].clone()
            } else {
                spec.clone()
            };
            // A bare version string means `{ version = ... }`.
            let spec = match spec {
                toml::Value::String(v) => {
                    toml::Value::Table(toml::Table::from_iter([("version".into(), v.into())]))
                }
                other => other,
            };
            (name.clone(), spec)
        })
        .collect()
}

#[test]
fn the_vendored_sdk_manifests_match_the_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let parse = |path: PathBuf| -> toml::Table {
        toml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let workspace = parse(root.join("Cargo.toml"));
    let package = &workspace["workspace"]["package"];
    for (original, vendored) in [
        ("sdk/Cargo.toml", "vendor/rust/Cargo.toml"),
        ("sdk/macro/Cargo.toml", "vendor/rust-macro/Cargo.toml"),
    ] {
        let original = parse(root.join(original));
        let copy = parse(templates().join(vendored));
        assert!(
            !copy.contains_key("workspace"),
            "{vendored}: a path dependency inside the project's workspace must not be a root"
        );
        assert!(
            !read(&templates().join(vendored)).contains("workspace = true"),
            "{vendored} inherits from a workspace it will not be in"
        );
        for key in ["name", "version", "edition", "rust-version"] {
            let want = match original["package"][key].as_str() {
                Some(value) => value.into(),
                None => package[key].clone(), // `key.workspace = true`
            };
            assert_eq!(copy["package"][key], want, "{vendored}: package.{key}");
        }
        for key in ["features", "lib"] {
            assert_eq!(copy.get(key), original.get(key), "{vendored}: [{key}]");
        }
        let mut want = dependencies(&original, &workspace);
        let got = dependencies(&copy, &workspace);
        // The macro crate sits beside the SDK in a project, not at sdk/macro.
        if let Some(toml::Value::Table(spec)) = want.get_mut("lockgate-sdk-macro") {
            spec.insert("path".into(), "../rust-macro".into());
        }
        assert_eq!(got, want, "{vendored}: [dependencies]");
    }
}
