//! Opening a connection to a RabbitMQ broker, and what its failures mean: [`classify`] tells a
//! refusal only a change fixes (with the fix) from a broker that is away, and [`answered`]
//! bounds every request, since lapin may leave one unanswered when the server goes away.

use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

use crate::broker::BrokerError;
use crate::config::RabbitConfig;

pub(super) fn unavailable(broker: &str, what: &str, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("rabbitmq {broker}: {what}: {e}"))
}

/// The error of request `what` on broker `broker`, classified: a refusal only a change fixes
/// is [`BrokerError::Misconfigured`] with what to change; anything else (a broker that is down,
/// a dropped connection, a queue locked by another connection) is
/// [`BrokerError::Unavailable`].
pub fn classify(broker: &str, what: &str, e: &lapin::Error) -> BrokerError {
    // The server's own words ("ACCESS_REFUSED - Login was refused ...") say it best.
    let error = match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            format!("rabbitmq {broker}: {what}: {}", amqp.get_message())
        }
        _ => format!("rabbitmq {broker}: {what}: {e}"),
    };
    let misconfigured = |fix: String| BrokerError::Misconfigured {
        error: error.clone(),
        fix,
    };
    let amqp = match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp,
        lapin::ErrorKind::IOError(io) if io.to_string().contains("invalid peer certificate") => {
            return misconfigured(format!(
                "trust the server's certificate: set brokers.{broker}.ca_file to the CA certificate that signed it"
            ));
        }
        _ => return BrokerError::Unavailable(error),
    };
    let text = amqp.get_message().as_str();
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) if text.contains("Login was refused") => {
            misconfigured(format!(
                "check the user name and password in the URL of brokers.{broker}, or create that user on the server"
            ))
        }
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => misconfigured(
            "give the URL's user permissions on it (rabbitmqctl set_permissions -p <vhost> <user> <configure> <write> <read>), or use a user that has them".into(),
        ),
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => misconfigured(format!(
            "check the vhost in the URL of brokers.{broker}: it must exist and its user must have access to it (rabbitmqctl add_vhost / set_permissions)"
        )),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            if text.contains("'x-queue-type'") =>
        {
            misconfigured(
                "the queue exists with another type: set the route's source.queue_type to the queue's type (\"classic\" or \"quorum\"), or delete the queue (rabbitmqctl delete_queue <queue>) so lockgate declares it".into(),
            )
        }
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => misconfigured(
            "the queue exists with other arguments than the route declares (see the reason): make the route's source settings match the queue, or delete the queue so lockgate declares it".into(),
        ),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) if text.contains("no exchange") => {
            misconfigured(
                "declare the exchange on the server, or correct the route's source.exchange"
                    .into(),
            )
        }
        _ => BrokerError::Unavailable(error),
    }
}

/// Waits at most `limit` for `request`, an exchange with broker `broker`. lapin can leave a
/// request unanswered forever when the server goes away in the middle of it
/// (amqp-rs/lapin#409); one that never ends would hold its message and lane, or every
/// publisher of the route, for good. Past the limit it is an unavailable broker like any
/// other: the caller drops the connection and retries.
pub(super) async fn answered<T>(
    limit: Duration,
    broker: &str,
    what: &str,
    request: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit, request).await {
        Ok(r) => r,
        Err(_) => Err(unavailable(
            broker,
            what,
            format!("no answer within {} ms", limit.as_millis()),
        )),
    }
}

/// Opens a connection to broker `name`. The error never contains the URL (it may hold a
/// password).
pub async fn connect(name: &str, cfg: &RabbitConfig) -> Result<Connection, BrokerError> {
    let url = cfg.url().map_err(|e| BrokerError::Invalid(e.to_string()))?;
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            BrokerError::Invalid(format!(
                "brokers.{name}.ca_file: cannot read {}: {e}",
                path.display()
            ))
        })?;
        tls.cert_chain = Some(pem);
    }
    let builder = lapin::DefaultConnectionBuilder::new()
        .map_err(|e| classify(name, "connect", &e))?
        .with_uri_str(url)
        .with_properties(ConnectionProperties::default())
        .with_tls_config(tls);
    answered(cfg.request_timeout, name, "connect", async {
        builder
            .connect()
            .await
            .map_err(|e| classify(name, "connect", &e))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amqp(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(kind, text.into())).into()
    }

    fn fix_of(e: &BrokerError) -> &str {
        match e {
            BrokerError::Misconfigured { fix, .. } => fix,
            other => panic!("not a misconfiguration: {other:?}"),
        }
    }

    #[test]
    fn refusals_only_a_change_fixes_are_misconfigurations_with_the_fix() {
        let login = classify(
            "rabbit",
            "connect",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN.",
            ),
        );
        assert!(fix_of(&login).contains("user name and password in the URL of brokers.rabbit"));
        // The server's words, not lapin's wrapping.
        assert_eq!(
            login.failure().error,
            "rabbitmq rabbit: connect: ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN."
        );
        let permissions = classify(
            "rabbit",
            "declare queue q",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'",
            ),
        );
        assert!(fix_of(&permissions).contains("set_permissions"));
        let vhost = classify(
            "rabbit",
            "connect",
            &amqp(
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
                "NOT_ALLOWED - vhost nope not found",
            ),
        );
        assert!(fix_of(&vhost).contains("vhost"));
        let classic = classify(
            "rabbit",
            "declare queue q",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none",
            ),
        );
        assert!(fix_of(&classic).contains("source.queue_type"));
        let durable = classify(
            "rabbit",
            "declare queue q",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q'",
            ),
        );
        assert!(fix_of(&durable).contains("other arguments"));
        let exchange = classify(
            "rabbit",
            "bind queue q to events",
            &amqp(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no exchange 'events' in vhost '/'",
            ),
        );
        assert!(fix_of(&exchange).contains("declare the exchange"));
    }

    #[test]
    fn what_goes_away_by_itself_is_transient() {
        for e in [
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            amqp(
                AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED),
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'q'",
            ),
            // A queue deleted under the consumer is declared again on the next attempt.
            amqp(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no queue 'q' in vhost '/'",
            ),
            amqp(
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
                "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
            ),
        ] {
            let c = classify("rabbit", "consume", &e);
            assert!(matches!(c, BrokerError::Unavailable(_)), "{e}: {c:?}");
            assert_eq!(c.failure().kind, crate::health::FailureKind::Transient);
        }
    }
}
