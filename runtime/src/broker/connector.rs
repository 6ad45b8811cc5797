//! [`Connector`]: what one broker opens for routes and for the commands that talk to brokers.
//!
//! Each broker kind implements it beside its adapter (`kafka/connector.rs`, `nats/connector.rs`,
//! `rabbitmq/connector.rs`, `local/connector.rs`), and `crate::app::clients` holds the one match
//! that picks a connector by the broker's kind. Adding a broker kind is its folder, its config
//! table and one line there (docs/architecture.md, "Adding a broker").

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{BrokerError, Scan, Sink, Source};
use crate::config::BrokerSource;
use crate::policy::backoff::RetryMode;

/// One broker (a `[brokers.<name>]` table or the embedded broker), able to open every client a
/// route or a command needs. One connector serves every route on its broker, so the clients it
/// shares (a NATS connection) are made once.
pub trait Connector: Send + Sync {
    /// What this broker is by OpenTelemetry's `messaging.system` names (`kafka`, `nats`,
    /// `rabbitmq`; `lockgate` for the embedded broker), for the traces of its messages.
    fn messaging_system(&self) -> &'static str;

    /// A consumer of `source` for route `route`. With `retry = RetryMode::Broker`, the source
    /// leaves redelivery delays to the broker (only kinds that have them get such a route:
    /// config checks that).
    fn source<'a>(
        &'a self,
        route: &'a str,
        source: &'a BrokerSource,
        retry: RetryMode,
    ) -> BoxFuture<'a, Result<Box<dyn Source>, BrokerError>>;

    /// A producer of outputs and dead letters on this broker.
    fn sink(&self) -> BoxFuture<'_, Result<Arc<dyn Sink>, BrokerError>>;

    /// Where answers to the requests that `source` delivers go, for kinds whose messages carry
    /// a reply address (core NATS, RabbitMQ); `None` publishes answers as outputs.
    fn replies<'a>(
        &'a self,
        source: &'a BrokerSource,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Sink>>, BrokerError>> {
        let _ = source;
        Box::pin(async { Ok(None) })
    }

    /// A producer whose records `source` reads (the DLQ replay publishes copies with it): the
    /// broker's sink unless its kind publishes differently to such a source.
    fn feeder<'a>(
        &'a self,
        source: &'a BrokerSource,
    ) -> BoxFuture<'a, Result<Arc<dyn Sink>, BrokerError>> {
        let _ = source;
        self.sink()
    }

    /// A read of `topic` from its start, acknowledging nothing (the DLQ tools read with it).
    fn scan<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Box<dyn Scan>, BrokerError>>;

    /// Connects once and checks each of `sources` (route name and source), changing nothing
    /// (`lockgate check --connect`).
    fn probe<'a>(&'a self, sources: &'a [(&'a str, &'a BrokerSource)]) -> BoxFuture<'a, Probe>;
}

/// What [`Connector::probe`] found.
#[derive(Debug, Default)]
pub struct Probe {
    /// Why the broker could not be reached; then no source was checked.
    pub unreachable: Option<BrokerError>,
    /// What was found per source, in the order asked.
    pub sources: Vec<SourceProbe>,
}

/// What [`Connector::probe`] found for one route's source.
#[derive(Debug)]
pub struct SourceProbe {
    /// The route.
    pub route: String,
    /// The `source` field the finding is about (`topic`, `stream`), or `None` for the whole
    /// source table.
    pub field: Option<&'static str>,
    /// Notes on what `lockgate run` would create, or why the source cannot work.
    pub outcome: Result<Vec<String>, BrokerError>,
}

impl Probe {
    /// A probe that could not connect.
    pub fn unreachable(error: BrokerError) -> Self {
        Self {
            unreachable: Some(error),
            sources: Vec::new(),
        }
    }
}
