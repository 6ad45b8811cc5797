//! `lockgate check`, and with `--connect` a try of every broker and store the config names.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use lockgate::app::clients::connector;
use lockgate::broker::BrokerError;
use lockgate::config::{BrokerSource, Config, Problem, ResolvedHandler, StoreKind, format_problem};
use lockgate::engine::outbound::Outbound;
use lockgate::engine::{Engine, EngineError, EngineSettings, HandlerEnv, HandlerLimits};
use lockgate::state::MemoryStore;
use lockgate::state::probe;

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    config: super::ConfigPath,

    /// Also connect to every broker and state store the config defines (log in, and check
    /// that each route's source exists or can be declared: Kafka topic, JetStream stream,
    /// RabbitMQ queue with the route's arguments and its exchange; PostgreSQL schema) without
    /// changing anything. What `lockgate run` would create is printed as a note.
    #[arg(long)]
    connect: bool,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let file = args.config.path();
    if !file.is_file() {
        eprintln!("{}: cannot read the file: not found", file.display());
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read the file: {e}", file.display());
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let (config, mut problems) = match Config::parse_lenient(&file, &text) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    // `lockgate run` fails on a secret it cannot read (a variable that is not set, a file that
    // is missing): read each one here, naming the field and where its value was to come from.
    let unreadable: Vec<Problem> = config
        .secrets()
        .into_iter()
        .filter_map(|s| s.resolve().err())
        .map(|e| Problem::new(&e.field, e.reason))
        .collect();
    // Modules of the handlers that validated are loaded even when other tables are broken, so
    // one run shows every problem.
    problems.extend(unreadable.iter().cloned());
    let (handler_problems, handler_warnings) = check_handlers(&config)?;
    problems.extend(handler_problems);
    let mut notes = Vec::new();
    if args.connect {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let (p, n) = runtime.block_on(check_connections(&config, &unreadable));
        problems.extend(p);
        notes = n;
        // Background tasks of the clients (connection drivers) end with the runtime.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    for w in config.warnings.iter().chain(&handler_warnings) {
        eprintln!("warning: {}", format_problem(&config.file, w));
    }
    for p in &problems {
        eprintln!("{}", format_problem(&config.file, p));
    }
    for n in &notes {
        println!("{}", format_problem(&config.file, n));
    }
    if problems.is_empty() {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        let connected = if args.connect {
            let (b, s) = (config.brokers.len(), config.stores.len());
            format!(
                "; connected to {b} broker{} and {s} store{}",
                plural(b),
                plural(s)
            )
        } else {
            String::new()
        };
        println!(
            "{}: ok ({} handler{}, {} route{}{connected})",
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

/// Compiles and instantiates every handler, collecting one problem per failing handler, and
/// warnings (a component that may make HTTP requests its handler has no grant for).
fn check_handlers(config: &Config) -> anyhow::Result<(Vec<Problem>, Vec<Problem>)> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let engine = Engine::new(&EngineSettings::from(config))?;
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
        // Its `config` secrets, `env` variables and `files` directories, read as `lockgate run`
        // reads them; the module is still checked, without them, when one cannot be read.
        let resolved = h.resolve(&config.file).unwrap_or_else(|errors| {
            problems.extend(errors.into_iter().map(|e| Problem::new(&e.field, e.reason)));
            ResolvedHandler::default()
        });
        let env = HandlerEnv {
            name: h.name.clone(),
            config: resolved.config,
            outputs: None,
            limits: HandlerLimits::from(h),
            kv: kv.clone(),
            http: match h.http.clone().map(Outbound::new).transpose() {
                Ok(http) => http.map(Arc::new),
                Err(e) => {
                    problems.push(Problem::new(
                        &format!("handlers.{}.http", h.name),
                        e.to_string(),
                    ));
                    None
                }
            },
            sql: None,
            wasi: resolved.wasi,
        };
        let loaded = std::fs::read(&h.module)
            .map_err(|source| EngineError::Read {
                path: h.module_raw.clone().into(),
                source,
            })
            .and_then(|bytes| engine.load_handler_bytes(h.module_raw.as_ref(), &bytes, env))
            .and_then(|handler| handler.check_instantiate().map(|()| handler));
        match loaded {
            Err(e) => problems.push(Problem::new(&path, e.to_string())),
            Ok(handler) if handler.imports_http() && h.http.is_none() => {
                warnings.push(Problem::new(
                    &format!("handlers.{}", h.name),
                    format!(
                        "{} imports wasi:http/outgoing-handler, but [handlers.{}.http] is not configured: every request it makes will be denied",
                        h.module_raw, h.name
                    ),
                ));
            }
            Ok(handler) if handler.imports_sql() && h.sql.is_none() => {
                warnings.push(Problem::new(
                    &format!("handlers.{}", h.name),
                    format!(
                        "{} imports lockgate:handler/sql, but the handler has no sql = \"<store>\": every statement it runs will be refused",
                        h.module_raw
                    ),
                ));
            }
            Ok(_) => {}
        }
    }
    Ok((problems, warnings))
}

/// A problem found by connecting: the failure and, if known, what to change.
fn connect_problem(path: &str, e: &BrokerError) -> Problem {
    Problem::new(path, e.failure().to_string())
}

/// Connects to every broker and store of `config` and checks each route's source, changing
/// nothing: (problems, notes on what `lockgate run` would create). A broker or store with an
/// `unreadable` secret (already reported) is left out.
async fn check_connections(
    config: &Config,
    unreadable: &[Problem],
) -> (Vec<Problem>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let reported = |table: &str| {
        unreadable
            .iter()
            .any(|p| p.path.starts_with(&format!("{table}.")))
    };
    for broker in config.brokers.values() {
        let table = format!("brokers.{}", broker.name);
        if reported(&table) {
            continue;
        }
        let sources: Vec<(&str, &BrokerSource)> = config
            .routes
            .values()
            .filter_map(|r| Some((r.name.as_str(), r.source.as_broker()?)))
            .filter(|(_, s)| s.broker.name() == broker.name)
            .collect();
        let found = connector(broker, &config.base_dir).probe(&sources).await;
        if let Some(e) = &found.unreachable {
            problems.push(connect_problem(&table, e));
            continue;
        }
        for s in found.sources {
            let path = match s.field {
                Some(field) => format!("routes.{}.source.{field}", s.route),
                None => format!("routes.{}.source", s.route),
            };
            match s.outcome {
                Ok(n) => notes.extend(
                    n.into_iter()
                        .map(|n| Problem::new(&format!("routes.{}.source", s.route), n)),
                ),
                Err(e) => problems.push(connect_problem(&path, &e)),
            }
        }
    }
    for store in config.stores.values() {
        let table = format!("stores.{}", store.name);
        let Ok(url) = store.url() else {
            continue;
        };
        let checked = match &store.kind {
            StoreKind::Postgres { schema, .. } => probe::probe_postgres(&url, schema).await,
            StoreKind::Redis { .. } => probe::probe_redis(&url).await.map(|()| Vec::new()),
        };
        match checked {
            Ok(n) => notes.extend(n.into_iter().map(|n| Problem::new(&table, n))),
            Err(f) => problems.push(Problem::new(&table, f.to_string())),
        }
    }
    (problems, notes)
}
