//! Kafka (rdkafka): a consumer-group [`Source`] that stores an offset only when it and every
//! earlier offset of its partition are done, and an idempotent-producer [`Sink`].
//!
//! How the source keeps its promises:
//! - **Commit only what is done.** `enable.auto.offset.store=false`: librdkafka's auto-commit
//!   only commits offsets we *store*, and we store a partition's position only when the
//!   [`OffsetTracker`] watermark (contiguous prefix of done offsets) advances.
//! - **Rebalance safety.** On revoke, inside the rebalance callback, the stored positions are
//!   committed synchronously before the partitions go; acks that arrive later for a revoked
//!   partition are dropped (the new owner redelivers those messages). Cooperative-sticky
//!   assignment by default, so a rebalance only moves the partitions that must move.
//! - **`max.poll.interval.ms` safety.** A dedicated task polls the consumer all the time and hands
//!   messages to the pipeline through a channel; a slow handler never stops the polling. The
//!   bound on in-flight work is per partition: a partition with `max_in_flight_per_partition`
//!   messages not yet done is paused and resumed when half of them are.
//! - **Pause.** The breaker pauses every assigned partition (and partitions assigned while
//!   paused); polling goes on, so the consumer stays in its group.
//! - **Health.** The source is ready once the topic exists and the group handed out an
//!   assignment. A task asks for the topic's metadata (every 5 s, with the lag; on the backoff
//!   while failing): a topic the broker does not know, refused authentication or missing ACLs
//!   are [`FailureKind::Misconfigured`](crate::health::FailureKind) (lockgate does not create
//!   topics; the same metadata request makes librdkafka notice a topic created later, which it
//!   would otherwise only see after `topic.metadata.refresh.interval.ms`, 5 minutes), a broker
//!   that cannot be reached is transient. librdkafka's own log lines go to `debug`: what they
//!   say reaches the route's health.

mod connector;

pub use connector::KafkaConnector;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::{Ack, AckHandle, AckKind, BrokerError, Delivery, Lag, LagGauge, Scan, Sink, Source};

use futures_util::future::BoxFuture;

use crate::broker::offsets::OffsetTracker;
use crate::config::{KafkaConfig, Property};
use crate::health::{Backoff, Failure, HealthReporter, HealthWatch};
use crate::message::{OutRecord, Record};

/// How long a producer waits for a delivery report before the publish counts as failed.
pub const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a metadata request (the topic check) may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("kafka: {what}: {e}"))
}

/// A librdkafka error code, classified: authentication and authorization refusals are
/// misconfigurations; anything else (a broker that cannot be reached, a timeout) is transient.
/// `what` starts with the bootstrap servers when the caller knows them.
fn failure_of(what: &str, code: Option<RDKafkaErrorCode>, e: impl std::fmt::Display) -> Failure {
    let error = format!("kafka {what}: {e}");
    match code {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Failure::misconfigured(
                error,
                "check security.protocol, sasl.mechanisms, sasl.username and sasl.password in the broker's properties",
            )
        }
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Failure::misconfigured(
            error,
            "grant the client's principal read access to the topic and the consumer group (Kafka ACLs)",
        ),
        Some(RDKafkaErrorCode::SSL) => Failure::misconfigured(
            error,
            "check the ssl.* properties of the broker against the brokers' certificates",
        ),
        _ => Failure::transient(error),
    }
}

/// The failure for a topic the broker does not know.
fn unknown_topic(bootstrap: &str, topic: &str) -> Failure {
    Failure::misconfigured(
        format!("kafka {bootstrap}: topic {topic} does not exist"),
        "create the topic (lockgate does not create topics), or correct the route's source.topic",
    )
}

/// Asks the broker for `topic`'s metadata: `Ok` when it exists and has partitions.
fn check_topic<C: ConsumerContext, X: Consumer<C>>(
    consumer: &X,
    bootstrap: &str,
    topic: &str,
) -> Result<(), Failure> {
    let md = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|e| {
            failure_of(
                &format!("{bootstrap}: metadata"),
                e.rdkafka_error_code(),
                &e,
            )
        })?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Err(unknown_topic(bootstrap, topic));
    };
    match t.error().map(RDKafkaErrorCode::from) {
        None if !t.partitions().is_empty() => Ok(()),
        None | Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            Err(unknown_topic(bootstrap, topic))
        }
        Some(code) => Err(failure_of(
            &format!("{bootstrap}: metadata of topic {topic}"),
            Some(code),
            code,
        )),
    }
}

/// Sends librdkafka's log lines and errors to `debug` (what they say reaches the source's
/// health, classified), except fatal errors, and keeps the last error for the caller.
fn quiet_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}");
        }
        _ => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
    }
}

fn quiet_error(error: &KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
        tracing::error!(error = %error, reason, "Kafka client failed for good");
    } else {
        tracing::debug!(error = %error, reason, "Kafka client error");
    }
}

/// The context of producers and probes: librdkafka's chatter at `debug`, the last error kept.
#[derive(Clone, Default)]
pub struct QuietContext {
    last_error: Arc<Mutex<Option<KafkaError>>>,
}

impl QuietContext {
    fn last_error(&self) -> Option<KafkaError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        quiet_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        quiet_error(&error, reason);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
    }
}

impl ConsumerContext for QuietContext {}

/// What `lockgate check --connect` finds, changing nothing: that a broker answers (and accepts
/// the credentials) and, with `topic`, that the topic exists.
pub async fn probe(broker: &KafkaConfig, topic: Option<&str>) -> Result<(), BrokerError> {
    let context = QuietContext::default();
    let consumer: BaseConsumer<QuietContext> = client_config(
        broker,
        &[
            ("group.id", "lockgate-check"),
            ("enable.auto.commit", "false"),
            ("allow.auto.create.topics", "false"),
        ],
        &broker.consumer_properties,
    )?
    .create_with_context(context.clone())
    .map_err(|e| BrokerError::Invalid(format!("kafka consumer: {e}")))?;
    let t = topic.map(str::to_owned);
    let bootstrap = broker.bootstrap_servers.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let checked = match &t {
            Some(t) => check_topic(&consumer, &bootstrap, t),
            None => consumer
                .fetch_metadata(None, METADATA_TIMEOUT)
                .map(drop)
                .map_err(|e| {
                    failure_of(
                        &format!("{bootstrap}: metadata"),
                        e.rdkafka_error_code(),
                        &e,
                    )
                }),
        };
        if checked.is_err() {
            // The error callback that says why (a refused login) is served by a poll: on a busy
            // machine it may not have run yet when the metadata request gave up.
            let until = std::time::Instant::now() + Duration::from_secs(1);
            while std::time::Instant::now() < until {
                let _ = consumer.poll(Duration::from_millis(100));
            }
        }
        checked
    })
    .await
    .map_err(|e| unavailable("check task", e))?;
    checked.map_err(|f| {
        // A refused login shows as a metadata timeout; the error callback said why.
        match context.last_error() {
            Some(e) if !f.is_misconfigured() => {
                let why = failure_of(
                    &format!("{}: connect", broker.bootstrap_servers),
                    e.rdkafka_error_code(),
                    &e,
                );
                if why.is_misconfigured() { why } else { f }
            }
            _ => f,
        }
        .into()
    })
}

/// Builds the client config of `broker` for a consumer or a producer: our defaults, then the
/// user's `properties`, then the role's own properties (later ones win). Secret properties are
/// read now, from the environment or their file; one that cannot be read is a config problem.
fn client_config(
    broker: &KafkaConfig,
    defaults: &[(&str, &str)],
    role: &BTreeMap<String, Property>,
) -> Result<ClientConfig, BrokerError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &broker.bootstrap_servers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in broker.properties.iter().chain(role) {
        c.set(
            k,
            v.resolve()
                .map_err(|e| BrokerError::Invalid(e.to_string()))?,
        );
    }
    Ok(c)
}

/// One *assigned* partition: its watermark tracker (seeded with the committed position at
/// assignment, or at the first message when the group has none) and the assignment's generation,
/// so acks and messages left over from an earlier assignment are recognised as stale.
#[derive(Debug)]
struct PartitionState {
    tracker: Option<OffsetTracker>,
    generation: u64,
    paused_for_backlog: bool,
}

#[derive(Debug, Default)]
struct Shared {
    partitions: Mutex<HashMap<(String, i32), PartitionState>>,
    generation: AtomicU64,
    breaker_paused: AtomicBool,
    max_in_flight: usize,
    readiness: Readiness,
}

/// What the source knows about its topic and group, turned into its health.
#[derive(Debug, Default)]
struct Readiness {
    health: HealthReporter,
    /// The last metadata request found the topic.
    topic_known: AtomicBool,
    /// The group handed out an assignment (maybe empty: more members than partitions).
    assigned: AtomicBool,
    /// Wakes the topic check at once (the consumer reported an unknown topic).
    check_now: tokio::sync::Notify,
    /// The last refusal the client reported (authentication, authorization), until a topic
    /// check succeeds: a metadata request of a client whose login was refused only times out,
    /// and that must not turn the misconfiguration back into a transient failure.
    refusal: Mutex<Option<Failure>>,
}

impl Readiness {
    /// Ready once the topic is known and the group assigned.
    fn settle(&self) {
        if self.topic_known.load(Ordering::SeqCst) && self.assigned.load(Ordering::SeqCst) {
            self.health.ready();
        }
    }

    /// An error the client reported: a refusal is reported at once; anything else is confirmed
    /// (or not) by a topic check now, since librdkafka also reports errors it recovers from by
    /// itself (an idle connection closed, one broker of several away).
    fn client_error(&self, failure: Failure) {
        if failure.is_misconfigured() {
            *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(failure.clone());
            self.health
                .failing(failure, crate::health::MISCONFIGURED_RETRY);
        }
        self.check_now.notify_one();
    }

    /// What a failed topic check means: a transient failure after a refusal is the refusal.
    fn check_failed(&self, failure: Failure) -> Failure {
        if failure.is_misconfigured() {
            return failure;
        }
        self.refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or(failure)
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), PartitionState>> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The consumer context: commits on revoke, pauses new partitions while the route is paused.
struct LockgateContext {
    shared: Arc<Shared>,
    source: String,
}

impl ClientContext for LockgateContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        quiet_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        quiet_error(&error, reason);
        self.shared.readiness.client_error(failure_of(
            &format!("{}: client", self.source.trim_start_matches("kafka ")),
            error.rdkafka_error_code(),
            format!("{error}: {reason}"),
        ));
    }
}

impl ConsumerContext for LockgateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        // Store the final done positions of the revoked partitions and commit them now, while we
        // still own them; then forget them, so late acks cannot store anything.
        let mut done = TopicPartitionList::new();
        {
            let mut parts = self.shared.lock();
            for e in tpl.elements() {
                let key = (e.topic().to_owned(), e.partition());
                if let Some(tracker) = parts.remove(&key).and_then(|s| s.tracker) {
                    let position = i64::try_from(tracker.committable()).unwrap_or(i64::MAX);
                    if done
                        .add_partition_offset(&key.0, key.1, Offset::Offset(position))
                        .is_err()
                    {
                        continue;
                    }
                }
            }
        }
        if done.count() > 0 {
            if let Err(e) = consumer.store_offsets(&done) {
                tracing::warn!(source = %self.source, error = %e, "Storing offsets of revoked partitions failed");
            }
            if let Err(e) = consumer.commit(&done, CommitMode::Sync) {
                tracing::warn!(source = %self.source, error = %e, "Committing offsets of revoked partitions failed; their done messages will be redelivered to the new owner");
            }
        }
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        tracing::info!(source = %self.source, partitions = tpl.count(), "Partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(source = %self.source, partitions = tpl.count(), "Partitions assigned");
                let readiness = &self.shared.readiness;
                readiness.assigned.store(true, Ordering::SeqCst);
                if tpl.count() > 0 {
                    readiness.topic_known.store(true, Ordering::SeqCst);
                }
                readiness.settle();
                // Seed each partition's tracker with its committed position, so a message left
                // in the queue from an earlier assignment can never become the starting point.
                let committed = consumer
                    .committed_offsets((*tpl).clone(), Duration::from_secs(10))
                    .unwrap_or_else(|e| {
                        tracing::warn!(source = %self.source, error = %e, "Reading committed offsets failed; positions start at the first message");
                        TopicPartitionList::new()
                    });
                let generation = self.shared.generation.load(Ordering::SeqCst);
                {
                    let mut parts = self.shared.lock();
                    for e in tpl.elements() {
                        let start = committed.find_partition(e.topic(), e.partition()).and_then(
                            |c| match c.offset() {
                                Offset::Offset(o) => u64::try_from(o).ok(),
                                _ => None,
                            },
                        );
                        parts.insert(
                            (e.topic().to_owned(), e.partition()),
                            PartitionState {
                                tracker: start.map(OffsetTracker::new),
                                generation,
                                paused_for_backlog: false,
                            },
                        );
                    }
                }
                // librdkafka may keep a partition's pause across a revoke and a new assignment:
                // set it explicitly to what the route wants now.
                let result = if self.shared.breaker_paused.load(Ordering::SeqCst) {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(e) = result {
                    tracing::warn!(source = %self.source, error = %e, "Setting the pause state of assigned partitions failed");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::error!(source = %self.source, error = %e, "Rebalance failed");
            }
        }
    }
}

type Consumer_ = StreamConsumer<LockgateContext>;

/// A Kafka consumer-group source for one topic.
pub struct KafkaSource {
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    poller: tokio::task::JoinHandle<()>,
    lag: LagGauge,
    lag_task: tokio::task::JoinHandle<()>,
    describe: String,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Subscribes to `topic` in consumer group `group` on `broker`. Must be called inside a tokio
    /// runtime (it starts the polling task).
    pub fn new(broker: &KafkaConfig, topic: &str, group: &str) -> Result<Self, BrokerError> {
        let describe = format!(
            "kafka {} topic {topic}, group {group}",
            broker.bootstrap_servers
        );
        let shared = Arc::new(Shared {
            max_in_flight: broker.max_in_flight_per_partition.max(1),
            ..Shared::default()
        });
        let config = client_config(
            broker,
            &[
                ("group.id", group),
                ("enable.auto.commit", "true"),
                ("auto.commit.interval.ms", "1000"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("enable.partition.eof", "false"),
            ],
            &broker.consumer_properties,
        )?;
        let consumer: Consumer_ = config
            .create_with_context(LockgateContext {
                shared: shared.clone(),
                source: describe.clone(),
            })
            .map_err(|e| BrokerError::Invalid(format!("kafka consumer for {describe}: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| unavailable("subscribe", e))?;
        let consumer = Arc::new(consumer);
        let (tx, rx) = mpsc::unbounded_channel();
        let poller = tokio::spawn(poll(consumer.clone(), shared.clone(), tx, describe.clone()));
        let lag = LagGauge::default();
        let lag_task = tokio::spawn(watch_topic(
            consumer.clone(),
            shared.clone(),
            broker.bootstrap_servers.clone(),
            topic.to_owned(),
            lag.clone(),
        ));
        Ok(Self {
            consumer,
            shared,
            rx,
            poller,
            lag,
            lag_task,
            describe,
        })
    }

    /// Per-partition lag of the assigned partitions: (topic, partition, committed position,
    /// high watermark). Blocks on broker round trips.
    pub fn lag_now(&self) -> Result<Vec<(String, i32, i64, i64)>, BrokerError> {
        lag_of(&self.consumer)
    }

    fn set_paused(&self, pause: bool) -> Result<(), BrokerError> {
        self.shared.breaker_paused.store(pause, Ordering::SeqCst);
        let assignment = self
            .consumer
            .assignment()
            .map_err(|e| unavailable("assignment", e))?;
        if pause {
            self.consumer
                .pause(&assignment)
                .map_err(|e| unavailable("pause", e))
        } else {
            // Partitions paused for their backlog stay paused until it drains.
            let mut resume = TopicPartitionList::new();
            let parts = self.shared.lock();
            for e in assignment.elements() {
                let backlogged = parts
                    .get(&(e.topic().to_owned(), e.partition()))
                    .is_some_and(|s| s.paused_for_backlog);
                if !backlogged {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
            drop(parts);
            self.consumer
                .resume(&resume)
                .map_err(|e| unavailable("resume", e))
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.poller.abort();
        self.lag_task.abort();
    }
}

fn lag_of(consumer: &Consumer_) -> Result<Vec<(String, i32, i64, i64)>, BrokerError> {
    let assignment = consumer
        .assignment()
        .map_err(|e| unavailable("assignment", e))?;
    let committed = consumer
        .committed_offsets(assignment, Duration::from_secs(5))
        .map_err(|e| unavailable("committed offsets", e))?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(5))
            .map_err(|err| unavailable("watermarks", err))?;
        let position = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        out.push((e.topic().to_owned(), e.partition(), position, high));
    }
    Ok(out)
}

/// Checks the topic and keeps `gauge` current (committed vs high watermark per assigned
/// partition): every [`super::LAG_REFRESH`] while the source is healthy, on the backoff while it
/// fails, and at once when the consumer reports an error.
async fn watch_topic(
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
    bootstrap: String,
    topic: String,
    gauge: LagGauge,
) {
    let readiness = &shared.readiness;
    let mut backoff = Backoff::new();
    loop {
        let (c, b, t) = (consumer.clone(), bootstrap.clone(), topic.clone());
        let Ok(checked) =
            tokio::task::spawn_blocking(move || check_topic(c.as_ref(), &b, &t)).await
        else {
            return;
        };
        let wait = match checked {
            Ok(()) => {
                backoff.reset();
                *readiness
                    .refusal
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                readiness.topic_known.store(true, Ordering::SeqCst);
                if readiness.assigned.load(Ordering::SeqCst) {
                    readiness.health.ready();
                } else if readiness.health.get().failure().is_some() {
                    // The topic is there now; the group has yet to assign it.
                    readiness.health.connecting();
                }
                let c = consumer.clone();
                match tokio::task::spawn_blocking(move || lag_of(&c)).await {
                    Ok(Ok(parts)) => gauge.set(
                        parts
                            .into_iter()
                            .map(|(topic, partition, committed, high)| Lag {
                                topic,
                                partition: Some(partition),
                                messages: u64::try_from(high.saturating_sub(committed))
                                    .unwrap_or(0),
                            })
                            .collect(),
                    ),
                    Ok(Err(e)) => tracing::debug!(error = %e, "Reading consumer lag failed"),
                    Err(_) => return,
                }
                super::LAG_REFRESH
            }
            Err(failure) => {
                let failure = readiness.check_failed(failure);
                if failure.is_misconfigured() {
                    readiness.topic_known.store(false, Ordering::SeqCst);
                }
                let wait = backoff.next(failure.kind);
                readiness.health.failing(failure, wait);
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = readiness.check_now.notified() => {}
        }
    }
}

/// Polls the consumer forever, turning messages into deliveries.
/// The record of a Kafka message (`None` for a negative partition or offset, which a fetched
/// message never has).
fn record_of<M: Message>(msg: &M) -> Option<Record> {
    let (Ok(partition), Ok(offset)) = (u32::try_from(msg.partition()), u64::try_from(msg.offset()))
    else {
        return None;
    };
    Some(Record {
        topic: msg.topic().to_owned(),
        partition: Some(partition),
        offset: Some(offset),
        key: msg.key().map(<[u8]>::to_vec),
        headers: msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|Header { key, value }| {
                        (
                            key.to_owned(),
                            value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        timestamp_ms: msg
            .timestamp()
            .to_millis()
            .and_then(|t| u64::try_from(t).ok()),
        reply_to: None,
        delivery: None,
    })
}

async fn poll(
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Delivery>,
    describe: String,
) {
    loop {
        let msg = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                // librdkafka retries connections itself; the topic check tells what is wrong.
                tracing::debug!(source = %describe, error = %e, "Kafka consumer error");
                shared.readiness.client_error(failure_of(
                    &format!("{}: consume", describe.trim_start_matches("kafka ")),
                    e.rdkafka_error_code(),
                    &e,
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(record) = record_of(&msg) else {
            continue;
        };
        let (topic, partition) = (record.topic.clone(), msg.partition());
        let offset = record.offset.unwrap_or_default();
        tracing::trace!(source = %describe, partition, offset, "Message received");
        // Only assigned partitions have state. A message of a partition we no longer own, or
        // below the position we resumed from, is left over from an earlier assignment: its new
        // owner (or an earlier run of ours) has it.
        let (pause_now, generation) = {
            let mut parts = shared.lock();
            let Some(state) = parts.get_mut(&(topic.clone(), msg.partition())) else {
                continue;
            };
            let tracker = state
                .tracker
                .get_or_insert_with(|| OffsetTracker::new(offset));
            if offset < tracker.committable() {
                continue;
            }
            tracker.begin(offset);
            let pause = tracker.in_flight() >= shared.max_in_flight && !state.paused_for_backlog;
            if pause {
                state.paused_for_backlog = true;
            }
            (pause, state.generation)
        };
        if pause_now {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, msg.partition());
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(source = %describe, error = %e, "Pausing a backlogged partition failed");
            }
        }
        let ack = KafkaAck {
            consumer: consumer.clone(),
            shared: shared.clone(),
            topic,
            partition: msg.partition(),
            offset,
            generation,
        };
        drop(msg);
        if tx
            .send(Delivery {
                record,
                ack: AckHandle::new(ack),
                previous_attempts: 0,
            })
            .is_err()
        {
            return;
        }
    }
}

struct KafkaAck {
    consumer: Arc<Consumer_>,
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    offset: u64,
    generation: u64,
}

impl Ack for KafkaAck {
    fn is_current(&self) -> bool {
        let parts = self.shared.lock();
        parts
            .get(&(self.topic.clone(), self.partition))
            .is_some_and(|state| state.generation == self.generation)
    }

    fn ack(self: Box<Self>, _kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (store, resume) = {
            let mut parts = self.shared.lock();
            match parts.get_mut(&(self.topic.clone(), self.partition)) {
                // A revoked partition (maybe assigned again since): its new owner redelivers.
                Some(state) if state.generation == self.generation => {
                    let Some(tracker) = state.tracker.as_mut() else {
                        return Box::pin(async { Ok(()) });
                    };
                    let advanced = tracker.complete(self.offset);
                    let resume = state.paused_for_backlog
                        && tracker.in_flight() <= self.shared.max_in_flight / 2;
                    if resume {
                        state.paused_for_backlog = false;
                    }
                    (advanced, resume)
                }
                _ => (None, false),
            }
        };
        let mut result = Ok(());
        if let Some(position) = store {
            let mut tpl = TopicPartitionList::new();
            let offset = Offset::Offset(i64::try_from(position).unwrap_or(i64::MAX));
            if tpl
                .add_partition_offset(&self.topic, self.partition, offset)
                .is_ok()
                && let Err(e) = self.consumer.store_offsets(&tpl)
            {
                // Not assigned any more: the commit on revoke already covered what was done.
                tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "Offset not stored");
            }
        }
        if resume && !self.shared.breaker_paused.load(Ordering::SeqCst) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, self.partition);
            if let Err(e) = self.consumer.resume(&tpl) {
                result = Err(unavailable("resume", e));
            }
        }
        Box::pin(async move { result })
    }
}

impl Source for KafkaSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn lag(&self) -> Option<LagGauge> {
        Some(self.lag.clone())
    }

    fn health(&self) -> HealthWatch {
        self.shared.readiness.health.watch()
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move { self.rx.recv().await.ok_or(BrokerError::Closed) })
    }

    fn pause(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let r = self.set_paused(true);
        Box::pin(async move { r })
    }

    fn resume(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let r = self.set_paused(false);
        Box::pin(async move { r })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            // Acks already stored their positions; commit them synchronously (off the async
            // threads: a sync commit blocks until the broker answers).
            let consumer = self.consumer.clone();
            tokio::task::spawn_blocking(move || {
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    // Nothing stored since the last commit.
                    Err(rdkafka::error::KafkaError::ConsumerCommit(
                        rdkafka::types::RDKafkaErrorCode::NoOffset,
                    )) => Ok(()),
                    other => other,
                }
            })
            .await
            .map_err(|e| unavailable("commit task", e))?
            .map_err(|e| unavailable("commit", e))
        })
    }
}

/// An idempotent producer (`acks=all`, `enable.idempotence=true`) for outputs and dead letters.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer<QuietContext>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// A producer for `broker` (called `name` in the config).
    pub fn new(name: &str, broker: &KafkaConfig) -> Result<Self, BrokerError> {
        let producer = client_config(
            broker,
            &[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                ("message.timeout.ms", "30000"),
                // Each output is awaited before its message is acked: keep batching short.
                ("linger.ms", "2"),
            ],
            &broker.producer_properties,
        )?
        .create_with_context(QuietContext::default())
        .map_err(|e| BrokerError::Invalid(format!("kafka producer for {name}: {e}")))?;
        Ok(Self { producer })
    }
}

impl Sink for KafkaSink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            // Queue all, then await every delivery report: a batch is acknowledged only whole.
            let mut pending = Vec::with_capacity(records.len());
            for r in &records {
                let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
                for (name, value) in &r.headers {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value),
                    });
                }
                let mut record = FutureRecord::to(&r.topic)
                    .payload(&r.payload)
                    .headers(headers);
                if let Some(k) = &r.key {
                    record = record.key(k);
                }
                // send_result enqueues at once (send would only when polled); a full local queue
                // drains as earlier records are delivered.
                let future = loop {
                    match self.producer.send_result(record) {
                        Ok(f) => break f,
                        Err((
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull,
                            ),
                            back,
                        )) => {
                            record = back;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => {
                            return Err(unavailable(&format!("publish to {}", r.topic), e));
                        }
                    }
                };
                pending.push(future);
            }
            for (r, delivery) in records.iter().zip(pending) {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        return Err(unavailable(&format!("publish to {}", r.topic), e));
                    }
                    Err(_) => {
                        return Err(unavailable(
                            &format!("publish to {}", r.topic),
                            "the producer was dropped before the delivery report",
                        ));
                    }
                }
            }
            Ok(())
        })
    }
}

/// How long a scan waits for the next record it knows exists before giving up.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);
/// Records a scan returns at once.
const SCAN_BATCH: usize = 500;
/// After the watermarks, how long a scan keeps taking records that come, until one such pause
/// passes without any.
const SCAN_TAIL_QUIET: Duration = Duration::from_millis(250);

/// A [`Scan`] of every partition of one topic, from each partition's low watermark to the high
/// watermark it had at open, and then whatever arrives until the topic is quiet for
/// [`SCAN_TAIL_QUIET`]: a broker may report a high watermark behind its last records (tansu,
/// the Kafka-protocol broker of the tests, counts only the first record of the newest batch
/// until the next write), and a reader of a DLQ must not miss the newest letters, markers or
/// replay results. Partitions are assigned directly (no group, nothing committed).
pub struct KafkaScan {
    consumer: StreamConsumer,
    /// Partitions not yet read to their end, with that end (exclusive).
    remaining: HashMap<i32, i64>,
    /// Per assigned partition, the next offset to return (records below it were returned).
    next: HashMap<i32, i64>,
    /// Whether the quiet tail after the watermarks was read.
    tail_done: bool,
    topic: String,
}

impl std::fmt::Debug for KafkaScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaScan")
            .field("topic", &self.topic)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl KafkaScan {
    /// Opens a scan of `topic`. A topic that does not exist scans as empty.
    pub async fn open(broker: &KafkaConfig, topic: &str) -> Result<Self, BrokerError> {
        let consumer: StreamConsumer = client_config(
            broker,
            &[
                ("group.id", "lockgate-dlq-scan"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("allow.auto.create.topics", "false"),
            ],
            &broker.consumer_properties,
        )?
        .create()
        .map_err(|e| BrokerError::Invalid(format!("kafka consumer: {e}")))?;
        let t = topic.to_owned();
        // Metadata and watermark requests block: off the async threads (the consumer goes
        // along and comes back).
        let (consumer, ends) = tokio::task::spawn_blocking(move || {
            let md = consumer
                .fetch_metadata(Some(&t), Duration::from_secs(10))
                .map_err(|e| unavailable(&format!("metadata of {t}"), e))?;
            let mut ends = Vec::new();
            for mt in md.topics().iter().filter(|mt| mt.name() == t) {
                if mt.error().is_some() {
                    // Unknown topic: nothing was ever dead-lettered there.
                    continue;
                }
                for p in mt.partitions() {
                    let (low, high) = consumer
                        .fetch_watermarks(&t, p.id(), Duration::from_secs(10))
                        .map_err(|e| unavailable(&format!("watermarks of {t}/{}", p.id()), e))?;
                    ends.push((p.id(), low, high));
                }
            }
            Ok::<_, BrokerError>((consumer, ends))
        })
        .await
        .map_err(|e| BrokerError::Unavailable(format!("scan task failed: {e}")))??;
        let mut tpl = TopicPartitionList::new();
        let mut remaining = HashMap::new();
        let mut next = HashMap::new();
        for (p, low, high) in ends {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| unavailable(&format!("assign {topic}/{p}"), e))?;
            next.insert(p, low);
            if high > low {
                remaining.insert(p, high);
            }
        }
        if !next.is_empty() {
            consumer
                .assign(&tpl)
                .map_err(|e| unavailable(&format!("assign {topic}"), e))?;
        }
        Ok(Self {
            consumer,
            remaining,
            tail_done: next.is_empty(),
            next,
            topic: topic.to_owned(),
        })
    }
}

/// Adds `msg` to `out` unless it was returned already (`next`: per partition, the next offset
/// to return).
fn take_new(
    next: &mut HashMap<i32, i64>,
    msg: &rdkafka::message::BorrowedMessage<'_>,
    out: &mut Vec<Record>,
) {
    let next = next.entry(msg.partition()).or_insert(0);
    if msg.offset() < *next {
        return;
    }
    *next = msg.offset() + 1;
    if let Some(r) = record_of(msg) {
        out.push(r);
    }
}

impl Scan for KafkaScan {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            while !self.remaining.is_empty() && out.len() < SCAN_BATCH {
                let msg = match tokio::time::timeout(SCAN_TIMEOUT, self.consumer.recv()).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => return Err(unavailable(&format!("read {}", self.topic), e)),
                    Err(_) => {
                        return Err(unavailable(
                            &format!("read {}", self.topic),
                            format!(
                                "no record for {} s although partitions {:?} have more",
                                SCAN_TIMEOUT.as_secs(),
                                self.remaining.keys().collect::<Vec<_>>()
                            ),
                        ));
                    }
                };
                let p = msg.partition();
                let Some(&end) = self.remaining.get(&p) else {
                    continue;
                };
                if msg.offset() >= end {
                    self.remaining.remove(&p);
                    // Past the watermark: the tail below takes it.
                }
                if msg.offset() + 1 >= end {
                    self.remaining.remove(&p);
                }
                take_new(&mut self.next, &msg, &mut out);
            }
            if self.remaining.is_empty() && !self.tail_done {
                while out.len() < SCAN_BATCH {
                    match tokio::time::timeout(SCAN_TAIL_QUIET, self.consumer.recv()).await {
                        Ok(Ok(msg)) => take_new(&mut self.next, &msg, &mut out),
                        Ok(Err(e)) => {
                            return Err(unavailable(&format!("read {}", self.topic), e));
                        }
                        Err(_) => {
                            self.tail_done = true;
                            break;
                        }
                    }
                }
            }
            Ok(if out.is_empty() { None } else { Some(out) })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::FailureKind;

    #[test]
    fn secret_properties_are_read_when_the_client_is_built() {
        use crate::config::{Secret, SecretSource};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "pw-from-file\n").unwrap();
        let secret =
            |source| Property::Secret(Secret::new("brokers.k.properties.sasl.password", source));
        let mut broker = KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            properties: BTreeMap::from([
                ("sasl.password".into(), secret(SecretSource::File(file))),
                ("linger.ms".into(), Property::Value("5".into())),
            ]),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            max_in_flight_per_partition: 1,
        };
        let role = BTreeMap::from([("linger.ms".into(), Property::Value("7".into()))]);
        let c = client_config(&broker, &[("acks", "all")], &role).unwrap();
        assert_eq!(c.get("sasl.password"), Some("pw-from-file"));
        assert_eq!(c.get("linger.ms"), Some("7"));
        assert_eq!(c.get("acks"), Some("all"));
        broker.properties.insert(
            "sasl.password".into(),
            secret(SecretSource::File(dir.path().join("missing"))),
        );
        let Err(BrokerError::Invalid(e)) = client_config(&broker, &[], &role) else {
            panic!("a missing secret file must fail");
        };
        assert!(
            e.starts_with("brokers.k.properties.sasl.password: file "),
            "{e}"
        );
    }

    #[test]
    fn refusals_are_misconfigurations_and_the_rest_transient() {
        for code in [
            RDKafkaErrorCode::Authentication,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::GroupAuthorizationFailed,
            RDKafkaErrorCode::SSL,
        ] {
            let f = failure_of("h:9092: consume", Some(code), code);
            assert_eq!(f.kind, FailureKind::Misconfigured, "{code:?}");
            assert!(f.fix.is_some(), "{code:?}");
        }
        for code in [
            Some(RDKafkaErrorCode::BrokerTransportFailure),
            Some(RDKafkaErrorCode::AllBrokersDown),
            Some(RDKafkaErrorCode::UnknownTopicOrPartition),
            None,
        ] {
            let f = failure_of("h:9092: consume", code, "x");
            assert_eq!(f.kind, FailureKind::Transient, "{code:?}");
        }
        let unknown = unknown_topic("h:9092", "orders");
        assert_eq!(unknown.error, "kafka h:9092: topic orders does not exist");
        assert!(unknown.is_misconfigured());
    }

    #[test]
    fn a_failed_topic_check_after_a_refusal_stays_the_refusal() {
        let r = Readiness::default();
        let timeout = Failure::transient("kafka h:9092: metadata: timed out");
        assert_eq!(r.check_failed(timeout.clone()), timeout);
        let refused = failure_of(
            "h:9092: client",
            Some(RDKafkaErrorCode::Authentication),
            "Local: Authentication failure",
        );
        r.client_error(refused.clone());
        assert_eq!(r.health.get().failure(), Some(&refused));
        assert_eq!(r.check_failed(timeout), refused);
        // A transient client error only asks for a check; it does not flip a ready source.
        let r = Readiness::default();
        r.health.ready();
        r.client_error(Failure::transient(
            "kafka h:9092: client: idle connection closed",
        ));
        assert_eq!(r.health.get(), crate::health::Health::Ready);
    }
}
