//! NATS: JetStream pull consumers and publishes (at-least-once), and core NATS queue
//! subscriptions (at-most-once).
//!
//! - **Connection.** One client per `[brokers.<name>]` ([`NatsLink`]), shared by every source and
//!   sink on it. It connects in the background when the server is down at start and reconnects
//!   forever with a jittered, capped backoff, so a server restart never ends a route: sources
//!   re-create their consumer and go on. Credentials the server refuses are a misconfiguration:
//!   the link reports them with what to change and tries again only every ~10 s.
//! - **Health.** A source is ready once it consumes (JetStream: its consumer exists and pulls;
//!   core: its subscription is registered). A stream that does not exist, or a consumer the
//!   server refuses as configured, is [`BrokerError::Misconfigured`] and retried slowly.
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

mod connector;

pub use connector::NatsConnector;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind as JsAck, consumer};
use futures_util::StreamExt;

use super::{Ack, AckHandle, AckKind, BrokerError, Delivery, Lag, LagGauge, Scan, Sink, Source};

use futures_util::future::BoxFuture;

use crate::config::{JetStreamSource as JetStreamConfig, NatsAuth, NatsConfig, Secret};
use crate::health::{Backoff, Failure, FailureKind, Health, HealthReporter, HealthWatch};
use crate::message::{OutRecord, Record};

/// Header that carries a message key through NATS (which has none).
pub const KEY_HEADER: &str = "lockgate-key";

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("nats: {what}: {e}"))
}

/// The fix for credentials the server refused.
fn credentials_fix(name: &str) -> String {
    format!(
        "check the credentials of brokers.{name} (credentials, nkey_seed, token, or user and password) against the server's accounts"
    )
}

/// A failed connection attempt to broker `name`, classified.
fn connect_failure(name: &str, e: &async_nats::ConnectError) -> Failure {
    let error = format!("nats {name}: cannot connect: {e}");
    match e.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation
        | async_nats::ConnectErrorKind::Authentication => Failure::misconfigured(
            format!("nats {name}: the server refused the credentials: {e}"),
            credentials_fix(name),
        ),
        async_nats::ConnectErrorKind::Tls => Failure::misconfigured(
            error,
            format!("check brokers.{name}.tls and tls_ca_file against the server's TLS setup"),
        ),
        _ => Failure::transient(error),
    }
}

/// One connection per `[brokers.<name>]` of kind NATS, shared by every source and sink on it,
/// and its health (whether it is connected, and why not).
#[derive(Clone, Debug)]
pub struct NatsLink {
    /// The client.
    pub client: async_nats::Client,
    health: HealthReporter,
}

impl NatsLink {
    /// Whether the client is connected now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The connection's health.
    pub fn health(&self) -> HealthWatch {
        self.health.watch()
    }

    /// Waits at most `limit` for the connection, for one-shot commands (`lockgate dlq`) that
    /// should fail with the reason rather than wait for a request timeout.
    pub async fn connected_within(&self, limit: Duration) -> Result<(), BrokerError> {
        let mut health = self.health();
        let wait = async {
            while !self.connected() {
                if health.changed().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(limit, wait).await;
        if self.connected() {
            return Ok(());
        }
        Err(match self.health.get().failure() {
            Some(f) => f.clone().into(),
            None => unavailable(
                "connect",
                format!("not connected within {} s", limit.as_secs()),
            ),
        })
    }
}

/// Connects to the broker `name` described by `cfg`; relative file paths are taken from
/// `base_dir`. Only settings that cannot work (a server address that does not parse, a
/// credentials file that cannot be read) are an error: a server that is down or refuses the
/// credentials is reported on the link's health while the client keeps trying in the
/// background.
pub async fn connect(
    name: &str,
    cfg: &NatsConfig,
    base_dir: &Path,
) -> Result<NatsLink, BrokerError> {
    let servers = servers(name, cfg)?;
    let health = HealthReporter::new();
    match options(name, cfg, base_dir, None)
        .await?
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(servers.clone())
        .await
    {
        Ok(client) => {
            health.ready();
            return Ok(NatsLink { client, health });
        }
        Err(e) => {
            let failure = connect_failure(name, &e);
            tracing::debug!(broker = %name, error = %failure, "NATS not connected at start; connecting in the background");
            health.failing(failure, Duration::ZERO);
        }
    }
    let client = options(name, cfg, base_dir, Some(health.clone()))
        .await?
        .connection_timeout(CONNECT_TIMEOUT)
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .map_err(|e| unavailable(&format!("connect to {name}"), e))?;
    Ok(NatsLink { client, health })
}

fn servers(name: &str, cfg: &NatsConfig) -> Result<Vec<async_nats::ServerAddr>, BrokerError> {
    cfg.servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e| BrokerError::Invalid(format!("nats {name}: server {s}: {e}")))
        })
        .collect()
}

/// Connects once, without retrying in the background, and checks that JetStream answers (for
/// `lockgate check --connect`).
pub async fn probe_connect(
    name: &str,
    cfg: &NatsConfig,
    base_dir: &Path,
) -> Result<async_nats::Client, BrokerError> {
    let client = options(name, cfg, base_dir, None)
        .await?
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(servers(name, cfg)?)
        .await
        .map_err(|e| BrokerError::from(connect_failure(name, &e)))?;
    Ok(client)
}

/// What `lockgate check --connect` finds for a JetStream source, changing nothing: that the
/// stream exists, and whether the durable consumer does (`lockgate run` creates it).
pub async fn probe_stream(
    client: async_nats::Client,
    stream: &str,
    durable: &str,
) -> Result<Vec<String>, BrokerError> {
    let js = jetstream::new(client);
    let what = format!("stream {stream}");
    let s = tokio::time::timeout(CONNECT_TIMEOUT, js.get_stream(stream))
        .await
        .map_err(|_| unavailable(&what, "no answer within 5 s"))?
        .map_err(|e| get_stream_error(stream, &e))?;
    let mut notes = Vec::new();
    match s.consumer_info(durable).await {
        Ok(_) => {}
        Err(e) if e.to_string().contains("consumer not found") => notes.push(format!(
            "consumer {durable} does not exist yet on stream {stream}: `lockgate run` creates it"
        )),
        Err(e) => return Err(unavailable(&format!("consumer {durable}"), e)),
    }
    Ok(notes)
}

/// A JetStream API error the server answered for `what`, classified.
fn jetstream_error(what: &str, api: &jetstream::Error, fix: &str) -> BrokerError {
    let error = format!("nats: {what}: {api}");
    let code = api.error_code();
    if code == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED
        || code == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
    {
        return BrokerError::Misconfigured {
            error,
            fix: "enable JetStream on the server (nats-server -js) and for the account".into(),
        };
    }
    // 4xx: the server refused the request as made; it will refuse it again.
    if (400..500).contains(&api.code()) && api.code() != 408 {
        return BrokerError::Misconfigured {
            error,
            fix: fix.to_owned(),
        };
    }
    BrokerError::Unavailable(error)
}

fn get_stream_error(stream: &str, e: &jetstream::context::GetStreamError) -> BrokerError {
    match e.kind() {
        jetstream::context::GetStreamErrorKind::JetStream(api)
            if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
        {
            BrokerError::Misconfigured {
                error: format!("nats: JetStream stream {stream} does not exist"),
                fix: format!(
                    "create the stream (for example `nats stream add {stream} --subjects '<the source's subjects>'`) or correct source.stream; lockgate does not create streams"
                ),
            }
        }
        jetstream::context::GetStreamErrorKind::JetStream(api) => jetstream_error(
            &format!("stream {stream}"),
            &api,
            "check source.stream and the account's JetStream permissions",
        ),
        _ => unavailable(&format!("stream {stream}"), e),
    }
}

async fn options(
    name: &str,
    cfg: &NatsConfig,
    base_dir: &Path,
    health: Option<HealthReporter>,
) -> Result<async_nats::ConnectOptions, BrokerError> {
    let broker = name.to_owned();
    let paced = health.clone();
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("lockgate {name}"))
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| {
            // Refused credentials are not retried in a hot loop.
            let refused = paced
                .as_ref()
                .is_some_and(|h| h.get().failure().is_some_and(Failure::is_misconfigured));
            if refused {
                crate::health::misconfigured_wait()
            } else {
                crate::health::transient_wait(u32::try_from(attempts).unwrap_or(u32::MAX))
            }
        })
        .event_callback(move |event| {
            let broker = broker.clone();
            let health = health.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(broker = %broker, "NATS connected");
                        if let Some(h) = &health {
                            h.ready();
                        }
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(broker = %broker, "NATS disconnected; reconnecting");
                        if let Some(h) = &health {
                            h.failing(
                                Failure::transient(format!("nats {broker}: disconnected from the server")),
                                Duration::ZERO,
                            );
                        }
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::error!(broker = %broker, error = %e, "NATS server error");
                    }
                    async_nats::Event::ClientError(e) => {
                        // A failed (re)connection attempt; sources report it with their route.
                        tracing::debug!(broker = %broker, error = %e, "NATS client error");
                        if let Some(h) = &health {
                            attempt_failed(&broker, h, &e.to_string());
                        }
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        tracing::warn!(broker = %broker, "NATS dropped messages for a slow subscription");
                    }
                    other => tracing::debug!(broker = %broker, event = %other, "NATS event"),
                }
            }
        })
        .require_tls(cfg.tls);
    // Secrets are read now, from the environment or their file: an unset variable or an
    // unreadable file is a config problem, named with its field.
    let secret = |s: &Secret| s.resolve().map_err(|e| BrokerError::Invalid(e.to_string()));
    match &cfg.auth {
        None => {}
        Some(NatsAuth::Credentials(s)) => {
            options = options.credentials(&secret(s)?).map_err(|e| {
                BrokerError::Invalid(format!(
                    "{}: not NATS credentials (a user JWT and an nkey seed): {e}",
                    s.field()
                ))
            })?;
        }
        Some(NatsAuth::NkeySeed(s)) => options = options.nkey(secret(s)?.trim().to_owned()),
        Some(NatsAuth::Token(s)) => options = options.token(secret(s)?),
        Some(NatsAuth::UserPassword { user, password }) => {
            options = options.user_and_password(user.clone(), secret(password)?);
        }
    }
    if let Some(f) = &cfg.tls_ca_file {
        options = options.add_root_certificates(base_dir.join(f));
    }
    Ok(options)
}

/// Records a failed background connection attempt on `health`. async-nats only says what kind
/// of failure it was (`IO error`, `authorization violation`), so a more detailed reason of the
/// same kind (from the first attempt at start) is kept.
fn attempt_failed(broker: &str, health: &HealthReporter, what: &str) {
    let refused = what.contains("authorization violation") || what.contains("failed signing nonce");
    let failure = match health.get() {
        Health::Failing { failure, .. } if failure.is_misconfigured() == refused => failure,
        _ if refused => Failure::misconfigured(
            format!("nats {broker}: the server refused the credentials: {what}"),
            credentials_fix(broker),
        ),
        _ => Failure::transient(format!("nats {broker}: cannot connect: {what}")),
    };
    health.failing(failure, Duration::ZERO);
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
        delivery: None,
    }
}

/// A JetStream durable pull consumer.
pub struct JetStreamSource {
    link: NatsLink,
    js: jetstream::Context,
    subject: String,
    durable: String,
    cfg: JetStreamConfig,
    describe: String,
    messages: Option<consumer::pull::Stream>,
    backoff: Backoff,
    health: HealthReporter,
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
    pub fn new(link: NatsLink, subject: &str, durable: &str, cfg: &JetStreamConfig) -> Self {
        Self {
            js: jetstream::new(link.client.clone()),
            link,
            subject: subject.to_owned(),
            durable: durable.to_owned(),
            describe: format!(
                "jetstream stream {} subject {subject}, consumer {durable}",
                cfg.stream
            ),
            cfg: cfg.clone(),
            messages: None,
            backoff: Backoff::new(),
            health: HealthReporter::new(),
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
            .map_err(|e| get_stream_error(&self.cfg.stream, &e))?;
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
        let what = format!("consumer {} on stream {}", self.durable, self.cfg.stream);
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(&self.durable, config)
            .await
            .map_err(|e| match e.kind() {
                jetstream::stream::ConsumerErrorKind::JetStream(api) => jetstream_error(
                    &what,
                    &api,
                    &format!(
                        "check source.topic against the stream's subjects, or delete the durable consumer if it was created with other settings (nats consumer rm {} {})",
                        self.cfg.stream, self.durable
                    ),
                ),
                _ => unavailable(&what, e),
            })?;
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

    fn health(&self) -> HealthWatch {
        self.health.watch()
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            loop {
                if self.messages.is_none() {
                    // A JetStream request on a client that is not connected only waits for its
                    // timeout: wait for the connection, reporting why it is not there.
                    if !wait_connected(&self.link, &self.health, &mut self.backoff).await {
                        continue;
                    }
                    match self.open().await {
                        Ok((consumer, m)) => {
                            self.messages = Some(m);
                            self.backoff.reset();
                            self.health.ready();
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
                            tracing::debug!(source = %self.describe, error = %e, "Cannot consume; retrying");
                            self.health
                                .retry_after(&mut self.backoff, e.failure())
                                .await;
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
                        tracing::debug!(source = %self.describe, error = %e, "Pull failed; re-creating the consumer");
                        self.messages = None;
                        let failure = Failure::transient(format!(
                            "nats: pull from consumer {}: {e}",
                            self.durable
                        ));
                        self.health.retry_after(&mut self.backoff, failure).await;
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
        let connected = self.link.connected();
        Box::pin(async move {
            // A flush waits for the server: without a connection it would never end (and stop
            // the process from exiting); acks that cannot go out are redeliveries anyway.
            if !connected {
                return Err(unavailable("flush acks", "not connected"));
            }
            tokio::time::timeout(CONNECT_TIMEOUT, client.flush())
                .await
                .map_err(|_| unavailable("flush acks", "no answer within 5 s"))?
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
        if name == crate::message::LOCKGATE_ID_HEADER {
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
            // Core NATS has no acknowledgement: a flush is the most there is (bounded: without
            // a connection it would wait for good).
            tokio::time::timeout(CONNECT_TIMEOUT, self.client.flush())
                .await
                .map_err(|_| unavailable("flush replies", "no answer within 5 s"))?
                .map_err(|e| unavailable("flush replies", e))
        })
    }
}

/// A core NATS queue subscription: at most once.
pub struct NatsCoreSource {
    link: NatsLink,
    subject: String,
    queue: String,
    describe: String,
    subscriber: Option<async_nats::Subscriber>,
    backoff: Backoff,
    health: HealthReporter,
    /// Once subscribed: follows the connection's health (the client resubscribes by itself
    /// after a reconnect).
    mirror: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for NatsCoreSource {
    fn drop(&mut self) {
        if let Some(t) = self.mirror.take() {
            t.abort();
        }
    }
}

impl NatsCoreSource {
    /// Subscribes to `subject` in queue group `queue` on first [`Source::next`].
    pub fn new(link: NatsLink, subject: &str, queue: &str) -> Self {
        Self {
            link,
            subject: subject.to_owned(),
            queue: queue.to_owned(),
            describe: format!("nats core subject {subject}, queue group {queue}"),
            subscriber: None,
            backoff: Backoff::new(),
            health: HealthReporter::new(),
            mirror: None,
        }
    }

    async fn subscribe(&self) -> Result<async_nats::Subscriber, BrokerError> {
        let what = format!("subscribe to {}", self.subject);
        let sub = self
            .link
            .client
            .queue_subscribe(self.subject.clone(), self.queue.clone())
            .await
            .map_err(|e| unavailable(&what, e))?;
        // The subscription is live once the server answered a ping after it.
        tokio::time::timeout(CONNECT_TIMEOUT, self.link.client.flush())
            .await
            .map_err(|_| unavailable(&what, "no answer within 5 s"))?
            .map_err(|e| unavailable(&what, e))?;
        Ok(sub)
    }
}

/// Waits until `link` is connected; false (after reporting why on `health` and waiting for a
/// change, at most one backoff step) if it is not.
async fn wait_connected(link: &NatsLink, health: &HealthReporter, backoff: &mut Backoff) -> bool {
    if link.connected() {
        return true;
    }
    let mut changes = link.health();
    let failure = changes
        .borrow_and_update()
        .failure()
        .cloned()
        .unwrap_or_else(|| Failure::transient("nats: not connected to the server yet"));
    let wait = backoff.next(failure.kind);
    health.failing(failure, wait);
    let _ = tokio::time::timeout(wait, changes.changed()).await;
    false
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

    fn health(&self) -> HealthWatch {
        self.health.watch()
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            loop {
                if self.subscriber.is_none() {
                    if !wait_connected(&self.link, &self.health, &mut self.backoff).await {
                        continue;
                    }
                    match self.subscribe().await {
                        Ok(sub) => {
                            tracing::info!(source = %self.describe, "Subscribed");
                            self.subscriber = Some(sub);
                            self.backoff.reset();
                            self.health.ready();
                            self.mirror = Some(tokio::spawn(mirror(
                                self.link.health(),
                                self.health.clone(),
                            )));
                        }
                        Err(e) => {
                            self.health
                                .retry_after(&mut self.backoff, e.failure())
                                .await;
                            continue;
                        }
                    }
                }
                let Some(sub) = self.subscriber.as_mut() else {
                    continue;
                };
                match sub.next().await {
                    Some(m) => {
                        let mut record = record_of(&m);
                        record.reply_to = m.reply.as_ref().map(ToString::to_string);
                        // Core NATS has no offsets: a message without an id is told apart
                        // by this delivery's number.
                        record.delivery = Some(crate::message::next_delivery());
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

/// Follows `link`'s health on `health`: a core subscription lives as long as the connection
/// (the client resubscribes after a reconnect).
async fn mirror(mut link: HealthWatch, health: HealthReporter) {
    loop {
        let now = link.borrow_and_update().clone();
        match now {
            Health::Ready => health.ready(),
            Health::Connecting => health.connecting(),
            Health::Failing { failure, .. } => {
                let wait = if failure.kind == FailureKind::Misconfigured {
                    crate::health::MISCONFIGURED_RETRY
                } else {
                    crate::health::MAX_TRANSIENT_RETRY
                };
                health.failing(failure, wait);
            }
        }
        if link.changed().await.is_err() {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_credentials_are_a_misconfiguration_and_an_unreachable_server_is_not() {
        let refused =
            async_nats::ConnectError::new(async_nats::ConnectErrorKind::AuthorizationViolation);
        let f = connect_failure("nats", &refused);
        assert!(f.is_misconfigured());
        assert!(f.fix.as_deref().is_some_and(|x| x.contains("token")));
        let down = async_nats::ConnectError::with_source(
            async_nats::ConnectErrorKind::Io,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(connect_failure("nats", &down).kind, FailureKind::Transient);
    }

    #[test]
    fn background_attempts_keep_the_detailed_reason_of_their_kind() {
        let health = HealthReporter::new();
        let detailed = Failure::transient("nats n: cannot connect: IO error: Connection refused");
        health.failing(detailed.clone(), Duration::ZERO);
        // async-nats only says "IO error" for later attempts.
        attempt_failed("n", &health, "nats: IO error");
        assert_eq!(health.get().failure(), Some(&detailed));
        attempt_failed("n", &health, "nats: authorization violation");
        let refused = health.get().failure().cloned().unwrap();
        assert!(refused.is_misconfigured(), "{refused:?}");
        assert!(refused.error.contains("refused the credentials"));
        assert!(matches!(health.get(), Health::Failing { attempts: 3, .. }));
    }
}
