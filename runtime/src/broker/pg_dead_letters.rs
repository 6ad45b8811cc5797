//! A dead-letter table in PostgreSQL: the DLQ of a route whose `dlq` names a PostgreSQL store.
//!
//! Each dead letter is one row of `<schema>.dead_letters` holding the standard envelope (see
//! [`crate::dlq`]) whole, plus columns to filter on: `dlq` (the DLQ's name, so
//! several routes can share the table), `route`, `error_kind`, `reason`, `attempts`, `source`
//! (the original position) and `failed_at`, indexed by route, error kind and time. A row's
//! position is `<dlq>/-/<id>`.
//!
//! The table is a [`Sink`] (the route writes dead letters, each record's topic naming its DLQ;
//! a repeated write of the same `lockgate-id` is dropped) and a [`Scan`] (`lockgate dlq list|show|replay` read it). Where a
//! broker DLQ records a replay by appending a marker, the table sets `replayed_at` and
//! `replayed_to` on the rows instead, and reads them back as markers, so the replay tool works
//! the same on both. Replay results likewise set `replay_result`, `replay_route`,
//! `replay_detail` and `replay_result_at` (keeping a handling over a later skip) and read back
//! as result records.

use std::sync::Arc;

use crate::broker::{BrokerError, Scan, Sink};

use futures_util::future::BoxFuture;

use crate::dlq::{
    MARKER_HEADER, RESULT_HEADER, ReplayOutcome, ReplayResult, marker, marker_positions,
    parse_result, result_record,
};
use crate::message::{LOCKGATE_ID_HEADER, OutRecord, Record};

use crate::state::PostgresStore;

/// Rows read per [`Scan::next_batch`].
const SCAN_BATCH: i64 = 500;

/// A PostgreSQL store's `dead_letters` table (created by its migrations on first use).
#[derive(Clone, Debug)]
pub struct DeadLetterTable {
    store: Arc<PostgresStore>,
}

impl DeadLetterTable {
    /// The table in `store`'s schema.
    pub fn new(store: Arc<PostgresStore>) -> Self {
        Self { store }
    }

    /// A scan of DLQ `dlq`'s rows, from the first on.
    pub fn scan(&self, dlq: &str) -> DeadLetterScan {
        DeadLetterScan {
            table: self.clone(),
            dlq: dlq.to_owned(),
            after: 0,
        }
    }

    fn unavailable(e: crate::state::StateError) -> BrokerError {
        BrokerError::Unavailable(e.to_string())
    }

    /// The row id a position of DLQ `dlq` names.
    fn id_of(dlq: &str, position: &str) -> Option<i64> {
        position
            .strip_prefix(dlq)?
            .strip_prefix("/-/")?
            .parse()
            .ok()
    }

    async fn insert(&self, letters: Vec<OutRecord>) -> Result<(), BrokerError> {
        let s = self.store.schema();
        let mut client = self.store.client().await.map_err(Self::unavailable)?;
        let fail = |e: tokio_postgres::Error| {
            BrokerError::Unavailable(format!("dead_letters in schema {s}: {e}"))
        };
        let tx = client.transaction().await.map_err(fail)?;
        let stmt = tx
            .prepare_cached(&format!(
                "INSERT INTO {s}.dead_letters (dlq, lockgate_id, route, error_kind, reason,
                     attempts, source, failed_at, key, header_names, header_values, payload)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8::bigint / 1000.0), $9, $10,
                     $11, $12)
                 ON CONFLICT (dlq, lockgate_id) DO NOTHING"
            ))
            .await
            .map_err(fail)?;
        for r in letters {
            let text = |name: &str| {
                r.headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            let envelope = |name: &str| text(&format!("lockgate-dlq-{name}"));
            let Some(route) = envelope("route") else {
                return Err(BrokerError::Invalid(
                    "not a dead letter (no lockgate-dlq-route header): a dead-letter table only \
                     takes dead letters"
                        .into(),
                ));
            };
            let id = text(LOCKGATE_ID_HEADER).unwrap_or_else(|| format!("{route}:dlq:unknown"));
            let attempts: i32 = envelope("attempts")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            let failed_ms: i64 = envelope("last-failure-ms")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| i64::try_from(crate::message::now_ms()).unwrap_or(i64::MAX));
            let source = format!(
                "{}/{}/{}",
                envelope("topic").unwrap_or_default(),
                envelope("partition").unwrap_or_else(|| "-".into()),
                envelope("offset").unwrap_or_else(|| "-".into())
            );
            let (error_kind, reason) = (
                envelope("error-kind").unwrap_or_default(),
                envelope("reason").unwrap_or_default(),
            );
            let (names, values): (Vec<String>, Vec<Vec<u8>>) = r.headers.into_iter().unzip();
            tx.execute(
                &stmt,
                &[
                    &r.topic,
                    &id,
                    &route,
                    &error_kind,
                    &reason,
                    &attempts,
                    &source,
                    &failed_ms,
                    &r.key,
                    &names,
                    &values,
                    &r.payload,
                ],
            )
            .await
            .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    }

    async fn mark(&self, markers: Vec<OutRecord>) -> Result<(), BrokerError> {
        let s = self.store.schema();
        for m in markers {
            let to = String::from_utf8_lossy(
                m.headers
                    .iter()
                    .find(|(n, _)| n == MARKER_HEADER)
                    .map_or(&[][..], |(_, v)| v),
            )
            .into_owned();
            let record = Record {
                headers: m.headers,
                payload: m.payload,
                ..Record::default()
            };
            let ids: Vec<i64> = marker_positions(&record)
                .unwrap_or_default()
                .iter()
                .filter_map(|p| Self::id_of(&m.topic, p))
                .collect();
            self.store
                .execute(
                    "mark dead letters replayed",
                    &format!(
                        "UPDATE {s}.dead_letters SET replayed_at = now(), replayed_to = $3
                         WHERE dlq = $1 AND id = ANY($2)"
                    ),
                    &[&m.topic, &ids, &to],
                )
                .await
                .map_err(Self::unavailable)?;
        }
        Ok(())
    }

    /// Sets the replay result of the rows the results name. A `skipped` does not replace a
    /// `handled` (a copy delivered twice is handled once and skipped once).
    async fn record_results(&self, results: Vec<OutRecord>) -> Result<(), BrokerError> {
        let s = self.store.schema();
        for r in results {
            let record = Record {
                headers: r.headers,
                payload: r.payload,
                ..Record::default()
            };
            let Some(result) = parse_result(&record) else {
                continue;
            };
            let Some(id) = Self::id_of(&r.topic, &result.position) else {
                continue;
            };
            let at = i64::try_from(result.at_ms).unwrap_or(i64::MAX);
            self.store
                .execute(
                    "record replay results",
                    &format!(
                        "UPDATE {s}.dead_letters SET replay_result = $3, replay_route = $4,
                             replay_detail = $6, replay_result_at = to_timestamp($5::bigint / 1000.0)
                         WHERE dlq = $1 AND id = $2
                           AND NOT (replay_result IS NOT DISTINCT FROM 'handled'
                                    AND $3 = 'skipped')"
                    ),
                    &[
                        &r.topic,
                        &id,
                        &result.outcome.as_str(),
                        &result.route,
                        &at,
                        &result.detail,
                    ],
                )
                .await
                .map_err(Self::unavailable)?;
        }
        Ok(())
    }
}

/// What a record written to the table is.
fn is(r: &OutRecord, header: &str) -> bool {
    r.headers.iter().any(|(n, _)| n == header)
}

impl Sink for DeadLetterTable {
    fn publish(&self, records: Vec<OutRecord>) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move {
            let (markers, rest): (Vec<_>, Vec<_>) =
                records.into_iter().partition(|r| is(r, MARKER_HEADER));
            let (results, letters): (Vec<_>, Vec<_>) =
                rest.into_iter().partition(|r| is(r, RESULT_HEADER));
            if !letters.is_empty() {
                self.insert(letters).await?;
            }
            if !markers.is_empty() {
                self.mark(markers).await?;
            }
            if !results.is_empty() {
                self.record_results(results).await?;
            }
            Ok(())
        })
    }
}

/// Reads a dead-letter table in id order; a replayed row is followed by a marker naming it.
#[derive(Debug)]
pub struct DeadLetterScan {
    table: DeadLetterTable,
    dlq: String,
    after: i64,
}

impl Scan for DeadLetterScan {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>> {
        Box::pin(async move {
            let t = &self.table;
            let s = t.store.schema();
            let rows = t
                .store
                .query(
                    "read dead letters",
                    &format!(
                        "SELECT id, key, header_names, header_values, payload,
                             (extract(epoch from failed_at) * 1000)::bigint,
                             replayed_to, (extract(epoch from replayed_at) * 1000)::bigint,
                             replay_result, replay_route, replay_detail,
                             (extract(epoch from replay_result_at) * 1000)::bigint
                         FROM {s}.dead_letters WHERE dlq = $1 AND id > $2 ORDER BY id LIMIT $3"
                    ),
                    &[&self.dlq, &self.after, &SCAN_BATCH],
                )
                .await
                .map_err(DeadLetterTable::unavailable)?;
            if rows.is_empty() {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.get(0);
                self.after = id;
                let names: Vec<String> = row.get(2);
                let values: Vec<Vec<u8>> = row.get(3);
                let record = Record {
                    topic: self.dlq.clone(),
                    partition: None,
                    offset: u64::try_from(id).ok(),
                    key: row.get(1),
                    headers: names.into_iter().zip(values).collect(),
                    payload: row.get(4),
                    timestamp_ms: row
                        .get::<_, Option<i64>>(5)
                        .and_then(|v| u64::try_from(v).ok()),
                    reply_to: None,
                    delivery: None,
                };
                let replayed: Option<(String, i64)> = row
                    .get::<_, Option<String>>(6)
                    .zip(row.get::<_, Option<i64>>(7));
                let position = record.position();
                out.push(record);
                if let Some((to, at)) = replayed {
                    let m = marker(
                        &self.dlq,
                        std::slice::from_ref(&position),
                        &to,
                        u64::try_from(at).unwrap_or(0),
                    );
                    out.push(Record {
                        topic: m.topic,
                        headers: m.headers,
                        payload: m.payload,
                        ..Record::default()
                    });
                }
                if let Some(result) = stored_result(&row, position) {
                    let r = result_record(&self.dlq, &result);
                    out.push(Record {
                        topic: r.topic,
                        headers: r.headers,
                        payload: r.payload,
                        ..Record::default()
                    });
                }
            }
            Ok(Some(out))
        })
    }
}

/// The replay result kept in a row (columns 8-11 of the scan), if any.
fn stored_result(row: &tokio_postgres::Row, position: String) -> Option<ReplayResult> {
    let outcome = match row.get::<_, Option<&str>>(8)? {
        "handled" => ReplayOutcome::Handled,
        "skipped" => ReplayOutcome::Skipped,
        "dead_lettered" => ReplayOutcome::DeadLettered,
        _ => return None,
    };
    Some(ReplayResult {
        position,
        outcome,
        route: row.get::<_, Option<String>>(9).unwrap_or_default(),
        detail: row.get::<_, Option<String>>(10).unwrap_or_default(),
        at_ms: row
            .get::<_, Option<i64>>(11)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0),
    })
}
