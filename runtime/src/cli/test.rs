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
use lockgate::config::{
    DEFAULT_MAX_MEMORY_MB, DEFAULT_SQL_MAX_RESULT_BYTES, DEFAULT_SQL_MAX_ROWS, DEFAULT_TIMEOUT_MS,
};
use lockgate::deadline::Deadline;
use lockgate::engine::outbound::{HttpAnswer, Outbound};
use lockgate::engine::{
    Engine, EngineSettings, HandlerEnv, HandlerLimits, InstancePool, Outcome, SqlGrant,
};
use lockgate::fixture;
use lockgate::state::{EmbeddedStore, MemoryStore, PostgresStore, SqlTxn};

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

    /// Run the handler's SQL statements on this PostgreSQL database
    /// (`postgres://user[:password]@host:port/db`), each message in a transaction of its own that
    /// is rolled back after the message unless `--commit`. An expectation's `"sql"` list then
    /// checks the rows: each `{"query": "SELECT ...", "rows": [{...}]}` runs in the message's
    /// transaction, after the handler, and its rows are compared as JSON objects. lockgate
    /// creates nothing in this database. Without it a handler's statements fail with `refused`.
    #[arg(long, value_name = "URL")]
    database: Option<String>,

    /// Run the statements (and the expectations' queries) under this role, as a grant's
    /// `sql_role` does.
    #[arg(long, value_name = "ROLE", requires = "database")]
    sql_role: Option<String>,

    /// Commit the transaction of each message that succeeds instead of rolling it back, so the
    /// next message (and the next run) sees its rows.
    #[arg(long, requires = "database")]
    commit: bool,
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

    // The database's connections live on a runtime of their own; the handler's statements and
    // the expectations' queries block on it.
    let database = match &args.database {
        None => None,
        Some(url) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("cannot start a runtime for --database")?;
            let store = {
                let _enter = rt.enter();
                PostgresStore::for_handler_sql_only(url, 2)
                    .with_context(|| format!("--database {}", redact(url)))?
            };
            Some((rt, store))
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
        sql: database.as_ref().map(|(_, store)| SqlGrant {
            store_name: "--database".into(),
            store: store.clone(),
            role: args.sql_role.clone(),
            max_rows: DEFAULT_SQL_MAX_ROWS,
            max_result_bytes: DEFAULT_SQL_MAX_RESULT_BYTES,
        }),
        // `lockgate test` grants nothing else: no environment variables, no directories.
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
        let mut invocation = pool.invoke(message);
        let mut json = fixture::result_json(i + 1, &invocation);
        let queries = expectations
            .as_ref()
            .and_then(|(_, e)| e.get(i))
            .map(|(_, e)| fixture::sql_queries(e))
            .unwrap_or_default();
        let txn = invocation.sql.take();
        match &database {
            Some((rt, store)) => {
                let sql = finish_sql(&args, rt, store, txn, &queries);
                if let Some(obj) = json.as_object_mut() {
                    obj.extend(sql);
                }
            }
            None if !queries.is_empty() => {
                if let Some(obj) = json.as_object_mut() {
                    obj.insert(
                        "sql".into(),
                        serde_json::json!(
                            "the expectation has \"sql\" queries: run with --database"
                        ),
                    );
                }
            }
            None => {}
        }
        if args.json {
            outln!("{json}");
        } else {
            print_human(i + 1, *line, &invocation);
            print_sql(&json);
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

/// Runs the expectation's `queries` in the message's transaction `txn` (or, when the message
/// left none, a new one), then commits it with `--commit` or rolls it back. Returns the fields
/// the result gains: `"sql"` (each query with its `"rows"` or `"error"`) and `"sql_commit"` when
/// a commit failed.
fn finish_sql(
    args: &TestArgs,
    rt: &tokio::runtime::Runtime,
    store: &PostgresStore,
    txn: Option<SqlTxn>,
    queries: &[String],
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let mut out = serde_json::Map::new();
    let committing = args.commit && txn.is_some();
    let mut txn = match (txn, queries.is_empty()) {
        (Some(t), _) => Some(t),
        (None, true) => None,
        (None, false) => {
            let timeout = std::time::Duration::from_millis(args.timeout_ms);
            match rt.block_on(store.begin_sql(
                args.sql_role.as_deref(),
                timeout,
                Deadline::after(timeout),
            )) {
                Ok(t) => Some(t),
                Err(e) => {
                    out.insert(
                        "sql".into(),
                        json!(format!("cannot begin a transaction: {e}")),
                    );
                    return out;
                }
            }
        }
    };
    if !queries.is_empty() {
        let checks = queries
            .iter()
            .map(
                |q| match txn.as_mut().map(|t| rt.block_on(rows_of(t, q, args))) {
                    Some(Ok(rows)) => json!({"query": q, "rows": rows}),
                    Some(Err(e)) => json!({"query": q, "error": e}),
                    None => json!({"query": q, "error": "no transaction"}),
                },
            )
            .collect();
        out.insert("sql".into(), serde_json::Value::Array(checks));
    }
    if committing
        && let Some(t) = txn.take()
        && let Err(e) = t.commit_alone()
    {
        out.insert("sql_commit".into(), json!(e.to_string()));
    }
    // Anything left rolls back as it drops.
    out
}

/// The rows of `query`, as JSON objects: PostgreSQL renders them (`json_agg`), so a column
/// reads as it would in `psql`'s JSON (numbers, text, nested json, ISO timestamps).
async fn rows_of(
    txn: &mut SqlTxn,
    query: &str,
    args: &TestArgs,
) -> Result<serde_json::Value, String> {
    let query = query.trim().trim_end_matches(';');
    let wrapped = format!("SELECT coalesce(json_agg(q), '[]'::json)::text FROM ({query}\n) q");
    let deadline = Deadline::after(std::time::Duration::from_millis(args.timeout_ms));
    let stmt = txn
        .prepare(&wrapped, deadline)
        .await
        .map_err(|e| e.to_string())?;
    let mut text = None;
    txn.query(&stmt, &[], deadline, |row| {
        text = row.try_get::<_, String>(0).ok();
        false
    })
    .await
    .map_err(|e| e.to_string())?;
    serde_json::from_str(text.as_deref().unwrap_or("[]")).map_err(|e| e.to_string())
}

/// The expectations' queries and what they found, and a failed commit.
fn print_sql(result: &serde_json::Value) {
    match &result["sql"] {
        serde_json::Value::Array(checks) => {
            for c in checks {
                let query = c["query"].as_str().unwrap_or_default();
                match c.get("rows") {
                    Some(rows) => outln!("  sql {query} -> {rows}"),
                    None => outln!("  sql {query} -> error: {}", c["error"]),
                }
            }
        }
        serde_json::Value::String(why) => outln!("  sql: {why}"),
        _ => {}
    }
    if let Some(why) = result["sql_commit"].as_str() {
        outln!("  sql commit failed: {why}");
    }
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
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
