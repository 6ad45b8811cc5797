//! `lockgate send` and `lockgate tail`: write to and read from the embedded broker.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Args;
use lockgate::broker::local::LocalBroker;
use lockgate::config::Config;
use lockgate::config::local::LocalSettings;
use lockgate::fixture;
use lockgate::message::{OutRecord, Record};
use lockgate::pipeline::route::inbound;
use serde_json::{Map, Value, json};

use super::EXIT_USAGE;
use lockgate::app::LOCAL_BROKER_DIR;

/// Where the embedded broker lives: `--state-dir`, or the config file's `state_dir`.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// The config file whose `[runtime] state_dir` holds the embedded broker (its `[local]`
    /// table sets the segment size and the duplicate window of appends).
    #[command(flatten)]
    config: super::ConfigPath,

    /// Use this state directory instead of the config file's (the config is then not read:
    /// `[local]` takes its defaults).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl BrokerArgs {
    /// The broker, with the config's `[local]` settings (the defaults with `--state-dir`).
    fn open(&self) -> anyhow::Result<LocalBroker> {
        let (state_dir, settings) = match &self.state_dir {
            Some(d) => (d.clone(), LocalSettings::default()),
            None => {
                let config = Config::load(&self.config.path())
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("use --state-dir to name the broker's directory without a config")?;
                (config.state_dir, config.local)
            }
        };
        Ok(LocalBroker::open(&state_dir.join(LOCAL_BROKER_DIR))?.with_settings(settings))
    }
}

/// Arguments of `lockgate send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Topic to append to.
    topic: String,

    /// The payload (text). Omit it with --file.
    #[arg(conflicts_with = "file")]
    payload: Option<String>,

    /// Message key.
    #[arg(long, short = 'k')]
    key: Option<String>,

    /// A header, as NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE", value_parser = super::parse_kv)]
    headers: Vec<(String, String)>,

    /// Append every message of a JSON Lines file (the `lockgate test` input format:
    /// {"payload": "..."} or "payload_base64" or "payload_json", "key", "headers").
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,

    #[command(flatten)]
    broker: BrokerArgs,
}

pub fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let records: Vec<OutRecord> = match (&args.file, &args.payload) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let messages = match lockgate::fixture::parse_inputs(&text) {
                Ok(m) => m,
                Err(errors) => {
                    for e in errors {
                        eprintln!("{}: {e}", file.display());
                    }
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            messages
                .into_iter()
                .map(|(_, m)| {
                    let mut headers = m.headers;
                    headers.extend(
                        args.headers
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
                    );
                    OutRecord {
                        topic: args.topic.clone(),
                        key: m.key.or_else(|| args.key.clone().map(String::into_bytes)),
                        headers,
                        payload: m.payload,
                    }
                })
                .collect()
        }
        (None, Some(payload)) => vec![OutRecord {
            topic: args.topic.clone(),
            key: args.key.clone().map(String::into_bytes),
            headers: args
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect(),
            payload: payload.clone().into_bytes(),
        }],
        (None, None) => {
            eprintln!("lockgate send: give a payload or --file FILE");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let broker = args.broker.open()?;
    let offsets = broker.append(&records)?;
    let written: Vec<u64> = offsets.iter().flatten().copied().collect();
    match (written.first(), written.last()) {
        (Some(first), Some(last)) if first == last => {
            outln!("{}: appended 1 message at offset {first}", args.topic);
        }
        (Some(first), Some(last)) => outln!(
            "{}: appended {} messages at offsets {first}..={last}",
            args.topic,
            written.len()
        ),
        _ => outln!("{}: nothing appended", args.topic),
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `lockgate tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Topic to print.
    topic: String,

    /// Start at this offset (default: the beginning).
    #[arg(long, default_value_t = 0)]
    from: u64,

    /// Print at most this many messages.
    #[arg(long, short = 'n')]
    limit: Option<u64>,

    /// Keep waiting for new messages (Ctrl-C stops).
    #[arg(long, short = 'f')]
    follow: bool,

    /// One JSON object per line (offset, key, headers, payload or payload_base64).
    #[arg(long, conflicts_with = "fixtures")]
    json: bool,

    /// One line per message in `lockgate test`'s input format, to turn real traffic into a
    /// fixture: `lockgate tail orders -n 20 --fixtures > orders.jsonl`.
    #[arg(long)]
    fixtures: bool,

    #[command(flatten)]
    broker: BrokerArgs,
}

pub fn tail(args: TailArgs) -> anyhow::Result<ExitCode> {
    let broker = args.broker.open()?;
    let mut next = args.from;
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let batch = broker.read(&args.topic, next, 1_000)?;
        for r in &batch {
            if args.limit.is_some_and(|l| printed >= l) {
                return Ok(ExitCode::SUCCESS);
            }
            let line = if args.fixtures {
                fixture::input_json(&inbound(r, 1)).to_string()
            } else if args.json {
                record_json(r).to_string()
            } else {
                record_text(r)
            };
            // A closed pipe (`| head`) ends the command quietly.
            if writeln!(out, "{line}").is_err() {
                return Ok(ExitCode::SUCCESS);
            }
            printed += 1;
            next = r.offset.map_or(next + 1, |o| o + 1);
        }
        if batch.is_empty() {
            if !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
            let _ = out.flush();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn text_or_b64(bytes: &[u8]) -> (bool, String) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (true, s.to_owned()),
        Err(_) => (false, B64.encode(bytes)),
    }
}

/// A record as JSON: `payload` when it is UTF-8, `payload_base64` otherwise (likewise `key`).
pub fn record_json(r: &Record) -> Value {
    let mut o = Map::new();
    if let Some(off) = r.offset {
        o.insert("offset".into(), json!(off));
    }
    if let Some(t) = r.timestamp_ms {
        o.insert("timestamp_ms".into(), json!(t));
    }
    if let Some(k) = &r.key {
        let (text, v) = text_or_b64(k);
        o.insert((if text { "key" } else { "key_base64" }).into(), json!(v));
    }
    if !r.headers.is_empty() {
        let h: Map<String, Value> = r
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), json!(String::from_utf8_lossy(v))))
            .collect();
        o.insert("headers".into(), Value::Object(h));
    }
    let (text, v) = text_or_b64(&r.payload);
    o.insert(
        (if text { "payload" } else { "payload_base64" }).into(),
        json!(v),
    );
    Value::Object(o)
}

fn record_text(r: &Record) -> String {
    let mut s = format!("#{}", r.offset.unwrap_or_default());
    if let Some(k) = &r.key {
        s.push_str(&format!(" key={}", String::from_utf8_lossy(k)));
    }
    for (n, v) in &r.headers {
        s.push_str(&format!(" {n}={}", String::from_utf8_lossy(v)));
    }
    let (text, payload) = text_or_b64(&r.payload);
    if text {
        s.push_str(&format!(" | {payload}"));
    } else {
        s.push_str(&format!(" | base64:{payload}"));
    }
    s
}
