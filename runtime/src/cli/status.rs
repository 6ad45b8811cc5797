//! `lockgate status`: a table of a running instance's routes, from its admin endpoint, and why
//! a route that is not ready is not (its source or a store it needs fails, or has not connected
//! yet).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lockgate::config::Config;

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    config: super::ConfigPath,

    /// The admin endpoint (host:port, like localhost:9090) instead of the config's.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,

    /// Time between the two readings the rate is computed from.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    interval_ms: u64,

    /// Print the endpoint's JSON instead of a table (one reading, no rate).
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let file = args.config.path();
    let addr = match args.admin {
        Some(a) => a,
        None => match Config::load(&file) {
            Ok(c) => match c.admin {
                Some(a) => a,
                None => {
                    eprintln!(
                        "{}: no [runtime] admin address; pass --admin ADDR",
                        file.display()
                    );
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            },
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        },
    };
    let first = match fetch(&addr) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("lockgate status: {e:#}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    if args.json {
        println!("{first}");
        return Ok(ExitCode::SUCCESS);
    }
    let interval = Duration::from_millis(args.interval_ms.max(1));
    std::thread::sleep(interval);
    let second = match fetch(&addr) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("lockgate status: {e:#}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    };
    print!("{}", table(&first, &second, interval));
    Ok(ExitCode::SUCCESS)
}

/// `GET /status` on `addr`, parsed.
fn fetch(addr: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!(
        "http://{}/status",
        addr.strip_prefix("http://")
            .unwrap_or(addr)
            .trim_end_matches('/')
    );
    let (code, body) = lockgate::telemetry::http_get(addr, "/status").with_context(|| {
        format!("cannot read {url} (is `lockgate run` running with an admin address?)")
    })?;
    anyhow::ensure!(code == 200, "{url} answered {code}: {body}");
    serde_json::from_str(&body).with_context(|| format!("{url} sent no JSON"))
}

/// The table: one line per route, the rate from the two readings' `received`.
fn table(first: &serde_json::Value, second: &serde_json::Value, interval: Duration) -> String {
    let empty = Vec::new();
    let routes = second["routes"].as_array().unwrap_or(&empty);
    let before = |route: &str| {
        first["routes"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["route"] == route))
            .and_then(|r| r["received"].as_u64())
            .unwrap_or(0)
    };
    let mut rows = vec![
        [
            "ROUTE",
            "STATE",
            "BREAKER",
            "IN-FLIGHT",
            "RECEIVED",
            "SUCCEEDED",
            "RETRIED",
            "DLQ",
            "LAG",
            "MSG/S",
        ]
        .map(str::to_owned),
    ];
    for r in routes {
        let name = r["route"].as_str().unwrap_or("?");
        let n = |k: &str| {
            r[k].as_u64()
                .map_or_else(|| "-".to_owned(), |v| v.to_string())
        };
        let received = r["received"].as_u64().unwrap_or(0);
        let rate = received.saturating_sub(before(name)) as f64 / interval.as_secs_f64();
        rows.push([
            name.to_owned(),
            r["state"].as_str().unwrap_or("?").to_owned(),
            r["breaker"].as_str().unwrap_or("?").to_owned(),
            n("in_flight"),
            n("received"),
            n("succeeded"),
            n("retried"),
            n("dead_lettered"),
            n("lag"),
            format!("{rate:.1}"),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    // Why a route is not ready, under the table (reasons are too long for a column).
    for r in routes {
        if let Some(reason) = r["reason"].as_str() {
            let name = r["route"].as_str().unwrap_or("?");
            let state = r["state"].as_str().unwrap_or("?");
            out.push_str(&format!("route {name} {state}: {reason}\n"));
            if let Some(fix) = r["fix"].as_str() {
                out.push_str(&format!("  fix: {fix}\n"));
            }
        }
    }
    out
}
