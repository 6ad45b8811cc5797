//! `lockgate dlq replay` as an algorithm, over any DLQ a [`ReplayIo`] reads and writes.
//!
//! 1. [`plan`] reads each DLQ whole: the dead letters that match, minus those a replay marker
//!    already names. Dead letters of a route the I/O does not know are counted apart: the
//!    caller cannot tell where their copies would go.
//! 2. [`replay`] reads each DLQ again and, in DLQ order, publishes the planned letters' copies
//!    ([`replay_record`]) to the broker feeding their route, in batches of one route each. Once
//!    a batch's copies are acknowledged it appends a replay marker naming them to the DLQ. A
//!    batch is always published before it is marked: a stop or a failure in between replays
//!    it again next time (its copies carry the same `lockgate-id`, so a deduplicating source
//!    drops the second), never loses it. A stop is honoured between batches.
//! 3. [`await_results`] reads the DLQs until every published letter has a replay result (which
//!    the route that took the copy writes), the wait is over or the replay is stopped.
//!
//! Reading twice (instead of publishing while planning) lets the caller refuse a replay with
//! unknown routes, or print a dry run, before anything is published.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    DeadLetter, Numbering, PositionArg, PositionError, ReplayResult, Shortener, marker,
    marker_positions, parse_result, replay_record,
};
use crate::message::{OutRecord, Record, now_ms};

/// An error of the I/O underneath (a broker that cannot be reached, a topic that cannot be
/// read); the replay says what it was doing.
pub type IoError = Box<dyn std::error::Error + Send + Sync>;

/// A DLQ: the broker (or store) it lives on and its topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DlqRef {
    /// Broker name, as the I/O knows it.
    pub broker: String,
    /// Topic, subject, queue or table name.
    pub topic: String,
}

impl std::fmt::Display for DlqRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.broker, self.topic)
    }
}

/// What the replay reads and writes: a DLQ from its head, the DLQ (for markers), and the broker
/// feeding a route (for the copies). The binary implements it over its broker clients; tests
/// over memory.
pub trait ReplayIo {
    /// An open read of one DLQ.
    type Scan: Send;
    /// Somewhere records can be published.
    type Sink: Send + Sync;

    /// Opens a read of `dlq` from its head.
    fn scan(&mut self, dlq: &DlqRef) -> impl Future<Output = Result<Self::Scan, IoError>> + Send;

    /// How `scan`'s DLQ numbers its records (what their offsets are).
    fn numbering(&self, scan: &Self::Scan) -> Numbering {
        let _ = scan;
        Numbering::Offsets
    }

    /// The next records of `scan` in order, or `None` at the end.
    fn next_batch(
        &mut self,
        scan: &mut Self::Scan,
    ) -> impl Future<Output = Result<Option<Vec<Record>>, IoError>> + Send;

    /// Where the markers of `dlq` are appended.
    fn marker_sink(
        &mut self,
        dlq: &DlqRef,
    ) -> impl Future<Output = Result<Self::Sink, IoError>> + Send;

    /// Where the copies of `route`'s dead letters are published: the broker its source reads.
    fn feeder(&mut self, route: &str) -> impl Future<Output = Result<Self::Sink, IoError>> + Send;

    /// Publishes `records` and returns once all were acknowledged.
    fn publish(
        &mut self,
        sink: &Self::Sink,
        records: Vec<OutRecord>,
    ) -> impl Future<Output = Result<(), IoError>> + Send;

    /// The broker `route`'s source reads; `None` for a route the I/O does not know.
    fn source_broker(&self, route: &str) -> Option<String>;
}

/// Why a replay stopped with an error. A batch whose copies were published but not marked is
/// replayed again by the next run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A DLQ could not be opened or read.
    #[error("cannot read the DLQ {dlq}")]
    Read {
        /// The DLQ.
        dlq: DlqRef,
        /// Why.
        source: IoError,
    },
    /// The DLQ's broker cannot be written (checked before anything of it is published).
    #[error("cannot write to the DLQ broker {}", dlq.broker)]
    MarkerSink {
        /// The DLQ.
        dlq: DlqRef,
        /// Why.
        source: IoError,
    },
    /// A planned route is unknown to the I/O (it was known when the replay was planned).
    #[error("route {route} is unknown: cannot tell which broker to replay its dead letters to")]
    UnknownRoute {
        /// The route.
        route: String,
    },
    /// The broker feeding a route cannot be written.
    #[error("cannot publish to broker {broker}")]
    Feeder {
        /// The broker.
        broker: String,
        /// Why.
        source: IoError,
    },
    /// A batch of copies was not acknowledged; nothing of it was marked.
    #[error(
        "publishing {n} replayed messages to {to} failed (nothing of this batch was marked; run again)"
    )]
    Publish {
        /// Copies in the batch.
        n: usize,
        /// Where they went (`broker:topic,...`).
        to: String,
        /// Why.
        source: IoError,
    },
    /// A batch was published but its marker was not written.
    #[error(
        "marking {n} replayed dead letters in {dlq} failed: they were published and will be replayed again by the next run"
    )]
    Mark {
        /// Dead letters in the batch.
        n: usize,
        /// The DLQ.
        dlq: DlqRef,
        /// Why.
        source: IoError,
    },
}

/// What a DLQ holds: its dead letters, the positions its replay markers name and the results
/// of replayed copies (by the dead letter's position).
#[derive(Debug, Default)]
pub struct Contents {
    /// How the DLQ numbers its letters.
    pub numbering: Numbering,
    /// The dead letters that matched, in DLQ order, each with its printed position.
    pub dead: Vec<DeadLetter>,
    /// Positions some replay marker names.
    pub replayed: HashSet<String>,
    /// The result of each replayed letter that has one.
    pub results: HashMap<String, ReplayResult>,
}

impl Contents {
    /// Takes `record` in: a marker, a result, or a dead letter kept if `filter` accepts it (its
    /// payload and headers only if `keep` does too).
    /// Every dead letter's position (matching or not) goes to `all`.
    fn add(
        &mut self,
        record: Record,
        filter: &impl Fn(&DeadLetter) -> bool,
        keep: &impl Fn(&DeadLetter) -> bool,
        all: &mut Vec<String>,
    ) {
        if let Some(positions) = marker_positions(&record) {
            self.replayed.extend(positions);
        } else if let Some(r) = parse_result(&record) {
            // An earlier result stands unless the new one supersedes it.
            match self.results.get(&r.position) {
                Some(earlier) if !r.supersedes(earlier) => {}
                _ => {
                    self.results.insert(r.position.clone(), r);
                }
            }
        } else if let Some(mut d) = DeadLetter::parse(record)
            && {
                if self.numbering == Numbering::Digests {
                    all.push(d.position.clone());
                }
                filter(&d)
            }
        {
            if !keep(&d) {
                d.record.payload = Vec::new();
                d.record.headers = Vec::new();
            }
            self.dead.push(d);
        }
    }
}

/// Reads `dlq` whole. Dead letters are kept when `filter` accepts them, with their payload and
/// headers only when `keep` does too (a long DLQ is read without holding its payloads).
pub async fn read<Io: ReplayIo>(
    io: &mut Io,
    dlq: &DlqRef,
    filter: impl Fn(&DeadLetter) -> bool,
    keep: impl Fn(&DeadLetter) -> bool,
) -> Result<Contents, ReplayError> {
    let mut scan = io.scan(dlq).await.map_err(|source| ReplayError::Read {
        dlq: dlq.clone(),
        source,
    })?;
    drain(io, dlq, &mut scan, filter, keep).await
}

/// Reads an open `scan` of `dlq` to its end (see [`read`]); every kept letter's position is
/// printed as among all of the DLQ's letters ([`Shortener`]).
async fn drain<Io: ReplayIo>(
    io: &mut Io,
    dlq: &DlqRef,
    scan: &mut Io::Scan,
    filter: impl Fn(&DeadLetter) -> bool,
    keep: impl Fn(&DeadLetter) -> bool,
) -> Result<Contents, ReplayError> {
    let read_error = |source| ReplayError::Read {
        dlq: dlq.clone(),
        source,
    };
    let mut contents = Contents {
        numbering: io.numbering(scan),
        ..Contents::default()
    };
    let mut all = Vec::new();
    while let Some(batch) = io.next_batch(scan).await.map_err(read_error)? {
        for record in batch {
            contents.add(record, &filter, &keep, &mut all);
        }
    }
    let shortener = Shortener::new(contents.numbering, all.iter().map(String::as_str));
    for d in &mut contents.dead {
        d.shown = shortener.short(&d.position);
    }
    Ok(contents)
}

/// The dead letter of `dlq` at the position a user typed (`typed`: any form [`PositionArg`]
/// reads), with its payload, and what else the DLQ holds about it; `Ok(Err(_))` when `typed`
/// names no single letter there. One read of the DLQ.
pub async fn find<Io: ReplayIo>(
    io: &mut Io,
    dlq: &DlqRef,
    typed: &str,
) -> Result<Result<(DeadLetter, Contents), PositionError>, ReplayError> {
    let mut scan = io.scan(dlq).await.map_err(|source| ReplayError::Read {
        dlq: dlq.clone(),
        source,
    })?;
    let parsed = PositionArg::parse(typed, &dlq.topic, io.numbering(&scan));
    // Read to the end even when `typed` is malformed: a scan gives its records back at the end.
    let wanted = parsed.as_ref().ok();
    let matches = |d: &DeadLetter| wanted.is_some_and(|w| w.matches(&d.position));
    let mut contents = drain(io, dlq, &mut scan, matches, matches).await?;
    if let Err(e) = parsed {
        return Ok(Err(e));
    }
    let one = PositionArg::resolve(
        typed,
        contents
            .dead
            .iter()
            .map(|d| (d.position.as_str(), d.shown.as_str())),
    )
    .map(str::to_owned);
    Ok(one.map(|position| {
        let at = contents
            .dead
            .iter()
            .position(|d| d.position == position)
            .unwrap_or_default();
        (contents.dead.swap_remove(at), contents)
    }))
}

/// One dead letter to replay and where its copy goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The dead letter's position in its DLQ.
    pub position: String,
    /// The position as printed.
    pub shown: String,
    /// The route that dead-lettered it (whose source broker the copy goes to).
    pub route: String,
    /// The topic the copy is published to.
    pub to: String,
}

/// What the first pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Per DLQ, the dead letters to replay in DLQ order (DLQs with none are left out).
    pub dlqs: Vec<(DlqRef, Vec<Planned>)>,
    /// Matching dead letters a marker already names.
    pub already: usize,
    /// Matching dead letters of routes the I/O does not know, per route.
    pub unknown_routes: BTreeMap<String, usize>,
    /// The plan is incomplete: `stop` was set while it was read.
    pub interrupted: bool,
}

impl Plan {
    /// How many dead letters it replays.
    pub fn total(&self) -> usize {
        self.dlqs.iter().map(|(_, p)| p.len()).sum()
    }
}

/// Pass 1: reads `dlqs` and plans the replay of each pending dead letter `filter` accepts, to
/// `to` or else its original topic. Stops after the DLQ being read once `stop` is set.
pub async fn plan<Io: ReplayIo>(
    io: &mut Io,
    dlqs: &[DlqRef],
    filter: impl Fn(&DeadLetter) -> bool,
    to: Option<&str>,
    stop: &AtomicBool,
) -> Result<Plan, ReplayError> {
    let mut plan = Plan::default();
    for dlq in dlqs {
        let contents = read(io, dlq, &filter, |_| false).await?;
        let mut planned = Vec::new();
        for d in contents.dead {
            if contents.replayed.contains(&d.position) {
                plan.already += 1;
            } else if io.source_broker(&d.route).is_none() {
                *plan.unknown_routes.entry(d.route).or_default() += 1;
            } else {
                planned.push(Planned {
                    to: to.map_or_else(|| d.topic.clone(), str::to_owned),
                    position: d.position,
                    shown: d.shown,
                    route: d.route,
                });
            }
        }
        if !planned.is_empty() {
            plan.dlqs.push((dlq.clone(), planned));
        }
        if stop.load(Ordering::SeqCst) {
            plan.interrupted = true;
            break;
        }
    }
    Ok(plan)
}

/// How [`replay`] publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Copies per batch (published, acknowledged, then marked together); at least 1.
    pub batch: usize,
    /// At most this many copies per second.
    pub rate: Option<u32>,
}

/// What [`replay`] reports as it goes.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplayEvent<'a> {
    /// A batch of `n` copies was published and marked.
    Batch {
        /// Copies in it.
        n: usize,
    },
    /// `n` planned dead letters of `dlq` were gone on the second read (removed by retention).
    NotFound {
        /// The DLQ.
        dlq: &'a DlqRef,
        /// How many.
        n: usize,
    },
}

/// What pass 2 did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Per DLQ, the positions whose copies were published and marked.
    pub published: Vec<(DlqRef, Vec<String>)>,
    /// How many, over all DLQs.
    pub replayed: usize,
    /// `stop` ended it before every planned letter was replayed.
    pub interrupted: bool,
}

/// Pass 2: replays what `plan` planned, batch by batch (see the module doc), calling `on` after
/// each batch. Once `stop` is set it stops before the next batch.
pub async fn replay<Io: ReplayIo>(
    io: &mut Io,
    plan: Plan,
    settings: Settings,
    stop: &AtomicBool,
    mut on: impl FnMut(ReplayEvent<'_>),
) -> Result<Replayed, ReplayError> {
    let started = Instant::now();
    let batch_size = settings.batch.max(1);
    let mut done = Replayed::default();
    for (dlq, planned) in plan.dlqs {
        let mut todo: HashMap<String, Planned> = planned
            .into_iter()
            .map(|p| (p.position.clone(), p))
            .collect();
        // Opened before anything is published: a DLQ that cannot take markers fails first.
        let marks = io
            .marker_sink(&dlq)
            .await
            .map_err(|source| ReplayError::MarkerSink {
                dlq: dlq.clone(),
                source,
            })?;
        let read_error = |source| ReplayError::Read {
            dlq: dlq.clone(),
            source,
        };
        let mut scan = io.scan(&dlq).await.map_err(read_error)?;
        let mut batch: Vec<(OutRecord, String)> = Vec::new();
        let mut batch_route = String::new();
        while !todo.is_empty() {
            let Some(records) = io.next_batch(&mut scan).await.map_err(read_error)? else {
                break;
            };
            for record in records {
                let Some(plan) = todo.remove(&record.position()) else {
                    continue;
                };
                let Some(dead) = DeadLetter::parse(record) else {
                    continue;
                };
                if (!batch.is_empty() && plan.route != batch_route) || batch.len() >= batch_size {
                    if stop.load(Ordering::SeqCst) {
                        done.interrupted = true;
                        return Ok(done);
                    }
                    let positions = flush(io, &dlq, &marks, &batch_route, &mut batch).await?;
                    done.add(&dlq, positions, &mut on);
                    pace(settings.rate, done.replayed, started).await;
                }
                batch_route.clone_from(&plan.route);
                batch.push((replay_record(&dead, &plan.to), plan.position));
            }
        }
        if !batch.is_empty() {
            if stop.load(Ordering::SeqCst) {
                done.interrupted = true;
                return Ok(done);
            }
            let positions = flush(io, &dlq, &marks, &batch_route, &mut batch).await?;
            done.add(&dlq, positions, &mut on);
        }
        if !todo.is_empty() {
            on(ReplayEvent::NotFound {
                dlq: &dlq,
                n: todo.len(),
            });
        }
    }
    Ok(done)
}

impl Replayed {
    /// Counts a flushed batch of `dlq`.
    fn add(&mut self, dlq: &DlqRef, positions: Vec<String>, on: &mut impl FnMut(ReplayEvent<'_>)) {
        let n = positions.len();
        self.replayed += n;
        match self.published.iter_mut().find(|(d, _)| d == dlq) {
            Some((_, p)) => p.extend(positions),
            None => self.published.push((dlq.clone(), positions)),
        }
        on(ReplayEvent::Batch { n });
    }
}

/// Sleeps until `replayed` copies since `started` fit the rate.
async fn pace(rate: Option<u32>, replayed: usize, started: Instant) {
    if let Some(rate) = rate {
        let due = Duration::from_secs_f64(replayed as f64 / f64::from(rate.max(1)));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Publishes one batch of `route`'s copies to the broker feeding the route, then marks it
/// replayed in `dlq`; returns the positions it replayed.
async fn flush<Io: ReplayIo>(
    io: &mut Io,
    dlq: &DlqRef,
    marks: &Io::Sink,
    route: &str,
    batch: &mut Vec<(OutRecord, String)>,
) -> Result<Vec<String>, ReplayError> {
    let Some(broker) = io.source_broker(route) else {
        return Err(ReplayError::UnknownRoute {
            route: route.to_owned(),
        });
    };
    let feeder = io
        .feeder(route)
        .await
        .map_err(|source| ReplayError::Feeder {
            broker: broker.clone(),
            source,
        })?;
    let (records, positions): (Vec<OutRecord>, Vec<String>) =
        std::mem::take(batch).into_iter().unzip();
    let n = records.len();
    let mut topics: Vec<&str> = records.iter().map(|o| o.topic.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    let to = format!("{broker}:{}", topics.join(","));
    io.publish(&feeder, records)
        .await
        .map_err(|source| ReplayError::Publish {
            n,
            to: to.clone(),
            source,
        })?;
    io.publish(marks, vec![marker(&dlq.topic, &positions, &to, now_ms())])
        .await
        .map_err(|source| ReplayError::Mark {
            n,
            dlq: dlq.clone(),
            source,
        })?;
    Ok(positions)
}

/// Pass 3: reads the DLQs of `published` until each published position has a result, `wait`
/// has passed or `stop` is set, calling `waiting(found, total, left)` every 2 s while it
/// waits; returns the results found.
pub async fn await_results<Io: ReplayIo>(
    io: &mut Io,
    published: &[(DlqRef, Vec<String>)],
    wait: Duration,
    stop: &AtomicBool,
    mut waiting: impl FnMut(usize, usize, Duration),
) -> Result<HashMap<String, ReplayResult>, ReplayError> {
    let total: usize = published.iter().map(|(_, p)| p.len()).sum();
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut last_said = Instant::now();
    let mut results = HashMap::new();
    loop {
        for (dlq, positions) in published {
            let contents = read(io, dlq, |_| true, |_| false).await?;
            for p in positions {
                if let Some(r) = contents.results.get(p) {
                    results.insert(p.clone(), r.clone());
                }
            }
        }
        if results.len() == total || stop.load(Ordering::SeqCst) {
            return Ok(results);
        }
        let remaining = wait.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Ok(results);
        }
        if last_said.elapsed() >= Duration::from_secs(2) {
            last_said = Instant::now();
            waiting(results.len(), total, remaining);
        }
        tokio::time::sleep(pause.min(remaining)).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::dlq::{Failure, REPLAYED_FROM_HEADER, ReplayOutcome, envelope, result_record};
    use crate::message::LOCKGATE_ID_HEADER;
    use crate::policy::backoff::GiveUpReason;

    /// Brokers in memory: topics named `<broker>:<topic>`, each record at offset = its index.
    #[derive(Default)]
    struct Memory {
        topics: HashMap<String, Vec<Record>>,
        /// Route → the broker its source reads.
        routes: HashMap<String, String>,
        /// Publishes to these sinks fail (a broker that is down).
        failing: HashSet<String>,
        /// Records appended to a topic when it is opened for the n-th time (a route writing
        /// its replay results while the replay waits).
        later: Vec<(usize, OutRecord, String)>,
        scans: usize,
    }

    const DLQ: &str = "orders.dlq";

    fn dlq() -> DlqRef {
        DlqRef {
            broker: "local".into(),
            topic: DLQ.into(),
        }
    }

    impl Memory {
        fn new() -> Self {
            let mut m = Self::default();
            m.routes.insert("a".into(), "ka".into());
            m.routes.insert("b".into(), "kb".into());
            m
        }

        fn append(&mut self, broker: &str, records: Vec<OutRecord>) {
            for r in records {
                let topic = self
                    .topics
                    .entry(format!("{broker}:{}", r.topic))
                    .or_default();
                topic.push(Record {
                    topic: r.topic,
                    partition: Some(0),
                    offset: Some(topic.len() as u64),
                    key: r.key,
                    headers: r.headers,
                    payload: r.payload,
                    timestamp_ms: None,
                    reply_to: None,
                    delivery: None,
                });
            }
        }

        /// Dead-letters one message of `route` per entry, with the error kind given.
        fn dead_letters(&mut self, letters: &[(&str, &str)]) {
            for (i, (route, kind)) in letters.iter().enumerate() {
                let original = Record {
                    topic: "orders".into(),
                    partition: Some(0),
                    offset: Some(i as u64),
                    key: Some(format!("k{i}").into_bytes()),
                    headers: vec![("trace".into(), b"t".to_vec())],
                    payload: format!("m{i}").into_bytes(),
                    timestamp_ms: None,
                    reply_to: None,
                    delivery: None,
                };
                let failure = Failure {
                    route: (*route).into(),
                    handler: "h".into(),
                    module_hash: "00".into(),
                    message_id: format!("id{i}"),
                    error_kind: (*kind).into(),
                    reason: "boom".into(),
                    gave_up: GiveUpReason::Rejected,
                    attempts: 1,
                    first_failure_ms: 1,
                    last_failure_ms: 1,
                };
                self.append("local", vec![envelope(&original, &failure, DLQ)]);
            }
        }

        fn topic(&self, name: &str) -> &[Record] {
            self.topics.get(name).map_or(&[], Vec::as_slice)
        }

        /// The positions the markers of the DLQ name, marker by marker.
        fn markers(&self) -> Vec<Vec<String>> {
            self.topic(&format!("local:{DLQ}"))
                .iter()
                .filter_map(marker_positions)
                .collect()
        }

        /// The `lockgate-replayed-from` of each copy on `topic`.
        fn copies(&self, topic: &str) -> Vec<String> {
            self.topic(topic)
                .iter()
                .map(|r| String::from_utf8(r.header(REPLAYED_FROM_HEADER).unwrap().to_vec()))
                .map(Result::unwrap)
                .collect()
        }
    }

    fn pos(n: u64) -> String {
        format!("{DLQ}/0/{n}")
    }

    impl ReplayIo for Memory {
        /// The topic and the next offset to read.
        type Scan = (String, usize);
        /// The broker.
        type Sink = String;

        async fn scan(&mut self, dlq: &DlqRef) -> Result<(String, usize), IoError> {
            self.scans += 1;
            let due: Vec<_> = self
                .later
                .iter()
                .filter(|(n, _, _)| *n == self.scans)
                .map(|(_, r, b)| (b.clone(), r.clone()))
                .collect();
            for (broker, r) in due {
                self.append(&broker, vec![r]);
            }
            Ok((dlq.to_string(), 0))
        }

        async fn next_batch(
            &mut self,
            scan: &mut (String, usize),
        ) -> Result<Option<Vec<Record>>, IoError> {
            // Two at a time, so batches of the replay straddle reads.
            let records = self.topic(&scan.0);
            if scan.1 >= records.len() {
                return Ok(None);
            }
            let end = (scan.1 + 2).min(records.len());
            let batch = records[scan.1..end].to_vec();
            scan.1 = end;
            Ok(Some(batch))
        }

        async fn marker_sink(&mut self, dlq: &DlqRef) -> Result<String, IoError> {
            Ok(dlq.broker.clone())
        }

        async fn feeder(&mut self, route: &str) -> Result<String, IoError> {
            Ok(self.routes[route].clone())
        }

        async fn publish(&mut self, sink: &String, records: Vec<OutRecord>) -> Result<(), IoError> {
            if self.failing.contains(sink) {
                return Err(format!("{sink} is down").into());
            }
            self.append(sink, records);
            Ok(())
        }

        fn source_broker(&self, route: &str) -> Option<String> {
            self.routes.get(route).cloned()
        }
    }

    fn settings(batch: usize) -> Settings {
        Settings { batch, rate: None }
    }

    async fn plan_all(io: &mut Memory) -> Plan {
        plan(io, &[dlq()], |_| true, None, &AtomicBool::new(false))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn plans_what_is_pending_and_counts_the_replayed_and_unknown_routes() {
        let mut io = Memory::new();
        io.dead_letters(&[
            ("a", "reject"),
            ("a", "reject"),
            ("b", "reject"),
            ("gone", "reject"),
            ("a", "trapped"),
        ]);
        io.append("local", vec![marker(DLQ, &[pos(0)], "ka:orders", 1)]);
        let stop = AtomicBool::new(false);
        let only_rejects = |d: &DeadLetter| d.error_kind == "reject";
        let p = plan(&mut io, &[dlq()], only_rejects, None, &stop)
            .await
            .unwrap();
        let planned = |n, route: &str, to: &str| Planned {
            position: pos(n),
            shown: pos(n),
            route: route.into(),
            to: to.into(),
        };
        assert_eq!(
            p,
            Plan {
                dlqs: vec![(
                    dlq(),
                    vec![planned(1, "a", "orders"), planned(2, "b", "orders")]
                )],
                already: 1,
                unknown_routes: BTreeMap::from([("gone".into(), 1)]),
                interrupted: false,
            }
        );
        let p = plan(&mut io, &[dlq()], only_rejects, Some("fixed"), &stop)
            .await
            .unwrap();
        assert_eq!(p.dlqs[0].1[0], planned(1, "a", "fixed"));
        stop.store(true, Ordering::SeqCst);
        let p = plan(&mut io, &[dlq()], only_rejects, None, &stop)
            .await
            .unwrap();
        assert!(p.interrupted);
    }

    #[tokio::test]
    async fn replays_in_batches_of_one_route_and_marks_each_after_its_copies() {
        let mut io = Memory::new();
        io.dead_letters(&[
            ("a", "reject"),
            ("a", "reject"),
            ("a", "reject"),
            ("b", "reject"),
            ("a", "reject"),
        ]);
        let p = plan_all(&mut io).await;
        let mut batches = Vec::new();
        let done = replay(&mut io, p, settings(2), &AtomicBool::new(false), |e| {
            batches.push(match e {
                ReplayEvent::Batch { n } => n,
                ReplayEvent::NotFound { .. } => panic!("{e:?}"),
            });
        })
        .await
        .unwrap();
        assert_eq!(batches, [2, 1, 1, 1]);
        assert_eq!(done.replayed, 5);
        assert!(!done.interrupted);
        assert_eq!(
            done.published,
            vec![(dlq(), (0..5).map(pos).collect::<Vec<_>>())]
        );
        // Each route's copies went to its source broker, in DLQ order, one marker a batch.
        assert_eq!(io.copies("ka:orders"), [pos(0), pos(1), pos(2), pos(4)]);
        assert_eq!(io.copies("kb:orders"), [pos(3)]);
        assert_eq!(
            io.markers(),
            [
                vec![pos(0), pos(1)],
                vec![pos(2)],
                vec![pos(3)],
                vec![pos(4)]
            ]
        );
        let copy = &io.topic("ka:orders")[0];
        assert_eq!(copy.payload, b"m0");
        assert_eq!(copy.key.as_deref(), Some(&b"k0"[..]));
        assert_eq!(
            copy.header(LOCKGATE_ID_HEADER),
            Some(format!("a:replay:{}", pos(0)).as_bytes())
        );
        // Nothing is pending any more.
        let again = plan_all(&mut io).await;
        assert_eq!((again.total(), again.already), (0, 5));
    }

    #[tokio::test]
    async fn a_stop_ends_between_batches_and_the_next_run_replays_the_rest_once() {
        let mut io = Memory::new();
        io.dead_letters(&[("a", "reject"); 5]);
        let stop = AtomicBool::new(false);
        let p = plan_all(&mut io).await;
        let done = replay(&mut io, p, settings(2), &stop, |_| {
            stop.store(true, Ordering::SeqCst)
        })
        .await
        .unwrap();
        assert!(done.interrupted);
        assert_eq!(done.replayed, 2);
        assert_eq!(io.copies("ka:orders"), [pos(0), pos(1)]);
        let p = plan_all(&mut io).await;
        assert_eq!((p.total(), p.already), (3, 2));
        let done = replay(&mut io, p, settings(2), &AtomicBool::new(false), |_| {})
            .await
            .unwrap();
        assert_eq!(done.replayed, 3);
        assert_eq!(io.copies("ka:orders"), (0..5).map(pos).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_batch_is_marked_only_once_published_and_replayed_again_if_not_marked() {
        let mut io = Memory::new();
        io.dead_letters(&[("a", "reject"); 3]);
        // The route's broker is down: nothing is marked.
        io.failing.insert("ka".into());
        let p = plan_all(&mut io).await;
        let e = replay(&mut io, p, settings(2), &AtomicBool::new(false), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, ReplayError::Publish { n: 2, .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "publishing 2 replayed messages to ka:orders failed (nothing of this batch was marked; run again)"
        );
        assert!(io.markers().is_empty());
        // The DLQ cannot take markers: it fails before anything is published.
        io.failing.clear();
        io.failing.insert("local".into());
        let p = plan_all(&mut io).await;
        let e = replay(&mut io, p, settings(2), &AtomicBool::new(false), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, ReplayError::Mark { n: 2, .. }), "{e:?}");
        assert_eq!(io.copies("ka:orders"), [pos(0), pos(1)]);
        // The next run publishes that batch again, with the same ids (a deduplicating source
        // drops them), and the rest.
        io.failing.clear();
        let p = plan_all(&mut io).await;
        assert_eq!(p.total(), 3);
        replay(&mut io, p, settings(2), &AtomicBool::new(false), |_| {})
            .await
            .unwrap();
        let ids: Vec<&[u8]> = io
            .topic("ka:orders")
            .iter()
            .map(|r| r.header(LOCKGATE_ID_HEADER).unwrap())
            .collect();
        assert_eq!(ids[0], ids[2]);
        assert_eq!(ids[1], ids[3]);
        assert_eq!(io.markers(), [vec![pos(0), pos(1)], vec![pos(2)]]);
    }

    #[tokio::test]
    async fn letters_gone_on_the_second_read_are_reported() {
        let mut io = Memory::new();
        io.dead_letters(&[("a", "reject"); 3]);
        let p = plan_all(&mut io).await;
        // Retention removed the last letter between the passes.
        io.topics.get_mut(&format!("local:{DLQ}")).unwrap().pop();
        let mut gone = Vec::new();
        let done = replay(&mut io, p, settings(10), &AtomicBool::new(false), |e| {
            if let ReplayEvent::NotFound { dlq, n } = e {
                gone.push((dlq.clone(), n));
            }
        })
        .await
        .unwrap();
        assert_eq!(done.replayed, 2);
        assert_eq!(gone, [(dlq(), 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_spaces_the_batches() {
        let mut io = Memory::new();
        io.dead_letters(&[("a", "reject"); 10]);
        let p = plan_all(&mut io).await;
        let started = Instant::now();
        let limited = Settings {
            batch: 1,
            rate: Some(5),
        };
        replay(&mut io, p, limited, &AtomicBool::new(false), |_| {})
            .await
            .unwrap();
        // 10 copies at 5 a second: the tenth leaves 1.8 s after the first.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(io.copies("ka:orders").len(), 10);
    }

    #[tokio::test]
    async fn find_reads_a_typed_position_back_to_its_letter_with_its_payload() {
        let mut io = Memory::new();
        io.dead_letters(&[("a", "reject"), ("b", "trapped")]);
        let (d, c) = find(&mut io, &dlq(), &pos(1)).await.unwrap().unwrap();
        assert_eq!(
            (d.position.as_str(), d.route.as_str()),
            (pos(1).as_str(), "b")
        );
        assert_eq!(d.shown, pos(1), "offsets print as they are");
        assert_eq!(d.record.payload, b"m1");
        assert_eq!(c.numbering, Numbering::Offsets);
        assert_eq!(
            find(&mut io, &dlq(), &pos(7)).await.unwrap().unwrap_err(),
            PositionError::Unknown { typed: pos(7) }
        );
        assert!(matches!(
            find(&mut io, &dlq(), "other/0/1").await.unwrap(),
            Err(PositionError::Malformed { .. })
        ));
    }

    fn result(n: u64, outcome: ReplayOutcome) -> OutRecord {
        result_record(
            DLQ,
            &ReplayResult {
                position: pos(n),
                outcome,
                route: "a".into(),
                detail: String::new(),
                at_ms: 1,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_the_result_of_each_published_letter_until_the_wait_is_over() {
        let mut io = Memory::new();
        io.dead_letters(&[("a", "reject"); 3]);
        io.append(
            "local",
            vec![
                result(0, ReplayOutcome::Handled),
                // A copy delivered twice: handled once, then skipped; the handling stands.
                result(0, ReplayOutcome::Skipped),
                result(1, ReplayOutcome::DeadLettered),
            ],
        );
        // The third result comes while the replay waits (on the fourth read).
        io.later
            .push((4, result(2, ReplayOutcome::Handled), "local".into()));
        let published = vec![(dlq(), (0..3).map(pos).collect::<Vec<_>>())];
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let results = await_results(
            &mut io,
            &published,
            Duration::from_secs(30),
            &stop,
            |_, _, _| {},
        )
        .await
        .unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!(results[&pos(0)].outcome, ReplayOutcome::Handled);
        assert_eq!(results[&pos(1)].outcome, ReplayOutcome::DeadLettered);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );

        // A letter whose result never comes: the wait ends it, saying so every 2 s.
        let published = vec![(dlq(), vec![pos(0), pos(7)])];
        let mut said = Vec::new();
        let started = Instant::now();
        let results = await_results(
            &mut io,
            &published,
            Duration::from_secs(5),
            &stop,
            |found, total, _| said.push((found, total)),
        )
        .await
        .unwrap();
        assert_eq!(results.len(), 1);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "{waited:?}"
        );
        assert_eq!(said, [(1, 2), (1, 2)]);
    }
}
