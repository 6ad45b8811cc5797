//! `lockgate check`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use lockgate::config::{Config, Problem, format_problem};
use lockgate::engine::{Engine, EngineError, HandlerEnv};
use lockgate::state::MemoryStore;

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The config file to check.
    #[arg(default_value_os_t = super::default_config())]
    config: PathBuf,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    if !args.config.is_file() {
        eprintln!("{}: cannot read the file: not found", args.config.display());
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read the file: {e}", args.config.display());
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let (config, mut problems) = match Config::parse_lenient(&args.config, &text) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    // Modules of the handlers that validated are loaded even when other tables are broken, so
    // one run shows every problem.
    problems.extend(check_handlers(&config)?);
    for p in &problems {
        eprintln!("{}", format_problem(&config.file, p));
    }
    if problems.is_empty() {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        println!(
            "{}: ok ({} handler{}, {} route{})",
            config.file.display(),
            config.handlers.len(),
            plural(config.handlers.len()),
            config.routes.len(),
            plural(config.routes.len()),
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(EXIT_FAILED))
    }
}

/// Compiles and instantiates every handler, collecting one problem per failing handler.
fn check_handlers(config: &Config) -> anyhow::Result<Vec<Problem>> {
    let mut problems = Vec::new();
    let engine = Engine::new(&config.engine_settings())?;
    // kv is never touched by instantiation; an in-memory store keeps `check` free of side effects.
    let kv = Arc::new(MemoryStore::new());
    for h in config.handlers.values() {
        let path = format!("handlers.{}.module", h.name);
        if !h.module.is_file() {
            problems.push(Problem::new(
                &path,
                format!("\"{}\": file not found", h.module_raw),
            ));
            continue;
        }
        let env = HandlerEnv {
            name: h.name.clone(),
            config: h.config.clone(),
            outputs: None,
            limits: h.limits(),
            kv: kv.clone(),
        };
        let loaded = std::fs::read(&h.module)
            .map_err(|source| EngineError::Read {
                path: h.module_raw.clone().into(),
                source,
            })
            .and_then(|bytes| engine.load_handler_bytes(h.module_raw.as_ref(), &bytes, env))
            .and_then(|handler| handler.check_instantiate());
        if let Err(e) = loaded {
            problems.push(Problem::new(&path, e.to_string()));
        }
    }
    Ok(problems)
}
