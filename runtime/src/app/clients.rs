//! Broker clients of a runtime and of the commands that talk to brokers (`lockgate dlq`): one connection or
//! producer per `[brokers.<name>]`, shared by every route and command step that uses it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::broker::kafka::{KafkaScan, KafkaSink, KafkaSource};
use crate::broker::local::LocalBroker;
use crate::broker::nats::{
    JetStreamScan, JetStreamSink, JetStreamSource, NatsCoreSource, NatsLink, NatsReplySink,
};
use crate::broker::pg_dead_letters::DeadLetterTable;
use crate::broker::pg_outbox::{OutboxRelay, OutboxWriter};
use crate::broker::rabbitmq::{RabbitScan, RabbitSink, RabbitSource};
use crate::broker::{Scan, Sink, Source};
use crate::config::{BrokerKind, Config, DLQ_STORE_PREFIX, Endpoint, NatsConfig, RouteConfig};

use super::error::ClientError;
use super::stores::postgres;

/// Connections of a dead-letter table's pool: DLQ writes and reads are rare.
const DEAD_LETTER_POOL_SIZE: usize = 2;

/// Connections of an outbox relay's pool: its lease, renew, mark and cleanup statements.
const OUTBOX_POOL_SIZE: usize = 4;

/// How long the one-shot commands (`lockgate dlq`) wait for a NATS connection before they
/// fail with the reason.
const NATS_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Broker clients, one per broker, shared by every route that uses it.
#[derive(Default)]
pub struct Clients {
    sinks: HashMap<String, Arc<dyn Sink>>,
    nats: HashMap<String, NatsLink>,
    tables: HashMap<String, DeadLetterTable>,
}

impl Clients {
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

    /// The connection to NATS broker `name` (connecting in the background if the server is
    /// not there yet).
    pub async fn nats(
        &mut self,
        config: &Config,
        name: &str,
        cfg: &NatsConfig,
    ) -> Result<NatsLink, ClientError> {
        if let Some(c) = self.nats.get(name) {
            return Ok(c.clone());
        }
        let link = crate::broker::nats::connect(name, cfg, &config.base_dir).await?;
        self.nats.insert(name.to_owned(), link.clone());
        Ok(link)
    }

    /// Opens the source of `route` on its broker.
    pub async fn source(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        route: &RouteConfig,
    ) -> Result<Box<dyn Source>, ClientError> {
        if let Some(outbox) = &route.outbox {
            let store = postgres(config, &outbox.store, OUTBOX_POOL_SIZE)?;
            return Ok(Box::new(OutboxRelay::new(store, outbox.clone())));
        }
        let src = &route.source;
        if src.broker == "local" {
            return Ok(Box::new(local.source(&src.topic, &src.group)?));
        }
        let Some(broker) = config.brokers.get(&src.broker) else {
            return Err(ClientError::UndefinedBroker(src.broker.clone()));
        };
        match &broker.kind {
            BrokerKind::Kafka(kafka) => {
                Ok(Box::new(KafkaSource::new(kafka, &src.topic, &src.group)?))
            }
            BrokerKind::Nats(nats) => {
                let link = self.nats(config, &broker.name, nats).await?;
                Ok(match &route.jetstream {
                    Some(js) => Box::new(JetStreamSource::new(link, &src.topic, &src.group, js)),
                    None => {
                        tracing::warn!(
                            route = %route.name,
                            "Core NATS source (no `source.stream`): delivery is at most once. Retries, the breaker and the DLQ apply only while this process runs; messages it holds when it stops or crashes are lost. Use a JetStream stream for at-least-once."
                        );
                        Box::new(NatsCoreSource::new(link, &src.topic, &src.group))
                    }
                })
            }
            BrokerKind::RabbitMq(rabbit) => {
                let source = RabbitSource::new(
                    &broker.name,
                    rabbit,
                    &src.topic,
                    &route.rabbitmq.clone().unwrap_or_default(),
                );
                Ok(Box::new(
                    if route.retry.mode == crate::policy::backoff::RetryMode::Broker {
                        source.with_broker_retries()
                    } else {
                        source
                    },
                ))
            }
        }
    }

    /// The sink for answers to requests, for routes whose source has reply subjects.
    pub async fn replies(
        &mut self,
        config: &Config,
        route: &RouteConfig,
    ) -> Result<Option<Arc<dyn Sink>>, ClientError> {
        let Some(broker) = config.brokers.get(&route.source.broker) else {
            return Ok(None);
        };
        match &broker.kind {
            BrokerKind::Nats(nats) if route.jetstream.is_none() => {
                let link = self.nats(config, &broker.name, nats).await?;
                Ok(Some(Arc::new(NatsReplySink::new(link.client))))
            }
            BrokerKind::RabbitMq(rabbit) => {
                Ok(Some(Arc::new(RabbitSink::replies(&broker.name, rabbit))))
            }
            _ => Ok(None),
        }
    }

    /// The producer for broker `name`.
    pub async fn sink(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        name: &str,
    ) -> Result<Arc<dyn Sink>, ClientError> {
        if let Some(s) = self.sinks.get(name) {
            return Ok(s.clone());
        }
        let sink: Arc<dyn Sink> = if name == "local" {
            Arc::new(local.sink())
        } else if let Some(store) = name.strip_prefix(DLQ_STORE_PREFIX) {
            Arc::new(self.dead_letters(config, store)?)
        } else {
            let Some(broker) = config.brokers.get(name) else {
                return Err(ClientError::UndefinedBroker(name.to_owned()));
            };
            match &broker.kind {
                BrokerKind::Kafka(kafka) => Arc::new(KafkaSink::new(name, kafka)?),
                BrokerKind::Nats(nats) => Arc::new(JetStreamSink::new(
                    self.nats(config, name, nats).await?.client,
                )),
                BrokerKind::RabbitMq(rabbit) => Arc::new(RabbitSink::new(name, rabbit)),
            }
        };
        self.sinks.insert(name.to_owned(), sink.clone());
        Ok(sink)
    }
}

impl Clients {
    /// Drops the clients of broker `name` (or of the dead-letter table `store:<name>`) whose
    /// definition changed: the next use connects anew.
    pub fn forget(&mut self, name: &str) {
        self.sinks.remove(name);
        self.nats.remove(name);
        if let Some(store) = name.strip_prefix(DLQ_STORE_PREFIX) {
            self.tables.remove(store);
        }
    }

    /// A scan of `endpoint`'s topic from its start (the DLQ tools read with it).
    pub async fn scan(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        endpoint: &Endpoint,
    ) -> Result<Box<dyn Scan>, ClientError> {
        if endpoint.broker == "local" {
            return Ok(Box::new(local.scan(&endpoint.topic)?));
        }
        if let Some(store) = endpoint.dlq_store() {
            return Ok(Box::new(
                self.dead_letters(config, store)?.scan(&endpoint.topic),
            ));
        }
        let Some(broker) = config.brokers.get(&endpoint.broker) else {
            return Err(ClientError::UndefinedBroker(endpoint.broker.clone()));
        };
        Ok(match &broker.kind {
            BrokerKind::Kafka(kafka) => Box::new(KafkaScan::open(kafka, &endpoint.topic).await?),
            BrokerKind::Nats(nats) => {
                let link = self.nats(config, &broker.name, nats).await?;
                link.connected_within(NATS_CONNECT_WAIT).await?;
                Box::new(JetStreamScan::open(link.client, &endpoint.topic).await?)
            }
            BrokerKind::RabbitMq(rabbit) => {
                Box::new(RabbitScan::open(&broker.name, rabbit, &endpoint.topic).await?)
            }
        })
    }

    /// The producer that feeds `route`'s source: its broker's sink, a core NATS publisher
    /// when the route reads core NATS (a JetStream publish would find no stream), or a writer
    /// of outbox rows when it relays an outbox.
    pub async fn feeder(
        &mut self,
        config: &Config,
        local: &LocalBroker,
        route: &RouteConfig,
    ) -> Result<Arc<dyn Sink>, ClientError> {
        // A route that relays an outbox is fed by writing rows into it.
        if let Some(outbox) = &route.outbox {
            let store = postgres(config, &outbox.store, DEAD_LETTER_POOL_SIZE)?;
            return Ok(Arc::new(OutboxWriter::new(store)));
        }
        if let Some(broker) = config.brokers.get(&route.source.broker)
            && let BrokerKind::Nats(nats) = &broker.kind
            && route.jetstream.is_none()
        {
            let link = self.nats(config, &broker.name, nats).await?;
            return Ok(Arc::new(NatsReplySink::new(link.client)));
        }
        self.sink(config, local, &route.source.broker).await
    }
}
