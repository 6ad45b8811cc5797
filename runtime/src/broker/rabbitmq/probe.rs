//! What `lockgate check --connect` asks a RabbitMQ broker, changing nothing: the login, and for
//! a source whether its queue and exchange exist with what the route declares.

use std::time::Duration;

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;

use crate::broker::BrokerError;
use crate::config::{QueueType, RabbitConfig, RabbitSource as SourceConfig};

use super::connect::{answered, classify, connect};
use super::source::queue_arguments;

/// Longest a `lockgate check --connect` probe waits for the server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `e` is the server's NOT_FOUND (a passive declare of something that does not exist).
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a)
        if *a.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Connects to broker `broker` and logs in (for `lockgate check --connect`).
pub async fn probe_connect(broker: &str, cfg: &RabbitConfig) -> Result<(), BrokerError> {
    let limit = cfg.request_timeout.min(PROBE_TIMEOUT);
    answered(limit, broker, "connect", async {
        let conn = connect(broker, cfg).await?;
        let _ = conn.close(200, "check done".into()).await;
        Ok(())
    })
    .await
}

/// What `lockgate check --connect` finds for a source on queue `queue`, changing nothing: the
/// login, whether the queue exists with the arguments the route declares (an existing queue is
/// declared again with them, which changes nothing when they match and fails with
/// PRECONDITION_FAILED when they differ) and whether the exchange to bind to exists. Returns
/// what `lockgate run` would create.
pub async fn probe_source(
    broker: &str,
    cfg: &RabbitConfig,
    queue: &str,
    settings: &SourceConfig,
) -> Result<Vec<String>, BrokerError> {
    let limit = cfg.request_timeout.min(PROBE_TIMEOUT);
    answered(limit, broker, &format!("check queue {queue}"), async {
        let conn = connect(broker, cfg).await?;
        let result = probe_queue(&conn, broker, queue, settings).await;
        let _ = conn.close(200, "check done".into()).await;
        result
    })
    .await
}

async fn probe_queue(
    conn: &Connection,
    broker: &str,
    queue: &str,
    settings: &SourceConfig,
) -> Result<Vec<String>, BrokerError> {
    // A refused declare closes its channel: one channel per question.
    let channel = || async {
        conn.create_channel()
            .await
            .map_err(|e| classify(broker, "open a channel", &e))
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let mut notes = Vec::new();
    let declare = format!("declare queue {queue}");
    match channel()
        .await?
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            channel()
                .await?
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::durable(),
                    queue_arguments(settings),
                )
                .await
                .map_err(|e| classify(broker, &declare, &e))?;
        }
        Err(e) if is_not_found(&e) => notes.push(format!(
            "queue {queue} does not exist yet: `lockgate run` declares it (durable, {})",
            match settings.queue_type {
                QueueType::Quorum => "quorum",
                QueueType::Classic => "classic",
            }
        )),
        Err(e) => return Err(classify(broker, &declare, &e)),
    }
    if let Some(exchange) = &settings.exchange {
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..lapin::options::ExchangeDeclareOptions::default()
        };
        channel()
            .await?
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(broker, &format!("declare exchange {exchange}"), &e))?;
        notes.push(format!(
            "`lockgate run` binds queue {queue} to exchange {exchange} with key \"{}\"",
            settings.binding_key
        ));
    }
    Ok(notes)
}
