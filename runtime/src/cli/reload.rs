//! `lockgate reload`: asks a running `lockgate run` to reload its config and modules.

use std::process::ExitCode;

use clap::Args;
use lockgate::config::Config;
use lockgate::telemetry::ReloadOutcome;

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    config: super::ConfigPath,

    /// The admin endpoint (host:port, like localhost:9090) instead of the config's.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
}

pub fn run(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let file = args.config.path();
    // The config may be the very thing being fixed: an unreadable one still lets --admin work.
    let config = Config::load(&file);
    let addr = match (&args.admin, &config) {
        (Some(a), _) => a.clone(),
        (None, Ok(c)) => match &c.admin {
            Some(a) if a.ends_with(":0") => {
                eprintln!(
                    "{}: [runtime] admin is {a}: the port was picked at start; pass --admin with the address `lockgate run` printed",
                    file.display()
                );
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            Some(a) => a.clone(),
            None => {
                eprintln!(
                    "{}: no [runtime] admin address; pass --admin ADDR",
                    file.display()
                );
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        },
        (None, Err(e)) => {
            eprintln!("{e}");
            eprintln!("(pass --admin ADDR to reach the running process anyway)");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let token = config
        .as_ref()
        .ok()
        .and_then(|c| c.admin_token.as_ref())
        .and_then(|secret| secret.resolve().ok());
    let (code, body) =
        match lockgate::telemetry::http_request(&addr, "POST", "/reload", token.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("lockgate reload: no answer: {e}");
                return Ok(ExitCode::from(EXIT_FAILED));
            }
        };
    let outcome: ReloadOutcome = match serde_json::from_str(&body) {
        Ok(o) => o,
        Err(_) => {
            eprintln!("lockgate reload: http://{addr}/reload answered {code}: {body}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    if !outcome.applied {
        eprintln!(
            "lockgate reload: refused, nothing changed: {}",
            outcome.error.unwrap_or_default()
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    if outcome.changes.is_empty() {
        outln!("reloaded: nothing changed");
    }
    for c in outcome.changes {
        outln!("reloaded: {c}");
    }
    Ok(ExitCode::SUCCESS)
}
