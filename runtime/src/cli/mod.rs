//! Command-line interface: argument definitions and dispatch.

/// `println!` for command output that a reader may stop reading (`lockgate test --json | head`):
/// a closed stdout ends the command at once with exit code 0 instead of a panic (see
/// [`write_out`]).
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod check;
mod config;
mod dlq;
mod local;
mod migrate;
mod project;
#[cfg(test)]
mod reference;
mod reload;
mod run;
mod status;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a failed check or a test whose expectations did not match.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for unusable input (bad arguments, unreadable files, a component that won't load).
pub const EXIT_USAGE: u8 = 2;

/// Writes command output to stdout. When the reader has gone (a closed pipe: `| head` read what
/// it wanted) the command's output is no longer wanted, so the process ends at once with exit
/// code 0; another write error ends it with [`EXIT_FAILED`].
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

/// Ends the process after a failed write to stdout (see [`write_out`]).
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(i32::from(EXIT_FAILED));
}

/// Whether `e` comes from writing to a stdout whose reader has gone (see [`write_out`]).
pub fn is_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// lockgate runs WebAssembly message handlers against Kafka, NATS, RabbitMQ or its embedded broker,
/// with retries, circuit breakers, dead-letter routing and idempotency around every call.
#[derive(Debug, Parser)]
#[command(name = "lockgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a handler component on an in-memory host against messages from a file.
    ///
    /// Works with components built in any language. For each message it prints the outcome
    /// (ok, retry, reject, trapped, timed_out, out_of_memory), what the handler published and
    /// what it logged. With --expect it compares the results and exits 1 on a mismatch.
    ///
    /// Input (one JSON object per line, all fields optional):
    ///   {"payload": "text"} or {"payload_base64": "..."} or {"payload_json": {...}},
    ///   "key" / "key_base64", "headers": {"name": "value"}, "headers_base64",
    ///   "attempt" (default 1), "topic" (default "test"), "partition", "offset",
    ///   "timestamp_ms", "reply_to", "id".
    /// `lockgate tail --fixtures` and `lockgate dlq export --fixtures` write this format.
    ///
    /// Expectations (one line per message, compared as a subset: only the fields written
    /// are checked, `headers` for the headers it names; `X_contains` matches a substring of
    /// X; `payload_json` compares the payload as JSON, whatever its spacing):
    ///   {"outcome": "ok", "published": [{"topic": "out", "payload": "HELLO"}]}
    ///   {"outcome": "ok", "published": [{"payload_json": {"id": 7}, "headers": {"t": "1"}}]}
    ///   {"outcome": "reject", "reason_contains": "invalid JSON"}
    ///
    /// Example:
    ///   lockgate test handler.wasm --input in.jsonl --expect expected.jsonl -c target=out
    ///
    /// Exit codes: 0 all messages ran (and matched), 1 expectations did not match,
    /// 2 unusable input (unreadable file, bad fixture line, component that does not load).
    #[command(verbatim_doc_comment)]
    Test(test::TestArgs),

    /// Create a handler project: a handler that parses, decides, publishes and retries or
    /// rejects, its test fixtures, a runtime.toml that runs it on the embedded broker, and the
    /// SDK and WIT in lockgate-sdk/, so it builds anywhere.
    ///
    /// Examples:
    ///   lockgate new python enrich
    ///   lockgate new rust services/orders --name order-enricher
    ///   lockgate new go enrich --sdk-only     (after upgrading lockgate)
    ///
    /// Exit codes: 0 created, 2 refused (a directory that is not empty, a bad name).
    #[command(verbatim_doc_comment)]
    New(project::NewArgs),

    /// Build a handler project into a component: detects the language (Cargo.toml, app.py,
    /// handler.js, .go or .c files), installs its pinned toolchain on first use and prints the
    /// component's path (DIR/target/<DIR's name>.wasm unless -o says otherwise).
    ///
    /// Rebuilds exactly when a source, the SDK, the WIT or a toolchain pin changed, or the
    /// component is missing or damaged; otherwise it says "up to date". The same sources and
    /// toolchain give the same bytes, so an unchanged handler keeps its version. Toolchains live
    /// in ~/.cache/lockgate/toolchains (LOCKGATE_TOOLCHAINS); C needs Debian's clang-19, which
    /// it installs with apt-get.
    ///
    /// Examples:
    ///   lockgate build
    ///   lockgate build handlers/enrich -o dist/enrich.wasm
    ///
    /// Exit codes: 0 built or up to date, 1 the build failed (its output is printed),
    /// 2 no handler project there, or a tool that cannot be installed.
    #[command(verbatim_doc_comment)]
    Build(project::BuildArgs),

    /// Validate runtime.toml and load every handler against the lockgate:handler world.
    ///
    /// Prints every problem, one per line, as `FILE: TOML.PATH: what is wrong`: unknown fields,
    /// bad values, missing module files, modules that are not components, components that do
    /// not export `handle` or import interfaces lockgate does not provide, and start functions
    /// that trap. With --connect it also connects to every broker and state store and reports
    /// refused logins, unreachable servers and sources that do not exist or are declared
    /// differently (a missing Kafka topic or JetStream stream, a RabbitMQ queue of another
    /// type), the same way, changing nothing.
    /// Exit codes: 0 valid, 1 problems found, 2 the file cannot be read.
    ///
    /// Example: lockgate check prod.toml --connect
    Check(check::CheckArgs),

    /// Run every route of runtime.toml until SIGINT or SIGTERM.
    ///
    /// Prints one line per route at start (source, handler version, outputs, lanes, retry,
    /// breaker, DLQ, idempotency, rate limit) and its counters at the end. On SIGINT/SIGTERM it
    /// stops fetching, lets in-flight messages finish within `[runtime] shutdown_grace_ms`,
    /// leaves the rest unacknowledged (they are redelivered) and commits what is done.
    /// A route whose broker or state store is down or refuses it keeps trying and shows as
    /// `connecting` or `failing` with the reason on /readyz and in `lockgate status`; a
    /// misconfiguration (refused login, a queue declared differently, a missing topic or
    /// stream) is logged once with what to change and retried every 10 s or so.
    /// Exit codes: 0 stopped by a signal, 1 a route's source failed, 2 bad config or a module
    /// that does not load.
    ///
    /// Example: lockgate run prod.toml --admin 127.0.0.1:9090
    Run(run::RunArgs),

    /// Append a message (or a JSON Lines file of them) to a topic of the embedded broker.
    ///
    /// Examples:
    ///   lockgate send orders '{"kind":"order","id":1}' --key user-1 --header trace=abc
    ///   lockgate send orders --file tests/fixtures/router/input.jsonl
    #[command(verbatim_doc_comment)]
    Send(local::SendArgs),

    /// Print the messages of a topic of the embedded broker (`--follow` keeps waiting).
    ///
    /// Text lines look like `#OFFSET key=K header=value | payload`; `--json` prints one object
    /// per line. Dead-letter topics (`<topic>.dlq`) show the failure in `lockgate-dlq-*`
    /// headers.
    ///
    /// Example: lockgate tail orders.dlq -n 20 --json
    Tail(local::TailArgs),

    /// Show a running `lockgate run`'s routes: state, breaker, in-flight, counters, lag and
    /// the current rate, read from its admin endpoint (`--admin`, or the config's
    /// `[runtime] admin`).
    ///
    /// States: running, paused (by the breaker), connecting (its source or a store it needs
    /// has not connected yet), failing (its source or a store fails; the reason and the fix
    /// are printed under the table), starting, stopped.
    /// Exit codes: 0 shown, 1 the endpoint did not answer, 2 no address to ask.
    ///
    /// Example: lockgate status prod.toml (or: lockgate status --admin 10.0.0.7:9090)
    Status(status::StatusArgs),

    /// Inspect dead letters, export them as test fixtures, and replay them once the handler is
    /// fixed (`list`, `show`, `export`, `replay`), on the embedded broker, Kafka, JetStream,
    /// RabbitMQ and PostgreSQL dead-letter tables.
    ///
    /// Reads the DLQs the config's routes name. Typical workflow:
    ///   lockgate dlq list --route orders --since 2h
    ///   lockgate dlq show orders.dlq/0/17
    ///   (deploy the fixed handler)
    ///   lockgate dlq replay --route orders --dry-run
    ///   lockgate dlq replay --route orders --rate 200
    #[command(verbatim_doc_comment)]
    Dlq(dlq::DlqArgs),

    /// Ask a running `lockgate run` to reload runtime.toml and its handler modules now.
    ///
    /// `lockgate run` also reloads by itself when a module or the config file changes, and on
    /// SIGHUP. New modules are compiled and instantiated before anything changes; a config or
    /// module with a problem is refused whole and the running routes stay as they were.
    /// Exit codes: 0 reloaded (the changes are printed), 1 refused (the reason is printed) or
    /// no answer, 2 no address to ask.
    ///
    /// Example: lockgate reload prod.toml
    Reload(reload::ReloadArgs),

    /// Create or upgrade the schema of the config's PostgreSQL state stores, and check that its
    /// Redis stores answer.
    ///
    /// `lockgate run` migrates on first use too (processes starting together serialise on an
    /// advisory lock); run this in a deploy step to fail early on a bad URL or missing rights.
    /// Exit codes: 0 done, 1 a store failed (the reason is printed), 2 bad config or arguments.
    ///
    /// Example: lockgate migrate prod.toml --store pg
    Migrate(migrate::MigrateArgs),

    /// Facts about runtime.toml itself: `lockgate config reference` prints every table and
    /// field with its type, default and meaning, as Markdown.
    ///
    /// The reference is rendered from the same declarations the parser reads the fields from,
    /// so it matches this lockgate exactly (docs/reference/runtime-toml.md is its output).
    /// Exit codes: 0 printed.
    ///
    /// Example: lockgate config reference > runtime-toml.md
    Config(config::ConfigArgs),
}

impl Cli {
    /// The log filter used when `LOCKGATE_LOG` is not set: `lockgate run` reports its routes'
    /// warnings and notable events (`info`); the other commands stay quiet (`warn`).
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Run(_) => "lockgate=info,warn",
            _ => "warn",
        }
    }
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Test(args) => test::run(args),
        Command::New(args) => project::new(args),
        Command::Build(args) => project::build(args),
        Command::Check(args) => check::run(args),
        Command::Run(args) => run::run(args),
        Command::Send(args) => local::send(args),
        Command::Tail(args) => local::tail(args),
        Command::Status(args) => status::run(args),
        Command::Dlq(args) => dlq::run(args),
        Command::Reload(args) => reload::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Config(args) => config::run(args),
    }
}

/// Default config file for commands that take one.
pub fn default_config() -> PathBuf {
    PathBuf::from("runtime.toml")
}

/// The runtime.toml a command reads: every such command takes it as its last positional
/// argument or as `-c`/`--config` (the same thing), `runtime.toml` by default.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigPath {
    /// The config file [default: runtime.toml].
    #[arg(value_name = "CONFIG")]
    positional: Option<PathBuf>,

    /// The config file, as an option (the same as CONFIG).
    #[arg(
        short = 'c',
        long = "config",
        value_name = "CONFIG",
        conflicts_with = "positional"
    )]
    option: Option<PathBuf>,
}

impl ConfigPath {
    /// The file named, or runtime.toml.
    pub fn path(&self) -> PathBuf {
        self.option
            .clone()
            .or_else(|| self.positional.clone())
            .unwrap_or_else(default_config)
    }
}

/// Parses `KEY=VALUE` arguments (`--config`, `--header`).
fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}
