//! The data of one invocation in host types: the message a handler gets ([`InboundMessage`]),
//! what it publishes, logs, and what became of the call ([`Outcome`], [`Invocation`]).

use std::time::Duration;

use super::bindings::types;

/// A message as the host hands it to a handler (the WIT `message`, in host types).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundMessage {
    /// Route-unique, redelivery-stable id.
    pub id: String,
    /// Topic, subject or queue.
    pub topic: String,
    /// Partition, when the broker has them.
    pub partition: Option<u32>,
    /// Offset or stream sequence.
    pub offset: Option<u64>,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub payload: Vec<u8>,
    /// Broker timestamp, ms since the Unix epoch.
    pub timestamp_ms: Option<u64>,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Reply destination.
    pub reply_to: Option<String>,
}

impl InboundMessage {
    pub(super) fn into_wit(self) -> types::Message {
        types::Message {
            id: self.id,
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| types::Header { name, value })
                .collect(),
            payload: self.payload,
            timestamp_ms: self.timestamp_ms,
            attempt: self.attempt.max(1),
            reply_to: self.reply_to,
        }
    }
}

/// A message a handler published (buffered until the invocation succeeds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Destination topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub payload: Vec<u8>,
}

/// Severity of a log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the handler survived.
    Warn,
    /// A failure.
    Error,
}

impl LogLevel {
    /// Lower-case name, as printed and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where a log record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// The `log` import.
    Guest,
    /// A line the guest wrote to stdout.
    Stdout,
    /// A line the guest wrote to stderr.
    Stderr,
    /// The host, about something the guest did in the call (an HTTP request its grant denied).
    Host,
}

impl LogSource {
    /// Lower-case name, as printed and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Guest => "log",
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
            LogSource::Host => "host",
        }
    }
}

/// One log record from an invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// Origin.
    pub source: LogSource,
    /// Text (truncated past the host's per-record bound).
    pub message: String,
}

/// What became of one call of `handle`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded; these outputs are to be published.
    Ok {
        /// Outputs in publish order.
        outputs: Vec<OutgoingMessage>,
    },
    /// The handler asked to be retried.
    Retry {
        /// Why.
        reason: String,
        /// The earliest delay the handler asked for.
        after: Option<Duration>,
    },
    /// The handler rejected the message (or published something the host refused).
    Rejected {
        /// Why.
        reason: String,
    },
    /// The guest trapped (panic, unreachable, stack overflow, failed instantiation).
    Trapped {
        /// The trap, in one line.
        reason: String,
    },
    /// The call exceeded its deadline and was interrupted, running wasm or waiting in the host.
    TimedOut {
        /// The deadline that fired.
        timeout: Duration,
    },
    /// The guest ran into its memory cap and trapped.
    OutOfMemory {
        /// The cap, in bytes.
        limit_bytes: u64,
    },
}

impl Outcome {
    /// Short machine-readable kind: `ok`, `retry`, `reject`, `trapped`, `timed_out`,
    /// `out_of_memory`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Retry { .. } => "retry",
            Outcome::Rejected { .. } => "reject",
            Outcome::Trapped { .. } => "trapped",
            Outcome::TimedOut { .. } => "timed_out",
            Outcome::OutOfMemory { .. } => "out_of_memory",
        }
    }

    /// Human-readable reason, if the outcome is a failure.
    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Ok { .. } => None,
            Outcome::Retry { reason, .. }
            | Outcome::Rejected { reason }
            | Outcome::Trapped { reason } => Some(reason.clone()),
            Outcome::TimedOut { timeout } => Some(format!(
                "handler exceeded its deadline of {} ms",
                timeout.as_millis()
            )),
            Outcome::OutOfMemory { limit_bytes } => Some(format!(
                "handler exceeded its memory limit of {} MiB",
                limit_bytes / (1024 * 1024)
            )),
        }
    }
}

/// Where a call's writes go.
#[derive(Debug)]
pub enum Staging {
    /// Straight to the store: kv writes apply as they are made (no idempotency key is claimed
    /// for the message).
    Direct,
    /// Held back to commit with the message's claimed key: kv writes are staged, and the SQL
    /// transaction opens at the call's first statement.
    Staged,
    /// Held back as with [`Self::Staged`], in this transaction, which is open already: the
    /// message's key was claimed in it ([`crate::state::PostgresStore::begin_claimed`]).
    Claimed(Box<crate::state::SqlTxn>),
}

impl Staging {
    /// [`Self::Staged`] if `staged`, else [`Self::Direct`].
    pub fn staged_if(staged: bool) -> Self {
        if staged { Self::Staged } else { Self::Direct }
    }

    /// Whether the call's writes are held back.
    pub fn is_staged(&self) -> bool {
        !matches!(self, Self::Direct)
    }
}

/// The result of one invocation: outcome, logs and timing.
#[derive(Debug)]
pub struct Invocation {
    /// What happened.
    pub outcome: Outcome,
    /// Log records (guest logs, stdout and stderr lines), bounded.
    pub logs: Vec<LogRecord>,
    /// Records dropped because the bound was reached.
    pub dropped_logs: u64,
    /// Publishes the host refused (a topic not in the route's outputs, too large, too many):
    /// the first one's reason fails the call.
    pub refused_outputs: u32,
    /// Wall-clock time of the call.
    pub elapsed: Duration,
    /// The kv writes the call staged, when it ran with staging (empty unless it succeeded);
    /// `None` when its writes went straight to the store.
    pub kv_writes: Option<Vec<crate::state::KvWrite>>,
    /// The outbound HTTP requests the call made, in order.
    pub http: Vec<super::outbound::HttpRecord>,
    /// The call's SQL transaction, open, when it succeeded after running statements: it
    /// commits with the message's idempotency key (`pipeline`), and dropping it rolls it back.
    pub sql: Option<crate::state::SqlTxn>,
}

impl Invocation {
    /// An invocation in which no guest code ran (a poisoned instance, a failed instantiation, a
    /// crashed call task, a passthrough that publishes the message as it is): `outcome`, no
    /// logs, no time spent, no kv writes.
    pub fn without_guest(outcome: Outcome) -> Self {
        Self {
            outcome,
            logs: Vec::new(),
            dropped_logs: 0,
            refused_outputs: 0,
            elapsed: Duration::ZERO,
            kv_writes: None,
            http: Vec::new(),
            sql: None,
        }
    }
}
