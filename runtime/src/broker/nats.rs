//! NATS: JetStream pull consumers and publishes (at-least-once), and core NATS queue
//! subscriptions (at-most-once).
//!
//! - **Connection.** One client per `[brokers.<name>]`, shared by every source and sink on it.
//!   Refused credentials fail the start; otherwise it reconnects forever with a capped backoff
//!   (and connects in the background if the server is down at start), so a server restart
//!   never ends a route: sources re-create their consumer and go on.
//! - **JetStream source.** A durable pull consumer (`source.group` is its name) on an existing
//!   stream, filtered by `source.topic`, explicit acks. A delivery is acked after it is done,
//!   `term`ed after its dead letter was written, and while it is held (queued, running, backing
//!   off between in-process retries) an `in_progress` goes out every half `ack_wait`, so a long
//!   handler is never redelivered under it. A dropped (abandoned) delivery stops its heartbeat
//!   and is redelivered after `ack_wait`. Pause stops fetching. The delivery count gives the
//!   attempts already made.
//! - **JetStream sink.** Publishes with an awaited PubAck; the `lockgate-id` header becomes
//!   `Nats-Msg-Id`, so the stream drops a repeated output inside its duplicate window.
//! - **Keys.** NATS has no message key: a key travels in the `lockgate-key` header. (With
//!   `ordering = "key"` the pipeline orders messages without a key per subject.)
//! - **Core source.** A queue subscription (`source.group` is the queue group). Core NATS has no
//!   acknowledgements: a message the process holds when it dies is gone.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind as JsAck, consumer};
use futures_util::StreamExt;

use super::{
    Ack, AckHandle, AckKind, BoxFuture, BrokerError, Delivery, Lag, LagGauge, OutRecord, Record,
    Scan, Sink, Source,
};
use crate::config::{JetStreamSource as JetStreamConfig, NatsConfig};

/// Header that carries a message key through NATS (which has none).
pub const KEY_HEADER: &str = "lockgate-key";

/// Longest wait between two reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("nats: {what}: {e}"))
}

/// Connects to the broker `name` described by `cfg`; relative file paths are taken from
/// `base_dir`. Refused credentials are an error at once; an unreachable server is not: the
/// client then connects (and always reconnects) in the background.
pub async fn connect(
    name: &str,
    cfg: &NatsConfig,
    base_dir: &Path,
) -> Result<async_nats::Client, BrokerError> {
    let servers: Vec<async_nats::ServerAddr> = cfg
        .servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e| BrokerError::Invalid(format!("nats {name}: server {s}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    match options(name, cfg, base_dir)
        .await?
        .connection_timeout(Duration::from_secs(5))
        .connect(servers.clone())
        .await
    {
        Ok(client) => return Ok(client),
        Err(e)
            if matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            ) =>
        {
            return Err(BrokerError::Invalid(format!(
                "nats {name}: the server refused the credentials: {e}"
            )));
        }
        Err(e) => {
            tracing::warn!(broker = %name, error = %e, "NATS unreachable at start; connecting in the background");
        }
    }
    options(name, cfg, base_dir)
        .await?
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .map_err(|e| unavailable(&format!("connect to {name}"), e))
}

async fn options(
    name: &str,
    cfg: &NatsConfig,
    base_dir: &Path,
) -> Result<async_nats::ConnectOptions, BrokerError> {
    let broker = name.to_owned();
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("lockgate {name}"))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            let ms = 100u64.saturating_mul(1 << attempts.min(6));
            Duration::from_millis(ms).min(MAX_RECONNECT_DELAY)
        })
        .event_callback(move |event| {
            let broker = broker.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(broker = %broker, "NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(broker = %broker, "NATS disconnected; reconnecting");
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::error!(broker = %broker, error = %e, "NATS server error");
                    }
                    async_nats::Event::ClientError(e) => {
                        tracing::warn!(broker = %broker, error = %e, "NATS client error");
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        tracing::warn!(broker = %broker, "NATS dropped messages for a slow subscription");
                    }
                    other => tracing::debug!(broker = %broker, event = %other, "NATS event"),
                }
            }
        })
        .require_tls(cfg.tls);
    if let Some(f) = &cfg.credentials_file {
        let path = base_dir.join(f);
        options = options.credentials_file(&path).await.map_err(|e| {
            BrokerError::Invalid(format!(
                "nats {name}: cannot read credentials_file {}: {e}",
                path.display()
            ))
        })?;
    }
    if let Some(f) = &cfg.nkey_seed_file {
        let path = base_dir.join(f);
        let seed = std::fs::read_to_string(&path).map_err(|e| {
            BrokerError::Invalid(format!(
                "nats {name}: cannot read nkey_seed_file {}: {e}",
                path.display()
            ))
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    let secret = |var: &str, field: &str| {
        std::env::var(var).map_err(|_| {
            BrokerError::Invalid(format!(
                "nats {name}: {field} names the environment variable {var}, which is not set"
            ))
        })
    };
    if let Some(var) = &cfg.token_env {
        options = options.token(secret(var, "token_env")?);
    }
    if let Some((user, var)) = &cfg.user_password_env {
        options = options.user_and_password(user.clone(), secret(var, "password_env")?);
    }
    if let Some(f) = &cfg.tls_ca_file {
        options = options.add_root_certificates(base_dir.join(f));
    }
    Ok(options)
}

fn record_of(message: &async_nats::Message) -> Record {
    let mut headers = Vec::new();
    let mut key = None;
    if let Some(h) = &message.headers {
        for (name, values) in h.iter() {
            for v in values {
                if AsRef::<str>::as_ref(name) == KEY_HEADER {
                    key = Some(v.as_str().as_bytes().to_vec());
                }
                headers.push((name.to_string(), v.as_str().as_bytes().to_vec()));
            }
        }
        // A hash map's order is arbitrary; sorted headers at least compare stably.
        headers.sort();
    }
    Record {
        topic: message.subject.to_string(),
        partition: None,
        offset: None,
        key,
        headers,
        payload: message.payload.to_vec(),
        timestamp_ms: None,
        reply_to: None,
    }
}

/// A JetStream durable pull consumer.
pub struct JetStreamSource {
    js: jetstream::Context,
    subject: String,
    durable: String,
    cfg: JetStreamConfig,
    describe: String,
    messages: Option<consumer::pull::Stream>,
    retry_in: Duration,
    lag: LagGauge,
    lag_task: Option<tokio::task::JoinHandle<()>>,
    held: Held,
    progress_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for JetStreamSource {
    fn drop(&mut self) {
        for t in [self.lag_task.take(), self.progress_task.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

/// The deliveries the pipeline still holds, for the task that keeps them alive on the server.
/// A delivery is dropped from it when its [`JetStreamAck`] (the only strong reference) goes.
#[derive(Clone, Default)]
struct Held {
    inner: Arc<Mutex<HeldInner>>,
}

#[derive(Default)]
struct HeldInner {
    ackers: Vec<Weak<jetstream::message::Acker>>,
    /// Length at which `add` prunes resolved deliveries (so the list stays about twice the
    /// number held, between the keeper's ticks too).
    prune_at: usize,
}

impl Held {
    fn add(&self, acker: &Arc<jetstream::message::Acker>) {
        let mut h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if h.ackers.len() >= h.prune_at {
            h.ackers.retain(|w| w.strong_count() > 0);
            h.prune_at = (h.ackers.len() * 2).max(1024);
        }
        h.ackers.push(Arc::downgrade(acker));
    }

    fn live(&self) -> Vec<Arc<jetstream::message::Acker>> {
        let mut h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        h.ackers.retain(|w| w.strong_count() > 0);
        h.ackers.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Every `every`, tells the server that each held delivery is in progress, so a slow handler
/// (or a long retry) does not see it redelivered after `ack_wait`. One task per source: a timer
/// task per delivery cost more than the rest of its handling.
async fn keep_in_progress(held: Held, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        for acker in held.live() {
            if let Err(e) = acker.ack_with(JsAck::Progress).await {
                tracing::debug!(error = %e, "in_progress failed");
            }
        }
    }
}

/// Keeps `gauge` at the consumer's pending count (messages not yet delivered).
async fn refresh_pending(consumer: consumer::PullConsumer, subject: String, gauge: LagGauge) {
    let mut every = tokio::time::interval(super::LAG_REFRESH);
    loop {
        every.tick().await;
        match consumer.get_info().await {
            Ok(info) => gauge.set(vec![Lag {
                topic: subject.clone(),
                partition: None,
                messages: info.num_pending,
            }]),
            Err(e) => tracing::debug!(error = %e, "Reading consumer info failed"),
        }
    }
}

impl std::fmt::Debug for JetStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl JetStreamSource {
    /// Consumer `durable` on `cfg.stream`, filtered by `subject`. Nothing is contacted until the
    /// first [`Source::next`].
    pub fn new(
        client: async_nats::Client,
        subject: &str,
        durable: &str,
        cfg: &JetStreamConfig,
    ) -> Self {
        Self {
            js: jetstream::new(client),
            subject: subject.to_owned(),
            durable: durable.to_owned(),
            describe: format!(
                "jetstream stream {} subject {subject}, consumer {durable}",
                cfg.stream
            ),
            cfg: cfg.clone(),
            messages: None,
            retry_in: Duration::from_millis(100),
            lag: LagGauge::default(),
            lag_task: None,
            held: Held::default(),
            progress_task: None,
        }
    }

    async fn open(&self) -> Result<(consumer::PullConsumer, consumer::pull::Stream), BrokerError> {
        let stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| unavailable(&format!("stream {}", self.cfg.stream), e))?;
        let config = consumer::pull::Config {
            durable_name: Some(self.durable.clone()),
            filter_subject: self.subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.cfg.ack_wait,
            max_deliver: self.cfg.max_deliver.map_or(-1, i64::from),
            max_ack_pending: i64::from(self.cfg.max_ack_pending),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&self.durable, config)
            .await
            .map_err(|e| unavailable(&format!("consumer {}", self.durable), e))?;
        let batch = usize::try_from(self.cfg.max_ack_pending)
            .unwrap_or(usize::MAX)
            .clamp(1, 500);
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| unavailable(&format!("pull from {}", self.durable), e))?;
        Ok((consumer, messages))
    }

    fn delivery(&self, message: jetstream::Message) -> Delivery {
        let (mut record, delivered, sequence, published_ms) = {
            let record = record_of(&message.message);
            match message.info() {
                Ok(info) => (
                    record,
                    info.delivered,
                    Some(info.stream_sequence),
                    u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok(),
                ),
                Err(_) => (record, 1, None, None),
            }
        };
        record.offset = sequence;
        record.timestamp_ms = published_ms;
        let (_, acker) = message.split();
        let acker = Arc::new(acker);
        // Kept alive on the server while the pipeline holds it.
        self.held.add(&acker);
        Delivery {
            record,
            ack: AckHandle::new(JetStreamAck { acker }),
            previous_attempts: u32::try_from(delivered.saturating_sub(1)).unwrap_or(0),
        }
    }
}

/// Acks (or terms) one JetStream delivery. It holds the only strong reference to the acker:
/// once resolved or dropped, the delivery is no longer kept in progress.
struct JetStreamAck {
    acker: Arc<jetstream::message::Acker>,
}

impl Ack for JetStreamAck {
    fn ack(self: Box<Self>, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move {
            let result = match kind {
                AckKind::Done => self.acker.ack().await,
                AckKind::DeadLettered => self.acker.ack_with(JsAck::Term).await,
            };
            result.map_err(|e| unavailable("ack", e))
        })
    }

    fn redeliver(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async move {
            self.acker
                .ack_with(JsAck::Nak(Some(delay)))
                .await
                .map_err(|e| unavailable("nak", e))
        })
    }
}

impl Source for JetStreamSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn lag(&self) -> Option<LagGauge> {
        Some(self.lag.clone())
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            loop {
                if self.messages.is_none() {
                    match self.open().await {
                        Ok((consumer, m)) => {
                            self.messages = Some(m);
                            self.retry_in = Duration::from_millis(100);
                            if let Some(t) = self.lag_task.take() {
                                t.abort();
                            }
                            self.lag_task = Some(tokio::spawn(refresh_pending(
                                consumer,
                                self.subject.clone(),
                                self.lag.clone(),
                            )));
                            if self.progress_task.is_none() {
                                self.progress_task = Some(tokio::spawn(keep_in_progress(
                                    self.held.clone(),
                                    self.cfg.ack_wait / 2,
                                )));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(source = %self.describe, error = %e, retry_in_ms = self.retry_in.as_millis() as u64, "Cannot consume; retrying");
                            tokio::time::sleep(self.retry_in).await;
                            self.retry_in = (self.retry_in * 2).min(MAX_RECONNECT_DELAY);
                            continue;
                        }
                    }
                }
                let Some(messages) = self.messages.as_mut() else {
                    continue;
                };
                match messages.next().await {
                    Some(Ok(m)) => return Ok(self.delivery(m)),
                    Some(Err(e)) => {
                        // Missed heartbeats, a deleted consumer, a lost connection: start over
                        // (get-or-create the consumer again) after a pause.
                        tracing::warn!(source = %self.describe, error = %e, "Pull failed; re-creating the consumer");
                        self.messages = None;
                        tokio::time::sleep(self.retry_in).await;
                        self.retry_in = (self.retry_in * 2).min(MAX_RECONNECT_DELAY);
                    }
                    None => self.messages = None,
                }
            }
        })
    }

    fn pause(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        // Stop fetching: messages already pulled but not handed out come back after ack_wait.
        self.messages = None;
        Box::pin(async { Ok(()) })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let client = self.js.client();
        Box::pin(async move {
            client
                .flush()
                .await
                .map_err(|e| unavailable("flush acks", e))
        })
    }
}

/// Publishes to JetStream streams with awaited acknowledgements.
#[derive(Clone, Debug)]
pub struct JetStreamSink {
    js: jetstream::Context,
}

impl JetStreamSink {
    /// A sink on `client`.
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            js: jetstream::new(client),
        }
    }
}

fn header_map(r: &OutRecord) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for (name, value) in &r.headers {
        // NATS headers are text; bytes that are not UTF-8 are replaced.
        h.append(name.as_str(), String::from_utf8_lossy(value).into_owned());
        if name == super::LOCKGATE_ID_HEADER {
            h.insert(
                async_nats::header::NATS_MESSAGE_ID,
                String::from_utf8_lossy(value).into_owned(),
            );
        }
    }
    if let Some(k) = &r.key {
        h.insert(KEY_HEADER, String::from_utf8_lossy(k).into_owned());
    }
    h
}

impl Sink for JetStreamSink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            // Send all, then await every PubAck: one round trip for the batch.
            let mut acks = Vec::with_capacity(records.len());
            for r in &records {
                let ack = self
                    .js
                    .publish_with_headers(r.topic.clone(), header_map(r), r.payload.clone().into())
                    .await
                    .map_err(|e| unavailable(&format!("publish to {}", r.topic), e))?;
                acks.push(ack);
            }
            for (r, ack) in records.iter().zip(acks) {
                ack.await
                    .map_err(|e| unavailable(&format!("publish to {}", r.topic), e))?;
            }
            Ok(())
        })
    }
}

/// Answers requests with plain (core) publishes: a reply subject belongs to no stream.
#[derive(Clone, Debug)]
pub struct NatsReplySink {
    client: async_nats::Client,
}

impl NatsReplySink {
    /// Replies through `client`.
    pub fn new(client: async_nats::Client) -> Self {
        Self { client }
    }
}

impl Sink for NatsReplySink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            for r in &records {
                self.client
                    .publish_with_headers(r.topic.clone(), header_map(r), r.payload.clone().into())
                    .await
                    .map_err(|e| unavailable(&format!("reply to {}", r.topic), e))?;
            }
            // Core NATS has no acknowledgement: a flush is the most there is.
            self.client
                .flush()
                .await
                .map_err(|e| unavailable("flush replies", e))
        })
    }
}

/// A core NATS queue subscription: at most once.
pub struct NatsCoreSource {
    client: async_nats::Client,
    subject: String,
    queue: String,
    describe: String,
    subscriber: Option<async_nats::Subscriber>,
}

impl NatsCoreSource {
    /// Subscribes to `subject` in queue group `queue` on first [`Source::next`].
    pub fn new(client: async_nats::Client, subject: &str, queue: &str) -> Self {
        Self {
            client,
            subject: subject.to_owned(),
            queue: queue.to_owned(),
            describe: format!("nats core subject {subject}, queue group {queue}"),
            subscriber: None,
        }
    }
}

/// Core NATS has nothing to acknowledge.
struct NoAck;

impl Ack for NoAck {
    fn ack(self: Box<Self>, _kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Source for NatsCoreSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            loop {
                if self.subscriber.is_none() {
                    let sub = self
                        .client
                        .queue_subscribe(self.subject.clone(), self.queue.clone())
                        .await
                        .map_err(|e| unavailable(&format!("subscribe to {}", self.subject), e))?;
                    // The subscription is live once the server answered a ping after it.
                    self.client
                        .flush()
                        .await
                        .map_err(|e| unavailable(&format!("subscribe to {}", self.subject), e))?;
                    tracing::info!(source = %self.describe, "Subscribed");
                    self.subscriber = Some(sub);
                }
                let Some(sub) = self.subscriber.as_mut() else {
                    continue;
                };
                match sub.next().await {
                    Some(m) => {
                        let mut record = record_of(&m);
                        record.reply_to = m.reply.as_ref().map(ToString::to_string);
                        return Ok(Delivery {
                            record,
                            ack: AckHandle::new(NoAck),
                            previous_attempts: 0,
                        });
                    }
                    None => return Err(BrokerError::Closed),
                }
            }
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// How long a JetStream scan waits for the next record it knows exists.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Records a scan returns at once.
const SCAN_BATCH: usize = 500;

/// A [`Scan`] of one subject of a JetStream stream through an ephemeral ordered consumer, up to
/// the stream's last sequence at open. Records carry the stream sequence as their offset.
pub struct JetStreamScan {
    messages: Option<consumer::pull::Ordered>,
    end: u64,
    subject: String,
}

impl std::fmt::Debug for JetStreamScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamScan")
            .field("subject", &self.subject)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl JetStreamScan {
    /// Opens a scan of `subject` in whichever stream captures it.
    pub async fn open(client: async_nats::Client, subject: &str) -> Result<Self, BrokerError> {
        let js = jetstream::new(client);
        let name = js.stream_by_subject(subject).await.map_err(|e| {
            unavailable(
                &format!("no JetStream stream captures subject {subject}"),
                e,
            )
        })?;
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| unavailable(&format!("stream {name}"), e))?;
        let end = stream
            .info()
            .await
            .map_err(|e| unavailable(&format!("stream {name}"), e))?
            .state
            .last_sequence;
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&format!("scan consumer on {name}"), e))?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| unavailable(&format!("scan consumer on {name}"), e))?
            .num_pending;
        let messages = if pending == 0 {
            None
        } else {
            Some(
                consumer
                    .messages()
                    .await
                    .map_err(|e| unavailable(&format!("read {subject}"), e))?,
            )
        };
        Ok(Self {
            messages,
            end,
            subject: subject.to_owned(),
        })
    }
}

impl Scan for JetStreamScan {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            while out.len() < SCAN_BATCH {
                let Some(messages) = self.messages.as_mut() else {
                    break;
                };
                let next = tokio::time::timeout(SCAN_TIMEOUT, messages.next()).await;
                let message = match next {
                    Ok(Some(Ok(m))) => m,
                    Ok(Some(Err(e))) => {
                        return Err(unavailable(&format!("read {}", self.subject), e));
                    }
                    Ok(None) => {
                        self.messages = None;
                        break;
                    }
                    Err(_) => {
                        return Err(unavailable(
                            &format!("read {}", self.subject),
                            format!("no message for {} s", SCAN_TIMEOUT.as_secs()),
                        ));
                    }
                };
                let mut record = record_of(&message.message);
                let info = message
                    .info()
                    .map_err(|e| unavailable(&format!("read {}", self.subject), e))?;
                let (sequence, pending) = (info.stream_sequence, info.pending);
                record.timestamp_ms =
                    u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok();
                if sequence > self.end {
                    self.messages = None;
                    break;
                }
                record.offset = Some(sequence);
                out.push(record);
                if pending == 0 || sequence >= self.end {
                    self.messages = None;
                }
            }
            Ok(if out.is_empty() { None } else { Some(out) })
        })
    }
}
