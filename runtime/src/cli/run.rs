//! `lockgate run`: starts every route of runtime.toml and runs until SIGINT or SIGTERM. The work
//! is [`lockgate::app::Runtime`]'s; this is arguments, signals and printing.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use lockgate::app::{Event, Runtime, StopCause, events::counts};
use lockgate::config::{Config, format_problem};
use tokio::sync::mpsc;

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    config: super::ConfigPath,

    /// Keep the embedded broker, state store and compiled cache here instead of the config's
    /// `[runtime] state_dir` (the demo and tests use a fresh directory).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve /metrics (Prometheus), /healthz, /readyz, /status and POST /reload on this
    /// address (ip:port; port 0 picks a free one). Overrides `[runtime] admin`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = match Config::load(&args.config.path()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("lockgate run: not started; `lockgate check` shows the same problems");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
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
    let otlp = config.telemetry.otlp.clone();
    let mut builder = Runtime::builder(config);
    if let Some(dir) = args.state_dir {
        builder = builder.state_dir(dir);
    }
    if let Some(addr) = args.admin {
        builder = builder.admin(addr.to_string());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(otlp) = &otlp {
        lockgate::telemetry::otlp::start(otlp).context("cannot start the OTLP export")?;
        let what = match (otlp.traces, otlp.metrics_interval) {
            (true, Some(_)) => "traces and metrics",
            (true, None) => "traces",
            (false, Some(_)) => "metrics",
            (false, None) => "nothing (traces = false, metrics = false)",
        };
        println!("lockgate: exporting {what} over OTLP to {}", otlp.endpoint);
    }
    let code = runtime.block_on(run_routes(builder));
    if otlp.is_some() {
        // What the last messages left in the queue, within a bound: a collector that is down
        // must not hold the exit.
        runtime.block_on(lockgate::telemetry::otlp::flush(
            std::time::Duration::from_secs(5),
        ));
    }
    code
}

/// The line `lockgate run` prints for an event, if it prints one (reloads are logged).
fn line(event: &Event) -> Option<String> {
    match event {
        Event::AdminListening { addr } => Some(format!(
            "lockgate: admin endpoint on http://{addr} (/metrics, /healthz, /readyz, /status, /reload)"
        )),
        Event::RouteStarted { summary, .. } => Some(summary.clone()),
        // Started, not necessarily consuming: each route logs "Ready" once its source consumes,
        // and /readyz and `lockgate status` show one that cannot connect, with the reason.
        Event::Started { routes, grace } => Some(format!(
            "lockgate: {routes} route{} started; Ctrl-C or SIGTERM stops (in-flight work gets {} ms), SIGHUP reloads",
            if *routes == 1 { "" } else { "s" },
            grace.as_millis()
        )),
        Event::RouteStopped {
            report,
            cause: StopCause::Reload,
        } => Some(format!(
            "route {}: stopped by a reload ({})",
            report.route,
            counts(report)
        )),
        // Printed once the run ends, with the others.
        Event::RouteStopped { .. } | Event::Reloaded { .. } | Event::ReloadRefused { .. } => None,
    }
}

async fn run_routes(builder: lockgate::app::RuntimeBuilder) -> anyhow::Result<ExitCode> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Printed as they happen, also while the routes start (the admin address first).
    let printer = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let Some(l) = line(&event) {
                println!("{l}");
            }
        }
    });
    let mut runtime = match builder.events(events_tx).start().await {
        Ok(r) => r,
        Err(e) => {
            // The runtime is gone, and with it the events' sender: what it said is printed.
            let _ = printer.await;
            return Err(e.into());
        }
    };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    {
        let control = runtime.control();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP received; reloading");
                // The outcome is logged and counted by the runtime.
                let _ = control.reload().await;
            }
        });
    }
    let stop = stop_signal();
    tokio::pin!(stop);
    let end = tokio::select! {
        signal = &mut stop => {
            let name = signal.context("cannot listen for signals")?;
            eprintln!("lockgate: {name} received; stopping (finishing in-flight messages)");
            runtime.stop().await
        }
        end = runtime.finished() => end,
    };
    // Every event is printed before the final lines.
    let _ = printer.await;
    for report in &end.reports {
        println!("route {}: stopped ({})", report.route, counts(report));
        if let Some(e) = &report.error {
            eprintln!("route {}: its source failed: {e}", report.route);
        }
    }
    Ok(if end.failed() {
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
