//! OpenTelemetry export over OTLP/HTTP (`[telemetry.otlp]`,
//! docs/operate/observability.md#opentelemetry).
//!
//! The pipeline knows nothing of OpenTelemetry: it opens `tracing` spans (`message` per
//! delivery, `attempt` per attempt, `handler` per handler call; the engine `http_request` per
//! outbound request and `sql_statement` per statement, inside the handler's) with the fields a
//! trace needs, and [`OtlpLayer`], a `tracing` layer, turns those kinds into OpenTelemetry
//! spans (client spans by the HTTP and database semantic conventions for the last two): the
//! message span continues the message's `traceparent` (its trace id, the sender's span as the
//! remote parent, its sampled flag) or starts a trace, sampled by `sampling_ratio`; the others
//! are its children. Events inside them (warnings, errors, what the guest logged) become span
//! events. Every other span and event is ignored.
//!
//! Export never waits on the collector: a finished span goes into a bounded queue
//! (`max_queue_spans`); a thread of its own sends batches of it with the SDK's OTLP exporter
//! over lockgate's own HTTP client (rustls with ring). A span that finds the queue full, or
//! whose batch cannot be sent, is dropped and counted ([`dropped_spans`],
//! `lockgate_otlp_spans_dropped_total`); after a failed export the sender pauses for a while,
//! and the spans of messages that start meanwhile are counted as dropped without being built,
//! so a collector that is down costs less than one that is up. The sampling decision is made when a message span opens: the spans of a trace that is
//! not sampled are marked, not built.
//!
//! The layer is installed for every command and does nothing until [`start`] gives it a queue:
//! its filter is off until then, so a process without `[telemetry.otlp]` pays nothing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::config::telemetry::OtlpSettings;
use crate::message::parse_traceparent;

/// Span events kept per span; the rest are counted as dropped on the span.
const MAX_EVENTS: usize = 64;
/// Spans sent in one request at most.
const MAX_BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// How often a busy sender takes what the queue holds: `max_queue_spans` spans per interval
/// is the most it takes without dropping (2,048 per 20 ms: 100,000 spans a second).
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// The first pause after a failed export.
const PAUSE_MIN: Duration = Duration::from_secs(1);
/// The longest pause after failed exports.
const PAUSE_MAX: Duration = Duration::from_secs(30);

/// Spans dropped: the queue was full, or their batch could not be sent.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
static EXPORTED: AtomicU64 = AtomicU64::new(0);
/// The queue, once [`start`] ran.
static SINK: OnceLock<Sink> = OnceLock::new();
/// Set while the sender pauses after a failed export: messages that start then are not built
/// into spans at all, only counted as dropped.
static PAUSED: AtomicBool = AtomicBool::new(false);
/// Spans taken from the queue and not yet settled (sent or dropped).
static SENDING: AtomicU64 = AtomicU64::new(0);

/// Spans dropped since the process started (the queue was full, or the collector could not
/// take them).
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans the collector accepted since the process started.
pub fn exported_spans() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}

/// Why export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The exporter refused its settings.
    #[error("telemetry.otlp: {0}")]
    Exporter(String),
    /// A header's secret cannot be read.
    #[error("telemetry.otlp: {0}")]
    Secret(String),
    /// Export was started already in this process.
    #[error("telemetry.otlp: export is already running in this process")]
    Started,
}

struct Sink {
    tx: mpsc::Sender<Finished>,
    sampling_ratio: f64,
}

/// A span that ended, on its way to the sender.
struct Finished {
    building: Building,
    end: SystemTime,
}

/// The `tracing` layer that exports the message spans (see the module docs). Install it once,
/// with [`filter`] as its filter.
pub struct OtlpLayer;

/// The layer's filter: a predicate on a callsite, so what it does not want is never built
/// for it (`tracing` caches the answer per callsite).
type Filter = tracing_subscriber::filter::FilterFn<fn(&tracing::Metadata<'_>) -> bool>;

/// Handle of the layer's filter: off until [`start`] turns it on.
type FilterHandle = tracing_subscriber::reload::Handle<Filter, tracing_subscriber::Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// Nothing: the layer before [`start`].
fn off(_: &tracing::Metadata<'_>) -> bool {
    false
}

/// What the layer reads: lockgate's spans and events at info and above, the engine's request
/// and statement spans (at debug), and the guest's log lines (debug events with a `guest`
/// field). The pipeline's other debug events stay disabled, as without export.
fn wanted(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("lockgate")
        && (*meta.level() <= Level::INFO
            || (meta.is_span() && matches!(meta.name(), "http_request" | "sql_statement"))
            || meta.fields().field("guest").is_some())
}

/// The layer's filter, off until [`start`]; `main` installs the layer with it.
pub fn filter() -> tracing_subscriber::reload::Layer<Filter, tracing_subscriber::Registry> {
    // The level hints matter: without one the process-wide maximum level is TRACE, and every
    // `log` record of a dependency (cranelift logs at trace while it compiles) goes through
    // the subscriber instead of being cut by `log`'s max level.
    let (layer, handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::filter::FilterFn::new(off as fn(&tracing::Metadata<'_>) -> bool)
            .with_max_level_hint(tracing::level_filters::LevelFilter::OFF),
    );
    let _ = FILTER.set(handle);
    layer
}

/// Starts exporting traces (if `traces` is on; the metrics are `otlp_metrics.rs`'s): builds
/// the exporter, starts the thread that sends batches, and turns the layer on.
/// Secrets in `headers` are read now.
pub fn start(settings: &OtlpSettings) -> Result<(), OtlpError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    if !settings.traces {
        return Ok(());
    }
    if SINK.get().is_some() {
        return Err(OtlpError::Started);
    }
    let mut headers = HashMap::new();
    for (name, secret) in &settings.headers {
        let value = secret
            .resolve()
            .map_err(|e| OtlpError::Secret(e.to_string()))?;
        headers.insert(name.clone(), value);
    }
    let client = Client::new(settings.export_timeout);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(settings.traces_url())
        .with_timeout(settings.export_timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| OtlpError::Exporter(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name("lockgate")
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    for (k, v) in &settings.resource {
        resource = resource.with_attribute(KeyValue::new(k.clone(), v.clone()));
    }
    exporter.set_resource(&resource.build());
    let (tx, rx) = mpsc::channel(settings.max_queue_spans.max(1));
    let sink = Sink {
        tx,
        sampling_ratio: settings.sampling_ratio,
    };
    if SINK.set(sink).is_err() {
        return Err(OtlpError::Started);
    }
    let scope = InstrumentationScope::builder("lockgate")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    // A thread of its own: encoding batches must not take the route's workers.
    let sender = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OtlpError::Exporter(format!("cannot start the exporter's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("lockgate-otlp".into())
        .spawn(move || sender.block_on(send_batches(exporter, rx, scope)))
        .map_err(|e| OtlpError::Exporter(format!("cannot start the exporter's thread: {e}")))?;
    if let Some(handle) = FILTER.get() {
        let _ = handle.reload(
            tracing_subscriber::filter::FilterFn::new(wanted as fn(&tracing::Metadata<'_>) -> bool)
                .with_max_level_hint(tracing::level_filters::LevelFilter::DEBUG),
        );
    }
    Ok(())
}

/// Sends what the queue holds in batches, until every sender is gone.
///
/// Idle, it waits for a span; busy, or while paused, it drains the queue every [`DRAIN_EVERY`]
/// instead of being woken for each span, and sends a batch when it is full, [`BATCH_DELAY`] after its first
/// span, or when [`flush`] asks. After a failed export it stops building batches for a while
/// ([`PAUSE_MIN`] doubling to [`PAUSE_MAX`]): the spans that arrive meanwhile are dropped and
/// counted without being encoded, so an absent collector costs no more than a present one.
async fn send_batches(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<Finished>,
    scope: InstrumentationScope,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut first_at = tokio::time::Instant::now();
    let mut failures: u64 = 0;
    let mut pause = PAUSE_MIN;
    let mut paused_until: Option<tokio::time::Instant> = None;
    // What a span becomes in OpenTelemetry's terms is built here, on the sender's thread, not
    // on the route's: and not at all while the collector is away.
    let take = |span: Finished,
                batch: &mut Vec<SpanData>,
                first_at: &mut tokio::time::Instant,
                paused_until: Option<tokio::time::Instant>| {
        if paused_until.is_some_and(|t| tokio::time::Instant::now() < t) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if batch.is_empty() {
            *first_at = tokio::time::Instant::now();
        }
        SENDING.fetch_add(1, Ordering::SeqCst);
        batch.push(span_data(span.building, span.end, &scope));
    };
    loop {
        // Idle, the first span wakes the sender; otherwise (a batch filling, or the collector
        // away and every span dropped) it takes the queue on a timer, so no span costs the
        // route a wake-up of this thread.
        let paused = paused_until.is_some_and(|t| tokio::time::Instant::now() < t);
        if !paused && PAUSED.load(Ordering::Relaxed) {
            // The pause is over: build spans again, and try the collector with the next batch.
            PAUSED.store(false, Ordering::Relaxed);
        }
        let flushing = if batch.is_empty() && !paused {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(span) => { take(span, &mut batch, &mut first_at, paused_until); false }
                    None => return,
                },
                () = FLUSH.notified() => true,
            }
        } else {
            tokio::select! {
                () = tokio::time::sleep(DRAIN_EVERY) => false,
                () = FLUSH.notified() => true,
            }
        };
        let mut gone = false;
        loop {
            match rx.try_recv() {
                Ok(span) => take(span, &mut batch, &mut first_at, paused_until),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    gone = true;
                    break;
                }
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
        }
        let due = batch.len() >= MAX_BATCH || first_at.elapsed() >= BATCH_DELAY;
        if batch.is_empty() || !(due || flushing || gone) {
            continue;
        }
        let n = batch.len() as u64;
        let sent = exporter.export(std::mem::take(&mut batch)).await;
        SENDING.fetch_sub(n, Ordering::SeqCst);
        match sent {
            Ok(()) => {
                EXPORTED.fetch_add(n, Ordering::Relaxed);
                failures = 0;
                pause = PAUSE_MIN;
                paused_until = None;
            }
            Err(e) => {
                DROPPED.fetch_add(n, Ordering::Relaxed);
                failures += 1;
                paused_until = Some(tokio::time::Instant::now() + pause);
                PAUSED.store(true, Ordering::Relaxed);
                // The first failure of a run, then one in a hundred: an absent collector must
                // not flood the log.
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(error = %e, spans = n, failures, retry_in_ms = pause.as_millis() as u64, "Cannot export spans over OTLP; they are dropped until the next try (lockgate_otlp_spans_dropped_total)");
                }
                pause = (pause * 2).min(PAUSE_MAX);
            }
        }
        if gone {
            return;
        }
    }
}

/// Asks the sender to send its partial batch now.
static FLUSH: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Waits, at most `within`, until every finished span has been sent or dropped (at exit).
pub async fn flush(within: Duration) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        let queued = sink.tx.max_capacity() - sink.tx.capacity();
        if queued == 0 && SENDING.load(Ordering::SeqCst) == 0 {
            return;
        }
        FLUSH.notify_one();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Which of the pipeline's spans an OpenTelemetry span is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Message,
    Attempt,
    Handler,
    /// A handler's outbound HTTP request (`engine/outbound`).
    HttpRequest,
    /// A handler's SQL statement (`engine/sql`).
    SqlStatement,
}

/// An exported span being built, kept in its `tracing` span's extensions.
struct Building {
    kind: Kind,
    context: SpanContext,
    parent: SpanId,
    parent_remote: bool,
    start: SystemTime,
    fields: Fields,
    events: Vec<Event>,
    dropped_events: u32,
}

/// The fields of a span, by name.
#[derive(Default)]
struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    fn set(&mut self, name: &'static str, value: Value) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    fn text(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| v.as_str().into_owned())
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.set(field.name(), Value::from(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), Value::from(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), Value::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(
            field.name(),
            Value::I64(i64::try_from(value).unwrap_or(i64::MAX)),
        );
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.set(field.name(), Value::F64(value));
    }
}

/// One field's value as text (the `traceparent` the sampling decision needs).
struct Pick {
    name: &'static str,
    value: Option<String>,
}

impl Pick {
    fn new(name: &'static str) -> Self {
        Self { name, value: None }
    }
}

impl Visit for Pick {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.name {
            self.value = Some(format!("{value:?}"));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.name {
            self.value = Some(value.to_owned());
        }
    }
}

/// Marks a span that is not built, nor are its children: its trace is not sampled, or it
/// started while the sender was paused after a failed export (`dropped`: it counts as a
/// dropped span when it ends).
#[derive(Clone, Copy)]
struct NotBuilt {
    dropped: bool,
}

fn random_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

fn random_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

/// Whether a new trace is sampled at `ratio`: by its id, so every process decides alike.
fn sampled(trace_id: TraceId, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    let x = u64::from_be_bytes(low) >> 1;
    (x as f64) < ratio * (1u64 << 63) as f64
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(sink) = SINK.get() else {
            return;
        };
        let meta = attrs.metadata();
        if !meta.target().starts_with("lockgate") {
            return;
        }
        let kind = match meta.name() {
            "message" => Kind::Message,
            "attempt" => Kind::Attempt,
            "handler" => Kind::Handler,
            "http_request" => Kind::HttpRequest,
            "sql_statement" => Kind::SqlStatement,
            _ => return,
        };
        let Some(span) = ctx.span(id) else {
            return;
        };
        // The sampling decision comes first: an unsampled trace costs a marker per span, not
        // the copy of its fields.
        let (trace_id, parent, parent_remote, flags, state) = if kind == Kind::Message {
            if PAUSED.load(Ordering::Relaxed) {
                span.extensions_mut().insert(NotBuilt { dropped: true });
                return;
            }
            let mut traceparent = Pick::new("traceparent");
            attrs.record(&mut traceparent);
            match traceparent.value.as_deref().and_then(remote_parent) {
                Some((t, s, f)) => (t, s, true, f, TraceState::default()),
                None => {
                    let t = random_trace_id();
                    let f = if sampled(t, sink.sampling_ratio) {
                        TraceFlags::SAMPLED
                    } else {
                        TraceFlags::default()
                    };
                    (t, SpanId::INVALID, false, f, TraceState::default())
                }
            }
        } else {
            // The nearest exported ancestor; without one (a span outside a message) nothing.
            let Some(parent) = span.scope().skip(1).find_map(|s| {
                let ext = s.extensions();
                if let Some(not) = ext.get::<NotBuilt>() {
                    return Some(Err(*not));
                }
                ext.get::<Building>().map(|b| Ok(b.context.clone()))
            }) else {
                return;
            };
            let parent = match parent {
                Ok(p) => p,
                Err(not) => {
                    span.extensions_mut().insert(not);
                    return;
                }
            };
            (
                parent.trace_id(),
                parent.span_id(),
                false,
                parent.trace_flags(),
                parent.trace_state().clone(),
            )
        };
        if !flags.is_sampled() {
            span.extensions_mut().insert(NotBuilt { dropped: false });
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let context = SpanContext::new(trace_id, random_span_id(), flags, false, state);
        span.extensions_mut().insert(Building {
            kind,
            context,
            parent,
            parent_remote,
            start: SystemTime::now(),
            fields,
            events: Vec::new(),
            dropped_events: 0,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(b) = span.extensions_mut().get_mut::<Building>()
        {
            values.record(&mut b.fields);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        if SINK.get().is_none() {
            return;
        }
        let meta = event.metadata();
        // Warnings and errors, and what the guest logged (debug, marked `guest`); decided from
        // the callsite, before anything of a debug event is copied.
        if *meta.level() > Level::INFO && meta.fields().field("guest").is_none() {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            let mut ext = span.extensions_mut();
            let Some(b) = ext.get_mut::<Building>() else {
                continue;
            };
            if !b.context.is_sampled() {
                return;
            }
            if b.events.len() >= MAX_EVENTS {
                b.dropped_events += 1;
                return;
            }
            let name = fields
                .text("message")
                .unwrap_or_else(|| meta.name().to_owned());
            // A guest's line keeps the guest's level.
            let level = fields
                .text("guest_level")
                .unwrap_or_else(|| meta.level().as_str().to_ascii_lowercase());
            let mut attributes = vec![KeyValue::new("level", level)];
            for (k, v) in fields.0 {
                if !matches!(k, "message" | "guest_level") {
                    attributes.push(KeyValue::new(k, v));
                }
            }
            b.events
                .push(Event::new(name, SystemTime::now(), attributes, 0));
            return;
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(sink) = SINK.get() else {
            return;
        };
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(b) = span.extensions_mut().remove::<Building>() else {
            if span
                .extensions()
                .get::<NotBuilt>()
                .is_some_and(|n| n.dropped)
            {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        if !b.context.is_sampled() {
            return;
        }
        let finished = Finished {
            building: b,
            end: SystemTime::now(),
        };
        if sink.tx.try_send(finished).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Trace id, parent span id and sampled flag of a valid `traceparent` value.
fn remote_parent(tp: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    parse_traceparent(tp.as_bytes())?;
    let mut parts = tp.trim().split('-').skip(1);
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags & 1),
    ))
}

/// The OpenTelemetry span of `b`: its name, kind, status and attributes by the messaging
/// semantic conventions.
fn span_data(b: Building, end: SystemTime, scope: &InstrumentationScope) -> SpanData {
    let f = &b.fields;
    let mut attributes = Vec::new();
    let mut put = |key: &'static str, field: &str| {
        if let Some(v) = f.get(field) {
            attributes.push(KeyValue::new(key, v.clone()));
        }
    };
    let (name, kind): (Cow<'static, str>, SpanKind) = match b.kind {
        Kind::Message => {
            put("messaging.system", "system");
            put("messaging.destination.name", "topic");
            put("messaging.consumer.group.name", "group");
            put("messaging.message.id", "message");
            put("lockgate.route", "route");
            put("lockgate.handler", "handler");
            put("lockgate.handler.version", "handler_version");
            put("lockgate.outcome", "outcome");
            if let Some(p) = f.get("partition") {
                attributes.push(KeyValue::new(
                    "messaging.destination.partition.id",
                    p.as_str().into_owned(),
                ));
            }
            if let Some(o) = f.get("offset") {
                let key = if f.text("system").as_deref() == Some("kafka") {
                    "messaging.kafka.offset"
                } else {
                    "lockgate.offset"
                };
                attributes.push(KeyValue::new(key, o.clone()));
            }
            attributes.push(KeyValue::new("messaging.operation.type", "process"));
            attributes.push(KeyValue::new("messaging.operation.name", "process"));
            let topic = f.text("topic").unwrap_or_default();
            (format!("process {topic}").into(), SpanKind::Consumer)
        }
        Kind::Attempt => {
            put("lockgate.attempt", "attempt");
            put("lockgate.outcome", "outcome");
            ("attempt".into(), SpanKind::Internal)
        }
        Kind::Handler => {
            put("lockgate.handler", "handler");
            put("lockgate.outcome", "outcome");
            let handler = f.text("handler").unwrap_or_default();
            (format!("handler {handler}").into(), SpanKind::Internal)
        }
        Kind::HttpRequest => {
            put("http.request.method", "method");
            put("lockgate.outcome", "outcome");
            if let Some(status) = f.get("status") {
                attributes.push(KeyValue::new("http.response.status_code", status.clone()));
            }
            if let Some(url) = f.text("url")
                && let Ok(uri) = url.parse::<http::Uri>()
            {
                // Without the query (it may carry tokens) and without user info.
                let scheme = uri.scheme_str().unwrap_or("http");
                let host = uri.host().unwrap_or_default().to_owned();
                let port = uri
                    .port_u16()
                    .unwrap_or(if scheme == "https" { 443 } else { 80 });
                attributes.push(KeyValue::new(
                    "url.full",
                    format!("{scheme}://{host}:{port}{}", uri.path()),
                ));
                attributes.push(KeyValue::new("server.address", host));
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
            match f.text("outcome").as_deref() {
                Some("2xx") | None => {}
                Some("4xx" | "5xx") => {
                    if let Some(status) = f.text("status") {
                        attributes.push(KeyValue::new("error.type", status));
                    }
                }
                Some(other) => attributes.push(KeyValue::new("error.type", other.to_owned())),
            }
            let method = f.text("method").unwrap_or_else(|| "HTTP".into());
            (method.into(), SpanKind::Client)
        }
        Kind::SqlStatement => {
            put("db.operation.name", "operation");
            put("db.query.text", "statement");
            put("db.response.status_code", "code");
            put("db.response.returned_rows", "rows");
            put("lockgate.outcome", "outcome");
            attributes.push(KeyValue::new("db.system.name", "postgresql"));
            match f.text("outcome").as_deref() {
                Some("ok") | None => {}
                Some(other) => {
                    let kind = f.text("code").unwrap_or_else(|| other.to_owned());
                    attributes.push(KeyValue::new("error.type", kind));
                }
            }
            let operation = f.text("operation").filter(|o| !o.is_empty());
            (
                operation.unwrap_or_else(|| "sql".into()).into(),
                SpanKind::Client,
            )
        }
    };
    let outcome = f.text("outcome");
    let status = match outcome.as_deref() {
        None | Some("ok" | "duplicate" | "passed_through" | "handled" | "2xx") => Status::Unset,
        Some(other) => Status::error(other.to_owned()),
    };
    // A request's span has the id its `traceparent` header gave the server as parent.
    let span_context = match f.text("span_id").map(|h| SpanId::from_hex(&h)) {
        Some(Ok(id)) if b.kind == Kind::HttpRequest && id != SpanId::INVALID => SpanContext::new(
            b.context.trace_id(),
            id,
            b.context.trace_flags(),
            false,
            b.context.trace_state().clone(),
        ),
        _ => b.context,
    };
    SpanData {
        span_context,
        parent_span_id: b.parent,
        parent_span_is_remote: b.parent_remote,
        span_kind: kind,
        name,
        start_time: b.start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: {
            let mut events = SpanEvents::default();
            events.events = b.events;
            events.dropped_count = b.dropped_events;
            events
        },
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

/// The exporters' HTTP client: one HTTP/1.1 connection per export, TLS by rustls with ring and
/// the web PKI roots.
pub(super) struct Client {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(super) fn new(timeout: Duration) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            });
        Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout,
        }
    }

    async fn send(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::{BodyExt, Full};
        use hyper_util::rt::TokioIo;
        let uri = request.uri().clone();
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or("the endpoint has no host")?.to_owned();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&host)
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let (mut parts, body) = request.into_parts();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or(host.clone());
        parts.uri = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()?;
        parts
            .headers
            .insert(http::header::HOST, http::HeaderValue::from_str(&authority)?);
        let request = http::Request::from_parts(parts, Full::new(body));
        let response = if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let tls = self.tls.connect(name, tcp).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            sender.send_request(request).await?
        } else {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender.send_request(request).await?
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(http::Response::from_parts(parts, body))
    }

    /// Sends `request`, failing when the whole exchange takes longer than the export timeout.
    pub(super) async fn send_within(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        match tokio::time::timeout(self.timeout, self.send(request)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer in {} ms", self.timeout.as_millis()).into()),
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        self.send_within(request).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sampling_by_trace_id_keeps_about_the_ratio_and_is_stable() {
        let ids: Vec<TraceId> = (0..10_000).map(|_| random_trace_id()).collect();
        let kept = ids.iter().filter(|t| sampled(**t, 0.25)).count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
        assert!(ids.iter().all(|t| sampled(*t, 1.0)));
        assert!(!ids.iter().any(|t| sampled(*t, 0.0)));
        assert!(ids.iter().all(|t| sampled(*t, 0.25) == sampled(*t, 0.25)));
    }

    #[test]
    fn a_traceparent_gives_the_trace_the_parent_and_the_sampled_flag() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, f) = remote_parent(tp).unwrap();
        assert_eq!(format!("{t}"), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(format!("{s}"), "00f067aa0ba902b7");
        assert!(f.is_sampled());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!remote_parent(tp).unwrap().2.is_sampled());
        assert!(remote_parent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(remote_parent("garbage").is_none());
    }
}
