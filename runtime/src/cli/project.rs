//! `lockgate new` and `lockgate build`: handler projects (the library's `project` module).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lockgate::project::build::JsBackend;
use lockgate::project::{self, BuildOptions, Language, NewOptions, ProjectError};

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The handler project's directory (symlinks are followed).
    #[arg(value_name = "DIR", default_value = ".")]
    dir: PathBuf,

    /// Where to write the component [default: DIR/target/<DIR's name>.wasm].
    #[arg(short = 'o', long, value_name = "FILE")]
    out: Option<PathBuf>,

    /// Rebuild even if no input changed.
    #[arg(long)]
    force: bool,

    /// The JavaScript engine: qjs (QuickJS: small components, cheap calls) or starlingmonkey
    /// (SpiderMonkey: a fuller web API set).
    #[arg(long, value_name = "ENGINE", env = "LOCKGATE_JS_BACKEND", default_value = "qjs",
          value_parser = parse_backend)]
    js_backend: JsBackend,
}

fn parse_backend(s: &str) -> Result<JsBackend, String> {
    JsBackend::parse(s).ok_or_else(|| format!("`{s}` is not an engine: qjs or starlingmonkey"))
}

fn parse_language(s: &str) -> Result<Language, String> {
    Language::parse(s).ok_or_else(|| {
        format!(
            "`{s}` is not a handler language: {}",
            Language::ALL.map(Language::name).join(", ")
        )
    })
}

/// Arguments of `lockgate new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// rust, python, javascript (js), go or c.
    #[arg(value_name = "LANGUAGE", value_parser = parse_language)]
    language: Language,

    /// The project directory to create (new, or empty).
    #[arg(value_name = "DIR")]
    dir: PathBuf,

    /// The handler's name: its route, handler and consumer group in runtime.toml, and the Rust
    /// crate's name. Lowercase letters, digits and `-` [default: DIR's name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Only rewrite DIR/lockgate-sdk/ (the SDK and WIT) with this lockgate's copy: run it
    /// after upgrading lockgate.
    #[arg(long)]
    sdk_only: bool,
}

pub fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut opts = BuildOptions::new(&args.dir);
    opts.out = args.out;
    opts.force = args.force;
    opts.js_backend = args.js_backend;
    let progress = |line: &str| eprintln!("lockgate build: {line}");
    match project::build(&opts, &progress) {
        Ok(built) => {
            let size = std::fs::metadata(&built.wasm).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "lockgate build: {} {} ({}, {:.1} MB, sha256 {})",
                if built.rebuilt {
                    "built"
                } else {
                    "up to date:"
                },
                built.wasm.display(),
                built.language,
                size as f64 / 1e6,
                &built.sha256[..12]
            );
            outln!("{}", built.wasm.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("lockgate build: error: {e}");
            Ok(ExitCode::from(exit_code(&e)))
        }
    }
}

/// 2 for input lockgate cannot use (no project, a missing tool it cannot install); 1 for a
/// build that ran and failed.
fn exit_code(e: &ProjectError) -> u8 {
    match e {
        ProjectError::NoLanguage(_)
        | ProjectError::ManyLanguages(..)
        | ProjectError::Io { .. }
        | ProjectError::MissingTool { .. }
        | ProjectError::Refused { .. } => EXIT_USAGE,
        ProjectError::Invalid { .. }
        | ProjectError::Command { .. }
        | ProjectError::NotAComponent { .. } => EXIT_FAILED,
    }
}

pub fn new(args: NewArgs) -> anyhow::Result<ExitCode> {
    let opts = NewOptions {
        language: args.language,
        dir: args.dir.clone(),
        name: args.name,
        sdk_only: args.sdk_only,
    };
    let created = match project::new(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lockgate new: error: {e}");
            return Ok(ExitCode::from(exit_code(&e)));
        }
    };
    let shown = args.dir.display();
    if args.sdk_only {
        outln!(
            "Rewrote {shown}/lockgate-sdk/ ({} files) with this lockgate's SDK and WIT.",
            created.files.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (vendored, own): (Vec<_>, Vec<_>) = created
        .files
        .iter()
        .partition(|f| f.starts_with("lockgate-sdk/"));
    outln!(
        "Created the {} handler `{}` in {shown}:",
        args.language,
        created.name
    );
    for f in own {
        outln!("  {f}");
    }
    outln!(
        "  lockgate-sdk/  ({} files: the SDK and WIT it builds against; commit them)",
        vendored.len()
    );
    outln!();
    outln!("Next:");
    outln!("  cd {shown}");
    outln!("  lockgate build");
    outln!(
        "  lockgate test target/{}.wasm --input fixtures/input.jsonl --expect fixtures/expected.jsonl",
        dir_name(&created.dir)
    );
    outln!("  lockgate run");
    Ok(ExitCode::SUCCESS)
}

fn dir_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
