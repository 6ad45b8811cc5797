//! Acknowledging a RabbitMQ delivery: ack when done, nack with requeue when given up or
//! dropped, and (with `retry.mode = "broker"`) a retry through a retry queue.

use std::time::Duration;

use futures_util::future::BoxFuture;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use crate::broker::{Ack, AckKind, BrokerError};

use super::retry_queues::Retry;

/// Acks a delivery; an ack its closed channel could not carry is an error (the broker has
/// requeued the message already), not a silent success, and so is one unanswered within
/// `limit` (the message may come again; with idempotency on it is then a duplicate).
async fn ack_now(acker: &lapin::Acker, limit: Duration) -> Result<(), BrokerError> {
    match tokio::time::timeout(limit, acker.ack(BasicAckOptions::default())).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(BrokerError::Unavailable(
            "rabbitmq: ack: the delivery's channel is closed; the broker delivers it again".into(),
        )),
        Ok(Err(e)) => Err(BrokerError::Unavailable(format!("rabbitmq: ack: {e}"))),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "rabbitmq: ack: no answer within {} ms; the broker may deliver it again",
            limit.as_millis()
        ))),
    }
}

/// Gives a delivery back to its queue (nack with requeue), waiting at most `limit`. Failing
/// is harmless: the broker requeues whatever a closed channel held.
pub(super) async fn give_back(acker: &lapin::Acker, limit: Duration) {
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    match tokio::time::timeout(limit, acker.nack(requeue)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Giving a delivery back failed; the broker requeues it when the channel closes");
        }
        Err(_) => {
            tracing::debug!(
                "Giving a delivery back got no answer; the broker requeues it when the channel closes"
            );
        }
    }
}

/// Acks one delivery. Dropped without an ack (the route gave the message up), it nacks with
/// requeue, so the message goes back to the queue now rather than when the channel closes.
pub(super) struct RabbitAck {
    pub(super) acker: Option<lapin::Acker>,
    /// The broker's `request_timeout`.
    pub(super) limit: Duration,
    /// With `retry.mode = "broker"`: what a redelivery needs.
    pub(super) retry: Option<Box<Retry>>,
}

impl Ack for RabbitAck {
    fn ack(mut self: Box<Self>, _kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        let acker = self.acker.take();
        let limit = self.limit;
        Box::pin(async move {
            let Some(acker) = acker else { return Ok(()) };
            // A dead letter was written, so a dead-lettered delivery is acked too.
            ack_now(&acker, limit).await
        })
    }

    /// Puts a copy in the retry queue of `delay`'s tier, whose TTL dead-letters it back into the
    /// source queue, then acks this delivery. If the copy cannot be published the delivery is
    /// given back at once (nack with requeue) instead.
    fn redeliver(
        mut self: Box<Self>,
        delay: Duration,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let retry = self.retry.take();
        let acker = self.acker.take();
        let limit = self.limit;
        Box::pin(async move {
            let (Some(retry), Some(acker)) = (retry, acker) else {
                return Err(BrokerError::Invalid(
                    "rabbitmq: this source was not opened for retry.mode = \"broker\"".into(),
                ));
            };
            let published = match tokio::time::timeout(limit, retry.publish(delay)).await {
                Ok(r) => r,
                Err(_) => Err(BrokerError::Unavailable(format!(
                    "rabbitmq: retry copy: no answer within {} ms",
                    limit.as_millis()
                ))),
            };
            if let Err(e) = published {
                give_back(&acker, limit).await;
                return Err(e);
            }
            ack_now(&acker, limit).await
        })
    }

    /// False once the delivery's channel closed (a reconnect, or the source let go of it while
    /// the breaker was open): the broker has requeued it, so handling it here would only repeat
    /// it.
    fn is_current(&self) -> bool {
        self.acker.as_ref().is_some_and(lapin::Acker::usable)
    }
}

impl Drop for RabbitAck {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let limit = self.limit;
            rt.spawn(async move { give_back(&acker, limit).await });
        }
    }
}
