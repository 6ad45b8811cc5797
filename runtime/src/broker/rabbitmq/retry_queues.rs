//! `retry.mode = "broker"` on RabbitMQ: a failed delivery's copy waits in a retry queue
//! (`<queue>.retry.<ms>`, one per delay tier) whose message TTL dead-letters it back into the
//! source queue; the copy's `lockgate-attempts` header counts the attempts before it.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation};

use crate::broker::BrokerError;

use super::ATTEMPTS_HEADER;

/// Retry queues are deleted after going unused this long beyond their delay.
const RETRY_QUEUE_IDLE: Duration = Duration::from_secs(600);

/// The delay tier a backoff is rounded to: ten per decade (each about 26% above the last), so
/// a route's jittered backoffs share a handful of retry queues and the delay is off by at most
/// about 13%.
pub fn retry_tier(delay: Duration) -> Duration {
    let ms = delay.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        return Duration::from_millis(1);
    }
    let step = (ms.log10() * 10.0).round();
    Duration::from_millis(10f64.powf(step / 10.0).round() as u64)
}

/// The queue a retry waits in: `<queue>.retry.<ms>`, whose message TTL dead-letters it back
/// into `<queue>` through the default exchange.
fn retry_queue(queue: &str, tier: Duration) -> String {
    format!("{queue}.retry.{}", tier.as_millis())
}

/// A delivery's copy for a retry queue, and where to publish it.
pub(super) struct Retry {
    pub(super) channel: Channel,
    pub(super) queue: String,
    pub(super) properties: BasicProperties,
    pub(super) data: Vec<u8>,
    /// Attempts made, the failed one included.
    pub(super) attempts: u32,
}

impl Retry {
    /// Puts the copy in the retry queue of `delay`'s tier (declared on first use) and waits
    /// for the broker's confirm.
    pub(super) async fn publish(self, delay: Duration) -> Result<(), BrokerError> {
        let tier = retry_tier(delay);
        let name = retry_queue(&self.queue, tier);
        let err = |what: &str, e: lapin::Error| {
            BrokerError::Unavailable(format!("rabbitmq: {what} {name}: {e}"))
        };
        let mut args = FieldTable::default();
        let ms = i64::try_from(tier.as_millis()).unwrap_or(i64::MAX);
        let idle = i64::try_from((tier + RETRY_QUEUE_IDLE).as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(idle));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.queue.as_str())),
        );
        self.channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| err("declare retry queue", e))?;
        // The broker's x-death record rides along (the source does not show it to the
        // handler); it names only retry queues, so RabbitMQ's cycle check (a message reaching
        // the same queue twice without a rejection) never drops the copy.
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongString(LongString::from(self.attempts.to_string())),
        );
        let properties = self.properties.with_headers(headers);
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &self.data,
                properties,
            )
            .await
            .map_err(|e| err("publish to", e))?
            .await
            .map_err(|e| err("confirm from", e))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            _ => Err(BrokerError::Unavailable(format!(
                "rabbitmq: the broker did not take the retry copy into {name}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn delays_round_to_tiers_within_thirteen_percent() {
        assert_eq!(retry_tier(Duration::from_millis(300)).as_millis(), 316);
        assert_eq!(retry_tier(Duration::from_millis(600)).as_millis(), 631);
        assert_eq!(retry_tier(Duration::from_millis(1000)).as_millis(), 1000);
        assert_eq!(retry_tier(Duration::ZERO).as_millis(), 1);
        let mut last = Duration::ZERO;
        for ms in (1..200_000).step_by(7) {
            let d = Duration::from_millis(ms);
            let t = retry_tier(d);
            let off = (t.as_secs_f64() - d.as_secs_f64()).abs() / d.as_secs_f64();
            assert!(off <= 0.13 || ms < 10, "{ms} ms -> {t:?}");
            assert!(t >= last, "tiers must not decrease");
            last = t;
        }
        // Ten per decade: every delay from 100 ms to 30 s shares 26 queues.
        let tiers: HashSet<Duration> = (100..30_000)
            .map(|ms| retry_tier(Duration::from_millis(ms)))
            .collect();
        assert_eq!(tiers.len(), 26);
    }

    #[test]
    fn retry_queues_are_named_after_their_source_and_tier() {
        assert_eq!(
            retry_queue("orders", Duration::from_millis(316)),
            "orders.retry.316"
        );
    }
}
