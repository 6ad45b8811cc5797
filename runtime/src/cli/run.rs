//! `lockgate run`: starts every route of runtime.toml and runs until SIGINT or SIGTERM.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lockgate::broker::local::LocalBroker;
use lockgate::config::{Config, IdempotencyKey, Ordering, RouteConfig};
use lockgate::engine::{Engine, HandlerEnv, InstancePool};
use lockgate::pipeline::backoff::Jitter;
use lockgate::pipeline::idempotency::DoneKeys;
use lockgate::pipeline::{Route, RouteSinks, Shutdown};
use lockgate::state::{EmbeddedStore, KvStore};

use super::clients::Clients;
use super::{EXIT_FAILED, EXIT_USAGE};

/// File name of the embedded state store (guest kv and idempotency keys) in the state directory.
pub const STATE_FILE: &str = "state.redb";
/// Directory of the embedded broker in the state directory.
pub const LOCAL_BROKER_DIR: &str = "local";

/// Arguments of `lockgate run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file.
    #[arg(default_value_os_t = super::default_config())]
    config: PathBuf,

    /// Keep the embedded broker, state store and compiled cache here instead of the config's
    /// `[runtime] state_dir` (the demo and tests use a fresh directory).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve /metrics (Prometheus), /healthz and /readyz on this address (ip:port; port 0
    /// picks a free one). Overrides `[runtime] admin`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("lockgate run: not started; `lockgate check` shows the same problems");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(addr) = args.admin {
        config.admin = Some(addr.to_string());
    }
    if config.routes.is_empty() {
        eprintln!(
            "{}: no [routes.<name>] tables: nothing to run (see README, \"Routes\")",
            config.file.display()
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_routes(config))
}

async fn run_routes(config: Config) -> anyhow::Result<ExitCode> {
    let engine = Engine::new(&config.engine_settings()).context("cannot create the engine")?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
    let state_path = config.state_dir.join(STATE_FILE);
    let store: Arc<dyn KvStore> =
        Arc::new(EmbeddedStore::open(&state_path).with_context(|| {
            format!(
                "cannot open the state store {} (is another `lockgate run` using this state_dir?)",
                state_path.display()
            )
        })?);
    let broker = LocalBroker::open(&config.state_dir.join(LOCAL_BROKER_DIR))
        .context("cannot open the embedded broker")?;
    let grace = Duration::from_millis(config.shutdown_grace_ms);

    let (trigger, shutdown) = Shutdown::new();
    let admin_routes = lockgate::telemetry::AdminRoutes::default();
    if let Some(addr) = &config.admin {
        let (listener, local) = lockgate::telemetry::bind(addr)
            .await
            .with_context(|| format!("cannot listen on the admin address {addr}"))?;
        println!("lockgate: admin endpoint on http://{local} (/metrics, /healthz, /readyz)");
        let stop = shutdown.clone();
        let admin = admin_routes.clone();
        tokio::spawn(async move {
            if let Err(e) =
                lockgate::telemetry::serve(listener, admin, async move { stop.wait().await }).await
            {
                tracing::error!(error = %e, "The admin endpoint failed");
            }
        });
    }
    let mut routes = tokio::task::JoinSet::new();
    let mut clients = Clients::default();
    for route in config.routes.values() {
        let Some(handler_cfg) = config.handlers.get(&route.handler) else {
            anyhow::bail!(
                "route {}: handler {} is not defined",
                route.name,
                route.handler
            );
        };
        let env = HandlerEnv {
            name: handler_cfg.name.clone(),
            config: handler_cfg.config.clone(),
            outputs: Some(route.outputs.iter().cloned().collect::<BTreeSet<_>>()),
            limits: handler_cfg.limits(),
            kv: store.clone(),
        };
        let handler = engine
            .load_handler(&handler_cfg.module, env)
            .with_context(|| {
                format!(
                    "{}: handlers.{}: cannot load the module",
                    config.file.display(),
                    handler_cfg.name
                )
            })?;
        let module_hash = handler.module_hash().to_owned();
        let source = clients
            .source(&config, &broker, route)
            .await
            .with_context(|| format!("route {}: cannot open its source", route.name))?;
        println!("{}", summary(route, &module_hash, &source.describe()));
        let pool = InstancePool::new(
            handler,
            handler_cfg.isolation,
            handler_cfg.max_messages_per_instance,
        );
        let pool_counters = pool.counters();
        let outputs = clients
            .sink(&config, &broker, &route.source.broker)
            .await
            .with_context(|| format!("route {}: cannot create its output producer", route.name))?;
        let dlq = clients
            .sink(&config, &broker, &route.dlq.broker)
            .await
            .with_context(|| format!("route {}: cannot create its DLQ producer", route.name))?;
        let done_keys = route
            .idempotency
            .as_ref()
            .map(|i| DoneKeys::new(store.clone(), &route.name, i.ttl));
        let r = Route::new(
            route.clone(),
            Arc::new(pool),
            RouteSinks {
                outputs,
                dlq,
                replies: clients.replies(&config, route).await?,
            },
            done_keys,
        )
        .shutdown_grace(grace);
        admin_routes.add(lockgate::telemetry::RouteEntry {
            route: route.name.clone(),
            handler: route.handler.clone(),
            handler_version: module_hash.clone(),
            stats: r.stats(),
            lag: source.lag(),
            pool: Some(pool_counters),
        });
        routes.spawn(r.run(source, shutdown.clone()));
    }
    println!(
        "lockgate: {} route{} running; Ctrl-C or SIGTERM stops (in-flight work gets {} ms)",
        routes.len(),
        if routes.len() == 1 { "" } else { "s" },
        grace.as_millis()
    );

    // Stop on a signal, or as soon as any route ends by itself (its source failed).
    let mut reports = Vec::new();
    tokio::select! {
        signal = stop_signal() => {
            let name = signal.context("cannot listen for signals")?;
            eprintln!("lockgate: {name} received; stopping (finishing in-flight messages)");
        }
        Some(first) = routes.join_next() => reports.push(first),
    }
    trigger.trigger();
    while let Some(report) = routes.join_next().await {
        reports.push(report);
    }

    let mut failed = false;
    for report in reports {
        match report {
            Ok(report) => {
                let counts: Vec<String> = report
                    .stats
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("route {}: stopped ({})", report.route, counts.join(" "));
                if let Some(e) = report.error {
                    eprintln!("route {}: its source failed: {e}", report.route);
                    failed = true;
                }
            }
            Err(e) => {
                eprintln!("a route task failed: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn stop_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// The one line a route logs at start: where from, what runs, where to, and its policies.
fn summary(route: &RouteConfig, module_hash: &str, source: &str) -> String {
    let r = &route.retry;
    let jitter = match r.jitter {
        Jitter::None => "no jitter".to_owned(),
        Jitter::Full => "full jitter".to_owned(),
        Jitter::Proportional(f) => format!("±{:.0}% jitter", f * 100.0),
    };
    let mut parts = vec![
        format!(
            "{source} -> handler {} ({})",
            route.handler,
            short(module_hash)
        ),
        if route.outputs.is_empty() {
            "outputs none".to_owned()
        } else {
            format!("outputs {}", route.outputs.join(","))
        },
        format!(
            "{} lane{} by {}",
            route.concurrency,
            if route.concurrency == 1 { "" } else { "s" },
            match route.ordering {
                Ordering::Partition => "partition",
                Ordering::Key => "key",
            }
        ),
        format!(
            "retry {} attempts {}..{} ms x{} {jitter}",
            r.max_attempts,
            r.initial_backoff.as_millis(),
            r.max_backoff.as_millis(),
            r.multiplier
        ),
    ];
    if let Some(b) = &route.circuit_breaker {
        let mut trip = Vec::new();
        if let Some(n) = b.consecutive_failures {
            trip.push(format!("{n} failures in a row"));
        }
        if let Some(f) = b.failure_ratio {
            trip.push(format!(
                "{:.0}% of >= {} calls in {} ms",
                f * 100.0,
                b.min_calls,
                b.window.as_millis()
            ));
        }
        parts.push(format!(
            "breaker on {} (open {} ms, {} probe{})",
            trip.join(" or "),
            b.open_duration.as_millis(),
            b.half_open_max,
            if b.half_open_max == 1 { "" } else { "s" }
        ));
    }
    parts.push(format!("dlq {}:{}", route.dlq.broker, route.dlq.topic));
    if let Some(i) = &route.idempotency {
        let key = match &i.key {
            IdempotencyKey::Header(h) => format!("header:{h}"),
            IdempotencyKey::MessageKey => "key".to_owned(),
            IdempotencyKey::JsonPointer(p) => format!("json:{p}"),
            IdempotencyKey::Position => "position".to_owned(),
        };
        parts.push(format!("idempotency {key} for {} s", i.ttl.as_secs()));
    }
    if let Some(l) = &route.rate_limit {
        parts.push(format!("rate {}/s burst {}", l.per_second, l.burst));
    }
    format!("route {}: {}", route.name, parts.join("; "))
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
