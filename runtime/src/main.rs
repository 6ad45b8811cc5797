//! The `lockgate` command.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_tracing(args.default_log_filter());
    match cli::run(args) {
        Ok(code) => code,
        // The reader of our output went away (`| head`): a normal end.
        Err(e) if cli::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::EXIT_USAGE)
        }
    }
}

/// Directive added to every log filter that does not name `lapin`: lapin logs at ERROR what
/// lockgate handles and reports itself (a NOT_FOUND answer to a passive declare that lockgate
/// asked in order to learn whether a queue exists; "Exponential backoff attempts exhausted,
/// aborting recovery" after any failed connection, because lockgate reconnects by itself and
/// leaves lapin's recovery off), so its lines would contradict lockgate's. Every error lapin
/// returns reaches lockgate, which classifies and reports it with its route.
const QUIET_LAPIN: &str = "lapin=off";

/// The log filter: `LOCKGATE_LOG` (tracing's syntax) or `default_filter`, with lapin quiet
/// unless the filter names it (`LOCKGATE_LOG=info,lapin=debug` shows lapin's lines).
fn log_filter(env: Option<&str>, default_filter: &str) -> String {
    let filter = env
        .filter(|f| !f.trim().is_empty())
        .unwrap_or(default_filter);
    if filter.contains("lapin") {
        filter.to_owned()
    } else {
        format!("{filter},{QUIET_LAPIN}")
    }
}

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let env = std::env::var("LOCKGATE_LOG").ok();
    let filter = EnvFilter::try_new(log_filter(env.as_deref(), default_filter))
        .unwrap_or_else(|_| EnvFilter::new(log_filter(None, default_filter)));
    // The OTLP exporter reads the message spans whatever the log filter says; its own filter is
    // off until `[telemetry.otlp]` starts it (lockgate::telemetry::otlp).
    let otlp =
        lockgate::telemetry::otlp::OtlpLayer.with_filter(lockgate::telemetry::otlp::filter());
    let registry = tracing_subscriber::registry().with(otlp);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // LOCKGATE_LOG_FORMAT=json: one JSON object per line, with the message span's fields.
    if std::env::var("LOCKGATE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        registry
            .with(fmt.json().with_current_span(true).with_filter(filter))
            .init();
    } else {
        registry
            .with(
                fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(filter),
            )
            .init();
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn lapin_is_quiet_unless_the_filter_names_it() {
        assert_eq!(
            log_filter(None, "lockgate=info,warn"),
            "lockgate=info,warn,lapin=off"
        );
        assert_eq!(log_filter(Some("debug"), "warn"), "debug,lapin=off");
        assert_eq!(log_filter(Some(""), "warn"), "warn,lapin=off");
        assert_eq!(
            log_filter(Some("info,lapin=debug"), "warn"),
            "info,lapin=debug"
        );
    }
}
