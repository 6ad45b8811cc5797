//! `lockgate run`: starts every route of runtime.toml and runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lockgate::broker::local::LocalBroker;
use lockgate::config::{Config, IdempotencyKey, Ordering, RouteConfig, format_problem};
use lockgate::engine::{Engine, EngineSettings};
use lockgate::pipeline::{RouteReport, Shutdown};
use lockgate::policy::backoff::Jitter;
use lockgate::state::{EmbeddedStore, KvStore};
use lockgate::telemetry::{AdminControl, ReloadRequest};
use tokio::sync::mpsc;

use super::supervisor::{Change, DEBOUNCE, Overrides, Supervisor, watch};
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
    let overrides = Overrides {
        state_dir: args.state_dir,
        admin: args.admin.map(|a| a.to_string()),
    };
    let mut config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("lockgate run: not started; `lockgate check` shows the same problems");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    overrides.apply(&mut config);
    for w in &config.warnings {
        tracing::warn!("Config warning: {}", format_problem(&config.file, w));
    }
    if config.routes.is_empty() {
        eprintln!(
            "{}: no [routes.<name>] tables: nothing to run (see docs/reference/runtime-toml.md#routes)",
            config.file.display()
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_routes(config, overrides))
}

async fn run_routes(config: Config, overrides: Overrides) -> anyhow::Result<ExitCode> {
    let engine = Engine::new(&EngineSettings::from(&config)).context("cannot create the engine")?;
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
    // This process is the one that applies the embedded broker's retention (see
    // `lockgate::broker::local`): it owns the state directory and knows the DLQ topics.
    let broker = LocalBroker::open(&config.state_dir.join(LOCAL_BROKER_DIR))
        .context("cannot open the embedded broker")?
        .with_settings(config.local.clone())
        .with_retention(true);
    let grace = Duration::from_millis(config.shutdown_grace_ms);

    let (trigger, shutdown) = Shutdown::new();
    {
        let (broker, stop) = (broker.clone(), shutdown.clone());
        tokio::spawn(async move { broker.run_retention(stop.wait()).await });
    }
    let admin_routes = lockgate::telemetry::AdminRoutes::default();
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<ReloadRequest>();
    if let Some(addr) = &config.admin {
        let (listener, local) = lockgate::telemetry::bind(addr)
            .await
            .with_context(|| format!("cannot listen on the admin address {addr}"))?;
        println!("lockgate: admin endpoint on http://{local} (/metrics, /healthz, /readyz)");
        let token = match &config.admin_token {
            // The error names the config file, the field and the variable or file.
            Some(secret) => Some(secret.resolve()?),
            None => None,
        };
        let control = AdminControl {
            reload: reload_tx.clone(),
            token,
            loopback: local.ip().is_loopback(),
        };
        let stop = shutdown.clone();
        let admin = admin_routes.clone();
        tokio::spawn(async move {
            if let Err(e) = lockgate::telemetry::serve(listener, admin, Some(control), async move {
                stop.wait().await
            })
            .await
            {
                tracing::error!(error = %e, "The admin endpoint failed");
            }
        });
    }
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor::new(
        config,
        overrides,
        engine,
        super::supervisor::Stores::new(store),
        broker,
        admin_routes,
        ended_tx,
    );
    // Watch before loading, so a change made while the modules compile is not missed.
    let (change_tx, mut change_rx) = mpsc::unbounded_channel();
    let mut watcher = start_watching(&sup, &change_tx);
    let mut watched = sup.watched_files();
    sup.start_all().await?;
    // Started, not necessarily consuming: each route logs "Ready" once its source consumes,
    // and /readyz and `lockgate status` show one that cannot connect, with the reason.
    println!(
        "lockgate: {} route{} started; Ctrl-C or SIGTERM stops (in-flight work gets {} ms), SIGHUP reloads",
        sup.len(),
        if sup.len() == 1 { "" } else { "s" },
        grace.as_millis()
    );

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    let stop = stop_signal();
    tokio::pin!(stop);
    // Armed by an "in progress" change; fires once the files were quiet for DEBOUNCE.
    let settle = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(settle);
    let mut armed = false;
    let mut failed_reports = Vec::new();
    loop {
        let reply = tokio::select! {
            signal = &mut stop => {
                let name = signal.context("cannot listen for signals")?;
                eprintln!("lockgate: {name} received; stopping (finishing in-flight messages)");
                break;
            }
            Some((name, generation)) = ended_rx.recv() => {
                if sup.is_current(&name, generation) {
                    // A route that ends by itself lost its source: stop everything.
                    if let Some(report) = sup.reap(&name).await {
                        failed_reports.push(report);
                    }
                    break;
                }
                continue;
            }
            Some(change) = change_rx.recv() => {
                tracing::debug!(?change, "Watched file changed");
                match change {
                    Change::Complete => {}
                    Change::InProgress => {
                        settle.as_mut().reset(tokio::time::Instant::now() + DEBOUNCE);
                        armed = true;
                        continue;
                    }
                }
                None
            }
            () = &mut settle, if armed => None,
            Some(_) = hangup.recv() => {
                tracing::info!("SIGHUP received; reloading");
                None
            }
            Some(req) = reload_rx.recv() => Some(req.reply),
        };
        armed = false;
        tracing::debug!("Reloading");
        let outcome = sup.reload().await;
        if outcome.applied && sup.watched_files() != watched {
            // Only when the set changed: a second watcher would deliver late duplicates of the
            // events the first one saw, and a late "in progress" could time a reload into the
            // middle of the next write.
            watched = sup.watched_files();
            watcher = start_watching(&sup, &change_tx);
        }
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
    drop(watcher);
    trigger.trigger();
    let mut reports = sup.stop_all().await;
    reports.extend(failed_reports);

    let mut failed = false;
    for report in reports {
        println!("route {}: stopped ({})", report.route, counts(&report));
        if let Some(e) = report.error {
            eprintln!("route {}: its source failed: {e}", report.route);
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Watches the config and module files; a failure to watch is logged, not fatal (SIGHUP and
/// `lockgate reload` still work).
fn start_watching(
    sup: &Supervisor,
    tx: &mpsc::UnboundedSender<Change>,
) -> Option<Box<dyn notify::Watcher + Send>> {
    match watch(&sup.watched_files(), sup.config().watch, tx.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Cannot watch the config and modules; reload with SIGHUP or `lockgate reload`");
            None
        }
    }
}

/// A report's non-zero counters, `name=value` separated by spaces, or `no messages` when the
/// route took none.
pub fn counts(report: &RouteReport) -> String {
    let counts: Vec<String> = report
        .stats
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if counts.is_empty() {
        "no messages".to_owned()
    } else {
        counts.join(" ")
    }
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
pub fn summary(route: &RouteConfig, module_hash: &str, source: &str) -> String {
    let r = &route.retry;
    let jitter = match r.jitter {
        Jitter::None => "no jitter".to_owned(),
        Jitter::Full => "full jitter".to_owned(),
        Jitter::Proportional(f) => format!("±{:.0}% jitter", f * 100.0),
    };
    let mut parts = vec![
        match &route.handler {
            Some(h) => format!("{source} -> handler {h} ({})", short(module_hash)),
            None => format!("{source} -> published as written"),
        },
        match (route.outputs_mode, route.outputs.is_empty()) {
            (lockgate::config::OutputsMode::Outbox, _) => {
                format!("outputs {} into the outbox", route.outputs.join(","))
            }
            (_, true) if route.outbox.is_some() => {
                format!("outputs to their rows' topics on {}", route.outputs_broker)
            }
            (_, true) => "outputs none".to_owned(),
            (_, false) => format!("outputs {}", route.outputs.join(",")),
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
