//! `lockgate dlq list|show|replay`: inspect dead letters and send them back once the handler is
//! fixed, on every broker a route can dead-letter to (embedded, Kafka, JetStream) and in a
//! PostgreSQL store's dead-letter table.
//!
//! The DLQs are the ones runtime.toml names (`dlq = ...` of each route). Reading never joins a
//! consumer group or commits anything. What was replayed is remembered in the DLQ itself (replay
//! markers, see [`lockgate::dlq`]; a dead-letter table marks its rows instead, see
//! [`lockgate::broker::pg_dead_letters::DeadLetterTable`]), so a second replay, from any machine, skips it; a
//! replay that is interrupted writes the marker of the batch in flight before it exits and the
//! next run goes on from there.
//!
//! The route that takes a replayed copy to its end appends a replay result to its DLQ (handled,
//! skipped as a duplicate, or dead-lettered again); `list` and `show` print it and `replay`
//! waits for the results of what it replayed (`--wait`) and reports each letter's.
//!
//! The replay itself (two passes, batches, markers, waiting for results) is the library's
//! `lockgate::dlq::replay`; this file gives it the config's brokers (`ReplayIo` for `Ctx`), and
//! keeps the arguments, signals, progress and what is printed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use lockgate::broker::local::LocalBroker;
use lockgate::config::Config;
use lockgate::dlq::{
    Contents, DeadLetter, DlqRef, PositionError, ReplayEvent, ReplayOutcome, ReplayResult, Settings,
};
use lockgate::fixture;
use lockgate::pipeline::route::inbound;
use serde_json::json;

use super::{EXIT_FAILED, EXIT_USAGE};
use lockgate::app::LOCAL_BROKER_DIR;
use lockgate::app::dead_letters::ConfigDeadLetters;
use lockgate::telemetry::{AccessIo, DeadLetterAccess};

/// Exit code of a replay stopped by SIGINT or SIGTERM (after its batch in flight was finished).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit code of a replay whose copies were all published but not all handled: some were
/// dead-lettered again, or had no result within `--wait`.
const EXIT_NOT_ALL_HANDLED: u8 = 3;

/// Arguments of `lockgate dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters: position, route, error kind, attempts, when, status and reason.
    ///
    /// A position is `topic/partition/offset` (`topic/-/offset` where the broker has no
    /// partitions). A RabbitMQ queue has no offsets: there it is `queue/<hex>`, the shortest
    /// prefix (at least 8 hex digits) of the letter's digest that no other letter of the queue
    /// shares; `--json` prints all 16 digits.
    ///
    /// Every DLQ named by a route of the config is read (or only `--route`'s). Status is
    /// `pending`, `replayed` (a copy was published, no result yet), or the replayed copy's
    /// result: `handled`, `skipped` (its idempotency key had already succeeded) or `failed`
    /// (dead-lettered again, as a new dead letter). Exit codes: 0 listed, 2 bad config or
    /// arguments, 1 a DLQ could not be read.
    ///
    /// Example: lockgate dlq list --route orders --error-kind reject --since 2h
    List(ListArgs),

    /// Show one dead letter whole: metadata, key, headers and payload.
    ///
    /// POSITION is the first column of `lockgate dlq list` (`topic/partition/offset`; on
    /// RabbitMQ `queue/<hex>`, where any prefix of at least 4 hex digits that only one letter
    /// of the queue begins with will do, as will the 19-digit `queue/-/<n>` form of earlier
    /// versions). Exit codes: 0 shown, 1 not found or unreadable, 2 bad config or arguments
    /// (a malformed or ambiguous position).
    ///
    /// Example: lockgate dlq show orders.dlq/0/17 (RabbitMQ: lockgate dlq show orders.dlq/3f9a1c07)
    Show(ShowArgs),

    /// Publish dead letters back to the topic they came from (or `--to`), then mark them replayed.
    ///
    /// Replays the pending dead letters that match the filters, in DLQ order, in batches: a
    /// batch's copies are acknowledged by the broker before the batch is marked replayed in the
    /// DLQ. A copy carries the original key, payload and headers (without the `lockgate-dlq-*`
    /// envelope) plus `lockgate-replayed-from: <dlq position>` and the id
    /// `<route>:replay:<dlq position>`. A second replay skips what was replayed.
    ///
    /// With idempotency keys on the route, a replayed copy runs even though its message's key
    /// was seen (a dead-lettered key is re-opened for its replay); a copy whose key has since
    /// succeeded is skipped, never run twice.
    ///
    /// Then it waits (up to `--wait`) for the routes to take the copies to their end and
    /// reports each dead letter's result: handled, skipped (already handled) or dead-lettered
    /// again.
    ///
    /// Ctrl-C or SIGTERM stops after the batch in flight (a second Ctrl-C stops at once); run the
    /// same command again to replay the rest. Only a kill in the middle of a batch can repeat
    /// that batch, and the embedded broker and JetStream drop such repeats by their id.
    ///
    /// Exit codes: 0 replayed and every copy handled or skipped (or nothing to do, or
    /// `--wait 0`), 3 replayed but some copies were dead-lettered again or had no result within
    /// `--wait`, 1 a publish or a DLQ read failed (what was marked stays replayed; run again),
    /// 2 bad config or arguments, 130 interrupted.
    ///
    /// Example: lockgate dlq replay --route orders --dry-run
    Replay(ReplayArgs),

    /// Write the original messages of dead letters in `lockgate test`'s input format
    /// (`--fixtures`), so a production failure becomes a regression test in one command.
    ///
    /// Each message (its topic, position, key, headers and payload, without the DLQ envelope)
    /// follows a comment line that names its dead letter and why it failed. Example:
    ///   lockgate dlq export --route orders --since 2h --fixtures > failures.jsonl
    ///   lockgate test handler.wasm --input failures.jsonl
    /// Exit codes: 0 written, 1 a DLQ could not be read, 2 bad config or arguments.
    #[command(verbatim_doc_comment)]
    Export(ExportArgs),
}

/// Which config, and where its embedded broker lives.
#[derive(Debug, Args)]
struct ConfigArgs {
    #[command(flatten)]
    file: super::ConfigPath,

    /// Use this state directory (embedded broker) instead of the config's `state_dir`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Which dead letters.
#[derive(Debug, Args, Clone, Default)]
struct Filter {
    /// Only this route's dead letters (and only its DLQ is read).
    #[arg(long, short = 'r')]
    route: Option<String>,

    /// Only this error kind: reject, retry, trapped, timed_out, out_of_memory (repeatable).
    #[arg(long = "error-kind", value_name = "KIND")]
    error_kinds: Vec<String>,

    /// Only dead-lettered at or after this time: RFC 3339 (`2026-11-25T10:00:00Z`) or an age
    /// (`90m`, `2h`, `3days`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<u64>,

    /// Only dead-lettered before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<u64>,
}

/// Arguments of `lockgate dlq list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    config: ConfigArgs,

    #[command(flatten)]
    filter: Filter,

    /// Hide dead letters that were replayed.
    #[arg(long)]
    pending: bool,

    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `lockgate dlq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The dead letter's position, as `lockgate dlq list` prints it.
    position: String,

    #[command(flatten)]
    config: ConfigArgs,

    /// Read only this route's DLQ.
    #[arg(long, short = 'r')]
    route: Option<String>,

    /// One JSON object (payload as text when it is UTF-8, else `payload_base64`).
    #[arg(long)]
    json: bool,
}

/// Arguments of `lockgate dlq export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    config: ConfigArgs,

    #[command(flatten)]
    filter: Filter,

    /// Leave out dead letters that were replayed.
    #[arg(long)]
    pending: bool,

    /// Write `lockgate test` input lines (the one format there is; named so that others can
    /// come).
    #[arg(long, required = true)]
    fixtures: bool,
}

/// Arguments of `lockgate dlq replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    config: ConfigArgs,

    #[command(flatten)]
    filter: Filter,

    /// Only the dead letter at this position, in any form `lockgate dlq show` takes
    /// (repeatable).
    #[arg(long = "position", value_name = "POSITION")]
    positions: Vec<String>,

    /// Publish to this topic (on the route's source broker) instead of the original topic.
    #[arg(long, value_name = "TOPIC")]
    to: Option<String>,

    /// Print what would be replayed and where; publish nothing.
    #[arg(long)]
    dry_run: bool,

    /// Dead letters per batch (published, acknowledged, then marked together).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,

    /// At most this many messages per second (spare the fixed handler a flood).
    #[arg(long, value_name = "PER_SECOND", value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,

    /// How long to wait for the routes to report what became of the replayed copies (`30s`,
    /// `2m`; `0` does not wait). The routes must be running for results to come.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_wait)]
    wait: Duration,
}

/// Parses `--wait`: a duration such as `30s` or `2m`, or `0`.
fn parse_wait(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is not a duration (30s, 2m, 0 to not wait)"))
}

/// Parses `--since`/`--until`: RFC 3339 or an age before now; ms since the Unix epoch.
fn parse_time(s: &str) -> Result<u64, String> {
    let time = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => match humantime::parse_duration(s) {
            Ok(age) => SystemTime::now()
                .checked_sub(age)
                .ok_or_else(|| format!("{s:?} reaches before 1970"))?,
            Err(_) => {
                return Err(format!(
                    "{s:?} is neither an RFC 3339 time (2026-11-25T10:00:00Z) nor an age (90m, 2h)"
                ));
            }
        },
    };
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .map_err(|_| format!("{s:?} is before 1970"))
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        self.route.as_ref().is_none_or(|r| *r == d.route)
            && (self.error_kinds.is_empty() || self.error_kinds.contains(&d.error_kind))
            && self.since.is_none_or(|t| d.last_failure_ms >= t)
            && self.until.is_none_or(|t| d.last_failure_ms < t)
    }
}

/// A loaded config and its DLQs (the console's way to them, [`ConfigDeadLetters`]).
struct Ctx {
    config: Arc<Config>,
    access: ConfigDeadLetters,
}

impl Ctx {
    /// Loads the config; `Err(code)` after printing why it cannot be used.
    fn load(args: &ConfigArgs) -> Result<Self, ExitCode> {
        let mut config = match Config::load(&args.file.path()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return Err(ExitCode::from(EXIT_USAGE));
            }
        };
        if let Some(d) = &args.state_dir {
            config.state_dir = d.clone();
        }
        let local = match LocalBroker::open(&config.state_dir.join(LOCAL_BROKER_DIR)) {
            Ok(l) => l.with_settings(config.local.clone()),
            Err(e) => {
                eprintln!("cannot open the embedded broker: {e}");
                return Err(ExitCode::from(EXIT_FAILED));
            }
        };
        let access = ConfigDeadLetters::new(config, local);
        Ok(Self {
            config: access.config(),
            access,
        })
    }

    /// Loads the config and names the DLQs to read: `route`'s, or every distinct one of the
    /// config; `Err(code)` after printing why not.
    fn open(args: &ConfigArgs, route: Option<&str>) -> Result<(Self, Vec<DlqRef>), ExitCode> {
        let ctx = Self::load(args)?;
        match ctx.access.dlqs(route) {
            Ok(dlqs) => Ok((ctx, dlqs)),
            Err(e) => {
                eprintln!("{e}");
                Err(ExitCode::from(EXIT_USAGE))
            }
        }
    }

    /// The replay's view of the DLQs.
    fn io(&self) -> AccessIo<'_> {
        AccessIo(&self.access)
    }
}

/// The status of dead letter `d` in `c`: `pending`, `replayed` (no result yet) or its result.
fn status(c: &Contents, d: &DeadLetter) -> &'static str {
    match c.results.get(&d.position) {
        Some(r) => result_name(r.outcome),
        None if c.replayed.contains(&d.position) => "replayed",
        None => "pending",
    }
}

/// How a result is named in statuses.
fn result_name(outcome: ReplayOutcome) -> &'static str {
    match outcome {
        ReplayOutcome::Handled => "handled",
        ReplayOutcome::Skipped => "skipped",
        ReplayOutcome::DeadLettered => "failed",
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    f: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// Runs `lockgate dlq ...`. Bad config and arguments are answered (exit 2) before anything is
/// read; a failure after that (a DLQ or broker that cannot be read or written) exits 1.
pub fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let done = match args.command {
        DlqCommand::List(a) => block_on(list(a)),
        DlqCommand::Show(a) => block_on(show(a)),
        DlqCommand::Replay(a) => block_on(replay(a)),
        DlqCommand::Export(a) => block_on(export(a)),
    };
    match done {
        Err(e) if !super::is_closed_stdout(&e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        other => other,
    }
}

fn rfc3339(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One dead letter as `list` and `show` print it: the letter, whether it was replayed, and
/// the result of its replayed copy.
struct Row {
    dlq: DlqRef,
    dead: DeadLetter,
    /// The position's longest printed form (`--json` prints it: it stays unique as the DLQ
    /// grows).
    full: String,
    status: &'static str,
    replayed: bool,
    result: Option<ReplayResult>,
}

impl Row {
    fn new(dlq: &DlqRef, dead: DeadLetter, c: &Contents) -> Self {
        Self {
            dlq: dlq.clone(),
            full: c.numbering.full(&dead.position),
            status: status(c, &dead),
            replayed: c.replayed.contains(&dead.position),
            result: c.results.get(&dead.position).cloned(),
            dead,
        }
    }
}

/// The first line of `text`, at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() > max || line.len() < text.len() {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        line.to_owned()
    }
}

async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let (ctx, dlqs) = match Ctx::open(&args.config, args.filter.route.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut out = std::io::stdout().lock();
    for dlq in &dlqs {
        // The payloads are what is exported: every matching letter is kept whole.
        let mut c =
            lockgate::dlq::read(&mut ctx.io(), dlq, |d| args.filter.matches(d), |_| true).await?;
        for d in std::mem::take(&mut c.dead) {
            if args.pending && c.replayed.contains(&d.position) {
                continue;
            }
            let mut message = inbound(&d.original(), 1);
            if !d.message_id.is_empty() {
                message.id.clone_from(&d.message_id);
            }
            writeln!(
                out,
                "# {dlq} {}: route {}, {} after {} attempt(s): {}",
                d.shown,
                d.route,
                d.error_kind,
                d.attempts,
                one_line(&d.reason, 200)
            )?;
            writeln!(out, "{}", fixture::input_json(&message))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (ctx, dlqs) = match Ctx::open(&args.config, args.filter.route.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut rows = Vec::new();
    for dlq in &dlqs {
        let mut c =
            lockgate::dlq::read(&mut ctx.io(), dlq, |d| args.filter.matches(d), |_| false).await?;
        for d in std::mem::take(&mut c.dead) {
            let row = Row::new(dlq, d, &c);
            if !(args.pending && row.replayed) {
                rows.push(row);
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        for row in &rows {
            writeln!(out, "{}", metadata_json(row))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let width = rows
        .iter()
        .map(|r| r.dead.shown.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let route_width = rows
        .iter()
        .map(|r| r.dead.route.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        out,
        "{:width$}  {:route_width$}  {:13}  {:>8}  {:20}  {:8}  REASON",
        "POSITION", "ROUTE", "ERROR", "ATTEMPTS", "DEAD-LETTERED (UTC)", "STATUS"
    )?;
    for r in &rows {
        let d = &r.dead;
        writeln!(
            out,
            "{:width$}  {:route_width$}  {:13}  {:>8}  {:20}  {:8}  {}",
            d.shown,
            d.route,
            d.error_kind,
            d.attempts,
            rfc3339(d.last_failure_ms),
            r.status,
            one_line(&d.reason, 80)
        )?;
    }
    let replayed = rows.iter().filter(|r| r.replayed).count();
    let names: Vec<String> = dlqs
        .iter()
        .map(|d| format!("{}:{}", d.broker, d.topic))
        .collect();
    let mut results = BTreeMap::<&str, usize>::new();
    for r in rows.iter().filter(|r| r.replayed) {
        *results.entry(r.status).or_default() += 1;
    }
    let results = if results.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = results.iter().map(|(s, n)| format!("{n} {s}")).collect();
        format!(": {}", parts.join(", "))
    };
    writeln!(
        out,
        "{} dead letter{} ({} pending, {replayed} replayed{results}) in {}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        rows.len() - replayed,
        names.join(", ")
    )?;
    Ok(ExitCode::SUCCESS)
}

/// A dead letter's envelope as one JSON object (what `list --json` prints per line). `status`
/// stays `pending` or `replayed`; `result` is the replayed copy's (`handled`, `skipped`,
/// `failed`), or null.
fn metadata_json(row: &Row) -> serde_json::Value {
    let (dlq, d) = (&row.dlq, &row.dead);
    json!({
        "dlq": format!("{}:{}", dlq.broker, dlq.topic),
        "position": row.full,
        "status": if row.replayed { "replayed" } else { "pending" },
        "result": row.result.as_ref().map(|r| result_name(r.outcome)),
        "result_detail": row.result.as_ref().map(|r| r.detail.clone()),
        "result_route": row.result.as_ref().map(|r| r.route.clone()),
        "route": d.route,
        "handler": d.handler,
        "module_hash": d.module_hash,
        "source": d.source_position,
        "message_id": d.message_id,
        "error_kind": d.error_kind,
        "reason": d.reason,
        "gave_up": d.gave_up,
        "attempts": d.attempts,
        "first_failure_ms": d.first_failure_ms,
        "last_failure_ms": d.last_failure_ms,
    })
}

/// Text of a byte string: itself when UTF-8, else base64 with a note.
fn text_or_base64(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => format!("(base64) {}", B64.encode(bytes)),
    }
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let (ctx, dlqs) = match Ctx::open(&args.config, args.route.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    match locate(&ctx, &dlqs, &args.position).await? {
        Ok((dlq, d, c)) => {
            print_dead_letter(&Row::new(&dlq, d, &c), args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(code) => Ok(code),
    }
}

/// The dead letter at the position `typed` (in any form [`lockgate::dlq::PositionArg`]
/// reads) among `dlqs`, with its payload and its DLQ's contents about it: how `show` and
/// `replay --position` read a position. `Ok(Err(code))` after printing why there is none.
async fn locate(
    ctx: &Ctx,
    dlqs: &[DlqRef],
    typed: &str,
) -> anyhow::Result<Result<(DlqRef, DeadLetter, Contents), ExitCode>> {
    // A position starts with its DLQ's topic: read only DLQs with that topic.
    let candidates: Vec<&DlqRef> = dlqs
        .iter()
        .filter(|d| {
            typed
                .strip_prefix(&d.topic)
                .is_some_and(|rest| rest.starts_with('/'))
        })
        .collect();
    if candidates.is_empty() {
        let topics: Vec<&str> = dlqs.iter().map(|d| d.topic.as_str()).collect();
        eprintln!(
            "{typed:?} is not a position in any DLQ of {} (positions look like TOPIC/PARTITION/OFFSET, or QUEUE/HEX on RabbitMQ, as `lockgate dlq list` prints them; DLQ topics: {})",
            ctx.config.file.display(),
            topics.join(", ")
        );
        return Ok(Err(ExitCode::from(EXIT_USAGE)));
    }
    for dlq in candidates {
        match lockgate::dlq::find(&mut ctx.io(), dlq, typed).await? {
            Ok((d, c)) => return Ok(Ok((dlq.clone(), d, c))),
            Err(PositionError::Unknown { .. }) => {}
            Err(e) => {
                eprintln!("{e} (in {dlq})");
                return Ok(Err(ExitCode::from(EXIT_USAGE)));
            }
        }
    }
    eprintln!("no dead letter at {typed}");
    Ok(Err(ExitCode::from(EXIT_FAILED)))
}

fn print_dead_letter(row: &Row, as_json: bool) -> anyhow::Result<()> {
    let (dlq, d) = (&row.dlq, &row.dead);
    let mut out = std::io::stdout().lock();
    let original_headers: Vec<(&String, &Vec<u8>)> = d
        .record
        .headers
        .iter()
        .filter(|(n, _)| !n.starts_with(lockgate::dlq::DLQ_HEADER_PREFIX))
        .filter(|(n, _)| n != lockgate::message::LOCKGATE_ID_HEADER)
        .map(|(n, v)| (n, v))
        .collect();
    if as_json {
        let mut v = metadata_json(row);
        v["headers"] = original_headers
            .iter()
            .map(|(n, v)| json!([n, String::from_utf8_lossy(v)]))
            .collect();
        if let Some(k) = &d.record.key {
            v["key"] = json!(String::from_utf8_lossy(k));
        }
        match std::str::from_utf8(&d.record.payload) {
            Ok(s) => v["payload"] = json!(s),
            Err(_) => v["payload_base64"] = json!(B64.encode(&d.record.payload)),
        }
        writeln!(out, "{v}")?;
        return Ok(());
    }
    if row.full == d.shown {
        writeln!(
            out,
            "position       {} ({}:{})",
            d.shown, dlq.broker, dlq.topic
        )?;
    } else {
        writeln!(
            out,
            "position       {} (in full {}; {}:{})",
            d.shown, row.full, dlq.broker, dlq.topic
        )?;
    }
    writeln!(out, "status         {}", row.status)?;
    if let Some(r) = &row.result {
        writeln!(
            out,
            "replay result  {} by route {} at {}: {}",
            result_name(r.outcome),
            r.route,
            rfc3339(r.at_ms),
            r.detail
        )?;
    }
    writeln!(
        out,
        "route          {} (handler {}, module {})",
        d.route, d.handler, d.module_hash
    )?;
    writeln!(
        out,
        "source         {} (message id {})",
        d.source_position, d.message_id
    )?;
    writeln!(
        out,
        "error          {}: {} ({} after {} attempt{})",
        d.error_kind,
        d.reason,
        d.gave_up,
        d.attempts,
        if d.attempts == 1 { "" } else { "s" }
    )?;
    writeln!(out, "first failure  {}", rfc3339(d.first_failure_ms))?;
    writeln!(out, "last failure   {}", rfc3339(d.last_failure_ms))?;
    if let Some(k) = &d.record.key {
        writeln!(out, "key            {}", text_or_base64(k))?;
    }
    for (n, v) in &original_headers {
        writeln!(out, "header         {n}={}", text_or_base64(v))?;
    }
    writeln!(out, "payload        {}", text_or_base64(&d.record.payload))?;
    Ok(())
}

/// Progress of a replay: a bar with rate and ETA on a terminal, a line a second otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
    started: Instant,
    last_line: Instant,
    total: u64,
    done: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "replay {bar:40} {pos}/{len} {per_sec} ETA {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let now = Instant::now();
        Self {
            bar,
            started: now,
            last_line: now,
            total,
            done: 0,
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        self.bar.set_position(self.done);
        if self.bar.is_hidden()
            && (self.last_line.elapsed() >= Duration::from_secs(1) || self.done == self.total)
        {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = self.done as f64 / secs;
            let eta = if rate > 0.0 {
                (self.total - self.done) as f64 / rate
            } else {
                0.0
            };
            eprintln!(
                "replay: {}/{} ({rate:.0}/s, ETA {eta:.0} s)",
                self.done, self.total
            );
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (ctx, dlqs) = match Ctx::open(&args.config, args.filter.route.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if flag.swap(true, AtomicOrdering::SeqCst) {
                    eprintln!("replay: stopped at once; the batch in flight may be replayed again");
                    std::process::exit(i32::from(EXIT_INTERRUPTED));
                }
                eprintln!(
                    "replay: stopping after the batch in flight (Ctrl-C again to stop at once)"
                );
            }
        });
    }

    // `--position`s, each read back to the one letter it names.
    let mut wanted: HashSet<(DlqRef, String)> = HashSet::new();
    for typed in &args.positions {
        match locate(&ctx, &dlqs, typed).await? {
            Ok((dlq, d, _)) => {
                wanted.insert((dlq, d.position));
            }
            Err(code) => return Ok(code),
        }
    }
    let dlqs: Vec<DlqRef> = if wanted.is_empty() {
        dlqs
    } else {
        dlqs.into_iter()
            .filter(|dlq| wanted.iter().any(|(w, _)| w == dlq))
            .collect()
    };
    let positions: HashSet<&str> = wanted.iter().map(|(_, p)| p.as_str()).collect();

    // Pass 1: what is pending, per DLQ, and whether every route it belongs to is known.
    let plan = lockgate::dlq::plan(
        &mut ctx.io(),
        &dlqs,
        |d| {
            args.filter.matches(d)
                && (positions.is_empty() || positions.contains(d.position.as_str()))
        },
        args.to.as_deref(),
        &interrupted,
    )
    .await?;
    if plan.interrupted {
        eprintln!("replay: interrupted before anything was replayed");
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    if !plan.unknown_routes.is_empty() {
        for (route, n) in &plan.unknown_routes {
            eprintln!(
                "{}: {n} dead letter{} of route {route:?}, which is not in the config: cannot tell which broker to replay {} to (add the route back, or filter with --route)",
                ctx.config.file.display(),
                if *n == 1 { "" } else { "s" },
                if *n == 1 { "it" } else { "them" }
            );
        }
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let (total, already) = (plan.total(), plan.already);
    if total == 0 {
        outln!(
            "nothing to replay: no pending dead letter matches ({already} matching already replayed)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.dry_run {
        for (dlq, planned) in &plan.dlqs {
            for p in planned {
                let broker = ctx.access.source_broker(&p.route).unwrap_or_default();
                outln!(
                    "would replay {} ({dlq}) to {broker}:{} for route {}",
                    p.shown,
                    p.to,
                    p.route
                );
            }
        }
        outln!("dry run: {total} dead letters would be replayed ({already} already replayed)");
        return Ok(ExitCode::SUCCESS);
    }

    // Pass 2: read again, publish the planned ones batch by batch, mark each batch.
    let shown: HashMap<String, String> = plan
        .dlqs
        .iter()
        .flat_map(|(_, planned)| planned.iter())
        .map(|p| (p.position.clone(), p.shown.clone()))
        .collect();
    let mut progress = Progress::new(total as u64);
    let settings = Settings {
        batch: args.batch as usize,
        rate: args.rate,
    };
    let done = lockgate::dlq::replay(&mut ctx.io(), plan, settings, &interrupted, |event| {
        match event {
            ReplayEvent::Batch { n } => progress.add(n as u64),
            ReplayEvent::NotFound { dlq, n } => eprintln!(
                "replay: {n} dead letters of {dlq} were not found on the second read (removed by retention?)"
            ),
        }
    })
    .await?;
    if done.interrupted {
        eprintln!(
            "replay: interrupted after {} of {total}; run the same command again to replay the rest",
            done.replayed
        );
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    progress.finish();
    let replayed = done.replayed;
    outln!(
        "replayed {replayed} dead letter{} ({already} matching already replayed before)",
        if replayed == 1 { "" } else { "s" }
    );
    if args.wait.is_zero() || replayed == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let results = lockgate::dlq::await_results(
        &mut ctx.io(),
        &done.published,
        args.wait,
        &interrupted,
        |found, total, left| {
            eprintln!(
                "replay: {found} of {total} handled so far, waiting up to {} s more",
                left.as_secs()
            );
        },
    )
    .await?;
    Ok(report_results(
        &done.published,
        &results,
        &shown,
        args.wait,
        &ctx.config,
    ))
}

/// Prints what became of each replayed dead letter (one line for each that was not handled,
/// one summary line; positions as `shown` prints them) and chooses the exit code.
fn report_results(
    published: &[(DlqRef, Vec<String>)],
    results: &HashMap<String, ReplayResult>,
    shown: &HashMap<String, String>,
    wait: Duration,
    config: &Config,
) -> ExitCode {
    let mut counts = BTreeMap::<ReplayOutcome, usize>::new();
    let mut missing: BTreeMap<&str, usize> = BTreeMap::new();
    let mut out = std::io::stdout().lock();
    for (dlq, positions) in published {
        for p in positions {
            match results.get(p) {
                Some(r) => {
                    *counts.entry(r.outcome).or_default() += 1;
                    if r.outcome != ReplayOutcome::Handled {
                        let _ = writeln!(
                            out,
                            "{}: {} by route {}: {}",
                            shown.get(p).unwrap_or(p),
                            match r.outcome {
                                ReplayOutcome::Skipped => "skipped",
                                _ => "dead-lettered again",
                            },
                            r.route,
                            r.detail
                        );
                    }
                }
                None => *missing.entry(dlq.topic.as_str()).or_default() += 1,
            }
        }
    }
    let n = |o| counts.get(&o).copied().unwrap_or(0);
    let (handled, skipped, failed) = (
        n(ReplayOutcome::Handled),
        n(ReplayOutcome::Skipped),
        n(ReplayOutcome::DeadLettered),
    );
    let unknown: usize = missing.values().sum();
    let _ = writeln!(
        out,
        "results: {handled} handled, {skipped} skipped (already handled), {failed} dead-lettered again{}",
        if unknown > 0 {
            format!(", {unknown} without a result after {} s", wait.as_secs())
        } else {
            String::new()
        }
    );
    if unknown > 0 {
        let routes: Vec<&str> = config.routes.keys().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "no result yet means no route has taken those copies to their end: is `lockgate run` running with the route ({})? `lockgate dlq list` shows each one's result once it comes",
            routes.join(", ")
        );
    }
    if failed > 0 || unknown > 0 {
        ExitCode::from(EXIT_NOT_ALL_HANDLED)
    } else {
        ExitCode::SUCCESS
    }
}
