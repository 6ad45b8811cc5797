//! Broker clients of a runtime and of the commands that talk to brokers (`lockgate dlq`): one
//! [`Connector`] per broker, shared by every route and command step that uses it, and the
//! PostgreSQL tables (outbox, dead letters) that stand where a broker would.
//!
//! [`connector`] is the registry: the only place that matches on a broker's kind.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::broker::kafka::KafkaConnector;
use crate::broker::local::LocalBroker;
use crate::broker::nats::NatsConnector;
use crate::broker::pg_dead_letters::DeadLetterTable;
use crate::broker::pg_outbox::{OutboxRelay, OutboxWriter};
use crate::broker::rabbitmq::RabbitConnector;
use crate::broker::{Connector, Scan, Sink, Source};
use crate::config::{
    BrokerConfig, BrokerKind, BrokerRef, Config, DlqTarget, RouteConfig, SourceSpec,
};

use super::error::ClientError;
use super::stores::postgres;

/// Connections of a dead-letter table's pool: DLQ writes and reads are rare.
const DEAD_LETTER_POOL_SIZE: usize = 2;

/// Connections of an outbox relay's pool: its lease, renew, mark and cleanup statements.
const OUTBOX_POOL_SIZE: usize = 4;

/// The connector of a `[brokers.<name>]` table, by its kind. A new broker kind adds its line
/// here (docs/architecture.md, "Adding a broker").
pub fn connector(broker: &BrokerConfig, base_dir: &Path) -> Arc<dyn Connector> {
    match &broker.kind {
        BrokerKind::Kafka(k) => Arc::new(KafkaConnector::new(&broker.name, k)),
        BrokerKind::Nats(n) => Arc::new(NatsConnector::new(&broker.name, n, base_dir)),
        BrokerKind::RabbitMq(r) => Arc::new(RabbitConnector::new(&broker.name, r)),
    }
}

/// Broker clients, one connector and one sink per broker, shared by every route that uses it.
#[derive(Default)]
pub struct Clients {
    connectors: HashMap<String, Arc<dyn Connector>>,
    sinks: HashMap<String, Arc<dyn Sink>>,
    tables: HashMap<String, DeadLetterTable>,
}

impl Clients {
    /// The connector of `broker`.
    pub fn connector(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        broker: &BrokerRef,
    ) -> Result<Arc<dyn Connector>, ClientError> {
        let name = match broker {
            BrokerRef::Local => return Ok(Arc::new(local.clone())),
            BrokerRef::Named(name) => name,
        };
        if let Some(c) = self.connectors.get(name) {
            return Ok(c.clone());
        }
        let Some(b) = config.brokers.get(name) else {
            return Err(ClientError::UndefinedBroker(name.clone()));
        };
        let c = connector(b, &config.base_dir);
        self.connectors.insert(name.clone(), c.clone());
        Ok(c)
    }

    /// The dead-letter table of PostgreSQL store `store`.
    pub fn dead_letters(
        &mut self,
        config: &Config,
        store: &str,
    ) -> Result<DeadLetterTable, ClientError> {
        if let Some(t) = self.tables.get(store) {
            return Ok(t.clone());
        }
        let pg = postgres(config, store, DEAD_LETTER_POOL_SIZE)?;
        let table = DeadLetterTable::new(Arc::new(pg));
        self.tables.insert(store.to_owned(), table.clone());
        Ok(table)
    }

    /// Opens the source of `route`: a consumer on its broker, or the relay of its outbox.
    pub async fn source(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        route: &RouteConfig,
    ) -> Result<Box<dyn Source>, ClientError> {
        match &route.source {
            SourceSpec::Outbox(outbox) => {
                let store = postgres(config, &outbox.store, OUTBOX_POOL_SIZE)?;
                Ok(Box::new(OutboxRelay::new(store, outbox.clone())))
            }
            SourceSpec::Broker(src) => {
                let c = self.connector(config, local, &src.broker)?;
                Ok(c.source(&route.name, src, route.retry.mode).await?)
            }
        }
    }

    /// The sink for answers to requests, for routes whose source has reply addresses.
    pub async fn replies(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        route: &RouteConfig,
    ) -> Result<Option<Arc<dyn Sink>>, ClientError> {
        let SourceSpec::Broker(src) = &route.source else {
            return Ok(None);
        };
        let c = self.connector(config, local, &src.broker)?;
        Ok(c.replies(src).await?)
    }

    /// The producer for `broker`.
    pub async fn sink(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        broker: &BrokerRef,
    ) -> Result<Arc<dyn Sink>, ClientError> {
        if let Some(s) = self.sinks.get(broker.name()) {
            return Ok(s.clone());
        }
        let sink = self.connector(config, local, broker)?.sink().await?;
        self.sinks.insert(broker.name().to_owned(), sink.clone());
        Ok(sink)
    }

    /// Where dead letters to `dlq` are written.
    pub async fn dlq_sink(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        dlq: &DlqTarget,
    ) -> Result<Arc<dyn Sink>, ClientError> {
        match dlq {
            DlqTarget::Broker { broker, .. } => self.sink(config, local, broker).await,
            DlqTarget::Table { store, .. } => Ok(Arc::new(self.dead_letters(config, store)?)),
        }
    }

    /// Drops the clients of broker `name` whose definition changed: the next use connects
    /// anew.
    pub fn forget_broker(&mut self, name: &str) {
        self.connectors.remove(name);
        self.sinks.remove(name);
    }

    /// Drops the dead-letter table of store `name`, whose definition changed.
    pub fn forget_store(&mut self, name: &str) {
        self.tables.remove(name);
    }

    /// A scan of `dlq` from its start (the DLQ tools read with it).
    pub async fn scan(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        dlq: &DlqTarget,
    ) -> Result<Box<dyn Scan>, ClientError> {
        match dlq {
            DlqTarget::Broker { broker, topic } => {
                let c = self.connector(config, local, broker)?;
                Ok(c.scan(topic).await?)
            }
            DlqTarget::Table { store, topic } => {
                Ok(Box::new(self.dead_letters(config, store)?.scan(topic)))
            }
        }
    }

    /// The producer that feeds `route`'s source: its broker's, or a writer of outbox rows when
    /// it relays an outbox.
    pub async fn feeder(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        route: &RouteConfig,
    ) -> Result<Arc<dyn Sink>, ClientError> {
        match &route.source {
            SourceSpec::Outbox(outbox) => {
                let store = postgres(config, &outbox.store, DEAD_LETTER_POOL_SIZE)?;
                Ok(Arc::new(OutboxWriter::new(store)))
            }
            SourceSpec::Broker(src) => {
                let c = self.connector(config, local, &src.broker)?;
                Ok(c.feeder(src).await?)
            }
        }
    }
}
