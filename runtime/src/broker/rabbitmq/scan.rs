//! Reading a RabbitMQ queue (a DLQ) for `lockgate dlq` without consuming it ([`RabbitScan`]).

use std::time::Duration;

use futures_util::future::BoxFuture;
use lapin::options::{BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use crate::broker::{BrokerError, Scan};
use crate::config::RabbitConfig;
use crate::dlq::Numbering;
use crate::message::{LOCKGATE_ID_HEADER, Record};

use super::connect::{answered, connect, unavailable};
use super::record::record;

/// Records read per [`Scan::next_batch`].
const SCAN_BATCH: usize = 500;

/// Reads a queue (a DLQ) from its head without consuming it: each message is taken with
/// `basic.get` and left unacknowledged, and closing the scan gives all of them back. Only the
/// messages the queue held when the scan opened are read. Queues have no offsets, so a
/// record's position is `<queue>/-/<n>` with `n` a digest of its `lockgate-id` (or, lacking
/// one, its `message_id` or payload): the same letter has the same position in every scan,
/// which is what replay markers name. `lockgate dlq` prints it short, as hex
/// ([`Numbering::Digests`]).
pub struct RabbitScan {
    conn: Connection,
    channel: Channel,
    /// The broker's `request_timeout`.
    limit: Duration,
    queue: String,
    broker: String,
    /// Messages the queue held at open.
    initial: u32,
    remaining: u32,
    /// Delivery tag of the last message taken.
    last_tag: Option<u64>,
}

impl RabbitScan {
    /// Opens a scan of `queue` on broker `broker`.
    pub async fn open(broker: &str, cfg: &RabbitConfig, queue: &str) -> Result<Self, BrokerError> {
        let what = format!("read {queue}");
        answered(
            cfg.request_timeout,
            broker,
            &what,
            Self::open_now(broker, cfg, queue),
        )
        .await
    }

    async fn open_now(broker: &str, cfg: &RabbitConfig, queue: &str) -> Result<Self, BrokerError> {
        let conn = connect(broker, cfg).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| unavailable(broker, "open a channel", e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let remaining = match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            // No queue, no dead letters.
            Err(_) => 0,
        };
        let channel = if channel.status().connected() {
            channel
        } else {
            conn.create_channel()
                .await
                .map_err(|e| unavailable(broker, "open a channel", e))?
        };
        Ok(Self {
            conn,
            channel,
            limit: cfg.request_timeout,
            queue: queue.to_owned(),
            broker: broker.to_owned(),
            initial: remaining,
            remaining,
            last_tag: None,
        })
    }

    /// Gives every message taken back and waits (up to 10 s, or half the broker's
    /// `request_timeout`) until the queue holds at least
    /// what it held at open: a quorum queue requeues asynchronously, and the next scan (a
    /// replay reads the DLQ twice) must see every letter again.
    async fn give_back(&mut self) -> Result<(), BrokerError> {
        let Some(tag) = self.last_tag.take() else {
            let _ = self.conn.close(200, "scan done".into()).await;
            return Ok(());
        };
        let all = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        self.channel
            .basic_nack(tag, all)
            .await
            .map_err(|e| unavailable(&self.broker, &format!("give back {}", self.queue), e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        // Within the request's own limit, which covers this whole call.
        let deadline = tokio::time::Instant::now() + (self.limit / 2).min(Duration::from_secs(10));
        loop {
            let ready = self
                .channel
                .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                .await
                .map(|q| q.message_count())
                .unwrap_or(0);
            if ready >= self.initial || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.conn.close(200, "scan done".into()).await;
        Ok(())
    }
}

/// A stable number for a scanned message: the first 8 bytes of the SHA-256 of its
/// `lockgate-id` (dead letters always have one), else of its payload.
fn scan_offset(record: &Record) -> u64 {
    use sha2::{Digest, Sha256};
    let basis = record
        .header(LOCKGATE_ID_HEADER)
        .unwrap_or(record.payload.as_slice());
    let digest = Sha256::digest(basis);
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    // 63 bits, as it always was: replay markers already written name these values.
    u64::from_be_bytes(head) >> 1
}

impl Scan for RabbitScan {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Vec<Record>>, BrokerError>> {
        let (limit, broker) = (self.limit, self.broker.clone());
        let what = format!("read {}", self.queue);
        Box::pin(async move { answered(limit, &broker, &what, self.next_batch_now()).await })
    }

    fn numbering(&self) -> Numbering {
        Numbering::Digests
    }
}

impl RabbitScan {
    async fn next_batch_now(&mut self) -> Result<Option<Vec<Record>>, BrokerError> {
        if self.remaining == 0 {
            self.give_back().await?;
            return Ok(None);
        }
        let mut out = Vec::new();
        while out.len() < SCAN_BATCH && self.remaining > 0 {
            let got = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| unavailable(&self.broker, &format!("read {}", self.queue), e))?;
            let Some(m) = got else {
                self.remaining = 0;
                break;
            };
            self.remaining -= 1;
            self.last_tag = Some(m.delivery.delivery_tag);
            let (mut record, _) = record(&self.queue, &m.delivery);
            record.offset = Some(scan_offset(&record));
            out.push(record);
        }
        Ok(Some(out))
    }
}
