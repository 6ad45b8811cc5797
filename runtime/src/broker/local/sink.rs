//! [`LocalSink`]: publishes to the embedded broker, with concurrent publishes merged into one
//! append (group commit).
//!
//! An append takes the topic's file lock, re-reads what other processes appended, writes and
//! (with `fsync`) syncs: it costs the same for one record as for a hundred, plus a hand-off to a
//! blocking thread. A route's lanes finish messages one at a time and publish each lane's batch
//! as it ends, so without merging, a route with four lanes paid a whole append per message. The
//! sink therefore appends on one blocking thread at a time, and a publish that arrives while an
//! append runs waits for the next one, which takes everything that arrived meanwhile. Nothing
//! waits for company: a publish on an idle sink is appended at once.

use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::LocalBroker;
use crate::broker::{BrokerError, Sink};
use crate::message::OutRecord;

/// A producer for any topic of a [`LocalBroker`]; deduplicates by `lockgate-id`.
#[derive(Clone, Debug)]
pub struct LocalSink {
    broker: LocalBroker,
    group: Arc<Group>,
}

/// The publishes waiting for the next append.
#[derive(Debug, Default)]
struct Group {
    state: Mutex<Queue>,
}

/// One publish: its records, and where its result goes.
type Waiting = (Vec<OutRecord>, oneshot::Sender<Result<(), BrokerError>>);

#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// An appender thread is running: it will take what is waiting.
    appending: bool,
}

impl LocalSink {
    pub(super) fn new(broker: LocalBroker) -> Self {
        Self {
            broker,
            group: Arc::default(),
        }
    }
}

impl Sink for LocalSink {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let start = {
                let mut q = self
                    .group
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                q.waiting.push((records, tx));
                !std::mem::replace(&mut q.appending, true)
            };
            if start {
                // On a thread of its own, so that dropping this publish (a route stopping)
                // cannot leave the others waiting.
                let (broker, group) = (self.broker.clone(), self.group.clone());
                tokio::task::spawn_blocking(move || append_all(&broker, &group));
            }
            rx.await.unwrap_or_else(|_| {
                Err(BrokerError::Unavailable(
                    "the local append task ended before this publish".into(),
                ))
            })
        })
    }
}

/// Appends what is waiting, again and again, until nothing is.
fn append_all(broker: &LocalBroker, group: &Group) {
    /// After a panic in an append: clears `appending`, so that the next publish starts a new
    /// appender, and fails what waits rather than leave it waiting.
    struct Panicked<'a>(&'a Group);
    impl Drop for Panicked<'_> {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                return;
            }
            let mut q = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            q.appending = false;
            for (_, tx) in q.waiting.drain(..) {
                let _ = tx.send(Err(BrokerError::Unavailable(
                    "the local append task failed".into(),
                )));
            }
        }
    }
    let _panicked = Panicked(group);
    loop {
        let batch = {
            let mut q = group.state.lock().unwrap_or_else(PoisonError::into_inner);
            if q.waiting.is_empty() {
                q.appending = false;
                return;
            }
            std::mem::take(&mut q.waiting)
        };
        append_batch(broker, batch);
    }
}

/// Appends the records of every publish of `batch` at once. If that fails, each publish is
/// appended alone, so that each gets its own answer (one publish's invalid record must not fail
/// the others; records already written are skipped by their `lockgate-id`).
fn append_batch(broker: &LocalBroker, batch: Vec<Waiting>) {
    if let [(records, _)] = batch.as_slice() {
        let result = broker.append(records).map(drop);
        if let Some((_, tx)) = batch.into_iter().next() {
            let _ = tx.send(result);
        }
        return;
    }
    let all: Vec<OutRecord> = batch.iter().flat_map(|(r, _)| r.iter().cloned()).collect();
    if broker.append(&all).is_ok() {
        for (_, tx) in batch {
            let _ = tx.send(Ok(()));
        }
        return;
    }
    for (records, tx) in batch {
        let _ = tx.send(broker.append(&records).map(drop));
    }
}
