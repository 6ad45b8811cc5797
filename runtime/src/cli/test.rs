//! `lockgate test`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use lockgate::config::Isolation;
use lockgate::config::http::{
    AllowedHost, DEFAULT_HTTP_TIMEOUT_MS, DEFAULT_IDEMPOTENCY_HEADER, DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES, HttpGrant,
};
use lockgate::config::{DEFAULT_MAX_MEMORY_MB, DEFAULT_TIMEOUT_MS};
use lockgate::engine::outbound::{HttpAnswer, Outbound};
use lockgate::engine::{Engine, EngineSettings, HandlerEnv, HandlerLimits, InstancePool, Outcome};
use lockgate::fixture;
use lockgate::state::{EmbeddedStore, MemoryStore};

use super::{EXIT_FAILED, EXIT_USAGE};

/// Arguments of `lockgate test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The handler component (.wasm) to run.
    component: PathBuf,

    /// Messages to feed it, one JSON object per line.
    #[arg(long, short)]
    input: PathBuf,

    /// A value for the handler's config table (repeatable), as key=value.
    #[arg(long = "config", short = 'c', value_name = "KEY=VALUE", value_parser = super::parse_kv)]
    config: Vec<(String, String)>,

    /// Expected results, one JSON object per message; exit 1 with a diff on mismatch.
    #[arg(long, short)]
    expect: Option<PathBuf>,

    /// Print one JSON result per message instead of the human-readable report.
    #[arg(long)]
    json: bool,

    /// Deadline of each call, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,

    /// Memory cap of the instance, in MiB.
    #[arg(long, default_value_t = DEFAULT_MAX_MEMORY_MB, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_memory_mb: u64,

    /// Use a fresh instance for every message instead of reusing one.
    #[arg(long)]
    per_message: bool,

    /// Handler name (its kv namespace and log attribution).
    #[arg(long, default_value = "test")]
    name: String,

    /// Keep the handler's kv state in this file (the embedded redb store) instead of in memory,
    /// so state carries over between runs.
    #[arg(long, value_name = "FILE")]
    kv: Option<PathBuf>,

    /// Let outbound HTTP requests without a stub in the fixture reach this host (repeatable),
    /// written like an entry of a grant's `allowed_hosts`: `https://api.example.com`,
    /// `http://127.0.0.1:8080`. Without it every request must have a stub in its message's
    /// `"http"` list, and one that has none fails the message.
    #[arg(long = "allow-http", value_name = "SCHEME://HOST[:PORT]", value_parser = parse_allowed_host)]
    allow_http: Vec<AllowedHost>,
}

fn parse_allowed_host(s: &str) -> Result<AllowedHost, String> {
    AllowedHost::parse(s)
}

pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    let input_text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let messages = match fixture::parse_fixtures(&input_text) {
        Ok(m) => m,
        Err(errors) => {
            for e in errors {
                eprintln!("{}: {e}", args.input.display());
            }
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let expectations = match &args.expect {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            match fixture::parse_expectations(&text) {
                Ok(e) => Some((path, e)),
                Err(errors) => {
                    for e in errors {
                        eprintln!("{}: {e}", path.display());
                    }
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            }
        }
    };

    let engine = Engine::new(&EngineSettings {
        pooling: false,
        max_memory_bytes: args.max_memory_mb * 1024 * 1024,
        ..EngineSettings::default()
    })?;
    let env = HandlerEnv {
        name: args.name.clone(),
        config: args.config.iter().cloned().collect::<BTreeMap<_, _>>(),
        outputs: None,
        limits: HandlerLimits {
            timeout: std::time::Duration::from_millis(args.timeout_ms),
            max_memory_bytes: args.max_memory_mb * 1024 * 1024,
            ..HandlerLimits::default()
        },
        kv: match &args.kv {
            None => Arc::new(MemoryStore::new()),
            Some(path) => Arc::new(EmbeddedStore::open(path)?),
        },
        // Outbound HTTP is answered by the fixture's stubs; only `--allow-http` hosts are reached.
        http: Some(Arc::new(
            Outbound::new(HttpGrant {
                allowed_hosts: args.allow_http.clone(),
                timeout_ms: DEFAULT_HTTP_TIMEOUT_MS,
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
                max_concurrent: DEFAULT_MAX_CONCURRENT,
                ca_file: None,
                idempotency_header: Some(DEFAULT_IDEMPOTENCY_HEADER.to_owned()),
            })?
            .with_stubs(),
        )),
        // `lockgate test` grants nothing else: no environment variables, no directories.
        sql: None,
        wasi: lockgate::config::WasiGrants::default(),
    };
    let handler = engine.load_handler(&args.component, env)?;
    let http = handler.env().http.clone();
    let isolation = if args.per_message {
        Isolation::PerMessage
    } else {
        Isolation::Reuse
    };
    let pool = InstancePool::new(handler, isolation, u64::MAX);

    let mut results = Vec::with_capacity(messages.len());
    for (i, f) in messages.iter().enumerate() {
        if let Some(http) = &http {
            http.set_stubs(f.http.clone());
        }
        let (line, message) = (&f.line, &f.message);
        let invocation = pool.invoke(message);
        let json = fixture::result_json(i + 1, &invocation);
        if args.json {
            outln!("{json}");
        } else {
            print_human(i + 1, *line, &invocation);
        }
        results.push(json);
    }
    if !args.json {
        print_summary(&results);
    }

    let Some((path, expected)) = expectations else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut mismatches = 0;
    if expected.len() != results.len() {
        eprintln!(
            "{}: {} expectation(s) for {} message(s) in {}",
            path.display(),
            expected.len(),
            results.len(),
            args.input.display()
        );
        mismatches += 1;
    }
    for (i, ((exp_line, exp), actual)) in expected.iter().zip(&results).enumerate() {
        let differences = fixture::diff(exp, actual);
        if !differences.is_empty() {
            mismatches += 1;
            eprintln!(
                "message {} ({} line {}) does not match {} line {exp_line}:",
                i + 1,
                args.input.display(),
                messages[i].line,
                path.display()
            );
            for d in differences {
                eprintln!("  {d}");
            }
        }
    }
    if mismatches == 0 {
        if !args.json {
            outln!(
                "expectations: all {} message(s) match {}",
                results.len(),
                path.display()
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "expectations: {mismatches} mismatch(es) against {}",
            path.display()
        );
        Ok(ExitCode::from(EXIT_FAILED))
    }
}

fn show_bytes(b: &[u8]) -> String {
    const MAX: usize = 200;
    match std::str::from_utf8(b) {
        Ok(s) if s.len() <= MAX => format!("{s:?}"),
        Ok(s) => {
            let mut cut = MAX;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{:?}… ({} bytes)", &s[..cut], s.len())
        }
        Err(_) => format!("<{} bytes of binary>", b.len()),
    }
}

fn print_human(index: usize, line: usize, inv: &lockgate::engine::Invocation) {
    let took = format!("{:.3} ms", inv.elapsed.as_secs_f64() * 1e3);
    match &inv.outcome {
        Outcome::Ok { .. } => outln!("message {index} (line {line}): ok in {took}"),
        Outcome::Retry { after, .. } => {
            let after = after
                .map(|a| format!(" after {} ms", a.as_millis()))
                .unwrap_or_default();
            outln!(
                "message {index} (line {line}): retry{after}: {} ({took})",
                inv.outcome.reason().unwrap_or_default()
            );
        }
        other => outln!(
            "message {index} (line {line}): {}: {} ({took})",
            other.kind(),
            other.reason().unwrap_or_default()
        ),
    }
    if let Outcome::Ok { outputs } = &inv.outcome {
        for o in outputs {
            let key = o
                .key
                .as_deref()
                .map(|k| format!(" key={}", show_bytes(k)))
                .unwrap_or_default();
            let headers: String = o
                .headers
                .iter()
                .map(|(k, v)| format!(" {k}={}", show_bytes(v)))
                .collect();
            outln!(
                "  publish -> {}{key}{headers} payload={}",
                o.topic,
                show_bytes(&o.payload)
            );
        }
    }
    for r in &inv.http {
        let answer = match &r.answer {
            HttpAnswer::Stub(status) => format!("{status} (stub)"),
            HttpAnswer::Sent => "sent".to_owned(),
            HttpAnswer::Denied(reason) => format!("denied: {reason}"),
        };
        outln!("  http {} {} -> {answer}", r.method, r.url);
    }
    for l in &inv.logs {
        outln!(
            "  {} {}: {}",
            l.source.as_str(),
            l.level.as_str(),
            l.message
        );
    }
    if inv.dropped_logs > 0 {
        outln!("  ({} log records dropped)", inv.dropped_logs);
    }
}

fn print_summary(results: &[serde_json::Value]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results {
        *counts
            .entry(r["outcome"].as_str().unwrap_or("?"))
            .or_default() += 1;
    }
    let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    outln!("{} message(s): {}", results.len(), parts.join(", "));
}
