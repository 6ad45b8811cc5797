//! The outbox relay: a [`Source`] that reads a PostgreSQL store's `outbox` table.
//!
//! Rows are taken in id order, in batches, by *leasing* them: one short statement locks the
//! oldest free unpublished rows (`FOR UPDATE SKIP LOCKED`, so relays never wait on each other)
//! and stamps them with this relay's name and a lease end. No transaction stays open while a row
//! is published. A row is *acked* once its publish was acknowledged; acked rows are marked
//! `published_at` in batches in the background. A relay that dies loses its leases when they
//! run out, and another relay publishes those rows again (same `lockgate-id`).
//!
//! Order per key: a row is leased only if no earlier unpublished row with the same key is held
//! elsewhere (leased by another relay, or locked by one mid-lease). Rows of one key therefore
//! go out in id order even with several relays, while different keys spread over them. Rows
//! without a key carry no order.
//!
//! Reads are woken by `LISTEN "<schema>.outbox"` (the table's insert trigger notifies) and
//! fall back to polling every `poll_ms`. Leases of held rows are renewed every third of the
//! lease. A cleanup deletes published rows older than `retention_ms`, in bounded batches; it
//! never touches an unpublished row.
//!
//! The relay is ready ([`Source::health`]) once a lease statement went through; a failed one is
//! classified on a connection of its own (a refused login or a schema the user may not create
//! is a misconfiguration, retried slowly; a server that is away is retried on a jittered
//! backoff).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::broker::{
    Ack, AckHandle, AckKind, BrokerError, Delivery, LAG_REFRESH, Lag, LagGauge, Sink, Source,
};

use futures_util::future::BoxFuture;

use crate::config::OutboxSource as Settings;
use crate::health::{Backoff, HealthReporter, HealthWatch};
use crate::message::{LOCKGATE_ID_HEADER, OutRecord, Record};

use crate::state::{PostgresStore, StateError};
use tokio_postgres::types::Type;

/// Published rows one cleanup statement deletes at most.
const CLEANUP_BATCH: i64 = 5_000;
/// Longest wait between attempts of the background tasks after the database failed.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A leased row: its id and the record it is delivered as.
type Row = (i64, Record);

/// Statements, with the schema filled in once.
struct Sql {
    lease: String,
    renew: String,
    mark: String,
    release: String,
    cleanup: String,
    backlog: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        Self {
            // A candidate is blocked by an earlier unpublished row of its key that is neither
            // a candidate itself nor held by this relay: that row is (or is about to be)
            // another relay's, and must go out first.
            lease: format!(
                "WITH cand AS (
                    SELECT id, key FROM {s}.outbox
                    WHERE published_at IS NULL
                      AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
                    ORDER BY id LIMIT $2
                    FOR UPDATE SKIP LOCKED
                 ), ok AS (
                    SELECT c.id FROM cand c
                    WHERE c.key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {s}.outbox e
                        WHERE e.key = c.key AND e.id < c.id AND e.published_at IS NULL
                          AND NOT EXISTS (SELECT 1 FROM cand x WHERE x.id = e.id)
                          AND NOT (e.claimed_by IS NOT DISTINCT FROM $1
                                   AND e.claimed_until >= clock_timestamp())
                    )
                 )
                 UPDATE {s}.outbox o
                 SET claimed_by = $1, claimed_until = clock_timestamp() + make_interval(secs => $3)
                 FROM ok WHERE o.id = ok.id
                 RETURNING o.id, o.topic, o.key, o.header_names, o.header_values, o.payload,
                           o.lockgate_id, (extract(epoch from o.created_at) * 1000)::bigint"
            ),
            // `renew`, `mark` and `release` find rows by id in a table that may grow from
            // empty to a large backlog: they are planned at each call
            // (`PostgresStore::execute_planned`), never from a cached plan.
            renew: format!(
                "UPDATE {s}.outbox
                 SET claimed_until = clock_timestamp() + make_interval(secs => $3)
                 WHERE id = ANY($2) AND claimed_by = $1 AND published_at IS NULL"
            ),
            mark: format!(
                "UPDATE {s}.outbox
                 SET published_at = clock_timestamp(), claimed_by = NULL, claimed_until = NULL
                 WHERE id = ANY($1) AND published_at IS NULL"
            ),
            release: format!(
                "UPDATE {s}.outbox SET claimed_by = NULL, claimed_until = NULL
                 WHERE id = ANY($2) AND claimed_by = $1 AND published_at IS NULL"
            ),
            cleanup: format!(
                "DELETE FROM {s}.outbox WHERE id IN (
                    SELECT id FROM {s}.outbox
                    WHERE published_at < clock_timestamp() - make_interval(secs => $1)
                    LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
            backlog: format!("SELECT count(*) FROM {s}.outbox WHERE published_at IS NULL"),
        }
    }
}

/// Rows between lease and mark, shared with the acks and the background tasks.
#[derive(Default)]
struct Held {
    /// Leased by this relay and not yet marked published (their leases are renewed).
    rows: Mutex<HashSet<i64>>,
    /// Acked rows waiting to be marked published.
    acked: Mutex<Vec<i64>>,
    /// `acked` grew.
    wake_marker: Notify,
}

impl Held {
    fn rows(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn acked(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A relay of one PostgreSQL store's outbox table (see the module docs).
pub struct OutboxRelay {
    store: PostgresStore,
    settings: Settings,
    owner: String,
    sql: Arc<Sql>,
    buffer: VecDeque<Row>,
    /// The lease statement in flight: kept across a cancelled `next`, so rows leased by a
    /// statement whose caller went away are still delivered.
    fetch: Option<JoinHandle<Result<Vec<Row>, StateError>>>,
    held: Arc<Held>,
    wake: Arc<Notify>,
    lag: LagGauge,
    tasks: Vec<JoinHandle<()>>,
    backoff: Backoff,
    health: HealthReporter,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("schema", &self.store.schema())
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Drop for OutboxRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(f) = &self.fetch {
            f.abort();
        }
    }
}

impl OutboxRelay {
    /// A relay of `store`'s outbox table. Starts its listener, lease renewal, marker and
    /// cleanup tasks (must be called inside a tokio runtime).
    pub fn new(store: PostgresStore, settings: Settings) -> Self {
        let owner = crate::message::new_owner();
        let sql = Arc::new(Sql::new(store.schema()));
        let held = Arc::new(Held::default());
        let wake = Arc::new(Notify::new());
        let lag = LagGauge::default();
        let tasks = vec![
            tokio::spawn(listen(store.clone(), wake.clone())),
            tokio::spawn(renew(
                store.clone(),
                sql.clone(),
                owner.clone(),
                settings.lease,
                held.clone(),
                lag.clone(),
            )),
            tokio::spawn(mark(store.clone(), sql.clone(), held.clone())),
            tokio::spawn(cleanup(
                store.clone(),
                sql.clone(),
                settings.retention,
                settings.cleanup_every,
            )),
        ];
        Self {
            store,
            settings,
            owner,
            sql,
            buffer: VecDeque::new(),
            fetch: None,
            held,
            wake,
            lag,
            tasks,
            backoff: Backoff::new(),
            health: HealthReporter::new(),
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn lease(
    store: PostgresStore,
    sql: Arc<Sql>,
    owner: String,
    batch: i64,
    lease: Duration,
) -> Result<Vec<Row>, StateError> {
    let rows = store
        .query(
            "lease outbox rows",
            &sql.lease,
            &[&owner, &batch, &secs(lease)],
        )
        .await?;
    let schema = store.schema().to_owned();
    let mut out: Vec<Row> = rows
        .into_iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let names: Vec<String> = r.get(3);
            let values: Vec<Vec<u8>> = r.get(4);
            let mut headers: Vec<(String, Vec<u8>)> = names.into_iter().zip(values).collect();
            let lockgate_id: Option<String> = r.get(6);
            // A row written by SQL without an id gets one from its place in the table.
            if lockgate_id.is_some() || !headers.iter().any(|(n, _)| n == LOCKGATE_ID_HEADER) {
                let id = lockgate_id.unwrap_or_else(|| format!("outbox:{schema}:{id}"));
                headers.retain(|(n, _)| n != LOCKGATE_ID_HEADER);
                headers.push((LOCKGATE_ID_HEADER.to_owned(), id.into_bytes()));
            }
            let created: i64 = r.get(7);
            let record = Record {
                topic: r.get(1),
                partition: None,
                offset: Some(id.unsigned_abs()),
                key: r.get(2),
                headers,
                payload: r.get(5),
                timestamp_ms: Some(created.unsigned_abs()),
                reply_to: None,
                delivery: None,
            };
            (id, record)
        })
        .collect();
    // UPDATE ... RETURNING does not promise an order.
    out.sort_unstable_by_key(|(id, _)| *id);
    Ok(out)
}

impl Source for OutboxRelay {
    fn describe(&self) -> String {
        format!("postgres outbox {}.outbox", self.store.schema())
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
                if let Some((id, record)) = self.buffer.pop_front() {
                    return Ok(Delivery {
                        record,
                        ack: AckHandle::new(RowAck {
                            id,
                            held: self.held.clone(),
                        }),
                        previous_attempts: 0,
                    });
                }
                let fetch = self.fetch.get_or_insert_with(|| {
                    tokio::spawn(lease(
                        self.store.clone(),
                        self.sql.clone(),
                        self.owner.clone(),
                        i64::from(self.settings.batch),
                        self.settings.lease,
                    ))
                });
                let result = fetch.await;
                self.fetch = None;
                match result {
                    Ok(Ok(rows)) if !rows.is_empty() => {
                        self.backoff.reset();
                        self.health.ready();
                        let mut held = self.held.rows();
                        // A row this relay already holds (its lease ran out before a renewal)
                        // is already on its way.
                        for (id, record) in rows {
                            if held.insert(id) {
                                self.buffer.push_back((id, record));
                            }
                        }
                    }
                    Ok(Ok(_)) => {
                        self.backoff.reset();
                        self.health.ready();
                        tokio::select! {
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(self.settings.poll) => {}
                        }
                    }
                    Ok(Err(e)) => self.failed(&e.to_string()).await,
                    Err(e) => self.failed(&e.to_string()).await,
                }
            }
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let unavailable = |e: StateError| BrokerError::Unavailable(e.to_string());
            let acked = std::mem::take(&mut *self.held.acked());
            if !acked.is_empty() {
                if let Err(e) = self
                    .store
                    .execute_planned(
                        "mark outbox rows published",
                        &self.sql.mark,
                        &[(&acked, Type::INT8_ARRAY)],
                    )
                    .await
                {
                    self.held.acked().extend(acked);
                    return Err(unavailable(e));
                }
                let mut held = self.held.rows();
                for id in &acked {
                    held.remove(id);
                }
            }
            // What is held and not acked goes back now, not when its lease runs out.
            self.buffer.clear();
            let rest: Vec<i64> = self.held.rows().drain().collect();
            if !rest.is_empty() {
                self.store
                    .execute_planned(
                        "release outbox rows",
                        &self.sql.release,
                        &[(&self.owner, Type::TEXT), (&rest, Type::INT8_ARRAY)],
                    )
                    .await
                    .map_err(unavailable)?;
            }
            Ok(())
        })
    }
}

impl OutboxRelay {
    /// Reports why the outbox table cannot be read (the route logs it) and waits before the
    /// next attempt.
    async fn failed(&mut self, error: &str) {
        tracing::debug!(schema = %self.store.schema(), error, "Cannot read the outbox table; trying again");
        let failure = crate::state::probe::classify_postgres(
            self.store.pg_config(),
            self.store.schema(),
            format!("outbox {}.outbox: {error}", self.store.schema()),
        )
        .await;
        self.health.retry_after(&mut self.backoff, failure).await;
    }
}

/// Acks one row: it is marked published with the next batch.
struct RowAck {
    id: i64,
    held: Arc<Held>,
}

impl Ack for RowAck {
    fn ack(self: Box<Self>, _kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        // A dead-lettered row is finished too: it is not relayed again.
        self.held.acked().push(self.id);
        self.held.wake_marker.notify_one();
        Box::pin(async { Ok(()) })
    }
}

/// Wakes `wake` on every notification of the outbox's insert trigger; reconnects when the
/// connection drops. Polling covers the gaps.
async fn listen(store: PostgresStore, wake: Arc<Notify>) {
    let channel = format!("{}.outbox", store.schema());
    loop {
        match store.pg_config().connect(tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if matches!(m, tokio_postgres::AsyncMessage::Notification(_)) {
                            let _ = tx.send(());
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                    Ok(()) => {
                        // Rows may have come while nobody listened.
                        wake.notify_one();
                        while rx.recv().await.is_some() {
                            wake.notify_one();
                        }
                    }
                    Err(e) => {
                        tracing::debug!(channel, error = %e, "LISTEN failed; polling until it works");
                    }
                }
                driver.abort();
            }
            Err(e) => {
                tracing::debug!(channel, error = %e, "Cannot open the LISTEN connection; polling until it works");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Renews the leases of held rows every third of the lease, and refreshes the backlog gauge.
async fn renew(
    store: PostgresStore,
    sql: Arc<Sql>,
    owner: String,
    lease: Duration,
    held: Arc<Held>,
    lag: LagGauge,
) {
    let every = (lease / 3).max(Duration::from_millis(10));
    let mut last_lag: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        let ids: Vec<i64> = held.rows().iter().copied().collect();
        if !ids.is_empty()
            && let Err(e) = store
                .execute_planned(
                    "renew outbox leases",
                    &sql.renew,
                    &[
                        (&owner, Type::TEXT),
                        (&ids, Type::INT8_ARRAY),
                        (&secs(lease), Type::FLOAT8),
                    ],
                )
                .await
        {
            tracing::warn!(error = %e, rows = ids.len(), "Cannot renew the leases of outbox rows being relayed; another relay may take them over");
        }
        if last_lag.is_none_or(|t| t.elapsed() >= LAG_REFRESH) {
            last_lag = Some(tokio::time::Instant::now());
            if let Ok(rows) = store.query("outbox backlog", &sql.backlog, &[]).await
                && let Some(r) = rows.first()
            {
                lag.set(vec![Lag {
                    topic: format!("{}.outbox", store.schema()),
                    partition: None,
                    messages: r.get::<_, i64>(0).unsigned_abs(),
                }]);
            }
        }
    }
}

/// Marks acked rows published, in batches (whatever was acked while the previous batch went).
async fn mark(store: PostgresStore, sql: Arc<Sql>, held: Arc<Held>) {
    let mut backoff = Duration::ZERO;
    loop {
        held.wake_marker.notified().await;
        loop {
            let ids = std::mem::take(&mut *held.acked());
            if ids.is_empty() {
                break;
            }
            match store
                .execute_planned(
                    "mark outbox rows published",
                    &sql.mark,
                    &[(&ids, Type::INT8_ARRAY)],
                )
                .await
            {
                Ok(_) => {
                    backoff = Duration::ZERO;
                    let mut rows = held.rows();
                    for id in &ids {
                        rows.remove(id);
                    }
                }
                Err(e) => {
                    // Kept (and their leases renewed) until the mark goes through.
                    held.acked().extend(ids);
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(100))
                        .min(MAX_BACKOFF);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Cannot mark relayed outbox rows published; trying again");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

async fn cleanup_once(
    store: &PostgresStore,
    sql: &Sql,
    retention: Duration,
) -> Result<u64, StateError> {
    let mut total = 0;
    loop {
        let n = store
            .execute(
                "clean up the outbox",
                &sql.cleanup,
                &[&secs(retention), &CLEANUP_BATCH],
            )
            .await?;
        total += n;
        if n < CLEANUP_BATCH.unsigned_abs() {
            return Ok(total);
        }
    }
}

/// Deletes published rows older than `retention` every `every`.
async fn cleanup(store: PostgresStore, sql: Arc<Sql>, retention: Duration, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match cleanup_once(&store, &sql, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "Deleted published outbox rows past retention"),
            Err(e) => {
                tracing::warn!(error = %e, "Cleaning up the outbox failed; trying again later");
            }
        }
    }
}

/// Writes records as rows of a PostgreSQL store's outbox table, all of a batch in one
/// transaction (a row whose `lockgate-id` is already there is not written again): where
/// `lockgate dlq replay` sends dead letters back to when their route relays an outbox.
#[derive(Clone, Debug)]
pub struct OutboxWriter {
    store: PostgresStore,
}

impl OutboxWriter {
    /// A writer into `store`'s outbox table.
    pub fn new(store: PostgresStore) -> Self {
        Self { store }
    }

    async fn write(&self, records: Vec<OutRecord>) -> Result<(), StateError> {
        let what = "write outbox rows";
        let mut client = self.store.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.store.err(what, e))?;
        self.store.insert_outbox(&tx, &records, what).await?;
        tx.commit().await.map_err(|e| self.store.err(what, e))
    }
}

impl Sink for OutboxWriter {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            self.write(records)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        })
    }
}
