//! An in-process broker: topics are vectors, one partition each, committed positions per group
//! live in memory. For unit tests and benchmarks of the pipeline, where a real broker would test
//! the broker rather than the policy; integration tests use the real brokers.
//!
//! It records what the pipeline did to it (pauses, resumes, commits, failed publishes) so tests
//! can assert that an open breaker pauses the source.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::{Ack, AckHandle, AckKind, BrokerError, Delivery, Sink, Source};

use futures_util::future::BoxFuture;

use crate::broker::offsets::OffsetTracker;
use crate::message::{LOCKGATE_ID_HEADER, OutRecord, Record};

/// Counters a test can read back.
#[derive(Debug, Default)]
pub struct MemoryStats {
    /// `Source::pause` calls.
    pub pauses: AtomicU64,
    /// `Source::resume` calls.
    pub resumes: AtomicU64,
    /// Acks with [`AckKind::Done`].
    pub acked_done: AtomicU64,
    /// Acks with [`AckKind::DeadLettered`].
    pub acked_dead: AtomicU64,
    /// Records dropped by a sink because their `lockgate-id` was already present.
    pub deduplicated: AtomicU64,
    /// Publish calls refused because the sink was set to fail.
    pub failed_publishes: AtomicU64,
    /// Publish calls that succeeded.
    pub publishes: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    topics: Mutex<HashMap<String, Vec<Record>>>,
    /// `(topic, lockgate-id)` of every stored record that has one, so a sink's dedup check is a
    /// lookup rather than a scan of the topic.
    ids: Mutex<std::collections::HashSet<(String, Vec<u8>)>>,
    committed: Mutex<HashMap<(String, String), u64>>,
    appended: Notify,
    failing_topics: Mutex<Vec<String>>,
    acked: Notify,
    paused_flag: AtomicBool,
    stats: MemoryStats,
}

/// The broker: cheap to clone, clones share topics.
#[derive(Clone, Debug, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends records to `topic` (as a producer would), returning the offset of the first.
    pub fn produce(&self, topic: &str, records: impl IntoIterator<Item = OutRecord>) -> u64 {
        let mut topics = self
            .inner
            .topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let log = topics.entry(topic.to_owned()).or_default();
        let first = log.len() as u64;
        let mut ids = self
            .inner
            .ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for r in records {
            if let Some((_, id)) = r.headers.iter().find(|(n, _)| n == LOCKGATE_ID_HEADER) {
                ids.insert((topic.to_owned(), id.clone()));
            }
            let offset = log.len() as u64;
            log.push(Record {
                topic: topic.to_owned(),
                partition: Some(0),
                offset: Some(offset),
                key: r.key,
                headers: r.headers,
                payload: r.payload,
                timestamp_ms: Some(crate::message::now_ms()),
                reply_to: None,
                delivery: None,
            });
        }
        drop(ids);
        drop(topics);
        self.inner.appended.notify_waiters();
        first
    }

    /// Everything in `topic`, in order.
    pub fn records(&self, topic: &str) -> Vec<Record> {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    /// The committed position of `group` on `topic` (0 if none).
    pub fn committed(&self, topic: &str, group: &str) -> u64 {
        self.inner
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(topic.to_owned(), group.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Makes publishes to `topic` fail (`true`) or succeed again (`false`).
    pub fn set_failing(&self, topic: &str, failing: bool) {
        let mut t = self
            .inner
            .failing_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        t.retain(|x| x != topic);
        if failing {
            t.push(topic.to_owned());
        }
    }

    /// Whether a source of this broker is paused now.
    pub fn is_paused(&self) -> bool {
        self.inner.paused_flag.load(Ordering::SeqCst)
    }

    /// Messages acknowledged so far (done or dead-lettered).
    pub fn acked(&self) -> u64 {
        let s = &self.inner.stats;
        s.acked_done.load(Ordering::SeqCst) + s.acked_dead.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` messages were acknowledged.
    pub async fn wait_acked(&self, n: u64) {
        loop {
            let acked = self.inner.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if self.acked() >= n {
                return;
            }
            acked.await;
        }
    }

    /// Counters.
    pub fn stats(&self) -> &MemoryStats {
        &self.inner.stats
    }

    /// A consumer of `topic` in `group`, resuming at the group's committed position.
    pub fn source(&self, topic: &str, group: &str) -> MemorySource {
        let start = self.committed(topic, group);
        MemorySource {
            broker: self.clone(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            next: start,
            tracker: Arc::new(Mutex::new(OffsetTracker::new(start))),
        }
    }

    /// A producer for any topic.
    pub fn sink(&self) -> MemorySink {
        MemorySink {
            broker: self.clone(),
        }
    }
}

/// A consumer of one topic.
#[derive(Debug)]
pub struct MemorySource {
    broker: MemoryBroker,
    topic: String,
    group: String,
    next: u64,
    tracker: Arc<Mutex<OffsetTracker>>,
}

struct MemoryAck {
    tracker: Arc<Mutex<OffsetTracker>>,
    offset: u64,
    broker: MemoryBroker,
}

impl Ack for MemoryAck {
    fn ack(self: Box<Self>, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .complete(self.offset);
        let stats = &self.broker.inner.stats;
        match kind {
            AckKind::Done => stats.acked_done.fetch_add(1, Ordering::SeqCst),
            AckKind::DeadLettered => stats.acked_dead.fetch_add(1, Ordering::SeqCst),
        };
        self.broker.inner.acked.notify_waiters();
        Box::pin(async { Ok(()) })
    }
}

impl Source for MemorySource {
    fn describe(&self) -> String {
        format!("memory topic {}, group {}", self.topic, self.group)
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(async move {
            loop {
                let appended = self.broker.inner.appended.notified();
                tokio::pin!(appended);
                appended.as_mut().enable();
                let record = self
                    .broker
                    .inner
                    .topics
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&self.topic)
                    .and_then(|log| log.get(usize::try_from(self.next).ok()?).cloned());
                if let Some(record) = record {
                    let offset = self.next;
                    self.next += 1;
                    self.tracker
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .begin(offset);
                    return Ok(Delivery {
                        record,
                        ack: AckHandle::new(MemoryAck {
                            tracker: self.tracker.clone(),
                            offset,
                            broker: self.broker.clone(),
                        }),
                        previous_attempts: 0,
                    });
                }
                appended.await;
            }
        })
    }

    fn pause(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.broker.inner.paused_flag.store(true, Ordering::SeqCst);
        self.broker
            .inner
            .stats
            .pauses
            .fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn resume(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        self.broker.inner.paused_flag.store(false, Ordering::SeqCst);
        self.broker
            .inner
            .stats
            .resumes
            .fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        let position = self
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .committable();
        self.broker
            .inner
            .committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((self.topic.clone(), self.group.clone()), position);
        Box::pin(async { Ok(()) })
    }
}

/// A producer; deduplicates by `lockgate-id` like the local broker.
#[derive(Clone, Debug)]
pub struct MemorySink {
    broker: MemoryBroker,
}

impl Sink for MemorySink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let inner = &self.broker.inner;
            {
                let failing = inner
                    .failing_topics
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(t) = records.iter().find(|r| failing.contains(&r.topic)) {
                    inner.stats.failed_publishes.fetch_add(1, Ordering::SeqCst);
                    return Err(BrokerError::Unavailable(format!(
                        "topic {} is set to fail",
                        t.topic
                    )));
                }
            }
            let mut fresh = Vec::with_capacity(records.len());
            {
                let ids = inner.ids.lock().unwrap_or_else(PoisonError::into_inner);
                for r in records {
                    let seen = r
                        .headers
                        .iter()
                        .find(|(n, _)| n == LOCKGATE_ID_HEADER)
                        .is_some_and(|(_, id)| ids.contains(&(r.topic.clone(), id.clone())));
                    if seen {
                        inner.stats.deduplicated.fetch_add(1, Ordering::SeqCst);
                    } else {
                        fresh.push(r);
                    }
                }
            }
            for r in fresh {
                let topic = r.topic.clone();
                self.broker.produce(&topic, [r]);
            }
            inner.stats.publishes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}
